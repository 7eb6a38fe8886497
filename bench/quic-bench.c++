// cfqt-bench suite "quic": QUIC bulk throughput vs TLS-over-TCP (kj-tls), server-opened stream
// rate and serial request/response latency, over loopback. Server and client run in separate
// threads, each with its own KJ event loop. Reproduce with `build/bin/cfqt-bench quic`.

#include "bench.h"

#include "quic/endpoint.h"

#include <kj/async-io.h>
#include <kj/compat/tls.h>
#include <kj/debug.h>
#include <kj/mutex.h>
#include <kj/thread.h>
#include <kj/vector.h>

#include <algorithm>

#include <stdlib.h>
#include <time.h>
#include <unistd.h>

namespace cfqt::bench {
namespace {

using quic::Connection;
using quic::Endpoint;
using quic::Stream;

// The src/quic/testdata test PKI (test-only keys), embedded so that the bench needs no files.
constexpr const char CA_PEM[] = R"PEM(-----BEGIN CERTIFICATE-----
MIIBcjCCARigAwIBAgIUJKZOb7S8fw9zEyEXVhLPatrN2KMwCgYIKoZIzj0EAwIw
FzEVMBMGA1UEAxMMY2ZxdCB0ZXN0IENBMB4XDTI2MTEyNTEwNTA0N1oXDTQ2MTEy
MDEwNTA0N1owFzEVMBMGA1UEAxMMY2ZxdCB0ZXN0IENBMFkwEwYHKoZIzj0CAQYI
KoZIzj0DAQcDQgAEnFK2eIfnJ3JEL9AYUlkuHfSeRR1jVXNhl2EWkr5UTIrAvzEz
uwtzbtW22MP1vQCRCeX5nfjqeu8ZtKOuk4AHV6NCMEAwDwYDVR0TAQH/BAUwAwEB
/zAOBgNVHQ8BAf8EBAMCAgQwHQYDVR0OBBYEFMgmsRHYwyHA1oAmTdBXnSYMBLWu
MAoGCCqGSM49BAMCA0gAMEUCIQCAVsaUbU8bW6zztA/DKqBw1TTkkTxKV5xml0rY
o8yflAIgW30KU9lecNIZeQahTr6MY5/afJrqS8Rs6MKYYh0pOq4=
-----END CERTIFICATE-----
)PEM";
constexpr const char CERT_PEM[] = R"PEM(-----BEGIN CERTIFICATE-----
MIIByzCCAXCgAwIBAgIUDbHxf8t3s+i8maBxc6jvwxMyrkYwCgYIKoZIzj0EAwIw
FzEVMBMGA1UEAxMMY2ZxdCB0ZXN0IENBMB4XDTI2MTEyNTEwNTA0N1oXDTQ2MTEy
MDEwNTA0N1owHDEaMBgGA1UEAxMRcXVpYy5jZnR1bm5lbC5jb20wWTATBgcqhkjO
PQIBBggqhkjOPQMBBwNCAARpQ8pEvNffHgopSMTWtQIwWBYrRxLE07a5DdMB2I9M
zImRdB3ZT2duZ0EDIyPwk98JbEkx9z4wrvVXnyUANqGxo4GUMIGRMAwGA1UdEwEB
/wQCMAAwHAYDVR0RBBUwE4IRcXVpYy5jZnR1bm5lbC5jb20wEwYDVR0lBAwwCgYI
KwYBBQUHAwEwDgYDVR0PAQH/BAQDAgeAMB0GA1UdDgQWBBSGXfDUyEG4ZROKf2BM
MP6SFpzLOzAfBgNVHSMEGDAWgBTIJrER2MMhwNaAJk3QV50mDAS1rjAKBggqhkjO
PQQDAgNJADBGAiEAhf4fnt3R0QLw+IUi5qRpOAGwGBVFnbbCZWsLthEWS1QCIQDI
mkEz9LZxOIN7pc9ZbUOia9G8Ny9F2W3DpJhp9LXwlA==
-----END CERTIFICATE-----
)PEM";
constexpr const char KEY_PEM[] = R"PEM(-----BEGIN EC PRIVATE KEY-----
MHgCAQEEIQCtWxwq9j5iDIpY/yasD2c2aB/y1BFCjfB9e0vdaAnUdaAKBggqhkjO
PQMBB6FEA0IABGlDykS8198eCilIxNa1AjBYFitHEsTTtrkN0wHYj0zMiZF0HdlP
Z25nQQMjI/CT3wlsSTH3PjCu9VefJQA2obE=
-----END EC PRIVATE KEY-----
)PEM";

constexpr uint64_t BULK_BYTES = 1ull << 30;
constexpr uint32_t STREAMS = 200000;
constexpr uint32_t STREAM_CONCURRENCY = 100;
constexpr uint32_t RTT_ROUNDS = 20000;
constexpr size_t MSG = 100;
constexpr size_t CHUNK = 256 * 1024;

uint64_t nowNs() {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return uint64_t(ts.tv_sec) * 1000000000ull + ts.tv_nsec;
}

quic::TransportConfig benchTransport() {
  quic::TransportConfig t;
  t.maxIdleTimeout = 30 * kj::SECONDS;
  t.streamSendBuffer = 4 * 1024 * 1024;
  t.maxStreamWindow = 16 * 1024 * 1024;
  t.maxConnectionWindow = 32 * 1024 * 1024;
  t.initialStreamWindow = 2 * 1024 * 1024;
  t.initialConnectionWindow = 4 * 1024 * 1024;
  return t;
}

quic::SocketAddress loopback() {
  return KJ_ASSERT_NONNULL(quic::SocketAddress::parse("127.0.0.1:0"));
}

// Runs `serve` on a thread with its own event loop; the port it listens on comes back through
// `port()`.
class ServerThread {
public:
  explicit ServerThread(kj::Function<void(kj::AsyncIoContext&, kj::MutexGuarded<uint>&)> serve)
      : serve(kj::mv(serve)), thread([this]() {
          auto io = kj::setupAsyncIo();
          this->serve(io, portCell);
        }) {}
  uint port() {
    auto lock = portCell.lockExclusive();
    lock.wait([](const uint& p) { return p != 0; });
    return *lock;
  }

private:
  kj::Function<void(kj::AsyncIoContext&, kj::MutexGuarded<uint>&)> serve;
  kj::MutexGuarded<uint> portCell{0u};
  kj::Thread thread;
};

kj::Own<Endpoint> listenQuic(kj::AsyncIoContext& io, kj::MutexGuarded<uint>& port,
                             quic::TransportConfig transport) {
  auto endpoint = quic::newEndpoint(io.unixEventPort, loopback());
  quic::ServerConfig config;
  config.certPem = kj::str(CERT_PEM);
  config.keyPem = kj::str(KEY_PEM);
  config.alpn.add(kj::str("argotunnel"));
  config.transport = transport;
  endpoint->listen(kj::mv(config));
  *port.lockExclusive() = endpoint->localAddress().port();
  return endpoint;
}

kj::Own<Connection> dialQuic(kj::AsyncIoContext& io, Endpoint& endpoint, uint port,
                             quic::TransportConfig transport) {
  quic::ClientConfig config;
  config.caPem = kj::str(CA_PEM);
  config.transport = transport;
  config.tlsPriority = kj::str(
      "NORMAL:-VERS-ALL:+VERS-TLS1.3:-CIPHER-ALL:+AES-128-GCM:%DISABLE_TLS13_COMPAT_MODE");
  auto addr = loopback();
  addr.setPort(port);
  return endpoint.dial(addr, kj::mv(config)).wait(io.waitScope);
}

kj::Promise<void> writeZeros(kj::AsyncOutputStream& out, uint64_t remaining,
                             kj::Array<kj::byte> buffer) {
  if (remaining == 0) return kj::READY_NOW;
  size_t n = kj::min(uint64_t(buffer.size()), remaining);
  auto written = out.write(buffer.begin(), n);
  return written.then([&out, remaining = remaining - n, buffer = kj::mv(buffer)]() mutable {
    return writeZeros(out, remaining, kj::mv(buffer));
  });
}

kj::Promise<uint64_t> drain(kj::AsyncInputStream& in, uint64_t total, kj::Array<kj::byte> buf) {
  auto read = in.tryRead(buf.begin(), 1, buf.size());
  return read.then([&in, total, buf = kj::mv(buf)](size_t n) mutable -> kj::Promise<uint64_t> {
    if (n == 0) return total;
    return drain(in, total + n, kj::mv(buf));
  });
}

// ---- bulk

double quicBulk() {
  auto transport = benchTransport();
  ServerThread server([transport](kj::AsyncIoContext& io, kj::MutexGuarded<uint>& port) {
    auto endpoint = listenQuic(io, port, transport);
    auto conn = endpoint->accept().wait(io.waitScope);
    auto stream = conn->openStream().wait(io.waitScope);
    writeZeros(*stream, BULK_BYTES, kj::heapArray<kj::byte>(CHUNK)).wait(io.waitScope);
    stream->shutdownWrite();
    conn->onClosed().wait(io.waitScope);
  });
  auto io = kj::setupAsyncIo();
  auto endpoint = quic::newEndpoint(io.unixEventPort, loopback());
  auto conn = dialQuic(io, *endpoint, server.port(), transport);
  auto stream = conn->acceptStream().wait(io.waitScope);
  uint64_t start = nowNs();
  uint64_t got = drain(*stream, 0, kj::heapArray<kj::byte>(CHUNK)).wait(io.waitScope);
  uint64_t elapsed = nowNs() - start;
  KJ_ASSERT(got == BULK_BYTES, got);
  conn->close(0, "done").wait(io.waitScope);
  return double(got) / (elapsed / 1e9) / 1e6;
}

class Aes128OpenSsl {
  // kj-tls 0.9.2 has no knob for TLS 1.3 cipher suites and OpenSSL prefers AES-256-GCM, while the
  // QUIC side uses AES-128-GCM. For a fair comparison, point OpenSSL's configuration (read once,
  // when kj-tls first initialises it) at a file allowing only TLS_AES_128_GCM_SHA256. A user's
  // own OPENSSL_CONF is left alone.
public:
  Aes128OpenSsl() {
    if (getenv("OPENSSL_CONF") != nullptr) return;
    char name[] = "/tmp/cfqt-bench-openssl-XXXXXX";
    int fd = mkstemp(name);
    if (fd < 0) return;
    kj::AutoCloseFd owned(fd);
    kj::StringPtr conf =
        "openssl_conf = cfqt_conf\n[cfqt_conf]\nssl_conf = cfqt_ssl\n"
        "[cfqt_ssl]\nsystem_default = cfqt_tls\n"
        "[cfqt_tls]\nCiphersuites = TLS_AES_128_GCM_SHA256\n";
    if (write(fd, conf.begin(), conf.size()) != ssize_t(conf.size())) {
      unlink(name);
      return;
    }
    path = kj::heapString(name);
    setenv("OPENSSL_CONF", name, 1);
  }
  ~Aes128OpenSsl() {
    if (path != nullptr) unlink(path.cStr());
  }
  KJ_DISALLOW_COPY(Aes128OpenSsl);

private:
  kj::String path;
};

double tlsTcpBulk() {
  Aes128OpenSsl aes128;
  ServerThread server([](kj::AsyncIoContext& io, kj::MutexGuarded<uint>& port) {
    kj::TlsKeypair keypair{kj::TlsPrivateKey(KEY_PEM), kj::TlsCertificate(CERT_PEM)};
    kj::TlsContext::Options options;
    options.defaultKeypair = keypair;
    options.minVersion = kj::TlsVersion::TLS_1_2;  // 0.9.2 has no TLS_1_3; 1.3 is negotiated
    kj::TlsContext tls(kj::mv(options));
    auto addr = io.provider->getNetwork().parseAddress("127.0.0.1", 0).wait(io.waitScope);
    auto listener = addr->listen();
    *port.lockExclusive() = listener->getPort();
    auto raw = listener->accept().wait(io.waitScope);
    auto stream = tls.wrapServer(kj::mv(raw)).wait(io.waitScope);
    writeZeros(*stream, BULK_BYTES, kj::heapArray<kj::byte>(CHUNK)).wait(io.waitScope);
    stream->shutdownWrite();
    kj::byte b;
    stream->tryRead(&b, 1, 1).wait(io.waitScope);   // until the client hangs up
  });
  auto io = kj::setupAsyncIo();
  kj::TlsCertificate ca(CA_PEM);
  kj::TlsContext::Options options;
  options.useSystemTrustStore = false;
  options.trustedCertificates = kj::arrayPtr(&ca, 1);
  options.minVersion = kj::TlsVersion::TLS_1_2;  // 0.9.2 has no TLS_1_3; 1.3 is negotiated
  kj::TlsContext tls(kj::mv(options));
  auto addr = io.provider->getNetwork().parseAddress("127.0.0.1", server.port())
      .wait(io.waitScope);
  auto raw = addr->connect().wait(io.waitScope);
  auto stream = tls.wrapClient(kj::mv(raw), "quic.cftunnel.com").wait(io.waitScope);
  uint64_t start = nowNs();
  uint64_t got = drain(*stream, 0, kj::heapArray<kj::byte>(CHUNK)).wait(io.waitScope);
  uint64_t elapsed = nowNs() - start;
  KJ_ASSERT(got == BULK_BYTES, got);
  return double(got) / (elapsed / 1e9) / 1e6;
}

// ---- echo streams opened by the server

kj::Promise<void> echo(kj::Own<Stream> stream) {
  auto& ref = *stream;
  return ref.readAllBytes(4096).then([&ref](kj::Array<kj::byte> data) {
    auto written = ref.write(data.begin(), data.size());
    return written.attach(kj::mv(data)).then([&ref]() { ref.shutdownWrite(); });
  }).attach(kj::mv(stream));
}

class EchoClient: private kj::TaskSet::ErrorHandler {
public:
  explicit EchoClient(Connection& conn): conn(conn) { tasks.add(loop()); }

private:
  Connection& conn;
  kj::TaskSet tasks{*this};
  kj::Promise<void> loop() {
    return conn.acceptStream().then([this](kj::Own<Stream> stream) {
      tasks.add(echo(kj::mv(stream)));
      return loop();
    });
  }
  void taskFailed(kj::Exception&& e) override {}
};

class StreamOpener: private kj::TaskSet::ErrorHandler {
public:
  StreamOpener(Connection& conn, uint32_t total): conn(conn), total(total) {
    for (uint32_t i = 0; i < STREAM_CONCURRENCY; i++) tasks.add(worker());
  }
  kj::Promise<void> done() { return tasks.onEmpty(); }
  uint32_t verified = 0;

private:
  Connection& conn;
  uint32_t total;
  uint32_t next = 0;
  kj::byte message[MSG] = {};
  kj::TaskSet tasks{*this};

  kj::Promise<void> worker() {
    if (next == total) return kj::READY_NOW;
    ++next;
    return conn.openStream().then([this](kj::Own<Stream> stream) {
      return oneStream(kj::mv(stream));
    }).then([this](kj::Array<kj::byte> echoed) {
      if (echoed.size() == MSG) ++verified;
      return worker();   // the stream is gone by now: nothing accumulates along the loop
    });
  }
  kj::Promise<kj::Array<kj::byte>> oneStream(kj::Own<Stream> stream) {
    auto& ref = *stream;
    return ref.write(message, MSG).then([&ref]() {
      ref.shutdownWrite();
      return ref.readAllBytes(4096);
    }).attach(kj::mv(stream));
  }
  void taskFailed(kj::Exception&& e) override { KJ_LOG(ERROR, "bench stream failed", e); }
};

double quicStreams() {
  auto transport = benchTransport();
  kj::MutexGuarded<double> rate(0.0);
  {
    ServerThread server([transport, &rate](kj::AsyncIoContext& io, kj::MutexGuarded<uint>& port) {
      auto endpoint = listenQuic(io, port, transport);
      auto conn = endpoint->accept().wait(io.waitScope);
      StreamOpener opener(*conn, STREAMS);
      uint64_t start = nowNs();
      opener.done().wait(io.waitScope);
      uint64_t elapsed = nowNs() - start;
      KJ_ASSERT(opener.verified == STREAMS, opener.verified);
      *rate.lockExclusive() = STREAMS / (elapsed / 1e9);
      conn->close(0, "done").wait(io.waitScope);
    });
    auto io = kj::setupAsyncIo();
    auto endpoint = quic::newEndpoint(io.unixEventPort, loopback());
    auto clientTransport = transport;
    clientTransport.maxIncomingBidiStreams = STREAM_CONCURRENCY;
    auto conn = dialQuic(io, *endpoint, server.port(), clientTransport);
    EchoClient echoClient(*conn);
    conn->onClosed().wait(io.waitScope);
  }
  return *rate.lockExclusive();
}

// ---- serial request/response

kj::Promise<void> echoMessages(Stream& stream, kj::Array<kj::byte> buf) {
  auto read = stream.tryRead(buf.begin(), MSG, MSG);
  return read.then([&stream, buf = kj::mv(buf)](size_t n) mutable -> kj::Promise<void> {
    if (n < MSG) return kj::READY_NOW;
    auto written = stream.write(buf.begin(), MSG);
    return written.then([&stream, buf = kj::mv(buf)]() mutable {
      return echoMessages(stream, kj::mv(buf));
    });
  });
}

void quicRtt(double& p50, double& p99) {
  auto transport = benchTransport();
  ServerThread server([transport](kj::AsyncIoContext& io, kj::MutexGuarded<uint>& port) {
    auto endpoint = listenQuic(io, port, transport);
    auto conn = endpoint->accept().wait(io.waitScope);
    auto stream = conn->acceptStream().wait(io.waitScope);
    echoMessages(*stream, kj::heapArray<kj::byte>(MSG)).wait(io.waitScope);
    conn->onClosed().wait(io.waitScope);
  });
  auto io = kj::setupAsyncIo();
  auto endpoint = quic::newEndpoint(io.unixEventPort, loopback());
  auto conn = dialQuic(io, *endpoint, server.port(), transport);
  auto stream = conn->openStream().wait(io.waitScope);
  kj::byte out[MSG] = {}, in[MSG];
  kj::Vector<uint64_t> samples(RTT_ROUNDS);
  for (uint32_t i = 0; i < RTT_ROUNDS + 1000; i++) {
    uint64_t start = nowNs();
    stream->write(out, MSG).wait(io.waitScope);
    stream->read(in, MSG).wait(io.waitScope);
    if (i >= 1000) samples.add(nowNs() - start);   // the first 1000 warm up
  }
  stream->shutdownWrite();
  std::sort(samples.begin(), samples.end());
  p50 = samples[samples.size() / 2] / 1e3;
  p99 = samples[samples.size() * 99 / 100] / 1e3;
  conn->close(0, "done").wait(io.waitScope);
}

}  // namespace

void runQuicBench(Reporter& reporter) {
  // CFQT_QUIC_BENCH=bulk|streams|rtt runs one part only (for profiling).
  const char* only = getenv("CFQT_QUIC_BENCH");
  auto want = [only](kj::StringPtr part) { return only == nullptr || part == only; };
  if (want("bulk")) {
    double quic = quicBulk();
    reporter.figure("quic.bulk_MBps", quic, "MB/s");
    double tcp = tlsTcpBulk();
    reporter.figure("tls_tcp.bulk_MBps", tcp, "MB/s");
    reporter.figure("quic.bulk_ratio", quic / tcp, "ratio");
  }
  if (want("streams")) reporter.figure("quic.streams_per_s", quicStreams(), "streams/s");
  if (want("rtt")) {
    double p50, p99;
    quicRtt(p50, p99);
    reporter.figure("quic.rtt_p50_us", p50, "us");
    reporter.figure("quic.rtt_p99_us", p99, "us");
  }
}

}  // namespace cfqt::bench
