#include "h2-session.h"

#include <nghttp2/nghttp2.h>

#include <kj/debug.h>

namespace cfqt::emulator {

namespace {

constexpr size_t READ_BUFFER_SIZE = 32 * 1024;
constexpr size_t WRITE_BATCH = 64 * 1024;
// Frames gathered from nghttp2_session_mem_send() into one transport write.
constexpr size_t COMPACT_THRESHOLD = 64 * 1024;

kj::Exception sessionEnded(kj::StringPtr why) {
  return KJ_EXCEPTION(DISCONNECTED, "the HTTP/2 connection to the client ended", why);
}

}  // namespace

// =============================================================================================
// nghttp2 callbacks: record state and wake promises, never throw, never do I/O.

struct Http2Session::Callbacks {
  static Http2Session& self(void* user) { return *static_cast<Http2Session*>(user); }

  static Http2Stream* streamOf(nghttp2_session* ng, int32_t id) {
    return static_cast<Http2Stream*>(nghttp2_session_get_stream_user_data(ng, id));
  }

  template <typename Func>
  static int guard(void* user, Func&& func) {
    int rc = 0;
    KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() { rc = func(); })) {
      auto& session = self(user);
      if (session.pendingError == nullptr) session.pendingError = kj::mv(*e);
      return NGHTTP2_ERR_CALLBACK_FAILURE;
    }
    return rc;
  }

  static int onHeader(nghttp2_session* ng, const nghttp2_frame* frame, const uint8_t* name,
                      size_t nameLength, const uint8_t* value, size_t valueLength,
                      uint8_t flags, void* user) {
    return guard(user, [&]() -> int {
      if (frame->hd.type != NGHTTP2_HEADERS) return 0;
      auto stream = streamOf(ng, frame->hd.stream_id);
      if (stream == nullptr) return 0;
      bool ok = stream->onHeader(
          kj::arrayPtr(reinterpret_cast<const char*>(name), nameLength),
          kj::arrayPtr(reinterpret_cast<const char*>(value), valueLength),
          self(user).options.maxHeaderBytes);
      // TEMPORAL_CALLBACK_FAILURE resets only this stream (INTERNAL_ERROR).
      return ok ? 0 : NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    });
  }

  static int onBeginHeaders(nghttp2_session* ng, const nghttp2_frame* frame, void* user) {
    return guard(user, [&]() -> int {
      if (frame->hd.type == NGHTTP2_HEADERS && frame->headers.cat == NGHTTP2_HCAT_REQUEST) {
        self(user).onPeerStream(frame->hd.stream_id);
      }
      return 0;
    });
  }

  static int onFrameRecv(nghttp2_session* ng, const nghttp2_frame* frame, void* user) {
    return guard(user, [&]() -> int {
      bool endStream = (frame->hd.flags & NGHTTP2_FLAG_END_STREAM) != 0;
      switch (frame->hd.type) {
        case NGHTTP2_HEADERS:
          if (auto stream = streamOf(ng, frame->hd.stream_id)) stream->onHeadersEnd(endStream);
          break;
        case NGHTTP2_DATA:
          if (endStream) {
            if (auto stream = streamOf(ng, frame->hd.stream_id)) stream->onEndStream();
          }
          break;
        case NGHTTP2_GOAWAY: {
          auto& session = self(user);
          session.goingAway = true;
          auto& goAway = frame->goaway;
          auto debug = kj::heapString(reinterpret_cast<const char*>(goAway.opaque_data),
                                      goAway.opaque_data_len);
          session.observer.peerGoAway(goAway.error_code, debug);
          break;
        }
        default:
          break;
      }
      return 0;
    });
  }

  static int onDataChunk(nghttp2_session* ng, uint8_t flags, int32_t id, const uint8_t* data,
                         size_t length, void* user) {
    return guard(user, [&]() -> int {
      auto stream = streamOf(ng, id);
      if (stream == nullptr || stream->withheld) {
        if (stream == nullptr) {
          nghttp2_session_consume_connection(ng, length);   // dropped: its RST is queued
        } else {
          stream->withheldConnectionBytes += length;
        }
      } else {
        // Connection credit goes back at once; stream credit only as the reader consumes.
        nghttp2_session_consume_connection(ng, length);
      }
      if (stream != nullptr) stream->onData(kj::arrayPtr(data, length));
      return 0;
    });
  }

  static int onStreamClose(nghttp2_session* ng, int32_t id, uint32_t errorCode, void* user) {
    return guard(user, [&]() -> int {
      if (auto stream = streamOf(ng, id)) stream->onClosed(errorCode);
      return 0;
    });
  }

  static int onFrameSend(nghttp2_session* ng, const nghttp2_frame* frame, void* user) {
    if (frame->hd.type == NGHTTP2_GOAWAY) self(user).goAwaySent = true;
    return 0;
  }

  static ssize_t readBody(nghttp2_session* ng, int32_t id, uint8_t* buffer, size_t length,
                          uint32_t* flags, nghttp2_data_source* source, void* user) {
    auto stream = streamOf(ng, id);
    if (stream == nullptr) {
      // Dropped: either its RST is queued, or only its END_STREAM was left to send.
      if (self(user).orphanEnds.eraseMatch(id)) {
        *flags |= NGHTTP2_DATA_FLAG_EOF;
        return 0;
      }
      return NGHTTP2_ERR_DEFERRED;
    }
    auto n = stream->produce(buffer, length, flags);
    if (n < 0) return NGHTTP2_ERR_DEFERRED;
    return static_cast<ssize_t>(n);
  }
};

// =============================================================================================
// Http2Stream

Http2Stream::Http2Stream(Http2Session& sessionParam, uint64_t key, bool withheld)
    : session(&sessionParam), key(key), withheld(withheld), disconnected(makeDisconnected()) {}

kj::ForkedPromise<void> Http2Stream::makeDisconnected() {
  auto paf = kj::newPromiseAndFulfiller<void>();
  disconnectFulfiller = kj::mv(paf.fulfiller);
  return paf.promise.fork();
}

Http2Stream::~Http2Stream() noexcept(false) {
  if (session != nullptr) session->forget(*this);
}

kj::Exception Http2Stream::gone() const {
  KJ_IF_MAYBE(e, failure) return kj::cp(*e);
  return sessionEnded("the stream's session is gone");
}

void Http2Stream::submit(kj::ArrayPtr<const wire::Header> headers, bool endStream) {
  KJ_REQUIRE(!submitted, "HTTP/2 request submitted twice");
  if (session == nullptr) kj::throwFatalException(gone());
  session->submit(*this, headers, endStream);
}

kj::Promise<Http2Head> Http2Stream::receiveHead() {
  KJ_IF_MAYBE(h, head) {
    auto result = kj::mv(*h);
    head = nullptr;
    return kj::mv(result);
  }
  KJ_IF_MAYBE(e, failure) return kj::cp(*e);
  KJ_REQUIRE(!headReceived && headWaiter == nullptr, "receiveHead() called twice");
  auto paf = kj::newPromiseAndFulfiller<Http2Head>();
  headWaiter = kj::mv(paf.fulfiller);
  return kj::mv(paf.promise);
}

void Http2Stream::setCreditWithheld(bool value) {
  withheld = value;
  if (withheld || session == nullptr) return;
  // Everything withheld goes back at once.
  if (withheldConnectionBytes > 0) {
    nghttp2_session_consume_connection(session->ng.ptr, withheldConnectionBytes);
    withheldConnectionBytes = 0;
  }
  size_t streamBytes = withheldStreamBytes;
  withheldStreamBytes = 0;
  consumed(streamBytes);
  session->flush();
}

void Http2Stream::reset(uint32_t errorCode) {
  if (session != nullptr && streamId > 0 && !closed && !resetSent) {
    resetSent = true;
    nghttp2_submit_rst_stream(session->ng.ptr, NGHTTP2_FLAG_NONE, streamId, errorCode);
    session->flush();
  }
  fail(KJ_EXCEPTION(DISCONNECTED, "the emulator reset the HTTP/2 stream", streamId, errorCode));
}

kj::Promise<size_t> Http2Stream::tryRead(void* buffer, size_t minBytes, size_t maxBytes) {
  return readSome(static_cast<kj::byte*>(buffer), minBytes, maxBytes, 0);
}

kj::Promise<size_t> Http2Stream::readSome(kj::byte* out, size_t minBytes, size_t maxBytes,
                                          size_t done) {
  size_t n = kj::min(body.size() - bodyStart, maxBytes - done);
  if (n > 0) {
    memcpy(out + done, body.begin() + bodyStart, n);
    bodyStart += n;
    done += n;
    compactBody();
    consumed(n);
  }
  if (done >= minBytes) return done;
  if (remoteEnded) return done;                      // EOF (buffered bytes came first)
  KJ_IF_MAYBE(e, failure) {
    if (done > 0) return done;
    return kj::cp(*e);
  }
  auto paf = kj::newPromiseAndFulfiller<void>();
  readWaiter = kj::mv(paf.fulfiller);
  return paf.promise.then([this, out, minBytes, maxBytes, done]() {
    return readSome(out, minBytes, maxBytes, done);
  });
}

void Http2Stream::compactBody() {
  if (bodyStart == body.size()) {
    body.clear();
    bodyStart = 0;
  } else if (bodyStart >= COMPACT_THRESHOLD && bodyStart * 2 >= body.size()) {
    size_t rest = body.size() - bodyStart;
    memmove(body.begin(), body.begin() + bodyStart, rest);
    body.truncate(rest);
    bodyStart = 0;
  }
}

void Http2Stream::consumed(size_t n) {
  if (n == 0 || session == nullptr || closed || streamId < 0) return;
  if (withheld) {
    withheldStreamBytes += n;
    return;
  }
  nghttp2_session_consume_stream(session->ng.ptr, streamId, n);
  session->flush();
}

kj::Promise<void> Http2Stream::write(const void* buffer, size_t size) {
  KJ_IF_MAYBE(e, failure) return kj::cp(*e);
  if (session == nullptr) return gone();
  KJ_REQUIRE(submitted && hasBody && !endRequested,
             "write on an HTTP/2 request that takes no (more) body", streamId);
  KJ_REQUIRE(writeWaiter == nullptr, "one write at a time on an HTTP/2 stream", streamId);
  if (size == 0) return kj::READY_NOW;
  pending = kj::arrayPtr(static_cast<const kj::byte*>(buffer), size);
  auto paf = kj::newPromiseAndFulfiller<void>();
  writeWaiter = kj::mv(paf.fulfiller);
  auto seq = ++writeSeq;
  session->resume(*this);
  // A cancelled write must not leave nghttp2 reading the caller's (soon freed) buffer.
  return paf.promise.attach(kj::defer([this, seq]() {
    if (writeSeq == seq && writeWaiter != nullptr) {
      writeWaiter = nullptr;
      pending = nullptr;
    }
  }));
}

kj::Promise<void> Http2Stream::write(kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces) {
  size_t total = 0;
  for (auto& piece: pieces) total += piece.size();
  auto bytes = kj::heapArray<kj::byte>(total);
  size_t at = 0;
  for (auto& piece: pieces) {
    if (piece.size() > 0) memcpy(bytes.begin() + at, piece.begin(), piece.size());
    at += piece.size();
  }
  auto promise = write(bytes.begin(), bytes.size());
  return promise.attach(kj::mv(bytes));
}

kj::Promise<void> Http2Stream::whenWriteDisconnected() {
  return disconnected.addBranch();
}

void Http2Stream::shutdownWrite() {
  if (endRequested) return;
  endRequested = true;
  if (session != nullptr && submitted && hasBody && !endSent && !closed) session->resume(*this);
}

void Http2Stream::fail(kj::Exception&& e) {
  if (failure == nullptr) failure = kj::mv(e);
  auto& stored = KJ_ASSERT_NONNULL(failure);
  KJ_IF_MAYBE(w, writeWaiter) {
    (*w)->reject(kj::cp(stored));
    writeWaiter = nullptr;
  }
  pending = nullptr;
  KJ_IF_MAYBE(w, headWaiter) {
    (*w)->reject(kj::cp(stored));
    headWaiter = nullptr;
  }
  wakeReader();
  disconnectFulfiller->fulfill();
}

void Http2Stream::wakeReader() {
  KJ_IF_MAYBE(w, readWaiter) {
    (*w)->fulfill();
    readWaiter = nullptr;
  }
}

bool Http2Stream::onHeader(kj::ArrayPtr<const char> name, kj::ArrayPtr<const char> value,
                           size_t limit) {
  headerBytes += name.size() + value.size() + 32;
  if (headerBytes > limit) return false;
  if (headReceived) return true;                     // trailers: not used
  if (name == kj::StringPtr(":status").asArray()) {
    // nghttp2's HTTP messaging checks already made it 3 digits.
    kj::uint status = 0;
    for (char c: value) {
      if (c < '0' || c > '9') return false;
      status = status * 10 + static_cast<kj::uint>(c - '0');
    }
    headerStatus = status;
    return true;
  }
  headerBlock.add(wire::Header{kj::heapString(name), kj::heapString(value)});
  return true;
}

void Http2Stream::onHeadersEnd(bool endStream) {
  headerBytes = 0;
  if (!headReceived) {
    if (headerStatus >= 100 && headerStatus < 200) {
      headerBlock.clear();                           // informational: wait for the final head
    } else {
      headReceived = true;
      Http2Head response{headerStatus, headerBlock.releaseAsArray()};   // status 0: a request
      KJ_IF_MAYBE(w, headWaiter) {
        (*w)->fulfill(kj::mv(response));
        headWaiter = nullptr;
      } else {
        head = kj::mv(response);
      }
    }
    headerStatus = 0;
  }
  if (endStream) onEndStream();
}

void Http2Stream::onData(kj::ArrayPtr<const kj::byte> data) {
  body.addAll(data);
  wakeReader();
}

void Http2Stream::onEndStream() {
  remoteEnded = true;
  wakeReader();
}

void Http2Stream::onClosed(uint32_t errorCode) {
  closed = true;
  if (errorCode != NGHTTP2_NO_ERROR) {
    fail(KJ_EXCEPTION(DISCONNECTED, "the HTTP/2 stream was reset", streamId,
                      nghttp2_http2_strerror(errorCode)));
  } else if (!remoteEnded) {
    fail(KJ_EXCEPTION(DISCONNECTED, "the HTTP/2 stream closed before the response ended",
                      streamId));
  } else {
    // Complete response; a request side still open can take no more writes.
    fail(KJ_EXCEPTION(DISCONNECTED, "the HTTP/2 stream is closed", streamId));
  }
}

int64_t Http2Stream::produce(kj::byte* buffer, size_t length, uint32_t* flags) {
  size_t n = kj::min(length, pending.size());
  if (n > 0) {
    memcpy(buffer, pending.begin(), n);
    pending = pending.slice(n, pending.size());
  }
  if (pending.size() == 0) {
    KJ_IF_MAYBE(w, writeWaiter) {
      (*w)->fulfill();
      writeWaiter = nullptr;
    }
    if (endRequested) {
      *flags |= NGHTTP2_DATA_FLAG_EOF;
      endSent = true;
      return static_cast<int64_t>(n);
    }
  }
  if (n == 0) return -1;
  return static_cast<int64_t>(n);
}

void Http2Stream::detach(const kj::Exception& reason) {
  session = nullptr;
  fail(kj::cp(reason));
}

// =============================================================================================
// Http2Session

Http2Session::NgSession::~NgSession() noexcept(false) {
  if (ptr != nullptr) nghttp2_session_del(ptr);
}

void Http2Session::ErrorHandler::taskFailed(kj::Exception&& exception) {
  session.finish(exception.getDescription());
}

Http2Session::Http2Session(kj::Timer& timer, kj::Own<kj::AsyncIoStream> transportParam,
                           Http2SessionObserver& observer, Http2SessionOptions options)
    : timer(timer), transport(kj::mv(transportParam)), observer(observer), options(options),
      readBuffer(kj::heapArray<kj::byte>(READ_BUFFER_SIZE)), errorHandler(*this),
      tasks(errorHandler) {
  nghttp2_session_callbacks* callbacks;
  KJ_ASSERT(nghttp2_session_callbacks_new(&callbacks) == 0);
  KJ_DEFER(nghttp2_session_callbacks_del(callbacks));
  nghttp2_session_callbacks_set_on_header_callback(callbacks, &Callbacks::onHeader);
  nghttp2_session_callbacks_set_on_begin_headers_callback(callbacks, &Callbacks::onBeginHeaders);
  nghttp2_session_callbacks_set_on_frame_recv_callback(callbacks, &Callbacks::onFrameRecv);
  nghttp2_session_callbacks_set_on_data_chunk_recv_callback(callbacks, &Callbacks::onDataChunk);
  nghttp2_session_callbacks_set_on_stream_close_callback(callbacks, &Callbacks::onStreamClose);
  nghttp2_session_callbacks_set_on_frame_send_callback(callbacks, &Callbacks::onFrameSend);

  nghttp2_option* option;
  KJ_ASSERT(nghttp2_option_new(&option) == 0);
  KJ_DEFER(nghttp2_option_del(option));
  nghttp2_option_set_no_auto_window_update(option, 1);

  bool client = options.role == Http2Role::CLIENT;
  int rc = client ? nghttp2_session_client_new2(&ng.ptr, callbacks, this, option)
                  : nghttp2_session_server_new2(&ng.ptr, callbacks, this, option);
  KJ_ASSERT(rc == 0, nghttp2_strerror(rc));
  // A client refuses server push; a server may not send ENABLE_PUSH.
  nghttp2_settings_entry settings[] = {
    {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, options.initialStreamWindow},
    {NGHTTP2_SETTINGS_ENABLE_PUSH, 0},
  };
  rc = nghttp2_submit_settings(ng.ptr, NGHTTP2_FLAG_NONE, settings, client ? 2 : 1);
  KJ_ASSERT(rc == 0, nghttp2_strerror(rc));
  rc = nghttp2_session_set_local_window_size(ng.ptr, NGHTTP2_FLAG_NONE, 0,
                                             static_cast<int32_t>(options.connectionWindow));
  KJ_ASSERT(rc == 0, nghttp2_strerror(rc));
}

Http2Session::~Http2Session() noexcept(false) {
  detachAll("the session was destroyed");
}

kj::Promise<void> Http2Session::run() {
  KJ_REQUIRE(doneFulfiller == nullptr, "Http2Session::run() called twice");
  auto paf = kj::newPromiseAndFulfiller<void>();
  doneFulfiller = kj::mv(paf.fulfiller);
  tasks.add(readLoop());
  flush();                                      // preface + SETTINGS
  return kj::mv(paf.promise);
}

kj::Own<Http2Stream> Http2Session::newStream() {
  KJ_REQUIRE(options.role == Http2Role::CLIENT, "only an HTTP/2 client opens streams");
  if (finished) kj::throwFatalException(sessionEnded(reason));
  auto key = nextKey++;
  auto stream = kj::heap<Http2Stream>(*this, key, withholdNew);
  streams.insert(key, stream.get());
  return stream;
}

kj::Promise<kj::Own<Http2Stream>> Http2Session::acceptStream() {
  KJ_REQUIRE(options.role == Http2Role::SERVER, "only an HTTP/2 server accepts streams");
  if (accepted.size() > 0) {
    auto stream = kj::mv(accepted.front());
    for (size_t i = 1; i < accepted.size(); i++) accepted[i - 1] = kj::mv(accepted[i]);
    accepted.removeLast();
    return kj::mv(stream);
  }
  if (finished) return sessionEnded(reason);
  auto paf = kj::newPromiseAndFulfiller<kj::Own<Http2Stream>>();
  acceptWaiter = kj::mv(paf.fulfiller);
  return kj::mv(paf.promise);
}

void Http2Session::onPeerStream(int32_t id) {
  auto key = nextKey++;
  auto stream = kj::heap<Http2Stream>(*this, key, withholdNew);
  stream->streamId = id;
  streams.insert(key, stream.get());
  nghttp2_session_set_stream_user_data(ng.ptr, id, stream.get());
  counters.streamsOpened++;
  KJ_IF_MAYBE(w, acceptWaiter) {
    if ((*w)->isWaiting()) {
      (*w)->fulfill(kj::mv(stream));
      acceptWaiter = nullptr;
      return;
    }
    acceptWaiter = nullptr;
  }
  accepted.add(kj::mv(stream));
}

void Http2Session::close(uint32_t errorCode, kj::StringPtr why) {
  if (finished || closing) return;
  closing = true;
  goingAway = true;
  nghttp2_submit_goaway(ng.ptr, NGHTTP2_FLAG_NONE, 0, errorCode,
                        reinterpret_cast<const uint8_t*>(why.begin()), why.size());
  detachAll(kj::str("closed by the emulator: ", why));
  flush();
}

void Http2Session::goSilent() {
  silent = true;
  counters.silent = true;
}

kj::Maybe<Http2Stream&> Http2Session::findStream(int32_t id) {
  for (auto& entry: streams) {
    if (entry.value->streamId == id) return *entry.value;
  }
  return nullptr;
}

Http2Stats Http2Session::stats() const {
  Http2Stats result = counters;
  result.openStreams = streams.size();
  for (auto& entry: streams) {
    result.recvBufferedBytes += entry.value->body.size() - entry.value->bodyStart;
    result.sendBufferedBytes += entry.value->pending.size();
  }
  if (writing) result.sendBufferedBytes += outBuffer.size();
  return result;
}

kj::Promise<void> Http2Session::readLoop() {
  return transport->tryRead(readBuffer.begin(), 1, readBuffer.size())
      .then([this](size_t n) -> kj::Promise<void> {
    if (n == 0) {
      finish(closing ? "closed by the emulator" : "the client closed the connection");
      return kj::READY_NOW;
    }
    counters.bytesReceived += n;
    // Silent, or closing after our GOAWAY: what arrives is discarded.
    if (!silent && !closing && !finished) receive(readBuffer.slice(0, n));
    if (finished) return kj::READY_NOW;
    return readLoop();
  });
}

void Http2Session::receive(kj::ArrayPtr<const kj::byte> bytes) {
  auto rv = nghttp2_session_mem_recv(ng.ptr, bytes.begin(), bytes.size());
  rethrowPending();
  if (rv < 0) {
    kj::throwFatalException(KJ_EXCEPTION(DISCONNECTED, "HTTP/2 session error",
                                         nghttp2_strerror(static_cast<int>(rv))));
  }
  flush();
}

void Http2Session::rethrowPending() {
  KJ_IF_MAYBE(e, pendingError) {
    auto exception = kj::mv(*e);
    pendingError = nullptr;
    kj::throwFatalException(kj::mv(exception));
  }
}

void Http2Session::flush() {
  if (writing || finished || silent) return;
  writing = true;
  // evalLater: what one turn submits (a request, its body, window updates) goes out in one write.
  tasks.add(kj::evalLater([this]() { return writeLoop(); }));
}

kj::Promise<void> Http2Session::writeLoop() {
  if (finished || silent) {
    writing = false;
    return kj::READY_NOW;
  }
  outBuffer.clear();
  while (outBuffer.size() < WRITE_BATCH) {
    const uint8_t* data = nullptr;
    auto n = nghttp2_session_mem_send(ng.ptr, &data);
    rethrowPending();
    if (n < 0) {
      kj::throwFatalException(KJ_EXCEPTION(FAILED, "nghttp2_session_mem_send",
                                           nghttp2_strerror(static_cast<int>(n))));
    }
    if (n == 0) break;
    outBuffer.addAll(kj::arrayPtr(data, static_cast<size_t>(n)));
    // nghttp2 reports a frame sent within the call that returned it: after our GOAWAY nothing
    // more goes out.
    if (closing && goAwaySent) break;
  }
  if (outBuffer.size() == 0) {
    writing = false;
    afterWrites();
    return kj::READY_NOW;
  }
  counters.bytesSent += outBuffer.size();
  return transport->write(outBuffer.begin(), outBuffer.size()).then([this]() {
    return writeLoop();
  });
}

void Http2Session::afterWrites() {
  if (finished) return;
  if (closing) {
    if (!shutdownSent) {
      shutdownSent = true;
      transport->shutdownWrite();
      tasks.add(timer.afterDelay(options.closeGrace).then([this]() {
        finish("closed by the emulator");
      }));
    }
    return;
  }
  if (!nghttp2_session_want_read(ng.ptr) && !nghttp2_session_want_write(ng.ptr)) {
    finish("the HTTP/2 session ended");
  }
}

void Http2Session::finish(kj::StringPtr why) {
  if (finished) return;
  finished = true;
  goingAway = true;
  reason = kj::str(why);
  detachAll(why);
  KJ_IF_MAYBE(w, acceptWaiter) {
    (*w)->reject(sessionEnded(why));
    acceptWaiter = nullptr;
  }
  KJ_IF_MAYBE(f, doneFulfiller) (*f)->fulfill();
}

void Http2Session::detachAll(kj::StringPtr why) {
  auto e = sessionEnded(why);
  for (auto& entry: streams) {
    auto& stream = *entry.value;
    if (stream.streamId > 0 && !stream.closed) {
      nghttp2_session_set_stream_user_data(ng.ptr, stream.streamId, nullptr);
    }
    stream.detach(e);
  }
  streams.clear();
  accepted.clear();                           // detached: their destructors leave us alone
}

void Http2Session::submit(Http2Stream& stream, kj::ArrayPtr<const wire::Header> headers,
                          bool endStream) {
  if (finished || (goingAway && options.role == Http2Role::CLIENT)) {
    auto e = KJ_EXCEPTION(DISCONNECTED,
        "the HTTP/2 connection to the client takes no new requests", reason);
    stream.fail(kj::cp(e));                   // its receiveHead() rejects too
    kj::throwFatalException(kj::mv(e));
  }
  kj::Vector<nghttp2_nv> nva(headers.size());
  for (auto& header: headers) {
    nva.add(nghttp2_nv{
      const_cast<uint8_t*>(reinterpret_cast<const uint8_t*>(header.name.begin())),
      const_cast<uint8_t*>(reinterpret_cast<const uint8_t*>(header.value.begin())),
      header.name.size(), header.value.size(), NGHTTP2_NV_FLAG_NONE});   // copied by nghttp2
  }
  nghttp2_data_provider provider;
  provider.source.ptr = nullptr;
  provider.read_callback = &Callbacks::readBody;
  int32_t id;
  if (options.role == Http2Role::CLIENT) {
    id = nghttp2_submit_request(ng.ptr, nullptr, nva.begin(), nva.size(),
                                endStream ? nullptr : &provider, &stream);
  } else {
    id = nghttp2_submit_response(ng.ptr, stream.streamId, nva.begin(), nva.size(),
                                 endStream ? nullptr : &provider);
    if (id == 0) id = stream.streamId;
  }
  if (id < 0) {
    // Out of stream ids: the connection has served 2^30 requests.
    auto e = id == NGHTTP2_ERR_STREAM_ID_NOT_AVAILABLE
        ? KJ_EXCEPTION(OVERLOADED, "cannot send an HTTP/2 request", nghttp2_strerror(id))
        : KJ_EXCEPTION(DISCONNECTED, "cannot send an HTTP/2 request", nghttp2_strerror(id));
    stream.fail(kj::cp(e));                   // its receiveHead() rejects too
    kj::throwFatalException(kj::mv(e));
  }
  stream.streamId = id;
  stream.submitted = true;
  stream.hasBody = !endStream;
  stream.endSent = endStream;
  counters.streamsOpened++;
  flush();
}

void Http2Session::resume(Http2Stream& stream) {
  if (finished) return;
  if (stream.streamId > 0 && !stream.closed) nghttp2_session_resume_data(ng.ptr, stream.streamId);
  flush();
}

void Http2Session::forget(Http2Stream& stream) {
  if (!finished) {
    if (stream.streamId > 0 && !stream.closed) {
      nghttp2_session_set_stream_user_data(ng.ptr, stream.streamId, nullptr);
      bool oursDone = stream.submitted && (stream.endSent || stream.endRequested) &&
                      stream.pending.size() == 0;
      if (oursDone && stream.remoteEnded && stream.failure == nullptr) {
        // A complete exchange whose END_STREAM is not framed yet: let it go out.
        if (!stream.endSent) {
          orphanEnds.insert(stream.streamId);
          nghttp2_session_resume_data(ng.ptr, stream.streamId);
        }
      } else if (!stream.resetSent) {
        nghttp2_submit_rst_stream(ng.ptr, NGHTTP2_FLAG_NONE, stream.streamId, NGHTTP2_CANCEL);
      }
    }
    if (stream.withheldConnectionBytes > 0) {
      nghttp2_session_consume_connection(ng.ptr, stream.withheldConnectionBytes);
    }
    flush();
  }
  streams.erase(stream.key);
}

}  // namespace cfqt::emulator
