"""The NumPy API steps through a plan kept in the core (``_core.ArrayPlan``) once a full step
has checked every array; every change the plan depends on must show.

Each test makes a change between steps and checks either that the result is what the full step
gives for the same change (a twin optimizer whose plan is never used), or that the step is
refused with the full step's error and nothing changed. Changes made in place on an array the
plan holds (``resize``, a new dtype or shape, a cleared writeable flag) are the ones only the
plan's own re-checks can see: the NumPy API's checks look at which arrays it has, not inside
them.
"""

from __future__ import annotations

import numpy as np
import optirs
import pytest
from conftest import (
    assert_bitwise_equal_params,
    assert_bitwise_equal_state,
    assert_snapshot_equal,
    snapshot,
)


def _grads(seed, params):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(p.shape).astype(p.dtype) for p in params]


def _make(name="Adam", dtype=np.float32, **kwargs):
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(s).astype(dtype) for s in ((5,), (3, 7), (40,))]
    return params, getattr(optirs, name)(params, lr=0.1, **kwargs)


def _without_plan(monkeypatch):
    """Every step of every NumPy optimizer takes the full path."""
    monkeypatch.setattr(optirs._Plan, "step", lambda self, groups, grads, options: None)


def _run(name, kwargs, planned, monkeypatch, grads_of):
    """Six steps of a planned optimizer, or of one without a plan; returns (params, opt)."""
    with monkeypatch.context() as m:
        if not planned:
            _without_plan(m)
        params, opt = _make(name, **kwargs)
        for step in range(6):
            opt.param_groups[0]["lr"] = 0.1 / (1 + step)  # a learning-rate schedule
            opt.step(grads_of(step, params))
    return params, opt


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "RMSprop", "Adagrad"])
def test_later_steps_go_through_the_plan(name, monkeypatch):
    params, opt = _make(name, **({"momentum": 0.9} if name in ("SGD", "RMSprop") else {}))
    full = []
    core_step = optirs._core.step

    def counting(*args, **kwargs):
        full.append(args[0])
        return core_step(*args, **kwargs)

    monkeypatch.setattr(optirs._core, "step", counting)
    for step in range(6):
        opt.step(_grads(step, params))
    # The first step makes the state (a full step; Adagrad makes its state when constructed),
    # the next builds the plan (another), then none: a new gradient array every step is what
    # the plan expects.
    assert len(full) == (1 if name == "Adagrad" else 2)
    assert len(opt._plan.core) == len(params)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("SGD", {"momentum": 0.9, "nesterov": True}),
        ("Adam", {"amsgrad": True, "weight_decay": 0.1}),
        ("AdamW", {}),
        ("RMSprop", {"centered": True, "momentum": 0.5}),
        ("Adagrad", {"lr_decay": 0.01}),
    ],
)
def test_schedules_and_missing_gradients_give_the_full_steps_bits(name, kwargs, monkeypatch):
    def some_missing(step, params):
        grads = _grads(step, params)
        if step % 2:
            grads[1] = None
        return grads

    for grads_of in (_grads, some_missing):
        params, opt = _run(name, kwargs, True, monkeypatch, grads_of)
        twin_params, twin = _run(name, kwargs, False, monkeypatch, grads_of)
        assert_bitwise_equal_params(params, twin_params)
        assert_bitwise_equal_state(opt, twin)


def test_parameter_resized_in_place_is_not_written_through_its_old_memory():
    params, opt = _make()
    for step in range(3):
        opt.step(_grads(step, params))
    old = params[2].copy()
    params[2].resize((80,), refcheck=False)  # new memory, new shape
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[2\].*shape"):
        opt.step(_grads(3, params))
    assert_snapshot_equal(before, snapshot(opt))
    np.testing.assert_array_equal(params[2][:40], old)


def test_parameter_moved_by_resize_is_stepped_in_its_new_memory(monkeypatch):
    """Same shape, new memory: only the data pointer tells."""
    results = []
    for planned in (True, False):
        with monkeypatch.context() as m:
            if not planned:
                _without_plan(m)
            params, opt = _make()
            for step in range(3):
                opt.step(_grads(step, params))
            address = params[2].ctypes.data
            values = params[2].copy()
            # Through a size glibc serves with mmap: the memory cannot stay where it was.
            params[2].resize((1_000_000,), refcheck=False)
            params[2].resize((40,), refcheck=False)
            assert params[2].ctypes.data != address
            np.testing.assert_array_equal(params[2], values)
            opt.step(_grads(3, params))
            assert not np.array_equal(params[2], values)
            results.append(params)
    assert_bitwise_equal_params(*results)


def test_parameter_dtype_or_shape_assigned_in_place_is_seen():
    params, opt = _make()
    for step in range(3):
        opt.step(_grads(step, params))
    grads = _grads(3, params)
    params[1].shape = (7, 3)  # same memory, other shape
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"grads\[1\].*shape \[3, 7\], expected \[7, 3\]"):
        opt.step(grads)
    assert_snapshot_equal(before, snapshot(opt))
    params[1].shape = (3, 7)
    params[0].dtype = np.int32  # same memory read as integers
    before = snapshot(opt)
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[0\] has dtype int32"):
        opt.step(grads)
    assert_snapshot_equal(before, snapshot(opt))
    params[0].dtype = np.float32
    opt.step(grads)  # and back: it steps again


@pytest.mark.parametrize("key", ["exp_avg", "exp_avg_sq", "step"])
def test_state_array_made_read_only_in_place_is_refused(key):
    params, opt = _make()
    for step in range(3):
        opt.step(_grads(step, params))
    opt.state[params[1]][key].flags.writeable = False
    before = snapshot(opt)
    with pytest.raises(
        ValueError, match=rf"state\['{key}'\] of param_groups\[0\]\['params'\]\[1\]"
    ):
        opt.step(_grads(3, params))
    assert_snapshot_equal(before, snapshot(opt))


def test_state_buffer_resized_in_place_is_refused():
    params, opt = _make("RMSprop", momentum=0.9)
    for step in range(3):
        opt.step(_grads(step, params))
    opt.state[params[2]]["momentum_buffer"].resize((41,), refcheck=False)
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"state\['momentum_buffer'\].*shape \[41\]"):
        opt.step(_grads(3, params))
    assert_snapshot_equal(before, snapshot(opt))


def test_step_counter_set_negative_in_place_is_refused():
    params, opt = _make()
    for step in range(3):
        opt.step(_grads(step, params))
    opt.state[params[0]]["step"][()] = -1.0
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"finite step count >= 0, got -1"):
        opt.step(_grads(3, params))
    assert_snapshot_equal(before, snapshot(opt))


@pytest.mark.parametrize(
    "make_grad, exc, pattern",
    [
        (lambda p, opt: opt.state[p]["exp_avg"], ValueError, "share memory"),
        (lambda p, opt: p, ValueError, "share memory"),
        (lambda p, opt: opt.state[p]["step"].reshape(1).repeat(p.size), None, None),
        (lambda p, opt: np.ones(2 * p.size, p.dtype)[::2], ValueError, "C-contiguous"),
        (lambda p, opt: np.ones(p.shape, np.float64), TypeError, "dtype float64"),
        (lambda p, opt: np.ones(p.size + 1, p.dtype), ValueError, "shape"),
        (lambda p, opt: list(np.ones(p.size, p.dtype)), TypeError, "numpy.ndarray"),
    ],
)
def test_new_gradients_are_checked_as_the_full_step_checks_them(make_grad, exc, pattern):
    params, opt = _make()
    for step in range(3):
        opt.step(_grads(step, params))
    grads = _grads(3, params)
    grads[2] = make_grad(params[2], opt)
    if exc is None:  # a fine gradient (a copy of the counter's value): steps
        opt.step(grads)
        return
    before = snapshot(opt)
    with pytest.raises(exc, match=pattern):
        opt.step(grads)
    assert_snapshot_equal(before, snapshot(opt))


def test_the_plan_refuses_what_it_did_not_check():
    """Called directly: a gradient for a parameter the full step did not step, a group whose
    options need other buffers, or a gradient list of another length give None (nothing
    written); the NumPy API then runs the full step."""
    params, opt = _make()
    grads = _grads(0, params)
    opt.step(grads)
    grads[1] = None
    opt.step(grads)  # the full step that builds the plan: params[1] has no gradient
    plan = opt._plan.core
    before = snapshot(opt)
    assert plan.step(opt.param_groups, _grads(1, params)) is None
    assert plan.step(opt.param_groups, _grads(1, params)[:2]) is None
    group = dict(opt.param_groups[0], amsgrad=True)
    assert plan.step([group], [grads[0], None, grads[2]]) is None
    assert_snapshot_equal(before, snapshot(opt))
    assert plan.step(opt.param_groups, [grads[0], None, grads[2]]) is True
    assert len(plan) == 2
