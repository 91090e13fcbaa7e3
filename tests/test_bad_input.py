"""Bad input at construction and at step(): the right exception, a message naming the offender,
and nothing modified (parameters, state buffers, state keys, step counts, param_groups)."""

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
    OPTIMIZER_NAMES,
    SCALAR_KEYS,
    assert_bitwise_equal_params,
    assert_bitwise_equal_state,
    assert_message,
    assert_snapshot_equal,
    flat_params,
    index_pattern,
    optirs_class,
    random_array,
    snapshot,
    torch_class,
    torch_constructor_error,
)
from optirs._spec import SPECS

# The step-input tests run over the rule table's optimizers and Adafactor (its own entry point,
# `_core.step_adafactor`, with the same validation).
STEP_NAMES = (*OPTIMIZER_NAMES, "Adafactor")
# Adafactor's options with every state entry of its parameters: all it has.
KWARGS = {**FULL_STATE_KWARGS, "Adafactor": {"lr": 0.05, "weight_decay": 0.1}}

ALIAS = r"alias|overlap|share|same memory|same array|same buffer"
CONTIGUOUS = r"contiguous"
DTYPE = r"dtype|float"
SHAPE = r"shape"
READONLY = r"writeable|writable|read-only|readonly|read only"
NOT_ARRAY = r"ndarray|array|type"
ALIGN = r"align|contiguous"


# --------------------------------------------------------------------------------------------
# step(): the setup
# --------------------------------------------------------------------------------------------


# flat index -> (group, index in group) of the Setup parameters
LOCATIONS = {0: (0, 0), 1: (0, 1), 2: (1, 0), 3: (1, 1)}


class Setup:
    """Four parameters in two groups, after two good steps (so every state buffer exists).

    flat 0 = param_groups[0]['params'][0], shape (7,), a view into a bigger buffer ``bases[0]``
    flat 1 = param_groups[0]['params'][1], shape (3, 5)
    flat 2 = param_groups[1]['params'][0], shape (17,)
    flat 3 = param_groups[1]['params'][1], shape (7,), a view into a bigger buffer ``bases[3]``
    """

    def __init__(self, name: str, dtype, seed: int = 7) -> None:
        self.rng = np.random.default_rng(seed)
        rng = self.rng
        self.bases = {0: random_array(rng, (20,), dtype), 3: random_array(rng, (20,), dtype)}
        p0, p3 = self.bases[0][2:9], self.bases[3][2:9]
        p1, p2 = random_array(rng, (3, 5), dtype), random_array(rng, (17,), dtype)
        groups = [{"params": [p0, p1]}, {"params": [p2, p3], "lr": 0.02}]
        self.opt = optirs_class(name)(groups, **KWARGS[name])
        self.params = [p0, p1, p2, p3]
        self.name = name
        for _ in range(2):
            self.opt.step(self.grads())

    def grads(self) -> list[np.ndarray]:
        return [random_array(self.rng, p.shape, p.dtype) for p in self.params]


def other_float(dtype):
    return np.float64 if np.dtype(dtype) == np.float32 else np.float32


def non_contiguous(g):
    doubled = np.repeat(g.reshape(-1), 2).reshape(*g.shape[:-1], 2 * g.shape[-1])
    out = doubled[..., ::2]
    assert not out.flags.c_contiguous and np.array_equal(out, g)
    return out


def misaligned(g):
    """A C-contiguous copy of ``g`` whose data pointer is not aligned for its dtype."""
    raw = np.zeros(g.nbytes + 1, np.uint8)
    out = raw[1:].view(g.dtype).reshape(g.shape)
    out[...] = g
    assert not out.flags.aligned and out.flags.c_contiguous
    return out


def byteswapped(g):
    out = g.astype(g.dtype.newbyteorder("S"))
    assert not out.dtype.isnative and np.array_equal(out, g)
    return out


def state_buffer(setup: Setup, flat: int) -> np.ndarray:
    # The parameter's own entries: Adafactor's depend on its shape.
    state = setup.opt.state[setup.params[flat]]
    key = sorted(set(state) & FULL_STATE_KEYS.get(setup.name, set(state)) - {"step"})[0]
    return state[key]


def _set_readonly(s, grads, k):
    s.params[k].flags.writeable = False
    return grads


def _replace(make):
    """A case that replaces grads[k] by ``make(setup, grad, k)``."""

    def apply(s, grads, k):
        grads = list(grads)
        grads[k] = make(s, grads[k], k)
        return grads

    return apply


# (id, make bad grads, exception, keyword regex, positions to try)
# positions: flat indices of the bad entry; 3 is the last one (must not let 0..2 be modified).
STEP_CASES = [
    (
        "grad_other_float_dtype",
        _replace(lambda s, g, k: g.astype(other_float(g.dtype))),
        TypeError,
        DTYPE,
        (0, 3),
    ),
    ("grad_float16", _replace(lambda s, g, k: g.astype(np.float16)), TypeError, DTYPE, (0, 3)),
    ("grad_int32", _replace(lambda s, g, k: g.astype(np.int32)), TypeError, DTYPE, (0, 3)),
    ("grad_int64", _replace(lambda s, g, k: g.astype(np.int64)), TypeError, DTYPE, (0, 3)),
    ("grad_bool", _replace(lambda s, g, k: g > 0), TypeError, DTYPE, (0, 3)),
    ("grad_complex", _replace(lambda s, g, k: g.astype(np.complex128)), TypeError, DTYPE, (0, 3)),
    ("grad_byteswapped", _replace(lambda s, g, k: byteswapped(g)), TypeError, DTYPE, (0, 3)),
    ("grad_misaligned", _replace(lambda s, g, k: misaligned(g)), ValueError, ALIGN, (0, 3)),
    ("grad_list", _replace(lambda s, g, k: g.tolist()), TypeError, NOT_ARRAY, (0, 3)),
    ("grad_python_float", _replace(lambda s, g, k: 1.0), TypeError, NOT_ARRAY, (0, 3)),
    (
        "grad_torch_tensor",
        _replace(lambda s, g, k: torch.from_numpy(g)),
        TypeError,
        NOT_ARRAY,
        (0, 3),
    ),
    (
        "grad_shape_longer",
        _replace(lambda s, g, k: np.zeros(g.size + 1, g.dtype)),
        ValueError,
        SHAPE,
        (0, 2, 3),
    ),
    (
        "grad_shape_same_size",
        _replace(lambda s, g, k: g.reshape(*g.shape, 1)),
        ValueError,
        SHAPE,
        (0, 1, 3),
    ),
    ("grad_shape_flattened", _replace(lambda s, g, k: g.reshape(-1)), ValueError, SHAPE, (1,)),
    (
        "grad_non_contiguous",
        _replace(lambda s, g, k: non_contiguous(g)),
        ValueError,
        CONTIGUOUS,
        (0, 1, 3),
    ),
    (
        "grad_fortran_order",
        _replace(lambda s, g, k: np.asfortranarray(g)),
        ValueError,
        CONTIGUOUS,
        (1,),
    ),
    ("grad_is_its_param", _replace(lambda s, g, k: s.params[k]), ValueError, ALIAS, (0, 2, 3)),
    ("grad_is_another_param", _replace(lambda s, g, k: s.params[3 - k]), ValueError, ALIAS, (0, 3)),
    (
        "grad_same_memory_as_param",
        _replace(lambda s, g, k: s.bases[k][2:9]),
        ValueError,
        ALIAS,
        (0, 3),
    ),
    ("grad_overlaps_param", _replace(lambda s, g, k: s.bases[k][5:12]), ValueError, ALIAS, (0, 3)),
    (
        "grad_is_its_state_buffer",
        _replace(lambda s, g, k: state_buffer(s, k)),
        ValueError,
        ALIAS,
        (0, 2, 3),
    ),
    (
        "grad_is_another_state_buffer",
        _replace(lambda s, g, k: state_buffer(s, 3 - k)),
        ValueError,
        ALIAS,
        (0, 3),
    ),
    ("param_read_only", _set_readonly, ValueError, READONLY, (0, 2, 3)),
]


def _step_case_params():
    for cid, make, exc, keyword, positions in STEP_CASES:
        for k in positions:
            yield pytest.param(make, exc, keyword, k, id=f"{cid}-at{k}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", STEP_NAMES)
@pytest.mark.parametrize(("make_bad", "exc", "keyword", "k"), list(_step_case_params()))
def test_bad_step_input(make_bad, exc, keyword, k, name, dtype):
    s = Setup(name, dtype)
    good = s.grads()
    bad = make_bad(s, good, k)
    before = snapshot(s.opt)

    with pytest.raises(exc) as excinfo:
        s.opt.step(bad)

    assert_message(excinfo, keyword, index_pattern(k, *LOCATIONS[k]))
    for p in s.params:
        p.flags.writeable = True
    assert_snapshot_equal(before, snapshot(s.opt))
    assert_continues_like_untouched_twin(s, name, dtype, good)


def assert_continues_like_untouched_twin(s: Setup, name, dtype, next_grads) -> None:
    """After the failed step, training continues bitwise like a run that never saw it."""
    twin = Setup(name, dtype)
    twin.grads()  # keep the twin's rng in step with ``s`` (which drew ``next_grads``)
    grads = next_grads
    for _ in range(3):
        s.opt.step([g.copy() for g in grads])
        twin.opt.step([g.copy() for g in grads])
        grads = s.grads()
    assert_bitwise_equal_params(s.params, twin.params)
    assert_bitwise_equal_state(s.opt, twin.opt)


@pytest.mark.parametrize("name", STEP_NAMES)
@pytest.mark.parametrize("delta", [-1, 1, -4], ids=["one_too_few", "one_too_many", "none"])
def test_wrong_number_of_grads(name, delta):
    s = Setup(name, np.float32)
    grads = s.grads()
    extra = [np.zeros(3, np.float32)] * max(delta, 0)
    bad = grads[: len(grads) + min(delta, 0)] + extra
    before = snapshot(s.opt)
    with pytest.raises(ValueError) as excinfo:
        s.opt.step(bad)
    # The message gives the expected count (4) and the count received.
    assert_message(excinfo, r"grad", r"\b4\b", rf"\b{len(bad)}\b")
    assert_snapshot_equal(before, snapshot(s.opt))
    assert_continues_like_untouched_twin(s, name, np.float32, grads)


@pytest.mark.parametrize("name", STEP_NAMES)
def test_all_none_grads_change_nothing(name):
    s = Setup(name, np.float64)
    before = snapshot(s.opt)
    assert s.opt.step([None] * 4) is None
    assert_snapshot_equal(before, snapshot(s.opt))


@pytest.mark.parametrize("name", STEP_NAMES)
def test_same_grad_array_for_two_params_is_fine(name):
    """Grads are only read: one array may serve as the gradient of two parameters."""
    s, twin = Setup(name, np.float32), Setup(name, np.float32)
    grads = s.grads()
    twin.grads()
    shared = grads[0]
    s.opt.step([shared, grads[1], grads[2], shared])
    twin.opt.step([shared.copy(), grads[1].copy(), grads[2].copy(), shared.copy()])
    assert_bitwise_equal_params(s.params, twin.params)
    assert_bitwise_equal_state(s.opt, twin.opt)


# --------------------------------------------------------------------------------------------
# step(): invalid hyperparameters written into param_groups
# --------------------------------------------------------------------------------------------


def case_id(name, values):
    return "-".join([name, *(f"{k}={v}" for k, v in values.items())])


INVALID_GROUP_VALUES = [
    ("SGD", {"lr": -1.0}),
    ("SGD", {"momentum": -0.5}),
    ("SGD", {"weight_decay": -0.1}),
    ("SGD", {"nesterov": True, "dampening": 0.5}),
    ("SGD", {"nesterov": True, "momentum": 0.0}),
    ("Adam", {"lr": -1.0}),
    ("Adam", {"eps": -1e-08}),
    ("Adam", {"betas": (1.0, 0.999)}),
    ("Adam", {"betas": (0.9, 1.0)}),
    ("Adam", {"betas": (-0.1, 0.999)}),
    ("Adam", {"weight_decay": -0.1}),
    ("AdamW", {"lr": -0.001}),
    ("AdamW", {"betas": (0.9, 1.5)}),
    ("AdamW", {"weight_decay": -0.01}),
    ("RMSprop", {"lr": -1.0}),
    ("RMSprop", {"eps": -1.0}),
    ("RMSprop", {"momentum": -0.9}),
    ("RMSprop", {"weight_decay": -0.1}),
    ("RMSprop", {"alpha": -0.5}),
    ("Adagrad", {"lr": -1.0}),
    ("Adagrad", {"lr_decay": -0.5}),
    ("Adagrad", {"weight_decay": -0.1}),
    ("Adagrad", {"eps": -1e-10}),
    ("Adadelta", {"lr": -1.0}),
    ("Adadelta", {"rho": 1.5}),
    ("Adadelta", {"eps": -1e-6}),
    ("Adadelta", {"weight_decay": -0.1}),
    ("RAdam", {"lr": -1.0}),
    ("RAdam", {"eps": -1e-8}),
    ("RAdam", {"betas": (1.0, 0.999)}),
    ("RAdam", {"betas": (0.9, 1.0)}),
    ("RAdam", {"weight_decay": -0.1}),
    ("Rprop", {"lr": -1.0}),
    ("Rprop", {"etas": (1.0, 1.2)}),
    ("Rprop", {"etas": (0.5, 1.0)}),
    ("Rprop", {"etas": (0.0, 1.2)}),
]


@pytest.mark.parametrize("group", [0, 1])
@pytest.mark.parametrize(
    ("name", "values"),
    INVALID_GROUP_VALUES,
    ids=[case_id(n, v) for n, v in INVALID_GROUP_VALUES],
)
def test_invalid_hyperparameter_in_param_groups(name, values, group):
    expected = torch_constructor_error(name, **values)
    assert expected is not None
    s = Setup(name, np.float32)
    grads = s.grads()
    saved = {key: s.opt.param_groups[group][key] for key in values}
    s.opt.param_groups[group].update(values)
    before = snapshot(s.opt)

    with pytest.raises(ValueError) as excinfo:
        s.opt.step(grads)

    assert str(excinfo.value) == expected
    assert_snapshot_equal(before, snapshot(s.opt))
    s.opt.param_groups[group].update(saved)
    assert_continues_like_untouched_twin(s, name, np.float32, grads)


# --------------------------------------------------------------------------------------------
# construction
# --------------------------------------------------------------------------------------------

INVALID_CONSTRUCTOR_VALUES = [
    *INVALID_GROUP_VALUES,
    ("SGD", {"lr": -1}),
    ("SGD", {"lr": -1e-10}),
    ("SGD", {"momentum": -2.5}),
    ("Adam", {"lr": float("nan")}),
    ("Adam", {"eps": -1e-10}),
    ("Adam", {"betas": (0.9, -0.5)}),
    ("AdamW", {"betas": (1.0, 0.999)}),
    ("AdamW", {"eps": -0.5}),
    ("RMSprop", {"alpha": -1e-3}),
    ("Adagrad", {"initial_accumulator_value": -1.0}),
    ("Adagrad", {"initial_accumulator_value": -0.25}),
    ("Adagrad", {"lr_decay": -1e-9}),
    ("Adadelta", {"rho": -0.1}),
    ("RAdam", {"betas": (0.9, -0.5)}),
    ("Rprop", {"etas": (1.5, 0.5)}),
]


@pytest.mark.parametrize(
    ("name", "kwargs"),
    INVALID_CONSTRUCTOR_VALUES,
    ids=[case_id(n, v) for n, v in INVALID_CONSTRUCTOR_VALUES],
)
def test_invalid_constructor_hyperparameter_uses_torch_message(name, kwargs):
    expected = torch_constructor_error(name, **kwargs)
    assert expected is not None
    p = np.zeros(3, np.float32)
    with pytest.raises(ValueError) as excinfo:
        optirs_class(name)([p], **kwargs)
    assert str(excinfo.value) == expected


NUMERIC_HYPERPARAMETERS = {
    "SGD": ("lr", "momentum", "dampening", "weight_decay"),
    "Adam": ("lr", "betas[0]", "betas[1]", "eps", "weight_decay"),
    "AdamW": ("lr", "betas[0]", "betas[1]", "eps", "weight_decay"),
    "RMSprop": ("lr", "alpha", "eps", "weight_decay", "momentum"),
    "Adagrad": ("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps"),
    "Adadelta": ("lr", "rho", "eps", "weight_decay"),
    "RAdam": ("lr", "betas[0]", "betas[1]", "eps", "weight_decay"),
    "Rprop": ("lr", "etas[0]", "etas[1]"),
}
EDGE_VALUES = (-1.0, -0.0, float("nan"), float("inf"), float("-inf"), 1.0, 5e-324)


def _edge_cases():
    for name, keys in NUMERIC_HYPERPARAMETERS.items():
        for key in keys:
            for value in EDGE_VALUES:
                if key.endswith("]"):  # one of a pair (betas, etas): the other at its default
                    pair_name, index = key[:-3], int(key[-2])
                    pair = list(SPECS[name].defaults[pair_name])
                    pair[index] = value
                    kwargs = {pair_name: tuple(pair)}
                else:
                    kwargs = {key: value}
                yield pytest.param(name, kwargs, id=f"{name}-{key}={value}")


# Lion has no torch.optim class to compare with: its checks in torch's words, and what they
# accept (lion-pytorch's betas in [0, 1]; torch's lr >= 0).
LION_REFUSED = [
    ({"lr": -1e-4}, "Invalid learning rate: -0.0001"),
    ({"lr": float("nan")}, "Invalid learning rate: nan"),
    ({"betas": (1.5, 0.99)}, "Invalid beta parameter at index 0: 1.5"),
    ({"betas": (0.9, -0.1)}, "Invalid beta parameter at index 1: -0.1"),
    ({"betas": (0.9, float("nan"))}, "Invalid beta parameter at index 1: nan"),
    ({"weight_decay": -0.5}, "Invalid weight_decay value: -0.5"),
]


@pytest.mark.parametrize("api", ["numpy", "torch"])
@pytest.mark.parametrize(("kwargs", "message"), LION_REFUSED, ids=[m for _, m in LION_REFUSED])
def test_lion_constructor_refuses_in_torchs_words(kwargs, message, api):
    import optirs.torch

    cls, p = (
        (optirs.Lion, np.zeros(3, np.float32))
        if api == "numpy"
        else (optirs.torch.Lion, torch.zeros(3))
    )
    with pytest.raises(ValueError) as excinfo:
        cls([p], **kwargs)
    assert str(excinfo.value) == message
    for ok in ({"lr": 0.0}, {"betas": (0.0, 1.0)}, {"betas": (1.0, 0.0)}, {"weight_decay": 0.0}):
        cls([p], **ok)
    with pytest.raises(TypeError, match="betas"):
        cls([p], betas=0.9)


@pytest.mark.parametrize(("name", "kwargs"), list(_edge_cases()))
def test_constructor_validation_matches_torch(name, kwargs):
    """Accepted exactly when torch accepts; otherwise torch's ValueError message."""
    expected = torch_constructor_error(name, **kwargs)
    if expected is None:
        optirs_class(name)([np.zeros(3, np.float32)], **kwargs)
        return
    with pytest.raises(ValueError) as excinfo:
        optirs_class(name)([np.zeros(3, np.float32)], **kwargs)
    assert str(excinfo.value) == expected


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
@pytest.mark.parametrize("value", [None, "0.1", [0.1]], ids=["none", "str", "list"])
def test_non_numeric_hyperparameter_in_param_groups(name, value):
    s = Setup(name, np.float32)
    grads = s.grads()
    s.opt.param_groups[1]["lr"] = value
    before = snapshot(s.opt)
    with pytest.raises((TypeError, ValueError)) as excinfo:
        s.opt.step(grads)
    assert_message(excinfo, "lr")
    assert_snapshot_equal(before, snapshot(s.opt))
    s.opt.param_groups[1]["lr"] = 0.02
    assert_continues_like_untouched_twin(s, name, np.float32, grads)


CONSTRUCTOR_TYPE_ERRORS = [
    ("bare_ndarray", lambda: np.zeros(3, np.float32)),
    ("set", lambda: {1.0, 2.0}),
    ("python_float_param", lambda: [1.0]),
    ("list_param", lambda: [[1.0, 2.0, 3.0]]),
    ("torch_tensor_param", lambda: [torch.zeros(3)]),
    ("none_param", lambda: [None]),
    ("int32_param", lambda: [np.zeros(3, np.int32)]),
    ("int64_param", lambda: [np.zeros(3, np.int64)]),
    ("bool_param", lambda: [np.zeros(3, bool)]),
    ("complex64_param", lambda: [np.zeros(3, np.complex64)]),
    ("complex128_param", lambda: [np.zeros(3, np.complex128)]),
    ("float16_param", lambda: [np.zeros(3, np.float16)]),
    ("int_param_in_group", lambda: [{"params": [np.zeros(3), np.zeros(3, np.int32)]}]),
]


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
@pytest.mark.parametrize(
    "make_params",
    [m for _, m in CONSTRUCTOR_TYPE_ERRORS],
    ids=[i for i, _ in CONSTRUCTOR_TYPE_ERRORS],
)
def test_constructor_type_errors(name, make_params):
    with pytest.raises(TypeError):
        optirs_class(name)(make_params())


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
@pytest.mark.parametrize(
    "make_params", [lambda: [], lambda: iter(()), lambda: ()], ids=["list", "iterator", "tuple"]
)
def test_empty_parameter_list(name, make_params):
    with pytest.raises(ValueError, match=r"^optimizer got an empty parameter list$"):
        optirs_class(name)(make_params())


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_same_param_in_two_groups(name):
    a, b = np.zeros(3), np.zeros(4)
    with pytest.raises(ValueError) as excinfo:
        optirs_class(name)([{"params": [a]}, {"params": [b, a]}])
    assert str(excinfo.value) == "some parameters appear in more than one parameter group"


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_same_param_twice_in_one_group(name):
    a, b = np.zeros(3), np.zeros(4)
    with pytest.raises(ValueError) as excinfo:
        optirs_class(name)([a, b, a])
    assert_message(excinfo, r"more than one|duplicate|twice|appear|alias|same")


def _overlapping_views():
    base = np.arange(20, dtype=np.float32)
    return base, [base[:10], base[5:15]]


def _identical_views():
    base = np.arange(20, dtype=np.float64)
    return base, [base[:10], base[:10].view()]


def _reshaped_view():
    base = np.arange(20, dtype=np.float64)
    return base, [base, base.reshape(4, 5)]


def _non_contiguous_param():
    base = np.arange(20, dtype=np.float32)
    return base, [np.zeros(3, np.float32), base[::2]]


def _fortran_param():
    base = np.asfortranarray(np.arange(15, dtype=np.float64).reshape(3, 5))
    return base, [base]


def _read_only_param():
    base = np.arange(5, dtype=np.float32)
    base.flags.writeable = False
    return base, [np.zeros(2, np.float32), base]


def _misaligned_param():
    base = misaligned(np.arange(6, dtype=np.float64))
    return base, [np.zeros(2), base]


BAD_PARAM_LAYOUTS = [
    ("misaligned", _misaligned_param, ALIGN),
    ("overlapping_views", _overlapping_views, ALIAS),
    ("identical_views", _identical_views, ALIAS),
    ("reshaped_view_of_same_memory", _reshaped_view, ALIAS),
    ("non_contiguous", _non_contiguous_param, CONTIGUOUS),
    ("fortran_order", _fortran_param, CONTIGUOUS),
    ("read_only", _read_only_param, READONLY),
]


@pytest.mark.parametrize("name", STEP_NAMES)
@pytest.mark.parametrize(
    ("make", "keyword"),
    [(m, kw) for _, m, kw in BAD_PARAM_LAYOUTS],
    ids=[i for i, _, _ in BAD_PARAM_LAYOUTS],
)
def test_bad_param_layout(name, make, keyword):
    """Refused with ValueError at construction or, at the latest, at the first step()."""
    base, params = make()
    original = base.tobytes()
    with pytest.raises(ValueError) as excinfo:
        opt = optirs_class(name)(params, **KWARGS[name])
        opt.step([np.ones(p.shape, p.dtype) for p in params])
    assert_message(excinfo, keyword)
    assert base.tobytes() == original


@pytest.mark.parametrize("name", STEP_NAMES)
@pytest.mark.parametrize(
    ("param_shape", "grad_shape"),
    [((), (1,)), ((1,), ()), ((1, 1), (1,)), ((0,), (0, 1)), ((2, 3), (3, 2))],
    ids=["0d_vs_1", "1_vs_0d", "1x1_vs_1", "empty_vs_0x1", "2x3_vs_3x2"],
)
def test_shapes_must_match_exactly(name, param_shape, grad_shape):
    p = np.ones(param_shape, np.float32)
    opt = optirs_class(name)([p], **KWARGS[name])
    before = snapshot(opt)
    with pytest.raises(ValueError) as excinfo:
        opt.step([np.ones(grad_shape, np.float32)])
    assert_message(excinfo, SHAPE, index_pattern(0, 0, 0))
    assert_snapshot_equal(before, snapshot(opt))


@pytest.mark.parametrize("name", STEP_NAMES)
def test_adjacent_non_overlapping_views_are_fine(name):
    base = np.linspace(-1, 1, 20)
    views = [base[:10], base[10:]]
    separate = [base[:10].copy(), base[10:].copy()]
    opt = optirs_class(name)(views, **KWARGS[name])
    ref = optirs_class(name)(separate, **KWARGS[name])
    rng = np.random.default_rng(3)
    for _ in range(3):
        grads = [random_array(rng, (10,), np.float64) for _ in range(2)]
        opt.step(grads)
        ref.step([g.copy() for g in grads])
    assert_bitwise_equal_params(views, separate)
    assert_bitwise_equal_state(opt, ref)


# --------------------------------------------------------------------------------------------
# load_state_dict with a bad state buffer
# --------------------------------------------------------------------------------------------


def _wrong_shape(value):
    return np.zeros(value.size + 1, value.dtype)


def _none(value):
    return None


def _extra_axis(value):
    return np.zeros((*value.shape, 1), value.dtype)


BAD_BUFFERS = [
    ("wrong_shape", _wrong_shape, ValueError),
    ("extra_axis", _extra_axis, ValueError),
    ("zero_d", lambda v: np.zeros((), v.dtype), ValueError),
    ("complex_dtype", lambda v: v.astype(np.complex128), (TypeError, ValueError)),
    ("int_dtype", lambda v: v.astype(np.int32), (TypeError, ValueError)),
    ("bool_dtype", lambda v: v > 0, (TypeError, ValueError)),
    ("string", lambda v: "not an array", (TypeError, ValueError)),
    ("none", _none, (TypeError, ValueError)),
]


@pytest.mark.parametrize(
    ("name", "corrupt", "exc"),
    [
        pytest.param(name, c, e, id=f"{i}-{name}")
        for i, c, e in BAD_BUFFERS
        for name in OPTIMIZER_NAMES
        # torch's SGD reads momentum_buffer=None as 'no buffer yet': accepted, see
        # test_state_dict.py::test_load_accepts_sgd_without_momentum_buffer
        if not (name == "SGD" and c is _none)
    ],
)
def test_load_state_dict_refuses_bad_buffer(name, corrupt, exc):
    """The bad buffer belongs to the LAST parameter: nothing before it may be loaded either."""
    source = Setup(name, np.float32, seed=11)
    for _ in range(3):
        source.opt.step(source.grads())
    sd = source.opt.state_dict()
    for group in sd["param_groups"]:
        group["lr"] = 0.123  # so that a partially applied load would show
    key = sorted(BUFFER_KEYS[name])[-1]
    sd["state"][3][key] = corrupt(sd["state"][3][key])

    target = Setup(name, np.float32)
    before = snapshot(target.opt)
    with pytest.raises(exc):
        target.opt.load_state_dict(sd)
    assert_snapshot_equal(before, snapshot(target.opt))
    assert all(g["lr"] != 0.123 for g in target.opt.param_groups)
    assert len(flat_params(target.opt)) == 4


@pytest.mark.parametrize(
    ("name", "values"),
    [
        ("SGD", {"lr": 1e300}),
        ("Adam", {"weight_decay": 1e300}),
        ("RMSprop", {"lr": 1e300}),
        ("Adagrad", {"lr": 1e300}),
    ],
    ids=["SGD-lr", "Adam-weight_decay", "RMSprop-lr", "Adagrad-lr"],
)
def test_scalar_out_of_float32_range_raises_like_torchs_step(name, values):
    """torch's constructor takes these; its step refuses to hand a float32 tensor operation a
    scalar beyond float32's range (RuntimeError). The NumPy API raises the same, changing
    nothing; in float64 the value fits and both step."""
    theirs = torch.nn.Parameter(torch.ones(5))
    topt = torch_class(name)([theirs], **values)
    theirs.grad = torch.ones(5)
    with pytest.raises(RuntimeError) as expected:
        topt.step()
    params = [np.ones(5, np.float32)]
    opt = optirs_class(name)(params, **values)
    before = snapshot(opt)
    with pytest.raises(RuntimeError) as got:
        opt.step([np.ones(5, np.float32)])
    assert str(got.value).startswith(f"{expected.value}: "), str(got.value)
    assert f"['{next(iter(values))}']" in str(got.value)
    assert_snapshot_equal(before, snapshot(opt))
    wide = optirs_class(name)([np.ones(5)], **values)
    wide.step([np.ones(5)])


# --------------------------------------------------------------------------------------------
# 0-d state besides step (NAdam's mu_product, ASGD's eta and mu)
# --------------------------------------------------------------------------------------------

SCALAR_CASES = [(name, key) for name in OPTIMIZER_NAMES for key in sorted(SCALAR_KEYS[name])]
BAD_SCALARS = [
    ("not_0d", lambda v: np.zeros(3, v.dtype), TypeError, "0-d"),
    ("integer", lambda v: np.zeros((), np.int32), TypeError, "0-d floating-point"),
    ("read_only", lambda v: _read_only(v), ValueError, "read-only"),
]


def _read_only(v):
    out = v.copy()
    out.flags.writeable = False
    return out


@pytest.mark.parametrize(
    ("cid", "make", "exc", "keyword"), BAD_SCALARS, ids=[c[0] for c in BAD_SCALARS]
)
@pytest.mark.parametrize(("name", "key"), SCALAR_CASES, ids=[f"{n}-{k}" for n, k in SCALAR_CASES])
def test_bad_scalar_state_is_refused_naming_it(name, key, cid, make, exc, keyword):
    s = Setup(name, np.float32)
    good = s.grads()
    entry = s.opt.state[s.params[2]]
    saved = entry[key]
    entry[key] = make(saved)
    before = snapshot(s.opt)
    with pytest.raises(exc) as excinfo:
        s.opt.step(good)
    message = str(excinfo.value)
    assert f"state['{key}']" in message and keyword in message, message
    assert "param_groups[1]['params'][0]" in message, message
    assert_snapshot_equal(before, snapshot(s.opt))
    entry[key] = saved
    assert_continues_like_untouched_twin(s, name, np.float32, good)


@pytest.mark.parametrize(("name", "key"), SCALAR_CASES, ids=[f"{n}-{k}" for n, k in SCALAR_CASES])
def test_bridge_refuses_bad_scalar_state_naming_it(name, key):
    import optirs.torch

    p = torch.nn.Parameter(torch.randn(5))
    opt = getattr(optirs.torch, name)([p], **FULL_STATE_KWARGS[name])
    p.grad = torch.randn(5)
    opt.step()
    opt.state[p][key] = torch.zeros(3)
    before = p.detach().clone()
    with pytest.raises(TypeError, match=rf"state\['{key}'\].*0-d"):
        opt.step()
    assert torch.equal(p.detach(), before)
    opt.state[p][key] = 1.5  # not a tensor
    with pytest.raises(TypeError, match=rf"state\['{key}'\]"):
        opt.step()
    assert torch.equal(p.detach(), before)
    del opt.state[p][key]
    with pytest.raises(ValueError, match=rf"state\['{key}'\].*missing"):
        opt.step()
    assert torch.equal(p.detach(), before)


@pytest.mark.parametrize(("name", "key"), SCALAR_CASES, ids=[f"{n}-{k}" for n, k in SCALAR_CASES])
def test_load_state_dict_refuses_bad_scalar_state(name, key):
    source = Setup(name, np.float32)
    sd = source.opt.state_dict()
    sd["state"][3][key] = np.zeros(2, np.float32)
    target = Setup(name, np.float32, seed=8)
    before = snapshot(target.opt)
    with pytest.raises(TypeError, match=rf"state\[3\]\['{key}'\].*0-d"):
        target.opt.load_state_dict(sd)
    assert_snapshot_equal(before, snapshot(target.opt))
