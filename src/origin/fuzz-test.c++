// Robustness of the origin's own HTTP/1.1 client against a hostile origin: Origin::serveStream()
// over an in-memory network whose "origin" answers mutated response heads and bodies (fixed,
// chunked with extensions and trailers, until-EOF, interim 1xx, 101 to a plain request). Every
// case must end with serveStream() settled (resolved or rejected), never an assertion, crash,
// sanitizer report or hang; and whatever reached the edge must be a well-formed ConnectResponse.
// Also: mutated 101 answers to WebSocket requests, and random request metadata from the edge.

#include "origin/origin.h"

#include "wire/data-stream.h"
#include "wire/fuzz-mutator.h"
#include "wire/http-metadata.h"

#include <capnp/message.h>
#include <kj/async-io.h>
#include <kj/compat/http.h>
#include <kj/test.h>

namespace cfqt::origin {
namespace {

using fuzz::Rng;

constexpr kj::Duration GUARD = 2 * kj::SECONDS;  // per await; reached only by a hang (a bug)

// ---------------------------------------------------------------------------------------------
// An in-memory network with one scripted origin: every connect() is a pipe whose far end reads
// the request head, writes `response`, then ends its side (FIN) and drains until the client
// closes.

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

// ---------------------------------------------------------------------------------------------

constexpr kj::StringPtr SEEDS[] = {
    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"_kj,
    "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: b\r\n\r\n"
    "5;ext=1\r\nhello\r\nA\r\n0123456789\r\n0\r\nTrailer: x\r\n\r\n"_kj,
    "HTTP/1.0 404 Not Found\r\nServer: x\r\n\r\nbody until eof"_kj,
    "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\nSet-Cookie: a=b\r\n"
    "Set-Cookie: c=d\r\n\r\n"_kj,
    "HTTP/1.1 301 Moved\r\nLocation: /x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"_kj,
    "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"_kj,
    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"_kj,
    "\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Folded: a\r\n b\r\n\r\nok"_kj,
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
    timer.timeoutAfter(GUARD, origin->serveStream(*pipe.ends[0], request))
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
    timer.timeoutAfter(GUARD, kj::mv(reading))
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
      KJ_EXPECT(!rejected);
    }
  }
};

KJ_TEST("fuzz: origin response parsing, every truncation of the seed responses") {
  auto io = kj::setupAsyncIo();
  kj::HttpHeaderTable table;
  Harness harness(io, table);
  for (auto seed: SEEDS) {
    KJ_CONTEXT(seed);
    for (size_t len = 0; len <= seed.size(); len++) {
      KJ_CONTEXT(len);
      harness.run(seed.asBytes().slice(0, len), "GET");
    }
  }
  KJ_EXPECT(harness.decodedHeads > 50, harness.decodedHeads);
  KJ_EXPECT(harness.errorAnswers > 100, harness.errorAnswers);
  KJ_EXPECT(harness.resets > 10, harness.resets);
}

KJ_TEST("fuzz: origin response parsing, mutated responses") {
  auto io = kj::setupAsyncIo();
  kj::HttpHeaderTable table;
  Harness harness(io, table);
  Rng rng(0x0A161201);
  for (auto seed: SEEDS) {
    KJ_CONTEXT(seed);
    for (size_t i = 0; i < 250; i++) {
      KJ_CONTEXT(i);
      auto response = fuzz::mutate(rng, seed.asBytes(), seed.size());
      harness.run(response, rng.chance(8) ? "HEAD"_kj : "GET"_kj);
    }
  }
  KJ_EXPECT(harness.decodedHeads > 200, harness.decodedHeads);
  KJ_EXPECT(harness.errorAnswers > 200, harness.errorAnswers);
  KJ_EXPECT(harness.scripted.connections == sizeof(SEEDS) / sizeof(SEEDS[0]) * 250);

  // WebSocket requests: the origin's 101 (mutated) switches to raw pass-through, or fails.
  auto upgrade = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                 "Connection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
                 "\r\n\x81\x05hello"_kj;
  size_t headsBefore = harness.decodedHeads;
  for (size_t i = 0; i < 300; i++) {
    KJ_CONTEXT(i);
    capnp::MallocMessageBuilder message;
    auto request = message.initRoot<wire::schema::ConnectRequest>();
    wire::Header headers[] = {{kj::str("Sec-WebSocket-Key"), kj::str("dGhlIHNhbXBsZSBub25jZQ==")},
                              {kj::str("Sec-WebSocket-Version"), kj::str("13")}};
    wire::encodeRequest(request, "http://origin.fuzz/ws", wire::schema::ConnectionType::WEBSOCKET,
                        "GET", "origin.fuzz", headers);
    auto response = i == 0 ? kj::heapArray(upgrade.asBytes())
                           : fuzz::mutate(rng, upgrade.asBytes(), upgrade.size());
    harness.run(response, request.asReader());
  }
  KJ_EXPECT(harness.decodedHeads - headsBefore > 50, harness.decodedHeads - headsBefore);
}

KJ_TEST("fuzz: origin response parsing, adversarial sizes and framing") {
  auto io = kj::setupAsyncIo();
  kj::HttpHeaderTable table;
  Harness harness(io, table);
  constexpr kj::StringPtr CASES[] = {
      "HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\nx"_kj,
      "HTTP/1.1 200 OK\r\nContent-Length: 18446744073709551615\r\n\r\nx"_kj,
      "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\nx"_kj,
      "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxy"_kj,
      "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nx"_kj,
      "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffff\r\nx"_kj,
      "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\nx"_kj,
      "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\r\n"_kj,
      "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXY0\r\n\r\n"_kj,
      "HTTP/1.1 200 OK\r\nTransfer-Encoding: ,\r\n\r\nx"_kj,
      "HTTP/1.1 200 OK\r\nTransfer-Encoding: \r\n\r\nx"_kj,
      "HTTP/1.1 0 Zero\r\n\r\n"_kj,
      "HTTP/1.1 99 Low\r\n\r\n"_kj,
      "HTTP/1.1 1000 High\r\n\r\n"_kj,
      "HTTP/1.1 4294967496 Wrap\r\nContent-Length: 0\r\n\r\n"_kj,
      "HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n"_kj,
      "HTTP/1.1  200 OK\r\n\r\n"_kj,
      "HTTP/1.1 200 OK\r\nNo-Colon\r\n\r\n"_kj,
      "HTTP/1.1 200 OK\r\n: empty-name\r\n\r\n"_kj,
      "HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n"_kj,
      "HTTP/1.1 200 OK\r\nX: a\x01" "b\x7f\r\n\r\n"_kj,
      "HTTP/1.1 200 OK\n\n"_kj,
      "HTTP/1.1 200 OK\r\n\r"_kj,
      "\n\n\n\n"_kj,
      "HTTP/1.1 100 Continue\r\n\r\n"_kj,
      "HTTP/1.1 103 Early\r\nLink: </a>\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n"
      "HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nz"_kj,
      "GET / HTTP/1.1\r\nHost: x\r\n\r\n"_kj,
  };
  for (auto c: CASES) {
    KJ_CONTEXT(c);
    harness.run(c.asBytes(), "GET");
    harness.run(c.asBytes(), "HEAD");
  }
  // Heads with NUL bytes, and heads of every size around the 32 KiB head limit.
  for (size_t at: {0, 5, 9, 15, 17}) {
    auto bytes = kj::heapArray(SEEDS[0].asBytes());
    bytes[at] = 0;
    harness.run(bytes, "GET");
  }
  for (size_t size: {32 * 1024 - 40, 32 * 1024 - 30, 32 * 1024 - 20, 32 * 1024, 40 * 1024}) {
    KJ_CONTEXT(size);
    auto text = kj::str("HTTP/1.1 200 OK\r\nX-Big: ", kj::repeat('a', size - 27),
                        "\r\nContent-Length: 0\r\n\r\n");
    harness.run(text.asBytes(), "GET");
  }
  // A 100 Continue flood: each interim head is skipped; the stream must still end.
  kj::Vector<kj::byte> flood;
  for (size_t i = 0; i < 2000; i++) flood.addAll("HTTP/1.1 100 Continue\r\n\r\n"_kj.asBytes());
  harness.run(flood, "GET");
  // A chunked body whose chunk-size line never ends.
  auto longLine = kj::str("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                          kj::repeat('1', 8000));
  harness.run(longLine.asBytes(), "GET");
}

// Random request metadata from the edge (already through wire::decodeRequest's checks inside
// serveStream): the origin must either refuse it with a ConnectResponse.error or send exactly
// one well-formed request head -- no header or request-line injection.
kj::String randomText(Rng& rng) {
  static constexpr kj::StringPtr PIECES[] = {
      "HttpHeader:"_kj, "HttpMethod"_kj, "HttpHost"_kj, "Content-Length"_kj, "Transfer-Encoding"_kj,
      "chunked"_kj, "Upgrade"_kj, "websocket"_kj, "Connection"_kj, "Host"_kj, "Expect"_kj,
      "100-continue"_kj, "Sec-WebSocket-Key"_kj, "Cf-Cloudflared-Proxy-Src"_kj, ":"_kj, " "_kj,
      "\t"_kj, "\r\n"_kj, "\n"_kj, "/"_kj, "?"_kj, "#"_kj, "http://"_kj, "x.test"_kj, "0"_kj,
      "5"_kj, "+7"_kj, "GET"_kj, "post"_kj, "HEAD"_kj, "OPTIONS"_kj, "CONNECT"_kj, "\x7f"_kj,
      "\xc3\xa9"_kj};
  kj::Vector<char> out;
  size_t pieces = rng.below(4);
  for (size_t i = 0; i < pieces; i++) {
    if (rng.chance(4)) {
      char c = char(rng.byte());
      out.add(c == 0 ? 'z' : c);
    } else {
      out.addAll(PIECES[rng.below(sizeof(PIECES) / sizeof(PIECES[0]))]);
    }
  }
  out.add('\0');
  return kj::String(out.releaseAsArray());
}

KJ_TEST("fuzz: origin request building from random edge metadata") {
  auto io = kj::setupAsyncIo();
  kj::HttpHeaderTable table;
  Harness harness(io, table);
  Rng rng(0x0A161202);
  static constexpr kj::StringPtr DESTS[] = {"http://origin.fuzz/path?q=1"_kj, "/p"_kj, ""_kj,
                                            "https://h.test"_kj, "http://h/a#frag"_kj};
  auto response = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"_kj;
  for (size_t i = 0; i < 1500; i++) {
    KJ_CONTEXT(i);
    capnp::MallocMessageBuilder message;
    auto request = message.initRoot<wire::schema::ConnectRequest>();
    request.setDest(rng.chance(3) ? randomText(rng) : kj::str(DESTS[rng.below(5)]));
    request.setType(rng.chance(6) ? wire::schema::ConnectionType::WEBSOCKET
                                  : wire::schema::ConnectionType::HTTP);
    auto list = request.initMetadata(rng.below(6));
    for (auto entry: list) {
      switch (rng.below(4)) {
        case 0: entry.setKey("HttpMethod"); break;
        case 1: entry.setKey("HttpHost"); break;
        default: entry.setKey(kj::str("HttpHeader:", randomText(rng))); break;
      }
      entry.setVal(randomText(rng));
    }
    size_t before = harness.scripted.requestHeads.size();
    harness.run(response.asBytes(), request.asReader());
    if (harness.scripted.requestHeads.size() > before) {
      auto& head = harness.scripted.requestHeads.back();
      KJ_CONTEXT(head);
      // Exactly one head: it parses, and its line count matches the parsed header count.
      auto copy = kj::heapArray<char>(head.asArray());
      kj::HttpHeaders parsed(table);
      auto result = parsed.tryParseRequest(copy);
      KJ_ASSERT(result.is<kj::HttpHeaders::Request>(), "the origin got a malformed request");
      size_t lines = 0;
      for (size_t j = 1; j < head.size(); j++) {
        if (head[j - 1] == '\r' && head[j] == '\n') lines++;
      }
      size_t headers = 0;
      parsed.forEach([&](kj::StringPtr, kj::StringPtr) { headers++; });
      KJ_EXPECT(lines == headers + 2, lines, headers);  // request line + headers + blank line
    }
  }
  KJ_EXPECT(harness.scripted.requestHeads.size() > 300, harness.scripted.requestHeads.size());
  KJ_EXPECT(harness.errorAnswers > 100, harness.errorAnswers);
}

}  // namespace
}  // namespace cfqt::origin
