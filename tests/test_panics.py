"""A Rust panic inside a step surfaces as RuntimeError and leaves the interpreter usable.

The core has a test-only trigger, ``optirs._core.step(..., _panic_for_tests=...)``:
"validation" panics after every check passed and before anything is written (nothing may
change), "worker" panics inside the work items (on the thread pool for large steps, on the
calling thread for small ones). The tests route each optimizer's own call into the core through
that trigger (``monkeypatch`` on ``optirs._core.step``, which both APIs look up at call time,
and on the NumPy API's and the bridge's ``_Plan.step``, which call the core's ``ArrayPlan.step``
and ``TorchPlan.step``),
for the NumPy API and the torch bridge (its first, state-creating step and its cached-plan
steps), and check: RuntimeError mentioning "internal error", never pyo3's PanicException
(a BaseException that ``except Exception`` would miss); for "validation" nothing changed and
training continues bitwise like a run that never saw the panic; for both, later steps work,
the thread pool still gives the bits a single thread gives, the optimizer's lock was released,
and a step that flushes denormals restores the thread's floating-point mode even when it
panics.
"""

from __future__ import annotations

import functools
import threading

import numpy as np
import optirs
import optirs.torch
import pytest
import torch
from conftest import (
    FULL_STATE_KWARGS,
    OPTIMIZER_NAMES,
    assert_snapshot_equal,
    optirs_class,
    snapshot,
)
from test_bad_input import Setup, assert_continues_like_untouched_twin
from test_reliability_bad_input import BridgeSetup, bridge_continues_like_twin
from torch_helpers import assert_unchanged
from torch_helpers import snapshot as tsnapshot

# Every test runs on optirs's own pool and on the OpenMP team (conftest.executor).
BOTH_EXECUTORS = True

WHERE = ("validation", "worker")
INTERNAL = r"internal error"


@pytest.fixture
def panic_at(monkeypatch):
    """``panic_at(where)`` makes every step panic there; ``panic_at(None)`` undoes it."""
    original = optirs._core.step
    original_plan_step = optirs.torch._Plan.step
    original_array_plan_step = optirs._Plan.step

    def set_trigger(where):
        if where is None:
            monkeypatch.setattr(optirs._core, "step", original)
            monkeypatch.setattr(optirs.torch._Plan, "step", original_plan_step)
            monkeypatch.setattr(optirs._Plan, "step", original_array_plan_step)
        else:
            monkeypatch.setattr(
                optirs._core, "step", functools.partial(original, _panic_for_tests=where)
            )

            # The NumPy API's steps after the first call the core through their plan.
            def array_plan_step(self, groups, grads, options):
                return original_array_plan_step(
                    self, groups, grads, {**options, "_panic_for_tests": where}
                )

            monkeypatch.setattr(optirs._Plan, "step", array_plan_step)

            # The bridge's cached-plan steps call the core through their plan.
            def plan_step(self, opt):
                return self.core.step(
                    opt.param_groups, opt.state, **opt._options(), _panic_for_tests=where
                )

            monkeypatch.setattr(optirs.torch._Plan, "step", plan_step)

    return set_trigger


def _assert_internal_error(excinfo) -> None:
    assert type(excinfo.value) is RuntimeError, type(excinfo.value)
    assert "internal error" in str(excinfo.value)


# --------------------------------------------------------------------------------------------
# NumPy API
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_numpy_validation_panic_changes_nothing(name, panic_at):
    s = Setup(name, np.float64)
    grads = s.grads()
    before = snapshot(s.opt)
    panic_at("validation")
    for _ in range(3):
        with pytest.raises(RuntimeError) as excinfo:
            s.opt.step(grads)
        _assert_internal_error(excinfo)
        assert_snapshot_equal(before, snapshot(s.opt))
    panic_at(None)
    assert_continues_like_untouched_twin(s, name, np.float64, grads)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_numpy_validation_panic_on_first_step_creates_no_state(name, panic_at):
    params = [np.ones(5), np.ones(200_003)]
    opt = optirs_class(name)(params, **FULL_STATE_KWARGS[name])
    before = snapshot(opt)
    panic_at("validation")
    with pytest.raises(RuntimeError) as excinfo:
        opt.step([np.ones(5), np.ones(200_003)])
    _assert_internal_error(excinfo)
    assert_snapshot_equal(before, snapshot(opt))
    panic_at(None)
    opt.step([np.ones(5), np.ones(200_003)])
    twin_params = [np.ones(5), np.ones(200_003)]
    twin = optirs_class(name)(twin_params, **FULL_STATE_KWARGS[name])
    twin.step([np.ones(5), np.ones(200_003)])
    assert [p.tobytes() for p in params] == [p.tobytes() for p in twin_params]


def _pool_bits(name: str, threads: int) -> bytes:
    saved = optirs.get_num_threads()
    try:
        optirs.set_num_threads(threads)
        rng = np.random.default_rng(9)
        p = rng.standard_normal(300_001).astype(np.float32)
        opt = optirs_class(name)([p], **FULL_STATE_KWARGS[name])
        for _ in range(2):
            opt.step([rng.standard_normal(p.shape).astype(np.float32)])
        return p.tobytes()
    finally:
        optirs.set_num_threads(saved)


@pytest.mark.parametrize("size", [33, 300_001], ids=["calling_thread", "pool"])
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_numpy_worker_panic_leaves_interpreter_usable(name, size, panic_at):
    saved = optirs.get_num_threads()
    optirs.set_num_threads(2)
    try:
        p = np.linspace(-1, 1, size)
        opt = optirs_class(name)([p], **FULL_STATE_KWARGS[name])
        opt.step([np.ones(size)])
        panic_at("worker")
        for _ in range(3):
            with pytest.raises(RuntimeError) as excinfo:
                opt.step([np.ones(size)])
            _assert_internal_error(excinfo)
        panic_at(None)
        # The same optimizer steps again, and the pool gives the same bits as one thread.
        opt.step([np.full(size, 0.5)])
        assert np.all(np.isfinite(p))
        assert _pool_bits(name, 2) == _pool_bits(name, 1)
    finally:
        optirs.set_num_threads(saved)


def test_lock_is_released_after_a_panic(panic_at):
    """Another thread can step the optimizer after a step of it panicked."""
    p = np.zeros(10)
    opt = optirs.SGD([p], lr=1.0)
    panic_at("worker")
    with pytest.raises(RuntimeError):
        opt.step([np.ones(10)])
    panic_at(None)
    t = threading.Thread(target=opt.step, args=([np.ones(10)],))
    t.start()
    t.join(30)
    assert not t.is_alive(), "the optimizer's lock was left held by the panicking step"
    assert np.all(p == -1.0)


def test_many_panics_in_a_row(panic_at):
    p = np.zeros(70_000, np.float32)
    opt = optirs.Adam([p])
    for i in range(200):
        panic_at(WHERE[i % 2])
        with pytest.raises(RuntimeError, match=INTERNAL):
            opt.step([np.ones_like(p)])
    panic_at(None)
    opt.step([np.ones_like(p)])
    assert float(opt.state[p]["step"]) == 1.0


def _denormal_survives() -> bool:
    """Whether this thread computes denormals (MXCSR's flush-to-zero bits are off)."""
    tiny32 = np.float32(1e-40) * np.float32(1.0)
    tiny64 = np.float64(1e-310) * np.float64(1.0)
    return bool(tiny32 != 0 and tiny64 != 0)


@pytest.mark.parametrize("size", [16, 200_000], ids=["calling_thread", "pool"])
@pytest.mark.parametrize("where", WHERE)
def test_flush_mode_restored_after_a_panic(where, size, panic_at):
    assert _denormal_survives()
    p = np.full(size, 1e-39, np.float32)
    opt = optirs.SGD([p], lr=0.5, weight_decay=0.5, flush_denormals=True)
    panic_at(where)
    with pytest.raises(RuntimeError, match=INTERNAL):
        opt.step([np.zeros(size, np.float32)])
    panic_at(None)
    assert _denormal_survives(), "the panicking step left flush-to-zero on"
    # The pool's threads too: a plain step there still makes denormals.
    q = np.full(200_000, 1e-37, np.float32)
    plain = optirs.SGD([q], lr=0.5, weight_decay=0.5)
    for _ in range(8):
        plain.step([np.zeros_like(q)])
    assert np.all(q != 0) and np.all(q < np.finfo(np.float32).tiny)


def test_core_step_called_directly(panic_at):
    """The trigger on a hand-made call into the core (the argument layout of _core.pyi)."""
    p, g = np.zeros(4), np.ones(4)
    groups = [
        {
            "params": [p],
            "lr": 0.1,
            "momentum": 0.0,
            "dampening": 0.0,
            "weight_decay": 0.0,
            "nesterov": False,
            "maximize": False,
        }
    ]
    for where in WHERE:
        with pytest.raises(RuntimeError) as excinfo:
            optirs._core.step(
                "sgd", groups, [p], [g], [(None,)], [None], [False], _panic_for_tests=where
            )
        _assert_internal_error(excinfo)
    assert np.all(p == 0.0)
    assert optirs._core.step("sgd", groups, [p], [g], [(None,)], [None], [False]) is True
    assert np.allclose(p, -0.1)


# --------------------------------------------------------------------------------------------
# torch bridge
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["first_step", "cached_plan"])
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_bridge_validation_panic_changes_nothing(name, path, panic_at):
    s = BridgeSetup(name, pre_steps=2 if path == "cached_plan" else 0)
    grads = s.grads()
    for p, g in zip(s.params, grads):
        p.grad = g.clone()
    before = tsnapshot(s.opt)
    panic_at("validation")
    for _ in range(2):
        with pytest.raises(RuntimeError) as excinfo:
            s.opt.step()
        _assert_internal_error(excinfo)
        assert_unchanged(s.opt, before)
    panic_at(None)
    if path == "cached_plan":
        bridge_continues_like_twin(s, grads)
    else:
        assert len(s.opt.state) == (4 if name == "Adagrad" else 0)
        s.opt.step()
        assert all(p in s.opt.state for p in s.params)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_bridge_worker_panic_leaves_interpreter_usable(name, panic_at):
    s = BridgeSetup(name)
    grads = s.grads()
    for p, g in zip(s.params, grads):
        p.grad = g.clone()
    panic_at("worker")
    with pytest.raises(RuntimeError) as excinfo:
        s.opt.step()
    _assert_internal_error(excinfo)
    panic_at(None)
    s.step(s.grads())
    s.step(s.grads())
    assert all(torch.isfinite(p).all() for p in s.params)
    assert s.opt.skipped_steps == 0 and not s.opt.last_step_skipped
