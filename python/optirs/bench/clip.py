"""The clipping benchmark (``--clip``): the passes around the step.

Two comparisons, interleaved round by round in one process (see ``timing``), medians over
rounds, speed-ups as the median over rounds of (torch time / optirs time) in the same round:

- **clipped step**: ``torch.nn.utils.clip_grad_norm_(params, max_norm)`` (torch's foreach path)
  then ``torch.optim.AdamW(fused=True).step()``, against ``opt.clip_grad_norm_(max_norm)`` then
  ``opt.step()`` of ``optirs.torch.AdamW``, which reads the gradients once for the norm and
  applies the coefficient inside the step;
- **clip alone**: ``torch.nn.utils.clip_grad_norm_`` against the drop-in
  ``optirs.torch.clip_grad_norm_``.

In the clipped step ``max_norm`` is far below the gradients' norm, so every step clips (optirs
leaves the gradients as they are; torch scales them in place, every call). The clip-alone
runs clip each call just below the norm the previous call returned (``SHRINK``): repeated
in-place clipping to one ``max_norm`` would reach a coefficient of exactly 1, where optirs skips
the scaling pass that torch still makes.

Each comparison also times, in the same rounds, a probe streaming the bytes optirs's side must
move (``traffic``; 32 bytes per element for the clipped step, 12 for the clip alone), which
gives optirs's % of that ceiling and the ``bound``: torch's time over the ceiling's, the largest
speed-up any implementation moving those bytes could show in that run.
"""

from __future__ import annotations

import math
import statistics
import sys
from typing import Any

from .timing import (
    _median_ratio,
    _set_threads,
    _threads_restored,
    _warm_and_time,
    traffic_ceiling,
)

MAX_NORM = 1e-3
"""Far below the norm of the random gradients: every clipped step clips."""

SHRINK = 0.999
"""The clip-alone runs clip each call to this fraction of the norm the previous call returned:
a coefficient below 1 every time (so both scale every gradient), with the gradients shrinking
by only this factor per call."""


def traffic(what: str, n: int) -> dict[str, int]:
    """The bytes optirs's side of a comparison must move over ``n`` float32 elements.

    Args:
        what: ``"clipped step"`` (the norm reads every gradient; the AdamW step then reads the
            gradient and reads and writes the parameter and both moments) or ``"clip alone"``
            (the norm reads every gradient; the scaling reads and writes it).
        n: the number of elements.

    Returns:
        ``{"read": bytes only read, "rw": bytes read and written back}`` (``traffic_ceiling``'s
        argument).
    """
    if what == "clipped step":
        return {"read": 8 * n, "rw": 12 * n}
    return {"read": 4 * n, "rw": 4 * n}


def _implementations(torch: Any, init: list[Any], grads: list[Any]) -> dict[str, dict[str, Any]]:
    """The timed calls of each comparison, over fresh copies of the parameters and gradients."""
    import optirs.torch as ot

    tp = [torch.nn.Parameter(x.clone()) for x in init]
    op = [torch.nn.Parameter(x.clone()) for x in init]
    for p, q, g in zip(tp, op, grads):
        p.grad, q.grad = g.clone(), g.clone()
    topt = torch.optim.AdamW(tp, lr=1e-4, fused=True)
    oopt = ot.AdamW(op, lr=1e-4)
    # The norm each clip-alone run clips below next (a one-element list each, updated).
    last = {"torch": [math.inf], "optirs": [math.inf]}

    def torch_step() -> None:
        torch.nn.utils.clip_grad_norm_(tp, MAX_NORM)
        topt.step()

    def optirs_step() -> None:
        oopt.clip_grad_norm_(MAX_NORM)
        oopt.step()

    def torch_clip() -> None:
        m = last["torch"]
        m[0] = float(torch.nn.utils.clip_grad_norm_(tp, min(m[0] * SHRINK, 1e30)))

    def optirs_clip() -> None:
        m = last["optirs"]
        m[0] = float(ot.clip_grad_norm_(op, min(m[0] * SHRINK, 1e30)))

    return {
        "clipped step": {"torch": torch_step, "optirs": optirs_step},
        "clip alone": {"torch": torch_clip, "optirs": optirs_clip},
    }


def run_clip(
    torch: Any,
    shapes: tuple[tuple[int, ...], ...],
    threads: list[int],
    repeats: int,
    sample_s: float,
    settle_s: float,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Times both comparisons at each thread count; prints a table; returns the results.

    Args:
        torch: the torch module.
        shapes: the parameter shapes (float32).
        threads: thread counts, set for torch and optirs alike.
        repeats: timed rounds; results are medians over them.
        sample_s: calls are batched so one timed sample lasts about this long.
        settle_s: idle time before each sample (torch's OpenMP workers spin after a region).
        seed: seed of the random data.
    """
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    n = sum(t.numel() for t in init)
    results = []
    print(f"\nclipping: {len(shapes)} float32 tensors, {n:,} elements, max_norm={MAX_NORM:g}")
    print(
        f"{'threads':>7} {'what':<13} {'torch ms':>9} {'optirs ms':>10} {'speed-up':>9} "
        f"{'B/elem':>7} {'% ceil':>7} {'bound':>7}"
    )
    ceilings = {what: traffic_ceiling(traffic(what, n)) for what in ("clipped step", "clip alone")}
    with _threads_restored(torch):
        for t in threads:
            _set_threads(torch, t)
            for what, steps in _implementations(torch, init, grads).items():
                probe, scale = ceilings[what]
                times = _warm_and_time({**steps, "ceiling": probe}, repeats, sample_s, settle_s)
                ceil = [c * scale for c in times["ceiling"]]
                moved = traffic(what, n)
                row = {
                    "threads": t,
                    "what": what,
                    "elements": n,
                    "torch_ms": statistics.median(times["torch"]) * 1e3,
                    "optirs_ms": statistics.median(times["optirs"]) * 1e3,
                    "speedup": _median_ratio(times["torch"], times["optirs"]),
                    "bytes_per_elem": (moved["read"] + 2 * moved["rw"]) / n,
                    "pct_of_ceiling": 100 * _median_ratio(ceil, times["optirs"]),
                    "bound": _median_ratio(times["torch"], ceil),
                    "times_s": times,
                }
                results.append(row)
                print(
                    f"{t:>7} {what:<13} {row['torch_ms']:>9.2f} {row['optirs_ms']:>10.2f} "
                    f"{row['speedup']:>8.2f}x {row['bytes_per_elem']:>7.0f} "
                    f"{row['pct_of_ceiling']:>6.0f}% {row['bound']:>6.2f}x"
                )
                sys.stdout.flush()
    return results
