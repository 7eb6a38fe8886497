// Connection workers (worker.h) through the whole Runner against an in-process cfqt-edge: with
// --threads auto each HA connection runs on its own thread, requests are served through both,
// statistics land in each index's shard, and the graceful stop joins the threads; --threads 1
// keeps everything on the runner's loop.

#include "tunnel/runner.h"

#include "emulator/emulator.h"

#include <kj/async-io.h>
#include <kj/compat/http.h>
#include <kj/debug.h>
#include <kj/test.h>

#include <atomic>
#include <dirent.h>
#include <stdlib.h>
#include <unistd.h>

namespace cfqt::tunnel {
namespace {

uint threadCount() {
  // Tasks of this process (/proc/self/task), this thread included.
  DIR* dir = opendir("/proc/self/task");
  KJ_ASSERT(dir != nullptr);
  uint n = 0;
  while (auto entry = readdir(dir)) {
    if (entry->d_name[0] != '.') n++;
  }
  closedir(dir);
  return n;
}

class Callbacks final: public RunnerCallbacks {
public:
  kj::String hostname;
  uint registrations = 0;
  kj::Maybe<kj::Own<kj::PromiseFulfiller<void>>> allRegistered;
  uint wanted = 2;

  void tunnelCreated(kj::StringPtr url, kj::StringPtr host) override {
    hostname = kj::str(host);
  }
  void connectionRegistered(uint connIndex) override {
    if (++registrations == wanted) {
      KJ_IF_MAYBE(f, allRegistered) (*f)->fulfill();
    }
  }
};

struct Fixture {
  kj::AsyncIoContext io = kj::setupAsyncIo();
  observe::Logger logger{observe::LogConfig{observe::LogLevel::FATAL, nullptr, false}};
  kj::Own<emulator::Emulator> edge;
  emulator::ReadyInfo ready;
  kj::String stateDir;

  Fixture() {
    char dirTemplate[] = "/tmp/cfqt-worker-test-XXXXXX";
    KJ_ASSERT(mkdtemp(dirTemplate) != nullptr);
    stateDir = kj::str(dirTemplate);
    emulator::EmulatorOptions eo;
    eo.edgeListen.add(kj::str("127.0.0.1:0"));
    eo.edgeListen.add(kj::str("127.0.0.2:0"));
    eo.certificates.stateDir = kj::str(stateDir);
    edge = kj::heap<emulator::Emulator>(io, kj::mv(eo));
    ready = edge->start().wait(io.waitScope);
  }
  ~Fixture() noexcept(false) {
    edge = nullptr;
    KJ_SYSCALL(system(kj::str("rm -rf '", stateDir, "'").cStr()));
  }

  RunnerOptions options(uint threads) {
    RunnerOptions r;
    r.origin = origin::helloWorldOrigin();
    r.service = kj::str("hello_world");
    r.api.serviceUrl = kj::str("http://", ready.api);
    for (auto& e: ready.edges) r.discovery.edges.add(kj::str(e));
    r.edge.edgeCaFile = kj::str(ready.ca);
    r.haConnections = 2;
    r.haStagger = 1 * kj::MILLISECONDS;
    r.metrics = false;
    r.threads = threads;
    return r;
  }

  uint get(kj::HttpClient& client, kj::StringPtr host, kj::StringPtr path) {
    kj::HttpHeaderTable table;
    kj::HttpHeaders headers(table);
    headers.set(kj::HttpHeaderId::HOST, host);
    auto response = client.request(kj::HttpMethod::GET, path, headers).response
        .wait(io.waitScope);
    response.body->readAllBytes().wait(io.waitScope);
    return response.statusCode;
  }
};

KJ_TEST("workers: --threads auto runs each HA connection on its own thread") {
  Fixture f;
  // auto uses one loop when this process may run on one CPU only (e.g. under taskset -c 0).
  uint workers = usableCpus() > 1 ? 2 : 0;
  uint before = threadCount();
  Callbacks callbacks;
  auto paf = kj::newPromiseAndFulfiller<void>();
  callbacks.allRegistered = kj::mv(paf.fulfiller);
  uint during = 0;
  {
    auto options = f.options(0);
    options.busyPoll = 200 * kj::MICROSECONDS;   // the workers' loops poll after edge traffic
    Runner runner(f.io, f.logger, kj::mv(options), callbacks);
    auto done = runner.run().eagerlyEvaluate(nullptr);
    auto timeout = f.io.provider->getTimer().afterDelay(20 * kj::SECONDS).then([]() {
      KJ_FAIL_ASSERT("the two connections did not register within 20 s");
    });
    paf.promise.exclusiveJoin(kj::mv(timeout)).wait(f.io.waitScope);
    // (A sanitizer's runtime may have started a thread of its own meanwhile.)
    during = threadCount();
    KJ_EXPECT(during >= before + workers, before, during);

    // The front door takes turns between the two connections.
    kj::HttpHeaderTable table;
    auto address = f.io.provider->getNetwork().parseAddress(f.ready.publicAddress)
        .wait(f.io.waitScope);
    auto client = kj::newHttpClient(f.io.provider->getTimer(), table, *address);
    for (int i = 0; i < 10; i++) {
      KJ_EXPECT(f.get(*client, callbacks.hostname, "/") == 200);
    }
    auto& status = runner.status();
    KJ_EXPECT(status.totalRequests() == 10, status.totalRequests());
    KJ_EXPECT(status.requestsOf(0) > 0 && status.requestsOf(1) > 0, status.requestsOf(0),
              status.requestsOf(1));
    KJ_EXPECT(status.responsesWithCode(200) == 10, status.responsesWithCode(200));
    KJ_EXPECT(status.readyConnections() == 2);

    runner.shutdown();
    KJ_EXPECT(kj::mv(done).wait(f.io.waitScope) == 0);
    KJ_EXPECT(status.readyConnections() == 0);
  }
  KJ_EXPECT(threadCount() == during - workers, during, threadCount());
}

KJ_TEST("workers: --threads 1 keeps both connections on the runner's loop") {
  Fixture f;
  uint before = threadCount();
  Callbacks callbacks;
  auto paf = kj::newPromiseAndFulfiller<void>();
  callbacks.allRegistered = kj::mv(paf.fulfiller);
  Runner runner(f.io, f.logger, f.options(1), callbacks);
  auto done = runner.run().eagerlyEvaluate(nullptr);
  auto timeout = f.io.provider->getTimer().afterDelay(20 * kj::SECONDS).then([]() {
    KJ_FAIL_ASSERT("the two connections did not register within 20 s");
  });
  paf.promise.exclusiveJoin(kj::mv(timeout)).wait(f.io.waitScope);
  KJ_EXPECT(threadCount() <= before + 1, before, threadCount());   // + a sanitizer's thread
  kj::HttpHeaderTable table;
  auto address = f.io.provider->getNetwork().parseAddress(f.ready.publicAddress)
      .wait(f.io.waitScope);
  auto client = kj::newHttpClient(f.io.provider->getTimer(), table, *address);
  for (int i = 0; i < 4; i++) KJ_EXPECT(f.get(*client, callbacks.hostname, "/") == 200);
  KJ_EXPECT(runner.status().totalRequests() == 4);
  runner.shutdown();
  KJ_EXPECT(kj::mv(done).wait(f.io.waitScope) == 0);
}

class ReleaseCounter final: public observe::LogSink {
public:
  explicit ReleaseCounter(std::atomic<uint>& count): count(count) {}
  void write(observe::LogLevel level, kj::StringPtr message,
             kj::ArrayPtr<const observe::LogField> fields) override {
    if (message == "Released the page-table entries of idle code") count++;
  }
private:
  std::atomic<uint>& count;
};

KJ_TEST("runner: releaseIdleCode drops idle code pages after registration and after requests") {
  for (bool release: {true, false}) {
    Fixture f;
    std::atomic<uint> releases{0};
    observe::LogConfig config{observe::LogLevel::DEBUG, nullptr, false};
    config.rateInterval = 0 * kj::SECONDS;
    config.sink = kj::heap<ReleaseCounter>(releases);
    observe::Logger logger(kj::mv(config));
    Callbacks callbacks;
    auto paf = kj::newPromiseAndFulfiller<void>();
    callbacks.allRegistered = kj::mv(paf.fulfiller);
    auto options = f.options(1);
    options.releaseIdleCode = release;
    options.memoryReturnInterval = 10 * kj::MILLISECONDS;
    Runner runner(f.io, logger, kj::mv(options), callbacks);
    auto done = runner.run().eagerlyEvaluate(nullptr);
    auto& timer = f.io.provider->getTimer();
    timer.timeoutAfter(20 * kj::SECONDS, kj::mv(paf.promise)).wait(f.io.waitScope);
    auto waitForRelease = [&](uint above) {
      // Bounded: the runner checks every 10 ms (off: 10 checks pass with none).
      for (int i = 0; i < (release ? 1000 : 20) && releases.load() <= above; i++) {
        timer.afterDelay(5 * kj::MILLISECONDS).wait(f.io.waitScope);
      }
      return releases.load() > above;
    };
    // A quiet interval after the registrations, then after requests.
    KJ_EXPECT(waitForRelease(0) == release, release);
    kj::HttpHeaderTable table;
    auto address = f.io.provider->getNetwork().parseAddress(f.ready.publicAddress)
        .wait(f.io.waitScope);
    auto client = kj::newHttpClient(timer, table, *address);
    uint before = releases.load();
    for (int i = 0; i < 3; i++) KJ_EXPECT(f.get(*client, callbacks.hostname, "/") == 200);
    KJ_EXPECT(waitForRelease(before) == release, release);
    // Nothing new happened: no more releases (10 checks).
    uint after = releases.load();
    timer.afterDelay(100 * kj::MILLISECONDS).wait(f.io.waitScope);
    KJ_EXPECT(releases.load() == after, after, releases.load());
    // The tunnel still serves once its code was dropped.
    KJ_EXPECT(f.get(*client, callbacks.hostname, "/") == 200);
    runner.shutdown();
    KJ_EXPECT(kj::mv(done).wait(f.io.waitScope) == 0);
  }
}

}  // namespace
}  // namespace cfqt::tunnel
