// Streams: ConnectionImpl's stream helpers (credit, shutdown, failures, detecting a peer's
// STOP_SENDING) and StreamHandle, the application's quic::Stream (reads, writes, pumps).

#include "quic/internal.h"

#include <ngtcp2/ngtcp2.h>

#include <kj/debug.h>

#include <string.h>

namespace cfqt::quic::_ {

// ---- stream helpers

void ConnectionImpl::credit(StreamState& state, uint64_t streamBytes, uint64_t connBytes) {
  if (streamBytes == 0 && connBytes == 0) return;
  if (state.creditWithheld) {
    state.creditOwed += streamBytes;
    state.connCreditOwed += connBytes;
    return;
  }
  if (conn == nullptr || closeInfo != nullptr) return;
  if (!state.closedByNgtcp2 && streamBytes > 0) {
    ngtcp2_conn_extend_max_stream_offset(conn, state.id, streamBytes);
  }
  if (connBytes > 0) ngtcp2_conn_extend_max_offset(conn, connBytes);
}

void ConnectionImpl::consumed(StreamState& state, uint64_t n) {
  // `n` buffered bytes were read by the application: stream credit for all of them, connection
  // credit for those not prepaid at receipt.
  uint64_t prepaid = kj::min(n, state.rxPrepaid);
  state.rxPrepaid -= prepaid;
  credit(state, n, n - prepaid);
}

void ConnectionImpl::releaseCredit(StreamState& state) {
  uint64_t owed = state.creditOwed;
  uint64_t connOwed = state.connCreditOwed;
  state.creditOwed = 0;
  state.connCreditOwed = 0;
  if (owed == 0 && connOwed == 0) return;
  credit(state, owed, connOwed);
  scheduleAckFlush();   // window updates: they may wait for data, like ACKs (deferFlush())
}

uint64_t ConnectionImpl::discardUnread(StreamState& state) {
  // Drops the stream's buffered bytes (nobody will read them). Returns the connection credit
  // they still hold (what was not prepaid at receipt, plus what was withheld).
  uint64_t unpaid = state.rxBuffered - state.rxPrepaid + state.connCreditOwed;
  recvBuffered -= state.rxBuffered;
  state.rxBuffered = 0;
  state.rxPrepaid = 0;
  state.creditOwed = 0;
  state.connCreditOwed = 0;
  state.rx.clear();
  return unpaid;
}

void ConnectionImpl::shutdownRead(StreamState& state, uint64_t code) {
  if (state.readShut) return;
  state.readShut = true;
  // Unread bytes count against the connection window: give them back.
  uint64_t unread = discardUnread(state);
  if (conn != nullptr && closeInfo == nullptr) {
    if (unread > 0) ngtcp2_conn_extend_max_offset(conn, unread);
    if (!state.closedByNgtcp2 && !state.rxFin) {
      ngtcp2_conn_shutdown_stream_read(conn, state.id, code);
      scheduleFlush();      // STOP_SENDING goes out now
    } else if (unread > 0) {
      scheduleAckFlush();   // only credit
    }
  }
}

void ConnectionImpl::shutdownWrite(StreamState& state, uint64_t code) {
  if (conn != nullptr && closeInfo == nullptr && !state.closedByNgtcp2) {
    ngtcp2_conn_shutdown_stream_write(conn, state.id, code);
    scheduleFlush();
  }
}

void ConnectionImpl::failRead(StreamState& state, kj::Exception e) {
  if (state.rxError == nullptr) state.rxError = kj::heap(kj::cp(e));
  KJ_IF_MAYBE(r, state.pendingRead) {
    if (state.readReady) {
      // The read was completed earlier in this receive batch (data or FIN before the reset or
      // close): it returns those bytes, and the next read reports the failure.
      r->fulfiller->fulfill(kj::cp(r->filled));
    } else {
      r->fulfiller->reject(kj::mv(e));
    }
    state.pendingRead = nullptr;
  }
}

void ConnectionImpl::failWrite(StreamState& state, kj::Exception e) {
  state.signalAborted();
  if (state.txError == nullptr) state.txError = kj::heap(kj::cp(e));
  KJ_IF_MAYBE(f, state.writeDisconnectedFulfiller) {
    (*f)->fulfill();
    state.writeDisconnectedFulfiller = nullptr;
  }
  KJ_IF_MAYBE(w, state.pendingWrite) {
    w->fulfiller->reject(kj::mv(e));
    state.pendingWrite = nullptr;
  }
}

void ConnectionImpl::peerStoppedReading(StreamState& state) {
  if (state.txError == nullptr) {
    failWrite(state, disconnected(kj::str("QUIC stream ", state.id,
        ": the peer stopped reading (STOP_SENDING) or the stream was reset")));
  }
}

void ConnectionImpl::watchWrites(StreamState& state) {
  if (state.writeWatched || state.closedByNgtcp2 || state.txError != nullptr) return;
  state.writeWatched = true;
  writeWatch.add(kj::addRef(state));
}

void ConnectionImpl::probeWrites(uint64_t ts) {
  // ngtcp2 0.12 has no callback for a received STOP_SENDING: it marks the stream's write side
  // shut, sends RESET_STREAM and from then on never acknowledges nor credits the stream's data.
  // A writer waiting for send-buffer space or flow-control credit (or a whenWriteDisconnected()
  // waiter) would wait forever, so after receiving packets we ask ngtcp2 about the streams that
  // have one. writev_stream checks the stream's state before anything else and, given a vector
  // longer than any stream may be, returns INVALID_ARGUMENT without side effects when the write
  // side is still open (ngtcp2 0.12.1 ngtcp2_conn_writev_stream_versioned).
  size_t kept = 0;
  for (size_t i = 0; i < writeWatch.size(); i++) {
    auto& state = *writeWatch[i];
    bool waiting = state.pendingWrite != nullptr || state.writeDisconnectedFulfiller != nullptr;
    if (waiting && !state.closedByNgtcp2 && state.txError == nullptr) {
      kj::byte dummy = 0;
      ngtcp2_vec tooLong = {&dummy, NGTCP2_MAX_VARINT + 1};
      ngtcp2_ssize datalen;
      ngtcp2_ssize rv = ngtcp2_conn_writev_stream(conn, nullptr, nullptr, &dummy, 0, &datalen,
          NGTCP2_WRITE_STREAM_FLAG_NONE, state.id, &tooLong, 1, ts);
      if (rv == NGTCP2_ERR_STREAM_SHUT_WR || rv == NGTCP2_ERR_STREAM_NOT_FOUND) {
        peerStoppedReading(state);
      }
    }
    if (state.pendingWrite != nullptr || state.writeDisconnectedFulfiller != nullptr) {
      if (state.txError == nullptr && !state.closedByNgtcp2) {
        if (kept != i) writeWatch[kept] = kj::mv(writeWatch[i]);
        ++kept;
        continue;
      }
    }
    state.writeWatched = false;
  }
  writeWatch.resize(kept);
}

// =======================================================================================
// StreamHandle implementation

StreamHandle::~StreamHandle() noexcept(false) {
  auto& s = *state;
  s.handleAlive = false;
  if (s.conn != nullptr) conn->releasePromise(s);
  KJ_IF_MAYBE(r, s.pendingRead) {
    r->fulfiller->reject(disconnected(kj::str("QUIC stream dropped")));
    s.pendingRead = nullptr;
  }
  KJ_IF_MAYBE(w, s.pendingWrite) {
    w->fulfiller->reject(disconnected(kj::str("QUIC stream dropped")));
    s.pendingWrite = nullptr;
  }
  if (s.conn == nullptr) return;
  if (!s.finRequested && s.txError == nullptr) {
    s.txError = kj::heap(disconnected(kj::str("QUIC stream dropped")));
    conn->shutdownWrite(s, 0);
  } else if (s.finRequested && !s.finSent) {
    conn->queueSend(s);   // the FIN still goes out (e.g. after a pending write was rejected)
  }
  if (s.creditOwed > 0 || s.connCreditOwed > 0) {
    s.creditWithheld = false;
  }
  if (!(s.rxFin && s.rxBuffered == 0)) {
    conn->shutdownRead(s, 0);
  } else {
    conn->releaseCredit(s);
  }
}

void StreamHandle::reset(uint64_t code) {
  auto& s = *state;
  if (s.txError == nullptr) {
    conn->failWrite(s, disconnected(kj::str("QUIC stream ", s.id, " reset locally (code ", code,
                                            ")")));
  }
  conn->shutdownWrite(s, code);
}

void StreamHandle::stopSending(uint64_t code) {
  auto& s = *state;
  conn->failRead(s, disconnected(kj::str("QUIC stream ", s.id, ": reading was stopped locally")));
  conn->shutdownRead(s, code);
}

void StreamHandle::setCreditWithheld(bool withheld) {
  state->creditWithheld = withheld;
  if (!withheld) conn->releaseCredit(*state);
}

kj::Promise<size_t> StreamHandle::tryRead(void* buffer, size_t minBytes, size_t maxBytes) {
  auto& s = *state;
  KJ_IF_MAYBE(e, s.rxError) return kj::cp(**e);
  KJ_REQUIRE(s.pendingRead == nullptr, "one read at a time");
  auto out = static_cast<kj::byte*>(buffer);
  size_t n = 0;
  while (n < maxBytes && !s.rx.empty()) {
    auto& front = s.rx.front();
    size_t k = kj::min(maxBytes - n, front.end - front.begin);
    memcpy(out + n, front.data.begin() + front.begin, k);
    front.begin += k;
    n += k;
    if (front.begin == front.end && (front.end == front.data.size() || s.rx.size() > 1)) {
      s.rx.pop_front();
    } else if (front.begin == front.end) {
      front.begin = front.end = 0;   // reuse the last block
      break;
    }
  }
  s.rxBuffered -= n;
  conn->recvBuffered -= n;
  if (n > 0) {
    conn->consumed(s, n);
    conn->scheduleAckFlush();
  }
  if (n >= minBytes || (s.rxFin && s.rxBuffered == 0)) return n;
  if (!conn->isOpen()) return conn->closeException();
  auto paf = kj::newPromiseAndFulfiller<size_t>();
  s.pendingRead = StreamState::PendingRead{out, minBytes, maxBytes, n, kj::mv(paf.fulfiller)};
  return kj::mv(paf.promise);
}

kj::Promise<void> StreamHandle::write(const void* buffer, size_t size) {
  StreamState::PendingWrite pending;
  pending.single = kj::arrayPtr(static_cast<const kj::byte*>(buffer), size);
  return startWrite(kj::mv(pending));
}

kj::Promise<void> StreamHandle::write(kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces) {
  StreamState::PendingWrite pending;
  pending.pieces = pieces;
  return startWrite(kj::mv(pending));
}

kj::Promise<void> StreamHandle::startWrite(StreamState::PendingWrite pending) {
  auto& s = *state;
  KJ_IF_MAYBE(e, s.txError) return kj::cp(**e);
  if (!conn->isOpen()) return conn->closeException();
  KJ_REQUIRE(!s.finRequested, "write() after shutdownWrite()");
  KJ_REQUIRE(s.pendingWrite == nullptr, "one write at a time");
  uint64_t promised = s.promised;
  if (promised > 0) {
    // The room writableBytes() reserved: taken whatever the budget says now.
    s.promised = 0;
    conn->subSendBuffered(promised);
  }
  if (pending.pieces.size() == 0) {
    // Fast path: everything fits in the send buffer (or in what writableBytes() reserved).
    uint64_t before = s.txBuffered();
    size_t n = s.appendTx(pending.single, kj::max(conn->sendSpace(s), promised));
    conn->addSendBuffered(s.txBuffered() - before);
    conn->queueSend(s);
    if (n == pending.single.size()) return kj::READY_NOW;
    pending.single = pending.single.slice(n, pending.single.size());
  }
  auto paf = kj::newPromiseAndFulfiller<void>();
  pending.fulfiller = kj::mv(paf.fulfiller);
  s.pendingWrite = kj::mv(pending);
  conn->pumpPendingWrite(s);
  if (s.pendingWrite != nullptr) conn->watchWrites(s);
  return kj::mv(paf.promise);
}

size_t StreamHandle::writableBytes(size_t wanted) {
  auto& s = *state;
  // A write that would fail at once is not held back: the writer learns the failure from it.
  if (s.txError != nullptr || s.conn == nullptr || !conn->isOpen() || s.finRequested) {
    return kj::maxValue;
  }
  conn->releasePromise(s);
  uint64_t space = conn->sendSpace(s);
  if (space < kj::min(uint64_t(wanted), conn->writeThreshold())) return 0;
  size_t n = kj::min(space, uint64_t(wanted));
  // Counted in the budget now, so that streams asking one after another do not all get the
  // same room; the write converts it to buffered bytes.
  s.promised = n;
  conn->addSendBuffered(n);
  return n;
}

kj::Promise<void> StreamHandle::whenWritable() {
  auto& s = *state;
  if (s.txError != nullptr || s.conn == nullptr || !conn->isOpen()) return kj::READY_NOW;
  KJ_REQUIRE(s.pendingWrite == nullptr, "whenWritable() while a write is pending");
  if (conn->sendSpace(s) >= conn->writeThreshold()) return kj::READY_NOW;
  auto paf = kj::newPromiseAndFulfiller<void>();
  StreamState::PendingWrite pending;
  pending.spaceOnly = true;
  pending.fulfiller = kj::mv(paf.fulfiller);
  s.pendingWrite = kj::mv(pending);
  conn->pumpPendingWrite(s);   // joins the budget's waiters if that is what it waits for
  if (s.pendingWrite != nullptr) conn->watchWrites(s);
  // A failure rejects it like a write; the caller's next write reports the failure instead.
  return paf.promise.catch_([](kj::Exception&&) {});
}

kj::Promise<void> StreamHandle::whenWriteDisconnected() {
  auto& s = *state;
  if (s.txError != nullptr) return kj::READY_NOW;
  KJ_IF_MAYBE(forked, s.writeDisconnected) return forked->addBranch();
  auto paf = kj::newPromiseAndFulfiller<void>();
  s.writeDisconnectedFulfiller = kj::mv(paf.fulfiller);
  if (s.conn != nullptr) conn->watchWrites(s);
  auto& forked = s.writeDisconnected.emplace(paf.promise.fork());
  return forked.addBranch();
}

kj::Promise<void> StreamHandle::whenAborted() {
  auto& s = *state;
  if (s.aborted) return kj::READY_NOW;
  KJ_IF_MAYBE(forked, s.abortedPromise) return forked->addBranch();
  auto paf = kj::newPromiseAndFulfiller<void>();
  s.abortedFulfiller = kj::mv(paf.fulfiller);
  auto& forked = s.abortedPromise.emplace(paf.promise.fork());
  return forked.addBranch();
}

void StreamHandle::shutdownWrite() {
  auto& s = *state;
  if (s.finRequested || s.txError != nullptr) return;
  s.finRequested = true;
  if (s.conn != nullptr) conn->releasePromise(s);
  if (s.conn != nullptr) conn->queueSend(s);
}

kj::Promise<uint64_t> StreamHandle::pumpTo(kj::AsyncOutputStream& output, uint64_t amount) {
  return pumpToLoop(output, amount, 0, kj::heapArray<kj::byte>(256 * 1024));
}

kj::Promise<uint64_t> StreamHandle::pumpToLoop(kj::AsyncOutputStream& output, uint64_t amount,
                                               uint64_t done, kj::Array<kj::byte> buffer) {
  if (done >= amount) return done;
  size_t want = kj::min(uint64_t(buffer.size()), amount - done);
  auto read = tryRead(buffer.begin(), 1, want);
  return read.then([this, &output, amount, done, buffer = kj::mv(buffer)](size_t n) mutable
                   -> kj::Promise<uint64_t> {
    if (n == 0) return done;
    auto write = output.write(buffer.begin(), n);
    return write.then([this, &output, amount, done = done + n, buffer = kj::mv(buffer)]() mutable {
      return pumpToLoop(output, amount, done, kj::mv(buffer));
    });
  });
}

kj::Maybe<kj::Promise<uint64_t>> StreamHandle::tryPumpFrom(kj::AsyncInputStream& input,
                                                           uint64_t amount) {
  return pumpFromLoop(input, amount, 0, kj::heapArray<kj::byte>(256 * 1024));
}

kj::Promise<uint64_t> StreamHandle::pumpFromLoop(kj::AsyncInputStream& input, uint64_t amount,
                                                 uint64_t done, kj::Array<kj::byte> buffer) {
  if (done >= amount) return done;
  size_t want = kj::min(uint64_t(buffer.size()), amount - done);
  auto read = input.tryRead(buffer.begin(), 1, want);
  return read.then([this, &input, amount, done, buffer = kj::mv(buffer)](size_t n) mutable
                   -> kj::Promise<uint64_t> {
    if (n == 0) return done;
    auto written = write(buffer.begin(), n);
    return written.then([this, &input, amount, done = done + n, buffer = kj::mv(buffer)]() mutable {
      return pumpFromLoop(input, amount, done, kj::mv(buffer));
    });
  });
}

StreamState::~StreamState() noexcept(false) {
  auto waiting = [](kj::PromiseRejector& f) {
    return f.isWaiting();
  };
  auto reason = []() {
    return kj::Exception(kj::Exception::Type::FAILED, __FILE__, __LINE__,
                         kj::str("PromiseFulfiller was destroyed without fulfilling the promise."));
  };
  KJ_IF_MAYBE(f, abortedFulfiller) {
    if (waiting(**f)) (*f)->reject(reason());
  }
  KJ_IF_MAYBE(f, writeDisconnectedFulfiller) {
    if (waiting(**f)) (*f)->reject(reason());
  }
  KJ_IF_MAYBE(w, pendingWrite) {
    if (waiting(*w->fulfiller)) w->fulfiller->reject(reason());
  }
  KJ_IF_MAYBE(r, pendingRead) {
    if (waiting(*r->fulfiller)) r->fulfiller->reject(reason());
  }
}

}  // namespace cfqt::quic::_
