#include "observe/status.h"

#include <kj/debug.h>

#include <algorithm>

namespace cfqt::observe {

namespace {

void addSample(TunnelStatus::QuicSample& into, const TunnelStatus::QuicSample& now) {
  // A connection's sample on top of its index's totals: gauges are replaced, counters summed.
  into.smoothedRtt = now.smoothedRtt;
  into.minRtt = now.minRtt;
  into.latestRtt = now.latestRtt;
  into.congestionWindow = now.congestionWindow;
  into.streamsActive = now.streamsActive;
  into.bytesSent += now.bytesSent;
  into.bytesReceived += now.bytesReceived;
  into.packetsSent += now.packetsSent;
  into.packetsReceived += now.packetsReceived;
  into.ptoTotal += now.ptoTotal;
}

}  // namespace

void TunnelStatus::connectionProtocol(kj::uint connIndex, kj::StringPtr protocol) {
  for (auto& p: protocols) {
    if (p.connIndex == connIndex) {
      p.protocol = kj::str(protocol);
      return;
    }
  }
  protocols.add(Protocol{connIndex, kj::str(protocol)});
}

void TunnelStatus::serverLocation(kj::uint connIndex, kj::StringPtr location) {
  // cloudflared: the index's previous location drops to 0, the new one goes to 1; registering
  // again at the same location changes nothing.
  bool found = false;
  for (auto& l: locations) {
    if (l.connIndex != connIndex) continue;
    if (l.location == location) {
      l.value = 1;
      found = true;
    } else {
      l.value = 0;
    }
  }
  if (!found) locations.add(Location{connIndex, kj::str(location), 1});
}

void TunnelStatus::userHostname(kj::StringPtr url) {
  for (auto& h: hostnames) {
    if (h.url == url) {
      ++h.count;
      return;
    }
  }
  hostnames.add(UserHostname{kj::str(url), 1});
}

TunnelStatus::Shard& TunnelStatus::shard(kj::uint connIndex) {
  KJ_REQUIRE(connIndex < MAX_SHARDS, "connection index out of range", connIndex);
  return shards[connIndex];
}

uint64_t TunnelStatus::responsesWithCode(kj::uint statusCode) const {
  if (statusCode < MIN_STATUS_CODE || statusCode > MAX_STATUS_CODE) return 0;
  uint64_t total = 0;
  for (auto& s: shards) {
    total += s.byCode[statusCode - MIN_STATUS_CODE].load(std::memory_order_relaxed);
  }
  return total;
}

TunnelStatus::QuicSlot& TunnelStatus::quicSlot(kj::uint connIndex) {
  for (auto& slot: quicSlots) {
    if (slot.connIndex == connIndex) return slot;
  }
  auto& slot = quicSlots.add();
  slot.connIndex = connIndex;
  return slot;
}

void TunnelStatus::quicConnectionStarted(kj::uint connIndex) {
  std::lock_guard<std::mutex> lock(quicMutex);
  auto& slot = quicSlot(connIndex);
  if (slot.live) {
    addSample(slot.base, slot.latest);
    slot.base.streamsActive = 0;
    ++quicClosed;
  }
  slot.live = true;
  slot.latest = {};
  ++quicStarted;
}

void TunnelStatus::quicSampled(kj::uint connIndex, const QuicSample& sample) {
  std::lock_guard<std::mutex> lock(quicMutex);
  auto& slot = quicSlot(connIndex);
  if (slot.live) slot.latest = sample;
}

void TunnelStatus::quicConnectionEnded(kj::uint connIndex, const QuicSample& last) {
  std::lock_guard<std::mutex> lock(quicMutex);
  auto& slot = quicSlot(connIndex);
  if (!slot.live) return;
  addSample(slot.base, last);
  slot.base.streamsActive = 0;
  slot.latest = {};
  slot.live = false;
  ++quicClosed;
}

uint64_t TunnelStatus::quicConnectionsStarted() const {
  std::lock_guard<std::mutex> lock(quicMutex);
  return quicStarted;
}

uint64_t TunnelStatus::quicConnectionsClosed() const {
  std::lock_guard<std::mutex> lock(quicMutex);
  return quicClosed;
}

kj::Array<TunnelStatus::QuicIndex> TunnelStatus::quicIndices() const {
  std::lock_guard<std::mutex> lock(quicMutex);
  auto out = kj::heapArrayBuilder<QuicIndex>(quicSlots.size());
  for (auto& slot: quicSlots) {
    QuicIndex index{slot.connIndex, slot.base, slot.live};
    if (slot.live) addSample(index.sample, slot.latest);
    out.add(index);
  }
  auto result = out.finish();
  std::sort(result.begin(), result.end(),
            [](const QuicIndex& a, const QuicIndex& b) { return a.connIndex < b.connIndex; });
  return result;
}

}  // namespace cfqt::observe
