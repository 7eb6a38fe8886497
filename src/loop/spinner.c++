#include "loop/spinner.h"

namespace cfqt::loop {

namespace {

// The spinner driving this thread's loop, while its drive() runs. Constant-initialised: no
// global constructor.
thread_local Spinner* current = nullptr;

}  // namespace

void kick() {
  if (current != nullptr) current->kick();
}

void Spinner::kick() {
  kicked = true;
  ++statsData.kicks;
  wake();
}

void Spinner::wake() {
  KJ_IF_MAYBE(s, sleeping) {
    (*s)->fulfill();
    sleeping = nullptr;
  }
}

int Spinner::drive(kj::Promise<int> promise, kj::WaitScope& waitScope) {
  int result = 0;
  drive(promise.then([&result](int value) { result = value; }), waitScope);
  return result;
}

void Spinner::drive(kj::Promise<void> promise, kj::WaitScope& waitScope) {
  if (window <= 0 * kj::NANOSECONDS) {
    promise.wait(waitScope);
    return;
  }
  KJ_REQUIRE(current == nullptr, "one Spinner::drive() per thread at a time");
  current = this;
  KJ_DEFER({
    current = nullptr;
    sleeping = nullptr;
  });

  bool finished = false;
  kj::Maybe<kj::Exception> failure;
  auto task = promise.then([this, &finished]() {
    finished = true;
    wake();
  }, [this, &finished, &failure](kj::Exception&& e) {
    failure = kj::mv(e);
    finished = true;
    wake();
  }).eagerlyEvaluate(nullptr);

  auto& clock = kj::systemPreciseMonotonicClock();
  for (;;) {
    // Everything ready, then one epoll_wait() with a zero timeout (timers and the executor's
    // cross-thread queue included). Only here, at the top level: UnixEventPort::poll() called
    // from an event callback could consume the executor's wake-up without running its queue.
    waitScope.poll();
    if (finished) break;
    auto now = clock.now();
    if (kicked) {
      kicked = false;
      deadline = now + window;
    }
    if (now < deadline) {
      ++statsData.polls;
      continue;
    }
    // The window ran out with nothing to do: sleep until an event, a kick, or the end.
    ++statsData.sleeps;
    auto paf = kj::newPromiseAndFulfiller<void>();
    sleeping = kj::mv(paf.fulfiller);
    paf.promise.wait(waitScope);
  }
  KJ_IF_MAYBE(e, failure) kj::throwFatalException(kj::mv(*e));
}

}  // namespace cfqt::loop
