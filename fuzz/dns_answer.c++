// libFuzzer target: a DNS answer as the client's DNS-over-TLS discovery decodes it
// (decodeSrvResponse: header checks, then c-ares parses the SRV answers), for the query id in
// the input's first two bytes most of the time, so the answers get parsed. (Debian's c-ares is
// not instrumented; the checks around it are cfqt's.) A/AAAA answers: fuzz/dns_address.c++.

#include "fuzz/fuzz-support.h"

#include "edge/dns.h"

using namespace cfqt;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto message = kj::arrayPtr(data, size);
  uint16_t id = size >= 2 ? uint16_t(data[0] << 8 | data[1]) : 0;
  if (size >= 3 && (data[2] & 0x40)) id ^= 1;   // sometimes: an answer to another query
  auto answer = edge::decodeSrvResponse(message, id);
  if (answer.error.size() == 0) {
    CFQT_FUZZ_CHECK(answer.records.size() > 0);
    for (auto& r: answer.records) CFQT_FUZZ_CHECK(!r.target.endsWith("."));
  } else {
    CFQT_FUZZ_CHECK(answer.records.size() == 0);
  }
  return 0;
}
