#include "observe/status.h"

#include <algorithm>

namespace cfqt::observe {

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
  auto last = slot.live->sample();
  slot.live = nullptr;
  ++quicClosed;
  auto& b = slot.base;
  b.smoothedRtt = last.smoothedRtt;
  b.minRtt = last.minRtt;
  b.latestRtt = last.latestRtt;
  b.congestionWindow = last.congestionWindow;
  b.streamsActive = 0;
  b.bytesSent += last.bytesSent;
  b.bytesReceived += last.bytesReceived;
  b.packetsSent += last.packetsSent;
  b.packetsReceived += last.packetsReceived;
  b.ptoTotal += last.ptoTotal;
}

kj::Array<TunnelStatus::QuicIndex> TunnelStatus::quicIndices() const {
  auto out = kj::heapArrayBuilder<QuicIndex>(quicSlots.size());
  for (auto& slot: quicSlots) {
    QuicIndex index{slot.connIndex, slot.base, slot.live != nullptr};
    if (slot.live != nullptr) {
      auto now = slot.live->sample();
      auto& s = index.sample;
      s.smoothedRtt = now.smoothedRtt;
      s.minRtt = now.minRtt;
      s.latestRtt = now.latestRtt;
      s.congestionWindow = now.congestionWindow;
      s.streamsActive = now.streamsActive;
      s.bytesSent += now.bytesSent;
      s.bytesReceived += now.bytesReceived;
      s.packetsSent += now.packetsSent;
      s.packetsReceived += now.packetsReceived;
      s.ptoTotal += now.ptoTotal;
    }
    out.add(index);
  }
  auto result = out.finish();
  std::sort(result.begin(), result.end(),
            [](const QuicIndex& a, const QuicIndex& b) { return a.connIndex < b.connIndex; });
  return result;
}

}  // namespace cfqt::observe
