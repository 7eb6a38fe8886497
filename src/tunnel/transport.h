#pragma once
// The seam between the tunnel and the ways of reaching the edge. EdgeConnection (registration,
// edge RPC, origin proxying, supervision, metrics) is written once against EdgeTransport and
// EdgeStream; QUIC (quic-transport.*, over src/quic) implements them, and HTTP/2 over TLS over
// TCP (src/http2, issue 14) is the second implementation.

#include "observe/status.h"
#include "origin/origin.h"
#include "wire/http-metadata.h"

#include <kj/async-io.h>
#include <kj/one-of.h>
#include <kj/time.h>

namespace cfqt::tunnel {

struct ProxyRequest {
  // A request for the origin: the head the transport decoded, or the text of why it could not
  // (the origin layer answers that with a 502 carrying it).
  kj::OneOf<wire::HttpRequestHead, kj::String> head;
  kj::String dest;   // the request's destination, for the logs
};

struct RpcSession {};
// The stream carries a capnp-rpc session to the client's CloudflaredServer (QUIC's edge-opened
// RPC streams, PROTOCOL.md §6.8).

struct RefusedRequest {
  kj::String reason;
  // A request the transport refused to decode (over cfqt's metadata limits, or malformed at the
  // framing level): answered with an error, the rest of its bytes discarded.
};

struct ConfigurationRequest {};
// HTTP/2's update-configuration request: its body (io()) is {"version":N,"config":{...}}; the
// answer is a 200 whose body is the UpdateConfigurationResponse as JSON.

class EdgeStream {
  // One stream (QUIC) or request (HTTP/2) the edge opened. Dropping it before it completed
  // resets it.
public:
  virtual ~EdgeStream() noexcept(false) = default;

  virtual int64_t id() const = 0;
  // For the logs (the QUIC stream ID, the HTTP/2 stream ID).

  using Request = kj::OneOf<ProxyRequest, RpcSession, RefusedRequest, ConfigurationRequest>;
  virtual kj::Promise<Request> readRequest() = 0;
  // What the edge asks on this stream. Rejects when the stream is no request at all (unknown
  // signature, reset before its request was complete); the caller bounds it in time.

  virtual kj::AsyncIoStream& io() = 0;
  // After readRequest(): the request body in and the response body out (or the RPC session).

  virtual origin::ResponseSink& sink() = 0;
  // Takes the response head (a ConnectResponse on QUIC, HTTP/2 response headers).

  virtual kj::Promise<void> whenAborted() = 0;
  // Resolves (never rejects) once the edge abandoned the stream before it completed (its
  // visitor went away) or the connection ended.

  virtual void reset() = 0;
  // Aborts the stream (RESET_STREAM / RST_STREAM), e.g. after a failure once the head was sent.
};

struct PeerClose {
  uint64_t code;
  kj::String reason;
};

class EdgeTransport {
  // One connection to the edge, dialled and secured. Lives on the event loop's thread.
public:
  virtual ~EdgeTransport() noexcept(false) = default;

  virtual kj::StringPtr protocol() const = 0;
  // "quic" or "http2": the registration's and the logs' protocol name.

  virtual kj::Promise<kj::Own<kj::AsyncIoStream>> openControlStream() = 0;
  // The stream the control RPC (registration, unregister, local configuration) runs on.

  virtual kj::Promise<kj::Own<EdgeStream>> acceptStream() = 0;
  // The next stream the edge opened. Rejects once the connection ended.

  virtual void close(uint64_t code, kj::StringPtr reason) = 0;
  // Ends the connection now (no-op if it already ended).

  virtual kj::Promise<void> onClosed() = 0;
  // Resolves (never rejects) once the connection ended, for whatever reason. Many waiters ok.

  virtual bool isClosed() const = 0;
  virtual kj::String closeDescription() const = 0;
  // Once closed: why, for the logs ("timeout: no recent network activity", "edge closed the
  // connection (application error 0x0, reason "...")", ...).

  virtual kj::Maybe<PeerClose> peerClose() const = 0;
  // Once closed: the edge's code and reason if the edge closed it (HTTP/2: also once the edge
  // sent GOAWAY, see whenPeerGoingAway()).

  virtual kj::Promise<void> whenPeerGoingAway() { return kj::NEVER_DONE; }
  // Resolves once the edge announced that it is going away but left the connection open
  // (HTTP/2 GOAWAY): no new request will come, the ones in flight may finish. QUIC has no such
  // announcement (the edge closes the connection).

  virtual observe::TunnelStatus::QuicSample sample() const = 0;
  // Statistics for /metrics (RTT, bytes, packets, streams).

  virtual kj::Duration blockedFor() const = 0;
  // How long data has been waiting for connection-level credit from the edge (0 if not).
};

}  // namespace cfqt::tunnel
