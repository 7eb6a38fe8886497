// libFuzzer target: WebSocket frames from a visitor. cfqt has no frame parser of its own -- the
// front door relays frames with kj's WebSocket, the proxy passes them raw -- so this target
// drives the one place where cfqt code acts on parsed frames: the built-in --hello-world
// origin's /ws echo (messages under 1 MiB echoed, larger ones closed with 1009), fed the
// upgrade request and then the input as the visitor's frames, then EOF. kj's frame parser is
// not instrumented (Debian's libkj-http): the coverage is the echo's.

#include "fuzz/fuzz-support.h"

#include "origin/hello-world.h"

#include <kj/compat/http.h>

using namespace cfqt;

namespace {

constexpr kj::StringPtr UPGRADE =
    "GET /ws HTTP/1.1\r\nHost: fuzz\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"_kj;

kj::Promise<void> readAll(kj::AsyncIoStream& stream, kj::Array<kj::byte>& buffer) {
  return stream.tryRead(buffer.begin(), 1, buffer.size())
      .then([&stream, &buffer](size_t n) -> kj::Promise<void> {
        if (n == 0) return kj::READY_NOW;
        return readAll(stream, buffer);
      });
}

struct State {
  kj::HttpHeaderTable table;
  kj::Own<kj::HttpService> service;
  kj::HttpServer server;
  explicit State(kj::Timer& timer)
      : service(origin::newHelloWorldService(timer, table, 1 * kj::SECONDS)),
        server(timer, table, *service) {}
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto& context = fuzz::io();   // first: the static below is destroyed before it
  static State state(context.provider->getTimer());
  auto pipe = kj::newTwoWayPipe();
  auto& visitor = *pipe.ends[0];
  auto serving = state.server.listenHttp(kj::mv(pipe.ends[1])).catch_([](kj::Exception&&) {});
  auto buffer = kj::heapArray<kj::byte>(65536);
  auto reading = readAll(visitor, buffer).catch_([](kj::Exception&&) {}).eagerlyEvaluate(nullptr);
  auto input = kj::heapArray<kj::byte>(UPGRADE.size() + size);
  memcpy(input.begin(), UPGRADE.begin(), UPGRADE.size());
  if (size > 0) memcpy(input.begin() + UPGRADE.size(), data, size);
  auto writing = visitor.write(input.begin(), input.size())
      .then([&visitor]() { visitor.shutdownWrite(); })
      .catch_([](kj::Exception&&) {})
      .eagerlyEvaluate(nullptr);
  fuzz::settle(kj::mv(serving), "hello-world /ws");
  writing = nullptr;
  reading = nullptr;
  pipe.ends[0] = nullptr;
  return 0;
}
