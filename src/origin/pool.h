// The origin connection pool: a connection to the origin with its read-ahead buffer (Conn) and
// Origin::Impl, which dials, pools idle keep-alive connections and keeps the stats. pool.c++
// implements them with Origin's own methods; exchange.c++ serves one data stream over them
// (Origin::Impl::serveStream()). Private to src/origin.
//
// The HTTP/1.1 client here is our own rather than kj::HttpClient, because kj-http 0.9.2's client
// takes an interim 100 response for the final one, cannot cap the idle pool, and its WebSocket
// support re-frames messages.

#pragma once

#include "origin/origin.h"

#include <kj/async-io.h>
#include <kj/compat/http.h>
#include <kj/vector.h>

namespace kj {
class TlsContext;
}

namespace cfqt::origin {

// ---------------------------------------------------------------------------------------------
// Connection to the origin: the stream plus a read-ahead buffer, so that a response head can be
// read and the bytes after it kept.

class Conn {
public:
  explicit Conn(kj::Own<kj::AsyncIoStream> streamParam);
  KJ_DISALLOW_COPY(Conn);

  kj::Own<kj::AsyncIoStream> stream;
  kj::Array<kj::byte> buffer;
  size_t begin = 0;
  size_t end = 0;
  bool receivedAny = false;  // any byte received for the current exchange
  kj::String tlsName;        // acquire()'s `tlsName`: reused only for the same one

  size_t leftover() const { return end - begin; }

  void shrink();
  // Frees the read-ahead buffer if it holds no unread byte (it is allocated again, 4 KiB, by the
  // next head or chunk line): a body read straight into the exchange's pump buffer and a pooled
  // connection need none.

  kj::Promise<size_t> read(kj::ArrayPtr<kj::byte> out);
  // Up to out.size() bytes (at least 1 unless EOF, then 0), leftover first.

  kj::Promise<kj::Maybe<kj::Array<char>>> readHead();
  // The next message head: text up to and including the first newline of the blank line, as
  // tryParseResponse() wants it. nullptr on EOF before any byte (the origin closed an idle
  // connection). Leading blank lines are skipped.

  kj::Promise<kj::String> readLine();

private:
  kj::Promise<bool> fill(size_t limit);
  // Reads more bytes after the unread ones; false on EOF. Fails once `limit` unread bytes
  // hold no complete line/head.
};

struct Acquired {
  kj::Own<Conn> conn;
  bool reused;
};

// =============================================================================================

class Origin::Impl final: private kj::TaskSet::ErrorHandler {
public:
  Impl(const OriginConfig& config, kj::Timer& timer, kj::Network& network,
       const kj::HttpHeaderTable& table, kj::Maybe<kj::Own<kj::TlsContext>> tls);
  ~Impl() noexcept(false);

  kj::Promise<void> serve(kj::AsyncIoStream& stream,
                          kj::OneOf<wire::HttpRequestHead, kj::String> request, ResponseSink& sink,
                          kj::String dest);
  // Origin::serve(); `dest` is the request's destination for the logs.
  kj::Promise<void> serveStream(kj::AsyncIoStream& stream,
                                wire::schema::ConnectRequest::Reader request);
  // Origin::serveStream(): one Exchange per data stream (exchange.c++).

  kj::Promise<Acquired> acquire(bool fresh, kj::StringPtr tlsName);
  // An idle connection made for `tlsName`, unless `fresh`, else a new one. `tlsName` is the TLS
  // server name when it depends on the request (UNIX_TLS without originServerName), else "":
  // the origin's own (originServerName, else the host).

  void release(kj::Own<Conn> conn);
  // Returns a connection whose exchange completed cleanly to the idle pool.

  void gaugeAdd(uint64_t n) {
    stats.bufferedBytes += n;
    stats.maxBufferedBytes = kj::max(stats.maxBufferedBytes, stats.bufferedBytes);
  }
  void gaugeSub(uint64_t n) { stats.bufferedBytes -= n; }

  OriginStats getStats() const;

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

  void retire(IdleEntry& entry);
  // The origin closed an idle connection (or sent junk), or it idled out. Can't destroy the
  // entry here: we're inside its own `watch` promise. Sweep on a later turn.

  void sweep();

  void taskFailed(kj::Exception&& exception) override;
};

}  // namespace cfqt::origin
