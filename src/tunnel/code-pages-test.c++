#include "tunnel/code-pages.h"

#include <kj/debug.h>
#include <kj/test.h>

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

namespace cfqt::tunnel {
namespace {

int writableCounter = 1;   // .data
int zeroCounter;           // .bss
const char* const RELOCATED[] = {"alpha", "beta"};   // .data.rel.ro in a position-independent build

struct Shape {
  virtual ~Shape() = default;
  virtual int sides() const = 0;   // vtables are relocated read-only data
};
struct Square final: public Shape {
  int sides() const override { return 4; }
};

bool inRanges(kj::ArrayPtr<const CodeRange> ranges, const void* p) {
  auto a = reinterpret_cast<uintptr_t>(p);
  for (auto& r: ranges) {
    if (r.begin <= a && a < r.end) return true;
  }
  return false;
}

long statusKiB(const char* field) {
  int fd = open("/proc/self/status", O_RDONLY | O_CLOEXEC);
  KJ_ASSERT(fd >= 0);
  char buffer[8192];
  ssize_t n = read(fd, buffer, sizeof(buffer) - 1);
  close(fd);
  KJ_ASSERT(n > 0);
  buffer[n] = 0;
  const char* at = strstr(buffer, field);
  KJ_ASSERT(at != nullptr, field);
  return strtol(at + strlen(field), nullptr, 10);
}

KJ_TEST("the ranges hold the code and read-only data, never what is written or relocated") {
  auto ranges = readOnlyCodeRanges(CodeScope::EXECUTABLE);
  KJ_ASSERT(ranges.size() > 0);
  uintptr_t page = sysconf(_SC_PAGESIZE);
  for (size_t i = 0; i < ranges.size(); i++) {
    KJ_ASSERT(ranges[i].begin % page == 0 && ranges[i].end % page == 0);
    KJ_ASSERT(ranges[i].begin < ranges[i].end);
    if (i > 0) {
      KJ_ASSERT(ranges[i - 1].end <= ranges[i].begin);
    }
  }
  KJ_EXPECT(inRanges(ranges, reinterpret_cast<const void*>(&statusKiB)));   // our code
  KJ_EXPECT(inRanges(ranges, "a string literal of this executable"));
  KJ_EXPECT(!inRanges(ranges, &writableCounter));
  KJ_EXPECT(!inRanges(ranges, &zeroCounter));
  KJ_EXPECT(!inRanges(ranges, &RELOCATED[0]));
  Square square;
  KJ_EXPECT(!inRanges(ranges, *reinterpret_cast<void**>(&square)));   // its vtable
  int local = 0;
  KJ_EXPECT(!inRanges(ranges, &local));

  auto all = readOnlyCodeRanges(CodeScope::ALL_OBJECTS);
  KJ_EXPECT(all.size() > ranges.size());   // libc at least
  KJ_EXPECT(inRanges(all, reinterpret_cast<const void*>(&getpid)));
  KJ_EXPECT(!inRanges(all, &errno));   // thread-local, writable
}

KJ_TEST("releasing lowers the file-backed RSS and the program runs on, its data intact") {
  writableCounter = 41;
  zeroCounter = 7;
  // Touch our code and libc's so that both are resident before the release.
  KJ_ASSERT(statusKiB("RssFile:") > 0);
  long before = statusKiB("RssFile:");
  size_t advised = releaseCodePages(CodeScope::ALL_OBJECTS);
  long after = statusKiB("RssFile:");
  KJ_EXPECT(advised > 0);
  KJ_EXPECT(after < before, before, after);

  writableCounter++;
  KJ_EXPECT(writableCounter == 42);
  KJ_EXPECT(zeroCounter == 7);
  KJ_EXPECT(kj::StringPtr(RELOCATED[1]) == "beta");
  kj::Own<Shape> shape = kj::heap<Square>();
  KJ_EXPECT(shape->sides() == 4);
  KJ_EXPECT(kj::str("code ", 42, " runs") == "code 42 runs");   // libkj and libc again
  KJ_EXPECT(releaseCodePages(CodeScope::EXECUTABLE) > 0);
  KJ_EXPECT(writableCounter == 42);
}

}  // namespace
}  // namespace cfqt::tunnel
