"""optirs.torch reuses its NumPy views across steps; every change they depend on must show.

Each test makes the change between two steps and compares with torch.optim given the same
change: the views must follow the parameter's storage, the state's tensors and the gradient.
"""

from __future__ import annotations

import copy

import optirs.torch
import pytest
import torch
from torch import nn


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
