// libFuzzer target: the control stream as the tunnel client reads it -- the edge's bytes after
// registerConnection() was called: ControlClient over an in-memory pipe, fed the input as the
// edge->client stream (then EOF). Also the input read directly as one RPC message through
// capnp's FlatArrayMessageReader and, when it is a Return, its results as the registration
// response cfqt decodes.
//
// Debian's libcapnp (RPC, serialization) is not instrumented: coverage guidance comes from
// cfqt's own code (ControlClient, the registration response decoder), and capnp itself is only
// exercised, not explored.

#include "fuzz/fuzz-support.h"

#include "wire/control.h"

#include <capnp/rpc.capnp.h>
#include <capnp/serialize-async.h>

using namespace cfqt;

namespace {

wire::RegistrationParams sampleParams() {
  wire::RegistrationParams params;
  params.accountTag = kj::str("0123456789abcdef0123456789abcdef");
  params.tunnelSecret = kj::heapArray<kj::byte>(32);
  params.tunnelId = kj::heapArray<kj::byte>(16);
  params.clientId = kj::heapArray<kj::byte>(16);
  params.version = kj::str("2023.7.3");
  params.arch = kj::str("linux_amd64");
  params.originLocalIp = kj::heapArray<kj::byte>(16);
  return params;
}

kj::Promise<void> drain(kj::AsyncIoStream& stream) {
  // The edge's end reads (and drops) what the client sends, until EOF or an error.
  return capnp::tryReadMessage(stream).then(
      [&stream](kj::Maybe<kj::Own<capnp::MessageReader>> message) -> kj::Promise<void> {
        if (message == nullptr) return kj::READY_NOW;
        return drain(stream);
      });
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  cfqt::fuzz::io();   // the event loop exists before any promise
  auto bytes = kj::arrayPtr(data, size);
  // 1. The whole client over a pipe.
  {
    auto& timer = fuzz::io().provider->getTimer();
    auto pipe = kj::newTwoWayPipe();
    wire::ControlClientOptions options;
    options.callTimeout = 200 * kj::MILLISECONDS;
    auto client = kj::heap<wire::ControlClient>(*pipe.ends[0], timer, options);
    auto& edge = *pipe.ends[1];
    auto reading = drain(edge).catch_([](kj::Exception&&) {}).eagerlyEvaluate(nullptr);
    auto registration = client->registerConnection(sampleParams());
    auto writing = edge.write(bytes.begin(), bytes.size())
        .then([&edge]() { edge.shutdownWrite(); })
        .eagerlyEvaluate([](kj::Exception&&) {});
    fuzz::settle(kj::mv(registration), "registerConnection");
    fuzz::settle(client->onDisconnect(), "onDisconnect");
    client = nullptr;
    pipe.ends[0] = nullptr;
    fuzz::settle(kj::mv(reading), "edge read loop");
  }
  // 2. One message, read directly.
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
    auto reader = fuzz::flatReader(bytes);
    auto message = reader->getRoot<capnp::rpc::Message>();
    if (message.isReturn() && message.getReturn().isResults()) {
      auto content = message.getReturn().getResults().getContent();
      auto results = content.getAs<wire::schema::RegistrationServer::RegisterConnectionResults>();
      wire::decodeRegistrationResponse(results.getResult());
    }
  })) {
    // capnp refused the bytes (bounds, traversal limit): fine, as long as it is an exception.
  }
  return 0;
}
