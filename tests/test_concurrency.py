"""Threads: steps of one optimizer are serialised, separate optimizers run side by side, and the
GIL is released while the Rust core updates.

- Two Python threads stepping one optimizer 200 times each must end exactly where 400
  sequential steps end. Every step gets the same gradient, so the result does not depend on how
  the threads interleave, only on every step being applied whole and alone (overlapping steps
  lose updates of the parameters, the momentum buffers or the step counters). The arrays are
  large enough (2**17 elements, several work items on the thread pool) for two unserialised
  steps to overlap in time.
- Separate optimizers in separate threads give the bits they give when run one after the
  other, including one with ``flush_denormals`` next to one without (the flush mode is per
  work item on shared pool threads and must not leak from one step into the other).
- GIL release, without any timing: ``sys.setswitchinterval`` is raised to 100 s so that the
  interpreter never takes the GIL from the stepping thread by force; a second thread can then
  only run while the step is in progress if the step itself lets go of the GIL. That thread
  counts (or steps an optimizer of its own), sleeping briefly between increments so that it
  gives the GIL back whenever the main thread wants it.
"""

from __future__ import annotations

import sys
import threading
import time

import numpy as np
import optirs
import optirs.torch
import pytest
import torch

# Every test runs on optirs's own pool and on the OpenMP team (conftest.executor).
BOTH_EXECUTORS = True

N = 1 << 17  # elements per parameter: above the core's parallel threshold of 2**16
STEPS_PER_THREAD = 200

CONFIGS = {
    "SGD": {"lr": 1e-3, "momentum": 0.9},
    "Adam": {"lr": 1e-3, "amsgrad": True},
}


def _initial(dtype=np.float32):
    rng = np.random.default_rng(0)
    return [rng.standard_normal(N).astype(dtype), rng.standard_normal(7).astype(dtype)]


def _grads(dtype=np.float32):
    rng = np.random.default_rng(1)
    return [rng.standard_normal(N).astype(dtype), rng.standard_normal(7).astype(dtype)]


def _in_threads(n_threads: int, body) -> list[BaseException]:
    """Runs ``body(k)`` in ``n_threads`` threads started together; returns their exceptions."""
    barrier = threading.Barrier(n_threads)
    errors: list[BaseException] = []

    def run(k):
        try:
            barrier.wait()
            body(k)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
        assert not t.is_alive(), "a stepping thread hung"
    return errors


def _bits_numpy(opt) -> list[bytes]:
    out = []
    for group in opt.param_groups:
        for p in group["params"]:
            out.append(p.tobytes())
            out.extend(np.asarray(v).tobytes() for _, v in sorted(opt.state.get(p, {}).items()))
    return out


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_two_threads_stepping_one_numpy_optimizer_equal_sequential_steps(name):
    grads = _grads()
    shared = getattr(optirs, name)(_initial(), **CONFIGS[name])
    errors = _in_threads(
        2, lambda k: [shared.step([g.copy() for g in grads]) for _ in range(STEPS_PER_THREAD)]
    )
    assert not errors, errors

    sequential = getattr(optirs, name)(_initial(), **CONFIGS[name])
    for _ in range(2 * STEPS_PER_THREAD):
        sequential.step(grads)
    assert _bits_numpy(shared) == _bits_numpy(sequential)
    if name == "Adam":
        p = shared.param_groups[0]["params"][0]
        assert float(shared.state[p]["step"]) == 2 * STEPS_PER_THREAD
    assert shared.skipped_steps == 0 and not shared.last_step_skipped


def _bits_torch(opt) -> list[bytes]:
    out = []
    for group in opt.param_groups:
        for p in group["params"]:
            out.append(p.detach().numpy().tobytes())
            for _, v in sorted(opt.state[p].items()):
                out.append(v.numpy().tobytes())
    return out


def _bridge(name):
    params = [torch.nn.Parameter(torch.from_numpy(a)) for a in _initial()]
    for p, g in zip(params, _grads()):
        p.grad = torch.from_numpy(g)
    return getattr(optirs.torch, name)(params, **CONFIGS[name])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_two_threads_stepping_one_bridge_optimizer_equal_sequential_steps(name):
    shared = _bridge(name)
    errors = _in_threads(2, lambda k: [shared.step() for _ in range(STEPS_PER_THREAD)])
    assert not errors, errors
    sequential = _bridge(name)
    for _ in range(2 * STEPS_PER_THREAD):
        sequential.step()
    assert _bits_torch(shared) == _bits_torch(sequential)


def test_skipped_step_counter_is_exact_under_threads():
    """``skipped_steps`` is counted by every thread's skipped step, none lost."""
    grads = _grads()
    bad = [g.copy() for g in grads]
    bad[1][-1] = np.nan
    opt = optirs.SGD(_initial(), lr=1e-3, momentum=0.9, skip_nonfinite=True)
    errors = _in_threads(
        2,
        lambda k: [opt.step(grads if (i + k) % 2 else bad) for i in range(STEPS_PER_THREAD)],
    )
    assert not errors, errors
    assert opt.skipped_steps == STEPS_PER_THREAD
    reference = optirs.SGD(_initial(), lr=1e-3, momentum=0.9)
    for _ in range(STEPS_PER_THREAD):
        reference.step(grads)
    assert _bits_numpy(opt) == _bits_numpy(reference)


# --------------------------------------------------------------------------------------------
# separate optimizers in separate threads
# --------------------------------------------------------------------------------------------

# (optimizer, options, flush_denormals, gradient scale). Parameters start at ~1e-36 and the two
# SGDs decay them into float32's denormal range (below 1.2e-38): the flushing one must end up
# with none, the other one, running at the same time on the same pool, with many.
SEPARATE = [
    ("SGD", {"lr": 0.5, "weight_decay": 0.5}, True, 1e-39),
    ("SGD", {"lr": 0.5, "weight_decay": 0.5}, False, 1e-39),
    ("Adam", {"lr": 1e-2, "weight_decay": 0.1}, False, 1e-30),
    ("RMSprop", {"lr": 1e-2, "momentum": 0.5, "centered": True}, False, 1e-30),
]


def _separate_run(k: int) -> list[bytes]:
    """Optimizer ``k`` of SEPARATE over its own data, 40 steps."""
    name, kwargs, flush, scale = SEPARATE[k]
    rng = np.random.default_rng(100 + k)
    params = [
        (rng.standard_normal(N) * 1e-36).astype(np.float32),
        (rng.standard_normal(33) * 1e-36).astype(np.float32),
    ]
    opt = getattr(optirs, name)(params, flush_denormals=flush, **kwargs)
    for _ in range(40):
        opt.step([(rng.standard_normal(p.shape) * scale).astype(np.float32) for p in params])
    return _bits_numpy(opt)


def _denormals(raw: bytes) -> int:
    x = np.frombuffer(raw, np.float32)
    return int(np.count_nonzero((x != 0) & (np.abs(x) < np.finfo(np.float32).tiny)))


def test_separate_optimizers_in_separate_threads_give_their_sequential_bits():
    sequential = [_separate_run(k) for k in range(len(SEPARATE))]
    results: dict[int, list[bytes]] = {}
    for _ in range(2):
        errors = _in_threads(len(SEPARATE), lambda k: results.__setitem__(k, _separate_run(k)))
        assert not errors, errors
        for k in range(len(SEPARATE)):
            assert results[k] == sequential[k], SEPARATE[k][:3]
    assert _denormals(sequential[0][0]) == 0
    assert _denormals(sequential[1][0]) > N // 2


# --------------------------------------------------------------------------------------------
# the GIL is released during the update
# --------------------------------------------------------------------------------------------

LONG = 1 << 24  # float32 elements: a step of tens of milliseconds


class _NoForcedSwitches:
    """While active, the interpreter never takes the GIL from a thread by force."""

    def __enter__(self):
        self.saved = sys.getswitchinterval()
        sys.setswitchinterval(100.0)

    def __exit__(self, *exc):
        sys.setswitchinterval(self.saved)


def _background(body):
    """Starts ``body(stop)`` in a thread; returns (thread, stop event) once it has run."""
    stop, started = threading.Event(), threading.Event()

    def run():
        started.set()
        body(stop)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    started.wait(30)
    return t, stop


def _progresses_during(long_step, worker, count) -> tuple[bool, int]:
    """Runs ``long_step()`` up to 20 times while ``worker(stop)`` runs in a thread, and returns
    whether ``count[0]`` (which the worker increments) grew during one of them, and how many
    long steps ran.

    Whether the worker gets a turn inside one particular step is the scheduler's choice (2
    cores, shared); a process-wide lock or a held GIL would keep it from ever doing so.
    """
    with _NoForcedSwitches():
        t, stop = _background(worker)
        try:
            for steps in range(1, 21):
                before = count[0]
                long_step()
                if count[0] > before:
                    return True, steps
            return False, 20
        finally:
            stop.set()
            t.join(30)


def test_another_thread_runs_during_a_long_step():
    p = np.zeros(LONG, np.float32)
    g = np.ones(LONG, np.float32)
    opt = optirs.SGD([p], lr=0.5)
    opt.step([g])  # starts the pool and touches every page
    count = [0]

    def counter(stop):
        while not stop.is_set():
            count[0] += 1
            time.sleep(1e-4)  # gives the GIL back whenever the main thread asks for it

    progressed, steps = _progresses_during(lambda: opt.step([g]), counter, count)
    assert progressed, "no other Python thread ran while the step was in progress"
    expected = np.float32(-0.5) * (steps + 1)  # exact: multiples of 0.5
    assert p[0] == expected and p[-1] == expected


def test_another_optimizer_steps_during_a_long_step():
    """No process-wide lock: a second optimizer completes steps, correctly, meanwhile."""
    p = np.zeros(LONG, np.float32)
    g = np.ones(LONG, np.float32)
    big = optirs.SGD([p], lr=0.5)
    big.step([g])
    small_p = np.zeros(1000, np.float32)
    small_g = np.full(1000, 0.5, np.float32)
    small = optirs.Adam([small_p], lr=1e-3)
    done = [0]

    def stepper(stop):
        while not stop.is_set():
            small.step([small_g])
            done[0] += 1
            time.sleep(1e-4)

    progressed, _ = _progresses_during(lambda: big.step([g]), stepper, done)
    assert progressed, "no other optimizer could step while a long step was running"
    twin_p = np.zeros(1000, np.float32)
    twin = optirs.Adam([twin_p], lr=1e-3)
    for _ in range(done[0]):
        twin.step([small_g])
    assert twin_p.tobytes() == small_p.tobytes()
