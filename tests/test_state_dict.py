"""state_dict() / load_state_dict() / add_param_group()."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import (
    BUFFER_KEYS,
    DTYPE_IDS,
    FLOAT_DTYPES,
    FULL_STATE_KEYS,
    FULL_STATE_KWARGS,
    HYPERPARAMETERS,
    OPTIMIZER_NAMES,
    SCALAR_KEYS,
    TORCH_ONLY_GROUP_KEYS,
    SideBySide,
    assert_bitwise_equal_params,
    assert_bitwise_equal_state,
    assert_matches_torch,
    assert_snapshot_equal,
    default_grad,
    flat_params,
    optirs_class,
    random_array,
    snapshot,
    torch_class,
)

SHAPES = [[(7,), (3, 5)], [(), (33,)]]


def make_groups(dtype, seed=1, lr=0.05):
    rng = np.random.default_rng(seed)
    return [
        {"params": [random_array(rng, s, dtype) for s in SHAPES[0]]},
        {"params": [random_array(rng, s, dtype) for s in SHAPES[1]], "lr": lr},
    ]


def copy_groups(groups):
    return [{**g, "params": [p.copy() for p in g["params"]]} for g in groups]


def grads_for(rng, step, params):
    return [default_grad(rng, step, i, p) for i, p in enumerate(params)]


CONFIGS = [
    *((name, "full", FULL_STATE_KWARGS[name]) for name in OPTIMIZER_NAMES),
    *((name, "default", {}) for name in OPTIMIZER_NAMES),
]
CONFIG_IDS = [f"{n}-{c}" for n, c, _ in CONFIGS]


# --------------------------------------------------------------------------------------------
# round trip
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("name", "cid", "kwargs"), CONFIGS, ids=CONFIG_IDS)
def test_round_trip_is_bitwise(name, cid, kwargs, dtype):
    rng = np.random.default_rng(2)
    groups = make_groups(dtype)
    run = optirs_class(name)(copy_groups(groups), **kwargs)
    params = flat_params(run)
    for step in range(4):
        grads = grads_for(rng, step, params)
        grads[1] = None if step == 0 else grads[1]  # one parameter misses the first step
        run.step(grads)
    saved = run.state_dict()

    # A fresh optimizer with other hyperparameters, on a checkpoint of the current weights.
    fresh_groups = copy_groups([{**g, "lr": 0.9} for g in run.param_groups])
    resumed = optirs_class(name)(fresh_groups, **{**kwargs, "lr": 0.7})
    resumed.load_state_dict(saved)
    assert [g["lr"] for g in resumed.param_groups] == [g["lr"] for g in run.param_groups]
    # Loading casts 0-d state values (NAdam's mu_product) to the parameters' dtype, as torch
    # does, which changes how they round from then on: the uninterrupted run takes the same
    # cast, as torch.optim's own run resumed from this checkpoint would.
    for p in params:
        for key in SCALAR_KEYS[name] & set(run.state.get(p, {})):
            run.state[p][key] = run.state[p][key].astype(p.dtype)
    assert_bitwise_equal_state(run, resumed)

    for step in range(4, 10):
        grads = grads_for(rng, step, params)
        run.step(grads)
        resumed.step([g.copy() for g in grads])
    assert_bitwise_equal_params(flat_params(run), flat_params(resumed))
    assert_bitwise_equal_state(run, resumed)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_load_own_state_dict_changes_nothing(name):
    rng = np.random.default_rng(3)
    opt = optirs_class(name)(make_groups(np.float32), **FULL_STATE_KWARGS[name])
    opt.step(grads_for(rng, 0, flat_params(opt)))
    before = snapshot(opt)
    opt.load_state_dict(opt.state_dict())
    assert_snapshot_equal(before, snapshot(opt))


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_params_keep_their_identity_after_load(name):
    groups = make_groups(np.float64)
    originals = [p for g in groups for p in g["params"]]
    opt = optirs_class(name)(groups, **FULL_STATE_KWARGS[name])
    other = optirs_class(name)(make_groups(np.float64, seed=9), **FULL_STATE_KWARGS[name])
    other.step(grads_for(np.random.default_rng(0), 0, flat_params(other)))
    opt.load_state_dict(other.state_dict())
    assert all(a is b for a, b in zip(flat_params(opt), originals))


# --------------------------------------------------------------------------------------------
# copies
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_state_dict_values_are_copies(name):
    rng = np.random.default_rng(4)
    opt = optirs_class(name)(make_groups(np.float32), **FULL_STATE_KWARGS[name])
    twin = optirs_class(name)(make_groups(np.float32), **FULL_STATE_KWARGS[name])
    for step in range(2):
        grads = grads_for(rng, step, flat_params(opt))
        opt.step(grads)
        twin.step([g.copy() for g in grads])
    before = snapshot(opt)

    sd = opt.state_dict()
    for entry in sd["state"].values():
        for value in entry.values():
            value[...] = 123.0
    for group in sd["param_groups"]:
        group["lr"] = 77.0
        group["params"].append(99)
    sd["param_groups"].append({"params": []})
    sd["state"][42] = {}

    assert_snapshot_equal(before, snapshot(opt))
    grads = grads_for(rng, 2, flat_params(opt))
    opt.step(grads)
    twin.step([g.copy() for g in grads])
    assert_bitwise_equal_params(flat_params(opt), flat_params(twin))
    assert_bitwise_equal_state(opt, twin)


# --------------------------------------------------------------------------------------------
# layout
# --------------------------------------------------------------------------------------------


def torch_comparable_group_keys(name, torch_group):
    keys = set(torch_group) - TORCH_ONLY_GROUP_KEYS
    if name == "AdamW":
        keys.discard("decoupled_weight_decay")  # not an AdamW constructor argument
    return keys


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("name", "cid", "kwargs"), CONFIGS, ids=CONFIG_IDS)
def test_layout_matches_torch(name, cid, kwargs, dtype):
    rng = np.random.default_rng(5)
    pair = SideBySide(name, make_groups(dtype), **kwargs)
    for step in range(3):
        grads = grads_for(rng, step, pair.params)
        grads[2] = None  # never stepped: no state (Adagrad: state from construction)
        pair.step(grads)
    sd, tsd = pair.opt.state_dict(), pair.topt.state_dict()

    assert set(sd) == {"state", "param_groups"}
    assert sorted(sd["state"]) == sorted(tsd["state"])
    assert all(type(k) is int for k in sd["state"])
    for index, entry in sd["state"].items():
        tentry = {k: v for k, v in tsd["state"][index].items() if v is not None}
        assert sorted(entry) == sorted(tentry)
        param = pair.params[index]
        for key, value in entry.items():
            assert isinstance(value, np.ndarray)
            if key == "step" or key in SCALAR_KEYS[name]:
                assert value.shape == () and value.dtype == np.float32
                assert value.tobytes() == tentry[key].numpy().tobytes(), key
            else:
                assert value.shape == param.shape and value.dtype == param.dtype
                assert value is not pair.opt.state[param][key]
                assert not np.shares_memory(value, pair.opt.state[param][key])

    assert len(sd["param_groups"]) == len(tsd["param_groups"]) == 2
    for group, tgroup in zip(sd["param_groups"], tsd["param_groups"]):
        assert set(HYPERPARAMETERS[name]) <= set(group)
        assert torch_comparable_group_keys(name, tgroup) <= set(group)
        assert group["params"] == tgroup["params"]
        for key in torch_comparable_group_keys(name, tgroup) - {"params"}:
            expected = tgroup[key]
            actual = tuple(group[key]) if key == "betas" else group[key]
            assert actual == expected, key
    assert [g["params"] for g in sd["param_groups"]] == [[0, 1], [2, 3]]


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_state_dict_of_fresh_optimizer(name):
    opt = optirs_class(name)(make_groups(np.float32), **FULL_STATE_KWARGS[name])
    sd = opt.state_dict()
    if name == "Adagrad":
        assert sorted(sd["state"]) == [0, 1, 2, 3]
        for index, entry in sd["state"].items():
            assert float(entry["step"]) == 0.0
            value = FULL_STATE_KWARGS[name]["initial_accumulator_value"]
            np.testing.assert_array_equal(
                entry["sum"], np.full(flat_params(opt)[index].shape, value, np.float32)
            )
    else:
        assert sd["state"] == {}


def test_sgd_without_momentum_keeps_no_state():
    opt = optirs_class("SGD")(make_groups(np.float32), lr=0.1)
    opt.step(grads_for(np.random.default_rng(0), 0, flat_params(opt)))
    assert len(opt.state) == 0
    assert opt.state_dict()["state"] == {}


# --------------------------------------------------------------------------------------------
# interoperability with torch's state_dict
# --------------------------------------------------------------------------------------------


def to_torch_state_dict(sd):
    return {
        "state": {
            i: {k: torch.from_numpy(np.array(v, copy=True)) for k, v in entry.items()}
            for i, entry in sd["state"].items()
        },
        "param_groups": [dict(g, params=list(g["params"])) for g in sd["param_groups"]],
    }


def to_numpy_state_dict(tsd, group_keys):
    return {
        "state": {
            i: {k: v.numpy().copy() for k, v in entry.items() if v is not None}
            for i, entry in tsd["state"].items()
        },
        "param_groups": [
            {k: v for k, v in g.items() if k in group_keys or k == "params"}
            for g in tsd["param_groups"]
        ],
    }


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("name", "cid", "kwargs"), CONFIGS, ids=CONFIG_IDS)
def test_state_dict_interchange_with_torch(name, cid, kwargs, dtype):
    """optirs's state_dict loads into torch and torch's into optirs; both continue alike."""
    rng = np.random.default_rng(6)
    pair = SideBySide(name, make_groups(dtype), **kwargs)
    for step in range(3):
        pair.step(grads_for(rng, step, pair.params))
    group_keys = set(pair.opt.param_groups[0]) - {"params"}
    optirs_sd = pair.opt.state_dict()
    torch_sd = pair.topt.state_dict()

    # Swap: torch continues from optirs's state, optirs from torch's.
    pair.topt.load_state_dict(to_torch_state_dict(optirs_sd))
    pair.opt.load_state_dict(to_numpy_state_dict(torch_sd, group_keys))
    pair.compare()
    for step in range(3, 6):
        pair.step(grads_for(rng, step, pair.params))
    assert_matches_torch(pair.opt, pair.params, pair.topt, pair.tparams, pair.steps)


# --------------------------------------------------------------------------------------------
# dtype casting on load
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("param_dtype", "saved_dtype"),
    [(np.float32, np.float64), (np.float64, np.float32)],
    ids=["f64_into_f32", "f32_into_f64"],
)
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_load_casts_floating_state_to_param_dtype(name, param_dtype, saved_dtype):
    rng = np.random.default_rng(8)
    source = optirs_class(name)(make_groups(saved_dtype), **FULL_STATE_KWARGS[name])
    for step in range(2):
        source.step(grads_for(rng, step, flat_params(source)))
    sd = source.state_dict()

    target = optirs_class(name)(make_groups(param_dtype), **FULL_STATE_KWARGS[name])
    target.load_state_dict(sd)
    for index, p in enumerate(flat_params(target)):
        state = target.state[p]
        assert sorted(state) == sorted(FULL_STATE_KEYS[name])
        for key, value in state.items():
            if key == "step":
                assert value.dtype == np.float32 and float(value) == 2.0
                continue
            if key in SCALAR_KEYS[name]:
                # 0-d, cast to the parameter's dtype as torch casts it
                assert value.shape == () and value.dtype == param_dtype
                assert value == sd["state"][index][key].astype(param_dtype)
                continue
            assert value.dtype == param_dtype and value.shape == p.shape
            np.testing.assert_array_equal(value, sd["state"][index][key].astype(param_dtype))
    target.step(grads_for(rng, 2, flat_params(target)))


# --------------------------------------------------------------------------------------------
# refusing dicts that do not fit
# --------------------------------------------------------------------------------------------


def _drop_group(sd):
    sd["param_groups"].pop()
    return sd


def _extra_group(sd):
    sd["param_groups"].append({**sd["param_groups"][0], "params": [4]})
    return sd


def _resize_groups(sd):
    # same total number of parameters, split 3 + 1 instead of 2 + 2
    sd["param_groups"][0]["params"] = [0, 1, 2]
    sd["param_groups"][1]["params"] = [3]
    return sd


def _drop_state_key(key):
    def corrupt(sd, name):
        keys = FULL_STATE_KEYS[name] if key != "buffer" else BUFFER_KEYS[name]
        del sd["state"][3][sorted(keys)[-1] if key == "buffer" else key]
        return sd

    return corrupt


def _drop_hyperparameter(sd, name):
    del sd["param_groups"][1]["lr"]
    return sd


def _wrong_shape(sd, name):
    entry = sd["state"][3]
    key = sorted(BUFFER_KEYS[name])[0]
    entry[key] = np.zeros(entry[key].size + 2, entry[key].dtype)
    return sd


def _step_not_scalar(sd, name):
    sd["state"][3]["step"] = np.zeros(3, np.float32)
    return sd


def _no_state(sd, name):
    del sd["state"]
    return sd


def _no_param_groups(sd, name):
    del sd["param_groups"]
    return sd


BAD_DICTS = [
    ("fewer_groups", lambda sd, name: _drop_group(sd)),
    ("more_groups", lambda sd, name: _extra_group(sd)),
    ("group_sizes_differ", lambda sd, name: _resize_groups(sd)),
    ("missing_buffer", _drop_state_key("buffer")),
    ("missing_step", _drop_state_key("step")),
    ("missing_hyperparameter", _drop_hyperparameter),
    ("buffer_wrong_shape", _wrong_shape),
    ("step_not_scalar", _step_not_scalar),
    ("no_state", _no_state),
    ("no_param_groups", _no_param_groups),
]


def _applies(corruption: str, name: str) -> bool:
    """SGD keeps no step, and torch's SGD makes a missing momentum_buffer from the next gradient
    (tested as accepted in test_load_accepts_sgd_without_momentum_buffer). Lion keeps no step
    either, and without its one buffer a parameter's entry is empty: a parameter not stepped
    yet, whose state the next step makes, as torch does (test_load_accepts_an_empty_entry)."""
    if name == "SGD":
        return corruption not in {"missing_buffer", "missing_step", "step_not_scalar"}
    if name == "Lion":
        return corruption not in {"missing_buffer", "missing_step", "step_not_scalar"}
    return True


@pytest.mark.parametrize("api", ["numpy", "torch"])
def test_load_accepts_an_empty_entry(api):
    """Lion's state without its buffer is an empty entry: the parameter starts afresh, in
    optirs as in torch (whose optimizers make state where an entry is empty)."""
    import optirs.torch

    rng = np.random.default_rng(3)
    values = [rng.standard_normal(5).astype(np.float32) for _ in range(2)]
    if api == "numpy":
        params = [v.copy() for v in values]
        opt = optirs.Lion(params, lr=0.1)
        opt.step([np.ones(5, np.float32)] * 2)
        sd = opt.state_dict()
        del sd["state"][1]["exp_avg"]
        fresh_params = [v.copy() for v in values]
        fresh = optirs.Lion(fresh_params, lr=0.1)
        fresh.load_state_dict(sd)
        fresh.step([np.ones(5, np.float32)] * 2)
        np.testing.assert_array_equal(
            fresh.state[fresh_params[1]]["exp_avg"], np.full(5, 1 - 0.99, np.float32)
        )
    else:
        tparams = [torch.nn.Parameter(torch.from_numpy(v.copy())) for v in values]
        opt = optirs.torch.Lion(tparams, lr=0.1)
        for p in tparams:
            p.grad = torch.ones(5)
        opt.step()
        sd = opt.state_dict()
        del sd["state"][1]["exp_avg"]
        opt.load_state_dict(sd)
        opt.step()
        torch.testing.assert_close(
            opt.state[tparams[1]]["exp_avg"], torch.full((5,), 1 - 0.99), rtol=0, atol=0
        )


@pytest.mark.parametrize(
    ("name", "corrupt"),
    [
        pytest.param(name, c, id=f"{i}-{name}")
        for i, c in BAD_DICTS
        for name in OPTIMIZER_NAMES
        if _applies(i, name)
    ],
)
def test_load_refuses_dict_that_does_not_fit(name, corrupt):
    rng = np.random.default_rng(10)
    source = optirs_class(name)(make_groups(np.float32, seed=4), **FULL_STATE_KWARGS[name])
    for step in range(3):
        source.step(grads_for(rng, step, flat_params(source)))
    sd = source.state_dict()
    for group in sd["param_groups"]:
        group["lr"] = 0.321  # a partially applied load would show
    sd = corrupt(sd, name)

    target = optirs_class(name)(make_groups(np.float32), **FULL_STATE_KWARGS[name])
    target.step(grads_for(rng, 0, flat_params(target)))
    before = snapshot(target)
    # A non-scalar step is a wrong kind of value: TypeError is as fitting as ValueError there.
    exc = (TypeError, ValueError) if corrupt is _step_not_scalar else ValueError
    with pytest.raises(exc):
        target.load_state_dict(sd)
    assert_snapshot_equal(before, snapshot(target))


@pytest.mark.parametrize("drop", [True, False], ids=["key_absent", "value_none"])
def test_load_accepts_sgd_without_momentum_buffer(drop):
    """torch's SGD treats a missing (or None) momentum_buffer as 'no buffer yet': the next step
    starts it from that step's gradient. optirs does the same, matching an SGD that never
    stepped that parameter."""
    rng = np.random.default_rng(12)
    kwargs = FULL_STATE_KWARGS["SGD"]
    source = optirs_class("SGD")(make_groups(np.float32, seed=4), **kwargs)
    for step in range(3):
        source.step(grads_for(rng, step, flat_params(source)))
    sd = source.state_dict()
    if drop:
        del sd["state"][3]["momentum_buffer"]
    else:
        sd["state"][3]["momentum_buffer"] = None
    target = optirs_class("SGD")(make_groups(np.float32, seed=4), **kwargs)
    target.load_state_dict(sd)
    assert "momentum_buffer" not in target.state[flat_params(target)[3]]
    grads = grads_for(rng, 5, flat_params(target))
    target.step(grads)
    p3 = flat_params(target)[3]
    np.testing.assert_array_equal(target.state[p3]["momentum_buffer"], grads[3])


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
@pytest.mark.parametrize("bad", [None, [], "state"], ids=["none", "list", "str"])
def test_load_refuses_non_dict(name, bad):
    opt = optirs_class(name)(make_groups(np.float32), **FULL_STATE_KWARGS[name])
    before = snapshot(opt)
    with pytest.raises((TypeError, ValueError)):
        opt.load_state_dict(bad)
    assert_snapshot_equal(before, snapshot(opt))


# --------------------------------------------------------------------------------------------
# add_param_group
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_add_param_group(name, dtype):
    """The new group gets the constructor defaults, and stepping matches torch.

    Reference: a torch optimizer built with both groups from the start, whose second group gets
    no gradient (None) until the moment optirs adds it (torch's own Adagrad cannot step a
    parameter added by add_param_group: it creates state only in its constructor).
    """
    kwargs = FULL_STATE_KWARGS[name]
    groups = make_groups(dtype)
    late_options = {"weight_decay": 0.2}
    opt = optirs_class(name)(copy_groups(groups[:1]), **kwargs)
    ref_groups = [groups[0], {"params": groups[1]["params"], **late_options}]
    pair = SideBySide(name, ref_groups, **kwargs)
    rng = np.random.default_rng(12)
    params = flat_params(opt)

    for step in range(6):
        if step == 3:
            late = [p.copy() for p in groups[1]["params"]]
            assert opt.add_param_group({"params": late, **late_options}) is None
            params = flat_params(opt)
            assert len(opt.param_groups) == 2
            new_group = opt.param_groups[1]
            assert all(a is b for a, b in zip(new_group["params"], late))
            for key in HYPERPARAMETERS[name]:
                expected = late_options.get(key, opt.param_groups[0][key])
                assert new_group[key] == expected, key
        grads = grads_for(rng, step, pair.params)
        if step < 3:
            opt.step([g.copy() for g in grads[:2]])
            grads[2:] = [None, None]
        else:
            opt.step([g.copy() for g in grads])
        pair.step(grads)
    assert_matches_torch(opt, params, pair.topt, pair.tparams, pair.steps)
    assert [g["params"] for g in opt.state_dict()["param_groups"]] == [[0, 1], [2, 3]]


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_add_param_group_refuses_duplicate(name):
    groups = make_groups(np.float32)
    opt = optirs_class(name)(copy_groups(groups), **FULL_STATE_KWARGS[name])
    opt.step(grads_for(np.random.default_rng(0), 0, flat_params(opt)))
    before = snapshot(opt)
    existing = opt.param_groups[1]["params"][0]
    with pytest.raises(ValueError) as excinfo:
        opt.add_param_group({"params": [np.zeros(4, np.float32), existing]})
    assert str(excinfo.value) == "some parameters appear in more than one parameter group"
    assert_snapshot_equal(before, snapshot(opt))


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_add_param_group_refuses_bad_param(name):
    opt = optirs_class(name)(make_groups(np.float32), **FULL_STATE_KWARGS[name])
    before = snapshot(opt)
    with pytest.raises(TypeError):
        opt.add_param_group({"params": [np.zeros(4, np.float32), np.zeros(4, np.int64)]})
    assert_snapshot_equal(before, snapshot(opt))


def test_torch_reference_is_the_constructor_defaults():
    """Sanity check of the reference used above: torch fills missing group keys with defaults."""
    topt = torch_class("SGD")([torch.zeros(2)], lr=0.3, momentum=0.5)
    topt.add_param_group({"params": [torch.zeros(3)], "weight_decay": 0.2})
    assert topt.param_groups[1]["lr"] == 0.3 and topt.param_groups[1]["momentum"] == 0.5


# --------------------------------------------------------------------------------------------
# round trip through torch: every array converted with torch.from_numpy, and back
# --------------------------------------------------------------------------------------------


def _from_numpy(value):
    """Every ndarray in a (nested) state dict as ``torch.from_numpy`` of it, 0-d ones too."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, dict):
        return {k: _from_numpy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_numpy(v) for v in value]
    return value


def _to_numpy(value):
    """Every tensor in a (nested) state dict as ``.numpy()`` of it, 0-d ones too."""
    if isinstance(value, torch.Tensor):
        return value.numpy()
    if isinstance(value, dict):
        return {k: _to_numpy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_numpy(v) for v in value]
    return value


def _without_none(state):
    # torch's SGD keeps momentum_buffer=None for "no buffer"; optirs keeps no entry.
    entries = {i: {k: v for k, v in e.items() if v is not None} for i, e in state.items()}
    return {i: e for i, e in entries.items() if e}


def _assert_same_bits(np_state, torch_state):
    """One state dict's ``state`` in NumPy and torch form: same entries, dtypes, shapes, bits."""
    np_state, torch_state = _without_none(np_state), _without_none(torch_state)
    assert sorted(np_state) == sorted(torch_state)
    for i, entry in np_state.items():
        tentry = torch_state[i]
        assert sorted(entry) == sorted(tentry), i
        for key, value in entry.items():
            t = tentry[key]
            assert isinstance(t, torch.Tensor), (i, key, type(t))
            if key != "step" and t.dim() == 0:
                # A 0-d state value (NAdam's mu_product): torch's load_state_dict casts it to
                # the parameter's dtype, exactly from float32.
                assert t.shape == value.shape, (i, key)
                assert float(t) == float(value) or (np.isnan(float(t)) and np.isnan(value))
                continue
            assert t.numpy().dtype == value.dtype and t.shape == value.shape, (i, key)
            assert t.numpy().tobytes() == value.tobytes(), (i, key)
            if key == "step":
                assert t.dtype == torch.float32 and t.shape == (), (i, t)


def _assert_bridge_is_bitwise(opt, bridge, bparams):
    """optirs.torch runs the NumPy optimizer's kernels: same parameters and state, bit for bit."""
    for i, (p, b) in enumerate(zip(flat_params(opt), bparams)):
        assert p.tobytes() == b.detach().numpy().tobytes(), f"param {i}"
        state = opt.state.get(p, {})
        bstate = {k: v for k, v in bridge.state.get(b, {}).items() if v is not None}
        assert sorted(state) == sorted(bstate), i
        for key, value in state.items():
            assert value.dtype == bstate[key].numpy().dtype, (i, key)
            assert value.tobytes() == bstate[key].numpy().tobytes(), (i, key)


def _torch_params(np_opt):
    return [
        {"params": [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in g["params"]]}
        for g in np_opt.param_groups
    ]


def _set_grads(tparams, grads):
    for p, g in zip(tparams, grads):
        p.grad = torch.from_numpy(g.copy())


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("name", "cid", "kwargs"), CONFIGS, ids=CONFIG_IDS)
def test_state_dict_round_trip_through_torch_from_numpy(name, cid, kwargs, dtype):
    """NumPy ``state_dict()`` -> every array through ``torch.from_numpy`` (the 0-d ``step``
    too) -> ``torch.optim.X.load_state_dict``: torch holds the NumPy state bit for bit and steps
    on like the NumPy optimizer (to the parity tolerances: torch's own kernels fuse
    multiply-adds), optirs.torch loaded with the same dict bit for bit. And back: torch's
    ``state_dict()`` -> every tensor through ``.numpy()`` -> ``optirs.X.load_state_dict``."""
    import optirs.torch

    rng = np.random.default_rng(12)
    opt = optirs_class(name)(copy_groups(make_groups(dtype)), **kwargs)
    for step in range(3):
        opt.step(grads_for(rng, step, flat_params(opt)))
    sd = opt.state_dict()
    converted = _from_numpy(sd)
    _assert_same_bits(sd["state"], converted["state"])

    tgroups = _torch_params(opt)
    topt = torch_class(name)(tgroups, foreach=False, **kwargs)
    bgroups = _torch_params(opt)
    bridge = getattr(optirs.torch, name)(bgroups, **kwargs)
    # torch keeps loaded tensors whose dtype fits (no copy): each gets its own converted dict.
    topt.load_state_dict(_from_numpy(opt.state_dict()))
    bridge.load_state_dict(converted)
    tparams = [p for g in tgroups for p in g["params"]]
    bparams = [p for g in bgroups for p in g["params"]]
    loaded = {i: topt.state[p] for i, p in enumerate(tparams) if p in topt.state}
    _assert_same_bits(sd["state"], loaded)
    # torch's load cast the 0-d state values (NAdam's mu_product) to the parameters' dtype,
    # which changes how they round from here on: the NumPy optimizer takes torch's loaded
    # state back (its buffers are its own bits) to step on as torch does.
    opt.load_state_dict(_to_numpy(topt.state_dict()))
    for step in range(3, 6):
        grads = grads_for(rng, step, flat_params(opt))
        _set_grads(tparams, grads)
        _set_grads(bparams, grads)
        opt.step(grads)
        topt.step()
        bridge.step()
        assert_matches_torch(opt, flat_params(opt), topt, tparams, step + 1)
        _assert_bridge_is_bitwise(opt, bridge, bparams)

    # Back: torch.optim's state into a fresh NumPy optimizer, which steps on like torch.
    tsd = topt.state_dict()
    back = _to_numpy(tsd)
    _assert_same_bits(back["state"], tsd["state"])
    twin = optirs_class(name)(
        [{"params": [p.detach().numpy().copy() for p in g["params"]]} for g in tgroups], **kwargs
    )
    twin.load_state_dict(back)
    _assert_same_bits(twin.state_dict()["state"], tsd["state"])
    for step in range(6, 9):
        grads = grads_for(rng, step, flat_params(twin))
        _set_grads(tparams, grads)
        twin.step(grads)
        topt.step()
        assert_matches_torch(twin, flat_params(twin), topt, tparams, step + 1)
