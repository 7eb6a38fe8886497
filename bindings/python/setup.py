# Bundles the repository's libcfqt.so into the package (cfqt/libcfqt.so), so that the installed
# package needs nothing else at run time. The library is taken from $CFQT_LIBRARY if set, else from
# the repository's build (../../build/lib/libcfqt.so); build it first with `make build`.
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

HERE = os.path.dirname(os.path.abspath(__file__))


def find_library():
    given = os.environ.get("CFQT_LIBRARY")
    candidates = [given] if given else [
        os.path.join(HERE, "..", "..", "build", "lib", "libcfqt.so"),
    ]
    for path in candidates:
        if path and os.path.exists(path):
            return os.path.realpath(path)
    raise SystemExit(
        "cfqt: libcfqt.so not found (looked at %s); build it with `make build` in the repository, "
        "or set CFQT_LIBRARY to its path" % ", ".join(c for c in candidates if c))


class BuildWithLibrary(build_py):
    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "cfqt", "libcfqt.so")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(find_library(), target)


class BinaryDistribution(Distribution):
    # The wheel carries a native library: tag it for this platform, not "any".
    def has_ext_modules(self):
        return True


setup(cmdclass={"build_py": BuildWithLibrary}, distclass=BinaryDistribution)
