// Tests of the HTTP <-> metadata mapping: canonical names, request/response decoding rules,
// body presence, encoders, kj::HttpHeaders helpers, and every rejection path.

#include "wire/http-metadata.h"

#include <capnp/message.h>
#include <kj/compat/http.h>
#include <kj/test.h>

namespace cfqt::wire {
namespace {

struct Entry {
  kj::StringPtr key;
  kj::StringPtr val;
};

kj::Own<capnp::MallocMessageBuilder> requestWith(std::initializer_list<Entry> entries,
                                                 schema::ConnectionType type =
                                                     schema::ConnectionType::HTTP) {
  auto builder = kj::heap<capnp::MallocMessageBuilder>();
  auto request = builder->initRoot<schema::ConnectRequest>();
  request.setDest("https://h.example/p");
  request.setType(type);
  auto metadata = request.initMetadata(entries.size());
  kj::uint i = 0;
  for (auto& entry: entries) {
    metadata[i].setKey(entry.key);
    metadata[i].setVal(entry.val);
    i++;
  }
  return builder;
}

HttpRequestHead decodeOk(capnp::MallocMessageBuilder& builder) {
  KJ_SWITCH_ONEOF(decodeRequest(builder.getRoot<schema::ConnectRequest>().asReader())) {
    KJ_CASE_ONEOF(head, HttpRequestHead) { return kj::mv(head); }
    KJ_CASE_ONEOF(error, WireError) { KJ_FAIL_ASSERT("unexpected error", error.toString()); }
  }
  KJ_UNREACHABLE;
}

kj::Maybe<WireError> decodeError(capnp::MallocMessageBuilder& builder) {
  KJ_SWITCH_ONEOF(decodeRequest(builder.getRoot<schema::ConnectRequest>().asReader())) {
    KJ_CASE_ONEOF(head, HttpRequestHead) { return nullptr; }
    KJ_CASE_ONEOF(error, WireError) { return kj::mv(error); }
  }
  KJ_UNREACHABLE;
}

void expectRequestError(std::initializer_list<Entry> entries, WireErrorCode code,
                        kj::StringPtr message = nullptr) {
  auto builder = requestWith(entries);
  KJ_IF_MAYBE(error, decodeError(*builder)) {
    KJ_EXPECT(error->code == code, error->toString());
    if (message != nullptr) {
      KJ_EXPECT(error->message == message, error->message);
    }
  } else {
    KJ_FAIL_EXPECT("decoded although it should fail", wireErrorCodeName(code));
  }
}

KJ_TEST("canonicalHeaderName follows Go's textproto.CanonicalMIMEHeaderKey") {
  KJ_EXPECT(canonicalHeaderName("content-type") == "Content-Type");
  KJ_EXPECT(canonicalHeaderName("www-authenticate") == "Www-Authenticate");
  KJ_EXPECT(canonicalHeaderName("WWW-AUTHENTICATE") == "Www-Authenticate");
  KJ_EXPECT(canonicalHeaderName("x-forwarded-for") == "X-Forwarded-For");
  KJ_EXPECT(canonicalHeaderName("sec-websocket-key") == "Sec-Websocket-Key");
  KJ_EXPECT(canonicalHeaderName("cf-ray") == "Cf-Ray");
  KJ_EXPECT(canonicalHeaderName("Content-Type") == "Content-Type");
  KJ_EXPECT(canonicalHeaderName("a--b") == "A--B");
  KJ_EXPECT(canonicalHeaderName("x_y") == "X_y");
  KJ_EXPECT(canonicalHeaderName("-foo") == "-Foo");
  // Invalid token characters: unchanged, as Go does.
  KJ_EXPECT(canonicalHeaderName("content type") == "content type");
  KJ_EXPECT(canonicalHeaderName("foo:bar") == "foo:bar");
  KJ_EXPECT(canonicalHeaderName("") == "");
}

KJ_TEST("decodeRequest: method, host, headers in order with repeats, internal headers removed") {
  auto builder = requestWith({
      {"HttpMethod", "GET"},
      {"HttpHost", "first.example"},
      {"HttpHeader:accept", "*/*"},
      {"HttpHeader:Cookie", "a=1"},
      {"HttpHeader:Cf-Cloudflared-Proxy-Connection-Upgrade", "Websocket"},
      {"HttpHeader:cf-trace-id", "1:2:3:4"},
      {"HttpHeader:cookie", "b=2"},
      {"HttpHeader:CF-TRACE-ID", "again"},
      {"cf-trace-id", "ignored for http"},
      {"HttpMethod", "PUT"},
      {"HttpHost", "last.example"},
  });
  auto head = decodeOk(*builder);
  KJ_EXPECT(head.dest == "https://h.example/p");
  KJ_EXPECT(head.type == schema::ConnectionType::HTTP);
  KJ_EXPECT(head.method == "PUT");
  KJ_EXPECT(head.host == "last.example");
  KJ_ASSERT(head.headers.size() == 3);
  KJ_EXPECT(head.headers[0].name == "Accept" && head.headers[0].value == "*/*");
  KJ_EXPECT(head.headers[1].name == "Cookie" && head.headers[1].value == "a=1");
  KJ_EXPECT(head.headers[2].name == "Cookie" && head.headers[2].value == "b=2");
  KJ_EXPECT(!requestHasBody(head));
  KJ_EXPECT(head.contentLength == nullptr);

  // Defaults: no method means GET (Go's NewRequest), no host means "".
  auto bare = requestWith({});
  auto bareHead = decodeOk(*bare);
  KJ_EXPECT(bareHead.method == "GET");
  KJ_EXPECT(bareHead.host == "");
  KJ_EXPECT(bareHead.headers.size() == 0);

  // Keys merely *containing* HttpHeader count, as in cloudflared.
  auto odd = requestWith({{"xHttpHeader:X-Odd", "1"}});
  auto oddHead = decodeOk(*odd);
  KJ_ASSERT(oddHead.headers.size() == 1);
  KJ_EXPECT(oddHead.headers[0].name == "X-Odd");
}

KJ_TEST("decodeRequest: malformed header keys and values are rejected like cloudflared") {
  expectRequestError({{"HttpHeader:a:b", "x"}}, WireErrorCode::BAD_HEADER,
                     "header Key: HttpHeader:a:b malformed");
  expectRequestError({{"HttpHeaderFoo", "x"}}, WireErrorCode::BAD_HEADER,
                     "header Key: HttpHeaderFoo malformed");
  expectRequestError({{"HttpHeader", "x"}}, WireErrorCode::BAD_HEADER);
  expectRequestError({{"HttpHeader:", "x"}}, WireErrorCode::BAD_HEADER);
  expectRequestError({{"HttpHeader:Bad Name", "x"}}, WireErrorCode::BAD_HEADER);
  expectRequestError({{"HttpHeader:X-Inject", "a\r\nEvil: 1"}}, WireErrorCode::BAD_HEADER);
  expectRequestError({{"HttpHeader:X-Nul", kj::StringPtr("a\0b", 3)}}, WireErrorCode::BAD_HEADER);
  expectRequestError({{"HttpMethod", "GE T"}}, WireErrorCode::BAD_METHOD);
  expectRequestError({{"HttpMethod", ""}}, WireErrorCode::BAD_METHOD);
  expectRequestError({{"HttpHost", "h\nx"}}, WireErrorCode::BAD_HEADER);
  // A bad header fails the request even after good ones.
  expectRequestError({{"HttpHeader:Accept", "*/*"}, {"HttpHeader:a:b:c", "x"}},
                     WireErrorCode::BAD_HEADER);
}

KJ_TEST("requestHasBody: Content-Length, chunked, WebSocket (PROTOCOL.md 6.3)") {
  auto hasBody = [](std::initializer_list<Entry> entries,
                    schema::ConnectionType type = schema::ConnectionType::HTTP) {
    auto builder = requestWith(entries, type);
    return requestHasBody(decodeOk(*builder));
  };
  KJ_EXPECT(hasBody({{"HttpHeader:Content-Length", "10"}}));
  KJ_EXPECT(hasBody({{"HttpHeader:content-length", "+5"}}));
  KJ_EXPECT(!hasBody({{"HttpHeader:Content-Length", "0"}}));
  KJ_EXPECT(!hasBody({{"HttpHeader:Content-Length", ""}}));
  KJ_EXPECT(!hasBody({}));
  KJ_EXPECT(hasBody({{"HttpHeader:Transfer-Encoding", "chunked"}}));
  KJ_EXPECT(hasBody({{"HttpHeader:Transfer-Encoding", "gzip, CHUNKED"}}));
  KJ_EXPECT(!hasBody({{"HttpHeader:Transfer-Encoding", "gzip"}}));
  KJ_EXPECT(hasBody({{"HttpHeader:Content-Length", "0"},
                     {"HttpHeader:Transfer-Encoding", "chunked"}}));
  KJ_EXPECT(hasBody({}, schema::ConnectionType::WEBSOCKET));
  // Only the first Content-Length counts (Go's Header.Get).
  KJ_EXPECT(hasBody({{"HttpHeader:Content-Length", "3"}, {"HttpHeader:Content-Length", "0"}}));

  auto builder = requestWith({{"HttpHeader:Content-Length", "12345"}});
  KJ_EXPECT(decodeOk(*builder).contentLength.orDefault(0) == 12345);

  expectRequestError({{"HttpHeader:Content-Length", "abc"}}, WireErrorCode::BAD_CONTENT_LENGTH);
  expectRequestError({{"HttpHeader:Content-Length", "-1"}}, WireErrorCode::BAD_CONTENT_LENGTH);
  expectRequestError({{"HttpHeader:Content-Length", "1 2"}}, WireErrorCode::BAD_CONTENT_LENGTH);
  expectRequestError({{"HttpHeader:Content-Length", "+"}}, WireErrorCode::BAD_CONTENT_LENGTH);
  expectRequestError({{"HttpHeader:Content-Length", "99999999999999999999"}},
                     WireErrorCode::BAD_CONTENT_LENGTH);
  expectRequestError({{"HttpHeader:Content-Length", "9223372036854775808"}},
                     WireErrorCode::BAD_CONTENT_LENGTH);
  auto max = requestWith({{"HttpHeader:Content-Length", "9223372036854775807"}});
  KJ_EXPECT(decodeOk(*max).contentLength.orDefault(0) == 9223372036854775807ull);
}

KJ_TEST("encodeRequest / decodeRequest round trip, canonical names on the wire") {
  capnp::MallocMessageBuilder builder;
  auto headers = kj::arr(Header{kj::str("content-type"), kj::str("text/plain")},
                         Header{kj::str("X-Custom"), kj::str("1")},
                         Header{kj::str("x-custom"), kj::str("2")});
  encodeRequest(builder.initRoot<schema::ConnectRequest>(), "/path?q", 
                schema::ConnectionType::WEBSOCKET, "GET", "h.example", headers);
  auto request = builder.getRoot<schema::ConnectRequest>().asReader();
  auto metadata = request.getMetadata();
  KJ_ASSERT(metadata.size() == 5);
  KJ_EXPECT(metadata[0].getKey() == "HttpMethod" && metadata[0].getVal() == "GET");
  KJ_EXPECT(metadata[1].getKey() == "HttpHost" && metadata[1].getVal() == "h.example");
  KJ_EXPECT(metadata[2].getKey() == "HttpHeader:Content-Type");
  KJ_EXPECT(metadata[3].getKey() == "HttpHeader:X-Custom" && metadata[3].getVal() == "1");
  KJ_EXPECT(metadata[4].getKey() == "HttpHeader:X-Custom" && metadata[4].getVal() == "2");

  KJ_SWITCH_ONEOF(decodeRequest(request)) {
    KJ_CASE_ONEOF(head, HttpRequestHead) {
      KJ_EXPECT(head.type == schema::ConnectionType::WEBSOCKET);
      KJ_EXPECT(head.dest == "/path?q");
      KJ_ASSERT(head.headers.size() == 3);
      KJ_EXPECT(head.headers[0].name == "Content-Type");
      // And back again through the HttpRequestHead overload.
      capnp::MallocMessageBuilder again;
      encodeRequest(again.initRoot<schema::ConnectRequest>(), head);
      KJ_EXPECT(again.getRoot<schema::ConnectRequest>().getMetadata().size() == 5);
      KJ_EXPECT(again.getRoot<schema::ConnectRequest>().getMetadata()[4].getVal() == "2");
    }
    KJ_CASE_ONEOF(error, WireError) { KJ_FAIL_EXPECT(error.toString()); }
  }
}

KJ_TEST("encodeResponse: HttpStatus first, one entry per value; decodeResponse reads it back") {
  capnp::MallocMessageBuilder builder;
  auto headers = kj::arr(Header{kj::str("set-cookie"), kj::str("a=1")},
                         Header{kj::str("Set-Cookie"), kj::str("b=2")},
                         Header{kj::str("www-authenticate"), kj::str("Basic")});
  encodeResponse(builder.initRoot<schema::ConnectResponse>(), 401, headers);
  auto response = builder.getRoot<schema::ConnectResponse>().asReader();
  KJ_ASSERT(response.getMetadata().size() == 4);
  KJ_EXPECT(response.getMetadata()[0].getKey() == "HttpStatus");
  KJ_EXPECT(response.getMetadata()[0].getVal() == "401");
  KJ_EXPECT(response.getMetadata()[1].getKey() == "HttpHeader:Set-Cookie");
  KJ_EXPECT(response.getMetadata()[3].getKey() == "HttpHeader:Www-Authenticate");
  KJ_EXPECT(!response.hasError());

  KJ_SWITCH_ONEOF(decodeResponse(response)) {
    KJ_CASE_ONEOF(head, HttpResponseHead) {
      KJ_EXPECT(head.error == nullptr);
      KJ_EXPECT(head.status == 401);
      KJ_ASSERT(head.headers.size() == 3);
      KJ_EXPECT(head.headers[1].name == "Set-Cookie" && head.headers[1].value == "b=2");
    }
    KJ_CASE_ONEOF(error, WireError) { KJ_FAIL_EXPECT(error.toString()); }
  }

  capnp::MallocMessageBuilder errBuilder;
  encodeResponseError(errBuilder.initRoot<schema::ConnectResponse>(), "dial tcp: refused");
  KJ_SWITCH_ONEOF(decodeResponse(errBuilder.getRoot<schema::ConnectResponse>().asReader())) {
    KJ_CASE_ONEOF(head, HttpResponseHead) {
      KJ_EXPECT(head.error.orDefault(nullptr) == "dial tcp: refused");
      KJ_EXPECT(head.status == 0);
    }
    KJ_CASE_ONEOF(error, WireError) { KJ_FAIL_EXPECT(error.toString()); }
  }
}

KJ_TEST("decodeResponse: missing or invalid HttpStatus and bad headers are rejected") {
  auto expectStatusError = [](std::initializer_list<Entry> entries, WireErrorCode code) {
    capnp::MallocMessageBuilder builder;
    auto metadata = builder.initRoot<schema::ConnectResponse>().initMetadata(entries.size());
    kj::uint i = 0;
    for (auto& entry: entries) {
      metadata[i].setKey(entry.key);
      metadata[i++].setVal(entry.val);
    }
    KJ_SWITCH_ONEOF(decodeResponse(builder.getRoot<schema::ConnectResponse>().asReader())) {
      KJ_CASE_ONEOF(head, HttpResponseHead) { KJ_FAIL_EXPECT("decoded", head.status); }
      KJ_CASE_ONEOF(error, WireError) { KJ_EXPECT(error.code == code, error.toString()); }
    }
  };
  expectStatusError({}, WireErrorCode::BAD_STATUS);
  expectStatusError({{"HttpStatus", "abc"}}, WireErrorCode::BAD_STATUS);
  expectStatusError({{"HttpStatus", "42"}}, WireErrorCode::BAD_STATUS);
  expectStatusError({{"HttpStatus", "099"}}, WireErrorCode::BAD_STATUS);
  expectStatusError({{"HttpStatus", "2000"}}, WireErrorCode::BAD_STATUS);
  expectStatusError({{"HttpHeader:Content-Type", "x"}}, WireErrorCode::BAD_STATUS);
  expectStatusError({{"HttpStatus", "200"}, {"HttpHeader:a:b", "x"}}, WireErrorCode::BAD_HEADER);
  expectStatusError({{"HttpStatus", "200"}, {"HttpHeader:X", "a\nb"}}, WireErrorCode::BAD_HEADER);
}

KJ_TEST("kj::HttpHeaders helpers") {
  kj::HttpHeaderTable::Builder tableBuilder;
  auto table = tableBuilder.build();
  kj::HttpHeaders httpHeaders(*table);
  auto headers = kj::arr(Header{kj::str("Content-Type"), kj::str("text/html")},
                         Header{kj::str("X-Thing"), kj::str("1")});
  addToHttpHeaders(headers, httpHeaders);
  KJ_EXPECT(httpHeaders.get(kj::HttpHeaderId::CONTENT_TYPE).orDefault(nullptr) == "text/html");

  httpHeaders.add("set-cookie", "a=1");
  httpHeaders.add("set-cookie", "b=2");
  auto back = headersFromHttp(httpHeaders);
  KJ_ASSERT(back.size() == 4, back.size());
  size_t cookies = 0;
  for (auto& header: back) {
    if (header.name == "Set-Cookie") cookies++;
    if (header.name == "X-Thing") {
      KJ_EXPECT(header.value == "1");
    }
  }
  KJ_EXPECT(cookies == 2);

  capnp::MallocMessageBuilder builder;
  encodeResponse(builder.initRoot<schema::ConnectResponse>(), 200, httpHeaders);
  auto metadata = builder.getRoot<schema::ConnectResponse>().getMetadata();
  KJ_ASSERT(metadata.size() == 5);
  KJ_EXPECT(metadata[0].getKey() == "HttpStatus" && metadata[0].getVal() == "200");
  for (kj::uint i = 1; i < metadata.size(); i++) {
    KJ_EXPECT(kj::StringPtr(metadata[i].getKey()).startsWith("HttpHeader:"));
  }
}

}  // namespace
}  // namespace cfqt::wire
