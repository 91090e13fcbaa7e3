"""Timing primitives shared by the step-alone harness and the training-loop benchmark.

Both time implementations side by side in one process: each round runs every implementation
once, in an order that rotates from round to round, and results are medians over rounds.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from typing import Any, Callable

import numpy as np

import optirs

from .cases import MAX_BATCH, NO_TORCH_MESSAGE


def _import_torch() -> Any:
    """Imports torch, or exits with a clear message when it is not installed."""
    try:
        import torch
    except ImportError:
        raise SystemExit(NO_TORCH_MESSAGE) from None
    return torch


def _time_batch(step: Callable[[], Any], k: int) -> float:
    """Seconds per step of ``k`` back-to-back calls of ``step``."""
    t0 = time.perf_counter()
    for _ in range(k):
        step()
    return (time.perf_counter() - t0) / k


def _calibrate(step: Callable[[], Any], sample_s: float) -> int:
    """How many back-to-back steps make a timed sample of about ``sample_s`` seconds."""
    t = _time_batch(step, 1)
    if t < sample_s / 10:  # a single step is too short to time well: refine with a batch
        t = _time_batch(step, int(min(MAX_BATCH, sample_s / 10 / max(t, 1e-9))))
    return max(1, min(MAX_BATCH, round(sample_s / max(t, 1e-9))))


def _interleaved(
    steps: dict[str, Callable[[], Any]],
    batches: dict[str, int],
    repeats: int,
    settle_s: float = 0.0,
) -> dict[str, list[float]]:
    """Per-step seconds of each implementation in each round; the order rotates per round.

    Each sample starts after ``settle_s`` idle: torch's OpenMP workers spin-wait for a few
    milliseconds after each parallel region (measured here: optirs's 2-thread Adam step on
    10^6 elements ran 25-35% slower over the 15 ms right after torch's fused steps), so without
    a pause whichever implementation follows torch's pays for torch's threads.
    """
    times: dict[str, list[float]] = {n: [] for n in steps}
    for name in _rotations(list(steps), repeats):
        if settle_s:
            time.sleep(settle_s)
        times[name].append(_time_batch(steps[name], batches[name]))
    return times


def _rotations(names: list[str], repeats: int) -> Iterator[str]:
    """Each name once per round for ``repeats`` rounds, the order rotated by one each round,
    with Python's garbage collector paused throughout (a collection would land in one sample)."""
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeats):
            shift = r % len(names)
            yield from names[shift:] + names[:shift]
    finally:
        if gc_was_enabled:
            gc.enable()


def _set_threads(torch: Any, n: int) -> None:
    """Gives torch and optirs the same number of threads."""
    torch.set_num_threads(n)
    optirs.set_num_threads(n)


def traffic_ceiling(traffic: dict[str, int]) -> tuple[Callable[[], None], float]:
    """A probe call streaming about ``traffic``'s bytes, and the factor that scales its time to
    exactly them: the time the machine needs to move those bytes, the bound of any pass that
    moves them.

    The probe takes streams of one size (the reads', or half of them when the read-written bytes
    are no whole multiple: 8-bit codes are half a gradient), one read-only stream per unit of
    reads and one read-write stream per unit of what is read and written back, so it streams as
    few, long streams as a step does. A remainder under a unit (the 8-bit absmaxes) is not
    streamed; the factor adds it.

    Args:
        traffic: ``{"read": bytes only read, "rw": bytes read and written back}``.

    Returns:
        ``(probe, factor)``: the probe's time times ``factor`` is the time of exactly
        ``traffic``'s bytes.
    """
    read, rw = traffic["read"], traffic["rw"]
    unit = read if rw % read == 0 else read // 2
    n_read = read // unit
    n_rw = max(1, round(rw / unit))
    streams = [np.empty(unit, np.uint8) for _ in range(n_read + n_rw)]
    for k, s in enumerate(streams):
        s.fill(k + 1)  # maps every page before timing
    ro, rw_streams = streams[:n_read], streams[n_read:]

    def probe() -> None:
        optirs._core.traffic(ro, rw_streams)

    return probe, (read + 2 * rw) / (unit * (n_read + 2 * n_rw))
