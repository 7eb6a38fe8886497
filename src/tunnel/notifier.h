#pragma once
// The one way a thread wakes another thread's event loop in src/tunnel: a generation counter that
// any thread bumps with notify(), and waiters, each on its own thread's loop, that resolve once it
// moved past the generation they saw. What a user guards (a queue, a configuration, a grant) stays
// behind its own lock; the Notifier only says "look again".
//
// KJ's cross-thread fulfillers wake through a futex in the uninstrumented libkj, which
// ThreadSanitizer cannot see: a woken waiter takes the Notifier's std::mutex again before its
// promise resolves, so everything the notifying thread wrote before notify() is ordered before what
// the waiter does next, for TSan as for the hardware.

#include <kj/async.h>

#include <stdint.h>

namespace cfqt::tunnel {

class Notifier {
public:
  Notifier();
  ~Notifier() noexcept(false);
  // Rejects the waiters still pending (DISCONNECTED). A waiter already woken may run its
  // continuation after this (it keeps what it needs alive).
  KJ_DISALLOW_COPY(Notifier);

  uint64_t generation() const;
  // The current generation: 0 until the first notify(). Any thread.

  void notify() const;
  // Any thread: bumps the generation and wakes every waiter. Never calls a continuation itself.

  kj::Promise<void> whenChangedFrom(uint64_t seen) const;
  // On the caller's loop (which must have a kj::Executor: any kj::EventLoop): resolves once the
  // generation is no longer `seen`, at once if it already is not. Dropping the promise is fine at
  // any time; its waiter is forgotten by the next whenChangedFrom() or notify(), so memory is
  // bounded by the promises alive.

private:
  class Core;
  kj::Own<const Core> core;   // shared with the woken waiters' continuations
};

}  // namespace cfqt::tunnel
