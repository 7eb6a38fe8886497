// Tests of the quick-tunnel API client against a real HTTPS server on loopback (kj-http + kj-tls,
// test CA in testdata/ trusted through SSL_CERT_FILE).

#include "quick-tunnel-api.h"

#include "edge/json.h"

#include <kj/compat/http.h>
#include <kj/compat/tls.h>
#include <kj/debug.h>
#include <kj/encoding.h>
#include <kj/filesystem.h>
#include <kj/test.h>

#include <stdlib.h>
#include <string.h>

namespace cfqt::edge {
namespace {

const kj::byte SECRET_BYTES[32] = {
  1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16,
  17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32,
};

bool contains(kj::StringPtr haystack, kj::StringPtr needle) {
  return strstr(haystack.cStr(), needle.cStr()) != nullptr;
}

kj::String testdataPath(kj::StringPtr name) {
  const char* root = getenv("CFQT_SOURCE_DIR");
  if (root != nullptr) return kj::str(root, "/src/edge/testdata/", name);
  kj::StringPtr file = __FILE__;
  KJ_IF_MAYBE(slash, file.findLast('/')) {
    return kj::str(file.slice(0, *slash), "/testdata/", name);
  }
  return kj::str("testdata/", name);
}

kj::String readTestdata(kj::StringPtr name) {
  auto fs = kj::newDiskFilesystem();
  auto path = kj::Path::parse(testdataPath(name).slice(1));
  return fs->getRoot().openFile(path)->readAllText();
}

void trustTestCa() {
  // OpenSSL reads SSL_CERT_FILE whenever a TlsContext loads the default verify paths.
  KJ_ASSERT(setenv("SSL_CERT_FILE", testdataPath("ca.pem").cStr(), 1) == 0);
}

kj::String successBody(kj::StringPtr id = "3F1C0A2E-1B2C-4D3E-8F90-A1B2C3D4E5F6") {
  auto secret = kj::encodeBase64(kj::arrayPtr(SECRET_BYTES, 32));
  return kj::str(R"({"success":true,"result":{"id":")", id,
                 R"(","name":"qt","hostname":"happy-words-here.trycloudflare.com",)",
                 R"("account_tag":"0123456789abcdef0123456789abcdef","secret":")", secret,
                 R"("},"errors":[],"messages":[]})");
}

struct Canned {
  uint status;
  kj::StringPtr contentType;
  kj::String body;
  bool hang = false;
};

class TestService final: public kj::HttpService {
public:
  TestService(kj::HttpHeaderTable& table, kj::HttpHeaderId userAgent,
              kj::HttpHeaderId acceptEncoding)
      : table(table), userAgent(userAgent), acceptEncoding(acceptEncoding) {}

  kj::Vector<Canned> answers;   // one per request; the last one repeats
  uint requests = 0;
  kj::String lastMethod;
  kj::String lastUrl;
  kj::String lastUserAgent;
  kj::String lastContentType;
  kj::String lastContentLength;
  kj::String lastHost;
  bool sawAcceptEncoding = false;
  size_t lastBodySize = 0;

  kj::Promise<void> request(kj::HttpMethod method, kj::StringPtr url,
                            const kj::HttpHeaders& headers, kj::AsyncInputStream& requestBody,
                            Response& response) override {
    uint index = kj::min(requests, answers.size() - 1);
    ++requests;
    lastMethod = kj::str(method);
    lastUrl = kj::str(url);
    lastUserAgent = kj::str(headers.get(userAgent).orDefault("(none)"));
    lastContentType = kj::str(headers.get(kj::HttpHeaderId::CONTENT_TYPE).orDefault("(none)"));
    lastContentLength = kj::str(headers.get(kj::HttpHeaderId::CONTENT_LENGTH).orDefault("(none)"));
    lastHost = kj::str(headers.get(kj::HttpHeaderId::HOST).orDefault("(none)"));
    sawAcceptEncoding = headers.get(acceptEncoding) != nullptr;
    return requestBody.readAllBytes(1024).then(
        [this, index, &response](kj::Array<kj::byte> body) -> kj::Promise<void> {
      lastBodySize = body.size();
      auto& answer = answers[index];
      if (answer.hang) return kj::NEVER_DONE;
      kj::HttpHeaders out(table);
      out.set(kj::HttpHeaderId::CONTENT_TYPE, answer.contentType);
      auto stream = response.send(answer.status, "Whatever", out, answer.body.size());
      auto promise = stream->write(answer.body.begin(), answer.body.size());
      return promise.attach(kj::mv(stream));
    });
  }

private:
  kj::HttpHeaderTable& table;
  kj::HttpHeaderId userAgent;
  kj::HttpHeaderId acceptEncoding;
};

// One HTTPS (or HTTP) server on 127.0.0.1:<ephemeral>, certificate for "localhost".
class TestServer {
public:
  TestServer(kj::AsyncIoContext& io, bool tls = true, kj::StringPtr certName = "server")
      : io(io), headerTableBuilder(), userAgentId(headerTableBuilder.add("User-Agent")),
        acceptEncodingId(headerTableBuilder.add("Accept-Encoding")),
        headerTable(headerTableBuilder.build()),
        service(*headerTable, userAgentId, acceptEncodingId),
        server(io.provider->getTimer(), *headerTable, service) {
    auto addr = io.provider->getNetwork().parseAddress("127.0.0.1", 0).wait(io.waitScope);
    auto listener = addr->listen();
    port = listener->getPort();
    if (tls) {
      kj::TlsContext::Options options;
      options.useSystemTrustStore = false;
      keypair = kj::heap<kj::TlsKeypair>(kj::TlsKeypair{
          kj::TlsPrivateKey(readTestdata(kj::str(certName, "-key.pem"))),
          kj::TlsCertificate(readTestdata(kj::str(certName, ".pem")))});
      options.defaultKeypair = *keypair;
      tlsContext = kj::heap<kj::TlsContext>(kj::mv(options));
      receiver = tlsContext->wrapPort(kj::mv(listener));
    } else {
      receiver = kj::mv(listener);
    }
    listening = server.listenHttp(*receiver).eagerlyEvaluate([](kj::Exception&& e) {
      KJ_LOG(INFO, "test server stopped", e);
    });
  }

  kj::String url(kj::StringPtr host = "localhost") {
    return kj::str(tlsContext.get() == nullptr ? "http://" : "https://", host, ':', port);
  }

  kj::AsyncIoContext& io;
  kj::HttpHeaderTable::Builder headerTableBuilder;
  kj::HttpHeaderId userAgentId;
  kj::HttpHeaderId acceptEncodingId;
  kj::Own<kj::HttpHeaderTable> headerTable;
  TestService service;
  kj::HttpServer server;
  kj::Own<kj::TlsKeypair> keypair;
  kj::Own<kj::TlsContext> tlsContext;
  kj::Own<kj::ConnectionReceiver> receiver;
  uint port = 0;
  kj::Promise<void> listening = nullptr;
};

QuickTunnelApiConfig testConfig(kj::String url) {
  QuickTunnelApiConfig config;
  config.serviceUrl = kj::mv(url);
  config.timeout = 2 * kj::SECONDS;
  config.retryBackoffs = kj::arr(1 * kj::MILLISECONDS, 2 * kj::MILLISECONDS, 4 * kj::MILLISECONDS);
  return config;
}

// Runs a request expected to fail; returns the exception.
kj::Exception expectFailure(kj::AsyncIoContext& io, QuickTunnelApiConfig config) {
  auto promise = requestQuickTunnel(io.provider->getTimer(), io.provider->getNetwork(),
                                    kj::mv(config));
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() { promise.wait(io.waitScope); })) {
    return kj::mv(*e);
  }
  KJ_FAIL_ASSERT("quick tunnel request unexpectedly succeeded");
}

void expectKind(const kj::Exception& e, QuickTunnelErrorKind kind) {
  auto got = quickTunnelErrorKind(e);
  KJ_EXPECT(got == kind, e.getDescription(), kind);
}

void expectContains(const kj::Exception& e, kj::StringPtr text) {
  KJ_EXPECT(contains(e.getDescription(), text), text, e.getDescription());
}

// ---------------------------------------------------------------------------------------------
// Pure decoding.

KJ_TEST("UUID parsing accepts every form Go's uuid.Parse does") {
  auto canonical = "3f1c0a2e-1b2c-4d3e-8f90-a1b2c3d4e5f6"_kj;
  for (auto form: {"3f1c0a2e-1b2c-4d3e-8f90-a1b2c3d4e5f6"_kj,
                   "3F1C0A2E-1B2C-4D3E-8F90-A1B2C3D4E5F6"_kj,
                   "urn:uuid:3f1c0a2e-1b2c-4d3e-8f90-a1b2c3d4e5f6"_kj,
                   "URN:UUID:3f1c0a2e-1b2c-4d3e-8f90-a1b2c3d4e5f6"_kj,
                   "{3f1c0a2e-1b2c-4d3e-8f90-a1b2c3d4e5f6}"_kj,
                   "3f1c0a2e1b2c4d3e8f90a1b2c3d4e5f6"_kj}) {
    KJ_IF_MAYBE(bytes, parseUuid(form)) {
      KJ_EXPECT(formatUuid(*bytes) == canonical, form);
    } else {
      KJ_FAIL_EXPECT("rejected", form);
    }
  }
  for (auto bad: {""_kj, "3f1c0a2e-1b2c-4d3e-8f90-a1b2c3d4e5f"_kj,
                  "3f1c0a2e_1b2c-4d3e-8f90-a1b2c3d4e5f6"_kj,
                  "3f1c0a2e-1b2c-4d3e-8f90-a1b2c3d4e5fg"_kj,
                  "(3f1c0a2e-1b2c-4d3e-8f90-a1b2c3d4e5f6)"_kj,
                  "urn:uuix:3f1c0a2e-1b2c-4d3e-8f90-a1b2c3d4e5f6"_kj, "not-a-uuid"_kj}) {
    KJ_EXPECT(parseUuid(bad) == nullptr, bad);
  }
}

KJ_TEST("base64 secret must be padded standard base64") {
  KJ_EXPECT(KJ_ASSERT_NONNULL(decodeStdBase64Padded("aGVsbG8=")) == "hello"_kj.asBytes());
  KJ_EXPECT(KJ_ASSERT_NONNULL(decodeStdBase64Padded("aGk=")) == "hi"_kj.asBytes());
  KJ_EXPECT(KJ_ASSERT_NONNULL(decodeStdBase64Padded("aGVs\r\nbG8=")) == "hello"_kj.asBytes());
  KJ_EXPECT(KJ_ASSERT_NONNULL(decodeStdBase64Padded("+/+/")).size() == 3);
  KJ_EXPECT(decodeStdBase64Padded("aGVsbG8") == nullptr);      // missing padding
  KJ_EXPECT(decodeStdBase64Padded("-_-_") == nullptr);         // URL alphabet
  KJ_EXPECT(decodeStdBase64Padded("aG=s") == nullptr);         // padding in the middle
  KJ_EXPECT(decodeStdBase64Padded("a===") == nullptr);
  KJ_EXPECT(decodeStdBase64Padded("aGVs bG8=") == nullptr);
}

KJ_TEST("JSON reader handles escapes, depth and garbage without throwing") {
  auto v = KJ_ASSERT_NONNULL(parseJson(
      R"( {"a":"x\u00e9\ud83d\ude00\n","b":[1,-2.5e3,true,false,null],"A":{}} )"_kj.asBytes()));
  KJ_EXPECT(KJ_ASSERT_NONNULL(v.get("a")).string == "x\xc3\xa9\xf0\x9f\x98\x80\n");
  KJ_EXPECT(KJ_ASSERT_NONNULL(v.get("b")).array.size() == 5);
  KJ_EXPECT(KJ_ASSERT_NONNULL(v.get("b")).array[1].number == -2500);
  KJ_EXPECT(KJ_ASSERT_NONNULL(v.getIgnoringCase("a")).kind == JsonValue::Kind::OBJECT);
  for (auto bad: {""_kj, "{"_kj, "{\"a\":}"_kj, "[1,]"_kj, "01"_kj, "\"\\x\""_kj, "nul"_kj,
                  "{} {}"_kj, "\"a\nb\""_kj, "1."_kj}) {
    KJ_EXPECT(parseJson(bad.asBytes()) == nullptr, bad);
  }
  auto deep = kj::heapString(200);
  for (size_t i = 0; i < deep.size(); i++) deep[i] = i < 100 ? '[' : ']';
  KJ_EXPECT(parseJson(deep.asBytes()) == nullptr);
}

KJ_TEST("response decoding follows Go: case-insensitive top-level keys, unknown keys ignored") {
  auto body = kj::str(R"({"SUCCESS":true,"Result":{)",
                      R"("id":"urn:uuid:3F1C0A2E-1B2C-4D3E-8F90-A1B2C3D4E5F6",)",
                      R"("hostname":"a-b-c.trycloudflare.com","account_tag":"acct",)",
                      R"("secret":"aGVsbG8=",)",
                      R"("extra":[1,2,{"x":null}]},"Errors":[],"whatever":{"deep":[true]}})");
  auto result = decodeQuickTunnelResponse(200, "application/json"_kj, body.asBytes());
  auto& tunnel = KJ_ASSERT_NONNULL(result.tryGet<QuickTunnel>());
  KJ_EXPECT(tunnel.id == "3f1c0a2e-1b2c-4d3e-8f90-a1b2c3d4e5f6");
  KJ_EXPECT(tunnel.tunnelId.size() == 16 && tunnel.tunnelId[0] == 0x3f);
  KJ_EXPECT(tunnel.hostname == "a-b-c.trycloudflare.com");
  KJ_EXPECT(tunnel.accountTag == "acct");
  KJ_EXPECT(tunnel.secret == "hello"_kj.asBytes());
}

KJ_TEST("a hostname that is not a DNS name is refused without being echoed") {
  KJ_EXPECT(isQuickTunnelHostname("a-b-c.trycloudflare.com"));
  KJ_EXPECT(isQuickTunnelHostname("https://a-b-c.trycloudflare.com"));
  KJ_EXPECT(isQuickTunnelHostname("h"));
  KJ_EXPECT(isQuickTunnelHostname("x1.Example-Zone.localhost"));
  for (auto bad: {""_kj, "."_kj, "a..b"_kj, "-a.b"_kj, "a-.b"_kj, "a.b."_kj, "a b.com"_kj,
                  "a_b.com"_kj, "a.b/c"_kj, "a.b:443"_kj, "http://a.b"_kj, "https://"_kj,
                  "caf\xc3\xa9.com"_kj, "evil\x1b[31m.com"_kj, "a\nb.com"_kj}) {
    KJ_EXPECT(!isQuickTunnelHostname(bad), bad);
  }
  KJ_EXPECT(!isQuickTunnelHostname(kj::str(kj::repeat('a', 64), ".com")));
  KJ_EXPECT(isQuickTunnelHostname(kj::str(kj::repeat('a', 63), ".com")));
  auto longName = kj::str(kj::repeat('a', 60), '.', kj::repeat('b', 60), '.', kj::repeat('c', 60),
                          '.', kj::repeat('d', 60), ".com");   // 247 bytes
  KJ_EXPECT(isQuickTunnelHostname(longName));
  KJ_EXPECT(!isQuickTunnelHostname(kj::str(longName, ".abcdefgh")));   // 256

  auto body = kj::str(R"({"result":{"id":"3f1c0a2e-1b2c-4d3e-8f90-a1b2c3d4e5f6",)",
                      R"("hostname":"evil\u001b]0;pwned\u0007.trycloudflare.com",)",
                      R"("account_tag":"acct","secret":"aGVsbG8="}})");
  auto result = decodeQuickTunnelResponse(200, "application/json"_kj, body.asBytes());
  auto& e = KJ_ASSERT_NONNULL(result.tryGet<QuickTunnelError>());
  KJ_EXPECT(e.kind == QuickTunnelErrorKind::INVALID_RESPONSE);
  KJ_EXPECT(contains(e.message, "result.hostname is not a DNS name"), e.message);
  KJ_EXPECT(!contains(e.message, "pwned") && !contains(e.message, "\x1b"), e.message);
}

KJ_TEST("decoding errors never carry the secret") {
  auto body = R"({"result":{"id":"3f1c0a2e-1b2c-4d3e-8f90-a1b2c3d4e5f6","hostname":"h",)"
              R"("secret":"c2VjcmV0LXRleHQ"}})"_kj;
  auto result = decodeQuickTunnelResponse(200, nullptr, body.asBytes());
  auto& e = KJ_ASSERT_NONNULL(result.tryGet<QuickTunnelError>());
  KJ_EXPECT(e.kind == QuickTunnelErrorKind::INVALID_RESPONSE);
  KJ_EXPECT(!contains(e.message, "c2VjcmV0LXRleHQ"), e.message);
}

// ---------------------------------------------------------------------------------------------
// Against a real HTTPS server.

KJ_TEST("requestQuickTunnel: success over HTTPS, request shaped like cloudflared HEAD's") {
  trustTestCa();
  auto io = kj::setupAsyncIo();
  TestServer server(io);
  server.service.answers.add(Canned{200, "application/json", successBody()});
  auto config = testConfig(kj::str(server.url(), "/"));
  auto tunnel = requestQuickTunnel(io.provider->getTimer(), io.provider->getNetwork(),
                                   kj::mv(config)).wait(io.waitScope);
  KJ_EXPECT(tunnel.id == "3f1c0a2e-1b2c-4d3e-8f90-a1b2c3d4e5f6");
  KJ_EXPECT(tunnel.hostname == "happy-words-here.trycloudflare.com");
  KJ_EXPECT(tunnel.accountTag == "0123456789abcdef0123456789abcdef");
  KJ_EXPECT(tunnel.secret == kj::arrayPtr(SECRET_BYTES, 32));
  KJ_EXPECT(server.service.requests == 1);
  KJ_EXPECT(server.service.lastMethod == "POST");
  KJ_EXPECT(server.service.lastUrl == "/tunnel", server.service.lastUrl);
  KJ_EXPECT(server.service.lastContentType == "application/json");
  KJ_EXPECT(server.service.lastContentLength == "0", server.service.lastContentLength);
  KJ_EXPECT(server.service.lastBodySize == 0);
  KJ_EXPECT(server.service.lastUserAgent == kj::str("cloudflared/2026.8.2 cfqt/", cfqtVersion()),
            server.service.lastUserAgent);
  KJ_EXPECT(server.service.lastHost == kj::str("localhost:", server.port), server.service.lastHost);
  KJ_EXPECT(defaultUserAgent().startsWith("cloudflared/2026.8.2 cfqt/"));
}

KJ_TEST("requestQuickTunnel: --user-agent, a base path and plain http://") {
  auto io = kj::setupAsyncIo();
  TestServer server(io, false);
  server.service.answers.add(Canned{200, "application/json", successBody()});
  auto config = testConfig(kj::str(server.url("127.0.0.1"), "/api/v1"));
  config.userAgent = kj::str("my-agent/1.0");
  auto tunnel = requestQuickTunnel(io.provider->getTimer(), io.provider->getNetwork(),
                                   kj::mv(config)).wait(io.waitScope);
  KJ_EXPECT(tunnel.hostname == "happy-words-here.trycloudflare.com");
  KJ_EXPECT(server.service.lastUrl == "/api/v1/tunnel", server.service.lastUrl);
  KJ_EXPECT(server.service.lastUserAgent == "my-agent/1.0");
}

KJ_TEST("requestQuickTunnel: HTTP 429 means rate limited, not retried") {
  trustTestCa();
  auto io = kj::setupAsyncIo();
  TestServer server(io);
  server.service.answers.add(Canned{429, "text/plain", kj::str("error code: 1015")});
  auto e = expectFailure(io, testConfig(server.url()));
  expectKind(e, QuickTunnelErrorKind::RATE_LIMITED);
  expectContains(e, "rate limited by trycloudflare.com; wait a few minutes and retry");
  KJ_EXPECT(server.service.requests == 1);
}

KJ_TEST("requestQuickTunnel: Cloudflare HTML error page means rate limited") {
  trustTestCa();
  auto io = kj::setupAsyncIo();
  TestServer server(io);
  server.service.answers.add(Canned{403, "text/html; charset=UTF-8", kj::str(
      "<!DOCTYPE html>\n<html><head><title>Access denied | api.trycloudflare.com used "
      "Cloudflare to restrict access</title></head><body>Error 1015 You are being rate limited"
      "</body></html>")});
  auto e = expectFailure(io, testConfig(server.url()));
  expectKind(e, QuickTunnelErrorKind::RATE_LIMITED);
  expectContains(e, "rate limited by trycloudflare.com; wait a few minutes and retry");
}

KJ_TEST("requestQuickTunnel: non-JSON body reports the status and the first 200 bytes") {
  trustTestCa();
  auto io = kj::setupAsyncIo();
  TestServer server(io);
  auto body = kj::str("not json at all: ", kj::repeat('x', 300), "TAIL-MARKER");
  server.service.answers.add(Canned{404, "text/plain", kj::mv(body)});
  auto e = expectFailure(io, testConfig(server.url()));
  expectKind(e, QuickTunnelErrorKind::NOT_JSON);
  expectContains(e, "HTTP 404");
  expectContains(e, kj::str("\"not json at all: ", kj::repeat('x', 183), "\""));
  KJ_EXPECT(!contains(e.getDescription(), "TAIL-MARKER"));
  KJ_EXPECT(server.service.requests == 1);
}

KJ_TEST("requestQuickTunnel: success:false lists errors[] codes and messages") {
  trustTestCa();
  auto io = kj::setupAsyncIo();
  TestServer server(io);
  server.service.answers.add(Canned{400, "application/json", kj::str(
      R"({"success":false,"result":null,"errors":[{"code":1001,"message":"tunnel quota exceeded"},)"
      R"({"code":7003,"message":"could not route"}],"messages":[]})")});
  auto e = expectFailure(io, testConfig(server.url()));
  expectKind(e, QuickTunnelErrorKind::API_ERROR);
  expectContains(e, "error 1001: tunnel quota exceeded");
  expectContains(e, "error 7003: could not route");
  expectContains(e, "HTTP 400");
}

KJ_TEST("requestQuickTunnel: missing or invalid id is reported") {
  trustTestCa();
  auto io = kj::setupAsyncIo();
  {
    TestServer server(io);
    server.service.answers.add(Canned{200, "application/json", kj::str(
        R"({"success":true,"result":{"hostname":"h.trycloudflare.com","secret":"aGVsbG8="}})")});
    auto e = expectFailure(io, testConfig(server.url()));
    expectKind(e, QuickTunnelErrorKind::INVALID_RESPONSE);
    expectContains(e, "without result.id");
  }
  {
    TestServer server(io);
    server.service.answers.add(Canned{200, "application/json", successBody("not-a-uuid")});
    auto e = expectFailure(io, testConfig(server.url()));
    expectKind(e, QuickTunnelErrorKind::INVALID_RESPONSE);
    expectContains(e, "result.id \"not-a-uuid\" is not a UUID");
  }
}

KJ_TEST("requestQuickTunnel: missing or invalid secret is reported") {
  trustTestCa();
  auto io = kj::setupAsyncIo();
  {
    TestServer server(io);
    server.service.answers.add(Canned{200, "application/json", kj::str(
        R"({"result":{"id":"3f1c0a2e-1b2c-4d3e-8f90-a1b2c3d4e5f6","hostname":"h",)"
        R"("secret":null}})")});
    auto e = expectFailure(io, testConfig(server.url()));
    expectKind(e, QuickTunnelErrorKind::INVALID_RESPONSE);
    expectContains(e, "result.secret is missing");
  }
  {
    TestServer server(io);
    server.service.answers.add(Canned{200, "application/json", kj::str(
        R"({"result":{"id":"3f1c0a2e-1b2c-4d3e-8f90-a1b2c3d4e5f6","hostname":"h",)"
        R"("secret":"c2VjcmV0_"}})")});
    auto e = expectFailure(io, testConfig(server.url()));
    expectKind(e, QuickTunnelErrorKind::INVALID_RESPONSE);
    expectContains(e, "result.secret is not padded standard base64");
    KJ_EXPECT(!contains(e.getDescription(), "c2VjcmV0_"));
  }
}

KJ_TEST("requestQuickTunnel: TLS verification failure names the host and the reason") {
  trustTestCa();
  auto io = kj::setupAsyncIo();
  TestServer server(io, true, "untrusted");
  server.service.answers.add(Canned{200, "application/json", successBody()});
  auto e = expectFailure(io, testConfig(server.url()));
  expectKind(e, QuickTunnelErrorKind::TLS);
  expectContains(e, "TLS handshake with localhost");
  expectContains(e, "self-signed certificate");   // OpenSSL's verification error
  KJ_EXPECT(server.service.requests == 0);
}

KJ_TEST("requestQuickTunnel: connection refused is retried with backoff, then reported") {
  auto io = kj::setupAsyncIo();
  uint port;
  {
    auto addr = io.provider->getNetwork().parseAddress("127.0.0.1", 0).wait(io.waitScope);
    port = addr->listen()->getPort();   // closed again right away: nothing listens there
  }
  auto config = testConfig(kj::str("http://127.0.0.1:", port));
  auto start = io.provider->getTimer().now();
  auto e = expectFailure(io, kj::mv(config));
  auto elapsed = io.provider->getTimer().now() - start;
  expectKind(e, QuickTunnelErrorKind::CONNECT);
  expectContains(e, kj::str("cannot connect to 127.0.0.1:", port));
  KJ_EXPECT(e.getType() == kj::Exception::Type::DISCONNECTED);
  KJ_EXPECT(elapsed >= 7 * kj::MILLISECONDS, elapsed);   // 1 + 2 + 4 ms of backoff
}

KJ_TEST("requestQuickTunnel: timeout is reported (and retried)") {
  trustTestCa();
  auto io = kj::setupAsyncIo();
  TestServer server(io);
  server.service.answers.add(Canned{200, "application/json", kj::str(), true});
  auto config = testConfig(server.url());
  // (Long enough for the TLS handshake and the request to reach the server in the sanitizer
  // build on a loaded machine: 50 ms was not.)
  config.timeout = 400 * kj::MILLISECONDS;
  config.retryBackoffs = kj::arr(1 * kj::MILLISECONDS);
  auto e = expectFailure(io, kj::mv(config));
  expectKind(e, QuickTunnelErrorKind::TIMEOUT);
  expectContains(e, "within 400 ms");
  KJ_EXPECT(e.getType() == kj::Exception::Type::OVERLOADED);
  KJ_EXPECT(server.service.requests == 2, server.service.requests);
}

KJ_TEST("requestQuickTunnel: 5xx is retried and a later success wins") {
  trustTestCa();
  auto io = kj::setupAsyncIo();
  TestServer server(io);
  server.service.answers.add(Canned{502, "text/plain", kj::str("bad gateway")});
  server.service.answers.add(Canned{503, "text/plain", kj::str("unavailable")});
  server.service.answers.add(Canned{200, "application/json", successBody()});
  auto tunnel = requestQuickTunnel(io.provider->getTimer(), io.provider->getNetwork(),
                                   testConfig(server.url())).wait(io.waitScope);
  KJ_EXPECT(tunnel.hostname == "happy-words-here.trycloudflare.com");
  KJ_EXPECT(server.service.requests == 3);
}

KJ_TEST("requestQuickTunnel: persistent 5xx gives up after the configured retries") {
  trustTestCa();
  auto io = kj::setupAsyncIo();
  TestServer server(io);
  server.service.answers.add(Canned{500, "text/plain", kj::str("internal error")});
  auto e = expectFailure(io, testConfig(server.url()));
  expectKind(e, QuickTunnelErrorKind::SERVER_ERROR);
  expectContains(e, "HTTP 500");
  expectContains(e, "internal error");
  KJ_EXPECT(server.service.requests == 4, server.service.requests);
}

KJ_TEST("requestQuickTunnel: a Cloudflare 5xx HTML page is a retried server error") {
  trustTestCa();
  auto io = kj::setupAsyncIo();
  TestServer server(io);
  server.service.answers.add(Canned{502, "text/html", kj::str(
      "<html><head><title>502 Bad Gateway</title></head><body><center>cloudflare</center>"
      "</body></html>")});
  auto e = expectFailure(io, testConfig(server.url()));
  expectKind(e, QuickTunnelErrorKind::SERVER_ERROR);
  expectContains(e, "HTTP 502");
  KJ_EXPECT(server.service.requests == 4, server.service.requests);
}

KJ_TEST("requestQuickTunnel: a 4xx is not retried") {
  trustTestCa();
  auto io = kj::setupAsyncIo();
  TestServer server(io);
  server.service.answers.add(Canned{400, "application/json", kj::str(R"({"success":false})")});
  auto e = expectFailure(io, testConfig(server.url()));
  expectKind(e, QuickTunnelErrorKind::API_ERROR);
  KJ_EXPECT(server.service.requests == 1);
}

KJ_TEST("requestQuickTunnel: a bad --quick-service URL is a config error") {
  auto io = kj::setupAsyncIo();
  for (auto bad: {"ftp://x"_kj, "api.trycloudflare.com"_kj, "https://"_kj, "https://a b"_kj}) {
    auto e = expectFailure(io, testConfig(kj::str(bad)));
    expectKind(e, QuickTunnelErrorKind::BAD_CONFIG);
  }
}

}  // namespace
}  // namespace cfqt::edge
