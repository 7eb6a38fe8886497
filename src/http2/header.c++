#include "http2/header.h"

#include <kj/debug.h>
#include <kj/map.h>
#include <kj/vector.h>

#include <string.h>

namespace cfqt::http2 {

namespace {

constexpr char BASE64_ALPHABET[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
constexpr kj::byte INVALID = 0xff;

struct DecodeTable {
  kj::byte values[256];
  constexpr DecodeTable(): values() {
    for (auto& v: values) v = INVALID;
    for (kj::uint i = 0; i < 64; i++) values[kj::byte(BASE64_ALPHABET[i])] = kj::byte(i);
  }
};
constexpr DecodeTable DECODE;

char toLower(char c) { return ('A' <= c && c <= 'Z') ? c - 'A' + 'a' : c; }

bool equalsIgnoreCase(kj::ArrayPtr<const char> a, kj::StringPtr b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); i++) {
    if (toLower(a[i]) != toLower(b[i])) return false;
  }
  return true;
}

bool startsWithIgnoreCase(kj::ArrayPtr<const char> text, kj::StringPtr lowerPrefix) {
  return text.size() >= lowerPrefix.size() &&
         equalsIgnoreCase(text.slice(0, lowerPrefix.size()), lowerPrefix);
}

size_t encodedLength(size_t n) { return (n * 8 + 5) / 6; }  // RawStdEncoding.EncodedLen

char* encodeBase64(kj::ArrayPtr<const char> in, char* out) {
  // Standard alphabet, no padding. Returns the end of the written text.
  auto bytes = in.asBytes();
  size_t i = 0;
  for (; i + 3 <= bytes.size(); i += 3) {
    uint32_t v = uint32_t(bytes[i]) << 16 | uint32_t(bytes[i + 1]) << 8 | bytes[i + 2];
    *out++ = BASE64_ALPHABET[v >> 18];
    *out++ = BASE64_ALPHABET[(v >> 12) & 0x3f];
    *out++ = BASE64_ALPHABET[(v >> 6) & 0x3f];
    *out++ = BASE64_ALPHABET[v & 0x3f];
  }
  size_t rest = bytes.size() - i;
  if (rest > 0) {
    uint32_t v = uint32_t(bytes[i]) << 16;
    if (rest == 2) v |= uint32_t(bytes[i + 1]) << 8;
    *out++ = BASE64_ALPHABET[v >> 18];
    *out++ = BASE64_ALPHABET[(v >> 12) & 0x3f];
    if (rest == 2) *out++ = BASE64_ALPHABET[(v >> 6) & 0x3f];
  }
  return out;
}

struct DecodeFailure {
  size_t offset;  // Go's CorruptInputError value
};

kj::OneOf<kj::String, DecodeFailure> decodeBase64(kj::ArrayPtr<const char> in) {
  // Go's base64.RawStdEncoding.Decode into a buffer of DecodedLen(len(in)) = len*6/8 zero bytes,
  // the whole buffer being the result (see header.h). Quanta of 4 characters, '\r'/'\n' skipped.
  auto out = kj::heapString(in.size() * 6 / 8);
  memset(out.begin(), 0, out.size());
  size_t written = 0;
  size_t si = 0;
  for (;;) {
    kj::byte quantum[4] = {0, 0, 0, 0};
    size_t j = 0;
    while (j < 4 && si < in.size()) {
      kj::byte c = kj::byte(in[si++]);
      kj::byte v = DECODE.values[c];
      if (v != INVALID) {
        quantum[j++] = v;
      } else if (c != '\n' && c != '\r') {
        return DecodeFailure{si - 1};
      }
    }
    if (j == 0) break;                             // end of input on a quantum boundary
    if (j == 1) return DecodeFailure{si - j};      // one lone character cannot encode a byte
    uint32_t v = uint32_t(quantum[0]) << 18 | uint32_t(quantum[1]) << 12 |
                 uint32_t(quantum[2]) << 6 | quantum[3];
    kj::byte bytes[3] = {kj::byte(v >> 16), kj::byte(v >> 8), kj::byte(v)};
    // Unused low bits of a short final quantum are ignored (Go is not strict).
    for (size_t k = 0; k < j - 1; k++) {
      // `written` stays within the buffer: every decoded byte consumed >= 8/6 characters.
      out[written++] = char(bytes[k]);
    }
    if (j < 4) break;                              // a short quantum only at the end of input
  }
  return kj::mv(out);
}

kj::StringPtr firstValue(kj::ArrayPtr<const wire::Header> headers, kj::StringPtr name) {
  // Go's Header.Get: the first value of `name`, "" if there is none.
  for (auto& h: headers) {
    if (equalsIgnoreCase(h.name, name)) return h.value;
  }
  return "";
}

bool isValidContentLength(kj::StringPtr text) {
  // strconv.ParseUint(text, 10, 63) == nil: decimal digits only, value < 2^63.
  if (text.size() == 0) return false;
  constexpr uint64_t MAX = (uint64_t(1) << 63) - 1;
  uint64_t value = 0;
  for (char c: text) {
    if (c < '0' || c > '9') return false;
    uint64_t digit = c - '0';
    if (value > (MAX - digit) / 10) return false;
    value = value * 10 + digit;
  }
  return true;
}

bool isValidFieldValue(kj::StringPtr value) {
  // httpguts.ValidHeaderFieldValue (on the bytes; NUL is a control byte too).
  for (char c: value) {
    kj::byte b = kj::byte(c);
    if ((b < ' ' && b != '\t') || b == 0x7f) return false;
  }
  return true;
}

bool containsIgnoreCase(kj::StringPtr haystack, kj::StringPtr lowerNeedle) {
  if (lowerNeedle.size() > haystack.size()) return false;
  for (size_t i = 0; i + lowerNeedle.size() <= haystack.size(); i++) {
    if (equalsIgnoreCase(haystack.slice(i).slice(0, lowerNeedle.size()), lowerNeedle)) return true;
  }
  return false;
}

bool isOws(char c) { return c == ' ' || c == '\t'; }

bool valueContainsToken(kj::StringPtr value, kj::StringPtr lowerToken) {
  // httpguts.headerValueContainsToken: comma-separated elements, trimmed of SP/HTAB, compared
  // ASCII case-insensitively.
  size_t start = 0;
  for (size_t i = 0; i <= value.size(); i++) {
    if (i < value.size() && value[i] != ',') continue;
    size_t b = start, e = i;
    while (b < e && isOws(value[b])) b++;
    while (e > b && isOws(value[e - 1])) e--;
    if (equalsIgnoreCase(value.slice(b).slice(0, e - b), lowerToken)) return true;
    start = i + 1;
  }
  return false;
}

wire::Header header(kj::StringPtr name, kj::StringPtr value) {
  return wire::Header{kj::str(name), kj::str(value)};
}

}  // namespace

kj::String serializeResponseHeaders(kj::ArrayPtr<const wire::Header> headers) {
  size_t size = 0;
  for (auto& h: headers) {
    if (&h != headers.begin()) size++;  // ';'
    size += encodedLength(h.name.size()) + 1 + encodedLength(h.value.size());
  }
  auto result = kj::heapString(size);
  char* out = result.begin();
  for (auto& h: headers) {
    if (&h != headers.begin()) *out++ = ';';
    out = encodeBase64(h.name.asArray(), out);
    *out++ = ':';
    out = encodeBase64(h.value.asArray(), out);
  }
  KJ_ASSERT(out == result.end());
  return result;
}

kj::OneOf<kj::Array<wire::Header>, wire::WireError> deserializeHeaders(
    kj::ArrayPtr<const char> serialized) {
  auto fail = [](kj::String what) {
    return wire::wireError(wire::WireErrorCode::BAD_HEADER,
                           kj::str("Unable to deserialize headers: ", what));
  };
  kj::Vector<wire::Header> result;
  size_t pairIndex = 0;
  size_t start = 0;
  for (size_t i = 0; i <= serialized.size(); i++) {
    if (i < serialized.size() && serialized[i] != ';') continue;
    auto pair = serialized.slice(start, i);
    start = i + 1;
    size_t index = pairIndex++;
    if (pair.size() == 0) continue;

    size_t colons = 0;
    size_t colon = 0;
    for (size_t k = 0; k < pair.size(); k++) {
      if (pair[k] == ':') {
        if (colons++ == 0) colon = k;
      }
    }
    if (colons != 1) {
      return fail(kj::str("pair ", index, " has ", colons, " ':' separators (want 1)"));
    }
    kj::String parts[2];
    kj::ArrayPtr<const char> encoded[2] = {pair.slice(0, colon),
                                           pair.slice(colon + 1, pair.size())};
    for (kj::uint p = 0; p < 2; p++) {
      KJ_SWITCH_ONEOF(decodeBase64(encoded[p])) {
        KJ_CASE_ONEOF(text, kj::String) { parts[p] = kj::mv(text); }
        KJ_CASE_ONEOF(failure, DecodeFailure) {
          return fail(kj::str("illegal base64 data at input byte ", failure.offset, " of the ",
                              p == 0 ? "name" : "value", " of pair ", index));
        }
      }
    }
    result.add(wire::Header{kj::mv(parts[0]), kj::mv(parts[1])});
  }
  return result.releaseAsArray();
}

bool isControlResponseHeader(kj::StringPtr name, HeaderRules rules) {
  if (name.startsWith(":")) return true;
  if (startsWithIgnoreCase(name, "cf-int-") || startsWithIgnoreCase(name, "cf-cloudflared-")) {
    return true;
  }
  return rules == HeaderRules::CLOUDFLARED_2026_8_2 && startsWithIgnoreCase(name, "cf-proxy-");
}

bool isWebsocketClientHeader(kj::StringPtr name) {
  return equalsIgnoreCase(name, "sec-websocket-accept") || equalsIgnoreCase(name, "connection") ||
         equalsIgnoreCase(name, "upgrade");
}

kj::StringPtr requestKindName(RequestKind kind) {
  switch (kind) {
    case RequestKind::CONTROL_STREAM: return "control-stream";
    case RequestKind::UPDATE_CONFIGURATION: return "update-configuration";
    case RequestKind::WEBSOCKET: return "websocket";
    case RequestKind::TCP: return "tcp";
    case RequestKind::HTTP: return "http";
  }
  return "unknown";
}

RequestKind classifyRequest(kj::ArrayPtr<const wire::Header> headers) {
  kj::StringPtr upgrade = firstValue(headers, INTERNAL_UPGRADE_HEADER);
  if (upgrade == UPGRADE_CONFIGURATION) return RequestKind::UPDATE_CONFIGURATION;
  if (upgrade == UPGRADE_WEBSOCKET) return RequestKind::WEBSOCKET;
  if (firstValue(headers, INTERNAL_TCP_PROXY_SRC_HEADER).size() > 0) {
    return RequestKind::TCP;
  }
  if (upgrade == UPGRADE_CONTROL_STREAM) return RequestKind::CONTROL_STREAM;
  return RequestKind::HTTP;
}

kj::Array<wire::Header> originRequestHeaders(kj::ArrayPtr<const wire::Header> headers) {
  bool dropExpect = false;
  size_t cookies = 0;
  for (auto& h: headers) {
    if (equalsIgnoreCase(h.name, "Expect") && valueContainsToken(h.value, "100-continue")) {
      dropExpect = true;
    }
    if (equalsIgnoreCase(h.name, "Cookie")) cookies++;
  }
  kj::Vector<wire::Header> result(headers.size());
  kj::Maybe<size_t> cookieAt;
  for (auto& h: headers) {
    if (h.name.startsWith(":")) continue;
    auto name = wire::canonicalHeaderName(h.name);
    if (name == "Trailer" || name == INTERNAL_UPGRADE_HEADER || name == TRACE_ID_HEADER ||
        (dropExpect && name == "Expect")) {
      continue;
    }
    if (cookies > 1 && name == "Cookie") {
      KJ_IF_MAYBE(at, cookieAt) {
        auto& merged = result[*at].value;
        merged = kj::str(merged, "; ", h.value);
        continue;
      }
      cookieAt = result.size();
    }
    result.add(wire::Header{kj::mv(name), kj::str(h.value)});
  }
  return result.releaseAsArray();
}

kj::StringPtr requestHost(kj::ArrayPtr<const wire::Header> headers) {
  kj::StringPtr authority = firstValue(headers, ":authority");
  if (authority.size() > 0) return authority;
  return firstValue(headers, "Host");
}

kj::Array<wire::Header> buildResponseHeaders(kj::uint status,
                                             kj::ArrayPtr<const wire::Header> userHeaders,
                                             HeaderRules rules) {
  KJ_REQUIRE(status >= 100 && status <= 999, "invalid HTTP status", status);

  // Group the serialized headers by name, as iterating Go's http.Header map does.
  kj::HashMap<kj::StringPtr, size_t> groupIndex;
  kj::Vector<kj::Vector<const wire::Header*>> groups;
  kj::Vector<kj::StringPtr> tracing;
  kj::Maybe<kj::StringPtr> contentLength;
  size_t serializedCount = 0;
  for (auto& h: userHeaders) {
    if (equalsIgnoreCase(h.name, CONTENT_LENGTH) && contentLength == nullptr) {
      contentLength = h.value.asPtr();
    }
    if (equalsIgnoreCase(h.name, TRACING_RESPONSE_HEADER)) {
      if (isValidFieldValue(h.value)) tracing.add(h.value);
      continue;
    }
    if (!isControlResponseHeader(h.name, rules) || isWebsocketClientHeader(h.name)) {
      size_t index = groupIndex.findOrCreate(h.name.asPtr(), [&]() {
        groups.add();
        return kj::HashMap<kj::StringPtr, size_t>::Entry{h.name.asPtr(), groups.size() - 1};
      });
      groups[index].add(&h);
      serializedCount++;
    }
  }
  kj::Vector<wire::Header> serialized(serializedCount);
  for (auto& group: groups) {
    for (auto h: group) serialized.add(header(h->name, h->value));
  }

  kj::Vector<wire::Header> result(4 + tracing.size());
  result.add(wire::Header{kj::str(":status"), kj::str(status == 101 ? 200 : status)});
  result.add(wire::Header{kj::str(RESPONSE_USER_HEADERS),
                          serializeResponseHeaders(serialized.asPtr())});
  result.add(header(RESPONSE_META_HEADER, RESPONSE_META_ORIGIN));
  for (auto value: tracing) result.add(header(TRACING_RESPONSE_HEADER, value));
  KJ_IF_MAYBE(length, contentLength) {
    if (isValidContentLength(*length)) result.add(header(CONTENT_LENGTH, *length));
  }
  return result.releaseAsArray();
}

kj::Array<wire::Header> buildErrorResponseHeaders(bool flowRateLimited) {
  return kj::arr(header(":status", "502"),
                 header(RESPONSE_META_HEADER, flowRateLimited
                                                  ? RESPONSE_META_CLOUDFLARED_FLOW_RATE_LIMITED
                                                  : RESPONSE_META_CLOUDFLARED));
}

bool shouldFlush(RequestKind kind, kj::ArrayPtr<const wire::Header> userHeaders,
                 HeaderRules rules) {
  switch (kind) {
    case RequestKind::WEBSOCKET:
    case RequestKind::TCP:
    case RequestKind::CONTROL_STREAM:
      return true;
    case RequestKind::UPDATE_CONFIGURATION:
    case RequestKind::HTTP:
      break;
  }
  bool head = rules == HeaderRules::CLOUDFLARED_2026_8_2;
  if (head) {
    if (firstValue(userHeaders, "content-length").size() == 0) return true;
    if (containsIgnoreCase(firstValue(userHeaders, "transfer-encoding"),
                           "chunked")) {
      return true;
    }
  }
  kj::StringPtr contentType = firstValue(userHeaders, "content-type");
  if (startsWithIgnoreCase(contentType, "text/event-stream") ||
      startsWithIgnoreCase(contentType, "application/grpc")) {
    return true;
  }
  return head && startsWithIgnoreCase(contentType, "application/x-ndjson");
}

}  // namespace cfqt::http2
