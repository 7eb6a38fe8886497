#include "observe/log.h"
#include "observe/metrics-server.h"

#include <kj/async-io.h>
#include <kj/compat/http.h>
#include <kj/test.h>
#include <kj/thread.h>

#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

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

  status.shard(0).requestStarted();
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
  status.shard(0).registrationFailed(true);
  status.shard(1).registrationFailed(false);
  status.shard(0).registrationFailed(false);
  status.serverLocation(0, "lhr01");
  status.serverLocation(1, "ams02");
  status.serverLocation(0, "lhr01");
  status.serverLocation(1, "fra07");
  status.connectionProtocol(1, "http2");
  status.connectionProtocol(0, "http2");
  status.connectionProtocol(0, "quic");
  // Per-request counters are sharded by connection index and summed.
  for (int i = 0; i < 3; i++) status.shard(i % 2).requestStarted();
  status.shard(1).requestFinished();
  status.shard(0).requestFailed();
  status.shard(0).responseSent(200);
  status.shard(1).responseSent(200);
  status.shard(1).responseSent(404);
  status.shard(1).responseSent(42);   // out of range: ignored
  status.shard(0).localConfigPushed(true);

  TunnelStatus::QuicSample first;
  first.smoothedRtt = 1500 * kj::MICROSECONDS;
  first.minRtt = 250 * kj::MICROSECONDS;
  first.latestRtt = 2 * kj::MILLISECONDS;
  first.bytesSent = 1000;
  first.bytesReceived = 2000;
  first.congestionWindow = 12000;
  status.quicConnectionStarted(1);
  status.quicSampled(1, first);
  TunnelStatus::QuicSample second;
  second.bytesSent = 10;
  second.bytesReceived = 20;
  second.smoothedRtt = 3 * kj::MILLISECONDS;
  status.quicConnectionStarted(0);
  status.quicSampled(0, second);

  auto body = metricsBody(status);
  kj::StringPtr expected[] = {
      "# HELP build_info Build and version information",
      "# TYPE build_info gauge",
      "build_info{goversion=\"cfqt/1.2.3\",revision=\"unknown\",type=\"\",version=\"2026.8.2\"} 1",
      "cloudflared_config_local_config_pushes 1",
      "cloudflared_config_local_config_pushes_errors 0",
      "# TYPE cfqt_tunnel_connection_protocol gauge",
      "cfqt_tunnel_connection_protocol{conn_index=\"0\",protocol=\"quic\"} 1",
      "cfqt_tunnel_connection_protocol{conn_index=\"1\",protocol=\"http2\"} 1",
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
  first.bytesSent = 1500;
  status.quicConnectionEnded(1, first);
  first.bytesSent = 999999;
  status.quicSampled(1, first);     // not live any more: ignored
  TunnelStatus::QuicSample third;
  third.bytesSent = 5;
  third.smoothedRtt = 4 * kj::MILLISECONDS;
  body = metricsBody(status);
  KJ_EXPECT(hasLine(body, "quic_client_sent_bytes{conn_index=\"1\"} 1500"), body);
  KJ_EXPECT(hasLine(body, "quic_client_smoothed_rtt{conn_index=\"1\"} 1.5"), body);
  KJ_EXPECT(hasLine(body, "quic_client_closed_connections 1"), body);
  status.quicConnectionStarted(1);
  status.quicSampled(1, third);
  body = metricsBody(status);
  KJ_EXPECT(hasLine(body, "quic_client_sent_bytes{conn_index=\"1\"} 1505"), body);
  KJ_EXPECT(hasLine(body, "quic_client_smoothed_rtt{conn_index=\"1\"} 4"), body);
  KJ_EXPECT(hasLine(body, "quic_client_total_connections 3"), body);
  status.quicConnectionEnded(1, third);
  status.quicConnectionEnded(0, second);
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


// ---------------------------------------------------------------------------------------------
// Log volume (issue 13): the logger writes to a temporary file, with an injected clock.

struct FakeClock final: public kj::MonotonicClock {
  kj::TimePoint time = kj::origin<kj::TimePoint>() + 1000 * kj::SECONDS;
  kj::TimePoint now() const override { return time; }
  void advance(kj::Duration d) { time += d; }
};

class TempLog {
  // A fresh file name under $TMPDIR (or /tmp); removed at the end of the test.
public:
  TempLog() {
    const char* dir = getenv("TMPDIR");
    path = kj::str(dir != nullptr && *dir != '\0' ? dir : "/tmp", "/cfqt-observe-test-XXXXXX");
    int fd;
    KJ_SYSCALL(fd = mkstemp(path.begin()), path);
    KJ_SYSCALL(close(fd));
  }
  ~TempLog() noexcept(false) { unlink(path.cStr()); }
  KJ_DISALLOW_COPY(TempLog);

  LogConfig config(FakeClock& clock, kj::Duration interval, uint32_t burst, uint32_t maxLines) {
    LogConfig c;
    c.level = LogLevel::DEBUG;
    c.file = kj::str(path);
    c.toStderr = false;
    c.rateInterval = interval;
    c.burst = burst;
    c.maxLinesPerInterval = maxLines;
    c.clock = clock;
    return c;
  }

  kj::Vector<kj::String> lines() {
    // Each line without its timestamp ("2026-11-25T10:56:58Z ") and newline.
    int fd;
    KJ_SYSCALL(fd = open(path.cStr(), O_RDONLY | O_CLOEXEC), path);
    kj::FdInputStream in{kj::AutoCloseFd(fd)};
    auto text = in.readAllText();
    kj::Vector<kj::String> result;
    size_t start = 0;
    for (size_t i = 0; i < text.size(); i++) {
      if (text[i] != '\n') continue;
      KJ_ASSERT(i - start > 21 && text[start + 4] == '-' && text[start + 19] == 'Z' &&
                text[start + 20] == ' ', kj::heapString(text.begin() + start, i - start));
      result.add(kj::heapString(text.begin() + start + 21, i - start - 21));
      start = i + 1;
    }
    KJ_EXPECT(start == text.size(), "the file does not end with a newline", text);
    return result;
  }

  kj::String path;
};

size_t countStartingWith(kj::ArrayPtr<const kj::String> lines, kj::StringPtr prefix) {
  size_t n = 0;
  for (auto& l: lines) {
    if (l.startsWith(prefix)) n++;
  }
  return n;
}

KJ_TEST("log volume: a burst per message, then only a count, then one summary with the count") {
  TempLog tmp;
  FakeClock clock;
  {
    Logger logger(tmp.config(clock, 100 * kj::MILLISECONDS, 3, 0));
    for (int i = 0; i < 10; i++) {
      logger.warn("Request failed", kj::str("dest=/", i));
      clock.advance(1 * kj::MILLISECONDS);
    }
    auto lines = tmp.lines();
    KJ_ASSERT(lines.size() == 3, lines);
    KJ_EXPECT(lines[0] == "WRN Request failed dest=/0", lines[0]);
    KJ_EXPECT(lines[2] == "WRN Request failed dest=/2", lines[2]);

    clock.advance(89 * kj::MILLISECONDS);   // 99 ms after the first line: same window
    logger.warn("Request failed", "dest=/10");
    KJ_EXPECT(tmp.lines().size() == 3);

    clock.advance(1 * kj::MILLISECONDS);    // the window is over: summary first, then the line
    logger.warn("Request failed", "dest=/11");
    lines = tmp.lines();
    KJ_ASSERT(lines.size() == 5, lines);
    KJ_EXPECT(lines[3] == "WRN Request failed suppressed=8 interval=100ms", lines[3]);
    KJ_EXPECT(lines[4] == "WRN Request failed dest=/11", lines[4]);

    // A window with nothing suppressed leaves no summary.
    clock.advance(1 * kj::SECONDS);
    logger.warn("Request failed", "dest=/12");
    lines = tmp.lines();
    KJ_ASSERT(lines.size() == 6, lines);
    KJ_EXPECT(lines[5] == "WRN Request failed dest=/12", lines[5]);
  }
  KJ_EXPECT(tmp.lines().size() == 6, "the destructor wrote a summary of nothing", tmp.lines());
}

KJ_TEST("log volume: messages and levels are counted apart") {
  TempLog tmp;
  FakeClock clock;
  {
    Logger logger(tmp.config(clock, 1 * kj::SECONDS, 2, 0));
    for (int i = 0; i < 5; i++) {
      logger.warn("Alpha failed", kj::str("i=", i));
      logger.warn("Beta failed", kj::str("i=", i));
      logger.error("Alpha failed", kj::str("i=", i));
      logger.info("Quiet", kj::str("i=", i));
    }
    auto lines = tmp.lines();
    KJ_EXPECT(lines.size() == 8, lines);
    KJ_EXPECT(countStartingWith(lines, "WRN Alpha failed i=") == 2, lines);
    KJ_EXPECT(countStartingWith(lines, "WRN Beta failed i=") == 2, lines);
    KJ_EXPECT(countStartingWith(lines, "ERR Alpha failed i=") == 2, lines);
    KJ_EXPECT(countStartingWith(lines, "INF Quiet i=") == 2, lines);
  }
  auto lines = tmp.lines();
  KJ_ASSERT(lines.size() == 12, lines);
  KJ_EXPECT(countStartingWith(lines, "WRN Alpha failed suppressed=3 interval=1s") == 1, lines);
  KJ_EXPECT(countStartingWith(lines, "WRN Beta failed suppressed=3 interval=1s") == 1, lines);
  KJ_EXPECT(countStartingWith(lines, "ERR Alpha failed suppressed=3 interval=1s") == 1, lines);
  KJ_EXPECT(countStartingWith(lines, "INF Quiet suppressed=3 interval=1s") == 1, lines);
}

KJ_TEST("log volume: a pending summary is written by the next line of any message") {
  TempLog tmp;
  FakeClock clock;
  Logger logger(tmp.config(clock, 1 * kj::SECONDS, 1, 0));
  for (int i = 0; i < 4; i++) logger.warn("Request failed", kj::str("i=", i));
  clock.advance(2 * kj::SECONDS);
  logger.info("Something else");
  auto lines = tmp.lines();
  KJ_ASSERT(lines.size() == 3, lines);
  KJ_EXPECT(lines[0] == "WRN Request failed i=0", lines[0]);
  KJ_EXPECT(lines[1] == "WRN Request failed suppressed=3 interval=1s", lines[1]);
  KJ_EXPECT(lines[2] == "INF Something else", lines[2]);
  // The key was forgotten with its summary: the next line opens a new window.
  logger.warn("Request failed", "i=4");
  logger.warn("Request failed", "i=5");
  lines = tmp.lines();
  KJ_EXPECT(lines.size() == 4 && lines[3] == "WRN Request failed i=4", lines);
}

KJ_TEST("log volume: a global limit over all messages, with one summary at the highest level") {
  TempLog tmp;
  FakeClock clock;
  {
    Logger logger(tmp.config(clock, 1 * kj::SECONDS, 5, 4));
    for (int i = 0; i < 10; i++) logger.info(kj::str("Distinct message ", i));
    logger.error("An error over the limit");
    logger.debug("A debug line over the limit");
    auto lines = tmp.lines();
    KJ_ASSERT(lines.size() == 4, lines);
    KJ_EXPECT(lines[3] == "INF Distinct message 3", lines[3]);

    clock.advance(1 * kj::SECONDS);
    logger.info("Next interval");
    lines = tmp.lines();
    KJ_ASSERT(lines.size() == 6, lines);
    KJ_EXPECT(lines[4] == "ERR Log lines suppressed suppressed=8 interval=1s", lines[4]);
    KJ_EXPECT(lines[5] == "INF Next interval", lines[5]);

    // The summary counts against the new interval's budget: 2 more fit, then the rest count.
    for (int i = 0; i < 5; i++) logger.warn(kj::str("Later ", i));
    KJ_EXPECT(tmp.lines().size() == 8, tmp.lines());
  }
  auto lines = tmp.lines();
  KJ_ASSERT(lines.size() == 9, lines);
  KJ_EXPECT(lines[8] == "WRN Log lines suppressed suppressed=3 interval=1s", lines[8]);
}

KJ_TEST("log volume: a per-message summary over the global limit joins the global count") {
  TempLog tmp;
  FakeClock clock;
  {
    Logger logger(tmp.config(clock, 1 * kj::SECONDS, 1, 2));
    for (int i = 0; i < 6; i++) logger.warn("Request failed");   // 1 written, 5 counted
    clock.advance(1 * kj::SECONDS);
    logger.info("Filler one");         // the key's window is over: its summary comes first
    auto lines = tmp.lines();
    // New interval: the key's summary and "Filler one" take the budget of 2.
    KJ_ASSERT(lines.size() == 3, lines);
    KJ_EXPECT(lines[1] == "WRN Request failed suppressed=5 interval=1s", lines[1]);
    KJ_EXPECT(lines[2] == "INF Filler one", lines[2]);
    for (int i = 0; i < 3; i++) logger.warn("Request failed");   // 0 fit: 1 passes, is dropped
    logger.info("Filler two");   // dropped too
  }
  auto lines = tmp.lines();
  // The destructor: the key's 2 suppressed, then the global count (1 + 1 dropped lines).
  KJ_ASSERT(lines.size() == 5, lines);
  KJ_EXPECT(lines[3] == "WRN Request failed suppressed=2 interval=1s", lines[3]);
  KJ_EXPECT(lines[4] == "WRN Log lines suppressed suppressed=2 interval=1s", lines[4]);
}

KJ_TEST("log volume: the destructor writes what is still counted") {
  TempLog tmp;
  FakeClock clock;
  {
    Logger logger(tmp.config(clock, 1 * kj::SECONDS, 5, 0));
    for (int i = 0; i < 8; i++) logger.warn("Request failed", kj::str("i=", i));
    KJ_EXPECT(tmp.lines().size() == 5);
  }
  auto lines = tmp.lines();
  KJ_ASSERT(lines.size() == 6, lines);
  KJ_EXPECT(lines[5] == "WRN Request failed suppressed=3 interval=1s", lines[5]);
}

KJ_TEST("log volume: zero interval, burst or limit turn the limits off") {
  TempLog tmp;
  FakeClock clock;
  {
    Logger logger(tmp.config(clock, 0 * kj::SECONDS, 1, 1));
    for (int i = 0; i < 20; i++) logger.warn("Same");
  }
  KJ_EXPECT(tmp.lines().size() == 20);
  TempLog tmp2;
  {
    Logger logger(tmp2.config(clock, 1 * kj::SECONDS, 0, 0));
    for (int i = 0; i < 20; i++) logger.warn("Same");
  }
  KJ_EXPECT(tmp2.lines().size() == 20);
}

KJ_TEST("log volume: disabled levels are not counted") {
  TempLog tmp;
  FakeClock clock;
  auto config = tmp.config(clock, 1 * kj::SECONDS, 1, 1);
  config.level = LogLevel::WARN;
  {
    Logger logger(kj::mv(config));
    for (int i = 0; i < 50; i++) logger.info("Not written");
    logger.warn("Written");
  }
  auto lines = tmp.lines();
  KJ_EXPECT(lines.size() == 1 && lines[0] == "WRN Written", lines);
}

KJ_TEST("log volume: long lines are cut") {
  TempLog tmp;
  FakeClock clock;
  auto config = tmp.config(clock, 1 * kj::SECONDS, 5, 0);
  config.maxLineBytes = 64;
  {
    Logger logger(kj::mv(config));
    logger.warn("Request failed", kj::str("dest=/", kj::repeat('a', 10000)));
    logger.warn("Short", "x=1");
  }
  auto lines = tmp.lines();
  KJ_ASSERT(lines.size() == 2, lines);
  // 64 bytes of the line (21 of them the timestamp), then the count of the rest.
  KJ_EXPECT(lines[0] == kj::str("WRN Request failed dest=/", kj::repeat('a', 64 - 21 - 25),
                                " truncated=", 21 + 25 + 10000 - 64), lines[0]);
  KJ_EXPECT(lines[1] == "WRN Short x=1", lines[1]);
}

KJ_TEST("log volume: beyond the table of messages, lines are held to the global limit only") {
  TempLog tmp;
  FakeClock clock;
  {
    Logger logger(tmp.config(clock, 1 * kj::SECONDS, 1, 0));
    for (size_t i = 0; i < Logger::MAX_TRACKED_MESSAGES; i++) {
      logger.debug(kj::str("Message ", i));
    }
    logger.warn("Untracked");
    logger.warn("Untracked");
    KJ_EXPECT(countStartingWith(tmp.lines(), "WRN Untracked") == 2);
    clock.advance(1 * kj::SECONDS);   // the table is swept when the next new key needs room
    logger.warn("Untracked");
    logger.warn("Untracked");
    KJ_EXPECT(countStartingWith(tmp.lines(), "WRN Untracked") == 3, tmp.lines().size());
  }
  KJ_EXPECT(countStartingWith(tmp.lines(), "WRN Untracked suppressed=1 interval=1s") == 1);
}

KJ_TEST("log volume: several threads share the counts") {
  TempLog tmp;
  FakeClock clock;   // frozen: every line falls in one window
  {
    auto config = tmp.config(clock, 1 * kj::SECONDS, 5, 0);
    config.level = LogLevel::INFO;
    Logger logger(kj::mv(config));
    {
      kj::Vector<kj::Own<kj::Thread>> threads;
      for (int t = 0; t < 4; t++) {
        threads.add(kj::heap<kj::Thread>([&logger, t]() {
          LogCallback callback(logger);
          for (int i = 0; i < 500; i++) {
            if (i % 2 == 0) {
              logger.warn("Request failed", kj::str("thread=", t, " i=", i));
            } else {
              KJ_LOG(WARNING, "Origin gone", t, i);
            }
          }
        }));
      }
    }
    KJ_EXPECT(tmp.lines().size() == 10, tmp.lines());
  }
  auto lines = tmp.lines();
  KJ_ASSERT(lines.size() == 12, lines);
  KJ_EXPECT(countStartingWith(lines, "WRN Request failed suppressed=995 interval=1s") == 1, lines);
  KJ_EXPECT(countStartingWith(lines, "WRN Origin gone suppressed=995 interval=1s") == 1, lines);
}

KJ_TEST("log volume: KJ_LOG lines are one sentence plus fields, keyed by the sentence") {
  TempLog tmp;
  FakeClock clock;
  {
    auto config = tmp.config(clock, 1 * kj::SECONDS, 2, 0);
    config.level = LogLevel::INFO;
    Logger logger(kj::mv(config));
    LogCallback callback(logger);
    for (int i = 0; i < 6; i++) {
      auto dest = kj::str("http://127.0.0.1:9/path", i);
      auto cause = kj::str("dial tcp 127.0.0.1:9: connect: connection refused");
      KJ_LOG(WARNING, "Request failed", dest, cause);
    }
    auto lines = tmp.lines();
    KJ_ASSERT(lines.size() == 2, lines);
    KJ_EXPECT(lines[0] == "WRN Request failed detail=\"http://127.0.0.1:9/path0; "
                          "dial tcp 127.0.0.1:9: connect: connection refused\"", lines[0]);
    KJ_EXPECT(lines[1].startsWith("WRN Request failed detail=\"http://127.0.0.1:9/path1; "),
              lines[1]);
  }
  auto lines = tmp.lines();
  KJ_ASSERT(lines.size() == 3, lines);
  KJ_EXPECT(lines[2] == "WRN Request failed suppressed=4 interval=1s", lines[2]);
}

KJ_TEST("KJ_LOG at debug keeps the expression names and the source location") {
  TempLog tmp;
  FakeClock clock;
  {
    Logger logger(tmp.config(clock, 1 * kj::SECONDS, 5, 0));
    LogCallback callback(logger);
    auto dest = kj::str("http://127.0.0.1:9/");
    KJ_LOG(WARNING, "Request failed", dest);
    KJ_LOG(INFO, "quiet detail", dest);
  }
  auto lines = tmp.lines();
  KJ_ASSERT(lines.size() == 3, lines);
  KJ_EXPECT(lines[0] == "WRN Request failed detail=http://127.0.0.1:9/", lines[0]);
  KJ_EXPECT(lines[1].startsWith("DBG Request failed dest=http://127.0.0.1:9/ "
                                "src=observe-test.c++:"), lines[1]);
  KJ_EXPECT(lines[2].startsWith("DBG quiet detail dest=http://127.0.0.1:9/ src=observe-test.c++:"),
            lines[2]);
}

KJ_TEST("KJ_LOG with an exception: its description only, above debug") {
  TempLog tmp;
  FakeClock clock;
  {
    auto config = tmp.config(clock, 1 * kj::SECONDS, 5, 0);
    config.level = LogLevel::INFO;
    Logger logger(kj::mv(config));
    LogCallback callback(logger);
    auto e = kj::Exception(kj::Exception::Type::DISCONNECTED, "x/y.c++", 12,
                           kj::str("peer went away"));
    e.addTrace(reinterpret_cast<void*>(0x1234));
    KJ_LOG(ERROR, "returning failure over rpc", e);
  }
  auto lines = tmp.lines();
  KJ_ASSERT(lines.size() == 1, lines);
  KJ_EXPECT(lines[0] == "ERR returning failure over rpc detail=\"peer went away\"", lines[0]);
}

KJ_TEST("KJ_LOG text: message and fields") {
  auto check = [](kj::StringPtr text, kj::StringPtr message, kj::StringPtr fields) {
    auto split = splitKjLogText(text);
    KJ_EXPECT(split.message == message, text, split.message);
    KJ_EXPECT(split.fields == fields, text, split.fields);
  };
  check("Request failed; impl.config.toString() = http://127.0.0.1:1; request.getDest() = "
        "http://x/a?b=c; cause = dial tcp: connection refused",
        "Request failed",
        "impl.config.toString=http://127.0.0.1:1 request.getDest=\"http://x/a?b=c\" "
        "cause=\"dial tcp: connection refused\"");
  check("plain sentence", "plain sentence", "");
  check("edge discovery: SRV lookup failed; trying DNS-over-TLS; plainDnsError = timeout",
        "edge discovery: SRV lookup failed; trying DNS-over-TLS", "plainDnsError=timeout");
  // An exception value keeps its "; " text unless a part looks like `name = value`.
  check("lost; e = x.c++:17: disconnected: peer gone; extra words; x = 5",
        "lost", "e=\"x.c++:17: disconnected: peer gone; extra words\" x=5");
  check("e = x.c++:17: failed: boom", "", "e=\"x.c++:17: failed: boom\"");
  check("count; f(a, b) = 3; p->q = \"quoted\"\nnext", "count",
        "fab=3 p.q=\"\\\"quoted\\\"\\nnext\"");
  check("a sentence = not a field; v = 1", "a sentence = not a field", "v=1");
  check("empty; v = ", "empty", "v=\"\"");

  KJ_EXPECT(quoteFieldValue("abc") == "abc");
  KJ_EXPECT(quoteFieldValue("") == "\"\"");
  KJ_EXPECT(quoteFieldValue("a b") == "\"a b\"");
  KJ_EXPECT(quoteFieldValue("tab\there\x01") == "\"tab\\there\\x01\"",
            quoteFieldValue("tab\there\x01"));
  KJ_EXPECT(quoteFieldValue("back\\slash") == "\"back\\\\slash\"");
}

KJ_TEST("KJ_LOG without a literal is named after its source line") {
  TempLog tmp;
  FakeClock clock;
  {
    Logger logger(tmp.config(clock, 1 * kj::SECONDS, 5, 0));
    LogCallback callback(logger);
    int value = 7;
    KJ_LOG(ERROR, value);
  }
  auto lines = tmp.lines();
  KJ_ASSERT(lines.size() == 2, lines);
  KJ_EXPECT(lines[0] == "ERR Internal error detail=7", lines[0]);
  KJ_EXPECT(lines[1].startsWith("DBG observe-test.c++:"), lines[1]);
  KJ_EXPECT(strstr(lines[1].cStr(), " value=7 src=observe-test.c++:") != nullptr, lines[1]);
}

// ---------------------------------------------------------------------------------------------
// Fields, escaping, JSON, the sink and the thread's logger (issue 16)

KJ_TEST("fields: escaped console values, numbers, durations") {
  Fields f;
  f.add("connIndex", 0).add("dest", "https://a.example/x?y=1").add("plain", "abc")
   .add("spaced", "two words").add("quote", "say \"hi\"").add("ctl", "a\x1b[31mred\nline")
   .add("empty", "").add("wait", 1500 * kj::MILLISECONDS).add("ok", true)
   .add("bad", kj::heapString("\xff\xfe", 2)).add("rtl", "x\u202ey").add("utf", "caf\u00e9");
  KJ_EXPECT(f.toText() ==
      "connIndex=0 dest=\"https://a.example/x?y=1\" plain=abc spaced=\"two words\" "
      "quote=\"say \\\"hi\\\"\" ctl=\"a\\x1b[31mred\\nline\" empty=\"\" wait=1.5s ok=true "
      "bad=\"\\xff\\xfe\" rtl=\"x\\u202ey\" utf=\"caf\u00e9\"", f.toText());
  auto back = Fields::parse(f.toText());
  KJ_ASSERT(back.size() == f.size(), back.toText());
  for (size_t i = 0; i < f.size(); i++) {
    KJ_EXPECT(back.entries()[i].key == f.entries()[i].key);
    if (f.entries()[i].key != "rtl") {   // \u is shown, not parsed back
      KJ_EXPECT(back.entries()[i].value == f.entries()[i].value, back.entries()[i].value);
    }
  }
  KJ_EXPECT(escapeLogText("Edge said \"no\"\n\x07") == "Edge said \"no\"\\n\\x07",
            escapeLogText("Edge said \"no\"\n\x07"));
}

KJ_TEST("fields: an exception is one sentence; its dump goes to debug") {
  auto e = kj::Exception(kj::Exception::Type::FAILED, "src/origin/exchange.c++", 153,
      kj::str("expected n < limit; request refused; n = 7"));
  e.addTrace(reinterpret_cast<void*>(0x1234));
  KJ_EXPECT(describeException(e) == "expected n < limit; request refused: 7",
            describeException(e));
  KJ_EXPECT(describeKjText("lost; e = x.c++:17: disconnected: peer gone\nstack: 1234 5678") ==
            "lost: peer gone", describeKjText("lost; e = x.c++:17: disconnected: peer gone"));
  KJ_EXPECT(describeKjText("connect refused") == "connect refused");
  KJ_EXPECT(describeException(kj::Exception(kj::Exception::Type::OVERLOADED, "f", 1)) ==
            "overloaded");

  TempLog tmp;
  FakeClock clock;
  {
    Logger logger(tmp.config(clock, 1 * kj::SECONDS, 5, 0));
    LogCallback callback(logger);
    logger.warn("Request failed", Fields().add("connIndex", 1).error(e));
    logger.debug("Request detail", Fields().error(e));
  }
  auto lines = tmp.lines();
  KJ_ASSERT(lines.size() == 3, lines);
  KJ_EXPECT(lines[0] == "WRN Request failed connIndex=1 "
                        "error=\"expected n < limit; request refused: 7\"", lines[0]);
  KJ_EXPECT(lines[1].startsWith("DBG Exception detail exception=\"origin/exchange.c++:153: "
                                "failed: expected n < limit"), lines[1]);
  KJ_EXPECT(strstr(lines[1].cStr(), "\\nstack: ") != nullptr, lines[1]);
  KJ_EXPECT(lines[2].startsWith("DBG Request detail error=\"expected n < limit; request refused: "
                                "7\" exception=\"origin/exchange.c++:153:"), lines[2]);
}

KJ_TEST("log format json: one object per line, the same fields") {
  TempLog tmp;
  FakeClock clock;
  {
    auto config = tmp.config(clock, 1 * kj::SECONDS, 1, 0);
    config.format = LogFormat::JSON;
    config.maxLineBytes = 200;
    Logger logger(kj::mv(config));
    logger.error("Request failed", Fields().add("connIndex", 0)
        .add("dest", "https://x/\"q\"\x01").add("bad", kj::heapString("\xc3(", 2)));
    logger.error("Request failed", Fields().add("connIndex", 1));
    logger.info("Long", Fields().add("v", kj::heapString(kj::heapArray<char>(500).asPtr())));
  }
  int fd;
  KJ_SYSCALL(fd = open(tmp.path.cStr(), O_RDONLY | O_CLOEXEC));
  auto text = kj::FdInputStream(kj::AutoCloseFd(fd)).readAllText();
  KJ_EXPECT(text.startsWith("{\"level\":\"error\",\"time\":\"20"), text);
  KJ_EXPECT(strstr(text.cStr(), "\",\"message\":\"Request failed\",\"connIndex\":0,"
                                "\"dest\":\"https://x/\\\"q\\\"\\u0001\",\"bad\":\"\\\\xc3(\"}\n") !=
            nullptr, text);
  KJ_EXPECT(strstr(text.cStr(), "\"message\":\"Request failed\",\"suppressed\":1,"
                                "\"interval\":\"1s\"}") != nullptr, text);
  KJ_EXPECT(strstr(text.cStr(), "\"message\":\"Long\",\"v\":\"") != nullptr, text);
  KJ_EXPECT(strstr(text.cStr(), "\"truncated\":") != nullptr, text);
  size_t start = 0;
  for (size_t i = 0; i < text.size(); i++) {
    if (text[i] != '\n') continue;
    KJ_EXPECT(i - start <= 200, i - start);
    KJ_EXPECT(text[start] == '{' && text[i - 1] == '}');
    start = i + 1;
  }
}

bool validUtf8(kj::StringPtr text) {
  for (size_t i = 0; i < text.size();) {
    auto b = static_cast<kj::byte>(text[i]);
    size_t n = b < 0x80 ? 1 : b >= 0xc2 && b <= 0xdf ? 2 : b >= 0xe0 && b <= 0xef ? 3
             : b >= 0xf0 && b <= 0xf4 ? 4 : 0;
    if (n == 0 || i + n > text.size()) return false;
    for (size_t k = 1; k < n; k++) {
      if ((static_cast<kj::byte>(text[i + k]) & 0xc0) != 0x80) return false;
    }
    i += n;
  }
  return true;
}

KJ_TEST("escaping: random bytes never reach a line raw, in either format") {
  // Deterministic pseudo-random values (any byte, some UTF-8 and bidi sequences mixed in).
  uint64_t state = 0x9e3779b97f4a7c15ull;
  auto next = [&]() {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
  };
  const char* pieces[] = {"\xe2\x80\xae", "\xc3\xa9", "\x1b[2J", "\"", "\\", " = ", "\xf0\x9f\x98\x80",
                          "\xed\xa0\x80", "\xc0\xaf", "\n\r\t"};
  for (int round = 0; round < 2000; round++) {
    kj::Vector<char> value;
    size_t n = next() % 24;
    for (size_t i = 0; i < n; i++) {
      if (next() % 4 == 0) {
        value.addAll(kj::StringPtr(pieces[next() % kj::size(pieces)]));
      } else {
        value.add(static_cast<char>(next() & 0xff));
      }
    }
    auto text = kj::heapString(value.begin(), value.size());
    Fields fields;
    fields.add("v", kj::str(text));
    auto console = formatLogLine(LogLevel::WARN, text, fields.toText());
    auto json = formatJsonLogLine(LogLevel::WARN, text, fields.entries());
    for (auto line: {console.asPtr(), json.asPtr()}) {
      KJ_ASSERT(line.size() > 0 && line[line.size() - 1] == '\n');
      for (size_t i = 0; i + 1 < line.size(); i++) {
        auto b = static_cast<kj::byte>(line[i]);
        KJ_ASSERT(b >= 0x20 && b != 0x7f, "raw control byte", round, i, line);
      }
      KJ_ASSERT(validUtf8(line), round, line);
      KJ_ASSERT(strstr(line.cStr(), "\xe2\x80\xae") == nullptr, "raw bidi override", line);
    }
    // The console value parses back to the bytes it came from (as long as no \u escape was
    // needed, which Fields::parse() shows but does not decode).
    auto shown = fields.toText();
    if (strstr(shown.cStr(), "\\u") == nullptr) {
      auto back = Fields::parse(shown);
      KJ_ASSERT(back.size() == 1 && back.entries()[0].value == text, round, shown);
    }
  }
}

struct RecordingSink final: public LogSink {
  explicit RecordingSink(kj::Vector<kj::String>& lines): lines(lines) {}
  kj::Vector<kj::String>& lines;
  void write(LogLevel level, kj::StringPtr message,
             kj::ArrayPtr<const LogField> fields) override {
    kj::Vector<kj::String> parts;
    for (auto& f: fields) parts.add(kj::str(f.key, ':', f.value));
    lines.add(kj::str(levelName(level), '|', message, '|', kj::strArray(parts, ",")));
  }
};

KJ_TEST("log sink: lines go to it instead of stderr, summaries included") {
  FakeClock clock;
  struct { kj::Vector<kj::String> lines; } recorded;
  auto sink = kj::heap<RecordingSink>(recorded.lines);
  {
    LogConfig config;
    config.clock = clock;
    config.burst = 1;
    config.sink = kj::mv(sink);
    Logger logger(kj::mv(config));
    LogCallback callback(logger);
    logger.warn("Edge closed", Fields().add("reason", "bye\nnow").add("connIndex", 2));
    logger.warn("Edge closed", Fields().add("connIndex", 3));
    logDebug("hidden");
    logInfo("From a lower layer", Fields().add("k", "v"));
  }
  KJ_ASSERT(recorded.lines.size() == 3, recorded.lines);
  KJ_EXPECT(recorded.lines[0] == "warn|Edge closed|reason:bye\nnow,connIndex:2", recorded.lines[0]);
  KJ_EXPECT(recorded.lines[1] == "info|From a lower layer|k:v", recorded.lines[1]);
  KJ_EXPECT(recorded.lines[2] == "warn|Edge closed|suppressed:1,interval:1s", recorded.lines[2]);
}

KJ_TEST("observe::log goes to the thread's logger, and the previous one comes back") {
  TempLog outer, inner;
  FakeClock clock;
  Logger a(outer.config(clock, 0 * kj::SECONDS, 0, 0));
  Logger b(inner.config(clock, 0 * kj::SECONDS, 0, 0));
  {
    LogCallback first(a);
    logWarn("one");
    {
      LogCallback second(b);
      logWarn("two");
    }
    logWarn("three");
  }
  auto lines = outer.lines();
  KJ_EXPECT(lines.size() == 2 && lines[0] == "WRN one" && lines[1] == "WRN three", lines);
  KJ_EXPECT(inner.lines().size() == 1 && inner.lines()[0] == "WRN two", inner.lines());
}

}  // namespace
}  // namespace cfqt::observe
