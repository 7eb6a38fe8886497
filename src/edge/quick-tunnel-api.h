#pragma once
// Client for the trycloudflare quick-tunnel API (PROTOCOL.md §1): `POST {service}/tunnel` over
// kj-http (plain http:// or https:// through kj-tls with the system trust store, which honours
// SSL_CERT_FILE), the response decoded the way cloudflared's Go code decodes it (§1.3), and every
// failure turned into a kj::Exception whose description a user can act on.

#include <kj/async-io.h>
#include <kj/one-of.h>
#include <kj/string.h>
#include <kj/time.h>

namespace cfqt::edge {

using kj::uint;

constexpr kj::StringPtr DEFAULT_QUICK_SERVICE = "https://api.trycloudflare.com"_kj;
// The default `--quick-service` value; the request goes to `<service>/tunnel`.

constexpr kj::StringPtr MIRRORED_CLOUDFLARED_VERSION = "2026.8.2"_kj;
// The cloudflared release whose edge-facing identity cfqt mirrors.

kj::StringPtr cfqtVersion();
// cfqt's own version ("0.1.0"), from the CMake project version.

kj::String defaultUserAgent();
// "cloudflared/2026.8.2 cfqt/<version>".

struct QuickTunnel {
  kj::String id;                   // canonical lowercase UUID text, e.g. "3f1c...-..."
  kj::Array<kj::byte> tunnelId;    // the same UUID as 16 raw bytes (registerConnection tunnelId)
  kj::String accountTag;           // TunnelAuth.accountTag
  kj::Array<kj::byte> secret;      // TunnelAuth.tunnelSecret, decoded; NEVER log it
  kj::String hostname;             // "<words>.trycloudflare.com"; local only (banner, /quicktunnel)
};

struct QuickTunnelApiConfig {
  kj::String serviceUrl = kj::str(DEFAULT_QUICK_SERVICE);
  // `--quick-service`: http:// or https:// base URL; "/tunnel" is appended (a trailing '/' of the
  // base is dropped first). https:// hosts must be names (kj-tls verifies by hostname).

  kj::String userAgent = defaultUserAgent();
  // `--user-agent`.

  kj::Duration timeout = 15 * kj::SECONDS;
  // Per attempt: connect + TLS handshake + response headers + body.

  kj::Array<kj::Duration> retryBackoffs =
      kj::arr(1 * kj::SECONDS, 2 * kj::SECONDS, 4 * kj::SECONDS);
  // One retry per entry, after waiting that long. Retried: network errors (refused, reset,
  // unreachable, DNS failure of the service host, timeout) and HTTP 5xx. Never retried: TLS
  // verification failures, 429/rate limiting, 4xx, malformed bodies.

  size_t maxBodyBytes = 64 * 1024;
  // Larger response bodies are cut off there (and then usually fail to parse as JSON).
};

enum class QuickTunnelErrorKind {
  RATE_LIMITED,      // HTTP 429, or a Cloudflare HTML error page instead of JSON
  SERVER_ERROR,      // HTTP 5xx after all retries
  NOT_JSON,          // body is not JSON: message has the status and the first 200 bytes
  API_ERROR,         // success:false / errors[] and no usable result: message lists code: message
  INVALID_RESPONSE,  // JSON, but result.id is missing / not a UUID, or the secret is not base64
  TLS,               // TLS handshake or certificate verification failed: message names the host
  CONNECT,           // connection refused / unreachable / service host does not resolve
  TIMEOUT,           // no complete answer within `timeout`
  BAD_CONFIG,        // serviceUrl is not a usable http(s) URL
};

kj::StringPtr KJ_STRINGIFY(QuickTunnelErrorKind kind);
// "rate-limited", "server-error", "not-json", "api-error", "invalid-response", "tls", "connect",
// "timeout", "bad-config".

kj::Maybe<QuickTunnelErrorKind> quickTunnelErrorKind(const kj::Exception& e);
// Classifies an exception rejected by requestQuickTunnel(). Its description always reads
// "quick tunnel request failed (<kind>): <actionable message>". Null for other exceptions.

kj::Promise<QuickTunnel> requestQuickTunnel(
    kj::Timer& timer, kj::Network& network, QuickTunnelApiConfig config);
// Requests a new quick tunnel, as cloudflared HEAD does (§1.2): POST <service>/tunnel, no body
// (Content-Length: 0), Content-Type: application/json, User-Agent: config.userAgent,
// Accept-Encoding: gzip is NOT sent (kj-http does not decode gzip). No proxy.
//
// `timer` and `network` must outlive the returned promise. The exception type of a rejection is
// OVERLOADED for RATE_LIMITED/TIMEOUT/SERVER_ERROR, DISCONNECTED for CONNECT, FAILED otherwise;
// quickTunnelErrorKind() gives the precise kind. A fresh kj::TlsContext (system trust store,
// i.e. SSL_CERT_FILE / SSL_CERT_DIR if set) is created per call.

// ---------------------------------------------------------------------------------------------
// Pieces exposed for unit tests and the emulator.

struct QuickTunnelError {
  QuickTunnelErrorKind kind;
  kj::String message;   // the actionable text (without the "quick tunnel request failed" prefix)
};

kj::Exception makeQuickTunnelException(QuickTunnelError error);
// Builds the exception requestQuickTunnel() rejects with.

kj::OneOf<QuickTunnel, QuickTunnelError> decodeQuickTunnelResponse(
    uint status, kj::Maybe<kj::StringPtr> contentType, kj::ArrayPtr<const kj::byte> body);
// Decodes one complete HTTP response from the API (§1.3). Never throws on bad input. 5xx is not
// special here (the caller retries it first); 429 and Cloudflare HTML pages with a status below
// 500 give RATE_LIMITED.

bool isQuickTunnelHostname(kj::StringPtr text);
// A DNS host name (letters, digits, '-' inside dot-separated labels of 1-63 characters, at most
// 253 in all, no trailing dot), optionally after "https://" as cloudflared accepts it. The
// API's hostname is printed, logged and put in URLs: anything else is refused, never shown.

kj::Maybe<kj::Array<kj::byte>> parseUuid(kj::StringPtr text);
// Any form Go's uuid.Parse accepts: canonical 36 chars, "urn:uuid:" prefix, braces, 32 hex
// digits. Null on anything else.

kj::String formatUuid(kj::ArrayPtr<const kj::byte> bytes);
// Canonical lowercase 8-4-4-4-12 text of 16 bytes.

kj::Maybe<kj::Array<kj::byte>> decodeStdBase64Padded(kj::StringPtr text);
// RFC 4648 standard alphabet with '=' padding, as Go's base64.StdEncoding (CR/LF ignored).
// Null on any other character or missing/misplaced padding (non-zero trailing bits are accepted,
// as in Go's non-strict decoder).

}  // namespace cfqt::edge
