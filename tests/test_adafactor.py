"""Adafactor in both APIs against ``torch.optim.Adafactor`` (its for-loop path, the default).

optirs sums the norms and means behind the row and column factors, the parameter's scale and
the update's RMS in float64 (rounded to the parameter's compute type where torch keeps a float32
result), where torch accumulates float32 in its own pairwise order: both are within an ulp or two
of the exact value, so float32 is compared at conftest's float32 tolerance, float64 at its
float64 one. 16-bit parameters are computed in float32 and rounded once when stored (as optirs's
other optimizers): each step is compared with torch's float32 step from the same values,
rounded to the parameter's dtype.
"""

from __future__ import annotations

import copy
import pickle
import re

import ml_dtypes
import numpy as np
import optirs
import optirs.torch
import pytest
import torch
from conftest import tolerances

SHAPES = [(), (1,), (7,), (3, 4), (2, 3, 5), (40, 70), (1, 1), (5, 1), (1, 5), (2, 1, 3, 4)]
CONFIGS = [
    {},
    {"lr": 0.1, "weight_decay": 0.1, "maximize": True},
    {"eps": (1e-3, 1e-2), "d": 2.0},
    {"lr": 1.0, "beta2_decay": -0.5, "eps": (0.0, 0.0)},
]
STEPS = 5


def _data(shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def _groups(params, config):
    """Two param groups: the first with the defaults, the second with ``config``."""
    half = len(params) // 2
    return [{"params": params[:half]}, {"params": params[half:], **config}]


def _state_np(state):
    return {k: np.asarray(v) for k, v in state.items()}


def _assert_state_matches(ours_state, torch_state, dtype, steps):
    assert set(ours_state) == set(torch_state)
    for key, value in torch_state.items():
        mine = np.asarray(ours_state[key])
        assert mine.shape == tuple(value.shape), key
        np.testing.assert_allclose(
            mine.astype(np.float64),
            value.double().numpy(),
            err_msg=key,
            **tolerances(dtype, steps),
        )


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_numpy_api_matches_torch(config, dtype):
    tdtype = torch.float32 if dtype == np.float32 else torch.float64
    start = [_data(s, i, tdtype) for i, s in enumerate(SHAPES)]
    theirs = [p.clone().requires_grad_() for p in start]
    ours = [p.numpy().copy() for p in start]
    ref = torch.optim.Adafactor(_groups(theirs, config))
    opt = optirs.Adafactor(_groups(ours, config))
    for step in range(STEPS):
        grads = [_data(s, 100 * step + i, tdtype) for i, s in enumerate(SHAPES)]
        for p, g in zip(theirs, grads):
            p.grad = g.clone()
        # A parameter without a gradient this step: left alone by both.
        skip = 3 if step == 2 else None
        if skip is not None:
            theirs[skip].grad = None
        ref.step()
        opt.step([None if i == skip else g.numpy() for i, g in enumerate(grads)])
    for p, q in zip(theirs, ours):
        assert q.dtype == dtype
        np.testing.assert_allclose(q, p.detach().numpy(), **tolerances(dtype, STEPS))
        _assert_state_matches(opt.state[q], ref.state[p], dtype, STEPS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_torch_bridge_matches_torch(config, dtype):
    start = [_data(s, i, dtype) for i, s in enumerate(SHAPES)]
    theirs = [p.clone().requires_grad_() for p in start]
    ours = [p.clone().requires_grad_() for p in start]
    ref = torch.optim.Adafactor(_groups(theirs, config))
    opt = optirs.torch.Adafactor(_groups(ours, config))
    assert isinstance(opt, torch.optim.Adafactor)
    npdtype = np.float32 if dtype == torch.float32 else np.float64
    for step in range(STEPS):
        for i, (p, q) in enumerate(zip(theirs, ours)):
            g = _data(p.shape, 100 * step + i, dtype)
            p.grad, q.grad = g.clone(), g.clone()
        if step == 2:
            theirs[2].grad = ours[2].grad = None
        ref.step()
        opt.step()
    for p, q in zip(theirs, ours):
        np.testing.assert_allclose(
            q.detach().numpy(), p.detach().numpy(), **tolerances(npdtype, STEPS)
        )
        mine = opt.state[q]
        for key, value in ref.state[p].items():
            assert mine[key].dtype == value.dtype and mine[key].shape == value.shape, key
        _assert_state_matches(_state_np(mine), ref.state[p], npdtype, STEPS)


def _half_step_reference(p, grad, state, config, dtype):
    """torch's float32 step from ``p``/``state`` (16-bit, upcast), rounded to ``dtype``; eps1
    as torch takes it for a parameter of ``dtype``."""
    config = dict(config)
    eps = config.get("eps", (None, 1e-3))
    if eps[0] is None:
        config["eps"] = (torch.finfo(dtype).eps, eps[1])
    p32 = p.detach().float().clone().requires_grad_()
    p32.grad = grad.float()
    ref = torch.optim.Adafactor([p32], **config)
    if state:
        ref.state[p32] = {k: v.float().clone() for k, v in state.items()}
    ref.step()
    return p32.detach().to(dtype), {k: v.to(dtype) for k, v in ref.state[p32].items()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("config", CONFIGS[:3], ids=str)
@pytest.mark.parametrize("shape", [(33,), (6, 9), (2, 3, 4)], ids=str)
def test_sixteen_bit_is_float32_math_rounded_once(shape, config, dtype):
    p = _data(shape, 0, dtype).requires_grad_()
    opt = optirs.torch.Adafactor([p], **config)
    tol = {"rtol": 2 * torch.finfo(dtype).eps, "atol": 1e-6}
    for step in range(3):
        grad = _data(shape, step + 1, dtype)
        state = {k: v.clone() for k, v in opt.state[p].items() if k != "step"}
        if step:
            state["step"] = opt.state[p]["step"].clone()
        want_p, want_state = _half_step_reference(p, grad, state, config, dtype)
        p.grad = grad
        opt.step()
        assert p.dtype == dtype
        # The float32 reductions may differ in their last bit, which can move a rounding.
        torch.testing.assert_close(p.detach(), want_p, **tol)
        for k, v in want_state.items():
            if k != "step":
                assert opt.state[p][k].dtype == dtype
                torch.testing.assert_close(opt.state[p][k], v, **tol)
            else:
                assert float(opt.state[p][k]) == float(v)


def test_numpy_bfloat16_steps_as_the_bridge_does():
    start = [_data(s, i, torch.bfloat16) for i, s in enumerate([(9,), (4, 6)])]
    bridge = [p.clone().requires_grad_() for p in start]
    arrays = [p.view(torch.uint16).numpy().view(ml_dtypes.bfloat16).copy() for p in start]
    a = optirs.torch.Adafactor(bridge, lr=0.05, weight_decay=0.1)
    b = optirs.Adafactor(arrays, lr=0.05, weight_decay=0.1)
    for step in range(3):
        grads = [_data(p.shape, 10 + step + i, torch.bfloat16) for i, p in enumerate(bridge)]
        for p, g in zip(bridge, grads):
            p.grad = g
        a.step()
        b.step([g.view(torch.uint16).numpy().view(ml_dtypes.bfloat16) for g in grads])
    for p, q in zip(bridge, arrays):
        assert q.dtype == ml_dtypes.bfloat16
        assert np.array_equal(p.detach().view(torch.uint16).numpy(), q.view(np.uint16))


def test_state_layout_is_torchs():
    p = torch.randn(2, 3, 4, requires_grad=True)
    v = torch.randn(5, requires_grad=True)
    opt = optirs.torch.Adafactor([p, v])
    ref_p, ref_v = p.detach().clone().requires_grad_(), v.detach().clone().requires_grad_()
    ref = torch.optim.Adafactor([ref_p, ref_v])
    for x in (p, v, ref_p, ref_v):
        x.grad = torch.ones_like(x)
    opt.step()
    ref.step()
    for mine, theirs in ((opt.state[p], ref.state[ref_p]), (opt.state[v], ref.state[ref_v])):
        assert list(mine) == list(theirs)
        for k in mine:
            assert mine[k].shape == theirs[k].shape and mine[k].dtype == theirs[k].dtype
    assert opt.state[p]["row_var"].shape == (2, 3, 1)
    assert opt.state[p]["col_var"].shape == (2, 1, 4)
    n = optirs.Adafactor([p.detach().numpy().copy(), v.detach().numpy().copy()])
    n.step([np.ones((2, 3, 4), np.float32), np.ones(5, np.float32)])
    assert {k: v.shape for k, v in n.state_dict()["state"][0].items()} == {
        "step": (),
        "row_var": (2, 3, 1),
        "col_var": (2, 1, 4),
    }


def _run_torch(opt, params, steps, seed):
    for step in range(steps):
        for i, p in enumerate(params):
            p.grad = _data(p.shape, seed + 10 * step + i)
        opt.step()


def test_state_dicts_move_between_torch_and_both_apis():
    shapes = [(3, 4), (6,), (2, 2, 3)]
    start = [_data(s, i) for i, s in enumerate(shapes)]
    config = {"lr": 0.05, "weight_decay": 0.1}
    # torch -> optirs.torch and optirs -> torch, continuing in step with torch throughout.
    ref_params = [p.clone().requires_grad_() for p in start]
    ref = torch.optim.Adafactor(_groups(ref_params, config))
    _run_torch(ref, ref_params, 2, 0)
    ours = [p.detach().clone().requires_grad_() for p in ref_params]
    opt = optirs.torch.Adafactor(_groups(ours, {}))
    opt.load_state_dict(copy.deepcopy(ref.state_dict()))
    assert opt.param_groups[1]["lr"] == 0.05
    _run_torch(ref, ref_params, 2, 50)
    _run_torch(opt, ours, 2, 50)
    back_params = [p.detach().clone().requires_grad_() for p in ours]
    back = torch.optim.Adafactor(_groups(back_params, {}))
    back.load_state_dict(copy.deepcopy(opt.state_dict()))
    _run_torch(ref, ref_params, 1, 90)
    _run_torch(back, back_params, 1, 90)
    for p, q in zip(ref_params, back_params):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    # The NumPy API loads torch's state dict (tensors) and hands back one torch loads.
    arrays = [p.detach().numpy().copy() for p in ref_params]
    n = optirs.Adafactor(_groups(arrays, {}))
    n.load_state_dict(ref.state_dict())
    assert "foreach" not in n.param_groups[0]
    sd = n.state_dict()
    again_params = [p.detach().clone().requires_grad_() for p in ref_params]
    again = torch.optim.Adafactor(_groups(again_params, {}))
    again.load_state_dict(
        {
            "state": {
                i: {k: torch.tensor(v) for k, v in e.items()} for i, e in sd["state"].items()
            },
            "param_groups": sd["param_groups"],
        }
    )
    for step in range(2):
        grads = [_data(p.shape, 200 + step * 10 + i) for i, p in enumerate(ref_params)]
        for p, g in zip(ref_params, grads):
            p.grad = g.clone()
        for p, g in zip(again_params, grads):
            p.grad = g.clone()
        ref.step()
        again.step()
        n.step([g.numpy() for g in grads])
    for p, q, a in zip(ref_params, again_params, arrays):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a, p.detach().numpy(), **tolerances(np.float32, 7))


def test_load_state_dict_refuses_what_does_not_fit_and_changes_nothing():
    p = np.zeros((3, 4), np.float32)
    opt = optirs.Adafactor([p])
    opt.step([np.ones((3, 4), np.float32)])
    before = opt.state_dict()
    bad_shape = copy.deepcopy(before)
    bad_shape["state"][0]["row_var"] = np.zeros((4, 1), np.float32)
    with pytest.raises(ValueError, match=r"row_var'\] has shape \(4, 1\), expected \(3, 1\)"):
        opt.load_state_dict(bad_shape)
    wrong_key = copy.deepcopy(before)
    wrong_key["state"][0]["variance"] = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="unexpected entries"):
        opt.load_state_dict(wrong_key)
    missing = copy.deepcopy(before)
    del missing["state"][0]["col_var"]
    with pytest.raises(ValueError, match="missing"):
        opt.load_state_dict(missing)
    bad_hyper = copy.deepcopy(before)
    bad_hyper["param_groups"][0]["d"] = 0.5
    with pytest.raises(
        ValueError, match=re.escape("Clipping threshold d should be >= 1 but is: 0.5")
    ):
        opt.load_state_dict(bad_hyper)
    after = opt.state_dict()
    for k, v in before["state"][0].items():
        assert np.array_equal(after["state"][0][k], v)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": -1.0}, "Learning rate should be >= 0 but is: -1.0"),
        ({"beta2_decay": 0.5}, "beta2_decay should be <= 0 but is: 0.5"),
        ({"eps": (-1.0, 1e-3)}, "epsilon1 should be >= 0 but is: -1.0"),
        ({"eps": (None, -1.0)}, "epsilon2 should be >= 0 but is: -1.0"),
        ({"d": 0.5}, "Clipping threshold d should be >= 1 but is: 0.5"),
        ({"weight_decay": -0.1}, "weight_decay should be >= 0 but is: -0.1"),
    ],
)
def test_constructor_refuses_as_torch(kwargs, message):
    with pytest.raises(ValueError) as theirs:
        torch.optim.Adafactor([torch.zeros(2, requires_grad=True)], **kwargs)
    assert str(theirs.value) == message
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        optirs.torch.Adafactor([torch.zeros(2, requires_grad=True)], **kwargs)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        optirs.Adafactor([np.zeros(2, np.float32)], **kwargs)
    # The NumPy API checks a group changed later at the next step, changing nothing.
    p = np.ones(2, np.float32)
    opt = optirs.Adafactor([p])
    opt.param_groups[0].update(kwargs)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        opt.step([np.ones(2, np.float32)])
    assert np.array_equal(p, np.ones(2, np.float32)) and not opt.state


def _numpy_setup():
    params = [np.ones((3, 4), np.float32), np.ones(5, np.float32)]
    opt = optirs.Adafactor(params, weight_decay=0.1)
    opt.step([np.full((3, 4), 0.5, np.float32), np.full(5, 0.5, np.float32)])
    return opt, params


def _snapshot(opt, params):
    return [p.copy() for p in params], copy.deepcopy(opt.state_dict())


def _assert_unchanged(opt, params, snap):
    before_params, before_sd = snap
    for p, b in zip(params, before_params):
        assert np.array_equal(p, b)
    after = opt.state_dict()
    for i, e in before_sd["state"].items():
        for k, v in e.items():
            assert np.array_equal(after["state"][i][k], v), (i, k)


@pytest.mark.parametrize(
    ("change", "exc", "match"),
    [
        (lambda o, p, g: g.__setitem__(1, np.ones(5, np.float64)), TypeError, r"grads\[1\]"),
        (lambda o, p, g: g.__setitem__(0, np.ones((4, 3), np.float32)), ValueError, "shape"),
        (
            lambda o, p, g: o.state[p[0]].__setitem__("row_var", np.ones((4, 1), np.float32)),
            ValueError,
            r"state\['row_var'\] of param_groups\[0\]\['params'\]\[0\] has shape",
        ),
        (
            lambda o, p, g: o.state[p[0]].__setitem__("col_var", np.ones((1, 4), np.float64)),
            TypeError,
            r"state\['col_var'\]",
        ),
        (
            lambda o, p, g: o.state[p[1]].pop("variance"),
            ValueError,
            r"state\['variance'\] of param_groups\[0\]\['params'\]\[1\] is missing",
        ),
        (lambda o, p, g: p[1].setflags(write=False), ValueError, "read-only"),
        (
            lambda o, p, g: o.state[p[1]].__setitem__("step", np.array(-1.0, np.float32)),
            ValueError,
            "step count",
        ),
        (
            lambda o, p, g: g.__setitem__(1, p[1]),
            ValueError,
            "overlap|share|alias|same memory",
        ),
        (lambda o, p, g: g.pop(), ValueError, "expected 2 gradients"),
    ],
)
def test_numpy_bad_input_changes_nothing(change, exc, match):
    opt, params = _numpy_setup()
    grads = [np.full((3, 4), 0.25, np.float32), np.full(5, 0.25, np.float32)]
    change(opt, params, grads)
    snap = _snapshot(opt, params)
    with pytest.raises(exc, match=match):
        opt.step(grads)
    _assert_unchanged(opt, params, snap)


def test_where_torchs_step_raises_optirs_raises_first_changing_nothing():
    # torch divides by numel ** 0.5 (an empty parameter) and by numel ** 0.5 * d (d set to 0
    # after construction): ZeroDivisionError, after it has updated the parameters before.
    for kwargs, shape in (({}, (0, 3)), ({}, (0,))):
        p, e = torch.ones(4, requires_grad=True), torch.ones(shape, requires_grad=True)
        p.grad, e.grad = torch.ones(4), torch.ones(shape)
        with pytest.raises(ZeroDivisionError):
            torch.optim.Adafactor([p, e], **kwargs).step()
        p2, e2 = torch.ones(4, requires_grad=True), torch.ones(shape, requires_grad=True)
        p2.grad, e2.grad = torch.ones(4), torch.ones(shape)
        opt = optirs.torch.Adafactor([p2, e2], **kwargs)
        with pytest.raises(
            ZeroDivisionError, match=r"param_groups\[0\]\['params'\]\[1\] has no elements"
        ):
            opt.step()
        assert torch.equal(p2, torch.ones(4)) and not opt.state
    p = torch.ones(4, requires_grad=True)
    p.grad = torch.ones(4)
    ref = torch.optim.Adafactor([p])
    ref.param_groups[0]["d"] = 0.0
    with pytest.raises(ZeroDivisionError):
        ref.step()
    q = torch.ones(4, requires_grad=True)
    q.grad = torch.ones(4)
    opt = optirs.torch.Adafactor([q])
    opt.param_groups[0]["d"] = 0.0
    with pytest.raises(ZeroDivisionError, match=re.escape("d = 0.0")):
        opt.step()
    assert torch.equal(q, torch.ones(4)) and not opt.state


def test_bridge_bad_input_changes_nothing():
    p = torch.ones(3, 4, requires_grad=True)
    p.grad = torch.ones(3, 4)
    opt = optirs.torch.Adafactor([p])
    opt.step()
    before = (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
    opt.state[p]["col_var"] = torch.zeros(1, 5)
    with pytest.raises(ValueError, match=r"state\['col_var'\].*shape"):
        opt.step()
    opt.state[p]["col_var"] = before[1]["col_var"].double()
    with pytest.raises(TypeError, match=r"state\['col_var'\].*dtype float64, expected float32"):
        opt.step()
    opt.state[p]["col_var"] = before[1]["col_var"].clone()
    p.grad = torch.ones(3, 4).to_sparse()
    with pytest.raises(RuntimeError, match="Adafactor does not support sparse gradients"):
        opt.step()
    assert torch.equal(p.detach(), before[0])
    for k, v in before[1].items():
        assert torch.equal(opt.state[p][k], v)


@pytest.mark.parametrize("layout", ["transposed", "channels_last"])
def test_dense_non_contiguous_parameters_step_by_their_shape(layout):
    if layout == "transposed":
        base = _data((7, 6), 0).t()
    else:
        base = _data((2, 3, 4, 5), 0).contiguous(memory_format=torch.channels_last)
    ours = base.clone().requires_grad_()
    if layout == "channels_last":
        ours = base.clone().contiguous(memory_format=torch.channels_last).requires_grad_()
    else:
        ours = base.detach().t().clone().t().requires_grad_()
    assert not ours.is_contiguous()
    theirs = base.detach().clone().requires_grad_()
    opt = optirs.torch.Adafactor([ours], lr=0.1, weight_decay=0.1)
    ref = torch.optim.Adafactor([theirs], lr=0.1, weight_decay=0.1)
    storage = ours.untyped_storage().data_ptr()
    for step in range(3):
        g = _data(base.shape, 10 + step)
        ours.grad, theirs.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    assert ours.untyped_storage().data_ptr() == storage and not ours.is_contiguous()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    for k, v in ref.state[theirs].items():
        torch.testing.assert_close(opt.state[ours][k], v, rtol=1e-5, atol=1e-6)


def _big_numpy_run(threads=None, level=None, seed=0):
    shapes = [(300, 257), (70001,), (3, 50, 129)]
    params = [_data(s, seed + i).numpy().copy() for i, s in enumerate(shapes)]
    opt = optirs.Adafactor(params, lr=0.05, weight_decay=0.01)
    for step in range(2):
        opt.step([_data(s, 100 + 10 * step + i).numpy() for i, s in enumerate(shapes)])
    return params, opt.state_dict()["state"]


def test_bits_are_the_same_at_every_thread_count_and_simd_level():
    saved_threads, saved_level = optirs.get_num_threads(), optirs.simd_level()
    runs = []
    try:
        for level in optirs.simd_levels():
            optirs.set_simd_level(level)
            for threads in (1, 2, 3):
                optirs.set_num_threads(threads)
                runs.append(_big_numpy_run())
    finally:
        optirs.set_num_threads(saved_threads)
        optirs.set_simd_level(saved_level)
    first_params, first_state = runs[0]
    for params, state in runs[1:]:
        for a, b in zip(params, first_params):
            assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
        for i, e in first_state.items():
            for k, v in e.items():
                assert np.array_equal(np.asarray(state[i][k]), np.asarray(v)), (i, k)


def test_skip_nonfinite_and_flush_denormals():
    params = [np.ones((3, 4), np.float32), np.ones(5, np.float32)]
    opt = optirs.Adafactor(params, skip_nonfinite=True, flush_denormals=True)
    grads = [np.ones((3, 4), np.float32), np.array([1, np.inf, 1, 1, 1], np.float32)]
    opt.step(grads)
    assert opt.last_step_skipped and opt.skipped_steps == 1 and not opt.state
    assert all(np.array_equal(p, np.ones_like(p)) for p in params)
    grads[1][1] = 1.0
    opt.step(grads)
    assert not opt.last_step_skipped and float(opt.state[params[0]]["step"]) == 1.0
    # flush_denormals: a denormal gradient squares to 0, as with flush-to-zero.
    p = np.ones(4, np.float32)
    flushed = optirs.Adafactor([p], flush_denormals=True, eps=(0.0, 1e-3))
    flushed.step([np.full(4, 1e-40, np.float32)])
    assert np.array_equal(flushed.state[p]["variance"], np.zeros(4, np.float32))
    t = torch.ones(3, requires_grad=True)
    t.grad = torch.tensor([1.0, float("nan"), 1.0])
    bridge = optirs.torch.Adafactor([t], skip_nonfinite=True)
    bridge.step()
    assert bridge.skipped_steps == 1 and torch.equal(t.detach(), torch.ones(3))


def test_clip_grad_norm_in_the_step_matches_torch_clipping_first():
    shapes = [(6, 5), (7,)]
    start = [_data(s, i) for i, s in enumerate(shapes)]
    theirs = [p.clone().requires_grad_() for p in start]
    ours = [p.clone().requires_grad_() for p in start]
    arrays = [p.numpy().copy() for p in start]
    ref = torch.optim.Adafactor(theirs, lr=0.1)
    opt = optirs.torch.Adafactor(ours, lr=0.1)
    nopt = optirs.Adafactor(arrays, lr=0.1)
    for step in range(3):
        grads = [_data(s, 10 * step + 5 + i) * 10 for i, s in enumerate(shapes)]
        for p, q, g in zip(theirs, ours, grads):
            p.grad, q.grad = g.clone(), g.clone()
        want = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
        got = opt.clip_grad_norm_(1.0)
        got_np = nopt.clip_grad_norm_([g.numpy() for g in grads], 1.0)
        torch.testing.assert_close(got, want)
        assert got_np == pytest.approx(float(want), rel=1e-6)
        ref.step()
        opt.step()
        nopt.step([g.numpy() for g in grads])
        # The gradients themselves are not written by the fused clip.
        assert torch.equal(ours[0].grad, grads[0])
    for p, q, a in zip(theirs, ours, arrays):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a, p.detach().numpy(), **tolerances(np.float32, 3))


def test_grad_scaler_unscales_and_skips_for_it_as_for_torchs():
    assert not getattr(torch.optim.Adafactor([torch.zeros(1)]), "_step_supports_amp_scaling", False)
    models = [torch.nn.Linear(4, 3) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [
        optirs.torch.Adafactor(models[0].parameters()),
        torch.optim.Adafactor(models[1].parameters()),
    ]
    assert opts[0]._step_supports_amp_scaling is False
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    for model, opt in zip(models, opts):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        for step in range(4):
            opt.zero_grad()
            loss = model(x).pow(2).sum() * (float("inf") if step == 1 else 1.0)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert float(opts[0].state[models[0].weight]["step"]) == 3.0


def test_pickle_and_deepcopy_keep_options():
    p = torch.ones(3, 4, requires_grad=True)
    opt = optirs.torch.Adafactor([p], skip_nonfinite=True)
    p.grad = torch.ones(3, 4)
    opt.step()
    clone = copy.deepcopy(opt)
    assert clone.skip_nonfinite and clone._step_supports_amp_scaling is False
    n = optirs.Adafactor([np.ones(3, np.float32)], flush_denormals=True)
    n2 = pickle.loads(pickle.dumps(n))
    assert n2.flush_denormals and type(n2).__name__ == "Adafactor"


def test_large_tensors_are_closer_to_the_exact_result_than_torchs_float32():
    """torch's float32 norms of large tensors accumulate in float32 (the update's RMS of 4
    million elements is off by about 1e-4 relative, of GPT-2's embedding by 3e-3); optirs's in
    float64. Against torch's float64 step (the exact result, near enough), optirs's float32 step
    is far closer: the difference from torch's float32 step is torch's rounding."""
    rng = np.random.default_rng(0)
    shape = (2000, 2000)
    p = rng.standard_normal(shape, dtype=np.float32)
    g = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.01)
    t32 = torch.from_numpy(p.copy()).requires_grad_()
    t32.grad = torch.from_numpy(g)
    t64 = torch.from_numpy(p.astype(np.float64)).requires_grad_()
    t64.grad = torch.from_numpy(g.astype(np.float64))
    eps = (float(np.finfo(np.float32).eps), 1e-3)
    optirs.Adafactor([p]).step([g])
    torch.optim.Adafactor([t32]).step()
    torch.optim.Adafactor([t64], eps=eps).step()
    exact = t64.detach().numpy()
    ours = np.abs(p - exact).max()
    theirs = np.abs(t32.detach().numpy() - exact).max()
    assert ours < 1e-6
    assert ours * 10 < theirs


def test_step_in_backward_steps_like_torch():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    twin = copy.deepcopy(model)
    opt = optirs.torch.Adafactor(model.parameters(), lr=0.05)
    ref = torch.optim.Adafactor(twin.parameters(), lr=0.05)
    x = torch.randn(16, 4)
    with optirs.torch.step_in_backward(model, opt):
        for _ in range(3):
            model(x).pow(2).sum().backward()
            ref.zero_grad()
            twin(x).pow(2).sum().backward()
            ref.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert float(opt.state[model[0].weight]["step"]) == 3.0
