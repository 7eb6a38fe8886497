#include "certs.h"

#include <gnutls/gnutls.h>
#include <gnutls/x509.h>

#include <kj/debug.h>
#include <kj/io.h>
#include <kj/test.h>

#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

namespace cfqt::emulator {
namespace {

kj::String makeTempDir() {
  char templ[] = "/tmp/cfqt-certs-test-XXXXXX";
  KJ_ASSERT(mkdtemp(templ) != nullptr);
  return kj::str(templ);
}

kj::Array<kj::byte> slurp(kj::StringPtr path) {
  int fd;
  KJ_SYSCALL(fd = open(path.cStr(), O_RDONLY));
  kj::FdInputStream in((kj::AutoCloseFd(fd)));
  return in.readAllBytes();
}

class Crt {
public:
  explicit Crt(kj::StringPtr path) {
    gnutls_x509_crt_init(&crt);
    auto bytes = slurp(path);
    gnutls_datum_t d{bytes.begin(), static_cast<unsigned>(bytes.size())};
    KJ_ASSERT(gnutls_x509_crt_import(crt, &d, GNUTLS_X509_FMT_PEM) == 0, path);
  }
  ~Crt() { gnutls_x509_crt_deinit(crt); }
  gnutls_x509_crt_t crt;
};

void removeTree(kj::StringPtr dir) {
  for (auto name: {"ca.pem", "ca-key.pem", "server.pem", "server-key.pem"}) {
    unlink(kj::str(dir, '/', name).cStr());
  }
  rmdir(dir.cStr());
}

KJ_TEST("generated CA signs a server certificate for the cftunnel names, reused on restart") {
  auto dir = makeTempDir();
  KJ_DEFER(removeTree(dir));
  auto stateDir = kj::str(dir, "/state");
  KJ_DEFER(rmdir(stateDir.cStr()));
  CertificateOptions options;
  options.stateDir = kj::heapString(stateDir);
  auto files = ensureCertificates(options);
  KJ_EXPECT(files.caCert == kj::str(stateDir, "/ca.pem"));

  {
    Crt ca(files.caCert);
    Crt server(files.serverCert);
    unsigned int status = 0;
    KJ_ASSERT(gnutls_x509_crt_verify(server.crt, &ca.crt, 1, 0, &status) == 0);
    KJ_EXPECT(status == 0, status);
    KJ_EXPECT(gnutls_x509_crt_check_hostname(server.crt, "quic.cftunnel.com"));
    KJ_EXPECT(gnutls_x509_crt_check_hostname(server.crt, "probe.cftunnel.com"));
    KJ_EXPECT(!gnutls_x509_crt_check_hostname(server.crt, "example.com"));
    unsigned int critical = 0;
    KJ_EXPECT(gnutls_x509_crt_get_ca_status(ca.crt, &critical) == 1);
    KJ_EXPECT(gnutls_x509_crt_get_ca_status(server.crt, &critical) == 0);
  }
  struct stat st;
  KJ_ASSERT(stat(files.serverKey.cStr(), &st) == 0);
  KJ_EXPECT((st.st_mode & 077) == 0, st.st_mode);

  auto caBefore = slurp(files.caCert);
  auto serverBefore = slurp(files.serverCert);
  auto again = ensureCertificates(options);
  KJ_EXPECT(slurp(again.caCert) == caBefore);
  KJ_EXPECT(slurp(again.serverCert) == serverBefore);

  // A CA given by flags signs a fresh server certificate.
  CertificateOptions withCa;
  withCa.stateDir = kj::str(dir, "/other");
  KJ_DEFER({
    unlink(kj::str(dir, "/other/server.pem").cStr());
    unlink(kj::str(dir, "/other/server-key.pem").cStr());
    rmdir(kj::str(dir, "/other").cStr());
  });
  withCa.caCertFile = kj::heapString(files.caCert);
  withCa.caKeyFile = kj::str(stateDir, "/ca-key.pem");
  auto signedByFlag = ensureCertificates(withCa);
  KJ_EXPECT(signedByFlag.caCert == files.caCert);
  Crt ca(files.caCert);
  Crt server(signedByFlag.serverCert);
  unsigned int status = 0;
  KJ_ASSERT(gnutls_x509_crt_verify(server.crt, &ca.crt, 1, 0, &status) == 0);
  KJ_EXPECT(status == 0);
}

KJ_TEST("unusable certificate flags fail with a message") {
  CertificateOptions options;
  options.stateDir = kj::str("/tmp");
  options.serverCertFile = kj::str("/nonexistent/server.pem");
  options.serverKeyFile = kj::str("/nonexistent/key.pem");
  KJ_EXPECT_THROW_MESSAGE("not found", ensureCertificates(options));
}

}  // namespace
}  // namespace cfqt::emulator
