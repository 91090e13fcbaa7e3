"""Data-parallel training on CPUs: DistributedDataParallel + ZeroRedundancyOptimizer + optirs.

Each process (rank) trains a replica of the same MLP on its shard of every batch;
``DistributedDataParallel`` averages the gradients across ranks during backward, and
``ZeroRedundancyOptimizer`` shards the optimizer: each rank keeps the AdamW state of, and
updates, only its share of the parameters (with optirs's Rust kernels, through
``optimizer_class=optirs.torch.AdamW``), then broadcasts them to the other ranks. The gloo
backend runs it on CPUs, on one machine or several::

    torchrun --nproc-per-node 2 examples/ddp_zero.py
    torchrun --nproc-per-node 4 examples/ddp_zero.py --steps 300 --hidden 256 --threads 2

Every rank prints its loss (on its own shard) as training goes; at the end each checks that all
replicas hold bitwise the same parameters, and rank 0 gathers the sharded optimizer state
(``consolidate_state_dict``), which has torch's format and loads into ``torch.optim.AdamW`` or
``optirs.torch.AdamW`` alike.

Needs torch and optirs (``pip install optirs[torch]``); the data are synthetic.
"""

from __future__ import annotations

import argparse
import os

import optirs
import optirs.torch
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    parser.add_argument("--batch", type=int, default=256, help="global batch size (default 256)")
    parser.add_argument("--hidden", type=int, default=128, help="hidden width (default 128)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--log-every", type=int, default=50, help="print every N steps")
    parser.add_argument(
        "--threads", type=int, default=1, help="threads per rank for torch and optirs (default 1)"
    )
    return parser.parse_args()


def make_data(n: int, features: int = 32, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed synthetic classification task (labels from a random linear teacher), identical
    on every rank."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, features, generator=g)
    teacher = torch.randn(features, classes, generator=g)
    y = (x @ teacher + 0.5 * torch.randn(n, classes, generator=g)).argmax(dim=1)
    return x, y


def main() -> None:
    args = parse_args()
    # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT for env:// initialisation
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} is not divisible by {world} ranks")
    torch.set_num_threads(args.threads)
    optirs.set_num_threads(args.threads)

    x, y = make_data(8192)
    torch.manual_seed(0)  # the same initial weights everywhere (DDP broadcasts rank 0's anyway)
    model = nn.Sequential(
        nn.Linear(x.shape[1], args.hidden),
        nn.GELU(),
        nn.Linear(args.hidden, args.hidden),
        nn.GELU(),
        nn.Linear(args.hidden, 10),
    )
    ddp = DistributedDataParallel(model)
    opt = ZeroRedundancyOptimizer(
        ddp.parameters(),
        optimizer_class=optirs.torch.AdamW,  # was torch.optim.AdamW
        lr=args.lr,
        betas=(0.9, 0.999),  # given explicitly: OneCycleLR looks for them in opt.defaults
        weight_decay=0.01,
    )
    # The scheduler changes ZeRO's param_groups; ZeRO copies them into its local optirs
    # optimizer before every step.
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps)
    owned = sum(p.numel() for group in opt.optim.param_groups for p in group["params"])
    total = sum(p.numel() for p in model.parameters())
    print(
        f"[rank {rank}/{world}] {type(opt.optim).__module__}.{type(opt.optim).__name__} "
        f"steps {owned} of {total} parameters",
        flush=True,
    )

    per_rank = args.batch // world
    batches = len(x) // args.batch
    for step in range(args.steps):
        start = (step % batches) * args.batch + rank * per_rank
        xb, yb = x[start : start + per_rank], y[start : start + per_rank]
        opt.zero_grad()
        loss = nn.functional.cross_entropy(ddp(xb), yb)
        loss.backward()  # DDP all-reduces (averages) the gradients here
        opt.step()  # this rank's shard, then a broadcast of every shard
        sched.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            print(f"[rank {rank}] step {step:4d}  loss {loss.item():.4f}", flush=True)

    # every replica holds the same parameters, bit for bit
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    identical = all(torch.equal(g, gathered[0]) for g in gathered)
    with torch.no_grad():
        accuracy = (model(x).argmax(dim=1) == y).float().mean().item()
    print(f"[rank {rank}] replicas identical: {identical}  accuracy {accuracy:.3f}", flush=True)

    opt.consolidate_state_dict(to=0)  # collective: every rank takes part
    if rank == 0:
        state = opt.state_dict()["state"]
        steps = {float(s["step"]) for s in state.values()}
        print(
            f"[rank 0] consolidated AdamW state: {len(state)} parameters, step {steps}, "
            f"keys {sorted(next(iter(state.values())))}",
            flush=True,
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    if "RANK" not in os.environ:
        raise SystemExit("launch with torchrun, e.g.: torchrun --nproc-per-node 2 " + __file__)
    main()
