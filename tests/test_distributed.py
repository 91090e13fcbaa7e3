"""optirs.torch under torch.distributed: DistributedDataParallel and ZeroRedundancyOptimizer.

Two worker processes (this file run as a script, ``--rank 0`` / ``--rank 1``) form a gloo
process group on 127.0.0.1 (rank 0 opens a ``TCPStore`` on a free port chosen by the OS and
hands the port to rank 1 through a file, so there is no port race). Each rank trains the same
small tanh MLP on its half of every batch, for every optimizer configuration and both float
dtypes, in three ways:

- ``ddp``: ``DistributedDataParallel`` + ``optirs.torch.X``;
- ``zero``: ``DistributedDataParallel`` + ``ZeroRedundancyOptimizer(optimizer_class=X)`` (each
  rank steps its shard, then broadcasts it), followed by ``consolidate_state_dict(to=0)``;
- ``overlap``: ``ZeroRedundancyOptimizer(optimizer_class=X, overlap_with_ddp=True)`` with the
  ``hook_with_zero_step`` communication hook, which steps optirs's functional optimizers
  (``optirs.torch._distributed``) inside DDP's backward. torch refuses that hook on a process group
  whose backend is named ``"gloo"`` (pytorch/pytorch#62300: it may hang), and gloo is the only
  backend that all-reduces CPU tensors, so this case uses a group created as ``"cpu:gloo"`` (the
  same gloo backend under a name the check does not catch) to exercise torch's real code path
  with optirs (and fails, rather than skipping, should torch refuse that too). torch's overlap
  performs no update in the first two iterations (while DDP settles its buckets), so its
  reference skips them.

The parent process compares the results with a single-process run of ``optirs.torch.X`` on the
full batches.

Tolerances. DDP all-reduces the gradients (each the mean over a rank's 16 samples) and divides
by the world size, so the update equals the single-process one on the mean over all 32 samples
mathematically; only the summation order differs: (sum of 16)/16 + (sum of 16)/16, halved,
instead of the sum of 32 over 32 inside the matmul. That is an ulp or so per gradient entry,
fed back through 6 steps of a nonlinear network, and divided by ``sqrt(v) + eps`` in
Adam/RMSprop/Adagrad. Elements near zero (or the centered RMSprop buffer, a quotient of
nearly cancelling terms) make an element-wise relative bound meaningless, so each tensor is
compared on the scale of its largest entry: ``|actual - expected| <= TOL * (|expected| +
max|expected|)``. Measured worst case, as a fraction of the tensor's largest entry: 4.5e-7 in
float32 (states; parameters ~1e-7), 6.8e-16 in float64. TOL = 1e-5 (float32) and 1e-12
(float64) leave a margin of 20x and 1000x, while a real error (one rank's gradient only, a
missing average, a skipped or repeated update) shows up at 1e-2 and above. Comparisons that
involve no reduction-order difference are exact: both ranks hold bitwise the same parameters,
and ZeRO's result is bitwise DDP's (same all-reduced gradients, same kernels).
"""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import gloo_workers
import numpy as np
import optirs
import optirs.torch
import pytest
import torch
from torch import nn

WORLD = 2
BATCH = 32  # per step, over all ranks
STEPS = 6
WARMUP = 2  # iterations torch's ZeRO overlap needs before it updates (static_graph=False)
DTYPES = {"f32": torch.float32, "f64": torch.float64}
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}  # of the largest entry (see above)
MODES = ("ddp", "zero", "overlap")
WORKER_TIMEOUT_S = 120  # the whole two-process run; typically ~10 s

CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "SGD-momentum": ("SGD", {"lr": 0.05, "momentum": 0.9}),
    "SGD-nesterov": ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4}),
    "Adam": ("Adam", {"lr": 1e-2}),
    "AdamW-amsgrad": ("AdamW", {"lr": 1e-2, "weight_decay": 0.01, "amsgrad": True}),
    "RMSprop-centered-momentum": ("RMSprop", {"lr": 1e-3, "momentum": 0.9, "centered": True}),
    "Adagrad": ("Adagrad", {"lr": 0.05, "lr_decay": 0.01}),
}


def make_model(dtype: torch.dtype) -> nn.Module:
    """The same 10 -> 16 -> 16 -> 3 tanh MLP in every process."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)
        ).to(dtype)


def batch(step: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The full batch of ``step`` (drawn by NumPy from a per-step seed: the same everywhere)."""
    rng = np.random.default_rng(1000 + step)
    x = torch.from_numpy(rng.standard_normal((BATCH, 10))).to(dtype)
    y = torch.from_numpy(rng.integers(0, 3, BATCH))
    return x, y


def shard(t: torch.Tensor, rank: int) -> torch.Tensor:
    """This rank's contiguous half of a batch."""
    n = len(t) // WORLD
    return t[rank * n : (rank + 1) * n]


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy, averaged over the batch (so DDP's gradient average is the full mean)."""
    return nn.functional.cross_entropy(model(x), y)  # mean over the batch


def reference(config: str, dtype: torch.dtype, skip: int = 0) -> tuple[list[torch.Tensor], Any]:
    """Single-process ``optirs.torch`` training on the full batches; the first ``skip`` steps
    compute gradients but do not update. Returns the parameters and the optimizer."""
    name, kwargs = CONFIGS[config]
    model = make_model(dtype)
    opt = getattr(optirs.torch, name)(model.parameters(), **kwargs)
    for step in range(STEPS + skip):
        x, y = batch(step, dtype)
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        if step >= skip:
            opt.step()
    return [p.detach().clone() for p in model.parameters()], opt


# --------------------------------------------------------------------------------------------
# the worker (this file run as a script)
# --------------------------------------------------------------------------------------------


def _train(rank: int, mode: str, config: str, dtype: torch.dtype, overlap_group: Any) -> dict:
    """Trains one (mode, config, dtype) on this rank; returns what the tests compare."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.ddp_zero_hook import hook_with_zero_step
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    name, kwargs = CONFIGS[config]
    cls = getattr(optirs.torch, name)
    model = make_model(dtype)
    out: dict[str, Any] = {}
    if mode == "ddp":
        ddp = DistributedDataParallel(model)
        opt: Any = cls(ddp.parameters(), **kwargs)
    elif mode == "zero":
        ddp = DistributedDataParallel(model)
        opt = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=cls, **kwargs)
        out["local_optimizer"] = type(opt.optim).__name__
    else:
        # Tiny buckets: one per parameter, spread over both ranks.
        ddp = DistributedDataParallel(model, process_group=overlap_group, bucket_cap_mb=1e-4)
        opt = ZeroRedundancyOptimizer(
            ddp.parameters(), optimizer_class=cls, overlap_with_ddp=True, **kwargs
        )
        try:
            hook = hook_with_zero_step(allreduce_hook, ddp, opt, shard_buckets=True)
        except RuntimeError as e:
            return {"refused": str(e)}
        ddp.register_comm_hook(None, hook)
    steps = STEPS + (WARMUP if mode == "overlap" else 0)
    for step in range(steps):
        x, y = batch(step, dtype)
        opt.zero_grad()
        loss_fn(ddp, shard(x, rank), shard(y, rank)).backward()
        if mode != "overlap":
            opt.step()  # with overlap, the hook has stepped during backward
    if mode == "zero":
        opt.consolidate_state_dict(to=0)
        if rank == 0:
            out["state_dict"] = opt.state_dict()
    if mode == "overlap":
        out["local_optimizer"] = type(opt.optim).__name__
        out["local_params"] = len(opt.optim.param_groups[0]["params"])
    out["params"] = [p.detach().clone() for p in model.parameters()]
    dist.barrier()
    return out


def worker(rank: int, out_dir: Path) -> None:
    """Runs every (mode, config, dtype) on this rank; saves the results to ``rank{rank}.pt``."""
    import torch.distributed as dist

    optirs.torch.register_functional_optimizers()  # for ZeRO's overlap_with_ddp=True
    torch.set_num_threads(1)
    optirs.set_num_threads(1)
    store = gloo_workers.connect(rank, WORLD, out_dir / "port")
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    overlap_group = dist.new_group(backend="cpu:gloo")
    results = {}
    for mode in MODES:
        for config in CONFIGS:
            for dtype_id, dtype in DTYPES.items():
                results[mode, config, dtype_id] = _train(rank, mode, config, dtype, overlap_group)
    torch.save(results, out_dir / f"rank{rank}.pt")
    dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# the tests
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    """Launches the two workers once for the module; returns each rank's results."""
    out_dir = tmp_path_factory.mktemp("distributed")
    results = gloo_workers.launch(__file__, out_dir, WORLD, WORKER_TIMEOUT_S)
    return results


def assert_tensor_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Within TOL of the expected tensor's scale (see the module docstring)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    tol = TOL[expected.dtype]
    scale = expected.abs().max().item()
    np.testing.assert_allclose(
        actual.numpy(), expected.numpy(), rtol=tol, atol=tol * scale, err_msg=what
    )


def assert_close(actual: list[torch.Tensor], expected: list[torch.Tensor], dtype) -> None:
    """Every tensor of ``actual`` has ``dtype`` and is close to its ``expected`` one."""
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == dtype, i
        assert_tensor_close(a, e, f"param {i}")


def assert_equal(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    """Bitwise equal, tensor by tensor."""
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert torch.equal(a, e), f"param {i} differs (max {(a - e).abs().max().item():.3g})"


PARAMS = [
    pytest.param(config, dtype_id, id=f"{config}-{dtype_id}")
    for config in CONFIGS
    for dtype_id in DTYPES
]


@pytest.mark.parametrize(("config", "dtype_id"), PARAMS)
def test_ddp_matches_single_process(results, config, dtype_id):
    """DDP + optirs: ranks bitwise equal, and equal to one process on the full batches."""
    dtype = DTYPES[dtype_id]
    r0, r1 = (r["ddp", config, dtype_id] for r in results)
    assert_equal(r0["params"], r1["params"])
    expected, _ = reference(config, dtype)
    assert_close(r0["params"], expected, dtype)
    # and training did something
    initial = make_model(dtype).parameters()
    assert max((a - b).abs().max().item() for a, b in zip(expected, initial)) > 1e-3


@pytest.mark.parametrize(("config", "dtype_id"), PARAMS)
def test_zero_matches_ddp_and_consolidates(results, config, dtype_id):
    """ZeRO(optimizer_class=optirs.torch.X): bitwise DDP's result; consolidated state right."""
    dtype = DTYPES[dtype_id]
    name = CONFIGS[config][0]
    r0, r1 = (r["zero", config, dtype_id] for r in results)
    assert r0["local_optimizer"] == r1["local_optimizer"] == name
    assert_equal(r0["params"], r1["params"])
    assert_equal(r0["params"], results[0]["ddp", config, dtype_id]["params"])
    # consolidate_state_dict gathered every shard's optirs state, in torch's format
    sd = r0["state_dict"]
    _, ref_opt = reference(config, dtype)
    ref_sd = ref_opt.state_dict()
    assert sorted(sd["state"]) == sorted(ref_sd["state"])
    for i, ref_state in ref_sd["state"].items():
        state = sd["state"][i]
        assert sorted(state) == sorted(ref_state), i
        for key, ref_value in ref_state.items():
            value = state[key]
            if key == "step":
                assert value.dtype == ref_value.dtype and value.shape == ref_value.shape == ()
                assert float(value) == float(ref_value) == STEPS
            else:
                assert value.dtype == dtype
                assert_tensor_close(value, ref_value, f"state[{i}][{key!r}]")
    for group, ref_group in zip(sd["param_groups"], ref_sd["param_groups"]):
        for key in CONFIGS[config][1]:
            assert group[key] == ref_group[key], key


@pytest.mark.parametrize(("config", "dtype_id"), PARAMS)
def test_zero_overlap_with_ddp_matches_single_process(results, config, dtype_id):
    """ZeRO overlap_with_ddp=True stepping optirs's functional optimizers in backward."""
    dtype = DTYPES[dtype_id]
    r0, r1 = (r["overlap", config, dtype_id] for r in results)
    # With the pinned torch, a group named "cpu:gloo" passes the overlap hook's gloo check;
    # should a torch upgrade close that door, this fails loudly rather than skipping.
    assert "refused" not in r0, f"torch refused ZeRO overlap on 'cpu:gloo': {r0['refused']}"
    name = CONFIGS[config][0]
    assert r0["local_optimizer"] == r1["local_optimizer"] == f"Functional{name}"
    assert r0["local_params"] > 0 and r1["local_params"] > 0  # both ranks own a shard
    assert_equal(r0["params"], r1["params"])
    expected, _ = reference(config, dtype, skip=WARMUP)
    assert_close(r0["params"], expected, dtype)


# --------------------------------------------------------------------------------------------
# the functional optimizers, in-process
# --------------------------------------------------------------------------------------------


#: every optimizer class of optirs.torch's bridge
BRIDGE_NAMES = sorted(optirs.torch._bridge.__all__)


def test_functional_optimizers_are_registered():
    """Every optirs.torch class maps to its functional class in torch's registry."""
    from optirs.torch._distributed import FUNCTIONAL_OPTIMIZERS, register_functional_optimizers
    from torch.distributed.optim.utils import functional_optim_map

    registered = register_functional_optimizers()
    assert registered == FUNCTIONAL_OPTIMIZERS
    for name in BRIDGE_NAMES:
        cls = getattr(optirs.torch, name)
        functional = functional_optim_map[cls]
        assert functional.__name__ == f"Functional{name}"
        assert functional.optimizer_class is cls
    # torch's own entries are untouched
    assert functional_optim_map[torch.optim.AdamW].__name__ == "_FunctionalAdamW"


def test_registration_happens_when_asked_not_on_import():
    """Importing optirs.torch (and its distributed helpers) leaves torch's process-wide
    registry alone; ``register_functional_optimizers()`` fills it. In a fresh interpreter, since
    this one may have registered already."""
    code = (
        "import optirs.torch, optirs.torch._distributed\n"
        "from torch.distributed.optim.utils import functional_optim_map as m\n"
        "ours = lambda: sorted(c.__name__ for c in m if c.__module__.startswith('optirs'))\n"
        "print(ours())\n"
        "optirs.torch.register_functional_optimizers()\n"
        "print(ours())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout.splitlines()
    assert out == ["[]", str(sorted(BRIDGE_NAMES))]


@pytest.mark.parametrize("name", BRIDGE_NAMES)
def test_every_optimizer_has_a_functional_form(name):
    """Each optirs.torch optimizer, at its defaults, steps alike through its functional form
    (a gradient list) and directly (``.grad``)."""
    from optirs.torch._distributed import FUNCTIONAL_OPTIMIZERS

    cls = getattr(optirs.torch, name)
    rng = np.random.default_rng(7)
    # 5000 elements: past the 8-bit classes' min_8bit_size, so their 8-bit path runs.
    init = [torch.from_numpy(rng.standard_normal(s)).float() for s in ((50, 100), (7,))]
    params = [nn.Parameter(t.clone()) for t in init]
    ref_params = [nn.Parameter(t.clone()) for t in init]
    functional = FUNCTIONAL_OPTIMIZERS[cls](params)
    ref = cls(ref_params)
    for _ in range(3):
        grads = [torch.from_numpy(rng.standard_normal(tuple(p.shape))).float() for p in params]
        functional.step(grads)
        for p, g in zip(ref_params, grads):
            p.grad = g
        ref.step()
    for p, rp, p0 in zip(params, ref_params, init):
        assert torch.equal(p.detach(), rp.detach())
        assert not torch.equal(p.detach(), p0)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_functional_step_takes_gradients_as_a_list(config):
    """``step(gradients)`` equals ``step()`` with those gradients in ``.grad``; None skips a
    parameter; the parameters' own ``.grad`` is left as it was."""
    from optirs.torch._distributed import FUNCTIONAL_OPTIMIZERS

    name, kwargs = CONFIGS[config]
    cls = getattr(optirs.torch, name)
    rng = np.random.default_rng(5)
    init = [torch.from_numpy(rng.standard_normal(s)).float() for s in ((4, 3), (3,), (5,))]
    params = [nn.Parameter(t.clone()) for t in init]
    ref_params = [nn.Parameter(t.clone()) for t in init]
    functional = FUNCTIONAL_OPTIMIZERS[cls](params, **kwargs)
    ref = cls(ref_params, **kwargs)
    own = torch.full((5,), 7.0)
    params[2].grad = own
    for step in range(3):
        grads = [torch.from_numpy(rng.standard_normal(tuple(p.shape))).float() for p in params]
        grads[2] = None if step != 1 else grads[2]
        functional.step(grads)
        for p, g in zip(ref_params, grads):
            p.grad = g
        ref.step()
        for p, rp in zip(params, ref_params):
            assert torch.equal(p.detach(), rp.detach())
    assert params[0].grad is None and params[2].grad is own
    assert sorted(functional.state_dict()["state"]) == sorted(ref.state_dict()["state"])


def test_functional_param_groups_are_live_and_validated():
    from optirs.torch._distributed import FUNCTIONAL_OPTIMIZERS

    p = nn.Parameter(torch.ones(3))
    functional = FUNCTIONAL_OPTIMIZERS[optirs.torch.SGD]([p], lr=0.5)
    assert functional.param_groups[0]["lr"] == 0.5 and functional.param_group["lr"] == 0.5
    functional.param_groups[0]["lr"] = 0.25  # as ZeRO's _sync_param_groups does
    functional.step([torch.ones(3)])
    assert torch.equal(p.detach(), torch.full((3,), 0.75))
    with pytest.raises(ValueError, match="1 gradients for 2 parameters"):
        FUNCTIONAL_OPTIMIZERS[optirs.torch.SGD]([p, nn.Parameter(torch.ones(1))]).step([None])
    with pytest.raises(ValueError, match="empty parameter list"):
        FUNCTIONAL_OPTIMIZERS[optirs.torch.Adam]([])
    empty = FUNCTIONAL_OPTIMIZERS[optirs.torch.Adam]([], lr=1e-3, _allow_empty_param_list=True)
    empty.step([])
    assert empty.param_groups[0]["params"] == [] and empty.param_groups[0]["lr"] == 1e-3


if __name__ == "__main__":
    gloo_workers.main(worker, "a worker of test_distributed.py")
