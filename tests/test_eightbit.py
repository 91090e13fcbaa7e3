"""8-bit Adam/AdamW (``optirs.Adam8bit``, ``optirs.AdamW8bit``): blockwise dynamic quantization
against a NumPy transcription of the scheme, bit for bit; SIMD levels and thread counts; small
tensors; state dicts; non-finite gradients; bad input; training quality."""

from __future__ import annotations

import io
import pickle

import numpy as np
import optirs
import optirs.torch as ot
import pytest
import torch
from conftest import (
    assert_same_at_every_simd_level_and_thread_count,
    assert_snapshot_equal,
    snapshot,
)
from optirs import _eightbit


def dynamic_map(signed: bool) -> np.ndarray:
    """bitsandbytes' ``create_dynamic_map(signed, 7, 8)``, each value computed in float64 and
    rounded once to float32."""
    data = []
    for i in range(7):
        k = 2**i if signed else 2 ** (i + 1)
        for j in range(k):
            lo, hi = 0.1 + 0.9 * j / k, 0.1 + 0.9 * (j + 1) / k
            mean = float(np.float32(10.0 ** (i - 6) * (lo + hi) / 2.0))
            data += [mean, -mean] if signed else [mean]
    data += [0.0, 1.0]
    assert len(data) == 256
    return np.array(sorted(data), dtype=np.float32)


def ref_quantize(x: np.ndarray, code: np.ndarray, block: int):
    """Per block: absmax (NaN when any value is not finite), x / absmax in float32, the nearest
    code (ties to the lower), computed independently of the core."""
    zero = int(np.flatnonzero(code == 0)[0])
    q = np.empty(x.size, np.uint8)
    absmax = np.empty(-(-x.size // block), np.float32)
    c64 = code.astype(np.float64)
    for b in range(absmax.size):
        xs = x[b * block : (b + 1) * block]
        a = np.float32(np.abs(xs).max()) if np.isfinite(xs).all() else np.float32(np.nan)
        absmax[b] = a
        if a == 0 or not np.isfinite(a):
            q[b * block : (b + 1) * block] = zero
            continue
        xn = (xs / a).astype(np.float64)
        q[b * block : (b + 1) * block] = np.abs(xn[:, None] - c64[None, :]).argmin(axis=1)
    return q, absmax


def _lerp(a, b, w):
    w = np.float32(w)
    return a + w * (b - a) if abs(w) < 0.5 else b - (b - a) * (np.float32(1) - w)


def test_code_maps_are_the_dynamic_maps():
    for signed in (True, False):
        assert np.array_equal(_eightbit.code_map(signed), dynamic_map(signed))


@pytest.mark.parametrize("block", [256, 64, 100])
def test_adamw8bit_against_numpy_reference(block):
    rng = np.random.default_rng(21)
    n, lr, (b1, b2), eps, wd = 5000, 1e-2, (0.9, 0.999), 1e-8, 1e-2
    p = rng.standard_normal(n).astype(np.float32)
    x = p.copy()
    opt = optirs.AdamW8bit([x], lr=lr, block_size=block, min_8bit_size=1)
    cm, cv = dynamic_map(True), dynamic_map(False)
    blocks = -(-n // block)
    mq, vq = np.full(n, 127, np.uint8), np.zeros(n, np.uint8)
    am, av = np.zeros(blocks, np.float32), np.zeros(blocks, np.float32)
    f = np.float32
    for step in range(1, 6):
        g = rng.standard_normal(n).astype(np.float32)
        opt.step([g.copy()])
        m = cm[mq] * np.repeat(am, block)[:n]
        v = cv[vq] * np.repeat(av, block)[:n]
        p = p * f(1 - lr * wd)
        m = _lerp(m, g, 1 - b1)
        v = v * f(b2) + f(1 - b2) * g * g
        denom = np.sqrt(v) / f((1 - b2**step) ** 0.5) + f(eps)
        p = p + f(-(lr / (1 - b1**step))) * m / denom
        mq, am = ref_quantize(m, cm, block)
        vq, av = ref_quantize(v, cv, block)
        s = opt.state[x]
        assert x.tobytes() == p.tobytes(), step
        assert np.array_equal(s["exp_avg"], mq), step
        assert np.array_equal(s["exp_avg_sq"], vq), step
        assert s["exp_avg_absmax"].tobytes() == am.tobytes(), step
        assert s["exp_avg_sq_absmax"].tobytes() == av.tobytes(), step


def test_same_at_every_simd_level_and_thread_count():
    shapes = [(70_001,), (300, 40), (4096,)]

    def run():
        rng = np.random.default_rng(3)
        params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        opt = optirs.AdamW8bit(params, lr=1e-2)
        for _ in range(3):
            opt.step([rng.standard_normal(s).astype(np.float32) for s in shapes])
        out = [p.tobytes() for p in params]
        for p in params:
            out.extend(v.tobytes() for v in opt.state[p].values())
        return out

    assert_same_at_every_simd_level_and_thread_count(run)


def test_small_tensors_keep_float_state_bit_for_bit():
    rng = np.random.default_rng(4)
    a = [rng.standard_normal(s).astype(np.float32) for s in [(10,), (4095,)]]
    b = [x.copy() for x in a]
    o = optirs.Adam8bit(a, lr=1e-2, weight_decay=0.1)
    r = optirs.Adam(b, lr=1e-2, weight_decay=0.1)
    for _ in range(4):
        gs = [rng.standard_normal(x.shape).astype(np.float32) for x in a]
        o.step([g.copy() for g in gs])
        r.step(gs)
    for x, y in zip(a, b):
        assert x.tobytes() == y.tobytes()
        assert sorted(o.state[x]) == ["exp_avg", "exp_avg_sq", "step"]
        assert o.state[x]["exp_avg"].dtype == np.float32


def _trained(n_steps=3, **kw):
    rng = np.random.default_rng(6)
    params = [rng.standard_normal(s).astype(np.float32) for s in [(64, 80), (20,)]]
    opt = optirs.AdamW8bit(params, lr=1e-2, **kw)
    for _ in range(n_steps):
        opt.step([rng.standard_normal(p.shape).astype(np.float32) for p in params])
    return params, opt, rng


def test_state_dict_round_trip_continues_bit_for_bit():
    pa, a, rng = _trained()
    sd = pickle.loads(pickle.dumps(a.state_dict()))
    pb = [p.copy() for p in pa]
    b = optirs.AdamW8bit(pb, lr=1e-2)
    b.load_state_dict(sd)
    for _ in range(3):
        gs = [rng.standard_normal(p.shape).astype(np.float32) for p in pa]
        a.step([g.copy() for g in gs])
        b.step(gs)
    for x, y in zip(pa, pb):
        assert x.tobytes() == y.tobytes()
        for k, v in a.state[x].items():
            assert v.dtype == b.state[y][k].dtype and v.tobytes() == b.state[y][k].tobytes()


def test_float_state_loads_quantized_and_the_way_back():
    rng = np.random.default_rng(7)
    p = rng.standard_normal((64, 80)).astype(np.float32)
    f = optirs.AdamW([p.copy()], lr=1e-2)
    f.step([rng.standard_normal(p.shape).astype(np.float32)])
    q = optirs.AdamW8bit([p.copy()], lr=1e-2)
    q.load_state_dict(f.state_dict())
    s, fs = q.state[q.param_groups[0]["params"][0]], f.state[f.param_groups[0]["params"][0]]
    codes, absmax = ref_quantize(fs["exp_avg"].reshape(-1), dynamic_map(True), 256)
    assert np.array_equal(s["exp_avg"].reshape(-1), codes)
    assert s["exp_avg_absmax"].tobytes() == absmax.tobytes()
    back = optirs.AdamW([p.copy()], lr=1e-2)
    back.load_state_dict(q.dequantized_state_dict())
    bs = back.state[back.param_groups[0]["params"][0]]
    want = dynamic_map(True)[codes] * np.repeat(absmax, 256)[: codes.size]
    assert bs["exp_avg"].reshape(-1).tobytes() == want.tobytes()
    # One quantize/dequantize round trip's error, relative to each block's absmax.
    err = np.abs(bs["exp_avg"].reshape(-1) - fs["exp_avg"].reshape(-1))
    assert (err <= 0.05 * np.repeat(absmax, 256)[: err.size]).all()


def test_nonfinite_gradient_poisons_only_its_block():
    params, opt, _ = _trained(1)
    p = params[0]
    g = np.ones_like(p)
    g.flat[300] = np.nan  # block 1 of the 256-element blocks
    opt.step([g, np.ones(20, np.float32)])
    s = opt.state[p]
    assert np.isnan(s["exp_avg_absmax"][1]) and np.isfinite(np.delete(s["exp_avg_absmax"], 1)).all()
    assert (s["exp_avg"].reshape(-1)[256:512] == 127).all()
    opt.step([np.ones_like(p), np.ones(20, np.float32)])
    flat = p.reshape(-1)
    assert np.isnan(flat[256:512]).all()
    assert np.isfinite(np.delete(flat, np.arange(256, 512))).all()


def test_skip_nonfinite_changes_nothing():
    params, opt, _ = _trained(1, skip_nonfinite=True)
    before = snapshot(opt)
    g = np.ones_like(params[0])
    g.flat[5] = np.inf
    opt.step([g, np.ones(20, np.float32)])
    assert opt.last_step_skipped
    assert_snapshot_equal(before, snapshot(opt))


def test_bad_options_refused():
    p = [np.zeros(10, np.float32)]
    with pytest.raises(ValueError, match="amsgrad"):
        optirs.Adam8bit(p, amsgrad=True)
    for bad in (0, 5000):
        with pytest.raises(ValueError, match="block_size"):
            optirs.AdamW8bit(p, block_size=bad)
    with pytest.raises(ValueError, match="min_8bit_size"):
        optirs.AdamW8bit(p, min_8bit_size=-1)


@pytest.mark.parametrize(
    ("key", "value", "error", "pattern"),
    [
        ("exp_avg", np.zeros((64, 80), np.int8), TypeError, "uint8"),
        ("exp_avg_sq", np.zeros((80, 64), np.uint8), ValueError, "shape"),
        ("exp_avg_absmax", np.zeros(19, np.float32), ValueError, "absmax"),
        ("exp_avg_sq_absmax", np.zeros(20, np.float64), TypeError, "float32"),
    ],
)
def test_bad_state_refused_changing_nothing(key, value, error, pattern):
    params, opt, _ = _trained(1)
    opt.state[params[0]][key] = value
    before = snapshot(opt)
    with pytest.raises(error, match=pattern):
        opt.step([np.ones_like(params[0]), np.ones(20, np.float32)])
    assert_snapshot_equal(before, snapshot(opt))


def test_bad_state_dict_refused_changing_nothing():
    _params, opt, _ = _trained(1)
    sd = opt.state_dict()
    sd["state"][0]["exp_avg_absmax"] = np.zeros(3, np.float32)
    before = snapshot(opt)
    with pytest.raises(TypeError, match="absmax"):
        opt.load_state_dict(sd)
    assert_snapshot_equal(before, snapshot(opt))


# ---- the torch bridge ---------------------------------------------------------------------


def _torch_pair(cls_t, cls_n, shapes, steps, seed, **kw):
    torch.manual_seed(seed)
    ps = [torch.randn(s, requires_grad=True) for s in shapes]
    qs = [p.detach().clone() for p in ps]
    o = cls_t(ps, lr=1e-2, **kw)
    n = cls_n([q.numpy() for q in qs], lr=1e-2, **kw)
    for _ in range(steps):
        gs = [torch.randn(s) for s in shapes]
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        o.step()
        n.step([g.numpy() for g in gs])
    return ps, qs, o, n


@pytest.mark.parametrize(
    ("cls_t", "cls_n"), [(ot.Adam8bit, optirs.Adam8bit), (ot.AdamW8bit, optirs.AdamW8bit)]
)
def test_torch_bridge_matches_numpy_api(cls_t, cls_n):
    ps, qs, o, n = _torch_pair(cls_t, cls_n, [(100, 60), (10,), (5000,)], 4, 0, weight_decay=0.1)
    assert isinstance(o, torch.optim.Adam)
    for p, q in zip(ps, qs):
        assert torch.equal(p.detach(), q)
    for p, q in zip(ps, n.param_groups[0]["params"]):
        for k, v in o.state[p].items():
            assert v.numpy().tobytes() == n.state[q][k].tobytes(), k


def test_torch_bfloat16_params_same_at_every_level_and_thread_count():
    def run():
        torch.manual_seed(1)
        p = torch.randn(70_001).bfloat16().requires_grad_()
        opt = ot.AdamW8bit([p], lr=1e-2)
        for _ in range(3):
            p.grad = torch.randn(70_001).bfloat16()
            opt.step()
        s = opt.state[p]
        assert p.dtype == torch.bfloat16 and s["exp_avg"].dtype == torch.uint8
        return [p.detach().view(torch.int16).numpy().tobytes()] + [
            v.numpy().tobytes() for v in s.values()
        ]

    assert_same_at_every_simd_level_and_thread_count(run)


def test_torch_state_dict_round_trip_and_the_way_back():
    ps, _, o, _ = _torch_pair(ot.AdamW8bit, optirs.AdamW8bit, [(64, 80), (7,)], 2, 3)
    buf = io.BytesIO()
    torch.save(o.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    ps2 = [p.detach().clone().requires_grad_() for p in ps]
    o2 = ot.AdamW8bit(ps2, lr=1e-2)
    o2.load_state_dict(sd)
    for _ in range(3):
        for p, p2 in zip(ps, ps2):
            g = torch.randn(p.shape)
            p.grad, p2.grad = g.clone(), g.clone()
        o.step()
        o2.step()
    for a, b in zip(ps, ps2):
        assert torch.equal(a, b)
        for k, v in o.state[a].items():
            assert torch.equal(v, o2.state[b][k]), k
    back = torch.optim.AdamW([p.detach().clone().requires_grad_() for p in ps], lr=1e-2)
    back.load_state_dict(o.dequantized_state_dict())
    s0 = back.state[back.param_groups[0]["params"][0]]
    assert s0["exp_avg"].dtype == torch.float32 and "exp_avg_absmax" not in s0
    again = ot.AdamW8bit([p.detach().clone().requires_grad_() for p in ps], lr=1e-2)
    again.load_state_dict(back.state_dict())
    a0 = again.state[again.param_groups[0]["params"][0]]
    assert a0["exp_avg"].dtype == torch.uint8
    # Dequantized, then quantized again: the codes come back where the block's largest
    # magnitude is a code of magnitude 1 (every block of exp_avg_sq: v >= 0).
    assert torch.equal(a0["exp_avg_sq"], o.state[ps[0]]["exp_avg_sq"])


def test_torch_bad_input_refused_changing_nothing():
    p = torch.zeros(5000, requires_grad=True)
    with pytest.raises(ValueError, match="amsgrad"):
        ot.Adam8bit([p], amsgrad=True)
    with pytest.raises(ValueError, match="differentiable"):
        ot.AdamW8bit([p], differentiable=True)
    opt = ot.AdamW8bit([p], lr=1e-2)
    p.grad = torch.ones(5000)
    opt.step()
    opt.state[p]["exp_avg"] = opt.state[p]["exp_avg"].to(torch.int16)
    before = p.detach().clone()
    with pytest.raises(TypeError, match="uint8"):
        opt.step()
    assert torch.equal(p, before) and opt.state[p]["step"].item() == 1.0


# ---- the passes around the step: fused clipping and GradScaler ----------------------------


@pytest.mark.parametrize(
    ("cls_t", "cls_n"), [(ot.Adam8bit, optirs.Adam8bit), (ot.AdamW8bit, optirs.AdamW8bit)]
)
@pytest.mark.parametrize("block", [256, 100])
def test_fused_clip_is_clip_then_step_bit_for_bit(cls_t, cls_n, block):
    """``opt.clip_grad_norm_(c); opt.step()`` with 8-bit state equals torch's clipping of the
    gradients followed by the plain 8-bit step, bit for bit (parameters and every state entry),
    in both APIs, with the gradients left as they were; a block size that does not divide the
    gradient scratch's pieces included."""
    torch.manual_seed(3)
    shapes = [(70, 130), (5000,), (10,)]
    ps = [torch.randn(s, requires_grad=True) for s in shapes]
    qs = [p.detach().clone().requires_grad_() for p in ps]
    arrays = [p.detach().clone().numpy() for p in ps]
    fused = cls_t(ps, lr=1e-2, weight_decay=0.1, block_size=block)
    plain = cls_t(qs, lr=1e-2, weight_decay=0.1, block_size=block)
    numpy_opt = cls_n(arrays, lr=1e-2, weight_decay=0.1, block_size=block)
    for step in range(4):
        gs = [torch.randn(s) * (5.0 if step % 2 else 0.01) for s in shapes]
        for p, q, g in zip(ps, qs, gs):
            p.grad, q.grad = g.clone(), g.clone()
        norm = fused.clip_grad_norm_(0.5)
        np_norm = numpy_opt.clip_grad_norm_([g.numpy() for g in gs], 0.5)
        assert float(norm) == np_norm
        fused.step()
        numpy_opt.step([g.numpy().copy() for g in gs])
        torch.nn.utils.clip_grads_with_norm_(qs, 0.5, norm)
        plain.step()
        for p, q, a, g in zip(ps, qs, arrays, gs):
            assert torch.equal(p.detach(), q.detach()), step
            assert p.detach().numpy().tobytes() == a.tobytes(), step
            assert torch.equal(p.grad, g), "the gradients are not modified"
            for key, value in fused.state[p].items():
                assert torch.equal(value, plain.state[q][key]), key


@pytest.mark.parametrize("cls", [ot.Adam8bit, ot.AdamW8bit])
def test_grad_scaler_unscales_inside_the_8bit_step(cls):
    """Under ``torch.amp.GradScaler`` the 8-bit step unscales as it reads (a power-of-two
    scale: exact) and skips a step whose gradients overflowed, as ``unscale_`` beforehand
    and the plain step do."""
    torch.manual_seed(4)
    shapes = [(64, 80), (7,)]
    a = [torch.randn(s, requires_grad=True) for s in shapes]
    b = [p.detach().clone().requires_grad_() for p in a]
    oa, ob = cls(a, lr=1e-2), cls(b, lr=1e-2)
    assert oa._step_supports_amp_scaling
    sa, sb = (torch.amp.GradScaler("cpu", init_scale=2.0**10) for _ in "ab")
    for step in range(5):
        gs = [torch.randn(s) for s in shapes]
        if step == 2:
            gs[0][0, 0] = float("inf")  # this step is skipped, and the scale backs off
        for params, opt, scaler in ((a, oa, sa), (b, ob, sb)):
            opt.zero_grad()
            loss = sum((p * g).sum() for p, g in zip(params, gs))
            scaler.scale(loss).backward()
            if opt is ob:
                scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
        assert sa.get_scale() == sb.get_scale()
        for p, q in zip(a, b):
            assert torch.equal(p, q), step
        for p, q in zip(a, b):
            for key, value in oa.state[p].items():
                assert torch.equal(value, ob.state[q][key]), key
