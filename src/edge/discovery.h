#pragma once
// Edge discovery (PROTOCOL.md §2): the SRV lookup of `_v2-origintunneld._tcp.argotunnel.com`
// (or `_<region>-v2-origintunneld...`) with the DNS-over-TLS fallback, A/AAAA of the first two
// targets, the --edge-ip-version split into primary/secondary sets, and the `--edge host:port`
// override that skips discovery.

#include "edge/dns.h"
#include "edge/edge-address.h"

#include <kj/async-io.h>
#include <kj/async-unix.h>
#include <kj/string.h>
#include <kj/time.h>
#include <kj/vector.h>

namespace cfqt::edge {

enum class IpVersion { AUTO, V4, V6 };

kj::Maybe<IpVersion> parseIpVersion(kj::StringPtr text);
// "auto", "4", "6"; null for anything else (the caller reports the bad flag).

kj::StringPtr KJ_STRINGIFY(IpVersion v);

constexpr kj::StringPtr SRV_SERVICE = "v2-origintunneld"_kj;
constexpr kj::StringPtr SRV_DOMAIN = "argotunnel.com"_kj;
constexpr kj::StringPtr DEFAULT_DOT_SERVER = "1.1.1.1:853#cloudflare-dns.com"_kj;

kj::String srvQueryName(kj::Maybe<kj::StringPtr> region);
// "_v2-origintunneld._tcp.argotunnel.com" or "_<region>-v2-origintunneld._tcp.argotunnel.com".

struct DiscoveryConfig {
  kj::Maybe<kj::String> region;                  // --region
  IpVersion ipVersion = IpVersion::AUTO;         // --edge-ip-version (HEAD default auto)
  kj::Maybe<kj::String> dnsServer;               // --dns-server ip:port; null = system resolver
  kj::String dotServer = kj::str(DEFAULT_DOT_SERVER);  // --dot-server ip:port[#tls-name]
  kj::Duration dnsTimeout = 5 * kj::SECONDS;     // c-ares per-try timeout (2 tries)
  kj::Duration dotTimeout = 15 * kj::SECONDS;    // whole DoT exchange
  kj::Vector<kj::String> edges;                  // --edge host:port, repeatable, repeats kept
  bool useHostsFile = true;                      // target lookups also read /etc/hosts
};

struct EdgeRegion {
  kj::Array<EdgeAddress> addresses;   // every address of the region, resolver order
  kj::Array<EdgeAddress> primary;     // the active set per §2.3
  kj::Array<EdgeAddress> secondary;   // the other family under `auto`, else empty
  kj::String name;                    // the SRV target ("--edge" for the override)
};

struct EdgeAddresses {
  kj::Array<EdgeRegion> regions;      // exactly 2 (region1, region2); --edge: region2 may be empty
  bool fromEdgeFlag = false;          // --edge override used: no discovery was done
  bool usedDotFallback = false;       // the SRV answer came over DNS-over-TLS
  kj::Vector<kj::String> warnings;    // skipped --edge entries, plain-DNS SRV error before DoT, ...

  uint totalPrimary() const;          // addresses in the primary sets (--edge repeats counted)
};

kj::Promise<EdgeAddresses> discoverEdges(
    kj::UnixEventPort& eventPort, kj::Timer& timer, kj::Network& network,
    DiscoveryConfig config);
// With config.edges non-empty: resolves each host:port (IP literal, or the first address of a
// host name) and alternates them into region1 (even positions) and region2 (odd positions), ip
// version `auto`; unresolvable entries are skipped with a warning; rejects if none resolves.
//
// Otherwise: SRV through c-ares (config.dnsServer or the system servers); if that lookup fails,
// the same query over DoT to config.dotServer. Fewer than 2 SRV records rejects with cloudflared's
// "expected at least 2 Cloudflare Regions regions, but SRV only returned N". The first two records
// (priority order, weight-shuffled) are region1/region2; their targets are resolved by c-ares
// (never over DoT). Every failure rejects with a description naming what failed (both DNS errors
// when the fallback fails too). `eventPort`, `timer`, `network` must outlive the promise.

EdgeRegion makeRegion(kj::String name, kj::Array<EdgeAddress> addresses, IpVersion ipVersion);
// The §2.3 split (exposed for tests): auto → primary is the family of addresses[0]; 4/6 → that
// family only, no secondary.

}  // namespace cfqt::edge
