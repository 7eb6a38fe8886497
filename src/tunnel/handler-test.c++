// The in-process handler (include/cfqt/handler.h, the C API's cfqt_request_*) against a real
// cfqt-edge subprocess (CFQT_BIN_DIR): visitors are kj HTTP clients on the test thread, talking
// to cfqt-edge's front door; the handler runs on the tunnel's handler threads.

#include "cfqt/cfqt.h"
#include "cfqt/tunnel.h"

#include "observe/guarded.h"

#include <kj/async-io.h>
#include <kj/compat/http.h>
#include <kj/debug.h>
#include <kj/mutex.h>
#include <kj/test.h>
#include <kj/thread.h>
#include <kj/vector.h>

#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <fstream>
#include <set>
#include <sstream>
#include <string>

#if defined(__SANITIZE_ADDRESS__)
#define CFQT_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define CFQT_SANITIZED 1
#endif
#endif

namespace cfqt::tunnel {
namespace {

constexpr auto WAIT = std::chrono::seconds(20);
constexpr size_t MiB = 1024 * 1024;

struct EdgeProcess {
  pid_t pid = -1;
  std::string ready;

  explicit EdgeProcess(const char* responseTimeout = "60s") {
    const char* bin = getenv("CFQT_BIN_DIR");
    if (bin == nullptr) KJ_FAIL_REQUIRE("CFQT_BIN_DIR must point at the build's bin/");
    auto path = kj::str(bin, "/cfqt-edge");
    char stateTemplate[] = "/tmp/cfqt-handler-test-XXXXXX";
    KJ_ASSERT(mkdtemp(stateTemplate) != nullptr);
    int fds[2];
    KJ_SYSCALL(pipe(fds));
    pid = fork();
    KJ_ASSERT(pid >= 0);
    if (pid == 0) {
      dup2(fds[1], 1);
      close(fds[0]);
      setenv("KJ_CLEAN_SHUTDOWN", "1", 1);
      execl(path.cStr(), path.cStr(), "--state-dir", stateTemplate, "--edge-listen",
            "127.0.0.1:0", "--loglevel", "error", "--response-timeout", responseTimeout,
            static_cast<char*>(nullptr));
      _exit(127);
    }
    close(fds[1]);
    char c;
    struct pollfd p = {fds[0], POLLIN, 0};
    while (true) {
      KJ_ASSERT(poll(&p, 1, 20000) == 1, "cfqt-edge printed no ready line");
      if (read(fds[0], &c, 1) != 1 || c == '\n') break;
      ready.push_back(c);
    }
    close(fds[0]);
    KJ_ASSERT(!ready.empty());
  }

  ~EdgeProcess() {
    if (pid > 0) {
      kill(pid, SIGTERM);
      int status = 0;
      KJ_EXPECT(waitpid(pid, &status, 0) == pid);
      KJ_EXPECT(WIFEXITED(status) && WEXITSTATUS(status) == 0,
                "cfqt-edge did not exit cleanly after SIGTERM", status);
    }
  }

  std::string field(const std::string& key) {
    auto at = ready.find("\"" + key + "\":\"");
    KJ_ASSERT(at != std::string::npos, key);
    at += key.size() + 4;
    return ready.substr(at, ready.find('"', at) - at);
  }

  std::vector<std::string> edges() {
    std::vector<std::string> out;
    auto at = ready.find("\"edges\":[");
    KJ_ASSERT(at != std::string::npos);
    auto list = ready.substr(at + 9, ready.find(']', at) - at - 9);
    size_t i = 0;
    while (true) {
      auto q = list.find('"', i);
      if (q == std::string::npos) break;
      auto q2 = list.find('"', q + 1);
      out.push_back(list.substr(q + 1, q2 - q - 1));
      i = q2 + 1;
    }
    return out;
  }
};

cfqt::TunnelOptions handlerOptions(EdgeProcess& edge, cfqt::Handler handler) {
  cfqt::TunnelOptions o;
  o.handler = std::move(handler);
  o.quickService = "http://" + edge.field("api");
  o.edges = edge.edges();
  o.edgeCaFile = edge.field("ca");
  o.haConnections = 1;
  o.backoffBase = std::chrono::milliseconds(20);
  o.gracePeriod = std::chrono::milliseconds(1500);
  o.logLevel = "error";
  return o;
}

std::unique_ptr<cfqt::Tunnel> startTunnel(const cfqt::TunnelOptions& o) {
  auto t = cfqt::Tunnel::start(o);
  KJ_ASSERT(t->waitForUrl(WAIT).size() > 0);
  KJ_ASSERT(t->waitUntilReady(WAIT));
  return t;
}

class TestEntropy final: public kj::EntropySource {
public:
  void generate(kj::ArrayPtr<kj::byte> buffer) override {
    for (auto& b: buffer) b = kj::byte(rand());   // WebSocket masks only
  }
};

// A visitor: kj's HTTP client on the test thread's own event loop, through the front door.
struct Visitor {
  kj::AsyncIoContext io = kj::setupAsyncIo();
  kj::HttpHeaderTable table;
  kj::Own<kj::NetworkAddress> address;
  kj::String host;

  Visitor(EdgeProcess& edge, cfqt::Tunnel& tunnel)
      : host(kj::str(tunnel.hostname().c_str())) {
    address = io.provider->getNetwork().parseAddress(edge.field("public").c_str())
        .wait(io.waitScope);
  }

  TestEntropy entropy;

  kj::Own<kj::HttpClient> client() {
    kj::HttpClientSettings settings;
    settings.entropySource = entropy;
    return kj::newHttpClient(io.provider->getTimer(), table, *address, settings);
  }

  kj::HttpHeaders headers() {
    kj::HttpHeaders h(table);
    h.set(kj::HttpHeaderId::HOST, host);
    return h;
  }

  struct Result {
    uint status;
    kj::String body;
  };

  Result get(kj::StringPtr path, kj::HttpMethod method = kj::HttpMethod::GET) {
    auto c = client();
    auto request = c->request(method, path, headers());
    auto response = request.response.wait(io.waitScope);
    auto body = response.body->readAllText().wait(io.waitScope);
    return {response.statusCode, kj::mv(body)};
  }
};

template <typename T>
struct Shared {
  // A value handed between the handler threads and the test thread.
  observe::Guarded<T> value;   // std::mutex: ThreadSanitizer sees it (make test-tsan)

  template <typename Cond>
  bool waitFor(Cond&& cond, std::chrono::milliseconds timeout = WAIT) {
    auto lock = value.lockExclusive();
    lock.wait([&](const T& v) { return cond(v); },
              int64_t(timeout.count()) * kj::MILLISECONDS);
    return cond(*lock);
  }
};

long procStatusKiB(const char* field) {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(field, 0) == 0) return atol(line.c_str() + strlen(field));
  }
  return -1;
}

void resetPeakRss() {
  // Linux: writing 5 to clear_refs resets VmHWM to the current RSS.
  int fd = open("/proc/self/clear_refs", O_WRONLY);
  if (fd >= 0) {
    if (write(fd, "5", 1) < 0) {}
    close(fd);
  }
}

void expectRssBounded(long beforeKiB, long limitMiB, const char* what) {
  long peak = procStatusKiB("VmHWM:");
  long grown = (peak - beforeKiB) / 1024;
  KJ_LOG(WARNING, "peak RSS growth", what, grown, "MiB");
#ifndef CFQT_SANITIZED
  KJ_EXPECT(grown < limitMiB, "RSS grew with the body size", what, grown, limitMiB);
#endif
}

KJ_TEST("handler: 1 KiB GET, request head, metrics, no listening socket, no child") {
  EdgeProcess edge;
  Shared<std::string> seen;
  auto o = handlerOptions(edge, [&](std::shared_ptr<cfqt::Request> r) {
    *seen.value.lockExclusive() = r->method() + " " + r->path() + " " + r->header("x-probe") +
                                  " " + (r->url().rfind("http", 0) == 0 ? "url" : "nourl");
    r->respond(200, {{"Content-Type", "text/plain"}, {"X-Handler", "yes"}},
               std::string(1024, 'a'));
  });
  auto t = startTunnel(o);
  Visitor v(edge, *t);
  auto c = v.client();
  auto headers = v.headers();
  headers.add("X-Probe", "42");
  auto response = c->request(kj::HttpMethod::GET, "/hello?x=1", headers).response
      .wait(v.io.waitScope);
  KJ_EXPECT(response.statusCode == 200);
  kj::String handlerHeader = kj::str("");
  response.headers->forEach([&](kj::StringPtr name, kj::StringPtr value) {
    if (strcasecmp(name.cStr(), "X-Handler") == 0) handlerHeader = kj::str(value);
  });
  KJ_EXPECT(handlerHeader == "yes", handlerHeader);
  auto body = response.body->readAllText().wait(v.io.waitScope);
  KJ_EXPECT(body.size() == 1024 && body[0] == 'a', body.size());
  KJ_EXPECT(*seen.value.lockShared() == "GET /hello?x=1 42 url", *seen.value.lockShared());
  KJ_EXPECT(t->metrics().find("cloudflared_tunnel_total_requests 1") != std::string::npos,
            t->metrics());

  // In-process means in-process: none of this process's sockets listens, and its only child is
  // the cfqt-edge this test started.
  std::set<std::string> ourSockets;
  DIR* dir = opendir("/proc/self/fd");
  KJ_ASSERT(dir != nullptr);
  while (auto entry = readdir(dir)) {
    char target[256];
    auto path = std::string("/proc/self/fd/") + entry->d_name;
    ssize_t n = readlink(path.c_str(), target, sizeof(target) - 1);
    if (n <= 0) continue;
    target[n] = '\0';
    std::string text(target);
    if (text.rfind("socket:[", 0) == 0) ourSockets.insert(text.substr(8, text.size() - 9));
  }
  closedir(dir);
  int listening = 0;
  for (auto file: {"/proc/net/tcp", "/proc/net/tcp6"}) {
    std::ifstream in(file);
    std::string line;
    std::getline(in, line);
    while (std::getline(in, line)) {
      std::istringstream fields(line);
      std::string sl, local, remote, state, queues, timer, retransmits, uid, timeout, inode;
      fields >> sl >> local >> remote >> state >> queues >> timer >> retransmits >> uid >>
          timeout >> inode;
      if (state == "0A" && ourSockets.count(inode) > 0) ++listening;
    }
  }
  KJ_EXPECT(ourSockets.size() > 0);
  KJ_EXPECT(listening == 0, "the process listens on a TCP socket of its own");
  std::set<std::string> children;
  dir = opendir("/proc/self/task");
  while (auto entry = readdir(dir)) {
    if (entry->d_name[0] == '.') continue;
    std::ifstream in(std::string("/proc/self/task/") + entry->d_name + "/children");
    std::string child;
    while (in >> child) children.insert(child);
  }
  closedir(dir);
  KJ_EXPECT(children.size() == 1 && *children.begin() == std::to_string(edge.pid),
            children.size());
  KJ_EXPECT(t->stop() == 0);
}

KJ_TEST("handler: 64 MiB streamed download from a generator, RSS bounded") {
  EdgeProcess edge;
  auto o = handlerOptions(edge, [](std::shared_ptr<cfqt::Request> r) {
    r->respond(200, {{"Content-Type", "application/octet-stream"},
                     {"Content-Length", std::to_string(64 * MiB)}});
    std::string chunk(64 * 1024, '\0');
    for (size_t i = 0; i < 64 * MiB / chunk.size(); i++) {
      memset(&chunk[0], 'a' + i % 26, chunk.size());
      r->write(chunk);
    }
    r->end();
  });
  auto t = startTunnel(o);
  Visitor v(edge, *t);
  long before = procStatusKiB("VmRSS:");
  resetPeakRss();
  auto c = v.client();
  auto response = c->request(kj::HttpMethod::GET, "/big", v.headers()).response
      .wait(v.io.waitScope);
  KJ_ASSERT(response.statusCode == 200);
  auto buffer = kj::heapArray<kj::byte>(64 * 1024);
  size_t total = 0;
  bool ordered = true;
  while (true) {
    size_t n = response.body->tryRead(buffer.begin(), 1, buffer.size()).wait(v.io.waitScope);
    if (n == 0) break;
    for (size_t i = 0; i < n; i++) {
      if (buffer[i] != 'a' + ((total + i) / (64 * 1024)) % 26) ordered = false;
    }
    total += n;
  }
  KJ_EXPECT(total == 64 * MiB, total);
  KJ_EXPECT(ordered, "the body arrived corrupted or out of order");
  expectRssBounded(before, 32, "download");
  KJ_EXPECT(t->stop() == 0);
}

KJ_TEST("handler: 64 MiB upload into a slow reader, RSS bounded") {
  EdgeProcess edge;
  auto o = handlerOptions(edge, [](std::shared_ptr<cfqt::Request> r) {
    char buffer[16384];
    size_t total = 0;
    uint64_t sum = 0;
    size_t reads = 0;
    while (size_t n = r->read(buffer, sizeof(buffer))) {
      for (size_t i = 0; i < n; i++) sum += static_cast<unsigned char>(buffer[i]);
      total += n;
      // A slow application: a pause now and then (rate limiting, not synchronisation).
      if (++reads % 16 == 0) usleep(2000);
    }
    r->respond(200, {}, std::to_string(total) + " " + std::to_string(sum));
  });
  auto t = startTunnel(o);
  Visitor v(edge, *t);
  long before = procStatusKiB("VmRSS:");
  resetPeakRss();
  auto c = v.client();
  auto request = c->request(kj::HttpMethod::POST, "/upload", v.headers(), uint64_t(64 * MiB));
  auto chunk = kj::heapArray<kj::byte>(64 * 1024);
  memset(chunk.begin(), 'x', chunk.size());
  uint64_t expectedSum = uint64_t('x') * 64 * MiB;
  kj::Promise<void> sending = kj::READY_NOW;
  for (size_t i = 0; i < 64 * MiB / chunk.size(); i++) {
    sending = sending.then([&]() { return request.body->write(chunk.begin(), chunk.size()); });
  }
  sending.wait(v.io.waitScope);
  request.body = nullptr;
  auto response = request.response.wait(v.io.waitScope);
  auto body = response.body->readAllText().wait(v.io.waitScope);
  KJ_EXPECT(response.statusCode == 200);
  KJ_EXPECT(body == kj::str(64 * MiB, " ", expectedSum), body);
  expectRssBounded(before, 32, "upload");
  KJ_EXPECT(t->stop() == 0);
}

KJ_TEST("handler: server-sent events stream through, one event at a time") {
  EdgeProcess edge;
  Shared<int> acks;   // events the visitor has received
  std::atomic<bool> sawEachAck{true};
  auto o = handlerOptions(edge, [&](std::shared_ptr<cfqt::Request> r) {
    r->respond(200, {{"Content-Type", "text/event-stream"}, {"Cache-Control", "no-cache"}});
    for (int i = 1; i <= 3; i++) {
      r->write("data: event " + std::to_string(i) + "\n\n");
      // The next event only after the visitor got this one: nothing is held back on the way.
      if (!acks.waitFor([i](int n) { return n >= i; })) sawEachAck = false;
    }
    r->end();
  });
  auto t = startTunnel(o);
  Visitor v(edge, *t);
  auto c = v.client();
  auto response = c->request(kj::HttpMethod::GET, "/events", v.headers()).response
      .wait(v.io.waitScope);
  KJ_ASSERT(response.statusCode == 200);
  std::string received;
  char buffer[1024];
  int events = 0;
  while (true) {
    size_t n = response.body->tryRead(buffer, 1, sizeof(buffer)).wait(v.io.waitScope);
    if (n == 0) break;
    received.append(buffer, n);
    size_t count = 0;
    for (size_t at = 0; (at = received.find("\n\n", at)) != std::string::npos; at += 2) ++count;
    if (int(count) > events) {
      events = count;
      *acks.value.lockExclusive() = events;
    }
  }
  KJ_EXPECT(events == 3, received);
  KJ_EXPECT(received == "data: event 1\n\ndata: event 2\n\ndata: event 3\n\n", received);
  KJ_EXPECT(sawEachAck, "an event was held back until the next one was written");
  KJ_EXPECT(t->stop() == 0);
}

KJ_TEST("handler: WebSocket echo as a two-way byte stream") {
  EdgeProcess edge;
  Shared<int> finished;
  auto o = handlerOptions(edge, [&](std::shared_ptr<cfqt::Request> r) {
    KJ_DEFER(++*finished.value.lockExclusive());
    if (!r->isWebSocket()) {
      r->respond(400, {}, "not a websocket");
      return;
    }
    r->acceptWebSocket();
    char buffer[4096];
    try {
      while (size_t n = r->read(buffer, sizeof(buffer))) r->write(buffer, n);
      r->end();
    } catch (const cfqt::RequestCancelled&) {
      // the visitor closed the connection
    }
  });
  auto t = startTunnel(o);
  Visitor v(edge, *t);
  {
    auto c = v.client();
    auto response = c->openWebSocket("/ws", v.headers()).wait(v.io.waitScope);
    KJ_ASSERT(response.statusCode == 101, response.statusCode);
    auto& ws = *response.webSocketOrBody.get<kj::Own<kj::WebSocket>>();
    for (auto text: {"hello", "in-process", "world"}) {
      ws.send(kj::StringPtr(text)).wait(v.io.waitScope);
      auto message = ws.receive().wait(v.io.waitScope);
      KJ_ASSERT(message.is<kj::String>());
      KJ_EXPECT(message.get<kj::String>() == text);
    }
    auto big = kj::heapArray<kj::byte>(200000);
    for (size_t i = 0; i < big.size(); i++) big[i] = i % 251;
    ws.send(big.asPtr()).wait(v.io.waitScope);
    auto message = ws.receive(1 << 20).wait(v.io.waitScope);
    KJ_ASSERT(message.is<kj::Array<kj::byte>>());
    KJ_EXPECT(message.get<kj::Array<kj::byte>>() == big.asPtr());
    ws.close(1000, "bye").wait(v.io.waitScope);
  }
  KJ_EXPECT(finished.waitFor([](int n) { return n == 1; }), "the handler never returned");
  KJ_EXPECT(t->stop() == 0);
}

KJ_TEST("handler: a visitor leaving mid-body cancels the request") {
  EdgeProcess edge;
  struct Outcome {
    bool cancelledSeen = false;
    bool flag = false;
    bool done = false;
  };
  Shared<Outcome> outcome;
  auto o = handlerOptions(edge, [&](std::shared_ptr<cfqt::Request> r) {
    r->respond(200, {{"Content-Type", "application/octet-stream"}});
    std::string chunk(64 * 1024, 'z');
    bool cancelled = false;
    try {
      for (int i = 0; i < 1000000; i++) r->write(chunk);   // "endless": far more than read
    } catch (const cfqt::RequestCancelled&) {
      cancelled = true;
    }
    auto lock = outcome.value.lockExclusive();
    lock->cancelledSeen = cancelled;
    lock->flag = r->cancelled();
    lock->done = true;
  });
  auto t = startTunnel(o);
  Visitor v(edge, *t);
  {
    auto c = v.client();
    auto response = c->request(kj::HttpMethod::GET, "/endless", v.headers()).response
        .wait(v.io.waitScope);
    KJ_ASSERT(response.statusCode == 200);
    auto buffer = kj::heapArray<kj::byte>(64 * 1024);
    size_t total = 0;
    while (total < 2 * MiB) {
      total += response.body->tryRead(buffer.begin(), 1, buffer.size()).wait(v.io.waitScope);
    }
  }   // the visitor's connection closes here
  KJ_ASSERT(outcome.waitFor([](const Outcome& o) { return o.done; }),
            "the handler never saw the visitor leave");
  KJ_EXPECT(outcome.value.lockShared()->cancelledSeen);
  KJ_EXPECT(outcome.value.lockShared()->flag);
  // The stream's end is counted on the tunnel's thread, maybe a moment after the handler woke.
  auto settled = [&]() {
    return t->metrics().find("cloudflared_tunnel_concurrent_requests_per_tunnel 0") !=
           std::string::npos;
  };
  auto deadline = std::chrono::steady_clock::now() + WAIT;
  while (!settled() && std::chrono::steady_clock::now() < deadline) {
    outcome.waitFor([](const Outcome&) { return false; }, std::chrono::milliseconds(10));
  }
  KJ_EXPECT(settled(), t->metrics());
  KJ_EXPECT(t->stop() == 0);
}

KJ_TEST("handler: throwing → 502 page, answering twice → error, unanswered → 502 and 524") {
  EdgeProcess edge("2s");
  Shared<std::string> twice;
  Shared<int> ignoredCancelled;
  Shared<std::vector<std::shared_ptr<cfqt::Request>>> kept;
  auto o = handlerOptions(edge, [&](std::shared_ptr<cfqt::Request> r) {
    if (r->path() == "/throw") throw std::runtime_error("secret detail of the failure");
    if (r->path() == "/twice") {
      r->respond(200, {}, "first");
      try {
        r->respond(201, {});
        *twice.value.lockExclusive() = "no error";
      } catch (const cfqt::RequestError& e) {
        *twice.value.lockExclusive() = e.what();
      }
      return;
    }
    if (r->path() == "/never") {
      kept.value.lockExclusive()->push_back(r);   // kept, never answered
      return;
    }
    // "/dropped": released without an answer
  });
  auto t = startTunnel(o);
  Visitor v(edge, *t);
  auto thrown = v.get("/throw");
  KJ_EXPECT(thrown.status == 502, thrown.status);
  std::string page(thrown.body.cStr());
  KJ_EXPECT(page.find("502") != std::string::npos, thrown.body);
  KJ_EXPECT(page.find("secret") == std::string::npos, thrown.body);

  auto first = v.get("/twice");
  KJ_EXPECT(first.status == 200 && first.body == "first", first.status, first.body);
  KJ_EXPECT(twice.waitFor([](const std::string& s) { return !s.empty(); }));
  KJ_EXPECT(twice.value.lockShared()->find("already answered") != std::string::npos,
            *twice.value.lockShared());

  KJ_EXPECT(v.get("/dropped").status == 502);

  auto never = v.get("/never");   // cfqt-edge runs with --response-timeout 2s
  KJ_EXPECT(never.status == 524, never.status);
  {
    auto lock = kept.value.lockExclusive();
    KJ_ASSERT(lock->size() == 1);
  }
  // The edge gave up on the stream: the kept request is cancelled and can't be answered.
  auto& request = *kept.value.lockExclusive()->front();
  auto deadline = std::chrono::steady_clock::now() + WAIT;
  while (!request.cancelled() && std::chrono::steady_clock::now() < deadline) {
    ignoredCancelled.waitFor([](int) { return false; }, std::chrono::milliseconds(10));
  }
  KJ_EXPECT(request.cancelled());
  bool threw = false;
  try {
    request.respond(200, {}, "late");
  } catch (const cfqt::RequestCancelled&) {
    threw = true;
  }
  KJ_EXPECT(threw);
  KJ_EXPECT(t->stop() == 0);
}

KJ_TEST("handler: answers from other threads, concurrent requests") {
  EdgeProcess edge;
  struct Queue {
    std::vector<std::shared_ptr<cfqt::Request>> requests;
    bool done = false;
  };
  Shared<Queue> queue;
  auto o = handlerOptions(edge, [&](std::shared_ptr<cfqt::Request> r) {
    queue.value.lockExclusive()->requests.push_back(std::move(r));   // return at once
  });
  o.handlerThreads = 2;
  auto t = startTunnel(o);
  // Another thread answers every request, in reverse order of arrival once 8 are in.
  kj::Thread answerer([&]() {
    std::vector<std::shared_ptr<cfqt::Request>> batch;
    {
      auto lock = queue.value.lockExclusive();
      lock.wait([](const Queue& q) { return q.requests.size() >= 8 || q.done; },
                20 * kj::SECONDS);
      batch = std::move(lock->requests);
    }
    for (auto it = batch.rbegin(); it != batch.rend(); ++it) {
      (*it)->respond(200, {{"Content-Type", "text/plain"}});
      (*it)->write("answer for " + (*it)->path());
      (*it)->end();
    }
  });
  Visitor v(edge, *t);
  kj::Vector<kj::Own<kj::HttpClient>> clients;
  kj::Vector<kj::Promise<kj::String>> responses;
  for (int i = 0; i < 8; i++) {
    clients.add(v.client());
    auto path = kj::str("/r", i);
    responses.add(clients.back()->request(kj::HttpMethod::GET, path, v.headers()).response
        .then([](kj::HttpClient::Response&& r) {
          return r.body->readAllText().attach(kj::mv(r.body));
        }));
  }
  auto bodies = kj::joinPromises(responses.releaseAsArray()).wait(v.io.waitScope);
  for (int i = 0; i < 8; i++) KJ_EXPECT(bodies[i] == kj::str("answer for /r", i), bodies[i]);
  queue.value.lockExclusive()->done = true;
  KJ_EXPECT(t->stop() == 0);
}

KJ_TEST("handler: stop() lets requests in flight finish within the grace period") {
  EdgeProcess edge;
  struct Progress {
    int started = 0;
    bool stopping = false;
    bool slowCancelled = false;
  };
  Shared<Progress> progress;
  auto o = handlerOptions(edge, [&](std::shared_ptr<cfqt::Request> r) {
    ++progress.value.lockExclusive()->started;
    if (r->path() == "/finishes") {
      progress.waitFor([](const Progress& p) { return p.stopping; });
      r->respond(200, {{"Content-Type", "text/plain"}});
      for (int i = 0; i < 4; i++) r->write(std::string(1024, 'a' + i));
      r->end();
    } else {
      // Waits for a body that never completes: cancelled when the grace period ends.
      char buffer[100];
      try {
        while (r->read(buffer, sizeof(buffer)) > 0) {}
      } catch (const cfqt::RequestCancelled&) {
        progress.value.lockExclusive()->slowCancelled = true;
      }
    }
  });
  o.gracePeriod = std::chrono::milliseconds(1500);
  auto t = startTunnel(o);
  Visitor v(edge, *t);
  auto c1 = v.client();
  auto c2 = v.client();
  auto finishing = c1->request(kj::HttpMethod::GET, "/finishes", v.headers()).response
      .then([](kj::HttpClient::Response&& r) {
        auto status = r.statusCode;
        return r.body->readAllText().attach(kj::mv(r.body)).then([status](kj::String body) {
          return kj::str(status, " ", body.size());
        });
      });
  auto stuck = c2->request(kj::HttpMethod::POST, "/stuck", v.headers(), uint64_t(1000));
  auto partial = stuck.body->write("0123456789", 10);
  auto stuckResponse = stuck.response.then([](kj::HttpClient::Response&& r) {
    return r.statusCode;
  }, [](kj::Exception&&) { return kj::uint(0); });
  // Both requests reached the handler (the visitor side runs on this thread's loop).
  while (progress.value.lockShared()->started < 2) {
    v.io.provider->getTimer().afterDelay(5 * kj::MILLISECONDS).wait(v.io.waitScope);
  }
  int code = -1;
  auto before = std::chrono::steady_clock::now();
  {
    kj::Thread stopper([&]() { code = t->stop(); });
    progress.value.lockExclusive()->stopping = true;
    auto finished = finishing.wait(v.io.waitScope);
    KJ_EXPECT(finished == "200 4096", finished);
    stuckResponse.wait(v.io.waitScope);
  }
  auto elapsed = std::chrono::steady_clock::now() - before;
  KJ_EXPECT(code == 0, code);
  // The handler thread sees the cancellation on its own schedule (after the visitor's answer).
  KJ_EXPECT(progress.waitFor([](const Progress& p) { return p.slowCancelled; }));
  KJ_EXPECT(elapsed < std::chrono::seconds(10));
}

KJ_TEST("handler: inline on the event loop (handlerThreads = 0), blocking calls refused") {
  EdgeProcess edge;
  Shared<std::string> refused;
  auto o = handlerOptions(edge, [&](std::shared_ptr<cfqt::Request> r) {
    if (r->path() == "/small") {
      r->respond(200, {{"Content-Type", "text/plain"}}, std::string(1024, 's'));
      return;
    }
    r->respond(200, {});
    try {
      r->write(std::string(256 * 1024, 'b'));   // more than the window: would have to wait
    } catch (const cfqt::RequestError& e) {
      *refused.value.lockExclusive() = e.what();
    }
    r->end();
  });
  o.handlerThreads = 0;
  auto t = startTunnel(o);
  Visitor v(edge, *t);
  for (int i = 0; i < 20; i++) {
    auto small = v.get("/small");
    KJ_EXPECT(small.status == 200 && small.body.size() == 1024, small.status, small.body.size());
  }
  auto big = v.get("/big");
  KJ_EXPECT(big.status == 200);
  KJ_EXPECT(refused.value.lockShared()->find("would block the tunnel's event loop") !=
            std::string::npos, *refused.value.lockShared());
  KJ_EXPECT(t->stop() == 0);
}

KJ_TEST("handler: over the HTTP/2 transport too") {
  EdgeProcess edge;
  auto o = handlerOptions(edge, [](std::shared_ptr<cfqt::Request> r) {
    auto body = r->readAll(1 << 20);
    r->respond(200, {{"Content-Type", "text/plain"}},
               r->method() + " " + std::to_string(body.size()));
  });
  o.protocol = "http2";
  auto t = startTunnel(o);
  Visitor v(edge, *t);
  KJ_EXPECT(v.get("/").body == "GET 0");
  auto c = v.client();
  auto request = c->request(kj::HttpMethod::POST, "/up", v.headers(), uint64_t(300000));
  auto bytes = kj::heapArray<kj::byte>(300000);
  memset(bytes.begin(), 'h', bytes.size());
  request.body->write(bytes.begin(), bytes.size()).wait(v.io.waitScope);
  request.body = nullptr;
  auto response = request.response.wait(v.io.waitScope);
  KJ_EXPECT(response.body->readAllText().wait(v.io.waitScope) == "POST 300000");
  KJ_EXPECT(t->stop() == 0);
}

// The C API: the same in-process serving through callbacks + user data.

struct CState {
  std::atomic<int> calls{0};
};

void cHandler(void* data, cfqt_request* r) {
  static_cast<CState*>(data)->calls++;
  char body[4096];
  long long got = 0;
  while (true) {
    long long n = cfqt_request_read(r, body + got, sizeof(body) - got);
    if (n <= 0) break;
    got += n;
  }
  std::string reply = std::string(cfqt_request_method(r)) + " " + cfqt_request_path(r) + " " +
                      std::to_string(got);
  for (size_t i = 0; i < cfqt_request_header_count(r); i++) {
    if (strcmp(cfqt_request_header_name(r, i), "X-Probe") == 0) {
      reply += std::string(" ") + cfqt_request_header_value(r, i);
    }
  }
  const char* headers[] = {"Content-Type", "text/plain", "X-C", "1"};
  int rc = cfqt_request_respond(r, 200, headers, 2);
  if (rc == 0) rc = cfqt_request_write(r, reply.data(), reply.size());
  if (rc == 0) rc = cfqt_request_end(r);
  int again = cfqt_request_respond(r, 200, nullptr, 0);
  if (again != -2 || strstr(cfqt_last_error(), "already answered") == nullptr) {
    static_cast<CState*>(data)->calls += 1000;
  }
  cfqt_request_free(r);
}

KJ_TEST("C API: in-process handler with blocking read/write helpers") {
  EdgeProcess edge;
  auto api = "http://" + edge.field("api");
  auto ca = edge.field("ca");
  auto edges = edge.edges();
  const char* edgeList[1] = {edges[0].c_str()};
  CState state;
  cfqt_options o;
  cfqt_options_init(&o);
  o.handler = cHandler;
  o.handler_data = &state;
  o.quick_service = api.c_str();
  o.edges = edgeList;
  o.edge_count = 1;
  o.edge_ca_file = ca.c_str();
  o.ha_connections = 1;
  o.grace_period_ms = 1000;
  o.backoff_base_ms = 20;
  o.log_level = "error";
  char error[256];
  cfqt_tunnel* t = cfqt_tunnel_start(&o, error, sizeof(error));
  KJ_ASSERT(t != nullptr, error);
  char url[256];
  KJ_ASSERT(cfqt_tunnel_wait_url(t, 20000, url, sizeof(url)) == 0);
  KJ_ASSERT(cfqt_tunnel_wait_ready(t, 20000) == 1);
  {
    kj::AsyncIoContext io = kj::setupAsyncIo();
    kj::HttpHeaderTable table;
    auto address = io.provider->getNetwork().parseAddress(edge.field("public").c_str())
        .wait(io.waitScope);
    auto client = kj::newHttpClient(io.provider->getTimer(), table, *address);
    kj::HttpHeaders headers(table);
    auto host = kj::str(url + strlen("https://"));
    headers.set(kj::HttpHeaderId::HOST, host);
    headers.add("X-Probe", "c");
    auto request = client->request(kj::HttpMethod::POST, "/c-api", headers, uint64_t(5));
    request.body->write("hello", 5).wait(io.waitScope);
    request.body = nullptr;
    auto response = request.response.wait(io.waitScope);
    KJ_EXPECT(response.statusCode == 200);
    auto body = response.body->readAllText().wait(io.waitScope);
    KJ_EXPECT(body == "POST /c-api 5 c", body);
  }
  KJ_EXPECT(state.calls == 1, state.calls.load());
  char metrics[8192];
  KJ_EXPECT(cfqt_tunnel_metrics(t, metrics, sizeof(metrics)) > 1);
  KJ_EXPECT(strstr(metrics, "cloudflared_tunnel_total_requests 1") != nullptr, metrics);
  KJ_EXPECT(cfqt_tunnel_running(t) == 1);
  KJ_EXPECT(cfqt_tunnel_stop(t) == 0);
  KJ_EXPECT(cfqt_tunnel_running(t) == 0);
  cfqt_tunnel_free(t);
}

KJ_TEST("the README's C++ example (bin/cfqt-handler-example) serves in-process") {
  EdgeProcess edge;
  auto edges = edge.edges();
  auto api = "http://" + edge.field("api");
  auto ca = edge.field("ca");
  int out[2];
  KJ_SYSCALL(pipe(out));
  pid_t pid = fork();
  KJ_ASSERT(pid >= 0);
  if (pid == 0) {
    dup2(out[1], 1);
    close(out[0]);
    setenv("CFQT_QUICK_SERVICE", api.c_str(), 1);
    setenv("CFQT_EDGE", edges[0].c_str(), 1);
    setenv("CFQT_EDGE_CA", ca.c_str(), 1);
    auto path = kj::str(getenv("CFQT_BIN_DIR"), "/cfqt-handler-example");
    execl(path.cStr(), path.cStr(), static_cast<char*>(nullptr));
    _exit(127);
  }
  close(out[1]);
  std::string url;
  char c;
  struct pollfd p = {out[0], POLLIN, 0};
  while (poll(&p, 1, 20000) == 1 && read(out[0], &c, 1) == 1 && c != '\n') url.push_back(c);
  close(out[0]);
  KJ_ASSERT(url.rfind("https://", 0) == 0, url);
  {
    kj::AsyncIoContext io = kj::setupAsyncIo();
    kj::HttpHeaderTable table;
    auto address = io.provider->getNetwork().parseAddress(edge.field("public").c_str())
        .wait(io.waitScope);
    auto client = kj::newHttpClient(io.provider->getTimer(), table, *address);
    kj::HttpHeaders headers(table);
    auto host = kj::str(url.substr(8).c_str());
    headers.set(kj::HttpHeaderId::HOST, host);
    auto response = client->request(kj::HttpMethod::GET, "/hi", headers).response
        .wait(io.waitScope);
    auto body = response.body->readAllText().wait(io.waitScope);
    KJ_EXPECT(body == "Hello from C++, served in-process by cfqt: /hi\n", body);
    auto post = client->request(kj::HttpMethod::POST, "/up", headers, uint64_t(100000));
    auto bytes = kj::heapArray<kj::byte>(100000);
    memset(bytes.begin(), 'u', bytes.size());
    post.body->write(bytes.begin(), bytes.size()).wait(io.waitScope);
    post.body = nullptr;
    auto posted = post.response.wait(io.waitScope);
    KJ_EXPECT(posted.body->readAllText().wait(io.waitScope) == "received 100000 bytes\n");
  }
  kill(pid, SIGTERM);
  int status = 0;
  KJ_EXPECT(waitpid(pid, &status, 0) == pid);
  KJ_EXPECT(WIFEXITED(status) && WEXITSTATUS(status) == 0, status);
}

KJ_TEST("handler: invalid combinations are refused") {
  cfqt::TunnelOptions o;
  o.handler = [](std::shared_ptr<cfqt::Request>) {};
  o.url = "http://localhost:8080";
  bool threw = false;
  try { cfqt::Tunnel::start(o); } catch (const cfqt::TunnelError& e) {
    threw = std::string(e.what()).find("either handler or an origin") != std::string::npos;
  }
  KJ_EXPECT(threw);
  o.url.clear();
  o.handlerThreads = -1;
  threw = false;
  try { cfqt::Tunnel::start(o); } catch (const cfqt::TunnelError& e) { threw = true; }
  KJ_EXPECT(threw);
}

}  // namespace
}  // namespace cfqt::tunnel
