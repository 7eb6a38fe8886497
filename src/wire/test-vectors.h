#pragma once
// Parser for data/tunnel-wire-vectors-2023.7.3.txt, helpers to compare capnp values against the Go
// text form of the file's "Decoded"/"params="/"results=" annotations, and a renderer used by the
// hidden `cfqt wire-dump` subcommand. Meant for tests (link `cfqt-wire-testing`) and that debug
// command; nothing on the data path uses it. Compiled into cfqt-wire so apps need no extra library.
//
// File grammar (as produced by the 2023.7.3 Go tools):
//   "## DATA STREAM: <title>" then "# ..." comment lines ("# total N bytes"), hex lines (lower
//   case, 32 bytes a line), and "# Decoded: <go text>".
//   "## CONTROL STREAM transcript, <title>" then entries "### C->E (N bytes): <summary>" or
//   "### E->C (N bytes): <summary>", each followed by "# rpc.capnp view: <text>" and hex lines.

#include <capnp/dynamic.h>
#include <capnp/message.h>
#include <kj/array.h>
#include <kj/one-of.h>
#include <kj/string.h>

namespace cfqt::wire::testing {

struct DataStreamVector {
  kj::String title;            // after "## DATA STREAM: "
  size_t declaredSize = 0;     // "# total N bytes" (0 if absent)
  kj::Array<kj::byte> bytes;   // the whole stream prefix: signature + version + message
  kj::String decoded;          // Go text after "# Decoded: "

  bool isRequest() const;      // a ConnectRequest (title mentions it); else a ConnectResponse
};

enum class Direction { CLIENT_TO_EDGE, EDGE_TO_CLIENT };

struct TranscriptMessage {
  Direction direction;
  size_t declaredSize = 0;     // "(N bytes)"
  kj::String summary;          // after "): ", e.g. "call q=1 iface=0x... method=0 params=(...)"
  kj::String rpcView;          // after "# rpc.capnp view: "
  kj::Array<kj::byte> bytes;   // one complete capnp-rpc Message, unpacked framing

  kj::String kind() const;     // first word of summary: bootstrap, return, call, finish, ...
  kj::Maybe<kj::StringPtr> params() const;   // Go text after " params=", if any
  kj::Maybe<kj::StringPtr> results() const;  // Go text after " results=", if any
  kj::Maybe<uint64_t> number(kj::StringPtr name) const;
  // A "name=value" number of the summary: number("q"), number("a"), number("method"),
  // number("iface") (hex accepted).
};

struct ControlTranscript {
  kj::String title;            // after "## CONTROL STREAM transcript, "
  kj::Array<TranscriptMessage> messages;
};

struct VectorFile {
  kj::Array<DataStreamVector> dataStreams;
  kj::Array<ControlTranscript> transcripts;
};

kj::OneOf<VectorFile, kj::String> parseVectorFile(kj::StringPtr text);
// Parses the whole file; a kj::String describes the first problem (line number included), e.g.
// a hex line of odd length or a byte count that disagrees with "(N bytes)"/"total N bytes".

kj::String defaultVectorPath();
// $CFQT_SOURCE_DIR/data/tunnel-wire-vectors-2023.7.3.txt (CFQT_SOURCE_DIR defaults to ".").

kj::String readTextFile(kj::StringPtr path);
// Whole file; throws a kj::Exception if it cannot be read.

VectorFile loadVectorFile(kj::StringPtr path);
// readTextFile + parseVectorFile; throws (KJ_FAIL_REQUIRE) on a parse error. Tests only.

kj::String goTextToCapnpText(kj::StringPtr goText);
// The Go encoder (zombiezen capnproto2) does not escape '"' inside Text/Data literals
// (`uuid = "\x11\x11\x11\x11""33DDUUUUUU"`, `config = "{"ingress":...}"`). This rewrites such
// literals so capnp::TextCodec parses them: a '"' ends the literal only when followed by ')',
// ']', ', "', ', <ident> =' or the end of input; other quotes are escaped.

kj::Maybe<kj::String> decodeGoText(kj::StringPtr goText, capnp::DynamicStruct::Builder out);
// goTextToCapnpText + capnp::TextCodec::decode into `out`; returns the error text on failure.

kj::Maybe<kj::String> compareValues(capnp::DynamicStruct::Reader expected,
                                    capnp::DynamicStruct::Reader actual);
// Field-by-field semantic comparison (all non-union fields, the active union member, lists,
// nested structs; a null Text/Data equals an empty one). Returns a description of the first
// difference ("metadata[2].val: \"a\" != \"b\""), or nullptr when equal. Interfaces and
// AnyPointer fields are not compared.

kj::String renderVectorFile(const VectorFile& file);
// Human-readable dump, decoding every entry with the wire layer itself: each data-stream vector
// through decodeConnectRequest()/decodeConnectResponse() (capnp text form plus the HTTP view),
// each transcript message as an rpc.capnp Message with registerConnection & co. params/results
// printed with their real types. Undecodable entries are reported inline, never thrown.

}  // namespace cfqt::wire::testing
