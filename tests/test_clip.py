"""Gradient clipping and GradScaler inside the step.

- ``optirs.torch.clip_grad_norm_`` against ``torch.nn.utils.clip_grad_norm_``: every dtype,
  norm type, shape mix, non-finite gradients, the corner cases of its signature.
- ``optimizer.clip_grad_norm_`` then ``step()`` (both APIs, every optimizer): bitwise the step
  after torch's own clipping with the same norm (``clip_grads_with_norm_``), for every dtype;
  against torch.optim's for-loop step within the parity tolerances; gradients untouched; the
  coefficient used by the next step only.
- ``torch.amp.GradScaler("cpu")``: skipped steps, unscaling inside the step, and unscale then
  clip, against torch's fused AdamW.
"""

from __future__ import annotations

import math

import numpy as np
import optirs
import optirs.torch
import pytest
import torch
from conftest import (
    FULL_STATE_KWARGS,
    OPTIMIZER_NAMES,
    assert_same_at_every_simd_level_and_thread_count,
)
from torch.nn.utils import clip_grads_with_norm_
from torch_helpers import assert_matches_torch, bridge_class, torch_class

ALL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
DTYPE_IDS = ("f32", "f64", "bf16", "f16")
NORM_TYPES = (2.0, 1.0, math.inf, -math.inf, 0.0, 3.5, 0.5)
SHAPES = [(7,), (33, 5), (), (0,), (40_000,), (4099,)]
# torch's own tolerances for each dtype (torch.testing.assert_close's defaults).
TOL = {
    torch.float32: {"rtol": 1.3e-6, "atol": 1e-5},
    torch.float64: {"rtol": 1e-7, "atol": 1e-7},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-5},
    torch.float16: {"rtol": 1e-3, "atol": 1e-5},
}


def _params(dtype, shapes=SHAPES, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    ps = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype))
        p.grad = (torch.randn(s, generator=gen) * scale).to(dtype)
        ps.append(p)
    return ps


def _twins(ps):
    qs = []
    for p in ps:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = None if p.grad is None else p.grad.clone()
        qs.append(q)
    return qs


def _bits(t):
    return t.detach().reshape(-1).view(torch.uint8) if t.numel() else t


# --------------------------------------------------------------------------------------------
# the drop-in clip_grad_norm_
# --------------------------------------------------------------------------------------------


def _reference_norm(grads, norm_type):
    """torch's ``get_total_norm`` with every norm taken in float64: each gradient's norm
    rounded to its dtype, the norm of those rounded to their promoted dtype, as torch rounds."""
    dtype = grads[0].dtype
    for g in grads[1:]:
        dtype = torch.promote_types(dtype, g.dtype)
    each = [torch.linalg.vector_norm(g.double(), norm_type).to(g.dtype) for g in grads]
    stacked = torch.stack([n.to(dtype).double() for n in each])
    return torch.linalg.vector_norm(stacked, norm_type)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS)
def test_drop_in_matches_torch(dtype, norm_type):
    """The norm torch computes, within torch's tolerances of the exact one, and never less
    accurate than torch's own: torch accumulates float32 in float32, where optirs accumulates
    in float64 (for p = 0.5 over 10^5 elements torch is 3e-6 off, optirs 3e-8)."""
    # torch has no infinity norm of an empty tensor (test_empty_tensor_with_infinity_norm).
    ps = _params(dtype, [s for s in SHAPES if s != (0,)] if math.isinf(norm_type) else SHAPES)
    qs = _twins(ps)
    rs = _twins(ps)
    ref = _reference_norm([p.grad for p in ps], norm_type)
    expected = torch.nn.utils.clip_grad_norm_(ps, 1.0, norm_type)
    got = optirs.torch.clip_grad_norm_(qs, 1.0, norm_type)
    assert got.shape == () and got.dtype == expected.dtype
    torch.testing.assert_close(got, ref.to(got.dtype), **TOL[dtype], equal_nan=True)
    if torch.isfinite(ref):
        err, torch_err = abs(got.double() - ref), abs(expected.double() - ref)
        assert err <= torch_err + 1e-12 * abs(ref), (err, torch_err)
    clip_grads_with_norm_(rs, 1.0, ref.to(got.dtype))
    for r, q in zip(rs, qs):
        torch.testing.assert_close(q.grad, r.grad, **TOL[dtype], equal_nan=True)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS)
def test_drop_in_scales_as_torch_does_with_that_norm(dtype, norm_type):
    """Given the same norm, the scaled gradients are torch's bit for bit: the coefficient is
    computed in the norm's dtype and the product rounded to the gradient's, as torch does."""
    ps = _params(dtype, [(7,), (33, 5), (), (40_000,)], seed=1)
    qs = _twins(ps)
    got = optirs.torch.clip_grad_norm_(qs, 0.7, norm_type)
    clip_grads_with_norm_(ps, 0.7, got)
    for p, q in zip(ps, qs):
        assert torch.equal(_bits(q.grad), _bits(p.grad))


@pytest.mark.parametrize("norm_type", [math.inf, -math.inf])
def test_empty_tensor_with_infinity_norm(norm_type):
    ps = _params(torch.float32, [(3,), (0,)])
    qs = _twins(ps)
    with pytest.raises(RuntimeError) as expected:
        torch.nn.utils.clip_grad_norm_(ps, 1.0, norm_type)
    with pytest.raises(RuntimeError) as got:
        optirs.torch.clip_grad_norm_(qs, 1.0, norm_type)
    assert str(got.value) == str(expected.value)
    assert torch.equal(qs[0].grad, ps[0].grad)


def test_drop_in_promotes_mixed_dtypes_as_torch():
    ps = _params(torch.bfloat16, [(9,), (100,)]) + _params(torch.float16, [(50,)], seed=2)
    qs = _twins(ps)
    expected = torch.nn.utils.clip_grad_norm_(ps, 1.0)
    got = optirs.torch.clip_grad_norm_(qs, 1.0)
    assert got.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1.6e-2, atol=1e-5)
    ps = _params(torch.float32, [(9,)]) + _params(torch.float64, [(50,)], seed=2)
    assert optirs.torch.clip_grad_norm_(_twins(ps), 1.0).dtype == torch.float64


def test_drop_in_signature_corner_cases():
    # A single tensor, an iterable, parameters without gradients, nothing at all.
    (p,) = _params(torch.float32, [(20,)])
    (q,) = _twins([p])
    torch.testing.assert_close(
        optirs.torch.clip_grad_norm_(q, 0.5), torch.nn.utils.clip_grad_norm_(p, 0.5)
    )
    assert torch.equal(q.grad, p.grad)
    none = torch.nn.Parameter(torch.ones(3))
    ps = [*_params(torch.float32, [(5,), (6,)]), none]
    qs = _twins(ps)
    torch.testing.assert_close(
        optirs.torch.clip_grad_norm_(iter(qs), 0.5), torch.nn.utils.clip_grad_norm_(ps, 0.5)
    )
    assert qs[2].grad is None
    empty = optirs.torch.clip_grad_norm_([], 1.0)
    assert empty.shape == () and empty.dtype == torch.float32 and empty.item() == 0.0
    with pytest.warns(UserWarning, match="empty generator"):
        optirs.torch.clip_grad_norm_((x for x in []), 1.0)
    # A coefficient of 1 leaves every gradient as it was.
    ps = _params(torch.float32, [(5,)], scale=1e-3)
    before = ps[0].grad.clone()
    assert optirs.torch.clip_grad_norm_(ps, 10.0) < 10.0
    assert torch.equal(ps[0].grad, before)


def test_drop_in_reads_non_contiguous_and_falls_back_where_it_cannot():
    gen = torch.Generator().manual_seed(3)
    p = torch.nn.Parameter(torch.randn(6, 8, generator=gen).t())
    p.grad = torch.randn(8, 6, generator=gen) * 4  # contiguous in the transposed layout
    p.grad = p.grad.t().contiguous().t()
    (q,) = _twins([p])
    q.grad = p.grad.clone().t().contiguous().t()
    assert not q.grad.is_contiguous()
    torch.testing.assert_close(
        optirs.torch.clip_grad_norm_([q], 1.0), torch.nn.utils.clip_grad_norm_([p], 1.0)
    )
    torch.testing.assert_close(q.grad, p.grad)
    # Every other column: not dense, handed to torch.
    base = torch.randn(8, 12, generator=gen)
    r = torch.nn.Parameter(torch.zeros(8, 6))
    r.grad = base.clone()[:, ::2]
    s = torch.nn.Parameter(torch.zeros(8, 6))
    s.grad = base.clone()[:, ::2]
    torch.testing.assert_close(
        optirs.torch.clip_grad_norm_([s], 1.0), torch.nn.utils.clip_grad_norm_([r], 1.0)
    )
    assert torch.equal(s.grad, r.grad)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("norm_type", [2.0, math.inf, 1.0])
def test_drop_in_non_finite_as_torch(bad, norm_type):
    ps = _params(torch.float32, [(10,), (7,)])
    ps[1].grad[3] = bad
    qs = _twins(ps)
    expected = torch.nn.utils.clip_grad_norm_(ps, 1.0, norm_type)
    got = optirs.torch.clip_grad_norm_(qs, 1.0, norm_type)
    torch.testing.assert_close(got, expected, equal_nan=True)
    for p, q in zip(ps, qs):
        torch.testing.assert_close(q.grad, p.grad, equal_nan=True)
    # error_if_nonfinite: torch's message, nothing changed.
    ps = _params(torch.float32, [(10,), (7,)])
    ps[0].grad[0] = bad
    qs = _twins(ps)
    with pytest.raises(RuntimeError) as expected_error:
        torch.nn.utils.clip_grad_norm_(ps, 1.0, norm_type, error_if_nonfinite=True)
    before = [q.grad.clone() for q in qs]
    with pytest.raises(RuntimeError) as got_error:
        optirs.torch.clip_grad_norm_(qs, 1.0, norm_type, error_if_nonfinite=True)
    assert str(got_error.value) == str(expected_error.value)
    for q, b in zip(qs, before):
        assert torch.equal(_bits(q.grad), _bits(b))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS)
def test_norm_is_the_same_at_every_simd_level_and_thread_count(dtype):
    ps = _params(dtype, [(300_001,), (70_000,), (17,)], seed=4)
    views = [p.grad.view(torch.uint16) if dtype == torch.bfloat16 else p.grad for p in ps]
    arrays = [v.numpy() for v in views]

    def run():
        return [optirs._core.grad_norm(arrays, nt, 1.0, bf16_bits=True) for nt in (2.0, 1.0, 3.0)]

    assert_same_at_every_simd_level_and_thread_count(run)


def test_grad_norm_refuses_bad_input():
    with pytest.raises(TypeError, match=r"grads\[1\] has dtype int64"):
        optirs._core.grad_norm([np.ones(3, np.float32), np.ones(3, np.int64)])
    with pytest.raises(ValueError, match=r"grads\[0\] must be C-contiguous"):
        optirs._core.grad_norm([np.ones((3, 4), np.float32).T])
    with pytest.raises(ValueError, match="norm_type"):
        optirs._core.grad_norm([np.ones(3, np.float32)], math.nan)
    a = np.ones(10, np.float32)
    with pytest.raises(ValueError, match="share memory"):
        optirs._core.scale_grads([a[:6], a[4:]], 0.5)
    ro = np.ones(3, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        optirs._core.scale_grads([ro], 0.5)
    assert ro[0] == 1.0 and (a == 1.0).all()


# --------------------------------------------------------------------------------------------
# optimizer.clip_grad_norm_: the coefficient applied inside the next step
# --------------------------------------------------------------------------------------------

# torch.optim on float16/bfloat16 runs its for-loop step in the parameter's dtype, optirs in
# float32 (as torch's fused step): the bitwise reference for every dtype is optirs's own step
# after torch's clipping.
SHAPES_STEP = [(7,), (33, 5), (), (0,), (20_000,), (70_001,)]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_fused_clip_is_clip_then_step_bit_for_bit(name, dtype):
    ps = _params(dtype, SHAPES_STEP, seed=5)
    qs = _twins(ps)
    kwargs = FULL_STATE_KWARGS[name]
    fused, plain = bridge_class(name)(ps, **kwargs), bridge_class(name)(qs, **kwargs)
    gen = torch.Generator().manual_seed(6)
    for step in range(4):
        for p, q in zip(ps, qs):
            g = (torch.randn(p.shape, generator=gen) * (5.0 if step % 2 else 0.01)).to(dtype)
            p.grad, q.grad = g.clone(), g.clone()
        norm = fused.clip_grad_norm_(0.5)
        grads = [p.grad.clone() for p in ps]
        fused.step()
        clip_grads_with_norm_(qs, 0.5, norm)
        plain.step()
        for p, q, g in zip(ps, qs, grads):
            assert torch.equal(_bits(p), _bits(q)), step
            assert torch.equal(_bits(p.grad), _bits(g)), "the gradients are not modified"
        for p, q in zip(ps, qs):
            for key, value in fused.state[p].items():
                assert torch.equal(_bits(value), _bits(plain.state[q][key])), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_fused_clip_matches_torch_optim(name, dtype):
    """``opt.clip_grad_norm_(c); opt.step()`` against torch's clipping + torch.optim.X's
    for-loop step, within the parity tolerances."""
    ps = _params(dtype, SHAPES_STEP, seed=7)
    tps = _twins(ps)
    # Without coupled weight decay: random gradients next to it can cancel, which the parity
    # tests avoid by conditioning gradients (conftest.well_conditioned); the fused clip with
    # decay is checked bit for bit against optirs's own step above.
    kwargs = {k: v for k, v in FULL_STATE_KWARGS[name].items() if k != "weight_decay"}
    opt = bridge_class(name)(ps, **kwargs)
    topt = torch_class(name)(tps, foreach=False, **kwargs)
    gen = torch.Generator().manual_seed(8)
    for step in range(5):
        for p, q in zip(ps, tps):
            g = (torch.randn(p.shape, generator=gen) * 3).to(dtype)
            p.grad, q.grad = g.clone(), g.clone()
        # Clipped gradients of order 0.1, as in the parity tests (tiny ones next to coupled
        # weight decay make centered RMSprop's cancellation magnify last-bit differences).
        got = opt.clip_grad_norm_(100.0)
        expected = torch.nn.utils.get_total_norm([q.grad for q in tps])
        torch.testing.assert_close(got, expected, **TOL[dtype])
        assert got > 100.0  # clipping is active
        # torch's clipping with optirs's norm: the norms are compared above, and float32's
        # differ in their last bits (torch accumulates in float32).
        clip_grads_with_norm_(tps, 100.0, got)
        opt.step()
        topt.step()
        assert_matches_torch(opt, ps, topt, tps, step + 1)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_coefficient_applies_to_the_next_step_only(name):
    ps = _params(torch.float32, [(50,), (9,)], seed=9, scale=10.0)
    qs = _twins(ps)
    kwargs = FULL_STATE_KWARGS[name]
    a, b = bridge_class(name)(ps, **kwargs), bridge_class(name)(qs, **kwargs)
    norm = a.clip_grad_norm_(0.1)
    a.step()
    clip_grads_with_norm_(qs, 0.1, norm)
    b.step()
    # The next step, without a new call, reads the gradients as they are.
    for q, p in zip(qs, ps):
        q.grad = p.grad.clone()
    a.step()
    b.step()
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)
    # zero_grad drops a recorded coefficient, whatever comes before the step.
    a.clip_grad_norm_(1e-6)
    a.zero_grad()
    for p, q in zip(ps, qs):
        p.grad = torch.ones_like(p)
        q.grad = torch.ones_like(q)
    a.step()
    b.step()
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)
    # error_if_nonfinite raises, records nothing.
    ps[0].grad[0] = math.nan
    with pytest.raises(RuntimeError, match="non-finite, so it cannot be clipped"):
        a.clip_grad_norm_(1e-6, error_if_nonfinite=True)
    assert "_optirs_clip_coef" not in a.__dict__


def _torch_view(a):
    if a.dtype.itemsize == 2:  # ml_dtypes.bfloat16
        return torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _numpy_view(t, dtype):
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy().view(dtype)
    return t.numpy()


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_numpy_fused_clip_is_clip_then_step(name, dtype):
    if dtype == "bfloat16":
        dtype = pytest.importorskip("ml_dtypes").bfloat16
    rng = np.random.default_rng(10)
    shapes = [(7,), (33, 5), (70_001,)]
    params = [rng.standard_normal(s).astype(dtype) for s in shapes]
    twins = [p.copy() for p in params]
    kwargs = FULL_STATE_KWARGS[name]
    fused = getattr(optirs, name)(params, **kwargs)
    plain = getattr(optirs, name)(twins, **kwargs)
    for step in range(3):
        grads = [(rng.standard_normal(s) * 4).astype(dtype) for s in shapes]
        kept = [g.copy() for g in grads]
        norm = fused.clip_grad_norm_(grads, 0.5)
        assert isinstance(norm, float)
        fused.step(grads)
        tg = [_torch_view(g.copy()) for g in grads]
        tn = torch.nn.utils.get_total_norm(tg)
        assert norm == pytest.approx(tn.item(), rel=TOL[tn.dtype]["rtol"])
        holders = [torch.nn.Parameter(torch.zeros_like(g)) for g in tg]
        for h, g in zip(holders, tg):
            h.grad = g
        clip_grads_with_norm_(holders, 0.5, torch.tensor(norm, dtype=tn.dtype))
        plain.step([_numpy_view(g, dtype) for g in tg])
        for a, b in zip(params, twins):
            assert a.tobytes() == b.tobytes(), step
        for g, k in zip(grads, kept):
            assert g.tobytes() == k.tobytes()


# --------------------------------------------------------------------------------------------
# GradScaler
# --------------------------------------------------------------------------------------------


def _model(seed=0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(6, 40), torch.nn.Tanh(), torch.nn.Linear(40, 3))


def _loss(model, step):
    gen = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(16, 6, generator=gen), torch.randn(16, 3, generator=gen)
    return torch.nn.functional.mse_loss(model(x), y) * 40


@pytest.mark.parametrize("clip", [False, True], ids=["scaler", "unscale_then_clip"])
@pytest.mark.parametrize("growth", [2.0, 1.5], ids=["pow2", "non_pow2"])
def test_grad_scaler_against_torch_fused_adamw(clip, growth):
    """Skipped steps, scale updates and the unscaling in the step, against torch's fused AdamW
    (which takes ``grad_scale``/``found_inf`` the same way)."""
    model, tmodel = _model(), _model()
    opt = optirs.torch.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    topt = torch.optim.AdamW(tmodel.parameters(), lr=0.01, weight_decay=0.1, fused=True)
    assert opt._step_supports_amp_scaling
    scalers = [
        torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_factor=growth, growth_interval=2)
        for _ in "ab"
    ]
    bad = {1: math.inf, 4: math.nan}
    for step in range(10):
        norms = []
        for m, o, scaler in ((model, opt, scalers[0]), (tmodel, topt, scalers[1])):
            o.zero_grad()
            scaler.scale(_loss(m, step)).backward()
            if step in bad:
                m[2].weight.grad[1, 2] = bad[step]
            if clip:
                scaler.unscale_(o)
                if o is opt:
                    norms.append(opt.clip_grad_norm_(0.5))
                else:
                    norms.append(torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5))
            before = [p.detach().clone() for p in m.parameters()]
            scaler.step(o)
            scaler.update()
            if step in bad:
                assert all(torch.equal(p, b) for p, b in zip(m.parameters(), before))
        if clip and step not in bad:
            torch.testing.assert_close(norms[0], norms[1])
        assert scalers[0].get_scale() == scalers[1].get_scale()
        assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
        for p, q in zip(model.parameters(), tmodel.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        for p, q in zip(model.parameters(), tmodel.parameters()):
            s, t = opt.state[p], topt.state[q]
            assert s["step"].item() == t["step"].item()
            torch.testing.assert_close(s["exp_avg"], t["exp_avg"], rtol=1e-5, atol=1e-7)
    assert scalers[0].get_scale() != 2.0**10


def test_grad_scaler_unscales_inside_the_step_bit_for_bit():
    """With a power-of-two scale the unscaled gradient is exact: the step equals optirs's own
    step on gradients unscaled beforehand (``unscale_``), bit for bit."""
    a, b = _model(), _model()
    oa = optirs.torch.Adam(a.parameters(), lr=0.01, amsgrad=True)
    ob = optirs.torch.Adam(b.parameters(), lr=0.01, amsgrad=True)
    sa, sb = (torch.amp.GradScaler("cpu", init_scale=2.0**8) for _ in "ab")
    for step in range(4):
        for m, o, s in ((a, oa, sa), (b, ob, sb)):
            o.zero_grad()
            s.scale(_loss(m, step)).backward()
            if o is ob:
                s.unscale_(o)
            s.step(o)
            s.update()
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.equal(p, q)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS)
def test_fused_clip_step_is_the_same_at_every_simd_level_and_thread_count(dtype):
    def run():
        ps = _params(dtype, [(70_001,), (5000,), (3,)], seed=11)
        opt = optirs.torch.Adam(ps, lr=0.01, amsgrad=True)
        norms = []
        for _ in range(2):
            norms.append(opt.clip_grad_norm_(0.5).item())
            opt.step()
        return norms, [_bits(p).tolist() for p in ps]

    assert_same_at_every_simd_level_and_thread_count(run)


def test_a_step_that_raises_keeps_the_coefficient():
    ps = _params(torch.float32, [(50,), (9,)], seed=12, scale=10.0)
    qs = _twins(ps)
    a, b = optirs.torch.SGD(ps, lr=0.1), optirs.torch.SGD(qs, lr=0.1)
    norm = a.clip_grad_norm_(0.1)
    a.param_groups[0]["lr"] = "fast"
    with pytest.raises(TypeError, match="lr"):
        a.step()
    a.param_groups[0]["lr"] = 0.1
    a.step()
    clip_grads_with_norm_(qs, 0.1, norm)
    b.step()
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)
    # The NumPy API likewise.
    rng = np.random.default_rng(13)
    params = [rng.standard_normal(20).astype(np.float32)]
    opt = optirs.SGD(params, lr=0.1)
    grads = [(rng.standard_normal(20) * 10).astype(np.float32)]
    opt.clip_grad_norm_(grads, 0.1)
    with pytest.raises(TypeError):
        opt.step([grads[0].astype(np.float64)])
    assert "_clip_coef" in opt.__dict__


@pytest.mark.parametrize("api", ["numpy", "torch"])
def test_skip_nonfinite_with_the_fused_clip(api):
    """A NaN gradient makes the norm NaN (returned as torch does); ``skip_nonfinite`` then skips
    the step, changing nothing, and the coefficient is used up; the next step is unclipped."""
    rng = np.random.default_rng(14)
    init = [rng.standard_normal(40).astype(np.float32), rng.standard_normal(7).astype(np.float32)]
    grads = [(rng.standard_normal(40) * 5).astype(np.float32), np.full(7, np.nan, np.float32)]
    if api == "numpy":
        params = [p.copy() for p in init]
        opt = optirs.Adam(params, lr=0.1, skip_nonfinite=True)
        assert math.isnan(opt.clip_grad_norm_(grads, 1.0))
        opt.step(grads)
        assert opt.last_step_skipped and opt.skipped_steps == 1
        assert all(p.tobytes() == q.tobytes() for p, q in zip(params, init))
        assert "_clip_coef" not in opt.__dict__
        return
    ps = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in init]
    for p, g in zip(ps, grads):
        p.grad = torch.from_numpy(g.copy())
    opt = optirs.torch.Adam(ps, lr=0.1, skip_nonfinite=True)
    assert torch.isnan(opt.clip_grad_norm_(1.0))
    opt.step()
    assert opt.last_step_skipped and opt.skipped_steps == 1
    assert all(torch.equal(p, torch.from_numpy(q)) for p, q in zip(ps, init))
    assert "_optirs_clip_coef" not in opt.__dict__
