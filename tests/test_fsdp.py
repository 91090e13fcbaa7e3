"""optirs.torch with DTensor parameters: FSDP2's ``fully_shard`` and ``distribute_tensor``.

Two worker processes (this file run as a script, ``--rank 0`` / ``--rank 1``) form a gloo
process group on 127.0.0.1 (as in test_distributed.py: rank 0 opens a ``TCPStore`` on a free
port and hands it to rank 1 through a file) and run every case once; the tests compare what
they saved.

Every rank trains on the same full batch, so FSDP2's reduce-scatter averages two equal
gradients ((g + g) / 2 is g exactly) and the sharded model's gradients are the unsharded
model's, bit for bit. Hence the references:

- ``optirs.torch.X`` on the unsharded model (one process): the sharded run's gathered
  parameters must be *bitwise* equal (the kernels are element-wise; only the elements'
  placement differs);
- ``torch.optim.X(foreach=False)`` on the same sharded model: equal within
  ``torch.testing.assert_close``'s defaults, and its state laid out alike (DTensors with the
  parameter's placements, ``step`` a plain tensor).

The model is 10 -> 15 -> 15 -> 3 (uneven shards: 15 rows split 8/7, 3 rows 2/1), sharded per
layer and at the root. A ``distribute_tensor`` case steps a ``Shard(0)`` (7 x 5), a
``Replicate()`` (6) and a plain parameter in one optimizer, with gradients distributed from
seeded full tensors. A checkpoint case saves with ``torch.distributed.checkpoint`` after two
steps (``get_optimizer_state_dict``), loads into a fresh model and optimizer
(``set_optimizer_state_dict``), takes two more steps, and must equal four uninterrupted steps
bit for bit; the parent then loads the same checkpoint into an unsharded model in one process
(resharding 2 -> 1) and continues it the same way. Clip cases compare optirs's norm (free
function and fused) with torch's over DTensor gradients (norm types 2, 1, inf; sharded and
replicated gradients together, where a replicated one must be counted once; and a 2-D mesh).
``skip_nonfinite`` and ``torch.amp.GradScaler`` with an infinity in one rank's shard must skip
on every rank. The refusals (``Partial``, mismatched placements, 8-bit state, a rule that is
not element-wise) are checked by their messages.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from pathlib import Path
from typing import Any

import gloo_workers
import optirs.torch
import pytest
import torch
from torch import nn

WORLD = 2
STEPS = 3
WORKER_TIMEOUT_S = 180  # the whole two-process run; typically ~15 s on an idle machine

# Every optirs.torch optimizer; the torch.optim class it is compared with (None: Lion, which
# torch lacks, is compared with optirs's unsharded run only).
CONFIGS: dict[str, tuple[str | None, dict[str, Any]]] = {
    "SGD": ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4}),
    "Adam": ("Adam", {"lr": 1e-2, "amsgrad": True}),
    "AdamW": ("AdamW", {"lr": 1e-2, "weight_decay": 0.01}),
    "RMSprop": ("RMSprop", {"lr": 1e-3, "momentum": 0.9, "centered": True}),
    "Adagrad": ("Adagrad", {"lr": 0.05, "lr_decay": 0.01}),
    "Adadelta": ("Adadelta", {"lr": 1.0, "weight_decay": 0.01}),
    "RAdam": ("RAdam", {"lr": 1e-2}),
    "Rprop": ("Rprop", {"lr": 1e-2}),
    "Adamax": ("Adamax", {"lr": 1e-2}),
    "NAdam": ("NAdam", {"lr": 1e-2, "decoupled_weight_decay": True, "weight_decay": 0.01}),
    "ASGD": ("ASGD", {"lr": 1e-2, "t0": 1}),
    "Lion": (None, {"lr": 1e-3, "weight_decay": 0.1}),
    # 8-bit state is refused for DTensors (see _Bridge8bit._refuse_8bit_dtensor); below
    # min_8bit_size they keep float Adam state.
    "Adam8bit": ("Adam", {"lr": 1e-2, "min_8bit_size": 1 << 30}),
    "AdamW8bit": ("AdamW", {"lr": 1e-2, "min_8bit_size": 1 << 30}),
    # optirs's own option: state DTensors of dtype bfloat16 (no torch.optim counterpart).
    "AdamW-bf16-state": (None, {"lr": 1e-2, "state_dtype": torch.bfloat16}),
}
CLIP_NORMS = (2.0, 1.0, float("inf"))


def make_model() -> nn.Module:
    """The same small tanh MLP in every process."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Linear(10, 15), nn.Tanh(), nn.Linear(15, 15), nn.Tanh(), nn.Linear(15, 3)
        )


def data(step: int) -> torch.Tensor:
    """The full batch of ``step``, the same on every rank."""
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 10, generator=g)


def train_step(model: nn.Module, opt: Any, step: int, clip: float | None = None) -> Any:
    """One step; with ``clip``, the fused clip (``opt.clip_grad_norm_``) when ``opt`` has one,
    else torch's; returns the norm."""
    opt.zero_grad()
    model(data(step)).square().mean().backward()
    norm = None
    if clip is not None:
        if hasattr(opt, "clip_grad_norm_"):
            norm = opt.clip_grad_norm_(clip)
        else:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    return norm


def make_optimizer(config: str, params: Any, which: str) -> Any:
    """``which``: ``"optirs"`` or ``"torch"`` (the for-loop torch.optim class)."""
    torch_name, kwargs = CONFIGS[config]
    if which == "optirs":
        return getattr(optirs.torch, config.split("-")[0])(params, **kwargs)
    kwargs = {k: v for k, v in kwargs.items() if k != "min_8bit_size"}
    assert torch_name is not None
    return getattr(torch.optim, torch_name)(params, foreach=False, **kwargs)


def full(t: Any) -> torch.Tensor:
    """The full tensor of a DTensor (a copy), else a copy of ``t``."""
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def layout(t: Any) -> Any:
    """What a state entry is: a DTensor's placements, or ``"plain"``."""
    from torch.distributed.tensor import DTensor

    return tuple(map(repr, t.placements)) if isinstance(t, DTensor) else "plain"


def state_summary(opt: Any, params: list[torch.Tensor]) -> list[dict[str, Any]]:
    """Each parameter's state: entry -> (layout, full value)."""
    return [
        {k: (layout(v), full(v)) for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
        for p in params
    ]


def unsharded_run(config: str, steps: int = STEPS, clip: float | None = None) -> list[Any]:
    """``optirs.torch.X`` on the unsharded model, in this process."""
    model = make_model()
    opt = make_optimizer(config, model.parameters(), "optirs")
    for step in range(steps):
        train_step(model, opt, step, clip)
    return [full(p) for p in model.parameters()]


# --------------------------------------------------------------------------------------------
# the worker (this file run as a script)
# --------------------------------------------------------------------------------------------


def sharded_model(mesh: Any) -> nn.Module:
    """The model under FSDP2: each Linear, then the root."""
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _fsdp_case(mesh: Any, config: str, which: str) -> dict[str, Any]:
    model = sharded_model(mesh)
    params = list(model.parameters())
    opt = make_optimizer(config, params, which)
    full_steps = []
    if which == "optirs":
        # Counts the steps that did not go through the cached plan.
        full_step = opt._optirs_full_step
        opt._optirs_full_step = lambda *a: full_steps.append(1) or full_step(*a)
    for step in range(STEPS):
        train_step(model, opt, step)
    return {
        "params": [full(p) for p in params],
        "param_layouts": [layout(p) for p in params],
        "state": state_summary(opt, params),
        "full_steps": len(full_steps),
        # The plan lends each local tensor its gradient for the step only.
        "local_grads_left": sum(p._local_tensor.grad is not None for p in params),
    }


def _dtensor_case(mesh: Any, config: str, which: str) -> dict[str, Any]:
    """A Shard(0), a Replicate() and a plain parameter in one optimizer."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    g = torch.Generator().manual_seed(7)
    fulls = [torch.randn(7, 5, generator=g), torch.randn(6, generator=g)]
    fulls.append(torch.randn(4, 3, generator=g))
    place = [[Shard(0)], [Replicate()], None]
    params = [
        nn.Parameter(t.clone() if pl is None else distribute_tensor(t.clone(), mesh, pl))
        for t, pl in zip(fulls, place)
    ]
    opt = make_optimizer(config, params, which)
    full_steps = []
    if which == "optirs":
        full_step = opt._optirs_full_step
        opt._optirs_full_step = lambda *a: full_steps.append(1) or full_step(*a)
    for _ in range(STEPS):
        for p, t, pl in zip(params, fulls, place):
            grad = torch.randn(t.shape, generator=g)
            p.grad = grad if pl is None else distribute_tensor(grad, mesh, pl)
        opt.step()
    return {
        "params": [full(p) for p in params],
        "state": state_summary(opt, params),
        "full_steps": len(full_steps),
    }


def _two_d_case() -> dict[str, Any]:
    """A 2-D mesh (2 x 1, as HSDP or FSDP + TP lay parameters out): AdamW over
    ``[Shard(0), Replicate()]`` and ``[Replicate(), Shard(0)]`` parameters, and the norm of
    their gradients (each counted once: the second is whole on every rank)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("dp", "tp"))
    g = torch.Generator().manual_seed(5)
    fulls = [torch.randn(7, 5, generator=g), torch.randn(6, generator=g)]
    place = [[Shard(0), Replicate()], [Replicate(), Shard(0)]]
    params = [nn.Parameter(distribute_tensor(t.clone(), mesh, pl)) for t, pl in zip(fulls, place)]
    opt = optirs.torch.AdamW(params, lr=1e-2)
    norms = []
    for _ in range(STEPS):
        for p, t, pl in zip(params, fulls, place):
            p.grad = distribute_tensor(torch.randn(t.shape, generator=g), mesh, pl)
        norms.append(full(opt.clip_grad_norm_(0.5)))
        opt.step()
    return {
        "params": [full(p) for p in params],
        "norms": norms,
        "state": state_summary(opt, params),
    }


def _checkpoint_case(mesh: Any, out_dir: Path) -> dict[str, Any]:
    """AdamW: 2 steps, dcp.save; a fresh model and optimizer dcp.load it and take 2 more."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    def fresh() -> tuple[nn.Module, Any]:
        model = sharded_model(mesh)
        return model, optirs.torch.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)

    model, opt = fresh()
    for step in range(2):
        train_step(model, opt, step)
    ckpt = {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, opt),
    }
    dcp.save(ckpt, checkpoint_id=str(out_dir / "ckpt"))
    for step in range(2, 4):
        train_step(model, opt, step)
    uninterrupted = [full(p) for p in model.parameters()]

    loaded_model, loaded_opt = fresh()
    target = {
        "model": get_model_state_dict(loaded_model),
        "optim": get_optimizer_state_dict(loaded_model, loaded_opt),
    }
    dcp.load(target, checkpoint_id=str(out_dir / "ckpt"))
    set_model_state_dict(loaded_model, target["model"])
    set_optimizer_state_dict(loaded_model, loaded_opt, target["optim"])
    params = list(loaded_model.parameters())
    after_load = state_summary(loaded_opt, params)
    for step in range(2, 4):
        train_step(loaded_model, loaded_opt, step)
    return {
        "uninterrupted": uninterrupted,
        "resumed": [full(p) for p in loaded_model.parameters()],
        "after_load": after_load,
    }


def _clip_case(mesh: Any) -> dict[str, Any]:
    """Norms of DTensor gradients (sharded, replicated, partial, together), optirs's and
    torch's."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    out: dict[str, Any] = {}
    for norm_type in CLIP_NORMS:
        for kind in ("fsdp", "mixed"):
            if kind == "fsdp":
                model = sharded_model(mesh)
                model(data(0)).square().mean().backward()
                params = list(model.parameters())
            else:
                g = torch.Generator().manual_seed(11)
                shapes = ((7, 5), (6,), (1,))
                places = ([Shard(0)], [Replicate()], [Shard(0)])  # (1,): rank 1's is empty
                params = []
                for shape, pl in zip(shapes, places):
                    p = nn.Parameter(distribute_tensor(torch.randn(shape, generator=g), mesh, pl))
                    p.grad = distribute_tensor(torch.randn(shape, generator=g), mesh, pl)
                    params.append(p)
                # A Partial gradient (each rank holds half) on a Replicate parameter.
                p = nn.Parameter(
                    distribute_tensor(torch.randn(5, generator=g), mesh, [Replicate()])
                )
                p.grad = DTensor.from_local(torch.randn(5, generator=g) / 2, mesh, [Partial()])
                params.append(p)
            grads = [p.grad.detach().clone() for p in params]
            expected: Any = None
            clipped_by_torch: Any = None
            if kind == "fsdp" or norm_type != float("inf"):
                # (torch cannot take the inf norm of rank 1's empty shard of the (1,)
                # gradient: "_foreach_norm cannot compute the infinity norm on an empty
                # tensor", on that rank only; optirs skips empty shards.)
                expected = full(torch.nn.utils.clip_grad_norm_(params, 0.1, norm_type))
                clipped_by_torch = [full(p.grad) for p in params]
            for p, gr in zip(params, grads):
                p.grad = gr.clone()
            actual = optirs.torch.clip_grad_norm_(params, 0.1, norm_type)
            clipped = [full(p.grad) for p in params]
            out[kind, norm_type] = {
                "expected": expected,
                "actual": full(actual),
                "actual_layout": layout(actual),
                "clipped": clipped,
                "clipped_by_torch": clipped_by_torch,
                "grads": [full(gr) for gr in grads],
                "unsharded": torch.linalg.vector_norm(
                    torch.stack([torch.linalg.vector_norm(full(gr), norm_type) for gr in grads]),
                    norm_type,
                ),
            }
    # The fused clip inside the step, against torch's clip and for-loop AdamW.
    runs = {}
    for which in ("optirs", "torch"):
        model = sharded_model(mesh)
        opt = make_optimizer("AdamW", model.parameters(), which)
        norms = [full(train_step(model, opt, step, clip=0.05)) for step in range(STEPS)]
        runs[which] = {"norms": norms, "params": [full(p) for p in model.parameters()]}
    out["fused"] = runs
    return out


def _refusals(mesh: Any) -> dict[str, str]:
    """What optirs says about what it cannot step."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    out = {}

    def attempt(key: str, opt: Any) -> None:
        try:
            opt.step()
            out[key] = "stepped"
        except (TypeError, ValueError) as e:
            out[key] = f"{type(e).__name__}: {e}"

    p = nn.Parameter(DTensor.from_local(torch.ones(4), mesh, [Partial()]))
    p.grad = DTensor.from_local(torch.ones(4), mesh, [Partial()])
    attempt("partial", optirs.torch.AdamW([p]))
    # Gradients laid out otherwise (Replicate, Partial) are redistributed to the parameter's
    # Shard(0), before the plan exists and after: the same steps as with Shard(0) gradients.
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(4, 2, generator=g) for _ in range(4)]
    runs = []
    for layouts in ("matched", "other"):
        q = nn.Parameter(distribute_tensor(torch.ones(4, 2), mesh, [Shard(0)]))
        opt = optirs.torch.SGD([q], lr=0.1, momentum=0.9)
        for i, grad in enumerate(grads):
            if layouts == "matched":
                q.grad = distribute_tensor(grad, mesh, [Shard(0)])
            elif i % 2:
                q.grad = distribute_tensor(grad, mesh, [Replicate()])
            else:  # each rank holds half of the sum
                q.grad = DTensor.from_local(grad / 2, mesh, [Partial()])
            opt.step()
        runs.append(full(q))
    out["regridded_equal"] = str(torch.equal(runs[0], runs[1]))
    out["regridded_moved"] = str(not torch.equal(runs[0], torch.ones(4, 2)))
    q.grad = torch.ones(4, 2)  # torch accepts a plain gradient of the global shape
    attempt("plain_grad", optirs.torch.AdamW([q]))
    q.grad = distribute_tensor(torch.ones(4, 2), mesh, [Shard(0)])
    before = full(q)
    attempt("8bit", optirs.torch.AdamW8bit([q], min_8bit_size=8))
    out["8bit_unchanged"] = str(torch.equal(full(q), before))
    attempt("8bit_small", optirs.torch.AdamW8bit([q], min_8bit_size=9))

    # A rule that is not element-wise (as a factored one would be): sharded refused,
    # replicated stepped.
    class NotElementwise(optirs.torch.AdamW):
        _spec = dataclasses.replace(optirs.torch.AdamW._spec, elementwise=False)

    attempt("not_elementwise_shard", NotElementwise([q]))
    r = nn.Parameter(distribute_tensor(torch.ones(4, 2), mesh, [Replicate()]))
    r.grad = distribute_tensor(torch.ones(4, 2), mesh, [Replicate()])
    attempt("not_elementwise_replicate", NotElementwise([r]))
    # Adafactor (rows, columns and norms over the whole tensor) refuses DTensor parameters.
    before = full(q)
    attempt("adafactor", optirs.torch.Adafactor([q]))
    out["adafactor_unchanged"] = str(torch.equal(full(q), before))
    return out


def _skip_case(mesh: Any, rank: int) -> dict[str, Any]:
    """``skip_nonfinite`` with an infinity in rank 1's shard only: every rank skips."""
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    out = {}
    for name in ("AdamW", "AdamW8bit"):
        p = nn.Parameter(distribute_tensor(torch.ones(4, 2), mesh, [Shard(0)]))
        opt = getattr(optirs.torch, name)([p], lr=0.1, skip_nonfinite=True)
        local = torch.ones(2, 2)
        if rank == 1:
            local[1, 0] = float("inf")
        p.grad = DTensor.from_local(local, mesh, [Shard(0)])
        opt.step()
        skipped = (opt.last_step_skipped, opt.skipped_steps, full(p))
        p.grad = distribute_tensor(torch.ones(4, 2), mesh, [Shard(0)])
        opt.step()
        out[name] = {"skipped": skipped, "then": (opt.last_step_skipped, full(p))}
    # torch.amp.GradScaler: its found_inf is agreed across ranks by torch; optirs unscales the
    # still-scaled local gradients as it reads them.
    for which in ("optirs", "torch"):
        p = nn.Parameter(distribute_tensor(torch.ones(4, 2), mesh, [Shard(0)]))
        # SGD: its update is proportional to the gradient, so a missed unscale shows.
        opt = make_optimizer("SGD", [p], which)
        scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
        values = []
        for bad in (True, False):
            scaler.scale(torch.ones(()))
            local = torch.full((2, 2), 3.0)
            if bad and rank == 1:
                local[1, 0] = float("inf")
            p.grad = DTensor.from_local(local, mesh, [Shard(0)])
            scaler.step(opt)
            scaler.update()
            values.append(full(p))
        out["scaler", which] = values
    return out


def worker(rank: int, out_dir: Path) -> None:
    """Runs every case on this rank; saves the results to ``rank{rank}.pt``."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    optirs.set_num_threads(1)
    store = gloo_workers.connect(rank, WORLD, out_dir / "port")
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    mesh = init_device_mesh("cpu", (WORLD,))
    results: dict[Any, Any] = {}
    for config, (torch_name, _) in CONFIGS.items():
        for which in ("optirs", "torch") if torch_name else ("optirs",):
            results["fsdp", config, which] = _fsdp_case(mesh, config, which)
            results["dtensor", config, which] = _dtensor_case(mesh, config, which)
    results["two_d"] = _two_d_case()
    results["checkpoint"] = _checkpoint_case(mesh, out_dir)
    results["clip"] = _clip_case(mesh)
    results["refusals"] = _refusals(mesh)
    results["skip"] = _skip_case(mesh, rank)
    torch.save(results, out_dir / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# the tests
# --------------------------------------------------------------------------------------------

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch built without torch.distributed"
)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[list[dict], Path]:
    """Launches the two workers once for the module; returns each rank's results and the
    directory holding the checkpoint."""
    out_dir = tmp_path_factory.mktemp("fsdp")
    results = gloo_workers.launch(__file__, out_dir, WORLD, WORKER_TIMEOUT_S)
    return results, out_dir


@pytest.fixture(scope="module")
def results(run) -> list[dict]:
    return run[0]


def assert_equal(actual: list[torch.Tensor], expected: list[torch.Tensor], what: str) -> None:
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype and a.shape == e.shape, f"{what}[{i}]"
        assert torch.equal(a, e), f"{what}[{i}]: max diff {(a - e).abs().max()}"


def test_every_optimizer_is_covered():
    # Adafactor refuses DTensor parameters (test_refusals_name_the_reason).
    public = {
        name
        for name in optirs.torch.__all__
        if isinstance(getattr(optirs.torch, name), type)
        and issubclass(getattr(optirs.torch, name), torch.optim.Optimizer)
        and name != "Adafactor"
    }
    assert public == {config.split("-")[0] for config in CONFIGS}


@pytest.mark.parametrize("config", CONFIGS)
def test_fsdp2_equals_unsharded_optirs_bitwise(results, config):
    expected = unsharded_run(config)
    for rank, r in enumerate(results):
        got = r["fsdp", config, "optirs"]
        assert set(got["param_layouts"]) == {("Shard(dim=0)",)}
        # The first step looks at everything; the others go through the cached plan
        # (8-bit optimizers have none).
        assert got["full_steps"] == (STEPS if "8bit" in config else 1)
        assert got["local_grads_left"] == 0
        assert_equal(got["params"], expected, f"rank {rank} {config}")


@pytest.mark.parametrize("config", [c for c, (t, _) in CONFIGS.items() if t is not None])
@pytest.mark.parametrize("case", ["fsdp", "dtensor"])
def test_matches_torch_optim_on_the_same_sharded_parameters(results, case, config):
    for rank, r in enumerate(results):
        mine, ref = r[case, config, "optirs"], r[case, config, "torch"]
        for a, e in zip(mine["params"], ref["params"]):
            torch.testing.assert_close(a, e)
        # State laid out as torch.optim lays it out: DTensors with the parameter's
        # placements, the step counter (and ASGD's scalars) plain.
        for i, (s, t) in enumerate(zip(mine["state"], ref["state"])):
            assert {k: v[0] for k, v in s.items()} == {k: v[0] for k, v in t.items()}, (rank, i)
            for k in t:
                torch.testing.assert_close(s[k][1], t[k][1], msg=f"rank {rank} {i} {k}")


@pytest.mark.parametrize("config", CONFIGS)
def test_distribute_tensor_shard_replicate_and_plain_equal_unsharded_bitwise(results, config):
    # The same parameters and gradients, all plain, in one process.
    g = torch.Generator().manual_seed(7)
    fulls = [torch.randn(7, 5, generator=g), torch.randn(6, generator=g)]
    fulls.append(torch.randn(4, 3, generator=g))
    params = [nn.Parameter(t.clone()) for t in fulls]
    opt = make_optimizer(config, params, "optirs")
    for _ in range(STEPS):
        for p, t in zip(params, fulls):
            p.grad = torch.randn(t.shape, generator=g)
        opt.step()
    expected = [full(p) for p in params]
    for rank, r in enumerate(results):
        got = r["dtensor", config, "optirs"]
        assert_equal(got["params"], expected, f"rank {rank} {config}")
        assert got["full_steps"] == (STEPS if "8bit" in config else 1)  # then the plan
        for state, want in zip(got["state"], [("Shard(dim=0)",), ("Replicate()",), "plain"]):
            # Buffers laid out as their parameter; 0-d scalars (step, ASGD's eta and mu,
            # NAdam's mu_product) plain, as torch.optim keeps them.
            assert {v[0] for v in state.values() if v[1].dim() > 0} == {want}, config
            assert {v[0] for v in state.values() if v[1].dim() == 0} <= {"plain"}, config


def test_two_d_mesh_matches_unsharded(results):
    g = torch.Generator().manual_seed(5)
    fulls = [torch.randn(7, 5, generator=g), torch.randn(6, generator=g)]
    params = [nn.Parameter(t.clone()) for t in fulls]
    opt = optirs.torch.AdamW(params, lr=1e-2)
    norms = []
    for _ in range(STEPS):
        for p, t in zip(params, fulls):
            p.grad = torch.randn(t.shape, generator=g)
        norms.append(opt.clip_grad_norm_(0.5))
        opt.step()
    for r in results:
        got = r["two_d"]
        # The norm is reduced in float64 (the unsharded one in the core's own order):
        # equal within tolerance; each step is clipped by it.
        for a, e in zip(got["norms"], norms):
            torch.testing.assert_close(a, e)
            assert float(e) > 0.5
        for a, e in zip(got["params"], params):
            torch.testing.assert_close(a, full(e))
        assert got["state"][0]["exp_avg"][0] == ("Shard(dim=0)", "Replicate()")
        assert got["state"][1]["exp_avg"][0] == ("Replicate()", "Shard(dim=0)")


def test_distributed_checkpoint_resumes_bitwise(results):
    for rank, r in enumerate(results):
        c = r["checkpoint"]
        assert_equal(c["resumed"], c["uninterrupted"], f"rank {rank}")
        for s in c["after_load"]:
            assert s["exp_avg"][0] == ("Shard(dim=0)",) and s["step"][0] == "plain"
            assert float(s["step"][1]) == 2.0


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_distributed_checkpoint_loads_resharded_into_one_process(run):
    """The 2-rank checkpoint into an unsharded model and optimizer (no process group)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    results, out_dir = run
    model = make_model()
    opt = optirs.torch.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    target = {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, opt),
    }
    dcp.load(target, checkpoint_id=str(out_dir / "ckpt"))
    set_model_state_dict(model, target["model"])
    set_optimizer_state_dict(model, opt, target["optim"])
    for step in range(2, 4):
        train_step(model, opt, step)
    assert_equal(
        [full(p) for p in model.parameters()], results[0]["checkpoint"]["uninterrupted"], "1 rank"
    )


@pytest.mark.parametrize("kind", ["fsdp", "mixed"])
@pytest.mark.parametrize("norm_type", CLIP_NORMS)
def test_clip_grad_norm_reduces_across_ranks(results, kind, norm_type):
    for r in results:
        c = r["clip"][kind, norm_type]
        assert c["actual_layout"] == ("Replicate()",)  # as torch's
        torch.testing.assert_close(c["actual"], c["unsharded"])
        if c["expected"] is None:
            # torch cannot take the inf norm of rank 1's empty shard (see _clip_case).
            coef = torch.clamp(0.1 / (c["unsharded"] + 1e-6), max=1.0)
            clipped_by_torch = [g * coef for g in c["grads"]]
        else:
            # torch's own result is the full tensors' norm: the reference is right.
            torch.testing.assert_close(c["expected"], c["unsharded"])
            torch.testing.assert_close(c["actual"], c["expected"])
            clipped_by_torch = c["clipped_by_torch"]
        for a, e in zip(c["clipped"], clipped_by_torch):
            torch.testing.assert_close(a, e)
        # The clip changed something, so the comparison above means something.
        assert float(c["unsharded"]) > 0.1
    # Both ranks agree on the norm.
    assert torch.equal(results[0]["clip"][kind, norm_type]["actual"],
                       results[1]["clip"][kind, norm_type]["actual"])  # fmt: skip


def test_fused_clip_in_the_step_matches_torch(results):
    for r in results:
        mine, ref = r["clip"]["fused"]["optirs"], r["clip"]["fused"]["torch"]
        for a, e in zip(mine["norms"], ref["norms"]):
            torch.testing.assert_close(a, e)
            assert float(e) > 0.05  # every step clipped
        for a, e in zip(mine["params"], ref["params"]):
            torch.testing.assert_close(a, e)


def test_refusals_name_the_reason(results):
    for r in results:
        out = r["refusals"]
        assert out["partial"].startswith("ValueError") and "Partial" in out["partial"]
        assert "param_groups[0]['params'][0]" in out["partial"]
        assert out["regridded_equal"] == out["regridded_moved"] == "True"
        assert out["plain_grad"].startswith("TypeError") and "plain tensor" in out["plain_grad"]
        assert out["8bit"].startswith("ValueError") and "8-bit" in out["8bit"]
        assert out["8bit_unchanged"] == "True"
        assert out["8bit_small"] == "stepped"
        assert out["not_elementwise_shard"].startswith("ValueError")
        assert "not element-wise" in out["not_elementwise_shard"]
        assert out["not_elementwise_replicate"] == "stepped"
        assert out["adafactor"].startswith("TypeError") and "DTensor" in out["adafactor"]
        assert out["adafactor_unchanged"] == "True"


def test_grad_scaler_skips_on_every_rank_and_unscales(results):
    for r in results:
        mine, ref = r["skip"]["scaler", "optirs"], r["skip"]["scaler", "torch"]
        assert torch.equal(mine[0], torch.ones(4, 2)) and torch.equal(ref[0], torch.ones(4, 2))
        assert (ref[1] != 1).all()
        torch.testing.assert_close(mine[1], ref[1])


def test_skip_nonfinite_skips_on_every_rank(results):
    for r in results:
        for name in ("AdamW", "AdamW8bit"):
            out = r["skip"][name]
            skipped, count, values = out["skipped"]
            assert skipped and count == 1, name
            assert torch.equal(values, torch.ones(4, 2)), name
            applied, values = out["then"]
            assert not applied and (values < 1).all(), name


if __name__ == "__main__":
    gloo_workers.main(worker, "a worker of test_fsdp.py")
