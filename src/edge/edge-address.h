#pragma once
// EdgeAddress: one IP:port of Cloudflare's tunnel edge, a plain copyable value that the QUIC layer
// turns into a sockaddr and everything else prints.

#include <kj/async-io.h>
#include <kj/string.h>

namespace cfqt::edge {

using kj::uint;

enum class IpFamily : uint8_t { V4, V6 };

struct EdgeAddress {
  IpFamily family = IpFamily::V4;
  kj::byte ip[16] = {};     // network byte order; V4 uses the first 4 bytes
  uint16_t port = 0;        // host byte order (from SRV or --edge)

  kj::String toString() const;
  // "198.41.192.7:7844" or "[2606:4700:a0::1]:7844".

  kj::String ipString() const;
  // Just the IP, no port, no brackets (for log fields like ip=...).

  uint writeSockaddr(kj::ArrayPtr<kj::byte> storage) const;
  // Writes a sockaddr_in / sockaddr_in6 into `storage` (give it sizeof(sockaddr_storage)) and
  // returns its length. Requires storage.size() >= 28.

  kj::Own<kj::NetworkAddress> toNetworkAddress(kj::Network& network) const;
  // Via network.getSockaddr(); synchronous, no DNS.

  bool operator==(const EdgeAddress& other) const;
  bool operator!=(const EdgeAddress& other) const { return !(*this == other); }
};

kj::Maybe<EdgeAddress> parseIpPort(kj::StringPtr text);
// "1.2.3.4:7844" or "[::1]:7844" (brackets required for v6). Null on anything else, including a
// missing or zero port or a hostname.

kj::Maybe<uint16_t> parsePort(kj::StringPtr text);
// Decimal digits only, 1-65535.

kj::Maybe<EdgeAddress> parseIp(kj::StringPtr text, uint16_t port);
// A bare IPv4 or IPv6 literal (no brackets).

kj::Maybe<EdgeAddress> fromSockaddr(kj::ArrayPtr<const kj::byte> sockaddr, uint16_t port);
// From a sockaddr_in/in6; `port` replaces the sockaddr's own port.

}  // namespace cfqt::edge
