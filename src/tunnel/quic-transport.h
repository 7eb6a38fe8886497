#pragma once
// EdgeTransport over QUIC (src/quic): one UDP endpoint and connection per edge connection, the
// client-opened control stream, and edge-opened streams read as data-stream preambles (the
// ConnectRequest, PROTOCOL.md §6.1) or capnp-rpc streams (§6.8).

#include "tunnel/transport.h"

#include "edge/edge-address.h"
#include "quic/config.h"
#include "quic/connection.h"

#include <kj/async-unix.h>

namespace cfqt::tunnel {

kj::Promise<kj::Own<EdgeTransport>> dialQuicTransport(kj::UnixEventPort& eventPort,
                                                      const edge::EdgeAddress& address,
                                                      quic::ClientConfig config);
// Opens a UDP socket and dials `address`. Rejects with the reason (the socket could not be
// opened, the handshake failed or timed out: quic::classifyException() tells which).

kj::String describeClose(const quic::CloseInfo& info);
// "edge closed the connection (application error 0x0, reason "...")" etc. for the logs.

}  // namespace cfqt::tunnel
