#include "cli.h"

#include "loop/spinner.h"

#include <kj/debug.h>
#include <kj/io.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

namespace cfqt::cli {

namespace {

enum class Kind { BOOL, STRING, MULTI, UINT, DURATION, OPTIONAL_DURATION };

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

// cloudflared 2023.7.3's environment variables (EnvVars) for the flags cfqt shares with it, from
// cmd/cloudflared/tunnel/cmd.go (tunnelFlags, configureCloudflaredFlags, configureProxyFlags),
// tunnel/subcommands.go (selectProtocolFlag) and cliutil/logger.go (ConfigureLoggingFlags). A flag
// with several variables lists them in cloudflared's order: the first one set wins. cloudflared
// binds none to --ha-connections, --quick-service or the --proxy-*-timeout flags.
const EnvName ENV_NAMES[] = {
    {"url", "TUNNEL_URL"}, {"hello-world", "TUNNEL_HELLO_WORLD"},
    {"unix-socket", "TUNNEL_UNIX_SOCKET"}, {"http-host-header", "TUNNEL_HTTP_HOST_HEADER"},
    {"origin-ca-pool", "TUNNEL_ORIGIN_CA_POOL"},
    {"origin-server-name", "TUNNEL_ORIGIN_SERVER_NAME"}, {"no-tls-verify", "NO_TLS_VERIFY"},
    {"edge", "TUNNEL_EDGE"}, {"edge-ca", "TUNNEL_CACERT"}, {"region", "TUNNEL_REGION"},
    {"edge-ip-version", "TUNNEL_EDGE_IP_VERSION"}, {"retries", "TUNNEL_RETRIES"},
    {"grace-period", "TUNNEL_GRACE_PERIOD"}, {"metrics", "TUNNEL_METRICS"},
    {"loglevel", "TUNNEL_LOGLEVEL"}, {"logfile", "TUNNEL_LOGFILE"},
    {"protocol", "TUNNEL_TRANSPORT_PROTOCOL"}, {"no-autoupdate", "NO_AUTOUPDATE"},
    {"log-format-output", "TUNNEL_MANAGEMENT_OUTPUT"}, {"log-format-output", "TUNNEL_LOG_OUTPUT"},
    // `tunnel run` only (named tunnels).
    {"token", "TUNNEL_TOKEN"}, {"credentials-file", "TUNNEL_CRED_FILE"},
    {"credentials-contents", "TUNNEL_CRED_CONTENTS"},
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
    {"threads", "", Kind::STRING, "auto (default: a thread and event loop per HA connection "
                                  "when more than one CPU is usable) or 1 (one event loop)."},
    {"busy-poll", "", Kind::DURATION,
     "Keep polling the event loop this long after each packet to or from the edge instead of "
     "sleeping (e.g. 50us): lower latency on VMs, costs up to that much CPU per packet "
     "(default 0: off)."},
    {"release-idle-code", "", Kind::BOOL, "Drop the page-table entries of code that start-up or "
                                          "a load mapped once idle (default true; =false keeps "
                                          "them)."},
    {"retries", "", Kind::UINT, "Caps the backoff exponent (default 5); retrying never stops."},
    {"grace-period", "", Kind::DURATION, "Shutdown grace period (default 30s)."},
    {"metrics", "", Kind::STRING, "Metrics/readiness address (default localhost:20241..5)."},
    {"loglevel", "", Kind::STRING, "debug, info, warn, error, fatal."},
    {"logfile", "", Kind::STRING, "Also append logs to this file."},
    {"log-format-output", "", Kind::STRING, "Log output format: default or json (one object "
                                            "per line)."},
    {"user-agent", "", Kind::STRING, "User-Agent of the quick-tunnel request."},
    {"client-version", "", Kind::STRING, "Version sent to the edge (default 2026.8.2)."},
    {"local", "", Kind::BOOL, "Run an in-process edge emulator and tunnel through it."},
    {"no-autoupdate", "", Kind::BOOL, "Accepted for compatibility."},
    {"protocol", "", Kind::STRING, "auto (default: QUIC, HTTP/2 when UDP is blocked), quic or "
                                   "http2 (TLS over TCP)."},
    {"wait-ready", "", Kind::OPTIONAL_DURATION,
     "Print the URL only once it serves: DNS visible via public resolvers (asked directly), "
     "then the edge routes it here. --wait-ready=TIMEOUT (default 60s); exit 1 after."},
    {"ready-resolver", "", Kind::MULTI,
     "DNS-over-TLS resolver ip:port[#tls-name] for --wait-ready (repeatable; default "
     "1.1.1.1:853 and 1.0.0.1:853, cloudflare-dns.com)."},
    {"ready-port", "", Kind::UINT, "HTTPS port of the --wait-ready request (default 443)."},
    {"ready-ca", "", Kind::STRING,
     "PEM file trusted alone by --wait-ready (DoT resolvers and the HTTPS answer)."},
    {"local-dns-delay", "", Kind::DURATION,
     "--local: the emulator publishes the hostname's DNS this long after registration."},
    {"local-route-delay", "", Kind::DURATION,
     "--local: the emulator routes the hostname this long after registration (530 before)."},
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
    {"max-concurrent-streams", "", Kind::UINT,
     "Streams the edge may open at once per connection (default 1024)."},
    {"edge-stall-timeout", "", Kind::DURATION,
     "Replace a connection that got no ack or credit for this long (default 10s)."},
    {"stream-preamble-timeout", "", Kind::DURATION,
     "Reset an edge stream whose request is not in by then (default 10s)."},
    {"fallback-after", "", Kind::DURATION,
     "--protocol auto: use HTTP/2 when QUIC has no handshake by then (default 2s)."},
    {"quic-retry-interval", "", Kind::DURATION,
     "--protocol auto: try QUIC again after this long on HTTP/2 (default 5m)."},
    {"quic-failure-limit", "", Kind::UINT,
     "--protocol auto: QUIC dying this often within the window means HTTP/2 (default 3; 0 off)."},
    {"quic-failure-window", "", Kind::DURATION,
     "--protocol auto: the window of --quic-failure-limit (default 60s)."},
    {"ready-backoff", "", Kind::DURATION, "--wait-ready: first poll interval, doubling to 1s "
                                          "(default 100ms)."},
    {"ready-attempt-timeout", "", Kind::DURATION,
     "--wait-ready: one DoT query or HTTPS request (default 5s)."},
    {"token", "", Kind::STRING, "tunnel run: the named tunnel's token (env TUNNEL_TOKEN)."},
    {"credentials-file", "cred-file", Kind::STRING,
     "tunnel run: the named tunnel's credentials file (<UUID>.json)."},
    {"credentials-contents", "", Kind::STRING,
     "tunnel run: the credentials file's JSON itself."},
    {"config", "", Kind::STRING,
     "YAML configuration file (tunnel, credentials-file, ingress, originRequest)."},
};

const Flag* findFlag(kj::StringPtr name) {
  for (auto& f: FLAGS) {
    if (f.name == name || (f.alias.size() > 0 && f.alias == name)) return &f;
  }
  return nullptr;
}

kj::Maybe<bool> parseBool(kj::StringPtr v) {
  // Go's strconv.ParseBool.
  if (v == "true" || v == "1" || v == "t" || v == "T" || v == "TRUE" || v == "True") return true;
  if (v == "false" || v == "0" || v == "f" || v == "F" || v == "FALSE" || v == "False") {
    return false;
  }
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
  return configError(text);
}

kj::Maybe<kj::String> apply(CliOptions& o, const Flag& flag, kj::StringPtr value) {
  kj::StringPtr n = flag.name;
  if (flag.kind == Kind::BOOL) {
    bool b = KJ_ASSERT_NONNULL(parseBool(value));
    if (n == "hello-world") o.helloWorld = b;
    else if (n == "no-tls-verify") o.noTlsVerify = b;
    else if (n == "local") o.local = b;
    else if (n == "no-autoupdate") o.noAutoupdate = b;
    else if (n == "release-idle-code") o.releaseIdleCode = b;
    return nullptr;
  }
  if (flag.kind == Kind::UINT) {
    KJ_IF_MAYBE(v, parseUint(value)) {
      if (n == "ha-connections") {
        if (*v < 1 || *v > 4) return kj::str("--ha-connections must be between 1 and 4");
        o.haConnections = *v;
      } else if (n == "retries") {
        o.retries = *v;
      } else if (n == "max-concurrent-streams") {
        o.maxConcurrentStreams = *v;
      } else if (n == "quic-failure-limit") {
        o.quicFailureLimit = *v;
      } else if (n == "ready-port") {
        if (*v < 1 || *v > 65535) return kj::str("--ready-port must be between 1 and 65535");
        o.readyPort = *v;
      }
      return nullptr;
    }
    return kj::str("--", n, " expects a non-negative integer, got \"", value, "\"");
  }
  if (flag.kind == Kind::DURATION || flag.kind == Kind::OPTIONAL_DURATION) {
    KJ_IF_MAYBE(d, parseGoDuration(value)) {
      if (n == "wait-ready") {
        if (*d <= 0 * kj::SECONDS) return kj::str("--wait-ready=TIMEOUT must be greater than 0");
        o.waitReady = *d;
      }
      if (n == "grace-period") {
        if (*d > 3 * kj::MINUTES) return kj::str("--grace-period must be at most 3m");
        o.gracePeriod = *d;
      }
      else if (n == "busy-poll") {
        if (*d > loop::MAX_BUSY_POLL) return kj::str("--busy-poll must be at most 10ms");
        o.busyPoll = *d;
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
      else if (n == "edge-stall-timeout") o.edgeStallTimeout = *d;
      else if (n == "stream-preamble-timeout") o.streamPreambleTimeout = *d;
      else if (n == "fallback-after") o.fallbackAfter = *d;
      else if (n == "quic-retry-interval") o.quicRetryInterval = *d;
      else if (n == "quic-failure-window") o.quicFailureWindow = *d;
      else if (n == "ready-backoff") o.readyBackoff = *d;
      else if (n == "ready-attempt-timeout") o.readyAttemptTimeout = *d;
      else if (n == "local-dns-delay") o.localDnsDelay = *d;
      else if (n == "local-route-delay") o.localRouteDelay = *d;
      return nullptr;
    }
    return kj::str("--", n, " expects a duration such as 30s, 500ms or 1m, got \"", value, "\"");
  }
  if (flag.kind == Kind::MULTI) {
    if (n == "ready-resolver") {
      o.readyResolvers.add(kj::str(value));
      return nullptr;
    }
    o.edges.add(kj::str(value));
    return nullptr;
  }
  auto v = kj::str(value);
  if (n == "url") o.url = kj::mv(v);
  else if (n == "unix-socket") o.unixSocket = kj::mv(v);
  else if (n == "http-host-header") o.httpHostHeader = kj::mv(v);
  else if (n == "origin-ca-pool") o.originCaPool = kj::mv(v);
  else if (n == "token") o.token = kj::mv(v);
  else if (n == "credentials-file") o.credentialsFile = kj::mv(v);
  else if (n == "credentials-contents") o.credentialsContents = kj::mv(v);
  else if (n == "config") o.configFile = kj::mv(v);
  else if (n == "origin-server-name") o.originServerName = kj::mv(v);
  else if (n == "quick-service") o.quickService = kj::mv(v);
  else if (n == "edge-ca") o.edgeCa = kj::mv(v);
  else if (n == "region") o.region = kj::mv(v);
  else if (n == "threads") {
    if (v == "auto") o.threads = 0;
    else if (v == "1") o.threads = 1;
    else return kj::str("--threads must be auto or 1, got \"", v, "\"");
  }
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
  else if (n == "log-format-output") {
    if (v != "default" && v != "json") {
      return kj::str("--log-format-output must be default or json");
    }
    o.logFormat = kj::mv(v);
  }
  else if (n == "user-agent") o.userAgent = kj::mv(v);
  else if (n == "client-version") o.clientVersion = kj::mv(v);
  else if (n == "ready-ca") o.readyCa = kj::mv(v);
  else if (n == "protocol") {
    if (v == "h2mux") {
      return kj::str("--protocol h2mux is not supported (cloudflared removed it too): use quic, "
                     "http2 or auto");
    }
    if (v != "quic" && v != "auto" && v != "http2") {
      return kj::str("--protocol must be quic, http2 or auto, got \"", v, "\"");
    }
    o.protocol = kj::mv(v);
  }
  return nullptr;
}

kj::String flagName(const CliOptions& o, kj::StringPtr flag) {
  // "--metrics", or "TUNNEL_METRICS (--metrics)" when the environment set it.
  for (auto& e: o.fromEnvironment) {
    if (e.flag == flag) return kj::str(e.env, " (--", flag, ")");
  }
  return kj::str("--", flag);
}

bool isSet(const CliOptions& o, kj::StringPtr flag) {
  for (auto& s: o.explicitlySet) if (s == flag) return true;
  return false;
}

bool isSpace(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

kj::Vector<kj::String> splitList(kj::StringPtr text) {
  // "a, b,c" -> a b c; empty pieces are dropped.
  kj::Vector<kj::String> pieces;
  size_t start = 0;
  for (size_t i = 0; i <= text.size(); i++) {
    if (i < text.size() && text[i] != ',') continue;
    size_t b = start, e = i;
    while (b < e && isSpace(text[b])) b++;
    while (e > b && isSpace(text[e - 1])) e--;
    if (e > b) pieces.add(kj::heapString(text.slice(b, e)));
    start = i + 1;
  }
  return pieces;
}

// ---------------------------------------------------------------------------------------------
// Addresses

bool isIpv4(kj::StringPtr text) {
  struct in_addr a;
  return inet_pton(AF_INET, text.cStr(), &a) == 1;
}

bool isIpv6(kj::StringPtr text) {
  struct in6_addr a;
  return inet_pton(AF_INET6, text.cStr(), &a) == 1;
}

bool isHostName(kj::StringPtr text) {
  // Letters, digits, '-', '.', '_', and a last label that is not all digits: "1.2.3.256" is a
  // mistyped IP address, not a name to look up. One trailing dot (a rooted name) is fine.
  kj::ArrayPtr<const char> name = text;
  if (text.endsWith(".")) name = text.slice(0, text.size() - 1);
  if (name.size() == 0 || name.size() > 253) return false;
  bool lastLabelDigits = true;
  for (char c: name) {
    bool digit = c >= '0' && c <= '9';
    bool ok = digit || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '-' ||
              c == '.' || c == '_';
    if (!ok) return false;
    lastLabelDigits = c == '.' || (lastLabelDigits && digit);
  }
  return !lastLabelDigits;
}

kj::Maybe<uint> parsePort(kj::StringPtr text) {
  if (text.size() == 0 || text.size() > 5) return nullptr;
  uint n = 0;
  for (char c: text) {
    if (c < '0' || c > '9') return nullptr;
    n = n * 10 + (c - '0');
  }
  if (n > 65535) return nullptr;
  return n;
}

struct HostPort {
  kj::String host;     // brackets removed
  bool bracketed;      // "[...]": only an IPv6 literal may be inside
  kj::String port;     // as written, unchecked (may be empty)
};

kj::Maybe<HostPort> splitHostPort(kj::StringPtr text) {
  // "host:port" or "[ipv6]:port". An IPv6 literal without brackets is refused, as Go does.
  if (text.startsWith("[")) {
    KJ_IF_MAYBE(close, text.findFirst(']')) {
      if (*close + 1 >= text.size() || text[*close + 1] != ':') return nullptr;
      return HostPort{kj::heapString(text.slice(1, *close)), true,
                      kj::str(text.slice(*close + 2))};
    }
    return nullptr;
  }
  KJ_IF_MAYBE(colon, text.findLast(':')) {
    auto host = kj::heapString(text.slice(0, *colon));
    if (host.findFirst(':') != nullptr) return nullptr;
    return HostPort{kj::mv(host), false, kj::str(text.slice(*colon + 1))};
  }
  return nullptr;
}

struct AddressRule {
  kj::StringPtr form;       // "host:port", "ip:port"
  kj::StringPtr example;    // shown after "e.g."
  bool names;               // a DNS name may stand for the host
  bool emptyHost;           // ":port" (--metrics: all of loopback, like cloudflared's default)
  bool emptyPort;           // "host:" (--metrics: any free port)
  uint minPort;
};

const AddressRule EDGE_RULE = {
    "host:port", "198.41.192.7:7844, region1.v2.argotunnel.com:7844 or [2606:4700:a0::1]:7844",
    true, false, false, 1};
const AddressRule METRICS_RULE = {
    "host:port", "127.0.0.1:20241, localhost:0 or [::1]:20241", true, true, true, 0};
const AddressRule DNS_RULE = {
    "ip:port", "1.1.1.1:53 or [2606:4700:4700::1111]:53", false, false, false, 1};

kj::Maybe<kj::String> addressError(kj::StringPtr text, const AddressRule& rule) {
  // Why `text` does not follow `rule`, as "\"TEXT\" is not ..." (the caller prefixes the flag).
  auto generic = [&]() {
    return kj::str("\"", text, "\" is not ", rule.form, " (e.g. ", rule.example, ")");
  };
  KJ_IF_MAYBE(hp, splitHostPort(text)) {
    if (hp->bracketed) {
      if (!isIpv6(hp->host)) return generic();
    } else if (hp->host.size() == 0) {
      if (!rule.emptyHost) return generic();
    } else if (!isIpv4(hp->host)) {
      if (!rule.names) {
        return kj::str("\"", text, "\" is not ", rule.form, ": ", hp->host,
                       " is not an IP address (e.g. ", rule.example, ")");
      }
      if (!isHostName(hp->host)) return generic();
    }
    if (hp->port.size() == 0 && rule.emptyPort) return nullptr;
    KJ_IF_MAYBE(port, parsePort(hp->port)) {
      if (*port >= rule.minPort) return nullptr;
    }
    return kj::str("\"", text, "\": the port must be a number from ", rule.minPort,
                   " to 65535, not \"", hp->port, "\"");
  }
  return generic();
}

kj::Maybe<kj::String> dotServerError(kj::StringPtr text) {
  // ip:port[#tls-name], as edge::parseDotServer() reads it.
  KJ_IF_MAYBE(hash, text.findFirst('#')) {
    if (*hash + 1 == text.size()) {
      return kj::str("\"", text, "\" has an empty TLS name after '#' (want ip:port[#tls-name])");
    }
    return addressError(kj::heapString(text.slice(0, *hash)), DNS_RULE);
  }
  return addressError(text, DNS_RULE);
}

kj::Maybe<kj::String> serviceUrlError(kj::StringPtr url) {
  // The checks of edge::requestQuickTunnel()'s URL parser, plus the port's range.
  auto generic = [&]() {
    return kj::str("\"", url, "\" is not an http:// or https:// URL "
                   "(e.g. https://api.trycloudflare.com or http://127.0.0.1:8081)");
  };
  kj::StringPtr rest;
  if (url.startsWith("https://")) {
    rest = url.slice(8);
  } else if (url.startsWith("http://")) {
    rest = url.slice(7);
  } else {
    return generic();
  }
  for (char c: rest) {
    if (c <= ' ' || c == '?' || c == '#' || c == '@' || c == '\\' || c == 0x7f) return generic();
  }
  kj::String authority;
  KJ_IF_MAYBE(slash, rest.findFirst('/')) {
    authority = kj::heapString(rest.slice(0, *slash));
  } else {
    authority = kj::str(rest);
  }
  if (authority.startsWith("[") || authority.findFirst(':') != nullptr) {
    KJ_IF_MAYBE(hp, splitHostPort(authority)) {
      if (hp->host.size() == 0) return generic();
      if (hp->bracketed ? !isIpv6(hp->host) : !isIpv4(hp->host) && !isHostName(hp->host)) {
        return generic();
      }
      KJ_IF_MAYBE(port, parsePort(hp->port)) {
        if (*port >= 1) return nullptr;
      }
      return kj::str("\"", url, "\": the port must be a number from 1 to 65535, not \"",
                     hp->port, "\"");
    }
    return generic();
  }
  if (!isIpv4(authority) && !isHostName(authority)) return generic();
  return nullptr;
}

// ---------------------------------------------------------------------------------------------
// Files

constexpr size_t MAX_PEM_FILE = 16 << 20;

kj::Maybe<kj::String> readSmallFile(kj::StringPtr path, kj::Vector<kj::byte>& content) {
  // Why the regular file at `path` can't be read whole (or is over MAX_PEM_FILE), or null.
  int fd = ::open(path.cStr(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return kj::str("cannot open it: ", strerror(errno));
  kj::AutoCloseFd owned(fd);
  struct stat st;
  if (fstat(fd, &st) != 0) return kj::str("cannot read it: ", strerror(errno));
  if (S_ISDIR(st.st_mode)) return kj::str("is a directory, not a PEM file");
  // cfqt opens the file again for every connection, so a pipe (<(...)) would work only once.
  if (!S_ISREG(st.st_mode)) return kj::str("is not a regular file");
  if (st.st_size > MAX_PEM_FILE) return kj::str("is over 16 MiB: not a PEM certificate file");
  content.resize(st.st_size);
  size_t done = 0;
  while (done < content.size()) {
    ssize_t n = ::read(fd, content.begin() + done, content.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      return kj::str("cannot read it: ", strerror(errno));
    }
    if (n == 0) break;
    done += n;
  }
  content.resize(done);
  return nullptr;
}

bool contains(kj::ArrayPtr<const kj::byte> text, kj::StringPtr needle, size_t from,
              size_t& at) {
  for (size_t i = from; i + needle.size() <= text.size(); i++) {
    if (memcmp(text.begin() + i, needle.begin(), needle.size()) == 0) {
      at = i;
      return true;
    }
  }
  return false;
}

bool hasPemCertificate(kj::ArrayPtr<const kj::byte> text) {
  constexpr kj::StringPtr BEGIN = "-----BEGIN CERTIFICATE-----"_kj;
  constexpr kj::StringPtr END = "-----END CERTIFICATE-----"_kj;
  size_t begin, end;
  return contains(text, BEGIN, 0, begin) && contains(text, END, begin + BEGIN.size(), end);
}

kj::String directoryOf(kj::StringPtr path) {
  KJ_IF_MAYBE(slash, path.findLast('/')) {
    if (*slash == 0) return kj::str("/");
    return kj::heapString(path.slice(0, *slash));
  }
  return kj::str(".");
}

// ---------------------------------------------------------------------------------------------
// Durations that must not be zero: a zero timeout fails every attempt at once, a zero backoff
// or interval spins.

struct PositiveDuration {
  kj::StringPtr flag;
  kj::Duration CliOptions::* field;
  kj::StringPtr example;
};

const PositiveDuration POSITIVE_DURATIONS[] = {
    {"backoff-base", &CliOptions::backoffBase, "1s"},
    {"quic-idle-timeout", &CliOptions::quicIdleTimeout, "5s"},
    {"quic-handshake-timeout", &CliOptions::handshakeTimeout, "10s"},
    {"rpc-timeout", &CliOptions::rpcTimeout, "5s"},
    {"api-timeout", &CliOptions::apiTimeout, "15s"},
    {"dns-timeout", &CliOptions::dnsTimeout, "5s"},
    {"dot-timeout", &CliOptions::dotTimeout, "15s"},
    {"proxy-connect-timeout", &CliOptions::proxyConnectTimeout, "30s"},
    {"proxy-tls-timeout", &CliOptions::proxyTlsTimeout, "10s"},
    {"hello-sse-interval", &CliOptions::helloSseInterval, "1s"},
    {"edge-stall-timeout", &CliOptions::edgeStallTimeout, "10s"},
    {"stream-preamble-timeout", &CliOptions::streamPreambleTimeout, "10s"},
    {"fallback-after", &CliOptions::fallbackAfter, "2s"},
    {"quic-retry-interval", &CliOptions::quicRetryInterval, "5m"},
    {"quic-failure-window", &CliOptions::quicFailureWindow, "60s"},
    {"ready-backoff", &CliOptions::readyBackoff, "100ms"},
    {"ready-attempt-timeout", &CliOptions::readyAttemptTimeout, "5s"},
};

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
      "       cfqt --local --hello-world          (offline, through an in-process edge)\n"
      "       cfqt tunnel [--config FILE] run [--token T | --credentials-file F] [NAME|UUID]\n"
      "       cfqt tunnel [--config FILE] ingress validate | ingress rule URL\n\n"
      "Creates a Cloudflare quick tunnel (https://<words>.trycloudflare.com) to a local origin,\n"
      "like `cloudflared tunnel --url URL`. The URL is printed alone on the first stdout line.\n\n"
      "Flags (--flag value, --flag=value, -flag value):"));
  for (auto& f: FLAGS) {
    auto name = kj::str("--", f.name, f.alias.size() > 0 ? kj::str(", --", f.alias) : kj::str(),
                        f.kind == Kind::BOOL ? "" :
                        f.kind == Kind::OPTIONAL_DURATION ? "[=VALUE]" : " VALUE");
    lines.add(kj::str("  ", name, kj::repeat(' ', name.size() < 34 ? 34 - name.size() : 1),
                      f.help));
  }
  lines.add(kj::str("  --help, --version"));
  return kj::str(kj::strArray(lines, "\n"), "\n");
}

kj::Maybe<kj::String> applyConfigFileFlag(CliOptions& o, kj::StringPtr name,
                                          kj::StringPtr value) {
  const Flag* flag = findFlag(name);
  if (flag == nullptr) return kj::str("unknown flag ", name);
  if (isSet(o, flag->name)) {
    // The command line and the environment win over the file, except for a repeatable flag
    // given only by the file so far.
    return nullptr;
  }
  if (flag->kind == Kind::BOOL && parseBool(value) == nullptr) {
    return kj::str(name, " expects true or false, got \"", value, "\"");
  }
  KJ_IF_MAYBE(error, apply(o, *flag, value)) return kj::mv(*error);
  if (flag->kind != Kind::MULTI) o.explicitlySet.add(kj::str(flag->name));
  return nullptr;
}

CliExit configError(kj::StringPtr reason) {
  return CliExit{2, kj::str("cfqt: ", reason, "\nRun `cfqt --help` for usage.\n")};
}

kj::Maybe<kj::String> SystemFileChecks::certificates(kj::StringPtr path) {
  kj::Vector<kj::byte> content;
  KJ_IF_MAYBE(error, readSmallFile(path, content)) return kj::mv(*error);
  if (!hasPemCertificate(content)) {
    return kj::str("holds no PEM certificate (want a -----BEGIN CERTIFICATE----- block)");
  }
  KJ_IF_MAYBE(p, parser) return (*p)(content);
  return nullptr;
}

kj::Maybe<kj::String> SystemFileChecks::logFile(kj::StringPtr path) {
  struct stat st;
  if (::stat(path.cStr(), &st) == 0) {
    if (S_ISDIR(st.st_mode)) return kj::str("is a directory; give a file name");
    if (::access(path.cStr(), W_OK) != 0) return kj::str("cannot be written: ", strerror(errno));
    return nullptr;
  }
  if (errno != ENOENT && errno != ENOTDIR) return kj::str("cannot be opened: ", strerror(errno));
  auto dir = directoryOf(path);
  if (::stat(dir.cStr(), &st) != 0) {
    return kj::str("its directory ", dir, " does not exist (create it first)");
  }
  if (!S_ISDIR(st.st_mode)) return kj::str(dir, " is not a directory");
  if (::access(dir.cStr(), W_OK | X_OK) != 0) {
    return kj::str("cannot be created in ", dir, ": ", strerror(errno));
  }
  return nullptr;
}

kj::OneOf<kj::Vector<ConfigWarning>, CliExit> validate(CliOptions& o, FileChecks& files) {
  kj::Vector<ConfigWarning> warnings;

  // Files.
  KJ_IF_MAYBE(path, o.edgeCa) {
    KJ_IF_MAYBE(why, files.certificates(*path)) {
      return fail(kj::str(flagName(o, "edge-ca"), ' ', *path, ": ", *why,
                          "; give the PEM file of the CA that signed the edge's certificate"));
    }
  }
  KJ_IF_MAYBE(path, o.originCaPool) {
    KJ_IF_MAYBE(why, files.certificates(*path)) {
      return fail(kj::str(flagName(o, "origin-ca-pool"), ' ', *path, ": ", *why,
                          "; give the PEM file of the CA that signed the origin's certificate"));
    }
  }
  KJ_IF_MAYBE(path, o.readyCa) {
    KJ_IF_MAYBE(why, files.certificates(*path)) {
      return fail(kj::str(flagName(o, "ready-ca"), ' ', *path, ": ", *why,
                          "; give the PEM file of the CA that signed the public certificate"));
    }
  }
  KJ_IF_MAYBE(path, o.logFile) {
    KJ_IF_MAYBE(why, files.logFile(*path)) {
      return fail(kj::str(flagName(o, "logfile"), ' ', *path, ": ", *why));
    }
  }

  // Addresses.
  KJ_IF_MAYBE(url, o.quickService) {
    KJ_IF_MAYBE(why, serviceUrlError(*url)) {
      return fail(kj::str(flagName(o, "quick-service"), ' ', *why));
    }
  }
  for (auto& e: o.edges) {
    KJ_IF_MAYBE(why, addressError(e, EDGE_RULE)) {
      return fail(kj::str(flagName(o, "edge"), ' ', *why));
    }
  }
  KJ_IF_MAYBE(m, o.metrics) {
    KJ_IF_MAYBE(why, addressError(*m, METRICS_RULE)) {
      return fail(kj::str(flagName(o, "metrics"), ' ', *why));
    }
  }
  KJ_IF_MAYBE(d, o.dnsServer) {
    KJ_IF_MAYBE(why, addressError(*d, DNS_RULE)) {
      return fail(kj::str(flagName(o, "dns-server"), ' ', *why));
    }
  }
  KJ_IF_MAYBE(d, o.dotServer) {
    KJ_IF_MAYBE(why, dotServerError(*d)) {
      return fail(kj::str(flagName(o, "dot-server"), ' ', *why));
    }
  }
  for (auto& r: o.readyResolvers) {
    KJ_IF_MAYBE(why, dotServerError(r)) {
      return fail(kj::str(flagName(o, "ready-resolver"), ' ', *why));
    }
  }

  // Numbers and durations.
  if (o.maxConcurrentStreams < 1) {
    return fail(kj::str("--max-concurrent-streams must be at least 1 (default 1024)"));
  }
  for (auto& d: POSITIVE_DURATIONS) {
    if (o.*d.field <= 0 * kj::NANOSECONDS) {
      return fail(kj::str(flagName(o, d.flag), " must be greater than 0 (a duration such as ",
                          d.example, " or 500ms)"));
    }
  }

  // A keep-alive PING only keeps the connection open if it comes before the idle timeout; at or
  // past it the connection idles out and is redialed over and over.
  if (o.quicKeepAlive > 0 * kj::NANOSECONDS && o.quicKeepAlive >= o.quicIdleTimeout) {
    auto idleText = kj::str(o.quicIdleTimeout,
                            isSet(o, "quic-idle-timeout") ? "" : " (the default)");
    if (isSet(o, "quic-keepalive-period")) {
      return fail(kj::str(
          "--quic-keepalive-period ", o.quicKeepAlive, " must be below --quic-idle-timeout ",
          idleText, ", or the connection idles out between keep-alive PINGs and reconnects over "
          "and over; lower --quic-keepalive-period (0 turns it off) or raise "
          "--quic-idle-timeout"));
    }
    auto before = o.quicKeepAlive;
    o.quicKeepAlive = o.quicIdleTimeout / 2;
    warnings.add(ConfigWarning{
        kj::str("QUIC keep-alive period lowered from ", before, " (the default) to ",
                o.quicKeepAlive, ", half of --quic-idle-timeout ", o.quicIdleTimeout,
                ": a keep-alive at or past the idle timeout lets the connection idle out; set "
                "--quic-keepalive-period to choose another value"),
        kj::mv(observe::Fields().add("quicIdleTimeout", o.quicIdleTimeout)
                   .add("quicKeepAlivePeriod", o.quicKeepAlive))});
  }
  return kj::mv(warnings);
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
      } else if (flag->kind == Kind::OPTIONAL_DURATION) {
        value = kj::str("60s");   // --wait-ready alone; a value only as --wait-ready=TIMEOUT
      } else {
        if (i + 1 >= args.size()) return fail(kj::str("flag --", name, " needs a value"));
        value = kj::str(args[++i]);
      }
      KJ_IF_MAYBE(error, cli::apply(o, *flag, value)) return fail(kj::mv(*error));
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
    if (first == "run") {
      if (positional.size() > 2) {
        return fail(kj::str("unexpected argument \"", positional[2], "\" (tunnel run takes at "
                            "most one NAME or UUID)"));
      }
      o.command = CliOptions::Command::RUN;
      if (positional.size() == 2) o.runTarget = kj::mv(positional[1]);
      positional.clear();
    } else if (first == "ingress") {
      if (positional.size() == 2 && positional[1] == "validate") {
        o.command = CliOptions::Command::INGRESS_VALIDATE;
      } else if (positional.size() == 3 && positional[1] == "rule") {
        o.command = CliOptions::Command::INGRESS_RULE;
        o.ingressRuleUrl = kj::mv(positional[2]);
      } else {
        return fail(kj::str("use `cfqt tunnel [--config FILE] ingress validate` or "
                            "`cfqt tunnel [--config FILE] ingress rule URL`"));
      }
      positional.clear();
    } else {
      kj::StringPtr named[] = {"login", "create", "list", "route", "delete", "info",
                               "cleanup", "token", "update", "service", "access"};
      for (auto word: named) {
        if (first == word) {
          return fail(kj::str("`", first, "` is a cloudflared command that needs an account "
                              "certificate (cloudflared tunnel login) and Cloudflare's API, "
                              "which cfqt does not use; create the tunnel in the dashboard or "
                              "with cloudflared, then run it with `cfqt tunnel run --token T`"));
        }
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
      kj::StringPtr flagName = e.flag;
      if (o.command != CliOptions::Command::RUN &&
          (flagName == "token" || flagName.startsWith("credentials-"))) {
        continue;   // cloudflared binds these variables to `tunnel run` only
      }
      bool given = false;
      for (auto& set: o.explicitlySet) if (set == e.flag) given = true;
      if (given) continue;
      KJ_IF_MAYBE(value, (*lookup)(e.env)) {
        if (value->size() == 0) continue;
        const Flag& flag = *findFlag(e.flag);
        if (flag.kind == Kind::BOOL && parseBool(*value) == nullptr) {
          return fail(kj::str(e.env, " expects true or false, got \"", *value, "\""));
        }
        if (flag.kind == Kind::MULTI) {
          // urfave/cli splits a slice flag's variable on commas and trims each piece.
          for (auto& piece: splitList(*value)) {
            KJ_IF_MAYBE(error, cli::apply(o, flag, piece)) {
              return fail(kj::str(*error, " (from ", e.env, ")"));
            }
          }
        } else KJ_IF_MAYBE(error, cli::apply(o, flag, *value)) {
          return fail(kj::str(*error, " (from ", e.env, ")"));
        }
        o.explicitlySet.add(kj::str(e.flag));
        o.fromEnvironment.add(CliOptions::FromEnv{kj::str(e.flag), kj::str(e.env)});
      }
    }
  }
  if (o.command == CliOptions::Command::QUICK) {
    kj::StringPtr runOnly[] = {"token", "credentials-file", "credentials-contents"};
    for (auto name: runOnly) {
      if (isSet(o, name)) {
        return fail(kj::str("--", name, " is for named tunnels: `cfqt tunnel run --", name,
                            " ...`"));
      }
    }
  } else if (o.command == CliOptions::Command::RUN) {
    // cloudflared's default for named tunnels.
    if (!isSet(o, "ha-connections")) o.haConnections = 4;
  }
  if (o.command == CliOptions::Command::QUICK && o.configFile == nullptr &&
      o.url == nullptr && !o.helloWorld && o.unixSocket == nullptr) {
    return fail(kj::str("nothing to expose: give an origin URL (cfqt http://localhost:8080), "
                        "--hello-world or --unix-socket PATH"));
  }
  if (o.noTlsVerify) {
    return fail(kj::str(flagName(o, "no-tls-verify"), " is not supported yet; use "
                        "--origin-ca-pool FILE to trust the origin's certificate"));
  }
  return kj::mv(o);
}

}  // namespace cfqt::cli
