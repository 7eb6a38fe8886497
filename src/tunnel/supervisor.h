#pragma once
// The HA supervisor (PROTOCOL.md §8): one reconnect loop per connection index. Index 0 dials
// first; the others start (staggered) once index 0 registered. Each attempt is a Session made by
// a SessionFactory (EdgeConnection in production, fakes in tests). After a session ends the
// supervisor logs why, rotates the address after dial failures and EDUPCONN, waits out the
// jittered backoff and tries again, forever, except after a registration error with
// shouldRetry=false, which stops that index. run() resolves when every index has stopped.

#include "tunnel/backoff.h"

#include "edge/address-pool.h"
#include "observe/log.h"
#include "observe/status.h"

#include <kj/async.h>
#include <kj/function.h>
#include <kj/timer.h>
#include <kj/vector.h>

namespace cfqt::tunnel {

struct AttemptInfo {
  uint connIndex;
  edge::EdgeAddress address;
  uint8_t numPreviousAttempts;   // retries consumed by this index's backoff (§4.2)
};

enum class EndKind {
  DIAL_FAILED,          // QUIC dial/handshake failed: rotate the address, back off
  DUPLICATE,            // registration answered EDUPCONN: rotate, back off
  REJECTED,             // registration answered ConnectionError (see shouldRetry)
  REGISTRATION_FAILED,  // RPC failure or timeout while registering: back off, same address
  LOST,                 // the QUIC connection ended (idle timeout, edge close, ...): back off
  SHUTDOWN,             // ended by shutdown(): no retry
  MOVED,                // left its fallback transport gracefully (auto): reconnect at once
};

kj::StringPtr KJ_STRINGIFY(EndKind kind);

struct SessionEnd {
  EndKind kind;
  kj::String reason;        // human text for the log (never contains the secret)
  bool shouldRetry = true;  // REJECTED only
  bool wasRegistered = false;
};

struct RegisteredInfo {
  kj::StringPtr connectionId;   // the edge's connection UUID (text)
  kj::StringPtr location;       // colo
  kj::StringPtr ip;             // edge IP
  kj::StringPtr protocol = "quic";  // the transport: "quic" or "http2"
};

class SessionEvents {
  // How a Session reports its state (on the loop thread).
public:
  virtual void registered(uint connIndex, RegisteredInfo info) = 0;
  virtual void notReady(uint connIndex) = 0;
  // The connection stopped counting as ready (unregistering or lost). Idempotent.
};

class Session {
  // One connection attempt and, if it registers, its whole life.
public:
  virtual ~Session() noexcept(false) = default;

  virtual kj::Promise<SessionEnd> run() = 0;
  // Called once. Resolves (never rejects) when the attempt or connection is over.

  virtual kj::Promise<void> shutdown(kj::Duration grace) = 0;
  // Graceful stop: unregister, let in-flight streams finish up to `grace`, close with
  // application error 0. run() then resolves with SHUTDOWN. The Session outlives the promise.
};

class SessionFactory {
public:
  virtual kj::Own<Session> newSession(AttemptInfo info, SessionEvents& events) = 0;
  // `events` outlives the session.
};

struct SupervisorConfig {
  uint haConnections = 2;                    // already limited to the pool's capacity
  BackoffConfig backoff;
  kj::Duration haStagger = 1 * kj::SECONDS;  // between starting indices 1..N-1
};

class Supervisor final: private SessionEvents, private kj::TaskSet::ErrorHandler {
public:
  Supervisor(kj::Timer& timer, SessionFactory& factory, edge::AddressPool& pool,
             const observe::Logger& logger, observe::TunnelStatus& status,
             SupervisorConfig config, JitterSource& jitter);
  // Borrows everything; all must outlive this object.
  KJ_DISALLOW_COPY(Supervisor);
  ~Supervisor() noexcept(false);

  kj::Promise<void> run();
  // Starts index 0 and resolves once every index has stopped: after shutdown(), or when each
  // index got a registration error with shouldRetry=false (allFailed() tells which). Call once.

  kj::Promise<void> shutdown(kj::Duration grace);
  // Stops reconnecting, shuts every live session down gracefully (in parallel), and resolves when
  // they all ended. Idempotent.

  void onRegistered(kj::Function<void(uint connIndex)> callback) {
    registeredCallback = kj::mv(callback);
  }
  // Called after every successful registration (after the log line).

  bool allFailed() const { return failedIndices > 0 && failedIndices == startedIndices &&
                                  !shuttingDown; }
  uint readyConnections() const;
  uint attemptsOf(uint connIndex) const;

private:
  struct Slot {
    uint index;
    Backoff backoff;
    kj::Maybe<kj::Own<Session>> session;
    kj::Maybe<kj::Own<Session>> retired;   // the last ended session, dropped at the next attempt
    bool started = false;
    bool stopped = false;
    bool ready = false;
    bool everRegistered = false;
    uint attempts = 0;
    Slot(uint index, BackoffConfig config, JitterSource& jitter)
        : index(index), backoff(config, jitter) {}
  };

  kj::Timer& timer;
  SessionFactory& factory;
  edge::AddressPool& pool;
  const observe::Logger& logger;
  observe::TunnelStatus& status;
  SupervisorConfig config;
  kj::Vector<kj::Own<Slot>> slots;
  bool shuttingDown = false;
  bool othersStarted = false;
  uint startedIndices = 0;
  uint stoppedIndices = 0;
  uint failedIndices = 0;
  kj::Own<kj::PromiseFulfiller<void>> allStopped;
  kj::Maybe<kj::Promise<void>> allStoppedPromise;
  kj::ForkedPromise<void> drainSignal;
  kj::Own<kj::PromiseFulfiller<void>> drainFulfiller;
  kj::Maybe<kj::ForkedPromise<void>> shutdownDone;
  kj::Maybe<kj::Function<void(uint)>> registeredCallback;
  kj::TaskSet tasks;   // last: index loops die first

  void startIndex(Slot& slot, kj::Duration delay);
  void runIndex(Slot& slot, kj::Duration delay);
  void indexFailed(Slot& slot, kj::Exception&& e);
  kj::Promise<void> attempt(Slot& slot);
  kj::Promise<void> afterSession(Slot& slot, SessionEnd end);
  void indexStopped(Slot& slot, bool failed);
  kj::Promise<void> shutdownAll(kj::Duration grace);

  // SessionEvents
  void registered(uint connIndex, RegisteredInfo info) override;
  void notReady(uint connIndex) override;

  // kj::TaskSet::ErrorHandler
  void taskFailed(kj::Exception&& exception) override;
};

}  // namespace cfqt::tunnel
