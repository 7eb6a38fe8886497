#include "random.h"

#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>

#include <kj/debug.h>
#include <kj/encoding.h>

namespace cfqt::emulator {

namespace {

// Short, unambiguous words in the spirit of trycloudflare's hostnames.
constexpr kj::StringPtr WORDS[] = {
  "amber"_kj, "anchor"_kj, "apple"_kj, "arrow"_kj, "aspen"_kj, "autumn"_kj, "basin"_kj,
  "beacon"_kj, "birch"_kj, "bloom"_kj, "breeze"_kj, "brook"_kj, "cabin"_kj, "canyon"_kj,
  "cedar"_kj, "cider"_kj, "cliff"_kj, "clover"_kj, "comet"_kj, "coral"_kj, "crane"_kj,
  "creek"_kj, "dawn"_kj, "delta"_kj, "dune"_kj, "eagle"_kj, "echo"_kj, "ember"_kj, "fern"_kj,
  "field"_kj, "finch"_kj, "fjord"_kj, "flint"_kj, "forest"_kj, "fox"_kj, "frost"_kj,
  "garden"_kj, "glacier"_kj, "glade"_kj, "granite"_kj, "grove"_kj, "harbor"_kj, "hazel"_kj,
  "heron"_kj, "hill"_kj, "island"_kj, "ivory"_kj, "jade"_kj, "juniper"_kj, "lagoon"_kj,
  "lake"_kj, "lantern"_kj, "laurel"_kj, "linen"_kj, "lotus"_kj, "maple"_kj, "marble"_kj,
  "meadow"_kj, "mesa"_kj, "mist"_kj, "moss"_kj, "north"_kj, "oak"_kj, "ocean"_kj, "olive"_kj,
  "orchid"_kj, "otter"_kj, "pebble"_kj, "pine"_kj, "planet"_kj, "prairie"_kj, "quartz"_kj,
  "quiet"_kj, "rain"_kj, "raven"_kj, "reef"_kj, "ridge"_kj, "river"_kj, "robin"_kj, "sage"_kj,
  "shore"_kj, "silver"_kj, "sky"_kj, "slate"_kj, "snow"_kj, "solar"_kj, "spring"_kj,
  "spruce"_kj, "stone"_kj, "summit"_kj, "swift"_kj, "thunder"_kj, "tide"_kj, "timber"_kj,
  "valley"_kj, "velvet"_kj, "willow"_kj, "winter"_kj, "wren"_kj, "zephyr"_kj,
};

int hexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

char lowerChar(char c) {
  return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c;
}

}  // namespace

kj::Array<kj::byte> randomBytes(size_t count) {
  auto result = kj::heapArray<kj::byte>(count);
  if (count > 0) {
    int rc = gnutls_rnd(GNUTLS_RND_RANDOM, result.begin(), result.size());
    KJ_ASSERT(rc == 0, "gnutls_rnd failed", gnutls_strerror(rc));
  }
  return result;
}

kj::Array<kj::byte> randomUuidBytes() {
  auto bytes = randomBytes(16);
  bytes[6] = static_cast<kj::byte>((bytes[6] & 0x0f) | 0x40);
  bytes[8] = static_cast<kj::byte>((bytes[8] & 0x3f) | 0x80);
  return bytes;
}

kj::String formatUuid(kj::ArrayPtr<const kj::byte> bytes) {
  KJ_REQUIRE(bytes.size() == 16, bytes.size());
  auto hex = kj::encodeHex(bytes);
  return kj::str(hex.slice(0, 8), '-', hex.slice(8, 12), '-', hex.slice(12, 16), '-',
                 hex.slice(16, 20), '-', hex.slice(20, 32));
}

kj::Maybe<kj::Array<kj::byte>> parseUuid(kj::StringPtr text) {
  if (text.size() != 36) return nullptr;
  auto result = kj::heapArray<kj::byte>(16);
  size_t out = 0;
  for (size_t i = 0; i < 36;) {
    if (i == 8 || i == 13 || i == 18 || i == 23) {
      if (text[i] != '-') return nullptr;
      i++;
      continue;
    }
    int hi = hexValue(text[i]);
    int lo = hexValue(text[i + 1]);
    if (hi < 0 || lo < 0) return nullptr;
    result[out++] = static_cast<kj::byte>(hi * 16 + lo);
    i += 2;
  }
  return kj::mv(result);
}

kj::String randomHex(size_t byteCount) {
  return kj::encodeHex(randomBytes(byteCount));
}

kj::String randomHostname(kj::StringPtr zone) {
  constexpr size_t WORD_COUNT = sizeof(WORDS) / sizeof(WORDS[0]);
  auto pick = randomBytes(4);
  return kj::str(WORDS[pick[0] % WORD_COUNT], '-', WORDS[pick[1] % WORD_COUNT], '-',
                 WORDS[pick[2] % WORD_COUNT], '-', WORDS[pick[3] % WORD_COUNT], '.', zone);
}

bool equalsIgnoreCase(kj::StringPtr a, kj::StringPtr b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); i++) {
    if (lowerChar(a[i]) != lowerChar(b[i])) return false;
  }
  return true;
}

kj::String toLower(kj::StringPtr text) {
  auto result = kj::heapString(text);
  for (char& c: result) c = lowerChar(c);
  return result;
}

}  // namespace cfqt::emulator
