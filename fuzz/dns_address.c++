// libFuzzer target: an A or AAAA answer as the readiness probe's DNS-over-TLS lookup decodes it
// (decodeAddressResponse: header checks, then c-ares parses the answers, CNAMEs followed). The
// input's first byte picks the family; the query id is the next two bytes most of the time, so
// the answers get parsed. (Debian's c-ares is not instrumented; the checks around it are cfqt's.)

#include "fuzz/fuzz-support.h"

#include "edge/dns.h"

using namespace cfqt;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  bool ipv6 = data[0] & 1;
  auto message = kj::arrayPtr(data + 1, size - 1);
  uint16_t id = size >= 3 ? uint16_t(data[1] << 8 | data[2]) : 0;
  if (size >= 4 && (data[3] & 0x40)) id ^= 1;   // sometimes: an answer to another query
  auto answer = edge::decodeAddressResponse(message, id, ipv6);
  if (answer.error.size() == 0) {
    CFQT_FUZZ_CHECK(answer.addresses.size() > 0 && answer.addresses.size() <= 32);
    for (auto& a: answer.addresses) {
      CFQT_FUZZ_CHECK(a.size() > 0 && a.size() < 46);
      CFQT_FUZZ_CHECK((a.findFirst(':') != nullptr) == ipv6);
    }
  } else {
    CFQT_FUZZ_CHECK(answer.addresses.size() == 0);
  }
  return 0;
}
