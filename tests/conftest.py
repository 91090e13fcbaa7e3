"""Shared helpers for the optirs test suite.

The reference for every numerical test is ``torch.optim`` on the CPU with ``foreach=False``, i.e.
the single-tensor for-loop path. ``run_side_by_side`` feeds the same gradients to an optirs
optimizer (NumPy arrays) and to the matching torch optimizer (tensors built from the same data)
and compares parameters and every state buffer after each step.

Tolerances
----------
float64: rtol=1e-7, atol=1e-7, the values torch's own test-suite uses to compare its fused CPU
kernels with the for-loop path.

float32: atol=1e-5 and rtol=1.3e-6 * k. 1.3e-6 is torch's own float32 tolerance for "the same
update computed by a different kernel": ATen's vectorised loops (add with alpha, addcmul, addcdiv,
lerp) contract ``a*b + c`` into an FMA while their scalar tails do not, so torch's for-loop path
itself differs from plain IEEE ``a*b + c`` (what optirs computes) by about one ulp per operation.
Those last-bit differences are not amplified by the optimizer (gradients are fed in, not computed
from the parameters) but they do accumulate across steps: we use k = 2 for runs of up to 25 steps
and k = 4 for the longer (100+ step) runs. A genuine mistake (wrong bias correction, eps in the
wrong place, a missing term, float32 instead of float64 scalars...) is orders of magnitude above
either bound.

Conditioning of the test data
-----------------------------
torch computes the coupled weight decay ``grad + weight_decay * param`` with one fused
multiply-add; optirs rounds the product first (no FMA, by design). Both are correct to an ulp of
the operands, but where ``grad`` and ``weight_decay * param`` nearly cancel, that ulp is a large
part of the result, and Adam/RMSprop/Adagrad then divide it by ``sqrt(v) + eps`` with
``v ~ g*g``, so the difference becomes visible in the parameters. With a million random elements
such near-cancellations always occur. ``run_side_by_side`` therefore flips the sign of a gradient
entry whose decayed value would be less than 5% of its terms (``well_conditioned``): the
comparison then checks the update rule, not the rounding of an ill-conditioned subtraction.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import optirs
import pytest
import torch  # mandatory: the parity tests must fail, not skip, without torch
from optirs._spec import SPECS

# The per-optimizer tables below come from each optimizer's one declaration (optirs._spec);
# tests/test_spec.py checks those declarations against torch.optim itself.
OPTIMIZER_NAMES = tuple(SPECS)
FLOAT_DTYPES = (np.float32, np.float64)
DTYPE_IDS = ("f32", "f64")

# torch-only switches that optirs does not have.
TORCH_ONLY_GROUP_KEYS = frozenset({"foreach", "fused", "capturable", "differentiable"})

# The constructor hyperparameters of each optirs optimizer (the keys every param group carries).
HYPERPARAMETERS = {name: tuple(spec.defaults) for name, spec in SPECS.items()}

# A configuration per optimizer that creates every kind of state buffer it has.
FULL_STATE_KWARGS = {
    "SGD": {"lr": 0.01, "momentum": 0.9},
    "Adam": {"lr": 0.01, "amsgrad": True, "weight_decay": 0.1},
    "AdamW": {"lr": 0.01, "amsgrad": True},
    "RMSprop": {"lr": 0.01, "momentum": 0.5, "centered": True, "weight_decay": 0.1},
    "Adagrad": {"lr": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.1},
    "Adadelta": {"lr": 0.5, "rho": 0.8, "weight_decay": 0.1},
    "RAdam": {"lr": 0.01, "weight_decay": 0.1},
    "Lion": {"lr": 0.01, "weight_decay": 0.1},
    "Rprop": {"lr": 0.01, "etas": (0.4, 1.3)},
    "Adamax": {"lr": 0.01, "weight_decay": 0.1},
    "NAdam": {"lr": 0.01, "weight_decay": 0.1},
    "ASGD": {"lr": 0.01, "t0": 2.0, "weight_decay": 0.1},
}

# Every state key each optimizer may keep (with FULL_STATE_KWARGS, it keeps them all).
FULL_STATE_KEYS = {name: set(spec.keys) for name, spec in SPECS.items()}
# The parameter-shaped ones among them (the rest: ``step`` and 0-d scalars like NAdam's
# ``mu_product``, SCALAR_KEYS).
BUFFER_KEYS = {name: set(spec.buffers) for name, spec in SPECS.items()}
SCALAR_KEYS = {name: set(spec.scalar_names) for name, spec in SPECS.items()}


def optirs_class(name: str) -> type:
    return getattr(optirs, name)


class LionReference(torch.optim.Optimizer):
    """Lion as lion-pytorch 0.2.5's ``update_fn`` computes it, in torch operations, plus
    ``maximize`` (the gradient negated first, as torch.optim's optimizers do): the reference
    for ``optirs.Lion`` and ``optirs.torch.Lion``, which torch.optim lacks. ``foreach`` is
    taken and ignored so that it is built like the torch.optim classes (one path only)."""

    def __init__(
        self,
        params: Any,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
    ) -> None:
        defaults = {"lr": lr, "betas": betas, "weight_decay": weight_decay, "maximize": maximize}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, (beta1, beta2) = group["lr"], group["weight_decay"], group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = -p.grad if group["maximize"] else p.grad
                state = self.state[p]
                if len(state) == 0:
                    state["exp_avg"] = torch.zeros_like(p)
                exp_avg = state["exp_avg"]
                p.mul_(1.0 - lr * wd)
                update = exp_avg.clone().mul_(beta1).add(grad, alpha=1.0 - beta1).sgn_()
                p.add_(update, alpha=-lr)
                exp_avg.mul_(beta2).add_(grad, alpha=1.0 - beta2)
        return loss


def torch_class(name: str) -> type:
    """torch.optim's class of that name; for an optimizer torch.optim lacks (``Spec.in_torch``
    false: Lion), the tests' own torch reference."""
    if not SPECS[name].in_torch:
        return {"Lion": LionReference}[name]
    return getattr(torch.optim, name)


def tolerances(dtype: Any, steps: int = 1) -> dict[str, float]:
    """assert_allclose tolerances for comparing optirs with torch (see the module docstring)."""
    if np.dtype(dtype) == np.float64:
        return {"rtol": 1e-7, "atol": 1e-7}
    k = 2 if steps <= 25 else 4
    return {"rtol": 1.3e-6 * k, "atol": 1e-5}


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20240611)


def random_array(rng: np.random.Generator, shape: Sequence[int], dtype: Any, scale: float = 1.0):
    """A fresh C-contiguous, writeable array of standard normal values times ``scale``."""
    values = rng.standard_normal(tuple(shape)) * scale
    return np.array(values, dtype=dtype)


GRAD_SCALES = (1.0, 0.1, 3.0, 1e-3, 10.0)


def default_grad(rng: np.random.Generator, step: int, index: int, param: np.ndarray):
    """The gradient fed at ``step`` to flat parameter ``index``: N(0, 1) with a varying scale."""
    return random_array(rng, param.shape, param.dtype, GRAD_SCALES[(step + index) % 5])


# --------------------------------------------------------------------------------------------
# snapshots: "nothing changed" checks
# --------------------------------------------------------------------------------------------


def flat_params(opt) -> list[np.ndarray]:
    return [p for group in opt.param_groups for p in group["params"]]


def snapshot(opt) -> dict[str, Any]:
    """A deep, bitwise copy of everything an optimizer step may touch."""
    params = flat_params(opt)
    state = []
    for p in params:
        if p in opt.state:
            entry = {
                key: (
                    np.asarray(value).dtype.str,
                    np.asarray(value).shape,
                    np.asarray(value).tobytes(),
                )
                for key, value in opt.state[p].items()
            }
            state.append(entry)
        else:
            state.append(None)
    groups = [
        {key: copy.deepcopy(value) for key, value in group.items() if key != "params"}
        for group in opt.param_groups
    ]
    return {
        "params": [(p.dtype.str, p.shape, p.tobytes()) for p in params],
        "ids": [id(p) for p in params],
        "group_sizes": [len(group["params"]) for group in opt.param_groups],
        "state": state,
        "state_len": len(opt.state),
        "groups": groups,
    }


def assert_snapshot_equal(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert after["ids"] == before["ids"], "parameter objects were replaced"
    assert after["group_sizes"] == before["group_sizes"]
    for i, (b, a) in enumerate(zip(before["params"], after["params"])):
        assert a == b, f"parameter {i} changed"
    assert after["state_len"] == before["state_len"], "number of state entries changed"
    for i, (b, a) in enumerate(zip(before["state"], after["state"])):
        if b is None:
            assert a is None, f"state was created for parameter {i}"
            continue
        assert a is not None, f"state of parameter {i} disappeared"
        assert sorted(a) == sorted(b), f"state keys of parameter {i} changed"
        for key in b:
            assert a[key] == b[key], f"state[{i}][{key!r}] changed"
    assert _normalise(after["groups"]) == _normalise(before["groups"]), "param_groups changed"


def _normalise(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return tuple(_normalise(v) for v in value)
    return value


def assert_bitwise_equal_params(params_a: Sequence[np.ndarray], params_b: Sequence[np.ndarray]):
    assert len(params_a) == len(params_b)
    for i, (a, b) in enumerate(zip(params_a, params_b)):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes(), f"parameter {i} differs"


def assert_bitwise_equal_state(opt_a, opt_b) -> None:
    """Same state keys and bitwise identical state values, parameter by parameter."""
    params_a, params_b = flat_params(opt_a), flat_params(opt_b)
    assert len(params_a) == len(params_b)
    for i, (pa, pb) in enumerate(zip(params_a, params_b)):
        assert (pa in opt_a.state) == (pb in opt_b.state), f"state presence differs for {i}"
        if pa not in opt_a.state:
            continue
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert sorted(sa) == sorted(sb)
        for key in sa:
            va, vb = np.asarray(sa[key]), np.asarray(sb[key])
            assert va.dtype == vb.dtype and va.shape == vb.shape, (i, key)
            assert va.tobytes() == vb.tobytes(), f"state[{i}][{key!r}] differs"


# --------------------------------------------------------------------------------------------
# optirs vs torch
# --------------------------------------------------------------------------------------------


def assert_same_at_every_simd_level_and_thread_count(
    run: Callable[[], Any], threads: Sequence[int] = (1, 2)
) -> None:
    """Runs ``run()`` at every SIMD level this CPU has and each thread count, and checks every
    result equals the first; the process's level and thread count are restored after."""
    saved_level, saved_threads = optirs.simd_level(), optirs.get_num_threads()
    results = {}
    try:
        for level in optirs.simd_levels():
            for n in threads:
                assert optirs.set_simd_level(level) == level
                optirs.set_num_threads(n)
                results[level, n] = run()
    finally:
        optirs.set_simd_level(saved_level)
        optirs.set_num_threads(saved_threads)
    first = next(iter(results.values()))
    for key, result in results.items():
        assert result == first, key


def _to_torch_group(group: dict[str, Any]) -> dict[str, Any]:
    out = dict(group)
    out["params"] = [torch.from_numpy(np.array(p, copy=True)) for p in group["params"]]
    return out


def _to_numpy_group(group: dict[str, Any]) -> dict[str, Any]:
    out = dict(group)
    out["params"] = [np.array(p, copy=True) for p in group["params"]]
    return out


class SideBySide:
    """An optirs optimizer and the matching torch optimizer over copies of the same data.

    ``groups`` is a list of param-group dicts ``{"params": [initial ndarrays], **hyperparams}``;
    both optimizers get private copies of the arrays. ``kwargs`` are the constructor defaults.
    """

    def __init__(self, name: str, groups: list[dict[str, Any]], **kwargs: Any) -> None:
        self.name = name
        np_groups = [_to_numpy_group(g) for g in groups]
        torch_groups = [_to_torch_group(g) for g in groups]
        self.opt = optirs_class(name)(np_groups, **kwargs)
        self.topt = torch_class(name)(torch_groups, foreach=False, **kwargs)
        self.params = [p for g in np_groups for p in g["params"]]
        self.tparams = [p for g in torch_groups for p in g["params"]]
        self.steps = 0

    def set_hyperparameters(self, group_index: int, **values: Any) -> None:
        for key, value in values.items():
            self.opt.param_groups[group_index][key] = value
            self.topt.param_groups[group_index][key] = value

    def step(self, grads: Sequence[np.ndarray | None]) -> None:
        assert len(grads) == len(self.params)
        for tp, g in zip(self.tparams, grads):
            tp.grad = None if g is None else torch.from_numpy(np.array(g, copy=True))
        result = self.opt.step([None if g is None else np.array(g, copy=True) for g in grads])
        assert result is None
        self.topt.step()
        self.steps += 1

    def compare(self, steps_for_tolerance: int | None = None) -> None:
        steps = self.steps if steps_for_tolerance is None else steps_for_tolerance
        assert_matches_torch(self.opt, self.params, self.topt, self.tparams, steps)


def well_conditioned(name: str, group: dict[str, Any], param: np.ndarray, grad):
    """``grad`` with the sign of entries flipped where coupled weight decay would cancel it."""
    wd = group.get("weight_decay", 0)  # Rprop has none
    decoupled = name in ("AdamW", "Lion") or group.get("decoupled_weight_decay")
    if grad is None or wd == 0 or decoupled:
        return grad
    sign = -1.0 if group["maximize"] else 1.0
    g = sign * np.asarray(grad, dtype=np.float64)
    decay = wd * param.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        near = np.abs(g + decay) < 0.05 * (np.abs(g) + np.abs(decay))
    if not near.any():
        return grad
    out = np.array(grad, copy=True)
    out[near] = -out[near]
    return out


def assert_matches_torch(opt, params, topt, tparams, steps: int) -> None:
    """Parameters and every state entry of ``opt`` agree with ``topt`` (same keys, step exact)."""
    for i, (p, tp) in enumerate(zip(params, tparams)):
        tol = tolerances(p.dtype, steps)
        expected = tp.detach().numpy()
        assert p.dtype == expected.dtype and p.shape == expected.shape
        np.testing.assert_allclose(p, expected, **tol, equal_nan=True, err_msg=f"param {i}")

        torch_state = {
            key: value
            for key, value in topt.state.get(tp, {}).items()
            if value is not None  # SGD keeps momentum_buffer=None for a param without grad
        }
        if not torch_state:
            assert p not in opt.state, f"param {i}: optirs created state that torch did not"
            continue
        assert p in opt.state, f"param {i}: torch has state {sorted(torch_state)}, optirs none"
        state = opt.state[p]
        assert sorted(state) == sorted(torch_state), f"param {i}: state keys"
        for key, tvalue in torch_state.items():
            value = state[key]
            assert isinstance(value, np.ndarray), f"state[{i}][{key!r}] is {type(value)}"
            if key == "step":
                assert value.shape == () and value.dtype == np.float32, (i, value)
                assert float(value) == float(tvalue), f"param {i}: step"
                continue
            texpected = tvalue.detach().numpy()
            if key in opt._spec.scalar_names:
                # 0-d state (NAdam's mu_product, ASGD's eta and mu): computed as torch computes
                # it and stored in the same dtype, so bit for bit torch's.
                assert value.shape == () and value.dtype == texpected.dtype, (i, key, value)
                same = value.tobytes() == texpected.tobytes()
                assert same or (np.isnan(value) and np.isnan(texpected)), (i, key, value, tvalue)
                continue
            assert value.dtype == p.dtype and value.shape == p.shape, (i, key)
            np.testing.assert_allclose(
                value, texpected, **tol, equal_nan=True, err_msg=f"state[{i}][{key!r}]"
            )


GradFn = Callable[[np.random.Generator, int, int, np.ndarray], "np.ndarray | None"]


def run_side_by_side(
    name: str,
    groups: list[dict[str, Any]],
    *,
    steps: int,
    rng: np.random.Generator,
    grad_fn: GradFn = default_grad,
    schedule: dict[int, list[tuple[int, dict[str, Any]]]] | None = None,
    compare_every: int = 1,
    **kwargs: Any,
) -> SideBySide:
    """Step both optimizers ``steps`` times with the same gradients and compare them.

    ``grad_fn(rng, step, flat_index, param)`` returns the gradient (or None).
    ``schedule[step]`` is a list of ``(group_index, {hyperparam: value})`` applied to both
    optimizers' param_groups before that step.
    """
    pair = SideBySide(name, groups, **kwargs)
    for step in range(steps):
        for group_index, values in (schedule or {}).get(step, []):
            pair.set_hyperparameters(group_index, **values)
        groups_of = [g for g in pair.opt.param_groups for _ in g["params"]]
        grads = [
            well_conditioned(name, group, p, grad_fn(rng, step, i, p))
            for i, (p, group) in enumerate(zip(pair.params, groups_of))
        ]
        pair.step(grads)
        if (step + 1) % compare_every == 0 or step == steps - 1:
            pair.compare()
    return pair


# --------------------------------------------------------------------------------------------
# error messages
# --------------------------------------------------------------------------------------------


def torch_constructor_error(name: str, **kwargs: Any) -> str | None:
    """The ValueError message torch.optim's constructor gives for these hyperparameters."""
    try:
        torch_class(name)([torch.zeros(3)], **kwargs)
    except ValueError as exc:
        return str(exc)
    return None


def index_pattern(flat: int, group: int, index: int) -> str:
    """Regex matching either naming of one parameter: grads[k] or param_groups[g]['params'][i]."""
    return (
        rf"grads\[{flat}\]"
        rf"|param_groups\[{group}\]\[['\"]params['\"]\]\[{index}\]"
    )


def assert_message(excinfo: pytest.ExceptionInfo, *patterns: str) -> None:
    """Every regex in ``patterns`` occurs in the exception message (case-insensitive)."""
    message = str(excinfo.value)
    assert "PanicException" not in type(excinfo.value).__name__
    for pattern in patterns:
        assert re.search(pattern, message, re.IGNORECASE), (
            f"{pattern!r} not found in message {message!r}"
        )


# Where a large step runs (src/omp.rs): the test process has torch, hence an OpenMP runtime,
# so its steps run on that runtime's team unless told otherwise. Modules that test the
# executors themselves set BOTH_EXECUTORS = True and run every test on each: "pool" (optirs's
# own threads) and "openmp" (the team); subprocesses they start inherit the choice through
# OPTIRS_OPENMP.
EXECUTORS = ("pool", "openmp")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "executor" in metafunc.fixturenames and getattr(metafunc.module, "BOTH_EXECUTORS", False):
        metafunc.parametrize("executor", EXECUTORS, indirect=True)


@pytest.fixture(autouse=True)
def executor(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """The executor a ``BOTH_EXECUTORS`` module's test runs on; None elsewhere (the default)."""
    which = getattr(request, "param", None)
    if which is None:
        yield None
        return
    optirs._core._set_openmp(which == "openmp")
    monkeypatch.setenv("OPTIRS_OPENMP", "1" if which == "openmp" else "0")
    try:
        yield which
    finally:
        optirs._core._set_openmp(True)
