// The emulator's memory: quick tunnels the API issued, and the client connections registered for
// them. Registration policy (credentials, EDUPCONN, injected rejections) and the front door's
// round-robin choice of a connection live here, so both are testable without QUIC.

#pragma once

#include "tunnel-exchange.h"

#include <kj/array.h>
#include <kj/async-io.h>
#include <kj/function.h>
#include <kj/one-of.h>
#include <kj/string.h>
#include <kj/time.h>
#include <kj/vector.h>

namespace cfqt::emulator {

class ClientConnection {
  // One tunnel client's connection (QUIC, or HTTP/2 over TLS) as the rest of the emulator sees
  // it. Implemented by the QUIC edge, the HTTP/2 edge (and by fakes in tests). Owned by whoever
  // accepted the connection; it must call Registry::connectionClosed() before it dies.
public:
  virtual ~ClientConnection() noexcept(false) = default;

  virtual kj::Promise<kj::Own<kj::AsyncIoStream>> openStream() = 0;
  // QUIC: opens a server-initiated bidirectional stream. Dropping the stream before both
  // directions ended resets it. Rejects DISCONNECTED once the connection is gone. (HTTP/2 has no
  // raw streams: it rejects UNIMPLEMENTED and overrides openExchange().)

  virtual kj::Promise<kj::Own<TunnelExchange>> openExchange();
  // A new exchange for one visitor request (the front door's entry). The default runs the QUIC
  // data-stream protocol over openStream(). Rejects like openStream().

  virtual kj::StringPtr protocol() { return "quic"; }
  // "quic" or "http2" (admin API).

  virtual void close(uint64_t applicationErrorCode, kj::StringPtr reason) = 0;
  // QUIC: sends CONNECTION_CLOSE with an application error. HTTP/2: GOAWAY with the code (as an
  // HTTP/2 error code) and the reason as debug data, then the TCP connection is closed.

  virtual void goSilent() = 0;
  // Stops sending anything (and ignores what arrives), so the client hits its idle timeout.

  virtual bool withholdCredit(kj::Maybe<int64_t> streamId) = 0;
  // Stops returning flow-control credit on stream `streamId`, or on every stream opened from now
  // on when null. False if there is no such stream or the transport can't do it.

  enum class ControlEnd { RESET, FIN };
  virtual bool closeControlStream(ControlEnd how, uint64_t code);
  // Fault injection: the edge ends this connection's control stream while the QUIC connection
  // stays up. RESET: RESET_STREAM + STOP_SENDING with `code`; FIN: the edge's RPC session ends
  // and the stream gets a clean FIN (`code` unused; what the client still sends is ignored).
  // Either way without unregisterConnection, and no new requests go to this connection. False if
  // the control stream is not up (or the transport can't do it; the default).

  virtual kj::Promise<kj::String> pushConfiguration(int32_t version, kj::String json);
  // PROTOCOL.md §10.6: opens an RPC stream (signature 52 BB 82 5C DB 65), bootstraps the client's
  // CloudflaredServer and calls ConfigurationManager.updateConfiguration(version, json).
  // Resolves to {"latestAppliedVersion":N,"err":"..."} (JSON text); rejects on RPC failure.

  virtual kj::String remoteAddress() = 0;
  virtual kj::String describeStats() = 0;
  // A JSON object (text) with transport counters, for the admin API.
};

struct IssuedTunnel {
  kj::String id;                    // canonical UUID text
  kj::Array<kj::byte> idBytes;      // 16 bytes
  kj::String name;
  kj::String hostname;              // lower case
  kj::String accountTag;            // 32 hex digits
  kj::Array<kj::byte> secret;       // 32 bytes
  kj::String secretBase64;          // standard alphabet, padded
  kj::uint roundRobin = 0;
  kj::Maybe<kj::TimePoint> firstRegistered;  // when its first connection registered (with a
                                             // clock set, Registry::setClock())
  bool named = false;               // made by POST /named-tunnels (not the quick-tunnel API)
  bool remotelyManaged = false;     // registrations answer tunnelIsRemotelyManaged
  kj::Vector<kj::String> routes;    // extra public hostnames (POST /named-tunnels/ID/routes)
  kj::Maybe<kj::String> remoteConfig;  // the last pushed config (JSON), for connectors that join
  int32_t remoteVersion = 0;           // ... and its version
};

enum class ConnectionState { REGISTERED, UNREGISTERED, CLOSED };
kj::StringPtr toString(ConnectionState state);

struct RegistrationRequest {
  kj::String accountTag;
  kj::Array<kj::byte> tunnelSecret;
  kj::Array<kj::byte> tunnelId;
  uint8_t connIndex = 0;
  kj::Array<kj::byte> clientId;
  kj::Array<kj::String> features;
  kj::String version;
  kj::String arch;
  kj::Array<kj::byte> originLocalIp;
  bool replaceExisting = false;
  uint8_t numPreviousAttempts = 0;
};

struct RegistrationError {
  kj::String cause;
  int64_t retryAfterNanos = 0;
  bool shouldRetry = false;
};

struct ConnectionRecord {
  kj::uint id;                          // admin number, counting from 1
  IssuedTunnel& tunnel;
  uint8_t connIndex;
  kj::Array<kj::byte> uuid;         // 16 bytes, returned in ConnectionDetails
  kj::String clientId;              // UUID text
  kj::String version;
  kj::String arch;
  kj::Array<kj::String> features;
  uint8_t numPreviousAttempts;
  kj::String remoteAddress;
  kj::Maybe<kj::String> configuration;   // last updateLocalConfiguration payload
  ConnectionState state = ConnectionState::REGISTERED;
  kj::Maybe<ClientConnection&> connection;   // null once closed
  uint64_t requests = 0;
  uint64_t failed = 0;                       // of those, answered 502 by the front door
  kj::StringPtr protocol = "quic";           // ClientConnection::protocol(), a literal
};

class Registry {
public:
  explicit Registry(kj::StringPtr zone, kj::StringPtr locationName = "EMU");
  KJ_DISALLOW_COPY(Registry);

  IssuedTunnel& issueTunnel();
  // Creates a tunnel: random UUID, 32-byte secret, 32-hex account tag, unique hostname in the zone.

  void setNextHostname(kj::String hostname) { nextHostname = kj::mv(hostname); }
  // Fault injection (admin API): the next issued tunnel gets exactly this hostname, whatever its
  // bytes (a client must refuse one that is not a DNS name).
  IssuedTunnel& issueNamedTunnel(kj::StringPtr name, bool remotelyManaged);
  // A named tunnel: like issueTunnel(), its hostname is "<id>.<zone>"; more hostnames come from
  // addRoute(). Many connectors (client IDs) may register, each with its own connIndex set.

  kj::Maybe<kj::String> addRoute(IssuedTunnel& tunnel, kj::StringPtr hostname);
  // Routes a public hostname to the tunnel; returns the error text (taken, invalid) or null.

  kj::Maybe<IssuedTunnel&> findByHostname(kj::StringPtr host);
  // Case-insensitive, over tunnel hostnames and routes; `host` must already be stripped of any
  // port.

  kj::Maybe<IssuedTunnel&> findByIdText(kj::StringPtr id);

  kj::OneOf<ConnectionRecord*, RegistrationError> registerConnection(
      ClientConnection& connection, const RegistrationRequest& request);
  // Checks an injected rejection first, then credentials ("Unauthorized: ..."), then duplicates
  // ("EDUPCONN"). The record lives until pruned long after it was closed.

  void unregisterConnection(ConnectionRecord& record);
  // No new requests go to the record's connection.

  void setConfiguration(ConnectionRecord& record, kj::String json);

  void connectionClosed(ClientConnection& connection);
  // Marks every record of `connection` CLOSED and forgets the reference.

  kj::Maybe<ConnectionRecord&> pick(IssuedTunnel& tunnel);
  // Round-robin among the tunnel's REGISTERED connections; null when none is live.

  kj::Maybe<ConnectionRecord&> findConnection(kj::uint id);

  void setClock(const kj::MonotonicClock& clock) { this->clock = clock; }
  // Registrations then stamp IssuedTunnel::firstRegistered (the DNS and route delays count from
  // it). `clock` must outlive the registry.

  bool registeredFor(const IssuedTunnel& tunnel, kj::Duration delay) const;
  // True once `delay` has passed since the tunnel's first registration (false before any; with
  // no clock set, true once it registered).
  void onRegistered(kj::Function<void(ConnectionRecord&)> callback) {
    registeredCallbacks.add(kj::mv(callback));
  }
  // Adds a callback run on every accepted registration, in the order added, just before the
  // edge sends its answer (the emulator pushes a remotely managed tunnel's configuration with
  // one; cfqt-bench times exec -> first registration with another).

  void rejectNextRegistrations(RegistrationError error, kj::uint count = 1);
  // The next `count` registerConnection calls get `error` regardless of their credentials.

  kj::ArrayPtr<kj::Own<IssuedTunnel>> tunnels() { return tunnelList; }
  kj::ArrayPtr<kj::Own<ConnectionRecord>> connections() { return records; }
  kj::StringPtr zone() const { return zoneName; }
  kj::StringPtr locationName() const { return location; }

  static constexpr size_t MAX_TUNNELS = 100000;
  static constexpr size_t MAX_CLOSED_RECORDS = 1000;

private:
  kj::String zoneName;
  kj::String location;
  kj::Vector<kj::Own<IssuedTunnel>> tunnelList;
  kj::Maybe<kj::String> nextHostname;
  kj::Vector<kj::Own<ConnectionRecord>> records;
  kj::uint nextConnectionId = 1;
  kj::Maybe<RegistrationError> injectedError;
  kj::Vector<kj::Function<void(ConnectionRecord&)>> registeredCallbacks;
  kj::uint injectedCount = 0;
  kj::Maybe<const kj::MonotonicClock&> clock;

  kj::Maybe<IssuedTunnel&> findById(kj::ArrayPtr<const kj::byte> id);
  void pruneClosed();
};

}  // namespace cfqt::emulator
