# optirs developer tasks. `make help` lists them.
.DEFAULT_GOAL := help
SHELL := /bin/bash

VENV ?= .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed
# pyo3 builds against the venv's interpreter, for maturin and cargo alike.
export PYO3_PYTHON := $(abspath $(PY))

$(PY):
	python3 -m venv $(VENV)

$(DEPS): requirements-dev.txt | $(PY)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements-dev.txt
	touch $@

.PHONY: help
help: ## show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-12s %s\n", $$1, $$2}'

.PHONY: venv
venv: $(DEPS) ## create .venv and install the test and build dependencies

.PHONY: develop
develop: $(DEPS) ## build the extension (release) into .venv
	$(VENV)/bin/maturin develop --release

.PHONY: test
test: develop ## everything CI runs: cargo test, pytest
	cargo test --release --lib --tests
	$(PY) -m pytest -q

.PHONY: test-rust
test-rust: $(DEPS) ## only the Rust kernel tests
	cargo test --release --lib --tests

.PHONY: lint
lint: $(DEPS) ## cargo fmt --check, clippy -D warnings, ruff
	cargo fmt --check
	cargo clippy --all-targets --release -- -D warnings
	$(VENV)/bin/ruff check python tests
	$(VENV)/bin/ruff format --check python tests

.PHONY: format
format: $(DEPS) ## apply cargo fmt and ruff format
	cargo fmt
	$(VENV)/bin/ruff format python tests

.PHONY: bench
bench: develop ## comparative benchmark against torch.optim (quick default)
	$(PY) -m optirs bench $(BENCH_ARGS)

.PHONY: bench-rust
bench-rust: ## criterion benchmarks of the kernels
	cargo bench --bench kernels

.PHONY: clean
clean: ## remove build outputs (keeps .venv)
	cargo clean
	rm -rf dist python/optirs/*.so
