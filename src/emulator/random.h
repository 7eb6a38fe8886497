// Random identifiers the emulator hands out: tunnel UUIDs, secrets, account tags, hostnames,
// Cf-Ray ids and connection UUIDs. All bytes come from GnuTLS's CSPRNG.

#pragma once

#include <kj/array.h>
#include <kj/common.h>
#include <kj/string.h>

namespace cfqt::emulator {

kj::Array<kj::byte> randomBytes(size_t count);
// `count` bytes from gnutls_rnd(GNUTLS_RND_RANDOM). Throws FAILED only if the RNG fails.

kj::Array<kj::byte> randomUuidBytes();
// 16 bytes of a version 4, RFC 4122 variant UUID.

kj::String formatUuid(kj::ArrayPtr<const kj::byte> bytes);
// Canonical lower-case 36-character form. `bytes` must hold 16 bytes (caller's precondition).

kj::Maybe<kj::Array<kj::byte>> parseUuid(kj::StringPtr text);
// Canonical 36-character form (any case) to 16 bytes; null when malformed.

kj::String randomHex(size_t byteCount);
// 2 * byteCount lower-case hex digits.

kj::String randomHostname(kj::StringPtr zone);
// Four random words joined by '-', then '.' and `zone` (e.g. "amber-river-quiet-lamp.<zone>").

bool equalsIgnoreCase(kj::StringPtr a, kj::StringPtr b);
kj::String toLower(kj::StringPtr text);

}  // namespace cfqt::emulator
