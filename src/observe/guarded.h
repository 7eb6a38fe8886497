#pragma once
// Guarded<T>: kj::MutexGuarded's interface (lockExclusive(), lockShared(), lock.wait(pred[,
// timeout])) over std::mutex and std::condition_variable. Debian's kj::Mutex is a raw futex that
// ThreadSanitizer cannot see (make test-tsan), so state that cfqt shares between threads uses
// this instead. Every release of a lock wakes the waiters, which re-check their predicates (as
// kj::MutexGuarded does); there is no shared mode: lockShared() is exclusive too.

#include <kj/common.h>
#include <kj/time.h>

#include <chrono>
#include <condition_variable>
#include <mutex>

namespace cfqt::observe {

template <typename T>
class Guarded {
public:
  template <typename... Params>
  explicit Guarded(Params&&... params): value(kj::fwd<Params>(params)...) {}
  KJ_DISALLOW_COPY(Guarded);

  class Locked {
  public:
    explicit Locked(const Guarded& guarded): guarded(guarded), lock(guarded.mutex) {}
    Locked(Locked&& other) = default;
    ~Locked() noexcept(false) {
      if (lock.owns_lock()) guarded.changed.notify_all();
    }

    T* operator->() { return &guarded.value; }
    T& operator*() { return guarded.value; }
    T* get() { return &guarded.value; }

    template <typename Cond>
    void wait(Cond&& condition) {
      guarded.changed.wait(lock, [&]() { return condition(const_cast<const T&>(guarded.value)); });
    }
    template <typename Cond>
    void wait(Cond&& condition, kj::Duration timeout) {
      // Returns once `condition` holds or `timeout` passed, whichever first.
      guarded.changed.wait_for(lock, std::chrono::nanoseconds(timeout / kj::NANOSECONDS),
          [&]() { return condition(const_cast<const T&>(guarded.value)); });
    }

  private:
    const Guarded& guarded;
    std::unique_lock<std::mutex> lock;
  };

  Locked lockExclusive() const { return Locked(*this); }
  Locked lockShared() const { return Locked(*this); }
  // Any thread.

  T& getWithoutLock() { return value; }
  // Only while no other thread can reach this object (construction, destruction).

private:
  mutable std::mutex mutex;
  mutable std::condition_variable changed;
  mutable T value;
};

}  // namespace cfqt::observe
