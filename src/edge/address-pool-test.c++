#include "address-pool.h"

#include <kj/debug.h>
#include <kj/test.h>

namespace cfqt::edge {
namespace {

EdgeAddress addr(kj::StringPtr text) {
  return KJ_ASSERT_NONNULL(parseIpPort(text), text);
}

kj::Array<EdgeAddress> addrs(std::initializer_list<kj::StringPtr> texts) {
  kj::Vector<EdgeAddress> out;
  for (auto t: texts) out.add(addr(t));
  return out.releaseAsArray();
}

EdgeAddresses twoRegions(kj::Array<EdgeAddress> r1, kj::Array<EdgeAddress> r2,
                         IpVersion version = IpVersion::AUTO) {
  EdgeAddresses result;
  result.regions = kj::arr(makeRegion(kj::str("region1"), kj::mv(r1), version),
                           makeRegion(kj::str("region2"), kj::mv(r2), version));
  return result;
}

// Deterministic "random": always the first candidate / region 0 on ties.
kj::Function<uint(uint)> firstChoice() {
  return [](uint) -> uint { return 0; };
}

const kj::TimePoint T0 = kj::origin<kj::TimePoint>() + 1000 * kj::SECONDS;

KJ_TEST("AddressPool: distinct addresses while any remain, alternating regions") {
  AddressPool pool(twoRegions(addrs({"10.0.0.1:7844", "10.0.0.2:7844"}),
                              addrs({"10.1.0.1:7844", "10.1.0.2:7844"})),
                   firstChoice());
  KJ_EXPECT(pool.capacity() == 4);
  KJ_EXPECT(pool.limitConnections(4) == 4);
  KJ_EXPECT(pool.limitConnections(6) == 4);   // caller logs "at most 4" and lowers N
  KJ_EXPECT(haConnectionsLimitMessage(6, 4) ==
            "You requested 6 HA connections but I can give you at most 4.");

  kj::Vector<EdgeAddress> seen;
  for (uint i = 0; i < 4; i++) {
    auto& a = KJ_ASSERT_NONNULL(pool.addressFor(i, T0));
    for (auto& s: seen) KJ_EXPECT(s != a, i, a.toString());
    seen.add(a);
  }
  KJ_EXPECT(pool.regionOf(0) != pool.regionOf(1));
  KJ_EXPECT(pool.regionOf(2) != pool.regionOf(3));
  uint inRegion0 = 0;
  for (uint i = 0; i < 4; i++) inRegion0 += KJ_ASSERT_NONNULL(pool.regionOf(i)) == 0;
  KJ_EXPECT(inRegion0 == 2);
  KJ_EXPECT(pool.addressFor(4, T0) == nullptr);   // nothing left: never shared
}

KJ_TEST("AddressPool: alternation holds with random choices too") {
  uint state = 12345;
  AddressPool pool(twoRegions(addrs({"10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1"}),
                              addrs({"10.1.0.1:1", "10.1.0.2:1", "10.1.0.3:1"})),
                   kj::Function<uint(uint)>([state](uint bound) mutable -> uint {
                     state = state * 1103515245 + 12345;
                     return (state >> 8) % bound;
                   }));
  uint perRegion[2] = {0, 0};
  for (uint i = 0; i < 6; i += 2) {
    KJ_ASSERT(pool.addressFor(i, T0) != nullptr);
    KJ_ASSERT(pool.addressFor(i + 1, T0) != nullptr);
    KJ_EXPECT(pool.regionOf(i) != pool.regionOf(i + 1), i);
    perRegion[KJ_ASSERT_NONNULL(pool.regionOf(i))]++;
    perRegion[KJ_ASSERT_NONNULL(pool.regionOf(i + 1))]++;
  }
  KJ_EXPECT(perRegion[0] == 3 && perRegion[1] == 3);
}

KJ_TEST("AddressPool: an index keeps its address across reconnects") {
  AddressPool pool(twoRegions(addrs({"10.0.0.1:7844", "10.0.0.2:7844"}),
                              addrs({"10.1.0.1:7844"})));
  auto first = KJ_ASSERT_NONNULL(pool.addressFor(0, T0));
  auto second = KJ_ASSERT_NONNULL(pool.addressFor(1, T0));
  for (uint i = 0; i < 5; i++) {
    KJ_EXPECT(KJ_ASSERT_NONNULL(pool.addressFor(0, T0 + i * kj::SECONDS)) == first);
    KJ_EXPECT(KJ_ASSERT_NONNULL(pool.addressFor(1, T0 + i * kj::SECONDS)) == second);
  }
  KJ_EXPECT(KJ_ASSERT_NONNULL(pool.currentAddress(0)) == first);
}

KJ_TEST("AddressPool: rotation after a dial failure or EDUPCONN takes a different address") {
  AddressPool pool(twoRegions(addrs({"10.0.0.1:7844", "10.0.0.2:7844"}),
                              addrs({"10.1.0.1:7844", "10.1.0.2:7844"})),
                   firstChoice());
  auto a0 = KJ_ASSERT_NONNULL(pool.addressFor(0, T0));
  auto a1 = KJ_ASSERT_NONNULL(pool.addressFor(1, T0));
  auto rotation = KJ_ASSERT_NONNULL(pool.rotate(0, false, T0));
  KJ_EXPECT(rotation.changed);
  KJ_EXPECT(rotation.address != a0);
  KJ_EXPECT(rotation.address != a1);
  auto now0 = KJ_ASSERT_NONNULL(pool.currentAddress(0));
  KJ_EXPECT(now0 == rotation.address);
  // The old address went back to the pool and can be handed out again.
  auto a2 = KJ_ASSERT_NONNULL(pool.addressFor(2, T0));
  auto a3 = KJ_ASSERT_NONNULL(pool.addressFor(3, T0));
  KJ_EXPECT(a2 == a0 || a3 == a0);
}

KJ_TEST("AddressPool: with a single address a rotation keeps it (redial the same)") {
  EdgeAddresses single;
  single.regions = kj::arr(
      makeRegion(kj::str("--edge"), addrs({"127.0.0.1:7844"}), IpVersion::AUTO),
                           makeRegion(kj::str("--edge"), nullptr, IpVersion::AUTO));
  AddressPool pool(kj::mv(single));
  KJ_EXPECT(pool.capacity() == 1);
  KJ_EXPECT(pool.limitConnections(4) == 1);
  auto a = KJ_ASSERT_NONNULL(pool.addressFor(0, T0));
  auto rotation = KJ_ASSERT_NONNULL(pool.rotate(0, true, T0));
  KJ_EXPECT(!rotation.changed);
  KJ_EXPECT(rotation.address == a);
  KJ_EXPECT(pool.addressFor(1, T0) == nullptr);
}

KJ_TEST("AddressPool: release frees the address for other indices") {
  AddressPool pool(twoRegions(addrs({"10.0.0.1:7844"}), nullptr));
  auto a = KJ_ASSERT_NONNULL(pool.addressFor(0, T0));
  KJ_EXPECT(pool.addressFor(1, T0) == nullptr);
  pool.release(0);
  KJ_EXPECT(pool.currentAddress(0) == nullptr);
  KJ_EXPECT(KJ_ASSERT_NONNULL(pool.addressFor(1, T0)) == a);
}

KJ_TEST("AddressPool: IPv6 connectivity error switches the region to IPv4 for 10 minutes") {
  // auto: region's first address is v6, so v6 is primary and v4 secondary.
  AddressPool pool(twoRegions(addrs({"[2001:db8::1]:7844", "10.0.0.1:7844", "[2001:db8::2]:7844"}),
                              nullptr),
                   firstChoice());
  KJ_EXPECT(pool.capacity() == 2);
  auto a = KJ_ASSERT_NONNULL(pool.addressFor(0, T0));
  KJ_EXPECT(a.family == IpFamily::V6);
  auto r = KJ_ASSERT_NONNULL(pool.rotate(0, true, T0));
  KJ_EXPECT(r.changed);
  KJ_EXPECT(r.address.family == IpFamily::V4, r.address.toString());
  // While switched, new indices get v4 too (only one v4 address: the next gets nothing).
  KJ_EXPECT(pool.addressFor(1, T0 + 1 * kj::MINUTES) == nullptr);
  // After 10 minutes the primary (v6) set is active again.
  auto later = KJ_ASSERT_NONNULL(pool.addressFor(1, T0 + 10 * kj::MINUTES));
  KJ_EXPECT(later.family == IpFamily::V6, later.toString());
}

KJ_TEST("AddressPool: IPv4 connectivity error switches back to the primary set at once") {
  AddressPool pool(twoRegions(addrs({"[2001:db8::1]:7844", "10.0.0.1:7844", "10.0.0.2:7844",
                                     "[2001:db8::2]:7844"}),
                              nullptr),
                   firstChoice());
  KJ_ASSERT_NONNULL(pool.addressFor(0, T0));
  auto r = KJ_ASSERT_NONNULL(pool.rotate(0, true, T0));            // v6 failed: use v4
  KJ_EXPECT(r.address.family == IpFamily::V4);
  auto r2 = KJ_ASSERT_NONNULL(pool.rotate(0, true, T0 + kj::SECONDS));  // v4 failed too
  KJ_EXPECT(r2.address.family == IpFamily::V6, r2.address.toString());
  // A non-connectivity rotation of a v6 address does not switch.
  auto r3 = KJ_ASSERT_NONNULL(pool.rotate(0, false, T0 + 2 * kj::SECONDS));
  KJ_EXPECT(r3.address.family == IpFamily::V6, r3.address.toString());
}

KJ_TEST("makeRegion: --edge-ip-version split into primary and secondary sets") {
  auto mixed = [] {
    return addrs({"10.0.0.1:7844", "[2001:db8::1]:7844", "10.0.0.2:7844"});
  };
  auto a = makeRegion(kj::str("r"), mixed(), IpVersion::AUTO);
  KJ_EXPECT(a.primary.size() == 2 && a.primary[0].family == IpFamily::V4);
  KJ_EXPECT(a.secondary.size() == 1 && a.secondary[0].family == IpFamily::V6);
  KJ_EXPECT(a.addresses.size() == 3);
  auto six = makeRegion(kj::str("r"), addrs({"[2001:db8::1]:7844", "10.0.0.1:7844"}),
                        IpVersion::AUTO);
  KJ_EXPECT(six.primary.size() == 1 && six.primary[0].family == IpFamily::V6);
  KJ_EXPECT(six.secondary.size() == 1 && six.secondary[0].family == IpFamily::V4);
  auto v4 = makeRegion(kj::str("r"), mixed(), IpVersion::V4);
  KJ_EXPECT(v4.primary.size() == 2 && v4.secondary.size() == 0);
  auto v6 = makeRegion(kj::str("r"), mixed(), IpVersion::V6);
  KJ_EXPECT(v6.primary.size() == 1 && v6.primary[0].family == IpFamily::V6);
  KJ_EXPECT(v6.secondary.size() == 0);
  auto empty = makeRegion(kj::str("r"), nullptr, IpVersion::AUTO);
  KJ_EXPECT(empty.primary.size() == 0 && empty.secondary.size() == 0);
}

KJ_TEST("parsing helpers: ip:port, ip version, SRV name") {
  KJ_EXPECT(addr("1.2.3.4:7844").toString() == "1.2.3.4:7844");
  KJ_EXPECT(addr("[2606:4700:a0::1]:7844").toString() == "[2606:4700:a0::1]:7844");
  KJ_EXPECT(addr("[2606:4700:a0::1]:7844").ipString() == "2606:4700:a0::1");
  for (auto bad: {"1.2.3.4"_kj, "1.2.3.4:0"_kj, "1.2.3.4:70000"_kj, "::1:80"_kj, "[::1]80"_kj,
                  "host:80"_kj, "[1.2.3.4]:80"_kj, ""_kj, "1.2.3.4:8x"_kj}) {
    KJ_EXPECT(parseIpPort(bad) == nullptr, bad);
  }
  KJ_EXPECT(parseIpVersion("auto") == IpVersion::AUTO);
  KJ_EXPECT(parseIpVersion("4") == IpVersion::V4);
  KJ_EXPECT(parseIpVersion("6") == IpVersion::V6);
  KJ_EXPECT(parseIpVersion("5") == nullptr);
  KJ_EXPECT(srvQueryName(nullptr) == "_v2-origintunneld._tcp.argotunnel.com");
  KJ_EXPECT(srvQueryName("us"_kj) == "_us-v2-origintunneld._tcp.argotunnel.com");
  auto dot = KJ_ASSERT_NONNULL(parseDotServer("1.1.1.1:853#cloudflare-dns.com"));
  KJ_EXPECT(dot.address.toString() == "1.1.1.1:853");
  KJ_EXPECT(dot.tlsName == "cloudflare-dns.com");
  auto dot2 = KJ_ASSERT_NONNULL(parseDotServer("[::1]:8853"));
  KJ_EXPECT(dot2.tlsName == "::1");
  KJ_EXPECT(parseDotServer("1.1.1.1#x") == nullptr);
  KJ_EXPECT(parseDotServer("1.1.1.1:853#") == nullptr);
}

KJ_TEST("EdgeAddress: sockaddr round trip") {
  for (auto text: {"198.41.192.7:7844"_kj, "[2606:4700:a0::7]:7844"_kj}) {
    auto a = addr(text);
    kj::byte storage[128];
    uint len = a.writeSockaddr(storage);
    auto back = KJ_ASSERT_NONNULL(fromSockaddr(kj::arrayPtr(storage, len), a.port));
    KJ_EXPECT(back == a, text);
  }
}

}  // namespace
}  // namespace cfqt::edge
