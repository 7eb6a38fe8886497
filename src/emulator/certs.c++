#include "certs.h"

#include "random.h"

#include <gnutls/gnutls.h>
#include <gnutls/x509.h>

#include <kj/debug.h>
#include <kj/io.h>
#include <kj/vector.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

namespace cfqt::emulator {

namespace {

constexpr time_t VALIDITY_SECONDS = 10 * 365 * 24 * 3600;

#define CFQT_GNUTLS(call, ...) \
  do { \
    int rc_ = (call); \
    if (rc_ < 0) KJ_FAIL_REQUIRE(#call, gnutls_strerror(rc_), ##__VA_ARGS__); \
  } while (false)

bool fileExists(kj::StringPtr path) {
  struct stat st;
  return stat(path.cStr(), &st) == 0 && S_ISREG(st.st_mode);
}

kj::Array<kj::byte> readFile(kj::StringPtr path) {
  int fd;
  KJ_SYSCALL(fd = open(path.cStr(), O_RDONLY | O_CLOEXEC), path);
  kj::AutoCloseFd owned(fd);
  kj::FdInputStream in(kj::mv(owned));
  return in.readAllBytes();
}

void writeFile(kj::StringPtr path, kj::ArrayPtr<const kj::byte> bytes, mode_t mode) {
  auto tmp = kj::str(path, ".tmp");
  int fd;
  KJ_SYSCALL(fd = open(tmp.cStr(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode), tmp);
  {
    kj::FdOutputStream out(kj::AutoCloseFd{fd});
    out.write(bytes.begin(), bytes.size());
  }
  KJ_SYSCALL(rename(tmp.cStr(), path.cStr()), tmp, path);
}

void makeDirectories(kj::StringPtr dir) {
  if (dir.size() == 0) return;
  struct stat st;
  if (stat(dir.cStr(), &st) == 0) {
    KJ_REQUIRE(S_ISDIR(st.st_mode), "state dir is not a directory", dir);
    return;
  }
  KJ_IF_MAYBE(slash, dir.findLast('/')) {
    if (*slash > 0) makeDirectories(kj::str(dir.slice(0, *slash)));
  }
  int rc = mkdir(dir.cStr(), 0700);
  if (rc < 0 && errno != EEXIST) KJ_FAIL_SYSCALL("mkdir", errno, dir);
}

class Datum {
public:
  Datum() { datum.data = nullptr; datum.size = 0; }
  ~Datum() noexcept(false) { if (datum.data != nullptr) gnutls_free(datum.data); }
  KJ_DISALLOW_COPY(Datum);
  gnutls_datum_t* get() { return &datum; }
  kj::ArrayPtr<const kj::byte> bytes() const { return kj::arrayPtr(datum.data, datum.size); }
private:
  gnutls_datum_t datum;
};

class PrivateKey {
public:
  PrivateKey() { CFQT_GNUTLS(gnutls_x509_privkey_init(&key)); }
  ~PrivateKey() noexcept(false) { gnutls_x509_privkey_deinit(key); }
  KJ_DISALLOW_COPY(PrivateKey);
  gnutls_x509_privkey_t get() { return key; }

  void generate() {
    CFQT_GNUTLS(gnutls_x509_privkey_generate(key, GNUTLS_PK_ECDSA,
        GNUTLS_CURVE_TO_BITS(GNUTLS_ECC_CURVE_SECP256R1), 0));
  }
  void load(kj::StringPtr path) {
    auto bytes = readFile(path);
    gnutls_datum_t d{bytes.begin(), static_cast<unsigned>(bytes.size())};
    CFQT_GNUTLS(gnutls_x509_privkey_import2(key, &d, GNUTLS_X509_FMT_PEM, nullptr, 0), path);
  }
  void save(kj::StringPtr path) {
    Datum d;
    CFQT_GNUTLS(gnutls_x509_privkey_export2_pkcs8(key, GNUTLS_X509_FMT_PEM, nullptr,
                                                  GNUTLS_PKCS_PLAIN, d.get()));
    writeFile(path, d.bytes(), 0600);
  }

private:
  gnutls_x509_privkey_t key;
};

class Certificate {
public:
  Certificate() { CFQT_GNUTLS(gnutls_x509_crt_init(&crt)); }
  ~Certificate() noexcept(false) { gnutls_x509_crt_deinit(crt); }
  KJ_DISALLOW_COPY(Certificate);
  gnutls_x509_crt_t get() { return crt; }

  void load(kj::StringPtr path) {
    auto bytes = readFile(path);
    gnutls_datum_t d{bytes.begin(), static_cast<unsigned>(bytes.size())};
    CFQT_GNUTLS(gnutls_x509_crt_import(crt, &d, GNUTLS_X509_FMT_PEM), path);
  }
  void save(kj::StringPtr path) {
    Datum d;
    CFQT_GNUTLS(gnutls_x509_crt_export2(crt, GNUTLS_X509_FMT_PEM, d.get()));
    writeFile(path, d.bytes(), 0644);
  }
  kj::Array<kj::byte> keyId() {
    kj::byte buffer[64];
    size_t size = sizeof(buffer);
    CFQT_GNUTLS(gnutls_x509_crt_get_key_id(crt, 0, buffer, &size));
    return kj::heapArray<kj::byte>(buffer, size);
  }

  void setCommon(kj::StringPtr dn, PrivateKey& key) {
    CFQT_GNUTLS(gnutls_x509_crt_set_version(crt, 3));
    auto serial = randomBytes(16);
    serial[0] &= 0x7f;
    if (serial[0] == 0) serial[0] = 1;
    CFQT_GNUTLS(gnutls_x509_crt_set_serial(crt, serial.begin(), serial.size()));
    time_t now = time(nullptr);
    CFQT_GNUTLS(gnutls_x509_crt_set_activation_time(crt, now - 3600));
    CFQT_GNUTLS(gnutls_x509_crt_set_expiration_time(crt, now + VALIDITY_SECONDS));
    const char* err = nullptr;
    CFQT_GNUTLS(gnutls_x509_crt_set_dn(crt, dn.cStr(), &err), dn);
    CFQT_GNUTLS(gnutls_x509_crt_set_key(crt, key.get()));
    auto id = keyId();
    CFQT_GNUTLS(gnutls_x509_crt_set_subject_key_id(crt, id.begin(), id.size()));
  }

private:
  gnutls_x509_crt_t crt;
};

void generateCa(kj::StringPtr certPath, kj::StringPtr keyPath) {
  PrivateKey key;
  key.generate();
  Certificate crt;
  crt.setCommon("CN=cfqt-edge emulator CA,O=cfqt", key);
  CFQT_GNUTLS(gnutls_x509_crt_set_basic_constraints(crt.get(), 1, -1));
  CFQT_GNUTLS(gnutls_x509_crt_set_key_usage(crt.get(),
      GNUTLS_KEY_KEY_CERT_SIGN | GNUTLS_KEY_CRL_SIGN | GNUTLS_KEY_DIGITAL_SIGNATURE));
  CFQT_GNUTLS(gnutls_x509_crt_sign2(crt.get(), crt.get(), key.get(), GNUTLS_DIG_SHA256, 0));
  key.save(keyPath);
  crt.save(certPath);
}

void generateLeaf(kj::StringPtr caCertPath, kj::StringPtr caKeyPath,
                  kj::StringPtr certPath, kj::StringPtr keyPath,
                  kj::ArrayPtr<const kj::StringPtr> names, bool loopbackIps) {
  Certificate ca;
  ca.load(caCertPath);
  PrivateKey caKey;
  caKey.load(caKeyPath);

  PrivateKey key;
  key.generate();
  Certificate crt;
  crt.setCommon(kj::str("CN=", names[0], ",O=cfqt"), key);
  CFQT_GNUTLS(gnutls_x509_crt_set_basic_constraints(crt.get(), 0, -1));
  CFQT_GNUTLS(gnutls_x509_crt_set_key_usage(crt.get(), GNUTLS_KEY_DIGITAL_SIGNATURE));
  CFQT_GNUTLS(gnutls_x509_crt_set_key_purpose_oid(crt.get(), GNUTLS_KP_TLS_WWW_SERVER, 0));
  for (auto name: names) {
    CFQT_GNUTLS(gnutls_x509_crt_set_subject_alt_name(crt.get(), GNUTLS_SAN_DNSNAME,
        name.begin(), name.size(), GNUTLS_FSAN_APPEND));
  }
  if (loopbackIps) {
    const kj::byte v4[4] = {127, 0, 0, 1};
    const kj::byte v6[16] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1};
    CFQT_GNUTLS(gnutls_x509_crt_set_subject_alt_name(crt.get(), GNUTLS_SAN_IPADDRESS,
        v4, sizeof(v4), GNUTLS_FSAN_APPEND));
    CFQT_GNUTLS(gnutls_x509_crt_set_subject_alt_name(crt.get(), GNUTLS_SAN_IPADDRESS,
        v6, sizeof(v6), GNUTLS_FSAN_APPEND));
  }
  auto caId = ca.keyId();
  CFQT_GNUTLS(gnutls_x509_crt_set_authority_key_id(crt.get(), caId.begin(), caId.size()));
  CFQT_GNUTLS(gnutls_x509_crt_sign2(crt.get(), ca.get(), caKey.get(), GNUTLS_DIG_SHA256, 0));
  key.save(keyPath);
  crt.save(certPath);
}

kj::String joinPath(kj::StringPtr dir, kj::StringPtr name) {
  if (dir.size() == 0) return kj::heapString(name);
  if (dir.endsWith("/")) return kj::str(dir, name);
  return kj::str(dir, '/', name);
}

}  // namespace

CertificateFiles ensureCertificates(const CertificateOptions& options) {
  KJ_IF_MAYBE(cert, options.serverCertFile) {
    auto& key = KJ_REQUIRE_NONNULL(options.serverKeyFile, "--server-cert needs --server-key");
    KJ_REQUIRE(fileExists(*cert), "server certificate file not found", *cert);
    KJ_REQUIRE(fileExists(key), "server key file not found", key);
    kj::String ca;
    KJ_IF_MAYBE(c, options.caCertFile) {
      ca = kj::heapString(*c);
    } else {
      ca = kj::heapString(*cert);
    }
    return {kj::mv(ca), kj::heapString(*cert), kj::heapString(key)};
  }

  makeDirectories(options.stateDir);
  // Absolute paths: the ready line tells other processes where the CA is.
  char* resolved = realpath(options.stateDir.cStr(), nullptr);
  KJ_REQUIRE(resolved != nullptr, "cannot resolve the state dir", options.stateDir);
  auto stateDir = kj::str(resolved);
  free(resolved);
  auto serverCert = joinPath(stateDir, "server.pem");
  auto serverKey = joinPath(stateDir, "server-key.pem");
  kj::String caCert;
  kj::String caKey;
  bool freshCa = false;
  KJ_IF_MAYBE(c, options.caCertFile) {
    caCert = kj::heapString(*c);
    caKey = kj::heapString(KJ_REQUIRE_NONNULL(options.caKeyFile, "--ca-cert needs --ca-key"));
    KJ_REQUIRE(fileExists(caCert), "CA certificate file not found", caCert);
    KJ_REQUIRE(fileExists(caKey), "CA key file not found", caKey);
    // A server certificate in the state dir may come from another CA: always sign a new one.
    freshCa = true;
  } else {
    caCert = joinPath(stateDir, "ca.pem");
    caKey = joinPath(stateDir, "ca-key.pem");
    if (!fileExists(caCert) || !fileExists(caKey)) {
      generateCa(caCert, caKey);
      freshCa = true;
    }
  }
  if (freshCa || !fileExists(serverCert) || !fileExists(serverKey)) {
    generateLeaf(caCert, caKey, serverCert, serverKey, SERVER_NAMES, true);
  }
  return {kj::mv(caCert), kj::mv(serverCert), kj::mv(serverKey)};
}

CertificateFiles ensureZoneCertificate(const CertificateOptions& options, kj::StringPtr zone) {
  makeDirectories(options.stateDir);
  kj::String caCert;
  kj::String caKey;
  KJ_IF_MAYBE(c, options.caCertFile) {
    caCert = kj::heapString(*c);
    KJ_IF_MAYBE(k, options.caKeyFile) {
      caKey = kj::heapString(*k);
    } else {
      KJ_FAIL_REQUIRE("the HTTPS front door's certificate needs the CA's key: give --ca-key, or "
                      "--public-tls-cert and --public-tls-key");
    }
  } else {
    KJ_REQUIRE(options.serverCertFile == nullptr,
               "the HTTPS front door's certificate needs the CA's key: give --ca-cert and "
               "--ca-key, or --public-tls-cert and --public-tls-key");
    caCert = joinPath(options.stateDir, "ca.pem");
    caKey = joinPath(options.stateDir, "ca-key.pem");
  }
  KJ_REQUIRE(fileExists(caCert) && fileExists(caKey), "CA certificate or key not found", caCert);
  auto cert = joinPath(options.stateDir, "public.pem");
  auto key = joinPath(options.stateDir, "public-key.pem");
  // Signed afresh at every start: the zone and the CA may have changed since the last one.
  auto wildcard = kj::str("*.", zone);
  kj::StringPtr names[] = {wildcard, zone};
  generateLeaf(caCert, caKey, cert, key, names, false);
  return {kj::mv(caCert), kj::mv(cert), kj::mv(key)};
}

}  // namespace cfqt::emulator
