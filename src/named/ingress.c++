#include "named/ingress.h"

#include <kj/debug.h>
#include <kj/vector.h>

#include <regex.h>
#include <string.h>

namespace cfqt::named {

class PathRegex {
  // A POSIX extended regular expression (glibc: matching time and stack do not grow with the
  // nesting of the input, so visitors' paths can't exhaust anything).
public:
  PathRegex() = default;
  KJ_DISALLOW_COPY(PathRegex);
  ~PathRegex() {
    if (compiled) regfree(&re);
  }
  kj::Maybe<kj::String> compile(kj::StringPtr source) {
    int rc = regcomp(&re, source.cStr(), REG_EXTENDED | REG_NOSUB);
    if (rc != 0) {
      char buffer[256];
      regerror(rc, &re, buffer, sizeof(buffer));
      return kj::str(buffer);
    }
    compiled = true;
    return nullptr;
  }
  bool search(kj::StringPtr text) const {
    return regexec(&re, text.cStr(), 0, nullptr, 0) == 0;
  }

private:
  regex_t re;
  bool compiled = false;
};

namespace {

kj::Maybe<size_t> findText(kj::StringPtr text, kj::StringPtr needle) {
  const char* at = strstr(text.cStr(), needle.cStr());
  if (at == nullptr) return nullptr;
  return static_cast<size_t>(at - text.cStr());
}

bool equalsIgnoreCase(kj::StringPtr a, kj::StringPtr b) {
  return a.size() == b.size() && strncasecmp(a.begin(), b.begin(), a.size()) == 0;
}

bool endsWithIgnoreCase(kj::StringPtr text, kj::StringPtr suffix) {
  return text.size() >= suffix.size() &&
         strncasecmp(text.begin() + text.size() - suffix.size(), suffix.begin(),
                     suffix.size()) == 0;
}

kj::String stripPort(kj::StringPtr host) {
  // "[::1]:8080" -> "::1", "a.example:443" -> "a.example", "a.example" unchanged.
  if (host.startsWith("[")) {
    KJ_IF_MAYBE(close, host.findFirst(']')) return kj::heapString(host.slice(1, *close));
    return kj::str(host);
  }
  KJ_IF_MAYBE(colon, host.findLast(':')) {
    if (host.findFirst(':').orDefault(0) == *colon) return kj::heapString(host.slice(0, *colon));
  }
  return kj::str(host);
}

bool hostnameHasPort(kj::StringPtr hostname) {
  // Go's net.SplitHostPort succeeds: "host:port" with one colon, or "[v6]:port".
  if (hostname.startsWith("[")) {
    KJ_IF_MAYBE(close, hostname.findFirst(']')) {
      return *close + 1 < hostname.size() && hostname[*close + 1] == ':';
    }
    return false;
  }
  size_t colons = 0;
  for (char c: hostname) if (c == ':') colons++;
  return colons == 1;
}

kj::String jsonQuote(kj::StringPtr text) {
  kj::Vector<char> out(text.size() + 2);
  out.add('"');
  for (char c: text) {
    if (c == '"' || c == '\\') {
      out.add('\\');
      out.add(c);
    } else if (static_cast<unsigned char>(c) < 0x20) {
      static const char HEX[] = "0123456789abcdef";
      out.addAll(kj::StringPtr("\\u00"));
      out.add(HEX[(c >> 4) & 0xf]);
      out.add(HEX[c & 0xf]);
    } else {
      out.add(c);
    }
  }
  out.add('"');
  out.add('\0');
  return kj::String(out.releaseAsArray());
}

kj::String at(const IngressRuleConfig& rule, kj::StringPtr text) {
  if (rule.line == 0) return kj::str(text);
  return kj::str("line ", rule.line, ": ", text);
}

// The service text -> an OriginConfig (cloudflared's validateIngress rules), or the error.
kj::OneOf<origin::OriginConfig, kj::String> parseService(kj::StringPtr service) {
  if (service.startsWith("unix:") || service.startsWith("unix+tls:") ||
      service.startsWith("http_status:") || service == "hello_world" ||
      service == "hello-world" || service == "helloworld") {
    if (service == "helloworld") return origin::helloWorldOrigin();
    return origin::parseOriginUrl(service);
  }
  KJ_IF_MAYBE(sep, findText(service, "://")) {
    auto scheme = kj::heapString(service.slice(0, *sep));
    auto rest = service.slice(*sep + 3);
    size_t hostEnd = 0;
    while (hostEnd < rest.size() && rest[hostEnd] != '/' && rest[hostEnd] != '?' &&
           rest[hostEnd] != '#') {
      hostEnd++;
    }
    if (scheme.size() == 0 || hostEnd == 0) {
      return kj::str(service, " is an invalid address, please make sure it has a scheme and a "
                     "hostname");
    }
    if (hostEnd < rest.size() && rest[hostEnd] == '/') {
      return kj::str(service, " is an invalid address, ingress rules don't support proxying to "
                     "a different path on the origin service. The path will be the same as the "
                     "eyeball request's path");
    }
    if (scheme == "http" || scheme == "https") return origin::parseOriginUrl(service);
    if (scheme == "ws") return origin::parseOriginUrl(kj::str("http://", rest));
    if (scheme == "wss") return origin::parseOriginUrl(kj::str("https://", rest));
    return kj::str(service, ": ", scheme, ":// services (TCP over WebSocket) are not supported by "
                   "cfqt; use an http://, https://, unix:, unix+tls:, http_status: or hello_world "
                   "service");
  }
  return kj::str(service, " is an invalid address, please make sure it has a scheme and a "
                 "hostname");
}

void applyOriginRequest(origin::OriginConfig& c, const OriginRequest& r) {
  KJ_IF_MAYBE(v, r.connectTimeout) c.connectTimeout = *v;
  KJ_IF_MAYBE(v, r.tlsTimeout) c.tlsTimeout = *v;
  KJ_IF_MAYBE(v, r.tcpKeepAlive) c.tcpKeepAlive = *v;
  KJ_IF_MAYBE(v, r.keepAliveTimeout) c.keepAliveTimeout = *v;
  KJ_IF_MAYBE(v, r.keepAliveConnections) c.keepAliveConnections = *v;
  KJ_IF_MAYBE(v, r.httpHostHeader) c.httpHostHeader = kj::str(*v);
  KJ_IF_MAYBE(v, r.originServerName) c.originServerName = kj::str(*v);
  KJ_IF_MAYBE(v, r.caPool) c.caPool = kj::str(*v);
  KJ_IF_MAYBE(v, r.noTLSVerify) c.noTlsVerify = *v;
}

}  // namespace

origin::OriginConfig cloneOriginConfig(const origin::OriginConfig& base) {
  origin::OriginConfig c;
  c.kind = base.kind;
  c.host = kj::str(base.host);
  c.port = base.port;
  c.unixPath = kj::str(base.unixPath);
  c.status = base.status;
  KJ_IF_MAYBE(v, base.httpHostHeader) c.httpHostHeader = kj::str(*v);
  KJ_IF_MAYBE(v, base.connectorId) c.connectorId = kj::str(*v);
  KJ_IF_MAYBE(v, base.originServerName) c.originServerName = kj::str(*v);
  KJ_IF_MAYBE(v, base.caPool) c.caPool = kj::str(*v);
  c.noTlsVerify = base.noTlsVerify;
  c.connectTimeout = base.connectTimeout;
  c.tlsTimeout = base.tlsTimeout;
  c.tcpKeepAlive = base.tcpKeepAlive;
  c.keepAliveConnections = base.keepAliveConnections;
  c.keepAliveTimeout = base.keepAliveTimeout;
  c.helloSseInterval = base.helloSseInterval;
  return c;
}

namespace {

origin::OriginConfig copyBase(const origin::OriginConfig& base) {
  origin::OriginConfig c;
  KJ_IF_MAYBE(v, base.httpHostHeader) c.httpHostHeader = kj::str(*v);
  KJ_IF_MAYBE(v, base.connectorId) c.connectorId = kj::str(*v);
  KJ_IF_MAYBE(v, base.originServerName) c.originServerName = kj::str(*v);
  KJ_IF_MAYBE(v, base.caPool) c.caPool = kj::str(*v);
  c.noTlsVerify = base.noTlsVerify;
  c.connectTimeout = base.connectTimeout;
  c.tlsTimeout = base.tlsTimeout;
  c.tcpKeepAlive = base.tcpKeepAlive;
  c.keepAliveConnections = base.keepAliveConnections;
  c.keepAliveTimeout = base.keepAliveTimeout;
  c.helloSseInterval = base.helloSseInterval;
  return c;
}

// Validates one rule's hostname and path; fills `regex` when there is a path.
kj::Maybe<kj::String> checkRule(const IngressRuleConfig& r, size_t index, size_t total,
                                kj::Maybe<kj::Own<PathRegex>>& regex) {
  if (hostnameHasPort(r.hostname)) return at(r, "Hostname cannot contain a port");
  KJ_IF_MAYBE(star, r.hostname.findLast('*')) {
    if (*star > 0) {
      return at(r, "Hostname patterns can have at most one wildcard character (\"*\") and it can "
                   "only be used for subdomains, e.g. \"*.example.com\"");
    }
  }
  bool catchAll = (r.hostname.size() == 0 || r.hostname == "*") && r.path.size() == 0;
  bool last = index == total - 1;
  if (last && !catchAll) {
    return at(r, "The last ingress rule must match all URLs (i.e. it should not have a hostname "
                 "or path filter)");
  }
  if (!last && catchAll) {
    return at(r, kj::str("Rule #", index + 1, " is matching the hostname '", r.hostname,
                         "', but this will match every hostname, meaning the rules which follow "
                         "it will never be triggered."));
  }
  if (r.path.size() > 0) {
    auto re = kj::heap<PathRegex>();
    KJ_IF_MAYBE(error, re->compile(r.path)) {
      return at(r, kj::str("Rule #", index + 1, " has an invalid regex: ", *error));
    }
    regex = kj::mv(re);
  }
  return nullptr;
}

}  // namespace

IngressRule::~IngressRule() noexcept(false) {}

bool IngressRule::matches(kj::StringPtr host, kj::StringPtr requestPathText) const {
  bool hostOk = hostname.size() == 0 || hostname == "*" || equalsIgnoreCase(hostname, host) ||
                (hostname.startsWith("*.") && endsWithIgnoreCase(host, hostname.slice(2)));
  if (!hostOk) return false;
  KJ_IF_MAYBE(re, regex) return (*re)->search(requestPathText);
  return true;
}

kj::Maybe<kj::String> validateIngress(kj::ArrayPtr<const IngressRuleConfig> rules) {
  if (rules.size() == 0) return kj::str("The config file doesn't contain any ingress rules");
  for (size_t i = 0; i < rules.size(); i++) {
    KJ_SWITCH_ONEOF(parseService(rules[i].service)) {
      KJ_CASE_ONEOF(error, kj::String) return at(rules[i], error);
      KJ_CASE_ONEOF(config, origin::OriginConfig) {}
    }
    kj::Maybe<kj::Own<PathRegex>> regex;
    KJ_IF_MAYBE(error, checkRule(rules[i], i, rules.size(), regex)) return kj::mv(*error);
  }
  return nullptr;
}

kj::OneOf<kj::Own<Ingress>, kj::String> Ingress::build(
    kj::ArrayPtr<const IngressRuleConfig> rules, const OriginRequest& defaults,
    const origin::OriginConfig& base) {
  if (rules.size() == 0) return kj::str("The config file doesn't contain any ingress rules");
  auto built = kj::heapArrayBuilder<IngressRule>(rules.size());
  for (size_t i = 0; i < rules.size(); i++) {
    auto& r = rules[i];
    IngressRule rule;
    KJ_SWITCH_ONEOF(parseService(r.service)) {
      KJ_CASE_ONEOF(error, kj::String) return at(r, error);
      KJ_CASE_ONEOF(config, origin::OriginConfig) {
        // The service's own fields (kind, host, port, path, status) over the CLI's base.
        auto merged = copyBase(base);
        merged.kind = config.kind;
        merged.host = kj::mv(config.host);
        merged.port = config.port;
        merged.unixPath = kj::mv(config.unixPath);
        merged.status = config.status;
        applyOriginRequest(merged, r.originRequest.over(defaults));
        rule.origin = kj::mv(merged);
      }
    }
    KJ_IF_MAYBE(error, checkRule(r, i, rules.size(), rule.regex)) return kj::mv(*error);
    rule.hostname = kj::str(r.hostname);
    rule.path = kj::str(r.path);
    rule.service = kj::str(r.service);
    built.add(kj::mv(rule));
  }
  return kj::heap<Ingress>(built.finish());
}

kj::Own<Ingress> Ingress::single(origin::OriginConfig config, kj::StringPtr service) {
  IngressRule rule;
  rule.hostname = kj::str("");
  rule.path = kj::str("");
  rule.service = kj::str(service);
  rule.origin = kj::mv(config);
  auto rules = kj::heapArrayBuilder<IngressRule>(1);
  rules.add(kj::mv(rule));
  return kj::heap<Ingress>(rules.finish());
}

kj::uint Ingress::match(kj::StringPtr hostParam, kj::StringPtr path) const {
  auto host = stripPort(hostParam);
  for (kj::uint i = 0; i < ruleList.size(); i++) {
    if (ruleList[i].matches(host, path)) return i;
  }
  return ruleList.size() - 1;
}

kj::String Ingress::describe(kj::uint index) const {
  auto& r = ruleList[index];
  return kj::str(r.hostname.size() > 0 ? kj::str("\thostname: ", r.hostname, "\n") : kj::str(),
                 r.path.size() > 0 ? kj::str("\tpath: ", r.path, "\n") : kj::str(),
                 "\tservice: ", r.service, "\n");
}

kj::String Ingress::localConfigJson() const {
  kj::Vector<kj::String> items;
  for (auto& r: ruleList) {
    items.add(kj::str("{", r.hostname.size() > 0 ? kj::str("\"hostname\":", jsonQuote(r.hostname),
                                                           ",") : kj::str(),
                      r.path.size() > 0 ? kj::str("\"path\":", jsonQuote(r.path), ",")
                                        : kj::str(),
                      "\"service\":", jsonQuote(r.service), ",\"originRequest\":{}}"));
  }
  return kj::str("[", kj::strArray(items, ","), "]");
}

kj::String requestPath(kj::StringPtr dest) {
  size_t start = 0;
  KJ_IF_MAYBE(sep, findText(dest, "://")) {
    start = *sep + 3;
    while (start < dest.size() && dest[start] != '/' && dest[start] != '?') start++;
  }
  size_t end = start;
  while (end < dest.size() && dest[end] != '?' && dest[end] != '#') end++;
  if (end == start) return kj::str("/");
  return kj::heapString(dest.slice(start, end));
}

Router::Router(kj::Timer& timer, kj::Network& network, const kj::HttpHeaderTable& headerTable,
               kj::Maybe<origin::OriginObserver&> observer)
    : timer(timer), network(network), headerTable(headerTable), observer(observer) {}

Router::~Router() noexcept(false) {}

const Ingress& Router::ingress() const {
  KJ_REQUIRE(current.get() != nullptr, "Router::ingress() before apply()");
  return *current->ingress;
}

kj::Maybe<kj::String> Router::apply(kj::Own<Ingress> ingress) {
  auto origins = kj::heapArrayBuilder<kj::Own<origin::Origin>>(ingress->rules().size());
  for (auto& rule: ingress->rules()) {
    auto config = cloneOriginConfig(rule.origin);
    KJ_SWITCH_ONEOF(origin::Origin::create(kj::mv(config), timer, network, headerTable)) {
      KJ_CASE_ONEOF(error, kj::String) {
        return kj::str("ingress rule for ", rule.service, ": ", error);
      }
      KJ_CASE_ONEOF(o, kj::Own<origin::Origin>) {
        KJ_IF_MAYBE(obs, observer) o->setObserver(*obs);
        origins.add(kj::mv(o));
      }
    }
  }
  auto table = kj::refcounted<Table>();
  table->ingress = kj::mv(ingress);
  table->origins = origins.finish();
  current = kj::mv(table);
  applied++;
  return nullptr;
}

kj::Promise<void> Router::serve(kj::AsyncIoStream& stream,
                                kj::OneOf<wire::HttpRequestHead, kj::String> request,
                                origin::ResponseSink& sink) {
  KJ_REQUIRE(current.get() != nullptr, "Router::serve() before apply()");
  auto& table = *current;
  kj::uint index = table.origins.size() - 1;
  KJ_IF_MAYBE(head, request.tryGet<wire::HttpRequestHead>()) {
    index = table.ingress->match(head->host, requestPath(head->dest));
  }
  auto& chosen = *table.origins[index];
  return chosen.serve(stream, kj::mv(request), sink).attach(kj::addRef(table));
}

}  // namespace cfqt::named
