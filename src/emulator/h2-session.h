// The edge's HTTP/2 *client* session (PROTOCOL.md §6.10: on cloudflared's HTTP/2 transport the
// tunnel client is the HTTP/2 server and the edge sends it requests); the server role exists for
// tests, which play the tunnel client with it. nghttp2 driven by the KJ event loop over one byte
// stream (the TLS connection): one read loop feeding
// nghttp2_session_mem_recv(), one write loop draining nghttp2_session_mem_send() (one write in
// flight), and nghttp2 callbacks that only record state and wake promises -- they never throw and
// never call back into nghttp2's I/O.
//
// Flow control mirrors the QUIC edge's receive side: each response stream gets its own window
// (`initialStreamWindow`), returned only as the reader of that stream consumes the bytes, so a
// stalled reader stops its own stream and nothing else; connection-level credit is returned as
// soon as bytes are buffered (except on streams whose credit is withheld, a fault injection).
// Request bodies go out only as the peer's windows allow: a write() resolves once nghttp2 has
// framed all of its bytes.

#pragma once

#include "wire/http-metadata.h"

#include <kj/async-io.h>
#include <kj/map.h>
#include <kj/timer.h>
#include <kj/vector.h>

struct nghttp2_session;

namespace cfqt::emulator {

enum class Http2Role { CLIENT, SERVER };

struct Http2SessionOptions {
  Http2Role role = Http2Role::CLIENT;
  uint32_t initialStreamWindow = 512 * 1024;
  // SETTINGS_INITIAL_WINDOW_SIZE: what the peer may send on one stream before its reader
  // consumed anything (the QUIC edge's initial stream window).
  uint32_t connectionWindow = 16 * 1024 * 1024;
  // The connection-level receive window (returned as bytes are buffered).
  size_t maxHeaderBytes = 256 * 1024;
  // Per received head (names + values + 32 per field, as SETTINGS_MAX_HEADER_LIST_SIZE counts);
  // more resets that stream (RST_STREAM INTERNAL_ERROR). Note nghttp2 itself refuses any single
  // header field over 64 KiB with a connection error (COMPRESSION_ERROR).
  kj::Duration closeGrace = 1 * kj::SECONDS;
  // After close() sent GOAWAY: how long to wait for the client's EOF before dropping the TCP
  // connection.
};

struct Http2Head {
  // What the peer sent in its HEADERS: the response (client role) or the request (server role).
  kj::uint status;                   // final status (1xx heads are skipped); 0 for a request
  kj::Array<wire::Header> headers;   // as received: lower-case names, order kept, pseudo-headers
                                     // other than :status included (a request's :method, ...)
};

struct Http2Stats {
  uint64_t bytesSent = 0;            // TLS plaintext bytes handed to / read from the transport
  uint64_t bytesReceived = 0;
  uint64_t streamsOpened = 0;
  size_t openStreams = 0;            // streams held by someone
  size_t recvBufferedBytes = 0;      // response bytes received and not yet read
  size_t sendBufferedBytes = 0;      // request bytes handed to write() and not yet framed, plus
                                     // frames in flight to the transport
  bool silent = false;
};

class Http2SessionObserver {
public:
  virtual void peerGoAway(uint32_t errorCode, kj::StringPtr debugData) {}
  // The peer sent GOAWAY: it takes no new requests. Called inside nghttp2: bookkeeping only.
};

class Http2Session;

class Http2Stream final: public kj::AsyncIoStream {
  // One stream of the session: a request made by Http2Session::newStream() (client role), or one
  // the peer opened, from Http2Session::acceptStream() (server role). Owned by the caller; it may
  // outlive the session (then every call fails DISCONNECTED). Dropping it before the stream
  // closed sends RST_STREAM (CANCEL), except when both bodies are complete and only our
  // END_STREAM is still to be sent (then it is). One read and one write at a time; the stream
  // must outlive
  // the promises of its calls. "Our" body is the request (client) or the response (server).
public:
  Http2Stream(Http2Session& session, uint64_t key, bool withheld);
  // Use Http2Session::newStream().
  ~Http2Stream() noexcept(false);
  KJ_DISALLOW_COPY(Http2Stream);

  void submit(kj::ArrayPtr<const wire::Header> headers, bool endStream);
  // Sends our HEADERS (the request, or in the server role the response). `headers` are
  // pseudo-headers first, all names lower case; they are copied. With `endStream` there is no
  // body; otherwise write() sends it and shutdownWrite() ends it. Once. Throws DISCONNECTED when
  // the session is gone or (client role) going away; the stream has failed then.

  kj::Promise<Http2Head> receiveHead();
  // The peer's head: the final response, or the request. Rejects DISCONNECTED if the stream is
  // reset or the connection ends before it. Once.

  int32_t id() const { return streamId; }
  // The HTTP/2 stream id (odd, from 1), or -1 before submit().

  void setCreditWithheld(bool withheld);
  // Fault injection: while set, bytes read from this stream return no stream credit and received
  // bytes no connection credit, so the client's writes stall once the windows are used up.

  void reset(uint32_t errorCode);
  // RST_STREAM with `errorCode` now; reads and writes fail afterwards.

  // kj::AsyncIoStream: our body (write/shutdownWrite) and the peer's (tryRead).
  kj::Promise<size_t> tryRead(void* buffer, size_t minBytes, size_t maxBytes) override;
  kj::Promise<void> write(const void* buffer, size_t size) override;
  kj::Promise<void> write(kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces) override;
  kj::Promise<void> whenWriteDisconnected() override;
  void shutdownWrite() override;
  // Ends our body (END_STREAM) once what was written is sent. No-op without a body.

private:
  friend class Http2Session;

  Http2Session* session;                     // null once detached (session gone)
  uint64_t key;                              // in session->streams
  int32_t streamId = -1;
  bool submitted = false;
  bool hasBody = false;                      // a data provider was given to nghttp2
  bool endRequested = false;                 // shutdownWrite() called
  bool endSent = false;                      // END_STREAM of the request framed
  bool resetSent = false;
  bool closed = false;                       // nghttp2 closed the stream
  bool withheld = false;
  size_t withheldConnectionBytes = 0;        // connection credit not returned while withheld
  size_t withheldStreamBytes = 0;            // stream credit (bytes read) not returned

  // Request side: the bytes of the write() in progress, not yet framed.
  kj::ArrayPtr<const kj::byte> pending;      // owned by the caller of write()
  kj::Maybe<kj::Own<kj::PromiseFulfiller<void>>> writeWaiter;
  uint64_t writeSeq = 0;

  // Response side.
  kj::Vector<wire::Header> headerBlock;      // the head being received
  size_t headerBytes = 0;
  kj::uint headerStatus = 0;
  bool headReceived = false;
  kj::Maybe<Http2Head> head;                 // received, not yet taken by receiveHead()
  kj::Maybe<kj::Own<kj::PromiseFulfiller<Http2Head>>> headWaiter;
  kj::Vector<kj::byte> body;                 // received bytes [bodyStart, size())
  size_t bodyStart = 0;
  bool remoteEnded = false;                  // END_STREAM received
  kj::Maybe<kj::Own<kj::PromiseFulfiller<void>>> readWaiter;
  kj::Maybe<kj::Exception> failure;          // reset, or the connection ended
  kj::Own<kj::PromiseFulfiller<void>> disconnectFulfiller;
  kj::ForkedPromise<void> disconnected;      // resolved once the stream is closed or failed

  kj::ForkedPromise<void> makeDisconnected();
  kj::Promise<size_t> readSome(kj::byte* out, size_t minBytes, size_t maxBytes, size_t done);
  void consumed(size_t n);
  void compactBody();
  void fail(kj::Exception&& e);
  void wakeReader();
  kj::Exception gone() const;
  // nghttp2 events (from Callbacks):
  bool onHeader(kj::ArrayPtr<const char> name, kj::ArrayPtr<const char> value, size_t limit);
  void onHeadersEnd(bool endStream);
  void onData(kj::ArrayPtr<const kj::byte> data);
  void onEndStream();
  void onClosed(uint32_t errorCode);
  int64_t produce(kj::byte* buffer, size_t length, uint32_t* flags);
  // The data provider: copies pending bytes, sets the EOF flag; -1 = nothing yet (DEFERRED).
  void detach(const kj::Exception& reason);
};

class Http2Session {
public:
  Http2Session(kj::Timer& timer, kj::Own<kj::AsyncIoStream> transport,
               Http2SessionObserver& observer, Http2SessionOptions options = {});
  // Borrows timer and observer. Sends the connection preface and SETTINGS (ENABLE_PUSH 0,
  // INITIAL_WINDOW_SIZE) once run() is called.
  KJ_DISALLOW_COPY(Http2Session);
  ~Http2Session() noexcept(false);

  kj::Promise<void> run();
  // Drives the session until the connection ends: the client's EOF, a transport error, an
  // HTTP/2 connection error, or close(). Never rejects; closeReason() tells why. Once. Drop the
  // session soon after: that closes the transport.

  kj::Own<Http2Stream> newStream();
  // Client role: a stream for the next request; submit() sends it. Throws DISCONNECTED once the
  // session ended.

  kj::Promise<kj::Own<Http2Stream>> acceptStream();
  // Server role: the next stream the peer opened (its request head may still be arriving).
  // Rejects DISCONNECTED once the session ended. One caller at a time.

  void close(uint32_t errorCode, kj::StringPtr reason);
  // GOAWAY(last stream 0, errorCode, debug data `reason`), then the TLS close_notify; the
  // connection is dropped at the client's EOF or after closeGrace. Streams fail DISCONNECTED.

  void goSilent();
  // Fault injection: send nothing from now on and discard everything received.

  void setWithholdNew(bool withhold) { withholdNew = withhold; }
  // Every stream made from now on starts with its credit withheld.

  kj::Maybe<Http2Stream&> findStream(int32_t id);
  // A live (held) stream by HTTP/2 stream id.

  bool isOpen() const { return !finished && !goingAway; }
  // False once the session ended, close() was called, or the client sent GOAWAY.

  kj::StringPtr closeReason() const { return reason; }
  Http2Stats stats() const;

private:
  friend class Http2Stream;
  struct Callbacks;
  class ErrorHandler final: public kj::TaskSet::ErrorHandler {
  public:
    explicit ErrorHandler(Http2Session& session): session(session) {}
    void taskFailed(kj::Exception&& exception) override;
  private:
    Http2Session& session;
  };
  struct NgSession {
    // Owns the nghttp2 session (nghttp2_session_del); declared before anything that calls it.
    nghttp2_session* ptr = nullptr;
    NgSession() = default;
    KJ_DISALLOW_COPY(NgSession);
    ~NgSession() noexcept(false);
  };

  kj::Timer& timer;
  kj::Own<kj::AsyncIoStream> transport;
  Http2SessionObserver& observer;
  Http2SessionOptions options;
  NgSession ng;
  kj::HashMap<uint64_t, Http2Stream*> streams;   // every held stream, by key
  kj::HashSet<int32_t> orphanEnds;   // dropped streams whose END_STREAM is still to be framed
  kj::Vector<kj::Own<Http2Stream>> accepted;      // server role: opened, not yet accepted
  kj::Maybe<kj::Own<kj::PromiseFulfiller<kj::Own<Http2Stream>>>> acceptWaiter;
  uint64_t nextKey = 1;
  bool withholdNew = false;
  bool silent = false;
  bool closing = false;                    // close() called
  bool goAwaySent = false;
  bool goingAway = false;                  // close() called or the client sent GOAWAY
  bool finished = false;
  bool writing = false;                    // writeLoop() is scheduled or running
  kj::String reason;                       // why the session ended
  kj::Maybe<kj::Exception> pendingError;   // thrown inside a callback, rethrown after nghttp2
  kj::Array<kj::byte> readBuffer;
  kj::Vector<kj::byte> outBuffer;          // frames being written (one write in flight)
  Http2Stats counters;
  bool shutdownSent = false;               // the transport's write side was shut after GOAWAY
  kj::Maybe<kj::Own<kj::PromiseFulfiller<void>>> doneFulfiller;
  ErrorHandler errorHandler;
  kj::TaskSet tasks;                       // last: cancelled first

  kj::Promise<void> readLoop();
  void receive(kj::ArrayPtr<const kj::byte> bytes);
  void flush();
  kj::Promise<void> writeLoop();
  void afterWrites();
  void finish(kj::StringPtr why);
  void detachAll(kj::StringPtr why);
  void rethrowPending();
  void submit(Http2Stream& stream, kj::ArrayPtr<const wire::Header> headers, bool endStream);
  void onPeerStream(int32_t id);
  void resume(Http2Stream& stream);
  void forget(Http2Stream& stream);
};

}  // namespace cfqt::emulator
