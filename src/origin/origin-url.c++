// `--url` parsing and OriginConfig helpers (PROTOCOL.md §9.1).

#include "origin/origin.h"

#include <string.h>

namespace cfqt::origin {

using kj::uint;

namespace {

kj::Maybe<size_t> findFirst(kj::ArrayPtr<const char> text, char c) {
  for (size_t i = 0; i < text.size(); i++) {
    if (text[i] == c) return i;
  }
  return nullptr;
}

kj::Maybe<size_t> findLast(kj::ArrayPtr<const char> text, char c) {
  for (size_t i = text.size(); i > 0; i--) {
    if (text[i - 1] == c) return i - 1;
  }
  return nullptr;
}

char lower(char c) { return (c >= 'A' && c <= 'Z') ? c + ('a' - 'A') : c; }

kj::String lowerString(kj::ArrayPtr<const char> text) {
  auto out = kj::heapString(text.size());
  for (size_t i = 0; i < text.size(); i++) out[i] = lower(text[i]);
  return out;
}

bool isDigit(char c) { return c >= '0' && c <= '9'; }

kj::Maybe<uint> parsePort(kj::ArrayPtr<const char> text) {
  if (text.size() == 0 || text.size() > 5) return nullptr;
  uint value = 0;
  for (char c: text) {
    if (!isDigit(c)) return nullptr;
    value = value * 10 + (c - '0');
  }
  if (value == 0 || value > 65535) return nullptr;
  return value;
}

bool isHostChar(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || isDigit(c) || c == '-' || c == '.' ||
         c == '_';
}

bool isIpv6Char(char c) {
  return isDigit(c) || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F') || c == ':' || c == '.';
}

}  // namespace

kj::String OriginConfig::toString() const {
  switch (kind) {
    case OriginKind::HTTP:
    case OriginKind::HTTPS: {
      auto scheme = kind == OriginKind::HTTP ? "http://" : "https://";
      if (host.findFirst(':') != nullptr) return kj::str(scheme, '[', host, "]:", port);
      return kj::str(scheme, host, ':', port);
    }
    case OriginKind::UNIX: return kj::str("unix:", unixPath);
    case OriginKind::UNIX_TLS: return kj::str("unix+tls:", unixPath);
    case OriginKind::HELLO_WORLD: return kj::str("hello-world");
    case OriginKind::HTTP_STATUS: return kj::str("http_status:", status);
    case OriginKind::HANDLER: return kj::str("in-process");
  }
  KJ_UNREACHABLE;
}

OriginConfig inProcessOrigin(InProcessHandler& handler) {
  OriginConfig config;
  config.kind = OriginKind::HANDLER;
  config.handler = handler;
  return config;
}

OriginConfig helloWorldOrigin() {
  OriginConfig config;
  config.kind = OriginKind::HELLO_WORLD;
  config.host = kj::str("hello-world");
  return config;
}

OriginConfig unixSocketOrigin(kj::StringPtr path, bool tls) {
  OriginConfig config;
  config.kind = tls ? OriginKind::UNIX_TLS : OriginKind::UNIX;
  config.unixPath = kj::str(path);
  return config;
}

OriginConfig httpStatusOrigin(kj::uint status) {
  OriginConfig config;
  config.kind = OriginKind::HTTP_STATUS;
  config.status = status;
  return config;
}

kj::OneOf<OriginConfig, kj::String> parseOriginUrl(kj::StringPtr url) {
  if (url.size() == 0) return kj::str("origin URL is empty");
  for (char c: url) {
    if (c <= ' ' || c == 0x7f) return kj::str("origin URL \"", url, "\" contains a space or control character");
  }
  if (url == "hello-world" || url == "hello_world") return helloWorldOrigin();
  if (url.startsWith("http_status:")) {
    auto digits = url.slice(strlen("http_status:"));
    if (digits.size() != 3 || !isDigit(digits[0]) || !isDigit(digits[1]) || !isDigit(digits[2])) {
      return kj::str("invalid http_status origin \"", url, "\": expected http_status:NNN");
    }
    uint status = (digits[0] - '0') * 100 + (digits[1] - '0') * 10 + (digits[2] - '0');
    if (status < 100 || status > 599) {
      return kj::str("invalid http_status origin \"", url, "\": status must be 100..599");
    }
    return httpStatusOrigin(status);
  }
  if (url.startsWith("unix+tls:")) {
    auto path = url.slice(strlen("unix+tls:"));
    if (path.size() == 0) {
      return kj::str("unix+tls: origin needs a socket path (unix+tls:/path/to.sock)");
    }
    return unixSocketOrigin(path, true);
  }
  if (url.startsWith("unix:")) {
    auto path = url.slice(strlen("unix:"));
    if (path.size() == 0) return kj::str("unix: origin needs a socket path (unix:/path/to.sock)");
    return unixSocketOrigin(path);
  }

  // cloudflared prepends http:// when the URL has no scheme (`localhost:8080`).
  kj::String withScheme;
  kj::StringPtr rest;
  kj::String scheme;
  KJ_IF_MAYBE(pos, url.findFirst(':')) {
    if (url.slice(*pos).startsWith("://")) {
      scheme = lowerString(url.slice(0, *pos));
      rest = url.slice(*pos + 3);
    }
  }
  if (scheme == nullptr) {
    scheme = kj::str("http");
    rest = url;
  }

  OriginConfig config;
  if (scheme == "http") {
    config.kind = OriginKind::HTTP;
    config.port = 80;
  } else if (scheme == "https") {
    config.kind = OriginKind::HTTPS;
    config.port = 443;
  } else if (scheme == "tcp" || scheme == "ssh" || scheme == "rdp" || scheme == "smb") {
    return kj::str(scheme, ":// origins are not supported by cfqt yet (only http, https, unix, "
                   "unix+tls, hello-world and http_status origins are)");
  } else {
    return kj::str("origin URL \"", url, "\" has unsupported scheme \"", scheme,
                   "\" (expected http or https)");
  }

  // Authority ends at the first '/', '?' or '#'; the path is ignored (§9.1).
  size_t end = rest.size();
  for (size_t i = 0; i < rest.size(); i++) {
    if (rest[i] == '/' || rest[i] == '?' || rest[i] == '#') {
      end = i;
      break;
    }
  }
  auto authority = rest.slice(0, end);
  KJ_IF_MAYBE(at, findLast(authority, '@')) {
    authority = authority.slice(*at + 1, authority.size());
  }
  if (authority.size() == 0) return kj::str("origin URL \"", url, "\" has no host");

  kj::ArrayPtr<const char> host;
  kj::ArrayPtr<const char> port;
  if (authority[0] == '[') {
    KJ_IF_MAYBE(close, findFirst(authority, ']')) {
      host = authority.slice(1, *close);
      auto after = authority.slice(*close + 1, authority.size());
      if (after.size() > 0) {
        if (after[0] != ':') return kj::str("origin URL \"", url, "\" has a malformed host");
        port = after.slice(1, after.size());
      }
      for (char c: host) {
        if (!isIpv6Char(c)) return kj::str("origin URL \"", url, "\" has a malformed IPv6 address");
      }
      if (host.size() == 0) return kj::str("origin URL \"", url, "\" has no host");
    } else {
      return kj::str("origin URL \"", url, "\" has a malformed host");
    }
  } else {
    KJ_IF_MAYBE(colon, findFirst(authority, ':')) {
      if (findFirst(authority.slice(*colon + 1, authority.size()), ':') != nullptr) {
        return kj::str("origin URL \"", url, "\": IPv6 addresses need brackets ([::1]:8080)");
      }
      host = authority.slice(0, *colon);
      port = authority.slice(*colon + 1, authority.size());
    } else {
      host = authority;
    }
    for (char c: host) {
      if (!isHostChar(c)) return kj::str("origin URL \"", url, "\" has a malformed host");
    }
    if (host.size() == 0) return kj::str("origin URL \"", url, "\" has no host");
  }
  if (port.begin() != nullptr && port.size() > 0) {
    KJ_IF_MAYBE(p, parsePort(port)) {
      config.port = *p;
    } else {
      return kj::str("origin URL \"", url, "\" has an invalid port");
    }
  } else if (port.begin() != nullptr) {
    // "host:" — Go accepts an empty port and uses the scheme's default.
  }
  config.host = lowerString(host);
  return kj::mv(config);
}

kj::String originErrorText(kj::StringPtr cause) {
  return kj::str("Unable to reach the origin service. The service may be down or it may not be "
                 "responding to traffic from cloudflared: ", cause);
}

}  // namespace cfqt::origin
