#include "observe/status.h"

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

TunnelStatus::QuicSlot& TunnelStatus::quicSlot(kj::uint connIndex) {
  for (auto& slot: quicSlots) {
    if (slot.connIndex == connIndex) return slot;
  }
  auto& slot = quicSlots.add();
  slot.connIndex = connIndex;
  return slot;
}

void TunnelStatus::quicConnectionStarted(kj::uint connIndex, const QuicSampler& sampler) {
  auto& slot = quicSlot(connIndex);
  if (slot.live != nullptr) quicConnectionEnded(connIndex);
  slot.live = &sampler;
  ++quicStarted;
}

void TunnelStatus::quicConnectionEnded(kj::uint connIndex) {
  auto& slot = quicSlot(connIndex);
  if (slot.live == nullptr) return;
  addSample(slot.base, slot.live->sample());
  slot.base.streamsActive = 0;
  slot.live = nullptr;
  ++quicClosed;
}

kj::Array<TunnelStatus::QuicIndex> TunnelStatus::quicIndices() const {
  auto out = kj::heapArrayBuilder<QuicIndex>(quicSlots.size());
  for (auto& slot: quicSlots) {
    QuicIndex index{slot.connIndex, slot.base, slot.live != nullptr};
    if (slot.live != nullptr) addSample(index.sample, slot.live->sample());
    out.add(index);
  }
  auto result = out.finish();
  std::sort(result.begin(), result.end(),
            [](const QuicIndex& a, const QuicIndex& b) { return a.connIndex < b.connIndex; });
  return result;
}

}  // namespace cfqt::observe
