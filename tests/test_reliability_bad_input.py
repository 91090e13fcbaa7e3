"""Bad input, second table: what test_bad_input.py, test_state_dict.py and the refusal tables of
test_torch_bridge.py do not cover yet, through both APIs.

- Hyperparameters written into ``param_groups`` between steps, for every numeric option of every
  optimizer and every edge value (NaN, +-inf, negative, -0.0, denormal, out of range). The
  NumPy API applies torch's constructor checks at every step: where torch's constructor
  refuses the value, the next step raises torch's ValueError message and changes nothing, and
  training continues bitwise like a run that never saw the bad value. The bridge, like
  torch.optim, validates only in the constructor: it steps with whatever torch's step takes
  (SGD a NaN learning rate, Adam a negative one, ...), doing what torch.optim's step does, NaN
  and infinities included, and where torch's step raises it raises the same, changing nothing.
  Where torch's constructor accepts a value, the NumPy API steps like torch too.
- State dicts with missing keys, extra keys, wrong shapes, wrong dtypes, None entries and bad
  step counters. The NumPy API checks them in its own ``load_state_dict``; the bridge uses
  torch's, so what matters there is the next step: a clear error with nothing changed (or
  torch's behaviour where torch steps with that state), and training resumed from a good state
  dict continues bitwise like a run that loaded only the good one.
"""

from __future__ import annotations

import copy
import math
import re
import warnings

import numpy as np
import pytest
import torch
from conftest import (
    FULL_STATE_KEYS,
    FULL_STATE_KWARGS,
    OPTIMIZER_NAMES,
    SideBySide,
    assert_bitwise_equal_params,
    assert_bitwise_equal_state,
    assert_snapshot_equal,
    flat_params,
    optirs_class,
    random_array,
    snapshot,
    torch_class,
    well_conditioned,
)
from optirs._spec import SPECS
from test_bad_input import NUMERIC_HYPERPARAMETERS, Setup, assert_continues_like_untouched_twin
from torch_helpers import (
    TorchPair,
    all_params,
    assert_unchanged,
    bridge_class,
    random_tensor,
)
from torch_helpers import snapshot as tsnapshot

NAN, INF = float("nan"), float("inf")
# Every edge value of a real hyperparameter, and two out-of-range ones (betas, alpha and
# momentum are probabilities or factors of about 1; 1e300 overflows anything squared).
EDGE_VALUES = (-1.0, -0.0, NAN, INF, -INF, 1.0, 5e-324, 2.0, 1e300)


def _with_value(name: str, key: str, value: float, base: dict) -> dict:
    """``{key: value}`` as a param-group update; ``betas[i]`` (``etas[i]``) replaces one entry
    of the pair."""
    if key.endswith("]"):
        pair_name, index = key[:-3], int(key[-2])
        pair = list(base.get(pair_name, SPECS[name].defaults[pair_name]))
        pair[index] = value
        return {pair_name: tuple(pair)}
    return {key: value}


def _edge_cases():
    for name, keys in NUMERIC_HYPERPARAMETERS.items():
        for key in keys:
            for value in EDGE_VALUES:
                yield pytest.param(name, key, value, id=f"{name}-{key}={value}")


EDGE_CASES = list(_edge_cases())


def _torch_verdict(name: str, update: dict) -> str | None:
    """torch's constructor message for these values (None: torch accepts them). A float64
    parameter, so that Adagrad's initial_accumulator_value=1e300 fits its ``sum``."""
    kwargs = {**FULL_STATE_KWARGS[name], **update}
    try:
        getattr(torch.optim, name)([torch.zeros(3, dtype=torch.float64)], **kwargs)
    except ValueError as exc:
        return str(exc)
    return None


# Where torch accepts a value, both run these options. RMSprop is not centered there: its
# variance ``square_avg - grad_avg * grad_avg`` is a cancellation that torch computes with one
# fused multiply-add (optirs rounds the product first, by design), so with alpha ~ 0 (exactly
# zero variance) or overflowing values (inf - inf) torch's NaN/inf pattern is FMA rounding, not
# the update rule. Centered RMSprop with sane values is compared in test_parity.py.
ACCEPTED_KWARGS = {
    **FULL_STATE_KWARGS,
    "RMSprop": {"lr": 0.01, "momentum": 0.5, "weight_decay": 0.1},
}


# --------------------------------------------------------------------------------------------
# hyperparameters written into param_groups between steps: NumPy API
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "key", "value"), EDGE_CASES)
def test_numpy_param_group_edge_value(name, key, value):
    """Refused in torch's words with nothing changed, or stepped exactly like torch."""
    if _torch_verdict(name, _with_value(name, key, value, {"betas": (0.9, 0.999)})) is None:
        _numpy_accepted_like_torch(name, key, value)
        return
    s = Setup(name, np.float32)
    grads = s.grads()
    group = s.opt.param_groups[1]
    update = _with_value(name, key, value, group)
    expected = _torch_verdict(name, update)
    saved = {k: group[k] for k in update}
    group.update(update)
    before = snapshot(s.opt)
    with pytest.raises(ValueError) as excinfo:
        s.opt.step(grads)
    assert str(excinfo.value) == expected
    assert_snapshot_equal(before, snapshot(s.opt))
    group.update(saved)
    assert_continues_like_untouched_twin(s, name, np.float32, grads)


def _numpy_accepted_like_torch(name, key, value):
    rng = np.random.default_rng(5)
    groups = [
        {"params": [random_array(rng, (7,), np.float64), random_array(rng, (3, 5), np.float64)]},
        {"params": [random_array(rng, (17,), np.float64)], "lr": 0.02},
    ]
    pair = SideBySide(name, groups, **ACCEPTED_KWARGS[name])
    for step in range(5):
        if step == 2:
            pair.set_hyperparameters(1, **_with_value(name, key, value, pair.opt.param_groups[1]))
        groups_of = [g for g in pair.opt.param_groups for _ in g["params"]]
        with np.errstate(all="ignore"):  # inf * 0 and friends, in torch's run as in ours
            grads = [
                well_conditioned(name, g, p, random_array(rng, p.shape, p.dtype))
                for p, g in zip(pair.params, groups_of)
            ]
            pair.step(grads)
        pair.compare()


# --------------------------------------------------------------------------------------------
# hyperparameters written into param_groups between steps: torch bridge
# --------------------------------------------------------------------------------------------


class BridgeSetup:
    """The bridge counterpart of test_bad_input.Setup: four parameters in two groups (group 1
    with its own lr; the last parameter big enough for the thread pool), stepped
    ``pre_steps`` times (every state buffer created); ``grads()`` draws the next gradients
    from a seeded generator, so two setups with one seed are twins. ``options`` go to the
    constructor (skip_nonfinite, flush_denormals)."""

    SHAPES = ((7,), (3, 5), (17,), (70_001,))

    def __init__(
        self, name: str, dtype=torch.float32, seed: int = 7, pre_steps: int = 2, **options
    ) -> None:
        self.rng = np.random.default_rng(seed)
        self.name = name
        self.params = [
            torch.nn.Parameter(random_tensor(self.rng, s, dtype).clone()) for s in self.SHAPES
        ]
        groups = [{"params": self.params[:2]}, {"params": self.params[2:], "lr": 0.02}]
        self.opt = bridge_class(name)(groups, **FULL_STATE_KWARGS[name], **options)
        for _ in range(pre_steps):
            self.step(self.grads())

    def grads(self) -> list[torch.Tensor]:
        return [random_tensor(self.rng, p.shape, p.dtype) for p in self.params]

    def step(self, grads) -> None:
        for p, g in zip(self.params, grads):
            p.grad = g.clone()
        self.opt.step()


def assert_bridge_bitwise_equal(a: BridgeSetup, b: BridgeSetup) -> None:
    for i, (pa, pb) in enumerate(zip(a.params, b.params)):
        assert torch.equal(_raw(pa), _raw(pb)), f"parameter {i} differs"
        sa, sb = a.opt.state.get(pa, {}), b.opt.state.get(pb, {})
        assert sorted(sa) == sorted(sb), f"state keys of parameter {i} differ"
        for k in sa:
            va, vb = sa[k], sb[k]
            assert va.dtype == vb.dtype and va.shape == vb.shape, (i, k)
            assert torch.equal(_raw(va), _raw(vb)), f"state[{i}][{k!r}] differs"
    ga = [{k: v for k, v in g.items() if k != "params"} for g in a.opt.param_groups]
    gb = [{k: v for k, v in g.items() if k != "params"} for g in b.opt.param_groups]
    assert repr(ga) == repr(gb)


def _raw(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns (NaN-safe equality)."""
    t = t.detach().contiguous().reshape(-1)
    return t.view(torch.uint8) if t.numel() else t


def bridge_continues_like_twin(s: BridgeSetup, next_grads, twin_setup=None) -> None:
    """Three more steps from ``next_grads`` on, bitwise like a twin that never saw the bad
    input (``twin_setup`` prepares the twin the way ``s`` should now be)."""
    twin = BridgeSetup(s.name)
    twin.grads()  # keep the twin's generator in step with ``s`` (which drew ``next_grads``)
    if twin_setup is not None:
        twin_setup(twin)
    grads = next_grads
    for _ in range(3):
        s.step(grads)
        twin.step(grads)
        grads = s.grads()
        twin.grads()
    assert_bridge_bitwise_equal(s, twin)


def _torch_step_raises(s: BridgeSetup, update: dict, grads) -> Exception | None:
    """What torch.optim's (for-loop) step raises, if anything, from where ``s`` is, with
    ``update`` written into group 1 and ``grads`` as the gradients."""
    tparams = [torch.nn.Parameter(p.detach().clone()) for p in s.params]
    tgroups = [{"params": tparams[:2]}, {"params": tparams[2:]}]
    topt = getattr(torch.optim, s.name)(tgroups, foreach=False)
    topt.load_state_dict(copy.deepcopy(s.opt.state_dict()))
    topt.param_groups[1].update(update)
    for tp, g in zip(tparams, grads):
        tp.grad = g.clone()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            topt.step()
    except Exception as e:
        return e
    return None


@pytest.mark.parametrize(("name", "key", "value"), EDGE_CASES)
def test_bridge_param_group_edge_value(name, key, value):
    """torch.optim validates only in its constructor: the bridge steps with any value torch's
    step takes, exactly like torch, and where torch's step raises (a division by zero, a power
    or a scalar out of range, a complex square root) raises the same exception, in torch's
    words first, changing nothing; training then continues bitwise like a run that never saw
    the value. (The bridge used to refuse at the step, with the constructor's ValueError,
    every value the constructor refuses.)"""
    s = BridgeSetup(name)
    grads = s.grads()
    group = s.opt.param_groups[1]
    update = _with_value(name, key, value, group)
    raised = _torch_step_raises(s, update, grads)
    if raised is None:
        _bridge_accepted_like_torch(name, key, value)
        return
    saved = {k: group[k] for k in update}
    group.update(update)
    for p, g in zip(s.params, grads):
        p.grad = g.clone()
    before = tsnapshot(s.opt)
    with pytest.raises(type(raised)) as excinfo:
        s.opt.step()
    assert type(excinfo.value) is type(raised)
    assert str(excinfo.value).startswith(f"{raised}: "), (str(excinfo.value), str(raised))
    assert_unchanged(s.opt, before)
    group.update(saved)
    bridge_continues_like_twin(s, grads)


def _bridge_accepted_like_torch(name, key, value):
    """Set at the third step and stepped with like torch.optim, in float64 (float32 would refuse
    the values beyond its range, as torch does), until torch's step raises (Adam's
    ``betas[0] = -1.0`` divides by 1 - (-1) ** 4 = 0 at the fourth step): then the bridge
    raises the same, changing nothing."""
    rng = np.random.default_rng(5)
    f64 = torch.float64
    groups = [
        {"params": [random_tensor(rng, (7,), f64), random_tensor(rng, (3, 5), f64)]},
        {"params": [random_tensor(rng, (17,), f64)], "lr": 0.02},
    ]
    pair = TorchPair(name, groups, **ACCEPTED_KWARGS[name])
    for step in range(5):
        if step == 2:
            pair.set_hyperparameters(1, **_with_value(name, key, value, pair.opt.param_groups[1]))
        with np.errstate(all="ignore"):
            pair.set_grads(pair.make_grads(rng, step))
        try:
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pair.topt.step()
        except Exception as theirs:
            before = tsnapshot(pair.opt)
            with pytest.raises(type(theirs)) as ours:
                pair.opt.step()
            assert str(ours.value).startswith(f"{theirs}: "), (str(ours.value), str(theirs))
            assert_unchanged(pair.opt, before)
            return
        pair.opt.step()
        pair.steps += 1
        pair.compare()


@pytest.mark.parametrize("api", ["numpy", "torch"])
@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("SGD", "nesterov"),
        ("SGD", "maximize"),
        ("Adam", "amsgrad"),
        ("Adam", "maximize"),
        ("Adam", "decoupled_weight_decay"),
        ("RMSprop", "centered"),
        ("Adagrad", "maximize"),
    ],
)
@pytest.mark.parametrize(
    "value", [1, 0, np.True_, np.False_], ids=["1", "0", "np_true", "np_false"]
)
def test_flag_written_as_non_bool_acts_like_its_truth_value(api, name, key, value):
    """torch reads option flags by truth value (``if maximize:``); so does optirs."""
    kwargs = {**FULL_STATE_KWARGS[name]}
    if name == "SGD":
        kwargs = {"lr": 0.01, "momentum": 0.9}
    rng = np.random.default_rng(3)
    shapes = [(7,), (33,)]
    if api == "numpy":
        init = [random_array(rng, s, np.float64) for s in shapes]
        a = optirs_class(name)([p.copy() for p in init], **kwargs)
        b = optirs_class(name)([p.copy() for p in init], **kwargs)
        for step in range(4):
            grads = [random_array(rng, s, np.float64) for s in shapes]
            if step == 1:
                a.param_groups[0][key] = value
                b.param_groups[0][key] = bool(value)
            a.step([g.copy() for g in grads])
            b.step([g.copy() for g in grads])
        assert_bitwise_equal_params(flat_params(a), flat_params(b))
        assert_bitwise_equal_state(a, b)
        return
    init = [random_tensor(rng, s, torch.float64) for s in shapes]
    groups = [{"params": init}]
    pair = TorchPair(name, groups, **kwargs)
    for step in range(4):
        if step == 1:
            pair.opt.param_groups[0][key] = value
            pair.topt.param_groups[0][key] = value
        pair.step(pair.make_grads(rng, step))
        pair.compare()


# --------------------------------------------------------------------------------------------
# state dicts: NumPy API (its own load_state_dict)
# --------------------------------------------------------------------------------------------


def _np_setup_pair(name):
    """A source optimizer stepped three times and its state dict, plus a target in the middle
    of its own training (Setup, stepped twice)."""
    source = Setup(name, np.float32, seed=11)
    for _ in range(3):
        source.opt.step(source.grads())
    return source.opt.state_dict(), Setup(name, np.float32)


def _sd_extra_state_key(sd, name):
    sd["state"][3]["momentum"] = np.zeros(3, np.float32)
    return sd


def _sd_step(value):
    def corrupt(sd, name):
        sd["state"][3]["step"] = value
        return sd

    return corrupt


def _sd_buffer_dtype(dtype):
    def corrupt(sd, name):
        key = sorted(FULL_STATE_KEYS[name] - {"step"})[0]
        sd["state"][3][key] = np.asarray(sd["state"][3][key]).astype(dtype)
        return sd

    return corrupt


def _sd_state_for_unknown_index(sd, name):
    sd["state"][4] = copy.deepcopy(sd["state"][3])
    return sd


def _sd_group_param_ids_not_a_list(sd, name):
    sd["param_groups"][1]["params"] = 2
    return sd


def _sd_group_value_nan(sd, name):
    sd["param_groups"][1]["lr"] = NAN if name != "SGD" else -1.0
    return sd


def _sd_group_betas_scalar(sd, name):
    if "betas" in sd["param_groups"][1]:
        sd["param_groups"][1]["betas"] = 0.9
    elif "etas" in sd["param_groups"][1]:
        sd["param_groups"][1]["etas"] = 0.9
    else:
        sd["param_groups"][1]["weight_decay"] = "0.1"
    return sd


NUMPY_BAD_DICTS = [
    # (id, corrupt, exception, regex the message must contain, applies to optimizers without a
    # step counter: SGD, Lion)
    ("extra_state_key", _sd_extra_state_key, ValueError, r"unexpected|momentum", True),
    ("step_nan", _sd_step(np.float32(NAN)), ValueError, r"step", False),
    ("step_inf", _sd_step(INF), ValueError, r"step", False),
    ("step_negative", _sd_step(np.float32(-1.0)), ValueError, r"step", False),
    ("step_string", _sd_step("3"), TypeError, r"step", False),
    ("step_none", _sd_step(None), TypeError, r"step", False),
    ("step_complex", _sd_step(np.complex64(3)), TypeError, r"step", False),
    ("buffer_object_array", _sd_buffer_dtype(object), TypeError, r"dtype|float", True),
    ("buffer_float16", _sd_buffer_dtype(np.float16), None, None, True),
    ("buffer_float64", _sd_buffer_dtype(np.float64), None, None, True),
    ("state_for_unknown_index", _sd_state_for_unknown_index, ValueError, r"4", True),
    ("group_params_not_a_list", _sd_group_param_ids_not_a_list, (TypeError, ValueError), "", True),
    ("group_lr_invalid", _sd_group_value_nan, ValueError, r"learning rate", True),
    (
        "group_value_wrong_type",
        _sd_group_betas_scalar,
        TypeError,
        r"betas|weight_decay|etas",
        True,
    ),
]


@pytest.mark.parametrize(
    ("name", "corrupt", "exc", "pattern"),
    [
        pytest.param(name, c, e, pat, id=f"{i}-{name}")
        for i, c, e, pat, stepless in NUMPY_BAD_DICTS
        for name in OPTIMIZER_NAMES
        if stepless or SPECS[name].counts_steps
    ],
)
def test_numpy_load_state_dict_refuses_or_casts(name, corrupt, exc, pattern):
    """Refused (a clear message, nothing changed, training continues like an untouched twin),
    or, for floating buffers of another precision, cast as torch casts them."""
    sd, s = _np_setup_pair(name)
    sd = corrupt(sd, name)
    grads = s.grads()
    if exc is None:
        s.opt.load_state_dict(sd)
        key = sorted(FULL_STATE_KEYS[name] - {"step"})[0]
        loaded = s.opt.state[s.params[3]][key]
        assert loaded.dtype == np.float32 and loaded.flags.c_contiguous
        expected = np.asarray(sd["state"][3][key]).astype(np.float32)
        assert loaded.tobytes() == expected.tobytes()
        return
    before = snapshot(s.opt)
    with pytest.raises(exc) as excinfo:
        s.opt.load_state_dict(sd)
    assert re.search(pattern, str(excinfo.value)), str(excinfo.value)
    assert_snapshot_equal(before, snapshot(s.opt))
    assert_continues_like_untouched_twin(s, name, np.float32, grads)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_numpy_load_keeps_extra_group_keys_like_torch(name):
    """torch keeps unknown param-group keys (a scheduler's ``initial_lr``, user tags)."""
    sd, s = _np_setup_pair(name)
    sd["param_groups"][0]["initial_lr"] = 0.5
    sd["param_groups"][1]["my_tag"] = ["anything"]
    s.opt.load_state_dict(sd)
    assert s.opt.param_groups[0]["initial_lr"] == 0.5
    assert s.opt.param_groups[1]["my_tag"] == ["anything"]
    s.opt.step(s.grads())


# --------------------------------------------------------------------------------------------
# state dicts: torch bridge (torch's load_state_dict, then optirs's step)
# --------------------------------------------------------------------------------------------

# The buffers a parameter with state must have: all but SGD's momentum buffer, which torch's
# SGD makes from the next gradient when it is missing.
REQUIRED_BUFFERS = {
    name: [b.name for b in spec.state if not b.from_grad] for name, spec in SPECS.items()
}


def _bridge_state_dict(name):
    """The state dict of a bridge optimizer that stepped three times from other data."""
    source = BridgeSetup(name, seed=11)
    source.step(source.grads())
    return source.opt.state_dict()


def _load_into(s: BridgeSetup, sd) -> BaseException | None:
    """torch's own load_state_dict; what it raises (torch's behaviour) is returned."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            s.opt.load_state_dict(sd)
    except Exception as e:
        return e
    return None


def _assert_step_refused_then_recovers(s: BridgeSetup, clean_sd, patterns) -> None:
    grads = s.grads()
    for p, g in zip(s.params, grads):
        p.grad = g.clone()
    before = tsnapshot(s.opt)
    with pytest.raises((TypeError, ValueError, KeyError, RuntimeError)) as excinfo:
        s.opt.step()
    message = str(excinfo.value)
    assert "PanicException" not in type(excinfo.value).__name__
    for pattern in patterns:
        assert re.search(pattern, message), (pattern, message)
    assert_unchanged(s.opt, before)
    # Recovery: load a good state dict and continue like a run that only ever loaded that.
    # (torch's load keeps the dict's own tensors where no cast is needed: load copies.)
    assert _load_into(s, copy.deepcopy(clean_sd)) is None
    bridge_continues_like_twin(
        s, grads, lambda twin: twin.opt.load_state_dict(copy.deepcopy(clean_sd))
    )


def _entries(name):
    return [*REQUIRED_BUFFERS[name], *(["step"] if SPECS[name].counts_steps else [])]


# Without its only entry (Lion's exp_avg) a parameter's state is empty: a parameter not
# stepped yet, made afresh by the next step as torch does (test_state_dict's
# test_load_accepts_an_empty_entry), not a state missing something.
BRIDGE_MISSING = [
    pytest.param(name, key, how, id=f"{how}-{name}-{key}")
    for how in ("absent", "none")
    for name in OPTIMIZER_NAMES
    for key in _entries(name)
    if how == "none" or len(_entries(name)) > 1
]


@pytest.mark.parametrize(("name", "key", "how"), BRIDGE_MISSING)
def test_bridge_state_missing_an_entry_is_refused_at_step(name, key, how):
    """A loaded state without one of its entries (or with None there) cannot be stepped: torch
    raises KeyError (or AttributeError on None) at its next step. optirs must refuse it too,
    naming the entry, with nothing changed; it must not make a fresh zero buffer (or a zero
    step count) next to the loaded ones, which would silently restart that statistic."""
    s = BridgeSetup(name)
    sd = _bridge_state_dict(name)
    clean = copy.deepcopy(sd)
    if how == "absent":
        del sd["state"][3][key]
    else:
        sd["state"][3][key] = None
    _load_into(s, sd)  # torch's load: raises KeyError itself for a missing 'step'
    _assert_step_refused_then_recovers(s, clean, [re.escape(key)])


def _bridge_corruptions():
    def buffer_key(name):
        return sorted(FULL_STATE_KEYS[name] - {"step"})[0]

    def set_buffer(make):
        def corrupt(sd, name):
            entry = sd["state"][3]
            entry[buffer_key(name)] = make(entry[buffer_key(name)])
            return sd

        return corrupt

    refused = [
        ("buffer_longer", set_buffer(lambda v: torch.zeros(v.numel() + 1)), [r"shape"]),
        ("buffer_extra_axis", set_buffer(lambda v: v.reshape(*v.shape, 1).clone()), [r"shape"]),
        ("buffer_0d", set_buffer(lambda v: torch.zeros(())), [r"shape"]),
        ("buffer_list", set_buffer(lambda v: v.tolist()), [r"Tensor|tensor"]),
        (
            "buffer_strided",
            set_buffer(lambda v: torch.zeros(v.numel() * 2)[::2].reshape(v.shape)),
            [r"contiguous|strides"],
        ),
    ]
    for i, corrupt, patterns in refused:
        for name in OPTIMIZER_NAMES:
            yield pytest.param(name, corrupt, patterns, id=f"{i}-{name}")
    for name in ("Adam", "AdamW", "RMSprop", "Adagrad"):
        corrupt = _sd_step(torch.tensor([2.0, 2.0]))
        yield pytest.param(name, corrupt, [r"step"], id=f"step_vector-{name}")
    # Counts at which torch's own step raises: Adam's bias correction 1 - beta1**step is 0 at
    # step 0 (ZeroDivisionError) and negative before (complex sqrt, RuntimeError); Adagrad's
    # 1 + (step - 1) * lr_decay is 0 at step -99 with lr_decay 0.01 (ZeroDivisionError). Those
    # must not turn into NaN parameters.
    for name in ("Adam", "AdamW"):
        for value in (-1.0, -5.0):
            corrupt = _sd_step(torch.tensor(value))
            yield pytest.param(name, corrupt, [r"step"], id=f"step={value}-{name}")
    corrupt = _sd_step(torch.tensor(-100.0))
    yield pytest.param("Adagrad", corrupt, [r"step"], id="step=-100-Adagrad")
    # Counts torch steps with, producing garbage or nothing meaningful (RMSprop ignores the
    # count; Adagrad's decay stays positive; inf gives bias corrections of exactly 1, NaN turns
    # every parameter into NaN). A count that is not finite and >= 0 can only come from a
    # corrupted state dict: optirs refuses it, naming it, rather than follow torch there.
    for name in ("Adam", "AdamW", "RMSprop", "Adagrad"):
        for label, value in (("inf", INF), ("nan", NAN), ("-1", -1.0), ("-5", -5.0)):
            if name in ("Adam", "AdamW") and label in ("-1", "-5"):
                continue  # above
            corrupt = _sd_step(torch.tensor(value))
            yield pytest.param(name, corrupt, [r"step"], id=f"step={label}-{name}")


@pytest.mark.parametrize(("name", "corrupt", "patterns"), list(_bridge_corruptions()))
def test_bridge_loaded_state_that_cannot_be_stepped(name, corrupt, patterns):
    """torch's load takes these; optirs's next step refuses them clearly, changing nothing.

    (torch itself fails later, half-way through its step: a buffer of the wrong shape fails in
    ``lerp_`` after ``step`` was incremented; a step of -1 gives bias correction 0 and a
    ZeroDivisionError, one of -5 a negative one and a math domain error.)
    """
    s = BridgeSetup(name)
    sd = _bridge_state_dict(name)
    clean = copy.deepcopy(sd)
    assert _load_into(s, corrupt(sd, name)) is None
    _assert_step_refused_then_recovers(s, clean, patterns)


def _bridge_accepted_corruptions():
    def extra_key(sd, name):
        sd["state"][3]["not_a_buffer"] = torch.ones(3)
        # A number, not a string: torch's load_state_dict rebuilds iterables, and turns a str
        # into str(generator) ("<generator object ...>"), which differs from run to run.
        sd["state"][3]["note"] = 7
        return sd

    def buffer_as(dtype):
        def corrupt(sd, name):
            key = sorted(FULL_STATE_KEYS[name] - {"step"})[0]
            sd["state"][3][key] = sd["state"][3][key].to(dtype)
            return sd

        return corrupt

    def step_as(value):
        def corrupt(sd, name):
            if "step" in sd["state"][3]:
                sd["state"][3]["step"] = value(sd["state"][3]["step"])
            return sd

        return corrupt

    cases = [
        ("extra_keys", extra_key),
        ("buffer_float64", buffer_as(torch.float64)),
        ("buffer_int64", buffer_as(torch.int64)),
        ("buffer_float16", buffer_as(torch.float16)),
        ("step_float64", step_as(lambda s: s.to(torch.float64))),
        ("step_python_float", step_as(float)),
        ("step_zero", step_as(lambda s: torch.tensor(0.0))),
        ("step_half", step_as(lambda s: torch.tensor(0.5))),
    ]
    for i, corrupt in cases:
        for name in OPTIMIZER_NAMES:
            if not SPECS[name].counts_steps and i.startswith("step"):
                continue
            yield pytest.param(name, corrupt, id=f"{i}-{name}")


@pytest.mark.parametrize(("name", "corrupt"), list(_bridge_accepted_corruptions()))
def test_bridge_loaded_state_torch_steps_with(name, corrupt):
    """State torch's load and step both take (extra entries kept, buffers cast to the
    parameter's dtype, step counters of any float dtype, counts of 0 and 0.5): optirs.torch
    steps exactly like torch.optim loaded with the same dict. (Non-finite and negative counts,
    which torch also steps with, are refused: see _bridge_corruptions.)"""
    sd = corrupt(_bridge_state_dict(name), name)
    s = BridgeSetup(name)
    ref = BridgeSetup(name)
    tparams = [torch.nn.Parameter(p.detach().clone()) for p in ref.params]
    tgroups = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": tparams[i * 2 : i * 2 + 2]}
        for i, g in enumerate(ref.opt.param_groups)
    ]
    topt = torch_class(name)(tgroups)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s.opt.load_state_dict(copy.deepcopy(sd))
        topt.load_state_dict(copy.deepcopy(sd))
    for step in range(3):
        grads = s.grads()
        for p, tp, g in zip(s.params, tparams, grads):
            p.grad, tp.grad = g.clone(), g.clone()
        with np.errstate(all="ignore"):
            s.opt.step()
            topt.step()
        for i, (p, tp) in enumerate(zip(s.params, tparams)):
            np.testing.assert_allclose(
                p.detach().numpy(),
                tp.detach().numpy(),
                rtol=5e-6,
                atol=1e-5,
                equal_nan=True,
                err_msg=f"step {step}, param {i}",
            )
            st, tst = s.opt.state[p], topt.state[tp]
            assert sorted(st) == sorted(tst)
            for k, tv in tst.items():
                v = st[k]
                if not isinstance(tv, torch.Tensor):
                    assert v == tv
                    continue
                assert v.dtype == tv.dtype and v.shape == tv.shape, (i, k)
                np.testing.assert_allclose(
                    v.double().numpy(), tv.double().numpy(), rtol=5e-6, atol=1e-5, equal_nan=True
                )


def test_bridge_state_of_a_parameter_without_grad_is_not_looked_at():
    """A broken entry is only an error once its parameter is stepped: torch's rule too."""
    s = BridgeSetup("Adam")
    sd = _bridge_state_dict("Adam")
    sd["state"][3]["exp_avg"] = torch.zeros(5)
    s.opt.load_state_dict(sd)
    grads = s.grads()
    for p, g in zip(s.params, grads):
        p.grad = g.clone()
    s.params[3].grad = None
    s.opt.step()
    assert float(s.opt.state[s.params[0]]["step"]) == 4.0
    assert float(s.opt.state[s.params[3]]["step"]) == 3.0
    assert math.isfinite(float(all_params(s.opt)[0].detach().sum()))


@pytest.mark.parametrize("value", [1, 7.0, "3", None], ids=["int", "float", "str", "none"])
def test_bridge_sgd_steps_past_a_stray_step_entry_like_torch(value):
    """torch.optim.SGD keeps no step and ignores one left in a state (from another optimizer's
    or an old state dict); optirs.torch.SGD must too, not update the parameter and then fail."""
    sd = _bridge_state_dict("SGD")
    sd["state"][3]["step"] = value
    s = BridgeSetup("SGD")
    ref = BridgeSetup("SGD")
    s.opt.load_state_dict(copy.deepcopy(sd))
    ref.opt.load_state_dict(copy.deepcopy(sd))
    del ref.opt.state[ref.params[3]]["step"]
    for _ in range(2):
        grads = s.grads()
        ref.grads()
        s.step(grads)
        ref.step(grads)
    for a, b in zip(s.params, ref.params):
        assert torch.equal(_raw(a), _raw(b))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", ["Adam", "AdamW", "RMSprop", "Adagrad"])
def test_bridge_step_counter_that_is_not_a_tensor_is_refused(name, dtype):
    """A 0-d NumPy array as ``state['step']``: torch.optim raises ("state_steps argument must
    contain a list of singleton tensors") before changing anything; optirs.torch must refuse
    it too, before the update, not apply the update and then fail in increment_version."""
    s = BridgeSetup(name)
    s.opt.state[s.params[3]]["step"] = np.array(2.0, dtype)
    grads = s.grads()
    for p, g in zip(s.params, grads):
        p.grad = g.clone()
    before = tsnapshot(s.opt)
    with pytest.raises((TypeError, ValueError, RuntimeError)):
        s.opt.step()
    assert_unchanged(s.opt, before)


HUGE = 10**400  # a Python int beyond float range


@pytest.mark.parametrize("api", ["numpy", "torch"])
@pytest.mark.parametrize(
    ("name", "key"), [("SGD", "lr"), ("Adam", "eps"), ("RMSprop", "alpha"), ("Adagrad", "lr")]
)
def test_huge_int_hyperparameter(api, name, key):
    """An int beyond float range written into param_groups: an ordinary TypeError/ValueError
    naming the hyperparameter (float() alone raises OverflowError, "int too large to convert
    to float", which names nothing), with nothing changed. torch's constructor takes the
    value (0.0 <= 10**400) and its step then fails on the conversion."""
    s = Setup(name, np.float32) if api == "numpy" else BridgeSetup(name)
    grads = s.grads()
    s.opt.param_groups[1][key] = HUGE
    if api == "numpy":
        before = snapshot(s.opt)
        with pytest.raises((TypeError, ValueError), match=key):
            s.opt.step(grads)
        assert_snapshot_equal(before, snapshot(s.opt))
        return
    for p, g in zip(s.params, grads):
        p.grad = g.clone()
    before = tsnapshot(s.opt)
    with pytest.raises((TypeError, ValueError), match=key):
        s.opt.step()
    assert_unchanged(s.opt, before)


@pytest.mark.parametrize(("name", "key"), [("SGD", "lr"), ("Adam", "eps"), ("Adagrad", "lr")])
def test_huge_int_hyperparameter_at_construction(name, key):
    with pytest.raises((TypeError, ValueError), match=key):
        optirs_class(name)([np.zeros(3, np.float32)], **{key: HUGE})


# --------------------------------------------------------------------------------------------
# Adafactor (its own entry point, outside the rule table): edge values written into
# param_groups between steps, through both APIs
# --------------------------------------------------------------------------------------------

ADAFACTOR_KEYS = ("lr", "beta2_decay", "eps[0]", "eps[1]", "d", "weight_decay")
ADAFACTOR_SHAPES = ((7,), (3, 5), (17,), (2, 3, 4))


def _adafactor_update(key: str, value: float) -> dict:
    if key.startswith("eps"):
        eps: list = [None, 1e-3]
        eps[int(key[-2])] = value
        return {"eps": tuple(eps)}
    return {key: value}


def _adafactor_verdict(update: dict) -> str | None:
    try:
        torch.optim.Adafactor([torch.zeros(3)], **update)
    except ValueError as exc:
        return str(exc)
    return None


def _adafactor_grads(rng, dtype):
    return [random_array(rng, s, dtype) for s in ADAFACTOR_SHAPES]


@pytest.mark.parametrize("value", EDGE_VALUES, ids=str)
@pytest.mark.parametrize("key", ADAFACTOR_KEYS)
def test_adafactor_numpy_param_group_edge_value(key, value):
    """Refused in torch's words with nothing changed (training then continues bitwise like an
    untouched twin), or stepped like torch.optim.Adafactor."""
    import optirs

    update = _adafactor_update(key, value)
    verdict = _adafactor_verdict(update)

    def setup():
        rng = np.random.default_rng(3)
        params = [random_array(rng, s, np.float64) for s in ADAFACTOR_SHAPES]
        opt = optirs.Adafactor(
            [{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.1}]
        )
        for _ in range(2):
            opt.step(_adafactor_grads(rng, np.float64))
        return rng, params, opt

    rng, params, opt = setup()
    theirs = [torch.from_numpy(p.copy()).requires_grad_() for p in params]
    ref = torch.optim.Adafactor(
        [{"params": theirs[:2]}, {"params": theirs[2:], "weight_decay": 0.1}]
    )
    ref.load_state_dict(
        {
            "state": {
                i: {k: torch.from_numpy(np.array(v)) for k, v in e.items()}
                for i, e in opt.state_dict()["state"].items()
            },
            "param_groups": opt.state_dict()["param_groups"],
        }
    )
    opt.param_groups[1].update(update)
    grads = _adafactor_grads(rng, np.float64)
    if verdict is not None:
        before = snapshot(opt)
        with pytest.raises(ValueError) as excinfo:
            opt.step(grads)
        assert str(excinfo.value) == verdict
        assert_snapshot_equal(before, snapshot(opt))
        _, twin_params, twin = setup()
        opt.param_groups[1] = {**twin.param_groups[1], "params": params[2:]}
        for _ in range(2):
            opt.step([g.copy() for g in grads])
            twin.step([g.copy() for g in grads])
        assert_bitwise_equal_params(params, twin_params)
        return
    ref.param_groups[1].update(update)
    for _ in range(3):
        for p, g in zip(theirs, grads):
            p.grad = torch.from_numpy(g.copy())
        with np.errstate(all="ignore"):
            try:
                ref.step()
            except (ZeroDivisionError, OverflowError, RuntimeError) as exc:
                # Where torch's step raises, optirs raises the same, changing nothing.
                before = snapshot(opt)
                with pytest.raises(type(exc)):
                    opt.step(grads)
                assert_snapshot_equal(before, snapshot(opt))
                return
            opt.step(grads)
        for p, q in zip(theirs, params):
            np.testing.assert_allclose(q, p.detach().numpy(), rtol=1e-7, atol=1e-7, equal_nan=True)
        grads = _adafactor_grads(rng, np.float64)


@pytest.mark.parametrize("value", EDGE_VALUES, ids=str)
@pytest.mark.parametrize("key", ADAFACTOR_KEYS)
def test_adafactor_bridge_param_group_edge_value(key, value):
    """The bridge validates in the constructor only, as torch.optim: it steps with what is set
    later as torch's step does (float32 here: where torch's float32 ops refuse a scalar, or its
    Python arithmetic divides by zero or overflows, optirs raises the same before changing
    anything)."""
    import optirs.torch

    rng = np.random.default_rng(4)
    start = [random_tensor(rng, s, torch.float32) for s in ADAFACTOR_SHAPES]
    ours = [p.clone().requires_grad_() for p in start]
    theirs = [p.clone().requires_grad_() for p in start]
    opt = optirs.torch.Adafactor([{"params": ours[:2]}, {"params": ours[2:], "lr": 0.05}])
    ref = torch.optim.Adafactor([{"params": theirs[:2]}, {"params": theirs[2:], "lr": 0.05}])
    update = _adafactor_update(key, value)
    for step in range(4):
        if step == 2:
            opt.param_groups[1].update(update)
            ref.param_groups[1].update(update)
        for p, q in zip(ours, theirs):
            g = random_tensor(rng, p.shape, torch.float32)
            p.grad, q.grad = g.clone(), g.clone()
        try:
            ref.step()
        except (ZeroDivisionError, OverflowError, RuntimeError) as exc:
            before = [p.detach().clone() for p in ours]
            state = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in ours}
            with pytest.raises(type(exc)):
                opt.step()
            for p, b in zip(ours, before):
                assert torch.equal(p.detach(), b) or (p.isnan() == b.isnan()).all()
            for p in ours:
                for k, v in state[id(p)].items():
                    assert torch.equal(opt.state[p][k].nan_to_num(), v.nan_to_num()), k
            return
        opt.step()
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, equal_nan=True)
