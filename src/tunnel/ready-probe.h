#pragma once
// ReadyProbe (issue 16): "does the public URL serve yet?", answered the way a visitor would find
// out, without ever touching the system resolver (whose cache a too-early question would poison
// with an NXDOMAIN for the zone's negative TTL):
//   (a) DNS: A and AAAA of the hostname asked directly of public resolvers over DNS-over-TLS
//       (default 1.1.1.1 and 1.0.0.1, name cloudflare-dns.com), polling with backoff;
//   (b) routing: an HTTPS request to https://<hostname>/ at a resolved address (SNI = hostname,
//       certificate verified) that carries a per-process random token in READY_PROBE_HEADER;
//       only this tunnel answers it with the token (EdgeConnectionConfig::readyToken), so a 530
//       (error 1033) or any answer without the token means "not yet".

#include "edge/dns.h"
#include "observe/log.h"

#include <kj/async-io.h>
#include <kj/string.h>
#include <kj/time.h>
#include <kj/vector.h>

namespace kj { class TlsContext; class TlsCertificate; }

namespace cfqt::tunnel {

constexpr kj::StringPtr READY_PROBE_HEADER = "Cfqt-Ready-Probe"_kj;
// The request header carrying the token, and the response header the tunnel echoes it in.

constexpr kj::StringPtr DEFAULT_READY_RESOLVERS[] = {
    "1.1.1.1:853#cloudflare-dns.com"_kj, "1.0.0.1:853#cloudflare-dns.com"_kj};

struct ReadyProbeConfig {
  kj::Vector<kj::String> resolvers;      // --ready-resolver ip:port[#tls-name]; empty = defaults
  uint16_t port = 443;                   // --ready-port: where the HTTPS request goes
  kj::Maybe<kj::String> caFile;          // --ready-ca: trusted alone, for DoT and HTTPS
  kj::Duration timeout = 60 * kj::SECONDS;                // --wait-ready=TIMEOUT
  kj::Duration initialBackoff = 100 * kj::MILLISECONDS;   // --ready-backoff (doubles each poll)
  kj::Duration maxBackoff = 1 * kj::SECONDS;              // backoff cap
  kj::Duration attemptTimeout = 5 * kj::SECONDS;
  // --ready-attempt-timeout: one DoT query, or one HTTPS request.
};

enum class ReadyStage { DNS, ROUTING, SERVING };

kj::StringPtr readyStageName(ReadyStage stage);
// "DNS", "routing", "serving".

struct ReadyFailure {
  ReadyStage stage;          // the stage that never succeeded (DNS or ROUTING)
  kj::String message;        // one sentence for people, naming the stage and the last answer
};

kj::Maybe<kj::String> readyResolverError(kj::StringPtr text);
// Why `text` is not ip:port[#tls-name], or null.

class ReadyProbe {
public:
  ReadyProbe(kj::Timer& timer, kj::Network& network, const observe::Logger& logger,
             const ReadyProbeConfig& config);
  // Borrows everything. Reads --ready-ca (blocking, at start-up); throws FAILED with a readable
  // description when it or a resolver is unusable.
  KJ_DISALLOW_COPY(ReadyProbe);
  ~ReadyProbe() noexcept(false);

  kj::Promise<void> run(kj::StringPtr hostname, kj::StringPtr token);
  // Resolves once both stages succeeded (logged at info with their durations). Rejects FAILED
  // after config.timeout, or at once when the HTTPS answer fails certificate verification; then
  // failure() says which stage and why. Call once; `hostname` and `token` are copied.

  ReadyStage stage() const { return currentStage; }
  kj::Maybe<const ReadyFailure&> failure() const { return failed; }

private:
  kj::Timer& timer;
  kj::Network& network;
  const observe::Logger& logger;
  const ReadyProbeConfig& config;
  kj::Vector<edge::DotServer> resolvers;
  kj::Maybe<kj::Own<kj::TlsCertificate>> caCertificate;
  kj::Own<kj::TlsContext> tls;
  kj::String hostname;
  kj::String token;
  ReadyStage currentStage = ReadyStage::DNS;
  kj::TimePoint started;
  kj::TimePoint dnsVisibleAt;
  size_t nextResolver = 0;
  kj::String lastAnswer;          // why the last attempt was "not yet"
  bool httpAnswered = false;      // an address answered HTTP in this round of the routing stage
  kj::Maybe<kj::String> fatal;    // a certificate failure: no point in retrying
  kj::Maybe<ReadyFailure> failed;

  struct Request;

  kj::Promise<void> pollDns(kj::Duration delay);
  kj::Promise<void> dnsAnswered(kj::Array<kj::String> addresses, kj::Duration delay);
  kj::Promise<kj::Array<kj::String>> lookup();
  kj::Promise<kj::Array<kj::String>> lookupAaaa(const edge::DotServer& server,
                                                edge::AddressAnswer v4);
  kj::Array<kj::String> addresses(edge::AddressAnswer v4, edge::AddressAnswer v6);
  kj::Promise<void> pollRoute(kj::Array<kj::String> addresses, kj::Duration delay);
  kj::Promise<void> routeAnswered(bool served, kj::Array<kj::String> addresses,
                                  kj::Duration delay);
  kj::Promise<bool> tryAddresses(kj::ArrayPtr<const kj::String> addresses, size_t index);
  kj::Promise<bool> tryAddress(kj::StringPtr address);
  kj::Promise<bool> exchange(kj::Own<kj::AsyncIoStream> stream, kj::String where);
  kj::Promise<bool> send(Request& request, kj::Own<kj::AsyncIoStream> stream);
  bool judge(Request& request, size_t headBytes);
  bool handshakeFailed(Request& request, kj::Exception&& e);
  kj::Duration nextDelay(kj::Duration delay) const;
  kj::String elapsed(kj::TimePoint since) const;
  kj::Exception timedOut();
};

}  // namespace cfqt::tunnel
