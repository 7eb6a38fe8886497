#include "edge-address.h"

#include <kj/debug.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>

namespace cfqt::edge {

kj::String EdgeAddress::ipString() const {
  char buf[INET6_ADDRSTRLEN];
  int af = family == IpFamily::V4 ? AF_INET : AF_INET6;
  KJ_ASSERT(inet_ntop(af, ip, buf, sizeof(buf)) != nullptr);
  return kj::str(buf);
}

kj::String EdgeAddress::toString() const {
  if (family == IpFamily::V4) {
    return kj::str(ipString(), ':', port);
  } else {
    return kj::str('[', ipString(), "]:", port);
  }
}

uint EdgeAddress::writeSockaddr(kj::ArrayPtr<kj::byte> storage) const {
  KJ_REQUIRE(storage.size() >= sizeof(sockaddr_in6), "sockaddr storage too small");
  memset(storage.begin(), 0, storage.size());
  if (family == IpFamily::V4) {
    sockaddr_in sin;
    memset(&sin, 0, sizeof(sin));
    sin.sin_family = AF_INET;
    sin.sin_port = htons(port);
    memcpy(&sin.sin_addr, ip, 4);
    memcpy(storage.begin(), &sin, sizeof(sin));
    return sizeof(sin);
  } else {
    sockaddr_in6 sin6;
    memset(&sin6, 0, sizeof(sin6));
    sin6.sin6_family = AF_INET6;
    sin6.sin6_port = htons(port);
    memcpy(&sin6.sin6_addr, ip, 16);
    memcpy(storage.begin(), &sin6, sizeof(sin6));
    return sizeof(sin6);
  }
}

kj::Own<kj::NetworkAddress> EdgeAddress::toNetworkAddress(kj::Network& network) const {
  sockaddr_storage ss;
  uint len = writeSockaddr(kj::arrayPtr(reinterpret_cast<kj::byte*>(&ss), sizeof(ss)));
  return network.getSockaddr(&ss, len);
}

bool EdgeAddress::operator==(const EdgeAddress& other) const {
  uint n = family == IpFamily::V4 ? 4 : 16;
  return family == other.family && port == other.port && memcmp(ip, other.ip, n) == 0;
}

kj::Maybe<EdgeAddress> parseIp(kj::StringPtr text, uint16_t port) {
  EdgeAddress result;
  result.port = port;
  if (text.findFirst(':') == nullptr) {
    in_addr a;
    if (inet_pton(AF_INET, text.cStr(), &a) != 1) return nullptr;
    result.family = IpFamily::V4;
    memcpy(result.ip, &a, 4);
  } else {
    in6_addr a;
    if (inet_pton(AF_INET6, text.cStr(), &a) != 1) return nullptr;
    result.family = IpFamily::V6;
    memcpy(result.ip, &a, 16);
  }
  return result;
}

kj::Maybe<uint16_t> parsePort(kj::StringPtr text) {
  if (text.size() == 0 || text.size() > 5) return nullptr;
  uint value = 0;
  for (char c: text) {
    if (c < '0' || c > '9') return nullptr;
    value = value * 10 + (c - '0');
  }
  if (value == 0 || value > 65535) return nullptr;
  return static_cast<uint16_t>(value);
}

kj::Maybe<EdgeAddress> parseIpPort(kj::StringPtr text) {
  kj::String host;
  kj::StringPtr portText;
  if (text.startsWith("[")) {
    KJ_IF_MAYBE(close, text.findFirst(']')) {
      if (*close + 1 >= text.size() || text[*close + 1] != ':') return nullptr;
      host = kj::heapString(text.slice(1, *close));
      portText = text.slice(*close + 2);
      if (host.findFirst(':') == nullptr) return nullptr;
    } else {
      return nullptr;
    }
  } else {
    KJ_IF_MAYBE(colon, text.findLast(':')) {
      host = kj::heapString(text.slice(0, *colon));
      portText = text.slice(*colon + 1);
      if (host.findFirst(':') != nullptr) return nullptr;   // v6 without brackets
    } else {
      return nullptr;
    }
  }
  KJ_IF_MAYBE(port, parsePort(portText)) {
    return parseIp(host, *port);
  }
  return nullptr;
}

kj::Maybe<EdgeAddress> fromSockaddr(kj::ArrayPtr<const kj::byte> sockaddr, uint16_t port) {
  if (sockaddr.size() < sizeof(sa_family_t)) return nullptr;
  sa_family_t family;
  memcpy(&family, sockaddr.begin(), sizeof(family));
  EdgeAddress result;
  result.port = port;
  if (family == AF_INET && sockaddr.size() >= sizeof(sockaddr_in)) {
    sockaddr_in sin;
    memcpy(&sin, sockaddr.begin(), sizeof(sin));
    result.family = IpFamily::V4;
    memcpy(result.ip, &sin.sin_addr, 4);
    return result;
  } else if (family == AF_INET6 && sockaddr.size() >= sizeof(sockaddr_in6)) {
    sockaddr_in6 sin6;
    memcpy(&sin6, sockaddr.begin(), sizeof(sin6));
    result.family = IpFamily::V6;
    memcpy(result.ip, &sin6.sin6_addr, 16);
    return result;
  }
  return nullptr;
}

}  // namespace cfqt::edge
