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
    {"tunnel", runTunnelBench, "the cfqt client alone: in-process edge -> cfqt child -> origin"},
};

class BenchMain {
public:
  explicit BenchMain(kj::ProcessContext& context): context(context) {}

  kj::MainFunc getMain() {
    return kj::MainBuilder(context, "cfqt-bench 0.1", "Runs cfqt's benchmarks.")
        .addOptionWithArg({"protocol"}, KJ_BIND_METHOD(*this, setProtocol), "<quic|http2>",
                          "tunnel: the client's --protocol (default quic).")
        .addOptionWithArg({"ha-connections"}, KJ_BIND_METHOD(*this, setHa), "<n>",
                          "tunnel: the client's --ha-connections (default 2).")
        .addOptionWithArg({"requests"}, KJ_BIND_METHOD(*this, setRequests), "<n>",
                          "tunnel: requests of the concurrency-64 phase (default 20000).")
        .addOptionWithArg({"serial-rounds"}, KJ_BIND_METHOD(*this, setSerialRounds), "<n>",
                          "tunnel: rounds of 100 serial GETs through the tunnel and 100 "
                          "straight to the origin (default 20; more to profile that phase).")
        .addOption({"cacert"}, [this]() { options.cacert = true; return true; },
                   "tunnel: give the client --cacert instead of its default trust roots "
                   "(the default needs root: a mount namespace adds the emulator's CA to the "
                   "system store).")
        .addOptionWithArg({"cfqt"}, KJ_BIND_METHOD(*this, setCfqt), "<path>",
                          "tunnel: the client binary (default: cfqt next to cfqt-bench).")
        .addOption({"spin"}, [this]() { options.spin = true; return true; },
                   "tunnel: while the serial phase waits for each answer (tunnelled or direct), "
                   "this process polls instead of sleeping, so the edge side never pays a "
                   "wake-up of this VM's idle CPU, as a real edge on another machine would not "
                   "(a measurement aid; the origin process still sleeps).")
        .addOption({"startup-only"}, [this]() { options.startupOnly = true; return true; },
                   "tunnel: only the start-up figures (reg_ms, idle RSS), no load phases.")
        .addOptionWithArg({"launches"}, KJ_BIND_METHOD(*this, setLaunches), "<n>",
                          "tunnel: client launches whose median is reg_ms (default 5).")
        .addOption({"memory-only"}, [this]() { options.memoryOnly = true; return true; },
                   "tunnel: the start-up figures, then idle RSS after one request and after "
                   "--requests at concurrency 64 (no serial or bulk phase).")
        .addOptionWithArg({"idle-hook"}, KJ_BIND_METHOD(*this, setIdleHook), "<command>",
                          "tunnel: run this shell command at each idle point (environment: "
                          "CFQT_CLIENT_PID, CFQT_IDLE_STAGE=startup|after1|afterload), e.g. "
                          "bench/rss-map --snapshot.")
        .expectZeroOrMoreArgs("<suite>", KJ_BIND_METHOD(*this, addSuite))
        .callAfterParsing(KJ_BIND_METHOD(*this, run))
        .build();
  }

private:
  kj::ProcessContext& context;
  kj::Vector<const Suite*> selected;
  Options options;

  kj::MainBuilder::Validity setProtocol(kj::StringPtr value) {
    if (value != "quic" && value != "http2") return "--protocol is quic or http2";
    options.protocol = kj::str(value);
    return true;
  }
  kj::MainBuilder::Validity setHa(kj::StringPtr value) {
    KJ_IF_MAYBE(n, parseCount(value)) {
      if (*n >= 1 && *n <= 4) {
        options.haConnections = *n;
        return true;
      }
    }
    return "--ha-connections is 1 to 4";
  }
  kj::MainBuilder::Validity setRequests(kj::StringPtr value) {
    KJ_IF_MAYBE(n, parseCount(value)) {
      if (*n >= 64) {
        options.requests = *n;
        return true;
      }
    }
    return "--requests is a number >= 64";
  }
  kj::MainBuilder::Validity setSerialRounds(kj::StringPtr value) {
    KJ_IF_MAYBE(n, parseCount(value)) {
      if (*n >= 1 && *n <= 100000) {
        options.serialRounds = *n;
        return true;
      }
    }
    return "--serial-rounds is 1 to 100000";
  }
  kj::MainBuilder::Validity setLaunches(kj::StringPtr value) {
    KJ_IF_MAYBE(n, parseCount(value)) {
      if (*n >= 1 && *n <= 1000) {
        options.launches = *n;
        return true;
      }
    }
    return "--launches is 1 to 1000";
  }
  kj::MainBuilder::Validity setIdleHook(kj::StringPtr value) {
    options.idleHook = kj::str(value);
    return true;
  }
  kj::MainBuilder::Validity setCfqt(kj::StringPtr value) {
    options.cfqt = kj::str(value);
    return true;
  }
  static kj::Maybe<uint64_t> parseCount(kj::StringPtr value) {
    if (value.size() == 0 || value.size() > 12) return nullptr;
    uint64_t n = 0;
    for (char c: value) {
      if (c < '0' || c > '9') return nullptr;
      n = n * 10 + (c - '0');
    }
    return n;
  }

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
    reporter.options = kj::mv(options);
    for (auto suite: selected) suite->run(reporter);
    return true;
  }
};

}  // namespace
}  // namespace cfqt::bench

KJ_MAIN(cfqt::bench::BenchMain)
