# Sourced by tools/miri.sh and tools/tsan.sh: `need_nightly NAME COMPONENT...` makes
# `cargo +$NIGHTLY` usable with those components, installing the toolchain (minimal profile)
# only when it or a component is missing, so that an existing nightly is not updated on every
# run. When it cannot be had (no rustup, no network), the check is not run: this says so,
# loudly, and exits 0, so that CI does not fail for an unreachable toolchain; set
# OPTIRS_REQUIRE_NIGHTLY=1 to make that an error instead.

NIGHTLY="${NIGHTLY:-nightly}"

not_run() {
    echo "=== ${CHECK_NAME:-check} NOT RUN: $1. Nothing was checked. ===" >&2
    if [ "${OPTIRS_REQUIRE_NIGHTLY:-0}" = 1 ]; then
        exit 1
    fi
    exit 0
}

need_nightly() {
    CHECK_NAME="$1"
    shift
    command -v rustup >/dev/null || not_run "rustup is not installed"
    local installed missing=()
    installed="$(rustup +"$NIGHTLY" component list --installed 2>/dev/null || true)"
    for c in "$@"; do
        grep -q "^$c" <<<"$installed" || missing+=("$c")
    done
    if [ -z "$installed" ] || [ "${#missing[@]}" -gt 0 ]; then
        local list
        list="$(IFS=,; echo "$*")"
        echo "$CHECK_NAME: installing the $NIGHTLY toolchain with $list"
        rustup toolchain install "$NIGHTLY" --component "$list" --profile minimal --allow-downgrade ||
            not_run "rustup could not install the $NIGHTLY toolchain with $list"
    fi
    echo "$CHECK_NAME: $(rustc +"$NIGHTLY" --version)"
}
