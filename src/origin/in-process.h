// The in-process origin (OriginKind::HANDLER): instead of dialling an origin server, each request
// is handed to the host application as an InProcessRequest, which the application answers from
// its own threads. The loop side (serveInProcess()) streams the request body in and the response
// body out with bounded buffers; the application side blocks (read, write) on a mutex, never on
// the event loop.

#pragma once

#include "observe/guarded.h"
#include "origin/origin.h"

#include <kj/async.h>
#include <kj/mutex.h>
#include <kj/refcount.h>
#include <kj/vector.h>

namespace cfqt::origin {

constexpr size_t IN_PROCESS_WINDOW = 64 * 1024;
// Per direction and request, at most this many bytes wait between the tunnel and the
// application (plus one chunk being written by the loop): a slow application never makes the
// tunnel buffer more, whatever the body's size; the transport's flow control does the rest.

class InProcessRequest final: public kj::AtomicRefcounted {
  // One request for an in-process handler, shared between the tunnel's loop thread and the
  // application's threads. The head is immutable; every method is thread-safe (const) and may
  // block the calling thread, so none may be called on the tunnel's loop thread except
  // isCancelled(), respond(), end(), fail() and release(), which never block.
public:
  explicit InProcessRequest(wire::HttpRequestHead head);
  ~InProcessRequest() noexcept(false);

  kj::StringPtr method() const { return head.method; }
  kj::StringPtr dest() const { return head.dest; }
  kj::StringPtr host() const { return head.host; }
  kj::ArrayPtr<const wire::Header> headers() const { return head.headers; }
  bool isWebSocket() const { return head.type == wire::schema::ConnectionType::WEBSOCKET; }

  size_t read(kj::ArrayPtr<kj::byte> buffer) const;
  // Request body bytes (WebSocket: the visitor's raw bytes), blocking until some arrived; 0 at
  // the body's end. Throws DISCONNECTED once the request was cancelled (visitor gone, tunnel
  // stopped) with nothing left to read. On the loop thread (a handler called inline), a read or
  // write that would have to wait throws FAILED instead of deadlocking the loop.

  void respond(kj::uint status, kj::Array<wire::Header> headers) const;
  // The response head. Throws FAILED "already answered" on a second call, DISCONNECTED if the
  // request was cancelled. A 101 to a WebSocket request makes the body a raw two-way stream.

  void respond(kj::uint status, kj::Array<wire::Header> headers,
               kj::ArrayPtr<const kj::byte> body) const;
  // Head, whole body and end at once: one hand-off to the loop when the body fits the window.

  void write(kj::ArrayPtr<const kj::byte> data) const;
  // Response body bytes; blocks while IN_PROCESS_WINDOW bytes are still waiting for the loop
  // (back-pressure). Throws FAILED before respond() or after end(), DISCONNECTED once cancelled.

  void end() const;
  // The response body is complete. Idempotent. Throws FAILED before respond().

  void fail(kj::StringPtr message) const;
  // The handler failed: a 502 for the visitor if no head went out, else the stream is reset.
  // `message` is logged, not shown to the visitor. No-op once the response ended.

  void release() const;
  // The application dropped the request: unanswered → 502 ("handler released the request
  // without answering"); answered → the body ends as with end(). Idempotent.

  bool isCancelled() const;
  // True once the visitor went away or the tunnel stopped before the response completed.

  struct State;

private:
  wire::HttpRequestHead head;
  kj::Own<observe::Guarded<State>> state;
  unsigned long loopThread;   // pthread_t of the loop: a blocking call there would deadlock

  friend class InProcessExchange;
};

class InProcessHandler {
  // The application's side of an in-process origin.
public:
  virtual void dispatch(kj::Own<const InProcessRequest> request) = 0;
  // Called on the tunnel's loop thread for each new request; must not block (hand the request
  // to another thread). The request is answered through its own methods.
};

kj::Promise<void> serveInProcess(InProcessHandler& handler, kj::AsyncIoStream& stream,
                                 wire::HttpRequestHead head, ResponseSink& sink,
                                 kj::Maybe<OriginObserver&> observer);
// Origin::serve() for OriginKind::HANDLER: completion and failure rules as there (a failure
// before the head → sink.sendError(), after it → rejects "origin: stream must be reset").
// Cancelling the promise cancels the request (the application's blocked calls throw).

}  // namespace cfqt::origin
