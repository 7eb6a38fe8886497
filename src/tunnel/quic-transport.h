#pragma once
// EdgeTransport over QUIC (src/quic): one UDP endpoint and connection per edge connection, the
// client-opened control stream, and edge-opened streams read as data-stream preambles (the
// ConnectRequest, PROTOCOL.md §6.1) or capnp-rpc streams (§6.8).

#include "tunnel/transport.h"

#include "edge/edge-address.h"
#include "quic/config.h"
#include "quic/connection.h"

#include <kj/async-unix.h>
#include <kj/one-of.h>

namespace cfqt::tunnel {

struct QuicDialFailure {
  // Why a QUIC dial failed, typed for the choice `--protocol auto` makes.
  enum class Cause {
    UDP_SOCKET,     // no UDP socket could be opened
    SEND_REFUSED,   // this host refused to send to the address (sendmsg errno in `sendErrno`)
    NO_ANSWER,      // the handshake did not complete in time (UDP dropped on the way?)
    OTHER,          // QUIC answered but the dial failed (TLS, ALPN, the edge closed...)
  };
  Cause cause;
  int sendErrno = 0;        // SEND_REFUSED: EPERM, EACCES, ENETUNREACH or EHOSTUNREACH
  kj::Exception exception;  // the description for the logs
};

using QuicDialResult = kj::OneOf<kj::Own<EdgeTransport>, QuicDialFailure>;

kj::Promise<QuicDialResult> tryDialQuicTransport(kj::UnixEventPort& eventPort,
                                                 const edge::EdgeAddress& address,
                                                 quic::ClientConfig config);
// Opens a UDP socket and dials `address`. Never rejects: a failure comes back as a
// QuicDialFailure (the send refusal is read from the endpoint's statistics, not from text).

kj::Promise<kj::Own<EdgeTransport>> dialQuicTransport(kj::UnixEventPort& eventPort,
                                                      const edge::EdgeAddress& address,
                                                      quic::ClientConfig config);
// The same, rejecting with QuicDialFailure::exception on failure.

kj::String describeClose(const quic::CloseInfo& info);
// "edge closed the connection (application error 0x0, reason "...")" etc. for the logs.

}  // namespace cfqt::tunnel
