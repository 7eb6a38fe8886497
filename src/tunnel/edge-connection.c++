#include "tunnel/edge-connection.h"

#include "tunnel/edge-roots.h"
#include "tunnel/ready-probe.h"
#include "tunnel/quic-transport.h"

#include "edge/quick-tunnel-api.h"

#include <capnp/compat/json.h>
#include <capnp/message.h>
#include <kj/debug.h>

#include <strings.h>

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
              "keeps serving", observe::Fields().add("version", version).add("bytes", json.size()));
  return nullptr;
}

namespace {

class EdgeConnection final: public Session, private kj::TaskSet::ErrorHandler {
public:
  EdgeConnection(EdgeContext& context, AttemptInfo info, SessionEvents& events)
      : ctx(context), info(kj::mv(info)), events(events), ip(this->info.address.ipString()),
        stats(ctx.status.shard(this->info.connIndex)), streams(*this) {}

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
    return drain(grace).then([this]() { stop(); });
  }

private:
  EdgeContext& ctx;
  AttemptInfo info;
  SessionEvents& events;
  kj::String ip;
  observe::TunnelStatus::Shard& stats;   // this index's counters: this thread is their writer
  kj::Own<EdgeTransport> transport;
  kj::Maybe<kj::ForkedPromise<void>> closed;
  kj::Own<kj::AsyncIoStream> controlStream;
  kj::Maybe<kj::Own<wire::ControlClient>> control;
  kj::Own<kj::PromiseFulfiller<SessionEnd>> stopFulfiller;
  bool registered = false;
  bool shutdownStarted = false;
  bool moving = false;     // shutting down to move back to QUIC (the supervisor reconnects)
  bool ended = false;
  bool closeWhenDone = false;
  bool quicSampled = false;
  kj::Maybe<kj::String> faultReason;   // why we closed a registered connection ourselves
  kj::Maybe<kj::Promise<void>> acceptTask;
  kj::Maybe<kj::Promise<void>> controlWatch;
  kj::Maybe<kj::Promise<void>> stallWatch;
  kj::Maybe<kj::Promise<void>> moveWatch;
  kj::Maybe<kj::Promise<void>> moveTask;
  kj::Maybe<kj::Promise<void>> goAwayWatch;
  kj::Maybe<kj::Promise<void>> leaveTask;
  kj::Maybe<kj::Promise<void>> sampleTask;
  kj::TaskSet streams;   // in-flight edge-opened streams; last, so they die first

  kj::String closeReason() {
    KJ_IF_MAYBE(reason, faultReason) return kj::str(*reason);
    if (transport.get() != nullptr && transport->isClosed()) return transport->closeDescription();
    return kj::str("connection closed");
  }

  observe::Fields fields() {
    return kj::mv(observe::Fields().add("connIndex", info.connIndex).add("ip", ip));
  }

  // The /metrics quic_client_* series: this connection publishes its statistics (the metrics
  // server may run on another thread, and ngtcp2 is not thread-safe).
  void publishSample() {
    if (quicSampled) ctx.status.quicSampled(info.connIndex, transport->sample());
  }

  kj::Promise<void> sampleLoop() {
    return ctx.timer.afterDelay(ctx.config.statsInterval).then([this]() {
      publishSample();
      return sampleLoop();
    });
  }

  void quicEnded() {
    if (!quicSampled) return;
    quicSampled = false;
    sampleTask = nullptr;
    ctx.status.quicConnectionEnded(info.connIndex, transport->sample());
  }

  // ---------------------------------------------------------------------------------------
  // Dial and register

  kj::Promise<SessionEnd> lifecycle() {
    ctx.logger.debug("Dialing edge", fields().add("attempt", info.numPreviousAttempts));
    kj::Promise<kj::Own<EdgeTransport>> dialing = nullptr;
    KJ_IF_MAYBE(dialer, ctx.dialer) {
      dialing = dialer->dial(info.address);
    } else {
      dialing = dialQuicTransport(ctx.eventPort, info.address, makeClientConfig(ctx.config));
    }
    return dialing.then([this](kj::Own<EdgeTransport> t) { return connected(kj::mv(t)); },
              [this](kj::Exception&& e) {
                return SessionEnd{EndKind::DIAL_FAILED, kj::str(e.getDescription())};
              });
  }

  kj::Promise<SessionEnd> connected(kj::Own<EdgeTransport> t) {
    transport = kj::mv(t);
    ctx.status.quicConnectionStarted(info.connIndex);
    quicSampled = true;
    publishSample();
    if (ctx.config.statsInterval > 0 * kj::SECONDS) {
      sampleTask = sampleLoop().eagerlyEvaluate(nullptr);
    }
    closed = transport->onClosed().fork();
    auto lost = KJ_ASSERT_NONNULL(closed).addBranch().then([this]() {
      return SessionEnd{EndKind::LOST, closeReason(), true, registered};
    });
    kj::Promise<void> identityReady = kj::READY_NOW;
    KJ_IF_MAYBE(ready, ctx.identityReady) identityReady = ready->addBranch();
    auto registration = identityReady
        .then([this]() { return transport->openControlStream(); })
        .then([this](kj::Own<kj::AsyncIoStream> s) { return registerConnection(kj::mv(s)); })
        .then([this](wire::RegistrationResult r) { return onRegistration(kj::mv(r)); },
              [this](kj::Exception&& e) { return registrationFailed(kj::mv(e)); });
    return registration.exclusiveJoin(kj::mv(lost));
  }

  kj::Promise<wire::RegistrationResult> registerConnection(kj::Own<kj::AsyncIoStream> stream) {
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
      ctx.logger.debug("Registering tunnel connection", fields()
          .add("protocol", transport->protocol()).add("tunnelID", edge::formatUuid(id.tunnelId))
          .add("accountTag", id.accountTag).add("connectorID", edge::formatUuid(id.connectorId))
          .add("version", id.version).add("arch", id.arch)
          .add("features", kj::strArray(id.features, ","))
          .add("numPreviousAttempts", info.numPreviousAttempts));
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
        stats.registrationFailed(error.isDuplicate());
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
    stats.registrationFailed(false);
    if (transport->isClosed()) return SessionEnd{EndKind::LOST, transport->closeDescription()};
    closeWhenDone = true;
    return SessionEnd{EndKind::REGISTRATION_FAILED, kj::str(e.getDescription())};
  }

  kj::Promise<SessionEnd> registeredOk(wire::ConnectionDetails details) {
    registered = true;
    publishSample();
    auto uuid = edge::formatUuid(details.uuid);
    events.registered(info.connIndex, {uuid, details.locationName, ip, transport->protocol()});
    KJ_IF_MAYBE(dialer, ctx.dialer) dialer->registered(info.address, *transport);
    acceptTask = acceptLoop().eagerlyEvaluate([this](kj::Exception&& e) {
      // Normally the connection ended (`closed` reports why); anything else leaves a registered
      // connection that serves nothing, so it ends too.
      if (!transport->isClosed()) {
        fault(kj::str("accepting streams from the edge failed: ", e.getDescription()));
      }
    });
    controlWatch = KJ_ASSERT_NONNULL(control)->onDisconnect().then([this]() {
      // cloudflared tears the connection down when its control stream's RPC session ends: the
      // edge would route requests to a connection it no longer has a session for.
      if (!shutdownStarted) fault(kj::str("the control stream to the edge ended"));
    }).eagerlyEvaluate(nullptr);
    if (ctx.config.stallTimeout > 0 * kj::SECONDS) stallWatch = watchProgress();
    goAwayWatch = transport->whenPeerGoingAway().then([this]() { edgeGoingAway(); })
        .eagerlyEvaluate(nullptr);
    KJ_IF_MAYBE(dialer, ctx.dialer) {
      KJ_IF_MAYBE(preferred, dialer->whenPreferredAgain(info.address, *transport)) {
        moveWatch = preferred->then([this]() { moveBack(); }).eagerlyEvaluate(nullptr);
      }
    }
    if (info.connIndex == 0 && !details.tunnelIsRemotelyManaged) {
      streams.add(sendLocalConfiguration());
    }
    return KJ_ASSERT_NONNULL(closed).addBranch().then([this]() {
      return SessionEnd{EndKind::LOST, closeReason(), true, true};
    });
  }

  void fault(kj::String reason) {
    // Ends a registered connection that cannot serve any more: logged, closed (the supervisor
    // sees LOST with this reason and reconnects).
    if (faultReason != nullptr || transport->isClosed()) return;
    ctx.logger.warn("Closing the edge connection: it cannot serve any more",
                    fields().add("reason", reason));
    faultReason = kj::mv(reason);
    events.notReady(info.connIndex);
    transport->close(0, "cfqt: connection fault");
  }

  kj::Promise<void> watchProgress() {
    // Checks a few times per bound whether stream data waits for connection-level credit that
    // never comes: the edge withholds it (or is broken), and every request on this connection
    // would hang. Replacing the connection is the only cure.
    auto bound = ctx.config.stallTimeout;
    auto interval = kj::max(bound / 4, 1 * kj::MILLISECONDS);
    return ctx.timer.afterDelay(interval).then([this, bound]() -> kj::Promise<void> {
      auto blocked = transport->blockedFor();
      if (blocked >= bound) {
        fault(kj::str("no flow-control credit from the edge for ", formatDuration(blocked),
                      " (--edge-stall-timeout ", formatDuration(bound), ")"));
        return kj::READY_NOW;
      }
      return watchProgress();
    });
  }

  kj::Promise<void> sendLocalConfiguration() {
    auto& json = ctx.config.localConfigJson;
    ctx.logger.debug("Sending local configuration", fields().add("config", json));
    return KJ_ASSERT_NONNULL(control)->updateLocalConfiguration(json.asBytes())
        .then([this]() { stats.localConfigPushed(true); }, [this](kj::Exception&& e) {
          stats.localConfigPushed(false);
          ctx.logger.error("Unable to send the local configuration", fields().error(e));
        });
  }

  // ---------------------------------------------------------------------------------------
  // Streams opened by the edge

  kj::Promise<void> acceptLoop() {
    return transport->acceptStream().then([this](kj::Own<EdgeStream> stream) {
      streams.add(serveStream(kj::mv(stream)));
      return acceptLoop();
    });
  }

  template <typename T>
  kj::Promise<T> beforeDeadline(kj::TimePoint deadline, kj::Promise<T> promise) {
    // The edge must send a stream's request promptly: a stream that stays silent would hold its
    // slot (and our memory) for ever.
    auto timeout = ctx.timer.atTime(deadline).then([this]() -> kj::Promise<T> {
      return kj::Exception(kj::Exception::Type::OVERLOADED, __FILE__, __LINE__, kj::str(
          "edge stream sent no complete request within --stream-preamble-timeout ",
          formatDuration(ctx.config.streamPreambleTimeout)));
    });
    return promise.exclusiveJoin(kj::mv(timeout));
  }

  static kj::Promise<void> discardInput(kj::AsyncInputStream& in, uint64_t limit,
                                       kj::Array<kj::byte> buffer) {
    // Reads and drops up to `limit` bytes, until EOF.
    if (limit == 0) return kj::READY_NOW;
    auto read = in.tryRead(buffer.begin(), 1, kj::min(uint64_t(buffer.size()), limit));
    return read.then([&in, limit, buffer = kj::mv(buffer)](size_t n) mutable -> kj::Promise<void> {
      if (n == 0) return kj::READY_NOW;
      return discardInput(in, limit - n, kj::mv(buffer));
    });
  }

  kj::Promise<void> serveStream(kj::Own<EdgeStream> stream) {
    auto& s = *stream;
    auto deadline = ctx.timer.now() + ctx.config.streamPreambleTimeout;
    return beforeDeadline(deadline, s.readRequest())
        .then([this, &s, deadline](EdgeStream::Request request) {
      return serveRequest(s, kj::mv(request), deadline);
    }).catch_([this, &s](kj::Exception&& e) { streamFailed(s, kj::mv(e)); })
        .attach(kj::mv(stream));
  }

  kj::Promise<void> serveRequest(EdgeStream& s, EdgeStream::Request request,
                                 kj::TimePoint deadline) {
    KJ_SWITCH_ONEOF(request) {
      KJ_CASE_ONEOF(proxy, ProxyRequest) return serveData(s, kj::mv(proxy));
      KJ_CASE_ONEOF(rpc, RpcSession) {
        wire::ServeRpcOptions options;
        options.timer = ctx.timer;
        options.maxDuration = ctx.config.rpcStreamTimeout;
        return wire::serveCloudflaredRpc(s.io(), ctx.remoteConfig, kj::mv(options))
            .then([&s]() { s.io().shutdownWrite(); });
      }
      KJ_CASE_ONEOF(refused, RefusedRequest) return refuse(s, kj::mv(refused.reason), deadline);
      KJ_CASE_ONEOF(configuration, ConfigurationRequest) return updateConfiguration(s);
    }
    KJ_UNREACHABLE;
  }

  kj::Promise<void> updateConfiguration(EdgeStream& s) {
    // HTTP/2's update-configuration request: {"version":N,"config":{...}} in, the
    // UpdateConfigurationResponse as JSON out (QUIC carries the same call as capnp RPC).
    return s.io().readAllBytes(1024 * 1024).then([this, &s](kj::Array<kj::byte> body) {
      int32_t version = 0;
      kj::String config;
      kj::String error;
      KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
        capnp::JsonCodec codec;
        capnp::MallocMessageBuilder message;
        auto root = message.initRoot<capnp::JsonValue>();
        codec.decodeRaw(body.asChars(), root);
        if (!root.isObject()) {
          kj::throwFatalException(KJ_EXCEPTION(FAILED, "the body is not a JSON object"));
        }
        for (auto field: root.getObject()) {
          if (field.getName() == "version" && field.getValue().isNumber()) {
            // Untrusted: only a whole number in range converts (a float->int cast of anything
            // else is undefined).
            double number = field.getValue().getNumber();
            if (!(number >= INT32_MIN && number <= INT32_MAX &&
                  number == static_cast<double>(static_cast<int64_t>(number)))) {
              kj::throwFatalException(KJ_EXCEPTION(FAILED, "version is not a 32-bit integer"));
            }
            version = static_cast<int32_t>(number);
          } else if (field.getName() == "config") {
            config = codec.encodeRaw(field.getValue());
          }
        }
      })) {
        error = kj::str("invalid update-configuration body: ", e->getDescription());
      }
      int32_t applied = ctx.remoteConfig.currentVersion();
      if (error.size() == 0) {
        auto result = ctx.remoteConfig.update(version, config.asBytes());
        applied = result.latestAppliedVersion;
        error = kj::mv(result.err);
      }
      auto json = kj::str("{\"lastAppliedVersion\":", applied, ",\"err\":",
                          error.size() == 0 ? kj::str("null") : jsonQuote(error), "}");
      wire::Header type{kj::str("Content-Type"), kj::str("application/json")};
      return s.sink().sendHead(200, kj::arrayPtr(&type, 1)).then([&s, json = kj::mv(json)]() mutable {
        return s.io().write(json.begin(), json.size()).attach(kj::mv(json));
      }).then([&s]() { s.io().shutdownWrite(); });
    });
  }

  static kj::String jsonQuote(kj::StringPtr text) {
    capnp::JsonCodec codec;
    capnp::MallocMessageBuilder message;
    auto value = message.initRoot<capnp::JsonValue>();
    value.setString(text);
    return codec.encodeRaw(value);
  }

  kj::Promise<void> refuse(EdgeStream& s, kj::String reason, kj::TimePoint deadline) {
    // A request we refuse to decode: the edge (and the visitor) get a clear 502 instead of a
    // reset stream.
    stats.requestStarted();
    stats.requestFailed();
    stats.requestFinished();
    ctx.logger.warn("Refused a request from the edge: its metadata is over cfqt's limits or "
                    "malformed", fields().add("stream", s.id()).add("error", reason));
    auto text = kj::str("malformed request: ", reason);
    return s.sink().sendError(text).attach(kj::mv(text)).then([this, &s, deadline]() {
      s.io().shutdownWrite();
      // Let the edge finish writing what we refused (bounded, up to the preamble deadline)
      // before STOP_SENDING, so that it reads our answer rather than a failed write.
      return beforeDeadline(deadline,
                            discardInput(s.io(), 1024 * 1024, kj::heapArray<kj::byte>(16384)))
          .catch_([](kj::Exception&&) {})
          .then([&s]() { s.io().abortRead(); });
    });
  }

  bool isReadyProbe(const ProxyRequest& request) {
    // The --wait-ready probe of this very process (READY_PROBE_HEADER with our token).
    if (ctx.config.readyToken.size() == 0) return false;
    KJ_IF_MAYBE(head, request.head.tryGet<wire::HttpRequestHead>()) {
      for (auto& h: head->headers) {
        if (h.value == ctx.config.readyToken && h.name.size() == READY_PROBE_HEADER.size() &&
            strncasecmp(h.name.cStr(), READY_PROBE_HEADER.cStr(), h.name.size()) == 0) {
          return true;
        }
      }
    }
    return false;
  }

  kj::Promise<void> answerReadyProbe(EdgeStream& s) {
    static constexpr kj::StringPtr BODY = "cfqt: this tunnel serves\n"_kj;
    wire::Header headers[] = {
        {kj::str(READY_PROBE_HEADER), kj::str(ctx.config.readyToken)},
        {kj::str("Content-Type"), kj::str("text/plain")},
        {kj::str("Cache-Control"), kj::str("no-store")},
        {kj::str("Content-Length"), kj::str(BODY.size())}};
    ctx.logger.debug("Answered the readiness probe", fields().add("stream", s.id()));
    return s.sink().sendHead(200, headers).then([&s]() {
      return s.io().write(BODY.begin(), BODY.size());
    }).then([&s]() { s.io().shutdownWrite(); });
  }

  kj::Promise<void> serveData(EdgeStream& s, ProxyRequest request) {
    if (isReadyProbe(request)) return answerReadyProbe(s);
    // total/concurrent requests are counted here, per data stream; the origin counts the
    // response codes and the failed requests (request_errors).
    stats.requestStarted();
    // The edge abandons a stream when its visitor goes away (RESET_STREAM/STOP_SENDING): the
    // exchange is then cancelled at once, which closes its origin connection and frees its
    // buffers, even while it waits on a silent origin (an SSE stream between events).
    auto counted = kj::heap<bool>(false);   // requestFinished() once, whichever side ends it
    bool& done = *counted;
    auto abandoned = s.whenAborted().then([this, &s, &done]() {
      if (done) return;
      done = true;
      stats.requestFinished();
      stats.requestCancelled();
      ctx.logger.debug("Edge abandoned the request; origin exchange cancelled",
                       fields().add("stream", s.id()));
    });
    kj::Promise<void> served = nullptr;
    KJ_IF_MAYBE(router, ctx.router) {
      served = router->serve(s.io(), kj::mv(request.head), s.sink());
    } else {
      served = ctx.origin.serve(s.io(), kj::mv(request.head), s.sink());
    }
    return served
        .then([this, &done]() {
                if (!done) stats.requestFinished();
                done = true;
              },
              [this, &s, &done](kj::Exception&& e) {
                if (!done) stats.requestFinished();
                done = true;
                s.reset();
                ctx.logger.debug("Request failed after the response head",
                                 fields().add("stream", s.id()).error(e));
              })
        .exclusiveJoin(kj::mv(abandoned))
        .attach(kj::mv(counted));
  }

  void streamFailed(EdgeStream& s, kj::Exception&& e) {
    // Only this stream dies (dropping it resets both directions). The edge resetting a stream
    // is normal; anything else is worth a warning (rate-limited by the logger).
    auto streamFields = fields();
    streamFields.add("stream", s.id()).error(e);
    if (e.getType() == kj::Exception::Type::DISCONNECTED) {
      ctx.logger.debug("Edge stream ended before its request was served", streamFields);
    } else {
      ctx.logger.warn("Edge stream failed; reset it", streamFields);
    }
  }

  void taskFailed(kj::Exception&& e) override {
    // serveStream() catches everything: reaching this is a bug.
    ctx.logger.error("Edge stream task failed unexpectedly", fields().error(e));
  }

  // ---------------------------------------------------------------------------------------
  // Shutdown

  kj::Promise<void> unregister() {
    KJ_IF_MAYBE(c, control) {
      return (*c)->unregisterConnection().then([this]() {
        ctx.logger.info("Unregistered tunnel connection", fields());
      }, [this](kj::Exception&& e) {
        ctx.logger.warn("Failed to unregister tunnel connection", fields().error(e));
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

  void edgeGoingAway() {
    // The edge announced it is going away (HTTP/2 GOAWAY) but keeps the connection open: no
    // new request comes here. Let the requests in flight finish (up to --move-drain-timeout's
    // bound), then close our side; the supervisor reconnects (LOST). Without this, the
    // connection would linger until the edge closes TCP or the PING timeout fires.
    if (shutdownStarted || ended || faultReason != nullptr || transport->isClosed()) return;
    auto why = transport->peerClose().map([](const PeerClose& p) {
      return kj::str("edge closed the connection (HTTP/2 GOAWAY 0x", kj::hex(p.code), " \"",
                     p.reason, "\")");
    }).orDefault(kj::str("edge closed the connection (HTTP/2 GOAWAY)"));
    ctx.logger.info("The edge is going away; finishing the requests in flight, then "
                    "reconnecting", fields().add("reason", why.asPtr()));
    faultReason = kj::mv(why);
    events.notReady(info.connIndex);
    leaveTask = ctx.timer.timeoutAfter(ctx.config.moveDrainTimeout, waitForStreams())
        .catch_([this](kj::Exception&& e) { graceExpired(kj::mv(e)); })
        .then([this]() { transport->close(0, "the edge is going away"); })
        .eagerlyEvaluate(nullptr);
  }

  void moveBack() {
    // QUIC works again to this address: leave the fallback transport the graceful way
    // (unregister, so the edge routes new requests to the other connections; drain; close) and
    // let the supervisor reconnect, which now dials QUIC. One connection moves at a time.
    if (shutdownStarted || ended) return;
    ctx.logger.info(kj::str("QUIC works again to ", info.address.toString(),
                            "; moving the connection back from ", transport->protocol()),
                    fields());
    shutdownStarted = true;
    moving = true;
    events.notReady(info.connIndex);
    moveTask = drain(ctx.config.moveDrainTimeout).then([this]() {
      transport->close(0, "");
      stopFulfiller->fulfill(SessionEnd{EndKind::MOVED, kj::str("QUIC works again"), true,
                                        true});
    }).eagerlyEvaluate(nullptr);
  }

  kj::Promise<void> drain(kj::Duration grace) {
    // Unregister (the edge routes no new request here), then let in-flight streams finish, for
    // at most `grace`.
    auto drained = unregister().then([this]() { return waitForStreams(); });
    return ctx.timer.timeoutAfter(grace, kj::mv(drained))
        .catch_([this](kj::Exception&& e) { graceExpired(kj::mv(e)); });
  }

  void stop() {
    if (transport.get() != nullptr) transport->close(0, "");
    stopFulfiller->fulfill(SessionEnd{EndKind::SHUTDOWN, kj::str("shutdown"), true, registered});
  }

  SessionEnd finished(SessionEnd end) {
    ended = true;
    quicEnded();
    if (moving && end.kind == EndKind::LOST) end.kind = EndKind::MOVED;   // close won the race
    if (shutdownStarted && !moving && end.kind == EndKind::LOST) {
      // Our own close() may win the race against stop()'s fulfiller.
      end.kind = EndKind::SHUTDOWN;
      end.wasRegistered = registered;
    }
    if (closeWhenDone && transport.get() != nullptr) transport->close(0, "");
    if (end.kind == EndKind::LOST && transport.get() != nullptr) {
      KJ_IF_MAYBE(dialer, ctx.dialer) dialer->lost(info.address, *transport);
      KJ_IF_MAYBE(peer, transport->peerClose()) {
        ctx.logger.info("Edge closed the connection",
                        fields().add("code", hexCode(peer->code)).add("reason", peer->reason));
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
