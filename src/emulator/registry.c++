#include "registry.h"

#include "random.h"

#include <kj/debug.h>
#include <kj/encoding.h>

namespace cfqt::emulator {

namespace {

bool sameBytes(kj::ArrayPtr<const kj::byte> a, kj::ArrayPtr<const kj::byte> b) {
  return a.size() == b.size() && (a.size() == 0 || memcmp(a.begin(), b.begin(), a.size()) == 0);
}

kj::String describeClientId(kj::ArrayPtr<const kj::byte> bytes) {
  if (bytes.size() == 16) return formatUuid(bytes);
  return kj::encodeHex(bytes);
}

}  // namespace

kj::Promise<kj::Own<TunnelExchange>> ClientConnection::openExchange() {
  return openStream().then([](kj::Own<kj::AsyncIoStream> stream) {
    return quicExchange(kj::mv(stream));
  });
}

bool ClientConnection::closeControlStream(ControlEnd how, uint64_t code) { return false; }

kj::Promise<kj::String> ClientConnection::pushConfiguration(int32_t version, kj::String json) {
  return KJ_EXCEPTION(UNIMPLEMENTED, "this connection cannot push configuration");
}

kj::StringPtr toString(ConnectionState state) {
  switch (state) {
    case ConnectionState::REGISTERED: return "registered";
    case ConnectionState::UNREGISTERED: return "unregistered";
    case ConnectionState::CLOSED: return "closed";
  }
  KJ_UNREACHABLE;
}

Registry::Registry(kj::StringPtr zone, kj::StringPtr locationName)
    : zoneName(toLower(zone)), location(kj::heapString(locationName)) {}

IssuedTunnel& Registry::issueTunnel() {
  if (tunnelList.size() >= MAX_TUNNELS) {
    kj::throwFatalException(KJ_EXCEPTION(OVERLOADED, "too many quick tunnels issued"));
  }
  auto tunnel = kj::heap<IssuedTunnel>();
  tunnel->idBytes = randomUuidBytes();
  tunnel->id = formatUuid(tunnel->idBytes);
  tunnel->name = kj::str("qt-", tunnel->id.slice(0, 8));
  KJ_IF_MAYBE(forced, nextHostname) {
    tunnel->hostname = kj::mv(*forced);
    nextHostname = nullptr;
  } else {
    do {
      tunnel->hostname = randomHostname(zoneName);
    } while (findByHostname(tunnel->hostname) != nullptr);
  }
  tunnel->accountTag = randomHex(16);
  tunnel->secret = randomBytes(32);
  tunnel->secretBase64 = kj::encodeBase64(tunnel->secret);
  auto& result = *tunnel;
  tunnelList.add(kj::mv(tunnel));
  return result;
}

IssuedTunnel& Registry::issueNamedTunnel(kj::StringPtr name, bool remotelyManaged) {
  auto& tunnel = issueTunnel();
  tunnel.named = true;
  tunnel.remotelyManaged = remotelyManaged;
  if (name.size() > 0) tunnel.name = kj::str(name);
  tunnel.hostname = kj::str(tunnel.id, '.', zoneName);
  return tunnel;
}

kj::Maybe<kj::String> Registry::addRoute(IssuedTunnel& tunnel, kj::StringPtr hostname) {
  if (hostname.size() == 0 || hostname.size() > 253) {
    return kj::str("hostname must be 1 to 253 characters");
  }
  for (char c: hostname) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '-' || c == '.';
    if (!ok) return kj::str("hostname may hold only letters, digits, '-' and '.'");
  }
  KJ_IF_MAYBE(other, findByHostname(hostname)) {
    if (other == &tunnel) return nullptr;
    return kj::str("hostname is routed to another tunnel");
  }
  if (tunnel.routes.size() >= 1000) return kj::str("too many routes for this tunnel");
  tunnel.routes.add(toLower(hostname));
  return nullptr;
}

kj::Maybe<IssuedTunnel&> Registry::findByHostname(kj::StringPtr host) {
  for (auto& tunnel: tunnelList) {
    if (equalsIgnoreCase(tunnel->hostname, host)) return *tunnel;
    for (auto& route: tunnel->routes) {
      if (equalsIgnoreCase(route, host)) return *tunnel;
    }
  }
  return nullptr;
}

kj::Maybe<IssuedTunnel&> Registry::findByIdText(kj::StringPtr id) {
  KJ_IF_MAYBE(bytes, parseUuid(id)) return findById(*bytes);
  return nullptr;
}

kj::Maybe<IssuedTunnel&> Registry::findById(kj::ArrayPtr<const kj::byte> id) {
  for (auto& tunnel: tunnelList) {
    if (sameBytes(tunnel->idBytes, id)) return *tunnel;
  }
  return nullptr;
}

kj::OneOf<ConnectionRecord*, RegistrationError> Registry::registerConnection(
    ClientConnection& connection, const RegistrationRequest& request) {
  KJ_IF_MAYBE(injected, injectedError) {
    RegistrationError error{kj::heapString(injected->cause), injected->retryAfterNanos,
                            injected->shouldRetry};
    if (--injectedCount == 0) injectedError = nullptr;
    return kj::mv(error);
  }

  IssuedTunnel* tunnel = nullptr;
  KJ_IF_MAYBE(t, findById(request.tunnelId)) {
    tunnel = t;
  } else {
    return RegistrationError{kj::str("Unauthorized: unknown tunnel id"), 0, false};
  }
  if (tunnel->accountTag != request.accountTag ||
      !sameBytes(tunnel->secret, request.tunnelSecret)) {
    return RegistrationError{kj::str("Unauthorized: tunnel credentials do not match"), 0, false};
  }

  // A named tunnel has many connectors (replicas), each with its own connection indices: a
  // duplicate is the same connector registering an index it already holds. A quick tunnel has one
  // connector: any second registration of an index is a duplicate.
  auto clientId = describeClientId(request.clientId);
  for (auto& record: records) {
    if (&record->tunnel == tunnel && record->connIndex == request.connIndex &&
        (!tunnel->named || record->clientId == clientId) && record->state == ConnectionState::REGISTERED) {
      if (!request.replaceExisting) {
        return RegistrationError{kj::str("EDUPCONN"), 0, true};
      }
      KJ_IF_MAYBE(old, record->connection) {
        old->close(0, "replaced by a newer registration");
      }
      record->state = ConnectionState::UNREGISTERED;
    }
  }

  auto record = kj::heap<ConnectionRecord>(ConnectionRecord{
    nextConnectionId++, *tunnel, request.connIndex, randomUuidBytes(),
    kj::mv(clientId), kj::heapString(request.version),
    kj::heapString(request.arch), KJ_MAP(f, request.features) { return kj::heapString(f); },
    request.numPreviousAttempts, connection.remoteAddress(), nullptr,
    ConnectionState::REGISTERED, connection, 0, 0, connection.protocol()});
  auto result = record.get();
  records.add(kj::mv(record));
  if (tunnel->firstRegistered == nullptr) {
    KJ_IF_MAYBE(c, clock) {
      tunnel->firstRegistered = c->now();
    } else {
      tunnel->firstRegistered = kj::origin<kj::TimePoint>();
    }
  }
  pruneClosed();
  for (auto& callback: registeredCallbacks) callback(*result);
  return result;
}

bool Registry::registeredFor(const IssuedTunnel& tunnel, kj::Duration delay) const {
  KJ_IF_MAYBE(first, tunnel.firstRegistered) {
    KJ_IF_MAYBE(c, clock) return c->now() - *first >= delay;
    return true;
  }
  return false;
}

void Registry::unregisterConnection(ConnectionRecord& record) {
  if (record.state == ConnectionState::REGISTERED) record.state = ConnectionState::UNREGISTERED;
}

void Registry::setConfiguration(ConnectionRecord& record, kj::String json) {
  record.configuration = kj::mv(json);
}

void Registry::connectionClosed(ClientConnection& connection) {
  for (auto& record: records) {
    KJ_IF_MAYBE(c, record->connection) {
      if (c == &connection) {
        record->connection = nullptr;
        record->state = ConnectionState::CLOSED;
      }
    }
  }
}

kj::Maybe<ConnectionRecord&> Registry::pick(IssuedTunnel& tunnel) {
  kj::Vector<ConnectionRecord*> live;
  for (auto& record: records) {
    if (&record->tunnel == &tunnel && record->state == ConnectionState::REGISTERED &&
        record->connection != nullptr) {
      live.add(record.get());
    }
  }
  if (live.empty()) return nullptr;
  auto& chosen = *live[tunnel.roundRobin++ % live.size()];
  chosen.requests++;
  return chosen;
}

kj::Maybe<ConnectionRecord&> Registry::findConnection(kj::uint id) {
  for (auto& record: records) {
    if (record->id == id) return *record;
  }
  return nullptr;
}

void Registry::rejectNextRegistrations(RegistrationError error, kj::uint count) {
  if (count == 0) {
    injectedError = nullptr;
    injectedCount = 0;
    return;
  }
  injectedError = kj::mv(error);
  injectedCount = count;
}

void Registry::pruneClosed() {
  size_t closed = 0;
  for (auto& record: records) {
    if (record->state == ConnectionState::CLOSED) closed++;
  }
  if (closed <= MAX_CLOSED_RECORDS) return;
  kj::Vector<kj::Own<ConnectionRecord>> kept(records.size());
  size_t toDrop = closed - MAX_CLOSED_RECORDS;
  for (auto& record: records) {
    if (toDrop > 0 && record->state == ConnectionState::CLOSED) {
      toDrop--;
      continue;
    }
    kept.add(kj::mv(record));
  }
  records = kj::mv(kept);
}

}  // namespace cfqt::emulator
