// libFuzzer target: the HTTP/2 transport's header codec (src/http2/header.*). The input as a
// serialized `cf-cloudflared-response-headers` value (deserializeHeaders: untrusted on the edge
// side); a decoded list must serialize and decode back to itself. The input also as a header list
// (NUL-separated name/value fields, the first byte picking the rules) for the request-side
// classifiers and the response builders, which must keep their documented guarantees.

#include "fuzz/fuzz-support.h"

#include "http2/header.h"

using namespace cfqt;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto chars = kj::arrayPtr(reinterpret_cast<const char*>(data), size);
  auto deserialized = http2::deserializeHeaders(chars);
  KJ_IF_MAYBE(headers, deserialized.tryGet<kj::Array<wire::Header>>()) {
    auto again = http2::serializeResponseHeaders(*headers);
    auto back = http2::deserializeHeaders(again);
    CFQT_FUZZ_CHECK(back.is<kj::Array<wire::Header>>());
    auto& list = back.get<kj::Array<wire::Header>>();
    CFQT_FUZZ_CHECK(list.size() == headers->size());
    for (size_t i = 0; i < list.size(); i++) {
      CFQT_FUZZ_CHECK(list[i].name == (*headers)[i].name && list[i].value == (*headers)[i].value);
    }
  }

  kj::Vector<kj::String> fields;
  size_t start = size > 0 ? 1 : 0;
  for (size_t i = start; i <= size; i++) {
    if (i == size || data[i] == 0) {
      fields.add(kj::heapString(reinterpret_cast<const char*>(data) + start, i - start));
      start = i + 1;
    }
  }
  kj::Vector<wire::Header> headers;
  for (size_t i = 0; i + 1 < fields.size(); i += 2) {
    headers.add(wire::Header{kj::mv(fields[i]), kj::mv(fields[i + 1])});
  }
  auto rules = size > 0 && (data[0] & 1) ? http2::HeaderRules::CLOUDFLARED_2023_7_3
                                         : http2::HeaderRules::CLOUDFLARED_2026_8_2;
  auto kind = http2::classifyRequest(headers);
  http2::requestKindName(kind);
  http2::originRequestHeaders(headers);
  http2::requestHost(headers);
  http2::shouldFlush(kind, headers, rules);
  kj::uint status = 100 + (size > 0 ? data[0] : 0) * 899 / 255;
  auto built = http2::buildResponseHeaders(status, headers, rules);
  CFQT_FUZZ_CHECK(built.size() >= 3 && built[0].name == ":status");
  for (auto& h: built) {
    if (h.name == "cf-cloudflared-response-headers") {
      CFQT_FUZZ_CHECK(http2::deserializeHeaders(h.value).is<kj::Array<wire::Header>>());
    }
  }
  return 0;
}
