// Quick-tunnel API, admin API and the cfqt-edge command line (ready line), over real loopback
// sockets.

#include "admin-server.h"
#include "api-server.h"
#include "emulator.h"
#include "random.h"

#include <capnp/compat/json.h>
#include <capnp/message.h>
#include <kj/async-io.h>
#include <kj/compat/tls.h>
#include <kj/debug.h>
#include <kj/encoding.h>
#include <kj/io.h>
#include <kj/test.h>

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

namespace cfqt::emulator {
namespace {

struct JsonDoc {
  capnp::MallocMessageBuilder message;
  capnp::JsonValue::Reader root;
};

kj::Own<JsonDoc> parseJson(kj::StringPtr text) {
  auto doc = kj::heap<JsonDoc>();
  capnp::JsonCodec codec;
  auto builder = doc->message.initRoot<capnp::JsonValue>();
  codec.decodeRaw(text, builder);
  doc->root = builder.asReader();
  return doc;
}

capnp::JsonValue::Reader field(capnp::JsonValue::Reader object, kj::StringPtr name) {
  KJ_ASSERT(object.isObject(), name);
  for (auto f: object.getObject()) {
    if (f.getName() == name) return f.getValue();
  }
  KJ_FAIL_ASSERT("missing JSON field", name);
}

bool contains(kj::StringPtr haystack, kj::StringPtr needle) {
  return strstr(haystack.cStr(), needle.cStr()) != nullptr;
}

struct HttpResult {
  kj::uint status;
  kj::String body;
};

class Client {
public:
  Client(kj::AsyncIoContext& io, kj::StringPtr address)
      : io(io),
        addr(io.provider->getNetwork().parseAddress(address).wait(io.waitScope)),
        client(kj::newHttpClient(io.provider->getTimer(), table, *addr)) {}

  HttpResult call(kj::HttpMethod method, kj::StringPtr url) {
    kj::HttpHeaders headers(table);
    headers.set(kj::HttpHeaderId::HOST, "emulator");
    auto request = client->request(method, url, headers, uint64_t(0));
    auto response = request.response.wait(io.waitScope);
    auto body = response.body->readAllText().wait(io.waitScope);
    return {response.statusCode, kj::mv(body)};
  }

private:
  kj::AsyncIoContext& io;
  kj::HttpHeaderTable table;
  kj::Own<kj::NetworkAddress> addr;
  kj::Own<kj::HttpClient> client;
};

kj::String tempStateDir() {
  char templ[] = "/tmp/cfqt-emulator-http-XXXXXX";
  KJ_ASSERT(mkdtemp(templ) != nullptr);
  return kj::str(templ);
}

void removeStateDir(kj::StringPtr dir) {
  for (auto name: {"ca.pem", "ca-key.pem", "server.pem", "server-key.pem"}) {
    unlink(kj::str(dir, '/', name).cStr());
  }
  rmdir(dir.cStr());
}

class FakeConnection final: public ClientConnection {
public:
  kj::Promise<kj::Own<kj::AsyncIoStream>> openStream() override {
    return KJ_EXCEPTION(DISCONNECTED, "fake");
  }
  void close(uint64_t code, kj::StringPtr reason) override {
    closedWith = code;
    closeReason = kj::str(reason);
  }
  void goSilent() override { silent = true; }
  bool withholdCredit(kj::Maybe<int64_t> id) override {
    withheld = true;
    return id == nullptr || KJ_ASSERT_NONNULL(id) == 1;
  }
  bool closeControlStream(ControlEnd how, uint64_t code) override {
    if (controlClosed) return false;
    controlClosed = true;
    controlEnd = how;
    controlCode = code;
    return true;
  }
  kj::String remoteAddress() override { return kj::str("127.0.0.1:5555"); }
  kj::String describeStats() override { return kj::str("{\"fake\":true}"); }

  bool controlClosed = false;
  ControlEnd controlEnd = ControlEnd::FIN;
  uint64_t controlCode = 0;
  kj::Maybe<uint64_t> closedWith;
  kj::String closeReason;
  bool silent = false;
  bool withheld = false;
};

KJ_TEST("quick-tunnel API round trip, admin listing and fault injection") {
  auto io = kj::setupAsyncIo();
  auto stateDir = tempStateDir();
  KJ_DEFER(removeStateDir(stateDir));
  EmulatorOptions options;
  options.certificates.stateDir = kj::heapString(stateDir);
  options.zone = kj::str("example.localhost");
  Emulator emulator(io, kj::mv(options));
  auto ready = emulator.start().wait(io.waitScope);
  KJ_EXPECT(ready.api.startsWith("127.0.0.1:"), ready.api);
  KJ_EXPECT(ready.publicAddress.startsWith("127.0.0.1:"));
  KJ_EXPECT(ready.admin.startsWith("127.0.0.1:"));
  KJ_EXPECT(ready.ca == kj::str(stateDir, "/ca.pem"), ready.ca);
  KJ_EXPECT(ready.zone == "example.localhost");
  KJ_EXPECT(access(ready.ca.cStr(), R_OK) == 0);

  Client api(io, ready.api);
  auto created = api.call(kj::HttpMethod::POST, "/tunnel");
  KJ_EXPECT(created.status == 200);
  auto doc = parseJson(created.body);
  KJ_EXPECT(field(doc->root, "success").getBoolean());
  auto result = field(doc->root, "result");
  auto id = field(result, "id").getString();
  auto hostname = field(result, "hostname").getString();
  auto accountTag = field(result, "account_tag").getString();
  auto secret = field(result, "secret").getString();
  KJ_EXPECT(parseUuid(id) != nullptr, id);
  KJ_EXPECT(hostname.endsWith(".example.localhost"), hostname);
  KJ_EXPECT(accountTag.size() == 32);
  auto secretBytes = kj::decodeBase64(secret);
  KJ_EXPECT(!secretBytes.hadErrors && secretBytes.size() == 32);
  KJ_EXPECT(secret.size() == 44 && secret.endsWith("="));
  KJ_EXPECT(field(doc->root, "errors").getArray().size() == 0);

  // It remembers what it issued.
  auto& issued = KJ_ASSERT_NONNULL(emulator.registry().findByHostname(hostname));
  KJ_EXPECT(issued.id == id);
  KJ_EXPECT(issued.accountTag == accountTag);
  KJ_EXPECT(issued.secret.asPtr() == secretBytes.asPtr());

  KJ_EXPECT(api.call(kj::HttpMethod::GET, "/tunnel").status == 405);
  KJ_EXPECT(api.call(kj::HttpMethod::POST, "/tunnels/x").status == 404);
  auto second = parseJson(api.call(kj::HttpMethod::POST, "/tunnel").body);
  KJ_EXPECT(field(field(second->root, "result"), "id").getString() != id);

  // Admin: listing.
  Client admin(io, ready.admin);
  auto listing = admin.call(kj::HttpMethod::GET, "/tunnels");
  KJ_EXPECT(listing.status == 200);
  auto listingDoc = parseJson(listing.body);
  auto tunnels = field(listingDoc->root, "tunnels").getArray();
  KJ_EXPECT(tunnels.size() == 2);

  // A registered (fake) connection shows up and takes the fault injections.
  FakeConnection fake;
  RegistrationRequest request;
  request.accountTag = kj::heapString(issued.accountTag);
  request.tunnelSecret = kj::heapArray(issued.secret.asPtr());
  request.tunnelId = kj::heapArray(issued.idBytes.asPtr());
  request.clientId = randomUuidBytes();
  request.version = kj::str("test");
  auto& record = *emulator.registry().registerConnection(fake, request).get<ConnectionRecord*>();
  auto connections = parseJson(admin.call(kj::HttpMethod::GET, "/connections").body);
  auto list = field(connections->root, "connections").getArray();
  KJ_ASSERT(list.size() == 1);
  KJ_EXPECT(field(list[0], "id").getNumber() == record.id);
  KJ_EXPECT(field(list[0], "state").getString() == "registered");
  KJ_EXPECT(field(list[0], "hostname").getString() == hostname);
  KJ_EXPECT(field(field(list[0], "stats"), "fake").getBoolean());

  auto n = kj::str(record.id);
  KJ_EXPECT(admin.call(kj::HttpMethod::POST,
      kj::str("/connections/", n, "/close?code=7&reason=bye%20now")).status == 200);
  KJ_EXPECT(KJ_ASSERT_NONNULL(fake.closedWith) == 7);
  KJ_EXPECT(fake.closeReason == "bye now");
  KJ_EXPECT(admin.call(kj::HttpMethod::POST, kj::str("/connections/", n, "/silence")).status
            == 200);
  KJ_EXPECT(fake.silent);
  KJ_EXPECT(admin.call(kj::HttpMethod::POST,
      kj::str("/connections/", n, "/withhold-credit?stream=1")).status == 200);
  KJ_EXPECT(fake.withheld);
  KJ_EXPECT(admin.call(kj::HttpMethod::POST,
      kj::str("/connections/", n, "/withhold-credit?stream=5")).status == 404);
  KJ_EXPECT(admin.call(kj::HttpMethod::POST,
      kj::str("/connections/", n, "/close-control?how=later")).status == 400);
  KJ_EXPECT(admin.call(kj::HttpMethod::POST,
      kj::str("/connections/", n, "/close-control?code=-1")).status == 400);
  KJ_EXPECT(admin.call(kj::HttpMethod::POST,
      kj::str("/connections/", n, "/close-control?code=4611686018427387904")).status == 400);
  KJ_EXPECT(!fake.controlClosed);
  auto controlClosed = admin.call(kj::HttpMethod::POST,
      kj::str("/connections/", n, "/close-control?code=12"));
  KJ_EXPECT(controlClosed.status == 200, controlClosed.body);
  auto expected = kj::str("{\"controlClosed\":", n, ",\"how\":\"reset\",\"code\":12}");
  KJ_EXPECT(controlClosed.body == expected, controlClosed.body);
  KJ_EXPECT(fake.controlClosed && fake.controlEnd == ClientConnection::ControlEnd::RESET &&
            fake.controlCode == 12);
  KJ_EXPECT(admin.call(kj::HttpMethod::POST,
      kj::str("/connections/", n, "/close-control?how=fin")).status == 409);   // already ended
  fake.controlClosed = false;
  KJ_EXPECT(admin.call(kj::HttpMethod::POST,
      kj::str("/connections/", n, "/close-control?how=fin")).status == 200);
  KJ_EXPECT(fake.controlEnd == ClientConnection::ControlEnd::FIN);
  KJ_EXPECT(admin.call(kj::HttpMethod::GET,
      kj::str("/connections/", n, "/close-control")).status == 405);
  KJ_EXPECT(admin.call(kj::HttpMethod::POST, "/connections/999/close").status == 404);
  KJ_EXPECT(admin.call(kj::HttpMethod::POST, "/connections/abc/close").status == 404);
  KJ_EXPECT(admin.call(kj::HttpMethod::GET, kj::str("/connections/", n, "/close")).status
            == 405);
  KJ_EXPECT(admin.call(kj::HttpMethod::POST,
      kj::str("/connections/", n, "/close?code=x")).status == 400);

  // Reject-next: the next registration gets exactly the configured ConnectionError.
  KJ_EXPECT(admin.call(kj::HttpMethod::POST,
      "/registrations/reject-next?cause=server%20busy&retryAfter=2000000000&shouldRetry=true")
      .status == 200);
  FakeConnection other;
  request.connIndex = 1;
  auto rejected = emulator.registry().registerConnection(other, request);
  KJ_ASSERT(rejected.is<RegistrationError>());
  KJ_EXPECT(rejected.get<RegistrationError>().cause == "server busy");
  KJ_EXPECT(rejected.get<RegistrationError>().retryAfterNanos == 2000000000);
  KJ_EXPECT(rejected.get<RegistrationError>().shouldRetry);
  KJ_EXPECT(emulator.registry().registerConnection(other, request).is<ConnectionRecord*>());
  KJ_EXPECT(admin.call(kj::HttpMethod::POST,
      "/registrations/reject-next?shouldRetry=maybe").status == 400);
  KJ_EXPECT(admin.call(kj::HttpMethod::POST,
      "/registrations/reject-next?retryAfter=1x").status == 400);
  KJ_EXPECT(admin.call(kj::HttpMethod::GET, "/nope").status == 404);

  emulator.registry().connectionClosed(fake);
  emulator.registry().connectionClosed(other);
}

KJ_TEST("the API also answers over HTTPS with the generated certificate") {
  auto io = kj::setupAsyncIo();
  auto stateDir = tempStateDir();
  KJ_DEFER(removeStateDir(stateDir));
  EmulatorOptions options;
  options.certificates.stateDir = kj::heapString(stateDir);
  options.apiTlsListen = kj::str("127.0.0.1:0");
  Emulator emulator(io, kj::mv(options));
  auto ready = emulator.start().wait(io.waitScope);
  auto tlsAddress = kj::heapString(KJ_ASSERT_NONNULL(ready.apiTls));
  KJ_EXPECT(contains(ready.toJson(), "\"apiTls\":"));

  int fd;
  KJ_SYSCALL(fd = open(ready.ca.cStr(), O_RDONLY));
  auto caPem = kj::FdInputStream(kj::AutoCloseFd(fd)).readAllText();
  kj::TlsCertificate ca(caPem);
  kj::TlsContext::Options tlsOptions;
  tlsOptions.useSystemTrustStore = false;
  tlsOptions.trustedCertificates = kj::arrayPtr(&ca, 1);
  kj::TlsContext tls(kj::mv(tlsOptions));
  auto address = io.provider->getNetwork().parseAddress(tlsAddress).wait(io.waitScope);
  auto stream = tls.wrapClient(address->connect().wait(io.waitScope), "localhost")
      .wait(io.waitScope);
  kj::HttpHeaderTable table;
  auto client = kj::newHttpClient(table, *stream);
  kj::HttpHeaders headers(table);
  headers.set(kj::HttpHeaderId::HOST, "localhost");
  auto response = client->request(kj::HttpMethod::POST, "/tunnel", headers, uint64_t(0))
      .response.wait(io.waitScope);
  KJ_EXPECT(response.statusCode == 200);
  auto body = response.body->readAllText().wait(io.waitScope);
  auto doc = parseJson(body);
  auto id = field(field(doc->root, "result"), "id").getString();
  KJ_EXPECT(parseUuid(id) != nullptr, body);
}

KJ_TEST("parseDuration") {
  KJ_EXPECT(KJ_ASSERT_NONNULL(parseDuration("250ms")) == 250 * kj::MILLISECONDS);
  KJ_EXPECT(KJ_ASSERT_NONNULL(parseDuration("5s")) == 5 * kj::SECONDS);
  KJ_EXPECT(KJ_ASSERT_NONNULL(parseDuration("2m")) == 2 * kj::MINUTES);
  KJ_EXPECT(KJ_ASSERT_NONNULL(parseDuration("0")) == 0 * kj::SECONDS);
  KJ_EXPECT(parseDuration("5") == nullptr);
  KJ_EXPECT(parseDuration("s") == nullptr);
  KJ_EXPECT(parseDuration("-1s") == nullptr);
  KJ_EXPECT(parseDuration("99999999999999s") == nullptr);
}

KJ_TEST("cfqt-edge prints one JSON ready line with every bound address") {
  const char* binDir = getenv("CFQT_BIN_DIR");
  if (binDir == nullptr) KJ_FAIL_ASSERT("CFQT_BIN_DIR not set (run through ctest)");
  auto binary = kj::str(binDir, "/cfqt-edge");
  auto stateDir = tempStateDir();
  KJ_DEFER(removeStateDir(stateDir));

  int out[2];
  KJ_SYSCALL(pipe2(out, O_CLOEXEC));
  pid_t pid;
  KJ_SYSCALL(pid = fork());
  if (pid == 0) {
    dup2(out[1], STDOUT_FILENO);
    int devnull = open("/dev/null", O_WRONLY);
    dup2(devnull, STDERR_FILENO);
    execl(binary.cStr(), binary.cStr(), "--api-listen", "127.0.0.1:0",
          "--edge-listen", "127.0.0.1:0", "--edge-listen", "127.0.0.2:0",
          "--public-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
          "--state-dir", stateDir.cStr(), "--zone", "cli.localhost", "--loglevel", "error",
          "--idle-timeout", "300ms", "--dns-listen", "127.0.0.1:0", "--dot-listen", "127.0.0.1:0",
          "--public-tls-listen", "127.0.0.1:0", static_cast<char*>(nullptr));
    _exit(127);
  }
  close(out[1]);
  bool reaped = false;
  KJ_DEFER({
    if (!reaped) {
      kill(pid, SIGKILL);
      int status;
      waitpid(pid, &status, 0);
    }
    close(out[0]);
  });

  kj::Vector<char> line;
  for (;;) {
    struct pollfd pfd = {out[0], POLLIN, 0};
    int rc;
    KJ_SYSCALL(rc = poll(&pfd, 1, 10000));
    KJ_ASSERT(rc == 1, "no ready line within 10 s");
    char c;
    ssize_t n;
    KJ_SYSCALL(n = read(out[0], &c, 1));
    KJ_ASSERT(n == 1, "cfqt-edge exited before printing the ready line");
    if (c == '\n') break;
    line.add(c);
  }
  line.add('\0');
  auto text = kj::String(line.releaseAsArray());
  auto doc = parseJson(text);
  for (auto key: {"api", "public", "admin", "dns", "dot", "public_tls"}) {
    KJ_EXPECT(field(doc->root, key).getString().startsWith("127.0.0.1:"), key, text);
    KJ_EXPECT(!field(doc->root, key).getString().endsWith(":0"), key, text);
  }
  KJ_EXPECT(field(doc->root, "ca").getString() == kj::str(stateDir, "/ca.pem"), text);
  KJ_EXPECT(field(doc->root, "zone").getString() == "cli.localhost");
  auto edges = field(doc->root, "edges").getArray();
#if CFQT_EMULATOR_QUIC
  KJ_ASSERT(edges.size() == 2, text);
  KJ_EXPECT(field(doc->root, "edge").getString() == edges[0].getString());
  KJ_EXPECT(edges[0].getString().startsWith("127.0.0.1:"), text);
  KJ_EXPECT(edges[1].getString().startsWith("127.0.0.2:"), text);
  for (auto e: edges) KJ_EXPECT(!e.getString().endsWith(":0"), text);
#else
  KJ_LOG(WARNING, "cfqt-edge built without the QUIC layer: no edges in the ready line");
#endif
  // The HTTP/2 edge listens on TCP at the very same addresses (issue 14).
  auto tcpEdges = field(doc->root, "tcpEdges").getArray();
  KJ_ASSERT(tcpEdges.size() == 2, text);
#if CFQT_EMULATOR_QUIC
  for (auto i: kj::indices(tcpEdges)) {
    KJ_EXPECT(tcpEdges[i].getString() == edges[i].getString(), text);
  }
#endif
  KJ_EXPECT(!field(doc->root, "udpBlocked").getBoolean(), text);
  // Exactly the documented keys (apiTls only with --api-tls-listen); new keys go at the end.
  kj::Vector<kj::String> keys;
  for (auto f: doc->root.getObject()) keys.add(kj::str(f.getName()));
  KJ_EXPECT(kj::strArray(keys, ",") ==
            "api,edge,edges,public,admin,ca,zone,tcpEdges,udpBlocked,dns,dot,public_tls", text);

  // The API it printed answers.
  auto io = kj::setupAsyncIo();
  Client api(io, field(doc->root, "api").getString());
  auto created = api.call(kj::HttpMethod::POST, "/tunnel");
  KJ_EXPECT(created.status == 200);
  KJ_EXPECT(field(field(parseJson(created.body)->root, "result"), "hostname").getString()
            .endsWith(".cli.localhost"));

  // SIGTERM ends it cleanly, promptly.
  KJ_SYSCALL(kill(pid, SIGTERM));
  // Its exit closes the stdout pipe: wait for that EOF (at most 5 s), then reap it.
  for (;;) {
    struct pollfd pfd = {out[0], POLLIN, 0};
    int rc;
    KJ_SYSCALL(rc = poll(&pfd, 1, 5000));
    KJ_ASSERT(rc == 1, "cfqt-edge did not exit within 5 s of SIGTERM");
    char buffer[256];
    ssize_t n;
    KJ_SYSCALL(n = read(out[0], buffer, sizeof(buffer)));
    if (n == 0) break;
  }
  int status = 0;
  KJ_SYSCALL(waitpid(pid, &status, 0));
  reaped = true;
  KJ_EXPECT(WIFEXITED(status) && WEXITSTATUS(status) == 0, status);
}

}  // namespace
}  // namespace cfqt::emulator
