// The in-process origin (see in-process.h): InProcessRequest's application side, and
// InProcessExchange, its loop side, which pumps the edge stream to and from the request's
// buffers.

#include "origin/in-process.h"

#include "origin/text.h"
#include "observe/log.h"

#include <kj/debug.h>

#include <pthread.h>
#include <string.h>

namespace cfqt::origin {

struct InProcessRequest::State {
  // Request body, loop → application: at most one chunk (<= IN_PROCESS_WINDOW) at a time.
  kj::Vector<kj::byte> inbound;
  size_t inboundRead = 0;
  bool inboundEnd = false;

  // Response, application → loop.
  bool answered = false;
  kj::uint status = 0;
  kj::Array<wire::Header> headers;
  kj::Vector<kj::byte> outbound;           // < IN_PROCESS_WINDOW + one write() slice
  bool ended = false;
  kj::Maybe<kj::String> failure;
  bool released = false;

  bool cancelled = false;   // the visitor went away or the tunnel stopped before completion
  bool finished = false;    // the loop side is gone (completed or cancelled)

  kj::Maybe<kj::Own<kj::CrossThreadPromiseFulfiller<void>>> readerWake;
  // Set while the loop waits for the application to consume `inbound`.
  kj::Maybe<kj::Own<kj::CrossThreadPromiseFulfiller<void>>> writerWake;
  // Set while the loop waits for a head, body bytes, end, failure or release.

  void wakeReader() {
    KJ_IF_MAYBE(f, readerWake) {
      (*f)->fulfill();
      readerWake = nullptr;
    }
  }
  void wakeWriter() {
    KJ_IF_MAYBE(f, writerWake) {
      (*f)->fulfill();
      writerWake = nullptr;
    }
  }
};

namespace {

[[noreturn]] void throwError(kj::Exception::Type type, kj::StringPtr text) {
  kj::throwFatalException(kj::Exception(type, __FILE__, __LINE__, kj::str(text)));
}

[[noreturn]] void failCancelled() {
  throwError(kj::Exception::Type::DISCONNECTED,
       "cfqt: the request was cancelled (the visitor went away or the tunnel stopped)");
}

}  // namespace

InProcessRequest::InProcessRequest(wire::HttpRequestHead headParam)
    : head(kj::mv(headParam)), state(kj::heap<observe::Guarded<State>>()),
      loopThread(static_cast<unsigned long>(pthread_self())) {}

namespace {

void refuseToBlockLoop(unsigned long loopThread, const char* what) {
  if (pthread_equal(pthread_self(), static_cast<pthread_t>(loopThread))) {
    throwError(kj::Exception::Type::FAILED,
               kj::str("cfqt: ", what, " would block the tunnel's event loop (the handler runs "
                       "inline, handlerThreads = 0): hand the request to another thread"));
  }
}

}  // namespace

InProcessRequest::~InProcessRequest() noexcept(false) {}

size_t InProcessRequest::read(kj::ArrayPtr<kj::byte> buffer) const {
  if (buffer.size() == 0) return 0;
  auto lock = state->lockExclusive();
  auto ready = [](const State& s) {
    return s.inboundRead < s.inbound.size() || s.inboundEnd || s.cancelled || s.finished;
  };
  if (!ready(*lock)) refuseToBlockLoop(loopThread, "read()");
  lock.wait(ready);
  if (lock->inboundRead < lock->inbound.size()) {
    size_t n = kj::min(buffer.size(), lock->inbound.size() - lock->inboundRead);
    memcpy(buffer.begin(), lock->inbound.begin() + lock->inboundRead, n);
    lock->inboundRead += n;
    if (lock->inboundRead == lock->inbound.size()) {
      lock->inbound.clear();
      lock->inboundRead = 0;
      lock->wakeReader();
    }
    return n;
  }
  if (lock->inboundEnd) return 0;
  if (lock->cancelled) failCancelled();
  return 0;   // the response completed: the rest of the body is not read any more
}

namespace {

void checkHead(kj::uint status, kj::ArrayPtr<const wire::Header> headers) {
  if (status < 100 || status > 999) {
    throwError(kj::Exception::Type::FAILED, kj::str("cfqt: invalid response status ", status));
  }
  for (auto& h: headers) {
    if (!wire::isHttpToken(h.name)) {
      throwError(kj::Exception::Type::FAILED, "cfqt: invalid response header name");
    }
    if (!wire::isValidHeaderValue(h.value)) {
      throwError(kj::Exception::Type::FAILED,
                 kj::str("cfqt: invalid value of response header ", h.name));
    }
  }
}

void answer(InProcessRequest::State& state, kj::uint status, kj::Array<wire::Header> headers) {
  if (state.answered) {
    throwError(kj::Exception::Type::FAILED,
               "cfqt: this request was already answered (respond() was called twice)");
  }
  if (state.cancelled || state.finished) failCancelled();
  state.answered = true;
  state.status = status;
  state.headers = kj::mv(headers);
}

}  // namespace

void InProcessRequest::respond(kj::uint status, kj::Array<wire::Header> headers) const {
  checkHead(status, headers);
  auto lock = state->lockExclusive();
  answer(*lock, status, kj::mv(headers));
  lock->wakeWriter();
}

void InProcessRequest::respond(kj::uint status, kj::Array<wire::Header> headers,
                               kj::ArrayPtr<const kj::byte> body) const {
  checkHead(status, headers);
  {
    auto lock = state->lockExclusive();
    answer(*lock, status, kj::mv(headers));
    if (body.size() <= IN_PROCESS_WINDOW) {
      lock->outbound.addAll(body);
      lock->ended = true;
      lock->wakeWriter();
      return;
    }
    lock->wakeWriter();
  }
  write(body);
  end();
}

void InProcessRequest::write(kj::ArrayPtr<const kj::byte> data) const {
  while (data.size() > 0) {
    auto lock = state->lockExclusive();
    if (!lock->answered) throwError(kj::Exception::Type::FAILED, "cfqt: write() before respond()");
    if (lock->ended) throwError(kj::Exception::Type::FAILED, "cfqt: write() after end()");
    auto ready = [](const State& s) {
      return s.outbound.size() < IN_PROCESS_WINDOW || s.cancelled || s.finished;
    };
    if (!ready(*lock)) refuseToBlockLoop(loopThread, "write()");
    lock.wait(ready);
    if (lock->cancelled || lock->finished) failCancelled();
    size_t n = kj::min(data.size(), IN_PROCESS_WINDOW - lock->outbound.size());
    lock->outbound.addAll(data.slice(0, n));
    lock->wakeWriter();
    data = data.slice(n, data.size());
  }
}

void InProcessRequest::end() const {
  auto lock = state->lockExclusive();
  if (!lock->answered) throwError(kj::Exception::Type::FAILED, "cfqt: end() before respond()");
  lock->ended = true;
  lock->wakeWriter();
}

void InProcessRequest::fail(kj::StringPtr message) const {
  auto lock = state->lockExclusive();
  if (lock->ended || lock->finished || lock->failure != nullptr) return;
  lock->failure = kj::str(message);
  lock->wakeWriter();
}

void InProcessRequest::release() const {
  auto lock = state->lockExclusive();
  lock->released = true;
  lock->wakeWriter();
}

bool InProcessRequest::isCancelled() const { return state->lockShared()->cancelled; }

// =============================================================================================
// The loop side.

class InProcessExchange {
public:
  InProcessExchange(InProcessHandler& handler, kj::AsyncIoStream& stream,
                    wire::HttpRequestHead head, ResponseSink& sink,
                    kj::Maybe<OriginObserver&> observer)
      : handler(handler), stream(stream), sink(sink), observer(observer) {
    if (head.type == wire::schema::ConnectionType::WEBSOCKET || head.chunked) {
      mode = Body::UNTIL_EOF;
    } else if (head.contentLength.orDefault(0) > 0) {
      mode = Body::FIXED;
      remaining = KJ_ASSERT_NONNULL(head.contentLength);
    }
    request = kj::atomicRefcounted<InProcessRequest>(kj::mv(head));
  }

  ~InProcessExchange() noexcept(false) {
    auto lock = request->state->lockExclusive();
    if (!completed) lock->cancelled = true;
    lock->finished = true;
    lock->readerWake = nullptr;
    lock->writerWake = nullptr;
  }
  KJ_DISALLOW_COPY(InProcessExchange);

  kj::Promise<void> run() {
    return kj::evalNow([this]() {
      handler.dispatch(kj::atomicAddRef(*request));
      auto reader = readStep();
      return writeStep().exclusiveJoin(kj::mv(reader));
    }).catch_([this](kj::Exception&& e) { return onFailure(kj::mv(e)); });
  }

private:
  enum class Body { NONE, FIXED, UNTIL_EOF };
  using State = InProcessRequest::State;

  InProcessHandler& handler;
  kj::AsyncIoStream& stream;
  ResponseSink& sink;
  kj::Maybe<OriginObserver&> observer;
  kj::Own<InProcessRequest> request;
  Body mode = Body::NONE;
  uint64_t remaining = 0;
  kj::Array<kj::byte> readBuffer;
  kj::Vector<kj::byte> pending;   // being written to the edge
  kj::Vector<kj::byte> spare;     // pending's storage, reused
  bool headSent = false;
  bool completed = false;
  bool failureCounted = false;

  // Request body: edge → application, one chunk at a time.

  kj::Promise<void> readStep() {
    if (mode == Body::NONE || (mode == Body::FIXED && remaining == 0)) return bodyEnded();
    if (readBuffer == nullptr) readBuffer = kj::heapArray<kj::byte>(IN_PROCESS_WINDOW);
    size_t want = readBuffer.size();
    if (mode == Body::FIXED) want = kj::min<uint64_t>(uint64_t(want), remaining);
    return stream.tryRead(readBuffer.begin(), 1, want).then([this](size_t n) {
      return received(n);
    });
  }

  kj::Promise<void> bodyEnded() {
    request->state->lockExclusive()->inboundEnd = true;
    return kj::NEVER_DONE;   // the response side decides when the exchange ends
  }

  kj::Promise<void> received(size_t n) {
    if (n == 0) {
      if (mode == Body::FIXED) {
        return originException(kj::Exception::Type::DISCONNECTED,
                               "Incoming request ended abruptly");
      }
      return bodyEnded();
    }
    if (mode == Body::FIXED) remaining -= n;
    auto paf = kj::newPromiseAndCrossThreadFulfiller<void>();
    {
      auto lock = request->state->lockExclusive();
      lock->inbound.addAll(readBuffer.slice(0, n));
      lock->readerWake = kj::mv(paf.fulfiller);
    }
    return paf.promise.then([this]() { return readStep(); });
  }

  // Response: head, body, end (or failure) from the application.

  kj::Promise<void> writeStep() {
    // Decides under the lock, acts after releasing it (the sink and the stream never run while
    // an application thread could be kept waiting on the lock).
    enum class Action { WAIT, FAILED, HEAD, RELEASED, BODY, FAILED_AFTER_HEAD, END };
    Action action;
    kj::String message;
    kj::uint status = 0;
    kj::Array<wire::Header> headers;
    kj::Promise<void> woken = nullptr;
    {
      auto lock = request->state->lockExclusive();
      KJ_IF_MAYBE(m, lock->failure) {
        message = kj::mv(*m);
        lock->failure = nullptr;
        action = headSent ? Action::FAILED_AFTER_HEAD : Action::FAILED;
      } else if (!headSent && lock->answered) {
        action = Action::HEAD;
        status = lock->status;
        headers = kj::mv(lock->headers);
      } else if (!headSent && lock->released) {
        action = Action::RELEASED;
      } else if (headSent && lock->outbound.size() > 0) {
        action = Action::BODY;
        pending = kj::mv(lock->outbound);
        lock->outbound = kj::mv(spare);
      } else if (headSent && (lock->ended || lock->released)) {
        action = Action::END;
      } else {
        action = Action::WAIT;
        auto paf = kj::newPromiseAndCrossThreadFulfiller<void>();
        lock->writerWake = kj::mv(paf.fulfiller);
        woken = kj::mv(paf.promise);
      }
    }
    switch (action) {
      case Action::WAIT:
        return woken.then([this]() { return writeStep(); });
      case Action::FAILED:
        return handlerFailed(message);
      case Action::HEAD:
        return sendHead(status, kj::mv(headers));
      case Action::RELEASED:
        return handlerFailed("the handler released the request without answering");
      case Action::BODY:
        return stream.write(pending.begin(), pending.size()).then([this]() {
          pending.clear();
          spare = kj::mv(pending);
          return writeStep();
        });
      case Action::FAILED_AFTER_HEAD: {
        countFailure();
        auto dest = request->dest();
        kj::StringPtr cause = message;
        observe::logWarn("In-process handler failed after its response head",
                         observe::Fields().add("dest", dest).add("error", cause));
        return originException(kj::Exception::Type::DISCONNECTED,
                               kj::str("stream must be reset: handler failed: ", message));
      }
      case Action::END:
        finish();
        return kj::READY_NOW;
    }
    KJ_UNREACHABLE;
  }

  kj::Promise<void> sendHead(kj::uint status, kj::Array<wire::Header> headers) {
    headSent = true;
    KJ_IF_MAYBE(o, observer) o->responseHead(status);
    auto sent = sink.sendHead(status, headers);
    return sent.attach(kj::mv(headers)).then([this]() { return writeStep(); });
  }

  void finish() {
    completed = true;
    stream.shutdownWrite();
    stream.abortRead();
  }

  void countFailure() {
    if (failureCounted) return;
    failureCounted = true;
    KJ_IF_MAYBE(o, observer) o->requestFailed();
  }

  kj::Promise<void> handlerFailed(kj::StringPtr cause) {
    // Before the head: the visitor gets the edge's 502 page; the handler's message is logged
    // only (it may hold details not meant for the Internet).
    auto dest = request->dest();
    observe::logWarn("In-process handler failed",
                     observe::Fields().add("dest", dest).add("error", cause));
    return answerError(originErrorText("the in-process handler failed"));
  }

  kj::Promise<void> answerError(kj::String text) {
    countFailure();
    headSent = true;
    return sink.sendError(text).attach(kj::mv(text)).then([this]() { finish(); });
  }

  kj::Promise<void> onFailure(kj::Exception&& e) {
    countFailure();
    if (headSent) {
      if (e.getDescription().startsWith("origin: stream must be reset")) return kj::mv(e);
      return kj::Exception(kj::Exception::Type::DISCONNECTED, __FILE__, __LINE__,
                           kj::str("origin: stream must be reset: ", e.getDescription()));
    }
    // The request body broke off before the application answered (the visitor left).
    kj::StringPtr description = e.getDescription();
    return answerError(originErrorText(description.startsWith("origin: ")
                                           ? description.slice(strlen("origin: "))
                                           : description));
  }
};

kj::Promise<void> serveInProcess(InProcessHandler& handler, kj::AsyncIoStream& stream,
                                 wire::HttpRequestHead head, ResponseSink& sink,
                                 kj::Maybe<OriginObserver&> observer) {
  auto exchange = kj::heap<InProcessExchange>(handler, stream, kj::mv(head), sink, observer);
  auto promise = exchange->run();
  return promise.attach(kj::mv(exchange));
}

}  // namespace cfqt::origin
