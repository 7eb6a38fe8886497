// libFuzzer target: the origin's HTTP/1.1 response as cfqt's proxy parses it. Origin::serveStream()
// runs one request (GET, HEAD, or a WebSocket upgrade: picked by the first input byte) against a
// scripted in-memory origin that answers the rest of the input, then ends its side. Whatever
// serveStream() does must settle in time, and whatever reached the edge must start with a
// well-formed ConnectResponse. (The harness is the one of src/origin/fuzz-test.c++.)

#include "fuzz/fuzz-support.h"

#include "origin/origin.h"

#include "wire/data-stream.h"
#include "wire/http-metadata.h"

#include <capnp/message.h>
#include <kj/compat/http.h>

namespace cfqt::origin {
namespace {

class ScriptedOrigin {
public:
  kj::Array<kj::byte> response;
  size_t connections = 0;
  kj::Vector<kj::String> requestHeads;  // what the origin received up to the blank line
  kj::Own<kj::TaskSet> tasks;

  explicit ScriptedOrigin(kj::TaskSet::ErrorHandler& handler)
      : tasks(kj::heap<kj::TaskSet>(handler)) {}

  kj::Own<kj::AsyncIoStream> connect() {
    connections++;
    auto pipe = kj::newTwoWayPipe();
    auto bytes = kj::heapArray(response.asPtr());
    tasks->add(serve(kj::mv(pipe.ends[1]), kj::mv(bytes)));
    return kj::mv(pipe.ends[0]);
  }

private:
  struct Session {
    kj::Own<kj::AsyncIoStream> stream;
    kj::Array<kj::byte> response;
    kj::Vector<kj::byte> request;
    kj::byte buffer[4096];
  };

  static bool headComplete(const kj::Vector<kj::byte>& bytes) {
    for (size_t i = 3; i < bytes.size(); i++) {
      if (bytes[i - 3] == '\r' && bytes[i - 2] == '\n' && bytes[i - 1] == '\r' &&
          bytes[i] == '\n') {
        return true;
      }
    }
    return false;
  }

  static kj::Maybe<size_t> headEnd(const kj::Vector<kj::byte>& bytes) {
    for (size_t i = 3; i < bytes.size(); i++) {
      if (bytes[i - 3] == '\r' && bytes[i - 2] == '\n' && bytes[i - 1] == '\r' &&
          bytes[i] == '\n') {
        return i + 1;
      }
    }
    return nullptr;
  }

  static kj::Promise<void> readHead(Session& s) {
    return s.stream->tryRead(s.buffer, 1, sizeof(s.buffer)).then([&s](size_t n) -> kj::Promise<void> {
      if (n == 0) return kj::READY_NOW;
      s.request.addAll(kj::arrayPtr(s.buffer, n));
      if (headComplete(s.request)) return kj::READY_NOW;
      return readHead(s);
    });
  }

  static kj::Promise<void> drain(Session& s) {
    return s.stream->tryRead(s.buffer, 1, sizeof(s.buffer)).then([&s](size_t n) -> kj::Promise<void> {
      if (n == 0) return kj::READY_NOW;
      return drain(s);
    });
  }

  kj::Promise<void> serve(kj::Own<kj::AsyncIoStream> stream, kj::Array<kj::byte> response) {
    auto session = kj::heap<Session>();
    session->stream = kj::mv(stream);
    session->response = kj::mv(response);
    auto& s = *session;
    return readHead(s)
        .then([this, &s]() {
          KJ_IF_MAYBE(end, headEnd(s.request)) {
            requestHeads.add(kj::heapString(s.request.asPtr().slice(0, *end).asChars()));
          }
          return s.stream->write(s.response.begin(), s.response.size());
        })
        .then([&s]() {
          s.stream->shutdownWrite();
          return drain(s);
        })
        .catch_([](kj::Exception&&) {})  // the client may close first: fine
        .attach(kj::mv(session));
  }
};

class FakeAddress final: public kj::NetworkAddress {
public:
  explicit FakeAddress(ScriptedOrigin& origin): origin(origin) {}
  kj::Promise<kj::Own<kj::AsyncIoStream>> connect() override { return origin.connect(); }
  kj::Own<kj::ConnectionReceiver> listen() override { KJ_UNIMPLEMENTED("fake"); }
  kj::Own<kj::NetworkAddress> clone() override { return kj::heap<FakeAddress>(origin); }
  kj::String toString() override { return kj::str("fake-origin"); }

private:
  ScriptedOrigin& origin;
};

class FakeNetwork final: public kj::Network {
public:
  explicit FakeNetwork(ScriptedOrigin& origin): origin(origin) {}
  kj::Promise<kj::Own<kj::NetworkAddress>> parseAddress(kj::StringPtr addr,
                                                        kj::uint portHint) override {
    return kj::Own<kj::NetworkAddress>(kj::heap<FakeAddress>(origin));
  }
  kj::Own<kj::NetworkAddress> getSockaddr(const void* sockaddr, kj::uint len) override {
    KJ_UNIMPLEMENTED("fake");
  }
  kj::Own<kj::Network> restrictPeers(kj::ArrayPtr<const kj::StringPtr> allow,
                                     kj::ArrayPtr<const kj::StringPtr> deny) override {
    KJ_UNIMPLEMENTED("fake");
  }

private:
  ScriptedOrigin& origin;
};

class IgnoreErrors final: public kj::TaskSet::ErrorHandler {
public:
  void taskFailed(kj::Exception&& exception) override {}
};

struct Harness {
  kj::AsyncIoContext& io;
  kj::HttpHeaderTable& table;
  IgnoreErrors ignore;
  ScriptedOrigin scripted{ignore};
  FakeNetwork network{scripted};
  kj::Own<Origin> origin;
  size_t decodedHeads = 0;   // the edge got an HTTP status
  size_t errorAnswers = 0;   // the edge got ConnectResponse.error
  size_t resets = 0;         // serveStream() rejected

  Harness(kj::AsyncIoContext& io, kj::HttpHeaderTable& table): io(io), table(table) {
    OriginConfig config;
    config.kind = OriginKind::HTTP;
    config.host = kj::str("origin.fuzz");
    config.port = 8080;
    config.keepAliveTimeout = 0 * kj::SECONDS;  // no pooling: every case is independent
    config.connectTimeout = 1 * kj::SECONDS;
    auto created = Origin::create(kj::mv(config), io.provider->getTimer(), network, table);
    KJ_IF_MAYBE(error, created.tryGet<kj::String>()) KJ_FAIL_ASSERT(*error);
    origin = kj::mv(created.get<kj::Own<Origin>>());
  }

  static kj::Promise<void> readAll(kj::AsyncInputStream& in, kj::Vector<kj::byte>& out) {
    auto buffer = kj::heapArray<kj::byte>(4096);
    auto ptr = buffer.begin();
    return in.tryRead(ptr, 1, 4096).then(
        [&in, &out, buffer = kj::mv(buffer)](size_t n) -> kj::Promise<void> {
          if (n == 0) return kj::READY_NOW;
          out.addAll(buffer.slice(0, n));
          return readAll(in, out);
        });
  }

  void run(kj::ArrayPtr<const kj::byte> response, kj::StringPtr method) {
    capnp::MallocMessageBuilder message;
    auto request = message.initRoot<wire::schema::ConnectRequest>();
    wire::encodeRequest(request, "http://origin.fuzz/path", wire::schema::ConnectionType::HTTP,
                        method, "origin.fuzz", nullptr);
    run(response, request.asReader());
  }

  void run(kj::ArrayPtr<const kj::byte> response,
           wire::schema::ConnectRequest::Reader request) {
    auto& timer = io.provider->getTimer();
    scripted.response = kj::heapArray(response);
    auto pipe = kj::newTwoWayPipe();
    kj::Vector<kj::byte> received;
    auto reading = readAll(*pipe.ends[1], received)
        .catch_([](kj::Exception&&) {})  // reset after the head: what we got is what we check
        .eagerlyEvaluate(nullptr);
    pipe.ends[1]->shutdownWrite();  // GET/HEAD: no request body
    bool rejected = false;
    bool hung = false;
    timer.timeoutAfter(fuzz::GUARD, origin->serveStream(*pipe.ends[0], request))
        .catch_([&](kj::Exception&& e) {
          if (e.getDescription() == "operation timed out"_kj) hung = true;
          rejected = true;
        })
        .wait(io.waitScope);
    KJ_ASSERT(!hung, "serveStream() hung");
    if (rejected) {
      resets++;
      pipe.ends[0] = nullptr;  // the caller resets the stream
    }
    hung = false;
    timer.timeoutAfter(fuzz::GUARD, kj::mv(reading))
        .catch_([&](kj::Exception&&) { hung = true; })
        .wait(io.waitScope);
    KJ_ASSERT(!hung, "the edge side never ended");

    // Whatever reached the edge starts with a complete, valid ConnectResponse.
    if (received.size() == 0) {
      KJ_ASSERT(rejected, "resolved without writing a ConnectResponse");
      return;
    }
    auto decoded = wire::decodeConnectResponse(received);
    KJ_IF_MAYBE(error, decoded.tryGet<wire::WireError>()) {
      KJ_FAIL_ASSERT("the edge got a malformed ConnectResponse", error->toString());
    }
    auto root = decoded.get<wire::DecodedPreamble>().message->getRoot<
        wire::schema::ConnectResponse>();
    auto head = wire::decodeResponse(root);
    KJ_IF_MAYBE(error, head.tryGet<wire::WireError>()) {
      KJ_FAIL_ASSERT("the edge got undecodable response metadata", error->toString());
    }
    if (head.get<wire::HttpResponseHead>().error == nullptr) {
      decodedHeads++;
    } else {
      errorAnswers++;
      CFQT_FUZZ_CHECK(!rejected);
    }
  }
};


}  // namespace
}  // namespace cfqt::origin

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace cfqt;
  if (size == 0) return 0;
  auto& context = fuzz::io();   // first: the statics below are destroyed before it
  static kj::HttpHeaderTable table;
  static origin::Harness harness(context, table);
  auto response = kj::arrayPtr(data + 1, size - 1);
  switch (data[0] % 4) {
    case 0:
    case 1: harness.run(response, "GET"); break;
    case 2: harness.run(response, "HEAD"); break;
    default: {
      capnp::MallocMessageBuilder message;
      auto request = message.initRoot<wire::schema::ConnectRequest>();
      wire::Header headers[] = {{kj::str("Sec-WebSocket-Key"), kj::str("dGhlIHNhbXBsZSBub25jZQ==")},
                                {kj::str("Sec-WebSocket-Version"), kj::str("13")}};
      wire::encodeRequest(request, "http://origin.fuzz/ws", wire::schema::ConnectionType::WEBSOCKET,
                          "GET", "origin.fuzz", headers);
      harness.run(response, request.asReader());
    }
  }
  return 0;
}
