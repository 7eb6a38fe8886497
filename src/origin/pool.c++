// The origin connection pool (see pool.h): Conn's read-ahead buffer; dialling (connect timeout,
// SO_KEEPALIVE, `localhost` on ::1 then 127.0.0.1, TLS, the in-process hello-world); the idle
// keep-alive pool with its close-watch and sweeps; and Origin's own methods (create() checks the
// config and loads --origin-ca-pool). One data stream's exchange is exchange.c++.

#include "origin/pool.h"
#include "origin/tls-roots.h"

#include "origin/hello-world.h"
#include "origin/in-process.h"
#include "origin/text.h"
#include "observe/log.h"

#include <kj/compat/tls.h>
#include <kj/debug.h>
#include <kj/io.h>

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

}  // namespace

// ---------------------------------------------------------------------------------------------
// Connection to the origin (Conn, see pool.h).

kj::Array<kj::byte> SpareBuffer::take(size_t size) {
  if (spare.size() == size) return kj::mv(spare);
  return kj::heapArray<kj::byte>(size);
}

void SpareBuffer::give(kj::Array<kj::byte> buffer) {
  if (buffer.size() == CONN_BUFFER_INITIAL && spare == nullptr) spare = kj::mv(buffer);
}

Conn::Conn(kj::Own<kj::AsyncIoStream> streamParam, kj::Maybe<SpareBuffer&> spare)
    : stream(kj::mv(streamParam)), spare(spare) {}

void Conn::shrink() {
  if (begin == end) {
    KJ_IF_MAYBE(s, spare) {
      s->give(kj::mv(buffer));
    }
    buffer = nullptr;
    begin = end = 0;
  }
}

kj::Promise<size_t> Conn::read(kj::ArrayPtr<kj::byte> out) {
  if (begin < end) {
    size_t n = kj::min(out.size(), end - begin);
    memcpy(out.begin(), buffer.begin() + begin, n);
    begin += n;
    return n;
  }
  return stream->tryRead(out.begin(), 1, out.size());
}

kj::Promise<kj::Maybe<kj::Array<char>>> Conn::readHead() {
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

kj::Promise<kj::String> Conn::readLine() {
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

kj::Promise<bool> Conn::fill(size_t limit) {
  if (end - begin >= limit) {
    return originException(kj::Exception::Type::FAILED,
                           "origin sent an over-long response head or chunk line");
  }
  if (begin > 0) {
    memmove(buffer.begin(), buffer.begin() + begin, end - begin);
    end -= begin;
    begin = 0;
  }
  if (buffer.size() == 0) {
    KJ_IF_MAYBE(s, spare) {
      buffer = s->take(CONN_BUFFER_INITIAL);
    } else {
      buffer = kj::heapArray<kj::byte>(CONN_BUFFER_INITIAL);
    }
  } else if (end == buffer.size()) {
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

namespace {

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

}  // namespace

// =============================================================================================
// Origin::Impl

Origin::Impl::Impl(const OriginConfig& config, kj::Timer& timer, kj::Network& network,
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
    case OriginKind::UNIX:
    case OriginKind::UNIX_TLS: {
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
    case OriginKind::HANDLER:
      break;
  }
}

Origin::Impl::~Impl() noexcept(false) {
  idle.clear();
}

kj::Promise<Acquired> Origin::Impl::acquire(bool fresh, kj::StringPtr tlsName) {
  sweep();
  // The newest idle connection made for the same TLS name ("" for every connection of an
  // origin whose name does not depend on the request).
  for (size_t i = idle.size(); !fresh && i > 0; i--) {
    if (idle[i - 1]->dead || idle[i - 1]->conn->tlsName != tlsName) continue;
    auto entry = kj::mv(idle[i - 1]);
    entry->watch = nullptr;  // cancels the close-watch read before the conn is used again
    if (i == idle.size()) {
      idle.removeLast();  // the usual case: one name, the newest connection
    } else {
      kj::Vector<kj::Own<IdleEntry>> kept(idle.size());
      for (auto& other: idle) {
        if (other.get() != nullptr) kept.add(kj::mv(other));
      }
      idle = kj::mv(kept);
    }
    ++stats.connectionsReused;
    entry->conn->receivedAny = false;
    return Acquired{kj::mv(entry->conn), true};
  }
  ++stats.connectionsOpened;
  auto& addr = *KJ_ASSERT_NONNULL(address);
  auto connecting = addr.connect();
  KJ_IF_MAYBE(t, tls) {
    auto name = kj::str(tlsName);
    if (name.size() == 0) {
      KJ_IF_MAYBE(n, config.originServerName) {
        name = kj::str(*n);
      } else {
        name = kj::str(config.host);
      }
    }
    connecting = connecting.then([this, t, name = kj::mv(name)](
        kj::Own<kj::AsyncIoStream> raw) mutable {
      return timer.timeoutAfter(config.tlsTimeout, (*t)->wrapClient(kj::mv(raw), name))
          .catch_([this](kj::Exception&& e) -> kj::Promise<kj::Own<kj::AsyncIoStream>> {
        return kj::Exception(e.getType(), __FILE__, __LINE__,
                             kj::str("tls handshake with ", config.toString(), ": ",
                                     describeCause(e)));
      });
    });
  }
  return connecting.then([this, name = kj::str(tlsName)](
      kj::Own<kj::AsyncIoStream> stream) mutable {
    auto conn = kj::heap<Conn>(kj::mv(stream), spareBuffer);
    conn->tlsName = kj::mv(name);
    return Acquired{kj::mv(conn), false};
  });
}

void Origin::Impl::release(kj::Own<Conn> conn) {
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
  e->watch = watchIdle(*e)
      .then([this, e]() { retire(*e); }, [this, e](kj::Exception&&) { retire(*e); })
      .eagerlyEvaluate(nullptr);
  idle.add(kj::mv(entry));
}

kj::Promise<void> Origin::Impl::watchIdle(IdleEntry& entry) {
  // Resolves when the idle connection should leave the pool: the keep-alive timeout, or the
  // origin closed it (seen once the connection was idle for CLOSE_WATCH_DELAY). The entry owns
  // this promise (`watch`), so `this` and `entry` outlive it.
  if (config.keepAliveTimeout <= CLOSE_WATCH_DELAY) return timer.afterDelay(config.keepAliveTimeout);
  return timer.afterDelay(CLOSE_WATCH_DELAY).then([this, &entry]() {
    auto closed = entry.conn->stream->tryRead(entry.probe, 1, 1).ignoreResult();
    return timer.afterDelay(config.keepAliveTimeout - CLOSE_WATCH_DELAY)
        .exclusiveJoin(kj::mv(closed));
  });
}

OriginStats Origin::Impl::getStats() const {
  auto copy = stats;
  uint64_t live = 0;
  for (auto& entry: idle) {
    if (!entry->dead) ++live;
  }
  copy.idleConnections = live;
  return copy;
}

void Origin::Impl::retire(IdleEntry& entry) {
  entry.dead = true;
  tasks.add(kj::evalLater([this]() { sweep(); }));
}

void Origin::Impl::sweep() {
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

void Origin::Impl::taskFailed(kj::Exception&& exception) {
  if (exception.getType() == kj::Exception::Type::DISCONNECTED) {
    observe::logDebug("Origin background task ended", observe::Fields().error(exception));
  } else {
    observe::logError("Origin background task failed", observe::Fields().error(exception));
  }
}

// =============================================================================================

Origin::Origin(OriginConfig configParam, kj::Own<Impl> implParam)
    : config(kj::mv(configParam)), impl(kj::mv(implParam)) {}

Origin::~Origin() noexcept(false) {}

kj::OneOf<kj::Own<Origin>, kj::String> Origin::create(OriginConfig config, kj::Timer& timer,
                                                      kj::Network& network,
                                                      const kj::HttpHeaderTable& headerTable) {
  if (config.kind == OriginKind::HANDLER && config.handler == nullptr) {
    return kj::str("an in-process origin needs a handler");
  }
  if (config.noTlsVerify) {
    return kj::str("--no-tls-verify is not supported yet: kj-tls cannot skip certificate "
                   "verification (use --origin-ca-pool to trust the origin's certificate)");
  }
  kj::Maybe<kj::Own<kj::TlsContext>> tls;
  if (config.kind == OriginKind::HTTPS || config.kind == OriginKind::UNIX_TLS) {
    kj::Array<kj::TlsCertificate> roots;
    KJ_IF_MAYBE(path, config.caPool) {
      auto loaded = loadPemCertificates(*path, "--origin-ca-pool");
      KJ_SWITCH_ONEOF(loaded) {
        KJ_CASE_ONEOF(error, kj::String) return kj::mv(error);
        KJ_CASE_ONEOF(certificates, kj::Array<kj::TlsCertificate>) roots = kj::mv(certificates);
      }
    }
    kj::TlsContext::Options options;
    options.useSystemTrustStore = true;
    options.trustedCertificates = roots;
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

kj::Promise<void> Origin::serve(kj::AsyncIoStream& stream,
                                kj::OneOf<wire::HttpRequestHead, kj::String> request,
                                ResponseSink& sink) {
  kj::String dest;
  KJ_IF_MAYBE(head, request.tryGet<wire::HttpRequestHead>()) dest = kj::str(head->dest);
  return impl->serve(stream, kj::mv(request), sink, kj::mv(dest));
}

kj::Promise<void> Origin::serveStream(kj::AsyncIoStream& stream,
                                      schema::ConnectRequest::Reader request) {
  return impl->serveStream(stream, request);
}

OriginStats Origin::getStats() const { return impl->getStats(); }

void Origin::setObserver(OriginObserver& observer) { impl->observer = observer; }

uint64_t Origin::bufferedBytes() const { return impl->stats.bufferedBytes; }

}  // namespace cfqt::origin
