# optirs developer tasks. `make help` lists them.
.DEFAULT_GOAL := help
SHELL := /bin/bash

VENV ?= .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed
# The wheel under test is installed into this fresh venv; see `test`.
TEST_VENV := .venv-test
# pyo3 builds against the venv's interpreter, for maturin and cargo alike; zig (the linker
# that targets old glibc) is found on PATH.
export PYO3_PYTHON := $(abspath $(PY))
export PATH := $(abspath $(VENV))/bin:$(PATH)

$(PY):
	python3 -m venv $(VENV)

$(DEPS): requirements-dev.txt | $(PY)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements-dev.txt
	touch $@

.PHONY: help
help: ## show this help
	@grep -E '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-12s %s\n", $$1, $$2}'

.PHONY: venv
venv: $(DEPS) ## create .venv and install the test and build dependencies

.PHONY: develop
develop: $(DEPS) ## build the extension (release) into .venv
	$(VENV)/bin/maturin develop --release

.PHONY: wheel
wheel: $(DEPS) ## build the release abi3 wheel (manylinux2014, baseline x86-64) into dist/
	rm -f dist/optirs-*.whl
	maturin build --release --zig --compatibility manylinux2014 --out dist

.PHONY: sdist
sdist: $(DEPS) ## build the source distribution into dist/
	rm -f dist/optirs-*.tar.gz
	maturin sdist --out dist

.PHONY: test
test: wheel sdist ## the test suite CI runs (then miri, tsan, loom): cargo test, pytest against the wheel
	@# The core's tests (kernels, rule table, engine, pool) need no Python; the bindings' link it.
	cargo test --release --workspace --lib
	@# A fresh venv holds optirs, installed from the wheel and nothing else; the third-party
	@# test dependencies are read from .venv through a .pth file, which Python searches after
	@# the venv's own site-packages, so the source tree never stands in for the package.
	rm -rf $(TEST_VENV)
	python3 -m venv --without-pip $(TEST_VENV)
	$(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' \
		> "$$($(TEST_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_optirs_test_deps.pth"
	$(PY) -m pip --python $(TEST_VENV)/bin/python install -q --no-index --no-deps --ignore-installed dist/optirs-*.whl
	$(PY) -m pip --python $(TEST_VENV)/bin/python check
	OPTIRS_WHEEL="$$(ls dist/optirs-*.whl)" OPTIRS_SDIST="$$(ls dist/optirs-*.tar.gz)" \
		$(TEST_VENV)/bin/python -m pytest -q

.PHONY: test-rust
test-rust: $(DEPS) ## only the Rust tests (the core's run without Python: cargo test -p optirs-core)
	cargo test --release --workspace --lib --tests

# optirs-core's tests built for aarch64 and run under user-mode qemu: every kernel at the NEON
# level against the scalar reference, bit for bit, and the 16-bit conversions on every input.
# It installs nothing: each missing piece stops it with the command that provides it (Debian
# names). 8 to 15 min on the 2-core dev machine, most of it the exhaustive conversion sweeps;
# timings under qemu say nothing about aarch64 speed.
AARCH64_TARGET := aarch64-unknown-linux-gnu
AARCH64_CC ?= aarch64-linux-gnu-gcc
AARCH64_SYSROOT ?= /usr/aarch64-linux-gnu
.PHONY: test-aarch64
test-aarch64: ## optirs-core's tests for aarch64 (NEON) under qemu-aarch64 (~10 min; needs the Rust target, qemu-user, a cross gcc)
	@test -d "$$(rustc --print sysroot)/lib/rustlib/$(AARCH64_TARGET)/lib" || { \
		echo "test-aarch64: the Rust target is missing: rustup target add $(AARCH64_TARGET)" >&2; exit 1; }
	@command -v qemu-aarch64 >/dev/null || { \
		echo "test-aarch64: qemu-aarch64 is missing: apt-get install qemu-user" >&2; exit 1; }
	@command -v $(AARCH64_CC) >/dev/null || { \
		echo "test-aarch64: the cross linker $(AARCH64_CC) is missing: apt-get install gcc-aarch64-linux-gnu" >&2; exit 1; }
	@test -e $(AARCH64_SYSROOT)/lib/ld-linux-aarch64.so.1 || { \
		echo "test-aarch64: the aarch64 C library is missing from $(AARCH64_SYSROOT): apt-get install libc6-dev-arm64-cross" >&2; exit 1; }
	CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=$(AARCH64_CC) \
	CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L $(AARCH64_SYSROOT)" \
		cargo test -p optirs-core --target $(AARCH64_TARGET) --release

# Both need a nightly toolchain (tools/nightly.sh installs it when missing, or says the check
# was not run when it cannot). Times on the 2-core dev machine (clean-clone CI, 2026-12-07):
# miri 26 min, 22 of them the kernels (the 8-bit and Adafactor rounding tests added about 7),
# 2 the pool under MIRI_SEEDS=0..16 scheduler seeds; tsan 6 min; loom 3.5 min.
.PHONY: miri
miri: $(DEPS) ## Miri over optirs-core: pool, step engine, kernels' loops, baseline + AVX2 (~26 min)
	tools/miri.sh

.PHONY: tsan
tsan: $(DEPS) ## ThreadSanitizer: pool stress tests, Python threads stepping the extension (~2-4 min)
	tools/tsan.sh

.PHONY: loom
loom: $(DEPS) ## loom model checks of the thread pool's protocol (optirs-core's pool/loom_model.rs, ~1-3 min)
	tools/loom.sh

.PHONY: lint
lint: $(DEPS) ## cargo fmt --check, clippy -D warnings, ruff, actionlint
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --release -- -D warnings
	ruff check python tests examples
	ruff format --check python tests examples
	actionlint -color=false .github/workflows/*.yml

.PHONY: release-check
release-check: $(DEPS) ## dry-run each release test job's requirements for its platform and Python (needs PyPI)
	tools/release-check.sh

.PHONY: format
format: $(DEPS) ## apply cargo fmt and ruff format
	cargo fmt --all
	$(VENV)/bin/ruff format python tests

.PHONY: docs
docs: develop ## the API reference (Sphinx, from the docstrings; warnings are errors) into docs/_build/html
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html
	@echo "API reference: docs/_build/html/index.html"

.PHONY: bench
bench: develop ## comparative benchmark against torch.optim (quick default; BENCH_ARGS=...)
	$(PY) -m optirs bench $(BENCH_ARGS)

.PHONY: bench-rust
bench-rust: ## criterion benchmarks of the kernels (crates/optirs-core/benches)
	cargo bench -p optirs-core --bench kernels

.PHONY: clean
clean: ## remove build outputs (keeps .venv)
	cargo clean
	rm -rf dist $(TEST_VENV) python/optirs/*.so
