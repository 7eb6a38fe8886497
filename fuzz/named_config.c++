// libFuzzer target: a named tunnel's configuration as YAML or JSON text (the --config file, or a
// remote configuration pushed by the edge), then its ingress rules validated as the router would
// build them. Errors are text ("<source>:<line>: <what>"), never an exception or a crash.
// (Debian's yaml-cpp is not instrumented; the checks around it are cfqt's.)

#include "fuzz/fuzz-support.h"

#include "named/config.h"
#include "named/ingress.h"

#include <kj/one-of.h>

using namespace cfqt;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto text = kj::heapString(reinterpret_cast<const char*>(data), size);
  auto parsed = named::parseConfig(text, "fuzz.yml");
  KJ_SWITCH_ONEOF(parsed) {
    KJ_CASE_ONEOF(error, kj::String) {
      CFQT_FUZZ_CHECK(error.startsWith("fuzz.yml"));
    }
    KJ_CASE_ONEOF(config, named::TunnelConfig) {
      KJ_IF_MAYBE(error, named::validateIngress(config.ingress)) {
        CFQT_FUZZ_CHECK(error->size() > 0);
      }
    }
  }
  return 0;
}
