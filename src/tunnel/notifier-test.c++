// Notifier (notifier.h): waiters on the same loop and on other threads' loops wake on notify() and
// not before, see what the notifying thread wrote (ThreadSanitizer checks the ordering in
// make test-tsan), and neither a dropped waiter nor a destroyed Notifier is touched afterwards
// (ASan).

#include "tunnel/notifier.h"

#include <kj/async-io.h>
#include <kj/debug.h>
#include <kj/test.h>
#include <kj/thread.h>

#include <atomic>

namespace cfqt::tunnel {
namespace {

KJ_TEST("Notifier: a waiter wakes on notify(), not before; an older generation resolves at once") {
  auto io = kj::setupAsyncIo();
  Notifier notifier;
  KJ_EXPECT(notifier.generation() == 0);

  auto waiter = notifier.whenChangedFrom(0);
  KJ_EXPECT(!waiter.poll(io.waitScope), "woke before any notify()");
  notifier.notify();
  KJ_EXPECT(notifier.generation() == 1);
  KJ_EXPECT(waiter.poll(io.waitScope), "notify() did not wake the waiter");
  waiter.wait(io.waitScope);

  auto stale = notifier.whenChangedFrom(0);
  KJ_EXPECT(stale.poll(io.waitScope), "a generation already passed must not wait");
  auto current = notifier.whenChangedFrom(1);
  KJ_EXPECT(!current.poll(io.waitScope), "the current generation must wait");

  // Several waiters on one generation all wake.
  auto second = notifier.whenChangedFrom(1);
  notifier.notify();
  current.wait(io.waitScope);
  second.wait(io.waitScope);
  KJ_EXPECT(notifier.generation() == 2);
}

KJ_TEST("Notifier: waiters on other threads wake and see what was written before notify()") {
  constexpr uint THREADS = 3;
  auto io = kj::setupAsyncIo();
  Notifier go;            // main -> threads
  Notifier waiting;       // threads -> main: one notify() per thread whose wait is set up
  uint64_t payload = 0;   // plain memory: TSan reports a race unless notify() orders it
  std::atomic<uint> seen{0};

  kj::Vector<kj::Own<kj::Thread>> threads;
  for (uint i = 0; i < THREADS; i++) {
    threads.add(kj::heap<kj::Thread>([&]() {
      auto threadIo = kj::setupAsyncIo();
      auto woken = go.whenChangedFrom(0);
      waiting.notify();
      woken.wait(threadIo.waitScope);
      if (payload == 42) seen.fetch_add(1);
    }));
  }
  // Every thread's waiter exists before notify(), so the wake-up path (not the at-once path) runs.
  for (uint64_t g = waiting.generation(); g < THREADS; g = waiting.generation()) {
    waiting.whenChangedFrom(g).wait(io.waitScope);
  }
  payload = 42;
  go.notify();
  threads.clear();   // joins
  KJ_EXPECT(seen.load() == THREADS, seen.load());
}

KJ_TEST("Notifier: notify() from two threads while a third loop keeps waiting") {
  constexpr uint64_t EACH = 500;
  Notifier notifier;
  uint64_t last = 0;
  {
    kj::Thread waiter([&]() {
      auto io = kj::setupAsyncIo();
      while (last < 2 * EACH) {
        notifier.whenChangedFrom(last).wait(io.waitScope);
        last = notifier.generation();
      }
    });
    kj::Thread a([&]() { for (uint64_t i = 0; i < EACH; i++) notifier.notify(); });
    kj::Thread b([&]() { for (uint64_t i = 0; i < EACH; i++) notifier.notify(); });
  }
  KJ_EXPECT(last == 2 * EACH, last);
}

KJ_TEST("Notifier: a dropped waiter is never fulfilled, on this loop or on a loop that ended") {
  auto io = kj::setupAsyncIo();
  Notifier notifier;
  for (uint i = 0; i < 1000; i++) notifier.whenChangedFrom(0);   // dropped at once
  {
    kj::Thread gone([&]() {
      auto threadIo = kj::setupAsyncIo();
      auto dropped = notifier.whenChangedFrom(0);
    });
  }
  auto kept = notifier.whenChangedFrom(0);
  notifier.notify();
  kept.wait(io.waitScope);
}

KJ_TEST("Notifier: destroying it rejects pending waiters; a woken one still resolves") {
  auto io = kj::setupAsyncIo();
  {
    auto notifier = kj::heap<Notifier>();
    auto pending = notifier->whenChangedFrom(0);
    notifier = nullptr;
    KJ_EXPECT_THROW_MESSAGE("notifier this waited on was destroyed", pending.wait(io.waitScope));
  }
  {
    // Woken, then the Notifier dies before the waiter's loop ran: the continuation must not
    // touch freed memory (ASan).
    auto notifier = kj::heap<Notifier>();
    auto woken = notifier->whenChangedFrom(0);
    notifier->notify();
    notifier = nullptr;
    woken.wait(io.waitScope);
  }
  {
    // The same with the waiter on another thread, woken by this one.
    auto notifier = kj::heap<Notifier>();
    Notifier ready;
    kj::Thread waiter([&]() {
      auto threadIo = kj::setupAsyncIo();
      auto woken = notifier->whenChangedFrom(0);
      ready.notify();
      woken.wait(threadIo.waitScope);
    });
    ready.whenChangedFrom(0).wait(io.waitScope);
    notifier->notify();
    notifier = nullptr;
  }
}

}  // namespace
}  // namespace cfqt::tunnel
