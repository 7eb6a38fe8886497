#include "observe/log.h"

#include <kj/debug.h>

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

namespace cfqt::observe {

kj::Maybe<LogLevel> parseLogLevel(kj::StringPtr text) {
  if (text == "debug" || text == "trace") return LogLevel::DEBUG;
  if (text == "info") return LogLevel::INFO;
  if (text == "warn" || text == "warning") return LogLevel::WARN;
  if (text == "error") return LogLevel::ERROR;
  if (text == "fatal" || text == "panic") return LogLevel::FATAL;
  return nullptr;
}

kj::StringPtr levelTag(LogLevel level) {
  switch (level) {
    case LogLevel::DEBUG: return "DBG";
    case LogLevel::INFO: return "INF";
    case LogLevel::WARN: return "WRN";
    case LogLevel::ERROR: return "ERR";
    case LogLevel::FATAL: return "FTL";
  }
  return "???";
}

kj::StringPtr levelName(LogLevel level) {
  switch (level) {
    case LogLevel::DEBUG: return "debug";
    case LogLevel::INFO: return "info";
    case LogLevel::WARN: return "warn";
    case LogLevel::ERROR: return "error";
    case LogLevel::FATAL: return "fatal";
  }
  return "unknown";
}

kj::Maybe<LogFormat> parseLogFormat(kj::StringPtr text) {
  if (text == "default" || text == "text") return LogFormat::TEXT;
  if (text == "json") return LogFormat::JSON;
  return nullptr;
}

namespace {

struct Stamp {
  char text[32];
};

Stamp utcStamp() {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  struct tm tm;
  gmtime_r(&ts.tv_sec, &tm);
  Stamp s;
  strftime(s.text, sizeof(s.text), "%Y-%m-%dT%H:%M:%SZ", &tm);
  return s;
}

}  // namespace

kj::String formatLogLine(LogLevel level, kj::StringPtr message, kj::StringPtr fields) {
  auto stamp = utcStamp();
  auto text = escapeLogText(message);
  if (fields.size() == 0) {
    return kj::str(stamp.text, ' ', levelTag(level), ' ', text, '\n');
  }
  return kj::str(stamp.text, ' ', levelTag(level), ' ', text, ' ', fields, '\n');
}

// ---------------------------------------------------------------------------------------------
// Escaping

namespace {

enum class EscapeMode { MESSAGE, CONSOLE, JSON };

const char HEX[] = "0123456789abcdef";

void addHexByte(kj::Vector<char>& out, kj::byte b, EscapeMode mode) {
  // A byte shown as \xHH (in JSON the backslash itself is escaped: the text reads \xHH).
  if (mode == EscapeMode::JSON) out.add('\\');
  out.add('\\');
  out.add('x');
  out.add(HEX[b >> 4]);
  out.add(HEX[b & 15]);
}

void addCodePointEscape(kj::Vector<char>& out, uint32_t cp) {
  out.add('\\');
  out.add('u');
  for (int shift = 12; shift >= 0; shift -= 4) out.add(HEX[(cp >> shift) & 15]);
}

bool invisible(uint32_t cp) {
  return (cp >= 0x80 && cp <= 0x9f) || (cp >= 0x200b && cp <= 0x200f) || cp == 0x2028 ||
         cp == 0x2029 || (cp >= 0x202a && cp <= 0x202e) || (cp >= 0x2066 && cp <= 0x2069) ||
         cp == 0xfeff;
}

size_t utf8Sequence(kj::ArrayPtr<const char> text, size_t i, uint32_t& cp) {
  // Length of the valid UTF-8 sequence at text[i] (a non-ASCII lead), or 0 if it is not one.
  auto at = [&](size_t k) { return static_cast<kj::byte>(text[k]); };
  kj::byte b = at(i);
  size_t len;
  uint32_t min;
  if (b >= 0xc2 && b <= 0xdf) {
    len = 2; cp = b & 0x1f; min = 0x80;
  } else if (b >= 0xe0 && b <= 0xef) {
    len = 3; cp = b & 0x0f; min = 0x800;
  } else if (b >= 0xf0 && b <= 0xf4) {
    len = 4; cp = b & 0x07; min = 0x10000;
  } else {
    return 0;
  }
  if (i + len > text.size()) return 0;
  for (size_t k = 1; k < len; k++) {
    if ((at(i + k) & 0xc0) != 0x80) return 0;
    cp = (cp << 6) | (at(i + k) & 0x3f);
  }
  if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return 0;
  return len;
}

void appendEscaped(kj::Vector<char>& out, kj::ArrayPtr<const char> text, EscapeMode mode) {
  for (size_t i = 0; i < text.size(); i++) {
    char c = text[i];
    auto u = static_cast<kj::byte>(c);
    if (u < 0x80) {
      switch (c) {
        case '"':
        case '\\':
          if (mode != EscapeMode::MESSAGE) out.add('\\');
          out.add(c);
          continue;
        case '\n': out.add('\\'); out.add('n'); continue;
        case '\r': out.add('\\'); out.add('r'); continue;
        case '\t': out.add('\\'); out.add('t'); continue;
        default:
          if (u < 0x20 || u == 0x7f) {
            if (mode == EscapeMode::JSON) {
              addCodePointEscape(out, u);
            } else {
              addHexByte(out, u, mode);
            }
          } else {
            out.add(c);
          }
          continue;
      }
    }
    uint32_t cp = 0;
    size_t len = utf8Sequence(text, i, cp);
    if (len == 0) {
      addHexByte(out, u, mode);
    } else if (invisible(cp)) {
      addCodePointEscape(out, cp);
      i += len - 1;
    } else {
      out.addAll(text.slice(i, i + len));
      i += len - 1;
    }
  }
}

kj::String toString(kj::Vector<char>& out) {
  return kj::heapString(out.begin(), out.size());
}

}  // namespace

kj::String quoteFieldValue(kj::StringPtr value) {
  bool plain = value.size() > 0;
  for (char c: value) {
    auto u = static_cast<kj::byte>(c);
    if (c == ' ' || c == '"' || c == '\\' || c == '=' || u < 0x20 || u >= 0x7f) {
      plain = false;
      break;
    }
  }
  if (plain) return kj::str(value);
  kj::Vector<char> out(value.size() + 8);
  out.add('"');
  appendEscaped(out, value, EscapeMode::CONSOLE);
  out.add('"');
  return toString(out);
}

kj::String escapeLogText(kj::StringPtr text) {
  bool plain = true;
  for (char c: text) {
    auto u = static_cast<kj::byte>(c);
    if (u < 0x20 || u >= 0x7f) {
      plain = false;
      break;
    }
  }
  if (plain) return kj::str(text);
  kj::Vector<char> out(text.size() + 8);
  appendEscaped(out, text, EscapeMode::MESSAGE);
  return toString(out);
}

namespace {

void addJsonString(kj::Vector<char>& out, kj::StringPtr text) {
  out.add('"');
  appendEscaped(out, text, EscapeMode::JSON);
  out.add('"');
}

bool isJsonInteger(kj::StringPtr text) {
  if (text.size() == 0 || text.size() > 20) return false;
  size_t i = text[0] == '-' ? 1 : 0;
  if (i == text.size()) return false;
  for (; i < text.size(); i++) {
    if (text[i] < '0' || text[i] > '9') return false;
  }
  return true;
}

}  // namespace

kj::String formatJsonLogLine(LogLevel level, kj::StringPtr message,
                             kj::ArrayPtr<const LogField> fields) {
  auto stamp = utcStamp();
  kj::Vector<char> out(128);
  out.addAll("{\"level\":\""_kj);
  out.addAll(levelName(level));
  out.addAll("\",\"time\":\""_kj);
  out.addAll(kj::StringPtr(stamp.text));
  out.addAll("\",\"message\":"_kj);
  addJsonString(out, message);
  for (auto& f: fields) {
    out.add(',');
    addJsonString(out, f.key);
    out.add(':');
    if (f.number && isJsonInteger(f.value)) {
      out.addAll(f.value);
    } else {
      addJsonString(out, f.value);
    }
  }
  out.addAll("}\n"_kj);
  return toString(out);
}

// ---------------------------------------------------------------------------------------------
// Fields

namespace {

kj::String durationText(kj::Duration d) {
  // Go's time.Duration form (what cloudflared prints): 0s, 250ms, 1.5s, 2m30s.
  int64_t ns = d / kj::NANOSECONDS;
  if (ns == 0) return kj::str("0s");
  if (ns < 0) return kj::str("-", durationText(0 * kj::SECONDS - d));
  if (ns < 1000000000) {
    if (ns % 1000000 == 0) return kj::str(ns / 1000000, "ms");
    if (ns % 1000 == 0) return kj::str(ns / 1000, "us");
    return kj::str(ns, "ns");
  }
  int64_t totalMs = ns / 1000000;
  int64_t hours = totalMs / 3600000;
  int64_t minutes = (totalMs / 60000) % 60;
  int64_t secMs = totalMs % 60000;
  kj::String sec;
  if (secMs % 1000 == 0) {
    sec = kj::str(secMs / 1000, "s");
  } else {
    auto frac = kj::str(1000 + secMs % 1000);
    size_t len = frac.size();
    while (len > 1 && frac[len - 1] == '0') len--;
    sec = kj::str(secMs / 1000, ".", kj::heapString(frac.begin() + 1, len - 1), "s");
  }
  if (hours > 0) return kj::str(hours, "h", minutes, "m", sec);
  if (minutes > 0) return kj::str(minutes, "m", sec);
  return sec;
}

}  // namespace

Fields& Fields::add(kj::StringPtr key, kj::StringPtr value) {
  list.add(LogField{kj::str(key), kj::str(value), false});
  return *this;
}

Fields& Fields::add(kj::StringPtr key, kj::String&& value) {
  list.add(LogField{kj::str(key), kj::mv(value), false});
  return *this;
}

Fields& Fields::addNumber(kj::StringPtr key, kj::String value) {
  list.add(LogField{kj::str(key), kj::mv(value), true});
  return *this;
}

Fields& Fields::add(kj::StringPtr key, kj::Duration value) {
  return add(key, durationText(value));
}

Fields& Fields::error(const kj::Exception& e, kj::StringPtr key) {
  add(key, describeException(e));
  // The dump only when this thread's logger would write it (a stack trace costs a little).
  if (logEnabled(LogLevel::DEBUG)) detail = kj::str(e);
  return *this;
}

Fields& Fields::addAll(Fields&& other) {
  for (auto& f: other.list) list.add(kj::mv(f));
  other.list.clear();
  if (detail == nullptr) detail = kj::mv(other.detail);
  return *this;
}

Fields Fields::clone() const {
  Fields copy;
  for (auto& f: list) copy.list.add(LogField{kj::str(f.key), kj::str(f.value), f.number});
  KJ_IF_MAYBE(d, detail) copy.detail = kj::str(*d);
  return copy;
}

kj::Maybe<kj::StringPtr> Fields::exceptionDetail() const {
  KJ_IF_MAYBE(d, detail) return kj::StringPtr(*d);
  return nullptr;
}

kj::String Fields::toText() const {
  if (list.size() == 0) return kj::str();
  kj::Vector<kj::String> parts(list.size());
  for (auto& f: list) parts.add(kj::str(f.key, '=', quoteFieldValue(f.value)));
  return kj::strArray(parts, " ");
}

Fields Fields::parse(kj::StringPtr text) {
  Fields result;
  size_t i = 0;
  while (i < text.size()) {
    while (i < text.size() && text[i] == ' ') i++;
    if (i >= text.size()) break;
    size_t keyStart = i;
    while (i < text.size() && text[i] != '=' && text[i] != ' ') i++;
    kj::String key;
    if (i >= text.size() || text[i] == ' ') {
      result.add("field", kj::heapString(text.begin() + keyStart, i - keyStart));
      continue;
    }
    key = kj::heapString(text.begin() + keyStart, i - keyStart);
    i++;   // '='
    kj::Vector<char> value;
    if (i < text.size() && text[i] == '"') {
      i++;
      while (i < text.size() && text[i] != '"') {
        char c = text[i++];
        if (c != '\\' || i >= text.size()) {
          value.add(c);
          continue;
        }
        char e = text[i++];
        switch (e) {
          case 'n': value.add('\n'); break;
          case 'r': value.add('\r'); break;
          case 't': value.add('\t'); break;
          case 'x':
            if (i + 2 <= text.size() && isxdigit(static_cast<unsigned char>(text[i])) &&
                isxdigit(static_cast<unsigned char>(text[i + 1]))) {
              auto nibble = [](char h) {
                return h <= '9' ? h - '0' : (h | 0x20) - 'a' + 10;
              };
              value.add(static_cast<char>(nibble(text[i]) * 16 + nibble(text[i + 1])));
              i += 2;
            } else {
              value.add('x');
            }
            break;
          default: value.add(e); break;
        }
      }
      if (i < text.size()) i++;   // closing quote
    } else {
      while (i < text.size() && text[i] != ' ') value.add(text[i++]);
    }
    result.add(key, toString(value));
  }
  return result;
}

// ---------------------------------------------------------------------------------------------
// KJ texts: `literal; literal; expr = value; expr = value`

namespace {

bool isExpressionName(kj::ArrayPtr<const char> name) {
  // What KJ prints before " = ": the macro argument's source text, e.g. `request.getDest()`,
  // `impl->config`, `e`. Spaces only inside parentheses or brackets.
  if (name.size() == 0) return false;
  char first = name[0];
  if (!(isalpha(static_cast<unsigned char>(first)) || first == '_' || first == '*' ||
        first == '&' || first == '(' || first == '!')) {
    return false;
  }
  int depth = 0;
  for (char c: name) {
    if (c == '(' || c == '[') {
      depth++;
    } else if (c == ')' || c == ']') {
      if (--depth < 0) return false;
    } else if (depth == 0 && !(isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '.' ||
                               c == ':' || c == '-' || c == '>' || c == '*' || c == '&' ||
                               c == '!')) {
      return false;
    } else if (c == '\n') {
      return false;
    }
  }
  return depth == 0;
}

kj::Maybe<size_t> namedValueSplit(kj::ArrayPtr<const char> segment) {
  // Position of " = " if `segment` is `expr = value`.
  for (size_t i = 0; i + 3 <= segment.size(); i++) {
    if (segment[i] == ' ' && segment[i + 1] == '=' && segment[i + 2] == ' ') {
      if (isExpressionName(segment.slice(0, i))) return i;
      return nullptr;
    }
  }
  return nullptr;
}

kj::String fieldName(kj::ArrayPtr<const char> expression) {
  kj::Vector<char> out(expression.size() + 1);
  for (size_t i = 0; i < expression.size(); i++) {
    char c = expression[i];
    if (isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '.') {
      out.add(c);
    } else if (c == '-' && i + 1 < expression.size() && expression[i + 1] == '>') {
      out.add('.');   // `impl->config` reads as `impl.config`
      i++;
    }
  }
  if (out.size() == 0) return kj::str("value");
  return toString(out);
}

struct KjSegments {
  kj::String message;              // the leading literal segments
  kj::Vector<LogField> named;      // expression name (as a field name) and its value text
};

KjSegments parseKjText(kj::StringPtr text) {
  struct Named {
    size_t start;    // of the segment
    size_t equals;   // of " = " in the text
  };
  kj::Vector<Named> named;
  size_t start = 0;
  for (;;) {
    size_t end = start;
    while (end < text.size() && !(text[end] == ';' && end + 1 < text.size() &&
                                  text[end + 1] == ' ')) {
      end++;
    }
    KJ_IF_MAYBE(eq, namedValueSplit(kj::arrayPtr(text.begin() + start, end - start))) {
      named.add(Named{start, start + *eq});
    }
    if (end >= text.size()) break;
    start = end + 2;
  }
  KjSegments result;
  if (named.size() == 0) {
    result.message = kj::str(text);
    return result;
  }
  result.message = named[0].start == 0
      ? kj::str() : kj::heapString(text.begin(), named[0].start - 2);
  for (size_t i = 0; i < named.size(); i++) {
    size_t valueStart = named[i].equals + 3;
    size_t valueEnd = i + 1 < named.size() ? named[i + 1].start - 2 : text.size();
    result.named.add(LogField{
        fieldName(kj::arrayPtr(text.begin() + named[i].start, named[i].equals - named[i].start)),
        kj::heapString(text.begin() + valueStart, valueEnd - valueStart), false});
  }
  return result;
}

bool isExceptionLine(kj::StringPtr line, size_t& textStart) {
  // `path/file.c++:123: failed: description` (KJ's stringified exception): where the
  // description starts, past the location and the type.
  static constexpr kj::StringPtr TYPES[] = {
      "failed"_kj, "overloaded"_kj, "disconnected"_kj, "unimplemented"_kj, "context"_kj};
  for (size_t i = 0; i < line.size(); i++) {
    char c = line[i];
    if (c == ' ') return false;   // a path has no spaces
    if (c != ':') continue;
    size_t d = i + 1;
    while (d < line.size() && isdigit(static_cast<unsigned char>(line[d]))) d++;
    if (d == i + 1 || d + 1 >= line.size() || line[d] != ':' || line[d + 1] != ' ') continue;
    auto rest = line.slice(d + 2);
    for (auto type: TYPES) {
      if (!rest.startsWith(type)) continue;
      size_t after = d + 2 + type.size();
      if (after == line.size()) {
        textStart = after;
        return true;
      }
      if (line.slice(after).startsWith(": ")) {
        textStart = after + 2;
        return true;
      }
    }
    return false;
  }
  return false;
}

kj::String cleanValue(kj::StringPtr value) {
  // A value that is a stringified exception (location, type, description, `stack:` line,
  // context lines) becomes its description; anything else stays as is.
  bool multi = value.findFirst('\n') != nullptr;
  size_t textStart = 0;
  if (!multi && !isExceptionLine(value, textStart)) return kj::str(value);
  kj::Vector<kj::String> kept;
  size_t start = 0;
  while (start <= value.size()) {
    size_t end = start;
    while (end < value.size() && value[end] != '\n') end++;
    auto line = kj::heapString(value.begin() + start, end - start);
    size_t at = 0;
    if (line.startsWith("stack:")) {
      // dropped
    } else if (isExceptionLine(line, at)) {
      bool context = at >= 9 && kj::arrayPtr(line.begin() + at - 9, 9) == "context: "_kj.asArray();
      if (!context && at < line.size()) {
        kept.add(describeKjText(line.slice(at)));
      }
    } else if (line.size() > 0) {
      kept.add(kj::mv(line));
    }
    start = end + 1;
  }
  return kj::strArray(kept, "; ");
}

}  // namespace

kj::String describeKjText(kj::StringPtr text) {
  auto split = parseKjText(text);
  if (split.named.size() == 0) return kj::mv(split.message);
  kj::Vector<kj::String> values(split.named.size());
  for (auto& f: split.named) {
    auto v = cleanValue(f.value);
    if (v.size() > 0) values.add(kj::mv(v));
  }
  auto joined = kj::strArray(values, ", ");
  if (split.message.size() == 0) return joined;
  if (joined.size() == 0) return kj::mv(split.message);
  return kj::str(split.message, ": ", joined);
}

kj::String describeException(const kj::Exception& e) {
  auto text = describeKjText(e.getDescription());
  if (text.size() == 0) return kj::str(e.getType());
  return text;
}

KjLogText splitKjLogText(kj::StringPtr text) {
  auto split = parseKjText(text);
  KjLogText result;
  result.message = kj::mv(split.message);
  kj::Vector<kj::String> fields(split.named.size());
  for (auto& f: split.named) fields.add(kj::str(f.key, '=', quoteFieldValue(f.value)));
  result.fields = kj::strArray(fields, " ");
  return result;
}

// ---------------------------------------------------------------------------------------------
// Logger

Logger::Logger(LogConfig configParam)
    : config(kj::mv(configParam)),
      clock(config.clock.orDefault(kj::systemCoarseMonotonicClock())),
      sink(kj::mv(config.sink)) {
  KJ_IF_MAYBE(path, config.file) {
    int fd = ::open(path->cStr(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd < 0) {
      kj::throwFatalException(kj::Exception(kj::Exception::Type::FAILED, __FILE__, __LINE__,
          kj::str("cannot open the log file ", *path, ": ", strerror(errno))));
    }
    file = kj::AutoCloseFd(fd);
  }
}

namespace {

void writeAll(int fd, kj::StringPtr text) {
  const char* p = text.begin();
  size_t left = text.size();
  while (left > 0) {
    ssize_t n = ::write(fd, p, left);
    if (n < 0) {
      if (errno == EINTR) continue;
      return;  // logging never throws
    }
    p += n;
    left -= n;
  }
}

constexpr kj::StringPtr GLOBAL_SUMMARY = "Log lines suppressed"_kj;
constexpr size_t TAG_PREFIX = 4;   // "WRN " in front of the message in a rate-limit key

kj::Array<LogField> capValues(kj::ArrayPtr<const LogField> fields, size_t cap) {
  // Copies of the fields, each value cut to `cap` bytes (at a UTF-8 boundary).
  auto out = kj::heapArrayBuilder<LogField>(fields.size());
  for (auto& f: fields) {
    size_t n = f.value.size();
    if (cap > 0 && n > cap) {
      n = cap;
      while (n > 0 && (static_cast<kj::byte>(f.value[n]) & 0xC0) == 0x80) n--;
    }
    out.add(LogField{kj::str(f.key), kj::heapString(f.value.begin(), n), f.number});
  }
  return out.finish();
}

}  // namespace

Logger::Entry Logger::summary(LogLevel level, kj::StringPtr message, uint64_t count) const {
  Entry e{level, nullptr, nullptr, kj::str(message), Fields()};
  e.ownedFields.add("suppressed", static_cast<unsigned long long>(count))
      .add("interval", durationText(config.rateInterval));
  return e;
}

Logger::~Logger() noexcept(false) {
  if (config.rateInterval <= 0 * kj::SECONDS) return;
  kj::Vector<Entry> out;
  {
    auto state = rate.lockExclusive();
    for (auto& entry: state->messages) {
      if (entry.value.suppressed == 0) continue;
      out.add(summary(entry.value.level, entry.key.slice(TAG_PREFIX), entry.value.suppressed));
    }
    if (state->suppressed > 0) {
      out.add(summary(state->suppressedLevel, GLOBAL_SUMMARY, state->suppressed));
    }
  }
  if (out.size() > 0) write(out);
}

kj::String Logger::render(const Entry& entry) const {
  kj::StringPtr message = entry.fields != nullptr ? entry.message : entry.ownedMessage;
  const Fields& fields = entry.fields != nullptr ? *entry.fields : entry.ownedFields;
  if (config.format == LogFormat::TEXT) {
    return finishLine(formatLogLine(entry.level, message, fields.toText()));
  }
  auto line = formatJsonLogLine(entry.level, message, fields.entries());
  if (config.maxLineBytes == 0 || line.size() - 1 <= config.maxLineBytes) return line;
  // Too long: cut the values (a cut JSON line would not parse), halving the cap until it fits.
  size_t longest = 0;
  for (auto& f: fields.entries()) longest = kj::max(longest, f.value.size());
  for (size_t cap = kj::min(longest, config.maxLineBytes) / 2; ; cap /= 2) {
    auto capped = capValues(fields.entries(), cap);
    auto shortMessage = message.size() > config.maxLineBytes / 2
        ? kj::heapString(message.begin(), config.maxLineBytes / 2) : kj::str(message);
    auto builder = kj::heapArrayBuilder<LogField>(capped.size() + 1);
    for (auto& f: capped) builder.add(kj::mv(f));
    builder.add(LogField{kj::str("truncated"), kj::str(line.size() - 1), true});
    auto shorter = formatJsonLogLine(entry.level, shortMessage, builder.finish());
    if (shorter.size() - 1 <= config.maxLineBytes || cap == 0) return shorter;
  }
}

void Logger::write(kj::ArrayPtr<Entry> entries) const {
  bool sent = false;
  {
    auto lock = sink.lockExclusive();
    KJ_IF_MAYBE(s, *lock) {
      sent = true;
      for (auto& entry: entries) {
        kj::StringPtr message = entry.fields != nullptr ? entry.message : entry.ownedMessage;
        const Fields& fields = entry.fields != nullptr ? *entry.fields : entry.ownedFields;
        auto capped = capValues(fields.entries(), config.maxLineBytes);
        auto& target = **s;
        kj::runCatchingExceptions([&]() { target.write(entry.level, message, capped); });
      }
    }
  }
  bool toStderr = config.toStderr && !sent;
  if (!toStderr && file == nullptr) return;
  kj::String text;
  if (entries.size() == 1) {
    text = render(entries[0]);
  } else {
    auto lines = KJ_MAP(entry, entries) { return render(entry); };
    text = kj::strArray(lines, "");   // one write(2): a summary stays next to its line
  }
  if (toStderr) writeAll(STDERR_FILENO, text);
  KJ_IF_MAYBE(fd, file) writeAll(fd->get(), text);
}

kj::String Logger::finishLine(kj::String line) const {
  size_t body = line.size() - 1;   // without the newline
  if (config.maxLineBytes == 0 || body <= config.maxLineBytes) return kj::mv(line);
  size_t cut = config.maxLineBytes;
  while (cut > 0 && (static_cast<kj::byte>(line[cut]) & 0xC0) == 0x80) cut--;  // UTF-8 lead
  return kj::str(kj::arrayPtr(line.cStr(), cut), " truncated=", body - cut, '\n');
}

bool Logger::admit(RateState& state, Entry entry, kj::Vector<Entry>& out) const {
  if (config.maxLinesPerInterval == 0 || state.written < config.maxLinesPerInterval) {
    state.written++;
    out.add(kj::mv(entry));
    return true;
  }
  state.suppressed++;
  if (entry.level > state.suppressedLevel) state.suppressedLevel = entry.level;
  return false;
}

void Logger::emitSummary(RateState& state, LogLevel level, kj::StringPtr message,
                         uint64_t count, kj::Vector<Entry>& out) const {
  if (!admit(state, summary(level, message, count), out)) {
    state.suppressed += count - 1;   // admit() counted the summary itself as one line
  }
}

void Logger::rollGlobal(RateState& state, kj::TimePoint now, kj::Vector<Entry>& out) const {
  if (!state.started) {
    state.started = true;
    state.windowStart = now;
    return;
  }
  if (now - state.windowStart < config.rateInterval) return;
  uint64_t count = state.suppressed;
  LogLevel level = state.suppressedLevel;
  state.windowStart = now;
  state.written = 0;
  state.suppressed = 0;
  state.suppressedLevel = LogLevel::DEBUG;
  if (count > 0) {
    // Always written: at most one per interval, and it opens the new window's budget.
    state.written++;
    out.add(summary(level, GLOBAL_SUMMARY, count));
  }
}

void Logger::sweep(RateState& state, kj::TimePoint now, kj::Vector<Entry>& out) const {
  // Writes the summaries of the windows that ended and forgets their keys.
  kj::Maybe<kj::TimePoint> next;
  state.messages.eraseAll([&](kj::String& key, MessageCount& count) {
    kj::TimePoint end = count.windowStart + config.rateInterval;
    if (now >= end) {
      if (count.suppressed > 0) {
        emitSummary(state, count.level, key.slice(TAG_PREFIX), count.suppressed, out);
      }
      return true;
    }
    if (count.suppressed > 0) {
      KJ_IF_MAYBE(n, next) {
        if (end < *n) *n = end;
      } else {
        next = end;
      }
    }
    return false;
  });
  state.nextDue = next;
}

void Logger::log(LogLevel level, kj::StringPtr message, const Fields& fieldsParam) const {
  if (!enabled(level)) return;
  const Fields* fields = &fieldsParam;
  Fields withDetail;
  bool detailLine = false;
  KJ_IF_MAYBE(detail, fieldsParam.exceptionDetail()) {
    if (level == LogLevel::DEBUG) {
      // A debug line carries the full exception itself.
      withDetail = fieldsParam.clone();
      withDetail.add("exception", *detail);
      fields = &withDetail;
    } else {
      detailLine = enabled(LogLevel::DEBUG);
    }
  }
  kj::Vector<Entry> out;
  if (config.rateInterval <= 0 * kj::SECONDS) {
    out.add(Entry{level, message, fields, nullptr, Fields()});
  } else {
    auto state = rate.lockExclusive();
    kj::TimePoint now = clock.now();   // under the lock: windows only move forward
    rollGlobal(*state, now, out);
    KJ_IF_MAYBE(due, state->nextDue) {
      if (now >= *due) sweep(*state, now, out);
    }
    bool pass = true;
    if (config.burst > 0) {
      auto key = kj::str(levelTag(level), ' ', message);
      MessageCount* count = nullptr;
      KJ_IF_MAYBE(c, state->messages.find(key)) {
        count = c;
      } else {
        if (state->messages.size() >= MAX_TRACKED_MESSAGES &&
            now - state->lastFullSweep >= config.rateInterval) {
          state->lastFullSweep = now;
          sweep(*state, now, out);
        }
        if (state->messages.size() < MAX_TRACKED_MESSAGES) {
          count = &state->messages.insert(kj::mv(key), MessageCount{level, now, 0, 0}).value;
        }
      }
      if (count != nullptr) {
        if (now - count->windowStart >= config.rateInterval) {
          if (count->suppressed > 0) {
            emitSummary(*state, level, message, count->suppressed, out);
          }
          count->windowStart = now;
          count->passed = 0;
          count->suppressed = 0;
        }
        if (count->passed < config.burst) {
          count->passed++;
        } else {
          pass = false;
          count->suppressed++;
          kj::TimePoint end = count->windowStart + config.rateInterval;
          KJ_IF_MAYBE(due, state->nextDue) {
            if (end < *due) *due = end;
          } else {
            state->nextDue = end;
          }
        }
      }
    }
    // Formatted only when it may be written: a suppressed line costs a lookup and a count.
    if (pass) {
      detailLine = admit(*state, Entry{level, message, fields, nullptr, Fields()}, out) &&
                   detailLine;
    } else {
      detailLine = false;
    }
  }
  if (out.size() > 0) write(out);
  if (detailLine) {
    // Right after its line (same thread); not under the line's own message, so that counting
    // a message's lines counts what people see.
    log(LogLevel::DEBUG, "Exception detail",
        Fields().add("exception", KJ_ASSERT_NONNULL(fieldsParam.exceptionDetail())));
  }
}

// ---------------------------------------------------------------------------------------------
// The thread's logger

namespace {

thread_local const Logger* threadLogger = nullptr;

}  // namespace

bool logEnabled(LogLevel level) {
  if (threadLogger != nullptr) return threadLogger->enabled(level);
  // No Logger on this thread (cfqt-edge, unit tests): KJ's log level decides, as for KJ_LOG.
  switch (level) {
    case LogLevel::DEBUG:
    case LogLevel::INFO: return kj::_::Debug::shouldLog(kj::LogSeverity::INFO);
    case LogLevel::WARN: return kj::_::Debug::shouldLog(kj::LogSeverity::WARNING);
    case LogLevel::ERROR:
    case LogLevel::FATAL: return kj::_::Debug::shouldLog(kj::LogSeverity::ERROR);
  }
  return true;
}

void log(LogLevel level, kj::StringPtr message, const Fields& fields) {
  if (threadLogger != nullptr) {
    threadLogger->log(level, message, fields);
    return;
  }
  if (!logEnabled(level)) return;
  writeAll(STDERR_FILENO, formatLogLine(level, message, fields.toText()));
}

void log(LogLevel level, kj::StringPtr message) {
  log(level, message, Fields());
}

// ---------------------------------------------------------------------------------------------
// KJ_LOG lines

LogCallback::LogCallback(const Logger& logger): logger(logger), previous(threadLogger) {
  threadLogger = &logger;
  kj::_::Debug::setLogLevel(logger.enabled(LogLevel::DEBUG)
      ? kj::LogSeverity::INFO : kj::LogSeverity::WARNING);
}

LogCallback::~LogCallback() noexcept(false) {
  threadLogger = previous;
}

void LogCallback::logMessage(kj::LogSeverity severity, const char* file, int line,
                             int contextDepth, kj::String&& text) {
  LogLevel level = LogLevel::ERROR;
  switch (severity) {
    case kj::LogSeverity::INFO: level = LogLevel::DEBUG; break;
    case kj::LogSeverity::WARNING: level = LogLevel::WARN; break;
    case kj::LogSeverity::ERROR: level = LogLevel::ERROR; break;
    case kj::LogSeverity::FATAL: level = LogLevel::FATAL; break;
    case kj::LogSeverity::DBG: level = LogLevel::DEBUG; break;
  }
  if (!logger.enabled(level)) return;
  size_t len = text.size();
  while (len > 0 && text[len - 1] == '\n') len--;
  const char* base = file;
  for (const char* p = file; *p != '\0'; p++) {
    if (*p == '/') base = p + 1;
  }
  auto body = kj::heapString(text.begin(), len);
  auto split = parseKjText(body);
  bool debugLine = logger.enabled(LogLevel::DEBUG);
  if (level > LogLevel::DEBUG) {
    // For people: the sentence and the values, no expression names, location or stack.
    kj::Vector<kj::String> values(split.named.size());
    for (auto& f: split.named) {
      auto v = cleanValue(f.value);
      if (v.size() > 0) values.add(kj::mv(v));
    }
    Fields fields;
    if (values.size() > 0) fields.add("detail", kj::strArray(values, "; "));
    auto message = split.message.size() > 0
        ? kj::mv(split.message)
        : kj::str(level >= LogLevel::ERROR ? "Internal error" : "Internal warning");
    logger.log(level, message, fields);
    if (!debugLine) return;
    split = parseKjText(body);
  }
  // Debug: everything KJ said, named after the expressions, with where it was said.
  Fields fields;
  for (auto& f: split.named) fields.add(f.key, kj::mv(f.value));
  fields.add("src", kj::str(base, ':', line));
  // A KJ_LOG without a literal is keyed (and named) by where it is.
  auto message = split.message.size() > 0 ? kj::mv(split.message) : kj::str(base, ':', line);
  logger.log(LogLevel::DEBUG, message, fields);
}

}  // namespace cfqt::observe
