#include "front-door.h"

#include "json.h"
#include "random.h"

#include "wire/http-metadata.h"
#include "observe/log.h"

#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>

#include <kj/debug.h>
#include <kj/encoding.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

namespace cfqt::emulator {

namespace {

constexpr size_t BODY_BUFFER_SIZE = 64 * 1024;

size_t bodyBufferSize(kj::Maybe<uint64_t> length) {
  // Bodies of known length under BODY_BUFFER_SIZE get a buffer of their size: small exchanges
  // then cost no 64 KiB allocation (a heap-top brk() pair in glibc per request).
  KJ_IF_MAYBE(l, length) {
    if (*l < BODY_BUFFER_SIZE) return kj::max(size_t(*l), size_t(1));
  }
  return BODY_BUFFER_SIZE;
}

constexpr kj::StringPtr WEBSOCKET_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"_kj;

// Request headers never forwarded as HttpHeader: entries (hop-by-hop, framing we redo ourselves,
// or values the edge sets itself).
constexpr kj::StringPtr SKIPPED_REQUEST_HEADERS[] = {
  "Connection"_kj, "Keep-Alive"_kj, "Proxy-Connection"_kj, "Te"_kj, "Trailer"_kj,
  "Transfer-Encoding"_kj, "Upgrade"_kj, "Expect"_kj, "Host"_kj, "Content-Length"_kj,
  "Sec-Websocket-Key"_kj, "Sec-Websocket-Extensions"_kj, "Sec-Websocket-Accept"_kj,
  "Sec-Websocket-Version"_kj, "Cf-Ray"_kj, "Cf-Connecting-Ip"_kj, "Cf-Visitor"_kj,
  "X-Forwarded-Proto"_kj, "X-Forwarded-For"_kj, "Cf-Cloudflared-Proxy-Connection-Upgrade"_kj,
};

// Response headers kj::HttpServer writes itself (or that make no sense on the public hop).
constexpr kj::StringPtr SKIPPED_RESPONSE_HEADERS[] = {
  "Connection"_kj, "Keep-Alive"_kj, "Proxy-Connection"_kj, "Te"_kj, "Trailer"_kj,
  "Transfer-Encoding"_kj, "Upgrade"_kj, "Content-Length"_kj, "Sec-Websocket-Accept"_kj,
  "Sec-Websocket-Extensions"_kj, "Sec-Websocket-Key"_kj, "Sec-Websocket-Version"_kj,
};

bool hasNoBody(kj::AsyncInputStream& body) {
  KJ_IF_MAYBE(length, body.tryGetLength()) return *length == 0;
  return false;
}

kj::Maybe<uint64_t> parseDecimal(kj::StringPtr text);

bool hasInvalidLength(const kj::HttpHeaders& headers) {
  KJ_IF_MAYBE(value, headers.get(kj::HttpHeaderId::CONTENT_LENGTH)) {
    return parseDecimal(*value) == nullptr;
  }
  return false;
}

template <size_t N>
bool nameIn(kj::StringPtr name, const kj::StringPtr (&list)[N]) {
  for (auto& candidate: list) {
    if (equalsIgnoreCase(name, candidate)) return true;
  }
  return false;
}

bool containsIgnoreCase(kj::StringPtr haystack, kj::StringPtr needle) {
  auto lower = toLower(haystack);
  auto lowerNeedle = toLower(needle);
  if (lowerNeedle.size() > lower.size()) return false;
  for (size_t i = 0; i + lowerNeedle.size() <= lower.size(); i++) {
    if (memcmp(lower.begin() + i, lowerNeedle.begin(), lowerNeedle.size()) == 0) return true;
  }
  return false;
}

kj::String hostWithoutPort(kj::StringPtr host) {
  // Lower case, without ":port" and without the root's trailing dot ("Example.COM.:443").
  kj::StringPtr name = host;
  kj::String stripped;
  if (host.startsWith("[")) {
    KJ_IF_MAYBE(close, host.findFirst(']')) return toLower(kj::str(host.slice(0, *close + 1)));
    return toLower(host);
  }
  KJ_IF_MAYBE(colon, host.findFirst(':')) {
    stripped = kj::str(host.slice(0, *colon));
    name = stripped;
  }
  if (name.endsWith(".")) return toLower(kj::str(name.slice(0, name.size() - 1)));
  return toLower(name);
}

struct Target {
  kj::String host;   // from an absolute-form URL, else empty
  kj::String path;   // path + query, starting with '/'
};

Target parseTarget(kj::StringPtr url) {
  if (url.startsWith("/")) return {kj::str(), kj::str(url)};
  KJ_IF_MAYBE(scheme, url.findFirst(':')) {
    auto rest = url.slice(*scheme + 1);
    if (rest.startsWith("//")) {
      rest = rest.slice(2);
      size_t end = rest.size();
      for (size_t i = 0; i < rest.size(); i++) {
        if (rest[i] == '/' || rest[i] == '?') { end = i; break; }
      }
      auto host = kj::str(rest.slice(0, end));
      auto path = rest.slice(end);
      if (path.startsWith("?")) return {kj::mv(host), kj::str('/', path)};
      if (path.size() == 0) return {kj::mv(host), kj::str("/")};
      return {kj::mv(host), kj::str(path)};
    }
  }
  return {kj::str(), kj::str("/")};  // "*" (OPTIONS) and anything odd
}

kj::String peerIp(kj::AsyncIoStream& connection) {
  struct sockaddr_storage addr;
  kj::uint length = sizeof(addr);
  memset(&addr, 0, sizeof(addr));
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
    connection.getpeername(reinterpret_cast<struct sockaddr*>(&addr), &length);
  })) {
    return kj::str("127.0.0.1");  // not a socket (tests)
  }
  char text[INET6_ADDRSTRLEN] = {0};
  if (addr.ss_family == AF_INET) {
    auto in = reinterpret_cast<struct sockaddr_in*>(&addr);
    inet_ntop(AF_INET, &in->sin_addr, text, sizeof(text));
  } else if (addr.ss_family == AF_INET6) {
    auto in6 = reinterpret_cast<struct sockaddr_in6*>(&addr);
    inet_ntop(AF_INET6, &in6->sin6_addr, text, sizeof(text));
  } else {
    return kj::str("127.0.0.1");
  }
  return kj::str(text);
}

kj::Maybe<uint64_t> parseDecimal(kj::StringPtr text) {
  if (text.size() == 0 || text.size() > 19) return nullptr;
  uint64_t value = 0;
  for (char c: text) {
    if (c < '0' || c > '9') return nullptr;
    value = value * 10 + static_cast<uint64_t>(c - '0');
  }
  return value;
}

kj::String webSocketAccept(kj::StringPtr key) {
  auto input = kj::str(key, WEBSOCKET_GUID);
  kj::byte digest[20];
  int rc = gnutls_hash_fast(GNUTLS_DIG_SHA1, input.begin(), input.size(), digest);
  KJ_ASSERT(rc == 0, gnutls_strerror(rc));
  return kj::encodeBase64(kj::arrayPtr(digest, sizeof(digest)));
}

kj::String errorPage(kj::uint code, kj::StringPtr title, kj::StringPtr detail, kj::StringPtr ray) {
  return kj::str(
      "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>", title,
      " | error code: ", code, "</title></head>\n<body>\n<h1>Error ", code, "</h1>\n<h2>", title,
      "</h2>\n<p>", detail, "</p>\n<p>error code: ", code, "</p>\n<p>Ray ID: ", ray,
      " &bull; cfqt-edge</p>\n</body></html>\n");
}

kj::String escapeHtml(kj::StringPtr text) {
  kj::Vector<char> out(text.size());
  for (char c: text) {
    switch (c) {
      case '<': out.addAll(kj::StringPtr("&lt;")); break;
      case '>': out.addAll(kj::StringPtr("&gt;")); break;
      case '&': out.addAll(kj::StringPtr("&amp;")); break;
      case '"': out.addAll(kj::StringPtr("&quot;")); break;
      default: out.add(c);
    }
  }
  out.add('\0');
  return kj::String(out.releaseAsArray());
}

kj::Promise<void> sendErrorPage(kj::HttpService::Response& response,
                                const kj::HttpHeaderTable& headerTable, kj::uint status,
                                kj::StringPtr title, kj::StringPtr detail, kj::StringPtr ray);

}  // namespace

kj::StringPtr statusText(kj::uint status) {
  switch (status) {
    case 100: return "Continue";
    case 101: return "Switching Protocols";
    case 200: return "OK";
    case 201: return "Created";
    case 202: return "Accepted";
    case 203: return "Non-Authoritative Information";
    case 204: return "No Content";
    case 205: return "Reset Content";
    case 206: return "Partial Content";
    case 300: return "Multiple Choices";
    case 301: return "Moved Permanently";
    case 302: return "Found";
    case 303: return "See Other";
    case 304: return "Not Modified";
    case 307: return "Temporary Redirect";
    case 308: return "Permanent Redirect";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 409: return "Conflict";
    case 410: return "Gone";
    case 411: return "Length Required";
    case 413: return "Payload Too Large";
    case 415: return "Unsupported Media Type";
    case 418: return "I'm a teapot";
    case 422: return "Unprocessable Entity";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    case 524: return "A Timeout Occurred";
    case 530: return "Origin DNS Error";
    default: return "Unknown";
  }
}

namespace {

kj::Promise<void> sendErrorPage(kj::HttpService::Response& response,
                                const kj::HttpHeaderTable& headerTable, kj::uint status,
                                kj::StringPtr title, kj::StringPtr detail, kj::StringPtr ray) {
  auto page = errorPage(status, title, escapeHtml(detail), ray);
  kj::HttpHeaders pageHeaders(headerTable);
  pageHeaders.set(kj::HttpHeaderId::CONTENT_TYPE, "text/html; charset=UTF-8");
  pageHeaders.add("Cf-Ray", ray);
  pageHeaders.add("Server", "cloudflare");
  auto out = response.send(status, statusText(status), pageHeaders, page.size());
  auto promise = out->write(page.begin(), page.size());
  return promise.attach(kj::mv(out), kj::mv(page));
}

}  // namespace

void RandomEntropySource::generate(kj::ArrayPtr<kj::byte> buffer) {
  if (buffer.size() == 0) return;
  int rc = gnutls_rnd(GNUTLS_RND_NONCE, buffer.begin(), buffer.size());
  KJ_ASSERT(rc == 0, gnutls_strerror(rc));
}

// =============================================================================================

class FrontDoor::Visitor final: public kj::AsyncIoStream {
  // A public connection as kj::HttpServer sees it, plus a way to notice that the visitor left.
  // kj::HttpServer reads the connection only for request heads and bodies, so a visitor that
  // closes its connection while the response waits on the tunnel (its head, or the next event of
  // an idle SSE stream) would go unnoticed until a write fails, maybe never. whenLeft() reads
  // ahead: EOF or a read error means the visitor left; bytes that arrive instead (a pipelined
  // request) are kept for the server's next read, and the read-ahead stops there.
  //
  // It also bounds request heads: between requests (and before the first) it hands the server
  // at most maxRequestHeadBytes; a server that asks for more is reading a head over the limit,
  // which is answered 431 here, on the raw connection, and the connection closed (kj's own limit
  // is 128 KiB, past which it would close without a response).
public:
  Visitor(kj::Own<kj::AsyncIoStream> innerParam, kj::Timer& timer,
          const FrontDoorOptions& options)
      : timer(timer), options(options), inner(kj::mv(innerParam)), left(makeLeft()) {}
  KJ_DISALLOW_COPY(Visitor);

  void requestStarted() { inHead = false; }
  // The server parsed a request head: what it reads next is the body (unbounded here).

  void expectHead() {
    // The previous request is complete, body included: the next bytes are a request head.
    inHead = true;
    headBytes = 0;
  }

  kj::Promise<size_t> tryRead(void* buffer, size_t minBytes, size_t maxBytes) override {
    if (!inHead) return readAny(buffer, minBytes, maxBytes);
    if (headBytes >= options.maxRequestHeadBytes) return refuseHead();
    maxBytes = kj::min(maxBytes, options.maxRequestHeadBytes - headBytes);
    minBytes = kj::min(minBytes, maxBytes);
    return readAny(buffer, minBytes, maxBytes).then([this](size_t n) {
      if (inHead) headBytes += n;
      return n;
    });
  }

  kj::Promise<void> whenLeft() {
    // Resolves once the visitor closed (EOF) or reset its connection. Call it only when nobody
    // else reads the connection (the request body is complete). Many callers allowed.
    startReadAhead();
    return left.addBranch().exclusiveJoin(inner->whenWriteDisconnected());
  }

  kj::Promise<size_t> readAny(void* buffer, size_t minBytes, size_t maxBytes) {
    if (aheadStart < aheadEnd) {
      size_t n = kj::min(maxBytes, aheadEnd - aheadStart);
      memcpy(buffer, ahead.begin() + aheadStart, n);
      aheadStart += n;
      if (n >= minBytes) return n;
      return readInner(static_cast<kj::byte*>(buffer) + n, minBytes - n, maxBytes - n)
          .then([n](size_t more) { return n + more; });
    }
    if (aheadInFlight) {
      return KJ_ASSERT_NONNULL(readingAhead).addBranch()
          .then([this, buffer, minBytes, maxBytes]() {
        return readAny(buffer, minBytes, maxBytes);
      });
    }
    KJ_IF_MAYBE(e, failure) return kj::cp(*e);
    if (ended) return size_t(0);
    return readInner(buffer, minBytes, maxBytes);
  }
  kj::Promise<void> write(const void* buffer, size_t size) override {
    return inner->write(buffer, size);
  }
  kj::Promise<void> write(kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces) override {
    return inner->write(pieces);
  }
  kj::Maybe<kj::Promise<uint64_t>> tryPumpFrom(kj::AsyncInputStream& input,
                                               uint64_t amount) override {
    return inner->tryPumpFrom(input, amount);
  }
  kj::Promise<void> whenWriteDisconnected() override {
    // Once we ended our side, the visitor's FIN makes the socket report a hang-up, which
    // kj::HttpServer would take for a vanished client and cancel the exchange: a WebSocket relay
    // about to end cleanly (the origin ended first) would reset its tunnel stream instead of
    // passing the visitor's FIN on. Writes are over by then anyway, so that hang-up is ignored.
    return inner->whenWriteDisconnected().then([this]() -> kj::Promise<void> {
      if (writeShut) return kj::NEVER_DONE;
      return kj::READY_NOW;
    });
  }
  void shutdownWrite() override {
    writeShut = true;
    inner->shutdownWrite();
  }
  void abortRead() override { inner->abortRead(); }
  void getsockopt(int level, int option, void* value, kj::uint* length) override {
    inner->getsockopt(level, option, value, length);
  }
  void setsockopt(int level, int option, const void* value, kj::uint length) override {
    inner->setsockopt(level, option, value, length);
  }
  void getsockname(struct sockaddr* addr, kj::uint* length) override {
    inner->getsockname(addr, length);
  }
  void getpeername(struct sockaddr* addr, kj::uint* length) override {
    inner->getpeername(addr, length);
  }

private:
  static constexpr size_t AHEAD_SIZE = 4096;

  kj::Timer& timer;
  const FrontDoorOptions& options;
  bool inHead = true;                  // the server is reading a request head
  size_t headBytes = 0;                // bytes of that head handed to the server so far
  kj::Array<kj::byte> lingerBuffer;    // reads dropped after a 431
  kj::Own<kj::AsyncIoStream> inner;
  kj::Array<kj::byte> ahead;           // read-ahead bytes [aheadStart, aheadEnd)
  size_t aheadStart = 0;
  size_t aheadEnd = 0;
  bool writeShut = false;              // shutdownWrite() was called
  bool serverReading = false;          // a tryRead() of the server is in flight on `inner`
  bool aheadInFlight = false;          // `readingAhead` has not completed yet
  bool ended = false;                  // the read-ahead saw EOF
  kj::Maybe<kj::Exception> failure;    // the read-ahead failed (connection reset)
  kj::Own<kj::PromiseFulfiller<void>> leftFulfiller;
  kj::ForkedPromise<void> left;        // resolved when `ended` or `failure` is set
  kj::Maybe<kj::ForkedPromise<void>> readingAhead;   // last: cancelled first

  kj::ForkedPromise<void> makeLeft() {
    auto paf = kj::newPromiseAndFulfiller<void>();
    leftFulfiller = kj::mv(paf.fulfiller);
    return paf.promise.fork();
  }

  kj::Promise<size_t> refuseHead() {
    // Nothing else is written while the server waits for a head (the previous response was
    // flushed first), so the answer goes straight onto the connection. The DISCONNECTED error
    // then ends the server's loop without a log line or a second response.
    auto ray = kj::str(randomHex(8), '-', options.rayColo);
    auto page = errorPage(431, "Request header fields too large",
        kj::str("The request head is over ", options.maxRequestHeadBytes, " bytes."), ray);
    auto text = kj::str("HTTP/1.1 431 Request Header Fields Too Large\r\n"
                        "Content-Type: text/html; charset=UTF-8\r\nContent-Length: ", page.size(),
                        "\r\nConnection: close\r\nServer: cloudflare\r\nCf-Ray: ", ray,
                        "\r\n\r\n", page);
    auto promise = inner->write(text.begin(), text.size());
    return promise.attach(kj::mv(text)).then([this]() {
      shutdownWrite();
      // Read (and drop) what the visitor still sends for a while, as nginx's lingering close
      // does: closing with unread bytes would reset the connection, and a reset can destroy the
      // answer before the visitor read it.
      lingerBuffer = kj::heapArray<kj::byte>(4096);
      return timer.timeoutAfter(LINGER_TIME, discard(LINGER_BYTES))
          .catch_([](kj::Exception&&) {});
    }).then([]() -> size_t {
      kj::throwFatalException(KJ_EXCEPTION(DISCONNECTED, "request head over the limit; answered 431"));
    });
  }

  static constexpr size_t LINGER_BYTES = 1 << 20;
  static constexpr kj::Duration LINGER_TIME = 1 * kj::SECONDS;

  kj::Promise<void> discard(size_t budget) {
    return readAny(lingerBuffer.begin(), 1, lingerBuffer.size())
        .then([this, budget](size_t n) -> kj::Promise<void> {
      if (n == 0 || n >= budget) return kj::READY_NOW;
      return discard(budget - n);
    });
  }

  kj::Promise<size_t> readInner(void* buffer, size_t minBytes, size_t maxBytes) {
    serverReading = true;
    return inner->tryRead(buffer, minBytes, maxBytes)
        .attach(kj::defer([this]() { serverReading = false; }));
  }

  void startReadAhead() {
    if (ended || failure != nullptr || serverReading || aheadInFlight || aheadStart < aheadEnd) {
      return;
    }
    if (ahead.size() == 0) ahead = kj::heapArray<kj::byte>(AHEAD_SIZE);
    aheadStart = 0;
    aheadEnd = 0;
    aheadInFlight = true;
    // A fork hub runs its continuation eagerly; the fork is a member, so `this` outlives it.
    readingAhead = inner->tryRead(ahead.begin(), 1, ahead.size())
        .then([this](size_t n) { onReadAhead(n); },
              [this](kj::Exception&& e) { onReadAheadFailed(kj::mv(e)); })
        .fork();
  }

  void onReadAhead(size_t n) {
    aheadInFlight = false;
    aheadEnd = n;
    if (n == 0) {
      ended = true;
      leftFulfiller->fulfill();
    }
  }

  void onReadAheadFailed(kj::Exception&& e) {
    aheadInFlight = false;
    failure = kj::mv(e);
    leftFulfiller->fulfill();
  }
};

class FrontDoor::TunnelEnd final: public kj::AsyncIoStream {
  // The tunnel stream under a relayed WebSocket. kj's raw WebSocket pump ends its destination
  // with shutdownWrite() once the source hits EOF. Towards the tunnel that FIN is right only if
  // the origin already ended its side; otherwise the visitor left mid-session and the stream is
  // reset instead (by dropping it). So the FIN is held here, and the exchange calls finish().
public:
  explicit TunnelEnd(kj::Own<kj::AsyncIoStream> innerParam): inner(kj::mv(innerParam)) {}
  KJ_DISALLOW_COPY(TunnelEnd);

  void finish() {
    // Sends the FIN held back by shutdownWrite().
    if (finRequested && !finished) {
      finished = true;
      inner->shutdownWrite();
    }
  }

  kj::Promise<size_t> tryRead(void* buffer, size_t minBytes, size_t maxBytes) override {
    return inner->tryRead(buffer, minBytes, maxBytes);
  }
  kj::Promise<uint64_t> pumpTo(kj::AsyncOutputStream& output, uint64_t amount) override {
    return inner->pumpTo(output, amount);
  }
  kj::Promise<void> write(const void* buffer, size_t size) override {
    return inner->write(buffer, size);
  }
  kj::Promise<void> write(kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces) override {
    return inner->write(pieces);
  }
  kj::Maybe<kj::Promise<uint64_t>> tryPumpFrom(kj::AsyncInputStream& input,
                                               uint64_t amount) override {
    return inner->tryPumpFrom(input, amount);
  }
  kj::Promise<void> whenWriteDisconnected() override { return inner->whenWriteDisconnected(); }
  void shutdownWrite() override { finRequested = true; }
  void abortRead() override { inner->abortRead(); }

private:
  kj::Own<kj::AsyncIoStream> inner;
  bool finRequested = false;
  bool finished = false;
};

class FrontDoor::Service final: public kj::HttpService {
  // One per public connection: knows the raw connection (to answer Expect: 100-continue, to
  // abort a response mid-body and to notice a departed visitor) and the client's address.
public:
  Service(FrontDoor& door, Visitor& connection)
      : door(door), connection(connection), clientIp(peerIp(connection)) {}

  kj::Promise<void> request(kj::HttpMethod method, kj::StringPtr url,
                            const kj::HttpHeaders& headers, kj::AsyncInputStream& requestBody,
                            Response& response) override;

  FrontDoor& door;
  Visitor& connection;
  kj::String clientIp;
};

class FrontDoor::Exchange {
  // One public request proxied over one tunnel stream. Owned by the promise returned from
  // Service::request(), so continuations may capture `this`.
public:
  Exchange(Service& service, kj::HttpMethod method, kj::StringPtr url,
           const kj::HttpHeaders& headers, kj::AsyncInputStream& requestBody,
           kj::HttpService::Response& response)
      : door(service.door), service(service), method(method), url(url), headers(headers),
        requestBody(requestBody), response(response), ray(kj::str(randomHex(8), '-',
        door.options.rayColo)), bodyComplete(hasNoBody(requestBody)) {}
  KJ_DISALLOW_COPY(Exchange);

  kj::Promise<void> run();

private:
  FrontDoor& door;
  Service& service;
  kj::HttpMethod method;
  kj::StringPtr url;
  const kj::HttpHeaders& headers;
  kj::AsyncInputStream& requestBody;
  kj::HttpService::Response& response;
  kj::String ray;
  kj::String host;
  kj::uint recordId = 0;   // the tunnel connection chosen (admin id), 0 before
  bool websocket = false;
  bool bodyComplete = false;                 // the request body was read to its end
  kj::String webSocketKey;
  kj::Own<TunnelExchange> stream;
  kj::Array<kj::byte> upBuffer;
  kj::Array<kj::byte> downBuffer;
  kj::Maybe<uint64_t> remaining;             // response bytes still expected (Content-Length)
  kj::Own<kj::HttpHeaders> responseHeaders;
  kj::Own<kj::AsyncOutputStream> body;
  RandomEntropySource entropy;
  kj::Maybe<kj::Own<kj::PromiseFulfiller<void>>> stopWatching;
  kj::Own<kj::WebSocket> publicSocket;
  TunnelEnd* tunnelEnd = nullptr;            // owned by tunnelSocket
  bool originEnded = false;                  // the tunnel side of the WebSocket ended cleanly
  kj::Own<kj::WebSocket> tunnelSocket;       // last: dropping it resets the tunnel stream

  kj::Promise<void> sendPage(kj::uint status, kj::uint code, kj::StringPtr title, kj::StringPtr detail);
  kj::Promise<void> proxy(kj::Own<TunnelExchange> opened);
  kj::Promise<void> sendRequest();
  kj::Promise<void> sendBody();
  kj::Promise<void> pumpRequestBody();
  kj::Promise<void> onRequestChunk(size_t n);
  kj::Promise<void> tunnelWriteFailed(kj::Exception&& e);
  kj::Promise<void> requestComplete();
  kj::Promise<void> visitorLeft();
  kj::Promise<void> receiveResponse();
  kj::Promise<void> onResponseHead(kj::OneOf<wire::HttpResponseHead, wire::WireError> decoded);
  kj::Promise<void> responseHeadFailed(kj::Exception&& e);
  kj::Promise<void> pumpResponseBody();
  kj::Promise<void> onResponseChunk(size_t n);
  kj::Promise<void> relayWebSocket(kj::HttpHeaders& headers);
  kj::Promise<void> onVisitorSocketEnded();
  kj::Promise<void> onOriginSocketEnded();
  kj::Promise<void> webSocketFailed(kj::Exception&& e);
  kj::Exception abortPublic(kj::Exception&& e);
  kj::Array<wire::Header> forwardedHeaders();
  bool expectsContinue();

public:
  bool clientWantsClose() const;
  bool mustClose() const;
  // The connection ends after this exchange (Connection: close, or the body was not read).
  kj::Promise<void> refuse(kj::uint status, kj::StringPtr title, kj::StringPtr detail);
  // Sends an error page with Connection: close and ends the connection.
};

kj::Promise<void> FrontDoor::Service::request(
    kj::HttpMethod method, kj::StringPtr url, const kj::HttpHeaders& headers,
    kj::AsyncInputStream& requestBody, Response& response) {
  door.requests++;
  connection.requestStarted();
  auto exchange = kj::heap<Exchange>(*this, method, url, headers, requestBody, response);
  size_t count = 0;
  size_t largest = 0;
  headers.forEach([&](kj::StringPtr name, kj::StringPtr value) {
    count++;
    largest = kj::max(largest, name.size() + value.size());
  });
  kj::Promise<void> promise = nullptr;
  if (count > door.options.maxHeaderCount) {
    promise = exchange->refuse(400, "Bad request", kj::str("The request has ", count,
        " header fields; at most ", door.options.maxHeaderCount, " are accepted."));
  } else if (largest > door.options.maxHeaderFieldBytes) {
    promise = exchange->refuse(431, "Request header fields too large",
        kj::str("A request header field is over ", door.options.maxHeaderFieldBytes, " bytes."));
  } else if (hasInvalidLength(headers)) {
    // kj reads "-1" as 2^64-1 (strtoull); the real edge wants digits only.
    promise = exchange->refuse(400, "Bad request", "The request has an invalid Content-Length.");
  } else if (headers.get(kj::HttpHeaderId::CONTENT_LENGTH) != nullptr &&
             headers.get(kj::HttpHeaderId::TRANSFER_ENCODING) != nullptr) {
    // Where the body ends is ambiguous: a server behind that trusts Content-Length would take the
    // rest of a chunked body for a second request (request smuggling).
    promise = exchange->refuse(400, "Bad request",
        "The request has both Content-Length and Transfer-Encoding.");
  } else {
    promise = exchange->run();
  }
  auto& ex = *exchange;
  return promise.then([this, &ex]() {
    if (ex.mustClose()) {
      // kj::HttpServer 0.9.2 sends `Connection: close` (see CloseRequested) but then waits for
      // another request anyway. Shutting down our read side makes that wait see EOF once the
      // response is flushed, so the server ends the connection. Also taken when the request
      // body was not read to its end: kj would discard the rest and read the next head, which
      // the head limit could not tell from body bytes.
      connection.abortRead();
    } else {
      connection.expectHead();
    }
  }).attach(kj::mv(exchange));
}

bool FrontDoor::Exchange::mustClose() const {
  return clientWantsClose() || !bodyComplete;
}

kj::Promise<void> FrontDoor::Exchange::refuse(kj::uint status, kj::StringPtr title,
                                              kj::StringPtr detail) {
  // Answers and closes: DISCONNECTED ends kj::HttpServer's loop after the flush, silently, so no
  // byte after this head is ever read as a request.
  observe::logDebug("refusing a public request", observe::Fields().add("status", status)
      .add("detail", detail).add("ray", ray));
  bodyComplete = false;
  return sendPage(status, status, title, detail).then([]() -> kj::Promise<void> {
    return KJ_EXCEPTION(DISCONNECTED, "request refused; closing the connection");
  });
}

bool FrontDoor::Exchange::clientWantsClose() const {
  // `Connection: close` (in a token list, any case).
  KJ_IF_MAYBE(value, headers.get(kj::HttpHeaderId::CONNECTION)) {
    return containsIgnoreCase(*value, "close");
  }
  return false;
}

kj::Promise<void> FrontDoor::Exchange::sendPage(kj::uint status, kj::uint code, kj::StringPtr title,
                                                kj::StringPtr detail) {
  if (status == 502 && recordId != 0) {
    // Counted per tunnel connection (admin API "failed"): what replicas tests read.
    KJ_IF_MAYBE(r, door.registry.findConnection(recordId)) r->failed++;
  }
  auto page = errorPage(code, title, escapeHtml(detail), ray);
  kj::HttpHeaders pageHeaders(door.headerTable);
  pageHeaders.set(kj::HttpHeaderId::CONTENT_TYPE, "text/html; charset=UTF-8");
  pageHeaders.add("Cf-Ray", ray);
  pageHeaders.add("Server", "cloudflare");
  door.closeRequested.closeNext = mustClose();
  auto out = response.send(status, statusText(status), pageHeaders, page.size());
  auto promise = out->write(page.begin(), page.size());
  return promise.attach(kj::mv(out), kj::mv(page));
}

kj::Promise<void> FrontDoor::Exchange::run() {
  auto target = parseTarget(url);
  KJ_IF_MAYBE(h, headers.get(kj::HttpHeaderId::HOST)) {
    host = hostWithoutPort(*h);
  } else {
    host = hostWithoutPort(target.host);
  }
  if (host.size() == 0) {
    return sendPage(400, 400, "Bad request", "The request has no Host header.");
  }
  IssuedTunnel* tunnel = nullptr;
  KJ_IF_MAYBE(t, door.registry.findByHostname(host)) {
    tunnel = t;
  } else {
    return sendPage(530, 1033, "Cloudflare Tunnel error",
        kj::str("There is no tunnel at ", host, ": the hostname does not resolve to a tunnel."));
  }
  if (door.options.routeDelay > 0 * kj::SECONDS &&
      !door.registry.registeredFor(*tunnel, door.options.routeDelay)) {
    return sendPage(530, 1033, "Cloudflare Tunnel error",
        kj::str("The edge does not route ", host, " to its tunnel yet."));
  }
  ConnectionRecord* record = nullptr;
  KJ_IF_MAYBE(r, door.registry.pick(*tunnel)) {
    record = r;
  } else {
    return sendPage(530, 1033, "Cloudflare Tunnel error",
        kj::str("The tunnel for ", host, " has no live connection to the edge."));
  }
  auto& connection = KJ_ASSERT_NONNULL(record->connection);
  recordId = record->id;
  websocket = headers.isWebSocket();
  return door.timer.timeoutAfter(door.options.openStreamTimeout, connection.openExchange())
      .then([this](kj::Own<TunnelExchange> opened) { return proxy(kj::mv(opened)); },
            [this](kj::Exception&& e) {
        return sendPage(502, 502, "Bad gateway", kj::str("Could not open a tunnel stream: ",
                                                          e.getDescription()));
      });
}

kj::Promise<void> FrontDoor::Exchange::proxy(kj::Own<TunnelExchange> opened) {
  stream = kj::mv(opened);
  auto sending = sendRequest();
  return receiveResponse().exclusiveJoin(kj::mv(sending));
}

bool FrontDoor::Exchange::expectsContinue() {
  bool result = false;
  headers.forEach([&](kj::StringPtr name, kj::StringPtr value) {
    if (equalsIgnoreCase(name, "Expect") && containsIgnoreCase(value, "100-continue")) {
      result = true;
    }
  });
  return result;
}

kj::Array<wire::Header> FrontDoor::Exchange::forwardedHeaders() {
  kj::Vector<wire::Header> out;
  kj::Maybe<kj::String> forwardedFor;
  for (auto& header: wire::headersFromHttp(headers)) {
    if (equalsIgnoreCase(header.name, "X-Forwarded-For")) {
      forwardedFor = kj::mv(header.value);
    } else if (!nameIn(header.name, SKIPPED_REQUEST_HEADERS)) {
      out.add(kj::mv(header));
    }
  }
  if (websocket) {
    webSocketKey = kj::encodeBase64(randomBytes(16));
    out.add(wire::Header{kj::str("Connection"), kj::str("Upgrade")});
    out.add(wire::Header{kj::str("Upgrade"), kj::str("websocket")});
    out.add(wire::Header{kj::str("Sec-Websocket-Key"), kj::heapString(webSocketKey)});
    out.add(wire::Header{kj::str("Sec-Websocket-Version"), kj::str("13")});
  } else {
    KJ_IF_MAYBE(length, requestBody.tryGetLength()) {
      if (*length > 0 || headers.get(kj::HttpHeaderId::CONTENT_LENGTH) != nullptr) {
        out.add(wire::Header{kj::str("Content-Length"), kj::str(*length)});
      }
    } else {
      out.add(wire::Header{kj::str("Transfer-Encoding"), kj::str("chunked")});
    }
  }
  out.add(wire::Header{kj::str("Cf-Ray"), kj::heapString(ray)});
  out.add(wire::Header{kj::str("Cf-Connecting-Ip"), kj::heapString(service.clientIp)});
  KJ_IF_MAYBE(previous, forwardedFor) {
    out.add(wire::Header{kj::str("X-Forwarded-For"), kj::str(*previous, ", ", service.clientIp)});
  } else {
    out.add(wire::Header{kj::str("X-Forwarded-For"), kj::heapString(service.clientIp)});
  }
  out.add(wire::Header{kj::str("X-Forwarded-Proto"), kj::str(door.options.scheme)});
  out.add(wire::Header{kj::str("Cf-Visitor"),
                       kj::str("{\"scheme\":\"", door.options.scheme, "\"}")});
  return out.releaseAsArray();
}

kj::Promise<void> FrontDoor::Exchange::sendRequest() {
  auto target = parseTarget(url);
  auto dest = kj::str(door.options.scheme, "://", host, target.path);
  wire::HttpRequestHead head;
  head.dest = kj::mv(dest);
  head.type = websocket ? wire::schema::ConnectionType::WEBSOCKET
                        : wire::schema::ConnectionType::HTTP;
  head.method = kj::str(method);
  head.host = kj::heapString(host);
  for (auto& header: forwardedHeaders()) head.headers.add(kj::mv(header));
  // sendHead() copies what it needs (QUIC: the encoded ConnectRequest) before it returns.
  auto writing = stream->sendHead(head)
      .then([this]() { return sendBody(); },
            [this](kj::Exception&& e) { return tunnelWriteFailed(kj::mv(e)); });
  if (!websocket && requestBody.tryGetLength() != uint64_t(0) && expectsContinue()) {
    // kj 0.9.2's HttpServer ignores Expect; answer it like the real edge does, at once, on the
    // raw connection (nothing else is written on it before the response starts, and the
    // response can't start before the client read the ConnectRequest written after this).
    static constexpr kj::StringPtr CONTINUE = "HTTP/1.1 100 Continue\r\n\r\n"_kj;
    return service.connection.write(CONTINUE.begin(), CONTINUE.size())
        .then([writing = kj::mv(writing)]() mutable { return kj::mv(writing); });
  }
  return kj::mv(writing);
}

kj::Promise<void> FrontDoor::Exchange::sendBody() {
  if (websocket) return requestComplete();  // the stream becomes the frame pipe
  KJ_IF_MAYBE(length, requestBody.tryGetLength()) {
    if (*length == 0) {
      stream->shutdownWrite();
      return requestComplete();
    }
  }
  upBuffer = kj::heapArray<kj::byte>(bodyBufferSize(requestBody.tryGetLength()));
  return pumpRequestBody();
}

kj::Promise<void> FrontDoor::Exchange::pumpRequestBody() {
  // Read errors (the public client went away) reject; tunnel write errors only stop the upload,
  // since the response path decides how the exchange ends.
  return requestBody.tryRead(upBuffer.begin(), 1, upBuffer.size())
      .then([this](size_t n) { return onRequestChunk(n); });
}

kj::Promise<void> FrontDoor::Exchange::onRequestChunk(size_t n) {
  if (n == 0) {
    bodyComplete = true;
    stream->shutdownWrite();
    return requestComplete();
  }
  return stream->write(upBuffer.begin(), n)
      .then([this]() { return pumpRequestBody(); },
            [this](kj::Exception&& e) { return tunnelWriteFailed(kj::mv(e)); });
}

kj::Promise<void> FrontDoor::Exchange::tunnelWriteFailed(kj::Exception&& e) {
  observe::logDebug("tunnel stream stopped accepting the request", observe::Fields().add("ray", ray)
      .error(e));
  return kj::NEVER_DONE;
}

kj::Promise<void> FrontDoor::Exchange::requestComplete() {
  // The whole request is on the tunnel; nobody reads the public connection until the response
  // is done. Never resolves: rejects DISCONNECTED if the visitor leaves before then (a WebSocket
  // relay takes over watching through its own reads, see relayWebSocket()).
  auto paf = kj::newPromiseAndFulfiller<void>();
  stopWatching = kj::mv(paf.fulfiller);
  return service.connection.whenLeft().then([this]() { return visitorLeft(); })
      .exclusiveJoin(kj::mv(paf.promise))
      .then([]() -> kj::Promise<void> { return kj::NEVER_DONE; });
}

kj::Promise<void> FrontDoor::Exchange::visitorLeft() {
  // Ending the exchange drops the tunnel stream: RESET_STREAM for an unfinished request side,
  // STOP_SENDING for the response side.
  observe::logDebug("visitor left before the response was complete; resetting the tunnel stream",
                    observe::Fields().add("ray", ray));
  return KJ_EXCEPTION(DISCONNECTED, "the visitor left", ray);
}

kj::Promise<void> FrontDoor::Exchange::receiveResponse() {
  return door.timer.timeoutAfter(door.options.responseHeadTimeout, stream->readResponseHead())
      .then([this](kj::OneOf<wire::HttpResponseHead, wire::WireError> decoded) {
        return onResponseHead(kj::mv(decoded));
      }, [this](kj::Exception&& e) { return responseHeadFailed(kj::mv(e)); });
}

kj::Promise<void> FrontDoor::Exchange::responseHeadFailed(kj::Exception&& e) {
  if (e.getType() == kj::Exception::Type::OVERLOADED &&
      containsIgnoreCase(e.getDescription(), "timed out")) {
    return sendPage(524, 524, "A timeout occurred",
                    "The tunnel client did not answer the request in time.");
  }
  return sendPage(502, 502, "Bad gateway",
                  kj::str("The tunnel stream failed before a response: ", e.getDescription()));
}

kj::Promise<void> FrontDoor::Exchange::onResponseHead(
    kj::OneOf<wire::HttpResponseHead, wire::WireError> decoded) {
  wire::HttpResponseHead head;
  KJ_SWITCH_ONEOF(decoded) {
    KJ_CASE_ONEOF(error, wire::WireError) {
      return sendPage(502, 502, "Bad gateway",
                      kj::str("Invalid response from the tunnel: ", error.toString()));
    }
    KJ_CASE_ONEOF(h, wire::HttpResponseHead) {
      head = kj::mv(h);
    }
  }
  KJ_IF_MAYBE(error, head.error) {
    return sendPage(502, 502, "Bad gateway",
                    kj::str("The origin behind the tunnel failed: ", *error));
  }

  responseHeaders = kj::heap<kj::HttpHeaders>(door.headerTable);
  kj::Maybe<uint64_t> contentLength;
  for (auto& header: head.headers) {
    if (equalsIgnoreCase(header.name, "Content-Length")) {
      if (contentLength == nullptr) contentLength = parseDecimal(header.value);
    } else if (!nameIn(header.name, SKIPPED_RESPONSE_HEADERS)) {
      responseHeaders->add(kj::mv(header.name), kj::mv(header.value));
    }
  }

  if (head.status == 101) {
    if (!websocket) {
      return sendPage(502, 502, "Bad gateway", "The tunnel switched protocols unasked.");
    }
    for (auto& header: head.headers) {
      if (equalsIgnoreCase(header.name, "Sec-Websocket-Accept") &&
          header.value != webSocketAccept(webSocketKey)) {
        // Lenient on purpose: the public side gets its own accept value from kj, and the frames
        // that follow are what matters.
        observe::logDebug("tunnel answered the upgrade with another Sec-WebSocket-Accept",
                          observe::Fields().add("ray", ray));
      }
    }
    return relayWebSocket(*responseHeaders);
  }
  if (head.status < 200 || head.status > 599) {
    return sendPage(502, 502, "Bad gateway",
                    kj::str("Unusable status from the tunnel: ", head.status));
  }

  responseHeaders->add("Cf-Ray", kj::heapString(ray));
  bool noBody = method == kj::HttpMethod::HEAD || head.status == 204 || head.status == 304;
  kj::Maybe<uint64_t> expected = contentLength;
  if (head.status == 204 || head.status == 304) expected = uint64_t(0);
  door.closeRequested.closeNext = clientWantsClose();
  body = response.send(head.status, statusText(head.status), *responseHeaders, expected);
  if (noBody) return kj::READY_NOW;
  remaining = contentLength;
  downBuffer = kj::heapArray<kj::byte>(bodyBufferSize(contentLength));
  return pumpResponseBody();
}

kj::Promise<void> FrontDoor::Exchange::pumpResponseBody() {
  size_t limit = downBuffer.size();
  KJ_IF_MAYBE(r, remaining) {
    if (*r == 0) {
      body = nullptr;   // complete: ends the public body
      return kj::READY_NOW;
    }
    if (*r < limit) limit = *r;
  }
  return stream->tryRead(downBuffer.begin(), 1, limit)
      .then([this](size_t n) { return onResponseChunk(n); },
            [this](kj::Exception&& e) -> kj::Promise<void> {
        return abortPublic(kj::mv(e));
      });
}

kj::Promise<void> FrontDoor::Exchange::onResponseChunk(size_t n) {
  if (n == 0) {
    if (remaining != nullptr) {
      return abortPublic(KJ_EXCEPTION(DISCONNECTED,
          "tunnel stream ended before the announced Content-Length"));
    }
    body = nullptr;   // FIN: the response is complete
    return kj::READY_NOW;
  }
  KJ_IF_MAYBE(r, remaining) *r -= n;
  return body->write(downBuffer.begin(), n).then([this]() { return pumpResponseBody(); });
}

kj::Exception FrontDoor::Exchange::abortPublic(kj::Exception&& e) {
  // The response head is out: the only honest signal left is to cut the public connection
  // before kj writes a terminating chunk, so the client sees a truncated response, never a
  // complete one.
  observe::logDebug("tunnel stream failed mid-response; aborting public connection",
                    observe::Fields().add("ray", ray).error(e));
  kj::runCatchingExceptions([&]() { service.connection.shutdownWrite(); });
  kj::runCatchingExceptions([&]() { service.connection.abortRead(); });
  return KJ_EXCEPTION(DISCONNECTED, "tunnel stream failed mid-response", e.getDescription());
}

kj::Promise<void> FrontDoor::Exchange::relayWebSocket(kj::HttpHeaders& acceptHeaders) {
  // kj pumps the frames raw between the two sockets (a server-role and a client-role socket):
  // no message size limit, and at most one pump buffer in flight each way. The relay ends
  //  - cleanly when both sides ended: the origin first (its FIN reaches the visitor), then the
  //    visitor within webSocketCloseGrace (its EOF becomes the tunnel stream's FIN);
  //  - with the tunnel stream reset (RESET_STREAM + STOP_SENDING, by dropping it) when the
  //    visitor leaves while the origin side is still open, when the visitor does not end within
  //    the grace period, or when either side fails.
  KJ_IF_MAYBE(f, stopWatching) (*f)->fulfill();
  publicSocket = response.acceptWebSocket(acceptHeaders);
  auto end = kj::heap<TunnelEnd>(kj::mv(stream));
  tunnelEnd = end.get();
  tunnelSocket = kj::newWebSocket(kj::mv(end), entropy);
  auto up = publicSocket->pumpTo(*tunnelSocket).then([this]() { return onVisitorSocketEnded(); });
  auto down = tunnelSocket->pumpTo(*publicSocket).then([this]() { return onOriginSocketEnded(); });
  return up.exclusiveJoin(kj::mv(down))
      .catch_([this](kj::Exception&& e) { return webSocketFailed(kj::mv(e)); });
}

kj::Promise<void> FrontDoor::Exchange::onVisitorSocketEnded() {
  if (originEnded) {
    tunnelEnd->finish();
    return kj::READY_NOW;
  }
  return KJ_EXCEPTION(DISCONNECTED, "the visitor left while the origin side was open");
}

kj::Promise<void> FrontDoor::Exchange::onOriginSocketEnded() {
  // kj has passed the FIN on to the visitor; give the visitor the grace period to end too.
  originEnded = true;
  return door.timer.afterDelay(door.options.webSocketCloseGrace).then([]() -> kj::Promise<void> {
    return KJ_EXCEPTION(DISCONNECTED, "the visitor did not end the WebSocket in time");
  });
}

kj::Promise<void> FrontDoor::Exchange::webSocketFailed(kj::Exception&& e) {
  observe::logDebug("WebSocket relay ended; resetting the tunnel stream", observe::Fields()
      .add("ray", ray).error(e));
  return KJ_EXCEPTION(DISCONNECTED, "WebSocket relay ended", ray, e.getDescription());
}

// =============================================================================================

FrontDoor::FrontDoor(kj::Timer& timer, const kj::HttpHeaderTable& headerTable,
                     Registry& registry, FrontDoorOptions options)
    : timer(timer), headerTable(headerTable), registry(registry), options(options),
      parseErrors(*this),
      server(timer, headerTable,
             [this](kj::AsyncIoStream& connection) -> kj::Own<kj::HttpService> {
               // serve() hands kj::HttpServer nothing but Visitors.
               return kj::heap<Service>(*this, kj::downcast<Visitor>(connection));
             },
             [&]() {
               kj::HttpServerSettings settings;
               settings.headerTimeout = options.headerTimeout;
               settings.pipelineTimeout = options.pipelineTimeout;
               settings.callbacks = closeRequested;
               settings.errorHandler = parseErrors;
               return settings;
             }()),
      connections(errorHandler) {}

kj::Promise<void> FrontDoor::ParseErrors::handleClientProtocolError(
    kj::HttpHeaders::ProtocolError protocolError, kj::HttpService::Response& response) {
  auto ray = kj::str(randomHex(8), '-', door.options.rayColo);
  return sendErrorPage(response, door.headerTable, protocolError.statusCode,
                       protocolError.statusMessage, protocolError.description, ray);
}

kj::Promise<void> FrontDoor::ParseErrors::handleApplicationError(
    kj::Exception exception, kj::Maybe<kj::HttpService::Response&> response) {
  struct Known {
    kj::StringPtr needle;   // in kj 0.9.2's exception description
    kj::uint status;
    kj::StringPtr detail;
  };
  static constexpr Known KNOWN[] = {
    {"invalid HTTP chunk size"_kj, 400, "The request body has an invalid chunk size."_kj},
    {"invalid Content-Length"_kj, 400,
     "The request has an invalid Content-Length, or more than one."_kj},
    {"unknown transfer encoding"_kj, 501, "The request's Transfer-Encoding is not supported."_kj},
    {"request body cannot have Transfer-Encoding"_kj, 501,
     "The request's Transfer-Encoding is not supported."_kj},
    {"request headers too large"_kj, 431, "The request head is too large."_kj},
  };
  if (exception.getType() != kj::Exception::Type::DISCONNECTED) {
    KJ_IF_MAYBE(r, response) {
      for (auto& known: KNOWN) {
        if (containsIgnoreCase(exception.getDescription(), known.needle)) {
          auto ray = kj::str(randomHex(8), '-', door.options.rayColo);
          auto promise = sendErrorPage(*r, door.headerTable, known.status,
                                       statusText(known.status), known.detail, ray);
          return promise.attach(kj::mv(ray));
        }
      }
    }
  }
  return kj::HttpServerErrorHandler::handleApplicationError(kj::mv(exception), response);
}

FrontDoor::~FrontDoor() noexcept(false) {}

kj::Promise<void> FrontDoor::listen(kj::ConnectionReceiver& port) {
  // Our own accept loop rather than HttpServer::listenHttp(port): a public connection that we
  // abort on purpose (tunnel stream reset mid-body) must not be logged as a server bug.
  return port.accept().then([this, &port](kj::Own<kj::AsyncIoStream> connection) {
    connections.add(serve(kj::mv(connection)));
    return listen(port);
  });
}

void FrontDoor::ErrorHandler::taskFailed(kj::Exception&& exception) {
  // Public connections end with errors for ordinary reasons: the client went away (DISCONNECTED)
  // or we cut the connection after a tunnel stream failed mid-response (kj then reports
  // "previous HTTP message body incomplete"). Neither is a bug of this process.
  observe::logDebug("public connection ended with an error", observe::Fields().error(exception));
}

kj::Promise<void> FrontDoor::serve(kj::Own<kj::AsyncIoStream> connection) {
  return server.listenHttp(kj::heap<Visitor>(kj::mv(connection), timer, options));
}

kj::Promise<void> FrontDoor::drain() {
  return server.drain();
}

}  // namespace cfqt::emulator
