// tunnel suite: the cfqt client alone under load. This process plays the edge with the
// emulator's parts (quick-tunnel API + QUIC/HTTP/2 edge, no front door) and opens request streams
// straight to a `cfqt` child process (fork/exec, as the e2e tests run it), whose origin is a
// forked process answering from memory. The client's CPU is read from /proc (every thread), the
// edge's with getrusage(), so one can see the edge is not the bottleneck.
//
// Figures (issue 15): tunnel.reg_ms (fork/exec of the client -> the edge's answer to its first
// registerConnection, CLOCK_MONOTONIC, median of 5 launches or --launches N), tunnel.rps_c1,
// tunnel.rps_c64, tunnel.serial_p50_us, tunnel.serial_p99_us, tunnel.added_p50_us (tunnel minus
// direct to the origin, measured interleaved), tunnel.cpu_s_per_10k (client, 1 KiB responses at
// concurrency 64), tunnel.bulk_MBps and tunnel.cpu_s_per_GB (one 1 GiB response),
// tunnel.rss_idle_MiB, tunnel.rss_anon_idle_MiB (idle with every HA connection registered),
// tunnel.rss_peak_MiB (VmHWM at the end), tunnel.edge_cpu_s (this process during the
// concurrency-64 phase; compare with tunnel.c64_s, its wall time). Session 7 (serial latency):
// tunnel.serial_cpu_us (the client's CPU over the serial phase per tunnelled request; with
// --busy-poll it includes the polling that follows each request), tunnel.idle_cpu_ms_per_s (the
// client's CPU while idle, registered, per second of wall time). Memory over time:
// tunnel.first_req_us and tunnel.second_req_us (the first two requests after the idle start;
// *_minflt: the client's minor page faults during each), tunnel.rss_after1_MiB / pss_after1_MiB
// (idle 3 s after them), tunnel.rss_loaded_MiB (at the end of the concurrency-64 phase),
// tunnel.rss_afterload_MiB / pss_afterload_MiB (idle 3 s after it: the steady state) and
// tunnel.first_req_afterload_us / _minflt. --memory-only skips the serial and bulk phases;
// --idle-hook runs a command at each idle point (bench/rss-map).

#include "bench.h"

#include "emulator/emulator.h"
#include "wire/http-metadata.h"

#include <kj/async-io.h>
#include <kj/compat/http.h>
#include <kj/debug.h>
#include <kj/filesystem.h>
#include <kj/vector.h>

#include <algorithm>
#include <dirent.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdlib.h>
#include <sched.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

namespace cfqt::bench {
namespace {

constexpr size_t SMALL = 1024;            // the small response: 1 KiB
constexpr size_t CHUNK = 64 * 1024;
constexpr uint64_t BULK = uint64_t(1) << 30;
constexpr unsigned CONCURRENCY = 64;
constexpr const char* SYSTEM_BUNDLE = "/etc/ssl/certs/ca-certificates.crt";

double nowSeconds() {
  return double((kj::systemPreciseMonotonicClock().now() - kj::origin<kj::TimePoint>()) /
                kj::NANOSECONDS) / 1e9;
}

// ---- the origin: a forked process with a kj HTTP server -------------------------------------

class MemoryOrigin final: public kj::HttpService {
  // /small: 1 KiB; /big?n=N: N bytes. Request bodies are not expected.
public:
  explicit MemoryOrigin(const kj::HttpHeaderTable& table): table(table) {}

  kj::Promise<void> request(kj::HttpMethod method, kj::StringPtr url,
                            const kj::HttpHeaders& headers, kj::AsyncInputStream& requestBody,
                            Response& response) override {
    uint64_t size = SMALL;
    if (url.startsWith("/big?n=")) size = url.slice(7).parseAs<uint64_t>();
    kj::HttpHeaders out(table);
    auto body = response.send(200, "OK", out, size);
    auto promise = send(*body, size);
    return promise.attach(kj::mv(body));
  }

private:
  const kj::HttpHeaderTable& table;
  kj::byte source[CHUNK] = {};

  kj::Promise<void> send(kj::AsyncOutputStream& out, uint64_t remaining) {
    if (remaining == 0) return kj::READY_NOW;
    size_t n = kj::min(uint64_t(sizeof(source)), remaining);
    return out.write(source, n).then([this, &out, remaining, n]() {
      return send(out, remaining - n);
    });
  }
};

int listenLoopback(uint16_t& port) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  KJ_SYSCALL(fd);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  KJ_SYSCALL(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)));
  KJ_SYSCALL(listen(fd, 1024));
  socklen_t len = sizeof(addr);
  KJ_SYSCALL(getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len));
  port = ntohs(addr.sin_port);
  return fd;
}

pid_t startOrigin(uint16_t& port) {
  // Forked before this process has an event loop or threads.
  int fd = listenLoopback(port);
  pid_t pid = fork();
  KJ_SYSCALL(pid);
  if (pid == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    auto io = kj::setupAsyncIo();
    kj::HttpHeaderTable table;
    MemoryOrigin service(table);
    kj::HttpServer server(io.provider->getTimer(), table, service);
    auto listener = io.lowLevelProvider->wrapListenSocketFd(fd);
    server.listenHttp(*listener).wait(io.waitScope);
    _exit(0);
  }
  close(fd);
  return pid;
}

// ---- the client process ----------------------------------------------------------------------

double clientCpuSeconds(pid_t pid) {
  // Sum of every thread's on-CPU time (user + system), from /proc/PID/task/*/schedstat.
  auto dirName = kj::str("/proc/", pid, "/task");
  DIR* dir = opendir(dirName.cStr());
  if (dir == nullptr) return 0;
  uint64_t total = 0;
  while (auto entry = readdir(dir)) {
    if (entry->d_name[0] == '.') continue;
    auto path = kj::str(dirName, "/", entry->d_name, "/schedstat");
    int fd = open(path.cStr(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) continue;
    char buffer[128];
    ssize_t n = read(fd, buffer, sizeof(buffer) - 1);
    close(fd);
    if (n <= 0) continue;
    buffer[n] = 0;
    total += strtoull(buffer, nullptr, 10);
  }
  closedir(dir);
  return double(total) / 1e9;
}

double statusKiB(pid_t pid, kj::StringPtr field, kj::StringPtr file = "status") {
  // A "Field:  N kB" line of /proc/PID/<file>, in KiB (0 if absent).
  auto path = kj::str("/proc/", pid, "/", file);
  int fd = open(path.cStr(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return 0;
  char buffer[8192];
  ssize_t n = read(fd, buffer, sizeof(buffer) - 1);
  close(fd);
  if (n <= 0) return 0;
  buffer[n] = 0;
  auto key = kj::str("\n", field, ":");
  const char* at = strstr(buffer, key.cStr());
  if (at == nullptr) return 0;
  return strtod(at + key.size(), nullptr);
}

double minorFaults(pid_t pid) {
  // Field 10 of /proc/PID/stat (minflt), summed over the process's threads by the kernel.
  auto path = kj::str("/proc/", pid, "/stat");
  int fd = open(path.cStr(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return 0;
  char buffer[1024];
  ssize_t n = read(fd, buffer, sizeof(buffer) - 1);
  close(fd);
  if (n <= 0) return 0;
  buffer[n] = 0;
  const char* p = strrchr(buffer, ')');   // the command name may hold spaces
  if (p == nullptr) return 0;
  for (int field = 2; field < 10 && p != nullptr; field++) p = strchr(p + 1, ' ');
  return p == nullptr ? 0 : strtod(p + 1, nullptr);
}

double edgeCpuSeconds() {
  rusage usage;
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_utime.tv_sec + usage.ru_stime.tv_sec +
         (usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) / 1e6;
}

class Client {
public:
  Client(kj::ArrayPtr<const kj::StringPtr> argv, kj::StringPtr logPath,
         kj::Maybe<kj::StringPtr> systemBundle) {
    // With `systemBundle`, the child gets a private mount namespace in which that file is bind-
    // mounted over the system trust store, so the client runs with its default trust roots.
    kj::Vector<const char*> args;
    for (auto& arg: argv) args.add(arg.cStr());
    args.add(nullptr);
    pid = fork();
    KJ_SYSCALL(pid);
    if (pid == 0) {
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      KJ_IF_MAYBE(bundle, systemBundle) {
        if (unshare(CLONE_NEWNS) != 0 ||
            mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0 ||
            mount(bundle->cStr(), SYSTEM_BUNDLE, nullptr, MS_BIND, nullptr) != 0) {
          _exit(126);
        }
      }
      int log = open(logPath.cStr(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
      if (log >= 0) {
        dup2(log, 1);
        dup2(log, 2);
      }
      int null = open("/dev/null", O_RDONLY | O_CLOEXEC);
      if (null >= 0) dup2(null, 0);
      execv(args[0], const_cast<char* const*>(args.begin()));
      _exit(127);
    }
  }
  KJ_DISALLOW_COPY(Client);
  ~Client() noexcept(false) {
    kill(pid, SIGKILL);
    int status;
    waitpid(pid, &status, 0);
  }

  pid_t pid;
};

// ---- the edge side: registrations and request streams ----------------------------------------

class Harness {
public:
  Harness(kj::AsyncIoContext& io, emulator::Emulator& emu): io(io), emu(emu) {
    emu.registry().onRegistered([this](emulator::ConnectionRecord& record) {
      if (registered++ == 0) firstRegistration = nowSeconds();
      tunnel = &record.tunnel;
      if (registered >= target) {
        KJ_IF_MAYBE(f, fulfiller) {
          (*f)->fulfill();
          fulfiller = nullptr;
        }
      }
    });
  }

  void expect(unsigned count) {
    registered = 0;
    target = count;
    tunnel = nullptr;
    auto paf = kj::newPromiseAndFulfiller<void>();
    fulfiller = kj::mv(paf.fulfiller);
    waiting = kj::mv(paf.promise);
  }
  // Call before starting a client.

  void wait(kj::StringPtr what, kj::StringPtr logPath) {
    auto promise = KJ_ASSERT_NONNULL(kj::mv(waiting));
    waiting = nullptr;
    io.provider->getTimer().timeoutAfter(20 * kj::SECONDS, kj::mv(promise))
        .catch_([&](kj::Exception&& e) {
          auto log = kj::str("(unreadable)");
          int fd = open(logPath.cStr(), O_RDONLY | O_CLOEXEC);
          if (fd >= 0) {
            char buffer[4096];
            ssize_t n = read(fd, buffer, sizeof(buffer));
            if (n > 0) log = kj::heapString(buffer, n);
            close(fd);
          }
          KJ_FAIL_REQUIRE("the client did not register in time", what, e, log);
        }).wait(io.waitScope);
  }

  double firstRegistration = 0;
  emulator::IssuedTunnel* tunnel = nullptr;

  kj::Promise<uint64_t> fetch(kj::StringPtr path) {
    // One GET through a tunnel connection the edge picks round-robin; resolves to the body size.
    auto& tunnelRef = KJ_ASSERT_NONNULL(tunnel);
    auto& record = KJ_REQUIRE_NONNULL(emu.registry().pick(tunnelRef), "no live connection");
    auto& connection = KJ_ASSERT_NONNULL(record.connection);
    auto dest = kj::str("http://", tunnelRef.hostname, path);
    return connection.openExchange().then(
        [this, dest = kj::mv(dest)](kj::Own<emulator::TunnelExchange> exchange) mutable {
      auto& ex = *exchange;
      wire::HttpRequestHead head;
      head.dest = kj::mv(dest);
      head.method = kj::str("GET");
      head.host = kj::heapString(KJ_ASSERT_NONNULL(tunnel).hostname);
      // What the front door forwards for a plain `curl` GET (bench/e2e's visitors).
      static const char* const HEADERS[][2] = {
          {"User-Agent", "curl/7.88.1"}, {"Accept", "*/*"}, {"Cf-Ray", "8c2f4e1a9b3d0001-EMU"},
          {"Cf-Connecting-Ip", "127.0.0.1"}, {"X-Forwarded-For", "127.0.0.1"},
          {"X-Forwarded-Proto", "http"}, {"Cf-Visitor", "{\"scheme\":\"http\"}"}};
      for (auto& h: HEADERS) head.headers.add(wire::Header{kj::str(h[0]), kj::str(h[1])});
      return ex.sendHead(head).then([&ex]() {
        ex.shutdownWrite();
        return ex.readResponseHead();
      }).then([this, &ex](kj::OneOf<wire::HttpResponseHead, wire::WireError> decoded) {
        KJ_IF_MAYBE(h, decoded.tryGet<wire::HttpResponseHead>()) {
          KJ_REQUIRE(h->status == 200 && h->error == nullptr, "request failed", h->status);
        } else {
          KJ_FAIL_REQUIRE("bad response head");
        }
        auto buffer = kj::heapArray<kj::byte>(CHUNK);
        auto promise = drain(ex, buffer, 0);
        return promise.attach(kj::mv(buffer));
      }).attach(kj::mv(exchange));
    });
  }

private:
  kj::AsyncIoContext& io;
  emulator::Emulator& emu;
  unsigned registered = 0;
  unsigned target = 1;
  kj::Maybe<kj::Own<kj::PromiseFulfiller<void>>> fulfiller;
  kj::Maybe<kj::Promise<void>> waiting;

  static kj::Promise<uint64_t> drain(kj::AsyncInputStream& in, kj::ArrayPtr<kj::byte> buffer,
                                     uint64_t so) {
    return in.tryRead(buffer.begin(), 1, buffer.size())
        .then([&in, buffer, so](size_t n) -> kj::Promise<uint64_t> {
      if (n == 0) return so;
      return drain(in, buffer, so + n);
    });
  }
};

template <typename T>
T settle(kj::Promise<T>&& promise, kj::WaitScope& waitScope, bool spin) {
  // --spin: poll (run what is ready, epoll_wait with no timeout) until it settles.
  if (spin) {
    while (!promise.poll(waitScope)) {}
  }
  return promise.wait(waitScope);
}

double percentile(kj::Vector<double>& values, double p) {
  std::sort(values.begin(), values.end());
  size_t index = kj::min(values.size() - 1, size_t(p * values.size()));
  return values[index];
}

void runIdleHook(const Options& options, pid_t pid, kj::StringPtr stage) {
  KJ_IF_MAYBE(hook, options.idleHook) {
    auto command = kj::str("export CFQT_CLIENT_PID=", pid, " CFQT_IDLE_STAGE=", stage, "; ",
                           *hook);
    if (system(command.cStr()) != 0) {
      fprintf(stderr, "tunnel: --idle-hook failed at %s\n", stage.cStr());
    }
  }
}

kj::String selfDirectory() {
  char path[4096];
  ssize_t n = readlink("/proc/self/exe", path, sizeof(path) - 1);
  KJ_SYSCALL(n);
  path[n] = 0;
  char* slash = strrchr(path, '/');
  if (slash != nullptr) *slash = 0;
  return kj::str(path);
}

}  // namespace

void runTunnelBench(Reporter& reporter) {
  auto& options = reporter.options;
  auto cfqtPath = options.cfqt.map([](kj::String& p) { return kj::heapString(p); })
      .orDefault([]() { return kj::str(selfDirectory(), "/cfqt"); });
  KJ_REQUIRE(access(cfqtPath.cStr(), X_OK) == 0, "no cfqt binary; pass --cfqt PATH", cfqtPath);
  kj::StringPtr prefix = "tunnel.";  // the same names for both protocols
  fprintf(stderr, "tunnel: --protocol %s, --ha-connections %u\n", options.protocol.cStr(),
          options.haConnections);

  uint16_t originPort = 0;
  pid_t originPid = startOrigin(originPort);
  KJ_DEFER({
    kill(originPid, SIGKILL);
    int status;
    waitpid(originPid, &status, 0);
  });

  char tmpTemplate[] = "/tmp/cfqt-bench-tunnel-XXXXXX";
  KJ_ASSERT(mkdtemp(tmpTemplate) != nullptr);
  kj::String tmp = kj::str(tmpTemplate);
  KJ_DEFER({
    auto command = kj::str("rm -rf '", tmp, "'");
    if (system(command.cStr()) != 0) {}
  });

  auto io = kj::setupAsyncIo();
  emulator::EmulatorOptions emuOptions;
  emuOptions.certificates.stateDir = kj::str(tmp, "/edge-state");
  // One edge address per HA connection (the client uses each address once).
  for (unsigned i = 0; i < options.haConnections; i++) {
    emuOptions.edgeListen.add(kj::str("127.0.0.", i + 1, ":0"));
  }
  emulator::Emulator emu(io, kj::mv(emuOptions));
  auto ready = emu.start().wait(io.waitScope);
  Harness harness(io, emu);
  auto& timer = io.provider->getTimer();

  auto originUrl = kj::str("http://127.0.0.1:", originPort);
  auto api = kj::str("http://", ready.api);
  auto ha = kj::str(options.haConnections);
  auto logPath = kj::str(tmp, "/client.log");
  // The client's trust roots: its defaults (embedded Cloudflare roots + the system store, with
  // the emulator's CA appended to the system store in a private mount namespace) when this runs
  // as root, else --cacert.
  kj::Maybe<kj::String> systemBundle;
  if (geteuid() == 0 && !options.cacert) {
    auto fs = kj::newDiskFilesystem();
    auto& root = fs->getRoot();
    auto bundle = kj::str(root.openFile(kj::Path::parse(SYSTEM_BUNDLE + 1))->readAllText(),
                          "\n", root.openFile(fs->getCurrentPath().evalNative(ready.ca))
                              ->readAllText());
    auto path = kj::str(tmp, "/system-bundle.pem");
    root.openFile(fs->getCurrentPath().evalNative(path), kj::WriteMode::CREATE)
        ->writeAll(bundle);
    systemBundle = kj::mv(path);
  }
  fprintf(stderr, "tunnel: trust roots: %s\n",
          systemBundle == nullptr ? "--cacert" : "default (system store + emulator CA)");
  kj::Vector<kj::StringPtr> argv;
  argv.addAll(std::initializer_list<kj::StringPtr>{
      cfqtPath, "--url", originUrl, "--quick-service", api, "--metrics", "127.0.0.1:0",
      "--protocol", options.protocol, "--ha-connections", ha, "--loglevel", "warn"});
  for (auto& edge: ready.edges) {
    argv.add("--edge");
    argv.add(edge);
  }
  if (systemBundle == nullptr) {
    argv.add("--cacert");
    argv.add(ready.ca);
  }
  auto bundleArg = systemBundle.map([](kj::String& s) -> kj::StringPtr { return s; });

  // exec -> first registration, median of options.launches launches.
  {
    kj::Vector<double> times;
    for (unsigned i = 0; i < options.launches; i++) {
      harness.expect(1);
      double start = nowSeconds();
      Client client(argv, logPath, bundleArg);
      harness.wait("first registration", logPath);
      times.add((harness.firstRegistration - start) * 1e3);
    }
    reporter.figure(kj::str(prefix, "reg_ms"), percentile(times, 0.5), "ms");
  }

  harness.expect(options.haConnections);
  Client client(argv, logPath, bundleArg);
  harness.wait("every HA connection", logPath);

  // Idle: every connection registered, nothing served yet.
  double idleCpu0 = clientCpuSeconds(client.pid);
  double idleStart = nowSeconds();
  timer.afterDelay(1500 * kj::MILLISECONDS).wait(io.waitScope);
  reporter.figure(kj::str(prefix, "idle_cpu_ms_per_s"),
                  (clientCpuSeconds(client.pid) - idleCpu0) * 1e3 / (nowSeconds() - idleStart),
                  "ms");
  reporter.figure(kj::str(prefix, "rss_idle_MiB"), statusKiB(client.pid, "VmRSS") / 1024, "MiB");
  reporter.figure(kj::str(prefix, "rss_anon_idle_MiB"), statusKiB(client.pid, "RssAnon") / 1024,
                  "MiB");
  reporter.figure(kj::str(prefix, "pss_idle_MiB"),
                  statusKiB(client.pid, "Pss", "smaps_rollup") / 1024, "MiB");
  runIdleHook(options, client.pid, "startup");
  if (options.startupOnly) return;

  // The first request after idle (code the idle client does not run is faulted in again), the
  // one after it, then idle again. The client's idle check runs every second; 3 s covers it.
  double faults = 0;   // the client's minor page faults during the last timedFetch()
  auto timedFetch = [&]() {
    double faults0 = minorFaults(client.pid);
    double start = nowSeconds();
    KJ_ASSERT(harness.fetch("/small").wait(io.waitScope) == SMALL);
    double us = (nowSeconds() - start) * 1e6;
    faults = minorFaults(client.pid) - faults0;
    return us;
  };
  reporter.figure(kj::str(prefix, "first_req_us"), timedFetch(), "us");
  reporter.figure(kj::str(prefix, "first_req_minflt"), faults, "faults");
  reporter.figure(kj::str(prefix, "second_req_us"), timedFetch(), "us");
  reporter.figure(kj::str(prefix, "second_req_minflt"), faults, "faults");
  auto idleFigures = [&](kj::StringPtr stage) {
    timer.afterDelay(3 * kj::SECONDS).wait(io.waitScope);
    reporter.figure(kj::str(prefix, "rss_", stage, "_MiB"),
                    statusKiB(client.pid, "VmRSS") / 1024, "MiB");
    reporter.figure(kj::str(prefix, "pss_", stage, "_MiB"),
                    statusKiB(client.pid, "Pss", "smaps_rollup") / 1024, "MiB");
    runIdleHook(options, client.pid, stage);
  };
  idleFigures("after1");

  // Warm-up, then serial requests, interleaved with the same requests straight to the origin.
  if (!options.memoryOnly) for (unsigned i = 0; i < 200; i++) {
    harness.fetch("/small").wait(io.waitScope);
  }
  if (!options.memoryOnly) {
    kj::HttpHeaderTable table;
    auto address = io.provider->getNetwork().parseAddress("127.0.0.1", originPort)
        .wait(io.waitScope);
    auto connection = address->connect().wait(io.waitScope);
    auto direct = kj::newHttpClient(table, *connection);
    kj::Vector<double> tunnelUs, directUs;
    double tunnelTotal = 0;
    double serialCpu0 = clientCpuSeconds(client.pid);
    for (unsigned round = 0; round < options.serialRounds; round++) {
      for (unsigned i = 0; i < 100; i++) {
        double start = nowSeconds();
        auto response = settle(direct->request(kj::HttpMethod::GET, "/small",
                                               kj::HttpHeaders(table)).response,
                               io.waitScope, options.spin);
        auto body = settle(response.body->readAllBytes(), io.waitScope, options.spin);
        KJ_ASSERT(response.statusCode == 200 && body.size() == SMALL);
        directUs.add((nowSeconds() - start) * 1e6);
      }
      for (unsigned i = 0; i < 100; i++) {
        double start = nowSeconds();
        auto size = settle(harness.fetch("/small"), io.waitScope, options.spin);
        KJ_ASSERT(size == SMALL);
        double elapsed = nowSeconds() - start;
        tunnelTotal += elapsed;
        tunnelUs.add(elapsed * 1e6);
      }
    }
    double serialCpu = clientCpuSeconds(client.pid) - serialCpu0;
    reporter.figure(kj::str(prefix, "rps_c1"), tunnelUs.size() / tunnelTotal, "req/s");
    double directP50 = percentile(directUs, 0.5);
    reporter.figure(kj::str(prefix, "serial_p50_us"), percentile(tunnelUs, 0.5), "us");
    reporter.figure(kj::str(prefix, "serial_p99_us"), percentile(tunnelUs, 0.99), "us");
    reporter.figure(kj::str(prefix, "direct_p50_us"), directP50, "us");
    reporter.figure(kj::str(prefix, "added_p50_us"), percentile(tunnelUs, 0.5) - directP50,
                    "us");
    reporter.figure(kj::str(prefix, "serial_cpu_us"), serialCpu / tunnelUs.size() * 1e6, "us");
  }

  // Concurrency 64.
  {
    uint64_t issued = 0;
    uint64_t total = options.requests;
    kj::Function<kj::Promise<void>()> worker = [&]() -> kj::Promise<void> {
      if (issued >= total) return kj::READY_NOW;
      issued++;
      return harness.fetch("/small").then([&](uint64_t size) {
        KJ_ASSERT(size == SMALL);
        return worker();
      });
    };
    double cpu0 = clientCpuSeconds(client.pid);
    double faults0 = minorFaults(client.pid);
    double edge0 = edgeCpuSeconds();
    double start = nowSeconds();
    kj::Vector<kj::Promise<void>> workers;
    for (unsigned i = 0; i < CONCURRENCY; i++) workers.add(worker());
    kj::joinPromises(workers.releaseAsArray()).wait(io.waitScope);
    double wall = nowSeconds() - start;
    double cpu = clientCpuSeconds(client.pid) - cpu0;
    double edge = edgeCpuSeconds() - edge0;
    reporter.figure(kj::str(prefix, "rps_c64"), total / wall, "req/s");
    reporter.figure(kj::str(prefix, "cpu_s_per_10k"), cpu / total * 1e4, "s");
    reporter.figure(kj::str(prefix, "edge_cpu_s"), edge, "s");
    reporter.figure(kj::str(prefix, "c64_s"), wall, "s");
    reporter.figure(kj::str(prefix, "c64_minflt"), minorFaults(client.pid) - faults0, "faults");
    reporter.figure(kj::str(prefix, "rss_loaded_MiB"), statusKiB(client.pid, "VmRSS") / 1024,
                    "MiB");
  }

  // Idle after the load (steady state), and the first request after that idle.
  idleFigures("afterload");
  reporter.figure(kj::str(prefix, "first_req_afterload_us"), timedFetch(), "us");
  reporter.figure(kj::str(prefix, "first_req_afterload_minflt"), faults, "faults");
  if (options.memoryOnly) return;

  // One 1 GiB response.
  {
    double cpu0 = clientCpuSeconds(client.pid);
    double start = nowSeconds();
    auto size = harness.fetch(kj::str("/big?n=", BULK)).wait(io.waitScope);
    double wall = nowSeconds() - start;
    double cpu = clientCpuSeconds(client.pid) - cpu0;
    KJ_ASSERT(size == BULK);
    reporter.figure(kj::str(prefix, "bulk_MBps"), BULK / 1e6 / wall, "MB/s");
    reporter.figure(kj::str(prefix, "cpu_s_per_GB"), cpu / (BULK / 1e9), "s");
  }

  reporter.figure(kj::str(prefix, "rss_peak_MiB"), statusKiB(client.pid, "VmHWM") / 1024, "MiB");
}

}  // namespace cfqt::bench
