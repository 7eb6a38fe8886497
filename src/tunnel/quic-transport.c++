#include "tunnel/quic-transport.h"

#include "quic/endpoint.h"
#include "wire/data-stream.h"

#include <kj/debug.h>

namespace cfqt::tunnel {

kj::String describeClose(const quic::CloseInfo& info) {
  switch (info.kind) {
    case quic::CloseKind::PEER_APPLICATION_CLOSE:
      return kj::str("edge closed the connection (application error 0x", kj::hex(info.code),
                     ", reason \"", info.reason, "\")");
    case quic::CloseKind::PEER_TRANSPORT_CLOSE:
      return kj::str("edge closed the connection (transport error 0x", kj::hex(info.code),
                     ", reason \"", info.reason, "\")");
    case quic::CloseKind::IDLE_TIMEOUT:
      return kj::str("timeout: no recent network activity (idle timeout)");
    case quic::CloseKind::STATELESS_RESET:
      return kj::str("edge sent a stateless reset");
    default:
      return kj::str(info.kind, ": ", info.description);
  }
}

namespace {

class QuicResponseSink final: public origin::ResponseSink {
  // The ConnectResponse sink of a data stream, plus the stream's send state for the origin's
  // body pump (it reads only what the stream takes at once, see ResponseSink::bodyWritable()).
public:
  explicit QuicResponseSink(quic::Stream& stream)
      : stream(stream), head(origin::newConnectResponseSink(stream)) {}

  kj::Promise<void> sendHead(kj::uint status, kj::ArrayPtr<const wire::Header> headers) override {
    return head->sendHead(status, headers);
  }
  kj::Promise<void> sendError(kj::StringPtr text) override { return head->sendError(text); }
  size_t bodyWritable(size_t wanted) override { return stream.writableBytes(wanted); }
  kj::Promise<void> whenBodyWritable() override { return stream.whenWritable(); }

private:
  quic::Stream& stream;
  kj::Own<origin::ResponseSink> head;
};

class QuicEdgeStream final: public EdgeStream {
public:
  explicit QuicEdgeStream(kj::Own<quic::Stream> streamParam)
      : stream(kj::mv(streamParam)), responseSink(kj::heap<QuicResponseSink>(*stream)) {}

  int64_t id() const override { return stream->id(); }

  kj::Promise<Request> readRequest() override {
    return wire::readStreamSignature(*stream).then([this](wire::StreamKind kind)
                                                   -> kj::Promise<Request> {
      if (kind == wire::StreamKind::RPC) return Request(RpcSession{});
      return wire::readConnectRequest(*stream).then([](kj::Own<capnp::MessageReader> message)
                                                    -> kj::Promise<Request> {
        auto request = message->getRoot<wire::schema::ConnectRequest>();
        ProxyRequest out;
        out.dest = kj::str(request.getDest());
        auto decoded = wire::decodeRequest(request);
        KJ_SWITCH_ONEOF(decoded) {
          KJ_CASE_ONEOF(head, wire::HttpRequestHead) out.head = kj::mv(head);
          KJ_CASE_ONEOF(error, wire::WireError) {
            out.head = kj::str("malformed request: ", error.message);
          }
        }
        return Request(kj::mv(out));
      }, [](kj::Exception&& e) -> kj::Promise<Request> {
        auto code = wire::wireErrorCode(e);
        if (code == wire::WireErrorCode::TOO_LARGE || code == wire::WireErrorCode::MALFORMED) {
          return Request(RefusedRequest{kj::str(e.getDescription())});
        }
        return kj::mv(e);
      });
    });
  }

  kj::AsyncIoStream& io() override { return *stream; }
  origin::ResponseSink& sink() override { return *responseSink; }
  kj::Promise<void> whenAborted() override { return stream->whenAborted(); }
  void reset() override { stream->reset(0); }

private:
  kj::Own<quic::Stream> stream;
  kj::Own<origin::ResponseSink> responseSink;
};

class QuicEdgeTransport final: public EdgeTransport {
public:
  QuicEdgeTransport(kj::Own<quic::Endpoint> endpointParam, kj::Own<quic::Connection> connParam)
      : endpoint(kj::mv(endpointParam)), connection(kj::mv(connParam)),
        closed(connection->onClosed().ignoreResult().fork()) {}

  kj::StringPtr protocol() const override { return "quic"; }

  kj::Promise<kj::Own<kj::AsyncIoStream>> openControlStream() override {
    return connection->openStream().then([](kj::Own<quic::Stream> s) -> kj::Own<kj::AsyncIoStream> {
      return kj::mv(s);
    });
  }

  kj::Promise<kj::Own<EdgeStream>> acceptStream() override {
    return connection->acceptStream().then([](kj::Own<quic::Stream> s) -> kj::Own<EdgeStream> {
      return kj::heap<QuicEdgeStream>(kj::mv(s));
    });
  }

  void close(uint64_t code, kj::StringPtr reason) override { connection->close(code, reason); }
  kj::Promise<void> onClosed() override { return closed.addBranch(); }
  bool isClosed() const override { return connection->closeInfo() != nullptr; }

  kj::String closeDescription() const override {
    KJ_IF_MAYBE(info, connection->closeInfo()) return describeClose(*info);
    return kj::str("connection open");
  }

  kj::Maybe<PeerClose> peerClose() const override {
    KJ_IF_MAYBE(info, connection->closeInfo()) {
      if (info->kind == quic::CloseKind::PEER_APPLICATION_CLOSE ||
          info->kind == quic::CloseKind::PEER_TRANSPORT_CLOSE) {
        return PeerClose{info->code, kj::str(info->reason)};
      }
    }
    return nullptr;
  }

  observe::TunnelStatus::QuicSample sample() const override {
    observe::TunnelStatus::QuicSample out;
    auto s = connection->stats();
    out.smoothedRtt = s.smoothedRtt;
    out.minRtt = s.minRtt;
    out.latestRtt = s.latestRtt;
    out.congestionWindow = s.congestionWindow;
    out.bytesSent = s.bytesSent;
    out.bytesReceived = s.bytesReceived;
    out.packetsSent = s.packetsSent;
    out.packetsReceived = s.packetsReceived;
    out.ptoTotal = s.ptoTotal;
    out.streamsActive = s.streamsActive;
    return out;
  }

  kj::Duration blockedFor() const override { return connection->stats().connectionBlockedFor; }

private:
  kj::Own<quic::Endpoint> endpoint;      // outlives the connection (declared first)
  kj::Own<quic::Connection> connection;
  kj::ForkedPromise<void> closed;
};

}  // namespace

kj::Promise<QuicDialResult> tryDialQuicTransport(kj::UnixEventPort& eventPort,
                                                 const edge::EdgeAddress& address,
                                                 quic::ClientConfig config) {
  kj::byte storage[32];
  kj::uint len = address.writeSockaddr(kj::arrayPtr(storage, sizeof(storage)));
  auto remote = quic::SocketAddress::fromSockaddr(storage, len);
  auto bind = KJ_ASSERT_NONNULL(quic::SocketAddress::parse(
      remote.isIpv6() ? "[::]:0"_kj : "0.0.0.0:0"_kj));
  kj::Own<quic::Endpoint> endpoint;
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
    endpoint = quic::newEndpoint(eventPort, bind);
  })) {
    return QuicDialResult(QuicDialFailure{
        QuicDialFailure::Cause::UDP_SOCKET, 0,
        kj::Exception(kj::Exception::Type::FAILED, __FILE__, __LINE__,
                      kj::str("cannot open a UDP socket: ", e->getDescription()))});
  }
  using Outcome = kj::OneOf<kj::Own<quic::Connection>, kj::Exception>;
  auto dialing = endpoint->dial(remote, kj::mv(config))
      .then([](kj::Own<quic::Connection> c) -> Outcome { return kj::mv(c); },
            [](kj::Exception&& e) -> Outcome { return kj::mv(e); });
  return dialing.then([endpoint = kj::mv(endpoint)](Outcome outcome) mutable -> QuicDialResult {
    KJ_SWITCH_ONEOF(outcome) {
      KJ_CASE_ONEOF(connection, kj::Own<quic::Connection>) {
        return kj::Own<EdgeTransport>(
            kj::heap<QuicEdgeTransport>(kj::mv(endpoint), kj::mv(connection)));
      }
      KJ_CASE_ONEOF(e, kj::Exception) {
        // The endpoint serves this one dial, so its statistics are this dial's.
        auto stats = endpoint->stats();
        if (stats.sendsRefused > 0) {
          return QuicDialFailure{QuicDialFailure::Cause::SEND_REFUSED, stats.sendRefusedErrno,
                                 kj::mv(e)};
        }
        auto cause = quic::classifyException(e) == quic::CloseKind::HANDSHAKE_TIMEOUT
            ? QuicDialFailure::Cause::NO_ANSWER : QuicDialFailure::Cause::OTHER;
        return QuicDialFailure{cause, 0, kj::mv(e)};
      }
    }
    KJ_UNREACHABLE;
  });
}

kj::Promise<kj::Own<EdgeTransport>> dialQuicTransport(kj::UnixEventPort& eventPort,
                                                      const edge::EdgeAddress& address,
                                                      quic::ClientConfig config) {
  return tryDialQuicTransport(eventPort, address, kj::mv(config))
      .then([](QuicDialResult result) -> kj::Promise<kj::Own<EdgeTransport>> {
    KJ_SWITCH_ONEOF(result) {
      KJ_CASE_ONEOF(transport, kj::Own<EdgeTransport>) return kj::mv(transport);
      KJ_CASE_ONEOF(failure, QuicDialFailure) return kj::mv(failure.exception);
    }
    KJ_UNREACHABLE;
  });
}

}  // namespace cfqt::tunnel
