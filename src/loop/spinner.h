#pragma once
// Optional busy-polling of a thread's event loop (issue 15, serial latency).
//
// On a VM an idle vCPU halts; waking a thread that sleeps in epoll_wait() on it costs an IPI
// through the hypervisor, 14-25 µs on the development machine (bench/wakeup-pingpong), and a
// tunnelled request makes several such wake-ups. A Spinner keeps polling the loop
// (WaitScope::poll(): ready events, then epoll_wait() with a zero timeout) for a short window
// after each exchange with the edge (a packet or frame received from it, or sent to it), so that
// what follows within that window (the origin's answer to a request, the edge's next request
// after a response) is picked up without a sleep and a wake-up. Go's runtime, and so
// cloudflared, spins idle Ps before parking them for the same reason.
//
// Cost: up to `window` of CPU each time the loop goes idle after a kick. Window 0 (the default) is off:
// drive() is a plain wait().
//
// Usage, at the top of a thread (instead of `promise.wait(waitScope)`):
//   loop::Spinner spinner(50 * kj::MICROSECONDS);
//   int code = spinner.drive(runner.run(), io.waitScope);
// and where work arrives, anywhere on that thread: `loop::kick();`.

#include <kj/async.h>
#include <kj/debug.h>
#include <kj/time.h>

namespace cfqt::loop {

void kick();
// Traffic with the edge (datagrams or frames received, or sent): if this thread's loop is being
// driven by a Spinner, it polls instead of sleeping for the spinner's window from now. Otherwise nothing
// (one thread-local load). Call on the loop's thread, from event callbacks.
//
// The current spinner is thread-local, like KJ's own current EventLoop: the kick sites sit deep
// in the QUIC endpoint and the HTTP/2 session, which should not need a reference plumbed through
// every layer for a hint.

constexpr kj::Duration MAX_BUSY_POLL = 10 * kj::MILLISECONDS;
// The longest window the options accept (--busy-poll, TunnelOptions::busyPoll).

class Spinner {
public:
  explicit Spinner(kj::Duration window): window(window) {}
  KJ_DISALLOW_COPY(Spinner);

  kj::Duration getWindow() const { return window; }

  void drive(kj::Promise<void> promise, kj::WaitScope& waitScope);
  int drive(kj::Promise<int> promise, kj::WaitScope& waitScope);
  // Runs the loop until `promise` settles, and returns its value or throws its exception, like
  // promise.wait(waitScope). Top level only (never from an event callback: WaitScope::poll()
  // would throw). While a kick's window lasts it polls; otherwise it sleeps until an event or a
  // kick. One drive() per thread at a time.

  void kick();
  // loop::kick() for this spinner (same thread).

  struct Stats {
    uint64_t polls = 0;    // WaitScope::poll() calls while spinning
    uint64_t sleeps = 0;   // times the loop slept (blocked) after a window ran out
    uint64_t kicks = 0;
  };
  Stats stats() const { return statsData; }
  // For tests and benchmarks; same thread.

private:
  kj::Duration window;
  bool kicked = false;
  kj::TimePoint deadline = kj::origin<kj::TimePoint>();
  kj::Maybe<kj::Own<kj::PromiseFulfiller<void>>> sleeping;   // set while drive() blocks
  Stats statsData;

  void wake();
};

}  // namespace cfqt::loop
