// The HTTP/2 edge end to end on loopback: a minimal in-test tunnel client -- TCP + kj-tls (SNI
// h2.cftunnel.com, the emulator's CA) and an HTTP/2 *server* session (Http2Session in the server
// role, nghttp2) -- that answers the edge's control-stream request with wire::ControlClient, and
// serves the front door's requests as cloudflared does (serialized response headers,
// http2/header.h).

#include "emulator.h"
#include "front-door.h"
#include "h2-edge.h"
#include "h2-session.h"
#include "random.h"

#include "http2/header.h"
#include "wire/control.h"

#if CFQT_EMULATOR_QUIC
#include "quic/endpoint.h"
#include "eventually.h"
#endif

#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>

#include <kj/async-io.h>
#include <kj/compat/tls.h>
#include <kj/debug.h>
#include <kj/encoding.h>
#include <kj/io.h>
#include <kj/test.h>

#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

namespace cfqt::emulator {
namespace {

kj::String tempStateDir() {
  char templ[] = "/tmp/cfqt-emulator-h2-XXXXXX";
  KJ_ASSERT(mkdtemp(templ) != nullptr);
  return kj::str(templ);
}

void removeStateDir(kj::StringPtr dir) {
  for (auto name: {"ca.pem", "ca-key.pem", "server.pem", "server-key.pem"}) {
    unlink(kj::str(dir, '/', name).cStr());
  }
  rmdir(dir.cStr());
}

kj::String readText(kj::StringPtr path) {
  int fd;
  KJ_SYSCALL(fd = open(path.cStr(), O_RDONLY | O_CLOEXEC), path);
  kj::FdInputStream in((kj::AutoCloseFd(fd)));
  return kj::heapString(in.readAllBytes().asChars());
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

kj::Maybe<kj::StringPtr> find(kj::ArrayPtr<const wire::Header> headers, kj::StringPtr name) {
  for (auto& h: headers) {
    if (h.name == name) return h.value.asPtr();
  }
  return nullptr;
}

kj::StringPtr get(kj::ArrayPtr<const wire::Header> headers, kj::StringPtr name) {
  KJ_IF_MAYBE(v, find(headers, name)) return *v;
  KJ_FAIL_ASSERT("header missing", name);
}

wire::Header hdr(kj::StringPtr name, kj::StringPtr value) {
  return wire::Header{kj::heapString(name), kj::heapString(value)};
}

struct Setup {
  explicit Setup(kj::Maybe<Http2SessionOptions> http2 = nullptr, bool noUdp = false)
      : io(kj::setupAsyncIo()), stateDir(tempStateDir()), emulator(io, options(http2, noUdp)) {
    ready = emulator.start().wait(io.waitScope);
    KJ_ASSERT(ready.tcpEdges.size() == 1);
  }
  ~Setup() noexcept(false) { removeStateDir(stateDir); }

  EmulatorOptions options(kj::Maybe<Http2SessionOptions> http2, bool noUdp) {
    EmulatorOptions o;
    o.noUdp = noUdp;
    o.certificates.stateDir = kj::heapString(stateDir);
    o.frontDoor.responseHeadTimeout = 10 * kj::SECONDS;
    KJ_IF_MAYBE(h, http2) o.http2 = *h;
    return o;
  }

  kj::Own<kj::HttpClient> publicClient() {
    auto address = io.provider->getNetwork().parseAddress(ready.publicAddress)
        .wait(io.waitScope);
    kj::HttpClientSettings settings;
    settings.entropySource = entropy;
    auto client = kj::newHttpClient(io.provider->getTimer(), table, *address, settings);
    return client.attach(kj::mv(address));
  }

  kj::Own<kj::HttpClient> adminClient() {
    auto address = io.provider->getNetwork().parseAddress(ready.admin).wait(io.waitScope);
    auto client = kj::newHttpClient(io.provider->getTimer(), table, *address);
    return client.attach(kj::mv(address));
  }

  kj::uint adminPost(kj::StringPtr url, kj::StringPtr body = "", kj::String* bodyOut = nullptr) {
    auto admin = adminClient();
    kj::HttpHeaders headers(table);
    auto request = admin->request(kj::HttpMethod::POST, url, headers, uint64_t(body.size()));
    request.body->write(body.begin(), body.size()).wait(io.waitScope);
    request.body = nullptr;
    auto response = request.response.wait(io.waitScope);
    auto text = response.body->readAllText().wait(io.waitScope);
    if (bodyOut != nullptr) *bodyOut = kj::mv(text);
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
  kj::HttpHeaderTable table;
  RandomEntropySource entropy;
};

struct TunnelClient final: public Http2SessionObserver {
  // A minimal tunnel client on the HTTP/2 transport: TCP + TLS to the edge, an HTTP/2 server
  // session, the control stream answered with 200 and wire::ControlClient over its bodies.
  explicit TunnelClient(Setup& setup, kj::StringPtr sni = "h2.cftunnel.com")
      : setup(setup), ca(readText(setup.ready.ca)) {
    kj::TlsContext::Options tlsOptions;
    tlsOptions.useSystemTrustStore = false;
    tlsOptions.trustedCertificates = kj::arrayPtr(&ca, 1);
    tls = kj::heap<kj::TlsContext>(kj::mv(tlsOptions));
    auto& ws = setup.io.waitScope;
    auto address = setup.io.provider->getNetwork().parseAddress(setup.ready.tcpEdges[0]).wait(ws);
    auto tcp = address->connect().wait(ws);
    auto secured = tls->wrapClient(kj::mv(tcp), sni).wait(ws);
    Http2SessionOptions options;
    options.role = Http2Role::SERVER;
    session = kj::heap<Http2Session>(setup.io.provider->getTimer(), kj::mv(secured), *this,
                                     options);
    done = session->run().fork();
    control = accept();
    controlHead = control->receiveHead().wait(ws);
    // cloudflared's first RPC write makes Go send the 200 response head.
    control->submit(kj::arr(hdr(":status", "200")), false);
    rpc = kj::heap<wire::ControlClient>(*control, setup.io.provider->getTimer());
  }
  ~TunnelClient() noexcept(false) {
    rpc = nullptr;
    control = nullptr;
    session = nullptr;
  }

  kj::Own<Http2Stream> accept() {
    // Bounded: a request that never reaches the client fails the test in 10 s.
    return setup.io.provider->getTimer().timeoutAfter(10 * kj::SECONDS, session->acceptStream())
        .wait(setup.io.waitScope);
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

  void respond(Http2Stream& stream, kj::uint status, kj::ArrayPtr<const wire::Header> user,
               kj::StringPtr body, bool end = true) {
    // As cloudflared's http2RespWriter: user headers serialized, content-length copied out.
    auto headers = http2::buildResponseHeaders(status, user);
    stream.submit(headers, false);
    if (body.size() > 0) stream.write(body.begin(), body.size()).wait(setup.io.waitScope);
    if (end) stream.shutdownWrite();
  }

  void peerGoAway(uint32_t errorCode, kj::StringPtr debugData) override {
    goAwayCode = errorCode;
    goAwayDebug = kj::heapString(debugData);
  }

  Setup& setup;
  kj::TlsCertificate ca;
  kj::Own<kj::TlsContext> tls;
  kj::Own<Http2Session> session;
  kj::ForkedPromise<void> done = nullptr;
  kj::Own<Http2Stream> control;
  Http2Head controlHead;
  kj::Own<wire::ControlClient> rpc;
  kj::Maybe<uint32_t> goAwayCode;
  kj::String goAwayDebug;
};

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

KJ_TEST("HTTP/2 edge: the control-stream request, registration, configuration, unregister") {
  Setup setup;
  auto& ws = setup.io.waitScope;
  KJ_EXPECT(setup.ready.tcpEdges[0] == setup.ready.edges[0], "TCP and UDP share the port");
  auto& tunnel = setup.emulator.registry().issueTunnel();
  TunnelClient client(setup);

  // What cloudflared's own test client sends (connection/http2_test.go).
  auto& head = client.controlHead.headers;
  KJ_EXPECT(get(head, ":method") == "GET");
  KJ_EXPECT(get(head, ":path") == "/");
  KJ_EXPECT(get(head, ":scheme") == "http");
  KJ_EXPECT(get(head, ":authority") == "localhost:8080");
  KJ_EXPECT(get(head, "cf-cloudflared-proxy-connection-upgrade") == "control-stream");
  KJ_EXPECT(http2::classifyRequest(head) == http2::RequestKind::CONTROL_STREAM);

  auto result = client.registerAs(tunnel);
  KJ_ASSERT(result.is<wire::ConnectionDetails>());
  auto& details = result.get<wire::ConnectionDetails>();
  KJ_EXPECT(details.locationName == "EMU");
  auto& record = onlyRecord(setup.emulator, ConnectionState::REGISTERED);
  KJ_EXPECT(record.uuid.asPtr() == details.uuid.asPtr());
  KJ_EXPECT(record.protocol == "http2");
  KJ_EXPECT(record.version == "2023.7.3");
  KJ_EXPECT(setup.emulator.http2ConnectionCount() == 1);

  // A duplicate registration of the same index on a second connection: EDUPCONN.
  {
    TunnelClient second(setup);
    auto dup = second.registerAs(tunnel, 0);
    KJ_ASSERT(dup.is<wire::RegistrationError>());
    KJ_EXPECT(dup.get<wire::RegistrationError>().isDuplicate());
  }

  auto json = "{\"ingress\":[{\"service\":\"http://localhost:8080\"}]}"_kj;
  client.rpc->updateLocalConfiguration(json.asBytes()).wait(ws);
  KJ_EXPECT(KJ_ASSERT_NONNULL(record.configuration) == json);

  client.rpc->unregisterConnection().wait(ws);
  KJ_EXPECT(record.state == ConnectionState::UNREGISTERED);
  auto publicClient = setup.publicClient();
  kj::HttpHeaders headers(setup.table);
  headers.set(kj::HttpHeaderId::HOST, tunnel.hostname);
  auto response = publicClient->request(kj::HttpMethod::GET, "/", headers).response.wait(ws);
  KJ_EXPECT(response.statusCode == 530);
}

KJ_TEST("HTTP/2 edge: a GET from the front door, answered as cloudflared does") {
  Setup setup;
  auto& ws = setup.io.waitScope;
  auto& tunnel = setup.emulator.registry().issueTunnel();
  TunnelClient client(setup);
  KJ_ASSERT(client.registerAs(tunnel).is<wire::ConnectionDetails>());
  auto publicClient = setup.publicClient();

  kj::HttpHeaders headers(setup.table);
  headers.set(kj::HttpHeaderId::HOST, tunnel.hostname);
  headers.add("X-Test", "one");
  headers.add("Accept", "*/*");
  auto response = publicClient->request(kj::HttpMethod::GET, "/hello?x=1", headers).response;
  auto stream = client.accept();
  KJ_EXPECT(stream->id() % 2 == 1, stream->id());      // client-initiated: the edge's request
  auto request = stream->receiveHead().wait(ws);
  auto& h = request.headers;
  KJ_EXPECT(get(h, ":method") == "GET");
  KJ_EXPECT(get(h, ":scheme") == "https");
  KJ_EXPECT(get(h, ":authority") == tunnel.hostname);
  KJ_EXPECT(get(h, ":path") == "/hello?x=1");
  KJ_EXPECT(get(h, "x-test") == "one");
  KJ_EXPECT(get(h, "accept") == "*/*");
  KJ_EXPECT(get(h, "cf-ray").endsWith("-EMU"));
  KJ_EXPECT(get(h, "cf-connecting-ip") == "127.0.0.1");
  KJ_EXPECT(get(h, "x-forwarded-proto") == "https");
  KJ_EXPECT(find(h, "host") == nullptr);
  KJ_EXPECT(find(h, "connection") == nullptr);
  KJ_EXPECT(find(h, "cf-cloudflared-proxy-connection-upgrade") == nullptr);
  KJ_EXPECT(http2::classifyRequest(h) == http2::RequestKind::HTTP);
  KJ_EXPECT(stream->readAllBytes().wait(ws).size() == 0);   // END_STREAM on HEADERS

  client.respond(*stream, 200, kj::arr(hdr("Content-Type", "text/plain"),
                                       hdr("Content-Length", "5"), hdr("Set-Cookie", "a=1"),
                                       hdr("Set-Cookie", "b=2"), hdr("X-Weird", "v:a;l")),
                 "hello");
  auto r = response.wait(ws);
  KJ_EXPECT(r.statusCode == 200);
  KJ_EXPECT(KJ_ASSERT_NONNULL(r.headers->get(kj::HttpHeaderId::CONTENT_TYPE)) == "text/plain");
  KJ_EXPECT(KJ_ASSERT_NONNULL(r.headers->get(kj::HttpHeaderId::CONTENT_LENGTH)) == "5");
  kj::Vector<kj::String> cookies;
  kj::String weird;
  r.headers->forEach([&](kj::StringPtr name, kj::StringPtr value) {
    if (name == "Set-Cookie") cookies.add(kj::str(value));
    if (name == "X-Weird") weird = kj::str(value);
  });
  KJ_EXPECT(kj::strArray(cookies, ",") == "a=1,b=2", kj::strArray(cookies, ","));
  KJ_EXPECT(weird == "v:a;l", weird);
  KJ_EXPECT(r.body->readAllText().wait(ws) == "hello");

  auto& record = onlyRecord(setup.emulator, ConnectionState::REGISTERED);
  KJ_EXPECT(record.requests == 1);
}

kj::Promise<void> answer(kj::Own<Http2Stream> stream, kj::uint status,
                         kj::Array<wire::Header> user, kj::Array<kj::byte> body) {
  // Streams `body` as the response (HTTP/2 flow control applies), then END_STREAM.
  stream->submit(http2::buildResponseHeaders(status, user), false);
  auto& ref = *stream;
  auto promise = ref.write(body.begin(), body.size());
  return promise.then([&ref]() { ref.shutdownWrite(); }).attach(kj::mv(stream), kj::mv(body));
}

KJ_TEST("HTTP/2 edge: bodies both ways, 0 B to 16 MiB, with and without Content-Length") {
  Setup setup;
  auto& ws = setup.io.waitScope;
  auto& tunnel = setup.emulator.registry().issueTunnel();
  TunnelClient client(setup);
  KJ_ASSERT(client.registerAs(tunnel).is<wire::ConnectionDetails>());
  auto publicClient = setup.publicClient();

  struct Case { size_t size; bool requestLength; bool responseLength; };
  for (auto c: {Case{0, true, true}, Case{0, false, false}, Case{1, true, false},
                Case{1, false, true}, Case{1 << 20, true, true}, Case{1 << 20, false, false},
                Case{16 << 20, true, false}, Case{16 << 20, false, true}}) {
    KJ_CONTEXT(c.size, c.requestLength, c.responseLength);
    auto data = pattern(c.size, static_cast<uint32_t>(c.size) + c.requestLength);
    kj::HttpHeaders headers(setup.table);
    headers.set(kj::HttpHeaderId::HOST, tunnel.hostname);
    auto request = publicClient->request(kj::HttpMethod::POST, "/echo", headers,
        c.requestLength ? kj::Maybe<uint64_t>(data.size()) : kj::Maybe<uint64_t>(nullptr));
    auto writing = request.body->write(data.begin(), data.size())
        .then([body = kj::mv(request.body)]() mutable { body = nullptr; })
        .eagerlyEvaluate(nullptr);
    auto stream = client.accept();
    auto head = stream->receiveHead().wait(ws);
    KJ_EXPECT(get(head.headers, ":method") == "POST");
    KJ_EXPECT(find(head.headers, "transfer-encoding") == nullptr);
    if (c.requestLength) {
      KJ_EXPECT(get(head.headers, "content-length") == kj::str(c.size));
    } else {
      KJ_EXPECT(find(head.headers, "content-length") == nullptr);
    }
    auto got = stream->readAllBytes().wait(ws);
    KJ_EXPECT(got.asPtr() == data.asPtr(), got.size());
    kj::Vector<wire::Header> user;
    user.add(hdr("Content-Type", "application/octet-stream"));
    if (c.responseLength) user.add(hdr("Content-Length", kj::str(c.size)));
    auto serving = answer(kj::mv(stream), 200, user.releaseAsArray(), kj::mv(got))
        .eagerlyEvaluate(nullptr);
    auto r = request.response.wait(ws);
    KJ_EXPECT(r.statusCode == 200);
    auto back = r.body->readAllBytes().wait(ws);
    writing.wait(ws);
    serving.wait(ws);
    KJ_EXPECT(back.size() == data.size(), back.size());
    KJ_EXPECT(back.asPtr() == data.asPtr());
  }
}

KJ_TEST("HTTP/2 edge: cloudflared's 502, a reset before the head, a reset mid-body") {
  Setup setup;
  auto& ws = setup.io.waitScope;
  auto& timer = setup.io.provider->getTimer();
  auto& tunnel = setup.emulator.registry().issueTunnel();
  TunnelClient client(setup);
  KJ_ASSERT(client.registerAs(tunnel).is<wire::ConnectionDetails>());
  auto publicClient = setup.publicClient();
  kj::HttpHeaders headers(setup.table);
  headers.set(kj::HttpHeaderId::HOST, tunnel.hostname);

  // http2.go WriteErrorResponse: 502 + cf-cloudflared-response-meta {"src":"cloudflared"}.
  {
    auto response = publicClient->request(kj::HttpMethod::GET, "/", headers).response;
    auto stream = client.accept();
    stream->receiveHead().wait(ws);
    stream->submit(http2::buildErrorResponseHeaders(), true);
    auto r = response.wait(ws);
    KJ_EXPECT(r.statusCode == 502);
    auto page = r.body->readAllText().wait(ws);
    KJ_EXPECT(strstr(page.cStr(), "cloudflared answered 502") != nullptr, page);
  }
  // An undecodable serialized header value: 502 too.
  {
    auto response = publicClient->request(kj::HttpMethod::GET, "/", headers).response;
    auto stream = client.accept();
    stream->receiveHead().wait(ws);
    stream->submit(kj::arr(hdr(":status", "200"), hdr("cf-cloudflared-response-headers", "!!"),
                           hdr("cf-cloudflared-response-meta", "{\"src\":\"origin\"}")), true);
    auto r = response.wait(ws);
    KJ_EXPECT(r.statusCode == 502);
  }
  // RST_STREAM before any head.
  {
    auto response = publicClient->request(kj::HttpMethod::GET, "/", headers).response;
    auto stream = client.accept();
    stream->receiveHead().wait(ws);
    stream->reset(2);   // INTERNAL_ERROR
    auto r = response.wait(ws);
    KJ_EXPECT(r.statusCode == 502);
  }
  // RST_STREAM after a partial body: the public response is cut, never completed.
  {
    auto response = publicClient->request(kj::HttpMethod::GET, "/", headers).response;
    auto stream = client.accept();
    stream->receiveHead().wait(ws);
    client.respond(*stream, 200, nullptr, "partial", false);
    auto r = response.wait(ws);
    KJ_EXPECT(r.statusCode == 200);
    stream->reset(8);   // CANCEL
    auto body = r.body->readAllText().then([](kj::String&&) { return false; },
                                           [](kj::Exception&&) { return true; });
    KJ_EXPECT(timer.timeoutAfter(5 * kj::SECONDS, kj::mv(body)).wait(ws),
              "the public body completed although the tunnel stream was reset");
  }
  // The connection still serves requests afterwards.
  {
    auto response = publicClient->request(kj::HttpMethod::GET, "/", headers).response;
    auto stream = client.accept();
    stream->receiveHead().wait(ws);
    client.respond(*stream, 204, nullptr, "");
    KJ_EXPECT(response.wait(ws).statusCode == 204);
  }
}

kj::String webSocketAccept(kj::StringPtr key) {
  auto input = kj::str(key, "258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
  kj::byte digest[20];
  KJ_ASSERT(gnutls_hash_fast(GNUTLS_DIG_SHA1, input.begin(), input.size(), digest) == 0);
  return kj::encodeBase64(kj::arrayPtr(digest, 20));
}

KJ_TEST("HTTP/2 edge: WebSocket as cloudflared carries it (upgrade header, 101 sent as 200)") {
  Setup setup;
  auto& ws = setup.io.waitScope;
  auto& tunnel = setup.emulator.registry().issueTunnel();
  TunnelClient client(setup);
  KJ_ASSERT(client.registerAs(tunnel).is<wire::ConnectionDetails>());
  kj::HttpHeaders headers(setup.table);
  headers.set(kj::HttpHeaderId::HOST, tunnel.hostname);

  {
    auto publicClient = setup.publicClient();
    auto upgrade = publicClient->openWebSocket("/chat?room=1", headers);
    auto stream = client.accept();
    auto head = stream->receiveHead().wait(ws);
    auto& h = head.headers;
    KJ_EXPECT(get(h, ":method") == "GET");
    KJ_EXPECT(get(h, ":path") == "/chat?room=1");
    KJ_EXPECT(get(h, "cf-cloudflared-proxy-connection-upgrade") == "websocket");
    KJ_EXPECT(http2::classifyRequest(h) == http2::RequestKind::WEBSOCKET);
    KJ_EXPECT(get(h, "sec-websocket-version") == "13");
    KJ_EXPECT(find(h, "connection") == nullptr);      // HTTP/2 forbids them; cloudflared
    KJ_EXPECT(find(h, "upgrade") == nullptr);         // restores both for the origin
    auto key = kj::str(get(h, "sec-websocket-key"));
    // http2.go: the origin's 101 goes out as 200, its headers serialized.
    stream->submit(http2::buildResponseHeaders(101, kj::arr(
        hdr("Connection", "Upgrade"), hdr("Upgrade", "websocket"),
        hdr("Sec-Websocket-Accept", webSocketAccept(key)))), false);
    KJ_EXPECT(stream->id() > 0);
    auto response = upgrade.wait(ws);
    KJ_ASSERT(response.statusCode == 101, response.statusCode);
    auto publicSocket = kj::mv(response.webSocketOrBody.get<kj::Own<kj::WebSocket>>());
    auto originSocket = kj::newWebSocket(kj::mv(stream), nullptr);
    publicSocket->send(kj::StringPtr("ping over http2")).wait(ws);
    KJ_EXPECT(originSocket->receive().wait(ws).get<kj::String>() == "ping over http2");
    auto blob = pattern(3 << 20, 9);        // larger than the stream windows
    auto sending = originSocket->send(blob.asPtr()).eagerlyEvaluate(nullptr);
    KJ_EXPECT(publicSocket->receive(8 << 20).wait(ws).get<kj::Array<kj::byte>>().asPtr() ==
              blob.asPtr());
    sending.wait(ws);
    publicSocket->close(1000, "done").wait(ws);
    KJ_EXPECT(originSocket->receive().wait(ws).get<kj::WebSocket::Close>().code == 1000);
  }

  // The origin refuses the upgrade: its answer reaches the visitor as is.
  {
    auto publicClient = setup.publicClient();
    auto upgrade = publicClient->openWebSocket("/chat", headers);
    auto stream = client.accept();
    stream->receiveHead().wait(ws);
    client.respond(*stream, 403, kj::arr(hdr("Content-Length", "2")), "no");
    auto response = upgrade.wait(ws);
    KJ_EXPECT(response.statusCode == 403);
    auto& body = response.webSocketOrBody.get<kj::Own<kj::AsyncInputStream>>();
    KJ_EXPECT(body->readAllText().wait(ws) == "no");
  }
}

KJ_TEST("HTTP/2 edge: admin update-configuration is an update-configuration request") {
  Setup setup;
  auto& ws = setup.io.waitScope;
  auto& tunnel = setup.emulator.registry().issueTunnel();
  TunnelClient client(setup);
  KJ_ASSERT(client.registerAs(tunnel).is<wire::ConnectionDetails>());
  auto id = onlyRecord(setup.emulator, ConnectionState::REGISTERED).id;

  auto admin = setup.adminClient();
  kj::HttpHeaders headers(setup.table);
  auto config = "{\"ingress\":[{\"service\":\"http_status:404\"}]}"_kj;
  auto request = admin->request(kj::HttpMethod::POST,
      kj::str("/connections/", id, "/update-configuration?version=3"), headers,
      uint64_t(config.size()));
  request.body->write(config.begin(), config.size()).wait(ws);
  request.body = nullptr;

  auto stream = client.accept();
  auto head = stream->receiveHead().wait(ws);
  KJ_EXPECT(get(head.headers, ":method") == "PUT");
  KJ_EXPECT(get(head.headers, "cf-cloudflared-proxy-connection-upgrade") ==
            "update-configuration");
  KJ_EXPECT(http2::classifyRequest(head.headers) == http2::RequestKind::UPDATE_CONFIGURATION);
  auto body = stream->readAllText().wait(ws);
  KJ_EXPECT(body == kj::str("{\"version\":3,\"config\":", config, "}"), body);
  KJ_EXPECT(get(head.headers, "content-length") == kj::str(body.size()));
  // handleConfigurationUpdate writes json.Marshal(UpdateConfigurationResponse): an implicit 200.
  stream->submit(kj::arr(hdr(":status", "200")), false);
  auto answer = "{\"lastAppliedVersion\":3,\"err\":null}"_kj;
  stream->write(answer.begin(), answer.size()).wait(ws);
  stream->shutdownWrite();

  auto response = request.response.wait(ws);
  KJ_EXPECT(response.statusCode == 200);
  auto text = response.body->readAllText().wait(ws);
  KJ_EXPECT(text == "{\"latestAppliedVersion\":3,\"err\":\"\"}", text);

  // cloudflared's 502 (its JSON decoder failed): the admin API reports 502.
  {
    auto second = admin->request(kj::HttpMethod::POST,
        kj::str("/connections/", id, "/update-configuration?version=4"), headers, uint64_t(1));
    second.body->write("x", 1).wait(ws);
    second.body = nullptr;
    auto refused = client.accept();
    refused->receiveHead().wait(ws);
    refused->readAllText().wait(ws);
    refused->submit(http2::buildErrorResponseHeaders(), true);
    auto r = second.response.wait(ws);
    KJ_EXPECT(r.statusCode == 502);
    auto error = r.body->readAllText().wait(ws);
    KJ_EXPECT(strstr(error.cStr(), "refused the configuration update") != nullptr, error);
  }
}

KJ_TEST("HTTP/2 edge: admin close sends GOAWAY with the code and reason, then closes") {
  Setup setup;
  auto& ws = setup.io.waitScope;
  auto& tunnel = setup.emulator.registry().issueTunnel();
  TunnelClient client(setup);
  KJ_ASSERT(client.registerAs(tunnel).is<wire::ConnectionDetails>());
  auto& record = onlyRecord(setup.emulator, ConnectionState::REGISTERED);
  kj::String body;
  KJ_EXPECT(setup.adminPost(kj::str("/connections/", record.id, "/close?code=11&reason=bye"),
                            "", &body) == 200, body);
  setup.io.provider->getTimer().timeoutAfter(5 * kj::SECONDS, client.done.addBranch()).wait(ws);
  KJ_EXPECT(KJ_ASSERT_NONNULL(client.goAwayCode) == 11);
  KJ_EXPECT(client.goAwayDebug == "bye", client.goAwayDebug);
  setup.waitUntil([&]() { return record.state == ConnectionState::CLOSED; }, "record closed");
  KJ_EXPECT(setup.emulator.http2ConnectionCount() == 0);
}

KJ_TEST("HTTP/2 edge: silence, withheld credit, close-control (reset and fin)") {
  Setup setup;
  auto& ws = setup.io.waitScope;
  auto& timer = setup.io.provider->getTimer();
  auto& tunnel = setup.emulator.registry().issueTunnel();

  // Withheld credit on one stream: the client's response writes stall after the stream window.
  {
    TunnelClient client(setup);
    KJ_ASSERT(client.registerAs(tunnel).is<wire::ConnectionDetails>());
    auto& record = onlyRecord(setup.emulator, ConnectionState::REGISTERED);
    auto publicClient = setup.publicClient();
    kj::HttpHeaders headers(setup.table);
    headers.set(kj::HttpHeaderId::HOST, tunnel.hostname);
    auto response = publicClient->request(kj::HttpMethod::GET, "/big", headers).response;
    auto stream = client.accept();
    stream->receiveHead().wait(ws);
    KJ_EXPECT(setup.adminPost(kj::str("/connections/", record.id, "/withhold-credit?stream=",
                                      stream->id())) == 200);
    KJ_EXPECT(setup.adminPost(kj::str("/connections/", record.id,
                                      "/withhold-credit?stream=999")) == 404);
    auto data = pattern(2 << 20, 5);
    stream->submit(http2::buildResponseHeaders(200, nullptr), false);
    auto& ref = *stream;
    auto sending = ref.write(data.begin(), data.size()).eagerlyEvaluate(nullptr);
    auto r = response.wait(ws);
    KJ_EXPECT(r.statusCode == 200);
    auto buffer = kj::heapArray<kj::byte>(1 << 20);
    // The edge's stream window is 512 KiB: that much arrives, then nothing.
    size_t got = r.body->tryRead(buffer.begin(), 512 * 1024, buffer.size()).wait(ws);
    KJ_EXPECT(got == 512 * 1024, got);
    timer.afterDelay(200 * kj::MILLISECONDS).wait(ws);
    KJ_EXPECT(!sending.poll(ws), "the client's writes went on without credit");
    KJ_EXPECT(!r.body->tryRead(buffer.begin(), 1, buffer.size()).poll(ws));
  }

  // Silence: the edge stops answering, here an RPC on the control stream.
  {
    TunnelClient client(setup);
    KJ_ASSERT(client.registerAs(tunnel, 1).is<wire::ConnectionDetails>());
    auto& record = onlyRecord(setup.emulator, ConnectionState::REGISTERED);
    KJ_EXPECT(setup.adminPost(kj::str("/connections/", record.id, "/silence")) == 200);
    auto json = "{}"_kj;
    auto call = timer.timeoutAfter(500 * kj::MILLISECONDS,
                                   client.rpc->updateLocalConfiguration(json.asBytes()));
    KJ_EXPECT_THROW(OVERLOADED, call.wait(ws));
    auto stats = KJ_ASSERT_NONNULL(record.connection).describeStats();
    KJ_EXPECT(strstr(stats.cStr(), "\"silent\":true") != nullptr, stats);
    KJ_ASSERT_NONNULL(record.connection).close(0, "done");
  }

  // close-control: RST_STREAM with the code on the control stream; the connection stays up.
  for (auto how: {"reset", "fin"}) {
    KJ_CONTEXT(how);
    TunnelClient client(setup);
    KJ_ASSERT(client.registerAs(tunnel, 2).is<wire::ConnectionDetails>());
    auto& record = onlyRecord(setup.emulator, ConnectionState::REGISTERED);
    kj::String body;
    KJ_EXPECT(setup.adminPost(kj::str("/connections/", record.id, "/close-control?how=", how,
                                      "&code=8"), "", &body) == 200, body);
    KJ_EXPECT(record.state == ConnectionState::UNREGISTERED);
    timer.timeoutAfter(5 * kj::SECONDS, client.rpc->onDisconnect()).wait(ws);
    auto buffer = kj::heapArray<kj::byte>(16);
    if (kj::StringPtr(how) == "reset") {
      KJ_EXPECT_THROW_MESSAGE("CANCEL", client.control->tryRead(buffer.begin(), 1, 16).wait(ws));
    } else {
      KJ_EXPECT(client.control->tryRead(buffer.begin(), 1, 16).wait(ws) == 0);
    }
    KJ_EXPECT(setup.adminPost(kj::str("/connections/", record.id, "/close-control")) == 409);
    KJ_EXPECT(!client.done.addBranch().poll(ws), "the connection went down with the control");
    KJ_ASSERT_NONNULL(record.connection).close(0, "done");
  }
}

#if CFQT_EMULATOR_QUIC
quic::ClientConfig quicConfig(Setup& setup, kj::Duration handshakeTimeout) {
  quic::ClientConfig config;
  config.caFile = kj::heapString(setup.ready.ca);
  config.transport.handshakeTimeout = handshakeTimeout;
  config.transport.maxIdleTimeout = 1 * kj::SECONDS;
  config.transport.keepAlivePeriod = 200 * kj::MILLISECONDS;
  return config;
}

KJ_TEST("--no-udp: QUIC handshakes go unanswered while HTTP/2 works; /udp/unblock, /udp/block") {
  Setup setup(nullptr, true);
  auto& ws = setup.io.waitScope;
  KJ_EXPECT(setup.ready.udpBlocked);
  KJ_EXPECT(setup.emulator.udpBlocked());
  auto edge = KJ_ASSERT_NONNULL(quic::SocketAddress::parse(setup.ready.edges[0]));
  auto endpoint = quic::newEndpoint(setup.io.unixEventPort,
                                    KJ_ASSERT_NONNULL(quic::SocketAddress::parse("127.0.0.1:0")));

  // Blocked: no answer at all (the port is bound, so not even an ICMP refusal): the handshake
  // times out, as behind a firewall.
  auto refused = endpoint->dial(edge, quicConfig(setup, 300 * kj::MILLISECONDS))
      .then([](kj::Own<quic::Connection>&&) -> kj::Maybe<kj::Exception> { return nullptr; },
            [](kj::Exception&& e) -> kj::Maybe<kj::Exception> { return kj::mv(e); });
  // Meanwhile a client on TCP registers.
  auto& tunnel = setup.emulator.registry().issueTunnel();
  TunnelClient h2(setup);
  KJ_ASSERT(h2.registerAs(tunnel).is<wire::ConnectionDetails>());
  auto failure = KJ_ASSERT_NONNULL(refused.wait(ws), "a QUIC handshake succeeded while blocked");
  KJ_EXPECT(KJ_ASSERT_NONNULL(quic::classifyException(failure)) ==
            quic::CloseKind::HANDSHAKE_TIMEOUT, failure);

  kj::String body;
  KJ_EXPECT(setup.adminPost("/udp/unblock", "", &body) == 200);
  KJ_EXPECT(body == "{\"udpBlocked\":false}", body);
  auto connection = endpoint->dial(edge, quicConfig(setup, 5 * kj::SECONDS)).wait(ws);
  KJ_EXPECT(connection->alpn() == "argotunnel");

  // Blocked again: the established connection hears nothing more and idles out.
  KJ_EXPECT(setup.adminPost("/udp/block", "", &body) == 200);
  KJ_EXPECT(body == "{\"udpBlocked\":true}", body);
  auto info = setup.io.provider->getTimer().timeoutAfter(5 * kj::SECONDS, connection->onClosed())
      .wait(ws);
  KJ_EXPECT(info.kind == quic::CloseKind::IDLE_TIMEOUT, info.kind, info.description);

  // The HTTP/2 connection was never affected.
  KJ_EXPECT(onlyRecord(setup.emulator, ConnectionState::REGISTERED).protocol == "http2");
  KJ_EXPECT(setup.emulator.http2ConnectionCount() == 1);
}
#endif

}  // namespace
}  // namespace cfqt::emulator
