#pragma once
// cfqt public C++ API: run a Cloudflare quick tunnel inside your process.
//
//   cfqt::TunnelOptions options;
//   options.url = "http://localhost:8080";
//   auto tunnel = cfqt::Tunnel::start(options);
//   std::string url = tunnel->waitForUrl(std::chrono::seconds(30));   // https://<words>.trycloudflare.com
//   ...
//   int code = tunnel->stop();                                          // graceful: unregister, drain
//
// A named tunnel (a fixed hostname, ingress rules, replicas):
//
//   cfqt::TunnelOptions options;
//   options.token = getenv("TUNNEL_TOKEN");
//   options.haConnections = 4;
//   options.ingress = {{"app.example.com", "", "http://localhost:8080"},
//                      {"", "", "http_status:404"}};
//   auto tunnel = cfqt::Tunnel::start(options);
//   tunnel->waitUntilReady(std::chrono::seconds(30));
//
// The tunnel runs on its own thread with its own event loop; every method is thread-safe. No
// KJ or Cap'n Proto type appears here.

#include "cfqt/handler.h"

#include <chrono>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace cfqt {

enum class LogLevel { Debug, Info, Warn, Error, Fatal };

using LogField = std::pair<std::string, std::string>;   // key, value

using LogCallback = std::function<void(LogLevel level, const std::string& message,
                                       const std::vector<LogField>& fields)>;
// One log line: the sentence (e.g. "Registered tunnel connection") and its fields in order
// (e.g. {"connIndex", "0"}, {"location", "lhr01"}), the same as the console line shows but with
// the values unescaped (they may hold any bytes a peer sent: escape them before a terminal).
// Rate-limit summaries come as lines with the fields "suppressed" and "interval".

struct TunnelOptions {
  // Origin (one of): `url` (http://, https://, host:port, unix:/path, unix+tls:/path),
  // `helloWorld`, `unixSocket`.
  std::string url;
  bool helloWorld = false;
  std::string unixSocket;
  std::string httpHostHeader;
  // https:// and unix+tls: origins (as --origin-ca-pool, --origin-server-name; for named tunnels
  // also the defaults of every ingress rule): a PEM file of roots trusted besides the system
  // store, and the name the origin's certificate is checked against ("" = the URL's host).
  std::string originCaPool;
  std::string originServerName;

  // Edge access. Empty = production defaults (api.trycloudflare.com, SRV discovery, the
  // Cloudflare roots embedded in cfqt plus the system store).
  std::string quickService;
  std::vector<std::string> edges;     // host:port, skips discovery
  std::string edgeCaFile;             // trusted alone for the edge certificate
  std::string clientVersion = "2026.8.2";
  std::string protocol = "auto";      // "auto" (QUIC, HTTP/2 for an edge address whose UDP gets
                                      // no answer), "quic" or "http2" (TLS over TCP)
  // protocol "auto" (as the CLI's --fallback-after, --quic-retry-interval,
  // --quic-failure-limit, --quic-failure-window): HTTP/2 when QUIC has no handshake within
  // fallbackAfter, when this host refuses UDP, or when QUIC connections to an address end
  // quicFailureLimit times within quicFailureWindow (0 = never); QUIC is tried again after
  // quicRetryInterval.
  std::chrono::milliseconds fallbackAfter{2000};
  std::chrono::milliseconds quicRetryInterval{300000};
  int quicFailureLimit = 3;
  std::chrono::milliseconds quicFailureWindow{60000};

  int haConnections = 2;              // 1..4
  int threads = 0;                    // 0 = auto: a thread and event loop per HA connection when
                                      // more than one CPU is usable; 1 = one event loop
  std::chrono::microseconds busyPoll{0};
  // (as --busy-poll) after each packet to or from the edge, the tunnel's event loops keep
  // polling this long instead of sleeping: lower serial latency on VMs, where waking an idle CPU
  // is slow, for up to this much CPU each time a loop goes idle. 0 = off; at most 10 ms.
  bool releaseIdleCode = false;       // true: when the tunnel idles (a second with no request
                                      // after a registration or a load), drop this process's
                                      // page-table entries of code and read-only data of every
                                      // loaded object (cfqt's --release-idle-code; lowers RSS,
                                      // the next request takes minor faults)
  std::chrono::milliseconds gracePeriod{30000};
  std::chrono::milliseconds backoffBase{1000};
  int retries = 5;
  std::chrono::milliseconds quicIdleTimeout{5000};
  std::chrono::milliseconds quicKeepAlivePeriod{1000};

  bool metrics = false;               // serve /ready, /quicktunnel, /healthcheck
  std::string metricsAddress;         // "" = first free of localhost:20241..20245

  std::string logLevel = "info";      // debug, info, warn, error, fatal
  std::string logFile;                // "" = none
  bool logToStderr = true;

  LogCallback logCallback;
  // When set, every line at or above logLevel goes to it instead of stderr (logFile, if set, is
  // still written). Thread safety: it is called on the tunnel's own threads, never by two
  // threads at once (cfqt holds a lock around each call), so it needs no locking of its own for
  // cfqt's sake. It must return quickly (it holds up the tunnel), must not throw (exceptions
  // are dropped), and must not call this Tunnel's methods (they wait on the tunnel's thread).
  // It may be called until stop() or the destructor returns.

  // Readiness (waitUntilServing(), and waitForUrl() with waitReady): the hostname is resolved by
  // public resolvers asked directly over DNS-over-TLS (never the system resolver, whose cache an
  // early NXDOMAIN would poison), then an HTTPS request must come back through the edge to this
  // tunnel.
  bool waitReady = false;             // waitForUrl() returns the URL only once it serves
  std::chrono::milliseconds readyTimeout{60000};   // the probe gives up after this
  std::vector<std::string> readyResolvers;  // ip:port[#tls-name]; empty = 1.1.1.1, 1.0.0.1:853
  int readyPort = 443;                // HTTPS port of the request
  std::string readyCaFile;            // "" = system trust store (DoT and HTTPS)

  // In-process serving instead of an origin (url, helloWorld and unixSocket stay empty): each
  // request goes to `handler` on a handler thread; no socket is opened. See cfqt/handler.h.
  Handler handler;
  int handlerThreads = 64;            // handler calls running at once (1..4096); 0 = inline:
                                      // called on the tunnel's event-loop thread, must not block
                                      // (see cfqt/handler.h)

  // Named tunnel (instead of a quick tunnel): the tunnel's token (from the dashboard), or its
  // credentials file's JSON or path. The quick-tunnel API is then not used, waitForUrl() returns
  // "" (a named tunnel's hostnames are routed to it at the edge), and `haConnections` should be 4
  // like cloudflared's. A remotely managed tunnel takes its ingress rules from the edge.
  std::string token;
  std::string credentialsJson;
  std::string credentialsFile;

  struct IngressRule {
    std::string hostname;   // "" = any; "*.example.com" = any subdomain
    std::string path;       // POSIX extended regex searched in the request path; "" = any
    std::string service;    // http://..., https://..., unix:/path, unix+tls:/path, http_status:NNN,
                            // hello_world (an https/unix+tls origin is verified against the
                            // system store and originCaPool)
  };
  std::vector<IngressRule> ingress;
  // Named tunnels: the first rule matching a request's hostname and path serves it; the last rule
  // must match everything (no hostname, no path). Empty: `url`/`helloWorld`/`unixSocket` for
  // every request, or 503 until a remotely managed tunnel gets its configuration.
};

class TunnelError: public std::runtime_error {
public:
  using std::runtime_error::runtime_error;
};

enum class ServingStage {
  TUNNEL,     // no quick tunnel issued / edge connections not started yet
  DNS,        // the hostname does not resolve via the public resolvers yet
  ROUTING,    // it resolves, but the edge does not route it to this tunnel yet
};

class NotServingError: public TunnelError {
  // waitUntilServing() did not see the URL serve: stage() is the stage that never succeeded.
public:
  NotServingError(ServingStage stage, const std::string& message)
      : TunnelError(message), stageValue(stage) {}
  ServingStage stage() const { return stageValue; }

private:
  ServingStage stageValue;
};

class Tunnel {
public:
  static std::unique_ptr<Tunnel> start(const TunnelOptions& options);
  // Validates the options (throws TunnelError with a readable message) and starts the tunnel's
  // thread. Returns at once; the quick tunnel is requested in the background.

  ~Tunnel();
  // Stops the tunnel (as stop()) if still running, and joins its thread.

  std::string waitForUrl(std::chrono::milliseconds timeout);
  // The public URL once the quick tunnel was issued, or "" if that did not happen in time or the
  // tunnel failed to start.

  bool waitUntilReady(std::chrono::milliseconds timeout);
  // True once at least one edge connection is registered.

  void waitUntilServing(std::chrono::milliseconds timeout);
  // Returns once the public URL serves (as `cfqt --wait-ready`: DNS visible via the public
  // resolvers, then an HTTPS request routed by the edge to this tunnel, which answers it itself;
  // the origin never sees it). Starts the probe on the first call. Throws NotServingError naming
  // the stage that did not succeed within `timeout` (or within readyTimeout, or at once when the
  // public certificate does not verify).

  std::string publicUrl() const;     // "" until issued
  std::string hostname() const;      // the bare hostname; "" until issued
  int readyConnections() const;      // registered connections right now
  bool running() const;              // false once the tunnel thread finished

  int stop();
  // Graceful shutdown (unregister every connection, let requests finish up to the grace period,
  // close) and waits for it. Returns the exit status: 0 clean, non-zero if the tunnel failed.
  // Idempotent.

  int wait();
  // Waits until the tunnel ends by itself (every connection refused for good) or is stopped.

  std::string metrics() const;
  // The /metrics page (Prometheus text, cloudflared's series names) of this tunnel right now, as
  // the metrics server would serve it; "" once the tunnel ended.

  class Impl;
  explicit Tunnel(std::unique_ptr<Impl> impl);

private:
  std::unique_ptr<Impl> impl;
};

}  // namespace cfqt
