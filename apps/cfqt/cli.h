#pragma once
// Command line of `cfqt`, a drop-in for cloudflared's quick-tunnel mode:
//   cfqt [tunnel] [--url] URL [flags]        cfqt --hello-world         cfqt --local --hello-world
// Flags take `--flag value`, `--flag=value`, and the single-dash forms Go accepts (`-url X`).
// Written by hand because kj::MainBuilder cannot mix an optional `tunnel` word, a positional URL
// and `--flag value` options in any order.

#include "observe/log.h"

#include <kj/function.h>
#include <kj/one-of.h>
#include <kj/string.h>
#include <kj/time.h>
#include <kj/vector.h>

namespace cfqt::cli {

using kj::uint;

struct CliOptions {
  kj::Maybe<kj::String> url;             // --url or the positional argument
  bool helloWorld = false;
  kj::Maybe<kj::String> unixSocket;
  kj::Maybe<kj::String> quickService;    // --quick-service (default https://api.trycloudflare.com)
  kj::Vector<kj::String> edges;          // --edge, repeatable
  kj::Maybe<kj::String> edgeCa;          // --edge-ca / --cacert
  kj::Maybe<kj::String> region;
  kj::String edgeIpVersion = kj::str("auto");
  kj::Maybe<kj::String> dnsServer;
  kj::Maybe<kj::String> dotServer;
  uint haConnections = 2;
  uint threads = 0;                      // --threads: 0 = auto (a loop per connection), 1 = one
  kj::Duration busyPoll = 0 * kj::NANOSECONDS;   // --busy-poll: 0 = off (loop/spinner.h)
  uint retries = 5;
  kj::Duration gracePeriod = 30 * kj::SECONDS;
  kj::Maybe<kj::String> metrics;
  kj::String logLevel = kj::str("info");
  kj::Maybe<kj::String> logFile;
  kj::String logFormat = kj::str("default");   // --log-format-output: default or json
  kj::Maybe<kj::String> httpHostHeader;
  kj::Maybe<kj::String> originCaPool;
  kj::Maybe<kj::String> originServerName;
  bool noTlsVerify = false;
  kj::Maybe<kj::String> userAgent;
  kj::String clientVersion = kj::str("2026.8.2");
  bool local = false;
  bool noAutoupdate = false;
  bool releaseIdleCode = true;           // --release-idle-code (tunnel/code-pages.h)
  kj::String protocol = kj::str("auto");  // --protocol quic|http2|auto

  // Timeouts and backoff (hidden flags; tests use milliseconds).
  kj::Duration backoffBase = 1 * kj::SECONDS;          // --backoff-base
  kj::Duration haStagger = 1 * kj::SECONDS;            // --ha-stagger
  kj::Duration quicIdleTimeout = 5 * kj::SECONDS;      // --quic-idle-timeout
  kj::Duration quicKeepAlive = 1 * kj::SECONDS;        // --quic-keepalive-period
  kj::Duration handshakeTimeout = 10 * kj::SECONDS;    // --quic-handshake-timeout
  kj::Duration rpcTimeout = 5 * kj::SECONDS;           // --rpc-timeout
  kj::Duration apiTimeout = 15 * kj::SECONDS;          // --api-timeout
  kj::Maybe<kj::Duration> apiRetryDelay;               // --api-retry-delay (each of 3 retries)
  kj::Duration dnsTimeout = 5 * kj::SECONDS;           // --dns-timeout
  kj::Duration dotTimeout = 15 * kj::SECONDS;          // --dot-timeout
  kj::Duration proxyConnectTimeout = 30 * kj::SECONDS; // --proxy-connect-timeout
  kj::Duration proxyTlsTimeout = 10 * kj::SECONDS;     // --proxy-tls-timeout
  kj::Duration proxyKeepAliveTimeout = 90 * kj::SECONDS;  // --proxy-keepalive-timeout
  kj::Duration helloSseInterval = 1 * kj::SECONDS;     // --hello-sse-interval
  uint maxConcurrentStreams = 1024;                    // --max-concurrent-streams
  kj::Duration edgeStallTimeout = 10 * kj::SECONDS;    // --edge-stall-timeout
  kj::Duration streamPreambleTimeout = 10 * kj::SECONDS;  // --stream-preamble-timeout
  kj::Duration fallbackAfter = 2 * kj::SECONDS;         // --fallback-after (--protocol auto)
  kj::Duration quicRetryInterval = 5 * kj::MINUTES;     // --quic-retry-interval (auto)
  uint quicFailureLimit = 3;                            // --quic-failure-limit (auto)
  kj::Duration quicFailureWindow = 60 * kj::SECONDS;    // --quic-failure-window (auto)

  // Readiness (issue 16).
  kj::Maybe<kj::Duration> waitReady;                   // --wait-ready[=TIMEOUT] (60s alone)
  kj::Vector<kj::String> readyResolvers;               // --ready-resolver, repeatable
  uint readyPort = 443;                                // --ready-port
  kj::Maybe<kj::String> readyCa;                       // --ready-ca
  kj::Duration readyBackoff = 100 * kj::MILLISECONDS;  // --ready-backoff (first poll interval)
  kj::Duration readyAttemptTimeout = 5 * kj::SECONDS;  // --ready-attempt-timeout
  kj::Duration localDnsDelay = 0 * kj::SECONDS;        // --local-dns-delay
  kj::Duration localRouteDelay = 0 * kj::SECONDS;      // --local-route-delay
  // Named tunnels (issue 19): `cfqt tunnel [--config FILE] run [NAME|UUID]`, `cfqt tunnel
  // ingress validate|rule URL`.
  enum class Command { QUICK, RUN, INGRESS_VALIDATE, INGRESS_RULE };
  Command command = Command::QUICK;
  kj::Maybe<kj::String> runTarget;           // run's NAME or UUID argument
  kj::Maybe<kj::String> ingressRuleUrl;      // ingress rule's URL argument
  kj::Maybe<kj::String> token;               // --token / TUNNEL_TOKEN (run only)
  kj::Maybe<kj::String> credentialsFile;     // --credentials-file / TUNNEL_CRED_FILE
  kj::Maybe<kj::String> credentialsContents; // --credentials-contents / TUNNEL_CRED_CONTENTS
  kj::Maybe<kj::String> configFile;          // --config: YAML configuration file

  kj::Vector<kj::String> explicitlySet;
  // Canonical names of the flags given on the command line or taken from the environment.

  struct FromEnv {
    kj::String flag;   // canonical name, e.g. "metrics"
    kj::String env;    // the variable that set it, e.g. "TUNNEL_METRICS"
  };
  kj::Vector<FromEnv> fromEnvironment;
  // The flags of `explicitlySet` that came from an environment variable (named in messages).
};

struct CliExit {
  int code;          // 0 for --help/--version
  kj::String text;   // printed on stdout (code 0) or stderr
};

using EnvLookup = kj::Function<kj::Maybe<kj::String>(kj::StringPtr name)>;

kj::OneOf<CliOptions, CliExit> parseCommandLine(kj::ArrayPtr<const kj::StringPtr> args,
                                                kj::Maybe<EnvLookup> env = nullptr);
// `args` excludes argv[0]. Never throws on bad input. Flags not given on the command line are
// taken from cloudflared 2023.7.3's environment variables when `env` finds them (TUNNEL_URL,
// TUNNEL_METRICS, TUNNEL_GRACE_PERIOD, TUNNEL_LOGLEVEL, ...; TUNNEL_EDGE is comma-separated, as
// urfave/cli splits a slice flag's variable). Only the syntax of values is checked here; the
// caller runs validate() next.

kj::Maybe<kj::String> applyConfigFileFlag(CliOptions& options, kj::StringPtr name,
                                          kj::StringPtr value);
// A top-level key of the YAML configuration file that is also a flag (`url`, `protocol`,
// `loglevel`, `ha-connections`, `edge`, ...): applied as the flag would be, unless the command
// line or the environment gave it. Returns the error text of a bad value, or an unknown name.

CliExit configError(kj::StringPtr reason);
// Exit code 2 and "cfqt: <reason>" plus a pointer to --help: how every bad flag ends.

using CertificateParser = kj::Function<kj::Maybe<kj::String>(kj::ArrayPtr<const kj::byte> pem)>;
// Why `pem` (a whole file) holds no certificate the TLS library accepts, or null if it does.

class FileChecks {
  // How validate() looks at the files that flags name. SystemFileChecks reads the real
  // filesystem; tests may substitute their own.
public:
  virtual kj::Maybe<kj::String> certificates(kj::StringPtr path) = 0;
  // Why `path` is not a readable file holding at least one PEM certificate ("cannot open it: No
  // such file or directory", "holds no PEM certificate ..."), or null if it is one.

  virtual kj::Maybe<kj::String> logFile(kj::StringPtr path) = 0;
  // Why logs cannot be appended to `path` (its directory is missing, it is a directory, ...), or
  // null if opening it should work.
};

class SystemFileChecks final: public FileChecks {
public:
  explicit SystemFileChecks(kj::Maybe<CertificateParser> parser = nullptr)
      : parser(kj::mv(parser)) {}
  // Without a parser a file passes if it has a complete "-----BEGIN CERTIFICATE-----" block;
  // main() adds a GnuTLS parse (this library does not link GnuTLS).

  kj::Maybe<kj::String> certificates(kj::StringPtr path) override;
  kj::Maybe<kj::String> logFile(kj::StringPtr path) override;

private:
  kj::Maybe<CertificateParser> parser;
};

struct ConfigWarning {
  kj::String message;   // for Logger::warn()
  observe::Fields fields;
};

kj::OneOf<kj::Vector<ConfigWarning>, CliExit> validate(CliOptions& options, FileChecks& files);
// Checks every file, address, number and timeout of `options` before anything is requested from
// the network: returns a CliExit (code 2, one line naming the flag and what to do) for the first
// bad one. A keep-alive period at or above the QUIC idle timeout is refused if
// --quic-keepalive-period was given, and otherwise lowered to half the idle timeout in `options`
// with a warning in the result (main() logs the warnings once the logger exists).

kj::Maybe<kj::String> processEnv(kj::StringPtr name);
// getenv() as an EnvLookup.

kj::Maybe<kj::Duration> parseGoDuration(kj::StringPtr text);
// Go's time.ParseDuration ("300ms", "1m30s", "2h", "1.5s") plus a bare number meaning seconds.

kj::String usage();

}  // namespace cfqt::cli
