"""``python -m optirs.bench.rounding``: bfloat16 AdamW over GPT-2 small's shapes, optirs with
each of its 16-bit remedies against torch's fused bfloat16 AdamW.

Rows: torch ``fused=True`` (round to nearest), optirs round to nearest, optirs
``bf16_stochastic_round=True`` and optirs ``master_weights=True``. Each is timed in interleaved
rounds (``timing``), medians over rounds; the ratio is torch's median time over the row's.
Bytes per element per step: the parameter, ``exp_avg`` and ``exp_avg_sq`` read and written
(2 bytes each, 12), the gradient read (2): 14; a master copy adds 4 read and 4 written: 22. The
traffic ceiling of a row is its bytes over the machine's copy bandwidth, so master weights move
1.57x the bytes of the others and cannot be faster than that ratio allows.

Steps with either option run the full (validating) step each time: the core's step plans do not
cover them.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import optirs

from .cases import gpt2_small_shapes
from .timing import _calibrate, _import_torch, _interleaved, _set_threads

#: bytes moved per element per step: parameter and two moments read and written, gradient read
BYTES = {"nearest": 14, "stochastic": 14, "master": 22}


def run_rounding(threads: int, repeats: int, sample_s: float, scale: int) -> list[dict[str, Any]]:
    """Median step time of each row over GPT-2 small's shapes (each divided in its first
    dimension by ``scale`` to shrink the run), with ``threads`` threads."""
    torch = _import_torch()
    import optirs.torch as ot

    _set_threads(torch, threads)
    shapes = [(max(1, s[0] // scale), *s[1:]) for s in gpt2_small_shapes()]
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen).to(torch.bfloat16) for s in shapes]
    grads = [(torch.randn(s, generator=gen) * 1e-3).to(torch.bfloat16) for s in shapes]
    n = sum(t.numel() for t in init)

    def make(kind: str) -> Any:
        ps = [torch.nn.Parameter(t.clone()) for t in init]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        if kind == "torch_fused":
            return torch.optim.AdamW(ps, lr=1e-4, fused=True).step
        options: dict[str, dict[str, Any]] = {
            "nearest": {},
            "stochastic": {"bf16_stochastic_round": True, "seed": 0},
            "master": {"master_weights": True},
        }
        return ot.AdamW(ps, lr=1e-4, **options[kind]).step

    steps = {k: make(k) for k in ("torch_fused", "nearest", "stochastic", "master")}
    for s in steps.values():
        s()  # the state
    batches = {k: _calibrate(s, sample_s) for k, s in steps.items()}
    times = _interleaved(steps, batches, repeats)
    base = statistics.median(times["torch_fused"])
    rows = []
    for k, ts in times.items():
        t = statistics.median(ts)
        b = 14 if k == "torch_fused" else BYTES[k]
        rows.append(
            {
                "row": k,
                "ms": t * 1e3,
                "speedup_vs_torch_fused": base / t,
                "bytes_per_elem": b,
                "GB/s": n * b / t / 1e9,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    """Prints the table. Args: ``--threads``, ``--repeats``, ``--sample-s``, ``--scale``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=optirs.get_num_threads())
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--sample-s", type=float, default=0.3)
    ap.add_argument("--scale", type=int, default=1, help="divide each shape's first dimension")
    a = ap.parse_args(argv)
    rows = run_rounding(a.threads, a.repeats, a.sample_s, a.scale)
    print(f"bfloat16 AdamW, GPT-2 small shapes / {a.scale}, {a.threads} threads")
    print(f"{'row':<12} {'ms':>9} {'x torch fused':>14} {'B/elem':>7} {'GB/s':>7}")
    for r in rows:
        print(
            f"{r['row']:<12} {r['ms']:9.2f} {r['speedup_vs_torch_fused']:14.2f} "
            f"{r['bytes_per_elem']:7d} {r['GB/s']:7.1f}"
        )


if __name__ == "__main__":
    main()
