// cfqt-edge as a library: the quick-tunnel API, the edge (QUIC on UDP and HTTP/2 over TLS on TCP,
// same port), the public front door and the admin API around one Registry, bound to their listen
// addresses. apps/cfqt-edge only parses flags and
// prints the ready line; tests embed an Emulator directly.

#pragma once

#include "certs.h"
#include "dns-server.h"
#include "front-door.h"
#include "h2-session.h"
#include "registry.h"

#include "quic/config.h"

#include <kj/async-io.h>
#include <kj/compat/http.h>
#include <kj/vector.h>

namespace cfqt::emulator {

struct EmulatorOptions {
  kj::String apiListen = kj::str("127.0.0.1:0");
  kj::Maybe<kj::String> apiTlsListen;    // optional HTTPS listener of the API (server cert)
  kj::Vector<kj::String> edgeListen;     // empty: one edge on 127.0.0.1:0
  // Each edge address is served on UDP (QUIC) and on TCP (HTTP/2 over TLS) with the same port
  // number; with port 0 both get the same ephemeral port.
  bool noUdp = false;                    // the UDP side starts blocked (see setUdpBlocked())
  kj::String publicListen = kj::str("127.0.0.1:0");
  kj::String adminListen = kj::str("127.0.0.1:0");
  CertificateOptions certificates;       // stateDir defaults to "./cfqt-edge-state"
  kj::String zone = kj::str("trycloudflare.localhost");
  kj::String location = kj::str("EMU");
  kj::Maybe<kj::String> tlsPriority;     // edge GnuTLS priority override
  quic::TransportConfig edgeTransport = defaultEdgeTransport();
  // QUIC settings; its handshakeTimeout also bounds the TLS handshake on TCP.
  Http2SessionOptions http2;             // the HTTP/2 edge's session (windows, limits)
  FrontDoorOptions frontDoor;
  kj::Duration apiHeaderTimeout = 15 * kj::SECONDS;

  // The public Internet's part (issue 16); each listener is off unless its address is given.
  kj::Maybe<kj::String> dnsListen;       // authoritative DNS for `zone`, UDP and TCP, same port
  kj::Maybe<kj::String> dotListen;       // the same over DNS-over-TLS (server certificate)
  kj::Maybe<kj::String> publicTlsListen; // HTTPS front door (certificate for *.<zone>)
  kj::Maybe<kj::String> publicTlsCert;   // with publicTlsKey: that certificate instead
  kj::Maybe<kj::String> publicTlsKey;
  kj::Duration dnsDelay = 0 * kj::SECONDS;   // A/AAAA appear this long after first registration
  uint32_t negativeTtl = 1800;               // SOA minimum of NXDOMAIN answers, seconds
  // FrontDoorOptions::routeDelay is --route-delay.

  static quic::TransportConfig defaultEdgeTransport();
  // The QUIC defaults with keep-alive off (the client keeps the connection alive), the 5 s idle
  // timeout of §3.2, and a production edge's receive side: 512 KiB stream windows (auto-tuned up
  // to 6 MiB) bound each visitor, and a 1 GiB recvCreditBudget returns connection credit as
  // bytes are buffered, so stalled visitors never hold the connection window.
};

struct ReadyInfo {
  kj::String api;                        // bound "ip:port" of each listener
  kj::Maybe<kj::String> apiTls;
  kj::Vector<kj::String> edges;          // UDP (QUIC) edge addresses
  kj::Vector<kj::String> tcpEdges;       // TCP (HTTP/2) edge addresses: the same ip:port
  bool udpBlocked = false;
  kj::String publicAddress;
  kj::String admin;
  kj::String ca;                         // path of the CA certificate (PEM)
  kj::String zone;
  kj::Maybe<kj::String> dns;             // DNS (UDP and TCP) address, when on
  kj::Maybe<kj::String> dot;             // DNS-over-TLS address, when on
  kj::Maybe<kj::String> publicTls;       // HTTPS front door address, when on

  kj::String toJson() const;
  // {"api":..,"edge":<first edge>,"edges":[..],"public":..,"admin":..,"ca":..,"zone":..,
  //  "tcpEdges":[..],"udpBlocked":false,"dns":..,"dot":..,"public_tls":..} (null when off) plus
  //  "apiTls":.. when the HTTPS API listener is on.
};

class Emulator {
public:
  Emulator(kj::AsyncIoContext& io, EmulatorOptions options);
  // Borrows `io`. Blocking start-up work (certificates) happens in start().
  KJ_DISALLOW_COPY(Emulator);
  ~Emulator() noexcept(false);

  kj::Promise<ReadyInfo> start();
  // Generates or loads the certificates, binds every listener and starts serving. Resolves once
  // everything listens. Rejects (FAILED/DISCONNECTED) if an address can't be parsed or bound.

  Registry& registry() { return *registryPtr; }
  uint64_t dnsQueryCount() const;    // DNS messages answered (UDP, TCP and DoT)
  FrontDoor& frontDoor() { return *frontDoorPtr; }

  bool hasQuicEdge() const;
  // False when built without the QUIC layer's implementation (UDP edges are then not served).

  size_t http2ConnectionCount() const;
  // Live HTTP/2 tunnel connections (TLS handshake done).

  void setUdpBlocked(bool blocked);
  bool udpBlocked();
  // The admin API's POST /udp/block and /udp/unblock (EdgeServer::setUdpBlocked()): the UDP side
  // drops every datagram, as behind a firewall. No-op without a QUIC edge.

private:
  class Impl;
  kj::Own<Impl> impl;
  Registry* registryPtr;
  FrontDoor* frontDoorPtr;
};

kj::Maybe<kj::Duration> parseDuration(kj::StringPtr text);
// "250ms", "5s", "2m", "1h", "0"; null when malformed.

}  // namespace cfqt::emulator
