// SocketAddress parsing and formatting.

#include "quic/config.h"

#include <kj/debug.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>

namespace cfqt::quic {

static_assert(sizeof(sockaddr_in6) <= 28);

kj::Maybe<SocketAddress> SocketAddress::parse(kj::StringPtr text) {
  SocketAddress result;
  kj::String host;
  kj::StringPtr portText;
  if (text.startsWith("[")) {
    KJ_IF_MAYBE(close, text.findFirst(']')) {
      host = kj::heapString(text.slice(1, *close));
      if (text.size() < *close + 2 || text[*close + 1] != ':') return nullptr;
      portText = text.slice(*close + 2);
    } else {
      return nullptr;
    }
  } else {
    KJ_IF_MAYBE(colon, text.findLast(':')) {
      host = kj::heapString(text.slice(0, *colon));
      portText = text.slice(*colon + 1);
    } else {
      return nullptr;
    }
  }
  if (portText.size() == 0 || portText.size() > 5) return nullptr;
  uint32_t port = 0;
  for (char c: portText) {
    if (c < '0' || c > '9') return nullptr;
    port = port * 10 + (c - '0');
  }
  if (port > 65535) return nullptr;

  sockaddr_in v4;
  memset(&v4, 0, sizeof(v4));
  if (inet_pton(AF_INET, host.cStr(), &v4.sin_addr) == 1) {
    v4.sin_family = AF_INET;
    v4.sin_port = htons(port);
    memcpy(result.storage, &v4, sizeof(v4));
    result.len = sizeof(v4);
    return result;
  }
  sockaddr_in6 v6;
  memset(&v6, 0, sizeof(v6));
  if (inet_pton(AF_INET6, host.cStr(), &v6.sin6_addr) == 1) {
    v6.sin6_family = AF_INET6;
    v6.sin6_port = htons(port);
    memcpy(result.storage, &v6, sizeof(v6));
    result.len = sizeof(v6);
    return result;
  }
  return nullptr;
}

SocketAddress SocketAddress::fromSockaddr(const void* addr, uint32_t length) {
  SocketAddress result;
  auto family = reinterpret_cast<const ::sockaddr*>(addr)->sa_family;
  KJ_REQUIRE((family == AF_INET && length >= sizeof(sockaddr_in)) ||
             (family == AF_INET6 && length >= sizeof(sockaddr_in6)), "unsupported address", family);
  result.len = family == AF_INET ? sizeof(sockaddr_in) : sizeof(sockaddr_in6);
  memcpy(result.storage, addr, result.len);
  return result;
}

bool SocketAddress::isIpv6() const {
  return len == sizeof(sockaddr_in6);
}

uint16_t SocketAddress::port() const {
  if (len == 0) return 0;
  return isIpv6() ? ntohs(reinterpret_cast<const sockaddr_in6*>(storage)->sin6_port)
                  : ntohs(reinterpret_cast<const sockaddr_in*>(storage)->sin_port);
}

void SocketAddress::setPort(uint16_t port) {
  if (len == 0) return;
  if (isIpv6()) {
    reinterpret_cast<sockaddr_in6*>(storage)->sin6_port = htons(port);
  } else {
    reinterpret_cast<sockaddr_in*>(storage)->sin_port = htons(port);
  }
}

kj::String SocketAddress::toString() const {
  char buf[INET6_ADDRSTRLEN];
  if (len == 0) return kj::str("(none)");
  if (isIpv6()) {
    inet_ntop(AF_INET6, &reinterpret_cast<const sockaddr_in6*>(storage)->sin6_addr, buf,
              sizeof(buf));
    return kj::str("[", buf, "]:", port());
  }
  inet_ntop(AF_INET, &reinterpret_cast<const sockaddr_in*>(storage)->sin_addr, buf, sizeof(buf));
  return kj::str(buf, ":", port());
}

bool SocketAddress::operator==(const SocketAddress& other) const {
  if (len != other.len) return false;
  if (isIpv6()) {
    auto a = reinterpret_cast<const sockaddr_in6*>(storage);
    auto b = reinterpret_cast<const sockaddr_in6*>(other.storage);
    return a->sin6_port == b->sin6_port &&
           memcmp(&a->sin6_addr, &b->sin6_addr, sizeof(a->sin6_addr)) == 0;
  }
  auto a = reinterpret_cast<const sockaddr_in*>(storage);
  auto b = reinterpret_cast<const sockaddr_in*>(other.storage);
  return a->sin_port == b->sin_port && a->sin_addr.s_addr == b->sin_addr.s_addr;
}

}  // namespace cfqt::quic
