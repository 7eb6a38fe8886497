#include "address-pool.h"

#include <kj/debug.h>

namespace cfqt::edge {

namespace {

constexpr kj::Duration SECONDARY_SWITCH_DURATION = 10 * kj::MINUTES;   // §2.3

kj::Function<uint(uint)> defaultRandom() {
  uint64_t seed = (kj::systemPreciseMonotonicClock().now() - kj::origin<kj::TimePoint>()) /
                  kj::NANOSECONDS;
  seed ^= reinterpret_cast<uintptr_t>(&seed);
  if (seed == 0) seed = 0x9e3779b97f4a7c15ull;
  return [state = seed](uint bound) mutable -> uint {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return bound == 0 ? 0 : static_cast<uint>(state % bound);
  };
}

}  // namespace

AddressPool::AddressPool(EdgeAddresses addresses,
                         kj::Maybe<kj::Function<uint(uint)>> randomParam) {
  KJ_IF_MAYBE(r, randomParam) {
    random = kj::mv(*r);
  } else {
    random = defaultRandom();
  }
  for (auto& source: addresses.regions) {
    Region region;
    for (auto& a: source.primary) {
      region.slots.add(Slot{a, false, nullptr});
    }
    for (auto& a: source.secondary) {
      region.slots.add(Slot{a, true, nullptr});
    }
    region.hasSecondary = source.secondary.size() > 0;
    regions.add(kj::mv(region));
  }
}

bool AddressPool::usingSecondary(const Region& region, kj::TimePoint now) const {
  KJ_IF_MAYBE(until, region.secondaryUntil) {
    return now < *until;
  }
  return false;
}

uint AddressPool::freeCount(const Region& region, kj::TimePoint now) const {
  bool secondary = usingSecondary(region, now);
  uint n = 0;
  for (auto& slot: region.slots) {
    if (slot.secondary == secondary && slot.usedBy == nullptr) ++n;
  }
  return n;
}

uint AddressPool::capacity() const {
  uint n = 0;
  for (auto& region: regions) {
    for (auto& slot: region.slots) {
      if (!slot.secondary) ++n;
    }
  }
  return n;
}

uint AddressPool::limitConnections(uint requested) const {
  return kj::min(requested, capacity());
}

kj::Maybe<AddressPool::Slot&> AddressPool::findSlot(uint connIndex, uint* regionIndex) {
  for (uint r = 0; r < regions.size(); r++) {
    for (auto& slot: regions[r].slots) {
      if (slot.usedBy == connIndex) {
        if (regionIndex != nullptr) *regionIndex = r;
        return slot;
      }
    }
  }
  return nullptr;
}

kj::Maybe<const AddressPool::Slot&> AddressPool::findSlot(uint connIndex,
                                                          uint* regionIndex) const {
  for (uint r = 0; r < regions.size(); r++) {
    for (auto& slot: regions[r].slots) {
      if (slot.usedBy == connIndex) {
        if (regionIndex != nullptr) *regionIndex = r;
        return slot;
      }
    }
  }
  return nullptr;
}

kj::Maybe<AddressPool::Slot&> AddressPool::takeFree(
    uint connIndex, kj::TimePoint now, kj::Maybe<const EdgeAddress&> excluding) {
  if (regions.size() == 0) return nullptr;
  // The region with more unused addresses first (coin flip on a tie), then the other one.
  uint first = 0;
  if (regions.size() > 1) {
    uint free0 = freeCount(regions[0], now);
    uint free1 = freeCount(regions[1], now);
    first = free0 > free1 ? 0 : free1 > free0 ? 1 : random(2);
  }
  for (uint k = 0; k < regions.size(); k++) {
    auto& region = regions[(first + k) % regions.size()];
    bool secondary = usingSecondary(region, now);
    kj::Vector<Slot*> candidates;
    for (auto& slot: region.slots) {
      if (slot.secondary != secondary || slot.usedBy != nullptr) continue;
      KJ_IF_MAYBE(x, excluding) {
        if (slot.address == *x) continue;
      }
      candidates.add(&slot);
    }
    if (candidates.size() > 0) {
      auto& chosen = *candidates[random(candidates.size())];
      chosen.usedBy = connIndex;
      return chosen;
    }
  }
  return nullptr;
}

kj::Maybe<const EdgeAddress&> AddressPool::addressFor(uint connIndex, kj::TimePoint now) {
  KJ_IF_MAYBE(slot, findSlot(connIndex)) {
    return slot->address;
  }
  KJ_IF_MAYBE(slot, takeFree(connIndex, now, nullptr)) {
    return slot->address;
  }
  return nullptr;
}

kj::Maybe<AddressPool::Rotation> AddressPool::rotate(uint connIndex, bool connectivityError,
                                                     kj::TimePoint now) {
  uint regionIndex = 0;
  Slot* old = nullptr;
  KJ_IF_MAYBE(slot, findSlot(connIndex, &regionIndex)) {
    old = slot;
    slot->usedBy = nullptr;   // give it back
    if (connectivityError) {
      auto& region = regions[regionIndex];
      if (slot->address.family == IpFamily::V6 && !usingSecondary(region, now) &&
          region.hasSecondary && !slot->secondary) {
        region.secondaryUntil = now + SECONDARY_SWITCH_DURATION;
      } else if (slot->address.family == IpFamily::V4) {
        region.secondaryUntil = nullptr;
      }
    }
  }
  kj::Maybe<const EdgeAddress&> excluding;
  if (old != nullptr) excluding = old->address;
  KJ_IF_MAYBE(slot, takeFree(connIndex, now, excluding)) {
    return Rotation{slot->address, true};
  }
  if (old != nullptr) {
    old->usedBy = connIndex;  // nothing else is free: redial the same address
    return Rotation{old->address, false};
  }
  return nullptr;
}

void AddressPool::release(uint connIndex) {
  KJ_IF_MAYBE(slot, findSlot(connIndex)) {
    slot->usedBy = nullptr;
  }
}

kj::Maybe<const EdgeAddress&> AddressPool::currentAddress(uint connIndex) const {
  KJ_IF_MAYBE(slot, findSlot(connIndex)) {
    return slot->address;
  }
  return nullptr;
}

kj::Maybe<uint> AddressPool::regionOf(uint connIndex) const {
  uint regionIndex = 0;
  if (findSlot(connIndex, &regionIndex) == nullptr) return nullptr;
  return regionIndex;
}

kj::String haConnectionsLimitMessage(uint requested, uint available) {
  return kj::str("You requested ", requested, " HA connections but I can give you at most ",
                 available, ".");
}

}  // namespace cfqt::edge
