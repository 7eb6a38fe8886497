// libFuzzer target: the ConnectResponse as the edge (cfqt-edge) receives it from a tunnel client:
// the synchronous decoder and the emulator's asynchronous reader (readConnectResponse), then the
// HTTP mapping (decodeResponse). Both readers must agree; a decoded head must be acceptable to
// kj::HttpHeaders.

#include "fuzz/wire-checks.h"

#include "wire/data-stream.h"
#include "wire/http-metadata.h"
#include "wire/wire-error.h"

#include <kj/compat/http.h>

using namespace cfqt;
using cfqt::fuzz::checkHead;


extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  cfqt::fuzz::io();   // the event loop exists before any promise
  auto bytes = kj::arrayPtr(data, size);
  bool syncDecoded = false;
  KJ_SWITCH_ONEOF(wire::decodeConnectResponse(bytes)) {
    KJ_CASE_ONEOF(decoded, wire::DecodedPreamble) {
      syncDecoded = true;
      CFQT_FUZZ_CHECK(decoded.consumed <= size);
      auto head = wire::decodeResponse(decoded.message->getRoot<wire::schema::ConnectResponse>());
      KJ_IF_MAYBE(h, head.tryGet<wire::HttpResponseHead>()) checkHead(*h);
    }
    KJ_CASE_ONEOF(error, wire::WireError) {
      CFQT_FUZZ_CHECK(wire::wireErrorCode(error.toException()) == error.code);
    }
  }
  cfqt::fuzz::MemoryInput in(bytes, 1 + size % 8);
  bool asyncDecoded = false;
  auto reading = wire::readConnectResponse(in)
      .then([&asyncDecoded](kj::Own<capnp::MessageReader> message) {
        asyncDecoded = true;
        auto head = wire::decodeResponse(message->getRoot<wire::schema::ConnectResponse>());
        KJ_IF_MAYBE(h, head.tryGet<wire::HttpResponseHead>()) checkHead(*h);
      }, [](kj::Exception&&) {});
  cfqt::fuzz::settle(kj::mv(reading), "readConnectResponse");
  CFQT_FUZZ_CHECK(syncDecoded == asyncDecoded);
  return 0;
}
