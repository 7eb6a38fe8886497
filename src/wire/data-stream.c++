#include "wire/data-stream.h"
#include "observe/log.h"

#include <capnp/serialize.h>
#include <kj/debug.h>
#include <kj/encoding.h>
#include <kj/io.h>

namespace cfqt::wire {

namespace {

constexpr size_t WORD_BYTES = sizeof(capnp::word);

kj::Exception truncated(kj::StringPtr what) {
  return wireError(WireErrorCode::TRUNCATED, kj::str("stream ended in the ", what)).toException();
}

uint32_t readLe32(const kj::byte* p) {
  return uint32_t(p[0]) | (uint32_t(p[1]) << 8) | (uint32_t(p[2]) << 16) | (uint32_t(p[3]) << 24);
}

kj::Maybe<StreamKind> classifySignature(kj::ArrayPtr<const kj::byte> sig) {
  if (sig == kj::arrayPtr(DATA_STREAM_SIGNATURE, SIGNATURE_SIZE)) return StreamKind::DATA;
  if (sig == kj::arrayPtr(RPC_STREAM_SIGNATURE, SIGNATURE_SIZE)) return StreamKind::RPC;
  return nullptr;
}

WireError badSignature(kj::ArrayPtr<const kj::byte> sig) {
  return wireError(WireErrorCode::BAD_SIGNATURE,
                   kj::str("unknown stream signature ", kj::encodeHex(sig)));
}

// A data preamble must carry the data signature; RPC and unknown ones are refused alike.
kj::Maybe<WireError> checkDataSignature(kj::ArrayPtr<const kj::byte> sig) {
  KJ_IF_MAYBE(kind, classifySignature(sig)) {
    if (*kind == StreamKind::DATA) return nullptr;
    return wireError(WireErrorCode::BAD_SIGNATURE,
                     kj::str("RPC stream signature where a data stream was expected"));
  }
  return badSignature(sig);
}

void noteVersion(kj::ArrayPtr<const kj::byte> version) {
  if (version != kj::arrayPtr(PROTOCOL_VERSION, 2)) {
    observe::logDebug("Data stream with an unexpected protocol version", observe::Fields()
        .add("version", kj::encodeHex(version)));
  }
}

// ---------------------------------------------------------------------------------------------
// Segment table checks, shared by the synchronous and asynchronous readers.

struct FirstWord {
  size_t segmentCount;
  size_t tableWords;  // the whole segment table, padded to a word
};

kj::OneOf<FirstWord, WireError> parseFirstWord(const kj::byte* p, const PreambleLimits& limits) {
  uint64_t segmentCount = uint64_t(readLe32(p)) + 1;  // the wire stores count - 1
  if (segmentCount > limits.maxSegments) {
    return wireError(WireErrorCode::MALFORMED,
                     kj::str("bad segment table: ", segmentCount, " segments (limit ",
                             limits.maxSegments, ")"));
  }
  return FirstWord{size_t(segmentCount), size_t(segmentCount / 2 + 1)};
}

// `table` is the complete segment table; returns the message size in words (table included).
kj::OneOf<size_t, WireError> messageWords(kj::ArrayPtr<const kj::byte> table, size_t segmentCount,
                                          const PreambleLimits& limits) {
  uint64_t words = table.size() / WORD_BYTES;
  for (size_t i = 0; i < segmentCount; i++) {
    words += readLe32(table.begin() + 4 + 4 * i);
  }
  if (words * WORD_BYTES > limits.maxMessageBytes) {
    return wireError(WireErrorCode::TOO_LARGE,
                     kj::str("capnp message of ", words * WORD_BYTES, " bytes (limit ",
                             limits.maxMessageBytes, ")"));
  }
  return size_t(words);
}

using Validator = void (*)(capnp::MessageReader&);
// Reads every field of the root once; throws a kj::Exception on malformed capnp.

// Opens `words` (a complete message) under the limits, validates it, and hands out a fresh reader
// over the same words: the validation consumed the first reader's traversal budget, and the
// caller must be able to read every field again without hitting it.
kj::OneOf<kj::Own<capnp::MessageReader>, WireError> openValidated(
    kj::Array<capnp::word> words, const PreambleLimits& limits, Validator validate) {
  capnp::ReaderOptions checkOptions;
  checkOptions.traversalLimitInWords = limits.traversalLimitWords;
  checkOptions.nestingLimit = limits.nestingLimit;
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
    capnp::FlatArrayMessageReader check(words, checkOptions);
    validate(check);
  })) {
    return wireError(WireErrorCode::MALFORMED, kj::str("bad capnp message: ", e->getDescription()));
  }

  capnp::ReaderOptions openOptions;
  openOptions.traversalLimitInWords = kj::maxValue;
  openOptions.nestingLimit = limits.nestingLimit;
  kj::ArrayPtr<const capnp::word> view = words;
  return kj::Own<capnp::MessageReader>(
      kj::heap<capnp::FlatArrayMessageReader>(view, openOptions).attach(kj::mv(words)));
}

void touchConnectRequest(capnp::MessageReader& message) {
  auto root = message.getRoot<schema::ConnectRequest>();
  root.getDest();
  root.getType();
  for (auto entry: root.getMetadata()) {
    entry.getKey();
    entry.getVal();
  }
}

void touchConnectResponse(capnp::MessageReader& message) {
  auto root = message.getRoot<schema::ConnectResponse>();
  root.getError();
  for (auto entry: root.getMetadata()) {
    entry.getKey();
    entry.getVal();
  }
}

kj::Maybe<WireError> validateCatching(capnp::MessageReader& message, Validator touch) {
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() { touch(message); })) {
    return wireError(WireErrorCode::MALFORMED, kj::str("bad capnp message: ", e->getDescription()));
  }
  return nullptr;
}

// ---------------------------------------------------------------------------------------------
// Asynchronous reading.

kj::Promise<void> readExactly(kj::AsyncInputStream& in, kj::ArrayPtr<kj::byte> buffer,
                              kj::StringPtr what) {
  // `what` is always a literal.
  return in.tryRead(buffer.begin(), buffer.size(), buffer.size())
      .then([expected = buffer.size(), what](size_t n) -> kj::Promise<void> {
        if (n < expected) return truncated(what);
        return kj::READY_NOW;
      });
}

class MessageRead {
  // One capnp message being read from a stream. Owned by the promise chain of read().
public:
  MessageRead(kj::AsyncInputStream& in, const PreambleLimits& limits, Validator validate)
      : in(in), limits(limits), validate(validate) {}

  kj::Promise<kj::Own<capnp::MessageReader>> read() {
    return readExactly(in, kj::arrayPtr(first, WORD_BYTES), "segment table").then([this]() {
      return readTable();
    });
  }

private:
  kj::AsyncInputStream& in;
  PreambleLimits limits;
  Validator validate;
  kj::byte first[WORD_BYTES];
  kj::Array<capnp::word> words;
  size_t segmentCount = 0;

  kj::Promise<kj::Own<capnp::MessageReader>> readTable() {
    FirstWord info{0, 0};
    KJ_SWITCH_ONEOF(parseFirstWord(first, limits)) {
      KJ_CASE_ONEOF(w, FirstWord) { info = w; }
      KJ_CASE_ONEOF(error, WireError) { return error.toException(); }
    }
    segmentCount = info.segmentCount;
    // The table is small (maxSegments bounds it): read it into a temporary word array.
    words = kj::heapArray<capnp::word>(info.tableWords);
    memcpy(words.begin(), first, WORD_BYTES);
    auto rest = words.asBytes().slice(WORD_BYTES, words.asBytes().size());
    return readExactly(in, rest, "segment table").then([this]() { return readSegments(); });
  }

  kj::Promise<kj::Own<capnp::MessageReader>> readSegments() {
    size_t total = 0;
    KJ_SWITCH_ONEOF(messageWords(words.asBytes(), segmentCount, limits)) {
      KJ_CASE_ONEOF(n, size_t) { total = n; }
      KJ_CASE_ONEOF(error, WireError) { return error.toException(); }
    }
    auto message = kj::heapArray<capnp::word>(total);
    memcpy(message.begin(), words.begin(), words.size() * WORD_BYTES);
    size_t tableBytes = words.size() * WORD_BYTES;
    words = kj::mv(message);
    auto body = words.asBytes().slice(tableBytes, words.asBytes().size());
    return readExactly(in, body, "capnp message").then([this]() { return finish(); });
  }

  kj::Promise<kj::Own<capnp::MessageReader>> finish() {
    KJ_SWITCH_ONEOF(openValidated(kj::mv(words), limits, validate)) {
      KJ_CASE_ONEOF(reader, kj::Own<capnp::MessageReader>) { return kj::mv(reader); }
      KJ_CASE_ONEOF(error, WireError) { return error.toException(); }
    }
    KJ_UNREACHABLE;
  }
};

kj::Promise<kj::Own<capnp::MessageReader>> readMessageAfterSignature(
    kj::AsyncInputStream& in, const PreambleLimits& limits, Validator validate) {
  auto version = kj::heapArray<kj::byte>(2);
  auto versionPtr = version.asPtr();
  return readExactly(in, versionPtr, "version bytes")
      .then([&in, limits, validate, version = kj::mv(version)]() {
        noteVersion(version);
        auto read = kj::heap<MessageRead>(in, limits, validate);
        auto promise = read->read();
        return promise.attach(kj::mv(read));
      });
}

// ---------------------------------------------------------------------------------------------
// Synchronous decoding and encoding.

kj::OneOf<DecodedPreamble, WireError> decodePreamble(kj::ArrayPtr<const kj::byte> bytes,
                                                     const PreambleLimits& limits,
                                                     Validator validate) {
  auto short_ = [](kj::StringPtr what) {
    return wireError(WireErrorCode::TRUNCATED, kj::str("input ended in the ", what));
  };
  if (bytes.size() < SIGNATURE_SIZE) return short_("signature");
  KJ_IF_MAYBE(error, checkDataSignature(bytes.slice(0, SIGNATURE_SIZE))) return kj::mv(*error);
  if (bytes.size() < PREAMBLE_SIZE) return short_("version bytes");
  noteVersion(bytes.slice(SIGNATURE_SIZE, PREAMBLE_SIZE));

  auto message = bytes.slice(PREAMBLE_SIZE, bytes.size());
  if (message.size() < WORD_BYTES) return short_("segment table");
  FirstWord info{0, 0};
  KJ_SWITCH_ONEOF(parseFirstWord(message.begin(), limits)) {
    KJ_CASE_ONEOF(w, FirstWord) { info = w; }
    KJ_CASE_ONEOF(error, WireError) { return kj::mv(error); }
  }
  if (message.size() < info.tableWords * WORD_BYTES) return short_("segment table");
  size_t total = 0;
  KJ_SWITCH_ONEOF(messageWords(message.slice(0, info.tableWords * WORD_BYTES), info.segmentCount,
                               limits)) {
    KJ_CASE_ONEOF(n, size_t) { total = n; }
    KJ_CASE_ONEOF(error, WireError) { return kj::mv(error); }
  }
  if (message.size() < total * WORD_BYTES) return short_("capnp message");

  auto words = kj::heapArray<capnp::word>(total);
  memcpy(words.begin(), message.begin(), total * WORD_BYTES);
  KJ_SWITCH_ONEOF(openValidated(kj::mv(words), limits, validate)) {
    KJ_CASE_ONEOF(reader, kj::Own<capnp::MessageReader>) {
      DecodedPreamble result{kj::mv(reader), {bytes[6], bytes[7]},
                             PREAMBLE_SIZE + total * WORD_BYTES};
      return kj::mv(result);
    }
    KJ_CASE_ONEOF(error, WireError) { return kj::mv(error); }
  }
  KJ_UNREACHABLE;
}

kj::Array<kj::byte> encodePreamble(capnp::MessageBuilder& builder) {
  auto segments = builder.getSegmentsForOutput();
  size_t size = capnp::computeSerializedSizeInWords(segments) * WORD_BYTES;
  auto bytes = kj::heapArray<kj::byte>(PREAMBLE_SIZE + size);
  memcpy(bytes.begin(), DATA_STREAM_SIGNATURE, SIGNATURE_SIZE);
  memcpy(bytes.begin() + SIGNATURE_SIZE, PROTOCOL_VERSION, 2);
  kj::ArrayOutputStream out(bytes.slice(PREAMBLE_SIZE, bytes.size()));
  capnp::writeMessage(out, segments);
  KJ_ASSERT(out.getArray().size() == size);
  return bytes;
}

kj::Promise<void> writeAll(kj::AsyncOutputStream& out, kj::Array<kj::byte> bytes) {
  auto promise = out.write(bytes.begin(), bytes.size());
  return promise.attach(kj::mv(bytes));
}

}  // namespace

// ---------------------------------------------------------------------------------------------

kj::Maybe<WireError> validateConnectRequest(capnp::MessageReader& message) {
  return validateCatching(message, touchConnectRequest);
}

kj::Maybe<WireError> validateConnectResponse(capnp::MessageReader& message) {
  return validateCatching(message, touchConnectResponse);
}

kj::Promise<StreamKind> readStreamSignature(kj::AsyncInputStream& in) {
  auto signature = kj::heapArray<kj::byte>(SIGNATURE_SIZE);
  auto ptr = signature.asPtr();
  return readExactly(in, ptr, "signature")
      .then([signature = kj::mv(signature)]() -> kj::Promise<StreamKind> {
        KJ_IF_MAYBE(kind, classifySignature(signature)) return *kind;
        return badSignature(signature).toException();
      });
}

kj::Promise<kj::Own<capnp::MessageReader>> readConnectRequest(kj::AsyncInputStream& in,
                                                              PreambleLimits limits) {
  return readMessageAfterSignature(in, limits, touchConnectRequest);
}

kj::Promise<kj::Own<capnp::MessageReader>> readConnectResponse(kj::AsyncInputStream& in,
                                                               PreambleLimits limits) {
  auto signature = kj::heapArray<kj::byte>(SIGNATURE_SIZE);
  auto ptr = signature.asPtr();
  return readExactly(in, ptr, "signature")
      .then([&in, limits, signature = kj::mv(signature)]()
                -> kj::Promise<kj::Own<capnp::MessageReader>> {
        KJ_IF_MAYBE(error, checkDataSignature(signature)) return error->toException();
        return readMessageAfterSignature(in, limits, touchConnectResponse);
      });
}

kj::Array<kj::byte> encodeConnectRequest(schema::ConnectRequest::Reader request) {
  capnp::MallocMessageBuilder builder(request.totalSize().wordCount + 1);
  builder.setRoot(request);
  return encodePreamble(builder);
}

kj::Array<kj::byte> encodeConnectResponse(schema::ConnectResponse::Reader response) {
  capnp::MallocMessageBuilder builder(response.totalSize().wordCount + 1);
  builder.setRoot(response);
  return encodePreamble(builder);
}

kj::Promise<void> writeConnectRequest(kj::AsyncOutputStream& out,
                                      schema::ConnectRequest::Reader request) {
  return writeAll(out, encodeConnectRequest(request));
}

kj::Promise<void> writeConnectResponse(kj::AsyncOutputStream& out,
                                       schema::ConnectResponse::Reader response) {
  return writeAll(out, encodeConnectResponse(response));
}

kj::Promise<void> writeConnectResponseError(kj::AsyncOutputStream& out, kj::StringPtr error) {
  capnp::MallocMessageBuilder builder(error.size() / WORD_BYTES + 8);
  builder.initRoot<schema::ConnectResponse>().setError(error);
  return writeAll(out, encodePreamble(builder));
}

kj::OneOf<DecodedPreamble, WireError> decodeConnectRequest(kj::ArrayPtr<const kj::byte> bytes,
                                                           PreambleLimits limits) {
  return decodePreamble(bytes, limits, touchConnectRequest);
}

kj::OneOf<DecodedPreamble, WireError> decodeConnectResponse(kj::ArrayPtr<const kj::byte> bytes,
                                                            PreambleLimits limits) {
  return decodePreamble(bytes, limits, touchConnectResponse);
}

}  // namespace cfqt::wire
