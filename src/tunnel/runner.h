#pragma once
// Runner: the whole quick tunnel on one event loop -- origin, quick-tunnel request, banner,
// metrics server, edge discovery, the HA supervisor of EdgeConnections, graceful shutdown.
// apps/cfqt and the public cfqt::Tunnel both drive one.

#include "tunnel/edge-connection.h"
#include "tunnel/edge-dialer.h"
#include "tunnel/ready-probe.h"
#include "tunnel/supervisor.h"
#include "tunnel/worker.h"

#include "edge/discovery.h"
#include "edge/quick-tunnel-api.h"
#include "named/config.h"
#include "named/credentials.h"
#include "named/ingress.h"
#include "observe/log.h"
#include "observe/metrics-server.h"
#include "observe/status.h"
#include "origin/origin.h"

#include <kj/async-io.h>
#include <kj/compat/http.h>
#include <kj/function.h>
#include <kj/vector.h>

namespace cfqt::tunnel {

constexpr uint MAX_HA_CONNECTIONS = 4;

struct ConfigFlag {
  kj::String name;     // e.g. "no-autoupdate"
  kj::String value;    // e.g. "true"
};

struct RunnerOptions {
  origin::OriginConfig origin;
  kj::String service;                    // ingress service text for §4.4 ("http://...", "hello_world")
  edge::QuickTunnelApiConfig api;
  edge::DiscoveryConfig discovery;
  EdgeConnectionConfig edge;
  DialerConfig dialer;                   // --protocol quic|http2|auto and the fallback timings
  kj::String clientVersion = kj::str("2026.8.2");
  uint haConnections = 2;                // 1..MAX_HA_CONNECTIONS
  BackoffConfig backoff;
  kj::Duration haStagger = 1 * kj::SECONDS;
  kj::Duration gracePeriod = 30 * kj::SECONDS;
  bool metrics = true;
  kj::Maybe<kj::String> metricsAddress;  // null: first free of localhost:20241..20245
  kj::Vector<ConfigFlag> configurationFlags;   // explicitly set flags for __configuration_flags
  kj::Duration memoryReturnInterval = 1 * kj::SECONDS;
  // How often to check whether requests were served and none is in flight; then free heap
  // memory is returned to the system (malloc_trim), so RSS comes back down after a load.
  // 0 = never.
  bool releaseIdleCode = false;
  // Also on that check: once a whole interval passed with no request served or in flight, after
  // a registration or after requests, drop the page-table entries of the code and read-only data
  // that start-up or the load mapped (code-pages.h). The CLI's --release-idle-code; off in the
  // library unless the host asks (TunnelOptions::releaseIdleCode).
  kj::Maybe<named::TunnelCredentials> namedTunnel;
  // A named tunnel (--token, --credentials-file/-contents): registered with these credentials,
  // no quick-tunnel request, no banner. Null: a quick tunnel from `api`.
  kj::Maybe<kj::Own<named::TunnelConfig>> ingressConfig;
  // Named tunnels: the config file's ingress rules and originRequest defaults (`origin` is then
  // the base their originRequest keys override). Null: one catch-all rule to `origin`/`service`.
  kj::Maybe<kj::Function<kj::String(kj::StringPtr hostname)>> publicUrl;
  // The URL shown for a hostname; default "https://<hostname>" (--local: the front door).
  uint threads = 0;
  // --threads: 1 runs everything on the runner's loop; 0 (auto) gives each HA connection index
  // its own thread and event loop (worker.h) when there is more than one connection and this
  // process may run on more than one CPU (sched_getaffinity).
  kj::Duration busyPoll = 0 * kj::NANOSECONDS;
  // --busy-poll: each connection worker's loop polls this long after a packet from the edge
  // instead of sleeping (loop/spinner.h); 0 = off. The loop that runs the Runner is driven by its
  // owner (apps/cfqt, public-api.c++), which applies the same window.
  ReadyProbeConfig ready;                // how the URL's readiness is probed (issue 16)
  bool waitReady = false;
  // --wait-ready: the banner and tunnelCreated() (the URL line) come only once the URL serves;
  // if it does not within ready.timeout, run() resolves 1 after a graceful shutdown.
};

struct ServingState {
  bool probing = false;                  // false: the probe has not started (tunnel stage)
  ReadyStage stage = ReadyStage::DNS;
  kj::Maybe<kj::String> failure;         // the probe gave up: why (names the stage)
};

class RunnerCallbacks {
public:
  virtual void tunnelCreated(kj::StringPtr url, kj::StringPtr hostname) {}
  // Once, after the quick tunnel was issued (before any connection registered).
  virtual void metricsListening(kj::StringPtr address) {}
  virtual void connectionRegistered(uint connIndex) {}
  // After every successful registration of an edge connection.
};

class Runner {
public:
  Runner(kj::AsyncIoContext& io, const observe::Logger& logger, RunnerOptions options,
         RunnerCallbacks& callbacks);
  // Borrows io, logger and callbacks. Everything runs on io's thread.
  KJ_DISALLOW_COPY(Runner);
  ~Runner() noexcept(false);

  kj::Promise<int> run();
  // Resolves with the process exit code: 0 after a graceful shutdown, 1 when start-up failed
  // (logged) or every connection index stopped for good. Call once.

  void shutdown();
  // Starts the graceful shutdown (unregister, drain up to the grace period, close). Idempotent;
  // run() resolves when it is done.

  void probeServing();
  // Starts the readiness probe (once); if the edge connections have not started yet, it starts
  // with them. --wait-ready and Tunnel::waitUntilServing() use it.

  ServingState servingState() const;

  const observe::TunnelStatus& status() const { return tunnelStatus; }
  kj::StringPtr url() const { return publicUrlText; }

private:
  kj::AsyncIoContext& io;
  const observe::Logger& logger;
  RunnerOptions options;
  RunnerCallbacks& callbacks;
  kj::HttpHeaderTable headerTable;
  observe::TunnelStatus tunnelStatus;
  class StatusOriginObserver final: public origin::OriginObserver {
  public:
    explicit StatusOriginObserver(observe::TunnelStatus::Shard& stats): stats(stats) {}
    void responseHead(kj::uint statusCode) override { stats.responseSent(statusCode); }
    void requestFailed() override { stats.requestFailed(); }
  private:
    observe::TunnelStatus::Shard& stats;
  };
  StatusOriginObserver originObserver{tunnelStatus.shard(0)};
  // The origin shared by every index on this loop (--threads 1, named tunnels): this loop is the
  // only writer of shard 0, where its outcomes are counted.
  AcknowledgingConfigHandler configHandler;
  class IngressConfigHandler final: public wire::ConfigurationHandler {
    // Remote configuration of a named tunnel: parsed and applied to the router at once.
  public:
    explicit IngressConfigHandler(Runner& runner): runner(runner) {}
    kj::Maybe<kj::String> applyConfiguration(int32_t version,
                                             kj::ArrayPtr<const kj::byte> json) override;
  private:
    Runner& runner;
  };
  IngressConfigHandler ingressHandler{*this};
  wire::RemoteConfigState remoteConfig;
  JitterSource jitter;
  kj::String publicUrlText;
  kj::Maybe<kj::Own<origin::Origin>> originService;
  kj::Maybe<kj::Own<named::Router>> router;     // named tunnels
  kj::Maybe<origin::OriginConfig> baseOrigin;   // named tunnels: what remote rules build on
  kj::Maybe<EdgeIdentity> identity;
  // Quick tunnels (issue 15): metrics, discovery, the dial and the handshake start while the API
  // request is out; only registerConnection waits for its answer (identityGate).
  bool apiPending = false;
  kj::Maybe<kj::Own<kj::PromiseFulfiller<void>>> identityFulfiller;
  kj::Maybe<kj::ForkedPromise<void>> identityGate;
  kj::Maybe<kj::Function<int()>> deferredFailure;   // the edge side's, reported after the API's
  kj::Maybe<kj::Own<observe::MetricsServer>> metricsServer;
  kj::Maybe<kj::Own<edge::AddressPool>> pool;
  kj::Maybe<kj::Own<EdgeDialer>> dialer;
  kj::Maybe<kj::Own<EdgeConnectionFactory>> factory;
  DialerShared dialerShared;
  kj::Maybe<kj::Own<IngressSource>> ingressSource;   // named tunnels on workers
  kj::Maybe<kj::Own<IdentityGate>> workerIdentityGate;   // identityGate for workers
  kj::Maybe<kj::Own<WorkerPool>> workers;       // destroyed after the supervisor (~Runner)
  kj::Maybe<kj::Own<Supervisor>> supervisor;
  bool stopping = false;
  kj::Own<kj::PromiseFulfiller<void>> stopFulfiller;
  kj::ForkedPromise<void> stopSignal;
  kj::Maybe<kj::Promise<int>> edgeStart;   // quick tunnels: the edge side, started early
  kj::Maybe<kj::Promise<void>> metricsTask;
  kj::Maybe<kj::Promise<void>> shutdownTask;
  kj::Maybe<kj::Promise<void>> memoryTask;
  bool trimPending = false;   // a connection registered since the last malloc_trim()
  bool codeReleasePending = false;   // a connection registered since the last code release
  uint64_t codeTickServed = 0;       // requests served at the previous memory check
  uint64_t codeReleasedServed = 0;   // requests served at the last code release
  void maybeReleaseCode(uint64_t served);

  kj::Promise<int> start();
  kj::Promise<int> tunnelIssued(edge::QuickTunnel tunnel);
  kj::Promise<int> namedTunnelStart(named::TunnelCredentials credentials);
  kj::Promise<int> identityReady(kj::String accountTag, kj::Array<kj::byte> secret,
                                 kj::Array<kj::byte> tunnelId);
  kj::Promise<int> metricsBound(kj::Maybe<kj::Own<kj::ConnectionReceiver>> receiver);
  kj::Promise<int> edgesDiscovered(edge::EdgeAddresses addresses);
  kj::Promise<int> startSupervisor(SessionFactory& sessions, uint connections);
  int supervisorDone();
  kj::Promise<void> returnMemory(uint64_t servedBefore);
  int startFailed(kj::StringPtr what, kj::Exception&& e);
  kj::Promise<int> failAfterApi(kj::Function<int()> report);
  // The edge side's start-up failure: reported (`report` logs, returns the exit code) at once,
  // or, while the quick-tunnel request is out, once it succeeded, so that an API failure is
  // reported first and alone, as when the two ran one after the other.
  void abandonEdges();
  // The quick-tunnel request failed or start-up was cancelled: close what the edge side opened.
  void warnIgnoredKeys(const named::TunnelConfig& config);
  // One warning per originRequest key of `config` that cfqt does not apply.

  // Readiness (issue 16).
  kj::String readyToken;
  kj::String hostnameText;
  bool probeWanted = false;
  bool edgesStarted = false;
  bool readyFailed = false;
  kj::Maybe<kj::String> probeSetupError;
  kj::Maybe<kj::Own<ReadyProbe>> readyProbe;
  kj::Maybe<kj::Promise<void>> readyTask;
  void announce();
  void startProbe();
  void servingFailed(kj::Exception&& e);
};

kj::String localConfigurationJson(kj::StringPtr service, kj::ArrayPtr<const ConfigFlag> flags);
kj::String localConfigurationJsonWithIngress(kj::StringPtr ingressArray,
                                             kj::ArrayPtr<const ConfigFlag> flags);
// The same with the "ingress" array given as JSON text (named tunnels).
// {"__configuration_flags":{...},"ingress":[{"service":"...","originRequest":{}}],"warp-routing":{}}

uint usableCpus();
// The CPUs this process may run on (its affinity mask; 1 if unknown).

kj::String connectorArch();
// "linux_amd64", "linux_arm64", ... (GOOS_GOARCH style).

kj::Array<kj::byte> newConnectorId();
// A random UUIDv4 (16 bytes).

kj::String bannerText(kj::StringPtr url);
// The cloudflared box (§1.4), lines separated by '\n', no trailing newline.

}  // namespace cfqt::tunnel
