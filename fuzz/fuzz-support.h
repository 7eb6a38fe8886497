// What the libFuzzer targets of fuzz/ share (issue 18): one event loop for the whole process,
// a bound on every await (a hang is a bug: abort so the fuzzer reports it), an in-memory input
// stream that hands out bytes in uneven pieces, and the capnp reader used by the RPC targets.
// Each target defines LLVMFuzzerTestOneInput(); a failed check throws, which libFuzzer (and the
// corpus replay in `make test`) report as a crash.

#pragma once

#include <capnp/serialize.h>
#include <kj/async-io.h>
#include <kj/debug.h>
#include <kj/timer.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

namespace cfqt::fuzz {

inline kj::AsyncIoContext& io() {
  // Created on first use, lives until exit (no global constructor).
  static kj::AsyncIoContext context = kj::setupAsyncIo();
  return context;
}

constexpr kj::Duration GUARD = 5 * kj::SECONDS;   // per await; reached only by a hang

inline kj::Promise<void> voided(kj::Promise<void> promise) { return promise; }
template <typename T>
kj::Promise<void> voided(kj::Promise<T> promise) { return promise.ignoreResult(); }

template <typename T>
void settle(kj::Promise<T> promise, const char* what) {
  // Waits until `promise` resolved or rejected (both fine); aborts on a hang.
  bool hung = false;
  auto& context = io();
  context.provider->getTimer().timeoutAfter(GUARD, voided(kj::mv(promise)))
      .catch_([&hung](kj::Exception&& e) {
        if (e.getDescription() == "operation timed out"_kj) hung = true;
      })
      .wait(context.waitScope);
  if (hung) {
    fprintf(stderr, "fuzz target hung: %s\n", what);
    abort();
  }
}

class MemoryInput final: public kj::AsyncInputStream {
  // The bytes, then EOF. Reads return up to `piece` bytes (at least minBytes unless at EOF), so
  // readers meet messages split at odd places.
public:
  MemoryInput(kj::ArrayPtr<const kj::byte> bytes, size_t piece): bytes(bytes), piece(piece) {}

  kj::Promise<size_t> tryRead(void* buffer, size_t minBytes, size_t maxBytes) override {
    size_t left = bytes.size() - pos;
    size_t n = kj::min(left, kj::max(minBytes, kj::min(maxBytes, piece)));
    memcpy(buffer, bytes.begin() + pos, n);
    pos += n;
    return n;
  }

private:
  kj::ArrayPtr<const kj::byte> bytes;
  size_t piece;
  size_t pos = 0;
};

inline kj::Own<capnp::MessageReader> flatReader(kj::ArrayPtr<const kj::byte> bytes,
                                                capnp::ReaderOptions options = {}) {
  // capnp's FlatArrayMessageReader over an aligned copy (whole words only). Debian's libcapnp is
  // not instrumented: the fuzzer sees the coverage of cfqt's code that walks the message, not
  // of capnp's own checks.
  auto words = kj::heapArray<capnp::word>(bytes.size() / sizeof(capnp::word));
  memcpy(words.begin(), bytes.begin(), words.size() * sizeof(capnp::word));
  kj::ArrayPtr<const capnp::word> view = words;
  return kj::heap<capnp::FlatArrayMessageReader>(view, options).attach(kj::mv(words));
}

#define CFQT_FUZZ_CHECK(cond, ...)                                              \
  do {                                                                          \
    if (!(cond)) {                                                              \
      fprintf(stderr, "fuzz check failed: %s (%s:%d)\n", #cond, __FILE__, __LINE__); \
      abort();                                                                  \
    }                                                                           \
  } while (false)

}  // namespace cfqt::fuzz
