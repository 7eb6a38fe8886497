#include "named/credentials.h"

#include "edge/json.h"
#include "edge/quick-tunnel-api.h"

#include <kj/debug.h>
#include <kj/encoding.h>
#include <kj/filesystem.h>
#include <kj/vector.h>

namespace cfqt::named {

namespace {

constexpr size_t MAX_TOKEN_BYTES = 16 * 1024;
constexpr size_t MAX_CREDENTIALS_BYTES = 64 * 1024;

kj::String jsonQuote(kj::StringPtr text) {
  kj::Vector<char> out(text.size() + 2);
  out.add('"');
  for (char c: text) {
    if (c == '"' || c == '\\') {
      out.add('\\');
      out.add(c);
    } else if (static_cast<unsigned char>(c) < 0x20) {
      static const char HEX[] = "0123456789abcdef";
      out.addAll(kj::StringPtr("\\u00"));
      out.add(HEX[(c >> 4) & 0xf]);
      out.add(HEX[c & 0xf]);
    } else {
      out.add(c);
    }
  }
  out.add('"');
  out.add('\0');
  return kj::String(out.releaseAsArray());
}

using Lookup = kj::Maybe<const edge::JsonValue&> (edge::JsonValue::*)(kj::StringPtr) const;

// Reads the three fields from a decoded JSON object; `prefix` starts every error.
kj::OneOf<TunnelCredentials, kj::String> fromJson(const edge::JsonValue& root, kj::StringPtr prefix,
                                                  kj::StringPtr accountKey,
                                                  kj::StringPtr secretKey, kj::StringPtr idKey,
                                                  Lookup lookup, kj::StringPtr fix) {
  if (root.kind != edge::JsonValue::Kind::OBJECT) {
    return kj::str(prefix, ": it is not a JSON object; ", fix);
  }
  auto field = [&](kj::StringPtr key, kj::StringPtr what) -> kj::OneOf<kj::StringPtr, kj::String> {
    KJ_IF_MAYBE(v, (root.*lookup)(key)) {
      if (v->kind != edge::JsonValue::Kind::STRING) {
        return kj::str(prefix, ": ", what, " (\"", key, "\") is not a string; ", fix);
      }
      if (v->string.size() == 0) {
        return kj::str(prefix, ": ", what, " (\"", key, "\") is empty; ", fix);
      }
      return v->string.asPtr();
    }
    return kj::str(prefix, ": ", what, " (\"", key, "\") is missing; ", fix);
  };

  TunnelCredentials result;
  auto account = field(accountKey, "the account tag");
  if (account.is<kj::String>()) return kj::mv(account.get<kj::String>());
  result.accountTag = kj::heapString(account.get<kj::StringPtr>());

  auto id = field(idKey, "the tunnel ID");
  if (id.is<kj::String>()) return kj::mv(id.get<kj::String>());
  KJ_IF_MAYBE(bytes, edge::parseUuid(id.get<kj::StringPtr>())) {
    result.tunnelId = kj::mv(*bytes);
  } else {
    return kj::str(prefix, ": the tunnel ID (\"", idKey, "\") is not a UUID; ", fix);
  }

  auto secret = field(secretKey, "the tunnel secret");
  if (secret.is<kj::String>()) return kj::mv(secret.get<kj::String>());
  KJ_IF_MAYBE(bytes, edge::decodeStdBase64Padded(secret.get<kj::StringPtr>())) {
    if (bytes->size() == 0) {
      return kj::str(prefix, ": the tunnel secret (\"", secretKey, "\") is empty; ", fix);
    }
    result.tunnelSecret = kj::mv(*bytes);
  } else {
    // Never echo the secret, not even a piece of it.
    return kj::str(prefix, ": the tunnel secret (\"", secretKey,
                   "\") is not standard base64; ", fix);
  }
  return kj::mv(result);
}

}  // namespace

kj::String TunnelCredentials::tunnelIdText() const { return edge::formatUuid(tunnelId); }

TunnelCredentials TunnelCredentials::clone() const {
  return {kj::heapString(accountTag), kj::heapArray<kj::byte>(tunnelSecret),
          kj::heapArray<kj::byte>(tunnelId)};
}

kj::OneOf<TunnelCredentials, kj::String> parseToken(kj::StringPtr tokenParam) {
  constexpr kj::StringPtr PREFIX = "Provided Tunnel token is not valid"_kj;
  constexpr kj::StringPtr FIX =
      "copy the whole token again (Zero Trust dashboard: Networks > Tunnels > your tunnel > "
      "the install command's --token value)"_kj;
  size_t begin = 0;
  size_t end = tokenParam.size();
  auto space = [](char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n'; };
  while (begin < end && space(tokenParam[begin])) begin++;
  while (end > begin && space(tokenParam[end - 1])) end--;
  if (begin == end) return kj::str(PREFIX, ": it is empty; ", FIX);
  if (end - begin > MAX_TOKEN_BYTES) {
    return kj::str(PREFIX, ": it is ", end - begin, " bytes long, more than a token can be; ",
                   FIX);
  }
  auto token = kj::heapString(tokenParam.slice(begin, end));
  kj::Array<kj::byte> decoded;
  KJ_IF_MAYBE(bytes, edge::decodeStdBase64Padded(token)) {
    decoded = kj::mv(*bytes);
  } else {
    return kj::str(PREFIX, ": it is not standard base64 (it may be truncated or contain a "
                   "stray character); ", FIX);
  }
  KJ_IF_MAYBE(root, edge::parseJson(decoded)) {
    return fromJson(*root, PREFIX, "a", "s", "t", &edge::JsonValue::get, FIX);
  }
  return kj::str(PREFIX, ": it does not decode to a JSON object with \"a\", \"t\" and \"s\" "
                 "(it may be truncated); ", FIX);
}

kj::OneOf<TunnelCredentials, kj::String> parseCredentialsJson(kj::StringPtr json,
                                                              kj::StringPtr source) {
  auto prefix = kj::str("Invalid tunnel credentials in ", source);
  constexpr kj::StringPtr FIX =
      "use the <tunnel-UUID>.json file `cloudflared tunnel create` wrote, or a --token"_kj;
  KJ_IF_MAYBE(root, edge::parseJson(json.asBytes())) {
    return fromJson(*root, prefix, "AccountTag", "TunnelSecret", "TunnelID",
                    &edge::JsonValue::getIgnoringCase, FIX);
  }
  return kj::str(prefix, ": it is not valid JSON (", json.size() == 0 ? "it is empty" : "truncated?",
                 "); ", FIX);
}

kj::OneOf<TunnelCredentials, kj::String> readCredentialsFile(kj::StringPtr pathText) {
  auto fs = kj::newDiskFilesystem();
  kj::String text;
  bool tooBig = false;
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
    auto path = fs->getCurrentPath().evalNative(pathText);
    auto file = fs->getRoot().openFile(path);
    auto size = file->stat().size;
    if (size > MAX_CREDENTIALS_BYTES) {
      tooBig = true;
      return;
    }
    text = file->readAllText();
  })) {
    return kj::str("Tunnel credentials file '", pathText,
                   "' doesn't exist or is not a readable file; give the path of the "
                   "<tunnel-UUID>.json file `cloudflared tunnel create` wrote");
  }
  if (tooBig) {
    return kj::str("Tunnel credentials file '", pathText, "' is over 64 KiB: it is not a "
                   "credentials file");
  }
  return parseCredentialsJson(text, kj::str("'", pathText, "'"));
}

kj::String encodeToken(const TunnelCredentials& c) {
  auto json = kj::str("{\"a\":", jsonQuote(c.accountTag), ",\"s\":\"",
                      kj::encodeBase64(c.tunnelSecret), "\",\"t\":\"", c.tunnelIdText(), "\"}");
  return kj::encodeBase64(json.asBytes());
}

kj::String credentialsFileJson(const TunnelCredentials& c) {
  return kj::str("{\"AccountTag\":", jsonQuote(c.accountTag), ",\"TunnelSecret\":\"",
                 kj::encodeBase64(c.tunnelSecret), "\",\"TunnelID\":\"", c.tunnelIdText(), "\"}");
}

}  // namespace cfqt::named
