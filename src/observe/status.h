#pragma once
// TunnelStatus: what the metrics server reports (PROTOCOL.md §1.5) and the counters the product
// keeps. Written by the tunnel layer, read by the metrics server and the public API.
//
// Threads (issue 15): each connection index may run on its own event loop (a worker thread).
// What happens per request is counted in that index's Shard, written by that one thread only
// (relaxed atomics, no locked instruction on the request path) and summed by the readers. The
// QUIC series are snapshots each connection publishes (never a live ngtcp2_conn read from
// another thread), behind a std::mutex. Everything else (hostname, connector id, ready count,
// locations, protocols, hostnames, build info) is written and read on the supervisor's loop
// (other threads reach it through that loop's kj::Executor).

#include <kj/string.h>
#include <kj/time.h>
#include <kj/vector.h>

#include <atomic>
#include <mutex>
#include <stdint.h>

namespace cfqt::observe {

class TunnelStatus {
public:
  TunnelStatus() = default;
  KJ_DISALLOW_COPY(TunnelStatus);

  void setHostname(kj::StringPtr host) { hostnameText = kj::str(host); }
  kj::StringPtr hostname() const { return hostnameText; }
  // The bare quick-tunnel hostname (no scheme); "" until the tunnel was requested.

  void setConnectorId(kj::StringPtr id) { connectorIdText = kj::str(id); }
  kj::StringPtr connectorId() const { return connectorIdText; }

  uint32_t readyConnections() const { return load(ready); }
  void connectionReady() { add(ready, 1); }
  void connectionNotReady() { add(ready, -1); }
  // A registered connection that is not unregistering counts as ready (§4.5).

  static constexpr kj::uint MIN_STATUS_CODE = 100;
  static constexpr kj::uint MAX_STATUS_CODE = 999;
  static constexpr kj::uint MAX_SHARDS = 4;   // connection indices (tunnel::MAX_HA_CONNECTIONS)

  class Shard {
    // The per-request statistics of one connection index. Written by one thread only (the loop
    // that serves the index: plain load + store, relaxed), read by any thread.
  public:
    Shard() = default;
    KJ_DISALLOW_COPY(Shard);

    void requestStarted() { bump(requests, 1); bump(concurrent, 1); }
    void requestFinished() { bump(concurrent, uint64_t(-1)); }
    // One edge-opened data stream served (cloudflared's total_requests and
    // concurrent_requests_per_tunnel).
    void requestFailed() { bump(errors, 1); }
    // Proxying one request failed (origin unreachable, or the exchange broke after the head);
    // counted by the origin layer, once per failed request (cloudflared's request_errors).
    void requestCancelled() { bump(cancelled, 1); }
    // The edge abandoned a request before its response completed (the visitor went away): the
    // origin exchange was aborted and its origin connection closed.
    void responseSent(kj::uint statusCode) {
      if (statusCode >= MIN_STATUS_CODE && statusCode <= MAX_STATUS_CODE) {
        bump(byCode[statusCode - MIN_STATUS_CODE], 1);
      }
    }
    // The origin's response heads by HTTP status (cloudflared's response_by_code).
    void registrationFailed(bool duplicate) {
      bump(registerFailed, 1);
      if (duplicate) bump(registerDuplicate, 1);
    }
    void localConfigPushed(bool ok) {
      bump(configPushes, 1);
      if (!ok) bump(configPushErrors, 1);
    }

  private:
    friend class TunnelStatus;
    std::atomic<uint64_t> requests{0};
    std::atomic<uint64_t> concurrent{0};
    std::atomic<uint64_t> errors{0};
    std::atomic<uint64_t> cancelled{0};
    std::atomic<uint64_t> registerFailed{0};
    std::atomic<uint64_t> registerDuplicate{0};
    std::atomic<uint64_t> configPushes{0};
    std::atomic<uint64_t> configPushErrors{0};
    std::atomic<uint64_t> byCode[MAX_STATUS_CODE - MIN_STATUS_CODE + 1] = {};

    static void bump(std::atomic<uint64_t>& v, uint64_t delta) {
      v.store(v.load(std::memory_order_relaxed) + delta, std::memory_order_relaxed);
    }
  };

  Shard& shard(kj::uint connIndex);
  // The shard of a connection index (< MAX_SHARDS); its thread is the only writer.

  uint64_t totalRequests() const { return sum(&Shard::requests); }
  uint64_t requestsOf(kj::uint connIndex) const {
    return connIndex < MAX_SHARDS ? shards[connIndex].requests.load(std::memory_order_relaxed) : 0;
  }
  uint64_t concurrentRequests() const { return sum(&Shard::concurrent); }
  uint64_t requestErrors() const { return sum(&Shard::errors); }
  uint64_t cancelledRequests() const { return sum(&Shard::cancelled); }
  uint64_t responsesWithCode(kj::uint statusCode) const;

  uint64_t registrations() const { return load(registered); }
  uint64_t registrationFailures() const { return sum(&Shard::registerFailed); }
  uint64_t duplicateRegistrations() const { return sum(&Shard::registerDuplicate); }
  void registrationSucceeded() { add(registered, 1); }
  // registerConnection outcomes (failures: Shard::registrationFailed()): failures are labelled
  // error="dup_edge_conn" (duplicate) or "server_error" (anything else), as cloudflared does.

  uint64_t localConfigPushes() const { return sum(&Shard::configPushes); }
  uint64_t localConfigPushErrors() const { return sum(&Shard::configPushErrors); }
  // updateLocalConfiguration sent on connection 0 (Shard::localConfigPushed()); like
  // cloudflared, a failed push counts in both series.

  int64_t configVersion() const { return orchestrationVersion.load(std::memory_order_relaxed); }
  void setConfigVersion(int64_t version) {
    orchestrationVersion.store(version, std::memory_order_relaxed);
  }
  // Any thread (a remote configuration is applied where the edge's RPC arrived).
  // The configuration version serving (cloudflared_orchestration_config_version): -1 for the
  // local configuration, then the last remote version applied.

  struct Location {
    kj::uint connIndex;
    kj::String location;
    int64_t value;   // 1: the index's current location, 0: a previous one
  };
  void serverLocation(kj::uint connIndex, kj::StringPtr location);
  // A connection registered at `location` (cloudflared's server_locations gauge).
  kj::ArrayPtr<const Location> serverLocations() const { return locations; }

  struct Protocol {
    kj::uint connIndex;
    kj::String protocol;   // "quic" or "http2"
  };
  void connectionProtocol(kj::uint connIndex, kj::StringPtr protocol);
  // The transport the index's connection registered over (its latest registration).
  kj::ArrayPtr<const Protocol> connectionProtocols() const { return protocols; }

  struct UserHostname {
    kj::String url;
    uint64_t count;
  };
  void userHostname(kj::StringPtr url);
  // The tunnel's URL was issued ("https://<hostname>"; cloudflared's user_hostnames_counts).
  kj::ArrayPtr<const UserHostname> userHostnames() const { return hostnames; }

  struct BuildInfo {
    kj::String goVersion;
    kj::String type;
    kj::String revision;
    kj::String version;
  };
  void setBuildInfo(BuildInfo info) { build = kj::mv(info); }
  const BuildInfo& buildInfo() const { return build; }

  // QUIC connection statistics, per connection index (cloudflared's quic_client_* series).
  struct QuicSample {
    kj::Duration smoothedRtt = 0 * kj::NANOSECONDS;
    kj::Duration minRtt = 0 * kj::NANOSECONDS;
    kj::Duration latestRtt = 0 * kj::NANOSECONDS;
    uint64_t congestionWindow = 0;
    uint64_t bytesSent = 0;
    uint64_t bytesReceived = 0;
    uint64_t packetsSent = 0;
    uint64_t packetsReceived = 0;
    uint64_t ptoTotal = 0;
    uint64_t streamsActive = 0;
  };
  void quicConnectionStarted(kj::uint connIndex);
  void quicSampled(kj::uint connIndex, const QuicSample& sample);
  void quicConnectionEnded(kj::uint connIndex, const QuicSample& last);
  // Any thread (the connection's own, which alone may read its ngtcp2_conn): a QUIC connection of
  // `connIndex` is up; then its latest statistics, published as often as the connection wants
  // (at registration and every few hundred ms); then its last ones once it ended. The index's
  // counters keep their totals across reconnects, its gauges keep the last values (as
  // cloudflared's per-index series do).
  struct QuicIndex {
    kj::uint connIndex;
    QuicSample sample;   // counters: totals over all connections of the index
    bool live;
  };
  kj::Array<QuicIndex> quicIndices() const;
  // Sorted by connIndex; only indices that ever had a connection.
  uint64_t quicConnectionsStarted() const;
  uint64_t quicConnectionsClosed() const;

private:
  struct QuicSlot {
    kj::uint connIndex;
    QuicSample base;      // counters of the index's ended connections; gauges of the last one
    QuicSample latest;    // the live connection's last published sample
    bool live = false;
  };

  Shard shards[MAX_SHARDS];
  std::atomic<int64_t> orchestrationVersion{-1};
  kj::Vector<Location> locations;
  kj::Vector<Protocol> protocols;
  kj::Vector<UserHostname> hostnames;
  BuildInfo build;
  mutable std::mutex quicMutex;   // guards the three below
  kj::Vector<QuicSlot> quicSlots;
  uint64_t quicStarted = 0;
  uint64_t quicClosed = 0;

  QuicSlot& quicSlot(kj::uint connIndex);
  uint64_t sum(std::atomic<uint64_t> Shard::*field) const {
    uint64_t total = 0;
    for (auto& s: shards) total += (s.*field).load(std::memory_order_relaxed);
    return total;
  }

  kj::String hostnameText = kj::str("");
  kj::String connectorIdText = kj::str("");
  uint32_t ready = 0;
  uint64_t registered = 0;

  template <typename T>
  static T load(const T& v) { return __atomic_load_n(&v, __ATOMIC_RELAXED); }
  template <typename T, typename D>
  static void add(T& v, D delta) { __atomic_add_fetch(&v, static_cast<T>(delta), __ATOMIC_RELAXED); }
};

}  // namespace cfqt::observe
