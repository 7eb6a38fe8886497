// libFuzzer target: a data stream as the tunnel client receives it from the edge -- the
// preamble (signature, version) and the ConnectRequest -- through the synchronous decoder and
// the asynchronous reader the client uses (readStreamSignature + readConnectRequest), then the
// HTTP mapping of the metadata (decodeRequest). Both readers must agree; a decoded head must be
// acceptable to kj::HttpHeaders and survive a re-encode.

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
  KJ_SWITCH_ONEOF(wire::decodeConnectRequest(bytes)) {
    KJ_CASE_ONEOF(decoded, wire::DecodedPreamble) {
      syncDecoded = true;
      CFQT_FUZZ_CHECK(decoded.consumed <= size);
      auto root = decoded.message->getRoot<wire::schema::ConnectRequest>();
      KJ_SWITCH_ONEOF(wire::decodeRequest(root)) {
        KJ_CASE_ONEOF(head, wire::HttpRequestHead) { checkHead(head); }
        KJ_CASE_ONEOF(error, wire::WireError) {}
      }
    }
    KJ_CASE_ONEOF(error, wire::WireError) {
      CFQT_FUZZ_CHECK(wire::wireErrorCode(error.toException()) == error.code);
    }
  }

  // The client's asynchronous path, fed in pieces of 1..8 bytes (picked by the input's size).
  cfqt::fuzz::MemoryInput in(bytes, 1 + size % 8);
  bool asyncDecoded = false;
  auto reading = wire::readStreamSignature(in)
      .then([&in](wire::StreamKind kind) -> kj::Promise<void> {
        if (kind != wire::StreamKind::DATA) return kj::READY_NOW;
        return wire::readConnectRequest(in).then([](kj::Own<capnp::MessageReader> message) {
          auto head = wire::decodeRequest(message->getRoot<wire::schema::ConnectRequest>());
          KJ_IF_MAYBE(h, head.tryGet<wire::HttpRequestHead>()) checkHead(*h);
        });
      }).then([&asyncDecoded]() { asyncDecoded = true; }, [](kj::Exception&&) {});
  cfqt::fuzz::settle(kj::mv(reading), "readConnectRequest");
  if (syncDecoded) CFQT_FUZZ_CHECK(asyncDecoded);
  return 0;
}
