// origin suite: cfqt::origin::Origin against an in-process kj::HttpServer on loopback TCP, the
// edge side played over kj::newTwoWayPipe(). Serial and concurrent small requests (keep-alive
// reuse) and bulk throughput in both directions.

#include "bench.h"

#include "origin/origin.h"
#include "wire/data-stream.h"
#include "wire/http-metadata.h"

#include <capnp/message.h>
#include <kj/async-io.h>
#include <kj/compat/http.h>
#include <kj/debug.h>

namespace cfqt::bench {
namespace {

constexpr size_t CHUNK = 64 * 1024;

// Answers /small with 13 bytes, /big?n=N with N bytes, and swallows request bodies.
class BenchService final: public kj::HttpService {
public:
  explicit BenchService(const kj::HttpHeaderTable& table): table(table) {}

  kj::Promise<void> request(kj::HttpMethod method, kj::StringPtr url,
                            const kj::HttpHeaders& headers, kj::AsyncInputStream& requestBody,
                            Response& response) override {
    uint64_t size = 13;
    if (url.startsWith("/big?n=")) size = url.slice(7).parseAs<uint64_t>();
    return drain(requestBody).then([this, size, &response]() {
      kj::HttpHeaders out(table);
      auto body = response.send(200, "OK", out, size);
      auto promise = send(*body, size);
      return promise.attach(kj::mv(body));
    });
  }

private:
  const kj::HttpHeaderTable& table;
  kj::byte sink[CHUNK];
  kj::byte source[CHUNK] = {};

  kj::Promise<void> drain(kj::AsyncInputStream& in) {
    return in.tryRead(sink, 1, sizeof(sink)).then([this, &in](size_t n) -> kj::Promise<void> {
      if (n == 0) return kj::READY_NOW;
      return drain(in);
    });
  }

  kj::Promise<void> send(kj::AsyncOutputStream& out, uint64_t remaining) {
    if (remaining == 0) return kj::READY_NOW;
    size_t n = kj::min(uint64_t(sizeof(source)), remaining);
    return out.write(source, n).then([this, &out, remaining, n]() {
      return send(out, remaining - n);
    });
  }
};

// One request through Origin::serveStream(); resolves to the response body size.
class OneCall {
public:
  OneCall(origin::Origin& origin, kj::StringPtr method, kj::StringPtr path, uint64_t upload) {
    auto request = message.initRoot<wire::schema::ConnectRequest>();
    kj::Vector<wire::Header> headers;
    if (upload > 0) headers.add(wire::Header{kj::str("Content-Length"), kj::str(upload)});
    wire::encodeRequest(request, path, wire::schema::ConnectionType::HTTP, method,
                        "bench.trycloudflare.com", headers.asPtr());
    auto pipe = kj::newTwoWayPipe();
    edge = kj::mv(pipe.ends[0]);
    originSide = kj::mv(pipe.ends[1]);
    serving = origin.serveStream(*originSide, request.asReader()).eagerlyEvaluate(nullptr);
    uploading = writeBody(upload).eagerlyEvaluate(nullptr);
  }

  kj::Promise<uint64_t> run() {
    return wire::readConnectResponse(*edge).then([this](kj::Own<capnp::MessageReader>) {
      return readBody(0);
    }).then([this](uint64_t size) {
      return serving.then([this]() { return kj::mv(uploading); }).then([size]() { return size; });
    });
  }

private:
  capnp::MallocMessageBuilder message;
  kj::Own<kj::AsyncIoStream> edge;
  kj::Own<kj::AsyncIoStream> originSide;
  kj::Promise<void> serving = nullptr;
  kj::Promise<void> uploading = nullptr;
  kj::byte buffer[CHUNK] = {};

  kj::Promise<void> writeBody(uint64_t remaining) {
    if (remaining == 0) return kj::READY_NOW;
    size_t n = kj::min(uint64_t(sizeof(buffer)), remaining);
    return edge->write(buffer, n).then([this, remaining, n]() {
      return writeBody(remaining - n);
    });
  }

  kj::Promise<uint64_t> readBody(uint64_t so) {
    return edge->tryRead(buffer, 1, sizeof(buffer)).then([this, so](size_t n)
                                                             -> kj::Promise<uint64_t> {
      if (n == 0) return so;
      return readBody(so + n);
    });
  }
};

uint64_t call(origin::Origin& origin, kj::WaitScope& ws, kj::StringPtr method,
              kj::StringPtr path, uint64_t upload = 0) {
  auto c = kj::heap<OneCall>(origin, method, path, upload);
  return c->run().attach(kj::mv(c)).wait(ws);
}

double seconds(kj::TimePoint start) {
  return double((kj::systemPreciseMonotonicClock().now() - start) / kj::NANOSECONDS) / 1e9;
}

}  // namespace

void runOriginBench(Reporter& reporter) {
  auto io = kj::setupAsyncIo();
  auto& ws = io.waitScope;
  kj::HttpHeaderTable table;
  auto& timer = io.provider->getTimer();
  auto& network = io.provider->getNetwork();

  BenchService service(table);
  kj::HttpServer server(timer, table, service);
  auto listener = network.parseAddress("127.0.0.1", 0).wait(ws)->listen();
  auto port = listener->getPort();
  auto listening = server.listenHttp(*listener).eagerlyEvaluate(nullptr);

  auto parsed = origin::parseOriginUrl(kj::str("127.0.0.1:", port));
  auto created = origin::Origin::create(kj::mv(parsed.get<origin::OriginConfig>()), timer, network,
                                        table);
  auto& proxy = *created.get<kj::Own<origin::Origin>>();

  call(proxy, ws, "GET", "/small");  // warm-up (dial)
  const int serial = 3000;
  auto start = kj::systemPreciseMonotonicClock().now();
  for (int i = 0; i < serial; i++) call(proxy, ws, "GET", "/small");
  double t = seconds(start);
  reporter.figure("origin.serial_small_get", serial / t, "req/s");
  reporter.figure("origin.serial_small_get_latency", t / serial * 1e6, "us");

  const int streams = 64;
  const int each = 50;
  start = kj::systemPreciseMonotonicClock().now();
  for (int round = 0; round < each; round++) {
    kj::Vector<kj::Promise<uint64_t>> promises;
    for (int i = 0; i < streams; i++) {
      auto c = kj::heap<OneCall>(proxy, "GET", "/small", 0);
      promises.add(c->run().attach(kj::mv(c)));
    }
    kj::joinPromises(promises.releaseAsArray()).wait(ws);
  }
  t = seconds(start);
  reporter.figure("origin.concurrent64_small_get", streams * each / t, "req/s");
  reporter.figure("origin.connections_opened", proxy.getStats().connectionsOpened, "conns");

  const uint64_t big = 512ull << 20;
  start = kj::systemPreciseMonotonicClock().now();
  auto got = call(proxy, ws, "GET", kj::str("/big?n=", big));
  KJ_ASSERT(got == big);
  reporter.figure("origin.download_512MiB", big / seconds(start) / 1e6, "MB/s");

  start = kj::systemPreciseMonotonicClock().now();
  call(proxy, ws, "POST", "/small", big);
  reporter.figure("origin.upload_512MiB", big / seconds(start) / 1e6, "MB/s");
  reporter.figure("origin.max_buffered_bytes", proxy.getStats().maxBufferedBytes, "bytes");
}

}  // namespace cfqt::bench
