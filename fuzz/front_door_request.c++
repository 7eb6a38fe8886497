// libFuzzer target: cfqt-edge's public front door fed the input as one visitor connection (the
// bytes, then EOF): kj::HttpServer's parser plus the front door's own checks (Content-Length
// with Transfer-Encoding, head and field limits, Host routing, Expect, WebSocket upgrades).
// Requests for fuzz.trycloudflare.localhost reach a fake tunnel connection that reads the
// ConnectRequest, answers 200 "ok" and drains the body. Everything must settle in time and no
// exception may escape (kj's HTTP parser is not instrumented: the coverage is the front door's).

#include "fuzz/fuzz-support.h"

#include "emulator/front-door.h"
#include "emulator/registry.h"

#include "wire/data-stream.h"
#include "wire/http-metadata.h"

#include <capnp/message.h>

using namespace cfqt;

namespace {

class IgnoreErrors final: public kj::TaskSet::ErrorHandler {
public:
  void taskFailed(kj::Exception&&) override {}
};

class FakeConnection final: public emulator::ClientConnection {
  // Every stream the front door opens is answered by serveStream() on the other pipe end.
public:
  explicit FakeConnection(kj::TaskSet& tasks): tasks(tasks) {}

  kj::Promise<kj::Own<kj::AsyncIoStream>> openStream() override {
    auto pipe = kj::newTwoWayPipe();
    tasks.add(serveStream(kj::mv(pipe.ends[1])));
    return kj::mv(pipe.ends[0]);
  }
  void close(uint64_t, kj::StringPtr) override {}
  void goSilent() override {}
  bool withholdCredit(kj::Maybe<int64_t>) override { return false; }
  kj::String remoteAddress() override { return kj::str("127.0.0.1:7844"); }
  kj::String describeStats() override { return kj::str("{}"); }

private:
  kj::TaskSet& tasks;

  static kj::Promise<void> drain(kj::AsyncIoStream& stream, kj::Array<kj::byte>& buffer) {
    return stream.tryRead(buffer.begin(), 1, buffer.size())
        .then([&stream, &buffer](size_t n) -> kj::Promise<void> {
          if (n == 0) return kj::READY_NOW;
          return drain(stream, buffer);
        });
  }

  static kj::Promise<void> serveStream(kj::Own<kj::AsyncIoStream> stream) {
    auto& s = *stream;
    return wire::readStreamSignature(s)
        .then([&s](wire::StreamKind) { return wire::readConnectRequest(s); })
        .then([&s](kj::Own<capnp::MessageReader>) {
          capnp::MallocMessageBuilder message;
          auto response = message.initRoot<wire::schema::ConnectResponse>();
          wire::Header headers[] = {{kj::str("Content-Length"), kj::str("2")}};
          wire::encodeResponse(response, 200, headers);
          auto bytes = wire::encodeConnectResponse(response.asReader());
          auto promise = s.write(bytes.begin(), bytes.size());
          return promise.attach(kj::mv(bytes));
        })
        .then([&s]() { return s.write("ok", 2); })
        .then([&s]() {
          s.shutdownWrite();
          auto buffer = kj::heapArray<kj::byte>(4096);
          auto promise = drain(s, buffer);
          return promise.attach(kj::mv(buffer));
        })
        .attach(kj::mv(stream));
  }
};

struct State {
  IgnoreErrors ignore;
  kj::TaskSet tasks{ignore};
  kj::HttpHeaderTable table;
  emulator::Registry registry{"trycloudflare.localhost"};
  emulator::FrontDoor door;
  FakeConnection connection{tasks};

  static emulator::FrontDoorOptions options() {
    emulator::FrontDoorOptions o;
    o.openStreamTimeout = 1 * kj::SECONDS;
    o.responseHeadTimeout = 1 * kj::SECONDS;
    o.webSocketCloseGrace = 100 * kj::MILLISECONDS;
    o.headerTimeout = 1 * kj::SECONDS;
    o.pipelineTimeout = 1 * kj::SECONDS;
    o.maxRequestHeadBytes = 8192;   // small limits: the fuzzer reaches them
    o.maxHeaderFieldBytes = 2048;
    o.maxHeaderCount = 20;
    return o;
  }

  explicit State(kj::Timer& timer): door(timer, table, registry, options()) {
    auto& tunnel = registry.issueTunnel();
    tunnel.hostname = kj::str("fuzz.trycloudflare.localhost");
    emulator::RegistrationRequest request;
    request.accountTag = kj::heapString(tunnel.accountTag);
    request.tunnelSecret = kj::heapArray(tunnel.secret.asPtr());
    request.tunnelId = kj::heapArray(tunnel.idBytes.asPtr());
    request.clientId = kj::heapArray<kj::byte>(16);
    auto result = registry.registerConnection(connection, request);
    KJ_ASSERT(result.is<emulator::ConnectionRecord*>());
  }
  ~State() noexcept(false) { registry.connectionClosed(connection); }
};

kj::Promise<void> readAll(kj::AsyncIoStream& stream, kj::Array<kj::byte>& buffer) {
  return stream.tryRead(buffer.begin(), 1, buffer.size())
      .then([&stream, &buffer](size_t n) -> kj::Promise<void> {
        if (n == 0) return kj::READY_NOW;
        return readAll(stream, buffer);
      });
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto& context = fuzz::io();   // first: the static below is destroyed before it
  static State state(context.provider->getTimer());
  auto pipe = kj::newTwoWayPipe();
  auto& visitor = *pipe.ends[0];
  auto serving = state.door.serve(kj::mv(pipe.ends[1])).catch_([](kj::Exception&&) {});
  auto buffer = kj::heapArray<kj::byte>(65536);
  auto reading = readAll(visitor, buffer).catch_([](kj::Exception&&) {}).eagerlyEvaluate(nullptr);
  auto writing = visitor.write(data, size)
      .then([&visitor]() { visitor.shutdownWrite(); })
      .catch_([](kj::Exception&&) {})
      .eagerlyEvaluate(nullptr);
  fuzz::settle(kj::mv(serving), "FrontDoor::serve");
  writing = nullptr;
  reading = nullptr;
  pipe.ends[0] = nullptr;
  if (!state.tasks.isEmpty()) fuzz::settle(state.tasks.onEmpty(), "tunnel streams");
  return 0;
}
