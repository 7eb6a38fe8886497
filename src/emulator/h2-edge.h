// The HTTP/2 side of the edge (PROTOCOL.md §6.10, issue 14): one TCP+TLS listener per edge
// address, on the same port number as the QUIC one, like the real edge. A tunnel client (cfqt,
// or cloudflared with --protocol http2) dials TCP, handshakes TLS (SNI h2.cftunnel.com, no ALPN;
// the emulator's server certificate) and then is the HTTP/2 *server*; the edge is the HTTP/2
// client (h2-session.h) and sends requests:
//
//  - first the control stream: `GET /` with `Cf-Cloudflared-Proxy-Connection-Upgrade:
//    control-stream`, never ended; the registration RPC runs over its request body (edge ->
//    client) and response body (client -> edge), served by wire::ControlServer with the Registry
//    as policy, exactly as on a QUIC control stream;
//  - one request per visitor request from the front door (http2RequestHeaders()): the visitor's
//    method, authority and path as pseudo-headers and the forwarded headers as plain HTTP/2
//    headers; WebSocket upgrades carry `Cf-Cloudflared-Proxy-Connection-Upgrade: websocket`; the
//    response's user headers come serialized in `cf-cloudflared-response-headers`
//    (decodeHttp2Head());
//  - `PUT /` with `Cf-Cloudflared-Proxy-Connection-Upgrade: update-configuration` and body
//    {"version":V,"config":{...}} for the admin API's update-configuration.
//
// The method, scheme and authority of the edge's own requests (control stream, configuration)
// are those of cloudflared's test client (connection/http2_test.go: `http://localhost:8080/`);
// the real edge's values are not documented and cloudflared ignores them.

#pragma once

#include "h2-session.h"
#include "registry.h"

#include "wire/http-metadata.h"
#include "wire/wire-error.h"

#include <kj/async-io.h>
#include <kj/compat/tls.h>
#include <kj/one-of.h>
#include <kj/timer.h>

namespace cfqt::emulator {

struct Http2EdgeOptions {
  kj::String certFile;                   // PEM server certificate (covers h2.cftunnel.com)
  kj::String keyFile;
  kj::Duration handshakeTimeout = 10 * kj::SECONDS;   // TLS handshake of an accepted connection
  Http2SessionOptions session;
};

class Http2EdgeServer {
public:
  Http2EdgeServer(kj::Timer& timer, Registry& registry, Http2EdgeOptions options);
  // Borrows timer and registry. Reads the certificate and key now (throws if unusable).
  KJ_DISALLOW_COPY(Http2EdgeServer);
  ~Http2EdgeServer() noexcept(false);

  void listen(kj::Own<kj::ConnectionReceiver> receiver);
  // Accepts TCP connections on `receiver` until this object dies. A failed TLS handshake only
  // ends that connection (logged at INFO).

  size_t connectionCount() const { return liveConnections; }

private:
  class Connection;
  class ErrorHandler final: public kj::TaskSet::ErrorHandler {
  public:
    void taskFailed(kj::Exception&& exception) override;
  };

  kj::Timer& timer;
  Registry& registry;
  Http2EdgeOptions options;
  kj::TlsKeypair keypair;
  kj::Own<kj::TlsContext> tls;           // borrows keypair
  size_t liveConnections = 0;
  ErrorHandler errorHandler;
  kj::TaskSet tasks;                     // last: accept loops and connections die first

  kj::Own<kj::TlsContext> makeTls();
  kj::Promise<void> acceptLoop(kj::ConnectionReceiver& receiver);
  kj::Promise<void> serve(kj::AuthenticatedStream stream);
  kj::Promise<void> serveConnection(kj::Own<kj::AsyncIoStream> secured, kj::String remote);
};

kj::Array<wire::Header> http2RequestHeaders(const wire::HttpRequestHead& head);
// The HTTP/2 request header list of a visitor request: `:method`, `:scheme` (the dest URL's),
// `:authority` (`head.host`), `:path` (the dest URL's path and query, "/" if empty), then the
// forwarded headers with lower-case names minus the connection-specific ones HTTP/2 forbids
// (Connection, Keep-Alive, Proxy-Connection, Transfer-Encoding, Upgrade, TE other than
// "trailers") and Host; a WebSocket request (`head.type`) adds
// `cf-cloudflared-proxy-connection-upgrade: websocket` (cloudflared restores Connection/Upgrade
// itself). Content-Length stays; a chunked request is sent without it, its body ending with
// END_STREAM.

bool http2RequestHasBody(const wire::HttpRequestHead& head);
// A WebSocket, a Transfer-Encoding containing "chunked", or a Content-Length above 0 (first
// value): the request is sent with a body (DATA frames), otherwise with END_STREAM on HEADERS.

kj::OneOf<wire::HttpResponseHead, wire::WireError> decodeHttp2Head(
    const Http2Head& response, bool websocket);
// The client's answer as the front door wants it: a `cf-cloudflared-response-meta` whose src is
// "cloudflared" (cloudflared's own 502, empty body) -> `error` set; otherwise the status and the
// deserialized `cf-cloudflared-response-headers` (absent: no user headers but the HTTP/2
// content-length, if any). An undecodable serialized value -> WireError BAD_HEADER. For a
// WebSocket request a 200 whose user headers hold `Upgrade` or `Sec-WebSocket-Accept` is the
// origin's 101 (HTTP/2 has none; cloudflared sends it as 200).

}  // namespace cfqt::emulator
