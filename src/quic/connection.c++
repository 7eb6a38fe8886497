// ConnectionImpl: construction and ngtcp2 set-up, the timer (one timerfd per connection), the
// receive path (packets in, errors and peer closes turned into CloseInfo), closing and dying, and
// the application calls (open/accept streams, close, stats). TLS set-up is in
// connection-tls.c++, the send path in connection-send.c++, the callbacks in callbacks.c++ and
// the stream helpers in stream.c++.

#include "quic/internal.h"

#include <ngtcp2/ngtcp2.h>
#include <ngtcp2/ngtcp2_crypto.h>
#include <gnutls/gnutls.h>

#include <kj/debug.h>

#include <string.h>
#include <sys/timerfd.h>
#include <time.h>

namespace cfqt::quic::_ {

// =======================================================================================
// ConnectionImpl implementation

ConnectionImpl::ConnectionImpl(EndpointImpl& endpoint, bool isServer, SocketAddress remote,
                               TransportConfig config)
    : server(isServer), remote(remote), endpoint(&endpoint), config(kj::mv(config)),
      tasks(*this) {
  connRef.get_conn = &getConn;
  connRef.user_data = this;
}

ConnectionImpl::~ConnectionImpl() noexcept(false) {
  // Streams may outlive us (their handles hold refs to us, so this only happens once every
  // handle is gone), but the map's states may still be referenced by nobody else.
  for (auto& entry: streams) entry.value->conn = nullptr;
  for (auto& state: sendQueue) state->conn = nullptr;
  for (auto& state: acceptQueue) state->conn = nullptr;
  for (auto& state: writeWatch) state->conn = nullptr;
  for (auto& state: budgetWaiters) state->conn = nullptr;
  if (endpoint != nullptr) {
    for (auto& key: cids) endpoint->removeRoute(key);
    endpoint->forget(*this);
  }
  if (conn != nullptr) ngtcp2_conn_del(conn);
  if (session != nullptr) gnutls_deinit(session);
  clientCredentials = nullptr;
  if (emptyCredentials != nullptr) gnutls_certificate_free_credentials(emptyCredentials);
}

void ConnectionImpl::setup(const ngtcp2_cid& dcid, const ngtcp2_cid& scid, uint32_t version,
                           const ngtcp2_cid* originalDcid) {
  ngtcp2_callbacks cb;
  memset(&cb, 0, sizeof(cb));
  if (server) {
    cb.recv_client_initial = ngtcp2_crypto_recv_client_initial_cb;
  } else {
    cb.client_initial = ngtcp2_crypto_client_initial_cb;
    cb.recv_retry = ngtcp2_crypto_recv_retry_cb;
  }
  cb.recv_crypto_data = ngtcp2_crypto_recv_crypto_data_cb;
  cb.encrypt = ngtcp2_crypto_encrypt_cb;
  cb.decrypt = ngtcp2_crypto_decrypt_cb;
  cb.hp_mask = ngtcp2_crypto_hp_mask_cb;
  cb.update_key = ngtcp2_crypto_update_key_cb;
  cb.delete_crypto_aead_ctx = ngtcp2_crypto_delete_crypto_aead_ctx_cb;
  cb.delete_crypto_cipher_ctx = ngtcp2_crypto_delete_crypto_cipher_ctx_cb;
  cb.get_path_challenge_data = ngtcp2_crypto_get_path_challenge_data_cb;
  cb.version_negotiation = ngtcp2_crypto_version_negotiation_cb;
  cb.rand = cbRand;
  cb.get_new_connection_id = cbGetNewConnectionId;
  cb.remove_connection_id = cbRemoveConnectionId;
  cb.handshake_completed = cbHandshakeCompleted;
  cb.handshake_confirmed = cbHandshakeConfirmed;
  cb.recv_stream_data = cbRecvStreamData;
  cb.stream_open = cbStreamOpen;
  cb.stream_close = cbStreamClose;
  cb.stream_reset = cbStreamReset;
  cb.acked_stream_data_offset = cbAcked;
  cb.extend_max_local_streams_bidi = cbExtendMaxLocalStreamsBidi;
  cb.extend_max_stream_data = cbExtendMaxStreamData;
  cb.recv_stateless_reset = cbRecvStatelessReset;
  cb.recv_datagram = cbRecvDatagram;

  ngtcp2_settings settings;
  ngtcp2_settings_default(&settings);
  settings.initial_ts = nowNs();
  settings.max_tx_udp_payload_size = kj::min(config.maxUdpPayloadSize, uint32_t(MAX_PACKET));
  settings.max_window = config.maxConnectionWindow;
  settings.max_stream_window = config.maxStreamWindow;
  settings.handshake_timeout = toNs(config.handshakeTimeout);
  if (config.initialRtt > 0 * kj::NANOSECONDS) settings.initial_rtt = toNs(config.initialRtt);
  if (settings.handshake_timeout == 0) settings.handshake_timeout = UINT64_MAX;
  ackDelayNs = kj::min(toNs(config.ackDelay), uint64_t(NGTCP2_DEFAULT_MAX_ACK_DELAY));

  ngtcp2_transport_params params;
  ngtcp2_transport_params_default(&params);
  params.initial_max_stream_data_bidi_local = config.initialStreamWindow;
  params.initial_max_stream_data_bidi_remote = config.initialStreamWindow;
  params.initial_max_stream_data_uni = config.initialStreamWindow;
  params.initial_max_data = config.initialConnectionWindow;
  params.initial_max_streams_bidi = config.maxIncomingBidiStreams;
  params.initial_max_streams_uni = config.maxIncomingUniStreams;
  params.max_idle_timeout = toNs(config.maxIdleTimeout);
  params.max_udp_payload_size = settings.max_tx_udp_payload_size;
  params.active_connection_id_limit = kj::min(config.activeConnectionIdLimit, uint32_t(8));
  params.max_datagram_frame_size = config.maxDatagramFrameSize;

  auto local = endpoint->local;
  ngtcp2_path_storage_init(&pathStorage,
      reinterpret_cast<const ngtcp2_sockaddr*>(local.sockaddr()), local.length(),
      reinterpret_cast<const ngtcp2_sockaddr*>(remote.sockaddr()), remote.length(), nullptr);

  int rv;
  if (server) {
    params.original_dcid = *originalDcid;
    params.stateless_reset_token_present = 1;
    ngtcp2_crypto_generate_stateless_reset_token(params.stateless_reset_token,
        endpoint->resetSecret, sizeof(endpoint->resetSecret), &scid);
    rv = ngtcp2_conn_server_new(&conn, &dcid, &scid, &pathStorage.path, version, &cb, &settings,
                                &params, nullptr, this);
  } else {
    rv = ngtcp2_conn_client_new(&conn, &dcid, &scid, &pathStorage.path, version, &cb, &settings,
                                &params, nullptr, this);
  }
  if (rv != 0) {
    conn = nullptr;
    KJ_FAIL_REQUIRE("ngtcp2_conn_new failed", ngtcp2_strerror(rv));
  }
  CidKey scidKey(scid);
  cids.add(scidKey);
  endpoint->addRoute(scidKey, *this);
  if (originalDcid != nullptr) {
    CidKey odcid(*originalDcid);
    cids.add(odcid);
    endpoint->addRoute(odcid, *this);
  }
  if (config.keepAlivePeriod > 0 * kj::SECONDS) {
    ngtcp2_conn_set_keep_alive_timeout(conn, toNs(config.keepAlivePeriod));
  }
  startTimer();
}

// ---- timer

void ConnectionImpl::startTimer() {
  int fd;
  KJ_SYSCALL(fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC));
  timerFd = kj::AutoCloseFd(fd);
  timerObserver = kj::heap<kj::UnixEventPort::FdObserver>(
      endpoint->eventPort, fd, kj::UnixEventPort::FdObserver::OBSERVE_READ);
  tasks.add(timerLoop());
}

kj::Promise<void> ConnectionImpl::timerLoop() {
  return timerObserver->whenBecomesReadable().then([this]() {
    onTimer();
    return timerLoop();
  });
}

void ConnectionImpl::onTimer() {
  // No read() of the expiration count: the next timerfd_settime resets it, and the edge-
  // triggered observer is woken by every expiry regardless (saves a syscall per timer).
  armedExpiry = UINT64_MAX;
  if (closeInfo != nullptr || conn == nullptr) return;
  uint64_t ts = nowNs();
  if (ngtcp2_conn_get_expiry(conn) <= ts) {
    urgentFlush = true;   // probes, keep-alive: not to be deferred
    int rv = ngtcp2_conn_handle_expiry(conn, ts);
    ngtcp2_conn_stat stat;
    ngtcp2_conn_get_conn_stat(conn, &stat);
    if (stat.pto_count > lastPto) ptoTotal += stat.pto_count - lastPto;
    lastPto = stat.pto_count;
    if (rv != 0) {
      if (rv == NGTCP2_ERR_IDLE_CLOSE && !ngtcp2_conn_get_handshake_completed(conn)) {
        // Silence before the handshake completed is an unfinished handshake, whichever timer
        // noticed it first (with a short idle timeout and a 100 ms initial RTT, the idle one).
        die(makeClose(CloseKind::HANDSHAKE_TIMEOUT, 0, "", kj::str(
            ": no answer from ", remote, " to the handshake for the idle timeout ",
            "(max_idle_timeout ", config.maxIdleTimeout, "); check that a QUIC server listens "
            "there and UDP is not blocked")));
      } else if (rv == NGTCP2_ERR_IDLE_CLOSE) {
        die(makeClose(CloseKind::IDLE_TIMEOUT, 0, "", kj::str(
            ": no packet from ", remote, " for the idle timeout (max_idle_timeout ",
            config.maxIdleTimeout, "); the peer vanished or the path is broken")));
      } else if (rv == NGTCP2_ERR_HANDSHAKE_TIMEOUT) {
        die(makeClose(CloseKind::HANDSHAKE_TIMEOUT, 0, "", kj::str(
            ": no completed handshake with ", remote, " after ", config.handshakeTimeout,
            "; check that a QUIC server listens there and UDP is not blocked")));
      } else {
        failWithLibError(rv);
      }
      return;
    }
  }
  flush();
}

void ConnectionImpl::rearm() {
  if (conn == nullptr || closeInfo != nullptr) return;
  uint64_t expiry = ngtcp2_conn_get_expiry(conn);
  // timerfd_settime costs ~10 us on this kind of VM: re-arm only to fire earlier. A timer armed
  // too early just fires, finds nothing expired and re-arms.
  if (expiry >= armedExpiry) return;
  if (sendQueue.empty() && datagramQueue.empty()) {
    uint64_t now = nowNs();
    if (expiry > now && expiry <= now + PACING_SLACK_NS) {
      // After a flush that sent packets this is ngtcp2's pacing time for the next one: ngtcp2
      // lets a packet leave up to 1 ms before it (NGTCP2_PKT_PACING_OVERHEAD) and its expiry
      // handling drops such a time. With nothing to send, handle it now rather than arm a timer
      // that wakes the loop microseconds later to do just that (two timerfd_settime calls and an
      // epoll wake-up per flush). ngtcp2_conn_handle_expiry() acts only on what is due at `now`
      // (pacing: within its slack), like the timer firing early.
      if (ngtcp2_conn_handle_expiry(conn, now) == 0) {
        expiry = ngtcp2_conn_get_expiry(conn);
        if (expiry >= armedExpiry) return;
      } else {
        expiry = now;   // let onTimer() see the error
      }
    }
    uint64_t floor = now + ackDelayNs;
    if (expiry < floor && expiry > now - ackDelayNs) {
      // Due within the ACK delay (or just due): an ACK of a lone packet, which then leaves with
      // the answer if one comes in time (TransportConfig::ackDelay).
      expiry = floor;
    }
  }
  if (deferredSince != 0) expiry = kj::min(expiry, deferredSince + ackDelayNs);
  if (expiry >= armedExpiry) return;
  if (endpoint != nullptr && endpoint->txBlocked() && expiry <= nowNs()) return;
  armedExpiry = expiry;
  struct itimerspec its;
  memset(&its, 0, sizeof(its));
  if (expiry != UINT64_MAX) {
    if (expiry == 0) expiry = 1;
    its.it_value.tv_sec = expiry / 1000000000ull;
    its.it_value.tv_nsec = expiry % 1000000000ull;
  }
  KJ_SYSCALL(timerfd_settime(timerFd, TFD_TIMER_ABSTIME, &its, nullptr));
}

void ConnectionImpl::scheduleFlush() {
  urgentFlush = true;
  scheduleAckFlush();
}

void ConnectionImpl::scheduleAckFlush() {
  if (flushScheduled || closeInfo != nullptr) return;
  flushScheduled = true;
  // evalLast: after every continuation that is ready has run, so that the data, FIN and ACKs
  // produced in this turn leave in as few packets (and syscalls) as possible.
  tasks.add(kj::evalLast([this]() {
    flushScheduled = false;
    deliverReads();
    flush();
  }));
}

// ---- receive

void ConnectionImpl::onPacket(const SocketAddress& from, kj::ArrayPtr<const kj::byte> packet,
                              uint64_t ts) {
  if (silent) return;
  if (closeInfo != nullptr) {
    // Closing period: answer with our CONNECTION_CLOSE, less and less often.
    ++closePacketCount;
    if (closePacket.size() > 0 && endpoint != nullptr &&
        (closePacketCount & (closePacketCount - 1)) == 0) {
      endpoint->sendOne(remote, closePacket);
    }
    return;
  }
  bytesReceived += packet.size();
  ++packetsReceived;
  ngtcp2_path path;
  path.local = pathStorage.path.local;
  path.remote.addr = reinterpret_cast<ngtcp2_sockaddr*>(const_cast<void*>(from.sockaddr()));
  path.remote.addrlen = from.length();
  path.user_data = nullptr;
  ngtcp2_pkt_info pi;
  memset(&pi, 0, sizeof(pi));
  int rv = ngtcp2_conn_read_pkt(conn, &path, &pi, packet.begin(), packet.size(), ts);
  receivedSinceProbe = true;
  if (rxEliciting) {
    // Counted like ngtcp2's ack threshold, but only packets whose frames reached a callback
    // (an ACK-only packet does not: counting those, each side's ACKs kept the other's at 2).
    rxEliciting = false;
    ++rxSinceSend;
  }
  afterRead(rv);
}

void ConnectionImpl::afterRead(int rv) {
  if (rv == 0) {
    KJ_IF_MAYBE(e, pendingError) {
      auto exception = kj::mv(*e);
      pendingError = nullptr;
      die(makeClose(CloseKind::INTERNAL_ERROR, 0, "", kj::str(": ", exception.getDescription())));
      return;
    }
    if (handshakeCompleted && !handshakeReported) afterHandshake();
    return;
  }
  switch (rv) {
    case NGTCP2_ERR_DRAINING:
      die(statelessResetReceived
          ? makeClose(CloseKind::STATELESS_RESET, 0, "", kj::str(
                ": ", remote, " no longer knows this connection (it restarted or lost state)"))
          : peerClose());
      return;
    case NGTCP2_ERR_CRYPTO: {
      auto info = tlsFailure();
      ngtcp2_connection_close_error ccerr;
      ngtcp2_connection_close_error_set_transport_error_tls_alert(
          &ccerr, ngtcp2_conn_get_tls_alert(conn), nullptr, 0);
      sendClose(ccerr);
      die(kj::mv(info));
      return;
    }
    case NGTCP2_ERR_DROP_CONN:
    case NGTCP2_ERR_RETRY:
      die(makeClose(CloseKind::INTERNAL_ERROR, 0, "",
                    kj::str(": connection dropped (", ngtcp2_strerror(rv), ")")));
      return;
    case NGTCP2_ERR_DISCARD_PKT:
      return;
    default:
      failWithLibError(rv);
      return;
  }
}

void ConnectionImpl::failWithLibError(int rv) {
  kj::String detail;
  KJ_IF_MAYBE(e, pendingError) {
    detail = kj::str(": ", e->getDescription());
    pendingError = nullptr;
  } else {
    detail = kj::str(": ", ngtcp2_strerror(rv));
  }
  ngtcp2_connection_close_error ccerr;
  ngtcp2_connection_close_error_set_transport_error_liberr(&ccerr, rv, nullptr, 0);
  sendClose(ccerr);
  die(makeClose(CloseKind::INTERNAL_ERROR, ccerr.error_code, "", kj::mv(detail)));
}

CloseInfo ConnectionImpl::peerClose() {
  ngtcp2_connection_close_error ccerrStorage;
  ngtcp2_conn_get_connection_close_error(conn, &ccerrStorage);
  const ngtcp2_connection_close_error* ccerr = &ccerrStorage;
  kj::StringPtr reason = "";
  kj::String reasonStorage;
  if (ccerr != nullptr && ccerr->reason != nullptr && ccerr->reasonlen > 0) {
    reasonStorage = kj::heapString(reinterpret_cast<const char*>(ccerr->reason), ccerr->reasonlen);
    reason = reasonStorage;
  }
  uint64_t code = ccerr != nullptr ? ccerr->error_code : 0;
  if (ccerr != nullptr && ccerr->type == NGTCP2_CONNECTION_CLOSE_ERROR_CODE_TYPE_APPLICATION) {
    return makeClose(CloseKind::PEER_APPLICATION_CLOSE, code, reason,
        kj::str(" ", code, " \"", reason, "\" (", remote, ")"));
  }
  if (code >= 0x100 && code <= 0x1ff) {
    uint8_t alert = code - 0x100;
    auto info = makeClose(CloseKind::TLS_PEER_ALERT, code, reason, kj::str(
        " with alert ", alert, " ", alertName(alert), " (", remote, "); ", alertHint(alert),
        handshakeCompleted || server ? kj::str() : kj::str(" (we offered ALPN '", alpnWanted, "')")));
    info.tlsAlert = alert;
    return info;
  }
  return makeClose(CloseKind::PEER_TRANSPORT_CLOSE, code, reason,
      kj::str(" 0x", kj::hex(code), " \"", reason, "\" (", remote, ")"));
}

void ConnectionImpl::sendClose(const ngtcp2_connection_close_error& ccerr) {
  if (conn == nullptr || endpoint == nullptr) return;
  kj::byte buf[MAX_PACKET];
  ngtcp2_pkt_info pi;
  ngtcp2_path_storage ps;
  ngtcp2_path_storage_zero(&ps);
  ngtcp2_ssize n = ngtcp2_conn_write_connection_close(
      conn, &ps.path, &pi, buf, ngtcp2_conn_get_max_tx_udp_payload_size(conn), &ccerr, nowNs());
  if (n <= 0) return;
  closePacket = kj::heapArray<kj::byte>(buf, n);
  if (!silent) {
    endpoint->sendOne(remote, closePacket);
    bytesSent += n;
    ++packetsSent;
  }
}

void ConnectionImpl::die(CloseInfo info) {
  if (closeInfo != nullptr) return;
  auto exception = info.toException();
  closeInfo = kj::mv(info);
  datagramQueue.clear();
  // Disarm the timer.
  struct itimerspec its;
  memset(&its, 0, sizeof(its));
  timerfd_settime(timerFd, TFD_TIMER_ABSTIME, &its, nullptr);
  armedExpiry = 0;

  KJ_IF_MAYBE(f, handshakeFulfiller) {
    (*f)->reject(kj::cp(exception));
    handshakeFulfiller = nullptr;
  }
  for (auto& entry: streams) {
    failRead(*entry.value, kj::cp(exception));
    failWrite(*entry.value, kj::cp(exception));
  }
  for (auto& state: acceptQueue) {
    failRead(*state, kj::cp(exception));
    failWrite(*state, kj::cp(exception));
  }
  for (auto& w: acceptWaiters) w->reject(kj::cp(exception));
  acceptWaiters.clear();
  for (auto& w: openWaiters) w->reject(kj::cp(exception));
  openWaiters.clear();
  auto& saved = KJ_ASSERT_NONNULL(closeInfo);
  for (auto& w: closeWaiters) w->fulfill(saved.clone());
  closeWaiters.clear();
  if (server && !handshakeReported) {
    if (endpoint != nullptr) endpoint->handshakeFailed(*this);
  }
}

void ConnectionImpl::sendRefused(int error) {
  if (refusing || closeInfo != nullptr) return;
  refusing = true;
  tasks.add(kj::evalLater([this, error]() {
    auto info = makeClose(CloseKind::SEND_REFUSED, 0, "", kj::str(
        ": sendmsg to ", remote, " failed: ", strerror(error), " (", errnoName(error),
        "); a firewall, security policy or route on this host forbids UDP to that address"));
    info.sendErrno = error;
    die(kj::mv(info));
  }));
}

void ConnectionImpl::endpointGone() {
  die(makeClose(CloseKind::ENDPOINT_GONE, 0, "",
                kj::str(": the local UDP socket was closed while the connection was open")));
  endpoint = nullptr;
}

// ---- application calls

kj::Promise<void> ConnectionImpl::whenHandshaken() {
  auto paf = kj::newPromiseAndFulfiller<void>();
  handshakeFulfiller = kj::mv(paf.fulfiller);
  scheduleFlush();   // sends the first Initial
  return kj::mv(paf.promise);
}

kj::Own<Stream> ConnectionImpl::makeHandle(kj::Own<StreamState> state) {
  return kj::heap<StreamHandle>(kj::addRef(*this), kj::mv(state));
}

kj::Promise<kj::Own<Stream>> ConnectionImpl::openStream() {
  if (closeInfo != nullptr) return closeException();
  if (openWaiters.empty() && ngtcp2_conn_get_streams_bidi_left(conn) > 0) {
    auto state = kj::refcounted<StreamState>(*this, 0, true);
    int64_t id;
    int rv = ngtcp2_conn_open_bidi_stream(conn, &id, state.get());
    if (rv == 0) {
      state->id = id;
      ++streamsLocal;
      streams.insert(id, kj::addRef(*state));
      return makeHandle(kj::mv(state));
    }
    if (rv != NGTCP2_ERR_STREAM_ID_BLOCKED) {
      return failed(kj::str("QUIC openStream: ", ngtcp2_strerror(rv)));
    }
  }
  auto paf = kj::newPromiseAndFulfiller<kj::Own<Stream>>();
  openWaiters.push_back(kj::mv(paf.fulfiller));
  return kj::mv(paf.promise);
}

void ConnectionImpl::openWaiting() {
  openScheduled = false;
  while (closeInfo == nullptr && !openWaiters.empty() &&
         ngtcp2_conn_get_streams_bidi_left(conn) > 0) {
    auto fulfiller = kj::mv(openWaiters.front());
    openWaiters.pop_front();
    if (!fulfiller->isWaiting()) continue;
    auto state = kj::refcounted<StreamState>(*this, 0, true);
    int64_t id;
    int rv = ngtcp2_conn_open_bidi_stream(conn, &id, state.get());
    if (rv != 0) {
      openWaiters.push_front(kj::mv(fulfiller));
      break;
    }
    state->id = id;
    ++streamsLocal;
    streams.insert(id, kj::addRef(*state));
    fulfiller->fulfill(makeHandle(kj::mv(state)));
  }
}

kj::Promise<kj::Own<Stream>> ConnectionImpl::acceptStream() {
  if (!acceptQueue.empty()) {
    auto state = kj::mv(acceptQueue.front());
    acceptQueue.pop_front();
    return makeHandle(kj::mv(state));
  }
  if (closeInfo != nullptr) return closeException();
  auto paf = kj::newPromiseAndFulfiller<kj::Own<Stream>>();
  acceptWaiters.push_back(kj::mv(paf.fulfiller));
  return kj::mv(paf.promise);
}

void ConnectionImpl::close(uint64_t code, kj::StringPtr reason) {
  if (closeInfo != nullptr) return;
  ngtcp2_connection_close_error ccerr;
  ngtcp2_connection_close_error_set_application_error(
      &ccerr, code, reinterpret_cast<const uint8_t*>(reason.begin()), reason.size());
  // Flush what is pending first so that the peer gets our last data before the close.
  flush();
  if (closeInfo != nullptr) return;
  sendClose(ccerr);
  die(makeClose(CloseKind::LOCAL_CLOSE, code, reason,
                kj::str(" with application error ", code, " \"", reason, "\"")));
}

kj::Promise<CloseInfo> ConnectionImpl::onClosed() {
  KJ_IF_MAYBE(info, closeInfo) return info->clone();
  auto paf = kj::newPromiseAndFulfiller<CloseInfo>();
  closeWaiters.add(kj::mv(paf.fulfiller));
  return kj::mv(paf.promise);
}

kj::Maybe<const CloseInfo&> ConnectionImpl::getCloseInfo() const {
  KJ_IF_MAYBE(info, closeInfo) return *info;
  return nullptr;
}

ConnectionStats ConnectionImpl::stats() const {
  ConnectionStats s;
  if (conn != nullptr) {
    ngtcp2_conn_stat stat;
    ngtcp2_conn_get_conn_stat(conn, &stat);
    s.smoothedRtt = stat.smoothed_rtt * kj::NANOSECONDS;
    s.minRtt = (stat.min_rtt == UINT64_MAX ? 0 : stat.min_rtt) * kj::NANOSECONDS;
    s.latestRtt = stat.latest_rtt * kj::NANOSECONDS;
    s.ptoCount = stat.pto_count;
    s.congestionWindow = stat.cwnd;
    s.bytesInFlight = stat.bytes_in_flight;
  }
  s.bytesSent = bytesSent;
  s.bytesReceived = bytesReceived;
  s.packetsSent = packetsSent;
  s.packetsReceived = packetsReceived;
  s.ptoTotal = ptoTotal;
  s.streamsOpenedLocal = streamsLocal;
  s.streamsOpenedRemote = streamsRemote;
  s.streamsActive = streams.size();
  s.datagramsDropped = datagramsDropped;
  s.datagramsSent = datagramsSent;
  s.datagramsSendDropped = datagramsSendDropped;
  s.recvBufferedBytes = recvBuffered;
  s.sendBufferedBytes = sendBuffered;
  s.sendOverBudget = sendOverBudget;
  if (connBlockedSince != 0 && closeInfo == nullptr) {
    uint64_t now = nowNs();
    if (now > connBlockedSince) s.connectionBlockedFor = (now - connBlockedSince) * kj::NANOSECONDS;
  }
  return s;
}

}  // namespace cfqt::quic::_
