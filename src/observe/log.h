#pragma once
// Logging for the cfqt product (PROTOCOL.md §1.4, §8.7): cloudflared-style console lines
// `2026-11-25T10:56:58Z INF Registered tunnel connection connIndex=0 ...` (or one JSON object per
// line, --log-format-output json) on stderr, a log file and/or a LogSink (the library's log
// callback). A line is one fixed sentence plus fields built with observe::Fields, which escapes
// every value: no call site formats `key=value` by hand, and nothing a peer sends reaches the
// terminal raw. Layers without a Logger log through observe::log() (the thread's Logger), and
// a kj::ExceptionCallback (LogCallback) routes what still comes through KJ_LOG (capnp, KJ) to the
// same place, without expression dumps, source locations or stacks above debug.
//
// Log volume is bounded (issue 13): nothing a visitor does can make cfqt write more than a fixed
// number of lines, of a fixed maximum size, per interval.
//
// - Per message. Lines are keyed by level + message (the sentence, not the key=value fields,
//   which vary per request). In each interval (LogConfig::rateInterval, 1 s by default, starting
//   at the first line of that key) the first `burst` lines (5) of a key are written; further ones
//   are only counted. The next line of that key after the interval, or failing that the next
//   line of any key (or the Logger's destructor), first writes one summary line with the same
//   level and message and no other fields:
//
//     2026-11-25T10:56:59Z WRN Request failed suppressed=24412 interval=1s
//
//   meaning "24412 more lines `WRN Request failed ...` were not written in one 1s interval".
// - Over all messages. At most `maxLinesPerInterval` lines (200) are written per interval,
//   summaries included; beyond that lines are counted, and the first line after the interval
//   (or the destructor) is one
//
//     2026-11-25T10:56:59Z WRN Log lines suppressed suppressed=3120 interval=1s
//
//   at the highest level among the lines it stands for (never below the configured level).
// - Per line. A line longer than `maxLineBytes` (4096) is cut and ends with ` truncated=<bytes>`.
//
// This applies to every level, DEBUG included: `--loglevel debug` is used on live tunnels to
// diagnose them, and per-request debug lines are as visitor-driven as the warnings.

#include "observe/guarded.h"

#include <kj/exception.h>
#include <kj/io.h>
#include <kj/map.h>
#include <kj/mutex.h>
#include <kj/string.h>
#include <kj/time.h>
#include <kj/vector.h>

#include <stdint.h>

namespace cfqt::observe {

enum class LogLevel { DEBUG, INFO, WARN, ERROR, FATAL };

kj::Maybe<LogLevel> parseLogLevel(kj::StringPtr text);
// cloudflared's names: "debug", "info", "warn", "error", "fatal" (also "warning"). Null otherwise.

kj::StringPtr levelTag(LogLevel level);
// "DBG", "INF", "WRN", "ERR", "FTL".

kj::StringPtr levelName(LogLevel level);
// "debug", "info", "warn", "error", "fatal" (the JSON output's `level`).

enum class LogFormat { TEXT, JSON };
// --log-format-output default|json (cloudflared's flag and values).

kj::Maybe<LogFormat> parseLogFormat(kj::StringPtr text);
// "default" (also "text") or "json". Null otherwise.

struct LogField {
  kj::String key;
  kj::String value;    // any bytes; escaped when written
  bool number = false; // written unquoted in JSON (integers only)
};

class Fields {
  // The key=value part of a log line, built by the caller and escaped by the logger, so that no
  // call site formats a value by hand:
  //
  //   logger.warn("Request failed", observe::Fields()
  //       .add("connIndex", index).add("dest", dest).error(e));
  //
  // Console: `key=value`, the value in double quotes when it holds a space, '=', '"', '\\', a
  // control byte or anything outside printable ASCII (see quoteFieldValue()). JSON: one member
  // per field. Keys are the caller's literals (letters, digits, '_', '.').
public:
  Fields() = default;
  Fields(Fields&&) = default;
  Fields& operator=(Fields&&) = default;
  KJ_DISALLOW_COPY(Fields);

  Fields& add(kj::StringPtr key, kj::StringPtr value);
  Fields& add(kj::StringPtr key, kj::String&& value);
  Fields& add(kj::StringPtr key, const char* value) { return add(key, kj::StringPtr(value)); }
  Fields& add(kj::StringPtr key, bool value) { return add(key, value ? "true"_kj : "false"_kj); }
  Fields& add(kj::StringPtr key, int value) { return addNumber(key, kj::str(value)); }
  Fields& add(kj::StringPtr key, unsigned value) { return addNumber(key, kj::str(value)); }
  Fields& add(kj::StringPtr key, long value) { return addNumber(key, kj::str(value)); }
  Fields& add(kj::StringPtr key, unsigned long value) { return addNumber(key, kj::str(value)); }
  Fields& add(kj::StringPtr key, long long value) { return addNumber(key, kj::str(value)); }
  Fields& add(kj::StringPtr key, unsigned long long value) {
    return addNumber(key, kj::str(value));
  }
  Fields& add(kj::StringPtr key, kj::Duration value);   // "250ms", "2s", "1.5s"

  Fields& error(const kj::Exception& e, kj::StringPtr key = "error");
  // `key` = describeException(e): the sentence, without source location, exception type,
  // expression names or stack. The full dump (kj::str(e)) is kept for debug: the logger adds it
  // as `exception=` to a DBG line, or, when debug is enabled, writes `DBG Exception detail
  // exception=...` right after an INF/WRN/ERR line. (Kept only if logEnabled(DEBUG) on this
  // thread: build Fields on the thread that logs them.)

  Fields& addAll(Fields&& other);
  Fields clone() const;

  size_t size() const { return list.size(); }
  kj::ArrayPtr<const LogField> entries() const { return list.asPtr(); }
  kj::Maybe<kj::StringPtr> exceptionDetail() const;

  kj::String toText() const;
  // "key=value key=\"two words\"" (console form).

  static Fields parse(kj::StringPtr text);
  // The reverse of toText(), for the older `log(level, message, "k=v k=\"v\"")` calls: splits at
  // spaces outside double quotes and unescapes quoted values. A word without '=' becomes a
  // value of the key "field".

private:
  kj::Vector<LogField> list;
  kj::Maybe<kj::String> detail;

  Fields& addNumber(kj::StringPtr key, kj::String value);
};

kj::String describeKjText(kj::StringPtr text);
// What describeException() does, for a KJ description text (`sentence; expr = value; ...`).

kj::String describeException(const kj::Exception& e);
// One readable sentence for a log field or a user-facing message: the description with KJ's
// expression dumps (`name = value` parts of KJ_REQUIRE/KJ_EXCEPTION texts) reduced to their
// values, an exception nested in the text reduced to its own description, and never a source
// location or stack.

class LogSink {
  // Where lines go instead of stderr when set (the library's log callback). Called under a
  // lock of the Logger, so never by two threads at once; must not log through the same
  // Logger. Values are as given (not escaped), each cut to LogConfig::maxLineBytes.
public:
  virtual ~LogSink() noexcept(false) = default;
  virtual void write(LogLevel level, kj::StringPtr message,
                     kj::ArrayPtr<const LogField> fields) = 0;
};

struct LogConfig {
  LogLevel level = LogLevel::INFO;
  kj::Maybe<kj::String> file;   // --logfile: appended to, in addition to stderr
  bool toStderr = true;
  kj::Duration rateInterval = 1 * kj::SECONDS;
  // The aggregation interval (see the top of this file). 0 turns all rate limiting off.
  uint32_t burst = 5;
  // Lines of one level + message written per interval; 0 means no per-message limit.
  uint32_t maxLinesPerInterval = 200;
  // Lines written per interval over all messages, summaries included; 0 means no limit.
  size_t maxLineBytes = 4096;
  // Longer lines are cut (the newline excluded); 0 means no limit.
  kj::Maybe<const kj::MonotonicClock&> clock = nullptr;
  // Time source of the intervals (tests inject one); null means the system's coarse monotonic
  // clock. Must outlive the Logger and be callable from any thread that logs.
  LogFormat format = LogFormat::TEXT;   // --log-format-output (stderr and the file)
  kj::Maybe<kj::Own<LogSink>> sink = nullptr;
  // Replaces stderr (the file, if any, is still written).
};

class Logger {
  // Thread-safe (const methods; one write(2) per call). Owned by main() or cfqt::Tunnel and
  // borrowed by everything that logs.
public:
  explicit Logger(LogConfig config);
  // Opens the log file (throws FAILED with the path if it can't).
  KJ_DISALLOW_COPY(Logger);
  ~Logger() noexcept(false);
  // Writes the summaries still pending (suppressed counts of the last intervals).

  bool enabled(LogLevel level) const { return level >= config.level; }
  void log(LogLevel level, kj::StringPtr message, const Fields& fields) const;
  // One sentence (a fixed text: it is the rate-limit key) and its fields; never pass secrets.
  // Subject to the rate limits above.
  void log(LogLevel level, kj::StringPtr message) const { log(level, message, Fields()); }
  void log(LogLevel level, kj::StringPtr message, kj::StringPtr preformatted) const {
    log(level, message, Fields::parse(preformatted));
  }
  // Older form: fields already written as "k=v k=\"v\"" (parsed back, see Fields::parse()).

  template <typename... F>
  void debug(kj::StringPtr message, F&&... fields) const {
    log(LogLevel::DEBUG, message, kj::fwd<F>(fields)...);
  }
  template <typename... F>
  void info(kj::StringPtr message, F&&... fields) const {
    log(LogLevel::INFO, message, kj::fwd<F>(fields)...);
  }
  template <typename... F>
  void warn(kj::StringPtr message, F&&... fields) const {
    log(LogLevel::WARN, message, kj::fwd<F>(fields)...);
  }
  template <typename... F>
  void error(kj::StringPtr message, F&&... fields) const {
    log(LogLevel::ERROR, message, kj::fwd<F>(fields)...);
  }

  LogLevel level() const { return config.level; }

  static constexpr size_t MAX_TRACKED_MESSAGES = 1024;
  // Distinct level + message keys counted at a time. Keys whose interval ended with nothing
  // suppressed are forgotten when the table is full; a message beyond the table is held only
  // to the global limit.

private:
  struct MessageCount {
    LogLevel level;
    kj::TimePoint windowStart;
    uint32_t passed;          // lines of this window within `burst`
    uint64_t suppressed;      // lines of this window beyond it
  };
  struct RateState {
    kj::HashMap<kj::String, MessageCount> messages;   // key: levelTag + ' ' + message
    bool started = false;
    kj::TimePoint windowStart = kj::origin<kj::TimePoint>();   // of the global window
    uint32_t written = 0;       // lines written in the global window
    uint64_t suppressed = 0;    // lines over the global limit in it
    LogLevel suppressedLevel = LogLevel::DEBUG;   // the highest of them
    kj::Maybe<kj::TimePoint> nextDue;   // earliest end of a window with a suppressed count
    kj::TimePoint lastFullSweep = kj::origin<kj::TimePoint>();
  };

  struct Entry {
    // A line to write once the rate state is unlocked: the caller's (borrowed) or a summary.
    LogLevel level;
    kj::StringPtr message;
    const Fields* fields;
    kj::String ownedMessage;
    Fields ownedFields;
  };

  LogConfig config;
  const kj::MonotonicClock& clock;
  kj::Maybe<kj::AutoCloseFd> file;
  Guarded<RateState> rate;
  Guarded<kj::Maybe<kj::Own<LogSink>>> sink;   // the lock serializes its calls

  void write(kj::ArrayPtr<Entry> entries) const;
  kj::String render(const Entry& entry) const;
  void rollGlobal(RateState& state, kj::TimePoint now, kj::Vector<Entry>& out) const;
  void sweep(RateState& state, kj::TimePoint now, kj::Vector<Entry>& out) const;
  bool admit(RateState& state, Entry entry, kj::Vector<Entry>& out) const;
  void emitSummary(RateState& state, LogLevel level, kj::StringPtr message, uint64_t count,
                   kj::Vector<Entry>& out) const;
  Entry summary(LogLevel level, kj::StringPtr message, uint64_t count) const;
  kj::String finishLine(kj::String line) const;
};

void log(LogLevel level, kj::StringPtr message, const Fields& fields);
void log(LogLevel level, kj::StringPtr message);
// For the layers that hold no Logger (edge, origin, quic, wire, http2, emulator): writes to the
// Logger of the LogCallback installed on this thread, or, without one (unit tests), a console
// line on stderr at WARN and above (INFO and DEBUG when KJ's log level lets INFO through).
inline void logDebug(kj::StringPtr message, const Fields& fields = Fields()) {
  log(LogLevel::DEBUG, message, fields);
}
inline void logInfo(kj::StringPtr message, const Fields& fields = Fields()) {
  log(LogLevel::INFO, message, fields);
}
inline void logWarn(kj::StringPtr message, const Fields& fields = Fields()) {
  log(LogLevel::WARN, message, fields);
}
inline void logError(kj::StringPtr message, const Fields& fields = Fields()) {
  log(LogLevel::ERROR, message, fields);
}
bool logEnabled(LogLevel level);
// Whether log(level, ...) would write anything on this thread (to skip building costly fields).

class LogCallback final: public kj::ExceptionCallback {
  // Installed (as a stack object) on every thread that runs cfqt code. It makes `logger` the
  // thread's Logger for observe::log() (restoring the previous one when destroyed), and routes
  // what still comes through KJ_LOG (Cap'n Proto's and KJ's own lines): INFO becomes a DBG
  // line, WARNING a WRN line, ERROR an ERR line. Also sets KJ's own log level so that INFO is
  // only produced when the logger wants debug.
  //
  // At DBG, KJ's text `Request failed; impl.config.toString() = http://127.0.0.1:1; e = ...`
  // becomes the message `Request failed` (the literal arguments, so one key per call site for
  // the rate limits) and fields named after the expressions plus `src=file.c++:line`
  // (see splitKjLogText()). At WRN and above the line is only the sentence and one field
  // `detail` with the values (an exception reduced to its description, see
  // describeException()); the full text follows on a DBG line when debug is enabled.
public:
  explicit LogCallback(const Logger& logger);
  ~LogCallback() noexcept(false);
  void logMessage(kj::LogSeverity severity, const char* file, int line, int contextDepth,
                  kj::String&& text) override;

private:
  const Logger& logger;
  const Logger* previous;
};

kj::String formatLogLine(LogLevel level, kj::StringPtr message, kj::StringPtr fields);
// One console line with the current UTC time and a trailing newline (exposed for tests).
// `fields` is already in console form.

kj::String formatJsonLogLine(LogLevel level, kj::StringPtr message,
                             kj::ArrayPtr<const LogField> fields);
// {"level":"warn","time":"2026-11-25T10:56:58Z","message":"...","key":"value",...} and a
// newline. Strings are JSON-escaped; a byte that is not UTF-8 becomes the text \xHH.

struct KjLogText {
  kj::String message;   // empty if KJ_LOG had no string literal before its first value
  kj::String fields;    // "name=value ...", values quoted where needed (quoteFieldValue())
};
KjLogText splitKjLogText(kj::StringPtr text);
// Splits KJ_LOG's "literal; literal; expr = value; expr = value" at "; ". Leading segments that
// are not `expr = value` form the message; each `expr = value` becomes a field named after the
// expression (characters other than letters, digits, '_' and '.' dropped: `request.getDest()`
// becomes `request.getDest`); a later segment that is not `expr = value` (a "; " inside a value)
// stays part of the value before it. Exposed for tests.

kj::String quoteFieldValue(kj::StringPtr value);
// The value as is if it is non-empty printable ASCII without space, '"', '\\' or '='
// (zerolog's console rule); otherwise in double quotes with '"' and '\\' backslash-escaped,
// control characters as \n, \r, \t or \xHH, bytes that are not UTF-8 as \xHH and invisible or
// direction-changing code points (C1 controls, U+200B-U+200F, U+2028/9, U+202A-U+202E,
// U+2066-U+2069, U+FEFF) as \uXXXX; other UTF-8 text stays as is. Log lines therefore never
// contain a newline or a terminal escape from a value.

kj::String escapeLogText(kj::StringPtr text);
// The same escapes without the quotes, for the message of a line.

}  // namespace cfqt::observe
