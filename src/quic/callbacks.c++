// ConnectionImpl's ngtcp2 callbacks (connection IDs, handshake, stream data, open, close, reset,
// acknowledgements, flow control, stateless reset, datagrams) and the stream events they bring.
// Each callback runs inside guard() and never writes packets (see the rules in internal.h).

#include "quic/internal.h"

#include <ngtcp2/ngtcp2.h>
#include <ngtcp2/ngtcp2_crypto.h>

#include <kj/debug.h>

#include <string.h>

namespace cfqt::quic::_ {

// ---- callbacks

int ConnectionImpl::cbGetNewConnectionId(ngtcp2_conn*, ngtcp2_cid* cid, uint8_t* token,
                                         size_t cidlen, void* ud) {
  auto& self = *static_cast<ConnectionImpl*>(ud);
  return self.guard([&]() {
    kj::byte bytes[NGTCP2_MAX_CIDLEN];
    randomBytes(bytes, cidlen);
    ngtcp2_cid_init(cid, bytes, cidlen);
    if (self.endpoint != nullptr) {
      auto ep = self.endpoint;
      if (ngtcp2_crypto_generate_stateless_reset_token(token, ep->resetSecret,
                                                       sizeof(ep->resetSecret), cid) != 0) {
        KJ_FAIL_ASSERT("stateless reset token");
      }
      CidKey key(*cid);
      self.cids.add(key);
      ep->addRoute(key, self);
    } else {
      randomBytes(token, NGTCP2_STATELESS_RESET_TOKENLEN);
    }
  });
}

int ConnectionImpl::cbRemoveConnectionId(ngtcp2_conn*, const ngtcp2_cid* cid, void* ud) {
  auto& self = *static_cast<ConnectionImpl*>(ud);
  return self.guard([&]() {
    CidKey key(*cid);
    if (self.endpoint != nullptr) self.endpoint->removeRoute(key);
    for (size_t i = 0; i < self.cids.size(); i++) {
      if (self.cids[i] == key) {
        self.cids[i] = self.cids.back();
        self.cids.removeLast();
        break;
      }
    }
  });
}

int ConnectionImpl::cbHandshakeCompleted(ngtcp2_conn*, void* ud) {
  auto& self = *static_cast<ConnectionImpl*>(ud);
  self.handshakeCompleted = true;
  if (self.server) {
    // A server's handshake is confirmed when it completes; ngtcp2 0.12 calls
    // handshake_confirmed only on the client.
    self.handshakeConfirmed = true;
    self.urgentFlush = true;
  }
  return 0;
}

int ConnectionImpl::cbHandshakeConfirmed(ngtcp2_conn*, void* ud) {
  auto& self = *static_cast<ConnectionImpl*>(ud);
  self.handshakeConfirmed = true;
  self.urgentFlush = true;   // HANDSHAKE_DONE, the handshake's last ACKs: not deferred
  return 0;
}

int ConnectionImpl::cbRecvStreamData(ngtcp2_conn*, uint32_t flags, int64_t id, uint64_t offset,
                                     const uint8_t* data, size_t len, void* ud, void* sud) {
  auto& self = *static_cast<ConnectionImpl*>(ud);
  self.rxEliciting = true;
  return self.guard([&]() {
    if (sud == nullptr) {
      // Unknown stream (should not happen): discard and give the credit back.
      ngtcp2_conn_extend_max_stream_offset(self.conn, id, len);
      ngtcp2_conn_extend_max_offset(self.conn, len);
      return;
    }
    self.onStreamData(*static_cast<StreamState*>(sud), flags, kj::arrayPtr(data, len));
  });
}

void ConnectionImpl::onStreamData(StreamState& state, uint32_t flags,
                                  kj::ArrayPtr<const kj::byte> data) {
  if (flags & NGTCP2_STREAM_DATA_FLAG_FIN) state.rxFin = true;
  if (state.readShut || !state.bidi) {
    if (data.size() > 0) {
      ngtcp2_conn_extend_max_stream_offset(conn, state.id, data.size());
      ngtcp2_conn_extend_max_offset(conn, data.size());
    }
    return;
  }
  KJ_IF_MAYBE(r, state.pendingRead) {
    size_t n = kj::min(data.size(), r->maxBytes - r->filled);
    if (n > 0) memcpy(r->buffer + r->filled, data.begin(), n);
    r->filled += n;
    data = data.slice(n, data.size());
    credit(state, n, n);
  }
  if (data.size() > 0) {
    size_t done = 0;
    while (done < data.size()) {
      if (state.rx.empty() || state.rx.back().end == state.rx.back().data.size()) {
        size_t last = state.rx.empty() ? 0 : state.rx.back().data.size();
        Block block;
        block.data = kj::heapArray<kj::byte>(blockSize(data.size() - done, last, RX_BLOCK));
        state.rx.push_back(kj::mv(block));
      }
      auto& back = state.rx.back();
      size_t k = kj::min(data.size() - done, back.data.size() - back.end);
      memcpy(back.data.begin() + back.end, data.begin() + done, k);
      back.end += k;
      done += k;
    }
    state.rxBuffered += data.size();
    recvBuffered += data.size();
    if (!state.creditWithheld && recvBuffered <= config.recvCreditBudget) {
      // Within the budget the connection window is not tied to this stream's reader: a reader
      // that stalls then holds back its own stream (bounded by the stream window) and nothing
      // else.
      ngtcp2_conn_extend_max_offset(conn, data.size());
      state.rxPrepaid += data.size();
    }
  }
  KJ_IF_MAYBE(r, state.pendingRead) {
    if ((r->filled >= r->minBytes || state.rxFin) && !state.readReady) {
      // Completed by deliverReads() once the whole receive batch is in, so that the data of the
      // batch's later packets for this stream lands in the same read.
      state.readReady = true;
      readyReads.add(kj::addRef(state));
    }
  }
}

void ConnectionImpl::deliverReads() {
  for (auto& state: readyReads) {
    state->readReady = false;
    KJ_IF_MAYBE(r, state->pendingRead) {
      auto fulfiller = kj::mv(r->fulfiller);
      size_t filled = r->filled;
      state->pendingRead = nullptr;
      fulfiller->fulfill(kj::mv(filled));
    }
  }
  readyReads.clear();
}

int ConnectionImpl::cbStreamOpen(ngtcp2_conn*, int64_t id, void* ud) {
  auto& self = *static_cast<ConnectionImpl*>(ud);
  return self.guard([&]() { self.onStreamOpen(id); });
}

void ConnectionImpl::onStreamOpen(int64_t id) {
  auto state = kj::refcounted<StreamState>(*this, id, false);
  state->bidi = (id & 0x2) == 0;
  ngtcp2_conn_set_stream_user_data(conn, id, state.get());
  streams.insert(id, kj::addRef(*state));
  if (!state->bidi) return;   // unidirectional streams are not used: data is discarded
  ++streamsRemote;
  while (!acceptWaiters.empty()) {
    auto fulfiller = kj::mv(acceptWaiters.front());
    acceptWaiters.pop_front();
    if (fulfiller->isWaiting()) {
      fulfiller->fulfill(makeHandle(kj::mv(state)));
      return;
    }
  }
  state->handleAlive = true;   // the queue stands for the future handle
  acceptQueue.push_back(kj::mv(state));
}

int ConnectionImpl::cbStreamClose(ngtcp2_conn*, uint32_t flags, int64_t id, uint64_t code,
                                  void* ud, void* sud) {
  auto& self = *static_cast<ConnectionImpl*>(ud);
  return self.guard([&]() {
    if (sud != nullptr) self.onStreamClose(*static_cast<StreamState*>(sud), flags, code);
    bool remoteStream = self.server ? (id & 1) == 0 : (id & 1) == 1;
    if (remoteStream) self.creditClosedStream((id & 2) == 0);
  });
}

namespace {

uint64_t streamCreditBatch(uint64_t limit) {
  // How much closed-stream credit may wait for a packet that carries data: 1/16 of the limit
  // (64 of the tunnel's 1024), so the peer can always open at least 15/16 of it; 1 (at once)
  // for limits under 32.
  return kj::max(limit / 16, uint64_t(1));
}

}  // namespace

void ConnectionImpl::creditClosedStream(bool bidi) {
  if (bidi) {
    ++unsentBidiCredit;
  } else {
    ++unsentUniCredit;
  }
  if (unsentBidiCredit >= streamCreditBatch(config.maxIncomingBidiStreams) ||
      unsentUniCredit >= streamCreditBatch(config.maxIncomingUniStreams)) {
    grantStreamCredit();
  }
}

void ConnectionImpl::grantStreamCredit() {
  if (unsentBidiCredit > 0) ngtcp2_conn_extend_max_streams_bidi(conn, unsentBidiCredit);
  if (unsentUniCredit > 0) ngtcp2_conn_extend_max_streams_uni(conn, unsentUniCredit);
  unsentBidiCredit = 0;
  unsentUniCredit = 0;
}

void ConnectionImpl::onStreamClose(StreamState& state, uint32_t flags, uint64_t code) {
  state.closedByNgtcp2 = true;
  if (!state.rxFin && !state.readShut) {
    failRead(state, disconnected(kj::str("QUIC stream ", state.id, " closed before its end",
        (flags & NGTCP2_STREAM_CLOSE_FLAG_APP_ERROR_CODE_SET) ? kj::str(" (code ", code, ")")
                                                              : kj::str())));
  }
  if (!state.finSent || state.txAcked < state.txEnd) {
    // Closed before our FIN was acknowledged: the stream was reset (by the peer, or by ngtcp2
    // answering the peer's STOP_SENDING). Writes from now on fail.
    if (state.txError == nullptr) {
      failWrite(state, disconnected(kj::str("QUIC stream ", state.id,
          " closed before its end: the peer reset it or stopped reading (STOP_SENDING)")));
    }
  }
  uint64_t released = state.txBuffered() + state.promised;
  state.releaseTx();
  state.promised = 0;
  subSendBuffered(released);
  KJ_IF_MAYBE(w, state.pendingWrite) {
    w->fulfiller->reject(disconnected(kj::str("QUIC stream ", state.id, " closed")));
    state.pendingWrite = nullptr;
  }
  // Drop the map's reference; handles (and queues) keep theirs.
  kj::Own<StreamState> keep;
  KJ_IF_MAYBE(entry, streams.find(state.id)) keep = kj::mv(*entry);
  streams.erase(state.id);
  if (keep.get() != nullptr && !state.handleAlive) {
    // Nobody will read what is buffered: return the connection credit.
    uint64_t unpaid = discardUnread(state);
    if (unpaid > 0) ngtcp2_conn_extend_max_offset(conn, unpaid);
  }
}

int ConnectionImpl::cbStreamReset(ngtcp2_conn*, int64_t id, uint64_t finalSize, uint64_t code,
                                  void* ud, void* sud) {
  auto& self = *static_cast<ConnectionImpl*>(ud);
  self.rxEliciting = true;
  return self.guard([&]() {
    if (sud == nullptr) return;
    auto& state = *static_cast<StreamState*>(sud);
    state.signalAborted();
    self.failRead(state, disconnected(kj::str(
        "QUIC stream ", id, " reset by the peer with code ", code)));
    // Buffered bytes will not be read: return them to the connection window.
    uint64_t unpaid = self.discardUnread(state);
    if (unpaid > 0) ngtcp2_conn_extend_max_offset(self.conn, unpaid);
    state.readShut = true;
  });
}

int ConnectionImpl::cbAcked(ngtcp2_conn*, int64_t id, uint64_t offset, uint64_t len, void* ud,
                            void* sud) {
  auto& self = *static_cast<ConnectionImpl*>(ud);
  return self.guard([&]() {
    if (sud == nullptr) return;
    auto& state = *static_cast<StreamState*>(sud);
    uint64_t before = state.txBuffered();
    state.onAcked(offset, len);
    self.subSendBuffered(before - state.txBuffered());
    if (state.pendingWrite != nullptr) self.pumpPendingWrite(state);
  });
}

int ConnectionImpl::cbExtendMaxLocalStreamsBidi(ngtcp2_conn*, uint64_t, void* ud) {
  auto& self = *static_cast<ConnectionImpl*>(ud);
  self.rxEliciting = true;
  return self.guard([&]() {
    if (self.openWaiters.empty() || self.openScheduled) return;
    self.openScheduled = true;
    self.tasks.add(kj::evalLater([&self]() { self.openWaiting(); }));
  });
}

int ConnectionImpl::cbExtendMaxStreamData(ngtcp2_conn*, int64_t, uint64_t, void* ud, void* sud) {
  auto& self = *static_cast<ConnectionImpl*>(ud);
  self.rxEliciting = true;
  return self.guard([&]() {
    if (sud == nullptr) return;
    auto& state = *static_cast<StreamState*>(sud);
    state.flowBlocked = false;
    self.queueSend(state);
    // More credit lets a waiting writer add more (sendSpace() follows the peer's credit).
    if (state.pendingWrite != nullptr) self.pumpPendingWrite(state);
  });
}

int ConnectionImpl::cbRecvStatelessReset(ngtcp2_conn*, const ngtcp2_pkt_stateless_reset*,
                                         void* ud) {
  static_cast<ConnectionImpl*>(ud)->statelessResetReceived = true;
  return 0;
}

int ConnectionImpl::cbRecvDatagram(ngtcp2_conn*, uint32_t, const uint8_t*, size_t, void* ud) {
  auto& self = *static_cast<ConnectionImpl*>(ud);
  self.rxEliciting = true;
  ++self.datagramsDropped;
  return 0;
}

}  // namespace cfqt::quic::_
