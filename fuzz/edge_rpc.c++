// libFuzzer target: an edge-opened RPC stream as the tunnel client serves it (after the RPC
// signature): serveCloudflaredRpc() over an in-memory pipe, fed the input as the edge's calls
// (updateConfiguration, registerUdpSession, unregisterUdpSession), then EOF. The session must
// end once the edge's side ended. Also the input as one configuration JSON document for
// RemoteConfigState::update (what an updateConfiguration call carries).
//
// Debian's libcapnp is not instrumented: coverage guidance comes from cfqt's own code.

#include "fuzz/fuzz-support.h"

#include "wire/control.h"

#include <capnp/serialize-async.h>

using namespace cfqt;

namespace {

kj::Promise<void> drain(kj::AsyncIoStream& stream) {
  return capnp::tryReadMessage(stream).then(
      [&stream](kj::Maybe<kj::Own<capnp::MessageReader>> message) -> kj::Promise<void> {
        if (message == nullptr) return kj::READY_NOW;
        return drain(stream);
      });
}

class Handler final: public wire::ConfigurationHandler {
public:
  kj::Maybe<kj::String> applyConfiguration(int32_t, kj::ArrayPtr<const kj::byte>) override {
    return nullptr;
  }
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  cfqt::fuzz::io();   // the event loop exists before any promise
  auto bytes = kj::arrayPtr(data, size);
  Handler handler;
  {
    wire::RemoteConfigState config(handler);
    auto& timer = fuzz::io().provider->getTimer();
    auto pipe = kj::newTwoWayPipe();
    wire::ServeRpcOptions options;
    options.timer = timer;
    options.maxDuration = 4 * fuzz::GUARD;   // the EOF must end it long before
    auto serving = wire::serveCloudflaredRpc(*pipe.ends[1], config, options)
        .catch_([](kj::Exception&&) {}).fork();
    auto& edge = *pipe.ends[0];
    auto reading = drain(edge).catch_([](kj::Exception&&) {}).eagerlyEvaluate(nullptr);
    {
      auto write = edge.write(bytes.begin(), bytes.size()).catch_([](kj::Exception&&) {});
      if (write.poll(fuzz::io().waitScope)) write.wait(fuzz::io().waitScope);
    }
    edge.shutdownWrite();
    auto start = timer.now();
    fuzz::settle(serving.addBranch(), "serveCloudflaredRpc");
    CFQT_FUZZ_CHECK(timer.now() - start < fuzz::GUARD);   // ended by the EOF, not the timer
    pipe.ends[1] = nullptr;
    fuzz::settle(kj::mv(reading), "edge read loop");
  }
  {
    wire::RemoteConfigState config(handler);
    auto result = config.update(1, bytes);
    CFQT_FUZZ_CHECK(result.latestAppliedVersion == config.currentVersion());
  }
  return 0;
}
