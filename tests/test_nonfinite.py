"""Non-finite gradients and denormals: ``skip_nonfinite``, default propagation, GradScaler, and
``flush_denormals``.

- ``skip_nonfinite=True``: a step whose gradients hold NaN, +inf or -inf (here: only the very
  last element of the last gradient of the last group, behind ~70k finite elements spread over
  the thread pool) changes nothing (parameters, state buffers, step counts; no state created
  on a first step), counts in ``skipped_steps`` and sets ``last_step_skipped``; later steps
  continue bitwise like a run that never saw the bad step. With finite gradients the option
  changes no bit. Both APIs.
- Default: NaN and inf propagate as in torch.optim (test_parity.py and test_torch_bridge.py
  check small parameters; here a large one, over the pool, with the bad value last). A finite
  gradient so large that centered RMSprop's ``grad_avg**2`` overflows gives torch's result,
  the parameter unchanged, not NaN.
- ``torch.amp.GradScaler("cpu")``: an inf gradient makes the scaler skip the optimizer's step
  (nothing changed, the optimizer not even called) and halve its scale.
- ``flush_denormals=True``: every optimizer, both dtypes, both APIs, on data that drifts into
  the denormal range (tiny parameters and gradients, weight decay): the plain run ends with
  denormals in its parameters or state, the flushing run with none; on normal-range data the
  two give the same bits; flushing gives the same bits for every thread count and SIMD level;
  and the calling thread and the pool's threads compute denormals normally again after a
  flushing step (MXCSR restored), also after a skipped or refused one.
"""

from __future__ import annotations

import math

import numpy as np
import optirs
import optirs.torch
import pytest
import torch
from conftest import (
    DTYPE_IDS,
    FLOAT_DTYPES,
    FULL_STATE_KWARGS,
    OPTIMIZER_NAMES,
    SideBySide,
    assert_bitwise_equal_params,
    assert_bitwise_equal_state,
    assert_same_at_every_simd_level_and_thread_count,
    assert_snapshot_equal,
    flat_params,
    optirs_class,
    random_array,
    snapshot,
)
from test_reliability_bad_input import BridgeSetup, assert_bridge_bitwise_equal
from torch_helpers import assert_unchanged, bridge_class
from torch_helpers import snapshot as tsnapshot

BAD_VALUES = {"nan": math.nan, "+inf": math.inf, "-inf": -math.inf}
SHAPES = ((7,), (3, 5), (17,), (70_001,))  # the last one is split over the thread pool


class NumpySetup:
    """Four parameters in two groups, ``pre_steps`` good steps; twins share a seed."""

    def __init__(self, name, dtype=np.float32, seed=3, pre_steps=2, **options):
        self.rng = np.random.default_rng(seed)
        self.params = [random_array(self.rng, s, dtype) for s in SHAPES]
        groups = [{"params": self.params[:2]}, {"params": self.params[2:], "lr": 0.02}]
        self.opt = optirs_class(name)(groups, **FULL_STATE_KWARGS[name], **options)
        for _ in range(pre_steps):
            self.opt.step(self.grads())

    def grads(self):
        return [random_array(self.rng, p.shape, p.dtype) for p in self.params]


def _poison(grads, value):
    grads = [None if g is None else g.copy() for g in grads]
    grads[-1].reshape(-1)[-1] = value
    return grads


@pytest.mark.parametrize("pre_steps", [0, 2], ids=["first_step", "later_step"])
@pytest.mark.parametrize("bad", sorted(BAD_VALUES))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_numpy_skip_nonfinite_changes_nothing(name, dtype, bad, pre_steps):
    s = NumpySetup(name, dtype, pre_steps=pre_steps, skip_nonfinite=True)
    twin = NumpySetup(name, dtype, pre_steps=pre_steps)
    grads = s.grads()
    twin.grads()
    before = snapshot(s.opt)
    assert s.opt.step(_poison(grads, BAD_VALUES[bad])) is None
    assert s.opt.last_step_skipped is True and s.opt.skipped_steps == 1
    assert_snapshot_equal(before, snapshot(s.opt))
    # A second bad step, with some gradients None, is skipped too.
    partial = _poison(grads, BAD_VALUES[bad])
    partial[0] = None
    s.opt.step(partial)
    assert s.opt.skipped_steps == 2
    assert_snapshot_equal(before, snapshot(s.opt))
    for _ in range(3):
        s.opt.step([g.copy() for g in grads])
        twin.opt.step([g.copy() for g in grads])
        assert s.opt.last_step_skipped is False
        grads = s.grads()
        twin.grads()
    assert s.opt.skipped_steps == 2
    assert_bitwise_equal_params(s.params, twin.params)
    assert_bitwise_equal_state(s.opt, twin.opt)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_numpy_skip_nonfinite_ignores_none_grads_and_params(name):
    """Only gradients count: a NaN parameter (whose gradient is finite) is stepped, and a
    parameter without a gradient cannot make a step skip."""
    s = NumpySetup(name, np.float64, skip_nonfinite=True)
    s.params[1][0, 0] = np.nan
    grads = s.grads()
    s.opt.step(grads)
    assert not s.opt.last_step_skipped and s.opt.skipped_steps == 0
    assert math.isnan(s.params[1][0, 0])
    grads[2] = None
    s.opt.step(grads)
    assert not s.opt.last_step_skipped


@pytest.mark.parametrize("option", ["skip_nonfinite", "flush_denormals"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_numpy_options_change_no_bit_on_finite_normal_data(name, dtype, option):
    """On finite gradients without denormals, either option leaves every bit as without it."""
    a = NumpySetup(name, dtype, **{option: True})
    b = NumpySetup(name, dtype)
    for _ in range(3):
        grads = a.grads()
        b.grads()
        a.opt.step(grads)
        b.opt.step([g.copy() for g in grads])
    assert_bitwise_equal_params(a.params, b.params)
    assert_bitwise_equal_state(a.opt, b.opt)
    assert a.opt.skipped_steps == 0


@pytest.mark.parametrize("pre_steps", [0, 2], ids=["first_step", "cached_plan"])
@pytest.mark.parametrize("bad", sorted(BAD_VALUES))
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_bridge_skip_nonfinite_changes_nothing(name, bad, pre_steps):
    s = BridgeSetup(name, pre_steps=pre_steps, skip_nonfinite=True)
    twin = BridgeSetup(name, pre_steps=pre_steps)
    grads = s.grads()
    twin.grads()
    poisoned = [g.clone() for g in grads]
    poisoned[-1].view(-1)[-1] = BAD_VALUES[bad]
    for p, g in zip(s.params, poisoned):
        p.grad = g
    before = tsnapshot(s.opt)
    assert s.opt.step() is None
    assert s.opt.last_step_skipped is True and s.opt.skipped_steps == 1
    assert_unchanged(s.opt, before)
    for _ in range(3):
        s.step(grads)
        twin.step(grads)
        assert s.opt.last_step_skipped is False
        grads = s.grads()
        twin.grads()
    assert s.opt.skipped_steps == 1
    assert_bridge_bitwise_equal(s, twin)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("name", ["SGD", "Adam", "Adagrad"])
def test_bridge_skip_nonfinite_low_precision(name, dtype):
    p = torch.nn.Parameter(torch.linspace(-1, 1, 70_001).to(dtype))
    opt = bridge_class(name)([p], lr=0.1, skip_nonfinite=True)
    p.grad = torch.ones_like(p)
    opt.step()
    p.grad[-1] = math.inf
    before = tsnapshot(opt)
    opt.step()
    assert opt.last_step_skipped and opt.skipped_steps == 1
    assert_unchanged(opt, before)


# --------------------------------------------------------------------------------------------
# default: propagated like torch
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", sorted(BAD_VALUES))
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_default_propagates_like_torch_over_the_pool(name, bad):
    rng = np.random.default_rng(4)
    groups = [{"params": [random_array(rng, (70_001,), np.float64)]}]
    pair = SideBySide(name, groups, **FULL_STATE_KWARGS[name])
    for step in range(3):
        g = random_array(rng, (70_001,), np.float64)
        if step == 1:
            g[-1] = BAD_VALUES[bad]
            g[35_000] = BAD_VALUES[bad]
        with np.errstate(invalid="ignore"):
            pair.step([g])
        pair.compare()
        if step == 1 and name in SIGN_BASED:
            # The parameter moves by sign(...) times a finite step: the bad value reaches the
            # state (Rprop's prev, for one step; Lion's exp_avg), not the parameter.
            state = pair.opt.state[pair.params[0]]
            assert not all(np.all(np.isfinite(v)) for v in state.values())
            assert np.all(np.isfinite(pair.params[0]))
    assert pair.opt.skipped_steps == 0
    if name not in SIGN_BASED:
        assert not np.all(np.isfinite(pair.params[0]))


#: Optimizers whose update is a sign times a finite step size (torch.sign of NaN is 0).
SIGN_BASED = frozenset({"Lion", "Rprop"})


# A finite gradient whose grad_avg squared overflows (issue 15).
HUGE = {np.float32: 3e38, np.float64: 1e300}


def _centered_huge_torch(dtype, momentum, inits):
    params = [torch.from_numpy(x.copy()) for x in inits]
    opt = torch.optim.RMSprop(params, foreach=False, centered=True, momentum=momentum)
    for p in params:
        p.grad = torch.full(p.shape, HUGE[dtype], dtype=p.dtype)
    opt.step()
    return [(p.numpy(), {k: v.numpy() for k, v in opt.state[p].items()}) for p in params]


def _same_bits_as_torch(got, want):
    for (p, state), (tp, tstate) in zip(got, want, strict=True):
        assert p.tobytes() == tp.tobytes(), "parameter differs from torch's"
        assert sorted(state) == sorted(tstate)
        for key, value in state.items():
            if key == "step":
                assert float(value) == float(tstate[key])
            else:
                assert value.tobytes() == tstate[key].tobytes(), f"state[{key!r}] differs"


@pytest.mark.parametrize("momentum", [0.0, 0.9], ids=["plain", "momentum"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
def test_centered_rmsprop_huge_gradient_like_torch(dtype, momentum):
    """RMSprop(centered=True), one gradient of 3e38 (float32) or 1e300 (float64): grad_avg**2
    overflows. torch's CPU addcmul fuses ``square_avg - grad_avg**2``, which stays inf, so the
    step is ``g / inf = 0`` and torch gives the parameter back; a rounded product made it
    ``inf - inf``, NaN. Both APIs, every SIMD level and thread count, bit for bit with torch
    (one parameter over the pool, one in the calling thread's vector tail)."""
    inits = [np.linspace(-2, 2, n).astype(dtype) for n in (70_001, 7)]
    want = _centered_huge_torch(dtype, momentum, inits)
    for (tp, _), x in zip(want, inits):
        assert tp.tobytes() == x.tobytes()  # what torch does, the premise of the test

    def numpy_api():
        params = [x.copy() for x in inits]
        opt = optirs.RMSprop(params, centered=True, momentum=momentum)
        opt.step([np.full(x.shape, HUGE[dtype], dtype) for x in inits])
        got = [(p, dict(opt.state[p])) for p in params]
        _same_bits_as_torch(got, want)
        return [p.tobytes() for p in params]

    def bridge():
        params = [torch.nn.Parameter(torch.from_numpy(x.copy())) for x in inits]
        opt = optirs.torch.RMSprop(params, centered=True, momentum=momentum)
        for p in params:
            p.grad = torch.full(p.shape, HUGE[dtype], dtype=p.dtype)
        opt.step()
        got = [
            (p.detach().numpy(), {k: v.numpy() for k, v in opt.state[p].items()}) for p in params
        ]
        _same_bits_as_torch(got, want)
        return [p.detach().numpy().tobytes() for p in params]

    assert_same_at_every_simd_level_and_thread_count(numpy_api)
    assert_same_at_every_simd_level_and_thread_count(bridge)


# --------------------------------------------------------------------------------------------
# GradScaler
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("skip", [False, True], ids=["default", "skip_nonfinite"])
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_grad_scaler_skips_inf_step_and_backs_off(name, skip):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    opt = bridge_class(name)(model.parameters(), skip_nonfinite=skip, lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, backoff_factor=0.5)
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    for step in range(4):
        opt.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
        if step == 2:
            model[2].weight.grad[1, 2] = math.inf
        scale = scaler.get_scale()
        before = tsnapshot(opt)
        scaler.step(opt)
        scaler.update()
        if step == 2:
            assert_unchanged(opt, before)
            assert scaler.get_scale() == scale * 0.5
        else:
            assert scaler.get_scale() == scale
    # The scaler skipped the bad step itself: the optimizer was never asked to.
    assert opt.skipped_steps == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# flush_denormals
# --------------------------------------------------------------------------------------------

TINY = {np.float32: np.finfo(np.float32).tiny, np.float64: np.finfo(np.float64).tiny}
# (parameter scale, gradient scale): SGD's weight decay shrinks parameters just above the
# denormal range into it; the adaptive optimizers square gradients into it (their coupled
# weight decay is left out: with values this small next to eps it makes the parameters grow,
# by lr * weight_decay / eps per step, as in torch; AdamW's decoupled decay shrinks them).
DRIFT = {
    "SGD": {np.float32: (1e-37, 1e-39), np.float64: (1e-307, 1e-309)},
    **{
        name: {np.float32: (1e-37, 1e-20), np.float64: (1e-307, 1e-155)}
        for name in ("Adam", "AdamW", "RMSprop", "Adagrad", "Adadelta", "RAdam")
    },
    # Lion's moment takes (1 - beta2) of a gradient at the bottom of the normal range.
    "Lion": {np.float32: (1e-37, 1e-39), np.float64: (1e-307, 1e-309)},
    # Rprop's step sizes shrink by etas[0] at each sign flip, from an lr near the bottom of the
    # range (DRIFT_KWARGS; the gradients themselves are normal).
    "Rprop": {np.float32: (1e-37, 1.0), np.float64: (1e-307, 1.0)},
    # Adamax's exp_inf stays above eps: the gradient itself is denormal, and so its average.
    "Adamax": {np.float32: (1e-37, 1e-39), np.float64: (1e-307, 1e-309)},
    "NAdam": {np.float32: (1e-37, 1e-20), np.float64: (1e-307, 1e-155)},
    # ASGD's weight decay shrinks the parameters, as SGD's.
    "ASGD": {np.float32: (1e-37, 1e-39), np.float64: (1e-307, 1e-309)},
}
DRIFT_KWARGS = {
    "SGD": {"lr": 0.5, "momentum": 0.5, "weight_decay": 0.5},
    "Adam": {"lr": 1e-3, "amsgrad": True},
    "AdamW": {"lr": 0.5, "weight_decay": 0.5},
    "RMSprop": {"lr": 1e-3, "centered": True, "momentum": 0.5},
    "Adagrad": {"lr": 1e-3, "lr_decay": 0.01},
    "Adadelta": {"lr": 1.0, "rho": 0.5},
    "RAdam": {"lr": 1e-3, "betas": (0.9, 0.5)},
    "Lion": {"lr": 1e-3, "betas": (0.5, 0.99)},
    "Rprop": {
        np.float32: {"lr": 1e-30, "etas": (1e-3, 1.2), "step_sizes": (0.0, 50.0)},
        np.float64: {"lr": 1e-300, "etas": (1e-3, 1.2), "step_sizes": (0.0, 50.0)},
    },
    "Adamax": {"lr": 1e-3, "betas": (0.5, 0.9)},
    "NAdam": {"lr": 1e-3},
    "ASGD": {"lr": 0.5, "weight_decay": 0.5, "t0": 2.0},
}


def _drift_kwargs(name, dtype):
    """DRIFT_KWARGS of ``name``, for ``dtype`` where they differ by dtype (Rprop's lr)."""
    kwargs = DRIFT_KWARGS[name]
    return kwargs[dtype] if dtype in kwargs else kwargs


def _count_denormals(arrays, dtype) -> int:
    tiny = TINY[dtype]
    return sum(int(np.count_nonzero((a != 0) & (np.abs(a) < tiny))) for a in arrays)


def _numpy_drift(name, dtype, flush, steps=12, size=70_001):
    rng = np.random.default_rng(8)
    p_scale, g_scale = DRIFT[name][dtype]
    params = [random_array(rng, (size,), dtype, p_scale), random_array(rng, (9,), dtype, p_scale)]
    opt = optirs_class(name)(params, flush_denormals=flush, **_drift_kwargs(name, dtype))
    for _ in range(steps):
        opt.step([random_array(rng, p.shape, dtype, g_scale) for p in params])
    arrays = [*params, *(v for p in params for v in opt.state.get(p, {}).values())]
    return opt, params, arrays


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_numpy_flush_denormals_leaves_none(name, dtype):
    _, _, plain = _numpy_drift(name, dtype, flush=False)
    _, _, flushed = _numpy_drift(name, dtype, flush=True)
    assert _count_denormals(plain, dtype) > 0, "the test data must produce denormals"
    assert _count_denormals(flushed, dtype) == 0
    assert _denormal_survives()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=DTYPE_IDS)
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_bridge_flush_denormals_leaves_none(name, dtype):
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    p_scale, g_scale = DRIFT[name][np_dtype]
    results = {}
    for flush in (False, True):
        rng = np.random.default_rng(8)
        params = [
            torch.nn.Parameter(torch.from_numpy(random_array(rng, (n,), np_dtype, p_scale)))
            for n in (70_001, 9)
        ]
        opt = bridge_class(name)(params, flush_denormals=flush, **_drift_kwargs(name, np_dtype))
        for _ in range(12):
            for p in params:
                p.grad = torch.from_numpy(random_array(rng, tuple(p.shape), np_dtype, g_scale))
            opt.step()
        arrays = [p.detach().numpy() for p in params]
        arrays += [v.numpy() for p in params for v in opt.state[p].values() if v.ndim]
        results[flush] = _count_denormals(arrays, np_dtype)
    assert results[False] > 0 and results[True] == 0, results
    assert _denormal_survives()
    assert float(torch.tensor([1e-40]) * 1.0) != 0.0


@pytest.mark.parametrize("name", ["Adam", "RMSprop"])
def test_flush_denormals_same_bits_for_every_thread_count_and_simd_level(name):
    level, threads = optirs.simd_level(), optirs.get_num_threads()
    results = {}
    try:
        for candidate in optirs.simd_levels():
            for n in (1, 2):
                optirs.set_simd_level(candidate)
                optirs.set_num_threads(n)
                _, _, arrays = _numpy_drift(name, np.float32, flush=True, steps=4)
                results[candidate, n] = [a.tobytes() for a in arrays]
    finally:
        optirs.set_simd_level(level)
        optirs.set_num_threads(threads)
    first = next(iter(results.values()))
    assert all(r == first for r in results.values())


def _denormal_survives() -> bool:
    """Whether the calling thread computes denormals (MXCSR's FTZ/DAZ bits are off)."""
    tiny32 = np.float32(1e-40) * np.float32(1.0)
    tiny64 = np.float64(1e-310) * np.float64(1.0)
    return bool(tiny32 != 0 and tiny64 != 0)


def _pool_makes_denormals() -> bool:
    """A plain step over the pool's threads still produces denormals."""
    q = np.full(200_000, 1e-37, np.float32)
    opt = optirs.SGD([q], lr=0.5, weight_decay=0.5)
    for _ in range(8):
        opt.step([np.zeros_like(q)])
    return bool(np.all((q != 0) & (q < TINY[np.float32])))


@pytest.mark.parametrize(
    "outcome", ["applied", "skipped", "refused"], ids=["applied", "skipped", "refused"]
)
@pytest.mark.parametrize("size", [16, 200_000], ids=["calling_thread", "pool"])
def test_flush_mode_is_restored_after_the_step(size, outcome):
    assert _denormal_survives()
    p = np.full(size, 1e-39, np.float32)
    opt = optirs.SGD([p], lr=0.5, weight_decay=0.5, flush_denormals=True, skip_nonfinite=True)
    g = np.zeros(size, np.float32)
    if outcome == "applied":
        opt.step([g])
        assert np.all(p == 0)  # flushed while the step ran
    elif outcome == "skipped":
        g[-1] = np.nan
        opt.step([g])
        assert opt.last_step_skipped
    else:
        with pytest.raises(TypeError):
            opt.step([g.astype(np.float64)])
    assert _denormal_survives(), "flush-to-zero leaked out of the step into the caller"
    assert _pool_makes_denormals(), "flush-to-zero leaked into the pool's threads"


def test_flush_mode_is_restored_after_a_bridge_step():
    p = torch.nn.Parameter(torch.full((16,), 1e-39))
    opt = optirs.torch.SGD([p], lr=0.5, weight_decay=0.5, flush_denormals=True)
    p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.all(p == 0)
    assert _denormal_survives()
    assert float(torch.tensor([1e-40]) * 1.0) != 0.0
    assert _pool_makes_denormals()


def test_flush_is_per_optimizer():
    """One optimizer flushing does not make another, stepped afterwards, flush."""
    a = [np.full(16, 1e-39, np.float32)]
    b = [np.full(16, 1e-39, np.float32)]
    fa = optirs.SGD(a, lr=0.5, weight_decay=0.5, flush_denormals=True)
    fb = optirs.SGD(b, lr=0.5, weight_decay=0.5)
    fa.step([np.zeros(16, np.float32)])
    fb.step([np.zeros(16, np.float32)])
    assert np.all(a[0] == 0) and np.all(b[0] != 0)
    assert flat_params(fa)[0] is a[0]
