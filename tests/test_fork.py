"""Forked children step without hanging, after the parent's steps started the thread pool.

A thread pool does not survive ``fork()``: the child inherits its bookkeeping but none of its
threads, so a child that reused it would wait forever. optirs rebuilds the pool in a child.
Each scenario runs in a fresh interpreter (``subprocess``, with a timeout), so that a hang or a
crash fails its test instead of stopping pytest, and fork never runs inside the pytest process
itself; inside the scenario, every child is waited for with a deadline and killed past it.
The children check their results bitwise against the parent's (the core gives the same bits
for any thread count), and the parent checks that it still steps after the fork.

Scenarios: ``os.fork`` (NumPy API, torch bridge, a grandchild, a child that changes the thread
count), ``multiprocessing`` with the "fork" start method (a Process and a Pool), and a torch
DataLoader with two forked workers whose dataset steps optimizers in ``__getitem__``.
(test_api.py has the basic os.fork case of the NumPy API.) torch's own intra-op pool (OpenMP)
is not fork-safe; the os.fork bridge scenario keeps torch at one thread, as DataLoader workers
do, so that only optirs's pool is under test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

# Every test runs on optirs's own pool and on the OpenMP team (conftest.executor).
BOTH_EXECUTORS = True

pytestmark = pytest.mark.skipif(
    not hasattr(os, "fork") or sys.platform == "darwin", reason="needs a fork-safe os.fork"
)

TIMEOUT = 180  # seconds for a whole scenario; a hang anywhere in it fails the test

PRELUDE = """
import os, signal, sys, time
import numpy as np
import optirs

optirs.set_num_threads(2)
N = 1 << 18  # above the core's parallel threshold: steps use the pool
G = np.linspace(1, 2, N, dtype=np.float32)


def make(cls=optirs.Adam, **kw):
    p = np.linspace(-1, 1, N, dtype=np.float32)
    return p, cls([p], lr=1e-2, **kw)


def expected(steps, cls=optirs.Adam, **kw):
    p, opt = make(cls, **kw)
    for _ in range(steps):
        opt.step([G])
    return p.tobytes()


def wait(pid, limit=60):
    deadline = time.monotonic() + limit
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "hang"
        time.sleep(0.01)


def child(body):
    # Runs body() in a forked child; returns its exit code ("hang" past the deadline).
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = 0 if body() else 2
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            os._exit(code)
    return wait(pid)
"""


def run_scenario(body: str) -> None:
    code = PRELUDE + textwrap.dedent(body) + '\nprint("SCENARIO-OK")\n'
    env = dict(os.environ, PYTHONFAULTHANDLER="1")
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            env=env,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"scenario hung (> {TIMEOUT} s); output so far:\n{e.stdout}\n{e.stderr}")
    assert proc.returncode == 0 and "SCENARIO-OK" in proc.stdout, (
        f"exit code {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )


def test_os_fork_numpy_child_and_grandchild():
    run_scenario(
        """
        want1, want2, want3 = expected(1), expected(2), expected(3)
        p, opt = make()
        opt.step([G])  # the parent's pool is running now

        def in_child():
            opt.step([G])  # the inherited optimizer, on a pool rebuilt in the child
            fresh, fopt = make()
            fopt.step([G])

            def in_grandchild():
                q, o = make()
                o.step([G])
                o.step([G])
                return q.tobytes() == want2

            return (
                p.tobytes() == want2
                and fresh.tobytes() == want1
                and child(in_grandchild) == 0
            )

        assert child(in_child) == 0
        assert p.tobytes() == want1  # the child's step did not reach the parent
        opt.step([G])
        opt.step([G])
        assert p.tobytes() == want3
        """
    )


def test_os_fork_child_changes_thread_count():
    run_scenario(
        """
        want = expected(2)
        p, opt = make()
        opt.step([G])

        def in_child():
            optirs.set_num_threads(3)
            opt.step([G])
            ok = p.tobytes() == want and optirs.get_num_threads() == 3
            optirs.set_num_threads(1)
            q, o = make()
            o.step([G])
            o.step([G])
            return ok and q.tobytes() == want

        assert child(in_child) == 0
        assert optirs.get_num_threads() == 2
        """
    )


def test_os_fork_torch_bridge():
    run_scenario(
        """
        import torch
        import optirs.torch

        # torch's own OpenMP pool is not fork-safe (a child hangs in its first parallel torch
        # op once the parent has used it; DataLoader workers set 1 thread for that reason):
        # keep torch's ops serial so that what is tested is optirs's pool.
        torch.set_num_threads(1)

        def make_t():
            p = torch.nn.Parameter(torch.linspace(-1, 1, N))
            p.grad = torch.from_numpy(G.copy())
            return p, optirs.torch.AdamW([p], lr=1e-2, weight_decay=0.1)

        ref, ref_opt = make_t()
        ref_opt.step()
        ref_opt.step()
        want = ref.detach().numpy().tobytes()
        p, opt = make_t()
        opt.step()

        def in_child():
            opt.step()
            q, o = make_t()
            o.step()
            o.step()
            return (
                p.detach().numpy().tobytes() == want
                and q.detach().numpy().tobytes() == want
            )

        assert child(in_child) == 0
        opt.step()
        assert float(opt.state[p]["step"]) == 2.0
        """
    )


def test_multiprocessing_fork_process_and_pool():
    run_scenario(
        """
        import multiprocessing

        ctx = multiprocessing.get_context("fork")
        want1, want2 = expected(1, optirs.SGD, momentum=0.9), expected(2, optirs.SGD, momentum=0.9)
        p, opt = make(optirs.SGD, momentum=0.9)
        opt.step([G])

        def work(queue):
            opt.step([G])
            queue.put(p.tobytes() == want2)

        queue = ctx.Queue()
        proc = ctx.Process(target=work, args=(queue,))
        proc.start()
        proc.join(60)
        if proc.is_alive():
            proc.kill()
            raise SystemExit("the fork-started Process hung")
        assert proc.exitcode == 0, proc.exitcode
        assert queue.get(timeout=10) is True

        def fresh_run(i):
            q, o = make(optirs.SGD, momentum=0.9)
            o.step([G])
            return q.tobytes() == want1

        with ctx.Pool(2) as pool:
            results = pool.map_async(fresh_run, range(6)).get(timeout=60)
        assert results == [True] * 6, results
        assert p.tobytes() == want1
        """
    )


def test_dataloader_workers_step_optimizers():
    run_scenario(
        """
        import torch
        import optirs.torch
        from torch.utils.data import DataLoader, Dataset

        class Stepping(Dataset):
            # Each item steps a NumPy-API and a bridge optimizer (on the pool: N elements).
            def __len__(self):
                return 8

            def __getitem__(self, i):
                q, o = make(optirs.RMSprop, momentum=0.5)
                o.step([G * (i + 1)])
                t = torch.nn.Parameter(torch.linspace(-1, 1, N))
                t.grad = torch.from_numpy(G * (i + 1))
                topt = optirs.torch.Adam([t], lr=1e-2)
                topt.step()
                return (
                    torch.tensor([float(q.astype(np.float64).sum()), float(t.double().sum())]),
                    os.getpid(),
                )

        data = Stepping()
        want = [data[i][0] for i in range(len(data))]  # also starts the parent's pool
        loader = DataLoader(
            data, batch_size=2, num_workers=2, multiprocessing_context="fork", timeout=60
        )
        got, pids = [], set()
        for values, pid in loader:
            got.extend(values)
            pids.update(int(x) for x in pid)
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert torch.equal(a, b), (a, b)
        assert os.getpid() not in pids and len(pids) >= 1, pids
        """
    )
