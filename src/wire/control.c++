#include "wire/control.h"

#include "wire/wire-error.h"

#include <capnp/compat/json.h>
#include <capnp/message.h>
#include <kj/debug.h>

namespace cfqt::wire {

namespace {

using capnp::rpc::twoparty::Side;

capnp::ReaderOptions readerOptions(uint64_t traversalLimitWords) {
  capnp::ReaderOptions options;
  options.traversalLimitInWords = traversalLimitWords;
  return options;
}

class StubCloudflaredServer final: public schema::CloudflaredServer::Server {
  // Exported on the control stream in case the edge bootstraps us: every method is the generated
  // default, which answers UNIMPLEMENTED.
};

schema::RegistrationServer::Client bootstrapEdge(
    capnp::RpcSystem<capnp::rpc::twoparty::VatId>& rpcSystem) {
  capnp::MallocMessageBuilder message(8);
  auto vatId = message.initRoot<capnp::rpc::twoparty::VatId>();
  vatId.setSide(Side::SERVER);
  return rpcSystem.bootstrap(vatId).castAs<schema::RegistrationServer>();
}

void fillResponse(schema::ConnectionResponse::Builder response, const RegistrationResult& result) {
  auto union_ = response.initResult();
  KJ_SWITCH_ONEOF(result) {
    KJ_CASE_ONEOF(details, ConnectionDetails) {
      auto out = union_.initConnectionDetails();
      out.setUuid(details.uuid);
      out.setLocationName(details.locationName);
      out.setTunnelIsRemotelyManaged(details.tunnelIsRemotelyManaged);
    }
    KJ_CASE_ONEOF(error, RegistrationError) {
      auto out = union_.initError();
      out.setCause(error.cause);
      out.setRetryAfter(error.retryAfter / kj::NANOSECONDS);
      out.setShouldRetry(error.shouldRetry);
    }
  }
}

RegistrationResult copyResult(const RegistrationResult& result) {
  KJ_SWITCH_ONEOF(result) {
    KJ_CASE_ONEOF(details, ConnectionDetails) {
      return ConnectionDetails{kj::heapArray(details.uuid.asPtr()), kj::str(details.locationName),
                               details.tunnelIsRemotelyManaged};
    }
    KJ_CASE_ONEOF(error, RegistrationError) {
      return RegistrationError{kj::str(error.cause), error.retryAfter, error.shouldRetry};
    }
  }
  KJ_UNREACHABLE;
}

class RegistrationServerImpl final: public schema::RegistrationServer::Server {
public:
  RegistrationServerImpl(RegistrationPolicy& policy, ControlObserver& observer)
      : policy(policy), observer(observer) {}

protected:
  kj::Promise<void> registerConnection(RegisterConnectionContext context) override {
    // readFrom() throws on malformed params: that becomes the caller's exception answer.
    auto params = kj::heap(RegistrationParams::readFrom(context.getParams()));
    context.releaseParams();
    context.allowCancellation();  // a hung policy must not outlive the session
    auto decision = policy.decide(*params);
    return decision.then([this, context, params = kj::mv(params)](
                             RegistrationResult result) mutable {
      answer(context, *params, result);
    });
  }

  kj::Promise<void> unregisterConnection(UnregisterConnectionContext context) override {
    observer.unregistered();
    return kj::READY_NOW;
  }

  kj::Promise<void> updateLocalConfiguration(UpdateLocalConfigurationContext context) override {
    observer.configurationUpdated(context.getParams().getConfig());
    return kj::READY_NOW;
  }

private:
  RegistrationPolicy& policy;
  ControlObserver& observer;

  void answer(RegisterConnectionContext& context, const RegistrationParams& params,
              const RegistrationResult& result) {
    fillResponse(context.getResults().initResult(), result);
    observer.registered(params, result);
  }
};

}  // namespace

// =============================================================================================

RegistrationResult decodeRegistrationResponse(schema::ConnectionResponse::Reader response) {
  // Runs inside a continuation: throwing rejects the registration promise.
  auto result = response.getResult();
  switch (result.which()) {
    case schema::ConnectionResponse::Result::ERROR: {
      auto error = result.getError();
      return RegistrationError{kj::str(error.getCause()), error.getRetryAfter() * kj::NANOSECONDS,
                               error.getShouldRetry()};
    }
    case schema::ConnectionResponse::Result::CONNECTION_DETAILS: {
      auto details = result.getConnectionDetails();
      if (details.getUuid().size() != 16) {
        kj::throwFatalException(
            wireError(WireErrorCode::MALFORMED,
                      kj::str("connection details with a uuid of ", details.getUuid().size(),
                              " bytes"))
                .toException());
      }
      return ConnectionDetails{kj::heapArray(details.getUuid()), kj::str(details.getLocationName()),
                               details.getTunnelIsRemotelyManaged()};
    }
  }
  kj::throwFatalException(
      wireError(WireErrorCode::MALFORMED, kj::str("unknown ConnectionResponse.result variant"))
          .toException());
}

kj::Array<kj::String> defaultFeatures() {
  return kj::arr(kj::str("allow_remote_config"), kj::str("serialized_headers"),
                 kj::str("support_datagram_v2"), kj::str("support_quic_eof"),
                 kj::str("management_logs"));
}

void RegistrationParams::writeTo(
    schema::RegistrationServer::RegisterConnectionParams::Builder params) const {
  auto auth = params.initAuth();
  auth.setAccountTag(accountTag);
  auth.setTunnelSecret(tunnelSecret);
  params.setTunnelId(tunnelId);
  params.setConnIndex(connIndex);
  auto options = params.initOptions();
  auto client = options.initClient();
  client.setClientId(clientId);
  auto list = client.initFeatures(features.size());
  for (size_t i = 0; i < features.size(); i++) list.set(i, features[i]);
  client.setVersion(version);
  client.setArch(arch);
  options.setOriginLocalIp(originLocalIp);
  options.setReplaceExisting(replaceExisting);
  options.setCompressionQuality(compressionQuality);
  options.setNumPreviousAttempts(numPreviousAttempts);
}

RegistrationParams RegistrationParams::readFrom(
    schema::RegistrationServer::RegisterConnectionParams::Reader params) {
  RegistrationParams result;
  auto auth = params.getAuth();
  result.accountTag = kj::str(auth.getAccountTag());
  result.tunnelSecret = kj::heapArray(auth.getTunnelSecret());
  result.tunnelId = kj::heapArray(params.getTunnelId());
  result.connIndex = params.getConnIndex();
  auto options = params.getOptions();
  auto client = options.getClient();
  result.clientId = kj::heapArray(client.getClientId());
  result.features = KJ_MAP(feature, client.getFeatures()) { return kj::str(feature); };
  result.version = kj::str(client.getVersion());
  result.arch = kj::str(client.getArch());
  result.originLocalIp = kj::heapArray(options.getOriginLocalIp());
  result.replaceExisting = options.getReplaceExisting();
  result.compressionQuality = options.getCompressionQuality();
  result.numPreviousAttempts = options.getNumPreviousAttempts();
  return result;
}

// =============================================================================================
// ControlClient

ControlClient::ControlClient(kj::AsyncIoStream& stream, kj::Timer& timer,
                             ControlClientOptions options)
    : timer(timer),
      options(options),
      network(stream, Side::CLIENT, readerOptions(options.traversalLimitWords)),
      rpcSystem(capnp::makeRpcServer(network, kj::heap<StubCloudflaredServer>())),
      registration(bootstrapEdge(rpcSystem)) {}

ControlClient::~ControlClient() noexcept(false) {}

template <typename T>
kj::Promise<T> ControlClient::withTimeout(kj::StringPtr method, kj::Promise<T> promise) {
  // `method` is always a literal.
  kj::Duration timeout = options.callTimeout;
  return promise.exclusiveJoin(
      timer.afterDelay(timeout).then([method, timeout]() -> kj::Promise<T> {
        return kj::Exception(kj::Exception::Type::OVERLOADED, __FILE__, __LINE__,
                             kj::str("wire: control: ", method, " timed out after ", timeout));
      }));
}

kj::Promise<RegistrationResult> ControlClient::registerConnection(
    const RegistrationParams& params) {
  auto request = registration.registerConnectionRequest();
  params.writeTo(request);
  auto promise = request.send().then(
      [](capnp::Response<schema::RegistrationServer::RegisterConnectionResults>&& response) {
        return decodeRegistrationResponse(response.getResult());
      });
  return withTimeout("registerConnection", kj::mv(promise));
}

kj::Promise<void> ControlClient::unregisterConnection() {
  auto promise = registration.unregisterConnectionRequest().send().ignoreResult();
  return withTimeout("unregisterConnection", kj::mv(promise));
}

kj::Promise<void> ControlClient::updateLocalConfiguration(kj::ArrayPtr<const kj::byte> json) {
  auto request = registration.updateLocalConfigurationRequest();
  request.setConfig(json);
  auto promise = request.send().ignoreResult();
  return withTimeout("updateLocalConfiguration", kj::mv(promise));
}

kj::Promise<void> ControlClient::onDisconnect() { return network.onDisconnect(); }

// =============================================================================================
// ControlServer

RegistrationError duplicateConnection(kj::Duration retryAfter, bool shouldRetry) {
  return RegistrationError{kj::str(DUPLICATE_CONNECTION_CAUSE), retryAfter, shouldRetry};
}

FixedRegistrationPolicy::FixedRegistrationPolicy(RegistrationResult result)
    : result(kj::mv(result)) {}

kj::Promise<RegistrationResult> FixedRegistrationPolicy::decide(const RegistrationParams& params) {
  return copyResult(result);
}

void FixedRegistrationPolicy::setResult(RegistrationResult resultParam) {
  result = kj::mv(resultParam);
}

ControlServer::ControlServer(kj::AsyncIoStream& stream, RegistrationPolicy& policy,
                             ControlObserver& observer, ControlServerOptions options)
    : network(stream, Side::SERVER, readerOptions(options.traversalLimitWords)),
      rpcSystem(capnp::makeRpcServer(network, kj::heap<RegistrationServerImpl>(policy, observer))) {
  rpcSystem.setFlowLimit(options.flowLimitWords);
}

ControlServer::~ControlServer() noexcept(false) {}

kj::Promise<void> ControlServer::onDisconnect() { return network.onDisconnect(); }

// =============================================================================================
// Edge-opened RPC streams

RemoteConfigState::RemoteConfigState(kj::Maybe<ConfigurationHandler&> handler)
    : handler(handler) {}

int32_t RemoteConfigState::currentVersion() const {
  std::lock_guard<std::mutex> lock(mutex);
  return current;
}

RemoteConfigState::Result RemoteConfigState::update(int32_t version,
                                                    kj::ArrayPtr<const kj::byte> json) {
  std::lock_guard<std::mutex> lock(mutex);
  if (version <= current) return Result{current, kj::str()};
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
    capnp::JsonCodec codec;
    capnp::MallocMessageBuilder message;
    codec.decodeRaw(json.asChars(), message.initRoot<capnp::JsonValue>());
  })) {
    return Result{current, kj::str("invalid configuration JSON: ", e->getDescription())};
  }
  KJ_IF_MAYBE(h, handler) {
    KJ_IF_MAYBE(error, h->applyConfiguration(version, json)) {
      return Result{current, kj::mv(*error)};
    }
    current = version;
    return Result{current, kj::str()};
  }
  return Result{current, kj::str("remote configuration is not supported")};
}

CloudflaredServerImpl::CloudflaredServerImpl(RemoteConfigState& config): config(config) {}

kj::Promise<void> CloudflaredServerImpl::registerUdpSession(RegisterUdpSessionContext context) {
  context.getResults().initResult().setErr("UDP sessions not supported");
  return kj::READY_NOW;
}

kj::Promise<void> CloudflaredServerImpl::unregisterUdpSession(
    UnregisterUdpSessionContext context) {
  return kj::READY_NOW;
}

kj::Promise<void> CloudflaredServerImpl::updateConfiguration(UpdateConfigurationContext context) {
  auto params = context.getParams();
  auto outcome = config.update(params.getVersion(), params.getConfig());
  auto result = context.getResults().initResult();
  result.setLatestAppliedVersion(outcome.latestAppliedVersion);
  if (outcome.err.size() > 0) result.setErr(outcome.err);
  return kj::READY_NOW;
}

namespace {

class CloudflaredRpcSession {
  // One edge-opened RPC stream being served; owned by serveCloudflaredRpc()'s promise.
public:
  CloudflaredRpcSession(kj::AsyncIoStream& stream, RemoteConfigState& config,
                        uint64_t traversalLimitWords)
      : network(stream, Side::SERVER, readerOptions(traversalLimitWords)),
        rpcSystem(capnp::makeRpcServer(network, kj::heap<CloudflaredServerImpl>(config))) {}

  capnp::TwoPartyVatNetwork network;
  capnp::RpcSystem<capnp::rpc::twoparty::VatId> rpcSystem;
};

}  // namespace

kj::Promise<void> serveCloudflaredRpc(kj::AsyncIoStream& stream, RemoteConfigState& config,
                                      ServeRpcOptions options) {
  auto session = kj::heap<CloudflaredRpcSession>(stream, config, options.traversalLimitWords);
  kj::Promise<void> done = session->network.onDisconnect();
  KJ_IF_MAYBE(timer, options.timer) {
    done = done.exclusiveJoin(timer->afterDelay(options.maxDuration));
  }
  return done.attach(kj::mv(session));
}

}  // namespace cfqt::wire
