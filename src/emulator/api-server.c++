#include "api-server.h"

#include "json.h"
#include "observe/log.h"

#include <kj/debug.h>

namespace cfqt::emulator {

namespace {

kj::StringPtr pathOf(kj::StringPtr url) {
  // The request target may be absolute ("http://host/tunnel") or origin-form ("/tunnel?x").
  kj::StringPtr rest = url;
  if (!url.startsWith("/")) {
    KJ_IF_MAYBE(scheme, url.findFirst(':')) {
      rest = url.slice(*scheme + 1);
      if (rest.startsWith("//")) {
        rest = rest.slice(2);
        KJ_IF_MAYBE(slash, rest.findFirst('/')) {
          rest = rest.slice(*slash);
        } else {
          rest = "/";
        }
      }
    }
  }
  return rest;
}

bool pathIs(kj::StringPtr url, kj::StringPtr expected) {
  auto path = pathOf(url);
  KJ_IF_MAYBE(q, path.findFirst('?')) {
    return path.slice(0, *q) == expected;
  }
  return path == expected;
}

kj::Promise<void> sendJson(kj::HttpService::Response& response, kj::uint status,
                           kj::StringPtr statusText, const kj::HttpHeaderTable& table,
                           kj::String body) {
  kj::HttpHeaders headers(table);
  headers.set(kj::HttpHeaderId::CONTENT_TYPE, "application/json");
  auto stream = response.send(status, statusText, headers, body.size());
  auto promise = stream->write(body.begin(), body.size());
  return promise.attach(kj::mv(stream), kj::mv(body));
}

}  // namespace

kj::String quickTunnelJson(const IssuedTunnel& tunnel) {
  return kj::str(
      "{\"success\":true,\"result\":{\"id\":", jsonString(tunnel.id),
      ",\"name\":", jsonString(tunnel.name),
      ",\"hostname\":", jsonString(tunnel.hostname),
      ",\"account_tag\":", jsonString(tunnel.accountTag),
      ",\"secret\":", jsonString(tunnel.secretBase64),
      "},\"errors\":[],\"messages\":[]}");
}

kj::Promise<void> ApiService::request(kj::HttpMethod method, kj::StringPtr url,
                                      const kj::HttpHeaders& headers,
                                      kj::AsyncInputStream& requestBody, Response& response) {
  if (!pathIs(url, "/tunnel")) {
    return sendJson(response, 404, "Not Found", table,
        kj::str("{\"success\":false,\"result\":null,\"errors\":[{\"code\":7003,"
                "\"message\":\"No route for that URI\"}]}"));
  }
  if (method != kj::HttpMethod::POST) {
    return sendJson(response, 405, "Method Not Allowed", table,
        kj::str("{\"success\":false,\"result\":null,\"errors\":[{\"code\":10405,"
                "\"message\":\"Method not allowed\"}]}"));
  }
  auto& tunnel = registry.issueTunnel();
  observe::logDebug("issued quick tunnel", observe::Fields().add("tunnelId", tunnel.id)
      .add("hostname", tunnel.hostname));
  // The body (normally empty) is ignored; kj::HttpServer discards what we leave unread.
  return sendJson(response, 200, "OK", table, quickTunnelJson(tunnel));
}

}  // namespace cfqt::emulator
