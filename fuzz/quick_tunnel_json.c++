// libFuzzer target: the quick-tunnel API's answer as the client decodes it: parseJson (with a
// depth limit from the first byte) and decodeQuickTunnelResponse with the status and
// Content-Type picked by the first byte, the rest being the body. A decoded tunnel must have
// what the client relies on.

#include "fuzz/fuzz-support.h"

#include "edge/json.h"
#include "edge/quick-tunnel-api.h"

using namespace cfqt;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  static constexpr kj::uint STATUSES[] = {200, 200, 200, 201, 400, 404, 429, 500};
  static constexpr kj::StringPtr TYPES[] = {"application/json"_kj, "application/json"_kj,
                                            "text/html; charset=utf-8"_kj, ""_kj};
  kj::byte selector = data[0];
  auto body = kj::arrayPtr(data + 1, size - 1);
  edge::parseJson(body, 1 + selector % 40);
  kj::Maybe<kj::StringPtr> type;
  if ((selector >> 3) % 5 != 4) type = TYPES[(selector >> 3) % 4];
  auto status = STATUSES[selector % 8];
  KJ_SWITCH_ONEOF(edge::decodeQuickTunnelResponse(status, type, body)) {
    KJ_CASE_ONEOF(tunnel, edge::QuickTunnel) {
      CFQT_FUZZ_CHECK(tunnel.hostname.size() > 0);
      CFQT_FUZZ_CHECK(tunnel.tunnelId.size() == 16);
      CFQT_FUZZ_CHECK(tunnel.secret.size() > 0);
    }
    KJ_CASE_ONEOF(error, edge::QuickTunnelError) {}
  }
  auto text = kj::heapString(reinterpret_cast<const char*>(body.begin()), body.size());
  edge::parseUuid(text);
  edge::decodeStdBase64Padded(text);
  return 0;
}
