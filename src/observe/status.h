#pragma once
// TunnelStatus: what the metrics server reports (PROTOCOL.md §1.5) and the counters the product
// keeps. Written by the tunnel layer, read by the metrics server and the public API. Lives on the
// tunnel's event loop thread (other threads read it through the loop's kj::Executor); the
// counters use atomic builtins so that a later multi-loop design can share them.

#include <kj/string.h>

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
  void requestFinished(bool failed) {
    add(concurrent, -1);
    if (failed) add(errors, 1);
  }

  uint64_t registrations() const { return load(registered); }
  uint64_t registrationFailures() const { return load(registerFailed); }
  void registrationSucceeded() { add(registered, 1); }
  void registrationFailed() { add(registerFailed, 1); }

private:
  kj::String hostnameText = kj::str("");
  kj::String connectorIdText = kj::str("");
  uint32_t ready = 0;
  uint64_t requests = 0;
  uint64_t concurrent = 0;
  uint64_t errors = 0;
  uint64_t registered = 0;
  uint64_t registerFailed = 0;

  template <typename T>
  static T load(const T& v) { return __atomic_load_n(&v, __ATOMIC_RELAXED); }
  template <typename T, typename D>
  static void add(T& v, D delta) { __atomic_add_fetch(&v, static_cast<T>(delta), __ATOMIC_RELAXED); }
};

}  // namespace cfqt::observe
