#include "observe/log.h"

#include <kj/debug.h>

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

Logger::Logger(LogConfig configParam): config(kj::mv(configParam)) {
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

}  // namespace

void Logger::log(LogLevel level, kj::StringPtr message, kj::StringPtr fields) const {
  if (!enabled(level)) return;
  auto line = formatLogLine(level, message, fields);
  if (config.toStderr) writeAll(STDERR_FILENO, line);
  KJ_IF_MAYBE(fd, file) writeAll(fd->get(), line);
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
  auto body = kj::heapString(text.begin(), len);
  logger.log(level, body, kj::str("src=", base, ':', line));
}

}  // namespace cfqt::observe
