"""optirs.torch: drop-in torch.optim subclasses whose ``step`` runs optirs's Rust core in place.

The promise under test: replacing ``torch.optim.X`` by ``optirs.torch.X`` in a CPU training
script changes nothing but the speed. Every numerical check compares with ``torch.optim.X``
(``foreach=False``, the for-loop path) with conftest.py's tolerances, on the hyperparameter
combinations of test_parity.py (imported, not copied). Sections:

- API: subclassing, signatures, named parameters, tensor learning rates;
- parity: combos x dtypes x shapes, several groups, ``grad=None``, hyperparameters changed
  mid-run, long runs, non-finite gradients;
- in place: same tensors, same ``data_ptr()``, no new state tensors per step, autograd's
  version counter;
- state format and state dicts moving between torch.optim and optirs.torch (and through
  ``torch.save``/``torch.load(weights_only=True)``);
- torch machinery: lr schedulers, GradScaler, clip_grad_norm_, frozen parameters, zero_grad,
  closures, hooks, add_param_group, foreach/fused flags;
- refusals: construction-time and step-time errors, which must leave every parameter and state
  tensor bitwise unchanged and create no state.
"""

from __future__ import annotations

import copy
import inspect
import math
import re

import optirs.torch
import pytest
import torch
from conftest import DTYPE_IDS, FULL_STATE_KEYS, FULL_STATE_KWARGS, OPTIMIZER_NAMES, SCALAR_KEYS
from optirs._spec import SPECS
from test_parity import (
    COMBO_IDS,
    COMBOS,
    LONG_COMBOS,
    MULTI_GROUP,
    SCHEDULES,
    SHAPE_IDS,
    SHAPES,
    nonfinite_grads,
    sometimes_none,
)
from torch import nn
from torch.optim import lr_scheduler
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from torch_helpers import (
    TORCH_DTYPES,
    TorchPair,
    all_params,
    as_parameter,
    assert_matches_torch,
    assert_unchanged,
    bridge_class,
    random_tensor,
    run_pair,
    snapshot,
    tensor_ids_and_pointers,
    torch_class,
)

F32, F64 = torch.float32, torch.float64
FUSED_NAMES = ("SGD", "Adam", "AdamW", "Adagrad")  # torch has fused=True on the CPU for these
# Lion, which torch.optim lacks, has no foreach switch either.
FOREACH_NAMES = [n for n in SPECS if any(p.name == "foreach" for p in SPECS[n].params)]

# Options that create every kind of state buffer, without coupled weight decay: the tests that
# compute gradients from a model cannot use conftest's gradient conditioning.
MODEL_KWARGS = {
    "SGD": {"lr": 0.05, "momentum": 0.9, "nesterov": True},
    "Adam": {"lr": 0.01, "amsgrad": True},
    "AdamW": {"lr": 0.01, "amsgrad": True, "weight_decay": 0.1},
    "RMSprop": {"lr": 0.01, "momentum": 0.5, "centered": True},
    "Adagrad": {"lr": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.1},
    "Adadelta": {"lr": 0.5, "rho": 0.8},
    "RAdam": {
        "lr": 0.01,
        "betas": (0.9, 0.99),
        "weight_decay": 0.1,
        "decoupled_weight_decay": True,
    },
    "Lion": {"lr": 0.01, "weight_decay": 0.1},
    "Rprop": {"lr": 0.01, "etas": (0.4, 1.3)},
    "Adamax": {"lr": 0.01, "betas": (0.8, 0.99)},
    "NAdam": {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True},
    "ASGD": {"lr": 0.05, "t0": 1.0},
}


def torch_base(name):
    """The torch class the bridge class subclasses: torch.optim's of the same name, or
    torch.optim.Optimizer for one torch.optim lacks (Lion)."""
    return torch.optim.Optimizer if not SPECS[name].in_torch else torch_class(name)


def tensors(rng, shapes, dtype=F32):
    return [random_tensor(rng, s, dtype) for s in shapes]


# --------------------------------------------------------------------------------------------
# API
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_is_the_torch_class(name):
    opt = bridge_class(name)([nn.Parameter(torch.zeros(3))])
    assert isinstance(opt, torch_base(name))
    assert isinstance(opt, torch.optim.Optimizer)
    assert issubclass(bridge_class(name), torch_base(name))
    assert type(opt).__name__ == name


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_signature_is_torchs(name):
    """torch's parameters with the same names, order, kinds and defaults (annotations may
    differ), followed only by optirs's own keyword-only options, off by default."""
    ours = [
        (p.name, p.kind, p.default)
        for p in inspect.signature(bridge_class(name).__init__).parameters.values()
    ]
    theirs = [
        (p.name, p.kind, p.default)
        for p in inspect.signature(torch_class(name).__init__).parameters.values()
        # the tests' Lion reference takes torch's `foreach` only to be built like the others
        if SPECS[name].in_torch or p.name != "foreach"
    ]
    extras = [
        ("skip_nonfinite", inspect.Parameter.KEYWORD_ONLY, False),
        ("flush_denormals", inspect.Parameter.KEYWORD_ONLY, False),
        ("state_dtype", inspect.Parameter.KEYWORD_ONLY, None),
        ("bf16_stochastic_round", inspect.Parameter.KEYWORD_ONLY, False),
        ("master_weights", inspect.Parameter.KEYWORD_ONLY, False),
        ("seed", inspect.Parameter.KEYWORD_ONLY, None),
    ]
    assert ours == theirs + extras


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_defaults_and_param_groups_are_torchs(name):
    ours = bridge_class(name)([nn.Parameter(torch.zeros(3))])
    theirs = torch_class(name)([nn.Parameter(torch.zeros(3))])
    assert ours.defaults == theirs.defaults
    strip = [{k: v for k, v in g.items() if k != "params"} for g in ours.param_groups]
    assert strip == [{k: v for k, v in g.items() if k != "params"} for g in theirs.param_groups]


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_named_parameters(name):
    """torch.optim accepts ``model.named_parameters()``; so does the bridge, with the same dict."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    tmodel = copy.deepcopy(model)
    opt = bridge_class(name)(model.named_parameters(), **MODEL_KWARGS[name])
    topt = torch_class(name)(tmodel.named_parameters(), foreach=False, **MODEL_KWARGS[name])
    x = torch.linspace(-1, 1, 20).reshape(5, 4)
    for m, o in ((model, opt), (tmodel, topt)):
        for _ in range(3):
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()
    assert_matches_torch(opt, list(model.parameters()), topt, list(tmodel.parameters()), 3)
    sd, tsd = opt.state_dict(), topt.state_dict()
    assert sd["param_groups"][0]["param_names"] == tsd["param_groups"][0]["param_names"]
    assert sd["param_groups"][0]["param_names"] == ["0.weight", "0.bias", "2.weight", "2.bias"]


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_tensor_learning_rate(name, rng):
    """torch.optim takes ``lr`` as a 0-d tensor on the for-loop path; so must the bridge."""
    kwargs = {**FULL_STATE_KWARGS[name], "lr": torch.tensor(FULL_STATE_KWARGS[name]["lr"])}
    run_pair(name, [{"params": tensors(rng, [(7,), (33,)])}], steps=5, rng=rng, **kwargs)


# --------------------------------------------------------------------------------------------
# parity with torch.optim (for-loop path)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("name", "cid", "kwargs"), COMBOS, ids=COMBO_IDS)
def test_combo(name, cid, kwargs, dtype, shape, rng):
    run_pair(name, [{"params": tensors(rng, [shape], dtype)}], steps=8, rng=rng, **kwargs)


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("name", "cid", "kwargs"), COMBOS, ids=COMBO_IDS)
def test_combo_many_params(name, cid, kwargs, dtype, rng):
    """Every shape of the table at once, plus lengths around SIMD widths, in one optimizer."""
    shapes = [*SHAPES, (1,), (8,), (9,), (15,), (16,), (31,), (33,), (64,), (65,), (2, 3, 4)]
    run_pair(name, [{"params": tensors(rng, shapes, dtype)}], steps=5, rng=rng, **kwargs)


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_multiple_param_groups(name, dtype, rng):
    defaults, group_options = MULTI_GROUP[name]
    shapes = [[(7,), (3, 5)], [(17,)], [(), (4099,)]]
    groups = [
        {"params": tensors(rng, s, dtype), **options} for s, options in zip(shapes, group_options)
    ]
    run_pair(name, groups, steps=10, rng=rng, **defaults)


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_grad_none_on_some_steps(name, dtype, rng):
    """``p.grad is None``: parameter and state untouched, state not created, as torch does."""
    groups = [
        {"params": tensors(rng, [(7,), (17,)], dtype)},
        {"params": tensors(rng, [(3, 5), ()], dtype), "lr": 0.05},
    ]
    pair = run_pair(
        name, groups, steps=8, rng=rng, grad_fn=sometimes_none, **FULL_STATE_KWARGS[name]
    )
    never = pair.params[0]
    if name == "Adagrad":  # torch creates Adagrad's state at construction
        assert float(pair.opt.state[never]["step"]) == 0.0
    else:
        assert never not in pair.opt.state


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", sorted(SCHEDULES))
def test_hyperparameters_changed_mid_run(case, dtype, rng):
    """lr (and every other hyperparameter) written into param_groups between steps."""
    name = case.split("_")[0]
    kwargs, schedule = SCHEDULES[case]
    groups = [
        {"params": tensors(rng, [(7,), (33,)], dtype)},
        {"params": tensors(rng, [(3, 5)], dtype)},
    ]
    run_pair(name, groups, steps=12, rng=rng, schedule=schedule, **kwargs)


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    ("name", "kwargs"), LONG_COMBOS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(LONG_COMBOS)]
)
def test_long_run(name, kwargs, dtype, rng):
    groups = [{"params": tensors(rng, [(17,), (4099,), ()], dtype)}]
    run_pair(name, groups, steps=120, rng=rng, compare_every=10, **kwargs)


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("name", "cid", "kwargs"), COMBOS, ids=COMBO_IDS)
def test_nonfinite_gradients_propagate_like_torch(name, cid, kwargs, dtype, rng):
    groups = [{"params": tensors(rng, [(37,), (7,)], dtype)}]
    run_pair(name, groups, steps=5, rng=rng, grad_fn=nonfinite_grads, **kwargs)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_mixed_dtypes(name, rng):
    groups = [
        {"params": [*tensors(rng, [(9,)], F32), *tensors(rng, [(9,)], F64)]},
        {"params": tensors(rng, [(5,)], F64), "lr": 0.05},
    ]
    run_pair(name, groups, steps=6, rng=rng, **FULL_STATE_KWARGS[name])


# --------------------------------------------------------------------------------------------
# in place
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_updates_in_place(name, dtype, rng):
    """Same parameter objects and storage; state tensors created once, then updated in place."""
    shapes = [(), (0,), (7,), (4099,), (3, 5)]
    params = [as_parameter(t) for t in tensors(rng, shapes, dtype)]
    identity = [(id(p), p.data_ptr()) for p in params]
    initial = [p.detach().clone() for p in params]
    opt = bridge_class(name)(params, **FULL_STATE_KWARGS[name])
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert [(id(p), p.data_ptr()) for p in all_params(opt)] == identity
    for p, p0 in zip(params, initial):
        if p.numel():
            assert not torch.equal(p.detach(), p0), "parameter was not updated"
    after_first = tensor_ids_and_pointers(opt)
    state_objects = {(i, k): v for i, p in enumerate(params) for k, v in opt.state[p].items()}
    for _ in range(5):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        assert tensor_ids_and_pointers(opt) == after_first
    for i, p in enumerate(params):
        for k, v in opt.state[p].items():
            assert v is state_objects[(i, k)], f"state[{i}][{k!r}] was replaced"
            assert v.is_contiguous()


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_step_bumps_autograd_version_counter(name):
    """An in-place update must be visible to autograd, as torch.optim's in-place ops are.

    With torch.optim, backpropagating through a graph that saved a parameter after the
    parameter was stepped raises "modified by an inplace operation"; a step that bypasses the
    version counter would let that backward silently use the new values.
    """
    results = []
    for cls in (torch_class(name), bridge_class(name)):
        p = nn.Parameter(torch.linspace(-1, 1, 5))
        opt = cls([p], **MODEL_KWARGS[name])
        x = torch.linspace(1, 2, 5, requires_grad=True)
        loss = (p * x).square().sum()
        loss.backward(retain_graph=True)
        version = p._version
        opt.step()
        bumped = p._version > version
        try:
            loss.backward()
            raised = False
        except RuntimeError as e:
            raised = "modified by an inplace operation" in str(e)
        results.append((cls.__module__, bumped, raised))
    assert results[0][1:] == (True, True)  # torch.optim's behaviour
    assert results[1][1:] == results[0][1:], results


# --------------------------------------------------------------------------------------------
# state format
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("full", [False, True], ids=["default", "full"])
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_state_and_state_dict_format(name, full, dtype, rng):
    """Keys, types, dtypes, shapes of the state and the layout of state_dict() are torch's."""
    kwargs = FULL_STATE_KWARGS[name] if full else {}
    groups = [
        {"params": tensors(rng, [(7,), (3, 5)], dtype)},
        {"params": tensors(rng, [(), (33,)], dtype), "lr": 0.05},
    ]
    ours = bridge_class(name)(
        [{**g, "params": [as_parameter(t) for t in g["params"]]} for g in groups], **kwargs
    )
    theirs = torch_class(name)(
        [{**g, "params": [as_parameter(t) for t in g["params"]]} for g in groups], **kwargs
    )
    for step in range(3):
        for opt in (ours, theirs):
            for i, p in enumerate(all_params(opt)):
                # parameter 1 gets no gradient on the first step, parameter 2 never gets one
                skip = i == 2 or (i == 1 and step == 0)
                p.grad = None if skip else torch.full_like(p, 0.5 - i)
            opt.step()
    for p, tp in zip(all_params(ours), all_params(theirs)):
        state, tstate = ours.state.get(p, {}), theirs.state.get(tp, {})
        assert sorted(state) == sorted(tstate)
        for key, value in state.items():
            assert type(value) is type(tstate[key])
            if key == "step" or key in ours._spec.scalar_names:
                assert value.shape == () and value.dtype == F32 and value.device.type == "cpu"
            else:
                assert value.dtype == p.dtype and value.shape == p.shape
    if full:
        stepped = all_params(ours)[0]
        assert set(ours.state[stepped]) == FULL_STATE_KEYS[name]
    sd, tsd = ours.state_dict(), theirs.state_dict()
    assert sorted(sd) == sorted(tsd) == ["param_groups", "state"]
    assert sorted(sd["state"]) == sorted(tsd["state"])
    for i in sd["state"]:
        assert sorted(sd["state"][i]) == sorted(tsd["state"][i])
        for key, value in sd["state"][i].items():
            assert value.dtype == tsd["state"][i][key].dtype
            assert value.shape == tsd["state"][i][key].shape
    assert sd["param_groups"] == tsd["param_groups"]


@pytest.mark.parametrize("name", ["Adam", "AdamW", "RMSprop", "Adagrad"])
def test_step_is_float64_under_float64_default_dtype(name, rng):
    """torch makes ``step`` float64 when the default dtype is float64 at state creation."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        pair = TorchPair(
            name,
            [{"params": tensors(rng, [(7,), (3, 5)], F32) + tensors(rng, [(9,)], F64)}],
            **FULL_STATE_KWARGS[name],
        )
        pair.step(pair.make_grads(rng, 0))
        pair.compare()
        for p in pair.params:
            assert pair.opt.state[p]["step"].dtype == torch.float64
    finally:
        torch.set_default_dtype(previous)
    # The counters stay float64 afterwards, and stepping keeps working like torch.
    for step in range(1, 5):
        pair.step(pair.make_grads(rng, step))
        pair.compare()
        assert pair.opt.state[pair.params[0]]["step"].dtype == torch.float64


@pytest.mark.parametrize("name", ["Adam", "AdamW", "Adagrad"])
def test_step_dtype_with_fused_under_float64_default_dtype(name, rng):
    """With ``fused=True`` torch keeps ``step`` float32 even under a float64 default dtype.

    Checked for a parameter given at construction and for one added by add_param_group (its
    state is created lazily at its first step).
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        dtypes = []
        for cls in (torch_class(name), bridge_class(name)):
            a, b = as_parameter(torch.ones(5)), as_parameter(torch.ones(3))
            opt = cls([a], fused=True)
            opt.add_param_group({"params": [b]})
            a.grad, b.grad = torch.ones(5), torch.ones(3)
            opt.step()
            dtypes.append([opt.state[a]["step"].dtype, opt.state[b]["step"].dtype])
    finally:
        torch.set_default_dtype(previous)
    assert dtypes[0] == [F32, F32]  # torch
    assert dtypes[1] == dtypes[0]


# --------------------------------------------------------------------------------------------
# state dicts between torch.optim and optirs.torch
# --------------------------------------------------------------------------------------------


def _groups(rng, dtype):
    return [
        {"params": tensors(rng, [(7,), (3, 5)], dtype)},
        {"params": tensors(rng, [(), (33,)], dtype), "lr": 0.05},
    ]


def _clone_groups(opt, **overrides):
    return [
        {**g, **overrides, "params": [as_parameter(p) for p in g["params"]]}
        for g in opt.param_groups
    ]


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
@pytest.mark.parametrize("direction", ["torch_to_optirs", "optirs_to_torch"])
def test_state_dict_moves_between_torch_and_optirs(direction, name, dtype, rng):
    """Train k steps with one, checkpoint, resume with the other: torch's trajectory continues.

    The reference is one uninterrupted torch.optim run over the same gradients.
    """
    k, m = 4, 6
    kwargs = FULL_STATE_KWARGS[name]
    src_cls, dst_cls = (
        (torch_class(name), bridge_class(name))
        if direction == "torch_to_optirs"
        else (bridge_class(name), torch_class(name))
    )
    pair = TorchPair(name, _groups(rng, dtype), **kwargs)  # .topt is the uninterrupted run
    src = src_cls(_clone_groups(pair.topt, foreach=None), **kwargs)
    for step in range(k):
        grads = pair.make_grads(rng, step)
        if step == 0:
            grads[1] = None  # parameter 1 has no state (or step 0) after the first step
        pair.step(grads)
        for p, g in zip(all_params(src), grads):
            p.grad = None if g is None else torch.from_numpy(g.copy())
        src.step()
    saved = src.state_dict()
    dst = dst_cls(_clone_groups(src, lr=0.9), **{**kwargs, "lr": 0.7})
    dst.load_state_dict(saved)
    # torch's load_state_dict casts 0-d state values (NAdam's mu_product) to the parameters'
    # dtype, which changes how they round from then on: the reference resumes with them cast
    # too, as torch.optim itself resuming from this checkpoint would.
    for tp in pair.tparams:
        for key in SCALAR_KEYS[name] & set(pair.topt.state.get(tp, {})):
            pair.topt.state[tp][key] = pair.topt.state[tp][key].to(tp.dtype)
    assert [g["lr"] for g in dst.param_groups] == [g["lr"] for g in src.param_groups]
    assert_matches_torch(dst, all_params(dst), pair.topt, pair.tparams, k)
    for step in range(k, k + m):
        grads = pair.make_grads(rng, step)
        pair.step(grads)
        for p, g in zip(all_params(dst), grads):
            p.grad = torch.from_numpy(g.copy())
        dst.step()
        assert_matches_torch(dst, all_params(dst), pair.topt, pair.tparams, step + 1)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_torch_save_and_load_weights_only(name, rng, tmp_path):
    """state_dict() survives torch.save / torch.load(weights_only=True) and resumes exactly."""
    kwargs = FULL_STATE_KWARGS[name]
    pair = TorchPair(name, _groups(rng, F32), **kwargs)
    for step in range(3):
        pair.step(pair.make_grads(rng, step))
    path = tmp_path / "optimizer.pt"
    torch.save({"optimizer": pair.opt.state_dict()}, path)
    loaded = torch.load(path, weights_only=True)["optimizer"]
    resumed = bridge_class(name)(_clone_groups(pair.opt), **kwargs)
    resumed.load_state_dict(loaded)
    for p, q in zip(pair.params, all_params(resumed)):
        assert sorted(pair.opt.state[p]) == sorted(resumed.state[q])
        for key, value in pair.opt.state[p].items():
            restored = resumed.state[q][key]
            assert restored.dtype == value.dtype and torch.equal(restored, value), key
    for step in range(3, 8):
        grads = pair.make_grads(rng, step)
        pair.step(grads)
        for p, g in zip(all_params(resumed), grads):
            p.grad = torch.from_numpy(g.copy())
        resumed.step()
        assert_matches_torch(resumed, all_params(resumed), pair.topt, pair.tparams, step + 1)


# --------------------------------------------------------------------------------------------
# lr schedulers (explicit gradients, so conftest's tolerances apply unchanged)
# --------------------------------------------------------------------------------------------

SCHED_STEPS = 24
PLATEAU_METRICS = [5, 4, 3, 3, 3, 3, 2.5, 2.5, 2.5, 2.5, 2.5, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2]

SCHEDULERS = [
    *(
        (name, "StepLR", FULL_STATE_KWARGS[name], lambda o: lr_scheduler.StepLR(o, 5, gamma=0.5))
        for name in OPTIMIZER_NAMES
    ),
    *(
        (
            name,
            "CosineAnnealingLR",
            FULL_STATE_KWARGS[name],
            lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=10, eta_min=1e-4),
        )
        for name in OPTIMIZER_NAMES
    ),
    *(
        (
            name,
            "ReduceLROnPlateau",
            FULL_STATE_KWARGS[name],
            lambda o: lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=1),
        )
        for name in OPTIMIZER_NAMES
    ),
    *(
        (
            name,
            "OneCycleLR",
            kwargs,
            lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=SCHED_STEPS),
        )
        for name, kwargs in [
            ("SGD", {"lr": 0.01, "momentum": 0.9}),
            ("SGD", {"lr": 0.01, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1}),
            ("Adam", {"lr": 0.01}),
            ("Adam", {"lr": 0.01, "amsgrad": True, "weight_decay": 0.1}),
            ("AdamW", {"lr": 0.01}),
            ("RMSprop", {"lr": 0.01, "momentum": 0.5}),
        ]
    ),
    *(
        (
            name,
            "CyclicLR",
            kwargs,
            lambda o: lr_scheduler.CyclicLR(
                o,
                base_lr=0.01,
                max_lr=0.2,
                step_size_up=4,
                cycle_momentum=True,
                base_momentum=0.7,
                max_momentum=0.95,
            ),
        )
        for name, kwargs in [
            ("SGD", {"lr": 0.01, "momentum": 0.9}),
            ("SGD", {"lr": 0.01, "momentum": 0.9, "dampening": 0.2}),
            ("RMSprop", {"lr": 0.01, "momentum": 0.9}),
        ]
    ),
]
SCHEDULER_IDS = [f"{sched}-{name}-{i}" for i, (name, sched, _, _) in enumerate(SCHEDULERS)]


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("name", "sched", "kwargs", "make"), SCHEDULERS, ids=SCHEDULER_IDS)
def test_lr_scheduler(name, sched, kwargs, make, dtype, rng):
    """The schedule drives both optimizers identically (lr, momentum/betas); same trajectory."""
    pair = TorchPair(name, _groups(rng, dtype), **kwargs)
    scheduler, tscheduler = make(pair.opt), make(pair.topt)
    for step in range(SCHED_STEPS):
        hyper = [
            {k: g[k] for k in ("lr", "momentum", "betas") if k in g} for g in pair.opt.param_groups
        ]
        assert hyper == [
            {k: g[k] for k in ("lr", "momentum", "betas") if k in g} for g in pair.topt.param_groups
        ]
        pair.step(pair.make_grads(rng, step))
        pair.compare()
        if sched == "ReduceLROnPlateau":
            scheduler.step(PLATEAU_METRICS[step])
            tscheduler.step(PLATEAU_METRICS[step])
        else:
            scheduler.step()
            tscheduler.step()
    lrs = [g["lr"] for g in pair.opt.param_groups]
    assert lrs == [g["lr"] for g in pair.topt.param_groups]
    assert lrs != [0.01, 0.05] or sched == "CyclicLR"  # the schedule did something


# --------------------------------------------------------------------------------------------
# models: GradScaler, clipping, frozen parameters, zero_grad, closures, hooks
# --------------------------------------------------------------------------------------------


def make_models(dtype=F32, seed=0):
    """Two identical small MLPs (6 -> 8 -> 3), initialised without touching the global RNG."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)
    return model, copy.deepcopy(model)


def batch(step, dtype=F32):
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(16, 6, generator=gen, dtype=dtype), torch.randn(
        16, 3, generator=gen, dtype=dtype
    )


def mse(model, step):
    x, y = batch(step, next(model.parameters()).dtype)
    return nn.functional.mse_loss(model(x), y)


def model_optimizers(name, model, tmodel, bridge_kwargs=None, **kwargs):
    kwargs = {**MODEL_KWARGS[name], **kwargs}
    opt = bridge_class(name)(model.parameters(), **kwargs, **(bridge_kwargs or {}))
    topt = torch_class(name)(tmodel.parameters(), foreach=False, **kwargs)
    return opt, topt


def compare_models(opt, model, topt, tmodel, steps):
    assert_matches_torch(opt, list(model.parameters()), topt, list(tmodel.parameters()), steps)


@pytest.mark.parametrize(
    ("name", "fused"),
    [*((n, False) for n in OPTIMIZER_NAMES), *((n, True) for n in FUSED_NAMES)],
    ids=[*OPTIMIZER_NAMES, *(f"{n}-fused" for n in FUSED_NAMES)],
)
def test_grad_scaler(name, fused):
    """Steps with inf/nan gradients are skipped with nothing changed; the rest match torch."""
    model, tmodel = make_models()
    opt, topt = model_optimizers(
        name, model, tmodel, bridge_kwargs={"fused": True} if fused else None
    )
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2) for _ in "ab"]
    bad_steps = {0: math.inf, 5: math.nan, 6: -math.inf}
    for step in range(12):
        for m, o, scaler in ((model, opt, scalers[0]), (tmodel, topt, scalers[1])):
            o.zero_grad()
            scaler.scale(mse(m, step)).backward()
            if step in bad_steps:
                m[2].weight.grad[1, 2] = bad_steps[step]
            before = snapshot(o)
            scaler.step(o)
            scaler.update()
            if step in bad_steps:
                assert_unchanged(o, before)
        assert scalers[0].get_scale() == scalers[1].get_scale()
        compare_models(opt, model, topt, tmodel, step + 1)
    assert scalers[0].get_scale() != 2.0**10


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_clip_grad_norm(name):
    model, tmodel = make_models()
    opt, topt = model_optimizers(name, model, tmodel)
    for step in range(10):
        for m, o in ((model, opt), (tmodel, topt)):
            o.zero_grad()
            (mse(m, step) * 50).backward()
            norm = nn.utils.clip_grad_norm_(m.parameters(), max_norm=0.5)
            assert norm > 0.5  # clipping is active
            o.step()
        compare_models(opt, model, topt, tmodel, step + 1)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_frozen_parameters(name):
    """requires_grad=False parameters (grad stays None) are neither moved nor given state."""
    model, tmodel = make_models()
    for m in (model, tmodel):
        m[0].requires_grad_(False)
    frozen = [p.detach().clone() for p in model[0].parameters()]
    opt, topt = model_optimizers(name, model, tmodel)
    for step in range(6):
        for m, o in ((model, opt), (tmodel, topt)):
            o.zero_grad()
            mse(m, step).backward()
            o.step()
        compare_models(opt, model, topt, tmodel, step + 1)
    for p, p0 in zip(model[0].parameters(), frozen):
        assert torch.equal(p, p0)
        if name != "Adagrad":
            assert p not in opt.state


class TwoHeads(nn.Module):
    """A trunk with two heads; head ``b`` is used on even steps only, so its grads come and go."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(6, 8)
        self.a = nn.Linear(8, 3)
        self.b = nn.Linear(8, 3)

    def forward(self, x, step):
        h = torch.tanh(self.trunk(x))
        return self.a(h) + self.b(h) if step % 2 == 0 else self.a(h)


@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_zero_grad_and_parameters_without_grad_on_some_steps(name, set_to_none):
    with torch.random.fork_rng():
        torch.manual_seed(1)
        model = TwoHeads()
    tmodel = copy.deepcopy(model)
    opt, topt = model_optimizers(name, model, tmodel)
    for step in range(1, 8):  # step 1 first: head b has no grad (or a zero grad) at first
        for m, o in ((model, opt), (tmodel, topt)):
            o.zero_grad(set_to_none=set_to_none)
            x, y = batch(step)
            nn.functional.mse_loss(m(x, step), y).backward()
            o.step()
            if set_to_none and step % 2:
                assert m.b.weight.grad is None
            if not set_to_none and step > 1:
                assert m.b.weight.grad is not None
        compare_models(opt, model, topt, tmodel, step)
    opt.zero_grad(set_to_none=set_to_none)
    for p in model.parameters():
        assert p.grad is None if set_to_none else torch.count_nonzero(p.grad) == 0
    before = snapshot(opt)
    if set_to_none:  # a step without any gradient changes nothing
        opt.step()
        assert_unchanged(opt, before)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_step_with_closure_returns_its_loss(name):
    model, tmodel = make_models()
    opt, topt = model_optimizers(name, model, tmodel)
    for step in range(4):
        returned = {}
        for key, m, o in (("ours", model, opt), ("theirs", tmodel, topt)):
            calls = []

            def closure(m=m, o=o, calls=calls, step=step):
                assert torch.is_grad_enabled()
                o.zero_grad()
                loss = mse(m, step)
                loss.backward()
                calls.append(loss)
                return loss

            result = o.step(closure)
            assert len(calls) == 1 and result is calls[0]
            returned[key] = result.item()
        assert returned["ours"] == pytest.approx(returned["theirs"], rel=1e-5)
        compare_models(opt, model, topt, tmodel, step + 1)
    assert opt.step(lambda: "anything") == "anything"


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_step_hooks_fire(name):
    p = nn.Parameter(torch.linspace(-1, 1, 7))
    opt = bridge_class(name)([p], **MODEL_KWARGS[name])
    events = []

    def pre(o, args, kwargs):
        events.append(("pre", o, p.detach().clone()))

    def post(o, args, kwargs):
        events.append(("post", o, p.detach().clone()))

    global_events = []
    handles = [
        opt.register_step_pre_hook(pre),
        opt.register_step_post_hook(post),
        register_optimizer_step_pre_hook(lambda o, a, k: global_events.append("pre")),
        register_optimizer_step_post_hook(lambda o, a, k: global_events.append("post")),
    ]
    try:
        p.grad = torch.ones(7)
        start = p.detach().clone()
        opt.step()
        assert [e[0] for e in events] == ["pre", "post"]
        assert all(e[1] is opt for e in events)
        assert torch.equal(events[0][2], start)  # pre: before the update
        assert torch.equal(events[1][2], p.detach()) and not torch.equal(events[1][2], start)
        assert global_events == ["pre", "post"]
    finally:
        for h in handles:
            h.remove()
    opt.step()
    assert len(events) == 2 and len(global_events) == 2


def test_step_hooks_as_torch_wraps_them():
    """The bridge's own step wrapper (``_hooks.hooked``) keeps torch's contract: a pre-hook may
    replace the arguments, anything else it returns is refused with torch's message, hooks run
    with autograd as the caller has it and the step without, the caller's mode comes back
    (after an error too), and a subclass that overrides ``step`` is wrapped as torch wraps it."""
    p = nn.Parameter(torch.linspace(-1, 1, 7))
    p.grad = torch.ones(7)
    opt = optirs.torch.Adam([p], lr=0.1)
    seen = []

    def closure():
        seen.append(("closure", torch.is_grad_enabled()))
        return 1.5

    def pre(o, args, kwargs):
        seen.append(("pre", torch.is_grad_enabled()))
        return args, {"closure": closure}

    handle = opt.register_step_pre_hook(pre)
    assert opt.step() == 1.5
    assert seen == [("pre", True), ("closure", True)]
    handle.remove()

    handle = opt.register_step_pre_hook(lambda o, a, k: "not a tuple")
    before = p.detach().clone()
    torch_message = r"must return None or a tuple of \(new_args, new_kwargs\), but got not a tuple"
    with pytest.raises(RuntimeError, match=torch_message):
        opt.step()
    handle.remove()
    assert torch.equal(p.detach(), before)

    def inside(o, args, kwargs):
        seen.append(("post", torch.is_grad_enabled()))

    opt.register_step_post_hook(inside)
    seen.clear()
    with torch.no_grad():
        opt.step()
        assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled() and seen == [("post", False)]

    def fails():
        raise ValueError("from the closure")

    with torch.no_grad(), pytest.raises(ValueError, match="from the closure"):
        opt.step(fails)
    assert torch.is_grad_enabled()
    with pytest.raises(ValueError, match="from the closure"):
        opt.step(fails)
    assert torch.is_grad_enabled()

    # A subclass that overrides step: torch wraps each class's step once, when the class is
    # first instantiated, so with the parent's already wrapped the hooks run twice, in torch
    # as here.
    orders = []
    for base in (torch.optim.Adam, optirs.torch.Adam):
        base([nn.Parameter(torch.ones(3))])

        order: list[str] = []

        class Mine(base):  # type: ignore[misc,valid-type]
            def step(self, closure=None, order=order):
                order.append("mine")
                return super().step(closure)

        q = nn.Parameter(torch.ones(3))
        q.grad = torch.ones(3)
        mine = Mine([q])
        mine.register_step_pre_hook(lambda o, a, k, order=order: order.append("pre"))
        mine.step()
        orders.append(order)
    assert orders == [["pre", "mine", "pre"]] * 2


@pytest.mark.parametrize("flat", [False, True], ids=["tensors", "flat"])
def test_profiler_sees_step_and_zero_grad(flat):
    """torch.profiler shows the ranges torch.optim opens: ``Optimizer.step#Adam.step`` and
    ``Optimizer.zero_grad#Adam.zero_grad``, on the flat path too."""
    params = [nn.Parameter(torch.ones(5)), nn.Parameter(torch.ones(3))]
    if flat:
        optirs.torch.flatten_parameters(params)
    opt = optirs.torch.Adam(params)
    for p in params:
        if flat:  # the gradient views flatten_parameters put there
            p.grad.fill_(1.0)
        else:
            p.grad = torch.ones_like(p)
    opt.step()  # the flat plan is built after a first step
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for p in params:
            p.grad.fill_(0.5)
        opt.step()
        opt.zero_grad()
    names = {e.key for e in prof.key_averages()}
    assert {"Optimizer.step#Adam.step", "Optimizer.zero_grad#Adam.zero_grad"} <= names
    assert (opt.__dict__.get("_optirs_flat_plan") is not None) == flat


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_add_param_group(name, rng):
    pair = TorchPair(name, [{"params": tensors(rng, [(7,), (3, 5)])}], **FULL_STATE_KWARGS[name])
    for step in range(3):
        pair.step(pair.make_grads(rng, step))
    extra = tensors(rng, [(17,), ()])
    pair.opt.add_param_group({"params": [as_parameter(t) for t in extra], "lr": 0.05})
    pair.topt.add_param_group({"params": [as_parameter(t) for t in extra], "lr": 0.05})
    assert len(pair.opt.param_groups) == 2
    for step in range(3, 9):
        pair.step(pair.make_grads(rng, step))
        pair.compare()


def test_adagrad_add_param_group_initial_accumulator_value_is_torchs(rng):
    """torch.optim.Adagrad fills a lazily created ``sum`` with ``defaults``' value.

    (At construction torch also uses the constructor's value for every group.) A group added
    later with its own ``initial_accumulator_value`` must get the same state as with torch.
    """
    pair = TorchPair("Adagrad", [{"params": tensors(rng, [(7,)])}], initial_accumulator_value=0.1)
    pair.step(pair.make_grads(rng, 0))
    extra = tensors(rng, [(5,)])
    group = {"initial_accumulator_value": 0.5, "lr": 0.05}
    pair.opt.add_param_group({"params": [as_parameter(t) for t in extra], **group})
    pair.topt.add_param_group({"params": [as_parameter(t) for t in extra], **group})
    for step in range(1, 4):
        pair.step(pair.make_grads(rng, step))
        pair.compare()


@pytest.mark.parametrize(
    ("name", "flag"),
    [*((n, "foreach") for n in FOREACH_NAMES), *((n, "fused") for n in FUSED_NAMES)],
)
def test_foreach_and_fused_are_accepted_and_stepped_by_optirs(name, flag, rng, monkeypatch):
    calls = []
    core_step = optirs.torch._core.step
    plan_step = optirs.torch._Plan.step

    def counting_step(*args, **kwargs):
        calls.append(args[0])
        return core_step(*args, **kwargs)

    def counting_plan_step(self, opt):
        applied = plan_step(self, opt)
        if applied is not None:
            calls.append("plan")
        return applied

    monkeypatch.setattr(optirs.torch._core, "step", counting_step)
    monkeypatch.setattr(optirs.torch._Plan, "step", counting_plan_step)
    groups = [{"params": tensors(rng, [(7,), (4099,), ()])}]
    pair = run_pair(
        name, groups, steps=6, rng=rng, bridge_kwargs={flag: True}, **FULL_STATE_KWARGS[name]
    )
    assert pair.opt.param_groups[0][flag] is True
    assert len(calls) == 6


def test_rmsprop_has_no_fused_like_torch():
    for cls in (torch.optim.RMSprop, optirs.torch.RMSprop):
        with pytest.raises(TypeError, match="fused"):
            cls([nn.Parameter(torch.zeros(3))], fused=True)


# --------------------------------------------------------------------------------------------
# refusals
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", [n for n in OPTIMIZER_NAMES if "differentiable" in SPECS[n].refused]
)
def test_differentiable_is_refused(name):
    with pytest.raises(ValueError, match="differentiable"):
        bridge_class(name)([nn.Parameter(torch.zeros(3))], differentiable=True)


def test_switches_are_torchs_only():
    """Every optimizer refuses differentiable=True, except Lion, which has no torch switches."""
    for name, spec in SPECS.items():
        switches = {p.name for p in spec.params if p.torch_only}
        assert ("differentiable" in spec.refused) == spec.in_torch, name
        assert set(spec.refused) <= switches, name
    with pytest.raises(TypeError):
        bridge_class("Lion")([nn.Parameter(torch.zeros(3))], differentiable=True)


@pytest.mark.parametrize("name", [n for n in OPTIMIZER_NAMES if "capturable" in SPECS[n].refused])
def test_capturable_is_refused(name):
    with pytest.raises(ValueError, match="capturable"):
        bridge_class(name)([nn.Parameter(torch.zeros(3))], capturable=True)


def stepped_optimizer(name, rng, bad, bad_grad=None):
    """An optimizer whose group 0 is [a, b, bad] (a, b stepped once, full state; ``bad`` had no
    gradient then, ``bad_grad`` now) and whose group 1 holds ``c``, added after that step: no
    state until its first step. Every parameter has a gradient when it is returned."""
    a, b = (as_parameter(t) for t in tensors(rng, [(7,), (4099,)]))
    opt = bridge_class(name)([a, b, bad], **FULL_STATE_KWARGS[name])
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    opt.step()
    c = as_parameter(random_tensor(rng, (17,), F32))
    opt.add_param_group({"params": [c]})
    for p in (a, b, c):
        p.grad = torch.randn_like(p)
    if bad_grad is not None:
        bad.grad = bad_grad
    assert c not in opt.state
    return opt


# Factories of (parameter, the gradient it will get).


def _noncontiguous():
    # every other column: elements with gaps between them, which no flat view can cover
    # (dense layouts such as a transpose are updated: tests/test_torch_layouts_dtypes.py)
    return nn.Parameter(torch.randn(4, 12)[:, ::2]), torch.randn(4, 12)[:, ::2]


def _grad_is_param():
    p = nn.Parameter(torch.randn(9))
    return p, p.detach()


def _grad_overlaps_param():
    base = torch.randn(20)
    return nn.Parameter(base[:10]), base[5:15]


def _typed(dtype):
    def make():
        return nn.Parameter(torch.randn(5).to(dtype)), torch.randn(5).to(dtype)

    return make


def _noncontiguous_grad():
    return nn.Parameter(torch.randn(3, 4)), torch.randn(4, 3).t()


BAD_PARAMS = {
    # id: (factory, exception, regexes)
    "noncontiguous_param": (
        _noncontiguous,
        ValueError,
        ["contiguous", r"param_groups\[0\]\['params'\]\[2\]"],
    ),
    "grad_is_param": (_grad_is_param, ValueError, [r"param_groups\[0\]\['params'\]\[2\]"]),
    "grad_overlaps_param": (
        _grad_overlaps_param,
        ValueError,
        [r"param_groups\[0\]\['params'\]\[2\]"],
    ),
    "complex64": (_typed(torch.complex64), TypeError, ["complex"]),
    "complex128": (_typed(torch.complex128), TypeError, ["complex"]),
    # torch accepts a gradient whose strides differ from the parameter's; optirs refuses it
    # (clearly, with nothing modified) rather than copying it.
    "noncontiguous_grad": (_noncontiguous_grad, ValueError, ["contiguous", "gradient"]),
}


@pytest.mark.parametrize("bad", sorted(BAD_PARAMS))
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_refused_at_step_changes_nothing(name, bad, rng):
    factory, exc, patterns = BAD_PARAMS[bad]
    opt = stepped_optimizer(name, rng, *factory())
    before = snapshot(opt)
    with pytest.raises(exc) as info:
        opt.step()
    for pattern in patterns:
        assert re.search(pattern, str(info.value)), (pattern, str(info.value))
    assert_unchanged(opt, before)


def test_noncontiguous_param_is_named(rng):
    """The message names the parameter's position: param_groups[0]['params'][i]."""
    bad, bad_grad = _noncontiguous()
    params = [as_parameter(t) for t in tensors(rng, [(3,), (5,)])]
    params.insert(1, bad)
    for p in params:
        p.grad = torch.ones_like(p)
    bad.grad = bad_grad
    opt = optirs.torch.SGD(params, lr=0.1, momentum=0.9)
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\].*contiguous"):
        opt.step()
    assert_unchanged(opt, before)


INVALID_HYPERPARAMETERS = [
    ("SGD", "lr", -1, "Invalid learning rate: -1"),
    ("SGD", "momentum", -0.5, "Invalid momentum value: -0.5"),
    ("Adam", "lr", -1, "Invalid learning rate: -1"),
    ("Adam", "eps", -1e-8, "Invalid epsilon value: -1e-08"),
    ("Adam", "betas", (1.0, 0.999), "Invalid beta parameter at index 0: 1.0"),
    ("AdamW", "lr", -1, "Invalid learning rate: -1"),
    ("AdamW", "weight_decay", -0.1, "Invalid weight_decay value: -0.1"),
    ("RMSprop", "lr", -1, "Invalid learning rate: -1"),
    ("RMSprop", "alpha", -0.5, "Invalid alpha value: -0.5"),
    ("Adagrad", "lr", -1, "Invalid learning rate: -1"),
    ("Adagrad", "lr_decay", -0.1, "Invalid lr_decay value: -0.1"),
    ("Adadelta", "lr", -1, "Invalid learning rate: -1"),
    ("Adadelta", "rho", 1.5, "Invalid rho value: 1.5"),
    ("RAdam", "eps", -1e-8, "Invalid epsilon value: -1e-08"),
    ("RAdam", "betas", (0.9, 1.0), "Invalid beta parameter at index 1: 1.0"),  # 2 / (1 - 1.0)
    ("RAdam", "weight_decay", -0.1, "Invalid weight_decay value: -0.1"),
    ("Rprop", "lr", -1, "Invalid learning rate: -1"),
    ("Rprop", "etas", (1.5, 1.2), "Invalid eta values: 1.5, 1.2"),
]


def _torch_twin(opt, **kwargs):
    """torch.optim (for-loop) at the point ``opt`` is at: copies of its parameters and their
    gradients, its param groups and its state (``kwargs``: the constructor's, whose defaults
    torch's Adagrad fills a new state from)."""
    tparams = []
    tgroups = []
    for group in opt.param_groups:
        ps = [as_parameter(p) for p in group["params"]]
        for p, tp in zip(group["params"], ps):
            tp.grad = None if p.grad is None else p.grad.clone()
        tparams += ps
        tgroups.append({"params": ps})
    topt = torch_class(type(opt).__name__)(tgroups, foreach=False, **kwargs)
    topt.load_state_dict(copy.deepcopy(opt.state_dict()))
    return topt, tparams


@pytest.mark.parametrize(
    ("name", "key", "value", "message"),
    INVALID_HYPERPARAMETERS,
    ids=[f"{n}-{k}" for n, k, _, _ in INVALID_HYPERPARAMETERS],
)
def test_hyperparameter_refused_by_torchs_constructor_is_stepped_like_torch(
    name, key, value, message, rng
):
    """torch.optim validates in its constructor only: a value written into param_groups later
    is stepped with as torch's step does, or, where torch's step raises (Adam's
    ``betas[0] = 1.0``: a division by zero), refused with the same exception, nothing changed.
    (The bridge used to refuse all of these at the step with the constructor's message.)"""
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        torch_class(name)([nn.Parameter(torch.zeros(3))], **{key: value})
    opt = stepped_optimizer(name, rng, as_parameter(random_tensor(rng, (5,), F32)))
    opt.param_groups[1][key] = value
    topt, tparams = _torch_twin(opt, **FULL_STATE_KWARGS[name])
    try:
        topt.step()
    except Exception as theirs:
        before = snapshot(opt)
        with pytest.raises(type(theirs)) as ours:
            opt.step()
        assert type(ours.value) is type(theirs)
        assert str(ours.value).startswith(f"{theirs}: "), str(ours.value)
        assert f"param_groups[1]['{key}']" in str(ours.value)
        assert_unchanged(opt, before)
        opt.param_groups[1][key] = copy.deepcopy(opt.param_groups[0][key])
        opt.step()  # put right: steps again
        return
    opt.step()
    assert_matches_torch(opt, all_params(opt), topt, tparams, steps=2)


TORCH_SPARSE_MESSAGES = {
    "Adam": "Adam does not support sparse gradients, please consider SparseAdam instead",
    "AdamW": "Adam does not support sparse gradients, please consider SparseAdam instead",
    "RMSprop": "RMSprop does not support sparse gradients",
    "Adadelta": "Adadelta does not support sparse gradients",
    "RAdam": "RAdam does not support sparse gradients",
    "Rprop": "Rprop does not support sparse gradients",
    "Adamax": "Adamax does not support sparse gradients",
    "NAdam": "NAdam does not support sparse gradients",
    "ASGD": "ASGD does not support sparse gradients",
}


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_sparse_gradient(name, rng):
    """Adam/AdamW/RMSprop/Adamax/NAdam/ASGD: torch's RuntimeError; SGD/Adagrad (sparse in
    torch): TypeError."""
    emb = nn.Embedding(10, 3, sparse=True)
    opt = stepped_optimizer(name, rng, emb.weight)
    emb(torch.tensor([1, 4, 4])).sum().backward()
    assert emb.weight.grad.is_sparse
    before = snapshot(opt)
    if name in TORCH_SPARSE_MESSAGES:
        temb = nn.Embedding(10, 3, sparse=True)
        temb(torch.tensor([1])).sum().backward()
        with pytest.raises(RuntimeError) as tinfo:
            torch_class(name)(temb.parameters()).step()
        assert str(tinfo.value) == TORCH_SPARSE_MESSAGES[name]
        with pytest.raises(RuntimeError) as info:
            opt.step()
        assert str(info.value) == TORCH_SPARSE_MESSAGES[name]
    else:
        with pytest.raises(TypeError, match="sparse"):
            opt.step()
    assert_unchanged(opt, before)


def test_bad_parameter_in_a_later_group_leaves_earlier_groups_alone(rng):
    """Refusal is all-or-nothing across groups: group 0 fine, group 1 has a complex parameter."""
    a = as_parameter(random_tensor(rng, (33,), F32))
    opt = optirs.torch.Adam([a], lr=0.1)
    half, half_grad = _typed(torch.complex64)()
    opt.add_param_group({"params": [half]})
    a.grad, half.grad = torch.ones_like(a), half_grad
    before = snapshot(opt)
    with pytest.raises(TypeError, match=r"param_groups\[1\]\['params'\]\[0\]"):
        opt.step()
    assert_unchanged(opt, before)
    assert a not in opt.state
