#include "named/config.h"

#include <kj/debug.h>
#include <kj/filesystem.h>

#include <yaml-cpp/yaml.h>

#include <stdlib.h>
#include <string>
#include <sys/stat.h>

namespace cfqt::named {

namespace {

constexpr size_t MAX_CONFIG_BYTES = 1024 * 1024;
constexpr size_t MAX_RULES = 10000;

// The top-level keys that are cfqt flags too (value taken as text; the CLI checks them).
constexpr kj::StringPtr FLAG_KEYS[] = {
    "url"_kj, "hello-world"_kj, "unix-socket"_kj, "protocol"_kj, "loglevel"_kj, "logfile"_kj,
    "metrics"_kj, "ha-connections"_kj, "retries"_kj, "grace-period"_kj, "edge-ip-version"_kj,
    "region"_kj, "no-autoupdate"_kj, "edge"_kj, "cacert"_kj, "edge-ca"_kj,
    "origin-ca-pool"_kj, "origin-server-name"_kj, "http-host-header"_kj,
};

struct ConfigError {
  kj::String text;
};

kj::uint lineOf(const YAML::Node& node) {
  auto mark = node.Mark();
  return mark.line >= 0 ? static_cast<kj::uint>(mark.line + 1) : 0;
}

[[noreturn]] void fail(const YAML::Node& node, kj::StringPtr what) {
  throw ConfigError{kj::str(lineOf(node), ": ", what)};
}

kj::String scalar(const YAML::Node& node, kj::StringPtr key) {
  if (!node.IsScalar()) fail(node, kj::str(key, " must be a string"));
  auto text = node.Scalar();
  return kj::heapString(text.data(), text.size());
}

bool boolean(const YAML::Node& node, kj::StringPtr key) {
  auto text = scalar(node, key);
  if (text == "true" || text == "yes" || text == "on" || text == "True" || text == "TRUE") {
    return true;
  }
  if (text == "false" || text == "no" || text == "off" || text == "False" || text == "FALSE") {
    return false;
  }
  fail(node, kj::str(key, " must be true or false"));
}

kj::Maybe<kj::Duration> parseDuration(kj::StringPtr text) {
  // Go's time.ParseDuration subset ("30s", "1m30s", "500ms"), or a bare number of seconds (the
  // JSON form of cloudflared's CustomDuration).
  if (text.size() == 0 || text.size() > 40) return nullptr;
  bool digitsOnly = true;
  for (char c: text) if (c < '0' || c > '9') digitsOnly = false;
  if (digitsOnly) {
    uint64_t v = 0;
    for (char c: text) v = v * 10 + (c - '0');
    if (v > 1000000000ull) return nullptr;
    return static_cast<int64_t>(v) * kj::SECONDS;
  }
  double total = 0;
  size_t i = 0;
  bool any = false;
  while (i < text.size()) {
    size_t start = i;
    while (i < text.size() && ((text[i] >= '0' && text[i] <= '9') || text[i] == '.')) i++;
    if (i == start) return nullptr;
    double value = strtod(kj::heapString(text.slice(start, i)).cStr(), nullptr);
    size_t unitStart = i;
    while (i < text.size() && !((text[i] >= '0' && text[i] <= '9') || text[i] == '.')) i++;
    auto unit = kj::heapString(text.slice(unitStart, i));
    double scale;
    if (unit == "ns") scale = 1;
    else if (unit == "us") scale = 1e3;
    else if (unit == "ms") scale = 1e6;
    else if (unit == "s") scale = 1e9;
    else if (unit == "m") scale = 60e9;
    else if (unit == "h") scale = 3600e9;
    else return nullptr;
    total += value * scale;
    any = true;
  }
  if (!any || total > 9e18) return nullptr;
  return static_cast<int64_t>(total) * kj::NANOSECONDS;
}

kj::Duration duration(const YAML::Node& node, kj::StringPtr key) {
  KJ_IF_MAYBE(d, parseDuration(scalar(node, key))) return *d;
  fail(node, kj::str(key, " must be a duration such as 30s, 1m or 500ms"));
}

OriginRequest originRequest(const YAML::Node& node, kj::Vector<IgnoredKey>& ignored) {
  OriginRequest r;
  if (node.IsNull()) return r;
  if (!node.IsMap()) fail(node, "originRequest must be a mapping");
  for (auto it = node.begin(); it != node.end(); ++it) {
    auto key = scalar(YAML::Node(it->first), "a key");
    YAML::Node value = it->second;
    if (key == "connectTimeout") r.connectTimeout = duration(value, key);
    else if (key == "tlsTimeout") r.tlsTimeout = duration(value, key);
    else if (key == "tcpKeepAlive") r.tcpKeepAlive = duration(value, key);
    else if (key == "keepAliveTimeout") r.keepAliveTimeout = duration(value, key);
    else if (key == "keepAliveConnections") {
      auto text = scalar(value, key);
      uint64_t v = 0;
      bool ok = text.size() > 0 && text.size() < 10;
      for (char c: text) {
        if (c < '0' || c > '9') ok = false;
        else v = v * 10 + (c - '0');
      }
      if (!ok) fail(value, "keepAliveConnections must be a non-negative integer");
      r.keepAliveConnections = static_cast<kj::uint>(v);
    }
    else if (key == "httpHostHeader") r.httpHostHeader = scalar(value, key);
    else if (key == "originServerName") r.originServerName = scalar(value, key);
    else if (key == "caPool") r.caPool = scalar(value, key);
    else if (key == "noTLSVerify") r.noTLSVerify = boolean(value, key);
    // Other cloudflared keys (proxyAddress, bastionMode, http2Origin, access, ...) are not
    // applied; the runner warns about each.
    else ignored.add(IgnoredKey{kj::mv(key), lineOf(YAML::Node(it->first))});
  }
  return r;
}

IngressRuleConfig ingressRule(const YAML::Node& node, kj::Vector<IgnoredKey>& ignored) {
  if (!node.IsMap()) fail(node, "an ingress rule must be a mapping (- hostname: ..., service: ...)");
  IngressRuleConfig rule;
  rule.line = lineOf(node);
  rule.hostname = kj::str("");
  rule.path = kj::str("");
  bool haveService = false;
  for (auto it = node.begin(); it != node.end(); ++it) {
    auto key = scalar(YAML::Node(it->first), "a key");
    YAML::Node value = it->second;
    if (key == "hostname") rule.hostname = value.IsNull() ? kj::str("") : scalar(value, key);
    else if (key == "path") rule.path = value.IsNull() ? kj::str("") : scalar(value, key);
    else if (key == "service") {
      rule.service = scalar(value, key);
      haveService = true;
    }
    else if (key == "originRequest") rule.originRequest = originRequest(value, ignored);
  }
  if (!haveService || rule.service.size() == 0) {
    fail(node, "this ingress rule has no service (e.g. service: http://localhost:8080)");
  }
  return rule;
}

TunnelConfig parseRoot(const YAML::Node& root) {
  TunnelConfig config;
  if (root.IsNull()) return config;
  if (!root.IsMap()) fail(root, "the configuration must be a mapping of keys (tunnel:, ingress:)");
  for (auto it = root.begin(); it != root.end(); ++it) {
    auto key = scalar(YAML::Node(it->first), "a key");
    YAML::Node value = it->second;
    if (key == "tunnel") {
      config.tunnel = scalar(value, key);
    } else if (key == "credentials-file") {
      config.credentialsFile = scalar(value, key);
    } else if (key == "ingress") {
      if (value.IsNull()) continue;
      if (!value.IsSequence()) fail(value, "ingress must be a list of rules");
      if (value.size() > MAX_RULES) fail(value, "too many ingress rules");
      for (auto rule = value.begin(); rule != value.end(); ++rule) {
        config.ingress.add(ingressRule(*rule, config.ignored));
      }
    } else if (key == "originRequest") {
      config.originRequest = originRequest(value, config.ignored);
    } else {
      for (auto flag: FLAG_KEYS) {
        if (key != flag) continue;
        if (value.IsSequence()) {
          for (auto item = value.begin(); item != value.end(); ++item) {
            config.flags.add(ConfigFlag{kj::str(key), scalar(*item, key), lineOf(*item)});
          }
        } else {
          config.flags.add(ConfigFlag{kj::str(key), scalar(value, key), lineOf(value)});
        }
      }
    }
  }
  return config;
}

}  // namespace

OriginRequest OriginRequest::clone() const {
  OriginRequest r;
  r.connectTimeout = connectTimeout;
  r.tlsTimeout = tlsTimeout;
  r.tcpKeepAlive = tcpKeepAlive;
  r.keepAliveTimeout = keepAliveTimeout;
  r.keepAliveConnections = keepAliveConnections;
  KJ_IF_MAYBE(v, httpHostHeader) r.httpHostHeader = kj::str(*v);
  KJ_IF_MAYBE(v, originServerName) r.originServerName = kj::str(*v);
  KJ_IF_MAYBE(v, caPool) r.caPool = kj::str(*v);
  r.noTLSVerify = noTLSVerify;
  return r;
}

OriginRequest OriginRequest::over(const OriginRequest& d) const {
  auto r = clone();
  if (r.connectTimeout == nullptr) r.connectTimeout = d.connectTimeout;
  if (r.tlsTimeout == nullptr) r.tlsTimeout = d.tlsTimeout;
  if (r.tcpKeepAlive == nullptr) r.tcpKeepAlive = d.tcpKeepAlive;
  if (r.keepAliveTimeout == nullptr) r.keepAliveTimeout = d.keepAliveTimeout;
  if (r.keepAliveConnections == nullptr) r.keepAliveConnections = d.keepAliveConnections;
  if (r.httpHostHeader == nullptr) KJ_IF_MAYBE(v, d.httpHostHeader) r.httpHostHeader = kj::str(*v);
  if (r.originServerName == nullptr) {
    KJ_IF_MAYBE(v, d.originServerName) r.originServerName = kj::str(*v);
  }
  if (r.caPool == nullptr) KJ_IF_MAYBE(v, d.caPool) r.caPool = kj::str(*v);
  if (r.noTLSVerify == nullptr) r.noTLSVerify = d.noTLSVerify;
  return r;
}

IngressRuleConfig IngressRuleConfig::clone() const {
  return {kj::str(hostname), kj::str(path), kj::str(service), originRequest.clone(), line};
}

kj::OneOf<TunnelConfig, kj::String> parseConfig(kj::StringPtr text, kj::StringPtr source) {
  try {
    YAML::Node root = YAML::Load(std::string(text.begin(), text.size()));
    auto config = parseRoot(root);
    config.source = kj::str(source);
    return kj::mv(config);
  } catch (ConfigError& e) {
    return kj::str(source, ":", e.text);
  } catch (YAML::Exception& e) {
    return kj::str(source, ":", e.mark.line >= 0 ? e.mark.line + 1 : 0, ": ", e.msg.c_str());
  } catch (std::exception& e) {
    return kj::str(source, ": ", e.what());
  }
}

kj::OneOf<TunnelConfig, kj::String> loadConfigFile(kj::StringPtr path) {
  auto fs = kj::newDiskFilesystem();
  kj::String text;
  bool tooBig = false;
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
    auto file = fs->getRoot().openFile(fs->getCurrentPath().evalNative(path));
    if (file->stat().size > MAX_CONFIG_BYTES) {
      tooBig = true;
      return;
    }
    text = file->readAllText();
  })) {
    return kj::str(path, ": cannot read the configuration file (does it exist?)");
  }
  if (tooBig) return kj::str(path, ": the configuration file is over 1 MiB");
  return parseConfig(text, path);
}

kj::Maybe<kj::String> findDefaultConfigFile() {
  const char* home = getenv("HOME");
  kj::Vector<kj::String> dirs;
  if (home != nullptr && home[0] != '\0') {
    dirs.add(kj::str(home, "/.cloudflared"));
    dirs.add(kj::str(home, "/.cloudflare-warp"));
    dirs.add(kj::str(home, "/cloudflare-warp"));
  }
  dirs.add(kj::str("/etc/cloudflared"));
  dirs.add(kj::str("/usr/local/etc/cloudflared"));
  for (auto& dir: dirs) {
    for (auto name: {"config.yml", "config.yaml"}) {
      auto path = kj::str(dir, '/', name);
      struct stat st;
      if (::stat(path.cStr(), &st) == 0 && S_ISREG(st.st_mode)) return kj::mv(path);
    }
  }
  return nullptr;
}

}  // namespace cfqt::named
