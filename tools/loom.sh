#!/usr/bin/env bash
# `make loom`: the thread pool's protocol (crates/optirs-core/src/pool.rs, "Protocol") model-checked by loom.
# Under --cfg loom the pool's atomics, locks and threads are loom's (src/pool/sync.rs), and the
# models in src/pool/loom_model.rs run the pool's own code under every interleaving, up to
# LOOM_MAX_PREEMPTIONS preemptions per execution. Stable toolchain; its own target directory,
# since --cfg loom rebuilds every crate. On the 2-core dev machine: about 2 min to build from
# clean, then about a minute for the models (the one with three threads, capped at 2
# preemptions, takes most of it).
set -euo pipefail
cd "$(dirname "$0")/.."

export RUSTFLAGS="--cfg loom"
export CARGO_TARGET_DIR=target/loom
# The release profile, less its fat LTO (a slow build for nothing here).
export CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16
export LOOM_MAX_PREEMPTIONS="${LOOM_MAX_PREEMPTIONS:-3}"

start=$SECONDS
cargo test -p optirs-core --release --lib --no-run
bound="LOOM_MAX_PREEMPTIONS=$LOOM_MAX_PREEMPTIONS"
echo "=== loom: built ($((SECONDS - start)) s); the models, $bound ==="
run=$SECONDS
cargo test -p optirs-core --release --lib -- pool::loom_model --test-threads=2 --nocapture
echo "=== make loom: ok (models $((SECONDS - run)) s, $((SECONDS - start)) s in all) ==="
