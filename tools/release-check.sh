#!/usr/bin/env bash
# `make release-check`: what the release workflow's test jobs will install, resolved for each
# job's platform and Python without installing anything (`pip install --dry-run --platform`),
# so that a dependency with no wheel there (torch on Intel macOS, the pins on Python 3.9) is
# caught here, before a tag. Needs PyPI. Mirrors .github/workflows/wheels.yml: keep them in step.
#
# Each listed requirement is resolved on its own (--no-deps): pip evaluates environment markers
# for this machine, not for --platform, so a dependency tree resolved here for macOS or Windows
# would be Linux's (torch's CUDA packages). What is checked: every package the job names has a
# wheel for that platform and Python.
set -uo pipefail
cd "$(dirname "$0")/.."
PIP="${PIP:-.venv/bin/pip}"
status=0
check() { # requirements python platform...
    local req=$1 py=$2
    shift 2
    local plats=()
    for p in "$@"; do plats+=(--platform "$p"); done
    if out=$("$PIP" install -q --dry-run --ignore-installed --only-binary=:all: --no-deps \
        --python-version "$py" "${plats[@]}" -r "$req" 2>&1); then
        echo "ok    $req  py$py  $*"
    else
        echo "FAIL  $req  py$py  $*: $(tail -1 <<<"$out")"
        status=1
    fi
}
# Every manylinux tag an ubuntu-latest runner (glibc 2.39) accepts.
LINUX_X86=(manylinux2014_x86_64)
LINUX_ARM=(manylinux2014_aarch64)
for v in $(seq 17 39); do
    LINUX_X86+=("manylinux_2_${v}_x86_64")
    LINUX_ARM+=("manylinux_2_${v}_aarch64")
done
for py in 3.11 3.12 3.13 3.14; do
    check requirements-dev.txt "$py" "${LINUX_X86[@]}"
done
# Markers are this machine's (x86-64): the aarch64 job's list without what its markers leave out.
arm_req=$(mktemp)
trap 'rm -f "$arm_req"' EXIT
grep -v 'platform_machine != "aarch64"' requirements-dev.txt >"$arm_req"
check "$arm_req" 3.12 "${LINUX_ARM[@]}"
check requirements-dev.txt 3.12 macosx_14_0_arm64 macosx_13_0_arm64 macosx_12_0_arm64 macosx_11_0_arm64
check requirements-dev.txt 3.12 win_amd64
for py in 3.9 3.10; do
    check requirements-notorch.txt "$py" "${LINUX_X86[@]}"
done
check requirements-notorch.txt 3.12 macosx_15_0_x86_64 macosx_14_0_x86_64 macosx_13_0_x86_64 macosx_12_0_x86_64 macosx_11_0_x86_64 macosx_10_9_x86_64
check requirements-notorch.txt 3.12 musllinux_1_2_x86_64 musllinux_1_1_x86_64
check requirements-notorch.txt 3.12 musllinux_1_2_aarch64 musllinux_1_1_aarch64
exit $status
