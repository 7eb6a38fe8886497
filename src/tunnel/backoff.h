#pragma once
// Reconnect backoff with jitter (PROTOCOL.md §8.2): the wait before retry n (n = retries already
// consumed) is uniformly random in [0, base·2^k) with k = min(n+1, maxRetries); the log line
// announces base·2^(n+1) ("Retrying connection in up to 2s"). Retrying never stops: maxRetries
// only caps the growth. A successful registration resets the counter, and the first retry after
// it waits in [0, base) and is announced as base ("up to 1s"), without counting, as cloudflared's
// ResetNow() does.

#include <kj/function.h>
#include <kj/string.h>
#include <kj/time.h>

namespace cfqt::tunnel {

using kj::uint;

struct BackoffConfig {
  kj::Duration base = 1 * kj::SECONDS;   // --backoff-base (hidden; tests use milliseconds)
  uint maxRetries = 5;                   // --retries
};

using JitterSource = kj::Function<double()>;
// Returns a value in [0, 1). Tests inject a constant; production uses randomJitter().

JitterSource randomJitter();
// Uniform in [0, 1) from a PRNG seeded with getrandom().

class Backoff {
public:
  Backoff(BackoffConfig config, JitterSource& jitter);
  // Borrows `jitter` (shared by all indices); it must outlive this object.

  kj::Duration next();
  // The wait before the next retry (already jittered), and counts the retry.

  kj::Duration announced() const;
  // base·2^(n+1) for the log line, before next() is called.

  uint retries() const { return count; }
  void reset() {
    count = 0;
    afterReset = true;
  }

private:
  BackoffConfig config;
  JitterSource& jitter;
  uint count = 0;
  bool afterReset = false;   // the next retry is the first after a registration
};

kj::String formatDuration(kj::Duration d);
// Go's time.Duration format for the log: "1s", "1m4s", "250ms", "1.5s".

}  // namespace cfqt::tunnel
