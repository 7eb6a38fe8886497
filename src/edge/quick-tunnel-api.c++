#include "quick-tunnel-api.h"

#include "edge/json.h"
#include "observe/log.h"

#include <kj/compat/http.h>
#include <kj/compat/tls.h>
#include <kj/debug.h>
#include <kj/vector.h>

#ifndef CFQT_VERSION
#define CFQT_VERSION "0.0.0"
#endif

namespace cfqt::edge {

namespace {

constexpr kj::StringPtr ERROR_PREFIX = "quick tunnel request failed ("_kj;
constexpr size_t BODY_EXCERPT_BYTES = 200;

constexpr QuickTunnelErrorKind ALL_KINDS[] = {
  QuickTunnelErrorKind::RATE_LIMITED, QuickTunnelErrorKind::SERVER_ERROR,
  QuickTunnelErrorKind::NOT_JSON, QuickTunnelErrorKind::API_ERROR,
  QuickTunnelErrorKind::INVALID_RESPONSE, QuickTunnelErrorKind::TLS,
  QuickTunnelErrorKind::CONNECT, QuickTunnelErrorKind::TIMEOUT,
  QuickTunnelErrorKind::BAD_CONFIG,
};

char lower(char c) { return (c >= 'A' && c <= 'Z') ? c + ('a' - 'A') : c; }

bool containsIgnoringCase(kj::ArrayPtr<const kj::byte> haystack, kj::StringPtr needle) {
  if (needle.size() == 0) return true;
  if (haystack.size() < needle.size()) return false;
  for (size_t i = 0; i + needle.size() <= haystack.size(); i++) {
    size_t j = 0;
    while (j < needle.size() && lower(haystack[i + j]) == lower(needle[j])) ++j;
    if (j == needle.size()) return true;
  }
  return false;
}

kj::String excerpt(kj::ArrayPtr<const kj::byte> body) {
  // First 200 bytes, printable: control and non-ASCII bytes escaped.
  kj::Vector<char> out;
  auto head = body.slice(0, kj::min(body.size(), BODY_EXCERPT_BYTES));
  out.add('"');
  for (kj::byte b: head) {
    if (b == '\n') { out.addAll(kj::StringPtr("\\n")); }
    else if (b == '\r') { out.addAll(kj::StringPtr("\\r")); }
    else if (b == '\t') { out.addAll(kj::StringPtr("\\t")); }
    else if (b == '"' || b == '\\') { out.add('\\'); out.add(static_cast<char>(b)); }
    else if (b < 0x20 || b >= 0x7f) {
      const char* hex = "0123456789abcdef";
      out.add('\\'); out.add('x'); out.add(hex[b >> 4]); out.add(hex[b & 15]);
    } else {
      out.add(static_cast<char>(b));
    }
  }
  out.add('"');
  if (body.size() > head.size()) {
    out.addAll(kj::str(" (", body.size(), " bytes in all)"));
  }
  out.add('\0');
  return kj::String(out.releaseAsArray());
}

kj::Maybe<uint> hexValue(char c) {
  if (c >= '0' && c <= '9') return static_cast<uint>(c - '0');
  if (c >= 'a' && c <= 'f') return static_cast<uint>(c - 'a' + 10);
  if (c >= 'A' && c <= 'F') return static_cast<uint>(c - 'A' + 10);
  return nullptr;
}

kj::Maybe<int> base64Value(char c) {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return c - 'a' + 26;
  if (c >= '0' && c <= '9') return c - '0' + 52;
  if (c == '+') return 62;
  if (c == '/') return 63;
  return nullptr;
}

bool isCloudflareHtmlPage(kj::Maybe<kj::StringPtr> contentType,
                          kj::ArrayPtr<const kj::byte> body) {
  // Cloudflare's error pages (e.g. "Error 1015: You are being rate limited") are HTML mentioning
  // Cloudflare; the API itself always answers JSON.
  bool html = containsIgnoringCase(body, "<html") || containsIgnoringCase(body, "<!doctype html");
  KJ_IF_MAYBE(ct, contentType) {
    if (containsIgnoringCase(ct->asBytes(), "text/html")) html = true;
  }
  return html && containsIgnoringCase(body, "cloudflare");
}

kj::Maybe<kj::StringPtr> stringField(const JsonValue& object, kj::StringPtr key) {
  // A missing key and JSON null both give "" (as Go); any other non-string type is null.
  KJ_IF_MAYBE(v, object.get(key)) {
    if (v->kind == JsonValue::Kind::STRING) return v->string.asPtr();
    if (v->kind == JsonValue::Kind::NUL) return ""_kj;
    return nullptr;
  }
  return ""_kj;
}

kj::String formatErrorCode(double number) {
  // Integral codes print as integers; anything else (1.5, 1e400 = inf, NaN, beyond int64) as the
  // double it is -- casting those to an integer would be undefined behaviour.
  constexpr double LIMIT = 9223372036854775808.0;  // 2^63
  if (number >= -LIMIT && number < LIMIT && number == static_cast<double>(
          static_cast<long long>(number))) {
    return kj::str(static_cast<long long>(number));
  }
  return kj::str(number);
}

kj::String describeApiErrors(const JsonValue& top) {
  kj::Vector<kj::String> parts;
  KJ_IF_MAYBE(errors, top.getIgnoringCase("errors")) {
    if (errors->kind == JsonValue::Kind::ARRAY) {
      for (auto& item: errors->array) {
        if (item.kind != JsonValue::Kind::OBJECT) continue;
        kj::String code = kj::str("?");
        KJ_IF_MAYBE(c, item.getIgnoringCase("code")) {
          if (c->kind == JsonValue::Kind::NUMBER) {
            code = formatErrorCode(c->number);
          } else if (c->kind == JsonValue::Kind::STRING) {
            code = kj::str(c->string);
          }
        }
        kj::StringPtr message = "(no message)";
        KJ_IF_MAYBE(m, item.getIgnoringCase("message")) {
          if (m->kind == JsonValue::Kind::STRING) message = m->string;
        }
        parts.add(kj::str("error ", code, ": ", message));
      }
    }
  }
  if (parts.size() == 0) return kj::str("no errors[] given");
  return kj::strArray(parts, "; ");
}

bool hasApiErrors(const JsonValue& top) {
  KJ_IF_MAYBE(errors, top.getIgnoringCase("errors")) {
    if (errors->kind == JsonValue::Kind::ARRAY && errors->array.size() > 0) return true;
  }
  KJ_IF_MAYBE(success, top.getIgnoringCase("success")) {
    if (success->kind == JsonValue::Kind::BOOL && !success->boolean) return true;
  }
  return false;
}

QuickTunnelError error(QuickTunnelErrorKind kind, kj::String message) {
  return QuickTunnelError{kind, kj::mv(message)};
}

// ---------------------------------------------------------------------------------------------

struct ServiceUrl {
  bool tls;
  kj::String authority;   // host[:port] as written (Host header)
  kj::String host;        // without port or brackets (TLS name)
  kj::String target;      // request target: <base path>/tunnel
  kj::String display;     // <service>/tunnel, for messages
};

kj::Maybe<ServiceUrl> parseServiceUrl(kj::StringPtr url) {
  ServiceUrl result;
  kj::StringPtr rest;
  if (url.startsWith("https://")) {
    result.tls = true;
    rest = url.slice(8);
  } else if (url.startsWith("http://")) {
    result.tls = false;
    rest = url.slice(7);
  } else {
    return nullptr;
  }
  for (char c: rest) {
    if (c <= ' ' || c == '?' || c == '#' || c == '@' || c == '\\' || c == 0x7f) return nullptr;
  }
  kj::StringPtr path = "";
  kj::String authority;
  KJ_IF_MAYBE(slash, rest.findFirst('/')) {
    authority = kj::heapString(rest.slice(0, *slash));
    path = rest.slice(*slash);
  } else {
    authority = kj::heapString(rest);
  }
  if (authority.size() == 0) return nullptr;
  if (authority.startsWith("[")) {
    KJ_IF_MAYBE(close, authority.findFirst(']')) {
      result.host = kj::heapString(authority.slice(1, *close));
      if (*close + 1 < authority.size() && authority[*close + 1] != ':') return nullptr;
    } else {
      return nullptr;
    }
  } else {
    KJ_IF_MAYBE(colon, authority.findFirst(':')) {
      result.host = kj::heapString(authority.slice(0, *colon));
    } else {
      result.host = kj::heapString(authority);
    }
  }
  if (result.host.size() == 0) return nullptr;
  size_t pathEnd = path.size();
  while (pathEnd > 0 && path[pathEnd - 1] == '/') --pathEnd;
  result.target = kj::str(path.slice(0, pathEnd), "/tunnel");
  result.display = kj::str(result.tls ? "https://" : "http://", authority, result.target);
  result.authority = kj::mv(authority);
  return kj::mv(result);
}

kj::Promise<kj::Array<kj::byte>> readUpTo(kj::AsyncInputStream& in, size_t limit,
                                          kj::Vector<kj::byte> sofar = {}) {
  // Reads until EOF or `limit` bytes, whichever comes first.
  if (sofar.size() >= limit) return sofar.releaseAsArray();
  size_t chunk = kj::min(limit - sofar.size(), size_t(4096));
  auto buffer = kj::heapArray<kj::byte>(chunk);
  auto ptr = buffer.begin();
  return in.tryRead(ptr, 1, chunk)
      .then([&in, limit, sofar = kj::mv(sofar), buffer = kj::mv(buffer)](size_t n) mutable
            -> kj::Promise<kj::Array<kj::byte>> {
    if (n == 0) return sofar.releaseAsArray();
    sofar.addAll(buffer.slice(0, n));
    return readUpTo(in, limit, kj::mv(sofar));
  });
}

bool isRetryable(const kj::Exception& e) {
  KJ_IF_MAYBE(kind, quickTunnelErrorKind(e)) {
    return *kind == QuickTunnelErrorKind::CONNECT || *kind == QuickTunnelErrorKind::TIMEOUT ||
           *kind == QuickTunnelErrorKind::SERVER_ERROR;
  }
  return false;
}

kj::String reasonOf(const kj::Exception& e) {
  return kj::str(e.getDescription());
}

// One call of requestQuickTunnel(): owns the config, the TLS context and the current attempt.
class QuickTunnelRequest {
public:
  QuickTunnelRequest(kj::Timer& timer, kj::Network& network, QuickTunnelApiConfig configParam,
                     ServiceUrl urlParam)
      : timer(timer), network(network), config(kj::mv(configParam)), url(kj::mv(urlParam)) {}

  kj::Promise<QuickTunnel> run(uint attempt) {
    return timer.timeoutAfter(config.timeout, kj::evalNow([this]() { return attemptOnce(); }))
        .catch_([this](kj::Exception&& e) { return classifyAttemptFailure(kj::mv(e)); })
        .catch_([this, attempt](kj::Exception&& e) { return retryOrFail(attempt, kj::mv(e)); });
  }

private:
  kj::Timer& timer;
  kj::Network& network;
  QuickTunnelApiConfig config;
  ServiceUrl url;
  kj::HttpHeaderTable headerTable;   // builtin headers only; private because this client is
                                     // one-shot and sets everything else by name
  kj::Own<kj::TlsContext> tlsContext;          // created on the first https attempt

  // State of the current attempt (null between attempts), in lifetime order.
  kj::Own<kj::NetworkAddress> address;
  kj::Own<kj::AsyncIoStream> stream;
  kj::Own<kj::HttpClient> client;
  kj::Own<kj::HttpHeaders> requestHeaders;

  kj::String hostPort() {
    uint16_t defaultPort = url.tls ? 443 : 80;
    if (url.authority.startsWith("[")) {
      return url.authority.endsWith("]") ? kj::str(url.authority, ':', defaultPort)
                                         : kj::str(url.authority);
    }
    return url.authority.findFirst(':') == nullptr ? kj::str(url.authority, ':', defaultPort)
                                                   : kj::str(url.authority);
  }

  kj::Promise<QuickTunnel> attemptOnce() {
    requestHeaders = nullptr;
    client = nullptr;
    stream = nullptr;
    address = nullptr;
    return network.parseAddress(url.authority, url.tls ? 443 : 80)
        .then([this](kj::Own<kj::NetworkAddress> addr) { return connect(kj::mv(addr)); },
              [this](kj::Exception&& e) -> kj::Promise<QuickTunnel> {
      return makeQuickTunnelException(error(QuickTunnelErrorKind::CONNECT,
          kj::str("cannot resolve ", url.host, " (", url.display, "): ", reasonOf(e),
                  "; check the network/DNS or --quick-service")));
    });
  }

  kj::Promise<QuickTunnel> connect(kj::Own<kj::NetworkAddress> addr) {
    auto& ref = *addr;
    address = kj::mv(addr);
    return ref.connect().then(
        [this](kj::Own<kj::AsyncIoStream> s) { return startTls(kj::mv(s)); },
        [this](kj::Exception&& e) -> kj::Promise<QuickTunnel> {
      return makeQuickTunnelException(error(QuickTunnelErrorKind::CONNECT,
          kj::str("cannot connect to ", hostPort(), " (", url.display, "): ", reasonOf(e),
                  "; check the network, a firewall, or --quick-service")));
    });
  }

  kj::Promise<QuickTunnel> startTls(kj::Own<kj::AsyncIoStream> s) {
    if (!url.tls) return sendRequest(kj::mv(s));
    if (tlsContext.get() == nullptr) {
      tlsContext = kj::heap<kj::TlsContext>();   // system trust store (honours SSL_CERT_FILE)
    }
    return tlsContext->wrapClient(kj::mv(s), url.host).then(
        [this](kj::Own<kj::AsyncIoStream> s) { return sendRequest(kj::mv(s)); },
        [this](kj::Exception&& e) -> kj::Promise<QuickTunnel> {
      return makeQuickTunnelException(error(QuickTunnelErrorKind::TLS,
          kj::str("TLS handshake with ", url.host, " (", hostPort(), ") failed: ", reasonOf(e),
                  "; the certificate could not be verified against the system trust store "
                  "(SSL_CERT_FILE/SSL_CERT_DIR) or the server does not speak TLS")));
    });
  }

  kj::Promise<QuickTunnel> sendRequest(kj::Own<kj::AsyncIoStream> s) {
    auto& ref = *s;
    stream = kj::mv(s);
    client = kj::newHttpClient(headerTable, ref);
    requestHeaders = kj::heap<kj::HttpHeaders>(headerTable);
    auto& headers = *requestHeaders;
    headers.set(kj::HttpHeaderId::HOST, url.authority);
    headers.add("User-Agent", config.userAgent);
    headers.set(kj::HttpHeaderId::CONTENT_TYPE, "application/json");
    auto request = client->request(kj::HttpMethod::POST, url.target, headers, uint64_t(0));
    request.body = nullptr;   // no body: Content-Length: 0, ends the request
    return request.response.then([this](kj::HttpClient::Response&& response) {
      return readResponse(kj::mv(response));
    });
  }

  kj::Promise<QuickTunnel> readResponse(kj::HttpClient::Response&& response) {
    uint status = response.statusCode;
    kj::Maybe<kj::String> contentType;
    KJ_IF_MAYBE(ct, response.headers->get(kj::HttpHeaderId::CONTENT_TYPE)) {
      contentType = kj::str(*ct);
    }
    auto& body = *response.body;
    return readUpTo(body, config.maxBodyBytes).attach(kj::mv(response.body))
        .then([this, status, contentType = kj::mv(contentType)](kj::Array<kj::byte> bytes) mutable {
      return finish(status, kj::mv(contentType), kj::mv(bytes));
    });
  }

  kj::Promise<QuickTunnel> finish(uint status, kj::Maybe<kj::String> contentType,
                                  kj::Array<kj::byte> body) {
    if (status >= 500 && status <= 599) {
      return makeQuickTunnelException(error(QuickTunnelErrorKind::SERVER_ERROR,
          kj::str(url.display, " answered HTTP ", status, " (server error): ", excerpt(body),
                  "; the service has a problem, try again later")));
    }
    auto result = decodeQuickTunnelResponse(
        status, contentType.map([](kj::String& s) -> kj::StringPtr { return s; }), body);
    KJ_SWITCH_ONEOF(result) {
      KJ_CASE_ONEOF(tunnel, QuickTunnel) {
        return kj::mv(tunnel);
      }
      KJ_CASE_ONEOF(e, QuickTunnelError) {
        return makeQuickTunnelException(kj::mv(e));
      }
    }
    KJ_UNREACHABLE;
  }

  kj::Promise<QuickTunnel> classifyAttemptFailure(kj::Exception&& e) {
    if (quickTunnelErrorKind(e) != nullptr) return kj::mv(e);
    if (e.getType() == kj::Exception::Type::OVERLOADED &&
        (e.getDescription() == "operation timed out"_kj ||
         e.getDescription().startsWith("timed out"))) {
      return makeQuickTunnelException(error(QuickTunnelErrorKind::TIMEOUT,
          kj::str("no answer from ", url.display, " within ", config.timeout / kj::MILLISECONDS,
                  " ms; check the network or try again later")));
    }
    return makeQuickTunnelException(error(QuickTunnelErrorKind::CONNECT,
        kj::str("connection to ", hostPort(), " (", url.display, ") failed during the request: ",
                reasonOf(e), "; check the network or try again later")));
  }

  kj::Promise<QuickTunnel> retryOrFail(uint attempt, kj::Exception&& e) {
    if (!isRetryable(e) || attempt >= config.retryBackoffs.size()) {
      requestHeaders = nullptr;
      client = nullptr;
      stream = nullptr;
      return kj::mv(e);
    }
    observe::logWarn("Quick tunnel request failed; retrying", observe::Fields()
        .add("attempt", attempt + 1).add("wait", config.retryBackoffs[attempt])
        .add("service", url.display).error(e));
    return timer.afterDelay(config.retryBackoffs[attempt]).then([this, attempt]() {
      return run(attempt + 1);
    });
  }
};

}  // namespace

kj::StringPtr cfqtVersion() {
  return CFQT_VERSION;
}

kj::String defaultUserAgent() {
  return kj::str("cloudflared/", MIRRORED_CLOUDFLARED_VERSION, " cfqt/", cfqtVersion());
}

kj::StringPtr KJ_STRINGIFY(QuickTunnelErrorKind kind) {
  switch (kind) {
    case QuickTunnelErrorKind::RATE_LIMITED: return "rate-limited";
    case QuickTunnelErrorKind::SERVER_ERROR: return "server-error";
    case QuickTunnelErrorKind::NOT_JSON: return "not-json";
    case QuickTunnelErrorKind::API_ERROR: return "api-error";
    case QuickTunnelErrorKind::INVALID_RESPONSE: return "invalid-response";
    case QuickTunnelErrorKind::TLS: return "tls";
    case QuickTunnelErrorKind::CONNECT: return "connect";
    case QuickTunnelErrorKind::TIMEOUT: return "timeout";
    case QuickTunnelErrorKind::BAD_CONFIG: return "bad-config";
  }
  return "unknown";
}

kj::Maybe<QuickTunnelErrorKind> quickTunnelErrorKind(const kj::Exception& e) {
  auto d = e.getDescription();
  if (!d.startsWith(ERROR_PREFIX)) return nullptr;
  auto rest = d.slice(ERROR_PREFIX.size());
  for (auto kind: ALL_KINDS) {
    auto tag = kj::str(kind);
    if (rest.startsWith(tag) && rest.slice(tag.size()).startsWith("): ")) return kind;
  }
  return nullptr;
}

kj::Exception makeQuickTunnelException(QuickTunnelError error) {
  auto type = kj::Exception::Type::FAILED;
  switch (error.kind) {
    case QuickTunnelErrorKind::RATE_LIMITED:
    case QuickTunnelErrorKind::SERVER_ERROR:
    case QuickTunnelErrorKind::TIMEOUT:
      type = kj::Exception::Type::OVERLOADED;
      break;
    case QuickTunnelErrorKind::CONNECT:
      type = kj::Exception::Type::DISCONNECTED;
      break;
    default:
      break;
  }
  return kj::Exception(type, __FILE__, __LINE__,
                       kj::str(ERROR_PREFIX, error.kind, "): ", error.message));
}

kj::Maybe<kj::Array<kj::byte>> parseUuid(kj::StringPtr text) {
  // Go's github.com/google/uuid Parse: 36 (canonical), 38 ({...}), 45 (urn:uuid:...), 32 (hex).
  kj::ArrayPtr<const char> s = text;
  if (s.size() == 45) {
    auto prefix = s.slice(0, 9);
    for (size_t i = 0; i < 9; i++) {
      if (lower(prefix[i]) != "urn:uuid:"[i]) return nullptr;
    }
    s = s.slice(9, 45);
  } else if (s.size() == 38) {
    if (s[0] != '{' || s[37] != '}') return nullptr;
    s = s.slice(1, 37);
  }
  auto bytes = kj::heapArray<kj::byte>(16);
  if (s.size() == 36) {
    if (s[8] != '-' || s[13] != '-' || s[18] != '-' || s[23] != '-') return nullptr;
    static constexpr uint OFFSETS[16] = {0, 2, 4, 6, 9, 11, 14, 16, 19, 21, 24, 26, 28, 30, 32, 34};
    for (uint i = 0; i < 16; i++) {
      auto hi = hexValue(s[OFFSETS[i]]);
      auto lo = hexValue(s[OFFSETS[i] + 1]);
      if (hi == nullptr || lo == nullptr) return nullptr;
      bytes[i] = (KJ_ASSERT_NONNULL(hi) << 4) | KJ_ASSERT_NONNULL(lo);
    }
    return kj::mv(bytes);
  } else if (s.size() == 32 && text.size() == 32) {
    for (uint i = 0; i < 16; i++) {
      auto hi = hexValue(s[2 * i]);
      auto lo = hexValue(s[2 * i + 1]);
      if (hi == nullptr || lo == nullptr) return nullptr;
      bytes[i] = (KJ_ASSERT_NONNULL(hi) << 4) | KJ_ASSERT_NONNULL(lo);
    }
    return kj::mv(bytes);
  }
  return nullptr;
}

kj::String formatUuid(kj::ArrayPtr<const kj::byte> bytes) {
  KJ_REQUIRE(bytes.size() == 16, "a UUID has 16 bytes");
  const char* hex = "0123456789abcdef";
  kj::Vector<char> out(37);
  for (uint i = 0; i < 16; i++) {
    if (i == 4 || i == 6 || i == 8 || i == 10) out.add('-');
    out.add(hex[bytes[i] >> 4]);
    out.add(hex[bytes[i] & 15]);
  }
  out.add('\0');
  return kj::String(out.releaseAsArray());
}

kj::Maybe<kj::Array<kj::byte>> decodeStdBase64Padded(kj::StringPtr text) {
  kj::Vector<char> clean(text.size());
  for (char c: text) {
    if (c == '\r' || c == '\n') continue;   // Go's decoder skips these
    clean.add(c);
  }
  if (clean.size() % 4 != 0) return nullptr;
  kj::Vector<kj::byte> out(clean.size() / 4 * 3);
  for (size_t i = 0; i < clean.size(); i += 4) {
    int v[4];
    uint pad = 0;
    for (uint j = 0; j < 4; j++) {
      char c = clean[i + j];
      if (c == '=') {
        // Padding only in the last quantum, only in positions 2 and 3, and contiguous.
        if (i + 4 != clean.size() || j < 2) return nullptr;
        ++pad;
        v[j] = 0;
      } else {
        if (pad > 0) return nullptr;
        KJ_IF_MAYBE(x, base64Value(c)) { v[j] = *x; } else { return nullptr; }
      }
    }
    uint32_t triple = (v[0] << 18) | (v[1] << 12) | (v[2] << 6) | v[3];
    out.add(triple >> 16);
    if (pad < 2) out.add((triple >> 8) & 0xff);
    if (pad < 1) out.add(triple & 0xff);
  }
  return out.releaseAsArray();
}

bool isQuickTunnelHostname(kj::StringPtr text) {
  kj::StringPtr name = text.startsWith("https://") ? text.slice(strlen("https://")) : text;
  if (name.size() == 0 || name.size() > 253) return false;
  size_t label = 0;
  for (size_t i = 0; i < name.size(); i++) {
    char c = name[i];
    if (c == '.') {
      if (label == 0 || name[i - 1] == '-') return false;
      label = 0;
      continue;
    }
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              (c == '-' && label > 0);
    if (!ok || ++label > 63) return false;
  }
  return label > 0 && name[name.size() - 1] != '-';
}

kj::OneOf<QuickTunnel, QuickTunnelError> decodeQuickTunnelResponse(
    uint status, kj::Maybe<kj::StringPtr> contentType, kj::ArrayPtr<const kj::byte> body) {
  // A 5xx Cloudflare page is a server error (the caller retries those before decoding).
  if (status == 429 || (status < 500 && isCloudflareHtmlPage(contentType, body))) {
    return error(QuickTunnelErrorKind::RATE_LIMITED,
        kj::str("rate limited by trycloudflare.com; wait a few minutes and retry (HTTP ", status,
                status == 429 ? ")" : ", Cloudflare error page instead of JSON)"));
  }
  JsonValue top;
  KJ_IF_MAYBE(parsed, parseJson(body)) {
    top = kj::mv(*parsed);
  } else {
    return error(QuickTunnelErrorKind::NOT_JSON,
        kj::str("the quick-tunnel service answered HTTP ", status,
                " with a body that is not JSON: ", excerpt(body),
                "; is --quick-service pointing at the right server?"));
  }
  if (top.kind != JsonValue::Kind::OBJECT) {
    return error(QuickTunnelErrorKind::INVALID_RESPONSE,
        kj::str("the quick-tunnel service answered HTTP ", status,
                " with JSON that is not an object: ", excerpt(body)));
  }

  kj::Maybe<const JsonValue&> result = top.getIgnoringCase("result");
  KJ_IF_MAYBE(r, result) {
    if (r->kind == JsonValue::Kind::NUL) result = nullptr;
  }
  bool haveId = false;
  KJ_IF_MAYBE(r, result) {
    KJ_IF_MAYBE(id, r->get("id")) {
      haveId = id->kind == JsonValue::Kind::STRING && id->string.size() > 0;
    }
  }
  if (!haveId && hasApiErrors(top)) {
    return error(QuickTunnelErrorKind::API_ERROR,
        kj::str("trycloudflare.com refused to create a tunnel (HTTP ", status, "): ",
                describeApiErrors(top)));
  }
  const JsonValue* r;
  KJ_IF_MAYBE(x, result) {
    r = x;
  } else {
    return error(QuickTunnelErrorKind::INVALID_RESPONSE,
        kj::str("the quick-tunnel service answered HTTP ", status, " without a result: ",
                excerpt(body)));
  }
  if (r->kind != JsonValue::Kind::OBJECT) {
    return error(QuickTunnelErrorKind::INVALID_RESPONSE,
        kj::str("the quick-tunnel service answered HTTP ", status,
                " with a result that is not an object: ", excerpt(body)));
  }

  QuickTunnel tunnel;
  kj::StringPtr idText, secretText, hostname, accountTag;
  KJ_IF_MAYBE(v, stringField(*r, "id")) { idText = *v; } else {
    return error(QuickTunnelErrorKind::INVALID_RESPONSE, kj::str("result.id is not a string"));
  }
  KJ_IF_MAYBE(v, stringField(*r, "secret")) { secretText = *v; } else {
    return error(QuickTunnelErrorKind::INVALID_RESPONSE,
                 kj::str("result.secret is not a string"));
  }
  KJ_IF_MAYBE(v, stringField(*r, "hostname")) { hostname = *v; } else {
    return error(QuickTunnelErrorKind::INVALID_RESPONSE,
                 kj::str("result.hostname is not a string"));
  }
  KJ_IF_MAYBE(v, stringField(*r, "account_tag")) { accountTag = *v; } else {
    return error(QuickTunnelErrorKind::INVALID_RESPONSE,
                 kj::str("result.account_tag is not a string"));
  }

  if (idText.size() == 0) {
    return error(QuickTunnelErrorKind::INVALID_RESPONSE,
        kj::str("the quick-tunnel service answered HTTP ", status, " without result.id: ",
                excerpt(body)));
  }
  KJ_IF_MAYBE(bytes, parseUuid(idText)) {
    tunnel.tunnelId = kj::mv(*bytes);
    tunnel.id = formatUuid(tunnel.tunnelId);
  } else {
    return error(QuickTunnelErrorKind::INVALID_RESPONSE,
        kj::str("result.id ", excerpt(idText.asBytes()), " is not a UUID"));
  }
  // The secret's text is never put into a message.
  if (secretText.size() == 0) {
    return error(QuickTunnelErrorKind::INVALID_RESPONSE,
                 kj::str("result.secret is missing or empty"));
  }
  KJ_IF_MAYBE(bytes, decodeStdBase64Padded(secretText)) {
    tunnel.secret = kj::mv(*bytes);
  } else {
    return error(QuickTunnelErrorKind::INVALID_RESPONSE,
        kj::str("result.secret is not padded standard base64 (", secretText.size(),
                " characters)"));
  }
  if (tunnel.secret.size() == 0) {
    return error(QuickTunnelErrorKind::INVALID_RESPONSE, kj::str("result.secret is empty"));
  }
  if (hostname.size() == 0) {
    return error(QuickTunnelErrorKind::INVALID_RESPONSE,
                 kj::str("result.hostname is missing or empty"));
  }
  if (!isQuickTunnelHostname(hostname)) {
    // Never echoed: it may hold terminal escapes or anything else a bad service sends.
    return error(QuickTunnelErrorKind::INVALID_RESPONSE,
        kj::str("result.hostname is not a DNS name (", hostname.size(), " bytes; want letters, "
                "digits and '-' in dot-separated labels of 1-63 characters); not using it"));
  }
  tunnel.hostname = kj::str(hostname);
  tunnel.accountTag = kj::str(accountTag);
  return kj::mv(tunnel);
}

kj::Promise<QuickTunnel> requestQuickTunnel(
    kj::Timer& timer, kj::Network& network, QuickTunnelApiConfig config) {
  ServiceUrl url;
  KJ_IF_MAYBE(u, parseServiceUrl(config.serviceUrl)) {
    url = kj::mv(*u);
  } else {
    return makeQuickTunnelException(error(QuickTunnelErrorKind::BAD_CONFIG,
        kj::str("--quick-service ", excerpt(config.serviceUrl.asBytes()),
                " is not an http:// or https:// URL")));
  }
  auto request = kj::heap<QuickTunnelRequest>(timer, network, kj::mv(config), kj::mv(url));
  auto promise = request->run(0);
  return promise.attach(kj::mv(request));
}

}  // namespace cfqt::edge
