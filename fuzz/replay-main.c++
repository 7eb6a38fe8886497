// Corpus replay for `make test` (issue 18): runs a libFuzzer target's LLVMFuzzerTestOneInput()
// over every file of the given directories (or files), once each, in name order. Linked into
// the ordinary builds (gcc; ASan+UBSan in build-asan) so that the committed corpora are a
// regression test without a clang/libFuzzer build. A crash, a sanitizer report or an uncaught
// exception fails the run; exit 0 with a count otherwise.

#include <kj/debug.h>
#include <kj/filesystem.h>
#include <kj/main.h>

#include <stdint.h>
#include <stdio.h>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

namespace {

class Replay {
public:
  explicit Replay(kj::ProcessContext& context): context(context) {}

  kj::MainFunc getMain() {
    return kj::MainBuilder(context, "cfqt fuzz corpus replay",
                           "Runs the fuzz target once over every input file.")
        .expectOneOrMoreArgs("<dir-or-file>", KJ_BIND_METHOD(*this, add))
        .callAfterParsing(KJ_BIND_METHOD(*this, run))
        .build();
  }

private:
  kj::ProcessContext& context;
  kj::Own<kj::Filesystem> fs = kj::newDiskFilesystem();
  kj::Vector<kj::Path> inputs;

  kj::MainBuilder::Validity add(kj::StringPtr arg) {
    auto path = fs->getCurrentPath().eval(arg);
    auto& root = fs->getRoot();
    KJ_IF_MAYBE(meta, root.tryLstat(path)) {
      if (meta->type == kj::FsNode::Type::DIRECTORY) {
        auto dir = root.openSubdir(path.clone());
        auto names = dir->listNames();
        for (auto& name: names) {
          if (name.startsWith(".")) continue;
          inputs.add(path.append(name));
        }
      } else {
        inputs.add(kj::mv(path));
      }
      return true;
    }
    return kj::str("no such file or directory: ", arg);
  }

  kj::MainBuilder::Validity run() {
    size_t bytes = 0;
    for (auto& path: inputs) {
      auto data = fs->getRoot().openFile(path)->readAllBytes();
      bytes += data.size();
      LLVMFuzzerTestOneInput(data.begin(), data.size());
    }
    printf("replayed %zu inputs (%zu bytes)\n", inputs.size(), bytes);
    KJ_REQUIRE(inputs.size() > 0, "empty corpus");
    return true;
  }
};

}  // namespace

KJ_MAIN(Replay)
