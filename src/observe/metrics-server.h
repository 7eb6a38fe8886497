#pragma once
// The local metrics / readiness HTTP server (PROTOCOL.md §1.5): `/ready`, `/quicktunnel` and
// `/healthcheck` with cloudflared's exact bodies, and `/metrics` in the Prometheus text
// exposition format 0.0.4 under cloudflared's series names.

#include "observe/status.h"

#include <kj/async-io.h>
#include <kj/compat/http.h>
#include <kj/timer.h>

namespace cfqt::observe {

constexpr uint16_t DEFAULT_METRICS_PORTS[] = {20241, 20242, 20243, 20244, 20245};

kj::String readyBody(const TunnelStatus& status);
// {"status":200|503,"readyConnections":N,"connectorId":"<uuid>"}
kj::String quickTunnelBody(const TunnelStatus& status);
// {"hostname":"<host>"} (no trailing newline)

constexpr kj::StringPtr METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"_kj;

kj::String metricsBody(const TunnelStatus& status);
// The /metrics page: families sorted by name, labels by name, vectors without a child omitted
// (as Go's registry writes them).

kj::String escapeLabelValue(kj::StringPtr value);
// Prometheus text format: backslash, double quote and newline become \\, \" and \n.

class MetricsServer {
public:
  MetricsServer(kj::Timer& timer, const kj::HttpHeaderTable& headerTable, TunnelStatus& status);
  // Borrows all three; they must outlive this object.
  KJ_DISALLOW_COPY(MetricsServer);
  ~MetricsServer() noexcept(false);

  kj::Promise<void> listen(kj::Own<kj::ConnectionReceiver> receiver);
  // Serves until the promise is dropped.

  kj::Promise<void> drain();

private:
  class Service;
  kj::Own<Service> service;
  kj::HttpServer server;
};

kj::Promise<kj::Own<kj::ConnectionReceiver>> bindMetrics(kj::Network& network,
                                                         kj::Maybe<kj::StringPtr> address);
// `--metrics ADDR`: with an address, binds exactly it (rejects with its error). Without one,
// binds the first free of localhost:20241..20245 and falls back to localhost:0, as cloudflared
// HEAD does. "localhost" means 127.0.0.1 here so that the printed address is predictable.

kj::String receiverAddress(kj::ConnectionReceiver& receiver, kj::StringPtr host);
// "127.0.0.1:20241" for the log line.

}  // namespace cfqt::observe
