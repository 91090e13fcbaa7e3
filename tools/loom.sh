#!/usr/bin/env bash
# `make loom`: the thread pool's protocol (src/pool.rs, "Protocol") model-checked by loom.
# Under --cfg loom the pool's atomics, locks and threads are loom's (src/pool/sync.rs), and the
# models in src/pool/loom_model.rs run the pool's own code under every interleaving, up to
# LOOM_MAX_PREEMPTIONS preemptions per execution. Stable toolchain; its own target directory,
# since --cfg loom rebuilds every crate. On the 2-core dev machine: about 2 min to build from
# clean, and under a minute for the models at 2 preemptions (3 caller-and-two-workers threads
# take most of it; at 3 preemptions that model alone runs for many minutes).
set -euo pipefail
cd "$(dirname "$0")/.."

export PYO3_PYTHON="${PYO3_PYTHON:-$(command -v python3)}"
export RUSTFLAGS="--cfg loom"
export CARGO_TARGET_DIR=target/loom
# The release profile, less its fat LTO (a slow build for nothing here).
export CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16
export LOOM_MAX_PREEMPTIONS="${LOOM_MAX_PREEMPTIONS:-2}"

start=$SECONDS
cargo test --release --lib --no-run
echo "=== loom: built ($((SECONDS - start)) s); models, LOOM_MAX_PREEMPTIONS=$LOOM_MAX_PREEMPTIONS ==="
run=$SECONDS
cargo test --release --lib -- pool::loom_model --test-threads=2
echo "=== make loom: ok (models $((SECONDS - run)) s, $((SECONDS - start)) s in all) ==="
