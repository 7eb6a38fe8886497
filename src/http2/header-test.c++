// Golden tests of the HTTP/2 transport's header codec: the cases of cloudflared's
// connection/header_test.go, the header-related cases of connection/http2_test.go and
// connection/h2mux_header_test.go (2023.7.3), and TestShouldFlushHeaders of
// connection/connection_test.go (HEAD). Expected serialized strings were computed independently
// (Python's base64 with the '=' padding stripped), not with this code.

#include "http2/header.h"

#include "wire/fuzz-mutator.h"

#include <kj/test.h>

namespace cfqt::http2 {
namespace {

struct H {
  kj::StringPtr name;
  kj::StringPtr value;
};

kj::Array<wire::Header> list(std::initializer_list<H> items) {
  auto builder = kj::heapArrayBuilder<wire::Header>(items.size());
  for (auto& item: items) builder.add(wire::Header{kj::str(item.name), kj::str(item.value)});
  return builder.finish();
}

kj::String show(kj::ArrayPtr<const wire::Header> headers) {
  kj::Vector<kj::String> parts;
  for (auto& h: headers) parts.add(kj::str("{", h.name, ": ", h.value, "}"));
  return kj::strArray(parts, ", ");
}

bool same(kj::ArrayPtr<const wire::Header> a, kj::ArrayPtr<const wire::Header> b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); i++) {
    if (a[i].name != b[i].name || a[i].value != b[i].value) return false;
  }
  return true;
}

kj::Array<wire::Header> deserializeOk(kj::StringPtr serialized) {
  KJ_SWITCH_ONEOF(deserializeHeaders(serialized)) {
    KJ_CASE_ONEOF(headers, kj::Array<wire::Header>) { return kj::mv(headers); }
    KJ_CASE_ONEOF(error, wire::WireError) {
      KJ_FAIL_ASSERT("unexpected error", serialized, error.toString());
    }
  }
  KJ_UNREACHABLE;
}

wire::WireError deserializeError(kj::ArrayPtr<const char> serialized) {
  auto result = deserializeHeaders(serialized);
  KJ_ASSERT(result.is<wire::WireError>(), "accepted",
            show(result.get<kj::Array<wire::Header>>()));
  return kj::mv(result.get<wire::WireError>());
}

void expectRoundTrip(kj::ArrayPtr<const wire::Header> headers) {
  auto serialized = serializeResponseHeaders(headers);
  auto back = deserializeOk(serialized);
  KJ_EXPECT(same(back, headers), show(headers), show(back));
}

// ---------------------------------------------------------------------------------------------
// serializeResponseHeaders / deserializeHeaders

KJ_TEST("base64 is the standard alphabet without padding (RFC 4648 vectors)") {
  // header.go:43 `headerEncoding = base64.RawStdEncoding`.
  KJ_EXPECT(serializeResponseHeaders(list({{"", ""}})) == ":");
  KJ_EXPECT(serializeResponseHeaders(list({{"f", "fo"}})) == "Zg:Zm8");
  KJ_EXPECT(serializeResponseHeaders(list({{"foo", "foob"}})) == "Zm9v:Zm9vYg");
  KJ_EXPECT(serializeResponseHeaders(list({{"fooba", "foobar"}})) == "Zm9vYmE:Zm9vYmFy");
  KJ_EXPECT(serializeResponseHeaders(list({{"\xfb\xff", "\xff\xff\xff"}})) == "+/8:////");
  // Two headers: ';' between pairs, none after the last.
  KJ_EXPECT(serializeResponseHeaders(list({{"f", "fo"}, {"foo", "foob"}})) ==
            "Zg:Zm8;Zm9v:Zm9vYg");
}

KJ_TEST("TestSerializeHeaders: ':', ';', control bytes, empty names and values") {
  // header_test.go:13. Go serializes a map (random order) and compares sorted lists; here the
  // order is the list's, so the exact string can be checked too.
  auto mock = list({
      {"Mock-Header-One", "Mock header one value"},
      {"Mock-Header-One", "three"},
      {"Mock-Header-Two-Long", "Mock header two value\nlong"},
      {":;", ":;"},
      {":;", ";:"},
      {":", ":"},
      {";", ";"},
      {";;", ";;"},
      {"Empty values", ""},
      {"Empty values", ""},
      {"", "Empty key"},
      {"control\tcharacter\b\n", "value\n\b\t"},
      {";\v:", ":\v;"},
  });
  auto serialized = serializeResponseHeaders(mock);
  KJ_EXPECT(serialized ==
            "TW9jay1IZWFkZXItT25l:TW9jayBoZWFkZXIgb25lIHZhbHVl;TW9jay1IZWFkZXItT25l:dGhyZWU;"
            "TW9jay1IZWFkZXItVHdvLUxvbmc:TW9jayBoZWFkZXIgdHdvIHZhbHVlCmxvbmc;Ojs:Ojs;Ojs:Ozo;"
            "Og:Og;Ow:Ow;Ozs:Ozs;RW1wdHkgdmFsdWVz:;RW1wdHkgdmFsdWVz:;:RW1wdHkga2V5;"
            "Y29udHJvbAljaGFyYWN0ZXIICg:dmFsdWUKCAk;Ows6:Ogs7", serialized);
  auto back = deserializeOk(serialized);
  KJ_EXPECT(back.size() == 13);
  KJ_EXPECT(same(back, mock), show(back));
}

KJ_TEST("TestSerializeNoHeaders: no headers serialize to \"\" and back to none") {
  // header_test.go:61
  auto serialized = serializeResponseHeaders(nullptr);
  KJ_EXPECT(serialized == "");
  KJ_EXPECT(deserializeOk(serialized).size() == 0);
}

KJ_TEST("TestDeserializeMalformed and other malformed values are errors, never asserts") {
  // header_test.go:71: the four cases of the Go test.
  for (auto input: {"malformed data"_kj, "bW9jawo="_kj, "bW9jawo=:ZGF0YQo=:bW9jawo="_kj,
                    "::"_kj}) {
    auto error = deserializeError(input);
    KJ_EXPECT(error.code == wire::WireErrorCode::BAD_HEADER, input);
    KJ_EXPECT(error.message.startsWith("Unable to deserialize headers: "), error.message);
  }
  KJ_EXPECT(deserializeError("Zg"_kj).message ==
            "Unable to deserialize headers: pair 0 has 0 ':' separators (want 1)");
  KJ_EXPECT(deserializeError("Zg:Zm8;a:b:c"_kj).message ==
            "Unable to deserialize headers: pair 1 has 2 ':' separators (want 1)");
  // Padding is an illegal character for RawStdEncoding (Go: CorruptInputError at the '=').
  KJ_EXPECT(deserializeError("Zg==:Zm8"_kj).message ==
            "Unable to deserialize headers: illegal base64 data at input byte 2 of the name of "
            "pair 0");
  KJ_EXPECT(deserializeError("Zg:Zm8="_kj).message ==
            "Unable to deserialize headers: illegal base64 data at input byte 3 of the value of "
            "pair 0");
  // The URL-safe alphabet is not the standard one.
  deserializeError("Zg:-_8"_kj);
  // A final group of a single character cannot encode a byte (Go: offset of that group).
  KJ_EXPECT(deserializeError("Zm9vY:Zg"_kj).message ==
            "Unable to deserialize headers: illegal base64 data at input byte 4 of the name of "
            "pair 0");
  deserializeError(";;Zg:Z;"_kj);
  // Bytes outside the alphabet: space, NUL, non-ASCII, '%'.
  deserializeError("Z g:Zg"_kj);
  deserializeError(kj::StringPtr("Zg:Z\0g", 6));
  deserializeError("Zg:Z\xc3\xa9"_kj);
  deserializeError("Zg:Zg%3D"_kj);
  // A valid pair after a bad one does not rescue it.
  deserializeError("Zg:Zm8;!!:Zg"_kj);
}

KJ_TEST("deserialize: what Go's DeserializeHeaders accepts") {
  // Empty pairs are skipped (header.go:112).
  KJ_EXPECT(deserializeOk(""_kj).size() == 0);
  KJ_EXPECT(deserializeOk(";"_kj).size() == 0);
  KJ_EXPECT(deserializeOk(";;;"_kj).size() == 0);
  KJ_EXPECT(same(deserializeOk(";Zg:Zm8;;"_kj), list({{"f", "fo"}})));
  // ":" alone is a header with an empty name and an empty value.
  KJ_EXPECT(same(deserializeOk(":"_kj), list({{"", ""}})));
  KJ_EXPECT(same(deserializeOk(":;:"_kj), list({{"", ""}, {"", ""}})));
  // Not strict: the unused bits of a short final group may be non-zero ("QR" -> "A").
  KJ_EXPECT(same(deserializeOk("QR:QUI"_kj), list({{"A", "AB"}})));
  KJ_EXPECT(same(deserializeOk("QUJD:QUJDRA"_kj), list({{"ABC", "ABCD"}})));
  // '\r' and '\n' are skipped; the result keeps Go's DecodedLen(len) size, zero-filled.
  auto crlf = deserializeOk("Z\ng:Zm\r\n8"_kj);
  KJ_ASSERT(crlf.size() == 1);
  KJ_EXPECT(crlf[0].name == kj::StringPtr("f\0", 2), crlf[0].name.size());
  KJ_EXPECT(crlf[0].value == kj::StringPtr("fo\0", 3), crlf[0].value.size());
  KJ_EXPECT(same(deserializeOk("\n:\r"_kj), list({{"", ""}})));
  // The input need not be NUL-terminated.
  auto text = "Zg:Zm8;Zm9v:Zm9vYg"_kj;
  KJ_EXPECT(same(deserializeOk(kj::heapString(text.slice(0, 6))), list({{"f", "fo"}})));
  KJ_SWITCH_ONEOF(deserializeHeaders(text.asArray().slice(0, 6))) {
    KJ_CASE_ONEOF(headers, kj::Array<wire::Header>) { KJ_EXPECT(headers.size() == 1); }
    KJ_CASE_ONEOF(error, wire::WireError) { KJ_FAIL_EXPECT(error.toString()); }
  }
}

KJ_TEST("non-ASCII, NUL and every byte value round-trip") {
  auto nonAscii = list({{"X-Caf\xc3\xa9", "\xe2\x98\x83 \xff\x00\x80"_kj}});
  KJ_EXPECT(serializeResponseHeaders(nonAscii) == "WC1DYWbDqQ:4piDIP8AgA");
  expectRoundTrip(nonAscii);

  kj::Vector<char> all;
  for (kj::uint i = 0; i < 256; i++) all.add(char(i));
  auto allBytes = kj::heapString(all.asPtr());
  for (size_t length = 0; length <= 64; length++) {
    auto piece = kj::heapString(allBytes.slice(256 - length).asArray());
    auto headers = kj::heapArray<wire::Header>(1);
    headers[0] = wire::Header{kj::heapString(allBytes.slice(length).asArray()), kj::mv(piece)};
    expectRoundTrip(headers);
  }
}

KJ_TEST("BenchmarkH1ResponseToH2ResponseHeaders's real-world value decodes and re-encodes") {
  // h2mux_header_test.go:622: a serialized value captured from a browser request.
  auto ser =
      "eC1mb3J3YXJkZWQtcHJvdG8:aHR0cHM;dXBncmFkZS1pbnNlY3VyZS1yZXF1ZXN0cw:MQ;"
      "YWNjZXB0LWxhbmd1YWdl:ZW4tVVMsZW47cT0wLjkscnU7cT0wLjg;YWNjZXB0LWVuY29kaW5n:Z3ppcA;"
      "eC1mb3J3YXJkZWQtZm9y:MTczLjI0NS42MC42;dXNlci1hZ2VudA:TW96aWxsYS81LjAgKE1hY2ludG9zaDsgSW50"
      "ZWwgTWFjIE9TIFggMTBfMTRfNikgQXBwbGVXZWJLaXQvNTM3LjM2IChLSFRNTCwgbGlrZSBHZWNrbykgQ2hyb21l"
      "Lzg0LjAuNDE0Ny44OSBTYWZhcmkvNTM3LjM2;c2VjLWZldGNoLW1vZGU:bmF2aWdhdGU;Y2RuLWxvb3A:Y2xvdW"
      "RmbGFyZQ;c2VjLWZldGNoLWRlc3Q:ZG9jdW1lbnQ;c2VjLWZldGNoLXVzZXI:PzE;c2VjLWZldGNoLXNpdGU:bm9"
      "uZQ;Y29va2ll:X19jZmR1aWQ9ZGNkOWZjOGNjNWMxMzE0NTMyYTFkMjhlZDEyOWRhOTYwMTU2OTk1MTYzNDsgX1"
      "9jZl9ibT1mYzY2MzMzYzAzZmM0MWFiZTZmOWEyYzI2ZDUwOTA0YzIxYzZhMTQ2LTE1OTU2MjIzNDEtMTgwMC1BZT"
      "VzS2pIU2NiWGVFM05mMUhrTlNQMG1tMHBLc2pQWkloVnM1Z2g1SkNHQkFhS1UxVDB2b003alBGN3FjMHVSR2NjZG"
      "crWHdhL1EzbTJhQzdDVU4xZ2M9;YWNjZXB0:dGV4dC9odG1sLGFwcGxpY2F0aW9uL3hodG1sK3htbCxhcHBsaWNh"
      "dGlvbi94bWw7cT0wLjksaW1hZ2Uvd2VicCxpbWFnZS9hcG5nLCovKjtxPTAuOCxhcHBsaWNhdGlvbi9zaWduZWQt"
      "ZXhjaGFuZ2U7dj1iMztxPTAuOQ"_kj;
  auto expected = list({
      {"x-forwarded-proto", "https"},
      {"upgrade-insecure-requests", "1"},
      {"accept-language", "en-US,en;q=0.9,ru;q=0.8"},
      {"accept-encoding", "gzip"},
      {"x-forwarded-for", "173.245.60.6"},
      {"user-agent",
       "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_14_6) AppleWebKit/537.36 (KHTML, like Gecko) "
       "Chrome/84.0.4147.89 Safari/537.36"},
      {"sec-fetch-mode", "navigate"},
      {"cdn-loop", "cloudflare"},
      {"sec-fetch-dest", "document"},
      {"sec-fetch-user", "?1"},
      {"sec-fetch-site", "none"},
      {"cookie",
       "__cfduid=dcd9fc8cc5c1314532a1d28ed129da9601569951634; __cf_bm=fc66333c03fc41abe6f9a2c26d"
       "50904c21c6a146-1595622341-1800-Ae5sKjHScbXeE3Nf1HkNSP0mm0pKsjPZIhVs5gh5JCGBAaKU1T0voM7jP"
       "F7qc0uRGccdg+Xwa/Q3m2aC7CUN1gc="},
      {"accept",
       "text/html,application/xhtml+xml,application/xml;q=0.9,image/webp,image/apng,*/*;q=0.8,"
       "application/signed-exchange;v=b3;q=0.9"},
  });
  auto decoded = deserializeOk(ser);
  KJ_EXPECT(same(decoded, expected), show(decoded));
  KJ_EXPECT(serializeResponseHeaders(decoded) == ser);
}

KJ_TEST("TestHeaderSize: a 5 MiB value and many headers round-trip") {
  // h2mux_header_test.go:577 uses randSeq(5 MiB) over ":;,+/=a-zA-Z" from rand.NewSource(17);
  // here the same alphabet from the project's fixed-seed generator.
  constexpr kj::StringPtr LETTERS = ":;,+/=abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"_kj;
  fuzz::Rng rng(17);
  auto large = kj::heapString(5 * 1024 * 1024);
  for (auto& c: large) c = LETTERS[rng.below(LETTERS.size())];
  auto headers = kj::heapArray<wire::Header>(1);
  headers[0] = wire::Header{kj::str("User-header"), kj::mv(large)};
  auto built = buildResponseHeaders(200, headers);
  KJ_ASSERT(built[1].name == RESPONSE_USER_HEADERS);
  auto back = deserializeOk(built[1].value);
  KJ_ASSERT(back.size() == 1);
  KJ_EXPECT(back[0].name == "User-header");
  KJ_EXPECT(back[0].value == headers[0].value);

  // 2000 headers of random bytes and lengths (0..40), repeats included.
  kj::Vector<wire::Header> many;
  for (size_t i = 0; i < 2000; i++) {
    auto name = kj::heapString(rng.below(41));
    for (auto& c: name) c = char(rng.byte());
    auto value = kj::heapString(rng.below(41));
    for (auto& c: value) c = char(rng.byte());
    many.add(wire::Header{kj::mv(name), kj::mv(value)});
    if (rng.chance(10)) many.add(wire::Header{kj::str(many.back().name), kj::str("again")});
  }
  expectRoundTrip(many);
}

// ---------------------------------------------------------------------------------------------
// Control-header rules

KJ_TEST("TestIsControlResponseHeader / TestIsNotControlResponseHeader") {
  // header_test.go:87 and :101 (both versions), header.go:46.
  for (auto rules: {HeaderRules::CLOUDFLARED_2023_7_3, HeaderRules::CLOUDFLARED_2026_8_2}) {
    for (auto name: {"cf-int-sample-header"_kj, "cf-cloudflared-sample-header"_kj,
                     ":sample-pseudo-header"_kj, ":"_kj, "cf-int-"_kj, "cf-cloudflared-"_kj,
                     "Cf-Int-Cloudflared-Tracing"_kj, "CF-CLOUDFLARED-RESPONSE-META"_kj}) {
      KJ_EXPECT(isControlResponseHeader(name, rules), name);
    }
    for (auto name: {"mock-header"_kj, "another-sample-header"_kj, "upgrade"_kj, "connection"_kj,
                     "cf-whatever"_kj, "cf-int"_kj, "cf-cloudflared"_kj, "x-cf-int-a"_kj, ""_kj,
                     "content-length"_kj, "sec-websocket-accept"_kj, "cf-ray"_kj}) {
      KJ_EXPECT(!isControlResponseHeader(name, rules), name);
    }
  }
  // HEAD's header_test.go adds "cf-proxy-sample-header" (TUN-9849); 2023.7.3 serializes it.
  KJ_EXPECT(isControlResponseHeader("cf-proxy-sample-header", HeaderRules::CLOUDFLARED_2026_8_2));
  KJ_EXPECT(isControlResponseHeader("Cf-Proxy-X", HeaderRules::CLOUDFLARED_2026_8_2));
  KJ_EXPECT(!isControlResponseHeader("cf-proxy-sample-header",
                                     HeaderRules::CLOUDFLARED_2023_7_3));
  KJ_EXPECT(!isControlResponseHeader("cf-proxy", HeaderRules::CLOUDFLARED_2026_8_2));
  KJ_EXPECT(isControlResponseHeader("cf-proxy-sample-header"));  // the default is HEAD's
}

KJ_TEST("IsWebsocketClientHeader") {
  // header.go:53
  for (auto name: {"sec-websocket-accept"_kj, "connection"_kj, "upgrade"_kj, "Upgrade"_kj,
                   "Sec-Websocket-Accept"_kj}) {
    KJ_EXPECT(isWebsocketClientHeader(name), name);
  }
  for (auto name: {"sec-websocket-key"_kj, "sec-websocket-version"_kj, "connections"_kj,
                   "upgrade-insecure-requests"_kj, ""_kj}) {
    KJ_EXPECT(!isWebsocketClientHeader(name), name);
  }
}

KJ_TEST("response meta header values are Go's json.Marshal bytes") {
  // header.go:27-41 (HEAD: also flow_rate_limited, omitempty).
  KJ_EXPECT(RESPONSE_META_ORIGIN == "{\"src\":\"origin\"}");
  KJ_EXPECT(RESPONSE_META_CLOUDFLARED == "{\"src\":\"cloudflared\"}");
  KJ_EXPECT(RESPONSE_META_CLOUDFLARED_FLOW_RATE_LIMITED ==
            "{\"src\":\"cloudflared\",\"flow_rate_limited\":true}");
  KJ_EXPECT(RESPONSE_USER_HEADERS == "cf-cloudflared-response-headers");
  KJ_EXPECT(RESPONSE_META_HEADER == "cf-cloudflared-response-meta");
  KJ_EXPECT(INTERNAL_UPGRADE_HEADER == wire::HEADER_PROXY_CONNECTION_UPGRADE);
  KJ_EXPECT(TRACE_ID_HEADER == wire::HEADER_TRACE_ID);
}

// ---------------------------------------------------------------------------------------------
// Requests

KJ_TEST("classifyRequest: the request kinds of http2_test.go") {
  // Requests as Go's http2.Transport sends them in the tests: pseudo-headers, then the headers
  // set with req.Header.Set (lower case on the wire).
  auto request = [](std::initializer_list<H> extra) {
    kj::Vector<wire::Header> headers;
    headers.add(wire::Header{kj::str(":authority"), kj::str("localhost:8080")});
    headers.add(wire::Header{kj::str(":method"), kj::str("GET")});
    headers.add(wire::Header{kj::str(":path"), kj::str("/")});
    headers.add(wire::Header{kj::str(":scheme"), kj::str("http")});
    for (auto& h: extra) headers.add(wire::Header{kj::str(h.name), kj::str(h.value)});
    headers.add(wire::Header{kj::str("accept-encoding"), kj::str("gzip")});
    headers.add(wire::Header{kj::str("user-agent"), kj::str("Go-http-client/2.0")});
    return headers.releaseAsArray();
  };
  // TestServeHTTP (http2_test.go:94): no internal header.
  KJ_EXPECT(classifyRequest(request({})) == RequestKind::HTTP);
  // TestHTTP2ConfigurationSet (:59)
  KJ_EXPECT(classifyRequest(request({{"cf-cloudflared-proxy-connection-upgrade",
                                      "update-configuration"}})) ==
            RequestKind::UPDATE_CONFIGURATION);
  // TestServeWS (:257), TestNoWriteAfterServeHTTPReturns (:296)
  KJ_EXPECT(classifyRequest(request({{"cf-cloudflared-proxy-connection-upgrade", "websocket"}})) ==
            RequestKind::WEBSOCKET);
  // TestServeControlStream (:351), TestFailRegistration, TestGracefulShutdownHTTP2
  KJ_EXPECT(classifyRequest(request({{"cf-cloudflared-proxy-connection-upgrade",
                                      "control-stream"}})) == RequestKind::CONTROL_STREAM);
  // IsTCPStream (http2.go:415): any non-empty Cf-Cloudflared-Proxy-Src.
  KJ_EXPECT(classifyRequest(request({{"cf-cloudflared-proxy-src", "1"}})) == RequestKind::TCP);
  KJ_EXPECT(classifyRequest(request({{"cf-cloudflared-proxy-src", ""}})) == RequestKind::HTTP);
  // Canonical spellings (h2mux-era tests) match too: Header.Get canonicalises.
  KJ_EXPECT(classifyRequest(list({{"Cf-Cloudflared-Proxy-Connection-Upgrade", "websocket"}})) ==
            RequestKind::WEBSOCKET);
  KJ_EXPECT(classifyRequest(list({{"CF-CLOUDFLARED-PROXY-SRC", "x"}})) == RequestKind::TCP);
  KJ_EXPECT(classifyRequest(nullptr) == RequestKind::HTTP);
}

KJ_TEST("classifyRequest: determineHTTP2Type's order, first values, exact values") {
  // http2.go:373: configuration, websocket, TCP, control stream, HTTP.
  auto up = "cf-cloudflared-proxy-connection-upgrade"_kj;
  auto src = "cf-cloudflared-proxy-src"_kj;
  KJ_EXPECT(classifyRequest(list({{src, "x"}, {up, "update-configuration"}})) ==
            RequestKind::UPDATE_CONFIGURATION);
  KJ_EXPECT(classifyRequest(list({{src, "x"}, {up, "websocket"}})) == RequestKind::WEBSOCKET);
  KJ_EXPECT(classifyRequest(list({{up, "control-stream"}, {src, "x"}})) == RequestKind::TCP);
  KJ_EXPECT(classifyRequest(list({{up, "something-else"}, {src, "x"}})) == RequestKind::TCP);
  // Header.Get: only the first value counts.
  KJ_EXPECT(classifyRequest(list({{up, "websocket"}, {up, "control-stream"}})) ==
            RequestKind::WEBSOCKET);
  KJ_EXPECT(classifyRequest(list({{up, ""}, {up, "control-stream"}})) == RequestKind::HTTP);
  KJ_EXPECT(classifyRequest(list({{src, ""}, {src, "x"}})) == RequestKind::HTTP);
  // Values compare byte for byte: the QUIC-era "Websocket" is plain HTTP here.
  KJ_EXPECT(classifyRequest(list({{up, "Websocket"}})) == RequestKind::HTTP);
  KJ_EXPECT(classifyRequest(list({{up, "websocket "}})) == RequestKind::HTTP);
  KJ_EXPECT(classifyRequest(list({{up, "Control-Stream"}})) == RequestKind::HTTP);
  // A pseudo-header or a near-miss name never matches.
  KJ_EXPECT(classifyRequest(list({{":cf-cloudflared-proxy-src", "x"}})) == RequestKind::HTTP);
  KJ_EXPECT(classifyRequest(list({{"cf-cloudflared-proxy-src-x", "x"}})) == RequestKind::HTTP);

  KJ_EXPECT(requestKindName(RequestKind::CONTROL_STREAM) == "control-stream");
  KJ_EXPECT(requestKindName(RequestKind::UPDATE_CONFIGURATION) == "update-configuration");
  KJ_EXPECT(requestKindName(RequestKind::WEBSOCKET) == "websocket");
  KJ_EXPECT(requestKindName(RequestKind::TCP) == "tcp");
  KJ_EXPECT(requestKindName(RequestKind::HTTP) == "http");
}

KJ_TEST("originRequestHeaders: what reaches the origin proxy") {
  auto in = list({
      {":authority", "x.trycloudflare.com"},
      {":method", "POST"},
      {":path", "/p?q"},
      {":scheme", "https"},
      {"cf-cloudflared-proxy-connection-upgrade", "websocket"},  // stripWebsocketUpgradeHeader
      {"cookie", "a=1"},
      {"x-one", "1"},
      {"cf-trace-id", "abc:def:0:1"},                                // extractTrace
      {"cookie", "b=2"},
      {"expect", "100-Continue"},
      {"trailer", "X-Checksum"},
      {"host", "ignored.example"},
      {"cf-cloudflared-proxy-src", "kept"},
      {"x-one", "2"},
      {"cf-ray", "8a1b2c3d4e5f-LIS"},
      {"Cf-Trace-Id", "again"},
      {"cookie", "c=3"},
      {"x:odd name", "kept verbatim"},
  });
  auto out = originRequestHeaders(in);
  auto expected = list({
      {"Cookie", "a=1; b=2; c=3"},
      {"X-One", "1"},
      {"Host", "ignored.example"},
      {"Cf-Cloudflared-Proxy-Src", "kept"},
      {"X-One", "2"},
      {"Cf-Ray", "8a1b2c3d4e5f-LIS"},
      {"x:odd name", "kept verbatim"},
  });
  KJ_EXPECT(same(out, expected), show(out));

  // One Cookie is left alone; an Expect without the 100-continue token stays.
  auto single = originRequestHeaders(list({{"cookie", "a=1; b=2"}, {"expect", "x-other"}}));
  KJ_EXPECT(same(single, list({{"Cookie", "a=1; b=2"}, {"Expect", "x-other"}})), show(single));
  // "100-continue" as one element of a list, with OWS, drops every Expect value.
  auto listed = originRequestHeaders(list({{"expect", "x-a"}, {"expect", "foo , \t100-continue"}}));
  KJ_EXPECT(listed.size() == 0, show(listed));
  auto nearMiss = originRequestHeaders(list({{"expect", "100-continued"}}));
  KJ_EXPECT(nearMiss.size() == 1);
  KJ_EXPECT(originRequestHeaders(nullptr).size() == 0);
}

KJ_TEST("requestHost: :authority, else Host") {
  KJ_EXPECT(requestHost(list({{":authority", "a.example"}, {"host", "b.example"}})) ==
            "a.example");
  KJ_EXPECT(requestHost(list({{":authority", ""}, {"host", "b.example"}})) == "b.example");
  KJ_EXPECT(requestHost(list({{"host", "b.example"}, {"host", "c.example"}})) == "b.example");
  KJ_EXPECT(requestHost(list({{":method", "GET"}})) == "");
}

// ---------------------------------------------------------------------------------------------
// Responses

KJ_TEST("TestH1ResponseToH2ResponseHeaders, on the HTTP/2 transport's rules") {
  // h2mux_header_test.go:540 feeds the same map to h2mux's converter; http2.go:238
  // WriteRespHeaders differs in that Content-Length is serialized as well, the meta header is
  // added and cf-int-/cf-cloudflared- headers are still dropped.
  auto user = list({
      {"User-header-one", ""},
      {"User-header-two", "1"},
      {"User-header-two", "2"},
      {"cf-header", "cf-value"},
      {"cf-int-header", "cf-int-value"},
      {"cf-cloudflared-header", "cf-cloudflared-value"},
      {"Content-Length", "123"},
  });
  for (auto rules: {HeaderRules::CLOUDFLARED_2023_7_3, HeaderRules::CLOUDFLARED_2026_8_2}) {
    auto built = buildResponseHeaders(200, user, rules);
    auto expected = list({
        {":status", "200"},
        {"cf-cloudflared-response-headers",
         "VXNlci1oZWFkZXItb25l:;VXNlci1oZWFkZXItdHdv:MQ;VXNlci1oZWFkZXItdHdv:Mg;"
         "Y2YtaGVhZGVy:Y2YtdmFsdWU;Q29udGVudC1MZW5ndGg:MTIz"},
        {"cf-cloudflared-response-meta", "{\"src\":\"origin\"}"},
        {"content-length", "123"},
    });
    KJ_EXPECT(same(built, expected), show(built));
    auto userBack = deserializeOk(built[1].value);
    KJ_EXPECT(same(userBack, list({{"User-header-one", ""},
                                   {"User-header-two", "1"},
                                   {"User-header-two", "2"},
                                   {"cf-header", "cf-value"},
                                   {"Content-Length", "123"}})),
              show(userBack));
  }
}

KJ_TEST("buildResponseHeaders: 101 -> 200, meta origin, empty serialized set") {
  // TestServeWS (http2_test.go:286): "http2RespWriter should rewrite status 101 to 200".
  auto ws = buildResponseHeaders(101,
                                 list({{"Upgrade", "websocket"},
                                       {"Connection", "Upgrade"},
                                       {"Sec-Websocket-Accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="}}));
  KJ_ASSERT(ws.size() == 3, show(ws));
  KJ_EXPECT(ws[0].name == ":status" && ws[0].value == "200");
  KJ_EXPECT(ws[2].name == "cf-cloudflared-response-meta" && ws[2].value == RESPONSE_META_ORIGIN);
  KJ_EXPECT(same(deserializeOk(ws[1].value),
                 list({{"Upgrade", "websocket"},
                       {"Connection", "Upgrade"},
                       {"Sec-Websocket-Accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="}})));
  // TestServeHTTP (:94): origin statuses pass through with meta {"src":"origin"}.
  for (kj::uint status: {100u, 200u, 204u, 400u, 500u, 502u, 999u}) {
    auto built = buildResponseHeaders(status, nullptr);
    auto expected = list({{":status", kj::str(status)},
                          {"cf-cloudflared-response-headers", ""},
                          {"cf-cloudflared-response-meta", "{\"src\":\"origin\"}"}});
    KJ_EXPECT(same(built, expected), show(built));
  }
  KJ_EXPECT_THROW_MESSAGE("invalid HTTP status", buildResponseHeaders(99, nullptr));
  KJ_EXPECT_THROW_MESSAGE("invalid HTTP status", buildResponseHeaders(1000, nullptr));
}

KJ_TEST("buildResponseHeaders: control headers, tracing, content-length, grouping") {
  auto user = list({
      {"Content-Type", "text/html"},
      {":status", "418"},                            // a control header: dropped
      {"Cf-Int-Cloudflared-Tracing", "c3BhbnM"},     // real header, not serialized
      {"Set-Cookie", "a=1"},
      {"Cf-Cloudflared-Response-Meta", "forged"},    // dropped
      {"Content-Length", "007"},                     // sent verbatim: ParseUint accepts it
      {"Cf-Proxy-Internal", "p"},                    // HEAD: control; 2023.7.3: serialized
      {"Set-Cookie", "b=2"},                         // grouped with the first Set-Cookie
      {"Content-Length", "9"},                       // only the first value is sent
      {"Cf-Int-Cloudflared-Tracing", "bad\nvalue"},  // invalid field value: dropped
      {"Cf-Ray", "r"},
  });
  auto head = buildResponseHeaders(200, user, HeaderRules::CLOUDFLARED_2026_8_2);
  KJ_EXPECT(same(head, list({{":status", "200"},
                             {"cf-cloudflared-response-headers",
                              serializeResponseHeaders(list({{"Content-Type", "text/html"},
                                                             {"Set-Cookie", "a=1"},
                                                             {"Set-Cookie", "b=2"},
                                                             {"Content-Length", "007"},
                                                             {"Content-Length", "9"},
                                                             {"Cf-Ray", "r"}}))},
                             {"cf-cloudflared-response-meta", "{\"src\":\"origin\"}"},
                             {"cf-int-cloudflared-tracing", "c3BhbnM"},
                             {"content-length", "007"}})),
            show(head));
  auto old = buildResponseHeaders(200, user, HeaderRules::CLOUDFLARED_2023_7_3);
  KJ_ASSERT(old.size() == 5);
  auto oldUser = deserializeOk(old[1].value);
  KJ_EXPECT(same(oldUser, list({{"Content-Type", "text/html"},
                                {"Set-Cookie", "a=1"},
                                {"Set-Cookie", "b=2"},
                                {"Content-Length", "007"},
                                {"Content-Length", "9"},
                                {"Cf-Proxy-Internal", "p"},
                                {"Cf-Ray", "r"}})),
            show(oldUser));

  // Content-Length that strconv.ParseUint(v, 10, 63) refuses is not sent as a real header.
  for (auto bad: {""_kj, "-1"_kj, "+5"_kj, " 5"_kj, "5 "_kj, "0x10"_kj, "1_000"_kj,
                  "9223372036854775808"_kj}) {
    auto built = buildResponseHeaders(200, list({{"Content-Length", bad}}));
    KJ_EXPECT(built.size() == 3, bad, show(built));
  }
  auto maxLength = buildResponseHeaders(200, list({{"content-length", "9223372036854775807"}}));
  KJ_EXPECT(maxLength.size() == 4 && maxLength[3].value == "9223372036854775807",
            show(maxLength));
}

KJ_TEST("buildErrorResponseHeaders: 502 with meta {\"src\":\"cloudflared\"}") {
  // TestServeHTTP "Proxy error" (http2_test.go:121), TestFailRegistration (:402); http2.go:334.
  KJ_EXPECT(same(buildErrorResponseHeaders(),
                 list({{":status", "502"},
                       {"cf-cloudflared-response-meta", "{\"src\":\"cloudflared\"}"}})));
  KJ_EXPECT(same(buildErrorResponseHeaders(true),
                 list({{":status", "502"},
                       {"cf-cloudflared-response-meta",
                        "{\"src\":\"cloudflared\",\"flow_rate_limited\":true}"}})));
}

KJ_TEST("TestShouldFlushHeaders (HEAD) and 2023.7.3's narrower rule") {
  // connection_test.go:215 at HEAD; connection.go shouldFlush at both versions.
  struct Case {
    kj::Array<wire::Header> headers;
    bool head;
    bool old;
  };
  Case cases[] = {
      {list({{"content-type", "application/json"}, {"content-length", "1"}}), false, false},
      {list({{"content-type", "text/html"}, {"content-length", "1"}}), false, false},
      {list({{"content-type", "text/event-stream"}, {"content-length", "1"}}), true, true},
      {list({{"content-type", "application/grpc"}, {"content-length", "1"}}), true, true},
      {list({{"content-type", "application/x-ndjson"}, {"content-length", "1"}}), true, false},
      {list({{"content-type", "application/json"}}), true, false},
      {list({{"content-type", "application/json"}, {"content-length", "-1"},
             {"transfer-encoding", "chunked"}}), true, false},
      // Prefix and case rules, first values only.
      {list({{"Content-Type", "Text/Event-Stream; charset=utf-8"}, {"Content-Length", "1"}}),
       true, true},
      {list({{"Content-Type", "application/grpc+proto"}, {"Content-Length", "1"}}), true, true},
      {list({{"Content-Type", "text/html"}, {"Content-Type", "text/event-stream"},
             {"Content-Length", "1"}}), false, false},
      {list({{"Content-Length", ""}, {"Content-Length", "5"}}), true, false},
      {list({{"Content-Length", "5"}, {"Transfer-Encoding", "gzip, CHUNKED"}}), true, false},
  };
  for (auto& c: cases) {
    KJ_EXPECT(shouldFlush(RequestKind::HTTP, c.headers, HeaderRules::CLOUDFLARED_2026_8_2) ==
              c.head, show(c.headers));
    KJ_EXPECT(shouldFlush(RequestKind::HTTP, c.headers, HeaderRules::CLOUDFLARED_2023_7_3) ==
              c.old, show(c.headers));
  }
  // connection.go Type.shouldFlush: WebSocket, TCP and control streams always flush.
  auto plain = list({{"Content-Length", "1"}});
  for (auto rules: {HeaderRules::CLOUDFLARED_2023_7_3, HeaderRules::CLOUDFLARED_2026_8_2}) {
    KJ_EXPECT(shouldFlush(RequestKind::WEBSOCKET, plain, rules));
    KJ_EXPECT(shouldFlush(RequestKind::TCP, plain, rules));
    KJ_EXPECT(shouldFlush(RequestKind::CONTROL_STREAM, plain, rules));
    KJ_EXPECT(!shouldFlush(RequestKind::UPDATE_CONFIGURATION, plain, rules));
    KJ_EXPECT(!shouldFlush(RequestKind::HTTP, plain, rules));
  }
}

}  // namespace
}  // namespace cfqt::http2
