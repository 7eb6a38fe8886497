#pragma once
// Header codec of cloudflared's HTTP/2 transport (PROTOCOL.md §6.10; cloudflared
// connection/header.go and connection/http2.go). Pure functions, no I/O and no HTTP/2 library:
// the transport (nghttp2, later in this folder) hands them the header lists it received and sends
// the lists they build.
//
// On that transport cfqt is the HTTP/2 *server*: the edge sends each eyeball request (and the
// control stream, configuration updates, WebSocket and TCP streams) as an HTTP/2 request whose
// headers are plain HTTP/2 headers. cfqt answers with `:status`, a few control headers, and ALL
// the origin's own headers packed into one header, `cf-cloudflared-response-headers`, so that
// HTTP/2 header validation never applies to HTTP/1 header values:
//
//   base64(name) ":" base64(value) [";" base64(name) ":" base64(value)]...
//
// base64 is the standard alphabet without padding (Go's base64.RawStdEncoding).
//
// Header names in lists given to and returned by this module: HTTP/2 names are lower case on the
// wire; user (origin) header names are expected in Go's canonical form, as
// wire::headersFromHttp() produces them. Every name comparison here is ASCII case-insensitive.

#include "wire/http-metadata.h"
#include "wire/wire-error.h"

#include <kj/array.h>
#include <kj/one-of.h>
#include <kj/string.h>

namespace cfqt::http2 {

// Header names (lower case, as sent on HTTP/2).
constexpr kj::StringPtr RESPONSE_USER_HEADERS = "cf-cloudflared-response-headers"_kj;
constexpr kj::StringPtr RESPONSE_META_HEADER = "cf-cloudflared-response-meta"_kj;
constexpr kj::StringPtr REQUEST_USER_HEADERS = "cf-cloudflared-request-headers"_kj;
// h2mux only (the old transport); HTTP/2 requests never carry it. Listed for completeness.
constexpr kj::StringPtr TRACING_RESPONSE_HEADER = "cf-int-cloudflared-tracing"_kj;
// Sent as a real HTTP/2 response header (all values), never serialized.
constexpr kj::StringPtr CONTENT_LENGTH = "content-length"_kj;

// `cf-cloudflared-response-meta` values: json.Marshal of {Source, FlowRateLimited}, byte for byte.
constexpr kj::StringPtr RESPONSE_META_ORIGIN = "{\"src\":\"origin\"}"_kj;
constexpr kj::StringPtr RESPONSE_META_CLOUDFLARED = "{\"src\":\"cloudflared\"}"_kj;
constexpr kj::StringPtr RESPONSE_META_CLOUDFLARED_FLOW_RATE_LIMITED =
    "{\"src\":\"cloudflared\",\"flow_rate_limited\":true}"_kj;
// HEAD only: cloudflared's error answer when its flow limiter refused a TCP flow.

// Request side (Go canonical spelling; matched case-insensitively).
constexpr kj::StringPtr INTERNAL_UPGRADE_HEADER = "Cf-Cloudflared-Proxy-Connection-Upgrade"_kj;
constexpr kj::StringPtr INTERNAL_TCP_PROXY_SRC_HEADER = "Cf-Cloudflared-Proxy-Src"_kj;
constexpr kj::StringPtr TRACE_ID_HEADER = "Cf-Trace-Id"_kj;
// Values of INTERNAL_UPGRADE_HEADER (compared byte for byte, case-sensitively, as Go does).
constexpr kj::StringPtr UPGRADE_WEBSOCKET = "websocket"_kj;
constexpr kj::StringPtr UPGRADE_CONTROL_STREAM = "control-stream"_kj;
constexpr kj::StringPtr UPGRADE_CONFIGURATION = "update-configuration"_kj;

enum class HeaderRules {
  CLOUDFLARED_2023_7_3,
  CLOUDFLARED_2026_8_2,
  // HEAD also treats `cf-proxy-*` response headers as control headers (TUN-9849) and flushes
  // every response that has no Content-Length, is chunked or is application/x-ndjson.
};
constexpr HeaderRules DEFAULT_HEADER_RULES = HeaderRules::CLOUDFLARED_2026_8_2;
// cfqt announces itself as cloudflared 2026.8.2, so it follows HEAD where the two differ.

// ---------------------------------------------------------------------------------------------
// The serialized header value.

kj::String serializeResponseHeaders(kj::ArrayPtr<const wire::Header> headers);
// header.go SerializeHeaders: one `b64(name):b64(value)` pair per header, in the given order,
// joined by ';' (no trailing ';'). Empty list -> "". Any bytes are allowed in names and values
// (empty ones too): base64 never produces ':' or ';'. Go iterates an http.Header map, so it
// emits the values of one name together and the names in random order; buildResponseHeaders()
// groups by name before calling this.

kj::OneOf<kj::Array<wire::Header>, wire::WireError> deserializeHeaders(
    kj::ArrayPtr<const char> serialized);
// header.go DeserializeHeaders, for untrusted input: splits on ';', skips empty pairs, splits each
// pair on ':' and requires exactly two parts (either may be empty), decodes both as unpadded
// standard base64. Order and repeats are kept. Pass a kj::StringPtr/kj::String or raw bytes, not a
// C string literal (whose array would include the terminating NUL, an illegal character). Any
// failure -> WireError BAD_HEADER, message "Unable to deserialize headers: ..." (Go's text plus
// what went wrong). Never throws.
//
// Go's decoder is not strict, and this one matches it: '\r' and '\n' are skipped anywhere; a
// final group of 2 or 3 characters may have non-zero unused bits; '=' is an illegal character; a
// final group of one character is an error. Go sizes each output as DecodedLen(len(input)) =
// len*6/8 and keeps the whole buffer, so when line breaks were skipped the decoded text is
// followed by zero bytes up to that size -- reproduced too (HTTP/2 field values cannot hold CR or
// LF, so it only matters for fidelity).

// ---------------------------------------------------------------------------------------------
// Control-header rules.

bool isControlResponseHeader(kj::StringPtr name, HeaderRules rules = DEFAULT_HEADER_RULES);
// header.go IsControlResponseHeader, on the lower-cased name: starts with ':', "cf-int-" or
// "cf-cloudflared-" (HEAD: or "cf-proxy-"). "cf-whatever" is NOT a control header.
bool isWebsocketClientHeader(kj::StringPtr name);
// header.go IsWebsocketClientHeader: "sec-websocket-accept", "connection" or "upgrade"
// (lower-cased name). Those are always serialized even where the control rule would drop them.

enum class RequestKind {
  CONTROL_STREAM,        // capnp RPC over the request and response bodies
  UPDATE_CONFIGURATION,  // body {"version":N,"config":{...}}; answer body is the JSON response
  WEBSOCKET,             // proxy as a WebSocket upgrade; the response 101 is sent as 200
  TCP,                   // warp-routing TCP stream (refused for quick tunnels)
  HTTP,                  // everything else: proxy to the origin
};
kj::StringPtr requestKindName(RequestKind kind);
// "control-stream", "update-configuration", "websocket", "tcp", "http" (for logs).

RequestKind classifyRequest(kj::ArrayPtr<const wire::Header> headers);
// http2.go determineHTTP2Type over an incoming request's header list (pseudo-headers may be
// included; they never match). Like Go's Header.Get, only the FIRST value of a name counts.
// In this order: Cf-Cloudflared-Proxy-Connection-Upgrade == "update-configuration" ->
// UPDATE_CONFIGURATION; == "websocket" -> WEBSOCKET; a non-empty first Cf-Cloudflared-Proxy-Src ->
// TCP; upgrade == "control-stream" -> CONTROL_STREAM; else HTTP. Values are case-sensitive
// ("Websocket" is HTTP on this transport).

kj::Array<wire::Header> originRequestHeaders(kj::ArrayPtr<const wire::Header> headers);
// The user headers of an incoming HTTP or WebSocket request as cloudflared hands them to the
// origin proxy: names canonicalised (wire::canonicalHeaderName, as Go's HTTP/2 server does), order
// and repeats kept, except:
//  - pseudo-headers (':'-prefixed) are dropped (they become method/URL/Host);
//  - several Cookie headers become one, at the first one's place, values joined by "; "
//    (net/http2 server, RFC 7540 §8.1.2.5);
//  - every Expect header is dropped when one of them lists the token "100-continue" (the Go
//    server answers 100-continue itself), and every Trailer header is dropped (net/http2);
//  - every Cf-Cloudflared-Proxy-Connection-Upgrade (http2.go stripWebsocketUpgradeHeader) and
//    every Cf-Trace-Id (tracing.extractTrace) is removed.
// Cf-Cloudflared-Proxy-Src and Host are kept (Go's client ignores a Host entry; see
// requestHost()). Names and values are not validated here: the HTTP/2 layer has done it.

kj::StringPtr requestHost(kj::ArrayPtr<const wire::Header> headers);
// The request's Host as Go's HTTP/2 server sets it: the first `:authority`, or if that is empty
// or absent the first Host header; "" if neither. Points into `headers`.

// ---------------------------------------------------------------------------------------------
// Response header lists (what cfqt sends in its HEADERS frame).

kj::Array<wire::Header> buildResponseHeaders(kj::uint status,
                                             kj::ArrayPtr<const wire::Header> userHeaders,
                                             HeaderRules rules = DEFAULT_HEADER_RULES);
// http2.go WriteRespHeaders followed by net/http2's encoding of the header map. `status` is the
// final status and must be 100..999 (the origin layer guarantees it; Go's WriteHeader panics
// otherwise). Names are lower case, in this order (Go's server writes :status, then the map's
// keys sorted, then content-length):
//   :status                          status, except 101 -> "200" (HTTP/2 has no 101)
//   cf-cloudflared-response-headers  serializeResponseHeaders() of every user header that is not
//                                    a control header or is a WebSocket client header, grouped by
//                                    name (names in order of first appearance, values in order);
//                                    present even when empty ("")
//   cf-cloudflared-response-meta     {"src":"origin"}
//   cf-int-cloudflared-tracing       each value of that user header (never serialized), values
//                                    that are not valid field values dropped as Go's encoder does
//   content-length                   the FIRST Content-Length value, verbatim, if it is a decimal
//                                    integer in [0, 2^63) (strconv.ParseUint(v, 10, 63)); also
//                                    kept in the serialized set
// Not added (the transport's business, Go's net/http2 does it itself): `date`, a sniffed
// `content-type`, and a computed `content-length` when the handler finished within one write.

kj::Array<wire::Header> buildErrorResponseHeaders(bool flowRateLimited = false);
// http2.go WriteErrorResponse: `:status: 502` and `cf-cloudflared-response-meta:
// {"src":"cloudflared"}` (HEAD, `flowRateLimited`: {"src":"cloudflared","flow_rate_limited":true}),
// nothing else; the body is empty. Only valid before any response header was sent.

bool shouldFlush(RequestKind kind, kj::ArrayPtr<const wire::Header> userHeaders,
                 HeaderRules rules = DEFAULT_HEADER_RULES);
// Whether every body write must be flushed at once (http2RespWriter.shouldFlush):
// WEBSOCKET, TCP and CONTROL_STREAM always; otherwise connection.go shouldFlush(origin headers):
// the first Content-Type, lower-cased, starts with "text/event-stream" or "application/grpc"
// (HEAD also "application/x-ndjson"); HEAD also when the first Content-Length is absent or empty,
// or the first Transfer-Encoding contains "chunked" (any case).

}  // namespace cfqt::http2
