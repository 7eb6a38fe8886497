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

class SpareBuffer {
  // One read-ahead buffer of the initial size kept per origin (that is, per event loop) while no
  // connection needs it: serial exchanges take it and give it back instead of allocating 4 KiB
  // per request. Bounded: one buffer; larger (grown) buffers are freed, not kept.
public:
  kj::Array<kj::byte> take(size_t size);
  void give(kj::Array<kj::byte> buffer);

private:
  kj::Array<kj::byte> spare;
};

class Conn {
public:
  Conn(kj::Own<kj::AsyncIoStream> streamParam, kj::Maybe<SpareBuffer&> spare = nullptr);
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
  // next head or chunk line, or taken from the SpareBuffer it goes back to): a body read straight
  // into the exchange's pump buffer and a pooled connection need none.

  kj::ArrayPtr<const kj::byte> unread() const { return buffer.slice(begin, end); }
  void consume(size_t n) { begin += kj::min(n, end - begin); }
  // The read-ahead's unread bytes, and dropping the first `n` of them once used (the response
  // body bytes that came with the head are written to the edge from here, not copied).

  kj::Promise<size_t> read(kj::ArrayPtr<kj::byte> out);
  // Up to out.size() bytes (at least 1 unless EOF, then 0), leftover first.

  kj::Promise<kj::Maybe<kj::Array<char>>> readHead();
  // The next message head: text up to and including the first newline of the blank line, as
  // tryParseResponse() wants it. nullptr on EOF before any byte (the origin closed an idle
  // connection). Leading blank lines are skipped.

  kj::Promise<kj::String> readLine();

private:
  kj::Maybe<SpareBuffer&> spare;  // the origin's (outlives every Conn it made)

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
  static constexpr kj::Duration CLOSE_WATCH_DELAY = 1 * kj::MILLISECONDS;
  // An idle connection's close-watch (a 1-byte read that resolves when the origin closes it)
  // starts only after it was idle this long: serial requests reuse the connection within
  // microseconds, and each would otherwise pay a read() returning EAGAIN and its promises
  // (issue 15, serial latency). A close within that window is met by the reuse retry.
  kj::Promise<void> watchIdle(IdleEntry& entry);

  kj::Maybe<kj::Own<kj::TlsContext>> tls;
  kj::Maybe<kj::Own<kj::HttpService>> helloService;
  kj::Maybe<kj::Own<kj::HttpServer>> helloServer;
  kj::Maybe<kj::Own<kj::NetworkAddress>> address;
  SpareBuffer spareBuffer;  // Conns use it in fill() and shrink() only, never when destroyed
  kj::Vector<kj::Own<IdleEntry>> idle;
  kj::TaskSet tasks;  // last: hello-world connections, pool sweeps

  void retire(IdleEntry& entry);
  // The origin closed an idle connection (or sent junk), or it idled out. Can't destroy the
  // entry here: we're inside its own `watch` promise. Sweep on a later turn.

  void sweep();

  void taskFailed(kj::Exception&& exception) override;
};

}  // namespace cfqt::origin
