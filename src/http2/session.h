#pragma once
// HTTP/2 server session (libnghttp2) over any kj::AsyncIoStream, driven by the KJ event loop.
//
// cloudflared's HTTP/2 transport (PROTOCOL.md §6.10): cfqt dials TCP + TLS to the edge and is the
// HTTP/2 *server* on that connection; the edge sends one HTTP/2 request per visitor request, plus
// a control-stream request whose bodies carry the capnp RPC. This layer knows nothing of tunnels:
// it turns a byte stream into requests (headers + a streaming body both ways) and back.
//
// Memory is bounded whatever the peer does:
// - receiving: nghttp2's automatic WINDOW_UPDATEs are off. Stream credit is returned only as the
//   application reads a body, so a stream never holds more than its window; connection credit is
//   returned on receipt while all streams together hold less than `recvCreditBudget`, above it
//   only as bytes are read (so one stalled reader never starves the others).
// - sending: each body write is copied into a per-stream buffer (`streamSendBuffer`) that a
//   deferred nghttp2 data provider drains as the peer grants credit; a connection-wide budget
//   (`connectionSendHigh/Low`, `streamSendReserve`) bounds all streams together, as in the QUIC
//   layer. One transport write is in flight at a time.
// - header lists are limited (`maxHeaderListSize`, answered with 431 like Go's server; request
//   heads held: at most maxConcurrentStreams x maxHeaderListSize), frames that need an answer
//   (SETTINGS/PING ACKs, RST_STREAMs) are capped (`maxQueuedAcks`, `maxQueuedFrames`): a
//   flooding peer loses its connection, with a typed error.
//
// Threading: everything lives on the thread of the event loop that created the session.

#include "wire/http-metadata.h"

#include <kj/async-io.h>
#include <kj/exception.h>
#include <kj/string.h>
#include <kj/time.h>
#include <kj/timer.h>

#include <stdint.h>

namespace cfqt::http2 {

// HTTP/2 error codes (RFC 9113 §7) used with ServerRequest::reset().
constexpr uint32_t H2_NO_ERROR = 0x0;
constexpr uint32_t H2_PROTOCOL_ERROR = 0x1;
constexpr uint32_t H2_INTERNAL_ERROR = 0x2;
constexpr uint32_t H2_REFUSED_STREAM = 0x7;
constexpr uint32_t H2_CANCEL = 0x8;
constexpr uint32_t H2_ENHANCE_YOUR_CALM = 0xb;

enum class SessionErrorKind: uint8_t {
  // Why a session (or a stream, when its session ended) failed. Every exception this layer
  // produces for a session end starts with "http2 <kind>: " (see classifySessionError()).
  PEER_CLOSED,       // the transport reached EOF while streams were open: DISCONNECTED
  TRANSPORT_ERROR,   // reading or writing the transport failed: the transport's own type
  PROTOCOL_ERROR,    // the peer violated HTTP/2 (bad preface, frames, HPACK...); we sent GOAWAY
                     // with an error code where possible: FAILED
  FLOODED,           // the peer sent more frames needing an answer than it reads (SETTINGS,
                     // PING floods), or reset streams faster than nghttp2's limit (rapid reset,
                     // CVE-2023-44487: 1000 burst, 33/s; in Debian's 1.52 package): FAILED
  PEER_GOAWAY,       // the peer sent GOAWAY with an error code: DISCONNECTED
  PING_TIMEOUT,      // no PING ACK within SessionConfig::pingTimeout: DISCONNECTED
  SESSION_CLOSED,    // the session ended (cleanly, by goAway()'s grace period or by being
                     // destroyed) while this stream was in flight: DISCONNECTED
  INTERNAL_ERROR,    // nghttp2 failed locally (out of memory) or a bug in this layer: FAILED
};

kj::StringPtr KJ_STRINGIFY(SessionErrorKind kind);

kj::Maybe<SessionErrorKind> classifySessionError(const kj::Exception& e);
// The kind of an exception produced by this layer for a session end (also what the streams of a
// dead session fail with), recognised by its description's prefix; nullptr otherwise (e.g. a
// stream reset by the peer).

struct SessionConfig {
  // All sizes in bytes. Durations are kj::Duration so that tests can use milliseconds.

  uint32_t maxConcurrentStreams = 1000;
  // SETTINGS_MAX_CONCURRENT_STREAMS. cloudflared advertises 2^32-1; quick tunnels are limited to
  // 200 requests in flight by the edge. Streams beyond it are refused by nghttp2.

  uint32_t initialStreamWindow = 512 * 1024;
  // SETTINGS_INITIAL_WINDOW_SIZE: most request-body bytes buffered per stream (max 2^31-1).
  uint32_t connectionWindow = 1024 * 1024;
  // The connection's receive window (sent as a WINDOW_UPDATE on stream 0 at start).
  uint64_t recvCreditBudget = 8 * 1024 * 1024;
  // Connection credit for received body bytes is returned on receipt while all streams hold
  // less than this; above, only as bytes are read. 0 = only as read. Buffered request bytes are
  // thus at most recvCreditBudget + connectionWindow.

  uint32_t maxHeaderListSize = 64 * 1024;
  // SETTINGS_MAX_HEADER_LIST_SIZE, enforced (name + value + 32 per field, RFC 9113 §6.5.2): a
  // larger request head is answered 431 and never reaches acceptRequest(). nghttp2 itself fails
  // the connection (COMPRESSION_ERROR) on a single field over 64 KiB.
  uint32_t maxFrameSize = 16384;
  // SETTINGS_MAX_FRAME_SIZE: largest frame we accept (16384..16777215).
  uint32_t maxSendFrameSize = 16384;
  // Largest DATA payload we send (also capped by the peer's SETTINGS_MAX_FRAME_SIZE).

  kj::Duration pingInterval = 10 * kj::SECONDS;
  kj::Duration pingTimeout = 5 * kj::SECONDS;
  // A PING is sent `pingInterval` after the previous one was acknowledged (0 = no PINGs); if its
  // ACK does not arrive within `pingTimeout` (0 = wait forever) the session fails with
  // PING_TIMEOUT. This also catches a peer that stops reading: our PING then never leaves.

  uint64_t streamSendBuffer = 64 * 1024;
  uint64_t streamSendReserve = 4 * 1024;
  uint64_t connectionSendHigh = 2 * 1024 * 1024;
  uint64_t connectionSendLow = 1024 * 1024;
  // Response-body bytes written and not yet framed: a write resolves once its bytes are in the
  // stream's buffer (at most streamSendBuffer). Once all streams together hold
  // connectionSendHigh, a stream may only hold streamSendReserve until the total is back to
  // connectionSendLow (waiting writers then resume in arrival order), so a fresh small response
  // never waits behind stalled ones. Memory: connectionSendHigh + streams x streamSendReserve.

  uint32_t maxQueuedAcks = 1000;
  // nghttp2_option_set_max_outbound_ack: SETTINGS/PING ACKs queued because the peer does not
  // read them; one more fails the session (FLOODED).
  uint32_t maxQueuedFrames = 10000;
  // Any non-DATA frames queued (RST_STREAMs answering a peer's frames included); more fails the
  // session (FLOODED).

  uint64_t resetBurst = 1000;
  uint64_t resetRate = 33;
  // nghttp2's limit on the peer's RST_STREAMs (token bucket: `resetBurst` tokens, `resetRate`
  // per second; CVE-2023-44487 "rapid reset"): over it the session ends (FLOODED). nghttp2's
  // defaults suit a server facing the Internet; the tunnel's peer is the edge, which resets a
  // stream for every visitor that leaves, so the tunnel raises it (see EdgeDialer).

  size_t readBufferSize = 32 * 1024;
  // One transport read at most (then handed to nghttp2).
  size_t writeBufferSize = 64 * 1024;
  // Frames are gathered into one transport write up to this size.

  kj::Duration closeFlushTimeout = 1 * kj::SECONDS;
  // How long our last frames may take to leave once nothing else is left to do (after goAway()'s
  // grace period, or GOAWAY exchanged and no stream left) before the session ends anyway.
};

struct SessionStats {
  uint64_t bytesReceived = 0;       // transport bytes
  uint64_t bytesSent = 0;
  uint64_t requestsAccepted = 0;    // complete request heads (queued for acceptRequest())
  uint64_t requestsRejected = 0;    // request heads over maxHeaderListSize (answered 431)
  uint64_t streamsActive = 0;       // streams the session still tracks (open in nghttp2)
  uint64_t streamsAborted = 0;      // streams that ended before completing (reset, GOAWAY, end)
  uint64_t invalidFrames = 0;       // frames nghttp2 rejected (stream or connection errors)
  uint64_t resetsReceived = 0;      // RST_STREAM frames from the peer
  uint64_t recvBufferedBytes = 0;   // request-body bytes held for all streams, unread
  uint64_t sendBufferedBytes = 0;   // response-body bytes held for all streams, not yet framed
  bool sendOverBudget = false;      // sendBufferedBytes reached connectionSendHigh
  uint64_t queuedFrames = 0;        // non-DATA frames waiting in nghttp2 (ACKs, RSTs, HEADERS)
  uint64_t pingsSent = 0;
  uint64_t pingAcks = 0;
  kj::Duration rtt = 0 * kj::NANOSECONDS;     // latest PING round trip (0 = not measured yet)
  kj::Duration minRtt = 0 * kj::NANOSECONDS;  // (1 ms granularity: kj::Timer)
  bool goAwaySent = false;          // a final GOAWAY (not only the shutdown notice) was queued
  bool goAwayReceived = false;
  uint32_t peerGoAwayCode = 0;
  kj::String peerGoAwayText;        // the peer's GOAWAY debug data (printable, bounded)
};

class ServerRequest {
  // One request stream whose headers are complete. Obtained from ServerSession::acceptRequest();
  // lives on the session's thread and may outlive the session (every operation then fails with
  // the session's end exception).
  //
  // Dropping it: a response not ended yet (or never started) is reset (RST_STREAM
  // INTERNAL_ERROR); an ended response still goes out in full, and if the request body is not
  // finished the stream is then reset with NO_ERROR (RFC 9113 §8.1). Unread body bytes are
  // discarded and credited back.
public:
  virtual ~ServerRequest() noexcept(false) = default;

  virtual int32_t streamId() const = 0;

  virtual kj::ArrayPtr<const wire::Header> headers() const = 0;
  // The request's header list as received: pseudo-headers first (":method", ":scheme",
  // ":authority", ":path"; CONNECT has no :scheme/:path), then regular headers, all names lower
  // case, order and repeats kept. nghttp2 validated them (RFC 9113 §8.2-8.3) before the request
  // was accepted. Trailers are not kept.

  virtual kj::Maybe<kj::StringPtr> header(kj::StringPtr lowerCaseName) const = 0;
  // The first value of a header (pseudo-headers too); nullptr if absent.

  virtual kj::AsyncIoStream& body() = 0;
  // Valid while this ServerRequest lives. One read and one write at a time.
  //   tryRead(): request-body bytes; 0 = END_STREAM. Credit goes back to the peer as bytes are
  //     read. A reset (either side) makes it throw DISCONNECTED, the session's end throws the
  //     session's exception (SessionErrorKind prefix); bytes of a request body that had fully
  //     arrived stay readable.
  //   write(): response-body bytes, sent as DATA frames as the peer grants credit; resolves once
  //     the bytes are in the stream's bounded send buffer (see SessionConfig). Requires
  //     respond(..., endStream = false) first. Small writes are sent at once (in the next event
  //     loop turn), never held back to fill frames: server-sent events stream as written.
  //   shutdownWrite(): END_STREAM after the buffered bytes (requires respond() first).
  //   abortRead(): discard the rest of the request body (credited back as it arrives; once the
  //     response has ended the stream is reset with NO_ERROR).
  //   whenWriteDisconnected(): same as whenAborted().

  virtual void respond(kj::uint status, kj::ArrayPtr<const wire::Header> headers,
                       bool endStream) = 0;
  // Submits the response HEADERS: ":status" (200..999: a final status; HTTP/2 has no 101), then
  // `headers`. Names are lower-cased here and connection-specific ones (connection, keep-alive,
  // proxy-connection, transfer-encoding, upgrade: RFC 9113 §8.2.2) dropped, as Go's server does;
  // any other name or value HTTP/2 forbids throws FAILED and sends nothing. `endStream` = no
  // body. Once only.
  // Throws the stream's exception (DISCONNECTED) if it was reset or the session ended.

  virtual void reset(uint32_t errorCode) = 0;
  // RST_STREAM with `errorCode` (H2_*), unless the stream already ended. Pending and later reads
  // and writes fail DISCONNECTED; buffered bytes are discarded; whenAborted() resolves.

  virtual kj::Promise<void> whenAborted() = 0;
  // Resolves (never rejects) once the stream ended before completing: the peer reset it, we
  // reset it, a GOAWAY or the session's end cut it. Many waiters ok; cheap.

  virtual uint64_t bufferedReadBytes() const = 0;
  // Request-body bytes received and not yet read (never more than the stream window).
  virtual uint64_t bufferedWriteBytes() const = 0;
  // Response-body bytes written and not yet framed.
};

class ServerSession {
  // The HTTP/2 server end of one connection. Borrows the transport and the timer, which must
  // outlive it. Created by newServerSession(); nothing is read or written before run().
  //
  // Dropping the session stops all I/O at once (no GOAWAY; call goAway() first for a graceful
  // end) and fails every stream still in flight with SESSION_CLOSED. The caller closes the
  // transport (e.g. drops the TLS stream) after run() settled or the session is gone.
public:
  virtual ~ServerSession() noexcept(false) = default;

  virtual kj::Promise<void> run() = 0;
  // Starts reading and writing (our SETTINGS and connection WINDOW_UPDATE go first). Resolves
  // when the connection ended cleanly: GOAWAY sent or received and every stream finished, our
  // goAway() completed (even if its grace period cut streams), or the transport reached EOF with
  // no stream open. Rejects with a SessionErrorKind exception otherwise. Call once.

  virtual kj::Promise<kj::Own<ServerRequest>> acceptRequest() = 0;
  // The next request whose headers are complete, in order of arrival. Requests arriving while
  // nobody accepts wait in a queue bounded by maxConcurrentStreams; one reset by the peer before
  // being accepted is dropped. One call at a time. Rejects with the session's end exception
  // (SESSION_CLOSED when it ended cleanly) once the session is over.

  virtual kj::Promise<void> goAway(kj::Duration grace) = 0;
  // Graceful shutdown, as Go's http2 server does it: a GOAWAY shutdown notice (last stream id
  // 2^31-1) and a PING; when the PING is acknowledged (one round trip: requests the peer sent
  // meanwhile have arrived) the final GOAWAY(NO_ERROR, last processed stream id). In-flight
  // streams go on; the session ends once they are done, or when `grace` (counted from this
  // call) passes: then GOAWAY with termination, streams fail SESSION_CLOSED. Resolves (never
  // rejects) when the session has ended, for whatever reason. Requires run(). Later calls only
  // wait.

  virtual kj::Promise<void> whenPeerGoingAway() = 0;
  // Resolves (never rejects) once the peer sent GOAWAY (any code; stats() has the code and the
  // text). Stays pending if it never does. Many waiters ok.

  virtual SessionStats stats() const = 0;
};

kj::Own<ServerSession> newServerSession(kj::AsyncIoStream& transport, kj::Timer& timer,
                                        SessionConfig config = {});

}  // namespace cfqt::http2
