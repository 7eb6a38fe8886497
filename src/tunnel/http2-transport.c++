#include "tunnel/http2-transport.h"

#include "http2/header.h"
#include "observe/log.h"

#include <kj/compat/tls.h>
#include <kj/debug.h>

#include <deque>

namespace cfqt::tunnel {

namespace {

class Http2ResponseSink final: public origin::ResponseSink {
  // The origin's head as cloudflared sends it over HTTP/2: user headers serialized in
  // cf-cloudflared-response-headers, content-length also as a real header, the meta header, a
  // 101 sent as 200; a failure before the head as a bare 502 with {"src":"cloudflared"}.
public:
  explicit Http2ResponseSink(http2::ServerRequest& request): request(request) {}

  kj::Promise<void> sendHead(kj::uint status, kj::ArrayPtr<const wire::Header> headers) override {
    KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
      submit(http2::buildResponseHeaders(status, headers));
    })) {
      return kj::mv(*e);
    }
    return kj::READY_NOW;
  }

  kj::Promise<void> sendError(kj::StringPtr text) override {
    // cloudflared answers its own failures with a bare 502; the edge shows its error page.
    KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
      submit(http2::buildErrorResponseHeaders());
    })) {
      return kj::mv(*e);
    }
    return kj::READY_NOW;
  }

private:
  http2::ServerRequest& request;

  void submit(kj::Array<wire::Header> list) {
    // The session adds :status itself.
    kj::uint status = 502;
    kj::Vector<wire::Header> rest(list.size());
    for (auto& h: list) {
      if (h.name == ":status") {
        KJ_IF_MAYBE(n, wire::parseContentLength(h.value)) status = *n;
      } else {
        rest.add(wire::Header{kj::mv(h.name), kj::mv(h.value)});
      }
    }
    request.respond(status, rest.asPtr(), false);
  }
};

class Http2EdgeStream final: public EdgeStream {
public:
  explicit Http2EdgeStream(kj::Own<http2::ServerRequest> requestParam)
      : request(kj::mv(requestParam)), responseSink(*request) {}

  int64_t id() const override { return request->streamId(); }

  kj::Promise<Request> readRequest() override {
    auto headers = request->headers();
    switch (http2::classifyRequest(headers)) {
      case http2::RequestKind::UPDATE_CONFIGURATION:
        return Request(ConfigurationRequest{});
      case http2::RequestKind::CONTROL_STREAM:
        // A second control stream (the transport routes the first one): refused.
        return Request(RefusedRequest{kj::str("a second control-stream request")});
      case http2::RequestKind::WEBSOCKET:
        return Request(proxy(wire::schema::ConnectionType::WEBSOCKET));
      case http2::RequestKind::TCP:
        return Request(proxy(wire::schema::ConnectionType::TCP));
      case http2::RequestKind::HTTP:
        return Request(proxy(wire::schema::ConnectionType::HTTP));
    }
    KJ_UNREACHABLE;
  }

  kj::AsyncIoStream& io() override { return request->body(); }
  origin::ResponseSink& sink() override { return responseSink; }
  kj::Promise<void> whenAborted() override { return request->whenAborted(); }
  void reset() override { request->reset(http2::H2_INTERNAL_ERROR); }

private:
  kj::Own<http2::ServerRequest> request;
  Http2ResponseSink responseSink;

  ProxyRequest proxy(wire::schema::ConnectionType type) {
    // The request as the origin layer takes it: what Go's HTTP/2 server makes of the headers
    // (method, URL, Host, canonical header names) before cloudflared proxies it.
    auto headers = request->headers();
    wire::HttpRequestHead head;
    head.type = type;
    auto scheme = request->header(":scheme").orDefault("https");
    auto path = request->header(":path").orDefault("/");
    head.method = kj::str(request->header(":method").orDefault("GET"));
    head.host = kj::str(http2::requestHost(headers));
    head.dest = kj::str(scheme, "://", head.host, path);
    auto userHeaders = http2::originRequestHeaders(headers);
    for (auto& h: userHeaders) {
      // Names are canonical here (originRequestHeaders), as Go's server makes them.
      if (h.name == "Content-Length" && head.contentLength == nullptr) {
        head.contentLength = wire::parseContentLength(h.value);
      }
      head.headers.add(wire::Header{kj::mv(h.name), kj::mv(h.value)});
    }
    // HTTP/2 has no chunked framing: a body of unknown length goes to the origin chunked.
    kj::StringPtr method = head.method;
    head.chunked = head.contentLength == nullptr && type == wire::schema::ConnectionType::HTTP &&
                   method != "GET" && method != "HEAD" && method != "OPTIONS" &&
                   method != "DELETE" && method != "TRACE";
    ProxyRequest out;
    out.dest = kj::str(head.dest);
    out.head = kj::mv(head);
    return out;
  }
};

class RequestBodyStream final: public kj::AsyncIoStream {
  // The control stream: the capnp session runs over the control-stream request's bodies; this
  // owns the request and forwards to its body.
public:
  explicit RequestBodyStream(kj::Own<http2::ServerRequest> request): request(kj::mv(request)) {}

  kj::Promise<size_t> tryRead(void* buffer, size_t minBytes, size_t maxBytes) override {
    return request->body().tryRead(buffer, minBytes, maxBytes);
  }
  kj::Promise<void> write(const void* buffer, size_t size) override {
    return request->body().write(buffer, size);
  }
  kj::Promise<void> write(kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces) override {
    return request->body().write(pieces);
  }
  kj::Promise<void> whenWriteDisconnected() override {
    return request->body().whenWriteDisconnected();
  }
  void shutdownWrite() override { request->body().shutdownWrite(); }
  void abortRead() override { request->body().abortRead(); }

private:
  kj::Own<http2::ServerRequest> request;
};

class Http2EdgeTransport final: public EdgeTransport, private kj::TaskSet::ErrorHandler {
public:
  Http2EdgeTransport(kj::Own<kj::AsyncIoStream> connectionParam, kj::Timer& timer,
                     http2::SessionConfig config)
      : connection(kj::mv(connectionParam)),
        session(http2::newServerSession(*connection, timer, kj::mv(config))),
        ended(makeEnded()), tasks(*this) {
    tasks.add(acceptLoop());
  }

  kj::StringPtr protocol() const override { return "http2"; }

  kj::Promise<kj::Own<kj::AsyncIoStream>> openControlStream() override {
    KJ_IF_MAYBE(control, pendingControl) {
      auto stream = kj::mv(*control);
      pendingControl = nullptr;
      return kj::mv(stream);
    }
    if (finished) return endException();
    auto paf = kj::newPromiseAndFulfiller<kj::Own<kj::AsyncIoStream>>();
    controlWaiter = kj::mv(paf.fulfiller);
    return kj::mv(paf.promise);
  }

  kj::Promise<kj::Own<EdgeStream>> acceptStream() override {
    if (!queue.empty()) {
      auto next = kj::mv(queue.front());
      queue.pop_front();
      return kj::Own<EdgeStream>(kj::heap<Http2EdgeStream>(kj::mv(next)));
    }
    if (finished) return endException();
    auto paf = kj::newPromiseAndFulfiller<kj::Own<EdgeStream>>();
    acceptWaiter = kj::mv(paf.fulfiller);
    return kj::mv(paf.promise);
  }

  void close(uint64_t code, kj::StringPtr reason) override {
    if (isClosed()) return;
    localClose = kj::str(reason.size() > 0 ? reason : "closed locally"_kj);
    tasks.add(session->goAway(0 * kj::SECONDS));
  }

  kj::Promise<void> onClosed() override { return ended.addBranch(); }

  bool isClosed() const override { return finished || localClose != nullptr; }

  kj::String closeDescription() const override {
    KJ_IF_MAYBE(e, endError) {
      KJ_IF_MAYBE(kind, http2::classifySessionError(*e)) {
        switch (*kind) {
          case http2::SessionErrorKind::PEER_CLOSED:
          case http2::SessionErrorKind::PEER_GOAWAY:
            return kj::str("edge closed the connection (", e->getDescription(), ")");
          case http2::SessionErrorKind::PING_TIMEOUT:
            return kj::str("timeout: no recent network activity (HTTP/2 PING unanswered)");
          default:
            break;
        }
      }
      return kj::str(e->getDescription());
    }
    KJ_IF_MAYBE(reason, localClose) return kj::str("closed locally: ", *reason);
    if (finished) {
      // A clean end: the edge's GOAWAY(NO_ERROR) with every stream done, or EOF with none open.
      if (session->stats().goAwayReceived) {
        return kj::str("edge closed the connection (HTTP/2 GOAWAY)");
      }
      return kj::str("edge closed the connection");
    }
    return kj::str("connection open");
  }

  kj::Promise<void> whenPeerGoingAway() override { return session->whenPeerGoingAway(); }

  kj::Maybe<PeerClose> peerClose() const override {
    auto s = session->stats();
    if (s.goAwayReceived) {
      return PeerClose{s.peerGoAwayCode, kj::mv(s.peerGoAwayText)};
    }
    return nullptr;
  }

  observe::TunnelStatus::QuicSample sample() const override {
    observe::TunnelStatus::QuicSample out;
    auto s = session->stats();
    out.smoothedRtt = s.rtt;
    out.minRtt = s.minRtt;
    out.latestRtt = s.rtt;
    out.bytesSent = s.bytesSent;
    out.bytesReceived = s.bytesReceived;
    out.streamsActive = s.streamsActive;
    return out;
  }

  kj::Duration blockedFor() const override {
    // A peer that withholds credit is caught by the PING timeout instead (its PINGs stay
    // unanswered when it stops reading; a stalled window does not block PINGs).
    return 0 * kj::SECONDS;
  }

private:
  kj::Own<kj::AsyncIoStream> connection;   // outlives the session (declared first)
  kj::Own<http2::ServerSession> session;
  kj::ForkedPromise<void> ended;
  bool finished = false;
  kj::Maybe<kj::Exception> endError;
  kj::Maybe<kj::String> localClose;
  bool controlSeen = false;
  kj::Maybe<kj::Own<kj::PromiseFulfiller<kj::Own<kj::AsyncIoStream>>>> controlWaiter;
  kj::Maybe<kj::Own<kj::PromiseFulfiller<kj::Own<EdgeStream>>>> acceptWaiter;
  std::deque<kj::Own<http2::ServerRequest>> queue;   // bounded by the session's stream limit
  kj::Maybe<kj::Own<kj::AsyncIoStream>> pendingControl;   // arrived before openControlStream()
  kj::TaskSet tasks;

  kj::ForkedPromise<void> makeEnded() {
    return session->run().then([this]() { finished = true; }, [this](kj::Exception&& e) {
      finished = true;
      endError = kj::mv(e);
    }).then([this]() {
      failWaiters();
      // Ended by us (close(), or our final GOAWAY): the edge may still hold the connection.
      if (localClose != nullptr || session->stats().goAwaySent) closeOurSide();
    }).fork();
  }

  void closeOurSide() {
    // The session is over (GOAWAY exchanged and the streams done, our grace period expired, or
    // a failure): end our side of the connection now (TLS close_notify, EOF on a pipe), so that
    // the edge sees the end at once instead of keeping the connection until its own timeout or
    // until this transport is dropped. After the session's I/O was cancelled (evalLast).
    tasks.add(kj::evalLast([this]() {
      KJ_IF_MAYBE(e, kj::runCatchingExceptions([this]() { connection->shutdownWrite(); })) {
        observe::logDebug("HTTP/2: could not close our side of the connection",
                          observe::Fields().error(*e));
      }
    }));
  }

  kj::Exception endException() const {
    // What openControlStream() and acceptStream() reject with once the session ended. (A clean
    // end leaves endError null, so that closeDescription() tells it from a failure.)
    KJ_IF_MAYBE(e, endError) return kj::cp(*e);
    return KJ_EXCEPTION(DISCONNECTED, "HTTP/2 connection to the edge ended");
  }

  void failWaiters() {
    KJ_IF_MAYBE(w, controlWaiter) (*w)->reject(endException());
    controlWaiter = nullptr;
    KJ_IF_MAYBE(w, acceptWaiter) (*w)->reject(endException());
    acceptWaiter = nullptr;
  }

  kj::Promise<void> acceptLoop() {
    return session->acceptRequest().then([this](kj::Own<http2::ServerRequest> request) {
      KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() { route(kj::mv(request)); })) {
        // The request went away while being routed (reset by the edge): only it is lost.
        observe::logDebug("HTTP/2 request dropped while routing it", observe::Fields().error(*e));
      }
      return acceptLoop();
    }, [](kj::Exception&&) {
      // The session ended: `ended` reports why.
    });
  }

  void route(kj::Own<http2::ServerRequest> request) {
    if (!controlSeen &&
        http2::classifyRequest(request->headers()) == http2::RequestKind::CONTROL_STREAM) {
      controlSeen = true;
      request->respond(200, nullptr, false);
      KJ_IF_MAYBE(w, controlWaiter) {
        (*w)->fulfill(kj::heap<RequestBodyStream>(kj::mv(request)));
        controlWaiter = nullptr;
      } else {
        pendingControl = kj::heap<RequestBodyStream>(kj::mv(request));
      }
      return;
    }
    KJ_IF_MAYBE(w, acceptWaiter) {
      (*w)->fulfill(kj::heap<Http2EdgeStream>(kj::mv(request)));
      acceptWaiter = nullptr;
    } else {
      queue.push_back(kj::mv(request));
    }
  }

  void taskFailed(kj::Exception&& e) override {
    observe::logError("HTTP/2 transport task failed", observe::Fields().error(e));
  }
};

}  // namespace

kj::Own<EdgeTransport> newHttp2Transport(kj::Own<kj::AsyncIoStream> connection, kj::Timer& timer,
                                         http2::SessionConfig config) {
  return kj::heap<Http2EdgeTransport>(kj::mv(connection), timer, kj::mv(config));
}

kj::Promise<kj::Own<EdgeTransport>> dialHttp2Transport(
    kj::Network& network, kj::TlsContext& tls, kj::Timer& timer, kj::StringPtr address,
    kj::StringPtr serverName, kj::Duration connectTimeout, http2::SessionConfig config) {
  auto name = kj::str(serverName);
  auto connecting = network.parseAddress(address).then([](kj::Own<kj::NetworkAddress> a) {
    return a->connect().attach(kj::mv(a));
  }).then([&tls, name = kj::mv(name)](kj::Own<kj::AsyncIoStream> tcp) mutable {
    return tls.wrapClient(kj::mv(tcp), name).attach(kj::mv(name));
  });
  return timer.timeoutAfter(connectTimeout, kj::mv(connecting))
      .then([&timer, config = kj::mv(config)](kj::Own<kj::AsyncIoStream> secured) mutable {
    return newHttp2Transport(kj::mv(secured), timer, kj::mv(config));
  });
}

}  // namespace cfqt::tunnel
