// cfqt-bench: runs the named benchmark suites (all when none is named) and prints one figure per
// line as `name value unit`, so scripts can grep them.

#include "bench.h"

#include <kj/main.h>
#include <kj/string.h>
#include <kj/vector.h>

namespace cfqt::bench {
namespace {

struct Suite {
  kj::StringPtr name;
  void (*run)(Reporter&);
  kj::StringPtr help;
};

// Every suite, in the order `cfqt-bench` runs them when no suite is named.
const Suite SUITES[] = {
    {"wire", runWireBench, "encode+decode of ConnectRequest (20 headers) / ConnectResponse (10)"},
    {"origin", runOriginBench, "Origin::serveStream to a loopback kj HTTP server: req/s, MB/s"},
    {"quic", runQuicBench, "QUIC loopback: 1 GiB bulk vs TLS/TCP, streams/s, serial RTT"},
};

class BenchMain {
public:
  explicit BenchMain(kj::ProcessContext& context): context(context) {}

  kj::MainFunc getMain() {
    return kj::MainBuilder(context, "cfqt-bench 0.1", "Runs cfqt's benchmarks.")
        .expectZeroOrMoreArgs("<suite>", KJ_BIND_METHOD(*this, addSuite))
        .callAfterParsing(KJ_BIND_METHOD(*this, run))
        .build();
  }

private:
  kj::ProcessContext& context;
  kj::Vector<const Suite*> selected;

  kj::MainBuilder::Validity addSuite(kj::StringPtr name) {
    for (auto& suite: SUITES) {
      if (suite.name == name) {
        selected.add(&suite);
        return true;
      }
    }
    kj::Vector<kj::StringPtr> names;
    for (auto& suite: SUITES) names.add(suite.name);
    return kj::str("unknown suite '", name, "'; known: ", kj::strArray(names, ", "));
  }

  kj::MainBuilder::Validity run() {
    if (selected.empty()) {
      for (auto& suite: SUITES) selected.add(&suite);
    }
    Reporter reporter;
    for (auto suite: selected) suite->run(reporter);
    return true;
  }
};

}  // namespace
}  // namespace cfqt::bench

KJ_MAIN(cfqt::bench::BenchMain)
