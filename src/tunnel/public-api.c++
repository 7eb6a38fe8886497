// The public API (include/cfqt/tunnel.h, include/cfqt/cfqt.h): a tunnel::Runner on its own
// thread and event loop. Other threads reach it only through the loop's kj::Executor and a
// mutex-guarded state (observe::Guarded: std::mutex, which ThreadSanitizer sees).

#include "cfqt/tunnel.h"
#include "cfqt/cfqt.h"

#include "tunnel/runner.h"

#include "edge/discovery.h"
#include "loop/spinner.h"
#include "named/config.h"
#include "named/credentials.h"
#include "named/ingress.h"
#include "observe/guarded.h"
#include "observe/log.h"
#include "observe/metrics-server.h"
#include "origin/in-process.h"
#include "origin/origin.h"
#include "origin/tls-roots.h"

#include <gnutls/crypto.h>

#include <kj/async-io.h>
#include <kj/debug.h>
#include <kj/encoding.h>
#include <kj/mutex.h>
#include <kj/thread.h>

#include <sched.h>
#include <string.h>
#include <strings.h>

#include <atomic>
#include <deque>

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

void checkPemFile(const std::string& path, kj::StringPtr option) {
  // Throws TunnelError unless `path` is empty or a readable PEM file with a certificate.
  if (path.empty()) return;
  auto loaded = origin::loadPemCertificates(toKj(path), option);
  KJ_IF_MAYBE(error, loaded.tryGet<kj::String>()) {
    throw TunnelError(std::string("cfqt: ") + error->cStr());
  }
}
std::string toStd(kj::StringPtr s) { return std::string(s.begin(), s.size()); }

LogLevel publicLevel(observe::LogLevel level) {
  switch (level) {
    case observe::LogLevel::DEBUG: return LogLevel::Debug;
    case observe::LogLevel::INFO: return LogLevel::Info;
    case observe::LogLevel::WARN: return LogLevel::Warn;
    case observe::LogLevel::ERROR: return LogLevel::Error;
    case observe::LogLevel::FATAL: return LogLevel::Fatal;
  }
  return LogLevel::Error;
}

class CallbackSink final: public observe::LogSink {
  // TunnelOptions::logCallback behind the logger (which serializes the calls).
public:
  explicit CallbackSink(LogCallback callback): callback(std::move(callback)) {}
  void write(observe::LogLevel level, kj::StringPtr message,
             kj::ArrayPtr<const observe::LogField> fields) override {
    std::vector<LogField> list;
    list.reserve(fields.size());
    for (auto& f: fields) list.emplace_back(toStd(f.key), toStd(f.value));
    try {
      callback(publicLevel(level), toStd(message), list);
    } catch (...) {
      // A host's callback that throws loses its line, never the tunnel.
    }
  }

private:
  LogCallback callback;
};

}  // namespace

// =============================================================================================
// In-process requests (include/cfqt/handler.h)

class Request::Impl {
public:
  explicit Impl(kj::Own<const origin::InProcessRequest> requestParam)
      : request(kj::mv(requestParam)), method(toStd(request->method())),
        url(toStd(request->dest())), host(toStd(request->host())) {
    // path: the URL without scheme and authority.
    auto scheme = url.find("://");
    if (scheme == std::string::npos) {
      path = url;
    } else {
      auto slash = url.find_first_of("/?", scheme + 3);
      path = slash == std::string::npos ? "/" : url.substr(slash);
      if (!path.empty() && path[0] == '?') path = "/" + path;
    }
    if (path.empty()) path = "/";
    for (auto& h: request->headers()) headers.emplace_back(toStd(h.name), toStd(h.value));
  }

  template <typename Func>
  auto call(Func&& func) {
    // Library failures as the public exception types.
    try {
      return func();
    } catch (const kj::Exception& e) {
      auto text = toStd(e.getDescription());
      if (e.getType() == kj::Exception::Type::DISCONNECTED) throw RequestCancelled(text);
      throw RequestError(text);
    }
  }

  kj::Own<const origin::InProcessRequest> request;
  std::string method;
  std::string url;
  std::string host;
  std::string path;
  Headers headers;
  std::atomic<bool> answered{false};
};

Request::Request(std::unique_ptr<Impl> implParam): impl(std::move(implParam)) {}
Request::~Request() { impl->request->release(); }

const std::string& Request::method() const { return impl->method; }
const std::string& Request::url() const { return impl->url; }
const std::string& Request::path() const { return impl->path; }
const std::string& Request::host() const { return impl->host; }
const Headers& Request::headers() const { return impl->headers; }
bool Request::isWebSocket() const { return impl->request->isWebSocket(); }

std::string Request::header(std::string_view name) const {
  for (auto& h: impl->headers) {
    if (h.first.size() == name.size() &&
        strncasecmp(h.first.data(), name.data(), name.size()) == 0) {
      return h.second;
    }
  }
  return std::string();
}

size_t Request::read(void* buffer, size_t size) {
  return impl->call([&]() {
    return impl->request->read(kj::arrayPtr(static_cast<kj::byte*>(buffer), size));
  });
}

std::string Request::readAll(size_t limit) {
  std::string out;
  char buffer[16384];
  while (true) {
    size_t n = read(buffer, sizeof(buffer));
    if (n == 0) return out;
    if (out.size() + n > limit) {
      throw RequestError("cfqt: the request body is longer than " + std::to_string(limit) +
                         " bytes");
    }
    out.append(buffer, n);
  }
}

void Request::respond(int status, const Headers& headers) {
  auto list = kj::heapArrayBuilder<wire::Header>(headers.size());
  for (auto& h: headers) list.add(wire::Header{toKj(h.first), toKj(h.second)});
  impl->call([&]() {
    impl->request->respond(status < 0 ? 0 : kj::uint(status), list.finish());
  });
  impl->answered = true;
}

void Request::respond(int status, const Headers& headers, std::string_view body) {
  auto list = kj::heapArrayBuilder<wire::Header>(headers.size());
  for (auto& h: headers) list.add(wire::Header{toKj(h.first), toKj(h.second)});
  impl->call([&]() {
    impl->request->respond(status < 0 ? 0 : kj::uint(status), list.finish(),
                           kj::arrayPtr(reinterpret_cast<const kj::byte*>(body.data()),
                                        body.size()));
  });
  impl->answered = true;
}

void Request::acceptWebSocket(const Headers& headers) {
  auto key = header("Sec-WebSocket-Key");
  if (!isWebSocket() || key.empty()) {
    throw RequestError("cfqt: acceptWebSocket() on a request that is no WebSocket upgrade");
  }
  auto input = key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
  kj::byte digest[20];
  if (gnutls_hash_fast(GNUTLS_DIG_SHA1, input.data(), input.size(), digest) != 0) {
    throw RequestError("cfqt: SHA-1 is not available");
  }
  Headers all = {{"Upgrade", "websocket"}, {"Connection", "Upgrade"},
                 {"Sec-WebSocket-Accept", toStd(kj::encodeBase64(kj::arrayPtr(digest, 20)))}};
  all.insert(all.end(), headers.begin(), headers.end());
  respond(101, all);
}

void Request::write(const void* data, size_t size) {
  impl->call([&]() {
    impl->request->write(kj::arrayPtr(static_cast<const kj::byte*>(data), size));
  });
}

void Request::end() {
  impl->call([&]() { impl->request->end(); });
}

void Request::fail(const std::string& message) { impl->request->fail(toKj(message)); }
bool Request::cancelled() const { return impl->request->isCancelled(); }
bool Request::answered() const { return impl->answered; }

namespace {

class HandlerPool final: public origin::InProcessHandler {
  // Runs the application's handler on up to `maxThreads` threads, started as requests come.
public:
  HandlerPool(Handler handlerParam, size_t maxThreads)
      : handler(std::move(handlerParam)), maxThreads(maxThreads) {}

  ~HandlerPool() noexcept(false) {
    state.lockExclusive()->stopping = true;
    threads.lockExclusive()->clear();   // joins; requests still queued are released unanswered
  }
  KJ_DISALLOW_COPY(HandlerPool);

  void dispatch(kj::Own<const origin::InProcessRequest> request) override {
    // Loop thread: queue, and start a thread if every running one is busy; with no threads,
    // call the handler right here.
    if (maxThreads == 0) {
      serve(kj::mv(request));
      return;
    }
    bool spawn = false;
    {
      auto lock = state.lockExclusive();
      lock->queue.push_back(kj::mv(request));
      if (lock->queue.size() > lock->idle && lock->threads < maxThreads) {
        lock->threads++;
        spawn = true;
      }
    }
    if (spawn) {
      threads.lockExclusive()->add(kj::heap<kj::Thread>([this]() { work(); }));
    }
  }

private:
  struct State {
    std::deque<kj::Own<const origin::InProcessRequest>> queue;
    size_t idle = 0;
    size_t threads = 0;
    bool stopping = false;
  };
  Handler handler;
  size_t maxThreads;
  observe::Guarded<State> state;
  observe::Guarded<kj::Vector<kj::Own<kj::Thread>>> threads;   // last: joined first

  void work() {
    while (true) {
      kj::Own<const origin::InProcessRequest> next;
      {
        auto lock = state.lockExclusive();
        lock->idle++;
        lock.wait([](const State& s) { return !s.queue.empty() || s.stopping; });
        lock->idle--;
        if (lock->stopping) {
          for (auto& r: lock->queue) r->release();
          lock->queue.clear();
          return;
        }
        next = kj::mv(lock->queue.front());
        lock->queue.pop_front();
      }
      serve(kj::mv(next));
    }
  }

  void serve(kj::Own<const origin::InProcessRequest> request) {
    auto keep = kj::atomicAddRef(*request);
    try {
      auto shared = std::make_shared<Request>(std::make_unique<Request::Impl>(kj::mv(request)));
      handler(std::move(shared));
    } catch (const kj::Exception& e) {
      keep->fail(e.getDescription());
    } catch (const std::exception& e) {
      keep->fail(kj::StringPtr(e.what()));
    } catch (...) {
      keep->fail("the handler threw a non-standard exception");
    }
  }
};

}  // namespace

class Tunnel::Impl final: private tunnel::RunnerCallbacks {
public:
  Impl(tunnel::RunnerOptions runnerOptions, observe::LogConfig logConfig,
       kj::Maybe<kj::Own<HandlerPool>> handlers)
      : handlers(kj::mv(handlers)), options(kj::mv(runnerOptions)),
        logConfig(kj::mv(logConfig)) {
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

  std::string metrics() const {
    std::string text;
    onLoop([&]() {
      auto runner = state.lockShared()->runner;
      if (runner != nullptr) text = toStd(observe::metricsBody(runner->status()));
    });
    return text;
  }

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

  void waitUntilServing(std::chrono::milliseconds timeout) {
    // Starts the probe on the loop, then polls its state every few milliseconds.
    auto deadline = std::chrono::steady_clock::now() + timeout;
    while (true) {
      bool known = false;
      tunnel::ReadyStage stage = tunnel::ReadyStage::DNS;
      bool probing = false;
      std::string failure;
      bool failed = false;
      onLoop([&]() {
        auto runner = state.lockShared()->runner;
        if (runner == nullptr) return;
        known = true;
        runner->probeServing();          // idempotent: starts the probe on the first call
        auto serving = runner->servingState();
        probing = serving.probing;
        stage = serving.stage;
        KJ_IF_MAYBE(f, serving.failure) {
          failed = true;
          failure = toStd(*f);
        }
      });
      auto publicStage = !probing ? ServingStage::TUNNEL
          : stage == tunnel::ReadyStage::DNS ? ServingStage::DNS : ServingStage::ROUTING;
      if (probing && stage == tunnel::ReadyStage::SERVING && !failed) return;
      if (failed) throw NotServingError(publicStage, "cfqt: the URL does not serve: " + failure);
      if (!running()) {
        throw NotServingError(ServingStage::TUNNEL, "cfqt: the tunnel is not running");
      }
      if (std::chrono::steady_clock::now() >= deadline) {
        std::string what = publicStage == ServingStage::TUNNEL
            ? "no quick tunnel with started edge connections yet"
            : publicStage == ServingStage::DNS
            ? "DNS stage: the hostname does not resolve via the public resolvers yet"
            : "routing stage: the hostname resolves, but the edge does not route it to this "
              "tunnel yet";
        if (!known) publicStage = ServingStage::TUNNEL;
        throw NotServingError(publicStage, "cfqt: the URL did not serve within " +
                              std::to_string(timeout.count()) + " ms: " + what);
      }
      auto lock = state.lockExclusive();
      lock.wait([](const SharedState& s) { return s.finished; }, 10 * kj::MILLISECONDS);
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
    // Orders the caller's writes before `func` and func's writes (often into the caller's locals)
    // before the caller reads them, in a way ThreadSanitizer sees: KJ's hand-off is a futex it
    // cannot see, and its reports then depend on how much the loop did in between.
    std::atomic<int> order{0};
    order.store(1, std::memory_order_release);
    kj::runCatchingExceptions([&]() {
      executor->executeSync([&]() {
        order.load(std::memory_order_acquire);
        KJ_DEFER(order.store(2, std::memory_order_release));
        func();
      });
    });
    order.load(std::memory_order_acquire);
  }

  kj::Maybe<kj::Own<HandlerPool>> handlers;   // first: outlives the loop thread dispatching to it
  tunnel::RunnerOptions options;
  observe::LogConfig logConfig;
  observe::Guarded<SharedState> state;
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
    loop::Spinner spinner(options.busyPoll);   // TunnelOptions::busyPoll: this loop's driver
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
    return spinner.drive(kj::mv(done), io.waitScope);
  }
};

Tunnel::Tunnel(std::unique_ptr<Impl> implParam): impl(std::move(implParam)) {}
Tunnel::~Tunnel() {}

std::unique_ptr<Tunnel> Tunnel::start(const TunnelOptions& o) {
  tunnel::RunnerOptions r;
  kj::Maybe<kj::Own<HandlerPool>> handlers;
  if (o.handler) {
    if (o.helloWorld || !o.url.empty() || !o.unixSocket.empty()) {
      throw TunnelError("cfqt: set either handler or an origin (url, helloWorld, unixSocket)");
    }
    if (o.handlerThreads < 0 || o.handlerThreads > 4096) {
      throw TunnelError("cfqt: handlerThreads must be between 0 (inline) and 4096");
    }
    auto pool = kj::heap<HandlerPool>(o.handler, size_t(o.handlerThreads));
    r.origin = origin::inProcessOrigin(*pool);
    // An inline handler (0 threads) is called on the tunnel's loop thread: keep that one thread
    // rather than one per connection, so that the application's handler is never called
    // concurrently.
    if (o.handlerThreads == 0) r.threads = 1;
    r.service = kj::str("http://localhost");   // no origin URL; the edge only records it
    handlers = kj::mv(pool);
  } else if (o.helloWorld) {
    r.origin = origin::helloWorldOrigin();
    r.service = kj::str("hello_world");
  } else if (!o.url.empty()) {
    auto parsed = origin::parseOriginUrl(toKj(o.url));
    KJ_SWITCH_ONEOF(parsed) {
      KJ_CASE_ONEOF(error, kj::String) throw TunnelError("cfqt: invalid origin: " + toStd(error));
      KJ_CASE_ONEOF(config, origin::OriginConfig) r.origin = kj::mv(config);
    }
    r.service = o.url.find("://") == std::string::npos && o.url.rfind("unix:", 0) != 0 &&
                    o.url.rfind("unix+tls:", 0) != 0
        ? kj::str("http://", toKj(o.url)) : toKj(o.url);
  } else if (!o.unixSocket.empty()) {
    r.origin = origin::unixSocketOrigin(toKj(o.unixSocket));
    r.service = kj::str("unix:", toKj(o.unixSocket));
  } else if (!o.token.empty() || !o.credentialsJson.empty() || !o.credentialsFile.empty()) {
    // A named tunnel without a single origin: its ingress rules, or 503 until a remote one.
    r.origin = origin::httpStatusOrigin(503);
    r.service = kj::str("http_status:503");
  } else {
    throw TunnelError("cfqt: nothing to expose: set url, helloWorld, unixSocket or handler");
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
      if (!o.originServerName.empty()) {
        config->originRequest.originServerName = toKj(o.originServerName);
      }
      if (!o.originCaPool.empty()) config->originRequest.caPool = toKj(o.originCaPool);
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
  if (!o.originServerName.empty()) r.origin.originServerName = toKj(o.originServerName);
  if (!o.originCaPool.empty()) r.origin.caPool = toKj(o.originCaPool);
  // Certificate files are read now, so that a wrong path fails start() rather than every dial.
  // They are read again where they are used, on purpose: each user parses them into its own
  // library's structures (GnuTLS for QUIC, OpenSSL for HTTP/2 and https origins) on its own
  // thread, ingress rules name CA files of their own, and a replaced --edge-ca file is taken up
  // by later dials (quic/connection-tls.c++); only a small file's read() would be saved.
  checkPemFile(o.edgeCaFile, "edgeCaFile");
  checkPemFile(o.originCaPool, "originCaPool");
  checkPemFile(o.readyCaFile, "readyCaFile");
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
  if (o.threads != 0 && o.threads != 1) throw TunnelError("cfqt: threads must be 0 (auto) or 1");
  if (o.threads == 1) r.threads = 1;
  if (o.busyPoll.count() < 0 ||
      o.busyPoll.count() > loop::MAX_BUSY_POLL / kj::MICROSECONDS) {
    throw TunnelError("cfqt: busyPoll must be between 0 (off) and 10 ms");
  }
  r.busyPoll = o.busyPoll.count() * kj::MICROSECONDS;
  r.releaseIdleCode = o.releaseIdleCode;
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
  if (o.fallbackAfter.count() <= 0 || o.quicRetryInterval.count() <= 0 ||
      o.quicFailureWindow.count() <= 0) {
    throw TunnelError("cfqt: fallbackAfter, quicRetryInterval and quicFailureWindow must be "
                      "positive");
  }
  if (o.quicFailureLimit < 0) throw TunnelError("cfqt: quicFailureLimit must not be negative");
  r.dialer.fallbackAfter = toDuration(o.fallbackAfter);
  r.dialer.quicRetryInterval = toDuration(o.quicRetryInterval);
  r.dialer.quicFailureLimit = o.quicFailureLimit;
  r.dialer.quicFailureWindow = toDuration(o.quicFailureWindow);
  r.waitReady = o.waitReady;
  if (o.readyTimeout.count() <= 0) throw TunnelError("cfqt: readyTimeout must be positive");
  r.ready.timeout = toDuration(o.readyTimeout);
  for (auto& resolver: o.readyResolvers) {
    KJ_IF_MAYBE(why, tunnel::readyResolverError(toKj(resolver))) {
      throw TunnelError("cfqt: readyResolvers: " + toStd(*why));
    }
    r.ready.resolvers.add(toKj(resolver));
  }
  if (o.readyPort < 1 || o.readyPort > 65535) {
    throw TunnelError("cfqt: readyPort must be between 1 and 65535");
  }
  r.ready.port = static_cast<uint16_t>(o.readyPort);
  if (!o.readyCaFile.empty()) r.ready.caFile = toKj(o.readyCaFile);

  observe::LogConfig logConfig;
  KJ_IF_MAYBE(level, observe::parseLogLevel(toKj(o.logLevel))) {
    logConfig.level = *level;
  } else {
    throw TunnelError("cfqt: logLevel must be debug, info, warn, error or fatal");
  }
  if (!o.logFile.empty()) logConfig.file = toKj(o.logFile);
  logConfig.toStderr = o.logToStderr;
  if (o.logCallback) logConfig.sink = kj::heap<CallbackSink>(o.logCallback);
  return std::make_unique<Tunnel>(
      std::make_unique<Impl>(kj::mv(r), kj::mv(logConfig), kj::mv(handlers)));
}

std::string Tunnel::waitForUrl(std::chrono::milliseconds timeout) {
  return impl->waitForUrl(timeout);
}
bool Tunnel::waitUntilReady(std::chrono::milliseconds timeout) {
  return impl->waitUntilReady(timeout);
}
void Tunnel::waitUntilServing(std::chrono::milliseconds timeout) {
  impl->waitUntilServing(timeout);
}
std::string Tunnel::publicUrl() const { return impl->publicUrl(); }
std::string Tunnel::hostname() const { return impl->hostname(); }
int Tunnel::readyConnections() const { return impl->readyConnections(); }
bool Tunnel::running() const { return impl->running(); }
int Tunnel::stop() { return impl->stop(); }
int Tunnel::wait() { return impl->wait(); }
std::string Tunnel::metrics() const { return impl->metrics(); }

}  // namespace cfqt

// =============================================================================================
// C API

struct cfqt_tunnel {
  std::unique_ptr<cfqt::Tunnel> tunnel;
};

struct cfqt_request {
  std::shared_ptr<cfqt::Request> request;
};

namespace {

thread_local std::string lastError;

int failWith(const std::exception& e, int code) {
  lastError = e.what();
  return code;
}

template <typename Func>
int requestCall(Func&& func) {
  // 0, or -1 (cancelled: the visitor went away or the tunnel stopped) / -2 (misuse) with the
  // message for cfqt_last_error().
  try {
    func();
    return 0;
  } catch (const cfqt::RequestCancelled& e) {
    return failWith(e, -1);
  } catch (const std::exception& e) {
    return failWith(e, -2);
  }
}

void copyOut(const std::string& text, char* out, size_t size) {
  if (out == nullptr || size == 0) return;
  size_t n = text.size() < size - 1 ? text.size() : size - 1;
  memcpy(out, text.data(), n);
  out[n] = '\0';
}

}  // namespace

extern "C" {

size_t cfqt_options_size(void) { return sizeof(cfqt_options); }

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
    if (options->log_callback != nullptr) {
      cfqt_log_fn fn = options->log_callback;
      void* user = options->log_user_data;
      o.logCallback = [fn, user](cfqt::LogLevel level, const std::string& message,
                                 const std::vector<cfqt::LogField>& fields) {
        std::vector<cfqt_log_field> list;
        list.reserve(fields.size());
        for (auto& f: fields) list.push_back(cfqt_log_field{f.first.c_str(), f.second.c_str()});
        fn(user, static_cast<int>(level), message.c_str(), list.data(), list.size());
      };
    }
    o.waitReady = options->wait_ready != 0;
    if (options->ready_timeout_ms > 0) {
      o.readyTimeout = std::chrono::milliseconds(options->ready_timeout_ms);
    }
    for (size_t i = 0; i < options->ready_resolver_count; i++) {
      o.readyResolvers.push_back(options->ready_resolvers[i]);
    }
    if (options->ready_port > 0) o.readyPort = options->ready_port;
    if (options->ready_ca_file != nullptr) o.readyCaFile = options->ready_ca_file;
    if (options->handler != nullptr) {
      auto function = options->handler;
      auto data = options->handler_data;
      o.handler = [function, data](std::shared_ptr<cfqt::Request> request) {
        auto handle = std::make_unique<cfqt_request>();
        handle->request = std::move(request);
        function(data, handle.release());
      };
      if (options->handler_threads > 0) o.handlerThreads = options->handler_threads;
      if (options->handler_threads < 0) o.handlerThreads = 0;   // inline
    }
    if (options->origin_ca_pool != nullptr) o.originCaPool = options->origin_ca_pool;
    if (options->origin_server_name != nullptr) o.originServerName = options->origin_server_name;
    if (options->fallback_after_ms != 0) {
      o.fallbackAfter = std::chrono::milliseconds(options->fallback_after_ms);
    }
    if (options->quic_retry_interval_ms != 0) {
      o.quicRetryInterval = std::chrono::milliseconds(options->quic_retry_interval_ms);
    }
    if (options->quic_failure_limit > 0) o.quicFailureLimit = options->quic_failure_limit;
    if (options->quic_failure_limit == -1) o.quicFailureLimit = 0;
    if (options->quic_failure_limit < -1) o.quicFailureLimit = options->quic_failure_limit;
    if (options->quic_failure_window_ms != 0) {
      o.quicFailureWindow = std::chrono::milliseconds(options->quic_failure_window_ms);
    }
    o.threads = options->threads;
    o.busyPoll = std::chrono::microseconds(options->busy_poll_us);
    o.releaseIdleCode = options->release_idle_code != 0;
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

int cfqt_tunnel_wait_serving(cfqt_tunnel* t, int timeoutMs, char* error, size_t errorSize) {
  try {
    t->tunnel->waitUntilServing(std::chrono::milliseconds(timeoutMs));
    copyOut("", error, errorSize);
    return 0;
  } catch (const cfqt::NotServingError& e) {
    copyOut(e.what(), error, errorSize);
    switch (e.stage()) {
      case cfqt::ServingStage::TUNNEL: return CFQT_STAGE_TUNNEL;
      case cfqt::ServingStage::DNS: return CFQT_STAGE_DNS;
      case cfqt::ServingStage::ROUTING: return CFQT_STAGE_ROUTING;
    }
    return CFQT_STAGE_TUNNEL;
  } catch (const std::exception& e) {
    copyOut(e.what(), error, errorSize);
    return CFQT_STAGE_TUNNEL;
  }
}

int cfqt_tunnel_ready_connections(cfqt_tunnel* t) { return t->tunnel->readyConnections(); }

int cfqt_tunnel_stop(cfqt_tunnel* t) { return t->tunnel->stop(); }

void cfqt_tunnel_free(cfqt_tunnel* t) {
  std::unique_ptr<cfqt_tunnel> owned(t);   // stops and joins in ~Tunnel
}

int cfqt_tunnel_running(cfqt_tunnel* t) { return t->tunnel->running() ? 1 : 0; }

size_t cfqt_tunnel_metrics(cfqt_tunnel* t, char* out, size_t size) {
  auto text = t->tunnel->metrics();
  copyOut(text, out, size);
  return text.size() + 1;
}

const char* cfqt_last_error(void) { return lastError.c_str(); }

const char* cfqt_request_method(const cfqt_request* r) { return r->request->method().c_str(); }
const char* cfqt_request_url(const cfqt_request* r) { return r->request->url().c_str(); }
const char* cfqt_request_path(const cfqt_request* r) { return r->request->path().c_str(); }
const char* cfqt_request_host(const cfqt_request* r) { return r->request->host().c_str(); }
size_t cfqt_request_header_count(const cfqt_request* r) { return r->request->headers().size(); }

const char* cfqt_request_header_name(const cfqt_request* r, size_t index) {
  auto& headers = r->request->headers();
  return index < headers.size() ? headers[index].first.c_str() : nullptr;
}

const char* cfqt_request_header_value(const cfqt_request* r, size_t index) {
  auto& headers = r->request->headers();
  return index < headers.size() ? headers[index].second.c_str() : nullptr;
}

int cfqt_request_is_websocket(const cfqt_request* r) { return r->request->isWebSocket() ? 1 : 0; }

long long cfqt_request_read(cfqt_request* r, void* buffer, size_t size) {
  size_t n = 0;
  int code = requestCall([&]() { n = r->request->read(buffer, size); });
  return code == 0 ? static_cast<long long>(n) : code;
}

int cfqt_request_respond(cfqt_request* r, int status, const char* const* headers,
                         size_t headerCount) {
  return requestCall([&]() {
    cfqt::Headers list;
    for (size_t i = 0; i < headerCount; i++) {
      if (headers[2 * i] == nullptr || headers[2 * i + 1] == nullptr) {
        throw cfqt::RequestError("cfqt: a response header name or value is NULL");
      }
      list.emplace_back(headers[2 * i], headers[2 * i + 1]);
    }
    r->request->respond(status, list);
  });
}

int cfqt_request_respond_body(cfqt_request* r, int status, const char* const* headers,
                              size_t headerCount, const void* body, size_t size) {
  return requestCall([&]() {
    cfqt::Headers list;
    for (size_t i = 0; i < headerCount; i++) {
      if (headers[2 * i] == nullptr || headers[2 * i + 1] == nullptr) {
        throw cfqt::RequestError("cfqt: a response header name or value is NULL");
      }
      list.emplace_back(headers[2 * i], headers[2 * i + 1]);
    }
    std::string_view text(static_cast<const char*>(body), body == nullptr ? 0 : size);
    r->request->respond(status, list, text);
  });
}

int cfqt_request_accept_websocket(cfqt_request* r) {
  return requestCall([&]() { r->request->acceptWebSocket(); });
}

int cfqt_request_write(cfqt_request* r, const void* data, size_t size) {
  return requestCall([&]() { r->request->write(data, size); });
}

int cfqt_request_end(cfqt_request* r) {
  return requestCall([&]() { r->request->end(); });
}

void cfqt_request_fail(cfqt_request* r, const char* message) {
  r->request->fail(message == nullptr ? "handler failed" : message);
}

int cfqt_request_cancelled(const cfqt_request* r) { return r->request->cancelled() ? 1 : 0; }

void cfqt_request_free(cfqt_request* r) {
  std::unique_ptr<cfqt_request> owned(r);   // unanswered: 502; answered: the body ends
}

}  // extern "C"
