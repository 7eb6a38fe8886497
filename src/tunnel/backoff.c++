#include "tunnel/backoff.h"

#include <kj/debug.h>

#include <sys/random.h>

namespace cfqt::tunnel {

namespace {

class XorShift {
public:
  XorShift() {
    if (getrandom(&state, sizeof(state), 0) != sizeof(state) || state == 0) {
      state = 0x9E3779B97F4A7C15ull;
    }
  }
  double operator()() {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return static_cast<double>(state >> 11) / static_cast<double>(1ull << 53);
  }

private:
  uint64_t state = 0;
};

kj::Duration scaled(kj::Duration base, uint exponent) {
  if (exponent > 30) exponent = 30;   // keeps base·2^k far from int64 overflow
  return base * (int64_t(1) << exponent);
}

}  // namespace

JitterSource randomJitter() {
  return XorShift();
}

Backoff::Backoff(BackoffConfig config, JitterSource& jitter): config(config), jitter(jitter) {}

kj::Duration Backoff::announced() const {
  if (afterReset) return config.base;
  // cloudflared keeps announcing base·2^(maxRetries+1) once the cap is reached.
  return scaled(config.base, kj::min(count + 1, kj::max(config.maxRetries, 1u) + 1));
}

kj::Duration Backoff::next() {
  uint k = afterReset ? 0 : kj::min(count + 1, kj::max(config.maxRetries, 1u));
  kj::Duration bound = scaled(config.base, k);
  double j = jitter();
  if (!(j >= 0.0)) j = 0.0;
  if (j >= 1.0) j = 0.999999;
  int64_t ns = static_cast<int64_t>(static_cast<double>(bound / kj::NANOSECONDS) * j);
  if (afterReset) {
    afterReset = false;
  } else if (count < 1000000) {
    count++;
  }
  return ns * kj::NANOSECONDS;
}

kj::String formatDuration(kj::Duration d) {
  int64_t ns = d / kj::NANOSECONDS;
  if (ns == 0) return kj::str("0s");
  if (ns < 1000000000) {
    if (ns % 1000000 == 0) return kj::str(ns / 1000000, "ms");
    return kj::str(ns / 1000, "µs");
  }
  int64_t totalMs = ns / 1000000;
  int64_t hours = totalMs / 3600000;
  int64_t minutes = (totalMs / 60000) % 60;
  int64_t secMs = totalMs % 60000;
  kj::String sec;
  if (secMs % 1000 == 0) {
    sec = kj::str(secMs / 1000, "s");
  } else {
    auto frac = kj::str(1000 + secMs % 1000);          // "1500" -> "500"
    size_t len = frac.size();
    while (len > 1 && frac[len - 1] == '0') len--;     // Go trims trailing zeros: 1.5s
    sec = kj::str(secMs / 1000, ".", kj::heapString(frac.begin() + 1, len - 1), "s");
  }
  if (hours > 0) return kj::str(hours, "h", minutes, "m", sec);
  if (minutes > 0) return kj::str(minutes, "m", sec);
  return sec;
}

}  // namespace cfqt::tunnel
