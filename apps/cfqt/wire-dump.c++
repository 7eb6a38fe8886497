// `cfqt-wire-dump <vectors-file>` (once the hidden `cfqt wire-dump` subcommand): decodes every
// vector of a wire test-vector file (data/tunnel-wire-vectors-2023.7.3.txt) with the wire layer
// and prints each decoded value in capnp text form. All the work is in src/wire
// (testing::renderVectorFile); this is the glue only.

#include "wire/test-vectors.h"

#include <kj/debug.h>

#include <errno.h>
#include <unistd.h>

namespace {

void writeAll(int fd, kj::StringPtr text) {
  const char* p = text.begin();
  size_t left = text.size();
  while (left > 0) {
    ssize_t n = ::write(fd, p, left);
    if (n < 0) {
      if (errno == EINTR) continue;
      return;
    }
    p += n;
    left -= n;
  }
}

}  // namespace

int cfqtWireDumpMain(int argc, char** argv) {
  if (argc != 3) {
    writeAll(STDERR_FILENO, "usage: cfqt wire-dump <vectors-file>\n");
    return 2;
  }
  kj::StringPtr path = argv[2];
  kj::String output;
  kj::Maybe<kj::String> failure;
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
    auto text = cfqt::wire::testing::readTextFile(path);
    KJ_SWITCH_ONEOF(cfqt::wire::testing::parseVectorFile(text)) {
      KJ_CASE_ONEOF(file, cfqt::wire::testing::VectorFile) {
        output = cfqt::wire::testing::renderVectorFile(file);
      }
      KJ_CASE_ONEOF(error, kj::String) { failure = kj::str(path, ": ", error); }
    }
  })) {
    failure = kj::str(path, ": ", e->getDescription());
  }
  KJ_IF_MAYBE(f, failure) {
    writeAll(STDERR_FILENO, kj::str("cfqt wire-dump: ", *f, "\n"));
    return 1;
  }
  writeAll(STDOUT_FILENO, output);
  return 0;
}

#if CFQT_WIRE_DUMP_STANDALONE
int main(int argc, char** argv) {
  if (argc != 2) {
    writeAll(STDERR_FILENO, "usage: cfqt-wire-dump <vectors-file>\n");
    return 2;
  }
  char name[] = "wire-dump";
  char* args[] = {argv[0], name, argv[1], nullptr};
  return cfqtWireDumpMain(3, args);
}
#endif
