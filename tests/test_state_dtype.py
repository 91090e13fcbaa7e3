"""``state_dtype="bfloat16"``: state buffers kept in bfloat16, computed in float32, rounded to
nearest even once when stored; in both APIs, for every optimizer.

The references are exact: a step with bfloat16 state is a float32 step whose state is rounded to
bfloat16 after it (the update reads the state once, computes in float32, and its parameter comes
from the float32 values before any rounding), so it must agree bit for bit with optirs's own
float32-state step followed by that rounding, and with a NumPy transcription of torch's Adam
formulas in float32.
"""

from __future__ import annotations

import io
import pickle

import ml_dtypes
import numpy as np
import optirs
import optirs.torch as ot
import pytest
import torch
from conftest import (
    FULL_STATE_KWARGS,
    OPTIMIZER_NAMES,
    assert_message,
    assert_same_at_every_simd_level_and_thread_count,
    assert_snapshot_equal,
    optirs_class,
    snapshot,
)
from optirs import _spec

BF16 = np.dtype(ml_dtypes.bfloat16)
SHAPES = [(1,), (7,), (33,), (5, 13), (1000,)]


def _grads(rng, shapes, dtype=np.float32, specials=False):
    out = []
    for s in shapes:
        g = rng.standard_normal(s).astype(dtype)
        if specials and g.size > 4:
            g.flat[[0, 2]] = [np.nan, np.inf]
        out.append(g)
    return out


def _round_state(opt, names) -> None:
    """Rounds every state buffer of ``opt`` (NumPy API, float32 state) to bfloat16 in place."""
    for s in opt.state.values():
        for n in names:
            b = s.get(n)
            if b is not None:
                b[...] = b.astype(BF16).astype(np.float32)


def _reference_kwargs(name, kwargs):
    """The float32-state reference's arguments: a buffer filled from a hyperparameter that the
    rule reads for nothing else (Adagrad's initial_accumulator_value, Rprop's lr) starts as
    bfloat16 holds that value, so the reference's float32 buffer starts there too."""
    spec = _spec.SPECS[name]
    out = dict(kwargs)
    for buf in spec.state:
        if buf.fill is not None:
            value = out.get(buf.fill, spec.defaults[buf.fill])
            out[buf.fill] = float(np.float32(value).astype(BF16))
    return out


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
@pytest.mark.parametrize("specials", [False, True], ids=["finite", "nonfinite"])
def test_bf16_state_is_float32_step_rounded_once(name, specials):
    rng = np.random.default_rng(17)
    kwargs = FULL_STATE_KWARGS[name]
    init = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    a = [p.copy() for p in init]
    b = [p.copy() for p in init]
    opt = optirs_class(name)(a, state_dtype="bfloat16", **kwargs)
    ref = optirs_class(name)(b, **_reference_kwargs(name, kwargs))
    names = _spec.SPECS[name].buffers
    _round_state(ref, names)  # state made at construction (Adagrad's filled sum)
    for step in range(5):
        grads = _grads(rng, SHAPES, specials=specials and step == 2)
        opt.step([g.copy() for g in grads])
        ref.step([g.copy() for g in grads])
        _round_state(ref, names)
        for i, (pa, pb) in enumerate(zip(a, b)):
            assert pa.tobytes() == pb.tobytes(), f"step {step} param {i}"
            sa, sb = opt.state[pa], ref.state[pb]
            assert sorted(sa) == sorted(sb)
            for k in names:
                if k in sa:
                    assert sa[k].dtype == BF16, k
                    assert sa[k].tobytes() == sb[k].astype(BF16).tobytes(), (step, i, k)
            if "step" in sa:
                assert sa["step"].dtype == np.float32 and sa["step"] == sb["step"]


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_torch_bf16_state_is_float32_step_rounded_once(name):
    rng = np.random.default_rng(5)
    kwargs = FULL_STATE_KWARGS[name]
    init = [torch.from_numpy(rng.standard_normal(s).astype(np.float32)) for s in SHAPES]
    a = [p.clone().requires_grad_() for p in init]
    b = [p.clone().requires_grad_() for p in init]
    opt = getattr(ot, name)(a, state_dtype=torch.bfloat16, **kwargs)
    ref = getattr(ot, name)(b, **_reference_kwargs(name, kwargs))
    names = _spec.SPECS[name].buffers
    for pb in b:  # state made at construction (Adagrad's filled sum)
        for k in names:
            t = ref.state.get(pb, {}).get(k)
            if t is not None:
                t.copy_(t.bfloat16())
    for step in range(4):
        for pa, pb, g in zip(a, b, _grads(rng, SHAPES)):
            pa.grad = torch.from_numpy(g.copy())
            pb.grad = torch.from_numpy(g.copy())
        opt.step()
        ref.step()
        for pb in b:
            for k in names:
                t = ref.state[pb].get(k)
                if t is not None:
                    t.copy_(t.bfloat16())
        for i, (pa, pb) in enumerate(zip(a, b)):
            assert torch.equal(pa, pb), f"step {step} param {i}"
            for k in names:
                if k in opt.state[pa]:
                    got = opt.state[pa][k]
                    assert got.dtype == torch.bfloat16
                    assert torch.equal(
                        got.view(torch.int16), ref.state[pb][k].bfloat16().view(torch.int16)
                    )


def _lerp(a, b, w):
    """torch.lerp with a float32 weight: torch's two-branch formula."""
    w = np.float32(w)
    if abs(w) < 0.5:
        return a + w * (b - a)
    return b - (b - a) * (np.float32(1) - w)


@pytest.mark.parametrize("decoupled", [False, True], ids=["Adam", "AdamW"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_bf16_state_against_numpy_float32_reference(decoupled, amsgrad):
    """torch's ``_single_tensor_adam`` transcribed in float32 NumPy, the state rounded to
    bfloat16 (nearest even, ml_dtypes) when stored."""
    rng = np.random.default_rng(3)
    lr, (b1, b2), eps, wd = 0.01, (0.9, 0.999), 1e-8, 0.1
    p = rng.standard_normal(517).astype(np.float32)
    x = p.copy()
    opt = optirs.Adam(
        [x],
        lr=lr,
        weight_decay=wd,
        amsgrad=amsgrad,
        decoupled_weight_decay=decoupled,
        state_dtype=ml_dtypes.bfloat16,
    )
    m = np.zeros_like(p, dtype=BF16)
    v = np.zeros_like(p, dtype=BF16)
    vmax = np.zeros_like(p, dtype=BF16)
    f = np.float32
    for step in range(1, 7):
        g = rng.standard_normal(p.shape).astype(np.float32)
        opt.step([g.copy()])
        if decoupled:
            p = p * f(1 - lr * wd)
        else:
            g = g + f(wd) * p
        mf = _lerp(m.astype(np.float32), g, 1 - b1)
        vf = v.astype(np.float32) * f(b2) + f(1 - b2) * g * g
        bc1, bc2 = 1 - b1**step, 1 - b2**step
        second = vf
        if amsgrad:
            second = np.maximum(vmax.astype(np.float32), vf)
            vmax = second.astype(BF16)
        denom = np.sqrt(second) / f(bc2**0.5) + f(eps)
        p = p + f(-(lr / bc1)) * mf / denom
        m, v = mf.astype(BF16), vf.astype(BF16)
        s = opt.state[x]
        assert x.tobytes() == p.tobytes(), step
        assert s["exp_avg"].tobytes() == m.tobytes(), step
        assert s["exp_avg_sq"].tobytes() == v.tobytes(), step
        if amsgrad:
            assert s["max_exp_avg_sq"].tobytes() == vmax.tobytes(), step


@pytest.mark.parametrize("name", ["Adam", "SGD", "RMSprop"])
def test_bf16_state_same_at_every_simd_level_and_thread_count(name):
    # Large enough to be cut into several work items and shared between threads; odd lengths
    # leave every level a tail.
    shapes = [(70_001,), (33,), (129, 3)]
    kwargs = FULL_STATE_KWARGS[name]

    def run():
        rng = np.random.default_rng(11)
        params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        opt = optirs_class(name)(params, state_dtype="bfloat16", **kwargs)
        for _ in range(3):
            opt.step(_grads(rng, shapes))
        out = [p.tobytes() for p in params]
        for p in params:
            out.extend(v.tobytes() for v in opt.state[p].values())
        return out

    assert_same_at_every_simd_level_and_thread_count(run)


def test_torch_float16_params_with_bf16_state():
    """float16 parameters keep float16, their state bfloat16; the same at every level."""

    def run():
        torch.manual_seed(0)
        p = torch.randn(40_003).half().requires_grad_()
        opt = ot.Adam([p], lr=1e-2, state_dtype="bfloat16")
        for _ in range(3):
            p.grad = torch.randn(40_003).half()
            opt.step()
        s = opt.state[p]
        assert p.dtype == torch.float16
        assert s["exp_avg"].dtype == torch.bfloat16 and s["exp_avg_sq"].dtype == torch.bfloat16
        return [p.detach().numpy().tobytes(), s["exp_avg"].view(torch.int16).numpy().tobytes()]

    assert_same_at_every_simd_level_and_thread_count(run)


def test_mixed_groups_and_bfloat16_params():
    rng = np.random.default_rng(2)
    a = rng.standard_normal(50).astype(np.float32)
    b = rng.standard_normal(50).astype(np.float64)
    c = rng.standard_normal(50).astype(BF16)
    opt = optirs.AdamW([{"params": [a, c], "state_dtype": "bfloat16"}, {"params": [b]}], lr=1e-2)
    assert opt.param_groups[1]["state_dtype"] is None
    for _ in range(2):
        opt.step([rng.standard_normal(50).astype(x.dtype) for x in (a, c, b)])
    assert opt.state[a]["exp_avg"].dtype == BF16
    assert opt.state[c]["exp_avg"].dtype == BF16
    assert opt.state[b]["exp_avg"].dtype == np.float64


# ---- state dicts ---------------------------------------------------------------------------


def _torch_setup(state_dtype=torch.bfloat16, cls=ot.AdamW):
    torch.manual_seed(1)
    params = [torch.randn(300, requires_grad=True), torch.randn(4, 9, requires_grad=True)]
    return params, cls(params, lr=1e-2, amsgrad=True, state_dtype=state_dtype)


def _torch_steps(params, opt, n, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


def test_torch_state_dict_round_trip_continues_bit_for_bit():
    pa, a = _torch_setup()
    _torch_steps(pa, a, 3, 0)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    pb = [p.detach().clone().requires_grad_() for p in pa]
    b = ot.AdamW(pb, lr=1e-2, amsgrad=True, state_dtype=torch.bfloat16)
    b.load_state_dict(loaded)
    for p in pb:
        assert b.state[p]["exp_avg"].dtype == torch.bfloat16
    assert b.param_groups[0]["state_dtype"] == "bfloat16"
    _torch_steps(pa, a, 3, 9)
    _torch_steps(pb, b, 3, 9)
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)
        for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"):
            assert torch.equal(a.state[x][k], b.state[y][k]), k


def test_torch_float32_state_dict_loads_rounded_and_the_way_back():
    torch.manual_seed(4)
    tp = [torch.randn(300, requires_grad=True)]
    t = torch.optim.AdamW(tp, lr=1e-2, foreach=False)
    _torch_steps(tp, t, 2, 3)
    saved = t.state_dict()
    op = [tp[0].detach().clone().requires_grad_()]
    o = ot.AdamW(op, lr=1e-2, state_dtype=torch.bfloat16)
    o.load_state_dict(saved)
    # torch.optim's dict has no state_dtype: the optimizer keeps its own and rounds the state.
    assert o.param_groups[0]["state_dtype"] == "bfloat16"
    got = o.state[op[0]]["exp_avg"]
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, saved["state"][0]["exp_avg"].bfloat16())
    # The way back: torch.optim casts the bfloat16 state to the parameter's dtype.
    back = torch.optim.AdamW([op[0].detach().clone().requires_grad_()], lr=1e-2)
    back.load_state_dict(o.state_dict())
    restored = next(iter(back.state.values()))["exp_avg"]
    assert restored.dtype == torch.float32
    assert torch.equal(restored, got.float())


def test_numpy_state_dict_round_trip_continues_bit_for_bit():
    rng = np.random.default_rng(8)
    pa = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    a = optirs.RMSprop(pa, momentum=0.5, centered=True, state_dtype="bfloat16")
    for _ in range(2):
        a.step(_grads(rng, SHAPES))
    sd = pickle.loads(pickle.dumps(a.state_dict()))
    pb = [p.copy() for p in pa]
    b = optirs.RMSprop(pb, momentum=0.5, centered=True, state_dtype="bfloat16")
    b.load_state_dict(sd)
    for _ in range(3):
        grads = _grads(rng, SHAPES)
        a.step([g.copy() for g in grads])
        b.step(grads)
    for x, y in zip(pa, pb):
        assert x.tobytes() == y.tobytes()
        for k, v in a.state[x].items():
            assert v.dtype == b.state[y][k].dtype and v.tobytes() == b.state[y][k].tobytes()


def test_numpy_float32_state_dict_loads_into_bf16_rounded():
    rng = np.random.default_rng(9)
    p32 = [rng.standard_normal(20).astype(np.float32)]
    a = optirs.Adam(p32)
    a.step(_grads(rng, [(20,)]))
    sd = a.state_dict()
    sd["param_groups"][0].pop("state_dtype")  # as torch.optim's dict has it
    b = optirs.Adam([p32[0].copy()], state_dtype="bfloat16")
    b.load_state_dict(sd)
    s = next(iter(b.state.values()))
    assert s["exp_avg"].dtype == BF16
    assert s["exp_avg"].tobytes() == sd["state"][0]["exp_avg"].astype(BF16).tobytes()


# ---- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["float16", "bf16", torch.float32, np.float64, 3])
def test_unknown_state_dtype_refused(value):
    with pytest.raises(ValueError, match="state_dtype"):
        optirs.Adam([np.zeros(3, np.float32)], state_dtype=value)
    with pytest.raises(ValueError, match="state_dtype"):
        ot.Adam([torch.zeros(3, requires_grad=True)], state_dtype=value)


def test_float64_params_refused_with_bf16_state():
    with pytest.raises(ValueError, match="float64"):
        optirs.Adam([np.zeros(3)], state_dtype="bfloat16")
    p = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = ot.Adam([p], state_dtype=torch.bfloat16)
    p.grad = torch.ones(3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"float64.*state_dtype"):
        opt.step()
    assert torch.equal(p, torch.zeros(3, dtype=torch.float64))
    assert p not in opt.state


def _stepped_numpy():
    rng = np.random.default_rng(1)
    ps = [rng.standard_normal(10).astype(np.float32), rng.standard_normal(6).astype(np.float32)]
    opt = optirs.Adam(ps, state_dtype="bfloat16")
    opt.step(_grads(rng, [(10,), (6,)]))
    return ps, opt


def test_state_buffer_of_wrong_dtype_refused_changing_nothing():
    ps, opt = _stepped_numpy()
    opt.state[ps[1]]["exp_avg_sq"] = opt.state[ps[1]]["exp_avg_sq"].astype(np.float32)
    before = snapshot(opt)
    with pytest.raises(TypeError) as e:
        opt.step([np.ones(10, np.float32), np.ones(6, np.float32)])
    assert_message(e, r"exp_avg_sq", r"float32", r"bfloat16", r"state_dtype")
    assert_snapshot_equal(before, snapshot(opt))


def test_state_buffer_of_wrong_shape_refused_changing_nothing():
    ps, opt = _stepped_numpy()
    opt.state[ps[0]]["exp_avg"] = np.zeros(9, BF16)
    before = snapshot(opt)
    with pytest.raises(ValueError) as e:
        opt.step([np.ones(10, np.float32), np.ones(6, np.float32)])
    assert_message(e, r"exp_avg", r"shape")
    assert_snapshot_equal(before, snapshot(opt))


def test_group_state_dtype_changed_to_garbage_refused():
    _ps, opt = _stepped_numpy()
    opt.param_groups[0]["state_dtype"] = "int8"
    before = snapshot(opt)
    with pytest.raises(ValueError, match="state_dtype"):
        opt.step([np.ones(10, np.float32), np.ones(6, np.float32)])
    assert_snapshot_equal(before, snapshot(opt))


def test_torch_state_of_wrong_dtype_refused_changing_nothing():
    params, opt = _torch_setup()
    _torch_steps(params, opt, 1, 0)
    opt.state[params[0]]["exp_avg"] = opt.state[params[0]]["exp_avg"].float()
    saved = [p.detach().clone() for p in params]
    with pytest.raises(TypeError, match=r"exp_avg.*bfloat16"):
        _torch_steps(params, opt, 1, 1)
    for p, s in zip(params, saved):
        assert torch.equal(p, s)


def test_torch_group_switched_to_float32_state_refuses_bf16_buffers():
    # The plan notices the group's option changing; the full step then refuses the buffers.
    params, opt = _torch_setup()
    _torch_steps(params, opt, 2, 0)
    opt.param_groups[0]["state_dtype"] = None
    with pytest.raises(TypeError, match=r"exp_avg.*bfloat16.*expected float32"):
        _torch_steps(params, opt, 1, 1)
