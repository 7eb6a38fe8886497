// QUIC on ngtcp2 0.12 + GnuTLS 3.7, driven by the KJ event loop: the Endpoint (UDP socket,
// routing by connection ID, GSO/GRO batches), the Connection (ngtcp2_conn + gnutls session, one
// timerfd) and the Streams (flow-controlled buffers exposed as kj::AsyncIoStream).
//
// Rules this file follows (see STYLE.md §3 and the QUIC notes):
// - ngtcp2/GnuTLS callbacks never let an exception escape: each is wrapped in `guard()`, which
//   stores the exception and returns NGTCP2_ERR_CALLBACK_FAILURE.
// - Callbacks only change state and fulfil promises; ngtcp2 calls that write packets
//   (read_pkt, writev_stream, write_connection_close) happen only from the receive loop, the
//   timer, the flush task and application calls, never from inside a callback. Fulfilling a
//   promise never runs its continuation synchronously, so application code never runs inside a
//   callback either.

#include "quic/endpoint.h"

#include <ngtcp2/ngtcp2.h>
#include <ngtcp2/ngtcp2_crypto.h>
#include <ngtcp2/ngtcp2_crypto_gnutls.h>
#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>
#include <gnutls/x509.h>

#include <kj/debug.h>
#include <kj/map.h>
#include <kj/vector.h>

#include <deque>

#include <errno.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif
#ifndef UDP_GRO
#define UDP_GRO 104
#endif

namespace cfqt::quic {

// =======================================================================================
// CloseKind / CloseInfo

namespace {

struct KindInfo {
  CloseKind kind;
  kj::StringPtr name;
  kj::StringPtr prefix;   // every description of this kind starts with it
  kj::Exception::Type type;
};

const KindInfo KIND_INFO[] = {
  {CloseKind::LOCAL_CLOSE, "LOCAL_CLOSE", "QUIC connection closed locally",
      kj::Exception::Type::DISCONNECTED},
  {CloseKind::PEER_APPLICATION_CLOSE, "PEER_APPLICATION_CLOSE",
      "QUIC connection closed by the peer with application error",
      kj::Exception::Type::DISCONNECTED},
  {CloseKind::PEER_TRANSPORT_CLOSE, "PEER_TRANSPORT_CLOSE",
      "QUIC connection closed by the peer with transport error",
      kj::Exception::Type::DISCONNECTED},
  {CloseKind::IDLE_TIMEOUT, "IDLE_TIMEOUT", "QUIC idle timeout", kj::Exception::Type::DISCONNECTED},
  {CloseKind::HANDSHAKE_TIMEOUT, "HANDSHAKE_TIMEOUT", "QUIC handshake timeout",
      kj::Exception::Type::OVERLOADED},
  {CloseKind::TLS_LOCAL_FAILURE, "TLS_LOCAL_FAILURE", "QUIC TLS handshake failed",
      kj::Exception::Type::FAILED},
  {CloseKind::TLS_PEER_ALERT, "TLS_PEER_ALERT", "QUIC TLS handshake rejected by the peer",
      kj::Exception::Type::FAILED},
  {CloseKind::TLS_ALPN, "TLS_ALPN", "QUIC ALPN mismatch", kj::Exception::Type::FAILED},
  {CloseKind::STATELESS_RESET, "STATELESS_RESET", "QUIC stateless reset",
      kj::Exception::Type::DISCONNECTED},
  {CloseKind::ENDPOINT_GONE, "ENDPOINT_GONE", "QUIC endpoint destroyed",
      kj::Exception::Type::DISCONNECTED},
  {CloseKind::INTERNAL_ERROR, "INTERNAL_ERROR", "QUIC connection failed",
      kj::Exception::Type::FAILED},
};

const KindInfo& kindInfo(CloseKind kind) {
  for (auto& info: KIND_INFO) {
    if (info.kind == kind) return info;
  }
  KJ_UNREACHABLE;
}

kj::StringPtr alertName(uint8_t alert) {
  const char* name = gnutls_alert_get_name(static_cast<gnutls_alert_description_t>(alert));
  return name == nullptr ? kj::StringPtr("unknown") : kj::StringPtr(name);
}

kj::StringPtr alertHint(uint8_t alert) {
  switch (alert) {
    case 120: return "the peers have no ALPN protocol in common; check the ALPN both sides use";
    case 40: return "no common cipher suite / key-exchange group (the server must accept P-256)";
    case 42: case 43: case 44: case 45: case 46: case 48:
      return "the peer rejected the certificate; check the CA it trusts and the name (SNI)";
    case 112: return "the server does not know the name sent in SNI";
    default: return "check both sides' TLS configuration";
  }
}

CloseInfo makeClose(CloseKind kind, uint64_t code, kj::StringPtr reason, kj::String detail) {
  CloseInfo info;
  info.kind = kind;
  info.code = code;
  info.reason = kj::heapString(reason);
  info.description = kj::str(kindInfo(kind).prefix, detail);
  return info;
}

}  // namespace

kj::StringPtr KJ_STRINGIFY(CloseKind kind) {
  return kindInfo(kind).name;
}

kj::Exception CloseInfo::toException() const {
  return kj::Exception(kindInfo(kind).type, __FILE__, __LINE__, kj::heapString(description));
}

CloseInfo CloseInfo::clone() const {
  CloseInfo copy;
  copy.kind = kind;
  copy.code = code;
  copy.tlsAlert = tlsAlert;
  copy.reason = kj::heapString(reason);
  copy.description = kj::heapString(description);
  return copy;
}

kj::Maybe<CloseKind> classifyException(const kj::Exception& e) {
  kj::StringPtr desc = e.getDescription();
  for (auto& info: KIND_INFO) {
    if (desc.startsWith(info.prefix)) return info.kind;
  }
  return nullptr;
}

namespace {

// =======================================================================================
// Small helpers

constexpr size_t SCID_LEN = 18;
constexpr size_t MAX_PACKET = 1500;             // per-packet buffer (max_udp_payload_size <= it)
constexpr size_t TX_BATCH_PACKETS = 64;         // packets per flush batch
constexpr size_t GSO_MAX_SEGMENTS = 44;         // 44 x 1452 < 64 KiB
constexpr size_t RX_MSGS = 8;                   // recvmmsg batch (x RX_BUFFER: 512 KiB per endpoint)
constexpr size_t RX_BUFFER = 65536;             // one GRO super-datagram
constexpr size_t RX_BATCHES_PER_TURN = 8;
constexpr size_t RX_BLOCK = 64 * 1024;          // receive buffer block
constexpr size_t TX_BLOCK = 16 * 1024;          // send buffer block (a stalled stream holds few)
constexpr size_t MAX_IOV = 16;
constexpr size_t MAX_QUEUED_DATAGRAMS = 256;    // sendDatagram() payloads waiting for a packet
// Bytes of a short-header packet that are not frames: first byte, destination CID (<= 20),
// packet number (<= 4), AEAD tag (16). And of a DATAGRAM frame around its payload: type +
// length varint (2 bytes for any payload that fits a packet).
constexpr size_t SHORT_PACKET_OVERHEAD = 1 + NGTCP2_MAX_CIDLEN + 4 + 16;
constexpr size_t DATAGRAM_FRAME_OVERHEAD = 1 + 2;

uint64_t nowNs() {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return uint64_t(ts.tv_sec) * 1000000000ull + ts.tv_nsec;
}

uint64_t toNs(kj::Duration d) {
  return d / kj::NANOSECONDS;
}

void randomBytes(kj::byte* out, size_t n) {
  if (gnutls_rnd(GNUTLS_RND_RANDOM, out, n) != 0) {
    KJ_FAIL_ASSERT("gnutls_rnd failed");
  }
}

struct CidKey {
  uint8_t len = 0;
  kj::byte data[NGTCP2_MAX_CIDLEN] = {};

  CidKey() = default;
  CidKey(const kj::byte* p, size_t n): len(kj::min(n, size_t(NGTCP2_MAX_CIDLEN))) {
    memcpy(data, p, len);
  }
  explicit CidKey(const ngtcp2_cid& cid): CidKey(cid.data, cid.datalen) {}

  bool operator==(const CidKey& other) const {
    return len == other.len && memcmp(data, other.data, len) == 0;
  }
  uint hashCode() const { return kj::hashCode(kj::arrayPtr(data, len)); }
};

kj::Exception disconnected(kj::String text) {
  return kj::Exception(kj::Exception::Type::DISCONNECTED, __FILE__, __LINE__, kj::mv(text));
}

kj::Exception failed(kj::String text) {
  return kj::Exception(kj::Exception::Type::FAILED, __FILE__, __LINE__, kj::mv(text));
}

class EndpointImpl;
class ConnectionImpl;

// =======================================================================================
// StreamState: the buffers of one stream, shared by the connection (while ngtcp2 knows the
// stream) and the application's Stream handle.

size_t blockSize(size_t needed, size_t previous, size_t cap) {
  // At least what is needed (up to `cap`), at least twice the previous block, 256 bytes minimum.
  return kj::min(cap, kj::max(kj::max(needed, previous * 2), size_t(256)));
}

struct Block {
  kj::Array<kj::byte> data;
  size_t begin = 0;   // receive blocks: first unread byte
  size_t end = 0;     // bytes filled
};

class BlockQueue {
  // A FIFO of blocks that allocates nothing while empty (std::deque allocates on construction,
  // which costs several mallocs per stream).
public:
  bool empty() const { return head == blocks.size(); }
  size_t size() const { return blocks.size() - head; }
  Block& front() { return blocks[head]; }
  Block& back() { return blocks.back(); }
  void push_back(Block&& block) {
    if (head > 0 && head == blocks.size()) clear();
    if (head >= 16 && head * 2 >= blocks.size()) {
      for (size_t i = head; i < blocks.size(); i++) blocks[i - head] = kj::mv(blocks[i]);
      blocks.resize(blocks.size() - head);
      head = 0;
    }
    blocks.add(kj::mv(block));
  }
  void pop_front() {
    blocks[head].data = nullptr;
    if (++head == blocks.size()) clear();
  }
  void clear() {
    blocks.clear();
    head = 0;
  }
  Block* begin() { return blocks.begin() + head; }
  Block* end() { return blocks.end(); }

private:
  kj::Vector<Block> blocks;
  size_t head = 0;
};

class StreamState: public kj::Refcounted {
public:
  StreamState(ConnectionImpl& conn, int64_t id, bool local): conn(&conn), id(id), local(local) {}

  ConnectionImpl* conn;         // nullptr once the connection object is gone
  int64_t id;
  bool local;
  bool bidi = true;
  bool handleAlive = false;     // an application Stream exists (or is queued for accept)
  bool closedByNgtcp2 = false;

  // ---- receive side
  BlockQueue rx;
  uint64_t rxBuffered = 0;
  bool rxFin = false;           // FIN received (all data is in `rx`)
  bool readShut = false;        // we sent STOP_SENDING or the handle is gone: discard data
  kj::Maybe<kj::Exception> rxError;
  uint64_t rxPrepaid = 0;        // of rxBuffered: connection credit already returned at receipt
  bool creditWithheld = false;
  uint64_t creditOwed = 0;      // consumed while withheld: stream credit owed to the peer
  uint64_t connCreditOwed = 0;  // ... and connection credit owed

  struct PendingRead {
    kj::byte* buffer;
    size_t minBytes;
    size_t maxBytes;
    size_t filled;
    kj::Own<kj::PromiseFulfiller<size_t>> fulfiller;
  };
  kj::Maybe<PendingRead> pendingRead;
  bool readReady = false;       // pendingRead may complete: in ConnectionImpl::readyReads

  // ---- send side
  BlockQueue tx;         // [txBase, txEnd) of the stream; acked bytes freed from the front
  uint64_t txBase = 0;          // stream offset of tx.front().data[0]
  uint64_t txSent = 0;          // next offset to hand to ngtcp2
  uint64_t txEnd = 0;           // bytes written by the application
  uint64_t txAcked = 0;
  bool finRequested = false;
  bool finSent = false;
  bool inSendQueue = false;
  uint64_t turnBytes = 0;       // sent in this turn of the send queue's round robin
  bool flowBlocked = false;
  bool writeWatched = false;    // in ConnectionImpl::writeWatch
  bool budgetWaiting = false;   // in ConnectionImpl::budgetWaiters
  kj::Maybe<kj::Exception> txError;
  kj::Maybe<kj::ForkedPromise<void>> writeDisconnected;
  kj::Maybe<kj::Own<kj::PromiseFulfiller<void>>> writeDisconnectedFulfiller;
  bool aborted = false;         // see Stream::whenAborted()
  kj::Maybe<kj::ForkedPromise<void>> abortedPromise;
  kj::Maybe<kj::Own<kj::PromiseFulfiller<void>>> abortedFulfiller;

  void signalAborted() {
    if (aborted) return;
    aborted = true;
    KJ_IF_MAYBE(f, abortedFulfiller) {
      (*f)->fulfill();
      abortedFulfiller = nullptr;
    }
  }

  struct PendingWrite {
    kj::ArrayPtr<const kj::byte> single;
    kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces;
    size_t piece = 0;
    size_t offset = 0;
    kj::Own<kj::PromiseFulfiller<void>> fulfiller;
  };
  kj::Maybe<PendingWrite> pendingWrite;

  uint64_t txBuffered() const { return txEnd - txAcked; }
  uint64_t txUnsent() const { return txEnd - txSent; }
  bool hasUnsent() const { return txSent < txEnd || (finRequested && !finSent && !hasPendingWrite()); }
  bool hasPendingWrite() const { return pendingWrite != nullptr; }

  // Copies at most `space` bytes into the send buffer. Returns the bytes taken.
  size_t appendTx(kj::ArrayPtr<const kj::byte> bytes, uint64_t space) {
    size_t n = kj::min(uint64_t(bytes.size()), space);
    size_t done = 0;
    while (done < n) {
      if (tx.empty() || tx.back().end == tx.back().data.size()) {
        // Blocks grow from the size of the first write up to TX_BLOCK, so that a stream carrying
        // 100 bytes does not cost a 64 KiB allocation.
        size_t last = tx.empty() ? 0 : tx.back().data.size();
        Block block;
        block.data = kj::heapArray<kj::byte>(blockSize(n - done, last, TX_BLOCK));
        tx.push_back(kj::mv(block));
      }
      auto& back = tx.back();
      size_t k = kj::min(n - done, back.data.size() - back.end);
      memcpy(back.data.begin() + back.end, bytes.begin() + done, k);
      back.end += k;
      done += k;
    }
    txEnd += n;
    return n;
  }

  // Fills `vec` with unsent bytes starting at txSent. Returns the number of entries.
  size_t unsentIov(ngtcp2_vec* vec, size_t maxVec, uint64_t& total) {
    total = 0;
    size_t count = 0;
    uint64_t blockStart = txBase;
    for (auto& block: tx) {
      uint64_t blockEnd = blockStart + block.end;
      if (blockEnd > txSent) {
        size_t from = txSent > blockStart ? txSent - blockStart : 0;
        vec[count].base = block.data.begin() + from;
        vec[count].len = block.end - from;
        total += vec[count].len;
        if (++count == maxVec) break;
      }
      blockStart += block.end;   // blocks are full except the last
    }
    return count;
  }

  void onAcked(uint64_t offset, uint64_t length) {
    txAcked = kj::max(txAcked, offset + length);
    while (!tx.empty()) {
      auto& front = tx.front();
      bool full = front.end == front.data.size();
      if (!full || txBase + front.end > txAcked) break;
      txBase += front.end;
      tx.pop_front();
    }
  }

  void releaseTx() {
    tx.clear();
    txBase = txEnd;
    txAcked = txEnd;
    txSent = txEnd;
  }
};

// =======================================================================================
// EndpointImpl

struct TxBatch {
  kj::Array<kj::byte> buffer = kj::heapArray<kj::byte>(TX_BATCH_PACKETS * MAX_PACKET);
  size_t sizes[TX_BATCH_PACKETS];
  size_t count = 0;          // packets in the batch
  size_t bytes = 0;          // bytes used in `buffer`
  size_t sentPackets = 0;    // packets of the batch already sent (partial send)
  size_t sentBytes = 0;
  SocketAddress dest;
  ConnectionImpl* owner = nullptr;
};

class EndpointImpl final: public Endpoint, private kj::TaskSet::ErrorHandler {
public:
  EndpointImpl(kj::UnixEventPort& eventPort, SocketAddress bindAddress);
  ~EndpointImpl() noexcept(false);

  SocketAddress localAddress() const override { return local; }
  kj::Promise<kj::Own<Connection>> dial(SocketAddress remote, ClientConfig config) override;
  void listen(ServerConfig config) override;
  kj::Promise<kj::Own<Connection>> accept() override;
  EndpointStats stats() const override { return statsData; }

  // ---- used by ConnectionImpl
  kj::UnixEventPort& eventPort;
  SocketAddress local;
  EndpointStats statsData;
  kj::byte resetSecret[32];

  void addRoute(const CidKey& key, ConnectionImpl& conn) {
    routes.upsert(key, &conn, [](ConnectionImpl*& existing, ConnectionImpl*&& replacement) {
      existing = replacement;
    });
  }
  void removeRoute(const CidKey& key) { routes.erase(key); }
  void forget(ConnectionImpl& conn);
  void handshakeDone(ConnectionImpl& conn);
  void handshakeFailed(ConnectionImpl& conn);

  bool txBlocked() const { return blocked; }
  void waitWritable(ConnectionImpl& conn);
  TxBatch& batch() { return txBatch; }
  bool sendBatch();                 // false if the socket blocked (rest kept in the batch)
  void sendOne(const SocketAddress& dest, kj::ArrayPtr<const kj::byte> packet);

  const ServerConfig& serverConfig() { return KJ_ASSERT_NONNULL(server); }
  gnutls_certificate_credentials_t serverCred() { return serverCredentials; }

private:
  kj::AutoCloseFd fd;
  kj::UnixEventPort::FdObserver observer;
  kj::HashMap<CidKey, ConnectionImpl*> routes;
  kj::Vector<ConnectionImpl*> live;           // every ConnectionImpl on this endpoint
  kj::Vector<kj::Own<ConnectionImpl>> handshaking;  // server role, before accept()
  std::deque<kj::Own<ConnectionImpl>> acceptQueue;
  std::deque<kj::Own<kj::PromiseFulfiller<kj::Own<Connection>>>> acceptWaiters;
  kj::Maybe<ServerConfig> server;
  gnutls_certificate_credentials_t serverCredentials = nullptr;
  kj::Vector<kj::Own<gnutls_datum_t>> alpnData;

  // receive
  kj::Array<kj::byte> rxBuffers;
  struct mmsghdr rxMsgs[RX_MSGS];
  struct iovec rxIov[RX_MSGS];
  struct sockaddr_storage rxAddrs[RX_MSGS];
  char rxControl[RX_MSGS][CMSG_SPACE(sizeof(int))];
  kj::Vector<ConnectionImpl*> touched;

  // send
  TxBatch txBatch;
  bool blocked = false;
  bool writableWaiting = false;
  kj::Vector<ConnectionImpl*> waitingWritable;
  bool gso = true;

  kj::TaskSet tasks;

  void taskFailed(kj::Exception&& exception) override {
    KJ_LOG(ERROR, "QUIC endpoint task failed", exception);
  }

  kj::Promise<void> receiveLoop();
  void receiveBatch(size_t n);
  void onPacket(const SocketAddress& from, kj::ArrayPtr<const kj::byte> packet);
  void acceptNew(const SocketAddress& from, kj::ArrayPtr<const kj::byte> packet);
  void sendStatelessReset(const SocketAddress& from, const kj::byte* dcid, size_t dcidLen,
                          size_t packetLen);
  kj::Promise<void> writableLoop();
  void removeHandshaking(ConnectionImpl& conn, kj::Own<ConnectionImpl>* out);
};

// =======================================================================================
// ConnectionImpl

class StreamHandle;

class ConnectionImpl final: public kj::Refcounted, private kj::TaskSet::ErrorHandler {
public:
  ConnectionImpl(EndpointImpl& endpoint, bool isServer, SocketAddress remote,
                 TransportConfig config);
  ~ConnectionImpl() noexcept(false);
  KJ_DISALLOW_COPY(ConnectionImpl);

  void initClient(const ClientConfig& config);
  void initServer(const ngtcp2_pkt_hd& hd, const ServerConfig& config);

  // ---- endpoint side
  void onPacket(const SocketAddress& from, kj::ArrayPtr<const kj::byte> packet, uint64_t ts);
  void flush();
  void endpointGone();
  bool touched = false;
  bool waitingWritable = false;

  // ---- application side
  kj::Promise<void> whenHandshaken();
  kj::Promise<kj::Own<Stream>> openStream();
  kj::Promise<kj::Own<Stream>> acceptStream();
  void close(uint64_t code, kj::StringPtr reason);
  kj::Promise<CloseInfo> onClosed();
  kj::Maybe<const CloseInfo&> getCloseInfo() const;
  ConnectionStats stats() const;
  void goSilent() { silent = true; }
  bool sendDatagram(kj::ArrayPtr<const kj::byte> payload);
  size_t maxDatagramPayload() const;
  bool isOpen() const { return closeInfo == nullptr; }
  kj::Exception closeException() const {
    KJ_IF_MAYBE(info, closeInfo) return info->toException();
    return disconnected(kj::str("QUIC connection not open"));
  }

  bool server;
  SocketAddress remote;
  kj::String alpn;
  kj::String serverName;

  // ---- stream side (called by StreamHandle)
  void queueSend(StreamState& state);
  void credit(StreamState& state, uint64_t streamBytes, uint64_t connBytes);
  void consumed(StreamState& state, uint64_t n);
  void releaseCredit(StreamState& state);
  uint64_t discardUnread(StreamState& state);
  uint64_t sendSpace(const StreamState& state) const;
  void addSendBuffered(uint64_t n);
  void subSendBuffered(uint64_t n);
  void shutdownRead(StreamState& state, uint64_t code);
  void shutdownWrite(StreamState& state, uint64_t code);
  void scheduleFlush();
  void deliverReads();   // completes the reads that onStreamData() filled during a batch
  void watchWrites(StreamState& state);
  uint64_t recvBuffered = 0;
  uint64_t sendBuffered = 0;
  const TransportConfig& transport() const { return config; }

private:
  EndpointImpl* endpoint;
  TransportConfig config;
  ngtcp2_conn* conn = nullptr;
  gnutls_session_t session = nullptr;
  gnutls_certificate_credentials_t clientCredentials = nullptr;
  ngtcp2_crypto_conn_ref connRef;
  ngtcp2_path_storage pathStorage;
  kj::String alpnWanted;
  kj::Vector<CidKey> cids;
  bool verifyName = false;

  kj::HashMap<int64_t, kj::Own<StreamState>> streams;
  std::deque<kj::Own<StreamState>> sendQueue;
  kj::Vector<kj::Own<StreamState>> readyReads;
  kj::Vector<kj::Own<StreamState>> writeWatch;   // streams whose writer waits (see probeWrites)
  std::deque<kj::Own<StreamState>> budgetWaiters;  // writers waiting for the send budget
  bool sendOverBudget = false;  // sendBuffered reached connectionSendHigh, not yet back to Low
  uint64_t connBlockedSince = 0;  // ns: stream data waits for connection-level credit since
  bool receivedSinceProbe = false;
  std::deque<kj::Own<StreamState>> acceptQueue;
  std::deque<kj::Own<kj::PromiseFulfiller<kj::Own<Stream>>>> acceptWaiters;
  std::deque<kj::Own<kj::PromiseFulfiller<kj::Own<Stream>>>> openWaiters;
  bool openScheduled = false;

  kj::Maybe<kj::Own<kj::PromiseFulfiller<void>>> handshakeFulfiller;
  bool handshakeCompleted = false;
  bool handshakeReported = false;
  kj::Maybe<CloseInfo> closeInfo;
  kj::Vector<kj::Own<kj::PromiseFulfiller<CloseInfo>>> closeWaiters;
  kj::Maybe<kj::Exception> pendingError;
  bool statelessResetReceived = false;
  bool silent = false;
  kj::Array<kj::byte> closePacket;
  uint64_t closePacketCount = 0;

  // timer
  kj::AutoCloseFd timerFd;
  kj::Own<kj::UnixEventPort::FdObserver> timerObserver;
  uint64_t armedExpiry = UINT64_MAX;
  bool flushScheduled = false;

  // stats
  uint64_t bytesSent = 0, bytesReceived = 0, packetsSent = 0, packetsReceived = 0;
  uint64_t ptoTotal = 0, lastPto = 0;
  uint64_t streamsLocal = 0, streamsRemote = 0, datagramsDropped = 0;
  uint64_t datagramsSent = 0, datagramsSendDropped = 0;

  std::deque<kj::Array<kj::byte>> datagramQueue;   // sendDatagram() payloads, oldest first

  kj::TaskSet tasks;

  void taskFailed(kj::Exception&& exception) override {
    KJ_LOG(ERROR, "QUIC connection task failed", exception);
  }

  void setup(const ngtcp2_cid& dcid, const ngtcp2_cid& scid, uint32_t version,
             const ngtcp2_cid* originalDcid);
  void startTimer();
  kj::Promise<void> timerLoop();
  void onTimer();
  void rearm();
  void afterRead(int rv);
  void afterHandshake();
  void failWithLibError(int rv);
  void sendClose(const ngtcp2_connection_close_error& ccerr);
  void die(CloseInfo info);
  void openWaiting();
  kj::Own<Stream> makeHandle(kj::Own<StreamState> state);
  ngtcp2_ssize writePacket(kj::byte* out, size_t outLen, uint64_t ts, size_t maxUdp);
  ngtcp2_ssize writeDatagrams(ngtcp2_pkt_info& pi, kj::byte* out, uint64_t ts, size_t maxUdp);
  CloseInfo peerClose();
  CloseInfo tlsFailure();

  template <typename Func>
  int guard(Func&& func) {
    KJ_IF_MAYBE(e, kj::runCatchingExceptions(kj::fwd<Func>(func))) {
      if (pendingError == nullptr) pendingError = kj::mv(*e);
      return NGTCP2_ERR_CALLBACK_FAILURE;
    }
    return 0;
  }

  // ---- ngtcp2 callbacks
  static ngtcp2_conn* getConn(ngtcp2_crypto_conn_ref* ref) {
    return static_cast<ConnectionImpl*>(ref->user_data)->conn;
  }
  static void cbRand(uint8_t* dest, size_t len, const ngtcp2_rand_ctx*) {
    gnutls_rnd(GNUTLS_RND_RANDOM, dest, len);
  }
  static int cbGetNewConnectionId(ngtcp2_conn*, ngtcp2_cid* cid, uint8_t* token, size_t cidlen,
                                  void* ud);
  static int cbRemoveConnectionId(ngtcp2_conn*, const ngtcp2_cid* cid, void* ud);
  static int cbHandshakeCompleted(ngtcp2_conn*, void* ud);
  static int cbRecvStreamData(ngtcp2_conn*, uint32_t flags, int64_t id, uint64_t offset,
                              const uint8_t* data, size_t len, void* ud, void* sud);
  static int cbStreamOpen(ngtcp2_conn*, int64_t id, void* ud);
  static int cbStreamClose(ngtcp2_conn*, uint32_t flags, int64_t id, uint64_t code, void* ud,
                           void* sud);
  static int cbStreamReset(ngtcp2_conn*, int64_t id, uint64_t finalSize, uint64_t code,
                           void* ud, void* sud);
  static int cbAcked(ngtcp2_conn*, int64_t id, uint64_t offset, uint64_t len, void* ud,
                     void* sud);
  static int cbExtendMaxLocalStreamsBidi(ngtcp2_conn*, uint64_t max, void* ud);
  static int cbExtendMaxStreamData(ngtcp2_conn*, int64_t id, uint64_t max, void* ud, void* sud);
  static int cbRecvStatelessReset(ngtcp2_conn*, const ngtcp2_pkt_stateless_reset*, void* ud);
  static int cbRecvDatagram(ngtcp2_conn*, uint32_t flags, const uint8_t*, size_t, void* ud);

  void onStreamData(StreamState& state, uint32_t flags, kj::ArrayPtr<const kj::byte> data);
  void onStreamOpen(int64_t id);
  void onStreamClose(StreamState& state, uint32_t flags, uint64_t code);
  void failRead(StreamState& state, kj::Exception e);
  void failWrite(StreamState& state, kj::Exception e);
  void peerStoppedReading(StreamState& state);
  void probeWrites(uint64_t ts);
  void pumpPendingWrite(StreamState& state);

  friend class StreamHandle;
};

// =======================================================================================
// Application handles

class ConnectionHandle final: public Connection {
public:
  explicit ConnectionHandle(kj::Own<ConnectionImpl> impl): impl(kj::mv(impl)) {}
  ~ConnectionHandle() noexcept(false) {
    if (impl->isOpen()) impl->close(0, "");
  }

  kj::Promise<kj::Own<Stream>> openStream() override { return impl->openStream(); }
  kj::Promise<kj::Own<Stream>> acceptStream() override { return impl->acceptStream(); }
  kj::Promise<void> close(uint64_t code, kj::StringPtr reason) override {
    impl->close(code, reason);   // the packet is handed to the kernel synchronously
    return kj::READY_NOW;
  }
  kj::Promise<CloseInfo> onClosed() override { return impl->onClosed(); }
  kj::Maybe<const CloseInfo&> closeInfo() const override { return impl->getCloseInfo(); }
  bool isServer() const override { return impl->server; }
  kj::StringPtr alpn() const override { return impl->alpn; }
  kj::StringPtr serverName() const override { return impl->serverName; }
  SocketAddress remoteAddress() const override { return impl->remote; }
  ConnectionStats stats() const override { return impl->stats(); }
  bool sendDatagram(kj::ArrayPtr<const kj::byte> payload) override {
    return impl->sendDatagram(payload);
  }
  size_t maxDatagramPayload() const override { return impl->maxDatagramPayload(); }
  void goSilent() override { impl->goSilent(); }

private:
  kj::Own<ConnectionImpl> impl;
};

class StreamHandle final: public Stream {
public:
  StreamHandle(kj::Own<ConnectionImpl> conn, kj::Own<StreamState> state)
      : conn(kj::mv(conn)), state(kj::mv(state)) {
    this->state->handleAlive = true;
  }
  ~StreamHandle() noexcept(false);

  int64_t id() const override { return state->id; }
  void reset(uint64_t code) override;
  void stopSending(uint64_t code) override;
  void setCreditWithheld(bool withheld) override;
  kj::Promise<void> whenAborted() override;
  uint64_t bufferedReadBytes() const override { return state->rxBuffered; }
  uint64_t bufferedWriteBytes() const override { return state->txBuffered(); }

  kj::Promise<size_t> tryRead(void* buffer, size_t minBytes, size_t maxBytes) override;
  kj::Promise<void> write(const void* buffer, size_t size) override;
  kj::Promise<void> write(kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces) override;
  void shutdownWrite() override;
  void abortRead() override { stopSending(0); }
  kj::Promise<void> whenWriteDisconnected() override;
  kj::Promise<uint64_t> pumpTo(kj::AsyncOutputStream& output, uint64_t amount) override;
  kj::Maybe<kj::Promise<uint64_t>> tryPumpFrom(kj::AsyncInputStream& input,
                                               uint64_t amount) override;

private:
  kj::Own<ConnectionImpl> conn;
  kj::Own<StreamState> state;

  kj::Promise<void> startWrite(StreamState::PendingWrite pending);
  kj::Promise<uint64_t> pumpToLoop(kj::AsyncOutputStream& output, uint64_t amount,
                                   uint64_t done, kj::Array<kj::byte> buffer);
  kj::Promise<uint64_t> pumpFromLoop(kj::AsyncInputStream& input, uint64_t amount,
                                     uint64_t done, kj::Array<kj::byte> buffer);
};

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
  if (clientCredentials != nullptr) gnutls_certificate_free_credentials(clientCredentials);
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
  if (settings.handshake_timeout == 0) settings.handshake_timeout = UINT64_MAX;

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

constexpr const char* DEFAULT_CLIENT_PRIORITY =
    "NORMAL:-VERS-ALL:+VERS-TLS1.3:-CIPHER-ALL:+AES-128-GCM:+AES-256-GCM:+CHACHA20-POLY1305:"
    "+AES-128-CCM:%DISABLE_TLS13_COMPAT_MODE";
constexpr const char* DEFAULT_SERVER_PRIORITY =
    "NORMAL:-VERS-ALL:+VERS-TLS1.3:-CIPHER-ALL:+AES-128-GCM:+AES-256-GCM:+CHACHA20-POLY1305:"
    "+AES-128-CCM:-GROUP-ALL:+GROUP-SECP256R1:+GROUP-X25519:+GROUP-SECP384R1:"
    "%DISABLE_TLS13_COMPAT_MODE";

void checkGnutls(int rv, kj::StringPtr what) {
  if (rv < 0) {
    kj::throwFatalException(failed(kj::str("QUIC TLS setup: ", what, ": ", gnutls_strerror(rv))));
  }
}

void ConnectionImpl::initClient(const ClientConfig& cfg) {
  alpnWanted = kj::heapString(cfg.alpn);
  serverName = kj::heapString(cfg.serverName);

  checkGnutls(gnutls_certificate_allocate_credentials(&clientCredentials), "credentials");
  bool anyTrust = false;
  KJ_IF_MAYBE(file, cfg.caFile) {
    int n = gnutls_certificate_set_x509_trust_file(clientCredentials, file->cStr(),
                                                   GNUTLS_X509_FMT_PEM);
    if (n <= 0) {
      kj::throwFatalException(failed(kj::str(
          "QUIC TLS setup: cannot load CA file '", *file, "': ",
          n < 0 ? gnutls_strerror(n) : "no certificate in it")));
    }
    anyTrust = true;
  }
  KJ_IF_MAYBE(pem, cfg.caPem) {
    gnutls_datum_t datum = {reinterpret_cast<unsigned char*>(const_cast<char*>(pem->cStr())),
                            static_cast<unsigned>(pem->size())};
    int n = gnutls_certificate_set_x509_trust_mem(clientCredentials, &datum, GNUTLS_X509_FMT_PEM);
    if (n <= 0) {
      kj::throwFatalException(failed(kj::str("QUIC TLS setup: CA PEM holds no certificate")));
    }
    anyTrust = true;
  }
  if (cfg.useSystemTrust) {
    int n = gnutls_certificate_set_x509_system_trust(clientCredentials);
    if (n > 0) anyTrust = true;
  }
  if (cfg.verifyCertificate && !anyTrust) {
    kj::throwFatalException(failed(kj::str(
        "QUIC TLS setup: certificate verification is on but no trust roots were given "
        "(set caFile, caPem or useSystemTrust)")));
  }

  checkGnutls(gnutls_init(&session, GNUTLS_CLIENT | GNUTLS_NO_END_OF_EARLY_DATA), "gnutls_init");
  checkGnutls(ngtcp2_crypto_gnutls_configure_client_session(session) == 0 ? 0 : -1,
              "configure client session");
  const char* errPos = nullptr;
  kj::StringPtr prio = DEFAULT_CLIENT_PRIORITY;
  KJ_IF_MAYBE(p, cfg.tlsPriority) prio = *p;
  checkGnutls(gnutls_priority_set_direct(session, prio.cStr(), &errPos), "priority string");
  checkGnutls(gnutls_credentials_set(session, GNUTLS_CRD_CERTIFICATE, clientCredentials),
              "credentials");
  gnutls_datum_t proto = {reinterpret_cast<unsigned char*>(alpnWanted.begin()),
                          static_cast<unsigned>(alpnWanted.size())};
  checkGnutls(gnutls_alpn_set_protocols(session, &proto, 1, GNUTLS_ALPN_MANDATORY), "ALPN");
  if (serverName.size() > 0) {
    checkGnutls(gnutls_server_name_set(session, GNUTLS_NAME_DNS, serverName.begin(),
                                       serverName.size()), "SNI");
  }
  if (cfg.verifyCertificate) {
    gnutls_session_set_verify_cert(session, serverName.size() > 0 ? serverName.cStr() : nullptr,
                                   0);
    verifyName = true;
  }
  gnutls_session_set_ptr(session, &connRef);

  kj::byte dcidBytes[SCID_LEN], scidBytes[SCID_LEN];
  randomBytes(dcidBytes, sizeof(dcidBytes));
  randomBytes(scidBytes, sizeof(scidBytes));
  ngtcp2_cid dcid, scid;
  ngtcp2_cid_init(&dcid, dcidBytes, sizeof(dcidBytes));
  ngtcp2_cid_init(&scid, scidBytes, sizeof(scidBytes));
  setup(dcid, scid, NGTCP2_PROTO_VER_V1, nullptr);
  ngtcp2_conn_set_tls_native_handle(conn, session);
}

void ConnectionImpl::initServer(const ngtcp2_pkt_hd& hd, const ServerConfig& cfg) {
  checkGnutls(gnutls_init(&session, GNUTLS_SERVER | GNUTLS_NO_AUTO_SEND_TICKET |
                                    GNUTLS_NO_END_OF_EARLY_DATA), "gnutls_init");
  checkGnutls(ngtcp2_crypto_gnutls_configure_server_session(session) == 0 ? 0 : -1,
              "configure server session");
  const char* errPos = nullptr;
  kj::StringPtr prio = DEFAULT_SERVER_PRIORITY;
  KJ_IF_MAYBE(p, cfg.tlsPriority) prio = *p;
  checkGnutls(gnutls_priority_set_direct(session, prio.cStr(), &errPos), "priority string");
  checkGnutls(gnutls_credentials_set(session, GNUTLS_CRD_CERTIFICATE, endpoint->serverCred()),
              "credentials");
  kj::Vector<gnutls_datum_t> protos;
  for (auto& p: cfg.alpn) {
    protos.add(gnutls_datum_t{reinterpret_cast<unsigned char*>(const_cast<char*>(p.begin())),
                              static_cast<unsigned>(p.size())});
  }
  checkGnutls(gnutls_alpn_set_protocols(session, protos.begin(), protos.size(),
      GNUTLS_ALPN_MANDATORY | GNUTLS_ALPN_SERVER_PRECEDENCE), "ALPN");
  gnutls_session_set_ptr(session, &connRef);

  kj::byte scidBytes[SCID_LEN];
  randomBytes(scidBytes, sizeof(scidBytes));
  ngtcp2_cid scid;
  ngtcp2_cid_init(&scid, scidBytes, sizeof(scidBytes));
  setup(hd.scid, scid, hd.version, &hd.dcid);
  ngtcp2_conn_set_tls_native_handle(conn, session);
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
    int rv = ngtcp2_conn_handle_expiry(conn, ts);
    ngtcp2_conn_stat stat;
    ngtcp2_conn_get_conn_stat(conn, &stat);
    if (stat.pto_count > lastPto) ptoTotal += stat.pto_count - lastPto;
    lastPto = stat.pto_count;
    if (rv != 0) {
      if (rv == NGTCP2_ERR_IDLE_CLOSE) {
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

CloseInfo ConnectionImpl::tlsFailure() {
  uint8_t alert = ngtcp2_conn_get_tls_alert(conn);
  kj::String what;
  if (!server && verifyName) {
    unsigned status = gnutls_session_get_verify_cert_status(session);
    if (status & GNUTLS_CERT_SIGNER_NOT_FOUND) {
      what = kj::str("the server's certificate is not signed by a trusted CA; pass the CA that "
                     "signed it (caFile/caPem) or check that you reach the right server");
    } else if (status & GNUTLS_CERT_UNEXPECTED_OWNER) {
      what = kj::str("the server's certificate is not valid for the name '", serverName,
                     "'; check the server name (SNI) and the certificate's SAN");
    } else if (status & GNUTLS_CERT_EXPIRED) {
      what = kj::str("the server's certificate has expired; check the clocks and the cert");
    } else if (status & GNUTLS_CERT_NOT_ACTIVATED) {
      what = kj::str("the server's certificate is not yet valid; check the clocks");
    } else if (status != 0) {
      gnutls_datum_t out;
      if (gnutls_certificate_verification_status_print(status, GNUTLS_CRT_X509, &out, 0) == 0) {
        what = kj::str("certificate verification failed: ",
                       kj::StringPtr(reinterpret_cast<const char*>(out.data), out.size));
        gnutls_free(out.data);
      } else {
        what = kj::str("certificate verification failed (status ", status, ")");
      }
    }
  }
  if (what == nullptr) {
    if (alert == 120) {
      what = server ? kj::str("the client offered none of our ALPN protocols")
                    : kj::str("no ALPN in common with the server");
    } else {
      what = kj::str(alertHint(alert));
    }
  }
  auto info = makeClose(CloseKind::TLS_LOCAL_FAILURE, 0x100 + alert, "", kj::str(
      ": ", what, " (sent alert ", alert, " ", alertName(alert), "; peer ", remote, ")"));
  info.tlsAlert = alert;
  return info;
}

void ConnectionImpl::afterHandshake() {
  handshakeReported = true;
  gnutls_datum_t proto;
  if (gnutls_alpn_get_selected_protocol(session, &proto) == 0) {
    alpn = kj::heapString(reinterpret_cast<const char*>(proto.data), proto.size);
  }
  if (server) {
    char name[256];
    size_t nameLen = sizeof(name);
    unsigned type;
    if (gnutls_server_name_get(session, name, &nameLen, &type, 0) == 0 &&
        type == GNUTLS_NAME_DNS) {
      serverName = kj::heapString(name, kj::min(nameLen, sizeof(name)));
    }
    if (endpoint != nullptr) endpoint->handshakeDone(*this);
    return;
  }
  if (alpn != alpnWanted) {
    ngtcp2_connection_close_error ccerr;
    ngtcp2_connection_close_error_set_transport_error_tls_alert(&ccerr, 120, nullptr, 0);
    sendClose(ccerr);
    auto info = makeClose(CloseKind::TLS_ALPN, 0x100 + 120, "", kj::str(
        ": the server selected ALPN '", alpn, "' instead of '", alpnWanted, "' (", remote,
        "); check that this is the right kind of server"));
    info.tlsAlert = 120;
    die(kj::mv(info));
    return;
  }
  KJ_IF_MAYBE(f, handshakeFulfiller) {
    (*f)->fulfill();
    handshakeFulfiller = nullptr;
  }
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

void ConnectionImpl::endpointGone() {
  die(makeClose(CloseKind::ENDPOINT_GONE, 0, "",
                kj::str(": the local UDP socket was closed while the connection was open")));
  endpoint = nullptr;
}

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
  if (sendQueue.empty()) connBlockedSince = 0;
  if (receivedSinceProbe) {
    receivedSinceProbe = false;
    if (!writeWatch.empty()) {
      probeWrites(ts);
      if (closeInfo != nullptr) return;
    }
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
  ngtcp2_conn_update_pkt_tx_time(conn, ts);
  if (ep.txBlocked()) {
    ep.waitWritable(*this);
  } else if (more) {
    scheduleFlush();
  }
  rearm();
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

// ---- application calls

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
  credit(state, owed, connOwed);
  scheduleFlush();
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
    }
    scheduleFlush();
  }
}

void ConnectionImpl::shutdownWrite(StreamState& state, uint64_t code) {
  if (conn != nullptr && closeInfo == nullptr && !state.closedByNgtcp2) {
    ngtcp2_conn_shutdown_stream_write(conn, state.id, code);
    scheduleFlush();
  }
}

void ConnectionImpl::failRead(StreamState& state, kj::Exception e) {
  if (state.rxError == nullptr) state.rxError = kj::cp(e);
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
  if (state.txError == nullptr) state.txError = kj::cp(e);
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

uint64_t ConnectionImpl::sendSpace(const StreamState& state) const {
  // What the stream may add to its send buffer now. Normally: up to streamSendBuffer bytes not
  // yet sent (bytes in flight are bounded by the congestion window and the peer's credit, so a
  // fast stream is not slowed by this buffer, and a stalled one holds at most this much). Over
  // the connection's budget: only up to streamSendReserve bytes unacknowledged.
  if (sendOverBudget) {
    uint64_t reserve = kj::min(config.streamSendReserve, config.streamSendBuffer);
    return reserve > state.txBuffered() ? reserve - state.txBuffered() : 0;
  }
  uint64_t unsent = state.txUnsent();
  return config.streamSendBuffer > unsent ? config.streamSendBuffer - unsent : 0;
}

void ConnectionImpl::addSendBuffered(uint64_t n) {
  sendBuffered += n;
  if (!sendOverBudget && sendBuffered >= kj::max(config.connectionSendHigh, uint64_t(1))) {
    sendOverBudget = true;
  }
}

void ConnectionImpl::subSendBuffered(uint64_t n) {
  sendBuffered -= n;
  if (sendOverBudget && sendBuffered <= config.connectionSendLow) {
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

void ConnectionImpl::pumpPendingWrite(StreamState& state) {
  KJ_IF_MAYBE(w, state.pendingWrite) {
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
  static_cast<ConnectionImpl*>(ud)->handshakeCompleted = true;
  return 0;
}

int ConnectionImpl::cbRecvStreamData(ngtcp2_conn*, uint32_t flags, int64_t id, uint64_t offset,
                                     const uint8_t* data, size_t len, void* ud, void* sud) {
  auto& self = *static_cast<ConnectionImpl*>(ud);
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
    if (remoteStream) {
      if (id & 2) {
        ngtcp2_conn_extend_max_streams_uni(self.conn, 1);
      } else {
        ngtcp2_conn_extend_max_streams_bidi(self.conn, 1);
      }
    }
  });
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
  uint64_t released = state.txBuffered();
  state.releaseTx();
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
  return self.guard([&]() {
    if (self.openWaiters.empty() || self.openScheduled) return;
    self.openScheduled = true;
    self.tasks.add(kj::evalLater([&self]() { self.openWaiting(); }));
  });
}

int ConnectionImpl::cbExtendMaxStreamData(ngtcp2_conn*, int64_t, uint64_t, void* ud, void* sud) {
  auto& self = *static_cast<ConnectionImpl*>(ud);
  return self.guard([&]() {
    if (sud == nullptr) return;
    auto& state = *static_cast<StreamState*>(sud);
    state.flowBlocked = false;
    self.queueSend(state);
  });
}

int ConnectionImpl::cbRecvStatelessReset(ngtcp2_conn*, const ngtcp2_pkt_stateless_reset*,
                                         void* ud) {
  static_cast<ConnectionImpl*>(ud)->statelessResetReceived = true;
  return 0;
}

int ConnectionImpl::cbRecvDatagram(ngtcp2_conn*, uint32_t, const uint8_t*, size_t, void* ud) {
  ++static_cast<ConnectionImpl*>(ud)->datagramsDropped;
  return 0;
}

// =======================================================================================
// StreamHandle implementation

StreamHandle::~StreamHandle() noexcept(false) {
  auto& s = *state;
  s.handleAlive = false;
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
    s.txError = disconnected(kj::str("QUIC stream dropped"));
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
  KJ_IF_MAYBE(e, s.rxError) return kj::cp(*e);
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
    conn->scheduleFlush();
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
  KJ_IF_MAYBE(e, s.txError) return kj::cp(*e);
  if (!conn->isOpen()) return conn->closeException();
  KJ_REQUIRE(!s.finRequested, "write() after shutdownWrite()");
  KJ_REQUIRE(s.pendingWrite == nullptr, "one write at a time");
  if (pending.pieces.size() == 0) {
    // Fast path: everything fits in the send buffer.
    uint64_t before = s.txBuffered();
    size_t n = s.appendTx(pending.single, conn->sendSpace(s));
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

// =======================================================================================
// EndpointImpl implementation

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
  KJ_LOG(INFO, "QUIC endpoint bound", local, statsData.receiveBufferBytes,
         statsData.sendBufferBytes, statsData.gro);

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
    c->scheduleFlush();
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
    KJ_LOG(ERROR, "QUIC server connection setup failed", *e);
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
    int n = sendmmsg(fd, msgs, nmsgs, 0);
    if (n < 0) {
      int error = errno;
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
      // Unreachable destination etc.: drop the batch (QUIC recovers or times out).
      KJ_LOG(WARNING, "QUIC sendmmsg failed", strerror(error), b.dest);
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

}  // namespace

kj::Own<Endpoint> newEndpoint(kj::UnixEventPort& eventPort, SocketAddress bindAddress) {
  return kj::heap<EndpointImpl>(eventPort, bindAddress);
}

}  // namespace cfqt::quic
