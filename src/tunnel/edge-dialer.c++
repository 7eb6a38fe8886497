#include "tunnel/edge-dialer.h"

#include "tunnel/edge-roots.h"
#include "tunnel/http2-transport.h"
#include "tunnel/quic-transport.h"

#include "origin/tls-roots.h"
#include "quic/connection.h"

#include <kj/compat/tls.h>
#include <kj/debug.h>

#include <string.h>

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

namespace {

DialerShared& pickShared(kj::Maybe<DialerShared&> given,
                         kj::Maybe<kj::Own<DialerShared>>& own) {
  KJ_IF_MAYBE(s, given) return *s;
  return *own.emplace(kj::heap<DialerShared>());
}

}  // namespace

EdgeDialer::EdgeDialer(kj::UnixEventPort& eventPort, kj::Network& network, kj::Timer& timer,
                       const observe::Logger& logger, const EdgeConnectionConfig& edgeConfig,
                       DialerConfig configParam, kj::Maybe<DialerShared&> sharedParam)
    : eventPort(eventPort), network(network), timer(timer), logger(logger),
      edgeConfig(edgeConfig), config(kj::mv(configParam)),
      shared(pickShared(sharedParam, ownShared)), tasks(*this) {
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
    case Protocol::QUIC: return dialQuicOnly(address);
    case Protocol::HTTP2: return dialHttp2(address);
    case Protocol::AUTO: return dialAuto(address);
  }
  KJ_UNREACHABLE;
}

kj::Promise<QuicDialResult> EdgeDialer::dialQuic(const edge::EdgeAddress& address,
                                                 kj::Maybe<kj::Duration> handshakeTimeout) {
  auto client = makeClientConfig(edgeConfig);
  KJ_IF_MAYBE(t, handshakeTimeout) {
    client.transport.handshakeTimeout = kj::min(client.transport.handshakeTimeout, *t);
  }
  return tryDialQuicTransport(eventPort, address, kj::mv(client));
}

kj::Promise<kj::Own<EdgeTransport>> EdgeDialer::dialQuicOnly(const edge::EdgeAddress& address) {
  // --protocol quic never falls back: a refused send fails the attempt at once (the supervisor
  // retries with backoff) with a reason that says what to change.
  return dialQuic(address, nullptr).then([port = address.port](QuicDialResult result)
                                         -> kj::Promise<kj::Own<EdgeTransport>> {
    KJ_SWITCH_ONEOF(result) {
      KJ_CASE_ONEOF(transport, kj::Own<EdgeTransport>) return kj::mv(transport);
      KJ_CASE_ONEOF(failure, QuicDialFailure) {
        if (failure.cause != QuicDialFailure::Cause::SEND_REFUSED) {
          return kj::mv(failure.exception);
        }
        return kj::Exception(failure.exception.getType(), __FILE__, __LINE__, kj::str(
            failure.exception.getDescription(), "; --protocol quic does not fall back: allow "
            "outbound UDP ", port, ", or use --protocol auto or http2"));
      }
    }
    KJ_UNREACHABLE;
  });
}

void EdgeDialer::useHttp2For(kj::StringPtr address) {
  auto until = timer.now() + config.quicRetryInterval;
  std::lock_guard<std::mutex> lock(shared.mutex);
  for (auto& f: shared.fallbacks) {
    if (f.address == address) {
      f.until = until;
      return;
    }
  }
  shared.fallbacks.add(DialerShared::Fallback{kj::str(address), until});
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
    return dialQuic(address, config.fallbackAfter).then([this, address](QuicDialResult result)
                                                         -> kj::Promise<void> {
      KJ_IF_MAYBE(transport, result.tryGet<kj::Own<EdgeTransport>>()) {
        (*transport)->close(0, "");
      } else {
        return probeQuic(address);
      }
      auto name = address.toString();
      {
        std::lock_guard<std::mutex> lock(shared.mutex);
        kj::Vector<DialerShared::Fallback> kept;
        for (auto& f: shared.fallbacks) {
          if (f.address != name) kept.add(kj::mv(f));
        }
        shared.fallbacks = kj::mv(kept);
      }
      return acquireMove(kj::mv(name));
    });
  });
}

kj::Promise<void> EdgeDialer::acquireMove(kj::String address) {
  uint64_t seen;
  {
    std::lock_guard<std::mutex> lock(shared.mutex);
    if (shared.moving == nullptr) {
      grantMove(kj::mv(address));
      return kj::READY_NOW;
    }
    seen = shared.moveReleased.generation();   // releases bump it under shared.mutex
  }
  // Woken (maybe by the dialer of another thread) when the move under way ends; the first
  // waiter to come back takes the next one.
  return shared.moveReleased.whenChangedFrom(seen)
      .then([this, address = kj::mv(address)]() mutable { return acquireMove(kj::mv(address)); });
}

void EdgeDialer::grantMove(kj::String address) {
  // Held until the moved connection registered again (or, should it never, for as long as a
  // move may take), so that the other connections carry the traffic meanwhile.
  shared.moving = kj::mv(address);
  uint64_t generation = ++shared.moveGeneration;
  tasks.add(timer.afterDelay(edgeConfig.moveDrainTimeout + config.tcpConnectTimeout +
                             edgeConfig.transport.handshakeTimeout)
      .then([this, generation]() {
    std::lock_guard<std::mutex> lock(shared.mutex);
    if (generation == shared.moveGeneration && shared.moving != nullptr) releaseMove();
  }));
}

void EdgeDialer::releaseMove() {
  shared.moving = nullptr;
  shared.moveReleased.notify();
}

void EdgeDialer::taskFailed(kj::Exception&& e) {
  logger.error("Edge dialer task failed", observe::Fields().error(e));
}

void EdgeDialer::registered(const edge::EdgeAddress& address, const EdgeTransport& transport) {
  std::lock_guard<std::mutex> lock(shared.mutex);
  KJ_IF_MAYBE(m, shared.moving) {
    if (*m == address.toString() && transport.protocol() == "quic") releaseMove();
  }
}

void EdgeDialer::lost(const edge::EdgeAddress& address, const EdgeTransport& transport) {
  // QUIC that handshakes but keeps dying (a middlebox that lets the first packets through and
  // then drops UDP, or rate-limits it) is as useless as QUIC that gets no answer: after
  // quicFailureLimit deaths within quicFailureWindow the address uses HTTP/2 until QUIC is
  // tried again, which probeQuic() does in the background.
  if (config.protocol != Protocol::AUTO || config.quicFailureLimit == 0 ||
      transport.protocol() != "quic") {
    return;
  }
  auto name = address.toString();
  auto now = timer.now();
  size_t count;
  {
    std::lock_guard<std::mutex> lock(shared.mutex);
    DialerShared::QuicFailures* entry = nullptr;
    for (auto& f: shared.quicFailures) {
      if (f.address == name) entry = &f;
    }
    if (entry == nullptr) {
      entry = &shared.quicFailures.add(DialerShared::QuicFailures{kj::str(name), {}});
    }
    kj::Vector<kj::TimePoint> recent;
    for (auto t: entry->times) {
      if (now - t <= config.quicFailureWindow) recent.add(t);
    }
    recent.add(now);
    entry->times = kj::mv(recent);
    if (entry->times.size() < config.quicFailureLimit) return;
    count = entry->times.size();
    entry->times.clear();
  }
  logger.warn(kj::str("QUIC connections to ", name, " ended ", count, " times within ",
                      formatDuration(config.quicFailureWindow), "; using HTTP/2 over TCP. UDP ",
                      address.port, " to the edge seems filtered or unreliable on this network; "
                      "QUIC is tried again in ", formatDuration(config.quicRetryInterval), "."),
              observe::Fields().add("ip", address.ipString())
                  .add("last", transport.closeDescription()));
  useHttp2For(name);
}

kj::Promise<kj::Own<EdgeTransport>> EdgeDialer::dialAuto(const edge::EdgeAddress& address) {
  auto name = address.toString();
  auto now = timer.now();
  bool useHttp2 = false;
  {
    std::lock_guard<std::mutex> lock(shared.mutex);
    for (auto& f: shared.fallbacks) {
      if (f.address == name && now < f.until) useHttp2 = true;
    }
  }
  if (useHttp2) return dialHttp2(address);
  return dialQuic(address, config.fallbackAfter)
      .then([this, address, name = kj::mv(name)](QuicDialResult result) mutable
            -> kj::Promise<kj::Own<EdgeTransport>> {
    KJ_SWITCH_ONEOF(result) {
      KJ_CASE_ONEOF(transport, kj::Own<EdgeTransport>) return kj::mv(transport);
      KJ_CASE_ONEOF(failure, QuicDialFailure) {
        observe::Fields fields;
        fields.add("ip", address.ipString()).error(failure.exception);
        switch (failure.cause) {
          case QuicDialFailure::Cause::OTHER:
            return kj::mv(failure.exception);   // QUIC answered (TLS refused...): not UDP's fault
          case QuicDialFailure::Cause::SEND_REFUSED:
            // The host itself refuses UDP to the edge: no use waiting for a handshake.
            logger.warn(kj::str("UDP to ", name, " is refused by this host (sendmsg: ",
                                strerror(failure.sendErrno), "); using HTTP/2 over TCP. Allow "
                                "outbound UDP ", address.port, " for QUIC."),
                        observe::Fields().add("errno", quic::errnoName(failure.sendErrno))
                            .addAll(kj::mv(fields)));
            break;
          case QuicDialFailure::Cause::NO_ANSWER:
          case QuicDialFailure::Cause::UDP_SOCKET:
            logger.warn(kj::str("UDP to ", name, " got no answer in ",
                                formatDuration(config.fallbackAfter), "; using HTTP/2 over TCP. "
                                "Open outbound UDP ", address.port, " for QUIC."), fields);
            break;
        }
        useHttp2For(name);
        return dialHttp2(address);
      }
    }
    KJ_UNREACHABLE;
  });
}

}  // namespace cfqt::tunnel
