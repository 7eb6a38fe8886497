#pragma once
// Ingress rules (cloudflared's `ingress/`): each visitor request goes to the first rule whose
// hostname (exact, or a leading "*." wildcard) and path regex match; the last rule must match
// everything. Router serves requests through the current rules, one origin::Origin (own pool and
// originRequest options) per rule, and swaps the rules atomically when a new configuration is
// applied: requests in flight finish on the rules they started on.

#include "named/config.h"

#include "origin/origin.h"

#include <kj/refcount.h>

namespace cfqt::named {

class PathRegex;

struct IngressRule {
  kj::String hostname;      // "" or "*": any host
  kj::String path;          // regex source; "": any path
  kj::String service;       // as written ("http://localhost:8080", "http_status:404", ...)
  origin::OriginConfig origin;
  kj::Maybe<kj::Own<PathRegex>> regex;

  bool matches(kj::StringPtr host, kj::StringPtr path) const;
  ~IngressRule() noexcept(false);
  IngressRule() = default;
  IngressRule(IngressRule&&) = default;
  IngressRule& operator=(IngressRule&&) = default;
};

class Ingress {
public:
  static kj::OneOf<kj::Own<Ingress>, kj::String> build(
      kj::ArrayPtr<const IngressRuleConfig> rules, const OriginRequest& defaults,
      const origin::OriginConfig& base);
  // Validates the rules with cloudflared's messages ("The last ingress rule must match all URLs
  // (i.e. it should not have a hostname or path filter)", "Rule #2 has an invalid regex: ...",
  // ...), prefixed with "line N: " when the rule's line is known. `base` gives what no
  // originRequest key sets (the connector ID, the CLI's --proxy-* timeouts).

  static kj::Own<Ingress> single(origin::OriginConfig config, kj::StringPtr service);
  // One catch-all rule (--url, --hello-world, or the default http_status:503).

  kj::uint match(kj::StringPtr host, kj::StringPtr path) const;
  // The first matching rule's index; `host` may carry a port (ignored). The last rule when none
  // matches (it is a catch-all by construction).

  kj::ArrayPtr<const IngressRule> rules() const { return ruleList; }

  kj::String describe(kj::uint index) const;
  // cloudflared's `ingress rule` lines: "\thostname: H\n" (if any), "\tpath: P\n" (if any),
  // "\tservice: S\n".

  kj::String localConfigJson() const;
  // The "ingress" array for updateLocalConfiguration: [{"hostname":...,"path":...,"service":...,
  // "originRequest":{}}].

  explicit Ingress(kj::Array<IngressRule> rules): ruleList(kj::mv(rules)) {}

private:
  kj::Array<IngressRule> ruleList;
};

kj::Maybe<kj::String> validateIngress(kj::ArrayPtr<const IngressRuleConfig> rules);
// The validation part of build() alone (no origin is created): `cfqt tunnel ingress validate`.

class Router {
public:
  Router(kj::Timer& timer, kj::Network& network, const kj::HttpHeaderTable& headerTable,
         kj::Maybe<origin::OriginObserver&> observer);
  // Borrows everything; all must outlive the Router and its requests.
  KJ_DISALLOW_COPY(Router);
  ~Router() noexcept(false);

  kj::Maybe<kj::String> apply(kj::Own<Ingress> ingress);
  // Makes an origin for every rule and switches to the new rules, or returns the error (an
  // origin that can't be created) and keeps the current ones.

  kj::Promise<void> serve(kj::AsyncIoStream& stream,
                          kj::OneOf<wire::HttpRequestHead, kj::String> request,
                          origin::ResponseSink& sink);
  // origin::Origin::serve() of the first matching rule's origin. The rules (and their origins)
  // stay alive until the promise settles, whatever apply() does meanwhile.

  bool hasRules() const { return current.get() != nullptr; }
  const Ingress& ingress() const;
  uint64_t generation() const { return applied; }

private:
  struct Table: public kj::Refcounted {
    kj::Own<Ingress> ingress;
    kj::Array<kj::Own<origin::Origin>> origins;
  };
  kj::Timer& timer;
  kj::Network& network;
  const kj::HttpHeaderTable& headerTable;
  kj::Maybe<origin::OriginObserver&> observer;
  kj::Own<Table> current;
  uint64_t applied = 0;
};

origin::OriginConfig cloneOriginConfig(const origin::OriginConfig& config);

kj::String requestPath(kj::StringPtr dest);
// The path of a ConnectRequest dest ("https://host/a/b?q" or "/a/b?q" -> "/a/b").

}  // namespace cfqt::named
