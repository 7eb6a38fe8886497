// CloseKind and CloseInfo: the typed reasons a QUIC connection ends with, their exception types
// and descriptions (classifyException() reads a kind back from a description), and the TLS alert
// names and hints used in those descriptions.

#include "quic/internal.h"

#include <gnutls/gnutls.h>

#include <kj/debug.h>

#include <errno.h>

namespace cfqt::quic {

// =======================================================================================
// CloseKind / CloseInfo

namespace {

struct KindInfo {
  CloseKind kind;
  kj::StringPtr name;
  kj::StringPtr prefix;   // every description of this kind starts with it
  kj::Exception::Type type;
};

const KindInfo KIND_INFO[] = {
  {CloseKind::LOCAL_CLOSE, "LOCAL_CLOSE", "QUIC connection closed locally",
      kj::Exception::Type::DISCONNECTED},
  {CloseKind::PEER_APPLICATION_CLOSE, "PEER_APPLICATION_CLOSE",
      "QUIC connection closed by the peer with application error",
      kj::Exception::Type::DISCONNECTED},
  {CloseKind::PEER_TRANSPORT_CLOSE, "PEER_TRANSPORT_CLOSE",
      "QUIC connection closed by the peer with transport error",
      kj::Exception::Type::DISCONNECTED},
  {CloseKind::IDLE_TIMEOUT, "IDLE_TIMEOUT", "QUIC idle timeout", kj::Exception::Type::DISCONNECTED},
  {CloseKind::HANDSHAKE_TIMEOUT, "HANDSHAKE_TIMEOUT", "QUIC handshake timeout",
      kj::Exception::Type::OVERLOADED},
  {CloseKind::TLS_LOCAL_FAILURE, "TLS_LOCAL_FAILURE", "QUIC TLS handshake failed",
      kj::Exception::Type::FAILED},
  {CloseKind::TLS_PEER_ALERT, "TLS_PEER_ALERT", "QUIC TLS handshake rejected by the peer",
      kj::Exception::Type::FAILED},
  {CloseKind::TLS_ALPN, "TLS_ALPN", "QUIC ALPN mismatch", kj::Exception::Type::FAILED},
  {CloseKind::STATELESS_RESET, "STATELESS_RESET", "QUIC stateless reset",
      kj::Exception::Type::DISCONNECTED},
  {CloseKind::ENDPOINT_GONE, "ENDPOINT_GONE", "QUIC endpoint destroyed",
      kj::Exception::Type::DISCONNECTED},
  {CloseKind::SEND_REFUSED, "SEND_REFUSED", "QUIC send refused by this host",
      kj::Exception::Type::DISCONNECTED},
  {CloseKind::INTERNAL_ERROR, "INTERNAL_ERROR", "QUIC connection failed",
      kj::Exception::Type::FAILED},
};

const KindInfo& kindInfo(CloseKind kind) {
  for (auto& info: KIND_INFO) {
    if (info.kind == kind) return info;
  }
  KJ_UNREACHABLE;
}

}  // namespace

namespace _ {

kj::StringPtr alertName(uint8_t alert) {
  const char* name = gnutls_alert_get_name(static_cast<gnutls_alert_description_t>(alert));
  return name == nullptr ? kj::StringPtr("unknown") : kj::StringPtr(name);
}

kj::StringPtr alertHint(uint8_t alert) {
  switch (alert) {
    case 120: return "the peers have no ALPN protocol in common; check the ALPN both sides use";
    case 40: return "no common cipher suite / key-exchange group (the server must accept P-256)";
    case 42: case 43: case 44: case 45: case 46: case 48:
      return "the peer rejected the certificate; check the CA it trusts and the name (SNI)";
    case 112: return "the server does not know the name sent in SNI";
    default: return "check both sides' TLS configuration";
  }
}

CloseInfo makeClose(CloseKind kind, uint64_t code, kj::StringPtr reason, kj::String detail) {
  CloseInfo info;
  info.kind = kind;
  info.code = code;
  info.reason = kj::heapString(reason);
  info.description = kj::str(kindInfo(kind).prefix, detail);
  return info;
}

}  // namespace _

kj::StringPtr KJ_STRINGIFY(CloseKind kind) {
  return kindInfo(kind).name;
}

kj::Exception CloseInfo::toException() const {
  return kj::Exception(kindInfo(kind).type, __FILE__, __LINE__, kj::heapString(description));
}

CloseInfo CloseInfo::clone() const {
  CloseInfo copy;
  copy.kind = kind;
  copy.code = code;
  copy.tlsAlert = tlsAlert;
  copy.sendErrno = sendErrno;
  copy.reason = kj::heapString(reason);
  copy.description = kj::heapString(description);
  return copy;
}

bool isSendRefusal(int error) {
  return error == EPERM || error == EACCES || error == ENETUNREACH || error == EHOSTUNREACH;
}

kj::StringPtr errnoName(int error) {
  switch (error) {
    case EPERM: return "EPERM";
    case EACCES: return "EACCES";
    case ENETUNREACH: return "ENETUNREACH";
    case EHOSTUNREACH: return "EHOSTUNREACH";
    case ECONNREFUSED: return "ECONNREFUSED";
    case EMSGSIZE: return "EMSGSIZE";
    case EINVAL: return "EINVAL";
    case EIO: return "EIO";
    case EAGAIN: return "EAGAIN";
    case ENOBUFS: return "ENOBUFS";
    default: return "?";
  }
}

kj::Maybe<CloseKind> classifyException(const kj::Exception& e) {
  kj::StringPtr desc = e.getDescription();
  for (auto& info: KIND_INFO) {
    if (desc.startsWith(info.prefix)) return info.kind;
  }
  return nullptr;
}

}  // namespace cfqt::quic
