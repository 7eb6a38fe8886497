#include "origin/hello-world.h"
#include "observe/log.h"

#include <kj/debug.h>

#include <string.h>

namespace cfqt::origin {
namespace {

constexpr size_t MAX_ECHO_MESSAGE = 1 << 20;

kj::String htmlEscape(kj::StringPtr text) {
  kj::Vector<char> out(text.size() + 16);
  for (char c: text) {
    switch (c) {
      case '<': out.addAll(kj::StringPtr("&lt;")); break;
      case '>': out.addAll(kj::StringPtr("&gt;")); break;
      case '&': out.addAll(kj::StringPtr("&amp;")); break;
      case '"': out.addAll(kj::StringPtr("&quot;")); break;
      default: out.add(c); break;
    }
  }
  out.add('\0');
  return kj::String(out.releaseAsArray());
}

bool isTooLarge(const kj::Exception& e) {
  // kj 0.9.2's WebSocket::receive() fails FAILED "WebSocket message is too large" once a frame
  // header announces more than maxSize (or a fragmented message outgrows it).
  return e.getType() == kj::Exception::Type::FAILED &&
      strstr(e.getDescription().cStr(), "too large") != nullptr;
}

// Echoes every message until the peer closes. Owns the WebSocket. A message of
// MAX_ECHO_MESSAGE bytes or more is answered with Close 1009 (message too big), a malformed frame
// with Close 1002 (protocol error); the session then ends without reading further (the frame in
// progress can't be skipped). A peer that vanishes just ends it.
class EchoSession {
public:
  explicit EchoSession(kj::Own<kj::WebSocket> wsParam): ws(kj::mv(wsParam)) {}
  KJ_DISALLOW_COPY(EchoSession);

  kj::Promise<void> run() {
    return kj::evalNow([this]() { return ws->receive(MAX_ECHO_MESSAGE); })
        .then([this](kj::WebSocket::Message&& message) { return onMessage(kj::mv(message)); },
              [this](kj::Exception&& e) { return onReceiveFailed(kj::mv(e)); });
  }

private:
  kj::Own<kj::WebSocket> ws;
  kj::WebSocket::Message current;

  kj::Promise<void> onMessage(kj::WebSocket::Message&& message) {
    current = kj::mv(message);
    KJ_SWITCH_ONEOF(current) {
      KJ_CASE_ONEOF(text, kj::String) {
        return ws->send(text.asArray()).then([this]() { return run(); });
      }
      KJ_CASE_ONEOF(bytes, kj::Array<kj::byte>) {
        return ws->send(bytes.asPtr()).then([this]() { return run(); });
      }
      KJ_CASE_ONEOF(close, kj::WebSocket::Close) {
        return ws->close(close.code, close.reason);
      }
    }
    KJ_UNREACHABLE;
  }

  kj::Promise<void> onReceiveFailed(kj::Exception&& e) {
    if (e.getType() == kj::Exception::Type::DISCONNECTED) {
      observe::logDebug("hello-world /ws: the peer went away", observe::Fields().error(e));
      return kj::READY_NOW;
    }
    if (isTooLarge(e)) {
      observe::logDebug("hello-world /ws: message over the limit, closing with 1009",
                        observe::Fields().add("limit", MAX_ECHO_MESSAGE));
      return closeWith(1009, "message too big");
    }
    observe::logDebug("hello-world /ws: bad frame, closing with 1002", observe::Fields().error(e));
    return closeWith(1002, "protocol error");
  }

  kj::Promise<void> closeWith(uint16_t code, kj::StringPtr reason) {
    // The Close frame, then FIN; a peer that is gone by then changes nothing.
    return ws->close(code, reason).then([this]() { return ws->disconnect(); })
        .catch_([](kj::Exception&& e) {
      observe::logDebug("hello-world /ws: could not send the Close frame", observe::Fields()
          .error(e));
    });
  }
};

// Writes "data: <n>" events forever (until the reader goes away).
class SseSession {
public:
  SseSession(kj::Timer& timer, kj::Duration interval, kj::Own<kj::AsyncOutputStream> body)
      : timer(timer), interval(interval), body(kj::mv(body)) {}
  KJ_DISALLOW_COPY(SseSession);

  kj::Promise<void> run() {
    event = kj::str("id: ", counter, "\ndata: ", counter, "\n\n");
    ++counter;
    return body->write(event.begin(), event.size())
        .then([this]() { return timer.afterDelay(interval); })
        .then([this]() { return run(); });
  }

private:
  kj::Timer& timer;
  kj::Duration interval;
  kj::Own<kj::AsyncOutputStream> body;
  kj::String event;
  uint64_t counter = 0;
};

class HelloWorldService final: public kj::HttpService {
public:
  HelloWorldService(kj::Timer& timer, const kj::HttpHeaderTable& table, kj::Duration sseInterval)
      : timer(timer), table(table), sseInterval(sseInterval) {}

  kj::Promise<void> request(kj::HttpMethod method, kj::StringPtr url,
                            const kj::HttpHeaders& headers, kj::AsyncInputStream& requestBody,
                            Response& response) override {
    auto path = kj::heapString(url);
    KJ_IF_MAYBE(q, url.findFirst('?')) {
      path = kj::heapString(url.slice(0, *q));
    }
    if (path == "/ws") return serveWebSocket(headers, response);
    if (path == "/sse") return serveSse(response);
    if (path == "/_health") return sendText(response, 200, "text/plain; charset=utf-8", kj::str("OK"));
    return servePage(method, url, headers, response);
  }

private:
  kj::Timer& timer;
  const kj::HttpHeaderTable& table;
  kj::Duration sseInterval;

  kj::Promise<void> sendText(Response& response, kj::uint status, kj::StringPtr type,
                             kj::String text) {
    kj::HttpHeaders out(table);
    out.set(kj::HttpHeaderId::CONTENT_TYPE, type);
    auto body = response.send(status, status == 200 ? "OK" : "Error", out, text.size());
    auto promise = body->write(text.begin(), text.size());
    return promise.attach(kj::mv(body), kj::mv(text));
  }

  kj::Promise<void> servePage(kj::HttpMethod method, kj::StringPtr url,
                              const kj::HttpHeaders& headers, Response& response) {
    kj::Vector<kj::String> rows;
    headers.forEach([&](kj::StringPtr name, kj::StringPtr value) {
      rows.add(kj::str("<tr><td>", htmlEscape(name), "</td><td>", htmlEscape(value),
                       "</td></tr>\n"));
    });
    auto page = kj::str(
        "<!DOCTYPE html>\n<html><head><title>cfqt hello world</title></head><body>\n"
        "<h1>Congrats! You created a tunnel!</h1>\n"
        "<p>Method: <code>", method, "</code></p>\n"
        "<p>Path: <code>", htmlEscape(url), "</code></p>\n"
        "<table>\n", kj::strArray(rows, ""), "</table>\n</body></html>\n");
    return sendText(response, 200, "text/html; charset=utf-8", kj::mv(page));
  }

  kj::Promise<void> serveWebSocket(const kj::HttpHeaders& headers, Response& response) {
    if (!headers.isWebSocket()) {
      return sendText(response, 400, "text/plain; charset=utf-8",
                      kj::str("expected a WebSocket upgrade\n"));
    }
    kj::HttpHeaders out(table);
    auto session = kj::heap<EchoSession>(response.acceptWebSocket(out));
    auto promise = session->run();
    return promise.attach(kj::mv(session));
  }

  kj::Promise<void> serveSse(Response& response) {
    kj::HttpHeaders out(table);
    out.set(kj::HttpHeaderId::CONTENT_TYPE, "text/event-stream");
    out.add("Cache-Control", "no-cache");
    auto session = kj::heap<SseSession>(timer, sseInterval, response.send(200, "OK", out));
    auto promise = session->run();
    return promise.attach(kj::mv(session));
  }

};

}  // namespace

kj::Own<kj::HttpService> newHelloWorldService(kj::Timer& timer, const kj::HttpHeaderTable& table,
                                              kj::Duration sseInterval) {
  return kj::heap<HelloWorldService>(timer, table, sseInterval);
}

}  // namespace cfqt::origin
