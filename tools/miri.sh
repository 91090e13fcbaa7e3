#!/usr/bin/env bash
# `make miri`: the core crate (crates/optirs-core, which knows nothing of Python), under Miri (undefined behaviour,
# Stacked Borrows aliasing, data races and weak memory on atomics, leaks).
#
# 1. The kernels' tests: `lanes::stream` over raw pointers, `Slices` chunking, every rule with
#    0 to 3 state buffers, f32/f64/bfloat16/float16, at the baseline level and with the AVX2
#    vectors (built with +avx2,+f16c, so that Miri's x86 shims run them; float16's vector store
#    and the AVX-512 level use intrinsics Miri lacks, see kernels/tests.rs). Sizes shrink under
#    cfg(miri).
#    With them the rule table's, the overlap check's and torch_raises' tests, and Adafactor's
#    passes (adafactor::, pieces of 64 elements under Miri).
# 2. The step engine alone: `counter_at`.
# 3. The thread pool's tests and the step engine on the pool (raw pointers to slices, work items
#    moved between threads), each under several scheduler seeds (MIRI_SEEDS). The pool's
#    workers are detached threads by design, so the check that every thread was joined, which
#    Miri ties to its leak check, is off here (-Zmiri-ignore-leaks).
#
# Every group runs even when one fails; the script fails if any did.
set -uo pipefail
cd "$(dirname "$0")/.."
. tools/nightly.sh
need_nightly "make miri" miri rust-src
set -e

# One build for every group. MIRIFLAGS only change how the tests run, not the build.
export RUSTFLAGS="-Ctarget-feature=+avx2,+f16c"
# Miri perturbs pow() & co. by a few ULP at random (as platforms may); the tests compare the
# kernels' bias corrections bit for bit with the reference's, so floats stay deterministic.
BASE_FLAGS="-Zmiri-deterministic-floats -Zmiri-strict-provenance"
SEEDS="${MIRI_SEEDS:-0..16}"

failed=()
group() {
    local name="$1" flags="$2"
    shift 2
    echo
    echo "=== miri: $name ==="
    local start=$SECONDS
    if MIRIFLAGS="$BASE_FLAGS $flags" cargo +"$NIGHTLY" miri test -p optirs-core --lib -- "$@"; then
        echo "=== miri: $name: ok ($((SECONDS - start)) s) ==="
    else
        echo "=== miri: $name: FAILED ($((SECONDS - start)) s) ==="
        failed+=("$name")
    fi
}

start=$SECONDS
cargo +"$NIGHTLY" miri setup
cargo +"$NIGHTLY" miri test -p optirs-core --lib --no-run
echo "=== miri: built ($((SECONDS - start)) s) ==="
set +e
group "kernels (baseline and AVX2)" "" --skip pool --skip engine:: --skip omp::
group "step engine without threads" "" engine:: --skip pool
group "thread pool and step engine on it, seeds $SEEDS" "-Zmiri-ignore-leaks -Zmiri-many-seeds=$SEEDS" pool
group "OpenMP executor on a stand-in team, seeds $SEEDS" "-Zmiri-many-seeds=$SEEDS" omp::
echo
if [ "${#failed[@]}" -gt 0 ]; then
    printf '=== make miri FAILED (%s s): %s ===\n' "$((SECONDS - start))" "$(IFS=';'; echo "${failed[*]}")"
    exit 1
fi
echo "=== make miri: ok ($((SECONDS - start)) s) ==="
