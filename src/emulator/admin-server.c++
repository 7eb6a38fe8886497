#include "admin-server.h"

#include "api-server.h"
#include "json.h"
#include "random.h"

#include <capnp/compat/json.h>
#include <capnp/message.h>
#include <kj/compat/url.h>
#include <kj/debug.h>
#include <kj/encoding.h>

#include <string.h>

namespace cfqt::emulator {

namespace {

constexpr uint64_t MAX_CONFIG_BYTES = 1024 * 1024;

kj::Maybe<uint64_t> parseUnsigned(kj::StringPtr text) {
  if (text.size() == 0 || text.size() > 19) return nullptr;
  uint64_t value = 0;
  for (char c: text) {
    if (c < '0' || c > '9') return nullptr;
    value = value * 10 + static_cast<uint64_t>(c - '0');
  }
  return value;
}

kj::Maybe<int64_t> parseSigned(kj::StringPtr text) {
  if (text.startsWith("-")) {
    KJ_IF_MAYBE(v, parseUnsigned(text.slice(1))) return -static_cast<int64_t>(*v);
    return nullptr;
  }
  KJ_IF_MAYBE(v, parseUnsigned(text)) return static_cast<int64_t>(*v);
  return nullptr;
}

kj::Maybe<bool> parseBool(kj::StringPtr text) {
  if (text == "true" || text == "1" || text == "yes") return true;
  if (text == "false" || text == "0" || text == "no") return false;
  return nullptr;
}

kj::Maybe<kj::StringPtr> queryParam(const kj::Url& url, kj::StringPtr name) {
  for (auto& param: url.query) {
    if (param.name == name) return param.value.asPtr();
  }
  return nullptr;
}

kj::String featuresJson(kj::ArrayPtr<const kj::String> features) {
  kj::Vector<kj::String> items;
  for (auto& f: features) items.add(jsonString(f));
  return kj::str('[', kj::strArray(items, ","), ']');
}

class Reply {
public:
  Reply(kj::HttpService::Response& response, const kj::HttpHeaderTable& table)
      : response(response), table(table) {}

  kj::Promise<void> send(kj::uint status, kj::StringPtr statusText, kj::String body) {
    kj::HttpHeaders headers(table);
    headers.set(kj::HttpHeaderId::CONTENT_TYPE, "application/json");
    auto out = response.send(status, statusText, headers, body.size());
    auto promise = out->write(body.begin(), body.size());
    return promise.attach(kj::mv(out), kj::mv(body));
  }
  kj::Promise<void> ok(kj::String body) { return send(200, "OK", kj::mv(body)); }
  kj::Promise<void> error(kj::uint status, kj::StringPtr statusText, kj::StringPtr message) {
    return send(status, statusText, kj::str("{\"error\":", jsonString(message), "}"));
  }

private:
  kj::HttpService::Response& response;
  const kj::HttpHeaderTable& table;
};

// Decodes an untrusted JSON body; null when it is not a JSON object.
kj::Maybe<kj::Own<capnp::MallocMessageBuilder>> parseJsonObject(kj::StringPtr text) {
  auto message = kj::heap<capnp::MallocMessageBuilder>();
  bool ok = false;
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
    capnp::JsonCodec codec;
    codec.setMaxNestingDepth(32);
    auto root = message->initRoot<capnp::JsonValue>();
    codec.decodeRaw(text, root);
    ok = root.isObject();
  })) {
    return nullptr;
  }
  if (!ok) return nullptr;
  return kj::mv(message);
}

kj::Maybe<capnp::JsonValue::Reader> member(capnp::JsonValue::Reader object, kj::StringPtr name) {
  if (!object.isObject()) return nullptr;
  kj::Maybe<capnp::JsonValue::Reader> found;
  for (auto field: object.getObject()) {
    if (field.getName() == name) found = field.getValue();
  }
  return found;
}

kj::String namedTunnelJson(IssuedTunnel& tunnel) {
  auto credentials = kj::str(
      "{\"AccountTag\":", jsonString(tunnel.accountTag),
      ",\"TunnelSecret\":", jsonString(tunnel.secretBase64),
      ",\"TunnelID\":", jsonString(tunnel.id), '}');
  // cloudflared's TunnelToken: {"a": account tag, "s": base64 secret, "t": tunnel ID}, base64.
  auto tokenJson = kj::str("{\"a\":", jsonString(tunnel.accountTag),
                           ",\"s\":", jsonString(tunnel.secretBase64),
                           ",\"t\":", jsonString(tunnel.id), '}');
  kj::Vector<kj::String> routes;
  for (auto& r: tunnel.routes) routes.add(jsonString(r));
  return kj::str("{\"id\":", jsonString(tunnel.id), ",\"name\":", jsonString(tunnel.name),
                 ",\"hostname\":", jsonString(tunnel.hostname),
                 ",\"remotelyManaged\":", tunnel.remotelyManaged ? "true" : "false",
                 ",\"routes\":[", kj::strArray(routes, ","), ']',
                 ",\"token\":", jsonString(kj::encodeBase64(tokenJson.asBytes())),
                 ",\"credentials\":", credentials, '}');
}

}  // namespace

kj::String connectionJson(ConnectionRecord& record) {
  kj::String stats = kj::str("null");
  KJ_IF_MAYBE(c, record.connection) stats = c->describeStats();
  kj::String config = kj::str("null");
  KJ_IF_MAYBE(json, record.configuration) config = jsonString(*json);
  return kj::str(
      "{\"id\":", record.id,
      ",\"tunnelId\":", jsonString(record.tunnel.id),
      ",\"hostname\":", jsonString(record.tunnel.hostname),
      ",\"connIndex\":", record.connIndex,
      ",\"uuid\":", jsonString(formatUuid(record.uuid)),
      ",\"state\":", jsonString(toString(record.state)),
      ",\"clientId\":", jsonString(record.clientId),
      ",\"version\":", jsonString(record.version),
      ",\"arch\":", jsonString(record.arch),
      ",\"features\":", featuresJson(record.features),
      ",\"numPreviousAttempts\":", record.numPreviousAttempts,
      ",\"remote\":", jsonString(record.remoteAddress),
      ",\"protocol\":", jsonString(record.protocol),
      ",\"requests\":", record.requests,
      ",\"failed\":", record.failed,
      ",\"configuration\":", config,
      ",\"stats\":", stats, '}');
}

kj::String connectionsJson(Registry& registry) {
  kj::Vector<kj::String> items;
  for (auto& record: registry.connections()) items.add(connectionJson(*record));
  return kj::str("{\"connections\":[", kj::strArray(items, ","), "]}");
}

kj::String tunnelsJson(Registry& registry) {
  kj::Vector<kj::String> tunnels;
  for (auto& tunnel: registry.tunnels()) {
    kj::Vector<kj::String> connections;
    for (auto& record: registry.connections()) {
      if (&record->tunnel == tunnel.get()) connections.add(connectionJson(*record));
    }
    // Connectors: one per client ID (a replica), with its live connections' admin ids.
    kj::Vector<kj::String> connectorIds;
    kj::Vector<kj::Vector<kj::uint>> connectorLive;
    kj::Vector<kj::Vector<kj::uint>> connectorAll;
    for (auto& record: registry.connections()) {
      if (&record->tunnel != tunnel.get()) continue;
      size_t i = 0;
      while (i < connectorIds.size() && connectorIds[i] != record->clientId) i++;
      if (i == connectorIds.size()) {
        connectorIds.add(kj::heapString(record->clientId));
        connectorLive.add();
        connectorAll.add();
      }
      connectorAll[i].add(record->id);
      if (record->state == ConnectionState::REGISTERED && record->connection != nullptr) {
        connectorLive[i].add(record->id);
      }
    }
    kj::Vector<kj::String> connectors;
    for (size_t i = 0; i < connectorIds.size(); i++) {
      connectors.add(kj::str("{\"id\":", jsonString(connectorIds[i]),
                             ",\"liveConnections\":[", kj::strArray(connectorLive[i], ","),
                             "],\"connections\":[", kj::strArray(connectorAll[i], ","), "]}"));
    }
    kj::Vector<kj::String> routes;
    for (auto& r: tunnel->routes) routes.add(jsonString(r));
    tunnels.add(kj::str(
        "{\"id\":", jsonString(tunnel->id),
        ",\"name\":", jsonString(tunnel->name),
        ",\"hostname\":", jsonString(tunnel->hostname),
        ",\"account_tag\":", jsonString(tunnel->accountTag),
        ",\"named\":", tunnel->named ? "true" : "false",
        ",\"remotelyManaged\":", tunnel->remotelyManaged ? "true" : "false",
        ",\"routes\":[", kj::strArray(routes, ","), ']',
        ",\"connectors\":[", kj::strArray(connectors, ","), ']',
        ",\"connections\":[", kj::strArray(connections, ","), "]}"));
  }
  return kj::str("{\"tunnels\":[", kj::strArray(tunnels, ","), "]}");
}

kj::Promise<kj::String> AdminService::pushConfiguration(kj::uint id, int32_t version,
                                                        kj::String json) {
  KJ_IF_MAYBE(record, registry.findConnection(id)) {
    KJ_IF_MAYBE(connection, record->connection) {
      return connection->pushConfiguration(version, kj::mv(json));
    }
  }
  return KJ_EXCEPTION(DISCONNECTED, "the connection closed");
}

kj::Promise<kj::String> AdminService::pushToTunnel(IssuedTunnel& tunnel, int32_t version,
                                                  kj::String json) {
  // Every live connection of every connector gets the push; the answer lists what each said.
  kj::Vector<kj::Promise<kj::String>> pushes;
  for (auto& record: registry.connections()) {
    if (&record->tunnel != &tunnel || record->state != ConnectionState::REGISTERED) continue;
    KJ_IF_MAYBE(connection, record->connection) {
      auto prefix = kj::str("{\"connection\":", record->id, ",\"connector\":",
                            jsonString(record->clientId), ",\"connIndex\":", record->connIndex);
      auto errorPrefix = kj::str(prefix);
      pushes.add(connection->pushConfiguration(version, kj::str(json))
          .then([prefix = kj::mv(prefix)](kj::String answer) {
            return kj::str(prefix, ",\"result\":", answer, '}');
          }, [prefix = kj::mv(errorPrefix)](kj::Exception&& e) {
            return kj::str(prefix, ",\"error\":", jsonString(e.getDescription()), '}');
          }));
    }
  }
  return kj::joinPromises(pushes.releaseAsArray()).then([version](kj::Array<kj::String> all) {
    return kj::str("{\"version\":", version, ",\"connections\":[", kj::strArray(all, ","),
                   "]}");
  });
}

kj::Promise<void> AdminService::namedTunnels(kj::HttpMethod method, const kj::Url& url,
                                             kj::AsyncInputStream& requestBody,
                                             Response& response) {
  Reply reply(response, table);
  if (method != kj::HttpMethod::POST) return reply.error(405, "Method Not Allowed", "use POST");
  auto& path = url.path;
  IssuedTunnel* tunnel = nullptr;
  if (path.size() >= 2) {
    KJ_IF_MAYBE(t, registry.findByIdText(path[1])) tunnel = t;
    if (tunnel == nullptr || !tunnel->named) {
      return reply.error(404, "Not Found", "no such named tunnel");
    }
  }
  if (path.size() == 2) return reply.error(404, "Not Found", "use /routes or /configuration");
  kj::String action = path.size() == 3 ? kj::str(path[2]) : kj::str("");
  if (path.size() == 3 && action != "routes" && action != "configuration") {
    return reply.error(404, "Not Found", "unknown named-tunnel action");
  }
  return requestBody.readAllText(MAX_CONFIG_BYTES)
      .then([this, tunnel, reply, action = kj::mv(action)](kj::String body) mutable
                -> kj::Promise<void> {
    kj::Own<capnp::MallocMessageBuilder> message;
    KJ_IF_MAYBE(m, parseJsonObject(body.size() == 0 && tunnel == nullptr ? "{}"_kj : body)) {
      message = kj::mv(*m);
    } else {
      return reply.error(400, "Bad Request", "the body must be a JSON object");
    }
    auto root = message->getRoot<capnp::JsonValue>().asReader();
    if (tunnel == nullptr) {
      kj::String name = kj::str("");
      bool remotelyManaged = false;
      KJ_IF_MAYBE(v, member(root, "name")) {
        if (!v->isString()) return reply.error(400, "Bad Request", "name must be a string");
        name = kj::str(v->getString());
      }
      KJ_IF_MAYBE(v, member(root, "remotelyManaged")) {
        if (!v->isBoolean()) {
          return reply.error(400, "Bad Request", "remotelyManaged must be true or false");
        }
        remotelyManaged = v->getBoolean();
      }
      if (name.size() > 255) return reply.error(400, "Bad Request", "name is too long");
      if (registry.tunnels().size() >= Registry::MAX_TUNNELS) {
        return reply.error(409, "Conflict", "too many tunnels");
      }
      return reply.ok(namedTunnelJson(registry.issueNamedTunnel(name, remotelyManaged)));
    }
    if (action == "routes") {
      KJ_IF_MAYBE(v, member(root, "hostname")) {
        if (v->isString()) {
          KJ_IF_MAYBE(error, registry.addRoute(*tunnel, v->getString())) {
            return reply.error(409, "Conflict", *error);
          }
          return reply.ok(namedTunnelJson(*tunnel));
        }
      }
      return reply.error(400, "Bad Request", "the body must be {\"hostname\":\"...\"}");
    }
    // configuration: {"version":N,"config":{...}}
    int64_t version = 0;
    KJ_IF_MAYBE(v, member(root, "version")) {
      if (!v->isNumber() || v->getNumber() != static_cast<double>(static_cast<int64_t>(
                                                  v->getNumber())) ||
          v->getNumber() < INT32_MIN || v->getNumber() > INT32_MAX) {
        return reply.error(400, "Bad Request", "version must be a 32-bit integer");
      }
      version = static_cast<int64_t>(v->getNumber());
    } else {
      return reply.error(400, "Bad Request", "the body must be {\"version\":N,\"config\":{...}}");
    }
    kj::String config;
    KJ_IF_MAYBE(v, member(root, "config")) {
      capnp::JsonCodec codec;
      config = codec.encodeRaw(*v);
    } else {
      return reply.error(400, "Bad Request", "the body must be {\"version\":N,\"config\":{...}}");
    }
    auto stored = kj::str(config);
    return pushToTunnel(*tunnel, static_cast<int32_t>(version), kj::mv(config))
        .then([reply, tunnel, version, stored = kj::mv(stored)](kj::String answer) mutable {
      // What joining connectors get (as Cloudflare's edge, which keeps the tunnel's
      // configuration): the newest version that a connection applied, or any newer one while no
      // connection is live. A lower or refused one is not kept.
      auto applied = kj::str("\"result\":{\"latestAppliedVersion\":", version,
                             ",\"err\":\"\"}");
      bool none = answer.endsWith("\"connections\":[]}");
      bool accepted = strstr(answer.cStr(), applied.cStr()) != nullptr;
      if ((none || accepted) &&
          (tunnel->remoteConfig == nullptr || version > tunnel->remoteVersion)) {
        tunnel->remoteConfig = kj::mv(stored);
        tunnel->remoteVersion = static_cast<int32_t>(version);
      }
      return reply.ok(kj::mv(answer));
    });
  });
}

kj::Promise<void> AdminService::request(kj::HttpMethod method, kj::StringPtr url,
                                        const kj::HttpHeaders& headers,
                                        kj::AsyncInputStream& requestBody, Response& response) {
  Reply reply(response, table);
  kj::Url parsed;
  KJ_IF_MAYBE(u, kj::Url::tryParse(url, kj::Url::HTTP_REQUEST)) {
    parsed = kj::mv(*u);
  } else {
    return reply.error(400, "Bad Request", "unparseable URL");
  }
  auto& path = parsed.path;

  if (path.size() == 1 && path[0] == "tunnels") {
    if (method == kj::HttpMethod::GET) return reply.ok(tunnelsJson(registry));
    if (method == kj::HttpMethod::POST) return reply.ok(quickTunnelJson(registry.issueTunnel()));
    return reply.error(405, "Method Not Allowed", "use GET or POST");
  }
  if (path.size() == 2 && path[0] == "tunnels" && path[1] == "next-hostname") {
    if (method != kj::HttpMethod::POST) return reply.error(405, "Method Not Allowed", "use POST");
    KJ_IF_MAYBE(hostname, queryParam(parsed, "hostname")) {
      registry.setNextHostname(kj::str(*hostname));
      return reply.ok(kj::str("{\"nextHostname\":", jsonString(*hostname), '}'));
    }
    return reply.error(400, "Bad Request", "hostname is required");
  }
  if (path.size() >= 1 && path.size() <= 3 && path[0] == "named-tunnels") {
    return namedTunnels(method, parsed, requestBody, response);
  }
  if (path.size() == 1 && path[0] == "connections") {
    if (method != kj::HttpMethod::GET) return reply.error(405, "Method Not Allowed", "use GET");
    return reply.ok(connectionsJson(registry));
  }
  if (path.size() >= 1 && path.size() <= 2 && path[0] == "udp") {
    UdpSwitch* udpSwitch = nullptr;
    KJ_IF_MAYBE(u, udp) udpSwitch = u;
    if (udpSwitch == nullptr) return reply.error(501, "Not Implemented", "no UDP (QUIC) edge");
    if (path.size() == 1) {
      if (method != kj::HttpMethod::GET) return reply.error(405, "Method Not Allowed", "use GET");
    } else {
      if (method != kj::HttpMethod::POST) return reply.error(405, "Method Not Allowed", "use POST");
      if (path[1] != "block" && path[1] != "unblock") {
        return reply.error(404, "Not Found", "use /udp/block or /udp/unblock");
      }
      KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
        udpSwitch->setUdpBlocked(path[1] == "block");
      })) {
        return reply.error(500, "Internal Server Error", e->getDescription());
      }
    }
    return reply.ok(kj::str("{\"udpBlocked\":", udpSwitch->udpBlocked() ? "true" : "false", '}'));
  }
  if (path.size() == 2 && path[0] == "registrations" && path[1] == "reject-next") {
    if (method != kj::HttpMethod::POST) return reply.error(405, "Method Not Allowed", "use POST");
    RegistrationError error{kj::str("Unauthorized: rejected by the emulator"), 0, false};
    KJ_IF_MAYBE(cause, queryParam(parsed, "cause")) error.cause = kj::str(*cause);
    KJ_IF_MAYBE(text, queryParam(parsed, "retryAfter")) {
      KJ_IF_MAYBE(v, parseSigned(*text)) {
        error.retryAfterNanos = *v;
      } else {
        return reply.error(400, "Bad Request", "retryAfter must be an integer (nanoseconds)");
      }
    }
    KJ_IF_MAYBE(text, queryParam(parsed, "shouldRetry")) {
      KJ_IF_MAYBE(v, parseBool(*text)) {
        error.shouldRetry = *v;
      } else {
        return reply.error(400, "Bad Request", "shouldRetry must be true or false");
      }
    }
    uint64_t count = 1;
    KJ_IF_MAYBE(text, queryParam(parsed, "count")) {
      KJ_IF_MAYBE(v, parseUnsigned(*text)) {
        count = *v;
      } else {
        return reply.error(400, "Bad Request", "count must be a non-negative integer");
      }
    }
    if (count > 1000000) count = 1000000;
    auto body = kj::str("{\"armed\":", count, ",\"cause\":", jsonString(error.cause),
                        ",\"retryAfter\":", error.retryAfterNanos,
                        ",\"shouldRetry\":", error.shouldRetry ? "true" : "false", '}');
    registry.rejectNextRegistrations(kj::mv(error), static_cast<kj::uint>(count));
    return reply.ok(kj::mv(body));
  }
  if (path.size() == 3 && path[0] == "connections") {
    if (method != kj::HttpMethod::POST) return reply.error(405, "Method Not Allowed", "use POST");
    ConnectionRecord* record = nullptr;
    KJ_IF_MAYBE(id, parseUnsigned(path[1])) {
      if (*id <= 0xffffffffull) {
        KJ_IF_MAYBE(r, registry.findConnection(static_cast<kj::uint>(*id))) record = r;
      }
    }
    if (record == nullptr) return reply.error(404, "Not Found", "no such connection");
    ClientConnection* connection = nullptr;
    KJ_IF_MAYBE(c, record->connection) connection = c;
    if (connection == nullptr) return reply.error(409, "Conflict", "connection already closed");

    if (path[2] == "close") {
      uint64_t code = 0;
      KJ_IF_MAYBE(text, queryParam(parsed, "code")) {
        KJ_IF_MAYBE(v, parseUnsigned(*text)) {
          code = *v;
        } else {
          return reply.error(400, "Bad Request", "code must be a non-negative integer");
        }
      }
      kj::String reason = kj::str("closed by the emulator's admin API");
      KJ_IF_MAYBE(text, queryParam(parsed, "reason")) reason = kj::str(*text);
      connection->close(code, reason);
      return reply.ok(kj::str("{\"closed\":", record->id, '}'));
    }
    if (path[2] == "close-control") {
      auto how = ClientConnection::ControlEnd::RESET;
      KJ_IF_MAYBE(text, queryParam(parsed, "how")) {
        if (*text == "fin") {
          how = ClientConnection::ControlEnd::FIN;
        } else if (*text != "reset") {
          return reply.error(400, "Bad Request", "how must be reset or fin");
        }
      }
      uint64_t code = 0;
      KJ_IF_MAYBE(text, queryParam(parsed, "code")) {
        KJ_IF_MAYBE(v, parseUnsigned(*text)) {
          code = *v;
        } else {
          return reply.error(400, "Bad Request", "code must be a non-negative integer");
        }
      }
      if (code >= (uint64_t(1) << 62)) {
        return reply.error(400, "Bad Request", "code must be below 2^62");
      }
      if (!connection->closeControlStream(how, code)) {
        return reply.error(409, "Conflict", "the control stream is not up");
      }
      bool reset = how == ClientConnection::ControlEnd::RESET;
      return reply.ok(kj::str("{\"controlClosed\":", record->id, ",\"how\":\"",
                              reset ? "reset" : "fin", "\",\"code\":", reset ? code : 0, '}'));
    }
    if (path[2] == "silence" || path[2] == "go-silent") {
      connection->goSilent();
      return reply.ok(kj::str("{\"silent\":", record->id, '}'));
    }
    if (path[2] == "update-configuration") {
      int64_t version = 0;
      KJ_IF_MAYBE(text, queryParam(parsed, "version")) {
        KJ_IF_MAYBE(v, parseSigned(*text)) {
          version = *v;
        } else {
          return reply.error(400, "Bad Request", "version must be an integer");
        }
      }
      if (version < INT32_MIN || version > INT32_MAX) {
        return reply.error(400, "Bad Request", "version out of range");
      }
      // The connection may end while the body is read: look it up again afterwards. Once the
      // push started, its promise is rejected if the connection dies.
      return requestBody.readAllText(MAX_CONFIG_BYTES)
          .then([this, id = record->id, version](kj::String json) {
        return pushConfiguration(id, static_cast<int32_t>(version), kj::mv(json));
      }).then([reply](kj::String result) mutable {
        return reply.ok(kj::mv(result));
      }, [reply](kj::Exception&& e) mutable {
        return reply.error(502, "Bad Gateway", e.getDescription());
      });
    }
    if (path[2] == "withhold-credit") {
      kj::Maybe<int64_t> streamId;
      KJ_IF_MAYBE(text, queryParam(parsed, "stream")) {
        KJ_IF_MAYBE(v, parseUnsigned(*text)) {
          streamId = static_cast<int64_t>(*v);
        } else {
          return reply.error(400, "Bad Request", "stream must be a stream id");
        }
      }
      if (!connection->withholdCredit(streamId)) {
        return reply.error(404, "Not Found", "no such stream");
      }
      return reply.ok(kj::str("{\"withheld\":", record->id, '}'));
    }
    return reply.error(404, "Not Found", "unknown connection action");
  }
  return reply.error(404, "Not Found", "unknown admin path");
}

}  // namespace cfqt::emulator
