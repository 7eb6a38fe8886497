#pragma once
// The named-tunnel configuration: cloudflared's YAML config file (`--config FILE`: `tunnel`,
// `credentials-file`, `ingress`, `originRequest` and a few top-level flags) and the JSON
// configuration the edge pushes to a remotely managed tunnel (`{"ingress":[...],
// "originRequest":{...},"warp-routing":{...}}`, the same shape). Both are read with yaml-cpp (JSON
// is YAML's flow style); errors name the file and line ("config.yml:7: ...").

#include <kj/array.h>
#include <kj/one-of.h>
#include <kj/string.h>
#include <kj/time.h>
#include <kj/vector.h>

namespace cfqt::named {

struct OriginRequest {
  // cloudflared's originRequest keys that cfqt applies (per rule, over the top-level defaults).
  kj::Maybe<kj::Duration> connectTimeout;      // connectTimeout
  kj::Maybe<kj::Duration> tlsTimeout;          // tlsTimeout
  kj::Maybe<kj::Duration> tcpKeepAlive;        // tcpKeepAlive
  kj::Maybe<kj::Duration> keepAliveTimeout;    // keepAliveTimeout
  kj::Maybe<kj::uint> keepAliveConnections;    // keepAliveConnections
  kj::Maybe<kj::String> httpHostHeader;        // httpHostHeader
  kj::Maybe<kj::String> originServerName;      // originServerName
  kj::Maybe<kj::String> caPool;                // caPool
  kj::Maybe<bool> noTLSVerify;                 // noTLSVerify (refused when true)

  OriginRequest clone() const;
  OriginRequest over(const OriginRequest& defaults) const;
  // This rule's values, each missing one taken from `defaults`.
};

struct IngressRuleConfig {
  kj::String hostname;     // "" = any
  kj::String path;         // regex source, "" = any
  kj::String service;
  OriginRequest originRequest;
  kj::uint line = 0;       // 1-based line in the file (0: unknown)

  IngressRuleConfig clone() const;
};

struct ConfigFlag {
  kj::String name;         // a top-level key that is also a cfqt flag (url, protocol, ...)
  kj::String value;
  kj::uint line = 0;
};

struct IgnoredKey {
  // An originRequest key cfqt does not apply (proxyAddress, http2Origin, matchSNItoHost, access,
  // ...): accepted as cloudflared does, and reported so that it is not silently ignored.
  kj::String key;
  kj::uint line = 0;       // 1-based line in the source (0: unknown)
};

struct TunnelConfig {
  kj::String source;                          // the file name, or "remote configuration"
  kj::Maybe<kj::String> tunnel;               // `tunnel:` NAME or UUID
  kj::Maybe<kj::String> credentialsFile;      // `credentials-file:`
  kj::Vector<IngressRuleConfig> ingress;
  OriginRequest originRequest;                // top-level defaults
  kj::Vector<ConfigFlag> flags;               // other known top-level keys, for the CLI
  kj::Vector<IgnoredKey> ignored;             // originRequest keys not applied, in file order
};

kj::OneOf<TunnelConfig, kj::String> parseConfig(kj::StringPtr text, kj::StringPtr source);
// Parses YAML or JSON text. Unknown keys are ignored (as cloudflared does; an unknown
// originRequest key, top-level or in a rule, is listed in `ignored` for a warning); wrong types, bad
// durations and YAML syntax errors give "<source>:<line>: <what>". Never throws.

kj::OneOf<TunnelConfig, kj::String> loadConfigFile(kj::StringPtr path);
// Reads (at most 1 MiB) and parses `path`.

kj::Maybe<kj::String> findDefaultConfigFile();
// cloudflared's search path: ~/.cloudflared, ~/.cloudflare-warp, ~/cloudflare-warp,
// /etc/cloudflared, /usr/local/etc/cloudflared; config.yml then config.yaml. Null if none exists.

}  // namespace cfqt::named
