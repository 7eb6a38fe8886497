// One data stream → one HTTP/1.1 exchange (or WebSocket pass-through) with the origin, over a
// connection from the pool (pool.h): the request head prepared from the ConnectRequest, the
// request and response body pumps, chunked framing, the WebSocket pass-through after a 101, and
// the ConnectResponse (or its error) towards the edge.
//
// Response heads are parsed with kj::HttpHeaders::tryParseResponse(); bodies (fixed, chunked,
// until EOF) are decoded here, each chunk forwarded as it arrives.

#include "origin/pool.h"
#include "observe/log.h"

#include "origin/in-process.h"
#include "origin/text.h"
#include "wire/data-stream.h"
#include "wire/http-metadata.h"

#include <capnp/message.h>
#include <kj/compat/http.h>
#include <kj/debug.h>
#include <kj/vector.h>

#include <string.h>
#include <sys/socket.h>

namespace cfqt::origin {

namespace schema = wire::schema;
using kj::uint;

// =============================================================================================
// One data stream.

namespace {

kj::Maybe<uint64_t> parseDecimal(kj::StringPtr text) {
  if (text.size() == 0 || text.size() > 19) return nullptr;
  uint64_t value = 0;
  for (char c: text) {
    if (c < '0' || c > '9') return nullptr;
    value = value * 10 + (c - '0');
  }
  return value;
}

kj::Maybe<uint64_t> parseChunkSize(kj::StringPtr line) {
  uint64_t value = 0;
  size_t digits = 0;
  for (char c: line) {
    uint d;
    if (c >= '0' && c <= '9') {
      d = c - '0';
    } else if (c >= 'a' && c <= 'f') {
      d = c - 'a' + 10;
    } else if (c >= 'A' && c <= 'F') {
      d = c - 'A' + 10;
    } else if (c == ';' || c == ' ' || c == '\t') {
      break;  // chunk extension
    } else {
      return nullptr;
    }
    if (++digits > 15) return nullptr;
    value = value * 16 + d;
  }
  if (digits == 0) return nullptr;
  return value;
}

enum class RequestBody { NONE, FIXED, CHUNKED, RAW };
enum class ResponseBody { NONE, FIXED, CHUNKED, UNTIL_EOF };

size_t pumpBufferSize(bool lengthKnown, uint64_t length) {
  // A body of known length smaller than a pump buffer gets a buffer of its size: a 1 KiB
  // exchange then allocates 1 KiB, not 64 KiB twice (which glibc serves from the top of the heap
  // and trims again on free: a brk() pair and page faults per request).
  if (!lengthKnown || length >= PUMP_BUFFER_SIZE) return PUMP_BUFFER_SIZE;
  return kj::max(size_t(length), size_t(1));
}

class Exchange {
public:
  Exchange(Origin::Impl& impl, kj::AsyncIoStream& edge,
           kj::OneOf<wire::HttpRequestHead, kj::String> request, ResponseSink& sink,
           kj::String dest)
      : impl(impl), edge(edge), sink(sink), request(kj::mv(request)), dest(kj::mv(dest)),
        headers(impl.table) {
    ++impl.stats.streamsActive;
  }
  ~Exchange() noexcept(false) {
    impl.gaugeSub(heldRequest + heldResponse);
    --impl.stats.streamsActive;
    if (conn.get() != nullptr && !completed) resetConnection(*conn->stream);
  }
  KJ_DISALLOW_COPY(Exchange);

  kj::Promise<void> run() {
    return kj::evalNow([this]() { return start(); })
        .catch_([this](kj::Exception&& e) { return onFailure(kj::mv(e)); });
  }

private:
  Origin::Impl& impl;
  kj::AsyncIoStream& edge;
  ResponseSink& sink;
  kj::OneOf<wire::HttpRequestHead, kj::String> request;   // decoded, or why not; "" once the
                                                         // response head came (not resent)
  kj::String dest;                                       // for the logs

  // Request towards the origin.
  kj::HttpMethod method = kj::HttpMethod::GET;
  kj::String target;
  bool websocket = false;
  kj::String hostStorage;  // Host when the request carried no HttpHost
  kj::String tlsName;      // UNIX_TLS without originServerName: the request's host, else ""
  kj::HttpHeaders headers;  // points into `request`, `hostStorage` and the config
  RequestBody requestMode = RequestBody::NONE;
  uint64_t requestRemaining = 0;
  bool requestDone = true;
  bool requestBroken = false;
  kj::String connectionHeaders[kj::HttpHeaders::WEBSOCKET_CONNECTION_HEADERS_COUNT];

  // Origin connection.
  kj::Own<Conn> conn;
  bool reused = false;
  bool retried = false;

  // Response.
  bool headSent = false;
  bool failureCounted = false;
  uint status = 0;
  kj::Own<kj::HttpHeaders> responseHeaders;
  kj::Array<char> responseHeadText;
  ResponseBody responseMode = ResponseBody::NONE;
  uint64_t responseRemaining = 0;
  bool chunkedDone = false;
  bool reusable = true;
  bool completed = false;   // the response went out whole (else the connection is reset)

  // Pump buffers, counted in the gauge while they hold data.
  kj::Array<kj::byte> requestBuffer;
  kj::Array<kj::byte> responseBuffer;
  uint64_t heldRequest = 0;
  uint64_t heldResponse = 0;
  kj::String chunkHeader;
  kj::ArrayPtr<const kj::byte> pieces[3];

  // ------------------------------------------------------------------------------------------

  kj::Promise<void> start() {
    if (impl.config.kind == OriginKind::HTTP_STATUS) return answerStatus();
    KJ_IF_MAYBE(error, prepare()) {
      // Refused before reaching the origin (malformed or unsupported): a 502 for the visitor,
      // and a line for the operator (aggregated by the logger when repeated).
      observe::logWarn("Request refused", observe::Fields().add("error", *error).add("dest", dest)
          .add("originService", impl.config.toString()));
      return answerError(*error);
    }
    return attempt();
  }

  kj::Maybe<kj::String> prepare() {
    // Builds the origin request head from the decoded request. Returns the error text of a
    // request that cannot be served.
    KJ_IF_MAYBE(error, request.tryGet<kj::String>()) return kj::mv(*error);
    auto& h = request.get<wire::HttpRequestHead>();
    auto type = h.type;
    if (type == schema::ConnectionType::TCP) {
      return kj::str("TCP streams (ConnectionType tcp) are not supported by quick tunnels");
    }
    if (type != schema::ConnectionType::HTTP && type != schema::ConnectionType::WEBSOCKET) {
      return kj::str("unknown connection type ", uint(type));
    }
    websocket = type == schema::ConnectionType::WEBSOCKET;

    auto upperMethod = kj::heapString(h.method);
    for (char& c: upperMethod) {
      if (c >= 'a' && c <= 'z') c -= 'a' - 'A';
    }
    KJ_IF_MAYBE(m, kj::tryParseHttpMethod(upperMethod)) {
      method = *m;
    } else {
      return kj::str("request method \"", h.method, "\" is not supported by cfqt's HTTP client");
    }
    if (websocket && method != kj::HttpMethod::GET) {
      return kj::str("WebSocket upgrade with method ", h.method);
    }

    KJ_IF_MAYBE(t, requestTarget(h.dest)) {
      target = kj::mv(*t);
    } else {
      return kj::str("malformed request URL \"", h.dest, "\"");
    }

    // Host: HttpHost, unless --http-host-header (then X-Forwarded-Host keeps the original).
    kj::StringPtr hostValue = h.host;
    KJ_IF_MAYBE(override, impl.config.httpHostHeader) {
      hostValue = *override;
    }
    if (hostValue.size() == 0) {
      // No HttpHost: the host of an absolute `dest`, else the origin's own address (Go sends
      // the URL's host; an HTTP/1.1 request needs one).
      hostStorage = destHost(h.dest);
      if (hostStorage.size() == 0 && (impl.config.kind == OriginKind::HTTP ||
                                      impl.config.kind == OriginKind::HTTPS)) {
        auto url = impl.config.toString();
        hostStorage = kj::str(url.slice(url.findFirst('/').orDefault(0) + 2));
      }
      hostValue = hostStorage;
    }
    if (!wire::isValidHeaderValue(hostValue)) return kj::str("malformed Host");
    if (impl.config.kind == OriginKind::UNIX_TLS && impl.config.originServerName == nullptr) {
      // Go's transport verifies a unix+tls origin against the request URL's host (cloudflared
      // rewrites it only for http(s) services): the visitor's hostname, port dropped.
      auto urlHost = destHost(h.dest);
      tlsName = hostWithoutPort(urlHost.size() > 0 ? urlHost.asPtr() : h.host.asPtr());
      if (tlsName.size() == 0) {
        return kj::str("no TLS server name for the unix+tls origin (the request has no host; "
                       "set originServerName)");
      }
    }
    if (hostValue.size() > 0) headers.set(kj::HttpHeaderId::HOST, hostValue);
    if (impl.config.httpHostHeader != nullptr && h.host.size() > 0) {
      headers.add("X-Forwarded-Host", h.host);
    }
    KJ_IF_MAYBE(id, impl.config.connectorId) {
      if (!wire::isValidHeaderValue(*id)) return kj::str("malformed connector id");
      headers.add("Cf-Warp-Tag-Id", *id);
    }

    for (auto& header: h.headers) {
      auto& name = header.name;
      if (equalsIgnoreCase(name, "Host") || equalsIgnoreCase(name, "Expect") ||
          equalsIgnoreCase(name, "Cf-Trace-Id") || startsWithIgnoreCase(name, "Cf-Cloudflared-") ||
          equalsIgnoreCase(name, "Proxy-Connection")) {
        continue;
      }
      if (impl.config.httpHostHeader != nullptr && equalsIgnoreCase(name, "X-Forwarded-Host")) {
        continue;
      }
      if (impl.config.connectorId != nullptr && equalsIgnoreCase(name, "Cf-Warp-Tag-Id")) {
        continue;
      }
      // Connection-level headers (Connection, Keep-Alive, TE, Trailer, Upgrade, Content-Length,
      // Transfer-Encoding, Sec-WebSocket-*) are overridden by `connectionHeaders` below.
      headers.add(name, header.value);  // `request` outlives `headers`: both are members
    }

    // Connection-level headers, in KJ_HTTP_FOR_EACH_BUILTIN_HEADER order.
    using B = kj::HttpHeaders::BuiltinIndices;
    if (websocket) {
      connectionHeaders[B::CONNECTION] = kj::str("Upgrade");
      connectionHeaders[B::UPGRADE] = kj::str("websocket");
      connectionHeaders[B::SEC_WEBSOCKET_VERSION] = kj::str("13");
      for (auto& header: h.headers) {
        if (equalsIgnoreCase(header.name, "Sec-WebSocket-Key")) {
          connectionHeaders[B::SEC_WEBSOCKET_KEY] = kj::str(header.value);
        } else if (equalsIgnoreCase(header.name, "Sec-WebSocket-Extensions")) {
          connectionHeaders[B::SEC_WEBSOCKET_EXTENSIONS] = kj::str(header.value);
        }
      }
      requestMode = RequestBody::RAW;
      requestDone = false;
      reusable = false;
    } else {
      connectionHeaders[B::CONNECTION] = kj::str("keep-alive");
      if (h.chunked) {
        connectionHeaders[B::TRANSFER_ENCODING] = kj::str("chunked");
        requestMode = RequestBody::CHUNKED;
        requestDone = false;
      } else if (h.contentLength.orDefault(0) > 0) {
        requestRemaining = KJ_ASSERT_NONNULL(h.contentLength);
        connectionHeaders[B::CONTENT_LENGTH] = kj::str(requestRemaining);
        requestMode = RequestBody::FIXED;
        requestDone = false;
      } else if (method == kj::HttpMethod::POST || method == kj::HttpMethod::PUT ||
                 method == kj::HttpMethod::PATCH) {
        connectionHeaders[B::CONTENT_LENGTH] = kj::str("0");  // as Go's client does
      }
      // Sec-WebSocket-* of a non-upgrade request pass through as ordinary headers.
      for (auto& header: h.headers) {
        if (equalsIgnoreCase(header.name, "Sec-WebSocket-Key")) {
          connectionHeaders[B::SEC_WEBSOCKET_KEY] = kj::str(header.value);
        } else if (equalsIgnoreCase(header.name, "Sec-WebSocket-Version")) {
          connectionHeaders[B::SEC_WEBSOCKET_VERSION] = kj::str(header.value);
        } else if (equalsIgnoreCase(header.name, "Sec-WebSocket-Accept")) {
          connectionHeaders[B::SEC_WEBSOCKET_ACCEPT] = kj::str(header.value);
        } else if (equalsIgnoreCase(header.name, "Sec-WebSocket-Extensions")) {
          connectionHeaders[B::SEC_WEBSOCKET_EXTENSIONS] = kj::str(header.value);
        }
      }
    }
    return nullptr;
  }

  static kj::String hostWithoutPort(kj::StringPtr host) {
    // "a.example:443" -> "a.example", "[::1]:8443" -> "::1"; lower case.
    kj::ArrayPtr<const char> name = host;
    if (host.startsWith("[")) {
      name = host.slice(1, host.findFirst(']').orDefault(host.size()));
    } else KJ_IF_MAYBE(colon, host.findFirst(':')) {
      name = host.slice(0, *colon);
    }
    auto out = kj::heapString(name);
    for (char& c: out) {
      if (c >= 'A' && c <= 'Z') c += 'a' - 'A';
    }
    return out;
  }

  static kj::String destHost(kj::StringPtr dest) {
    KJ_IF_MAYBE(pos, dest.findFirst(':')) {
      if (dest.slice(*pos).startsWith("://")) {
        auto afterScheme = dest.slice(*pos + 3);
        size_t i = 0;
        while (i < afterScheme.size() && afterScheme[i] != '/' && afterScheme[i] != '?' &&
               afterScheme[i] != '#') {
          ++i;
        }
        return kj::heapString(afterScheme.slice(0, i));
      }
    }
    return kj::str();
  }

  static kj::Maybe<kj::String> requestTarget(kj::StringPtr dest) {
    // Path and query of `dest` (an absolute URL or a bare path); fragment dropped.
    kj::StringPtr rest = dest;
    KJ_IF_MAYBE(pos, dest.findFirst(':')) {
      if (dest.slice(*pos).startsWith("://")) {
        auto afterScheme = dest.slice(*pos + 3);
        size_t i = 0;
        while (i < afterScheme.size() && afterScheme[i] != '/' && afterScheme[i] != '?' &&
               afterScheme[i] != '#') {
          ++i;
        }
        rest = afterScheme.slice(i);
      }
    }
    KJ_IF_MAYBE(hash, rest.findFirst('#')) {
      return finishTarget(kj::heapString(rest.slice(0, *hash)));
    }
    return finishTarget(rest);
  }

  static kj::Maybe<kj::String> finishTarget(kj::StringPtr rest) {
    for (char c: rest) {
      if (uint8_t(c) <= ' ' || c == 0x7f) return nullptr;
    }
    if (rest.size() == 0) return kj::str("/");
    if (rest[0] == '?') return kj::str("/", rest);
    if (rest[0] != '/') return nullptr;
    return kj::str(rest);
  }

  // ------------------------------------------------------------------------------------------

  kj::Promise<void> attempt() {
    return impl.acquire(retried, tlsName).then([this](Acquired acquired) {
      conn = kj::mv(acquired.conn);
      reused = acquired.reused;
      return exchange();
    }).catch_([this](kj::Exception&& e) -> kj::Promise<void> {
      // A pooled connection the origin had already closed: retry once on a fresh one, when
      // nothing of the request body was consumed yet (Go's transport does the same).
      if (reused && !retried && !headSent && conn.get() != nullptr && !conn->receivedAny &&
          requestMode == RequestBody::NONE) {
        retried = true;
        conn = nullptr;
        return attempt();
      }
      return kj::mv(e);
    });
  }

  kj::Promise<void> exchange() {
    // The connection headers' pointers live on the stack: serializeRequest() copies them.
    kj::StringPtr connectionHeaderPtrs[kj::HttpHeaders::WEBSOCKET_CONNECTION_HEADERS_COUNT];
    for (size_t i = 0; i < kj::size(connectionHeaders); i++) {
      if (connectionHeaders[i] != nullptr) connectionHeaderPtrs[i] = connectionHeaders[i];
    }
    auto text = headers.serializeRequest(
        method, target, kj::arrayPtr(connectionHeaderPtrs, kj::size(connectionHeaderPtrs)));
    auto written = conn->stream->write(text.begin(), text.size()).attach(kj::mv(text));
    return written.then([this]() -> kj::Promise<void> {
      if (websocket) return readFinalHead();  // the edge's bytes flow only after a 101
      // The request body is pumped while the response is read (an origin may answer early).
      // Once the response is complete, an unfinished request body is abandoned.
      auto requestSide = pumpRequest().then([]() -> kj::Promise<void> { return kj::NEVER_DONE; });
      return readFinalHead().exclusiveJoin(kj::mv(requestSide));
    }).then([this]() { finish(); });
  }

  // Request body: edge → origin, one buffer, next read only after the write resolved. Origin
  // write failures end the pump quietly (the response side reports them); edge read failures
  // propagate.
  kj::Promise<void> pumpRequest() {
    if (requestMode == RequestBody::NONE) return kj::READY_NOW;
    if (requestBuffer == nullptr) {
      requestBuffer = kj::heapArray<kj::byte>(
          pumpBufferSize(requestMode == RequestBody::FIXED, requestRemaining));
    }
    size_t want = requestBuffer.size();
    if (requestMode == RequestBody::FIXED) {
      if (requestRemaining == 0) {
        requestDone = true;
        return kj::READY_NOW;
      }
      want = kj::min<uint64_t>(uint64_t(want), requestRemaining);
    }
    return edge.tryRead(requestBuffer.begin(), 1, want).then([this](size_t n) {
      return forwardRequest(n);
    });
  }

  kj::Promise<void> forwardRequest(size_t n) {
    if (n == 0) return endRequest();
    heldRequest += n;
    impl.gaugeAdd(n);
    kj::Promise<void> write = nullptr;
    if (requestMode == RequestBody::CHUNKED) {
      chunkHeader = kj::str(kj::hex(uint64_t(n)), "\r\n");
      pieces[0] = chunkHeader.asBytes();
      pieces[1] = requestBuffer.slice(0, n);
      pieces[2] = kj::StringPtr("\r\n").asBytes();
      write = conn->stream->write(kj::arrayPtr(pieces, 3));
    } else {
      if (requestMode == RequestBody::FIXED) requestRemaining -= n;
      write = conn->stream->write(requestBuffer.begin(), n);
    }
    return write.then([this]() {
      impl.gaugeSub(heldRequest);
      heldRequest = 0;
      return pumpRequest();
    }, [this](kj::Exception&& e) -> kj::Promise<void> {
      impl.gaugeSub(heldRequest);
      heldRequest = 0;
      requestBroken = true;
      return kj::READY_NOW;
    });
  }

  kj::Promise<void> endRequest() {
    switch (requestMode) {
      case RequestBody::NONE:
        break;
      case RequestBody::FIXED:
        // The edge ended the stream before Content-Length bytes: the origin request can't be
        // completed. Shut the origin's read side so it answers (or fails) promptly.
        requestBroken = true;
        return originException(kj::Exception::Type::DISCONNECTED,
                               "Incoming request ended abruptly");
      case RequestBody::CHUNKED:
        return conn->stream->write("0\r\n\r\n", 5).then([this]() {
          requestDone = true;
        }, [this](kj::Exception&&) {
          requestBroken = true;
        });
      case RequestBody::RAW:
        requestDone = true;
        break;
    }
    return kj::READY_NOW;
  }

  // ------------------------------------------------------------------------------------------

  kj::Promise<void> readFinalHead() {
    return conn->readHead().then([this](kj::Maybe<kj::Array<char>> text) {
      KJ_IF_MAYBE(t, text) {
        return onHead(kj::mv(*t));
      }
      return kj::Promise<void>(originException(
          kj::Exception::Type::DISCONNECTED, "origin closed the connection without a response"));
    });
  }

  kj::Promise<void> onHead(kj::Array<char> text) {
    bool http10 = text.size() >= 8 && memcmp(text.begin(), "HTTP/1.0", 8) == 0;
    auto parsed = kj::heap<kj::HttpHeaders>(impl.table);
    auto result = parsed->tryParseResponse(text);
    KJ_IF_MAYBE(error, result.tryGet<kj::HttpHeaders::ProtocolError>()) {
      return originException(kj::Exception::Type::FAILED,
                             kj::str("malformed response from origin: ", error->description));
    }
    status = result.get<kj::HttpHeaders::Response>().statusCode;
    // kj's parser is lenient: header names with non-token bytes and values with control bytes
    // get through. Go's reader (textproto) refuses such a response, and the edge would refuse
    // the metadata we made of it (wire::decodeResponse: BAD_HEADER): fail before the head.
    kj::Maybe<kj::String> badHeader;
    parsed->forEach([&](kj::StringPtr name, kj::StringPtr value) {
      if (badHeader != nullptr) return;
      if (!wire::isHttpToken(name)) {
        badHeader = kj::str("malformed response from origin: invalid header name");
      } else if (!wire::isValidHeaderValue(value)) {
        badHeader = kj::str("malformed response from origin: invalid value of header ",
                            wire::canonicalHeaderName(name));
      }
    });
    KJ_IF_MAYBE(error, badHeader) {
      return originException(kj::Exception::Type::FAILED, *error);
    }
    if (status >= 100 && status < 200 && !(status == 101 && websocket)) {
      // Interim response (100 Continue, 102, 103): skip it. A 101 to a plain request would
      // switch protocols we did not ask for: fail.
      if (status == 101) {
        return originException(kj::Exception::Type::FAILED,
                               "origin switched protocols on a non-upgrade request");
      }
      return readFinalHead();
    }
    if (status < 100 || status > 999) {
      return originException(kj::Exception::Type::FAILED, "origin sent an invalid status code");
    }
    responseHeaders = kj::mv(parsed);
    responseHeadText = kj::mv(text);
    if (http10) reusable = false;
    KJ_IF_MAYBE(connection, responseHeaders->get(kj::HttpHeaderId::CONNECTION)) {
      if (containsIgnoreCase(*connection, "close")) reusable = false;
    }
    // The request will not be sent again (no retry once a response head came): its head goes.
    headers.clear();
    request = kj::String();
    if (status == 101) return startWebSocket();
    KJ_IF_MAYBE(error, chooseResponseBody()) {
      return originException(kj::Exception::Type::FAILED, *error);
    }
    // Bodies other than chunked ones are read straight into the pump buffer.
    if (responseMode != ResponseBody::CHUNKED) conn->shrink();
    return sendHead().then([this]() { return pumpResponse(); });
  }

  kj::Maybe<kj::String> chooseResponseBody() {
    if (method == kj::HttpMethod::HEAD || status == 204 || status == 304) {
      responseMode = ResponseBody::NONE;
      return nullptr;
    }
    KJ_IF_MAYBE(te, responseHeaders->get(kj::HttpHeaderId::TRANSFER_ENCODING)) {
      // The last coding decides; anything but chunked-last is delimited by EOF.
      kj::StringPtr value = *te;
      size_t end = value.size();
      while (end > 0 && (value[end - 1] == ' ' || value[end - 1] == '\t')) --end;
      auto last = kj::heapString(value.slice(0, end));
      KJ_IF_MAYBE(comma, last.findLast(',')) {
        last = kj::heapString(last.slice(*comma + 1));
      }
      kj::StringPtr lastPtr = last;
      while (lastPtr.size() > 0 && (lastPtr[0] == ' ' || lastPtr[0] == '\t')) {
        lastPtr = lastPtr.slice(1);
      }
      if (equalsIgnoreCase(lastPtr, "chunked")) {
        responseMode = ResponseBody::CHUNKED;
      } else {
        responseMode = ResponseBody::UNTIL_EOF;
        reusable = false;
      }
      return nullptr;
    }
    KJ_IF_MAYBE(cl, responseHeaders->get(kj::HttpHeaderId::CONTENT_LENGTH)) {
      KJ_IF_MAYBE(length, parseDecimal(*cl)) {
        responseMode = *length > 0 ? ResponseBody::FIXED : ResponseBody::NONE;
        responseRemaining = *length;
        return nullptr;
      }
      return kj::str("origin sent an invalid Content-Length");
    }
    responseMode = ResponseBody::UNTIL_EOF;
    reusable = false;
    return nullptr;
  }

  kj::Promise<void> sendHead() {
    kj::Vector<wire::Header> out;
    bool dropLength = responseMode == ResponseBody::CHUNKED;
    responseHeaders->forEach([&](kj::StringPtr name, kj::StringPtr value) {
      if (equalsIgnoreCase(name, "Transfer-Encoding")) return;
      if (dropLength && equalsIgnoreCase(name, "Content-Length")) return;
      out.add(wire::Header{wire::canonicalHeaderName(name), kj::str(value)});
    });
    // The sink copies what it needs: the origin's head is not kept while the body streams.
    auto sent = sink.sendHead(status, out.asPtr());
    responseHeaders = nullptr;
    responseHeadText = nullptr;
    headSent = true;
    KJ_IF_MAYBE(o, impl.observer) o->responseHead(status);
    return kj::mv(sent);
  }

  // Response body: origin → edge, one buffer, each chunk written as soon as it was read. Only
  // what the edge stream takes at once is read: while it is blocked (a visitor that stopped
  // reading, the connection's send budget) the buffer is freed and nothing is read.
  kj::Promise<void> pumpResponse() {
    bool fixed = responseMode == ResponseBody::FIXED;
    if (responseMode == ResponseBody::NONE || (fixed && responseRemaining == 0)) {
      return kj::READY_NOW;
    }
    if ((fixed || responseMode == ResponseBody::UNTIL_EOF) && conn->leftover() > 0) {
      return pumpUnread(fixed);
    }
    size_t wanted = responseBuffer != nullptr ? responseBuffer.size()
        : pumpBufferSize(fixed, responseRemaining);
    if (fixed) wanted = kj::min(uint64_t(wanted), responseRemaining);
    size_t writable = sink.bodyWritable(wanted);
    if (writable == 0) {
      responseBuffer = nullptr;
      return sink.whenBodyWritable().then([this]() { return pumpResponse(); });
    }
    if (responseBuffer == nullptr) {
      responseBuffer = kj::heapArray<kj::byte>(pumpBufferSize(fixed, responseRemaining));
    }
    return readResponseBody(kj::min(writable, responseBuffer.size()))
        .then([this](size_t n) -> kj::Promise<void> {
      if (n == 0) return kj::READY_NOW;
      heldResponse += n;
      impl.gaugeAdd(n);
      return edge.write(responseBuffer.begin(), n).then([this]() {
        impl.gaugeSub(heldResponse);
        heldResponse = 0;
        return pumpResponse();
      });
    });
  }

  kj::Promise<void> pumpUnread(bool fixed) {
    // Body bytes that came in with the head (a small response is usually whole there): written
    // to the edge straight from the connection's read-ahead, without a pump buffer or a copy.
    // The read-ahead is not touched until the write resolved (shrink() keeps unread bytes).
    auto unread = conn->unread();
    size_t wanted = fixed ? size_t(kj::min<uint64_t>(unread.size(), responseRemaining))
                          : unread.size();
    size_t writable = sink.bodyWritable(wanted);
    if (writable == 0) {
      return sink.whenBodyWritable().then([this]() { return pumpResponse(); });
    }
    size_t n = kj::min(writable, wanted);
    heldResponse += n;
    impl.gaugeAdd(n);
    return edge.write(unread.begin(), n).then([this, n, fixed]() {
      conn->consume(n);
      if (fixed) responseRemaining -= n;
      impl.gaugeSub(heldResponse);
      heldResponse = 0;
      return pumpResponse();
    });
  }

  kj::Promise<size_t> readResponseBody(size_t limit) {
    // Next piece of the de-framed body (at most `limit` bytes) into responseBuffer; 0 at its end.
    auto buffer = responseBuffer.slice(0, limit);
    switch (responseMode) {
      case ResponseBody::NONE:
        return size_t(0);
      case ResponseBody::UNTIL_EOF:
        conn->shrink();   // the read-ahead, once the bytes after the head are consumed
        return conn->read(buffer);
      case ResponseBody::FIXED:
        if (responseRemaining == 0) return size_t(0);
        conn->shrink();
        return conn->read(buffer.slice(0, kj::min<uint64_t>(uint64_t(buffer.size()), responseRemaining)))
            .then([this](size_t n) -> kj::Promise<size_t> {
          if (n == 0) {
            return originException(kj::Exception::Type::DISCONNECTED,
                                   "origin closed the connection in the middle of the body");
          }
          responseRemaining -= n;
          return n;
        });
      case ResponseBody::CHUNKED:
        if (responseRemaining > 0) {
          return conn->read(buffer.slice(0, kj::min<uint64_t>(uint64_t(buffer.size()), responseRemaining)))
              .then([this](size_t n) -> kj::Promise<size_t> {
            if (n == 0) {
              return originException(kj::Exception::Type::DISCONNECTED,
                                     "origin closed the connection in the middle of a chunk");
            }
            responseRemaining -= n;
            if (responseRemaining > 0) return n;
            // End of the chunk's data: its CRLF follows.
            return conn->readLine().then([n](kj::String line) -> kj::Promise<size_t> {
              if (line.size() != 0) {
                return originException(kj::Exception::Type::FAILED,
                                       "origin sent a malformed chunked body");
              }
              return n;
            });
          });
        }
        if (chunkedDone) return size_t(0);
        return conn->readLine().then([this, limit](kj::String line) -> kj::Promise<size_t> {
          KJ_IF_MAYBE(size, parseChunkSize(line)) {
            if (*size == 0) return readTrailers();
            responseRemaining = *size;
            return readResponseBody(limit);
          }
          return originException(kj::Exception::Type::FAILED,
                                 "origin sent a malformed chunk size");
        });
    }
    KJ_UNREACHABLE;
  }

  kj::Promise<size_t> readTrailers() {
    // Trailers are dropped (not supported on QUIC, §6.4).
    return conn->readLine().then([this](kj::String line) -> kj::Promise<size_t> {
      if (line.size() == 0) {
        chunkedDone = true;
        return size_t(0);
      }
      return readTrailers();
    });
  }

  static void resetConnection(kj::AsyncIoStream& stream) {
    // An exchange abandoned midway (the visitor left, or it failed) closes its origin connection
    // with a reset: a plain close would queue its FIN behind request body bytes an origin that
    // stopped reading never takes, and the origin would never learn the request is gone. Not
    // every stream is a socket (in-process origins, TLS): those just close.
    kj::runCatchingExceptions([&]() {
      struct linger abort = {1, 0};
      stream.setsockopt(SOL_SOCKET, SO_LINGER, &abort, sizeof(abort));
    });
  }

  void finish() {
    // Response complete: FIN to the edge, stop reading its side; pool the connection if the
    // exchange left it clean.
    completed = true;
    edge.shutdownWrite();
    edge.abortRead();
    if (reusable && requestDone && !requestBroken) {
      impl.release(kj::mv(conn));
    }
  }

  // ------------------------------------------------------------------------------------------
  // WebSocket after the origin's 101: bytes both ways, unmodified, until either side ends.

  kj::Promise<void> startWebSocket() {
    responseMode = ResponseBody::UNTIL_EOF;
    reusable = false;
    return sendHead().then([this]() {
      auto toEdge = pumpResponse();
      auto toOrigin = pumpRequest();
      // One side ended cleanly: the session is over, the connection closes normally.
      return toEdge.exclusiveJoin(kj::mv(toOrigin)).then([this]() { completed = true; });
    });
  }

  // ------------------------------------------------------------------------------------------

  kj::Promise<void> answerStatus() {
    auto sent = sink.sendHead(impl.config.status, kj::ArrayPtr<const wire::Header>());
    headSent = true;
    KJ_IF_MAYBE(o, impl.observer) o->responseHead(impl.config.status);
    return sent.then([this]() {
      edge.shutdownWrite();
      edge.abortRead();
    });
  }

  void countFailure() {
    // Once per exchange, also when the error answer itself fails to go out.
    if (failureCounted) return;
    failureCounted = true;
    KJ_IF_MAYBE(o, impl.observer) o->requestFailed();
  }

  kj::Promise<void> answerError(kj::StringPtr text) {
    countFailure();
    headSent = true;  // a failure from here on is the edge's
    return sink.sendError(text).then([this]() {
      edge.shutdownWrite();
      edge.abortRead();
    });
  }

  kj::Promise<void> onFailure(kj::Exception&& e) {
    countFailure();
    if (headSent) {
      // The head (or an error answer) is out: the only way to signal failure is a reset.
      return kj::Exception(kj::Exception::Type::DISCONNECTED, __FILE__, __LINE__,
                           kj::str("origin: stream must be reset: ", e.getDescription()));
    }
    // Our own failures ("dial tcp ...", "tls handshake ...", "origin: ...") are already worded;
    // anything else (a kj syscall message) is mapped to Go's words where we know them.
    kj::StringPtr description = e.getDescription();
    kj::String cause;
    if (description.startsWith("origin: ")) {
      cause = kj::str(description.slice(strlen("origin: ")));
    } else if (description.startsWith("dial ") || description.startsWith("tls handshake ")) {
      cause = kj::str(description);
    } else {
      cause = describeCause(e);
    }
    observe::logWarn("Request failed", observe::Fields().add("error", cause).add("dest", dest)
        .add("originService", impl.config.toString()));
    auto text = originErrorText(cause);
    return answerError(text).attach(kj::mv(text));
  }
};

class ConnectResponseSink final: public ResponseSink {
  // QUIC data streams: the head is the data-stream preamble plus a ConnectResponse (§6.1).
public:
  explicit ConnectResponseSink(kj::AsyncOutputStream& out): out(out) {}

  kj::Promise<void> sendHead(kj::uint status, kj::ArrayPtr<const wire::Header> headers) override {
    // A first segment sized to the headers (capnp's default is 8 KiB, for every response).
    size_t bytes = 0;
    for (auto& h: headers) bytes += h.name.size() + h.value.size() + 32;
    auto message = kj::heap<capnp::MallocMessageBuilder>(kj::max(bytes / 8 + 32, size_t(64)));
    auto response = message->initRoot<schema::ConnectResponse>();
    wire::encodeResponse(response, status, headers);
    auto reader = response.asReader();
    return wire::writeConnectResponse(out, reader).attach(kj::mv(message));
  }

  kj::Promise<void> sendError(kj::StringPtr text) override {
    return wire::writeConnectResponseError(out, text);
  }

private:
  kj::AsyncOutputStream& out;
};

}  // namespace

kj::Own<ResponseSink> newConnectResponseSink(kj::AsyncOutputStream& out) {
  return kj::heap<ConnectResponseSink>(out);
}

kj::Promise<void> Origin::Impl::serve(kj::AsyncIoStream& stream,
                                      kj::OneOf<wire::HttpRequestHead, kj::String> request,
                                      ResponseSink& sink, kj::String dest) {
  if (config.kind == OriginKind::HANDLER) {
    KJ_IF_MAYBE(head, request.tryGet<wire::HttpRequestHead>()) {
      if (head->type == schema::ConnectionType::HTTP ||
          head->type == schema::ConnectionType::WEBSOCKET) {
        return serveInProcess(KJ_ASSERT_NONNULL(config.handler), stream, kj::mv(*head), sink,
                              observer);
      }
    }
    // Malformed or unsupported (tcp) requests: answered with an error by the Exchange below,
    // which never reaches an origin for them.
  }
  auto exchange = kj::heap<Exchange>(*this, stream, kj::mv(request), sink, kj::mv(dest));
  auto promise = exchange->run();
  return promise.attach(kj::mv(exchange));
}

kj::Promise<void> Origin::Impl::serveStream(kj::AsyncIoStream& stream,
                                            schema::ConnectRequest::Reader request) {
  // QUIC: the ConnectRequest decoded here, the head written as a ConnectResponse.
  kj::OneOf<wire::HttpRequestHead, kj::String> decoded;
  auto result = wire::decodeRequest(request);
  KJ_SWITCH_ONEOF(result) {
    KJ_CASE_ONEOF(head, wire::HttpRequestHead) decoded = kj::mv(head);
    KJ_CASE_ONEOF(error, wire::WireError) decoded = kj::str("malformed request: ", error.message);
  }
  auto sink = newConnectResponseSink(stream);
  auto promise = serve(stream, kj::mv(decoded), *sink, kj::str(request.getDest()));
  return promise.attach(kj::mv(sink));
}

}  // namespace cfqt::origin
