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

kj::String formatLogLine(LogLevel level, kj::StringPtr message, kj::StringPtr fields) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  struct tm tm;
  gmtime_r(&ts.tv_sec, &tm);
  char stamp[32];
  strftime(stamp, sizeof(stamp), "%Y-%m-%dT%H:%M:%SZ", &tm);
  if (fields.size() == 0) {
    return kj::str(stamp, ' ', levelTag(level), ' ', message, '\n');
  }
  return kj::str(stamp, ' ', levelTag(level), ' ', message, ' ', fields, '\n');
}

Logger::Logger(LogConfig configParam)
    : config(kj::mv(configParam)),
      clock(config.clock.orDefault(kj::systemCoarseMonotonicClock())) {
  KJ_IF_MAYBE(path, config.file) {
    int fd = ::open(path->cStr(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd < 0) {
      KJ_FAIL_REQUIRE("cannot open the log file", *path, strerror(errno));
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

kj::String formatInterval(kj::Duration d) {
  int64_t ns = d / kj::NANOSECONDS;
  if (ns % 1000000000 == 0) return kj::str(ns / 1000000000, 's');
  if (ns % 1000000 == 0) return kj::str(ns / 1000000, "ms");
  if (ns % 1000 == 0) return kj::str(ns / 1000, "us");
  return kj::str(ns, "ns");
}

constexpr kj::StringPtr GLOBAL_SUMMARY = "Log lines suppressed"_kj;
constexpr size_t TAG_PREFIX = 4;   // "WRN " in front of the message in a rate-limit key

}  // namespace

Logger::~Logger() noexcept(false) {
  if (config.rateInterval <= 0 * kj::SECONDS) return;
  auto interval = formatInterval(config.rateInterval);
  kj::Vector<kj::String> out;
  auto state = rate.lockExclusive();
  for (auto& entry: state->messages) {
    if (entry.value.suppressed == 0) continue;
    out.add(finishLine(formatLogLine(entry.value.level, entry.key.slice(TAG_PREFIX),
        kj::str("suppressed=", entry.value.suppressed, " interval=", interval))));
  }
  if (state->suppressed > 0) {
    out.add(finishLine(formatLogLine(state->suppressedLevel, GLOBAL_SUMMARY,
        kj::str("suppressed=", state->suppressed, " interval=", interval))));
  }
  if (out.size() > 0) write(kj::strArray(out, ""));
}

void Logger::write(kj::StringPtr text) const {
  if (config.toStderr) writeAll(STDERR_FILENO, text);
  KJ_IF_MAYBE(fd, file) writeAll(fd->get(), text);
}

kj::String Logger::finishLine(kj::String line) const {
  size_t body = line.size() - 1;   // without the newline
  if (config.maxLineBytes == 0 || body <= config.maxLineBytes) return kj::mv(line);
  size_t cut = config.maxLineBytes;
  while (cut > 0 && (static_cast<kj::byte>(line[cut]) & 0xC0) == 0x80) cut--;  // UTF-8 lead
  return kj::str(kj::arrayPtr(line.cStr(), cut), " truncated=", body - cut, '\n');
}

bool Logger::admit(RateState& state, LogLevel level, kj::String line,
                   kj::Vector<kj::String>& out) const {
  if (config.maxLinesPerInterval == 0 || state.written < config.maxLinesPerInterval) {
    state.written++;
    out.add(kj::mv(line));
    return true;
  }
  state.suppressed++;
  if (level > state.suppressedLevel) state.suppressedLevel = level;
  return false;
}

void Logger::emitSummary(RateState& state, LogLevel level, kj::StringPtr message,
                         uint64_t count, kj::Vector<kj::String>& out) const {
  auto line = finishLine(formatLogLine(level, message,
      kj::str("suppressed=", count, " interval=", formatInterval(config.rateInterval))));
  if (!admit(state, level, kj::mv(line), out)) {
    state.suppressed += count - 1;   // admit() counted the summary itself as one line
  }
}

void Logger::rollGlobal(RateState& state, kj::TimePoint now, kj::Vector<kj::String>& out) const {
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
    out.add(finishLine(formatLogLine(level, GLOBAL_SUMMARY,
        kj::str("suppressed=", count, " interval=", formatInterval(config.rateInterval)))));
  }
}

void Logger::sweep(RateState& state, kj::TimePoint now, kj::Vector<kj::String>& out) const {
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

void Logger::log(LogLevel level, kj::StringPtr message, kj::StringPtr fields) const {
  if (!enabled(level)) return;
  if (config.rateInterval <= 0 * kj::SECONDS) {
    write(finishLine(formatLogLine(level, message, fields)));
    return;
  }
  kj::Vector<kj::String> out;
  {
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
    if (pass) admit(*state, level, finishLine(formatLogLine(level, message, fields)), out);
  }
  if (out.size() == 1) {
    write(out[0]);
  } else if (out.size() > 1) {
    write(kj::strArray(out, ""));   // one write(2): a summary stays next to its line
  }
}

// ---------------------------------------------------------------------------------------------
// KJ_LOG text

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
  return kj::heapString(out.begin(), out.size());
}

}  // namespace

kj::String quoteFieldValue(kj::StringPtr value) {
  bool plain = value.size() > 0;
  for (char c: value) {
    auto u = static_cast<unsigned char>(c);
    if (c == ' ' || c == '"' || c == '\\' || c == '=' || u < 0x20 || u == 0x7f) {
      plain = false;
      break;
    }
  }
  if (plain) return kj::str(value);
  kj::Vector<char> out(value.size() + 8);
  out.add('"');
  for (char c: value) {
    auto u = static_cast<unsigned char>(c);
    switch (c) {
      case '"': out.addAll(kj::StringPtr("\\\"")); break;
      case '\\': out.addAll(kj::StringPtr("\\\\")); break;
      case '\n': out.addAll(kj::StringPtr("\\n")); break;
      case '\r': out.addAll(kj::StringPtr("\\r")); break;
      case '\t': out.addAll(kj::StringPtr("\\t")); break;
      default:
        if (u < 0x20 || u == 0x7f) {
          const char* hex = "0123456789abcdef";
          out.addAll(kj::StringPtr("\\x"));
          out.add(hex[u >> 4]);
          out.add(hex[u & 15]);
        } else {
          out.add(c);
        }
    }
  }
  out.add('"');
  return kj::heapString(out.begin(), out.size());
}

KjLogText splitKjLogText(kj::StringPtr text) {
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
  KjLogText result;
  if (named.size() == 0) {
    result.message = kj::str(text);
    result.fields = kj::str();
    return result;
  }
  result.message = named[0].start == 0
      ? kj::str() : kj::heapString(text.begin(), named[0].start - 2);
  kj::Vector<kj::String> fields(named.size());
  for (size_t i = 0; i < named.size(); i++) {
    size_t valueStart = named[i].equals + 3;
    size_t valueEnd = i + 1 < named.size() ? named[i + 1].start - 2 : text.size();
    auto name = fieldName(kj::arrayPtr(text.begin() + named[i].start,
                                       named[i].equals - named[i].start));
    auto value = kj::heapString(text.begin() + valueStart, valueEnd - valueStart);
    fields.add(kj::str(name, '=', quoteFieldValue(value)));
  }
  result.fields = kj::strArray(fields, " ");
  return result;
}

LogCallback::LogCallback(const Logger& logger): logger(logger) {
  kj::_::Debug::setLogLevel(logger.enabled(LogLevel::DEBUG)
      ? kj::LogSeverity::INFO : kj::LogSeverity::WARNING);
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
  // Lower layers' lines keep their source location as a field, for whoever reads a bug report.
  const char* base = file;
  for (const char* p = file; *p != '\0'; p++) {
    if (*p == '/') base = p + 1;
  }
  auto split = splitKjLogText(kj::heapString(text.begin(), len));
  // A KJ_LOG without a literal is keyed (and named) by where it is.
  auto message = split.message.size() > 0 ? kj::mv(split.message) : kj::str(base, ':', line);
  auto fields = split.fields.size() > 0
      ? kj::str(split.fields, " src=", base, ':', line) : kj::str("src=", base, ':', line);
  logger.log(level, message, fields);
}

}  // namespace cfqt::observe
