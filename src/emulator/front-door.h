// The public front door (PROTOCOL.md §10.5): an HTTP/1.1 server that routes each request by its
// Host header to the tunnel owning that hostname, opens an exchange on one of the tunnel's live
// connections (round-robin; a QUIC data stream or an HTTP/2 request, see tunnel-exchange.h),
// sends the request head, streams the request body, and streams the response head and body back
// unbuffered. WebSocket upgrades are relayed as raw frame bytes.
//
// Per visitor, at most one body buffer (64 KiB) is in flight each way: the next tunnel read
// starts only once the previous chunk was written to the visitor, so a visitor that stops
// reading stops the reading of its own tunnel stream and nothing else. A visitor that leaves
// (closes or resets its connection) before its exchange is complete gets its tunnel stream
// dropped at once: RESET_STREAM and STOP_SENDING (code 0) for whichever sides were unfinished,
// as the real edge does. That holds while the exchange waits for the response head, for the next
// body byte (SSE) and on a relayed WebSocket.

#pragma once

#include "registry.h"

#include <kj/compat/http.h>
#include <kj/timer.h>

namespace cfqt::emulator {

struct FrontDoorOptions {
  kj::Duration openStreamTimeout = 10 * kj::SECONDS;
  // Opening a stream on the chosen connection (waits while the client's stream limit is hit).
  // Expiry: 502 page.
  kj::Duration responseHeadTimeout = 100 * kj::SECONDS;
  // From the start of the request until the ConnectResponse arrived (Cloudflare's 524).
  kj::Duration webSocketCloseGrace = 5 * kj::SECONDS;
  // Once one direction of a relayed WebSocket ended (Close relayed, or EOF), the other direction
  // gets this long to finish before both are aborted.
  kj::Duration headerTimeout = 15 * kj::SECONDS;     // kj::HttpServerSettings::headerTimeout
  kj::Duration pipelineTimeout = 5 * kj::SECONDS;    // keep-alive idle time between requests
  kj::StringPtr scheme = "https";
  // Scheme of the ConnectRequest dest URL and of X-Forwarded-Proto / Cf-Visitor, as the real
  // edge (which only serves HTTPS for trycloudflare) would send it.
  kj::StringPtr rayColo = "EMU";
  kj::Duration routeDelay = 0 * kj::SECONDS;
  // --route-delay: for this long after a tunnel's first registration the edge does not route
  // its hostname yet (530, error 1033), as Cloudflare's edge takes a while to.
  // Request head limits (like Cloudflare's, which answers 431/400 rather than resetting):
  size_t maxRequestHeadBytes = 128000;
  // Request line + header fields of one request (Cloudflare documents 128 KB; kj::HttpServer's
  // own buffer ends at 128 KiB). Above: 431, connection closed.
  size_t maxHeaderFieldBytes = 16 * 1024;
  // One header field (name + value). Above: 431, connection closed.
  size_t maxHeaderCount = 100;
  // Header fields of one request. Above: 400, connection closed.
};

class FrontDoor {
public:
  FrontDoor(kj::Timer& timer, const kj::HttpHeaderTable& headerTable, Registry& registry,
            FrontDoorOptions options = {});
  // Borrows everything; all must outlive this object.
  KJ_DISALLOW_COPY(FrontDoor);
  ~FrontDoor() noexcept(false);

  kj::Promise<void> listen(kj::ConnectionReceiver& port);
  // Accepts public connections until the promise is dropped.

  kj::Promise<void> serve(kj::Own<kj::AsyncIoStream> connection);
  // Serves one public connection (tests use a pipe end). A visitor that closes its side (EOF)
  // after a complete request has left: half-closed HTTP/1.1 clients are not served, as on nginx
  // and the real edge.

  kj::Promise<void> drain();

  uint64_t requestCount() const { return requests; }

private:
  class Visitor;
  class Service;
  class Exchange;
  class TunnelEnd;
  class ErrorHandler final: public kj::TaskSet::ErrorHandler {
  public:
    void taskFailed(kj::Exception&& exception) override;
  };

  class ParseErrors final: public kj::HttpServerErrorHandler {
    // Answers what kj::HttpServer could not parse (and the requests the front door refuses) with
    // the status the real edge gives, an error page and `Connection: close`: 400 for a bad chunk
    // size, an invalid or repeated Content-Length and Content-Length with Transfer-Encoding, 501
    // for an unknown Transfer-Encoding, 431 for a head over kj's own buffer. kj's default would be
    // a 500 for these.
  public:
    explicit ParseErrors(FrontDoor& door): door(door) {}
    kj::Promise<void> handleClientProtocolError(
        kj::HttpHeaders::ProtocolError protocolError, kj::HttpService::Response& response) override;
    kj::Promise<void> handleApplicationError(
        kj::Exception exception, kj::Maybe<kj::HttpService::Response&> response) override;
  private:
    FrontDoor& door;
  };

  class CloseRequested final: public kj::HttpServerCallbacks {
    // kj::HttpServer 0.9.2 ignores a client's `Connection: close`; it asks shouldClose()
    // synchronously inside Response::send(), so the front door arms this just before each send.
  public:
    bool closeNext = false;
    bool shouldClose() override {
      bool result = closeNext;
      closeNext = false;
      return result;
    }
  };

  kj::Timer& timer;
  const kj::HttpHeaderTable& headerTable;
  Registry& registry;
  FrontDoorOptions options;
  uint64_t requests = 0;
  CloseRequested closeRequested;
  ParseErrors parseErrors;
  kj::HttpServer server;
  ErrorHandler errorHandler;
  kj::TaskSet connections;    // public connections accepted by listen()
};

class RandomEntropySource final: public kj::EntropySource {
  // WebSocket mask bytes from GnuTLS's RNG.
public:
  void generate(kj::ArrayPtr<kj::byte> buffer) override;
};

kj::StringPtr statusText(kj::uint status);
// Standard reason phrase, or "Unknown".

}  // namespace cfqt::emulator
