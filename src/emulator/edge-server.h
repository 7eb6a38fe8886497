// The QUIC side of the emulator (PROTOCOL.md §10.3, §10.4): one quic::Endpoint per edge listen
// address, ALPN "argotunnel", the generated server certificate. On each connection the first
// client-opened stream is the control stream, served by wire::ControlServer with the Registry as
// registration policy. Each connection is a ClientConnection for the front door.

#pragma once

#include "registry.h"

#include "quic/config.h"
#include "quic/endpoint.h"

#include <kj/async-unix.h>
#include <kj/vector.h>

namespace cfqt::emulator {

struct EdgeServerOptions {
  kj::String certFile;
  kj::String keyFile;
  kj::Maybe<kj::String> tlsPriority;     // GnuTLS priority override (tests: force HRR, P-256)
  quic::TransportConfig transport;       // idle timeout, handshake timeout, windows, ...
};

class EdgeServer {
public:
  EdgeServer(kj::UnixEventPort& eventPort, Registry& registry, EdgeServerOptions options);
  // Borrows eventPort and registry.
  KJ_DISALLOW_COPY(EdgeServer);
  ~EdgeServer() noexcept(false);

  quic::SocketAddress listen(quic::SocketAddress address);
  // Binds a UDP endpoint (port 0 allowed), starts accepting on it and returns the bound address.
  // Throws on bind or certificate errors. While UDP is blocked it binds a black hole instead.

  void setUdpBlocked(bool blocked);
  // Fault injection: a firewall that drops UDP. While blocked, each listen address's QUIC
  // endpoint is replaced by a plain UDP socket bound to the same address that reads and drops
  // every datagram: handshakes get no answer, and clients of established connections (whose edge
  // side ends at once, silently) hit their idle timeout. Unblocking binds a fresh QUIC endpoint
  // on each address (connections from before the block are gone). Throws if a rebind fails.
  bool udpBlocked() const { return blocked; }

  size_t connectionCount() const;

private:
  class EdgeConnection;
  class BlackHole;
  struct Listener {
    quic::SocketAddress address;           // as bound (the real port)
    kj::Own<quic::Endpoint> endpoint;      // null while blocked
    kj::Own<BlackHole> blackHole;          // null while open
    kj::Maybe<kj::Promise<void>> accepting;   // acceptLoop(*endpoint); dropped before it
  };
  class ErrorHandler final: public kj::TaskSet::ErrorHandler {
  public:
    void taskFailed(kj::Exception&& exception) override;
  };

  kj::UnixEventPort& eventPort;
  Registry& registry;
  EdgeServerOptions options;
  kj::Vector<kj::Own<Listener>> listeners;
  bool blocked = false;
  size_t liveConnections = 0;
  ErrorHandler errorHandler;
  kj::TaskSet tasks;

  kj::Promise<void> acceptLoop(quic::Endpoint& endpoint);
  void openEndpoint(Listener& listener);
  void closeEndpoint(Listener& listener);
  kj::Promise<void> serveConnection(kj::Own<quic::Connection> connection);
};

}  // namespace cfqt::emulator
