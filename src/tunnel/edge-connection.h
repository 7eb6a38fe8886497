#pragma once
// EdgeConnection: one connection to the edge (an EdgeTransport, transport.h) for one HA index
// (PROTOCOL.md §3, §4, §6): dial (today QUIC: ALPN argotunnel, SNI quic.cftunnel.com, Cloudflare
// roots + system store, or --edge-ca alone), register through wire::ControlClient, push the
// local configuration on index 0, then serve every stream the edge opens (data streams → origin,
// RPC streams → CloudflaredServer, anything else reset) until the connection ends or shutdown()
// unregisters and drains it.

#include "tunnel/supervisor.h"
#include "tunnel/transport.h"

#include "named/ingress.h"
#include "observe/log.h"
#include "observe/status.h"
#include "origin/origin.h"
#include "quic/config.h"
#include "quic/connection.h"
#include "wire/control.h"

#include <kj/async-unix.h>
#include <kj/timer.h>

namespace cfqt::tunnel {

struct EdgeIdentity {
  // What every registration of this process sends (§4.2). The secret is never logged.
  kj::String accountTag;
  kj::Array<kj::byte> tunnelSecret;
  kj::Array<kj::byte> tunnelId;       // 16 bytes
  kj::Array<kj::byte> connectorId;    // 16 bytes, one per process
  kj::String version;                 // --client-version, default 2026.8.2
  kj::String arch;                    // linux_amd64, ...
  kj::Array<kj::String> features = wire::defaultFeatures();
};

struct EdgeConnectionConfig {
  kj::Maybe<kj::String> edgeCaFile;   // --edge-ca/--cacert: trusted alone (no system store)
  kj::String serverName = kj::str("quic.cftunnel.com");
  quic::TransportConfig transport;    // --quic-idle-timeout, --quic-keepalive, handshake timeout
  wire::ControlClientOptions control; // callTimeout = --rpc-timeout
  kj::Duration rpcStreamTimeout = 5 * kj::SECONDS;  // edge-opened RPC sessions (HEAD)
  kj::String localConfigJson;         // updateLocalConfiguration payload (§4.4), index 0 only
  uint64_t maxConcurrentStreams = 1024;
  // --max-concurrent-streams: streams the edge may have open at once on this connection (the
  // QUIC stream limit we advertise, extended as streams end); more wait at the edge.
  kj::Duration stallTimeout = 10 * kj::SECONDS;
  // --edge-stall-timeout: a connection that has data to send but got neither acknowledgement nor
  // connection-level credit for this long is closed and replaced (the edge withholds credit).
  kj::Duration moveDrainTimeout = 30 * kj::SECONDS;
  // How long a connection leaving gracefully lets its requests finish: moving back to QUIC
  // (--protocol auto), or after the edge's HTTP/2 GOAWAY.
  kj::Duration streamPreambleTimeout = 10 * kj::SECONDS;
  // --stream-preamble-timeout: an edge-opened stream must deliver its signature and
  // ConnectRequest within this long, or it is reset.
  kj::Duration statsInterval = 500 * kj::MILLISECONDS;
  // How often a connection publishes its transport's statistics (RTT, bytes) for /metrics, also
  // published at registration and at its end. 0 = only then.
  kj::String readyToken;
  // --wait-ready (issue 16): a request carrying this value in the Cfqt-Ready-Probe header is
  // answered by the tunnel itself (200, the header echoed), never forwarded to the origin nor
  // counted in its metrics. Empty: no request is answered this way.
};

class TransportDialer {
  // Makes the connection to the edge for an attempt. Without one, EdgeConnection dials QUIC.
public:
  virtual kj::Promise<kj::Own<EdgeTransport>> dial(const edge::EdgeAddress& address) = 0;

  virtual kj::Maybe<kj::Promise<void>> whenPreferredAgain(const edge::EdgeAddress& address,
                                                          const EdgeTransport& current) {
    return nullptr;
  }
  // For a connection on a fallback transport (`auto` on HTTP/2): a promise that resolves when
  // the preferred one (QUIC) works again to `address`, with the right to move: one connection
  // at a time, until the moved one registered again (see registered()). nullptr = stay.
  virtual void registered(const edge::EdgeAddress& address, const EdgeTransport& transport) {}
  // A connection to `address` registered over `transport` (this ends a move).
  virtual void lost(const edge::EdgeAddress& address, const EdgeTransport& transport) {}
  // A connection to `address` over `transport` ended by itself after it was dialled (idle
  // timeout, the edge closed it, a fault we detected): not a shutdown, a move or a refused
  // registration. `auto` counts QUIC's to decide that QUIC keeps dying there.
};

struct EdgeContext {
  kj::Timer& timer;
  kj::UnixEventPort& eventPort;
  origin::Origin& origin;
  const observe::Logger& logger;
  observe::TunnelStatus& status;
  wire::RemoteConfigState& remoteConfig;
  const EdgeIdentity& identity;
  const EdgeConnectionConfig& config;
  kj::Maybe<TransportDialer&> dialer = nullptr;
  kj::Maybe<named::Router&> router = nullptr;
  // Named tunnels: requests go through the ingress rules (instead of `origin`).
  kj::Maybe<kj::ForkedPromise<void>&> identityReady = nullptr;
  // Quick tunnels (issue 15): the dial and handshake start while the quick-tunnel API request is
  // still out; registerConnection waits for this, after which `identity` is complete. Null: it
  // is complete already.
};

class EdgeConnectionFactory final: public SessionFactory {
public:
  explicit EdgeConnectionFactory(EdgeContext context): context(context) {}
  // Everything in `context` must outlive the factory and its sessions.

  kj::Own<Session> newSession(AttemptInfo info, SessionEvents& events) override;

private:
  EdgeContext context;
};

class AcknowledgingConfigHandler final: public wire::ConfigurationHandler {
  // Remote configuration pushed by the edge (ConfigurationManager.updateConfiguration): logged and
  // acknowledged as applied; a quick tunnel keeps serving its local origin.
public:
  explicit AcknowledgingConfigHandler(const observe::Logger& logger): logger(logger) {}
  kj::Maybe<kj::String> applyConfiguration(int32_t version,
                                           kj::ArrayPtr<const kj::byte> json) override;

private:
  const observe::Logger& logger;
};

quic::ClientConfig makeClientConfig(const EdgeConnectionConfig& config);
// The dial configuration: ALPN argotunnel, the SNI, and the trust roots (embedded Cloudflare
// roots + system store, or only --edge-ca).


}  // namespace cfqt::tunnel
