#include "json.h"

#include <kj/vector.h>

#include <stdlib.h>

namespace cfqt::edge {

namespace {

class Parser {
public:
  Parser(kj::ArrayPtr<const kj::byte> text, uint maxDepth): text(text), maxDepth(maxDepth) {}

  kj::Maybe<JsonValue> parseDocument() {
    skipSpace();
    auto value = parseValue(0);
    skipSpace();
    if (pos != text.size()) return nullptr;
    return value;
  }

private:
  kj::ArrayPtr<const kj::byte> text;
  uint maxDepth;
  size_t pos = 0;

  bool atEnd() const { return pos >= text.size(); }
  kj::byte peek() const { return atEnd() ? 0 : text[pos]; }

  void skipSpace() {
    while (!atEnd() && (text[pos] == ' ' || text[pos] == '\t' || text[pos] == '\n' ||
                        text[pos] == '\r')) {
      ++pos;
    }
  }

  bool consumeLiteral(kj::StringPtr literal) {
    if (text.size() - pos < literal.size()) return false;
    for (size_t i = 0; i < literal.size(); i++) {
      if (text[pos + i] != static_cast<kj::byte>(literal[i])) return false;
    }
    pos += literal.size();
    return true;
  }

  kj::Maybe<JsonValue> parseValue(uint depth) {
    if (depth > maxDepth) return nullptr;
    JsonValue value;
    switch (peek()) {
      case '{': return parseObject(depth);
      case '[': return parseArray(depth);
      case '"': {
        KJ_IF_MAYBE(s, parseString()) {
          value.kind = JsonValue::Kind::STRING;
          value.string = kj::mv(*s);
          return kj::mv(value);
        }
        return nullptr;
      }
      case 't':
        if (!consumeLiteral("true")) return nullptr;
        value.kind = JsonValue::Kind::BOOL;
        value.boolean = true;
        return kj::mv(value);
      case 'f':
        if (!consumeLiteral("false")) return nullptr;
        value.kind = JsonValue::Kind::BOOL;
        return kj::mv(value);
      case 'n':
        if (!consumeLiteral("null")) return nullptr;
        return kj::mv(value);
      default:
        return parseNumber();
    }
  }

  kj::Maybe<JsonValue> parseObject(uint depth) {
    ++pos;  // '{'
    kj::Vector<JsonMember> members;
    skipSpace();
    if (peek() == '}') {
      ++pos;
    } else {
      for (;;) {
        skipSpace();
        if (peek() != '"') return nullptr;
        kj::String key;
        KJ_IF_MAYBE(k, parseString()) { key = kj::mv(*k); } else { return nullptr; }
        skipSpace();
        if (peek() != ':') return nullptr;
        ++pos;
        skipSpace();
        KJ_IF_MAYBE(v, parseValue(depth + 1)) {
          members.add(JsonMember{kj::mv(key), kj::mv(*v)});
        } else {
          return nullptr;
        }
        skipSpace();
        if (peek() == ',') { ++pos; continue; }
        if (peek() == '}') { ++pos; break; }
        return nullptr;
      }
    }
    JsonValue value;
    value.kind = JsonValue::Kind::OBJECT;
    value.object = members.releaseAsArray();
    return kj::mv(value);
  }

  kj::Maybe<JsonValue> parseArray(uint depth) {
    ++pos;  // '['
    kj::Vector<JsonValue> items;
    skipSpace();
    if (peek() == ']') {
      ++pos;
    } else {
      for (;;) {
        skipSpace();
        KJ_IF_MAYBE(v, parseValue(depth + 1)) {
          items.add(kj::mv(*v));
        } else {
          return nullptr;
        }
        skipSpace();
        if (peek() == ',') { ++pos; continue; }
        if (peek() == ']') { ++pos; break; }
        return nullptr;
      }
    }
    JsonValue value;
    value.kind = JsonValue::Kind::ARRAY;
    value.array = items.releaseAsArray();
    return kj::mv(value);
  }

  kj::Maybe<JsonValue> parseNumber() {
    size_t start = pos;
    if (peek() == '-') ++pos;
    if (peek() == '0') {
      ++pos;
    } else if (peek() >= '1' && peek() <= '9') {
      while (peek() >= '0' && peek() <= '9') ++pos;
    } else {
      return nullptr;
    }
    if (peek() == '.') {
      ++pos;
      if (!(peek() >= '0' && peek() <= '9')) return nullptr;
      while (peek() >= '0' && peek() <= '9') ++pos;
    }
    if (peek() == 'e' || peek() == 'E') {
      ++pos;
      if (peek() == '+' || peek() == '-') ++pos;
      if (!(peek() >= '0' && peek() <= '9')) return nullptr;
      while (peek() >= '0' && peek() <= '9') ++pos;
    }
    auto copy = kj::heapString(reinterpret_cast<const char*>(text.begin() + start), pos - start);
    JsonValue value;
    value.kind = JsonValue::Kind::NUMBER;
    value.number = strtod(copy.cStr(), nullptr);
    return kj::mv(value);
  }

  kj::Maybe<uint> parseHex4() {
    if (text.size() - pos < 4) return nullptr;
    uint v = 0;
    for (int i = 0; i < 4; i++) {
      kj::byte c = text[pos++];
      v <<= 4;
      if (c >= '0' && c <= '9') v |= c - '0';
      else if (c >= 'a' && c <= 'f') v |= c - 'a' + 10;
      else if (c >= 'A' && c <= 'F') v |= c - 'A' + 10;
      else return nullptr;
    }
    return v;
  }

  static void appendUtf8(kj::Vector<char>& out, uint cp) {
    if (cp < 0x80) {
      out.add(static_cast<char>(cp));
    } else if (cp < 0x800) {
      out.add(static_cast<char>(0xC0 | (cp >> 6)));
      out.add(static_cast<char>(0x80 | (cp & 0x3F)));
    } else if (cp < 0x10000) {
      out.add(static_cast<char>(0xE0 | (cp >> 12)));
      out.add(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
      out.add(static_cast<char>(0x80 | (cp & 0x3F)));
    } else {
      out.add(static_cast<char>(0xF0 | (cp >> 18)));
      out.add(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
      out.add(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
      out.add(static_cast<char>(0x80 | (cp & 0x3F)));
    }
  }

  kj::Maybe<kj::String> parseString() {
    ++pos;  // '"'
    kj::Vector<char> out;
    for (;;) {
      if (atEnd()) return nullptr;
      kj::byte c = text[pos++];
      if (c == '"') break;
      if (c < 0x20) return nullptr;
      if (c != '\\') {
        out.add(static_cast<char>(c));
        continue;
      }
      if (atEnd()) return nullptr;
      kj::byte e = text[pos++];
      switch (e) {
        case '"': out.add('"'); break;
        case '\\': out.add('\\'); break;
        case '/': out.add('/'); break;
        case 'b': out.add('\b'); break;
        case 'f': out.add('\f'); break;
        case 'n': out.add('\n'); break;
        case 'r': out.add('\r'); break;
        case 't': out.add('\t'); break;
        case 'u': {
          uint cp;
          KJ_IF_MAYBE(v, parseHex4()) { cp = *v; } else { return nullptr; }
          if (cp >= 0xD800 && cp < 0xDC00) {
            // High surrogate: a low one must follow, else U+FFFD (as Go does).
            if (text.size() - pos >= 6 && text[pos] == '\\' && text[pos + 1] == 'u') {
              size_t save = pos;
              pos += 2;
              KJ_IF_MAYBE(low, parseHex4()) {
                if (*low >= 0xDC00 && *low < 0xE000) {
                  cp = 0x10000 + ((cp - 0xD800) << 10) + (*low - 0xDC00);
                } else {
                  pos = save;
                  cp = 0xFFFD;
                }
              } else {
                return nullptr;
              }
            } else {
              cp = 0xFFFD;
            }
          } else if (cp >= 0xDC00 && cp < 0xE000) {
            cp = 0xFFFD;
          }
          appendUtf8(out, cp);
          break;
        }
        default:
          return nullptr;
      }
    }
    out.add('\0');
    return kj::String(out.releaseAsArray());
  }
};

bool equalsIgnoringCase(kj::StringPtr a, kj::StringPtr b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); i++) {
    char x = a[i], y = b[i];
    if (x >= 'A' && x <= 'Z') x += 'a' - 'A';
    if (y >= 'A' && y <= 'Z') y += 'a' - 'A';
    if (x != y) return false;
  }
  return true;
}

}  // namespace

kj::Maybe<const JsonValue&> JsonValue::get(kj::StringPtr key) const {
  kj::Maybe<const JsonValue&> result;
  for (auto& member: object) {
    if (member.key == key) result = member.value;
  }
  return result;
}

kj::Maybe<const JsonValue&> JsonValue::getIgnoringCase(kj::StringPtr key) const {
  kj::Maybe<const JsonValue&> result;
  for (auto& member: object) {
    if (equalsIgnoringCase(member.key, key)) result = member.value;
  }
  return result;
}

kj::Maybe<JsonValue> parseJson(kj::ArrayPtr<const kj::byte> text, uint maxDepth) {
  return Parser(text, maxDepth).parseDocument();
}

}  // namespace cfqt::edge
