#pragma once
// Test support: waiting for a state that no event announces (a pool emptied by its timer, a
// flow-control window filled up, a pump parked on a blocked sink), bounded in time.

#include <kj/async.h>
#include <kj/timer.h>

namespace cfqt::testing {

template <typename Func>
bool eventually(kj::Timer& timer, kj::WaitScope& waitScope, Func&& condition,
                kj::Duration limit = 3 * kj::SECONDS) {
  // Checks `condition` every 5 ms, running the loop in between, until it holds (true) or `limit`
  // passed (false).
  auto deadline = timer.now() + limit;
  while (!condition()) {
    if (timer.now() >= deadline) return false;
    timer.afterDelay(5 * kj::MILLISECONDS).wait(waitScope);
  }
  return true;
}

}  // namespace cfqt::testing
