#include "wire/test-vectors.h"

#include "wire/data-stream.h"
#include "wire/http-metadata.h"
#include "wire/tunnelrpc.capnp.h"

#include <capnp/rpc.capnp.h>
#include <capnp/serialize-text.h>
#include <capnp/serialize.h>
#include <kj/debug.h>
#include <kj/encoding.h>
#include <kj/filesystem.h>
#include <kj/map.h>
#include <kj/vector.h>

#include <stdlib.h>

namespace cfqt::wire::testing {

namespace {

constexpr kj::StringPtr DATA_HEADER = "## DATA STREAM: "_kj;
constexpr kj::StringPtr CONTROL_HEADER = "## CONTROL STREAM transcript, "_kj;
constexpr kj::StringPtr C_TO_E = "### C->E ("_kj;
constexpr kj::StringPtr E_TO_C = "### E->C ("_kj;
constexpr kj::StringPtr DECODED = "# Decoded: "_kj;
constexpr kj::StringPtr RPC_VIEW = "# rpc.capnp view: "_kj;
constexpr kj::StringPtr TOTAL = "# total "_kj;

kj::Maybe<size_t> parseDecimal(kj::StringPtr text) {
  if (text.size() == 0) return nullptr;
  size_t value = 0;
  for (char c: text) {
    if (c < '0' || c > '9') return nullptr;
    value = value * 10 + (c - '0');
  }
  return value;
}

int hexDigit(char c) {
  if ('0' <= c && c <= '9') return c - '0';
  if ('a' <= c && c <= 'f') return c - 'a' + 10;
  if ('A' <= c && c <= 'F') return c - 'A' + 10;
  return -1;
}

kj::Maybe<size_t> findText(kj::StringPtr haystack, kj::StringPtr needle) {
  if (needle.size() > haystack.size()) return nullptr;
  for (size_t i = 0; i + needle.size() <= haystack.size(); i++) {
    if (memcmp(haystack.begin() + i, needle.begin(), needle.size()) == 0) return i;
  }
  return nullptr;
}

bool isIdentChar(char c) {
  return ('a' <= c && c <= 'z') || ('A' <= c && c <= 'Z') || ('0' <= c && c <= '9') || c == '_';
}

// After a '"' inside a Go literal: does the literal end here?
bool closesLiteral(kj::StringPtr rest) {
  if (rest.size() == 0) return true;
  if (rest[0] == ')' || rest[0] == ']') return true;
  if (!rest.startsWith(", ")) return false;
  kj::StringPtr next = rest.slice(2);
  if (next.startsWith("\"")) return true;
  size_t i = 0;
  while (i < next.size() && isIdentChar(next[i])) i++;
  return i > 0 && next.slice(i).startsWith(" =");
}

struct Parser {
  kj::Vector<DataStreamVector> dataStreams;
  kj::Vector<ControlTranscript> transcripts;
  kj::Vector<TranscriptMessage> messages;  // of the transcript being parsed
  kj::Vector<kj::byte> hex;                // bytes of the current entry
  enum { NONE, DATA, MESSAGE, TRANSCRIPT } current = NONE;
  kj::Maybe<kj::String> error;

  void fail(size_t line, kj::StringPtr what) {
    if (error == nullptr) error = kj::str("line ", line, ": ", what);
  }

  void closeEntry(size_t line) {
    if (current == DATA) {
      auto& v = dataStreams.back();
      v.bytes = hex.releaseAsArray();
      if (v.declaredSize != 0 && v.declaredSize != v.bytes.size()) {
        fail(line, kj::str("data vector '", v.title, "' has ", v.bytes.size(), " bytes, declared ",
                           v.declaredSize));
      }
      if (v.decoded == nullptr) fail(line, kj::str("data vector '", v.title, "' has no Decoded"));
    } else if (current == MESSAGE) {
      auto& m = messages.back();
      m.bytes = hex.releaseAsArray();
      if (m.declaredSize != m.bytes.size()) {
        fail(line, kj::str("transcript entry '", m.summary, "' has ", m.bytes.size(),
                           " bytes, declared ", m.declaredSize));
      }
      current = TRANSCRIPT;
    }
    hex = kj::Vector<kj::byte>();
  }

  void closeTranscript(size_t line) {
    closeEntry(line);
    if (current == TRANSCRIPT || current == MESSAGE) {
      transcripts.back().messages = messages.releaseAsArray();
      messages = kj::Vector<TranscriptMessage>();
    }
    current = NONE;
  }

  void parseLine(size_t number, kj::StringPtr line) {
    if (line.startsWith(DATA_HEADER)) {
      closeTranscript(number);
      dataStreams.add(
          DataStreamVector{kj::str(line.slice(DATA_HEADER.size())), 0, nullptr, nullptr});
      current = DATA;
    } else if (line.startsWith(CONTROL_HEADER)) {
      closeTranscript(number);
      transcripts.add(ControlTranscript{kj::str(line.slice(CONTROL_HEADER.size())), nullptr});
      current = TRANSCRIPT;
    } else if (line.startsWith(C_TO_E) || line.startsWith(E_TO_C)) {
      if (current != TRANSCRIPT && current != MESSAGE) {
        return fail(number, "entry outside a transcript");
      }
      closeEntry(number);
      auto direction = line.startsWith(C_TO_E) ? Direction::CLIENT_TO_EDGE
                                               : Direction::EDGE_TO_CLIENT;
      kj::StringPtr rest = line.slice(C_TO_E.size());
      size_t size = 0;
      KJ_IF_MAYBE(end, findText(rest, " bytes): ")) {
        KJ_IF_MAYBE(n, parseDecimal(kj::str(rest.slice(0, *end)))) {
          size = *n;
        } else {
          return fail(number, "bad byte count");
        }
        messages.add(TranscriptMessage{direction, size, kj::str(rest.slice(*end + 9)), nullptr,
                                       nullptr});
        current = MESSAGE;
      } else {
        return fail(number, "entry header without '(N bytes): '");
      }
    } else if (line.startsWith(DECODED)) {
      if (current != DATA) return fail(number, "Decoded outside a data vector");
      dataStreams.back().decoded = kj::str(line.slice(DECODED.size()));
    } else if (line.startsWith(RPC_VIEW)) {
      if (current != MESSAGE) return fail(number, "rpc.capnp view outside an entry");
      messages.back().rpcView = kj::str(line.slice(RPC_VIEW.size()));
    } else if (line.startsWith(TOTAL)) {
      if (current == DATA) {
        auto rest = line.slice(TOTAL.size());
        KJ_IF_MAYBE(space, rest.findFirst(' ')) {
          KJ_IF_MAYBE(n, parseDecimal(kj::str(rest.slice(0, *space)))) {
            dataStreams.back().declaredSize = *n;
          }
        }
      }
    } else if (line.startsWith("#") || line.size() == 0) {
      // comment
    } else {
      if (current != DATA && current != MESSAGE) return fail(number, "hex outside an entry");
      if (line.size() % 2 != 0) return fail(number, "odd number of hex digits");
      for (size_t i = 0; i < line.size(); i += 2) {
        int hi = hexDigit(line[i]), lo = hexDigit(line[i + 1]);
        if (hi < 0 || lo < 0) return fail(number, "not a hex digit");
        hex.add(kj::byte(hi * 16 + lo));
      }
    }
  }
};

void appendQuoted(kj::Vector<char>& out, kj::ArrayPtr<const kj::byte> bytes) {
  for (auto b: bytes) {
    if (b >= 0x20 && b < 0x7f && b != '"' && b != '\\') {
      out.add(char(b));
    } else {
      auto hex = kj::str("\\x", kj::encodeHex(kj::arrayPtr(&b, 1)));
      out.addAll(hex);
    }
  }
}

kj::String showValue(capnp::DynamicValue::Reader value) {
  switch (value.getType()) {
    case capnp::DynamicValue::TEXT: {
      kj::Vector<char> out;
      out.add('"');
      appendQuoted(out, value.as<capnp::Text>().asBytes());
      out.add('"');
      out.add('\0');
      return kj::String(out.releaseAsArray());
    }
    case capnp::DynamicValue::DATA:
      return kj::str("0x\"", kj::encodeHex(value.as<capnp::Data>()), "\"");
    default:
      return kj::str(value);
  }
}

void compareValue(capnp::DynamicValue::Reader expected, capnp::DynamicValue::Reader actual,
                  kj::StringPtr path, kj::Maybe<kj::String>& diff);

void compareStruct(capnp::DynamicStruct::Reader expected, capnp::DynamicStruct::Reader actual,
                   kj::StringPtr path, kj::Maybe<kj::String>& diff) {
  auto schema = expected.getSchema();
  if (schema != actual.getSchema()) {
    diff = kj::str(path, ": type ", schema.getProto().getDisplayName(), " != ",
                   actual.getSchema().getProto().getDisplayName());
    return;
  }
  auto compareField = [&](capnp::StructSchema::Field field) {
    auto which = field.getType().which();
    if (which == capnp::schema::Type::INTERFACE || which == capnp::schema::Type::ANY_POINTER) {
      return;
    }
    auto name = field.getProto().getName();
    auto sub = path.size() == 0 ? kj::str(name) : kj::str(path, '.', name);
    compareValue(expected.get(field), actual.get(field), sub, diff);
  };
  for (auto field: schema.getNonUnionFields()) {
    if (diff != nullptr) return;
    compareField(field);
  }
  if (diff != nullptr || schema.getUnionFields().size() == 0) return;
  auto e = expected.which();
  auto a = actual.which();
  KJ_IF_MAYBE(ef, e) {
    KJ_IF_MAYBE(af, a) {
      if (*ef != *af) {
        diff = kj::str(path, ": union member ", ef->getProto().getName(), " != ",
                       af->getProto().getName());
        return;
      }
      compareField(*ef);
      return;
    }
  }
  if ((e == nullptr) != (a == nullptr)) diff = kj::str(path, ": unknown union member");
}

void compareValue(capnp::DynamicValue::Reader expected, capnp::DynamicValue::Reader actual,
                  kj::StringPtr path, kj::Maybe<kj::String>& diff) {
  using DV = capnp::DynamicValue;
  if (expected.getType() != actual.getType()) {
    diff = kj::str(path, ": value kinds differ");
    return;
  }
  bool equal = true;
  switch (expected.getType()) {
    case DV::UNKNOWN:
    case DV::VOID:
    case DV::CAPABILITY:
    case DV::ANY_POINTER:
      return;
    case DV::BOOL: equal = expected.as<bool>() == actual.as<bool>(); break;
    case DV::INT: equal = expected.as<int64_t>() == actual.as<int64_t>(); break;
    case DV::UINT: equal = expected.as<uint64_t>() == actual.as<uint64_t>(); break;
    case DV::FLOAT: equal = expected.as<double>() == actual.as<double>(); break;
    case DV::ENUM:
      equal = expected.as<capnp::DynamicEnum>().getRaw() ==
              actual.as<capnp::DynamicEnum>().getRaw();
      break;
    case DV::TEXT: equal = expected.as<capnp::Text>() == actual.as<capnp::Text>(); break;
    case DV::DATA: equal = expected.as<capnp::Data>() == actual.as<capnp::Data>(); break;
    case DV::LIST: {
      auto e = expected.as<capnp::DynamicList>();
      auto a = actual.as<capnp::DynamicList>();
      if (e.size() != a.size()) {
        diff = kj::str(path, ": list of ", e.size(), " elements != ", a.size());
        return;
      }
      for (uint i = 0; i < e.size() && diff == nullptr; i++) {
        compareValue(e[i], a[i], kj::str(path, '[', i, ']'), diff);
      }
      return;
    }
    case DV::STRUCT:
      compareStruct(expected.as<capnp::DynamicStruct>(), actual.as<capnp::DynamicStruct>(), path,
                    diff);
      return;
  }
  if (!equal) diff = kj::str(path, ": ", showValue(expected), " != ", showValue(actual));
}

}  // namespace

bool DataStreamVector::isRequest() const { return findText(title, "ConnectRequest") != nullptr; }

kj::String TranscriptMessage::kind() const {
  KJ_IF_MAYBE(space, summary.findFirst(' ')) return kj::str(summary.slice(0, *space));
  return kj::str(summary);
}

kj::Maybe<kj::StringPtr> TranscriptMessage::params() const {
  KJ_IF_MAYBE(at, findText(summary, " params=")) return summary.slice(*at + 8);
  return nullptr;
}

kj::Maybe<kj::StringPtr> TranscriptMessage::results() const {
  KJ_IF_MAYBE(at, findText(summary, " results=")) return summary.slice(*at + 9);
  return nullptr;
}

kj::Maybe<uint64_t> TranscriptMessage::number(kj::StringPtr name) const {
  // Only the part before params=/results= holds "name=value" words.
  kj::String head = kj::str(summary);
  KJ_IF_MAYBE(at, findText(summary, " params=")) head = kj::str(summary.slice(0, *at));
  KJ_IF_MAYBE(at, findText(summary, " results=")) head = kj::str(summary.slice(0, *at));
  auto key = kj::str(' ', name, '=');
  KJ_IF_MAYBE(at, findText(head, key)) {
    size_t i = *at + key.size();
    uint64_t value = 0;
    bool any = false;
    if (head.slice(i).startsWith("0x")) {
      for (i += 2; i < head.size() && hexDigit(head[i]) >= 0; i++, any = true) {
        value = value * 16 + hexDigit(head[i]);
      }
    } else {
      for (; i < head.size() && '0' <= head[i] && head[i] <= '9'; i++, any = true) {
        value = value * 10 + (head[i] - '0');
      }
    }
    if (any) return value;
  }
  return nullptr;
}

kj::OneOf<VectorFile, kj::String> parseVectorFile(kj::StringPtr text) {
  Parser parser;
  size_t lineNumber = 0;
  size_t start = 0;
  while (start < text.size() && parser.error == nullptr) {
    size_t end = start;
    while (end < text.size() && text[end] != '\n') end++;
    size_t stop = end;
    if (stop > start && text[stop - 1] == '\r') stop--;
    parser.parseLine(++lineNumber, kj::str(text.slice(start, stop)));
    start = end + 1;
  }
  parser.closeTranscript(lineNumber);
  KJ_IF_MAYBE(e, parser.error) return kj::mv(*e);
  return VectorFile{parser.dataStreams.releaseAsArray(), parser.transcripts.releaseAsArray()};
}

kj::String defaultVectorPath() {
  const char* dir = getenv("CFQT_SOURCE_DIR");
  return kj::str(dir == nullptr ? "." : dir, "/data/tunnel-wire-vectors-2023.7.3.txt");
}

kj::String readTextFile(kj::StringPtr path) {
  auto fs = kj::newDiskFilesystem();
  auto& root = fs->getRoot();
  auto file = root.openFile(fs->getCurrentPath().eval(path));
  return file->readAllText();
}

VectorFile loadVectorFile(kj::StringPtr path) {
  auto text = readTextFile(path);
  KJ_SWITCH_ONEOF(parseVectorFile(text)) {
    KJ_CASE_ONEOF(file, VectorFile) { return kj::mv(file); }
    KJ_CASE_ONEOF(error, kj::String) { KJ_FAIL_REQUIRE("bad vector file", path, error); }
  }
  KJ_UNREACHABLE;
}

kj::String goTextToCapnpText(kj::StringPtr goText) {
  kj::Vector<char> out(goText.size() + 16);
  bool inString = false;
  for (size_t i = 0; i < goText.size(); i++) {
    char c = goText[i];
    if (!inString) {
      out.add(c);
      if (c == '"') inString = true;
    } else if (c == '\\' && i + 1 < goText.size()) {
      out.add(c);
      out.add(goText[++i]);
    } else if (c == '"') {
      if (closesLiteral(goText.slice(i + 1))) {
        out.add('"');
        inString = false;
      } else {
        out.add('\\');
        out.add('"');
      }
    } else {
      out.add(c);
    }
  }
  out.add('\0');
  return kj::String(out.releaseAsArray());
}

kj::Maybe<kj::String> decodeGoText(kj::StringPtr goText, capnp::DynamicStruct::Builder out) {
  auto text = goTextToCapnpText(goText);
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
    capnp::TextCodec codec;
    codec.decode(text, out);
  })) {
    return kj::str("cannot parse '", text, "': ", e->getDescription());
  }
  return nullptr;
}

kj::Maybe<kj::String> compareValues(capnp::DynamicStruct::Reader expected,
                                    capnp::DynamicStruct::Reader actual) {
  kj::Maybe<kj::String> diff;
  compareStruct(expected, actual, "", diff);
  return diff;
}


// ---------------------------------------------------------------------------------------------
// renderVectorFile()

namespace {

kj::String indent(kj::StringPtr text, kj::StringPtr prefix) {
  kj::Vector<char> out;
  out.addAll(prefix);
  for (char c: text) {
    out.add(c);
    if (c == '\n') out.addAll(prefix);
  }
  out.add('\0');
  return kj::String(out.releaseAsArray());
}

kj::String prettyText(capnp::DynamicStruct::Reader value) {
  capnp::TextCodec codec;
  codec.setPrettyPrint(true);
  return codec.encode(value);
}

kj::String oneLineText(capnp::DynamicStruct::Reader value) {
  capnp::TextCodec codec;
  return codec.encode(value);
}

kj::String renderHttpView(const DataStreamVector& v, capnp::MessageReader& message) {
  if (v.isRequest()) {
    KJ_SWITCH_ONEOF(decodeRequest(message.getRoot<schema::ConnectRequest>())) {
      KJ_CASE_ONEOF(head, HttpRequestHead) {
        kj::Vector<kj::String> lines;
        lines.add(kj::str("  http: ", head.method, ' ', head.dest, "  (Host: ", head.host,
                          ", body: ", requestHasBody(head) ? "yes" : "no", ")"));
        for (auto& h: head.headers) lines.add(kj::str("    ", h.name, ": ", h.value));
        return kj::strArray(lines, "\n");
      }
      KJ_CASE_ONEOF(error, WireError) { return kj::str("  http: ", error.toString()); }
    }
  } else {
    KJ_SWITCH_ONEOF(decodeResponse(message.getRoot<schema::ConnectResponse>())) {
      KJ_CASE_ONEOF(head, HttpResponseHead) {
        KJ_IF_MAYBE(error, head.error) return kj::str("  http: origin error: ", *error);
        kj::Vector<kj::String> lines;
        lines.add(kj::str("  http: status ", head.status));
        for (auto& h: head.headers) lines.add(kj::str("    ", h.name, ": ", h.value));
        return kj::strArray(lines, "\n");
      }
      KJ_CASE_ONEOF(error, WireError) { return kj::str("  http: ", error.toString()); }
    }
  }
  KJ_UNREACHABLE;
}

kj::String renderDataStream(const DataStreamVector& v) {
  auto decoded = v.isRequest() ? decodeConnectRequest(v.bytes) : decodeConnectResponse(v.bytes);
  auto typeName = v.isRequest() ? "ConnectRequest"_kj : "ConnectResponse"_kj;
  KJ_SWITCH_ONEOF(decoded) {
    KJ_CASE_ONEOF(d, DecodedPreamble) {
      auto schema = v.isRequest() ? capnp::Schema::from<schema::ConnectRequest>()
                                  : capnp::Schema::from<schema::ConnectResponse>();
      auto root = d.message->getRoot<capnp::DynamicStruct>(schema);
      return kj::str("== DATA STREAM: ", v.title, "\n", "  ", v.bytes.size(),
                     " bytes, signature ", kj::encodeHex(v.bytes.slice(0, 6)), ", version \"",
                     kj::arrayPtr(reinterpret_cast<const char*>(d.version), 2), "\"\n  ",
                     typeName, " ", indent(prettyText(root), "  ").slice(2), "\n",
                     renderHttpView(v, *d.message), "\n");
    }
    KJ_CASE_ONEOF(error, WireError) {
      return kj::str("== DATA STREAM: ", v.title, "\n  cannot decode: ", error.toString(), "\n");
    }
  }
  KJ_UNREACHABLE;
}

kj::Maybe<capnp::InterfaceSchema> knownInterface(uint64_t id) {
  capnp::InterfaceSchema all[] = {
      capnp::Schema::from<schema::RegistrationServer>(),
      capnp::Schema::from<schema::SessionManager>(),
      capnp::Schema::from<schema::ConfigurationManager>(),
      capnp::Schema::from<schema::CloudflaredServer>(),
      capnp::Schema::from<schema::TunnelServer>(),
  };
  for (auto& schema: all) {
    if (schema.getProto().getId() == id) return schema;
  }
  return nullptr;
}

kj::StringPtr shortName(capnp::InterfaceSchema schema) {
  auto name = schema.getProto().getDisplayName();
  return name.slice(schema.getProto().getDisplayNamePrefixLength());
}

struct PendingMethod {
  capnp::InterfaceSchema interface;
  uint16_t methodId;
};

kj::String renderRpcMessage(const TranscriptMessage& m,
                            kj::HashMap<uint32_t, PendingMethod>& questions) {
  auto direction = m.direction == Direction::CLIENT_TO_EDGE ? "C->E"_kj : "E->C"_kj;
  auto words = kj::heapArray<capnp::word>(m.bytes.size() / sizeof(capnp::word));
  memcpy(words.begin(), m.bytes.begin(), words.size() * sizeof(capnp::word));
  kj::String body;
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
    capnp::FlatArrayMessageReader reader(words);
    auto message = reader.getRoot<capnp::rpc::Message>();
    body = kj::str("  rpc: ", oneLineText(capnp::toDynamic(message)));
    if (message.isCall()) {
      auto call = message.getCall();
      KJ_IF_MAYBE(interface, knownInterface(call.getInterfaceId())) {
        auto methods = interface->getMethods();
        if (call.getMethodId() < methods.size()) {
          auto method = methods[call.getMethodId()];
          questions.upsert(call.getQuestionId(), PendingMethod{*interface, call.getMethodId()},
                           [](PendingMethod& old, PendingMethod&& v) { old = v; });
          auto params = call.getParams().getContent().getAs<capnp::DynamicStruct>(
              method.getParamType());
          body = kj::str(body, "\n  ", shortName(*interface), '.',
                         method.getProto().getName(), " params ",
                         indent(prettyText(params), "  ").slice(2));
        }
      }
    } else if (message.isReturn() && message.getReturn().isResults()) {
      auto ret = message.getReturn();
      KJ_IF_MAYBE(pending, questions.find(ret.getAnswerId())) {
        auto method = pending->interface.getMethods()[pending->methodId];
        auto results = ret.getResults().getContent().getAs<capnp::DynamicStruct>(
            method.getResultType());
        body = kj::str(body, "\n  ", shortName(pending->interface), '.',
                       method.getProto().getName(), " results ",
                       indent(prettyText(results), "  ").slice(2));
      } else if (ret.getResults().getCapTable().size() > 0) {
        body = kj::str(body, "\n  (bootstrap capability)");
      }
    }
  })) {
    body = kj::str("  cannot decode: ", e->getDescription());
  }
  return kj::str("-- ", direction, " ", m.bytes.size(), " bytes: ", m.kind(), "\n", body, "\n");
}

}  // namespace

kj::String renderVectorFile(const VectorFile& file) {
  kj::Vector<kj::String> parts;
  for (auto& v: file.dataStreams) parts.add(renderDataStream(v));
  for (auto& t: file.transcripts) {
    parts.add(kj::str("== CONTROL STREAM transcript, ", t.title, "\n"));
    kj::HashMap<uint32_t, PendingMethod> questions;
    for (auto& m: t.messages) parts.add(renderRpcMessage(m, questions));
  }
  return kj::strArray(parts, "");
}

}  // namespace cfqt::wire::testing
