"""Property-based tests (hypothesis) of the NumPy API against a plain NumPy reference.

Over shapes (0-d, empty, with zero-sized axes, up to 5000 elements), dtypes (float32,
float64), every option of every optimizer in sensible ranges, one or two param groups and step
sequences with ``None`` gradients, zero gradients and learning-rate changes, ``optirs.X`` must
agree with ``Reference``: each optimizer written out here from torch.optim's single-tensor
(for-loop) formulas (/work/shared/TORCH_REFERENCE.md, torch/optim/*.py), op by op in the
parameter's dtype, Python-float scalars computed in float64 as torch computes them and
rounded to the dtype where torch hands them to a tensor op.

Tolerances. The reference does what optirs promises to do: torch's operation order, no fused
multiply-add (optirs fuses one, centered RMSprop's ``square_avg - grad_avg**2``, as torch's CPU
kernel does; NumPy has no FMA, so here it differs by the product's rounding), correctly rounded
sqrt (NumPy's). Left to differ are the last bits of per-step
scalars (``lr / bias_correction1``, ``bias_correction2 ** 0.5``, ``1 - beta``), i.e. an ulp in
one factor of an update, which optimizers do not amplify (gradients are inputs, not computed
from the parameters). float64: rtol=atol=1e-7, torch's own float64 tolerance between two
kernels of one update; 1e-7 is ~1e9 ulps, so anything that passes is right to the formula,
and any formula mistake (a wrong bias correction, eps inside the sqrt, a missing term) is far
above it. float32: conftest's float32 tolerances (torch's 1.3e-6, doubled for short runs,
atol 1e-5), for the same reason. Step counters must match exactly.

Invariants, exactly: the same bits for every thread count (``set_num_threads(1)`` vs 2, with a
parameter large enough to be split over the pool) and every SIMD level of this CPU; dtypes and
shapes of parameters and state kept; state keys as torch's; no state for a parameter that never
had a gradient (except Adagrad's, made at construction).

Budget: derandomized (the same examples on every run, no example database), at most
``MAX_EXAMPLES`` per test; the file runs in well under a minute.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from conftest import (
    assert_same_at_every_simd_level_and_thread_count,
    optirs_class,
    tolerances,
    torch_class,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes
from optirs._spec import SPECS

MAX_EXAMPLES = 400

PROFILE = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --------------------------------------------------------------------------------------------
# the reference: torch.optim's for-loop formulas, in NumPy
# --------------------------------------------------------------------------------------------


def _lerp(a: np.ndarray, b: np.ndarray, w: Any) -> np.ndarray:
    """torch's lerp kernel: ``|w| < 0.5 ? a + w*(b - a) : b - (b - a)*(1 - w)``, all in the
    tensor's dtype (w already rounded to it)."""
    one = w.dtype.type(1)
    if abs(w) < 0.5:
        return a + w * (b - a)
    return b - (b - a) * (one - w)


def _sign(a: np.ndarray) -> np.ndarray:
    """``torch.sign``: 0 for NaN (NumPy's sign keeps it), as an array of ``a``'s dtype."""
    a = np.asarray(a)
    return np.asarray(np.where(np.isnan(a), a.dtype.type(0), np.sign(a)), dtype=a.dtype)


class Reference:
    """One torch.optim optimizer over private copies of the parameters, in plain NumPy."""

    def __init__(self, name: str, groups: list[dict[str, Any]]) -> None:
        self.name = name
        self.groups = [dict(g, params=[p.copy() for p in g["params"]]) for g in groups]
        self.state: list[dict[str, Any]] = [{} for g in self.groups for _ in g["params"]]
        if name == "Adagrad":  # made at construction, from the group's value
            k = 0
            for g in self.groups:
                for p in g["params"]:
                    init = g["initial_accumulator_value"]
                    self.state[k] = {
                        "step": np.float32(0),
                        "sum": np.full(p.shape, init, dtype=p.dtype),
                    }
                    k += 1

    @property
    def params(self) -> list[np.ndarray]:
        return [p for g in self.groups for p in g["params"]]

    def step(self, grads: list[np.ndarray | None]) -> None:
        k = 0
        for g in self.groups:
            for i, p in enumerate(g["params"]):
                grad = grads[k]
                if grad is not None:
                    g["params"][i] = getattr(self, "_" + self.name.lower())(
                        g, p, grad, self.state[k]
                    )
                k += 1

    # Each rule returns the new parameter; ``c`` rounds a Python float to the dtype.

    def _sgd(self, h, p, grad, st):
        c = p.dtype.type
        d_p = -grad if h["maximize"] else grad
        if h["weight_decay"] != 0:
            d_p = d_p + c(h["weight_decay"]) * p
        if h["momentum"] != 0:
            buf = st.get("momentum_buffer")
            if buf is None:
                buf = d_p.copy()
            else:
                buf = buf * c(h["momentum"]) + c(1 - h["dampening"]) * d_p
            st["momentum_buffer"] = buf
            d_p = d_p + c(h["momentum"]) * buf if h["nesterov"] else buf
        return p + c(-h["lr"]) * d_p

    def _adam_moments(self, h, p, grad, st):
        """Adam's and RAdam's shared start: the state made on the first step, the step counted,
        the weight decay (decoupled or added to the gradient) and both moments updated.
        Returns the parameter (decayed when decoupled) and the step count."""
        c = p.dtype.type
        if not st:
            st.update(step=np.float32(0), exp_avg=np.zeros_like(p), exp_avg_sq=np.zeros_like(p))
        st["step"] = np.float32(st["step"] + np.float32(1))
        lr, (beta1, beta2), wd = h["lr"], h["betas"], h["weight_decay"]
        g = -grad if h["maximize"] else grad
        if wd != 0:
            if h["decoupled_weight_decay"]:
                p = p * c(1 - lr * wd)
            else:
                g = g + c(wd) * p
        st["exp_avg"] = _lerp(st["exp_avg"], g, c(1 - beta1))
        st["exp_avg_sq"] = st["exp_avg_sq"] * c(beta2) + (c(1 - beta2) * g) * g
        return p, float(st["step"])

    def _adam(self, h, p, grad, st):
        c = p.dtype.type
        first = not st
        p, step = self._adam_moments(h, p, grad, st)
        if first and h["amsgrad"]:
            st["max_exp_avg_sq"] = np.zeros_like(p)
        lr, (beta1, beta2) = h["lr"], h["betas"]
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        bias_correction2_sqrt = bias_correction2**0.5
        v = st["exp_avg_sq"]
        if h["amsgrad"]:
            st["max_exp_avg_sq"] = np.maximum(st["max_exp_avg_sq"], v)
            v = st["max_exp_avg_sq"]
        denom = np.sqrt(v) / c(bias_correction2_sqrt) + c(h["eps"])
        return p + (c(-step_size) * st["exp_avg"]) / denom

    _adamw = _adam  # the NumPy AdamW is Adam with decoupled_weight_decay=True in its groups

    def _rmsprop(self, h, p, grad, st):
        c = p.dtype.type
        if not st:
            st.update(step=np.float32(0), square_avg=np.zeros_like(p))
            if h["momentum"] > 0:
                st["momentum_buffer"] = np.zeros_like(p)
            if h["centered"]:
                st["grad_avg"] = np.zeros_like(p)
        st["step"] = np.float32(st["step"] + np.float32(1))
        alpha = h["alpha"]
        g = -grad if h["maximize"] else grad
        if h["weight_decay"] != 0:
            g = g + c(h["weight_decay"]) * p
        st["square_avg"] = st["square_avg"] * c(alpha) + (c(1 - alpha) * g) * g
        if h["centered"]:
            st["grad_avg"] = _lerp(st["grad_avg"], g, c(1 - alpha))
            avg = np.sqrt(st["square_avg"] + (c(-1) * st["grad_avg"]) * st["grad_avg"])
        else:
            avg = np.sqrt(st["square_avg"])
        avg = avg + c(h["eps"])
        if h["momentum"] > 0:
            st["momentum_buffer"] = st["momentum_buffer"] * c(h["momentum"]) + g / avg
            return p + c(-h["lr"]) * st["momentum_buffer"]
        return p + (c(-h["lr"]) * g) / avg

    def _adagrad(self, h, p, grad, st):
        c = p.dtype.type
        st["step"] = np.float32(st["step"] + np.float32(1))
        step = float(st["step"])
        g = -grad if h["maximize"] else grad
        if h["weight_decay"] != 0:
            g = g + c(h["weight_decay"]) * p
        clr = h["lr"] / (1 + (step - 1) * h["lr_decay"])
        st["sum"] = st["sum"] + (c(1) * g) * g
        std = np.sqrt(st["sum"]) + c(h["eps"])
        return p + (c(-clr) * g) / std

    def _adadelta(self, h, p, grad, st):
        c = p.dtype.type
        if not st:
            st.update(step=np.float32(0), square_avg=np.zeros_like(p), acc_delta=np.zeros_like(p))
        st["step"] = np.float32(st["step"] + np.float32(1))
        rho = h["rho"]
        g = -grad if h["maximize"] else grad
        if h["weight_decay"] != 0:
            g = g + c(h["weight_decay"]) * p
        st["square_avg"] = st["square_avg"] * c(rho) + (c(1 - rho) * g) * g
        std = np.sqrt(st["square_avg"] + c(h["eps"]))
        delta = np.sqrt(st["acc_delta"] + c(h["eps"])) / std * g
        st["acc_delta"] = st["acc_delta"] * c(rho) + (c(1 - rho) * delta) * delta
        return p + c(-h["lr"]) * delta

    def _radam(self, h, p, grad, st):
        c = p.dtype.type
        p, step = self._adam_moments(h, p, grad, st)
        lr, (beta1, beta2) = h["lr"], h["betas"]
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        corrected = st["exp_avg"] / c(bias_correction1)
        rho_inf = 2 / (1 - beta2) - 1
        rho_t = rho_inf - 2 * step * (beta2**step) / bias_correction2
        if rho_t > 5.0:
            rect = (
                (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
            ) ** 0.5
            # a float over a tensor: torch's `reciprocal() * float`
            adaptive = (c(1) / (np.sqrt(st["exp_avg_sq"]) + c(h["eps"]))) * c(bias_correction2**0.5)
            return p - corrected * c(lr) * adaptive * c(rect)
        return p - corrected * c(lr)

    def _lion(self, h, p, grad, st):
        c = p.dtype.type
        if not st:
            st.update(exp_avg=np.zeros_like(p))
        lr, (beta1, beta2) = h["lr"], h["betas"]
        g = -grad if h["maximize"] else grad
        p = p * c(1 - lr * h["weight_decay"])
        m = st["exp_avg"]
        update = _sign(m * c(beta1) + c(1 - beta1) * g)
        st["exp_avg"] = m * c(beta2) + c(1 - beta2) * g
        return p + c(-lr) * update

    def _rprop(self, h, p, grad, st):
        c = p.dtype.type
        if not st:
            st.update(step=np.float32(0), prev=np.zeros_like(p), step_size=np.full_like(p, h["lr"]))
        st["step"] = np.float32(st["step"] + np.float32(1))
        etaminus, etaplus = (c(x) for x in h["etas"])
        g = -grad if h["maximize"] else grad
        sign = _sign(g * st["prev"])
        # torch's three masked assignments, in order, each seeing the previous ones
        sign = np.where(sign > 0, etaplus, sign)
        sign = np.where(sign < 0, etaminus, sign)
        sign = np.where(sign == 0, c(1), sign)
        lo, hi = (c(x) for x in h["step_sizes"])
        st["step_size"] = np.minimum(np.maximum(st["step_size"] * sign, lo), hi)
        g = np.where(sign == etaminus, c(0), g)
        st["prev"] = g
        return p + (c(-1) * _sign(g)) * st["step_size"]


# --------------------------------------------------------------------------------------------
# strategies
# --------------------------------------------------------------------------------------------

LR = {"SGD": (0.0, 1.0), "Adam": (0.0, 0.2), "RMSprop": (0.0, 0.1), "Adagrad": (0.0, 1.0)}
LR.update(AdamW=LR["Adam"], RAdam=LR["Adam"], Adadelta=(0.0, 2.0), Lion=(0.0, 0.1))
LR["Rprop"] = (0.0, 0.1)
NAMES = ["SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Adadelta", "RAdam", "Lion", "Rprop"]


def _maybe_zero(strategy):
    return st.one_of(st.just(0.0), strategy)


def _unit(lo: float, hi: float):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False)


@st.composite
def hyperparameters(draw, name: str) -> dict[str, Any]:
    """Every constructor option of ``name``, in the ranges training uses."""
    wd = draw(_maybe_zero(_unit(0.0, 0.5)))
    h: dict[str, Any] = {"lr": draw(_unit(*LR[name])), "maximize": draw(st.booleans())}
    if name == "SGD":
        momentum = draw(_maybe_zero(_unit(0.0, 0.99)))
        nesterov = momentum > 0 and draw(st.booleans())
        dampening = 0.0 if nesterov else draw(_maybe_zero(_unit(0.0, 1.0)))
        h.update(momentum=momentum, dampening=dampening, weight_decay=wd, nesterov=nesterov)
    elif name in ("Adam", "AdamW"):
        h.update(
            betas=(draw(_unit(0.0, 0.99)), draw(_unit(0.0, 0.9999))),
            eps=draw(st.sampled_from([1e-8, 1e-10, 1e-6, 1e-3])),
            weight_decay=wd,
            amsgrad=draw(st.booleans()),
        )
        if name == "Adam":
            h["decoupled_weight_decay"] = draw(st.booleans())
    elif name == "Adadelta":
        h.update(
            rho=draw(_unit(0.0, 1.0)),
            eps=draw(st.sampled_from([1e-6, 1e-8, 1e-3])),
            weight_decay=wd,
        )
    elif name == "RAdam":
        # betas[1] from 0.3: never rectified below 2/3; from step 6 on above about 0.84 (the
        # cases take up to 8 steps for RAdam)
        h.update(
            betas=(draw(_unit(0.0, 0.99)), draw(_unit(0.3, 0.9999))),
            eps=draw(st.sampled_from([1e-8, 1e-6, 1e-3])),
            weight_decay=wd,
            decoupled_weight_decay=draw(st.booleans()),
        )
    elif name == "Lion":
        h.update(betas=(draw(_unit(0.0, 1.0)), draw(_unit(0.0, 1.0))), weight_decay=wd)
    elif name == "Rprop":
        lo = draw(st.sampled_from([1e-6, 0.0, 1e-3]))
        h.update(
            etas=(draw(_unit(0.1, 0.9)), draw(_unit(1.05, 3.0))),
            step_sizes=(lo, draw(st.sampled_from([50.0, 0.05, 1.0]))),
        )
    elif name == "RMSprop":
        h.update(
            alpha=draw(_unit(0.5, 0.999)),
            eps=draw(st.sampled_from([1e-8, 1e-6, 1e-3])),
            weight_decay=wd,
            momentum=draw(_maybe_zero(_unit(0.0, 0.95))),
            centered=draw(st.booleans()),
        )
    else:
        h.update(
            lr_decay=draw(_maybe_zero(_unit(0.0, 0.5))),
            weight_decay=wd,
            initial_accumulator_value=draw(_maybe_zero(_unit(0.0, 1.0))),
            eps=draw(st.sampled_from([1e-10, 1e-8, 1e-5])),
        )
    return h


SHAPES = st.one_of(
    st.just(()),
    st.just((0,)),
    st.tuples(st.integers(1, 5000)),
    array_shapes(min_dims=2, max_dims=3, min_side=0, max_side=16),
    st.sampled_from([(0, 1_000_000), (1, 1, 1), (4099,), (17,), (2, 2049)]),
)
GRAD_SCALES = (1.0, 1e-3, 10.0, 0.0, 1e-20)


@st.composite
def cases(draw, max_steps: int = 5) -> dict[str, Any]:
    name = draw(st.sampled_from(NAMES))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    defaults = draw(hyperparameters(name))
    shapes = draw(st.lists(SHAPES, min_size=1, max_size=3))
    # Optionally a second group (the last parameter) with its own lr and weight decay.
    second = None
    if len(shapes) > 1 and draw(st.booleans()):
        second = {"lr": draw(_unit(*LR[name]))}
        if name != "Rprop":  # Rprop has no weight decay
            second["weight_decay"] = draw(_unit(0.0, 0.3))
    n = len(shapes)
    steps = []
    # RAdam's rectified update starts at step 6 at the earliest
    for _ in range(draw(st.integers(1, max(max_steps, 8) if name == "RAdam" else max_steps))):
        present = draw(st.lists(st.booleans(), min_size=n, max_size=n))
        scales = draw(st.lists(st.sampled_from(GRAD_SCALES), min_size=n, max_size=n))
        new_lr = draw(st.one_of(st.none(), _unit(*LR[name])))
        steps.append((present, scales, new_lr))
    seed = draw(st.integers(0, 2**32 - 1))
    return {
        "name": name,
        "dtype": dtype,
        "defaults": defaults,
        "shapes": shapes,
        "second": second,
        "steps": steps,
        "seed": seed,
    }


def _build(case: dict[str, Any], extra_params: list[np.ndarray] | None = None):
    """(param groups with fresh arrays, the gradient sequence) of a case."""
    rng = np.random.default_rng(case["seed"])
    dtype = case["dtype"]
    params = [np.asarray(rng.standard_normal(s), dtype=dtype) for s in case["shapes"]]
    params += extra_params or []
    grads = []
    for present, scales, _ in case["steps"]:
        row = []
        for k, p in enumerate(params):
            if k < len(present) and not present[k]:
                row.append(None)
                continue
            scale = scales[k % len(scales)]
            row.append(np.asarray(rng.standard_normal(p.shape) * scale, dtype=dtype))
        grads.append(row)
    if case["second"] is not None:
        groups = [{"params": params[:-1]}, {"params": params[-1:], **case["second"]}]
    else:
        groups = [{"params": params}]
    return groups, grads


def _constructor_kwargs(name: str, defaults: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(defaults)
    if name == "AdamW":
        kwargs.pop("decoupled_weight_decay", None)
    return kwargs


def _run_optirs(case, groups, grads) -> Any:
    name = case["name"]
    opt = optirs_class(name)(
        [dict(g, params=[p.copy() for p in g["params"]]) for g in groups],
        **_constructor_kwargs(name, case["defaults"]),
    )
    for (_, _, new_lr), row in zip(case["steps"], grads):
        if new_lr is not None:
            opt.param_groups[0]["lr"] = new_lr
        opt.step([None if g is None else g.copy() for g in row])
    return opt


# --------------------------------------------------------------------------------------------
# properties
# --------------------------------------------------------------------------------------------


def _expected_keys(name: str, group: dict[str, Any], stepped: bool) -> set[str]:
    if name == "Adagrad":
        return {"step", "sum"}
    if not stepped:
        return set()
    if name == "SGD":
        return {"momentum_buffer"} if group["momentum"] != 0 else set()
    if name in ("Adadelta", "RAdam", "Lion", "Rprop"):
        return set(SPECS[name].keys)
    if name in ("Adam", "AdamW"):
        return {"step", "exp_avg", "exp_avg_sq"} | (
            {"max_exp_avg_sq"} if group["amsgrad"] else set()
        )
    keys = {"step", "square_avg"}
    if group["momentum"] > 0:
        keys.add("momentum_buffer")
    if group["centered"]:
        keys.add("grad_avg")
    return keys


@PROFILE
@given(case=cases())
def test_matches_numpy_reference(case):
    name, dtype = case["name"], case["dtype"]
    groups, grads = _build(case)
    opt = _run_optirs(case, groups, grads)

    ref_groups = [dict(opt.defaults, **g) for g in groups]
    if name == "AdamW":
        for g in ref_groups:
            g["decoupled_weight_decay"] = True
    ref = Reference(name, ref_groups)
    with np.errstate(all="ignore"):
        for (_, _, new_lr), row in zip(case["steps"], grads):
            if new_lr is not None:
                ref.groups[0]["lr"] = new_lr
            ref.step(row)

    tol = tolerances(dtype, len(grads))
    params = [p for g in opt.param_groups for p in g["params"]]
    groups_of = [g for g in opt.param_groups for _ in g["params"]]
    for k, (p, expected) in enumerate(zip(params, ref.params)):
        assert p.dtype == np.dtype(dtype) and p.shape == expected.shape, k
        assert p.flags.c_contiguous and p.flags.writeable
        np.testing.assert_allclose(p, expected, **tol, err_msg=f"param {k}")
        stepped = any(row[k] is not None for row in grads)
        keys = _expected_keys(name, groups_of[k], stepped)
        state = opt.state.get(p, {})
        assert set(state) == keys, (k, sorted(state), sorted(keys))
        for key in keys:
            value, want = state[key], ref.state[k][key]
            if key == "step":
                assert value.shape == () and value.dtype == np.float32, (k, value)
                assert float(value) == float(want), (k, float(value), float(want))
                continue
            assert value.dtype == p.dtype and value.shape == p.shape, (k, key)
            np.testing.assert_allclose(value, want, **tol, err_msg=f"state[{k}][{key!r}]")


# A parameter larger than the core's parallel threshold (2**16 elements), cut into several
# work items, so that thread counts really change who computes what.
BIG = 70_001


@settings(PROFILE, max_examples=60)
@given(case=cases(max_steps=3))
def test_same_bits_for_every_thread_count_and_simd_level(case):
    def run():
        big = np.asarray(np.random.default_rng(case["seed"]).standard_normal(BIG), case["dtype"])
        groups, grads = _build(case, extra_params=[big])
        opt = _run_optirs(case, groups, grads)
        params = [p for g in opt.param_groups for p in g["params"]]
        return (
            [p.tobytes() for p in params],
            [{k: np.asarray(v).tobytes() for k, v in opt.state.get(p, {}).items()} for p in params],
        )

    assert_same_at_every_simd_level_and_thread_count(run)


@pytest.mark.parametrize("name", NAMES)
def test_reference_agrees_with_torch(name):
    """The reference itself is checked against torch.optim (for-loop path) once per optimizer,
    with every option on, so that agreeing with it means agreeing with torch."""
    import torch

    rng = np.random.default_rng(1)
    h = {
        "SGD": dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.1, maximize=True),
        "Adam": dict(lr=0.01, weight_decay=0.1, amsgrad=True, maximize=True),
        "AdamW": dict(lr=0.01, weight_decay=0.1, amsgrad=True),
        "RMSprop": dict(lr=0.01, momentum=0.5, centered=True, weight_decay=0.1, alpha=0.9),
        "Adagrad": dict(lr=0.1, lr_decay=0.1, initial_accumulator_value=0.2, weight_decay=0.1),
        "Adadelta": dict(lr=0.5, rho=0.8, weight_decay=0.1, maximize=True),
        "RAdam": dict(lr=0.01, betas=(0.8, 0.6), weight_decay=0.1, maximize=True),
        "Lion": dict(lr=0.01, betas=(0.8, 0.9), weight_decay=0.1, maximize=True),
        "Rprop": dict(lr=0.01, etas=(0.4, 1.3), step_sizes=(1e-3, 0.02), maximize=True),
    }[name]
    p0 = rng.standard_normal(257)
    tp = torch.tensor(p0, requires_grad=True)
    topt = torch_class(name)([tp], foreach=False, **h)
    groups = [dict(topt.defaults, params=[p0.copy()])]
    if name == "AdamW":
        groups[0]["decoupled_weight_decay"] = True
    ref = Reference(name, groups)
    for _ in range(6):
        g = rng.standard_normal(257) + 0.5  # mostly one sign: no wd/grad cancellation
        tp.grad = torch.tensor(g)
        topt.step()
        ref.step([g])
    np.testing.assert_allclose(ref.params[0], tp.detach().numpy(), rtol=1e-12, atol=1e-14)
    assert math.isfinite(float(ref.params[0].sum()))
