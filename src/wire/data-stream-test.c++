// Tests of the data-stream preamble codec: round trips and every rejection path.

#include "wire/data-stream.h"

#include "wire/http-metadata.h"

#include <capnp/serialize.h>
#include <kj/async-io.h>
#include <kj/test.h>

namespace cfqt::wire {
namespace {

class MemoryInputStream final: public kj::AsyncInputStream {
  // Serves `data`, then EOF. Records how much was consumed.
public:
  explicit MemoryInputStream(kj::ArrayPtr<const kj::byte> data): data(data) {}
  kj::Promise<size_t> tryRead(void* buffer, size_t minBytes, size_t maxBytes) override {
    size_t n = kj::min(maxBytes, data.size() - position);
    memcpy(buffer, data.begin() + position, n);
    position += n;
    return n;
  }
  size_t position = 0;

private:
  kj::ArrayPtr<const kj::byte> data;
};

class RecordingOutputStream final: public kj::AsyncOutputStream {
public:
  kj::Promise<void> write(const void* buffer, size_t size) override {
    writes++;
    bytes.addAll(kj::arrayPtr(reinterpret_cast<const kj::byte*>(buffer), size));
    return kj::READY_NOW;
  }
  kj::Promise<void> write(kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces) override {
    writes++;
    for (auto piece: pieces) bytes.addAll(piece);
    return kj::READY_NOW;
  }
  kj::Promise<void> whenWriteDisconnected() override { return kj::NEVER_DONE; }
  size_t writes = 0;
  kj::Vector<kj::byte> bytes;
};

kj::Array<Header> sampleHeaders() {
  return kj::arr(Header{kj::str("Accept"), kj::str("*/*")},
                 Header{kj::str("Cookie"), kj::str("a=1")},
                 Header{kj::str("Cookie"), kj::str("b=2")});
}

kj::Array<kj::byte> sampleRequestBytes() {
  capnp::MallocMessageBuilder builder;
  encodeRequest(builder.initRoot<schema::ConnectRequest>(), "https://h.example/p?q=1",
                schema::ConnectionType::HTTP, "POST", "h.example", sampleHeaders());
  return encodeConnectRequest(builder.getRoot<schema::ConnectRequest>().asReader());
}

kj::Array<kj::byte> concat(kj::ArrayPtr<const kj::byte> a, kj::ArrayPtr<const kj::byte> b) {
  auto out = kj::heapArray<kj::byte>(a.size() + b.size());
  memcpy(out.begin(), a.begin(), a.size());
  if (b.size() > 0) memcpy(out.begin() + a.size(), b.begin(), b.size());
  return out;
}

// A preamble around raw message words.
kj::Array<kj::byte> preambleAround(kj::ArrayPtr<const kj::byte> message) {
  kj::byte head[8];
  memcpy(head, DATA_STREAM_SIGNATURE, 6);
  head[6] = '0';
  head[7] = '1';
  return concat(kj::arrayPtr(head, 8), message);
}

void putLe32(kj::byte* p, uint32_t v) {
  for (int i = 0; i < 4; i++) p[i] = kj::byte(v >> (8 * i));
}

void putLe64(kj::byte* p, uint64_t v) {
  for (int i = 0; i < 8; i++) p[i] = kj::byte(v >> (8 * i));
}

uint64_t structPointer(int32_t offset, uint16_t dataWords, uint16_t pointers) {
  return (uint64_t(uint32_t(offset) << 2)) | (uint64_t(dataWords) << 32) |
         (uint64_t(pointers) << 48);
}

uint64_t listPointer(int32_t offset, uint8_t elementSize, uint32_t count) {
  return 1 | (uint64_t(uint32_t(offset) << 2)) | (uint64_t(elementSize) << 32) |
         (uint64_t(count) << 35);
}

// A single-segment message of `words` (given as 64-bit words) with its segment table.
kj::Array<kj::byte> rawMessage(kj::ArrayPtr<const uint64_t> words) {
  auto out = kj::heapArray<kj::byte>(8 + words.size() * 8);
  putLe32(out.begin(), 0);
  putLe32(out.begin() + 4, words.size());
  for (size_t i = 0; i < words.size(); i++) putLe64(out.begin() + 8 + 8 * i, words[i]);
  return out;
}

WireErrorCode syncRequestError(kj::ArrayPtr<const kj::byte> bytes, PreambleLimits limits = {}) {
  KJ_SWITCH_ONEOF(decodeConnectRequest(bytes, limits)) {
    KJ_CASE_ONEOF(ok, DecodedPreamble) { KJ_FAIL_EXPECT("decoded unexpectedly"); }
    KJ_CASE_ONEOF(error, WireError) { return error.code; }
  }
  return WireErrorCode::BAD_STATUS;  // not reached unless the test failed
}

// Reads signature + request asynchronously; returns the WireErrorCode of the rejection.
kj::Maybe<WireErrorCode> asyncRequestError(kj::WaitScope& waitScope,
                                           kj::ArrayPtr<const kj::byte> bytes,
                                           PreambleLimits limits = {},
                                           kj::Exception::Type* type = nullptr) {
  MemoryInputStream in(bytes);
  auto promise = readStreamSignature(in).then([&](StreamKind kind) {
    KJ_ASSERT(kind == StreamKind::DATA);
    return readConnectRequest(in, limits);
  });
  kj::Maybe<WireErrorCode> result;
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() { promise.wait(waitScope); })) {
    if (type != nullptr) *type = e->getType();
    result = wireErrorCode(*e);
    KJ_EXPECT(result != nullptr, *e);
  } else {
    KJ_FAIL_EXPECT("read succeeded unexpectedly");
  }
  return result;
}

KJ_TEST("preamble: request written in one write, read back with the body left in the stream") {
  kj::EventLoop loop;
  kj::WaitScope waitScope(loop);

  capnp::MallocMessageBuilder builder;
  encodeRequest(builder.initRoot<schema::ConnectRequest>(), "/ok", schema::ConnectionType::HTTP,
                "GET", "h.example", sampleHeaders());
  RecordingOutputStream out;
  writeConnectRequest(out, builder.getRoot<schema::ConnectRequest>().asReader()).wait(waitScope);
  KJ_EXPECT(out.writes == 1);
  KJ_ASSERT(out.bytes.size() > 16);
  KJ_EXPECT(out.bytes.asPtr().slice(0, 6) == kj::arrayPtr(DATA_STREAM_SIGNATURE, 6));
  KJ_EXPECT(out.bytes[6] == '0' && out.bytes[7] == '1');

  auto body = kj::heapArray<kj::byte>({'b', 'o', 'd', 'y'});
  auto stream = concat(out.bytes, body);
  MemoryInputStream in(stream);
  KJ_EXPECT(readStreamSignature(in).wait(waitScope) == StreamKind::DATA);
  auto message = readConnectRequest(in).wait(waitScope);
  auto request = message->getRoot<schema::ConnectRequest>();
  KJ_EXPECT(request.getDest() == "/ok");
  KJ_EXPECT(request.getMetadata().size() == 5);
  KJ_EXPECT(request.getMetadata()[4].getKey() == "HttpHeader:Cookie");
  KJ_EXPECT(in.position == out.bytes.size(), "read past the message into the body");

  // The synchronous decoder agrees and reports what it consumed.
  KJ_SWITCH_ONEOF(decodeConnectRequest(stream)) {
    KJ_CASE_ONEOF(decoded, DecodedPreamble) {
      KJ_EXPECT(decoded.consumed == out.bytes.size());
      KJ_EXPECT(decoded.message->getRoot<schema::ConnectRequest>().getDest() == "/ok");
    }
    KJ_CASE_ONEOF(error, WireError) { KJ_FAIL_EXPECT(error.toString()); }
  }
}

KJ_TEST("preamble: responses and error responses round trip; edge reads the whole preamble") {
  kj::EventLoop loop;
  kj::WaitScope waitScope(loop);

  capnp::MallocMessageBuilder builder;
  encodeResponse(builder.initRoot<schema::ConnectResponse>(), 201, sampleHeaders());
  RecordingOutputStream out;
  writeConnectResponse(out, builder.getRoot<schema::ConnectResponse>().asReader())
      .wait(waitScope);
  KJ_EXPECT(out.writes == 1);
  {
    MemoryInputStream in(out.bytes);
    auto message = readConnectResponse(in).wait(waitScope);
    auto response = message->getRoot<schema::ConnectResponse>();
    KJ_EXPECT(response.getMetadata()[0].getKey() == "HttpStatus");
    KJ_EXPECT(response.getMetadata()[0].getVal() == "201");
  }

  RecordingOutputStream errOut;
  writeConnectResponseError(errOut, "origin down").wait(waitScope);
  KJ_EXPECT(errOut.writes == 1);
  MemoryInputStream in(errOut.bytes);
  auto message = readConnectResponse(in).wait(waitScope);
  KJ_EXPECT(message->getRoot<schema::ConnectResponse>().getError() == "origin down");
  KJ_EXPECT(message->getRoot<schema::ConnectResponse>().getMetadata().size() == 0);
}

KJ_TEST("preamble: RPC signature recognised, unknown signatures rejected") {
  kj::EventLoop loop;
  kj::WaitScope waitScope(loop);
  {
    MemoryInputStream in(kj::arrayPtr(RPC_STREAM_SIGNATURE, 6));
    KJ_EXPECT(readStreamSignature(in).wait(waitScope) == StreamKind::RPC);
  }
  {
    kj::byte bad[6] = {0x0A, 0x36, 0xCD, 0x12, 0xA1, 0x3F};
    MemoryInputStream in(kj::arrayPtr(bad, 6));
    KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() { readStreamSignature(in).wait(waitScope); })) {
      KJ_EXPECT(wireErrorCode(*e) == WireErrorCode::BAD_SIGNATURE, *e);
      KJ_EXPECT(e->getType() == kj::Exception::Type::FAILED);
      KJ_EXPECT(e->getDescription().startsWith("wire: BAD_SIGNATURE: "), *e);
    } else {
      KJ_FAIL_EXPECT("accepted a bad signature");
    }
  }
  {
    // The edge expects the data signature in the answer: the RPC one is refused too.
    auto bytes = sampleRequestBytes();
    memcpy(bytes.begin(), RPC_STREAM_SIGNATURE, 6);
    MemoryInputStream in(bytes);
    KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() { readConnectResponse(in).wait(waitScope); })) {
      KJ_EXPECT(wireErrorCode(*e) == WireErrorCode::BAD_SIGNATURE, *e);
    } else {
      KJ_FAIL_EXPECT("accepted an RPC signature as a response");
    }
    KJ_EXPECT(syncRequestError(bytes) == WireErrorCode::BAD_SIGNATURE);
  }
}

KJ_TEST("preamble: any version bytes are accepted") {
  kj::EventLoop loop;
  kj::WaitScope waitScope(loop);
  auto bytes = sampleRequestBytes();
  bytes[6] = '9';
  bytes[7] = 'Z';
  MemoryInputStream in(bytes);
  KJ_EXPECT(readStreamSignature(in).wait(waitScope) == StreamKind::DATA);
  auto message = readConnectRequest(in).wait(waitScope);
  KJ_EXPECT(message->getRoot<schema::ConnectRequest>().getDest() == "https://h.example/p?q=1");
  KJ_SWITCH_ONEOF(decodeConnectRequest(bytes)) {
    KJ_CASE_ONEOF(decoded, DecodedPreamble) {
      KJ_EXPECT(decoded.version[0] == '9' && decoded.version[1] == 'Z');
    }
    KJ_CASE_ONEOF(error, WireError) { KJ_FAIL_EXPECT(error.toString()); }
  }
}

KJ_TEST("preamble: EOF at every byte before the end is TRUNCATED (DISCONNECTED)") {
  kj::EventLoop loop;
  kj::WaitScope waitScope(loop);

  // A multi-segment message, so that EOF inside a longer segment table is covered too.
  capnp::MallocMessageBuilder builder(1, capnp::AllocationStrategy::FIXED_SIZE);
  encodeRequest(builder.initRoot<schema::ConnectRequest>(), "/x", schema::ConnectionType::HTTP,
                "GET", "h", sampleHeaders());
  KJ_ASSERT(builder.getSegmentsForOutput().size() >= 3, builder.getSegmentsForOutput().size());
  auto message = capnp::messageToFlatArray(builder);
  auto bytes = preambleAround(message.asBytes());

  for (size_t n = 0; n < bytes.size(); n++) {
    auto prefix = bytes.slice(0, n);
    if (n < 6) {
      MemoryInputStream in(prefix);
      auto readSignature = [&]() { readStreamSignature(in).wait(waitScope); };
      KJ_IF_MAYBE(e, kj::runCatchingExceptions(readSignature)) {
        KJ_EXPECT(wireErrorCode(*e) == WireErrorCode::TRUNCATED, n, *e);
        KJ_EXPECT(e->getType() == kj::Exception::Type::DISCONNECTED, n);
      } else {
        KJ_FAIL_EXPECT("short signature accepted", n);
      }
      MemoryInputStream in2(prefix);
      auto readResponse = [&]() { readConnectResponse(in2).wait(waitScope); };
      KJ_IF_MAYBE(e, kj::runCatchingExceptions(readResponse)) {
        KJ_EXPECT(wireErrorCode(*e) == WireErrorCode::TRUNCATED, n, *e);
      } else {
        KJ_FAIL_EXPECT("short response accepted", n);
      }
    } else {
      kj::Exception::Type type = kj::Exception::Type::FAILED;
      KJ_EXPECT(asyncRequestError(waitScope, prefix, {}, &type) == WireErrorCode::TRUNCATED, n);
      KJ_EXPECT(type == kj::Exception::Type::DISCONNECTED, n);
    }
    KJ_EXPECT(syncRequestError(prefix) == WireErrorCode::TRUNCATED, n);
  }
  // And the complete bytes decode (multi-segment accepted).
  MemoryInputStream in(bytes);
  readStreamSignature(in).wait(waitScope);
  auto reader = readConnectRequest(in).wait(waitScope);
  KJ_EXPECT(reader->getRoot<schema::ConnectRequest>().getMetadata().size() == 5);
}

KJ_TEST("preamble: messages over the size limit are TOO_LARGE before any allocation") {
  kj::EventLoop loop;
  kj::WaitScope waitScope(loop);

  capnp::MallocMessageBuilder builder;
  auto big = kj::heapArray<char>(70000);
  memset(big.begin(), 'a', big.size());
  builder.initRoot<schema::ConnectRequest>().setDest(kj::str(big));
  auto bytes = encodeConnectRequest(builder.getRoot<schema::ConnectRequest>().asReader());
  KJ_EXPECT(asyncRequestError(waitScope, bytes) == WireErrorCode::TOO_LARGE);
  KJ_EXPECT(syncRequestError(bytes) == WireErrorCode::TOO_LARGE);

  // The limit is configurable, and checked from the segment table alone: a table claiming a huge
  // segment is refused although the bytes are not there.
  PreambleLimits small;
  small.maxMessageBytes = 64;
  KJ_EXPECT(asyncRequestError(waitScope, sampleRequestBytes(), small) == WireErrorCode::TOO_LARGE);
  auto header = preambleAround(rawMessage(kj::arr<uint64_t>(0)).slice(0, 8));
  putLe32(header.begin() + 12, 0x7fffffff);
  MemoryInputStream in(header);
  readStreamSignature(in).wait(waitScope);
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() { readConnectRequest(in).wait(waitScope); })) {
    KJ_EXPECT(wireErrorCode(*e) == WireErrorCode::TOO_LARGE, *e);
  } else {
    KJ_FAIL_EXPECT("accepted a 16 GiB segment");
  }
}

KJ_TEST("preamble: bad segment tables are MALFORMED") {
  kj::EventLoop loop;
  kj::WaitScope waitScope(loop);

  // Segment count 0xffffffff + 1 (wraps in 32 bits).
  auto wrap = preambleAround(rawMessage(kj::arr<uint64_t>(0)));
  putLe32(wrap.begin() + 8, 0xffffffff);
  KJ_EXPECT(asyncRequestError(waitScope, wrap) == WireErrorCode::MALFORMED);
  KJ_EXPECT(syncRequestError(wrap) == WireErrorCode::MALFORMED);

  // 600 segments (> 512).
  auto many = preambleAround(rawMessage(kj::arr<uint64_t>(0)));
  putLe32(many.begin() + 8, 599);
  KJ_EXPECT(asyncRequestError(waitScope, many) == WireErrorCode::MALFORMED);

  // An empty first segment: no root pointer.
  auto empty = preambleAround(rawMessage(kj::arr<uint64_t>(0)).slice(0, 8));
  putLe32(empty.begin() + 12, 0);
  KJ_EXPECT(asyncRequestError(waitScope, empty) == WireErrorCode::MALFORMED);
  KJ_EXPECT(syncRequestError(empty) == WireErrorCode::MALFORMED);
}

KJ_TEST("preamble: bad pointers and wrong pointer types are MALFORMED, never a crash") {
  kj::EventLoop loop;
  kj::WaitScope waitScope(loop);

  // Root struct pointer far out of bounds.
  auto outOfBounds = preambleAround(rawMessage(kj::arr<uint64_t>(structPointer(1000, 1, 2))));
  KJ_EXPECT(asyncRequestError(waitScope, outOfBounds) == WireErrorCode::MALFORMED);
  KJ_EXPECT(syncRequestError(outOfBounds) == WireErrorCode::MALFORMED);

  // dest is a struct pointer where Text is expected.
  auto wrongType = preambleAround(rawMessage(kj::arr<uint64_t>(
      structPointer(0, 1, 2), 0, structPointer(1, 1, 0), 0, 0)));
  KJ_EXPECT(asyncRequestError(waitScope, wrongType) == WireErrorCode::MALFORMED);

  // metadata is a bit list where a struct list is expected.
  auto bitList = preambleAround(rawMessage(kj::arr<uint64_t>(
      structPointer(0, 1, 2), 0, 0, listPointer(0, 1, 8), 0xff)));
  KJ_EXPECT(asyncRequestError(waitScope, bitList) == WireErrorCode::MALFORMED);

  // dest text not NUL-terminated.
  auto noNul = preambleAround(rawMessage(kj::arr<uint64_t>(
      structPointer(0, 1, 2), 0, listPointer(1, 2, 8), 0, 0x6161616161616161ull)));
  KJ_EXPECT(asyncRequestError(waitScope, noNul) == WireErrorCode::MALFORMED);

  // Sanity: the same layout with a terminated text decodes.
  auto good = preambleAround(rawMessage(kj::arr<uint64_t>(
      structPointer(0, 1, 2), 0, listPointer(1, 2, 8), 0, 0x0061616161616161ull)));
  MemoryInputStream in(good);
  readStreamSignature(in).wait(waitScope);
  auto reader = readConnectRequest(in).wait(waitScope);
  KJ_EXPECT(reader->getRoot<schema::ConnectRequest>().getDest() == "aaaaaaa");
}

KJ_TEST("preamble: traversal limit exceeded (pointer amplification) is MALFORMED") {
  kj::EventLoop loop;
  kj::WaitScope waitScope(loop);

  // 100 metadata entries whose key and val all point at the same 500-word text: 5.6 KB on the
  // wire, 100000 words of traversal.
  constexpr uint32_t N = 100, S = 500;
  kj::Vector<uint64_t> words;
  words.add(structPointer(0, 1, 2));             // w0: root
  words.add(0);                                  // w1: data (type = http)
  words.add(0);                                  // w2: dest = null
  words.add(listPointer(0, 7, N * 2));           // w3: metadata, inline composite at w4
  words.add(structPointer(N, 0, 2));             // w4: tag: N elements of 0 data + 2 pointers
  uint32_t blob = 5 + 2 * N;
  for (uint32_t p = 5; p < blob; p++) words.add(listPointer(blob - (p + 1), 2, S * 8));
  for (uint32_t i = 0; i < S; i++) words.add(0);
  auto bytes = preambleAround(rawMessage(words));
  KJ_EXPECT(bytes.size() < 64 * 1024);
  KJ_EXPECT(asyncRequestError(waitScope, bytes) == WireErrorCode::MALFORMED);
  KJ_EXPECT(syncRequestError(bytes) == WireErrorCode::MALFORMED);

  // With a larger traversal limit it is accepted, and later accesses do not throw even though
  // they traverse the same words again.
  PreambleLimits generous;
  generous.traversalLimitWords = 200000;
  MemoryInputStream in(bytes);
  readStreamSignature(in).wait(waitScope);
  auto reader = readConnectRequest(in, generous).wait(waitScope);
  size_t total = 0;
  for (int round = 0; round < 3; round++) {
    for (auto entry: reader->getRoot<schema::ConnectRequest>().getMetadata()) {
      total += entry.getKey().size() + entry.getVal().size();
    }
  }
  KJ_EXPECT(total == 3 * 2 * N * (S * 8 - 1));

  // A tiny traversal limit rejects even a normal request.
  PreambleLimits tiny;
  tiny.traversalLimitWords = 4;
  KJ_EXPECT(asyncRequestError(waitScope, sampleRequestBytes(), tiny) == WireErrorCode::MALFORMED);
}

KJ_TEST("wireErrorCode classifies only wire exceptions") {
  auto e = wireError(WireErrorCode::BAD_HEADER, kj::str("x")).toException();
  KJ_EXPECT(wireErrorCode(e) == WireErrorCode::BAD_HEADER);
  KJ_EXPECT(e.getDescription() == "wire: BAD_HEADER: x");
  KJ_EXPECT(wireErrorCode(KJ_EXCEPTION(FAILED, "wire: nonsense")) == nullptr);
  KJ_EXPECT(wireErrorCode(KJ_EXCEPTION(FAILED, "other")) == nullptr);
  auto t = wireError(WireErrorCode::TRUNCATED, kj::str("y")).toException();
  KJ_EXPECT(t.getType() == kj::Exception::Type::DISCONNECTED);
}

}  // namespace
}  // namespace cfqt::wire
