// Golden vectors (data/tunnel-wire-vectors-2023.7.3.txt, read at run time): every data-stream
// vector decodes to its "# Decoded:" values and our encoders reproduce them; both control-stream
// transcripts are replayed into ControlServer (C->E bytes) and ControlClient (E->C bytes).

#include "wire/control.h"
#include "wire/data-stream.h"
#include "wire/http-metadata.h"
#include "wire/test-vectors.h"

#include <capnp/rpc.capnp.h>
#include <capnp/serialize-async.h>
#include <capnp/serialize.h>
#include <kj/async-io.h>
#include <kj/map.h>
#include <kj/test.h>

namespace cfqt::wire {
namespace {

using testing::ControlTranscript;
using testing::DataStreamVector;
using testing::Direction;
using testing::TranscriptMessage;
using testing::VectorFile;

constexpr kj::Duration IO_TIMEOUT = 5 * kj::SECONDS;  // only hit when a test fails

VectorFile load() {
  auto path = testing::defaultVectorPath();
  return testing::loadVectorFile(path);
}

class MemoryInputStream final: public kj::AsyncInputStream {
public:
  explicit MemoryInputStream(kj::ArrayPtr<const kj::byte> data): data(data) {}
  kj::Promise<size_t> tryRead(void* buffer, size_t minBytes, size_t maxBytes) override {
    size_t n = kj::min(maxBytes, data.size() - position);
    memcpy(buffer, data.begin() + position, n);
    position += n;
    return n;
  }

private:
  kj::ArrayPtr<const kj::byte> data;
  size_t position = 0;
};

// Parses Go text into a fresh message of `schema`'s type (test fails on a parse error).
capnp::DynamicStruct::Reader parseExpected(capnp::MallocMessageBuilder& message,
                                           capnp::StructSchema schema, kj::StringPtr goText) {
  auto root = message.initRoot<capnp::DynamicStruct>(schema);
  KJ_IF_MAYBE(error, testing::decodeGoText(goText, root)) {
    KJ_FAIL_ASSERT("cannot parse vector text", *error);
  }
  return root.asReader();
}

void expectSame(capnp::DynamicStruct::Reader expected, capnp::DynamicStruct::Reader actual,
                kj::StringPtr what) {
  KJ_IF_MAYBE(diff, testing::compareValues(expected, actual)) {
    KJ_FAIL_EXPECT("value differs from the vector", what, *diff);
  }
}

capnp::StructSchema requestSchema() { return capnp::Schema::from<schema::ConnectRequest>(); }
capnp::StructSchema responseSchema() { return capnp::Schema::from<schema::ConnectResponse>(); }

capnp::InterfaceSchema::Method registrationMethod(uint64_t id) {
  return capnp::Schema::from<schema::RegistrationServer>().getMethods()[id];
}

kj::StringPtr kindOf(capnp::rpc::Message::Reader message) {
  switch (message.which()) {
    case capnp::rpc::Message::BOOTSTRAP: return "bootstrap";
    case capnp::rpc::Message::CALL: return "call";
    case capnp::rpc::Message::RETURN: return "return";
    case capnp::rpc::Message::FINISH: return "finish";
    case capnp::rpc::Message::RELEASE: return "release";
    case capnp::rpc::Message::ABORT: return "abort";
    case capnp::rpc::Message::RESOLVE: return "resolve";
    case capnp::rpc::Message::DISEMBARGO: return "disembargo";
    default: return "other";
  }
}

kj::Own<capnp::MessageReader> readerOf(kj::ArrayPtr<const kj::byte> bytes) {
  auto words = kj::heapArray<capnp::word>(bytes.size() / sizeof(capnp::word));
  memcpy(words.begin(), bytes.begin(), words.size() * sizeof(capnp::word));
  kj::ArrayPtr<const capnp::word> view = words;
  return kj::heap<capnp::FlatArrayMessageReader>(view).attach(kj::mv(words));
}

struct RpcInfo {
  kj::StringPtr kind;
  uint32_t id = 0;         // question id (bootstrap, call, finish) or answer id (return)
  uint64_t interfaceId = 0;
  uint16_t methodId = 0;
};

// The ids of a transcript entry, read from its bytes (the summary omits some).
RpcInfo infoOf(const TranscriptMessage& m) {
  auto reader = readerOf(m.bytes);
  auto message = reader->getRoot<capnp::rpc::Message>();
  RpcInfo info;
  info.kind = kindOf(message);
  switch (message.which()) {
    case capnp::rpc::Message::BOOTSTRAP: info.id = message.getBootstrap().getQuestionId(); break;
    case capnp::rpc::Message::CALL:
      info.id = message.getCall().getQuestionId();
      info.interfaceId = message.getCall().getInterfaceId();
      info.methodId = message.getCall().getMethodId();
      break;
    case capnp::rpc::Message::RETURN: info.id = message.getReturn().getAnswerId(); break;
    case capnp::rpc::Message::FINISH: info.id = message.getFinish().getQuestionId(); break;
    default: break;
  }
  return info;
}

kj::Array<kj::byte> withAnswerId(kj::ArrayPtr<const kj::byte> bytes, uint32_t answerId) {
  auto reader = readerOf(bytes);
  capnp::MallocMessageBuilder builder;
  builder.setRoot(reader->getRoot<capnp::rpc::Message>());
  builder.getRoot<capnp::rpc::Message>().getReturn().setAnswerId(answerId);
  auto words = capnp::messageToFlatArray(builder);
  return kj::heapArray<kj::byte>(words.asBytes());
}

kj::Array<kj::byte> configOf(const TranscriptMessage& call) {
  capnp::MallocMessageBuilder message;
  auto params = parseExpected(message, registrationMethod(2).getParamType(),
                              KJ_ASSERT_NONNULL(call.params()));
  return kj::heapArray(params.get("config").as<capnp::Data>());
}

RegistrationResult toResult(capnp::DynamicStruct::Reader results) {
  auto response = results.as<schema::RegistrationServer::RegisterConnectionResults>().getResult();
  auto result = response.getResult();
  if (result.isError()) {
    auto error = result.getError();
    return RegistrationError{kj::str(error.getCause()), error.getRetryAfter() * kj::NANOSECONDS,
                             error.getShouldRetry()};
  }
  auto details = result.getConnectionDetails();
  return ConnectionDetails{kj::heapArray(details.getUuid()), kj::str(details.getLocationName()),
                           details.getTunnelIsRemotelyManaged()};
}

void writeResult(schema::ConnectionResponse::Builder out, const RegistrationResult& result) {
  KJ_SWITCH_ONEOF(result) {
    KJ_CASE_ONEOF(details, ConnectionDetails) {
      auto d = out.initResult().initConnectionDetails();
      d.setUuid(details.uuid);
      d.setLocationName(details.locationName);
      d.setTunnelIsRemotelyManaged(details.tunnelIsRemotelyManaged);
    }
    KJ_CASE_ONEOF(error, RegistrationError) {
      auto e = out.initResult().initError();
      e.setCause(error.cause);
      e.setRetryAfter(error.retryAfter / kj::NANOSECONDS);
      e.setShouldRetry(error.shouldRetry);
    }
  }
}

// The registration call of a transcript (C->E call, method 0) and its answer (E->C results).
const TranscriptMessage& registrationCall(const ControlTranscript& transcript) {
  for (auto& m: transcript.messages) {
    if (m.direction == Direction::CLIENT_TO_EDGE && m.kind() == "call" &&
        infoOf(m).methodId == 0) {
      return m;
    }
  }
  KJ_FAIL_ASSERT("transcript has no registerConnection call", transcript.title);
}

const TranscriptMessage& registrationAnswer(const ControlTranscript& transcript) {
  for (auto& m: transcript.messages) {
    KJ_IF_MAYBE(results, m.results()) {
      if (results->startsWith("(result = (result")) return m;
    }
  }
  KJ_FAIL_ASSERT("transcript has no registration answer", transcript.title);
}

// =============================================================================================

KJ_TEST("vector file: parsed completely, sizes agree") {
  auto file = load();
  KJ_EXPECT(file.dataStreams.size() == 3);
  KJ_EXPECT(file.transcripts.size() == 2);
  for (auto& v: file.dataStreams) {
    KJ_EXPECT(v.bytes.size() == v.declaredSize, v.title);
    KJ_EXPECT(v.decoded.size() > 0, v.title);
  }
  for (auto& t: file.transcripts) {
    KJ_EXPECT(t.messages.size() >= 8, t.title);
    KJ_EXPECT(t.messages[0].kind() == "bootstrap", t.title);
    for (auto& m: t.messages) {
      // Each entry is one complete capnp-rpc message of the kind its summary names.
      auto reader = readerOf(m.bytes);
      KJ_EXPECT(kindOf(reader->getRoot<capnp::rpc::Message>()) == m.kind(), m.summary);
      auto words = kj::heapArray<capnp::word>(m.bytes.size() / 8);
      memcpy(words.begin(), m.bytes.begin(), words.size() * 8);
      capnp::FlatArrayMessageReader exact(words);
      KJ_EXPECT(exact.getEnd() == words.end() && m.bytes.size() % 8 == 0, m.summary);
    }
  }
}

KJ_TEST("vectors: every data-stream vector decodes to its Decoded values (sync and async)") {
  kj::EventLoop loop;
  kj::WaitScope waitScope(loop);
  auto file = load();
  for (auto& v: file.dataStreams) {
    auto schema = v.isRequest() ? requestSchema() : responseSchema();
    capnp::MallocMessageBuilder expectedMessage;
    auto expected = parseExpected(expectedMessage, schema, v.decoded);

    auto decoded = v.isRequest() ? decodeConnectRequest(v.bytes) : decodeConnectResponse(v.bytes);
    KJ_SWITCH_ONEOF(decoded) {
      KJ_CASE_ONEOF(d, DecodedPreamble) {
        KJ_EXPECT(d.consumed == v.bytes.size(), v.title);
        KJ_EXPECT(d.version[0] == '0' && d.version[1] == '1');
        expectSame(expected, d.message->getRoot<capnp::DynamicStruct>(schema), v.title);
      }
      KJ_CASE_ONEOF(error, WireError) { KJ_FAIL_EXPECT(v.title, error.toString()); }
    }

    MemoryInputStream in(v.bytes);
    kj::Own<capnp::MessageReader> message;
    if (v.isRequest()) {
      KJ_EXPECT(readStreamSignature(in).wait(waitScope) == StreamKind::DATA);
      message = readConnectRequest(in).wait(waitScope);
    } else {
      message = readConnectResponse(in).wait(waitScope);
    }
    expectSame(expected, message->getRoot<capnp::DynamicStruct>(schema), v.title);
  }
}

KJ_TEST("vectors: our encoders reproduce the Decoded values (through the HTTP mapping)") {
  auto file = load();
  size_t requests = 0, responses = 0, errors = 0;
  for (auto& v: file.dataStreams) {
    auto schema = v.isRequest() ? requestSchema() : responseSchema();
    capnp::MallocMessageBuilder expectedMessage;
    auto expected = parseExpected(expectedMessage, schema, v.decoded);

    capnp::MallocMessageBuilder ours;
    kj::Array<kj::byte> bytes;
    if (v.isRequest()) {
      KJ_SWITCH_ONEOF(decodeRequest(expected.as<schema::ConnectRequest>())) {
        KJ_CASE_ONEOF(head, HttpRequestHead) {
          encodeRequest(ours.initRoot<schema::ConnectRequest>(), head.dest, head.type, head.method,
                        head.host, head.headers);
        }
        KJ_CASE_ONEOF(error, WireError) { KJ_FAIL_ASSERT(v.title, error.toString()); }
      }
      bytes = encodeConnectRequest(ours.getRoot<schema::ConnectRequest>().asReader());
      requests++;
    } else {
      KJ_SWITCH_ONEOF(decodeResponse(expected.as<schema::ConnectResponse>())) {
        KJ_CASE_ONEOF(head, HttpResponseHead) {
          KJ_IF_MAYBE(error, head.error) {
            encodeResponseError(ours.initRoot<schema::ConnectResponse>(), *error);
            errors++;
          } else {
            encodeResponse(ours.initRoot<schema::ConnectResponse>(), head.status, head.headers);
            responses++;
          }
        }
        KJ_CASE_ONEOF(error, WireError) { KJ_FAIL_ASSERT(v.title, error.toString()); }
      }
      bytes = encodeConnectResponse(ours.getRoot<schema::ConnectResponse>().asReader());
    }
    // Our preamble decodes (with our own decoder) to the vector's values.
    auto decoded = v.isRequest() ? decodeConnectRequest(bytes) : decodeConnectResponse(bytes);
    KJ_SWITCH_ONEOF(decoded) {
      KJ_CASE_ONEOF(d, DecodedPreamble) {
        expectSame(expected, d.message->getRoot<capnp::DynamicStruct>(schema), v.title);
      }
      KJ_CASE_ONEOF(error, WireError) { KJ_FAIL_EXPECT(v.title, error.toString()); }
    }
    KJ_EXPECT(bytes.slice(0, 8) == v.bytes.slice(0, 8), "preamble bytes differ", v.title);
  }
  KJ_EXPECT(requests == 1 && responses == 1 && errors == 1);
}

// =============================================================================================
// Control transcripts, C->E side replayed into our ControlServer.

class RecordingObserver final: public ControlObserver {
public:
  void registered(const RegistrationParams& params, const RegistrationResult& result) override {
    capnp::MallocMessageBuilder message;
    auto p = message.initRoot<schema::RegistrationServer::RegisterConnectionParams>();
    params.writeTo(p);
    registrations.add(capnp::messageToFlatArray(message));
  }
  void unregistered() override { unregistrations++; }
  void configurationUpdated(kj::ArrayPtr<const kj::byte> json) override {
    configs.add(kj::heapArray(json));
  }

  kj::Vector<kj::Array<capnp::word>> registrations;  // RegisterConnectionParams as written back
  kj::Vector<kj::Array<kj::byte>> configs;
  int unregistrations = 0;
};

void checkServerReply(capnp::MessageReader& reply, const TranscriptMessage& expected,
                      kj::HashMap<uint64_t, uint64_t>& methodOfQuestion) {
  auto message = reply.getRoot<capnp::rpc::Message>();
  KJ_ASSERT(kindOf(message) == expected.kind(), expected.summary, kindOf(message));
  if (message.which() != capnp::rpc::Message::RETURN) return;
  auto ret = message.getReturn();
  KJ_EXPECT(ret.getAnswerId() == infoOf(expected).id, expected.summary);
  KJ_ASSERT(ret.isResults(), expected.summary, message);
  auto expectedReader = readerOf(expected.bytes);
  auto expectedReturn = expectedReader->getRoot<capnp::rpc::Message>().getReturn();
  auto capTable = ret.getResults().getCapTable();
  KJ_EXPECT(capTable.size() == expectedReturn.getResults().getCapTable().size(), expected.summary);
  if (capTable.size() == 1) {
    // The bootstrap answer: the same export id the Go client later releases and calls.
    KJ_EXPECT(capTable[0].isSenderHosted());
    KJ_EXPECT(capTable[0].getSenderHosted() ==
              expectedReturn.getResults().getCapTable()[0].getSenderHosted());
  }
  KJ_IF_MAYBE(resultsText, expected.results()) {
    KJ_IF_MAYBE(method, methodOfQuestion.find(ret.getAnswerId())) {
      auto schema = registrationMethod(*method).getResultType();
      capnp::MallocMessageBuilder expectedMessage;
      auto expectedResults = parseExpected(expectedMessage, schema, *resultsText);
      auto actual = ret.getResults().getContent().getAs<capnp::DynamicStruct>(schema);
      expectSame(expectedResults, actual, expected.summary);
    } else {
      KJ_FAIL_EXPECT("results for an unknown question", expected.summary);
    }
  }
}

kj::Promise<void> drainUntilEof(kj::AsyncInputStream& in, kj::Vector<kj::String>& kinds) {
  return capnp::tryReadMessage(in).then(
      [&in, &kinds](kj::Maybe<kj::Own<capnp::MessageReader>> message) -> kj::Promise<void> {
        KJ_IF_MAYBE(m, message) {
          kinds.add(kj::str(kindOf((*m)->getRoot<capnp::rpc::Message>())));
          return drainUntilEof(in, kinds);
        }
        return kj::READY_NOW;
      });
}

KJ_TEST("transcripts: C->E bytes replayed into ControlServer yield the vector's parameters") {
  auto io = kj::setupAsyncIo();
  auto& timer = io.provider->getTimer();
  auto file = load();
  for (auto& transcript: file.transcripts) {
    KJ_CONTEXT(transcript.title);
    auto& call = registrationCall(transcript);
    capnp::MallocMessageBuilder answerMessage;
    auto answer = parseExpected(answerMessage, registrationMethod(0).getResultType(),
                                KJ_ASSERT_NONNULL(registrationAnswer(transcript).results()));
    FixedRegistrationPolicy policy(toResult(answer));
    RecordingObserver observer;

    auto pipe = kj::newTwoWayPipe();
    ControlServer server(*pipe.ends[1], policy, observer);
    auto& client = *pipe.ends[0];
    kj::HashMap<uint64_t, uint64_t> methodOfQuestion;
    size_t replies = 0;
    for (auto& m: transcript.messages) {
      if (m.direction == Direction::CLIENT_TO_EDGE) {
        if (m.kind() == "call") {
          methodOfQuestion.upsert(infoOf(m).id, infoOf(m).methodId,
                                  [](uint64_t& old, uint64_t&& v) { old = v; });
        }
        timer.timeoutAfter(IO_TIMEOUT, client.write(m.bytes.begin(), m.bytes.size()))
            .wait(io.waitScope);
      } else {
        auto reply = timer.timeoutAfter(IO_TIMEOUT, capnp::readMessage(client)).wait(io.waitScope);
        checkServerReply(*reply, m, methodOfQuestion);
        replies++;
      }
    }
    KJ_EXPECT(replies >= 2);
    // After the Abort the server answers with its own Abort and closes: drain to EOF.
    kj::Vector<kj::String> tail;
    timer.timeoutAfter(IO_TIMEOUT, drainUntilEof(client, tail)).wait(io.waitScope);
    timer.timeoutAfter(IO_TIMEOUT, server.onDisconnect()).wait(io.waitScope);
    for (auto& kind: tail) KJ_EXPECT(kind == "abort", kind);

    // The server saw exactly the parameters of the vector.
    KJ_ASSERT(observer.registrations.size() == 1);
    capnp::MallocMessageBuilder paramsMessage;
    auto expectedParams = parseExpected(paramsMessage, registrationMethod(0).getParamType(),
                                        KJ_ASSERT_NONNULL(call.params()));
    capnp::FlatArrayMessageReader seen(observer.registrations[0]);
    expectSame(expectedParams,
               seen.getRoot<capnp::DynamicStruct>(registrationMethod(0).getParamType()),
               "registration params");
    auto params = RegistrationParams::readFrom(
        seen.getRoot<schema::RegistrationServer::RegisterConnectionParams>());
    KJ_EXPECT(params.tunnelId.size() == 16 && params.clientId.size() == 16);
    KJ_EXPECT(params.originLocalIp.size() == 16);
    KJ_EXPECT(params.version == "2023.7.3" && params.arch == "linux_amd64");

    // Configuration and unregistration exactly when the transcript has them.
    size_t configCalls = 0, unregisterCalls = 0;
    for (auto& m: transcript.messages) {
      if (m.direction == Direction::CLIENT_TO_EDGE && m.kind() == "call") {
        if (infoOf(m).methodId == 2) {
          KJ_ASSERT(configCalls < observer.configs.size());
          KJ_EXPECT(observer.configs[configCalls] == configOf(m));
          configCalls++;
        }
        if (infoOf(m).methodId == 1) unregisterCalls++;
      }
    }
    KJ_EXPECT(observer.configs.size() == configCalls);
    KJ_EXPECT(observer.unregistrations == unregisterCalls);
  }
}

// =============================================================================================
// Control transcripts, E->C side replayed into our ControlClient.

struct ClientSide {
  kj::AsyncIoStream& edge;   // our end of the pipe (we play the edge)
  kj::Timer& timer;
  kj::WaitScope& waitScope;

  // Reads client messages until one of `kind` arrives (Finish/Release may come in any order).
  kj::Own<capnp::MessageReader> next(kj::StringPtr kind) {
    for (int i = 0; i < 16; i++) {
      auto message = timer.timeoutAfter(IO_TIMEOUT, capnp::readMessage(edge)).wait(waitScope);
      auto got = kindOf(message->getRoot<capnp::rpc::Message>());
      if (got == kind) return message;
      KJ_ASSERT(got == "finish" || got == "release", "unexpected message from client", got, kind);
    }
    KJ_FAIL_ASSERT("client never sent", kind);
  }
};

KJ_TEST("transcripts: E->C bytes replayed into ControlClient; its calls carry vector values") {
  auto io = kj::setupAsyncIo();
  auto& timer = io.provider->getTimer();
  auto file = load();
  for (auto& transcript: file.transcripts) {
    KJ_CONTEXT(transcript.title);
    auto& call = registrationCall(transcript);
    capnp::MallocMessageBuilder paramsMessage;
    auto paramsText = parseExpected(paramsMessage, registrationMethod(0).getParamType(),
                                    KJ_ASSERT_NONNULL(call.params()));
    auto params = RegistrationParams::readFrom(
        paramsText.as<schema::RegistrationServer::RegisterConnectionParams>());
    capnp::MallocMessageBuilder answerMessage;
    auto answer = parseExpected(answerMessage, registrationMethod(0).getResultType(),
                                KJ_ASSERT_NONNULL(registrationAnswer(transcript).results()));

    auto pipe = kj::newTwoWayPipe();
    auto client = kj::heap<ControlClient>(*pipe.ends[0], timer);
    ClientSide edge{*pipe.ends[1], timer, io.waitScope};

    auto registration = client->registerConnection(params);
    kj::Maybe<kj::Promise<void>> otherCall;
    kj::HashMap<uint64_t, uint32_t> ourQuestion;  // vector question id -> our client's
    kj::HashMap<uint64_t, uint64_t> methodOfQuestion;
    size_t exactReplays = 0, patchedReplays = 0;
    bool registered = false;

    for (auto& m: transcript.messages) {
      if (m.direction == Direction::CLIENT_TO_EDGE) {
        auto kind = m.kind();
        if (kind == "bootstrap") {
          auto message = edge.next("bootstrap");
          ourQuestion.upsert(infoOf(m).id,
                             message->getRoot<capnp::rpc::Message>().getBootstrap().getQuestionId(),
                             [](uint32_t& old, uint32_t&& v) { old = v; });
        } else if (kind == "call") {
          uint64_t method = infoOf(m).methodId;
          if (method == 2) otherCall = client->updateLocalConfiguration(configOf(m));
          if (method == 1) otherCall = client->unregisterConnection();
          auto message = edge.next("call");
          auto ourCall = message->getRoot<capnp::rpc::Message>().getCall();
          KJ_EXPECT(ourCall.getInterfaceId() == infoOf(m).interfaceId);
          KJ_EXPECT(ourCall.getInterfaceId() == 0xf71695ec7fe85497ull);
          KJ_EXPECT(ourCall.getMethodId() == method);
          // The parameters our client wrote equal the vector's (IDs may differ, values not).
          auto schema = registrationMethod(method).getParamType();
          capnp::MallocMessageBuilder expectedMessage;
          auto expectedParams = parseExpected(expectedMessage, schema,
                                              KJ_ASSERT_NONNULL(m.params()));
          expectSame(expectedParams,
                     ourCall.getParams().getContent().getAs<capnp::DynamicStruct>(schema),
                     m.summary);
          uint64_t q = infoOf(m).id;
          ourQuestion.upsert(q, ourCall.getQuestionId(),
                             [](uint32_t& old, uint32_t&& v) { old = v; });
          methodOfQuestion.upsert(q, method, [](uint64_t& old, uint64_t&& v) { old = v; });
        }
        // finish / release / abort: our client sends them when it likes; not required here.
      } else {
        uint64_t a = infoOf(m).id;
        uint32_t ours = KJ_ASSERT_NONNULL(ourQuestion.find(a));
        kj::Array<kj::byte> bytes;
        if (ours == a) {
          bytes = kj::heapArray(m.bytes.asPtr());
          exactReplays++;
        } else {
          bytes = withAnswerId(m.bytes, ours);
          patchedReplays++;
        }
        timer.timeoutAfter(IO_TIMEOUT, edge.edge.write(bytes.begin(), bytes.size()))
            .wait(io.waitScope);
        KJ_IF_MAYBE(method, methodOfQuestion.find(a)) {
          if (*method == 0 && !registered) {
            registered = true;
            auto result = timer.timeoutAfter(IO_TIMEOUT, kj::mv(registration)).wait(io.waitScope);
            capnp::MallocMessageBuilder ourResult;
            writeResult(ourResult.initRoot<schema::RegistrationServer::RegisterConnectionResults>()
                            .initResult(), result);
            expectSame(answer,
                       ourResult.getRoot<capnp::DynamicStruct>(
                           registrationMethod(0).getResultType()).asReader(),
                       "registration result");
            KJ_IF_MAYBE(error, result.tryGet<RegistrationError>()) {
              KJ_EXPECT(error->isDuplicate() == (error->cause == "EDUPCONN"));
              if (error->isDuplicate()) {
                KJ_EXPECT(error->retryAfter == 2 * kj::SECONDS);
                KJ_EXPECT(error->shouldRetry);
              }
            }
            KJ_IF_MAYBE(details, result.tryGet<ConnectionDetails>()) {
              KJ_EXPECT(details->locationName == "LHR");
              KJ_EXPECT(details->uuid.size() == 16);
            }
          } else {
            KJ_IF_MAYBE(p, otherCall) {
              timer.timeoutAfter(IO_TIMEOUT, kj::mv(*p)).wait(io.waitScope);
              otherCall = nullptr;
            }
          }
        }
      }
    }
    KJ_EXPECT(registered);
    KJ_EXPECT(otherCall == nullptr);
    KJ_EXPECT(exactReplays + patchedReplays >= 2);
    KJ_LOG(INFO, "E->C replay", transcript.title, exactReplays, patchedReplays);

    // Dropping the client (and its stream) ends the session; the edge side sees the end.
    client = nullptr;
    pipe.ends[0] = nullptr;
    kj::Vector<kj::String> tail;
    timer.timeoutAfter(IO_TIMEOUT, drainUntilEof(edge.edge, tail)).wait(io.waitScope);
    for (auto& kind: tail) {
      KJ_EXPECT(kind == "finish" || kind == "release" || kind == "abort", kind);
    }
  }
}

bool has(kj::StringPtr text, kj::StringPtr needle) {
  return strstr(text.cStr(), needle.cStr()) != nullptr;
}

KJ_TEST("vectors: renderVectorFile (cfqt wire-dump) decodes every entry") {
  auto text = testing::renderVectorFile(load());
  auto bad = testing::parseVectorFile("## DATA STREAM: x\n0a36\n# total 3 bytes\n");
  KJ_EXPECT(bad.is<kj::String>());
  KJ_EXPECT(!has(text, "cannot decode"), text);
  KJ_EXPECT(has(text, "ConnectRequest ( dest = \"https://example.trycloudflare.com/path?q=1\""));
  KJ_EXPECT(has(text, "http: status 200"));
  KJ_EXPECT(has(text, "origin error: dial tcp 127.0.0.1:8080"));
  KJ_EXPECT(has(text, "RegistrationServer.registerConnection params"));
  KJ_EXPECT(has(text, "cause = \"EDUPCONN\", retryAfter = 2000000000, shouldRetry = true"));
  KJ_EXPECT(has(text, "locationName = \"LHR\""));
}

}  // namespace
}  // namespace cfqt::wire
