#include "tunnel/supervisor.h"

#include <kj/test.h>

namespace cfqt::tunnel {
namespace {

edge::EdgeAddresses twoAddresses() {
  edge::EdgeAddresses result;
  auto r1 = kj::heapArray<edge::EdgeAddress>(1);
  r1[0] = KJ_ASSERT_NONNULL(edge::parseIpPort("127.0.0.1:7844"));
  auto r2 = kj::heapArray<edge::EdgeAddress>(1);
  r2[0] = KJ_ASSERT_NONNULL(edge::parseIpPort("127.0.0.2:7844"));
  auto regions = kj::heapArrayBuilder<edge::EdgeRegion>(2);
  regions.add(edge::makeRegion(kj::str("r1"), kj::mv(r1), edge::IpVersion::AUTO));
  regions.add(edge::makeRegion(kj::str("r2"), kj::mv(r2), edge::IpVersion::AUTO));
  result.regions = regions.finish();
  return result;
}

class FakeSession;

struct FakeFactory final: public SessionFactory {
  kj::Vector<FakeSession*> live;
  kj::Vector<AttemptInfo> attempts;
  uint shutdownCalls = 0;
  uint failNext = 0;   // newSession() throws this many more times (a bug inside an index loop)
  kj::Own<Session> newSession(AttemptInfo info, SessionEvents& events) override;
  FakeSession& last() { return *live.back(); }
  uint attemptsFor(uint index) {
    uint n = 0;
    for (auto& a: attempts) if (a.connIndex == index) n++;
    return n;
  }
};

class FakeSession final: public Session {
public:
  FakeSession(FakeFactory& factory, AttemptInfo info, SessionEvents& events)
      : factory(factory), info(kj::mv(info)), events(events) {
    auto paf = kj::newPromiseAndFulfiller<SessionEnd>();
    endPromise = kj::mv(paf.promise);
    fulfiller = kj::mv(paf.fulfiller);
    factory.live.add(this);
  }
  ~FakeSession() noexcept(false) {
    kj::Vector<FakeSession*> rest;
    for (auto s: factory.live) if (s != this) rest.add(s);
    factory.live = kj::mv(rest);
  }
  kj::Promise<SessionEnd> run() override { return KJ_ASSERT_NONNULL(kj::mv(endPromise)); }
  kj::Promise<void> shutdown(kj::Duration grace) override {
    factory.shutdownCalls++;
    fulfiller->fulfill(SessionEnd{EndKind::SHUTDOWN, kj::str("shutdown"), true, registeredYet});
    return kj::READY_NOW;
  }
  void registerOk() {
    registeredYet = true;
    events.registered(info.connIndex, {"uuid", "EMU", "127.0.0.1"});
  }
  void end(EndKind kind, bool shouldRetry = true) {
    fulfiller->fulfill(SessionEnd{kind, kj::str("test"), shouldRetry, registeredYet});
  }

  FakeFactory& factory;
  AttemptInfo info;
  SessionEvents& events;
  bool registeredYet = false;
  kj::Maybe<kj::Promise<SessionEnd>> endPromise;
  kj::Own<kj::PromiseFulfiller<SessionEnd>> fulfiller;
};

kj::Own<Session> FakeFactory::newSession(AttemptInfo info, SessionEvents& events) {
  if (failNext > 0) {
    --failNext;
    KJ_FAIL_ASSERT("injected failure inside the index loop");
  }
  attempts.add(info);
  return kj::heap<FakeSession>(*this, kj::mv(info), events);
}

struct Fixture {
  kj::EventLoop loop;
  kj::WaitScope waitScope{loop};
  kj::TimerImpl timer{kj::origin<kj::TimePoint>()};
  observe::Logger logger{observe::LogConfig{observe::LogLevel::FATAL, nullptr, false}};
  observe::TunnelStatus status;
  edge::AddressPool pool{twoAddresses(), kj::Function<uint(uint)>([](uint) { return 0u; })};
  FakeFactory factory;
  JitterSource jitter = []() { return 0.5; };   // waits are half the bound

  void advance(kj::Duration d) {
    timer.advanceTo(timer.now() + d);
    waitScope.poll();
  }
};

SupervisorConfig config(uint n) {
  SupervisorConfig c;
  c.haConnections = n;
  c.backoff = BackoffConfig{100 * kj::MILLISECONDS, 3};
  c.haStagger = 10 * kj::MILLISECONDS;
  return c;
}

KJ_TEST("backoff: bound doubles up to maxRetries, jitter scales, reset") {
  JitterSource full = []() { return 0.999999999; };
  JitterSource half = []() { return 0.5; };
  Backoff b(BackoffConfig{1 * kj::SECONDS, 3}, half);
  KJ_EXPECT(b.announced() == 2 * kj::SECONDS);
  KJ_EXPECT(b.next() == 1 * kj::SECONDS);      // [0, 2s) * 0.5
  KJ_EXPECT(b.next() == 2 * kj::SECONDS);      // [0, 4s)
  KJ_EXPECT(b.next() == 4 * kj::SECONDS);      // [0, 8s) = cap (maxRetries 3)
  KJ_EXPECT(b.announced() == 16 * kj::SECONDS);
  KJ_EXPECT(b.next() == 4 * kj::SECONDS);      // still capped, never stops
  KJ_EXPECT(b.retries() == 4);
  b.reset();                                   // after a registration: [0, base), not counted
  KJ_EXPECT(b.announced() == 1 * kj::SECONDS);
  KJ_EXPECT(b.next() == 500 * kj::MILLISECONDS);
  KJ_EXPECT(b.retries() == 0);
  KJ_EXPECT(b.announced() == 2 * kj::SECONDS);
  KJ_EXPECT(b.next() == 1 * kj::SECONDS);
  KJ_EXPECT(b.retries() == 1);
  Backoff c(BackoffConfig{1 * kj::SECONDS, 5}, full);
  KJ_EXPECT(c.next() < 2 * kj::SECONDS);
  KJ_EXPECT(formatDuration(64 * kj::SECONDS) == "1m4s");
  KJ_EXPECT(formatDuration(2 * kj::SECONDS) == "2s");
  KJ_EXPECT(formatDuration(250 * kj::MILLISECONDS) == "250ms");
  KJ_EXPECT(formatDuration(1500 * kj::MILLISECONDS) == "1.5s", formatDuration(1500 * kj::MILLISECONDS));
  KJ_EXPECT(formatDuration(61250 * kj::MILLISECONDS) == "1m1.25s");
}

KJ_TEST("supervisor: index 0 first, others after it registered, staggered") {
  Fixture f;
  Supervisor sup(f.timer, f.factory, f.pool, f.logger, f.status, config(2), f.jitter);
  auto done = sup.run();
  f.waitScope.poll();
  KJ_ASSERT(f.factory.attempts.size() == 1);
  KJ_EXPECT(f.factory.attempts[0].connIndex == 0);
  f.advance(1 * kj::SECONDS);
  KJ_EXPECT(f.factory.attempts.size() == 1, "index 1 started before index 0 registered");
  f.factory.last().registerOk();
  KJ_EXPECT(f.status.readyConnections() == 1);
  f.waitScope.poll();
  KJ_EXPECT(f.factory.attempts.size() == 1);
  f.advance(10 * kj::MILLISECONDS);
  KJ_ASSERT(f.factory.attempts.size() == 2);
  KJ_EXPECT(f.factory.attempts[1].connIndex == 1);
  KJ_EXPECT(f.factory.attempts[0].address != f.factory.attempts[1].address);
  f.factory.last().registerOk();
  KJ_EXPECT(f.status.readyConnections() == 2);
  KJ_EXPECT(!done.poll(f.waitScope));

  sup.shutdown(1 * kj::SECONDS).wait(f.waitScope);
  KJ_EXPECT(f.factory.shutdownCalls == 2);
  KJ_EXPECT(f.status.readyConnections() == 0);
  done.wait(f.waitScope);
  KJ_EXPECT(!sup.allFailed());
}

KJ_TEST("supervisor: lost connection waits out the jittered backoff, then redials") {
  Fixture f;
  Supervisor sup(f.timer, f.factory, f.pool, f.logger, f.status, config(1), f.jitter);
  auto done = sup.run();
  f.waitScope.poll();
  f.factory.last().end(EndKind::REGISTRATION_FAILED);
  f.waitScope.poll();
  // retry 1: bound 200ms, jitter 0.5 → 100ms
  f.advance(99 * kj::MILLISECONDS);
  KJ_EXPECT(f.factory.attempts.size() == 1, "redialed before the backoff expired");
  f.advance(1 * kj::MILLISECONDS);
  KJ_ASSERT(f.factory.attempts.size() == 2);
  KJ_EXPECT(f.factory.attempts[1].numPreviousAttempts == 1);
  KJ_EXPECT(f.factory.attempts[1].address == f.factory.attempts[0].address,
            "registration failure must not rotate");
  f.factory.last().end(EndKind::REGISTRATION_FAILED);
  f.waitScope.poll();
  f.advance(199 * kj::MILLISECONDS);     // retry 2: bound 400ms → 200ms
  KJ_EXPECT(f.factory.attempts.size() == 2);
  f.advance(1 * kj::MILLISECONDS);
  KJ_ASSERT(f.factory.attempts.size() == 3);
  KJ_EXPECT(f.factory.attempts[2].numPreviousAttempts == 2);
  // registration resets the counter; the next loss waits within [0, base) (bound 100ms → 50ms)
  // and does not count as a previous attempt
  f.factory.last().registerOk();
  f.factory.last().end(EndKind::LOST);
  f.waitScope.poll();
  KJ_EXPECT(f.status.readyConnections() == 0);
  f.advance(49 * kj::MILLISECONDS);
  KJ_EXPECT(f.factory.attempts.size() == 3, "redialed before the backoff expired");
  f.advance(1 * kj::MILLISECONDS);
  KJ_ASSERT(f.factory.attempts.size() == 4);
  KJ_EXPECT(f.factory.attempts[3].numPreviousAttempts == 0);
  sup.shutdown(1 * kj::SECONDS).wait(f.waitScope);
  done.wait(f.waitScope);
}

KJ_TEST("supervisor: dial failure and EDUPCONN rotate the address") {
  Fixture f;
  Supervisor sup(f.timer, f.factory, f.pool, f.logger, f.status, config(1), f.jitter);
  auto done = sup.run();
  f.waitScope.poll();
  auto first = f.factory.attempts[0].address;
  f.factory.last().end(EndKind::DIAL_FAILED);
  f.waitScope.poll();
  f.advance(100 * kj::MILLISECONDS);
  KJ_ASSERT(f.factory.attempts.size() == 2);
  KJ_EXPECT(f.factory.attempts[1].address != first);
  f.factory.last().end(EndKind::DUPLICATE);
  f.waitScope.poll();
  f.advance(200 * kj::MILLISECONDS);
  KJ_ASSERT(f.factory.attempts.size() == 3);
  KJ_EXPECT(f.factory.attempts[2].address == first);
  sup.shutdown(1 * kj::SECONDS).wait(f.waitScope);
  done.wait(f.waitScope);
}

KJ_TEST("supervisor: shouldRetry=false stops the index; all stopped resolves run()") {
  Fixture f;
  Supervisor sup(f.timer, f.factory, f.pool, f.logger, f.status, config(2), f.jitter);
  auto done = sup.run();
  f.waitScope.poll();
  f.factory.last().end(EndKind::REJECTED, true);   // retryable: backs off
  f.waitScope.poll();
  KJ_EXPECT(!done.poll(f.waitScope));
  f.advance(100 * kj::MILLISECONDS);
  KJ_ASSERT(f.factory.attempts.size() == 2);
  f.factory.last().end(EndKind::REJECTED, false);
  KJ_ASSERT(done.poll(f.waitScope));
  done.wait(f.waitScope);
  KJ_EXPECT(sup.allFailed());
  f.advance(10 * kj::SECONDS);
  KJ_EXPECT(f.factory.attempts.size() == 2, "a stopped index redialed");
}

KJ_TEST("supervisor: shutdown during a backoff wait cancels the wait") {
  Fixture f;
  Supervisor sup(f.timer, f.factory, f.pool, f.logger, f.status, config(1), f.jitter);
  auto done = sup.run();
  f.waitScope.poll();
  f.factory.last().end(EndKind::LOST);
  f.waitScope.poll();
  auto stopped = sup.shutdown(1 * kj::SECONDS);
  KJ_EXPECT(stopped.poll(f.waitScope));
  KJ_EXPECT(done.poll(f.waitScope));
  done.wait(f.waitScope);
  f.advance(10 * kj::SECONDS);
  KJ_EXPECT(f.factory.attempts.size() == 1);
  KJ_EXPECT(!sup.allFailed());
}

KJ_TEST("supervisor: a failure inside an index loop restarts the index; shutdown still completes") {
  Fixture f;
  Supervisor sup(f.timer, f.factory, f.pool, f.logger, f.status, config(2), f.jitter);
  auto done = sup.run();
  f.waitScope.poll();
  f.factory.last().registerOk();
  f.advance(10 * kj::MILLISECONDS);
  KJ_ASSERT(f.factory.attempts.size() == 2);
  // Index 1's connection is lost, and its next attempt fails inside the supervisor itself.
  f.factory.failNext = 1;
  f.factory.last().end(EndKind::LOST);
  f.waitScope.poll();
  f.advance(100 * kj::MILLISECONDS);   // the redial throws: logged, restarted after a backoff
  KJ_EXPECT(f.factory.attempts.size() == 2);
  f.advance(1 * kj::SECONDS);
  KJ_ASSERT(f.factory.attempts.size() == 3, "the index did not restart after its failure");
  KJ_EXPECT(f.factory.attempts[2].connIndex == 1);
  f.factory.last().registerOk();
  KJ_EXPECT(f.status.readyConnections() == 2);

  // A failure while shutting down ends the index instead; the shutdown completes at once.
  f.factory.failNext = 1;
  f.factory.live[0]->end(EndKind::LOST);   // index 0 lost: its redial will fail
  f.waitScope.poll();
  f.advance(100 * kj::MILLISECONDS);
  auto stopped = sup.shutdown(1 * kj::SECONDS);
  f.advance(10 * kj::SECONDS);
  KJ_EXPECT(stopped.poll(f.waitScope));
  KJ_EXPECT(done.poll(f.waitScope), "run() did not resolve after the first shutdown");
  done.wait(f.waitScope);
}

}  // namespace
}  // namespace cfqt::tunnel
