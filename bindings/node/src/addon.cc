// cfqt's N-API addon: the C API of libcfqt (include/cfqt/cfqt.h) for index.js.
//
// Threads. Blocking library calls never run on Node's main thread:
//   - start/waitUrl/waitReady/close run as AsyncWorkers (libuv's pool; each ends by itself).
//   - An in-process request is served by the library's handler thread that received it: it
//     posts the request to JavaScript (a thread-safe function), then executes the blocking
//     commands JavaScript queues for it (read a body chunk, write a response chunk) and posts
//     each result back, until JavaScript releases the request (or the tunnel closes).
//   - respond/end/fail never block and run directly on the main thread.

#include <napi.h>

#include "cfqt/cfqt.h"

#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

namespace {

struct Command {
  enum Kind { READ, WRITE, EXIT } kind = READ;
  std::string data;     // WRITE
  uint32_t id = 0;      // matches the result to the JavaScript callback
};

struct TunnelState;

struct Req {
  // One in-process request, shared by its handler thread and the main thread.
  cfqt_request* request;
  TunnelState* tunnel;
  std::mutex mutex;
  std::condition_variable wake;
  std::deque<Command> commands;
  bool exiting = false;   // EXIT queued: no library call may be made any more

  Command next() {
    std::unique_lock<std::mutex> lock(mutex);
    wake.wait(lock, [this]() { return !commands.empty(); });
    Command c = std::move(commands.front());
    commands.pop_front();
    return c;
  }

  bool push(Command c) {
    std::lock_guard<std::mutex> lock(mutex);
    if (exiting) return false;
    if (c.kind == Command::EXIT) exiting = true;
    commands.push_back(std::move(c));
    wake.notify_one();
    return true;
  }
};

struct Event {
  enum Kind { REQUEST, READ, WRITE } kind = REQUEST;
  std::shared_ptr<Req> req;
  uint32_t id = 0;
  long long result = 0;       // READ: bytes (0 = end), < 0 error; WRITE: 0 or < 0
  std::string data;           // READ: the bytes
  std::string error;
  // REQUEST
  std::string method, url, path, host;
  std::vector<std::string> headers;   // name, value, ...
  bool websocket = false;
};

Event* makeEvent(Event::Kind kind, std::shared_ptr<Req> req, uint32_t id) {
  auto* e = new Event();
  e->kind = kind;
  e->req = std::move(req);
  e->id = id;
  return e;
}

Command makeCommand(Command::Kind kind, uint32_t id = 0, std::string data = std::string()) {
  Command c;
  c.kind = kind;
  c.id = id;
  c.data = std::move(data);
  return c;
}

struct TunnelState {
  cfqt_tunnel* tunnel = nullptr;
  Napi::ThreadSafeFunction events;   // calls index.js's dispatcher on the main thread
  bool hasEvents = false;
  std::mutex mutex;
  std::set<Req*> live;
  bool closing = false;
  std::deque<std::string> strings;   // what the options point at (stable addresses)
  std::vector<const char*> edges;
};

void post(TunnelState* state, Event* event) {
  auto status = state->events.NonBlockingCall(event, [](Napi::Env env, Napi::Function fn,
                                                        Event* e) {
    std::unique_ptr<Event> owned(e);
    if (env == nullptr || fn == nullptr) return;
    auto object = Napi::Object::New(env);
    object.Set("kind", static_cast<int>(e->kind));
    object.Set("req", Napi::External<std::shared_ptr<Req>>::New(
        env, new std::shared_ptr<Req>(e->req),
        [](Napi::Env, std::shared_ptr<Req>* p) { delete p; }));
    object.Set("id", e->id);
    object.Set("result", static_cast<double>(e->result));
    if (!e->error.empty()) object.Set("error", e->error);
    if (e->kind == Event::READ && e->result > 0) {
      object.Set("data", Napi::Buffer<char>::Copy(env, e->data.data(), e->data.size()));
    }
    if (e->kind == Event::REQUEST) {
      object.Set("method", e->method);
      object.Set("url", e->url);
      object.Set("path", e->path);
      object.Set("host", e->host);
      object.Set("websocket", e->websocket);
      auto headers = Napi::Array::New(env, e->headers.size());
      for (size_t i = 0; i < e->headers.size(); i++) headers.Set(i, e->headers[i]);
      object.Set("headers", headers);
    }
    fn.Call({object});
  });
  if (status != napi_ok) delete event;
}

void serveRequest(void* data, cfqt_request* request) {
  // On a library handler thread: hand the request to JavaScript, then run its commands.
  auto* state = static_cast<TunnelState*>(data);
  auto req = std::make_shared<Req>();
  req->request = request;
  req->tunnel = state;
  {
    std::lock_guard<std::mutex> lock(state->mutex);
    if (state->closing) {
      cfqt_request_free(request);
      return;
    }
    state->live.insert(req.get());
  }
  auto* event = makeEvent(Event::REQUEST, req, 0);
  event->method = cfqt_request_method(request);
  event->url = cfqt_request_url(request);
  event->path = cfqt_request_path(request);
  event->host = cfqt_request_host(request);
  event->websocket = cfqt_request_is_websocket(request) == 1;
  for (size_t i = 0; i < cfqt_request_header_count(request); i++) {
    event->headers.push_back(cfqt_request_header_name(request, i));
    event->headers.push_back(cfqt_request_header_value(request, i));
  }
  post(state, event);
  std::vector<char> buffer(64 * 1024);
  while (true) {
    Command c = req->next();
    if (c.kind == Command::EXIT) break;
    auto* result = makeEvent(c.kind == Command::READ ? Event::READ : Event::WRITE, req, c.id);
    if (c.kind == Command::READ) {
      result->result = cfqt_request_read(request, buffer.data(), buffer.size());
      if (result->result > 0) result->data.assign(buffer.data(), size_t(result->result));
    } else {
      result->result = cfqt_request_write(request, c.data.data(), c.data.size());
    }
    if (result->result < 0) result->error = cfqt_last_error();
    post(state, result);
  }
  {
    std::lock_guard<std::mutex> lock(state->mutex);
    state->live.erase(req.get());
  }
  cfqt_request_free(request);
}

std::shared_ptr<Req> reqOf(const Napi::Value& value) {
  return *value.As<Napi::External<std::shared_ptr<Req>>>().Data();
}

TunnelState* tunnelOf(const Napi::Value& value) {
  return value.As<Napi::External<TunnelState>>().Data();
}

// ---------------------------------------------------------------------------------------------

class StartWorker: public Napi::AsyncWorker {
  // Starts the tunnel and waits for its URL (cfqt_tunnel_start + cfqt_tunnel_wait_url).
public:
  StartWorker(Napi::Env env, TunnelState* state, cfqt_options options, int timeoutMs)
      : Napi::AsyncWorker(env), deferred(Napi::Promise::Deferred::New(env)), state(state),
        options(options), timeoutMs(timeoutMs) {}

  Napi::Promise promise() { return deferred.Promise(); }

  void Execute() override {
    char error[512] = "";
    state->tunnel = cfqt_tunnel_start(&options, error, sizeof(error));
    if (state->tunnel == nullptr) {
      SetError(error);
      return;
    }
    char url[1024];
    if (cfqt_tunnel_wait_url(state->tunnel, timeoutMs, url, sizeof(url)) != 0) {
      SetError("cfqt: no quick tunnel was issued in time (see the logs)");
      return;
    }
    this->url = url;
  }

  void OnOK() override { deferred.Resolve(Napi::String::New(Env(), url)); }
  void OnError(const Napi::Error& e) override {
    // Nothing will be served: let Node exit.
    if (state->hasEvents) {
      state->events.Release();
      state->hasEvents = false;
    }
    deferred.Reject(e.Value());
  }

private:
  Napi::Promise::Deferred deferred;
  TunnelState* state;
  cfqt_options options;
  int timeoutMs;
  std::string url;
};

class WaitReadyWorker: public Napi::AsyncWorker {
public:
  WaitReadyWorker(Napi::Env env, TunnelState* state, int timeoutMs)
      : Napi::AsyncWorker(env), deferred(Napi::Promise::Deferred::New(env)), state(state),
        timeoutMs(timeoutMs) {}
  Napi::Promise promise() { return deferred.Promise(); }
  void Execute() override {
    ready = state->tunnel != nullptr && cfqt_tunnel_wait_ready(state->tunnel, timeoutMs) == 1;
  }
  void OnOK() override { deferred.Resolve(Napi::Boolean::New(Env(), ready)); }
  void OnError(const Napi::Error& e) override { deferred.Reject(e.Value()); }

private:
  Napi::Promise::Deferred deferred;
  TunnelState* state;
  int timeoutMs;
  bool ready = false;
};

class CloseWorker: public Napi::AsyncWorker {
  // Graceful stop, then free; requests JavaScript still holds are released (their handler
  // threads must return for the library to finish).
public:
  CloseWorker(Napi::Env env, TunnelState* state)
      : Napi::AsyncWorker(env), deferred(Napi::Promise::Deferred::New(env)), state(state) {}
  Napi::Promise promise() { return deferred.Promise(); }
  void Execute() override {
    if (state->tunnel != nullptr) code = cfqt_tunnel_stop(state->tunnel);
    {
      std::lock_guard<std::mutex> lock(state->mutex);
      state->closing = true;
      for (auto* req: state->live) req->push(makeCommand(Command::EXIT));
    }
    if (state->tunnel != nullptr) cfqt_tunnel_free(state->tunnel);
    state->tunnel = nullptr;
  }
  void OnOK() override {
    if (state->hasEvents) {
      state->events.Release();
      state->hasEvents = false;
    }
    deferred.Resolve(Napi::Number::New(Env(), code));
  }
  void OnError(const Napi::Error& e) override { deferred.Reject(e.Value()); }

private:
  Napi::Promise::Deferred deferred;
  TunnelState* state;
  int code = 0;
};

// ---------------------------------------------------------------------------------------------

std::string optString(const Napi::Object& o, const char* key) {
  auto v = o.Get(key);
  return v.IsString() ? v.As<Napi::String>().Utf8Value() : std::string();
}

int optInt(const Napi::Object& o, const char* key, int fallback) {
  auto v = o.Get(key);
  return v.IsNumber() ? v.As<Napi::Number>().Int32Value() : fallback;
}

Napi::Value Start(const Napi::CallbackInfo& info) {
  // start(options, dispatcher) → Promise<url>; the tunnel handle is options.__handle.
  auto env = info.Env();
  auto o = info[0].As<Napi::Object>();
  auto* state = new TunnelState();   // freed by the handle's finalizer
  auto handle = Napi::External<TunnelState>::New(env, state, [](Napi::Env, TunnelState* s) {
    // Never closed: release what JavaScript can no longer answer, then stop and free.
    {
      std::lock_guard<std::mutex> lock(s->mutex);
      s->closing = true;
      for (auto* req: s->live) req->push(makeCommand(Command::EXIT));
    }
    if (s->tunnel != nullptr) cfqt_tunnel_free(s->tunnel);
    delete s;
  });
  o.Set("__handle", handle);
  cfqt_options options;
  cfqt_options_init(&options);
  auto keep = [&](const std::string& s) -> const char* {
    if (s.empty()) return nullptr;
    state->strings.push_back(s);
    return state->strings.back().c_str();
  };
  options.url = keep(optString(o, "url"));
  options.hello_world = o.Get("helloWorld").ToBoolean() ? 1 : 0;
  options.quick_service = keep(optString(o, "quickService"));
  options.edge_ca_file = keep(optString(o, "edgeCaFile"));
  options.origin_ca_pool = keep(optString(o, "originCaPool"));
  options.origin_server_name = keep(optString(o, "originServerName"));
  options.protocol = keep(optString(o, "protocol"));
  options.log_level = keep(optString(o, "logLevel"));
  options.metrics_address = keep(optString(o, "metricsAddress"));
  options.metrics = o.Get("metrics").ToBoolean() ? 1 : 0;
  options.ha_connections = optInt(o, "haConnections", 2);
  options.grace_period_ms = optInt(o, "gracePeriodMs", 30000);
  options.backoff_base_ms = optInt(o, "backoffBaseMs", 1000);
  auto edges = o.Get("edges");
  if (edges.IsArray()) {
    auto list = edges.As<Napi::Array>();
    for (uint32_t i = 0; i < list.Length(); i++) {
      state->strings.push_back(list.Get(i).ToString().Utf8Value());
    }
    for (size_t i = state->strings.size() - list.Length(); i < state->strings.size(); i++) {
      state->edges.push_back(state->strings[i].c_str());
    }
    options.edges = state->edges.data();
    options.edge_count = state->edges.size();
  }
  if (info[1].IsFunction()) {
    state->events = Napi::ThreadSafeFunction::New(env, info[1].As<Napi::Function>(),
                                                  "cfqt-requests", 0, 1);
    state->hasEvents = true;
    options.handler = serveRequest;
    options.handler_data = state;
    options.handler_threads = optInt(o, "handlerThreads", 64);
  }
  auto* worker = new StartWorker(env, state, options, optInt(o, "urlTimeoutMs", 30000));
  auto promise = worker->promise();
  worker->Queue();
  return promise;
}

Napi::Value WaitReady(const Napi::CallbackInfo& info) {
  auto* worker = new WaitReadyWorker(info.Env(), tunnelOf(info[0]),
                                     info[1].As<Napi::Number>().Int32Value());
  auto promise = worker->promise();
  worker->Queue();
  return promise;
}

Napi::Value Close(const Napi::CallbackInfo& info) {
  auto* worker = new CloseWorker(info.Env(), tunnelOf(info[0]));
  auto promise = worker->promise();
  worker->Queue();
  return promise;
}

Napi::Value Status(const Napi::CallbackInfo& info) {
  auto* state = tunnelOf(info[0]);
  auto o = Napi::Object::New(info.Env());
  bool running = state->tunnel != nullptr && cfqt_tunnel_running(state->tunnel) == 1;
  o.Set("running", running);
  o.Set("readyConnections",
        running ? cfqt_tunnel_ready_connections(state->tunnel) : 0);
  return o;
}

Napi::Value Metrics(const Napi::CallbackInfo& info) {
  auto* state = tunnelOf(info[0]);
  if (state->tunnel == nullptr) return Napi::String::New(info.Env(), "");
  size_t size = cfqt_tunnel_metrics(state->tunnel, nullptr, 0) + 4096;
  while (true) {
    std::vector<char> buffer(size);
    size_t needed = cfqt_tunnel_metrics(state->tunnel, buffer.data(), buffer.size());
    if (needed <= buffer.size()) return Napi::String::New(info.Env(), buffer.data());
    size = needed;
  }
}

// Request calls. Each returns undefined, or a string with the library's error message.

Napi::Value Respond(const Napi::CallbackInfo& info) {
  auto req = reqOf(info[0]);
  int status = info[1].As<Napi::Number>().Int32Value();
  auto list = info[2].As<Napi::Array>();
  std::vector<std::string> strings;
  for (uint32_t i = 0; i < list.Length(); i++) strings.push_back(list.Get(i).ToString());
  std::vector<const char*> pointers;
  for (auto& s: strings) pointers.push_back(s.c_str());
  std::lock_guard<std::mutex> lock(req->mutex);
  if (req->exiting) return Napi::String::New(info.Env(), "cfqt: the request was released");
  int rc = cfqt_request_respond(req->request, status, pointers.data(), pointers.size() / 2);
  if (rc != 0) return Napi::String::New(info.Env(), cfqt_last_error());
  return info.Env().Undefined();
}

Napi::Value End(const Napi::CallbackInfo& info) {
  auto req = reqOf(info[0]);
  std::lock_guard<std::mutex> lock(req->mutex);
  if (req->exiting) return info.Env().Undefined();
  if (cfqt_request_end(req->request) != 0) return Napi::String::New(info.Env(), cfqt_last_error());
  return info.Env().Undefined();
}

Napi::Value Fail(const Napi::CallbackInfo& info) {
  auto req = reqOf(info[0]);
  std::lock_guard<std::mutex> lock(req->mutex);
  if (!req->exiting) cfqt_request_fail(req->request, info[1].ToString().Utf8Value().c_str());
  return info.Env().Undefined();
}

Napi::Value Cancelled(const Napi::CallbackInfo& info) {
  auto req = reqOf(info[0]);
  std::lock_guard<std::mutex> lock(req->mutex);
  return Napi::Boolean::New(info.Env(), req->exiting || cfqt_request_cancelled(req->request));
}

Napi::Value Read(const Napi::CallbackInfo& info) {
  // Queues a read of the next body chunk; the result comes as a READ event with this id.
  auto req = reqOf(info[0]);
  bool queued = req->push(makeCommand(Command::READ, info[1].As<Napi::Number>().Uint32Value()));
  return Napi::Boolean::New(info.Env(), queued);
}

Napi::Value Write(const Napi::CallbackInfo& info) {
  auto req = reqOf(info[0]);
  auto buffer = info[1].As<Napi::Buffer<char>>();
  bool queued = req->push(makeCommand(Command::WRITE, info[2].As<Napi::Number>().Uint32Value(),
                                      std::string(buffer.Data(), buffer.Length())));
  return Napi::Boolean::New(info.Env(), queued);
}

Napi::Value Release(const Napi::CallbackInfo& info) {
  reqOf(info[0])->push(makeCommand(Command::EXIT));
  return info.Env().Undefined();
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("start", Napi::Function::New(env, Start));
  exports.Set("waitReady", Napi::Function::New(env, WaitReady));
  exports.Set("close", Napi::Function::New(env, Close));
  exports.Set("status", Napi::Function::New(env, Status));
  exports.Set("metrics", Napi::Function::New(env, Metrics));
  exports.Set("respond", Napi::Function::New(env, Respond));
  exports.Set("end", Napi::Function::New(env, End));
  exports.Set("fail", Napi::Function::New(env, Fail));
  exports.Set("cancelled", Napi::Function::New(env, Cancelled));
  exports.Set("read", Napi::Function::New(env, Read));
  exports.Set("write", Napi::Function::New(env, Write));
  exports.Set("release", Napi::Function::New(env, Release));
  return exports;
}

}  // namespace

NODE_API_MODULE(cfqt, Init)
