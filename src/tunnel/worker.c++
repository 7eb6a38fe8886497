#include "tunnel/worker.h"

#include "loop/spinner.h"
#include "named/ingress.h"

#include <kj/debug.h>
#include <kj/thread.h>

#include <atomic>
#include <deque>
#include <malloc.h>
#include <mutex>

namespace cfqt::tunnel {

void capMallocArenas(uint threads) {
  mallopt(M_ARENA_MAX, static_cast<int>(threads) + 1);
}

// =======================================================================================
// IngressSource

kj::OneOf<kj::Own<named::Ingress>, kj::String> IngressSource::build(uint64_t& seen) const {
  kj::Maybe<kj::String> json;
  {
    std::lock_guard<std::mutex> lock(mutex);
    seen = published.generation();
    KJ_IF_MAYBE(r, remote) json = kj::str(*r);
  }
  KJ_IF_MAYBE(text, json) {
    KJ_SWITCH_ONEOF(named::parseConfig(*text, "remote configuration")) {
      KJ_CASE_ONEOF(error, kj::String) return kj::mv(error);
      KJ_CASE_ONEOF(config, named::TunnelConfig) {
        return named::Ingress::build(config.ingress, config.originRequest, base);
      }
    }
    KJ_UNREACHABLE;
  }
  KJ_IF_MAYBE(config, local) {
    return named::Ingress::build(config->ingress, config->originRequest, base);
  }
  auto single = named::cloneOriginConfig(base);
  single.handler = base.handler;
  return named::Ingress::single(kj::mv(single), service);
}

kj::Maybe<kj::String> IngressSource::publish(int32_t version, kj::ArrayPtr<const kj::byte> json) {
  auto text = kj::heapString(json.asChars());
  KJ_SWITCH_ONEOF(named::parseConfig(text, "remote configuration")) {
    KJ_CASE_ONEOF(error, kj::String) return kj::mv(error);
    KJ_CASE_ONEOF(config, named::TunnelConfig) {
      KJ_SWITCH_ONEOF(named::Ingress::build(config.ingress, config.originRequest, base)) {
        KJ_CASE_ONEOF(error, kj::String) return kj::mv(error);
        KJ_CASE_ONEOF(ingress, kj::Own<named::Ingress>) {}
      }
    }
  }
  std::lock_guard<std::mutex> lock(mutex);
  remote = kj::mv(text);
  published.notify();
  return nullptr;
}

kj::Promise<void> IngressSource::whenChanged(uint64_t seen) const {
  return published.whenChangedFrom(seen);
}

// =======================================================================================
// Events: worker -> supervisor loop

struct WorkerPool::Event {
  SessionEvents* target;
  uint connIndex;
  bool registered;       // else notReady
  kj::String connectionId;
  kj::String location;
  kj::String ip;
  kj::String protocol;
};

class WorkerPool::EventQueue {
  // Filled by the workers, emptied on the supervisor's loop, which a Notifier wakes.
public:
  void push(Event event) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      queue.push_back(kj::mv(event));
    }
    pushed.notify();
  }

  kj::Promise<void> whenNotEmpty() {
    // Supervisor loop.
    uint64_t seen = pushed.generation();   // before looking: a later push() wakes the wait
    {
      std::lock_guard<std::mutex> lock(mutex);
      if (!queue.empty()) return kj::READY_NOW;
    }
    return pushed.whenChangedFrom(seen);
  }

  std::deque<Event> take() {
    std::lock_guard<std::mutex> lock(mutex);
    std::deque<Event> out;
    out.swap(queue);
    return out;
  }

private:
  std::mutex mutex;   // guards `queue`
  std::deque<Event> queue;
  Notifier pushed;
};

namespace {

class ForwardingEvents final: public SessionEvents {
  // A worker's session reports here; the supervisor's SessionEvents get it on their loop.
public:
  ForwardingEvents(WorkerPool::EventQueue& queue, SessionEvents& target)
      : queue(queue), target(target) {}

  void registered(uint connIndex, RegisteredInfo info) override;
  void notReady(uint connIndex) override;

private:
  WorkerPool::EventQueue& queue;
  SessionEvents& target;
};

void ForwardingEvents::registered(uint connIndex, RegisteredInfo info) {
  queue.push(WorkerPool::Event{&target, connIndex, true, kj::str(info.connectionId),
                               kj::str(info.location), kj::str(info.ip), kj::str(info.protocol)});
}

void ForwardingEvents::notReady(uint connIndex) {
  queue.push(WorkerPool::Event{&target, connIndex, false, {}, {}, {}, {}});
}

class ShardObserver final: public origin::OriginObserver {
public:
  explicit ShardObserver(observe::TunnelStatus::Shard& stats): stats(stats) {}
  void responseHead(kj::uint statusCode) override { stats.responseSent(statusCode); }
  void requestFailed() override { stats.requestFailed(); }

private:
  observe::TunnelStatus::Shard& stats;
};

origin::OriginConfig cloneOrigin(origin::OriginConfig& config) {
  auto c = named::cloneOriginConfig(config);
  c.handler = config.handler;   // thread-safe (in-process.h): called on each worker's loop
  return c;
}

DialerConfig cloneDialer(const DialerConfig& config) {
  DialerConfig c;
  c.protocol = config.protocol;
  c.http2ServerName = kj::str(config.http2ServerName);
  c.fallbackAfter = config.fallbackAfter;
  c.quicRetryInterval = config.quicRetryInterval;
  c.tcpConnectTimeout = config.tcpConnectTimeout;
  c.quicFailureLimit = config.quicFailureLimit;
  c.quicFailureWindow = config.quicFailureWindow;
  return c;
}

}  // namespace

// =======================================================================================
// Worker

class HandOff {
  // Orders what one thread wrote before handing a value to another through kj::Executor, in a way
  // ThreadSanitizer sees (KJ's own hand-off goes through a futex it cannot): the sender calls
  // release() once the value is complete, the receiver acquire() before it touches it.
public:
  void release() { sequence.fetch_add(1, std::memory_order_release); }
  void acquire() const { sequence.load(std::memory_order_acquire); }

private:
  std::atomic<uint64_t> sequence{0};
};

class WorkerPool::Worker {
public:
  Worker(WorkerPool& pool, uint index): pool(pool), index(index) {}
  KJ_DISALLOW_COPY(Worker);
  ~Worker() noexcept(false) { stop(); }

  kj::Promise<void> start() {
    auto paf = kj::newPromiseAndCrossThreadFulfiller<void>();
    thread = kj::heap<kj::Thread>([this, started = kj::mv(paf.fulfiller)]() mutable {
      threadMain(*started);
    });
    return kj::mv(paf.promise);
  }

  kj::Maybe<kj::Own<const kj::Executor>> executor() {
    std::lock_guard<std::mutex> lock(mutex);
    KJ_IF_MAYBE(e, exec) return (*e)->addRef();
    return nullptr;
  }

  HandOff handOff;   // both directions between the supervisor's loop and this worker

  // On the worker's thread (through its executor):
  kj::Promise<SessionEnd> startSession(uint64_t id, AttemptInfo info, SessionEvents& target);
  kj::Promise<void> shutdownSession(uint64_t id, kj::Duration grace);

private:
  struct Loop;
  WorkerPool& pool;
  uint index;
  std::mutex mutex;   // guards `exec` and `stopping`
  kj::Maybe<kj::Own<const kj::Executor>> exec;   // set while the worker's loop runs
  bool stopping = false;
  Loop* loop = nullptr;   // worker thread only
  kj::Own<kj::Thread> thread;   // last: joined first

  void threadMain(const kj::CrossThreadPromiseFulfiller<void>& started);
  void stop();
};

struct WorkerPool::Worker::Loop {
  // Everything of one worker, on its thread.
  kj::AsyncIoContext& io;
  ShardObserver observer;
  kj::Own<origin::Origin> origin;
  kj::Own<EdgeDialer> dialer;
  kj::Maybe<kj::Own<named::Router>> router;   // named tunnels
  uint64_t routerGeneration = 0;
  kj::Maybe<kj::Promise<void>> routerTask;
  kj::Maybe<kj::ForkedPromise<void>> identityReady;   // setup.identityGate, on this loop
  kj::Own<EdgeConnectionFactory> factory;
  struct Live {
    uint64_t id;
    kj::Own<ForwardingEvents> events;
    kj::Own<Session> session;   // after `events`: destroyed first
  };
  kj::Maybe<Live> current;     // the latest attempt (kept after its run() resolved)
  kj::Own<kj::PromiseFulfiller<void>> exit;

  Loop(WorkerSetup& setup, uint index, kj::AsyncIoContext& io)
      : io(io), observer(setup.status.shard(index)) {
    auto& timer = io.provider->getTimer();
    auto& network = io.provider->getNetwork();
    KJ_SWITCH_ONEOF(origin::Origin::create(cloneOrigin(setup.origin), timer, network,
                                           setup.headerTable)) {
      KJ_CASE_ONEOF(error, kj::String) {
        kj::throwFatalException(kj::Exception(kj::Exception::Type::FAILED, __FILE__, __LINE__,
                                              kj::str("invalid origin: ", error)));
      }
      KJ_CASE_ONEOF(o, kj::Own<origin::Origin>) origin = kj::mv(o);
    }
    origin->setObserver(observer);
    dialer = kj::heap<EdgeDialer>(io.unixEventPort, network, timer, setup.logger, setup.edge,
                                  cloneDialer(setup.dialer), setup.dialerShared);
    kj::Maybe<named::Router&> routerRef;
    KJ_IF_MAYBE(source, setup.named) {
      auto r = kj::heap<named::Router>(timer, network, setup.headerTable, observer);
      KJ_IF_MAYBE(error, applyIngress(*source, *r)) {
        kj::throwFatalException(kj::Exception(kj::Exception::Type::FAILED, __FILE__, __LINE__,
                                              kj::str("invalid ingress rules: ", *error)));
      }
      routerRef = *r;
      router = kj::mv(r);
      routerTask = followIngress(*source, setup.logger).eagerlyEvaluate(nullptr);
    }
    EdgeContext context{
        timer, io.unixEventPort, *origin, setup.logger, setup.status, setup.remoteConfig,
        setup.identity, setup.edge, *dialer, routerRef};
    KJ_IF_MAYBE(gate, setup.identityGate) {
      context.identityReady = identityReady.emplace(gate->whenOpen().fork());
    }
    factory = kj::heap<EdgeConnectionFactory>(kj::mv(context));
  }

  kj::Maybe<kj::String> applyIngress(IngressSource& source, named::Router& r) {
    KJ_SWITCH_ONEOF(source.build(routerGeneration)) {
      KJ_CASE_ONEOF(error, kj::String) return kj::mv(error);
      KJ_CASE_ONEOF(ingress, kj::Own<named::Ingress>) return r.apply(kj::mv(ingress));
    }
    KJ_UNREACHABLE;
  }

  kj::Promise<void> followIngress(IngressSource& source, const observe::Logger& logger) {
    // A remote configuration was published (checked already): this worker's router takes it.
    return source.whenChanged(routerGeneration).then([this, &source, &logger]() {
      KJ_IF_MAYBE(error, applyIngress(source, *KJ_ASSERT_NONNULL(router))) {
        logger.error("Failed to update ingress on a connection worker; its current rules keep "
                     "serving", observe::Fields().add("error", *error));
      }
      return followIngress(source, logger);
    });
  }
  ~Loop() noexcept(false) {
    current = nullptr;   // sessions before the origin, router and dialer they use
    routerTask = nullptr;
  }
};

void WorkerPool::Worker::threadMain(const kj::CrossThreadPromiseFulfiller<void>& started) {
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
    auto io = kj::setupAsyncIo();
    Loop state(pool.setup, index, io);
    auto paf = kj::newPromiseAndFulfiller<void>();
    state.exit = kj::mv(paf.fulfiller);
    loop = &state;
    {
      std::lock_guard<std::mutex> lock(mutex);
      if (stopping) {
        loop = nullptr;
        return;   // stopped while starting: nothing to wait for
      }
      exec = kj::getCurrentThreadExecutor().addRef();
    }
    started.fulfill();
    loop::Spinner spinner(pool.setup.busyPoll);
    spinner.drive(kj::mv(paf.promise), io.waitScope);
    {
      std::lock_guard<std::mutex> lock(mutex);
      exec = nullptr;
    }
    loop = nullptr;
  })) {
    if (started.isWaiting()) {
      started.reject(kj::mv(*e));
    } else {
      pool.setup.logger.error("Connection worker failed",
                              observe::Fields().add("connIndex", index).error(*e));
    }
  }
}

void WorkerPool::Worker::stop() {
  kj::Maybe<kj::Own<const kj::Executor>> running;
  {
    // A worker still starting sees `stopping` before it would wait for its exit.
    std::lock_guard<std::mutex> lock(mutex);
    stopping = true;
    KJ_IF_MAYBE(e, exec) running = (*e)->addRef();
  }
  KJ_IF_MAYBE(e, running) {
    // Ends the worker's loop; its sessions are destroyed on its thread. A loop that already
    // ended makes executeSync() throw DISCONNECTED.
    kj::runCatchingExceptions([&]() {
      (*e)->executeSync([this]() {
        if (loop != nullptr) loop->exit->fulfill();
      });
    });
  }
  thread = nullptr;   // joins
}

kj::Promise<SessionEnd> WorkerPool::Worker::startSession(uint64_t id, AttemptInfo info,
                                                         SessionEvents& target) {
  auto& l = *loop;
  l.current = nullptr;   // the previous attempt: its run() resolved before this one was asked
  auto events = kj::heap<ForwardingEvents>(*pool.events, target);
  auto session = l.factory->newSession(kj::mv(info), *events);
  auto& s = *session;
  l.current = Loop::Live{id, kj::mv(events), kj::mv(session)};
  return s.run();
}

kj::Promise<void> WorkerPool::Worker::shutdownSession(uint64_t id, kj::Duration grace) {
  KJ_IF_MAYBE(live, loop->current) {
    if (live->id == id) return live->session->shutdown(grace);
  }
  return kj::READY_NOW;
}

// =======================================================================================
// The supervisor's side of a session

namespace {

class ProxySession final: public Session {
public:
  ProxySession(WorkerPool::Worker& worker, uint64_t id, AttemptInfo info, SessionEvents& events,
               kj::Function<void()> drain)
      : worker(worker), id(id), info(kj::mv(info)), events(events),
        drain(kj::mv(drain)) {}

  kj::Promise<SessionEnd> run() override {
    KJ_IF_MAYBE(exec, worker.executor()) {
      auto& w = worker;
      w.handOff.release();
      auto promise = (*exec)->executeAsync(
          [&w, id = id, info = kj::mv(info), target = &events]() mutable {
        w.handOff.acquire();
        return w.startSession(id, kj::mv(info), *target).then([&w](SessionEnd end) {
          w.handOff.release();
          return kj::mv(end);
        });
      });
      // Events the worker queued before its session ended reach the supervisor before the end.
      return promise.then([this, &w](SessionEnd end) {
        w.handOff.acquire();
        drain();
        return kj::mv(end);
      }, [this](kj::Exception&& e) {
        drain();
        return SessionEnd{EndKind::LOST, kj::str("connection worker: ", e.getDescription())};
      }).attach(kj::mv(*exec));
    }
    return SessionEnd{EndKind::LOST, kj::str("connection worker stopped")};
  }

  kj::Promise<void> shutdown(kj::Duration grace) override {
    KJ_IF_MAYBE(exec, worker.executor()) {
      auto& w = worker;
      w.handOff.release();
      return (*exec)->executeAsync([&w, id = id, grace]() {
        w.handOff.acquire();
        return w.shutdownSession(id, grace).then([&w]() { w.handOff.release(); });
      }).then([&w]() { w.handOff.acquire(); }, [](kj::Exception&&) {})
          .attach(kj::mv(*exec));
    }
    return kj::READY_NOW;
  }

private:
  WorkerPool::Worker& worker;
  uint64_t id;
  AttemptInfo info;
  SessionEvents& events;
  kj::Function<void()> drain;
};

}  // namespace

// =======================================================================================
// WorkerPool

WorkerPool::WorkerPool(WorkerSetup setup, uint count)
    : setup(setup), events(kj::heap<EventQueue>()) {
  KJ_REQUIRE(count >= 1 && count <= observe::TunnelStatus::MAX_SHARDS, count);
  auto builder = kj::heapArrayBuilder<kj::Own<Worker>>(count);
  for (uint i = 0; i < count; i++) builder.add(kj::heap<Worker>(*this, i));
  workers = builder.finish();
}

WorkerPool::~WorkerPool() noexcept(false) {
  workers = nullptr;   // stops and joins: nothing is queued after this
  dispatchTask = nullptr;
}

kj::Promise<kj::Own<WorkerPool>> WorkerPool::start(uint count, WorkerSetup setup) {
  auto pool = kj::heap<WorkerPool>(setup, count);
  auto started = kj::heapArrayBuilder<kj::Promise<void>>(count);
  for (auto& w: pool->workers) started.add(w->start());
  return kj::joinPromises(started.finish()).then([pool = kj::mv(pool)]() mutable {
    auto& p = *pool;
    p.dispatchTask = p.dispatchLoop().eagerlyEvaluate([&p](kj::Exception&& e) {
      p.setup.logger.error("Connection worker events failed", observe::Fields().error(e));
    });
    return kj::mv(pool);
  });
}

kj::Promise<void> WorkerPool::dispatchLoop() {
  return events->whenNotEmpty().then([this]() {
    dispatchNow();
    return dispatchLoop();
  });
}

void WorkerPool::dispatchNow() {
  for (auto& e: events->take()) {
    if (e.registered) {
      e.target->registered(e.connIndex, {e.connectionId, e.location, e.ip, e.protocol});
    } else {
      e.target->notReady(e.connIndex);
    }
  }
}

kj::Own<Session> WorkerPool::newSession(AttemptInfo info, SessionEvents& sessionEvents) {
  KJ_REQUIRE(info.connIndex < workers.size(), "no worker for this connection index",
             info.connIndex);
  auto& worker = *workers[info.connIndex];
  return kj::heap<ProxySession>(worker, ++nextSession, kj::mv(info), sessionEvents,
                                [this]() { dispatchNow(); });
}

}  // namespace cfqt::tunnel
