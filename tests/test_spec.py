"""The optimizers' declarations (``optirs._spec``) against torch.optim itself.

Both APIs build their constructors and state from these declarations, and the other tests take
their per-optimizer tables from them; so here every declared fact is checked against what the
installed torch.optim does: its signature, its defaults, the state keys it creates for each
configuration, and how it fills a new buffer.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import optirs
import optirs.torch
import pytest
import torch
from conftest import FULL_STATE_KWARGS, TORCH_ONLY_GROUP_KEYS, torch_class
from optirs._spec import SPECS

# Configurations that switch each optional buffer on and off.
CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("SGD", {}),
    ("SGD", {"momentum": 0.9}),
    ("SGD", {"momentum": 0.9, "nesterov": True}),
    ("Adam", {}),
    ("Adam", {"amsgrad": True}),
    ("AdamW", {}),
    ("AdamW", {"amsgrad": True}),
    ("RMSprop", {}),
    ("RMSprop", {"momentum": 0.5}),
    ("RMSprop", {"centered": True}),
    ("RMSprop", {"momentum": 0.5, "centered": True}),
    ("Adagrad", {}),
    ("Adagrad", {"initial_accumulator_value": 0.25}),
    ("Adadelta", {}),
    ("RAdam", {}),
    ("RAdam", {"decoupled_weight_decay": True, "weight_decay": 0.1}),
    ("Lion", {}),
    ("Rprop", {}),
    ("Rprop", {"lr": 0.25}),
    ("Adamax", {}),
    ("Adamax", {"weight_decay": 0.1, "maximize": True}),
    ("NAdam", {}),
    ("NAdam", {"weight_decay": 0.1, "decoupled_weight_decay": True}),
    ("ASGD", {}),
    ("ASGD", {"lr": 0.05, "t0": 0.0, "weight_decay": 0.1}),
]

#: The optimizers torch.optim has; the others (Lion) are checked against the tests' reference
#: (conftest.torch_class) and their own documented signature.
IN_TORCH = [name for name, spec in SPECS.items() if spec.in_torch]


def _torch_state(name: str, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """torch.optim's state of a parameter after one step, and its param group."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch_class(name)([p], foreach=False, **kwargs)
    p.grad = torch.full((3,), 0.5)
    opt.step()
    state = {k: v for k, v in opt.state[p].items() if v is not None}
    return state, opt.param_groups[0]


def test_every_optimizer_is_declared_once_and_exported() -> None:
    assert list(SPECS) == [
        *("SGD", "Adam", "AdamW", "RMSprop", "Adagrad"),
        *("Adadelta", "RAdam", "Lion", "Rprop"),
        *("Adamax", "NAdam", "ASGD"),
    ]
    assert [n for n in SPECS if not SPECS[n].in_torch] == ["Lion"]
    assert not hasattr(torch.optim, "Lion")
    for name, spec in SPECS.items():
        assert spec.name == name
        assert getattr(optirs, name)._spec is spec
        assert getattr(optirs.torch, name)._spec is spec


def test_adamw_is_adam_with_decoupled_weight_decay() -> None:
    adam, adamw = SPECS["Adam"], SPECS["AdamW"]
    assert (adamw.kind, adamw.state, adamw.validate) == (adam.kind, adam.state, adam.validate)
    assert adamw.defaults == {**adam.defaults, "weight_decay": 1e-2, "decoupled_weight_decay": True}


@pytest.mark.parametrize("name", IN_TORCH)
def test_declared_arguments_are_torchs(name: str) -> None:
    """Names, order, kinds and defaults of torch's constructor; torch's switches marked."""
    spec = SPECS[name]
    theirs = list(inspect.signature(getattr(torch.optim, name).__init__).parameters.values())[2:]
    assert [(p.name, p.default, p.kind == p.KEYWORD_ONLY) for p in theirs] == [
        (p.name, p.default, p.keyword_only) for p in spec.params
    ]
    assert {p.name for p in spec.params if p.torch_only} <= TORCH_ONLY_GROUP_KEYS


def test_lion_is_declared_as_lion_pytorch_with_maximize() -> None:
    """lion-pytorch's signature, without its ``use_triton`` and ``decoupled_weight_decay``
    (which divides wd by the initial lr), with torch.optim's keyword-only ``maximize``; the
    torch bridge subclasses torch.optim.Optimizer itself."""
    spec = SPECS["Lion"]
    assert [(p.name, p.default, p.keyword_only, p.torch_only) for p in spec.params] == [
        ("lr", 1e-4, False, False),
        ("betas", (0.9, 0.99), False, False),
        ("weight_decay", 0.0, False, False),
        ("maximize", False, True, False),
    ]
    assert optirs.torch.Lion.__mro__[1:3] == (optirs.torch._Bridge, torch.optim.Optimizer)
    for cls in (optirs.Lion, optirs.torch.Lion):
        params = list(inspect.signature(cls.__init__).parameters)
        assert params[:6] == ["self", "params", "lr", "betas", "weight_decay", "maximize"]


@pytest.mark.parametrize("name", list(SPECS))
def test_declared_defaults_are_torchs(name: str) -> None:
    """A param group's entries and default values are torch's, less torch's switches."""
    torch_defaults = torch_class(name)([torch.zeros(1)]).defaults
    ours = {k: v for k, v in torch_defaults.items() if k not in TORCH_ONLY_GROUP_KEYS}
    assert SPECS[name].defaults == ours


@pytest.mark.parametrize(
    ("name", "kwargs"),
    CONFIGS,
    ids=[f"{n}-" + "-".join(kw) if kw else f"{n}-default" for n, kw in CONFIGS],
)
def test_declared_state_is_what_torch_keeps(name: str, kwargs: dict[str, Any]) -> None:
    """The buffers a group needs (plus ``step`` and the 0-d scalars) are the keys torch's step
    leaves, with the values a new buffer starts from (checked through optirs's own first
    step)."""
    spec = SPECS[name]
    state, group = _torch_state(name, kwargs)
    expected = (
        set(spec.required(group))
        | ({"step"} if spec.counts_steps else set())
        | set(spec.scalar_names)
    )
    assert set(state) == expected
    assert spec.missing(group, {}) == [
        *spec.required(group),
        *(["step"] if spec.counts_steps else []),
        *spec.scalar_names,
    ]
    for key in spec.scalar_names:
        assert state[key].dim() == 0 and state[key].dtype == torch.float32, key
    w = np.ones(3, np.float32)
    opt = getattr(optirs, name)([w], **kwargs)
    opt.step([np.full(3, 0.5, np.float32)])
    ours = opt.state.get(w, {})  # no state at all where torch keeps none
    assert set(ours) == expected
    for key, value in state.items():
        np.testing.assert_allclose(ours[key], value.numpy(), rtol=1e-6, err_msg=key)
    for key in spec.scalar_names:
        assert ours[key].shape == () and ours[key].dtype == np.float32, key


@pytest.mark.parametrize("name", list(SPECS))
def test_full_state_kwargs_make_every_declared_buffer(name: str) -> None:
    state, _ = _torch_state(name, FULL_STATE_KWARGS[name])
    assert set(state) == set(SPECS[name].keys)
