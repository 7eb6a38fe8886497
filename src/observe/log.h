#pragma once
// Logging for the cfqt product (PROTOCOL.md §1.4, §8.7): cloudflared-style console lines
// `2026-11-25T10:56:58Z INF Registered tunnel connection connIndex=0 ...` on stderr and/or a log
// file, and a kj::ExceptionCallback that routes the lower layers' KJ_LOG lines to the same place.
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
  void log(LogLevel level, kj::StringPtr message, kj::StringPtr fields = nullptr) const;
  // `fields` is "key=value key=value" (already formatted); never pass secrets. Subject to the
  // rate limits above.

  void debug(kj::StringPtr message, kj::StringPtr fields = nullptr) const {
    log(LogLevel::DEBUG, message, fields);
  }
  void info(kj::StringPtr message, kj::StringPtr fields = nullptr) const {
    log(LogLevel::INFO, message, fields);
  }
  void warn(kj::StringPtr message, kj::StringPtr fields = nullptr) const {
    log(LogLevel::WARN, message, fields);
  }
  void error(kj::StringPtr message, kj::StringPtr fields = nullptr) const {
    log(LogLevel::ERROR, message, fields);
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

  LogConfig config;
  const kj::MonotonicClock& clock;
  kj::Maybe<kj::AutoCloseFd> file;
  kj::MutexGuarded<RateState> rate;

  void write(kj::StringPtr text) const;
  void rollGlobal(RateState& state, kj::TimePoint now, kj::Vector<kj::String>& out) const;
  void sweep(RateState& state, kj::TimePoint now, kj::Vector<kj::String>& out) const;
  bool admit(RateState& state, LogLevel level, kj::String line,
             kj::Vector<kj::String>& out) const;
  void emitSummary(RateState& state, LogLevel level, kj::StringPtr message, uint64_t count,
                   kj::Vector<kj::String>& out) const;
  kj::String finishLine(kj::String line) const;
};

class LogCallback final: public kj::ExceptionCallback {
  // Installed (as a stack object) on every thread that runs cfqt code: KJ_LOG(INFO) of the lower
  // layers becomes a DBG line, WARNING a WRN line, ERROR an ERR line. Also sets KJ's own log
  // level so that INFO is only produced when the logger wants debug.
  //
  // KJ's text `Request failed; impl.config.toString() = http://127.0.0.1:1; cause = dial tcp ...`
  // becomes the message `Request failed` (the literal arguments, so one key per call site for
  // the rate limits) and the fields `impl.config.toString=http://127.0.0.1:1
  // cause="dial tcp ..." src=exchange.c++:1168` (see splitKjLogText()).
public:
  explicit LogCallback(const Logger& logger);
  void logMessage(kj::LogSeverity severity, const char* file, int line, int contextDepth,
                  kj::String&& text) override;

private:
  const Logger& logger;
};

kj::String formatLogLine(LogLevel level, kj::StringPtr message, kj::StringPtr fields);
// One line with the current UTC time and a trailing newline (exposed for tests).

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
// The value as is if it is non-empty and has no space, '"', '\\', '=' or control character;
// otherwise in double quotes with '"' and '\\' backslash-escaped and control characters as \n,
// \r, \t or \xHH. Log lines therefore never contain a newline from a value.

}  // namespace cfqt::observe
