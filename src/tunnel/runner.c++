#include "tunnel/runner.h"

#include "edge/address-pool.h"
#include "tunnel/code-pages.h"

#include <kj/debug.h>
#include <kj/encoding.h>

#include <algorithm>
#include <errno.h>
#include <malloc.h>
#include <stdlib.h>
#include <sched.h>
#include <sys/random.h>

namespace cfqt::tunnel {

namespace {

constexpr kj::StringPtr DISCLAIMER =
    "Thank you for trying Cloudflare Tunnel. Doing so, without a Cloudflare account, is a quick "
    "way to experiment and try it out. However, be aware that these account-less Tunnels have no "
    "uptime guarantee, are subject to the Cloudflare Online Services Terms of Use "
    "(https://www.cloudflare.com/website-terms/), and Cloudflare reserves the right to "
    "investigate your use of Tunnels for violations of such terms. If you intend to use Tunnels "
    "in production you should use a pre-created named tunnel by following: "
    "https://developers.cloudflare.com/cloudflare-one/connections/connect-apps"_kj;

kj::String jsonString(kj::StringPtr text) {
  kj::Vector<char> out(text.size() + 2);
  out.add('"');
  for (char c: text) {
    switch (c) {
      case '"': out.addAll(kj::StringPtr("\\\"")); break;
      case '\\': out.addAll(kj::StringPtr("\\\\")); break;
      case '\n': out.addAll(kj::StringPtr("\\n")); break;
      case '\r': out.addAll(kj::StringPtr("\\r")); break;
      case '\t': out.addAll(kj::StringPtr("\\t")); break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          auto esc = kj::str("\\u00", kj::hex(static_cast<kj::byte>(c)).size() == 1 ? "0" : "",
                             kj::hex(static_cast<kj::byte>(c)));
          out.addAll(esc);
        } else {
          out.add(c);
        }
    }
  }
  out.add('"');
  out.add('\0');
  return kj::String(out.releaseAsArray());
}

}  // namespace

kj::String localConfigurationJson(kj::StringPtr service, kj::ArrayPtr<const ConfigFlag> flags) {
  return localConfigurationJsonWithIngress(
      kj::str("[{\"service\":", jsonString(service), ",\"originRequest\":{}}]"), flags);
}

kj::String localConfigurationJsonWithIngress(kj::StringPtr ingressArray,
                                             kj::ArrayPtr<const ConfigFlag> flags) {
  // Keys sorted, as Go's encoding/json writes maps.
  kj::Vector<const ConfigFlag*> sorted;
  for (auto& f: flags) sorted.add(&f);
  std::sort(sorted.begin(), sorted.end(),
            [](const ConfigFlag* a, const ConfigFlag* b) { return a->name < b->name; });
  kj::Vector<kj::String> entries;
  for (auto f: sorted) entries.add(kj::str(jsonString(f->name), ':', jsonString(f->value)));
  return kj::str("{\"__configuration_flags\":{", kj::strArray(entries, ","), "},"
                 "\"ingress\":", ingressArray, ",\"warp-routing\":{}}");
}

uint usableCpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) != 0) return 1;
  return static_cast<uint>(CPU_COUNT(&set));
}

kj::String connectorArch() {
#if defined(__x86_64__)
  return kj::str("linux_amd64");
#elif defined(__aarch64__)
  return kj::str("linux_arm64");
#elif defined(__i386__)
  return kj::str("linux_386");
#elif defined(__arm__)
  return kj::str("linux_arm");
#else
  return kj::str("linux_unknown");
#endif
}

kj::Array<kj::byte> newConnectorId() {
  auto id = kj::heapArray<kj::byte>(16);
  size_t got = 0;
  while (got < id.size()) {
    ssize_t n = getrandom(id.begin() + got, id.size() - got, 0);
    if (n <= 0) {
      if (n < 0 && errno == EINTR) continue;
      KJ_FAIL_SYSCALL("getrandom", errno);
    }
    got += n;
  }
  id[6] = (id[6] & 0x0f) | 0x40;   // version 4
  id[8] = (id[8] & 0x3f) | 0x80;   // RFC 4122 variant
  return id;
}

kj::String bannerText(kj::StringPtr url) {
  kj::StringPtr lines[2] = {
      "Your quick Tunnel has been created! Visit it at (it may take some time to be reachable):"_kj,
      url};
  size_t width = kj::max(lines[0].size(), lines[1].size()) + 4;
  auto border = kj::str("+", kj::repeat('-', width), "+");
  kj::Vector<kj::String> out;
  out.add(kj::str(border));
  for (auto& line: lines) {
    out.add(kj::str("|  ", line, kj::repeat(' ', width - 2 - line.size()), "|"));
  }
  out.add(kj::mv(border));
  return kj::strArray(out, "\n");
}

Runner::Runner(kj::AsyncIoContext& io, const observe::Logger& logger, RunnerOptions optionsParam,
               RunnerCallbacks& callbacks)
    : io(io), logger(logger), options(kj::mv(optionsParam)), callbacks(callbacks),
      configHandler(logger),
      remoteConfig(options.namedTunnel != nullptr
                   ? static_cast<wire::ConfigurationHandler&>(ingressHandler)
                   : static_cast<wire::ConfigurationHandler&>(configHandler)),
      jitter(randomJitter()),
      stopSignal(nullptr) {
  auto paf = kj::newPromiseAndFulfiller<void>();
  stopFulfiller = kj::mv(paf.fulfiller);
  stopSignal = paf.promise.fork();
  readyToken = kj::encodeHex(newConnectorId());
  options.edge.readyToken = kj::str(readyToken);
  probeWanted = options.waitReady;
}

Runner::~Runner() noexcept(false) {
  // The supervisor cancels its sessions (on the workers' loops) before the workers stop.
  supervisor = nullptr;
  workers = nullptr;
}

kj::Promise<int> Runner::run() {
  return start().exclusiveJoin(stopSignal.addBranch().then([this]() {
    logger.info("Tunnel start-up cancelled");
    return 0;
  }));
}

void Runner::shutdown() {
  if (stopping) return;
  stopping = true;
  if (apiPending) {
    // Nothing can have registered yet: start-up is cancelled, as it was before the dial started
    // early.
    abandonEdges();
    stopFulfiller->fulfill();
    return;
  }
  KJ_IF_MAYBE(s, supervisor) {
    shutdownTask = (*s)->shutdown(options.gracePeriod).eagerlyEvaluate([this](kj::Exception&& e) {
      logger.error("Shutdown failed", observe::Fields().error(e));
    });
  } else {
    stopFulfiller->fulfill();
  }
}

void Runner::announce() {
  auto banner = bannerText(publicUrlText);
  size_t start = 0;
  for (size_t i = 0; i <= banner.size(); i++) {
    if (i == banner.size() || banner[i] == '\n') {
      logger.info(kj::heapString(banner.begin() + start, i - start));
      start = i + 1;
    }
  }
  callbacks.tunnelCreated(publicUrlText, hostnameText);
}

void Runner::probeServing() {
  probeWanted = true;
  if (edgesStarted && !apiPending) startProbe();
}

ServingState Runner::servingState() const {
  ServingState state;
  KJ_IF_MAYBE(e, probeSetupError) {
    state.failure = kj::str(*e);
    return state;
  }
  KJ_IF_MAYBE(p, readyProbe) {
    state.probing = true;
    state.stage = (*p)->stage();
    KJ_IF_MAYBE(f, (*p)->failure()) {
      state.stage = f->stage;
      state.failure = kj::str(f->message);
    }
  }
  return state;
}

void Runner::startProbe() {
  if (readyProbe != nullptr || probeSetupError != nullptr) return;
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
    readyProbe = kj::heap<ReadyProbe>(io.provider->getTimer(), io.provider->getNetwork(), logger,
                                      options.ready);
  })) {
    probeSetupError = kj::str(e->getDescription());
    servingFailed(kj::mv(*e));
    return;
  }
  auto& probe = *KJ_ASSERT_NONNULL(readyProbe);
  readyTask = probe.run(hostnameText, readyToken).then([this]() {
    if (options.waitReady) announce();
  }, [this](kj::Exception&& e) { servingFailed(kj::mv(e)); }).eagerlyEvaluate(nullptr);
}

void Runner::servingFailed(kj::Exception&& e) {
  logger.error("The URL does not serve; giving up",
               observe::Fields().add("hostname", hostnameText).error(e)
                   .add("registeredConnections", tunnelStatus.readyConnections()));
  if (options.waitReady) {
    readyFailed = true;
    shutdown();
  }
}

kj::Maybe<kj::String> Runner::IngressConfigHandler::applyConfiguration(
    int32_t version, kj::ArrayPtr<const kj::byte> json) {
  // cloudflared's orchestrator: parse, build every origin, then switch; on any error the current
  // rules keep serving and the edge gets the error.
  auto& r = runner;
  KJ_IF_MAYBE(source, r.ingressSource) {
    // Connection workers: any worker's thread. Checked here, applied by every worker's router.
    auto text = kj::heapString(json.asChars());
    auto parsed = named::parseConfig(text, "remote configuration");
    KJ_IF_MAYBE(config, parsed.tryGet<named::TunnelConfig>()) r.warnIgnoredKeys(*config);
    KJ_IF_MAYBE(error, (*source)->publish(version, json)) {
      r.logger.error("Failed to update ingress; the current configuration keeps serving",
                     observe::Fields().add("version", version).add("error", error->asPtr()));
      return kj::mv(*error);
    }
    r.tunnelStatus.setConfigVersion(version);
    r.logger.info("Updated to new configuration",
                  observe::Fields().add("version", version).add("bytes", json.size()));
    return nullptr;
  }
  auto text = kj::heapString(json.asChars());
  auto parsed = named::parseConfig(text, "remote configuration");
  kj::Maybe<kj::String> error;
  KJ_SWITCH_ONEOF(parsed) {
    KJ_CASE_ONEOF(e, kj::String) error = kj::mv(e);
    KJ_CASE_ONEOF(config, named::TunnelConfig) {
      r.warnIgnoredKeys(config);
      auto built = named::Ingress::build(config.ingress, config.originRequest,
                                         KJ_ASSERT_NONNULL(r.baseOrigin));
      KJ_SWITCH_ONEOF(built) {
        KJ_CASE_ONEOF(e, kj::String) error = kj::mv(e);
        KJ_CASE_ONEOF(ingress, kj::Own<named::Ingress>) {
          KJ_IF_MAYBE(router, r.router) {
            error = (*router)->apply(kj::mv(ingress));
          } else {
            error = kj::str("no ingress router");
          }
        }
      }
    }
  }
  KJ_IF_MAYBE(e, error) {
    r.logger.error("Failed to update ingress; the current configuration keeps serving",
                   observe::Fields().add("version", version).add("error", e->asPtr()));
    return kj::str(*e);
  }
  r.tunnelStatus.setConfigVersion(version);
  r.logger.info("Updated to new configuration",
                observe::Fields().add("version", version).add("bytes", json.size()));
  return nullptr;
}

void Runner::warnIgnoredKeys(const named::TunnelConfig& config) {
  for (auto& ignored: config.ignored) {
    observe::Fields fields;
    fields.add("key", ignored.key).add("source", config.source);
    if (ignored.line > 0) fields.add("line", ignored.line);
    logger.warn("An originRequest key is not supported by cfqt and is ignored", fields);
  }
}

int Runner::startFailed(kj::StringPtr what, kj::Exception&& e) {
  logger.error(kj::str("Couldn't start tunnel: ", what), observe::Fields().error(e));
  return 1;
}

kj::Promise<int> Runner::failAfterApi(kj::Function<int()> report) {
  if (!apiPending) return report();
  deferredFailure = kj::mv(report);
  return kj::NEVER_DONE;   // tunnelIssued() reports it
}

void Runner::abandonEdges() {
  apiPending = false;
  deferredFailure = nullptr;
  edgeStart = nullptr;   // first: its continuations use what follows
  memoryTask = nullptr;
  supervisor = nullptr;  // closes every connection it dialled
  factory = nullptr;
  dialer = nullptr;
  pool = nullptr;
  metricsTask = nullptr;
  metricsServer = nullptr;
  identityFulfiller = nullptr;
}

kj::Promise<int> Runner::start() {
  auto& timer = io.provider->getTimer();
  if (options.namedTunnel != nullptr) {
    // Named tunnels route through ingress rules (from --config, or one catch-all rule).
    auto r = kj::heap<named::Router>(timer, io.provider->getNetwork(), headerTable,
                                     originObserver);
    kj::Own<named::Ingress> ingress;
    KJ_IF_MAYBE(config, options.ingressConfig) {
      warnIgnoredKeys(**config);
      auto built = named::Ingress::build((*config)->ingress, (*config)->originRequest,
                                         options.origin);
      KJ_SWITCH_ONEOF(built) {
        KJ_CASE_ONEOF(error, kj::String) {
          logger.error(kj::str("Couldn't start tunnel: invalid ingress rules in ",
                               (*config)->source, ": ", error));
          return 1;
        }
        KJ_CASE_ONEOF(i, kj::Own<named::Ingress>) ingress = kj::mv(i);
      }
    } else {
      ingress = named::Ingress::single(named::cloneOriginConfig(options.origin), options.service);
    }
    auto ingressJson = ingress->localConfigJson();
    KJ_IF_MAYBE(error, r->apply(kj::mv(ingress))) {
      logger.error(kj::str("Couldn't start tunnel: invalid origin: ", *error));
      return 1;
    }
    options.edge.localConfigJson = localConfigurationJsonWithIngress(ingressJson,
                                                                     options.configurationFlags);
    baseOrigin = named::cloneOriginConfig(options.origin);
    router = kj::mv(r);
  }
  auto originConfig = named::cloneOriginConfig(options.origin);
  originConfig.handler = options.origin.handler;   // kept in `options` for the workers
  auto created = origin::Origin::create(kj::mv(originConfig), timer,
                                        io.provider->getNetwork(), headerTable);
  KJ_SWITCH_ONEOF(created) {
    KJ_CASE_ONEOF(error, kj::String) {
      logger.error("Couldn't start tunnel: invalid origin", observe::Fields().add("error", error));
      return 1;
    }
    KJ_CASE_ONEOF(service, kj::Own<origin::Origin>) {
      service->setObserver(originObserver);
      originService = kj::mv(service);
    }
  }
  KJ_IF_MAYBE(c, options.namedTunnel) {
    auto credentials = kj::mv(*c);
    options.namedTunnel = nullptr;
    return namedTunnelStart(kj::mv(credentials));
  }
  logger.info(DISCLAIMER);
  logger.info("Requesting new quick Tunnel on trycloudflare.com...");
  // Only registerConnection needs the API's answer (the tunnel's credentials): the metrics
  // server, edge discovery, the dial and the handshake go ahead meanwhile (issue 15).
  apiPending = true;
  auto gate = kj::newPromiseAndFulfiller<void>();
  identityFulfiller = kj::mv(gate.fulfiller);
  identityGate = gate.promise.fork();
  edgeStart = identityReady(kj::str(), nullptr, nullptr).eagerlyEvaluate(nullptr);
  return edge::requestQuickTunnel(timer, io.provider->getNetwork(), kj::mv(options.api))
      .then([this](edge::QuickTunnel t) { return tunnelIssued(kj::mv(t)); },
            [this](kj::Exception&& e) -> kj::Promise<int> {
              abandonEdges();
              return startFailed("failed to request quick Tunnel", kj::mv(e));
            });
}

kj::Promise<int> Runner::tunnelIssued(edge::QuickTunnel tunnel) {
  tunnelStatus.setHostname(tunnel.hostname);
  KJ_IF_MAYBE(f, options.publicUrl) {
    publicUrlText = (*f)(tunnel.hostname);
  } else if (tunnel.hostname.startsWith("https://")) {
    publicUrlText = kj::str(tunnel.hostname);
  } else {
    publicUrlText = kj::str("https://", tunnel.hostname);
  }
  hostnameText = kj::str(tunnel.hostname);
  if (options.waitReady) {
    logger.info("Quick tunnel issued; its URL is printed once it serves (--wait-ready)",
                observe::Fields().add("hostname", tunnel.hostname));
  } else {
    announce();
  }
  // cloudflared's SendURL: the label is the hostname with https:// (never the --local URL).
  tunnelStatus.userHostname(tunnel.hostname.startsWith("https://")
                            ? kj::str(tunnel.hostname) : kj::str("https://", tunnel.hostname));

  logger.debug("Quick tunnel issued", observe::Fields().add("tunnelID", tunnel.id)
      .add("accountTag", tunnel.accountTag).add("hostname", tunnel.hostname));
  apiPending = false;
  auto& id = KJ_ASSERT_NONNULL(identity);
  id.accountTag = kj::mv(tunnel.accountTag);
  id.tunnelSecret = kj::mv(tunnel.secret);
  id.tunnelId = kj::mv(tunnel.tunnelId);
  KJ_IF_MAYBE(f, identityFulfiller) (*f)->fulfill();   // registrations may go ahead
  KJ_IF_MAYBE(g, workerIdentityGate) (*g)->open();      // on the workers too
  KJ_IF_MAYBE(report, deferredFailure) {
    auto code = (*report)();
    abandonEdges();
    return code;
  }
  if (edgesStarted && probeWanted) startProbe();
  KJ_IF_MAYBE(e, edgeStart) {
    auto promise = kj::mv(*e);
    edgeStart = nullptr;
    return kj::mv(promise);
  }
  return kj::NEVER_DONE;   // unreachable: edgeStart is only taken here or by abandonEdges()
}

kj::Promise<int> Runner::namedTunnelStart(named::TunnelCredentials credentials) {
  // cloudflared `tunnel run`: the tunnel exists already; its hostnames are routed to it at the
  // edge (DNS or the dashboard), so there is no URL to show.
  logger.info("Starting tunnel", observe::Fields().add("tunnelID", credentials.tunnelIdText()));
  return identityReady(kj::mv(credentials.accountTag), kj::mv(credentials.tunnelSecret),
                       kj::mv(credentials.tunnelId));
}

kj::Promise<int> Runner::identityReady(kj::String accountTag, kj::Array<kj::byte> secret,
                                       kj::Array<kj::byte> tunnelId) {
  auto connectorId = newConnectorId();
  auto connectorText = edge::formatUuid(connectorId);
  tunnelStatus.setConnectorId(connectorText);
  // build_info as cloudflared sets it (RegisterBuildInfo(BuildType, BuildTime, Version)), with
  // the mirrored cloudflared version; there is no Go runtime, so goversion names cfqt instead.
  tunnelStatus.setBuildInfo({kj::str("cfqt/", edge::cfqtVersion()), kj::str(""),
                             kj::str("unknown"), kj::str(options.clientVersion)});
  logger.info(kj::str("Version ", options.clientVersion, " (cfqt ", edge::cfqtVersion(), ")"));
  logger.info(kj::str("Generated Connector ID: ", connectorText));
  EdgeIdentity id;
  id.accountTag = kj::mv(accountTag);
  id.tunnelSecret = kj::mv(secret);
  id.tunnelId = kj::mv(tunnelId);
  id.connectorId = kj::mv(connectorId);
  id.version = kj::str(options.clientVersion);
  id.arch = connectorArch();
  identity = kj::mv(id);

  if (!options.metrics) return metricsBound(nullptr);
  kj::Maybe<kj::StringPtr> address;
  KJ_IF_MAYBE(a, options.metricsAddress) address = a->asPtr();
  return observe::bindMetrics(io.provider->getNetwork(), address)
      .then([this](kj::Own<kj::ConnectionReceiver> r) { return metricsBound(kj::mv(r)); },
            [this](kj::Exception&& e) -> kj::Promise<int> {
              return failAfterApi([this, e = kj::mv(e)]() mutable {
                return startFailed("failed to bind the metrics server", kj::mv(e));
              });
            });
}

kj::Promise<int> Runner::metricsBound(kj::Maybe<kj::Own<kj::ConnectionReceiver>> receiver) {
  auto& timer = io.provider->getTimer();
  KJ_IF_MAYBE(r, receiver) {
    auto address = observe::receiverAddress(**r, "127.0.0.1");
    KJ_IF_MAYBE(given, options.metricsAddress) {
      KJ_IF_MAYBE(colon, given->findLast(':')) {
        auto host = kj::heapString(given->begin(), *colon);
        if (host.size() > 0 && host != "localhost") {
          address = observe::receiverAddress(**r, host);
        }
      }
    }
    logger.info(kj::str("Starting metrics server on ", address, "/metrics"));
    callbacks.metricsListening(address);
    auto server = kj::heap<observe::MetricsServer>(timer, headerTable, tunnelStatus);
    metricsTask = server->listen(kj::mv(*r)).eagerlyEvaluate([this](kj::Exception&& e) {
      logger.error("Metrics server failed", observe::Fields().error(e));
    });
    metricsServer = kj::mv(server);
  }
  // auto starts with QUIC, as cloudflared does.
  logger.info(kj::str("Initial protocol ", options.dialer.protocol == Protocol::HTTP2
                                               ? "http2" : "quic"));
  const char* keyLog = getenv("SSLKEYLOGFILE");
  if (keyLog != nullptr && keyLog[0] != '\0') {
    // GnuTLS writes the QUIC connections' TLS secrets there itself (NSS key log format);
    // kj-tls, which secures HTTP/2 connections, offers no key log.
    logger.warn(options.dialer.protocol == Protocol::QUIC
                    ? "SSLKEYLOGFILE is set: TLS secrets of the edge connections are written to it"
                    : "SSLKEYLOGFILE is set: TLS secrets of the QUIC edge connections are written "
                      "to it (not those of HTTP/2 connections)",
                observe::Fields().add("file", keyLog));
  }
  return edge::discoverEdges(io.unixEventPort, timer, io.provider->getNetwork(),
                             kj::mv(options.discovery))
      .then([this](edge::EdgeAddresses a) { return edgesDiscovered(kj::mv(a)); },
            [this](kj::Exception&& e) -> kj::Promise<int> {
              return failAfterApi([this, e = kj::mv(e)]() mutable {
                return startFailed("edge discovery failed", kj::mv(e));
              });
            });
}

kj::Promise<int> Runner::edgesDiscovered(edge::EdgeAddresses addresses) {
  // Discovery logged each of these as a warning with its fields already.
  for (auto& w: addresses.warnings) {
    logger.debug("Edge discovery warning", observe::Fields().add("warning", w));
  }
  kj::Vector<kj::String> names;
  for (auto& region: addresses.regions) {
    for (auto& a: region.primary) names.add(a.toString());
  }
  logger.info(kj::str(addresses.totalPrimary(), " edges discovered",
                      addresses.fromEdgeFlag ? " (from --edge)" : "",
                      addresses.usedDotFallback ? " (over DNS-over-TLS)" : ""),
              observe::Fields().add("addresses", kj::strArray(names, ",")));
  auto addressPool = kj::heap<edge::AddressPool>(kj::mv(addresses));
  uint n = addressPool->limitConnections(options.haConnections);
  if (n == 0) {
    return failAfterApi([this]() {
      logger.error("Couldn't start tunnel: no edge address to connect to");
      return 1;
    });
  }
  if (n < options.haConnections) {
    logger.warn(kj::str("You requested ", options.haConnections,
                        " HA connections but I can give you at most ", n, "."));
  }
  if (router == nullptr) {
    options.edge.localConfigJson = localConfigurationJson(options.service,
                                                          options.configurationFlags);
  }
  pool = kj::mv(addressPool);
  if (options.threads != 1 && n > 1 && usableCpus() > 1) {
    // One thread and loop per connection index; the origin (and router) of this loop are not
    // used.
    originService = nullptr;
    WorkerSetup setup{options.origin, headerTable, logger, tunnelStatus, remoteConfig,
                      KJ_ASSERT_NONNULL(identity), options.edge, options.dialer, dialerShared};
    if (router != nullptr) {
      kj::Maybe<const named::TunnelConfig&> local;
      KJ_IF_MAYBE(c, options.ingressConfig) local = **c;
      auto& source = *ingressSource.emplace(
          kj::heap<IngressSource>(options.origin, options.service, local));
      setup.named = source;
      router = nullptr;
    }
    if (identityGate != nullptr) {
      // A quick tunnel: workers register once tunnelIssued() opened this (at once if it ran).
      auto& gate = *workerIdentityGate.emplace(kj::heap<IdentityGate>());
      if (!apiPending) gate.open();
      setup.identityGate = gate;
    }
    setup.busyPoll = options.busyPoll;
    return WorkerPool::start(n, setup).then([this, n](kj::Own<WorkerPool> started) {
      auto& w = *started;
      workers = kj::mv(started);
      return startSupervisor(w, n);
    }, [this](kj::Exception&& e) -> kj::Promise<int> {
      return startFailed("cannot set up the connection to the edge", kj::mv(e));
    });
  }
  auto& timer = io.provider->getTimer();
  kj::Own<EdgeDialer> d;
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
    d = kj::heap<EdgeDialer>(io.unixEventPort, io.provider->getNetwork(), timer, logger,
                             options.edge, kj::mv(options.dialer), dialerShared);
  })) {
    return failAfterApi([this, e = kj::mv(*e)]() mutable {
      return startFailed("cannot set up the connection to the edge", kj::mv(e));
    });
  }
  EdgeContext context{
      timer, io.unixEventPort, *KJ_ASSERT_NONNULL(originService), logger, tunnelStatus,
      remoteConfig, KJ_ASSERT_NONNULL(identity), options.edge, *d,
      router.map([](kj::Own<named::Router>& r) -> named::Router& { return *r; })};
  KJ_IF_MAYBE(gate, identityGate) context.identityReady = *gate;
  auto f = kj::heap<EdgeConnectionFactory>(kj::mv(context));
  dialer = kj::mv(d);
  auto& sessions = *f;
  factory = kj::mv(f);
  return startSupervisor(sessions, n);
}

kj::Promise<int> Runner::startSupervisor(SessionFactory& sessions, uint n) {
  auto& timer = io.provider->getTimer();
  SupervisorConfig config;
  config.haConnections = n;
  config.backoff = options.backoff;
  config.haStagger = options.haStagger;
  auto s = kj::heap<Supervisor>(timer, sessions, *KJ_ASSERT_NONNULL(pool), logger, tunnelStatus,
                                config, jitter);
  s->onRegistered([this](uint connIndex) {
    trimPending = true;   // the dial's transient memory (trust roots, handshake) is free now
    codeReleasePending = true;
    callbacks.connectionRegistered(connIndex);
  });
  auto promise = s->run();
  if (options.memoryReturnInterval > 0 * kj::SECONDS) {
    memoryTask = returnMemory(0).eagerlyEvaluate(nullptr);
  }
  supervisor = kj::mv(s);
  edgesStarted = true;
  if (probeWanted && !apiPending) startProbe();
  return promise.then([this]() { return supervisorDone(); });
}

kj::Promise<void> Runner::returnMemory(uint64_t servedBefore) {
  // After a burst of requests the heap holds free memory that glibc keeps (freed blocks in the
  // middle of the heap are not returned by free()). Once every request has finished, give it
  // back to the system, so that RSS returns to its idle size after the load.
  auto& timer = io.provider->getTimer();
  return timer.afterDelay(options.memoryReturnInterval).then([this, servedBefore]() {
    uint64_t served = tunnelStatus.totalRequests();
    maybeReleaseCode(served);
    if ((served != servedBefore || trimPending) && tunnelStatus.concurrentRequests() == 0) {
      trimPending = false;
      malloc_trim(0);
      return returnMemory(served);
    }
    return returnMemory(tunnelStatus.concurrentRequests() == 0 ? served : servedBefore);
  });
}

void Runner::maybeReleaseCode(uint64_t served) {
  // Code that ran once (the dial, the handshake, registration) or during a load stays mapped
  // around every page it touched; a quiet interval after either is when to let it go.
  bool quiet = served == codeTickServed && tunnelStatus.concurrentRequests() == 0;
  codeTickServed = served;
  if (!options.releaseIdleCode || !quiet) return;
  if (!codeReleasePending && served == codeReleasedServed) return;
  codeReleasePending = false;
  codeReleasedServed = served;
  auto start = kj::systemPreciseMonotonicClock().now();
  size_t bytes = releaseCodePages(CodeScope::ALL_OBJECTS);
  auto took = (kj::systemPreciseMonotonicClock().now() - start) / kj::MICROSECONDS;
  logger.debug("Released the page-table entries of idle code",
               observe::Fields().add("bytes", bytes).add("requests", served)
                   .add("microseconds", took));
}

int Runner::supervisorDone() {
  auto& s = *KJ_ASSERT_NONNULL(supervisor);
  if (s.allFailed()) {
    logger.error("no more connections active and exiting: every connection was refused "
                 "by the edge");
    return 1;
  }
  logger.info("Tunnel server stopped");
  memoryTask = nullptr;
  if (metricsServer != nullptr) {
    metricsTask = nullptr;
    logger.info("Metrics server stopped");
  }
  return readyFailed ? 1 : 0;
}

}  // namespace cfqt::tunnel
