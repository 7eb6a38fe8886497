#include "h2-edge.h"

#include "json.h"
#include "random.h"

#include "http2/header.h"
#include "wire/control.h"
#include "observe/log.h"

#include <capnp/compat/json.h>
#include <capnp/message.h>
#include <kj/debug.h>
#include <kj/io.h>

#include <fcntl.h>

namespace cfqt::emulator {

namespace {

constexpr size_t MAX_CONFIGURATION_ANSWER_BYTES = 64 * 1024;

// The edge's own requests (control stream, configuration): cloudflared's test client's URL.
constexpr kj::StringPtr INTERNAL_SCHEME = "http"_kj;
constexpr kj::StringPtr INTERNAL_AUTHORITY = "localhost:8080"_kj;
constexpr kj::StringPtr INTERNAL_PATH = "/"_kj;
constexpr kj::StringPtr UPGRADE_HEADER = "cf-cloudflared-proxy-connection-upgrade"_kj;

// Forwarded headers HTTP/2 forbids (RFC 9113 §8.2.2; Go's server refuses a request carrying
// them), and Host, which becomes :authority.
constexpr kj::StringPtr DROPPED_REQUEST_HEADERS[] = {
  "connection"_kj, "keep-alive"_kj, "proxy-connection"_kj, "transfer-encoding"_kj, "upgrade"_kj,
  "host"_kj, "http2-settings"_kj,
};

kj::String readText(kj::StringPtr path) {
  int fd;
  KJ_SYSCALL(fd = open(path.cStr(), O_RDONLY | O_CLOEXEC), path);
  kj::FdInputStream in((kj::AutoCloseFd(fd)));
  auto bytes = in.readAllBytes();
  return kj::heapString(bytes.asChars());
}

bool containsIgnoreCase(kj::StringPtr haystack, kj::StringPtr needle) {
  auto lower = toLower(haystack);
  auto lowerNeedle = toLower(needle);
  return strstr(lower.cStr(), lowerNeedle.cStr()) != nullptr;
}

kj::Maybe<uint64_t> parseDecimal(kj::StringPtr text) {
  if (text.size() == 0 || text.size() > 19) return nullptr;
  uint64_t value = 0;
  for (char c: text) {
    if (c < '0' || c > '9') return nullptr;
    value = value * 10 + static_cast<uint64_t>(c - '0');
  }
  return value;
}

wire::Header header(kj::StringPtr name, kj::StringPtr value) {
  return wire::Header{kj::heapString(name), kj::heapString(value)};
}

struct SplitDest {
  kj::String scheme;
  kj::String path;   // path + query, starting with '/'
};

SplitDest splitDest(kj::StringPtr dest) {
  // "https://host/path?query" -> ("https", "/path?query"); a bare path keeps scheme https.
  if (dest.startsWith("/")) return {kj::str("https"), kj::str(dest)};
  KJ_IF_MAYBE(colon, dest.findFirst(':')) {
    auto rest = dest.slice(*colon + 1);
    if (rest.startsWith("//")) {
      rest = rest.slice(2);
      for (size_t i = 0; i < rest.size(); i++) {
        if (rest[i] == '/') return {kj::str(dest.slice(0, *colon)), kj::str(rest.slice(i))};
        if (rest[i] == '?') return {kj::str(dest.slice(0, *colon)), kj::str('/', rest.slice(i))};
      }
      return {kj::str(dest.slice(0, *colon)), kj::str("/")};
    }
  }
  return {kj::str("https"), kj::str("/")};
}

kj::Array<wire::Header> internalRequestHeaders(kj::StringPtr method, kj::StringPtr upgrade,
                                               kj::Maybe<size_t> contentLength) {
  kj::Vector<wire::Header> out;
  out.add(header(":method", method));
  out.add(header(":scheme", INTERNAL_SCHEME));
  out.add(header(":authority", INTERNAL_AUTHORITY));
  out.add(header(":path", INTERNAL_PATH));
  out.add(header(UPGRADE_HEADER, upgrade));
  KJ_IF_MAYBE(length, contentLength) out.add(wire::Header{kj::str("content-length"),
                                                          kj::str(*length)});
  return out.releaseAsArray();
}

kj::Maybe<kj::StringPtr> firstHeader(kj::ArrayPtr<const wire::Header> headers,
                                     kj::StringPtr name) {
  for (auto& h: headers) {
    if (equalsIgnoreCase(h.name, name)) return h.value.asPtr();
  }
  return nullptr;
}

RegistrationRequest toRegistrationRequest(const wire::RegistrationParams& params) {
  RegistrationRequest request;
  request.accountTag = kj::heapString(params.accountTag);
  request.tunnelSecret = kj::heapArray(params.tunnelSecret.asPtr());
  request.tunnelId = kj::heapArray(params.tunnelId.asPtr());
  request.connIndex = params.connIndex;
  request.clientId = kj::heapArray(params.clientId.asPtr());
  request.features = KJ_MAP(f, params.features) { return kj::heapString(f); };
  request.version = kj::heapString(params.version);
  request.arch = kj::heapString(params.arch);
  request.originLocalIp = kj::heapArray(params.originLocalIp.asPtr());
  request.replaceExisting = params.replaceExisting;
  request.numPreviousAttempts = params.numPreviousAttempts;
  return request;
}

kj::String configurationAnswerJson(kj::String text) {
  // cloudflared's answer is json.Marshal(UpdateConfigurationResponse):
  // {"lastAppliedVersion":N,"err":null} -- `err` is a Go error value, so it marshals as null or
  // an object without text. Rendered like the QUIC path: {"latestAppliedVersion":N,"err":"..."}.
  capnp::JsonCodec codec;
  capnp::MallocMessageBuilder message;
  auto root = message.initRoot<capnp::JsonValue>();
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() { codec.decodeRaw(text, root); })) {
    kj::throwFatalException(KJ_EXCEPTION(FAILED,
        "the client's configuration answer is not JSON", e->getDescription()));
  }
  if (!root.asReader().isObject()) {
    kj::throwFatalException(KJ_EXCEPTION(FAILED, "the client's configuration answer is not an "
                                                 "object", text));
  }
  kj::Maybe<int64_t> version;
  kj::String err = kj::str();
  for (auto field: root.asReader().getObject()) {
    auto value = field.getValue();
    if (field.getName() == "lastAppliedVersion" && value.isNumber()) {
      version = static_cast<int64_t>(value.getNumber());
    } else if (field.getName() == "err") {
      if (value.isString()) {
        err = kj::str(value.getString());
      } else if (!value.isNull()) {
        err = codec.encodeRaw(value);
      }
    }
  }
  KJ_IF_MAYBE(v, version) {
    return kj::str("{\"latestAppliedVersion\":", *v, ",\"err\":", jsonString(err), '}');
  }
  kj::throwFatalException(KJ_EXCEPTION(FAILED,
      "the client's configuration answer has no lastAppliedVersion", text));
}

class Http2Exchange final: public TunnelExchange {
  // One visitor request as an HTTP/2 request on the client's connection.
public:
  explicit Http2Exchange(kj::Own<Http2Stream> streamParam): stream(kj::mv(streamParam)) {}
  KJ_DISALLOW_COPY(Http2Exchange);

  kj::Promise<void> sendHead(const wire::HttpRequestHead& head) override {
    websocket = head.type == wire::schema::ConnectionType::WEBSOCKET;
    auto headers = http2RequestHeaders(head);
    bool body = http2RequestHasBody(head);
    KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() { stream->submit(headers, !body); })) {
      return kj::mv(*e);
    }
    return kj::READY_NOW;
  }

  kj::Promise<kj::OneOf<wire::HttpResponseHead, wire::WireError>> readResponseHead() override {
    return stream->receiveHead().then([websocket = websocket](Http2Head&& response) {
      return decodeHttp2Head(response, websocket);
    });
  }

  kj::Promise<size_t> tryRead(void* buffer, size_t minBytes, size_t maxBytes) override {
    return stream->tryRead(buffer, minBytes, maxBytes);
  }
  kj::Promise<void> write(const void* buffer, size_t size) override {
    return stream->write(buffer, size);
  }
  kj::Promise<void> write(kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces) override {
    return stream->write(pieces);
  }
  kj::Promise<void> whenWriteDisconnected() override { return stream->whenWriteDisconnected(); }
  void shutdownWrite() override { stream->shutdownWrite(); }

private:
  kj::Own<Http2Stream> stream;
  bool websocket = false;
};

}  // namespace

kj::Array<wire::Header> http2RequestHeaders(const wire::HttpRequestHead& head) {
  auto dest = splitDest(head.dest);
  kj::Vector<wire::Header> out(head.headers.size() + 5);
  out.add(header(":method", head.method));
  out.add(wire::Header{kj::str(":scheme"), kj::mv(dest.scheme)});
  out.add(header(":authority", head.host));
  out.add(wire::Header{kj::str(":path"), kj::mv(dest.path)});
  for (auto& h: head.headers) {
    auto name = toLower(h.name);
    bool dropped = false;
    for (auto& d: DROPPED_REQUEST_HEADERS) {
      if (name == d) dropped = true;
    }
    if (name == "te" && h.value != "trailers") dropped = true;
    if (!dropped) out.add(wire::Header{kj::mv(name), kj::heapString(h.value)});
  }
  if (head.type == wire::schema::ConnectionType::WEBSOCKET) {
    out.add(header(UPGRADE_HEADER, http2::UPGRADE_WEBSOCKET));
  }
  return out.releaseAsArray();
}

bool http2RequestHasBody(const wire::HttpRequestHead& head) {
  if (head.type == wire::schema::ConnectionType::WEBSOCKET) return true;
  KJ_IF_MAYBE(te, firstHeader(head.headers, "Transfer-Encoding")) {
    if (containsIgnoreCase(*te, "chunked")) return true;
  }
  KJ_IF_MAYBE(length, firstHeader(head.headers, "Content-Length")) {
    return parseDecimal(*length).orDefault(0) > 0;
  }
  return false;
}

kj::OneOf<wire::HttpResponseHead, wire::WireError> decodeHttp2Head(
    const Http2Head& response, bool websocket) {
  wire::HttpResponseHead head;
  KJ_IF_MAYBE(meta, firstHeader(response.headers, http2::RESPONSE_META_HEADER)) {
    if (strstr(meta->cStr(), "\"src\":\"cloudflared\"") != nullptr) {
      head.error = kj::str("cloudflared answered ", response.status, " with ",
                           http2::RESPONSE_META_HEADER, ": ", *meta);
      return kj::mv(head);
    }
  }
  head.status = response.status;
  KJ_IF_MAYBE(serialized, firstHeader(response.headers, http2::RESPONSE_USER_HEADERS)) {
    auto decoded = http2::deserializeHeaders(*serialized);
    KJ_SWITCH_ONEOF(decoded) {
      KJ_CASE_ONEOF(error, wire::WireError) {
        return kj::mv(error);
      }
      KJ_CASE_ONEOF(headers, kj::Array<wire::Header>) {
        for (auto& h: headers) head.headers.add(kj::mv(h));
      }
    }
  } else KJ_IF_MAYBE(length, firstHeader(response.headers, "content-length")) {
    head.headers.add(header("Content-Length", *length));
  }
  if (websocket && head.status == 200) {
    bool upgraded = false;
    for (auto& h: head.headers) {
      if (equalsIgnoreCase(h.name, "Sec-Websocket-Accept") ||
          (equalsIgnoreCase(h.name, "Upgrade") && containsIgnoreCase(h.value, "websocket"))) {
        upgraded = true;
      }
    }
    if (upgraded) head.status = 101;
  }
  return kj::mv(head);
}

// =============================================================================================

class Http2EdgeServer::Connection final: public ClientConnection,
                                         public wire::RegistrationPolicy,
                                         public wire::ControlObserver,
                                         public Http2SessionObserver {
public:
  Connection(Http2EdgeServer& server, kj::Own<kj::AsyncIoStream> secured, kj::String remote)
      : server(server), remote(kj::mv(remote)),
        session(kj::heap<Http2Session>(server.timer, kj::mv(secured), *this,
                                       server.options.session)),
        tasks(server.errorHandler) {}
  KJ_DISALLOW_COPY(Connection);
  ~Connection() noexcept(false) {
    server.registry.connectionClosed(*this);
  }

  kj::Promise<void> run() {
    auto done = session->run();
    startControl();
    return done.then([this]() { onClosed(); });
  }

  // ClientConnection --------------------------------------------------------------------------

  kj::Promise<kj::Own<kj::AsyncIoStream>> openStream() override {
    return KJ_EXCEPTION(UNIMPLEMENTED, "an HTTP/2 tunnel connection has no raw streams");
  }

  kj::Promise<kj::Own<TunnelExchange>> openExchange() override {
    if (!session->isOpen()) {
      return KJ_EXCEPTION(DISCONNECTED, "the HTTP/2 connection takes no new requests", remote,
                          session->closeReason());
    }
    return kj::Own<TunnelExchange>(kj::heap<Http2Exchange>(session->newStream()));
  }

  kj::StringPtr protocol() override { return "http2"; }

  void close(uint64_t code, kj::StringPtr reason) override {
    observe::logDebug("closing HTTP/2 client connection", observe::Fields().add("remote", remote)
        .add("code", code).add("reason", reason));
    stopRouting();
    session->close(static_cast<uint32_t>(code), reason);
  }

  void goSilent() override {
    observe::logDebug("going silent on HTTP/2 client connection", observe::Fields()
        .add("remote", remote));
    session->goSilent();
  }

  bool withholdCredit(kj::Maybe<int64_t> streamId) override {
    KJ_IF_MAYBE(id, streamId) {
      if (*id <= 0 || *id > INT32_MAX) return false;
      KJ_IF_MAYBE(stream, session->findStream(static_cast<int32_t>(*id))) {
        stream->setCreditWithheld(true);
        return true;
      }
      return false;
    }
    session->setWithholdNew(true);
    return true;
  }

  bool closeControlStream(ControlEnd how, uint64_t code) override {
    if (controlStream.get() == nullptr || controlEnded) return false;
    controlEnded = true;
    observe::logDebug("ending the HTTP/2 control stream (admin API)", observe::Fields()
        .add("remote", remote).add("how", how == ControlEnd::RESET ? "reset" : "fin")
        .add("code", code));
    controlWatch = nullptr;
    stopRouting();
    control = nullptr;    // the RPC session ends first: nothing writes to the stream afterwards
    if (how == ControlEnd::RESET) {
      controlStream->reset(static_cast<uint32_t>(code));
    } else {
      controlStream->shutdownWrite();
    }
    return true;
  }

  kj::Promise<kj::String> pushConfiguration(int32_t version, kj::String json) override {
    if (!session->isOpen()) {
      return KJ_EXCEPTION(DISCONNECTED, "the HTTP/2 connection takes no new requests", remote);
    }
    auto body = kj::str("{\"version\":", version, ",\"config\":", json, '}');
    auto stream = session->newStream();
    auto& ref = *stream;
    return canceler.wrap(kj::evalNow([&]() {
      ref.submit(internalRequestHeaders("PUT", http2::UPGRADE_CONFIGURATION, body.size()), false);
      return ref.write(body.begin(), body.size());
    }).then([&ref]() {
      ref.shutdownWrite();
      return ref.receiveHead();
    }).then([&ref](Http2Head&& response) {
      return readConfigurationAnswer(ref, kj::mv(response));
    }).attach(kj::mv(stream), kj::mv(body)));
  }

  kj::String remoteAddress() override { return kj::heapString(remote); }

  kj::String describeStats() override {
    if (!session->isOpen() && session->closeReason().size() > 0) return kj::str("null");
    auto s = session->stats();
    return kj::str(
        "{\"transport\":\"http2\",\"bytesSent\":", s.bytesSent,
        ",\"bytesReceived\":", s.bytesReceived, ",\"streamsOpened\":", s.streamsOpened,
        ",\"openStreams\":", s.openStreams, ",\"recvBufferedBytes\":", s.recvBufferedBytes,
        ",\"sendBufferedBytes\":", s.sendBufferedBytes,
        ",\"silent\":", s.silent ? "true" : "false", '}');
  }

  // wire::RegistrationPolicy ------------------------------------------------------------------

  kj::Promise<wire::RegistrationResult> decide(const wire::RegistrationParams& params) override {
    auto outcome = server.registry.registerConnection(*this, toRegistrationRequest(params));
    KJ_SWITCH_ONEOF(outcome) {
      KJ_CASE_ONEOF(record, ConnectionRecord*) {
        recordIds.add(record->id);
        observe::logDebug("registered tunnel connection over HTTP/2", observe::Fields()
            .add("id", record->id).add("tunnelId", record->tunnel.id)
            .add("connIndex", record->connIndex).add("remote", remote)
            .add("version", record->version));
        return wire::RegistrationResult(wire::ConnectionDetails{
            kj::heapArray(record->uuid.asPtr()), kj::heapString(server.registry.locationName()),
            record->tunnel.remotelyManaged});
      }
      KJ_CASE_ONEOF(error, RegistrationError) {
        observe::logDebug("registration refused", observe::Fields().add("remote", remote)
            .add("cause", error.cause));
        return wire::RegistrationResult(wire::RegistrationError{
            kj::mv(error.cause), error.retryAfterNanos * kj::NANOSECONDS, error.shouldRetry});
      }
    }
    KJ_UNREACHABLE;
  }

  // wire::ControlObserver ---------------------------------------------------------------------

  void unregistered() override {
    observe::logDebug("client unregistered its HTTP/2 connection", observe::Fields()
        .add("remote", remote));
    stopRouting();
  }

  void configurationUpdated(kj::ArrayPtr<const kj::byte> json) override {
    if (recordIds.empty()) return;
    KJ_IF_MAYBE(record, server.registry.findConnection(recordIds.back())) {
      server.registry.setConfiguration(*record,
          kj::heapString(reinterpret_cast<const char*>(json.begin()), json.size()));
    }
  }

  // Http2SessionObserver ----------------------------------------------------------------------

  void peerGoAway(uint32_t errorCode, kj::StringPtr debugData) override {
    // Called inside an nghttp2 callback: only bookkeeping here.
    observe::logDebug("the client sent GOAWAY", observe::Fields().add("remote", remote)
        .add("errorCode", errorCode).add("debugData", debugData));
    stopRouting();
  }

private:
  Http2EdgeServer& server;
  kj::String remote;
  kj::Own<Http2Session> session;
  kj::Own<Http2Stream> controlStream;        // after the session: forgotten before it dies
  kj::Own<wire::ControlServer> control;
  bool controlEnded = false;                 // by the client, or by closeControlStream()
  kj::Maybe<kj::Promise<void>> controlWatch; // control->onDisconnect(), dropped before `control`
  kj::Vector<kj::uint> recordIds;
  kj::Canceler canceler;
  kj::TaskSet tasks;

  void startControl() {
    // PROTOCOL.md §6.10: the edge's first request is the control stream; its bodies carry the
    // RPC in both directions, so the request is never ended by the edge.
    controlStream = session->newStream();
    controlStream->submit(internalRequestHeaders("GET", http2::UPGRADE_CONTROL_STREAM, nullptr),
                          false);
    control = kj::heap<wire::ControlServer>(*controlStream, *this, *this);
    controlWatch = control->onDisconnect().then([this]() { onControlEnded(); })
        .eagerlyEvaluate([this](kj::Exception&& e) {
      observe::logDebug("HTTP/2 control stream failed", observe::Fields().add("remote", remote)
          .error(e));
      onControlEnded();
    });
    tasks.add(controlStream->receiveHead().then([this](Http2Head&& response) {
      onControlResponse(response);
    }, [](kj::Exception&&) {}));
  }

  void onControlResponse(const Http2Head& response) {
    // cloudflared answers the control stream with 200 once it writes its first RPC message; a
    // 502 means its control stream handler failed before that.
    if (response.status != 200) {
      observe::logDebug("the client answered the control stream with", observe::Fields()
          .add("status", response.status).add("remote", remote));
    }
  }

  void onControlEnded() {
    // As on QUIC (PROTOCOL.md §10.4 step 6): the control stream ending means the client is
    // leaving; requests in flight finish, new ones go elsewhere.
    observe::logDebug("HTTP/2 control stream ended", observe::Fields().add("remote", remote));
    controlEnded = true;
    stopRouting();
  }

  void stopRouting() {
    for (auto id: recordIds) {
      KJ_IF_MAYBE(record, server.registry.findConnection(id)) {
        if (record->state == ConnectionState::REGISTERED) {
          server.registry.unregisterConnection(*record);
          observe::logDebug("tunnel connection unregistered", observe::Fields().add("id", id)
              .add("remote", remote));
        }
      }
    }
  }

  void onClosed() {
    observe::logDebug("HTTP/2 client connection ended", observe::Fields().add("remote", remote)
        .add("reason", session->closeReason()));
    server.registry.connectionClosed(*this);
    canceler.cancel(KJ_EXCEPTION(DISCONNECTED, "the HTTP/2 connection ended", remote,
                                 session->closeReason()));
  }

  static kj::Promise<kj::String> readConfigurationAnswer(Http2Stream& stream,
                                                         Http2Head&& response) {
    if (response.status != 200) {
      return KJ_EXCEPTION(FAILED, "the client refused the configuration update", response.status);
    }
    return stream.readAllText(MAX_CONFIGURATION_ANSWER_BYTES).then([](kj::String text) {
      return configurationAnswerJson(kj::mv(text));
    });
  }
};

// =============================================================================================

void Http2EdgeServer::ErrorHandler::taskFailed(kj::Exception&& exception) {
  if (exception.getType() == kj::Exception::Type::DISCONNECTED) {
    observe::logDebug("HTTP/2 edge task ended", observe::Fields().error(exception));
  } else {
    observe::logError("HTTP/2 edge task failed", observe::Fields().error(exception));
  }
}

Http2EdgeServer::Http2EdgeServer(kj::Timer& timer, Registry& registry,
                                 Http2EdgeOptions optionsParam)
    : timer(timer), registry(registry), options(kj::mv(optionsParam)),
      keypair(kj::TlsKeypair{kj::TlsPrivateKey(readText(options.keyFile)),
                             kj::TlsCertificate(readText(options.certFile))}),
      tls(makeTls()), tasks(errorHandler) {}

Http2EdgeServer::~Http2EdgeServer() noexcept(false) {}

kj::Own<kj::TlsContext> Http2EdgeServer::makeTls() {
  kj::TlsContext::Options tlsOptions;
  tlsOptions.useSystemTrustStore = false;
  tlsOptions.defaultKeypair = keypair;
  tlsOptions.timer = timer;
  tlsOptions.acceptTimeout = options.handshakeTimeout;
  return kj::heap<kj::TlsContext>(kj::mv(tlsOptions));
}

void Http2EdgeServer::listen(kj::Own<kj::ConnectionReceiver> receiver) {
  auto& ref = *receiver;
  tasks.add(acceptLoop(ref).attach(kj::mv(receiver)));
}

kj::Promise<void> Http2EdgeServer::acceptLoop(kj::ConnectionReceiver& receiver) {
  return receiver.acceptAuthenticated().then([this, &receiver](kj::AuthenticatedStream stream) {
    tasks.add(serve(kj::mv(stream)));
    return acceptLoop(receiver);
  });
}

kj::Promise<void> Http2EdgeServer::serve(kj::AuthenticatedStream stream) {
  kj::String remote = kj::str("unknown");
  KJ_IF_MAYBE(peer, kj::dynamicDowncastIfAvailable<kj::NetworkPeerIdentity>(
                        *stream.peerIdentity)) {
    remote = peer->getAddress().toString();
  }
  return tls->wrapServer(kj::mv(stream.stream))
      .then([this, remote = kj::mv(remote)](kj::Own<kj::AsyncIoStream> secured) mutable {
    return serveConnection(kj::mv(secured), kj::mv(remote));
  }).catch_([](kj::Exception&& e) {
    observe::logDebug("HTTP/2 edge connection ended", observe::Fields().error(e));
  });
}

kj::Promise<void> Http2EdgeServer::serveConnection(kj::Own<kj::AsyncIoStream> secured,
                                                   kj::String remote) {
  observe::logDebug("HTTP/2 client connected", observe::Fields().add("remote", remote));
  auto connection = kj::heap<Connection>(*this, kj::mv(secured), kj::mv(remote));
  liveConnections++;
  auto promise = connection->run();
  return promise.attach(kj::mv(connection), kj::defer([this]() { liveConnections--; }));
}

}  // namespace cfqt::emulator
