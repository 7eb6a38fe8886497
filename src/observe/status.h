#pragma once
// TunnelStatus: what the metrics server reports (PROTOCOL.md §1.5) and the counters the product
// keeps. Written by the tunnel layer, read by the metrics server and the public API. Lives on the
// tunnel's event loop thread (other threads read it through the loop's kj::Executor); the
// scalar counters use atomic builtins so that a later multi-loop design can share them. The
// labelled series (response codes, locations, QUIC samples) are plain loop-thread state: only the
// metrics server, on the same loop, reads them.

#include <kj/string.h>
#include <kj/time.h>
#include <kj/vector.h>

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

  uint64_t totalRequests() const { return load(requests); }
  uint64_t concurrentRequests() const { return load(concurrent); }
  uint64_t requestErrors() const { return load(errors); }
  void requestStarted() { add(requests, 1); add(concurrent, 1); }
  void requestFinished() { add(concurrent, -1); }
  // One edge-opened data stream served (cloudflared's total_requests and
  // concurrent_requests_per_tunnel).
  void requestFailed() { add(errors, 1); }
  uint64_t cancelledRequests() const { return load(cancelled); }
  void requestCancelled() { add(cancelled, 1); }
  // The edge abandoned a request before its response completed (the visitor went away): the
  // origin exchange was aborted and its origin connection closed.
  // Proxying one request failed (origin unreachable, or the exchange broke after the head);
  // counted by the origin layer, once per failed request (cloudflared's request_errors).

  static constexpr kj::uint MIN_STATUS_CODE = 100;
  static constexpr kj::uint MAX_STATUS_CODE = 999;
  void responseSent(kj::uint statusCode) {
    if (statusCode >= MIN_STATUS_CODE && statusCode <= MAX_STATUS_CODE) {
      ++byCode[statusCode - MIN_STATUS_CODE];
    }
  }
  uint64_t responsesWithCode(kj::uint statusCode) const {
    if (statusCode < MIN_STATUS_CODE || statusCode > MAX_STATUS_CODE) return 0;
    return byCode[statusCode - MIN_STATUS_CODE];
  }
  // The origin's response heads by HTTP status (cloudflared's response_by_code).

  uint64_t registrations() const { return load(registered); }
  uint64_t registrationFailures() const { return load(registerFailed); }
  uint64_t duplicateRegistrations() const { return load(registerDuplicate); }
  void registrationSucceeded() { add(registered, 1); }
  void registrationFailed(bool duplicate) {
    add(registerFailed, 1);
    if (duplicate) add(registerDuplicate, 1);
  }
  // registerConnection outcomes: failures are labelled error="dup_edge_conn" (duplicate) or
  // "server_error" (anything else), as cloudflared does.

  uint64_t localConfigPushes() const { return configPushes; }
  uint64_t localConfigPushErrors() const { return configPushErrors; }
  void localConfigPushed(bool ok) {
    ++configPushes;
    if (!ok) ++configPushErrors;
  }
  // updateLocalConfiguration sent on connection 0; like cloudflared, a failed push counts in
  // both series.

  int64_t configVersion() const { return orchestrationVersion; }
  void setConfigVersion(int64_t version) { orchestrationVersion = version; }
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
  class QuicSampler {
  public:
    virtual QuicSample sample() const = 0;
  };
  void quicConnectionStarted(kj::uint connIndex, const QuicSampler& sampler);
  // A QUIC connection of `connIndex` is up; `sampler` is read on demand until
  // quicConnectionEnded(connIndex), which must come before the sampler is destroyed.
  void quicConnectionEnded(kj::uint connIndex);
  // Takes the final sample: the index's counters keep their totals across reconnects, its gauges
  // keep the last values (as cloudflared's per-index series do).
  struct QuicIndex {
    kj::uint connIndex;
    QuicSample sample;   // counters: totals over all connections of the index
    bool live;
  };
  kj::Array<QuicIndex> quicIndices() const;
  // Sorted by connIndex; only indices that ever had a connection.
  uint64_t quicConnectionsStarted() const { return quicStarted; }
  uint64_t quicConnectionsClosed() const { return quicClosed; }

private:
  struct QuicSlot {
    kj::uint connIndex;
    QuicSample base;      // counters of the index's ended connections; gauges of the last one
    const QuicSampler* live = nullptr;
  };

  uint64_t byCode[MAX_STATUS_CODE - MIN_STATUS_CODE + 1] = {};
  uint64_t registerDuplicate = 0;
  uint64_t configPushes = 0;
  int64_t orchestrationVersion = -1;
  uint64_t configPushErrors = 0;
  kj::Vector<Location> locations;
  kj::Vector<Protocol> protocols;
  kj::Vector<UserHostname> hostnames;
  BuildInfo build;
  kj::Vector<QuicSlot> quicSlots;
  uint64_t quicStarted = 0;
  uint64_t quicClosed = 0;

  QuicSlot& quicSlot(kj::uint connIndex);

  kj::String hostnameText = kj::str("");
  kj::String connectorIdText = kj::str("");
  uint32_t ready = 0;
  uint64_t requests = 0;
  uint64_t concurrent = 0;
  uint64_t errors = 0;
  uint64_t cancelled = 0;
  uint64_t registered = 0;
  uint64_t registerFailed = 0;

  template <typename T>
  static T load(const T& v) { return __atomic_load_n(&v, __ATOMIC_RELAXED); }
  template <typename T, typename D>
  static void add(T& v, D delta) { __atomic_add_fetch(&v, static_cast<T>(delta), __ATOMIC_RELAXED); }
};

}  // namespace cfqt::observe
