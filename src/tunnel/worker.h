#pragma once
// Connection workers (issue 15, "every core"): one thread with its own event loop per HA
// connection index. Each worker owns, shared-nothing, everything of its index's connections: the
// transport (QUIC or HTTP/2), the control RPC, every data stream, its own origin::Origin (pool,
// hello-world server, TLS context) built from the tunnel's OriginConfig, and its own EdgeDialer
// (what `auto` learns is shared through DialerShared). The supervisor, the metrics server, the
// quick-tunnel API, discovery and readiness stay on the thread that created the pool.
//
// WorkerPool is the supervisor's SessionFactory: the Session it returns is a proxy on the
// supervisor's loop whose run() and shutdown() run the real EdgeConnection on the worker through
// its kj::Executor; the connection's SessionEvents come back through a std::mutex-guarded queue
// that wakes the supervisor's loop through a Notifier. Statistics go to the index's
// TunnelStatus shard (this worker is its only writer).

#include "tunnel/edge-connection.h"
#include "tunnel/edge-dialer.h"
#include "tunnel/notifier.h"
#include "tunnel/supervisor.h"

#include "named/ingress.h"
#include "observe/log.h"
#include "observe/status.h"
#include "origin/origin.h"
#include "wire/control.h"

#include <kj/async.h>
#include <kj/compat/http.h>

#include <mutex>

namespace cfqt::tunnel {

class IngressSource {
  // Named tunnels across workers: where each worker's named::Router gets its rules, the local
  // configuration's until the edge pushed a remote one. Thread-safe (a std::mutex); workers are
  // woken through a Notifier when a new configuration is published.
public:
  IngressSource(origin::OriginConfig& base, kj::StringPtr service,
                kj::Maybe<const named::TunnelConfig&> local)
      : base(base), service(service), local(local) {}
  // Borrows everything (read-only).
  KJ_DISALLOW_COPY(IngressSource);

  kj::OneOf<kj::Own<named::Ingress>, kj::String> build(uint64_t& generation) const;
  // The current rules, built for the calling thread's router, and their generation.

  kj::Maybe<kj::String> publish(int32_t version, kj::ArrayPtr<const kj::byte> json);
  // A remote configuration: checked (parsed, rules validated: the error is returned and nothing
  // changes), then every worker rebuilds its router from it.

  kj::Promise<void> whenChanged(uint64_t seen) const;
  // Resolves once the generation is no longer `seen`. On the caller's loop.

private:
  origin::OriginConfig& base;
  kj::StringPtr service;
  kj::Maybe<const named::TunnelConfig&> local;
  mutable std::mutex mutex;                 // guards `remote`, and pairs it with the generation
  kj::Maybe<kj::String> remote;             // the last remote configuration's JSON
  Notifier published;                       // its generation is the configuration's
};

class IdentityGate {
  // A quick tunnel's credentials arrive while its connections dial (the API request overlaps the
  // dial and handshake): a worker's registerConnection waits for open(), which the supervisor's
  // loop calls once EdgeIdentity is complete. Thread-safe (a Notifier, which also orders the
  // identity's fields before the workers read them).
public:
  void open() const { opened.notify(); }
  kj::Promise<void> whenOpen() const { return opened.whenChangedFrom(0); }
  // Resolves once open() was called. On the caller's loop.

private:
  Notifier opened;
};

struct WorkerSetup {
  // What every worker builds its connection stack from. Borrowed: read-only (or thread-safe) and
  // alive until the pool is destroyed.
  origin::OriginConfig& origin;           // read only: cloned per worker (non-const for its handler)
  const kj::HttpHeaderTable& headerTable; // built: read-only
  const observe::Logger& logger;          // thread-safe
  observe::TunnelStatus& status;          // the worker writes its index's shard only
  wire::RemoteConfigState& remoteConfig;  // thread-safe
  const EdgeIdentity& identity;
  const EdgeConnectionConfig& edge;
  const DialerConfig& dialer;
  DialerShared& dialerShared;             // thread-safe
  kj::Maybe<IngressSource&> named = nullptr;   // named tunnels: requests through ingress rules
  kj::Maybe<IdentityGate&> identityGate = nullptr;   // quick tunnels whose API request is out
  kj::Duration busyPoll = 0 * kj::NANOSECONDS;   // each worker's loop::Spinner window (0: off)
};

class WorkerPool final: public SessionFactory {
public:
  static kj::Promise<kj::Own<WorkerPool>> start(uint workers, WorkerSetup setup);
  // Starts one worker per connection index 0..workers-1 (<= TunnelStatus::MAX_SHARDS) and
  // resolves once each built its origin and dialer, or rejects with the first one's failure
  // (the others are stopped). Call on the supervisor's loop.

  ~WorkerPool() noexcept(false);
  // Stops every worker (whatever still runs there is cancelled) and joins its thread. Destroy the
  // supervisor first: events still queued for it are dropped.

  kj::Own<Session> newSession(AttemptInfo info, SessionEvents& events) override;
  // The session runs on the worker of info.connIndex.

  class Worker;
  struct Event;
  class EventQueue;

  WorkerPool(WorkerSetup setup, uint workers);   // use start()

private:
  WorkerSetup setup;
  kj::Own<EventQueue> events;
  kj::Maybe<kj::Promise<void>> dispatchTask;
  kj::Array<kj::Own<Worker>> workers;   // last: stopped and joined first
  uint64_t nextSession = 0;

  kj::Promise<void> dispatchLoop();
  void dispatchNow();
};

void capMallocArenas(uint threads);
// glibc makes an arena per thread that allocates (up to 8 per core), each keeping its own free
// memory: with worker threads, idle RSS would grow with them. Caps the arenas at `threads` + 1
// (M_ARENA_MAX). A process-wide setting: call once, before the threads start (the CLI does; the
// library leaves its host's malloc alone).

}  // namespace cfqt::tunnel
