// The quick-tunnel API (PROTOCOL.md §1.3, §10.1): `POST /tunnel` issues a tunnel from the
// Registry and answers the JSON that api.trycloudflare.com answers.

#pragma once

#include "registry.h"

#include <kj/compat/http.h>

namespace cfqt::emulator {

class ApiService final: public kj::HttpService {
public:
  ApiService(Registry& registry, const kj::HttpHeaderTable& table)
      : registry(registry), table(table) {}

  kj::Promise<void> request(kj::HttpMethod method, kj::StringPtr url,
                            const kj::HttpHeaders& headers, kj::AsyncInputStream& requestBody,
                            Response& response) override;

private:
  Registry& registry;
  const kj::HttpHeaderTable& table;
};

kj::String quickTunnelJson(const IssuedTunnel& tunnel);
// {"success":true,"result":{"id":...,"name":...,"hostname":...,"account_tag":...,"secret":...},
//  "errors":[],"messages":[]}

}  // namespace cfqt::emulator
