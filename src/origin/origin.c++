// Origin: one data stream → one HTTP/1.1 exchange (or WebSocket pass-through) with the origin.
//
// The HTTP/1.1 client here is our own rather than kj::HttpClient, because kj-http 0.9.2's client
// takes an interim 100 response for the final one, cannot cap the idle pool, and its WebSocket
// support re-frames messages. Response heads are parsed with kj::HttpHeaders::tryParseResponse();
// bodies (fixed, chunked, until EOF) are decoded here, each chunk forwarded as it arrives.

#include "origin/origin.h"

#include "origin/hello-world.h"
#include "wire/data-stream.h"
#include "wire/http-metadata.h"

#include <capnp/message.h>
#include <kj/compat/http.h>
#include <kj/compat/tls.h>
#include <kj/debug.h>
#include <kj/io.h>
#include <kj/vector.h>

#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

namespace cfqt::origin {

namespace schema = wire::schema;
using kj::uint;

namespace {

constexpr size_t CONN_BUFFER_SIZE = 32 * 1024;  // max response head (the read-ahead buffer
                                                // grows to it only for a head that needs it)
constexpr size_t CONN_BUFFER_INITIAL = 4 * 1024;
constexpr size_t MAX_LINE = 4096;               // chunk-size and trailer lines
constexpr kj::Duration FALLBACK_DELAY = 300 * kj::MILLISECONDS;  // Go's happy-eyeballs delay

char lower(char c) { return (c >= 'A' && c <= 'Z') ? c + ('a' - 'A') : c; }

bool equalsIgnoreCase(kj::StringPtr a, kj::StringPtr b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); i++) {
    if (lower(a[i]) != lower(b[i])) return false;
  }
  return true;
}

bool startsWithIgnoreCase(kj::StringPtr text, kj::StringPtr prefix) {
  if (text.size() < prefix.size()) return false;
  for (size_t i = 0; i < prefix.size(); i++) {
    if (lower(text[i]) != lower(prefix[i])) return false;
  }
  return true;
}

bool containsIgnoreCase(kj::StringPtr text, kj::StringPtr word) {
  if (word.size() > text.size()) return false;
  for (size_t i = 0; i + word.size() <= text.size(); i++) {
    if (startsWithIgnoreCase(text.slice(i), word)) return true;
  }
  return false;
}

kj::Maybe<uint64_t> parseDecimal(kj::StringPtr text) {
  if (text.size() == 0 || text.size() > 19) return nullptr;
  uint64_t value = 0;
  for (char c: text) {
    if (c < '0' || c > '9') return nullptr;
    value = value * 10 + (c - '0');
  }
  return value;
}

kj::Maybe<uint64_t> parseChunkSize(kj::StringPtr line) {
  uint64_t value = 0;
  size_t digits = 0;
  for (char c: line) {
    uint d;
    if (c >= '0' && c <= '9') {
      d = c - '0';
    } else if (c >= 'a' && c <= 'f') {
      d = c - 'a' + 10;
    } else if (c >= 'A' && c <= 'F') {
      d = c - 'A' + 10;
    } else if (c == ';' || c == ' ' || c == '\t') {
      break;  // chunk extension
    } else {
      return nullptr;
    }
    if (++digits > 15) return nullptr;
    value = value * 16 + d;
  }
  if (digits == 0) return nullptr;
  return value;
}

// Exception text → the "cause" part of the §6.5 error (Go-like where we can).
kj::String describeCause(const kj::Exception& e) {
  auto text = e.getDescription();
  if (e.getType() == kj::Exception::Type::OVERLOADED && containsIgnoreCase(text, "timed out")) {
    return kj::str("i/o timeout");
  }
  if (containsIgnoreCase(text, "Connection refused")) return kj::str("connect: connection refused");
  if (containsIgnoreCase(text, "No such file")) return kj::str("connect: no such file or directory");
  return kj::str(text);
}

kj::Exception originException(kj::Exception::Type type, kj::StringPtr what) {
  return kj::Exception(type, __FILE__, __LINE__, kj::str("origin: ", what));
}

// ---------------------------------------------------------------------------------------------
// Connection to the origin: the stream plus a read-ahead buffer, so that a response head can be
// read and the bytes after it kept.

class Conn {
public:
  explicit Conn(kj::Own<kj::AsyncIoStream> streamParam)
      : stream(kj::mv(streamParam)), buffer(kj::heapArray<kj::byte>(CONN_BUFFER_INITIAL)) {}
  KJ_DISALLOW_COPY(Conn);

  kj::Own<kj::AsyncIoStream> stream;
  kj::Array<kj::byte> buffer;
  size_t begin = 0;
  size_t end = 0;
  bool receivedAny = false;  // any byte received for the current exchange

  size_t leftover() const { return end - begin; }

  void shrink() {
    // Back to the initial read-ahead size (a pooled connection holds no unread byte).
    if (buffer.size() > CONN_BUFFER_INITIAL && begin == end) {
      buffer = kj::heapArray<kj::byte>(CONN_BUFFER_INITIAL);
      begin = end = 0;
    }
  }

  kj::Promise<size_t> read(kj::ArrayPtr<kj::byte> out) {
    // Up to out.size() bytes (at least 1 unless EOF, then 0), leftover first.
    if (begin < end) {
      size_t n = kj::min(out.size(), end - begin);
      memcpy(out.begin(), buffer.begin() + begin, n);
      begin += n;
      return n;
    }
    return stream->tryRead(out.begin(), 1, out.size());
  }

  kj::Promise<kj::Maybe<kj::Array<char>>> readHead() {
    // The next message head: text up to and including the first newline of the blank line, as
    // tryParseResponse() wants it. nullptr on EOF before any byte (the origin closed an idle
    // connection). Leading blank lines are skipped.
    while (begin < end && (buffer[begin] == '\r' || buffer[begin] == '\n')) ++begin;
    for (size_t i = begin; i < end; i++) {
      if (buffer[i] != '\n') continue;
      size_t next = i + 1;
      if (next < end && buffer[next] == '\r') ++next;
      if (next < end && buffer[next] == '\n') {
        auto head = kj::heapArray<char>(reinterpret_cast<const char*>(buffer.begin() + begin),
                                        i + 1 - begin);
        begin = next + 1;
        return kj::Maybe<kj::Array<char>>(kj::mv(head));
      }
    }
    return fill(CONN_BUFFER_SIZE).then([this](bool more) -> kj::Promise<kj::Maybe<kj::Array<char>>> {
      if (more) return readHead();
      if (begin == end && !receivedAny) return kj::Maybe<kj::Array<char>>(nullptr);
      return originException(kj::Exception::Type::DISCONNECTED,
                             "origin closed the connection in the middle of a response head");
    });
  }

  kj::Promise<kj::String> readLine() {
    for (size_t i = begin; i < end; i++) {
      if (buffer[i] != '\n') continue;
      size_t stop = i;
      if (stop > begin && buffer[stop - 1] == '\r') --stop;
      auto line = kj::heapString(reinterpret_cast<const char*>(buffer.begin() + begin),
                                 stop - begin);
      begin = i + 1;
      return kj::mv(line);
    }
    return fill(MAX_LINE).then([this](bool more) -> kj::Promise<kj::String> {
      if (more) return readLine();
      return originException(kj::Exception::Type::DISCONNECTED,
                             "origin closed the connection in the middle of a chunked body");
    });
  }

private:
  kj::Promise<bool> fill(size_t limit) {
    // Reads more bytes after the unread ones; false on EOF. Fails once `limit` unread bytes
    // hold no complete line/head.
    if (end - begin >= limit) {
      return originException(kj::Exception::Type::FAILED,
                             "origin sent an over-long response head or chunk line");
    }
    if (begin > 0) {
      memmove(buffer.begin(), buffer.begin() + begin, end - begin);
      end -= begin;
      begin = 0;
    }
    if (end == buffer.size()) {
      // A head (or line) longer than the buffer: grow it, up to the limit.
      auto bigger = kj::heapArray<kj::byte>(kj::min(buffer.size() * 2, kj::max(limit, buffer.size())));
      memcpy(bigger.begin(), buffer.begin(), end);
      buffer = kj::mv(bigger);
    }
    return stream->tryRead(buffer.begin() + end, 1, buffer.size() - end)
        .then([this](size_t n) {
      end += n;
      if (n > 0) receivedAny = true;
      return n > 0;
    });
  }
};

struct Acquired {
  kj::Own<Conn> conn;
  bool reused;
};

// ---------------------------------------------------------------------------------------------
// Dialling: connect timeout, SO_KEEPALIVE, `localhost` on ::1 then 127.0.0.1, TLS.

void applyKeepAlive(kj::AsyncIoStream& stream, kj::Duration interval) {
  if (interval <= 0 * kj::SECONDS) return;
  int one = 1;
  int seconds = kj::max(1, int(interval / kj::SECONDS));
  // Not every stream is a TCP socket (unix sockets, TLS wrappers): best effort.
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
    stream.setsockopt(SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
    stream.setsockopt(IPPROTO_TCP, TCP_KEEPIDLE, &seconds, sizeof(seconds));
    stream.setsockopt(IPPROTO_TCP, TCP_KEEPINTVL, &seconds, sizeof(seconds));
  })) {
    // Expected for unix sockets (EOPNOTSUPP) and in-memory pipes (UNIMPLEMENTED).
  }
}

// Connects to the first candidate that answers, each under the connect timeout, and turns on TCP
// keep-alive. This is the "wrapping NetworkAddress" that every origin connection goes through.
class DialAddress final: public kj::NetworkAddress {
public:
  DialAddress(kj::Timer& timer, kj::Network& network, kj::String display,
              kj::Array<kj::String> candidates, uint port, kj::Duration connectTimeout,
              kj::Duration keepAlive)
      : timer(timer), network(network), display(kj::mv(display)),
        candidates(kj::mv(candidates)), port(port), connectTimeout(connectTimeout),
        keepAlive(keepAlive) {}

  kj::Promise<kj::Own<kj::AsyncIoStream>> connect() override { return tryCandidate(0); }

  kj::Own<kj::ConnectionReceiver> listen() override {
    KJ_UNIMPLEMENTED("origin addresses are only for connecting");
  }
  kj::Own<kj::NetworkAddress> clone() override {
    auto copy = kj::heapArray<kj::String>(candidates.size());
    for (auto i: kj::indices(candidates)) copy[i] = kj::str(candidates[i]);
    return kj::heap<DialAddress>(timer, network, kj::str(display), kj::mv(copy), port,
                                 connectTimeout, keepAlive);
  }
  kj::String toString() override { return kj::str(display); }

private:
  kj::Timer& timer;
  kj::Network& network;
  kj::String display;                 // "tcp localhost:8080", "unix /run/x.sock"
  kj::Array<kj::String> candidates;  // parseAddress() inputs, tried in order
  uint port;
  kj::Duration connectTimeout;
  kj::Duration keepAlive;

  kj::Promise<kj::Own<kj::AsyncIoStream>> tryCandidate(size_t index) {
    auto attempt = network.parseAddress(candidates[index], port)
        .then([this](kj::Own<kj::NetworkAddress> address) {
      auto connecting = address->connect().attach(kj::mv(address));
      return timer.timeoutAfter(connectTimeout, kj::mv(connecting));
    }).then([this](kj::Own<kj::AsyncIoStream> stream) {
      applyKeepAlive(*stream, keepAlive);
      return kj::mv(stream);
    });
    auto settled = attempt.catch_([this, index](kj::Exception&& e)
                                      -> kj::Promise<kj::Own<kj::AsyncIoStream>> {
      if (index + 1 < candidates.size()) return tryCandidate(index + 1);
      return kj::Exception(e.getType(), __FILE__, __LINE__,
                           kj::str("dial ", display, ": ", describeCause(e)));
    });
    if (index + 1 == candidates.size()) return settled;
    // Happy eyeballs, lite: if this candidate has not answered within FALLBACK_DELAY (a
    // black-holed ::1), race the next one. The fallback never fails the race by itself: when
    // it fails, the first attempt decides.
    auto fallback = timer.afterDelay(FALLBACK_DELAY)
        .then([this, index]() { return tryCandidate(index + 1); })
        .catch_([](kj::Exception&&) -> kj::Promise<kj::Own<kj::AsyncIoStream>> {
      return kj::NEVER_DONE;
    });
    return settled.exclusiveJoin(kj::mv(fallback));
  }
};

// The hello-world origin: each connect() is an in-memory pipe served by a kj::HttpServer.
class InProcessAddress final: public kj::NetworkAddress {
public:
  InProcessAddress(kj::HttpServer& server, kj::TaskSet& tasks): server(server), tasks(tasks) {}

  kj::Promise<kj::Own<kj::AsyncIoStream>> connect() override {
    auto pipe = kj::newTwoWayPipe();
    tasks.add(server.listenHttp(kj::mv(pipe.ends[1])));
    return kj::mv(pipe.ends[0]);
  }
  kj::Own<kj::ConnectionReceiver> listen() override {
    KJ_UNIMPLEMENTED("origin addresses are only for connecting");
  }
  kj::Own<kj::NetworkAddress> clone() override { return kj::heap<InProcessAddress>(server, tasks); }
  kj::String toString() override { return kj::str("hello-world"); }

private:
  kj::HttpServer& server;
  kj::TaskSet& tasks;
};

kj::Maybe<kj::String> readFile(kj::StringPtr path, kj::String& out) {
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
    int fd;
    KJ_SYSCALL(fd = open(path.cStr(), O_RDONLY | O_CLOEXEC), path);
    kj::AutoCloseFd owned(fd);
    kj::FdInputStream in(kj::mv(owned));
    out = kj::heapString(in.readAllText());
  })) {
    return kj::str("cannot read ", path, ": ", e->getDescription());
  }
  return nullptr;
}

}  // namespace

// =============================================================================================

class Origin::Impl final: private kj::TaskSet::ErrorHandler {
public:
  Impl(const OriginConfig& config, kj::Timer& timer, kj::Network& network,
       const kj::HttpHeaderTable& table, kj::Maybe<kj::Own<kj::TlsContext>> tls)
      : config(config), timer(timer), table(table), tls(kj::mv(tls)), tasks(*this) {
    switch (config.kind) {
      case OriginKind::HTTP:
      case OriginKind::HTTPS: {
        kj::Vector<kj::String> candidates;
        if (config.host == "localhost") {
          // cloudflared #742: origins often listen on only one of the two.
          candidates.add(kj::str("[::1]"));
          candidates.add(kj::str("127.0.0.1"));
        } else if (config.host.findFirst(':') != nullptr) {
          candidates.add(kj::str('[', config.host, ']'));
        } else {
          candidates.add(kj::str(config.host));
        }
        auto display = config.host.findFirst(':') != nullptr
            ? kj::str("tcp [", config.host, "]:", config.port)
            : kj::str("tcp ", config.host, ':', config.port);
        address = kj::heap<DialAddress>(timer, network, kj::mv(display),
                                        candidates.releaseAsArray(), config.port,
                                        config.connectTimeout, config.tcpKeepAlive);
        break;
      }
      case OriginKind::UNIX: {
        auto candidates = kj::heapArray<kj::String>(1);
        candidates[0] = kj::str("unix:", config.unixPath);
        address = kj::heap<DialAddress>(timer, network, kj::str("unix ", config.unixPath),
                                        kj::mv(candidates), 0, config.connectTimeout,
                                        kj::Duration(0 * kj::SECONDS));
        break;
      }
      case OriginKind::HELLO_WORLD: {
        helloService = newHelloWorldService(timer, table, config.helloSseInterval);
        helloServer = kj::heap<kj::HttpServer>(timer, table, *KJ_ASSERT_NONNULL(helloService));
        address = kj::heap<InProcessAddress>(*KJ_ASSERT_NONNULL(helloServer), tasks);
        break;
      }
      case OriginKind::HTTP_STATUS:
        break;
    }
  }

  ~Impl() noexcept(false) {
    idle.clear();
  }

  kj::Promise<void> serveStream(kj::AsyncIoStream& stream, schema::ConnectRequest::Reader request);

  kj::Promise<Acquired> acquire(bool fresh) {
    sweep();
    while (!fresh && !idle.empty()) {
      auto entry = kj::mv(idle.back());
      idle.removeLast();
      if (entry->dead) continue;
      entry->watch = nullptr;  // cancels the close-watch read before the conn is used again
      ++stats.connectionsReused;
      entry->conn->receivedAny = false;
      return Acquired{kj::mv(entry->conn), true};
    }
    ++stats.connectionsOpened;
    auto& addr = *KJ_ASSERT_NONNULL(address);
    auto connecting = addr.connect();
    KJ_IF_MAYBE(t, tls) {
      connecting = connecting.then([this, t](kj::Own<kj::AsyncIoStream> raw) {
        kj::StringPtr name = config.host;
        KJ_IF_MAYBE(n, config.originServerName) {
          name = *n;
        }
        return timer.timeoutAfter(config.tlsTimeout, (*t)->wrapClient(kj::mv(raw), name))
            .catch_([this](kj::Exception&& e) -> kj::Promise<kj::Own<kj::AsyncIoStream>> {
          return kj::Exception(e.getType(), __FILE__, __LINE__,
                               kj::str("tls handshake with ", config.toString(), ": ",
                                       describeCause(e)));
        });
      });
    }
    return connecting.then([](kj::Own<kj::AsyncIoStream> stream) {
      return Acquired{kj::heap<Conn>(kj::mv(stream)), false};
    });
  }

  void release(kj::Own<Conn> conn) {
    // Returns a connection whose exchange completed cleanly to the idle pool.
    if (config.keepAliveTimeout <= 0 * kj::SECONDS || config.keepAliveConnections == 0) return;
    if (conn->leftover() > 0) return;  // unsolicited bytes: not reusable
    conn->shrink();
    sweep();
    if (idle.size() >= config.keepAliveConnections) {
      // Drop the oldest idle connection.
      kj::Vector<kj::Own<IdleEntry>> kept(idle.size());
      for (size_t i = 1; i < idle.size(); i++) kept.add(kj::mv(idle[i]));
      idle = kj::mv(kept);
    }
    auto entry = kj::heap<IdleEntry>();
    entry->conn = kj::mv(conn);
    IdleEntry* e = entry.get();
    auto closed = e->conn->stream->tryRead(e->probe, 1, 1).ignoreResult();
    e->watch = timer.afterDelay(config.keepAliveTimeout)
        .exclusiveJoin(kj::mv(closed))
        .then([this, e]() { retire(*e); }, [this, e](kj::Exception&&) { retire(*e); })
        .eagerlyEvaluate(nullptr);
    idle.add(kj::mv(entry));
  }

  void gaugeAdd(uint64_t n) {
    stats.bufferedBytes += n;
    stats.maxBufferedBytes = kj::max(stats.maxBufferedBytes, stats.bufferedBytes);
  }
  void gaugeSub(uint64_t n) { stats.bufferedBytes -= n; }

  OriginStats getStats() const {
    auto copy = stats;
    uint64_t live = 0;
    for (auto& entry: idle) {
      if (!entry->dead) ++live;
    }
    copy.idleConnections = live;
    return copy;
  }

  const OriginConfig& config;
  kj::Timer& timer;
  const kj::HttpHeaderTable& table;
  OriginStats stats;
  kj::Maybe<OriginObserver&> observer;

private:
  struct IdleEntry {
    kj::Own<Conn> conn;
    kj::byte probe[1];
    bool dead = false;
    kj::Promise<void> watch = nullptr;  // after `conn`: destroyed (cancelled) first
  };

  kj::Maybe<kj::Own<kj::TlsContext>> tls;
  kj::Maybe<kj::Own<kj::HttpService>> helloService;
  kj::Maybe<kj::Own<kj::HttpServer>> helloServer;
  kj::Maybe<kj::Own<kj::NetworkAddress>> address;
  kj::Vector<kj::Own<IdleEntry>> idle;
  kj::TaskSet tasks;  // last: hello-world connections, pool sweeps

  void retire(IdleEntry& entry) {
    // The origin closed an idle connection (or sent junk), or it idled out. Can't destroy the
    // entry here: we're inside its own `watch` promise. Sweep on a later turn.
    entry.dead = true;
    tasks.add(kj::evalLater([this]() { sweep(); }));
  }

  void sweep() {
    bool any = false;
    for (auto& entry: idle) {
      if (entry->dead) any = true;
    }
    if (!any) return;
    kj::Vector<kj::Own<IdleEntry>> kept(idle.size());
    for (auto& entry: idle) {
      if (!entry->dead) kept.add(kj::mv(entry));
    }
    idle = kj::mv(kept);
  }

  void taskFailed(kj::Exception&& exception) override {
    if (exception.getType() == kj::Exception::Type::DISCONNECTED) {
      KJ_LOG(INFO, "origin background task ended", exception);
    } else {
      KJ_LOG(ERROR, "origin background task failed", exception);
    }
  }
};

// =============================================================================================
// One data stream.

namespace {

enum class RequestBody { NONE, FIXED, CHUNKED, RAW };
enum class ResponseBody { NONE, FIXED, CHUNKED, UNTIL_EOF };

size_t pumpBufferSize(bool lengthKnown, uint64_t length) {
  // A body of known length smaller than a pump buffer gets a buffer of its size: a 1 KiB
  // exchange then allocates 1 KiB, not 64 KiB twice (which glibc serves from the top of the heap
  // and trims again on free: a brk() pair and page faults per request).
  if (!lengthKnown || length >= PUMP_BUFFER_SIZE) return PUMP_BUFFER_SIZE;
  return kj::max(size_t(length), size_t(1));
}

class Exchange {
public:
  Exchange(Origin::Impl& impl, kj::AsyncIoStream& edge, schema::ConnectRequest::Reader request)
      : impl(impl), edge(edge), request(request), headers(impl.table) {
    ++impl.stats.streamsActive;
  }
  ~Exchange() noexcept(false) {
    impl.gaugeSub(heldRequest + heldResponse);
    --impl.stats.streamsActive;
    if (conn.get() != nullptr && !completed) resetConnection(*conn->stream);
  }
  KJ_DISALLOW_COPY(Exchange);

  kj::Promise<void> run() {
    return kj::evalNow([this]() { return start(); })
        .catch_([this](kj::Exception&& e) { return onFailure(kj::mv(e)); });
  }

private:
  Origin::Impl& impl;
  kj::AsyncIoStream& edge;
  schema::ConnectRequest::Reader request;

  // Request towards the origin.
  kj::Maybe<wire::HttpRequestHead> head;
  kj::HttpMethod method = kj::HttpMethod::GET;
  kj::String target;
  bool websocket = false;
  kj::String hostStorage;  // Host when the request carried no HttpHost
  kj::HttpHeaders headers;  // points into `head`, `hostStorage` and the config
  RequestBody requestMode = RequestBody::NONE;
  uint64_t requestRemaining = 0;
  bool requestDone = true;
  bool requestBroken = false;
  kj::String connectionHeaders[kj::HttpHeaders::WEBSOCKET_CONNECTION_HEADERS_COUNT];
  kj::StringPtr connectionHeaderPtrs[kj::HttpHeaders::WEBSOCKET_CONNECTION_HEADERS_COUNT];

  // Origin connection.
  kj::Own<Conn> conn;
  bool reused = false;
  bool retried = false;

  // Response.
  bool headSent = false;
  bool failureCounted = false;
  uint status = 0;
  kj::Own<kj::HttpHeaders> responseHeaders;
  kj::Array<char> responseHeadText;
  ResponseBody responseMode = ResponseBody::NONE;
  uint64_t responseRemaining = 0;
  bool chunkedDone = false;
  bool reusable = true;
  bool completed = false;   // the response went out whole (else the connection is reset)

  // Pump buffers, counted in the gauge while they hold data.
  kj::Array<kj::byte> requestBuffer;
  kj::Array<kj::byte> responseBuffer;
  uint64_t heldRequest = 0;
  uint64_t heldResponse = 0;
  kj::String chunkHeader;
  kj::ArrayPtr<const kj::byte> pieces[3];

  // ------------------------------------------------------------------------------------------

  kj::Promise<void> start() {
    if (impl.config.kind == OriginKind::HTTP_STATUS) return answerStatus();
    KJ_IF_MAYBE(error, prepare()) {
      // Refused before reaching the origin (malformed or unsupported): a 502 for the visitor,
      // and a line for the operator (aggregated by the logger when repeated).
      auto originService = impl.config.toString();
      kj::StringPtr dest = request.getDest();
      kj::StringPtr cause = *error;
      KJ_LOG(WARNING, "Request refused", originService, dest, cause);
      return answerError(*error);
    }
    return attempt();
  }

  kj::Maybe<kj::String> prepare() {
    // Decodes the ConnectRequest and builds the origin request head. Returns the error text of a
    // request that cannot be served.
    auto type = request.getType();
    if (type == schema::ConnectionType::TCP) {
      return kj::str("TCP streams (ConnectionType tcp) are not supported by quick tunnels");
    }
    if (type != schema::ConnectionType::HTTP && type != schema::ConnectionType::WEBSOCKET) {
      return kj::str("unknown connection type ", uint(type));
    }
    websocket = type == schema::ConnectionType::WEBSOCKET;

    auto decoded = wire::decodeRequest(request);
    KJ_IF_MAYBE(error, decoded.tryGet<wire::WireError>()) {
      return kj::str("malformed request: ", error->message);
    }
    auto& h = head.emplace(kj::mv(decoded.get<wire::HttpRequestHead>()));

    auto upperMethod = kj::heapString(h.method);
    for (char& c: upperMethod) {
      if (c >= 'a' && c <= 'z') c -= 'a' - 'A';
    }
    KJ_IF_MAYBE(m, kj::tryParseHttpMethod(upperMethod)) {
      method = *m;
    } else {
      return kj::str("request method \"", h.method, "\" is not supported by cfqt's HTTP client");
    }
    if (websocket && method != kj::HttpMethod::GET) {
      return kj::str("WebSocket upgrade with method ", h.method);
    }

    KJ_IF_MAYBE(t, requestTarget(h.dest)) {
      target = kj::mv(*t);
    } else {
      return kj::str("malformed request URL \"", h.dest, "\"");
    }

    // Host: HttpHost, unless --http-host-header (then X-Forwarded-Host keeps the original).
    kj::StringPtr hostValue = h.host;
    KJ_IF_MAYBE(override, impl.config.httpHostHeader) {
      hostValue = *override;
    }
    if (hostValue.size() == 0) {
      // No HttpHost: the host of an absolute `dest`, else the origin's own address (Go sends
      // the URL's host; an HTTP/1.1 request needs one).
      hostStorage = destHost(h.dest);
      if (hostStorage.size() == 0 && (impl.config.kind == OriginKind::HTTP ||
                                      impl.config.kind == OriginKind::HTTPS)) {
        auto url = impl.config.toString();
        hostStorage = kj::str(url.slice(url.findFirst('/').orDefault(0) + 2));
      }
      hostValue = hostStorage;
    }
    if (!wire::isValidHeaderValue(hostValue)) return kj::str("malformed Host");
    if (hostValue.size() > 0) headers.set(kj::HttpHeaderId::HOST, hostValue);
    if (impl.config.httpHostHeader != nullptr && h.host.size() > 0) {
      headers.add("X-Forwarded-Host", h.host);
    }
    KJ_IF_MAYBE(id, impl.config.connectorId) {
      if (!wire::isValidHeaderValue(*id)) return kj::str("malformed connector id");
      headers.add("Cf-Warp-Tag-Id", *id);
    }

    for (auto& header: h.headers) {
      auto& name = header.name;
      if (equalsIgnoreCase(name, "Host") || equalsIgnoreCase(name, "Expect") ||
          equalsIgnoreCase(name, "Cf-Trace-Id") || startsWithIgnoreCase(name, "Cf-Cloudflared-") ||
          equalsIgnoreCase(name, "Proxy-Connection")) {
        continue;
      }
      if (impl.config.httpHostHeader != nullptr && equalsIgnoreCase(name, "X-Forwarded-Host")) {
        continue;
      }
      if (impl.config.connectorId != nullptr && equalsIgnoreCase(name, "Cf-Warp-Tag-Id")) {
        continue;
      }
      // Connection-level headers (Connection, Keep-Alive, TE, Trailer, Upgrade, Content-Length,
      // Transfer-Encoding, Sec-WebSocket-*) are overridden by `connectionHeaders` below.
      headers.add(name, header.value);  // `head` outlives `headers`: both are members
    }

    // Connection-level headers, in KJ_HTTP_FOR_EACH_BUILTIN_HEADER order.
    using B = kj::HttpHeaders::BuiltinIndices;
    if (websocket) {
      connectionHeaders[B::CONNECTION] = kj::str("Upgrade");
      connectionHeaders[B::UPGRADE] = kj::str("websocket");
      connectionHeaders[B::SEC_WEBSOCKET_VERSION] = kj::str("13");
      for (auto& header: h.headers) {
        if (equalsIgnoreCase(header.name, "Sec-WebSocket-Key")) {
          connectionHeaders[B::SEC_WEBSOCKET_KEY] = kj::str(header.value);
        } else if (equalsIgnoreCase(header.name, "Sec-WebSocket-Extensions")) {
          connectionHeaders[B::SEC_WEBSOCKET_EXTENSIONS] = kj::str(header.value);
        }
      }
      requestMode = RequestBody::RAW;
      requestDone = false;
      reusable = false;
    } else {
      connectionHeaders[B::CONNECTION] = kj::str("keep-alive");
      if (h.chunked) {
        connectionHeaders[B::TRANSFER_ENCODING] = kj::str("chunked");
        requestMode = RequestBody::CHUNKED;
        requestDone = false;
      } else if (h.contentLength.orDefault(0) > 0) {
        requestRemaining = KJ_ASSERT_NONNULL(h.contentLength);
        connectionHeaders[B::CONTENT_LENGTH] = kj::str(requestRemaining);
        requestMode = RequestBody::FIXED;
        requestDone = false;
      } else if (method == kj::HttpMethod::POST || method == kj::HttpMethod::PUT ||
                 method == kj::HttpMethod::PATCH) {
        connectionHeaders[B::CONTENT_LENGTH] = kj::str("0");  // as Go's client does
      }
      // Sec-WebSocket-* of a non-upgrade request pass through as ordinary headers.
      for (auto& header: h.headers) {
        if (equalsIgnoreCase(header.name, "Sec-WebSocket-Key")) {
          connectionHeaders[B::SEC_WEBSOCKET_KEY] = kj::str(header.value);
        } else if (equalsIgnoreCase(header.name, "Sec-WebSocket-Version")) {
          connectionHeaders[B::SEC_WEBSOCKET_VERSION] = kj::str(header.value);
        } else if (equalsIgnoreCase(header.name, "Sec-WebSocket-Accept")) {
          connectionHeaders[B::SEC_WEBSOCKET_ACCEPT] = kj::str(header.value);
        } else if (equalsIgnoreCase(header.name, "Sec-WebSocket-Extensions")) {
          connectionHeaders[B::SEC_WEBSOCKET_EXTENSIONS] = kj::str(header.value);
        }
      }
    }
    return nullptr;
  }

  static kj::String destHost(kj::StringPtr dest) {
    KJ_IF_MAYBE(pos, dest.findFirst(':')) {
      if (dest.slice(*pos).startsWith("://")) {
        auto afterScheme = dest.slice(*pos + 3);
        size_t i = 0;
        while (i < afterScheme.size() && afterScheme[i] != '/' && afterScheme[i] != '?' &&
               afterScheme[i] != '#') {
          ++i;
        }
        return kj::heapString(afterScheme.slice(0, i));
      }
    }
    return kj::str();
  }

  static kj::Maybe<kj::String> requestTarget(kj::StringPtr dest) {
    // Path and query of `dest` (an absolute URL or a bare path); fragment dropped.
    kj::StringPtr rest = dest;
    KJ_IF_MAYBE(pos, dest.findFirst(':')) {
      if (dest.slice(*pos).startsWith("://")) {
        auto afterScheme = dest.slice(*pos + 3);
        size_t i = 0;
        while (i < afterScheme.size() && afterScheme[i] != '/' && afterScheme[i] != '?' &&
               afterScheme[i] != '#') {
          ++i;
        }
        rest = afterScheme.slice(i);
      }
    }
    KJ_IF_MAYBE(hash, rest.findFirst('#')) {
      return finishTarget(kj::heapString(rest.slice(0, *hash)));
    }
    return finishTarget(rest);
  }

  static kj::Maybe<kj::String> finishTarget(kj::StringPtr rest) {
    for (char c: rest) {
      if (uint8_t(c) <= ' ' || c == 0x7f) return nullptr;
    }
    if (rest.size() == 0) return kj::str("/");
    if (rest[0] == '?') return kj::str("/", rest);
    if (rest[0] != '/') return nullptr;
    return kj::str(rest);
  }

  // ------------------------------------------------------------------------------------------

  kj::Promise<void> attempt() {
    return impl.acquire(retried).then([this](Acquired acquired) {
      conn = kj::mv(acquired.conn);
      reused = acquired.reused;
      return exchange();
    }).catch_([this](kj::Exception&& e) -> kj::Promise<void> {
      // A pooled connection the origin had already closed: retry once on a fresh one, when
      // nothing of the request body was consumed yet (Go's transport does the same).
      if (reused && !retried && !headSent && conn.get() != nullptr && !conn->receivedAny &&
          requestMode == RequestBody::NONE) {
        retried = true;
        conn = nullptr;
        return attempt();
      }
      return kj::mv(e);
    });
  }

  kj::Promise<void> exchange() {
    auto text = headers.serializeRequest(
        method, target,
        kj::arrayPtr(connectionHeadersPtrs(), kj::HttpHeaders::WEBSOCKET_CONNECTION_HEADERS_COUNT));
    auto written = conn->stream->write(text.begin(), text.size()).attach(kj::mv(text));
    return written.then([this]() -> kj::Promise<void> {
      if (websocket) return readFinalHead();  // the edge's bytes flow only after a 101
      // The request body is pumped while the response is read (an origin may answer early).
      // Once the response is complete, an unfinished request body is abandoned.
      auto requestSide = pumpRequest().then([]() -> kj::Promise<void> { return kj::NEVER_DONE; });
      return readFinalHead().exclusiveJoin(kj::mv(requestSide));
    }).then([this]() { finish(); });
  }

  const kj::StringPtr* connectionHeadersPtrs() {
    for (size_t i = 0; i < kj::size(connectionHeaders); i++) {
      connectionHeaderPtrs[i] = connectionHeaders[i] == nullptr ? kj::StringPtr(nullptr)
                                                                : kj::StringPtr(connectionHeaders[i]);
    }
    return connectionHeaderPtrs;
  }

  // Request body: edge → origin, one buffer, next read only after the write resolved. Origin
  // write failures end the pump quietly (the response side reports them); edge read failures
  // propagate.
  kj::Promise<void> pumpRequest() {
    if (requestMode == RequestBody::NONE) return kj::READY_NOW;
    if (requestBuffer == nullptr) {
      requestBuffer = kj::heapArray<kj::byte>(
          pumpBufferSize(requestMode == RequestBody::FIXED, requestRemaining));
    }
    size_t want = requestBuffer.size();
    if (requestMode == RequestBody::FIXED) {
      if (requestRemaining == 0) {
        requestDone = true;
        return kj::READY_NOW;
      }
      want = kj::min<uint64_t>(uint64_t(want), requestRemaining);
    }
    return edge.tryRead(requestBuffer.begin(), 1, want).then([this](size_t n) {
      return forwardRequest(n);
    });
  }

  kj::Promise<void> forwardRequest(size_t n) {
    if (n == 0) return endRequest();
    heldRequest += n;
    impl.gaugeAdd(n);
    kj::Promise<void> write = nullptr;
    if (requestMode == RequestBody::CHUNKED) {
      chunkHeader = kj::str(kj::hex(uint64_t(n)), "\r\n");
      pieces[0] = chunkHeader.asBytes();
      pieces[1] = requestBuffer.slice(0, n);
      pieces[2] = kj::StringPtr("\r\n").asBytes();
      write = conn->stream->write(kj::arrayPtr(pieces, 3));
    } else {
      if (requestMode == RequestBody::FIXED) requestRemaining -= n;
      write = conn->stream->write(requestBuffer.begin(), n);
    }
    return write.then([this]() {
      impl.gaugeSub(heldRequest);
      heldRequest = 0;
      return pumpRequest();
    }, [this](kj::Exception&& e) -> kj::Promise<void> {
      impl.gaugeSub(heldRequest);
      heldRequest = 0;
      requestBroken = true;
      return kj::READY_NOW;
    });
  }

  kj::Promise<void> endRequest() {
    switch (requestMode) {
      case RequestBody::NONE:
        break;
      case RequestBody::FIXED:
        // The edge ended the stream before Content-Length bytes: the origin request can't be
        // completed. Shut the origin's read side so it answers (or fails) promptly.
        requestBroken = true;
        return originException(kj::Exception::Type::DISCONNECTED,
                               "Incoming request ended abruptly");
      case RequestBody::CHUNKED:
        return conn->stream->write("0\r\n\r\n", 5).then([this]() {
          requestDone = true;
        }, [this](kj::Exception&&) {
          requestBroken = true;
        });
      case RequestBody::RAW:
        requestDone = true;
        break;
    }
    return kj::READY_NOW;
  }

  // ------------------------------------------------------------------------------------------

  kj::Promise<void> readFinalHead() {
    return conn->readHead().then([this](kj::Maybe<kj::Array<char>> text) {
      KJ_IF_MAYBE(t, text) {
        return onHead(kj::mv(*t));
      }
      return kj::Promise<void>(originException(
          kj::Exception::Type::DISCONNECTED, "origin closed the connection without a response"));
    });
  }

  kj::Promise<void> onHead(kj::Array<char> text) {
    bool http10 = text.size() >= 8 && memcmp(text.begin(), "HTTP/1.0", 8) == 0;
    auto parsed = kj::heap<kj::HttpHeaders>(impl.table);
    auto result = parsed->tryParseResponse(text);
    KJ_IF_MAYBE(error, result.tryGet<kj::HttpHeaders::ProtocolError>()) {
      return originException(kj::Exception::Type::FAILED,
                             kj::str("malformed response from origin: ", error->description));
    }
    status = result.get<kj::HttpHeaders::Response>().statusCode;
    // kj's parser is lenient: header names with non-token bytes and values with control bytes
    // get through. Go's reader (textproto) refuses such a response, and the edge would refuse
    // the metadata we made of it (wire::decodeResponse: BAD_HEADER): fail before the head.
    kj::Maybe<kj::String> badHeader;
    parsed->forEach([&](kj::StringPtr name, kj::StringPtr value) {
      if (badHeader != nullptr) return;
      if (!wire::isHttpToken(name)) {
        badHeader = kj::str("malformed response from origin: invalid header name");
      } else if (!wire::isValidHeaderValue(value)) {
        badHeader = kj::str("malformed response from origin: invalid value of header ",
                            wire::canonicalHeaderName(name));
      }
    });
    KJ_IF_MAYBE(error, badHeader) {
      return originException(kj::Exception::Type::FAILED, *error);
    }
    if (status >= 100 && status < 200 && !(status == 101 && websocket)) {
      // Interim response (100 Continue, 102, 103): skip it. A 101 to a plain request would
      // switch protocols we did not ask for: fail.
      if (status == 101) {
        return originException(kj::Exception::Type::FAILED,
                               "origin switched protocols on a non-upgrade request");
      }
      return readFinalHead();
    }
    if (status < 100 || status > 999) {
      return originException(kj::Exception::Type::FAILED, "origin sent an invalid status code");
    }
    responseHeaders = kj::mv(parsed);
    responseHeadText = kj::mv(text);
    if (http10) reusable = false;
    KJ_IF_MAYBE(connection, responseHeaders->get(kj::HttpHeaderId::CONNECTION)) {
      if (containsIgnoreCase(*connection, "close")) reusable = false;
    }
    if (status == 101) return startWebSocket();
    KJ_IF_MAYBE(error, chooseResponseBody()) {
      return originException(kj::Exception::Type::FAILED, *error);
    }
    return sendHead().then([this]() { return pumpResponse(); });
  }

  kj::Maybe<kj::String> chooseResponseBody() {
    if (method == kj::HttpMethod::HEAD || status == 204 || status == 304) {
      responseMode = ResponseBody::NONE;
      return nullptr;
    }
    KJ_IF_MAYBE(te, responseHeaders->get(kj::HttpHeaderId::TRANSFER_ENCODING)) {
      // The last coding decides; anything but chunked-last is delimited by EOF.
      kj::StringPtr value = *te;
      size_t end = value.size();
      while (end > 0 && (value[end - 1] == ' ' || value[end - 1] == '\t')) --end;
      auto last = kj::heapString(value.slice(0, end));
      KJ_IF_MAYBE(comma, last.findLast(',')) {
        last = kj::heapString(last.slice(*comma + 1));
      }
      kj::StringPtr lastPtr = last;
      while (lastPtr.size() > 0 && (lastPtr[0] == ' ' || lastPtr[0] == '\t')) {
        lastPtr = lastPtr.slice(1);
      }
      if (equalsIgnoreCase(lastPtr, "chunked")) {
        responseMode = ResponseBody::CHUNKED;
      } else {
        responseMode = ResponseBody::UNTIL_EOF;
        reusable = false;
      }
      return nullptr;
    }
    KJ_IF_MAYBE(cl, responseHeaders->get(kj::HttpHeaderId::CONTENT_LENGTH)) {
      KJ_IF_MAYBE(length, parseDecimal(*cl)) {
        responseMode = *length > 0 ? ResponseBody::FIXED : ResponseBody::NONE;
        responseRemaining = *length;
        return nullptr;
      }
      return kj::str("origin sent an invalid Content-Length");
    }
    responseMode = ResponseBody::UNTIL_EOF;
    reusable = false;
    return nullptr;
  }

  kj::Promise<void> sendHead() {
    kj::Vector<wire::Header> out;
    bool dropLength = responseMode == ResponseBody::CHUNKED;
    responseHeaders->forEach([&](kj::StringPtr name, kj::StringPtr value) {
      if (equalsIgnoreCase(name, "Transfer-Encoding")) return;
      if (dropLength && equalsIgnoreCase(name, "Content-Length")) return;
      out.add(wire::Header{wire::canonicalHeaderName(name), kj::str(value)});
    });
    auto message = kj::heap<capnp::MallocMessageBuilder>();
    auto response = message->initRoot<schema::ConnectResponse>();
    wire::encodeResponse(response, status, out.asPtr());
    headSent = true;
    KJ_IF_MAYBE(o, impl.observer) o->responseHead(status);
    auto reader = response.asReader();
    return wire::writeConnectResponse(edge, reader).attach(kj::mv(message));
  }

  // Response body: origin → edge, one buffer, each chunk written as soon as it was read.
  kj::Promise<void> pumpResponse() {
    if (responseBuffer == nullptr) {
      responseBuffer = kj::heapArray<kj::byte>(
          pumpBufferSize(responseMode == ResponseBody::FIXED, responseRemaining));
    }
    return readResponseBody().then([this](size_t n) -> kj::Promise<void> {
      if (n == 0) return kj::READY_NOW;
      heldResponse += n;
      impl.gaugeAdd(n);
      return edge.write(responseBuffer.begin(), n).then([this]() {
        impl.gaugeSub(heldResponse);
        heldResponse = 0;
        return pumpResponse();
      });
    });
  }

  kj::Promise<size_t> readResponseBody() {
    // Next piece of the de-framed body into responseBuffer; 0 at its end.
    auto buffer = responseBuffer.asPtr();
    switch (responseMode) {
      case ResponseBody::NONE:
        return size_t(0);
      case ResponseBody::UNTIL_EOF:
        return conn->read(buffer);
      case ResponseBody::FIXED:
        if (responseRemaining == 0) return size_t(0);
        return conn->read(buffer.slice(0, kj::min<uint64_t>(uint64_t(buffer.size()), responseRemaining)))
            .then([this](size_t n) -> kj::Promise<size_t> {
          if (n == 0) {
            return originException(kj::Exception::Type::DISCONNECTED,
                                   "origin closed the connection in the middle of the body");
          }
          responseRemaining -= n;
          return n;
        });
      case ResponseBody::CHUNKED:
        if (responseRemaining > 0) {
          return conn->read(buffer.slice(0, kj::min<uint64_t>(uint64_t(buffer.size()), responseRemaining)))
              .then([this](size_t n) -> kj::Promise<size_t> {
            if (n == 0) {
              return originException(kj::Exception::Type::DISCONNECTED,
                                     "origin closed the connection in the middle of a chunk");
            }
            responseRemaining -= n;
            if (responseRemaining > 0) return n;
            // End of the chunk's data: its CRLF follows.
            return conn->readLine().then([n](kj::String line) -> kj::Promise<size_t> {
              if (line.size() != 0) {
                return originException(kj::Exception::Type::FAILED,
                                       "origin sent a malformed chunked body");
              }
              return n;
            });
          });
        }
        if (chunkedDone) return size_t(0);
        return conn->readLine().then([this](kj::String line) -> kj::Promise<size_t> {
          KJ_IF_MAYBE(size, parseChunkSize(line)) {
            if (*size == 0) return readTrailers();
            responseRemaining = *size;
            return readResponseBody();
          }
          return originException(kj::Exception::Type::FAILED,
                                 "origin sent a malformed chunk size");
        });
    }
    KJ_UNREACHABLE;
  }

  kj::Promise<size_t> readTrailers() {
    // Trailers are dropped (not supported on QUIC, §6.4).
    return conn->readLine().then([this](kj::String line) -> kj::Promise<size_t> {
      if (line.size() == 0) {
        chunkedDone = true;
        return size_t(0);
      }
      return readTrailers();
    });
  }

  static void resetConnection(kj::AsyncIoStream& stream) {
    // An exchange abandoned midway (the visitor left, or it failed) closes its origin connection
    // with a reset: a plain close would queue its FIN behind request body bytes an origin that
    // stopped reading never takes, and the origin would never learn the request is gone. Not
    // every stream is a socket (in-process origins, TLS): those just close.
    kj::runCatchingExceptions([&]() {
      struct linger abort = {1, 0};
      stream.setsockopt(SOL_SOCKET, SO_LINGER, &abort, sizeof(abort));
    });
  }

  void finish() {
    // Response complete: FIN to the edge, stop reading its side; pool the connection if the
    // exchange left it clean.
    completed = true;
    edge.shutdownWrite();
    edge.abortRead();
    if (reusable && requestDone && !requestBroken) {
      impl.release(kj::mv(conn));
    }
  }

  // ------------------------------------------------------------------------------------------
  // WebSocket after the origin's 101: bytes both ways, unmodified, until either side ends.

  kj::Promise<void> startWebSocket() {
    responseMode = ResponseBody::UNTIL_EOF;
    reusable = false;
    return sendHead().then([this]() {
      auto toEdge = pumpResponse();
      auto toOrigin = pumpRequest();
      // One side ended cleanly: the session is over, the connection closes normally.
      return toEdge.exclusiveJoin(kj::mv(toOrigin)).then([this]() { completed = true; });
    });
  }

  // ------------------------------------------------------------------------------------------

  kj::Promise<void> answerStatus() {
    auto message = kj::heap<capnp::MallocMessageBuilder>();
    auto response = message->initRoot<schema::ConnectResponse>();
    wire::encodeResponse(response, impl.config.status, kj::ArrayPtr<const wire::Header>());
    headSent = true;
    KJ_IF_MAYBE(o, impl.observer) o->responseHead(impl.config.status);
    auto reader = response.asReader();
    return wire::writeConnectResponse(edge, reader).attach(kj::mv(message)).then([this]() {
      edge.shutdownWrite();
      edge.abortRead();
    });
  }

  void countFailure() {
    // Once per exchange, also when the error answer itself fails to go out.
    if (failureCounted) return;
    failureCounted = true;
    KJ_IF_MAYBE(o, impl.observer) o->requestFailed();
  }

  kj::Promise<void> answerError(kj::StringPtr text) {
    countFailure();
    headSent = true;  // a failure from here on is the edge's
    return wire::writeConnectResponseError(edge, text).then([this]() {
      edge.shutdownWrite();
      edge.abortRead();
    });
  }

  kj::Promise<void> onFailure(kj::Exception&& e) {
    countFailure();
    if (headSent) {
      // The head (or an error answer) is out: the only way to signal failure is a reset.
      return kj::Exception(kj::Exception::Type::DISCONNECTED, __FILE__, __LINE__,
                           kj::str("origin: stream must be reset: ", e.getDescription()));
    }
    // Our own failures ("dial tcp ...", "tls handshake ...", "origin: ...") are already worded;
    // anything else (a kj syscall message) is mapped to Go's words where we know them.
    kj::StringPtr description = e.getDescription();
    kj::String cause;
    if (description.startsWith("origin: ")) {
      cause = kj::str(description.slice(strlen("origin: ")));
    } else if (description.startsWith("dial ") || description.startsWith("tls handshake ")) {
      cause = kj::str(description);
    } else {
      cause = describeCause(e);
    }
    auto originService = impl.config.toString();
    kj::StringPtr dest = request.getDest();
    KJ_LOG(WARNING, "Request failed", originService, dest, cause);
    auto text = originErrorText(cause);
    return answerError(text).attach(kj::mv(text));
  }
};

}  // namespace

kj::Promise<void> Origin::Impl::serveStream(kj::AsyncIoStream& stream,
                                            schema::ConnectRequest::Reader request) {
  auto exchange = kj::heap<Exchange>(*this, stream, request);
  auto promise = exchange->run();
  return promise.attach(kj::mv(exchange));
}

// =============================================================================================

Origin::Origin(OriginConfig configParam, kj::Own<Impl> implParam)
    : config(kj::mv(configParam)), impl(kj::mv(implParam)) {}

Origin::~Origin() noexcept(false) {}

kj::OneOf<kj::Own<Origin>, kj::String> Origin::create(OriginConfig config, kj::Timer& timer,
                                                      kj::Network& network,
                                                      const kj::HttpHeaderTable& headerTable) {
  if (config.noTlsVerify) {
    return kj::str("--no-tls-verify is not supported yet: kj-tls cannot skip certificate "
                   "verification (use --origin-ca-pool to trust the origin's certificate)");
  }
  kj::Maybe<kj::Own<kj::TlsContext>> tls;
  if (config.kind == OriginKind::HTTPS) {
    kj::Vector<kj::TlsCertificate> roots;
    KJ_IF_MAYBE(path, config.caPool) {
      kj::String pem;
      KJ_IF_MAYBE(error, readFile(*path, pem)) {
        return kj::mv(*error);
      }
      // kj-tls trusts only the first certificate of each TlsCertificate: split the bundle.
      constexpr kj::StringPtr BEGIN = "-----BEGIN CERTIFICATE-----"_kj;
      constexpr kj::StringPtr END = "-----END CERTIFICATE-----"_kj;
      kj::StringPtr rest = pem;
      for (;;) {
        kj::Maybe<size_t> start;
        for (size_t i = 0; i + BEGIN.size() <= rest.size(); i++) {
          if (rest.slice(i).startsWith(BEGIN)) {
            start = i;
            break;
          }
        }
        KJ_IF_MAYBE(s, start) {
          auto from = rest.slice(*s);
          kj::Maybe<size_t> stop;
          for (size_t i = 0; i + END.size() <= from.size(); i++) {
            if (from.slice(i).startsWith(END)) {
              stop = i + END.size();
              break;
            }
          }
          KJ_IF_MAYBE(e, stop) {
            auto block = kj::heapString(from.slice(0, *e));
            KJ_IF_MAYBE(error, kj::runCatchingExceptions([&]() {
              roots.add(kj::TlsCertificate(block));
            })) {
              return kj::str("--origin-ca-pool ", *path, ": bad certificate: ",
                             error->getDescription());
            }
            rest = from.slice(*e);
            continue;
          }
        }
        break;
      }
      if (roots.empty()) return kj::str("--origin-ca-pool ", *path, " holds no certificate");
    }
    kj::TlsContext::Options options;
    options.useSystemTrustStore = true;
    options.trustedCertificates = roots.asPtr();
    KJ_IF_MAYBE(error, kj::runCatchingExceptions([&]() {
      tls = kj::heap<kj::TlsContext>(kj::mv(options));
    })) {
      return kj::str("cannot set up TLS for the origin: ", error->getDescription());
    }
  }
  auto origin = kj::heap<Origin>(kj::mv(config), kj::Own<Impl>());
  origin->impl = kj::heap<Impl>(origin->config, timer, network, headerTable, kj::mv(tls));
  return kj::mv(origin);
}

kj::Promise<void> Origin::serveStream(kj::AsyncIoStream& stream,
                                      schema::ConnectRequest::Reader request) {
  return impl->serveStream(stream, request);
}

OriginStats Origin::getStats() const { return impl->getStats(); }

void Origin::setObserver(OriginObserver& observer) { impl->observer = observer; }

uint64_t Origin::bufferedBytes() const { return impl->stats.bufferedBytes; }

}  // namespace cfqt::origin
