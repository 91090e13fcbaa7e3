"""optirs.torch.flatten_parameters: contiguous parameter, gradient and state buffers.

Every comparison is bitwise: a flat step runs the same element-wise kernels over the same
values as the per-tensor step, so a model trained flat must end with the very bits of the same
model trained unflat (``torch.equal``), for every optimizer and dtype, with schedulers,
GradScaler, both clips, checkpoints and the fallbacks. ``flat_steps`` counts the steps that
went through the flat path, so each test also asserts which path ran.
"""

from __future__ import annotations

import copy
import io
from datetime import timedelta
from pathlib import Path
from typing import Any

import gloo_workers
import optirs
import optirs.torch as ot
import pytest
import torch
from optirs.torch import _bridge
from torch import nn

DTYPES = {
    "f32": torch.float32,
    "f64": torch.float64,
    "bf16": torch.bfloat16,
    "f16": torch.float16,
}

#: one configuration per optimizer, with the options that change which state it keeps
CONFIGS: dict[str, tuple[Any, dict[str, Any]]] = {
    "SGD": (ot.SGD, {"lr": 0.05}),
    "SGD-nesterov-wd": (
        ot.SGD,
        {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-2},
    ),
    "Adam": (ot.Adam, {"lr": 1e-2}),
    "Adam-amsgrad-wd": (ot.Adam, {"lr": 1e-2, "amsgrad": True, "weight_decay": 1e-2}),
    "AdamW": (ot.AdamW, {"lr": 1e-2}),
    "RMSprop-centered": (ot.RMSprop, {"lr": 1e-3, "momentum": 0.9, "centered": True}),
    "Adagrad": (ot.Adagrad, {"lr": 0.05, "lr_decay": 0.01, "initial_accumulator_value": 0.1}),
    "Adadelta": (ot.Adadelta, {"lr": 1.0, "weight_decay": 1e-3}),
    "RAdam": (ot.RAdam, {"lr": 1e-2}),
    "Rprop": (ot.Rprop, {"lr": 1e-2}),
    "Adamax": (ot.Adamax, {"lr": 1e-2}),
    "NAdam": (ot.NAdam, {"lr": 1e-2, "decoupled_weight_decay": True, "weight_decay": 1e-2}),
    "ASGD": (ot.ASGD, {"lr": 1e-2, "t0": 2}),
    "Lion": (ot.Lion, {"lr": 1e-3, "weight_decay": 0.1}),
    "AdamW-bf16-state": (ot.AdamW, {"lr": 1e-2, "state_dtype": torch.bfloat16}),
}


@pytest.fixture
def flat_steps(monkeypatch) -> list[bool | None]:
    """What each ``_FlatPlan.step`` returned (None: it fell back)."""
    seen: list[bool | None] = []
    real = _bridge._FlatPlan.step

    def step(self, opt):
        r = real(self, opt)
        seen.append(r)
        return r

    monkeypatch.setattr(_bridge._FlatPlan, "step", step)
    return seen


def make_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3)
        ).to(dtype)


def batch(step: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 6, generator=g).to(dtype), torch.randn(16, 3, generator=g).to(dtype)


def loss_of(model: nn.Module, step: int, dtype: torch.dtype) -> torch.Tensor:
    x, y = batch(step, dtype)
    return (model(x).float() - y.float()).pow(2).mean()


def train(
    flat: bool,
    cls: Any,
    kwargs: dict[str, Any],
    dtype: torch.dtype = torch.float32,
    steps: int = 5,
    each: Any = None,
) -> tuple[nn.Module, Any]:
    """``steps`` iterations of zero_grad, backward and step; ``each(i, model, opt)`` runs after
    backward and returns False to skip that step."""
    model = make_model(dtype)
    if flat:
        ot.flatten_parameters(model)
    opt = cls(model.parameters(), **kwargs)
    for i in range(steps):
        opt.zero_grad()
        loss_of(model, i, dtype).backward()
        if each is None or each(i, model, opt) is not False:
            opt.step()
    return model, opt


def assert_same(a: nn.Module, b: nn.Module) -> None:
    for (n, x), y in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(x, y), n


def assert_same_state(a: Any, b: Any) -> None:
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        assert sa[i].keys() == sb[i].keys(), i
        for k in sa[i]:
            x, y = sa[i][k], sb[i][k]
            if isinstance(x, torch.Tensor):
                assert x.dtype == y.dtype and x.shape == y.shape, (i, k)
                assert torch.equal(x, y), (i, k)
            else:
                assert x == y, (i, k)


@pytest.mark.parametrize("dtype_id", list(DTYPES))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_flat_training_gives_the_same_bits(config, dtype_id, flat_steps):
    cls, kwargs = CONFIGS[config]
    dtype = DTYPES[dtype_id]
    if dtype == torch.float64 and "state_dtype" in kwargs:
        pytest.skip("bfloat16 state is refused for float64 parameters")
    ref, ref_opt = train(False, cls, kwargs, dtype)
    assert flat_steps == []
    got, opt = train(True, cls, kwargs, dtype)
    assert_same(got, ref)
    assert_same_state(opt, ref_opt)
    # The first step makes the state (the per-tensor path); every later one steps flat.
    assert flat_steps == [True] * 4


def test_state_is_flat_and_in_torchs_format():
    model, opt = train(True, ot.Adam, {"lr": 1e-2})
    ps = list(model.parameters())
    bufs = opt.__dict__["_optirs_flat_state"]
    flats = {id(t) for _, t in bufs.values()}
    assert len(flats) == 3  # exp_avg, exp_avg_sq, step
    for p in ps:
        st = opt.state[p]
        assert sorted(st) == ["exp_avg", "exp_avg_sq", "step"]
        assert st["step"].dim() == 0 and st["step"].dtype == torch.float32
        assert float(st["step"]) == 5.0
        assert st["exp_avg"].shape == p.shape and id(st["exp_avg"]._base) in flats
    # torch.optim.Adam continues from it as optirs does (a copy: torch's state_dict() and
    # load_state_dict share the tensors, flat or not).
    sd = copy.deepcopy(opt.state_dict())
    ref = make_model()
    ref.load_state_dict(model.state_dict())
    t = torch.optim.Adam(ref.parameters(), lr=1e-2, foreach=False)
    t.load_state_dict(sd)
    for m, o in ((model, opt), (ref, t)):
        o.zero_grad()
        loss_of(m, 9, torch.float32).backward()
        o.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1.3e-6, atol=1e-6)


def test_gradients_accumulate_in_place_into_the_flat_buffer():
    model = make_model()
    flat = ot.flatten_parameters(model)
    ((data, grad),) = flat.buffers
    views = [p.grad for p in model.parameters()]
    assert all(v._base is grad for v in views)
    assert all(
        p.data_ptr() == data[s:].data_ptr()
        for p, s in zip(model.parameters(), [0, 72, 84, 228, 240])
    )
    loss_of(model, 0, torch.float32).backward()
    once = grad.clone()
    assert once.abs().sum() > 0
    loss_of(model, 0, torch.float32).backward()
    assert all(p.grad is v for p, v in zip(model.parameters(), views))
    assert torch.equal(grad, once + once)
    ref = make_model()
    loss_of(ref, 0, torch.float32).backward()
    assert torch.equal(torch.cat([p.grad.flatten() for p in ref.parameters()]), once)
    # zero_grad's default, set_to_none=True, zeros the buffer and keeps the views.
    opt = ot.Adam(model.parameters())
    opt.zero_grad()
    assert all(p.grad is v for p, v in zip(model.parameters(), views))
    assert not grad.any()
    assert isinstance(model[0].weight, nn.Parameter) and model[0].weight.requires_grad


def test_zero_grad_gives_back_dropped_and_replaced_views(flat_steps):
    model = make_model()
    flat = ot.flatten_parameters(model)
    opt = ot.Adam(model.parameters(), lr=1e-2)
    for i in range(2):
        opt.zero_grad()
        loss_of(model, i, torch.float32).backward()
        opt.step()
    assert flat_steps == [True]
    ps = list(model.parameters())
    views = [p.grad for p in ps]
    ps[0].grad = None
    ps[1].grad = torch.ones_like(ps[1])
    opt.zero_grad()  # through the plan
    assert all(p.grad is v for p, v in zip(ps, views)) and not any(v.any() for v in views)
    model.zero_grad()  # torch's: drops every view
    assert all(p.grad is None for p in ps)
    flat.zero_grad()  # the handle's gives them back
    assert all(p.grad is v for p, v in zip(ps, views))
    model.zero_grad()
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})
    opt.zero_grad(set_to_none=False)  # groups changed: the per-parameter way
    assert all(p.grad is v for p, v in zip(ps, views))


def _drop(index: int, at: int):
    def each(i, model, opt):
        if i == at:
            list(model.parameters())[index].grad = None

    return each


@pytest.mark.parametrize("config", ["Adam", "NAdam", "ASGD", "SGD-nesterov-wd", "Rprop"])
def test_a_parameter_without_gradient_is_not_stepped(config, flat_steps):
    cls, kwargs = CONFIGS[config]
    # The reference: the same parameter without a gradient in step 2, unflat.
    ref, ref_opt = train(False, cls, kwargs, steps=6, each=_drop(2, 2))
    got, opt = train(True, cls, kwargs, steps=6, each=_drop(2, 2))
    assert_same(got, ref)
    assert_same_state(opt, ref_opt)
    # Step 2 fell back; after it the parameter's counters differ from its neighbours', and the
    # flat step splits its run there instead of giving up.
    assert flat_steps == [True, None, True, True, True]
    plan = opt.__dict__["_optirs_flat_plan"]
    pieces = [pc for r in plan.runs for pc in r.pieces()]
    if opt._spec.counts_steps:
        assert pieces == [(0, 2), (2, 3), (3, 6)]


def test_a_replaced_gradient_is_read_and_the_view_is_not(flat_steps):
    def replace(i, model, opt):
        if i == 3:
            p = list(model.parameters())[1]
            p.grad = p.grad * 3

    ref, ref_opt = train(False, ot.Adam, {"lr": 1e-2}, each=replace)
    got, opt = train(True, ot.Adam, {"lr": 1e-2}, each=replace)
    assert_same(got, ref)
    assert_same_state(opt, ref_opt)
    assert flat_steps == [True, True, None, True]


def test_a_repointed_parameter_falls_back(flat_steps):
    def repoint(i, model, opt):
        if i == 2:
            p = next(iter(model.parameters()))
            p.data = p.data.clone()

    ref, _ = train(False, ot.Adam, {"lr": 1e-2}, each=repoint)
    got, _ = train(True, ot.Adam, {"lr": 1e-2}, each=repoint)
    assert_same(got, ref)
    assert None in flat_steps and flat_steps[0] is True


def test_a_replaced_state_entry_falls_back(flat_steps):
    def replace(i, model, opt):
        if i == 2:
            p = list(model.parameters())[3]
            opt.state[p]["exp_avg"] = opt.state[p]["exp_avg"].clone()

    ref, ref_opt = train(False, ot.Adam, {"lr": 1e-2}, each=replace)
    got, opt = train(True, ot.Adam, {"lr": 1e-2}, each=replace)
    assert_same(got, ref)
    assert_same_state(opt, ref_opt)
    assert flat_steps[:2] == [True, None]


def test_param_groups_interleaved(flat_steps):
    def groups(model):
        ps = list(model.parameters())
        return [
            {"params": ps[0::2], "weight_decay": 0.1},
            {"params": ps[1::2], "weight_decay": 0.0, "lr": 3e-3},
        ]

    results = []
    for flat in (False, True):
        model = make_model()
        if flat:
            ot.flatten_parameters(model)
        opt = ot.AdamW(groups(model), lr=1e-2)
        for i in range(4):
            opt.zero_grad()
            loss_of(model, i, torch.float32).backward()
            opt.step()
        results.append(model)
    assert_same(*results)
    assert flat_steps == [True] * 3


def test_scheduler_grad_scaler_and_both_clips(flat_steps):
    def run(flat: bool, clip: str) -> nn.Module:
        model = make_model()
        if flat:
            ot.flatten_parameters(model)
        opt = ot.AdamW(model.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        for i in range(6):
            opt.zero_grad()
            scaler.scale(loss_of(model, i, torch.float32)).backward()
            if i == 3:
                model[0].weight.grad[0, 0] = float("inf")  # the scaler skips this step
            if clip == "torch":
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            elif clip == "optirs":
                scaler.unscale_(opt)
                opt.clip_grad_norm_(0.5)
            elif clip == "optirs-function":
                scaler.unscale_(opt)
                ot.clip_grad_norm_(model.parameters(), 0.5)
            scaler.step(opt)
            scaler.update()
            sched.step()
        return model

    for clip in ("none", "torch", "optirs", "optirs-function"):
        assert_same(run(True, clip), run(False, clip))
    assert flat_steps.count(True) >= 4 * 4


def test_torch_save_of_model_and_optimizer_continues_the_same_bits(tmp_path, flat_steps):
    ref, ref_opt = train(False, ot.NAdam, {"lr": 1e-2}, steps=6)
    model, opt = train(True, ot.NAdam, {"lr": 1e-2}, steps=3)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ck.pt")
    whole = io.BytesIO()
    torch.save(model, whole)
    ck = torch.load(tmp_path / "ck.pt")
    m2 = make_model()
    ot.flatten_parameters(m2)
    o2 = ot.NAdam(m2.parameters(), lr=1e-2)
    m2.load_state_dict(ck["model"])
    o2.load_state_dict(ck["opt"])
    # load_state_dict copied the state into the flat buffers: after the first step (a full
    # step, which builds the plan), the steps are flat.
    assert all(opt_s["exp_avg"]._base is not None for opt_s in o2.state.values())
    n = len(flat_steps)
    for i in range(3, 6):
        o2.zero_grad()
        loss_of(m2, i, torch.float32).backward()
        o2.step()
    assert flat_steps[n:] == [True, True]  # the first (a full step) builds the plan
    assert_same(m2, ref)
    assert_same_state(o2, ref_opt)
    whole.seek(0)
    loaded = torch.load(whole, weights_only=False)
    assert_same(loaded, model)


def test_a_torch_optim_state_dict_loads_into_the_flat_buffers(flat_steps):
    def run(flat: bool) -> tuple[nn.Module, Any]:
        model = make_model()
        t = torch.optim.RAdam(model.parameters(), lr=1e-2, foreach=False)
        for i in range(2):
            t.zero_grad()
            loss_of(model, i, torch.float32).backward()
            t.step()
        if flat:
            ot.flatten_parameters(model)
        opt = ot.RAdam(model.parameters(), lr=1e-2)
        opt.load_state_dict(copy.deepcopy(t.state_dict()))
        bufs = opt.__dict__.get("_optirs_flat_state", {})
        assert len(bufs) == (3 if flat else 0)  # exp_avg, exp_avg_sq, step
        for i in range(2, 5):
            opt.zero_grad()
            loss_of(model, i, torch.float32).backward()
            opt.step()
        return model, opt

    (ref, ref_opt), (got, opt) = run(False), run(True)
    assert_same(got, ref)
    assert_same_state(opt, ref_opt)
    assert flat_steps == [True, True]


def test_rules_that_are_not_elementwise_step_per_tensor(monkeypatch, flat_steps):
    import dataclasses

    # A rule declared not element-wise (``Spec.elementwise``: factored moments read a
    # parameter's shape) is never stepped flat; its parameters still train as unflat.
    spec = dataclasses.replace(ot.Adam._spec, elementwise=False)
    monkeypatch.setattr(ot.Adam, "_spec", spec)
    ref, _ = train(False, ot.Adam, {"lr": 1e-2})
    got, opt = train(True, ot.Adam, {"lr": 1e-2})
    assert_same(got, ref)
    assert flat_steps == [] and opt.__dict__.get("_optirs_flat_plan") is None


@pytest.mark.parametrize("dtype_id", ["f32", "bf16"])
def test_adafactor_steps_flat_parameters_per_tensor(dtype_id, flat_steps):
    dtype = DTYPES[dtype_id]
    ref, ref_opt = train(False, ot.Adafactor, {"lr": 1e-2, "weight_decay": 0.1}, dtype)
    got, opt = train(True, ot.Adafactor, {"lr": 1e-2, "weight_decay": 0.1}, dtype)
    assert_same(got, ref)
    assert_same_state(opt, ref_opt)
    assert flat_steps == [] and opt.__dict__.get("_optirs_flat_plan") is None
    # Its state stays its own (row and column factors), not flat views.
    assert "_optirs_flat_state" not in opt.__dict__
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert "_optirs_flat_state" not in opt.__dict__


def test_eight_bit_optimizers_step_flat_parameters_per_tensor(flat_steps):
    ref, _ = train(False, ot.AdamW8bit, {"lr": 1e-2, "min_8bit_size": 64, "block_size": 64})
    got, opt = train(True, ot.AdamW8bit, {"lr": 1e-2, "min_8bit_size": 64, "block_size": 64})
    assert_same(got, ref)
    assert flat_steps == [] and opt.__dict__.get("_optirs_flat_plan") is None


def test_a_graph_that_saved_a_parameter_refuses_after_a_flat_step(flat_steps):
    model, opt = train(True, ot.Adam, {"lr": 1e-2}, steps=2)
    opt.zero_grad()
    loss = loss_of(model, 0, torch.float32)
    loss.backward(retain_graph=True)
    opt.step()
    assert flat_steps == [True, True]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_frozen_parameters_get_no_gradient_and_are_not_stepped(flat_steps):
    def run(flat: bool) -> tuple[nn.Module, Any]:
        model = make_model()
        model[2].weight.requires_grad_(False)
        if flat:
            ot.flatten_parameters(model)
            assert model[2].weight.grad is None and model[2].bias.grad is not None
        # All parameters given, as users do: the frozen one has no gradient and is skipped.
        opt = ot.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5)
        for i in range(4):
            opt.zero_grad()
            loss_of(model, i, torch.float32).backward()
            opt.step()
        assert model[2].weight.grad is None
        return model, opt

    (ref, ref_opt), (got, opt) = run(False), run(True)
    assert_same(got, ref)
    assert_same_state(opt, ref_opt)
    assert torch.equal(got[2].weight, make_model()[2].weight)
    assert flat_steps == [True] * 3
    assert [(r.k0, r.k1) for r in opt.__dict__["_optirs_flat_plan"].runs] == [(0, 2), (3, 6)]


def test_mixed_dtypes_make_one_buffer_each():
    model = make_model()
    model[2].double()
    flat = ot.flatten_parameters(model)
    assert [(d.dtype, d.numel()) for d, _ in flat.buffers] == [
        (torch.float32, 72 + 12 + 36 + 3),
        (torch.float64, 144 + 12),
    ]
    assert len(flat) == 6 and "float64" in repr(flat)
    assert [id(p) for p in flat.parameters()] == [
        id(p) for p in list(model.parameters())[:2] + list(model.parameters())[4:]
    ] + [id(p) for p in list(model.parameters())[2:4]]


def test_existing_gradients_are_kept():
    model = make_model()
    loss_of(model, 0, torch.float32).backward()
    before = [p.grad.clone() for p in model.parameters()]
    ot.flatten_parameters(model)
    assert all(torch.equal(p.grad, b) for p, b in zip(model.parameters(), before))


def test_bad_input_changes_nothing():
    model = make_model()
    ptrs = [p.data_ptr() for p in model.parameters()]
    with pytest.raises(TypeError, match="got one tensor"):
        ot.flatten_parameters(model[0].weight)
    with pytest.raises(TypeError, match="got int"):
        ot.flatten_parameters(3)
    with pytest.raises(TypeError, match=r"params\[1\] is a str"):
        ot.flatten_parameters([model[0].weight, "w"])
    with pytest.raises(TypeError, match=r"params\[1\] has dtype torch.int64"):
        ot.flatten_parameters([model[0].weight, torch.zeros(3, dtype=torch.long)])
    with pytest.raises(ValueError, match=r"params\[1\] is not a leaf"):
        ot.flatten_parameters([model[0].weight, model[0].weight * 2])
    with pytest.raises(ValueError, match="no parameters"):
        ot.flatten_parameters([])
    model[2].weight.grad = torch.zeros(12, 12).to_sparse()
    with pytest.raises(ValueError, match=r"params\[2\] has a gradient that does not match"):
        ot.flatten_parameters(model)
    sparse = torch.zeros(3, 3).to_sparse().requires_grad_()
    with pytest.raises(ValueError, match="not a dense tensor"):
        ot.flatten_parameters([sparse])
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    model[2].weight.grad = None
    ot.flatten_parameters(model)
    with pytest.raises(ValueError, match=r"params\[0\] is already flattened"):
        ot.flatten_parameters(model)


# --------------------------------------------------------------------------------------------
# DistributedDataParallel over gloo (this file run as a script: two ranks)
# --------------------------------------------------------------------------------------------


#: (flatten_parameters, gradient_as_bucket_view) of each DDP run
DDP_RUNS = ((False, False), (True, False), (True, True))


def _ddp_worker(rank: int, out: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import Replicate, distribute_tensor, init_device_mesh
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    optirs.set_num_threads(1)
    store = gloo_workers.connect(rank, 2, out / "port")
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    results: dict[Any, Any] = {}
    for flat, bucket_view in DDP_RUNS:
        model = make_model()
        if flat:
            ot.flatten_parameters(model)
        ddp = DistributedDataParallel(model, gradient_as_bucket_view=bucket_view)
        opt = ot.Adam(ddp.parameters(), lr=1e-2)
        for i in range(5):
            opt.zero_grad()
            x, y = batch(i, torch.float32)
            x, y = x[rank * 8 : rank * 8 + 8], y[rank * 8 : rank * 8 + 8]
            (ddp(x) - y).pow(2).mean().backward()
            opt.step()
        plan = opt.__dict__.get("_optirs_flat_plan")
        results[flat, bucket_view] = {
            "params": [p.detach().clone() for p in model.parameters()],
            "flat_plan": plan is not None and plan.watch.current(opt.state),
        }
    # A DTensor parameter (as FSDP2 makes) is refused, the plain one beside it left alone.
    mesh = init_device_mesh("cpu", (2,))
    sharded = nn.Parameter(distribute_tensor(torch.ones(4, 3), mesh, [Replicate()]))
    plain = nn.Parameter(torch.ones(3))
    before = plain.data_ptr()
    try:
        ot.flatten_parameters([plain, sharded])
        results["dtensor"] = "accepted"
    except ValueError as exc:
        results["dtensor"] = str(exc)
    results["dtensor_left_alone"] = plain.grad is None and plain.data_ptr() == before
    torch.save(results, out / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_ddp_flat_matches_ddp_unflat(tmp_path):
    """DDP over gloo, two ranks: flat parameters give the unflat bits; with DDP's default
    (gradient_as_bucket_view=False) the steps are flat (DDP copies the averaged gradients into
    the views), with gradient_as_bucket_view=True DDP's bucket views replace them and the steps
    take the per-tensor path; a DTensor parameter is refused by name."""
    r0, r1 = gloo_workers.launch(__file__, tmp_path, 2, 120)
    for r in (r0, r1):
        assert r[True, False]["flat_plan"]
        assert not r[True, True]["flat_plan"]
        assert not r[False, False]["flat_plan"]
        for run in DDP_RUNS[1:]:
            for a, b in zip(r[run]["params"], r[False, False]["params"]):
                assert torch.equal(a, b), run
        assert r["dtensor"].startswith("flatten_parameters: params[1] is a DTensor"), r["dtensor"]
        assert r["dtensor_left_alone"]
    for run in DDP_RUNS:
        for a, b in zip(r0[run]["params"], r1[run]["params"]):
            assert torch.equal(a, b)


def test_flat_watch_sees_each_change_and_refuses_bad_input():
    from optirs import _core

    ps = [nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))]
    ot.flatten_parameters(ps)
    grads = [p.grad for p in ps]
    state: dict[Any, Any] = {p: {"step": torch.tensor(0.0)} for p in ps}
    for api in (_bridge._EXCHANGE_API, None):  # DLPack's exchange API, and data_ptr()/shape
        w = _core.FlatWatch(ps, grads, [state[p] for p in ps], api)
        assert len(w) == 2 and w.current(state) and w.stray_grads() == []
        state[ps[0]]["extra"] = 1  # an entry gained a key
        assert not w.current(state)
        del state[ps[0]]["extra"]
        assert w.current(state)
        kept = state.pop(ps[1])  # an entry gone
        assert not w.current(state)
        state[ps[1]] = dict(kept)  # a new dict with the same values
        assert not w.current(state)
        state[ps[1]] = kept
        ps[1].grad = None
        assert not w.current(state) and w.stray_grads() == [1]
        ps[1].grad = grads[1]
        old = ps[0].data
        ps[0].data = old.clone()
        assert not w.current(state)
        ps[0].data = old
        assert w.current(state)
        # The walk learns the state's order on its first call and expects it after; another
        # order, or keys that are no parameter's, are matched by identity all the same.
        assert w.current({"other": {}, ps[1]: state[ps[1]], ps[0]: state[ps[0]]})
        assert not w.current({ps[0]: state[ps[1]], ps[1]: state[ps[0]]})  # entries swapped
        assert w.current(state)
        state[ps[0]]["step"] = torch.tensor(0.0)  # a value replaced, the entry kept
        assert not w.current(state)
        assert not w.current([])  # not a dict
    # admit: the check, and the bump only where it holds.
    state = {p: {"step": torch.tensor(0.0)} for p in ps}
    bumped: list[Any] = []
    w = _core.FlatWatch(ps, grads, [state[p] for p in ps], bump=(bumped.append, "bump"))
    assert w.admit(state) and bumped == ["bump"]
    ps[0].grad = None
    assert not w.admit(state) and bumped == ["bump"]
    ps[0].grad = grads[0]
    assert w.admit(state) and bumped == ["bump"] * 2
    w = _core.FlatWatch(ps, grads, [state[p] for p in ps])  # no bump given: the check alone
    assert w.admit(state)
    with pytest.raises(ValueError, match="same length"):
        _core.FlatWatch(ps, grads[:1], [None, None])
    with pytest.raises(ValueError, match="dicts or None"):
        _core.FlatWatch(ps, grads, [None, 3])
    with pytest.raises(ValueError, match="listed twice"):
        _core.FlatWatch([ps[0], ps[0]], [grads[0], grads[0]], [None, None])


def test_step_before_has_the_last_word():
    """``_core.step(before=...)``: called once everything is validated, right before the
    update; a false result returns None with nothing written, an exception propagates with
    nothing written, a true one lets the step run."""
    import numpy as np
    from optirs import _core

    p = np.zeros(4, np.float32)
    g = np.ones(4, np.float32)
    groups = [
        {
            "params": [p],
            "lr": 0.5,
            "momentum": 0.0,
            "dampening": 0.0,
            "weight_decay": 0.0,
            "nesterov": False,
            "maximize": False,
        }
    ]
    calls: list[Any] = []

    def answer(value: Any) -> Any:
        calls.append(value)
        if isinstance(value, Exception):
            raise value
        return value

    args = ("sgd", groups, [p], [g], [(None,)], [None], [False])
    assert _core.step(*args, before=(answer, False)) is None
    assert _core.step(*args, before=(answer, 0), plan=True) is None
    with pytest.raises(KeyError, match="mine"):
        _core.step(*args, before=(answer, KeyError("mine")))
    assert np.all(p == 0.0) and len(calls) == 3
    # Validation comes first: a bad gradient is refused before ``before`` is asked.
    with pytest.raises(ValueError, match="grads"):
        _core.step("sgd", groups, [p], [np.ones(3, np.float32)], *args[4:], before=(answer, 1))
    assert len(calls) == 3
    assert _core.step(*args, before=(answer, True)) is True
    assert calls[-1] is True and np.all(p == -0.5)


def test_a_refused_flat_step_bumps_no_version(flat_steps):
    """The flat step bumps the version counters once it is validated and its check has
    passed, right before the update: a hyperparameter refused at step time leaves both the
    values and the versions as they were; the next good step bumps every parameter."""
    model, opt = train(True, ot.Adam, {"lr": 1e-2}, steps=2)
    loss_of(model, 5, torch.float32).backward()
    params = list(model.parameters())
    values = [p.detach().clone() for p in params]
    versions = [p._version for p in params]
    opt.param_groups[0]["lr"] = "fast"
    with pytest.raises(TypeError, match="lr"):
        opt.step()
    assert [p._version for p in params] == versions
    assert all(torch.equal(p, v) for p, v in zip(params, values))
    opt.param_groups[0]["lr"] = 1e-2
    opt.step()
    assert flat_steps[-1] is True
    assert all(p._version > v for p, v in zip(params, versions))
    assert not any(torch.equal(p, v) for p, v in zip(params, values))


def test_a_flat_step_skipped_for_a_nonfinite_gradient_changes_no_value(flat_steps):
    """``skip_nonfinite``: the flat step finds the infinity in its one pass and writes
    nothing; the version counters were bumped right before the update (README says so)."""
    model, opt = train(True, ot.Adam, {"lr": 1e-2, "skip_nonfinite": True}, steps=2)
    opt.zero_grad()
    loss_of(model, 5, torch.float32).backward()
    params = list(model.parameters())
    params[3].grad[0] = float("inf")
    values = [p.detach().clone() for p in params]
    state = copy.deepcopy(opt.state_dict())
    versions = [p._version for p in params]
    opt.step()
    assert flat_steps[-1] is False and opt.last_step_skipped and opt.skipped_steps == 1
    assert all(torch.equal(p, v) for p, v in zip(params, values))
    for a, b in zip(opt.state_dict()["state"].values(), state["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(p._version > v for p, v in zip(params, versions))


@pytest.mark.parametrize(
    "rounding",
    [{"master_weights": True}, {"bf16_stochastic_round": True, "seed": 7}],
    ids=["master_weights", "stochastic_round"],
)
def test_rounding_options_step_flat_parameters_per_tensor(rounding, flat_steps):
    """Master weights and stochastic rounding (whose random bits are keyed by each parameter's
    index) step flat bfloat16 parameters per tensor, with the bits of the unflat run."""
    kwargs = {"lr": 1e-2, **rounding}
    ref, ref_opt = train(False, ot.AdamW, kwargs, torch.bfloat16)
    got, opt = train(True, ot.AdamW, kwargs, torch.bfloat16)
    assert_same(got, ref)
    assert_same_state(opt, ref_opt)
    assert flat_steps == [] and opt.__dict__.get("_optirs_flat_plan") is None


@pytest.mark.parametrize("key", ["master_weights", "bf16_stochastic_round"])
def test_a_rounding_option_switched_on_later_leaves_the_flat_path(key, flat_steps):
    """Set on a group after flat steps, the option takes effect as unflat (the flat plan falls
    back, and is not built again for that group)."""

    def switch(i, model, opt):
        if i == 3:
            opt.param_groups[0][key] = True
            if key == "bf16_stochastic_round":
                opt.param_groups[0]["seed"] = 7

    def run(flat: bool) -> tuple[nn.Module, Any]:
        kwargs = {"lr": 1e-2}
        if key == "bf16_stochastic_round":
            kwargs.update(bf16_stochastic_round=False, seed=7)
        return train(flat, ot.AdamW, kwargs, torch.bfloat16, steps=6, each=switch)

    ref, ref_opt = run(False)
    got, opt = run(True)
    assert_same(got, ref)
    assert_same_state(opt, ref_opt)
    # Steps 1 and 2 flat; from step 3 on the plan falls back (once) and is not rebuilt.
    assert flat_steps[:2] == [True, True] and None in flat_steps[2:]
    assert all(s is None for s in flat_steps[2:])


if __name__ == "__main__":
    gloo_workers.main(_ddp_worker, "a DDP worker of test_flat.py")
