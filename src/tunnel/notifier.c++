#include "tunnel/notifier.h"

#include <kj/refcount.h>
#include <kj/vector.h>

#include <mutex>

namespace cfqt::tunnel {

class Notifier::Core final: public kj::AtomicRefcounted {
  // Held by the Notifier and by every waiter's continuation, so that a waiter woken just before
  // the Notifier died can still take the mutex. All of it is touched under `mutex` only, which
  // also orders the last owner's free after every other thread's use (for ThreadSanitizer: the
  // refcount itself lives in libkj, which it does not see).
public:
  ~Core() noexcept(false) {
    std::lock_guard<std::mutex> lock(mutex);
  }

  uint64_t generation() const {
    std::lock_guard<std::mutex> lock(mutex);
    return current;
  }

  void notify() const {
    std::lock_guard<std::mutex> lock(mutex);
    ++current;
    for (auto& w: waiters) {
      if (w->isWaiting()) w->fulfill();
    }
    waiters.clear();
  }

  kj::Promise<void> whenChangedFrom(uint64_t seen) const {
    auto paf = kj::newPromiseAndCrossThreadFulfiller<void>();
    {
      std::lock_guard<std::mutex> lock(mutex);
      if (current != seen) return kj::READY_NOW;   // read under the lock: ordered already
      forgetDropped();
      waiters.add(kj::mv(paf.fulfiller));
    }
    return paf.promise.then([self = kj::atomicAddRef(*this)]() {
      std::lock_guard<std::mutex> relock(self->mutex);   // see notifier.h
    });
  }

  void close() const {
    std::lock_guard<std::mutex> lock(mutex);
    for (auto& w: waiters) {
      if (w->isWaiting()) {
        w->reject(kj::Exception(kj::Exception::Type::DISCONNECTED, __FILE__, __LINE__,
                                kj::str("the notifier this waited on was destroyed")));
      }
    }
    waiters.clear();
  }

private:
  mutable std::mutex mutex;   // guards both below
  mutable uint64_t current = 0;
  mutable kj::Vector<kj::Own<kj::CrossThreadPromiseFulfiller<void>>> waiters;

  void forgetDropped() const {
    // With `mutex` held: waiters whose promise was dropped go, so that a caller that keeps
    // cancelling its wait does not grow the list.
    size_t kept = 0;
    for (size_t i = 0; i < waiters.size(); i++) {
      if (!waiters[i]->isWaiting()) continue;
      if (i != kept) waiters[kept] = kj::mv(waiters[i]);
      ++kept;
    }
    waiters.truncate(kept);
  }
};

Notifier::Notifier(): core(kj::atomicRefcounted<Core>()) {}

Notifier::~Notifier() noexcept(false) {
  core->close();
}

uint64_t Notifier::generation() const {
  return core->generation();
}

void Notifier::notify() const {
  core->notify();
}

kj::Promise<void> Notifier::whenChangedFrom(uint64_t seen) const {
  return core->whenChangedFrom(seen);
}

}  // namespace cfqt::tunnel
