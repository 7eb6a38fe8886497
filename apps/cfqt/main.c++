// cfqt: Cloudflare quick tunnels without cloudflared. Parses and validates the command line
// (cli.h; a bad flag exits 2 before anything is requested), optionally starts an in-process edge
// emulator (--local), runs a tunnel::Runner and handles signals: the first SIGINT/SIGTERM shuts
// down gracefully, a second exits at once.

#include "cli.h"
#include "named.h"

#include "emulator/emulator.h"
#include "observe/log.h"
#include "origin/origin.h"
#include "tunnel/runner.h"

#include <gnutls/gnutls.h>
#include <gnutls/x509.h>

#include <kj/async-io.h>
#include <kj/async-unix.h>
#include <kj/debug.h>

#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <unistd.h>

#if CFQT_HAVE_WIRE_DUMP
int cfqtWireDumpMain(int argc, char** argv);
// apps/cfqt/wire-dump.c++: the hidden `cfqt wire-dump FILE` subcommand.
#endif

namespace cfqt {
namespace {

void writeOut(int fd, kj::StringPtr text) {
  const char* p = text.begin();
  size_t left = text.size();
  while (left > 0) {
    ssize_t n = ::write(fd, p, left);
    if (n < 0) {
      if (errno == EINTR) continue;
      return;
    }
    p += n;
    left -= n;
  }
}

class Callbacks final: public tunnel::RunnerCallbacks {
  // The URL alone on the first stdout line. With --local it waits for the first registered
  // connection, so that `URL=$(cfqt --local ... | head -1); curl $URL` works at once (a real
  // edge takes a while to route the new hostname anyway, as the banner says).
public:
  explicit Callbacks(bool waitForConnection): waitForConnection(waitForConnection) {}

  void tunnelCreated(kj::StringPtr url, kj::StringPtr hostname) override {
    if (waitForConnection) {
      pendingUrl = kj::str(url);
    } else {
      writeOut(STDOUT_FILENO, kj::str(url, '\n'));
    }
  }

  void connectionRegistered(uint connIndex) override {
    KJ_IF_MAYBE(url, pendingUrl) {
      writeOut(STDOUT_FILENO, kj::str(*url, '\n'));
      pendingUrl = nullptr;
    }
  }

private:
  bool waitForConnection;
  kj::Maybe<kj::String> pendingUrl;
};

kj::Maybe<kj::String> parseCertificates(kj::ArrayPtr<const kj::byte> pem) {
  // The cli::CertificateParser of main(): the edge's QUIC TLS loads --edge-ca with GnuTLS, so a
  // file GnuTLS rejects here would fail every dial later.
  gnutls_datum_t datum = {const_cast<unsigned char*>(pem.begin()),
                          static_cast<unsigned int>(pem.size())};
  gnutls_x509_crt_t* certs = nullptr;
  unsigned int count = 0;
  int rc = gnutls_x509_crt_list_import2(&certs, &count, &datum, GNUTLS_X509_FMT_PEM, 0);
  if (rc < 0) return kj::str("its certificates do not parse (GnuTLS: ", gnutls_strerror(rc), ")");
  for (unsigned int i = 0; i < count; i++) gnutls_x509_crt_deinit(certs[i]);
  gnutls_free(certs);
  if (count == 0) return kj::str("holds no certificate GnuTLS can read");
  return nullptr;
}

kj::Promise<int> waitForSignal(kj::UnixEventPort& port) {
  return port.onSignal(SIGINT).exclusiveJoin(port.onSignal(SIGTERM))
      .then([](siginfo_t info) { return info.si_signo; });
}

kj::StringPtr signalName(int sig) {
  return sig == SIGINT ? "interrupt"_kj : "terminated"_kj;
}

kj::String portOf(kj::StringPtr address) {
  KJ_IF_MAYBE(colon, address.findLast(':')) return kj::str(address.slice(*colon + 1));
  return kj::str(address);
}

kj::String localStateDir() {
  const char* runtime = getenv("XDG_RUNTIME_DIR");
  if (runtime != nullptr && runtime[0] != '\0') return kj::str(runtime, "/cfqt-local");
  return kj::str("/tmp/cfqt-local-", getuid());
}

struct OriginChoice {
  origin::OriginConfig config;
  kj::String service;
};

kj::OneOf<OriginChoice, kj::String> chooseOrigin(cli::CliOptions& o) {
  // cloudflared's precedence: --hello-world, then --url, then --unix-socket.
  OriginChoice choice;
  if (o.helloWorld) {
    choice.config = origin::helloWorldOrigin();
    choice.service = kj::str("hello_world");
  } else KJ_IF_MAYBE(url, o.url) {
    auto parsed = origin::parseOriginUrl(*url);
    KJ_SWITCH_ONEOF(parsed) {
      KJ_CASE_ONEOF(error, kj::String) return kj::mv(error);
      KJ_CASE_ONEOF(config, origin::OriginConfig) choice.config = kj::mv(config);
    }
    choice.service = url->startsWith("http://") || url->startsWith("https://") ||
                     url->startsWith("unix:") || url->startsWith("unix+tls:") ||
                     url->startsWith("http_status:") || *url == "hello-world"
        ? kj::str(*url) : kj::str("http://", *url);
  } else KJ_IF_MAYBE(path, o.unixSocket) {
    choice.config = origin::unixSocketOrigin(*path);
    choice.service = kj::str("unix:", *path);
  }
  auto& c = choice.config;
  KJ_IF_MAYBE(h, o.httpHostHeader) c.httpHostHeader = kj::str(*h);
  KJ_IF_MAYBE(n, o.originServerName) c.originServerName = kj::str(*n);
  KJ_IF_MAYBE(p, o.originCaPool) c.caPool = kj::str(*p);
  c.noTlsVerify = o.noTlsVerify;
  c.connectTimeout = o.proxyConnectTimeout;
  c.tlsTimeout = o.proxyTlsTimeout;
  c.keepAliveTimeout = o.proxyKeepAliveTimeout;
  c.helloSseInterval = o.helloSseInterval;
  return kj::mv(choice);
}

kj::Maybe<kj::String> buildOptions(cli::CliOptions& o, tunnel::RunnerOptions& r) {
  auto chosen = chooseOrigin(o);
  KJ_SWITCH_ONEOF(chosen) {
    KJ_CASE_ONEOF(error, kj::String) return kj::str("invalid origin: ", error);
    KJ_CASE_ONEOF(choice, OriginChoice) {
      r.origin = kj::mv(choice.config);
      r.service = kj::mv(choice.service);
    }
  }
  KJ_IF_MAYBE(s, o.quickService) r.api.serviceUrl = kj::str(*s);
  KJ_IF_MAYBE(ua, o.userAgent) r.api.userAgent = kj::str(*ua);
  r.api.timeout = o.apiTimeout;
  KJ_IF_MAYBE(d, o.apiRetryDelay) r.api.retryBackoffs = kj::arr(*d, *d, *d);

  KJ_IF_MAYBE(region, o.region) r.discovery.region = kj::str(*region);
  r.discovery.ipVersion = KJ_ASSERT_NONNULL(edge::parseIpVersion(o.edgeIpVersion));
  KJ_IF_MAYBE(d, o.dnsServer) r.discovery.dnsServer = kj::str(*d);
  KJ_IF_MAYBE(d, o.dotServer) r.discovery.dotServer = kj::str(*d);
  r.discovery.dnsTimeout = o.dnsTimeout;
  r.discovery.dotTimeout = o.dotTimeout;
  for (auto& e: o.edges) r.discovery.edges.add(kj::str(e));

  KJ_IF_MAYBE(ca, o.edgeCa) r.edge.edgeCaFile = kj::str(*ca);
  r.edge.transport.maxIdleTimeout = o.quicIdleTimeout;
  r.edge.transport.keepAlivePeriod = o.quicKeepAlive;
  r.edge.transport.handshakeTimeout = o.handshakeTimeout;
  r.edge.control.callTimeout = o.rpcTimeout;
  r.edge.rpcStreamTimeout = o.rpcTimeout;
  r.edge.maxConcurrentStreams = o.maxConcurrentStreams;
  r.edge.stallTimeout = o.edgeStallTimeout;
  r.edge.streamPreambleTimeout = o.streamPreambleTimeout;
  r.dialer.fallbackAfter = o.fallbackAfter;
  r.dialer.quicRetryInterval = o.quicRetryInterval;
  r.dialer.quicFailureLimit = o.quicFailureLimit;
  r.dialer.quicFailureWindow = o.quicFailureWindow;

  r.clientVersion = kj::str(o.clientVersion);
  r.haConnections = o.haConnections;
  r.threads = o.threads;
  r.backoff = tunnel::BackoffConfig{o.backoffBase, o.retries};
  r.haStagger = o.haStagger;
  r.gracePeriod = o.gracePeriod;
  KJ_IF_MAYBE(m, o.metrics) r.metricsAddress = kj::str(*m);

  // §4.4: the flags of this list that were given explicitly; protocol is always set.
  kj::StringPtr reported[] = {"no-autoupdate", "retries", "loglevel", "metrics",
                              "edge-ip-version"};
  for (auto name: reported) {
    for (auto& s: o.explicitlySet) {
      if (s != name) continue;
      kj::String value;
      if (name == "no-autoupdate") value = kj::str(o.noAutoupdate ? "true" : "false");
      else if (name == "retries") value = kj::str(o.retries);
      else if (name == "loglevel") value = kj::str(o.logLevel);
      else if (name == "metrics") value = kj::str(KJ_ASSERT_NONNULL(o.metrics));
      else value = kj::str(o.edgeIpVersion);
      r.configurationFlags.add(tunnel::ConfigFlag{kj::str(name), kj::mv(value)});
    }
  }
  r.configurationFlags.add(tunnel::ConfigFlag{kj::str("protocol"), kj::str(o.protocol)});
  KJ_IF_MAYBE(timeout, o.waitReady) {
    r.waitReady = true;
    r.ready.timeout = *timeout;
  }
  for (auto& resolver: o.readyResolvers) r.ready.resolvers.add(kj::str(resolver));
  r.ready.port = static_cast<uint16_t>(o.readyPort);
  KJ_IF_MAYBE(ca, o.readyCa) r.ready.caFile = kj::str(*ca);
  r.ready.initialBackoff = o.readyBackoff;
  r.ready.attemptTimeout = o.readyAttemptTimeout;
  r.dialer.protocol = KJ_ASSERT_NONNULL(tunnel::parseProtocol(o.protocol));
  return nullptr;
}

int runLocalEmulator(kj::AsyncIoContext& io, const observe::Logger& logger,
                     cli::CliOptions& options, kj::Maybe<kj::Own<emulator::Emulator>>& holder,
                     tunnel::RunnerOptions& r) {
  emulator::EmulatorOptions eo;
  eo.edgeListen.add(kj::str("127.0.0.1:0"));
  if (options.haConnections > 1) eo.edgeListen.add(kj::str("127.0.0.2:0"));
  eo.certificates.stateDir = localStateDir();
  // The public Internet's part too (issue 16), so that --wait-ready probes it as it would the
  // real one: the zone's DNS (over DoT), the HTTPS front door, and the delays that show the wait.
  if (options.waitReady != nullptr) {
    eo.dnsListen = kj::str("127.0.0.1:0");
    eo.dotListen = kj::str("127.0.0.1:0");
    eo.publicTlsListen = kj::str("127.0.0.1:0");
  }
  eo.dnsDelay = options.localDnsDelay;
  eo.frontDoor.routeDelay = options.localRouteDelay;
  auto emu = kj::heap<emulator::Emulator>(io, kj::mv(eo));
  emulator::ReadyInfo ready;
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() { ready = emu->start().wait(io.waitScope); })) {
    logger.error("Couldn't start the local edge emulator", observe::Fields().error(*e));
    return 1;
  }
  observe::Fields started;
  started.add("api", ready.api).add("edges", kj::strArray(ready.edges, ","))
      .add("public", ready.publicAddress).add("admin", ready.admin);
  KJ_IF_MAYBE(tls, ready.publicTls) {
    // --wait-ready: the public Internet's part too.
    KJ_IF_MAYBE(dns, ready.dns) started.add("dns", *dns);
    KJ_IF_MAYBE(dot, ready.dot) started.add("dot", *dot);
    started.add("public_tls", *tls);
  }
  logger.info("Local edge emulator started", started);
  r.api.serviceUrl = kj::str("http://", ready.api);
  r.discovery.edges.clear();
  for (auto& e: ready.edges) r.discovery.edges.add(kj::str(e));
  r.edge.edgeCaFile = kj::str(ready.ca);
  if (options.waitReady != nullptr) {
    // Unless told otherwise, the probe asks the emulator's DoT server and its HTTPS front door,
    // trusting the emulator's CA.
    if (r.ready.resolvers.empty()) {
      r.ready.resolvers.add(kj::str(KJ_ASSERT_NONNULL(ready.dot), "#localhost"));
    }
    if (options.readyCa == nullptr) r.ready.caFile = kj::str(ready.ca);
    bool portGiven = false;
    for (auto& flag: options.explicitlySet) if (flag == "ready-port") portGiven = true;
    if (!portGiven) {
      r.ready.port = static_cast<uint16_t>(
          portOf(KJ_ASSERT_NONNULL(ready.publicTls)).parseAs<uint>());
    }
  }
  auto port = portOf(ready.publicAddress);
  r.publicUrl = kj::Function<kj::String(kj::StringPtr)>(
      [port = kj::mv(port)](kj::StringPtr host) { return kj::str("http://", host, ':', port, '/'); });
  holder = kj::mv(emu);
  return 0;
}

int realMain(int argc, char** argv) {
#if CFQT_HAVE_WIRE_DUMP
  if (argc >= 2 && kj::StringPtr(argv[1]) == "wire-dump") return cfqtWireDumpMain(argc, argv);
#endif
  auto args = kj::heapArray<kj::StringPtr>(argc > 0 ? argc - 1 : 0);
  for (int i = 1; i < argc; i++) args[i - 1] = argv[i];
  auto parsed = cli::parseCommandLine(args, cli::EnvLookup(cli::processEnv));
  cli::CliOptions options;
  KJ_SWITCH_ONEOF(parsed) {
    KJ_CASE_ONEOF(exit, cli::CliExit) {
      writeOut(exit.code == 0 ? STDOUT_FILENO : STDERR_FILENO, exit.text);
      return exit.code;
    }
    KJ_CASE_ONEOF(o, cli::CliOptions) options = kj::mv(o);
  }

  // Every file, address and timeout is checked before anything touches the network.
  cli::NamedConfig namedConfig;
  bool namedCommand = options.command != cli::CliOptions::Command::QUICK ||
                      options.configFile != nullptr;
  if (namedCommand) {
    // Named tunnels (issue 19): the configuration file's flags count as given.
    KJ_IF_MAYBE(exit, cli::loadNamedConfig(options, namedConfig)) {
      writeOut(STDERR_FILENO, exit->text);
      return exit->code;
    }
  }
  cli::SystemFileChecks files{cli::CertificateParser(parseCertificates)};
  kj::Vector<cli::ConfigWarning> warnings;
  auto validated = cli::validate(options, files);
  KJ_SWITCH_ONEOF(validated) {
    KJ_CASE_ONEOF(exit, cli::CliExit) {
      writeOut(STDERR_FILENO, exit.text);
      return exit.code;
    }
    KJ_CASE_ONEOF(w, kj::Vector<cli::ConfigWarning>) warnings = kj::mv(w);
  }
  tunnel::RunnerOptions runnerOptions;
  KJ_IF_MAYBE(error, buildOptions(options, runnerOptions)) {
    auto exit = cli::configError(*error);
    writeOut(STDERR_FILENO, exit.text);
    return exit.code;
  }
  if (namedCommand) {
    // Named tunnels (issue 19): the credentials, the ingress rules, `ingress validate|rule`.
    KJ_IF_MAYBE(exit, cli::prepareNamedTunnel(options, namedConfig, runnerOptions)) {
      writeOut(exit->code == 0 ? STDOUT_FILENO : STDERR_FILENO, exit->text);
      return exit->code;
    }
  }

  observe::LogConfig logConfig;
  logConfig.level = KJ_ASSERT_NONNULL(observe::parseLogLevel(options.logLevel));
  KJ_IF_MAYBE(f, options.logFile) logConfig.file = kj::str(*f);
  logConfig.format = KJ_ASSERT_NONNULL(observe::parseLogFormat(options.logFormat));
  kj::Maybe<kj::Own<observe::Logger>> maybeLogger;
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
    maybeLogger = kj::heap<observe::Logger>(kj::mv(logConfig));
  })) {
    // validate() checked the file; this is a race or something it can't see (a full disk).
    auto exit = cli::configError(kj::str("--logfile: ", e->getDescription()));
    writeOut(STDERR_FILENO, exit.text);
    return exit.code;
  }
  auto& logger = *KJ_ASSERT_NONNULL(maybeLogger);
  observe::LogCallback logCallback(logger);
  for (auto& w: warnings) logger.warn(w.message, w.fields);

  kj::UnixEventPort::captureSignal(SIGINT);
  kj::UnixEventPort::captureSignal(SIGTERM);
  signal(SIGPIPE, SIG_IGN);
  auto io = kj::setupAsyncIo();

  kj::Maybe<kj::Own<emulator::Emulator>> localEdge;
  if (options.local) {
    int rc = runLocalEmulator(io, logger, options, localEdge, runnerOptions);
    if (rc != 0) return rc;
  }

  Callbacks callbacks(options.local && options.waitReady == nullptr);
  // Before any worker thread starts (issue 15): an arena per connection thread, no more.
  if (options.threads != 1 && tunnel::usableCpus() > 1) {
    tunnel::capMallocArenas(options.haConnections);
  }
  tunnel::Runner runner(io, logger, kj::mv(runnerOptions), callbacks);
  auto signals = waitForSignal(io.unixEventPort).then([&](int sig) {
    logger.info(kj::str("Initiating graceful shutdown due to signal ", signalName(sig), " ..."));
    runner.shutdown();
    return waitForSignal(io.unixEventPort);
  }).then([&](int sig) -> int {
    logger.warn(kj::str("Received signal ", signalName(sig), " again; exiting immediately"));
    _exit(1);
  });
  int code = runner.run().exclusiveJoin(kj::mv(signals)).wait(io.waitScope);
  return code;
}

}  // namespace
}  // namespace cfqt

int main(int argc, char** argv) {
  int code = 1;
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() { code = cfqt::realMain(argc, argv); })) {
    auto text = kj::str("cfqt: fatal: ", e->getDescription(), "\n");
    if (::write(STDERR_FILENO, text.begin(), text.size()) < 0) {}
    return 1;
  }
  return code;
}
