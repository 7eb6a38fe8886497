// The hello-world origin's /ws echo over an in-memory pipe: messages under the limit come back,
// an over-limit message gets Close 1009 (and no error log: the KJ test runner fails a test that
// logs an ERROR, which is what an exception escaping the service used to produce).

#include "origin/hello-world.h"

#include <kj/async-io.h>
#include <kj/compat/http.h>
#include <kj/debug.h>
#include <kj/test.h>

namespace cfqt::origin {
namespace {

constexpr size_t LIMIT = 1 << 20;    // hello-world's MAX_ECHO_MESSAGE

class CountingEntropy final: public kj::EntropySource {
  // Mask keys for the client role (any bytes do).
public:
  void generate(kj::ArrayPtr<kj::byte> buffer) override {
    for (auto& b: buffer) b = static_cast<kj::byte>(next++ * 37 + 11);
  }

private:
  uint32_t next = 0;
};

struct Harness {
  Harness()
      : io(kj::setupAsyncIo()),
        service(newHelloWorldService(io.provider->getTimer(), table, 1 * kj::SECONDS)),
        server(io.provider->getTimer(), table, *service) {
    auto pipe = kj::newTwoWayPipe();
    serving = server.listenHttp(kj::mv(pipe.ends[0])).eagerlyEvaluate(nullptr);
    clientEnd = kj::mv(pipe.ends[1]);
    kj::HttpClientSettings settings;
    settings.entropySource = entropy;
    client = kj::newHttpClient(table, *clientEnd, settings);
  }

  kj::Own<kj::WebSocket> openWebSocket() {
    kj::HttpHeaders headers(table);
    headers.set(kj::HttpHeaderId::HOST, "hello.example");
    auto response = timeout(client->openWebSocket("/ws", headers));
    KJ_ASSERT(response.statusCode == 101, response.statusCode);
    return kj::mv(response.webSocketOrBody.get<kj::Own<kj::WebSocket>>());
  }

  template <typename T>
  T timeout(kj::Promise<T> promise) {
    return io.provider->getTimer().timeoutAfter(10 * kj::SECONDS, kj::mv(promise))
        .wait(io.waitScope);
  }

  kj::AsyncIoContext io;
  kj::HttpHeaderTable table;
  CountingEntropy entropy;
  kj::Own<kj::HttpService> service;
  kj::HttpServer server;
  kj::Own<kj::AsyncIoStream> clientEnd;
  kj::Own<kj::HttpClient> client;
  kj::Promise<void> serving = nullptr;
};

kj::Array<kj::byte> pattern(size_t size) {
  auto bytes = kj::heapArray<kj::byte>(size);
  for (size_t i = 0; i < size; i++) bytes[i] = static_cast<kj::byte>(i * 7 + (i >> 12));
  return bytes;
}

KJ_TEST("hello-world /ws echoes text and binary messages up to the limit, then closes") {
  Harness h;
  auto ws = h.openWebSocket();
  h.timeout(ws->send(kj::StringPtr("hello")));
  KJ_EXPECT(h.timeout(ws->receive()).get<kj::String>() == "hello");
  auto biggest = pattern(LIMIT - 1);
  auto sending = ws->send(biggest.asPtr());
  auto echoed = h.timeout(ws->receive(LIMIT));
  h.timeout(kj::mv(sending));
  KJ_EXPECT(echoed.get<kj::Array<kj::byte>>().asPtr() == biggest.asPtr());
  h.timeout(ws->close(1000, "bye"));
  auto closed = h.timeout(ws->receive());
  KJ_EXPECT(closed.get<kj::WebSocket::Close>().code == 1000);
  h.timeout(kj::mv(h.serving));
}

KJ_TEST("hello-world /ws answers an over-limit message with Close 1009, not an error") {
  for (size_t size: {LIMIT, 3 * LIMIT}) {
    KJ_CONTEXT(size);
    Harness h;
    auto ws = h.openWebSocket();
    auto big = pattern(size);
    // The server stops reading after the frame header, so this send never completes; it fails
    // once the server has closed the connection.
    auto sending = ws->send(big.asPtr()).then([]() { return true; },
                                              [](kj::Exception&&) { return false; });
    auto message = h.timeout(ws->receive());
    KJ_ASSERT(message.is<kj::WebSocket::Close>(), "expected a Close frame");
    auto& close = message.get<kj::WebSocket::Close>();
    KJ_EXPECT(close.code == 1009, close.code);
    KJ_EXPECT(close.reason == "message too big", close.reason);
    h.timeout(kj::mv(h.serving));           // the service ended without an exception
    KJ_EXPECT(!h.timeout(kj::mv(sending)));
  }
}

KJ_TEST("hello-world /ws: a fragmented message that outgrows the limit also gets 1009") {
  Harness h;
  auto ws = h.openWebSocket();
  // Two raw masked binary fragments of 600 KiB each (mask key 0): 1.2 MiB in total.
  constexpr size_t PART = 600 * 1024;
  auto frame = [](bool first, bool fin) {
    auto header = kj::heapArray<kj::byte>(14);
    header[0] = static_cast<kj::byte>((fin ? 0x80 : 0) | (first ? 0x2 : 0x0));
    header[1] = 0x80 | 127;
    for (int i = 0; i < 8; i++) {
      header[2 + i] = static_cast<kj::byte>(uint64_t(PART) >> (56 - 8 * i));
    }
    for (int i = 0; i < 4; i++) header[10 + i] = 0;
    return header;
  };
  auto payload = pattern(PART);
  auto first = frame(true, false);
  h.timeout(h.clientEnd->write(first.begin(), first.size()));
  h.timeout(h.clientEnd->write(payload.begin(), payload.size()));
  auto second = frame(false, true);
  auto sending = h.clientEnd->write(second.begin(), second.size())
      .then([&]() { return h.clientEnd->write(payload.begin(), payload.size()); })
      .then([]() { return true; }, [](kj::Exception&&) { return false; });
  auto message = h.timeout(ws->receive());
  KJ_ASSERT(message.is<kj::WebSocket::Close>(), "expected a Close frame");
  KJ_EXPECT(message.get<kj::WebSocket::Close>().code == 1009);
  h.timeout(kj::mv(h.serving));
  KJ_EXPECT(!h.timeout(kj::mv(sending)));
}

}  // namespace
}  // namespace cfqt::origin
