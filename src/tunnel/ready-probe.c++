#include "ready-probe.h"

#include <kj/compat/tls.h>
#include <kj/debug.h>
#include <kj/io.h>

#include <errno.h>
#include <fcntl.h>
#include <string.h>

namespace cfqt::tunnel {

namespace {

constexpr size_t MAX_RESPONSE_HEAD = 16 * 1024;

bool equalsIgnoreCase(kj::ArrayPtr<const char> a, kj::StringPtr b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); i++) {
    char x = a[i], y = b[i];
    if (x >= 'A' && x <= 'Z') x = static_cast<char>(x - 'A' + 'a');
    if (y >= 'A' && y <= 'Z') y = static_cast<char>(y - 'A' + 'a');
    if (x != y) return false;
  }
  return true;
}

bool containsIgnoreCase(kj::StringPtr text, kj::StringPtr needle) {
  for (size_t i = 0; i + needle.size() <= text.size(); i++) {
    if (equalsIgnoreCase(text.slice(i, i + needle.size()), needle)) return true;
  }
  return false;
}

kj::ArrayPtr<const char> trim(kj::ArrayPtr<const char> s) {
  size_t b = 0, e = s.size();
  while (b < e && (s[b] == ' ' || s[b] == '\t')) b++;
  while (e > b && (s[e - 1] == ' ' || s[e - 1] == '\t' || s[e - 1] == '\r')) e--;
  return s.slice(b, e);
}

kj::String printable(kj::ArrayPtr<const char> text, size_t max = 80) {
  // Network text for a log line: printable ASCII only, bounded.
  kj::Vector<char> out;
  for (size_t i = 0; i < text.size() && i < max; i++) {
    char c = text[i];
    out.add(c >= 0x20 && c < 0x7f && c != '"' && c != '\\' ? c : '?');
  }
  out.add('\0');
  return kj::String(out.releaseAsArray());
}

struct ProbeAnswer {
  kj::uint status = 0;
  bool tokenMatched = false;
};

kj::Maybe<ProbeAnswer> parseHead(kj::ArrayPtr<const char> head, kj::StringPtr token) {
  // "HTTP/1.1 200 OK\r\nName: value\r\n...\r\n\r\n" (untrusted).
  ProbeAnswer answer;
  size_t lineStart = 0;
  bool first = true;
  for (size_t i = 0; i + 1 < head.size(); i++) {
    if (head[i] != '\r' || head[i + 1] != '\n') continue;
    auto line = head.slice(lineStart, i);
    lineStart = i + 2;
    if (first) {
      first = false;
      if (line.size() < 12 || !equalsIgnoreCase(line.slice(0, 5), "http/")) return nullptr;
      size_t space = 0;
      while (space < line.size() && line[space] != ' ') space++;
      if (space + 4 > line.size()) return nullptr;
      kj::uint status = 0;
      for (size_t d = space + 1; d < space + 4; d++) {
        if (line[d] < '0' || line[d] > '9') return nullptr;
        status = status * 10 + (line[d] - '0');
      }
      answer.status = status;
      continue;
    }
    if (line.size() == 0) break;
    size_t colon = 0;
    while (colon < line.size() && line[colon] != ':') colon++;
    if (colon == line.size()) continue;
    if (equalsIgnoreCase(trim(line.slice(0, colon)), READY_PROBE_HEADER)) {
      auto value = trim(line.slice(colon + 1, line.size()));
      if (value.size() == token.size() && token.size() > 0 &&
          memcmp(value.begin(), token.begin(), token.size()) == 0) {
        answer.tokenMatched = true;
      }
    }
  }
  if (first) return nullptr;
  return answer;
}

kj::Promise<size_t> readHead(kj::AsyncIoStream& stream, kj::ArrayPtr<char> buffer, size_t filled) {
  // Reads on until the blank line that ends a response head, EOF, or a full buffer.
  for (size_t i = 0; i + 3 < filled; i++) {
    if (memcmp(buffer.begin() + i, "\r\n\r\n", 4) == 0) return filled;
  }
  if (filled >= buffer.size()) return filled;
  return stream.tryRead(buffer.begin() + filled, 1, buffer.size() - filled)
      .then([&stream, buffer, filled](size_t n) -> kj::Promise<size_t> {
    if (n == 0) return filled;
    return readHead(stream, buffer, filled + n);
  });
}

bool isDnsName(kj::StringPtr name) {
  // Letters, digits and '-' in dot-separated labels of 1..63 bytes, at most 253 in all.
  if (name.size() == 0 || name.size() > 253) return false;
  size_t label = 0;
  for (char c: name) {
    if (c == '.') {
      if (label == 0) return false;
      label = 0;
      continue;
    }
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '-';
    if (!ok || ++label > 63) return false;
  }
  return label > 0;
}

kj::String readPem(kj::StringPtr path) {
  int fd = ::open(path.cStr(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    kj::throwFatalException(kj::Exception(kj::Exception::Type::FAILED, __FILE__, __LINE__,
        kj::str("--ready-ca ", path, ": cannot open it: ", strerror(errno))));
  }
  kj::FdInputStream in((kj::AutoCloseFd(fd)));
  auto bytes = in.readAllBytes();
  return kj::heapString(bytes.asChars());
}

}  // namespace

kj::StringPtr readyStageName(ReadyStage stage) {
  switch (stage) {
    case ReadyStage::DNS: return "DNS";
    case ReadyStage::ROUTING: return "routing";
    case ReadyStage::SERVING: return "serving";
  }
  KJ_UNREACHABLE;
}

kj::Maybe<kj::String> readyResolverError(kj::StringPtr text) {
  if (edge::parseDotServer(text) == nullptr) {
    return kj::str("\"", text, "\" is not ip:port[#tls-name] (e.g. 1.1.1.1:853#cloudflare-dns.com)");
  }
  return nullptr;
}

ReadyProbe::ReadyProbe(kj::Timer& timer, kj::Network& network, const observe::Logger& logger,
                       const ReadyProbeConfig& config)
    : timer(timer), network(network), logger(logger), config(config),
      started(timer.now()), dnsVisibleAt(timer.now()) {
  if (config.resolvers.empty()) {
    for (auto text: DEFAULT_READY_RESOLVERS) {
      resolvers.add(KJ_ASSERT_NONNULL(edge::parseDotServer(text)));
    }
  } else {
    for (auto& text: config.resolvers) {
      KJ_IF_MAYBE(server, edge::parseDotServer(text)) {
        resolvers.add(kj::mv(*server));
      } else {
        kj::throwFatalException(kj::Exception(kj::Exception::Type::FAILED, __FILE__, __LINE__,
            kj::str("--ready-resolver ", KJ_ASSERT_NONNULL(readyResolverError(text)))));
      }
    }
  }
  kj::TlsContext::Options options;
  KJ_IF_MAYBE(path, config.caFile) {
    auto certificate = kj::heap<kj::TlsCertificate>(readPem(*path));
    options.useSystemTrustStore = false;
    options.trustedCertificates = kj::arrayPtr(certificate.get(), 1);
    tls = kj::heap<kj::TlsContext>(kj::mv(options));
    caCertificate = kj::mv(certificate);
  } else {
    tls = kj::heap<kj::TlsContext>(kj::mv(options));   // system trust store
  }
}

ReadyProbe::~ReadyProbe() noexcept(false) {}

kj::Duration ReadyProbe::nextDelay(kj::Duration delay) const {
  return kj::min(delay * 2, kj::max(config.maxBackoff, config.initialBackoff));
}

kj::String ReadyProbe::elapsed(kj::TimePoint since) const {
  auto ms = (timer.now() - since) / kj::MILLISECONDS;
  return kj::str(ms / 1000, '.', (ms % 1000) / 100, " s");
}

kj::Promise<void> ReadyProbe::run(kj::StringPtr hostnameParam, kj::StringPtr tokenParam) {
  if (!isDnsName(hostnameParam)) {
    // It goes into a DNS query and an HTTP request line: never anything but a DNS name.
    auto message = kj::str("DNS stage: the quick tunnel's hostname \"",
                           printable(hostnameParam), "\" is not a DNS name; nothing to probe");
    failed = ReadyFailure{ReadyStage::DNS, kj::heapString(message)};
    return kj::Exception(kj::Exception::Type::FAILED, __FILE__, __LINE__, kj::mv(message));
  }
  hostname = kj::str(hostnameParam);
  token = kj::str(tokenParam);
  started = timer.now();
  currentStage = ReadyStage::DNS;
  lastAnswer = kj::str("no answer yet");
  kj::Vector<kj::String> names;
  for (auto& r: resolvers) names.add(kj::str(r.address.toString(), '#', r.tlsName));
  logger.info("Waiting until the URL serves: asking public resolvers directly (never the system "
              "resolver), then the edge",
              observe::Fields().add("hostname", hostname)
                  .add("resolvers", kj::strArray(names, ",")).add("port", config.port));
  auto deadline = timer.afterDelay(config.timeout).then([this]() -> kj::Promise<void> {
    return timedOut();
  });
  return pollDns(config.initialBackoff).exclusiveJoin(kj::mv(deadline));
}

kj::Exception ReadyProbe::timedOut() {
  auto seconds = kj::str(config.timeout / kj::MILLISECONDS / 1000, '.',
                         (config.timeout / kj::MILLISECONDS % 1000) / 100, " s");
  kj::String message;
  if (currentStage == ReadyStage::DNS) {
    kj::Vector<kj::String> names;
    for (auto& r: resolvers) names.add(r.address.toString());
    message = kj::str("DNS stage: ", hostname, " did not resolve via ", kj::strArray(names, ", "),
                      " within ", seconds, " (last answer: ", lastAnswer, ")");
  } else {
    message = kj::str("routing stage: DNS for ", hostname, " was visible, but the edge did not "
                      "route it to this tunnel within ", seconds, " (last answer: ", lastAnswer,
                      ")");
  }
  failed = ReadyFailure{currentStage, kj::heapString(message)};
  return kj::Exception(kj::Exception::Type::FAILED, __FILE__, __LINE__, kj::mv(message));
}

kj::Promise<void> ReadyProbe::pollDns(kj::Duration delay) {
  return lookup().then([this, delay](kj::Array<kj::String> addresses) {
    return dnsAnswered(kj::mv(addresses), delay);
  });
}

kj::Promise<void> ReadyProbe::dnsAnswered(kj::Array<kj::String> addresses, kj::Duration delay) {
  if (addresses.size() > 0) {
    dnsVisibleAt = timer.now();
    currentStage = ReadyStage::ROUTING;
    lastAnswer = kj::str("no answer yet");
    logger.info(kj::str("DNS for ", hostname, " visible after ", elapsed(started)),
                observe::Fields().add("addresses", kj::strArray(addresses, ",")));
    return pollRoute(kj::mv(addresses), config.initialBackoff);
  }
  return timer.afterDelay(delay).then([this, delay]() { return pollDns(nextDelay(delay)); });
}

kj::Promise<kj::Array<kj::String>> ReadyProbe::lookup() {
  // A then AAAA from one resolver; the next poll asks the next resolver.
  auto& server = resolvers[nextResolver++ % resolvers.size()];
  return edge::queryAddressOverTls(timer, network, server, hostname, false,
                                   config.attemptTimeout, *tls)
      .then([this, &server](edge::AddressAnswer v4) { return lookupAaaa(server, kj::mv(v4)); })
      .catch_([this](kj::Exception&& e) -> kj::Array<kj::String> {
    lastAnswer = kj::str(e.getDescription());
    logger.debug("DNS-over-TLS query failed",
                 observe::Fields().add("hostname", hostname).add("error", lastAnswer.asPtr()));
    return nullptr;
  });
}

kj::Promise<kj::Array<kj::String>> ReadyProbe::lookupAaaa(const edge::DotServer& server,
                                                          edge::AddressAnswer v4) {
  return edge::queryAddressOverTls(timer, network, server, hostname, true,
                                   config.attemptTimeout, *tls)
      .then([this, v4 = kj::mv(v4)](edge::AddressAnswer v6) mutable {
    return addresses(kj::mv(v4), kj::mv(v6));
  });
}

kj::Array<kj::String> ReadyProbe::addresses(edge::AddressAnswer v4, edge::AddressAnswer v6) {
  // One of the two questions failed (no answer, a refused or garbled one; not NXDOMAIN/NODATA):
  // the name's addresses are not known yet, so ask both again rather than probing only the
  // family that answered (an A lost this way left only ::1 to probe, forever).
  // An NXDOMAIN next to the other family's addresses means the name was published between the
  // two questions (the A question answered before it existed): ask both again too.
  bool published = v4.addresses.size() > 0 || v6.addresses.size() > 0;
  for (auto answer: {&v4, &v6}) {
    if ((answer->error.size() > 0 && !answer->notFound) || (published && answer->nxdomain)) {
      lastAnswer = kj::str(answer->error);
      logger.debug("DNS answer incomplete; asking again",
                   observe::Fields().add("hostname", hostname).add("answer", lastAnswer.asPtr()));
      return nullptr;
    }
  }
  kj::Vector<kj::String> all;
  for (auto& a: v4.addresses) all.add(kj::mv(a));
  for (auto& a: v6.addresses) all.add(kj::mv(a));
  if (all.empty()) {
    lastAnswer = kj::str(v4.error.size() > 0 ? v4.error : v6.error);
    logger.debug("DNS not visible yet",
                 observe::Fields().add("hostname", hostname).add("answer", lastAnswer.asPtr()));
  }
  return all.releaseAsArray();
}

kj::Promise<void> ReadyProbe::pollRoute(kj::Array<kj::String> addresses, kj::Duration delay) {
  httpAnswered = false;
  auto& list = addresses;
  return tryAddresses(list, 0).then(
      [this, delay, addresses = kj::mv(addresses)](bool served) mutable {
    return routeAnswered(served, kj::mv(addresses), delay);
  });
}

kj::Promise<void> ReadyProbe::routeAnswered(bool served, kj::Array<kj::String> addresses,
                                            kj::Duration delay) {
  KJ_IF_MAYBE(f, fatal) {
    failed = ReadyFailure{ReadyStage::ROUTING, kj::heapString(*f)};
    return kj::Exception(kj::Exception::Type::FAILED, __FILE__, __LINE__, kj::heapString(*f));
  }
  if (served) {
    currentStage = ReadyStage::SERVING;
    logger.info(kj::str("edge routes ", hostname, " to this tunnel after ", elapsed(dnsVisibleAt)),
                observe::Fields().add("total", elapsed(started)));
    return kj::READY_NOW;
  }
  return timer.afterDelay(delay).then(
      [this, delay, addresses = kj::mv(addresses)]() mutable {
    return pollRoute(kj::mv(addresses), nextDelay(delay));
  });
}

kj::Promise<bool> ReadyProbe::tryAddresses(kj::ArrayPtr<const kj::String> addresses,
                                           size_t index) {
  if (index >= addresses.size()) return false;
  return tryAddress(addresses[index]).then([this, addresses, index](bool served) {
    if (served || fatal != nullptr) return kj::Promise<bool>(served);
    return tryAddresses(addresses, index + 1);
  });
}

kj::Promise<bool> ReadyProbe::tryAddress(kj::StringPtr address) {
  auto where = address.findFirst(':') != nullptr ? kj::str('[', address, "]:", config.port)
                                                 : kj::str(address, ':', config.port);
  auto attempt = network.parseAddress(where)
      .then([](kj::Own<kj::NetworkAddress> parsed) {
    return parsed->connect().attach(kj::mv(parsed));
  }).then([this, where = kj::heapString(where)](kj::Own<kj::AsyncIoStream> stream) mutable {
    return exchange(kj::mv(stream), kj::mv(where));
  });
  return timer.timeoutAfter(config.attemptTimeout, kj::mv(attempt))
      .catch_([this, where = kj::mv(where)](kj::Exception&& e) {
    if (!httpAnswered) lastAnswer = kj::str(where, ": ", printable(e.getDescription(), 300));
    logger.debug("Readiness request failed", observe::Fields().add("hostname", hostname)
                 .add("address", where.asPtr()).error(e));
    return false;
  });
}

struct ReadyProbe::Request {
  // One HTTPS request of the routing stage: the TLS stream, the response head read so far.
  kj::Own<kj::AsyncIoStream> stream;
  kj::String where;                    // "ip:port", for messages
  kj::String text;                     // the request bytes
  kj::Array<char> head = kj::heapArray<char>(MAX_RESPONSE_HEAD);
};

kj::Promise<bool> ReadyProbe::exchange(kj::Own<kj::AsyncIoStream> raw, kj::String where) {
  auto request = kj::heap<Request>();
  request->where = kj::mv(where);
  auto& r = *request;
  return tls->wrapClient(kj::mv(raw), hostname).then(
      [this, &r](kj::Own<kj::AsyncIoStream> stream) { return send(r, kj::mv(stream)); },
      [this, &r](kj::Exception&& e) { return handshakeFailed(r, kj::mv(e)); })
      .attach(kj::mv(request));
}

kj::Promise<bool> ReadyProbe::send(Request& r, kj::Own<kj::AsyncIoStream> stream) {
  r.stream = kj::mv(stream);
  r.text = kj::str("GET / HTTP/1.1\r\nHost: ", hostname, "\r\n", READY_PROBE_HEADER, ": ", token,
                   "\r\nUser-Agent: cfqt-ready-probe\r\nAccept: */*\r\nConnection: close\r\n\r\n");
  return r.stream->write(r.text.begin(), r.text.size()).then([&r]() {
    // One read usually holds the whole head; readHead() goes on to the blank line or the limit.
    return r.stream->tryRead(r.head.begin(), 12, r.head.size());
  }).then([&r](size_t n) {
    return readHead(*r.stream, r.head, n);
  }).then([this, &r](size_t total) { return judge(r, total); });
}

bool ReadyProbe::judge(Request& r, size_t headBytes) {
  httpAnswered = true;   // this answer says more than another address's connection error
  KJ_IF_MAYBE(answer, parseHead(r.head.slice(0, headBytes), token)) {
    if (answer->status == 200 && answer->tokenMatched) return true;
    lastAnswer = answer->tokenMatched || answer->status != 200
        ? kj::str(r.where, ": HTTP ", answer->status)
        : kj::str(r.where, ": HTTP ", answer->status, " without this tunnel's token");
  } else {
    lastAnswer = kj::str(r.where, ": not an HTTP answer");
  }
  return false;
}

bool ReadyProbe::handshakeFailed(Request& r, kj::Exception&& e) {
  // A certificate that does not verify will not start verifying: that ends the wait at once.
  auto text = printable(e.getDescription(), 400);
  if (containsIgnoreCase(text, "certificate") || containsIgnoreCase(text, "verify")) {
    fatal = kj::str("routing stage: the HTTPS answer for ", hostname, " at ", r.where,
                    " failed certificate verification (", text, "); its certificate does not "
                    "name ", hostname, " or is not signed by a trusted CA (--ready-ca FILE "
                    "sets the CA to trust)");
    return false;
  }
  if (!httpAnswered) lastAnswer = kj::str(r.where, ": TLS handshake failed: ", text);
  return false;
}

}  // namespace cfqt::tunnel
