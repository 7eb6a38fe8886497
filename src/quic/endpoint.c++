// EndpointImpl: the UDP socket (recvmmsg with GRO, sendmmsg with GSO, edge-triggered drain),
// routing packets to connections by connection ID, the server role (listen, handshaking
// connections, accept queue) and stateless resets; and newEndpoint().

#include "quic/internal.h"

#include "loop/spinner.h"

#include <ngtcp2/ngtcp2.h>
#include <ngtcp2/ngtcp2_crypto.h>
#include <gnutls/gnutls.h>

#include <kj/debug.h>

#include <errno.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif
#ifndef UDP_GRO
#define UDP_GRO 104
#endif

namespace cfqt::quic {

// =======================================================================================
// EndpointImpl implementation

namespace {

int openSocket(const SocketAddress& bindAddress) {
  int fd;
  KJ_SYSCALL(fd = socket(bindAddress.isIpv6() ? AF_INET6 : AF_INET,
                         SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  kj::AutoCloseFd owned(fd);
  if (bindAddress.isIpv6()) {
    int off = 0;
    setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &off, sizeof(off));
  }
  KJ_SYSCALL(bind(fd, reinterpret_cast<const sockaddr*>(bindAddress.sockaddr()),
                  bindAddress.length()), bindAddress);
  return owned.release();
}

}  // namespace

namespace _ {

EndpointImpl::EndpointImpl(kj::UnixEventPort& eventPort, SocketAddress bindAddress)
    : eventPort(eventPort), fd(openSocket(bindAddress)),
      observer(eventPort, fd, kj::UnixEventPort::FdObserver::OBSERVE_READ_WRITE),
      rxBuffers(kj::heapArray<kj::byte>(RX_MSGS * RX_BUFFER)), tasks(*this) {
  struct sockaddr_storage addr;
  socklen_t len = sizeof(addr);
  KJ_SYSCALL(getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len));
  local = SocketAddress::fromSockaddr(&addr, len);
  randomBytes(resetSecret, sizeof(resetSecret));

  int size = 8 * 1024 * 1024;
  setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof(size));
  setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof(size));
  int got = 0;
  socklen_t gotLen = sizeof(got);
  getsockopt(fd, SOL_SOCKET, SO_RCVBUF, &got, &gotLen);
  statsData.receiveBufferBytes = got;
  gotLen = sizeof(got);
  getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &got, &gotLen);
  statsData.sendBufferBytes = got;
  int on = 1;
  statsData.gro = setsockopt(fd, IPPROTO_UDP, UDP_GRO, &on, sizeof(on)) == 0;
  statsData.gso = gso;
  observe::logDebug("QUIC endpoint bound", observe::Fields().add("local", kj::str(local))
      .add("receiveBufferBytes", statsData.receiveBufferBytes)
      .add("sendBufferBytes", statsData.sendBufferBytes).add("gro", statsData.gro));

  for (size_t i = 0; i < RX_MSGS; i++) {
    rxIov[i].iov_base = rxBuffers.begin() + i * RX_BUFFER;
    rxIov[i].iov_len = RX_BUFFER;
  }
  tasks.add(receiveLoop());
}

EndpointImpl::~EndpointImpl() noexcept(false) {
  handshaking.clear();
  acceptQueue.clear();
  auto copy = KJ_MAP(c, live) { return c; };
  for (auto c: copy) c->endpointGone();
  live.clear();
  if (serverCredentials != nullptr) gnutls_certificate_free_credentials(serverCredentials);
}

void EndpointImpl::forget(ConnectionImpl& conn) {
  for (size_t i = 0; i < live.size(); i++) {
    if (live[i] == &conn) {
      live[i] = live.back();
      live.removeLast();
      break;
    }
  }
  for (size_t i = 0; i < touched.size(); i++) {
    if (touched[i] == &conn) touched[i] = nullptr;
  }
  for (size_t i = 0; i < waitingWritable.size(); i++) {
    if (waitingWritable[i] == &conn) waitingWritable[i] = nullptr;
  }
  if (txBatch.owner == &conn) txBatch.owner = nullptr;
}

kj::Promise<kj::Own<Connection>> EndpointImpl::dial(SocketAddress remote, ClientConfig config) {
  return kj::evalNow([&]() {
    auto conn = kj::refcounted<ConnectionImpl>(*this, false, remote, kj::mv(config.transport));
    live.add(conn.get());
    conn->initClient(config);
    auto handshake = conn->whenHandshaken();
    return handshake.then([conn = kj::mv(conn)]() mutable -> kj::Own<Connection> {
      return kj::heap<ConnectionHandle>(kj::mv(conn));
    });
  });
}

void EndpointImpl::listen(ServerConfig config) {
  KJ_REQUIRE(server == nullptr, "listen() called twice");
  if (config.alpn.size() == 0) {
    kj::throwFatalException(failed(kj::str("QUIC listen: at least one ALPN protocol is required")));
  }
  checkGnutls(gnutls_certificate_allocate_credentials(&serverCredentials), "credentials");
  int rv;
  KJ_IF_MAYBE(certFile, config.certFile) {
    KJ_IF_MAYBE(keyFile, config.keyFile) {
      rv = gnutls_certificate_set_x509_key_file(serverCredentials, certFile->cStr(),
                                                keyFile->cStr(), GNUTLS_X509_FMT_PEM);
      if (rv < 0) {
        kj::throwFatalException(failed(kj::str("QUIC listen: cannot load certificate '",
            *certFile, "' / key '", *keyFile, "': ", gnutls_strerror(rv))));
      }
    } else {
      kj::throwFatalException(failed(kj::str("QUIC listen: certFile needs keyFile")));
    }
  } else {
    KJ_IF_MAYBE(certPem, config.certPem) {
      KJ_IF_MAYBE(keyPem, config.keyPem) {
        gnutls_datum_t c = {reinterpret_cast<unsigned char*>(const_cast<char*>(certPem->cStr())),
                            static_cast<unsigned>(certPem->size())};
        gnutls_datum_t k = {reinterpret_cast<unsigned char*>(const_cast<char*>(keyPem->cStr())),
                            static_cast<unsigned>(keyPem->size())};
        rv = gnutls_certificate_set_x509_key_mem(serverCredentials, &c, &k, GNUTLS_X509_FMT_PEM);
        if (rv < 0) {
          kj::throwFatalException(failed(kj::str("QUIC listen: cannot load certificate/key PEM: ",
                                                 gnutls_strerror(rv))));
        }
      } else {
        kj::throwFatalException(failed(kj::str("QUIC listen: certPem needs keyPem")));
      }
    } else {
      kj::throwFatalException(failed(kj::str("QUIC listen: no certificate configured")));
    }
  }
  server = kj::mv(config);
}

kj::Promise<kj::Own<Connection>> EndpointImpl::accept() {
  if (!acceptQueue.empty()) {
    auto conn = kj::mv(acceptQueue.front());
    acceptQueue.pop_front();
    return kj::Own<Connection>(kj::heap<ConnectionHandle>(kj::mv(conn)));
  }
  auto paf = kj::newPromiseAndFulfiller<kj::Own<Connection>>();
  acceptWaiters.push_back(kj::mv(paf.fulfiller));
  return kj::mv(paf.promise);
}

void EndpointImpl::removeHandshaking(ConnectionImpl& conn, kj::Own<ConnectionImpl>* out) {
  for (size_t i = 0; i < handshaking.size(); i++) {
    if (handshaking[i].get() == &conn) {
      auto own = kj::mv(handshaking[i]);
      handshaking[i] = kj::mv(handshaking.back());
      handshaking.removeLast();
      if (out != nullptr) {
        *out = kj::mv(own);
      } else {
        // Destroy later: we may be inside this connection's call stack.
        tasks.add(kj::evalLater([own = kj::mv(own)]() {}));
      }
      return;
    }
  }
}

void EndpointImpl::handshakeDone(ConnectionImpl& conn) {
  kj::Own<ConnectionImpl> own;
  removeHandshaking(conn, &own);
  if (own.get() == nullptr) return;
  while (!acceptWaiters.empty()) {
    auto fulfiller = kj::mv(acceptWaiters.front());
    acceptWaiters.pop_front();
    if (fulfiller->isWaiting()) {
      fulfiller->fulfill(kj::heap<ConnectionHandle>(kj::mv(own)));
      return;
    }
  }
  if (acceptQueue.size() >= serverConfig().maxPendingConnections) {
    own->close(0x2, "too many pending connections");
    tasks.add(kj::evalLater([own = kj::mv(own)]() {}));
    return;
  }
  acceptQueue.push_back(kj::mv(own));
}

void EndpointImpl::handshakeFailed(ConnectionImpl& conn) {
  ++statsData.handshakesFailed;
  removeHandshaking(conn, nullptr);
}

kj::Promise<void> EndpointImpl::receiveLoop() {
  for (size_t turn = 0; turn < RX_BATCHES_PER_TURN; turn++) {
    for (size_t i = 0; i < RX_MSGS; i++) {
      auto& hdr = rxMsgs[i].msg_hdr;
      hdr.msg_name = &rxAddrs[i];
      hdr.msg_namelen = sizeof(rxAddrs[i]);
      hdr.msg_iov = &rxIov[i];
      hdr.msg_iovlen = 1;
      hdr.msg_control = rxControl[i];
      hdr.msg_controllen = sizeof(rxControl[i]);
      hdr.msg_flags = 0;
    }
    int n;
    KJ_NONBLOCKING_SYSCALL(n = recvmmsg(fd, rxMsgs, RX_MSGS, 0, nullptr));
    if (n < 0) {
      return observer.whenBecomesReadable().then([this]() { return receiveLoop(); });
    }
    loop::kick();   // a busy-polling loop (loop/spinner.h) polls for what follows
    receiveBatch(n);
    if (size_t(n) < RX_MSGS) {
      // Short batch: the queue was empty when recvmmsg returned, so any later datagram raises a
      // new edge. No event can be dispatched between here and the registration below (both run
      // in this turn), so waiting now loses nothing and saves a recvmmsg returning EAGAIN.
      return observer.whenBecomesReadable().then([this]() { return receiveLoop(); });
    }
  }
  return kj::evalLater([this]() { return receiveLoop(); });
}

void EndpointImpl::receiveBatch(size_t n) {
  uint64_t ts = nowNs();
  for (size_t i = 0; i < n; i++) {
    auto& hdr = rxMsgs[i].msg_hdr;
    size_t len = rxMsgs[i].msg_len;
    size_t segment = len;
    for (auto cmsg = CMSG_FIRSTHDR(&hdr); cmsg != nullptr; cmsg = CMSG_NXTHDR(&hdr, cmsg)) {
      if (cmsg->cmsg_level == SOL_UDP && cmsg->cmsg_type == UDP_GRO) {
        int gsoSize;
        memcpy(&gsoSize, CMSG_DATA(cmsg), sizeof(gsoSize));
        if (gsoSize > 0) segment = gsoSize;
      }
    }
    if (rxAddrs[i].ss_family != AF_INET && rxAddrs[i].ss_family != AF_INET6) continue;
    auto from = SocketAddress::fromSockaddr(&rxAddrs[i], hdr.msg_namelen);
    auto data = static_cast<const kj::byte*>(rxIov[i].iov_base);
    for (size_t off = 0; off < len; off += segment) {
      size_t k = kj::min(segment, len - off);
      ++statsData.datagramsReceived;
      statsData.bytesReceived += k;
      (void)ts;
      onPacket(from, kj::arrayPtr(data + off, k));
    }
  }
  // Flush every connection that received something (ACKs, window updates), once the
  // application has reacted, so that its responses leave in the same packets.
  for (size_t i = 0; i < touched.size(); i++) {
    auto c = touched[i];
    if (c == nullptr) continue;
    c->touched = false;
    c->deliverReads();
    c->scheduleAckFlush();
  }
  touched.clear();
}

void EndpointImpl::onPacket(const SocketAddress& from, kj::ArrayPtr<const kj::byte> packet) {
  ngtcp2_version_cid vc;
  int rv = ngtcp2_pkt_decode_version_cid(&vc, packet.begin(), packet.size(), SCID_LEN);
  if (rv != 0) {
    ++statsData.datagramsDropped;   // includes version negotiation requests (v1 only)
    return;
  }
  CidKey key(vc.dcid, vc.dcidlen);
  KJ_IF_MAYBE(conn, routes.find(key)) {
    auto c = *conn;
    c->onPacket(from, packet, nowNs());
    if (!c->touched) {
      c->touched = true;
      touched.add(c);
    }
    return;
  }
  bool longHeader = (packet[0] & 0x80) != 0;
  if (longHeader) {
    if (server != nullptr) {
      acceptNew(from, packet);
    } else {
      ++statsData.datagramsDropped;
    }
    return;
  }
  if (server == nullptr) {
    // A stateless reset carries a random DCID: it can only be recognised by the connection that
    // holds the peer's token. A client endpoint has few connections: offer it to each (ngtcp2
    // discards what it cannot decrypt), and never answer with a reset of its own, which would
    // let two endpoints bounce resets.
    for (size_t i = 0; i < live.size(); i++) {
      auto c = live[i];
      if (!c->remote.operator==(from)) continue;
      c->onPacket(from, packet, nowNs());
      if (!c->touched) {
        c->touched = true;
        touched.add(c);
      }
    }
    ++statsData.datagramsDropped;
    return;
  }
  sendStatelessReset(from, vc.dcid, vc.dcidlen, packet.size());
}

void EndpointImpl::acceptNew(const SocketAddress& from, kj::ArrayPtr<const kj::byte> packet) {
  ngtcp2_pkt_hd hd;
  if (ngtcp2_accept(&hd, packet.begin(), packet.size()) != 0) {
    ++statsData.datagramsDropped;
    return;
  }
  auto& cfg = serverConfig();
  auto conn = kj::refcounted<ConnectionImpl>(*this, true, from, cfg.transport);
  live.add(conn.get());
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() { conn->initServer(hd, cfg); })) {
    observe::logError("QUIC server connection setup failed", observe::Fields().error(*e));
    ++statsData.handshakesFailed;
    return;
  }
  auto& ref = *conn;
  handshaking.add(kj::mv(conn));
  ref.onPacket(from, packet, nowNs());
  if (!ref.touched) {
    ref.touched = true;
    touched.add(&ref);
  }
}

void EndpointImpl::sendStatelessReset(const SocketAddress& from, const kj::byte* dcid,
                                      size_t dcidLen, size_t packetLen) {
  // RFC 9000 §10.3: smaller than the packet that triggered it, at least 41 bytes.
  if (packetLen < 43 || dcidLen == 0) {
    ++statsData.datagramsDropped;
    return;
  }
  ngtcp2_cid cid;
  ngtcp2_cid_init(&cid, dcid, dcidLen);
  kj::byte token[NGTCP2_STATELESS_RESET_TOKENLEN];
  if (ngtcp2_crypto_generate_stateless_reset_token(token, resetSecret, sizeof(resetSecret),
                                                   &cid) != 0) {
    return;
  }
  kj::byte randBytes[64];
  size_t randLen = kj::min(sizeof(randBytes), packetLen - 1 - NGTCP2_STATELESS_RESET_TOKENLEN);
  randomBytes(randBytes, randLen);
  kj::byte buf[128];
  auto n = ngtcp2_pkt_write_stateless_reset(buf, sizeof(buf), token, randBytes, randLen);
  if (n <= 0) return;
  ++statsData.statelessResetsSent;
  sendOne(from, kj::arrayPtr(buf, n));
}

bool EndpointImpl::sendBatch() {
  auto& b = txBatch;
  while (b.sentPackets < b.count) {
    struct mmsghdr msgs[TX_BATCH_PACKETS];
    struct iovec iovs[TX_BATCH_PACKETS];
    char control[TX_BATCH_PACKETS][CMSG_SPACE(sizeof(uint16_t))];
    size_t nmsgs = 0;
    size_t packetIndex = b.sentPackets;
    size_t offset = b.sentBytes;
    size_t firstPacketOf[TX_BATCH_PACKETS + 1];
    size_t firstOffsetOf[TX_BATCH_PACKETS + 1];
    while (packetIndex < b.count) {
      size_t segSize = b.sizes[packetIndex];
      size_t segs = 1;
      size_t bytes = segSize;
      if (gso) {
        while (packetIndex + segs < b.count && segs < GSO_MAX_SEGMENTS &&
               b.sizes[packetIndex + segs] <= segSize && bytes + b.sizes[packetIndex + segs] < 65000) {
          bytes += b.sizes[packetIndex + segs];
          bool shorter = b.sizes[packetIndex + segs] < segSize;
          ++segs;
          if (shorter) break;   // only the last segment may be shorter
        }
      }
      auto& msg = msgs[nmsgs];
      memset(&msg, 0, sizeof(msg));
      iovs[nmsgs].iov_base = b.buffer.begin() + offset;
      iovs[nmsgs].iov_len = bytes;
      msg.msg_hdr.msg_name = const_cast<void*>(b.dest.sockaddr());
      msg.msg_hdr.msg_namelen = b.dest.length();
      msg.msg_hdr.msg_iov = &iovs[nmsgs];
      msg.msg_hdr.msg_iovlen = 1;
      if (segs > 1) {
        msg.msg_hdr.msg_control = control[nmsgs];
        msg.msg_hdr.msg_controllen = CMSG_SPACE(sizeof(uint16_t));
        auto cmsg = CMSG_FIRSTHDR(&msg.msg_hdr);
        cmsg->cmsg_level = SOL_UDP;
        cmsg->cmsg_type = UDP_SEGMENT;
        cmsg->cmsg_len = CMSG_LEN(sizeof(uint16_t));
        uint16_t size16 = segSize;
        memcpy(CMSG_DATA(cmsg), &size16, sizeof(size16));
      }
      firstPacketOf[nmsgs] = packetIndex;
      firstOffsetOf[nmsgs] = offset;
      ++nmsgs;
      packetIndex += segs;
      offset += bytes;
    }
    firstPacketOf[nmsgs] = packetIndex;
    firstOffsetOf[nmsgs] = offset;
    int n;
    int error = 0;
    if (KJ_UNLIKELY(b.owner != nullptr && b.owner->transport().faultSendErrno != 0)) {
      n = -1;
      error = b.owner->transport().faultSendErrno;
    } else {
      n = sendmmsg(fd, msgs, nmsgs, 0);
      if (n < 0) error = errno;
    }
    if (n > 0) loop::kick();   // an answer often follows (loop/spinner.h)
    if (n < 0) {
      if (error == EINTR) continue;
      if (error == EAGAIN || error == EWOULDBLOCK || error == ENOBUFS) {
        ++statsData.sendBlocked;
        blocked = true;
        if (error == ENOBUFS) {
          // No writability edge will come for ENOBUFS: retry on the next turn.
          tasks.add(kj::evalLater([this]() {
            blocked = false;
            if (!sendBatch()) return;
            auto waiting = kj::mv(waitingWritable);
            for (auto c: waiting) {
              if (c != nullptr) {
                c->waitingWritable = false;
                c->flush();
              }
            }
          }));
          return false;
        }
        if (!writableWaiting) {
          writableWaiting = true;
          tasks.add(writableLoop());
        }
        return false;
      }
      if ((error == EIO || error == EINVAL) && gso) {
        gso = false;   // no GSO on this path: resend as single packets
        statsData.gso = false;
        continue;
      }
      if (isSendRefusal(error)) {
        // This host forbids the destination (firewall, policy, route): every datagram will
        // fail the same way, so the connection ends now with the reason, and its owner can
        // choose another way (HTTP/2) at once instead of after a timeout.
        ++statsData.sendsRefused;
        statsData.sendRefusedErrno = error;
        if (b.owner != nullptr) b.owner->sendRefused(error);
      } else {
        // Other errors (EMSGSIZE...): drop the batch (QUIC recovers or times out).
        observe::logWarn("QUIC sendmmsg failed", observe::Fields().add("error", strerror(error))
            .add("dest", kj::str(b.dest)));
      }
      b.sentPackets = b.count;
      break;
    }
    for (int i = 0; i < n; i++) {
      size_t pkts = firstPacketOf[i + 1] - firstPacketOf[i];
      statsData.datagramsSent += pkts;
      statsData.bytesSent += firstOffsetOf[i + 1] - firstOffsetOf[i];
    }
    b.sentPackets = firstPacketOf[n];
    b.sentBytes = firstOffsetOf[n];
  }
  b.count = 0;
  b.bytes = 0;
  b.sentPackets = 0;
  b.sentBytes = 0;
  return true;
}

kj::Promise<void> EndpointImpl::writableLoop() {
  return observer.whenBecomesWritable().then([this]() -> kj::Promise<void> {
    writableWaiting = false;
    blocked = false;
    if (!sendBatch()) return kj::READY_NOW;   // sendBatch re-armed the wait
    auto waiting = kj::mv(waitingWritable);
    for (auto c: waiting) {
      if (c != nullptr) {
        c->waitingWritable = false;
        c->flush();
      }
    }
    return kj::READY_NOW;
  });
}

void EndpointImpl::waitWritable(ConnectionImpl& conn) {
  if (conn.waitingWritable) return;
  conn.waitingWritable = true;
  waitingWritable.add(&conn);
}

void EndpointImpl::sendOne(const SocketAddress& dest, kj::ArrayPtr<const kj::byte> packet) {
  ssize_t n = sendto(fd, packet.begin(), packet.size(), 0,
                     reinterpret_cast<const sockaddr*>(dest.sockaddr()), dest.length());
  if (n > 0) {
    ++statsData.datagramsSent;
    statsData.bytesSent += n;
  }
}

}  // namespace _

kj::Own<Endpoint> newEndpoint(kj::UnixEventPort& eventPort, SocketAddress bindAddress) {
  return kj::heap<_::EndpointImpl>(eventPort, bindAddress);
}

}  // namespace cfqt::quic
