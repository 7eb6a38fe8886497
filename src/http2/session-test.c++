// Tests of the HTTP/2 server session (session.h) against an nghttp2 *client* session driven here
// on the same event loop, and against raw frames, over kj::newTwoWayPipe() (which buffers
// nothing: a write resolves only as the peer reads). Time is a kj::TimerImpl advanced by hand;
// `waitScope.poll()` runs everything that can happen, so nothing sleeps and every test ends.

#include "http2/session.h"

#include <nghttp2/nghttp2.h>

#include <kj/debug.h>
#include <kj/map.h>
#include <kj/test.h>
#include <kj/timer.h>
#include <kj/vector.h>

#include <string.h>

namespace cfqt::http2 {
namespace {

constexpr size_t KiB = 1024;
constexpr size_t MiB = 1024 * 1024;

struct H {
  kj::StringPtr name;
  kj::StringPtr value;
};

kj::Array<wire::Header> list(std::initializer_list<H> items) {
  auto builder = kj::heapArrayBuilder<wire::Header>(items.size());
  for (auto& item: items) builder.add(wire::Header{kj::str(item.name), kj::str(item.value)});
  return builder.finish();
}

kj::Array<kj::byte> pattern(size_t size, kj::uint seed) {
  auto data = kj::heapArray<kj::byte>(size);
  for (size_t i = 0; i < size; i++) data[i] = kj::byte(i * 31 + seed + i / 4093);
  return data;
}

bool same(kj::ArrayPtr<const kj::byte> a, kj::ArrayPtr<const kj::byte> b) {
  // (Not KJ_EXPECT(a == b): a failure would print megabytes.)
  return a.size() == b.size() && (a.size() == 0 || memcmp(a.begin(), b.begin(), a.size()) == 0);
}

kj::ArrayPtr<const kj::byte> text(kj::StringPtr s) {
  return s.asBytes();
}

const H GET[] = {{":method", "GET"}, {":scheme", "https"}, {":authority", "example.com"},
                 {":path", "/hello"}, {"user-agent", "session-test"}};
const H POST[] = {{":method", "POST"}, {":scheme", "https"}, {":authority", "example.com"},
                  {":path", "/upload"}};

SessionConfig testConfig() {
  SessionConfig config;
  config.initialStreamWindow = 64 * KiB;
  config.connectionWindow = 256 * KiB;
  config.streamSendBuffer = 32 * KiB;
  config.pingInterval = 0 * kj::SECONDS;    // tests that want PINGs turn them on
  return config;
}

// =======================================================================================
// An nghttp2 client on the other end of the pipe

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
  size_t unconsumed = 0;                // received, not credited back (manual windows)

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
};

struct ClientOptions {
  bool autoWindowUpdate = true;   // false: credit only through consume()/setAutoConsume()
  bool autoPingAck = true;
  uint32_t streamWindow = 65535;
  size_t maxSendHeaderBlock = 0;  // 0: nghttp2's default (64 KiB)
};

class TestClient final: private kj::TaskSet::ErrorHandler {
public:
  TestClient(kj::AsyncIoStream& transport, ClientOptions options = {})
      : transport(transport), options(options), tasks(*this) {
    nghttp2_session_callbacks* callbacks;
    KJ_ASSERT(nghttp2_session_callbacks_new(&callbacks) == 0);
    KJ_DEFER(nghttp2_session_callbacks_del(callbacks));
    nghttp2_session_callbacks_set_on_header_callback(callbacks, onHeader);
    nghttp2_session_callbacks_set_on_frame_recv_callback(callbacks, onFrameRecv);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(callbacks, onDataChunk);
    nghttp2_session_callbacks_set_on_stream_close_callback(callbacks, onStreamClose);
    nghttp2_option* option;
    KJ_ASSERT(nghttp2_option_new(&option) == 0);
    KJ_DEFER(nghttp2_option_del(option));
    if (!options.autoWindowUpdate) nghttp2_option_set_no_auto_window_update(option, 1);
    if (!options.autoPingAck) nghttp2_option_set_no_auto_ping_ack(option, 1);
    if (options.maxSendHeaderBlock > 0) {
      nghttp2_option_set_max_send_header_block_length(option, options.maxSendHeaderBlock);
    }
    KJ_ASSERT(nghttp2_session_client_new2(&session, callbacks, this, option) == 0);
    nghttp2_settings_entry settings[] = {
      {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, options.streamWindow}};
    KJ_ASSERT(nghttp2_submit_settings(session, NGHTTP2_FLAG_NONE, settings, 1) == 0);
    resumeReading();
    scheduleWrite();
  }
  ~TestClient() noexcept(false) {
    reading = nullptr;
    nghttp2_session_del(session);
  }
  KJ_DISALLOW_COPY(TestClient);

  nghttp2_session* session;
  kj::HashMap<int32_t, kj::Own<ClientStream>> streams;
  bool goAwayReceived = false;
  int32_t goAwayLastStreamId = -1;
  uint32_t goAwayCode = 0;
  uint64_t goAwayCount = 0;
  bool eof = false;
  int recvError = 0;
  kj::Maybe<kj::Exception> failure;

  int32_t request(kj::ArrayPtr<const H> headers) {
    return submit(headers, nullptr, true);
  }
  int32_t request(kj::ArrayPtr<const H> headers, kj::ArrayPtr<const kj::byte> upload,
                  bool uploadEnd = true) {
    return submit(headers, upload, uploadEnd);
  }

  int32_t submit(kj::ArrayPtr<const H> headers, kj::Maybe<kj::ArrayPtr<const kj::byte>> upload,
                 bool uploadEnd) {
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

  void setAutoConsume(bool on) {
    autoConsume = on;
    if (on) consumeAll();
  }

  void pauseReading() { reading = nullptr; }   // cancels the pending read: the pipe keeps it
  void resumeReading() {
    reading = readLoop().eagerlyEvaluate([this](kj::Exception&& e) { failure = kj::mv(e); });
  }

  void sendRaw(kj::Array<kj::byte> bytes) {
    raw.add(kj::mv(bytes));
    scheduleWrite();
  }

  void goAway(uint32_t code, kj::StringPtr debugData) {
    KJ_ASSERT(nghttp2_submit_goaway(session, NGHTTP2_FLAG_NONE, 0, code,
                                    debugData.asBytes().begin(), debugData.size()) == 0);
    scheduleWrite();
  }

  int32_t remoteWindow(int32_t id) {
    return nghttp2_session_get_stream_remote_window_size(session, id);
  }

private:
  kj::AsyncIoStream& transport;
  ClientOptions options;
  kj::byte readBuffer[16 * 1024];
  bool writing = false;
  bool autoConsume = false;
  kj::Vector<kj::Array<kj::byte>> raw;
  size_t rawHead = 0;
  kj::Maybe<kj::Promise<void>> reading;
  kj::TaskSet tasks;

  static TestClient& self(void* user) { return *static_cast<TestClient*>(user); }

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
      c.goAwayLastStreamId = frame->goaway.last_stream_id;
      c.goAwayCode = frame->goaway.error_code;
      ++c.goAwayCount;
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
      (*s)->unconsumed += len;
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
    memcpy(buf, s.upload.begin() + s.uploadOffset, n);
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

  void consumeAll() {
    if (options.autoWindowUpdate) return;
    for (auto& entry: streams) {
      auto& s = *entry.value;
      if (s.unconsumed > 0) {
        nghttp2_session_consume(session, s.id, s.unconsumed);
        s.unconsumed = 0;
      }
    }
    scheduleWrite();
  }

  kj::Promise<void> readLoop() {
    return transport.tryRead(readBuffer, 1, sizeof(readBuffer)).then([this](size_t n) {
      return onRead(n);
    });
  }

  kj::Promise<void> onRead(size_t n) {
    if (n == 0) {
      eof = true;
      return kj::READY_NOW;
    }
    ssize_t rv = nghttp2_session_mem_recv(session, readBuffer, n);
    if (rv < 0) {
      recvError = int(rv);
      return kj::READY_NOW;
    }
    if (autoConsume) consumeAll();
    scheduleWrite();
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
    if (rawHead < raw.size()) {
      auto& chunk = raw[rawHead++];
      return transport.write(chunk.begin(), chunk.size()).then([this]() { return writeLoop(); });
    }
    writing = false;
    return kj::READY_NOW;
  }

  void taskFailed(kj::Exception&& exception) override {
    writing = false;
    failure = kj::mv(exception);
  }
};

// =======================================================================================
// Fixture and helpers

struct Fixture {
  explicit Fixture(SessionConfig config = testConfig(), ClientOptions options = {})
      : waitScope(loop), timer(kj::origin<kj::TimePoint>()), pipe(kj::newTwoWayPipe()),
        server(newServerSession(*pipe.ends[0], timer, kj::mv(config))),
        run(server->run()), client(*pipe.ends[1], options) {}

  void poll() { waitScope.poll(); }
  void advance(kj::Duration d) {
    timer.advanceTo(timer.now() + d);
    waitScope.poll();
  }
  kj::Own<ServerRequest> accept() {
    auto promise = server->acceptRequest();
    poll();
    KJ_ASSERT(promise.poll(waitScope), "no request arrived");
    return promise.wait(waitScope);
  }

  kj::EventLoop loop;
  kj::WaitScope waitScope;
  kj::TimerImpl timer;
  kj::TwoWayPipe pipe;
  kj::Own<ServerSession> server;
  kj::Promise<void> run;
  TestClient client;
};

kj::Maybe<kj::Exception> outcome(kj::Promise<void>& run, kj::WaitScope& waitScope) {
  // The settled run() promise's failure (nullptr = resolved). Fails the test if not settled.
  KJ_ASSERT(run.poll(waitScope), "the session is still running");
  return kj::runCatchingExceptions([&]() { run.wait(waitScope); });
}

void expectFailure(kj::Promise<void>& run, kj::WaitScope& waitScope, SessionErrorKind kind,
                   kj::Exception::Type type) {
  KJ_IF_MAYBE(e, outcome(run, waitScope)) {
    KJ_IF_MAYBE(k, classifySessionError(*e)) {
      KJ_EXPECT(*k == kind, *k, kind, *e);
    } else {
      KJ_FAIL_EXPECT("not a session error", *e);
    }
    KJ_EXPECT(e->getType() == type, e->getType(), *e);
  } else {
    KJ_FAIL_EXPECT("run() resolved", kind);
  }
}

void expectClean(kj::Promise<void>& run, kj::WaitScope& waitScope) {
  KJ_IF_MAYBE(e, outcome(run, waitScope)) KJ_FAIL_EXPECT("run() failed", *e);
}

kj::Promise<void> writeAll(kj::AsyncOutputStream& out, kj::ArrayPtr<const kj::byte> data,
                           size_t chunk, size_t& written) {
  // Writes `data` in `chunk`-sized writes, one at a time; `written` counts completed bytes.
  if (data.size() == 0) return kj::READY_NOW;
  size_t n = kj::min(chunk, data.size());
  return out.write(data.begin(), n).then([&out, data, chunk, &written, n]() {
    written += n;
    return writeAll(out, data.slice(n, data.size()), chunk, written);
  });
}

kj::Array<kj::byte> frame(uint8_t type, uint8_t flags, uint32_t streamId,
                          kj::ArrayPtr<const kj::byte> payload) {
  auto bytes = kj::heapArray<kj::byte>(9 + payload.size());
  bytes[0] = kj::byte(payload.size() >> 16);
  bytes[1] = kj::byte(payload.size() >> 8);
  bytes[2] = kj::byte(payload.size());
  bytes[3] = type;
  bytes[4] = flags;
  bytes[5] = kj::byte(streamId >> 24);
  bytes[6] = kj::byte(streamId >> 16);
  bytes[7] = kj::byte(streamId >> 8);
  bytes[8] = kj::byte(streamId);
  if (payload.size() > 0) memcpy(bytes.begin() + 9, payload.begin(), payload.size());
  return bytes;
}

kj::Array<kj::byte> preface() {
  kj::Vector<kj::byte> out;
  out.addAll(text("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"));
  out.addAll(frame(NGHTTP2_SETTINGS, 0, 0, nullptr));
  return out.releaseAsArray();
}

kj::Promise<void> discardLoop(kj::AsyncInputStream& in, kj::Array<kj::byte> buffer) {
  // Reads and drops everything (a raw peer that does read).
  auto read = in.tryRead(buffer.begin(), 1, buffer.size());
  return read.then([&in, buffer = kj::mv(buffer)](size_t n) mutable -> kj::Promise<void> {
    if (n == 0) return kj::READY_NOW;
    return discardLoop(in, kj::mv(buffer));
  });
}

void expectGetWorks(Fixture& f) {
  // One more request/response on the session: it still serves.
  int32_t id = f.client.request(GET);
  auto request = f.accept();
  request->respond(200, list({{"content-type", "text/plain"}}), false);
  request->body().write("ok", 2).wait(f.waitScope);
  request->body().shutdownWrite();
  f.poll();
  auto& s = f.client.stream(id);
  KJ_EXPECT(s.status == 200);
  KJ_EXPECT(s.bodyText() == "ok", s.bodyText());
  KJ_EXPECT(s.endStream && s.closed && s.closeCode == 0, s.endStream, s.closed, s.closeCode);
}

// =======================================================================================
// Tests

KJ_TEST("GET: request headers in, response headers and body out") {
  Fixture f;
  int32_t id = f.client.request(GET);
  auto request = f.accept();
  KJ_EXPECT(request->streamId() == id);
  auto headers = request->headers();
  KJ_ASSERT(headers.size() == 5, headers.size());
  KJ_EXPECT(headers[0].name == ":method" && headers[0].value == "GET");
  KJ_EXPECT(headers[1].name == ":scheme" && headers[1].value == "https");
  KJ_EXPECT(headers[2].name == ":authority" && headers[2].value == "example.com");
  KJ_EXPECT(headers[3].name == ":path" && headers[3].value == "/hello");
  KJ_EXPECT(headers[4].name == "user-agent" && headers[4].value == "session-test");
  KJ_EXPECT(KJ_ASSERT_NONNULL(request->header(":path")) == "/hello");
  KJ_EXPECT(request->header("cookie") == nullptr);

  char buffer[16];
  KJ_EXPECT(request->body().tryRead(buffer, 1, sizeof(buffer)).wait(f.waitScope) == 0);

  request->respond(200, list({{"content-type", "text/plain"}, {"X-Custom", "v"},
                              {"Connection", "keep-alive"}, {"transfer-encoding", "chunked"}}),
                   false);
  request->body().write("hello ", 6).wait(f.waitScope);
  request->body().write("world", 5).wait(f.waitScope);
  request->body().shutdownWrite();
  f.poll();
  auto& s = f.client.stream(id);
  KJ_EXPECT(s.status == 200);
  KJ_EXPECT(KJ_ASSERT_NONNULL(s.header("content-type")) == "text/plain");
  KJ_EXPECT(KJ_ASSERT_NONNULL(s.header("x-custom")) == "v");   // lower-cased
  KJ_EXPECT(s.headers.size() == 2, s.headers.size());          // connection-specific: dropped
  KJ_EXPECT(s.bodyText() == "hello world", s.bodyText());
  KJ_EXPECT(s.endStream && s.closed && s.closeCode == 0);

  // A response without body, on the same connection.
  int32_t id2 = f.client.request(GET);
  auto request2 = f.accept();
  request2->respond(204, nullptr, true);
  f.poll();
  KJ_EXPECT(f.client.stream(id2).status == 204);
  KJ_EXPECT(f.client.stream(id2).endStream && f.client.stream(id2).closed);

  auto stats = f.server->stats();
  KJ_EXPECT(stats.requestsAccepted == 2);
  KJ_EXPECT(stats.streamsActive == 0);
  KJ_EXPECT(stats.streamsAborted == 0);
  KJ_EXPECT(stats.bytesReceived > 0 && stats.bytesSent > 0);
  KJ_EXPECT(!f.run.poll(f.waitScope));

  // An invalid response header is refused before anything is sent.
  int32_t id3 = f.client.request(GET);
  auto request3 = f.accept();
  KJ_EXPECT_THROW_MESSAGE("invalid HTTP/2 response header",
      request3->respond(200, list({{"bad header", "x"}}), true));
  KJ_EXPECT_THROW_MESSAGE("invalid HTTP/2 response header",
      request3->respond(200, list({{"x-ok", "line\r\nbreak"}}), true));
  request3->respond(200, nullptr, true);
  f.poll();
  KJ_EXPECT(f.client.stream(id3).status == 200);
}

KJ_TEST("4 MiB upload: the server holds at most the stream window, credit follows its reads") {
  Fixture f;
  auto data = pattern(4 * MiB, 1);
  int32_t id = f.client.request(POST, data.asPtr());
  auto request = f.accept();
  f.poll();

  // Nobody reads: the client is flow-blocked with one window in flight.
  size_t window = testConfig().initialStreamWindow;
  KJ_EXPECT(request->bufferedReadBytes() <= window, request->bufferedReadBytes());
  KJ_EXPECT(request->bufferedReadBytes() >= window - 1024, request->bufferedReadBytes());
  KJ_EXPECT(f.server->stats().recvBufferedBytes == request->bufferedReadBytes());
  KJ_EXPECT(f.client.remoteWindow(id) <= 0, f.client.remoteWindow(id));
  KJ_EXPECT(f.client.stream(id).uploadOffset < 200 * KiB, f.client.stream(id).uploadOffset);

  // A slow reader: 10 KiB at a time, everything runs between reads.
  kj::Vector<kj::byte> received;
  auto buffer = kj::heapArray<kj::byte>(10 * KiB);
  size_t maxBuffered = 0;
  for (;;) {
    size_t n = request->body().tryRead(buffer.begin(), 1, buffer.size()).wait(f.waitScope);
    if (n == 0) break;
    received.addAll(buffer.slice(0, n));
    f.poll();
    maxBuffered = kj::max(maxBuffered, size_t(request->bufferedReadBytes()));
    KJ_ASSERT(request->bufferedReadBytes() <= window, request->bufferedReadBytes());
  }
  KJ_EXPECT(maxBuffered <= window);
  KJ_EXPECT(received.size() == data.size(), received.size());
  KJ_EXPECT(same(received, data));
  KJ_EXPECT(f.server->stats().recvBufferedBytes == 0);

  request->respond(200, nullptr, true);
  f.poll();
  KJ_EXPECT(f.client.stream(id).status == 200 && f.client.stream(id).closed);
}

KJ_TEST("4 MiB download: a client that stops reading stops the writer, memory stays bounded") {
  ClientOptions options;
  options.autoWindowUpdate = false;    // the client credits only what it consumes
  Fixture f(testConfig(), options);
  auto data = pattern(4 * MiB, 2);
  int32_t id = f.client.request(GET);
  auto request = f.accept();
  request->respond(200, list({{"content-length", "4194304"}}), false);
  size_t written = 0;
  auto writing = writeAll(request->body(), data, 16 * KiB, written)
      .then([&]() { request->body().shutdownWrite(); }).eagerlyEvaluate(nullptr);
  f.poll();

  // HTTP/2 flow control: the client consumes nothing.
  auto sendBuffer = testConfig().streamSendBuffer;
  auto& s = f.client.stream(id);
  KJ_EXPECT(!writing.poll(f.waitScope));
  KJ_EXPECT(s.body.size() <= 65535, s.body.size());
  KJ_EXPECT(request->bufferedWriteBytes() <= sendBuffer, request->bufferedWriteBytes());
  KJ_EXPECT(f.server->stats().sendBufferedBytes <= sendBuffer);
  KJ_EXPECT(written <= 65535 + sendBuffer, written);

  // The client consumes again, then stops reading the connection itself.
  f.client.setAutoConsume(true);
  f.poll();
  KJ_EXPECT(written == data.size(), written);   // pipes carry everything once the client reads
  KJ_EXPECT(s.body.size() == data.size(), s.body.size());
  KJ_EXPECT(same(s.body, data));
  KJ_EXPECT(s.endStream && s.closed && s.closeCode == 0);
  writing.wait(f.waitScope);

  int32_t id2 = f.client.request(GET);
  auto request2 = f.accept();
  f.client.pauseReading();
  request2->respond(200, nullptr, false);
  size_t written2 = 0;
  auto writing2 = writeAll(request2->body(), data, 16 * KiB, written2)
      .then([&]() { request2->body().shutdownWrite(); }).eagerlyEvaluate(nullptr);
  f.poll();
  KJ_EXPECT(!writing2.poll(f.waitScope));
  KJ_EXPECT(request2->bufferedWriteBytes() <= sendBuffer, request2->bufferedWriteBytes());
  // Besides the stream buffer, only the one transport write in flight holds bytes.
  KJ_EXPECT(written2 <= sendBuffer + testConfig().writeBufferSize + 16 * KiB, written2);
  f.client.resumeReading();
  f.poll();
  KJ_EXPECT(written2 == data.size());
  KJ_EXPECT(same(f.client.stream(id2).body, data));
  KJ_EXPECT(f.client.stream(id2).endStream);
  writing2.wait(f.waitScope);
  KJ_EXPECT(!f.run.poll(f.waitScope));
}

KJ_TEST("echo: the request body pumped into the response body, both directions flow-controlled") {
  Fixture f;
  auto data = pattern(1 * MiB + 123, 8);
  int32_t id = f.client.request(POST, data.asPtr());
  auto request = f.accept();
  request->respond(200, nullptr, false);
  auto& body = request->body();
  auto pumping = body.pumpTo(body).then([&](uint64_t n) {     // pumpTo() and write(): ours
    body.shutdownWrite();
    return n;
  }).eagerlyEvaluate(nullptr);
  f.poll();
  KJ_EXPECT(pumping.wait(f.waitScope) == data.size());
  auto& s = f.client.stream(id);
  KJ_EXPECT(same(s.body, data), s.body.size());
  KJ_EXPECT(s.endStream && s.closed && s.closeCode == 0);

  // tryPumpFrom(): an input stream pumped into a response body.
  int32_t id2 = f.client.request(GET);
  auto request2 = f.accept();
  request2->respond(200, nullptr, false);
  auto source = kj::newTwoWayPipe();
  auto into = source.ends[1]->pumpTo(request2->body()).eagerlyEvaluate(nullptr);
  auto feeding = source.ends[0]->write(data.begin(), data.size())
      .then([&]() { source.ends[0]->shutdownWrite(); }).eagerlyEvaluate(nullptr);
  f.poll();
  KJ_EXPECT(into.wait(f.waitScope) == data.size());
  request2->body().shutdownWrite();
  f.poll();
  KJ_EXPECT(same(f.client.stream(id2).body, data), f.client.stream(id2).body.size());
  KJ_EXPECT(f.client.stream(id2).endStream);
}

KJ_TEST("dropping a request: an ended response still goes out in full, then RST(NO_ERROR)") {
  ClientOptions options;
  options.autoWindowUpdate = false;
  options.streamWindow = 16 * KiB;
  Fixture f(testConfig(), options);
  auto upload = pattern(8 * KiB, 9);
  auto data = pattern(30 * KiB, 10);
  int32_t id = f.client.request(POST, upload.asPtr(), false);   // the request body goes on
  auto request = f.accept();
  request->respond(200, nullptr, false);
  request->body().write(data.begin(), data.size()).wait(f.waitScope);
  request->body().shutdownWrite();
  f.poll();
  auto& s = f.client.stream(id);
  KJ_EXPECT(s.body.size() <= 16 * KiB, s.body.size());     // the client's window
  request = nullptr;   // body bytes still buffered, request body unfinished
  f.poll();
  KJ_EXPECT(f.server->stats().recvBufferedBytes == 0);      // discarded, credited back
  f.client.setAutoConsume(true);
  f.poll();
  KJ_EXPECT(same(s.body, data), s.body.size());
  KJ_EXPECT(s.endStream);
  KJ_EXPECT(s.closed && s.closeCode == NGHTTP2_NO_ERROR, s.closed, s.closeCode);
  KJ_EXPECT(f.server->stats().streamsActive == 0);
  KJ_EXPECT(f.server->stats().sendBufferedBytes == 0);

  // abortRead() with the handle kept: same reset once the response has ended.
  int32_t id2 = f.client.request(POST, upload.asPtr(), false);
  auto request2 = f.accept();
  request2->body().abortRead();
  KJ_EXPECT_THROW(DISCONNECTED, request2->body().tryRead(data.begin(), 1, 10).wait(f.waitScope));
  request2->respond(200, nullptr, true);
  f.poll();
  KJ_EXPECT(f.client.stream(id2).status == 200);
  KJ_EXPECT(f.client.stream(id2).closed && f.client.stream(id2).closeCode == NGHTTP2_NO_ERROR);
  KJ_EXPECT(f.server->stats().streamsAborted == 0, f.server->stats().streamsAborted);
  auto aborted2 = request2->whenAborted();
  KJ_EXPECT(!aborted2.poll(f.waitScope), "a completed stream counts as aborted");
}

KJ_TEST("server-sent events: each small write reaches the client before the next") {
  Fixture f;
  int32_t id = f.client.request(GET);
  auto request = f.accept();
  request->respond(200, list({{"content-type", "text/event-stream"}}), false);
  f.poll();
  auto& s = f.client.stream(id);
  KJ_EXPECT(s.status == 200);   // headers go out before any body
  kj::String expected;
  for (int i = 0; i < 5; i++) {
    auto event = kj::str("data: ", i, "\n\n");
    request->body().write(event.begin(), event.size()).wait(f.waitScope);
    f.poll();
    expected = kj::str(expected, event);
    KJ_EXPECT(s.bodyText() == expected, s.bodyText(), expected);
    KJ_EXPECT(!s.endStream);
  }
  request->body().shutdownWrite();
  f.poll();
  KJ_EXPECT(s.endStream);
}

KJ_TEST("RST_STREAM from the client mid-body: reads and writes fail, whenAborted, others go on") {
  Fixture f;
  auto first = pattern(20 * KiB, 3);
  int32_t id = f.client.request(POST, first.asPtr(), false);   // more body to come
  auto request = f.accept();
  auto aborted = request->whenAborted();
  auto buffer = kj::heapArray<kj::byte>(64 * KiB);
  size_t n = request->body().tryRead(buffer.begin(), first.size(), buffer.size())
      .wait(f.waitScope);
  KJ_EXPECT(n == first.size());
  request->respond(200, nullptr, false);
  request->body().write("partial", 7).wait(f.waitScope);
  auto pendingRead = request->body().tryRead(buffer.begin(), 1, buffer.size());
  f.poll();
  KJ_EXPECT(!pendingRead.poll(f.waitScope));
  KJ_EXPECT(!aborted.poll(f.waitScope));

  f.client.reset(id, NGHTTP2_CANCEL);
  f.poll();
  KJ_EXPECT(aborted.poll(f.waitScope));
  aborted.wait(f.waitScope);
  KJ_EXPECT_THROW(DISCONNECTED, pendingRead.wait(f.waitScope));
  KJ_EXPECT_THROW(DISCONNECTED, request->body().tryRead(buffer.begin(), 1, 10).wait(f.waitScope));
  KJ_EXPECT_THROW(DISCONNECTED, request->body().write("x", 1).wait(f.waitScope));
  request->whenAborted().wait(f.waitScope);
  request->body().whenWriteDisconnected().wait(f.waitScope);
  auto stats = f.server->stats();
  KJ_EXPECT(stats.streamsAborted == 1);
  KJ_EXPECT(stats.recvBufferedBytes == 0 && stats.sendBufferedBytes == 0);
  request = nullptr;
  expectGetWorks(f);
  KJ_EXPECT(!f.run.poll(f.waitScope));
}

KJ_TEST("a request without :path is reset, the other streams are not affected") {
  Fixture f;
  const H noPath[] = {{":method", "GET"}, {":scheme", "https"}, {":authority", "a"}};
  int32_t bad = f.client.request(noPath);
  int32_t good = f.client.request(GET);
  auto request = f.accept();
  KJ_EXPECT(request->streamId() == good);
  f.poll();
  auto& s = f.client.stream(bad);
  KJ_EXPECT(s.closed);
  KJ_EXPECT(s.closeCode == NGHTTP2_PROTOCOL_ERROR, s.closeCode);
  request->respond(200, nullptr, true);
  f.poll();
  KJ_EXPECT(f.client.stream(good).status == 200);
  expectGetWorks(f);
  KJ_EXPECT(!f.run.poll(f.waitScope));
}

KJ_TEST("a request head over maxHeaderListSize is answered 431, the session goes on") {
  auto config = testConfig();
  config.maxHeaderListSize = 4 * KiB;
  Fixture f(config);
  auto big = kj::str(kj::repeat('v', 1000));
  const H headers[] = {{":method", "POST"}, {":scheme", "https"}, {":authority", "a"},
                       {":path", "/"}, {"x-a", big}, {"x-b", big}, {"x-c", big}, {"x-d", big},
                       {"x-e", big}};
  auto body = pattern(100 * KiB, 4);
  int32_t id = f.client.request(headers, body.asPtr());
  auto accepting = f.server->acceptRequest();
  f.poll();
  KJ_EXPECT(!accepting.poll(f.waitScope));   // never surfaced
  auto& s = f.client.stream(id);
  KJ_EXPECT(s.status == 431, s.status);
  KJ_EXPECT(s.closed);
  KJ_EXPECT(f.server->stats().requestsRejected == 1);
  KJ_EXPECT(f.server->stats().recvBufferedBytes == 0);
  int32_t good = f.client.request(GET);
  auto request = accepting.wait(f.waitScope);
  KJ_EXPECT(request->streamId() == good);
  request = nullptr;   // dropped before responding: reset
  f.poll();
  KJ_EXPECT(f.client.stream(good).closeCode == NGHTTP2_INTERNAL_ERROR);
  expectGetWorks(f);
}

KJ_TEST("a header field nghttp2 cannot decode (over 64 KiB) closes the connection") {
  ClientOptions options;
  options.maxSendHeaderBlock = 256 * KiB;
  Fixture f(testConfig(), options);
  auto huge = kj::str(kj::repeat('v', 100 * KiB));
  const H headers[] = {{":method", "GET"}, {":scheme", "https"}, {":authority", "a"},
                       {":path", "/"}, {"x-huge", huge}};
  f.client.request(headers);
  f.poll();
  expectFailure(f.run, f.waitScope, SessionErrorKind::PROTOCOL_ERROR, kj::Exception::Type::FAILED);
  KJ_EXPECT(f.client.goAwayReceived);
  KJ_EXPECT(f.client.goAwayCode == NGHTTP2_COMPRESSION_ERROR, f.client.goAwayCode);
  KJ_EXPECT_THROW_MESSAGE("protocol-error", f.server->acceptRequest().wait(f.waitScope));
}

void floodTest(uint8_t type, kj::ArrayPtr<const kj::byte> payload) {
  // A raw peer sends 5000 frames that each need an ACK and never reads: the flooded session
  // fails, a second session on the same loop keeps serving.
  Fixture other;
  auto pipe = kj::newTwoWayPipe();
  auto server = newServerSession(*pipe.ends[0], other.timer, testConfig());
  auto run = server->run();
  kj::Vector<kj::byte> flood;
  flood.addAll(preface());
  for (int i = 0; i < 5000; i++) flood.addAll(frame(type, 0, 0, payload));
  auto writing = pipe.ends[1]->write(flood.begin(), flood.size());
  other.poll();
  expectFailure(run, other.waitScope, SessionErrorKind::FLOODED, kj::Exception::Type::FAILED);
  KJ_EXPECT(server->stats().bytesReceived < flood.size());   // it stopped reading
  expectGetWorks(other);
}

KJ_TEST("SETTINGS flood: the connection fails FLOODED, the others keep serving") {
  floodTest(NGHTTP2_SETTINGS, nullptr);
}

KJ_TEST("PING flood: the connection fails FLOODED, the others keep serving") {
  const kj::byte opaque[8] = {1, 2, 3, 4, 5, 6, 7, 8};
  floodTest(NGHTTP2_PING, opaque);
}

KJ_TEST("rapid reset (HEADERS + RST_STREAM flood) ends the connection") {
  kj::EventLoop loop;
  kj::WaitScope waitScope(loop);
  kj::TimerImpl timer(kj::origin<kj::TimePoint>());
  auto pipe = kj::newTwoWayPipe();
  auto server = newServerSession(*pipe.ends[0], timer, testConfig());
  auto run = server->run();
  // :method GET, :scheme https, :path / (static table), :authority "a" (literal, not indexed).
  const kj::byte block[] = {0x82, 0x87, 0x84, 0x01, 0x01, 'a'};
  const kj::byte cancel[] = {0, 0, 0, NGHTTP2_CANCEL};
  kj::Vector<kj::byte> flood;
  flood.addAll(preface());
  for (uint32_t i = 0; i < 3000; i++) {
    uint32_t id = 1 + 2 * i;
    flood.addAll(frame(NGHTTP2_HEADERS, NGHTTP2_FLAG_END_HEADERS | NGHTTP2_FLAG_END_STREAM, id,
                       block));
    flood.addAll(frame(NGHTTP2_RST_STREAM, 0, id, cancel));
  }
  auto writing = pipe.ends[1]->write(flood.begin(), flood.size());
  auto reading = discardLoop(*pipe.ends[1], kj::heapArray<kj::byte>(16 * KiB));
  waitScope.poll();
  KJ_IF_MAYBE(e, outcome(run, waitScope)) {
    KJ_EXPECT(classifySessionError(*e) == SessionErrorKind::FLOODED, *e);
  } else {
    KJ_FAIL_EXPECT("run() resolved after a reset flood");
  }
  KJ_EXPECT(server->stats().streamsActive == 0);
}

KJ_TEST("PINGs measure the RTT; a peer that stops answering fails the session PING_TIMEOUT") {
  {
    auto config = testConfig();
    config.pingInterval = 100 * kj::MILLISECONDS;
    config.pingTimeout = 50 * kj::MILLISECONDS;
    Fixture f(config);
    f.poll();
    for (int i = 0; i < 3; i++) f.advance(100 * kj::MILLISECONDS);
    KJ_EXPECT(f.server->stats().pingAcks == 3, f.server->stats().pingAcks);
    // Hold the PING back 7 ms: the RTT shows it.
    f.client.pauseReading();
    f.advance(100 * kj::MILLISECONDS);
    f.advance(7 * kj::MILLISECONDS);
    f.client.resumeReading();
    f.poll();
    auto stats = f.server->stats();
    KJ_EXPECT(stats.pingAcks == 4 && stats.pingsSent == 4, stats.pingAcks, stats.pingsSent);
    KJ_EXPECT(stats.rtt == 7 * kj::MILLISECONDS, stats.rtt);
    KJ_EXPECT(stats.minRtt == 0 * kj::MILLISECONDS, stats.minRtt);
    KJ_EXPECT(!f.run.poll(f.waitScope));
  }
  {
    auto config = testConfig();
    config.pingInterval = 100 * kj::MILLISECONDS;
    config.pingTimeout = 50 * kj::MILLISECONDS;
    ClientOptions options;
    options.autoPingAck = false;   // reads everything, answers no PING
    Fixture f(config, options);
    int32_t id = f.client.request(GET);
    auto request = f.accept();
    f.advance(100 * kj::MILLISECONDS);
    KJ_EXPECT(f.server->stats().pingsSent == 1);
    f.advance(49 * kj::MILLISECONDS);
    KJ_EXPECT(!f.run.poll(f.waitScope));
    f.advance(1 * kj::MILLISECONDS);
    expectFailure(f.run, f.waitScope, SessionErrorKind::PING_TIMEOUT,
                  kj::Exception::Type::DISCONNECTED);
    request->whenAborted().wait(f.waitScope);
    KJ_EXPECT_THROW_MESSAGE("ping-timeout", request->body().write("x", 1).wait(f.waitScope));
    KJ_EXPECT_THROW_MESSAGE("ping-timeout", request->respond(200, nullptr, true));
    (void)id;
  }
}

KJ_TEST("goAway(): shutdown notice, PING, final GOAWAY, in-flight streams finish, clean end") {
  Fixture f;
  int32_t id = f.client.request(GET);
  auto request = f.accept();
  auto done = f.server->goAway(5 * kj::SECONDS);
  f.poll();
  KJ_EXPECT(f.client.goAwayCount == 2, f.client.goAwayCount);     // notice + final
  KJ_EXPECT(f.client.goAwayLastStreamId == id, f.client.goAwayLastStreamId);
  KJ_EXPECT(f.client.goAwayCode == NGHTTP2_NO_ERROR);
  KJ_EXPECT(f.server->stats().goAwaySent);
  KJ_EXPECT(!done.poll(f.waitScope));
  KJ_EXPECT(!f.run.poll(f.waitScope));

  request->respond(200, nullptr, false);
  request->body().write("bye", 3).wait(f.waitScope);
  request->body().shutdownWrite();
  f.poll();
  KJ_EXPECT(f.client.stream(id).bodyText() == "bye");
  KJ_EXPECT(f.client.stream(id).endStream);
  KJ_EXPECT(done.poll(f.waitScope));
  done.wait(f.waitScope);
  expectClean(f.run, f.waitScope);
  KJ_EXPECT_THROW_MESSAGE("session-closed", f.server->acceptRequest().wait(f.waitScope));
}

KJ_TEST("whenPeerGoingAway(): resolves on the peer's GOAWAY, the session goes on") {
  Fixture f;
  int32_t id = f.client.request(GET);
  auto request = f.accept();
  auto goingAway = f.server->whenPeerGoingAway();
  f.poll();
  KJ_EXPECT(!goingAway.poll(f.waitScope));
  f.client.goAway(NGHTTP2_NO_ERROR, "bye");
  f.poll();
  KJ_EXPECT(goingAway.poll(f.waitScope));
  goingAway.wait(f.waitScope);
  KJ_EXPECT(f.server->whenPeerGoingAway().poll(f.waitScope));   // later waiters too
  KJ_EXPECT(f.server->stats().goAwayReceived);
  KJ_EXPECT(f.server->stats().peerGoAwayText == "bye", f.server->stats().peerGoAwayText);
  // The request in flight still completes.
  request->respond(200, nullptr, false);
  request->body().write("ok", 2).wait(f.waitScope);
  request->body().shutdownWrite();
  f.poll();
  KJ_EXPECT(f.client.stream(id).bodyText() == "ok");
}

KJ_TEST("goAway(): the grace period cuts the streams that do not finish") {
  Fixture f;
  int32_t id = f.client.request(GET);
  auto request = f.accept();
  request->respond(200, nullptr, false);
  auto done = f.server->goAway(100 * kj::MILLISECONDS);
  f.poll();
  f.advance(99 * kj::MILLISECONDS);
  KJ_EXPECT(!done.poll(f.waitScope));
  f.advance(1 * kj::MILLISECONDS);
  KJ_EXPECT(done.poll(f.waitScope));
  done.wait(f.waitScope);
  expectClean(f.run, f.waitScope);
  request->whenAborted().wait(f.waitScope);
  KJ_EXPECT_THROW_MESSAGE("grace period", request->body().write("x", 1).wait(f.waitScope));
  KJ_EXPECT(f.client.goAwayReceived);
  KJ_EXPECT(!f.client.stream(id).endStream);
}

KJ_TEST("transport EOF: clean without streams, PEER_CLOSED with streams open") {
  {
    Fixture f;
    expectGetWorks(f);
    f.pipe.ends[1]->shutdownWrite();
    f.poll();
    expectClean(f.run, f.waitScope);
  }
  {
    Fixture f;
    f.client.request(GET);
    auto request = f.accept();
    f.pipe.ends[1]->shutdownWrite();
    f.poll();
    expectFailure(f.run, f.waitScope, SessionErrorKind::PEER_CLOSED,
                  kj::Exception::Type::DISCONNECTED);
    request->whenAborted().wait(f.waitScope);
  }
}

KJ_TEST("garbage instead of the client preface: PROTOCOL_ERROR") {
  kj::EventLoop loop;
  kj::WaitScope waitScope(loop);
  kj::TimerImpl timer(kj::origin<kj::TimePoint>());
  auto pipe = kj::newTwoWayPipe();
  auto server = newServerSession(*pipe.ends[0], timer, testConfig());
  auto run = server->run();
  auto writing = pipe.ends[1]->write("GET / HTTP/1.1\r\nHost: a\r\n\r\n", 27);
  waitScope.poll();
  expectFailure(run, waitScope, SessionErrorKind::PROTOCOL_ERROR, kj::Exception::Type::FAILED);
}

KJ_TEST("a connection error with a peer that does not read: the PING timeout ends it") {
  kj::EventLoop loop;
  kj::WaitScope waitScope(loop);
  kj::TimerImpl timer(kj::origin<kj::TimePoint>());
  auto pipe = kj::newTwoWayPipe();
  auto config = testConfig();
  config.pingInterval = 100 * kj::MILLISECONDS;
  config.pingTimeout = 50 * kj::MILLISECONDS;
  auto server = newServerSession(*pipe.ends[0], timer, config);
  auto run = server->run();
  kj::Vector<kj::byte> bytes;
  bytes.addAll(preface());
  bytes.addAll(frame(NGHTTP2_WINDOW_UPDATE, 0, 0, kj::arrayPtr("\0\0\0\0", 4).asBytes()));
  // (a zero WINDOW_UPDATE increment on stream 0: connection PROTOCOL_ERROR)
  auto writing = pipe.ends[1]->write(bytes.begin(), bytes.size());
  waitScope.poll();
  KJ_EXPECT(!run.poll(waitScope));      // the GOAWAY waits for a reader
  KJ_EXPECT(server->stats().invalidFrames == 1, server->stats().invalidFrames);
  timer.advanceTo(timer.now() + 100 * kj::MILLISECONDS);   // the PING is queued, never sent
  waitScope.poll();
  timer.advanceTo(timer.now() + 50 * kj::MILLISECONDS);
  waitScope.poll();
  expectFailure(run, waitScope, SessionErrorKind::PING_TIMEOUT,
                kj::Exception::Type::DISCONNECTED);
}

KJ_TEST("requests may outlive the session: operations fail SESSION_CLOSED, nothing crashes") {
  Fixture f;
  f.client.request(POST, text("abc"), false);
  auto request = f.accept();
  request->respond(200, nullptr, false);
  char buffer[8];
  KJ_EXPECT(request->body().tryRead(buffer, 3, 8).wait(f.waitScope) == 3);
  auto pendingRead = request->body().tryRead(buffer, 1, 8);
  auto aborted = request->whenAborted();
  f.server = nullptr;
  KJ_EXPECT_THROW_MESSAGE("session-closed", pendingRead.wait(f.waitScope));
  aborted.wait(f.waitScope);
  KJ_EXPECT_THROW_MESSAGE("session-closed", request->body().write("x", 1).wait(f.waitScope));
  request->reset(H2_CANCEL);
  request->body().shutdownWrite();
  request->body().abortRead();
  expectFailure(f.run, f.waitScope, SessionErrorKind::SESSION_CLOSED,
                kj::Exception::Type::DISCONNECTED);
}

KJ_TEST("recvCreditBudget: a stalled upload does not starve the others; 0 = strict") {
  for (uint64_t budget: {uint64_t(8 * MiB), uint64_t(0)}) {
    auto config = testConfig();
    config.initialStreamWindow = 65535;
    config.connectionWindow = 65535;    // one stream window fills the connection window
    config.recvCreditBudget = budget;
    Fixture f(config);
    auto stalled = pattern(200 * KiB, 5);
    auto moving = pattern(1 * MiB, 6);
    int32_t a = f.client.request(POST, stalled.asPtr());
    auto requestA = f.accept();
    f.poll();
    KJ_EXPECT(requestA->bufferedReadBytes() == 65535, requestA->bufferedReadBytes());
    int32_t b = f.client.request(POST, moving.asPtr());
    auto requestB = f.accept();
    auto buffer = kj::heapArray<kj::byte>(64 * KiB);
    kj::Vector<kj::byte> received;
    for (;;) {
      auto read = requestB->body().tryRead(buffer.begin(), 1, buffer.size());
      f.poll();
      if (!read.poll(f.waitScope)) break;     // B stalled
      size_t n = read.wait(f.waitScope);
      if (n == 0) break;
      received.addAll(buffer.slice(0, n));
    }
    if (budget > 0) {
      KJ_EXPECT(same(received, moving), received.size());
    } else {
      KJ_EXPECT(received.size() == 0, received.size());   // A holds the whole connection window
      // Reading A releases connection credit, and B moves.
      size_t n = requestA->body().tryRead(buffer.begin(), 1, buffer.size()).wait(f.waitScope);
      KJ_EXPECT(n > 0);
      f.poll();
      KJ_EXPECT(requestB->bufferedReadBytes() > 0, requestB->bufferedReadBytes());
    }
    (void)a;
    (void)b;
  }
}

KJ_TEST("send budget: over connectionSendHigh a stream may only hold its reserve") {
  auto config = testConfig();
  config.streamSendBuffer = 32 * KiB;
  config.connectionSendHigh = 64 * KiB;
  config.connectionSendLow = 32 * KiB;
  config.streamSendReserve = 4 * KiB;
  ClientOptions options;
  options.autoWindowUpdate = false;
  options.streamWindow = 0;     // nothing can be sent: all bytes stay buffered
  Fixture f(config, options);
  f.client.request(GET);
  f.client.request(GET);
  f.client.request(GET);
  auto a = f.accept();
  auto b = f.accept();
  auto c = f.accept();
  for (auto* r: {a.get(), b.get(), c.get()}) r->respond(200, nullptr, false);
  auto chunk = pattern(32 * KiB, 7);
  a->body().write(chunk.begin(), chunk.size()).wait(f.waitScope);
  b->body().write(chunk.begin(), chunk.size()).wait(f.waitScope);
  KJ_EXPECT(f.server->stats().sendOverBudget);
  c->body().write(chunk.begin(), 4 * KiB).wait(f.waitScope);     // the reserve
  auto waiting = c->body().write(chunk.begin(), 1);
  f.poll();
  KJ_EXPECT(!waiting.poll(f.waitScope));
  KJ_EXPECT(f.server->stats().sendBufferedBytes == 68 * KiB, f.server->stats().sendBufferedBytes);
  // A and B give up: the budget is back under connectionSendLow and C goes on.
  a->reset(H2_CANCEL);
  b->reset(H2_CANCEL);
  f.poll();
  KJ_EXPECT(!f.server->stats().sendOverBudget);
  KJ_EXPECT(waiting.poll(f.waitScope));
  waiting.wait(f.waitScope);
  KJ_EXPECT(f.server->stats().sendBufferedBytes == 4 * KiB + 1);
}

}  // namespace
}  // namespace cfqt::http2
