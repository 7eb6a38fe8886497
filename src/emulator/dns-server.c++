#include "dns-server.h"

#include "observe/log.h"

#include <kj/debug.h>

#include <arpa/inet.h>

namespace cfqt::emulator {

namespace {

constexpr uint16_t TYPE_A = 1;
constexpr uint16_t TYPE_NS = 2;
constexpr uint16_t TYPE_SOA = 6;
constexpr uint16_t TYPE_AAAA = 28;
constexpr uint16_t CLASS_IN = 1;
constexpr uint RCODE_FORMERR = 1;
constexpr uint RCODE_NXDOMAIN = 3;
constexpr uint RCODE_NOTIMP = 4;
constexpr uint RCODE_REFUSED = 5;
constexpr size_t MAX_NAME = 255;
constexpr size_t MAX_TCP_MESSAGE = 4096;   // a query; anything longer ends the connection

struct Question {
  kj::String name;            // lower case, no trailing dot ("" = root)
  size_t end;                 // offset just past QTYPE/QCLASS
  uint16_t type;
  uint16_t klass;
};

kj::Maybe<Question> parseQuestion(kj::ArrayPtr<const kj::byte> m) {
  // The first question, uncompressed (a query has no earlier name to point at).
  size_t pos = 12;
  kj::Vector<char> name;
  while (true) {
    if (pos >= m.size()) return nullptr;
    size_t len = m[pos++];
    if (len == 0) break;
    if (len > 63 || pos + len > m.size()) return nullptr;
    if (name.size() > 0) name.add('.');
    for (size_t i = 0; i < len; i++) {
      char c = static_cast<char>(m[pos + i]);
      if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
      name.add(c);
    }
    if (name.size() > MAX_NAME) return nullptr;
    pos += len;
  }
  if (pos + 4 > m.size()) return nullptr;
  uint16_t type = (uint16_t(m[pos]) << 8) | m[pos + 1];
  uint16_t klass = (uint16_t(m[pos + 2]) << 8) | m[pos + 3];
  name.add('\0');
  return Question{kj::String(name.releaseAsArray()), pos + 4, type, klass};
}

class Writer {
public:
  void u8(uint v) { out.add(kj::byte(v)); }
  void u16(uint v) { out.add(kj::byte(v >> 8)); out.add(kj::byte(v)); }
  void u32(uint32_t v) { u16(v >> 16); u16(v & 0xffff); }
  void bytes(kj::ArrayPtr<const kj::byte> b) { out.addAll(b); }
  void name(kj::StringPtr dotted) {
    size_t start = 0;
    for (size_t i = 0; i <= dotted.size(); i++) {
      if (i == dotted.size() || dotted[i] == '.') {
        if (i > start) {
          u8(i - start);
          out.addAll(dotted.slice(start, i).asBytes());
        }
        start = i + 1;
      }
    }
    u8(0);
  }
  size_t size() const { return out.size(); }
  kj::Array<kj::byte> finish() { return out.releaseAsArray(); }

private:
  kj::Vector<kj::byte> out;
};

}  // namespace

kj::Maybe<kj::Array<kj::byte>> parseIpBytes(kj::StringPtr ip) {
  if (ip.startsWith("[") && ip.endsWith("]")) {
    return parseIpBytes(kj::str(ip.slice(1, ip.size() - 1)));
  }
  kj::byte buffer[16];
  if (inet_pton(AF_INET, ip.cStr(), buffer) == 1) return kj::heapArray<kj::byte>(buffer, 4);
  if (inet_pton(AF_INET6, ip.cStr(), buffer) == 1) return kj::heapArray<kj::byte>(buffer, 16);
  return nullptr;
}

DnsServer::DnsServer(kj::Timer& timer, Registry& registry, DnsServerOptions options)
    : timer(timer), registry(registry), options(kj::mv(options)), connections(errorHandler) {}

DnsServer::~DnsServer() noexcept(false) {}

void DnsServer::ErrorHandler::taskFailed(kj::Exception&& exception) {
  observe::logDebug("DNS connection ended with an error", observe::Fields().error(exception));
}

kj::Maybe<kj::Array<kj::byte>> DnsServer::answer(kj::ArrayPtr<const kj::byte> query) {
  if (query.size() < 12 || (query[2] & 0x80) != 0) return nullptr;
  queries++;
  uint opcode = (query[2] >> 3) & 0x0f;
  bool recursionDesired = (query[2] & 0x01) != 0;
  uint16_t qdcount = (uint16_t(query[4]) << 8) | query[5];

  Writer w;
  auto header = [&](uint rcode, uint answers, uint authority, bool withQuestion) {
    w.bytes(query.slice(0, 2));                                    // id
    w.u8(0x80 | (opcode << 3) | 0x04 | (recursionDesired ? 1 : 0));  // QR, opcode, AA, RD
    w.u8(rcode);                                                   // RA = 0: authoritative only
    w.u16(withQuestion ? 1 : 0);
    w.u16(answers);
    w.u16(authority);
    w.u16(0);
  };
  if (opcode != 0) {
    header(RCODE_NOTIMP, 0, 0, false);
    return w.finish();
  }
  Question question;
  KJ_IF_MAYBE(q, parseQuestion(query)) {
    question = kj::mv(*q);
  } else {
    header(RCODE_FORMERR, 0, 0, false);
    return w.finish();
  }
  if (qdcount != 1) {
    header(RCODE_FORMERR, 0, 0, false);
    return w.finish();
  }
  auto zone = registry.zone();
  bool inZone = question.name == zone ||
      (question.name.size() > zone.size() && question.name.endsWith(zone) &&
       question.name[question.name.size() - zone.size() - 1] == '.');
  if (!inZone || question.klass != CLASS_IN) {
    header(RCODE_REFUSED, 0, 0, true);
    w.bytes(query.slice(12, question.end));
    return w.finish();
  }

  auto soa = [&]() {
    // The zone's SOA in the authority section: the negative-caching TTL is min(TTL, MINIMUM).
    w.name(zone);
    w.u16(TYPE_SOA); w.u16(CLASS_IN); w.u32(options.negativeTtl);
    Writer rdata;
    rdata.name(kj::str("ns.", zone));
    rdata.name(kj::str("dns.", zone));
    rdata.u32(1);            // serial
    rdata.u32(10000);        // refresh
    rdata.u32(2400);         // retry
    rdata.u32(604800);       // expire
    rdata.u32(options.negativeTtl);
    auto bytes = rdata.finish();
    w.u16(bytes.size());
    w.bytes(bytes);
  };

  bool exists = question.name == zone;
  bool visible = exists;
  if (!exists) {
    KJ_IF_MAYBE(tunnel, registry.findByHostname(question.name)) {
      exists = true;
      visible = registry.registeredFor(*tunnel, options.dnsDelay);
    }
  }
  if (!visible) {
    header(RCODE_NXDOMAIN, 0, 1, true);
    w.bytes(query.slice(12, question.end));
    soa();
    return w.finish();
  }

  kj::ArrayPtr<const kj::Array<kj::byte>> records;
  if (question.name == zone) {
    if (question.type == TYPE_SOA) {
      header(0, 1, 0, true);
      w.bytes(query.slice(12, question.end));
      soa();
      return w.finish();
    }
  } else if (question.type == TYPE_A) {
    records = options.ipv4;
  } else if (question.type == TYPE_AAAA) {
    records = options.ipv6;
  }
  if (records.size() == 0) {
    // NODATA: the name exists, not with this type.
    header(0, 0, 1, true);
    w.bytes(query.slice(12, question.end));
    soa();
    return w.finish();
  }
  header(0, records.size(), 0, true);
  w.bytes(query.slice(12, question.end));
  for (auto& r: records) {
    w.u16(0xc00c);           // the question's name
    w.u16(question.type); w.u16(CLASS_IN); w.u32(options.answerTtl);
    w.u16(r.size());
    w.bytes(r);
  }
  (void)TYPE_NS;
  return w.finish();
}

kj::Promise<void> DnsServer::serveUdp(kj::DatagramPort& port) {
  auto receiver = port.makeReceiver({512 * 8, 0});
  auto& r = *receiver;
  return r.receive().then([this, &port, &r]() -> kj::Promise<void> {
    auto content = r.getContent();
    if (content.isTruncated) return kj::READY_NOW;
    KJ_IF_MAYBE(response, answer(content.value)) {
      auto bytes = kj::mv(*response);
      auto promise = port.send(bytes.begin(), bytes.size(), r.getSource());
      return promise.attach(kj::mv(bytes)).ignoreResult();
    }
    return kj::READY_NOW;
  }).catch_([](kj::Exception&& e) {
    // One client's failure (an ICMP error on the send, say) must not end the server.
    observe::logDebug("DNS datagram not answered", observe::Fields().error(e));
  }).then([this, &port]() { return serveUdp(port); }).attach(kj::mv(receiver));
}

kj::Promise<void> DnsServer::listenTcp(kj::ConnectionReceiver& receiver,
                                       kj::Maybe<kj::TlsContext&> tls) {
  return receiver.accept().then([this, &receiver, tls](kj::Own<kj::AsyncIoStream> stream) mutable {
    KJ_IF_MAYBE(t, tls) {
      connections.add(serveTls(kj::mv(stream), *t));
    } else {
      connections.add(serveConnection(kj::mv(stream)));
    }
    return listenTcp(receiver, tls);
  });
}

kj::Promise<void> DnsServer::serveTls(kj::Own<kj::AsyncIoStream> stream, kj::TlsContext& tls) {
  return timer.timeoutAfter(options.connectionIdleTimeout, tls.wrapServer(kj::mv(stream)))
      .then([this](kj::Own<kj::AsyncIoStream> secured) {
    return serveConnection(kj::mv(secured));
  });
}

kj::Promise<void> DnsServer::serveConnection(kj::Own<kj::AsyncIoStream> stream) {
  auto& s = *stream;
  return readQuery(s).attach(kj::mv(stream));
}

kj::Promise<void> DnsServer::readQuery(kj::AsyncIoStream& stream) {
  // RFC 1035 4.2.2 / RFC 7858: each message is preceded by its 2-byte length.
  auto prefix = kj::heapArray<kj::byte>(2);
  auto& p = prefix;
  auto read = stream.tryRead(p.begin(), 2, 2);
  return timer.timeoutAfter(options.connectionIdleTimeout, kj::mv(read))
      .then([this, &stream, prefix = kj::mv(prefix)](size_t n) -> kj::Promise<void> {
    if (n < 2) return kj::READY_NOW;    // the client is done
    size_t length = (size_t(prefix[0]) << 8) | prefix[1];
    if (length < 12 || length > MAX_TCP_MESSAGE) return kj::READY_NOW;
    return readMessage(stream, length);
  });
}

kj::Promise<void> DnsServer::readMessage(kj::AsyncIoStream& stream, size_t length) {
  auto message = kj::heapArray<kj::byte>(length);
  auto read = stream.read(message.begin(), length);   // the heap bytes stay put when it moves
  return timer.timeoutAfter(options.connectionIdleTimeout, kj::mv(read))
      .then([this, &stream, message = kj::mv(message)]() {
    return answerMessage(stream, message);
  });
}

kj::Promise<void> DnsServer::answerMessage(kj::AsyncIoStream& stream,
                                           kj::ArrayPtr<const kj::byte> message) {
  KJ_IF_MAYBE(response, answer(message)) {
    auto framed = kj::heapArray<kj::byte>(response->size() + 2);
    framed[0] = kj::byte(response->size() >> 8);
    framed[1] = kj::byte(response->size());
    memcpy(framed.begin() + 2, response->begin(), response->size());
    auto write = stream.write(framed.begin(), framed.size());
    return write.attach(kj::mv(framed)).then([this, &stream]() { return readQuery(stream); });
  }
  return kj::READY_NOW;
}

}  // namespace cfqt::emulator
