#pragma once
// AddressPool: which edge address each HA connection index dials (PROTOCOL.md §2.5, cloudflared
// edgediscovery/allregions). Single-threaded, synchronous, no I/O.

#include "edge/discovery.h"
#include "edge/edge-address.h"

#include <kj/function.h>
#include <kj/time.h>

namespace cfqt::edge {

class AddressPool {
public:
  explicit AddressPool(EdgeAddresses addresses,
                       kj::Maybe<kj::Function<uint(uint bound)>> random = nullptr);
  // `random(bound)` returns a value in [0, bound): picks among free addresses and breaks ties
  // between regions. Default: a PRNG seeded from the clock. Tests pass a deterministic one.
  KJ_DISALLOW_COPY(AddressPool);

  uint capacity() const;
  // How many indices can hold distinct addresses (= primary addresses of both regions).

  uint limitConnections(uint requested) const;
  // min(requested, capacity()). When it is lower than `requested`, the caller logs cloudflared's
  // "You requested N HA connections but I can give you at most M." and lowers N.

  kj::Maybe<const EdgeAddress&> addressFor(uint connIndex, kj::TimePoint now);
  // The address `connIndex` keeps across reconnects; assigns one on first use: from the region
  // with more unused addresses (random on a tie), any unused address there, else the other
  // region. Null when every address is taken by other indices. The reference stays valid until
  // the next non-const call.

  struct Rotation {
    const EdgeAddress& address;
    bool changed;   // false: no other address was free, so the index got its old one back
  };

  kj::Maybe<Rotation> rotate(uint connIndex, bool connectivityError, kj::TimePoint now);
  // After a dial/handshake failure or EDUPCONN: gives the index's address back and takes a
  // different unused one (excluding the old). If none is free the old one is kept (cloudflared
  // then redials the same address). `connectivityError` with an IPv6 address while the region
  // uses its primary set and has a secondary set switches that region to the secondary (v4) set
  // for 10 minutes (§2.3); an IPv4 address given back after a connectivity error switches it back.

  void release(uint connIndex);
  // The index stops using its address (connection shut down for good).

  kj::Maybe<const EdgeAddress&> currentAddress(uint connIndex) const;
  // Without assigning.

  kj::Maybe<uint> regionOf(uint connIndex) const;
  // 0 or 1 for an assigned index.

private:
  struct Slot {
    EdgeAddress address;
    bool secondary;                       // belongs to the region's secondary set
    kj::Maybe<uint> usedBy;
  };
  struct Region {
    kj::Vector<Slot> slots;
    bool hasSecondary = false;
    kj::Maybe<kj::TimePoint> secondaryUntil;    // switched to the secondary set until then
  };

  kj::Vector<Region> regions;
  kj::Function<uint(uint)> random;

  bool usingSecondary(const Region& region, kj::TimePoint now) const;
  uint freeCount(const Region& region, kj::TimePoint now) const;
  kj::Maybe<Slot&> findSlot(uint connIndex, uint* regionIndex = nullptr);
  kj::Maybe<const Slot&> findSlot(uint connIndex, uint* regionIndex = nullptr) const;
  kj::Maybe<Slot&> takeFree(uint connIndex, kj::TimePoint now,
                           kj::Maybe<const EdgeAddress&> excluding);
};

kj::String haConnectionsLimitMessage(uint requested, uint available);
// cloudflared's log line (§2.5): "You requested 4 HA connections but I can give you at most 2."

}  // namespace cfqt::edge
