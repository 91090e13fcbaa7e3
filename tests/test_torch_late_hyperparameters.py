"""optirs.torch steps with whatever torch.optim steps with: hyperparameters set after
construction are not validated.

torch.optim checks hyperparameters in its constructor only. A value written into
``param_groups`` later, by hand or by a scheduler (a ``LambdaLR`` that takes lr below 0), is
stepped with by torch's for-loop step, NaN and infinities included; a drop-in replacement must
step with it too and give the same parameters and state. Where torch's own step raises (its
Python arithmetic on the hyperparameters fails, or a tensor operation refuses a scalar out of
the tensor's range), optirs.torch raises the same exception, with torch's message first, and
changes nothing. The NumPy API keeps its validation at every step (test_bad_input.py).

Each case runs twice: set before the first step (the full step, which builds the plan) and
after two steps (the cached plan, ``_core.TorchPlan``, which must not fall back to the full
step for a value that changes no state layout).
"""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import optirs.torch
import pytest
import torch
from conftest import OPTIMIZER_NAMES
from torch_helpers import TorchPair, all_params, assert_unchanged, random_tensor, snapshot

NAN, INF = math.nan, math.inf
F32, F64 = torch.float32, torch.float64
SHAPES = ((7,), (3, 5), (67,))

# Options that create every state buffer each optimizer has (RMSprop not centered: its
# variance square_avg - grad_avg**2 is a cancellation torch computes with one FMA, which turns
# into a different NaN/inf pattern once alpha leaves [0, 1]; see test_reliability_bad_input).
BASE = {
    "SGD": {"lr": 0.01, "momentum": 0.9},
    "Adam": {"lr": 0.01, "amsgrad": True, "weight_decay": 0.1},
    "AdamW": {"lr": 0.01, "amsgrad": True},
    "RMSprop": {"lr": 0.01, "momentum": 0.5, "weight_decay": 0.1},
    "Adagrad": {"lr": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.1},
    "Adadelta": {"lr": 0.5, "weight_decay": 0.1},
    "RAdam": {"lr": 0.01, "weight_decay": 0.1, "betas": (0.9, 0.5)},
    "Lion": {"lr": 0.01, "weight_decay": 0.1},
    "Rprop": {"lr": 0.01},
    "Adamax": {"lr": 0.01, "weight_decay": 0.1},
    "NAdam": {"lr": 0.01, "weight_decay": 0.1},
    "ASGD": {"lr": 0.01, "t0": 2.0, "weight_decay": 0.1},
}

# What the constructors of Adam, Adamax and NAdam all refuse.
_ADAM_LIKE_REFUSED = [
    {"lr": -0.01},
    {"lr": NAN},
    {"eps": -1e-3},
    {"betas": (0.9, 1.0)},
    {"betas": (-0.5, 0.999)},
    {"betas": (1.5, 0.999)},
    {"weight_decay": -0.1},
]
# Values torch.optim's constructor refuses (checked below) and its step takes.
REFUSED_BY_CONSTRUCTOR = {
    "SGD": [{"lr": -0.01}, {"momentum": -0.5}, {"weight_decay": -0.1}],
    "Adam": [*_ADAM_LIKE_REFUSED, {"betas": (0.9, -0.5)}],
    "AdamW": [
        {"lr": -0.01},
        {"lr": NAN},
        {"eps": -1e-3},
        {"betas": (0.9, 1.0)},
        {"betas": (1.5, 0.999)},
        {"weight_decay": -0.1},
    ],
    "RMSprop": [
        {"lr": -0.01},
        {"lr": NAN},
        {"alpha": -0.5},
        {"eps": -1e-3},
        {"momentum": -0.5},
        {"weight_decay": -0.1},
    ],
    "Adagrad": [
        {"lr": -0.1},
        {"lr": NAN},
        {"lr_decay": -0.05},
        {"eps": -1e-3},
        {"weight_decay": -0.1},
        {"initial_accumulator_value": -1.0},
    ],
    "Adadelta": [
        {"lr": -0.1},
        {"lr": NAN},
        {"rho": 1.5},
        {"rho": -0.5},
        {"eps": -1e-3},
        {"weight_decay": -0.1},
    ],
    "RAdam": [
        {"lr": -0.01},
        {"lr": NAN},
        {"eps": -1e-3},
        {"betas": (1.5, 0.5)},
        {"betas": (0.9, -0.5)},
        {"weight_decay": -0.1},
    ],
    # The tests' reference (conftest.LionReference) checks nothing; optirs.torch.Lion's
    # constructor refuses these (test_torch_constructor_refuses_these_values).
    "Lion": [{"lr": -0.01}, {"lr": NAN}, {"betas": (1.5, 0.9)}, {"weight_decay": -0.1}],
    "Rprop": [
        {"lr": -0.01},
        {"lr": NAN},
        {"etas": (1.5, 1.2)},
        {"etas": (0.5, 0.9)},
        {"etas": (0.0, 1.2)},
    ],
    "Adamax": _ADAM_LIKE_REFUSED,
    "NAdam": [*_ADAM_LIKE_REFUSED, {"momentum_decay": -0.01}, {"momentum_decay": -100.0}],
    "ASGD": [
        {"lr": -0.01},
        {"lr": NAN},
        {"lambd": -0.5},
        {"alpha": -0.5},
        {"weight_decay": -0.1},
    ],
}
# Values the constructor takes too, which the bridge used to refuse or which reach the kernels
# only now: NaN and infinite learning rates, RMSprop's alpha above 1, SGD's dampening.
ALSO_STEPPED = {
    "SGD": [{"lr": NAN}, {"lr": INF}, {"momentum": NAN}, {"dampening": 1.5}],
    "Adam": [{"lr": INF}, {"betas": (NAN, 0.999)}],
    "AdamW": [{"betas": (0.9, INF)}],
    "RMSprop": [{"alpha": 1.5}, {"alpha": NAN}],
    "Adagrad": [{"lr_decay": INF}],
    "Adadelta": [{"lr": INF}, {"rho": NAN}],
    "RAdam": [{"lr": INF}, {"betas": (NAN, 0.5)}, {"decoupled_weight_decay": True}],
    "Lion": [{"lr": INF}, {"betas": (NAN, 0.9)}, {"betas": (1.0, 0.0)}],
    "Rprop": [{"lr": INF}, {"step_sizes": (0.5, 0.1)}, {"step_sizes": (NAN, 1.0)}],
    "Adamax": [{"lr": INF}, {"betas": (NAN, 0.999)}, {"betas": (0.9, INF)}, {"eps": INF}],
    "NAdam": [
        {"lr": INF},
        {"betas": (NAN, 0.999)},
        {"momentum_decay": INF},
        {"momentum_decay": NAN},
        {"decoupled_weight_decay": True, "weight_decay": 1e30},
    ],
    "ASGD": [{"lr": INF}, {"t0": NAN}, {"t0": -INF}, {"lambd": INF}, {"alpha": NAN}],
}


def _cases():
    for name in OPTIMIZER_NAMES:
        for values in REFUSED_BY_CONSTRUCTOR[name] + ALSO_STEPPED[name]:
            yield pytest.param(name, values, id=f"{name}-{values}")


def _groups(dtype, seed=5):
    rng = np.random.default_rng(seed)
    tensors = [random_tensor(rng, s, dtype) for s in SHAPES]
    return [{"params": tensors[:2]}, {"params": tensors[2:], "lr": 0.02}]


class FullSteps:
    """Counts the bridge's full steps (everything not stepped through the cached plan)."""

    def __init__(self, opt):
        self.count = 0
        full = opt._optirs_full_step

        def counted(*args):
            self.count += 1
            return full(*args)

        opt._optirs_full_step = counted


def _set(pair: TorchPair, values: dict) -> None:
    for gi in range(len(pair.opt.param_groups)):
        pair.set_hyperparameters(gi, **values)


def _run(name, values, dtype, at, steps=5, base=None, rng_seed=9):
    base = BASE[name] if base is None else base
    pair = TorchPair(name, _groups(dtype), **base)
    full = FullSteps(pair.opt)
    rng = np.random.default_rng(rng_seed)
    same_layout = True
    for step in range(steps):
        if step == at:
            needs = [pair.opt._spec.needs(g) for g in pair.opt.param_groups]
            _set(pair, values)
            same_layout = needs == [pair.opt._spec.needs(g) for g in pair.opt.param_groups]
            full.count = 0
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pair.step(pair.make_grads(rng, step))
        pair.compare()
    if at > 0 and same_layout:
        assert full.count == 0, "the cached plan fell back to the full step"
    return pair


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_torch_constructor_refuses_these_values(name):
    """The table above is what it says: torch.optim's constructor raises for each value."""
    cls = getattr(torch.optim, name, None) or getattr(optirs.torch, name)  # Lion: optirs'
    for values in REFUSED_BY_CONSTRUCTOR[name]:
        with pytest.raises(ValueError):
            cls([torch.zeros(3)], **{**BASE[name], **values})


@pytest.mark.parametrize("at", [0, 2], ids=["first_step", "cached_plan"])
@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize(("name", "values"), list(_cases()))
def test_value_set_later_steps_like_torch(name, values, dtype, at):
    _run(name, values, dtype, at)


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_lambda_lr_driving_lr_negative(name, dtype):
    """A real scheduler: LambdaLR takes lr from 1x through 0 to -1.5x its base value."""
    pair = TorchPair(name, _groups(dtype), **BASE[name])
    full = FullSteps(pair.opt)
    factor = lambda epoch: 1.0 - 0.5 * epoch  # noqa: E731
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, factor) for o in (pair.opt, pair.topt)]
    rng = np.random.default_rng(4)
    lrs = []
    for step in range(6):
        pair.step(pair.make_grads(rng, step))
        pair.compare()
        for s in scheds:
            s.step()
        lrs.append(pair.opt.param_groups[0]["lr"])
        assert lrs[-1] == pair.topt.param_groups[0]["lr"]
    assert min(lrs) < 0
    assert full.count == 1, "only the first step should look at every tensor"


@pytest.mark.parametrize("at", [0, 2], ids=["first_step", "cached_plan"])
@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
def test_sgd_nesterov_with_dampening_set_later(dtype, at):
    """torch's constructor refuses nesterov with dampening; its step dampens the buffer."""
    base = {"lr": 0.01, "momentum": 0.9, "nesterov": True}
    with pytest.raises(ValueError, match="Nesterov"):
        torch.optim.SGD([torch.zeros(3)], **base, dampening=0.5)
    _run("SGD", {"dampening": 0.5}, dtype, at, base=base)
    # and with momentum switched off (nesterov then has nothing to act on)
    _run("SGD", {"momentum": 0.0}, dtype, at, base=base)


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
def test_rmsprop_momentum_set_negative_then_positive(dtype):
    """torch: ``momentum > 0`` decides whether the momentum buffer is used; a negative value
    leaves it alone (not updated), and it is used again once momentum is positive."""
    pair = TorchPair("RMSprop", _groups(dtype), **BASE["RMSprop"])
    rng = np.random.default_rng(8)
    for step in range(7):
        if step == 2:
            _set(pair, {"momentum": -0.5})
        if step == 5:
            _set(pair, {"momentum": 0.3})
        frozen = (
            [pair.opt.state[p]["momentum_buffer"].clone() for p in pair.params]
            if (2 <= step < 5)
            else None
        )
        pair.step(pair.make_grads(rng, step))
        pair.compare()
        if frozen is not None:
            for p, buf in zip(pair.params, frozen):
                assert torch.equal(pair.opt.state[p]["momentum_buffer"], buf)


# --------------------------------------------------------------------------------------------
# where torch's step raises
# --------------------------------------------------------------------------------------------


def _stepped_twins(name, dtype, base):
    """optirs.torch and torch.optim (for-loop) at the same point, stepped twice."""
    pair = TorchPair(name, _groups(dtype), **base)
    rng = np.random.default_rng(2)
    for step in range(2):
        pair.step(pair.make_grads(rng, step))
    return pair, pair.make_grads(rng, 2)


# (name, base options, values, dtype): torch.optim's step raises for each.
RAISING = [
    ("Adam", BASE["Adam"], {"betas": (1.0, 0.999)}, F32),  # lr / (1 - 1 ** step)
    ("AdamW", BASE["AdamW"], {"betas": (1.0, 0.999)}, F64),
    ("Adam", BASE["Adam"], {"betas": (0.9, 1.5)}, F32),  # sqrt(1 - 1.5 ** step): complex
    ("Adam", BASE["Adam"], {"betas": (0.9, 1.5)}, F64),
    ("Adam", BASE["Adam"], {"betas": (1e200, 0.999)}, F64),  # 1e200 ** 3 overflows
    ("Adagrad", BASE["Adagrad"], {"lr_decay": -0.5}, F32),  # 1 + (3 - 1) * -0.5 = 0
    ("SGD", BASE["SGD"], {"lr": 1e300}, F32),  # -lr does not fit a float32
    ("SGD", BASE["SGD"], {"dampening": -1e300}, F32),
    ("Adam", BASE["Adam"], {"lr": 1e300}, F32),
    ("RMSprop", BASE["RMSprop"], {"alpha": 1e300}, F32),
    ("Adagrad", BASE["Adagrad"], {"weight_decay": 1e300}, F32),
    ("SGD", BASE["SGD"], {"lr": 1j}, F32),  # complex: torch fails in a tensor operation
    ("SGD", BASE["SGD"], {"lr": None}, F32),  # not a number: TypeError
    ("Adam", BASE["Adam"], {"eps": "1e-8"}, F32),
    ("Adamax", BASE["Adamax"], {"betas": (1.0, 0.999)}, F32),  # lr / (1 - 1 ** step)
    ("Adamax", BASE["Adamax"], {"betas": (1e200, 0.999)}, F64),  # 1e200 ** 3 overflows
    ("Adamax", BASE["Adamax"], {"lr": 1e300}, F32),
    ("Adamax", BASE["Adamax"], {"weight_decay": 1e300}, F32),
    ("NAdam", BASE["NAdam"], {"betas": (1e300, 0.999)}, F32),  # 1 - beta1 does not fit
    ("NAdam", BASE["NAdam"], {"momentum_decay": -1e10}, F64),  # 0.96 ** -3e10 overflows
    ("NAdam", BASE["NAdam"], {"betas": (0.9, 1e200)}, F64),  # 1e200 ** 3 overflows
    ("NAdam", BASE["NAdam"], {"betas": (0.9, 1e300)}, F32),  # 1 - beta2 does not fit
    ("NAdam", BASE["NAdam"], {"lr": 1e300}, F32),
    ("NAdam", BASE["NAdam"], {"weight_decay": 1e300}, F32),
    ("ASGD", BASE["ASGD"], {"alpha": 1e300}, F64),  # (1 + ...) ** 1e300 overflows
    ("ASGD", BASE["ASGD"], {"alpha": -1e300}, F32),  # ... ** -1e300 is 0: lr / 0
    # 1 + (-1/3 * 1.0) * 3 is 0 at step 3: lr / 0 ** alpha, then 0 ** -1
    ("ASGD", BASE["ASGD"], {"lambd": -1 / 3, "lr": 1.0}, F32),
    ("ASGD", BASE["ASGD"], {"lambd": -1 / 3, "lr": 1.0, "alpha": -1.0}, F64),
    ("ASGD", BASE["ASGD"], {"weight_decay": 1e300}, F32),
]


@pytest.mark.parametrize(
    ("name", "base", "values", "dtype"),
    RAISING,
    ids=[f"{n}-{v}-{str(d).removeprefix('torch.')}" for n, _, v, d in RAISING],
)
def test_raises_where_torch_raises_changing_nothing(name, base, values, dtype):
    pair, grads = _stepped_twins(name, dtype, base)
    _set(pair, values)
    pair.set_grads(grads)
    with pytest.raises(Exception) as theirs:
        pair.topt.step()
    before = snapshot(pair.opt)
    with pytest.raises(type(theirs.value)) as ours:
        pair.opt.step()
    assert type(ours.value) is type(theirs.value)
    key = next(iter(values))
    message = str(ours.value)
    assert f"param_groups[0]['{key}']" in message
    if "must be a real number" not in message:  # else torch's own words vary by operation
        assert message.startswith(str(theirs.value) + ": "), (message, str(theirs.value))
    assert_unchanged(pair.opt, before)
    # Put right, the bridge steps on.
    for gi, group in enumerate(pair.opt.param_groups):
        group.update({k: copy.deepcopy(pair.topt.defaults[k]) for k in values})
        group["lr"] = base["lr"] if gi == 0 else 0.02
    pair.opt.step()
    assert all(torch.isfinite(p).all() for p in all_params(pair.opt))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize(
    ("name", "values"),
    [("Adam", {"betas": (0.9, 1.5)}), ("SGD", {"lr": 1e5}), ("Adagrad", {"weight_decay": 1e39})],
    ids=["Adam-complex", "SGD-lr", "Adagrad-wd"],
)
def test_half_types_raise_where_torch_raises(name, values, dtype):
    """float16/bfloat16: torch's for-loop step refuses a complex bias correction in its
    division (NotImplementedError) and an ``alpha`` out of the parameter dtype's range
    (float16 tops out at 65504)."""
    torch_raises = True
    outcomes = []
    for module in (torch.optim, optirs.torch):
        g = torch.Generator().manual_seed(0)
        p = torch.nn.Parameter(torch.randn(40, generator=g).to(dtype))
        opt = getattr(module, name)([p], **BASE[name])
        p.grad = torch.randn(40, generator=g).to(dtype)
        opt.step()
        opt.param_groups[0].update(values)
        before = snapshot(opt)
        try:
            opt.step()
            outcomes.append(None)
        except Exception as e:
            outcomes.append(e)
            if module is optirs.torch:
                assert_unchanged(opt, before)
    theirs, ours = outcomes
    if name == "SGD" and dtype == torch.bfloat16:
        torch_raises = False  # 1e5 fits a bfloat16
    assert (theirs is not None) == torch_raises
    assert type(ours) is type(theirs)
    if theirs is not None:
        assert str(ours).startswith(str(theirs) + ": ")


def test_raises_on_the_first_step_too():
    """The full (plan-building) step refuses what the plan refuses."""
    pair = TorchPair("Adam", _groups(F32), **BASE["Adam"])
    _set(pair, {"betas": (1.0, 0.999)})
    pair.set_grads(pair.make_grads(np.random.default_rng(1), 0))
    with pytest.raises(ZeroDivisionError, match="float division by zero"):
        pair.topt.step()
    with pytest.raises(ZeroDivisionError, match=r"^float division by zero: .*\['betas'\]\[0\]"):
        pair.opt.step()
    assert not pair.opt.state


def test_step_parameters_names_the_real_group():
    """step_parameters steps one-parameter copies of the groups; an error names the
    optimizer's own group."""
    params = [torch.nn.Parameter(torch.ones(3)) for _ in range(3)]
    opt = optirs.torch.Adagrad([{"params": params[:2]}, {"params": params[2:]}])
    opt.param_groups[1]["lr"] = None
    for p in params:
        p.grad = torch.ones(3)
    with pytest.raises(TypeError, match=r"param_groups\[1\]\['lr'\]"):
        opt.step_parameters([params[0], params[2]])
    opt.param_groups[1]["lr_decay"] = -1.0  # 1 + (2 - 1) * -1 = 0 at the second step
    opt.param_groups[1]["lr"] = 0.1
    opt.step_parameters([params[2]])
    with pytest.raises(ZeroDivisionError, match=r"param_groups\[1\]\['lr_decay'\]"):
        opt.step_parameters([params[2]])
    assert float(opt.state[params[2]]["step"]) == 1.0
