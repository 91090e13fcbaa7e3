"""Steps on the OpenMP team of the runtime torch loaded (src/omp.rs).

In a process with torch (hence libgomp on Linux), a large step runs on the calling thread's
OpenMP team, the warm team torch's forward and backward just used, instead of optirs's own
threads. The tests check that the choice is made as documented (``optirs._core.executor()``,
``OPTIRS_OPENMP``), that it changes no bit of any result, and that a forked child, where GNU
OpenMP hangs, steps on the own pool. (test_concurrency, test_panics and test_fork run every
test on both executors.)
"""

from __future__ import annotations

import ctypes.util
import os
import platform
import subprocess
import sys
import textwrap
import threading

import numpy as np
import optirs
import optirs.torch
import pytest
import torch
from conftest import FULL_STATE_KWARGS, OPTIMIZER_NAMES, optirs_class

LINUX = sys.platform.startswith("linux")
TIMEOUT = 120


@pytest.fixture
def two_threads():
    old = optirs.get_num_threads()
    optirs.set_num_threads(2)
    try:
        yield
    finally:
        optirs.set_num_threads(old)
        optirs._core._set_openmp(True)


def test_a_torch_process_steps_on_the_openmp_team(two_threads) -> None:
    assert optirs._core.executor() == ("openmp" if LINUX else "pool")
    optirs._core._set_openmp(False)
    assert optirs._core.executor() == "pool"
    optirs._core._set_openmp(True)
    optirs.set_num_threads(1)
    assert optirs._core.executor() == "serial"


def test_a_team_kept_to_one_thread_is_not_borrowed(two_threads) -> None:
    """torch.set_num_threads(1) (as in DataLoader workers): no warm team, and in a child forked
    before optirs was imported the only safe choice; the own pool steps at optirs's count."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert optirs._core.executor() == "pool"
        assert _run("Adam", openmp=True, threads=2)[0].tobytes() == (
            _run("Adam", openmp=False, threads=2)[0].tobytes()
        )
    finally:
        torch.set_num_threads(old)
    optirs._core._set_openmp(True)
    assert optirs._core.executor() == ("openmp" if LINUX else "pool")


def _run(name: str, openmp: bool, threads: int, steps: int = 3) -> list[np.ndarray]:
    """Parameters and state of ``steps`` steps of ``name`` over several multi-chunk tensors."""
    optirs._core._set_openmp(openmp)
    optirs.set_num_threads(threads)
    rng = np.random.default_rng(7)
    chunk = optirs._core.CHUNK_ELEMS
    sizes = (7 * chunk + 13, 3 * chunk, 1000, 2 * chunk + 1)
    params = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    opt = optirs_class(name)(params, **FULL_STATE_KWARGS[name])
    for k in range(steps):
        grads = [np.sin(p * (k + 1)).astype(np.float32) for p in params]
        opt.step(grads)
    state = [a for s in opt.state_dict()["state"].values() for a in s.values()]
    return [p.copy() for p in params] + [np.asarray(a).copy() for a in state]


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_the_openmp_team_gives_the_bits_of_the_pool_and_of_one_thread(two_threads, name) -> None:
    on_team = _run(name, openmp=True, threads=2)
    assert optirs._core.executor() == ("openmp" if LINUX else "pool")
    on_pool = _run(name, openmp=False, threads=2)
    alone = _run(name, openmp=True, threads=1)
    for a, b, c in zip(on_team, on_pool, alone):
        assert a.tobytes() == b.tobytes() == c.tobytes()


def test_bridge_steps_on_the_team_as_on_the_pool(two_threads) -> None:
    def train(openmp: bool) -> list[torch.Tensor]:
        optirs._core._set_openmp(openmp)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(300, 400), torch.nn.Linear(400, 10))
        opt = optirs.torch.AdamW(model.parameters(), lr=1e-2)
        x, y = torch.randn(32, 300), torch.randint(10, (32,))
        for _ in range(4):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(train(True), train(False)):
        assert torch.equal(a, b)


def test_steps_from_several_threads_at_once_on_their_own_teams(two_threads) -> None:
    """Each Python thread that steps gets its own OpenMP team; results stay exact."""
    expected = _run("Adam", openmp=False, threads=2)
    optirs._core._set_openmp(True)
    results: dict[int, list[np.ndarray]] = {}
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            results[k] = _run("Adam", openmp=True, threads=2)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert not errors
    assert sorted(results) == [0, 1, 2]
    for got in results.values():
        for a, b in zip(got, expected):
            assert a.tobytes() == b.tobytes()


def _script(body: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(body)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "darwin", reason="needs os.fork")
def test_a_forked_child_steps_on_the_own_pool_after_the_parent_used_the_team() -> None:
    """GNU OpenMP hangs in a child of a process that ran a parallel region: the child must not
    touch it. Here torch and optirs both ran on the team before the fork; the child steps at 2
    threads, on the own pool, and gets the parent's bits."""
    proc = _script(
        """
        import os, sys
        import numpy as np, optirs, torch
        torch.set_num_threads(2); optirs.set_num_threads(2)
        torch.randn(512, 512) @ torch.randn(512, 512)  # torch's team is up
        N = 1 << 20
        p = np.linspace(-1, 1, N, dtype=np.float32); opt = optirs.Adam([p], lr=1e-2)
        g = np.cos(p)
        opt.step([g])
        assert optirs._core.executor() == "openmp", optirs._core.executor()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                ok = optirs._core.executor() == "pool"
                opt.step([g]); opt.step([g])
                os.write(w, (b"1" if ok else b"e") + p.tobytes())
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            data = f.read()
        os.waitpid(pid, 0)
        opt.step([g]); opt.step([g])
        assert data[:1] == b"1", data[:1]
        assert data[1:] == p.tobytes()
        print("ok")
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


@pytest.mark.parametrize(
    ("value", "expected", "warns"),
    [("0", "pool", False), ("1", "openmp", False), ("yes", "openmp", True)],
)
def test_optirs_openmp_variable(value: str, expected: str, warns: bool) -> None:
    proc = _script(
        """
        import warnings
        warnings.simplefilter("always")
        import optirs, torch
        optirs.set_num_threads(2)
        print(optirs._core.executor())
        """,
        {"OPTIRS_OPENMP": value},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (expected if LINUX else "pool")
    assert ("OPTIRS_OPENMP" in proc.stderr) == warns, proc.stderr


def test_a_process_without_an_openmp_runtime_uses_the_own_pool() -> None:
    proc = _script(
        """
        import sys
        import optirs
        optirs.set_num_threads(2)
        assert "torch" not in sys.modules
        print(optirs._core.executor())
        """
    )
    assert proc.returncode == 0, proc.stderr
    # NumPy's OpenBLAS uses pthreads, not OpenMP: nothing to borrow
    assert proc.stdout.strip() == "pool"


def _wheel_file(dist: str, name: str) -> str:
    """Where the installed distribution ``dist`` put its file ``name`` (a wheel's data files
    land in the prefix of the environment it was installed into, which need not be this
    interpreter's: the wheel under test runs in a venv that sees the dev venv's packages)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        d = distribution(dist)
    except PackageNotFoundError:
        return f"<{dist} is not installed>"
    for f in d.files or ():
        if f.name == name:
            return os.path.normpath(str(d.locate_file(f)))
    return f"<{dist} has no {name}>"


def _other_runtimes() -> list[pytest.param]:
    """Intel's (libiomp5, from the intel-openmp wheel requirements-dev.txt installs on Linux
    x86-64) and LLVM's (libomp.so.5, where the system has it): the runtimes torch builds other
    than PyPI's link instead of libgomp. Both export libgomp's ``GOMP_parallel``."""
    iomp5 = _wheel_file("intel-openmp", "libiomp5.so")
    llvm = ctypes.util.find_library("omp")
    return [
        pytest.param(
            iomp5,
            marks=pytest.mark.skipif(
                not (LINUX and platform.machine() == "x86_64"),
                reason="intel-openmp has Linux x86-64 wheels only",
            ),
            id="intel-libiomp5",
        ),
        pytest.param(
            llvm,
            marks=pytest.mark.skipif(
                not LINUX or llvm is None, reason="LLVM's libomp is not installed on this system"
            ),
            id="llvm-libomp",
        ),
    ]


@pytest.mark.parametrize("runtime", _other_runtimes())
def test_intel_and_llvm_runtimes_give_the_same_bits_and_a_fork_uses_the_own_pool(
    runtime: str,
) -> None:
    """A torch-free process that loaded Intel's or LLVM's OpenMP runtime steps on its team (two
    threads), with the bits of the own pool, and a child forked after a step on the team
    steps on the own pool with the parent's bits."""
    # the wheel's file by path; the system's library by the name the loader finds
    assert not os.path.isabs(runtime) or os.path.exists(runtime), (
        f"{runtime} missing: pip install -r requirements-dev.txt"
    )
    proc = _script(
        f"""
        import ctypes, os, sys
        lib = ctypes.CDLL({runtime!r}, mode=ctypes.RTLD_GLOBAL)
        import numpy as np, optirs
        assert "torch" not in sys.modules
        optirs.set_num_threads(2)
        assert lib.omp_get_max_threads() == 2

        def run(openmp, opt=None, p=None):
            optirs._core._set_openmp(openmp)
            if opt is None:
                p = np.linspace(-1, 1, 1 << 21, dtype=np.float32)
                opt = optirs.AdamW([p], lr=1e-2)
            for k in range(3):
                opt.step([np.cos(p * (k + 1))])
            return opt, p

        opt, on_team = run(True)
        assert optirs._core.executor() == "openmp", optirs._core.executor()
        _, on_pool = run(False)
        assert on_team.tobytes() == on_pool.tobytes()
        optirs._core._set_openmp(True)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                ok = optirs._core.executor() == "pool"
                run(True, opt, on_team)
                os.write(w, (b"1" if ok else b"e") + on_team.tobytes())
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            data = f.read()
        os.waitpid(pid, 0)
        run(True, opt, on_team)
        assert data[:1] == b"1", data[:1]
        assert data[1:] == on_team.tobytes()
        print("ok")
        """,
        {"OMP_NUM_THREADS": "2"},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
