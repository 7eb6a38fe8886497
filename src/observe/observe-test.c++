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
  return {response.statusCode, kj::mv(body)};
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
