// The YAML/JSON configuration and the ingress rules: parsing errors with line numbers,
// cloudflared's validation cases, and rule matching.

#include "named/ingress.h"

#include <kj/debug.h>
#include <kj/test.h>

#include <string.h>

namespace cfqt::named {
namespace {

bool contains(kj::StringPtr haystack, kj::StringPtr needle) {
  return strstr(haystack.cStr(), needle.cStr()) != nullptr;
}

TunnelConfig parsed(kj::StringPtr text) {
  auto result = parseConfig(text, "config.yml");
  KJ_IF_MAYBE(e, result.tryGet<kj::String>()) KJ_FAIL_ASSERT("config error", *e);
  return kj::mv(result.get<TunnelConfig>());
}

kj::String configError(kj::StringPtr text) {
  auto result = parseConfig(text, "config.yml");
  KJ_ASSERT(result.is<kj::String>(), "expected a config error", text);
  return kj::mv(result.get<kj::String>());
}

kj::String ingressError(kj::StringPtr text) {
  auto config = parsed(text);
  KJ_IF_MAYBE(e, validateIngress(config.ingress)) {
    // build() agrees with validateIngress().
    auto built = Ingress::build(config.ingress, config.originRequest, origin::OriginConfig());
    KJ_EXPECT(built.is<kj::String>() && built.get<kj::String>() == *e);
    return kj::mv(*e);
  }
  KJ_FAIL_ASSERT("expected an ingress error", text);
}

constexpr kj::StringPtr GOOD = R"(tunnel: 3f1c0a2e-1b2c-4d3e-8f90-a1b2c3d4e5f6
credentials-file: /etc/cloudflared/creds.json
protocol: http2
originRequest:
  connectTimeout: 10s
ingress:
  - hostname: app.example.com
    service: http://127.0.0.1:8001
  - hostname: "*.example.com"
    path: ^/api/.*
    service: http://127.0.0.1:8002
    originRequest:
      connectTimeout: 2s
      httpHostHeader: internal.api
  - hostname: "*.example.com"
    service: unix:/run/app.sock
  - service: http_status:404
)"_kj;

KJ_TEST("a config file with tunnel, credentials, originRequest and ingress") {
  auto config = parsed(GOOD);
  KJ_EXPECT(KJ_ASSERT_NONNULL(config.tunnel) == "3f1c0a2e-1b2c-4d3e-8f90-a1b2c3d4e5f6");
  KJ_EXPECT(KJ_ASSERT_NONNULL(config.credentialsFile) == "/etc/cloudflared/creds.json");
  KJ_ASSERT(config.flags.size() == 1);
  KJ_EXPECT(config.flags[0].name == "protocol" && config.flags[0].value == "http2");
  KJ_ASSERT(config.ingress.size() == 4);
  KJ_EXPECT(config.ingress[1].line == 9, config.ingress[1].line);

  auto built = Ingress::build(config.ingress, config.originRequest, origin::OriginConfig());
  KJ_IF_MAYBE(e, built.tryGet<kj::String>()) KJ_FAIL_ASSERT(*e);
  auto& ingress = *built.get<kj::Own<Ingress>>();
  KJ_EXPECT(ingress.match("app.example.com", "/") == 0);
  KJ_EXPECT(ingress.match("APP.example.com:443", "/x") == 0);
  KJ_EXPECT(ingress.match("b.example.com", "/api/v1") == 1);
  KJ_EXPECT(ingress.match("b.example.com", "/other") == 2);
  KJ_EXPECT(ingress.match("example.org", "/api/v1") == 3);
  KJ_EXPECT(ingress.match("", "/") == 3);

  auto rules = ingress.rules();
  KJ_EXPECT(rules[0].origin.connectTimeout == 10 * kj::SECONDS);     // top-level default
  KJ_EXPECT(rules[1].origin.connectTimeout == 2 * kj::SECONDS);      // the rule's own
  KJ_EXPECT(KJ_ASSERT_NONNULL(rules[1].origin.httpHostHeader) == "internal.api");
  KJ_EXPECT(rules[1].origin.port == 8002);
  KJ_EXPECT(rules[2].origin.kind == origin::OriginKind::UNIX);
  KJ_EXPECT(rules[3].origin.kind == origin::OriginKind::HTTP_STATUS && rules[3].origin.status == 404);
  KJ_EXPECT(ingress.describe(1) ==
            "\thostname: *.example.com\n\tpath: ^/api/.*\n\tservice: http://127.0.0.1:8002\n");
  KJ_EXPECT(ingress.describe(3) == "\tservice: http_status:404\n");
}

KJ_TEST("the remote (JSON) configuration parses with the same reader") {
  auto config = parsed(R"({"ingress":[{"hostname":"a.example","service":"hello_world"},)"
                       R"({"service":"http_status:503"}],"originRequest":{"connectTimeout":5},)"
                       R"("warp-routing":{"enabled":false}})");
  KJ_ASSERT(config.ingress.size() == 2);
  KJ_EXPECT(KJ_ASSERT_NONNULL(config.originRequest.connectTimeout) == 5 * kj::SECONDS);
  KJ_EXPECT(validateIngress(config.ingress) == nullptr);
}

KJ_TEST("config file errors carry the line") {
  auto e = configError("tunnel: x\ningress:\n  - hostname: a\n    service: [1, 2\n");
  KJ_EXPECT(e.startsWith("config.yml:"), e);
  e = configError("ingress:\n  - hostname: a\n    service: http://x\n  - service\n");
  KJ_EXPECT(e.startsWith("config.yml:4: an ingress rule must be a mapping"), e);
  e = configError("ingress:\n  - hostname: a\n  - service: http_status:404\n");
  KJ_EXPECT(e.startsWith("config.yml:2: this ingress rule has no service"), e);
  e = configError("originRequest:\n  connectTimeout: soon\n");
  KJ_EXPECT(e == "config.yml:2: connectTimeout must be a duration such as 30s, 1m or 500ms", e);
  e = configError("ingress: 7\n");
  KJ_EXPECT(e.startsWith("config.yml:1: ingress must be a list of rules"), e);
  e = configError("- just\n- a list\n");
  KJ_EXPECT(contains(e, "must be a mapping"), e);
  KJ_EXPECT(loadConfigFile("/nonexistent/config.yml").is<kj::String>());
}

KJ_TEST("ingress validation: cloudflared's documented rules") {
  // No rules at all.
  KJ_EXPECT(ingressError("tunnel: x\n") == "The config file doesn't contain any ingress rules");
  // The catch-all is missing.
  auto e = ingressError("ingress:\n  - hostname: a.example.com\n    service: http://x:1\n");
  KJ_EXPECT(e == "line 2: The last ingress rule must match all URLs (i.e. it should not have a "
                 "hostname or path filter)", e);
  // A catch-all before the end.
  e = ingressError("ingress:\n  - service: http://x:1\n  - service: http_status:404\n");
  KJ_EXPECT(contains(e, "Rule #1 is matching the hostname '', but this will match every "
                        "hostname"), e);
  // Wildcard in the middle.
  e = ingressError("ingress:\n  - hostname: a.*.example.com\n    service: http://x:1\n"
                   "  - service: http_status:404\n");
  KJ_EXPECT(contains(e, "Hostname patterns can have at most one wildcard character"), e);
  // Port in the hostname.
  e = ingressError("ingress:\n  - hostname: a.example.com:8080\n    service: http://x:1\n"
                   "  - service: http_status:404\n");
  KJ_EXPECT(contains(e, "Hostname cannot contain a port"), e);
  // Bad regex.
  e = ingressError("ingress:\n  - hostname: a.example.com\n    path: \"^/(unclosed\"\n"
                   "    service: http://x:1\n  - service: http_status:404\n");
  KJ_EXPECT(e.startsWith("line 2: Rule #1 has an invalid regex: "), e);
  // Unknown service.
  e = ingressError("ingress:\n  - service: localhost:8080\n");
  KJ_EXPECT(contains(e, "localhost:8080 is an invalid address, please make sure it has a scheme "
                        "and a hostname"), e);
  e = ingressError("ingress:\n  - service: http://localhost:8080/app\n");
  KJ_EXPECT(contains(e, "ingress rules don't support proxying to a different path"), e);
  e = ingressError("ingress:\n  - service: ssh://localhost:22\n");
  KJ_EXPECT(contains(e, "not supported by cfqt"), e);
  e = ingressError("ingress:\n  - service: http_status:abc\n");
  KJ_EXPECT(contains(e, "http_status"), e);
}

KJ_TEST("unix+tls: services take originServerName and caPool like https services") {
  auto config = parsed(R"(originRequest:
  caPool: /etc/ssl/origin-ca.pem
ingress:
  - hostname: secure.example.com
    service: unix+tls:/run/secure.sock
    originRequest:
      originServerName: origin.internal
  - hostname: other.example.com
    service: unix+tls:/run/other.sock
  - service: http_status:404
)");
  KJ_EXPECT(validateIngress(config.ingress) == nullptr);
  auto built = Ingress::build(config.ingress, config.originRequest, origin::OriginConfig());
  KJ_IF_MAYBE(e, built.tryGet<kj::String>()) KJ_FAIL_ASSERT(*e);
  auto& ingress = *built.get<kj::Own<Ingress>>();
  auto rules = ingress.rules();
  KJ_EXPECT(rules[0].origin.kind == origin::OriginKind::UNIX_TLS);
  KJ_EXPECT(rules[0].origin.unixPath == "/run/secure.sock");
  KJ_EXPECT(KJ_ASSERT_NONNULL(rules[0].origin.originServerName) == "origin.internal");
  KJ_EXPECT(KJ_ASSERT_NONNULL(rules[0].origin.caPool) == "/etc/ssl/origin-ca.pem");
  KJ_EXPECT(rules[0].origin.toString() == "unix+tls:/run/secure.sock");
  // Without originServerName the request's host is the TLS name (decided per request).
  KJ_EXPECT(rules[1].origin.kind == origin::OriginKind::UNIX_TLS);
  KJ_EXPECT(rules[1].origin.originServerName == nullptr);
  KJ_EXPECT(KJ_ASSERT_NONNULL(rules[1].origin.caPool) == "/etc/ssl/origin-ca.pem");
  KJ_EXPECT(ingress.describe(0) ==
            "\thostname: secure.example.com\n\tservice: unix+tls:/run/secure.sock\n");

  auto e = ingressError("ingress:\n  - service: \"unix+tls:\"\n");
  KJ_EXPECT(e == "line 2: unix+tls: origin needs a socket path (unix+tls:/path/to.sock)", e);
  e = ingressError("ingress:\n  - service: tcp://localhost:22\n");
  KJ_EXPECT(contains(e, "unix+tls:"), e);
}

KJ_TEST("originRequest keys cfqt does not apply are listed with their line") {
  auto config = parsed(R"(originRequest:
  connectTimeout: 5s
  http2Origin: true
ingress:
  - hostname: a.example.com
    service: https://localhost:8443
    originRequest:
      matchSNItoHost: true
      noHappyEyeballs: true
      caPool: /tmp/ca.pem
  - service: http_status:404
    originRequest:
      proxyAddress: 127.0.0.1
)");
  KJ_ASSERT(config.ignored.size() == 4, config.ignored.size());
  KJ_EXPECT(config.ignored[0].key == "http2Origin" && config.ignored[0].line == 3);
  KJ_EXPECT(config.ignored[1].key == "matchSNItoHost" && config.ignored[1].line == 8);
  KJ_EXPECT(config.ignored[2].key == "noHappyEyeballs" && config.ignored[2].line == 9);
  KJ_EXPECT(config.ignored[3].key == "proxyAddress" && config.ignored[3].line == 13);
  // The applied ones are not listed, and unknown keys elsewhere are not originRequest keys.
  KJ_EXPECT(parsed("originRequest: {connectTimeout: 1s, caPool: x, noTLSVerify: false}\n"
                   "foo: bar\n").ignored.size() == 0);
  // The remote (JSON) configuration too.
  auto remote = parsed(R"({"ingress":[{"service":"http_status:503"}],)"
                       R"("originRequest":{"bastionMode":false,"access":{"required":false}}})");
  KJ_ASSERT(remote.ignored.size() == 2);
  KJ_EXPECT(remote.ignored[0].key == "bastionMode" && remote.ignored[1].key == "access");
}

KJ_TEST("requestPath takes the path of a dest") {
  KJ_EXPECT(requestPath("https://a.example/x/y?q=1") == "/x/y");
  KJ_EXPECT(requestPath("https://a.example") == "/");
  KJ_EXPECT(requestPath("/p?x") == "/p");
  KJ_EXPECT(requestPath("") == "/");
}

}  // namespace
}  // namespace cfqt::named
