// libFuzzer target: the HTTP mapping of data-stream metadata (decodeRequest, decodeResponse) on
// metadata lists built from the input, so that the fuzzer works on keys and values directly
// instead of on capnp framing. Input: fields separated by NUL; the first is the dest URL, then
// key/value pairs ("HttpMethod", "HttpHost", "HttpHeader:Name", "HttpStatus", ...). The first
// byte also picks the ConnectionType.

#include "fuzz/wire-checks.h"

using namespace cfqt;
using cfqt::fuzz::checkHead;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  kj::Vector<kj::String> fields;
  size_t start = 0;
  for (size_t i = 0; i <= size; i++) {
    if (i == size || data[i] == 0) {
      fields.add(kj::heapString(reinterpret_cast<const char*>(data) + start, i - start));
      start = i + 1;
    }
  }
  size_t pairs = (fields.size() - 1) / 2;
  {
    capnp::MallocMessageBuilder message;
    auto request = message.initRoot<wire::schema::ConnectRequest>();
    request.setDest(fields[0]);
    request.setType(size > 0 && (data[0] & 1) ? wire::schema::ConnectionType::WEBSOCKET
                                              : wire::schema::ConnectionType::HTTP);
    auto metadata = request.initMetadata(pairs);
    for (size_t i = 0; i < pairs; i++) {
      metadata[i].setKey(fields[1 + 2 * i]);
      metadata[i].setVal(fields[2 + 2 * i]);
    }
    auto decoded = wire::decodeRequest(request.asReader());
    KJ_IF_MAYBE(head, decoded.tryGet<wire::HttpRequestHead>()) {
      checkHead(*head);
    }
  }
  {
    capnp::MallocMessageBuilder message;
    auto response = message.initRoot<wire::schema::ConnectResponse>();
    if (fields[0].size() > 0 && fields[0][0] == '!') response.setError(fields[0].slice(1));
    auto metadata = response.initMetadata(pairs);
    for (size_t i = 0; i < pairs; i++) {
      metadata[i].setKey(fields[1 + 2 * i]);
      metadata[i].setVal(fields[2 + 2 * i]);
    }
    auto decoded = wire::decodeResponse(response.asReader());
    KJ_IF_MAYBE(head, decoded.tryGet<wire::HttpResponseHead>()) {
      checkHead(*head);
    }
  }
  return 0;
}
