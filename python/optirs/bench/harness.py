"""Timing: the implementations under test, the memory ceiling, interleaved rounds, the run.

``run`` drives a whole benchmark: for each workload, dtype and optimizer it builds every
implementation and the ceiling, times them at each thread count, then runs the training-loop
benchmark (``train``) when asked and hands all results to the report, the plot and the JSON
file.
"""

from __future__ import annotations

import gc
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

import optirs

from .cases import (
    ALIGN_BYTES,
    APIS,
    CEILING,
    TORCH_PATHS,
    BenchConfig,
    DType,
    OptimizerCase,
    Workload,
)
from .metadata import collect, load_average, mem_available
from .plot import write_plot
from .report import Progress, print_header, print_tables, print_train_table
from .timing import _calibrate, _import_torch, _interleaved, _set_threads
from .train import run_train


@dataclass
class _Impl:
    """One implementation under test: a no-argument step, and a way to read its parameters."""

    name: str
    step: Callable[[], Any]
    snapshot: Callable[[], list[np.ndarray]]
    keep: Any = None  # the optimizer object, kept alive with its state


def _aligned_empty(n: int, dtype: Any) -> np.ndarray:
    """An uninitialised 1-D array of ``n`` elements that starts on a 64-byte boundary."""
    itemsize = np.dtype(dtype).itemsize
    raw = np.empty(n + ALIGN_BYTES // itemsize, dtype)
    offset = (-raw.ctypes.data % ALIGN_BYTES) // itemsize
    return raw[offset : offset + n]


@dataclass
class _Ceiling:
    """The memory-traffic probe of one run: its variants' steps and how to scale their times.

    A one-tensor workload has one variant, ``ceiling``. A workload of several tensors has two,
    over the same 64-byte-aligned buffers: ``ceiling:tensors`` calls the probe once per tensor
    (arrays shaped like the workload's), ``ceiling:flat`` once over all of them (the same bytes,
    plus the alignment padding between tensors, which ``scale`` takes out). The ceiling of a
    round is the faster of the two: per-call overhead is not memory traffic.
    """

    steps: dict[str, Callable[[], Any]]
    scale: dict[str, float]
    buffers: list[np.ndarray]


def _build_ceiling(workload: Workload, case: OptimizerCase, dtype: DType) -> _Ceiling:
    """Arrays and probe calls with the memory streams of ``case`` stepping ``workload``."""
    traffic = optirs._core.traffic
    sizes = [math.prod(s) for s in workload.shapes]
    align = ALIGN_BYTES // dtype.itemsize
    starts: list[int] = []
    total = 0
    for n in sizes:
        starts.append(total)
        total += n if len(sizes) == 1 else -(-n // align) * align
    buffers = [_aligned_empty(total, dtype.storage) for _ in range(1 + case.rw_streams)]
    for k, b in enumerate(buffers):
        b.fill(k + 1)  # maps every page before timing
    read, writes = buffers[:1], buffers[1:]

    def flat() -> None:
        traffic(read, writes)

    if len(sizes) == 1:
        return _Ceiling({CEILING: flat}, {CEILING: 1.0}, buffers)
    calls = [([read[0][a : a + n]], [w[a : a + n] for w in writes]) for a, n in zip(starts, sizes)]

    def per_tensor() -> None:
        for r, w in calls:
            traffic(r, w)

    return _Ceiling(
        {f"{CEILING}:tensors": per_tensor, f"{CEILING}:flat": flat},
        {f"{CEILING}:tensors": 1.0, f"{CEILING}:flat": workload.numel / total},
        buffers,
    )


def _make_data(workload: Workload, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Random initial parameters (standard normal) and gradients (0.01 * standard normal)."""
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s, dtype=np.float32) for s in workload.shapes]
    grads = []
    for s in workload.shapes:
        g = rng.standard_normal(s, dtype=np.float32)
        g *= np.float32(0.01)
        grads.append(g)
    return params, grads


def _torch_snapshot(tensors: list[Any]) -> Callable[[], list[np.ndarray]]:
    """Reads ``tensors`` as float32 NumPy arrays (a copy for 16-bit types, a view for float32)."""
    return lambda: [t.detach().float().numpy() for t in tensors]


def _build_impls(
    torch: Any,
    case: OptimizerCase,
    dtype: DType,
    apis: list[str],
    init: list[np.ndarray],
    grads: list[np.ndarray],
    torch_grads: list[Any],
) -> tuple[dict[str, _Impl], dict[str, str]]:
    """Builds optirs (for each API in ``apis``) and every available torch path.

    Each implementation gets its own copy of ``init`` in ``dtype``. Gradients are set once and
    reused: the NumPy API steps with ``grads``; the torch bridge and the torch paths share the
    tensors ``torch_grads`` (none of these optimizers writes to ``.grad``). Returns the
    implementations and, per unavailable torch path, why.
    """
    tdtype = getattr(torch, dtype.name)

    def tensors() -> list[Any]:
        tparams = [torch.from_numpy(p).to(tdtype, copy=True) for p in init]
        for tp, tg in zip(tparams, torch_grads):
            tp.grad = tg
        return tparams

    impls: dict[str, _Impl] = {}
    if "numpy" in apis:
        params = [p.copy() for p in init]
        opt = getattr(optirs, case.cls)(params, **case.kwargs)
        impls[APIS["numpy"]] = _Impl(APIS["numpy"], lambda: opt.step(grads), lambda: params, opt)
    if "torch" in apis:
        import optirs.torch as bridge

        tparams = tensors()
        bopt = getattr(bridge, case.cls)(tparams, **case.kwargs)
        impls[APIS["torch"]] = _Impl(APIS["torch"], bopt.step, _torch_snapshot(tparams), bopt)
    if "torch-flat" in apis:
        import optirs.torch as bridge

        # Parameters as a model has them (leaves that require grad): flatten_parameters gives
        # only those gradient views, and treats the others as frozen (never stepped flat).
        tparams = [torch.nn.Parameter(t) for t in tensors()]
        for tp, tg in zip(tparams, torch_grads):
            tp.grad = tg
        # Copies the shared gradients' values into its flat gradient buffer, once.
        bridge.flatten_parameters(tparams)
        fopt = getattr(bridge, case.cls)(tparams, **case.kwargs)
        name = APIS["torch-flat"]
        impls[name] = _Impl(name, fopt.step, _torch_snapshot(tparams), fopt)
    missing: dict[str, str] = {}
    for path, path_kwargs in TORCH_PATHS.items():
        if path == "fused" and not case.has_fused:
            missing[path] = f"torch.optim.{case.cls} has no fused kernel"
            continue
        tparams = tensors()
        try:
            topt = getattr(torch.optim, case.cls)(tparams, **case.kwargs, **path_kwargs)
        except (RuntimeError, ValueError, TypeError) as exc:
            missing[path] = f"{type(exc).__name__}: {exc}"
            continue
        impls[path] = _Impl(path, topt.step, _torch_snapshot(tparams), topt)
    return impls, missing


def _check_flat(impls: dict[str, _Impl]) -> None:
    """Raises when the flat API's optimizer does not step through its flat plan after the
    warm-up: it would be timing the per-tensor fallback under the flat row's name."""
    impl = impls.get(APIS["torch-flat"])
    if impl is None:
        return
    from optirs.torch._bridge import _steps_flat

    opt = impl.keep
    if not _steps_flat(opt):  # the 8-bit optimizers and Adafactor: per tensor by design
        return
    plan = opt.__dict__.get("_optirs_flat_plan")
    if plan is None or not plan.watch.current(opt.state):
        raise RuntimeError(
            f"--api torch-flat: {type(opt).__name__} does not step flat after the warm-up "
            "(its parameters fell back to the per-tensor path)"
        )


def _max_abs_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Largest absolute difference between two lists of same-shaped arrays."""
    return max(float(np.max(np.abs(x - y))) if x.size else 0.0 for x, y in zip(a, b))


def _check_agreement(
    impls: dict[str, _Impl], case: OptimizerCase, workload: Workload, dtype: DType
) -> tuple[str, dict[str, float]]:
    """Max abs difference of each implementation's parameters from optirs's first API's.

    Warns when one exceeds the dtype's tolerance. Returns the reference's name and the diffs.
    """
    ref_name = next(iter(impls))
    ref = impls[ref_name].snapshot()
    diffs = {}
    for name, impl in impls.items():
        if name != ref_name:
            diffs[name] = _max_abs_diff(impl.snapshot(), ref)
            if diffs[name] > dtype.agreement_tol:
                print(
                    f"\nwarning: {case.name} {workload.name} {dtype.name}: {name} differs from "
                    f"{ref_name} by up to {diffs[name]:.3g} after the warm-up steps",
                    file=sys.stderr,
                )
    return ref_name, diffs


def _memory_needed(workload: Workload, case: OptimizerCase, dtype: DType, apis: list[str]) -> int:
    """Rough peak bytes of one (workload, optimizer, dtype) run: every implementation at once."""
    n = workload.numel
    item = n * dtype.itemsize
    impls = len(apis) + len(TORCH_PATHS) - (0 if case.has_fused else 1)
    # initial params and NumPy grads (float32), torch grads, each implementation's parameters
    # and state, the ceiling's streams, and foreach's whole-model temporaries (about two)
    return 2 * n * 4 + item + impls * case.rw_streams * item + case.arrays * item + 2 * item


def _summarize(
    case: OptimizerCase,
    workload: Workload,
    dtype: DType,
    threads: int,
    apis: list[str],
    times: dict[str, list[float]],
    batches: dict[str, int],
    ceiling: _Ceiling,
) -> dict[str, Any]:
    """Medians, paired ratios, bandwidths and % of ceiling of one run, with raw timings."""
    moved = case.bytes_per_element(dtype) * workload.numel
    rounds = len(next(iter(times.values())))
    # The ceiling of each round: its fastest variant, scaled to exactly the workload's bytes.
    ceil = [min(times[v][k] * s for v, s in ceiling.scale.items()) for k in range(rounds)]
    ceil_median = statistics.median(ceil)
    impls: dict[str, dict[str, Any]] = {}
    for name, ts in times.items():
        if name in ceiling.scale:
            continue
        median = statistics.median(ts)
        impls[name] = {
            "steps_per_sample": batches[name],
            "per_step_s": ts,
            "median_s": median,
            "gbps": moved / median / 1e9,
            "pct_of_ceiling": 100 * statistics.median(c / t for c, t in zip(ceil, ts)),
        }
    for api, name in APIS.items():
        if name in impls:
            impls[name]["api"] = api
    ratios: dict[str, dict[str, Any]] = {}
    for api in apis:
        base = times[APIS[api]]
        ratios[api] = {}
        for path in TORCH_PATHS:
            if path in times:
                paired = [t / o for t, o in zip(times[path], base)]
                ratios[api][path] = {
                    "paired_median": statistics.median(paired),
                    "ratio_of_medians": impls[path]["median_s"] / impls[APIS[api]]["median_s"],
                    "paired": paired,
                }
    variants = {
        v: {
            "steps_per_sample": batches[v],
            "per_step_s": times[v],
            "scale": s,
            "median_s": statistics.median(times[v]) * s,
            "gbps": moved / (statistics.median(times[v]) * s) / 1e9,
        }
        for v, s in ceiling.scale.items()
    }
    return {
        "optimizer": case.name,
        "torch_class": case.cls,
        "kwargs": case.kwargs,
        "workload": workload.name,
        "kind": workload.kind,
        "numel": workload.numel,
        "tensors": len(workload.shapes),
        "dtype": dtype.name,
        "threads": threads,
        "bytes_per_elem": case.bytes_per_element(dtype),
        "bytes_per_step": moved,
        "traffic": case.traffic,
        "apis": apis,
        "impls": impls,
        "ceiling": {
            "per_step_s": ceil,
            "median_s": ceil_median,
            "gbps": moved / ceil_median / 1e9,
            "read_streams": 1,
            "read_write_streams": case.rw_streams,
            "variants": variants,
        },
        "ratios": ratios,
    }


def _run_case(
    torch: Any,
    config: BenchConfig,
    workload: Workload,
    case: OptimizerCase,
    dtype: DType,
    apis: list[str],
    impls: dict[str, _Impl],
    missing: dict[str, str],
    ceiling: _Ceiling,
    progress: Progress,
) -> list[dict[str, Any]]:
    """Times one optimizer on one workload at each thread count; one result per count."""
    results = []
    ref = ""
    diffs: dict[str, float] = {}
    steps = {name: impl.step for name, impl in impls.items()}
    steps.update(ceiling.steps)
    for i, threads in enumerate(config.threads):
        _set_threads(torch, threads)
        progress.show(f"{case.name} {workload.name} {dtype.short} t={threads}")
        for step in steps.values():
            for _ in range(config.warmup):
                step()
        if i == 0:  # every implementation has taken the same number of steps so far
            ref, diffs = _check_agreement(impls, case, workload, dtype)
        _check_flat(impls)
        batches = {name: _calibrate(step, config.sample_s) for name, step in steps.items()}
        times = _interleaved(steps, batches, config.repeats, config.settle_s)
        result = _summarize(case, workload, dtype, threads, apis, times, batches, ceiling)
        result["agreement_reference"] = ref
        result["max_abs_diff"] = diffs
        result["unavailable"] = missing
        results.append(result)
        progress.advance()
    return results


def run(config: BenchConfig) -> dict[str, Any]:
    """Runs the benchmark described by ``config``, prints the tables and writes the outputs.

    Returns the JSON-able results (metadata, runs, skipped runs, outputs written).
    """
    torch = _import_torch()
    if not hasattr(optirs._core, "traffic"):
        raise SystemExit(
            "this optirs build has no traffic probe (optirs._core.traffic): rebuild it "
            "(maturin develop --release)"
        )
    meta = collect(torch, config)
    print_header(meta)
    for dtype in config.dtypes:
        dropped = [a for a in config.apis if a not in dtype.apis]
        if dropped:
            print(
                f"note: {dtype.name} runs use the torch bridge only (api {', '.join(dropped)} "
                f"does not take {dtype.name})"
            )
    sys.stdout.flush()
    old_threads = (torch.get_num_threads(), optirs.get_num_threads())
    runs: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    n_tasks = len(config.workloads) * len(config.dtypes) * len(config.cases) * len(config.threads)
    n_tasks += len(config.train_models) * len(config.train_cases) * len(config.threads)
    train: list[dict[str, Any]] = []
    progress = Progress(n_tasks)
    t_start = time.perf_counter()
    try:
        for workload in config.workloads:
            init, grads = _make_data(workload, config.seed)
            for dtype in config.dtypes:
                apis = config.apis_for(dtype)
                tdtype = getattr(torch, dtype.name)
                torch_grads = [torch.from_numpy(g).to(tdtype, copy=True) for g in grads]
                for case in config.cases:
                    need, avail = _memory_needed(workload, case, dtype, apis), mem_available()
                    if avail is not None and need > 0.9 * avail:
                        reason = f"needs ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available"
                        print(
                            f"\nskipping {case.name} {workload.name} {dtype.name}: {reason}",
                            file=sys.stderr,
                        )
                        tag = {"optimizer": case.name, "workload": workload.name}
                        for t in config.threads:
                            skipped.append(
                                {**tag, "dtype": dtype.name, "threads": t, "reason": reason}
                            )
                            progress.advance()
                        continue
                    impls, missing = _build_impls(
                        torch, case, dtype, apis, init, grads, torch_grads
                    )
                    ceiling = _build_ceiling(workload, case, dtype)
                    runs += _run_case(
                        torch,
                        config,
                        workload,
                        case,
                        dtype,
                        apis,
                        impls,
                        missing,
                        ceiling,
                        progress,
                    )
                    del impls, ceiling
                    gc.collect()
                del torch_grads
                gc.collect()
            del init, grads
            gc.collect()
        train = run_train(torch, config, progress)
    finally:
        progress.close()
        torch.set_num_threads(old_threads[0])
        optirs.set_num_threads(old_threads[1])
    elapsed = time.perf_counter() - t_start
    meta["elapsed_s"] = elapsed
    meta["load_average_at_end"] = load_average()
    if runs:
        print()
        print_tables(runs, config.cases)
    if train:
        print()
        print_train_table(train)
    results: dict[str, Any] = {"meta": meta, "runs": runs, "skipped": skipped, "train": train}
    print()
    if config.plot_path is not None:
        written = write_plot(config.plot_path, runs, meta, train)
        meta["plot"] = None if written is None else str(written)
        if written is not None:
            print(f"plot written to {written}")
    if config.json_path is not None:
        config.json_path.parent.mkdir(parents=True, exist_ok=True)
        config.json_path.write_text(json.dumps(results, indent=1))
        print(f"raw timings written to {config.json_path}")
    load = meta["load_average_at_end"]
    print(
        f"{elapsed:.0f} s; load average at the end "
        + ("unknown" if load is None else " ".join(f"{x:.2f}" for x in load))
    )
    return results
