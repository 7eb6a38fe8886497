#include "observe/metrics-server.h"

#include <kj/debug.h>

#include <algorithm>

namespace cfqt::observe {

using kj::uint;

kj::String readyBody(const TunnelStatus& status) {
  uint32_t n = status.readyConnections();
  return kj::str("{\"status\":", n > 0 ? 200 : 503, ",\"readyConnections\":", n,
                 ",\"connectorId\":\"", status.connectorId(), "\"}");
}

kj::String quickTunnelBody(const TunnelStatus& status) {
  // Hostnames are [a-z0-9.-] (from the API, checked by the tunnel layer); escape anyway.
  kj::Vector<char> out;
  for (char c: status.hostname()) {
    if (c == '"' || c == '\\') out.add('\\');
    if (static_cast<unsigned char>(c) < 0x20) continue;
    out.add(c);
  }
  out.add('\0');
  auto host = kj::String(out.releaseAsArray());
  return kj::str("{\"hostname\":\"", host, "\"}");
}

kj::String escapeLabelValue(kj::StringPtr value) {
  kj::Vector<char> out(value.size() + 1);
  for (char c: value) {
    switch (c) {
      case '\\': out.addAll(kj::StringPtr("\\\\")); break;
      case '"': out.addAll(kj::StringPtr("\\\"")); break;
      case '\n': out.addAll(kj::StringPtr("\\n")); break;
      default: out.add(c);
    }
  }
  out.add('\0');
  return kj::String(out.releaseAsArray());
}

namespace {

struct Label {
  kj::StringPtr name;
  kj::String value;
};

class Exposition {
  // Builds the text page family by family. Callers add families in name order and give each
  // sample's labels in name order.
public:
  void family(kj::StringPtr name, kj::StringPtr type, kj::StringPtr help) {
    current = name;
    out.add(kj::str("# HELP ", name, ' ', help, '\n'));
    out.add(kj::str("# TYPE ", name, ' ', type, '\n'));
  }

  template <typename Value>
  void sample(Value value) { out.add(kj::str(current, ' ', value, '\n')); }

  template <typename Value>
  void sample(kj::ArrayPtr<const Label> labels, Value value) {
    auto parts = KJ_MAP(l, labels) { return kj::str(l.name, "=\"", escapeLabelValue(l.value), '"'); };
    out.add(kj::str(current, '{', kj::strArray(parts, ","), "} ", value, '\n'));
  }

  template <typename Value>
  void sample(std::initializer_list<Label> labels, Value value) {
    sample(kj::arrayPtr(labels.begin(), labels.size()), kj::mv(value));
  }

  template <typename Value>
  void single(kj::StringPtr name, kj::StringPtr type, kj::StringPtr help, Value value) {
    family(name, type, help);
    sample(kj::mv(value));
  }

  kj::String finish() { return kj::strArray(out, ""); }

private:
  kj::StringPtr current;
  kj::Vector<kj::String> out;
};

kj::String millis(kj::Duration d) {
  // cloudflared reports its RTT gauges in milliseconds; we keep the sub-millisecond part.
  int64_t ns = d / kj::NANOSECONDS;
  return kj::str(static_cast<double>(ns) / 1e6);
}

}  // namespace

kj::String metricsBody(const TunnelStatus& status) {
  Exposition e;
  auto& build = status.buildInfo();
  e.family("build_info", "gauge", "Build and version information");
  e.sample({{"goversion", kj::str(build.goVersion)}, {"revision", kj::str(build.revision)},
            {"type", kj::str(build.type)}, {"version", kj::str(build.version)}}, 1);

  // Per connection index QUIC series (cloudflared's quic/metrics.go names further down).
  auto quic = status.quicIndices();
  auto perIndex = [&](kj::StringPtr name, kj::StringPtr type, kj::StringPtr help,
                      auto&& value) {
    if (quic.size() == 0) return;
    e.family(name, type, help);
    for (auto& q: quic) e.sample({{"conn_index", kj::str(q.connIndex)}}, value(q.sample));
  };
  using Sample = TunnelStatus::QuicSample;
  // cfqt-only series (no cloudflared equivalent) carry the cfqt_ prefix.
  perIndex("cfqt_quic_client_active_streams", "gauge",
           "Streams the QUIC connection of the index still tracks",
           [](const Sample& s) { return s.streamsActive; });
  perIndex("cfqt_quic_client_pto_count", "counter",
           "Probe timeouts expired on the connections of the index",
           [](const Sample& s) { return s.ptoTotal; });
  perIndex("cfqt_quic_client_received_packets", "counter",
           "QUIC packets received on the connections of the index",
           [](const Sample& s) { return s.packetsReceived; });
  perIndex("cfqt_quic_client_sent_packets", "counter",
           "QUIC packets sent on the connections of the index",
           [](const Sample& s) { return s.packetsSent; });

  auto protocols = status.connectionProtocols();
  if (protocols.size() > 0) {
    e.family("cfqt_tunnel_connection_protocol", "gauge",
             "The transport each connection index registered over (quic, http2)");
    kj::Vector<const TunnelStatus::Protocol*> sorted;
    for (auto& p: protocols) sorted.add(&p);
    std::sort(sorted.begin(), sorted.end(),
              [](auto a, auto b) { return a->connIndex < b->connIndex; });
    for (auto p: sorted) {
      e.sample({{"conn_index", kj::str(p->connIndex)}, {"protocol", kj::str(p->protocol)}}, 1);
    }
  }
  e.single("cfqt_tunnel_requests_cancelled", "counter",
           "Requests the edge abandoned before their response completed (visitor gone)",
           status.cancelledRequests());

  e.single("cloudflared_config_local_config_pushes", "counter",
           "Number of local configuration pushes to the edge", status.localConfigPushes());
  e.single("cloudflared_config_local_config_pushes_errors", "counter",
           "Number of errors occurred during local configuration pushes",
           status.localConfigPushErrors());
  e.single("cloudflared_orchestration_config_version", "gauge",
           "Configuration Version", status.configVersion());
  e.single("cloudflared_tunnel_concurrent_requests_per_tunnel", "gauge",
           "Concurrent requests proxied through each tunnel", status.concurrentRequests());
  // cloudflared counts the connection indices inside EdgeTunnelServer.Serve (dialling or
  // connected); cfqt reports the registered, not unregistering ones (the /ready count), which is
  // the same value while the tunnel is up.
  e.single("cloudflared_tunnel_ha_connections", "gauge", "Number of active ha connections",
           status.readyConnections());
  e.single("cloudflared_tunnel_request_errors", "counter", "Count of error proxying to origin",
           status.requestErrors());

  bool anyCode = false;
  for (kj::uint code = TunnelStatus::MIN_STATUS_CODE; code <= TunnelStatus::MAX_STATUS_CODE;
       code++) {
    // Go sorts the children by label value as text; three-digit codes sort the same as numbers.
    uint64_t n = status.responsesWithCode(code);
    if (n == 0) continue;
    if (!anyCode) {
      e.family("cloudflared_tunnel_response_by_code", "counter",
               "Count of responses by HTTP status code");
      anyCode = true;
    }
    e.sample({{"status_code", kj::str(code)}}, n);
  }

  auto locations = status.serverLocations();
  if (locations.size() > 0) {
    e.family("cloudflared_tunnel_server_locations", "gauge",
             "Where each tunnel is connected to. 1 means current location, 0 means previous "
             "locations.");
    kj::Vector<const TunnelStatus::Location*> sorted;
    for (auto& l: locations) sorted.add(&l);
    std::sort(sorted.begin(), sorted.end(), [](auto a, auto b) {
      if (a->connIndex != b->connIndex) return a->connIndex < b->connIndex;
      return a->location < b->location;
    });
    for (auto l: sorted) {
      e.sample({{"connection_id", kj::str(l->connIndex)}, {"edge_location", kj::str(l->location)}},
               l->value);
    }
  }

  e.single("cloudflared_tunnel_total_requests", "counter",
           "Amount of requests proxied through all the tunnels", status.totalRequests());

  uint64_t failures = status.registrationFailures();
  uint64_t duplicates = status.duplicateRegistrations();
  if (failures > 0) {
    e.family("cloudflared_tunnel_tunnel_register_fail", "counter",
             "Count of tunnel registration errors by type");
    if (duplicates > 0) {
      e.sample({{"error", kj::str("dup_edge_conn")}, {"rpcName", kj::str("registerConnection")}},
               duplicates);
    }
    if (failures > duplicates) {
      e.sample({{"error", kj::str("server_error")}, {"rpcName", kj::str("registerConnection")}},
               failures - duplicates);
    }
  }
  if (status.registrations() > 0) {
    e.family("cloudflared_tunnel_tunnel_register_success", "counter",
             "Count of successful tunnel registrations");
    e.sample({{"rpcName", kj::str("registerConnection")}}, status.registrations());
  }

  auto hostnames = status.userHostnames();
  if (hostnames.size() > 0) {
    e.family("cloudflared_tunnel_user_hostnames_counts", "counter",
             "Which user hostnames cloudflared is serving");
    for (auto& h: hostnames) e.sample({{"userHostname", kj::str(h.url)}}, h.count);
  }

  e.single("quic_client_closed_connections", "counter",
           "Number of connections that has been closed", status.quicConnectionsClosed());
  perIndex("quic_client_congestion_window", "gauge", "Current congestion window size",
           [](const Sample& s) { return s.congestionWindow; });
  perIndex("quic_client_latest_rtt", "gauge", "Latest RTT measured on a connection",
           [](const Sample& s) { return millis(s.latestRtt); });
  perIndex("quic_client_min_rtt", "gauge", "Lowest RTT measured on a connection in millisec",
           [](const Sample& s) { return millis(s.minRtt); });
  perIndex("quic_client_receive_bytes", "counter",
           "Number of bytes that have been received through a connection",
           [](const Sample& s) { return s.bytesReceived; });
  perIndex("quic_client_sent_bytes", "counter",
           "Number of bytes that have been sent through a connection",
           [](const Sample& s) { return s.bytesSent; });
  perIndex("quic_client_smoothed_rtt", "gauge",
           "Calculated smoothed RTT measured on a connection in millisec",
           [](const Sample& s) { return millis(s.smoothedRtt); });
  e.single("quic_client_total_connections", "counter", "Number of connections initiated",
           status.quicConnectionsStarted());
  return e.finish();
}

class MetricsServer::Service final: public kj::HttpService {
public:
  Service(const kj::HttpHeaderTable& table, TunnelStatus& status): table(table), status(status) {}

  kj::Promise<void> request(kj::HttpMethod method, kj::StringPtr url,
                            const kj::HttpHeaders& headers, kj::AsyncInputStream& requestBody,
                            Response& response) override {
    kj::String pathCopy = kj::heapString(url);
    KJ_IF_MAYBE(q, url.findFirst('?')) pathCopy = kj::heapString(url.begin(), *q);
    if (method != kj::HttpMethod::GET && method != kj::HttpMethod::HEAD) {
      return send(response, 405, "Method Not Allowed", kj::str("method not allowed\n"));
    }
    if (pathCopy == "/ready") {
      uint32_t n = status.readyConnections();
      return send(response, n > 0 ? 200 : 503, n > 0 ? "OK" : "Service Unavailable",
                  readyBody(status));
    } else if (pathCopy == "/quicktunnel") {
      return send(response, 200, "OK", quickTunnelBody(status));
    } else if (pathCopy == "/healthcheck") {
      return send(response, 200, "OK", kj::str("OK\n"));
    } else if (pathCopy == "/metrics") {
      return send(response, 200, "OK", metricsBody(status), METRICS_CONTENT_TYPE);
    }
    return send(response, 404, "Not Found", kj::str("404 page not found\n"));
  }

private:
  const kj::HttpHeaderTable& table;
  TunnelStatus& status;

  kj::Promise<void> send(Response& response, uint code, kj::StringPtr text, kj::String body,
                         kj::StringPtr contentType = "text/plain; charset=utf-8") {
    kj::HttpHeaders headers(table);
    headers.set(kj::HttpHeaderId::CONTENT_TYPE, contentType);
    auto out = response.send(code, text, headers, body.size());
    auto promise = out->write(body.begin(), body.size());
    return promise.attach(kj::mv(out), kj::mv(body));
  }
};

MetricsServer::MetricsServer(kj::Timer& timer, const kj::HttpHeaderTable& headerTable,
                             TunnelStatus& status)
    : service(kj::heap<Service>(headerTable, status)),
      server(timer, headerTable, *service, kj::HttpServerSettings{
          .headerTimeout = 10 * kj::SECONDS, .pipelineTimeout = 10 * kj::SECONDS}) {}

MetricsServer::~MetricsServer() noexcept(false) {}

kj::Promise<void> MetricsServer::listen(kj::Own<kj::ConnectionReceiver> receiver) {
  auto promise = server.listenHttp(*receiver);
  return promise.attach(kj::mv(receiver));
}

kj::Promise<void> MetricsServer::drain() { return server.drain(); }

namespace {

kj::String normalizeHost(kj::StringPtr address) {
  if (address.startsWith("localhost:")) return kj::str("127.0.0.1", address.slice(9));
  if (address.startsWith(":")) return kj::str("127.0.0.1", address);
  return kj::str(address);
}

kj::Promise<kj::Own<kj::ConnectionReceiver>> tryPorts(kj::Network& network, uint i) {
  if (i >= kj::size(DEFAULT_METRICS_PORTS)) {
    return network.parseAddress("127.0.0.1:0").then([](kj::Own<kj::NetworkAddress> addr) {
      return addr->listen();
    });
  }
  return network.parseAddress(kj::str("127.0.0.1:", DEFAULT_METRICS_PORTS[i]))
      .then([](kj::Own<kj::NetworkAddress> addr) { return addr->listen(); })
      .catch_([&network, i](kj::Exception&&) { return tryPorts(network, i + 1); });
}

}  // namespace

kj::Promise<kj::Own<kj::ConnectionReceiver>> bindMetrics(kj::Network& network,
                                                         kj::Maybe<kj::StringPtr> address) {
  KJ_IF_MAYBE(a, address) {
    auto text = normalizeHost(*a);
    return network.parseAddress(text).then([](kj::Own<kj::NetworkAddress> addr) {
      return addr->listen();
    });
  }
  return tryPorts(network, 0);
}

kj::String receiverAddress(kj::ConnectionReceiver& receiver, kj::StringPtr host) {
  return kj::str(host, ':', receiver.getPort());
}

}  // namespace cfqt::observe
