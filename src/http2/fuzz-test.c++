// Robustness of the HTTP/2 header codec against untrusted bytes: deterministic mutation tests
// (wire/fuzz-mutator.h, fixed seeds and counts). deserializeHeaders() is fed every truncation and
// thousands of mutations of valid serialized values, and random text; each outcome must be a
// header list or a BAD_HEADER error, never an assertion, a crash or a sanitizer report, and must
// agree with a slow reference decoder written independently below from header.go's rules. The
// header-list builders are fed random header lists and checked against their documented output.

#include "http2/header.h"

#include "wire/fuzz-mutator.h"

#include <kj/test.h>

namespace cfqt::http2 {
namespace {

using fuzz::Rng;

// ---------------------------------------------------------------------------------------------
// Reference decoder: header.go DeserializeHeaders + Go's non-strict RawStdEncoding, written for
// clarity (bit accumulator, explicit splits), not speed.

int base64Value(char c) {
  if ('A' <= c && c <= 'Z') return c - 'A';
  if ('a' <= c && c <= 'z') return c - 'a' + 26;
  if ('0' <= c && c <= '9') return c - '0' + 52;
  if (c == '+') return 62;
  if (c == '/') return 63;
  return -1;
}

kj::Maybe<kj::String> referenceDecode(kj::ArrayPtr<const char> text) {
  kj::Vector<int> sextets;
  for (char c: text) {
    if (c == '\r' || c == '\n') continue;
    int v = base64Value(c);
    if (v < 0) return nullptr;
    sextets.add(v);
  }
  if (sextets.size() % 4 == 1) return nullptr;
  kj::Vector<char> out;
  uint32_t bits = 0;
  int count = 0;
  for (int v: sextets) {
    bits = (bits << 6) | uint32_t(v);
    count += 6;
    if (count >= 8) {
      count -= 8;
      out.add(char(bits >> count));
      bits &= (1u << count) - 1;
    }
  }
  while (out.size() < text.size() * 6 / 8) out.add('\0');  // Go keeps DecodedLen bytes
  return kj::heapString(out.asPtr());
}

kj::Maybe<kj::Array<wire::Header>> referenceDeserialize(kj::ArrayPtr<const char> text) {
  kj::Vector<kj::ArrayPtr<const char>> pairs;
  size_t start = 0;
  for (size_t i = 0; i < text.size(); i++) {
    if (text[i] == ';') {
      pairs.add(text.slice(start, i));
      start = i + 1;
    }
  }
  pairs.add(text.slice(start, text.size()));
  kj::Vector<wire::Header> result;
  for (auto pair: pairs) {
    if (pair.size() == 0) continue;
    kj::Vector<kj::ArrayPtr<const char>> parts;
    size_t from = 0;
    for (size_t i = 0; i < pair.size(); i++) {
      if (pair[i] == ':') {
        parts.add(pair.slice(from, i));
        from = i + 1;
      }
    }
    parts.add(pair.slice(from, pair.size()));
    if (parts.size() != 2) return nullptr;
    KJ_IF_MAYBE(name, referenceDecode(parts[0])) {
      KJ_IF_MAYBE(value, referenceDecode(parts[1])) {
        result.add(wire::Header{kj::mv(*name), kj::mv(*value)});
        continue;
      }
    }
    return nullptr;
  }
  return result.releaseAsArray();
}

bool same(kj::ArrayPtr<const wire::Header> a, kj::ArrayPtr<const wire::Header> b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); i++) {
    if (a[i].name != b[i].name || a[i].value != b[i].value) return false;
  }
  return true;
}

bool equalsLower(kj::StringPtr name, kj::StringPtr lower) {
  if (name.size() != lower.size()) return false;
  for (size_t k = 0; k < name.size(); k++) {
    char c = name[k];
    if ('A' <= c && c <= 'Z') c = char(c - 'A' + 'a');
    if (c != lower[k]) return false;
  }
  return true;
}

struct Tally {
  size_t decoded = 0;
  size_t rejected = 0;
};

void check(kj::ArrayPtr<const char> input, Tally& tally) {
  // `input` is an exactly-sized heap copy, so an over-read is a sanitizer report.
  auto expected = referenceDeserialize(input);
  KJ_SWITCH_ONEOF(deserializeHeaders(input)) {
    KJ_CASE_ONEOF(headers, kj::Array<wire::Header>) {
      tally.decoded++;
      KJ_IF_MAYBE(e, expected) {
        KJ_EXPECT(same(headers, *e), "differs from the reference decoder");
      } else {
        KJ_FAIL_EXPECT("accepted what the reference decoder rejects");
      }
      // What was decoded serializes to a value that decodes to the same headers.
      auto again = deserializeHeaders(serializeResponseHeaders(headers));
      KJ_ASSERT(again.is<kj::Array<wire::Header>>());
      KJ_EXPECT(same(again.get<kj::Array<wire::Header>>(), headers));
    }
    KJ_CASE_ONEOF(error, wire::WireError) {
      tally.rejected++;
      KJ_EXPECT(expected == nullptr, "rejected what the reference decoder accepts",
                error.toString());
      KJ_EXPECT(error.code == wire::WireErrorCode::BAD_HEADER, error.toString());
      KJ_EXPECT(error.message.startsWith("Unable to deserialize headers: "), error.message);
      KJ_EXPECT(wire::wireErrorCode(error.toException()) == wire::WireErrorCode::BAD_HEADER);
    }
  }
}

void checkBytes(kj::ArrayPtr<const kj::byte> bytes, Tally& tally) {
  auto copy = kj::heapArray<char>(bytes.asChars());
  check(copy, tally);
}

kj::Array<wire::Header> randomHeaders(Rng& rng, size_t maxHeaders) {
  // Names from a small pool (so repeats and control prefixes occur), values of random bytes.
  static constexpr kj::StringPtr NAMES[] = {
      "Content-Type"_kj, "Content-Length"_kj, "Set-Cookie"_kj, "Cf-Int-Cloudflared-Tracing"_kj,
      "Cf-Cloudflared-Response-Meta"_kj, "cf-int-x"_kj, "Cf-Proxy-Y"_kj, "Connection"_kj,
      "Upgrade"_kj, "Sec-Websocket-Accept"_kj, ":status"_kj, "Transfer-Encoding"_kj,
      "Cf-Cloudflared-Proxy-Connection-Upgrade"_kj, "Cf-Cloudflared-Proxy-Src"_kj,
      "Cookie"_kj, "Expect"_kj, "Trailer"_kj, "Cf-Trace-Id"_kj, ":authority"_kj, "Host"_kj,
  };
  static constexpr kj::StringPtr VALUES[] = {
      ""_kj, "0"_kj, "123"_kj, "-1"_kj, "websocket"_kj, "control-stream"_kj,
      "update-configuration"_kj, "100-continue"_kj, "text/event-stream"_kj, "chunked"_kj,
      "9223372036854775808"_kj,
  };
  size_t count = rng.below(maxHeaders + 1);
  auto builder = kj::heapArrayBuilder<wire::Header>(count);
  for (size_t i = 0; i < count; i++) {
    kj::String name;
    if (rng.chance(5)) {
      name = kj::heapString(rng.below(12));
      for (auto& c: name) c = char(rng.byte());
    } else {
      name = kj::str(NAMES[rng.below(kj::size(NAMES))]);
    }
    kj::String value;
    if (rng.chance(2)) {
      value = kj::heapString(rng.below(24));
      for (auto& c: value) c = char(rng.byte());
    } else {
      value = kj::str(VALUES[rng.below(kj::size(VALUES))]);
    }
    builder.add(wire::Header{kj::mv(name), kj::mv(value)});
  }
  return builder.finish();
}

kj::Vector<kj::String> seeds(Rng& rng) {
  kj::Vector<kj::String> result;
  // header_test.go TestSerializeHeaders's value and h2mux_header_test.go's real-world one.
  result.add(kj::str(
      "TW9jay1IZWFkZXItT25l:TW9jayBoZWFkZXIgb25lIHZhbHVl;TW9jay1IZWFkZXItT25l:dGhyZWU;"
      "TW9jay1IZWFkZXItVHdvLUxvbmc:TW9jayBoZWFkZXIgdHdvIHZhbHVlCmxvbmc;Ojs:Ojs;Ojs:Ozo;"
      "Og:Og;Ow:Ow;Ozs:Ozs;RW1wdHkgdmFsdWVz:;RW1wdHkgdmFsdWVz:;:RW1wdHkga2V5;"
      "Y29udHJvbAljaGFyYWN0ZXIICg:dmFsdWUKCAk;Ows6:Ogs7"));
  result.add(kj::str(
      "eC1mb3J3YXJkZWQtcHJvdG8:aHR0cHM;dXBncmFkZS1pbnNlY3VyZS1yZXF1ZXN0cw:MQ;"
      "YWNjZXB0LWxhbmd1YWdl:ZW4tVVMsZW47cT0wLjkscnU7cT0wLjg;YWNjZXB0LWVuY29kaW5n:Z3ppcA;"
      "Y29va2ll:X19jZmR1aWQ9ZGNkOWZjOGNjNWMxMzE0NTMyYTFkMjhlZDEyOWRhOTYwMTU2OTk1MTYzNDsgX1"));
  result.add(kj::str("Zg:Zm8;Zm9v:Zm9vYg;Zm9vYmE:Zm9vYmFy;:;QR:QUI"));
  for (size_t i = 0; i < 6; i++) {
    result.add(serializeResponseHeaders(randomHeaders(rng, 8)));
  }
  return result;
}

KJ_TEST("fuzz: every truncation of valid serialized values") {
  Rng rng(0x4832'0001);
  Tally tally;
  for (auto& seed: seeds(rng)) {
    KJ_CONTEXT(seed);
    for (size_t length = 0; length <= seed.size(); length++) {
      KJ_CONTEXT(length);
      auto copy = kj::heapArray<char>(seed.asArray().slice(0, length));
      check(copy, tally);
    }
  }
  KJ_EXPECT(tally.decoded > 0 && tally.rejected > 0, tally.decoded, tally.rejected);
}

KJ_TEST("fuzz: mutations of valid serialized values") {
  Rng rng(0x4832'0002);
  Tally tally;
  auto all = seeds(rng);
  for (auto& seed: all) {
    KJ_CONTEXT(seed);
    for (size_t i = 0; i < 3000; i++) {
      KJ_CONTEXT(i);
      auto input = fuzz::mutate(rng, seed.asBytes(), seed.size());
      checkBytes(input, tally);
    }
  }
  KJ_EXPECT(tally.decoded > 1000 && tally.rejected > 1000, tally.decoded, tally.rejected);
}

KJ_TEST("fuzz: random text over the serialized alphabet") {
  // Mostly base64 characters and the separators, some CR/LF/'='/other bytes.
  static constexpr kj::StringPtr ALPHABET =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/:;:;:;\r\n="_kj;
  Rng rng(0x4832'0003);
  Tally tally;
  for (size_t i = 0; i < 20000; i++) {
    KJ_CONTEXT(i);
    auto text = kj::heapArray<char>(rng.below(48));
    for (auto& c: text) {
      c = rng.chance(40) ? char(rng.byte()) : ALPHABET[rng.below(ALPHABET.size())];
    }
    check(text, tally);
  }
  for (size_t i = 0; i < 2000; i++) {
    KJ_CONTEXT(i);
    checkBytes(fuzz::randomBytes(rng, 64), tally);
  }
  KJ_EXPECT(tally.decoded > 1000 && tally.rejected > 1000, tally.decoded, tally.rejected);
}

KJ_TEST("fuzz: header-list builders over random header lists") {
  Rng rng(0x4832'0004);
  for (size_t i = 0; i < 3000; i++) {
    KJ_CONTEXT(i);
    auto headers = randomHeaders(rng, 12);
    auto rules = rng.chance(2) ? HeaderRules::CLOUDFLARED_2023_7_3
                               : HeaderRules::CLOUDFLARED_2026_8_2;
    kj::uint status = 100 + rng.below(900);

    auto built = buildResponseHeaders(status, headers, rules);
    KJ_ASSERT(built.size() >= 3);
    KJ_EXPECT(built[0].name == ":status");
    KJ_EXPECT(built[0].value == kj::str(status == 101 ? 200 : status));
    KJ_EXPECT(built[1].name == RESPONSE_USER_HEADERS);
    KJ_EXPECT(built[2].name == RESPONSE_META_HEADER && built[2].value == RESPONSE_META_ORIGIN);
    for (auto& h: built.slice(3, built.size())) {
      KJ_EXPECT(h.name == TRACING_RESPONSE_HEADER || h.name == CONTENT_LENGTH, h.name);
    }
    // The serialized set is exactly the non-control headers, grouped by name.
    auto user = deserializeHeaders(built[1].value);
    KJ_ASSERT(user.is<kj::Array<wire::Header>>());
    size_t expectedCount = 0;
    for (auto& h: headers) {
      bool tracing = equalsLower(h.name, TRACING_RESPONSE_HEADER);
      bool serialized = !isControlResponseHeader(h.name, rules) || isWebsocketClientHeader(h.name);
      if (!tracing && serialized) {
        expectedCount++;
      }
    }
    KJ_EXPECT(user.get<kj::Array<wire::Header>>().size() == expectedCount);

    auto kind = classifyRequest(headers);
    shouldFlush(kind, headers, rules);
    requestKindName(kind);
    for (auto& h: originRequestHeaders(headers)) {
      KJ_EXPECT(!h.name.startsWith(":"), h.name);
      KJ_EXPECT(h.name != INTERNAL_UPGRADE_HEADER && h.name != TRACE_ID_HEADER &&
                h.name != "Trailer", h.name);
    }
    requestHost(headers);
  }
}

}  // namespace
}  // namespace cfqt::http2
