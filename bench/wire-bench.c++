// Wire codec micro-benchmark: encode + decode of a ConnectRequest with 20 headers and of a
// ConnectResponse with 10, through the same functions the data path uses (HTTP mapping, preamble
// encoder, validating preamble decoder, HTTP mapping back).

#include "bench.h"

#include "wire/data-stream.h"
#include "wire/http-metadata.h"

#include <capnp/message.h>
#include <kj/debug.h>
#include <kj/time.h>

namespace cfqt::bench {

namespace {

constexpr kj::Duration RUN_FOR = 500 * kj::MILLISECONDS;

kj::Array<wire::Header> makeHeaders(size_t count) {
  return KJ_MAP(i, kj::range<size_t>(0, count)) {
    return wire::Header{kj::str("x-bench-header-", i), kj::str("value-", i, "-abcdefghijklmnop")};
  };
}

// Runs `once` until RUN_FOR has passed; returns ns per call.
template <typename Func>
double measure(Func&& once) {
  auto& clock = kj::systemPreciseMonotonicClock();
  for (int i = 0; i < 100; i++) once();  // warm-up
  uint64_t iterations = 0;
  auto start = clock.now();
  kj::Duration elapsed = 0 * kj::NANOSECONDS;
  do {
    for (int i = 0; i < 256; i++) once();
    iterations += 256;
    elapsed = clock.now() - start;
  } while (elapsed < RUN_FOR);
  return double(elapsed / kj::NANOSECONDS) / double(iterations);
}

size_t requestRoundTrip(kj::ArrayPtr<const wire::Header> headers) {
  capnp::MallocMessageBuilder builder;
  wire::encodeRequest(builder.initRoot<wire::schema::ConnectRequest>(),
                      "https://bench.trycloudflare.com/some/path?query=1",
                      wire::schema::ConnectionType::HTTP, "GET", "bench.trycloudflare.com",
                      headers);
  auto bytes =
      wire::encodeConnectRequest(builder.getRoot<wire::schema::ConnectRequest>().asReader());
  KJ_SWITCH_ONEOF(wire::decodeConnectRequest(bytes)) {
    KJ_CASE_ONEOF(decoded, wire::DecodedPreamble) {
      auto root = decoded.message->getRoot<wire::schema::ConnectRequest>();
      KJ_SWITCH_ONEOF(wire::decodeRequest(root)) {
        KJ_CASE_ONEOF(head, wire::HttpRequestHead) { return head.headers.size() + bytes.size(); }
        KJ_CASE_ONEOF(error, wire::WireError) { KJ_FAIL_ASSERT(error.toString()); }
      }
    }
    KJ_CASE_ONEOF(error, wire::WireError) { KJ_FAIL_ASSERT(error.toString()); }
  }
  KJ_UNREACHABLE;
}

size_t responseRoundTrip(kj::ArrayPtr<const wire::Header> headers) {
  capnp::MallocMessageBuilder builder;
  wire::encodeResponse(builder.initRoot<wire::schema::ConnectResponse>(), 200, headers);
  auto bytes =
      wire::encodeConnectResponse(builder.getRoot<wire::schema::ConnectResponse>().asReader());
  KJ_SWITCH_ONEOF(wire::decodeConnectResponse(bytes)) {
    KJ_CASE_ONEOF(decoded, wire::DecodedPreamble) {
      auto root = decoded.message->getRoot<wire::schema::ConnectResponse>();
      KJ_SWITCH_ONEOF(wire::decodeResponse(root)) {
        KJ_CASE_ONEOF(head, wire::HttpResponseHead) { return head.headers.size() + head.status; }
        KJ_CASE_ONEOF(error, wire::WireError) { KJ_FAIL_ASSERT(error.toString()); }
      }
    }
    KJ_CASE_ONEOF(error, wire::WireError) { KJ_FAIL_ASSERT(error.toString()); }
  }
  KJ_UNREACHABLE;
}

}  // namespace

void runWireBench(Reporter& reporter) {
  volatile size_t sink = 0;  // keeps the work observable

  auto requestHeaders = makeHeaders(20);
  KJ_ASSERT(requestRoundTrip(requestHeaders) > 20);
  double requestNs = measure([&]() { sink = sink + requestRoundTrip(requestHeaders); });
  reporter.figure("wire.request_roundtrip_ns", requestNs, "ns");
  reporter.figure("wire.request_roundtrips_per_s", 1e9 / requestNs, "1/s");

  auto responseHeaders = makeHeaders(10);
  KJ_ASSERT(responseRoundTrip(responseHeaders) == 210);
  double responseNs = measure([&]() { sink = sink + responseRoundTrip(responseHeaders); });
  reporter.figure("wire.response_roundtrip_ns", responseNs, "ns");
  reporter.figure("wire.response_roundtrips_per_s", 1e9 / responseNs, "1/s");
}

}  // namespace cfqt::bench
