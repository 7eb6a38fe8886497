// The QUIC edge end to end on loopback: a minimal in-test tunnel client (quic::Endpoint +
// wire::ControlClient for registration, raw capnp and recorded bytes on data streams) against an
// in-process Emulator, with public requests through the front door.

#include "emulator.h"
#include "front-door.h"
#include "random.h"

#include "quic/endpoint.h"
#include "wire/control.h"
#include "wire/data-stream.h"
#include "wire/quic_metadata_protocol.capnp.h"
#include "wire/test-vectors.h"
#include "wire/tunnelrpc.capnp.h"
#include "eventually.h"

#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>

#include <capnp/message.h>
#include <capnp/rpc.capnp.h>
#include <capnp/serialize-async.h>
#include <capnp/serialize.h>
#include <kj/async-io.h>
#include <kj/debug.h>
#include <kj/encoding.h>
#include <kj/test.h>

#include <stdlib.h>
#include <unistd.h>

namespace cfqt::emulator {
namespace {

namespace schema = wire::schema;

constexpr kj::byte PREAMBLE[8] = {0x0A, 0x36, 0xCD, 0x12, 0xA1, 0x3E, '0', '1'};

kj::String tempStateDir() {
  char templ[] = "/tmp/cfqt-emulator-edge-XXXXXX";
  KJ_ASSERT(mkdtemp(templ) != nullptr);
  return kj::str(templ);
}

void removeStateDir(kj::StringPtr dir) {
  for (auto name: {"ca.pem", "ca-key.pem", "server.pem", "server-key.pem"}) {
    unlink(kj::str(dir, '/', name).cStr());
  }
  rmdir(dir.cStr());
}

const wire::testing::VectorFile& vectors() {
  static const wire::testing::VectorFile file =
      wire::testing::loadVectorFile(wire::testing::defaultVectorPath());
  return file;
}

kj::ArrayPtr<const kj::byte> vector(kj::StringPtr titlePart) {
  for (auto& v: vectors().dataStreams) {
    if (strstr(v.title.cStr(), titlePart.cStr()) != nullptr) return v.bytes;
  }
  KJ_FAIL_ASSERT("no such vector", titlePart);
}

kj::Array<kj::byte> encodeResponse(kj::uint status, kj::Maybe<uint64_t> contentLength) {
  capnp::MallocMessageBuilder message;
  auto root = message.initRoot<schema::ConnectResponse>();
  auto metadata = root.initMetadata(contentLength == nullptr ? 1 : 2);
  metadata[0].setKey("HttpStatus");
  metadata[0].setVal(kj::str(status));
  KJ_IF_MAYBE(l, contentLength) {
    metadata[1].setKey("HttpHeader:Content-Length");
    metadata[1].setVal(kj::str(*l));
  }
  auto words = capnp::messageToFlatArray(message);
  auto bytes = words.asBytes();
  auto out = kj::heapArray<kj::byte>(8 + bytes.size());
  memcpy(out.begin(), PREAMBLE, 8);
  memcpy(out.begin() + 8, bytes.begin(), bytes.size());
  return out;
}

kj::Promise<void> writeBytes(kj::AsyncOutputStream& out, kj::Array<kj::byte> bytes) {
  auto promise = out.write(bytes.begin(), bytes.size());
  return promise.attach(kj::mv(bytes));
}

kj::Promise<kj::Own<capnp::MessageReader>> readRequest(kj::AsyncIoStream& stream) {
  auto preamble = kj::heapArray<kj::byte>(8);
  auto promise = stream.read(preamble.begin(), 8);
  return promise.then([&stream, preamble = kj::mv(preamble)]() {
    KJ_ASSERT(preamble.asPtr() == kj::arrayPtr(PREAMBLE, 8), "bad data-stream preamble");
    return capnp::readMessage(stream);
  });
}

kj::Array<kj::byte> pattern(size_t size, uint32_t seed) {
  auto result = kj::heapArray<kj::byte>(size);
  uint32_t x = seed * 2654435761u + 1;
  for (size_t i = 0; i < size; i++) {
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    result[i] = static_cast<kj::byte>(x);
  }
  return result;
}

struct Setup {
  explicit Setup(kj::Duration edgeIdle = 5 * kj::SECONDS,
                 kj::Maybe<quic::TransportConfig> transport = nullptr)
      : io(kj::setupAsyncIo()), stateDir(tempStateDir()),
        emulator(io, options(edgeIdle, kj::mv(transport))) {
    ready = emulator.start().wait(io.waitScope);
    KJ_ASSERT(ready.edges.size() == 1);
    edge = KJ_ASSERT_NONNULL(quic::SocketAddress::parse(ready.edges[0]));
  }
  ~Setup() noexcept(false) { removeStateDir(stateDir); }

  EmulatorOptions options(kj::Duration edgeIdle, kj::Maybe<quic::TransportConfig> transport) {
    EmulatorOptions o;
    o.certificates.stateDir = kj::heapString(stateDir);
    KJ_IF_MAYBE(t, transport) o.edgeTransport = *t;
    o.edgeTransport.maxIdleTimeout = edgeIdle;
    o.frontDoor.responseHeadTimeout = 10 * kj::SECONDS;
    return o;
  }

  quic::ClientConfig clientConfig() {
    quic::ClientConfig config;
    config.caFile = kj::heapString(ready.ca);
    config.transport.keepAlivePeriod = 100 * kj::MILLISECONDS;
    config.transport.handshakeTimeout = 5 * kj::SECONDS;
    return config;
  }

  kj::Own<kj::HttpClient> publicClient() {
    auto address = io.provider->getNetwork().parseAddress(ready.publicAddress)
        .wait(io.waitScope);
    kj::HttpClientSettings settings;
    settings.entropySource = entropy;
    auto client = kj::newHttpClient(io.provider->getTimer(), table, *address, settings);
    return client.attach(kj::mv(address));
  }

  kj::Own<kj::AsyncIoStream> dialPublic() {
    auto address = io.provider->getNetwork().parseAddress(ready.publicAddress)
        .wait(io.waitScope);
    return address->connect().wait(io.waitScope);
  }

  kj::Own<kj::HttpClient> adminClient() {
    auto address = io.provider->getNetwork().parseAddress(ready.admin).wait(io.waitScope);
    auto client = kj::newHttpClient(io.provider->getTimer(), table, *address);
    return client.attach(kj::mv(address));
  }

  kj::uint adminPost(kj::StringPtr url, kj::String* bodyOut = nullptr) {
    auto admin = adminClient();
    kj::HttpHeaders headers(table);
    auto response = admin->request(kj::HttpMethod::POST, url, headers, uint64_t(0)).response
        .wait(io.waitScope);
    auto body = response.body->readAllText().wait(io.waitScope);
    if (bodyOut != nullptr) *bodyOut = kj::mv(body);
    return response.statusCode;
  }

  void waitUntil(kj::Function<bool()> condition, kj::StringPtr what) {
    KJ_ASSERT(cfqt::testing::eventually(io.provider->getTimer(), io.waitScope, condition,
                                  10 * kj::SECONDS),
              "timed out waiting", what);
  }

  kj::AsyncIoContext io;
  kj::String stateDir;
  Emulator emulator;
  ReadyInfo ready;
  quic::SocketAddress edge;
  kj::HttpHeaderTable table;
  RandomEntropySource entropy;
};

struct TunnelClient {
  // A minimal tunnel client: one QUIC connection, the control stream, registration.
  TunnelClient(Setup& setup, quic::ClientConfig config = {})
      : setup(setup),
        endpoint(quic::newEndpoint(setup.io.unixEventPort,
                                   KJ_ASSERT_NONNULL(quic::SocketAddress::parse("127.0.0.1:0")))) {
    if (config.caFile == nullptr) config = setup.clientConfig();
    connection = endpoint->dial(setup.edge, kj::mv(config)).wait(setup.io.waitScope);
    control = connection->openStream().wait(setup.io.waitScope);
    rpc = kj::heap<wire::ControlClient>(*control, setup.io.provider->getTimer());
  }
  ~TunnelClient() noexcept(false) {
    rpc = nullptr;
    control = nullptr;
    connection = nullptr;
  }

  wire::RegistrationResult registerAs(const IssuedTunnel& tunnel, uint8_t index = 0) {
    wire::RegistrationParams params;
    params.accountTag = kj::heapString(tunnel.accountTag);
    params.tunnelSecret = kj::heapArray(tunnel.secret.asPtr());
    params.tunnelId = kj::heapArray(tunnel.idBytes.asPtr());
    params.connIndex = index;
    params.clientId = randomUuidBytes();
    params.version = kj::str("2023.7.3");
    params.arch = kj::str("linux_amd64");
    params.originLocalIp = kj::heapArray<kj::byte>(16);
    return rpc->registerConnection(params).wait(setup.io.waitScope);
  }

  Setup& setup;
  kj::Own<quic::Endpoint> endpoint;
  kj::Own<quic::Connection> connection;
  kj::Own<quic::Stream> control;
  kj::Own<wire::ControlClient> rpc;
};

kj::Own<quic::Stream> nextStream(quic::Connection& connection, kj::Timer& timer,
                                 kj::WaitScope& waitScope) {
  // Bounded: a request that never reaches the client fails the test in 10 s.
  return timer.timeoutAfter(10 * kj::SECONDS, connection.acceptStream()).wait(waitScope);
}

uint64_t statField(ConnectionRecord& record, kj::StringPtr name) {
  // One number from the edge's describeStats() JSON (the admin API's "stats").
  auto json = KJ_ASSERT_NONNULL(record.connection).describeStats();
  auto key = kj::str('"', name, "\":");
  auto at = strstr(json.cStr(), key.cStr());
  KJ_ASSERT(at != nullptr, json, name);
  return strtoull(at + key.size(), nullptr, 10);
}

ConnectionRecord& onlyRecord(Emulator& emulator, ConnectionState state) {
  ConnectionRecord* found = nullptr;
  for (auto& r: emulator.registry().connections()) {
    if (r->state == state) {
      KJ_ASSERT(found == nullptr, "more than one record in that state");
      found = r.get();
    }
  }
  return *KJ_ASSERT_NONNULL(kj::Maybe<ConnectionRecord*>(found));
}

// =============================================================================================

KJ_TEST("registration over QUIC: accepted, configuration, unregister, then no new requests") {
  Setup setup;
  auto& tunnel = setup.emulator.registry().issueTunnel();
  TunnelClient client(setup);
  KJ_EXPECT(client.connection->alpn() == "argotunnel");
  auto result = client.registerAs(tunnel);
  KJ_ASSERT(result.is<wire::ConnectionDetails>());
  auto& details = result.get<wire::ConnectionDetails>();
  KJ_EXPECT(details.uuid.size() == 16);
  KJ_EXPECT(details.locationName == "EMU");
  KJ_EXPECT(!details.tunnelIsRemotelyManaged);

  auto& record = onlyRecord(setup.emulator, ConnectionState::REGISTERED);
  KJ_EXPECT(record.uuid.asPtr() == details.uuid.asPtr());
  KJ_EXPECT(record.version == "2023.7.3");
  KJ_EXPECT(record.arch == "linux_amd64");

  auto json = "{\"ingress\":[{\"service\":\"http://localhost:8080\"}]}"_kj;
  client.rpc->updateLocalConfiguration(json.asBytes()).wait(setup.io.waitScope);
  KJ_EXPECT(KJ_ASSERT_NONNULL(record.configuration) == json);

  client.rpc->unregisterConnection().wait(setup.io.waitScope);
  KJ_EXPECT(record.state == ConnectionState::UNREGISTERED);
  auto publicClient = setup.publicClient();
  kj::HttpHeaders headers(setup.table);
  headers.set(kj::HttpHeaderId::HOST, tunnel.hostname);
  auto response = publicClient->request(kj::HttpMethod::GET, "/", headers).response
      .wait(setup.io.waitScope);
  KJ_EXPECT(response.statusCode == 530);
}

KJ_TEST("registration over QUIC: EDUPCONN, Unauthorized, injected rejection") {
  Setup setup;
  auto& tunnel = setup.emulator.registry().issueTunnel();
  TunnelClient first(setup);
  KJ_ASSERT(first.registerAs(tunnel, 0).is<wire::ConnectionDetails>());

  TunnelClient second(setup);
  auto dup = second.registerAs(tunnel, 0);
  KJ_ASSERT(dup.is<wire::RegistrationError>());
  KJ_EXPECT(dup.get<wire::RegistrationError>().isDuplicate());

  IssuedTunnel forged;
  forged.accountTag = kj::heapString(tunnel.accountTag);
  forged.secret = randomBytes(32);
  forged.idBytes = kj::heapArray(tunnel.idBytes.asPtr());
  auto unauthorized = second.registerAs(forged, 1);
  KJ_ASSERT(unauthorized.is<wire::RegistrationError>());
  KJ_EXPECT(strstr(unauthorized.get<wire::RegistrationError>().cause.cStr(), "Unauthorized")
            != nullptr);

  setup.emulator.registry().rejectNextRegistrations(
      {kj::str("edge is full"), 3000000000, true});
  auto rejected = second.registerAs(tunnel, 1);
  KJ_ASSERT(rejected.is<wire::RegistrationError>());
  auto& error = rejected.get<wire::RegistrationError>();
  KJ_EXPECT(error.cause == "edge is full");
  KJ_EXPECT(error.retryAfter == 3 * kj::SECONDS);
  KJ_EXPECT(error.shouldRetry);
  KJ_EXPECT(second.registerAs(tunnel, 1).is<wire::ConnectionDetails>());
}

kj::Promise<void> serveEcho(quic::Connection& connection, kj::Timer& timer,
                            kj::WaitScope& waitScope, bool withLength) {
  auto stream = nextStream(connection, timer, waitScope);
  auto request = readRequest(*stream).wait(waitScope);
  auto root = request->getRoot<schema::ConnectRequest>();
  KJ_EXPECT(root.getType() == schema::ConnectionType::HTTP);
  auto body = stream->readAllBytes().wait(waitScope);
  writeBytes(*stream, encodeResponse(200, withLength ? kj::Maybe<uint64_t>(body.size())
                                                     : kj::Maybe<uint64_t>(nullptr)))
      .wait(waitScope);
  auto promise = writeBytes(*stream, kj::mv(body));
  return promise.then([stream = kj::mv(stream)]() mutable { stream->shutdownWrite(); });
}

KJ_TEST("proxying over QUIC: recorded response; body integrity 0 B, 1 B, 1 MiB, 64 MiB") {
  Setup setup;
  auto& tunnel = setup.emulator.registry().issueTunnel();
  TunnelClient client(setup);
  KJ_ASSERT(client.registerAs(tunnel).is<wire::ConnectionDetails>());
  auto publicClient = setup.publicClient();

  {
    kj::HttpHeaders headers(setup.table);
    headers.set(kj::HttpHeaderId::HOST, tunnel.hostname);
    auto response = publicClient->request(kj::HttpMethod::GET, "/hello?x=1", headers).response;
    auto stream = nextStream(*client.connection, setup.io.provider->getTimer(), setup.io.waitScope);
    KJ_EXPECT(stream->id() % 4 == 1, stream->id());   // server-initiated bidirectional
    auto request = readRequest(*stream).wait(setup.io.waitScope);
    KJ_EXPECT(request->getRoot<schema::ConnectRequest>().getDest() ==
              kj::str("https://", tunnel.hostname, "/hello?x=1"));
    writeBytes(*stream, kj::heapArray(vector("ConnectResponse success"))).wait(setup.io.waitScope);
    writeBytes(*stream, kj::heapArray("hi"_kj.asBytes())).wait(setup.io.waitScope);
    stream->shutdownWrite();
    auto r = response.wait(setup.io.waitScope);
    KJ_EXPECT(r.statusCode == 200);
    KJ_EXPECT(KJ_ASSERT_NONNULL(r.headers->get(kj::HttpHeaderId::CONTENT_TYPE)) == "text/plain");
    KJ_EXPECT(r.body->readAllText().wait(setup.io.waitScope) == "hi");
  }

  struct Case { size_t size; bool requestLength; bool responseLength; };
  for (auto c: {Case{0, true, true}, Case{0, false, false}, Case{1, true, false},
                Case{1, false, true}, Case{1 << 20, true, true}, Case{1 << 20, false, false},
                Case{64 << 20, true, false}, Case{64 << 20, false, true}}) {
    KJ_CONTEXT(c.size, c.requestLength, c.responseLength);
    auto data = pattern(c.size, static_cast<uint32_t>(c.size) + c.requestLength);
    kj::HttpHeaders headers(setup.table);
    headers.set(kj::HttpHeaderId::HOST, tunnel.hostname);
    auto request = publicClient->request(kj::HttpMethod::POST, "/echo", headers,
        c.requestLength ? kj::Maybe<uint64_t>(data.size()) : kj::Maybe<uint64_t>(nullptr));
    auto writing = request.body->write(data.begin(), data.size())
        .then([body = kj::mv(request.body)]() mutable { body = nullptr; })
        .eagerlyEvaluate(nullptr);
    auto serving = serveEcho(*client.connection, setup.io.provider->getTimer(), setup.io.waitScope,
                             c.responseLength)
        .eagerlyEvaluate(nullptr);
    auto r = request.response.wait(setup.io.waitScope);
    KJ_EXPECT(r.statusCode == 200);
    auto got = r.body->readAllBytes().wait(setup.io.waitScope);
    writing.wait(setup.io.waitScope);
    serving.wait(setup.io.waitScope);
    KJ_EXPECT(got.size() == data.size(), got.size());
    KJ_EXPECT(got.asPtr() == data.asPtr());
  }
}

kj::Array<kj::byte> encodeUpgrade(kj::StringPtr key) {
  auto input = kj::str(key, "258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
  kj::byte digest[20];
  KJ_ASSERT(gnutls_hash_fast(GNUTLS_DIG_SHA1, input.begin(), input.size(), digest) == 0);
  auto accept = kj::encodeBase64(kj::arrayPtr(digest, 20));
  capnp::MallocMessageBuilder message;
  auto metadata = message.initRoot<schema::ConnectResponse>().initMetadata(4);
  metadata[0].setKey("HttpStatus");
  metadata[0].setVal("101");
  metadata[1].setKey("HttpHeader:Connection");
  metadata[1].setVal("Upgrade");
  metadata[2].setKey("HttpHeader:Upgrade");
  metadata[2].setVal("websocket");
  metadata[3].setKey("HttpHeader:Sec-Websocket-Accept");
  metadata[3].setVal(accept);
  auto words = capnp::messageToFlatArray(message);
  auto out = kj::heapArray<kj::byte>(8 + words.asBytes().size());
  memcpy(out.begin(), PREAMBLE, 8);
  memcpy(out.begin() + 8, words.asBytes().begin(), words.asBytes().size());
  return out;
}

KJ_TEST("over QUIC: WebSocket pipe, ConnectResponse.error, RESET_STREAM mid-body") {
  Setup setup;
  auto& tunnel = setup.emulator.registry().issueTunnel();
  TunnelClient client(setup);
  KJ_ASSERT(client.registerAs(tunnel).is<wire::ConnectionDetails>());
  auto& timer = setup.io.provider->getTimer();
  auto& ws = setup.io.waitScope;

  // WebSocket: the public client (kj, masked) talks to an "origin" WebSocket on the QUIC stream.
  {
    auto publicClient = setup.publicClient();
    kj::HttpHeaders headers(setup.table);
    headers.set(kj::HttpHeaderId::HOST, tunnel.hostname);
    auto upgrade = publicClient->openWebSocket("/chat", headers);
    auto stream = nextStream(*client.connection, timer, ws);
    auto request = readRequest(*stream).wait(ws);
    auto root = request->getRoot<schema::ConnectRequest>();
    KJ_EXPECT(root.getType() == schema::ConnectionType::WEBSOCKET);
    kj::String key;
    for (auto m: root.getMetadata()) {
      if (m.getKey() == "HttpHeader:Sec-Websocket-Key") key = kj::str(m.getVal());
    }
    KJ_ASSERT(key.size() > 0);
    writeBytes(*stream, encodeUpgrade(key)).wait(ws);
    auto response = upgrade.wait(ws);
    KJ_ASSERT(response.statusCode == 101, response.statusCode);
    auto publicSocket = kj::mv(response.webSocketOrBody.get<kj::Own<kj::WebSocket>>());
    auto originSocket = kj::newWebSocket(kj::mv(stream), nullptr);
    publicSocket->send(kj::StringPtr("ping over quic")).wait(ws);
    KJ_EXPECT(originSocket->receive().wait(ws).get<kj::String>() == "ping over quic");
    auto blob = pattern(300000, 9);
    originSocket->send(blob.asPtr()).wait(ws);
    KJ_EXPECT(publicSocket->receive().wait(ws).get<kj::Array<kj::byte>>().asPtr() == blob.asPtr());
    publicSocket->close(1000, "done").wait(ws);
    KJ_EXPECT(originSocket->receive().wait(ws).get<kj::WebSocket::Close>().code == 1000);
  }

  // ConnectResponse.error, the recorded 2023.7.3 bytes.
  {
    auto publicClient = setup.publicClient();
    kj::HttpHeaders headers(setup.table);
    headers.set(kj::HttpHeaderId::HOST, tunnel.hostname);
    auto response = publicClient->request(kj::HttpMethod::GET, "/", headers).response;
    auto stream = nextStream(*client.connection, timer, ws);
    readRequest(*stream).wait(ws);
    writeBytes(*stream, kj::heapArray(vector("ConnectResponse error"))).wait(ws);
    stream->shutdownWrite();
    KJ_EXPECT(response.wait(ws).statusCode == 502);
  }

  // RESET_STREAM after a partial body: the public response is cut, not completed.
  {
    auto publicClient = setup.publicClient();
    kj::HttpHeaders headers(setup.table);
    headers.set(kj::HttpHeaderId::HOST, tunnel.hostname);
    auto response = publicClient->request(kj::HttpMethod::GET, "/", headers).response;
    auto stream = nextStream(*client.connection, timer, ws);
    readRequest(*stream).wait(ws);
    writeBytes(*stream, encodeResponse(200, nullptr)).wait(ws);
    writeBytes(*stream, kj::heapArray("partial"_kj.asBytes())).wait(ws);
    auto r = response.wait(ws);
    KJ_EXPECT(r.statusCode == 200);
    stream->reset(0);
    auto body = r.body->readAllText().then([](kj::String&&) { return false; },
                                           [](kj::Exception&&) { return true; });
    KJ_EXPECT(timer.timeoutAfter(5 * kj::SECONDS, kj::mv(body)).wait(ws),
              "the public body completed although the tunnel stream was reset");
  }
}

class RecordingHandler final: public wire::ConfigurationHandler {
public:
  kj::Maybe<kj::String> applyConfiguration(int32_t version,
                                            kj::ArrayPtr<const kj::byte> json) override {
    applied = kj::heapString(json.asChars());
    return nullptr;
  }
  kj::String applied;
};

KJ_TEST("admin update-configuration drives the client's ConfigurationManager on an RPC stream") {
  Setup setup;
  auto& tunnel = setup.emulator.registry().issueTunnel();
  TunnelClient client(setup);
  KJ_ASSERT(client.registerAs(tunnel).is<wire::ConnectionDetails>());
  auto& record = onlyRecord(setup.emulator, ConnectionState::REGISTERED);
  auto& timer = setup.io.provider->getTimer();
  auto& ws = setup.io.waitScope;

  auto address = setup.io.provider->getNetwork().parseAddress(setup.ready.admin).wait(ws);
  auto admin = kj::newHttpClient(timer, setup.table, *address);
  auto config = "{\"ingress\":[{\"service\":\"http_status:404\"}]}"_kj;
  kj::HttpHeaders headers(setup.table);
  auto request = admin->request(kj::HttpMethod::POST,
      kj::str("/connections/", record.id, "/update-configuration?version=3"), headers,
      uint64_t(config.size()));
  auto writing = request.body->write(config.begin(), config.size())
      .then([body = kj::mv(request.body)]() mutable { body = nullptr; }).eagerlyEvaluate(nullptr);

  RecordingHandler handler;
  wire::RemoteConfigState state(handler);
  auto stream = nextStream(*client.connection, timer, ws);
  KJ_EXPECT(wire::readStreamSignature(*stream).wait(ws) == wire::StreamKind::RPC);
  auto serving = wire::serveCloudflaredRpc(*stream, state).eagerlyEvaluate(nullptr);

  auto response = timer.timeoutAfter(10 * kj::SECONDS, kj::mv(request.response)).wait(ws);
  auto body = response.body->readAllText().wait(ws);
  KJ_EXPECT(response.statusCode == 200, body);
  KJ_EXPECT(body == "{\"latestAppliedVersion\":3,\"err\":\"\"}", body);
  KJ_EXPECT(handler.applied == config, handler.applied);
  KJ_EXPECT(state.currentVersion() == 3);
  writing.wait(ws);
}

// ---------------------------------------------------------------------------------------------
// The control stream driven by the bytes cloudflared 2023.7.3 wrote (data/ transcripts), so that
// nothing of our own capnp-rpc client is involved on the client side.

const wire::testing::ControlTranscript& transcript(kj::StringPtr titlePart) {
  for (auto& t: vectors().transcripts) {
    if (strstr(t.title.cStr(), titlePart.cStr()) != nullptr) return t;
  }
  KJ_FAIL_ASSERT("no such transcript", titlePart);
}

void becomeVectorTunnel(IssuedTunnel& tunnel) {
  // The synthetic credentials of the recorded registerConnection call.
  tunnel.accountTag = kj::str("0123456789abcdef0123456789abcdef");
  tunnel.secret = kj::heapArray<kj::byte>(32);
  for (kj::uint i = 0; i < 32; i++) tunnel.secret[i] = static_cast<kj::byte>(i);
  tunnel.idBytes = KJ_ASSERT_NONNULL(parseUuid("01234567-89ab-cdef-0123-456789abcdef"));
}

struct GoldenControl {
  // Replays the C->E messages of a transcript on a fresh control stream, one at a time; for each
  // E->C entry, reads the edge's messages until a Return arrives and keeps it.
  explicit GoldenControl(Setup& setup)
      : setup(setup),
        endpoint(quic::newEndpoint(setup.io.unixEventPort,
                                   KJ_ASSERT_NONNULL(quic::SocketAddress::parse("127.0.0.1:0")))),
        connection(endpoint->dial(setup.edge, setup.clientConfig()).wait(setup.io.waitScope)),
        control(connection->openStream().wait(setup.io.waitScope)) {}

  void send(const wire::testing::TranscriptMessage& m) {
    KJ_ASSERT(m.direction == wire::testing::Direction::CLIENT_TO_EDGE);
    timeout(control->write(m.bytes.begin(), m.bytes.size()));
  }

  kj::Own<capnp::MessageReader> nextReturn() {
    for (int i = 0; i < 8; i++) {
      auto message = timeout(capnp::readMessage(*control));
      if (message->getRoot<capnp::rpc::Message>().isReturn()) return message;
    }
    KJ_FAIL_ASSERT("the edge never answered");
  }

  void replay(const wire::testing::ControlTranscript& t, size_t from, size_t to,
              kj::Vector<kj::Own<capnp::MessageReader>>& returns) {
    for (size_t i = from; i < to; i++) {
      auto& m = t.messages[i];
      if (m.direction == wire::testing::Direction::CLIENT_TO_EDGE) {
        send(m);
      } else {
        returns.add(nextReturn());
      }
    }
  }

  template <typename T>
  T timeout(kj::Promise<T> promise) {
    return setup.io.provider->getTimer().timeoutAfter(10 * kj::SECONDS, kj::mv(promise))
        .wait(setup.io.waitScope);
  }

  Setup& setup;
  kj::Own<quic::Endpoint> endpoint;
  kj::Own<quic::Connection> connection;
  kj::Own<quic::Stream> control;
};

size_t throughRegistration(const wire::testing::ControlTranscript& t) {
  // Index just past the edge's answer to registerConnection (the second E->C message).
  size_t answers = 0;
  for (size_t i = 0; i < t.messages.size(); i++) {
    if (t.messages[i].direction == wire::testing::Direction::EDGE_TO_CLIENT && ++answers == 2) {
      return i + 1;
    }
  }
  KJ_FAIL_ASSERT("transcript without a registration answer", t.title);
}

schema::ConnectionResponse::Reader registrationAnswer(capnp::MessageReader& message) {
  auto ret = message.getRoot<capnp::rpc::Message>().getReturn();
  KJ_ASSERT(ret.isResults(), "registerConnection was answered with an exception");
  return ret.getResults().getContent()
      .getAs<schema::RegistrationServer::RegisterConnectionResults>().getResult();
}

KJ_TEST("recorded 2023.7.3 control streams over QUIC: registration, configuration, EDUPCONN, "
        "unregister") {
  Setup setup;
  auto& tunnel = setup.emulator.registry().issueTunnel();
  becomeVectorTunnel(tunnel);
  auto& success = transcript("successful registration");
  auto& duplicate = transcript("EDUPCONN");

  // Up to (excluding) the unregisterConnection call: bootstrap, pipelined registerConnection,
  // finishes, updateLocalConfiguration.
  size_t unregisterAt = 0;
  for (size_t i = 0; i < success.messages.size(); i++) {
    auto& m = success.messages[i];
    if (m.kind() == "call" && m.number("method") == uint64_t(1)) unregisterAt = i;
  }
  KJ_ASSERT(unregisterAt > 0);

  GoldenControl first(setup);
  kj::Vector<kj::Own<capnp::MessageReader>> returns;
  first.replay(success, 0, unregisterAt, returns);
  KJ_ASSERT(returns.size() == 3, returns.size());   // bootstrap, registration, configuration
  auto answer = registrationAnswer(*returns[1]);
  KJ_ASSERT(answer.getResult().isConnectionDetails(), "registration refused",
            answer.getResult().getError().getCause());
  auto details = answer.getResult().getConnectionDetails();
  auto& record = onlyRecord(setup.emulator, ConnectionState::REGISTERED);
  KJ_EXPECT(details.getUuid() == record.uuid.asPtr());
  KJ_EXPECT(details.getLocationName() == "EMU");
  KJ_EXPECT(!details.getTunnelIsRemotelyManaged());
  KJ_EXPECT(record.version == "2023.7.3");
  KJ_EXPECT(record.arch == "linux_amd64");
  KJ_EXPECT(record.features.size() == 5);
  KJ_EXPECT(record.clientId == "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee", record.clientId);
  KJ_EXPECT(KJ_ASSERT_NONNULL(record.configuration) ==
            "{\"ingress\":[{\"service\":\"http://localhost:8080\"}]}");

  // The same recorded registration from a second connection while the first is live.
  {
    GoldenControl second(setup);
    kj::Vector<kj::Own<capnp::MessageReader>> dupReturns;
    second.replay(duplicate, 0, throughRegistration(duplicate), dupReturns);
    KJ_ASSERT(dupReturns.size() == 2);
    auto dup = registrationAnswer(*dupReturns[1]);
    KJ_ASSERT(dup.getResult().isError());
    KJ_EXPECT(dup.getResult().getError().getCause() == "EDUPCONN");
  }
  KJ_EXPECT(record.state == ConnectionState::REGISTERED);

  // A forged secret in the same bytes gets "Unauthorized".
  {
    tunnel.secret[31] ^= 1;
    GoldenControl third(setup);
    kj::Vector<kj::Own<capnp::MessageReader>> badReturns;
    third.replay(duplicate, 0, throughRegistration(duplicate), badReturns);
    KJ_ASSERT(badReturns.size() == 2);
    auto bad = registrationAnswer(*badReturns[1]);
    KJ_ASSERT(bad.getResult().isError());
    KJ_EXPECT(strstr(bad.getResult().getError().getCause().cStr(), "Unauthorized") != nullptr,
              bad.getResult().getError().getCause());
    tunnel.secret[31] ^= 1;
  }

  // unregisterConnection, then Release + Abort: no new requests go to that connection.
  first.replay(success, unregisterAt, success.messages.size(), returns);
  KJ_EXPECT(record.state == ConnectionState::UNREGISTERED);
  auto publicClient = setup.publicClient();
  kj::HttpHeaders headers(setup.table);
  headers.set(kj::HttpHeaderId::HOST, tunnel.hostname);
  auto response = publicClient->request(kj::HttpMethod::GET, "/", headers).response
      .wait(setup.io.waitScope);
  KJ_EXPECT(response.statusCode == 530);
}

KJ_TEST("a control stream that ends without unregisterConnection stops routing too") {
  Setup setup;
  auto& tunnel = setup.emulator.registry().issueTunnel();
  becomeVectorTunnel(tunnel);
  auto& success = transcript("successful registration");
  GoldenControl client(setup);
  kj::Vector<kj::Own<capnp::MessageReader>> returns;
  client.replay(success, 0, throughRegistration(success), returns);
  KJ_ASSERT(registrationAnswer(*returns[1]).getResult().isConnectionDetails());
  auto& record = onlyRecord(setup.emulator, ConnectionState::REGISTERED);

  // FIN on the control stream; the edge's RPC system answers with its own end of the stream.
  client.control->shutdownWrite();
  client.timeout(client.control->readAllBytes());
  KJ_EXPECT(record.state == ConnectionState::UNREGISTERED);
  KJ_EXPECT(record.connection != nullptr);   // the QUIC connection itself stays up
  auto publicClient = setup.publicClient();
  kj::HttpHeaders headers(setup.table);
  headers.set(kj::HttpHeaderId::HOST, tunnel.hostname);
  auto response = publicClient->request(kj::HttpMethod::GET, "/", headers).response
      .wait(setup.io.waitScope);
  KJ_EXPECT(response.statusCode == 530);
}

KJ_TEST("handshakes: P-256 only, and a first key share the server declines (HelloRetryRequest)") {
  Setup setup;
  auto& tunnel = setup.emulator.registry().issueTunnel();
  {
    auto config = setup.clientConfig();
    config.tlsPriority = kj::str("NORMAL:-VERS-ALL:+VERS-TLS1.3:-GROUP-ALL:+GROUP-SECP256R1");
    TunnelClient client(setup, kj::mv(config));
    KJ_EXPECT(client.registerAs(tunnel, 0).is<wire::ConnectionDetails>());
  }
  {
    // secp521r1 first: the client's only key share is for a group the edge does not take, so
    // the edge must ask for secp256r1 with a HelloRetryRequest.
    auto config = setup.clientConfig();
    config.tlsPriority = kj::str(
        "NORMAL:-VERS-ALL:+VERS-TLS1.3:-GROUP-ALL:+GROUP-SECP521R1:+GROUP-SECP256R1");
    TunnelClient client(setup, kj::mv(config));
    KJ_EXPECT(client.registerAs(tunnel, 1).is<wire::ConnectionDetails>());
  }
  {
    // The control that makes the case above a HelloRetryRequest: the edge does not take
    // secp521r1 at all, so it cannot have used that first key share.
    auto config = setup.clientConfig();
    config.tlsPriority = kj::str("NORMAL:-VERS-ALL:+VERS-TLS1.3:-GROUP-ALL:+GROUP-SECP521R1");
    auto endpoint = quic::newEndpoint(setup.io.unixEventPort,
        KJ_ASSERT_NONNULL(quic::SocketAddress::parse("127.0.0.1:0")));
    KJ_EXPECT_THROW(FAILED, endpoint->dial(setup.edge, kj::mv(config)).wait(setup.io.waitScope));
  }
}

KJ_TEST("a wrong ALPN is refused") {
  Setup setup;
  auto config = setup.clientConfig();
  config.alpn = kj::str("h3");
  auto endpoint = quic::newEndpoint(setup.io.unixEventPort,
                                    KJ_ASSERT_NONNULL(quic::SocketAddress::parse("127.0.0.1:0")));
  KJ_EXPECT_THROW(FAILED, endpoint->dial(setup.edge, kj::mv(config)).wait(setup.io.waitScope));
}

KJ_TEST("admin close sends CONNECTION_CLOSE with the given code") {
  Setup setup;
  auto& tunnel = setup.emulator.registry().issueTunnel();
  TunnelClient client(setup);
  KJ_ASSERT(client.registerAs(tunnel).is<wire::ConnectionDetails>());
  auto& record = onlyRecord(setup.emulator, ConnectionState::REGISTERED);
  KJ_ASSERT_NONNULL(record.connection).close(42, "test close");
  auto info = client.connection->onClosed().wait(setup.io.waitScope);
  KJ_EXPECT(info.kind == quic::CloseKind::PEER_APPLICATION_CLOSE, info.description);
  KJ_EXPECT(info.code == 42);
}

KJ_TEST("a vanished client is dropped after the idle timeout; requests then fail fast") {
  Setup setup(300 * kj::MILLISECONDS);
  auto& tunnel = setup.emulator.registry().issueTunnel();
  TunnelClient client(setup);
  KJ_ASSERT(client.registerAs(tunnel).is<wire::ConnectionDetails>());
  auto& record = onlyRecord(setup.emulator, ConnectionState::REGISTERED);
  auto publicClient = setup.publicClient();

  // A request in flight when the client vanishes ends with an error page, not a hang.
  kj::HttpHeaders headers(setup.table);
  headers.set(kj::HttpHeaderId::HOST, tunnel.hostname);
  auto inFlight = publicClient->request(kj::HttpMethod::GET, "/slow", headers).response;
  auto stream = nextStream(*client.connection, setup.io.provider->getTimer(), setup.io.waitScope);
  client.connection->goSilent();
  auto timer = setup.io.provider->getTimer().now();
  auto r = inFlight.wait(setup.io.waitScope);
  KJ_EXPECT(r.statusCode == 502, r.statusCode);
  KJ_EXPECT(setup.io.provider->getTimer().now() - timer < 3 * kj::SECONDS);
  KJ_EXPECT(record.state == ConnectionState::CLOSED);

  auto start = setup.io.provider->getTimer().now();
  auto again = publicClient->request(kj::HttpMethod::GET, "/", headers).response
      .wait(setup.io.waitScope);
  KJ_EXPECT(again.statusCode == 530);
  KJ_EXPECT(setup.io.provider->getTimer().now() - start < 500 * kj::MILLISECONDS);
}

KJ_TEST("edge going silent makes the client hit its idle timeout") {
  Setup setup;
  auto& tunnel = setup.emulator.registry().issueTunnel();
  auto config = setup.clientConfig();
  config.transport.maxIdleTimeout = 300 * kj::MILLISECONDS;
  TunnelClient client(setup, kj::mv(config));
  KJ_ASSERT(client.registerAs(tunnel).is<wire::ConnectionDetails>());
  auto& record = onlyRecord(setup.emulator, ConnectionState::REGISTERED);
  KJ_ASSERT_NONNULL(record.connection).goSilent();
  auto info = client.connection->onClosed().wait(setup.io.waitScope);
  KJ_EXPECT(info.kind == quic::CloseKind::IDLE_TIMEOUT, info.description);
}

KJ_TEST("withheld credit stalls the client's response writes") {
  Setup setup;
  auto& tunnel = setup.emulator.registry().issueTunnel();
  TunnelClient client(setup);
  KJ_ASSERT(client.registerAs(tunnel).is<wire::ConnectionDetails>());
  auto& record = onlyRecord(setup.emulator, ConnectionState::REGISTERED);
  KJ_ASSERT(KJ_ASSERT_NONNULL(record.connection).withholdCredit(nullptr));

  auto publicClient = setup.publicClient();
  kj::HttpHeaders headers(setup.table);
  headers.set(kj::HttpHeaderId::HOST, tunnel.hostname);
  auto response = publicClient->request(kj::HttpMethod::GET, "/big", headers).response;
  auto stream = nextStream(*client.connection, setup.io.provider->getTimer(), setup.io.waitScope);
  readRequest(*stream).wait(setup.io.waitScope);
  writeBytes(*stream, encodeResponse(200, nullptr)).wait(setup.io.waitScope);
  auto r = response.wait(setup.io.waitScope);
  // 8 MiB is far more than the stream window plus the send buffer: the write must stall even
  // though the public client reads everything it gets.
  auto data = pattern(8 << 20, 3);
  auto writing = stream->write(data.begin(), data.size());
  auto reading = r.body->readAllBytes();
  setup.io.provider->getTimer().afterDelay(300 * kj::MILLISECONDS).wait(setup.io.waitScope);
  KJ_EXPECT(!writing.poll(setup.io.waitScope), "write completed despite withheld credit");
}


// ---------------------------------------------------------------------------------------------
// Visitors that stall or leave (issue 13), control-stream faults

kj::Promise<void> endlessChunks(kj::AsyncOutputStream& out, kj::ArrayPtr<const kj::byte> chunk) {
  // Writes `chunk` until a write fails.
  return out.write(chunk.begin(), chunk.size()).then([&out, chunk]() {
    return endlessChunks(out, chunk);
  });
}

kj::String readHead(kj::AsyncIoStream& stream, kj::WaitScope& waitScope) {
  kj::Vector<char> head;
  char c;
  while (true) {
    size_t n = stream.tryRead(&c, 1, 1).wait(waitScope);
    KJ_ASSERT(n == 1, "EOF inside the response head", kj::str(head.asPtr()));
    head.add(c);
    if (head.size() >= 4 && memcmp(head.end() - 4, "\r\n\r\n", 4) == 0) break;
  }
  head.add('\0');
  return kj::String(head.releaseAsArray());
}

KJ_TEST("visitors that stop reading never hold the connection window: a small GET stays prompt") {
  // Issue 13. Twenty visitors ask for large responses and read nothing (in-memory pipes, so no
  // kernel buffer absorbs anything and the front door stalls at once); the client writes more on
  // each of their streams than the stream window takes. Their unread bytes (20 x 256 KiB) are
  // five times the edge's connection window here (1 MiB): if connection credit came back only
  // as the front door reads, the stalled streams would hold all of it and a small response on
  // the same connection would wait for them. The emulator's default recvCreditBudget is kept.
  constexpr size_t STALLED = 20;
  constexpr uint64_t STREAM_WINDOW = 256 * 1024;
  auto transport = EmulatorOptions::defaultEdgeTransport();
  transport.initialStreamWindow = STREAM_WINDOW;
  transport.maxStreamWindow = STREAM_WINDOW;
  transport.initialConnectionWindow = 1 << 20;
  transport.maxConnectionWindow = 1 << 20;
  KJ_ASSERT(STALLED * STREAM_WINDOW >= 5 * transport.maxConnectionWindow);
  Setup setup(5 * kj::SECONDS, transport);
  auto& tunnel = setup.emulator.registry().issueTunnel();
  TunnelClient client(setup);
  KJ_ASSERT(client.registerAs(tunnel).is<wire::ConnectionDetails>());
  auto& record = onlyRecord(setup.emulator, ConnectionState::REGISTERED);
  auto& timer = setup.io.provider->getTimer();
  auto& ws = setup.io.waitScope;
  // Per stream more than the stream window + the front door's 64 KiB buffer + the client's send
  // buffer: these writes never complete.
  auto large = pattern(1 << 20, 13);

  kj::Vector<kj::Own<kj::AsyncIoStream>> visitors;
  kj::Vector<kj::Promise<void>> serving;
  kj::Vector<kj::Own<quic::Stream>> stalled;
  kj::Vector<kj::Promise<void>> writes;
  for (size_t i = 0; i < STALLED; i++) {
    auto pipe = kj::newTwoWayPipe();
    serving.add(setup.emulator.frontDoor().serve(kj::mv(pipe.ends[0])).eagerlyEvaluate(nullptr));
    writeBytes(*pipe.ends[1], kj::heapArray(kj::str(
        "GET /large/", i, " HTTP/1.1\r\nHost: ", tunnel.hostname, "\r\n\r\n").asBytes())).wait(ws);
    visitors.add(kj::mv(pipe.ends[1]));
    auto stream = nextStream(*client.connection, timer, ws);
    readRequest(*stream).wait(ws);
    writeBytes(*stream, encodeResponse(200, uint64_t(1) << 30)).wait(ws);
    writes.add(stream->write(large.begin(), large.size()).eagerlyEvaluate(nullptr));
    stalled.add(kj::mv(stream));
  }
  // Let the stalled streams take what they can: either their windows are (about) full at the
  // edge, or the client has been blocked on connection credit for a while (the old behaviour).
  setup.waitUntil([&]() {
    return statField(record, "recvBufferedBytes") >= STALLED * STREAM_WINDOW / 2 ||
           client.connection->stats().connectionBlockedFor >= 200 * kj::MILLISECONDS;
  }, "the stalled streams to fill up");

  auto publicClient = setup.publicClient();
  kj::HttpHeaders headers(setup.table);
  headers.set(kj::HttpHeaderId::HOST, tunnel.hostname);
  auto start = timer.now();
  auto response = publicClient->request(kj::HttpMethod::GET, "/small", headers).response
      .then([](kj::HttpClient::Response&& r) {
    return r.body->readAllText().attach(kj::mv(r.body));
  });
  auto stream = nextStream(*client.connection, timer, ws);
  readRequest(*stream).wait(ws);
  writeBytes(*stream, encodeResponse(200, uint64_t(5))).wait(ws);
  writeBytes(*stream, kj::heapArray("small"_kj.asBytes())).wait(ws);
  stream->shutdownWrite();
  auto body = timer.timeoutAfter(2 * kj::SECONDS, kj::mv(response))
      .catch_([](kj::Exception&& e) { return kj::str("(failed: ", e.getDescription(), ")"); })
      .wait(ws);
  KJ_EXPECT(body == "small", "the small response waited behind the stalled streams", body);
  KJ_EXPECT(timer.now() - start < 2 * kj::SECONDS);
  // Each stalled visitor costs the edge at most its stream window.
  KJ_EXPECT(statField(record, "recvBufferedBytes") <= STALLED * STREAM_WINDOW,
            statField(record, "recvBufferedBytes"));
  for (auto& w: writes) KJ_EXPECT(!w.poll(ws), "a stalled stream took a whole large response");
}

KJ_TEST("over QUIC: a visitor that leaves gets RESET_STREAM + STOP_SENDING within 1 s") {
  Setup setup;
  auto& tunnel = setup.emulator.registry().issueTunnel();
  TunnelClient client(setup);
  KJ_ASSERT(client.registerAs(tunnel).is<wire::ConnectionDetails>());
  auto& timer = setup.io.provider->getTimer();
  auto& ws = setup.io.waitScope;
  auto chunk = pattern(16 * 1024, 2);
  auto within = [&](kj::Promise<void> promise) {
    return timer.timeoutAfter(1 * kj::SECONDS, kj::mv(promise))
        .then([]() { return true; }, [](kj::Exception&&) { return false; }).wait(ws);
  };

  // An endless chunked body the visitor reads for a while, and an idle SSE stream whose visitor
  // read everything (its close is a plain FIN, nothing for a write to trip over). The edge had
  // FIN-ished its side with the GET, so what the client gets is STOP_SENDING.
  for (bool sse: {false, true}) {
    KJ_CONTEXT(sse);
    auto visitor = setup.dialPublic();
    writeBytes(*visitor, kj::heapArray(kj::str("GET /stream HTTP/1.1\r\nHost: ",
                                               tunnel.hostname, "\r\n\r\n").asBytes())).wait(ws);
    auto stream = nextStream(*client.connection, timer, ws);
    readRequest(*stream).wait(ws);
    writeBytes(*stream, encodeResponse(200, nullptr)).wait(ws);
    kj::Promise<void> writing = kj::READY_NOW;
    if (sse) {
      writeBytes(*stream, kj::heapArray("data: 1\n\n"_kj.asBytes())).wait(ws);
      readHead(*visitor, ws);
      auto event = kj::heapArray<char>(14);          // "9\r\ndata: 1\n\n\r\n"
      visitor->read(event.begin(), event.size()).wait(ws);
    } else {
      writing = endlessChunks(*stream, chunk).eagerlyEvaluate(nullptr);
      readHead(*visitor, ws);
      auto some = kj::heapArray<kj::byte>(512 * 1024);
      visitor->read(some.begin(), some.size()).wait(ws);
    }
    visitor = nullptr;
    auto start = timer.now();
    KJ_EXPECT(within(stream->whenWriteDisconnected()), "no STOP_SENDING within 1 s");
    if (!sse) {
      KJ_EXPECT(within(writing.then([]() { KJ_FAIL_ASSERT("the endless write ended"); },
                                    [](kj::Exception&&) {})));
    }
    KJ_EXPECT(timer.now() - start < 1 * kj::SECONDS);
  }

  // A WebSocket visitor that vanishes: both directions were open, so both are aborted.
  {
    auto visitor = setup.dialPublic();
    writeBytes(*visitor, kj::heapArray(kj::str(
        "GET /chat HTTP/1.1\r\nHost: ", tunnel.hostname, "\r\nConnection: Upgrade\r\n"
        "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").asBytes())).wait(ws);
    auto stream = nextStream(*client.connection, timer, ws);
    auto request = readRequest(*stream).wait(ws);
    kj::String key;
    for (auto m: request->getRoot<schema::ConnectRequest>().getMetadata()) {
      if (m.getKey() == "HttpHeader:Sec-Websocket-Key") key = kj::str(m.getVal());
    }
    writeBytes(*stream, encodeUpgrade(key)).wait(ws);
    KJ_ASSERT(readHead(*visitor, ws).startsWith("HTTP/1.1 101"));
    auto publicSocket = kj::newWebSocket(kj::mv(visitor), setup.entropy);
    publicSocket->send(kj::StringPtr("hello")).wait(ws);
    auto frame = kj::heapArray<kj::byte>(64);
    KJ_EXPECT(stream->tryRead(frame.begin(), 11, frame.size()).wait(ws) == 11);  // masked "hello"
    auto reading = stream->tryRead(frame.begin(), 1, frame.size()).then(
        [](size_t n) -> kj::Maybe<kj::String> { return kj::str("read ", n, " bytes"); },
        [](kj::Exception&& e) -> kj::Maybe<kj::String> { return kj::str(e.getDescription()); });
    publicSocket = nullptr;             // no Close frame: the TCP connection just goes
    auto start = timer.now();
    auto readResult = timer.timeoutAfter(1 * kj::SECONDS, kj::mv(reading)).wait(ws);
    auto& text = KJ_ASSERT_NONNULL(readResult);
    bool reset = strstr(text.cStr(), "reset by the peer") != nullptr;
    KJ_EXPECT(reset, "no RESET_STREAM", text);
    KJ_EXPECT(within(stream->whenWriteDisconnected()), "no STOP_SENDING within 1 s");
    KJ_EXPECT(timer.now() - start < 1 * kj::SECONDS);
  }
}

KJ_TEST("withheld credit on every new stream withholds connection credit too") {
  Setup setup;
  auto& tunnel = setup.emulator.registry().issueTunnel();
  TunnelClient client(setup);
  KJ_ASSERT(client.registerAs(tunnel).is<wire::ConnectionDetails>());
  auto& record = onlyRecord(setup.emulator, ConnectionState::REGISTERED);
  KJ_ASSERT(KJ_ASSERT_NONNULL(record.connection).withholdCredit(nullptr));
  auto& timer = setup.io.provider->getTimer();
  auto& ws = setup.io.waitScope;
  // Three streams' windows (3 x 512 KiB) exceed the edge's initial connection window (768 KiB),
  // which is never extended while credit is withheld: the client ends up blocked on it.
  auto large = pattern(1 << 20, 21);
  auto publicClient = setup.publicClient();
  kj::Vector<kj::Promise<kj::HttpClient::Response>> responses;
  kj::Vector<kj::Own<quic::Stream>> streams;
  kj::Vector<kj::Promise<void>> writes;
  for (int i = 0; i < 3; i++) {
    kj::HttpHeaders headers(setup.table);
    headers.set(kj::HttpHeaderId::HOST, tunnel.hostname);
    responses.add(publicClient->request(kj::HttpMethod::GET, "/big", headers).response);
    auto stream = nextStream(*client.connection, timer, ws);
    readRequest(*stream).wait(ws);
    writeBytes(*stream, encodeResponse(200, nullptr)).wait(ws);
    writes.add(stream->write(large.begin(), large.size()).eagerlyEvaluate(nullptr));
    streams.add(kj::mv(stream));
  }
  setup.waitUntil([&]() {
    return client.connection->stats().connectionBlockedFor > 0 * kj::SECONDS;
  }, "the client to be blocked on connection credit");
}

KJ_TEST("admin close-control resets the control stream; the QUIC connection stays up") {
  Setup setup;
  auto& tunnel = setup.emulator.registry().issueTunnel();
  TunnelClient client(setup);
  KJ_ASSERT(client.registerAs(tunnel).is<wire::ConnectionDetails>());
  auto& record = onlyRecord(setup.emulator, ConnectionState::REGISTERED);
  auto& timer = setup.io.provider->getTimer();
  auto n = kj::str(record.id);
  auto disconnected = client.rpc->onDisconnect();

  KJ_EXPECT(setup.adminPost(kj::str("/connections/", n, "/close-control?how=sideways")) == 400);
  KJ_EXPECT(setup.adminPost(kj::str("/connections/", n, "/close-control?code=x")) == 400);
  KJ_EXPECT(record.state == ConnectionState::REGISTERED);
  kj::String body;
  KJ_EXPECT(setup.adminPost(kj::str("/connections/", n, "/close-control?code=7"), &body) == 200,
            body);
  KJ_EXPECT(body == kj::str("{\"controlClosed\":", n, ",\"how\":\"reset\",\"code\":7}"), body);
  timer.timeoutAfter(5 * kj::SECONDS, kj::mv(disconnected)).wait(setup.io.waitScope);
  KJ_EXPECT(record.state == ConnectionState::UNREGISTERED);
  KJ_EXPECT(record.connection != nullptr);
  KJ_EXPECT(client.connection->closeInfo() == nullptr, "the QUIC connection was closed");
  KJ_EXPECT(setup.adminPost(kj::str("/connections/", n, "/close-control")) == 409);

  auto publicClient = setup.publicClient();
  kj::HttpHeaders headers(setup.table);
  headers.set(kj::HttpHeaderId::HOST, tunnel.hostname);
  auto response = publicClient->request(kj::HttpMethod::GET, "/", headers).response
      .wait(setup.io.waitScope);
  KJ_EXPECT(response.statusCode == 530);
}

KJ_TEST("admin close-control on the wire: RESET_STREAM + STOP_SENDING with the code, or a FIN") {
  for (bool fin: {false, true}) {
    KJ_CONTEXT(fin);
    Setup setup;
    auto& tunnel = setup.emulator.registry().issueTunnel();
    becomeVectorTunnel(tunnel);
    auto& success = transcript("successful registration");
    GoldenControl client(setup);
    kj::Vector<kj::Own<capnp::MessageReader>> returns;
    client.replay(success, 0, throughRegistration(success), returns);
    KJ_ASSERT(registrationAnswer(*returns[1]).getResult().isConnectionDetails());
    auto& record = onlyRecord(setup.emulator, ConnectionState::REGISTERED);
    auto url = kj::str("/connections/", record.id, "/close-control", fin ? "?how=fin" : "?code=9");
    kj::String body;
    KJ_EXPECT(setup.adminPost(url, &body) == 200, body);
    if (fin) {
      KJ_EXPECT(body == kj::str("{\"controlClosed\":", record.id, ",\"how\":\"fin\",\"code\":0}"),
                body);
      client.timeout(client.control->readAllBytes());     // EOF: a clean FIN
      client.timeout(client.control->write("x", 1));      // and no STOP_SENDING
    } else {
      KJ_EXPECT_THROW_MESSAGE("reset by the peer with code 9",
                              client.timeout(client.control->readAllBytes()));
      client.timeout(client.control->whenWriteDisconnected());    // STOP_SENDING
    }
    KJ_EXPECT(record.state == ConnectionState::UNREGISTERED);
    KJ_EXPECT(client.connection->closeInfo() == nullptr, "the QUIC connection was closed");
  }
}

}  // namespace
}  // namespace cfqt::emulator
