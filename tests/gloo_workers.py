"""Multi-process tests on the gloo backend: a test file runs itself as a script once per rank.

``launch`` starts the ranks (this interpreter, the test file, ``--rank R --out DIR``), waits for
them up to a deadline, kills what is left, fails the test with the failed ranks' log tails, and
returns what each rank saved to ``DIR/rank{R}.pt``. ``connect`` gives the ranks their TCPStore on
127.0.0.1 (rank 0 binds a free port and publishes it through a file: no fixed port to collide
with another run). ``main`` is the script end of a test file.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import optirs
import pytest
import torch


def connect(rank: int, world: int, port_file: Path) -> Any:
    """A TCPStore on 127.0.0.1: rank 0 binds a free port and writes it to ``port_file``."""
    import torch.distributed as dist

    timeout = timedelta(seconds=60)
    if rank == 0:
        store = dist.TCPStore("127.0.0.1", 0, world, True, timeout=timeout, wait_for_workers=False)
        tmp = port_file.with_suffix(".tmp")
        tmp.write_text(str(store.port))
        tmp.replace(port_file)
        return store
    deadline = time.monotonic() + 60
    while not port_file.exists():
        if time.monotonic() > deadline:
            raise TimeoutError("rank 0 did not publish its store port")
        time.sleep(0.05)
    port = int(port_file.read_text())
    return dist.TCPStore("127.0.0.1", port, world, False, timeout=timeout)


def launch(script: str, out_dir: Path, world: int, timeout_s: float) -> list[dict]:
    """Runs ``script`` as ranks 0..world-1 and returns each rank's saved results."""
    env = dict(os.environ, PYTHONPATH=str(Path(optirs.__file__).resolve().parents[1]))
    env.pop("OPTIRS_NUM_THREADS", None)
    logs = [open(out_dir / f"rank{r}.log", "w") for r in range(world)]
    procs = [
        subprocess.Popen(
            [sys.executable, script, "--rank", str(r), "--out", str(out_dir)],
            stdout=logs[r],
            stderr=subprocess.STDOUT,
            env=env,
        )
        for r in range(world)
    ]
    deadline = time.monotonic() + timeout_s
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    failed = [r for r, p in enumerate(procs) if p.returncode != 0]
    if failed:
        text = "\n".join((out_dir / f"rank{r}.log").read_text()[-3000:] for r in failed)
        pytest.fail(f"worker rank(s) {failed} failed or timed out:\n{text}")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]


def main(worker: Callable[[int, Path], None], description: str) -> None:
    """The script end of a test file: ``worker(rank, out_dir)`` for ``--rank`` and ``--out``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    worker(args.rank, args.out)
