#pragma once
// A QUIC connection (ngtcp2 + GnuTLS) and the typed reasons it can end with.

#include "quic/config.h"
#include "quic/stream.h"

#include <kj/async.h>
#include <kj/exception.h>
#include <kj/string.h>
#include <kj/time.h>

#include <stdint.h>

namespace cfqt::quic {


enum class CloseKind: uint8_t {
  // Why a connection ended (or why a dial failed).
  LOCAL_CLOSE,            // this side called close() (or dropped the Connection): DISCONNECTED
  PEER_APPLICATION_CLOSE, // peer sent CONNECTION_CLOSE with an application code: DISCONNECTED
  PEER_TRANSPORT_CLOSE,   // peer sent CONNECTION_CLOSE with a transport error: DISCONNECTED
  IDLE_TIMEOUT,           // no packet from the peer for the idle timeout: DISCONNECTED
  HANDSHAKE_TIMEOUT,      // handshake not finished in TransportConfig::handshakeTimeout, or the
                          // idle timeout passed during the handshake: OVERLOADED
  TLS_LOCAL_FAILURE,      // our TLS stack rejected the handshake (certificate untrusted, name
                          // mismatch, no common ALPN/cipher...): FAILED
  TLS_PEER_ALERT,         // the peer aborted the handshake with a TLS alert: FAILED
  TLS_ALPN,               // handshake done but the server did not select our ALPN: FAILED
  STATELESS_RESET,        // peer sent a stateless reset (it lost the connection): DISCONNECTED
  ENDPOINT_GONE,          // the Endpoint (socket) was destroyed: DISCONNECTED
  SEND_REFUSED,           // this host refused to send our UDP datagrams (sendmsg failed with
                          // EPERM, EACCES, ENETUNREACH or EHOSTUNREACH: a firewall, security
                          // policy or route forbids that destination): DISCONNECTED
  INTERNAL_ERROR,         // protocol violation or local failure: FAILED
};

kj::StringPtr KJ_STRINGIFY(CloseKind kind);

struct CloseInfo {
  // How a connection ended.
  CloseKind kind;
  uint64_t code = 0;        // application code (LOCAL_CLOSE/PEER_APPLICATION_CLOSE) or QUIC
                            // transport error code (PEER_TRANSPORT_CLOSE, TLS_*: 0x100 + alert)
  uint8_t tlsAlert = 0;     // TLS alert number for TLS_* kinds (0 if none)
  int sendErrno = 0;        // SEND_REFUSED: the errno sendmsg failed with (0 otherwise)
  kj::String reason;        // reason phrase sent/received in CONNECTION_CLOSE (may be empty)
  kj::String description;   // human text: what happened and what to check

  kj::Exception toException() const;
  // DISCONNECTED / OVERLOADED / FAILED as listed on CloseKind, with `description`.
  CloseInfo clone() const;
};

kj::Maybe<CloseKind> classifyException(const kj::Exception& e);
// The CloseKind of an exception produced by this layer (dial failure, stream or connection
// error), recognised by its description's prefix; nullptr if it did not come from a QUIC close.

bool isSendRefusal(int error);
// Whether a send that failed with `error` (an errno) is this host refusing the destination:
// EPERM (netfilter drop, seccomp/cgroup policy), EACCES (a `prohibit` route, LSM policy),
// ENETUNREACH / EHOSTUNREACH (no route, `unreachable` route or rule). Such an error repeats for
// every datagram to that address, so a connection hitting it ends at once (SEND_REFUSED) instead
// of waiting for its handshake or idle timeout.

kj::StringPtr errnoName(int error);
// "EPERM", "EACCES", "ENETUNREACH", "EHOSTUNREACH", ... ("errno N" text is not returned: "?" for
// others).

struct ConnectionStats {
  kj::Duration smoothedRtt = 0 * kj::NANOSECONDS;
  kj::Duration minRtt = 0 * kj::NANOSECONDS;
  kj::Duration latestRtt = 0 * kj::NANOSECONDS;
  uint64_t bytesSent = 0;          // UDP payload bytes (counted by the Endpoint)
  uint64_t bytesReceived = 0;
  uint64_t packetsSent = 0;        // QUIC packets (a GSO datagram counts each segment)
  uint64_t packetsReceived = 0;
  uint64_t ptoCount = 0;           // consecutive PTOs at the time of the call (ngtcp2 pto_count)
  uint64_t ptoTotal = 0;           // PTO expiries seen so far
  uint64_t congestionWindow = 0;
  uint64_t bytesInFlight = 0;
  uint64_t streamsOpenedLocal = 0;
  uint64_t streamsOpenedRemote = 0;
  uint64_t streamsActive = 0;      // streams ngtcp2 still tracks (not fully closed and acked)
  uint64_t datagramsDropped = 0;   // received DATAGRAM frames (unsupported: dropped)
  uint64_t datagramsSent = 0;      // DATAGRAM frames put into packets (sendDatagram())
  uint64_t datagramsSendDropped = 0; // sendDatagram() payloads dropped locally (queue full, or
                                     // no longer fitting a packet after a path change)
  uint64_t recvBufferedBytes = 0;  // bytes held in all streams' receive buffers
  uint64_t sendBufferedBytes = 0;  // bytes held in all streams' send buffers (unacked)
  bool sendOverBudget = false;     // sendBufferedBytes reached connectionSendHigh (writers wait)
  kj::Duration connectionBlockedFor = 0 * kj::NANOSECONDS;
  // How long stream data has been waiting for connection-level credit from the peer (0 when
  // not blocked). A peer that withholds it stalls every stream of the connection.
};

class Connection {
  // One QUIC connection, client or server role. Obtained from Endpoint::dial() (after the
  // handshake, ALPN checked) or Endpoint::accept(). Lives on the endpoint's thread; the Endpoint
  // must outlive it (if not, the connection fails with CloseKind::ENDPOINT_GONE).
  //
  // Dropping the Connection closes it (application code 0, empty reason) if still open; its
  // Streams then fail. Streams keep the underlying state alive, not the connection.
public:
  virtual ~Connection() noexcept(false) = default;

  virtual kj::Promise<kj::Own<Stream>> openStream() = 0;
  // Opens a bidirectional stream (either role). Waits while the peer's stream limit is reached.
  // The peer learns of the stream only when its first byte (or FIN) is sent. Rejects with the
  // close exception if the connection ends.

  virtual kj::Promise<kj::Own<Stream>> acceptStream() = 0;
  // The next bidirectional stream opened by the peer (in order of arrival). Streams arriving
  // while nobody accepts are queued (bounded by our stream limit). Rejects on close.

  virtual kj::Promise<void> close(uint64_t appErrorCode, kj::StringPtr reason) = 0;
  // Sends CONNECTION_CLOSE (application error `appErrorCode`, `reason`) now and fails all streams
  // and waiters with DISCONNECTED (CloseKind::LOCAL_CLOSE). The returned promise resolves when
  // the packet was handed to the kernel; it may be dropped without cancelling anything. No-op
  // (resolved) if already closed.

  virtual kj::Promise<CloseInfo> onClosed() = 0;
  // Resolves (never rejects) once the connection has ended, for whatever reason. Many waiters ok.

  virtual kj::Maybe<const CloseInfo&> closeInfo() const = 0;
  // nullptr while open.

  virtual bool isServer() const = 0;
  virtual kj::StringPtr alpn() const = 0;        // negotiated ALPN protocol
  virtual kj::StringPtr serverName() const = 0;  // SNI sent (client) or received (server; may be "")
  virtual SocketAddress remoteAddress() const = 0;
  virtual ConnectionStats stats() const = 0;

  virtual bool sendDatagram(kj::ArrayPtr<const kj::byte> payload) = 0;
  // Best effort, unreliable: queues one DATAGRAM frame (RFC 9221) carrying `payload` for the next
  // packet; it is never retransmitted and the peer may drop it (this layer's own receive side
  // drops and counts them). Returns false if it was dropped at once because 256 datagrams
  // already wait to be sent (they leave as congestion control allows). Throws FAILED if the peer did not advertise datagram support
  // (max_datagram_frame_size 0) or if `payload` is larger than maxDatagramPayload(); throws the
  // close exception (DISCONNECTED...) if the connection has ended.

  virtual size_t maxDatagramPayload() const = 0;
  // The largest payload sendDatagram() takes now: what fits both the peer's
  // max_datagram_frame_size and one packet on the current path (it can grow once path MTU
  // discovery raises the packet size). 0 if the peer does not take datagrams or if closed.

  virtual void goSilent() = 0;
  // Fault injection (emulator): from now on send nothing and drop every incoming packet, as if
  // the host vanished. The peer then hits its idle timeout; this side also ends with
  // CloseKind::IDLE_TIMEOUT after its own idle timeout.
};

}  // namespace cfqt::quic
