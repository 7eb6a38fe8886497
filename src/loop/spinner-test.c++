// loop::Spinner: events, timers and cross-thread executor work run while it spins; after the
// window it sleeps (no CPU burnt while idle); values and exceptions come out as from wait().

#include "loop/spinner.h"

#include <kj/async-io.h>
#include <kj/debug.h>
#include <kj/test.h>
#include <kj/thread.h>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <time.h>

namespace cfqt::loop {
namespace {

kj::Duration threadCpu() {
  struct timespec ts;
  KJ_SYSCALL(clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts));
  return ts.tv_sec * kj::SECONDS + ts.tv_nsec * kj::NANOSECONDS;
}

KJ_TEST("Spinner: off (window 0) and on, drive() returns the value or throws like wait()") {
  auto io = kj::setupAsyncIo();
  Spinner off(0 * kj::NANOSECONDS);
  KJ_EXPECT(off.drive(kj::evalLater([]() { return 7; }), io.waitScope) == 7);
  kick();   // no spinner drives this thread: nothing happens
  KJ_EXPECT(off.stats().kicks == 0);

  Spinner on(100 * kj::MICROSECONDS);
  KJ_EXPECT(on.drive(kj::evalLater([]() {
    kick();
    return 8;
  }), io.waitScope) == 8);
  KJ_EXPECT(on.stats().kicks == 1);
  KJ_EXPECT_THROW_MESSAGE("boom", on.drive(kj::evalLater([]() -> kj::Promise<void> {
    return KJ_EXCEPTION(FAILED, "boom");
  }), io.waitScope));
  kick();   // drive() returned: no longer this thread's spinner
  KJ_EXPECT(on.stats().kicks == 1);
}

KJ_TEST("Spinner: polls during the window after a kick, then sleeps without burning CPU") {
  auto io = kj::setupAsyncIo();
  auto& timer = io.provider->getTimer();
  Spinner spinner(40 * kj::MILLISECONDS);
  Spinner::Stats atKick, inWindow, afterWindow, idleEnd;
  kj::Duration cpuIdleStart, cpuIdleEnd;
  auto program = kj::evalLater([&]() {
    atKick = spinner.stats();
    kick();
    // A timer inside the window: it fires while the loop polls (no sleep so far).
    return timer.afterDelay(5 * kj::MILLISECONDS);
  }).then([&]() {
    inWindow = spinner.stats();
    // Well past the window, which ended in a sleep.
    return timer.afterDelay(100 * kj::MILLISECONDS);
  }).then([&]() {
    afterWindow = spinner.stats();
    cpuIdleStart = threadCpu();
    // Idle: timers are not kicks, so the loop must sleep through this.
    return timer.afterDelay(300 * kj::MILLISECONDS);
  }).then([&]() {
    idleEnd = spinner.stats();
    cpuIdleEnd = threadCpu();
  });
  spinner.drive(kj::mv(program), io.waitScope);

  KJ_EXPECT(inWindow.polls > atKick.polls + 10, atKick.polls, inWindow.polls);
  KJ_EXPECT(inWindow.sleeps == atKick.sleeps, "slept inside the window");
  KJ_EXPECT(afterWindow.sleeps > inWindow.sleeps, "never slept after the window");
  KJ_EXPECT(idleEnd.polls - afterWindow.polls < 10, "kept polling while idle",
            afterWindow.polls, idleEnd.polls);
  // 300 ms idle: a spinning loop would burn about all of it; a sleeping one next to nothing.
  auto burnt = cpuIdleEnd - cpuIdleStart;
  KJ_EXPECT(burnt < 30 * kj::MILLISECONDS, burnt / kj::MICROSECONDS);
}

KJ_TEST("Spinner: cross-thread executor work runs while it spins and while it sleeps") {
  // The loop thread kicks itself from every call, with a window short enough that calls arrive
  // both while it polls and while it sleeps: none may be lost (a lost wake-up hangs the test,
  // which ctest's timeout ends).
  // Hand-offs through std:: primitives, which ThreadSanitizer sees (KJ's mutex is a raw futex).
  std::mutex mutex;
  std::condition_variable ready;
  kj::Maybe<kj::Own<const kj::Executor>> executor;
  std::atomic<uint64_t> polls{0}, sleeps{0};
  kj::Own<kj::CrossThreadPromiseFulfiller<void>> stop;
  uint calls = 0;
  {
    kj::Thread thread([&]() {
      auto io = kj::setupAsyncIo();
      Spinner spinner(200 * kj::MICROSECONDS);
      auto paf = kj::newPromiseAndCrossThreadFulfiller<void>();
      {
        std::lock_guard<std::mutex> lock(mutex);
        stop = kj::mv(paf.fulfiller);
        executor = kj::getCurrentThreadExecutor().addRef();
      }
      ready.notify_one();
      spinner.drive(kj::mv(paf.promise), io.waitScope);
      polls = spinner.stats().polls;
      sleeps = spinner.stats().sleeps;
    });
    const kj::Executor* exec = nullptr;
    {
      std::unique_lock<std::mutex> lock(mutex);
      ready.wait(lock, [&executor]() { return executor != nullptr; });
      exec = KJ_ASSERT_NONNULL(executor).get();
    }
    for (uint i = 0; i < 2000; i++) {
      exec->executeSync([&calls]() {
        ++calls;
        kick();
      });
      if (i % 100 == 99) {
        // Let the window run out now and then, so that later calls find the loop asleep.
        struct timespec pause = {0, 1000000};
        nanosleep(&pause, nullptr);
      }
    }
    stop->fulfill();
  }
  KJ_EXPECT(calls == 2000);
  KJ_EXPECT(polls > 0);
  KJ_EXPECT(sleeps > 0);
}

}  // namespace
}  // namespace cfqt::loop
