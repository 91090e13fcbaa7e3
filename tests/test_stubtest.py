"""mypy's stubtest over the whole installed package: the static types (``_core.pyi`` for the
extension, the annotations of the Python modules) agree with what runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optirs

ALLOWLIST = Path(__file__).with_name("stubtest-allowlist.txt")


def test_stubtest_optirs():
    result = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "optirs", "--allowlist", str(ALLOWLIST)],
        capture_output=True,
        text=True,
        # The package as installed (the wheel under `make test`), not the source tree.
        cwd=Path(optirs.__file__).parents[1],
    )
    assert result.returncode == 0, result.stdout + result.stderr
