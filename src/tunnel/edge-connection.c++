#include "tunnel/edge-connection.h"

#include "tunnel/edge-roots.h"

#include "edge/quick-tunnel-api.h"
#include "quic/endpoint.h"
#include "wire/data-stream.h"

#include <kj/debug.h>

namespace cfqt::tunnel {

namespace {

quic::TransportConfig copyTransport(const quic::TransportConfig& t) { return t; }

kj::String hexCode(uint64_t code) {
  return kj::str("0x", kj::hex(code));
}

}  // namespace

quic::ClientConfig makeClientConfig(const EdgeConnectionConfig& config) {
  quic::ClientConfig c;
  c.alpn = kj::str("argotunnel");
  c.serverName = kj::str(config.serverName);
  c.verifyCertificate = true;
  KJ_IF_MAYBE(file, config.edgeCaFile) {
    c.caFile = kj::str(*file);
    c.useSystemTrust = false;
  } else {
    c.caPem = kj::str(embeddedEdgeRootsPem());
    c.useSystemTrust = true;
  }
  c.transport = copyTransport(config.transport);
  c.transport.maxIncomingBidiStreams = kj::max(config.maxConcurrentStreams, uint64_t(1));
  return c;
}

kj::Maybe<kj::String> AcknowledgingConfigHandler::applyConfiguration(
    int32_t version, kj::ArrayPtr<const kj::byte> json) {
  logger.info("Received remote configuration from the edge; acknowledged, the local origin "
              "keeps serving", kj::str("version=", version, " bytes=", json.size()));
  return nullptr;
}

kj::String describeClose(const quic::CloseInfo& info) {
  switch (info.kind) {
    case quic::CloseKind::PEER_APPLICATION_CLOSE:
      return kj::str("edge closed the connection (application error ", hexCode(info.code),
                     ", reason \"", info.reason, "\")");
    case quic::CloseKind::PEER_TRANSPORT_CLOSE:
      return kj::str("edge closed the connection (transport error ", hexCode(info.code),
                     ", reason \"", info.reason, "\")");
    case quic::CloseKind::IDLE_TIMEOUT:
      return kj::str("timeout: no recent network activity (idle timeout)");
    case quic::CloseKind::STATELESS_RESET:
      return kj::str("edge sent a stateless reset");
    default:
      return kj::str(info.kind, ": ", info.description);
  }
}

namespace {

class EdgeConnection final: public Session, private kj::TaskSet::ErrorHandler,
                            private observe::TunnelStatus::QuicSampler {
public:
  EdgeConnection(EdgeContext& context, AttemptInfo info, SessionEvents& events)
      : ctx(context), info(kj::mv(info)), events(events), ip(this->info.address.ipString()),
        streams(*this) {}

  ~EdgeConnection() noexcept(false) { quicEnded(); }

  kj::Promise<SessionEnd> run() override {
    auto paf = kj::newPromiseAndFulfiller<SessionEnd>();
    stopFulfiller = kj::mv(paf.fulfiller);
    return lifecycle().exclusiveJoin(kj::mv(paf.promise))
        .then([this](SessionEnd end) { return finished(kj::mv(end)); });
  }

  kj::Promise<void> shutdown(kj::Duration grace) override {
    if (shutdownStarted || ended) return kj::READY_NOW;
    shutdownStarted = true;
    events.notReady(info.connIndex);
    if (!registered) {
      stop();
      return kj::READY_NOW;
    }
    auto drained = unregister().then([this]() { return waitForStreams(); });
    return ctx.timer.timeoutAfter(grace, kj::mv(drained))
        .catch_([this](kj::Exception&& e) { graceExpired(kj::mv(e)); })
        .then([this]() { stop(); });
  }

private:
  EdgeContext& ctx;
  AttemptInfo info;
  SessionEvents& events;
  kj::String ip;
  kj::Own<quic::Endpoint> endpoint;
  kj::Own<quic::Connection> connection;
  kj::Maybe<kj::ForkedPromise<void>> closed;
  kj::Maybe<quic::CloseInfo> closeInfo;
  kj::Own<quic::Stream> controlStream;
  kj::Maybe<kj::Own<wire::ControlClient>> control;
  kj::Own<kj::PromiseFulfiller<SessionEnd>> stopFulfiller;
  bool registered = false;
  bool shutdownStarted = false;
  bool ended = false;
  bool closeWhenDone = false;
  bool quicSampled = false;
  kj::Maybe<kj::Promise<void>> acceptTask;
  kj::TaskSet streams;   // in-flight edge-opened streams; last, so they die first

  kj::String closeReason() {
    KJ_IF_MAYBE(ci, closeInfo) return describeClose(*ci);
    return kj::str("connection closed");
  }

  kj::String fields() { return kj::str("connIndex=", info.connIndex, " ip=", ip); }

  // The /metrics quic_client_* series read the live connection's statistics on demand.
  observe::TunnelStatus::QuicSample sample() const override {
    observe::TunnelStatus::QuicSample out;
    if (connection.get() == nullptr) return out;
    auto s = connection->stats();
    out.smoothedRtt = s.smoothedRtt;
    out.minRtt = s.minRtt;
    out.latestRtt = s.latestRtt;
    out.congestionWindow = s.congestionWindow;
    out.bytesSent = s.bytesSent;
    out.bytesReceived = s.bytesReceived;
    out.packetsSent = s.packetsSent;
    out.packetsReceived = s.packetsReceived;
    out.ptoTotal = s.ptoTotal;
    out.streamsActive = s.streamsActive;
    return out;
  }

  void quicEnded() {
    if (!quicSampled) return;
    quicSampled = false;
    ctx.status.quicConnectionEnded(info.connIndex);
  }

  // ---------------------------------------------------------------------------------------
  // Dial and register

  kj::Promise<SessionEnd> lifecycle() {
    kj::byte storage[32];
    uint len = info.address.writeSockaddr(kj::arrayPtr(storage, sizeof(storage)));
    quic::SocketAddress remote = quic::SocketAddress::fromSockaddr(storage, len);
    auto bind = KJ_ASSERT_NONNULL(quic::SocketAddress::parse(
        remote.isIpv6() ? "[::]:0"_kj : "0.0.0.0:0"_kj));
    KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
      endpoint = quic::newEndpoint(ctx.eventPort, bind);
    })) {
      return SessionEnd{EndKind::DIAL_FAILED,
                        kj::str("cannot open a UDP socket: ", e->getDescription())};
    }
    ctx.logger.debug("Dialing edge", kj::str(fields(), " attempt=", info.numPreviousAttempts));
    return endpoint->dial(remote, makeClientConfig(ctx.config))
        .then([this](kj::Own<quic::Connection> c) { return connected(kj::mv(c)); },
              [this](kj::Exception&& e) {
                return SessionEnd{EndKind::DIAL_FAILED, kj::str(e.getDescription())};
              });
  }

  kj::Promise<SessionEnd> connected(kj::Own<quic::Connection> c) {
    connection = kj::mv(c);
    ctx.status.quicConnectionStarted(info.connIndex, *this);
    quicSampled = true;
    closed = connection->onClosed().then([this](quic::CloseInfo info) {
      closeInfo = kj::mv(info);
    }).fork();
    auto lost = KJ_ASSERT_NONNULL(closed).addBranch().then([this]() {
      return SessionEnd{EndKind::LOST, closeReason(), true, registered};
    });
    auto registration = connection->openStream()
        .then([this](kj::Own<quic::Stream> s) { return registerConnection(kj::mv(s)); })
        .then([this](wire::RegistrationResult r) { return onRegistration(kj::mv(r)); },
              [this](kj::Exception&& e) { return registrationFailed(kj::mv(e)); });
    return registration.exclusiveJoin(kj::mv(lost));
  }

  kj::Promise<wire::RegistrationResult> registerConnection(kj::Own<quic::Stream> stream) {
    controlStream = kj::mv(stream);
    auto client = kj::heap<wire::ControlClient>(*controlStream, ctx.timer, ctx.config.control);
    auto& id = ctx.identity;
    wire::RegistrationParams params;
    params.accountTag = kj::str(id.accountTag);
    params.tunnelSecret = kj::heapArray<kj::byte>(id.tunnelSecret);
    params.tunnelId = kj::heapArray<kj::byte>(id.tunnelId);
    params.connIndex = info.connIndex;
    params.clientId = kj::heapArray<kj::byte>(id.connectorId);
    params.features = KJ_MAP(f, id.features) { return kj::str(f); };
    params.version = kj::str(id.version);
    params.arch = kj::str(id.arch);
    auto ipBytes = kj::heapArray<kj::byte>(16);
    memset(ipBytes.begin(), 0, ipBytes.size());
    if (info.address.family == edge::IpFamily::V4) {
      ipBytes[10] = 0xff;
      ipBytes[11] = 0xff;
      memcpy(ipBytes.begin() + 12, info.address.ip, 4);
    } else {
      memcpy(ipBytes.begin(), info.address.ip, 16);
    }
    params.originLocalIp = kj::mv(ipBytes);
    params.numPreviousAttempts = info.numPreviousAttempts;
    if (ctx.logger.enabled(observe::LogLevel::DEBUG)) {
      // The secret is deliberately not part of this line.
      ctx.logger.debug("Registering tunnel connection", kj::str(
          fields(), " protocol=quic tunnelID=", edge::formatUuid(id.tunnelId),
          " accountTag=", id.accountTag, " connectorID=", edge::formatUuid(id.connectorId),
          " version=", id.version, " arch=", id.arch,
          " features=", kj::strArray(id.features, ","),
          " numPreviousAttempts=", info.numPreviousAttempts));
    }
    auto promise = client->registerConnection(params);
    control = kj::mv(client);
    return promise;
  }

  kj::Promise<SessionEnd> onRegistration(wire::RegistrationResult result) {
    KJ_SWITCH_ONEOF(result) {
      KJ_CASE_ONEOF(details, wire::ConnectionDetails) {
        return registeredOk(kj::mv(details));
      }
      KJ_CASE_ONEOF(error, wire::RegistrationError) {
        ctx.status.registrationFailed(error.isDuplicate());
        closeWhenDone = true;   // closed in finished(): closing here would race `lost`
        if (error.isDuplicate()) {
          return SessionEnd{EndKind::DUPLICATE,
                            kj::str("EDUPCONN: already connected to this server")};
        }
        return SessionEnd{EndKind::REJECTED, kj::mv(error.cause), error.shouldRetry};
      }
    }
    KJ_UNREACHABLE;
  }

  kj::Promise<SessionEnd> registrationFailed(kj::Exception&& e) {
    ctx.status.registrationFailed(false);
    KJ_IF_MAYBE(ci, connection->closeInfo()) {
      return SessionEnd{EndKind::LOST, describeClose(*ci)};
    }
    closeWhenDone = true;
    return SessionEnd{EndKind::REGISTRATION_FAILED, kj::str(e.getDescription())};
  }

  kj::Promise<SessionEnd> registeredOk(wire::ConnectionDetails details) {
    registered = true;
    auto uuid = edge::formatUuid(details.uuid);
    events.registered(info.connIndex, {uuid, details.locationName, ip});
    acceptTask = acceptLoop().eagerlyEvaluate([](kj::Exception&&) {
      // The connection ended; `closed` reports why.
    });
    if (info.connIndex == 0 && !details.tunnelIsRemotelyManaged) {
      streams.add(sendLocalConfiguration());
    }
    return KJ_ASSERT_NONNULL(closed).addBranch().then([this]() {
      return SessionEnd{EndKind::LOST, closeReason(), true, true};
    });
  }

  kj::Promise<void> sendLocalConfiguration() {
    auto& json = ctx.config.localConfigJson;
    ctx.logger.debug("Sending local configuration", kj::str(fields(), " config=", json));
    return KJ_ASSERT_NONNULL(control)->updateLocalConfiguration(json.asBytes())
        .then([this]() { ctx.status.localConfigPushed(true); }, [this](kj::Exception&& e) {
          ctx.status.localConfigPushed(false);
          ctx.logger.error("unable to send local configuration",
                           kj::str(fields(), " error=\"", e.getDescription(), "\""));
        });
  }

  // ---------------------------------------------------------------------------------------
  // Streams opened by the edge

  kj::Promise<void> acceptLoop() {
    return connection->acceptStream().then([this](kj::Own<quic::Stream> stream) {
      streams.add(serveStream(kj::mv(stream)));
      return acceptLoop();
    });
  }

  kj::Promise<void> serveStream(kj::Own<quic::Stream> stream) {
    auto& s = *stream;
    return wire::readStreamSignature(s)
        .then([this, &s](wire::StreamKind kind) { return serveKind(s, kind); })
        .catch_([this, &s](kj::Exception&& e) { streamFailed(s, kj::mv(e)); })
        .attach(kj::mv(stream));
  }

  kj::Promise<void> serveKind(quic::Stream& s, wire::StreamKind kind) {
    if (kind == wire::StreamKind::RPC) {
      wire::ServeRpcOptions options;
      options.timer = ctx.timer;
      options.maxDuration = ctx.config.rpcStreamTimeout;
      return wire::serveCloudflaredRpc(s, ctx.remoteConfig, kj::mv(options))
          .then([&s]() { s.shutdownWrite(); });
    }
    return wire::readConnectRequest(s).then([this, &s](kj::Own<capnp::MessageReader> message) {
      return serveData(s, kj::mv(message));
    });
  }

  kj::Promise<void> serveData(quic::Stream& s, kj::Own<capnp::MessageReader> message) {
    auto request = message->getRoot<wire::schema::ConnectRequest>();
    // total/concurrent requests are counted here, per data stream; the origin counts the
    // response codes and the failed requests (request_errors).
    ctx.status.requestStarted();
    return ctx.origin.serveStream(s, request)
        .then([this]() { ctx.status.requestFinished(); },
              [this, &s](kj::Exception&& e) {
                ctx.status.requestFinished();
                s.reset(0);
                ctx.logger.debug("request failed after the response head",
                                 kj::str(fields(), " stream=", s.id(), " error=\"",
                                         e.getDescription(), "\""));
              })
        .attach(kj::mv(message));
  }

  void streamFailed(quic::Stream& s, kj::Exception&& e) {
    // Unknown signature, undecodable preamble, or the edge reset the stream: only this stream
    // dies (dropping it resets both directions).
    ctx.logger.debug("edge stream failed",
                     kj::str(fields(), " stream=", s.id(), " error=\"", e.getDescription(), "\""));
  }

  void taskFailed(kj::Exception&& e) override {
    ctx.logger.debug("stream task failed", kj::str(fields(), " error=\"", e.getDescription(), "\""));
  }

  // ---------------------------------------------------------------------------------------
  // Shutdown

  kj::Promise<void> unregister() {
    KJ_IF_MAYBE(c, control) {
      return (*c)->unregisterConnection().then([this]() {
        ctx.logger.info("Unregistered tunnel connection", fields());
      }, [this](kj::Exception&& e) {
        ctx.logger.warn("Failed to unregister tunnel connection",
                        kj::str(fields(), " error=\"", e.getDescription(), "\""));
      });
    }
    return kj::READY_NOW;
  }

  kj::Promise<void> waitForStreams() {
    if (streams.isEmpty()) return kj::READY_NOW;
    return streams.onEmpty();
  }

  void graceExpired(kj::Exception&& e) {
    ctx.logger.warn("Grace period expired with requests still in flight; closing", fields());
  }

  void stop() {
    if (connection.get() != nullptr) connection->close(0, "");
    stopFulfiller->fulfill(SessionEnd{EndKind::SHUTDOWN, kj::str("shutdown"), true, registered});
  }

  SessionEnd finished(SessionEnd end) {
    ended = true;
    quicEnded();
    if (shutdownStarted && end.kind == EndKind::LOST) {
      // Our own close() may win the race against stop()'s fulfiller.
      end.kind = EndKind::SHUTDOWN;
      end.wasRegistered = registered;
    }
    if (closeWhenDone && connection.get() != nullptr) connection->close(0, "");
    if (end.kind == EndKind::LOST && connection.get() != nullptr) {
      KJ_IF_MAYBE(ci, connection->closeInfo()) {
        if (ci->kind == quic::CloseKind::PEER_APPLICATION_CLOSE ||
            ci->kind == quic::CloseKind::PEER_TRANSPORT_CLOSE) {
          ctx.logger.info("Edge closed the connection",
                          kj::str(fields(), " code=", hexCode(ci->code), " reason=\"",
                                  ci->reason, "\""));
        }
      }
    }
    return kj::mv(end);
  }
};

}  // namespace

kj::Own<Session> EdgeConnectionFactory::newSession(AttemptInfo info, SessionEvents& events) {
  return kj::heap<EdgeConnection>(context, kj::mv(info), events);
}

}  // namespace cfqt::tunnel
