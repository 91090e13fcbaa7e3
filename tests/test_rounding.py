"""16-bit parameters that learn: ``bf16_stochastic_round=True`` and ``master_weights=True``.

The digits MLP held in bfloat16 (the issue's measurement), reproducibility across threads and
SIMD levels, the rounding's two neighbours and their frequencies, state dict round trips (torch
and back), every optimizer of both APIs, and bad input refused with nothing modified."""

from __future__ import annotations

import copy
import io
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np
import optirs
import optirs.torch as ot
import pytest
import torch
from optirs import _spec
from torch import nn
from torch.func import functional_call
from torch_helpers import digits_mlp

BF16 = ml_dtypes.bfloat16


# ---- the rounding itself ----------------------------------------------------------------------


def _neighbours(x32: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The bfloat16 at or toward zero from each float32 (truncation), the next one away from
    zero, and the fraction of a bfloat16 step the float32 lies beyond the first."""
    bits = x32.view(torch.int32)
    down = (bits & ~0xFFFF).view(torch.float32)
    up = ((bits & ~0xFFFF) + 0x10000).view(torch.float32)
    frac = (bits & 0xFFFF).to(torch.float64) / 65536.0
    return down.to(torch.bfloat16), up.to(torch.bfloat16), frac


def test_each_element_is_rounded_to_a_neighbour_as_often_as_its_distance_says():
    torch.manual_seed(3)
    n = 200_000
    p0 = torch.randn(n).to(torch.bfloat16)
    g = (torch.randn(n) * 1e-2).to(torch.bfloat16)
    # The float32 result of one AdamW step of these values: torch.optim in float32 (optirs's
    # float32 step is bitwise torch's).
    p32 = nn.Parameter(p0.float())
    p32.grad = g.float()
    torch.optim.AdamW([p32], lr=1e-3).step()
    x32 = p32.detach()
    down, up, frac = _neighbours(x32)

    p = nn.Parameter(p0.clone())
    p.grad = g.clone()
    ot.AdamW([p], lr=1e-3, bf16_stochastic_round=True, seed=11).step()
    got = p.detach()
    is_down = got.view(torch.int16) == down.view(torch.int16)
    is_up = got.view(torch.int16) == up.view(torch.int16)
    assert bool((is_down | is_up).all()), "an element rounded to neither neighbour"
    # Exact results stay; the rest go up with probability `frac`.
    assert bool(is_down[frac == 0].all())
    expected = float(frac.sum())
    sd = float((frac * (1 - frac)).sum()) ** 0.5
    ups = int((is_up & ~is_down).sum())
    assert abs(ups - expected) < 5 * sd, (ups, expected, sd)
    # Round to nearest would have rounded differently often: the bits are not nearest's.
    nearest = x32.to(torch.bfloat16)
    assert int((got != nearest).sum()) > n // 10


def test_nan_and_infinity_stay():
    p = nn.Parameter(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.bfloat16))
    p.grad = torch.tensor([float("nan"), float("inf"), 0.0, 1.0], dtype=torch.bfloat16)
    ot.SGD([p], lr=1.0, bf16_stochastic_round=True, seed=1).step()
    v = p.detach().float()
    assert torch.isnan(v[0]) and v[1] == float("-inf") and v[2] == 3.0 and v[3] == 3.0


# ---- reproducibility -----------------------------------------------------------------------------


def _run_sr(
    seed: int | None,
    threads: int | None = None,
    level: str | None = None,
    n: int = 70_001,
    cls: type = ot.AdamW,
):
    """Five steps of ``cls`` with stochastic rounding (``seed``; None: master weights instead)
    over a parameter of several work items (8-bit state in blocks, the last one partial, for
    the 8-bit optimizers) and a small one (float state there)."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(n).to(torch.bfloat16))
    q = nn.Parameter(torch.randn(3, 5).to(torch.bfloat16))
    kw = {"master_weights": True} if seed is None else {"bf16_stochastic_round": True, "seed": seed}
    opt = cls([p, q], lr=1e-3, **kw)
    g = torch.Generator().manual_seed(5)
    old_threads, old_level = optirs.get_num_threads(), optirs.simd_level()
    try:
        if threads is not None:
            optirs.set_num_threads(threads)
        if level is not None:
            optirs.set_simd_level(level)
        for _ in range(5):
            p.grad = (torch.randn(n, generator=g) * 1e-2).to(torch.bfloat16)
            q.grad = (torch.randn(3, 5, generator=g) * 1e-2).to(torch.bfloat16)
            opt.step()
    finally:
        optirs.set_num_threads(old_threads)
        optirs.set_simd_level(old_level)
    return p.detach().clone(), q.detach().clone()


@pytest.mark.parametrize(
    "cls", [ot.AdamW, ot.AdamW8bit, ot.Adafactor], ids=["AdamW", "AdamW8bit", "Adafactor"]
)
def test_bitwise_reproducible_across_threads_levels_and_runs(cls):
    want = _run_sr(7, cls=cls)
    for threads in (1, 2, 3):
        for level in optirs.simd_levels():
            got = _run_sr(7, threads, level, cls=cls)
            for a, b in zip(got, want):
                assert torch.equal(a.view(torch.int16), b.view(torch.int16)), (threads, level)
    other = _run_sr(8, cls=cls)
    assert not torch.equal(other[0], want[0]), "another seed draws other bits"
    master = _run_sr(None, cls=cls)
    for threads in (1, 3):
        for level in optirs.simd_levels():
            got = _run_sr(None, threads, level, cls=cls)
            for a, b in zip(got, master):
                assert torch.equal(a.view(torch.int16), b.view(torch.int16)), (threads, level)


def test_default_seed_follows_manual_seed():
    def seed_of() -> int:
        p = nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))
        return ot.SGD([p], lr=0.1, bf16_stochastic_round=True).param_groups[0]["seed"]

    optirs.manual_seed(123)
    a = [seed_of(), seed_of()]
    optirs.manual_seed(123)
    b = [seed_of(), seed_of()]
    assert a == b and a[0] != a[1]
    optirs.manual_seed(124)
    assert seed_of() != a[0]
    arr = np.zeros(2, BF16)
    optirs.manual_seed(123)
    assert optirs.SGD([arr], lr=0.1, bf16_stochastic_round=True).param_groups[0]["seed"] == a[0]


@pytest.mark.parametrize(
    ("name", "n"),
    [("Adam", 1000), ("Adam8bit", 5000)],  # 8-bit: over min_8bit_size (4096), 8-bit state
    ids=["Adam", "Adam8bit"],
)
def test_numpy_and_torch_apis_round_alike(name, n):
    torch.manual_seed(1)
    p0 = torch.randn(n).to(torch.bfloat16)
    grads = [(torch.randn(n) * 1e-2).to(torch.bfloat16) for _ in range(3)]
    p = nn.Parameter(p0.clone())
    opt = getattr(ot, name)([p], lr=1e-3, bf16_stochastic_round=True, seed=99)
    a = p0.view(torch.int16).numpy().view(BF16).copy()
    nopt = getattr(optirs, name)([a], lr=1e-3, bf16_stochastic_round=True, seed=99)
    for g in grads:
        p.grad = g
        opt.step()
        nopt.step([g.view(torch.int16).numpy().view(BF16)])
    assert np.array_equal(p.detach().view(torch.int16).numpy(), a.view(np.int16))
    assert nopt.param_groups[0]["sr_step"] == opt.param_groups[0]["sr_step"] == 3


# ---- every optimizer ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(_spec.SPECS))
def test_every_optimizer_with_each_option(name):
    cls = getattr(ot, name)
    torch.manual_seed(2)
    p0 = torch.randn(4, 33).to(torch.bfloat16)
    grads = [(torch.randn(4, 33) * 1e-1).to(torch.bfloat16) for _ in range(3)]
    lr = {"Adadelta": 1.0, "Rprop": 1e-2}.get(name, 1e-2)

    plain = nn.Parameter(p0.clone())
    o_plain = cls([plain], lr=lr)
    sr = nn.Parameter(p0.clone())
    o_sr = cls([sr], lr=lr, bf16_stochastic_round=True, seed=4)
    m = nn.Parameter(p0.clone())
    o_m = cls([m], lr=lr, master_weights=True)
    # The master copy, stepped in float32 by the same optimizer over a float32 parameter with
    # the bfloat16 gradients: the float32 step except that the state stays bfloat16 (the
    # parameter's dtype), so compared loosely here; the kernels' tests compare bit for bit.
    f32 = nn.Parameter(p0.float())
    o_f32 = cls([f32], lr=lr)
    for g in grads:
        for q in (plain, sr, m):
            q.grad = g.clone()
        f32.grad = g.float()
        for o in (o_plain, o_sr, o_m, o_f32):
            o.step()
    master = o_m.state[m]["master_param"]
    assert master.dtype == torch.float32
    assert torch.equal(master.to(torch.bfloat16), m.detach())
    torch.testing.assert_close(master, f32.detach(), rtol=2e-2, atol=2e-3)
    assert not torch.equal(sr.detach(), p0)
    # Stochastic rounding moves elements round to nearest leaves or rounds elsewhere.
    assert not torch.equal(sr.detach(), plain.detach())

    # NumPy API, same seed: the same bits.
    a = p0.view(torch.int16).numpy().view(BF16).copy()
    nopt = getattr(optirs, name)([a], lr=lr, bf16_stochastic_round=True, seed=4)
    for g in grads:
        nopt.step([g.view(torch.int16).numpy().view(BF16)])
    assert np.array_equal(a.view(np.int16), sr.detach().view(torch.int16).numpy())


def test_float32_and_float64_parameters_are_left_alone_by_both_options():
    for dtype in (torch.float32, torch.float64):
        torch.manual_seed(0)
        p0 = torch.randn(50, dtype=dtype)
        g = torch.randn(50, dtype=dtype)
        outs = []
        for kw in ({}, {"bf16_stochastic_round": True, "seed": 1}, {"master_weights": True}):
            p = nn.Parameter(p0.clone())
            p.grad = g.clone()
            opt = ot.AdamW([p], lr=1e-2, **kw)
            opt.step()
            assert "master_param" not in opt.state[p]
            outs.append(p.detach())
        assert all(torch.equal(o, outs[0]) for o in outs)


# ---- state dicts ---------------------------------------------------------------------------


def _train_steps(opt, params, grads):
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()


class _HalfTrained(NamedTuple):
    p0: list[torch.Tensor]  # the starting bfloat16 values
    grads: list[list[torch.Tensor]]  # six steps' gradients
    kw: dict[str, Any]  # the option (and seed) both optimizers were built with
    want: list[torch.Tensor]  # the parameters after all six steps
    params: list[nn.Parameter]  # the half-trained optimizer's, after three steps
    opt: Any  # the optimizer trained three steps
    saved: dict[str, Any]  # its state dict through torch.save and torch.load (weights only)


def _half_trained(cls: type, option: str, shapes: list[tuple[int, ...]]) -> _HalfTrained:
    """``cls`` with ``option`` over bfloat16 parameters of ``shapes``: trained six steps (the
    parameters to reach), and another trained three steps, its state dict saved and loaded."""
    torch.manual_seed(0)
    p0 = [torch.randn(s).to(torch.bfloat16) for s in shapes]
    grads = [[(torch.randn(s) * 1e-2).to(torch.bfloat16) for s in shapes] for _ in range(6)]
    kw = {option: True, **({"seed": 21} if option == "bf16_stochastic_round" else {})}

    ps = [nn.Parameter(t.clone()) for t in p0]
    opt = cls(ps, lr=1e-3, **kw)
    _train_steps(opt, ps, grads)
    want = [p.detach().clone() for p in ps]

    ps2 = [nn.Parameter(t.clone()) for t in p0]
    opt2 = cls(ps2, lr=1e-3, **kw)
    _train_steps(opt2, ps2, grads[:3])
    buf = io.BytesIO()
    torch.save(opt2.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    return _HalfTrained(p0, grads, kw, want, ps2, opt2, saved)


@pytest.mark.parametrize("option", ["bf16_stochastic_round", "master_weights"])
def test_state_dict_round_trip_restores_training_bit_for_bit(option):
    _, grads, _, want, ps2, opt2, saved = _half_trained(ot.AdamW, option, [(40, 30), (30,)])
    if option == "master_weights":
        assert saved["state"][0]["master_param"].dtype == torch.float32
    else:
        assert saved["param_groups"][0]["sr_step"] == 3
    # Into torch.optim, which keeps the unknown group keys and state entries, and back.
    t = torch.optim.AdamW([nn.Parameter(p.detach().clone()) for p in ps2], lr=1e-3)
    t.load_state_dict(saved)
    assert t.param_groups[0].get(option) is True
    back = [nn.Parameter(p.detach().clone()) for p in ps2]
    ot.AdamW(back, lr=1e-3).load_state_dict(t.state_dict())
    if option == "bf16_stochastic_round":
        # The seed and step count survive torch.optim: training goes on bit for bit.
        saved = t.state_dict()
    else:
        # torch.optim's load_state_dict casts every state tensor to its parameter's dtype: the
        # master copy comes back as the bfloat16 parameter's value, no longer bit for bit.
        m = t.state[t.param_groups[0]["params"][0]]["master_param"]
        assert m.dtype == torch.bfloat16
    ps3 = [nn.Parameter(p.detach().clone()) for p in ps2]
    opt3 = ot.AdamW(ps3, lr=1e-3, **{option: True})  # another seed: the loaded one wins
    opt3.load_state_dict(saved)
    if option == "master_weights":
        assert opt3.state[ps3[0]]["master_param"].dtype == torch.float32
        assert torch.equal(opt3.state[ps3[0]]["master_param"], opt2.state[ps2[0]]["master_param"])
    _train_steps(opt3, ps3, grads[3:])
    for a, b in zip(ps3, want):
        assert torch.equal(a.detach().view(torch.int16), b.view(torch.int16))


def test_loading_a_state_without_master_builds_it_from_the_parameter():
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(10).to(torch.bfloat16))
    plain = ot.AdamW([p], lr=1e-3)
    p.grad = torch.randn(10).to(torch.bfloat16)
    plain.step()
    opt = ot.AdamW([p], lr=1e-3, master_weights=True)
    opt.load_state_dict(plain.state_dict())
    assert "master_param" not in opt.state[p]
    assert opt.param_groups[0]["master_weights"] is True
    before = p.detach().float().clone()
    opt.step()
    assert opt.state[p]["master_param"].dtype == torch.float32
    assert not torch.equal(opt.state[p]["master_param"], before)

    # The NumPy API likewise.
    a = np.linspace(-1, 1, 10).astype(BF16)
    nplain = optirs.AdamW([a], lr=1e-3)
    nplain.step([np.full(10, 0.5, BF16)])
    nopt = optirs.AdamW([a], lr=1e-3, master_weights=True)
    nopt.load_state_dict(nplain.state_dict())
    nopt.step([np.full(10, 0.5, BF16)])
    m = nopt.state[a]["master_param"]
    assert m.dtype == np.float32 and np.array_equal(m.astype(BF16), a)
    sd = nopt.state_dict()
    again = optirs.AdamW([a.copy()], lr=1e-3, master_weights=True)
    again.load_state_dict(sd)
    assert np.array_equal(next(iter(again.state.values()))["master_param"], m)


# ---- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "exc", "match"),
    [
        ({"bf16_stochastic_round": True, "seed": "1"}, TypeError, "seed must be an int"),
        ({"bf16_stochastic_round": True, "seed": True}, TypeError, "seed must be an int"),
        ({"bf16_stochastic_round": True, "seed": -1}, ValueError, r"seed must be in \[0"),
        ({"bf16_stochastic_round": True, "seed": 1 << 64}, ValueError, r"seed must be in"),
        ({"bf16_stochastic_round": 1}, TypeError, "bf16_stochastic_round must be a bool"),
        ({"master_weights": "yes"}, TypeError, "master_weights must be a bool"),
        ({"bf16_stochastic_round": True, "master_weights": True}, ValueError, "choose one"),
    ],
)
def test_bad_options_refused_at_construction(kw, exc, match):
    with pytest.raises(exc, match=match):
        ot.AdamW([nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))], **kw)
    with pytest.raises(exc, match=match):
        optirs.AdamW([np.zeros(2, BF16)], **kw)


def test_float16_stochastic_rounding_refused_with_nothing_modified():
    p = nn.Parameter(torch.ones(8, dtype=torch.float16))
    q = nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    for t in (p, q):
        t.grad = torch.ones_like(t)
    opt = ot.Adam([q, p], lr=0.1, bf16_stochastic_round=True, seed=1)
    with pytest.raises(ValueError, match=r"float16.*bf16_stochastic_round.*master_weights=True"):
        opt.step()
    assert torch.equal(p.detach(), torch.ones(8, dtype=torch.float16))
    assert torch.equal(q.detach(), torch.ones(8, dtype=torch.bfloat16))
    assert opt.state == {} or all(not s for s in opt.state.values())
    assert opt.param_groups[0]["sr_step"] == 0
    # float16 with master weights works.
    p16 = nn.Parameter(torch.ones(8, dtype=torch.float16))
    p16.grad = torch.full_like(p16, 1e-3)
    o16 = ot.SGD([p16], lr=1e-3, master_weights=True)
    for _ in range(3):
        o16.step()
    m = o16.state[p16]["master_param"]
    assert torch.equal(m.to(torch.float16), p16.detach()) and float(m[0]) < 1.0


def test_bad_group_entries_refused_at_step_with_nothing_modified():
    a = np.ones(8, BF16)
    opt = optirs.SGD([a], lr=0.1, bf16_stochastic_round=True, seed=1)
    for key, value, exc in (
        ("seed", "x", TypeError),
        ("seed", -3, ValueError),
        ("sr_step", 1.5, TypeError),
        ("bf16_stochastic_round", "no", TypeError),
    ):
        group = opt.param_groups[0]
        old = group[key]
        group[key] = value
        with pytest.raises(exc, match=key):
            opt.step([np.ones(8, BF16)])
        assert np.array_equal(a, np.ones(8, BF16))
        assert group["sr_step"] == (0 if key != "sr_step" else 1.5)
        group[key] = old
    bad = optirs.SGD([np.ones(8, BF16)], lr=0.1, master_weights=True)
    sd = bad.state_dict()
    sd["param_groups"][0]["bf16_stochastic_round"] = True
    sd["param_groups"][0]["seed"] = 1
    with pytest.raises(ValueError, match="choose one"):
        bad.load_state_dict(sd)
    assert "bf16_stochastic_round" not in bad.param_groups[0]


# ---- 8-bit Adam ------------------------------------------------------------------------------

_M64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def _lowbias32(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def _sr_reference(x32: np.ndarray, seed: int, step: int, param: int) -> np.ndarray:
    """The bfloat16 bits (as uint16) stochastic rounding gives float32 ``x32``, the parameter
    of flat index ``param`` at group step ``step``, written out from the definition in
    ``optirs_core::kernels::sr`` (each element's 32 random bits from its index within the
    parameter) and torchao's rounding (the top 16 random bits added, then truncated)."""
    z = _splitmix64(_splitmix64(_splitmix64(seed) ^ step) ^ param)
    k0, k1 = np.uint32(z & 0xFFFFFFFF), np.uint32(z >> 32)
    idx = np.arange(x32.size, dtype=np.uint64)
    lo = (idx & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    hi = (idx >> np.uint64(32)).astype(np.uint32)
    r = _lowbias32(_lowbias32(lo ^ k0) ^ hi ^ k1)
    bits = x32.astype(np.float32).view(np.uint32)
    return ((bits + (r >> np.uint32(16))) >> np.uint32(16)).astype(np.uint16)


def test_eight_bit_stochastic_rounding_matches_the_definition():
    """Each step: the float32 result (the same 8-bit state stepping the widened parameter),
    rounded with each element's own random bits, as written out in Python."""
    torch.manual_seed(4)
    n, seed = 10_000, 77
    p = nn.Parameter(torch.randn(n).to(torch.bfloat16))
    opt = ot.AdamW8bit([p], lr=1e-2, bf16_stochastic_round=True, seed=seed)
    for t in range(3):
        g = (torch.randn(n) * 1e-2).to(torch.bfloat16)
        wide = nn.Parameter(p.detach().float())
        ref = ot.AdamW8bit([wide], lr=1e-2)
        # A copy: torch's load_state_dict would share the step counter's tensor.
        ref.load_state_dict(copy.deepcopy(opt.state_dict()))
        wide.grad = g.float()
        ref.step()
        p.grad = g
        opt.step()
        want = _sr_reference(wide.detach().numpy(), seed, t, 0)
        got = p.detach().view(torch.int16).numpy().view(np.uint16)
        assert np.array_equal(got, want), t
        for k in ("exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax"):
            assert torch.equal(opt.state[p][k], ref.state[wide][k]), (t, k)
    assert opt.param_groups[0]["sr_step"] == 3
    # Not round to nearest.
    assert not torch.equal(p.detach(), wide.detach().to(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_eight_bit_master_weights_are_the_float32_step(dtype):
    """A 16-bit parameter's master copy takes exactly the steps a float32 parameter with the
    same 8-bit state takes (the gradients widened), and the parameter is it rounded to
    nearest; the 8-bit state is the same too."""
    torch.manual_seed(5)
    n = 9000
    p0 = torch.randn(n).to(dtype)
    grads = [(torch.randn(n) * 1e-2).to(dtype) for _ in range(4)]
    p = nn.Parameter(p0.clone())
    opt = ot.AdamW8bit([p], lr=1e-2, master_weights=True)
    f = nn.Parameter(p0.float())
    ref = ot.AdamW8bit([f], lr=1e-2)
    for g in grads:
        p.grad, f.grad = g, g.float()
        opt.step()
        ref.step()
    master = opt.state[p]["master_param"]
    assert master.dtype == torch.float32
    assert torch.equal(master.view(torch.int32), f.detach().view(torch.int32))
    assert torch.equal(p.detach().view(torch.int16), f.detach().to(dtype).view(torch.int16))
    for k in ("exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax"):
        assert torch.equal(opt.state[p][k], ref.state[f][k]), k
    if dtype != torch.bfloat16:
        return  # the NumPy API takes no float16 parameters
    # The NumPy API, from the same start: the same bits.
    a = p0.view(torch.int16).numpy().view(BF16).copy()
    nopt = optirs.AdamW8bit([a], lr=1e-2, master_weights=True)
    for g in grads:
        nopt.step([g.view(torch.int16).numpy().view(BF16)])
    assert np.array_equal(a.view(np.int16), p.detach().view(torch.int16).numpy())
    assert np.array_equal(nopt.state[a]["master_param"], master.numpy())


@pytest.mark.parametrize("name", ["AdamW8bit", "Adafactor"])
@pytest.mark.parametrize("option", ["bf16_stochastic_round", "master_weights"])
def test_own_state_dict_round_trip_restores_training_bit_for_bit(option, name):
    """The optimizers with state of their own (8-bit, and for the small parameter float;
    Adafactor's factors) with either option: saved, loaded into a new optimizer, training goes
    on bit for bit, in both APIs, and both APIs give the same bits."""
    tcls, ncls = getattr(ot, name), getattr(optirs, name)
    p0, grads, kw, want, ps2, opt2, saved = _half_trained(tcls, option, [(80, 70), (30,)])
    if option == "master_weights":
        for i in (0, 1):
            assert saved["state"][i]["master_param"].dtype == torch.float32
        if name == "AdamW8bit":
            deq = opt2.dequantized_state_dict()["state"][0]
            assert torch.equal(deq["master_param"], opt2.state[ps2[0]]["master_param"])
    ps3 = [nn.Parameter(p.detach().clone()) for p in ps2]
    opt3 = tcls(ps3, lr=1e-3, **{option: True})  # another seed: the loaded one wins
    opt3.load_state_dict(saved)
    if option == "master_weights":
        for a, b in zip(ps3, ps2):
            m3, m2 = opt3.state[a]["master_param"], opt2.state[b]["master_param"]
            assert m3.dtype == torch.float32 and torch.equal(m3, m2)
    _train_steps(opt3, ps3, grads[3:])
    for a, b in zip(ps3, want):
        assert torch.equal(a.detach().view(torch.int16), b.view(torch.int16))

    # The NumPy API.
    def arrays() -> list[np.ndarray]:
        return [t.view(torch.int16).numpy().view(BF16).copy() for t in p0]

    def np_grads(gs: list[torch.Tensor]) -> list[np.ndarray]:
        return [g.view(torch.int16).numpy().view(BF16) for g in gs]

    full = arrays()
    nfull = ncls(full, lr=1e-3, **kw)
    for gs in grads:
        nfull.step(np_grads(gs))
    half_way = arrays()
    nhalf = ncls(half_way, lr=1e-3, **kw)
    for gs in grads[:3]:
        nhalf.step(np_grads(gs))
    sd = nhalf.state_dict()
    again = [x.copy() for x in half_way]
    nagain = ncls(again, lr=1e-3, **{option: True})
    nagain.load_state_dict(sd)
    for gs in grads[3:]:
        nagain.step(np_grads(gs))
    for x, y in zip(again, full):
        assert np.array_equal(x.view(np.int16), y.view(np.int16))
    for x, y in zip(full, want):
        assert np.array_equal(x.view(np.int16), y.view(torch.int16).numpy())


def test_eight_bit_master_made_from_the_parameter_when_missing():
    """Switched on later, or loaded from a state dict without it: the copy is the parameter's
    value at the next step, and the 8-bit state goes on."""
    a = np.linspace(-1, 1, 5000).astype(BF16)
    opt = optirs.AdamW8bit([a], lr=1e-3)
    opt.step([np.full(5000, 0.5, BF16)])
    opt.param_groups[0]["master_weights"] = True
    opt.step([np.full(5000, 0.5, BF16)])
    m = opt.state[a]["master_param"]
    assert m.dtype == np.float32 and np.array_equal(m.astype(BF16), a)
    assert float(opt.state[a]["step"]) == 2.0

    p = nn.Parameter(torch.linspace(-1, 1, 5000).to(torch.bfloat16))
    p.grad = torch.full_like(p, 0.5)
    plain = ot.AdamW8bit([p], lr=1e-3)
    plain.step()
    topt = ot.AdamW8bit([p], lr=1e-3, master_weights=True)
    topt.load_state_dict(plain.state_dict())
    assert "master_param" not in topt.state[p]
    topt.step()
    tm = topt.state[p]["master_param"]
    assert tm.dtype == torch.float32 and torch.equal(tm.to(torch.bfloat16), p.detach())
    assert np.array_equal(tm.numpy(), m)


def test_eight_bit_bad_rounding_refused_with_nothing_modified():
    for cls in (ot.AdamW8bit, optirs.AdamW8bit):
        with pytest.raises(ValueError, match="choose one"):
            cls(
                [nn.Parameter(torch.zeros(2))] if cls is ot.AdamW8bit else [np.zeros(2)],
                bf16_stochastic_round=True,
                master_weights=True,
            )
    p = nn.Parameter(torch.ones(5000, dtype=torch.float16))
    p.grad = torch.ones_like(p)
    opt = ot.AdamW8bit([p], lr=0.1, bf16_stochastic_round=True, seed=1)
    with pytest.raises(ValueError, match=r"float16.*bf16_stochastic_round.*master_weights=True"):
        opt.step()
    assert torch.equal(p.detach(), torch.ones(5000, dtype=torch.float16))
    assert not opt.state.get(p) and opt.param_groups[0]["sr_step"] == 0
    a = np.ones(5000, BF16)
    nopt = optirs.AdamW8bit([a], lr=0.1, master_weights=True)
    nopt.step([np.ones(5000, BF16)])
    nopt.state[a]["master_param"] = np.zeros(5000, np.float64)
    before = a.copy()
    with pytest.raises(TypeError, match=r"master_param.*float32"):
        nopt.step([np.ones(5000, BF16)])
    assert np.array_equal(a.view(np.int16), before.view(np.int16))


# ---- the digits MLP held in bfloat16 ---------------------------------------------------------

STEPS = 600
BATCH = 128


def _digits_loss(dtype: torch.dtype, **options) -> float:
    """Mean training loss over the last 100 of ``STEPS`` AdamW steps (lr 3e-4, torch's default
    weight decay) of an MLP on scikit-learn's digits whose parameters are held in ``dtype``
    (the issue's measurement). The forward and backward passes compute in float32 from the
    held values, so that only how the parameters are stored differs between runs."""
    datasets = pytest.importorskip("sklearn.datasets", reason="the digits run needs scikit-learn")
    x, y, model = digits_mlp(datasets)
    model.to(dtype)
    opt = ot.AdamW(model.parameters(), lr=3e-4, **options)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(STEPS):
        idx = torch.randint(0, len(x), (BATCH,), generator=g)
        model.zero_grad()
        held = {n: p.float() for n, p in model.named_parameters()}
        loss = nn.functional.cross_entropy(functional_call(model, held, (x[idx],)), y[idx])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return sum(losses[-100:]) / 100


def test_bfloat16_training_with_each_remedy_ends_within_2_percent_of_float32():
    base = _digits_loss(torch.float32)
    plain = _digits_loss(torch.bfloat16)
    master = _digits_loss(torch.bfloat16, master_weights=True)
    # Stochastic rounding's result depends on its seed (measured 0.6% to 2.3% above float32
    # over seeds 0 to 2): its expected loss is estimated over three seeds.
    srs = [_digits_loss(torch.bfloat16, bf16_stochastic_round=True, seed=s) for s in range(3)]
    sr = sum(srs) / len(srs)
    print(
        f"digits, last 100 steps: float32 {base:.4f} bfloat16 {plain:.4f} master {master:.4f} "
        f"sr {sr:.4f} (seeds: {', '.join(f'{v:.4f}' for v in srs)})"
    )
    assert plain > 1.5 * base, (plain, base)  # round to nearest stalls
    assert abs(master - base) <= 0.02 * base, (master, base)
    assert abs(sr - base) <= 0.02 * base, (sr, base)


def test_switching_master_weights_on_later_makes_the_copy():
    a = np.linspace(-1, 1, 10).astype(BF16)
    opt = optirs.AdamW([a], lr=1e-3)
    for _ in range(3):
        opt.step([np.full(10, 0.5, BF16)])
    opt.param_groups[0]["master_weights"] = True
    opt.step([np.full(10, 0.5, BF16)])
    m = opt.state[a]["master_param"]
    assert m.dtype == np.float32 and np.array_equal(m.astype(BF16), a)

    p = nn.Parameter(torch.linspace(-1, 1, 10).to(torch.bfloat16))
    p.grad = torch.full_like(p, 0.5)
    topt = ot.AdamW([p], lr=1e-3)
    for _ in range(3):
        topt.step()
    topt.param_groups[0]["master_weights"] = True
    topt.step()
    tm = topt.state[p]["master_param"]
    assert tm.dtype == torch.float32 and torch.equal(tm.to(torch.bfloat16), p.detach())
    assert np.array_equal(tm.numpy(), m)


def test_adafactor_stochastic_rounding_matches_the_definition():
    """Each step: the float32 result (the master copy a master-weights Adafactor makes from the
    parameter and steps, with the same state), rounded with each element's own random bits, as
    written out in Python; over a vector and a matrix of several pieces each."""
    torch.manual_seed(6)
    seed = 5
    ps = [
        nn.Parameter(torch.randn(40_000).to(torch.bfloat16)),
        nn.Parameter(torch.randn(300, 200).to(torch.bfloat16)),
    ]
    opt = ot.Adafactor(ps, lr=1e-2, bf16_stochastic_round=True, seed=seed)
    for t in range(3):
        grads = [(torch.randn(p.shape) * 1e-2).to(torch.bfloat16) for p in ps]
        ref_ps = [nn.Parameter(p.detach().clone()) for p in ps]
        ref = ot.Adafactor(ref_ps, lr=1e-2, master_weights=True)
        sd = copy.deepcopy(opt.state_dict())
        for g in sd["param_groups"]:
            for k in ("bf16_stochastic_round", "seed", "sr_step"):
                g.pop(k)
        ref.load_state_dict(sd)
        for p, r, g in zip(ps, ref_ps, grads):
            p.grad, r.grad = g, g.clone()
        ref.step()
        opt.step()
        for i, (p, r) in enumerate(zip(ps, ref_ps)):
            x32 = ref.state[r]["master_param"]
            # The master copy's value rounded to nearest is the plain step's result.
            assert torch.equal(r.detach(), x32.to(torch.bfloat16))
            want = _sr_reference(x32.numpy().reshape(-1), seed, t, i)
            got = p.detach().view(torch.int16).numpy().reshape(-1).view(np.uint16)
            assert np.array_equal(got, want), (t, i)
            assert not torch.equal(p.detach(), r.detach()), "not round to nearest"
    assert opt.param_groups[0]["sr_step"] == 3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adafactor_master_weights_follow_float32(dtype):
    """The master copy takes the float32 steps (loosely: the factors stay in the parameter's
    dtype, as torch keeps them, and eps1 is its epsilon), the parameter is it rounded to
    nearest, the NumPy API gives the same bits, and a copy is made when the option is
    switched on later."""
    torch.manual_seed(7)
    shapes = [(64, 48), (100,)]
    p0 = [torch.randn(s).to(dtype) for s in shapes]
    grads = [[(torch.randn(s) * 1e-1).to(dtype) for s in shapes] for _ in range(4)]
    ps = [nn.Parameter(t.clone()) for t in p0]
    opt = ot.Adafactor(ps, lr=1e-2, master_weights=True)
    fs = [nn.Parameter(t.float()) for t in p0]
    eps1 = torch.finfo(dtype).eps
    ref = ot.Adafactor(fs, lr=1e-2, eps=(eps1, 1e-3))
    _train_steps(opt, ps, grads)
    _train_steps(ref, fs, [[g.float() for g in gs] for gs in grads])
    for p, f in zip(ps, fs):
        m = opt.state[p]["master_param"]
        assert m.dtype == torch.float32 and torch.equal(m.to(dtype), p.detach())
        torch.testing.assert_close(m, f.detach(), rtol=2e-2, atol=2e-3)
        assert not torch.equal(m, p.detach().float()), "the copy keeps more than the parameter"
    if dtype == torch.bfloat16:
        arrays = [t.view(torch.int16).numpy().view(BF16).copy() for t in p0]
        nopt = optirs.Adafactor(arrays, lr=1e-2, master_weights=True)
        for gs in grads:
            nopt.step([g.view(torch.int16).numpy().view(BF16) for g in gs])
        for a, p in zip(arrays, ps):
            assert np.array_equal(a.view(np.int16), p.detach().view(torch.int16).numpy())
            assert np.array_equal(nopt.state[a]["master_param"], opt.state[p]["master_param"])
    # Switched on later: the copy is the parameter's value, and training goes on.
    q = nn.Parameter(p0[0].clone())
    later = ot.Adafactor([q], lr=1e-2)
    q.grad = grads[0][0]
    later.step()
    later.param_groups[0]["master_weights"] = True
    later.step()
    assert torch.equal(later.state[q]["master_param"].to(dtype), q.detach())


def test_adafactor_bad_rounding_refused_with_nothing_modified():
    with pytest.raises(ValueError, match="choose one"):
        ot.Adafactor(
            [nn.Parameter(torch.zeros(2))], bf16_stochastic_round=True, master_weights=True
        )
    p = nn.Parameter(torch.ones(4, 4, dtype=torch.float16))
    p.grad = torch.ones_like(p)
    opt = ot.Adafactor([p], bf16_stochastic_round=True, seed=1)
    with pytest.raises(ValueError, match=r"float16.*bf16_stochastic_round.*master_weights=True"):
        opt.step()
    assert torch.equal(p.detach(), torch.ones(4, 4, dtype=torch.float16)) and not opt.state
    assert opt.param_groups[0]["sr_step"] == 0
    a = np.ones((4, 4), BF16)
    nopt = optirs.Adafactor([a], master_weights=True)
    nopt.step([np.ones((4, 4), BF16)])
    nopt.state[a]["master_param"] = np.zeros((4, 4), np.float64)
    before = a.copy()
    with pytest.raises(TypeError, match=r"master_param.*float32"):
        nopt.step([np.ones((4, 4), BF16)])
    assert np.array_equal(a.view(np.int16), before.view(np.int16))
