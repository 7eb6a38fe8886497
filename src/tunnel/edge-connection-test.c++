// EdgeConnection against a fake edge built from the quic and wire layers on loopback: what it
// registers, what it pushes, how it answers every kind of edge-opened stream, how it ends.

#include "tunnel/edge-connection.h"
#include "tunnel/edge-dialer.h"

#include "quic/endpoint.h"
#include "wire/data-stream.h"
#include "wire/http-metadata.h"
#include "eventually.h"

#include <capnp/message.h>
#include <capnp/rpc-twoparty.h>
#include <kj/async-io.h>
#include <kj/compat/http.h>
#include <kj/compat/tls.h>
#include <kj/debug.h>
#include <kj/filesystem.h>
#include <kj/test.h>

#include <errno.h>
#include <string.h>
#include <unistd.h>

namespace cfqt::tunnel {
namespace {

kj::String testdata(kj::StringPtr name) {
  return kj::str(CFQT_QUIC_TESTDATA, "/", name);
}

kj::Array<kj::byte> bytes16(kj::byte seed) {
  auto a = kj::heapArray<kj::byte>(16);
  for (auto i: kj::indices(a)) a[i] = seed + i;
  return a;
}

struct Events final: public SessionEvents {
  uint registeredCount = 0;
  uint notReadyCount = 0;
  kj::String location;
  kj::Maybe<kj::Own<kj::PromiseFulfiller<void>>> onRegistered;
  void registered(uint connIndex, RegisteredInfo info) override {
    registeredCount++;
    location = kj::str(info.location);
    KJ_IF_MAYBE(f, onRegistered) (*f)->fulfill();
  }
  void notReady(uint connIndex) override { notReadyCount++; }
  kj::Promise<void> waitRegistered() {
    if (registeredCount > 0) return kj::READY_NOW;
    auto paf = kj::newPromiseAndFulfiller<void>();
    onRegistered = kj::mv(paf.fulfiller);
    return kj::mv(paf.promise);
  }
};

struct Observer final: public wire::ControlObserver {
  kj::Vector<wire::RegistrationParams> registrations;
  kj::Vector<kj::String> configs;
  uint unregistrations = 0;
  void registered(const wire::RegistrationParams& params,
                  const wire::RegistrationResult& result) override {
    auto copy = wire::RegistrationParams();
    copy.accountTag = kj::str(params.accountTag);
    copy.tunnelSecret = kj::heapArray<kj::byte>(params.tunnelSecret);
    copy.tunnelId = kj::heapArray<kj::byte>(params.tunnelId);
    copy.connIndex = params.connIndex;
    copy.clientId = kj::heapArray<kj::byte>(params.clientId);
    copy.features = KJ_MAP(f, params.features) { return kj::str(f); };
    copy.version = kj::str(params.version);
    copy.arch = kj::str(params.arch);
    copy.originLocalIp = kj::heapArray<kj::byte>(params.originLocalIp);
    copy.numPreviousAttempts = params.numPreviousAttempts;
    registrations.add(kj::mv(copy));
  }
  void unregistered() override { unregistrations++; }
  void configurationUpdated(kj::ArrayPtr<const kj::byte> json) override {
    configs.add(kj::heapString(json.asChars()));
  }
};

wire::RegistrationResult okResult() {
  return wire::ConnectionDetails{bytes16(0xA0), kj::str("TST"), false};
}

struct Harness {
  kj::AsyncIoContext io = kj::setupAsyncIo();
  kj::Timer& timer = io.provider->getTimer();
  observe::Logger logger{observe::LogConfig{observe::LogLevel::FATAL, nullptr, false}};
  observe::TunnelStatus status;
  AcknowledgingConfigHandler configHandler{logger};
  wire::RemoteConfigState remoteConfig{configHandler};
  kj::HttpHeaderTable headerTable;
  kj::Own<origin::Origin> origin;
  EdgeIdentity identity;
  EdgeConnectionConfig config;
  kj::Own<quic::Endpoint> edgeEndpoint;
  edge::EdgeAddress edgeAddress;
  Events events;

  Harness() {
    auto created = origin::Origin::create(origin::helloWorldOrigin(), timer,
                                          io.provider->getNetwork(), headerTable);
    KJ_SWITCH_ONEOF(created) {
      KJ_CASE_ONEOF(error, kj::String) KJ_FAIL_ASSERT(error);
      KJ_CASE_ONEOF(o, kj::Own<origin::Origin>) origin = kj::mv(o);
    }
    identity.accountTag = kj::str("acct-tag");
    identity.tunnelSecret = kj::heapArray<kj::byte>({1, 2, 3, 4});
    identity.tunnelId = bytes16(0x10);
    identity.connectorId = bytes16(0x40);
    identity.version = kj::str("2026.8.2");
    identity.arch = kj::str("linux_amd64");
    config.edgeCaFile = testdata("ca.pem");
    config.localConfigJson = kj::str("{\"ingress\":[]}");
    config.transport.handshakeTimeout = 2 * kj::SECONDS;
    edgeEndpoint = quic::newEndpoint(io.unixEventPort,
                                     KJ_ASSERT_NONNULL(quic::SocketAddress::parse("127.0.0.1:0")));
    quic::ServerConfig sc;
    sc.certFile = testdata("server.pem");
    sc.keyFile = testdata("server-key.pem");
    sc.alpn.add(kj::str("argotunnel"));
    edgeEndpoint->listen(kj::mv(sc));
    edgeAddress = KJ_ASSERT_NONNULL(edge::parseIpPort(
        kj::str("127.0.0.1:", edgeEndpoint->localAddress().port())));
  }

  EdgeContext context() {
    return EdgeContext{timer, io.unixEventPort, *origin, logger, status, remoteConfig,
                       identity, config};
  }
};

kj::Array<kj::byte> readAll(kj::AsyncInputStream& in, kj::WaitScope& ws) {
  return in.readAllBytes(1 << 20).wait(ws);
}

bool streamRefused(quic::Stream& s, kj::WaitScope& ws) {
  // The client reset (or finished without a preamble) the stream: no ConnectResponse comes back.
  kj::byte buf[16];
  size_t n = 0;
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() { n = s.tryRead(buf, 1, sizeof(buf)).wait(ws); })) {
    return true;
  }
  return n == 0;
}

KJ_TEST("EdgeConnection: registers, pushes config, serves and refuses edge streams, shuts down") {
  Harness h;
  EdgeConnectionFactory factory(h.context());
  auto session = factory.newSession(AttemptInfo{0, h.edgeAddress, 3}, h.events);
  auto run = session->run().eagerlyEvaluate(nullptr);

  auto conn = h.edgeEndpoint->accept().wait(h.io.waitScope);
  KJ_EXPECT(conn->alpn() == "argotunnel");
  KJ_EXPECT(conn->serverName() == "quic.cftunnel.com");
  auto controlStream = conn->acceptStream().wait(h.io.waitScope);
  wire::FixedRegistrationPolicy policy(okResult());
  Observer observer;
  wire::ControlServer control(*controlStream, policy, observer);
  h.events.waitRegistered().wait(h.io.waitScope);
  KJ_EXPECT(h.events.location == "TST");

  KJ_ASSERT(observer.registrations.size() == 1);
  auto& reg = observer.registrations[0];
  KJ_EXPECT(reg.accountTag == "acct-tag");
  kj::byte secret[4] = {1, 2, 3, 4};
  KJ_EXPECT(reg.tunnelSecret == kj::arrayPtr<const kj::byte>(secret, 4));
  KJ_EXPECT(reg.tunnelId == bytes16(0x10));
  KJ_EXPECT(reg.clientId == bytes16(0x40));
  KJ_EXPECT(reg.connIndex == 0);
  KJ_EXPECT(reg.numPreviousAttempts == 3);
  KJ_EXPECT(reg.version == "2026.8.2");
  KJ_EXPECT(reg.features.size() == 5);
  kj::byte mapped[16] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1};
  KJ_EXPECT(reg.originLocalIp == kj::arrayPtr<const kj::byte>(mapped, 16));

  // An unknown signature: that stream is reset, the connection lives on.
  {
    auto s = conn->openStream().wait(h.io.waitScope);
    s->write("GARBAGE!", 8).wait(h.io.waitScope);
    KJ_EXPECT(streamRefused(*s, h.io.waitScope));
  }
  // The data signature followed by an undecodable message: answered with an error (the edge
  // then shows the visitor a 502), the connection lives on.
  {
    auto s = conn->openStream().wait(h.io.waitScope);
    kj::byte bad[32];
    memcpy(bad, wire::DATA_STREAM_SIGNATURE, 6);
    bad[6] = '0';
    bad[7] = '1';
    memset(bad + 8, 0xff, sizeof(bad) - 8);   // segment count 2^32: malformed
    s->write(bad, sizeof(bad)).wait(h.io.waitScope);
    s->shutdownWrite();
    auto response = wire::readConnectResponse(*s).wait(h.io.waitScope);
    auto error = response->getRoot<wire::schema::ConnectResponse>().getError();
    KJ_EXPECT(kj::StringPtr(error).startsWith("malformed request: "), error);
  }
  // A tcp ConnectRequest: answered with ConnectResponse.error.
  {
    auto s = conn->openStream().wait(h.io.waitScope);
    capnp::MallocMessageBuilder msg;
    auto req = msg.initRoot<wire::schema::ConnectRequest>();
    req.setDest("127.0.0.1:22");
    req.setType(wire::schema::ConnectionType::TCP);
    wire::writeConnectRequest(*s, req.asReader()).wait(h.io.waitScope);
    auto response = wire::readConnectResponse(*s).wait(h.io.waitScope);
    auto root = response->getRoot<wire::schema::ConnectResponse>();
    KJ_EXPECT(root.getError().size() > 0);
  }
  // An HTTP request to the hello-world origin.
  {
    auto s = conn->openStream().wait(h.io.waitScope);
    capnp::MallocMessageBuilder msg;
    auto req = msg.initRoot<wire::schema::ConnectRequest>();
    wire::encodeRequest(req, "https://t.example/_health", wire::schema::ConnectionType::HTTP,
                        "GET", "t.example", nullptr);
    wire::writeConnectRequest(*s, req.asReader()).wait(h.io.waitScope);
    s->shutdownWrite();
    auto response = wire::readConnectResponse(*s).wait(h.io.waitScope);
    auto head = wire::decodeResponse(response->getRoot<wire::schema::ConnectResponse>());
    KJ_ASSERT(head.is<wire::HttpResponseHead>());
    KJ_EXPECT(head.get<wire::HttpResponseHead>().status == 200);
    auto body = readAll(*s, h.io.waitScope);
    KJ_EXPECT(kj::heapString(body.asChars()) == "OK", body.asChars());
  }
  // An RPC stream: UDP sessions refused, configuration acknowledged.
  {
    auto s = conn->openStream().wait(h.io.waitScope);
    s->write(wire::RPC_STREAM_SIGNATURE, 6).wait(h.io.waitScope);
    capnp::TwoPartyClient rpc(*s);
    auto server = rpc.bootstrap().castAs<wire::schema::CloudflaredServer>();
    auto udp = server.registerUdpSessionRequest();
    udp.setSessionId(bytes16(0x77));
    udp.setDstPort(53);
    auto udpResult = udp.send().wait(h.io.waitScope);
    KJ_EXPECT(udpResult.getResult().getErr().size() > 0);
    auto cfg = server.updateConfigurationRequest();
    cfg.setVersion(7);
    cfg.setConfig(kj::StringPtr("{\"ingress\":[]}").asBytes());
    auto cfgResult = cfg.send().wait(h.io.waitScope);
    KJ_EXPECT(cfgResult.getResult().getLatestAppliedVersion() == 7);
    KJ_EXPECT(cfgResult.getResult().getErr() == "");
  }
  KJ_EXPECT(observer.configs.size() == 1);
  KJ_EXPECT(observer.configs[0] == "{\"ingress\":[]}");
  KJ_EXPECT(!run.poll(h.io.waitScope), "a bad stream ended the connection");
  KJ_EXPECT(h.status.totalRequests() == 3);   // malformed + tcp + http data streams
  KJ_EXPECT(h.status.concurrentRequests() == 0);
  {
    // The live connection's QUIC statistics feed /metrics under its index.
    auto quic = h.status.quicIndices();
    KJ_ASSERT(quic.size() == 1);
    KJ_EXPECT(quic[0].connIndex == 0 && quic[0].live);
    KJ_EXPECT(quic[0].sample.bytesSent > 0 && quic[0].sample.bytesReceived > 0);
    KJ_EXPECT(quic[0].sample.smoothedRtt > 0 * kj::NANOSECONDS);
    KJ_EXPECT(h.status.quicConnectionsStarted() == 1 && h.status.quicConnectionsClosed() == 0);
  }

  // Graceful shutdown: unregister, close with application error 0.
  session->shutdown(2 * kj::SECONDS).wait(h.io.waitScope);
  auto end = run.wait(h.io.waitScope);
  KJ_EXPECT(end.kind == EndKind::SHUTDOWN);
  {
    auto quic = h.status.quicIndices();
    KJ_ASSERT(quic.size() == 1);
    KJ_EXPECT(!quic[0].live && quic[0].sample.bytesSent > 0);   // totals kept
    KJ_EXPECT(h.status.quicConnectionsClosed() == 1);
  }
  KJ_EXPECT(end.wasRegistered);
  KJ_EXPECT(observer.unregistrations == 1);
  auto closed = conn->onClosed().wait(h.io.waitScope);
  KJ_EXPECT(closed.kind == quic::CloseKind::PEER_APPLICATION_CLOSE, closed.kind);
  KJ_EXPECT(closed.code == 0);
}

KJ_TEST("EdgeConnection: registration errors and duplicate") {
  Harness h;
  EdgeConnectionFactory factory(h.context());
  struct Case {
    wire::RegistrationResult result;
    EndKind kind;
    bool shouldRetry;
  };
  Case cases[] = {
      {wire::RegistrationError{kj::str("bad secret"), 0 * kj::SECONDS, false},
       EndKind::REJECTED, false},
      {wire::RegistrationError{kj::str("later"), 1 * kj::SECONDS, true}, EndKind::REJECTED, true},
      {wire::duplicateConnection(), EndKind::DUPLICATE, true},
  };
  for (auto& c: cases) {
    auto session = factory.newSession(AttemptInfo{1, h.edgeAddress, 0}, h.events);
    auto run = session->run().eagerlyEvaluate(nullptr);
    auto conn = h.edgeEndpoint->accept().wait(h.io.waitScope);
    auto controlStream = conn->acceptStream().wait(h.io.waitScope);
    wire::FixedRegistrationPolicy policy(kj::mv(c.result));
    Observer observer;
    wire::ControlServer control(*controlStream, policy, observer);
    auto end = run.wait(h.io.waitScope);
    KJ_EXPECT(end.kind == c.kind, end.kind, end.reason);
    KJ_EXPECT(end.shouldRetry == c.shouldRetry);
    KJ_EXPECT(!end.wasRegistered);
    KJ_EXPECT(h.events.registeredCount == 0);
  }
  // tunnel_register_fail: two server_error, one dup_edge_conn.
  KJ_EXPECT(h.status.registrationFailures() == 3 && h.status.duplicateRegistrations() == 1);
  KJ_EXPECT(h.status.registrations() == 0);
  KJ_EXPECT(h.status.quicConnectionsStarted() == 3 && h.status.quicConnectionsClosed() == 3);
}

KJ_TEST("EdgeConnection: the edge closing the connection ends it with its reason") {
  Harness h;
  EdgeConnectionFactory factory(h.context());
  auto session = factory.newSession(AttemptInfo{0, h.edgeAddress, 0}, h.events);
  auto run = session->run().eagerlyEvaluate(nullptr);
  auto conn = h.edgeEndpoint->accept().wait(h.io.waitScope);
  auto controlStream = conn->acceptStream().wait(h.io.waitScope);
  wire::FixedRegistrationPolicy policy(okResult());
  Observer observer;
  wire::ControlServer control(*controlStream, policy, observer);
  h.events.waitRegistered().wait(h.io.waitScope);
  conn->close(0x17, "maintenance").wait(h.io.waitScope);
  auto end = run.wait(h.io.waitScope);
  KJ_EXPECT(end.kind == EndKind::LOST);
  KJ_EXPECT(end.wasRegistered);
  KJ_EXPECT(end.reason.endsWith("(application error 0x17, reason \"maintenance\")"), end.reason);
}

KJ_TEST("EdgeConnection: an untrusted edge certificate is a dial failure") {
  Harness h;
  h.config.edgeCaFile = testdata("other-ca.pem");
  EdgeConnectionFactory factory(h.context());
  auto session = factory.newSession(AttemptInfo{0, h.edgeAddress, 0}, h.events);
  auto end = session->run().wait(h.io.waitScope);
  KJ_EXPECT(end.kind == EndKind::DIAL_FAILED, end.kind, end.reason);
}

KJ_TEST("client config: embedded Cloudflare roots + system store, or --edge-ca alone") {
  EdgeConnectionConfig config;
  auto c = makeClientConfig(config);
  KJ_EXPECT(c.alpn == "argotunnel");
  KJ_EXPECT(c.serverName == "quic.cftunnel.com");
  KJ_EXPECT(c.useSystemTrust);
  auto pem = KJ_ASSERT_NONNULL(c.caPem).asPtr();
  KJ_EXPECT(pem.startsWith("# Subject:") || pem.startsWith("-----BEGIN CERTIFICATE-----"));
  KJ_EXPECT(c.caFile == nullptr);
  config.edgeCaFile = kj::str("/tmp/x.pem");
  auto d = makeClientConfig(config);
  KJ_EXPECT(!d.useSystemTrust);
  KJ_EXPECT(KJ_ASSERT_NONNULL(d.caFile) == "/tmp/x.pem");
  KJ_EXPECT(d.caPem == nullptr);
}

// ---- supervision: every way a registered connection can stop serving ends it

struct Registered {
  kj::Own<quic::Connection> conn;
  kj::Own<quic::Stream> controlStream;
  kj::Own<wire::FixedRegistrationPolicy> policy;
  kj::Own<Observer> observer;
  kj::Own<wire::ControlServer> control;
};

Registered acceptRegistration(Harness& h) {
  Registered r;
  r.conn = h.edgeEndpoint->accept().wait(h.io.waitScope);
  r.controlStream = r.conn->acceptStream().wait(h.io.waitScope);
  r.policy = kj::heap<wire::FixedRegistrationPolicy>(okResult());
  r.observer = kj::heap<Observer>();
  r.control = kj::heap<wire::ControlServer>(*r.controlStream, *r.policy, *r.observer);
  h.events.waitRegistered().wait(h.io.waitScope);
  return r;
}

kj::Own<quic::Stream> sendRequest(Harness& h, quic::Connection& conn, kj::StringPtr path,
                                  kj::ArrayPtr<const wire::Header> headers = nullptr) {
  auto s = conn.openStream().wait(h.io.waitScope);
  capnp::MallocMessageBuilder msg;
  auto req = msg.initRoot<wire::schema::ConnectRequest>();
  wire::encodeRequest(req, kj::str("https://t.example", path), wire::schema::ConnectionType::HTTP,
                      "GET", "t.example", headers);
  wire::writeConnectRequest(*s, req.asReader()).wait(h.io.waitScope);
  s->shutdownWrite();
  return s;
}

template <typename Func>
bool eventually(Harness& h, Func&& condition, kj::Duration limit = 3 * kj::SECONDS) {
  return cfqt::testing::eventually(h.timer, h.io.waitScope, kj::fwd<Func>(condition), limit);
}

KJ_TEST("EdgeConnection: the control stream ending tears the connection down") {
  Harness h;
  EdgeConnectionFactory factory(h.context());
  auto session = factory.newSession(AttemptInfo{0, h.edgeAddress, 0}, h.events);
  auto run = session->run().eagerlyEvaluate(nullptr);
  auto r = acceptRegistration(h);
  // The edge drops its side of the control stream (RESET_STREAM + STOP_SENDING); QUIC stays up.
  r.control = nullptr;
  r.controlStream = nullptr;
  auto end = h.timer.timeoutAfter(3 * kj::SECONDS, kj::mv(run)).wait(h.io.waitScope);
  KJ_EXPECT(end.kind == EndKind::LOST, end.kind);
  KJ_EXPECT(end.wasRegistered);
  KJ_EXPECT(end.reason == "the control stream to the edge ended", end.reason);
  KJ_EXPECT(h.events.notReadyCount >= 1);
  auto closed = r.conn->onClosed().wait(h.io.waitScope);
  KJ_EXPECT(closed.kind == quic::CloseKind::PEER_APPLICATION_CLOSE, closed.kind);
}

KJ_TEST("EdgeConnection: an edge that withholds flow-control credit gets the connection replaced") {
  Harness h;
  h.config.stallTimeout = 200 * kj::MILLISECONDS;
  // The fake edge gives a tiny connection window and returns no credit for what it reads.
  h.edgeEndpoint = quic::newEndpoint(h.io.unixEventPort,
                                     KJ_ASSERT_NONNULL(quic::SocketAddress::parse("127.0.0.1:0")));
  quic::ServerConfig sc;
  sc.certFile = testdata("server.pem");
  sc.keyFile = testdata("server-key.pem");
  sc.alpn.add(kj::str("argotunnel"));
  sc.transport.initialConnectionWindow = 16 * 1024;
  sc.transport.maxConnectionWindow = 16 * 1024;
  h.edgeEndpoint->listen(kj::mv(sc));
  h.edgeAddress = KJ_ASSERT_NONNULL(edge::parseIpPort(
      kj::str("127.0.0.1:", h.edgeEndpoint->localAddress().port())));
  EdgeConnectionFactory factory(h.context());
  auto session = factory.newSession(AttemptInfo{0, h.edgeAddress, 0}, h.events);
  auto run = session->run().eagerlyEvaluate(nullptr);
  auto r = acceptRegistration(h);

  // hello-world's page echoes the request headers: 40 KB of them make a response larger than
  // the window the edge will ever grant.
  kj::Vector<wire::Header> headers;
  for (int i = 0; i < 40; i++) {
    headers.add(wire::Header{kj::str("X-Fill-", i), kj::str(kj::repeat('x', 1000))});
  }
  auto s = sendRequest(h, *r.conn, "/", headers);
  s->setCreditWithheld(true);
  auto drained = s->readAllBytes(1 << 20).then([](kj::Array<kj::byte>) {},
                                              [](kj::Exception&&) {}).eagerlyEvaluate(nullptr);
  auto started = h.timer.now();
  auto end = h.timer.timeoutAfter(3 * kj::SECONDS, kj::mv(run)).wait(h.io.waitScope);
  auto took = h.timer.now() - started;
  KJ_EXPECT(end.kind == EndKind::LOST, end.kind);
  KJ_EXPECT(end.wasRegistered);
  KJ_EXPECT(end.reason.startsWith("no flow-control credit from the edge for "), end.reason);
  KJ_EXPECT(took >= 200 * kj::MILLISECONDS && took < 2 * kj::SECONDS, took);
  h.timer.timeoutAfter(3 * kj::SECONDS, kj::mv(drained)).wait(h.io.waitScope);
}

KJ_TEST("EdgeConnection: an edge stream without its preamble in time is reset") {
  Harness h;
  h.config.streamPreambleTimeout = 100 * kj::MILLISECONDS;
  EdgeConnectionFactory factory(h.context());
  auto session = factory.newSession(AttemptInfo{0, h.edgeAddress, 0}, h.events);
  auto run = session->run().eagerlyEvaluate(nullptr);
  auto r = acceptRegistration(h);
  {
    auto s = r.conn->openStream().wait(h.io.waitScope);
    s->write(wire::DATA_STREAM_SIGNATURE, 3).wait(h.io.waitScope);   // half a signature
    auto started = h.timer.now();
    KJ_EXPECT(h.timer.timeoutAfter(2 * kj::SECONDS, kj::evalNow([&]() {
      return streamRefused(*s, h.io.waitScope);
    })).wait(h.io.waitScope));
    KJ_EXPECT(h.timer.now() - started >= 100 * kj::MILLISECONDS);
  }
  {
    auto s = r.conn->openStream().wait(h.io.waitScope);   // signature and version, no request
    s->write(wire::DATA_STREAM_SIGNATURE, 6).wait(h.io.waitScope);
    s->write("01", 2).wait(h.io.waitScope);
    KJ_EXPECT(streamRefused(*s, h.io.waitScope));
  }
  // The connection itself serves on.
  auto ok = sendRequest(h, *r.conn, "/_health");
  auto response = wire::readConnectResponse(*ok).wait(h.io.waitScope);
  KJ_EXPECT(readAll(*ok, h.io.waitScope).asChars() == "OK"_kj.asArray());
  KJ_EXPECT(!run.poll(h.io.waitScope));
}

KJ_TEST("EdgeConnection: the edge abandoning a request cancels its origin exchange") {
  Harness h;
  EdgeConnectionFactory factory(h.context());
  auto session = factory.newSession(AttemptInfo{0, h.edgeAddress, 0}, h.events);
  auto run = session->run().eagerlyEvaluate(nullptr);
  auto r = acceptRegistration(h);
  // hello-world's /sse sends an event per second (the default interval): between events the
  // exchange only waits on the origin, and must still end when the edge gives up the stream.
  auto s = sendRequest(h, *r.conn, "/sse");
  auto response = wire::readConnectResponse(*s).wait(h.io.waitScope);
  KJ_EXPECT(h.origin->getStats().streamsActive == 1);
  KJ_EXPECT(h.status.concurrentRequests() == 1);
  s = nullptr;   // RESET_STREAM + STOP_SENDING, as the edge does when the visitor leaves
  KJ_EXPECT(eventually(h, [&]() { return h.origin->getStats().streamsActive == 0; },
                       500 * kj::MILLISECONDS), "the origin exchange outlived its request");
  KJ_EXPECT(h.status.cancelledRequests() == 1);
  KJ_EXPECT(h.status.concurrentRequests() == 0);
  KJ_EXPECT(!run.poll(h.io.waitScope));
}

KJ_TEST("EdgeConnection: request metadata over the limits is answered with an error, not a reset") {
  Harness h;
  EdgeConnectionFactory factory(h.context());
  auto session = factory.newSession(AttemptInfo{0, h.edgeAddress, 0}, h.events);
  auto run = session->run().eagerlyEvaluate(nullptr);
  auto r = acceptRegistration(h);
  kj::Vector<wire::Header> headers;
  for (int i = 0; i < 100; i++) {
    headers.add(wire::Header{kj::str("X-Big-", i), kj::str(kj::repeat('y', 1000))});
  }
  auto s = sendRequest(h, *r.conn, "/", headers);   // ~100 KB of metadata: over 64 KiB
  auto response = wire::readConnectResponse(*s).wait(h.io.waitScope);
  auto error = response->getRoot<wire::schema::ConnectResponse>().getError();
  KJ_EXPECT(kj::StringPtr(error).startsWith("malformed request: "), error);
  KJ_EXPECT(h.status.requestErrors() == 1);
  KJ_EXPECT(h.status.concurrentRequests() == 0);
  KJ_EXPECT(!run.poll(h.io.waitScope));
}

KJ_TEST("EdgeConnection: --max-concurrent-streams makes the edge's extra streams wait") {
  Harness h;
  h.config.maxConcurrentStreams = 2;
  EdgeConnectionFactory factory(h.context());
  auto session = factory.newSession(AttemptInfo{0, h.edgeAddress, 0}, h.events);
  auto run = session->run().eagerlyEvaluate(nullptr);
  auto r = acceptRegistration(h);
  // Two endless SSE exchanges take both slots; a third stream cannot even be opened.
  auto first = sendRequest(h, *r.conn, "/sse");
  auto second = sendRequest(h, *r.conn, "/sse");
  wire::readConnectResponse(*first).wait(h.io.waitScope);
  wire::readConnectResponse(*second).wait(h.io.waitScope);
  auto third = r.conn->openStream().eagerlyEvaluate(nullptr);
  h.timer.afterDelay(100 * kj::MILLISECONDS).wait(h.io.waitScope);
  KJ_EXPECT(!third.poll(h.io.waitScope), "a third stream was admitted");
  KJ_EXPECT(h.origin->getStats().streamsActive == 2);
  // One visitor leaves: its slot frees and the waiting stream gets it.
  first = nullptr;
  auto s = h.timer.timeoutAfter(2 * kj::SECONDS, kj::mv(third)).wait(h.io.waitScope);
  s = nullptr;
  second = nullptr;
  KJ_EXPECT(!run.poll(h.io.waitScope));
}

// ---- EdgeDialer: HTTP/2 over TCP + TLS, and auto's fallback to it

kj::String readTestdata(kj::StringPtr name) {
  return kj::str(kj::newDiskFilesystem()->getRoot().openFile(
      kj::Path::parse(testdata(name).slice(1)))->readAllText());
}

struct TlsEdge {
  // A TCP + TLS listener playing the HTTP/2 edge's handshake (certificate for quic.cftunnel.com,
  // signed by the test CA). Accepted connections are kept open.
  kj::TlsKeypair keypair;
  kj::Own<kj::TlsContext> tls;
  kj::Own<kj::ConnectionReceiver> listener;
  kj::Vector<kj::Own<kj::AsyncIoStream>> accepted;
  kj::Promise<void> loop = nullptr;

  explicit TlsEdge(Harness& h)
      : keypair{kj::TlsPrivateKey(readTestdata("server-key.pem")),
                kj::TlsCertificate(readTestdata("server.pem"))} {
    kj::TlsContext::Options options;
    options.useSystemTrustStore = false;
    options.defaultKeypair = keypair;
    tls = kj::heap<kj::TlsContext>(kj::mv(options));
    auto address = h.io.provider->getNetwork().parseAddress("127.0.0.1", 0).wait(h.io.waitScope);
    listener = tls->wrapPort(address->listen());
    loop = acceptLoop().eagerlyEvaluate([](kj::Exception&&) {});
  }

  kj::Promise<void> acceptLoop() {
    return listener->accept().then([this](kj::Own<kj::AsyncIoStream> s) {
      accepted.add(kj::mv(s));
      return acceptLoop();
    });
  }

  edge::EdgeAddress address() {
    return KJ_ASSERT_NONNULL(edge::parseIpPort(kj::str("127.0.0.1:", listener->getPort())));
  }
};

KJ_TEST("EdgeDialer: http2 dials TCP + TLS verified against --edge-ca; a foreign CA fails") {
  Harness h;
  TlsEdge edge(h);
  DialerConfig config;
  config.protocol = Protocol::HTTP2;
  config.http2ServerName = kj::str("quic.cftunnel.com");   // the test certificate's name
  config.tcpConnectTimeout = 2 * kj::SECONDS;
  {
    EdgeDialer dialer(h.io.unixEventPort, h.io.provider->getNetwork(), h.timer, h.logger,
                      h.config, kj::mv(config));
    auto transport = h.timer.timeoutAfter(3 * kj::SECONDS, dialer.dial(edge.address()))
        .wait(h.io.waitScope);
    KJ_EXPECT(transport->protocol() == "http2");
  }
  h.config.edgeCaFile = testdata("other-ca.pem");
  DialerConfig other;
  other.protocol = Protocol::HTTP2;
  other.http2ServerName = kj::str("quic.cftunnel.com");
  other.tcpConnectTimeout = 2 * kj::SECONDS;
  EdgeDialer dialer(h.io.unixEventPort, h.io.provider->getNetwork(), h.timer, h.logger, h.config,
                    kj::mv(other));
  KJ_EXPECT_THROW_MESSAGE("HTTP/2 (TCP + TLS) to 127.0.0.1:",
      h.timer.timeoutAfter(3 * kj::SECONDS, dialer.dial(edge.address())).wait(h.io.waitScope));
  // Roots that cannot be loaded are a clear start-up error.
  h.config.edgeCaFile = kj::str("/nonexistent/ca.pem");
  DialerConfig missing;
  missing.protocol = Protocol::HTTP2;
  KJ_EXPECT_THROW_MESSAGE("--edge-ca /nonexistent/ca.pem: cannot read",
      EdgeDialer(h.io.unixEventPort, h.io.provider->getNetwork(), h.timer, h.logger, h.config,
                 kj::mv(missing)));
}

KJ_TEST("EdgeDialer: auto falls back to HTTP/2 when UDP gets no answer, QUIC otherwise") {
  Harness h;
  TlsEdge edge(h);   // TCP only: nothing answers UDP on its port
  DialerConfig config;
  config.protocol = Protocol::AUTO;
  config.http2ServerName = kj::str("quic.cftunnel.com");
  config.fallbackAfter = 200 * kj::MILLISECONDS;
  config.tcpConnectTimeout = 2 * kj::SECONDS;
  EdgeDialer dialer(h.io.unixEventPort, h.io.provider->getNetwork(), h.timer, h.logger, h.config,
                    kj::mv(config));
  auto started = h.timer.now();
  auto transport = h.timer.timeoutAfter(3 * kj::SECONDS, dialer.dial(edge.address()))
      .wait(h.io.waitScope);
  KJ_EXPECT(transport->protocol() == "http2");
  KJ_EXPECT(h.timer.now() - started >= 200 * kj::MILLISECONDS);
  // The address is remembered: the next attempt goes to HTTP/2 at once.
  started = h.timer.now();
  auto again = h.timer.timeoutAfter(3 * kj::SECONDS, dialer.dial(edge.address()))
      .wait(h.io.waitScope);
  KJ_EXPECT(again->protocol() == "http2");
  KJ_EXPECT(h.timer.now() - started < 200 * kj::MILLISECONDS);
  // Where QUIC answers, auto stays on QUIC.
  auto quicEdge = h.edgeEndpoint->accept();
  auto viaQuic = h.timer.timeoutAfter(3 * kj::SECONDS, dialer.dial(h.edgeAddress))
      .wait(h.io.waitScope);
  KJ_EXPECT(viaQuic->protocol() == "quic");
}


struct CapturedLog {
  // A logger writing (WARN and up) to a file of its own, read back by the test.
  kj::String path = kj::str("/tmp/cfqt-dialer-test-", getpid(), "-", counter++, ".log");
  observe::Logger logger{observe::LogConfig{observe::LogLevel::WARN, kj::str(path), false}};
  static inline uint counter = 0;

  ~CapturedLog() noexcept(false) { unlink(path.cStr()); }

  kj::String text() {
    return kj::str(kj::newDiskFilesystem()->getRoot().openFile(
        kj::Path::parse(path.slice(1)))->readAllText());
  }
  uint count(kj::StringPtr needle) {
    uint n = 0;
    auto all = text();
    const char* at = all.cStr();
    while ((at = strstr(at, needle.cStr())) != nullptr) {
      n++;
      at += needle.size();
    }
    return n;
  }
};

KJ_TEST("EdgeDialer: a send this host refuses moves auto to HTTP/2 at once; quic keeps failing") {
  // faultSendErrno plays the host firewall (sendmsg: EPERM). With --fallback-after 30s, only the
  // refusal can bring auto to HTTP/2 within the 5 s the test waits.
  Harness h;
  TlsEdge edge(h);
  h.config.transport.faultSendErrno = EPERM;
  CapturedLog log;
  DialerConfig config;
  config.protocol = Protocol::AUTO;
  config.http2ServerName = kj::str("quic.cftunnel.com");
  config.fallbackAfter = 30 * kj::SECONDS;
  config.tcpConnectTimeout = 2 * kj::SECONDS;
  EdgeDialer dialer(h.io.unixEventPort, h.io.provider->getNetwork(), h.timer, log.logger,
                    h.config, kj::mv(config));
  auto transport = h.timer.timeoutAfter(5 * kj::SECONDS, dialer.dial(edge.address()))
      .wait(h.io.waitScope);
  KJ_EXPECT(transport->protocol() == "http2");
  auto line = kj::str("UDP to ", edge.address().toString(), " is refused by this host "
                      "(sendmsg: Operation not permitted); using HTTP/2 over TCP. Allow outbound "
                      "UDP ", edge.address().port, " for QUIC.");
  KJ_EXPECT(log.count(line) == 1, log.text());
  KJ_EXPECT(log.count("errno=EPERM") == 1, log.text());
  // Remembered: the next attempt goes straight to HTTP/2, without a second line.
  auto again = h.timer.timeoutAfter(5 * kj::SECONDS, dialer.dial(edge.address()))
      .wait(h.io.waitScope);
  KJ_EXPECT(again->protocol() == "http2");
  KJ_EXPECT(log.count("is refused by this host") == 1, log.text());

  // An explicit quic never falls back: the attempt fails at once with what to change.
  DialerConfig quicOnly;
  quicOnly.protocol = Protocol::QUIC;
  EdgeDialer strict(h.io.unixEventPort, h.io.provider->getNetwork(), h.timer, log.logger,
                    h.config, kj::mv(quicOnly));
  auto accepted = edge.accepted.size();
  for (int i = 0; i < 2; i++) {
    KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
      h.timer.timeoutAfter(5 * kj::SECONDS, strict.dial(edge.address())).wait(h.io.waitScope);
    })) {
      auto text = e->getDescription();
      KJ_EXPECT(quic::classifyException(*e) == quic::CloseKind::SEND_REFUSED, *e);
      KJ_EXPECT(strstr(text.cStr(), "Operation not permitted (EPERM)") != nullptr, text);
      KJ_EXPECT(strstr(text.cStr(), "--protocol quic does not fall back: allow outbound UDP") !=
                nullptr, text);
    } else {
      KJ_FAIL_EXPECT("quic dial succeeded although every send is refused");
    }
  }
  KJ_EXPECT(edge.accepted.size() == accepted, "quic dialled HTTP/2");
}

class DeadTransport final: public EdgeTransport {
  // What the dialer's lost() reads of a connection that ended.
public:
  explicit DeadTransport(kj::StringPtr protocolName): name(protocolName) {}
  kj::StringPtr protocol() const override { return name; }
  kj::Promise<kj::Own<kj::AsyncIoStream>> openControlStream() override {
    return KJ_EXCEPTION(DISCONNECTED, "closed");
  }
  kj::Promise<kj::Own<EdgeStream>> acceptStream() override {
    return KJ_EXCEPTION(DISCONNECTED, "closed");
  }
  void close(uint64_t, kj::StringPtr) override {}
  kj::Promise<void> onClosed() override { return kj::READY_NOW; }
  bool isClosed() const override { return true; }
  kj::String closeDescription() const override {
    return kj::str("timeout: no recent network activity (idle timeout)");
  }
  kj::Maybe<PeerClose> peerClose() const override { return nullptr; }
  observe::TunnelStatus::QuicSample sample() const override { return {}; }
  kj::Duration blockedFor() const override { return 0 * kj::SECONDS; }

private:
  kj::StringPtr name;
};

KJ_TEST("EdgeDialer: auto moves an address to HTTP/2 when QUIC keeps dying, and back later") {
  Harness h;
  // QUIC (h.edgeEndpoint) and TCP + TLS on the same port number, like the real edge.
  kj::Own<TlsEdge> edge;
  kj::Own<quic::Endpoint> quicEdge;
  for (int i = 0; i < 20 && quicEdge.get() == nullptr; i++) {
    edge = kj::heap<TlsEdge>(h);
    KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
      quicEdge = quic::newEndpoint(h.io.unixEventPort, KJ_ASSERT_NONNULL(
          quic::SocketAddress::parse(kj::str("127.0.0.1:", edge->address().port))));
    })) {}   // that UDP port is taken: another TCP port
  }
  KJ_ASSERT(quicEdge.get() != nullptr);
  quic::ServerConfig sc;
  sc.certFile = testdata("server.pem");
  sc.keyFile = testdata("server-key.pem");
  sc.alpn.add(kj::str("argotunnel"));
  quicEdge->listen(kj::mv(sc));
  auto address = edge->address();

  CapturedLog log;
  DialerConfig config;
  config.protocol = Protocol::AUTO;
  config.http2ServerName = kj::str("quic.cftunnel.com");
  config.fallbackAfter = 2 * kj::SECONDS;
  config.tcpConnectTimeout = 2 * kj::SECONDS;
  config.quicFailureLimit = 3;
  config.quicFailureWindow = 200 * kj::MILLISECONDS;
  config.quicRetryInterval = 100 * kj::MILLISECONDS;
  EdgeDialer dialer(h.io.unixEventPort, h.io.provider->getNetwork(), h.timer, log.logger,
                    h.config, kj::mv(config));
  auto dial = [&]() {
    return h.timer.timeoutAfter(5 * kj::SECONDS, dialer.dial(address)).wait(h.io.waitScope);
  };
  DeadTransport deadQuic("quic");
  DeadTransport deadHttp2("http2");

  // Two deaths, then a third after the first left the window: not "keeps dying".
  dialer.lost(address, deadQuic);
  dialer.lost(address, deadQuic);
  h.timer.afterDelay(300 * kj::MILLISECONDS).wait(h.io.waitScope);
  dialer.lost(address, deadQuic);
  // HTTP/2 connections ending never count.
  for (int i = 0; i < 5; i++) dialer.lost(address, deadHttp2);
  KJ_EXPECT(dial()->protocol() == "quic");
  KJ_EXPECT(log.count("QUIC connections to") == 0, log.text());

  // Two more within the window make three: the address uses HTTP/2, with one line.
  dialer.lost(address, deadQuic);
  dialer.lost(address, deadQuic);
  auto line = kj::str("QUIC connections to ", address.toString(), " ended 3 times within 200ms; "
                      "using HTTP/2 over TCP. UDP ", address.port, " to the edge seems filtered "
                      "or unreliable on this network; QUIC is tried again in 100ms.");
  KJ_EXPECT(log.count(line) == 1, log.text());
  KJ_EXPECT(log.count("last=\"timeout: no recent network activity (idle timeout)\"") == 1,
            log.text());
  auto fallback = dial();
  KJ_EXPECT(fallback->protocol() == "http2");

  // QUIC is tried again in the background; it works, so the connection may move back.
  auto preferred = KJ_ASSERT_NONNULL(dialer.whenPreferredAgain(address, *fallback));
  h.timer.timeoutAfter(5 * kj::SECONDS, kj::mv(preferred)).wait(h.io.waitScope);
  KJ_EXPECT(dial()->protocol() == "quic");

  // A dialer for --protocol quic or http2 never counts deaths.
  DialerConfig quicOnly;
  quicOnly.protocol = Protocol::QUIC;
  quicOnly.quicFailureLimit = 1;
  EdgeDialer strict(h.io.unixEventPort, h.io.provider->getNetwork(), h.timer, log.logger,
                    h.config, kj::mv(quicOnly));
  strict.lost(address, deadQuic);
  KJ_EXPECT(h.timer.timeoutAfter(5 * kj::SECONDS, strict.dial(address)).wait(h.io.waitScope)
                ->protocol() == "quic");
  KJ_EXPECT(log.count("QUIC connections to") == 1, log.text());
}

}  // namespace
}  // namespace cfqt::tunnel
