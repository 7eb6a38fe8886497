#pragma once
// Shared plumbing of cfqt-bench: how a suite prints its figures, and the suites' entry points.

#include <kj/common.h>
#include <kj/string.h>
#include <stdint.h>
#include <stdio.h>

namespace cfqt::bench {

struct Options {
  // Command-line options; a suite reads those it knows and ignores the rest.
  kj::String protocol = kj::str("quic");   // tunnel: --protocol quic|http2
  unsigned haConnections = 2;              // tunnel: --ha-connections N
  uint64_t requests = 20000;               // tunnel: --requests N (concurrency-64 phase)
  unsigned serialRounds = 20;              // tunnel: --serial-rounds N (x 100 serial GETs each way)
  bool cacert = false;                     // tunnel: --cacert (not the default trust roots)
  kj::Maybe<kj::String> cfqt;              // tunnel: --cfqt PATH (default: next to cfqt-bench)
  bool spin = false;                       // tunnel: --spin (the serial phase's waits poll)
  bool startupOnly = false;                // tunnel: --startup-only (reg_ms and idle RSS only)
  unsigned launches = 5;                   // tunnel: --launches N (reg_ms is their median)
  bool memoryOnly = false;                 // tunnel: --memory-only (idle RSS before/after load)
  kj::Maybe<kj::String> idleHook;          // tunnel: --idle-hook CMD (run at each idle point)
};

class Reporter {
public:
  Options options;

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
void runTunnelBench(Reporter& reporter);

}  // namespace cfqt::bench
