#pragma once
// Trust roots for kj-tls (OpenSSL) clients: a PEM bundle split into one kj::TlsCertificate per
// certificate (kj-tls trusts only the first certificate of each TlsCertificate). Used by the
// origin's https client (--origin-ca-pool) and the tunnel's HTTP/2 dial to the edge (--edge-ca,
// or the embedded Cloudflare roots).

#include <kj/compat/tls.h>
#include <kj/one-of.h>
#include <kj/string.h>

namespace cfqt::origin {

kj::OneOf<kj::Array<kj::TlsCertificate>, kj::String> parsePemCertificates(kj::StringPtr pem,
                                                                           kj::StringPtr what);
// Every "-----BEGIN CERTIFICATE-----" block of `pem`, or the error text ("<what>: bad
// certificate: ...", "<what> holds no certificate").

kj::OneOf<kj::Array<kj::TlsCertificate>, kj::String> loadPemCertificates(kj::StringPtr path,
                                                                         kj::StringPtr flag);
// The same from a file; errors name `flag` and the path ("--edge-ca /x.pem: cannot read ...").

}  // namespace cfqt::origin
