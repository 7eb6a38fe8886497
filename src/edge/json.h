#pragma once
// A small, careful JSON reader for untrusted API bodies: never throws on bad input, bounded
// nesting depth. Private to cfqt::edge (the quick-tunnel API client and its tests).

#include <kj/array.h>
#include <kj/string.h>

namespace cfqt::edge {

using kj::uint;

struct JsonMember;

struct JsonValue {
  enum class Kind { NUL, BOOL, NUMBER, STRING, ARRAY, OBJECT };
  Kind kind = Kind::NUL;
  bool boolean = false;
  double number = 0;
  kj::String string;                    // STRING: decoded (escapes resolved, UTF-8)
  kj::Array<JsonValue> array;           // ARRAY
  kj::Array<JsonMember> object;         // OBJECT, in document order, duplicates kept

  kj::Maybe<const JsonValue&> get(kj::StringPtr key) const;
  // Exact key match; the last duplicate wins (as Go's decoder).

  kj::Maybe<const JsonValue&> getIgnoringCase(kj::StringPtr key) const;
  // ASCII case-insensitive key match; the last match wins.
};

struct JsonMember {
  kj::String key;
  JsonValue value;
};

kj::Maybe<JsonValue> parseJson(kj::ArrayPtr<const kj::byte> text, uint maxDepth = 32);
// Null unless `text` is exactly one JSON value (surrounding whitespace allowed).

}  // namespace cfqt::edge
