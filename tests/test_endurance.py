"""Endurance: 10^5 steps of a small model in bounded memory, without reference leaks.

A small model (Adam over four parameters of a few hundred float32 elements) is where the
per-step Python/Rust overhead dominates, so anything retained per step shows up there first.

- NumPy API, 10^5 steps: resident memory (``/proc/self/statm``) grows by less than 4 MiB
  after a warm-up; Python allocations traced by ``tracemalloc`` over 10^4 more steps grow by
  less than 64 KiB (one retained object per step would be several hundred KiB); the reference
  counts of every parameter, gradient and state array are what they were; the number of
  gc-tracked objects is stable.
- torch bridge, 2 * 10^4 steps: the same checks (RSS, refcounts of parameters, gradients and
  state tensors, gc objects).
- Error paths: 10^4 refused steps (TypeError), 10^4 skipped non-finite steps and 10^3
  internal errors (panics) leave no memory or references behind either.

Budget: about 10 s on this machine (steps of ~20 us, ~70 us through the bridge).
"""

from __future__ import annotations

import functools
import gc
import os
import sys
import tracemalloc

import numpy as np
import optirs
import optirs.torch
import pytest
import torch

pytestmark = pytest.mark.skipif(
    not os.path.exists("/proc/self/statm"), reason="reads resident memory from /proc"
)

SIZES = (300, 200, 500, 100)
RSS_SLACK = 4 << 20  # bytes
TRACED_SLACK = 64 << 10
GC_SLACK = 200  # objects


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def gc_objects() -> int:
    gc.collect()
    return len(gc.get_objects())


def _numpy_model(**options):
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(n).astype(np.float32) for n in SIZES]
    grads = [[rng.standard_normal(n).astype(np.float32) for n in SIZES] for _ in range(8)]
    opt = optirs.Adam(params, lr=1e-4, weight_decay=1e-2, amsgrad=True, **options)
    return opt, params, grads


def _refcounts(arrays) -> list[int]:
    return [sys.getrefcount(a) for a in arrays]


def _numpy_arrays(opt, params, grads):
    state = [v for p in params for _, v in sorted(opt.state[p].items())]
    return [*params, *(g for row in grads for g in row), *state]


def test_numpy_api_hundred_thousand_steps():
    opt, params, grads = _numpy_model()
    step = opt.step
    for i in range(5_000):  # warm-up: the step plan, the pool, allocator pools
        step(grads[i % 8])
    arrays = _numpy_arrays(opt, params, grads)
    refs = _refcounts(arrays)
    objects = gc_objects()
    rss0 = rss()

    for i in range(100_000):
        step(grads[i % 8])

    growth = rss() - rss0
    assert growth < RSS_SLACK, f"resident memory grew by {growth / 2**20:.1f} MiB"
    assert _numpy_arrays(opt, params, grads) == arrays, "state arrays were replaced"
    assert _refcounts(arrays) == refs, "reference counts changed"
    assert gc_objects() - objects < GC_SLACK
    assert float(opt.state[params[0]]["step"]) == 105_000.0
    assert all(np.all(np.isfinite(p)) for p in params)

    tracemalloc.start()
    try:
        for i in range(2_000):
            step(grads[i % 8])
        traced0 = tracemalloc.get_traced_memory()[0]
        for i in range(10_000):
            step(grads[i % 8])
        traced = tracemalloc.get_traced_memory()[0] - traced0
    finally:
        tracemalloc.stop()
    assert traced < TRACED_SLACK, f"traced Python memory grew by {traced} bytes"


def test_torch_bridge_twenty_thousand_steps():
    rng = np.random.default_rng(1)
    params = [
        torch.nn.Parameter(torch.from_numpy(rng.standard_normal(n).astype(np.float32)))
        for n in SIZES
    ]
    grads = [
        [torch.from_numpy(rng.standard_normal(n).astype(np.float32)) for n in SIZES]
        for _ in range(8)
    ]
    opt = optirs.torch.AdamW(params, lr=1e-4, amsgrad=True)

    def run(steps):
        for i in range(steps):
            for p, g in zip(params, grads[i % 8]):
                p.grad = g
            opt.step()

    run(2_000)
    tensors = [*params, *(v for p in params for _, v in sorted(opt.state[p].items()))]
    refs = [sys.getrefcount(t) for t in tensors]
    grad_refs = [sys.getrefcount(g) for row in grads for g in row]
    objects = gc_objects()
    rss0 = rss()

    run(20_000)

    growth = rss() - rss0
    assert growth < RSS_SLACK, f"resident memory grew by {growth / 2**20:.1f} MiB"
    assert [sys.getrefcount(t) for t in tensors] == refs
    assert [sys.getrefcount(g) for row in grads for g in row] == grad_refs
    assert gc_objects() - objects < GC_SLACK
    assert float(opt.state[params[0]]["step"]) == 22_000.0


def _error_paths(opt, params, grads):
    """One refused step (wrong dtype), one skipped step (NaN) and one internal error."""
    bad_dtype = [g.astype(np.float64) for g in grads[0]]
    nan = [g.copy() for g in grads[0]]
    nan[-1][-1] = np.nan
    original = optirs._core.step
    panicking = functools.partial(original, _panic_for_tests="validation")
    original_plan_step = optirs._Plan.step

    def panicking_plan_step(self, groups, grads, options):
        # Steps after a good one go through the core's plan.
        return original_plan_step(
            self, groups, grads, {**options, "_panic_for_tests": "validation"}
        )

    def once(panic):
        try:
            opt.step(bad_dtype)
        except TypeError:
            pass
        opt.step(nan)
        if not panic:
            return
        optirs._core.step = panicking
        optirs._Plan.step = panicking_plan_step
        try:
            opt.step(grads[1])
        except RuntimeError:
            pass
        finally:
            optirs._core.step = original
            optirs._Plan.step = original_plan_step

    return once


def test_error_paths_do_not_leak(capfd):
    opt, params, grads = _numpy_model(skip_nonfinite=True)
    opt.step(grads[0])
    once = _error_paths(opt, params, grads)
    for i in range(200):
        once(i % 10 == 0)
    arrays = _numpy_arrays(opt, params, grads)
    refs = _refcounts(arrays)
    objects = gc_objects()
    rss0 = rss()
    for i in range(10_000):
        once(i % 10 == 0)  # a panic prints its message (and backtrace) to stderr: fewer
    capfd.readouterr()  # the panic hook's messages
    growth = rss() - rss0
    assert growth < RSS_SLACK, f"resident memory grew by {growth / 2**20:.1f} MiB"
    assert _refcounts(arrays) == refs
    assert gc_objects() - objects < GC_SLACK
    assert opt.skipped_steps == 10_200
    assert float(opt.state[params[0]]["step"]) == 1.0
