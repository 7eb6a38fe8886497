// EdgeConnection over the HTTP/2 transport (http2-transport.h) against a fake edge: an nghttp2
// *client* on the other end of an in-memory pipe, handed to EdgeConnection through
// EdgeContext::dialer. Registration over the control-stream request's bodies, visitor requests
// answered with cloudflared's HTTP/2 response headers, failures, cancellation, remote
// configuration and graceful shutdown.

#include "tunnel/http2-transport.h"

#include "tunnel/edge-connection.h"

#include "http2/header.h"
#include "wire/control.h"
#include "eventually.h"

#include <nghttp2/nghttp2.h>

#include <kj/async-io.h>
#include <kj/compat/http.h>
#include <kj/debug.h>
#include <kj/map.h>
#include <kj/test.h>
#include <kj/vector.h>

#include <string.h>

namespace cfqt::tunnel {
namespace {

kj::Array<kj::byte> bytes16(kj::byte seed) {
  auto a = kj::heapArray<kj::byte>(16);
  for (auto i: kj::indices(a)) a[i] = seed + i;
  return a;
}

struct H {
  kj::StringPtr name;
  kj::StringPtr value;
};

// =======================================================================================
// The fake edge: an nghttp2 client over the pipe

struct ClientStream {
  int32_t id = 0;
  kj::uint status = 0;
  kj::Vector<wire::Header> headers;     // response headers (":status" excluded)
  kj::Vector<kj::byte> body;
  bool endStream = false;               // END_STREAM received
  bool closed = false;
  uint32_t closeCode = 0;
  kj::Vector<kj::byte> upload;          // request body to send
  size_t uploadOffset = 0;
  bool uploadEnd = true;                // END_STREAM once `upload` is sent
  bool uploadDeferred = false;

  kj::String bodyText() const {
    // A copy: a StringPtr must be NUL-terminated (checked in debug builds).
    return kj::heapString(reinterpret_cast<const char*>(body.begin()), body.size());
  }
  kj::Maybe<kj::StringPtr> header(kj::StringPtr name) const {
    for (auto& h: headers) {
      if (h.name == name) return h.value.asPtr();
    }
    return nullptr;
  }
  bool done() const { return endStream || closed; }
  kj::StringPtr meta() const { return header("cf-cloudflared-response-meta").orDefault("-"); }
};

class TestEdge final: private kj::TaskSet::ErrorHandler {
  // The edge's end of the HTTP/2 connection. Every frame received wakes changed()'s waiters.
public:
  explicit TestEdge(kj::AsyncIoStream& transport): transport(transport), tasks(*this) {
    nghttp2_session_callbacks* callbacks;
    KJ_ASSERT(nghttp2_session_callbacks_new(&callbacks) == 0);
    KJ_DEFER(nghttp2_session_callbacks_del(callbacks));
    nghttp2_session_callbacks_set_on_header_callback(callbacks, onHeader);
    nghttp2_session_callbacks_set_on_frame_recv_callback(callbacks, onFrameRecv);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(callbacks, onDataChunk);
    nghttp2_session_callbacks_set_on_stream_close_callback(callbacks, onStreamClose);
    KJ_ASSERT(nghttp2_session_client_new(&session, callbacks, this) == 0);
    KJ_ASSERT(nghttp2_submit_settings(session, NGHTTP2_FLAG_NONE, nullptr, 0) == 0);
    reading = readLoop().eagerlyEvaluate([this](kj::Exception&& e) {
      failure = kj::mv(e);
      notify();
    });
    scheduleWrite();
  }
  ~TestEdge() noexcept(false) {
    reading = nullptr;
    nghttp2_session_del(session);
  }
  KJ_DISALLOW_COPY(TestEdge);

  kj::HashMap<int32_t, kj::Own<ClientStream>> streams;
  bool goAwayReceived = false;
  uint32_t goAwayCode = 0;
  bool eof = false;
  kj::Maybe<kj::Exception> failure;

  int32_t request(kj::ArrayPtr<const H> headers, kj::Maybe<kj::ArrayPtr<const kj::byte>> upload,
                  bool uploadEnd = true) {
    auto stream = kj::heap<ClientStream>();
    auto nva = KJ_MAP(h, headers) {
      return nghttp2_nv{const_cast<uint8_t*>(h.name.asBytes().begin()),
                        const_cast<uint8_t*>(h.value.asBytes().begin()), h.name.size(),
                        h.value.size(), NGHTTP2_NV_FLAG_NONE};
    };
    nghttp2_data_provider provider;
    provider.source.ptr = stream.get();
    provider.read_callback = readUpload;
    bool withBody = false;
    KJ_IF_MAYBE(u, upload) {
      stream->upload.addAll(*u);
      stream->uploadEnd = uploadEnd;
      withBody = true;
    }
    int32_t id = nghttp2_submit_request(session, nullptr, nva.begin(), nva.size(),
                                        withBody ? &provider : nullptr, stream.get());
    KJ_ASSERT(id > 0, nghttp2_strerror(id));
    stream->id = id;
    streams.insert(id, kj::mv(stream));
    scheduleWrite();
    return id;
  }

  ClientStream& stream(int32_t id) { return *KJ_ASSERT_NONNULL(streams.find(id)); }

  void appendUpload(int32_t id, kj::ArrayPtr<const kj::byte> data, bool end) {
    auto& s = stream(id);
    s.upload.addAll(data);
    s.uploadEnd = end;
    if (s.uploadDeferred) {
      s.uploadDeferred = false;
      nghttp2_session_resume_data(session, id);
    }
    scheduleWrite();
  }

  void reset(int32_t id, uint32_t code) {
    KJ_ASSERT(nghttp2_submit_rst_stream(session, NGHTTP2_FLAG_NONE, id, code) == 0);
    scheduleWrite();
  }

  void goAway(uint32_t code, kj::StringPtr debugData = nullptr) {
    KJ_ASSERT(nghttp2_submit_goaway(session, NGHTTP2_FLAG_NONE, 0, code,
                                    debugData.asBytes().begin(), debugData.size()) == 0);
    scheduleWrite();
  }

  kj::Promise<void> flushed() {
    // Resolves once everything submitted was written (the pipe: read by the other end).
    if (!writing) return kj::READY_NOW;
    auto paf = kj::newPromiseAndFulfiller<void>();
    flushWaiters.add(kj::mv(paf.fulfiller));
    return kj::mv(paf.promise);
  }

  kj::Promise<void> changed() {
    // Resolves on the next frame (or EOF, or failure) received.
    auto paf = kj::newPromiseAndFulfiller<void>();
    waiters.add(kj::mv(paf.fulfiller));
    return kj::mv(paf.promise);
  }

private:
  kj::AsyncIoStream& transport;
  nghttp2_session* session;
  kj::byte readBuffer[16 * 1024];
  bool writing = false;
  kj::Vector<kj::Own<kj::PromiseFulfiller<void>>> waiters;
  kj::Vector<kj::Own<kj::PromiseFulfiller<void>>> flushWaiters;
  kj::Maybe<kj::Promise<void>> reading;
  kj::TaskSet tasks;

  static TestEdge& self(void* user) { return *static_cast<TestEdge*>(user); }

  void notify() {
    auto list = kj::mv(waiters);
    for (auto& w: list) w->fulfill();
  }

  static int onHeader(nghttp2_session*, const nghttp2_frame* frame, const uint8_t* name,
                      size_t nameLen, const uint8_t* value, size_t valueLen, uint8_t,
                      void* user) {
    KJ_IF_MAYBE(s, self(user).streams.find(frame->hd.stream_id)) {
      auto n = kj::heapString(reinterpret_cast<const char*>(name), nameLen);
      auto v = kj::heapString(reinterpret_cast<const char*>(value), valueLen);
      if (n == ":status") {
        (*s)->status = v.parseAs<kj::uint>();   // our own server's output
      } else {
        (*s)->headers.add(wire::Header{kj::mv(n), kj::mv(v)});
      }
    }
    return 0;
  }

  static int onFrameRecv(nghttp2_session*, const nghttp2_frame* frame, void* user) {
    auto& c = self(user);
    if (frame->hd.type == NGHTTP2_GOAWAY) {
      c.goAwayReceived = true;
      c.goAwayCode = frame->goaway.error_code;
    }
    if ((frame->hd.type == NGHTTP2_HEADERS || frame->hd.type == NGHTTP2_DATA) &&
        (frame->hd.flags & NGHTTP2_FLAG_END_STREAM)) {
      KJ_IF_MAYBE(s, c.streams.find(frame->hd.stream_id)) (*s)->endStream = true;
    }
    return 0;
  }

  static int onDataChunk(nghttp2_session*, uint8_t, int32_t id, const uint8_t* data, size_t len,
                         void* user) {
    KJ_IF_MAYBE(s, self(user).streams.find(id)) {
      (*s)->body.addAll(kj::arrayPtr(reinterpret_cast<const kj::byte*>(data), len));
    }
    return 0;
  }

  static int onStreamClose(nghttp2_session*, int32_t id, uint32_t code, void* user) {
    KJ_IF_MAYBE(s, self(user).streams.find(id)) {
      (*s)->closed = true;
      (*s)->closeCode = code;
    }
    return 0;
  }

  static ssize_t readUpload(nghttp2_session*, int32_t, uint8_t* buf, size_t length,
                            uint32_t* flags, nghttp2_data_source* source, void*) {
    auto& s = *static_cast<ClientStream*>(source->ptr);
    size_t n = kj::min(length, s.upload.size() - s.uploadOffset);
    if (n > 0) memcpy(buf, s.upload.begin() + s.uploadOffset, n);
    s.uploadOffset += n;
    if (s.uploadOffset == s.upload.size()) {
      if (s.uploadEnd) {
        *flags |= NGHTTP2_DATA_FLAG_EOF;
      } else if (n == 0) {
        s.uploadDeferred = true;
        return NGHTTP2_ERR_DEFERRED;
      }
    }
    return ssize_t(n);
  }

  kj::Promise<void> readLoop() {
    return transport.tryRead(readBuffer, 1, sizeof(readBuffer)).then([this](size_t n) {
      return onRead(n);
    });
  }

  kj::Promise<void> onRead(size_t n) {
    if (n == 0) {
      eof = true;
      notify();
      return kj::READY_NOW;
    }
    ssize_t rv = nghttp2_session_mem_recv(session, readBuffer, n);
    KJ_ASSERT(rv >= 0, nghttp2_strerror(int(rv)));
    scheduleWrite();
    notify();
    return readLoop();
  }

  void scheduleWrite() {
    if (writing) return;
    writing = true;
    tasks.add(kj::evalLater([this]() { return writeLoop(); }));
  }

  kj::Promise<void> writeLoop() {
    const uint8_t* data;
    ssize_t n = nghttp2_session_mem_send(session, &data);
    KJ_ASSERT(n >= 0, nghttp2_strerror(int(n)));
    if (n > 0) {
      return transport.write(data, n).then([this]() { return writeLoop(); });
    }
    writing = false;
    auto list = kj::mv(flushWaiters);
    for (auto& w: list) w->fulfill();
    return kj::READY_NOW;
  }

  void taskFailed(kj::Exception&& exception) override {
    writing = false;
    failure = kj::mv(exception);
    notify();
  }
};

class ControlPipe final: public kj::AsyncIoStream {
  // The edge's end of the control stream: writes go into the control request's body, reads come
  // from its response body.
public:
  ControlPipe(TestEdge& edge, int32_t id): edge(edge), id(id) {}

  kj::Promise<size_t> tryRead(void* buffer, size_t minBytes, size_t maxBytes) override {
    return readSome(reinterpret_cast<kj::byte*>(buffer), minBytes, maxBytes, 0);
  }
  kj::Promise<void> write(const void* buffer, size_t size) override {
    edge.appendUpload(id, kj::arrayPtr(reinterpret_cast<const kj::byte*>(buffer), size), false);
    return kj::READY_NOW;
  }
  kj::Promise<void> write(kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces) override {
    for (auto& piece: pieces) edge.appendUpload(id, piece, false);
    return kj::READY_NOW;
  }
  kj::Promise<void> whenWriteDisconnected() override { return kj::NEVER_DONE; }
  void shutdownWrite() override { edge.appendUpload(id, nullptr, true); }

private:
  TestEdge& edge;
  int32_t id;
  size_t readOffset = 0;

  kj::Promise<size_t> readSome(kj::byte* buffer, size_t minBytes, size_t maxBytes, size_t done) {
    auto& s = edge.stream(id);
    size_t n = kj::min(maxBytes - done, s.body.size() - readOffset);
    if (n > 0) memcpy(buffer + done, s.body.begin() + readOffset, n);
    readOffset += n;
    done += n;
    if (done >= minBytes || s.done() || edge.eof || edge.failure != nullptr) {
      return done;
    }
    return edge.changed().then([this, buffer, minBytes, maxBytes, done]() {
      return readSome(buffer, minBytes, maxBytes, done);
    });
  }
};

// =======================================================================================
// EdgeConnection's side

struct Events final: public SessionEvents {
  uint registeredCount = 0;
  uint notReadyCount = 0;
  kj::String location;
  kj::Maybe<kj::Own<kj::PromiseFulfiller<void>>> onRegistered;
  void registered(uint connIndex, RegisteredInfo info) override {
    registeredCount++;
    location = kj::str(info.location);
    KJ_IF_MAYBE(f, onRegistered) (*f)->fulfill();
  }
  void notReady(uint connIndex) override { notReadyCount++; }
  kj::Promise<void> waitRegistered() {
    if (registeredCount > 0) return kj::READY_NOW;
    auto paf = kj::newPromiseAndFulfiller<void>();
    onRegistered = kj::mv(paf.fulfiller);
    return kj::mv(paf.promise);
  }
};

struct Observer final: public wire::ControlObserver {
  kj::Vector<wire::RegistrationParams> registrations;
  kj::Vector<kj::String> configs;
  uint unregistrations = 0;
  void registered(const wire::RegistrationParams& params,
                  const wire::RegistrationResult& result) override {
    auto copy = wire::RegistrationParams();
    copy.accountTag = kj::str(params.accountTag);
    copy.tunnelSecret = kj::heapArray<kj::byte>(params.tunnelSecret);
    copy.tunnelId = kj::heapArray<kj::byte>(params.tunnelId);
    copy.connIndex = params.connIndex;
    copy.clientId = kj::heapArray<kj::byte>(params.clientId);
    copy.features = KJ_MAP(f, params.features) { return kj::str(f); };
    copy.version = kj::str(params.version);
    copy.arch = kj::str(params.arch);
    copy.originLocalIp = kj::heapArray<kj::byte>(params.originLocalIp);
    copy.numPreviousAttempts = params.numPreviousAttempts;
    registrations.add(kj::mv(copy));
  }
  void unregistered() override { unregistrations++; }
  void configurationUpdated(kj::ArrayPtr<const kj::byte> json) override {
    configs.add(kj::heapString(json.asChars()));
  }
};

class PipeDialer final: public TransportDialer {
  // Each dial makes an in-memory pipe: one end serves HTTP/2 (the transport under test), the
  // other is the edge's.
public:
  explicit PipeDialer(kj::Timer& timer): timer(timer) {}

  kj::Promise<kj::Own<EdgeTransport>> dial(const edge::EdgeAddress& address) override {
    auto pipe = kj::newTwoWayPipe();
    http2::SessionConfig config;
    config.pingInterval = 0 * kj::SECONDS;
    auto transport = newHttp2Transport(kj::mv(pipe.ends[0]), timer, kj::mv(config));
    protocol = kj::str(transport->protocol());
    edgeEnd = kj::mv(pipe.ends[1]);
    dials++;
    return kj::mv(transport);
  }

  kj::Timer& timer;
  kj::Own<kj::AsyncIoStream> edgeEnd;
  kj::String protocol;
  uint dials = 0;
};

struct Harness {
  kj::AsyncIoContext io = kj::setupAsyncIo();
  kj::Timer& timer = io.provider->getTimer();
  observe::Logger logger{observe::LogConfig{observe::LogLevel::FATAL, nullptr, false}};
  observe::TunnelStatus status;
  AcknowledgingConfigHandler configHandler{logger};
  wire::RemoteConfigState remoteConfig{configHandler};
  kj::HttpHeaderTable headerTable;
  kj::Own<origin::Origin> origin;
  EdgeIdentity identity;
  EdgeConnectionConfig config;
  edge::EdgeAddress edgeAddress;
  PipeDialer dialer{timer};
  Events events;

  Harness() {
    auto created = origin::Origin::create(origin::helloWorldOrigin(), timer,
                                          io.provider->getNetwork(), headerTable);
    KJ_SWITCH_ONEOF(created) {
      KJ_CASE_ONEOF(error, kj::String) KJ_FAIL_ASSERT(error);
      KJ_CASE_ONEOF(o, kj::Own<origin::Origin>) origin = kj::mv(o);
    }
    identity.accountTag = kj::str("acct-tag");
    identity.tunnelSecret = kj::heapArray<kj::byte>({1, 2, 3, 4});
    identity.tunnelId = bytes16(0x10);
    identity.connectorId = bytes16(0x40);
    identity.version = kj::str("2026.8.2");
    identity.arch = kj::str("linux_amd64");
    config.localConfigJson = kj::str("{\"ingress\":[]}");
    edgeAddress = KJ_ASSERT_NONNULL(edge::parseIpPort("198.41.192.7:7844"));
  }

  EdgeContext context() {
    EdgeContext c{timer, io.unixEventPort, *origin, logger, status, remoteConfig, identity,
                  config};
    c.dialer = dialer;
    return c;
  }

  template <typename T>
  T wait(kj::Promise<T> promise, kj::Duration limit = 3 * kj::SECONDS) {
    return timer.timeoutAfter(limit, kj::mv(promise)).wait(io.waitScope);
  }

  template <typename Func>
  bool until(TestEdge& edge, Func&& condition, kj::Duration limit = 3 * kj::SECONDS) {
    // Waits (bounded) for the edge to receive what makes `condition` true.
    auto deadline = timer.now() + limit;
    while (!condition()) {
      if (edge.failure != nullptr || edge.eof) return condition();
      auto now = timer.now();
      if (now >= deadline) return false;
      auto woke = timer.timeoutAfter(deadline - now, edge.changed())
          .then([]() { return true; }, [](kj::Exception&&) { return false; })
          .wait(io.waitScope);
      if (!woke) return condition();
    }
    return true;
  }

  template <typename Func>
  bool eventually(Func&& condition, kj::Duration limit = 3 * kj::SECONDS) {
    // For conditions nothing notifies about (origin statistics).
    return cfqt::testing::eventually(timer, io.waitScope, kj::fwd<Func>(condition), limit);
  }
};

wire::RegistrationResult okResult() {
  return wire::ConnectionDetails{bytes16(0xA0), kj::str("TST"), false};
}

const H CONTROL[] = {{":method", "GET"}, {":scheme", "http"}, {":authority", "localhost"},
                     {":path", "/"},
                     {"cf-cloudflared-proxy-connection-upgrade", "control-stream"}};

struct Registered {
  // The edge's end of a registered connection.
  kj::Own<TestEdge> edge;
  int32_t controlId = 0;
  kj::Own<ControlPipe> controlPipe;
  kj::Own<wire::FixedRegistrationPolicy> policy;
  kj::Own<Observer> observer;
  kj::Own<wire::ControlServer> control;
};

Registered acceptRegistration(Harness& h) {
  Registered r;
  KJ_ASSERT(h.dialer.edgeEnd.get() != nullptr, "EdgeConnection did not dial");
  r.edge = kj::heap<TestEdge>(*h.dialer.edgeEnd);
  r.controlId = r.edge->request(CONTROL, kj::ArrayPtr<const kj::byte>(), false);
  r.controlPipe = kj::heap<ControlPipe>(*r.edge, r.controlId);
  r.policy = kj::heap<wire::FixedRegistrationPolicy>(okResult());
  r.observer = kj::heap<Observer>();
  r.control = kj::heap<wire::ControlServer>(*r.controlPipe, *r.policy, *r.observer);
  h.wait(h.events.waitRegistered());
  return r;
}

kj::Maybe<kj::StringPtr> userHeader(kj::ArrayPtr<const wire::Header> headers,
                                    kj::StringPtr name) {
  for (auto& h: headers) {
    if (h.name == name) return h.value.asPtr();
  }
  return nullptr;
}

kj::Array<wire::Header> responseUserHeaders(ClientStream& s) {
  auto serialized = KJ_ASSERT_NONNULL(s.header(http2::RESPONSE_USER_HEADERS));
  auto decoded = http2::deserializeHeaders(serialized);
  KJ_SWITCH_ONEOF(decoded) {
    KJ_CASE_ONEOF(list, kj::Array<wire::Header>) return kj::mv(list);
    KJ_CASE_ONEOF(error, wire::WireError) KJ_FAIL_ASSERT("undecodable response headers",
                                                        serialized);
  }
  KJ_UNREACHABLE;
}

const H HEALTH[] = {{":method", "GET"}, {":scheme", "https"}, {":authority", "t.example"},
                    {":path", "/_health"}, {"user-agent", "http2-transport-test"}};

// =======================================================================================

KJ_TEST("HTTP/2: registers over the control-stream request, pushes config, serves, shuts down") {
  Harness h;
  EdgeConnectionFactory factory(h.context());
  auto session = factory.newSession(AttemptInfo{0, h.edgeAddress, 3}, h.events);
  auto run = session->run().eagerlyEvaluate(nullptr);
  auto r = acceptRegistration(h);
  KJ_EXPECT(h.dialer.dials == 1);
  KJ_EXPECT(h.dialer.protocol == "http2");
  KJ_EXPECT(h.events.location == "TST");

  // The control-stream request was answered 200 at once, its response body left open.
  auto& controlStream = r.edge->stream(r.controlId);
  KJ_EXPECT(controlStream.status == 200, controlStream.status);
  KJ_EXPECT(!controlStream.done());

  KJ_ASSERT(r.observer->registrations.size() == 1);
  auto& reg = r.observer->registrations[0];
  KJ_EXPECT(reg.accountTag == "acct-tag");
  kj::byte secret[4] = {1, 2, 3, 4};
  KJ_EXPECT(reg.tunnelSecret == kj::arrayPtr<const kj::byte>(secret, 4));
  KJ_EXPECT(reg.tunnelId == bytes16(0x10));
  KJ_EXPECT(reg.clientId == bytes16(0x40));
  KJ_EXPECT(reg.connIndex == 0);
  KJ_EXPECT(reg.numPreviousAttempts == 3);
  KJ_EXPECT(reg.version == "2026.8.2");
  KJ_EXPECT(reg.arch == "linux_amd64");
  KJ_EXPECT(reg.features.size() == 5);
  kj::byte mapped[16] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 41, 192, 7};
  KJ_EXPECT(reg.originLocalIp == kj::arrayPtr<const kj::byte>(mapped, 16));

  // Index 0 pushes its local configuration over the same control stream.
  KJ_EXPECT(h.until(*r.edge, [&]() { return r.observer->configs.size() == 1; }));
  KJ_ASSERT(r.observer->configs.size() == 1);
  KJ_EXPECT(r.observer->configs[0] == "{\"ingress\":[]}");

  // A request to the hello-world origin: cloudflared's response headers.
  {
    auto id = r.edge->request(HEALTH, nullptr);
    KJ_ASSERT(h.until(*r.edge, [&]() { return r.edge->stream(id).done(); }));
    auto& s = r.edge->stream(id);
    KJ_EXPECT(s.status == 200, s.status);
    KJ_EXPECT(s.bodyText() == "OK", s.bodyText());
    KJ_EXPECT(s.closeCode == 0, s.closeCode);
    KJ_EXPECT(s.meta() == http2::RESPONSE_META_ORIGIN, s.meta());
    auto length = s.header("content-length").orDefault("-");
    KJ_EXPECT(length == "2", length);
    auto user = responseUserHeaders(s);
    KJ_EXPECT(userHeader(user, "Content-Type") != nullptr,
              s.header(http2::RESPONSE_USER_HEADERS).orDefault("-"));
  }

  // A warp-routing TCP request (quick tunnels refuse them): a bare 502 from cloudflared.
  {
    const H tcp[] = {{":method", "GET"}, {":scheme", "https"}, {":authority", "t.example"},
                     {":path", "/"}, {"cf-cloudflared-proxy-src", "10.0.0.1:22"}};
    auto id = r.edge->request(tcp, nullptr);
    KJ_ASSERT(h.until(*r.edge, [&]() { return r.edge->stream(id).done(); }));
    auto& s = r.edge->stream(id);
    KJ_EXPECT(s.status == 502, s.status);
    KJ_EXPECT(s.meta() == http2::RESPONSE_META_CLOUDFLARED, s.meta());
    KJ_EXPECT(s.header(http2::RESPONSE_USER_HEADERS) == nullptr);
  }

  // A second control-stream request is refused with cloudflared's 502, the connection lives on.
  {
    auto id = r.edge->request(CONTROL, nullptr);
    KJ_ASSERT(h.until(*r.edge, [&]() { return r.edge->stream(id).done(); }));
    auto& s = r.edge->stream(id);
    KJ_EXPECT(s.status == 502, s.status, s.closeCode);
    KJ_EXPECT(s.meta() == http2::RESPONSE_META_CLOUDFLARED, s.meta());
    KJ_EXPECT(h.status.requestErrors() >= 1);
  }

  // update-configuration: the JSON body in, the JSON answer out.
  {
    const H update[] = {{":method", "PUT"}, {":scheme", "https"}, {":authority", "localhost"},
                        {":path", "/"},
                        {"cf-cloudflared-proxy-connection-upgrade", "update-configuration"}};
    auto body = "{\"version\":7,\"config\":{\"ingress\":[]}}"_kj;
    auto id = r.edge->request(update, body.asBytes());
    KJ_ASSERT(h.until(*r.edge, [&]() { return r.edge->stream(id).done(); }));
    auto& s = r.edge->stream(id);
    KJ_EXPECT(s.status == 200, s.status);
    KJ_EXPECT(s.bodyText() == "{\"lastAppliedVersion\":7,\"err\":null}", s.bodyText());
    KJ_EXPECT(h.remoteConfig.currentVersion() == 7);
    // A version that is no 32-bit integer (untrusted JSON) is refused, nothing applied.
    for (auto bad: {"{\"version\":1e20,\"config\":{}}"_kj, "{\"version\":8.5,\"config\":{}}"_kj,
                    "[7]"_kj}) {
      auto badId = r.edge->request(update, bad.asBytes());
      KJ_ASSERT(h.until(*r.edge, [&]() { return r.edge->stream(badId).done(); }));
      auto& b = r.edge->stream(badId);
      KJ_EXPECT(b.status == 200, b.status);
      KJ_EXPECT(b.bodyText().startsWith("{\"lastAppliedVersion\":7,\"err\":\"invalid "),
                b.bodyText());
    }
    KJ_EXPECT(h.remoteConfig.currentVersion() == 7);
  }

  KJ_EXPECT(!run.poll(h.io.waitScope), "a request ended the connection");
  // http + tcp + the refused control stream (update-configuration is no visitor request).
  KJ_EXPECT(h.status.totalRequests() == 3, h.status.totalRequests());
  KJ_EXPECT(h.status.concurrentRequests() == 0);
  {
    auto quic = h.status.quicIndices();
    KJ_ASSERT(quic.size() == 1);
    KJ_EXPECT(quic[0].connIndex == 0 && quic[0].live);
    KJ_EXPECT(quic[0].sample.bytesSent > 0 && quic[0].sample.bytesReceived > 0);
  }

  // Graceful shutdown: unregister over the control stream, then GOAWAY.
  h.wait(session->shutdown(2 * kj::SECONDS));
  auto end = h.wait(kj::mv(run));
  KJ_EXPECT(end.kind == EndKind::SHUTDOWN, end.kind, end.reason);
  KJ_EXPECT(end.wasRegistered);
  KJ_EXPECT(r.observer->unregistrations == 1);
  KJ_EXPECT(h.until(*r.edge, [&]() { return r.edge->goAwayReceived; }));
  KJ_EXPECT(r.edge->goAwayCode == 0, r.edge->goAwayCode);
  KJ_EXPECT(h.status.quicConnectionsClosed() == 1);
  // cfqt closed its side: the edge need not time the connection out.
  KJ_EXPECT(h.until(*r.edge, [&]() { return r.edge->eof; }), "cfqt left the connection open");
}

KJ_TEST("HTTP/2: the edge resetting a request cancels its origin exchange") {
  Harness h;
  EdgeConnectionFactory factory(h.context());
  auto session = factory.newSession(AttemptInfo{0, h.edgeAddress, 0}, h.events);
  auto run = session->run().eagerlyEvaluate(nullptr);
  auto r = acceptRegistration(h);
  // hello-world's /sse sends an event per second: between events the exchange only waits on the
  // origin, and must still end when the edge resets the request.
  const H sse[] = {{":method", "GET"}, {":scheme", "https"}, {":authority", "t.example"},
                   {":path", "/sse"}};
  auto id = r.edge->request(sse, nullptr);
  KJ_ASSERT(h.until(*r.edge, [&]() { return r.edge->stream(id).status != 0; }));
  KJ_EXPECT(r.edge->stream(id).status == 200);
  KJ_EXPECT(h.origin->getStats().streamsActive == 1);
  KJ_EXPECT(h.status.concurrentRequests() == 1);
  r.edge->reset(id, NGHTTP2_CANCEL);   // as the edge does when the visitor leaves
  KJ_EXPECT(h.eventually([&]() { return h.origin->getStats().streamsActive == 0; },
                         500 * kj::MILLISECONDS), "the origin exchange outlived its request");
  KJ_EXPECT(h.status.cancelledRequests() == 1);
  KJ_EXPECT(h.status.concurrentRequests() == 0);

  // The connection serves on.
  auto ok = r.edge->request(HEALTH, nullptr);
  KJ_ASSERT(h.until(*r.edge, [&]() { return r.edge->stream(ok).done(); }));
  KJ_EXPECT(r.edge->stream(ok).bodyText() == "OK");
  KJ_EXPECT(!run.poll(h.io.waitScope));
}

KJ_TEST("HTTP/2: the edge dropping the control stream tears the connection down") {
  Harness h;
  EdgeConnectionFactory factory(h.context());
  auto session = factory.newSession(AttemptInfo{1, h.edgeAddress, 0}, h.events);
  auto run = session->run().eagerlyEvaluate(nullptr);
  auto r = acceptRegistration(h);
  r.control = nullptr;
  r.edge->reset(r.controlId, NGHTTP2_CANCEL);
  auto end = h.wait(kj::mv(run));
  KJ_EXPECT(end.kind == EndKind::LOST, end.kind);
  KJ_EXPECT(end.wasRegistered);
  KJ_EXPECT(end.reason == "the control stream to the edge ended", end.reason);
}

KJ_TEST("HTTP/2: the edge closing the connection ends it") {
  Harness h;
  EdgeConnectionFactory factory(h.context());
  auto session = factory.newSession(AttemptInfo{1, h.edgeAddress, 0}, h.events);
  auto run = session->run().eagerlyEvaluate(nullptr);
  auto r = acceptRegistration(h);
  r.control = nullptr;
  r.controlPipe = nullptr;
  r.edge = nullptr;
  h.dialer.edgeEnd = nullptr;   // EOF with the control stream open
  auto end = h.wait(kj::mv(run));
  KJ_EXPECT(end.kind == EndKind::LOST, end.kind);
  KJ_EXPECT(end.wasRegistered);
  KJ_EXPECT(end.reason.startsWith("edge closed the connection"), end.reason);
}

KJ_TEST("HTTP/2: the edge's GOAWAY with an error code, then EOF, ends the connection") {
  Harness h;
  EdgeConnectionFactory factory(h.context());
  auto session = factory.newSession(AttemptInfo{2, h.edgeAddress, 0}, h.events);
  auto run = session->run().eagerlyEvaluate(nullptr);
  auto r = acceptRegistration(h);
  r.edge->goAway(NGHTTP2_ENHANCE_YOUR_CALM);
  h.wait(r.edge->flushed());
  r.control = nullptr;
  r.controlPipe = nullptr;
  r.edge = nullptr;
  h.dialer.edgeEnd = nullptr;
  auto end = h.wait(kj::mv(run));
  KJ_EXPECT(end.kind == EndKind::LOST, end.kind);
  KJ_EXPECT(end.wasRegistered);
  KJ_EXPECT(end.reason.startsWith("edge closed the connection"), end.reason);
}

KJ_TEST("HTTP/2: shutdown with a request in flight: unregister, grace period, then GOAWAY") {
  Harness h;
  EdgeConnectionFactory factory(h.context());
  auto session = factory.newSession(AttemptInfo{0, h.edgeAddress, 0}, h.events);
  auto run = session->run().eagerlyEvaluate(nullptr);
  auto r = acceptRegistration(h);
  const H sse[] = {{":method", "GET"}, {":scheme", "https"}, {":authority", "t.example"},
                   {":path", "/sse"}};
  auto id = r.edge->request(sse, nullptr);
  KJ_ASSERT(h.until(*r.edge, [&]() { return r.edge->stream(id).status != 0; }));
  auto started = h.timer.now();
  h.wait(session->shutdown(200 * kj::MILLISECONDS));
  KJ_EXPECT(h.timer.now() - started >= 200 * kj::MILLISECONDS);
  auto end = h.wait(kj::mv(run));
  KJ_EXPECT(end.kind == EndKind::SHUTDOWN, end.kind, end.reason);
  KJ_EXPECT(r.observer->unregistrations == 1);
  // The SSE stream is cut by the transport's close, and the origin exchange with it.
  KJ_EXPECT(h.until(*r.edge, [&]() { return r.edge->goAwayReceived; }));
  KJ_EXPECT(h.eventually([&]() { return h.origin->getStats().streamsActive == 0; }),
            "the origin exchange outlived the connection");
  KJ_EXPECT(h.until(*r.edge, [&]() { return r.edge->eof; }), "cfqt left the connection open");
}

KJ_TEST("HTTP/2: the edge's GOAWAY alone: requests in flight finish, then cfqt closes its side") {
  {
    // Nothing in flight: the connection ends at once, not after the drain bound (10 s; the
    // wait allows 3 s), and without the edge closing TCP.
    Harness h;
    h.config.moveDrainTimeout = 10 * kj::SECONDS;
    EdgeConnectionFactory factory(h.context());
    auto session = factory.newSession(AttemptInfo{0, h.edgeAddress, 0}, h.events);
    auto run = session->run().eagerlyEvaluate(nullptr);
    auto r = acceptRegistration(h);
    auto notReady = h.events.notReadyCount;
    r.edge->goAway(NGHTTP2_NO_ERROR, "edge restarting");
    auto end = h.wait(kj::mv(run));
    KJ_EXPECT(end.kind == EndKind::LOST, end.kind);
    KJ_EXPECT(end.wasRegistered);
    KJ_EXPECT(end.reason == "edge closed the connection (HTTP/2 GOAWAY 0x0 \"edge restarting\")",
              end.reason);
    KJ_EXPECT(h.events.notReadyCount > notReady);
    KJ_EXPECT(h.until(*r.edge, [&]() { return r.edge->eof; }), "cfqt left the connection open");
  }
  {
    // A request in flight (hello-world's endless /sse) holds the connection up to the bound.
    Harness h;
    h.config.moveDrainTimeout = 300 * kj::MILLISECONDS;
    EdgeConnectionFactory factory(h.context());
    auto session = factory.newSession(AttemptInfo{0, h.edgeAddress, 0}, h.events);
    auto run = session->run().eagerlyEvaluate(nullptr);
    auto r = acceptRegistration(h);
    const H sse[] = {{":method", "GET"}, {":scheme", "https"}, {":authority", "t.example"},
                     {":path", "/sse"}};
    auto id = r.edge->request(sse, nullptr);
    KJ_ASSERT(h.until(*r.edge, [&]() { return r.edge->stream(id).status != 0; }));
    auto started = h.timer.now();
    r.edge->goAway(NGHTTP2_NO_ERROR);
    auto end = h.wait(kj::mv(run));
    KJ_EXPECT(h.timer.now() - started >= 300 * kj::MILLISECONDS, "the request was cut early");
    KJ_EXPECT(end.kind == EndKind::LOST, end.kind);
    KJ_EXPECT(h.until(*r.edge, [&]() { return r.edge->eof; }), "cfqt left the connection open");
    KJ_EXPECT(h.eventually([&]() { return h.origin->getStats().streamsActive == 0; }),
              "the origin exchange outlived the connection");
  }
}

KJ_TEST("Http2EdgeTransport: requests before anyone accepts wait; the edge's GOAWAY ends it") {
  Harness h;
  auto pipe = kj::newTwoWayPipe();
  http2::SessionConfig config;
  config.pingInterval = 0 * kj::SECONDS;
  auto transport = newHttp2Transport(kj::mv(pipe.ends[0]), h.timer, kj::mv(config));
  KJ_EXPECT(transport->protocol() == "http2");
  TestEdge edge(*pipe.ends[1]);
  // A data request first, then the control stream: each finds its way before anyone waits.
  auto data = edge.request(HEALTH, nullptr);
  auto control = edge.request(CONTROL, kj::ArrayPtr<const kj::byte>(), false);
  KJ_ASSERT(h.until(edge, [&]() { return edge.stream(control).status != 0; }));
  KJ_EXPECT(edge.stream(control).status == 200);
  auto controlStream = h.wait(transport->openControlStream());
  auto stream = h.wait(transport->acceptStream());
  KJ_EXPECT(stream->id() == data);
  auto request = h.wait(stream->readRequest());
  KJ_ASSERT(request.is<ProxyRequest>());
  auto& proxy = request.get<ProxyRequest>();
  KJ_EXPECT(proxy.dest == "https://t.example/_health", proxy.dest);
  auto& head = proxy.head.get<wire::HttpRequestHead>();
  KJ_EXPECT(head.method == "GET" && head.host == "t.example");
  KJ_EXPECT(head.contentLength == nullptr && !head.chunked);
  KJ_EXPECT(userHeader(head.headers, "User-Agent").orDefault("") == "http2-transport-test");
  // Bodies: a content-length is the origin request's length; without one the body goes to the
  // origin chunked (HTTP/2 has no chunked framing of its own).
  {
    const H sized[] = {{":method", "POST"}, {":scheme", "https"}, {":authority", "t.example"},
                       {":path", "/up"}, {"content-length", "5"}};
    const H unsized[] = {{":method", "POST"}, {":scheme", "https"}, {":authority", "t.example"},
                         {":path", "/up"}};
    edge.request(sized, "hello"_kj.asBytes());
    edge.request(unsized, "hello"_kj.asBytes());
    auto first = h.wait(transport->acceptStream());
    auto firstRequest = h.wait(first->readRequest());
    auto& firstHead = firstRequest.get<ProxyRequest>().head.get<wire::HttpRequestHead>();
    KJ_EXPECT(KJ_ASSERT_NONNULL(firstHead.contentLength) == 5 && !firstHead.chunked);
    auto second = h.wait(transport->acceptStream());
    auto secondRequest = h.wait(second->readRequest());
    auto& secondHead = secondRequest.get<ProxyRequest>().head.get<wire::HttpRequestHead>();
    KJ_EXPECT(secondHead.contentLength == nullptr && secondHead.chunked);
  }

  // The control stream carries bytes both ways.
  edge.appendUpload(control, "ping"_kj.asBytes(), false);
  kj::byte buffer[4];
  KJ_EXPECT(h.wait(controlStream->tryRead(buffer, 4, 4)) == 4);
  KJ_EXPECT(kj::arrayPtr(buffer, 4) == "ping"_kj.asBytes());
  h.wait(controlStream->write("pong", 4));
  KJ_EXPECT(h.until(edge, [&]() { return edge.stream(control).bodyText() == "pong"; }));

  // The edge ends the connection cleanly: GOAWAY(NO_ERROR), its streams finished.
  stream = nullptr;
  controlStream = nullptr;
  KJ_EXPECT(h.until(edge, [&]() {
    return edge.stream(data).closed && edge.stream(control).closed;
  }));
  edge.goAway(NGHTTP2_NO_ERROR);
  h.wait(transport->onClosed());
  KJ_EXPECT(transport->isClosed());
  KJ_EXPECT(transport->closeDescription() == "edge closed the connection (HTTP/2 GOAWAY)",
            transport->closeDescription());
  KJ_EXPECT(KJ_ASSERT_NONNULL(transport->peerClose()).code == 0);
  auto accepted = transport->acceptStream().then([](kj::Own<EdgeStream>) { return false; },
                                                 [](kj::Exception&& e) {
    return e.getType() == kj::Exception::Type::DISCONNECTED;
  });
  KJ_EXPECT(h.wait(kj::mv(accepted)));
}

KJ_TEST("HTTP/2: registration rejected") {
  Harness h;
  EdgeConnectionFactory factory(h.context());
  auto session = factory.newSession(AttemptInfo{1, h.edgeAddress, 0}, h.events);
  auto run = session->run().eagerlyEvaluate(nullptr);
  auto edge = kj::heap<TestEdge>(*h.dialer.edgeEnd);
  auto id = edge->request(CONTROL, kj::ArrayPtr<const kj::byte>(), false);
  ControlPipe pipe(*edge, id);
  wire::FixedRegistrationPolicy policy(wire::duplicateConnection());
  Observer observer;
  wire::ControlServer control(pipe, policy, observer);
  auto end = h.wait(kj::mv(run));
  KJ_EXPECT(end.kind == EndKind::DUPLICATE, end.kind, end.reason);
  KJ_EXPECT(!end.wasRegistered);
  KJ_EXPECT(h.events.registeredCount == 0);
  KJ_EXPECT(h.status.duplicateRegistrations() == 1);
}

}  // namespace
}  // namespace cfqt::tunnel
