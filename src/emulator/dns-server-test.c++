// The emulator's authoritative DNS (issue 16): what it answers before and after --dns-delay, the
// SOA minimum of its NXDOMAIN answers (the negative TTL), refusals, and that no input makes it
// throw. Answers are read back with the decoder cfqt's --wait-ready uses (edge::dns).

#include "dns-server.h"

#include "random.h"

#include "edge/dns.h"
#include "wire/fuzz-mutator.h"

#include <kj/test.h>

namespace cfqt::emulator {
namespace {

class FakeConnection final: public ClientConnection {
public:
  kj::Promise<kj::Own<kj::AsyncIoStream>> openStream() override {
    return KJ_EXCEPTION(DISCONNECTED, "fake");
  }
  void close(uint64_t code, kj::StringPtr reason) override {}
  void goSilent() override {}
  bool withholdCredit(kj::Maybe<int64_t>) override { return false; }
  kj::String remoteAddress() override { return kj::str("127.0.0.1:1"); }
  kj::String describeStats() override { return kj::str("{}"); }
};

class FakeClock final: public kj::MonotonicClock {
public:
  kj::TimePoint now() const override { return time; }
  kj::TimePoint time = kj::origin<kj::TimePoint>() + 1000 * kj::SECONDS;
};

kj::Array<kj::byte> query(uint16_t id, kj::StringPtr name, uint16_t type) {
  kj::Vector<kj::byte> m;
  auto u16 = [&](kj::uint v) { m.add(kj::byte(v >> 8)); m.add(kj::byte(v)); };
  u16(id); u16(0x0100); u16(1); u16(0); u16(0); u16(0);
  size_t start = 0;
  for (size_t i = 0; i <= name.size(); i++) {
    if (i == name.size() || name[i] == '.') {
      m.add(kj::byte(i - start));
      m.addAll(name.slice(start, i).asBytes());
      start = i + 1;
    }
  }
  m.add(0);
  u16(type); u16(1);
  return m.releaseAsArray();
}

uint32_t soaMinimum(kj::ArrayPtr<const kj::byte> m) {
  // The last 4 bytes of an answer whose last record is the SOA.
  size_t n = m.size();
  return (uint32_t(m[n - 4]) << 24) | (uint32_t(m[n - 3]) << 16) | (uint32_t(m[n - 2]) << 8) |
         m[n - 1];
}

struct Fixture {
  kj::EventLoop loop;
  kj::WaitScope waitScope{loop};
  kj::TimerImpl timer{kj::origin<kj::TimePoint>()};
  FakeClock clock;
  Registry registry{"trycloudflare.localhost"};
  FakeConnection connection;
  kj::Own<DnsServer> server;

  explicit Fixture(kj::Duration delay) {
    registry.setClock(clock);
    DnsServerOptions options;
    options.dnsDelay = delay;
    options.negativeTtl = 1234;
    options.ipv4.add(KJ_ASSERT_NONNULL(parseIpBytes("127.0.0.1")));
    options.ipv6.add(KJ_ASSERT_NONNULL(parseIpBytes("::1")));
    server = kj::heap<DnsServer>(timer, registry, kj::mv(options));
  }

  void registerTunnel(IssuedTunnel& tunnel) {
    RegistrationRequest request;
    request.accountTag = kj::heapString(tunnel.accountTag);
    request.tunnelSecret = kj::heapArray(tunnel.secret.asPtr());
    request.tunnelId = kj::heapArray(tunnel.idBytes.asPtr());
    request.clientId = randomUuidBytes();
    KJ_ASSERT(registry.registerConnection(connection, request).is<ConnectionRecord*>());
  }
};

KJ_TEST("DNS: NXDOMAIN with the negative TTL until --dns-delay after registration, then A/AAAA") {
  Fixture f(1500 * kj::MILLISECONDS);
  auto& tunnel = f.registry.issueTunnel();
  auto ask = [&](bool ipv6) {
    auto response = KJ_ASSERT_NONNULL(f.server->answer(query(7, tunnel.hostname, ipv6 ? 28 : 1)));
    return kj::mv(response);
  };
  // Issued, not registered: no record yet.
  auto before = ask(false);
  auto answer = edge::decodeAddressResponse(before, 7, false);
  KJ_EXPECT(answer.notFound && answer.error == "domain name not found (NXDOMAIN)", answer.error);
  KJ_EXPECT(soaMinimum(before) == 1234);
  KJ_EXPECT((before[2] & 0x04) != 0, "not authoritative");

  f.registerTunnel(tunnel);
  f.clock.time += 1499 * kj::MILLISECONDS;
  KJ_EXPECT(edge::decodeAddressResponse(ask(false), 7, false).notFound);
  f.clock.time += 1 * kj::MILLISECONDS;
  auto v4 = edge::decodeAddressResponse(ask(false), 7, false);
  KJ_ASSERT(v4.error == "", v4.error);
  KJ_EXPECT(v4.addresses.size() == 1 && v4.addresses[0] == "127.0.0.1");
  auto v6 = edge::decodeAddressResponse(ask(true), 7, true);
  KJ_ASSERT(v6.error == "", v6.error);
  KJ_EXPECT(v6.addresses.size() == 1 && v6.addresses[0] == "::1");

  // Any case (DNS 0x20), the question echoed as asked.
  auto upper = kj::heapString(tunnel.hostname);
  for (char& c: upper) if (c >= 'a' && c <= 'z') c = static_cast<char>(c - 'a' + 'A');
  auto mixed = KJ_ASSERT_NONNULL(f.server->answer(query(8, upper, 1)));
  KJ_EXPECT(edge::decodeAddressResponse(mixed, 8, false).addresses.size() == 1);
  KJ_EXPECT(kj::str(mixed.slice(13, 13 + 5).asChars()) == upper.slice(0, 5));

  // A name in the zone no tunnel has: NXDOMAIN; another type of an existing name: NODATA.
  auto none = KJ_ASSERT_NONNULL(f.server->answer(query(9, "nope.trycloudflare.localhost", 1)));
  KJ_EXPECT((none[3] & 0x0f) == 3);
  auto txt = KJ_ASSERT_NONNULL(f.server->answer(query(10, tunnel.hostname, 16)));
  KJ_EXPECT((txt[3] & 0x0f) == 0 && txt[7] == 0 && txt[9] == 1);   // no answer, SOA
}

KJ_TEST("DNS: out of zone is REFUSED, non-queries FORMERR/NOTIMP, responses dropped") {
  Fixture f(0 * kj::SECONDS);
  auto refused = KJ_ASSERT_NONNULL(f.server->answer(query(1, "example.com", 1)));
  KJ_EXPECT((refused[3] & 0x0f) == 5);
  auto lookalike = KJ_ASSERT_NONNULL(
      f.server->answer(query(1, "eviltrycloudflare.localhost", 1)));
  KJ_EXPECT((lookalike[3] & 0x0f) == 5);
  auto notify = query(2, "trycloudflare.localhost", 6);
  notify[2] = 0x20;   // opcode 4 (NOTIFY)
  KJ_EXPECT((KJ_ASSERT_NONNULL(f.server->answer(notify))[3] & 0x0f) == 4);
  auto response = query(3, "trycloudflare.localhost", 6);
  response[2] |= 0x80;
  KJ_EXPECT(f.server->answer(response) == nullptr);
  KJ_EXPECT(f.server->answer(query(4, "x", 1).slice(0, 11)) == nullptr);
  auto soa = KJ_ASSERT_NONNULL(f.server->answer(query(5, "trycloudflare.localhost", 6)));
  KJ_EXPECT((soa[3] & 0x0f) == 0 && soa[7] == 1);
}

KJ_TEST("fuzz: DnsServer::answer on mutated queries never throws") {
  Fixture f(0 * kj::SECONDS);
  auto& tunnel = f.registry.issueTunnel();
  f.registerTunnel(tunnel);
  fuzz::Rng rng(0xD45E0001);
  kj::Vector<kj::Array<kj::byte>> seeds;
  seeds.add(query(1, tunnel.hostname, 1));
  seeds.add(query(2, tunnel.hostname, 28));
  seeds.add(query(3, "trycloudflare.localhost", 6));
  seeds.add(query(4, "a.b.c.example.com", 1));
  size_t answered = 0;
  for (size_t i = 0; i < 5000; i++) {
    KJ_CONTEXT(i);
    auto input = fuzz::mutate(rng, seeds[rng.below(seeds.size())], 8);
    KJ_IF_MAYBE(response, f.server->answer(input)) {
      answered++;
      KJ_EXPECT(response->size() >= 12 && response->size() < 1024);
      KJ_EXPECT((*response)[2] & 0x80);
    }
  }
  KJ_EXPECT(answered > 1000, answered);
}

}  // namespace
}  // namespace cfqt::emulator
