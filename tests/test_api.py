"""Public API behaviour: in-place updates, state access, defaults, signatures."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import optirs
import pytest
import torch
from conftest import (
    DTYPE_IDS,
    FLOAT_DTYPES,
    FULL_STATE_KWARGS,
    HYPERPARAMETERS,
    OPTIMIZER_NAMES,
    SCALAR_KEYS,
    assert_bitwise_equal_params,
    assert_same_at_every_simd_level_and_thread_count,
    flat_params,
    optirs_class,
    random_array,
    torch_class,
)


def test_version_is_a_string():
    assert isinstance(optirs.__version__, str)
    assert optirs.__version__


def data_pointer(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_step_updates_in_place_and_returns_none(name, dtype, rng):
    params = [random_array(rng, s, dtype) for s in [(7,), (3, 5), ()]]
    ids, pointers = [id(p) for p in params], [data_pointer(p) for p in params]
    before = [p.copy() for p in params]
    opt = optirs_class(name)(params, **FULL_STATE_KWARGS[name])

    assert opt.step([random_array(rng, p.shape, dtype) for p in params]) is None

    assert [id(p) for p in flat_params(opt)] == ids
    assert [data_pointer(p) for p in params] == pointers
    for p, b in zip(params, before):
        assert p.dtype == dtype and p.shape == b.shape
        assert not np.array_equal(p, b)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_grads_may_be_list_or_tuple(name, rng):
    a = [random_array(rng, (5,), np.float32)]
    b = [a[0].copy()]
    opt_a = optirs_class(name)(a, **FULL_STATE_KWARGS[name])
    opt_b = optirs_class(name)(b, **FULL_STATE_KWARGS[name])
    g = random_array(rng, (5,), np.float32)
    opt_a.step([g])
    opt_b.step((g,))
    assert_bitwise_equal_params(a, b)


@pytest.mark.parametrize(
    "make_params",
    [
        lambda ps: ps,
        lambda ps: tuple(ps),
        lambda ps: iter(ps),
        lambda ps: (p for p in ps),
        lambda ps: [{"params": ps}],
        lambda ps: [{"params": ps[:1]}, {"params": tuple(ps[1:])}],
    ],
    ids=["list", "tuple", "iterator", "generator", "one_group", "two_groups"],
)
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_params_accept_iterables_and_groups(name, make_params, rng):
    params = [random_array(rng, (4,), np.float64) for _ in range(3)]
    opt = optirs_class(name)(make_params(params))
    assert all(a is b for a, b in zip(flat_params(opt), params))
    assert len(flat_params(opt)) == 3
    for group in opt.param_groups:
        assert isinstance(group, dict)
        assert set(HYPERPARAMETERS[name]) <= set(group)


# (optimizer, kwargs, state keys after a step)
STATE_KEYS = [
    ("SGD", {}, None),
    ("SGD", {"momentum": 0.9}, {"momentum_buffer"}),
    ("SGD", {"momentum": 0.9, "nesterov": True}, {"momentum_buffer"}),
    ("SGD", {"dampening": 0.5}, None),
    ("Adam", {}, {"step", "exp_avg", "exp_avg_sq"}),
    ("Adam", {"amsgrad": True}, {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}),
    (
        "Adam",
        {"decoupled_weight_decay": True, "weight_decay": 0.1},
        {"step", "exp_avg", "exp_avg_sq"},
    ),
    ("AdamW", {}, {"step", "exp_avg", "exp_avg_sq"}),
    ("AdamW", {"amsgrad": True}, {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}),
    ("RMSprop", {}, {"step", "square_avg"}),
    ("RMSprop", {"momentum": 0.5}, {"step", "square_avg", "momentum_buffer"}),
    ("RMSprop", {"centered": True}, {"step", "square_avg", "grad_avg"}),
    (
        "RMSprop",
        {"momentum": 0.5, "centered": True},
        {"step", "square_avg", "momentum_buffer", "grad_avg"},
    ),
    ("Adagrad", {}, {"step", "sum"}),
    ("Adagrad", {"lr_decay": 0.1, "initial_accumulator_value": 0.3}, {"step", "sum"}),
    ("Adamax", {}, {"step", "exp_avg", "exp_inf"}),
    ("Adamax", {"weight_decay": 0.1, "maximize": True}, {"step", "exp_avg", "exp_inf"}),
    ("NAdam", {}, {"step", "mu_product", "exp_avg", "exp_avg_sq"}),
    (
        "NAdam",
        {"weight_decay": 0.1, "decoupled_weight_decay": True},
        {"step", "mu_product", "exp_avg", "exp_avg_sq"},
    ),
    ("ASGD", {}, {"step", "eta", "mu", "ax"}),
    ("ASGD", {"t0": 0.0, "weight_decay": 0.1}, {"step", "eta", "mu", "ax"}),
]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    ("name", "kwargs", "keys"),
    STATE_KEYS,
    ids=[f"{n}-" + "-".join(kw) if kw else f"{n}-default" for n, kw, _ in STATE_KEYS],
)
def test_state_keys_and_types(name, kwargs, keys, dtype, rng):
    p, q = random_array(rng, (3, 4), dtype), random_array(rng, (6,), dtype)
    opt = optirs_class(name)([p, q], **kwargs)
    for _ in range(3):
        opt.step([random_array(rng, p.shape, dtype), None])

    # q never had a gradient: no state (Adagrad: its construction-time state, step 0)
    if name == "Adagrad":
        assert float(opt.state[q]["step"]) == 0.0
        assert len(opt.state) == 2
    else:
        assert q not in opt.state
    if keys is None:
        assert p not in opt.state
        assert len(opt.state) == 0
        return
    assert p in opt.state
    assert set(opt.state[p]) == keys
    for key, value in opt.state[p].items():
        assert isinstance(value, np.ndarray)
        if key == "step":
            assert value.shape == () and value.dtype == np.float32 and float(value) == 3.0
        elif key in SCALAR_KEYS[name]:
            assert value.shape == () and value.dtype == np.float32
        else:
            assert value.shape == p.shape and value.dtype == dtype
            assert not np.shares_memory(value, p)


def test_state_is_looked_up_by_identity(rng):
    p = random_array(rng, (4,), np.float32)
    opt = optirs.Adam([p])
    opt.step([np.ones(4, np.float32)])
    assert p in opt.state
    assert p.copy() not in opt.state
    assert p[:] not in opt.state
    assert len(opt.state) == 1


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_state_at_construction(name, rng):
    p = random_array(rng, (4,), np.float64)
    opt = optirs_class(name)([p], **FULL_STATE_KWARGS[name])
    if name != "Adagrad":
        assert len(opt.state) == 0
        return
    iav = FULL_STATE_KWARGS[name]["initial_accumulator_value"]
    assert set(opt.state[p]) == {"step", "sum"}
    assert float(opt.state[p]["step"]) == 0.0
    np.testing.assert_array_equal(opt.state[p]["sum"], np.full(4, iav))


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_defaults_match_torch(name):
    opt = optirs_class(name)([np.zeros(3, np.float32)])
    torch_defaults = torch_class(name)([torch.zeros(3)]).defaults
    group = opt.param_groups[0]
    for key in HYPERPARAMETERS[name]:
        expected, actual = torch_defaults[key], group[key]
        if key == "betas":
            actual = tuple(actual)
        assert actual == expected, key
        if isinstance(expected, bool):
            assert isinstance(actual, bool), key


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_constructor_values_reach_param_groups(name):
    values = {
        "SGD": {
            "lr": 0.3,
            "momentum": 0.7,
            "dampening": 0.1,
            "weight_decay": 0.2,
            "maximize": True,
        },
        "Adam": {
            "lr": 0.3,
            "betas": (0.7, 0.8),
            "eps": 1e-5,
            "weight_decay": 0.2,
            "amsgrad": True,
            "maximize": True,
            "decoupled_weight_decay": True,
        },
        "AdamW": {
            "lr": 0.3,
            "betas": (0.7, 0.8),
            "eps": 1e-5,
            "weight_decay": 0.2,
            "amsgrad": True,
            "maximize": True,
        },
        "RMSprop": {
            "lr": 0.3,
            "alpha": 0.7,
            "eps": 1e-5,
            "weight_decay": 0.2,
            "momentum": 0.4,
            "centered": True,
            "maximize": True,
        },
        "Adagrad": {
            "lr": 0.3,
            "lr_decay": 0.7,
            "weight_decay": 0.2,
            "initial_accumulator_value": 0.4,
            "eps": 1e-5,
            "maximize": True,
        },
        "Adadelta": {"lr": 0.3, "rho": 0.7, "eps": 1e-5, "weight_decay": 0.2, "maximize": True},
        "RAdam": {
            "lr": 0.3,
            "betas": (0.7, 0.8),
            "eps": 1e-5,
            "weight_decay": 0.2,
            "decoupled_weight_decay": True,
            "maximize": True,
        },
        "Lion": {"lr": 0.3, "betas": (0.7, 0.8), "weight_decay": 0.2, "maximize": True},
        "Rprop": {"lr": 0.3, "etas": (0.4, 1.5), "step_sizes": (1e-3, 2.0), "maximize": True},
        "Adamax": {
            "lr": 0.3,
            "betas": (0.7, 0.8),
            "eps": 1e-5,
            "weight_decay": 0.2,
            "maximize": True,
        },
        "NAdam": {
            "lr": 0.3,
            "betas": (0.7, 0.8),
            "eps": 1e-5,
            "weight_decay": 0.2,
            "momentum_decay": 0.01,
            "decoupled_weight_decay": True,
            "maximize": True,
        },
        "ASGD": {
            "lr": 0.3,
            "lambd": 0.7,
            "alpha": 0.8,
            "t0": 5.0,
            "weight_decay": 0.2,
            "maximize": True,
        },
    }[name]
    opt = optirs_class(name)([np.zeros(3)], **values)
    group = opt.param_groups[0]
    for key, value in values.items():
        assert (tuple(group[key]) if isinstance(value, tuple) else group[key]) == value, key


# Positional arguments in torch's order.
POSITIONAL = {
    "SGD": (
        (0.3, 0.7, 0.1, 0.2, False),
        ("lr", "momentum", "dampening", "weight_decay", "nesterov"),
    ),
    "Adam": ((0.3, (0.7, 0.8), 1e-5, 0.2, True), ("lr", "betas", "eps", "weight_decay", "amsgrad")),
    "AdamW": (
        (0.3, (0.7, 0.8), 1e-5, 0.2, True),
        ("lr", "betas", "eps", "weight_decay", "amsgrad"),
    ),
    "RMSprop": (
        (0.3, 0.7, 1e-5, 0.2, 0.4, True),
        ("lr", "alpha", "eps", "weight_decay", "momentum", "centered"),
    ),
    "Adagrad": (
        (0.3, 0.7, 0.2, 0.4, 1e-5),
        ("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps"),
    ),
    # Adadelta's next positional argument is torch's `foreach`, which the NumPy API lacks:
    # maximize after these is refused as positional all the same.
    "Adadelta": ((0.3, 0.7, 1e-5, 0.2), ("lr", "rho", "eps", "weight_decay")),
    "RAdam": (
        (0.3, (0.7, 0.8), 1e-5, 0.2, True),
        ("lr", "betas", "eps", "weight_decay", "decoupled_weight_decay"),
    ),
    "Lion": ((0.3, (0.7, 0.8), 0.2), ("lr", "betas", "weight_decay")),
    "Rprop": ((0.3, (0.4, 1.5), (1e-3, 2.0)), ("lr", "etas", "step_sizes")),
    "Adamax": ((0.3, (0.7, 0.8), 1e-5, 0.2), ("lr", "betas", "eps", "weight_decay")),
    "NAdam": (
        (0.3, (0.7, 0.8), 1e-5, 0.2, 0.01, True),
        ("lr", "betas", "eps", "weight_decay", "momentum_decay", "decoupled_weight_decay"),
    ),
    "ASGD": ((0.3, 0.7, 0.8, 5.0, 0.2), ("lr", "lambd", "alpha", "t0", "weight_decay")),
}


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_positional_arguments_follow_torch(name):
    args, keys = POSITIONAL[name]
    opt = optirs_class(name)([np.zeros(3)], *args)
    group = opt.param_groups[0]
    for key, value in zip(keys, args):
        assert (tuple(group[key]) if isinstance(value, tuple) else group[key]) == value, key


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_maximize_is_keyword_only(name):
    args, _ = POSITIONAL[name]
    with pytest.raises(TypeError):
        optirs_class(name)([np.zeros(3)], *args, True)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_repr_does_not_crash(name):
    opt = optirs_class(name)([np.zeros(3), np.zeros((2, 2), np.float32)])
    text = repr(opt)
    assert isinstance(text, str)
    assert name in text


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_result_does_not_depend_on_position_in_the_array(name, dtype):
    """Elementwise update: one 1_000_003-element parameter gives bitwise the same values as the
    same data cut into awkwardly sized pieces (SIMD body vs tail, parallel chunk boundaries)."""
    rng = np.random.default_rng(21)
    n = 1_000_003
    cuts = [1, 8, 15, 4099, 65_536, 500_001]
    whole = random_array(rng, (n,), dtype)
    pieces = [piece.copy() for piece in np.split(whole, cuts)]
    opt_whole = optirs_class(name)([whole], **FULL_STATE_KWARGS[name])
    opt_pieces = optirs_class(name)(pieces, **FULL_STATE_KWARGS[name])
    for _ in range(3):
        g = random_array(rng, (n,), dtype)
        opt_whole.step([g])
        opt_pieces.step([piece.copy() for piece in np.split(g, cuts)])
    assert np.concatenate(pieces).tobytes() == whole.tobytes()
    for key, value in opt_whole.state[whole].items():
        if key == "step":
            continue
        if key in SCALAR_KEYS[name]:  # 0-d, per parameter: the same for every piece
            assert all(opt_pieces.state[x][key].tobytes() == value.tobytes() for x in pieces)
            continue
        joined = np.concatenate([opt_pieces.state[piece][key] for piece in pieces])
        assert joined.tobytes() == value.tobytes(), key


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_step_works_in_a_forked_child(name):
    """DataLoader-style workers fork after the parent used the optimizer's thread pool."""
    n = 1_000_003
    parent = optirs_class(name)([np.zeros(n, np.float32)], **FULL_STATE_KWARGS[name])
    parent.step([np.ones(n, np.float32)])

    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            p = np.zeros(n, np.float32)
            child = optirs_class(name)([p], **FULL_STATE_KWARGS[name])
            child.step([np.ones(n, np.float32)])
            parent.step([np.ones(n, np.float32)])
            code = 0 if np.all(np.isfinite(p)) and p[0] != 0 else 2
        finally:
            os._exit(code)

    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("optimizer step deadlocked in a forked child")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(status) == 0


def _trajectory(name, dtype):
    rng = np.random.default_rng(33)
    params = [random_array(rng, (n,), dtype) for n in (1, 7, 17, 100_003)]
    opt = optirs_class(name)(params, **FULL_STATE_KWARGS[name])
    for _ in range(3):
        opt.step([random_array(rng, p.shape, dtype) for p in params])
    state = [{k: v.tobytes() for k, v in opt.state[p].items()} for p in params]
    return [p.tobytes() for p in params], state


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_same_bits_for_every_simd_level_and_thread_count(name, dtype):
    """Runtime dispatch and parallel chunking must not change a single bit."""
    assert_same_at_every_simd_level_and_thread_count(
        lambda: _trajectory(name, dtype), threads=(1, 3)
    )


_TRAJECTORY_DIGEST = """
import hashlib, time, numpy as np, optirs
rng = np.random.default_rng(5)
params = [rng.standard_normal(n).astype(np.float32) for n in (7, 100_003, 300_001)]
opt = optirs.Adam(params, lr=1e-2, amsgrad=True, weight_decay=0.1)
for _ in range(4):
    opt.step([rng.standard_normal(p.shape).astype(np.float32) for p in params])
    time.sleep(0.01)  # longer than any spin: the next step finds the workers parked
out = [p.tobytes() for p in params] + [v.tobytes() for p in params for v in opt.state[p].values()]
print(hashlib.sha256(b"".join(out)).hexdigest())
"""


def test_workers_that_sleep_between_steps_give_the_same_bits():
    """Steps at 3 threads whose workers park after every step (OPTIRS_SPIN_US=0) and after a
    spin (the default) give the bits one thread gives; each run in a fresh interpreter."""
    import subprocess
    import sys

    def digest(**env):
        run = subprocess.run(
            [sys.executable, "-c", _TRAJECTORY_DIGEST],
            env=dict(os.environ, **env),
            capture_output=True,
            text=True,
            check=True,
        )
        return run.stdout.strip()

    one = digest(OPTIRS_NUM_THREADS="1")
    assert len(one) == 64
    assert digest(OPTIRS_NUM_THREADS="3", OPTIRS_SPIN_US="0") == one
    assert digest(OPTIRS_NUM_THREADS="3") == one


def test_import_optirs_does_not_import_torch():
    """torch is an optional dependency: only `import optirs.torch` may load it."""
    import subprocess
    import sys

    code = "import sys, optirs; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    code = "import sys, optirs.torch; sys.exit('torch' not in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# The step plan (flat argument lists reused across steps) must notice every change it depends on.


def _adam_pair(seed=0):
    rng = np.random.default_rng(seed)
    ps = [rng.standard_normal(n).astype(np.float32) for n in (5, 33, 7)]
    gs = [[rng.standard_normal(p.shape).astype(np.float32) for p in ps] for _ in range(4)]
    return ps, gs


def test_plan_sees_a_rebound_state_buffer():
    ps, gs = _adam_pair()
    opt = optirs.Adam(ps, lr=0.1)
    opt.step(gs[0])
    new = np.full_like(ps[1], 0.25)
    opt.state[ps[1]]["exp_avg"] = new  # rebinding, not writing into the old array
    old_sq = opt.state[ps[1]]["exp_avg_sq"].copy()
    opt.step(gs[1])
    assert opt.state[ps[1]]["exp_avg"] is new
    expected = np.float32(0.25) + np.float32(0.1) * (gs[1][1] - np.float32(0.25))
    np.testing.assert_allclose(new, expected, rtol=1e-6)
    assert not np.array_equal(opt.state[ps[1]]["exp_avg_sq"], old_sq)


@pytest.mark.parametrize("how", ["update", "pop_and_set", "setdefault_new_key"])
def test_plan_sees_other_state_mutations(how):
    ps, gs = _adam_pair(1)
    opt = optirs.Adam(ps, lr=0.1)
    opt.step(gs[0])
    entry = opt.state[ps[0]]
    replacement = np.zeros_like(ps[0])
    if how == "update":
        entry.update(exp_avg=replacement)
    elif how == "pop_and_set":
        entry.pop("exp_avg")
        entry["exp_avg"] = replacement
    else:
        del entry["exp_avg"]
        entry.setdefault("exp_avg", replacement)
    opt.step(gs[1])
    assert opt.state[ps[0]]["exp_avg"] is replacement
    assert np.any(replacement != 0)


def test_plan_sees_a_parameter_replaced_in_its_group():
    ps, gs = _adam_pair(2)
    opt = optirs.SGD(ps, lr=0.5)
    opt.step(gs[0])
    other = np.ones_like(ps[2])
    opt.param_groups[0]["params"][2] = other
    before = ps[2].copy()
    opt.step(gs[1])
    np.testing.assert_array_equal(ps[2], before)  # the old array is no longer a parameter
    np.testing.assert_allclose(other, 1 - np.float32(0.5) * gs[1][2], rtol=1e-6)


def test_plan_sees_options_that_change_the_state_layout():
    ps, gs = _adam_pair(3)
    opt = optirs.Adam(ps, lr=0.1)
    opt.step(gs[0])
    assert "max_exp_avg_sq" not in opt.state[ps[0]]
    opt.param_groups[0]["amsgrad"] = True
    opt.step(gs[1])
    assert all("max_exp_avg_sq" in opt.state[p] for p in ps)
    assert float(opt.state[ps[0]]["step"]) == 2.0


def test_plan_sees_a_new_group_and_a_first_gradient():
    ps, gs = _adam_pair(4)
    opt = optirs.Adam(ps[:2], lr=0.1)
    opt.step(gs[0][:2])
    opt.add_param_group({"params": [ps[2]], "lr": 0.01})
    opt.step([gs[1][0], gs[1][1], None])
    assert ps[2] not in opt.state
    opt.step(gs[2])
    assert float(opt.state[ps[2]]["step"]) == 1.0
    assert float(opt.state[ps[0]]["step"]) == 3.0


def test_plan_sees_load_state_dict():
    """step, save, step, load, step == step, step: the load must replace what the plan holds."""
    ps, gs = _adam_pair(5)
    ref = [p.copy() for p in ps]
    opt = optirs.Adam(ps, lr=0.1)
    opt.step(gs[0])
    saved = opt.state_dict()
    kept = [p.copy() for p in ps]
    opt.step(gs[2])
    for p, k in zip(ps, kept):
        p[...] = k
    opt.load_state_dict(saved)
    opt.step(gs[1])
    ref_opt = optirs.Adam(ref, lr=0.1)
    ref_opt.step(gs[0])
    ref_opt.step(gs[1])
    for a, b in zip(ps, ref):
        np.testing.assert_array_equal(a, b)
    assert float(opt.state[ps[0]]["step"]) == 2.0


def test_traffic_probe_moves_the_bytes_it_claims():
    """The benchmark's ceiling probe reads and writes every byte (checked by its XOR result)."""
    rng = np.random.default_rng(3)
    read = rng.integers(0, 2**32, 100_003, dtype=np.uint32).view(np.float32)
    writes = [rng.integers(0, 2**32, 100_003, dtype=np.uint32).view(np.float32) for _ in range(3)]
    expected = [(w.view(np.uint32) ^ read.view(np.uint32)) for w in writes]
    optirs._core.traffic([read], writes)
    for w, e in zip(writes, expected):
        np.testing.assert_array_equal(w.view(np.uint32), e)
    with pytest.raises(ValueError):
        optirs._core.traffic([read], [writes[0], writes[0]])
