// Tests of the QUIC layer over loopback: handshake and TLS failures, timeouts, streams,
// integrity, back-pressure, many connections, closes.

#include "quic/endpoint.h"
#include "quic/internal.h"   // ClientCredentials::systemStoreLoads()
#include "eventually.h"

#include <kj/async-io.h>
#include <kj/debug.h>
#include <kj/filesystem.h>
#include <kj/test.h>
#include <kj/vector.h>

#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

namespace cfqt::quic {
namespace {

#if defined(__SANITIZE_ADDRESS__)
constexpr bool SANITIZED = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
constexpr bool SANITIZED = true;
#else
constexpr bool SANITIZED = false;
#endif
#else
constexpr bool SANITIZED = false;
#endif

// Sizes scaled down under ASan, where everything is ~10x slower; the cases stay the same.
constexpr uint64_t MiB = 1024 * 1024;
constexpr uint64_t BIG = SANITIZED ? 8 * MiB : 64 * MiB;
constexpr uint32_t ECHO_STREAMS = SANITIZED ? 2000 : 10000;

bool contains(kj::StringPtr haystack, kj::StringPtr needle) {
  return strstr(haystack.cStr(), needle.cStr()) != nullptr;
}

kj::String testdata(kj::StringPtr name) {
  return kj::str(CFQT_QUIC_TESTDATA, "/", name);
}

TransportConfig fastTransport() {
  TransportConfig t;
  t.handshakeTimeout = 3 * kj::SECONDS;
  t.maxIdleTimeout = 3 * kj::SECONDS;
  t.keepAlivePeriod = 500 * kj::MILLISECONDS;
  return t;
}

ServerConfig serverConfig(TransportConfig transport = fastTransport()) {
  ServerConfig config;
  config.certFile = testdata("server.pem");
  config.keyFile = testdata("server-key.pem");
  config.alpn.add(kj::str("argotunnel"));
  config.transport = transport;
  return config;
}

ClientConfig clientConfig(TransportConfig transport = fastTransport()) {
  ClientConfig config;
  config.caFile = testdata("ca.pem");
  config.transport = transport;
  return config;
}

SocketAddress loopback() {
  return KJ_ASSERT_NONNULL(SocketAddress::parse("127.0.0.1:0"));
}

struct Env {
  kj::AsyncIoContext io = kj::setupAsyncIo();
  kj::Timer& timer = io.provider->getTimer();
  kj::Own<Endpoint> server;
  kj::Own<Endpoint> client;

  explicit Env(TransportConfig serverTransport = fastTransport()) {
    server = newEndpoint(io.unixEventPort, loopback());
    server->listen(serverConfig(serverTransport));
    client = newEndpoint(io.unixEventPort, loopback());
  }

  template <typename T>
  T wait(kj::Promise<T> promise, kj::Duration limit = 20 * kj::SECONDS) {
    return timer.timeoutAfter(limit, kj::mv(promise)).wait(io.waitScope);
  }

  struct Pair {
    kj::Own<Connection> client;
    kj::Own<Connection> server;
  };

  Pair connect(ClientConfig config = clientConfig()) {
    auto accepted = server->accept();
    auto dialed = client->dial(server->localAddress(), kj::mv(config));
    auto c = wait(kj::mv(dialed));
    auto s = wait(kj::mv(accepted));
    return {kj::mv(c), kj::mv(s)};
  }
};

// ---- data patterns: byte i of stream `seed` is a function of (seed, i), so readers verify
// any split of the data without storing it.

uint64_t splitmix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

void fillPattern(kj::byte* out, uint64_t offset, size_t len, uint64_t seed) {
  size_t i = 0;
  while (i < len) {
    uint64_t pos = offset + i;
    uint64_t word = splitmix(seed * 0x100000000ull + pos / 8);
    size_t start = pos % 8;
    size_t k = kj::min(size_t(8 - start), len - i);
    for (size_t j = 0; j < k; j++) out[i + j] = kj::byte(word >> (8 * (start + j)));
    i += k;
  }
}

kj::Promise<void> writePattern(Stream& stream, uint64_t total, uint64_t seed, uint64_t done,
                               kj::Array<kj::byte> buffer) {
  if (done == total) {
    stream.shutdownWrite();
    return kj::READY_NOW;
  }
  size_t n = kj::min(uint64_t(buffer.size()), total - done);
  fillPattern(buffer.begin(), done, n, seed);
  auto written = stream.write(buffer.begin(), n);
  return written.then([&stream, total, seed, done = done + n, buffer = kj::mv(buffer)]() mutable {
    return writePattern(stream, total, seed, done, kj::mv(buffer));
  });
}

kj::Promise<void> writePattern(Stream& stream, uint64_t total, uint64_t seed) {
  return writePattern(stream, total, seed, 0, kj::heapArray<kj::byte>(64 * 1024));
}

struct ReadState {
  kj::Array<kj::byte> buffer = kj::heapArray<kj::byte>(96 * 1024);
  kj::Array<kj::byte> expected = kj::heapArray<kj::byte>(96 * 1024);
  uint64_t done = 0;
  uint64_t mismatches = 0;
};

kj::Promise<uint64_t> readPattern(Stream& stream, uint64_t seed, kj::Own<ReadState> st) {
  auto read = stream.tryRead(st->buffer.begin(), 1, st->buffer.size());
  return read.then([&stream, seed, st = kj::mv(st)](size_t n) mutable -> kj::Promise<uint64_t> {
    if (n == 0) {
      KJ_ASSERT(st->mismatches == 0, "received bytes differ from what was sent", seed);
      return st->done;
    }
    fillPattern(st->expected.begin(), st->done, n, seed);
    if (memcmp(st->expected.begin(), st->buffer.begin(), n) != 0) ++st->mismatches;
    st->done += n;
    return readPattern(stream, seed, kj::mv(st));
  });
}

kj::Promise<uint64_t> readPattern(Stream& stream, uint64_t seed) {
  return readPattern(stream, seed, kj::heap<ReadState>());
}

kj::Promise<kj::String> readAllText(Stream& stream) {
  return stream.readAllText(1 << 20);
}

// Echo every accepted stream: read to EOF, write it back, FIN.
kj::Promise<void> echoStream(kj::Own<Stream> stream) {
  auto& ref = *stream;
  return ref.readAllBytes(1 << 20).then([&ref](kj::Array<kj::byte> data) {
    auto written = ref.write(data.begin(), data.size());
    return written.attach(kj::mv(data)).then([&ref]() { ref.shutdownWrite(); });
  }).attach(kj::mv(stream));
}

class Echoer: private kj::TaskSet::ErrorHandler {
public:
  explicit Echoer(Connection& conn): conn(conn) { tasks.add(loop()); }
  uint64_t streams = 0;

private:
  Connection& conn;
  kj::TaskSet tasks{*this};

  kj::Promise<void> loop() {
    return conn.acceptStream().then([this](kj::Own<Stream> stream) {
      ++streams;
      tasks.add(echoStream(kj::mv(stream)));
      return loop();
    });
  }
  void taskFailed(kj::Exception&& e) override {
    if (e.getType() != kj::Exception::Type::DISCONNECTED) KJ_LOG(ERROR, "echo failed", e);
  }
};

kj::Promise<kj::String> roundTrip(Connection& conn, kj::String text) {
  return conn.openStream().then([text = kj::mv(text)](kj::Own<Stream> stream) mutable {
    auto& ref = *stream;
    auto written = ref.write(text.begin(), text.size());
    return written.then([&ref]() {
      ref.shutdownWrite();
      return readAllText(ref);
    }).attach(kj::mv(stream), kj::mv(text));
  });
}

// =======================================================================================

KJ_TEST("handshake, ALPN/SNI, a stream each way, close with code and reason") {
  Env env;
  auto pair = env.connect();
  KJ_EXPECT(pair.client->alpn() == "argotunnel");
  KJ_EXPECT(pair.server->alpn() == "argotunnel");
  KJ_EXPECT(pair.server->serverName() == "quic.cftunnel.com");
  KJ_EXPECT(pair.server->isServer());
  KJ_EXPECT(!pair.client->isServer());
  KJ_EXPECT(pair.client->remoteAddress() == env.server->localAddress());
  KJ_EXPECT(pair.server->remoteAddress() == env.client->localAddress());

  // Client-opened stream (like the control stream) echoed by the server.
  Echoer serverEcho(*pair.server);
  auto echoed = env.wait(roundTrip(*pair.client, kj::str("hello from the client")));
  KJ_EXPECT(echoed == "hello from the client");
  // Server-opened stream echoed by the client.
  Echoer clientEcho(*pair.client);
  KJ_EXPECT(env.wait(roundTrip(*pair.server, kj::str("hello from the server"))) ==
            "hello from the server");

  auto stats = pair.client->stats();
  KJ_EXPECT(stats.smoothedRtt > 0 * kj::NANOSECONDS);
  KJ_EXPECT(stats.minRtt > 0 * kj::NANOSECONDS && stats.minRtt <= stats.latestRtt);
  KJ_EXPECT(stats.packetsSent > 0 && stats.packetsReceived > 0);
  KJ_EXPECT(stats.bytesSent > 0 && stats.bytesReceived > 0);
  KJ_EXPECT(stats.streamsOpenedLocal == 1, stats.streamsOpenedLocal);
  KJ_EXPECT(stats.streamsOpenedRemote == 1, stats.streamsOpenedRemote);

  auto serverClosed = pair.server->onClosed();
  pair.client->close(42, "bye now").wait(env.io.waitScope);
  auto info = env.wait(kj::mv(serverClosed));
  KJ_EXPECT(info.kind == CloseKind::PEER_APPLICATION_CLOSE, info.kind);
  KJ_EXPECT(info.code == 42);
  KJ_EXPECT(info.reason == "bye now");
  KJ_EXPECT(contains(info.description, "42"), info.description);
  auto e = info.toException();
  KJ_EXPECT(e.getType() == kj::Exception::Type::DISCONNECTED);
  KJ_EXPECT(classifyException(e) == CloseKind::PEER_APPLICATION_CLOSE);
  KJ_EXPECT(KJ_ASSERT_NONNULL(pair.client->closeInfo()).kind == CloseKind::LOCAL_CLOSE);
  // Operations after the close fail with the close reason.
  KJ_EXPECT_THROW_MESSAGE("closed by the peer", env.wait(pair.server->openStream()));
}

KJ_TEST("defaults follow PROTOCOL.md 3.2") {
  TransportConfig t;
  KJ_EXPECT(t.handshakeTimeout == 10 * kj::SECONDS);
  KJ_EXPECT(t.maxIdleTimeout == 5 * kj::SECONDS);
  KJ_EXPECT(t.keepAlivePeriod == 1 * kj::SECONDS);
  KJ_EXPECT(t.maxIncomingBidiStreams == 1ull << 60);
  KJ_EXPECT(t.maxIncomingUniStreams == 1ull << 60);
  KJ_EXPECT(t.initialStreamWindow == 512 * 1024);
  KJ_EXPECT(t.initialConnectionWindow == 768 * 1024);
  KJ_EXPECT(t.maxStreamWindow == 6 * MiB);
  KJ_EXPECT(t.maxConnectionWindow == 15 * MiB);
  KJ_EXPECT(t.maxDatagramFrameSize == 1350);
  KJ_EXPECT(t.maxUdpPayloadSize == 1452);
  ClientConfig c;
  KJ_EXPECT(c.alpn == "argotunnel");
  KJ_EXPECT(c.serverName == "quic.cftunnel.com");
  KJ_EXPECT(c.verifyCertificate);
}

KJ_TEST("trust roots: PEM text, file plus system store, none (refused), verification off") {
  Env env;
  {
    auto config = clientConfig();
    config.caFile = nullptr;
    auto fs = kj::newDiskFilesystem();
    config.caPem = fs->getRoot().openFile(fs->getCurrentPath().eval(testdata("ca.pem")))
        ->readAllText();
    auto pair = env.connect(kj::mv(config));
    KJ_EXPECT(pair.client->alpn() == "argotunnel");
  }
  {
    auto config = clientConfig();
    config.useSystemTrust = true;   // both sources
    auto pair = env.connect(kj::mv(config));
    KJ_EXPECT(pair.client->alpn() == "argotunnel");
  }
  {
    auto config = clientConfig();
    config.caFile = nullptr;
    KJ_EXPECT_THROW_MESSAGE("no trust roots",
        env.wait(env.client->dial(env.server->localAddress(), kj::mv(config))));
  }
  {
    auto config = clientConfig();
    config.caFile = testdata("other-ca.pem");
    config.verifyCertificate = false;
    auto pair = env.connect(kj::mv(config));
    KJ_EXPECT(pair.client->alpn() == "argotunnel");
  }
}

KJ_TEST("listen() refuses a configuration without ALPN or certificate") {
  auto io = kj::setupAsyncIo();
  {
    auto endpoint = newEndpoint(io.unixEventPort, loopback());
    auto config = serverConfig();
    config.alpn.clear();
    KJ_EXPECT_THROW_MESSAGE("ALPN", endpoint->listen(kj::mv(config)));
  }
  {
    auto endpoint = newEndpoint(io.unixEventPort, loopback());
    auto config = serverConfig();
    config.keyFile = nullptr;
    KJ_EXPECT_THROW_MESSAGE("needs keyFile", endpoint->listen(kj::mv(config)));
  }
  {
    auto endpoint = newEndpoint(io.unixEventPort, loopback());
    auto config = serverConfig();
    config.certFile = testdata("no-such-file.pem");
    KJ_EXPECT_THROW_MESSAGE("cannot load certificate", endpoint->listen(kj::mv(config)));
  }
}

KJ_TEST("IPv6 loopback") {
  auto io = kj::setupAsyncIo();
  auto v6 = KJ_ASSERT_NONNULL(SocketAddress::parse("[::1]:0"));
  auto server = newEndpoint(io.unixEventPort, v6);
  server->listen(serverConfig());
  auto client = newEndpoint(io.unixEventPort, v6);
  KJ_EXPECT(server->localAddress().isIpv6());
  auto accepted = server->accept();
  auto timeout = [&](auto promise) {
    return io.provider->getTimer().timeoutAfter(10 * kj::SECONDS, kj::mv(promise))
        .wait(io.waitScope);
  };
  auto conn = timeout(client->dial(server->localAddress(), clientConfig()));
  auto serverConn = timeout(kj::mv(accepted));
  KJ_EXPECT(serverConn->remoteAddress() == client->localAddress());
  Echoer echo(*serverConn);
  KJ_EXPECT(timeout(roundTrip(*conn, kj::str("over v6"))) == "over v6");
}

KJ_TEST("server with only P-256 (HelloRetryRequest from an X25519-first client)") {
  Env env;
  auto server2 = newEndpoint(env.io.unixEventPort, loopback());
  auto config = serverConfig();
  config.tlsPriority = kj::str("NORMAL:-VERS-ALL:+VERS-TLS1.3:-CIPHER-ALL:+AES-128-GCM:"
                               "-GROUP-ALL:+GROUP-SECP256R1:%DISABLE_TLS13_COMPAT_MODE");
  server2->listen(kj::mv(config));
  auto client = clientConfig();
  client.tlsPriority = kj::str("NORMAL:-VERS-ALL:+VERS-TLS1.3:-CIPHER-ALL:+AES-128-GCM:"
                               "-GROUP-ALL:+GROUP-X25519:+GROUP-SECP256R1:"
                               "%DISABLE_TLS13_COMPAT_MODE");
  auto accepted = server2->accept();
  auto conn = env.wait(env.client->dial(server2->localAddress(), kj::mv(client)));
  auto serverConn = env.wait(kj::mv(accepted));
  KJ_EXPECT(conn->alpn() == "argotunnel");

  // And a P-256-only client (cloudflared 2023.7).
  auto p256 = clientConfig();
  p256.tlsPriority = kj::str("NORMAL:-VERS-ALL:+VERS-TLS1.3:-CIPHER-ALL:+AES-128-GCM:"
                             "-GROUP-ALL:+GROUP-SECP256R1:%DISABLE_TLS13_COMPAT_MODE");
  auto pair = env.connect(kj::mv(p256));
  KJ_EXPECT(pair.client->alpn() == "argotunnel");
}

KJ_TEST("unknown CA: clear TLS error") {
  Env env;
  auto config = clientConfig();
  config.caFile = testdata("other-ca.pem");
  auto accepted = env.server->accept();
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
    env.wait(env.client->dial(env.server->localAddress(), kj::mv(config)));
  })) {
    KJ_EXPECT(e->getType() == kj::Exception::Type::FAILED, *e);
    KJ_EXPECT(classifyException(*e) == CloseKind::TLS_LOCAL_FAILURE, *e);
    KJ_EXPECT(contains(e->getDescription(), "not signed by a trusted CA"), *e);
  } else {
    KJ_FAIL_EXPECT("dial with an unknown CA succeeded");
  }
  KJ_EXPECT(!accepted.poll(env.io.waitScope));
}

KJ_TEST("trust roots: the system store is parsed only for a chain the given roots can't verify") {
  Env env;
  auto before = _::ClientCredentials::systemStoreLoads();
  {
    auto config = clientConfig();          // caFile: the CA that signed the server
    config.useSystemTrust = true;
    auto pair = env.connect(kj::mv(config));
    KJ_EXPECT(pair.client->alpn() == "argotunnel");
  }
  KJ_EXPECT(_::ClientCredentials::systemStoreLoads() == before);
  {
    auto config = clientConfig();
    config.caFile = testdata("other-ca.pem");
    config.useSystemTrust = true;          // consulted, and it does not know the test CA either
    KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
      env.wait(env.client->dial(env.server->localAddress(), kj::mv(config)));
    })) {
      KJ_EXPECT(classifyException(*e) == CloseKind::TLS_LOCAL_FAILURE, *e);
      KJ_EXPECT(contains(e->getDescription(), "not signed by a trusted CA"), *e);
    } else {
      KJ_FAIL_EXPECT("dial with an unknown CA succeeded");
    }
  }
  KJ_EXPECT(_::ClientCredentials::systemStoreLoads() == before + 1);
  {
    auto config = clientConfig();
    config.useSystemTrust = true;
    config.serverName = kj::str("other.example.com");   // the name is checked on this path too
    KJ_EXPECT_THROW_MESSAGE("not valid for the name 'other.example.com'",
        env.wait(env.client->dial(env.server->localAddress(), kj::mv(config))));
  }
}

KJ_TEST("trust roots: only the system store's certificates that can sign the chain are parsed") {
  // A store of many unrelated CAs plus the one that signed the server: the dial verifies through
  // it (the filtered load keeps the signer), and the same store without it still fails.
  Env env;
  auto fs = kj::newDiskFilesystem();
  auto& root = fs->getRoot();
  auto read = [&](kj::StringPtr path) {
    return root.openFile(fs->getCurrentPath().evalNative(path))->readAllText();
  };
  kj::String others = kj::str(read(testdata("other-ca.pem")));
  KJ_IF_MAYBE(store, root.tryOpenFile(kj::Path::parse("etc/ssl/certs/ca-certificates.crt"))) {
    others = kj::str((*store)->readAllText(), "\n", others);
  }
  auto dir = kj::str("/tmp/cfqt-quic-test-", getpid());
  KJ_SYSCALL(mkdir(dir.cStr(), 0700));
  KJ_DEFER({
    auto command = kj::str("rm -rf '", dir, "'");
    if (system(command.cStr()) != 0) {}
  });
  auto withSigner = kj::str(dir, "/with-signer.pem");
  auto withoutSigner = kj::str(dir, "/without-signer.pem");
  root.openFile(kj::Path::parse(withSigner.slice(1)), kj::WriteMode::CREATE)
      ->writeAll(kj::str(others, "\n", read(testdata("ca.pem"))));
  root.openFile(kj::Path::parse(withoutSigner.slice(1)), kj::WriteMode::CREATE)->writeAll(others);
  KJ_DEFER(_::ClientCredentials::setSystemBundleForTests(nullptr));

  auto configVia = [&](kj::StringPtr bundle) {
    _::ClientCredentials::setSystemBundleForTests(kj::str(bundle));
    auto config = clientConfig();
    config.caFile = testdata("other-ca.pem");   // the "embedded" roots do not know the signer
    config.useSystemTrust = true;
    return config;
  };
  {
    auto pair = env.connect(configVia(withSigner));
    KJ_EXPECT(pair.client->alpn() == "argotunnel");
  }
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
    env.wait(env.client->dial(env.server->localAddress(), configVia(withoutSigner)));
  })) {
    KJ_EXPECT(contains(e->getDescription(), "not signed by a trusted CA"), *e);
  } else {
    KJ_FAIL_EXPECT("verified without the signer in the store");
  }
}

KJ_TEST("certificate name mismatch: clear TLS error") {
  Env env;
  auto config = clientConfig();
  config.serverName = kj::str("other.example.com");
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
    env.wait(env.client->dial(env.server->localAddress(), kj::mv(config)));
  })) {
    KJ_EXPECT(e->getType() == kj::Exception::Type::FAILED, *e);
    KJ_EXPECT(classifyException(*e) == CloseKind::TLS_LOCAL_FAILURE, *e);
    KJ_EXPECT(contains(e->getDescription(), "not valid for the name 'other.example.com'"), *e);
  } else {
    KJ_FAIL_EXPECT("dial with a wrong name succeeded");
  }
}

KJ_TEST("ALPN mismatch: clear TLS error") {
  Env env;
  auto config = clientConfig();
  config.alpn = kj::str("h3");
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
    env.wait(env.client->dial(env.server->localAddress(), kj::mv(config)));
  })) {
    KJ_EXPECT(e->getType() == kj::Exception::Type::FAILED, *e);
    KJ_EXPECT(classifyException(*e) == CloseKind::TLS_PEER_ALERT, *e);
    KJ_EXPECT(contains(e->getDescription(), "120"), *e);
    KJ_EXPECT(contains(e->getDescription(), "ALPN"), *e);
  } else {
    KJ_FAIL_EXPECT("dial with a wrong ALPN succeeded");
  }
}

KJ_TEST("handshake timeout against a silent UDP socket") {
  Env env;
  int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  KJ_ASSERT(fd >= 0);
  kj::AutoCloseFd silent(fd);
  auto addr = loopback();
  KJ_ASSERT(bind(fd, reinterpret_cast<const sockaddr*>(addr.sockaddr()), addr.length()) == 0);
  sockaddr_storage bound;
  socklen_t len = sizeof(bound);
  KJ_ASSERT(getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &len) == 0);
  auto target = SocketAddress::fromSockaddr(&bound, len);

  auto transport = fastTransport();
  transport.handshakeTimeout = 400 * kj::MILLISECONDS;
  auto config = clientConfig(transport);
  auto start = env.timer.now();
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
    env.wait(env.client->dial(target, kj::mv(config)), 5 * kj::SECONDS);
  })) {
    auto elapsed = env.timer.now() - start;
    KJ_EXPECT(e->getType() == kj::Exception::Type::OVERLOADED, *e);
    KJ_EXPECT(classifyException(*e) == CloseKind::HANDSHAKE_TIMEOUT, *e);
    KJ_EXPECT(contains(e->getDescription(), "handshake timeout"), *e);
    KJ_EXPECT(elapsed >= 350 * kj::MILLISECONDS && elapsed < 2 * kj::SECONDS, elapsed);
  } else {
    KJ_FAIL_EXPECT("handshake with a silent socket succeeded");
  }
}

KJ_TEST("a send this host refuses ends the dial at once, with its errno") {
  // faultSendErrno stands in for a host firewall (sendmsg fails with EPERM): the dial must fail
  // with SEND_REFUSED at once, not after the 10 s handshake timeout (the wait allows 5 s).
  for (int error: {EPERM, ENETUNREACH}) {
    Env env;
    auto transport = fastTransport();
    transport.handshakeTimeout = 10 * kj::SECONDS;
    transport.faultSendErrno = error;
    auto accepted = env.server->accept();
    KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
      env.wait(env.client->dial(env.server->localAddress(), clientConfig(transport)),
               5 * kj::SECONDS);
    })) {
      KJ_EXPECT(classifyException(*e) == CloseKind::SEND_REFUSED, *e);
      KJ_EXPECT(e->getType() == kj::Exception::Type::DISCONNECTED, *e);
      KJ_EXPECT(contains(e->getDescription(), strerror(error)), *e);
      KJ_EXPECT(contains(e->getDescription(), errnoName(error)), *e);
    } else {
      KJ_FAIL_EXPECT("dial succeeded although every send failed");
    }
    auto stats = env.client->stats();
    KJ_EXPECT(stats.sendsRefused >= 1, stats.sendsRefused);
    KJ_EXPECT(stats.sendRefusedErrno == error, stats.sendRefusedErrno);
    KJ_EXPECT(stats.datagramsSent == 0, stats.datagramsSent);
    KJ_EXPECT(env.server->stats().datagramsReceived == 0);
  }
  KJ_EXPECT(isSendRefusal(EPERM) && isSendRefusal(EACCES) && isSendRefusal(ENETUNREACH) &&
            isSendRefusal(EHOSTUNREACH));
  KJ_EXPECT(!isSendRefusal(EAGAIN) && !isSendRefusal(ENOBUFS) && !isSendRefusal(EMSGSIZE) &&
            !isSendRefusal(ECONNREFUSED) && !isSendRefusal(0));
}

KJ_TEST("keep-alive: the connection survives three idle timeouts of silence") {
  auto transport = fastTransport();
  transport.maxIdleTimeout = 300 * kj::MILLISECONDS;
  transport.keepAlivePeriod = 100 * kj::MILLISECONDS;
  Env env(transport);
  auto pair = env.connect(clientConfig(transport));
  auto before = pair.client->stats().packetsSent;
  env.timer.afterDelay(1 * kj::SECONDS).wait(env.io.waitScope);
  // Only keep-alive PINGs (and their ACKs) went out: several per idle timeout.
  KJ_EXPECT(pair.client->stats().packetsSent >= before + 3, before,
            pair.client->stats().packetsSent);
  KJ_EXPECT(pair.client->closeInfo() == nullptr);
  KJ_EXPECT(pair.server->closeInfo() == nullptr);
  Echoer echo(*pair.server);
  KJ_EXPECT(env.wait(roundTrip(*pair.client, kj::str("still there?"))) == "still there?");
}

KJ_TEST("no keep-alive: both sides see an idle timeout") {
  auto transport = fastTransport();
  transport.maxIdleTimeout = 300 * kj::MILLISECONDS;
  transport.keepAlivePeriod = 0 * kj::SECONDS;
  Env env(transport);
  auto pair = env.connect(clientConfig(transport));
  auto start = env.timer.now();
  auto c = env.wait(pair.client->onClosed(), 5 * kj::SECONDS);
  auto s = env.wait(pair.server->onClosed(), 5 * kj::SECONDS);
  KJ_EXPECT(env.timer.now() - start >= 250 * kj::MILLISECONDS);
  KJ_EXPECT(c.kind == CloseKind::IDLE_TIMEOUT, c.kind);
  KJ_EXPECT(s.kind == CloseKind::IDLE_TIMEOUT, s.kind);
  KJ_EXPECT(c.toException().getType() == kj::Exception::Type::DISCONNECTED);
  KJ_EXPECT(contains(c.description, "idle timeout"), c.description);
}

KJ_TEST("a vanished peer (socket closed, no CONNECTION_CLOSE) is detected by the idle timeout") {
  auto transport = fastTransport();
  transport.maxIdleTimeout = 300 * kj::MILLISECONDS;
  transport.keepAlivePeriod = 100 * kj::MILLISECONDS;
  Env env(transport);
  auto pair = env.connect(clientConfig(transport));
  auto serverClosed = pair.server->onClosed();
  auto clientClosed = pair.client->onClosed();
  auto start = env.timer.now();
  env.client = nullptr;   // the socket goes away without a word
  auto c = env.wait(kj::mv(clientClosed));
  KJ_EXPECT(c.kind == CloseKind::ENDPOINT_GONE, c.kind);
  auto s = env.wait(kj::mv(serverClosed), 5 * kj::SECONDS);
  auto elapsed = env.timer.now() - start;
  KJ_EXPECT(s.kind == CloseKind::IDLE_TIMEOUT, s.kind);
  KJ_EXPECT(elapsed >= 250 * kj::MILLISECONDS && elapsed < 2 * kj::SECONDS, elapsed);
  KJ_EXPECT(contains(s.description, "idle timeout"), s.description);
  KJ_EXPECT(s.toException().getType() == kj::Exception::Type::DISCONNECTED);
}

KJ_TEST("goSilent(): the peer hits its idle timeout") {
  auto transport = fastTransport();
  transport.maxIdleTimeout = 300 * kj::MILLISECONDS;
  transport.keepAlivePeriod = 100 * kj::MILLISECONDS;
  Env env(transport);
  auto pair = env.connect(clientConfig(transport));
  pair.server->goSilent();
  auto c = env.wait(pair.client->onClosed(), 5 * kj::SECONDS);
  KJ_EXPECT(c.kind == CloseKind::IDLE_TIMEOUT, c.kind);
  auto s = env.wait(pair.server->onClosed(), 5 * kj::SECONDS);
  KJ_EXPECT(s.kind == CloseKind::IDLE_TIMEOUT, s.kind);
}

KJ_TEST("a server that lost the connection answers with a stateless reset") {
  Env env;
  auto pair = env.connect();
  pair.server->goSilent();      // no CONNECTION_CLOSE when dropped below
  pair.server = nullptr;        // the server endpoint forgets the connection IDs
  auto closed = pair.client->onClosed();
  auto stream = env.wait(pair.client->openStream());
  kj::byte payload[200] = {};
  env.wait(stream->write(payload, sizeof(payload)));   // a packet big enough to be answered
  auto info = env.wait(kj::mv(closed), 5 * kj::SECONDS);
  KJ_EXPECT(info.kind == CloseKind::STATELESS_RESET, info.kind, info.description);
  KJ_EXPECT(env.server->stats().statelessResetsSent >= 1);
}

KJ_TEST("stream reset and STOP_SENDING surface as DISCONNECTED") {
  Env env;
  auto pair = env.connect();
  auto stream = env.wait(pair.client->openStream());
  env.wait(stream->write("abc", 3));
  auto peer = env.wait(pair.server->acceptStream());
  char buf[3];
  KJ_EXPECT(env.wait(peer->tryRead(buf, 3, 3)) == 3);
  stream->reset(77);
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() { env.wait(peer->tryRead(buf, 1, 3)); })) {
    KJ_EXPECT(e->getType() == kj::Exception::Type::DISCONNECTED, *e);
    KJ_EXPECT(contains(e->getDescription(), "77"), *e);
  } else {
    KJ_FAIL_EXPECT("read after reset succeeded");
  }
  KJ_EXPECT_THROW(DISCONNECTED, env.wait(stream->write("x", 1)));

  // STOP_SENDING: the writer's next writes fail.
  auto s2 = env.wait(pair.client->openStream());
  env.wait(s2->write("abc", 3));
  auto p2 = env.wait(pair.server->acceptStream());
  auto disconnected = s2->whenWriteDisconnected();
  p2->stopSending(9);
  // ngtcp2 0.12 has no callback for a received STOP_SENDING; the layer notices it anyway, without
  // a further write.
  env.wait(kj::mv(disconnected), 2 * kj::SECONDS);
  KJ_EXPECT_THROW_MESSAGE("STOP_SENDING", env.wait(s2->write("more", 4)));
}

KJ_TEST("STOP_SENDING fails a writer stalled on flow control or unacknowledged data") {
  auto transport = fastTransport();
  transport.initialStreamWindow = 64 * 1024;
  transport.maxStreamWindow = 64 * 1024;
  transport.streamSendBuffer = 128 * 1024;
  Env env(transport);
  auto pair = env.connect(clientConfig(transport));
  auto out = env.wait(pair.client->openStream());
  auto writing = writePattern(*out, 16 * MiB, 3).eagerlyEvaluate(nullptr);
  auto in = env.wait(pair.server->acceptStream());
  // The reader never reads: the writer fills the window and its send buffer, then waits.
  env.timer.afterDelay(100 * kj::MILLISECONDS).wait(env.io.waitScope);
  KJ_EXPECT(!writing.poll(env.io.waitScope), "writer was not halted");
  in->stopSending(5);   // the server keeps its own write side open: the stream stays open
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() { env.wait(kj::mv(writing), 2 * kj::SECONDS); })) {
    KJ_EXPECT(e->getType() == kj::Exception::Type::DISCONNECTED, *e);
    KJ_EXPECT(contains(e->getDescription(), "STOP_SENDING"), *e);
  } else {
    KJ_FAIL_EXPECT("write to a stream the peer stopped reading succeeded");
  }
  // The connection is unharmed.
  Echoer echo(*pair.server);
  KJ_EXPECT(env.wait(roundTrip(*pair.client, kj::str("after"))) == "after");
}

KJ_TEST("a pending read returns everything its receive batch brought, not the first packet") {
  Env env;
  auto pair = env.connect();
  auto stream = env.wait(pair.client->openStream());
  env.wait(stream->write("x", 1));
  auto peer = env.wait(pair.server->acceptStream());
  char one;
  KJ_ASSERT(env.wait(peer->tryRead(&one, 1, 1)) == 1);

  // 8 packets' worth, within the initial congestion window: they leave in one flush, while the
  // server's read is pending, and reach its socket before the loop polls it again.
  constexpr size_t SIZE = 8 * 1200;
  auto data = kj::heapArray<kj::byte>(SIZE);
  fillPattern(data.begin(), 0, SIZE, 5);
  auto buffer = kj::heapArray<kj::byte>(64 * 1024);
  auto read = peer->tryRead(buffer.begin(), 1, buffer.size());
  env.wait(stream->write(data.begin(), SIZE));
  size_t n = env.wait(kj::mv(read));
  KJ_EXPECT(n == SIZE, n, "the read completed before the batch's later packets were in");
  KJ_EXPECT(memcmp(buffer.begin(), data.begin(), n) == 0);
}

KJ_TEST("streamSendQuantum: streams take turns of that many bytes") {
  // Two client streams with 200 KiB each, queued in the same turn; the server reads nothing until
  // the second stream shows up. With a quantum larger than both, all of the first stream has
  // arrived by then; with a quantum of one packet they interleave from the start.
  for (uint64_t quantum: {uint64_t(1) << 20, uint64_t(0)}) {
    auto transport = fastTransport();
    transport.streamSendQuantum = quantum;
    Env env;
    auto pair = env.connect(clientConfig(transport));
    constexpr size_t SIZE = 200 * 1024;
    auto data = kj::heapArray<kj::byte>(SIZE);
    fillPattern(data.begin(), 0, SIZE, 6);
    auto s1 = env.wait(pair.client->openStream());
    auto s2 = env.wait(pair.client->openStream());
    auto w1 = s1->write(data.begin(), SIZE).then([&]() { s1->shutdownWrite(); })
        .eagerlyEvaluate(nullptr);
    auto w2 = s2->write(data.begin(), SIZE).then([&]() { s2->shutdownWrite(); })
        .eagerlyEvaluate(nullptr);
    auto p1 = env.wait(pair.server->acceptStream());
    auto p2 = env.wait(pair.server->acceptStream());
    // The receive batch that opened the second stream is fully processed: what the first stream
    // has buffered now is what arrived before the second stream's first bytes.
    auto buffer = kj::heapArray<kj::byte>(SIZE);
    auto ready = p1->tryRead(buffer.begin(), 0, SIZE);
    KJ_ASSERT(ready.poll(env.io.waitScope));
    size_t before = ready.wait(env.io.waitScope);
    if (quantum > SIZE) {
      KJ_EXPECT(before == SIZE, quantum, before);
    } else {
      KJ_EXPECT(before < SIZE / 2, quantum, before);
    }
    size_t rest = env.wait(p1->tryRead(buffer.begin() + before, SIZE - before, SIZE - before));
    KJ_EXPECT(memcmp(buffer.begin(), data.begin(), SIZE) == 0);
    env.wait(kj::mv(w1));
    env.wait(kj::mv(w2));
    KJ_EXPECT(before + rest == SIZE && env.wait(readPattern(*p1, 6)) == 0);
    KJ_EXPECT(env.wait(readPattern(*p2, 6)) == SIZE);
  }
}

KJ_TEST("serial exchanges: one packet each way; ACKs and stream credit ride with data") {
  // The server (the edge's role) opens a stream per request; the client answers 2 ms later (an
  // origin's round trip). ngtcp2 0.12 alone acknowledges after RTT/8 (microseconds here), and
  // the credit of each closed stream went out at once: 2-3 packets from the client per
  // exchange. With TransportConfig::ackDelay and batched stream credit, both ride with the
  // answer.
  auto transport = fastTransport();
  transport.ackDelay = 20 * kj::MILLISECONDS;
  auto clientTransport = transport;
  clientTransport.maxIncomingBidiStreams = 64;   // credit owed at once: 4 (1/16)
  Env env(transport);
  auto pair = env.connect(clientConfig(clientTransport));

  struct SlowEchoer: private kj::TaskSet::ErrorHandler {
    Env& env;
    Connection& conn;
    kj::TaskSet tasks{*this};
    SlowEchoer(Env& env, Connection& conn): env(env), conn(conn) { tasks.add(loop()); }
    kj::Promise<void> loop() {
      return conn.acceptStream().then([this](kj::Own<Stream> stream) {
        auto& ref = *stream;
        tasks.add(ref.readAllBytes(1024).then([this, &ref](kj::Array<kj::byte> data) {
          return env.timer.afterDelay(2 * kj::MILLISECONDS).then(
              [&ref, data = kj::mv(data)]() mutable {
            auto written = ref.write(data.begin(), data.size());
            return written.attach(kj::mv(data)).then([&ref]() { ref.shutdownWrite(); });
          });
        }).attach(kj::mv(stream)));
        return loop();
      });
    }
    void taskFailed(kj::Exception&& e) override {
      if (e.getType() != kj::Exception::Type::DISCONNECTED) KJ_LOG(ERROR, "echo failed", e);
    }
  };
  SlowEchoer echo(env, *pair.client);
  for (int i = 0; i < 5; i++) env.wait(roundTrip(*pair.server, kj::str("warm-up")));
  auto client0 = pair.client->stats().packetsSent;
  auto server0 = pair.server->stats().packetsSent;
  constexpr uint64_t EXCHANGES = 100;
  for (uint64_t i = 0; i < EXCHANGES; i++) {
    auto text = kj::str("request ", i);
    KJ_EXPECT(env.wait(roundTrip(*pair.server, kj::heapString(text))) == text);
  }
  auto client = pair.client->stats().packetsSent - client0;
  auto server = pair.server->stats().packetsSent - server0;
  // 1 each way when nothing is late; a margin for a loaded machine.
  KJ_EXPECT(client <= EXCHANGES * 3 / 2, client, server);
  KJ_EXPECT(server <= EXCHANGES * 3 / 2, client, server);
  // More streams than the client's limit went through: the credit was given back.
  KJ_EXPECT(pair.server->stats().streamsOpenedLocal == EXCHANGES + 5);
}

KJ_TEST("10 000 server-opened echo streams at concurrency 100") {
  auto clientTransport = fastTransport();
  clientTransport.maxIncomingBidiStreams = 100;
  Env env;
  auto pair = env.connect(clientConfig(clientTransport));
  Echoer echo(*pair.client);

  struct Runner: private kj::TaskSet::ErrorHandler {
    Connection& conn;
    uint32_t next = 0;
    uint32_t total;
    uint32_t verified = 0;
    kj::TaskSet tasks{*this};
    Runner(Connection& conn, uint32_t total): conn(conn), total(total) {}
    kj::Promise<void> worker() {
      if (next == total) return kj::READY_NOW;
      uint32_t i = next++;
      auto text = kj::str("stream ", i, " ", kj::repeat('x', 90 - kj::str(i).size()));
      return roundTrip(conn, kj::heapString(text))
          .then([this, text = kj::mv(text)](kj::String echoed) {
        KJ_ASSERT(echoed == text);
        ++verified;
        return worker();
      });
    }
    void taskFailed(kj::Exception&& e) override { KJ_FAIL_EXPECT("stream failed", e); }
  };
  Runner runner(*pair.server, ECHO_STREAMS);
  for (int i = 0; i < 100; i++) runner.tasks.add(runner.worker());
  env.wait(runner.tasks.onEmpty(), 60 * kj::SECONDS);
  KJ_EXPECT(runner.verified == ECHO_STREAMS, runner.verified);
  KJ_EXPECT(echo.streams == ECHO_STREAMS);
  KJ_EXPECT(pair.server->stats().streamsOpenedLocal == ECHO_STREAMS);
  env.timer.afterDelay(50 * kj::MILLISECONDS).wait(env.io.waitScope);   // last ACKs
  KJ_EXPECT(pair.server->stats().streamsActive == 0, pair.server->stats().streamsActive);
  KJ_EXPECT(pair.client->stats().streamsActive == 0, pair.client->stats().streamsActive);
  KJ_EXPECT(pair.client->stats().recvBufferedBytes == 0);
  KJ_EXPECT(pair.server->stats().sendBufferedBytes == 0);
}

KJ_TEST("integrity: 64 MiB each way on one stream, and across 8 streams") {
  Env env;
  auto pair = env.connect();
  {
    auto stream = env.wait(pair.client->openStream());
    env.wait(stream->write("!", 1));    // the server learns of the stream with its first byte
    auto peer = env.wait(pair.server->acceptStream());
    char first;
    env.wait(peer->read(&first, 1));
    auto promises = kj::heapArrayBuilder<kj::Promise<void>>(4);
    promises.add(writePattern(*stream, BIG, 1));
    promises.add(writePattern(*peer, BIG, 2));
    promises.add(readPattern(*peer, 1).then([](uint64_t n) { KJ_EXPECT(n == BIG, n); }));
    promises.add(readPattern(*stream, 2).then([](uint64_t n) { KJ_EXPECT(n == BIG, n); }));
    env.wait(kj::joinPromises(promises.finish()), 120 * kj::SECONDS);
  }
  {
    constexpr int N = 8;
    kj::Vector<kj::Own<Stream>> mine, theirs;
    for (int i = 0; i < N; i++) {
      mine.add(env.wait(pair.client->openStream()));
      env.wait(mine.back()->write("!", 1));
      theirs.add(env.wait(pair.server->acceptStream()));
      char first;
      env.wait(theirs.back()->read(&first, 1));
    }
    auto promises = kj::heapArrayBuilder<kj::Promise<void>>(4 * N);
    for (int i = 0; i < N; i++) {
      promises.add(writePattern(*mine[i], BIG / N, 100 + i));
      promises.add(writePattern(*theirs[i], BIG / N, 200 + i));
      promises.add(readPattern(*theirs[i], 100 + i).then([](uint64_t n) {
        KJ_EXPECT(n == BIG / N, n);
      }));
      promises.add(readPattern(*mine[i], 200 + i).then([](uint64_t n) {
        KJ_EXPECT(n == BIG / N, n);
      }));
    }
    env.wait(kj::joinPromises(promises.finish()), 120 * kj::SECONDS);
  }
  auto stats = env.server->stats();
  KJ_LOG(INFO, "server endpoint", stats.gso, stats.gro, stats.datagramsSent, stats.sendBlocked,
         stats.receiveBufferBytes, stats.sendBufferBytes);
  KJ_EXPECT(stats.datagramsSent > BIG / 1500);
  env.timer.afterDelay(50 * kj::MILLISECONDS).wait(env.io.waitScope);   // last ACKs
  KJ_EXPECT(pair.client->stats().sendBufferedBytes == 0, pair.client->stats().sendBufferedBytes);
  KJ_EXPECT(pair.server->stats().recvBufferedBytes == 0);
}

KJ_TEST("back-pressure: a reader that stops halts the writer within the windows") {
  auto transport = fastTransport();
  transport.initialStreamWindow = 256 * 1024;
  transport.initialConnectionWindow = 512 * 1024;
  transport.maxStreamWindow = 1 * MiB;
  transport.maxConnectionWindow = 2 * MiB;
  transport.streamSendBuffer = 256 * 1024;
  Env env(transport);
  auto pair = env.connect(clientConfig(transport));

  constexpr uint64_t TOTAL = 16 * MiB;
  auto out = env.wait(pair.server->openStream());
  auto writing = writePattern(*out, TOTAL, 7).eagerlyEvaluate(nullptr);
  auto in = env.wait(pair.client->acceptStream());

  // Nobody reads: let the network settle, then the writer must be stuck.
  env.timer.afterDelay(300 * kj::MILLISECONDS).wait(env.io.waitScope);
  KJ_EXPECT(!writing.poll(env.io.waitScope), "writer was not halted");
  auto readerBuffered = in->bufferedReadBytes();
  auto writerBuffered = out->bufferedWriteBytes();
  KJ_EXPECT(readerBuffered > 0);
  KJ_EXPECT(readerBuffered <= transport.initialStreamWindow, readerBuffered);
  KJ_EXPECT(writerBuffered <= transport.streamSendBuffer, writerBuffered);
  KJ_EXPECT(pair.client->stats().recvBufferedBytes <= transport.initialConnectionWindow);
  KJ_EXPECT(pair.server->stats().sendBufferedBytes <= transport.streamSendBuffer);

  // Withheld credit: reading does not reopen the window.
  in->setCreditWithheld(true);
  kj::byte scratch[64 * 1024];
  size_t consumed = env.wait(in->tryRead(scratch, sizeof(scratch), sizeof(scratch)));
  env.timer.afterDelay(100 * kj::MILLISECONDS).wait(env.io.waitScope);
  KJ_EXPECT(in->bufferedReadBytes() + consumed <= transport.initialStreamWindow);
  in->setCreditWithheld(false);

  // Reading resumes the writer; every byte arrives intact (the first `consumed` were read).
  auto rest = kj::heap<ReadState>();
  rest->done = consumed;
  fillPattern(rest->expected.begin(), 0, consumed, 7);
  KJ_EXPECT(memcmp(rest->expected.begin(), scratch, consumed) == 0);
  auto n = env.wait(readPattern(*in, 7, kj::mv(rest)), 60 * kj::SECONDS);
  KJ_EXPECT(n == TOTAL, n);
  env.wait(kj::mv(writing));
}

KJ_TEST("24 connections to one server endpoint at once") {
  Env env;
  constexpr int N = 24;
  kj::Vector<kj::Own<Endpoint>> clients;
  kj::Vector<kj::Promise<kj::Own<Connection>>> dials;
  for (int i = 0; i < N; i++) {
    // Three connections per client socket, eight sockets.
    if (i % 3 == 0) clients.add(newEndpoint(env.io.unixEventPort, loopback()));
    dials.add(clients.back()->dial(env.server->localAddress(), clientConfig()));
  }
  kj::Vector<kj::Own<Connection>> serverConns;
  kj::Vector<kj::Own<Echoer>> echoers;
  for (int i = 0; i < N; i++) {
    serverConns.add(env.wait(env.server->accept()));
    echoers.add(kj::heap<Echoer>(*serverConns.back()));
  }
  kj::Vector<kj::Own<Connection>> conns;
  for (auto& d: dials) conns.add(env.wait(kj::mv(d)));
  auto promises = kj::heapArrayBuilder<kj::Promise<void>>(N);
  for (int i = 0; i < N; i++) {
    auto text = kj::str("connection ", i);
    promises.add(roundTrip(*conns[i], kj::heapString(text))
        .then([text = kj::mv(text)](kj::String echoed) { KJ_EXPECT(echoed == text); }));
  }
  env.wait(kj::joinPromises(promises.finish()));
  for (auto& e: echoers) KJ_EXPECT(e->streams == 1);
  KJ_EXPECT(env.server->stats().handshakesFailed == 0);
}

// ---- datagrams: this layer advertises them but drops (and counts) what it receives.

kj::Exception sendDatagramFails(Connection& conn, kj::ArrayPtr<const kj::byte> payload) {
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() { conn.sendDatagram(payload); })) {
    return kj::mv(*e);
  }
  KJ_FAIL_ASSERT("sendDatagram() did not throw", payload.size());
}

KJ_TEST("datagrams: received ones are dropped and counted, the connection stays healthy") {
  Env env;
  auto pair = env.connect();
  Echoer serverEcho(*pair.server);
  size_t limit = pair.client->maxDatagramPayload();
  // Peer max_datagram_frame_size 1350 (default) minus framing, within one packet of the path.
  KJ_EXPECT(limit >= 1100 && limit <= 1347, limit);
  KJ_EXPECT(pair.server->maxDatagramPayload() > 0);
  auto payload = kj::heapArray<kj::byte>(limit + 1);
  for (size_t i = 0; i < payload.size(); i++) payload[i] = kj::byte(i);

  // Too large: a FAILED exception, nothing queued, nothing broken.
  auto tooLarge = sendDatagramFails(*pair.client, payload);
  KJ_EXPECT(tooLarge.getType() == kj::Exception::Type::FAILED);
  KJ_EXPECT(contains(tooLarge.getDescription(), "larger than"), tooLarge.getDescription());

  // 300 in one turn: the first 256 are queued (empty, small, and largest payloads), the rest
  // are refused at once (the queue is bounded), and only the queued ones leave.
  constexpr uint32_t SENT = 300, QUEUED = 256;
  uint32_t accepted = 0;
  for (uint32_t i = 0; i < SENT; i++) {
    size_t len = i % 16 == 0 ? limit : (i * 37) % 200;
    if (pair.client->sendDatagram(payload.slice(0, len))) ++accepted;
  }
  KJ_EXPECT(accepted == QUEUED, accepted);
  KJ_EXPECT(pair.client->stats().datagramsSendDropped == SENT - QUEUED);

  // Queued datagrams go out before stream data, and loopback keeps packet order: once the echo
  // is back, the server has processed every datagram.
  KJ_EXPECT(env.wait(roundTrip(*pair.client, kj::str("after the datagrams"))) ==
            "after the datagrams");
  auto clientStats = pair.client->stats();
  KJ_EXPECT(clientStats.datagramsSent == QUEUED, clientStats.datagramsSent);
  auto serverStats = pair.server->stats();
  KJ_EXPECT(serverStats.datagramsDropped == QUEUED, serverStats.datagramsDropped);
  KJ_EXPECT(serverStats.datagramsSent == 0);
  // Nothing delivered or buffered: no stream but the echoed one, no bytes held.
  KJ_EXPECT(serverEcho.streams == 1, serverEcho.streams);
  KJ_EXPECT(serverStats.streamsOpenedRemote == 1, serverStats.streamsOpenedRemote);
  KJ_EXPECT(serverStats.recvBufferedBytes == 0, serverStats.recvBufferedBytes);
  KJ_EXPECT(pair.client->closeInfo() == nullptr && pair.server->closeInfo() == nullptr);

  // The server can send too (the client advertises datagrams as well); still healthy after.
  KJ_EXPECT(pair.server->sendDatagram(payload.slice(0, 100)));
  KJ_EXPECT(env.wait(roundTrip(*pair.client, kj::str("once more"))) == "once more");
  KJ_EXPECT(pair.client->stats().datagramsDropped == 1);
  KJ_EXPECT(serverEcho.streams == 2, serverEcho.streams);

  // After the close: the close exception.
  pair.client->close(0, "").wait(env.io.waitScope);
  KJ_EXPECT(pair.client->maxDatagramPayload() == 0);
  auto closed = sendDatagramFails(*pair.client, payload.slice(0, 1));
  KJ_EXPECT(classifyException(closed) == CloseKind::LOCAL_CLOSE, closed);
}

KJ_TEST("sendDatagram to a peer that advertised max_datagram_frame_size 0: clear error") {
  Env env;
  auto transport = fastTransport();
  transport.maxDatagramFrameSize = 0;
  auto pair = env.connect(clientConfig(transport));
  KJ_EXPECT(pair.server->maxDatagramPayload() == 0);
  kj::byte data[10] = {};
  auto e = sendDatagramFails(*pair.server, data);
  KJ_EXPECT(e.getType() == kj::Exception::Type::FAILED);
  KJ_EXPECT(contains(e.getDescription(), "did not advertise DATAGRAM support"),
            e.getDescription());
  KJ_EXPECT(classifyException(e) == nullptr);
  // The connection is unaffected.
  Echoer clientEcho(*pair.client);
  KJ_EXPECT(env.wait(roundTrip(*pair.server, kj::str("still open"))) == "still open");
  KJ_EXPECT(pair.server->stats().datagramsSent == 0);
  KJ_EXPECT(pair.client->stats().datagramsDropped == 0);
}

// ---- isolation: stalled streams never hold back the others

template <typename Func>
bool eventually(Env& env, Func&& condition, kj::Duration limit = 3 * kj::SECONDS) {
  return cfqt::testing::eventually(env.timer, env.io.waitScope, kj::fwd<Func>(condition), limit);
}

kj::Promise<kj::Own<Stream>> acceptId(Connection& conn, int64_t id,
                                      kj::Vector<kj::Own<Stream>>& others) {
  // Accepts streams until the one with `id`; the others are kept (unread) in `others`.
  return conn.acceptStream().then([&conn, id, &others](kj::Own<Stream> s)
                                  -> kj::Promise<kj::Own<Stream>> {
    if (s->id() == id) return kj::mv(s);
    others.add(kj::mv(s));
    return acceptId(conn, id, others);
  });
}

// Eight streams whose reader never reads, each filling its 64 KiB window: 512 KiB buffered at
// the receiver, four times its 128 KiB connection window. Returns whether a ninth, small stream
// then arrives in time.
bool smallStreamPassesStalledOnes(uint64_t recvCreditBudget) {
  auto transport = fastTransport();
  transport.initialStreamWindow = 64 * 1024;
  transport.maxStreamWindow = 64 * 1024;
  transport.initialConnectionWindow = 128 * 1024;
  transport.maxConnectionWindow = 128 * 1024;
  auto clientTransport = transport;
  clientTransport.recvCreditBudget = recvCreditBudget;
  Env env(transport);
  auto pair = env.connect(clientConfig(clientTransport));

  kj::Vector<kj::Own<Stream>> stalled;
  kj::Vector<kj::Promise<void>> writers;
  for (int i = 0; i < 8; i++) {
    stalled.add(env.wait(pair.server->openStream()));
    writers.add(writePattern(*stalled.back(), 1 * MiB, 100 + i).eagerlyEvaluate(nullptr));
  }
  // Let the stalled streams take the windows first (until the receiver holds what it admits).
  kj::Vector<kj::Own<Stream>> accepted;
  eventually(env, [&]() {
    return pair.client->stats().recvBufferedBytes >= 128 * 1024;
  });
  auto small = env.wait(pair.server->openStream());
  auto smallId = small->id();
  auto written = small->write("small response", 14).then([&]() { small->shutdownWrite(); })
      .eagerlyEvaluate(nullptr);
  auto received = acceptId(*pair.client, smallId, accepted)
      .then([](kj::Own<Stream> s) {
    auto& ref = *s;
    return ref.readAllText(1024).attach(kj::mv(s));
  });
  bool passed = false;
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
    KJ_EXPECT(env.wait(kj::mv(received), 1 * kj::SECONDS) == "small response");
    env.wait(kj::mv(written));
    passed = true;
  })) {
    KJ_EXPECT(e->getType() == kj::Exception::Type::OVERLOADED, *e);   // the timeout
  }
  if (passed) {
    // The stalled streams are bounded by their windows, not by the connection window.
    KJ_EXPECT(pair.client->stats().recvBufferedBytes <= 8 * 64 * 1024,
              pair.client->stats().recvBufferedBytes);
  }
  return passed;
}

KJ_TEST("receive: streams whose reader stalls do not hold the connection window") {
  KJ_EXPECT(smallStreamPassesStalledOnes(8 * MiB));
  // Control: with connection credit only on read, the stalled streams block the small one.
  KJ_EXPECT(!smallStreamPassesStalledOnes(0));
}

KJ_TEST("send budget: stalled streams are bounded and never delay a fresh stream") {
  constexpr int STALLED = 16;
  constexpr uint64_t EACH = SANITIZED ? 1 * MiB : 4 * MiB;
  auto clientTransport = fastTransport();
  clientTransport.initialStreamWindow = 64 * 1024;
  clientTransport.maxStreamWindow = 64 * 1024;
  auto serverTransport = fastTransport();
  serverTransport.streamSendBuffer = 64 * 1024;
  serverTransport.streamSendReserve = 16 * 1024;
  serverTransport.connectionSendHigh = 256 * 1024;
  serverTransport.connectionSendLow = 128 * 1024;
  Env env(serverTransport);
  auto pair = env.connect(clientConfig(clientTransport));

  kj::Vector<kj::Own<Stream>> outs;
  kj::Vector<kj::Promise<void>> writers;
  for (int i = 0; i < STALLED; i++) {
    outs.add(env.wait(pair.server->openStream()));
    writers.add(writePattern(*outs.back(), EACH, 200 + i).eagerlyEvaluate(nullptr));
  }
  // Nobody reads: the writers fill what the budget admits, then wait.
  KJ_EXPECT(eventually(env, [&]() { return pair.server->stats().sendOverBudget; }));
  uint64_t bound = serverTransport.connectionSendHigh + serverTransport.streamSendBuffer +
                   STALLED * serverTransport.streamSendReserve;
  uint64_t peak = 0;
  for (int i = 0; i < 20; i++) {
    peak = kj::max(peak, pair.server->stats().sendBufferedBytes);
    env.timer.afterDelay(5 * kj::MILLISECONDS).wait(env.io.waitScope);
  }
  KJ_EXPECT(peak <= bound, peak, bound);
  for (auto& w: writers) KJ_EXPECT(!w.poll(env.io.waitScope), "a stalled writer finished");

  // A fresh stream's small response is written at once (its reserve) and arrives.
  auto fresh = env.wait(pair.server->openStream());
  auto freshWrite = fresh->write("fresh", 5);
  KJ_EXPECT(freshWrite.poll(env.io.waitScope), "a fresh stream waited behind stalled ones");
  freshWrite.wait(env.io.waitScope);
  fresh->shutdownWrite();
  kj::Vector<kj::Own<Stream>> ins;
  auto got = env.wait(acceptId(*pair.client, fresh->id(), ins), 2 * kj::SECONDS);
  KJ_EXPECT(env.wait(got->readAllText(64), 2 * kj::SECONDS) == "fresh");

  // Reading resumes every writer (below the low watermark); every byte arrives intact.
  while (ins.size() < STALLED) ins.add(env.wait(pair.client->acceptStream()));
  kj::Vector<kj::Promise<uint64_t>> readers;
  for (auto& in: ins) {
    int64_t index = (in->id() - outs[0]->id()) / 4;
    readers.add(readPattern(*in, 200 + index));
  }
  auto totals = env.wait(kj::joinPromises(readers.releaseAsArray()), 60 * kj::SECONDS);
  for (auto n: totals) KJ_EXPECT(n == EACH, n);
  env.wait(kj::joinPromises(writers.releaseAsArray()));
  KJ_EXPECT(eventually(env, [&]() { return pair.server->stats().sendBufferedBytes == 0; }));
  KJ_EXPECT(!pair.server->stats().sendOverBudget);
}

KJ_TEST("a stream blocked on its peer's window holds only streamSendReserve; writableBytes()") {
  auto clientTransport = fastTransport();
  clientTransport.initialStreamWindow = 64 * 1024;
  clientTransport.maxStreamWindow = 64 * 1024;
  auto serverTransport = fastTransport();
  serverTransport.streamSendBuffer = 256 * 1024;
  serverTransport.streamSendReserve = 4 * 1024;
  Env env(serverTransport);
  auto pair = env.connect(clientConfig(clientTransport));

  // A writer whose peer does not read: once the window's bytes are acknowledged, the stream holds
  // the reserve, not streamSendBuffer.
  auto out = env.wait(pair.server->openStream());
  auto writing = writePattern(*out, 1 * MiB, 31).eagerlyEvaluate(nullptr);
  auto in = env.wait(pair.client->acceptStream());
  KJ_EXPECT(eventually(env, [&]() {
    return in->bufferedReadBytes() == 64 * 1024 && out->bufferedWriteBytes() <= 4 * 1024;
  }), in->bufferedReadBytes(), out->bufferedWriteBytes());
  KJ_EXPECT(!writing.poll(env.io.waitScope), "writer was not halted");

  // writableBytes(): what a write takes at once. A fresh stream takes its window plus the reserve
  // in writes that never wait, then reports 0 until the peer reads.
  auto out2 = env.wait(pair.server->openStream());
  kj::byte chunk[16 * 1024];
  fillPattern(chunk, 0, sizeof(chunk), 32);
  uint64_t total = 0;
  for (int i = 0; i < 100; i++) {
    size_t n = out2->writableBytes(sizeof(chunk));
    if (n == 0) break;
    KJ_ASSERT(n <= sizeof(chunk), n);
    auto written = out2->write(chunk, n);
    KJ_EXPECT(written.poll(env.io.waitScope), "a write of what writableBytes() said waited");
    written.wait(env.io.waitScope);
    total += n;
  }
  KJ_EXPECT(total == 64 * 1024 + 4 * 1024, total);
  auto writable = out2->whenWritable();
  env.timer.afterDelay(50 * kj::MILLISECONDS).wait(env.io.waitScope);
  KJ_EXPECT(!writable.poll(env.io.waitScope), "whenWritable() resolved without credit");
  kj::Vector<kj::Own<Stream>> others;
  auto in2 = env.wait(acceptId(*pair.client, out2->id(), others));
  kj::byte sink[96 * 1024];
  uint64_t read = 0;
  while (read < total) read += env.wait(in2->tryRead(sink, 1, sizeof(sink)));
  env.wait(kj::mv(writable), 2 * kj::SECONDS);
  KJ_EXPECT(out2->writableBytes(sizeof(chunk)) == sizeof(chunk));
}

KJ_TEST("writableBytes() reserves its bytes in the send budget until the write") {
  auto serverTransport = fastTransport();
  serverTransport.streamSendBuffer = 256 * 1024;
  serverTransport.streamSendReserve = 4 * 1024;
  serverTransport.connectionSendHigh = 64 * 1024;
  serverTransport.connectionSendLow = 32 * 1024;
  Env env(serverTransport);
  auto pair = env.connect();

  constexpr size_t WANT = 48 * 1024;
  kj::Vector<kj::Own<Stream>> outs;
  for (int i = 0; i < 4; i++) outs.add(env.wait(pair.server->openStream()));
  // Two reservations fill the budget: the third stream gets only its reserve, though nothing
  // was written yet.
  KJ_EXPECT(outs[0]->writableBytes(WANT) == WANT);
  KJ_EXPECT(outs[1]->writableBytes(WANT) == WANT);
  KJ_EXPECT(pair.server->stats().sendOverBudget);
  KJ_EXPECT(outs[2]->writableBytes(WANT) == 4 * 1024);
  // What was reserved is taken at once, over the budget or not.
  auto data = kj::heapArray<kj::byte>(WANT);
  for (int i = 0; i < 3; i++) {
    size_t n = i < 2 ? WANT : 4 * 1024;
    fillPattern(data.begin(), 0, n, 40 + i);
    auto written = outs[i]->write(data.begin(), n);
    KJ_EXPECT(written.poll(env.io.waitScope), "a reserved write waited", i);
    written.wait(env.io.waitScope);
    outs[i]->shutdownWrite();
  }
  // A reservation nobody uses is returned when the stream goes.
  uint64_t before = pair.server->stats().sendBufferedBytes;
  size_t reserved = outs[3]->writableBytes(WANT);
  KJ_EXPECT(pair.server->stats().sendBufferedBytes == before + reserved);
  outs[3] = nullptr;
  KJ_EXPECT(pair.server->stats().sendBufferedBytes == before);

  kj::Vector<kj::Own<Stream>> others;   // the dropped stream, if it arrives first
  for (int i = 0; i < 3; i++) {
    auto in = env.wait(acceptId(*pair.client, outs[i]->id(), others));
    KJ_EXPECT(env.wait(readPattern(*in, 40 + i)) == (i < 2 ? WANT : 4 * 1024), i);
  }
  KJ_EXPECT(eventually(env, [&]() { return pair.server->stats().sendBufferedBytes == 0; }),
            pair.server->stats().sendBufferedBytes);
  KJ_EXPECT(!pair.server->stats().sendOverBudget);
}

KJ_TEST("the send budget follows the congestion window, between connectionSendMin and High") {
  // A fresh connection's window is ~14 KiB (10 packets): four of it are below connectionSendMin,
  // so the budget is connectionSendMin, not connectionSendHigh.
  auto serverTransport = fastTransport();
  serverTransport.streamSendBuffer = 256 * 1024;
  serverTransport.streamSendReserve = 4 * 1024;
  serverTransport.connectionSendHigh = 8 * MiB;
  serverTransport.connectionSendLow = 4 * MiB;
  serverTransport.connectionSendMin = 128 * 1024;
  Env env(serverTransport);
  auto pair = env.connect();
  KJ_EXPECT(pair.server->stats().congestionWindow < 32 * 1024,
            pair.server->stats().congestionWindow);

  constexpr size_t WANT = 48 * 1024;
  kj::Vector<kj::Own<Stream>> outs;
  for (int i = 0; i < 4; i++) outs.add(env.wait(pair.server->openStream()));
  KJ_EXPECT(outs[0]->writableBytes(WANT) == WANT);
  KJ_EXPECT(outs[1]->writableBytes(WANT) == WANT);
  KJ_EXPECT(!pair.server->stats().sendOverBudget);
  KJ_EXPECT(outs[2]->writableBytes(WANT) == WANT);   // 144 KiB >= 128 KiB: over
  KJ_EXPECT(pair.server->stats().sendOverBudget);
  KJ_EXPECT(outs[3]->writableBytes(WANT) == 4 * 1024);
  // Dropping the reservations brings the budget back under the low mark (64 KiB, scaled).
  for (int i = 0; i < 3; i++) outs[i] = nullptr;
  KJ_EXPECT(!pair.server->stats().sendOverBudget);

  // connectionSendMin >= connectionSendHigh: a fixed budget, as before.
  serverTransport.connectionSendMin = serverTransport.connectionSendHigh;
  auto fixedServer = newEndpoint(env.io.unixEventPort, loopback());
  fixedServer->listen(serverConfig(serverTransport));
  auto accepted = fixedServer->accept();
  auto client2 = env.wait(env.client->dial(fixedServer->localAddress(), clientConfig()));
  auto server2 = env.wait(kj::mv(accepted));
  kj::Vector<kj::Own<Stream>> more;
  for (int i = 0; i < 4; i++) {
    more.add(env.wait(server2->openStream()));
    KJ_EXPECT(more.back()->writableBytes(WANT) == WANT, i);
  }
  KJ_EXPECT(!server2->stats().sendOverBudget);
}

KJ_TEST("whenAborted: the peer dropping a stream is seen without writing; completion is not") {
  Env env;
  auto pair = env.connect();

  // A request fully received (FIN), the response not started: the requester goes away. Only
  // STOP_SENDING reaches us (its write side was complete); our stack resets and the stream ends.
  {
    auto request = env.wait(pair.client->openStream());
    env.wait(request->write("GET", 3));
    request->shutdownWrite();
    auto served = env.wait(pair.server->acceptStream());
    KJ_EXPECT(env.wait(served->readAllText(64)) == "GET");
    auto aborted = served->whenAborted();
    KJ_EXPECT(!aborted.poll(env.io.waitScope));
    request = nullptr;
    env.wait(kj::mv(aborted), 2 * kj::SECONDS);
    KJ_EXPECT_THROW_MESSAGE("closed before its end", env.wait(served->write("late", 4)));
  }
  // An upload in progress: the requester resets it.
  {
    auto request = env.wait(pair.client->openStream());
    env.wait(request->write("PUT part", 8));
    auto served = env.wait(pair.server->acceptStream());
    auto aborted = served->whenAborted();
    request->reset(7);
    env.wait(kj::mv(aborted), 2 * kj::SECONDS);
  }
  // Completed normally both ways: never aborted.
  {
    auto request = env.wait(pair.client->openStream());
    env.wait(request->write("GET", 3));
    request->shutdownWrite();
    auto served = env.wait(pair.server->acceptStream());
    auto aborted = served->whenAborted();
    KJ_EXPECT(env.wait(served->readAllText(64)) == "GET");
    env.wait(served->write("200", 3));
    served->shutdownWrite();
    KJ_EXPECT(env.wait(request->readAllText(64)) == "200");
    request = nullptr;
    KJ_EXPECT(eventually(env, [&]() { return pair.server->stats().streamsActive == 0; }));
    KJ_EXPECT(!aborted.poll(env.io.waitScope), "a completed stream was reported aborted");
  }
}

KJ_TEST("connectionBlockedFor: a peer withholding connection credit is visible") {
  auto clientTransport = fastTransport();
  clientTransport.initialConnectionWindow = 128 * 1024;
  clientTransport.maxConnectionWindow = 128 * 1024;
  Env env;
  auto pair = env.connect(clientConfig(clientTransport));
  auto out = env.wait(pair.server->openStream());
  auto writing = writePattern(*out, 4 * MiB, 9).eagerlyEvaluate(nullptr);
  auto in = env.wait(pair.client->acceptStream());
  in->setCreditWithheld(true);
  auto drain = readPattern(*in, 9).eagerlyEvaluate(nullptr);
  KJ_EXPECT(eventually(env, [&]() {
    return pair.server->stats().connectionBlockedFor >= 100 * kj::MILLISECONDS;
  }));
  KJ_EXPECT(!writing.poll(env.io.waitScope));
  in->setCreditWithheld(false);
  KJ_EXPECT(env.wait(kj::mv(drain), 30 * kj::SECONDS) == 4 * MiB);
  env.wait(kj::mv(writing));
  KJ_EXPECT(pair.server->stats().connectionBlockedFor == 0 * kj::SECONDS);
}

KJ_TEST("a stream whose FIN waits for connection credit is sent once the credit comes") {
  auto clientTransport = fastTransport();
  clientTransport.initialConnectionWindow = 16 * 1024;
  clientTransport.maxConnectionWindow = 16 * 1024;
  clientTransport.recvCreditBudget = 0;
  Env env;
  auto pair = env.connect(clientConfig(clientTransport));
  auto out = env.wait(pair.server->openStream());
  auto data = kj::heapArray<kj::byte>(40 * 1024);
  fillPattern(data.begin(), 0, data.size(), 11);
  env.wait(out->write(data.begin(), data.size()));   // fits the send buffer: completes at once
  out->shutdownWrite();                              // the FIN waits behind the blocked bytes
  auto in = env.wait(pair.client->acceptStream());
  in->setCreditWithheld(true);
  auto reading = readPattern(*in, 11).eagerlyEvaluate(nullptr);
  KJ_EXPECT(eventually(env, [&]() {
    return pair.server->stats().connectionBlockedFor >= 50 * kj::MILLISECONDS;
  }));
  in->setCreditWithheld(false);
  KJ_EXPECT(env.wait(kj::mv(reading), 2 * kj::SECONDS) == data.size());
}

}  // namespace
}  // namespace cfqt::quic
