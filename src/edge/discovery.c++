#include "discovery.h"
#include "observe/log.h"

#include <kj/debug.h>

#include <algorithm>

namespace cfqt::edge {

kj::Maybe<IpVersion> parseIpVersion(kj::StringPtr text) {
  if (text == "auto") return IpVersion::AUTO;
  if (text == "4") return IpVersion::V4;
  if (text == "6") return IpVersion::V6;
  return nullptr;
}

kj::StringPtr KJ_STRINGIFY(IpVersion v) {
  switch (v) {
    case IpVersion::AUTO: return "auto";
    case IpVersion::V4: return "4";
    case IpVersion::V6: return "6";
  }
  return "?";
}

kj::String srvQueryName(kj::Maybe<kj::StringPtr> region) {
  KJ_IF_MAYBE(r, region) {
    return kj::str('_', *r, '-', SRV_SERVICE, "._tcp.", SRV_DOMAIN);
  }
  return kj::str('_', SRV_SERVICE, "._tcp.", SRV_DOMAIN);
}

uint EdgeAddresses::totalPrimary() const {
  uint n = 0;
  for (auto& r: regions) n += r.primary.size();
  return n;
}

EdgeRegion makeRegion(kj::String name, kj::Array<EdgeAddress> addresses, IpVersion ipVersion) {
  kj::Vector<EdgeAddress> v4, v6;
  for (auto& a: addresses) {
    (a.family == IpFamily::V4 ? v4 : v6).add(a);
  }
  EdgeRegion region;
  region.name = kj::mv(name);
  switch (ipVersion) {
    case IpVersion::V4:
      region.primary = v4.releaseAsArray();
      break;
    case IpVersion::V6:
      region.primary = v6.releaseAsArray();
      break;
    case IpVersion::AUTO:
      if (addresses.size() > 0 && addresses[0].family == IpFamily::V6) {
        region.primary = v6.releaseAsArray();
        region.secondary = v4.releaseAsArray();
      } else {
        region.primary = v4.releaseAsArray();
        region.secondary = v6.releaseAsArray();
      }
      break;
  }
  region.addresses = kj::mv(addresses);
  return region;
}

namespace {

kj::Exception discoveryError(kj::String message,
                             kj::Exception::Type type = kj::Exception::Type::FAILED) {
  return kj::Exception(type, __FILE__, __LINE__, kj::mv(message));
}

class Random {
public:
  Random() {
    state = (kj::systemPreciseMonotonicClock().now() - kj::origin<kj::TimePoint>()) /
            kj::NANOSECONDS;
    state ^= reinterpret_cast<uintptr_t>(this);
    if (state == 0) state = 0x9e3779b97f4a7c15ull;
  }
  uint operator()(uint bound) {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return bound == 0 ? 0 : static_cast<uint>(state % bound);
  }

private:
  uint64_t state;
};

void sortSrv(kj::ArrayPtr<SrvRecord> records) {
  // As Go's net.LookupSRV: by priority, then weight-shuffled inside each priority (RFC 2782).
  std::stable_sort(records.begin(), records.end(),
                   [](const SrvRecord& a, const SrvRecord& b) { return a.priority < b.priority; });
  Random random;
  size_t i = 0;
  while (i < records.size()) {
    size_t j = i;
    while (j < records.size() && records[j].priority == records[i].priority) ++j;
    auto group = records.slice(i, j);
    uint sum = 0;
    for (auto& r: group) sum += r.weight;
    while (sum > 0 && group.size() > 1) {
      uint n = random(sum);
      uint s = 0;
      for (size_t k = 0; k < group.size(); k++) {
        s += group[k].weight;
        if (s > n) {
          if (k > 0) std::swap(group[0], group[k]);
          break;
        }
      }
      sum -= group[0].weight;
      group = group.slice(1, group.size());
    }
    i = j;
  }
}

class Discovery {
public:
  Discovery(kj::UnixEventPort& eventPort, kj::Timer& timer, kj::Network& network,
            DiscoveryConfig configParam, DotServer dotParam)
      : eventPort(eventPort), timer(timer), network(network), config(kj::mv(configParam)),
        dot(kj::mv(dotParam)),
        srvName(srvQueryName(
            config.region.map([](kj::String& r) -> kj::StringPtr { return r; }))) {}

  kj::Promise<EdgeAddresses> run() {
    if (config.edges.size() > 0) return resolveEdgeFlags();
    return resolver().querySrv(srvName).then(
        [this](kj::Array<SrvRecord> records) { return onSrv(kj::mv(records)); },
        [this](kj::Exception&& e) { return fallBackToDot(kj::mv(e)); });
  }

private:
  kj::UnixEventPort& eventPort;
  kj::Timer& timer;
  kj::Network& network;
  DiscoveryConfig config;
  DotServer dot;
  kj::Maybe<kj::Own<DnsResolver>> dnsResolver;   // created on first use: literal --edge
                                                 // addresses need no c-ares channel
  kj::String srvName;
  kj::String plainDnsError;
  EdgeAddresses result;

  DnsResolver& resolver() {
    KJ_IF_MAYBE(r, dnsResolver) return **r;
    auto created = kj::heap<DnsResolver>(eventPort, timer, resolverOptions(config));
    auto& ref = *created;
    dnsResolver = kj::mv(created);
    return ref;
  }

  static DnsResolverOptions resolverOptions(const DiscoveryConfig& config) {
    DnsResolverOptions options;
    KJ_IF_MAYBE(s, config.dnsServer) options.server = kj::str(*s);
    options.queryTimeout = config.dnsTimeout;
    options.useHostsFile = config.useHostsFile;
    return options;
  }

  kj::Promise<EdgeAddresses> fallBackToDot(kj::Exception&& e) {
    plainDnsError = kj::str(e.getDescription());
    result.warnings.add(kj::str(plainDnsError, "; trying DNS-over-TLS via ",
                                dot.address.toString(), " (", dot.tlsName, ")"));
    observe::logWarn("Edge discovery: SRV lookup failed; trying DNS-over-TLS", observe::Fields()
        .add("plainDnsError", plainDnsError).add("dot", dot.address.toString()));
    return querySrvOverTls(timer, network, dot, srvName, config.dotTimeout).then(
        [this](kj::Array<SrvRecord> records) { return onDotSrv(kj::mv(records)); },
        [this](kj::Exception&& e) { return bothFailed(kj::mv(e)); });
  }

  kj::Promise<EdgeAddresses> onDotSrv(kj::Array<SrvRecord> records) {
    result.usedDotFallback = true;
    return onSrv(kj::mv(records));
  }

  kj::Promise<EdgeAddresses> bothFailed(kj::Exception&& e) {
    return discoveryError(kj::str(
        "edge discovery failed: could not look up ", srvName, " SRV. Plain DNS: ",
        plainDnsError, ". Fallback: ", e.getDescription(),
        ". Check the DNS configuration (or --dns-server), that outbound UDP/TCP 53 and TCP 853 "
        "are allowed, or pass --edge host:port to skip discovery."));
  }

  kj::Promise<EdgeAddresses> onSrv(kj::Array<SrvRecord> records) {
    if (records.size() < 2) {
      // cloudflared's wording (edgediscovery/allregions/discovery.go).
      return discoveryError(kj::str(
          "expected at least 2 Cloudflare Regions regions, but SRV only returned ",
          records.size()));
    }
    sortSrv(records);
    auto targets = kj::heapArrayBuilder<kj::Promise<EdgeRegion>>(2);
    for (uint i = 0; i < 2; i++) {
      auto target = kj::str(records[i].target);
      auto errorTarget = kj::str(records[i].target);
      auto promise = resolver().resolveHost(target, records[i].port);
      targets.add(promise.then(
          [this, target = kj::mv(target)](kj::Array<EdgeAddress> addresses) mutable
              -> kj::Promise<EdgeRegion> {
        return makeRegion(kj::mv(target), kj::mv(addresses), config.ipVersion);
      }, [target = kj::mv(errorTarget)](kj::Exception&& e) -> kj::Promise<EdgeRegion> {
        return discoveryError(kj::str("edge discovery failed: cannot resolve the edge region ",
                                      target, ": ", e.getDescription()), e.getType());
      }));
    }
    return kj::joinPromises(targets.finish()).then([this](kj::Array<EdgeRegion> regions) {
      return finish(kj::mv(regions));
    });
  }

  kj::Promise<EdgeAddresses> finish(kj::Array<EdgeRegion> regions) {
    result.regions = kj::mv(regions);
    if (result.totalPrimary() == 0) {
      kj::Vector<kj::String> names;
      for (auto& r: result.regions) names.add(kj::str(r.name));
      return discoveryError(kj::str(
          "edge discovery failed: no ", config.ipVersion == IpVersion::V6 ? "IPv6" : "IPv4",
          " addresses for the edge regions ", kj::strArray(names, ", "),
          " (--edge-ip-version ", config.ipVersion, "); try --edge-ip-version auto"));
    }
    return kj::mv(result);
  }

  kj::Promise<EdgeAddresses> resolveEdgeFlags() {
    result.fromEdgeFlag = true;
    auto lookups = kj::heapArrayBuilder<kj::Promise<kj::Maybe<EdgeAddress>>>(config.edges.size());
    for (auto& entry: config.edges) {
      lookups.add(resolveEdgeFlag(entry));
    }
    return kj::joinPromises(lookups.finish())
        .then([this](kj::Array<kj::Maybe<EdgeAddress>> resolved) {
      return finishEdgeFlags(kj::mv(resolved));
    });
  }

  kj::Promise<EdgeAddresses> finishEdgeFlags(kj::Array<kj::Maybe<EdgeAddress>> resolved) {
    // Resolved entries alternate: even positions region1, odd positions region2.
    kj::Vector<EdgeAddress> even, odd;
    uint n = 0;
    for (auto& maybe: resolved) {
      KJ_IF_MAYBE(a, maybe) {
        (n++ % 2 == 0 ? even : odd).add(*a);
      }
    }
    if (n == 0) {
      return discoveryError(kj::str("none of the --edge addresses could be resolved: ",
                                    kj::strArray(result.warnings, "; ")));
    }
    result.regions = kj::arr(makeRegion(kj::str("--edge"), even.releaseAsArray(), IpVersion::AUTO),
                             makeRegion(kj::str("--edge"), odd.releaseAsArray(), IpVersion::AUTO));
    return kj::mv(result);
  }

  kj::Promise<kj::Maybe<EdgeAddress>> resolveEdgeFlag(kj::StringPtr entry) {
    KJ_IF_MAYBE(a, parseIpPort(entry)) {
      return kj::Maybe<EdgeAddress>(*a);
    }
    kj::Maybe<size_t> colon = entry.findLast(':');
    uint port = 0;
    KJ_IF_MAYBE(c, colon) {
      auto portText = entry.slice(*c + 1);
      bool ok = portText.size() > 0 && portText.size() <= 5;
      for (char ch: portText) ok = ok && ch >= '0' && ch <= '9';
      if (ok) port = portText.parseAs<uint>();
      if (!ok || port == 0 || port > 65535) port = 0;
    }
    if (colon == nullptr || port == 0 || entry.startsWith("[")) {
      result.warnings.add(kj::str("skipping --edge ", entry, ": want host:port"));
      observe::logWarn("Skipping --edge entry: want host:port", observe::Fields()
          .add("entry", entry));
      return kj::Maybe<EdgeAddress>(nullptr);
    }
    auto host = kj::heapString(entry.slice(0, KJ_ASSERT_NONNULL(colon)));
    auto entryCopy = kj::str(entry);
    return resolver().resolveHost(host, port).then(
        [](kj::Array<EdgeAddress> addresses) -> kj::Maybe<EdgeAddress> {
      return addresses[0];    // like Go's ResolveUDPAddr: one IP per entry
    }, [this, entryCopy = kj::mv(entryCopy)](kj::Exception&& e) -> kj::Maybe<EdgeAddress> {
      result.warnings.add(kj::str("skipping --edge ", entryCopy, ": ", e.getDescription()));
      observe::logWarn("Skipping --edge entry", observe::Fields().add("entry", entryCopy).error(e));
      return nullptr;
    }).attach(kj::mv(host));
  }
};

}  // namespace

kj::Promise<EdgeAddresses> discoverEdges(
    kj::UnixEventPort& eventPort, kj::Timer& timer, kj::Network& network,
    DiscoveryConfig config) {
  DotServer dot;
  KJ_IF_MAYBE(d, parseDotServer(config.dotServer)) {
    dot = kj::mv(*d);
  } else {
    return discoveryError(kj::str("invalid --dot-server ", config.dotServer,
                                  ": want ip:port[#tls-name]"));
  }
  KJ_IF_MAYBE(s, config.dnsServer) {
    if (parseIpPort(*s) == nullptr) {
      return discoveryError(kj::str("invalid --dns-server ", *s, ": want ip:port or [ipv6]:port"));
    }
  }
  return kj::evalNow([&]() {
    auto discovery = kj::heap<Discovery>(eventPort, timer, network, kj::mv(config), kj::mv(dot));
    auto promise = discovery->run();
    return promise.attach(kj::mv(discovery));
  });
}

}  // namespace cfqt::edge
