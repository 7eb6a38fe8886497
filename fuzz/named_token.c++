// libFuzzer target: a named tunnel's token (base64 JSON {"a","t","s"}) and a credentials file's
// JSON ({"AccountTag","TunnelSecret","TunnelID"}) as `cfqt tunnel run` reads them from the user,
// the environment or a file. Either parses to credentials that encode back to a token that parses
// to the same credentials, or gives one line of error text that never holds the input's secret.

#include "fuzz/fuzz-support.h"

#include "named/credentials.h"

#include <kj/one-of.h>

using namespace cfqt;

namespace {

void check(kj::OneOf<named::TunnelCredentials, kj::String> parsed) {
  KJ_SWITCH_ONEOF(parsed) {
    KJ_CASE_ONEOF(error, kj::String) {
      CFQT_FUZZ_CHECK(error.size() > 0);
      CFQT_FUZZ_CHECK(error.findFirst('\n') == nullptr);
    }
    KJ_CASE_ONEOF(credentials, named::TunnelCredentials) {
      auto token = named::encodeToken(credentials);
      auto again = named::parseToken(token);
      CFQT_FUZZ_CHECK(again.is<named::TunnelCredentials>());
      auto& back = again.get<named::TunnelCredentials>();
      CFQT_FUZZ_CHECK(back.accountTag == credentials.accountTag);
      CFQT_FUZZ_CHECK(back.tunnelSecret.asPtr() == credentials.tunnelSecret.asPtr());
      CFQT_FUZZ_CHECK(back.tunnelId.asPtr() == credentials.tunnelId.asPtr());
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto text = kj::heapString(reinterpret_cast<const char*>(data), size);
  check(named::parseToken(text));
  check(named::parseCredentialsJson(text, "fuzz.json"));
  return 0;
}
