"""optirs against torch.optim (for-loop path): parameters and every state buffer, step by step."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import (
    DTYPE_IDS,
    FLOAT_DTYPES,
    FULL_STATE_KWARGS,
    OPTIMIZER_NAMES,
    random_array,
    run_side_by_side,
)

# (optimizer, id, constructor kwargs). Every torch test combination from TORCH_REFERENCE.md,
# plus combinations that switch on every remaining option.
COMBOS = [
    # SGD: torch's combos
    ("SGD", "default", {}),
    ("SGD", "lr", {"lr": 1e-2}),
    ("SGD", "wd", {"weight_decay": 0.5}),
    ("SGD", "momentum", {"momentum": 0.9}),
    ("SGD", "wd_maximize", {"weight_decay": 0.1, "maximize": True}),
    ("SGD", "momentum_dampening", {"momentum": 0.9, "dampening": 0.5}),
    ("SGD", "momentum_wd", {"momentum": 0.9, "weight_decay": 0.1}),
    ("SGD", "nesterov_wd", {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1}),
    # SGD: extra
    ("SGD", "nesterov_maximize", {"lr": 0.05, "momentum": 0.5, "nesterov": True, "maximize": True}),
    (
        "SGD",
        "momentum_dampening_wd_maximize",
        {"lr": 0.03, "momentum": 0.8, "dampening": 0.3, "weight_decay": 0.05, "maximize": True},
    ),
    ("SGD", "dampening_without_momentum", {"lr": 0.1, "dampening": 0.5}),
    ("SGD", "momentum1_dampening1", {"lr": 0.1, "momentum": 1.0, "dampening": 1.0}),
    # Adam: torch's combos
    ("Adam", "default", {}),
    ("Adam", "lr", {"lr": 0.01}),
    ("Adam", "wd", {"weight_decay": 0.1}),
    ("Adam", "wd_maximize", {"weight_decay": 0.1, "maximize": True}),
    ("Adam", "wd_amsgrad", {"weight_decay": 0.1, "amsgrad": True}),
    # Adam: extra
    ("Adam", "amsgrad_maximize", {"lr": 0.01, "amsgrad": True, "maximize": True}),
    ("Adam", "decoupled_wd", {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True}),
    (
        "Adam",
        "decoupled_wd_amsgrad_maximize",
        {
            "lr": 0.01,
            "weight_decay": 0.2,
            "decoupled_weight_decay": True,
            "amsgrad": True,
            "maximize": True,
        },
    ),
    ("Adam", "betas_eps", {"lr": 0.02, "betas": (0.5, 0.9), "eps": 1e-4}),
    ("Adam", "betas_zero", {"lr": 0.01, "betas": (0.0, 0.0)}),
    # AdamW: torch's combos
    ("AdamW", "default", {}),
    ("AdamW", "lr", {"lr": 0.01}),
    ("AdamW", "wd", {"weight_decay": 0.1}),
    ("AdamW", "wd_maximize", {"weight_decay": 0.1, "maximize": True}),
    ("AdamW", "wd_amsgrad", {"weight_decay": 0.1, "amsgrad": True}),
    # AdamW: extra
    ("AdamW", "amsgrad_maximize", {"lr": 0.01, "amsgrad": True, "maximize": True}),
    ("AdamW", "no_wd", {"lr": 0.01, "weight_decay": 0.0}),
    (
        "AdamW",
        "betas_eps_big_wd",
        {"lr": 0.05, "betas": (0.8, 0.99), "eps": 1e-3, "weight_decay": 1.5},
    ),
    # RMSprop: torch's combos
    ("RMSprop", "default", {}),
    ("RMSprop", "lr", {"lr": 1e-3}),
    ("RMSprop", "wd", {"weight_decay": 0.1}),
    ("RMSprop", "maximize", {"maximize": True}),
    ("RMSprop", "wd_maximize", {"weight_decay": 0.1, "maximize": True}),
    ("RMSprop", "wd_centered", {"weight_decay": 0.1, "centered": True}),
    ("RMSprop", "wd_centered_momentum", {"weight_decay": 0.1, "centered": True, "momentum": 0.1}),
    (
        "RMSprop",
        "wd_centered_momentum_maximize",
        {"weight_decay": 0.1, "centered": True, "momentum": 0.1, "maximize": True},
    ),
    # RMSprop: extra
    ("RMSprop", "momentum", {"momentum": 0.9}),
    ("RMSprop", "centered", {"centered": True}),
    ("RMSprop", "alpha0", {"lr": 1e-3, "alpha": 0.0}),
    ("RMSprop", "alpha_eps_momentum", {"alpha": 0.5, "eps": 1e-3, "momentum": 0.5}),
    # Adagrad: torch's combos
    ("Adagrad", "default", {}),
    ("Adagrad", "wd", {"weight_decay": 0.1}),
    ("Adagrad", "wd_maximize", {"weight_decay": 0.1, "maximize": True}),
    ("Adagrad", "lr", {"lr": 0.1}),
    ("Adagrad", "iav_wd", {"initial_accumulator_value": 0.1, "weight_decay": 0.1}),
    ("Adagrad", "lr_lr_decay_wd", {"lr": 0.1, "lr_decay": 0.5, "weight_decay": 0.1}),
    # Adagrad: extra
    ("Adagrad", "maximize", {"maximize": True}),
    ("Adagrad", "lr_decay_iav", {"lr": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.5}),
    ("Adagrad", "eps_maximize_lr_decay", {"eps": 1e-3, "maximize": True, "lr_decay": 0.1}),
    # Adadelta: torch's combos
    ("Adadelta", "default", {}),
    ("Adadelta", "lr", {"lr": 0.01}),
    ("Adadelta", "wd", {"weight_decay": 0.1}),
    ("Adadelta", "maximize", {"maximize": True}),
    ("Adadelta", "wd_maximize", {"weight_decay": 0.1, "maximize": True}),
    ("Adadelta", "rho_wd", {"rho": 0.95, "weight_decay": 0.9}),
    # Adadelta: extra
    ("Adadelta", "rho0_eps", {"rho": 0.0, "eps": 1e-3}),
    ("Adadelta", "rho1", {"rho": 1.0, "lr": 0.5}),
    (
        "Adadelta",
        "rho_eps_wd_maximize",
        {"rho": 0.5, "eps": 1e-4, "weight_decay": 0.2, "maximize": True},
    ),
    # RAdam: torch's combos
    ("RAdam", "default", {}),
    ("RAdam", "lr", {"lr": 2e-3}),
    ("RAdam", "eps", {"eps": 1e-6}),
    ("RAdam", "wd", {"weight_decay": 0.1}),
    ("RAdam", "decoupled_wd", {"weight_decay": 0.1, "decoupled_weight_decay": True}),
    ("RAdam", "wd_maximize", {"weight_decay": 0.1, "maximize": True}),
    # RAdam: extra. The tests' 8 steps take the unrectified update at steps 1-5 and the
    # rectified one (rho_t > 5) from step 6 with betas[1] above about 0.84; below 2/3 never.
    ("RAdam", "rectified_from_6", {"lr": 0.01, "betas": (0.8, 0.9)}),
    ("RAdam", "never_rectified", {"lr": 0.01, "betas": (0.9, 0.5)}),
    ("RAdam", "betas_zero", {"lr": 0.01, "betas": (0.0, 0.0)}),
    (
        "RAdam",
        "decoupled_wd_maximize_eps",
        {
            "lr": 0.02,
            "weight_decay": 0.3,
            "decoupled_weight_decay": True,
            "maximize": True,
            "eps": 1e-3,
        },
    ),
    # Lion (against the tests' lion-pytorch reference, conftest.LionReference)
    ("Lion", "default", {}),
    ("Lion", "lr", {"lr": 1e-3}),
    ("Lion", "wd", {"lr": 1e-3, "weight_decay": 0.1}),
    ("Lion", "maximize", {"lr": 1e-3, "maximize": True}),
    (
        "Lion",
        "betas_wd_maximize",
        {"lr": 0.01, "betas": (0.5, 0.9), "weight_decay": 1.0, "maximize": True},
    ),
    ("Lion", "betas_extremes", {"lr": 0.01, "betas": (0.0, 1.0)}),
    ("Lion", "betas_one_zero", {"lr": 0.01, "betas": (1.0, 0.0)}),
    # Rprop: torch's combos
    ("Rprop", "default", {}),
    ("Rprop", "lr", {"lr": 2e-4}),
    ("Rprop", "etas", {"etas": (0.5, 1.5)}),
    ("Rprop", "step_sizes", {"step_sizes": (2e-6, 100)}),
    ("Rprop", "maximize", {"maximize": True}),
    # Rprop: extra. Tight bounds make the clamp bite at both ends within a few steps.
    ("Rprop", "tight_step_sizes", {"lr": 0.1, "etas": (0.2, 3.0), "step_sizes": (0.05, 0.5)}),
    (
        "Rprop",
        "all_maximize",
        {"lr": 0.3, "etas": (0.9, 1.1), "step_sizes": (1e-3, 1.0), "maximize": True},
    ),
]
# Large learning rates: updates of order 0.1..1 per step, so that atol (1e-5 / 1e-7) is tiny
# next to one update and a small error in the update rule cannot hide below it.
COMBOS += [
    # Adamax: torch's combos
    ("Adamax", "default", {}),
    ("Adamax", "lr", {"lr": 0.001}),
    ("Adamax", "wd", {"weight_decay": 0.1}),
    ("Adamax", "maximize", {"maximize": True}),
    ("Adamax", "wd_maximize", {"weight_decay": 0.1, "maximize": True}),
    # Adamax: extra
    ("Adamax", "betas_eps", {"lr": 0.02, "betas": (0.5, 0.9), "eps": 1e-4}),
    ("Adamax", "betas_zero", {"lr": 0.01, "betas": (0.0, 0.0)}),
    ("Adamax", "eps_zero", {"lr": 0.01, "eps": 0.0, "betas": (0.8, 0.5)}),
    ("Adamax", "high_lr", {"lr": 0.5, "weight_decay": 0.1}),
    # NAdam: torch's combos
    ("NAdam", "default", {}),
    ("NAdam", "lr", {"lr": 0.01}),
    ("NAdam", "wd", {"weight_decay": 0.1}),
    ("NAdam", "wd_momentum_decay", {"weight_decay": 0.1, "momentum_decay": 6e-3}),
    (
        "NAdam",
        "wd_momentum_decay_decoupled",
        {"weight_decay": 0.1, "momentum_decay": 6e-3, "decoupled_weight_decay": True},
    ),
    ("NAdam", "maximize", {"weight_decay": 0.1, "maximize": True}),
    # NAdam: extra
    (
        "NAdam",
        "decoupled_maximize",
        {"lr": 0.01, "weight_decay": 0.2, "decoupled_weight_decay": True, "maximize": True},
    ),
    ("NAdam", "betas_eps", {"lr": 0.02, "betas": (0.5, 0.9), "eps": 1e-4}),
    ("NAdam", "betas_zero", {"lr": 0.01, "betas": (0.0, 0.0)}),
    ("NAdam", "momentum_decay_zero", {"lr": 0.01, "momentum_decay": 0.0}),
    ("NAdam", "momentum_decay_big", {"lr": 0.01, "momentum_decay": 0.5, "betas": (0.3, 0.5)}),
    ("NAdam", "high_lr", {"lr": 0.5, "weight_decay": 0.1}),
    # ASGD: torch's combos
    ("ASGD", "default", {}),
    ("ASGD", "lr", {"lr": 0.02}),
    ("ASGD", "t0", {"t0": 100}),
    ("ASGD", "maximize", {"maximize": True}),
    ("ASGD", "wd", {"weight_decay": 0.1}),
    ("ASGD", "wd_maximize", {"weight_decay": 0.1, "maximize": True}),
    # ASGD: extra (t0 small enough that mu leaves 1 within the run: averaging starts)
    ("ASGD", "averaging", {"lr": 0.05, "t0": 2.0}),
    ("ASGD", "t0_zero_wd", {"lr": 0.05, "t0": 0.0, "weight_decay": 0.2, "lambd": 0.5}),
    ("ASGD", "alpha_lambd", {"lr": 0.1, "lambd": 2.0, "alpha": 1.5, "t0": 3.0}),
    ("ASGD", "alpha_zero", {"lr": 0.1, "lambd": 0.0, "alpha": 0.0, "maximize": True}),
    ("ASGD", "high_lr", {"lr": 0.5, "t0": 1.0, "weight_decay": 0.1}),
]
COMBOS += [
    ("SGD", "high_lr", {"lr": 0.5, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.1}),
    ("SGD", "high_lr_nesterov", {"lr": 0.5, "momentum": 0.5, "nesterov": True}),
    ("Adam", "high_lr", {"lr": 0.5, "weight_decay": 0.1}),
    ("Adam", "high_lr_amsgrad", {"lr": 0.5, "amsgrad": True, "betas": (0.8, 0.9)}),
    ("AdamW", "high_lr", {"lr": 0.5, "weight_decay": 0.5}),
    ("AdamW", "high_lr_amsgrad", {"lr": 0.5, "weight_decay": 0.1, "amsgrad": True}),
    ("RMSprop", "high_lr", {"lr": 0.1, "weight_decay": 0.1}),
    ("RMSprop", "high_lr_centered_momentum", {"lr": 0.1, "momentum": 0.5, "centered": True}),
    ("Adagrad", "high_lr", {"lr": 1.0, "lr_decay": 0.1, "weight_decay": 0.1}),
    ("Adagrad", "high_lr_iav", {"lr": 1.0, "initial_accumulator_value": 0.5, "eps": 1e-6}),
    ("Adadelta", "high_lr", {"lr": 50.0, "weight_decay": 0.1}),
    ("RAdam", "high_lr", {"lr": 0.5, "weight_decay": 0.1, "betas": (0.9, 0.9)}),
    ("Lion", "high_lr", {"lr": 0.5, "weight_decay": 0.1}),
    ("Rprop", "high_lr", {"lr": 0.5, "step_sizes": (1e-3, 2.0)}),
]
COMBO_IDS = [f"{name}-{cid}" for name, cid, _ in COMBOS]

SHAPES = [(), (0,), (7,), (17,), (4099,), (3, 5)]
SHAPE_IDS = ["0d", "empty", "7", "17", "4099", "3x5"]

BIG = 1_000_003


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("name", "cid", "kwargs"), COMBOS, ids=COMBO_IDS)
def test_combo(name, cid, kwargs, dtype, shape, rng):
    groups = [{"params": [random_array(rng, shape, dtype)]}]
    run_side_by_side(name, groups, steps=8, rng=rng, **kwargs)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("name", "cid", "kwargs"), COMBOS, ids=COMBO_IDS)
def test_combo_many_params(name, cid, kwargs, dtype, rng):
    """All the awkward lengths at once in one optimizer, plus lengths around SIMD widths."""
    shapes = [*SHAPES, (1,), (8,), (9,), (15,), (16,), (31,), (33,), (64,), (65,), (2, 3, 4)]
    groups = [{"params": [random_array(rng, s, dtype) for s in shapes]}]
    run_side_by_side(name, groups, steps=5, rng=rng, **kwargs)


BIG_COMBOS = [
    ("SGD", {"lr": 0.01, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1}),
    ("Adam", {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True}),
    ("AdamW", {"lr": 0.01, "maximize": True}),
    ("RMSprop", {"lr": 0.01, "momentum": 0.5, "centered": True, "weight_decay": 0.1}),
    ("Adagrad", {"lr": 0.1, "lr_decay": 0.1, "weight_decay": 0.1}),
    ("Adadelta", {"lr": 1.0, "weight_decay": 0.1}),
    ("RAdam", {"lr": 0.01, "weight_decay": 0.1, "betas": (0.9, 0.6)}),
    ("Lion", {"lr": 0.01, "weight_decay": 0.1, "maximize": True}),
    ("Rprop", {"lr": 0.01, "etas": (0.4, 1.3)}),
    ("Adamax", {"lr": 0.01, "weight_decay": 0.1, "maximize": True}),
    ("NAdam", {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True}),
    ("ASGD", {"lr": 0.01, "t0": 1.0, "weight_decay": 0.1}),
]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("name", "kwargs"), BIG_COMBOS, ids=[n for n, _ in BIG_COMBOS])
def test_big_param(name, kwargs, dtype, rng):
    groups = [{"params": [random_array(rng, (BIG,), dtype)]}]
    run_side_by_side(name, groups, steps=3, rng=rng, compare_every=3, **kwargs)


LONG_COMBOS = [
    ("SGD", {"lr": 0.01, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}),
    ("SGD", {"lr": 0.01, "momentum": 0.9, "nesterov": True}),
    ("Adam", {"lr": 0.01, "weight_decay": 0.01}),
    ("Adam", {"lr": 0.01, "amsgrad": True, "maximize": True}),
    ("AdamW", {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True}),
    ("RMSprop", {"lr": 0.01, "momentum": 0.9, "centered": True}),
    ("RMSprop", {"lr": 0.001, "weight_decay": 0.01}),
    ("Adagrad", {"lr": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.1}),
    ("Adadelta", {"lr": 1.0, "rho": 0.95}),
    ("RAdam", {"lr": 0.01, "weight_decay": 0.01}),
    ("RAdam", {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True}),
    ("Lion", {"lr": 1e-3, "weight_decay": 0.1}),
    ("Rprop", {"lr": 0.01}),
    ("Adamax", {"lr": 0.01, "weight_decay": 0.01}),
    ("Adamax", {"lr": 0.002, "betas": (0.5, 0.99), "maximize": True}),
    ("NAdam", {"lr": 0.01, "weight_decay": 0.01}),
    ("NAdam", {"lr": 0.002, "momentum_decay": 0.01, "maximize": True}),
    ("ASGD", {"lr": 0.01, "t0": 50.0, "weight_decay": 0.01}),
    ("ASGD", {"lr": 0.05, "lambd": 0.01, "alpha": 0.5, "t0": 0.0, "maximize": True}),
]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    ("name", "kwargs"), LONG_COMBOS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(LONG_COMBOS)]
)
def test_long_run(name, kwargs, dtype, rng):
    groups = [{"params": [random_array(rng, s, dtype) for s in [(17,), (4099,), ()]]}]
    run_side_by_side(name, groups, steps=120, rng=rng, compare_every=10, **kwargs)


# Several param groups with different hyperparameters (constructor kwargs give the defaults).
MULTI_GROUP = {
    "SGD": (
        {"lr": 0.01, "momentum": 0.9},
        [{}, {"lr": 0.1, "momentum": 0.0}, {"weight_decay": 0.2, "nesterov": True}],
    ),
    "Adam": (
        {"lr": 0.01},
        [{}, {"lr": 0.05, "amsgrad": True}, {"betas": (0.5, 0.8), "weight_decay": 0.1}],
    ),
    "AdamW": (
        {"lr": 0.01},
        [{"weight_decay": 0.0}, {"lr": 0.05, "amsgrad": True, "maximize": True}, {"eps": 1e-3}],
    ),
    "RMSprop": (
        {"lr": 0.01},
        [{"centered": True}, {"momentum": 0.9, "alpha": 0.9}, {"weight_decay": 0.1}],
    ),
    "Adagrad": (
        {"lr": 0.1},
        [{"lr_decay": 0.1}, {"lr": 0.01, "eps": 1e-5}, {"weight_decay": 0.1, "maximize": True}],
    ),
    "Adadelta": (
        {"lr": 0.5},
        [{"rho": 0.5}, {"lr": 1.0, "eps": 1e-3}, {"weight_decay": 0.1, "maximize": True}],
    ),
    "RAdam": (
        {"lr": 0.01},
        [
            {"betas": (0.9, 0.5)},
            {"weight_decay": 0.1, "decoupled_weight_decay": True},
            {"weight_decay": 0.1, "maximize": True},
        ],
    ),
    "Lion": (
        {"lr": 0.01},
        [{"betas": (0.5, 0.9)}, {"lr": 0.001, "weight_decay": 0.5}, {"maximize": True}],
    ),
    "Rprop": (
        {"lr": 0.01},
        [{"etas": (0.3, 1.5)}, {"lr": 0.1, "step_sizes": (1e-3, 0.2)}, {"maximize": True}],
    ),
    "Adamax": (
        {"lr": 0.01},
        [{}, {"lr": 0.05, "betas": (0.5, 0.8)}, {"weight_decay": 0.1, "maximize": True}],
    ),
    "NAdam": (
        {"lr": 0.01},
        [
            {},
            {"lr": 0.05, "betas": (0.5, 0.8), "momentum_decay": 0.01},
            {"weight_decay": 0.1, "decoupled_weight_decay": True, "maximize": True},
        ],
    ),
    "ASGD": (
        {"lr": 0.01, "t0": 3.0},
        [{}, {"lr": 0.05, "lambd": 0.01, "t0": 1e6}, {"weight_decay": 0.1, "maximize": True}],
    ),
}


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_multiple_param_groups(name, rng):
    defaults, group_options = MULTI_GROUP[name]
    shapes = [[(7,), (3, 5)], [(17,)], [(), (33,)]]
    groups = [
        {"params": [random_array(rng, s, np.float32) for s in group_shapes], **options}
        for group_shapes, options in zip(shapes, group_options)
    ]
    run_side_by_side(name, groups, steps=10, rng=rng, **defaults)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_mixed_dtypes(name, rng):
    """float32 and float64 parameters in one optimizer (and in one group)."""
    groups = [
        {"params": [random_array(rng, (9,), np.float32), random_array(rng, (9,), np.float64)]},
        {"params": [random_array(rng, (5,), np.float64)], "lr": 0.05},
    ]
    run_side_by_side(name, groups, steps=6, rng=rng, **FULL_STATE_KWARGS[name])


def sometimes_none(rng, step, index, param):
    """Parameter 0 never gets a gradient; 1 only from step 3; 2 on even steps; 3 always."""
    g = random_array(rng, param.shape, param.dtype)
    if index == 0 or (index == 1 and step < 3) or (index == 2 and step % 2):
        return None
    return g


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_none_gradients(name, dtype, rng):
    """None = no gradient: parameter and state untouched, state not created (torch: grad None)."""
    groups = [
        {"params": [random_array(rng, s, dtype) for s in [(7,), (17,)]]},
        {"params": [random_array(rng, s, dtype) for s in [(3, 5), ()]], "lr": 0.05},
    ]
    pair = run_side_by_side(
        name, groups, steps=8, rng=rng, grad_fn=sometimes_none, **FULL_STATE_KWARGS[name]
    )
    never_stepped = pair.params[0]
    if name == "Adagrad":
        assert float(pair.opt.state[never_stepped]["step"]) == 0.0
    else:
        assert never_stepped not in pair.opt.state


# Hyperparameters changed between steps through param_groups, on both sides:
# {step: [(group_index, {key: value})]}
SCHEDULES = {
    "SGD": (
        {"lr": 0.01, "momentum": 0.9},
        {
            2: [(0, {"lr": 0.05}), (1, {"lr": 0.001})],
            4: [(0, {"momentum": 0.5, "weight_decay": 0.2})],
            6: [(1, {"dampening": 0.3, "maximize": True})],
            8: [(0, {"momentum": 0.0})],
            10: [(0, {"momentum": 0.9, "nesterov": True, "weight_decay": 0.0})],
        },
    ),
    "SGD_momentum_enabled_late": (
        {"lr": 0.01},
        {3: [(0, {"momentum": 0.9})], 6: [(1, {"momentum": 0.5, "dampening": 0.5})]},
    ),
    "Adam": (
        {"lr": 0.01},
        {
            2: [(0, {"lr": 0.001}), (1, {"betas": (0.5, 0.9)})],
            4: [(0, {"weight_decay": 0.1, "eps": 1e-4})],
            6: [(1, {"maximize": True, "decoupled_weight_decay": True, "weight_decay": 0.3})],
            9: [(0, {"betas": (0.0, 0.5), "lr": 0.1})],
        },
    ),
    "AdamW": (
        {"lr": 0.01, "amsgrad": True},
        {
            2: [(0, {"lr": 0.001}), (1, {"betas": (0.5, 0.9)})],
            5: [(0, {"weight_decay": 0.5, "maximize": True})],
            8: [(1, {"eps": 1e-3, "lr": 0.2})],
        },
    ),
    "RMSprop": (
        {"lr": 0.01, "momentum": 0.5, "centered": True},
        {
            2: [(0, {"lr": 0.001}), (1, {"alpha": 0.5})],
            4: [(0, {"momentum": 0.9, "weight_decay": 0.1})],
            6: [(1, {"momentum": 0.0, "eps": 1e-3, "maximize": True})],
            9: [(1, {"momentum": 0.3})],
        },
    ),
    "Adagrad": (
        {"lr": 0.1},
        {
            2: [(0, {"lr": 0.01}), (1, {"lr_decay": 0.5})],
            5: [(0, {"weight_decay": 0.1, "eps": 1e-3})],
            8: [(1, {"maximize": True, "lr": 0.3})],
        },
    ),
    "Adadelta": (
        {"lr": 0.5},
        {
            2: [(0, {"lr": 0.1}), (1, {"rho": 0.5})],
            5: [(0, {"weight_decay": 0.1, "eps": 1e-3})],
            8: [(1, {"maximize": True, "lr": 2.0})],
        },
    ),
    "RAdam": (
        {"lr": 0.01, "betas": (0.9, 0.5)},
        {
            2: [(0, {"lr": 0.001}), (1, {"betas": (0.5, 0.999)})],
            5: [(0, {"weight_decay": 0.1, "eps": 1e-4})],
            8: [(1, {"maximize": True, "decoupled_weight_decay": True, "weight_decay": 0.3})],
        },
    ),
    "Lion": (
        {"lr": 0.01},
        {
            2: [(0, {"lr": 0.001}), (1, {"betas": (0.5, 0.9)})],
            5: [(0, {"weight_decay": 0.5})],
            8: [(1, {"maximize": True, "lr": 0.1})],
        },
    ),
    "Rprop": (
        {"lr": 0.01},
        {
            2: [(0, {"lr": 0.5}), (1, {"etas": (0.3, 1.6)})],
            5: [(0, {"step_sizes": (1e-3, 0.05)})],
            8: [(1, {"maximize": True})],
        },
    ),
    "Adamax": (
        {"lr": 0.01},
        {
            2: [(0, {"lr": 0.001}), (1, {"betas": (0.5, 0.9)})],
            5: [(0, {"weight_decay": 0.1, "eps": 1e-3})],
            8: [(1, {"maximize": True, "lr": 0.3})],
        },
    ),
    "NAdam": (
        {"lr": 0.01},
        {
            2: [(0, {"lr": 0.001}), (1, {"betas": (0.5, 0.9)})],
            4: [(0, {"momentum_decay": 0.02})],
            5: [(0, {"weight_decay": 0.1, "eps": 1e-3})],
            7: [(1, {"weight_decay": 0.2, "decoupled_weight_decay": True})],
            8: [(1, {"maximize": True, "lr": 0.3})],
        },
    ),
    "ASGD": (
        {"lr": 0.01, "t0": 4.0},
        {
            2: [(0, {"lr": 0.05}), (1, {"lambd": 0.1, "alpha": 0.5})],
            5: [(0, {"weight_decay": 0.1, "t0": 1e6})],
            8: [(1, {"maximize": True, "lr": 0.3, "t0": 0.0})],
        },
    ),
}


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", sorted(SCHEDULES))
def test_hyperparameters_changed_between_steps(case, dtype, rng):
    name = case.split("_")[0]
    kwargs, schedule = SCHEDULES[case]
    groups = [
        {"params": [random_array(rng, s, dtype) for s in [(7,), (33,)]]},
        {"params": [random_array(rng, (3, 5), dtype)]},
    ]
    run_side_by_side(name, groups, steps=12, rng=rng, schedule=schedule, **kwargs)


def nonfinite_grads(rng, step, index, param):
    """Normal gradients, except at step 2 where some entries are nan, +inf and -inf."""
    g = random_array(rng, param.shape, param.dtype)
    if step == 2 and g.size >= 20:
        g[[1, 9, 18]] = [np.nan, np.inf, -np.inf]
    return g


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("name", "cid", "kwargs"), COMBOS, ids=COMBO_IDS)
def test_nonfinite_gradients_propagate_like_torch(name, cid, kwargs, dtype, rng):
    groups = [{"params": [random_array(rng, (37,), dtype), random_array(rng, (7,), dtype)]}]
    run_side_by_side(name, groups, steps=5, rng=rng, grad_fn=nonfinite_grads, **kwargs)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_zero_and_tiny_gradients(name, dtype, rng):
    """Exact zeros and subnormal-sized gradients (Adagrad/RMSprop/Adam denominators near eps)."""

    def grad_fn(rng, step, index, param):
        g = random_array(rng, param.shape, param.dtype)
        g[::3] = 0
        g[1::3] *= 1e-30 if param.dtype == np.float64 else 1e-20
        return g

    groups = [{"params": [random_array(rng, (65,), dtype)]}]
    run_side_by_side(name, groups, steps=6, rng=rng, grad_fn=grad_fn, **FULL_STATE_KWARGS[name])
