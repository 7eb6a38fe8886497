#include "cli.h"

#include <kj/debug.h>

#include <stdlib.h>

namespace cfqt::cli {

namespace {

enum class Kind { BOOL, STRING, MULTI, UINT, DURATION };

struct Flag {
  kj::StringPtr name;
  kj::StringPtr alias;
  Kind kind;
  kj::StringPtr help;
};

struct EnvName {
  kj::StringPtr flag;
  kj::StringPtr env;
};

// cloudflared's environment variables for the flags cfqt shares with it.
const EnvName ENV_NAMES[] = {
    {"url", "TUNNEL_URL"}, {"hello-world", "TUNNEL_HELLO_WORLD"},
    {"unix-socket", "TUNNEL_UNIX_SOCKET"}, {"http-host-header", "TUNNEL_HTTP_HOST_HEADER"},
    {"origin-ca-pool", "TUNNEL_ORIGIN_CA_POOL"},
    {"origin-server-name", "TUNNEL_ORIGIN_SERVER_NAME"}, {"edge", "TUNNEL_EDGE"},
    {"edge-ca", "TUNNEL_CACERT"}, {"region", "TUNNEL_REGION"},
    {"edge-ip-version", "TUNNEL_EDGE_IP_VERSION"}, {"retries", "TUNNEL_RETRIES"},
    {"grace-period", "TUNNEL_GRACE_PERIOD"}, {"metrics", "TUNNEL_METRICS"},
    {"loglevel", "TUNNEL_LOGLEVEL"}, {"logfile", "TUNNEL_LOGFILE"},
    {"protocol", "TUNNEL_TRANSPORT_PROTOCOL"}, {"no-autoupdate", "NO_AUTOUPDATE"},
};

// Visible flags first; the hidden ones (timeouts) are listed under "test and tuning".
const Flag FLAGS[] = {
    {"url", "", Kind::STRING, "Origin URL to expose (also the positional argument)."},
    {"hello-world", "", Kind::BOOL, "Serve the built-in hello-world origin."},
    {"unix-socket", "", Kind::STRING, "Serve an HTTP origin on this unix socket."},
    {"http-host-header", "", Kind::STRING, "Host header sent to the origin."},
    {"origin-ca-pool", "", Kind::STRING, "PEM file of extra roots for an https origin."},
    {"origin-server-name", "", Kind::STRING, "TLS server name of an https origin."},
    {"no-tls-verify", "", Kind::BOOL, "Do not verify the origin's certificate (refused)."},
    {"quick-service", "", Kind::STRING, "Quick-tunnel API base URL."},
    {"edge", "", Kind::MULTI, "Edge address host:port (repeatable); skips discovery."},
    {"edge-ca", "cacert", Kind::STRING, "PEM file trusted alone for the edge's certificate."},
    {"region", "", Kind::STRING, "Edge region (e.g. us)."},
    {"edge-ip-version", "", Kind::STRING, "auto, 4 or 6."},
    {"dns-server", "", Kind::STRING, "DNS server ip:port for edge discovery."},
    {"dot-server", "", Kind::STRING, "DNS-over-TLS fallback ip:port[#name]."},
    {"ha-connections", "", Kind::UINT, "Connections to the edge (1-4, default 2)."},
    {"retries", "", Kind::UINT, "Caps the backoff exponent (default 5); retrying never stops."},
    {"grace-period", "", Kind::DURATION, "Shutdown grace period (default 30s)."},
    {"metrics", "", Kind::STRING, "Metrics/readiness address (default localhost:20241..5)."},
    {"loglevel", "", Kind::STRING, "debug, info, warn, error, fatal."},
    {"logfile", "", Kind::STRING, "Also append logs to this file."},
    {"user-agent", "", Kind::STRING, "User-Agent of the quick-tunnel request."},
    {"client-version", "", Kind::STRING, "Version sent to the edge (default 2026.8.2)."},
    {"local", "", Kind::BOOL, "Run an in-process edge emulator and tunnel through it."},
    {"no-autoupdate", "", Kind::BOOL, "Accepted for compatibility."},
    {"protocol", "", Kind::STRING, "Only quic is supported."},
    {"backoff-base", "", Kind::DURATION, "Reconnect backoff base (default 1s)."},
    {"ha-stagger", "", Kind::DURATION, "Delay between starting HA connections (default 1s)."},
    {"quic-idle-timeout", "", Kind::DURATION, "QUIC idle timeout (default 5s)."},
    {"quic-keepalive-period", "", Kind::DURATION, "QUIC keep-alive PING period (default 1s)."},
    {"quic-handshake-timeout", "", Kind::DURATION, "QUIC handshake timeout (default 10s)."},
    {"rpc-timeout", "", Kind::DURATION, "Control RPC call timeout (default 5s)."},
    {"api-timeout", "", Kind::DURATION, "Quick-tunnel API request timeout (default 15s)."},
    {"api-retry-delay", "", Kind::DURATION, "Wait before each API retry (default 1s,2s,4s)."},
    {"dns-timeout", "", Kind::DURATION, "DNS query timeout (default 5s)."},
    {"dot-timeout", "", Kind::DURATION, "DNS-over-TLS timeout (default 15s)."},
    {"proxy-connect-timeout", "", Kind::DURATION, "Origin connect timeout (default 30s)."},
    {"proxy-tls-timeout", "", Kind::DURATION, "Origin TLS handshake timeout (default 10s)."},
    {"proxy-keepalive-timeout", "", Kind::DURATION, "Origin idle keep-alive (default 90s)."},
    {"hello-sse-interval", "", Kind::DURATION, "hello-world /sse interval (default 1s)."},
};

const Flag* findFlag(kj::StringPtr name) {
  for (auto& f: FLAGS) {
    if (f.name == name || (f.alias.size() > 0 && f.alias == name)) return &f;
  }
  return nullptr;
}

kj::Maybe<bool> parseBool(kj::StringPtr v) {
  if (v == "true" || v == "1" || v == "t" || v == "TRUE" || v == "True") return true;
  if (v == "false" || v == "0" || v == "f" || v == "FALSE" || v == "False") return false;
  return nullptr;
}

kj::Maybe<uint> parseUint(kj::StringPtr v) {
  if (v.size() == 0 || v.size() > 9) return nullptr;
  uint n = 0;
  for (char c: v) {
    if (c < '0' || c > '9') return nullptr;
    n = n * 10 + (c - '0');
  }
  return n;
}

CliExit fail(kj::String text) {
  return CliExit{2, kj::str("cfqt: ", text, "\nRun `cfqt --help` for usage.\n")};
}

kj::Maybe<kj::String> apply(CliOptions& o, const Flag& flag, kj::StringPtr value) {
  kj::StringPtr n = flag.name;
  if (flag.kind == Kind::BOOL) {
    bool b = KJ_ASSERT_NONNULL(parseBool(value));
    if (n == "hello-world") o.helloWorld = b;
    else if (n == "no-tls-verify") o.noTlsVerify = b;
    else if (n == "local") o.local = b;
    else if (n == "no-autoupdate") o.noAutoupdate = b;
    return nullptr;
  }
  if (flag.kind == Kind::UINT) {
    KJ_IF_MAYBE(v, parseUint(value)) {
      if (n == "ha-connections") {
        if (*v < 1 || *v > 4) return kj::str("--ha-connections must be between 1 and 4");
        o.haConnections = *v;
      } else if (n == "retries") {
        o.retries = *v;
      }
      return nullptr;
    }
    return kj::str("--", n, " expects a non-negative integer, got \"", value, "\"");
  }
  if (flag.kind == Kind::DURATION) {
    KJ_IF_MAYBE(d, parseGoDuration(value)) {
      if (n == "grace-period") {
        if (*d > 3 * kj::MINUTES) return kj::str("--grace-period must be at most 3m");
        o.gracePeriod = *d;
      }
      else if (n == "backoff-base") o.backoffBase = *d;
      else if (n == "ha-stagger") o.haStagger = *d;
      else if (n == "quic-idle-timeout") o.quicIdleTimeout = *d;
      else if (n == "quic-keepalive-period") o.quicKeepAlive = *d;
      else if (n == "quic-handshake-timeout") o.handshakeTimeout = *d;
      else if (n == "rpc-timeout") o.rpcTimeout = *d;
      else if (n == "api-timeout") o.apiTimeout = *d;
      else if (n == "api-retry-delay") o.apiRetryDelay = *d;
      else if (n == "dns-timeout") o.dnsTimeout = *d;
      else if (n == "dot-timeout") o.dotTimeout = *d;
      else if (n == "proxy-connect-timeout") o.proxyConnectTimeout = *d;
      else if (n == "proxy-tls-timeout") o.proxyTlsTimeout = *d;
      else if (n == "proxy-keepalive-timeout") o.proxyKeepAliveTimeout = *d;
      else if (n == "hello-sse-interval") o.helloSseInterval = *d;
      return nullptr;
    }
    return kj::str("--", n, " expects a duration such as 30s, 500ms or 1m, got \"", value, "\"");
  }
  if (flag.kind == Kind::MULTI) {
    o.edges.add(kj::str(value));
    return nullptr;
  }
  auto v = kj::str(value);
  if (n == "url") o.url = kj::mv(v);
  else if (n == "unix-socket") o.unixSocket = kj::mv(v);
  else if (n == "http-host-header") o.httpHostHeader = kj::mv(v);
  else if (n == "origin-ca-pool") o.originCaPool = kj::mv(v);
  else if (n == "origin-server-name") o.originServerName = kj::mv(v);
  else if (n == "quick-service") o.quickService = kj::mv(v);
  else if (n == "edge-ca") o.edgeCa = kj::mv(v);
  else if (n == "region") o.region = kj::mv(v);
  else if (n == "edge-ip-version") {
    if (v != "auto" && v != "4" && v != "6") {
      return kj::str("--edge-ip-version must be auto, 4 or 6, got \"", v, "\"");
    }
    o.edgeIpVersion = kj::mv(v);
  }
  else if (n == "dns-server") o.dnsServer = kj::mv(v);
  else if (n == "dot-server") o.dotServer = kj::mv(v);
  else if (n == "metrics") o.metrics = kj::mv(v);
  else if (n == "loglevel") {
    if (v != "debug" && v != "info" && v != "warn" && v != "warning" && v != "error" &&
        v != "fatal" && v != "trace" && v != "panic") {
      return kj::str("--loglevel must be one of debug, info, warn, error, fatal");
    }
    o.logLevel = kj::mv(v);
  }
  else if (n == "logfile") o.logFile = kj::mv(v);
  else if (n == "user-agent") o.userAgent = kj::mv(v);
  else if (n == "client-version") o.clientVersion = kj::mv(v);
  else if (n == "protocol") {
    if (v == "http2" || v == "h2mux") {
      return kj::str("--protocol ", v, " is not supported: cfqt only speaks QUIC to the edge "
                     "(use --protocol quic, or leave it out)");
    }
    if (v != "quic" && v != "auto") {
      return kj::str("--protocol must be quic (or auto), got \"", v, "\"");
    }
    o.protocol = kj::str("quic");
  }
  return nullptr;
}

}  // namespace

kj::Maybe<kj::Duration> parseGoDuration(kj::StringPtr text) {
  if (text.size() == 0) return nullptr;
  // A bare number: seconds.
  bool bare = true;
  for (char c: text) if ((c < '0' || c > '9') && c != '.') bare = false;
  kj::StringPtr rest = text;
  auto bareText = kj::str(text, "s");
  if (bare) rest = bareText;
  if (rest == "0") return 0 * kj::SECONDS;
  double totalNs = 0;
  size_t i = 0;
  bool any = false;
  while (i < rest.size()) {
    size_t start = i;
    while (i < rest.size() && ((rest[i] >= '0' && rest[i] <= '9') || rest[i] == '.')) i++;
    if (i == start) return nullptr;
    auto number = kj::heapString(rest.begin() + start, i - start);
    char* end = nullptr;
    double value = strtod(number.cStr(), &end);
    if (end == nullptr || *end != '\0') return nullptr;
    size_t unitStart = i;
    while (i < rest.size() && !((rest[i] >= '0' && rest[i] <= '9') || rest[i] == '.')) i++;
    auto unit = kj::heapString(rest.begin() + unitStart, i - unitStart);
    double scale;
    if (unit == "ns") scale = 1;
    else if (unit == "us" || unit == "µs") scale = 1e3;
    else if (unit == "ms") scale = 1e6;
    else if (unit == "s") scale = 1e9;
    else if (unit == "m") scale = 60e9;
    else if (unit == "h") scale = 3600e9;
    else return nullptr;
    totalNs += value * scale;
    any = true;
  }
  if (!any || totalNs > 9.2e18) return nullptr;
  return static_cast<int64_t>(totalNs) * kj::NANOSECONDS;
}

kj::String usage() {
  kj::Vector<kj::String> lines;
  lines.add(kj::str(
      "Usage: cfqt [tunnel] [--url] URL [flags]\n"
      "       cfqt [tunnel] --hello-world [flags]\n"
      "       cfqt --local --hello-world          (offline, through an in-process edge)\n\n"
      "Creates a Cloudflare quick tunnel (https://<words>.trycloudflare.com) to a local origin,\n"
      "like `cloudflared tunnel --url URL`. The URL is printed alone on the first stdout line.\n\n"
      "Flags (--flag value, --flag=value, -flag value):"));
  for (auto& f: FLAGS) {
    auto name = kj::str("--", f.name, f.alias.size() > 0 ? kj::str(", --", f.alias) : kj::str(),
                        f.kind == Kind::BOOL ? "" : " VALUE");
    lines.add(kj::str("  ", name, kj::repeat(' ', name.size() < 34 ? 34 - name.size() : 1),
                      f.help));
  }
  lines.add(kj::str("  --help, --version"));
  return kj::str(kj::strArray(lines, "\n"), "\n");
}

kj::Maybe<kj::String> processEnv(kj::StringPtr name) {
  const char* v = getenv(name.cStr());
  if (v == nullptr) return nullptr;
  return kj::str(v);
}

kj::OneOf<CliOptions, CliExit> parseCommandLine(kj::ArrayPtr<const kj::StringPtr> args,
                                                kj::Maybe<EnvLookup> env) {
  CliOptions o;
  kj::Vector<kj::String> positional;
  bool sawTunnelWord = false;
  for (size_t i = 0; i < args.size(); i++) {
    kj::StringPtr arg = args[i];
    if (arg == "--") {
      for (size_t j = i + 1; j < args.size(); j++) positional.add(kj::str(args[j]));
      break;
    }
    if (arg.size() > 1 && arg[0] == '-') {
      kj::StringPtr body = arg.slice(arg.startsWith("--") ? 2 : 1);
      kj::String name;
      kj::Maybe<kj::String> inlineValue;
      KJ_IF_MAYBE(eq, body.findFirst('=')) {
        name = kj::heapString(body.begin(), *eq);
        inlineValue = kj::str(body.slice(*eq + 1));
      } else {
        name = kj::str(body);
      }
      if (name == "help" || name == "h") return CliExit{0, usage()};
      if (name == "version" || name == "v" || name == "V") {
        return CliExit{0, kj::str("cfqt version 0.1.0 (cloudflared-compatible 2026.8.2)\n")};
      }
      const Flag* flag = findFlag(name);
      if (flag == nullptr) return fail(kj::str("unknown flag --", name));
      kj::String value;
      if (flag->kind == Kind::BOOL) {
        KJ_IF_MAYBE(v, inlineValue) {
          if (parseBool(*v) == nullptr) {
            return fail(kj::str("--", name, " expects true or false, got \"", *v, "\""));
          }
          value = kj::mv(*v);
        } else {
          value = kj::str("true");
        }
      } else KJ_IF_MAYBE(v, inlineValue) {
        value = kj::mv(*v);
      } else {
        if (i + 1 >= args.size()) return fail(kj::str("flag --", name, " needs a value"));
        value = kj::str(args[++i]);
      }
      KJ_IF_MAYBE(error, apply(o, *flag, value)) return fail(kj::mv(*error));
      bool seen = false;
      for (auto& s: o.explicitlySet) if (s == flag->name) seen = true;
      if (!seen) o.explicitlySet.add(kj::str(flag->name));
      continue;
    }
    if (arg == "tunnel" && !sawTunnelWord && positional.size() == 0) {
      sawTunnelWord = true;
      continue;
    }
    positional.add(kj::str(arg));
  }
  if (positional.size() >= 1) {
    kj::StringPtr first = positional[0];
    if (first == "version") {
      return CliExit{0, kj::str("cfqt version 0.1.0 (cloudflared-compatible 2026.8.2)\n")};
    }
    kj::StringPtr named[] = {"run", "login", "create", "list", "route", "delete", "info",
                             "cleanup", "token", "ingress", "update", "service", "access"};
    for (auto word: named) {
      if (first == word) {
        return fail(kj::str("`", first, "` is a cloudflared command for named tunnels or "
                            "accounts; cfqt only runs quick tunnels (cfqt --url URL)"));
      }
    }
  }
  if (positional.size() > 1) {
    return fail(kj::str("unexpected argument \"", positional[1], "\" (only one origin URL)"));
  }
  if (positional.size() == 1) {
    if (o.url != nullptr) {
      return fail(kj::str("the origin URL was given twice (--url and \"", positional[0], "\")"));
    }
    o.url = kj::mv(positional[0]);
  }
  KJ_IF_MAYBE(lookup, env) {
    for (auto& e: ENV_NAMES) {
      bool given = false;
      for (auto& set: o.explicitlySet) if (set == e.flag) given = true;
      if (given) continue;
      KJ_IF_MAYBE(value, (*lookup)(e.env)) {
        if (value->size() == 0) continue;
        const Flag& flag = *findFlag(e.flag);
        if (flag.kind == Kind::BOOL && parseBool(*value) == nullptr) {
          return fail(kj::str(e.env, " expects true or false, got \"", *value, "\""));
        }
        KJ_IF_MAYBE(error, apply(o, flag, *value)) {
          return fail(kj::str(*error, " (from ", e.env, ")"));
        }
        o.explicitlySet.add(kj::str(e.flag));
      }
    }
  }
  if (o.url == nullptr && !o.helloWorld && o.unixSocket == nullptr) {
    return fail(kj::str("nothing to expose: give an origin URL (cfqt http://localhost:8080), "
                        "--hello-world or --unix-socket PATH"));
  }
  if (o.noTlsVerify) {
    return fail(kj::str("--no-tls-verify is not supported yet; use --origin-ca-pool FILE to "
                        "trust the origin's certificate"));
  }
  return kj::mv(o);
}

}  // namespace cfqt::cli
