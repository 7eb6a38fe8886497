#include "observe/log.h"
#include "observe/metrics-server.h"

#include <kj/async-io.h>
#include <kj/compat/http.h>
#include <kj/test.h>

namespace cfqt::observe {
namespace {

using kj::uint;

struct Fetched {
  uint status;
  kj::String body;
  kj::String contentType;
};

Fetched fetch(kj::AsyncIoContext& io, kj::Timer& timer, const kj::HttpHeaderTable& table,
              uint port, kj::StringPtr path) {
  auto addr = io.provider->getNetwork().parseAddress(kj::str("127.0.0.1:", port))
      .wait(io.waitScope);
  auto conn = addr->connect().wait(io.waitScope);
  auto client = kj::newHttpClient(table, *conn);
  kj::HttpHeaders headers(table);
  auto response = client->request(kj::HttpMethod::GET, path, headers).response.wait(io.waitScope);
  auto body = response.body->readAllText(1 << 16).wait(io.waitScope);
  kj::String type = kj::str("");
  KJ_IF_MAYBE(t, response.headers->get(kj::HttpHeaderId::CONTENT_TYPE)) type = kj::str(*t);
  return {response.statusCode, kj::mv(body), kj::mv(type)};
}

KJ_TEST("metrics server: /ready, /quicktunnel, /healthcheck shapes") {
  auto io = kj::setupAsyncIo();
  auto& timer = io.provider->getTimer();
  kj::HttpHeaderTable table;
  TunnelStatus status;
  status.setConnectorId("3f1c2a4e-0000-4000-8000-000000000001");
  MetricsServer server(timer, table, status);
  auto receiver = bindMetrics(io.provider->getNetwork(), "127.0.0.1:0"_kj).wait(io.waitScope);
  uint port = receiver->getPort();
  auto listening = server.listen(kj::mv(receiver)).eagerlyEvaluate(nullptr);

  auto r = fetch(io, timer, table, port, "/ready");
  KJ_EXPECT(r.status == 503);
  KJ_EXPECT(r.body == "{\"status\":503,\"readyConnections\":0,"
                      "\"connectorId\":\"3f1c2a4e-0000-4000-8000-000000000001\"}", r.body);

  status.connectionReady();
  status.connectionReady();
  r = fetch(io, timer, table, port, "/ready");
  KJ_EXPECT(r.status == 200);
  KJ_EXPECT(r.body == "{\"status\":200,\"readyConnections\":2,"
                      "\"connectorId\":\"3f1c2a4e-0000-4000-8000-000000000001\"}", r.body);
  status.connectionNotReady();
  status.connectionNotReady();
  KJ_EXPECT(fetch(io, timer, table, port, "/ready").status == 503);

  r = fetch(io, timer, table, port, "/quicktunnel");
  KJ_EXPECT(r.status == 200);
  KJ_EXPECT(r.body == "{\"hostname\":\"\"}", r.body);
  status.setHostname("alpha-beta.trycloudflare.com");
  r = fetch(io, timer, table, port, "/quicktunnel?x=1");
  KJ_EXPECT(r.body == "{\"hostname\":\"alpha-beta.trycloudflare.com\"}", r.body);

  r = fetch(io, timer, table, port, "/healthcheck");
  KJ_EXPECT(r.status == 200);
  KJ_EXPECT(r.body == "OK\n");
  KJ_EXPECT(fetch(io, timer, table, port, "/nope").status == 404);

  status.requestStarted();
  r = fetch(io, timer, table, port, "/metrics");
  KJ_EXPECT(r.status == 200);
  KJ_EXPECT(r.contentType == "text/plain; version=0.0.4; charset=utf-8", r.contentType);
  KJ_EXPECT(r.body.startsWith("# HELP build_info "), r.body);
  KJ_EXPECT(strstr(r.body.cStr(), "\ncloudflared_tunnel_total_requests 1\n") != nullptr, r.body);
}

KJ_TEST("metrics: label values escape backslash, double quote and newline") {
  KJ_EXPECT(escapeLabelValue("plain-value.example:80") == "plain-value.example:80");
  KJ_EXPECT(escapeLabelValue("a\\b") == "a\\\\b", escapeLabelValue("a\\b"));
  KJ_EXPECT(escapeLabelValue("say \"hi\"") == "say \\\"hi\\\"");
  KJ_EXPECT(escapeLabelValue("two\nlines") == "two\\nlines");
  KJ_EXPECT(escapeLabelValue("\\\"\n") == "\\\\\\\"\\n");
  KJ_EXPECT(escapeLabelValue("tab\tstays") == "tab\tstays");   // only the three are escaped
  KJ_EXPECT(escapeLabelValue("") == "");
}

struct FakeSampler final: public TunnelStatus::QuicSampler {
  TunnelStatus::QuicSample value;
  TunnelStatus::QuicSample sample() const override { return value; }
};

bool hasLine(kj::StringPtr body, kj::StringPtr line) {
  size_t start = 0;
  for (size_t i = 0; i < body.size(); i++) {
    if (body[i] != '\n') continue;
    if (kj::arrayPtr(body.begin() + start, i - start) == line.asArray()) return true;
    start = i + 1;
  }
  return false;
}

KJ_TEST("metrics: /metrics text exposition with cloudflared's names") {
  TunnelStatus status;
  auto empty = metricsBody(status);
  // Scalars are always there; vectors only once they have a child.
  KJ_EXPECT(hasLine(empty, "cloudflared_tunnel_total_requests 0"), empty);
  KJ_EXPECT(hasLine(empty, "cloudflared_tunnel_ha_connections 0"), empty);
  KJ_EXPECT(hasLine(empty, "# TYPE cloudflared_tunnel_ha_connections gauge"), empty);
  KJ_EXPECT(empty.findFirst('{') != nullptr);   // build_info only
  KJ_EXPECT(strstr(empty.cStr(), "response_by_code") == nullptr, empty);
  KJ_EXPECT(strstr(empty.cStr(), "quic_client_smoothed_rtt") == nullptr, empty);

  status.setBuildInfo({kj::str("cfqt/1.2.3"), kj::str(""), kj::str("unknown"),
                       kj::str("2026.8.2")});
  status.userHostname("https://we\"ird\\host\nname");
  status.connectionReady();
  status.connectionReady();
  status.registrationSucceeded();
  status.registrationSucceeded();
  status.registrationSucceeded();
  status.registrationFailed(true);
  status.registrationFailed(false);
  status.registrationFailed(false);
  status.serverLocation(0, "lhr01");
  status.serverLocation(1, "ams02");
  status.serverLocation(0, "lhr01");
  status.serverLocation(1, "fra07");
  for (int i = 0; i < 3; i++) status.requestStarted();
  status.requestFinished();
  status.requestFailed();
  status.responseSent(200);
  status.responseSent(200);
  status.responseSent(404);
  status.responseSent(42);   // out of range: ignored
  status.localConfigPushed(true);

  FakeSampler first;
  first.value.smoothedRtt = 1500 * kj::MICROSECONDS;
  first.value.minRtt = 250 * kj::MICROSECONDS;
  first.value.latestRtt = 2 * kj::MILLISECONDS;
  first.value.bytesSent = 1000;
  first.value.bytesReceived = 2000;
  first.value.congestionWindow = 12000;
  status.quicConnectionStarted(1, first);
  FakeSampler second;
  second.value.bytesSent = 10;
  second.value.bytesReceived = 20;
  second.value.smoothedRtt = 3 * kj::MILLISECONDS;
  status.quicConnectionStarted(0, second);

  auto body = metricsBody(status);
  kj::StringPtr expected[] = {
      "# HELP build_info Build and version information",
      "# TYPE build_info gauge",
      "build_info{goversion=\"cfqt/1.2.3\",revision=\"unknown\",type=\"\",version=\"2026.8.2\"} 1",
      "cloudflared_config_local_config_pushes 1",
      "cloudflared_config_local_config_pushes_errors 0",
      "# TYPE cloudflared_tunnel_concurrent_requests_per_tunnel gauge",
      "cloudflared_tunnel_concurrent_requests_per_tunnel 2",
      "cloudflared_tunnel_ha_connections 2",
      "# TYPE cloudflared_tunnel_request_errors counter",
      "cloudflared_tunnel_request_errors 1",
      "# HELP cloudflared_tunnel_response_by_code Count of responses by HTTP status code",
      "# TYPE cloudflared_tunnel_response_by_code counter",
      "cloudflared_tunnel_response_by_code{status_code=\"200\"} 2",
      "cloudflared_tunnel_response_by_code{status_code=\"404\"} 1",
      "# TYPE cloudflared_tunnel_server_locations gauge",
      "cloudflared_tunnel_server_locations{connection_id=\"0\",edge_location=\"lhr01\"} 1",
      "cloudflared_tunnel_server_locations{connection_id=\"1\",edge_location=\"ams02\"} 0",
      "cloudflared_tunnel_server_locations{connection_id=\"1\",edge_location=\"fra07\"} 1",
      "# TYPE cloudflared_tunnel_total_requests counter",
      "cloudflared_tunnel_total_requests 3",
      "cloudflared_tunnel_tunnel_register_fail{error=\"dup_edge_conn\",rpcName=\"registerConnection\"} 1",
      "cloudflared_tunnel_tunnel_register_fail{error=\"server_error\",rpcName=\"registerConnection\"} 2",
      "cloudflared_tunnel_tunnel_register_success{rpcName=\"registerConnection\"} 3",
      "cloudflared_tunnel_user_hostnames_counts{userHostname=\"https://we\\\"ird\\\\host\\nname\"} 1",
      "# TYPE quic_client_smoothed_rtt gauge",
      "quic_client_smoothed_rtt{conn_index=\"0\"} 3",
      "quic_client_smoothed_rtt{conn_index=\"1\"} 1.5",
      "quic_client_min_rtt{conn_index=\"1\"} 0.25",
      "quic_client_latest_rtt{conn_index=\"1\"} 2",
      "quic_client_sent_bytes{conn_index=\"1\"} 1000",
      "quic_client_receive_bytes{conn_index=\"1\"} 2000",
      "quic_client_congestion_window{conn_index=\"1\"} 12000",
      "quic_client_total_connections 2",
      "quic_client_closed_connections 0",
  };
  for (auto line: expected) KJ_EXPECT(hasLine(body, line), line, body);

  // Families appear in name order, each with HELP then TYPE; every line ends with \n.
  KJ_EXPECT(body.endsWith("\n"));
  kj::Vector<kj::String> families;
  size_t start = 0;
  for (size_t i = 0; i < body.size(); i++) {
    if (body[i] != '\n') continue;
    auto line = kj::heapString(body.begin() + start, i - start);
    start = i + 1;
    if (line.startsWith("# TYPE ")) families.add(kj::str(line.slice(7)));
  }
  for (size_t i = 1; i < families.size(); i++) {
    KJ_EXPECT(families[i - 1] < families[i], families[i - 1], families[i]);
  }

  // Counters of an index survive a reconnect; gauges keep the last values.
  first.value.bytesSent = 1500;
  status.quicConnectionEnded(1);
  first.value.bytesSent = 999999;   // no longer read
  FakeSampler third;
  third.value.bytesSent = 5;
  third.value.smoothedRtt = 4 * kj::MILLISECONDS;
  body = metricsBody(status);
  KJ_EXPECT(hasLine(body, "quic_client_sent_bytes{conn_index=\"1\"} 1500"), body);
  KJ_EXPECT(hasLine(body, "quic_client_smoothed_rtt{conn_index=\"1\"} 1.5"), body);
  KJ_EXPECT(hasLine(body, "quic_client_closed_connections 1"), body);
  status.quicConnectionStarted(1, third);
  body = metricsBody(status);
  KJ_EXPECT(hasLine(body, "quic_client_sent_bytes{conn_index=\"1\"} 1505"), body);
  KJ_EXPECT(hasLine(body, "quic_client_smoothed_rtt{conn_index=\"1\"} 4"), body);
  KJ_EXPECT(hasLine(body, "quic_client_total_connections 3"), body);
  status.quicConnectionEnded(1);
  status.quicConnectionEnded(0);
}

KJ_TEST("metrics: default address takes the first free port of 20241..20245 or falls back") {
  auto io = kj::setupAsyncIo();
  auto& network = io.provider->getNetwork();
  // Occupy whatever of the known ports is free, so the default must move on; the result is a
  // known port not held by us, or the port-0 fallback.
  kj::Vector<kj::Own<kj::ConnectionReceiver>> held;
  for (auto port: DEFAULT_METRICS_PORTS) {
    KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
      held.add(network.parseAddress(kj::str("127.0.0.1:", port)).wait(io.waitScope)->listen());
    })) {}
  }
  auto receiver = bindMetrics(network, nullptr).wait(io.waitScope);
  uint port = receiver->getPort();
  for (auto& h: held) KJ_EXPECT(h->getPort() != port);
  KJ_EXPECT(port != 0);
  if (held.size() == kj::size(DEFAULT_METRICS_PORTS)) {
    KJ_EXPECT(port < 20241 || port > 20245, port);
  }
  held.clear();
  receiver = nullptr;
  // With the known ports free (unless another process holds them), the first free one is used.
  auto again = bindMetrics(network, nullptr).wait(io.waitScope);
  KJ_EXPECT(again->getPort() != 0);
}

KJ_TEST("log levels and line format") {
  KJ_EXPECT(parseLogLevel("debug") == LogLevel::DEBUG);
  KJ_EXPECT(parseLogLevel("warn") == LogLevel::WARN);
  KJ_EXPECT(parseLogLevel("loud") == nullptr);
  auto line = formatLogLine(LogLevel::INFO, "Registered tunnel connection", "connIndex=0");
  KJ_EXPECT(line.endsWith(" INF Registered tunnel connection connIndex=0\n"), line);
  KJ_EXPECT(line.size() > 21 && line[4] == '-' && line[19] == 'Z', line);
}

}  // namespace
}  // namespace cfqt::observe
