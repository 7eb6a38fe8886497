#include "observe/metrics-server.h"

#include <kj/debug.h>

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
    }
    return send(response, 404, "Not Found", kj::str("404 page not found\n"));
  }

private:
  const kj::HttpHeaderTable& table;
  TunnelStatus& status;

  kj::Promise<void> send(Response& response, uint code, kj::StringPtr text, kj::String body) {
    kj::HttpHeaders headers(table);
    headers.set(kj::HttpHeaderId::CONTENT_TYPE, "text/plain; charset=utf-8");
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
