// The public API (include/cfqt/tunnel.h, include/cfqt/cfqt.h): a tunnel::Runner on its own
// thread and event loop. Other threads reach it only through the loop's kj::Executor and a
// kj::MutexGuarded state.

#include "cfqt/tunnel.h"
#include "cfqt/cfqt.h"

#include "tunnel/runner.h"

#include "edge/discovery.h"
#include "named/config.h"
#include "named/credentials.h"
#include "named/ingress.h"
#include "observe/log.h"
#include "origin/origin.h"

#include <kj/async-io.h>
#include <kj/debug.h>
#include <kj/mutex.h>
#include <kj/thread.h>

#include <sched.h>
#include <string.h>

namespace cfqt {

namespace {

kj::Duration toDuration(std::chrono::milliseconds ms) {
  return static_cast<int64_t>(ms.count()) * kj::MILLISECONDS;
}

struct SharedState {
  kj::Maybe<kj::String> url;
  kj::String hostname = kj::str("");
  bool finished = false;
  int exitCode = 0;
  bool stopRequested = false;
  kj::Maybe<kj::Own<const kj::Executor>> executor;
  int callers = 0;                    // threads inside onLoop() with the executor
  tunnel::Runner* runner = nullptr;   // only dereferenced on the loop thread
};

kj::String toKj(const std::string& s) { return kj::heapString(s.data(), s.size()); }
std::string toStd(kj::StringPtr s) { return std::string(s.begin(), s.size()); }

}  // namespace

class Tunnel::Impl final: private tunnel::RunnerCallbacks {
public:
  Impl(tunnel::RunnerOptions runnerOptions, observe::LogConfig logConfig)
      : options(kj::mv(runnerOptions)), logConfig(kj::mv(logConfig)) {
    thread = kj::heap<kj::Thread>([this]() { threadMain(); });
  }

  ~Impl() noexcept(false) {
    stop();
    thread = nullptr;   // joins
  }

  std::string waitForUrl(std::chrono::milliseconds timeout) {
    auto lock = state.lockExclusive();
    lock.wait([](const SharedState& s) { return s.url != nullptr || s.finished; },
              toDuration(timeout));
    KJ_IF_MAYBE(u, lock->url) return toStd(*u);
    return std::string();
  }

  std::string publicUrl() const {
    auto lock = state.lockShared();
    KJ_IF_MAYBE(u, lock->url) return toStd(*u);
    return std::string();
  }

  std::string hostname() const { return toStd(state.lockShared()->hostname); }

  int readyConnections() const {
    int n = 0;
    onLoop([&]() {
      auto runner = state.lockShared()->runner;
      n = runner == nullptr ? 0 : static_cast<int>(runner->status().readyConnections());
    });
    return n;
  }

  bool running() const { return !state.lockShared()->finished; }

  int stop() {
    {
      auto lock = state.lockExclusive();
      if (lock->finished) return lock->exitCode;
      lock->stopRequested = true;
    }
    onLoop([this]() {
      auto runner = state.lockShared()->runner;
      if (runner != nullptr) runner->shutdown();
    });
    return wait();
  }

  int wait() {
    auto lock = state.lockExclusive();
    lock.wait([](const SharedState& s) { return s.finished; });
    return lock->exitCode;
  }

  bool waitUntilReady(std::chrono::milliseconds timeout) {
    // Polls the loop's status at most every few milliseconds, bounded by `timeout`.
    auto deadline = std::chrono::steady_clock::now() + timeout;
    while (true) {
      if (readyConnections() > 0) return true;
      if (!running() || std::chrono::steady_clock::now() >= deadline) return false;
      auto lock = state.lockExclusive();
      lock.wait([](const SharedState& s) { return s.finished; }, 5 * kj::MILLISECONDS);
    }
  }

private:
  template <typename Func>
  void onLoop(Func&& func) const {
    // Runs `func` on the loop thread and waits for it; does nothing once the loop has ended.
    // runLoop() keeps its loop alive until every caller that took the executor is done: kj 0.9.2's
    // executeSync() waits forever if the target loop is destroyed before the event is queued.
    kj::Own<const kj::Executor> executor;
    {
      auto lock = state.lockExclusive();
      KJ_IF_MAYBE(e, lock->executor) {
        executor = (*e)->addRef();
        lock->callers++;
      } else {
        return;
      }
    }
    KJ_DEFER(state.lockExclusive()->callers--);
    kj::runCatchingExceptions([&]() { executor->executeSync(kj::fwd<Func>(func)); });
  }

  tunnel::RunnerOptions options;
  observe::LogConfig logConfig;
  kj::MutexGuarded<SharedState> state;
  kj::Own<kj::Thread> thread;   // last: joined first

  void tunnelCreated(kj::StringPtr url, kj::StringPtr host) override {
    auto lock = state.lockExclusive();
    lock->url = kj::str(url);
    lock->hostname = kj::str(host);
  }

  void threadMain() {
    int code = 1;
    KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() { code = runLoop(); })) {
      auto text = kj::str("cfqt: tunnel thread failed: ", e->getDescription(), "\n");
      if (::write(2, text.begin(), text.size()) < 0) {}
    }
    auto lock = state.lockExclusive();
    lock->finished = true;
    lock->exitCode = code;
    lock->executor = nullptr;
    lock->runner = nullptr;
  }

  int runLoop() {
    observe::Logger logger(kj::mv(logConfig));
    observe::LogCallback logCallback(logger);
    auto io = kj::setupAsyncIo();
    tunnel::Runner runner(io, logger, kj::mv(options), *this);
    bool stopNow;
    {
      auto lock = state.lockExclusive();
      lock->executor = kj::getCurrentThreadExecutor().addRef();
      lock->runner = &runner;
      stopNow = lock->stopRequested;
    }
    KJ_DEFER({
      {
        auto lock = state.lockExclusive();
        lock->runner = nullptr;
        lock->executor = nullptr;
      }
      // No new caller can take the executor now; serve those that already did (their events
      // find runner == nullptr) before the loop is destroyed. The window is a few instructions
      // of another thread, so this loop ends almost at once.
      while (state.lockShared()->callers > 0) {
        io.waitScope.poll();
        sched_yield();
      }
    });
    auto done = runner.run();
    if (stopNow) runner.shutdown();
    return done.wait(io.waitScope);
  }
};

Tunnel::Tunnel(std::unique_ptr<Impl> implParam): impl(std::move(implParam)) {}
Tunnel::~Tunnel() {}

std::unique_ptr<Tunnel> Tunnel::start(const TunnelOptions& o) {
  tunnel::RunnerOptions r;
  if (o.helloWorld) {
    r.origin = origin::helloWorldOrigin();
    r.service = kj::str("hello_world");
  } else if (!o.url.empty()) {
    auto parsed = origin::parseOriginUrl(toKj(o.url));
    KJ_SWITCH_ONEOF(parsed) {
      KJ_CASE_ONEOF(error, kj::String) throw TunnelError("cfqt: invalid origin: " + toStd(error));
      KJ_CASE_ONEOF(config, origin::OriginConfig) r.origin = kj::mv(config);
    }
    r.service = o.url.find("://") == std::string::npos && o.url.rfind("unix:", 0) != 0
        ? kj::str("http://", toKj(o.url)) : toKj(o.url);
  } else if (!o.unixSocket.empty()) {
    r.origin = origin::unixSocketOrigin(toKj(o.unixSocket));
    r.service = kj::str("unix:", toKj(o.unixSocket));
  } else if (!o.token.empty() || !o.credentialsJson.empty() || !o.credentialsFile.empty()) {
    // A named tunnel without a single origin: its ingress rules, or 503 until a remote one.
    r.origin = origin::httpStatusOrigin(503);
    r.service = kj::str("http_status:503");
  } else {
    throw TunnelError("cfqt: nothing to expose: set url, helloWorld or unixSocket");
  }
  if (!o.token.empty() || !o.credentialsJson.empty() || !o.credentialsFile.empty()) {
    auto credentials = !o.token.empty() ? named::parseToken(toKj(o.token))
        : !o.credentialsJson.empty()
            ? named::parseCredentialsJson(toKj(o.credentialsJson), "credentialsJson")
            : named::readCredentialsFile(toKj(o.credentialsFile));
    KJ_SWITCH_ONEOF(credentials) {
      KJ_CASE_ONEOF(error, kj::String) throw TunnelError("cfqt: " + toStd(error));
      KJ_CASE_ONEOF(c, named::TunnelCredentials) r.namedTunnel = kj::mv(c);
    }
    if (!o.ingress.empty()) {
      auto config = kj::heap<named::TunnelConfig>();
      config->source = kj::str("TunnelOptions::ingress");
      for (auto& rule: o.ingress) {
        named::IngressRuleConfig c;
        c.hostname = toKj(rule.hostname);
        c.path = toKj(rule.path);
        c.service = toKj(rule.service);
        config->ingress.add(kj::mv(c));
      }
      KJ_IF_MAYBE(error, named::validateIngress(config->ingress)) {
        throw TunnelError("cfqt: invalid ingress rules: " + toStd(*error));
      }
      r.ingressConfig = kj::mv(config);
    }
  } else if (!o.ingress.empty()) {
    throw TunnelError("cfqt: ingress rules are for named tunnels: set token or credentials");
  }
  if (!o.httpHostHeader.empty()) r.origin.httpHostHeader = toKj(o.httpHostHeader);
  if (o.haConnections < 1 || o.haConnections > 4) {
    throw TunnelError("cfqt: haConnections must be between 1 and 4");
  }
  if (!o.quickService.empty()) r.api.serviceUrl = toKj(o.quickService);
  for (auto& e: o.edges) r.discovery.edges.add(toKj(e));
  if (!o.edgeCaFile.empty()) r.edge.edgeCaFile = toKj(o.edgeCaFile);
  r.edge.transport.maxIdleTimeout = toDuration(o.quicIdleTimeout);
  r.edge.transport.keepAlivePeriod = toDuration(o.quicKeepAlivePeriod);
  r.clientVersion = toKj(o.clientVersion);
  r.haConnections = o.haConnections;
  r.backoff = tunnel::BackoffConfig{toDuration(o.backoffBase),
                                    static_cast<kj::uint>(o.retries < 0 ? 0 : o.retries)};
  r.haStagger = kj::min(1 * kj::SECONDS, toDuration(o.backoffBase));
  r.gracePeriod = toDuration(o.gracePeriod);
  r.metrics = o.metrics;
  if (!o.metricsAddress.empty()) r.metricsAddress = toKj(o.metricsAddress);
  KJ_IF_MAYBE(protocol, tunnel::parseProtocol(toKj(o.protocol))) {
    r.dialer.protocol = *protocol;
  } else {
    throw TunnelError("cfqt: protocol must be quic, http2 or auto, got \"" + o.protocol + "\"");
  }
  r.configurationFlags.add(tunnel::ConfigFlag{kj::str("protocol"), toKj(o.protocol)});

  observe::LogConfig logConfig;
  KJ_IF_MAYBE(level, observe::parseLogLevel(toKj(o.logLevel))) {
    logConfig.level = *level;
  } else {
    throw TunnelError("cfqt: logLevel must be debug, info, warn, error or fatal");
  }
  if (!o.logFile.empty()) logConfig.file = toKj(o.logFile);
  logConfig.toStderr = o.logToStderr;
  return std::make_unique<Tunnel>(std::make_unique<Impl>(kj::mv(r), kj::mv(logConfig)));
}

std::string Tunnel::waitForUrl(std::chrono::milliseconds timeout) {
  return impl->waitForUrl(timeout);
}
bool Tunnel::waitUntilReady(std::chrono::milliseconds timeout) {
  return impl->waitUntilReady(timeout);
}
std::string Tunnel::publicUrl() const { return impl->publicUrl(); }
std::string Tunnel::hostname() const { return impl->hostname(); }
int Tunnel::readyConnections() const { return impl->readyConnections(); }
bool Tunnel::running() const { return impl->running(); }
int Tunnel::stop() { return impl->stop(); }
int Tunnel::wait() { return impl->wait(); }

}  // namespace cfqt

// =============================================================================================
// C API

struct cfqt_tunnel {
  std::unique_ptr<cfqt::Tunnel> tunnel;
};

namespace {

void copyOut(const std::string& text, char* out, size_t size) {
  if (out == nullptr || size == 0) return;
  size_t n = text.size() < size - 1 ? text.size() : size - 1;
  memcpy(out, text.data(), n);
  out[n] = '\0';
}

}  // namespace

extern "C" {

void cfqt_options_init(cfqt_options* options) {
  memset(options, 0, sizeof(*options));
  options->ha_connections = 2;
  options->grace_period_ms = 30000;
  options->backoff_base_ms = 1000;
}

cfqt_tunnel* cfqt_tunnel_start(const cfqt_options* options, char* error, size_t errorSize) {
  try {
    cfqt_options defaults;
    if (options == nullptr) {
      cfqt_options_init(&defaults);
      options = &defaults;
    }
    cfqt::TunnelOptions o;
    if (options->url != nullptr) o.url = options->url;
    o.helloWorld = options->hello_world != 0;
    if (options->quick_service != nullptr) o.quickService = options->quick_service;
    for (size_t i = 0; i < options->edge_count; i++) o.edges.push_back(options->edges[i]);
    if (options->edge_ca_file != nullptr) o.edgeCaFile = options->edge_ca_file;
    o.haConnections = options->ha_connections;
    o.gracePeriod = std::chrono::milliseconds(options->grace_period_ms);
    o.metrics = options->metrics != 0;
    if (options->metrics_address != nullptr) o.metricsAddress = options->metrics_address;
    if (options->log_level != nullptr) o.logLevel = options->log_level;
    if (options->unix_socket != nullptr) o.unixSocket = options->unix_socket;
    if (options->backoff_base_ms > 0) {
      o.backoffBase = std::chrono::milliseconds(options->backoff_base_ms);
    }
    if (options->protocol != nullptr) o.protocol = options->protocol;
    if (options->token != nullptr) o.token = options->token;
    if (options->credentials_json != nullptr) o.credentialsJson = options->credentials_json;
    if (options->credentials_file != nullptr) o.credentialsFile = options->credentials_file;
    for (size_t i = 0; i < options->ingress_count; i++) {
      auto& rule = options->ingress[i];
      o.ingress.push_back({rule.hostname != nullptr ? rule.hostname : "",
                           rule.path != nullptr ? rule.path : "",
                           rule.service != nullptr ? rule.service : ""});
    }
    auto handle = std::make_unique<cfqt_tunnel>();
    handle->tunnel = cfqt::Tunnel::start(o);
    return handle.release();
  } catch (const std::exception& e) {
    copyOut(e.what(), error, errorSize);
    return nullptr;
  }
}

int cfqt_tunnel_wait_url(cfqt_tunnel* t, int timeoutMs, char* url, size_t urlSize) {
  auto text = t->tunnel->waitForUrl(std::chrono::milliseconds(timeoutMs));
  if (text.empty()) return -1;
  if (url == nullptr || urlSize <= text.size()) return -2;
  copyOut(text, url, urlSize);
  return 0;
}

int cfqt_tunnel_wait_ready(cfqt_tunnel* t, int timeoutMs) {
  return t->tunnel->waitUntilReady(std::chrono::milliseconds(timeoutMs)) ? 1 : 0;
}

int cfqt_tunnel_ready_connections(cfqt_tunnel* t) { return t->tunnel->readyConnections(); }

int cfqt_tunnel_stop(cfqt_tunnel* t) { return t->tunnel->stop(); }

void cfqt_tunnel_free(cfqt_tunnel* t) {
  std::unique_ptr<cfqt_tunnel> owned(t);   // stops and joins in ~Tunnel
}

}  // extern "C"
