#include "cli.h"

#include <kj/debug.h>
#include <kj/test.h>

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

namespace cfqt::cli {
namespace {

kj::OneOf<CliOptions, CliExit> parse(std::initializer_list<kj::StringPtr> args) {
  auto array = kj::heapArray<kj::StringPtr>(args.begin(), args.size());
  return parseCommandLine(array);
}

CliOptions ok(std::initializer_list<kj::StringPtr> args) {
  auto r = parse(args);
  KJ_IF_MAYBE(e, r.tryGet<CliExit>()) KJ_FAIL_ASSERT("parse failed", e->text);
  return kj::mv(r.get<CliOptions>());
}

kj::String err(std::initializer_list<kj::StringPtr> args) {
  auto r = parse(args);
  KJ_IF_MAYBE(e, r.tryGet<CliExit>()) {
    KJ_EXPECT(e->code == 2);
    return kj::mv(e->text);
  }
  KJ_FAIL_ASSERT("expected a parse error");
}

bool has(kj::StringPtr text, kj::StringPtr needle) {
  if (needle.size() > text.size()) return false;
  for (size_t i = 0; i + needle.size() <= text.size(); i++) {
    if (memcmp(text.begin() + i, needle.begin(), needle.size()) == 0) return true;
  }
  return false;
}

KJ_TEST("cli: cloudflared invocation forms") {
  auto a = ok({"tunnel", "--url", "http://localhost:8080", "--no-autoupdate", "--protocol", "quic"});
  KJ_EXPECT(KJ_ASSERT_NONNULL(a.url) == "http://localhost:8080");
  KJ_EXPECT(a.noAutoupdate);
  auto b = ok({"--url=localhost:3000"});
  KJ_EXPECT(KJ_ASSERT_NONNULL(b.url) == "localhost:3000");
  auto c = ok({"http://127.0.0.1:9000", "--ha-connections", "4"});
  KJ_EXPECT(KJ_ASSERT_NONNULL(c.url) == "http://127.0.0.1:9000");
  KJ_EXPECT(c.haConnections == 4);
  auto d = ok({"tunnel", "-url", "x:1", "-metrics=127.0.0.1:0", "--edge", "1.2.3.4:7844",
               "--edge=5.6.7.8:7844", "--cacert", "ca.pem"});
  KJ_EXPECT(d.edges.size() == 2);
  KJ_EXPECT(KJ_ASSERT_NONNULL(d.edgeCa) == "ca.pem");
  KJ_EXPECT(KJ_ASSERT_NONNULL(d.metrics) == "127.0.0.1:0");
  auto e = ok({"--hello-world", "--local", "--grace-period", "250ms", "--backoff-base=10ms"});
  KJ_EXPECT(e.helloWorld && e.local);
  KJ_EXPECT(e.gracePeriod == 250 * kj::MILLISECONDS);
  KJ_EXPECT(e.backoffBase == 10 * kj::MILLISECONDS);
  auto f = ok({"--hello-world=false", "--url", "a:1"});
  KJ_EXPECT(!f.helloWorld);
  auto h = ok({"--unix-socket", "/run/app.sock", "--edge-ip-version", "6", "--client-version",
               "2023.7.3", "--protocol", "quic", "--logfile", "/tmp/x.log"});
  KJ_EXPECT(KJ_ASSERT_NONNULL(h.unixSocket) == "/run/app.sock");
  KJ_EXPECT(h.edgeIpVersion == "6");
  KJ_EXPECT(h.clientVersion == "2023.7.3");
  KJ_EXPECT(KJ_ASSERT_NONNULL(h.logFile) == "/tmp/x.log");
  auto defaults = ok({"--hello-world"});
  KJ_EXPECT(defaults.haConnections == 2 && defaults.retries == 5);
  KJ_EXPECT(defaults.clientVersion == "2026.8.2");
  KJ_EXPECT(defaults.gracePeriod == 30 * kj::SECONDS);
  KJ_EXPECT(defaults.metrics == nullptr);
  auto g = ok({"tunnel"  , "--loglevel", "debug", "tunnel2:80"});
  KJ_EXPECT(KJ_ASSERT_NONNULL(g.url) == "tunnel2:80");
}

KJ_TEST("cli: named tunnels: tunnel run, ingress validate/rule, TUNNEL_TOKEN") {
  auto run = ok({"tunnel", "run", "--token", "T"});
  KJ_EXPECT(run.command == CliOptions::Command::RUN);
  KJ_EXPECT(KJ_ASSERT_NONNULL(run.token) == "T");
  KJ_EXPECT(run.haConnections == 4);                 // cloudflared's default for named tunnels
  KJ_EXPECT(ok({"tunnel", "run", "--ha-connections", "2"}).haConnections == 2);
  auto withConfig = ok({"tunnel", "--config", "c.yml", "run", "my-tunnel"});
  KJ_EXPECT(KJ_ASSERT_NONNULL(withConfig.configFile) == "c.yml");
  KJ_EXPECT(KJ_ASSERT_NONNULL(withConfig.runTarget) == "my-tunnel");
  auto creds = ok({"tunnel", "run", "--cred-file", "/x.json"});
  KJ_EXPECT(KJ_ASSERT_NONNULL(creds.credentialsFile) == "/x.json");
  KJ_EXPECT(ok({"tunnel", "ingress", "validate"}).command ==
            CliOptions::Command::INGRESS_VALIDATE);
  auto rule = ok({"tunnel", "--config", "c.yml", "ingress", "rule", "https://a.example/x"});
  KJ_EXPECT(rule.command == CliOptions::Command::INGRESS_RULE);
  KJ_EXPECT(KJ_ASSERT_NONNULL(rule.ingressRuleUrl) == "https://a.example/x");

  EnvLookup env = [](kj::StringPtr name) -> kj::Maybe<kj::String> {
    if (name == "TUNNEL_TOKEN") return kj::str("from-env");
    return nullptr;
  };
  kj::StringPtr runArgs[] = {"tunnel", "run"};
  auto fromEnv = parseCommandLine(runArgs, kj::mv(env));
  KJ_EXPECT(KJ_ASSERT_NONNULL(fromEnv.get<CliOptions>().token) == "from-env");
  // A quick tunnel ignores TUNNEL_TOKEN, as cloudflared binds it to `tunnel run` only.
  EnvLookup env2 = [](kj::StringPtr name) -> kj::Maybe<kj::String> {
    if (name == "TUNNEL_TOKEN") return kj::str("from-env");
    return nullptr;
  };
  kj::StringPtr quickArgs[] = {"--url", "x:1"};
  KJ_EXPECT(parseCommandLine(quickArgs, kj::mv(env2)).get<CliOptions>().token == nullptr);
}

KJ_TEST("cli: top-level keys of the configuration file apply like flags, the command line wins") {
  auto o = ok({"tunnel", "run", "--protocol", "quic"});
  KJ_EXPECT(applyConfigFileFlag(o, "protocol", "http2") == nullptr);
  KJ_EXPECT(o.protocol == "quic");                       // given on the command line
  KJ_EXPECT(applyConfigFileFlag(o, "loglevel", "debug") == nullptr);
  KJ_EXPECT(o.logLevel == "debug");
  KJ_EXPECT(applyConfigFileFlag(o, "ha-connections", "2") == nullptr);
  KJ_EXPECT(o.haConnections == 2);
  KJ_EXPECT(applyConfigFileFlag(o, "edge", "127.0.0.1:1") == nullptr);
  KJ_EXPECT(applyConfigFileFlag(o, "edge", "127.0.0.2:1") == nullptr);
  KJ_EXPECT(o.edges.size() == 2);
  KJ_EXPECT(applyConfigFileFlag(o, "cacert", "/ca.pem") == nullptr);
  KJ_EXPECT(KJ_ASSERT_NONNULL(o.edgeCa) == "/ca.pem");
  auto fresh = ok({"tunnel", "run"});
  KJ_EXPECT(has(KJ_ASSERT_NONNULL(applyConfigFileFlag(fresh, "ha-connections", "9")),
                "between 1 and 4"));
  KJ_EXPECT(has(KJ_ASSERT_NONNULL(applyConfigFileFlag(fresh, "no-autoupdate", "maybe")),
                "true or false"));
}

KJ_TEST("cli: errors are clear") {
  KJ_EXPECT(has(err({"--protocol", "h2mux", "--url", "x:1"}), "not supported"));
  KJ_EXPECT(has(err({"--protocol", "udp", "--url", "x:1"}), "quic, http2 or auto"));
  KJ_EXPECT(ok({"--protocol", "http2", "--url", "x:1"}).protocol == "http2");
  KJ_EXPECT(ok({"--protocol", "auto", "--url", "x:1"}).protocol == "auto");
  KJ_EXPECT(has(err({"--bogus", "--url", "x:1"}), "unknown flag --bogus"));
  KJ_EXPECT(has(err({"--edge-ip-version", "5", "--url", "x:1"}), "auto, 4 or 6"));
  KJ_EXPECT(has(err({"--loglevel", "loud", "--url", "x:1"}), "--loglevel"));
  KJ_EXPECT(has(err({"--log-format-output", "xml", "--url", "x:1"}),
                "--log-format-output must be default or json"));
  KJ_EXPECT(ok({"--log-format-output", "json", "--url", "x:1"}).logFormat == "json");
  KJ_EXPECT(ok({"--url", "x:1"}).logFormat == "default");
  KJ_EXPECT(has(err({}), "nothing to expose"));
  KJ_EXPECT(has(err({"--url"}), "needs a value"));
  KJ_EXPECT(has(err({"--ha-connections", "5", "--url", "x:1"}), "between 1 and 4"));
  KJ_EXPECT(has(err({"--threads", "3", "--url", "x:1"}), "--threads must be auto or 1"));
  KJ_EXPECT(ok({"--threads", "1", "--url", "x:1"}).threads == 1);
  KJ_EXPECT(ok({"--threads", "auto", "--url", "x:1"}).threads == 0);
  KJ_EXPECT(ok({"--url", "x:1"}).busyPoll == 0 * kj::NANOSECONDS);
  KJ_EXPECT(ok({"--busy-poll", "50us", "--url", "x:1"}).busyPoll == 50 * kj::MICROSECONDS);
  KJ_EXPECT(ok({"--busy-poll=0", "--url", "x:1"}).busyPoll == 0 * kj::NANOSECONDS);
  KJ_EXPECT(ok({"--busy-poll", "10ms", "--url", "x:1"}).busyPoll == 10 * kj::MILLISECONDS);
  KJ_EXPECT(has(err({"--busy-poll", "11ms", "--url", "x:1"}), "--busy-poll must be at most 10ms"));
  KJ_EXPECT(has(err({"--busy-poll", "fast", "--url", "x:1"}),
                "--busy-poll expects a duration such as 30s, 500ms or 1m, got \"fast\""));
  KJ_EXPECT(has(err({"--url", "x:1", "--busy-poll"}), "needs a value"));
  KJ_EXPECT(has(err({"a:1", "b:2"}), "only one origin URL"));
  KJ_EXPECT(has(err({"--grace-period", "soon", "--url", "x:1"}), "duration"));
  KJ_EXPECT(has(err({"tunnel", "create", "mytunnel"}), "needs an account certificate"));
  KJ_EXPECT(has(err({"tunnel", "run", "a", "b"}), "at most one NAME or UUID"));
  KJ_EXPECT(has(err({"tunnel", "ingress", "bogus"}), "ingress validate"));
  KJ_EXPECT(has(err({"--token", "T", "--url", "x:1"}), "is for named tunnels"));
  KJ_EXPECT(parse({"version"}).get<CliExit>().code == 0);
  auto help = parse({"--help"});
  KJ_EXPECT(help.get<CliExit>().code == 0);
  KJ_EXPECT(has(help.get<CliExit>().text, "--ha-connections"));
}

KJ_TEST("cli: cloudflared environment variables fill flags not given") {
  auto args = kj::heapArray<kj::StringPtr>({"--metrics", "127.0.0.1:9"});
  auto r = parseCommandLine(args, EnvLookup([](kj::StringPtr name) -> kj::Maybe<kj::String> {
    if (name == "TUNNEL_URL") return kj::str("http://127.0.0.1:8080");
    if (name == "TUNNEL_METRICS") return kj::str("127.0.0.1:1");
    if (name == "TUNNEL_GRACE_PERIOD") return kj::str("2s");
    return nullptr;
  }));
  auto& o = r.get<CliOptions>();
  KJ_EXPECT(KJ_ASSERT_NONNULL(o.url) == "http://127.0.0.1:8080");
  KJ_EXPECT(KJ_ASSERT_NONNULL(o.metrics) == "127.0.0.1:9");   // the flag wins
  KJ_EXPECT(o.gracePeriod == 2 * kj::SECONDS);
}

KJ_TEST("cli: Go durations") {
  KJ_EXPECT(KJ_ASSERT_NONNULL(parseGoDuration("1m30s")) == 90 * kj::SECONDS);
  KJ_EXPECT(KJ_ASSERT_NONNULL(parseGoDuration("1.5s")) == 1500 * kj::MILLISECONDS);
  KJ_EXPECT(KJ_ASSERT_NONNULL(parseGoDuration("30")) == 30 * kj::SECONDS);
  KJ_EXPECT(KJ_ASSERT_NONNULL(parseGoDuration("0")) == 0 * kj::SECONDS);
  KJ_EXPECT(parseGoDuration("5x") == nullptr);
  KJ_EXPECT(parseGoDuration("") == nullptr);
}


// ---------------------------------------------------------------------------------------------
// Environment variables

kj::OneOf<CliOptions, CliExit> parseWithEnv(std::initializer_list<kj::StringPtr> args,
                                            kj::StringPtr name, kj::StringPtr value) {
  auto array = kj::heapArray<kj::StringPtr>(args.begin(), args.size());
  return parseCommandLine(array, EnvLookup([name, value](kj::StringPtr n)
                                               -> kj::Maybe<kj::String> {
    if (n == name) return kj::str(value);
    return nullptr;
  }));
}

CliOptions okWithEnv(kj::StringPtr name, kj::StringPtr value,
                     std::initializer_list<kj::StringPtr> args = {"--hello-world"}) {
  auto r = parseWithEnv(args, name, value);
  KJ_IF_MAYBE(e, r.tryGet<CliExit>()) KJ_FAIL_ASSERT("parse failed", name, value, e->text);
  auto o = kj::mv(r.get<CliOptions>());
  KJ_EXPECT(o.fromEnvironment.size() == 1, name);
  return o;
}

bool wasSet(const CliOptions& o, kj::StringPtr flag) {
  for (auto& s: o.explicitlySet) if (s == flag) return true;
  return false;
}

KJ_TEST("cli: every cloudflared 2023.7.3 variable of a flag cfqt accepts is read") {
  // cmd/cloudflared/tunnel/cmd.go, tunnel/subcommands.go and cliutil/logger.go at 2023.7.3.
  KJ_EXPECT(KJ_ASSERT_NONNULL(okWithEnv("TUNNEL_URL", "http://127.0.0.1:8080", {}).url) ==
            "http://127.0.0.1:8080");
  KJ_EXPECT(okWithEnv("TUNNEL_HELLO_WORLD", "true", {}).helloWorld);
  KJ_EXPECT(KJ_ASSERT_NONNULL(okWithEnv("TUNNEL_UNIX_SOCKET", "/run/a.sock", {}).unixSocket) ==
            "/run/a.sock");
  KJ_EXPECT(KJ_ASSERT_NONNULL(okWithEnv("TUNNEL_HTTP_HOST_HEADER", "h.example").httpHostHeader) ==
            "h.example");
  KJ_EXPECT(KJ_ASSERT_NONNULL(okWithEnv("TUNNEL_ORIGIN_CA_POOL", "/o.pem").originCaPool) ==
            "/o.pem");
  KJ_EXPECT(KJ_ASSERT_NONNULL(
      okWithEnv("TUNNEL_ORIGIN_SERVER_NAME", "o.example").originServerName) == "o.example");
  {
    auto o = okWithEnv("NO_TLS_VERIFY", "false");
    KJ_EXPECT(!o.noTlsVerify && wasSet(o, "no-tls-verify"));
  }
  {
    auto o = okWithEnv("TUNNEL_EDGE", "1.2.3.4:7844");
    KJ_ASSERT(o.edges.size() == 1);
    KJ_EXPECT(o.edges[0] == "1.2.3.4:7844");
  }
  KJ_EXPECT(KJ_ASSERT_NONNULL(okWithEnv("TUNNEL_CACERT", "/ca.pem").edgeCa) == "/ca.pem");
  KJ_EXPECT(KJ_ASSERT_NONNULL(okWithEnv("TUNNEL_REGION", "us").region) == "us");
  KJ_EXPECT(okWithEnv("TUNNEL_EDGE_IP_VERSION", "6").edgeIpVersion == "6");
  KJ_EXPECT(okWithEnv("TUNNEL_RETRIES", "9").retries == 9);
  KJ_EXPECT(okWithEnv("TUNNEL_GRACE_PERIOD", "2s").gracePeriod == 2 * kj::SECONDS);
  KJ_EXPECT(KJ_ASSERT_NONNULL(okWithEnv("TUNNEL_METRICS", "127.0.0.1:9").metrics) ==
            "127.0.0.1:9");
  KJ_EXPECT(okWithEnv("TUNNEL_LOGLEVEL", "debug").logLevel == "debug");
  KJ_EXPECT(KJ_ASSERT_NONNULL(okWithEnv("TUNNEL_LOGFILE", "/tmp/l.log").logFile) == "/tmp/l.log");
  KJ_EXPECT(okWithEnv("TUNNEL_LOG_OUTPUT", "json").logFormat == "json");
  KJ_EXPECT(okWithEnv("TUNNEL_MANAGEMENT_OUTPUT", "json").logFormat == "json");
  {
    auto o = okWithEnv("TUNNEL_TRANSPORT_PROTOCOL", "quic");
    KJ_EXPECT(o.protocol == "quic" && wasSet(o, "protocol"));
  }
  KJ_EXPECT(okWithEnv("NO_AUTOUPDATE", "T").noAutoupdate);   // Go's ParseBool spellings
}

KJ_TEST("cli: environment values are checked like flags and named in errors") {
  auto tls = parseWithEnv({"--hello-world"}, "NO_TLS_VERIFY", "true");
  KJ_EXPECT(has(tls.get<CliExit>().text, "NO_TLS_VERIFY (--no-tls-verify) is not supported"));
  auto proto = parseWithEnv({"--hello-world"}, "TUNNEL_TRANSPORT_PROTOCOL", "h2mux");
  KJ_EXPECT(has(proto.get<CliExit>().text, "(from TUNNEL_TRANSPORT_PROTOCOL)"));
  auto ip = parseWithEnv({"--hello-world"}, "TUNNEL_EDGE_IP_VERSION", "5");
  KJ_EXPECT(has(ip.get<CliExit>().text, "(from TUNNEL_EDGE_IP_VERSION)"));
  auto bad = parseWithEnv({"--url", "x:1"}, "TUNNEL_HELLO_WORLD", "yes");
  KJ_EXPECT(has(bad.get<CliExit>().text, "TUNNEL_HELLO_WORLD expects true or false"));
  // A flag on the command line wins over its variable.
  auto given = parseWithEnv({"--hello-world", "--edge-ip-version", "4"},
                            "TUNNEL_EDGE_IP_VERSION", "6");
  KJ_EXPECT(given.get<CliOptions>().edgeIpVersion == "4");
  KJ_EXPECT(given.get<CliOptions>().fromEnvironment.size() == 0);
}

KJ_TEST("cli: TUNNEL_EDGE is a comma-separated list, --edge is not split") {
  auto o = okWithEnv("TUNNEL_EDGE", " 1.2.3.4:7844, [::1]:7844,,edge.example:7844 ");
  KJ_ASSERT(o.edges.size() == 3, o.edges.size());
  KJ_EXPECT(o.edges[0] == "1.2.3.4:7844");
  KJ_EXPECT(o.edges[1] == "[::1]:7844");
  KJ_EXPECT(o.edges[2] == "edge.example:7844");
  auto flag = ok({"--hello-world", "--edge", "1.2.3.4:7844,5.6.7.8:7844"});
  KJ_EXPECT(flag.edges.size() == 1);
}

// ---------------------------------------------------------------------------------------------
// Tuning flags

KJ_TEST("cli: stream and stall tuning flags") {
  auto d = ok({"--hello-world"});
  KJ_EXPECT(d.maxConcurrentStreams == 1024);
  KJ_EXPECT(d.edgeStallTimeout == 10 * kj::SECONDS);
  KJ_EXPECT(d.streamPreambleTimeout == 10 * kj::SECONDS);
  auto o = ok({"--hello-world", "--max-concurrent-streams", "16", "--edge-stall-timeout=250ms",
               "--stream-preamble-timeout", "2s"});
  KJ_EXPECT(o.maxConcurrentStreams == 16);
  KJ_EXPECT(o.edgeStallTimeout == 250 * kj::MILLISECONDS);
  KJ_EXPECT(o.streamPreambleTimeout == 2 * kj::SECONDS);
  KJ_EXPECT(has(err({"--hello-world", "--max-concurrent-streams", "many"}),
                "non-negative integer"));
  KJ_EXPECT(has(err({"--hello-world", "--edge-stall-timeout", "soon"}), "duration"));
  auto help = parse({"--help"}).get<CliExit>().text;
  KJ_EXPECT(has(help, "--max-concurrent-streams"));
  KJ_EXPECT(has(help, "--edge-stall-timeout"));
  KJ_EXPECT(has(help, "--stream-preamble-timeout"));
}

KJ_TEST("cli: --protocol auto's QUIC failure trigger flags") {
  auto d = ok({"--hello-world"});
  KJ_EXPECT(d.quicFailureLimit == 3);
  KJ_EXPECT(d.quicFailureWindow == 60 * kj::SECONDS);
  auto o = ok({"--hello-world", "--quic-failure-limit", "0", "--quic-failure-window=500ms"});
  KJ_EXPECT(o.quicFailureLimit == 0);
  KJ_EXPECT(o.quicFailureWindow == 500 * kj::MILLISECONDS);
  KJ_EXPECT(has(err({"--hello-world", "--quic-failure-limit", "-1"}), "non-negative integer"));
  KJ_EXPECT(has(err({"--hello-world", "--quic-failure-window", "soon"}), "duration"));
  auto help = parse({"--help"}).get<CliExit>().text;
  KJ_EXPECT(has(help, "--quic-failure-limit"));
  KJ_EXPECT(has(help, "--quic-failure-window"));
}

KJ_TEST("cli: --wait-ready[=TIMEOUT] and the readiness flags") {
  auto d = ok({"--hello-world"});
  KJ_EXPECT(d.waitReady == nullptr);
  KJ_EXPECT(d.readyPort == 443 && d.readyResolvers.size() == 0 && d.readyCa == nullptr);
  KJ_EXPECT(d.readyBackoff == 100 * kj::MILLISECONDS);
  // Alone: 60 s, and the next argument is not taken as its value.
  auto alone = ok({"--wait-ready", "http://localhost:8080"});
  KJ_EXPECT(KJ_ASSERT_NONNULL(alone.waitReady) == 60 * kj::SECONDS);
  KJ_EXPECT(KJ_ASSERT_NONNULL(alone.url) == "http://localhost:8080");
  auto o = ok({"--hello-world", "--wait-ready=90s", "--ready-resolver", "127.0.0.1:853#localhost",
               "--ready-resolver=[::1]:8853", "--ready-port", "8443", "--ready-ca", "/ca.pem",
               "--ready-backoff", "10ms", "--ready-attempt-timeout", "1s",
               "--local-dns-delay", "2s", "--local-route-delay", "500ms"});
  KJ_EXPECT(KJ_ASSERT_NONNULL(o.waitReady) == 90 * kj::SECONDS);
  KJ_ASSERT(o.readyResolvers.size() == 2);
  KJ_EXPECT(o.readyResolvers[0] == "127.0.0.1:853#localhost" && o.readyResolvers[1] == "[::1]:8853");
  KJ_EXPECT(o.edges.size() == 0);
  KJ_EXPECT(o.readyPort == 8443 && KJ_ASSERT_NONNULL(o.readyCa) == "/ca.pem");
  KJ_EXPECT(o.readyBackoff == 10 * kj::MILLISECONDS);
  KJ_EXPECT(o.readyAttemptTimeout == 1 * kj::SECONDS);
  KJ_EXPECT(o.localDnsDelay == 2 * kj::SECONDS && o.localRouteDelay == 500 * kj::MILLISECONDS);
  KJ_EXPECT(has(err({"--hello-world", "--wait-ready=soon"}), "duration"));
  KJ_EXPECT(has(err({"--hello-world", "--wait-ready=0"}), "greater than 0"));
  KJ_EXPECT(has(err({"--hello-world", "--ready-port", "70000"}), "between 1 and 65535"));
  auto help = parse({"--help"}).get<CliExit>().text;
  KJ_EXPECT(has(help, "--wait-ready[=VALUE]"));
  KJ_EXPECT(has(help, "--ready-resolver VALUE"));
}

// ---------------------------------------------------------------------------------------------
// validate()

class AcceptingFiles final: public FileChecks {
  // Every file is fine; records what was asked.
public:
  kj::Maybe<kj::String> certificates(kj::StringPtr path) override {
    asked.add(kj::str("cert:", path));
    return nullptr;
  }
  kj::Maybe<kj::String> logFile(kj::StringPtr path) override {
    asked.add(kj::str("log:", path));
    return nullptr;
  }
  kj::Vector<kj::String> asked;
};

class RefusingFiles final: public FileChecks {
public:
  kj::Maybe<kj::String> certificates(kj::StringPtr path) override {
    return kj::str("cert-reason");
  }
  kj::Maybe<kj::String> logFile(kj::StringPtr path) override { return kj::str("log-reason"); }
};

kj::String invalidWith(FileChecks& files, std::initializer_list<kj::StringPtr> args) {
  // The CliExit text of validate() on `args`, checked to be exit 2 with a one-line reason.
  auto o = ok(args);
  auto r = validate(o, files);
  KJ_IF_MAYBE(e, r.tryGet<CliExit>()) {
    KJ_EXPECT(e->code == 2, e->text);
    KJ_EXPECT(e->text.startsWith("cfqt: "), e->text);
    KJ_IF_MAYBE(nl, e->text.findFirst('\n')) {
      KJ_EXPECT(e->text.slice(*nl + 1) == "Run `cfqt --help` for usage.\n", e->text);
    }
    return kj::mv(e->text);
  }
  auto text = kj::str(kj::strArray(kj::arrayPtr(args.begin(), args.size()), " "));
  KJ_FAIL_ASSERT("validate() accepted", text);
}

kj::String invalid(std::initializer_list<kj::StringPtr> args) {
  AcceptingFiles files;
  return invalidWith(files, args);
}

kj::Vector<ConfigWarning> valid(CliOptions& o) {
  AcceptingFiles files;
  auto r = validate(o, files);
  KJ_IF_MAYBE(e, r.tryGet<CliExit>()) KJ_FAIL_ASSERT("validate() refused", e->text);
  return kj::mv(r.get<kj::Vector<ConfigWarning>>());
}

KJ_TEST("validate: defaults and good values pass without warnings") {
  auto d = ok({"--hello-world"});
  KJ_EXPECT(valid(d).size() == 0);
  auto o = ok({"--hello-world", "--edge", "198.41.192.7:7844", "--edge", "[2606:4700:a0::1]:7844",
               "--edge", "region1.v2.argotunnel.com:7844", "--edge", "localhost:65535",
               "--edge", "edge.example.:7844",
               "--metrics", "localhost:", "--dns-server", "[::1]:53", "--dot-server",
               "1.1.1.1:853#cloudflare-dns.com", "--quick-service", "http://127.0.0.1:8081/base/",
               "--edge-ca", "/e.pem", "--origin-ca-pool", "/o.pem", "--logfile", "/l.log",
               "--quic-keepalive-period", "0", "--quic-idle-timeout", "1s",
               "--proxy-keepalive-timeout", "0", "--grace-period", "0", "--ha-stagger", "0"});
  KJ_EXPECT(valid(o).size() == 0);
  KJ_EXPECT(o.quicKeepAlive == 0 * kj::SECONDS);
  for (auto m: {"127.0.0.1:0"_kj, ":20241"_kj, "[::1]:0"_kj, "metrics.local:9"_kj}) {
    auto x = ok({"--hello-world", "--metrics", m});
    KJ_EXPECT(valid(x).size() == 0, m);
  }
  for (auto q: {"https://api.trycloudflare.com"_kj, "http://[::1]:8081"_kj, "http://x:1/p"_kj,
                "http://127.0.0.1"_kj}) {
    auto x = ok({"--hello-world", "--quick-service", q});
    KJ_EXPECT(valid(x).size() == 0, q);
  }
}

KJ_TEST("validate: each file flag goes through the file checks") {
  AcceptingFiles files;
  auto o = ok({"--hello-world", "--cacert", "/e.pem", "--origin-ca-pool", "/o.pem",
               "--logfile", "/l.log"});
  KJ_EXPECT(validate(o, files).is<kj::Vector<ConfigWarning>>());
  KJ_ASSERT(files.asked.size() == 3);
  KJ_EXPECT(files.asked[0] == "cert:/e.pem");
  KJ_EXPECT(files.asked[1] == "cert:/o.pem");
  KJ_EXPECT(files.asked[2] == "log:/l.log");

  RefusingFiles refusing;
  KJ_EXPECT(has(invalidWith(refusing, {"--hello-world", "--edge-ca", "/e.pem"}),
                "cfqt: --edge-ca /e.pem: cert-reason; give the PEM file of the CA"));
  KJ_EXPECT(has(invalidWith(refusing, {"--hello-world", "--origin-ca-pool", "/o.pem"}),
                "cfqt: --origin-ca-pool /o.pem: cert-reason"));
  KJ_EXPECT(has(invalidWith(refusing, {"--hello-world", "--logfile", "/l.log"}),
                "cfqt: --logfile /l.log: log-reason"));
}

class TempDir {
  // A fresh directory under $TMPDIR (or /tmp), removed with the files made through it.
public:
  TempDir() {
    const char* base = getenv("TMPDIR");
    auto pattern = kj::str(base != nullptr && base[0] != '\0' ? base : "/tmp", "/cli-test-XXXXXX");
    KJ_ASSERT(mkdtemp(pattern.begin()) != nullptr, strerror(errno));
    path = kj::mv(pattern);
  }
  ~TempDir() noexcept(false) {
    for (auto& f: files) unlink(f.cStr());
    rmdir(path.cStr());
  }
  KJ_DISALLOW_COPY(TempDir);

  kj::String write(kj::StringPtr name, kj::StringPtr content) {
    auto p = kj::str(path, '/', name);
    int fd = open(p.cStr(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    KJ_ASSERT(fd >= 0, p, strerror(errno));
    KJ_ASSERT(::write(fd, content.begin(), content.size()) == (ssize_t)content.size());
    close(fd);
    files.add(kj::str(p));
    return p;
  }

  kj::String path;
  kj::Vector<kj::String> files;
};

constexpr kj::StringPtr PEM =
    "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU\n-----END CERTIFICATE-----\n"_kj;

KJ_TEST("SystemFileChecks: certificate files") {
  TempDir dir;
  SystemFileChecks files;
  auto good = dir.write("good.pem", kj::str("# bundle\n", PEM, PEM));
  KJ_EXPECT(files.certificates(good) == nullptr);
  auto missing = kj::str(dir.path, "/missing.pem");
  KJ_EXPECT(has(KJ_ASSERT_NONNULL(files.certificates(missing)), "No such file or directory"));
  KJ_EXPECT(has(KJ_ASSERT_NONNULL(files.certificates(dir.path)), "is a directory"));
  KJ_EXPECT(has(KJ_ASSERT_NONNULL(files.certificates(dir.write("e.pem", ""))),
                "holds no PEM certificate"));
  KJ_EXPECT(has(KJ_ASSERT_NONNULL(files.certificates(dir.write("t.txt", "not a certificate\n"))),
                "holds no PEM certificate"));
  auto key = dir.write("key.pem", "-----BEGIN PRIVATE KEY-----\nAA==\n-----END PRIVATE KEY-----\n");
  KJ_EXPECT(has(KJ_ASSERT_NONNULL(files.certificates(key)), "holds no PEM certificate"));
  auto cut = dir.write("cut.pem", "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU\n");
  KJ_EXPECT(has(KJ_ASSERT_NONNULL(files.certificates(cut)), "holds no PEM certificate"));
  KJ_EXPECT(has(KJ_ASSERT_NONNULL(files.certificates("/dev/null")), "not a regular file"));

  // The parser (GnuTLS in main()) sees the whole file and has the last word.
  kj::Vector<size_t> seen;
  SystemFileChecks parsing{CertificateParser(
      [&seen](kj::ArrayPtr<const kj::byte> pem) -> kj::Maybe<kj::String> {
    seen.add(pem.size());
    return kj::str("parser-reason");
  })};
  KJ_EXPECT(KJ_ASSERT_NONNULL(parsing.certificates(good)) == "parser-reason");
  KJ_ASSERT(seen.size() == 1);
  KJ_EXPECT(seen[0] == 9 + 2 * PEM.size());
  KJ_EXPECT(parsing.certificates(missing) != nullptr);
  KJ_EXPECT(seen.size() == 1, "the parser ran on a missing file");

  // Through validate(): exit 2 naming the flag and the file.
  auto text = invalidWith(files, {"--hello-world", "--edge-ca", missing});
  KJ_EXPECT(has(text, kj::str("--edge-ca ", missing, ": cannot open it: No such file")), text);
  KJ_EXPECT(has(invalidWith(files, {"--hello-world", "--cacert", dir.files[1]}),
                "holds no PEM certificate"));
}

KJ_TEST("SystemFileChecks: log files") {
  TempDir dir;
  SystemFileChecks files;
  KJ_EXPECT(files.logFile(kj::str(dir.path, "/new.log")) == nullptr);
  KJ_EXPECT(files.logFile(dir.write("old.log", "x\n")) == nullptr);
  KJ_EXPECT(has(KJ_ASSERT_NONNULL(files.logFile(kj::str(dir.path, "/no/such/dir/x.log"))),
                "does not exist"));
  KJ_EXPECT(has(KJ_ASSERT_NONNULL(files.logFile(dir.path)), "is a directory"));
  auto notDir = dir.write("plain", "x");
  KJ_EXPECT(has(KJ_ASSERT_NONNULL(files.logFile(kj::str(notDir, "/x.log"))),
                kj::str(notDir, " is not a directory")));
  auto text = invalidWith(files, {"--hello-world", "--logfile",
                                  kj::str(dir.path, "/missing/x.log")});
  KJ_EXPECT(has(text, kj::str("--logfile ", dir.path, "/missing/x.log: its directory ", dir.path,
                              "/missing does not exist")), text);
}

KJ_TEST("validate: readiness resolvers and CA") {
  AcceptingFiles files;
  auto o = ok({"--hello-world", "--ready-ca", "/r.pem"});
  KJ_EXPECT(validate(o, files).is<kj::Vector<ConfigWarning>>());
  KJ_ASSERT(files.asked.size() == 1);
  KJ_EXPECT(files.asked[0] == "cert:/r.pem");
  RefusingFiles refusing;
  KJ_EXPECT(has(invalidWith(refusing, {"--hello-world", "--ready-ca", "/r.pem"}),
                "cfqt: --ready-ca /r.pem: cert-reason"));
  KJ_EXPECT(has(invalidWith(files, {"--hello-world", "--ready-resolver", "dns.google:853"}),
                "--ready-resolver \"dns.google:853\" is not ip:port"));
  KJ_EXPECT(has(invalidWith(files, {"--hello-world", "--ready-resolver", "1.1.1.1:853#"}),
                "empty TLS name"));
  auto good = ok({"--hello-world", "--ready-resolver", "1.1.1.1:853#cloudflare-dns.com"});
  KJ_EXPECT(validate(good, files).is<kj::Vector<ConfigWarning>>());
}

KJ_TEST("validate: edge, metrics, DNS and quick-service addresses") {
  KJ_EXPECT(has(invalid({"--hello-world", "--edge", "nonsense"}),
                "cfqt: --edge \"nonsense\" is not host:port"));
  KJ_EXPECT(has(invalid({"--hello-world", "--edge", "1.2.3.4:99999"}),
                "--edge \"1.2.3.4:99999\": the port must be a number from 1 to 65535"));
  for (auto bad: {"1.2.3.4:0"_kj, "1.2.3.4:"_kj, ":7844"_kj, "::1:7844"_kj, "[::1]"_kj,
                  "[1.2.3.4]:7844"_kj, "[::1:7844"_kj, "a b:7844"_kj, "1.2.3.4:78x"_kj,
                  "1.2.3.256:7844"_kj, "1.2.3:7844"_kj, "a..:7844"_kj, ".:7844"_kj}) {
    KJ_EXPECT(has(invalid({"--hello-world", "--edge", "1.1.1.1:7844", "--edge", bad}),
                  kj::str("--edge \"", bad, "\"")), bad);
  }
  KJ_EXPECT(has(invalid({"--hello-world", "--metrics", "nonsense"}),
                "cfqt: --metrics \"nonsense\" is not host:port"));
  KJ_EXPECT(has(invalid({"--hello-world", "--metrics", "127.0.0.1:65536"}),
                "the port must be a number from 0 to 65535"));
  KJ_EXPECT(has(invalid({"--hello-world", "--metrics", "::1:80"}), "is not host:port"));
  KJ_EXPECT(has(invalid({"--hello-world", "--dns-server", "dns.example:53"}),
                "--dns-server \"dns.example:53\" is not ip:port: dns.example is not an IP"));
  KJ_EXPECT(has(invalid({"--hello-world", "--dns-server", "1.1.1.1"}), "is not ip:port"));
  KJ_EXPECT(has(invalid({"--hello-world", "--dns-server", "1.1.1.1:0"}), "from 1 to 65535"));
  KJ_EXPECT(has(invalid({"--hello-world", "--dot-server", "1.1.1.1:853#"}), "empty TLS name"));
  KJ_EXPECT(has(invalid({"--hello-world", "--dot-server", "dns.example:853#x"}),
                "--dot-server \"dns.example:853\" is not ip:port"));
  for (auto bad: {"ftp://x"_kj, "api.trycloudflare.com"_kj, "https://"_kj, "https://a b"_kj,
                  "http://:80"_kj, "http://u@h"_kj, "http://[::1"_kj, "http://1.2.3.256"_kj}) {
    KJ_EXPECT(has(invalid({"--hello-world", "--quick-service", bad}),
                  kj::str("--quick-service \"", bad, "\" is not an http:// or https:// URL")), bad);
  }
  KJ_EXPECT(has(invalid({"--hello-world", "--quick-service", "http://127.0.0.1:0"}),
                "port must be a number from 1 to 65535"));
  // A variable's name is in the message.
  auto r = parseWithEnv({"--hello-world"}, "TUNNEL_EDGE", "nonsense");
  auto o = kj::mv(r.get<CliOptions>());
  AcceptingFiles files;
  auto v = validate(o, files);
  KJ_EXPECT(has(v.get<CliExit>().text, "cfqt: TUNNEL_EDGE (--edge) \"nonsense\" is not host:port"));
}

KJ_TEST("validate: timeouts that must be positive, stream limit") {
  for (auto flag: {"--backoff-base"_kj, "--quic-idle-timeout"_kj, "--quic-handshake-timeout"_kj,
                   "--rpc-timeout"_kj, "--api-timeout"_kj, "--dns-timeout"_kj,
                   "--dot-timeout"_kj, "--proxy-connect-timeout"_kj, "--proxy-tls-timeout"_kj,
                   "--hello-sse-interval"_kj, "--edge-stall-timeout"_kj,
                   "--stream-preamble-timeout"_kj, "--quic-failure-window"_kj}) {
    KJ_EXPECT(has(invalid({"--hello-world", flag, "0s"}),
                  kj::str("cfqt: ", flag, " must be greater than 0")), flag);
  }
  KJ_EXPECT(has(invalid({"--hello-world", "--max-concurrent-streams", "0"}),
                "--max-concurrent-streams must be at least 1"));
}

KJ_TEST("validate: keep-alive at or above the idle timeout") {
  // Both given: refused, naming both values.
  auto both = invalid({"--hello-world", "--quic-idle-timeout", "1s",
                       "--quic-keepalive-period", "1s"});
  KJ_EXPECT(has(both, "cfqt: --quic-keepalive-period 1s must be below --quic-idle-timeout 1s,"),
            both);
  KJ_EXPECT(has(invalid({"--hello-world", "--quic-idle-timeout", "2s",
                         "--quic-keepalive-period", "3s"}),
                "--quic-keepalive-period 3s must be below --quic-idle-timeout 2s"));
  // Only the keep-alive given, above the default idle timeout: refused too.
  KJ_EXPECT(has(invalid({"--hello-world", "--quic-keepalive-period", "5s"}),
                "--quic-keepalive-period 5s must be below --quic-idle-timeout 5s (the default)"));

  // Only the idle timeout given: the default keep-alive is lowered, with a warning.
  auto o = ok({"--hello-world", "--quic-idle-timeout", "1s"});
  auto warnings = valid(o);
  KJ_EXPECT(o.quicKeepAlive == 500 * kj::MILLISECONDS);
  KJ_ASSERT(warnings.size() == 1);
  KJ_EXPECT(has(warnings[0].message, "keep-alive period lowered from 1s (the default) to 500ms"),
            warnings[0].message);
  KJ_EXPECT(has(warnings[0].message, "--quic-idle-timeout 1s"), warnings[0].message);
  KJ_EXPECT(warnings[0].fields.toText() == "quicIdleTimeout=1s quicKeepAlivePeriod=500ms",
            warnings[0].fields.toText());
  auto small = ok({"--hello-world", "--quic-idle-timeout", "300ms"});
  KJ_EXPECT(valid(small).size() == 1);
  KJ_EXPECT(small.quicKeepAlive == 150 * kj::MILLISECONDS);

  // Consistent or off: untouched.
  auto below = ok({"--hello-world", "--quic-idle-timeout", "1s", "--quic-keepalive-period",
                   "999ms"});
  KJ_EXPECT(valid(below).size() == 0);
  KJ_EXPECT(below.quicKeepAlive == 999 * kj::MILLISECONDS);
  auto idleAbove = ok({"--hello-world", "--quic-idle-timeout", "1001ms"});
  KJ_EXPECT(valid(idleAbove).size() == 0);
  KJ_EXPECT(idleAbove.quicKeepAlive == 1 * kj::SECONDS);
  auto off = ok({"--hello-world", "--quic-idle-timeout", "1s", "--quic-keepalive-period", "0"});
  KJ_EXPECT(valid(off).size() == 0);
  KJ_EXPECT(off.quicKeepAlive == 0 * kj::SECONDS);
}

}  // namespace
}  // namespace cfqt::cli
