// TLS material for the QUIC edge (PROTOCOL.md §10.2): a CA and a server certificate for
// quic.cftunnel.com (+ probe.cftunnel.com, h2.cftunnel.com) signed by it, generated with GnuTLS
// into the state directory on first start and reused afterwards, or taken from flags.

#pragma once

#include <kj/array.h>
#include <kj/string.h>

namespace cfqt::emulator {

struct CertificateOptions {
  kj::String stateDir;                  // created if missing
  kj::Maybe<kj::String> caCertFile;     // with caKeyFile: sign the server certificate with this CA
  kj::Maybe<kj::String> caKeyFile;
  kj::Maybe<kj::String> serverCertFile; // with serverKeyFile: use as is (caCertFile then only
  kj::Maybe<kj::String> serverKeyFile;  // names the CA to print)
};

struct CertificateFiles {
  kj::String caCert;                    // PEM path given to clients (--cacert)
  kj::String serverCert;                // PEM path, leaf certificate
  kj::String serverKey;                 // PEM path, PKCS#8 private key
};

constexpr kj::StringPtr SERVER_NAMES[] = {
    "quic.cftunnel.com"_kj, "probe.cftunnel.com"_kj, "h2.cftunnel.com"_kj,
    "api.trycloudflare.com"_kj, "localhost"_kj};
// DNS names of the server certificate (also used by the optional HTTPS API listener, which is
// why it carries the loopback IP addresses 127.0.0.1 and ::1 too).

CertificateFiles ensureCertificates(const CertificateOptions& options);
// Blocking file I/O: call at start-up only. Throws FAILED with context on unusable files.
// Generated files: <stateDir>/ca.pem, ca-key.pem, server.pem, server-key.pem (keys 0600).

CertificateFiles ensureZoneCertificate(const CertificateOptions& options, kj::StringPtr zone);
// The HTTPS front door's certificate (issue 16): `*.<zone>` and `<zone>`, signed by the CA of
// `options` (after ensureCertificates() made it), written to <stateDir>/public.pem and
// public-key.pem at every call. Blocking; throws FAILED when no CA key is available.

}  // namespace cfqt::emulator
