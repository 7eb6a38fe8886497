// cfqt-edge as a library: the quick-tunnel API, the QUIC edge, the public front door and the admin
// API around one Registry, bound to their listen addresses. apps/cfqt-edge only parses flags and
// prints the ready line; tests embed an Emulator directly.

#pragma once

#include "certs.h"
#include "front-door.h"
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
  kj::String publicListen = kj::str("127.0.0.1:0");
  kj::String adminListen = kj::str("127.0.0.1:0");
  CertificateOptions certificates;       // stateDir defaults to "./cfqt-edge-state"
  kj::String zone = kj::str("trycloudflare.localhost");
  kj::String location = kj::str("EMU");
  kj::Maybe<kj::String> tlsPriority;     // edge GnuTLS priority override
  quic::TransportConfig edgeTransport = defaultEdgeTransport();
  FrontDoorOptions frontDoor;
  kj::Duration apiHeaderTimeout = 15 * kj::SECONDS;

  static quic::TransportConfig defaultEdgeTransport();
  // The QUIC defaults with keep-alive off (the client keeps the connection alive), the 5 s idle
  // timeout of §3.2, and a production edge's receive side: 512 KiB stream windows (auto-tuned up
  // to 6 MiB) bound each visitor, and a 1 GiB recvCreditBudget returns connection credit as
  // bytes are buffered, so stalled visitors never hold the connection window.
};

struct ReadyInfo {
  kj::String api;                        // bound "ip:port" of each listener
  kj::Maybe<kj::String> apiTls;
  kj::Vector<kj::String> edges;
  kj::String publicAddress;
  kj::String admin;
  kj::String ca;                         // path of the CA certificate (PEM)
  kj::String zone;

  kj::String toJson() const;
  // {"api":..,"edge":<first edge>,"edges":[..],"public":..,"admin":..,"ca":..,"zone":..}
  // plus "apiTls":.. when the HTTPS API listener is on.
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
  FrontDoor& frontDoor() { return *frontDoorPtr; }

  bool hasQuicEdge() const;
  // False when built without the QUIC layer's implementation (edges are then not served).

private:
  class Impl;
  kj::Own<Impl> impl;
  Registry* registryPtr;
  FrontDoor* frontDoorPtr;
};

kj::Maybe<kj::Duration> parseDuration(kj::StringPtr text);
// "250ms", "5s", "2m", "1h", "0"; null when malformed.

}  // namespace cfqt::emulator
