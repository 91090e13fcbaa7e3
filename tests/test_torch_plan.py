"""optirs.torch steps through a plan kept in the core (``_core.TorchPlan``) once a full step has
looked at every tensor; every change the plan depends on must show.

Each test makes the change between two steps and either compares with torch.optim given the
same change (the plan must follow the parameter's storage, the state's tensors and the
gradient) or, for a gradient optirs refuses, checks the refusal and that nothing changed.
"""

from __future__ import annotations

import copy

import optirs.torch
import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True, params=["exchange", "methods"])
def probe(request, monkeypatch):
    """Every test runs with the plan reading layouts through torch's DLPack exchange API and,
    as on a torch without one, through the tensors' Python methods."""
    if request.param == "methods":
        monkeypatch.setattr(optirs.torch._bridge, "_EXCHANGE_API", None)
    return request.param


def _pair(name="Adam", **kwargs):
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(n, generator=g) for n in (5, 33)]
    ours = [nn.Parameter(t.clone()) for t in data]
    theirs = [nn.Parameter(t.clone()) for t in data]
    opt = getattr(optirs.torch, name)(ours, lr=0.1, **kwargs)
    ref = getattr(torch.optim, name)(theirs, lr=0.1, foreach=False, **kwargs)
    return ours, theirs, opt, ref


def _step(ours, theirs, opt, ref, seed):
    g = torch.Generator().manual_seed(seed)
    for a, b in zip(ours, theirs):
        grad = torch.randn(a.shape, generator=g)
        a.grad, b.grad = grad.clone(), grad.clone()
    opt.step()
    ref.step()


def _assert_same(ours, theirs, opt, ref):
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=2.6e-6, atol=1e-5)
        for key, value in ref.state[b].items():
            torch.testing.assert_close(opt.state[a][key], value, rtol=2.6e-6, atol=1e-5)


def test_parameter_storage_swapped_with_data():
    ours, theirs, opt, ref = _pair()
    _step(ours, theirs, opt, ref, 1)
    fresh = torch.linspace(-1, 1, 33)
    ours[1].data = fresh.clone()
    theirs[1].data = fresh.clone()
    _step(ours, theirs, opt, ref, 2)
    _assert_same(ours, theirs, opt, ref)
    assert not torch.equal(ours[1].detach(), fresh)


def test_state_tensor_rebound():
    ours, theirs, opt, ref = _pair()
    _step(ours, theirs, opt, ref, 1)
    opt.state[ours[0]]["exp_avg"] = torch.full((5,), 0.5)
    ref.state[theirs[0]]["exp_avg"] = torch.full((5,), 0.5)
    _step(ours, theirs, opt, ref, 2)
    _assert_same(ours, theirs, opt, ref)


def test_load_state_dict_mid_run():
    ours, theirs, opt, ref = _pair("RMSprop", centered=True, momentum=0.5)
    _step(ours, theirs, opt, ref, 1)
    saved = ref.state_dict()
    _step(ours, theirs, opt, ref, 2)
    # torch keeps loaded tensors whose dtype already fits: each optimizer gets its own copy
    opt.load_state_dict(copy.deepcopy(saved))
    ref.load_state_dict(copy.deepcopy(saved))
    _step(ours, theirs, opt, ref, 3)
    _assert_same(ours, theirs, opt, ref)


def test_gradient_written_in_place_is_seen():
    ours, theirs, opt, ref = _pair("SGD", momentum=0.9)
    _step(ours, theirs, opt, ref, 1)
    for a, b in zip(ours, theirs):
        a.grad.mul_(-3.0)  # same gradient tensors, new values
        b.grad.mul_(-3.0)
    opt.step()
    ref.step()
    _assert_same(ours, theirs, opt, ref)


def test_new_strided_gradient_is_refused_with_nothing_changed():
    ours, theirs, opt, ref = _pair()
    _step(ours, theirs, opt, ref, 1)
    before = [t.detach().clone() for t in ours]
    ours[1].grad = torch.ones(66)[::2]  # torch accepts it; optirs refuses, naming it
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\].*contiguous"):
        opt.step()
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, ours))


def test_option_changing_the_state_layout_mid_run_is_refused_like_torch():
    """torch.optim.Adam makes max_exp_avg_sq only with a parameter's first state, and fails
    with a KeyError when amsgrad is switched on later; optirs.torch refuses it with a clear
    error naming the entry, and nothing changes."""
    ours, theirs, opt, ref = _pair()
    _step(ours, theirs, opt, ref, 1)
    opt.param_groups[0]["amsgrad"] = True
    ref.param_groups[0]["amsgrad"] = True
    g = torch.Generator().manual_seed(5)
    for a, b in zip(ours, theirs):
        a.grad = torch.randn(a.shape, generator=g)
        b.grad = a.grad.clone()
    with pytest.raises(KeyError):
        ref.step()
    before = [t.detach().clone() for t in ours]
    with pytest.raises(ValueError, match=r"state\['max_exp_avg_sq'\] of param_groups\[0\]"):
        opt.step()
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, ours))
    assert all("max_exp_avg_sq" not in opt.state[p] for p in ours)


def test_later_steps_go_through_the_plan(probe):
    """The fast path is taken with a new gradient tensor every step (``zero_grad``'s default):
    one call into the core per step, and no full step after the first."""
    ours, theirs, opt, ref = _pair()
    full_steps = []
    core_step = optirs.torch._core.step

    def counting(*args, **kwargs):
        full_steps.append(args[0])
        return core_step(*args, **kwargs)

    optirs.torch._core.step = counting
    try:
        for seed in range(1, 6):
            _step(ours, theirs, opt, ref, seed)
    finally:
        optirs.torch._core.step = core_step
    assert full_steps == ["adam"]
    assert len(opt._optirs_plan.core) == 2
    # the pinned torch (requirements-dev.txt) has the exchange API: it must be in use
    assert opt._optirs_plan.core.uses_exchange_api == (probe == "exchange")
    _assert_same(ours, theirs, opt, ref)


def test_state_tensor_repointed_with_data():
    """``state[...].data = ...`` keeps the state dict's entry but moves its memory (a common
    way to move optimizer state between devices)."""
    ours, theirs, opt, ref = _pair()
    _step(ours, theirs, opt, ref, 1)
    for state in (opt.state[ours[1]], ref.state[theirs[1]]):
        state["exp_avg_sq"].data = torch.full((33,), 0.25)
        state["step"].data = torch.tensor(7.0)
    _step(ours, theirs, opt, ref, 2)
    _assert_same(ours, theirs, opt, ref)
    assert float(opt.state[ours[1]]["step"]) == 8.0


def test_parameter_state_dropped_mid_run():
    ours, theirs, opt, ref = _pair()
    _step(ours, theirs, opt, ref, 1)
    del opt.state[ours[0]]
    del ref.state[theirs[0]]
    _step(ours, theirs, opt, ref, 2)
    _assert_same(ours, theirs, opt, ref)


def test_gradients_coming_and_going():
    """A parameter without a gradient is skipped; one that gets its first gradient later
    gets its state then, as in torch."""
    ours, theirs, opt, ref = _pair()
    ours[1].requires_grad_(False)
    theirs[1].requires_grad_(False)
    g = torch.Generator().manual_seed(3)
    for seed in range(1, 7):
        grads = [torch.randn(t.shape, generator=g) for t in ours]
        for i, (a, b) in enumerate(zip(ours, theirs)):
            has = seed >= 4 or i == 0
            a.grad = grads[i].clone() if has and seed % 3 else None
            b.grad = a.grad.clone() if a.grad is not None else None
        opt.step()
        ref.step()
        _assert_same(ours, theirs, opt, ref)


def test_gradients_may_share_memory():
    """Gradients are only read: two parameters may be given one gradient tensor."""
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(33, generator=g) for _ in range(2)]
    ours = [nn.Parameter(t.clone()) for t in data]
    theirs = [nn.Parameter(t.clone()) for t in data]
    opt = optirs.torch.Adam(ours, lr=0.1)
    ref = torch.optim.Adam(theirs, lr=0.1, foreach=False)
    for _ in range(3):
        shared = torch.randn(33, generator=g)
        for a, b in zip(ours, theirs):
            a.grad, b.grad = shared, shared.clone()
        opt.step()
        ref.step()
    _assert_same(ours, theirs, opt, ref)


def _assert_state_unchanged(state_before, opt):
    after = opt.state_dict()
    for k, entry in state_before["state"].items():
        for name, value in entry.items():
            assert torch.equal(after["state"][k][name], value), (k, name)


def _refused_gradients():
    """(id, make(param, optimizer) -> gradient to set, exception type, message pattern)."""
    where = r"param_groups\[0\]\['params'\]\[1\]"
    return [
        ("expanded", lambda p, o: torch.ones(1).expand(33), ValueError, "contiguous"),
        ("aliases_param", lambda p, o: p.detach(), ValueError, "share memory"),
        (
            "aliases_state",
            lambda p, o: o.state[p]["exp_avg"],
            ValueError,
            "share memory",
        ),
        (
            "aliases_part_of_state",
            lambda p, o: torch.as_strided(o.state[p]["exp_avg_sq"], (33,), (1,), 0),
            ValueError,
            "share memory",
        ),
        ("negative_bit", lambda p, o: torch._neg_view(torch.ones(33)), TypeError, where),
        # torch.optim.Adam's own error and message
        ("sparse", lambda p, o: torch.ones(33).to_sparse(), RuntimeError, "sparse"),
    ]


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [case[1:] for case in _refused_gradients()],
    ids=[case[0] for case in _refused_gradients()],
)
def test_refused_new_gradient_changes_nothing(make, error, match):
    ours, theirs, opt, ref = _pair()
    _step(ours, theirs, opt, ref, 1)
    ours[0].grad = torch.ones(5)
    ours[1].grad = make(ours[1], opt)
    before = [t.detach().clone() for t in ours]
    state_before = copy.deepcopy(opt.state_dict())
    with pytest.raises(error, match=match) as excinfo:
        opt.step()
    if error is not RuntimeError:  # torch's own wording for sparse gradients names no parameter
        assert "param_groups[0]['params'][1]" in str(excinfo.value)
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, ours))
    _assert_state_unchanged(state_before, opt)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda g: torch.ones(33, dtype=torch.float64), TypeError, "dtype"),
        (lambda g: torch.ones(11), ValueError, "shape"),
        (lambda g: torch.ones(66)[::2], ValueError, "contiguous"),
    ],
    ids=["dtype", "shape", "strides"],
)
def test_gradient_changed_in_place_behind_torchs_checks(change, error, match):
    """``p.grad.data = ...`` bypasses the checks of ``p.grad = ...``: the plan must see it."""
    ours, theirs, opt, ref = _pair()
    _step(ours, theirs, opt, ref, 1)
    before = [t.detach().clone() for t in ours]
    state_before = copy.deepcopy(opt.state_dict())
    ours[1].grad.data = change(ours[1].grad)
    with pytest.raises(error, match=match) as excinfo:
        opt.step()
    assert "param_groups[0]['params'][1]" in str(excinfo.value)
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, ours))
    _assert_state_unchanged(state_before, opt)


def test_a_plan_that_cannot_be_built_does_not_fail_the_step(monkeypatch):
    """The plan is an optimisation: when it cannot be made, the step that was just applied
    still returns normally and the next step takes the full path."""
    ours, theirs, opt, ref = _pair()

    def refuse(*args, **kwargs):
        raise ValueError("no plan")

    monkeypatch.setattr(optirs.torch._core, "TorchPlan", refuse)
    for seed in range(1, 4):
        _step(ours, theirs, opt, ref, seed)
        assert opt._optirs_plan is None
    _assert_same(ours, theirs, opt, ref)


def _full_steps_counted(monkeypatch):
    calls = []
    core_step = optirs.torch._core.step

    def counting(*args, **kwargs):
        calls.append(args[0])
        return core_step(*args, **kwargs)

    monkeypatch.setattr(optirs.torch._core, "step", counting)
    return calls


@pytest.mark.parametrize("where", ["param", "state"])
def test_same_memory_in_a_new_shape_is_seen(where):
    """``t.data = t.data[:3]`` keeps the data pointer but not the tensor: the plan compares each
    tensor's whole layout (through the exchange API, or its Python methods without one), so the
    full step looks and reports it."""
    ours, theirs, opt, ref = _pair()
    _step(ours, theirs, opt, ref, 1)
    before = [t.detach().clone() for t in ours]
    state_before = copy.deepcopy(opt.state_dict())
    t = ours[1] if where == "param" else opt.state[ours[1]]["exp_avg"]
    ptr = t.data_ptr()
    t.data = t.data[:3]
    assert t.data_ptr() == ptr
    shapes = r"shape \[3\], expected \[33\]|shape \[33\], expected \[3\]"
    with pytest.raises(ValueError, match=shapes):
        opt.step()
    assert all(torch.equal(a[:3], b.detach()[:3]) for a, b in zip(before, ours))
    if where == "param":
        _assert_state_unchanged(state_before, opt)


@pytest.mark.parametrize("probe", ["exchange"], indirect=True)
def test_no_exchange_api_where_the_capsule_is_not_one(monkeypatch):
    """Anything but a DLPack exchange API capsule leaves the plan on the Python methods."""
    monkeypatch.setattr(optirs.torch._bridge, "_EXCHANGE_API", object())
    ours, theirs, opt, ref = _pair()
    for seed in range(1, 4):
        _step(ours, theirs, opt, ref, seed)
    assert not opt._optirs_plan.core.uses_exchange_api
    _assert_same(ours, theirs, opt, ref)


@pytest.mark.parametrize("probe", ["exchange"], indirect=True)
def test_no_exchange_api_for_a_parameter_type_with_its_own(monkeypatch):
    """The protocol speaks for instances of the type the capsule was found on: a parameter
    subclass that publishes another capsule is read through its Python methods."""

    class Other(nn.Parameter):
        __dlpack_c_exchange_api__ = object()

    g = torch.Generator().manual_seed(0)
    data = torch.randn(7, generator=g)
    ours, theirs = [Other(data.clone())], [nn.Parameter(data.clone())]
    opt = optirs.torch.Adam(ours, lr=0.1)
    ref = torch.optim.Adam(theirs, lr=0.1, foreach=False)
    full = _full_steps_counted(monkeypatch)
    for seed in range(1, 4):
        _step(ours, theirs, opt, ref, seed)
    assert full == ["adam"]
    assert not opt._optirs_plan.core.uses_exchange_api
    _assert_same(ours, theirs, opt, ref)


def test_same_items_compares_identity_in_order_across_lists():
    from optirs import _core

    a, b = torch.zeros(2), torch.zeros(2)  # equal values, different objects
    assert _core.same_items([[a], [b]], [a, b])
    assert _core.same_items([[], [a, b], []], [a, b])
    assert _core.same_items([], [])
    assert not _core.same_items([[a, b]], [b, a])  # order
    assert not _core.same_items([[a, a]], [a, b])  # equal, not identical
    assert not _core.same_items([[a]], [a, b])  # fewer
    assert not _core.same_items([[a, b]], [a])  # more
    with pytest.raises(TypeError, match=r"same_items: lists\[1\] must be a list, got tuple"):
        _core.same_items([[a], (b,)], [a, b])
