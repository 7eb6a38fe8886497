#include "edge-server.h"

#include "random.h"

#include "wire/control.h"
#include "wire/data-stream.h"
#include "wire/tunnelrpc.capnp.h"

#include "json.h"
#include "observe/log.h"

#include <kj/debug.h>
#include <kj/map.h>

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

namespace cfqt::emulator {

namespace {

class StreamTable final: public kj::Refcounted {
  // The streams a connection opened that are still held by someone, for withhold-credit.
  // Shared by the connection and every stream's attachment, since streams may outlive it.
public:
  kj::HashMap<int64_t, quic::Stream*> streams;
  bool withholdNew = false;
};

int64_t toMicros(kj::Duration d) { return d / kj::MICROSECONDS; }

class RpcSession {
  // The edge's end of an edge-opened RPC stream: it bootstraps the client (Side::CLIENT).
public:
  explicit RpcSession(kj::Own<quic::Stream> streamParam)
      : stream(kj::mv(streamParam)), client(*stream) {}
  kj::Own<quic::Stream> stream;     // first: outlives the RPC reading it
  capnp::TwoPartyClient client;
};

kj::String configurationResultJson(
    capnp::Response<wire::schema::ConfigurationManager::UpdateConfigurationResults>&& response) {
  auto result = response.getResult();
  return kj::str("{\"latestAppliedVersion\":", result.getLatestAppliedVersion(),
                 ",\"err\":", jsonString(result.getErr()), '}');
}

kj::Promise<kj::String> callUpdateConfiguration(kj::Own<quic::Stream> stream, int32_t version,
                                                kj::String json) {
  auto session = kj::heap<RpcSession>(kj::mv(stream));
  auto manager = session->client.bootstrap().castAs<wire::schema::ConfigurationManager>();
  auto request = manager.updateConfigurationRequest();
  request.setVersion(version);
  request.setConfig(json.asBytes());
  return request.send().then(
      [](capnp::Response<wire::schema::ConfigurationManager::UpdateConfigurationResults>&& r) {
    return configurationResultJson(kj::mv(r));
  }).attach(kj::mv(session));
}

kj::Promise<kj::String> pushOnStream(kj::Own<quic::Stream> stream, int32_t version,
                                     kj::String json) {
  auto& ref = *stream;
  auto signature = ref.write(wire::RPC_STREAM_SIGNATURE, sizeof(wire::RPC_STREAM_SIGNATURE));
  return signature.then([stream = kj::mv(stream), version, json = kj::mv(json)]() mutable {
    return callUpdateConfiguration(kj::mv(stream), version, kj::mv(json));
  });
}

}  // namespace

class EdgeServer::EdgeConnection final: public ClientConnection,
                                        public wire::RegistrationPolicy,
                                        public wire::ControlObserver {
public:
  EdgeConnection(EdgeServer& server, kj::Own<quic::Connection> connectionParam)
      : server(server), connection(kj::mv(connectionParam)), table(kj::refcounted<StreamTable>()),
        remote(connection->remoteAddress().toString()), tasks(server.errorHandler) {}
  KJ_DISALLOW_COPY(EdgeConnection);
  ~EdgeConnection() noexcept(false) {
    server.registry.connectionClosed(*this);
  }

  kj::Promise<void> run() {
    tasks.add(serveControl());
    return connection->onClosed().then([this](quic::CloseInfo info) { onClosed(info); });
  }

  // ClientConnection --------------------------------------------------------------------------

  kj::Promise<kj::Own<kj::AsyncIoStream>> openStream() override {
    return canceler.wrap(connection->openStream().then([this](kj::Own<quic::Stream> stream) {
      return track(kj::mv(stream));
    }));
  }

  void close(uint64_t code, kj::StringPtr reason) override {
    observe::logDebug("closing client connection", observe::Fields().add("remote", remote)
        .add("code", code).add("reason", reason));
    tasks.add(connection->close(code, reason));
  }

  void goSilent() override {
    observe::logDebug("going silent on client connection", observe::Fields().add("remote", remote));
    connection->goSilent();
  }

  bool withholdCredit(kj::Maybe<int64_t> streamId) override {
    KJ_IF_MAYBE(id, streamId) {
      KJ_IF_MAYBE(stream, table->streams.find(*id)) {
        (*stream)->setCreditWithheld(true);
        return true;
      }
      return false;
    }
    table->withholdNew = true;
    return true;
  }

  bool closeControlStream(ControlEnd how, uint64_t code) override {
    if (control.get() == nullptr || controlEnded) return false;
    controlEnded = true;
    observe::logDebug("ending the control stream (admin API)", observe::Fields()
        .add("remote", remote).add("how", how == ControlEnd::RESET ? "reset" : "fin")
        .add("code", code));
    controlWatch = nullptr;
    stopRouting();
    control = nullptr;    // the RPC session ends first: nothing writes to the stream afterwards
    if (how == ControlEnd::RESET) {
      controlStream->reset(code);
      controlStream->stopSending(code);
    } else {
      controlStream->shutdownWrite();
    }
    return true;
  }

  kj::Promise<kj::String> pushConfiguration(int32_t version, kj::String json) override {
    return canceler.wrap(connection->openStream().then(
        [version, json = kj::mv(json)](kj::Own<quic::Stream> stream) mutable {
      return pushOnStream(kj::mv(stream), version, kj::mv(json));
    }));
  }

  kj::String remoteAddress() override { return kj::heapString(remote); }

  kj::String describeStats() override {
    if (connection->closeInfo() != nullptr) return kj::str("null");
    auto s = connection->stats();
    return kj::str(
        "{\"smoothedRttUs\":", toMicros(s.smoothedRtt), ",\"minRttUs\":", toMicros(s.minRtt),
        ",\"bytesSent\":", s.bytesSent, ",\"bytesReceived\":", s.bytesReceived,
        ",\"packetsSent\":", s.packetsSent, ",\"packetsReceived\":", s.packetsReceived,
        ",\"ptoTotal\":", s.ptoTotal, ",\"congestionWindow\":", s.congestionWindow,
        ",\"bytesInFlight\":", s.bytesInFlight,
        ",\"recvBufferedBytes\":", s.recvBufferedBytes,
        ",\"sendBufferedBytes\":", s.sendBufferedBytes,
        ",\"streamsOpenedLocal\":", s.streamsOpenedLocal,
        ",\"streamsOpenedRemote\":", s.streamsOpenedRemote,
        ",\"openStreams\":", table->streams.size(), '}');
  }

  // wire::RegistrationPolicy ------------------------------------------------------------------

  kj::Promise<wire::RegistrationResult> decide(const wire::RegistrationParams& params) override {
    RegistrationRequest request;
    request.accountTag = kj::heapString(params.accountTag);
    request.tunnelSecret = kj::heapArray(params.tunnelSecret.asPtr());
    request.tunnelId = kj::heapArray(params.tunnelId.asPtr());
    request.connIndex = params.connIndex;
    request.clientId = kj::heapArray(params.clientId.asPtr());
    request.features = KJ_MAP(f, params.features) { return kj::heapString(f); };
    request.version = kj::heapString(params.version);
    request.arch = kj::heapString(params.arch);
    request.originLocalIp = kj::heapArray(params.originLocalIp.asPtr());
    request.replaceExisting = params.replaceExisting;
    request.numPreviousAttempts = params.numPreviousAttempts;

    auto outcome = server.registry.registerConnection(*this, request);
    KJ_SWITCH_ONEOF(outcome) {
      KJ_CASE_ONEOF(record, ConnectionRecord*) {
        recordIds.add(record->id);
        observe::logDebug("registered tunnel connection", observe::Fields().add("id", record->id)
            .add("tunnelId", record->tunnel.id).add("connIndex", record->connIndex)
            .add("remote", remote).add("version", record->version));
        return wire::RegistrationResult(wire::ConnectionDetails{
            kj::heapArray(record->uuid.asPtr()), kj::heapString(server.registry.locationName()),
            record->tunnel.remotelyManaged});
      }
      KJ_CASE_ONEOF(error, RegistrationError) {
        observe::logDebug("registration refused", observe::Fields().add("remote", remote)
            .add("cause", error.cause));
        return wire::RegistrationResult(wire::RegistrationError{
            kj::mv(error.cause), error.retryAfterNanos * kj::NANOSECONDS, error.shouldRetry});
      }
    }
    KJ_UNREACHABLE;
  }

  // wire::ControlObserver ---------------------------------------------------------------------

  void unregistered() override {
    observe::logDebug("client unregistered its connection", observe::Fields()
        .add("remote", remote));
    stopRouting();
  }

  void configurationUpdated(kj::ArrayPtr<const kj::byte> json) override {
    if (recordIds.empty()) return;
    KJ_IF_MAYBE(record, server.registry.findConnection(recordIds.back())) {
      server.registry.setConfiguration(*record,
          kj::heapString(reinterpret_cast<const char*>(json.begin()), json.size()));
    }
  }

private:
  EdgeServer& server;
  kj::Own<quic::Connection> connection;
  kj::Own<StreamTable> table;
  kj::String remote;
  kj::Own<quic::Stream> controlStream;
  kj::Own<wire::ControlServer> control;
  bool controlEnded = false;                 // by the client, or by closeControlStream()
  kj::Maybe<kj::Promise<void>> controlWatch; // control->onDisconnect(), dropped before `control`
  kj::Vector<kj::uint> recordIds;
  kj::Canceler canceler;
  kj::TaskSet tasks;

  void stopRouting() {
    for (auto id: recordIds) {
      KJ_IF_MAYBE(record, server.registry.findConnection(id)) {
        if (record->state == ConnectionState::REGISTERED) {
          server.registry.unregisterConnection(*record);
          observe::logDebug("tunnel connection unregistered", observe::Fields().add("id", id)
              .add("remote", remote));
        }
      }
    }
  }

  kj::Own<kj::AsyncIoStream> track(kj::Own<quic::Stream> stream) {
    auto id = stream->id();
    if (table->withholdNew) stream->setCreditWithheld(true);
    table->streams.upsert(id, stream.get(), [](quic::Stream*& existing, quic::Stream* s) {
      existing = s;
    });
    auto forget = kj::defer([t = kj::addRef(*table), id]() mutable { t->streams.erase(id); });
    return kj::Own<kj::AsyncIoStream>(kj::mv(stream)).attach(kj::mv(forget));
  }

  kj::Promise<void> serveControl() {
    return connection->acceptStream().then([this](kj::Own<quic::Stream> stream) {
      startControl(kj::mv(stream));
    });
  }

  void startControl(kj::Own<quic::Stream> stream) {
    controlStream = kj::mv(stream);
    control = kj::heap<wire::ControlServer>(*controlStream, *this, *this);
    tasks.add(refuseExtraStreams());
    controlWatch = control->onDisconnect().then([this]() { onControlEnded(); })
        .eagerlyEvaluate([this](kj::Exception&& e) {
      observe::logDebug("control stream failed", observe::Fields().add("remote", remote).error(e));
      onControlEnded();
    });
  }

  void onControlEnded() {
    // PROTOCOL.md §10.4 step 6: the control stream closing (or an Abort) means the client is
    // leaving; streams in flight finish, but no new requests go to this connection.
    observe::logDebug("control stream ended", observe::Fields().add("remote", remote));
    controlEnded = true;
    stopRouting();
  }

  kj::Promise<void> refuseExtraStreams() {
    // Clients open further streams only for UDP-session RPCs, which the emulator doesn't offer.
    return connection->acceptStream().then([this](kj::Own<quic::Stream> stream) {
      stream->reset(0);
      stream->stopSending(0);
      return refuseExtraStreams();
    });
  }

  void onClosed(const quic::CloseInfo& info) {
    observe::logDebug("client connection ended", observe::Fields().add("remote", remote)
        .add("kind", kj::str(info.kind)).add("code", info.code).add("reason", info.reason));
    server.registry.connectionClosed(*this);
    canceler.cancel(info.toException());
  }
};

void EdgeServer::ErrorHandler::taskFailed(kj::Exception&& exception) {
  if (exception.getType() == kj::Exception::Type::DISCONNECTED) {
    observe::logDebug("edge task ended", observe::Fields().error(exception));
  } else {
    observe::logError("edge task failed", observe::Fields().error(exception));
  }
}

class EdgeServer::BlackHole {
  // A UDP socket that reads and drops every datagram (a firewall's view of a blocked port).
public:
  BlackHole(kj::UnixEventPort& eventPort, const quic::SocketAddress& address)
      : fd(openSocket(address)),
        observer(eventPort, fd, kj::UnixEventPort::FdObserver::OBSERVE_READ),
        draining(drain().eagerlyEvaluate([](kj::Exception&& e) {
          observe::logError("UDP black hole stopped reading", observe::Fields().error(e));
        })) {}
  KJ_DISALLOW_COPY(BlackHole);

private:
  kj::AutoCloseFd fd;                    // before its observer
  kj::UnixEventPort::FdObserver observer;
  kj::Promise<void> draining;            // last: cancelled first

  static kj::AutoCloseFd openSocket(const quic::SocketAddress& address) {
    int raw;
    KJ_SYSCALL(raw = socket(address.isIpv6() ? AF_INET6 : AF_INET,
                            SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    kj::AutoCloseFd result(raw);
    if (address.isIpv6()) {
      int off = 0;   // dual-stack, as the QUIC endpoint binds "[::]"
      KJ_SYSCALL(setsockopt(raw, IPPROTO_IPV6, IPV6_V6ONLY, &off, sizeof(off)));
    }
    KJ_SYSCALL(bind(raw, static_cast<const struct sockaddr*>(address.sockaddr()),
                    address.length()), address.toString());
    return result;
  }

  kj::Promise<void> drain() {
    kj::byte buffer[2048];
    for (int i = 0; i < 64; i++) {
      ssize_t n;
      KJ_NONBLOCKING_SYSCALL(n = recv(fd, buffer, sizeof(buffer), 0));
      if (n < 0) return observer.whenBecomesReadable().then([this]() { return drain(); });
    }
    return kj::evalLater([this]() { return drain(); });   // not drained: no edge will come
  }
};

EdgeServer::EdgeServer(kj::UnixEventPort& eventPort, Registry& registry,
                       EdgeServerOptions options)
    : eventPort(eventPort), registry(registry), options(kj::mv(options)), tasks(errorHandler) {}

EdgeServer::~EdgeServer() noexcept(false) {}

quic::SocketAddress EdgeServer::listen(quic::SocketAddress address) {
  auto listener = kj::heap<Listener>();
  listener->address = address;
  if (blocked) {
    // The emulator picks the port on TCP first, so a black hole always gets an explicit one.
    KJ_REQUIRE(address.port() != 0, "a blocked UDP edge needs an explicit port",
               address.toString());
    listener->blackHole = kj::heap<BlackHole>(eventPort, address);
  } else {
    openEndpoint(*listener);
  }
  auto bound = listener->address;
  listeners.add(kj::mv(listener));
  return bound;
}

void EdgeServer::openEndpoint(Listener& listener) {
  auto endpoint = quic::newEndpoint(eventPort, listener.address);
  quic::ServerConfig config;
  config.certFile = kj::heapString(options.certFile);
  config.keyFile = kj::heapString(options.keyFile);
  config.alpn.add(kj::str("argotunnel"));
  KJ_IF_MAYBE(p, options.tlsPriority) config.tlsPriority = kj::heapString(*p);
  config.transport = options.transport;
  endpoint->listen(kj::mv(config));
  listener.address = endpoint->localAddress();
  listener.accepting = acceptLoop(*endpoint).eagerlyEvaluate([](kj::Exception&& e) {
    observe::logError("QUIC edge stopped accepting", observe::Fields().error(e));
  });
  listener.endpoint = kj::mv(endpoint);
}

void EdgeServer::closeEndpoint(Listener& listener) {
  // Live connections of the endpoint end with ENDPOINT_GONE (their clients see silence).
  listener.accepting = nullptr;
  listener.endpoint = nullptr;
}

void EdgeServer::setUdpBlocked(bool blockedParam) {
  if (blocked == blockedParam) return;
  blocked = blockedParam;
  observe::logDebug(blocked ? "UDP edge blocked: every datagram is dropped" : "UDP edge unblocked");
  for (auto& listener: listeners) {
    if (blocked) {
      closeEndpoint(*listener);
      listener->blackHole = kj::heap<BlackHole>(eventPort, listener->address);
    } else {
      listener->blackHole = nullptr;
      openEndpoint(*listener);
    }
  }
}

size_t EdgeServer::connectionCount() const { return liveConnections; }

kj::Promise<void> EdgeServer::acceptLoop(quic::Endpoint& endpoint) {
  return endpoint.accept().then([this, &endpoint](kj::Own<quic::Connection> connection) {
    tasks.add(serveConnection(kj::mv(connection)));
    return acceptLoop(endpoint);
  });
}

kj::Promise<void> EdgeServer::serveConnection(kj::Own<quic::Connection> connection) {
  auto edgeConnection = kj::heap<EdgeConnection>(*this, kj::mv(connection));
  liveConnections++;
  auto promise = edgeConnection->run();
  return promise.attach(kj::mv(edgeConnection), kj::defer([this]() { liveConnections--; }));
}

}  // namespace cfqt::emulator
