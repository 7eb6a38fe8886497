// The admin HTTP API: what tests need to look inside the emulator and to inject faults.
//
//   GET  /tunnels                          {"tunnels":[{..., "connections":[...]}]}
//   GET  /connections                      {"connections":[{"id":N, ...}]}
//   POST /tunnels                          issue a quick tunnel (same JSON as the API)
//   POST /connections/N/close?code=C&reason=R     CONNECTION_CLOSE (application error C,
//                                          default 0); HTTP/2: GOAWAY (code C, debug R), TCP close
//   POST /connections/N/silence            stop answering (the client hits its idle timeout)
//   POST /connections/N/close-control[?how=reset|fin&code=C]   end the control stream while the
//                                          QUIC connection stays up: RESET_STREAM+STOP_SENDING
//                                          with C (default reset, code 0), or a clean FIN; no
//                                          unregister, no new requests to that connection
//                                          (answers {"controlClosed":N,"how":"reset","code":C};
//                                          409 if the control stream is not up)
//   POST /connections/N/withhold-credit[?stream=ID]   stop returning flow-control credit on
//                                          stream ID, or on every stream opened from now on
//   POST /connections/N/update-configuration?version=V   body: JSON config; opens an RPC
//                                          stream and calls the client's updateConfiguration
//                                          (answers {"latestAppliedVersion":N,"err":"..."})
//   POST /registrations/reject-next?cause=C&retryAfter=NANOS&shouldRetry=BOOL&count=K
//                                          the next K registrations get this ConnectionError
//                                          (count=0 clears)
//   POST /named-tunnels                    body {"name":N,"remotelyManaged":B} (both optional):
//                                          {"id","name","hostname","remotelyManaged","routes",
//                                          "token","credentials":{"AccountTag","TunnelSecret",
//                                          "TunnelID"}}; its hostname is <id>.<zone>
//   POST /named-tunnels/ID/routes          body {"hostname":H}: H is routed to the tunnel too
//   POST /named-tunnels/ID/configuration   body {"version":N,"config":{...}}: pushed
//                                          (updateConfiguration) to every live connection of
//                                          every connector; answers {"version":N,"connections":
//                                          [{"connection","connector","connIndex","result"|
//                                          "error"}]}
//   GET  /udp                              {"udpBlocked":false}
//   POST /udp/block, POST /udp/unblock     the UDP (QUIC) side drops every datagram, as behind a
//                                          firewall, or serves again (answers {"udpBlocked":B};
//                                          501 without a QUIC edge). HTTP/2 on TCP is unaffected.
// Every answer is JSON; errors are {"error":"..."} with 400/404/405/409.

#pragma once

#include "registry.h"

#include <kj/compat/http.h>
#include <kj/compat/url.h>

namespace cfqt::emulator {

class UdpSwitch {
  // The emulator's UDP (QUIC) edge as the admin API sees it.
public:
  virtual bool udpBlocked() = 0;
  virtual void setUdpBlocked(bool blocked) = 0;
  // Throws if the QUIC endpoints cannot be bound again.
};

class AdminService final: public kj::HttpService {
public:
  AdminService(Registry& registry, const kj::HttpHeaderTable& table,
               kj::Maybe<UdpSwitch&> udp = nullptr)
      : registry(registry), table(table), udp(udp) {}

  kj::Promise<void> request(kj::HttpMethod method, kj::StringPtr url,
                            const kj::HttpHeaders& headers, kj::AsyncInputStream& requestBody,
                            Response& response) override;

private:
  Registry& registry;
  const kj::HttpHeaderTable& table;
  kj::Maybe<UdpSwitch&> udp;

  kj::Promise<kj::String> pushConfiguration(kj::uint id, int32_t version, kj::String json);
  kj::Promise<kj::String> pushToTunnel(IssuedTunnel& tunnel, int32_t version, kj::String json);
  kj::Promise<void> namedTunnels(kj::HttpMethod method, const kj::Url& url,
                                 kj::AsyncInputStream& requestBody, Response& response);
};

kj::String connectionJson(ConnectionRecord& record);
kj::String tunnelsJson(Registry& registry);
kj::String connectionsJson(Registry& registry);

}  // namespace cfqt::emulator
