#include "origin/tls-roots.h"

#include <kj/debug.h>
#include <kj/io.h>
#include <kj/vector.h>

#include <fcntl.h>

namespace cfqt::origin {

kj::OneOf<kj::Array<kj::TlsCertificate>, kj::String> parsePemCertificates(kj::StringPtr pem,
                                                                           kj::StringPtr what) {
  constexpr kj::StringPtr BEGIN = "-----BEGIN CERTIFICATE-----"_kj;
  constexpr kj::StringPtr END = "-----END CERTIFICATE-----"_kj;
  kj::Vector<kj::TlsCertificate> roots;
  kj::StringPtr rest = pem;
  for (;;) {
    kj::Maybe<size_t> start;
    for (size_t i = 0; i + BEGIN.size() <= rest.size(); i++) {
      if (rest.slice(i).startsWith(BEGIN)) {
        start = i;
        break;
      }
    }
    KJ_IF_MAYBE(s, start) {
      auto from = rest.slice(*s);
      kj::Maybe<size_t> stop;
      for (size_t i = 0; i + END.size() <= from.size(); i++) {
        if (from.slice(i).startsWith(END)) {
          stop = i + END.size();
          break;
        }
      }
      KJ_IF_MAYBE(e, stop) {
        auto block = kj::heapString(from.slice(0, *e));
        KJ_IF_MAYBE(error, kj::runCatchingExceptions([&]() {
          roots.add(kj::TlsCertificate(block));
        })) {
          return kj::str(what, ": bad certificate: ", error->getDescription());
        }
        rest = from.slice(*e);
        continue;
      }
    }
    break;
  }
  if (roots.empty()) return kj::str(what, " holds no certificate");
  return roots.releaseAsArray();
}

kj::OneOf<kj::Array<kj::TlsCertificate>, kj::String> loadPemCertificates(kj::StringPtr path,
                                                                         kj::StringPtr flag) {
  kj::String pem;
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
    int fd;
    KJ_SYSCALL(fd = open(path.cStr(), O_RDONLY | O_CLOEXEC), path);
    kj::AutoCloseFd owned(fd);
    kj::FdInputStream in(kj::mv(owned));
    pem = kj::heapString(in.readAllText());
  })) {
    return kj::str(flag, " ", path, ": cannot read: ", e->getDescription());
  }
  return parsePemCertificates(pem, kj::str(flag, " ", path));
}

}  // namespace cfqt::origin
