// Robustness of the edge layer's decoders of untrusted bytes (the quick-tunnel API body, its JSON,
// UUID and base64 fields, the DNS-over-TLS answer parser): deterministic mutation tests. Every case
// must give a valid decode or a typed error -- never an assertion, a crash or a sanitizer report.

#include "edge/dns.h"
#include "edge/json.h"
#include "edge/quick-tunnel-api.h"
#include "wire/fuzz-mutator.h"

#include <kj/encoding.h>
#include <kj/test.h>

namespace cfqt::edge {
namespace {

using fuzz::Rng;

kj::ArrayPtr<const kj::byte> bytesOf(kj::StringPtr text) { return text.asBytes(); }

// Seeds: what the API answers (and what it might answer).
constexpr kj::StringPtr JSON_SEEDS[] = {
    R"({"success":true,"result":{"id":"3f1c0a2e-1b2c-4d3e-8f90-a1b2c3d4e5f6","name":"qt",)"
    R"("hostname":"happy-words-here.trycloudflare.com","account_tag":)"
    R"("0123456789abcdef0123456789abcdef","secret":"aGVsbG8gd29ybGQ="},"errors":[],)"
    R"("messages":[]})"_kj,
    R"({"success":false,"result":null,"errors":[{"code":1001,"message":"tunnel quota exceeded"},)"
    R"({"code":7003,"message":"could not route"}],"messages":[]})"_kj,
    R"({"SUCCESS":true,"Result":{"id":"urn:uuid:3F1C0A2E-1B2C-4D3E-8F90-A1B2C3D4E5F6",)"
    R"("hostname":"a-b-c.trycloudflare.com","account_tag":"acct","secret":"aGVsbG8=",)"
    R"("extra":[1,-2.5e3,{"x":null}]},"Errors":[],"whatever":{"deep":[true,false]}})"_kj,
    R"( {"a":"x\u00e9\ud83d\ude00\n\"\\\/\b\f\r\t","b":[1,-2.5e3,true,false,null],"A":{}} )"_kj,
    R"({"result":{"id":"{3f1c0a2e-1b2c-4d3e-8f90-a1b2c3d4e5f6}","hostname":"h",)"
    R"("secret":"c2VjcmV0LXRleHQ="}})"_kj,
};

void checkDecode(uint status, kj::Maybe<kj::StringPtr> contentType,
                 kj::ArrayPtr<const kj::byte> body) {
  KJ_SWITCH_ONEOF(decodeQuickTunnelResponse(status, contentType, body)) {
    KJ_CASE_ONEOF(tunnel, QuickTunnel) {
      KJ_EXPECT(tunnel.tunnelId.size() == 16);
      KJ_EXPECT(tunnel.id.size() == 36);
      KJ_EXPECT(tunnel.secret.size() > 0);
      KJ_EXPECT(tunnel.hostname.size() > 0);
    }
    KJ_CASE_ONEOF(error, QuickTunnelError) {
      // The message a user sees: bounded (the excerpt is cut), and classifiable again.
      KJ_EXPECT(error.message.size() < 2048, error.message.size());
      auto e = makeQuickTunnelException(kj::mv(error));
      KJ_EXPECT(quickTunnelErrorKind(e) != nullptr, e.getDescription());
    }
  }
}

KJ_TEST("fuzz: parseJson and decodeQuickTunnelResponse on mutated API bodies") {
  Rng rng(0xED6E0001);
  size_t decoded = 0, parsed = 0;
  static constexpr uint STATUSES[] = {200, 200, 200, 201, 400, 404, 429, 500, 503};
  static constexpr kj::StringPtr TYPES[] = {"application/json"_kj, "text/html"_kj,
                                            "text/html; charset=utf-8"_kj, ""_kj};
  for (auto seed: JSON_SEEDS) {
    KJ_CONTEXT(seed);
    KJ_EXPECT(parseJson(bytesOf(seed)) != nullptr);
    // Every truncation: never a valid document except the whole one (and never a crash).
    for (size_t len = 0; len < seed.size(); len++) {
      auto prefix = bytesOf(seed).slice(0, len);
      parseJson(prefix);
      checkDecode(200, "application/json"_kj, prefix);
    }
    for (size_t i = 0; i < 3000; i++) {
      KJ_CONTEXT(i);
      auto body = fuzz::mutate(rng, bytesOf(seed), bytesOf(seed).size());
      if (parseJson(body, 1 + rng.below(40)) != nullptr) parsed++;
      kj::Maybe<kj::StringPtr> type;
      if (!rng.chance(4)) type = TYPES[rng.below(4)];
      uint status = STATUSES[rng.below(sizeof(STATUSES) / sizeof(STATUSES[0]))];
      auto result = decodeQuickTunnelResponse(status, type, body);
      if (result.is<QuickTunnel>()) decoded++;
      checkDecode(status, type, body);
    }
  }
  KJ_EXPECT(parsed > 1000, parsed);
  KJ_EXPECT(decoded > 100, decoded);
}

KJ_TEST("fuzz: parseJson on random and adversarial text") {
  Rng rng(0xED6E0002);
  static constexpr kj::StringPtr TOKENS[] = {
      "{"_kj, "}"_kj, "["_kj, "]"_kj, ","_kj, ":"_kj, "\""_kj, "\\"_kj, "\\u"_kj, "\\ud800"_kj,
      "\\udc00"_kj, "\\u0000"_kj, "d83d"_kj, "0"_kj, "-"_kj, "1e999"_kj, "-1e-999"_kj,
      "."_kj, "e"_kj, "true"_kj, "fals"_kj, "null"_kj, " "_kj, "\n"_kj, "\x01"_kj, "\xff"_kj};
  for (size_t i = 0; i < 6000; i++) {
    KJ_CONTEXT(i);
    kj::Vector<kj::byte> text;
    size_t count = rng.below(24);
    for (size_t j = 0; j < count; j++) {
      if (rng.chance(5)) {
        text.add(rng.byte());
      } else {
        text.addAll(TOKENS[rng.below(sizeof(TOKENS) / sizeof(TOKENS[0]))].asBytes());
      }
    }
    parseJson(text, uint(rng.below(8)));
    checkDecode(200, nullptr, text);
  }
  // Nesting far beyond the limit is refused without deep recursion.
  for (auto open: {"["_kj, "{\"a\":"_kj}) {
    kj::Vector<kj::byte> deep;
    for (size_t i = 0; i < 100000; i++) deep.addAll(open.asBytes());
    KJ_EXPECT(parseJson(deep) == nullptr);
    checkDecode(200, nullptr, deep);
  }
  kj::Vector<kj::byte> ok;
  for (size_t i = 0; i < 32; i++) ok.add('[');
  for (size_t i = 0; i < 32; i++) ok.add(']');
  KJ_EXPECT(parseJson(ok) != nullptr);
}

KJ_TEST("fuzz: API error codes that are not integers are reported sanely") {
  // errors[].code is an int in Go: huge, fractional and infinite numbers must not be cast
  // (undefined behaviour) into garbage such as -9223372036854775808.
  for (auto code: {"1e400"_kj, "-1e400"_kj, "1e19"_kj, "-9.3e18"_kj, "1.5"_kj, "1e-400"_kj}) {
    KJ_CONTEXT(code);
    auto body = kj::str(R"({"success":false,"errors":[{"code":)", code,
                        R"(,"message":"m"}]})");
    auto result = decodeQuickTunnelResponse(400, "application/json"_kj, body.asBytes());
    KJ_ASSERT(result.is<QuickTunnelError>());
    auto& error = result.get<QuickTunnelError>();
    KJ_EXPECT(error.kind == QuickTunnelErrorKind::API_ERROR);
    KJ_EXPECT(strstr(error.message.cStr(), "9223372036854775808") == nullptr, error.message);
    KJ_EXPECT(strstr(error.message.cStr(), "9223372036854775807") == nullptr, error.message);
  }
  auto body = R"({"success":false,"errors":[{"code":1001,"message":"m"}]})"_kj;
  auto result = decodeQuickTunnelResponse(400, "application/json"_kj, body.asBytes());
  KJ_ASSERT(result.is<QuickTunnelError>());
  KJ_EXPECT(strstr(result.get<QuickTunnelError>().message.cStr(), "error 1001: m") != nullptr,
            result.get<QuickTunnelError>().message);
}

KJ_TEST("fuzz: parseUuid and decodeStdBase64Padded on mutated text") {
  Rng rng(0xED6E0003);
  constexpr kj::StringPtr UUIDS[] = {"3f1c0a2e-1b2c-4d3e-8f90-a1b2c3d4e5f6"_kj,
                                     "urn:uuid:3f1c0a2e-1b2c-4d3e-8f90-a1b2c3d4e5f6"_kj,
                                     "{3f1c0a2e-1b2c-4d3e-8f90-a1b2c3d4e5f6}"_kj,
                                     "3f1c0a2e1b2c4d3e8f90a1b2c3d4e5f6"_kj};
  for (size_t i = 0; i < 4000; i++) {
    KJ_CONTEXT(i);
    auto text = fuzz::mutate(rng, UUIDS[rng.below(4)].asBytes(), 1000);
    auto copy = kj::heapString(text.asChars());
    KJ_IF_MAYBE(bytes, parseUuid(copy)) {
      KJ_ASSERT(bytes->size() == 16);
      // The canonical form parses back to the same bytes.
      auto canonical = formatUuid(*bytes);
      KJ_EXPECT(KJ_ASSERT_NONNULL(parseUuid(canonical)) == *bytes);
    }
  }
  for (size_t i = 0; i < 4000; i++) {
    KJ_CONTEXT(i);
    auto raw = fuzz::randomBytes(rng, 24);
    auto encoded = kj::encodeBase64(raw);
    auto text = rng.chance(4) ? kj::heapArray(encoded.asBytes())
                              : fuzz::mutate(rng, encoded.asBytes(), 1000);
    auto copy = kj::heapString(text.asChars());
    KJ_IF_MAYBE(bytes, decodeStdBase64Padded(copy)) {
      // Whatever decodes has the length its padded text implies.
      size_t clean = 0, pad = 0;
      for (char c: copy) {
        if (c != '\r' && c != '\n') clean++;
        if (c == '=') pad++;
      }
      KJ_EXPECT(bytes->size() == clean / 4 * 3 - pad, copy);
    } else {
      KJ_EXPECT(copy != encoded, copy);  // a valid encoding always decodes
    }
    if (copy == encoded) {
      KJ_EXPECT(KJ_ASSERT_NONNULL(decodeStdBase64Padded(copy)) == raw);
    }
  }
}

KJ_TEST("fuzz: parseDotServer on mutated text") {
  Rng rng(0xED6E0004);
  constexpr kj::StringPtr SEEDS[] = {"1.1.1.1:853#cloudflare-dns.com"_kj, "[2606:4700::1111]:853"_kj,
                                     "127.0.0.1:8853"_kj};
  for (size_t i = 0; i < 3000; i++) {
    KJ_CONTEXT(i);
    auto text = fuzz::mutate(rng, SEEDS[rng.below(3)].asBytes(), 1000);
    auto copy = kj::heapString(text.asChars());
    KJ_IF_MAYBE(server, parseDotServer(copy)) {
      KJ_EXPECT(server->tlsName.size() > 0);
    }
  }
}

// A DNS response to the SRV query 0x1234 for _v2-origintunneld._tcp.argotunnel.com: two answers,
// the second target compressed against the first.
kj::Array<kj::byte> srvResponse() {
  kj::Vector<kj::byte> m;
  auto u16 = [&](uint v) { m.add(kj::byte(v >> 8)); m.add(kj::byte(v)); };
  auto name = [&](kj::ArrayPtr<const kj::StringPtr> labels) {
    for (auto label: labels) {
      m.add(kj::byte(label.size()));
      m.addAll(label.asBytes());
    }
    m.add(0);
  };
  u16(0x1234); u16(0x8180); u16(1); u16(2); u16(0); u16(0);
  kj::StringPtr question[] = {"_v2-origintunneld"_kj, "_tcp"_kj, "argotunnel"_kj, "com"_kj};
  name(question);
  u16(33); u16(1);
  // answer 1: name -> question (offset 12), target region1.v2.argotunnel.com
  u16(0xc00c); u16(33); u16(1); u16(0); u16(300);
  size_t rdlengthAt = m.size();
  u16(0);
  size_t rdataStart = m.size();
  u16(1); u16(1); u16(7844);
  size_t targetAt = m.size();
  kj::StringPtr target[] = {"region1"_kj, "v2"_kj, "argotunnel"_kj, "com"_kj};
  name(target);
  size_t rdlength = m.size() - rdataStart;
  m[rdlengthAt] = kj::byte(rdlength >> 8);
  m[rdlengthAt + 1] = kj::byte(rdlength);
  // answer 2: target region2 + pointer to "v2.argotunnel.com"
  u16(0xc00c); u16(33); u16(1); u16(0); u16(300);
  u16(6 + 1 + 7 + 2);
  u16(2); u16(1); u16(7844);
  m.add(7);
  m.addAll("region2"_kj.asBytes());
  u16(0xc000 | (targetAt + 8));
  return m.releaseAsArray();
}

KJ_TEST("fuzz: decodeSrvResponse (DNS-over-TLS answers) on mutated responses") {
  auto seed = srvResponse();
  auto first = decodeSrvResponse(seed, 0x1234);
  KJ_ASSERT(first.error == "", first.error);
  auto& records = first.records;
  KJ_ASSERT(records.size() == 2);
  KJ_EXPECT(records[0].target == "region1.v2.argotunnel.com", records[0].target);
  KJ_EXPECT(records[1].target == "region2.v2.argotunnel.com", records[1].target);
  KJ_EXPECT(records[0].port == 7844 && records[1].priority == 2);
  KJ_EXPECT(decodeSrvResponse(seed, 0x1235).error == "answer for another query id");
  for (size_t len = 0; len < seed.size(); len++) {
    auto answer = decodeSrvResponse(seed.slice(0, len), 0x1234);
    KJ_EXPECT(answer.error.size() > 0 && answer.records.size() == 0, len);
  }
  Rng rng(0xED6E0005);
  size_t decoded = 0;
  for (size_t i = 0; i < 6000; i++) {
    KJ_CONTEXT(i);
    auto input = fuzz::mutate(rng, seed, 12);
    // Keep the header valid most of the time so the answers get parsed.
    if (input.size() >= 4 && !rng.chance(4)) {
      input[0] = 0x12; input[1] = 0x34; input[2] |= 0x80; input[3] &= 0xf0;
    }
    auto answer = decodeSrvResponse(input, 0x1234);
    if (answer.error.size() == 0) {
      decoded++;
      KJ_EXPECT(answer.records.size() > 0);
      for (auto& r: answer.records) KJ_EXPECT(!r.target.endsWith("."), r.target);
    } else {
      KJ_EXPECT(answer.records.size() == 0);
    }
  }
  KJ_EXPECT(decoded > 100, decoded);
}

// A DNS response to the A (or AAAA) query 0x4242 for a quick tunnel's hostname, as public
// resolvers answer it: a CNAME to another name in the zone, then two addresses of that name.
kj::Array<kj::byte> addressResponse(bool ipv6) {
  kj::Vector<kj::byte> m;
  auto u16 = [&](uint v) { m.add(kj::byte(v >> 8)); m.add(kj::byte(v)); };
  auto label = [&](kj::StringPtr l) { m.add(kj::byte(l.size())); m.addAll(l.asBytes()); };
  uint type = ipv6 ? 28 : 1;
  u16(0x4242); u16(0x8180); u16(1); u16(3); u16(0); u16(0);
  label("happy-words-here"); label("trycloudflare"); label("com"); m.add(0);
  u16(type); u16(1);
  // CNAME happy-words-here.trycloudflare.com -> edge.trycloudflare.com
  u16(0xc00c); u16(5); u16(1); u16(0); u16(300);
  u16(5 + 2);
  size_t targetAt = m.size();
  label("edge"); u16(0xc000 | (12 + 17));   // pointer to "trycloudflare.com"
  for (uint i = 0; i < 2; i++) {
    u16(0xc000 | targetAt); u16(type); u16(1); u16(0); u16(300);
    if (ipv6) {
      u16(16);
      kj::byte a[16] = {0x26, 0x06, 0x47, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0x68, 0x10, 0xe6, 0x84};
      a[15] = kj::byte(0x84 + i);
      m.addAll(kj::arrayPtr(a, 16));
    } else {
      u16(4);
      kj::byte a[4] = {104, 16, kj::byte(230 + i), 132};
      m.addAll(kj::arrayPtr(a, 4));
    }
  }
  return m.releaseAsArray();
}

KJ_TEST("decodeAddressResponse: A and AAAA answers, NXDOMAIN, NODATA") {
  auto v4 = decodeAddressResponse(addressResponse(false), 0x4242, false);
  KJ_ASSERT(v4.error == "", v4.error);
  KJ_ASSERT(v4.addresses.size() == 2);
  KJ_EXPECT(v4.addresses[0] == "104.16.230.132" && v4.addresses[1] == "104.16.231.132");
  auto v6 = decodeAddressResponse(addressResponse(true), 0x4242, true);
  KJ_ASSERT(v6.error == "", v6.error);
  KJ_ASSERT(v6.addresses.size() == 2);
  KJ_EXPECT(v6.addresses[0] == "2606:4700::6810:e684", v6.addresses[0]);
  // An AAAA parser given A records finds none of its type: NODATA, "not yet".
  auto wrongType = decodeAddressResponse(addressResponse(false), 0x4242, true);
  KJ_EXPECT(wrongType.notFound && wrongType.addresses.size() == 0, wrongType.error);
  auto nx = addressResponse(false);
  nx[3] = (nx[3] & 0xf0) | 3;
  auto nxAnswer = decodeAddressResponse(nx, 0x4242, false);
  KJ_EXPECT(nxAnswer.notFound && nxAnswer.error == "domain name not found (NXDOMAIN)");
  KJ_EXPECT(nxAnswer.nxdomain && !wrongType.nxdomain);
  auto servfail = addressResponse(false);
  servfail[3] = (servfail[3] & 0xf0) | 2;
  auto sf = decodeAddressResponse(servfail, 0x4242, false);
  KJ_EXPECT(!sf.notFound && sf.error.size() > 0);
  auto truncated = addressResponse(false);
  truncated[2] |= 0x02;
  KJ_EXPECT(decodeAddressResponse(truncated, 0x4242, false).error == "truncated answer (TC)");
  KJ_EXPECT(decodeAddressResponse(addressResponse(false), 0x4243, false).error ==
            "answer for another query id");
}

KJ_TEST("fuzz: decodeAddressResponse (A/AAAA over DNS-over-TLS) on mutated responses") {
  for (bool ipv6: {false, true}) {
    auto seed = addressResponse(ipv6);
    for (size_t len = 0; len < seed.size(); len++) {
      auto answer = decodeAddressResponse(seed.slice(0, len), 0x4242, ipv6);
      KJ_EXPECT(answer.error.size() > 0 && answer.addresses.size() == 0, len);
    }
    Rng rng(ipv6 ? 0xED6E0007 : 0xED6E0006);
    size_t decoded = 0;
    for (size_t i = 0; i < 6000; i++) {
      KJ_CONTEXT(i, ipv6);
      auto input = fuzz::mutate(rng, seed, 12);
      // Keep the header valid most of the time so the answers get parsed.
      if (input.size() >= 4 && !rng.chance(4)) {
        input[0] = 0x42; input[1] = 0x42; input[2] = (input[2] | 0x80) & ~0x02;
        input[3] &= 0xf0;
      }
      auto answer = decodeAddressResponse(input, 0x4242, ipv6);
      if (answer.error.size() == 0) {
        decoded++;
        KJ_EXPECT(answer.addresses.size() > 0 && answer.addresses.size() <= 32);
        for (auto& a: answer.addresses) {
          KJ_EXPECT(a.size() > 0 && a.size() < 46, a);
          KJ_EXPECT((a.findFirst(':') != nullptr) == ipv6, a);
        }
      } else {
        KJ_EXPECT(answer.addresses.size() == 0);
      }
    }
    KJ_EXPECT(decoded > 100, decoded, ipv6);
  }
}

KJ_TEST("decodeSrvResponse: targets that are no host name are dropped (found by fuzz/dns_answer)") {
  // The libFuzzer crash input (fuzz/corpus/dns_answer/crash-0e7ac1cf...): the first answer's
  // target has a label of raw bytes ending in '.', which c-ares hands out escaped; it was
  // returned as a target ending with '.' (and holding backslash escapes).
  auto crash = kj::decodeBase64(
      "EjSBgAABAAIDY29tAAAhAAHADAAhAAEAAAEsACEAAQABHqQHcmVnaW9uMQJ2Mgphk/V94zR/AAAuAQAAAADADAAhAAEA"
      "AAEsABAAAgABHqQHcmVnaW9uNMAj");
  auto answer = decodeSrvResponse(crash, 0x1234);
  KJ_EXPECT(answer.records.size() == 0);   // the second target is garbage too
  KJ_EXPECT(answer.error.startsWith("malformed answer"), answer.error);

  // A "." target (RFC 2782: no service at this name) next to good ones is dropped alone.
  auto seed = srvResponse();
  kj::Vector<kj::byte> mixed;
  mixed.addAll(seed);
  mixed[7] = 3;                                              // ANCOUNT 3
  kj::byte dot[] = {0xc0, 0x0c, 0, 33, 0, 1, 0, 0, 1, 44, 0, 7,
                    0, 1, 0, 1, 0x1e, 0xa4, 0};              // prio 1, weight 1, 7844, "."
  mixed.addAll(kj::arrayPtr(dot, sizeof(dot)));
  auto two = decodeSrvResponse(mixed, 0x1234);
  KJ_EXPECT(two.error == "", two.error);
  KJ_EXPECT(two.records.size() == 2, two.records.size());

  // Only unusable targets: a malformed answer, not records.
  kj::Vector<kj::byte> dotTarget;
  dotTarget.addAll(seed.slice(0, 12));
  dotTarget[7] = 1;                                          // ANCOUNT 1
  kj::byte question[] = {3, 'c', 'o', 'm', 0, 0, 33, 0, 1};  // com. SRV IN
  dotTarget.addAll(kj::arrayPtr(question, sizeof(question)));
  dotTarget.addAll(kj::arrayPtr(dot, sizeof(dot)));
  auto none = decodeSrvResponse(dotTarget, 0x1234);
  KJ_EXPECT(none.records.size() == 0);
  KJ_EXPECT(none.error.startsWith("malformed answer"), none.error);
}

}  // namespace
}  // namespace cfqt::edge
