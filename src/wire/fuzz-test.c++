// Robustness of the wire decoders against untrusted bytes: deterministic mutation tests seeded
// with the golden vectors of data/tunnel-wire-vectors-2023.7.3.txt. Every case must end in a
// typed error (WireError / a rejected promise) or a valid decode -- never an assertion, a crash,
// a sanitizer report or a hang (every await is bounded by a timer).
//
// Covered: the data-stream preamble (sync decoders, async readers incl. the RPC signature, with
// tight limits too), the HTTP <-> metadata mapping (decoded vectors and random metadata), the
// control stream (ControlClient fed mutated E->C transcript messages, ControlServer fed mutated
// C->E ones, both also fed random garbage), the edge-opened RPC stream (serveCloudflaredRpc fed
// mutated updateConfiguration/registerUdpSession calls) and the remote-configuration JSON.

#include "wire/control.h"
#include "wire/data-stream.h"
#include "wire/fuzz-mutator.h"
#include "wire/http-metadata.h"
#include "wire/test-vectors.h"
#include "wire/wire-error.h"

#include <capnp/message.h>
#include <capnp/rpc.capnp.h>
#include <capnp/serialize-async.h>
#include <capnp/serialize.h>
#include <kj/async-io.h>
#include <kj/compat/http.h>
#include <kj/test.h>
#include <kj/timer.h>

namespace cfqt::wire {
namespace {

using fuzz::Rng;
using testing::Direction;
using testing::TranscriptMessage;

constexpr kj::Duration GUARD = 2 * kj::SECONDS;  // per await; reached only by a hang (a bug)
constexpr kj::Duration CALL_TIMEOUT = 1 * kj::SECONDS;
// The ControlClient's call timeout. Every session here ends with EOF, so no case waits for it;
// it must only never fire while a loaded machine (the sanitizer build next to other tests) is
// still delivering the replies (50 ms did: registrations failed before their answer was read).

testing::VectorFile load() { return testing::loadVectorFile(testing::defaultVectorPath()); }

// ---------------------------------------------------------------------------------------------
// In-memory input: the bytes, then EOF; reads of random sizes (at least minBytes unless EOF).

class MemoryInput final: public kj::AsyncInputStream {
public:
  MemoryInput(kj::ArrayPtr<const kj::byte> bytes, uint64_t seed): bytes(bytes), rng(seed) {}

  kj::Promise<size_t> tryRead(void* buffer, size_t minBytes, size_t maxBytes) override {
    size_t left = bytes.size() - pos;
    size_t n = kj::min(left, minBytes + rng.below(maxBytes - minBytes + 1));
    memcpy(buffer, bytes.begin() + pos, n);
    pos += n;
    return n;
  }

  size_t position() const { return pos; }

private:
  kj::ArrayPtr<const kj::byte> bytes;
  size_t pos = 0;
  Rng rng;
};

// ---------------------------------------------------------------------------------------------
// What a decoded preamble must satisfy.

PreambleLimits randomLimits(Rng& rng) {
  PreambleLimits limits;
  if (rng.chance(4)) {
    limits.maxMessageBytes = 8 * (1 + rng.below(64));
    limits.maxSegments = 1 + rng.below(4);
    limits.traversalLimitWords = 1 + rng.below(64);
    limits.nestingLimit = int(rng.below(4));
  }
  return limits;
}

void checkRequestHead(const HttpRequestHead& head) {
  KJ_EXPECT(isHttpToken(head.method), head.method);
  KJ_EXPECT(isValidHeaderValue(head.host));
  for (auto& h: head.headers) {
    KJ_EXPECT(isHttpToken(h.name), h.name);
    KJ_EXPECT(isValidHeaderValue(h.value));
    KJ_EXPECT(h.name != HEADER_PROXY_CONNECTION_UPGRADE && h.name != HEADER_TRACE_ID);
  }
  // "decodeRequest guarantees" the headers are acceptable to kj::HttpHeaders.
  kj::HttpHeaderTable table;
  kj::HttpHeaders headers(table);
  addToHttpHeaders(head.headers, headers);
  requestHasBody(head);
}

void checkResponseHead(const HttpResponseHead& head) {
  if (head.error == nullptr) {
    KJ_EXPECT(head.status >= 100 && head.status <= 999, head.status);
  }
  for (auto& h: head.headers) {
    KJ_EXPECT(isHttpToken(h.name), h.name);
    KJ_EXPECT(isValidHeaderValue(h.value));
  }
  kj::HttpHeaderTable table;
  kj::HttpHeaders headers(table);
  addToHttpHeaders(head.headers, headers);
}

// Sync decode of `bytes` as a request and as a response; returns the request outcome (for
// comparison with the async reader): null = decoded, else the error code.
kj::Maybe<WireErrorCode> decodeBoth(kj::ArrayPtr<const kj::byte> bytes,
                                    const PreambleLimits& limits) {
  kj::Maybe<WireErrorCode> requestOutcome;
  KJ_SWITCH_ONEOF(decodeConnectRequest(bytes, limits)) {
    KJ_CASE_ONEOF(decoded, DecodedPreamble) {
      KJ_EXPECT(decoded.consumed <= bytes.size());
      KJ_EXPECT(decoded.consumed >= PREAMBLE_SIZE + 8);
      auto root = decoded.message->getRoot<schema::ConnectRequest>();
      KJ_SWITCH_ONEOF(decodeRequest(root)) {
        KJ_CASE_ONEOF(head, HttpRequestHead) {
          checkRequestHead(head);
          capnp::MallocMessageBuilder message;
          auto again = message.initRoot<schema::ConnectRequest>();
          encodeRequest(again, head);
          auto bytes = encodeConnectRequest(again.asReader());
          auto redecoded = decodeConnectRequest(bytes);
          KJ_ASSERT(redecoded.is<DecodedPreamble>());
          auto head2 = decodeRequest(redecoded.get<DecodedPreamble>()
                                         .message->getRoot<schema::ConnectRequest>());
          KJ_ASSERT(head2.is<HttpRequestHead>());
          auto& h2 = head2.get<HttpRequestHead>();
          KJ_EXPECT(h2.dest == head.dest && h2.method == head.method && h2.host == head.host);
          KJ_EXPECT(h2.headers.size() == head.headers.size());
          KJ_EXPECT(h2.contentLength == head.contentLength && h2.chunked == head.chunked);
        }
        KJ_CASE_ONEOF(error, WireError) {
          KJ_EXPECT(error.code == WireErrorCode::BAD_HEADER ||
                    error.code == WireErrorCode::BAD_METHOD ||
                    error.code == WireErrorCode::BAD_CONTENT_LENGTH, error.toString());
        }
      }
      // The re-encoded request decodes again to an equal size.
      // (Only the known fields were validated: re-encoding `root` itself could meet a bad
      // pointer in an unknown field. The decoded head round-trips, though.)
    }
    KJ_CASE_ONEOF(error, WireError) {
      KJ_EXPECT(wireErrorCode(error.toException()) == error.code);
      requestOutcome = error.code;
    }
  }
  KJ_SWITCH_ONEOF(decodeConnectResponse(bytes, limits)) {
    KJ_CASE_ONEOF(decoded, DecodedPreamble) {
      KJ_EXPECT(decoded.consumed <= bytes.size());
      auto root = decoded.message->getRoot<schema::ConnectResponse>();
      KJ_SWITCH_ONEOF(decodeResponse(root)) {
        KJ_CASE_ONEOF(head, HttpResponseHead) { checkResponseHead(head); }
        KJ_CASE_ONEOF(error, WireError) {
          KJ_EXPECT(error.code == WireErrorCode::BAD_HEADER ||
                    error.code == WireErrorCode::BAD_STATUS, error.toString());
        }
      }
    }
    KJ_CASE_ONEOF(error, WireError) {}
  }
  return requestOutcome;
}

KJ_TEST("fuzz: preamble decoders, every truncation of every vector is TRUNCATED") {
  auto file = load();
  KJ_ASSERT(file.dataStreams.size() >= 3);
  for (auto& vector: file.dataStreams) {
    KJ_CONTEXT(vector.title);
    auto& bytes = vector.bytes;
    for (size_t len = 0; len < bytes.size(); len++) {
      auto prefix = bytes.slice(0, len);
      auto request = decodeConnectRequest(prefix);
      auto response = decodeConnectResponse(prefix);
      KJ_ASSERT(request.is<WireError>() && response.is<WireError>(), len);
      KJ_EXPECT(request.get<WireError>().code == WireErrorCode::TRUNCATED, len,
                request.get<WireError>().toString());
      KJ_EXPECT(response.get<WireError>().code == WireErrorCode::TRUNCATED, len,
                response.get<WireError>().toString());
    }
    if (vector.isRequest()) {
      KJ_EXPECT(decodeConnectRequest(bytes).is<DecodedPreamble>());
    } else {
      KJ_EXPECT(decodeConnectResponse(bytes).is<DecodedPreamble>());
    }
  }
}

KJ_TEST("fuzz: preamble decoders and HTTP mapping survive mutated vectors (sync)") {
  auto file = load();
  Rng rng(0xC0FFEE01);
  size_t decoded = 0, rejected = 0;
  for (auto& vector: file.dataStreams) {
    KJ_CONTEXT(vector.title);
    for (size_t i = 0; i < 3000; i++) {
      KJ_CONTEXT(i);
      auto input = fuzz::mutate(rng, vector.bytes, PREAMBLE_SIZE);
      auto limits = randomLimits(rng);
      if (decodeBoth(input, limits) == nullptr) {
        decoded++;
      } else {
        rejected++;
      }
    }
  }
  // The mutations must reach both outcomes, or they test nothing.
  KJ_EXPECT(decoded > 100, decoded);
  KJ_EXPECT(rejected > 1000, rejected);
}

KJ_TEST("fuzz: segment table inflation is refused before allocating") {
  auto file = load();
  for (auto& vector: file.dataStreams) {
    KJ_CONTEXT(vector.title);
    for (uint32_t value: {0x7fffffffu, 0xffffffffu, 0x10000u, 0x2000u, 0x1ffu, 0x200u}) {
      // segment count
      auto bytes = kj::heapArray(vector.bytes.asPtr());
      fuzz::writeLe32(bytes.begin() + PREAMBLE_SIZE, value);
      auto result = decodeConnectRequest(bytes);
      KJ_ASSERT(result.is<WireError>());
      auto code = result.get<WireError>().code;
      KJ_EXPECT(code == WireErrorCode::MALFORMED || code == WireErrorCode::TOO_LARGE ||
                code == WireErrorCode::TRUNCATED, value, result.get<WireError>().toString());
      // first segment size
      bytes = kj::heapArray(vector.bytes.asPtr());
      fuzz::writeLe32(bytes.begin() + PREAMBLE_SIZE + 4, value);
      result = decodeConnectResponse(bytes);
      KJ_ASSERT(result.is<WireError>());
      code = result.get<WireError>().code;
      KJ_EXPECT(code == WireErrorCode::TOO_LARGE || code == WireErrorCode::TRUNCATED ||
                code == WireErrorCode::MALFORMED, value);
    }
  }
}

KJ_TEST("fuzz: async preamble readers agree with the sync decoders on mutated vectors") {
  auto io = kj::setupAsyncIo();
  auto& timer = io.provider->getTimer();
  auto file = load();
  Rng rng(0xC0FFEE02);
  size_t agreed = 0;
  for (auto& vector: file.dataStreams) {
    KJ_CONTEXT(vector.title);
    for (size_t i = 0; i < 400; i++) {
      KJ_CONTEXT(i);
      auto input = fuzz::mutate(rng, vector.bytes, PREAMBLE_SIZE);
      auto limits = randomLimits(rng);
      // Edge side: the whole preamble.
      {
        MemoryInput in(input, rng.next());
        auto sync = decodeConnectResponse(input, limits);
        auto result = timer.timeoutAfter(GUARD, readConnectResponse(in, limits))
            .then([](kj::Own<capnp::MessageReader>&& m) -> kj::Maybe<kj::Exception> {
              m->getRoot<schema::ConnectResponse>().getMetadata();
              return nullptr;
            }, [](kj::Exception&& e) -> kj::Maybe<kj::Exception> { return kj::mv(e); })
            .wait(io.waitScope);
        KJ_IF_MAYBE(e, result) {
          auto code = wireErrorCode(*e);
          KJ_ASSERT(code != nullptr, "untyped rejection", e->getDescription());
          KJ_ASSERT(sync.is<WireError>(), e->getDescription());
          KJ_EXPECT(sync.get<WireError>().code == KJ_ASSERT_NONNULL(code),
                    sync.get<WireError>().toString(), e->getDescription());
        } else {
          KJ_ASSERT(sync.is<DecodedPreamble>());
          KJ_EXPECT(in.position() == sync.get<DecodedPreamble>().consumed);
        }
        agreed++;
      }
      // Client side: signature, then the request.
      {
        MemoryInput in(input, rng.next());
        auto sync = decodeConnectRequest(input, limits);
        auto promise = readStreamSignature(in).then(
            [&in, limits](StreamKind kind) -> kj::Promise<kj::Maybe<kj::Own<capnp::MessageReader>>> {
              if (kind == StreamKind::RPC) {
                return kj::Maybe<kj::Own<capnp::MessageReader>>(nullptr);
              }
              return readConnectRequest(in, limits).then([](kj::Own<capnp::MessageReader>&& m) {
                return kj::Maybe<kj::Own<capnp::MessageReader>>(kj::mv(m));
              });
            });
        auto result = timer.timeoutAfter(GUARD, kj::mv(promise))
            .then([](kj::Maybe<kj::Own<capnp::MessageReader>>&& m)
                      -> kj::OneOf<bool, kj::Exception> {
              KJ_IF_MAYBE(message, m) {
                auto root = (*message)->getRoot<schema::ConnectRequest>();
                KJ_SWITCH_ONEOF(decodeRequest(root)) {
                  KJ_CASE_ONEOF(head, HttpRequestHead) { checkRequestHead(head); }
                  KJ_CASE_ONEOF(error, WireError) {}
                }
                return true;
              }
              return false;  // RPC stream
            }, [](kj::Exception&& e) -> kj::OneOf<bool, kj::Exception> { return kj::mv(e); })
            .wait(io.waitScope);
        KJ_SWITCH_ONEOF(result) {
          KJ_CASE_ONEOF(isData, bool) {
            if (isData) {
              KJ_ASSERT(sync.is<DecodedPreamble>());
              KJ_EXPECT(in.position() == sync.get<DecodedPreamble>().consumed);
            } else {
              KJ_EXPECT(input.slice(0, SIGNATURE_SIZE) ==
                        kj::arrayPtr(RPC_STREAM_SIGNATURE, SIGNATURE_SIZE));
              KJ_EXPECT(in.position() == SIGNATURE_SIZE);
            }
          }
          KJ_CASE_ONEOF(e, kj::Exception) {
            auto code = wireErrorCode(e);
            KJ_ASSERT(code != nullptr, "untyped rejection", e.getDescription());
            KJ_ASSERT(sync.is<WireError>(), e.getDescription());
            KJ_EXPECT(sync.get<WireError>().code == KJ_ASSERT_NONNULL(code),
                      sync.get<WireError>().toString(), e.getDescription());
          }
        }
      }
    }
  }
  KJ_EXPECT(agreed == file.dataStreams.size() * 400);
}

KJ_TEST("fuzz: random bytes after a valid signature") {
  Rng rng(0xC0FFEE03);
  for (size_t i = 0; i < 2000; i++) {
    KJ_CONTEXT(i);
    auto tail = fuzz::randomBytes(rng, 96);
    kj::Vector<kj::byte> input;
    input.addAll(kj::arrayPtr(DATA_STREAM_SIGNATURE, SIGNATURE_SIZE));
    input.addAll(kj::arrayPtr(PROTOCOL_VERSION, 2));
    // Small segment counts most of the time, so the parser gets past the table.
    if (tail.size() >= 4 && !rng.chance(4)) fuzz::writeLe32(tail.begin(), uint32_t(rng.below(3)));
    if (tail.size() >= 8 && !rng.chance(4)) {
      fuzz::writeLe32(tail.begin() + 4, uint32_t(rng.below(tail.size() / 8 + 2)));
    }
    input.addAll(tail);
    decodeBoth(input, randomLimits(rng));
  }
}

// ---------------------------------------------------------------------------------------------
// HTTP mapping with arbitrary metadata.

kj::String randomText(Rng& rng, size_t maxSize) {
  static constexpr kj::StringPtr PIECES[] = {
      "HttpHeader:"_kj, "HttpHeader"_kj, "HttpMethod"_kj, "HttpHost"_kj, "HttpStatus"_kj,
      "Content-Length"_kj, "Transfer-Encoding"_kj, "chunked"_kj, "Upgrade"_kj, "websocket"_kj,
      "Cf-Cloudflared-Proxy-Connection-Upgrade"_kj, "Cf-Trace-Id"_kj, ":"_kj, "::"_kj, " "_kj,
      "\t"_kj, "\r\n"_kj, "+"_kj, "-"_kj, "0"_kj, "200"_kj, "99999999999999999999"_kj,
      "GET"_kj, "CONNECT"_kj, "x"_kj, "\x7f"_kj, "\xc3\xa9"_kj, "\xff"_kj};
  kj::Vector<char> out;
  size_t pieces = rng.below(5);
  for (size_t i = 0; i < pieces && out.size() < maxSize; i++) {
    if (rng.chance(3)) {
      out.add(char(rng.byte()));
    } else {
      out.addAll(PIECES[rng.below(sizeof(PIECES) / sizeof(PIECES[0]))]);
    }
  }
  // No NUL inside: capnp Text ends at the first NUL anyway.
  for (auto& c: out) if (c == '\0') c = 'z';
  out.add('\0');
  return kj::String(out.releaseAsArray());
}

KJ_TEST("fuzz: decodeRequest/decodeResponse with random metadata") {
  Rng rng(0xC0FFEE04);
  size_t ok = 0;
  for (size_t i = 0; i < 4000; i++) {
    KJ_CONTEXT(i);
    capnp::MallocMessageBuilder message;
    size_t entries = rng.below(6);
    auto request = message.initRoot<schema::ConnectRequest>();
    request.setDest(randomText(rng, 32));
    request.setType(schema::ConnectionType(rng.below(5)));
    auto list = request.initMetadata(entries);
    for (auto entry: list) {
      entry.setKey(randomText(rng, 48));
      entry.setVal(randomText(rng, 48));
    }
    KJ_SWITCH_ONEOF(decodeRequest(request.asReader())) {
      KJ_CASE_ONEOF(head, HttpRequestHead) {
        checkRequestHead(head);
        ok++;
      }
      KJ_CASE_ONEOF(error, WireError) {}
    }
    capnp::MallocMessageBuilder responseMessage;
    auto response = responseMessage.initRoot<schema::ConnectResponse>();
    if (rng.chance(4)) response.setError(randomText(rng, 16));
    response.setMetadata(request.asReader().getMetadata());
    KJ_SWITCH_ONEOF(decodeResponse(response.asReader())) {
      KJ_CASE_ONEOF(head, HttpResponseHead) { checkResponseHead(head); }
      KJ_CASE_ONEOF(error, WireError) {}
    }
    auto name = randomText(rng, 24);
    auto canonical = canonicalHeaderName(name);
    KJ_EXPECT(canonical.size() == name.size());
    KJ_EXPECT(isHttpToken(canonical) == isHttpToken(name));
  }
  KJ_EXPECT(ok > 100, ok);
}

// ---------------------------------------------------------------------------------------------
// Control stream.

kj::Own<capnp::MessageReader> readerOf(kj::ArrayPtr<const kj::byte> bytes) {
  auto words = kj::heapArray<capnp::word>(bytes.size() / sizeof(capnp::word));
  memcpy(words.begin(), bytes.begin(), words.size() * sizeof(capnp::word));
  kj::ArrayPtr<const capnp::word> view = words;
  return kj::heap<capnp::FlatArrayMessageReader>(view).attach(kj::mv(words));
}

kj::Array<kj::byte> withAnswerId(kj::ArrayPtr<const kj::byte> bytes, uint32_t answerId) {
  auto reader = readerOf(bytes);
  capnp::MallocMessageBuilder builder;
  builder.setRoot(reader->getRoot<capnp::rpc::Message>());
  builder.getRoot<capnp::rpc::Message>().getReturn().setAnswerId(answerId);
  auto words = capnp::messageToFlatArray(builder);
  return kj::heapArray<kj::byte>(words.asBytes());
}

kj::Array<const TranscriptMessage*> messagesOf(const testing::ControlTranscript& transcript,
                                               Direction direction) {
  kj::Vector<const TranscriptMessage*> out;
  for (auto& m: transcript.messages) {
    if (m.direction == direction) out.add(&m);
  }
  return out.releaseAsArray();
}

RegistrationParams sampleParams() {
  RegistrationParams params;
  params.accountTag = kj::str("0123456789abcdef0123456789abcdef");
  params.tunnelSecret = kj::heapArray<kj::byte>(16);
  params.tunnelId = kj::heapArray<kj::byte>(16);
  params.clientId = kj::heapArray<kj::byte>(16);
  params.version = kj::str("2023.7.3");
  params.arch = kj::str("linux_amd64");
  params.originLocalIp = kj::heapArray<kj::byte>(16);
  return params;
}

// The edge's end of a control stream: records the question ids the client uses and discards
// everything else, until EOF or an error.
struct EdgeEnd {
  kj::AsyncIoStream& stream;
  uint32_t bootstrapQuestion = 0;
  uint32_t lastCallQuestion = 0;
  size_t messages = 0;

  kj::Promise<void> readLoop() {
    return capnp::tryReadMessage(stream).then(
        [this](kj::Maybe<kj::Own<capnp::MessageReader>> message) -> kj::Promise<void> {
          KJ_IF_MAYBE(m, message) {
            messages++;
            auto root = (*m)->getRoot<capnp::rpc::Message>();
            if (root.isBootstrap()) bootstrapQuestion = root.getBootstrap().getQuestionId();
            if (root.isCall()) lastCallQuestion = root.getCall().getQuestionId();
            return readLoop();
          }
          return kj::READY_NOW;
        });
  }
};

// Any settled outcome is fine; a guard expiry is a hang.
template <typename T>
kj::Promise<void> voided(kj::Promise<T> promise) { return promise.ignoreResult(); }
kj::Promise<void> voided(kj::Promise<void> promise) { return promise; }

template <typename T>
void settle(kj::Timer& timer, kj::WaitScope& waitScope, kj::Promise<T> promise,
            kj::StringPtr what) {
  bool hung = false;
  timer.timeoutAfter(GUARD, voided(kj::mv(promise)))
      .catch_([&hung](kj::Exception&& e) {
        if (e.getDescription() == "operation timed out"_kj) hung = true;
      })
      .wait(waitScope);
  KJ_ASSERT(!hung, "hang", what);
}

// One ControlClient session fed the transcript's E->C messages at the right moments; message
// `victim` (or the whole stream when victim == size) is replaced by a mutation.
struct ClientStats {
  size_t registered = 0;  // registerConnection resolved (details or error)
  size_t failed = 0;      // registerConnection rejected
  size_t laterCalls = 0;  // updateLocalConfiguration/unregisterConnection resolved
};

void runClientCase(kj::AsyncIoProvider& provider, kj::WaitScope& waitScope, Rng& rng,
                   kj::ArrayPtr<const TranscriptMessage* const> replies, ClientStats& stats) {
  auto& timer = provider.getTimer();
  auto pipe = kj::newTwoWayPipe();
  ControlClientOptions options;
  options.callTimeout = CALL_TIMEOUT;
  auto client = kj::heap<ControlClient>(*pipe.ends[0], timer, options);
  EdgeEnd edge{*pipe.ends[1]};
  auto reading = edge.readLoop().catch_([](kj::Exception&&) {}).eagerlyEvaluate(nullptr);
  kj::Promise<void> writing = kj::READY_NOW;
  bool ended = false;
  size_t victim = rng.below(replies.size() + 1);

  auto send = [&](kj::Array<kj::byte> bytes) {
    writing = writing.then([&edge, bytes = kj::mv(bytes)]() mutable {
      auto promise = edge.stream.write(bytes.begin(), bytes.size());
      return promise.attach(kj::mv(bytes));
    }).eagerlyEvaluate(nullptr);
  };
  auto endStream = [&]() {
    if (!ended) {
      ended = true;
      writing = writing.then([&edge]() { edge.stream.shutdownWrite(); }).eagerlyEvaluate(nullptr);
    }
  };
  auto reply = [&](size_t index, uint32_t answerId) {
    // (The transcript's bootstrap answer holds a capability: copy only the call answers.)
    auto bytes = index == 0 ? kj::heapArray(replies[index]->bytes.asPtr())
                            : withAnswerId(replies[index]->bytes, answerId);
    if (index == victim) bytes = fuzz::mutate(rng, bytes, 0);
    send(kj::mv(bytes));
  };
  auto await = [&](auto promise, kj::StringPtr what) {
    // Pump until nothing moves; if the call is still open the client waits for bytes that will
    // never come: end the stream (it must then fail the call, not hang).
    auto forked = voided(kj::mv(promise)).fork();
    auto branch = forked.addBranch();
    if (!branch.poll(waitScope)) endStream();
    settle(timer, waitScope, forked.addBranch(), what);
  };

  if (victim == replies.size()) {
    // Whole-stream mode: all replies at once, mutated as one byte string, then EOF.
    auto registration = client->registerConnection(sampleParams());
    kj::Vector<kj::byte> all;
    for (size_t i = 0; i < replies.size(); i++) {
      all.addAll(replies[i]->bytes);
    }
    send(fuzz::mutate(rng, all, 0));
    endStream();
    settle(timer, waitScope, kj::mv(registration), "registerConnection");
  } else {
    auto registration = client->registerConnection(sampleParams());
    KJ_ASSERT(!registration.poll(waitScope));
    reply(0, edge.bootstrapQuestion);
    if (replies.size() > 1) reply(1, edge.lastCallQuestion);
    bool ok = true;
    auto done = registration.then([&stats](RegistrationResult&&) { stats.registered++; },
                                  [&ok, &stats](kj::Exception&& e) {
      ok = false;
      stats.failed++;
    });
    await(kj::mv(done), "registerConnection");
    for (size_t i = 2; i < replies.size() && ok && !ended; i++) {
      auto call = (i % 2 == 0) ? client->updateLocalConfiguration("{\"ingress\":[]}"_kj.asBytes())
                               : client->unregisterConnection();
      if (call.poll(waitScope)) {
        ok = false;  // already failed (session over)
        break;
      }
      reply(i, edge.lastCallQuestion);
      auto settled = call.then([&stats]() { stats.laterCalls++; },
                               [&ok](kj::Exception&&) { ok = false; });
      await(kj::mv(settled), "call");
    }
  }
  endStream();
  settle(timer, waitScope, client->onDisconnect(), "onDisconnect");
  client = nullptr;
  pipe.ends[0] = nullptr;
  settle(timer, waitScope, kj::mv(reading), "edge read loop");
  writing = nullptr;
}

KJ_TEST("fuzz: ControlClient fed mutated E->C transcript messages") {
  auto io = kj::setupAsyncIo();
  auto file = load();
  KJ_ASSERT(file.transcripts.size() >= 2);
  Rng rng(0xC0FFEE05);
  for (auto& transcript: file.transcripts) {
    KJ_CONTEXT(transcript.title);
    auto replies = messagesOf(transcript, Direction::EDGE_TO_CLIENT);
    KJ_ASSERT(replies.size() >= 2);
    ClientStats stats;
    for (size_t i = 0; i < 800; i++) {
      KJ_CONTEXT(i);
      runClientCase(*io.provider, io.waitScope, rng, replies, stats);
    }
    // Both outcomes occur, and the later calls are reached (the replay is in step).
    KJ_EXPECT(stats.registered > 5 && stats.failed > 25, stats.registered, stats.failed);
    if (replies.size() > 2) {
      KJ_EXPECT(stats.laterCalls > 25, stats.laterCalls);
    }
    KJ_LOG(INFO, "client", stats.registered, stats.failed, stats.laterCalls);
  }
}

KJ_TEST("fuzz: ControlClient fed random garbage") {
  auto io = kj::setupAsyncIo();
  auto& timer = io.provider->getTimer();
  Rng rng(0xC0FFEE06);
  for (size_t i = 0; i < 200; i++) {
    KJ_CONTEXT(i);
    auto pipe = kj::newTwoWayPipe();
    ControlClientOptions options;
    options.callTimeout = CALL_TIMEOUT;
    ControlClient client(*pipe.ends[0], timer, options);
    EdgeEnd edge{*pipe.ends[1]};
    auto reading = edge.readLoop().catch_([](kj::Exception&&) {}).eagerlyEvaluate(nullptr);
    auto registration = client.registerConnection(sampleParams());
    auto garbage = fuzz::randomBytes(rng, 256);
    // A plausible segment table most of the time.
    if (garbage.size() >= 8 && !rng.chance(3)) {
      fuzz::writeLe32(garbage.begin(), 0);
      fuzz::writeLe32(garbage.begin() + 4, uint32_t(garbage.size() / 8 - 1));
    }
    auto writing = edge.stream.write(garbage.begin(), garbage.size()).then([&edge]() {
      edge.stream.shutdownWrite();
    }).eagerlyEvaluate([](kj::Exception&&) {});
    settle(timer, io.waitScope, kj::mv(registration), "registerConnection");
    settle(timer, io.waitScope, client.onDisconnect(), "onDisconnect");
  }
}

KJ_TEST("fuzz: ControlClient, every truncation of the E->C stream") {
  auto io = kj::setupAsyncIo();
  auto& timer = io.provider->getTimer();
  auto file = load();
  auto replies = messagesOf(file.transcripts[0], Direction::EDGE_TO_CLIENT);
  kj::Vector<kj::byte> all;
  for (auto m: replies) all.addAll(m->bytes);
  size_t registered = 0;
  for (size_t len = 0; len <= all.size(); len++) {
    KJ_CONTEXT(len);
    auto pipe = kj::newTwoWayPipe();
    ControlClientOptions options;
    options.callTimeout = CALL_TIMEOUT;
    ControlClient client(*pipe.ends[0], timer, options);
    EdgeEnd edge{*pipe.ends[1]};
    auto reading = edge.readLoop().catch_([](kj::Exception&&) {}).eagerlyEvaluate(nullptr);
    auto registration = client.registerConnection(sampleParams())
        .then([&registered](RegistrationResult&&) { registered++; },
              [](kj::Exception&&) {});
    auto bytes = all.asPtr().slice(0, len);
    auto writing = edge.stream.write(bytes.begin(), bytes.size()).then([&edge]() {
      edge.stream.shutdownWrite();
    }).eagerlyEvaluate([](kj::Exception&&) {});
    settle(timer, io.waitScope, kj::mv(registration), "registerConnection");
    settle(timer, io.waitScope, client.onDisconnect(), "onDisconnect");
  }
  // Registration completes exactly once the first two messages arrived whole.
  KJ_EXPECT(registered == all.size() + 1 - replies[0]->bytes.size() - replies[1]->bytes.size(),
            registered);
}

KJ_TEST("fuzz: ControlServer, every truncation of the C->E stream") {
  auto io = kj::setupAsyncIo();
  auto& timer = io.provider->getTimer();
  auto file = load();
  auto calls = messagesOf(file.transcripts[0], Direction::CLIENT_TO_EDGE);
  kj::Vector<kj::byte> all;
  for (auto m: calls) all.addAll(m->bytes);
  auto uuid = kj::heapArray<kj::byte>(16);
  FixedRegistrationPolicy policy(ConnectionDetails{kj::mv(uuid), kj::str("FUZ"), false});
  size_t registrations = 0;
  for (size_t len = 0; len <= all.size(); len++) {
    KJ_CONTEXT(len);
    struct Observer final: public ControlObserver {
      size_t& count;
      explicit Observer(size_t& count): count(count) {}
      void registered(const RegistrationParams&, const RegistrationResult&) override { count++; }
    } observer(registrations);
    auto pipe = kj::newTwoWayPipe();
    auto server = kj::heap<ControlServer>(*pipe.ends[1], policy, observer);
    EdgeEnd client{*pipe.ends[0]};
    auto reading = client.readLoop().catch_([](kj::Exception&&) {}).eagerlyEvaluate(nullptr);
    {
      auto write = client.stream.write(all.begin(), len).catch_([](kj::Exception&&) {});
      if (write.poll(io.waitScope)) write.wait(io.waitScope);
    }
    client.stream.shutdownWrite();
    settle(timer, io.waitScope, server->onDisconnect(), "onDisconnect");
    server = nullptr;
    pipe.ends[1] = nullptr;
    settle(timer, io.waitScope, kj::mv(reading), "client read loop");
  }
  // The registration call is the 2nd message: whole from then on.
  KJ_EXPECT(registrations == all.size() + 1 - calls[0]->bytes.size() - calls[1]->bytes.size(),
            registrations);
}

struct CountingObserver final: public ControlObserver {
  void registered(const RegistrationParams& params, const RegistrationResult& result) override {
    registrations++;
  }
  void unregistered() override { unregistrations++; }
  void configurationUpdated(kj::ArrayPtr<const kj::byte> json) override { configurations++; }
  size_t registrations = 0;
  size_t unregistrations = 0;
  size_t configurations = 0;
};

// One ControlServer session fed the transcript's C->E messages one by one (the server's answers
// drained), message `victim` mutated; or the whole stream mutated at once.
void runServerCase(kj::AsyncIoProvider& provider, kj::WaitScope& waitScope, Rng& rng,
                   kj::ArrayPtr<const TranscriptMessage* const> calls,
                   RegistrationPolicy& policy, CountingObserver& observer) {
  auto& timer = provider.getTimer();
  auto pipe = kj::newTwoWayPipe();
  ControlServerOptions options;
  if (rng.chance(4)) options.traversalLimitWords = 1 + rng.below(128);
  auto server = kj::heap<ControlServer>(*pipe.ends[1], policy, observer, options);
  EdgeEnd client{*pipe.ends[0]};  // plays the client; only reads the server's answers
  auto reading = client.readLoop().catch_([](kj::Exception&&) {}).eagerlyEvaluate(nullptr);
  size_t victim = rng.below(calls.size() + 1);
  if (victim == calls.size()) {
    kj::Vector<kj::byte> all;
    for (auto m: calls) all.addAll(m->bytes);
    auto bytes = fuzz::mutate(rng, all, 0);
    auto write = client.stream.write(bytes.begin(), bytes.size()).catch_([](kj::Exception&&) {});
    // The server stops reading once it aborted: a write it never takes is not a hang.
    if (write.poll(waitScope)) write.wait(waitScope);
  } else {
    for (size_t i = 0; i < calls.size(); i++) {
      auto bytes = i == victim ? fuzz::mutate(rng, calls[i]->bytes, 0)
                               : kj::heapArray(calls[i]->bytes.asPtr());
      bool failed = false;
      auto write = client.stream.write(bytes.begin(), bytes.size())
          .catch_([&failed](kj::Exception&&) { failed = true; });
      // The server stops reading once it aborted: a write it never takes is not a hang.
      if (!write.poll(waitScope)) break;
      write.wait(waitScope);
      if (failed) break;
      waitScope.poll();
    }
  }
  client.stream.shutdownWrite();
  settle(timer, waitScope, server->onDisconnect(), "onDisconnect");
  server = nullptr;
  pipe.ends[1] = nullptr;
  settle(timer, waitScope, kj::mv(reading), "client read loop");
}

KJ_TEST("fuzz: ControlServer fed mutated C->E transcript messages") {
  auto io = kj::setupAsyncIo();
  auto file = load();
  Rng rng(0xC0FFEE07);
  auto uuid = kj::heapArray<kj::byte>(16);
  FixedRegistrationPolicy policy(ConnectionDetails{kj::mv(uuid), kj::str("FUZ"), false});
  for (auto& transcript: file.transcripts) {
    KJ_CONTEXT(transcript.title);
    auto calls = messagesOf(transcript, Direction::CLIENT_TO_EDGE);
    KJ_ASSERT(calls.size() >= 3);
    CountingObserver observer;
    for (size_t i = 0; i < 800; i++) {
      KJ_CONTEXT(i);
      runServerCase(*io.provider, io.waitScope, rng, calls, policy, observer);
    }
    KJ_EXPECT(observer.registrations > 25 && observer.registrations < 790,
              observer.registrations);
    KJ_LOG(INFO, "server", observer.registrations, observer.configurations,
           observer.unregistrations);
  }
}

KJ_TEST("fuzz: ControlServer fed random garbage") {
  auto io = kj::setupAsyncIo();
  auto& timer = io.provider->getTimer();
  Rng rng(0xC0FFEE08);
  auto uuid = kj::heapArray<kj::byte>(16);
  FixedRegistrationPolicy policy(ConnectionDetails{kj::mv(uuid), kj::str("FUZ"), false});
  CountingObserver observer;
  for (size_t i = 0; i < 200; i++) {
    KJ_CONTEXT(i);
    auto pipe = kj::newTwoWayPipe();
    auto server = kj::heap<ControlServer>(*pipe.ends[1], policy, observer);
    EdgeEnd client{*pipe.ends[0]};
    auto reading = client.readLoop().catch_([](kj::Exception&&) {}).eagerlyEvaluate(nullptr);
    auto garbage = fuzz::randomBytes(rng, 256);
    if (garbage.size() >= 8 && !rng.chance(3)) {
      fuzz::writeLe32(garbage.begin(), 0);
      fuzz::writeLe32(garbage.begin() + 4, uint32_t(garbage.size() / 8 - 1));
    }
    {
      auto write =
          client.stream.write(garbage.begin(), garbage.size()).catch_([](kj::Exception&&) {});
      if (write.poll(io.waitScope)) write.wait(io.waitScope);
    }
    client.stream.shutdownWrite();
    settle(timer, io.waitScope, server->onDisconnect(), "onDisconnect");
    server = nullptr;
    pipe.ends[1] = nullptr;
    settle(timer, io.waitScope, kj::mv(reading), "client read loop");
  }
}

// ---------------------------------------------------------------------------------------------
// Edge-opened RPC streams (after RPC_STREAM_SIGNATURE): serveCloudflaredRpc() fed mutated calls.

kj::Array<kj::byte> flat(capnp::MessageBuilder& builder) {
  auto words = capnp::messageToFlatArray(builder);
  return kj::heapArray<kj::byte>(words.asBytes());
}

constexpr kj::StringPtr CONFIG_JSON =
    R"({"ingress":[{"hostname":"a.test","service":"http://localhost:8080"},)"
    R"({"service":"http_status:404"}],"warp-routing":{"enabled":false},"n":[1.5e3,-2,null,true]})"_kj;

// What an edge sends on such a stream: Bootstrap, then updateConfiguration, registerUdpSession
// and unregisterUdpSession calls pipelined on the bootstrap answer, each followed by its Finish.
kj::Array<kj::Array<kj::byte>> edgeRpcSeeds() {
  kj::Vector<kj::Array<kj::byte>> out;
  {
    capnp::MallocMessageBuilder b;
    b.initRoot<capnp::rpc::Message>().initBootstrap().setQuestionId(0);
    out.add(flat(b));
  }
  auto callHeader = [](capnp::rpc::Message::Builder root, uint32_t question, uint64_t iface,
                       uint16_t method) {
    auto call = root.initCall();
    call.setQuestionId(question);
    call.initTarget().initPromisedAnswer().setQuestionId(0);
    call.setInterfaceId(iface);
    call.setMethodId(method);
    return call.initParams().getContent();
  };
  auto finish = [&](uint32_t question) {
    capnp::MallocMessageBuilder b;
    b.initRoot<capnp::rpc::Message>().initFinish().setQuestionId(question);
    out.add(flat(b));
  };
  {
    capnp::MallocMessageBuilder b;
    auto params = callHeader(b.initRoot<capnp::rpc::Message>(), 1,
                             capnp::typeId<schema::ConfigurationManager>(), 0)
        .initAs<schema::ConfigurationManager::UpdateConfigurationParams>();
    params.setVersion(3);
    params.setConfig(CONFIG_JSON.asBytes());
    out.add(flat(b));
  }
  finish(1);
  {
    capnp::MallocMessageBuilder b;
    auto params = callHeader(b.initRoot<capnp::rpc::Message>(), 2,
                             capnp::typeId<schema::SessionManager>(), 0)
        .initAs<schema::SessionManager::RegisterUdpSessionParams>();
    params.setSessionId(kj::heapArray<kj::byte>(16));
    params.setDstIp(kj::heapArray<kj::byte>({127, 0, 0, 1}));
    params.setDstPort(53);
    params.setCloseAfterIdleHint(1000);
    out.add(flat(b));
  }
  finish(2);
  {
    capnp::MallocMessageBuilder b;
    auto params = callHeader(b.initRoot<capnp::rpc::Message>(), 3,
                             capnp::typeId<schema::SessionManager>(), 1)
        .initAs<schema::SessionManager::UnregisterUdpSessionParams>();
    params.setSessionId(kj::heapArray<kj::byte>(16));
    params.setMessage("bye");
    out.add(flat(b));
  }
  finish(3);
  return out.releaseAsArray();
}

class CountingHandler final: public ConfigurationHandler {
public:
  kj::Maybe<kj::String> applyConfiguration(int32_t version,
                                           kj::ArrayPtr<const kj::byte> json) override {
    applied++;
    return nullptr;
  }
  size_t applied = 0;
};

KJ_TEST("fuzz: serveCloudflaredRpc fed mutated edge calls") {
  auto io = kj::setupAsyncIo();
  auto& timer = io.provider->getTimer();
  auto seeds = edgeRpcSeeds();
  Rng rng(0xC0FFEE09);
  CountingHandler handler;
  size_t answers = 0;
  for (size_t i = 0; i < 600; i++) {
    KJ_CONTEXT(i);
    RemoteConfigState config(handler);
    auto pipe = kj::newTwoWayPipe();
    ServeRpcOptions options;
    options.timer = timer;
    options.maxDuration = GUARD;  // ends the session: reaching it fails the case below
    if (rng.chance(4)) options.traversalLimitWords = 1 + rng.below(128);
    bool served = false;
    auto serving = serveCloudflaredRpc(*pipe.ends[1], config, options)
        .then([&served]() { served = true; }, [&served](kj::Exception&&) { served = true; })
        .eagerlyEvaluate(nullptr);
    EdgeEnd edge{*pipe.ends[0]};  // reads the client's answers
    auto reading = edge.readLoop().catch_([](kj::Exception&&) {}).eagerlyEvaluate(nullptr);
    size_t victim = rng.below(seeds.size() + 1);
    for (size_t m = 0; m < seeds.size(); m++) {
      auto bytes = m == victim ? fuzz::mutate(rng, seeds[m], 0) : kj::heapArray(seeds[m].asPtr());
      auto write = edge.stream.write(bytes.begin(), bytes.size()).catch_([](kj::Exception&&) {});
      if (!write.poll(io.waitScope)) break;  // the session stopped reading: it is over
      write.wait(io.waitScope);
      io.waitScope.poll();
    }
    edge.stream.shutdownWrite();
    auto start = timer.now();
    settle(timer, io.waitScope, kj::mv(serving), "serveCloudflaredRpc");
    KJ_ASSERT(served);
    KJ_ASSERT(timer.now() - start < GUARD, "the session outlived the edge's EOF");
    pipe.ends[1] = nullptr;
    settle(timer, io.waitScope, kj::mv(reading), "edge read loop");
    answers += edge.messages;
  }
  KJ_EXPECT(handler.applied > 100, handler.applied);
  KJ_EXPECT(answers > 1000, answers);
}

KJ_TEST("fuzz: RemoteConfigState with mutated configuration JSON") {
  Rng rng(0xC0FFEE0A);
  CountingHandler handler;
  size_t accepted = 0;
  for (size_t i = 0; i < 3000; i++) {
    KJ_CONTEXT(i);
    RemoteConfigState config(handler);
    auto json = fuzz::mutate(rng, CONFIG_JSON.asBytes(), CONFIG_JSON.size());
    auto result = config.update(int32_t(rng.below(3)), json);
    if (result.err.size() == 0 && result.latestAppliedVersion >= 0) accepted++;
    KJ_EXPECT(result.latestAppliedVersion == config.currentVersion());
  }
  // Deep nesting is refused, not recursed into.
  kj::Vector<kj::byte> deep;
  for (size_t i = 0; i < 100000; i++) deep.add('[');
  RemoteConfigState config(handler);
  auto result = config.update(1, deep);
  KJ_EXPECT(result.err.size() > 0 && result.latestAppliedVersion == -1);
  KJ_EXPECT(accepted > 100, accepted);
}

}  // namespace
}  // namespace cfqt::wire
