#pragma once
// EdgeTransport over HTTP/2 (src/http2), cloudflared's second transport (PROTOCOL.md §6.10): on a
// TLS connection it dialled (SNI h2.cftunnel.com, no ALPN) cfqt is the HTTP/2 server; the edge
// sends a control-stream request (capnp RPC over its bodies), one request per visitor request
// (plain HTTP/2 headers; responses carry the user headers serialized in
// cf-cloudflared-response-headers) and update-configuration requests.

#include "tunnel/transport.h"

#include "http2/session.h"

#include <kj/async-io.h>
#include <kj/timer.h>

namespace kj {
class TlsContext;
}

namespace cfqt::tunnel {

kj::Own<EdgeTransport> newHttp2Transport(kj::Own<kj::AsyncIoStream> connection, kj::Timer& timer,
                                         http2::SessionConfig config = {});
// Serves HTTP/2 on `connection` (already secured). `timer` must outlive the transport.
// openControlStream() waits for the edge's control-stream request and answers it 200; a second
// one is reset. Update-configuration requests come out of acceptStream() as
// ConfigurationRequest. close() ends the session at once (GOAWAY, streams cut).

kj::Promise<kj::Own<EdgeTransport>> dialHttp2Transport(
    kj::Network& network, kj::TlsContext& tls, kj::Timer& timer, kj::StringPtr address,
    kj::StringPtr serverName, kj::Duration connectTimeout, http2::SessionConfig config = {});
// Dials `address` ("ip:port") over TCP, then TLS verified against `tls`'s roots with SNI and
// name `serverName` (h2.cftunnel.com), no ALPN. Rejects with what failed (connect, timeout,
// certificate). `network`, `tls` and `timer` must outlive the transport.

}  // namespace cfqt::tunnel
