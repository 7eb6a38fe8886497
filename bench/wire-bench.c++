// Wire codec micro-benchmark (placeholder until the codec lands).

#include "bench.h"

namespace cfqt::bench {

void runWireBench(Reporter& reporter) {}

}  // namespace cfqt::bench
