// ControlClient <-> ControlServer over kj::newTwoWayPipe(): success, errors with retry fields,
// EDUPCONN, timeouts, unregister, configuration, a peer that disconnects mid-call; and the
// client's CloudflaredServer on edge-opened RPC streams.

#include "wire/control.h"

#include "wire/wire-error.h"

#include <capnp/message.h>
#include <kj/async-io.h>
#include <kj/test.h>
#include <kj/timer.h>

namespace cfqt::wire {
namespace {

constexpr kj::Duration TEST_TIMEOUT = 5 * kj::SECONDS;  // real-time bound, hit only on failure

RegistrationParams sampleParams() {
  RegistrationParams params;
  params.accountTag = kj::str("0123456789abcdef0123456789abcdef");
  params.tunnelSecret = kj::heapArray<kj::byte>({1, 2, 3, 4, 5, 6, 7, 8});
  params.tunnelId = kj::heapArray<kj::byte>(16);
  for (int i = 0; i < 16; i++) params.tunnelId[i] = 0x10 + i;
  params.connIndex = 0;
  params.clientId = kj::heapArray<kj::byte>(16);
  for (int i = 0; i < 16; i++) params.clientId[i] = 0xa0 + i;
  params.version = kj::str("2023.7.3");
  params.arch = kj::str("linux_amd64");
  params.originLocalIp =
      kj::heapArray<kj::byte>({0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 41, 192, 7});
  params.numPreviousAttempts = 3;
  return params;
}

ConnectionDetails sampleDetails() {
  auto uuid = kj::heapArray<kj::byte>(16);
  for (int i = 0; i < 16; i++) uuid[i] = i;
  return ConnectionDetails{kj::mv(uuid), kj::str("EMU"), false};
}

class RecordingObserver final: public ControlObserver {
public:
  void registered(const RegistrationParams& params, const RegistrationResult& result) override {
    auto copy = RegistrationParams();
    copy.accountTag = kj::str(params.accountTag);
    copy.tunnelSecret = kj::heapArray(params.tunnelSecret.asPtr());
    copy.tunnelId = kj::heapArray(params.tunnelId.asPtr());
    copy.connIndex = params.connIndex;
    copy.clientId = kj::heapArray(params.clientId.asPtr());
    copy.features = KJ_MAP(f, params.features) { return kj::str(f); };
    copy.version = kj::str(params.version);
    copy.arch = kj::str(params.arch);
    copy.originLocalIp = kj::heapArray(params.originLocalIp.asPtr());
    copy.replaceExisting = params.replaceExisting;
    copy.compressionQuality = params.compressionQuality;
    copy.numPreviousAttempts = params.numPreviousAttempts;
    registrations.add(kj::mv(copy));
    accepted.add(result.is<ConnectionDetails>());
  }
  void unregistered() override { unregistrations++; }
  void configurationUpdated(kj::ArrayPtr<const kj::byte> json) override {
    configs.add(kj::str(json.asChars()));
  }

  kj::Vector<RegistrationParams> registrations;
  kj::Vector<bool> accepted;
  int unregistrations = 0;
  kj::Vector<kj::String> configs;
};

class HangingPolicy final: public RegistrationPolicy {
  // Never answers; records whether the pending decision was cancelled.
public:
  kj::Promise<RegistrationResult> decide(const RegistrationParams& params) override {
    calls++;
    return kj::Promise<RegistrationResult>(kj::NEVER_DONE).attach(kj::defer([this]() {
      cancelled++;
    }));
  }
  int calls = 0;
  int cancelled = 0;
};

class FailingPolicy final: public RegistrationPolicy {
public:
  kj::Promise<RegistrationResult> decide(const RegistrationParams& params) override {
    return KJ_EXCEPTION(FAILED, "policy exploded");
  }
};

struct Harness {
  // Both ends on one event loop with an injected timer.
  explicit Harness(RegistrationPolicy& policy, ControlClientOptions clientOptions = {},
                   ControlServerOptions serverOptions = {})
      : timer(kj::origin<kj::TimePoint>()),
        pipe(kj::newTwoWayPipe()),
        server(kj::heap<ControlServer>(*pipe.ends[1], policy, observer, serverOptions)),
        client(kj::heap<ControlClient>(*pipe.ends[0], timer, clientOptions)) {}

  kj::EventLoop loop;
  kj::WaitScope waitScope{loop};
  kj::TimerImpl timer;
  RecordingObserver observer;
  kj::TwoWayPipe pipe;
  kj::Own<ControlServer> server;
  kj::Own<ControlClient> client;
};

void expectSameParams(const RegistrationParams& a, const RegistrationParams& b) {
  KJ_EXPECT(a.accountTag == b.accountTag);
  KJ_EXPECT(a.tunnelSecret == b.tunnelSecret);
  KJ_EXPECT(a.tunnelId == b.tunnelId);
  KJ_EXPECT(a.connIndex == b.connIndex);
  KJ_EXPECT(a.clientId == b.clientId);
  KJ_ASSERT(a.features.size() == b.features.size());
  for (size_t i = 0; i < a.features.size(); i++) KJ_EXPECT(a.features[i] == b.features[i]);
  KJ_EXPECT(a.version == b.version);
  KJ_EXPECT(a.arch == b.arch);
  KJ_EXPECT(a.originLocalIp == b.originLocalIp);
  KJ_EXPECT(a.replaceExisting == b.replaceExisting);
  KJ_EXPECT(a.compressionQuality == b.compressionQuality);
  KJ_EXPECT(a.numPreviousAttempts == b.numPreviousAttempts);
}

KJ_TEST("control: default features are the five of PROTOCOL.md 4.3") {
  auto features = defaultFeatures();
  KJ_ASSERT(features.size() == 5);
  KJ_EXPECT(features[0] == "allow_remote_config");
  KJ_EXPECT(features[1] == "serialized_headers");
  KJ_EXPECT(features[2] == "support_datagram_v2");
  KJ_EXPECT(features[3] == "support_quic_eof");
  KJ_EXPECT(features[4] == "management_logs");
  KJ_EXPECT(RegistrationParams().features.size() == 5);
}

KJ_TEST("control: successful registration, configuration and unregistration") {
  FixedRegistrationPolicy policy(sampleDetails());
  Harness h(policy);
  auto params = sampleParams();
  auto result = h.client->registerConnection(params).wait(h.waitScope);
  KJ_IF_MAYBE(details, result.tryGet<ConnectionDetails>()) {
    KJ_EXPECT(details->uuid == sampleDetails().uuid);
    KJ_EXPECT(details->locationName == "EMU");
    KJ_EXPECT(!details->tunnelIsRemotelyManaged);
  } else {
    KJ_FAIL_EXPECT("registration refused");
  }
  KJ_ASSERT(h.observer.registrations.size() == 1);
  expectSameParams(h.observer.registrations[0], params);
  KJ_EXPECT(h.observer.accepted[0]);

  auto json = kj::str(R"({"ingress":[{"service":"http://localhost:8080"}]})");
  h.client->updateLocalConfiguration(json.asBytes()).wait(h.waitScope);
  KJ_ASSERT(h.observer.configs.size() == 1);
  KJ_EXPECT(h.observer.configs[0] == json);

  h.client->unregisterConnection().wait(h.waitScope);
  KJ_EXPECT(h.observer.unregistrations == 1);

  // A second registration on the same session works too (reconnect-in-place is not our business,
  // but the server must keep serving).
  policy.setResult(duplicateConnection());
  auto again = h.client->registerConnection(params).wait(h.waitScope);
  KJ_EXPECT(again.is<RegistrationError>());

  // Dropping the client ends the session for the server.
  h.client = nullptr;
  h.pipe.ends[0] = nullptr;
  h.server->onDisconnect().wait(h.waitScope);
}

KJ_TEST("control: registration error carries cause, retryAfter and shouldRetry") {
  FixedRegistrationPolicy policy(
      RegistrationError{kj::str("Unauthorized: bad tunnel secret"), 3 * kj::SECONDS, true});
  Harness h(policy);
  auto result = h.client->registerConnection(sampleParams()).wait(h.waitScope);
  KJ_IF_MAYBE(error, result.tryGet<RegistrationError>()) {
    KJ_EXPECT(error->cause == "Unauthorized: bad tunnel secret");
    KJ_EXPECT(error->retryAfter == 3 * kj::SECONDS);
    KJ_EXPECT(error->shouldRetry);
    KJ_EXPECT(!error->isDuplicate());
  } else {
    KJ_FAIL_EXPECT("registration accepted");
  }
  KJ_ASSERT(h.observer.accepted.size() == 1);
  KJ_EXPECT(!h.observer.accepted[0]);

  policy.setResult(RegistrationError{kj::str("EDUPCONNX"), 0 * kj::SECONDS, false});
  auto near = h.client->registerConnection(sampleParams()).wait(h.waitScope);
  KJ_EXPECT(!KJ_ASSERT_NONNULL(near.tryGet<RegistrationError>()).isDuplicate());
  KJ_EXPECT(!KJ_ASSERT_NONNULL(near.tryGet<RegistrationError>()).shouldRetry);
}

KJ_TEST("control: EDUPCONN is recognised as a duplicate connection") {
  FixedRegistrationPolicy policy(duplicateConnection(1500 * kj::MILLISECONDS));
  Harness h(policy);
  auto result = h.client->registerConnection(sampleParams()).wait(h.waitScope);
  auto& error = KJ_ASSERT_NONNULL(result.tryGet<RegistrationError>());
  KJ_EXPECT(error.isDuplicate());
  KJ_EXPECT(error.cause == "EDUPCONN");
  KJ_EXPECT(error.retryAfter == 1500 * kj::MILLISECONDS);
  KJ_EXPECT(error.shouldRetry);
}

KJ_TEST("control: a call times out after callTimeout and the edge's pending call is cancelled") {
  HangingPolicy policy;
  Harness h(policy);
  auto promise = h.client->registerConnection(sampleParams());
  KJ_EXPECT(!promise.poll(h.waitScope));
  KJ_EXPECT(policy.calls == 1);

  h.timer.advanceTo(h.timer.now() + 15 * kj::SECONDS - 1 * kj::MILLISECONDS);
  KJ_EXPECT(!promise.poll(h.waitScope), "timed out early");
  h.timer.advanceTo(h.timer.now() + 1 * kj::MILLISECONDS);
  KJ_ASSERT(promise.poll(h.waitScope), "did not time out at 15 s");
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() { promise.wait(h.waitScope); })) {
    KJ_EXPECT(e->getType() == kj::Exception::Type::OVERLOADED);
    KJ_EXPECT(e->getDescription() == "wire: control: registerConnection timed out after 15s",
              e->getDescription());
  } else {
    KJ_FAIL_EXPECT("no timeout");
  }
  h.waitScope.poll();
  KJ_EXPECT(policy.cancelled == 1, "edge side not cancelled by the client's Finish");
}

KJ_TEST("control: configurable timeout applies to unregister and configuration too") {
  // A server that never answers at all: the client's own end of a pipe nobody reads.
  kj::EventLoop loop;
  kj::WaitScope waitScope(loop);
  kj::TimerImpl timer(kj::origin<kj::TimePoint>());
  auto pipe = kj::newTwoWayPipe();
  ControlClientOptions options;
  options.callTimeout = 100 * kj::MILLISECONDS;
  ControlClient client(*pipe.ends[0], timer, options);
  auto unregister = client.unregisterConnection();
  auto config = client.updateLocalConfiguration(kj::StringPtr("{}").asBytes());
  KJ_EXPECT(!unregister.poll(waitScope));
  timer.advanceTo(timer.now() + 100 * kj::MILLISECONDS);
  KJ_EXPECT_THROW_MESSAGE("unregisterConnection timed out after 100ms", unregister.wait(waitScope));
  KJ_EXPECT_THROW_MESSAGE("updateLocalConfiguration timed out", config.wait(waitScope));
}

KJ_TEST("control: the edge disconnecting mid-call rejects the call with DISCONNECTED") {
  HangingPolicy policy;
  Harness h(policy);
  auto promise = h.client->registerConnection(sampleParams());
  auto disconnected = h.client->onDisconnect();
  KJ_EXPECT(!promise.poll(h.waitScope));
  KJ_EXPECT(policy.calls == 1);

  h.server = nullptr;           // the edge goes away...
  h.pipe.ends[1] = nullptr;     // ...and its stream with it
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() { promise.wait(h.waitScope); })) {
    KJ_EXPECT(e->getType() == kj::Exception::Type::DISCONNECTED, *e);
  } else {
    KJ_FAIL_EXPECT("call survived the edge");
  }
  disconnected.wait(h.waitScope);
  KJ_EXPECT(policy.cancelled == 1);
  // Later calls fail at once, no hang.
  KJ_EXPECT_THROW(DISCONNECTED, h.client->unregisterConnection().wait(h.waitScope));
}

KJ_TEST("control: policy failures and bad details become rejections, not crashes") {
  {
    FailingPolicy policy;
    Harness h(policy);
    KJ_EXPECT_THROW_MESSAGE("policy exploded",
                            h.client->registerConnection(sampleParams()).wait(h.waitScope));
  }
  {
    FixedRegistrationPolicy policy(
        ConnectionDetails{kj::heapArray<kj::byte>({1, 2, 3}), kj::str("EMU"), false});
    Harness h(policy);
    KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
      h.client->registerConnection(sampleParams()).wait(h.waitScope);
    })) {
      KJ_EXPECT(wireErrorCode(*e) == WireErrorCode::MALFORMED, *e);
    } else {
      KJ_FAIL_EXPECT("accepted a 3-byte connection uuid");
    }
  }
}

KJ_TEST("control: malformed registerConnection params get an exception answer, server lives") {
  kj::EventLoop loop;
  kj::WaitScope waitScope(loop);
  FixedRegistrationPolicy policy(sampleDetails());
  RecordingObserver observer;
  auto pipe = kj::newTwoWayPipe();
  ControlServer server(*pipe.ends[1], policy, observer);
  capnp::TwoPartyClient raw(*pipe.ends[0]);
  auto registration = raw.bootstrap().castAs<schema::RegistrationServer>();
  // Params laid out as a Tag struct: pointer 0 (auth, a struct) holds Text instead.
  auto request = registration.typelessRequest(0xf71695ec7fe85497ull, 0, nullptr);
  auto wrong = request.initAs<schema::Tag>();
  wrong.setName("not a struct");
  wrong.setValue("not data either");
  KJ_EXPECT_THROW(FAILED, request.send().wait(waitScope));
  KJ_EXPECT(observer.registrations.size() == 0);
  // The session is still usable.
  auto good = registration.registerConnectionRequest();
  sampleParams().writeTo(good);
  auto response = good.send().wait(waitScope);
  KJ_EXPECT(response.getResult().getResult().isConnectionDetails());
  KJ_EXPECT(observer.registrations.size() == 1);
}

KJ_TEST("control: the server bounds what a client can make it read") {
  FixedRegistrationPolicy policy(sampleDetails());
  ControlServerOptions serverOptions;
  serverOptions.traversalLimitWords = 256;
  Harness h(policy, {}, serverOptions);
  auto params = sampleParams();
  params.features = KJ_MAP(i, kj::range(0, 200)) {
    return kj::str("feature-with-a-rather-long-name-", i);
  };
  // An over-limit message is a protocol error: the server aborts the session (the client sees
  // DISCONNECTED), allocates nothing for it, and reports the disconnect to its owner.
  KJ_EXPECT_THROW_MESSAGE("Message is too large",
                          h.client->registerConnection(params).wait(h.waitScope));
  KJ_EXPECT(h.observer.registrations.size() == 0);
  h.server->onDisconnect().wait(h.waitScope);
}

KJ_TEST("control: the client's stub CloudflaredServer answers UNIMPLEMENTED") {
  // Play an edge that (unusually) bootstraps the client on the control stream.
  kj::EventLoop loop;
  kj::WaitScope waitScope(loop);
  kj::TimerImpl timer(kj::origin<kj::TimePoint>());
  auto pipe = kj::newTwoWayPipe();
  ControlClient client(*pipe.ends[0], timer);
  capnp::TwoPartyVatNetwork network(*pipe.ends[1], capnp::rpc::twoparty::Side::SERVER);
  auto rpc = capnp::makeRpcClient(network);
  capnp::MallocMessageBuilder vatMessage;
  auto vatId = vatMessage.initRoot<capnp::rpc::twoparty::VatId>();
  vatId.setSide(capnp::rpc::twoparty::Side::CLIENT);
  auto cloudflared = rpc.bootstrap(vatId).castAs<schema::CloudflaredServer>();
  auto request = cloudflared.updateConfigurationRequest();
  request.setVersion(1);
  KJ_EXPECT_THROW(UNIMPLEMENTED, request.send().wait(waitScope));
}

// =============================================================================================
// Edge-opened RPC streams

class AcceptingHandler final: public ConfigurationHandler {
public:
  kj::Maybe<kj::String> applyConfiguration(int32_t version,
                                           kj::ArrayPtr<const kj::byte> json) override {
    applied.add(version);
    if (version == 13) return kj::str("unlucky version");
    return nullptr;
  }
  kj::Vector<int32_t> applied;
};

struct EdgeRpc {
  // The edge's side of an edge-opened RPC stream: bootstraps the client's CloudflaredServer.
  explicit EdgeRpc(kj::AsyncIoStream& stream)
      : rpc(stream), cloudflared(rpc.bootstrap().castAs<schema::CloudflaredServer>()) {}
  capnp::TwoPartyClient rpc;
  schema::CloudflaredServer::Client cloudflared;

  schema::UpdateConfigurationResponse::Reader update(
      kj::WaitScope& waitScope, int32_t version, kj::StringPtr json,
      kj::Own<capnp::Response<schema::ConfigurationManager::UpdateConfigurationResults>>& keep) {
    auto request = cloudflared.updateConfigurationRequest();
    request.setVersion(version);
    request.setConfig(json.asBytes());
    keep = kj::heap(request.send().wait(waitScope));
    return keep->getResult();
  }
};

KJ_TEST("cloudflared rpc: updateConfiguration follows PROTOCOL.md 6.8") {
  kj::EventLoop loop;
  kj::WaitScope waitScope(loop);
  AcceptingHandler handler;
  RemoteConfigState state(handler);
  auto pipe = kj::newTwoWayPipe();
  auto serving = serveCloudflaredRpc(*pipe.ends[1], state);
  auto edge = kj::heap<EdgeRpc>(*pipe.ends[0]);
  kj::Own<capnp::Response<schema::ConfigurationManager::UpdateConfigurationResults>> keep;

  auto r = edge->update(waitScope, 1, R"({"ingress":[]})", keep);
  KJ_EXPECT(r.getLatestAppliedVersion() == 1);
  KJ_EXPECT(r.getErr() == "");
  r = edge->update(waitScope, 1, R"({"ingress":[]})", keep);   // not newer: nothing applied
  KJ_EXPECT(r.getLatestAppliedVersion() == 1 && r.getErr() == "");
  r = edge->update(waitScope, 0, R"({})", keep);
  KJ_EXPECT(r.getLatestAppliedVersion() == 1 && r.getErr() == "");
  r = edge->update(waitScope, 5, R"({"ingress": [)", keep);   // bad JSON
  KJ_EXPECT(r.getLatestAppliedVersion() == 1);
  KJ_EXPECT(kj::StringPtr(r.getErr()).startsWith("invalid configuration JSON"), r.getErr());
  r = edge->update(waitScope, 13, R"({})", keep);               // handler refuses
  KJ_EXPECT(r.getLatestAppliedVersion() == 1 && r.getErr() == "unlucky version");
  r = edge->update(waitScope, 14, R"({})", keep);
  KJ_EXPECT(r.getLatestAppliedVersion() == 14 && r.getErr() == "");
  KJ_EXPECT(state.currentVersion() == 14);
  KJ_EXPECT(handler.applied.size() == 3);

  // UDP sessions are refused politely.
  auto udp = edge->cloudflared.registerUdpSessionRequest();
  udp.setSessionId(kj::heapArray<kj::byte>(16));
  udp.setDstPort(53);
  auto udpResponse = udp.send().wait(waitScope);
  KJ_EXPECT(udpResponse.getResult().getErr() == "UDP sessions not supported");
  edge->cloudflared.unregisterUdpSessionRequest().send().wait(waitScope);

  KJ_EXPECT(!serving.poll(waitScope), "serving ended while the edge is connected");
  keep = nullptr;
  edge = nullptr;
  pipe.ends[0] = nullptr;
  serving.wait(waitScope);
}

KJ_TEST("cloudflared rpc: without a handler remote configuration is refused") {
  kj::EventLoop loop;
  kj::WaitScope waitScope(loop);
  RemoteConfigState state;
  auto pipe = kj::newTwoWayPipe();
  auto serving = serveCloudflaredRpc(*pipe.ends[1], state);
  EdgeRpc edge(*pipe.ends[0]);
  kj::Own<capnp::Response<schema::ConfigurationManager::UpdateConfigurationResults>> keep;
  auto r = edge.update(waitScope, 1, "{}", keep);
  KJ_EXPECT(r.getLatestAppliedVersion() == -1);
  KJ_EXPECT(r.getErr() == "remote configuration is not supported");
}

KJ_TEST("cloudflared rpc: with a timer the stream is served at most maxDuration") {
  kj::EventLoop loop;
  kj::WaitScope waitScope(loop);
  kj::TimerImpl timer(kj::origin<kj::TimePoint>());
  RemoteConfigState state;
  auto pipe = kj::newTwoWayPipe();
  ServeRpcOptions options;
  options.timer = timer;
  options.maxDuration = 5 * kj::SECONDS;
  auto serving = serveCloudflaredRpc(*pipe.ends[1], state, options);
  EdgeRpc edge(*pipe.ends[0]);
  KJ_EXPECT(!serving.poll(waitScope));
  timer.advanceTo(timer.now() + 4999 * kj::MILLISECONDS);
  KJ_EXPECT(!serving.poll(waitScope));
  timer.advanceTo(timer.now() + 1 * kj::MILLISECONDS);
  KJ_EXPECT(serving.poll(waitScope));
  serving.wait(waitScope);
}

}  // namespace
}  // namespace cfqt::wire
