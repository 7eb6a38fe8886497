#include "tunnel/edge-dialer.h"

#include "tunnel/edge-roots.h"
#include "tunnel/http2-transport.h"
#include "tunnel/quic-transport.h"

#include "origin/tls-roots.h"
#include "quic/connection.h"

#include <kj/compat/tls.h>
#include <kj/debug.h>

namespace cfqt::tunnel {

kj::Maybe<Protocol> parseProtocol(kj::StringPtr text) {
  if (text == "quic") return Protocol::QUIC;
  if (text == "http2") return Protocol::HTTP2;
  if (text == "auto") return Protocol::AUTO;
  return nullptr;
}

kj::StringPtr KJ_STRINGIFY(Protocol protocol) {
  switch (protocol) {
    case Protocol::QUIC: return "quic";
    case Protocol::HTTP2: return "http2";
    case Protocol::AUTO: return "auto";
  }
  return "?";
}

EdgeDialer::EdgeDialer(kj::UnixEventPort& eventPort, kj::Network& network, kj::Timer& timer,
                       const observe::Logger& logger, const EdgeConnectionConfig& edgeConfig,
                       DialerConfig configParam)
    : eventPort(eventPort), network(network), timer(timer), logger(logger),
      edgeConfig(edgeConfig), config(kj::mv(configParam)), tasks(*this) {
  // http2 needs its TLS context at once (and fails fast); auto sets it up the first time an
  // address needs HTTP/2, so that the common case (QUIC works) pays nothing at start-up.
  if (config.protocol == Protocol::HTTP2) tlsContext();
}

kj::TlsContext& EdgeDialer::tlsContext() {
  KJ_IF_MAYBE(t, tls) return **t;
  // The same roots as QUIC: --edge-ca alone, or the embedded Cloudflare roots plus the system's.
  kj::Array<kj::TlsCertificate> roots;
  kj::OneOf<kj::Array<kj::TlsCertificate>, kj::String> loaded;
  bool system = true;
  KJ_IF_MAYBE(file, edgeConfig.edgeCaFile) {
    loaded = origin::loadPemCertificates(*file, "--edge-ca");
    system = false;
  } else {
    loaded = origin::parsePemCertificates(embeddedEdgeRootsPem(), "embedded Cloudflare roots");
  }
  KJ_SWITCH_ONEOF(loaded) {
    KJ_CASE_ONEOF(error, kj::String) {
      kj::throwFatalException(kj::Exception(kj::Exception::Type::FAILED, __FILE__, __LINE__,
                                            kj::mv(error)));
    }
    KJ_CASE_ONEOF(certificates, kj::Array<kj::TlsCertificate>) roots = kj::mv(certificates);
  }
  kj::TlsContext::Options options;
  options.useSystemTrustStore = system;
  options.trustedCertificates = roots;
  return *tls.emplace(kj::heap<kj::TlsContext>(kj::mv(options)));
}

EdgeDialer::~EdgeDialer() noexcept(false) {}

kj::Promise<kj::Own<EdgeTransport>> EdgeDialer::dial(const edge::EdgeAddress& address) {
  switch (config.protocol) {
    case Protocol::QUIC: return dialQuic(address, nullptr);
    case Protocol::HTTP2: return dialHttp2(address);
    case Protocol::AUTO: return dialAuto(address);
  }
  KJ_UNREACHABLE;
}

kj::Promise<kj::Own<EdgeTransport>> EdgeDialer::dialQuic(const edge::EdgeAddress& address,
                                                         kj::Maybe<kj::Duration> handshakeTimeout) {
  auto client = makeClientConfig(edgeConfig);
  KJ_IF_MAYBE(t, handshakeTimeout) {
    client.transport.handshakeTimeout = kj::min(client.transport.handshakeTimeout, *t);
  }
  return dialQuicTransport(eventPort, address, kj::mv(client));
}

kj::Promise<kj::Own<EdgeTransport>> EdgeDialer::dialHttp2(const edge::EdgeAddress& address) {
  http2::SessionConfig session;
  // The edge's silence is found by PINGs as QUIC finds it by its idle timeout.
  session.pingInterval = edgeConfig.transport.keepAlivePeriod > 0 * kj::SECONDS
      ? edgeConfig.transport.keepAlivePeriod : 1 * kj::SECONDS;
  session.pingTimeout = edgeConfig.transport.maxIdleTimeout;
  session.maxConcurrentStreams = kj::min(edgeConfig.maxConcurrentStreams, uint64_t(0x7fffffff));
  // The edge resets a stream for every visitor that leaves: under load that is thousands per
  // second, which nghttp2's Internet-facing default (33/s) would take for an attack.
  session.resetBurst = 100000;
  session.resetRate = 100000;
  return kj::evalNow([&]() {
    return dialHttp2Transport(network, tlsContext(), timer, address.toString(),
                              config.http2ServerName, config.tcpConnectTimeout, kj::mv(session));
  }).catch_([address = address.toString()](kj::Exception&& e)
              -> kj::Promise<kj::Own<EdgeTransport>> {
    return kj::Exception(e.getType(), __FILE__, __LINE__, kj::str(
        "HTTP/2 (TCP + TLS) to ", address, " failed: ", e.getDescription()));
  });
}

kj::Maybe<kj::Promise<void>> EdgeDialer::whenPreferredAgain(const edge::EdgeAddress& address,
                                                            const EdgeTransport& current) {
  if (config.protocol != Protocol::AUTO || current.protocol() != "http2") return nullptr;
  return probeQuic(address);
}

kj::Promise<void> EdgeDialer::probeQuic(const edge::EdgeAddress& address) {
  // Every retry interval, one QUIC handshake to the address (closed at once). Once one
  // succeeds, the address is taken off the fallback list, so that the next dial uses QUIC.
  return timer.afterDelay(config.quicRetryInterval).then([this, address]() {
    return dialQuic(address, config.fallbackAfter).then([this, address](kj::Own<EdgeTransport> t)
                                                         -> kj::Promise<void> {
      t->close(0, "");
      auto name = address.toString();
      kj::Vector<Fallback> kept;
      for (auto& f: fallbacks) {
        if (f.address != name) kept.add(kj::mv(f));
      }
      fallbacks = kj::mv(kept);
      return acquireMove(kj::mv(name));
    }, [this, address](kj::Exception&&) { return probeQuic(address); });
  });
}

kj::Promise<void> EdgeDialer::acquireMove(kj::String address) {
  if (moving == nullptr) {
    grantMove(kj::mv(address));
    return kj::READY_NOW;
  }
  auto paf = kj::newPromiseAndFulfiller<void>();
  moveQueue.push_back(MoveWaiter{kj::mv(address), kj::mv(paf.fulfiller)});
  return kj::mv(paf.promise);
}

void EdgeDialer::grantMove(kj::String address) {
  // Held until the moved connection registered again (or, should it never, for as long as a
  // move may take), so that the other connections carry the traffic meanwhile.
  moving = kj::mv(address);
  uint64_t generation = ++moveGeneration;
  tasks.add(timer.afterDelay(edgeConfig.moveDrainTimeout + config.tcpConnectTimeout +
                             edgeConfig.transport.handshakeTimeout)
      .then([this, generation]() {
    if (generation == moveGeneration && moving != nullptr) releaseMove();
  }));
}

void EdgeDialer::releaseMove() {
  moving = nullptr;
  while (!moveQueue.empty()) {
    auto next = kj::mv(moveQueue.front());
    moveQueue.pop_front();
    if (next.fulfiller->isWaiting()) {
      auto address = kj::mv(next.address);
      next.fulfiller->fulfill();
      grantMove(kj::mv(address));
      return;
    }
  }
}

void EdgeDialer::taskFailed(kj::Exception&& e) {
  logger.error("Edge dialer task failed", observe::Fields().error(e));
}

void EdgeDialer::registered(const edge::EdgeAddress& address, const EdgeTransport& transport) {
  KJ_IF_MAYBE(m, moving) {
    if (*m == address.toString() && transport.protocol() == "quic") releaseMove();
  }
}

kj::Promise<kj::Own<EdgeTransport>> EdgeDialer::dialAuto(const edge::EdgeAddress& address) {
  auto name = address.toString();
  auto now = timer.now();
  for (auto& f: fallbacks) {
    if (f.address == name && now < f.until) return dialHttp2(address);
  }
  return dialQuic(address, config.fallbackAfter)
      .catch_([this, address, name = kj::mv(name)](kj::Exception&& e) mutable
              -> kj::Promise<kj::Own<EdgeTransport>> {
    auto kind = quic::classifyException(e);
    bool unreachable = kind == quic::CloseKind::HANDSHAKE_TIMEOUT ||
        e.getDescription().startsWith("cannot open a UDP socket");
    if (!unreachable) return kj::mv(e);   // QUIC answered (e.g. TLS refused): not a UDP problem
    logger.warn(kj::str("UDP to ", name, " got no answer in ", formatDuration(config.fallbackAfter),
                        "; using HTTP/2 over TCP. Open outbound UDP ", address.port,
                        " for QUIC."),
                observe::Fields().add("ip", address.ipString()).error(e));
    bool known = false;
    for (auto& f: fallbacks) {
      if (f.address == name) {
        f.until = timer.now() + config.quicRetryInterval;
        known = true;
      }
    }
    if (!known) fallbacks.add(Fallback{kj::mv(name), timer.now() + config.quicRetryInterval});
    return dialHttp2(address);
  });
}

}  // namespace cfqt::tunnel
