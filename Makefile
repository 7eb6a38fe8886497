# The two commands of the README: `make run` and `make test`. Both install what is missing,
# configure and build; set-up and build output goes to stderr, stdout is the main job's.
JOBS ?= $(shell nproc)
BUILD_TYPE ?= RelWithDebInfo
CMAKE_FLAGS ?=

.PHONY: all setup setup-test build build-asan build-tsan run test test-unit test-asan test-tsan bench install clean fuzz

all: build

setup:
	@scripts/setup

setup-test:
	@CFQT_SETUP_TEST=1 scripts/setup

build/build.ninja:
	@cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=$(BUILD_TYPE) -DCFQT_WERROR=ON $(CMAKE_FLAGS) 1>&2

build: setup build/build.ninja
	@cmake --build build -j $(JOBS) 1>&2

build-asan/build.ninja:
	@cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=Debug -DCFQT_SANITIZE=ON -DCFQT_WERROR=ON $(CMAKE_FLAGS) 1>&2

# The sanitizer build only builds and runs the tests labelled "asan" (cfqt_test(... ASAN) and the
# end-to-end test with the cfqt, cfqt-edge and C example binaries it drives).
build-asan: setup build-asan/build.ninja
	@cmake --build build-asan -j $(JOBS) --target asan-tests 1>&2

run: build
	@scripts/run-demo

test-unit: setup-test build
	@cd build && ctest --output-on-failure -j $(JOBS) --timeout 600 1>&2

test-asan: setup build-asan
	@cd build-asan && ctest --output-on-failure -j $(JOBS) -L asan --timeout 900 1>&2

test: test-unit test-asan

bench: build
	@build/bin/cfqt-bench

# Not one of the README's two commands: installs what `make build` built (stripped) under PREFIX,
# then refreshes the dynamic loader's cache (as root) so that programs find libcfqt.so.
PREFIX ?= /usr/local
install: build
	@cmake --install build --prefix $(PREFIX) --strip 1>&2
	@if [ "$$(id -u)" = 0 ] && command -v ldconfig >/dev/null; then ldconfig; fi

# libFuzzer campaigns (issue 18; not part of `make test`, which replays the committed corpora):
# clang-14 + libfuzzer-14-dev, every library with -fsanitize=fuzzer-no-link,address,undefined in
# build-fuzz/, then scripts/fuzz runs each target FUZZ_SECONDS under nice -n 19 and merges what
# it found into fuzz/corpus/.
FUZZ_SECONDS ?= 60
build-fuzz/build.ninja:
	@cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_C_COMPILER=clang-14 \
	    -DCMAKE_CXX_COMPILER=clang++-14 -DCFQT_FUZZ=ON -DCFQT_BUILD_TESTS=OFF $(CMAKE_FLAGS) 1>&2

fuzz:
	@CFQT_SETUP_FUZZ=1 scripts/setup
	@$(MAKE) --no-print-directory build-fuzz/build.ninja
	@cmake --build build-fuzz -j $(JOBS) --target fuzz-targets 1>&2
	@scripts/fuzz --seconds $(FUZZ_SECONDS)

# ThreadSanitizer (issue 15): the tests labelled "tsan" (tunnel, QUIC, public API, connection
# workers) in build-tsan/ (Debug, -fsanitize=thread); scripts/tsan.supp says what it suppresses.
# A separate target, not part of `make test` (see README).
build-tsan/build.ninja:
	@cmake -S . -B build-tsan -G Ninja -DCMAKE_BUILD_TYPE=Debug -DCFQT_TSAN=ON -DCFQT_WERROR=ON $(CMAKE_FLAGS) 1>&2

build-tsan: setup build-tsan/build.ninja
	@cmake --build build-tsan -j $(JOBS) --target tsan-tests 1>&2

test-tsan: setup build-tsan
	@cd build-tsan && ctest --output-on-failure -j $(JOBS) -L tsan --timeout 900 1>&2

clean:
	rm -rf build build-asan build-tsan build-fuzz
