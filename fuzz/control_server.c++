// libFuzzer target: the control stream as the edge (cfqt-edge) reads it from a tunnel client:
// ControlServer over an in-memory pipe, fed the input as the client->edge stream (then EOF).
// Also the input read directly as one RPC message through capnp's FlatArrayMessageReader and,
// when it is a Call, its params as the registration request the emulator decodes
// (RegistrationParams::readFrom).
//
// Debian's libcapnp (RPC, serialization) is not instrumented: coverage guidance comes from
// cfqt's own code, and capnp itself is only exercised, not explored.

#include "fuzz/fuzz-support.h"

#include "wire/control.h"

#include <capnp/rpc.capnp.h>
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

struct Observer final: public wire::ControlObserver {
  void registered(const wire::RegistrationParams&, const wire::RegistrationResult&) override {}
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  cfqt::fuzz::io();   // the event loop exists before any promise
  auto bytes = kj::arrayPtr(data, size);
  {
    wire::FixedRegistrationPolicy policy(
        wire::ConnectionDetails{kj::heapArray<kj::byte>(16), kj::str("FUZ"), false});
    Observer observer;
    auto pipe = kj::newTwoWayPipe();
    auto server = kj::heap<wire::ControlServer>(*pipe.ends[1], policy, observer);
    auto& client = *pipe.ends[0];
    auto reading = drain(client).catch_([](kj::Exception&&) {}).eagerlyEvaluate(nullptr);
    {
      auto write = client.write(bytes.begin(), bytes.size()).catch_([](kj::Exception&&) {});
      // The server stops reading once it aborted: a write it never takes is not a hang.
      if (write.poll(fuzz::io().waitScope)) write.wait(fuzz::io().waitScope);
    }
    client.shutdownWrite();
    fuzz::settle(server->onDisconnect(), "onDisconnect");
    server = nullptr;
    pipe.ends[1] = nullptr;
    fuzz::settle(kj::mv(reading), "client read loop");
  }
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
    auto reader = fuzz::flatReader(bytes);
    auto message = reader->getRoot<capnp::rpc::Message>();
    if (message.isCall()) {
      auto content = message.getCall().getParams().getContent();
      wire::RegistrationParams::readFrom(
          content.getAs<wire::schema::RegistrationServer::RegisterConnectionParams>());
    }
  })) {
    // capnp refused the bytes: fine, as long as it is an exception.
  }
  return 0;
}
