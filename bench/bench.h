#pragma once
// Shared plumbing of cfqt-bench: how a suite prints its figures, and the suites' entry points.

#include <kj/string.h>
#include <stdio.h>

namespace cfqt::bench {

class Reporter {
public:
  void figure(kj::StringPtr name, double value, kj::StringPtr unit) {
    // One line per figure, `name value unit`, flushed at once so a long suite shows progress.
    printf("%s %.6g %s\n", name.cStr(), value, unit.cStr());
    fflush(stdout);
  }
};

// One function per suite, each defined in bench/<suite>-bench.c++.
void runWireBench(Reporter& reporter);
void runOriginBench(Reporter& reporter);
void runQuicBench(Reporter& reporter);

}  // namespace cfqt::bench
