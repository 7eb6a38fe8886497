#include "registry.h"

#include "random.h"

#include <kj/encoding.h>
#include <kj/test.h>

namespace cfqt::emulator {
namespace {

class FakeConnection final: public ClientConnection {
public:
  kj::Promise<kj::Own<kj::AsyncIoStream>> openStream() override {
    return KJ_EXCEPTION(DISCONNECTED, "fake");
  }
  void close(uint64_t code, kj::StringPtr reason) override { closed++; }
  void goSilent() override {}
  bool withholdCredit(kj::Maybe<int64_t>) override { return false; }
  kj::String remoteAddress() override { return kj::str("127.0.0.1:1"); }
  kj::String describeStats() override { return kj::str("{}"); }
  kj::uint closed = 0;
};

RegistrationRequest requestFor(const IssuedTunnel& tunnel, uint8_t connIndex = 0) {
  RegistrationRequest request;
  request.accountTag = kj::heapString(tunnel.accountTag);
  request.tunnelSecret = kj::heapArray(tunnel.secret.asPtr());
  request.tunnelId = kj::heapArray(tunnel.idBytes.asPtr());
  request.connIndex = connIndex;
  request.clientId = randomUuidBytes();
  request.version = kj::str("2023.7.3");
  request.arch = kj::str("linux_amd64");
  return request;
}

KJ_TEST("issued tunnels have the documented shapes") {
  Registry registry("TryCloudflare.localhost");
  auto& tunnel = registry.issueTunnel();
  KJ_EXPECT(tunnel.id.size() == 36);
  KJ_EXPECT(parseUuid(tunnel.id) != nullptr);
  KJ_EXPECT(tunnel.id[14] == '4', tunnel.id);                  // version 4
  KJ_EXPECT(tunnel.accountTag.size() == 32);
  for (char c: tunnel.accountTag) KJ_EXPECT((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'));
  KJ_EXPECT(tunnel.secret.size() == 32);
  KJ_EXPECT(tunnel.secretBase64.size() == 44 && tunnel.secretBase64.endsWith("="));
  auto decoded = kj::decodeBase64(tunnel.secretBase64);
  KJ_EXPECT(!decoded.hadErrors && decoded.asPtr() == tunnel.secret.asPtr());
  KJ_EXPECT(tunnel.hostname.endsWith(".trycloudflare.localhost"), tunnel.hostname);

  auto& other = registry.issueTunnel();
  KJ_EXPECT(other.id != tunnel.id);
  KJ_EXPECT(other.hostname != tunnel.hostname);
  KJ_EXPECT(&KJ_ASSERT_NONNULL(registry.findByHostname(toLower(tunnel.hostname))) == &tunnel);
  auto upper = kj::heapString(tunnel.hostname);
  for (char& c: upper) if (c >= 'a' && c <= 'z') c = static_cast<char>(c - 'a' + 'A');
  KJ_EXPECT(&KJ_ASSERT_NONNULL(registry.findByHostname(upper)) == &tunnel);
  KJ_EXPECT(registry.findByHostname("nope.trycloudflare.localhost") == nullptr);
}

KJ_TEST("uuid text round trip and rejection") {
  auto bytes = randomUuidBytes();
  auto text = formatUuid(bytes);
  KJ_EXPECT(KJ_ASSERT_NONNULL(parseUuid(text)).asPtr() == bytes.asPtr());
  KJ_EXPECT(parseUuid("01234567-89ab-cdef-0123-456789abcdeg") == nullptr);
  KJ_EXPECT(parseUuid("0123456789abcdef0123456789abcdef") == nullptr);
  KJ_EXPECT(parseUuid("") == nullptr);
}

KJ_TEST("registration: accepted, EDUPCONN, Unauthorized, injected rejection") {
  Registry registry("trycloudflare.localhost");
  auto& tunnel = registry.issueTunnel();
  FakeConnection a, b;

  auto first = registry.registerConnection(a, requestFor(tunnel));
  KJ_ASSERT(first.is<ConnectionRecord*>());
  auto& record = *first.get<ConnectionRecord*>();
  KJ_EXPECT(record.uuid.size() == 16);
  KJ_EXPECT(record.state == ConnectionState::REGISTERED);
  KJ_EXPECT(record.version == "2023.7.3");

  auto dup = registry.registerConnection(b, requestFor(tunnel));
  KJ_ASSERT(dup.is<RegistrationError>());
  KJ_EXPECT(dup.get<RegistrationError>().cause == "EDUPCONN");

  auto other = registry.registerConnection(b, requestFor(tunnel, 1));
  KJ_EXPECT(other.is<ConnectionRecord*>());

  auto badSecret = requestFor(tunnel, 2);
  badSecret.tunnelSecret[0] ^= 1;
  auto r1 = registry.registerConnection(b, badSecret);
  KJ_ASSERT(r1.is<RegistrationError>());
  KJ_EXPECT(r1.get<RegistrationError>().cause.startsWith("Unauthorized"));

  auto badTag = requestFor(tunnel, 2);
  badTag.accountTag = kj::str("0123456789abcdef0123456789abcdef");
  auto r2 = registry.registerConnection(b, badTag);
  KJ_ASSERT(r2.is<RegistrationError>());
  KJ_EXPECT(r2.get<RegistrationError>().cause.startsWith("Unauthorized"));

  auto badId = requestFor(tunnel, 2);
  badId.tunnelId = randomUuidBytes();
  auto r3 = registry.registerConnection(b, badId);
  KJ_ASSERT(r3.is<RegistrationError>());
  KJ_EXPECT(r3.get<RegistrationError>().cause.startsWith("Unauthorized"));

  auto shortId = requestFor(tunnel, 2);
  shortId.tunnelId = kj::heapArray<kj::byte>(3);
  KJ_EXPECT(registry.registerConnection(b, shortId).is<RegistrationError>());

  registry.rejectNextRegistrations({kj::str("too busy"), 5000000000, true}, 2);
  for (int i = 0; i < 2; i++) {
    auto injected = registry.registerConnection(b, requestFor(tunnel, 3));
    KJ_ASSERT(injected.is<RegistrationError>());
    auto& e = injected.get<RegistrationError>();
    KJ_EXPECT(e.cause == "too busy");
    KJ_EXPECT(e.retryAfterNanos == 5000000000);
    KJ_EXPECT(e.shouldRetry);
  }
  KJ_EXPECT(registry.registerConnection(b, requestFor(tunnel, 3)).is<ConnectionRecord*>());

  // After the first connection closes, index 0 may register again.
  registry.connectionClosed(a);
  KJ_EXPECT(record.state == ConnectionState::CLOSED);
  KJ_EXPECT(record.connection == nullptr);
  KJ_EXPECT(registry.registerConnection(b, requestFor(tunnel)).is<ConnectionRecord*>());
}

KJ_TEST("replaceExisting closes the older connection") {
  Registry registry("trycloudflare.localhost");
  auto& tunnel = registry.issueTunnel();
  FakeConnection a, b;
  KJ_ASSERT(registry.registerConnection(a, requestFor(tunnel)).is<ConnectionRecord*>());
  auto request = requestFor(tunnel);
  request.replaceExisting = true;
  KJ_EXPECT(registry.registerConnection(b, request).is<ConnectionRecord*>());
  KJ_EXPECT(a.closed == 1);
}

KJ_TEST("pick is round-robin over registered live connections") {
  Registry registry("trycloudflare.localhost");
  auto& tunnel = registry.issueTunnel();
  auto& empty = registry.issueTunnel();
  FakeConnection a, b, c;
  auto& ra = *registry.registerConnection(a, requestFor(tunnel, 0)).get<ConnectionRecord*>();
  auto& rb = *registry.registerConnection(b, requestFor(tunnel, 1)).get<ConnectionRecord*>();
  auto& rc = *registry.registerConnection(c, requestFor(tunnel, 2)).get<ConnectionRecord*>();

  KJ_EXPECT(registry.pick(empty) == nullptr);
  kj::uint counts[3] = {0, 0, 0};
  for (int i = 0; i < 30; i++) {
    auto& picked = KJ_ASSERT_NONNULL(registry.pick(tunnel));
    counts[picked.connIndex]++;
  }
  KJ_EXPECT(counts[0] == 10 && counts[1] == 10 && counts[2] == 10);

  registry.unregisterConnection(rb);
  KJ_EXPECT(rb.state == ConnectionState::UNREGISTERED);
  registry.connectionClosed(c);
  for (int i = 0; i < 5; i++) {
    KJ_EXPECT(&KJ_ASSERT_NONNULL(registry.pick(tunnel)) == &ra);
  }
  KJ_EXPECT(rc.state == ConnectionState::CLOSED);
  registry.connectionClosed(a);
  KJ_EXPECT(registry.pick(tunnel) == nullptr);
  KJ_EXPECT(&KJ_ASSERT_NONNULL(registry.findConnection(rb.id)) == &rb);
  KJ_EXPECT(registry.findConnection(9999) == nullptr);
}

KJ_TEST("named tunnels: routes, many connectors per tunnel, round robin over all of them") {
  Registry registry("trycloudflare.localhost");
  auto& tunnel = registry.issueNamedTunnel("prod", true);
  KJ_EXPECT(tunnel.named && tunnel.remotelyManaged && tunnel.name == "prod");
  KJ_EXPECT(tunnel.hostname == kj::str(tunnel.id, ".trycloudflare.localhost"));
  KJ_EXPECT(registry.addRoute(tunnel, "App.Example.localhost") == nullptr);
  KJ_EXPECT(registry.addRoute(tunnel, "app.example.localhost") == nullptr);   // idempotent
  KJ_EXPECT(registry.addRoute(tunnel, "bad host") != nullptr);
  auto& other = registry.issueNamedTunnel("other", false);
  KJ_EXPECT(registry.addRoute(other, "app.example.localhost") != nullptr);   // taken
  KJ_EXPECT(&KJ_ASSERT_NONNULL(registry.findByHostname("app.example.localhost")) == &tunnel);
  KJ_EXPECT(&KJ_ASSERT_NONNULL(registry.findByIdText(tunnel.id)) == &tunnel);

  // Three connectors, two connections each: index 0 and 1 per connector are not duplicates.
  FakeConnection conns[6];
  kj::Vector<ConnectionRecord*> records;
  for (int connector = 0; connector < 3; connector++) {
    auto clientId = randomUuidBytes();
    for (uint8_t index = 0; index < 2; index++) {
      auto request = requestFor(tunnel, index);
      request.clientId = kj::heapArray(clientId.asPtr());
      auto result = registry.registerConnection(conns[connector * 2 + index], request);
      KJ_ASSERT(result.is<ConnectionRecord*>());
      records.add(result.get<ConnectionRecord*>());
    }
    // The same connector registering index 0 again is a duplicate.
    auto again = requestFor(tunnel, 0);
    again.clientId = kj::heapArray(clientId.asPtr());
    auto dup = registry.registerConnection(conns[connector * 2], again);
    KJ_ASSERT(dup.is<RegistrationError>());
    KJ_EXPECT(dup.get<RegistrationError>().cause == "EDUPCONN");
  }
  kj::uint counts[6] = {0, 0, 0, 0, 0, 0};
  for (int i = 0; i < 60; i++) {
    auto& picked = KJ_ASSERT_NONNULL(registry.pick(tunnel));
    for (int k = 0; k < 6; k++) if (records[k] == &picked) counts[k]++;
  }
  for (auto c: counts) KJ_EXPECT(c == 10, c);
  // A connector that goes away leaves the rotation at once.
  registry.connectionClosed(conns[2]);
  registry.unregisterConnection(*records[3]);
  for (int i = 0; i < 20; i++) {
    auto& picked = KJ_ASSERT_NONNULL(registry.pick(tunnel));
    KJ_EXPECT(&picked != records[2] && &picked != records[3]);
  }
}

}  // namespace
}  // namespace cfqt::emulator
