#pragma once
// How an edge connection is made: QUIC, HTTP/2 over TLS over TCP, or `auto` (QUIC first, HTTP/2
// when QUIC cannot reach the edge). The TransportDialer the runner gives every EdgeConnection.

#include "tunnel/edge-connection.h"
#include "tunnel/notifier.h"
#include "tunnel/quic-transport.h"

#include <kj/async-io.h>

#include <mutex>

namespace kj {
class TlsContext;
}

namespace cfqt::tunnel {

enum class Protocol { QUIC, HTTP2, AUTO };

kj::Maybe<Protocol> parseProtocol(kj::StringPtr text);
// "quic", "http2", "auto"; nullptr otherwise.
kj::StringPtr KJ_STRINGIFY(Protocol protocol);

struct DialerConfig {
  Protocol protocol = Protocol::QUIC;
  kj::String http2ServerName = kj::str("h2.cftunnel.com");
  // SNI and certificate name of the HTTP/2 edge (cloudflared sends no ALPN on it).
  kj::Duration fallbackAfter = 2 * kj::SECONDS;
  // auto: a QUIC handshake not done after this long (or failing) makes the attempt use HTTP/2.
  kj::Duration quicRetryInterval = 5 * kj::MINUTES;
  // auto: how long an address that needed HTTP/2 keeps using it before QUIC is tried again.
  kj::Duration tcpConnectTimeout = 10 * kj::SECONDS;
  // HTTP/2: TCP connect + TLS handshake.
  uint quicFailureLimit = 3;
  kj::Duration quicFailureWindow = 60 * kj::SECONDS;
  // auto: QUIC connections to an address that end by themselves (after their handshake: idle
  // timeout, the edge closed them, a stall) this many times within the window make the address
  // use HTTP/2 until QUIC is tried again (quicRetryInterval). 0 = never on this ground.
};

class DialerShared {
  // What the dialers of every connection (one per worker thread, --threads) know together, for
  // `auto`: the addresses using HTTP/2 for now, QUIC's recent deaths per address, and the right
  // to move back to QUIC (one connection at a time). Thread-safe (a std::mutex).
public:
  DialerShared() = default;
  KJ_DISALLOW_COPY(DialerShared);

private:
  friend class EdgeDialer;
  struct Fallback {
    kj::String address;
    kj::TimePoint until;   // CLOCK_MONOTONIC, as every loop's timer
  };
  struct QuicFailures {
    kj::String address;
    kj::Vector<kj::TimePoint> times;   // within quicFailureWindow, oldest first
  };
  std::mutex mutex;                  // guards everything below
  kj::Vector<Fallback> fallbacks;    // auto: addresses using HTTP/2 for now
  kj::Vector<QuicFailures> quicFailures;   // auto: QUIC connections that died, per address
  kj::Maybe<kj::String> moving;      // the address whose connection is moving back to QUIC
  Notifier moveReleased;             // wakes the connections waiting for the right to move
  uint64_t moveGeneration = 0;       // a grant's timeout only releases its own grant
};

class EdgeDialer final: public TransportDialer, private kj::TaskSet::ErrorHandler {
public:
  EdgeDialer(kj::UnixEventPort& eventPort, kj::Network& network, kj::Timer& timer,
             const observe::Logger& logger, const EdgeConnectionConfig& edgeConfig,
             DialerConfig config, kj::Maybe<DialerShared&> shared = nullptr);
  // Borrows everything but `config`. With `http2`, throws FAILED with a one-line reason when the
  // trust roots (--edge-ca, or the embedded Cloudflare roots) cannot be loaded; with `auto` that
  // is found (and the roots loaded) the first time an address needs HTTP/2. Dialers on several
  // threads share what `auto` learnt through `shared` (default: this dialer's own).
  ~EdgeDialer() noexcept(false);
  KJ_DISALLOW_COPY(EdgeDialer);

  kj::Promise<kj::Own<EdgeTransport>> dial(const edge::EdgeAddress& address) override;
  kj::Maybe<kj::Promise<void>> whenPreferredAgain(const edge::EdgeAddress& address,
                                                  const EdgeTransport& current) override;
  void registered(const edge::EdgeAddress& address, const EdgeTransport& transport) override;
  void lost(const edge::EdgeAddress& address, const EdgeTransport& transport) override;

private:
  kj::UnixEventPort& eventPort;
  kj::Network& network;
  kj::Timer& timer;
  const observe::Logger& logger;
  const EdgeConnectionConfig& edgeConfig;
  DialerConfig config;
  kj::Maybe<kj::Own<kj::TlsContext>> tls;
  kj::Maybe<kj::Own<DialerShared>> ownShared;
  DialerShared& shared;
  kj::TaskSet tasks;                 // last: the grants' timeouts

  kj::Promise<void> probeQuic(const edge::EdgeAddress& address);
  kj::Promise<void> acquireMove(kj::String address);
  void grantMove(kj::String address);     // with shared.mutex held
  void releaseMove();                     // with shared.mutex held
  void taskFailed(kj::Exception&& e) override;

  kj::Promise<QuicDialResult> dialQuic(const edge::EdgeAddress& address,
                                       kj::Maybe<kj::Duration> handshakeTimeout);
  kj::Promise<kj::Own<EdgeTransport>> dialQuicOnly(const edge::EdgeAddress& address);
  void useHttp2For(kj::StringPtr address);
  // Puts `address` on the fallback list until quicRetryInterval from now.
  kj::Promise<kj::Own<EdgeTransport>> dialHttp2(const edge::EdgeAddress& address);
  kj::TlsContext& tlsContext();
  // Created on first use from the roots; throws FAILED with a one-line reason if they cannot be
  // loaded.
  kj::Promise<kj::Own<EdgeTransport>> dialAuto(const edge::EdgeAddress& address);
};

}  // namespace cfqt::tunnel
