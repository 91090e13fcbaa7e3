#!/usr/bin/env bash
# `make tsan`: ThreadSanitizer over the threaded code, with Rust's std rebuilt instrumented
# (-Zbuild-std: std's mutexes and thread handles are futexes and atomics, which ThreadSanitizer
# only understands when they are instrumented).
#
# 1. Rust level (the core crate, crates/optirs-core, without Python): the pool's tests (among
#    them many threads stepping on the process-wide pool while the thread count changes) and
#    the step engine on the pool, several times over.
# 2. Python level: the extension built instrumented, loaded by the venv's ordinary CPython
#    with gcc's libtsan preloaded, runs tests/tsan/stress.py (Python threads stepping NumPy and
#    torch-bridge optimizers at once while another changes set_num_threads), after a canary
#    that must be reported (tests/tsan/stress.py --canary) to show the check is live. The
#    Then tests/tsan/mutate.py: other threads drop, replace and resize the arrays of running
#    steps (the free of memory a kernel still reads would be reported). The
#    uninstrumented interpreter's own accesses are invisible to ThreadSanitizer, but its locks
#    (pthread, semaphores) are intercepted, so its GIL orders what it should. One report class
#    outside optirs is suppressed (tests/tsan/suppressions.txt, which says why).
#
# Both run the kernels at the baseline level (OPTIRS_SIMD=baseline): ThreadSanitizer's
# instrumentation skips 32- and 64-byte accesses, so the AVX2/AVX-512 loops' vector loads and
# stores would go unchecked; SSE2's 16-byte ones are checked.
set -uo pipefail
cd "$(dirname "$0")/.."
. tools/nightly.sh
need_nightly "make tsan" rust-src
set -e

TARGET="$(rustc +"$NIGHTLY" -vV | sed -n 's/^host: //p')"
export PYO3_PYTHON="${PYO3_PYTHON:-$(command -v python3)}"
PY="${PYTHON:-.venv/bin/python}"
# gcc's libtsan lacks __tsan_memcpy & co., which LLVM emits for memcpy intrinsics: leave those
# as calls to memcpy, which ThreadSanitizer intercepts.
export RUSTFLAGS="-Zsanitizer=thread -Cllvm-args=-tsan-instrument-memintrinsics=false"
# The release profile, less its fat LTO (a slow build for nothing here), with line tables for
# the reports.
export CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16
export CARGO_PROFILE_RELEASE_DEBUG=line-tables-only
export OPTIRS_SIMD=baseline
BUILD=(-Zbuild-std --target "$TARGET" --release --target-dir target/tsan)
SUPP="$PWD/tests/tsan/suppressions.txt"
export TSAN_OPTIONS="exitcode=66 halt_on_error=0 second_deadlock_stack=1 suppressions=$SUPP print_suppressions=1"
ROUNDS="${TSAN_ROUNDS:-5}"

start=$SECONDS
failed=()

echo "=== tsan: Rust level: build ==="
cargo +"$NIGHTLY" test "${BUILD[@]}" -p optirs-core --lib --no-run
echo "=== tsan: Rust level: pool and step engine tests, $ROUNDS rounds ($((SECONDS - start)) s so far) ==="
for round in $(seq "$ROUNDS"); do
    if ! cargo +"$NIGHTLY" test "${BUILD[@]}" -p optirs-core --lib -q -- pool engine::; then
        failed+=("Rust level, round $round")
        break
    fi
done

echo "=== tsan: Python level: build the extension ($((SECONDS - start)) s so far) ==="
cargo +"$NIGHTLY" build "${BUILD[@]}" -p optirs --lib
LIBTSAN="$(gcc -print-file-name=libtsan.so 2>/dev/null || true)"
if [ ! -e "$LIBTSAN" ] || [ "$LIBTSAN" = libtsan.so ]; then
    echo "=== tsan: Python level NOT RUN: gcc's ThreadSanitizer runtime (libtsan.so, Debian package libtsan2) not found ===" >&2
else
    PKG=target/tsan/py
    rm -rf "$PKG" && mkdir -p "$PKG"
    cp -r python/optirs "$PKG/"
    rm -f "$PKG"/optirs/*.so
    cp "target/tsan/$TARGET/release/liboptirs.so" "$PKG/optirs/_core.abi3.so"
    run_py() {
        LD_PRELOAD="$LIBTSAN" PYTHONPATH="$PWD/$PKG" "$PY" tests/tsan/stress.py "$@"
    }
    echo "=== tsan: Python level: canary (a race on purpose, must be reported) ==="
    set +e
    run_py --canary 2>target/tsan/canary.log
    rc=$?
    set -e
    if [ "$rc" = 66 ] && grep -q "optirs_core::kernels" target/tsan/canary.log; then
        echo "canary reported, in the kernels (target/tsan/canary.log): the check is live"
    else
        echo "the canary race was NOT reported (exit $rc, target/tsan/canary.log)" >&2
        failed+=("canary not reported: ThreadSanitizer does not see the extension")
    fi
    echo "=== tsan: Python level: stress ($((SECONDS - start)) s so far) ==="
    if ! run_py; then
        failed+=("Python-level stress")
    fi
    echo "=== tsan: Python level: other threads change the arrays of running steps ($((SECONDS - start)) s so far) ==="
    # A free racing with the kernels (a use-after-free that happened not to crash) is reported.
    if ! LD_PRELOAD="$LIBTSAN" PYTHONPATH="$PWD/$PKG" OPTIRS_MUTATE_STEPS="${OPTIRS_MUTATE_STEPS:-40}" \
        "$PY" tests/tsan/mutate.py; then
        failed+=("Python-level mutation stress")
    fi
fi

echo
if [ "${#failed[@]}" -gt 0 ]; then
    printf '=== make tsan FAILED (%s s): %s ===\n' "$((SECONDS - start))" "$(IFS=';'; echo "${failed[*]}")"
    exit 1
fi
echo "=== make tsan: ok ($((SECONDS - start)) s) ==="
