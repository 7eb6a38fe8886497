// HTTP/2 server session on libnghttp2, driven by the KJ event loop (see session.h).
//
// Structure: SessionImpl owns the nghttp2_session and two loops, a read loop (transport ->
// nghttp2_session_mem_recv) and a write loop (nghttp2_session_mem_send -> one transport write at
// a time), plus the PING and drain timers. StreamState holds one stream's buffers, shared by the
// session (while nghttp2 knows the stream) and the application's RequestImpl.
//
// nghttp2 callbacks never throw (SessionImpl::guard() stores the exception and returns
// NGHTTP2_ERR_CALLBACK_FAILURE; the loop rethrows it as the session's end) and never call
// mem_recv/mem_send. They only update state, fulfil promises (whose continuations run later) and
// use nghttp2's queueing calls (submit_*, consume*), which the library allows inside callbacks.

#include "http2/session.h"

#include "loop/spinner.h"

#include <nghttp2/nghttp2.h>

#include <kj/debug.h>
#include <kj/list.h>
#include <kj/map.h>
#include <kj/vector.h>

#include <string.h>

namespace cfqt::http2 {

// =======================================================================================
// Error kinds

namespace {

struct KindInfo {
  SessionErrorKind kind;
  kj::StringPtr name;
  kj::StringPtr prefix;        // every description of this kind starts with it
  kj::Exception::Type type;
};

constexpr KindInfo KIND_INFO[] = {
  {SessionErrorKind::PEER_CLOSED, "peer-closed"_kj, "http2 peer-closed: "_kj,
   kj::Exception::Type::DISCONNECTED},
  {SessionErrorKind::TRANSPORT_ERROR, "transport-error"_kj, "http2 transport-error: "_kj,
   kj::Exception::Type::DISCONNECTED},
  {SessionErrorKind::PROTOCOL_ERROR, "protocol-error"_kj, "http2 protocol-error: "_kj,
   kj::Exception::Type::FAILED},
  {SessionErrorKind::FLOODED, "flooded"_kj, "http2 flooded: "_kj, kj::Exception::Type::FAILED},
  {SessionErrorKind::PEER_GOAWAY, "peer-goaway"_kj, "http2 peer-goaway: "_kj,
   kj::Exception::Type::DISCONNECTED},
  {SessionErrorKind::PING_TIMEOUT, "ping-timeout"_kj, "http2 ping-timeout: "_kj,
   kj::Exception::Type::DISCONNECTED},
  {SessionErrorKind::SESSION_CLOSED, "session-closed"_kj, "http2 session-closed: "_kj,
   kj::Exception::Type::DISCONNECTED},
  {SessionErrorKind::INTERNAL_ERROR, "internal-error"_kj, "http2 internal-error: "_kj,
   kj::Exception::Type::FAILED},
};

const KindInfo& infoOf(SessionErrorKind kind) {
  for (auto& info: KIND_INFO) {
    if (info.kind == kind) return info;
  }
  KJ_UNREACHABLE;
}

kj::Exception sessionError(SessionErrorKind kind, kj::StringPtr details) {
  auto& info = infoOf(kind);
  return kj::Exception(info.type, __FILE__, __LINE__, kj::str(info.prefix, details));
}

kj::Exception transportError(const kj::Exception& e) {
  // Keeps the transport's own exception type (DISCONNECTED for a reset TCP connection).
  return kj::Exception(e.getType(), __FILE__, __LINE__,
                       kj::str(infoOf(SessionErrorKind::TRANSPORT_ERROR).prefix,
                               e.getDescription()));
}

kj::Exception streamError(kj::String description) {
  return kj::Exception(kj::Exception::Type::DISCONNECTED, __FILE__, __LINE__,
                       kj::mv(description));
}

kj::StringPtr h2ErrorName(uint32_t code) {
  return nghttp2_http2_strerror(code);
}

kj::StringPtr libError(int code) {
  return nghttp2_strerror(code);
}

constexpr size_t MAX_ERROR_TEXT = 200;   // of a peer's GOAWAY debug data or nghttp2's message

kj::String boundedText(const void* data, size_t size) {
  // Peer-supplied text for an error description: bounded, control bytes replaced.
  auto bytes = kj::arrayPtr(static_cast<const kj::byte*>(data), kj::min(size, MAX_ERROR_TEXT));
  auto text = kj::heapString(bytes.size());
  for (size_t i = 0; i < bytes.size(); i++) {
    text[i] = bytes[i] >= 0x20 && bytes[i] < 0x7f ? char(bytes[i]) : '?';
  }
  return text;
}

// =======================================================================================
// ByteQueue

class ByteQueue {
  // A FIFO of bytes kept in blocks; allocates nothing while empty. Blocks grow from 256 bytes
  // (small server-sent events stay small) to 16 KiB.
public:
  size_t size() const { return total; }
  bool empty() const { return total == 0; }

  void append(kj::ArrayPtr<const kj::byte> data) {
    while (data.size() > 0) {
      if (head == blocks.size() || blocks.back().end == blocks.back().data.size()) {
        size_t capacity = kj::min(MAX_BLOCK, kj::max(kj::max(data.size(), lastCapacity * 2),
                                                     MIN_BLOCK));
        compact();
        blocks.add(Block{kj::heapArray<kj::byte>(capacity), 0, 0});
        lastCapacity = capacity;
      }
      auto& block = blocks.back();
      size_t n = kj::min(data.size(), block.data.size() - block.end);
      memcpy(block.data.begin() + block.end, data.begin(), n);
      block.end += n;
      total += n;
      data = data.slice(n, data.size());
    }
  }

  size_t read(kj::ArrayPtr<kj::byte> out) {
    // Moves up to out.size() bytes into `out`; returns how many.
    size_t done = 0;
    while (done < out.size() && head < blocks.size()) {
      auto& block = blocks[head];
      size_t n = kj::min(out.size() - done, block.end - block.begin);
      memcpy(out.begin() + done, block.data.begin() + block.begin, n);
      block.begin += n;
      done += n;
      total -= n;
      if (block.begin == block.end) {
        block.data = nullptr;
        if (++head == blocks.size()) clear();
      }
    }
    return done;
  }

  void clear() {
    blocks.clear();
    head = 0;
    total = 0;
    lastCapacity = 0;
  }

private:
  static constexpr size_t MIN_BLOCK = 256;
  static constexpr size_t MAX_BLOCK = 16 * 1024;

  struct Block {
    kj::Array<kj::byte> data;
    size_t begin;     // first unread byte
    size_t end;       // bytes filled
  };

  void compact() {
    if (head >= 16 && head * 2 >= blocks.size()) {
      for (size_t i = head; i < blocks.size(); i++) blocks[i - head] = kj::mv(blocks[i]);
      blocks.resize(blocks.size() - head);
      head = 0;
    }
  }

  kj::Vector<Block> blocks;
  size_t head = 0;
  size_t total = 0;
  size_t lastCapacity = 0;
};

class SessionImpl;

// =======================================================================================
// StreamState

class StreamState final: public kj::Refcounted {
  // One request stream. Owned by SessionImpl::streams while nghttp2 knows the stream (so the
  // data provider's pointer stays valid), and by the RequestImpl once accepted.
public:
  StreamState(SessionImpl& session, int32_t id);
  ~StreamState() noexcept(false);
  KJ_DISALLOW_COPY(StreamState);

  SessionImpl* session;         // nullptr once the session object is gone
  int32_t id;
  kj::ListLink<StreamState> allLink;       // SessionImpl::allStreams (while `session` is set)
  kj::ListLink<StreamState> acceptLink;    // SessionImpl::acceptQueue
  kj::ListLink<StreamState> budgetLink;    // SessionImpl::budgetWaiters

  // ---- request head
  kj::Vector<wire::Header> headers;
  size_t headerBytes = 0;       // RFC 9113 §6.5.2 size of the list so far
  bool headersTooLarge = false; // over maxHeaderListSize: answered 431, never accepted
  bool trailers = false;        // the header block being received is a trailer section (ignored)
  bool handed = false;          // a RequestImpl was created
  bool closed = false;          // nghttp2 closed the stream, or the session ended

  // ---- receive side
  ByteQueue rx;
  uint64_t rxPrepaid = 0;       // of rx.size(): connection credit returned at receipt
  bool rxEof = false;           // END_STREAM received (the body is complete in `rx`)
  bool readShut = false;        // nobody will read: discard and credit arriving bytes
  kj::Maybe<kj::Exception> rxError;
  kj::Maybe<kj::Own<kj::PromiseFulfiller<void>>> readWaiter;

  // ---- send side
  ByteQueue tx;
  bool responded = false;       // response HEADERS submitted
  bool endRequested = false;    // END_STREAM wanted after `tx` (shutdownWrite or no body)
  bool eofSent = false;         // a frame with END_STREAM went out
  bool deferred = false;        // our data provider returned NGHTTP2_ERR_DEFERRED
  kj::Maybe<kj::Exception> txError;
  kj::Maybe<kj::Own<kj::PromiseFulfiller<void>>> writeWaiter;

  // ---- abort
  bool aborted = false;
  kj::Maybe<kj::ForkedPromise<void>> abortedPromise;
  kj::Maybe<kj::Own<kj::PromiseFulfiller<void>>> abortedFulfiller;

  void wakeReader() {
    KJ_IF_MAYBE(f, readWaiter) {
      (*f)->fulfill();
      readWaiter = nullptr;
    }
  }
  void wakeWriter() {
    KJ_IF_MAYBE(f, writeWaiter) {
      (*f)->fulfill();
      writeWaiter = nullptr;
    }
  }
  void signalAborted() {
    if (aborted) return;
    aborted = true;
    KJ_IF_MAYBE(f, abortedFulfiller) {
      (*f)->fulfill();
      abortedFulfiller = nullptr;
    }
  }
  kj::Promise<void> whenAborted() {
    if (aborted) return kj::READY_NOW;
    KJ_IF_MAYBE(forked, abortedPromise) return forked->addBranch();
    auto paf = kj::newPromiseAndFulfiller<void>();
    abortedFulfiller = kj::mv(paf.fulfiller);
    auto& forked = abortedPromise.emplace(paf.promise.fork());
    return forked.addBranch();
  }
};

// =======================================================================================
// SessionImpl

class SessionImpl final: public ServerSession, private kj::TaskSet::ErrorHandler {
public:
  SessionImpl(kj::AsyncIoStream& transport, kj::Timer& timer, SessionConfig config);
  ~SessionImpl() noexcept(false);
  KJ_DISALLOW_COPY(SessionImpl);

  // ServerSession
  kj::Promise<void> run() override;
  kj::Promise<kj::Own<ServerRequest>> acceptRequest() override;
  kj::Promise<void> goAway(kj::Duration grace) override;
  kj::Promise<void> whenPeerGoingAway() override { return peerGoingAway.addBranch(); }
  SessionStats stats() const override;

  // ---- nghttp2 callbacks (through the trampolines in installCallbacks())
  int onBeginHeaders(const nghttp2_frame& frame);
  int onHeader(const nghttp2_frame& frame, kj::ArrayPtr<const kj::byte> name,
               kj::ArrayPtr<const kj::byte> value);
  int onFrameRecv(const nghttp2_frame& frame);
  int onDataChunk(int32_t id, kj::ArrayPtr<const kj::byte> data);
  int onStreamClose(int32_t id, uint32_t errorCode);
  int onFrameSend(const nghttp2_frame& frame);
  int onFrameNotSend(const nghttp2_frame& frame, int libErrorCode);
  ssize_t readData(StreamState& state, kj::ArrayPtr<kj::byte> out, uint32_t& flags);
  ssize_t dataFrameLength(int32_t sessionWindow, int32_t streamWindow, uint32_t peerMaxFrame);
  void onInvalidFrame() { ++invalidFrames; }
  void onLibError(kj::ArrayPtr<const char> message) {
    lastLibError = boundedText(message.begin(), message.size());
  }

  template <typename T, typename Func>
  T guard(T failure, Func&& func) {
    // Runs a callback body; an exception is stored (the loop that called nghttp2 ends the
    // session with it) and nghttp2 gets `failure`.
    T result = 0;
    KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() { result = func(); })) {
      if (pendingError == nullptr) pendingError = kj::mv(*e);
      return failure;
    }
    return result;
  }

  // ---- for RequestImpl and StreamState
  bool isOpen() const { return !ended; }
  kj::Exception endException() const;
  void unlink(StreamState& state);
  void credit(StreamState& state, size_t n);
  void discardRx(StreamState& state);
  uint64_t sendSpace(const StreamState& state) const;
  void addSendBuffered(uint64_t n);
  void resume(StreamState& state);
  void waitForBudget(StreamState& state);
  void respond(StreamState& state, kj::uint status, kj::ArrayPtr<const wire::Header> headers,
               bool endStream);
  void resetStream(StreamState& state, uint32_t code, kj::Exception error);
  void shutdownRead(StreamState& state);
  void release(StreamState& state);
  void scheduleWrite();

  const SessionConfig config;

private:
  kj::AsyncIoStream& transport;
  kj::Timer& timer;
  nghttp2_session* session = nullptr;

  kj::HashMap<int32_t, kj::Own<StreamState>> streams;   // streams nghttp2 knows
  kj::List<StreamState, &StreamState::allLink> allStreams;       // every live StreamState
  kj::List<StreamState, &StreamState::acceptLink> acceptQueue;   // heads complete, not accepted
  kj::List<StreamState, &StreamState::budgetLink> budgetWaiters; // writers over the budget
  kj::Maybe<kj::Own<kj::PromiseFulfiller<kj::Own<ServerRequest>>>> acceptWaiter;

  uint64_t recvBuffered = 0;      // sum of the streams' rx
  uint64_t sendBuffered = 0;      // sum of the streams' tx
  bool sendOverBudget = false;

  kj::Array<kj::byte> readBuffer;
  kj::Array<kj::byte> writeBuffer;
  kj::ArrayPtr<const kj::byte> writePieces[2];
  bool started = false;
  bool writing = false;           // the write loop runs (one transport write at a time)

  kj::Maybe<kj::Exception> pendingError;   // thrown inside a callback
  kj::String lastLibError;                 // nghttp2's last error message (for descriptions)
  uint32_t localGoAwayError = 0;           // we sent GOAWAY with this error code (0 = none)
  kj::String peerGoAwayText;

  bool ended = false;
  bool destroying = false;
  kj::Maybe<kj::Exception> endError;       // null: ended cleanly
  kj::Own<kj::PromiseFulfiller<void>> endFulfiller;
  kj::ForkedPromise<void> endForked = nullptr;
  kj::Own<kj::PromiseFulfiller<void>> peerGoingAwayFulfiller;   // the peer's first GOAWAY
  kj::ForkedPromise<void> peerGoingAway = nullptr;

  // PING
  uint64_t pingSeq = 0;
  uint64_t pingOutstanding = 0;            // sequence number awaiting its ACK (0 = none)
  kj::TimePoint pingSentAt = kj::origin<kj::TimePoint>();
  kj::Maybe<kj::Own<kj::PromiseFulfiller<void>>> pingAck;

  // graceful shutdown
  bool goingAway = false;
  bool closeTimerArmed = false;
  bool graceExpired = false;
  kj::Maybe<kj::Own<kj::PromiseFulfiller<void>>> goAwayPingAck;

  // stats
  uint64_t bytesReceived = 0;
  uint64_t bytesSent = 0;
  uint64_t requestsAccepted = 0;
  uint64_t requestsRejected = 0;
  uint64_t streamsAborted = 0;
  uint64_t invalidFrames = 0;
  uint64_t resetsReceived = 0;
  uint64_t pingsSent = 0;
  uint64_t pingAcks = 0;
  kj::Duration rtt = 0 * kj::NANOSECONDS;
  kj::Duration minRtt = 0 * kj::NANOSECONDS;
  bool goAwaySent = false;
  bool goAwayReceived = false;
  uint32_t peerGoAwayCode = 0;

  void installSession();
  void clearStreams() {
    // (KJ 0.9.2's HashMap::clear() memsets a null bucket array when the map never held anything:
    // UBSan reports it.)
    if (streams.size() > 0) streams.clear();
  }
  kj::Promise<void> readLoop();
  kj::Promise<void> onRead(size_t n);
  void onEof();
  void armCloseTimer();
  void closeTimedOut();
  void feed(kj::ArrayPtr<const kj::byte> data);
  kj::Promise<void> writeLoop();
  void checkDone();
  kj::Maybe<kj::Exception> outcome();
  void fail(kj::Exception e);
  void finish(kj::Maybe<kj::Exception> error);
  void abortStream(StreamState& state, const kj::Exception& e);
  void removeSendBuffered(uint64_t n);
  void deliverAccepts();
  kj::Maybe<kj::Own<ServerRequest>> nextAccepted();
  void rejectHead(StreamState& state);
  void submitPing(uint64_t seq);
  kj::Promise<void> pingLoop();
  kj::Promise<void> sendPing();
  void onPingAck(uint64_t seq);
  kj::Promise<void> drain(kj::TimePoint deadline);
  kj::Promise<void> finalGoAway(kj::TimePoint deadline);
  kj::Promise<void> expireGrace();
  void taskFailed(kj::Exception&& exception) override;

  kj::Canceler canceler;   // the loops and timers; cancelled once the session ended
  kj::TaskSet tasks;
};

constexpr uint64_t RAPID_RESET_BURST = 1000;   // nghttp2's default stream reset burst
constexpr uint64_t GOAWAY_PING = 0x676f617761790000ull;   // "goaway\0\0": the drain's PING

StreamState::StreamState(SessionImpl& sessionParam, int32_t id): session(&sessionParam), id(id) {}

StreamState::~StreamState() noexcept(false) {
  if (session != nullptr) session->unlink(*this);
}

// =======================================================================================
// RequestImpl: the application's handle

class RequestImpl final: public ServerRequest, public kj::AsyncIoStream {
public:
  explicit RequestImpl(kj::Own<StreamState> stateParam): state(kj::mv(stateParam)) {
    state->handed = true;
  }
  ~RequestImpl() noexcept(false);
  KJ_DISALLOW_COPY(RequestImpl);

  // ServerRequest
  int32_t streamId() const override { return state->id; }
  kj::ArrayPtr<const wire::Header> headers() const override { return state->headers; }
  kj::Maybe<kj::StringPtr> header(kj::StringPtr name) const override;
  kj::AsyncIoStream& body() override { return *this; }
  void respond(kj::uint status, kj::ArrayPtr<const wire::Header> headers,
               bool endStream) override;
  void reset(uint32_t errorCode) override;
  kj::Promise<void> whenAborted() override { return state->whenAborted(); }
  uint64_t bufferedReadBytes() const override { return state->rx.size(); }
  uint64_t bufferedWriteBytes() const override { return state->tx.size(); }

  // kj::AsyncIoStream
  kj::Promise<size_t> tryRead(void* buffer, size_t minBytes, size_t maxBytes) override;
  kj::Promise<void> write(const void* buffer, size_t size) override;
  kj::Promise<void> write(kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces) override;
  kj::Promise<void> whenWriteDisconnected() override { return state->whenAborted(); }
  void shutdownWrite() override;
  void abortRead() override;
  kj::Promise<uint64_t> pumpTo(kj::AsyncOutputStream& output, uint64_t amount) override;
  kj::Maybe<kj::Promise<uint64_t>> tryPumpFrom(kj::AsyncInputStream& input,
                                               uint64_t amount) override;

private:
  kj::Own<StreamState> state;

  SessionImpl& session();
  kj::Promise<size_t> readStep(kj::byte* out, size_t minBytes, size_t maxBytes, size_t filled);
  kj::Promise<void> writeStep(kj::ArrayPtr<const kj::byte> data);
  kj::Promise<void> writePiecesFrom(kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces,
                                    size_t index);
  kj::Promise<uint64_t> pumpToLoop(kj::AsyncOutputStream& output, uint64_t amount,
                                   uint64_t done, kj::Array<kj::byte> buffer);
  kj::Promise<uint64_t> pumpToWrite(kj::AsyncOutputStream& output, uint64_t amount,
                                    uint64_t done, kj::Array<kj::byte> buffer, size_t n);
  kj::Promise<uint64_t> pumpFromLoop(kj::AsyncInputStream& input, uint64_t amount,
                                     uint64_t done, kj::Array<kj::byte> buffer);
  kj::Promise<uint64_t> pumpFromWrite(kj::AsyncInputStream& input, uint64_t amount,
                                      uint64_t done, kj::Array<kj::byte> buffer, size_t n);
};

constexpr size_t PUMP_BUFFER = 64 * 1024;

// =======================================================================================
// nghttp2 callback trampolines

SessionImpl& self(void* userData) { return *static_cast<SessionImpl*>(userData); }

kj::ArrayPtr<const kj::byte> bytes(const uint8_t* data, size_t size) {
  return kj::arrayPtr(reinterpret_cast<const kj::byte*>(data), size);
}

int beginHeadersCb(nghttp2_session*, const nghttp2_frame* frame, void* user) {
  auto& s = self(user);
  return s.guard<int>(NGHTTP2_ERR_CALLBACK_FAILURE, [&]() { return s.onBeginHeaders(*frame); });
}

int headerCb(nghttp2_session*, const nghttp2_frame* frame, const uint8_t* name, size_t nameLen,
             const uint8_t* value, size_t valueLen, uint8_t flags, void* user) {
  auto& s = self(user);
  return s.guard<int>(NGHTTP2_ERR_CALLBACK_FAILURE, [&]() {
    return s.onHeader(*frame, bytes(name, nameLen), bytes(value, valueLen));
  });
}

int frameRecvCb(nghttp2_session*, const nghttp2_frame* frame, void* user) {
  auto& s = self(user);
  return s.guard<int>(NGHTTP2_ERR_CALLBACK_FAILURE, [&]() { return s.onFrameRecv(*frame); });
}

int dataChunkCb(nghttp2_session*, uint8_t flags, int32_t id, const uint8_t* data, size_t len,
                void* user) {
  auto& s = self(user);
  return s.guard<int>(NGHTTP2_ERR_CALLBACK_FAILURE, [&]() {
    return s.onDataChunk(id, bytes(data, len));
  });
}

int streamCloseCb(nghttp2_session*, int32_t id, uint32_t errorCode, void* user) {
  auto& s = self(user);
  return s.guard<int>(NGHTTP2_ERR_CALLBACK_FAILURE, [&]() {
    return s.onStreamClose(id, errorCode);
  });
}

int frameSendCb(nghttp2_session*, const nghttp2_frame* frame, void* user) {
  auto& s = self(user);
  return s.guard<int>(NGHTTP2_ERR_CALLBACK_FAILURE, [&]() { return s.onFrameSend(*frame); });
}

int frameNotSendCb(nghttp2_session*, const nghttp2_frame* frame, int libErrorCode, void* user) {
  auto& s = self(user);
  return s.guard<int>(NGHTTP2_ERR_CALLBACK_FAILURE, [&]() {
    return s.onFrameNotSend(*frame, libErrorCode);
  });
}

int invalidFrameCb(nghttp2_session*, const nghttp2_frame*, int, void* user) {
  self(user).onInvalidFrame();
  return 0;
}

int errorCb(nghttp2_session*, int, const char* message, size_t len, void* user) {
  auto& s = self(user);
  return s.guard<int>(NGHTTP2_ERR_CALLBACK_FAILURE, [&]() {
    s.onLibError(kj::arrayPtr(message, len));
    return 0;
  });
}

ssize_t dataLengthCb(nghttp2_session*, uint8_t frameType, int32_t, int32_t sessionWindow,
                     int32_t streamWindow, uint32_t peerMaxFrame, void* user) {
  auto& s = self(user);
  return s.guard<ssize_t>(NGHTTP2_ERR_CALLBACK_FAILURE, [&]() {
    return s.dataFrameLength(sessionWindow, streamWindow, peerMaxFrame);
  });
}

ssize_t readDataCb(nghttp2_session*, int32_t, uint8_t* buf, size_t length, uint32_t* flags,
                   nghttp2_data_source* source, void* user) {
  auto& s = self(user);
  auto& state = *static_cast<StreamState*>(source->ptr);
  return s.guard<ssize_t>(NGHTTP2_ERR_CALLBACK_FAILURE, [&]() {
    return s.readData(state, kj::arrayPtr(reinterpret_cast<kj::byte*>(buf), length), *flags);
  });
}

bool isConnectionSpecific(kj::StringPtr lowerCaseName) {
  // RFC 9113 §8.2.2: HTTP/2 forbids these; the peer would treat the response as malformed. Go's
  // http2 server drops them too (its header.go serializes the origin's into
  // cf-cloudflared-response-headers instead).
  return lowerCaseName == "connection" || lowerCaseName == "keep-alive" ||
         lowerCaseName == "proxy-connection" || lowerCaseName == "transfer-encoding" ||
         lowerCaseName == "upgrade";
}

uint32_t clampWindow(uint64_t n) {
  return uint32_t(kj::min(n, uint64_t(NGHTTP2_MAX_WINDOW_SIZE)));
}

uint32_t clampFrame(uint32_t n) {
  // RFC 9113 §6.5.2: SETTINGS_MAX_FRAME_SIZE is within [2^14, 2^24 - 1].
  return kj::max(uint32_t(1) << 14, kj::min(n, (uint32_t(1) << 24) - 1));
}

// =======================================================================================
// SessionImpl: setup and teardown

SessionImpl::SessionImpl(kj::AsyncIoStream& transport, kj::Timer& timer,
                         SessionConfig configParam)
    : config(kj::mv(configParam)), transport(transport), timer(timer),
      readBuffer(kj::heapArray<kj::byte>(kj::max(config.readBufferSize, size_t(1024)))),
      writeBuffer(kj::heapArray<kj::byte>(kj::max(config.writeBufferSize, size_t(1024)))),
      tasks(*this) {
  auto paf = kj::newPromiseAndFulfiller<void>();
  endFulfiller = kj::mv(paf.fulfiller);
  endForked = paf.promise.fork();
  auto goingAway = kj::newPromiseAndFulfiller<void>();
  peerGoingAwayFulfiller = kj::mv(goingAway.fulfiller);
  peerGoingAway = goingAway.promise.fork();
  installSession();
}

void SessionImpl::installSession() {
  nghttp2_session_callbacks* callbacks;
  KJ_ASSERT(nghttp2_session_callbacks_new(&callbacks) == 0, "out of memory");
  KJ_DEFER(nghttp2_session_callbacks_del(callbacks));
  nghttp2_session_callbacks_set_on_begin_headers_callback(callbacks, beginHeadersCb);
  nghttp2_session_callbacks_set_on_header_callback(callbacks, headerCb);
  nghttp2_session_callbacks_set_on_frame_recv_callback(callbacks, frameRecvCb);
  nghttp2_session_callbacks_set_on_data_chunk_recv_callback(callbacks, dataChunkCb);
  nghttp2_session_callbacks_set_on_stream_close_callback(callbacks, streamCloseCb);
  nghttp2_session_callbacks_set_on_frame_send_callback(callbacks, frameSendCb);
  nghttp2_session_callbacks_set_on_frame_not_send_callback(callbacks, frameNotSendCb);
  nghttp2_session_callbacks_set_on_invalid_frame_recv_callback(callbacks, invalidFrameCb);
  nghttp2_session_callbacks_set_error_callback2(callbacks, errorCb);
  nghttp2_session_callbacks_set_data_source_read_length_callback(callbacks, dataLengthCb);

  nghttp2_option* option;
  KJ_ASSERT(nghttp2_option_new(&option) == 0, "out of memory");
  KJ_DEFER(nghttp2_option_del(option));
  nghttp2_option_set_no_auto_window_update(option, 1);   // credit only as bodies are read
  nghttp2_option_set_max_outbound_ack(option, kj::max(config.maxQueuedAcks, uint32_t(1)));
  nghttp2_option_set_no_closed_streams(option, 1);       // no priority-tree leftovers
  nghttp2_option_set_stream_reset_rate_limit(option, config.resetBurst, config.resetRate);

  int rv = nghttp2_session_server_new2(&session, callbacks, this, option);
  KJ_ASSERT(rv == 0, "nghttp2_session_server_new2", libError(rv));

  nghttp2_settings_entry settings[] = {
    {NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, config.maxConcurrentStreams},
    {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, clampWindow(config.initialStreamWindow)},
    {NGHTTP2_SETTINGS_MAX_FRAME_SIZE, clampFrame(config.maxFrameSize)},
    {NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, config.maxHeaderListSize},
    {NGHTTP2_SETTINGS_NO_RFC7540_PRIORITIES, 1},   // Go's server ignores priorities too
  };
  rv = nghttp2_submit_settings(session, NGHTTP2_FLAG_NONE, settings, kj::size(settings));
  KJ_ASSERT(rv == 0, "nghttp2_submit_settings", libError(rv));
  rv = nghttp2_session_set_local_window_size(session, NGHTTP2_FLAG_NONE, 0,
                                             int32_t(clampWindow(config.connectionWindow)));
  KJ_ASSERT(rv == 0, "nghttp2_session_set_local_window_size", libError(rv));
}

SessionImpl::~SessionImpl() noexcept(false) {
  destroying = true;
  if (!ended) finish(sessionError(SessionErrorKind::SESSION_CLOSED, "the session was destroyed"));
  // Handles may outlive us: detach every stream state.
  for (auto& state: allStreams) {
    allStreams.remove(state);
    if (state.acceptLink.isLinked()) acceptQueue.remove(state);
    if (state.budgetLink.isLinked()) budgetWaiters.remove(state);
    state.session = nullptr;
  }
  clearStreams();
  // Drop the loops (a transport write may point into nghttp2's buffer) before nghttp2 goes.
  canceler.cancel("the HTTP/2 session was destroyed");
  nghttp2_session_del(session);
}

void SessionImpl::unlink(StreamState& state) {
  if (state.allLink.isLinked()) allStreams.remove(state);
  if (state.acceptLink.isLinked()) acceptQueue.remove(state);
  if (state.budgetLink.isLinked()) budgetWaiters.remove(state);
}

kj::Exception SessionImpl::endException() const {
  KJ_IF_MAYBE(e, endError) return kj::cp(*e);
  return sessionError(SessionErrorKind::SESSION_CLOSED,
      graceExpired ? "the grace period of the graceful shutdown expired"
                   : "the HTTP/2 connection ended");
}

void SessionImpl::taskFailed(kj::Exception&& exception) {
  if (ended) return;   // cancellation of the loops
  fail(sessionError(SessionErrorKind::INTERNAL_ERROR, exception.getDescription()));
}

// =======================================================================================
// Read loop

kj::Promise<void> SessionImpl::run() {
  KJ_REQUIRE(!started, "run() called twice");
  started = true;
  if (ended) return endForked.addBranch();
  tasks.add(canceler.wrap(readLoop()));
  if (config.pingInterval > 0 * kj::SECONDS) tasks.add(canceler.wrap(pingLoop()));
  scheduleWrite();
  return endForked.addBranch();
}

kj::Promise<void> SessionImpl::readLoop() {
  if (ended) return kj::READY_NOW;
  return transport.tryRead(readBuffer.begin(), 1, readBuffer.size())
      .then([this](size_t n) { return onRead(n); },
            [this](kj::Exception&& e) { fail(transportError(e)); });
}

kj::Promise<void> SessionImpl::onRead(size_t n) {
  if (ended) return kj::READY_NOW;
  if (n == 0) {
    onEof();
    return kj::READY_NOW;
  }
  bytesReceived += n;
  loop::kick();   // a busy-polling loop (loop/spinner.h) polls for what follows
  feed(readBuffer.slice(0, n));
  return readLoop();
}

void SessionImpl::feed(kj::ArrayPtr<const kj::byte> data) {
  ssize_t rv = nghttp2_session_mem_recv(session, data.begin(), data.size());
  KJ_IF_MAYBE(e, pendingError) {
    auto error = kj::mv(*e);
    pendingError = nullptr;
    return fail(sessionError(SessionErrorKind::INTERNAL_ERROR, error.getDescription()));
  }
  if (rv == NGHTTP2_ERR_FLOODED) {
    return fail(sessionError(SessionErrorKind::FLOODED,
        "the peer sent more SETTINGS/PING frames than it read the answers of"));
  }
  if (rv == NGHTTP2_ERR_BAD_CLIENT_MAGIC) {
    return fail(sessionError(SessionErrorKind::PROTOCOL_ERROR,
        "the peer did not start with the HTTP/2 client preface"));
  }
  if (rv < 0) {
    return fail(sessionError(nghttp2_is_fatal(int(rv)) && rv != NGHTTP2_ERR_NOMEM
        ? SessionErrorKind::PROTOCOL_ERROR : SessionErrorKind::INTERNAL_ERROR,
        kj::str("nghttp2_session_mem_recv: ", libError(int(rv)))));
  }
  size_t queued = nghttp2_session_get_outbound_queue_size(session);
  if (queued > config.maxQueuedFrames) {
    return fail(sessionError(SessionErrorKind::FLOODED, kj::str(
        "the peer caused ", queued, " frames to be queued without reading them")));
  }
  scheduleWrite();
  checkDone();
  if (!ended && !nghttp2_session_want_read(session)) armCloseTimer();
}

void SessionImpl::armCloseTimer() {
  // GOAWAY was exchanged and no stream is left, but nghttp2 has something to write: a peer that
  // does not read it gets closeFlushTimeout. (A terminating GOAWAY after a connection error
  // leaves want_read() at 1 until it is sent, and nghttp2 has no getter for it: a peer that
  // never reads that GOAWAY is caught by the PING timeout, as any peer that stops reading.)
  if (closeTimerArmed) return;
  closeTimerArmed = true;
  tasks.add(canceler.wrap(timer.afterDelay(config.closeFlushTimeout)
      .then([this]() { closeTimedOut(); })));
}

void SessionImpl::closeTimedOut() {
  if (!ended) finish(outcome());
}

void SessionImpl::onEof() {
  if (ended) return;
  if (streams.size() == 0) return finish(outcome());
  finish(sessionError(SessionErrorKind::PEER_CLOSED, kj::str(
      "the peer closed the connection with ", streams.size(), " streams open")));
}

// =======================================================================================
// Write loop

void SessionImpl::scheduleWrite() {
  if (writing || ended || !started || destroying) return;
  writing = true;
  tasks.add(canceler.wrap(kj::evalLater([this]() { return writeLoop(); })));
}

kj::Promise<void> SessionImpl::writeLoop() {
  // Gathers frames up to writeBuffer's size; a frame that does not fit is written as a second
  // piece straight from nghttp2's buffer, valid until the next mem_send (after this write).
  if (ended) {
    writing = false;
    return kj::READY_NOW;
  }
  size_t used = 0;
  kj::ArrayPtr<const kj::byte> tail;
  for (;;) {
    const uint8_t* data;
    ssize_t n = nghttp2_session_mem_send(session, &data);
    KJ_IF_MAYBE(e, pendingError) {
      auto error = kj::mv(*e);
      pendingError = nullptr;
      fail(sessionError(SessionErrorKind::INTERNAL_ERROR, error.getDescription()));
      writing = false;
      return kj::READY_NOW;
    }
    if (n < 0) {
      fail(sessionError(SessionErrorKind::INTERNAL_ERROR,
          kj::str("nghttp2_session_mem_send: ", libError(int(n)))));
      writing = false;
      return kj::READY_NOW;
    }
    if (n == 0) break;
    if (used + n <= writeBuffer.size()) {
      memcpy(writeBuffer.begin() + used, data, n);
      used += n;
    } else {
      tail = bytes(data, n);
      break;
    }
  }
  if (used == 0 && tail.size() == 0) {
    writing = false;
    checkDone();
    return kj::READY_NOW;
  }
  bytesSent += used + tail.size();
  writePieces[0] = writeBuffer.slice(0, used);
  writePieces[1] = tail;
  auto pieces = kj::arrayPtr(writePieces, tail.size() > 0 ? 2 : 1);
  loop::kick();   // an answer often follows (loop/spinner.h)
  return transport.write(pieces).then([this]() { return writeLoop(); },
                                      [this](kj::Exception&& e) {
    writing = false;
    fail(transportError(e));
  });
}

void SessionImpl::checkDone() {
  // nghttp2 is done once it wants neither to read nor to write: GOAWAY exchanged and no stream
  // left, or a terminating GOAWAY sent.
  if (ended || writing || !started) return;
  if (nghttp2_session_want_read(session) || nghttp2_session_want_write(session)) return;
  finish(outcome());
}

kj::Maybe<kj::Exception> SessionImpl::outcome() {
  if (localGoAwayError == NGHTTP2_INTERNAL_ERROR && lastLibError.size() == 0 &&
      resetsReceived >= RAPID_RESET_BURST) {
    // What Debian's nghttp2 (CVE-2023-44487 fix) sends when the peer resets streams faster than
    // its token bucket allows: no error message, GOAWAY INTERNAL_ERROR.
    return sessionError(SessionErrorKind::FLOODED, kj::str(
        "the peer reset ", resetsReceived, " streams, faster than nghttp2 allows (rapid reset)"));
  }
  if (localGoAwayError != 0) {
    return sessionError(SessionErrorKind::PROTOCOL_ERROR, kj::str(
        "sent GOAWAY ", h2ErrorName(localGoAwayError),
        lastLibError.size() > 0 ? ": " : "", lastLibError));
  }
  if (peerGoAwayCode != 0) {
    return sessionError(SessionErrorKind::PEER_GOAWAY, kj::str(
        "the peer sent GOAWAY ", h2ErrorName(peerGoAwayCode),
        peerGoAwayText.size() > 0 ? ": " : "", peerGoAwayText));
  }
  return nullptr;
}

void SessionImpl::fail(kj::Exception e) {
  finish(kj::mv(e));
}

void SessionImpl::finish(kj::Maybe<kj::Exception> error) {
  if (ended) return;
  ended = true;
  endError = kj::mv(error);
  auto streamFailure = endException();
  while (!acceptQueue.empty()) acceptQueue.remove(acceptQueue.front());
  for (auto& entry: streams) {
    auto& state = *entry.value;
    state.closed = true;
    abortStream(state, streamFailure);
  }
  clearStreams();
  while (!budgetWaiters.empty()) {
    auto& state = budgetWaiters.front();
    budgetWaiters.remove(state);
    state.wakeWriter();
  }
  KJ_IF_MAYBE(f, acceptWaiter) {
    (*f)->reject(kj::cp(streamFailure));
    acceptWaiter = nullptr;
  }
  pingAck = nullptr;
  goAwayPingAck = nullptr;
  KJ_IF_MAYBE(e, endError) {
    endFulfiller->reject(kj::cp(*e));
  } else {
    endFulfiller->fulfill();
  }
  if (!destroying) {
    // Not from inside the loop that is running now: cancel in a later turn.
    tasks.add(kj::evalLater([this]() { canceler.cancel("the HTTP/2 session ended"); }));
  }
}

// =======================================================================================
// Streams: receive side

int SessionImpl::onBeginHeaders(const nghttp2_frame& frame) {
  if (frame.hd.type != NGHTTP2_HEADERS) return 0;
  int32_t id = frame.hd.stream_id;
  if (frame.headers.cat == NGHTTP2_HCAT_REQUEST) {
    if (streams.find(id) != nullptr) return 0;    // cannot happen: ids only grow
    auto state = kj::refcounted<StreamState>(*this, id);
    allStreams.add(*state);
    streams.insert(id, kj::mv(state));
  } else {
    KJ_IF_MAYBE(state, streams.find(id)) (*state)->trailers = true;
  }
  return 0;
}

int SessionImpl::onHeader(const nghttp2_frame& frame, kj::ArrayPtr<const kj::byte> name,
                          kj::ArrayPtr<const kj::byte> value) {
  if (frame.hd.type != NGHTTP2_HEADERS) return 0;
  KJ_IF_MAYBE(entry, streams.find(frame.hd.stream_id)) {
    auto& state = **entry;
    if (state.trailers || state.headersTooLarge) return 0;
    state.headerBytes += name.size() + value.size() + 32;
    if (state.headerBytes > config.maxHeaderListSize) {
      state.headersTooLarge = true;
      state.headers = kj::Vector<wire::Header>();
      return 0;
    }
    state.headers.add(wire::Header{kj::heapString(name.asChars()),
                                   kj::heapString(value.asChars())});
  }
  return 0;
}

int SessionImpl::onFrameRecv(const nghttp2_frame& frame) {
  switch (frame.hd.type) {
    case NGHTTP2_HEADERS:
    case NGHTTP2_DATA: {
      KJ_IF_MAYBE(entry, streams.find(frame.hd.stream_id)) {
        auto& state = **entry;
        if (frame.hd.flags & NGHTTP2_FLAG_END_STREAM) {
          state.rxEof = true;
          state.wakeReader();
        }
        if (frame.hd.type == NGHTTP2_HEADERS && frame.headers.cat == NGHTTP2_HCAT_REQUEST) {
          if (state.headersTooLarge) {
            rejectHead(state);
          } else {
            ++requestsAccepted;
            acceptQueue.add(state);
            deliverAccepts();
          }
        }
        state.trailers = false;
      }
      break;
    }
    case NGHTTP2_GOAWAY:
      goAwayReceived = true;
      peerGoAwayCode = frame.goaway.error_code;
      peerGoAwayText = boundedText(frame.goaway.opaque_data, frame.goaway.opaque_data_len);
      peerGoingAwayFulfiller->fulfill();   // no-op after the first
      break;
    case NGHTTP2_RST_STREAM:
      ++resetsReceived;
      break;
    case NGHTTP2_PING:
      if (frame.hd.flags & NGHTTP2_FLAG_ACK) {
        uint64_t seq = 0;
        for (auto b: frame.ping.opaque_data) seq = (seq << 8) | b;
        onPingAck(seq);
      }
      break;
    default:
      break;
  }
  return 0;
}

void SessionImpl::rejectHead(StreamState& state) {
  // Go's http2 server answers a too large request head with 431 and so do we; the body (if any)
  // is discarded, and the stream reset with NO_ERROR once the 431 is out.
  ++requestsRejected;
  state.readShut = true;
  state.responded = true;
  state.endRequested = true;
  nghttp2_nv status[] = {{
    const_cast<uint8_t*>(reinterpret_cast<const uint8_t*>(":status")),
    const_cast<uint8_t*>(reinterpret_cast<const uint8_t*>("431")), 7, 3, NGHTTP2_NV_FLAG_NONE}};
  int rv = nghttp2_submit_response(session, state.id, status, 1, nullptr);
  if (rv != 0) nghttp2_submit_rst_stream(session, NGHTTP2_FLAG_NONE, state.id, H2_INTERNAL_ERROR);
}

int SessionImpl::onDataChunk(int32_t id, kj::ArrayPtr<const kj::byte> data) {
  StreamState* found = nullptr;
  KJ_IF_MAYBE(entry, streams.find(id)) found = entry->get();
  if (found == nullptr || found->readShut || found->rxError != nullptr) {
    // Nobody will read it: give the credit back at once (stream and connection).
    int rv = nghttp2_session_consume(session, id, data.size());
    KJ_ASSERT(rv == 0, "nghttp2_session_consume", libError(rv));
    return 0;
  }
  auto& state = *found;
  state.rx.append(data);
  size_t before = recvBuffered;
  recvBuffered += data.size();
  // Connection credit at receipt for the part under the budget.
  size_t prepay = before >= config.recvCreditBudget ? 0
      : kj::min(data.size(), size_t(config.recvCreditBudget - before));
  if (prepay > 0) {
    int rv = nghttp2_session_consume_connection(session, prepay);
    KJ_ASSERT(rv == 0, "nghttp2_session_consume_connection", libError(rv));
    state.rxPrepaid += prepay;
  }
  state.wakeReader();
  return 0;
}

void SessionImpl::credit(StreamState& state, size_t n) {
  // `n` buffered bytes of `state` were read or discarded: stream credit for all of them (while
  // the stream is open), connection credit for those not prepaid at receipt.
  if (n == 0) return;
  size_t prepaid = kj::min(uint64_t(n), state.rxPrepaid);
  state.rxPrepaid -= prepaid;
  recvBuffered -= n;
  if (ended) return;
  if (n > prepaid) {
    int rv = nghttp2_session_consume_connection(session, n - prepaid);
    KJ_ASSERT(rv == 0, "nghttp2_session_consume_connection", libError(rv));
  }
  if (!state.closed) {
    int rv = nghttp2_session_consume_stream(session, state.id, n);
    KJ_ASSERT(rv == 0, "nghttp2_session_consume_stream", libError(rv));
  }
  if (nghttp2_session_want_write(session)) scheduleWrite();   // a WINDOW_UPDATE (at half window)
}

void SessionImpl::discardRx(StreamState& state) {
  size_t n = state.rx.size();
  state.rx.clear();
  credit(state, n);
}

void SessionImpl::shutdownRead(StreamState& state) {
  // Nobody reads the request body any more. Once our END_STREAM is out, the stream is reset with
  // NO_ERROR so that the peer stops sending (RFC 9113 §8.1); before, onFrameSend() does it.
  state.readShut = true;
  discardRx(state);
  if (ended || state.closed || state.rxEof) return;
  if (state.eofSent) {
    nghttp2_submit_rst_stream(session, NGHTTP2_FLAG_NONE, state.id, H2_NO_ERROR);
    scheduleWrite();
  }
}

int SessionImpl::onStreamClose(int32_t id, uint32_t errorCode) {
  KJ_IF_MAYBE(entry, streams.find(id)) {
    auto state = kj::mv(*entry);
    streams.erase(id);
    state->closed = true;
    if (state->acceptLink.isLinked()) acceptQueue.remove(*state);
    bool complete = errorCode == NGHTTP2_NO_ERROR && state->eofSent &&
                    (state->rxEof || state->readShut);
    if (!complete) {
      abortStream(*state, streamError(kj::str("HTTP/2 stream ", id, " was reset (",
                                              h2ErrorName(errorCode), ")")));
    }
    if (!state->handed) discardRx(*state);
    // Dropping `state` here may destroy it: its destructor only unlinks it from our lists.
  }
  return 0;
}

void SessionImpl::abortStream(StreamState& state, const kj::Exception& e) {
  if (!state.aborted) ++streamsAborted;
  if (!state.rxEof || state.readShut) {
    discardRx(state);
    if (state.rxError == nullptr) state.rxError = kj::cp(e);
    KJ_IF_MAYBE(f, state.readWaiter) {
      (*f)->reject(kj::cp(e));
      state.readWaiter = nullptr;
    }
  }
  if (state.txError == nullptr) state.txError = kj::cp(e);
  if (!state.tx.empty()) removeSendBuffered(state.tx.size());
  state.tx.clear();
  KJ_IF_MAYBE(f, state.writeWaiter) {
    (*f)->reject(kj::cp(e));
    state.writeWaiter = nullptr;
  }
  if (state.budgetLink.isLinked()) budgetWaiters.remove(state);
  state.signalAborted();
}

// =======================================================================================
// Streams: send side

uint64_t SessionImpl::sendSpace(const StreamState& state) const {
  // What the stream may add to its send buffer now (see SessionConfig).
  uint64_t limit = sendOverBudget ? kj::min(config.streamSendReserve, config.streamSendBuffer)
                                  : config.streamSendBuffer;
  return limit > state.tx.size() ? limit - state.tx.size() : 0;
}

void SessionImpl::addSendBuffered(uint64_t n) {
  sendBuffered += n;
  if (!sendOverBudget && sendBuffered >= kj::max(config.connectionSendHigh, uint64_t(1))) {
    sendOverBudget = true;
  }
}

void SessionImpl::removeSendBuffered(uint64_t n) {
  sendBuffered -= n;
  if (sendOverBudget && sendBuffered <= config.connectionSendLow) {
    sendOverBudget = false;
    while (!budgetWaiters.empty()) {    // in arrival order
      auto& state = budgetWaiters.front();
      budgetWaiters.remove(state);
      state.wakeWriter();
    }
  }
}

void SessionImpl::waitForBudget(StreamState& state) {
  if (sendOverBudget && !state.budgetLink.isLinked()) budgetWaiters.add(state);
}

void SessionImpl::resume(StreamState& state) {
  if (ended || state.closed) return;
  if (state.deferred) {
    state.deferred = false;
    nghttp2_session_resume_data(session, state.id);   // fails only if the stream is gone
  }
  scheduleWrite();
}

ssize_t SessionImpl::readData(StreamState& state, kj::ArrayPtr<kj::byte> out, uint32_t& flags) {
  if (state.txError != nullptr) {
    state.deferred = true;      // a reset is queued; nothing more to send
    return NGHTTP2_ERR_DEFERRED;
  }
  size_t n = state.tx.read(out);
  if (n > 0) {
    removeSendBuffered(n);
    state.wakeWriter();
  }
  if (state.tx.empty() && state.endRequested) {
    flags |= NGHTTP2_DATA_FLAG_EOF;
    return ssize_t(n);
  }
  if (n == 0) {
    state.deferred = true;
    return NGHTTP2_ERR_DEFERRED;
  }
  return ssize_t(n);
}

ssize_t SessionImpl::dataFrameLength(int32_t sessionWindow, int32_t streamWindow,
                                     uint32_t peerMaxFrame) {
  int64_t n = kj::min(int64_t(clampFrame(config.maxSendFrameSize)), int64_t(peerMaxFrame));
  n = kj::min(n, int64_t(sessionWindow));
  n = kj::min(n, int64_t(streamWindow));
  return ssize_t(kj::max(n, int64_t(1)));
}

void SessionImpl::respond(StreamState& state, kj::uint status,
                          kj::ArrayPtr<const wire::Header> headers, bool endStream) {
  KJ_REQUIRE(!state.responded, "respond() called twice");
  KJ_REQUIRE(status >= 200 && status <= 999, "final status expected", status);
  KJ_IF_MAYBE(e, state.txError) kj::throwFatalException(kj::cp(*e));
  if (ended) kj::throwFatalException(endException());

  auto statusText = kj::str(status);
  auto names = KJ_MAP(h, headers) {
    auto name = kj::heapString(h.name);
    for (auto& c: name) {
      if (c >= 'A' && c <= 'Z') c = c - 'A' + 'a';
    }
    return name;
  };
  auto nva = kj::heapArrayBuilder<nghttp2_nv>(headers.size() + 1);
  nva.add(nghttp2_nv{const_cast<uint8_t*>(reinterpret_cast<const uint8_t*>(":status")),
                     reinterpret_cast<uint8_t*>(statusText.begin()), 7, statusText.size(),
                     NGHTTP2_NV_FLAG_NONE});
  for (size_t i = 0; i < headers.size(); i++) {
    if (isConnectionSpecific(names[i])) continue;
    auto name = kj::arrayPtr(reinterpret_cast<uint8_t*>(names[i].begin()), names[i].size());
    auto value = kj::arrayPtr(const_cast<uint8_t*>(
        reinterpret_cast<const uint8_t*>(headers[i].value.begin())), headers[i].value.size());
    if (name.size() == 0 || name[0] == ':' || !nghttp2_check_header_name(name.begin(), name.size())
        || !nghttp2_check_header_value(value.begin(), value.size())) {
      kj::throwFatalException(KJ_EXCEPTION(FAILED, "invalid HTTP/2 response header",
                                           headers[i].name));
    }
    nva.add(nghttp2_nv{name.begin(), value.begin(), name.size(), value.size(),
                       NGHTTP2_NV_FLAG_NONE});
  }
  nghttp2_data_provider provider;
  provider.source.ptr = &state;
  provider.read_callback = readDataCb;
  int rv = nghttp2_submit_response(session, state.id, nva.begin(), nva.size(),
                                   endStream ? nullptr : &provider);   // copies the headers
  if (rv != 0) {
    kj::throwFatalException(KJ_EXCEPTION(FAILED, "nghttp2_submit_response", libError(rv)));
  }
  state.responded = true;
  if (endStream) state.endRequested = true;
  scheduleWrite();
}

void SessionImpl::resetStream(StreamState& state, uint32_t code, kj::Exception error) {
  if (!ended && !state.closed) {
    nghttp2_submit_rst_stream(session, NGHTTP2_FLAG_NONE, state.id, code);
    scheduleWrite();
  }
  state.readShut = true;
  abortStream(state, error);
}

void SessionImpl::release(StreamState& state) {
  // The application dropped its handle.
  if (state.budgetLink.isLinked()) budgetWaiters.remove(state);
  if (ended || state.closed) {
    state.readShut = true;
    discardRx(state);
    return;
  }
  if (state.txError == nullptr && (!state.responded || !state.endRequested)) {
    return resetStream(state, H2_INTERNAL_ERROR, streamError(kj::str(
        "HTTP/2 stream ", state.id, ": the request was dropped before its response ended")));
  }
  shutdownRead(state);
}

int SessionImpl::onFrameSend(const nghttp2_frame& frame) {
  switch (frame.hd.type) {
    case NGHTTP2_HEADERS:
    case NGHTTP2_DATA:
      if (frame.hd.flags & NGHTTP2_FLAG_END_STREAM) {
        KJ_IF_MAYBE(entry, streams.find(frame.hd.stream_id)) {
          auto& state = **entry;
          state.eofSent = true;
          if (state.readShut && !state.rxEof) {
            nghttp2_submit_rst_stream(session, NGHTTP2_FLAG_NONE, state.id, H2_NO_ERROR);
          }
        }
      }
      break;
    case NGHTTP2_GOAWAY:
      if (frame.goaway.error_code != NGHTTP2_NO_ERROR) localGoAwayError = frame.goaway.error_code;
      break;
    case NGHTTP2_PING:
      if (!(frame.hd.flags & NGHTTP2_FLAG_ACK)) ++pingsSent;
      break;
    default:
      break;
  }
  return 0;
}

int SessionImpl::onFrameNotSend(const nghttp2_frame& frame, int libErrorCode) {
  // A response HEADERS that nghttp2 could not send (e.g. a header block over 64 KiB): reset.
  if (frame.hd.type == NGHTTP2_HEADERS) {
    KJ_IF_MAYBE(entry, streams.find(frame.hd.stream_id)) {
      resetStream(**entry, H2_INTERNAL_ERROR, streamError(kj::str("HTTP/2 stream ",
          frame.hd.stream_id, ": the response headers could not be sent: ",
          libError(libErrorCode))));
    }
  }
  return 0;
}

// =======================================================================================
// Accepting

kj::Promise<kj::Own<ServerRequest>> SessionImpl::acceptRequest() {
  KJ_IF_MAYBE(request, nextAccepted()) return kj::mv(*request);
  if (ended) return endException();
  KJ_IF_MAYBE(f, acceptWaiter) {
    KJ_REQUIRE(!(*f)->isWaiting(), "one acceptRequest() at a time");
  }
  auto paf = kj::newPromiseAndFulfiller<kj::Own<ServerRequest>>();
  acceptWaiter = kj::mv(paf.fulfiller);
  return kj::mv(paf.promise);
}

kj::Maybe<kj::Own<ServerRequest>> SessionImpl::nextAccepted() {
  if (acceptQueue.empty()) return nullptr;
  auto& state = acceptQueue.front();
  acceptQueue.remove(state);
  return kj::Own<ServerRequest>(kj::heap<RequestImpl>(kj::addRef(state)));
}

void SessionImpl::deliverAccepts() {
  KJ_IF_MAYBE(f, acceptWaiter) {
    if (!(*f)->isWaiting()) {
      acceptWaiter = nullptr;
      return;
    }
    KJ_IF_MAYBE(request, nextAccepted()) {
      (*f)->fulfill(kj::mv(*request));
      acceptWaiter = nullptr;
    }
  }
}

// =======================================================================================
// PING and graceful shutdown

void SessionImpl::submitPing(uint64_t seq) {
  uint8_t opaque[8];
  for (int i = 7; i >= 0; i--) {
    opaque[i] = uint8_t(seq);
    seq >>= 8;
  }
  int rv = nghttp2_submit_ping(session, NGHTTP2_FLAG_NONE, opaque);
  KJ_ASSERT(rv == 0, "nghttp2_submit_ping", libError(rv));
  scheduleWrite();
}

kj::Promise<void> SessionImpl::pingLoop() {
  return timer.afterDelay(config.pingInterval).then([this]() { return sendPing(); });
}

kj::Promise<void> SessionImpl::sendPing() {
  if (ended) return kj::READY_NOW;
  pingOutstanding = ++pingSeq;
  pingSentAt = timer.now();
  submitPing(pingOutstanding);
  auto paf = kj::newPromiseAndFulfiller<void>();
  pingAck = kj::mv(paf.fulfiller);
  kj::Promise<void> acked = kj::mv(paf.promise);
  if (config.pingTimeout > 0 * kj::SECONDS) {
    acked = acked.exclusiveJoin(timer.afterDelay(config.pingTimeout).then([this]() {
      fail(sessionError(SessionErrorKind::PING_TIMEOUT, kj::str(
          "no PING acknowledgement within ", config.pingTimeout,
          invalidFrames > 0 ? " (after invalid frames from the peer)" : "")));
    }));
  }
  return acked.then([this]() { return ended ? kj::Promise<void>(kj::READY_NOW) : pingLoop(); });
}

void SessionImpl::onPingAck(uint64_t seq) {
  if (seq == GOAWAY_PING) {
    KJ_IF_MAYBE(f, goAwayPingAck) {
      (*f)->fulfill();
      goAwayPingAck = nullptr;
    }
    return;
  }
  if (seq == 0 || seq != pingOutstanding) return;   // not ours (or late): ignore
  pingOutstanding = 0;
  ++pingAcks;
  rtt = timer.now() - pingSentAt;
  if (pingAcks == 1 || rtt < minRtt) minRtt = rtt;
  KJ_IF_MAYBE(f, pingAck) {
    (*f)->fulfill();
    pingAck = nullptr;
  }
}

kj::Promise<void> SessionImpl::goAway(kj::Duration grace) {
  KJ_REQUIRE(started, "goAway() before run()");
  if (!ended && !goingAway) {
    goingAway = true;
    nghttp2_submit_shutdown_notice(session);
    submitPing(GOAWAY_PING);
    tasks.add(canceler.wrap(drain(timer.now() + grace)));
  }
  return endForked.addBranch().catch_([](kj::Exception&&) {});
}

kj::Promise<void> SessionImpl::drain(kj::TimePoint deadline) {
  auto paf = kj::newPromiseAndFulfiller<void>();
  goAwayPingAck = kj::mv(paf.fulfiller);
  return paf.promise.exclusiveJoin(timer.atTime(deadline))
      .then([this, deadline]() { return finalGoAway(deadline); });
}

kj::Promise<void> SessionImpl::finalGoAway(kj::TimePoint deadline) {
  if (ended) return kj::READY_NOW;
  int rv = nghttp2_submit_goaway(session, NGHTTP2_FLAG_NONE,
                                 nghttp2_session_get_last_proc_stream_id(session),
                                 NGHTTP2_NO_ERROR, nullptr, 0);
  KJ_ASSERT(rv == 0, "nghttp2_submit_goaway", libError(rv));
  goAwaySent = true;
  scheduleWrite();
  return timer.atTime(deadline).then([this]() { return expireGrace(); });
}

kj::Promise<void> SessionImpl::expireGrace() {
  if (ended) return kj::READY_NOW;
  graceExpired = true;
  nghttp2_session_terminate_session(session, NGHTTP2_NO_ERROR);
  scheduleWrite();
  return timer.afterDelay(config.closeFlushTimeout).then([this]() { finish(nullptr); });
}

// =======================================================================================
// Stats

SessionStats SessionImpl::stats() const {
  SessionStats s;
  s.bytesReceived = bytesReceived;
  s.bytesSent = bytesSent;
  s.requestsAccepted = requestsAccepted;
  s.requestsRejected = requestsRejected;
  s.streamsActive = streams.size();
  s.streamsAborted = streamsAborted;
  s.invalidFrames = invalidFrames;
  s.resetsReceived = resetsReceived;
  s.recvBufferedBytes = recvBuffered;
  s.sendBufferedBytes = sendBuffered;
  s.sendOverBudget = sendOverBudget;
  s.queuedFrames = ended ? 0 : nghttp2_session_get_outbound_queue_size(session);
  s.pingsSent = pingsSent;
  s.pingAcks = pingAcks;
  s.rtt = rtt;
  s.minRtt = minRtt;
  s.goAwaySent = goAwaySent;
  s.goAwayReceived = goAwayReceived;
  s.peerGoAwayCode = peerGoAwayCode;
  s.peerGoAwayText = kj::str(peerGoAwayText);
  return s;
}

// =======================================================================================
// RequestImpl

RequestImpl::~RequestImpl() noexcept(false) {
  auto& s = *state;
  s.readWaiter = nullptr;
  s.writeWaiter = nullptr;
  KJ_IF_MAYBE(session, s.session) {
    (*session).release(s);
  } else {
    s.rx.clear();
  }
}

SessionImpl& RequestImpl::session() {
  KJ_IF_MAYBE(s, state->session) return *s;
  kj::throwFatalException(sessionError(SessionErrorKind::SESSION_CLOSED,
                                       "the session was destroyed"));
}

kj::Maybe<kj::StringPtr> RequestImpl::header(kj::StringPtr name) const {
  for (auto& h: state->headers) {
    if (h.name == name) return h.value.asPtr();
  }
  return nullptr;
}

void RequestImpl::respond(kj::uint status, kj::ArrayPtr<const wire::Header> headers,
                          bool endStream) {
  session().respond(*state, status, headers, endStream);
}

void RequestImpl::reset(uint32_t errorCode) {
  auto& s = *state;
  if (s.aborted || s.session == nullptr) return;
  if (s.closed && s.eofSent) return;    // completed: nothing to reset
  session().resetStream(s, errorCode, streamError(kj::str(
      "HTTP/2 stream ", s.id, " was reset locally (", h2ErrorName(errorCode), ")")));
}

kj::Promise<size_t> RequestImpl::tryRead(void* buffer, size_t minBytes, size_t maxBytes) {
  return readStep(static_cast<kj::byte*>(buffer), minBytes, maxBytes, 0);
}

kj::Promise<size_t> RequestImpl::readStep(kj::byte* out, size_t minBytes, size_t maxBytes,
                                          size_t filled) {
  auto& s = *state;
  size_t n = s.rx.read(kj::arrayPtr(out + filled, maxBytes - filled));
  if (n > 0) {
    KJ_IF_MAYBE(session, s.session) session->credit(s, n);
  }
  filled += n;
  if (filled >= minBytes) return filled;
  if (s.rx.empty() && s.rxEof && s.rxError == nullptr) return filled;
  KJ_IF_MAYBE(e, s.rxError) {
    if (filled > 0) return filled;
    return kj::cp(*e);
  }
  if (s.session == nullptr || !s.session->isOpen()) {
    if (filled > 0) return filled;
    if (s.session == nullptr) {
      return sessionError(SessionErrorKind::SESSION_CLOSED, "the session was destroyed");
    }
    return s.session->endException();
  }
  KJ_REQUIRE(s.readWaiter == nullptr, "one read at a time");
  auto paf = kj::newPromiseAndFulfiller<void>();
  s.readWaiter = kj::mv(paf.fulfiller);
  return paf.promise.then([this, out, minBytes, maxBytes, filled]() {
    return readStep(out, minBytes, maxBytes, filled);
  });
}

kj::Promise<void> RequestImpl::write(const void* buffer, size_t size) {
  return writeStep(kj::arrayPtr(static_cast<const kj::byte*>(buffer), size));
}

kj::Promise<void> RequestImpl::write(kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces) {
  return writePiecesFrom(pieces, 0);
}

kj::Promise<void> RequestImpl::writePiecesFrom(
    kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces, size_t index) {
  if (index == pieces.size()) return kj::READY_NOW;
  return writeStep(pieces[index]).then([this, pieces, index]() {
    return writePiecesFrom(pieces, index + 1);
  });
}

kj::Promise<void> RequestImpl::writeStep(kj::ArrayPtr<const kj::byte> data) {
  auto& s = *state;
  KJ_IF_MAYBE(e, s.txError) return kj::cp(*e);
  if (s.session == nullptr) {
    return sessionError(SessionErrorKind::SESSION_CLOSED, "the session was destroyed");
  }
  auto& sess = *s.session;
  if (!sess.isOpen()) return sess.endException();
  KJ_REQUIRE(s.responded, "write() before respond()");
  KJ_REQUIRE(!s.endRequested, "write() after the response ended");
  if (data.size() == 0) return kj::READY_NOW;
  size_t n = kj::min(uint64_t(data.size()), sess.sendSpace(s));
  if (n > 0) {
    s.tx.append(data.slice(0, n));
    sess.addSendBuffered(n);
    sess.resume(s);
    if (n == data.size()) return kj::READY_NOW;
  }
  KJ_REQUIRE(s.writeWaiter == nullptr, "one write at a time");
  auto paf = kj::newPromiseAndFulfiller<void>();
  s.writeWaiter = kj::mv(paf.fulfiller);
  sess.waitForBudget(s);
  auto rest = data.slice(n, data.size());
  return paf.promise.then([this, rest]() { return writeStep(rest); });
}

void RequestImpl::shutdownWrite() {
  auto& s = *state;
  if (s.endRequested || s.txError != nullptr || s.session == nullptr) return;
  KJ_REQUIRE(s.responded, "shutdownWrite() before respond()");
  s.endRequested = true;
  s.session->resume(s);
}

void RequestImpl::abortRead() {
  auto& s = *state;
  if (s.rxError == nullptr) {
    s.rxError = streamError(kj::str("HTTP/2 stream ", s.id, ": reading was aborted locally"));
  }
  KJ_IF_MAYBE(f, s.readWaiter) {
    (*f)->reject(kj::cp(KJ_ASSERT_NONNULL(s.rxError)));
    s.readWaiter = nullptr;
  }
  KJ_IF_MAYBE(session, s.session) {
    session->shutdownRead(s);
  } else {
    s.rx.clear();
  }
}

kj::Promise<uint64_t> RequestImpl::pumpTo(kj::AsyncOutputStream& output, uint64_t amount) {
  return pumpToLoop(output, amount, 0, kj::heapArray<kj::byte>(PUMP_BUFFER));
}

kj::Promise<uint64_t> RequestImpl::pumpToLoop(kj::AsyncOutputStream& output, uint64_t amount,
                                              uint64_t done, kj::Array<kj::byte> buffer) {
  if (done >= amount) return done;
  size_t want = kj::min(uint64_t(buffer.size()), amount - done);
  auto read = tryRead(buffer.begin(), 1, want);
  return read.then([this, &output, amount, done, buffer = kj::mv(buffer)](size_t n) mutable {
    return pumpToWrite(output, amount, done, kj::mv(buffer), n);
  });
}

kj::Promise<uint64_t> RequestImpl::pumpToWrite(kj::AsyncOutputStream& output, uint64_t amount,
                                               uint64_t done, kj::Array<kj::byte> buffer,
                                               size_t n) {
  if (n == 0) return done;
  auto written = output.write(buffer.begin(), n);   // `buffer` moves, its bytes do not
  return written.then(
      [this, &output, amount, done = done + n, buffer = kj::mv(buffer)]() mutable {
    return pumpToLoop(output, amount, done, kj::mv(buffer));
  });
}

kj::Maybe<kj::Promise<uint64_t>> RequestImpl::tryPumpFrom(kj::AsyncInputStream& input,
                                                          uint64_t amount) {
  return pumpFromLoop(input, amount, 0, kj::heapArray<kj::byte>(PUMP_BUFFER));
}

kj::Promise<uint64_t> RequestImpl::pumpFromLoop(kj::AsyncInputStream& input, uint64_t amount,
                                                uint64_t done, kj::Array<kj::byte> buffer) {
  if (done >= amount) return done;
  size_t want = kj::min(uint64_t(buffer.size()), amount - done);
  auto read = input.tryRead(buffer.begin(), 1, want);
  return read.then([this, &input, amount, done, buffer = kj::mv(buffer)](size_t n) mutable {
    return pumpFromWrite(input, amount, done, kj::mv(buffer), n);
  });
}

kj::Promise<uint64_t> RequestImpl::pumpFromWrite(kj::AsyncInputStream& input, uint64_t amount,
                                                 uint64_t done, kj::Array<kj::byte> buffer,
                                                 size_t n) {
  if (n == 0) return done;
  auto written = write(buffer.begin(), n);
  return written.then(
      [this, &input, amount, done = done + n, buffer = kj::mv(buffer)]() mutable {
    return pumpFromLoop(input, amount, done, kj::mv(buffer));
  });
}

}  // namespace

// =======================================================================================
// Public

kj::StringPtr KJ_STRINGIFY(SessionErrorKind kind) {
  return infoOf(kind).name;
}

kj::Maybe<SessionErrorKind> classifySessionError(const kj::Exception& e) {
  kj::StringPtr desc = e.getDescription();
  for (auto& info: KIND_INFO) {
    if (desc.startsWith(info.prefix)) return info.kind;
  }
  return nullptr;
}

kj::Own<ServerSession> newServerSession(kj::AsyncIoStream& transport, kj::Timer& timer,
                                        SessionConfig config) {
  return kj::heap<SessionImpl>(transport, timer, kj::mv(config));
}

}  // namespace cfqt::http2
