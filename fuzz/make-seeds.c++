// Writes the seed corpora of fuzz/corpus/<target>/seed-* (issue 18) from the golden vectors
// (data/tunnel-wire-vectors-2023.7.3.txt) and the seeds of the deterministic mutation tests
// (src/*/fuzz-test.c++). Run from the repository root: build/tests/fuzz-make-seeds fuzz/corpus
// (existing seed-* files are overwritten; inputs the fuzzer found are kept).

#include "wire/control.h"
#include "wire/data-stream.h"
#include "wire/http-metadata.h"
#include "wire/test-vectors.h"
#include "http2/header.h"

#include <capnp/message.h>
#include <capnp/rpc.capnp.h>
#include <capnp/serialize.h>
#include <kj/filesystem.h>
#include <kj/main.h>

namespace cfqt {
namespace {

using wire::testing::Direction;
namespace schema = wire::schema;

kj::Array<kj::byte> flat(capnp::MessageBuilder& builder) {
  auto words = capnp::messageToFlatArray(builder);
  return kj::heapArray<kj::byte>(words.asBytes());
}

constexpr kj::StringPtr CONFIG_JSON =
    R"({"ingress":[{"hostname":"a.test","service":"http://localhost:8080"},)"
    R"({"service":"http_status:404"}],"warp-routing":{"enabled":false},"n":[1.5e3,-2,null,true]})"_kj;

// What an edge sends on such a stream: Bootstrap, then updateConfiguration, registerUdpSession
// and unregisterUdpSession calls pipelined on the bootstrap answer, each followed by its Finish.
kj::Array<kj::Array<kj::byte>> edgeRpcSeeds() {
  kj::Vector<kj::Array<kj::byte>> out;
  {
    capnp::MallocMessageBuilder b;
    b.initRoot<capnp::rpc::Message>().initBootstrap().setQuestionId(0);
    out.add(flat(b));
  }
  auto callHeader = [](capnp::rpc::Message::Builder root, uint32_t question, uint64_t iface,
                       uint16_t method) {
    auto call = root.initCall();
    call.setQuestionId(question);
    call.initTarget().initPromisedAnswer().setQuestionId(0);
    call.setInterfaceId(iface);
    call.setMethodId(method);
    return call.initParams().getContent();
  };
  auto finish = [&](uint32_t question) {
    capnp::MallocMessageBuilder b;
    b.initRoot<capnp::rpc::Message>().initFinish().setQuestionId(question);
    out.add(flat(b));
  };
  {
    capnp::MallocMessageBuilder b;
    auto params = callHeader(b.initRoot<capnp::rpc::Message>(), 1,
                             capnp::typeId<schema::ConfigurationManager>(), 0)
        .initAs<schema::ConfigurationManager::UpdateConfigurationParams>();
    params.setVersion(3);
    params.setConfig(CONFIG_JSON.asBytes());
    out.add(flat(b));
  }
  finish(1);
  {
    capnp::MallocMessageBuilder b;
    auto params = callHeader(b.initRoot<capnp::rpc::Message>(), 2,
                             capnp::typeId<schema::SessionManager>(), 0)
        .initAs<schema::SessionManager::RegisterUdpSessionParams>();
    params.setSessionId(kj::heapArray<kj::byte>(16));
    params.setDstIp(kj::heapArray<kj::byte>({127, 0, 0, 1}));
    params.setDstPort(53);
    params.setCloseAfterIdleHint(1000);
    out.add(flat(b));
  }
  finish(2);
  {
    capnp::MallocMessageBuilder b;
    auto params = callHeader(b.initRoot<capnp::rpc::Message>(), 3,
                             capnp::typeId<schema::SessionManager>(), 1)
        .initAs<schema::SessionManager::UnregisterUdpSessionParams>();
    params.setSessionId(kj::heapArray<kj::byte>(16));
    params.setMessage("bye");
    out.add(flat(b));
  }
  finish(3);
  return out.releaseAsArray();
}


kj::Array<kj::byte> srvResponse() {
  kj::Vector<kj::byte> m;
  auto u16 = [&](kj::uint v) { m.add(kj::byte(v >> 8)); m.add(kj::byte(v)); };
  auto name = [&](kj::ArrayPtr<const kj::StringPtr> labels) {
    for (auto label: labels) {
      m.add(kj::byte(label.size()));
      m.addAll(label.asBytes());
    }
    m.add(0);
  };
  u16(0x1234); u16(0x8180); u16(1); u16(2); u16(0); u16(0);
  kj::StringPtr question[] = {"_v2-origintunneld"_kj, "_tcp"_kj, "argotunnel"_kj, "com"_kj};
  name(question);
  u16(33); u16(1);
  // answer 1: name -> question (offset 12), target region1.v2.argotunnel.com
  u16(0xc00c); u16(33); u16(1); u16(0); u16(300);
  size_t rdlengthAt = m.size();
  u16(0);
  size_t rdataStart = m.size();
  u16(1); u16(1); u16(7844);
  size_t targetAt = m.size();
  kj::StringPtr target[] = {"region1"_kj, "v2"_kj, "argotunnel"_kj, "com"_kj};
  name(target);
  size_t rdlength = m.size() - rdataStart;
  m[rdlengthAt] = kj::byte(rdlength >> 8);
  m[rdlengthAt + 1] = kj::byte(rdlength);
  // answer 2: target region2 + pointer to "v2.argotunnel.com"
  u16(0xc00c); u16(33); u16(1); u16(0); u16(300);
  u16(6 + 1 + 7 + 2);
  u16(2); u16(1); u16(7844);
  m.add(7);
  m.addAll("region2"_kj.asBytes());
  u16(0xc000 | (targetAt + 8));
  return m.releaseAsArray();
}


constexpr kj::StringPtr JSON_SEEDS[] = {
    R"({"success":true,"result":{"id":"3f1c0a2e-1b2c-4d3e-8f90-a1b2c3d4e5f6","name":"qt",)"
    R"("hostname":"happy-words-here.trycloudflare.com","account_tag":)"
    R"("0123456789abcdef0123456789abcdef","secret":"aGVsbG8gd29ybGQ="},"errors":[],)"
    R"("messages":[]})"_kj,
    R"({"success":false,"result":null,"errors":[{"code":1001,"message":"tunnel quota exceeded"},)"
    R"({"code":7003,"message":"could not route"}],"messages":[]})"_kj,
    R"({"SUCCESS":true,"Result":{"id":"urn:uuid:3F1C0A2E-1B2C-4D3E-8F90-A1B2C3D4E5F6",)"
    R"("hostname":"a-b-c.trycloudflare.com","account_tag":"acct","secret":"aGVsbG8=",)"
    R"("extra":[1,-2.5e3,{"x":null}]},"Errors":[],"whatever":{"deep":[true,false]}})"_kj,
    R"( {"a":"x\u00e9\ud83d\ude00\n\"\\\/\b\f\r\t","b":[1,-2.5e3,true,false,null],"A":{}} )"_kj,
    R"({"result":{"id":"{3f1c0a2e-1b2c-4d3e-8f90-a1b2c3d4e5f6}","hostname":"h",)"
    R"("secret":"c2VjcmV0LXRleHQ="}})"_kj,
};

constexpr kj::StringPtr ORIGIN_SEEDS[] = {
    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"_kj,
    "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: b\r\n\r\n"
    "5;ext=1\r\nhello\r\nA\r\n0123456789\r\n0\r\nTrailer: x\r\n\r\n"_kj,
    "HTTP/1.0 404 Not Found\r\nServer: x\r\n\r\nbody until eof"_kj,
    "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\nSet-Cookie: a=b\r\n"
    "Set-Cookie: c=d\r\n\r\n"_kj,
    "HTTP/1.1 301 Moved\r\nLocation: /x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"_kj,
    "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"_kj,
    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"_kj,
    "\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Folded: a\r\n b\r\n\r\nok"_kj,
};

class MakeSeeds {
public:
  explicit MakeSeeds(kj::ProcessContext& context): context(context) {}

  kj::MainFunc getMain() {
    return kj::MainBuilder(context, "cfqt fuzz seeds", "Writes the seed corpora.")
        .expectArg("<corpus-dir>", KJ_BIND_METHOD(*this, run))
        .build();
  }

private:
  kj::ProcessContext& context;
  kj::Own<kj::Filesystem> fs = kj::newDiskFilesystem();
  kj::Own<const kj::Directory> root;
  size_t written = 0;

  void put(kj::StringPtr target, kj::StringPtr name, kj::ArrayPtr<const kj::byte> bytes) {
    auto file = root->openFile(kj::Path({target, kj::str("seed-", name)}),
                               kj::WriteMode::CREATE | kj::WriteMode::MODIFY |
                               kj::WriteMode::CREATE_PARENT);
    file->truncate(0);
    file->write(0, bytes);
    written++;
  }
  void put(kj::StringPtr target, kj::StringPtr name, kj::StringPtr text) {
    put(target, name, text.asBytes());
  }
  kj::Array<kj::byte> prefixed(kj::byte first, kj::ArrayPtr<const kj::byte> rest) {
    auto out = kj::heapArray<kj::byte>(rest.size() + 1);
    out[0] = first;
    memcpy(out.begin() + 1, rest.begin(), rest.size());
    return out;
  }

  kj::MainBuilder::Validity run(kj::StringPtr dir) {
    root = fs->getRoot().openSubdir(fs->getCurrentPath().eval(dir),
                                     kj::WriteMode::CREATE | kj::WriteMode::MODIFY);
    auto vectors = wire::testing::loadVectorFile(wire::testing::defaultVectorPath());
    size_t i = 0;
    for (auto& v: vectors.dataStreams) {
      put("connect_request", kj::str("vector-", i), v.bytes);
      put("connect_response", kj::str("vector-", i), v.bytes);
      i++;
    }
    size_t t = 0;
    for (auto& transcript: vectors.transcripts) {
      kj::Vector<kj::byte> edgeToClient, clientToEdge;
      size_t m = 0;
      for (auto& message: transcript.messages) {
        if (message.direction == Direction::EDGE_TO_CLIENT) {
          edgeToClient.addAll(message.bytes);
          put("control_client", kj::str("t", t, "-message-", m), message.bytes);
        } else {
          clientToEdge.addAll(message.bytes);
          put("control_server", kj::str("t", t, "-message-", m), message.bytes);
        }
        m++;
      }
      put("control_client", kj::str("t", t, "-stream"), edgeToClient);
      put("control_server", kj::str("t", t, "-stream"), clientToEdge);
      t++;
    }
    {
      kj::Vector<kj::byte> session;
      for (auto& message: edgeRpcSeeds()) session.addAll(message);
      put("edge_rpc", "session", session);
      put("edge_rpc", "config-json", CONFIG_JSON);
    }
    auto nul = [](std::initializer_list<kj::StringPtr> parts) {
      kj::Vector<kj::byte> out;
      bool first = true;
      for (auto p: parts) {
        if (!first) out.add(0);
        first = false;
        out.addAll(p.asBytes());
      }
      return out.releaseAsArray();
    };
    put("http_metadata", "request", nul({"https://example.trycloudflare.com/path?q=1",
        "HttpMethod", "GET", "HttpHost", "example.trycloudflare.com", "HttpHeader:Accept", "*/*",
        "HttpHeader:Content-Length", "5", "HttpHeader:X-Forwarded-For", "1.2.3.4"}));
    put("http_metadata", "websocket", nul({"istps://example.trycloudflare.com/ws",
        "HttpMethod", "GET", "HttpHost", "example.trycloudflare.com", "HttpHeader:Upgrade",
        "websocket", "HttpHeader:Connection", "Upgrade", "HttpHeader:Sec-Websocket-Key", "abc"}));
    put("http_metadata", "response", nul({"x", "HttpStatus", "200",
        "HttpHeader:Content-Type", "text/plain", "HttpHeader:Transfer-Encoding", "chunked"}));
    put("http_metadata", "error", nul({"!dial tcp: connection refused", "HttpStatus", "502"}));
    i = 0;
    for (auto seed: JSON_SEEDS) {
      // 0x58: status 200, depth limit 9, Content-Type application/json (quick_tunnel_json.c++).
      put("quick_tunnel_json", kj::str("api-", i++), prefixed(0x58, seed.asBytes()));
    }
    put("dns_answer", "srv", srvResponse());
    i = 0;
    for (auto seed: ORIGIN_SEEDS) {
      put("origin_response", kj::str("get-", i), prefixed(0, seed.asBytes()));
      if (i == 0) put("origin_response", "head-0", prefixed(2, seed.asBytes()));
      i++;
    }
    put("origin_response", "websocket", prefixed(3,
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\x81\x05hello"_kj.asBytes()));
    constexpr kj::StringPtr HOST = "Host: fuzz.trycloudflare.localhost\r\n"_kj;
    put("front_door_request", "get", kj::str("GET /a?b=c HTTP/1.1\r\n", HOST, "Accept: */*\r\n\r\n"));
    put("front_door_request", "post", kj::str("POST /up HTTP/1.1\r\n", HOST,
        "Content-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello"));
    put("front_door_request", "chunked", kj::str("POST /up HTTP/1.1\r\n", HOST,
        "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"));
    put("front_door_request", "smuggle", kj::str("POST / HTTP/1.1\r\n", HOST,
        "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /x HTTP/1.1\r\n", HOST,
        "\r\n"));
    put("front_door_request", "expect", kj::str("PUT /e HTTP/1.1\r\n", HOST,
        "Expect: 100-continue\r\nContent-Length: 3\r\n\r\nabc"));
    put("front_door_request", "websocket", kj::str("GET /ws HTTP/1.1\r\n", HOST,
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n\x81\x85" "abcd\x09\x07\x0f\x08\x0e"));
    put("front_door_request", "pipelined", kj::str("GET /1 HTTP/1.1\r\n", HOST, "\r\nHEAD /2 HTTP/1.1\r\n",
        HOST, "Connection: close\r\n\r\n"));
    put("front_door_request", "absolute", "GET http://fuzz.trycloudflare.localhost/p HTTP/1.1\r\n\r\n");
    put("front_door_request", "unknown-host", "OPTIONS * HTTP/1.1\r\nHost: nobody.example:8080\r\n\r\n");
    // Masked client frames: text "hello", ping, a fragmented message, binary, close.
    put("websocket", "text", "\x81\x85" "abcd\x09\x07\x0f\x08\x0e"_kj);
    put("websocket", "ping-close", "\x89\x80" "abcd\x88\x82" "abcdbk"_kj);
    put("websocket", "fragments", "\x01\x83" "abcd\x00\x00\x00\x80\x83" "abcd\x01\x01\x01"_kj);
    {
      kj::Vector<kj::byte> frame;
      frame.addAll("\x82\xfe\x00\x80" "abcd"_kj.asBytes());
      for (int k = 0; k < 128; k++) frame.add('x');
      put("websocket", "binary-126", frame);
    }
    {
      wire::Header headers[] = {{kj::str("Content-Type"), kj::str("text/html")},
                                {kj::str("Set-Cookie"), kj::str("a=b")},
                                {kj::str("Set-Cookie"), kj::str("c=d")},
                                {kj::str("Sec-WebSocket-Accept"), kj::str("x")}};
      put("http2_header", "serialized", http2::serializeResponseHeaders(headers));
      put("http2_header", "list", nul({"\x01:authority", "a.test", "host", "b.test",
          "cf-cloudflared-proxy-connection-upgrade", "websocket", "content-length", "12",
          "content-type", "text/event-stream", "cookie", "a=1", "cookie", "b=2",
          "expect", "100-continue", "cf-int-cloudflared-tracing", "t"}));
    }
    context.exitInfo(kj::str("wrote ", written, " seed files under ", dir));
    return true;
  }
};

}  // namespace
}  // namespace cfqt

KJ_MAIN(cfqt::MakeSeeds)
