#pragma once
// A UDP socket carrying QUIC connections, in client role (dial) and/or server role (listen).

#include "quic/config.h"
#include "quic/connection.h"

#include <kj/async-unix.h>

namespace cfqt::quic {

struct EndpointStats {
  uint64_t datagramsReceived = 0;   // UDP datagrams (GRO segments counted individually)
  uint64_t datagramsSent = 0;
  uint64_t bytesReceived = 0;
  uint64_t bytesSent = 0;
  uint64_t datagramsDropped = 0;    // unknown connection, malformed, or while silent
  uint64_t statelessResetsSent = 0;
  uint64_t handshakesFailed = 0;    // server role: connections that died before accept()
  uint64_t sendBlocked = 0;         // times the socket returned EAGAIN on send
  uint64_t sendsRefused = 0;        // sends this host refused (see isSendRefusal())
  int sendRefusedErrno = 0;         // the errno of the last refused send (0: none yet)
  uint32_t receiveBufferBytes = 0;  // SO_RCVBUF / SO_SNDBUF granted by the kernel
  uint32_t sendBufferBytes = 0;
  bool gso = false;                 // UDP_SEGMENT in use
  bool gro = false;                 // UDP_GRO in use
};

class Endpoint {
  // One UDP socket (IPv4 or IPv6) and the QUIC connections on it. Driven by the thread's KJ
  // event loop (kj::UnixEventPort): edge-triggered receive drain with recvmmsg (+GRO), sendmmsg
  // (+GSO), one timerfd per connection for sub-millisecond QUIC timers.
  //
  // Build one from `auto io = kj::setupAsyncIo();` as
  //   auto endpoint = quic::newEndpoint(io.unixEventPort, *quic::SocketAddress::parse("0.0.0.0:0"));
  // The Endpoint must outlive its Connections and Streams (they fail with ENDPOINT_GONE if not).
public:
  virtual ~Endpoint() noexcept(false) = default;

  virtual SocketAddress localAddress() const = 0;
  // The bound address, with the real port when bound to port 0.

  virtual kj::Promise<kj::Own<Connection>> dial(SocketAddress remote, ClientConfig config) = 0;
  // Client role: connects to `remote`, resolving after the handshake completed, the certificate
  // was verified and the server selected config.alpn. Rejects with a typed exception
  // (classifyException()): FAILED for TLS failures (untrusted CA, name mismatch, ALPN),
  // OVERLOADED for the handshake timeout, DISCONNECTED if the server closed or reset.
  // Cancelling the promise abandons the attempt. Many dials on one endpoint are allowed.

  virtual void listen(ServerConfig config) = 0;
  // Server role: from now on Initial packets for unknown connection IDs create connections.
  // Throws FAILED if the certificate or key cannot be loaded or no ALPN is given. Once.

  virtual kj::Promise<kj::Own<Connection>> accept() = 0;
  // Server role: the next connection whose handshake completed. Connections failing their
  // handshake are counted in EndpointStats::handshakesFailed and never returned.

  virtual EndpointStats stats() const = 0;
};

kj::Own<Endpoint> newEndpoint(kj::UnixEventPort& eventPort, SocketAddress bindAddress);
// Creates the socket bound to `bindAddress` (use port 0 for an ephemeral port; "[::]:0" is
// dual-stack). Asks for 8 MiB socket buffers (logs at INFO what the kernel granted). Throws on
// socket errors (EADDRINUSE...). `eventPort` must outlive the endpoint.

}  // namespace cfqt::quic
