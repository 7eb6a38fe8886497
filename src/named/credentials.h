#pragma once
// Named-tunnel credentials (PROTOCOL.md §4.2 TunnelAuth): what a tunnel token or a credentials
// file holds, parsed from untrusted text into one clear line per mistake. The secret is never
// part of an error text, a log line or toString().
//
//   token:            base64(JSON {"a": account tag, "t": tunnel UUID, "s": base64(secret)})
//   credentials file: {"AccountTag": ..., "TunnelSecret": base64(secret), "TunnelID": UUID}

#include <kj/array.h>
#include <kj/one-of.h>
#include <kj/string.h>

namespace cfqt::named {

struct TunnelCredentials {
  kj::String accountTag;
  kj::Array<kj::byte> tunnelSecret;   // raw bytes (never log them)
  kj::Array<kj::byte> tunnelId;       // 16 bytes

  kj::String tunnelIdText() const;    // canonical lower-case UUID
  TunnelCredentials clone() const;
};

kj::OneOf<TunnelCredentials, kj::String> parseToken(kj::StringPtr token);
// `cfqt tunnel run --token T` / TUNNEL_TOKEN. Surrounding white space is ignored. The error text
// starts with "Provided Tunnel token is not valid" and says what is wrong and what to do.

kj::OneOf<TunnelCredentials, kj::String> parseCredentialsJson(kj::StringPtr json,
                                                              kj::StringPtr source);
// A credentials file's content (`--credentials-contents`, or a file's text). Keys match
// case-insensitively, as Go's decoder does. `source` names it in errors (a path, or
// "--credentials-contents").

kj::OneOf<TunnelCredentials, kj::String> readCredentialsFile(kj::StringPtr path);
// Reads and parses `--credentials-file` (at most 64 KiB). Errors name the path.

kj::String encodeToken(const TunnelCredentials& credentials);
// The token cloudflared's dashboard shows for these credentials (keys "a", "s", "t").

kj::String credentialsFileJson(const TunnelCredentials& credentials);
// {"AccountTag":...,"TunnelSecret":...,"TunnelID":...}

}  // namespace cfqt::named
