#include "wire/wire-error.h"

namespace cfqt::wire {

namespace {

constexpr kj::StringPtr PREFIX = "wire: "_kj;

constexpr WireErrorCode ALL_CODES[] = {
    WireErrorCode::BAD_SIGNATURE, WireErrorCode::TRUNCATED,     WireErrorCode::TOO_LARGE,
    WireErrorCode::MALFORMED,     WireErrorCode::BAD_HEADER,    WireErrorCode::BAD_METHOD,
    WireErrorCode::BAD_CONTENT_LENGTH, WireErrorCode::BAD_STATUS,
};

}  // namespace

kj::StringPtr wireErrorCodeName(WireErrorCode code) {
  switch (code) {
    case WireErrorCode::BAD_SIGNATURE: return "BAD_SIGNATURE";
    case WireErrorCode::TRUNCATED: return "TRUNCATED";
    case WireErrorCode::TOO_LARGE: return "TOO_LARGE";
    case WireErrorCode::MALFORMED: return "MALFORMED";
    case WireErrorCode::BAD_HEADER: return "BAD_HEADER";
    case WireErrorCode::BAD_METHOD: return "BAD_METHOD";
    case WireErrorCode::BAD_CONTENT_LENGTH: return "BAD_CONTENT_LENGTH";
    case WireErrorCode::BAD_STATUS: return "BAD_STATUS";
  }
  return "UNKNOWN";
}

kj::String WireError::toString() const {
  return kj::str(PREFIX, wireErrorCodeName(code), ": ", message);
}

kj::Exception WireError::toException() const {
  auto type = code == WireErrorCode::TRUNCATED ? kj::Exception::Type::DISCONNECTED
                                               : kj::Exception::Type::FAILED;
  return kj::Exception(type, __FILE__, __LINE__, toString());
}

WireError wireError(WireErrorCode code, kj::String message) {
  return WireError{code, kj::mv(message)};
}

kj::Maybe<WireErrorCode> wireErrorCode(const kj::Exception& exception) {
  kj::StringPtr description = exception.getDescription();
  if (!description.startsWith(PREFIX)) return nullptr;
  kj::StringPtr rest = description.slice(PREFIX.size());
  for (auto code: ALL_CODES) {
    kj::StringPtr name = wireErrorCodeName(code);
    if (rest.startsWith(name) && rest.size() > name.size() && rest[name.size()] == ':') {
      return code;
    }
  }
  return nullptr;
}

}  // namespace cfqt::wire
