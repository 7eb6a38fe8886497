// The origin layer: serves one data stream (ConnectRequest + stream bytes) against the local
// origin service and writes the ConnectResponse plus the response bytes back (PROTOCOL.md §6,
// §9). Knows nothing of QUIC: the stream is any kj::AsyncIoStream positioned right after the
// ConnectRequest.

#pragma once

#include "wire/http-metadata.h"
#include "wire/quic_metadata_protocol.capnp.h"

#include <kj/async-io.h>
#include <kj/one-of.h>
#include <kj/string.h>
#include <kj/time.h>
#include <kj/timer.h>

namespace kj {
class HttpHeaderTable;
}

namespace cfqt::origin {

enum class OriginKind {
  HTTP,         // http://host:port
  HTTPS,        // https://host:port, certificate verified (system store or caPool)
  UNIX,         // HTTP/1.1 over a unix socket (`unix:/path`, `--unix-socket`)
  UNIX_TLS,     // HTTPS over a unix socket (`unix+tls:/path`), verified as HTTPS; the TLS name
                // is originServerName, else the request's host (cloudflared's Go transport)
  HELLO_WORLD,  // built-in test origin, served in-process
  HTTP_STATUS,  // `http_status:NNN`: answers NNN with an empty body
  HANDLER,      // in-process: each request goes to `OriginConfig::handler` (in-process.h)
};

class InProcessHandler;

struct OriginConfig {
  OriginKind kind = OriginKind::HTTP;
  kj::String host;       // HTTP/HTTPS: host name or IP literal, without [] brackets
  kj::uint port = 80;        // HTTP/HTTPS
  kj::String unixPath;   // UNIX, UNIX_TLS
  kj::uint status = 503;     // HTTP_STATUS
  kj::Maybe<InProcessHandler&> handler;    // HANDLER: borrowed, outlives the Origin

  kj::Maybe<kj::String> httpHostHeader;    // --http-host-header: Host sent to the origin
  kj::Maybe<kj::String> connectorId;       // sent as Cf-Warp-Tag-Id (§9.2), the connector UUID
  kj::Maybe<kj::String> originServerName;  // --origin-server-name: TLS name (default `host`)
  kj::Maybe<kj::String> caPool;            // --origin-ca-pool: PEM file of extra trusted roots
  bool noTlsVerify = false;                // --no-tls-verify: refused by Origin::create()

  kj::Duration connectTimeout = 30 * kj::SECONDS;    // --proxy-connect-timeout
  kj::Duration tlsTimeout = 10 * kj::SECONDS;        // --proxy-tls-timeout
  kj::Duration tcpKeepAlive = 30 * kj::SECONDS;      // --proxy-tcp-keepalive (0 = off)
  kj::uint keepAliveConnections = 100;                   // --proxy-keepalive-connections (idle max)
  kj::Duration keepAliveTimeout = 90 * kj::SECONDS;  // --proxy-keepalive-timeout (0 = no reuse)
  kj::Duration helloSseInterval = 1 * kj::SECONDS;   // hello-world /sse event interval

  kj::String toString() const;
  // "http://localhost:8080", "unix:/run/x.sock", "hello-world", "http_status:404", "in-process".
};

kj::OneOf<OriginConfig, kj::String> parseOriginUrl(kj::StringPtr url);
// Parses `--url` as cloudflared does (§9.1): no scheme → `http://` prepended; http/https
// accepted (default ports 80/443), path/query ignored; `unix:/path`; `unix+tls:/path`;
// `http_status:NNN`;
// `hello-world`; tcp/ssh/rdp/smb → "... not supported" error. Never throws on bad input:
// returns the error text.

OriginConfig helloWorldOrigin();
OriginConfig unixSocketOrigin(kj::StringPtr path, bool tls = false);
// `unix:path`, or `unix+tls:path` when `tls`.
OriginConfig httpStatusOrigin(kj::uint status);
OriginConfig inProcessOrigin(InProcessHandler& handler);

struct OriginStats {
  uint64_t connectionsOpened = 0;  // origin connections dialled (TCP/unix/in-process)
  uint64_t connectionsReused = 0;  // requests served on a pooled keep-alive connection
  uint64_t idleConnections = 0;    // currently pooled
  uint64_t streamsActive = 0;      // serveStream() calls in flight
  uint64_t bufferedBytes = 0;      // bytes read from one side, not yet written to the other
  uint64_t maxBufferedBytes = 0;   // high-water mark of bufferedBytes
};

class OriginObserver {
  // Per-request outcomes, for the tunnel's metrics (cloudflared's response_by_code and
  // request_errors). Called on the Origin's thread.
public:
  virtual void responseHead(kj::uint statusCode) = 0;
  // A final response head (never an interim 1xx) went to the edge: the origin's, or the fixed
  // one of an `http_status:` origin.
  virtual void requestFailed() = 0;
  // A request failed: answered with a ConnectResponse error, or the stream must be reset after
  // its head. Once per failed serveStream().
};

class ResponseSink {
  // Where an exchange's response head goes, so that the origin layer serves every transport: a
  // ConnectResponse on a QUIC data stream (Origin::serveStream), HTTP/2 response headers. The
  // response body follows on the exchange's stream.
public:
  virtual kj::Promise<void> sendHead(kj::uint status, kj::ArrayPtr<const wire::Header> headers) = 0;
  // The final response head (a 101 to a WebSocket request included). `headers` are the origin's
  // (canonical names; Transfer-Encoding removed, Content-Length dropped for chunked bodies).

  virtual kj::Promise<void> sendError(kj::StringPtr text) = 0;
  // The request failed before any head: the edge answers its visitor with a 502 carrying
  // `text` (ConnectResponse.error on QUIC).

  virtual size_t bodyWritable(size_t wanted) { return wanted; }
  virtual kj::Promise<void> whenBodyWritable() { return kj::READY_NOW; }
  // The exchange's stream, seen by the response body pump: how many bytes (at most `wanted`)
  // the next write takes at once, kept for that write (0: the stream is blocked by its peer's
  // window or the connection's send budget; more than `wanted`: a write would fail at once), and
  // a promise that resolves once it may no longer be 0. The pump reads from the origin only what
  // the stream takes at once and frees its buffer while the stream is blocked, so a visitor that
  // stops reading costs no pump buffer. The default (a transport that cannot tell): always
  // writable.
};

kj::Own<ResponseSink> newConnectResponseSink(kj::AsyncOutputStream& out);
// The QUIC data stream's sink: the head is the data-stream preamble plus a ConnectResponse
// (PROTOCOL.md §6.1), written to `out` (borrowed).

constexpr size_t PUMP_BUFFER_SIZE = 16 * 1024;
// Per direction and stream, at most this many bytes are held between a read and its write
// (with the transport's own send buffer, this is what a visitor costs while it downloads, so it
// stays small; at 16 KiB the origin layer alone still moves ~1.8 GB/s per stream (cfqt-bench
// origin), several times what QUIC carries). The response buffer is freed while the sink says
// the stream is blocked (ResponseSink::bodyWritable()) and allocated again when it is not.

class Origin {
public:
  static kj::OneOf<kj::Own<Origin>, kj::String> create(
      OriginConfig config, kj::Timer& timer, kj::Network& network,
      const kj::HttpHeaderTable& headerTable);
  // Checks the config (e.g. --no-tls-verify → "not supported yet", unreadable --origin-ca-pool)
  // and returns an Origin, or the start-up error text. `timer`, `network` and `headerTable` (the
  // process's one table, already built) must outlive the Origin. Everything lives on the
  // calling thread's event loop.

  ~Origin() noexcept(false);
  KJ_DISALLOW_COPY(Origin);

  kj::Promise<void> serveStream(kj::AsyncIoStream& stream,
                                wire::schema::ConnectRequest::Reader request);
  // Serves one data stream. `stream` is positioned right after the ConnectRequest (the caller has
  // read the signature, version and request); `stream` and `request` must stay valid until the
  // promise settles. Writes the data-stream signature + version + ConnectResponse, then the
  // response body (HTTP) or the raw WebSocket bytes, then shutdownWrite() (FIN) and abortRead().
  //
  // Resolves when done. A failure before the response head (origin unreachable, malformed or
  // unsupported request, `tcp` type) is answered with ConnectResponse.error (§6.5) and still
  // resolves. A failure after the head was written rejects with a DISCONNECTED exception whose
  // description starts with "origin: stream must be reset": the caller must then reset the
  // stream (RESET_STREAM 0, STOP_SENDING 0). In short: any rejection means "reset the stream"
  // (it can also come from the stream itself, e.g. the edge reset it first).
  //
  // The Origin must outlive every promise returned here (drain or cancel them first). Streams
  // run concurrently without limit; origin connections are pooled (keep-alive) per Origin.

  kj::Promise<void> serve(kj::AsyncIoStream& stream,
                          kj::OneOf<wire::HttpRequestHead, kj::String> request, ResponseSink& sink);
  // The transport-neutral form of serveStream(): `request` is the head the transport decoded (or
  // the text of why it could not, answered with sink.sendError()), `stream` carries the request
  // body in and the response body out, `sink` takes the response head. Completion and failure
  // rules are serveStream()'s. `stream` and `sink` must stay valid until the promise settles.

  void setObserver(OriginObserver& observer);
  // Borrowed; must outlive the Origin's streams. Without one, outcomes are not reported.

  const OriginConfig& getConfig() const { return config; }
  OriginStats getStats() const;
  uint64_t bufferedBytes() const;
  // The back-pressure gauge: bytes currently held in pump buffers, all streams together.

  class Impl;
  Origin(OriginConfig config, kj::Own<Impl> impl);
  // Use create().

private:
  OriginConfig config;
  kj::Own<Impl> impl;
};

kj::String originErrorText(kj::StringPtr cause);
// "Unable to reach the origin service. The service may be down or it may not be responding to
// traffic from cloudflared: <cause>" (§6.5).

}  // namespace cfqt::origin
