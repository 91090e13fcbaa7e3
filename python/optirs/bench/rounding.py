"""The 16-bit parameter benchmark (``--rounding``): bfloat16 AdamW, optirs with each of its
16-bit remedies against torch's fused bfloat16 AdamW.

Rows, over the same bfloat16 parameters and gradients, interleaved round by round in one process
(see ``timing``), medians over rounds, speed-ups as the median over rounds of (torch fused time /
row time) in the same round:

- ``torch fused``: ``torch.optim.AdamW(fused=True)``, round to nearest;
- ``optirs nearest``: ``optirs.torch.AdamW``, round to nearest;
- ``optirs stochastic``: ``bf16_stochastic_round=True``;
- ``optirs master``: ``master_weights=True``.

Bytes per element per step: the parameter, ``exp_avg`` and ``exp_avg_sq`` read and written (2
bytes each, 12), the gradient read (2): 14; a float32 master copy adds 4 read and 4 written: 22.
Each row has its own memory-traffic ceiling, measured in the same rounds:
``optirs._core.traffic`` streaming exactly that row's bytes (``lowbit``'s probe); the table
prints % of it (the median over rounds of ceiling time / step time), so master weights, which
move 1.57x the bytes, are judged against their own ceiling.

Steps with either option run the full (validating) step each time: the core's step plans do not
cover them.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Callable

from .timing import _rows_against_ceilings, _threads_restored

BASE = "torch fused"
"""The row every speed-up is against."""

#: Each optirs row's options.
OPTIONS: dict[str, dict[str, Any]] = {
    "optirs nearest": {},
    "optirs stochastic": {"bf16_stochastic_round": True, "seed": 0},
    "optirs master": {"master_weights": True},
}

#: Whether each row keeps a float32 master copy (what its traffic depends on).
MASTER = {BASE: False, "optirs nearest": False, "optirs stochastic": False, "optirs master": True}


def bytes_per_step(master: bool, n: int) -> dict[str, int]:
    """Bytes one bfloat16 AdamW step over ``n`` elements reads only and reads and writes.

    Args:
        master: whether the step keeps a float32 master copy.
        n: elements.

    Returns:
        ``{"read": bytes only read (the gradient), "rw": bytes read and written back}``.
    """
    return {"read": 2 * n, "rw": (10 if master else 6) * n}


def run_rounding(
    torch: Any,
    shapes: tuple[tuple[int, ...], ...],
    threads: list[int],
    repeats: int,
    sample_s: float,
    settle_s: float,
    seed: int = 0,
) -> dict[str, Any]:
    """Times every row at each thread count; prints a table.

    Args:
        torch: the torch module.
        shapes: the parameter shapes (bfloat16).
        threads: thread counts, set for torch and optirs alike.
        repeats: timed rounds; results are medians over them.
        sample_s: calls are batched so one timed sample lasts about this long.
        settle_s: idle time before each sample (torch's OpenMP workers spin after a region).
        seed: seed of the random data.

    Returns:
        ``{"steps": [one row per (threads, row)]}``.
    """
    import optirs.torch as ot

    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen).to(torch.bfloat16) for s in shapes]
    grads = [(torch.randn(s, generator=gen) * 1e-3).to(torch.bfloat16) for s in shapes]
    n = sum(math.prod(s) for s in shapes)
    traffic = {m: bytes_per_step(m, n) for m in (False, True)}

    def make(name: str) -> Callable[[], Any]:
        ps = [torch.nn.Parameter(t.clone()) for t in init]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt: Any = (
            torch.optim.AdamW(ps, lr=1e-4, fused=True)
            if name == BASE
            else ot.AdamW(ps, lr=1e-4, **OPTIONS[name])
        )
        step: Callable[[], Any] = opt.step
        return step

    rows = []
    print(f"\n16-bit parameters: AdamW over {len(shapes)} bfloat16 tensors, {n:,} elements")
    print(f"{'threads':>7} {'what':<18} {'ms':>9} {'vs fused':>9} {'B/elem':>7} {'% ceil':>7}")
    with _threads_restored(torch):
        for row in _rows_against_ceilings(
            torch,
            threads,
            lambda: {name: make(name) for name in MASTER},
            MASTER,
            traffic,
            n,
            BASE,
            repeats,
            sample_s,
            settle_s,
        ):
            rows.append(row)
            print(
                f"{row['threads']:>7} {row['what']:<18} {row['ms']:>9.2f} "
                f"{row['speedup_vs_fused']:>8.2f}x {row['bytes_per_elem']:>7.2f} "
                f"{row['pct_of_ceiling']:>6.0f}%"
            )
            sys.stdout.flush()
    return {"steps": rows}
