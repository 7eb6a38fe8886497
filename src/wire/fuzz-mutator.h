#pragma once
// Deterministic, bounded input mutation for the decoder robustness tests (wire/fuzz-test.c++,
// edge/fuzz-test.c++, origin/fuzz-test.c++). No libFuzzer: a seeded PRNG and fixed iteration
// counts, so every run tests exactly the same inputs and a failure names its case number.
// Header-only, tests only.

#include <kj/array.h>
#include <kj/string.h>
#include <kj/vector.h>

#include <string.h>

namespace cfqt::fuzz {

class Rng {
  // splitmix64: tiny, fast, good enough to pick mutations; the same seed gives the same stream.
public:
  explicit Rng(uint64_t seed): state(seed) {}

  uint64_t next() {
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  size_t below(size_t n) { return n == 0 ? 0 : size_t(next() % n); }  // [0, n)
  bool chance(size_t oneIn) { return below(oneIn) == 0; }
  kj::byte byte() { return kj::byte(next()); }

private:
  uint64_t state;
};

inline uint32_t interestingSize(Rng& rng, size_t inputSize) {
  // Values that break size arithmetic: 0, small, word-count-of-input +-1, 2^n +-1, all ones.
  static constexpr uint32_t FIXED[] = {0,          1,          2,          7,         8,
                                       0x7f,       0x80,       0xff,       0x100,     0x1ff,
                                       0xffff,     0x10000,    0x100000,   0x7ffffffe, 0x7fffffff,
                                       0x80000000, 0xfffffffe, 0xffffffff};
  switch (rng.below(3)) {
    case 0: return uint32_t(inputSize / 8 + rng.below(3)) - 1;
    case 1: return uint32_t(1) << rng.below(32);
    default: return FIXED[rng.below(sizeof(FIXED) / sizeof(FIXED[0]))];
  }
}

inline void writeLe32(kj::byte* p, uint32_t v) {
  p[0] = kj::byte(v);
  p[1] = kj::byte(v >> 8);
  p[2] = kj::byte(v >> 16);
  p[3] = kj::byte(v >> 24);
}

enum class Mutation {
  BIT_FLIPS, BYTE_REPLACE, TRUNCATE, INSERT, ERASE, DUPLICATE, SIZE_FIELD, POINTER_SIZE,
  INTERESTING_BYTES,
};
constexpr size_t MUTATION_KINDS = 9;

inline kj::Array<kj::byte> mutateOnce(Rng& rng, kj::ArrayPtr<const kj::byte> input,
                                      size_t capnpOffset) {
  // One mutation of `input`. `capnpOffset`: where a capnp message (segment table first) starts,
  // so SIZE_FIELD can inflate the segment count/sizes and POINTER_SIZE the size bits of pointers
  // (word-aligned relative to it); pass input.size() when the input is not capnp.
  kj::Vector<kj::byte> out;
  out.addAll(input);
  size_t n = out.size();
  auto kind = Mutation(rng.below(MUTATION_KINDS));
  if (n == 0 && kind != Mutation::INSERT) kind = Mutation::INSERT;
  switch (kind) {
    case Mutation::BIT_FLIPS: {
      size_t flips = 1 + rng.below(4);
      for (size_t i = 0; i < flips; i++) out[rng.below(n)] ^= kj::byte(1u << rng.below(8));
      break;
    }
    case Mutation::BYTE_REPLACE: {
      size_t count = 1 + rng.below(4);
      for (size_t i = 0; i < count; i++) out[rng.below(n)] = rng.byte();
      break;
    }
    case Mutation::TRUNCATE:
      out.resize(rng.below(n));
      break;
    case Mutation::INSERT: {
      size_t at = rng.below(n + 1);
      size_t count = 1 + rng.below(16);
      kj::Vector<kj::byte> result;
      result.addAll(out.asPtr().slice(0, at));
      for (size_t i = 0; i < count; i++) result.add(rng.byte());
      result.addAll(out.asPtr().slice(at, n));
      return result.releaseAsArray();
    }
    case Mutation::ERASE: {
      size_t at = rng.below(n);
      size_t count = 1 + rng.below(kj::min(n - at, size_t(16)));
      kj::Vector<kj::byte> result;
      result.addAll(out.asPtr().slice(0, at));
      result.addAll(out.asPtr().slice(at + count, n));
      return result.releaseAsArray();
    }
    case Mutation::DUPLICATE: {
      size_t at = rng.below(n);
      size_t count = 1 + rng.below(kj::min(n - at, size_t(32)));
      kj::Vector<kj::byte> result;
      result.addAll(out.asPtr().slice(0, at + count));
      result.addAll(out.asPtr().slice(at, n));
      return result.releaseAsArray();
    }
    case Mutation::SIZE_FIELD: {
      // The segment table: [count-1][size0][size1]... (little-endian uint32s).
      if (capnpOffset + 4 > n) {
        out[rng.below(n)] = rng.byte();
        break;
      }
      size_t fields = kj::min((n - capnpOffset) / 4, size_t(4));
      size_t at = capnpOffset + 4 * rng.below(fields);
      writeLe32(out.begin() + at, interestingSize(rng, n));
      break;
    }
    case Mutation::POINTER_SIZE: {
      // The upper half of a word: list element count / struct data+pointer sizes / far-pointer
      // segment id. Also the lower half (offsets) now and then.
      if (capnpOffset + 8 > n) {
        out[rng.below(n)] = rng.byte();
        break;
      }
      size_t words = (n - capnpOffset) / 8;
      size_t at = capnpOffset + 8 * rng.below(words) + (rng.chance(4) ? 0 : 4);
      writeLe32(out.begin() + at, interestingSize(rng, n));
      break;
    }
    case Mutation::INTERESTING_BYTES: {
      static constexpr kj::byte BYTES[] = {0x00, 0x01, 0x7f, 0x80, 0xff, '\r', '\n', ':', ' ',
                                           '\t', '"',  '\\', '{',  '[',  ',',  '0',  '-', ';'};
      size_t count = 1 + rng.below(3);
      for (size_t i = 0; i < count; i++) {
        out[rng.below(n)] = BYTES[rng.below(sizeof(BYTES))];
      }
      break;
    }
  }
  return out.releaseAsArray();
}

inline kj::Array<kj::byte> mutate(Rng& rng, kj::ArrayPtr<const kj::byte> input,
                                  size_t capnpOffset) {
  // 1 to 3 stacked mutations.
  auto result = mutateOnce(rng, input, capnpOffset);
  size_t more = rng.below(3);
  for (size_t i = 0; i < more; i++) result = mutateOnce(rng, result, capnpOffset);
  return result;
}

inline kj::Array<kj::byte> randomBytes(Rng& rng, size_t maxSize) {
  auto result = kj::heapArray<kj::byte>(rng.below(maxSize + 1));
  for (auto& b: result) b = rng.byte();
  return result;
}

}  // namespace cfqt::fuzz
