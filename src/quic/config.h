#pragma once
// Configuration of the QUIC layer: addresses, TLS (client and server) and transport parameters.
// Every default follows PROTOCOL.md §3 (what cloudflared 2023.7 / HEAD use towards the edge).

#include <kj/array.h>
#include <kj/common.h>
#include <kj/string.h>
#include <kj/time.h>
#include <kj/vector.h>

#include <stdint.h>

namespace cfqt::quic {

class SocketAddress {
  // A numeric IPv4 or IPv6 address with a port (a `sockaddr_in`/`sockaddr_in6` in opaque storage,
  // so this header includes no system headers). Copyable value.
public:
  SocketAddress() = default;

  static kj::Maybe<SocketAddress> parse(kj::StringPtr text);
  // Parses "1.2.3.4:443", "[::1]:443", "[::]:0" (numeric only: never blocks on DNS). `nullptr` on
  // malformed input.

  static SocketAddress fromSockaddr(const void* sockaddr, uint32_t length);
  // From a `struct sockaddr_in`/`sockaddr_in6`. REQUIRE-fails on another family or length.

  kj::String toString() const;      // "127.0.0.1:4433" / "[::1]:4433"
  uint16_t port() const;
  bool isIpv6() const;
  void setPort(uint16_t port);

  const void* sockaddr() const { return storage; }    // struct sockaddr*
  uint32_t length() const { return len; }           // socklen_t

  bool operator==(const SocketAddress& other) const;
  bool operator!=(const SocketAddress& other) const { return !(*this == other); }

private:
  alignas(8) kj::byte storage[28] = {};  // sizeof(sockaddr_in6)
  uint32_t len = 0;
};

struct TransportConfig {
  // QUIC transport settings of one connection (both roles). Durations are `kj::Duration` and are
  // all configurable so that tests can use milliseconds.

  kj::Duration handshakeTimeout = 10 * kj::SECONDS;
  // Give up a handshake that has not completed after this long (quic-go/cloudflared: 2 x 5 s).
  // Fails the dial with an OVERLOADED exception (CloseKind::HANDSHAKE_TIMEOUT).

  kj::Duration initialRtt = 100 * kj::MILLISECONDS;
  // The RTT assumed before the first sample (ngtcp2's default is RFC 9002's 333 ms). Pacing spreads
  // the first flights over it, so at 333 ms the client's Finished + registerConnection waited
  // ~20 ms behind a pacing timer even on loopback; 100 ms is quic-go's (cloudflared's) value.
  // Also sets the first probe timeout (3x).

  kj::Duration maxIdleTimeout = 5 * kj::SECONDS;
  // Transport parameter max_idle_timeout. The effective idle timeout is the smaller of both peers'
  // values. 0 disables it (not recommended).

  kj::Duration keepAlivePeriod = 1 * kj::SECONDS;
  // Send a PING after this much silence, so an idle connection survives the idle timeout.
  // 0 disables keep-alive.

  kj::Duration ackDelay = 1 * kj::MILLISECONDS;
  // How long a lone ack-eliciting packet may wait for its acknowledgement, so that the ACK rides
  // on the answer instead of going alone. ngtcp2 0.12 waits only min(max_ack_delay, RTT/8):
  // microseconds on loopback, i.e. an ACK-only packet (and a wake-up of the peer) per request
  // and per response. While nothing waits to be sent, the connection's timer is not armed
  // sooner than this from now (time-threshold loss detection, microseconds on such a path,
  // waits as long). Two ack-eliciting packets are still acknowledged at once. At most 25 ms
  // (the max_ack_delay we advertise); quic-go waits max_ack_delay. 0 = ngtcp2's timing.

  uint64_t maxIncomingBidiStreams = 1ull << 60;   // initial_max_streams_bidi (peer may open)
  uint64_t maxIncomingUniStreams = 1ull << 60;    // initial_max_streams_uni (data is discarded)
  // Concurrency limits, not totals: the peer gets a stream back once one of its streams closes,
  // with the next packet that carries stream data, or at once when 1/16 of the limit is owed.

  uint64_t initialStreamWindow = 512 * 1024;      // initial_max_stream_data_bidi_local/remote/uni
  uint64_t initialConnectionWindow = 768 * 1024;  // initial_max_data
  uint64_t maxStreamWindow = 6 * 1024 * 1024;     // auto-tuning cap of a stream window
  uint64_t maxConnectionWindow = 15 * 1024 * 1024; // auto-tuning cap of the connection window
  // Stream-level credit is returned only as the application consumes bytes (Stream::tryRead), so
  // the bytes buffered for a stream never exceed its window (at most `maxStreamWindow`);
  // connection-level credit, see `recvCreditBudget`.

  uint64_t streamSendBuffer = 64 * 1024;
  // Most bytes written to one stream and not yet sent that the layer keeps (copied; sent bytes
  // are kept too until acknowledged, bounded by the congestion window and the peer's credit).
  // A write() resolves once all its bytes are in the buffer, so a writer is halted by a peer
  // that stops reading (or withholds credit) after this many bytes beyond what it admitted.

  uint64_t streamSendReserve = 4 * 1024;
  uint64_t connectionSendHigh = 2 * 1024 * 1024;
  uint64_t connectionSendLow = 1024 * 1024;
  uint64_t connectionSendMin = 256 * 1024;
  // The send budget of the whole connection (back-pressure): once the bytes buffered for sending
  // over all streams reach the high mark, writes wait until acknowledgements bring the total down
  // to the low mark (waiting writers then resume in arrival order). The high mark follows the
  // congestion window: four windows (what is in flight, plus enough ready to go that the window
  // never waits for a writer), at least `connectionSendMin`, at most `connectionSendHigh`; the
  // low mark keeps the ratio connectionSendLow / connectionSendHigh to it (two windows). More
  // would only wait in memory, not leave sooner. A stream holding less than `streamSendReserve`
  // bytes may always buffer up to that much, so a fresh stream (a small response) never waits
  // behind streams whose readers stalled. Memory for sending is thus at most
  // connectionSendHigh + streams x streamSendReserve. connectionSendMin >= connectionSendHigh
  // makes the budget fixed.

  uint64_t recvCreditBudget = 8 * 1024 * 1024;
  // Connection-level flow-control credit for received stream bytes is returned as soon as they
  // are buffered (not when the application reads them) while the bytes buffered over all
  // streams stay under this budget; above it, only as they are read. Each stream is still bound
  // by its own window, so a stream whose reader stalls holds back that stream only, never the
  // others' share of the connection window. 0 = connection credit only as bytes are read.

  uint64_t streamSendQuantum = 16 * 1024;
  // Streams with data to send take turns (round robin); a stream keeps its turn for up to this
  // many bytes of packets in a row. Larger turns let the peer read (and forward) a stream's data
  // in bigger pieces; smaller ones interleave concurrent streams more finely. 0 = one packet.

  uint64_t maxDatagramFrameSize = 1350;
  // Advertised max_datagram_frame_size (cloudflared 2023.7: 1350). Received DATAGRAM frames are
  // dropped and counted (ConnectionStats::datagramsDropped). 0 = not advertised.

  uint32_t maxUdpPayloadSize = 1452;
  // Largest UDP payload sent (and the max_udp_payload_size parameter). The first flight is 1200.

  uint32_t activeConnectionIdLimit = 7;   // active_connection_id_limit (ngtcp2 allows <= 8)

  int faultSendErrno = 0;
  // Fault injection (tests): when non-zero, every datagram this connection sends fails as if
  // sendmsg had returned this errno (e.g. EPERM, as a host firewall makes it), without calling
  // the kernel. 0 = off.
};

struct ClientConfig {
  kj::String alpn = kj::str("argotunnel");
  // The one ALPN protocol offered. The server must select it; anything else fails the dial with
  // FAILED (CloseKind::TLS_ALPN).

  kj::String serverName = kj::str("quic.cftunnel.com");
  // SNI, and the name the certificate is verified against (SAN; CN ignored by GnuTLS for DNS).

  bool verifyCertificate = true;
  // Verify the server's chain against the trust roots below and its name against `serverName`.

  kj::Maybe<kj::String> caFile;       // PEM file with trusted CAs
  kj::Maybe<kj::String> caPem;        // PEM text with trusted CAs
  bool useSystemTrust = false;        // also trust the operating system's store
  // With verification on, at least one source must be given (else dial() fails FAILED).
  // cloudflared with --cacert trusts only that file: caFile + useSystemTrust=false.

  kj::Maybe<kj::String> tlsPriority;
  // GnuTLS priority string override. Default: TLS 1.3 only, AES-128-GCM first, GnuTLS's default
  // groups (X25519, secp256r1, ...). SSLKEYLOGFILE is honoured by GnuTLS itself.

  TransportConfig transport;
};

struct ServerConfig {
  kj::Maybe<kj::String> certFile;     // PEM chain (leaf first); or:
  kj::Maybe<kj::String> certPem;
  kj::Maybe<kj::String> keyFile;      // PEM private key; or:
  kj::Maybe<kj::String> keyPem;

  kj::Vector<kj::String> alpn;
  // Protocols the server accepts, in preference order. Mandatory: a client offering none of them
  // is refused with TLS alert 120 (no_application_protocol).

  kj::Maybe<kj::String> tlsPriority;
  // GnuTLS priority string override. Default: TLS 1.3 only, AES-128-GCM first, groups secp256r1,
  // X25519, secp384r1 (P-256 is required by cloudflared 2023.7; HelloRetryRequest is supported
  // when a client's key share is for a group the server does not take).

  uint32_t maxPendingConnections = 256;
  // Handshaked connections waiting for accept(); more are refused (closed with CONNECTION_REFUSED).

  TransportConfig transport;
};

}  // namespace cfqt::quic
