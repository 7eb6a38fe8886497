#pragma once
// Data-stream preamble codec (PROTOCOL.md §6.1, §6.2): the 6-byte stream signature, the 2-byte
// ASCII version "01" and one unpacked (standard framing) capnp message, a ConnectRequest from the
// edge or a ConnectResponse from the client. Also recognises the RPC-stream signature (§6.8).
//
// Everything read here is untrusted: failures never assert, they reject with a kj::Exception made
// by WireError::toException() (classify with wireErrorCode()). Messages returned by the readers
// have been validated eagerly: every field of the root struct was read once under the limits, so
// later accessors on the returned root cannot throw.

#include "wire/quic_metadata_protocol.capnp.h"
#include "wire/wire-error.h"

#include <capnp/message.h>
#include <kj/async-io.h>
#include <kj/one-of.h>

namespace cfqt::wire {

constexpr kj::byte DATA_STREAM_SIGNATURE[6] = {0x0A, 0x36, 0xCD, 0x12, 0xA1, 0x3E};
// First bytes of an edge-opened data stream and of the client's answer on it.
constexpr kj::byte RPC_STREAM_SIGNATURE[6] = {0x52, 0xBB, 0x82, 0x5C, 0xDB, 0x65};
// First bytes of an edge-opened stream carrying a capnp-rpc session (no version bytes follow).
constexpr kj::byte PROTOCOL_VERSION[2] = {'0', '1'};
// Always written; any 2 bytes are accepted on read (other values are logged at INFO, which is
// off unless kj::_::Debug::setLogLevel() enabled it, i.e. "debug").
constexpr size_t SIGNATURE_SIZE = 6;
constexpr size_t PREAMBLE_SIZE = 8;  // signature + version

enum class StreamKind { DATA, RPC };

struct PreambleLimits {
  size_t maxMessageBytes = 64 * 1024;
  // Upper bound of the capnp message (segment table + segments), checked against the segment
  // table *before* anything is allocated. Over it: TOO_LARGE.
  kj::uint maxSegments = 512;
  // More segments than this: MALFORMED (Go's library accepts at most 512).
  uint64_t traversalLimitWords = 64 * 1024;
  // capnp::ReaderOptions::traversalLimitInWords used while validating (protects against pointer
  // amplification; 64 Ki words = 8x the default message limit). Exceeded: MALFORMED.
  int nestingLimit = 16;
  // capnp::ReaderOptions::nestingLimit used while validating. Exceeded: MALFORMED.
};

// ---------------------------------------------------------------------------------------------
// Asynchronous readers. `in` must stay valid until the returned promise settles. They read
// exactly the preamble and the message, never more, so the body that follows stays in `in`.
// Exceptions of `in` itself (a stream reset, ...) pass through unchanged.

kj::Promise<StreamKind> readStreamSignature(kj::AsyncInputStream& in);
// Reads exactly 6 bytes. Rejects with BAD_SIGNATURE for an unknown signature, TRUNCATED
// (DISCONNECTED) on EOF before 6 bytes.

kj::Promise<kj::Own<capnp::MessageReader>> readConnectRequest(
    kj::AsyncInputStream& in, PreambleLimits limits = {});
// Call after readStreamSignature() resolved to DATA: reads the 2 version bytes and one capnp
// message, validated as a ConnectRequest. The caller does `->getRoot<schema::ConnectRequest>()`.
// Rejects with TRUNCATED, TOO_LARGE or MALFORMED.

kj::Promise<kj::Own<capnp::MessageReader>> readConnectResponse(
    kj::AsyncInputStream& in, PreambleLimits limits = {});
// Edge side: reads the WHOLE preamble itself (signature + version + message), since an edge only
// ever expects the data signature in answer. Rejects with BAD_SIGNATURE (any other signature,
// including RPC_STREAM_SIGNATURE), TRUNCATED, TOO_LARGE or MALFORMED. The caller does
// `->getRoot<schema::ConnectResponse>()`.

// ---------------------------------------------------------------------------------------------
// Asynchronous writers. Each writes signature + "01" + message in ONE write() (§6.1 caution:
// cloudflared reads the version with a single Read). The bytes are owned by the returned promise;
// `out` must stay valid until it settles.

kj::Promise<void> writeConnectRequest(kj::AsyncOutputStream& out,
                                      schema::ConnectRequest::Reader request);
kj::Promise<void> writeConnectResponse(kj::AsyncOutputStream& out,
                                       schema::ConnectResponse::Reader response);
kj::Promise<void> writeConnectResponseError(kj::AsyncOutputStream& out, kj::StringPtr error);
// ConnectResponse{error = error, metadata = []} (what 2023.7.3 sends when the origin failed).

// ---------------------------------------------------------------------------------------------
// Synchronous forms (tests, benchmarks, and callers that already hold the bytes).

kj::Array<kj::byte> encodeConnectRequest(schema::ConnectRequest::Reader request);
kj::Array<kj::byte> encodeConnectResponse(schema::ConnectResponse::Reader response);
// The complete preamble: signature + "01" + unpacked capnp message (exactly what the writers send).

struct DecodedPreamble {
  kj::Own<capnp::MessageReader> message;  // validated; owns a copy of the message bytes
  kj::byte version[2];                    // the version bytes as received
  size_t consumed;                        // bytes of `bytes` used (preamble + message)
};

kj::OneOf<DecodedPreamble, WireError> decodeConnectRequest(
    kj::ArrayPtr<const kj::byte> bytes, PreambleLimits limits = {});
kj::OneOf<DecodedPreamble, WireError> decodeConnectResponse(
    kj::ArrayPtr<const kj::byte> bytes, PreambleLimits limits = {});
// Decode a complete preamble (data signature + version + message) from the start of `bytes`;
// trailing bytes (a body) are left alone, see `consumed`. TRUNCATED if `bytes` ends early.

kj::Maybe<WireError> validateConnectRequest(capnp::MessageReader& message);
kj::Maybe<WireError> validateConnectResponse(capnp::MessageReader& message);
// Read every field of the root once (inside runCatchingExceptions); MALFORMED on any capnp error.
// Note the traversal budget of `message` is consumed; the readers above therefore validate with
// the limits and then hand out a fresh reader over the same bytes.

}  // namespace cfqt::wire
