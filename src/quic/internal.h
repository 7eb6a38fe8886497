#pragma once
// Private to src/quic (included by its .c++ files only, never by another layer): the classes
// behind quic::Endpoint, Connection and Stream.
//
// QUIC on ngtcp2 0.12 + GnuTLS 3.7, driven by the KJ event loop: the Endpoint (UDP socket,
// routing by connection ID, GSO/GRO batches), the Connection (ngtcp2_conn + gnutls session, one
// timerfd) and the Streams (flow-controlled buffers exposed as kj::AsyncIoStream).
//
// The code is split by concern: endpoint.c++ (UDP socket, routing, GSO/GRO), connection.c++
// (ConnectionImpl's lifecycle, timer, receive and close), connection-tls.c++ (GnuTLS set-up and
// handshake outcome), connection-send.c++ (packets, datagrams, send budget), callbacks.c++
// (ngtcp2 callbacks and the stream events they bring), stream.c++ (stream helpers and the
// StreamHandle) and close-info.c++ (CloseKind / CloseInfo).
//
// Rules these files follow (see STYLE.md §3 and the QUIC notes):
// - ngtcp2/GnuTLS callbacks never let an exception escape: each is wrapped in `guard()`, which
//   stores the exception and returns NGTCP2_ERR_CALLBACK_FAILURE.
// - Callbacks only change state and fulfil promises; ngtcp2 calls that write packets
//   (read_pkt, writev_stream, write_connection_close) happen only from the receive loop, the
//   timer, the flush task and application calls, never from inside a callback. Fulfilling a
//   promise never runs its continuation synchronously, so application code never runs inside a
//   callback either.
//
// Unlike other headers under src/ (STYLE.md §1), this one includes ngtcp2, GnuTLS and std
// headers: its classes hold ngtcp2 and GnuTLS objects and std::deques by value, and no header
// outside this folder includes it.
//
// Namespace `_` has hidden visibility: every object is built with -fPIC, under which GCC treats a
// default-visibility function as interposable and does not inline it, even within its file.
// Hidden, these functions inline as they did in the anonymous namespace of the single file this
// code came from. Small helpers that the hot paths of several files call are inline here.

#include "quic/endpoint.h"
#include "observe/log.h"

#include <ngtcp2/ngtcp2.h>
#include <ngtcp2/ngtcp2_crypto.h>
#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>
#include <gnutls/x509.h>

#include <kj/debug.h>
#include <kj/map.h>
#include <kj/vector.h>

#include <deque>

#include <string.h>
#include <sys/socket.h>
#include <time.h>

namespace cfqt::quic {
namespace _ __attribute__((visibility("hidden"))) {  // private

// =======================================================================================
// Small helpers

constexpr size_t SCID_LEN = 18;
constexpr size_t MAX_PACKET = 1500;             // per-packet buffer (max_udp_payload_size <= it)
constexpr size_t TX_BATCH_PACKETS = 64;         // packets per flush batch
constexpr uint64_t INITIAL_BURST_PACKETS = 10;  // first packets of a connection sent unpaced
constexpr size_t GSO_MAX_SEGMENTS = 44;         // 44 x 1452 < 64 KiB
constexpr size_t RX_MSGS = 8;                   // recvmmsg batch (x RX_BUFFER: 512 KiB per endpoint)
constexpr size_t RX_BUFFER = 65536;             // one GRO super-datagram
constexpr size_t RX_BATCHES_PER_TURN = 8;
constexpr size_t RX_BLOCK = 64 * 1024;          // receive buffer block
constexpr size_t TX_BLOCK = 16 * 1024;          // send buffer block (a stalled stream holds few)
constexpr size_t TX_GROWTH = 4 * 1024;          // small writes' blocks double up to this size
constexpr uint64_t SEND_BUDGET_CWNDS = 4;       // send budget high mark: 4 cwnd (config.h)
constexpr size_t MAX_IOV = 16;
constexpr size_t MAX_QUEUED_DATAGRAMS = 256;    // sendDatagram() payloads waiting for a packet
constexpr uint64_t PACING_SLACK_NS = 1000000;     // ngtcp2 0.12's NGTCP2_PKT_PACING_OVERHEAD
// Bytes of a short-header packet that are not frames: first byte, destination CID (<= 20),
// packet number (<= 4), AEAD tag (16). And of a DATAGRAM frame around its payload: type +
// length varint (2 bytes for any payload that fits a packet).
constexpr size_t SHORT_PACKET_OVERHEAD = 1 + NGTCP2_MAX_CIDLEN + 4 + 16;
constexpr size_t DATAGRAM_FRAME_OVERHEAD = 1 + 2;

inline uint64_t nowNs() {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return uint64_t(ts.tv_sec) * 1000000000ull + ts.tv_nsec;
}

inline uint64_t toNs(kj::Duration d) {
  return d / kj::NANOSECONDS;
}

inline void randomBytes(kj::byte* out, size_t n) {
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

inline kj::Exception disconnected(kj::String text) {
  return kj::Exception(kj::Exception::Type::DISCONNECTED, __FILE__, __LINE__, kj::mv(text));
}

inline kj::Exception failed(kj::String text) {
  return kj::Exception(kj::Exception::Type::FAILED, __FILE__, __LINE__, kj::mv(text));
}

kj::StringPtr alertName(uint8_t alert);
kj::StringPtr alertHint(uint8_t alert);
// The name of a TLS alert, and what to check when it was sent or received (close-info.c++).

CloseInfo makeClose(CloseKind kind, uint64_t code, kj::StringPtr reason, kj::String detail);
// A CloseInfo whose description is the kind's prefix followed by `detail` (close-info.c++).

void checkGnutls(int rv, kj::StringPtr what);
// Throws FAILED ("QUIC TLS setup: <what>: <error>") if `rv` is a GnuTLS error
// (connection-tls.c++).

class EndpointImpl;
class ConnectionImpl;

// =======================================================================================
// StreamState: the buffers of one stream, shared by the connection (while ngtcp2 knows the
// stream) and the application's Stream handle.

inline size_t blockSize(size_t needed, size_t previous, size_t cap) {
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
  ~StreamState() noexcept(false);
  // Rejects what still waits (e.g. a whenAborted() branch of a stream that ended normally) the
  // way a dropped fulfiller would, but without kj::getDestructionReason()'s stack trace: that
  // unwind cost ~10% of the client's CPU per request.

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
  kj::Maybe<kj::Own<kj::Exception>> rxError;   // on the heap: a kj::Exception is 368 bytes
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
  uint64_t promised = 0;        // writableBytes(): reserved (in sendBuffered) for the next write
  kj::Maybe<kj::Own<kj::Exception>> txError;
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
    bool spaceOnly = false;   // Stream::whenWritable(): no bytes, waits for writeThreshold()
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
        // A block holds the write (up to TX_BLOCK), so that a stream carrying 100 bytes does not
        // cost a 16 KiB allocation, nor a 4 KiB write a 16 KiB block that stays mostly empty
        // while the stream waits; blocks of small writes double up to TX_GROWTH. A write cut
        // short by `space` (the stream is blocked: the peer's credit, the send budget) gets a
        // block of just what it may add.
        size_t last = tx.empty() ? 0 : kj::min(tx.back().data.size(), TX_GROWTH / 2);
        size_t cap = n < bytes.size() ? kj::max(n - done, size_t(256)) : TX_BLOCK;
        Block block;
        block.data = kj::heapArray<kj::byte>(blockSize(n - done, last, kj::min(cap, TX_BLOCK)));
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
      if (txBase + front.end > txAcked) break;
      if (!full && tx.size() == 1 && txAcked < txEnd) break;
      // Acknowledged: freed, the last (partly filled) block too once everything written was
      // acknowledged, so that a stream waiting on its peer or its origin holds no buffer.
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
    observe::logError("QUIC endpoint task failed", observe::Fields().error(exception));
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

class ClientCredentials final: public kj::Refcounted {
  // A client's trust roots in GnuTLS (the system store alone is ~140 certificates, ~4 MiB of
  // heap and 5-15 ms to parse). Shared by every handshake of this thread whose ClientConfig
  // names the same roots, so concurrent dials parse them once; freed when the last of them
  // completed (ConnectionImpl::releaseTrustRoots()) or failed. The constructor throws FAILED
  // (the dial's error) when the roots cannot be loaded.
public:
  static kj::Own<ClientCredentials> get(const ClientConfig& cfg);
  explicit ClientCredentials(const ClientConfig& cfg);
  KJ_DISALLOW_COPY(ClientCredentials);
  ~ClientCredentials() noexcept(false);

  gnutls_certificate_credentials_t get() const { return credentials; }

  bool lazySystemTrust() const { return lazySystem; }
  // True when the system store is consulted only for a chain that caFile/caPem (for cfqt: the
  // embedded Cloudflare roots) cannot verify: the session then verifies with
  // ConnectionImpl::verifyPeer() instead of gnutls_session_set_verify_cert().

  kj::Maybe<gnutls_x509_trust_list_t> systemTrust(kj::ArrayPtr<const gnutls_x509_crt_t> chain);
  // The system store's certificates that can matter for `chain` (those holding the subject or
  // issuer name of one of its certificates: every possible signer, and the chain's own members),
  // parsed for this call and kept with these credentials until the next; null if none or if the
  // store cannot be loaded. Parsing only those, not all ~140, is what makes a dial that needs
  // the store cheap (issue 15). Where Debian's bundle file is missing, the whole store.

  static uint64_t systemStoreLoads();
  // How many times this thread parsed the system store (tests).

  static void setSystemBundleForTests(kj::Maybe<kj::String> path);
  // Reads this file instead of Debian's bundle on this thread (tests); null restores it.

private:
  gnutls_certificate_credentials_t credentials = nullptr;
  bool lazySystem = false;
  kj::Maybe<gnutls_x509_trust_list_t> systemList;
  kj::Maybe<kj::String> caFile;
  kj::Maybe<kj::String> caPem;
  bool useSystemTrust;
  bool verify;
  ClientCredentials* next = nullptr;     // this thread's live credentials (a short list)
  ClientCredentials** prev = nullptr;

  bool matches(const ClientConfig& cfg) const;
};

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
  void sendRefused(int error);
  // The endpoint's send of this connection's datagrams failed with an error isSendRefusal()
  // accepts: the connection ends (SEND_REFUSED) on the next turn (not inside the send path).
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
  uint64_t writeThreshold() const;
  void addSendBuffered(uint64_t n);
  void subSendBuffered(uint64_t n);
  void releasePromise(StreamState& state);
  uint64_t sendBudgetHigh() const;   // the high mark now (follows the congestion window)
  uint64_t sendBudgetLow() const;
  void shutdownRead(StreamState& state, uint64_t code);
  void shutdownWrite(StreamState& state, uint64_t code);
  void scheduleFlush();
  // Flushes at the end of this turn (evalLast).
  void scheduleAckFlush();
  // The same for what only acknowledges or returns read credit (the receive path, reads): such
  // a flush may wait up to TransportConfig::ackDelay for data to ride with (see deferFlush()).
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
  kj::Own<ClientCredentials> clientCredentials;   // client, until the handshake is done
  gnutls_certificate_credentials_t emptyCredentials = nullptr;  // the session's after that
  unsigned verifyStatus = 0;   // of the last verifyPeer(), for tlsFailure()
  bool ownVerify = false;      // verifyPeer() verifies (lazy system store), not GnuTLS itself
  void releaseTrustRoots();
  static int verifyCallback(gnutls_session_t session);
  int verifyPeer();
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
  bool refusing = false;        // sendRefused(): the connection ends on the next turn
  kj::Array<kj::byte> closePacket;
  uint64_t closePacketCount = 0;

  // timer
  kj::AutoCloseFd timerFd;
  kj::Own<kj::UnixEventPort::FdObserver> timerObserver;
  uint64_t armedExpiry = UINT64_MAX;
  uint64_t ackDelayNs = 0;      // TransportConfig::ackDelay, capped at max_ack_delay
  bool urgentFlush = false;     // a flush was asked for something other than an ACK or credit
  bool handshakeConfirmed = false;  // no flush is deferred before (deferFlush())
  uint32_t rxSinceSend = 0;     // data-bearing packets received since a flush last sent one
  bool rxEliciting = false;     // the packet being read brought stream data, a reset, credit...
  uint64_t deferredSince = 0;   // ns: a flush is being deferred (deferFlush()) since
  bool deferFlush(uint64_t ts);
  bool flushScheduled = false;

  // Stream credit for streams the peer opened and that have closed, not yet given back with
  // ngtcp2_conn_extend_max_streams_*: it rides in the next packet that carries stream data, or
  // goes out on its own once it reaches streamCreditBatch(), so that a closed stream does not
  // cost a packet (and a wake-up of the peer) of its own.
  uint64_t unsentBidiCredit = 0;
  uint64_t unsentUniCredit = 0;
  void creditClosedStream(bool bidi);
  void grantStreamCredit();

  // stats
  uint64_t bytesSent = 0, bytesReceived = 0, packetsSent = 0, packetsReceived = 0;
  uint64_t ptoTotal = 0, lastPto = 0;
  uint64_t streamsLocal = 0, streamsRemote = 0, datagramsDropped = 0;
  uint64_t datagramsSent = 0, datagramsSendDropped = 0;

  std::deque<kj::Array<kj::byte>> datagramQueue;   // sendDatagram() payloads, oldest first

  kj::TaskSet tasks;

  void taskFailed(kj::Exception&& exception) override {
    observe::logError("QUIC connection task failed", observe::Fields().error(exception));
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
  static int cbHandshakeConfirmed(ngtcp2_conn*, void* ud);
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
  size_t writableBytes(size_t wanted) override;
  kj::Promise<void> whenWritable() override;

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
// ConnectionImpl's send budget: inline, because a stream's write (stream.c++) and the send path
// (connection-send.c++) both call them for every write.

inline uint64_t ConnectionImpl::sendSpace(const StreamState& state) const {
  // What the stream may add to its send buffer now. Normally: up to streamSendBuffer bytes not
  // yet sent (bytes in flight are bounded by the congestion window and the peer's credit, so a
  // fast stream is not slowed by this buffer), but no more than the peer's stream credit lets
  // out plus streamSendReserve: a stream whose peer stopped reading holds at most the reserve
  // unsent (its sent bytes are acknowledged and freed). Over the connection's budget: only up
  // to streamSendReserve bytes unacknowledged.
  uint64_t reserve = kj::min(config.streamSendReserve, config.streamSendBuffer);
  if (sendOverBudget) {
    return reserve > state.txBuffered() ? reserve - state.txBuffered() : 0;
  }
  uint64_t unsent = state.txUnsent();
  uint64_t credit = (conn == nullptr || state.closedByNgtcp2)
      ? 0 : ngtcp2_conn_get_max_stream_data_left(conn, state.id);
  uint64_t limit = kj::min(config.streamSendBuffer, credit + reserve);
  return limit > unsent ? limit - unsent : 0;
}

inline uint64_t ConnectionImpl::writeThreshold() const {
  // Stream::whenWritable() waits until a write may add at least this much: the reserve, which
  // every state of a live stream eventually allows (so a waiter is never stranded), and large
  // enough that a writer gated on it does not take a packet's worth at a time.
  return kj::max(kj::min(config.streamSendReserve, config.streamSendBuffer), uint64_t(1));
}

inline void ConnectionImpl::addSendBuffered(uint64_t n) {
  sendBuffered += n;
  if (!sendOverBudget && sendBuffered >= kj::min(config.connectionSendMin,
                                                 config.connectionSendHigh)) {
    if (sendBuffered >= sendBudgetHigh()) sendOverBudget = true;
  }
}

}  // namespace _
}  // namespace cfqt::quic
