#pragma once
// Logging for the cfqt product (PROTOCOL.md §1.4, §8.7): cloudflared-style console lines
// `2026-11-25T10:56:58Z INF Registered tunnel connection connIndex=0 ...` on stderr and/or a log
// file, and a kj::ExceptionCallback that routes the lower layers' KJ_LOG lines to the same place.

#include <kj/exception.h>
#include <kj/io.h>
#include <kj/string.h>

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
};

class Logger {
  // Thread-safe (const methods, one write(2) per line). Owned by main() or cfqt::Tunnel and
  // borrowed by everything that logs.
public:
  explicit Logger(LogConfig config);
  // Opens the log file (throws FAILED with the path if it can't).
  KJ_DISALLOW_COPY(Logger);

  bool enabled(LogLevel level) const { return level >= config.level; }
  void log(LogLevel level, kj::StringPtr message, kj::StringPtr fields = nullptr) const;
  // `fields` is "key=value key=value" (already formatted); never pass secrets.

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

private:
  LogConfig config;
  kj::Maybe<kj::AutoCloseFd> file;
};

class LogCallback final: public kj::ExceptionCallback {
  // Installed (as a stack object) on every thread that runs cfqt code: KJ_LOG(INFO) of the lower
  // layers becomes a DBG line, WARNING a WRN line, ERROR an ERR line. Also sets KJ's own log
  // level so that INFO is only produced when the logger wants debug.
public:
  explicit LogCallback(const Logger& logger);
  void logMessage(kj::LogSeverity severity, const char* file, int line, int contextDepth,
                  kj::String&& text) override;

private:
  const Logger& logger;
};

kj::String formatLogLine(LogLevel level, kj::StringPtr message, kj::StringPtr fields);
// One line with the current UTC time and a trailing newline (exposed for tests).

}  // namespace cfqt::observe
