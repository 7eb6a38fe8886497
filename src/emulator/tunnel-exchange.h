// One visitor request on a tunnel connection, whatever the transport: the front door sends the
// request head, streams the body both ways and reads the response head through this interface.
// On QUIC the exchange is a data stream carrying the PROTOCOL.md §6.1 preamble, a ConnectRequest
// and a ConnectResponse (quicExchange() below); on HTTP/2 (§6.10) it is one HTTP/2 request whose
// response headers carry the serialized user headers (h2-edge.c++).

#pragma once

#include "wire/http-metadata.h"
#include "wire/wire-error.h"

#include <kj/async-io.h>
#include <kj/one-of.h>

namespace cfqt::emulator {

class TunnelExchange: public kj::AsyncIoStream {
  // As a stream: write() sends request body bytes (WebSocket: the visitor's frames) and
  // shutdownWrite() ends the request; tryRead() returns the response body (WebSocket: the
  // origin's frames) after the head, 0 at its clean end, and rejects DISCONNECTED when the tunnel
  // stream was reset. Dropping the exchange before both directions ended resets the tunnel stream
  // (QUIC: RESET_STREAM + STOP_SENDING; HTTP/2: RST_STREAM).
public:
  virtual kj::Promise<void> sendHead(const wire::HttpRequestHead& head) = 0;
  // Sends the request head: `head.dest`, `type`, `method`, `host` and `headers` (canonical names,
  // as the front door forwards them, framing headers included). Everything needed is copied
  // before this returns. Call once, before any write(). Rejects when the tunnel stream refuses
  // it; the response side then reports how the exchange failed.

  virtual kj::Promise<kj::OneOf<wire::HttpResponseHead, wire::WireError>> readResponseHead() = 0;
  // The response head: status and user headers (canonical names), or `error` set when the client
  // reported that the origin failed (QUIC: ConnectResponse.error; HTTP/2: a 502 whose
  // cf-cloudflared-response-meta says src "cloudflared"). WireError: the client's answer was
  // unusable. Rejects when the stream failed before a head (reset, truncated, connection lost).
  // Call once.
};

kj::Own<TunnelExchange> quicExchange(kj::Own<kj::AsyncIoStream> stream);
// The QUIC data-stream protocol over a stream opened by ClientConnection::openStream(): the
// preamble + ConnectRequest in one write, the ConnectResponse read back with the data-stream
// limits. Reads, writes and pumps go straight to `stream`.

}  // namespace cfqt::emulator
