// ConnectionImpl's send path: the send queue, flush() into the endpoint's GSO batch,
// writePacket() (stream data round robin, connection-level blocking), datagrams (RFC 9221), and
// the connection's send budget (sendSpace() and addSendBuffered() are inline in internal.h).

#include "quic/internal.h"

#include <ngtcp2/ngtcp2.h>

#include <kj/debug.h>

namespace cfqt::quic::_ {

// ---- send

void ConnectionImpl::queueSend(StreamState& state) {
  if (state.inSendQueue || state.flowBlocked || !state.hasUnsent()) return;
  state.inSendQueue = true;
  state.turnBytes = 0;
  sendQueue.push_back(kj::addRef(state));
  scheduleFlush();
}

void ConnectionImpl::flush() {
  if (closeInfo != nullptr || conn == nullptr || endpoint == nullptr) return;
  auto& ep = *endpoint;
  if (ep.txBlocked()) {
    ep.waitWritable(*this);
    return;
  }
  uint64_t ts = nowNs();
  if (deferFlush(ts)) {
    rearm();
    return;
  }
  if (sendQueue.empty()) connBlockedSince = 0;
  if (receivedSinceProbe) {
    receivedSinceProbe = false;
    if (!writeWatch.empty()) {
      probeWrites(ts);
      if (closeInfo != nullptr) return;
    }
  }
  if ((unsentBidiCredit | unsentUniCredit) != 0 &&
      (!sendQueue.empty() || !datagramQueue.empty())) {
    grantStreamCredit();   // MAX_STREAMS rides with this data
  }
  size_t maxUdp = ngtcp2_conn_get_max_tx_udp_payload_size(conn);
  size_t quantum = ngtcp2_conn_get_send_quantum(conn);
  size_t maxPackets = kj::max(size_t(1), quantum / maxUdp);
  maxPackets = kj::min(maxPackets, TX_BATCH_PACKETS * 4);
  size_t packets = 0;
  bool more = true;
  bool blockedNow = false;
  auto& batch = ep.batch();
  KJ_ASSERT(batch.count == 0);
  batch.dest = remote;
  batch.owner = this;
  while (packets < maxPackets) {
    if (batch.count == TX_BATCH_PACKETS) {
      if (!silent && !ep.sendBatch()) {
        more = false;
        blockedNow = true;
        break;
      }
      batch.count = 0;
      batch.bytes = 0;
    }
    kj::byte* out = batch.buffer.begin() + batch.bytes;
    ngtcp2_ssize n = writePacket(out, MAX_PACKET, ts, maxUdp);
    if (n < 0) {
      // The connection died (its CONNECTION_CLOSE went out directly). Drop what it had batched:
      // the shared batch must be empty for the next connection's flush.
      batch.count = 0;
      batch.bytes = 0;
      batch.owner = nullptr;
      return;
    }
    if (n == 0) {
      more = false;
      break;
    }
    batch.sizes[batch.count++] = n;
    batch.bytes += n;
    bytesSent += n;
    ++packetsSent;
    ++packets;
  }
  if (batch.count > 0 && !blockedNow) {
    if (silent) {
      batch.count = 0;
      batch.bytes = 0;
    } else if (!ep.sendBatch()) {
      more = false;
    }
  }
  // An initial burst: the first INITIAL_BURST_PACKETS packets of a connection (the handshake
  // and the first requests, bounded by the initial congestion window anyway) are not paced.
  // Before the first RTT sample, ngtcp2 paces at cwnd / initialRtt, which held the client's
  // registration ~8 ms (at a 100 ms initial RTT; ~25 ms at 333 ms) behind its ClientHello.
  if (packetsSent >= INITIAL_BURST_PACKETS) ngtcp2_conn_update_pkt_tx_time(conn, ts);
  urgentFlush = false;
  deferredSince = 0;
  if (packets > 0) rxSinceSend = 0;
  if (ep.txBlocked()) {
    ep.waitWritable(*this);
  } else if (more) {
    scheduleFlush();
  }
  rearm();
}

bool ConnectionImpl::deferFlush(uint64_t ts) {
  // True if this flush should wait: all it could send is the ACK of a single packet (or credit
  // for bytes read), which ngtcp2 0.12 considers due after RTT/8 (microseconds on loopback).
  // Waiting up to ackDelay lets the answer the application is about to write carry it: one
  // packet, and one wake-up of the peer, instead of two. A second packet received, data or a
  // datagram to send, any other request for a flush, or a timer event flush at once; the
  // connection's timer ends the wait (rearm()).
  if (ackDelayNs == 0 || urgentFlush || !handshakeConfirmed || rxSinceSend >= 2 ||
      !sendQueue.empty() || !datagramQueue.empty()) {
    return false;
  }
  if (deferredSince == 0) deferredSince = ts;
  return ts < deferredSince + ackDelayNs;
}

ngtcp2_ssize ConnectionImpl::writePacket(kj::byte* out, size_t outLen, uint64_t ts,
                                         size_t maxUdp) {
  ngtcp2_pkt_info pi;
  if (KJ_UNLIKELY(!datagramQueue.empty())) {
    // Datagrams first (they are the latency-sensitive, unreliable traffic); the packet they
    // leave unfinished (ERR_WRITE_MORE) is completed by the stream loop below.
    ngtcp2_ssize n = writeDatagrams(pi, out, ts, maxUdp);
    if (n != NGTCP2_ERR_WRITE_MORE) return n;
  }
  for (;;) {
    StreamState* state = nullptr;
    while (!sendQueue.empty()) {
      auto& front = *sendQueue.front();
      if (front.closedByNgtcp2 || front.flowBlocked || !front.hasUnsent() ||
          front.txError != nullptr) {
        front.inSendQueue = false;
        sendQueue.pop_front();
        continue;
      }
      state = &front;
      break;
    }
    ngtcp2_vec vec[MAX_IOV];
    size_t nvec = 0;
    uint64_t total = 0;
    uint32_t flags = NGTCP2_WRITE_STREAM_FLAG_MORE;
    int64_t streamId = -1;
    bool offerFin = false;
    if (state != nullptr) {
      nvec = state->unsentIov(vec, MAX_IOV, total);
      bool allOffered = state->txSent + total == state->txEnd;
      offerFin = state->finRequested && !state->finSent && allOffered &&
                 state->pendingWrite == nullptr;
      if (total > 0 && ngtcp2_conn_get_max_data_left(conn) == 0) {
        // Connection-level blocked: only control frames. The stream keeps its place (ngtcp2
        // would answer STREAM_DATA_BLOCKED, which parks a stream until *stream* credit comes:
        // a stream with its FIN waiting here would then wait for ever).
        if (connBlockedSince == 0) connBlockedSince = ts;
        state = nullptr;
        nvec = 0;
        total = 0;
      } else {
        streamId = state->id;
        if (offerFin) flags |= NGTCP2_WRITE_STREAM_FLAG_FIN;
      }
    }
    ngtcp2_ssize datalen = -1;
    ngtcp2_ssize n = ngtcp2_conn_writev_stream(conn, &pathStorage.path, &pi, out, maxUdp,
                                               &datalen, flags, streamId, vec, nvec, ts);
    if (state != nullptr && datalen >= 0) {
      state->txSent += datalen;
      state->turnBytes += datalen;
      if (offerFin && uint64_t(datalen) == total) state->finSent = true;
      if (datalen > 0) {
        connBlockedSince = 0;
        // Its bytes left the unsent part of the buffer: a waiting writer may add more (appending
        // never moves the bytes ngtcp2 points at).
        if (state->pendingWrite != nullptr && !sendOverBudget) pumpPendingWrite(*state);
      }
    }
    if (n < 0) {
      switch (n) {
        case NGTCP2_ERR_WRITE_MORE:
          if (state != nullptr && !state->hasUnsent()) {
            state->inSendQueue = false;
            sendQueue.pop_front();
          }
          continue;
        case NGTCP2_ERR_STREAM_DATA_BLOCKED:
          KJ_ASSERT(state != nullptr);
          state->flowBlocked = true;
          state->inSendQueue = false;
          sendQueue.pop_front();
          continue;
        case NGTCP2_ERR_STREAM_SHUT_WR:
        case NGTCP2_ERR_STREAM_NOT_FOUND:
          KJ_ASSERT(state != nullptr);
          // ngtcp2 0.12 has no callback for a received STOP_SENDING: it resets the stream and
          // refuses our data, which is how we learn it.
          peerStoppedReading(*state);
          state->inSendQueue = false;
          sendQueue.pop_front();
          continue;
        default:
          failWithLibError(n);
          return -1;
      }
    }
    if (n > 0 && state != nullptr && !sendQueue.empty() && sendQueue.front().get() == state) {
      // Round robin: the stream goes to the back once it has sent its quantum in this turn.
      if (!state->hasUnsent() || state->turnBytes >= config.streamSendQuantum) {
        state->turnBytes = 0;
        auto own = kj::mv(sendQueue.front());
        sendQueue.pop_front();
        if (own->hasUnsent()) {
          sendQueue.push_back(kj::mv(own));
        } else {
          own->inSendQueue = false;
        }
      }
    }
    return n;
  }
}

ngtcp2_ssize ConnectionImpl::writeDatagrams(ngtcp2_pkt_info& pi, kj::byte* out, uint64_t ts,
                                            size_t maxUdp) {
  // Puts queued datagrams into the packet being built at `out`. Returns NGTCP2_ERR_WRITE_MORE if
  // the queue is empty and the packet has room left (the caller finishes it), else what
  // writePacket() returns: a packet's size, 0 (nothing may be sent now) or -1 (the connection
  // died).
  size_t limit = maxDatagramPayload();
  while (!datagramQueue.empty()) {
    auto& payload = datagramQueue.front();
    if (payload.size() > limit) {
      // Queued under a larger path MTU that has shrunk since: it would never fit a packet.
      datagramQueue.pop_front();
      ++datagramsSendDropped;
      continue;
    }
    ngtcp2_vec vec;
    vec.base = payload.begin();
    vec.len = payload.size();
    int accepted = 0;
    // An empty payload must be passed as no vector: ngtcp2 asserts that none is empty.
    ngtcp2_ssize n = ngtcp2_conn_writev_datagram(conn, &pathStorage.path, &pi, out, maxUdp,
        &accepted, NGTCP2_WRITE_DATAGRAM_FLAG_MORE, 0, &vec, vec.len == 0 ? 0 : 1, ts);
    if (accepted != 0) {
      // Copied into the packet: ngtcp2 keeps no reference (no ack/lost callbacks are set).
      datagramQueue.pop_front();
      ++datagramsSent;
    }
    if (n == NGTCP2_ERR_WRITE_MORE) continue;
    if (n == NGTCP2_ERR_INVALID_STATE || n == NGTCP2_ERR_INVALID_ARGUMENT) {
      // Refused before any packet was started (checked by sendDatagram(), so not expected).
      if (accepted == 0) {
        datagramQueue.pop_front();
        ++datagramsSendDropped;
      }
      continue;
    }
    if (n < 0) {
      failWithLibError(n);
      return -1;
    }
    // A complete packet (the datagram, if not accepted, waits for the next one), or 0: blocked
    // by congestion control or pacing; the timer calls flush() again.
    return n;
  }
  return NGTCP2_ERR_WRITE_MORE;
}

// ---- datagrams (application calls)

bool ConnectionImpl::sendDatagram(kj::ArrayPtr<const kj::byte> payload) {
  if (closeInfo != nullptr || conn == nullptr) kj::throwFatalException(closeException());
  auto params = ngtcp2_conn_get_remote_transport_params(conn);
  if (params == nullptr || params->max_datagram_frame_size == 0) {
    kj::throwFatalException(failed(kj::str(
        "QUIC sendDatagram: the peer ", remote, " did not advertise DATAGRAM support "
        "(max_datagram_frame_size 0); datagrams cannot be sent on this connection")));
  }
  size_t limit = maxDatagramPayload();
  if (payload.size() > limit) {
    kj::throwFatalException(failed(kj::str(
        "QUIC sendDatagram: payload of ", payload.size(), " bytes is larger than the ", limit,
        " bytes a DATAGRAM to ", remote, " can carry (peer max_datagram_frame_size ",
        params->max_datagram_frame_size, ", path packet size ",
        ngtcp2_conn_get_path_max_tx_udp_payload_size(conn), ")")));
  }
  if (datagramQueue.size() >= MAX_QUEUED_DATAGRAMS) {
    ++datagramsSendDropped;
    return false;
  }
  datagramQueue.push_back(kj::heapArray(payload));
  scheduleFlush();
  return true;
}

size_t ConnectionImpl::maxDatagramPayload() const {
  if (closeInfo != nullptr || conn == nullptr) return 0;
  auto params = ngtcp2_conn_get_remote_transport_params(conn);
  if (params == nullptr || params->max_datagram_frame_size <= DATAGRAM_FRAME_OVERHEAD) return 0;
  uint64_t byFrame = params->max_datagram_frame_size - DATAGRAM_FRAME_OVERHEAD;
  size_t packet = kj::min(ngtcp2_conn_get_path_max_tx_udp_payload_size(conn),
                          ngtcp2_conn_get_max_tx_udp_payload_size(conn));
  if (packet <= SHORT_PACKET_OVERHEAD + DATAGRAM_FRAME_OVERHEAD) return 0;
  return kj::min(byFrame, uint64_t(packet - SHORT_PACKET_OVERHEAD - DATAGRAM_FRAME_OVERHEAD));
}

// ---- send budget

uint64_t ConnectionImpl::sendBudgetHigh() const {
  uint64_t high = kj::max(config.connectionSendHigh, uint64_t(1));
  if (config.connectionSendMin >= high || conn == nullptr) return high;
  ngtcp2_conn_stat stat;
  ngtcp2_conn_get_conn_stat(conn, &stat);
  return kj::min(high, kj::max(config.connectionSendMin, SEND_BUDGET_CWNDS * stat.cwnd));
}

uint64_t ConnectionImpl::sendBudgetLow() const {
  // The low mark: connectionSendLow scaled as the high mark is.
  uint64_t high = kj::max(config.connectionSendHigh, uint64_t(1));
  uint64_t now = sendBudgetHigh();
  if (now == high) return config.connectionSendLow;
  return uint64_t(double(now) * double(config.connectionSendLow) / double(high));
}

void ConnectionImpl::subSendBuffered(uint64_t n) {
  sendBuffered -= n;
  if (sendOverBudget && sendBuffered <= config.connectionSendLow &&
      sendBuffered <= sendBudgetLow()) {
    sendOverBudget = false;
    // Waiting writers resume in the order they started waiting; one that fills the budget again
    // waits at the back.
    auto waiting = kj::mv(budgetWaiters);
    budgetWaiters.clear();
    for (auto& state: waiting) {
      state->budgetWaiting = false;
      if (state->conn != nullptr) pumpPendingWrite(*state);
    }
  }
}

void ConnectionImpl::releasePromise(StreamState& state) {
  // Returns what writableBytes() reserved and no write used.
  if (state.promised == 0) return;
  uint64_t n = state.promised;
  state.promised = 0;
  subSendBuffered(n);
}

void ConnectionImpl::pumpPendingWrite(StreamState& state) {
  KJ_IF_MAYBE(w, state.pendingWrite) {
    if (w->spaceOnly) {
      // Stream::whenWritable(): done once a write may add writeThreshold() bytes.
      if (sendSpace(state) >= writeThreshold()) {
        w->fulfiller->fulfill();
        state.pendingWrite = nullptr;
      } else if (sendOverBudget && !state.budgetWaiting) {
        state.budgetWaiting = true;
        budgetWaiters.push_back(kj::addRef(state));
      }
      return;
    }
    auto pieces = w->pieces.size() == 0 ? kj::arrayPtr(&w->single, 1) : w->pieces;
    uint64_t before = state.txBuffered();
    while (w->piece < pieces.size()) {
      auto piece = pieces[w->piece];
      size_t n = state.appendTx(piece.slice(w->offset, piece.size()), sendSpace(state));
      w->offset += n;
      if (w->offset < piece.size()) break;
      ++w->piece;
      w->offset = 0;
    }
    addSendBuffered(state.txBuffered() - before);
    if (w->piece == pieces.size()) {
      w->fulfiller->fulfill();
      state.pendingWrite = nullptr;
    } else if (sendOverBudget && !state.budgetWaiting) {
      state.budgetWaiting = true;
      budgetWaiters.push_back(kj::addRef(state));
    }
    queueSend(state);
  }
}

}  // namespace cfqt::quic::_
