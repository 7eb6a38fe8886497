// ConnectionImpl's TLS: GnuTLS client and server session set-up (trust roots, priorities, ALPN,
// SNI), the handshake outcome (selected ALPN, server name) and the text of local TLS failures
// (certificate verification, ALPN).

#include "quic/internal.h"

#include <ngtcp2/ngtcp2.h>
#include <ngtcp2/ngtcp2_crypto_gnutls.h>
#include <gnutls/gnutls.h>
#include <gnutls/x509.h>

#include <kj/debug.h>
#include <kj/vector.h>

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

namespace cfqt::quic::_ {

constexpr const char* DEFAULT_CLIENT_PRIORITY =
    "NORMAL:-VERS-ALL:+VERS-TLS1.3:-CIPHER-ALL:+AES-128-GCM:+AES-256-GCM:+CHACHA20-POLY1305:"
    "+AES-128-CCM:%DISABLE_TLS13_COMPAT_MODE";
constexpr const char* DEFAULT_SERVER_PRIORITY =
    "NORMAL:-VERS-ALL:+VERS-TLS1.3:-CIPHER-ALL:+AES-128-GCM:+AES-256-GCM:+CHACHA20-POLY1305:"
    "+AES-128-CCM:-GROUP-ALL:+GROUP-SECP256R1:+GROUP-X25519:+GROUP-SECP384R1:"
    "%DISABLE_TLS13_COMPAT_MODE";

void checkGnutls(int rv, kj::StringPtr what) {
  if (rv < 0) {
    kj::throwFatalException(failed(kj::str("QUIC TLS setup: ", what, ": ", gnutls_strerror(rv))));
  }
}

// ---- trust roots, shared per thread

namespace {
thread_local ClientCredentials* liveCredentials = nullptr;
thread_local uint64_t systemLoads = 0;
thread_local kj::Maybe<kj::String>* bundleOverride = nullptr;
}

uint64_t ClientCredentials::systemStoreLoads() { return systemLoads; }

void ClientCredentials::setSystemBundleForTests(kj::Maybe<kj::String> path) {
  static thread_local kj::Maybe<kj::String> holder;
  holder = kj::mv(path);
  bundleOverride = holder == nullptr ? nullptr : &holder;
}

namespace {

// GnuTLS's system trust store on Debian (--with-default-trust-store-file), the bundle
// ca-certificates maintains.
constexpr const char* SYSTEM_BUNDLE = "/etc/ssl/certs/ca-certificates.crt";
constexpr size_t MAX_SYSTEM_BUNDLE = 16 << 20;

kj::Maybe<kj::Array<kj::byte>> readSystemBundle() {
  const char* path = SYSTEM_BUNDLE;
  if (bundleOverride != nullptr) {
    KJ_IF_MAYBE(p, *bundleOverride) path = p->cStr();
  }
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return nullptr;
  kj::AutoCloseFd owned(fd);
  kj::Vector<kj::byte> bytes(256 * 1024);
  for (;;) {
    if (bytes.size() > MAX_SYSTEM_BUNDLE) return nullptr;
    size_t old = bytes.size();
    bytes.resize(old + 64 * 1024);
    ssize_t n = read(fd, bytes.begin() + old, 64 * 1024);
    if (n < 0) {
      bytes.resize(old);
      if (errno == EINTR) continue;
      return nullptr;
    }
    bytes.resize(old + n);
    if (n == 0) break;
  }
  return bytes.releaseAsArray();
}

bool containsBytes(kj::ArrayPtr<const kj::byte> haystack, kj::ArrayPtr<const kj::byte> needle) {
  if (needle.size() == 0 || needle.size() > haystack.size()) return false;
  return memmem(haystack.begin(), haystack.size(), needle.begin(), needle.size()) != nullptr;
}

int addSystemRootsFor(gnutls_x509_trust_list_t list, kj::ArrayPtr<const gnutls_x509_crt_t> chain) {
  // -1 when the bundle cannot be read; else how many of its certificates were added.
  KJ_IF_MAYBE(bundle, readSystemBundle()) {
    // The DER names to look for: a signer's subject is the raw issuer name of what it signed.
    kj::Vector<gnutls_datum_t> names;
    KJ_DEFER(for (auto& n: names) gnutls_free(n.data));
    for (auto crt: chain) {
      gnutls_datum_t name = {nullptr, 0};
      if (gnutls_x509_crt_get_raw_issuer_dn(crt, &name) >= 0) names.add(name);
      name = {nullptr, 0};
      if (gnutls_x509_crt_get_raw_dn(crt, &name) >= 0) names.add(name);
    }
    static constexpr kj::StringPtr BEGIN = "-----BEGIN CERTIFICATE-----"_kj;
    static constexpr kj::StringPtr END = "-----END CERTIFICATE-----"_kj;
    auto text = bundle->asChars();
    int added = 0;
    size_t pos = 0;
    for (;;) {
      auto rest = text.slice(pos, text.size());
      auto begin = static_cast<const char*>(memmem(rest.begin(), rest.size(), BEGIN.begin(),
                                                   BEGIN.size()));
      if (begin == nullptr) break;
      size_t from = begin - text.begin();
      auto afterBegin = text.slice(from, text.size());
      auto end = static_cast<const char*>(memmem(afterBegin.begin(), afterBegin.size(),
                                                 END.begin(), END.size()));
      if (end == nullptr) break;
      size_t to = (end - text.begin()) + END.size();
      pos = to;
      gnutls_datum_t pem = {reinterpret_cast<unsigned char*>(const_cast<char*>(begin)),
                            static_cast<unsigned>(to - from)};
      gnutls_datum_t der = {nullptr, 0};
      if (gnutls_pem_base64_decode2("CERTIFICATE", &pem, &der) < 0) continue;
      KJ_DEFER(gnutls_free(der.data));
      kj::ArrayPtr<const kj::byte> derBytes(der.data, der.size);
      bool wanted = false;
      for (auto& n: names) {
        if (containsBytes(derBytes, kj::arrayPtr(n.data, n.size))) {
          wanted = true;
          break;
        }
      }
      if (!wanted) continue;
      int n = gnutls_x509_trust_list_add_trust_mem(list, &der, nullptr, GNUTLS_X509_FMT_DER,
                                                    0, 0);
      if (n > 0) added += n;
    }
    return added;
  }
  return -1;
}

}  // namespace

kj::Maybe<gnutls_x509_trust_list_t> ClientCredentials::systemTrust(
    kj::ArrayPtr<const gnutls_x509_crt_t> chain) {
  KJ_IF_MAYBE(old, systemList) gnutls_x509_trust_list_deinit(*old, 1);
  systemList = nullptr;
  gnutls_x509_trust_list_t list;
  if (gnutls_x509_trust_list_init(&list, 0) < 0) return nullptr;
  ++systemLoads;
  int added = addSystemRootsFor(list, chain);
  if (added < 0) added = gnutls_x509_trust_list_add_system_trust(list, 0, 0);
  if (added <= 0) {
    gnutls_x509_trust_list_deinit(list, 1);
    return nullptr;
  }
  systemList = list;
  return list;
}

kj::Own<ClientCredentials> ClientCredentials::get(const ClientConfig& cfg) {
  for (auto c = liveCredentials; c != nullptr; c = c->next) {
    if (c->matches(cfg)) return kj::addRef(*c);
  }
  return kj::refcounted<ClientCredentials>(cfg);
}

bool ClientCredentials::matches(const ClientConfig& cfg) const {
  auto same = [](const kj::Maybe<kj::String>& a, const kj::Maybe<kj::String>& b) {
    KJ_IF_MAYBE(x, a) {
      KJ_IF_MAYBE(y, b) return *x == *y;
      return false;
    }
    return b == nullptr;
  };
  // A file is named, not read, here: a --edge-ca file that changes is read again only once no
  // connection holds the old one (as before, when every dial read it).
  return same(caFile, cfg.caFile) && same(caPem, cfg.caPem) &&
         useSystemTrust == cfg.useSystemTrust && verify == cfg.verifyCertificate;
}

ClientCredentials::ClientCredentials(const ClientConfig& cfg)
    : caFile(cfg.caFile.map([](const kj::String& s) { return kj::heapString(s); })),
      caPem(cfg.caPem.map([](const kj::String& s) { return kj::heapString(s); })),
      useSystemTrust(cfg.useSystemTrust), verify(cfg.verifyCertificate) {
  checkGnutls(gnutls_certificate_allocate_credentials(&credentials), "credentials");
  KJ_ON_SCOPE_FAILURE(gnutls_certificate_free_credentials(credentials));
  bool anyTrust = false;
  KJ_IF_MAYBE(file, cfg.caFile) {
    int n = gnutls_certificate_set_x509_trust_file(credentials, file->cStr(),
                                                   GNUTLS_X509_FMT_PEM);
    if (n <= 0) {
      kj::throwFatalException(failed(kj::str(
          "QUIC TLS setup: cannot load CA file '", *file, "': ",
          n < 0 ? gnutls_strerror(n) : "no certificate in it")));
    }
    anyTrust = true;
  }
  KJ_IF_MAYBE(pem, cfg.caPem) {
    gnutls_datum_t datum = {reinterpret_cast<unsigned char*>(const_cast<char*>(pem->cStr())),
                            static_cast<unsigned>(pem->size())};
    int n = gnutls_certificate_set_x509_trust_mem(credentials, &datum, GNUTLS_X509_FMT_PEM);
    if (n <= 0) {
      kj::throwFatalException(failed(kj::str("QUIC TLS setup: CA PEM holds no certificate")));
    }
    anyTrust = true;
  }
  if (cfg.useSystemTrust && anyTrust && cfg.verifyCertificate) {
    // The given roots first (cfqt: the embedded Cloudflare roots, which the real edge chains
    // to); the system store (~140 certificates, ~4 MiB, 5-15 ms) is parsed only when a chain
    // needs it.
    lazySystem = true;
  } else if (cfg.useSystemTrust) {
    int n = gnutls_certificate_set_x509_system_trust(credentials);
    if (n > 0) anyTrust = true;
  }
  if (cfg.verifyCertificate && !anyTrust) {
    kj::throwFatalException(failed(kj::str(
        "QUIC TLS setup: certificate verification is on but no trust roots were given "
        "(set caFile, caPem or useSystemTrust)")));
  }
  next = liveCredentials;
  if (next != nullptr) next->prev = &next;
  prev = &liveCredentials;
  liveCredentials = this;
}

ClientCredentials::~ClientCredentials() noexcept(false) {
  if (prev != nullptr) {
    *prev = next;
    if (next != nullptr) next->prev = prev;
  }
  KJ_IF_MAYBE(list, systemList) gnutls_x509_trust_list_deinit(*list, 1);
  gnutls_certificate_free_credentials(credentials);
}

// ---- client and server sessions

void ConnectionImpl::initClient(const ClientConfig& cfg) {
  alpnWanted = kj::heapString(cfg.alpn);
  serverName = kj::heapString(cfg.serverName);

  clientCredentials = ClientCredentials::get(cfg);

  checkGnutls(gnutls_init(&session, GNUTLS_CLIENT | GNUTLS_NO_END_OF_EARLY_DATA), "gnutls_init");
  checkGnutls(ngtcp2_crypto_gnutls_configure_client_session(session) == 0 ? 0 : -1,
              "configure client session");
  const char* errPos = nullptr;
  kj::StringPtr prio = DEFAULT_CLIENT_PRIORITY;
  KJ_IF_MAYBE(p, cfg.tlsPriority) prio = *p;
  checkGnutls(gnutls_priority_set_direct(session, prio.cStr(), &errPos), "priority string");
  checkGnutls(gnutls_credentials_set(session, GNUTLS_CRD_CERTIFICATE, clientCredentials->get()),
              "credentials");
  gnutls_datum_t proto = {reinterpret_cast<unsigned char*>(alpnWanted.begin()),
                          static_cast<unsigned>(alpnWanted.size())};
  checkGnutls(gnutls_alpn_set_protocols(session, &proto, 1, GNUTLS_ALPN_MANDATORY), "ALPN");
  if (serverName.size() > 0) {
    checkGnutls(gnutls_server_name_set(session, GNUTLS_NAME_DNS, serverName.begin(),
                                       serverName.size()), "SNI");
  }
  if (cfg.verifyCertificate && clientCredentials->lazySystemTrust()) {
    gnutls_session_set_verify_function(session, &ConnectionImpl::verifyCallback);
    ownVerify = true;
    verifyName = true;
  } else if (cfg.verifyCertificate) {
    gnutls_session_set_verify_cert(session, serverName.size() > 0 ? serverName.cStr() : nullptr,
                                   0);
    verifyName = true;
  }
  gnutls_session_set_ptr(session, &connRef);

  kj::byte dcidBytes[SCID_LEN], scidBytes[SCID_LEN];
  randomBytes(dcidBytes, sizeof(dcidBytes));
  randomBytes(scidBytes, sizeof(scidBytes));
  ngtcp2_cid dcid, scid;
  ngtcp2_cid_init(&dcid, dcidBytes, sizeof(dcidBytes));
  ngtcp2_cid_init(&scid, scidBytes, sizeof(scidBytes));
  setup(dcid, scid, NGTCP2_PROTO_VER_V1, nullptr);
  ngtcp2_conn_set_tls_native_handle(conn, session);
}

void ConnectionImpl::initServer(const ngtcp2_pkt_hd& hd, const ServerConfig& cfg) {
  checkGnutls(gnutls_init(&session, GNUTLS_SERVER | GNUTLS_NO_AUTO_SEND_TICKET |
                                    GNUTLS_NO_END_OF_EARLY_DATA), "gnutls_init");
  checkGnutls(ngtcp2_crypto_gnutls_configure_server_session(session) == 0 ? 0 : -1,
              "configure server session");
  const char* errPos = nullptr;
  kj::StringPtr prio = DEFAULT_SERVER_PRIORITY;
  KJ_IF_MAYBE(p, cfg.tlsPriority) prio = *p;
  checkGnutls(gnutls_priority_set_direct(session, prio.cStr(), &errPos), "priority string");
  checkGnutls(gnutls_credentials_set(session, GNUTLS_CRD_CERTIFICATE, endpoint->serverCred()),
              "credentials");
  kj::Vector<gnutls_datum_t> protos;
  for (auto& p: cfg.alpn) {
    protos.add(gnutls_datum_t{reinterpret_cast<unsigned char*>(const_cast<char*>(p.begin())),
                              static_cast<unsigned>(p.size())});
  }
  checkGnutls(gnutls_alpn_set_protocols(session, protos.begin(), protos.size(),
      GNUTLS_ALPN_MANDATORY | GNUTLS_ALPN_SERVER_PRECEDENCE), "ALPN");
  gnutls_session_set_ptr(session, &connRef);

  kj::byte scidBytes[SCID_LEN];
  randomBytes(scidBytes, sizeof(scidBytes));
  ngtcp2_cid scid;
  ngtcp2_cid_init(&scid, scidBytes, sizeof(scidBytes));
  setup(hd.scid, scid, hd.version, &hd.dcid);
  ngtcp2_conn_set_tls_native_handle(conn, session);
}

int ConnectionImpl::verifyCallback(gnutls_session_t session) {
  auto ref = static_cast<ngtcp2_crypto_conn_ref*>(gnutls_session_get_ptr(session));
  return static_cast<ConnectionImpl*>(ref->user_data)->verifyPeer();
}

int ConnectionImpl::verifyPeer() {
  // What gnutls_session_set_verify_cert() does (chain + host name), against the given roots and,
  // only if they know no signer, against the system store.
  gnutls_typed_vdata_st data[1];
  unsigned count = 0;
  if (serverName.size() > 0) {
    data[0].type = GNUTLS_DT_DNS_HOSTNAME;
    data[0].data = reinterpret_cast<unsigned char*>(const_cast<char*>(serverName.cStr()));
    data[0].size = 0;
    count = 1;
  }
  unsigned status = 0;
  if (gnutls_certificate_verify_peers(session, data, count, &status) < 0) {
    verifyStatus = GNUTLS_CERT_INVALID;
    return GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR;
  }
  if ((status & GNUTLS_CERT_SIGNER_NOT_FOUND) && clientCredentials.get() != nullptr) {
    unsigned n = 0;
    const gnutls_datum_t* raw = gnutls_certificate_get_peers(session, &n);
    kj::Vector<gnutls_x509_crt_t> chain(n);
    KJ_DEFER(for (auto crt: chain) gnutls_x509_crt_deinit(crt));
    bool ok = raw != nullptr && n > 0;
    for (unsigned i = 0; ok && i < n; i++) {
      gnutls_x509_crt_t crt;
      if (gnutls_x509_crt_init(&crt) < 0) {
        ok = false;
        break;
      }
      chain.add(crt);
      ok = gnutls_x509_crt_import(crt, &raw[i], GNUTLS_X509_FMT_DER) >= 0;
    }
    if (ok) {
      KJ_IF_MAYBE(list, clientCredentials->systemTrust(chain.asPtr())) {
        unsigned systemStatus = 0;
        if (gnutls_x509_trust_list_verify_crt2(*list, chain.begin(), chain.size(), data, count,
                                               0, &systemStatus, nullptr) >= 0) {
          status = systemStatus;
        }
      }
    }
  }
  verifyStatus = status;
  return status == 0 ? 0 : GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR;
}

// ---- handshake outcome, local TLS failures

CloseInfo ConnectionImpl::tlsFailure() {
  uint8_t alert = ngtcp2_conn_get_tls_alert(conn);
  kj::String what;
  if (!server && verifyName) {
    unsigned status = ownVerify ? verifyStatus : gnutls_session_get_verify_cert_status(session);
    if (status & GNUTLS_CERT_SIGNER_NOT_FOUND) {
      what = kj::str("the server's certificate is not signed by a trusted CA; pass the CA that "
                     "signed it (caFile/caPem) or check that you reach the right server");
    } else if (status & GNUTLS_CERT_UNEXPECTED_OWNER) {
      what = kj::str("the server's certificate is not valid for the name '", serverName,
                     "'; check the server name (SNI) and the certificate's SAN");
    } else if (status & GNUTLS_CERT_EXPIRED) {
      what = kj::str("the server's certificate has expired; check the clocks and the cert");
    } else if (status & GNUTLS_CERT_NOT_ACTIVATED) {
      what = kj::str("the server's certificate is not yet valid; check the clocks");
    } else if (status != 0) {
      gnutls_datum_t out;
      if (gnutls_certificate_verification_status_print(status, GNUTLS_CRT_X509, &out, 0) == 0) {
        what = kj::str("certificate verification failed: ",
                       kj::StringPtr(reinterpret_cast<const char*>(out.data), out.size));
        gnutls_free(out.data);
      } else {
        what = kj::str("certificate verification failed (status ", status, ")");
      }
    }
  }
  if (what == nullptr) {
    if (alert == 120) {
      what = server ? kj::str("the client offered none of our ALPN protocols")
                    : kj::str("no ALPN in common with the server");
    } else {
      what = kj::str(alertHint(alert));
    }
  }
  auto info = makeClose(CloseKind::TLS_LOCAL_FAILURE, 0x100 + alert, "", kj::str(
      ": ", what, " (sent alert ", alert, " ", alertName(alert), "; peer ", remote, ")"));
  info.tlsAlert = alert;
  return info;
}

void ConnectionImpl::afterHandshake() {
  handshakeReported = true;
  gnutls_datum_t proto;
  if (gnutls_alpn_get_selected_protocol(session, &proto) == 0) {
    alpn = kj::heapString(reinterpret_cast<const char*>(proto.data), proto.size);
  }
  if (server) {
    char name[256];
    size_t nameLen = sizeof(name);
    unsigned type;
    if (gnutls_server_name_get(session, name, &nameLen, &type, 0) == 0 &&
        type == GNUTLS_NAME_DNS) {
      serverName = kj::heapString(name, kj::min(nameLen, sizeof(name)));
    }
    if (endpoint != nullptr) endpoint->handshakeDone(*this);
    return;
  }
  if (alpn != alpnWanted) {
    ngtcp2_connection_close_error ccerr;
    ngtcp2_connection_close_error_set_transport_error_tls_alert(&ccerr, 120, nullptr, 0);
    sendClose(ccerr);
    auto info = makeClose(CloseKind::TLS_ALPN, 0x100 + 120, "", kj::str(
        ": the server selected ALPN '", alpn, "' instead of '", alpnWanted, "' (", remote,
        "); check that this is the right kind of server"));
    info.tlsAlert = 120;
    die(kj::mv(info));
    return;
  }
  releaseTrustRoots();
  KJ_IF_MAYBE(f, handshakeFulfiller) {
    (*f)->fulfill();
    handshakeFulfiller = nullptr;
  }
}

void ConnectionImpl::releaseTrustRoots() {
  // The server's certificate is verified: TLS 1.3 over QUIC never looks at the trust roots again
  // (no renegotiation; a client without certificates has nothing for post-handshake auth), so
  // the session gets empty credentials and the roots are freed once no other handshake of this
  // thread holds them (each dial parses them again: ~5-15 ms of CPU per reconnect, against
  // ~4 MiB held per process for the system store).
  if (clientCredentials.get() == nullptr) return;
  gnutls_certificate_credentials_t empty;
  if (gnutls_certificate_allocate_credentials(&empty) < 0) return;
  if (gnutls_credentials_set(session, GNUTLS_CRD_CERTIFICATE, empty) < 0) {
    gnutls_certificate_free_credentials(empty);
    return;
  }
  emptyCredentials = empty;
  clientCredentials = nullptr;
}

}  // namespace cfqt::quic::_
