# Thin wrapper over CMake so the README quick start is two commands:
#   make run    install what is missing, build, start kelpied on its defaults
#   make test   install what is missing, build, run every C and Python test
# Everything real lives in CMakeLists.txt; this file only sequences it.

BUILD      ?= build
ASAN_BUILD ?= build-asan
FUZZ_BUILD ?= build-fuzz
FUZZ_SECONDS ?= 60
JOBS       ?= $(shell nproc)
CMAKE_ARGS ?=
CTEST_ARGS ?=
PYTHON     := /usr/bin/python3

# Debian 12 packages the build, the tests and the benchmarks need.
DEB_PACKAGES := build-essential cmake pkg-config git clang libclang-rt-14-dev clang-format \
	libzmq3-dev libczmq-dev libprotobuf-c-dev protobuf-c-compiler protobuf-compiler \
	libcriterion-dev libsodium-dev libsqlite3-dev sqlite3 libmicrohttpd-dev libzstd-dev systemd libpq-dev postgresql-15 \
	python3 python3-dev python3-setuptools python3-pip python3-zmq python3-protobuf \
	python3-pytest python3-pytest-asyncio python3-uvloop python3-psutil python3-venv pyflakes3 \
	python3-zstandard python3-prometheus-client python3-rich bubblewrap python3-seccomp \
	python3-aiohttp libjs-chart.js chromium chromium-driver python3-selenium strace

BENCH_PACKAGES := python3-aiozmq python3-grpcio python3-matplotlib firejail \
	redis-server python3-celery python3-rq python3-redis

.PHONY: all deps bench-deps configure build run test asan fuzz format format-check lint bench clean

all: build

# Installs only what is missing; needs root (or sudo) only when something is.
deps:
	@missing=$$(for p in $(DEB_PACKAGES) $(EXTRA_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing:" $$missing; \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

bench-deps:
	@$(MAKE) --no-print-directory deps EXTRA_PACKAGES="$(BENCH_PACKAGES)"

$(BUILD)/CMakeCache.txt:
	cmake -S . -B $(BUILD) -DPython3_EXECUTABLE=$(PYTHON) $(CMAKE_ARGS)

configure: deps $(BUILD)/CMakeCache.txt

build: configure
	cmake --build $(BUILD) -j $(JOBS)

run: build
	exec $(BUILD)/broker/kelpied $(ARGS)

test: build
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS) $(CTEST_ARGS)

# C tests under AddressSanitizer + UBSan, in their own build tree.
asan: deps
	cmake -S . -B $(ASAN_BUILD) -DKELPIE_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug \
		-DPython3_EXECUTABLE=$(PYTHON) $(CMAKE_ARGS)
	cmake --build $(ASAN_BUILD) -j $(JOBS)
	cd $(ASAN_BUILD) && ctest --output-on-failure -j $(JOBS) -L asan $(CTEST_ARGS)

# libFuzzer on the header decoder and on the broker's state machine, FUZZ_SECONDS
# each. New inputs go to a scratch corpus in the fuzz build tree; copy the
# interesting ones into tests/fuzz/corpus*/ and commit them.
fuzz: deps
	CC=clang cmake -S . -B $(FUZZ_BUILD) -DKELPIE_FUZZ=ON -DKELPIE_PYTHON=OFF $(CMAKE_ARGS)
	cmake --build $(FUZZ_BUILD) -j $(JOBS) --target fuzz_header fuzz_broker
	mkdir -p $(FUZZ_BUILD)/new-header $(FUZZ_BUILD)/new-broker
	$(FUZZ_BUILD)/tests/fuzz/fuzz_header -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 \
		$(FUZZ_BUILD)/new-header tests/fuzz/corpus
	$(FUZZ_BUILD)/tests/fuzz/fuzz_broker -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 \
		$(FUZZ_BUILD)/new-broker tests/fuzz/corpus-broker

# Every benchmark, each against its anchor in the same run (several minutes;
# figures in docs/benchmarks.md).
bench: bench-deps build
	BUILD=$(BUILD) benchmarks/broker/run.sh
	$(PYTHON) benchmarks/asyncio/bench.py
	$(PYTHON) benchmarks/rpc/bench.py
	$(PYTHON) benchmarks/rpc/bench_sync.py
	BUILD=$(BUILD) $(PYTHON) benchmarks/jobs/bench.py
	$(PYTHON) benchmarks/jobs/pg_bench.py --build $(BUILD)

FORMAT_FILES = $(shell git ls-files '*.c' '*.h' 2>/dev/null)
format:
	clang-format -i $(FORMAT_FILES)
format-check:
	clang-format --dry-run --Werror $(FORMAT_FILES)

# pyflakes over the Python package, the tests and the benchmarks. Excluded,
# and only in package __init__.py files: "imported but unused" and "import *
# used" -- those files exist to re-export names (kelpie re-exports the C
# extension's, kelpie.zmq pyzmq's), which pyflakes cannot tell from unused
# imports without an __all__ that would have to repeat the extension's list.
LINT_DIRS = bindings/python/kelpie tests benchmarks
lint:
	@out=$$(pyflakes3 $(LINT_DIRS) 2>&1 | grep -Ev '/__init__\.py:[0-9]+:[0-9]+:? .*(imported but unused|import \*. used;)'); \
	if [ -n "$$out" ]; then echo "$$out"; exit 1; fi; echo "pyflakes: clean"

clean:
	rm -rf $(BUILD) $(ASAN_BUILD) $(FUZZ_BUILD)
