#pragma once
// Control-stream RPC (PROTOCOL.md §4) and the edge-opened RPC streams (§6.8), over any
// kj::AsyncIoStream (a QUIC stream in production, a kj::newTwoWayPipe() end in tests).
//
// - ControlClient: cfqt's end of the control stream. Two-party RPC (Side::CLIENT) that bootstraps
//   the edge's RegistrationServer and exports a stub CloudflaredServer (every method answers
//   UNIMPLEMENTED) in case the edge bootstraps us.
// - ControlServer: the edge's end, for the emulator. Serves RegistrationServer (Side::SERVER) with
//   a pluggable RegistrationPolicy and reports to a ControlObserver. Never bootstraps the client.
// - CloudflaredServerImpl / serveCloudflaredRpc(): the client's answer on an edge-opened stream
//   that began with RPC_STREAM_SIGNATURE (the signature already consumed).

#include "wire/tunnelrpc.capnp.h"

#include <capnp/rpc-twoparty.h>
#include <kj/async-io.h>
#include <kj/one-of.h>
#include <kj/string.h>
#include <kj/time.h>
#include <kj/timer.h>

#include <mutex>

namespace cfqt::wire {

constexpr kj::StringPtr DUPLICATE_CONNECTION_CAUSE = "EDUPCONN"_kj;

kj::Array<kj::String> defaultFeatures();
// §4.3: allow_remote_config, serialized_headers, support_datagram_v2, support_quic_eof,
// management_logs (the set stock cloudflared sends).

struct RegistrationParams {
  // The values of registerConnection(auth, tunnelId, connIndex, options) (§4.2).
  kj::String accountTag;
  kj::Array<kj::byte> tunnelSecret;    // raw secret bytes (never log them)
  kj::Array<kj::byte> tunnelId;        // 16 bytes, RFC 4122 order
  uint8_t connIndex = 0;
  kj::Array<kj::byte> clientId;        // 16 bytes, connector ID
  kj::Array<kj::String> features = defaultFeatures();
  kj::String version;                  // e.g. "2023.7.3"
  kj::String arch;                     // e.g. "linux_amd64"
  kj::Array<kj::byte> originLocalIp;   // 16 bytes (IPv4-mapped for IPv4): the edge address dialed
  bool replaceExisting = false;
  uint8_t compressionQuality = 0;
  uint8_t numPreviousAttempts = 0;

  void writeTo(schema::RegistrationServer::RegisterConnectionParams::Builder params) const;
  static RegistrationParams readFrom(
      schema::RegistrationServer::RegisterConnectionParams::Reader params);
  // readFrom() throws a kj::Exception on malformed capnp (in an RPC method that becomes an
  // exception answer to the caller, never a crash).
};

struct ConnectionDetails {
  kj::Array<kj::byte> uuid;            // 16 bytes, the connection's UUID
  kj::String locationName;             // colo, e.g. "LHR"
  bool tunnelIsRemotelyManaged = false;
};

struct RegistrationError {
  kj::String cause;                    // ConnectionError.cause; cloudflared's error text
  kj::Duration retryAfter = 0 * kj::NANOSECONDS;  // ConnectionError.retryAfter (ns on the wire)
  bool shouldRetry = false;

  bool isDuplicate() const { return cause == DUPLICATE_CONNECTION_CAUSE; }
  // The exact cause "EDUPCONN": cloudflared tries another edge address.
};

using RegistrationResult = kj::OneOf<ConnectionDetails, RegistrationError>;

// =============================================================================================
// Client side

RegistrationResult decodeRegistrationResponse(schema::ConnectionResponse::Reader response);
// The edge's answer to registerConnection (what ControlClient resolves with). Throws a
// kj::Exception (wire MALFORMED) for a uuid that is not 16 bytes or an unknown variant, and
// whatever capnp throws for malformed bytes.

struct ControlClientOptions {
  kj::Duration callTimeout = 15 * kj::SECONDS;
  // Per call. On expiry the call is cancelled (Finish sent) and the promise rejects with
  // OVERLOADED "wire: control: <method> timed out after <d>".
  uint64_t traversalLimitWords = 1024 * 1024;  // ReaderOptions for messages from the edge (8 MiB)
};

class ControlClient {
public:
  ControlClient(kj::AsyncIoStream& stream, kj::Timer& timer, ControlClientOptions options = {});
  // Borrows `stream` and `timer`; both must outlive this object. Starts the RPC session at once:
  // the Bootstrap message is queued by the constructor and calls are pipelined on its answer, as
  // cloudflared does. Destroying it drops the session (no Release/Abort is guaranteed; the owner
  // closes the stream).
  KJ_DISALLOW_COPY(ControlClient);
  ~ControlClient() noexcept(false);

  kj::Promise<RegistrationResult> registerConnection(const RegistrationParams& params);
  // Resolves to the edge's ConnectionDetails or its ConnectionError (a normal answer, not an
  // exception). Rejects on RPC failure (capnp exception from the edge, DISCONNECTED when the
  // stream dies), on timeout (OVERLOADED), or with FAILED "wire: MALFORMED: ..." when the details
  // carry a uuid that is not 16 bytes (cloudflared treats that as an RPC error).
  // `params` is copied into the request before this returns.

  kj::Promise<void> unregisterConnection();
  kj::Promise<void> updateLocalConfiguration(kj::ArrayPtr<const kj::byte> json);
  // `json` is copied before this returns. Both reject like registerConnection().

  kj::Promise<void> onDisconnect();
  // Resolves when the RPC session's stream ends or fails (each call returns a new branch).

private:
  kj::Timer& timer;
  ControlClientOptions options;
  capnp::TwoPartyVatNetwork network;
  capnp::RpcSystem<capnp::rpc::twoparty::VatId> rpcSystem;
  schema::RegistrationServer::Client registration;

  template <typename T>
  kj::Promise<T> withTimeout(kj::StringPtr method, kj::Promise<T> promise);
};

// =============================================================================================
// Edge side (emulator)

class RegistrationPolicy {
public:
  virtual kj::Promise<RegistrationResult> decide(const RegistrationParams& params) = 0;
  // Accept: resolve to ConnectionDetails. Reject: RegistrationError{cause, retryAfter,
  // shouldRetry}; duplicate: duplicateConnection(). A rejected promise becomes a capnp exception
  // answer; a promise that never resolves simulates a hung edge.
};

RegistrationError duplicateConnection(kj::Duration retryAfter = 0 * kj::NANOSECONDS,
                                      bool shouldRetry = true);
// RegistrationError{"EDUPCONN", retryAfter, shouldRetry}.

class FixedRegistrationPolicy final: public RegistrationPolicy {
  // Answers every registration the same way (copies the configured result each time).
public:
  explicit FixedRegistrationPolicy(RegistrationResult result);
  kj::Promise<RegistrationResult> decide(const RegistrationParams& params) override;
  void setResult(RegistrationResult result);

private:
  RegistrationResult result;
};

class ControlObserver {
  // The ControlServer's owner hears about every call here (after the policy decided, for
  // registrations). Default implementations do nothing. Called on the event loop thread.
public:
  virtual void registered(const RegistrationParams& params, const RegistrationResult& result) {}
  virtual void unregistered() {}
  virtual void configurationUpdated(kj::ArrayPtr<const kj::byte> json) {}
};

struct ControlServerOptions {
  uint64_t traversalLimitWords = 64 * 1024;  // per incoming message (512 KiB)
  size_t flowLimitWords = 1024 * 1024;        // RpcSystem::setFlowLimit(): bounded in-flight calls
};

class ControlServer {
public:
  ControlServer(kj::AsyncIoStream& stream, RegistrationPolicy& policy, ControlObserver& observer,
                ControlServerOptions options = {});
  // Borrows all three; they must outlive this object. Serves at once (Side::SERVER), exporting a
  // RegistrationServer as bootstrap (calls pipelined on the bootstrap answer work too).
  KJ_DISALLOW_COPY(ControlServer);
  ~ControlServer() noexcept(false);

  kj::Promise<void> onDisconnect();
  // Resolves when the client closed or aborted the session (each call returns a new branch).

private:
  capnp::TwoPartyVatNetwork network;
  capnp::RpcSystem<capnp::rpc::twoparty::VatId> rpcSystem;
};

// =============================================================================================
// Edge-opened RPC streams: the client serves CloudflaredServer (§6.8)

class ConfigurationHandler {
public:
  virtual kj::Maybe<kj::String> applyConfiguration(int32_t version,
                                                    kj::ArrayPtr<const kj::byte> json) = 0;
  // Apply a remote configuration (JSON, already checked to parse as a JSON value). Returns null on
  // success, else the error text returned to the edge.
};

class RemoteConfigState {
  // The per-tunnel state behind updateConfiguration: the latest applied version (initially -1).
public:
  explicit RemoteConfigState(kj::Maybe<ConfigurationHandler&> handler = nullptr);

  struct Result {
    int32_t latestAppliedVersion;
    kj::String err;  // "" on success
  };
  Result update(int32_t version, kj::ArrayPtr<const kj::byte> json);
  // version <= current: {current, ""} (nothing applied). Otherwise the JSON must parse (else
  // {current, "<parse error>"}); then the handler applies it ({version, ""} or {current, err}).
  // Without a handler: {current, "remote configuration is not supported"}.

  int32_t currentVersion() const;
  // Both thread-safe: connections on several threads (--threads) share one state; updates are
  // applied one at a time.

private:
  kj::Maybe<ConfigurationHandler&> handler;
  mutable std::mutex mutex;   // guards `current` and serializes update()
  int32_t current = -1;
};

class CloudflaredServerImpl final: public schema::CloudflaredServer::Server {
  // registerUdpSession -> RegisterUdpSessionResponse{err = "UDP sessions not supported"};
  // unregisterUdpSession -> returns normally; updateConfiguration -> RemoteConfigState::update().
public:
  explicit CloudflaredServerImpl(RemoteConfigState& config);  // borrows; must outlive this

protected:
  kj::Promise<void> registerUdpSession(RegisterUdpSessionContext context) override;
  kj::Promise<void> unregisterUdpSession(UnregisterUdpSessionContext context) override;
  kj::Promise<void> updateConfiguration(UpdateConfigurationContext context) override;

private:
  RemoteConfigState& config;
};

struct ServeRpcOptions {
  kj::Maybe<kj::Timer&> timer;
  kj::Duration maxDuration = 5 * kj::SECONDS;
  // With a timer, the session is served at most maxDuration (HEAD's --rpc-timeout), then the
  // promise resolves; without one, until the edge ends the session (2023.7.3).
  uint64_t traversalLimitWords = 64 * 1024;
};

kj::Promise<void> serveCloudflaredRpc(kj::AsyncIoStream& stream, RemoteConfigState& config,
                                      ServeRpcOptions options = {});
// Serves CloudflaredServerImpl as bootstrap (Side::SERVER) on a stream whose RPC_STREAM_SIGNATURE
// was already read. Resolves when the edge ends the session (EOF or Abort) or maxDuration passed;
// the caller then closes the stream. `stream` and `config` must outlive the promise.

}  // namespace cfqt::wire
