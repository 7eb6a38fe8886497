#pragma once
// Typed errors of the wire layer (preamble codec, HTTP metadata mapping). Synchronous parsers
// return them in a kj::OneOf<T, WireError>; asynchronous readers reject with a kj::Exception whose
// description starts with the stable prefix "wire: <CODE>: " so that wireErrorCode() can classify
// it again after it crossed promise chains.

#include <kj/exception.h>
#include <kj/string.h>

namespace cfqt::wire {

enum class WireErrorCode {
  BAD_SIGNATURE,       // the 6 first bytes of a stream are neither the data nor the RPC signature
  TRUNCATED,           // EOF (or a short read) before the preamble / message was complete
  TOO_LARGE,           // the capnp message is over PreambleLimits::maxMessageBytes
  MALFORMED,           // bad segment table, bad pointers, traversal/nesting limit exceeded, ...
  BAD_HEADER,          // "…HttpHeader…" key not HttpHeader:<Name>, or a bad header name/value
  BAD_METHOD,          // HttpMethod is not an HTTP token
  BAD_CONTENT_LENGTH,  // Content-Length is not a non-negative decimal integer
  BAD_STATUS,          // ConnectResponse without error has no/invalid HttpStatus
};

kj::StringPtr wireErrorCodeName(WireErrorCode code);
// "BAD_SIGNATURE", "TRUNCATED", ... (the enumerant's name; stable, used in exception prefixes).

struct WireError {
  WireErrorCode code;
  kj::String message;  // human-readable detail, without the "wire: <CODE>: " prefix

  kj::String toString() const;
  // "wire: <CODE>: <message>"

  kj::Exception toException() const;
  // A kj::Exception whose description is toString(). Type DISCONNECTED for TRUNCATED (the peer
  // went away mid-preamble), FAILED for everything else.
};

WireError wireError(WireErrorCode code, kj::String message);
// Convenience constructor: wireError(WireErrorCode::MALFORMED, kj::str("bad ", x)).

kj::Maybe<WireErrorCode> wireErrorCode(const kj::Exception& exception);
// Classifies an exception produced by WireError::toException() (by its description prefix).
// Returns nullptr for any other exception.

}  // namespace cfqt::wire
