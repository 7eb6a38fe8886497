// cfqt: Cloudflare quick tunnels without cloudflared. Parses and validates the command line
// (cli.h; a bad flag exits 2 before anything is requested), optionally starts the edge emulator
// `cfqt-edge` as a child process (--local), runs a tunnel::Runner and handles signals: the first
// SIGINT/SIGTERM shuts down gracefully, a second exits at once.

#include "cli.h"
#include "named.h"

#include "edge/edge-address.h"
#include "edge/json.h"
#include "loop/spinner.h"
#include "observe/log.h"
#include "origin/origin.h"
#include "tunnel/runner.h"

#include <gnutls/gnutls.h>
#include <gnutls/x509.h>

#include <kj/async-io.h>
#include <kj/async-unix.h>
#include <kj/debug.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
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
  r.busyPoll = o.busyPoll;
  r.releaseIdleCode = o.releaseIdleCode;
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

// ---- --local: cfqt-edge as a child process ----------------------------------------------------
//
// The emulator is not linked into cfqt (it would make every cfqt process map its code): --local
// starts bin/cfqt-edge (next to this executable, or $CFQT_EDGE) with loopback listeners, reads
// its JSON ready line and points the runner at it. The child runs in its own process group, so a
// Ctrl-C in the terminal reaches only cfqt, which then shuts down gracefully against a live edge;
// it is stopped (SIGTERM, then reaped) when cfqt returns, and PR_SET_PDEATHSIG stops it when cfqt
// dies any other way.

constexpr size_t MAX_READY_LINE = 64 * 1024;

class LocalEdgeProcess {
  // Owns the child: SIGTERM and waitpid() on destruction.
public:
  explicit LocalEdgeProcess(pid_t pid): pid(pid) {}
  KJ_DISALLOW_COPY(LocalEdgeProcess);
  ~LocalEdgeProcess() noexcept(false) {
    if (pid <= 0) return;
    kill(pid, SIGTERM);
    int status;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {}
  }

  kj::String exitDescription() {
    // The child closed its stdout without a ready line: reap it and say how it ended.
    int status = 0;
    pid_t got;
    while ((got = waitpid(pid, &status, 0)) < 0 && errno == EINTR) {}
    if (got != pid) return kj::str("cfqt-edge closed its output");
    pid = 0;
    if (WIFEXITED(status)) return kj::str("cfqt-edge exited with status ", WEXITSTATUS(status));
    if (WIFSIGNALED(status)) return kj::str("cfqt-edge was killed by signal ", WTERMSIG(status));
    return kj::str("cfqt-edge stopped");
  }

private:
  pid_t pid;
};

kj::Maybe<kj::String> findEdgeBinary(kj::String& looked) {
  // $CFQT_EDGE, else cfqt-edge in this executable's directory.
  const char* env = getenv("CFQT_EDGE");
  if (env != nullptr && env[0] != '\0') {
    looked = kj::str(env, " ($CFQT_EDGE)");
    if (access(env, X_OK) == 0) return kj::str(env);
    return nullptr;
  }
  char self[PATH_MAX];
  ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
  if (n <= 0) {
    looked = kj::str("the directory of cfqt (/proc/self/exe unreadable)");
    return nullptr;
  }
  self[n] = '\0';
  kj::StringPtr exe(self, n);
  kj::String dir = kj::str(".");
  KJ_IF_MAYBE(slash, exe.findLast('/')) dir = kj::heapString(self, *slash);
  auto path = kj::str(dir, "/cfqt-edge");
  looked = kj::str(path);
  if (access(path.cStr(), X_OK) == 0) return kj::mv(path);
  return nullptr;
}

kj::StringPtr edgeLogLevel(kj::StringPtr cfqtLevel) {
  // cfqt-edge's own lines are debug lines ("info" shows them all); cfqt's default info level
  // showed none of them when the emulator ran in-process.
  if (cfqtLevel == "debug") return "debug";
  if (cfqtLevel == "error" || cfqtLevel == "fatal") return "error";
  return "warn";
}

kj::Maybe<pid_t> spawnEdge(kj::StringPtr path, kj::ArrayPtr<const kj::String> args, int stdoutFd,
                           kj::String& error) {
  kj::Vector<const char*> argv;
  argv.add(path.cStr());
  for (auto& a: args) argv.add(a.cStr());
  argv.add(nullptr);
  pid_t parent = getpid();
  pid_t pid = fork();
  if (pid < 0) {
    error = kj::str("fork: ", strerror(errno));
    return nullptr;
  }
  if (pid == 0) {
    // Only async-signal-safe calls from here to exec.
    setpgid(0, 0);
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() != parent) _exit(1);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, nullptr);
    signal(SIGPIPE, SIG_DFL);
    if (dup2(stdoutFd, STDOUT_FILENO) < 0) _exit(127);
    execv(path.cStr(), const_cast<char* const*>(argv.begin()));
    _exit(127);
  }
  return pid;
}

kj::Promise<kj::String> readReadyLine(kj::AsyncInputStream& in, kj::Vector<char>& buffer) {
  // Resolves with the first line (without '\n'); an empty string means end of stream first.
  size_t old = buffer.size();
  buffer.resize(old + 4096);
  return in.tryRead(buffer.begin() + old, 1, 4096).then(
      [&in, &buffer, old](size_t n) -> kj::Promise<kj::String> {
    buffer.resize(old + n);
    if (n == 0) return kj::str();
    for (size_t i = old; i < buffer.size(); i++) {
      if (buffer[i] == '\n') return kj::heapString(buffer.begin(), i);
    }
    if (buffer.size() > MAX_READY_LINE) return kj::str();
    return readReadyLine(in, buffer);
  });
}

kj::Maybe<kj::String> jsonText(const edge::JsonValue& v, kj::StringPtr key) {
  KJ_IF_MAYBE(field, v.get(key)) {
    if (field->kind == edge::JsonValue::Kind::STRING) return kj::str(field->string);
  }
  return nullptr;
}

int runLocalEmulator(kj::AsyncIoContext& io, const observe::Logger& logger,
                     cli::CliOptions& options, kj::Maybe<kj::Own<LocalEdgeProcess>>& holder,
                     tunnel::RunnerOptions& r) {
  auto fail = [&](kj::StringPtr why) {
    logger.error("Couldn't start the local edge emulator", observe::Fields().add("error", why));
    return 1;
  };
  kj::String looked;
  kj::String path;
  KJ_IF_MAYBE(p, findEdgeBinary(looked)) {
    path = kj::mv(*p);
  } else {
    return fail(kj::str("no executable cfqt-edge at ", looked,
                        "; install cfqt-edge next to cfqt or set CFQT_EDGE to its path"));
  }
  kj::Vector<kj::String> args;
  auto arg = [&](kj::StringPtr name, kj::StringPtr value) {
    args.add(kj::str(name));
    args.add(kj::str(value));
  };
  arg("--edge-listen", "127.0.0.1:0");
  if (options.haConnections > 1) arg("--edge-listen", "127.0.0.2:0");
  arg("--state-dir", localStateDir());
  // The public Internet's part too (issue 16), so that --wait-ready probes it as it would the
  // real one: the zone's DNS (over DoT), the HTTPS front door, and the delays that show the wait.
  if (options.waitReady != nullptr) {
    arg("--dns-listen", "127.0.0.1:0");
    arg("--dot-listen", "127.0.0.1:0");
    arg("--public-tls-listen", "127.0.0.1:0");
  }
  arg("--dns-delay", kj::str(options.localDnsDelay / kj::MICROSECONDS, "us"));
  arg("--route-delay", kj::str(options.localRouteDelay / kj::MICROSECONDS, "us"));
  arg("--loglevel", edgeLogLevel(options.logLevel));

  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) return fail(kj::str("pipe: ", strerror(errno)));
  kj::AutoCloseFd readEnd(fds[0]);
  kj::String spawnError;
  kj::Maybe<pid_t> spawned;
  {
    kj::AutoCloseFd writeEnd(fds[1]);
    spawned = spawnEdge(path, args, writeEnd, spawnError);
  }
  pid_t pid;
  KJ_IF_MAYBE(p, spawned) {
    pid = *p;
  } else {
    return fail(spawnError);
  }
  auto child = kj::heap<LocalEdgeProcess>(pid);
  auto in = io.lowLevelProvider->wrapInputFd(kj::mv(readEnd));
  kj::Vector<char> buffer;
  // No time limit of its own: it ends when cfqt-edge prints its line, exits, or a signal comes.
  auto line = readReadyLine(*in, buffer).exclusiveJoin(waitForSignal(io.unixEventPort).then(
      [](int) { return kj::str("\x01"); })).wait(io.waitScope);
  if (line == "\x01") return fail("interrupted by a signal while cfqt-edge started");
  if (line.size() == 0) return fail(child->exitDescription());
  auto parsed = edge::parseJson(line.asBytes());
  kj::String api, publicAddress, admin, ca;
  kj::Vector<kj::String> edges;
  kj::Maybe<kj::String> dns, dot, publicTls;
  KJ_IF_MAYBE(v, parsed) {
    KJ_IF_MAYBE(a, jsonText(*v, "api")) api = kj::mv(*a);
    KJ_IF_MAYBE(a, jsonText(*v, "public")) publicAddress = kj::mv(*a);
    KJ_IF_MAYBE(a, jsonText(*v, "admin")) admin = kj::mv(*a);
    KJ_IF_MAYBE(a, jsonText(*v, "ca")) ca = kj::mv(*a);
    dns = jsonText(*v, "dns");
    dot = jsonText(*v, "dot");
    publicTls = jsonText(*v, "public_tls");
    KJ_IF_MAYBE(list, v->get("edges")) {
      for (auto& e: list->array) {
        if (e.kind == edge::JsonValue::Kind::STRING) edges.add(kj::str(e.string));
      }
    }
  }
  if (api.size() == 0 || publicAddress.size() == 0 || ca.size() == 0 || edges.empty() ||
      (options.waitReady != nullptr && (dot == nullptr || publicTls == nullptr))) {
    return fail("cfqt-edge printed a ready line cfqt does not understand (another version?)");
  }
  observe::Fields started;
  started.add("api", api).add("edges", kj::strArray(edges, ","))
      .add("public", publicAddress).add("admin", admin).add("pid", pid);
  KJ_IF_MAYBE(tls, publicTls) {
    // --wait-ready: the public Internet's part too.
    KJ_IF_MAYBE(d, dns) started.add("dns", *d);
    KJ_IF_MAYBE(d, dot) started.add("dot", *d);
    started.add("public_tls", *tls);
  }
  logger.info("Local edge emulator started", started);
  r.api.serviceUrl = kj::str("http://", api);
  r.discovery.edges.clear();
  for (auto& e: edges) r.discovery.edges.add(kj::str(e));
  r.edge.edgeCaFile = kj::str(ca);
  if (options.waitReady != nullptr) {
    // Unless told otherwise, the probe asks the emulator's DoT server and its HTTPS front door,
    // trusting the emulator's CA.
    if (r.ready.resolvers.empty()) {
      r.ready.resolvers.add(kj::str(KJ_ASSERT_NONNULL(dot), "#localhost"));
    }
    if (options.readyCa == nullptr) r.ready.caFile = kj::str(ca);
    bool portGiven = false;
    for (auto& flag: options.explicitlySet) if (flag == "ready-port") portGiven = true;
    if (!portGiven) {
      KJ_IF_MAYBE(port, edge::parsePort(portOf(KJ_ASSERT_NONNULL(publicTls)))) {
        r.ready.port = *port;
      }
    }
  }
  auto port = portOf(publicAddress);
  r.publicUrl = kj::Function<kj::String(kj::StringPtr)>(
      [port = kj::mv(port)](kj::StringPtr host) { return kj::str("http://", host, ':', port, '/'); });
  holder = kj::mv(child);
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

  kj::Maybe<kj::Own<LocalEdgeProcess>> localEdge;
  if (options.local) {
    int rc = runLocalEmulator(io, logger, options, localEdge, runnerOptions);
    if (rc != 0) return rc;
  }

  Callbacks callbacks(options.local && options.waitReady == nullptr);
  // Before any worker thread starts (issue 15): an arena per connection thread, no more.
  if (options.threads != 1 && tunnel::usableCpus() > 1) {
    tunnel::capMallocArenas(options.haConnections);
  }
  loop::Spinner spinner(runnerOptions.busyPoll);   // --busy-poll: this loop's driver
  tunnel::Runner runner(io, logger, kj::mv(runnerOptions), callbacks);
  auto signals = waitForSignal(io.unixEventPort).then([&](int sig) {
    logger.info(kj::str("Initiating graceful shutdown due to signal ", signalName(sig), " ..."));
    runner.shutdown();
    return waitForSignal(io.unixEventPort);
  }).then([&](int sig) -> int {
    logger.warn(kj::str("Received signal ", signalName(sig), " again; exiting immediately"));
    _exit(1);
  });
  int code = spinner.drive(runner.run().exclusiveJoin(kj::mv(signals)), io.waitScope);
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
