// Checks shared by the wire-layer fuzz targets: what a decoded request or response head must
// satisfy.

#pragma once

#include "fuzz/fuzz-support.h"

#include "wire/data-stream.h"
#include "wire/http-metadata.h"
#include "wire/wire-error.h"

#include <capnp/message.h>
#include <kj/compat/http.h>

namespace cfqt::fuzz {

inline void checkHead(const wire::HttpRequestHead& head) {
  CFQT_FUZZ_CHECK(wire::isHttpToken(head.method));
  CFQT_FUZZ_CHECK(wire::isValidHeaderValue(head.host));
  for (auto& h: head.headers) {
    CFQT_FUZZ_CHECK(wire::isHttpToken(h.name));
    CFQT_FUZZ_CHECK(wire::isValidHeaderValue(h.value));
  }
  kj::HttpHeaderTable table;
  kj::HttpHeaders headers(table);
  wire::addToHttpHeaders(head.headers, headers);
  wire::requestHasBody(head);
  // Re-encoded, the head decodes to the same thing.
  capnp::MallocMessageBuilder message;
  auto again = message.initRoot<wire::schema::ConnectRequest>();
  wire::encodeRequest(again, head);
  auto bytes = wire::encodeConnectRequest(again.asReader());
  auto redecoded = wire::decodeConnectRequest(bytes);
  CFQT_FUZZ_CHECK(redecoded.is<wire::DecodedPreamble>());
  auto head2 = wire::decodeRequest(
      redecoded.get<wire::DecodedPreamble>().message->getRoot<wire::schema::ConnectRequest>());
  CFQT_FUZZ_CHECK(head2.is<wire::HttpRequestHead>());
  auto& h2 = head2.get<wire::HttpRequestHead>();
  CFQT_FUZZ_CHECK(h2.dest == head.dest && h2.method == head.method && h2.host == head.host);
  CFQT_FUZZ_CHECK(h2.headers.size() == head.headers.size());
}

inline void checkHead(const wire::HttpResponseHead& head) {
  if (head.error == nullptr) CFQT_FUZZ_CHECK(head.status >= 100 && head.status <= 999);
  for (auto& h: head.headers) {
    CFQT_FUZZ_CHECK(wire::isHttpToken(h.name));
    CFQT_FUZZ_CHECK(wire::isValidHeaderValue(h.value));
  }
  kj::HttpHeaderTable table;
  kj::HttpHeaders headers(table);
  wire::addToHttpHeaders(head.headers, headers);
}

}  // namespace cfqt::fuzz
