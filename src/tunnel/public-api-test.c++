// The public C++ and C APIs against a real cfqt-edge subprocess (CFQT_BIN_DIR).

#include "cfqt/cfqt.h"
#include "cfqt/tunnel.h"

#include <kj/debug.h>
#include <kj/test.h>
#include <kj/thread.h>
#include <kj/vector.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <string>

namespace cfqt::tunnel {
namespace {

struct EdgeProcess {
  pid_t pid = -1;
  std::string ready;

  explicit EdgeProcess(std::vector<std::string> extra = {}) {
    const char* bin = getenv("CFQT_BIN_DIR");
    if (bin == nullptr) KJ_FAIL_REQUIRE("CFQT_BIN_DIR must point at the build's bin/");
    auto path = kj::str(bin, "/cfqt-edge");
    char stateTemplate[] = "/tmp/cfqt-api-test-XXXXXX";
    KJ_ASSERT(mkdtemp(stateTemplate) != nullptr);
    int fds[2];
    KJ_SYSCALL(pipe(fds));
    pid = fork();
    KJ_ASSERT(pid >= 0);
    if (pid == 0) {
      dup2(fds[1], 1);
      close(fds[0]);
      // Unwind and exit() on SIGTERM instead of _exit(): destructors and (in sanitizer builds)
      // the leak check run, and their findings show in the exit status.
      setenv("KJ_CLEAN_SHUTDOWN", "1", 1);
      std::vector<std::string> args = {path.cStr(), "--state-dir", stateTemplate,
          "--edge-listen", "127.0.0.1:0", "--edge-listen", "127.0.0.2:0", "--loglevel", "error"};
      for (auto& e: extra) args.push_back(e);
      std::vector<char*> argv;
      for (auto& a: args) argv.push_back(const_cast<char*>(a.c_str()));
      argv.push_back(nullptr);
      execv(path.cStr(), argv.data());
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
    at += 9;
    auto list = ready.substr(at, ready.find(']', at) - at);   // "a","b"
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

int httpStatus(const std::string& address, const std::string& host, const std::string& path) {
  auto colon = address.rfind(':');
  struct sockaddr_in sa = {};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(atoi(address.substr(colon + 1).c_str()));
  inet_pton(AF_INET, address.substr(0, colon).c_str(), &sa.sin_addr);
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  KJ_ASSERT(connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) == 0);
  std::string request = "GET " + path + " HTTP/1.1\r\nHost: " + host + "\r\nConnection: close\r\n\r\n";
  KJ_ASSERT(write(fd, request.data(), request.size()) == ssize_t(request.size()));
  std::string response;
  char buf[4096];
  struct pollfd p = {fd, POLLIN, 0};
  while (poll(&p, 1, 20000) == 1) {
    ssize_t n = read(fd, buf, sizeof(buf));
    if (n <= 0) break;
    response.append(buf, n);
    // Done once the head and Content-Length bytes of body are in (the front door may keep the
    // connection open for a while despite `Connection: close`).
    auto end = response.find("\r\n\r\n");
    auto length = response.find("Content-Length: ");
    if (end != std::string::npos && length != std::string::npos && length < end &&
        response.size() >= end + 4 + size_t(atol(response.c_str() + length + 16))) {
      break;
    }
  }
  close(fd);
  if (response.size() < 12) return -1;
  return atoi(response.substr(9, 3).c_str());
}

KJ_TEST("public C++ API: start, URL, ready, serve, stop") {
  EdgeProcess edge;
  cfqt::TunnelOptions o;
  o.helloWorld = true;
  o.quickService = "http://" + edge.field("api");
  o.edges = edge.edges();
  o.edgeCaFile = edge.field("ca");
  o.backoffBase = std::chrono::milliseconds(20);
  o.gracePeriod = std::chrono::milliseconds(2000);
  o.logLevel = "error";
  KJ_ASSERT(o.edges.size() == 2);
  auto t = cfqt::Tunnel::start(o);
  auto url = t->waitForUrl(std::chrono::seconds(20));
  KJ_ASSERT(url.rfind("https://", 0) == 0, url);
  KJ_EXPECT(t->hostname() == url.substr(8));
  KJ_ASSERT(t->waitUntilReady(std::chrono::seconds(20)));
  KJ_EXPECT(httpStatus(edge.field("public"), t->hostname(), "/_health") == 200);
  KJ_EXPECT(t->running());
  KJ_EXPECT(t->stop() == 0);
  KJ_EXPECT(!t->running());
  KJ_EXPECT(t->readyConnections() == 0);
  KJ_EXPECT(t->stop() == 0);   // idempotent
}

KJ_TEST("public C++ API: invalid options throw TunnelError") {
  cfqt::TunnelOptions o;
  KJ_EXPECT_THROW_MESSAGE("nothing to expose", {
    try { cfqt::Tunnel::start(o); } catch (const cfqt::TunnelError& e) {
      KJ_FAIL_ASSERT(e.what());
    }
  });
  o.url = "ssh://host:22";
  bool threw = false;
  try { cfqt::Tunnel::start(o); } catch (const cfqt::TunnelError& e) { threw = true; }
  KJ_EXPECT(threw);
  o.url = "http://localhost:8080";
  o.protocol = "udp";
  KJ_EXPECT_THROW_MESSAGE("protocol must be quic, http2 or auto", {
    try { cfqt::Tunnel::start(o); } catch (const cfqt::TunnelError& e) {
      KJ_FAIL_ASSERT(e.what());
    }
  });
  o.protocol = "auto";
  o.fallbackAfter = std::chrono::milliseconds(0);
  KJ_EXPECT_THROW_MESSAGE("fallbackAfter, quicRetryInterval and quicFailureWindow must be", {
    try { cfqt::Tunnel::start(o); } catch (const cfqt::TunnelError& e) {
      KJ_FAIL_ASSERT(e.what());
    }
  });
  o.fallbackAfter = std::chrono::milliseconds(500);
  o.quicFailureLimit = -1;
  KJ_EXPECT_THROW_MESSAGE("quicFailureLimit must not be negative", {
    try { cfqt::Tunnel::start(o); } catch (const cfqt::TunnelError& e) {
      KJ_FAIL_ASSERT(e.what());
    }
  });
  o.quicFailureLimit = 3;
  // Certificate files are checked by start(), not by each dial.
  o.originCaPool = "/nonexistent/origin-ca.pem";
  KJ_EXPECT_THROW_MESSAGE("originCaPool /nonexistent/origin-ca.pem: cannot read", {
    try { cfqt::Tunnel::start(o); } catch (const cfqt::TunnelError& e) {
      KJ_FAIL_ASSERT(e.what());
    }
  });
  o.originCaPool = "";
  o.edgeCaFile = "/proc/self/status";   // readable, not PEM
  KJ_EXPECT_THROW_MESSAGE("edgeCaFile /proc/self/status", {
    try { cfqt::Tunnel::start(o); } catch (const cfqt::TunnelError& e) {
      KJ_FAIL_ASSERT(e.what());
    }
  });
  o.edgeCaFile = "";
  o.threads = 2;
  KJ_EXPECT_THROW_MESSAGE("threads must be 0 (auto) or 1", {
    try { cfqt::Tunnel::start(o); } catch (const cfqt::TunnelError& e) {
      KJ_FAIL_ASSERT(e.what());
    }
  });
  o.threads = 0;
  o.busyPoll = std::chrono::microseconds(10001);
  KJ_EXPECT_THROW_MESSAGE("busyPoll must be between 0 (off) and 10 ms", {
    try { cfqt::Tunnel::start(o); } catch (const cfqt::TunnelError& e) {
      KJ_FAIL_ASSERT(e.what());
    }
  });
}

KJ_TEST("public C++ API: protocol http2 serves through cfqt-edge's HTTP/2 edge") {
  EdgeProcess edge;
  cfqt::TunnelOptions o;
  o.helloWorld = true;
  o.quickService = "http://" + edge.field("api");
  o.edges = edge.edges();
  o.edgeCaFile = edge.field("ca");
  o.protocol = "http2";
  o.haConnections = 1;
  o.backoffBase = std::chrono::milliseconds(20);
  o.gracePeriod = std::chrono::milliseconds(2000);
  o.logLevel = "error";
  o.busyPoll = std::chrono::microseconds(100);   // the API's loop thread polls after each frame
  auto t = cfqt::Tunnel::start(o);
  t->waitForUrl(std::chrono::seconds(20));
  KJ_ASSERT(t->waitUntilReady(std::chrono::seconds(20)));
  KJ_EXPECT(httpStatus(edge.field("public"), t->hostname(), "/_health") == 200);
  KJ_EXPECT(t->stop() == 0);
}

KJ_TEST("C API: start, wait for URL, stop, free") {
  EdgeProcess edge;
  auto api = "http://" + edge.field("api");
  auto ca = edge.field("ca");
  auto edges = edge.edges();
  const char* edgeList[2] = {edges[0].c_str(), edges[1].c_str()};
  cfqt_options o;
  cfqt_options_init(&o);
  o.hello_world = 1;
  o.quick_service = api.c_str();
  o.edges = edgeList;
  o.edge_count = 2;
  o.edge_ca_file = ca.c_str();
  o.log_level = "error";
  o.grace_period_ms = 1000;
  o.backoff_base_ms = 20;
  char error[256] = "";
  cfqt_tunnel* t = cfqt_tunnel_start(&o, error, sizeof(error));
  KJ_ASSERT(t != nullptr, error);
  char url[256];
  KJ_ASSERT(cfqt_tunnel_wait_url(t, 20000, url, sizeof(url)) == 0);
  KJ_EXPECT(strncmp(url, "https://", 8) == 0, url);
  KJ_ASSERT(cfqt_tunnel_wait_ready(t, 20000) == 1);
  KJ_EXPECT(cfqt_tunnel_ready_connections(t) >= 1);
  KJ_EXPECT(httpStatus(edge.field("public"), url + 8, "/_health") == 200);
  KJ_EXPECT(cfqt_tunnel_stop(t) == 0);
  KJ_EXPECT(cfqt_tunnel_wait_ready(t, 10) == 0);
  cfqt_tunnel_free(t);

  cfqt_options bad;
  cfqt_options_init(&bad);
  KJ_EXPECT(cfqt_tunnel_start(&bad, error, sizeof(error)) == nullptr);
  KJ_EXPECT(strstr(error, "nothing to expose") != nullptr, error);
  error[0] = '\0';
  KJ_EXPECT(cfqt_tunnel_start(nullptr, error, sizeof(error)) == nullptr);
  KJ_EXPECT(strstr(error, "nothing to expose") != nullptr, error);

  // The fields after ingress_count: 0 keeps a default, other values reach the C++ options.
  cfqt_options timing;
  cfqt_options_init(&timing);
  timing.hello_world = 1;
  timing.fallback_after_ms = -5;
  KJ_EXPECT(cfqt_tunnel_start(&timing, error, sizeof(error)) == nullptr);
  KJ_EXPECT(strstr(error, "fallbackAfter, quicRetryInterval and quicFailureWindow must be") !=
            nullptr, error);
  timing.fallback_after_ms = 0;
  timing.quic_failure_limit = -2;
  KJ_EXPECT(cfqt_tunnel_start(&timing, error, sizeof(error)) == nullptr);
  KJ_EXPECT(strstr(error, "quicFailureLimit must not be negative") != nullptr, error);
  timing.quic_failure_limit = 0;
  timing.threads = 3;
  KJ_EXPECT(cfqt_tunnel_start(&timing, error, sizeof(error)) == nullptr);
  KJ_EXPECT(strstr(error, "threads must be 0 (auto) or 1") != nullptr, error);
  timing.threads = 0;
  timing.busy_poll_us = -1;
  KJ_EXPECT(cfqt_tunnel_start(&timing, error, sizeof(error)) == nullptr);
  KJ_EXPECT(strstr(error, "busyPoll must be between 0 (off) and 10 ms") != nullptr, error);
  timing.busy_poll_us = 0;
  timing.origin_ca_pool = "/nonexistent/origin-ca.pem";
  KJ_EXPECT(cfqt_tunnel_start(&timing, error, sizeof(error)) == nullptr);
  KJ_EXPECT(strstr(error, "originCaPool /nonexistent/origin-ca.pem") != nullptr, error);
}

KJ_TEST("public C++ API: stop or destroy at awkward moments, calls from several threads") {
  EdgeProcess edge;
  auto options = [&]() {
    cfqt::TunnelOptions o;
    o.helloWorld = true;
    o.quickService = "http://" + edge.field("api");
    o.edges = edge.edges();
    o.edgeCaFile = edge.field("ca");
    o.backoffBase = std::chrono::milliseconds(20);
    o.gracePeriod = std::chrono::milliseconds(500);
    o.logLevel = "fatal";
    return o;
  };

  // Stopped right after start: before (or while) the quick tunnel is requested.
  for (int i = 0; i < 5; i++) {
    auto t = cfqt::Tunnel::start(options());
    KJ_EXPECT(t->stop() == 0);
    KJ_EXPECT(!t->running());
    KJ_EXPECT(t->readyConnections() == 0);
  }

  // Destroyed without stop(), once before registration and once while connected.
  { auto t = cfqt::Tunnel::start(options()); }
  {
    auto t = cfqt::Tunnel::start(options());
    KJ_ASSERT(t->waitUntilReady(std::chrono::seconds(20)));
  }

  // Status calls from several threads while another thread stops the tunnel.
  auto t = cfqt::Tunnel::start(options());
  KJ_ASSERT(t->waitUntilReady(std::chrono::seconds(20)));
  std::atomic<bool> done{false};
  std::atomic<int> calls{0};
  std::atomic<int> stopCode{-1};
  {
    kj::Vector<kj::Own<kj::Thread>> threads;
    for (int i = 0; i < 4; i++) {
      threads.add(kj::heap<kj::Thread>([&]() {
        while (!done.load()) {
          t->readyConnections();
          t->publicUrl();
          t->hostname();
          t->running();
          calls++;
        }
      }));
    }
    threads.add(kj::heap<kj::Thread>([&]() {
      stopCode = t->stop();
      done = true;
    }));
  }
  KJ_EXPECT(stopCode.load() == 0);
  KJ_EXPECT(calls.load() > 0);
  KJ_EXPECT(!t->running());
  KJ_EXPECT(t->stop() == 0);
}

KJ_TEST("public C++ API: a quick-tunnel service that refuses connections, stopped while retrying") {
  // A port with nothing listening: the request fails and is retried until stop().
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in sa = {};
  sa.sin_family = AF_INET;
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  KJ_SYSCALL(bind(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)));
  socklen_t len = sizeof(sa);
  KJ_SYSCALL(getsockname(fd, reinterpret_cast<sockaddr*>(&sa), &len));
  close(fd);
  cfqt::TunnelOptions o;
  o.helloWorld = true;
  o.quickService = "http://127.0.0.1:" + std::to_string(ntohs(sa.sin_port));
  o.logLevel = "fatal";
  auto t = cfqt::Tunnel::start(o);
  KJ_EXPECT(t->waitForUrl(std::chrono::milliseconds(50)) == "");
  KJ_EXPECT(t->stop() == 0);
  KJ_EXPECT(!t->running());
}

struct CapturedStderr {
  // fd 2 goes to a temporary file until restore().
  int saved = -1;
  int file = -1;
  CapturedStderr() {
    char name[] = "/tmp/cfqt-api-stderr-XXXXXX";
    file = mkstemp(name);
    KJ_ASSERT(file >= 0);
    unlink(name);
    saved = dup(2);
    dup2(file, 2);
  }
  std::string restore() {
    dup2(saved, 2);
    close(saved);
    std::string text;
    char buf[4096];
    lseek(file, 0, SEEK_SET);
    ssize_t n;
    while ((n = read(file, buf, sizeof(buf))) > 0) text.append(buf, n);
    close(file);
    return text;
  }
};

struct RecordedLine {
  cfqt::LogLevel level;
  std::string message;
  std::vector<cfqt::LogField> fields;
  std::string field(const std::string& key) const {
    for (auto& f: fields) if (f.first == key) return f.second;
    return "<none>";
  }
};

KJ_TEST("public C++ API: the log callback gets level, message and fields instead of stderr") {
  EdgeProcess edge;
  std::mutex mutex;
  std::vector<RecordedLine> lines;
  std::atomic<int> inside{0};
  std::atomic<bool> overlapped{false};
  cfqt::TunnelOptions o;
  o.helloWorld = true;
  o.quickService = "http://" + edge.field("api");
  o.edges = edge.edges();
  o.edgeCaFile = edge.field("ca");
  o.backoffBase = std::chrono::milliseconds(20);
  o.gracePeriod = std::chrono::milliseconds(2000);
  o.logLevel = "info";
  o.logCallback = [&](cfqt::LogLevel level, const std::string& message,
                      const std::vector<cfqt::LogField>& fields) {
    if (inside.fetch_add(1) != 0) overlapped = true;
    {
      std::lock_guard<std::mutex> lock(mutex);
      lines.push_back(RecordedLine{level, message, fields});
    }
    inside.fetch_sub(1);
  };
  CapturedStderr captured;
  {
    auto t = cfqt::Tunnel::start(o);
    KJ_ASSERT(t->waitUntilReady(std::chrono::seconds(20)));
    KJ_EXPECT(t->stop() == 0);
  }
  auto err = captured.restore();
  KJ_EXPECT(err.find("Registered tunnel connection") == std::string::npos, err);
  KJ_EXPECT(!overlapped);
  std::lock_guard<std::mutex> lock(mutex);
  bool registered = false;
  for (auto& line: lines) {
    KJ_EXPECT(line.level != cfqt::LogLevel::Debug, line.message);
    if (line.message == "Registered tunnel connection") {
      registered = true;
      KJ_EXPECT(line.level == cfqt::LogLevel::Info);
      KJ_EXPECT(line.fields.size() >= 2 && line.fields[0].first == "connIndex", line.fields.size());
      KJ_EXPECT(line.field("protocol") == "quic", line.field("protocol"));
    }
  }
  KJ_EXPECT(registered, lines.size());
}

struct CLines {
  std::mutex mutex;
  std::condition_variable changed;
  std::vector<std::string> lines;   // "level|message|key=value,..."
  bool retried = false;
};

void recordCLine(void* user, int level, const char* message, const cfqt_log_field* fields,
                 size_t count) {
  auto& out = *static_cast<CLines*>(user);
  std::string line = std::to_string(level) + "|" + message + "|";
  for (size_t i = 0; i < count; i++) {
    line += std::string(i > 0 ? "," : "") + fields[i].key + "=" + fields[i].value;
  }
  std::lock_guard<std::mutex> lock(out.mutex);
  if (line.rfind("2|Quick tunnel request failed; retrying|attempt=1,", 0) == 0) out.retried = true;
  out.lines.push_back(line);
  out.changed.notify_all();
}

KJ_TEST("C API: release_idle_code reaches the runner") {
  EdgeProcess edge;
  auto api = "http://" + edge.field("api");
  auto ca = edge.field("ca");
  auto edges = edge.edges();
  const char* edgeList[1] = {edges[0].c_str()};
  CLines recorded;
  cfqt_options o;
  cfqt_options_init(&o);
  KJ_EXPECT(o.release_idle_code == 0);   // off unless the host asks
  o.hello_world = 1;
  o.quick_service = api.c_str();
  o.edges = edgeList;
  o.edge_count = 1;
  o.ha_connections = 1;
  o.edge_ca_file = ca.c_str();
  o.log_level = "debug";
  o.log_callback = recordCLine;
  o.log_user_data = &recorded;
  o.release_idle_code = 1;
  char error[256] = "";
  cfqt_tunnel* t = cfqt_tunnel_start(&o, error, sizeof(error));
  KJ_ASSERT(t != nullptr, error);
  auto released = [&]() {
    for (auto& line: recorded.lines) {
      if (line.find("|Released the page-table entries of idle code|") != std::string::npos) {
        return true;
      }
    }
    return false;
  };
  {
    // The runner's check runs every second; the first quiet one after the registration releases.
    std::unique_lock<std::mutex> lock(recorded.mutex);
    recorded.changed.wait_for(lock, std::chrono::seconds(20), released);
    KJ_EXPECT(released(), recorded.lines.size());
  }
  char url[256];
  KJ_ASSERT(cfqt_tunnel_wait_url(t, 20000, url, sizeof(url)) == 0);
  KJ_EXPECT(httpStatus(edge.field("public"), url + 8, "/_health") == 200);
  KJ_EXPECT(cfqt_tunnel_stop(t) == 0);
  cfqt_tunnel_free(t);
}

KJ_TEST("C API: the log callback with user data") {
  // A quick-tunnel service that refuses connections: retries are warnings with fields.
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in sa = {};
  sa.sin_family = AF_INET;
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  KJ_SYSCALL(bind(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)));
  socklen_t len = sizeof(sa);
  KJ_SYSCALL(getsockname(fd, reinterpret_cast<sockaddr*>(&sa), &len));
  close(fd);
  auto service = "http://127.0.0.1:" + std::to_string(ntohs(sa.sin_port));
  CLines recorded;
  cfqt_options o;
  cfqt_options_init(&o);
  o.hello_world = 1;
  o.quick_service = service.c_str();
  o.log_level = "info";
  o.log_callback = recordCLine;
  o.log_user_data = &recorded;
  char error[256] = "";
  cfqt_tunnel* t = cfqt_tunnel_start(&o, error, sizeof(error));
  KJ_ASSERT(t != nullptr, error);
  {
    std::unique_lock<std::mutex> lock(recorded.mutex);
    recorded.changed.wait_for(lock, std::chrono::seconds(20), [&]() { return recorded.retried; });
  }
  cfqt_tunnel_free(t);
  std::lock_guard<std::mutex> lock(recorded.mutex);
  bool requesting = false;
  for (auto& line: recorded.lines) {
    if (line == "1|Requesting new quick Tunnel on trycloudflare.com...|") requesting = true;
  }
  std::string all;
  for (auto& line: recorded.lines) all += line + "\n";
  KJ_EXPECT(requesting, all);
  KJ_EXPECT(recorded.retried, all);
}

// ---------------------------------------------------------------------------------------------
// Readiness (issue 16): waitUntilServing() against cfqt-edge's DNS-over-TLS server and HTTPS
// front door.

std::vector<std::string> readyEdgeArgs(const char* dnsDelay, const char* routeDelay) {
  return {"--dot-listen", "127.0.0.1:0", "--public-tls-listen", "127.0.0.1:0",
          "--dns-delay", dnsDelay, "--route-delay", routeDelay};
}

cfqt::TunnelOptions readyOptions(EdgeProcess& edge) {
  cfqt::TunnelOptions o;
  o.helloWorld = true;
  o.quickService = "http://" + edge.field("api");
  o.edges = edge.edges();
  o.edgeCaFile = edge.field("ca");
  o.backoffBase = std::chrono::milliseconds(20);
  o.gracePeriod = std::chrono::milliseconds(2000);
  o.logLevel = "error";
  o.readyResolvers = {edge.field("dot") + "#localhost"};
  auto tls = edge.field("public_tls");
  o.readyPort = atoi(tls.substr(tls.rfind(':') + 1).c_str());
  o.readyCaFile = edge.field("ca");
  return o;
}

KJ_TEST("public C++ API: waitUntilServing returns once DNS and routing work") {
  EdgeProcess edge(readyEdgeArgs("300ms", "300ms"));
  auto tunnel = cfqt::Tunnel::start(readyOptions(edge));
  auto started = std::chrono::steady_clock::now();
  tunnel->waitUntilServing(std::chrono::seconds(20));
  auto took = std::chrono::steady_clock::now() - started;
  // Not before both delays (counted from the first registration) have passed.
  KJ_EXPECT(took >= std::chrono::milliseconds(300),
            std::chrono::duration_cast<std::chrono::milliseconds>(took).count());
  KJ_EXPECT(!tunnel->hostname().empty());
  tunnel->waitUntilServing(std::chrono::seconds(1));   // stays true
  KJ_EXPECT(tunnel->stop() == 0);
}

KJ_TEST("public C++ API: with waitReady, waitForUrl gives the URL only once it serves") {
  EdgeProcess edge(readyEdgeArgs("400ms", "0"));
  auto o = readyOptions(edge);
  o.waitReady = true;
  auto tunnel = cfqt::Tunnel::start(o);
  KJ_ASSERT(tunnel->waitUntilReady(std::chrono::seconds(20)));
  // Registered, but DNS is 400 ms away: no URL yet.
  KJ_EXPECT(tunnel->waitForUrl(std::chrono::milliseconds(100)).empty());
  auto url = tunnel->waitForUrl(std::chrono::seconds(20));
  KJ_EXPECT(url.rfind("https://", 0) == 0, url);
  tunnel->waitUntilServing(std::chrono::milliseconds(100));   // already serving
  KJ_EXPECT(tunnel->stop() == 0);
}

KJ_TEST("public C++ and C APIs: waitUntilServing names the stage that did not succeed") {
  EdgeProcess edge(readyEdgeArgs("1h", "0"));
  {
    auto tunnel = cfqt::Tunnel::start(readyOptions(edge));
    KJ_ASSERT(tunnel->waitUntilReady(std::chrono::seconds(20)));
    bool threw = false;
    try {
      tunnel->waitUntilServing(std::chrono::milliseconds(800));
    } catch (const cfqt::NotServingError& e) {
      threw = true;
      KJ_EXPECT(e.stage() == cfqt::ServingStage::DNS, e.what());
      KJ_EXPECT(std::string(e.what()).find("DNS") != std::string::npos, e.what());
    }
    KJ_EXPECT(threw);
    KJ_EXPECT(tunnel->stop() == 0);
  }

  EdgeProcess routing(readyEdgeArgs("0", "1h"));
  auto o = readyOptions(routing);
  auto ca = o.readyCaFile;
  auto resolver = o.readyResolvers[0];
  auto api = o.quickService;
  auto edges = routing.edges();
  const char* edgeList[] = {edges[0].c_str(), edges[1].c_str()};
  const char* resolvers[] = {resolver.c_str()};
  cfqt_options c;
  cfqt_options_init(&c);
  c.hello_world = 1;
  c.quick_service = api.c_str();
  c.edges = edgeList;
  c.edge_count = 2;
  c.edge_ca_file = ca.c_str();
  c.log_level = "error";
  c.backoff_base_ms = 20;
  c.ready_resolvers = resolvers;
  c.ready_resolver_count = 1;
  c.ready_port = o.readyPort;
  c.ready_ca_file = ca.c_str();
  char error[512];
  cfqt_tunnel* t = cfqt_tunnel_start(&c, error, sizeof error);
  KJ_ASSERT(t != nullptr, error);
  KJ_ASSERT(cfqt_tunnel_wait_ready(t, 20000) == 1);
  int stage = cfqt_tunnel_wait_serving(t, 1500, error, sizeof error);
  KJ_EXPECT(stage == CFQT_STAGE_ROUTING, stage, error);
  KJ_EXPECT(strstr(error, "routing") != nullptr, error);
  KJ_EXPECT(cfqt_tunnel_stop(t) == 0);
  cfqt_tunnel_free(t);
}


std::string httpPost(const std::string& address, const std::string& path,
                     const std::string& body) {
  // A small admin API client: the response body (Connection: close, read to EOF).
  auto colon = address.rfind(':');
  struct sockaddr_in sa = {};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(atoi(address.substr(colon + 1).c_str()));
  inet_pton(AF_INET, address.substr(0, colon).c_str(), &sa.sin_addr);
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  KJ_ASSERT(connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) == 0);
  std::string request = "POST " + path + " HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n"
                        "Content-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body;
  KJ_ASSERT(write(fd, request.data(), request.size()) == ssize_t(request.size()));
  std::string response;
  char buf[4096];
  struct pollfd p = {fd, POLLIN, 0};
  while (poll(&p, 1, 20000) == 1) {
    ssize_t n = read(fd, buf, sizeof(buf));
    if (n <= 0) break;
    response.append(buf, n);
  }
  close(fd);
  auto end = response.find("\r\n\r\n");
  KJ_ASSERT(end != std::string::npos && response.compare(9, 3, "200") == 0, response);
  return response.substr(end + 4);
}

std::string jsonField(const std::string& json, const std::string& key) {
  auto at = json.find("\"" + key + "\":\"");
  KJ_ASSERT(at != std::string::npos, key, json);
  at += key.size() + 4;
  return json.substr(at, json.find('"', at) - at);
}

KJ_TEST("public C++ and C APIs: a named tunnel by token or credentials, ingress rules in code") {
  EdgeProcess edge;
  auto created = httpPost(edge.field("admin"), "/named-tunnels", "{\"name\":\"lib\"}");
  auto id = jsonField(created, "id");
  auto token = jsonField(created, "token");
  httpPost(edge.field("admin"), "/named-tunnels/" + id + "/routes",
           "{\"hostname\":\"lib.named.localhost\"}");

  cfqt::TunnelOptions o;
  o.token = token;
  o.ingress = {{"lib.named.localhost", "^/teapot", "http_status:418"},
               {"lib.named.localhost", "", "hello_world"},
               {"", "", "http_status:404"}};
  o.edges = edge.edges();
  o.edgeCaFile = edge.field("ca");
  o.backoffBase = std::chrono::milliseconds(20);
  o.gracePeriod = std::chrono::milliseconds(2000);
  o.logLevel = "error";
  {
    auto tunnel = cfqt::Tunnel::start(o);
    KJ_ASSERT(tunnel->waitUntilReady(std::chrono::seconds(20)));
    auto front = edge.field("public");
    KJ_EXPECT(httpStatus(front, "lib.named.localhost", "/teapot/x") == 418);
    KJ_EXPECT(httpStatus(front, "lib.named.localhost", "/_health") == 200);
    KJ_EXPECT(httpStatus(front, id + ".trycloudflare.localhost", "/") == 404);
    KJ_EXPECT(tunnel->waitForUrl(std::chrono::milliseconds(1)).empty());
    KJ_EXPECT(tunnel->stop() == 0);
  }

  // The C API with the credentials file's JSON.
  auto credentialsAt = created.find("\"credentials\":");
  KJ_ASSERT(credentialsAt != std::string::npos);
  auto credentials = created.substr(credentialsAt + 14, created.find('}', credentialsAt) -
                                                        credentialsAt - 13);
  auto edges = edge.edges();
  std::vector<const char*> edgePtrs;
  for (auto& e: edges) edgePtrs.push_back(e.c_str());
  auto ca = edge.field("ca");
  cfqt_ingress_rule rules[] = {{"lib.named.localhost", nullptr, "http_status:418"},
                               {nullptr, nullptr, "http_status:404"}};
  cfqt_options c;
  cfqt_options_init(&c);
  c.credentials_json = credentials.c_str();
  c.ingress = rules;
  c.ingress_count = 2;
  c.edges = edgePtrs.data();
  c.edge_count = edgePtrs.size();
  c.edge_ca_file = ca.c_str();
  c.backoff_base_ms = 20;
  c.grace_period_ms = 2000;
  c.log_level = "error";
  char error[256] = "";
  auto t = cfqt_tunnel_start(&c, error, sizeof error);
  KJ_ASSERT(t != nullptr, error);
  KJ_EXPECT(cfqt_tunnel_wait_ready(t, 20000) == 1);
  KJ_EXPECT(httpStatus(edge.field("public"), "lib.named.localhost", "/") == 418);
  KJ_EXPECT(cfqt_tunnel_stop(t) == 0);
  cfqt_tunnel_free(t);

  // Bad credentials and rules fail at start, with the reason and never the secret.
  rules[1].service = "localhost:8080";
  KJ_EXPECT(cfqt_tunnel_start(&c, error, sizeof error) == nullptr);
  KJ_EXPECT(strstr(error, "please make sure it has a scheme") != nullptr, error);
  cfqt::TunnelOptions bad;
  bad.token = token.substr(0, token.size() / 2);
  try {
    cfqt::Tunnel::start(bad);
    KJ_FAIL_EXPECT("a truncated token was accepted");
  } catch (const cfqt::TunnelError& e) {
    KJ_EXPECT(strstr(e.what(), "Provided Tunnel token is not valid") != nullptr, e.what());
  }
}


}  // namespace
}  // namespace cfqt::tunnel
