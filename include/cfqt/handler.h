#pragma once
// cfqt public C++ API: serve a tunnel's requests in-process, with no origin server and no
// listening socket. Set TunnelOptions::handler instead of an origin URL:
//
//   cfqt::TunnelOptions options;
//   options.handler = [](std::shared_ptr<cfqt::Request> request) {
//     std::string body = "hello from " + request->url() + "\n";
//     request->respond(200, {{"Content-Type", "text/plain"}}, body);
//   };
//   auto tunnel = cfqt::Tunnel::start(options);
//
// Threading: the handler is called on one of the tunnel's handler threads (a pool that grows up
// to TunnelOptions::handlerThreads; further requests wait for a free thread), one call per
// request. It may block (read the body, write a long response) or return at once and answer later
// from any other thread: a Request is thread-safe and lives as long as a shared_ptr to it does.
// Nothing runs on the tunnel's event-loop thread, so blocking calls never stall other requests.
// Stopping the tunnel cancels the requests still open after the grace period (their blocked
// calls throw RequestCancelled); ~Tunnel then waits for running handler calls to return.
//
// Inline mode (TunnelOptions::handlerThreads = 0) saves the two thread hand-offs per request:
// the handler is called on the tunnel's event-loop thread and must not block. It answers at once
// (respond(status, headers, body) with a body up to 64 KiB never waits) or hands the request to
// a thread of its own; a read() or write() there that would have to wait throws RequestError
// instead of stalling every request of the tunnel.
//
// Streaming and back-pressure: read() hands over the request body as the visitor sends it; write()
// blocks while 64 KiB of the response are still waiting to go out, so a slow visitor (or a slow
// reader of an upload) never makes the tunnel buffer more than that plus its flow-control window.
//
// Errors, as for an origin server: a handler that throws before respond() → the visitor gets the
// edge's 502 error page (the exception's message is logged, not shown); after respond() the
// stream is reset. A request released without an answer → 502. A request never answered → the
// edge's timeout (524). When the visitor goes away (or the tunnel stops after its grace period),
// cancelled() turns true and blocked or later read()/write()/respond() calls throw
// RequestCancelled. No KJ type appears here.

#include <cstddef>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace cfqt {

using Headers = std::vector<std::pair<std::string, std::string>>;

class RequestError: public std::runtime_error {
  // Misuse of a Request: respond() twice, write() before respond() or after end(), an invalid
  // status or header.
public:
  using std::runtime_error::runtime_error;
};

class RequestCancelled: public std::runtime_error {
  // The request can no longer be answered: the visitor went away or the tunnel stopped.
public:
  using std::runtime_error::runtime_error;
};

class Request {
public:
  const std::string& method() const;   // "GET", ...
  const std::string& url() const;      // as the edge sent it: "https://<host>/path?query"
  const std::string& path() const;     // "/path?query"
  const std::string& host() const;     // the Host the visitor asked for
  const Headers& headers() const;      // canonical names ("Content-Type"), order and repeats kept
  std::string header(std::string_view name) const;   // first value (any case), "" if absent
  bool isWebSocket() const;
  // A WebSocket upgrade: answer 101 (with Sec-WebSocket-Accept) and the body becomes the raw
  // two-way byte stream of the session (read() the visitor's frames, write() yours).

  size_t read(void* buffer, size_t size);
  // Request body bytes, blocking until some arrive; 0 at the end of the body.
  std::string readAll(size_t limit);
  // The whole body; throws RequestError if it is longer than `limit`.

  void respond(int status, const Headers& headers = {});
  // The response head. Then write() the body and end() it.
  void respond(int status, const Headers& headers, std::string_view body);
  // Head, whole body and end in one call.
  void acceptWebSocket(const Headers& headers = {});
  // respond(101) to a WebSocket upgrade, with Upgrade, Connection and the Sec-WebSocket-Accept
  // computed from the request's Sec-WebSocket-Key. Throws RequestError if it is none.
  void write(const void* data, size_t size);
  void write(std::string_view data) { write(data.data(), data.size()); }
  void end();
  // The body is complete. Idempotent. Dropping the last shared_ptr also ends it.
  void fail(const std::string& message);
  // The handler failed: 502 before respond(), a reset stream after. `message` is logged.

  bool cancelled() const;
  bool answered() const;

  ~Request();
  // Unanswered → 502; answered → the body ends as with end().

  class Impl;
  explicit Request(std::unique_ptr<Impl> impl);

private:
  std::unique_ptr<Impl> impl;
};

using Handler = std::function<void(std::shared_ptr<Request> request)>;
// Called on a handler thread for each request (see above). Exceptions it throws fail the request.

}  // namespace cfqt
