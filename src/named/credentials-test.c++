// Token and credentials-file parsing: valid inputs, and one clear line per mistake that never
// contains the secret.

#include "named/credentials.h"

#include <kj/debug.h>
#include <kj/encoding.h>
#include <kj/test.h>

#include <string.h>

namespace cfqt::named {
namespace {

constexpr kj::StringPtr ACCOUNT = "0123456789abcdef0123456789abcdef"_kj;
constexpr kj::StringPtr TUNNEL = "3f1c0a2e-1b2c-4d3e-8f90-a1b2c3d4e5f6"_kj;
// base64 of the 32 bytes 0x01..0x20
constexpr kj::StringPtr SECRET = "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA="_kj;

bool contains(kj::StringPtr haystack, kj::StringPtr needle) {
  return strstr(haystack.cStr(), needle.cStr()) != nullptr;
}

kj::String tokenOf(kj::StringPtr json) { return kj::encodeBase64(json.asBytes()); }

kj::String errorOf(kj::OneOf<TunnelCredentials, kj::String> result) {
  KJ_ASSERT(result.is<kj::String>(), "expected an error");
  auto text = kj::mv(result.get<kj::String>());
  KJ_EXPECT(!contains(text, SECRET), text);
  KJ_EXPECT(!contains(text, "AQIDBAUG"), text);
  KJ_EXPECT(text.findFirst('\n') == nullptr, text);
  return text;
}

void expectValid(const kj::OneOf<TunnelCredentials, kj::String>& result) {
  KJ_IF_MAYBE(e, result.tryGet<kj::String>()) KJ_FAIL_ASSERT("unexpected error", *e);
  auto& c = result.get<TunnelCredentials>();
  KJ_EXPECT(c.accountTag == ACCOUNT);
  KJ_EXPECT(c.tunnelIdText() == TUNNEL);
  KJ_ASSERT(c.tunnelSecret.size() == 32);
  KJ_EXPECT(c.tunnelSecret[0] == 1 && c.tunnelSecret[31] == 32);
}

KJ_TEST("a valid token decodes, round-trips through encodeToken, and tolerates white space") {
  auto token = tokenOf(kj::str("{\"a\":\"", ACCOUNT, "\",\"t\":\"", TUNNEL, "\",\"s\":\"",
                               SECRET, "\"}"));
  expectValid(parseToken(token));
  expectValid(parseToken(kj::str("  ", token, "\n")));
  auto parsed = parseToken(token);
  auto again = encodeToken(parsed.get<TunnelCredentials>());
  expectValid(parseToken(again));
}

KJ_TEST("token mistakes give one clear line each, never the secret") {
  auto full = tokenOf(kj::str("{\"a\":\"", ACCOUNT, "\",\"t\":\"", TUNNEL, "\",\"s\":\"",
                              SECRET, "\"}"));
  // Truncated: either the base64 or the JSON inside breaks.
  for (size_t cut: {full.size() - 1, full.size() - 4, full.size() / 2, size_t(8)}) {
    auto e = errorOf(parseToken(kj::heapString(full.slice(0, cut))));
    KJ_EXPECT(e.startsWith("Provided Tunnel token is not valid"), e);
    KJ_EXPECT(contains(e, "copy the whole token again"), e);
  }
  KJ_EXPECT(contains(errorOf(parseToken("not base64 at all!")), "not standard base64"));
  KJ_EXPECT(contains(errorOf(parseToken("")), "it is empty"));
  KJ_EXPECT(contains(errorOf(parseToken(tokenOf("[1,2]"))), "not a JSON object"));
  KJ_EXPECT(contains(errorOf(parseToken(tokenOf("hello"))), "does not decode to a JSON"));

  auto e = errorOf(parseToken(tokenOf(kj::str("{\"a\":\"", ACCOUNT, "\",\"t\":\"not-a-uuid\","
                                              "\"s\":\"", SECRET, "\"}"))));
  KJ_EXPECT(contains(e, "the tunnel ID (\"t\") is not a UUID"), e);
  e = errorOf(parseToken(tokenOf(kj::str("{\"t\":\"", TUNNEL, "\",\"s\":\"", SECRET, "\"}"))));
  KJ_EXPECT(contains(e, "the account tag (\"a\") is missing"), e);
  e = errorOf(parseToken(tokenOf(kj::str("{\"a\":\"", ACCOUNT, "\",\"s\":\"", SECRET, "\"}"))));
  KJ_EXPECT(contains(e, "the tunnel ID (\"t\") is missing"), e);
  e = errorOf(parseToken(tokenOf(kj::str("{\"a\":\"", ACCOUNT, "\",\"t\":\"", TUNNEL, "\"}"))));
  KJ_EXPECT(contains(e, "the tunnel secret (\"s\") is missing"), e);
  e = errorOf(parseToken(tokenOf(kj::str("{\"a\":\"", ACCOUNT, "\",\"t\":\"", TUNNEL,
                                         "\",\"s\":\"", SECRET.slice(0, 20), "!!\"}"))));
  KJ_EXPECT(contains(e, "the tunnel secret (\"s\") is not standard base64"), e);
  e = errorOf(parseToken(tokenOf(kj::str("{\"a\":7,\"t\":\"", TUNNEL, "\",\"s\":\"", SECRET,
                                         "\"}"))));
  KJ_EXPECT(contains(e, "the account tag (\"a\") is not a string"), e);
}

KJ_TEST("credentials file: valid (keys in any case), and its mistakes") {
  auto json = kj::str("{\"AccountTag\":\"", ACCOUNT, "\",\"TunnelSecret\":\"", SECRET,
                      "\",\"TunnelID\":\"", TUNNEL, "\",\"Endpoint\":\"\"}");
  expectValid(parseCredentialsJson(json, "creds.json"));
  expectValid(parseCredentialsJson(kj::str("{\"accounttag\":\"", ACCOUNT, "\",\"tunnelsecret\":\"",
                                           SECRET, "\",\"tunnelid\":\"", TUNNEL, "\"}"),
                                   "creds.json"));
  auto round = parseCredentialsJson(json, "x");
  expectValid(parseCredentialsJson(credentialsFileJson(round.get<TunnelCredentials>()), "y"));

  auto e = errorOf(parseCredentialsJson(kj::heapString(json.slice(0, json.size() - 10)), "'c.json'"));
  KJ_EXPECT(contains(e, "Invalid tunnel credentials in 'c.json': it is not valid JSON"), e);
  e = errorOf(parseCredentialsJson(kj::str("{\"AccountTag\":\"", ACCOUNT, "\",\"TunnelSecret\":\"",
                                           SECRET, "\",\"TunnelID\":\"1234\"}"), "f"));
  KJ_EXPECT(contains(e, "the tunnel ID (\"TunnelID\") is not a UUID"), e);
  e = errorOf(parseCredentialsJson(kj::str("{\"AccountTag\":\"", ACCOUNT, "\",\"TunnelID\":\"",
                                           TUNNEL, "\"}"), "f"));
  KJ_EXPECT(contains(e, "the tunnel secret (\"TunnelSecret\") is missing"), e);
  e = errorOf(readCredentialsFile("/nonexistent/dir/creds.json"));
  KJ_EXPECT(contains(e, "doesn't exist or is not a readable file"), e);
}

}  // namespace
}  // namespace cfqt::named
