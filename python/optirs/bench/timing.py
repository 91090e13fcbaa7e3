"""Timing primitives shared by the step-alone harness, the training-loop benchmark and the
clipping, low-bit and 16-bit benchmarks.

All time implementations side by side in one process: each round runs every implementation
once, in an order that rotates from round to round, and results are medians over rounds.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from collections.abc import Iterator, Mapping
from typing import Any, Callable, TypeVar

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


@contextlib.contextmanager
def _threads_restored(torch: Any) -> Iterator[None]:
    """Gives torch and optirs back the thread counts they had on entry, however the block ends
    (the runs inside set their own with ``_set_threads``)."""
    old = (torch.get_num_threads(), optirs.get_num_threads())
    try:
        yield
    finally:
        torch.set_num_threads(old[0])
        optirs.set_num_threads(old[1])


def _median_ratio(num: list[float], den: list[float]) -> float:
    """The median over rounds of ``num[i] / den[i]``: two rows' times compared round by round
    (a speed-up is the base's time over the other's)."""
    return statistics.median(a / b for a, b in zip(num, den))


def _warm_and_time(
    timed: dict[str, Callable[[], Any]], repeats: int, sample_s: float, settle_s: float
) -> dict[str, list[float]]:
    """One untimed call of each of ``timed`` (state, pools, pages), a batch size for each, then
    ``repeats`` interleaved rounds (``_interleaved``'s result)."""
    for f in timed.values():
        f()
    batches = {k: _calibrate(f, sample_s) for k, f in timed.items()}
    return _interleaved(timed, batches, repeats, settle_s)


_K = TypeVar("_K")


def _rows_against_ceilings(
    torch: Any,
    threads: list[int],
    make_steps: Callable[[], dict[str, Callable[[], Any]]],
    kind_of: Mapping[str, _K],
    traffic: Mapping[_K, dict[str, int]],
    n: int,
    base: str,
    repeats: int,
    sample_s: float,
    settle_s: float,
) -> Iterator[dict[str, Any]]:
    """Times the steps ``make_steps()`` builds at each thread count, each against the traffic
    ceiling of its kind, all interleaved in the same rounds; one result per (threads, step).

    Args:
        torch: the torch module.
        threads: thread counts, set for torch and optirs alike (the caller restores them).
        make_steps: fresh steps by row name, built again at each thread count.
        kind_of: each row's kind: what its bytes depend on.
        traffic: each kind's bytes (``traffic_ceiling``'s argument).
        n: elements per step.
        base: the row every speed-up is against.
        repeats: timed rounds; results are medians over them.
        sample_s: calls are batched so one timed sample lasts about this long.
        settle_s: idle time before each sample.

    Yields:
        ``{"threads", "what", "elements", "ms", "speedup_vs_fused", "bytes_per_elem",
        "pct_of_ceiling", "times_s"}``: the median step time, the median over rounds of (base
        time / row time), the bytes moved per element, the median over rounds of (ceiling time /
        row time) in %, and the row's per-step seconds in each round.
    """
    ceilings = {kind: traffic_ceiling(t) for kind, t in traffic.items()}
    for t in threads:
        _set_threads(torch, t)
        steps = make_steps()
        timed = dict(steps)
        timed.update({f"ceiling {kind}": probe for kind, (probe, _) in ceilings.items()})
        times = _warm_and_time(timed, repeats, sample_s, settle_s)
        for name in steps:
            kind = kind_of[name]
            scale = ceilings[kind][1]
            ceil = [c * scale for c in times[f"ceiling {kind}"]]
            yield {
                "threads": t,
                "what": name,
                "elements": n,
                "ms": statistics.median(times[name]) * 1e3,
                "speedup_vs_fused": _median_ratio(times[base], times[name]),
                "bytes_per_elem": (traffic[kind]["read"] + 2 * traffic[kind]["rw"]) / n,
                "pct_of_ceiling": 100 * _median_ratio(ceil, times[name]),
                "times_s": times[name],
            }


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
