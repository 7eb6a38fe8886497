#include "tunnel/supervisor.h"

#include <kj/debug.h>

namespace cfqt::tunnel {

kj::StringPtr KJ_STRINGIFY(EndKind kind) {
  switch (kind) {
    case EndKind::DIAL_FAILED: return "dial-failed";
    case EndKind::DUPLICATE: return "duplicate-connection";
    case EndKind::REJECTED: return "registration-rejected";
    case EndKind::REGISTRATION_FAILED: return "registration-failed";
    case EndKind::LOST: return "connection-lost";
    case EndKind::SHUTDOWN: return "shutdown";
    case EndKind::MOVED: return "moved";
  }
  return "unknown";
}

Supervisor::Supervisor(kj::Timer& timer, SessionFactory& factory, edge::AddressPool& pool,
                       const observe::Logger& logger, observe::TunnelStatus& status,
                       SupervisorConfig configParam, JitterSource& jitter)
    : timer(timer), factory(factory), pool(pool), logger(logger), status(status),
      config(configParam), drainSignal(nullptr), tasks(*this) {
  KJ_REQUIRE(config.haConnections >= 1);
  for (uint i = 0; i < config.haConnections; i++) {
    slots.add(kj::heap<Slot>(i, config.backoff, jitter));
  }
  auto drain = kj::newPromiseAndFulfiller<void>();
  drainSignal = drain.promise.fork();
  drainFulfiller = kj::mv(drain.fulfiller);
  auto stopped = kj::newPromiseAndFulfiller<void>();
  allStopped = kj::mv(stopped.fulfiller);
  allStoppedPromise = kj::mv(stopped.promise);
}

Supervisor::~Supervisor() noexcept(false) {}

kj::Promise<void> Supervisor::run() {
  startIndex(*slots[0], 0 * kj::SECONDS);
  KJ_IF_MAYBE(p, allStoppedPromise) {
    auto result = kj::mv(*p);
    allStoppedPromise = nullptr;
    return kj::mv(result);
  }
  KJ_FAIL_REQUIRE("Supervisor::run() called twice");
}

uint Supervisor::readyConnections() const {
  uint n = 0;
  for (auto& slot: slots) if (slot->ready) n++;
  return n;
}

uint Supervisor::attemptsOf(uint connIndex) const {
  return connIndex < slots.size() ? slots[connIndex]->attempts : 0;
}

void Supervisor::startIndex(Slot& slot, kj::Duration delay) {
  if (slot.started || shuttingDown) return;
  slot.started = true;
  startedIndices++;
  runIndex(slot, delay);
}

void Supervisor::runIndex(Slot& slot, kj::Duration delay) {
  // The index's whole reconnect loop is one task; a failure anywhere in it (a bug: sessions
  // report their ends as values) is logged and the loop starts again after a backoff, so an
  // index never dies silently and shutdown still finds every index accounted for.
  kj::Promise<void> loop = delay == 0 * kj::SECONDS
      ? attempt(slot)
      : timer.afterDelay(delay).exclusiveJoin(drainSignal.addBranch())
            .then([this, &slot]() { return attempt(slot); });
  tasks.add(loop.catch_([this, &slot](kj::Exception&& e) { indexFailed(slot, kj::mv(e)); }));
}

void Supervisor::indexFailed(Slot& slot, kj::Exception&& e) {
  notReady(slot.index);
  if (slot.session != nullptr) slot.retired = kj::mv(slot.session);
  slot.session = nullptr;
  if (shuttingDown) {
    logger.error("Connection supervisor failed during shutdown; connection stopped",
                 observe::Fields().add("connIndex", slot.index).error(e));
    indexStopped(slot, false);
    return;
  }
  auto delay = slot.backoff.next();
  logger.error("Connection supervisor failed unexpectedly; restarting the connection",
               observe::Fields().add("connIndex", slot.index).add("wait", formatDuration(delay))
                   .error(e));
  runIndex(slot, delay);
}

kj::Promise<void> Supervisor::attempt(Slot& slot) {
  if (shuttingDown) {
    indexStopped(slot, false);
    return kj::READY_NOW;
  }
  auto now = timer.now();
  KJ_IF_MAYBE(address, pool.addressFor(slot.index, now)) {
    slot.attempts++;
    slot.retired = nullptr;
    AttemptInfo info{slot.index, *address,
                     static_cast<uint8_t>(kj::min(slot.backoff.retries(), 255u))};
    auto session = factory.newSession(kj::mv(info), *this);
    auto promise = session->run().catch_([](kj::Exception&& e) {
      return SessionEnd{EndKind::LOST, kj::str(e.getDescription())};
    });
    slot.session = kj::mv(session);
    return promise.then([this, &slot](SessionEnd end) {
      return afterSession(slot, kj::mv(end));
    });
  } else {
    logger.error("No free edge address for connection; stopping it",
                 observe::Fields().add("connIndex", slot.index));
    indexStopped(slot, true);
    return kj::READY_NOW;
  }
}

kj::Promise<void> Supervisor::afterSession(Slot& slot, SessionEnd end) {
  notReady(slot.index);
  // Not destroyed here: the session's own promises may still be unwinding in this turn.
  slot.retired = kj::mv(slot.session);
  slot.session = nullptr;
  if (end.wasRegistered) slot.backoff.reset();

  if (end.kind == EndKind::SHUTDOWN || shuttingDown) {
    indexStopped(slot, false);
    return kj::READY_NOW;
  }

  auto ip = pool.currentAddress(slot.index)
      .map([](const edge::EdgeAddress& a) { return a.ipString(); })
      .orDefault(kj::str("?"));
  observe::Fields fields;
  fields.add("connIndex", slot.index).add("ip", ip).add("event", kj::str(end.kind))
      .add("reason", end.reason);

  if (end.kind == EndKind::MOVED) {
    logger.info("Connection unregistered to change transport; reconnecting", fields);
    return attempt(slot);
  }

  if (end.kind == EndKind::REJECTED && !end.shouldRetry) {
    logger.error("Register tunnel error from server side; the edge said not to retry, so "
                 "this connection stops", fields);
    pool.release(slot.index);
    indexStopped(slot, true);
    return kj::READY_NOW;
  }

  switch (end.kind) {
    case EndKind::DIAL_FAILED:
      logger.error("Failed to dial a quic connection", fields);
      break;
    case EndKind::DUPLICATE:
      logger.warn("Unable to establish connection: already connected to this server, "
                  "trying another address", fields);
      break;
    case EndKind::REJECTED:
      logger.error("Register tunnel error from server side", fields);
      break;
    case EndKind::REGISTRATION_FAILED:
      logger.error("Failed to register tunnel connection", fields);
      break;
    case EndKind::LOST: {
      bool others = readyConnections() > 0;
      logger.log(others ? observe::LogLevel::WARN : observe::LogLevel::ERROR,
                 "Connection terminated", fields);
      break;
    }
    case EndKind::SHUTDOWN:
    case EndKind::MOVED:
      break;
  }

  if (end.kind == EndKind::DIAL_FAILED || end.kind == EndKind::DUPLICATE) {
    KJ_IF_MAYBE(rotation, pool.rotate(slot.index, end.kind == EndKind::DIAL_FAILED,
                                      timer.now())) {
      if (rotation->changed) {
        logger.info("Switching to another edge address", observe::Fields()
            .add("connIndex", slot.index).add("ip", rotation->address.ipString()));
      }
    }
  }

  auto announced = slot.backoff.announced();
  auto delay = slot.backoff.next();
  logger.info(kj::str("Retrying connection in up to ", formatDuration(announced)),
              observe::Fields().add("connIndex", slot.index).add("reason", kj::str(end.kind))
                  .add("wait", formatDuration(delay)));
  return timer.afterDelay(delay).exclusiveJoin(drainSignal.addBranch())
      .then([this, &slot]() { return attempt(slot); });
}

void Supervisor::indexStopped(Slot& slot, bool failed) {
  if (slot.stopped) return;
  slot.stopped = true;
  stoppedIndices++;
  if (failed) failedIndices++;
  // Index 0 gave up before registering: the others never start.
  if (slot.index == 0 && !othersStarted) othersStarted = true;
  if (stoppedIndices == startedIndices && othersStarted) {
    allStopped->fulfill();
  } else if (stoppedIndices == startedIndices && shuttingDown) {
    allStopped->fulfill();
  }
}

void Supervisor::registered(uint connIndex, RegisteredInfo info) {
  KJ_REQUIRE(connIndex < slots.size());
  auto& slot = *slots[connIndex];
  slot.everRegistered = true;
  slot.backoff.reset();
  if (!slot.ready) {
    slot.ready = true;
    status.connectionReady();
  }
  status.registrationSucceeded();
  status.serverLocation(connIndex, info.location);
  status.connectionProtocol(connIndex, info.protocol);
  logger.info("Registered tunnel connection",
              observe::Fields().add("connIndex", connIndex).add("connection", info.connectionId)
                  .add("event", 0).add("ip", info.ip).add("location", info.location)
                  .add("protocol", info.protocol));
  KJ_IF_MAYBE(callback, registeredCallback) (*callback)(connIndex);
  if (connIndex == 0 && !othersStarted) {
    othersStarted = true;
    for (uint i = 1; i < slots.size(); i++) {
      startIndex(*slots[i], config.haStagger * i);
    }
  }
}

void Supervisor::notReady(uint connIndex) {
  if (connIndex >= slots.size()) return;
  auto& slot = *slots[connIndex];
  if (slot.ready) {
    slot.ready = false;
    status.connectionNotReady();
  }
}

kj::Promise<void> Supervisor::shutdown(kj::Duration grace) {
  if (!shuttingDown) {
    shuttingDown = true;
    drainFulfiller->fulfill();
    shutdownDone = shutdownAll(grace).fork();
  }
  return KJ_ASSERT_NONNULL(shutdownDone).addBranch();
}

kj::Promise<void> Supervisor::shutdownAll(kj::Duration grace) {
  kj::Vector<kj::Promise<void>> pending;
  for (auto& slot: slots) {
    if (!slot->started) continue;
    KJ_IF_MAYBE(session, slot->session) {
      notReady(slot->index);
      pending.add((*session)->shutdown(grace));
    }
  }
  // Indices that were waiting out a backoff stop when the drain signal fires (attempt() sees
  // shuttingDown); sessions resolve run() with SHUTDOWN.
  if (stoppedIndices == startedIndices) allStopped->fulfill();
  return kj::joinPromises(pending.releaseAsArray());
}

void Supervisor::taskFailed(kj::Exception&& exception) {
  // Index loops catch their own failures (runIndex); only a failure of that handler lands here.
  logger.error("Connection supervisor failed", observe::Fields().error(exception));
}

}  // namespace cfqt::tunnel
