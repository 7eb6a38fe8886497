#include "wire/http-metadata.h"

#include <kj/compat/http.h>
#include <kj/debug.h>

namespace cfqt::wire {

namespace {

bool isTokenChar(char c) {
  if ('a' <= c && c <= 'z') return true;
  if ('A' <= c && c <= 'Z') return true;
  if ('0' <= c && c <= '9') return true;
  switch (c) {
    case '!': case '#': case '$': case '%': case '&': case '\'': case '*': case '+': case '-':
    case '.': case '^': case '_': case '`': case '|': case '~':
      return true;
    default:
      return false;
  }
}

bool containsText(kj::StringPtr haystack, kj::StringPtr needle) {
  if (needle.size() > haystack.size()) return false;
  for (size_t i = 0; i + needle.size() <= haystack.size(); i++) {
    if (memcmp(haystack.begin() + i, needle.begin(), needle.size()) == 0) return true;
  }
  return false;
}

char toLower(char c) { return ('A' <= c && c <= 'Z') ? c - 'A' + 'a' : c; }

bool containsIgnoringCase(kj::StringPtr haystack, kj::StringPtr lowerNeedle) {
  if (lowerNeedle.size() > haystack.size()) return false;
  for (size_t i = 0; i + lowerNeedle.size() <= haystack.size(); i++) {
    bool match = true;
    for (size_t j = 0; j < lowerNeedle.size(); j++) {
      if (toLower(haystack[i + j]) != lowerNeedle[j]) {
        match = false;
        break;
      }
    }
    if (match) return true;
  }
  return false;
}

kj::Maybe<kj::uint> parseStatus(kj::StringPtr text) {
  if (text.size() != 3) return nullptr;
  kj::uint value = 0;
  for (char c: text) {
    if (c < '0' || c > '9') return nullptr;
    value = value * 10 + (c - '0');
  }
  if (value < 100) return nullptr;
  return value;
}

// Shared by requests and responses: "…HttpHeader…" keys must be "<x>:<Name>" (exactly one ':').
kj::OneOf<kj::Maybe<Header>, WireError> decodeHeaderEntry(kj::StringPtr key, kj::StringPtr value) {
  if (!containsText(key, METADATA_HTTP_HEADER)) return kj::Maybe<Header>(nullptr);
  kj::Maybe<size_t> colon = key.findFirst(':');
  size_t at = 0;
  KJ_IF_MAYBE(c, colon) {
    at = *c;
  } else {
    return wireError(WireErrorCode::BAD_HEADER, kj::str("header Key: ", key, " malformed"));
  }
  kj::StringPtr name = key.slice(at + 1);
  if (name.findFirst(':') != nullptr) {
    return wireError(WireErrorCode::BAD_HEADER, kj::str("header Key: ", key, " malformed"));
  }
  if (!isHttpToken(name)) {
    return wireError(WireErrorCode::BAD_HEADER, kj::str("invalid header name in key: ", key));
  }
  if (!isValidHeaderValue(value)) {
    return wireError(WireErrorCode::BAD_HEADER, kj::str("invalid value of header ", name));
  }
  return kj::Maybe<Header>(Header{canonicalHeaderName(name), kj::str(value)});
}

bool isStrippedRequestHeader(kj::StringPtr canonicalName) {
  return canonicalName == HEADER_PROXY_CONNECTION_UPGRADE || canonicalName == HEADER_TRACE_ID;
}

kj::Maybe<kj::StringPtr> firstValue(const kj::Vector<Header>& headers, kj::StringPtr name) {
  for (auto& header: headers) {
    if (header.name == name) return header.value.asPtr();
  }
  return nullptr;
}

void setMetadata(schema::Metadata::Builder entry, kj::StringPtr key, kj::StringPtr value) {
  entry.setKey(key);
  entry.setVal(value);
}

// Go's canonicalisation in place: callers checked that every byte is a token character.
void canonicalizeInPlace(kj::ArrayPtr<char> name) {
  bool upper = true;
  for (char& c: name) {
    if (upper && 'a' <= c && c <= 'z') {
      c = c - 'a' + 'A';
    } else if (!upper && 'A' <= c && c <= 'Z') {
      c = c - 'A' + 'a';
    }
    upper = c == '-';
  }
}

void setHeaderEntry(schema::Metadata::Builder entry, kj::StringPtr name, kj::StringPtr value) {
  // "HttpHeader:" + canonical name, written straight into the message (no temporary strings).
  auto key = entry.initKey(METADATA_HTTP_HEADER.size() + 1 + name.size());
  memcpy(key.begin(), METADATA_HTTP_HEADER.begin(), METADATA_HTTP_HEADER.size());
  key[METADATA_HTTP_HEADER.size()] = ':';
  auto out = key.asArray().slice(METADATA_HTTP_HEADER.size() + 1, key.size());
  memcpy(out.begin(), name.begin(), name.size());
  bool token = true;
  for (char c: name) token = token && isTokenChar(c);
  if (token) canonicalizeInPlace(out);
  entry.setVal(value);
}

}  // namespace

kj::Maybe<uint64_t> parseContentLength(kj::StringPtr text) {
  size_t i = 0;
  if (text.size() > 0 && text[0] == '+') i = 1;
  if (i == text.size()) return nullptr;
  uint64_t value = 0;
  constexpr uint64_t MAX = uint64_t(kj::maxValue) >> 1;  // int64 max
  for (; i < text.size(); i++) {
    char c = text[i];
    if (c < '0' || c > '9') return nullptr;
    uint64_t digit = c - '0';
    if (value > (MAX - digit) / 10) return nullptr;
    value = value * 10 + digit;
  }
  return value;
}


bool isHttpToken(kj::StringPtr text) {
  if (text.size() == 0) return false;
  for (char c: text) {
    if (!isTokenChar(c)) return false;
  }
  return true;
}

bool isValidHeaderValue(kj::StringPtr value) {
  for (char c: value) {
    auto b = static_cast<unsigned char>(c);
    if ((b < 0x20 && b != '\t') || b == 0x7f) return false;
  }
  return true;
}

kj::String canonicalHeaderName(kj::StringPtr name) {
  for (char c: name) {
    if (!isTokenChar(c)) return kj::str(name);
  }
  auto result = kj::heapString(name);
  canonicalizeInPlace(result);
  return result;
}

kj::OneOf<HttpRequestHead, WireError> decodeRequest(schema::ConnectRequest::Reader request) {
  HttpRequestHead head;
  head.dest = kj::str(request.getDest());
  head.type = request.getType();
  kj::StringPtr method = "GET";
  kj::StringPtr host = "";
  for (auto entry: request.getMetadata()) {
    kj::StringPtr key = entry.getKey();
    kj::StringPtr value = entry.getVal();
    bool isHeader = false;
    // (KJ_CASE_ONEOF is a loop: no `continue` inside it.)
    KJ_SWITCH_ONEOF(decodeHeaderEntry(key, value)) {
      KJ_CASE_ONEOF(error, WireError) { return kj::mv(error); }
      KJ_CASE_ONEOF(maybeHeader, kj::Maybe<Header>) {
        KJ_IF_MAYBE(header, maybeHeader) {
          isHeader = true;
          if (!isStrippedRequestHeader(header->name)) head.headers.add(kj::mv(*header));
        }
      }
    }
    if (isHeader) {
      // done
    } else if (key == METADATA_HTTP_METHOD) {
      method = value;
    } else if (key == METADATA_HTTP_HOST) {
      host = value;
    }
  }
  if (!isHttpToken(method)) {
    return wireError(WireErrorCode::BAD_METHOD, kj::str("invalid HTTP method '", method, "'"));
  }
  if (!isValidHeaderValue(host)) {
    return wireError(WireErrorCode::BAD_HEADER, kj::str("invalid HttpHost value"));
  }
  head.method = kj::str(method);
  head.host = kj::str(host);

  KJ_IF_MAYBE(length, firstValue(head.headers, "Content-Length")) {
    if (length->size() > 0) {
      KJ_IF_MAYBE(n, parseContentLength(*length)) {
        head.contentLength = *n;
      } else {
        return wireError(WireErrorCode::BAD_CONTENT_LENGTH,
                         kj::str("invalid Content-Length '", *length, "'"));
      }
    }
  }
  KJ_IF_MAYBE(encoding, firstValue(head.headers, "Transfer-Encoding")) {
    head.chunked = containsIgnoringCase(*encoding, "chunked");
  }
  return kj::mv(head);
}

bool requestHasBody(const HttpRequestHead& head) {
  if (head.type == schema::ConnectionType::WEBSOCKET) return true;
  if (head.chunked) return true;
  return head.contentLength.orDefault(0) > 0;
}

kj::OneOf<HttpResponseHead, WireError> decodeResponse(schema::ConnectResponse::Reader response) {
  HttpResponseHead head;
  if (response.getError().size() > 0) head.error = kj::str(response.getError());
  kj::StringPtr statusText;
  bool hasStatus = false;
  for (auto entry: response.getMetadata()) {
    kj::StringPtr key = entry.getKey();
    kj::StringPtr value = entry.getVal();
    bool isHeader = false;
    KJ_SWITCH_ONEOF(decodeHeaderEntry(key, value)) {
      KJ_CASE_ONEOF(error, WireError) { return kj::mv(error); }
      KJ_CASE_ONEOF(maybeHeader, kj::Maybe<Header>) {
        KJ_IF_MAYBE(header, maybeHeader) {
          isHeader = true;
          head.headers.add(kj::mv(*header));
        }
      }
    }
    if (!isHeader && key == METADATA_HTTP_STATUS) {
      statusText = value;
      hasStatus = true;
    }
  }
  if (head.error != nullptr) return kj::mv(head);
  if (hasStatus) {
    KJ_IF_MAYBE(code, parseStatus(statusText)) {
      head.status = *code;
      return kj::mv(head);
    }
    return wireError(WireErrorCode::BAD_STATUS, kj::str("invalid HttpStatus '", statusText, "'"));
  }
  return wireError(WireErrorCode::BAD_STATUS, kj::str("ConnectResponse without HttpStatus"));
}

void encodeRequest(schema::ConnectRequest::Builder out, kj::StringPtr dest,
                   schema::ConnectionType type, kj::StringPtr method, kj::StringPtr host,
                   kj::ArrayPtr<const Header> headers) {
  out.setDest(dest);
  out.setType(type);
  auto metadata = out.initMetadata(2 + headers.size());
  setMetadata(metadata[0], METADATA_HTTP_METHOD, method);
  setMetadata(metadata[1], METADATA_HTTP_HOST, host);
  for (size_t i = 0; i < headers.size(); i++) {
    setHeaderEntry(metadata[2 + i], headers[i].name, headers[i].value);
  }
}

void encodeRequest(schema::ConnectRequest::Builder out, const HttpRequestHead& head) {
  encodeRequest(out, head.dest, head.type, head.method, head.host, head.headers);
}

void encodeResponse(schema::ConnectResponse::Builder out, kj::uint status,
                    kj::ArrayPtr<const Header> headers) {
  auto metadata = out.initMetadata(1 + headers.size());
  setMetadata(metadata[0], METADATA_HTTP_STATUS, kj::str(status));
  for (size_t i = 0; i < headers.size(); i++) {
    setHeaderEntry(metadata[1 + i], headers[i].name, headers[i].value);
  }
}

void encodeResponse(schema::ConnectResponse::Builder out, kj::uint status,
                    const kj::HttpHeaders& headers) {
  auto metadata = out.initMetadata(1 + headers.size());
  setMetadata(metadata[0], METADATA_HTTP_STATUS, kj::str(status));
  size_t i = 1;
  headers.forEach([&](kj::StringPtr name, kj::StringPtr value) {
    if (i < metadata.size()) setHeaderEntry(metadata[i++], name, value);
  });
}

void encodeResponseError(schema::ConnectResponse::Builder out, kj::StringPtr error) {
  out.setError(error);
}

void addToHttpHeaders(kj::ArrayPtr<const Header> headers, kj::HttpHeaders& out) {
  for (auto& header: headers) out.add(header.name.asPtr(), header.value.asPtr());
}

kj::Vector<Header> headersFromHttp(const kj::HttpHeaders& headers) {
  kj::Vector<Header> result(headers.size());
  headers.forEach([&](kj::StringPtr name, kj::StringPtr value) {
    result.add(Header{canonicalHeaderName(name), kj::str(value)});
  });
  return result;
}

}  // namespace cfqt::wire
