#pragma once
// HTTP <-> ConnectRequest/ConnectResponse metadata mapping (PROTOCOL.md §6.3, §6.4, §6.9).
//
// Request: metadata HttpMethod, HttpHost and one `HttpHeader:<Name>` entry per header value
// (repeats and order kept). Response: `HttpStatus` first, then one `HttpHeader:<Name>` per value.
// Header names are matched case-insensitively and carried in Go's canonical MIME form
// (`Content-Type`, `Www-Authenticate`). Decoders take untrusted readers (from data-stream.h's
// validated readers) and return WireError instead of throwing.

#include "wire/quic_metadata_protocol.capnp.h"
#include "wire/wire-error.h"

#include <kj/one-of.h>
#include <kj/string.h>
#include <kj/vector.h>

namespace kj {
class HttpHeaders;
}

namespace cfqt::wire {

constexpr kj::StringPtr METADATA_HTTP_METHOD = "HttpMethod"_kj;
constexpr kj::StringPtr METADATA_HTTP_HOST = "HttpHost"_kj;
constexpr kj::StringPtr METADATA_HTTP_STATUS = "HttpStatus"_kj;
constexpr kj::StringPtr METADATA_HTTP_HEADER = "HttpHeader"_kj;  // key prefix "HttpHeader:"
constexpr kj::StringPtr HEADER_PROXY_CONNECTION_UPGRADE =
    "Cf-Cloudflared-Proxy-Connection-Upgrade"_kj;  // internal; stripped from requests
constexpr kj::StringPtr HEADER_TRACE_ID = "Cf-Trace-Id"_kj;  // tracing; stripped from requests

kj::String canonicalHeaderName(kj::StringPtr name);
// Go's textproto.CanonicalMIMEHeaderKey: first letter and letters after '-' upper case, the rest
// lower case (`content-type` -> `Content-Type`, `WWW-AUTHENTICATE` -> `Www-Authenticate`). A name
// containing a byte that is not an HTTP token character is returned unchanged, as Go does.

bool isHttpToken(kj::StringPtr text);
// RFC 7230 token: non-empty, only ALPHA / DIGIT / "!#$%&'*+-.^_`|~".
bool isValidHeaderValue(kj::StringPtr value);
// Go's httpguts.ValidHeaderFieldValue: no control bytes except HTAB, no DEL.

struct Header {
  kj::String name;   // canonical form when produced by this module
  kj::String value;
};

kj::Maybe<uint64_t> parseContentLength(kj::StringPtr text);
// A Content-Length value as Go reads it (strconv.ParseInt(s, 10, 64), values >= 0, optional
// leading '+'); nullptr if it is not one.

struct HttpRequestHead {
  kj::String dest;                // ConnectRequest.dest, verbatim (absolute URL or path)
  schema::ConnectionType type = schema::ConnectionType::HTTP;
  // raw value; unknown enumerants are kept, the caller refuses them
  kj::String method;              // last HttpMethod; "GET" if none (Go's NewRequest default)
  kj::String host;                // last HttpHost; "" if none
  kj::Vector<Header> headers;     // canonical names, order and repeats kept, internal ones removed
  kj::Maybe<uint64_t> contentLength;  // from the first Content-Length header, if present/non-empty
  bool chunked = false;           // first Transfer-Encoding value contains "chunked" (any case)
};

struct HttpResponseHead {
  kj::Maybe<kj::String> error;    // non-null: ConnectResponse.error was set (origin failed); then
                                  // status is 0 and headers hold whatever headers came with it
  kj::uint status = 0;               // HttpStatus (100..999) when error is null
  kj::Vector<Header> headers;     // canonical names, order and repeats kept
};

kj::OneOf<HttpRequestHead, WireError> decodeRequest(schema::ConnectRequest::Reader request);
// cloudflared's rules: any key *containing* "HttpHeader" is a header and must split on ':' into
// exactly two parts (else BAD_HEADER "header Key: <key> malformed"); header names must be tokens
// and values valid (BAD_HEADER, Go's HTTP client would refuse them too); HttpMethod/HttpHost: last
// occurrence wins; method must be a token (BAD_METHOD); Content-Length (first value, if non-empty)
// must be a decimal integer >= 0, optional leading '+' (BAD_CONTENT_LENGTH).
// Strips every Cf-Cloudflared-Proxy-Connection-Upgrade and Cf-Trace-Id header.
// Other metadata keys (cf-trace-id, FlowID, ...) are ignored.

bool requestHasBody(const HttpRequestHead& head);
// §6.3: the stream after the ConnectRequest carries a body iff the request is a WebSocket, or
// Transfer-Encoding contains "chunked", or Content-Length > 0. Otherwise the stream bytes are to
// be ignored (the body is empty).

kj::OneOf<HttpResponseHead, WireError> decodeResponse(schema::ConnectResponse::Reader response);
// Edge side. Non-empty error: head.error set, status 0. Otherwise HttpStatus (last occurrence) must
// be a decimal 100..999 (else BAD_STATUS); HttpHeader:<Name> entries as for requests (BAD_HEADER);
// unknown keys ignored.

void encodeRequest(schema::ConnectRequest::Builder out, kj::StringPtr dest,
                   schema::ConnectionType type, kj::StringPtr method, kj::StringPtr host,
                   kj::ArrayPtr<const Header> headers);
void encodeRequest(schema::ConnectRequest::Builder out, const HttpRequestHead& head);
// Emulator side. Metadata: HttpMethod, HttpHost, then one HttpHeader:<Canonical-Name> per header,
// in order. Nothing is validated or stripped (tests may send anything).

void encodeResponse(schema::ConnectResponse::Builder out, kj::uint status,
                    kj::ArrayPtr<const Header> headers);
void encodeResponse(schema::ConnectResponse::Builder out, kj::uint status,
                    const kj::HttpHeaders& headers);
// Client side. Metadata: HttpStatus first, then one HttpHeader:<Canonical-Name> per value. No
// filtering (QUIC forwards everything; dropping Transfer-Encoding is the origin layer's job).

void encodeResponseError(schema::ConnectResponse::Builder out, kj::StringPtr error);
// ConnectResponse{error, metadata = []}.

// kj::HttpHeaders helpers.

void addToHttpHeaders(kj::ArrayPtr<const Header> headers, kj::HttpHeaders& out);
// out.add(name, value) for each header. Does NOT copy: `headers` must outlive `out` (or call
// out.takeOwnership()). Names/values must be valid (decodeRequest/decodeResponse guarantee it),
// otherwise kj throws.

kj::Vector<Header> headersFromHttp(const kj::HttpHeaders& headers);
// Every (name, value) of `headers` in kj's iteration order, names canonicalised, values copied.
// Note kj::HttpHeaders joins repeated *registered* headers with ", " (except Set-Cookie).

}  // namespace cfqt::wire
