// Tests of the origin layer against real origin processes: testdata/test-origin.py (a Python
// HTTP/1.1 + WebSocket server started per test) and Debian's nginx (keep-alive, large files).
// The edge side is a kj::newTwoWayPipe(); requests are built with the wire encoders.

#include "origin/origin.h"

#include "wire/data-stream.h"
#include "wire/http-metadata.h"
#include "eventually.h"

#include <capnp/message.h>
#include <kj/compat/http.h>
#include <kj/debug.h>
#include <kj/io.h>
#include <kj/test.h>

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <initializer_list>
#include <utility>

extern char** environ;

namespace cfqt::origin {
namespace {

using kj::uint;

constexpr uint PERIOD = 251;  // body pattern: byte i is (i % 251)
constexpr kj::StringPtr RFC_KEY = "dGhlIHNhbXBsZSBub25jZQ=="_kj;      // RFC 6455 §1.3
constexpr kj::StringPtr RFC_ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="_kj;

kj::String sourceDir() {
  const char* dir = getenv("CFQT_SOURCE_DIR");
  return kj::str(dir == nullptr ? "/work/main" : dir);
}

// A child process, killed and reaped when destroyed.
class Child {
public:
  explicit Child(kj::ArrayPtr<const kj::StringPtr> argv) {
    int fds[2];
    KJ_SYSCALL(pipe2(fds, O_CLOEXEC));
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, fds[1], 1);
    kj::Vector<char*> args;
    for (auto& arg: argv) args.add(const_cast<char*>(arg.cStr()));
    args.add(nullptr);
    int rc = posix_spawnp(&pid, args[0], &actions, nullptr, args.begin(), environ);
    posix_spawn_file_actions_destroy(&actions);
    close(fds[1]);
    out = kj::AutoCloseFd(fds[0]);
    KJ_ASSERT(rc == 0, "spawn failed", argv[0], strerror(rc));
  }
  ~Child() noexcept(false) {
    if (pid > 0) {
      kill(pid, SIGKILL);
      int status;
      waitpid(pid, &status, 0);
    }
  }
  KJ_DISALLOW_COPY(Child);

  kj::String readLine() {
    // Blocking: only used before the test's event loop runs anything.
    kj::Vector<char> line;
    for (;;) {
      char c;
      ssize_t n = read(out, &c, 1);
      KJ_ASSERT(n == 1, "child exited before printing its address");
      if (c == '\n') break;
      line.add(c);
    }
    line.add('\0');
    return kj::String(line.releaseAsArray());
  }

  pid_t pid = 0;

private:
  kj::AutoCloseFd out;
};

// The Python test origin on 127.0.0.1 (or ::1, or a unix socket).
struct PyOrigin {
  kj::Own<Child> child;
  uint port = 0;
  kj::String unixPath;

  explicit PyOrigin(kj::StringPtr mode = nullptr, kj::StringPtr path = nullptr) {
    auto script = kj::str(sourceDir(), "/src/origin/testdata/test-origin.py");
    // Debian's interpreter directly: a pyenv shim costs ~0.5 s per start.
    kj::StringPtr python = access("/usr/bin/python3", X_OK) == 0 ? "/usr/bin/python3" : "python3";
    if (mode == nullptr) {
      kj::StringPtr argv[] = {python, script};
      child = kj::heap<Child>(argv);
    } else if (path == nullptr) {
      kj::StringPtr argv[] = {python, script, mode};
      child = kj::heap<Child>(argv);
    } else if (mode == "--unix-tls") {
      auto cert = kj::str(sourceDir(), "/src/origin/testdata/tls-server.pem");
      auto key = kj::str(sourceDir(), "/src/origin/testdata/tls-server-key.pem");
      kj::StringPtr argv[] = {python, script, mode, path, cert, key};
      child = kj::heap<Child>(argv);
      unixPath = kj::str(path);
    } else {
      kj::StringPtr argv[] = {python, script, mode, path};
      child = kj::heap<Child>(argv);
      unixPath = kj::str(path);
    }
    auto line = child->readLine();
    if (line.startsWith("PORT ")) port = line.slice(5).parseAs<uint>();
  }
};

uint freePort() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr;
  memset(&addr, 0, sizeof(addr));
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  KJ_SYSCALL(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)));
  socklen_t len = sizeof(addr);
  KJ_SYSCALL(getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len));
  close(fd);
  return ntohs(addr.sin_port);
}

void waitForPort(uint port) {
  // Polls until something listens (an external process's readiness has no other signal).
  for (int i = 0; i < 500; i++) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr;
    memset(&addr, 0, sizeof(addr));
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons(port);
    int rc = connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
    close(fd);
    if (rc == 0) return;
    struct timespec ts = {0, 10 * 1000 * 1000};
    nanosleep(&ts, nullptr);
  }
  KJ_FAIL_ASSERT("nothing listens on port", port);
}

void writePatternFile(kj::StringPtr path, size_t size) {
  int fd;
  KJ_SYSCALL(fd = open(path.cStr(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  kj::FdOutputStream out{kj::AutoCloseFd(fd)};
  auto block = kj::heapArray<kj::byte>(PERIOD * 1024);
  for (size_t i = 0; i < block.size(); i++) block[i] = i % PERIOD;
  size_t written = 0;
  while (written < size) {
    size_t n = kj::min(block.size(), size - written);
    out.write(block.begin(), n);
    written += n;
  }
}

// nginx serving a temp directory on a loopback port, with stub_status at /status.
struct Nginx {
  kj::String dir;
  uint port;
  kj::Own<Child> child;

  explicit Nginx(size_t bigFileSize, bool tls = false) {
    char tmpl[] = "/tmp/cfqt-origin-nginx-XXXXXX";
    KJ_ASSERT(mkdtemp(tmpl) != nullptr);
    dir = kj::str(tmpl);
    port = freePort();
    mkdir(kj::str(dir, "/www").cStr(), 0755);
    writePatternFile(kj::str(dir, "/www/big.bin"), bigFileSize);
    writePatternFile(kj::str(dir, "/www/small.bin"), 1000);
    auto conf = kj::str(
        getuid() == 0 ? "user root;\n" : "",
        "worker_processes 1;\nerror_log ", dir, "/error.log;\npid ", dir, "/nginx.pid;\n"
        "events { worker_connections 512; }\n"
        "http {\n  access_log off;\n"
        "  client_body_temp_path ", dir, "/body;\n  proxy_temp_path ", dir, "/proxy;\n"
        "  fastcgi_temp_path ", dir, "/fcgi;\n  uwsgi_temp_path ", dir, "/uwsgi;\n"
        "  scgi_temp_path ", dir, "/scgi;\n"
        "  keepalive_timeout 60s;\n  keepalive_requests 100000;\n"
        "  server {\n    listen 127.0.0.1:", port, tls ? " ssl" : "", ";\n    root ", dir, "/www;\n",
        tls ? kj::str("    ssl_certificate ", sourceDir(), "/src/origin/testdata/tls-server.pem;\n"
                      "    ssl_certificate_key ", sourceDir(),
                      "/src/origin/testdata/tls-server-key.pem;\n")
            : kj::str(),
        "    location = /status { stub_status; }\n  }\n}\n");
    auto confPath = kj::str(dir, "/nginx.conf");
    {
      int fd;
      KJ_SYSCALL(fd = open(confPath.cStr(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
      kj::FdOutputStream(kj::AutoCloseFd(fd)).write(conf.begin(), conf.size());
    }
    kj::StringPtr argv[] = {"nginx", "-c", confPath, "-p", dir, "-g",
                            "daemon off; master_process off;"};
    child = kj::heap<Child>(argv);
    waitForPort(port);
  }
  ~Nginx() noexcept(false) {
    child = nullptr;
    auto cmd = kj::str("rm -rf '", dir, "'");
    KJ_ASSERT(system(cmd.cStr()) == 0);
  }
};

// ---------------------------------------------------------------------------------------------

struct Env {
  kj::AsyncIoContext io = kj::setupAsyncIo();
  kj::HttpHeaderTable table;
  kj::Timer& timer = io.provider->getTimer();
  kj::Network& network = io.provider->getNetwork();

  kj::Own<Origin> origin(OriginConfig config) {
    io.waitScope.poll();  // refresh the loop's timer after blocking set-up (process starts)
    auto result = Origin::create(kj::mv(config), timer, network, table);
    KJ_IF_MAYBE(error, result.tryGet<kj::String>()) {
      KJ_FAIL_ASSERT("Origin::create failed", *error);
    }
    return kj::mv(result.get<kj::Own<Origin>>());
  }

  kj::Own<Origin> origin(kj::StringPtr url) {
    auto parsed = parseOriginUrl(url);
    KJ_IF_MAYBE(error, parsed.tryGet<kj::String>()) {
      KJ_FAIL_ASSERT("bad url", url, *error);
    }
    return origin(kj::mv(parsed.get<OriginConfig>()));
  }

  template <typename Func>
  bool eventually(Func&& condition) {
    return cfqt::testing::eventually(timer, io.waitScope, kj::fwd<Func>(condition));
  }
};

OriginConfig configFor(kj::StringPtr url) {
  auto parsed = parseOriginUrl(url);
  KJ_IF_MAYBE(error, parsed.tryGet<kj::String>()) {
    KJ_FAIL_ASSERT("bad url", url, *error);
  }
  return kj::mv(parsed.get<OriginConfig>());
}

struct Reply {
  kj::Maybe<kj::String> error;
  uint status = 0;
  kj::Vector<wire::Header> headers;

  kj::Maybe<kj::StringPtr> header(kj::StringPtr name) const {
    for (auto& h: headers) {
      if (h.name == name) return h.value.asPtr();
    }
    return nullptr;
  }
  bool is(kj::StringPtr name, kj::StringPtr value) const {
    KJ_IF_MAYBE(v, header(name)) {
      return *v == value;
    }
    return false;
  }
  kj::StringPtr errorText() const {
    KJ_IF_MAYBE(e, error) {
      return *e;
    }
    return "(none)";
  }
  uint count(kj::StringPtr name) const {
    uint n = 0;
    for (auto& h: headers) {
      if (h.name == name) ++n;
    }
    return n;
  }
};

// One data stream: the test plays the edge on `edge`.
struct Call {
  kj::Own<capnp::MallocMessageBuilder> message;
  kj::Own<kj::AsyncIoStream> edge;         // test side
  kj::Own<kj::AsyncIoStream> originSide;   // given to Origin::serveStream()
  kj::Promise<void> serving = nullptr;     // after originSide: destroyed first

  Call(Origin& origin, kj::StringPtr method, kj::StringPtr dest,
       kj::ArrayPtr<const wire::Header> headers,
       wire::schema::ConnectionType type = wire::schema::ConnectionType::HTTP,
       kj::StringPtr host = "test.trycloudflare.com") {
    message = kj::heap<capnp::MallocMessageBuilder>();
    auto request = message->initRoot<wire::schema::ConnectRequest>();
    wire::encodeRequest(request, dest, type, method, host, headers);
    auto pipe = kj::newTwoWayPipe();
    edge = kj::mv(pipe.ends[0]);
    originSide = kj::mv(pipe.ends[1]);
    serving = origin.serveStream(*originSide, request.asReader()).eagerlyEvaluate(nullptr);
  }

  Reply reply(kj::WaitScope& ws) {
    auto reader = wire::readConnectResponse(*edge).wait(ws);
    auto decoded = wire::decodeResponse(reader->getRoot<wire::schema::ConnectResponse>());
    KJ_IF_MAYBE(e, decoded.tryGet<wire::WireError>()) {
      KJ_FAIL_ASSERT("bad ConnectResponse", e->toString());
    }
    auto& head = decoded.get<wire::HttpResponseHead>();
    Reply r;
    r.error = kj::mv(head.error);
    r.status = head.status;
    r.headers = kj::mv(head.headers);
    return r;
  }

  kj::String body(kj::WaitScope& ws) { return edge->readAllText(128 << 20).wait(ws); }

  void writeBody(kj::WaitScope& ws, kj::StringPtr text) {
    edge->write(text.begin(), text.size()).wait(ws);
    edge->shutdownWrite();
  }

  void done(kj::WaitScope& ws) { serving.wait(ws); }
};

kj::Array<wire::Header> hdrs(std::initializer_list<std::pair<kj::StringPtr, kj::StringPtr>> list) {
  auto out = kj::heapArrayBuilder<wire::Header>(list.size());
  for (auto& p: list) out.add(wire::Header{kj::str(p.first), kj::str(p.second)});
  return out.finish();
}

// Writes `size` pattern bytes in 64 KiB pieces, then FIN.
kj::Promise<void> writePattern(kj::AsyncIoStream& out, uint64_t size, uint64_t offset,
                               kj::Own<kj::Array<kj::byte>> buffer) {
  if (offset == size) {
    out.shutdownWrite();
    return kj::READY_NOW;
  }
  size_t n = kj::min(uint64_t(buffer->size()), size - offset);
  for (size_t i = 0; i < n; i++) (*buffer)[i] = (offset + i) % PERIOD;
  auto promise = out.write(buffer->begin(), n);
  return promise.then([&out, size, offset, n, buffer = kj::mv(buffer)]() mutable {
    return writePattern(out, size, offset + n, kj::mv(buffer));
  });
}

kj::Promise<void> writePattern(kj::AsyncIoStream& out, uint64_t size) {
  return writePattern(out, size, 0, kj::heap(kj::heapArray<kj::byte>(64 * 1024)));
}

struct PatternResult {
  uint64_t length = 0;
  bool ok = true;
};

// Reads to EOF, checking the pattern as bytes arrive (nothing is accumulated).
kj::Promise<PatternResult> readPattern(kj::AsyncInputStream& in, PatternResult so,
                                       kj::Own<kj::Array<kj::byte>> buffer) {
  auto promise = in.tryRead(buffer->begin(), 1, buffer->size());
  return promise.then([&in, so, buffer = kj::mv(buffer)](size_t n) mutable
                          -> kj::Promise<PatternResult> {
    if (n == 0) return so;
    for (size_t i = 0; i < n; i++) {
      if ((*buffer)[i] != (so.length + i) % PERIOD) so.ok = false;
    }
    so.length += n;
    return readPattern(in, so, kj::mv(buffer));
  });
}

kj::Promise<PatternResult> readPattern(kj::AsyncInputStream& in) {
  return readPattern(in, PatternResult(), kj::heap(kj::heapArray<kj::byte>(64 * 1024)));
}

kj::String directGet(Env& env, uint port, kj::StringPtr path) {
  // A request straight to the test origin (not through the proxy), e.g. /ack, /stats.
  auto& ws = env.io.waitScope;
  auto addr = env.network.parseAddress("127.0.0.1", port).wait(ws);
  auto conn = addr->connect().wait(ws);
  auto req = kj::str("GET ", path, " HTTP/1.1\r\nHost: direct\r\nConnection: close\r\n\r\n");
  conn->write(req.begin(), req.size()).wait(ws);
  return conn->readAllText(1 << 20).wait(ws);
}

uint64_t jsonNumber(kj::StringPtr json, kj::StringPtr key) {
  auto needle = kj::str("\"", key, "\": ");
  for (size_t i = 0; i + needle.size() <= json.size(); i++) {
    if (json.slice(i).startsWith(needle)) {
      uint64_t v = 0;
      for (size_t j = i + needle.size(); j < json.size() && json[j] >= '0' && json[j] <= '9'; j++) {
        v = v * 10 + (json[j] - '0');
      }
      return v;
    }
  }
  KJ_FAIL_ASSERT("key not in JSON", key, json);
}

bool contains(kj::StringPtr text, kj::StringPtr part) {
  if (part.size() > text.size()) return false;
  for (size_t i = 0; i + part.size() <= text.size(); i++) {
    if (memcmp(text.begin() + i, part.begin(), part.size()) == 0) return true;
  }
  return false;
}

// =============================================================================================

KJ_TEST("parseOriginUrl normalises --url like cloudflared") {
  auto ok = [](kj::StringPtr url) -> OriginConfig {
    auto r = parseOriginUrl(url);
    KJ_IF_MAYBE(e, r.tryGet<kj::String>()) {
      KJ_FAIL_ASSERT("unexpected error", url, *e);
    }
    return kj::mv(r.get<OriginConfig>());
  };
  auto bad = [](kj::StringPtr url) -> kj::String {
    auto r = parseOriginUrl(url);
    KJ_IF_MAYBE(e, r.tryGet<kj::String>()) {
      return kj::mv(*e);
    }
    KJ_FAIL_ASSERT("expected an error", url);
  };

  auto a = ok("localhost:8080");
  KJ_EXPECT(a.kind == OriginKind::HTTP);
  KJ_EXPECT(a.host == "localhost");
  KJ_EXPECT(a.port == 8080);
  KJ_EXPECT(a.toString() == "http://localhost:8080");
  KJ_EXPECT(ok("http://example.com/some/path?x=1").toString() == "http://example.com:80");
  KJ_EXPECT(ok("https://Example.COM").toString() == "https://example.com:443");
  KJ_EXPECT(ok("127.0.0.1:3000").toString() == "http://127.0.0.1:3000");
  auto v6 = ok("http://[::1]:9000/");
  KJ_EXPECT(v6.host == "::1");
  KJ_EXPECT(v6.port == 9000);
  KJ_EXPECT(v6.toString() == "http://[::1]:9000");
  KJ_EXPECT(ok("HTTP://localhost:1").kind == OriginKind::HTTP);
  auto u = ok("unix:/run/app.sock");
  KJ_EXPECT(u.kind == OriginKind::UNIX);
  KJ_EXPECT(u.unixPath == "/run/app.sock");
  auto s = ok("http_status:404");
  KJ_EXPECT(s.kind == OriginKind::HTTP_STATUS);
  KJ_EXPECT(s.status == 404);
  KJ_EXPECT(ok("hello-world").kind == OriginKind::HELLO_WORLD);

  KJ_EXPECT(contains(bad("tcp://localhost:22"), "not supported"));
  KJ_EXPECT(contains(bad("ssh://localhost:22"), "not supported"));
  KJ_EXPECT(contains(bad("rdp://localhost"), "not supported"));
  KJ_EXPECT(contains(bad("smb://localhost"), "not supported"));
  KJ_EXPECT(contains(bad("ftp://localhost"), "unsupported scheme"));
  bad("");
  bad("http://");
  bad("http://local host");
  bad("http://localhost:99999");
  bad("http://localhost:abc");
  bad("http://::1:80");
  bad("http_status:abc");
  bad("http_status:999");
  bad("unix:");
  bad("unix+tls:");
  auto ut = ok("unix+tls:/run/app.sock");
  KJ_EXPECT(ut.kind == OriginKind::UNIX_TLS);
  KJ_EXPECT(ut.unixPath == "/run/app.sock");
  KJ_EXPECT(ut.toString() == "unix+tls:/run/app.sock");
}

KJ_TEST("start-up errors: --no-tls-verify, unreadable --origin-ca-pool") {
  Env env;
  auto c1 = configFor("https://localhost:8443");
  c1.noTlsVerify = true;
  auto r1 = Origin::create(kj::mv(c1), env.timer, env.network, env.table);
  KJ_EXPECT(contains(KJ_ASSERT_NONNULL(r1.tryGet<kj::String>()), "not supported yet"));

  auto c2 = configFor("https://localhost:8443");
  c2.caPool = kj::str("/nonexistent/ca.pem");
  auto r2 = Origin::create(kj::mv(c2), env.timer, env.network, env.table);
  KJ_EXPECT(contains(KJ_ASSERT_NONNULL(r2.tryGet<kj::String>()), "/nonexistent/ca.pem"));
}

struct CountingObserver final: public OriginObserver {
  kj::Vector<uint> heads;
  uint failures = 0;
  void responseHead(uint statusCode) override { heads.add(statusCode); }
  void requestFailed() override { ++failures; }
};

KJ_TEST("http_status origin, tcp type and unknown methods answer without an origin") {
  Env env;
  auto& ws = env.io.waitScope;
  auto origin = env.origin("http_status:418");
  CountingObserver observer;
  origin->setObserver(observer);
  {
    Call call(*origin, "GET", "https://x/y", nullptr);
    auto r = call.reply(ws);
    KJ_EXPECT(r.error == nullptr);
    KJ_EXPECT(r.status == 418);
    KJ_EXPECT(call.body(ws) == "");
    call.done(ws);
  }
  KJ_EXPECT(observer.heads.size() == 1 && observer.heads[0] == 418);
  KJ_EXPECT(observer.failures == 0);
  auto refused = env.origin("http://127.0.0.1:1");
  CountingObserver refusedObserver;
  refused->setObserver(refusedObserver);
  {
    Call call(*refused, "GET", "10.0.0.1:22", nullptr, wire::schema::ConnectionType::TCP);
    auto r = call.reply(ws);
    KJ_EXPECT(contains(KJ_ASSERT_NONNULL(r.error), "not supported"));
    call.done(ws);
  }
  {
    Call call(*refused, "BREW", "/pot", nullptr);
    auto r = call.reply(ws);
    KJ_EXPECT(contains(KJ_ASSERT_NONNULL(r.error), "BREW"));
    call.done(ws);
  }
  {
    Call call(*refused, "GET", "/bad path", nullptr);
    auto r = call.reply(ws);
    KJ_EXPECT(r.error != nullptr);
    call.done(ws);
  }
  // Each answered error is one failed request (request_errors), none is a response head.
  KJ_EXPECT(refusedObserver.failures == 3, refusedObserver.failures);
  KJ_EXPECT(refusedObserver.heads.size() == 0);
}

KJ_TEST("methods, Host, header stripping and canonical response headers") {
  Env env;
  auto& ws = env.io.waitScope;
  PyOrigin py;
  auto origin = env.origin(kj::str("http://127.0.0.1:", py.port));
  for (auto method: {"GET"_kj, "POST"_kj, "PUT"_kj, "DELETE"_kj, "PATCH"_kj, "OPTIONS"_kj}) {
    auto headers = hdrs({{"Cf-Cloudflared-Proxy-Connection-Upgrade", "Websocket"},
                         {"Cf-Trace-Id", "1:2:3:1"},
                         {"Expect", "100-continue"},
                         {"Cookie", "a=1"},
                         {"Cookie", "b=2"},
                         {"Cf-Connecting-Ip", "192.0.2.1"},
                         {"Connection", "close"}});
    Call call(*origin, method, "https://test.trycloudflare.com/upload?q=1#frag", headers);
    auto r = call.reply(ws);
    KJ_EXPECT(r.error == nullptr, r.errorText());
    KJ_EXPECT(r.status == 200);
    KJ_EXPECT(r.is("Content-Type", kj::StringPtr("application/json")));
    KJ_EXPECT(r.count("X-Multi") == 2);
    auto body = call.body(ws);
    call.done(ws);
    KJ_EXPECT(contains(body, kj::str("\"method\": \"", method, "\"")), body);
    KJ_EXPECT(contains(body, "\"path\": \"/upload?q=1\""), body);
    KJ_EXPECT(contains(body, "\"Host\": \"test.trycloudflare.com\""), body);
    KJ_EXPECT(contains(body, "[\"Cookie\", \"a=1\"], [\"Cookie\", \"b=2\"]"), body);
    KJ_EXPECT(contains(body, "\"Cf-Connecting-Ip\": \"192.0.2.1\""), body);
    KJ_EXPECT(contains(body, "\"Connection\": \"keep-alive\""), body);
    KJ_EXPECT(!contains(body, "Cf-Cloudflared"), body);
    KJ_EXPECT(!contains(body, "Cf-Trace-Id"), body);
    KJ_EXPECT(!contains(body, "Expect"), body);
    KJ_EXPECT(!contains(body, "X-Forwarded-Host"), body);
  }

  // --http-host-header: Host replaced, X-Forwarded-Host carries the original.
  auto config = configFor(kj::str("127.0.0.1:", py.port));
  config.httpHostHeader = kj::str("internal.example");
  config.connectorId = kj::str("8c6ee8d0-6a4f-4a37-9d7c-1b1f3a1f4e42");
  auto rewriting = env.origin(kj::mv(config));
  Call call(*rewriting, "get", "/headers", hdrs({{"Cf-Warp-Tag-Id", "spoofed"}}));
  auto r = call.reply(ws);
  KJ_EXPECT(r.status == 200);
  auto body = call.body(ws);
  call.done(ws);
  KJ_EXPECT(contains(body, "\"Host\": \"internal.example\""), body);
  KJ_EXPECT(contains(body, "\"X-Forwarded-Host\": \"test.trycloudflare.com\""), body);
  KJ_EXPECT(contains(body, "\"Cf-Warp-Tag-Id\": \"8c6ee8d0-6a4f-4a37-9d7c-1b1f3a1f4e42\""), body);
  KJ_EXPECT(!contains(body, "spoofed"), body);

  // No HttpHost: the host of an absolute dest.
  Call noHost(*origin, "GET", "http://from-dest.example:8080/headers", nullptr,
              wire::schema::ConnectionType::HTTP, "");
  KJ_EXPECT(noHost.reply(ws).status == 200);
  auto noHostBody = noHost.body(ws);
  noHost.done(ws);
  KJ_EXPECT(contains(noHostBody, "\"Host\": \"from-dest.example:8080\""), noHostBody);
}

KJ_TEST("request bodies 0 B .. 64 MiB, Content-Length and chunked, pattern-checked") {
  Env env;
  auto& ws = env.io.waitScope;
  PyOrigin py;
  auto origin = env.origin(kj::str("http://127.0.0.1:", py.port));
  struct Case {
    uint64_t size;
    bool chunked;
  };
  Case cases[] = {{0, false}, {1, false}, {65535, false}, {1 << 20, true}, {0, true},
                  {64ull << 20, false}, {8ull << 20, true}};
  for (auto& c: cases) {
    auto headers = c.chunked ? hdrs({{"Transfer-Encoding", "chunked"}})
                             : hdrs({{"Content-Length", kj::str(c.size)}});
    Call call(*origin, "POST", "/upload", headers);
    auto writing = writePattern(*call.edge, c.size).eagerlyEvaluate(nullptr);
    auto r = call.reply(ws);
    KJ_EXPECT(r.status == 200, c.size);
    auto body = call.body(ws);
    call.done(ws);
    writing.wait(ws);
    KJ_EXPECT(jsonNumber(body, "length") == c.size, c.size, c.chunked, body);
    KJ_EXPECT(contains(body, "\"pattern_ok\": true"), body);
    if (c.chunked) {
      KJ_EXPECT(contains(body, "\"Transfer-Encoding\": \"chunked\""), body);
    } else if (c.size == 0) {
      KJ_EXPECT(contains(body, "\"Content-Length\": \"0\""), body);  // POST without body
    }
  }
  KJ_EXPECT(origin->bufferedBytes() == 0);
}

KJ_TEST("response bodies 0 B .. 64 MiB, Content-Length and chunked; streaming echo both ways") {
  Env env;
  auto& ws = env.io.waitScope;
  PyOrigin py;
  auto origin = env.origin(kj::str("http://127.0.0.1:", py.port));
  struct Case {
    uint64_t size;
    bool chunked;
  };
  Case cases[] = {{0, false}, {1, false}, {100000, true}, {0, true}, {64ull << 20, false},
                  {16ull << 20, true}};
  for (auto& c: cases) {
    Call call(*origin, "GET", kj::str("/bytes?n=", c.size, "&chunked=", c.chunked ? 1 : 0),
              nullptr);
    auto r = call.reply(ws);
    KJ_EXPECT(r.status == 200);
    if (c.chunked) {
      KJ_EXPECT(r.header("Content-Length") == nullptr);
      KJ_EXPECT(r.header("Transfer-Encoding") == nullptr);
    } else {
      KJ_EXPECT(r.is("Content-Length", kj::str(c.size)));
    }
    auto result = readPattern(*call.edge).wait(ws);
    call.done(ws);
    KJ_EXPECT(result.length == c.size, c.size);
    KJ_EXPECT(result.ok);
  }

  // Echo: the origin writes each chunk back as it reads it; both directions run at once.
  uint64_t size = 4 << 20;
  Call call(*origin, "POST", "/echo", hdrs({{"Transfer-Encoding", "chunked"}}));
  auto writing = writePattern(*call.edge, size).eagerlyEvaluate(nullptr);
  auto r = call.reply(ws);
  KJ_EXPECT(r.status == 200);
  auto result = readPattern(*call.edge).wait(ws);
  writing.wait(ws);
  call.done(ws);
  KJ_EXPECT(result.length == size);
  KJ_EXPECT(result.ok);
  KJ_EXPECT(origin->getStats().maxBufferedBytes <= 2 * PUMP_BUFFER_SIZE);
}

KJ_TEST("Expect: 100-continue is stripped; an unsolicited 100 is skipped") {
  Env env;
  auto& ws = env.io.waitScope;
  PyOrigin py;
  auto origin = env.origin(kj::str("http://127.0.0.1:", py.port));
  {
    Call call(*origin, "PUT", "/upload",
              hdrs({{"Expect", "100-continue"}, {"Content-Length", "1000"}}));
    auto writing = writePattern(*call.edge, 1000).eagerlyEvaluate(nullptr);
    auto r = call.reply(ws);
    KJ_EXPECT(r.status == 200);
    auto body = call.body(ws);
    writing.wait(ws);
    call.done(ws);
    KJ_EXPECT(jsonNumber(body, "length") == 1000);
    KJ_EXPECT(!contains(body, "Expect"), body);
  }
  {
    Call call(*origin, "GET", "/continue", nullptr);
    auto r = call.reply(ws);
    KJ_EXPECT(r.status == 200);
    KJ_EXPECT(call.body(ws) == "{\"after\": \"continue\"}");
    call.done(ws);
  }
}

KJ_TEST("HEAD, 204 and 304 have no body") {
  Env env;
  auto& ws = env.io.waitScope;
  PyOrigin py;
  auto origin = env.origin(kj::str("http://127.0.0.1:", py.port));
  {
    Call call(*origin, "HEAD", "/anything", nullptr);
    auto r = call.reply(ws);
    KJ_EXPECT(r.status == 200);
    KJ_EXPECT(r.is("Content-Length", kj::StringPtr("12345")));
    KJ_EXPECT(call.body(ws) == "");
    call.done(ws);
  }
  for (uint code: {204u, 304u}) {
    Call call(*origin, "GET", kj::str("/status?code=", code), nullptr);
    auto r = call.reply(ws);
    KJ_EXPECT(r.status == code);
    KJ_EXPECT(r.is("X-Status", kj::str(code)));
    KJ_EXPECT(call.body(ws) == "");
    call.done(ws);
  }
  // All on one connection: the bodies were delimited correctly.
  KJ_EXPECT(origin->getStats().connectionsOpened == 1, origin->getStats().connectionsOpened);
}

KJ_TEST("SSE: the origin writes event k+1 only after event k went through the proxy") {
  Env env;
  auto& ws = env.io.waitScope;
  PyOrigin py;
  auto origin = env.origin(kj::str("http://127.0.0.1:", py.port));
  Call call(*origin, "GET", "/sse?id=s1&count=5", hdrs({{"Accept", "text/event-stream"}}));
  auto r = call.reply(ws);
  KJ_EXPECT(r.status == 200);
  KJ_EXPECT(r.is("Content-Type", kj::StringPtr("text/event-stream")));
  kj::byte buffer[256];
  for (uint k = 0; k < 5; k++) {
    auto expected = kj::str("data: event ", k, "\n\n");
    size_t got = 0;
    while (got < expected.size()) {
      size_t n = call.edge->tryRead(buffer + got, 1, expected.size() - got).wait(ws);
      KJ_ASSERT(n > 0, "stream ended early", k);
      got += n;
    }
    KJ_EXPECT(kj::heapString(reinterpret_cast<char*>(buffer), got) == expected);
    directGet(env, py.port, kj::str("/ack?id=s1&k=", k));
  }
  KJ_EXPECT(call.body(ws) == "");
  call.done(ws);
}

// ---------------------------------------------------------------------------------------------
// WebSocket, raw frames on the edge side.

kj::Array<kj::byte> frame(kj::byte first, kj::ArrayPtr<const kj::byte> payload) {
  // A masked client frame.
  kj::Vector<kj::byte> out;
  out.add(first);
  if (payload.size() < 126) {
    out.add(0x80 | payload.size());
  } else {
    out.add(0x80 | 126);
    out.add(payload.size() >> 8);
    out.add(payload.size() & 0xff);
  }
  kj::byte mask[4] = {0x12, 0x34, 0x56, 0x78};
  out.addAll(kj::arrayPtr(mask, 4));
  for (size_t i = 0; i < payload.size(); i++) out.add(payload[i] ^ mask[i % 4]);
  return out.releaseAsArray();
}

struct Frame {
  kj::byte first;
  kj::Array<kj::byte> payload;
};

Frame readFrame(kj::AsyncInputStream& in, kj::WaitScope& ws) {
  kj::byte head[2];
  in.read(head, 2).wait(ws);
  KJ_ASSERT((head[1] & 0x80) == 0, "server frames are not masked");
  uint64_t len = head[1] & 0x7f;
  if (len == 126) {
    kj::byte ext[2];
    in.read(ext, 2).wait(ws);
    len = (ext[0] << 8) | ext[1];
  } else if (len == 127) {
    kj::byte ext[8];
    in.read(ext, 8).wait(ws);
    len = 0;
    for (auto b: ext) len = (len << 8) | b;
  }
  auto payload = kj::heapArray<kj::byte>(len);
  if (len > 0) in.read(payload.begin(), len).wait(ws);
  return {head[0], kj::mv(payload)};
}

void webSocketEcho(kj::AsyncIoStream& edge, kj::WaitScope& ws, uint messages) {
  for (uint i = 0; i < messages; i++) {
    auto text = kj::str("message ", i, " ", kj::repeat('x', i % 300));
    auto bytes = text.asBytes();
    if (i % 10 == 3) {
      // Ping: answered by the origin with a pong carrying the same payload.
      auto ping = kj::str("ping", i);
      auto f = frame(0x89, ping.asBytes());
      edge.write(f.begin(), f.size()).wait(ws);
      auto pong = readFrame(edge, ws);
      KJ_EXPECT(pong.first == 0x8A, pong.first);
      KJ_EXPECT(pong.payload == ping.asBytes());
    }
    if (i % 7 == 1 && bytes.size() >= 3) {
      // Fragmented: three frames, FIN only on the last.
      size_t third = bytes.size() / 3;
      auto f1 = frame(0x01, bytes.slice(0, third));
      auto f2 = frame(0x00, bytes.slice(third, 2 * third));
      auto f3 = frame(0x80, bytes.slice(2 * third, bytes.size()));
      kj::ArrayPtr<const kj::byte> pieces[] = {f1, f2, f3};
      edge.write(pieces).wait(ws);
    } else {
      auto f = frame(0x81, bytes);
      edge.write(f.begin(), f.size()).wait(ws);
    }
    auto echo = readFrame(edge, ws);
    KJ_EXPECT(echo.first == 0x81, echo.first, i);
    KJ_EXPECT(echo.payload == bytes, i);
  }
  kj::byte code[2] = {0x03, 0xe8};  // 1000
  auto close = frame(0x88, kj::arrayPtr(code, 2));
  edge.write(close.begin(), close.size()).wait(ws);
  auto reply = readFrame(edge, ws);
  KJ_EXPECT(reply.first == 0x88);
}

KJ_TEST("WebSocket pass-through: key forwarded, 1000 messages incl. fragments and pings") {
  Env env;
  auto& ws = env.io.waitScope;
  PyOrigin py;
  auto origin = env.origin(kj::str("http://127.0.0.1:", py.port));
  Call call(*origin, "GET", "https://test.trycloudflare.com/ws",
            hdrs({{"Sec-WebSocket-Key", RFC_KEY},
                  {"Cf-Cloudflared-Proxy-Connection-Upgrade", "Websocket"},
                  {"Sec-WebSocket-Protocol", "chat"}}),
            wire::schema::ConnectionType::WEBSOCKET);
  auto r = call.reply(ws);
  KJ_EXPECT(r.error == nullptr, r.errorText());
  KJ_ASSERT(r.status == 101, r.status);
  KJ_EXPECT(r.is("Sec-Websocket-Accept", RFC_ACCEPT));
  KJ_EXPECT(r.is("X-Origin-Saw-Key", RFC_KEY));
  KJ_EXPECT(r.is("Upgrade", kj::StringPtr("websocket")));
  webSocketEcho(*call.edge, ws, 1000);
  KJ_EXPECT(call.body(ws) == "");  // origin closed → FIN
  call.done(ws);

  // A WebSocket request to a path that refuses the upgrade: an ordinary HTTP response.
  Call refused(*origin, "GET", "/upload", hdrs({{"Sec-WebSocket-Key", RFC_KEY}}),
               wire::schema::ConnectionType::WEBSOCKET);
  auto r2 = refused.reply(ws);
  KJ_EXPECT(r2.status == 200);
  KJ_EXPECT(contains(refused.body(ws), "\"Upgrade\": \"websocket\""));
  refused.done(ws);
}

// ---------------------------------------------------------------------------------------------

KJ_TEST("origin failures: refused, connect timeout, dies mid-body, closes before the head") {
  Env env;
  auto& ws = env.io.waitScope;
  {
    auto port = freePort();
    auto origin = env.origin(kj::str("http://127.0.0.1:", port));
    Call call(*origin, "GET", "/", nullptr);
    auto r = call.reply(ws);
    auto& error = KJ_ASSERT_NONNULL(r.error);
    KJ_EXPECT(error.startsWith("Unable to reach the origin service. The service may be down or it "
                               "may not be responding to traffic from cloudflared: "), error);
    KJ_EXPECT(contains(error, kj::str(": dial tcp 127.0.0.1:", port, ": connect: connection refused")),
              error);
    KJ_EXPECT(call.body(ws) == "");
    call.done(ws);
  }
  {
    // A listener with a full backlog that never accepts: SYNs are dropped, connect() hangs.
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr;
    memset(&addr, 0, sizeof(addr));
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    KJ_SYSCALL(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)));
    KJ_SYSCALL(listen(fd, 0));
    socklen_t len = sizeof(addr);
    KJ_SYSCALL(getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len));
    kj::AutoCloseFd listener(fd);
    kj::Vector<kj::AutoCloseFd> fillers;
    for (int i = 0; i < 4; i++) {
      int c = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
      connect(c, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
      fillers.add(kj::AutoCloseFd(c));
    }
    auto config = configFor(kj::str("127.0.0.1:", ntohs(addr.sin_port)));
    config.connectTimeout = 200 * kj::MILLISECONDS;
    auto origin = env.origin(kj::mv(config));
    Call call(*origin, "GET", "/", nullptr);
    auto r = call.reply(ws);
    auto& error = KJ_ASSERT_NONNULL(r.error);
    KJ_EXPECT(contains(error, "i/o timeout"), error);
    call.done(ws);
  }
  {
    PyOrigin py;
    auto origin = env.origin(kj::str("http://127.0.0.1:", py.port));
    Call call(*origin, "GET", "/die?n=100000", nullptr);
    auto r = call.reply(ws);
    KJ_EXPECT(r.status == 200);
    auto reading = readPattern(*call.edge).eagerlyEvaluate(nullptr);
    // After the head the proxy can only ask for a reset: serveStream() rejects, no FIN.
    KJ_EXPECT_THROW_MESSAGE("stream must be reset", call.done(ws));
    call.originSide = nullptr;  // what the caller's reset looks like from here: the stream ends
    auto result = reading.wait(ws);
    KJ_EXPECT(result.length == 100000, result.length);
    KJ_EXPECT(result.ok);

    // Closed without any response on a fresh connection: no retry, an error answer.
    Call closed(*origin, "GET", "/close-now", nullptr);
    auto r2 = closed.reply(ws);
    KJ_EXPECT(contains(r2.errorText(), "origin closed the connection without a response"),
              r2.errorText());
    closed.done(ws);

    // The edge ends the request body short of its Content-Length.
    Call shortBody(*origin, "POST", "/upload", hdrs({{"Content-Length", "100"}}));
    shortBody.writeBody(ws, "only a few bytes");
    auto r3 = shortBody.reply(ws);
    KJ_EXPECT(contains(r3.errorText(), "Incoming request ended abruptly"), r3.errorText());
    shortBody.done(ws);
  }
}

KJ_TEST("origin stops reading: the buffered-byte gauge stays within one pump buffer") {
  Env env;
  auto& ws = env.io.waitScope;
  PyOrigin py;
  auto origin = env.origin(kj::str("http://127.0.0.1:", py.port));
  uint64_t size = 256ull << 20;  // far more than socket buffers
  Call call(*origin, "POST", "/no-read?id=n1", hdrs({{"Content-Length", kj::str(size)}}));
  uint64_t accepted = 0;
  auto buffer = kj::heapArray<kj::byte>(64 * 1024);
  // Feed the body until the proxy stops taking it for 300 ms (back-pressure reached the edge).
  for (;;) {
    auto write = call.edge->write(buffer.begin(), buffer.size());
    auto stalled = env.timer.afterDelay(300 * kj::MILLISECONDS).then([]() { return false; });
    bool progressed = write.then([]() { return true; }).exclusiveJoin(kj::mv(stalled)).wait(ws);
    if (!progressed) break;
    accepted += buffer.size();
    KJ_ASSERT(accepted < size, "the proxy swallowed the whole body");
  }
  auto stats = origin->getStats();
  KJ_EXPECT(stats.maxBufferedBytes <= PUMP_BUFFER_SIZE, stats.maxBufferedBytes);
  KJ_EXPECT(accepted < 64ull << 20, accepted);
  directGet(env, py.port, "/release?id=n1");
  auto r = call.reply(ws);
  KJ_EXPECT(r.status == 200);
  KJ_EXPECT(contains(call.body(ws), "\"ok\": true"));
  call.done(ws);
  KJ_EXPECT(origin->bufferedBytes() == 0);
}

KJ_TEST("edge stops reading: the gauge stays within one pump buffer") {
  Env env;
  auto& ws = env.io.waitScope;
  PyOrigin py;
  auto origin = env.origin(kj::str("http://127.0.0.1:", py.port));
  Call call(*origin, "GET", "/bytes?n=268435456", nullptr);
  auto r = call.reply(ws);
  KJ_EXPECT(r.status == 200);
  // Read nothing for 300 ms: the proxy must hold at most one buffer.
  env.timer.afterDelay(300 * kj::MILLISECONDS).wait(ws);
  auto stats = origin->getStats();
  KJ_EXPECT(stats.bufferedBytes <= PUMP_BUFFER_SIZE, stats.bufferedBytes);
  KJ_EXPECT(stats.maxBufferedBytes <= PUMP_BUFFER_SIZE, stats.maxBufferedBytes);
  // Take 1 MiB, then drop the stream (edge reset).
  call.edge = nullptr;
  KJ_EXPECT_THROW_MESSAGE("stream must be reset", call.done(ws));
  KJ_EXPECT(origin->bufferedBytes() == 0);
}

KJ_TEST("unix socket origin") {
  Env env;
  auto& ws = env.io.waitScope;
  auto path = kj::str("/tmp/cfqt-origin-test-", getpid(), ".sock");
  PyOrigin py("--unix", path);
  auto origin = env.origin(kj::str("unix:", path));
  for (int i = 0; i < 3; i++) {
    Call call(*origin, "POST", "https://test.trycloudflare.com/upload",
              hdrs({{"Content-Length", "5"}}));
    call.writeBody(ws, "\x00\x01\x02\x03\x04"_kj);
    auto r = call.reply(ws);
    KJ_EXPECT(r.status == 200);
    auto body = call.body(ws);
    call.done(ws);
    KJ_EXPECT(jsonNumber(body, "length") == 5, body);
  }
  KJ_EXPECT(origin->getStats().connectionsOpened == 1);
  unlink(path.cStr());
}

KJ_TEST("unix+tls origin: verified like https, named by originServerName or the request's host") {
  Env env;
  auto& ws = env.io.waitScope;
  auto path = kj::str("/tmp/cfqt-origin-test-tls-", getpid(), ".sock");
  PyOrigin py("--unix-tls", path);
  auto caPool = kj::str(sourceDir(), "/src/origin/testdata/tls-ca.pem");
  auto upload = [&](Origin& origin, kj::StringPtr dest) {
    Call call(origin, "POST", dest, hdrs({{"Content-Length", "5"}}));
    call.writeBody(ws, "\x00\x01\x02\x03\x04"_kj);
    auto r = call.reply(ws);
    KJ_EXPECT(r.status == 200, r.errorText());
    auto body = call.body(ws);
    call.done(ws);
    KJ_EXPECT(jsonNumber(body, "length") == 5, body);
  };
  auto failure = [&](Origin& origin, kj::StringPtr dest) {
    Call call(origin, "GET", dest, nullptr);
    auto r = call.reply(ws);
    call.done(ws);
    return kj::str(r.errorText());
  };
  {
    // No originServerName: the certificate (for "localhost") is checked against the request
    // URL's host; connections are pooled per name.
    auto config = configFor(kj::str("unix+tls:", path));
    KJ_EXPECT(config.kind == OriginKind::UNIX_TLS);
    config.caPool = kj::str(caPool);
    auto origin = env.origin(kj::mv(config));
    for (int i = 0; i < 3; i++) upload(*origin, "https://LocalHost:8443/upload");
    KJ_EXPECT(origin->getStats().connectionsOpened == 1);
    auto e = failure(*origin, "https://app.example.com/headers");
    KJ_EXPECT(contains(e, "tls handshake"), e);
    KJ_EXPECT(origin->getStats().connectionsOpened == 2);
    upload(*origin, "https://localhost/upload");
    KJ_EXPECT(origin->getStats().connectionsReused == 3);
  }
  {
    // originServerName names the origin whatever the visitor's host.
    auto config = configFor(kj::str("unix+tls:", path));
    config.caPool = kj::str(caPool);
    config.originServerName = kj::str("localhost");
    auto origin = env.origin(kj::mv(config));
    upload(*origin, "https://app.example.com/upload");
  }
  {
    // Without the CA: the system store does not know the test CA.
    auto origin = env.origin(kj::str("unix+tls:", path));
    auto e = failure(*origin, "https://localhost/headers");
    KJ_EXPECT(contains(e, "tls handshake"), e);
  }
  {
    auto config = configFor(kj::str("unix+tls:", path));
    config.caPool = kj::str("/nonexistent/ca.pem");
    auto created = Origin::create(kj::mv(config), env.timer, env.network, env.table);
    KJ_EXPECT(contains(KJ_ASSERT_NONNULL(created.tryGet<kj::String>()), "/nonexistent/ca.pem"));
  }
  unlink(path.cStr());
}

KJ_TEST("localhost is tried on ::1 and 127.0.0.1") {
  Env env;
  auto& ws = env.io.waitScope;
  PyOrigin v4;
  PyOrigin v6("--ipv6");
  for (uint port: {v4.port, v6.port}) {
    auto origin = env.origin(kj::str("localhost:", port));
    Call call(*origin, "GET", "/headers", nullptr);
    auto r = call.reply(ws);
    KJ_EXPECT(r.error == nullptr, r.errorText(), port);
    KJ_EXPECT(r.status == 200);
    call.body(ws);
    call.done(ws);
  }
}

KJ_TEST("localhost: a black-holed ::1 falls back to 127.0.0.1 after 300 ms") {
  Env env;
  auto& ws = env.io.waitScope;
  PyOrigin v4;
  // [::1]:<same port> with a full backlog that never accepts: SYNs are dropped.
  int fd = socket(AF_INET6, SOCK_STREAM, 0);
  sockaddr_in6 addr;
  memset(&addr, 0, sizeof(addr));
  addr.sin6_family = AF_INET6;
  addr.sin6_addr = in6addr_loopback;
  addr.sin6_port = htons(v4.port);
  KJ_SYSCALL(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)));
  KJ_SYSCALL(listen(fd, 0));
  kj::AutoCloseFd listener(fd);
  kj::Vector<kj::AutoCloseFd> fillers;
  for (int i = 0; i < 4; i++) {
    int c = socket(AF_INET6, SOCK_STREAM | SOCK_NONBLOCK, 0);
    connect(c, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
    fillers.add(kj::AutoCloseFd(c));
  }
  auto config = configFor(kj::str("localhost:", v4.port));
  config.connectTimeout = 10 * kj::SECONDS;
  auto origin = env.origin(kj::mv(config));
  ws.poll();  // kj's timer is read once per loop turn: refresh it after the blocking set-up
  auto start = kj::systemPreciseMonotonicClock().now();
  Call call(*origin, "GET", "/headers", nullptr);
  auto r = call.reply(ws);
  auto elapsed = kj::systemPreciseMonotonicClock().now() - start;
  KJ_EXPECT(r.status == 200, r.errorText());
  KJ_EXPECT(elapsed >= 250 * kj::MILLISECONDS && elapsed < 3 * kj::SECONDS, elapsed);
  call.body(ws);
  call.done(ws);
}

KJ_TEST("keep-alive: connections reused (visible in the origin's count), idle timeout, cap") {
  Env env;
  auto& ws = env.io.waitScope;
  PyOrigin py;
  auto config = configFor(kj::str("127.0.0.1:", py.port));
  config.keepAliveTimeout = 200 * kj::MILLISECONDS;
  config.keepAliveConnections = 2;
  auto origin = env.origin(kj::mv(config));
  for (int i = 0; i < 20; i++) {
    Call call(*origin, "GET", "/headers", nullptr);
    KJ_EXPECT(call.reply(ws).status == 200);
    call.body(ws);
    call.done(ws);
  }
  KJ_EXPECT(origin->getStats().connectionsOpened == 1);
  KJ_EXPECT(origin->getStats().connectionsReused == 19);
  {
    // SO_KEEPALIVE on the pooled connection: `ss -o` shows its keepalive timer (TCP_KEEPIDLE 30s).
    auto cmd = kj::str("ss -tnoH state established '( dport = :", py.port, " )' 2>&1");
    FILE* pipe = popen(cmd.cStr(), "r");
    KJ_ASSERT(pipe != nullptr);
    char line[1024];
    kj::String output = kj::str();
    while (fgets(line, sizeof(line), pipe) != nullptr) output = kj::str(output, line);
    pclose(pipe);
    KJ_EXPECT(contains(output, "timer:(keepalive,"), output);
  }
  // The origin saw our 1 connection plus the direct /stats one.
  KJ_EXPECT(jsonNumber(directGet(env, py.port, "/stats"), "connections") == 2);

  // Five concurrent streams: no concurrency cap, five connections; only two stay idle.
  {
    kj::Vector<kj::Own<Call>> calls;
    for (int i = 0; i < 5; i++) {
      calls.add(kj::heap<Call>(*origin, "GET", kj::str("/sse?id=c", i, "&count=1"), nullptr));
    }
    for (auto& c: calls) KJ_EXPECT(c->reply(ws).status == 200);
    for (int i = 0; i < 5; i++) directGet(env, py.port, kj::str("/ack?id=c", i, "&k=0"));
    for (auto& c: calls) {
      c->body(ws);
      c->done(ws);
    }
  }
  KJ_EXPECT(origin->getStats().idleConnections == 2, origin->getStats().idleConnections);

  // A pooled connection the origin closes just as it is reused: retried on a fresh one.
  {
    Call first(*origin, "GET", "/close-after-response?delay=0.2", nullptr);
    KJ_EXPECT(first.reply(ws).status == 200);
    first.body(ws);
    first.done(ws);
    auto before = origin->getStats();
    Call second(*origin, "GET", "/headers", nullptr);
    auto r = second.reply(ws);
    KJ_EXPECT(r.status == 200, r.errorText());
    second.body(ws);
    second.done(ws);
    auto after = origin->getStats();
    KJ_EXPECT(after.connectionsReused == before.connectionsReused + 1);
    KJ_EXPECT(after.connectionsOpened == before.connectionsOpened + 1);
  }

  // Idle timeout: after 200 ms the pool is empty and the next request dials.
  KJ_EXPECT(env.eventually([&]() { return origin->getStats().idleConnections == 0; }));
  auto opened = origin->getStats().connectionsOpened;
  Call call(*origin, "GET", "/headers", nullptr);
  KJ_EXPECT(call.reply(ws).status == 200);
  call.body(ws);
  call.done(ws);
  KJ_EXPECT(origin->getStats().connectionsOpened == opened + 1);
}

KJ_TEST("keep-alive: an idle connection the origin closes leaves the pool (close-watch)") {
  // The close-watch starts once the connection was idle for a millisecond (serial requests
  // reuse it sooner without a probe read); a close after that is seen and the entry dropped.
  Env env;
  auto& ws = env.io.waitScope;
  PyOrigin py;
  auto config = configFor(kj::str("127.0.0.1:", py.port));
  config.keepAliveTimeout = 60 * kj::SECONDS;
  config.keepAliveConnections = 1;
  auto origin = env.origin(kj::mv(config));
  for (int i = 0; i < 5; i++) {
    Call call(*origin, "GET", "/headers", nullptr);
    KJ_EXPECT(call.reply(ws).status == 200);
    call.body(ws);
    call.done(ws);
  }
  KJ_EXPECT(origin->getStats().connectionsOpened == 1);
  KJ_EXPECT(origin->getStats().connectionsReused == 4);
  {
    Call call(*origin, "GET", "/close-after-response?delay=0.02", nullptr);
    KJ_EXPECT(call.reply(ws).status == 200);
    call.body(ws);
    call.done(ws);
  }
  KJ_EXPECT(origin->getStats().idleConnections == 1);
  // The origin closes it 20 ms after the response.
  KJ_EXPECT(env.eventually([&]() { return origin->getStats().idleConnections == 0; }),
            "the close-watch missed the origin's close");
  Call call(*origin, "GET", "/headers", nullptr);
  KJ_EXPECT(call.reply(ws).status == 200);
  call.body(ws);
  call.done(ws);
  KJ_EXPECT(origin->getStats().connectionsOpened == 2);
  KJ_EXPECT(origin->getStats().connectionsReused == 5);
}

KJ_TEST("nginx: 64 MiB file, keep-alive reuse visible in stub_status") {
  Env env;
  auto& ws = env.io.waitScope;
  uint64_t size = 64ull << 20;
  Nginx nginx(size);
  auto origin = env.origin(kj::str("http://127.0.0.1:", nginx.port));
  {
    Call call(*origin, "GET", "/big.bin", nullptr);
    auto r = call.reply(ws);
    KJ_EXPECT(r.status == 200);
    KJ_EXPECT(r.is("Content-Length", kj::str(size)));
    auto result = readPattern(*call.edge).wait(ws);
    call.done(ws);
    KJ_EXPECT(result.length == size);
    KJ_EXPECT(result.ok);
  }
  for (int i = 0; i < 50; i++) {
    Call call(*origin, "GET", "/small.bin", nullptr);
    KJ_EXPECT(call.reply(ws).status == 200);
    auto result = readPattern(*call.edge).wait(ws);
    call.done(ws);
    KJ_EXPECT(result.length == 1000);
  }
  {
    Call call(*origin, "GET", "/status", nullptr);
    KJ_EXPECT(call.reply(ws).status == 200);
    auto body = call.body(ws);
    call.done(ws);
    // "server accepts handled requests\n 2 2 52": our one connection plus waitForPort()'s probe.
    KJ_EXPECT(contains(body, "\n 2 2 52 \n"), body);
  }
  KJ_EXPECT(origin->getStats().connectionsOpened == 1);
  {
    Call call(*origin, "GET", "/nope", nullptr);
    KJ_EXPECT(call.reply(ws).status == 404);
    call.body(ws);
    call.done(ws);
  }
}

KJ_TEST("https origin: verified against --origin-ca-pool, server name checked") {
  Env env;
  auto& ws = env.io.waitScope;
  Nginx nginx(1000, true);
  auto caPool = kj::str(sourceDir(), "/src/origin/testdata/tls-ca.pem");
  {
    auto config = configFor(kj::str("https://localhost:", nginx.port));
    config.caPool = kj::str(caPool);
    auto origin = env.origin(kj::mv(config));
    for (int i = 0; i < 3; i++) {
      Call call(*origin, "GET", "/small.bin", nullptr);
      auto r = call.reply(ws);
      KJ_EXPECT(r.status == 200, r.errorText());
      auto result = readPattern(*call.edge).wait(ws);
      call.done(ws);
      KJ_EXPECT(result.length == 1000);
      KJ_EXPECT(result.ok);
    }
    KJ_EXPECT(origin->getStats().connectionsOpened == 1);
  }
  {
    auto config = configFor(kj::str("https://127.0.0.1:", nginx.port));
    config.caPool = kj::str(caPool);
    config.originServerName = kj::str("wrong.example");
    auto origin = env.origin(kj::mv(config));
    Call call(*origin, "GET", "/small.bin", nullptr);
    auto r = call.reply(ws);
    KJ_EXPECT(contains(r.errorText(), "tls handshake"), r.errorText());
    call.done(ws);
  }
  {
    // Without the CA: the system store does not know the test CA.
    auto origin = env.origin(kj::str("https://localhost:", nginx.port));
    Call call(*origin, "GET", "/small.bin", nullptr);
    auto r = call.reply(ws);
    KJ_EXPECT(contains(r.errorText(), "tls handshake"), r.errorText());
    call.done(ws);
  }
}

// An in-process origin that answers every connection with one canned byte string, then closes.
class CannedOrigin final: private kj::TaskSet::ErrorHandler {
public:
  CannedOrigin(Env& env): tasks(*this) {
    listener = env.network.parseAddress("127.0.0.1", 0).wait(env.io.waitScope)->listen();
    port = listener->getPort();
    tasks.add(acceptLoop());
  }
  kj::String response;
  uint port;

private:
  kj::Own<kj::ConnectionReceiver> listener;
  kj::TaskSet tasks;

  kj::Promise<void> acceptLoop() {
    return listener->accept().then([this](kj::Own<kj::AsyncIoStream> conn) {
      auto buffer = kj::heapArray<kj::byte>(4096);
      auto read = conn->tryRead(buffer.begin(), 1, buffer.size());
      auto& ref = *conn;
      tasks.add(read.then([this, &ref](size_t) {
        return ref.write(response.begin(), response.size());
      }).attach(kj::mv(conn), kj::mv(buffer)));
      return acceptLoop();
    });
  }
  void taskFailed(kj::Exception&& e) override {}
};

KJ_TEST("malformed origin responses become errors or resets, never crashes") {
  Env env;
  auto& ws = env.io.waitScope;
  CannedOrigin canned(env);
  auto origin = env.origin(kj::str("http://127.0.0.1:", canned.port));
  auto expectError = [&](kj::StringPtr response, kj::StringPtr words) {
    canned.response = kj::str(response);
    Call call(*origin, "GET", "/", nullptr);
    auto r = call.reply(ws);
    KJ_EXPECT(contains(r.errorText(), words), r.errorText(), response);
    call.done(ws);
  };
  expectError("garbage\r\n\r\n", "malformed response");
  expectError("HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n", "invalid Content-Length");
  expectError("HTTP/1.1 2000 OK\r\n\r\n", "");
  expectError(kj::str("HTTP/1.1 200 OK\r\nX-Big: ", kj::repeat('a', 40000), "\r\n\r\n"),
              "over-long");
  expectError("HTTP/1.1 200 OK\r\nContent-Le", "in the middle of a response head");
  expectError("HTTP/1.1 101 Switching Protocols\r\n\r\n", "switched protocols");

  // Bad chunk framing after the head: the stream is reset.
  canned.response = kj::str("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                            "5\r\nhello\r\nzz\r\n");
  {
    Call call(*origin, "GET", "/", nullptr);
    KJ_EXPECT(call.reply(ws).status == 200);
    auto reading = call.edge->readAllText().eagerlyEvaluate(nullptr);
    KJ_EXPECT_THROW_MESSAGE("stream must be reset", call.done(ws));
    call.originSide = nullptr;
    KJ_EXPECT(reading.wait(ws) == "hello");
  }
  // HTTP/1.0 without Content-Length: delimited by EOF; extra Transfer-Encoding codings too.
  for (auto response: {"HTTP/1.0 200 OK\r\nX-A: b\r\n\r\nuntil eof"_kj,
                       "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nuntil eof"_kj}) {
    canned.response = kj::str(response);
    Call call(*origin, "GET", "/", nullptr);
    auto r = call.reply(ws);
    KJ_EXPECT(r.status == 200);
    KJ_EXPECT(r.header("Transfer-Encoding") == nullptr);
    KJ_EXPECT(call.body(ws) == "until eof");
    call.done(ws);
  }
  KJ_EXPECT(origin->getStats().idleConnections == 0);
}

KJ_TEST("Origin::serve: any transport's sink gets the head, the stream the body") {
  // The transport-neutral entry (HTTP/2 uses it): a decoded head in, the response head out
  // through the sink, the body on the stream; a request that could not be decoded is answered
  // with sendError() only.
  struct RecordingSink final: public ResponseSink {
    kj::uint status = 0;
    kj::Vector<kj::String> headers;
    kj::Maybe<kj::String> error;
    kj::Promise<void> sendHead(kj::uint s, kj::ArrayPtr<const wire::Header> h) override {
      status = s;
      for (auto& header: h) headers.add(kj::str(header.name, ": ", header.value));
      return kj::READY_NOW;
    }
    kj::Promise<void> sendError(kj::StringPtr text) override {
      error = kj::str(text);
      return kj::READY_NOW;
    }
  };
  Env env;
  auto& ws = env.io.waitScope;
  auto origin = env.origin(helloWorldOrigin());
  {
    RecordingSink sink;
    auto pipe = kj::newTwoWayPipe();
    wire::HttpRequestHead head;
    head.dest = kj::str("https://t.example/_health");
    head.method = kj::str("GET");
    head.host = kj::str("t.example");
    auto served = origin->serve(*pipe.ends[0], kj::mv(head), sink).eagerlyEvaluate(nullptr);
    pipe.ends[1]->shutdownWrite();
    auto body = pipe.ends[1]->readAllText().wait(ws);
    served.wait(ws);
    KJ_EXPECT(sink.status == 200);
    KJ_EXPECT(sink.error == nullptr);
    KJ_EXPECT(body == "OK", body);
    bool typed = false;
    for (auto& h: sink.headers) if (h.startsWith("Content-Type: text/plain")) typed = true;
    KJ_EXPECT(typed, kj::strArray(sink.headers, " | "));
  }
  {
    RecordingSink sink;
    auto pipe = kj::newTwoWayPipe();
    auto served = origin->serve(*pipe.ends[0], kj::str("malformed request: bad header"), sink);
    served.wait(ws);
    KJ_EXPECT(sink.status == 0);
    KJ_EXPECT(KJ_ASSERT_NONNULL(sink.error) == "malformed request: bad header");
  }
}

KJ_TEST("the response pump reads from the origin only what the sink says the stream takes") {
  // A QUIC stream blocked by its peer's window (a visitor that stopped reading) reports 0
  // writable bytes: the exchange then reads nothing more from the origin and holds no buffer.
  struct CountingStream final: public kj::AsyncIoStream {
    explicit CountingStream(kj::AsyncIoStream& inner): inner(inner) {}
    kj::AsyncIoStream& inner;
    size_t written = 0;
    kj::Promise<size_t> tryRead(void* buffer, size_t minBytes, size_t maxBytes) override {
      return inner.tryRead(buffer, minBytes, maxBytes);
    }
    kj::Promise<void> write(const void* buffer, size_t size) override {
      written += size;
      return inner.write(buffer, size);
    }
    kj::Promise<void> write(kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces) override {
      for (auto& p: pieces) written += p.size();
      return inner.write(pieces);
    }
    kj::Promise<void> whenWriteDisconnected() override { return inner.whenWriteDisconnected(); }
    void shutdownWrite() override { inner.shutdownWrite(); }
    void abortRead() override { inner.abortRead(); }
  };
  struct GatedSink final: public ResponseSink {
    explicit GatedSink(CountingStream& stream): stream(stream) {}
    CountingStream& stream;
    size_t limit = 5000;   // body bytes the "stream" takes in all
    kj::Maybe<kj::Own<kj::PromiseFulfiller<void>>> waiter;
    kj::uint status = 0;
    kj::Promise<void> sendHead(kj::uint s, kj::ArrayPtr<const wire::Header>) override {
      status = s;
      return kj::READY_NOW;
    }
    kj::Promise<void> sendError(kj::StringPtr) override { return kj::READY_NOW; }
    size_t bodyWritable(size_t wanted) override {
      return kj::min(wanted, limit - kj::min(limit, stream.written));
    }
    kj::Promise<void> whenBodyWritable() override {
      auto paf = kj::newPromiseAndFulfiller<void>();
      waiter = kj::mv(paf.fulfiller);
      return kj::mv(paf.promise);
    }
  };
  constexpr size_t SIZE = 100000;
  Env env;
  auto& ws = env.io.waitScope;
  CannedOrigin canned(env);
  canned.response = kj::str("HTTP/1.1 200 OK\r\nContent-Length: ", SIZE, "\r\n\r\n",
                            kj::repeat('x', SIZE));
  auto origin = env.origin(kj::str("http://127.0.0.1:", canned.port));
  auto pipe = kj::newTwoWayPipe();
  CountingStream edge(*pipe.ends[0]);
  GatedSink sink(edge);
  wire::HttpRequestHead head;
  head.dest = kj::str("http://t.example/big");
  head.method = kj::str("GET");
  head.host = kj::str("t.example");
  auto served = origin->serve(edge, kj::mv(head), sink).eagerlyEvaluate(nullptr);
  pipe.ends[1]->shutdownWrite();
  auto buffer = kj::heapArray<kj::byte>(SIZE);
  auto readSome = [&](size_t got) {
    return env.timer.timeoutAfter(5 * kj::SECONDS,
        pipe.ends[1]->tryRead(buffer.begin() + got, 1, SIZE - got)).wait(ws);
  };
  size_t got = 0;
  while (got < 5000) got += readSome(got);
  KJ_EXPECT(sink.status == 200);
  KJ_EXPECT(got == 5000, got);
  auto more = pipe.ends[1]->tryRead(buffer.begin() + got, 1, SIZE - got);
  env.timer.afterDelay(50 * kj::MILLISECONDS).wait(ws);
  KJ_EXPECT(!more.poll(ws), "the exchange wrote more than the sink allowed");
  KJ_EXPECT(sink.waiter != nullptr, "the exchange does not wait for the sink");
  KJ_EXPECT(origin->bufferedBytes() == 0, origin->bufferedBytes());
  // The stream takes everything again: the rest arrives and the exchange completes.
  sink.limit = kj::maxValue;
  KJ_ASSERT_NONNULL(sink.waiter)->fulfill();
  got += more.wait(ws);
  while (got < SIZE) {
    size_t n = readSome(got);
    if (n == 0) break;
    got += n;
  }
  KJ_EXPECT(got == SIZE, got);
  served.wait(ws);
}

KJ_TEST("hello-world origin: page, /_health, /ws echo, /sse") {
  Env env;
  auto& ws = env.io.waitScope;
  auto config = helloWorldOrigin();
  config.helloSseInterval = 5 * kj::MILLISECONDS;
  auto origin = env.origin(kj::mv(config));
  {
    Call call(*origin, "GET", "https://test.trycloudflare.com/?a=b",
              hdrs({{"User-Agent", "cfqt-test"}}));
    auto r = call.reply(ws);
    KJ_EXPECT(r.status == 200);
    KJ_EXPECT(r.header("Content-Type") == kj::StringPtr("text/html; charset=utf-8"));
    auto body = call.body(ws);
    call.done(ws);
    KJ_EXPECT(contains(body, "cfqt-test"), body);
    KJ_EXPECT(contains(body, "/?a=b"), body);
  }
  {
    Call call(*origin, "GET", "/_health", nullptr);
    KJ_EXPECT(call.reply(ws).status == 200);
    KJ_EXPECT(call.body(ws) == "OK");
    call.done(ws);
  }
  {
    Call call(*origin, "GET", "/ws", hdrs({{"Sec-WebSocket-Key", RFC_KEY}}),
              wire::schema::ConnectionType::WEBSOCKET);
    auto r = call.reply(ws);
    KJ_ASSERT(r.status == 101, r.status);
    KJ_EXPECT(r.is("Sec-Websocket-Accept", RFC_ACCEPT));
    webSocketEcho(*call.edge, ws, 50);
    call.edge->shutdownWrite();
    call.done(ws);
  }
  {
    Call call(*origin, "GET", "/sse", nullptr);
    auto r = call.reply(ws);
    KJ_EXPECT(r.is("Content-Type", kj::StringPtr("text/event-stream")));
    kj::byte buffer[64];
    kj::String seen = kj::str("");
    while (!contains(seen, "data: 2\n\n")) {
      size_t n = call.edge->tryRead(buffer, 1, sizeof(buffer)).wait(ws);
      KJ_ASSERT(n > 0);
      seen = kj::str(seen, kj::heapString(reinterpret_cast<char*>(buffer), n));
    }
    call.edge = nullptr;
    KJ_EXPECT_THROW_MESSAGE("stream must be reset", call.done(ws));
  }
}

KJ_TEST("bodies that come with the head: written from the read-ahead, in order, when the sink "
        "blocks, and over one reused connection") {
  // A small response usually arrives whole with its head: the exchange writes those bytes from
  // the connection's read-ahead buffer (no pump buffer), which then goes back to the origin's
  // spare for the next exchange. The sink takes 3 bytes, then blocks, then takes the rest.
  class KeepAliveOrigin final: private kj::TaskSet::ErrorHandler {
  public:
    explicit KeepAliveOrigin(Env& env): tasks(*this) {
      listener = env.network.parseAddress("127.0.0.1", 0).wait(env.io.waitScope)->listen();
      port = listener->getPort();
      tasks.add(acceptLoop());
    }
    uint port;
    uint accepted = 0;
    uint answered = 0;

  private:
    kj::Own<kj::ConnectionReceiver> listener;
    kj::TaskSet tasks;

    kj::Promise<void> acceptLoop() {
      return listener->accept().then([this](kj::Own<kj::AsyncIoStream> conn) {
        ++accepted;
        auto& ref = *conn;
        tasks.add(serve(ref).attach(kj::mv(conn)));
        return acceptLoop();
      });
    }
    kj::Promise<void> serve(kj::AsyncIoStream& conn) {
      // One answer per request head (GETs without bodies: one read each), head and body in one
      // write; the body differs from one request to the next.
      auto buffer = kj::heapArray<kj::byte>(4096);
      auto read = conn.tryRead(buffer.begin(), 1, buffer.size());
      return read.then([this, &conn](size_t n) -> kj::Promise<void> {
        if (n == 0) return kj::READY_NOW;
        uint k = answered++;
        auto body = kj::str("answer-", k, "-", kj::repeat('b', (k + 1) % 7));
        auto text = kj::str("HTTP/1.1 200 OK\r\nContent-Length: ", body.size(), "\r\n\r\n", body);
        auto written = conn.write(text.begin(), text.size()).attach(kj::mv(text));
        return written.then([this, &conn]() { return serve(conn); });
      }).attach(kj::mv(buffer));
    }
    void taskFailed(kj::Exception&& e) override {}
  };
  struct StepSink final: public ResponseSink {
    size_t allowed = kj::maxValue;  // body bytes the next write may take
    kj::Maybe<kj::Own<kj::PromiseFulfiller<void>>> waiter;
    kj::uint status = 0;
    kj::Promise<void> sendHead(kj::uint s, kj::ArrayPtr<const wire::Header>) override {
      status = s;
      return kj::READY_NOW;
    }
    kj::Promise<void> sendError(kj::StringPtr) override { return kj::READY_NOW; }
    size_t bodyWritable(size_t wanted) override {
      size_t n = kj::min(wanted, allowed);
      if (allowed != kj::maxValue) allowed -= n;
      return n;
    }
    kj::Promise<void> whenBodyWritable() override {
      auto paf = kj::newPromiseAndFulfiller<void>();
      waiter = kj::mv(paf.fulfiller);
      return kj::mv(paf.promise);
    }
  };
  Env env;
  auto& ws = env.io.waitScope;
  KeepAliveOrigin server(env);
  auto origin = env.origin(kj::str("http://127.0.0.1:", server.port));
  auto request = [&](StepSink& sink, kj::AsyncIoStream& edge) {
    wire::HttpRequestHead head;
    head.dest = kj::str("http://t.example/small");
    head.method = kj::str("GET");
    head.host = kj::str("t.example");
    return origin->serve(edge, kj::mv(head), sink).eagerlyEvaluate(nullptr);
  };
  auto readAll = [&](kj::AsyncIoStream& end) {
    return env.timer.timeoutAfter(5 * kj::SECONDS, end.readAllText()).wait(ws);
  };
  {
    StepSink sink;
    sink.allowed = 3;
    auto pipe = kj::newTwoWayPipe();
    auto served = request(sink, *pipe.ends[0]);
    pipe.ends[1]->shutdownWrite();
    kj::byte first[16];
    size_t got = env.timer.timeoutAfter(5 * kj::SECONDS,
        pipe.ends[1]->tryRead(first, 3, sizeof(first))).wait(ws);
    KJ_EXPECT(got == 3, got);
    KJ_EXPECT(kj::heapString(reinterpret_cast<char*>(first), got) == "ans");
    KJ_ASSERT(env.eventually([&]() { return sink.waiter != nullptr; }),
              "the exchange does not wait for a blocked sink");
    KJ_EXPECT(origin->bufferedBytes() == 0, origin->bufferedBytes());
    sink.allowed = kj::maxValue;
    KJ_ASSERT_NONNULL(sink.waiter)->fulfill();
    auto rest = readAll(*pipe.ends[1]);
    served.wait(ws);
    KJ_EXPECT(sink.status == 200);
    KJ_EXPECT(kj::str("ans", rest) == "answer-0-b", rest);
  }
  for (uint i = 1; i <= 20; i++) {
    StepSink sink;
    auto pipe = kj::newTwoWayPipe();
    auto served = request(sink, *pipe.ends[0]);
    pipe.ends[1]->shutdownWrite();
    auto body = readAll(*pipe.ends[1]);
    served.wait(ws);
    KJ_EXPECT(body == kj::str("answer-", i, "-", kj::repeat('b', (i + 1) % 7)), body, i);
  }
  KJ_EXPECT(server.accepted == 1, server.accepted);
  KJ_EXPECT(origin->getStats().connectionsReused == 20, origin->getStats().connectionsReused);
  KJ_EXPECT(origin->bufferedBytes() == 0, origin->bufferedBytes());
}

}  // namespace
}  // namespace cfqt::origin
