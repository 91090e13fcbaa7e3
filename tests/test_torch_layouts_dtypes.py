"""optirs.torch with bfloat16/float16 parameters and with dense non-contiguous layouts.

Reduced precision is stepped the way torch's fused CPU path steps it: load into float32,
compute, round once into the parameter's dtype. It is compared with `fused=True` where torch has
it (SGD, Adam, AdamW, Adagrad) at torch's own tolerance for that comparison (5e-3), and, for
RMSprop (no fused path), one step against torch's float32 for-loop on the same values, which can
differ only by that final rounding.

A parameter whose memory is dense but not in row-major order (a transpose, channels_last) is
updated in memory order; its gradient and state must share its strides.
"""

from __future__ import annotations

import copy

import optirs.torch
import pytest
import torch
from conftest import torch_class
from torch import nn

HALF_DTYPES = [torch.bfloat16, torch.float16]
FUSED = {
    "SGD": {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01},
    "Adam": {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True},
    "AdamW": {"lr": 0.01, "weight_decay": 0.1},
    "Adagrad": {"lr": 0.05, "lr_decay": 0.01, "weight_decay": 0.1},
}


def _pair(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return nn.Parameter(base.to(dtype)), nn.Parameter(base.to(dtype))


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(FUSED))
def test_reduced_precision_matches_torch_fused(name, dtype):
    kwargs = FUSED[name]
    ours, theirs = _pair((1027,), dtype)
    opt = getattr(optirs.torch, name)([ours], **kwargs)
    ref = getattr(torch.optim, name)([theirs], fused=True, **kwargs)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        grad = torch.randn(1027, generator=g).to(dtype)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        opt.step()
        ref.step()
    assert ours.dtype == dtype
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=5e-3, atol=5e-3)
    for key, value in ref.state[theirs].items():
        mine = opt.state[ours][key]
        assert mine.dtype == value.dtype, key
        torch.testing.assert_close(mine, value, rtol=5e-3, atol=5e-3)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize(
    "kwargs", [{}, {"centered": True, "momentum": 0.5, "weight_decay": 0.1}], ids=["plain", "cm"]
)
def test_reduced_precision_rmsprop_is_float32_math_rounded_once(dtype, kwargs):
    ours, _ = _pair((517,), dtype, seed=2)
    master = nn.Parameter(ours.detach().float())  # the same values, in float32
    grad = torch.randn(517, generator=torch.Generator().manual_seed(3)).to(dtype)
    ours.grad, master.grad = grad.clone(), grad.float()
    optirs.torch.RMSprop([ours], lr=0.01, **kwargs).step()
    ref = torch.optim.RMSprop([master], lr=0.01, foreach=False, **kwargs)
    ref.step()
    # one rounding of the float32 result, i.e. at most half a unit in the last place
    torch.testing.assert_close(ours.detach().float(), master.detach(), rtol=4e-3, atol=1e-6)
    assert torch.equal(ours.detach(), master.detach().to(dtype))


# torch has no fused path for these: one step on a 16-bit parameter is the float32 step of
# its values, rounded once (lr and the step size's fill exactly representable in both).
HALF_ONCE = [
    ("Adadelta", {"lr": 0.5, "weight_decay": 0.1, "maximize": True}),
    ("RAdam", {"lr": 0.25, "betas": (0.9, 0.5), "weight_decay": 0.1}),
    ("Lion", {"lr": 0.015625, "weight_decay": 0.5}),
    ("Rprop", {"lr": 0.25, "etas": (0.5, 1.5)}),
]


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize(("name", "kwargs"), HALF_ONCE, ids=[n for n, _ in HALF_ONCE])
def test_reduced_precision_is_float32_math_rounded_once(name, kwargs, dtype):
    ours, _ = _pair((517,), dtype, seed=2)
    master = nn.Parameter(ours.detach().float())
    opt = getattr(optirs.torch, name)([ours], **kwargs)
    ref = torch_class(name)([master], foreach=False, **kwargs)
    gen = torch.Generator().manual_seed(3)
    grad = torch.randn(517, generator=gen).to(dtype)
    ours.grad, master.grad = grad.clone(), grad.float()
    opt.step()
    ref.step()
    assert torch.equal(ours.detach(), master.detach().to(dtype))
    for key, value in ref.state[master].items():
        if key != "step":
            assert opt.state[ours][key].dtype == dtype
            assert torch.equal(opt.state[ours][key], value.to(dtype)), key


def test_bfloat16_state_keeps_torch_format():
    p, _ = _pair((64,), torch.bfloat16)
    opt = optirs.torch.Adam([p], amsgrad=True)
    p.grad = torch.ones_like(p)
    opt.step()
    state = opt.state[p]
    assert state["step"].dtype == torch.float32 and state["step"].dim() == 0
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        assert state[key].dtype == torch.bfloat16 and state[key].shape == p.shape


def _layouts():
    conv = torch.randn(8, 3, 5, 5).to(memory_format=torch.channels_last)
    return {
        "transposed": lambda: torch.randn(6, 4).t(),
        "channels_last": lambda: conv.clone(memory_format=torch.channels_last),
        "permuted_3d": lambda: torch.randn(3, 4, 5).permute(2, 0, 1),
    }


@pytest.mark.parametrize("layout", sorted(_layouts()))
@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
        ("Adam", {"lr": 0.01, "amsgrad": True, "weight_decay": 0.1}),
        ("AdamW", {"lr": 0.01}),
        ("RMSprop", {"lr": 0.01, "centered": True, "momentum": 0.5}),
        ("Adagrad", {"lr": 0.1}),
        ("Adadelta", {"lr": 0.5, "weight_decay": 0.1}),
        ("RAdam", {"lr": 0.01, "betas": (0.9, 0.5)}),
        ("Lion", {"lr": 0.01, "weight_decay": 0.1}),
        ("Rprop", {"lr": 0.01}),
        ("Adamax", {"lr": 0.01, "weight_decay": 0.1}),
        ("NAdam", {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True}),
        ("ASGD", {"lr": 0.05, "t0": 2.0, "weight_decay": 0.1}),
    ],
)
def test_dense_non_contiguous_parameters_are_updated_in_place(name, kwargs, layout):
    data = _layouts()[layout]()
    assert not data.is_contiguous()
    ours = nn.Parameter(data.clone(memory_format=torch.preserve_format))
    theirs = nn.Parameter(data.clone(memory_format=torch.preserve_format))
    assert ours.stride() == data.stride()
    opt = getattr(optirs.torch, name)([ours], **kwargs)
    ref = torch_class(name)([theirs], foreach=False, **kwargs)
    ptr, strides = ours.data_ptr(), ours.stride()
    g = torch.Generator().manual_seed(4)
    for _ in range(6):
        grad = torch.randn(data.shape, generator=g)
        # gradients from autograd follow the parameter's layout
        ours.grad = torch.empty_like(ours).copy_(grad)
        theirs.grad = torch.empty_like(theirs).copy_(grad)
        opt.step()
        ref.step()
    assert ours.data_ptr() == ptr and ours.stride() == strides
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1.3e-6 * 2, atol=1e-5)
    for key, value in ref.state[theirs].items():
        torch.testing.assert_close(opt.state[ours][key], value, rtol=1.3e-6 * 2, atol=1e-5)


NO_FUSED = {
    "Adamax": {"lr": 0.01, "weight_decay": 0.1},
    "NAdam": {"lr": 0.01, "weight_decay": 0.1, "momentum_decay": 0.01},
    "ASGD": {"lr": 0.05, "t0": 2.0, "weight_decay": 0.1},
}


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(NO_FUSED))
def test_reduced_precision_without_a_fused_torch_path_is_float32_math_rounded_once(name, dtype):
    """torch has no fused Adamax, NAdam or ASGD: a 16-bit step is the float32 step of the same
    values, rounded once into the parameter's dtype, and the 0-d state stays float32."""
    kwargs = NO_FUSED[name]
    ours, _ = _pair((517,), dtype, seed=5)
    master = nn.Parameter(ours.detach().float())
    grad = torch.randn(517, generator=torch.Generator().manual_seed(6)).to(dtype)
    ours.grad, master.grad = grad.clone(), grad.float()
    opt = getattr(optirs.torch, name)([ours], **kwargs)
    opt.step()
    ref = getattr(torch.optim, name)([master], foreach=False, **kwargs)
    ref.step()
    torch.testing.assert_close(ours.detach().float(), master.detach(), rtol=4e-3, atol=1e-6)
    assert torch.equal(ours.detach(), master.detach().to(dtype))
    for key in optirs.torch.__dict__[name]._spec.scalar_names:
        assert opt.state[ours][key].dtype == torch.float32
        assert torch.equal(opt.state[ours][key], ref.state[master][key]), key


def test_gradient_with_another_layout_than_a_non_contiguous_parameter_is_refused():
    p = nn.Parameter(torch.randn(6, 4).t())
    q = nn.Parameter(torch.randn(5))
    opt = optirs.torch.Adam([q, p], lr=0.1)
    q.grad = torch.ones(5)
    p.grad = torch.ones(4, 6)  # row-major, while p is column-major
    before = [t.detach().clone() for t in (p, q)]
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\].*strides"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, (p.detach(), q.detach())))
    assert len(opt.state) == 0


def test_step_bumps_version_so_stale_graphs_refuse_backward():
    p = nn.Parameter(torch.randn(5))
    x = torch.randn(5, requires_grad=True)
    loss = (p * x).pow(2).sum()
    loss.backward(retain_graph=True)
    optirs.torch.SGD([p], lr=0.1).step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_deepcopy_and_reduced_precision_state_dict_round_trip():
    p, _ = _pair((33,), torch.bfloat16)
    opt = optirs.torch.AdamW([p], lr=0.1)
    p.grad = torch.ones_like(p)
    opt.step()
    clone_p = copy.deepcopy(p)
    clone = optirs.torch.AdamW([clone_p], lr=0.1)
    # torch keeps loaded tensors that already have the right dtype: copy, or both share state
    clone.load_state_dict(copy.deepcopy(opt.state_dict()))
    for o, q in ((opt, p), (clone, clone_p)):
        q.grad = torch.full_like(q, 0.5)
        o.step()
    assert torch.equal(p.detach(), clone_p.detach())
