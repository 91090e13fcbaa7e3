"""``python -m optirs bench``: optirs against torch.optim's three CPU code paths.

For each optimizer, workload and thread count, the same initial parameters and gradients are
given to optirs and to torch.optim with ``foreach=False`` (the per-tensor for-loop),
``foreach=True`` and ``fused=True`` (where torch has a fused CPU kernel). After a warm-up that
allocates the optimizer state, every repeat round times each implementation once, in an order
that rotates from round to round; the results are medians over rounds. The headline ratio of
a torch path is the median over rounds of (torch time / optirs time) within the same round,
which is robust to the machine's speed drifting during the run.

Bandwidth is reported as bytes moved per step (reads + writes of float32 arrays) divided by
the step time, and compared with a *copy* bandwidth reference measured in the same run: the
faster of ``np.copyto`` and torch's (multithreaded) ``Tensor.copy_`` on buffers sized like the
workload's working set (two 256 MiB buffers once the working set exceeds 64 MiB). It is a
reference point, not a hard ceiling.

torch is imported lazily: the benchmark needs it, the package does not.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

import optirs

__all__ = [
    "CASES",
    "BenchConfig",
    "OptimizerCase",
    "Workload",
    "add_arguments",
    "config_from_args",
    "gpt2_small_shapes",
    "measure_copy_bandwidth",
    "run",
    "run_from_args",
]

TORCH_PATHS: dict[str, dict[str, bool]] = {
    "for-loop": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
}
"""torch.optim keyword arguments selecting each of its CPU code paths."""

IMPLS: tuple[str, ...] = ("optirs", *TORCH_PATHS)
"""Implementation names, in table order."""

FLOAT32_BYTES = 4
MAX_SIZE = 10**8
DRAM_BUFFER_BYTES = 256 * 2**20
CACHE_WORKING_SET_BYTES = 64 * 2**20
MAX_BATCH = 10_000
AGREEMENT_TOL = 1e-4
DEFAULT_SIZES = "1e4,1e6,1e7"
DEFAULT_REPEATS = 7
NO_TORCH_MESSAGE = "the benchmark compares against PyTorch: pip install torch"


@dataclass(frozen=True)
class OptimizerCase:
    """One optimizer configuration, built identically by optirs and torch.optim.

    ``bytes_per_elem`` counts the float32 bytes a step reads and writes per parameter element
    (``traffic`` spells them out); ``arrays`` is the number of distinct arrays it touches (its
    working set, in parameter-sized arrays, gradient included).
    """

    name: str
    cls: str
    kwargs: dict[str, Any]
    bytes_per_elem: int
    arrays: int
    has_fused: bool
    traffic: str


CASES: dict[str, OptimizerCase] = {
    c.name: c
    for c in (
        OptimizerCase(
            "sgd",
            "SGD",
            {"lr": 1e-3, "momentum": 0.9},
            bytes_per_elem=20,
            arrays=3,
            has_fused=True,
            traffic="read p,g,buf; write p,buf",
        ),
        OptimizerCase(
            "adam",
            "Adam",
            {"lr": 1e-3},
            bytes_per_elem=28,
            arrays=4,
            has_fused=True,
            traffic="read p,g,m,v; write p,m,v",
        ),
        OptimizerCase(
            "adamw",
            "AdamW",
            {"lr": 1e-3, "weight_decay": 1e-2},
            bytes_per_elem=28,
            arrays=4,
            has_fused=True,
            traffic="read p,g,m,v; write p,m,v",
        ),
        OptimizerCase(
            "rmsprop",
            "RMSprop",
            {"lr": 1e-2},
            bytes_per_elem=20,
            arrays=3,
            has_fused=False,
            traffic="read p,g,sq; write p,sq",
        ),
        OptimizerCase(
            "rmsprop-cm",
            "RMSprop",
            {"lr": 1e-2, "momentum": 0.9, "centered": True},
            bytes_per_elem=36,
            arrays=5,
            has_fused=False,
            traffic="read p,g,sq,buf,ga; write p,sq,buf,ga",
        ),
        OptimizerCase(
            "adagrad",
            "Adagrad",
            {"lr": 1e-2},
            bytes_per_elem=20,
            arrays=3,
            has_fused=True,
            traffic="read p,g,sum; write p,sum",
        ),
    )
}
"""The benchmarked optimizer configurations, by name."""


@dataclass(frozen=True)
class Workload:
    """A set of float32 parameter shapes stepped together by one optimizer."""

    name: str
    kind: str
    shapes: tuple[tuple[int, ...], ...]

    @property
    def numel(self) -> int:
        """Total number of parameter elements."""
        return sum(math.prod(s) for s in self.shapes)

    @property
    def largest(self) -> int:
        """Number of elements of the largest tensor."""
        return max(math.prod(s) for s in self.shapes)


def gpt2_small_shapes() -> tuple[tuple[int, ...], ...]:
    """The 148 parameter shapes of GPT-2 small (124,439,808 parameters, tied LM head)."""
    d, ff = 768, 3072
    shapes: list[tuple[int, ...]] = [(50257, d), (1024, d)]
    for _ in range(12):
        shapes += [(d,), (d,)]  # ln_1 weight, bias
        shapes += [(d, 3 * d), (3 * d,), (d, d), (d,)]  # attn c_attn, c_proj
        shapes += [(d,), (d,)]  # ln_2 weight, bias
        shapes += [(d, ff), (ff,), (ff, d), (d,)]  # mlp c_fc, c_proj
    shapes += [(d,), (d,)]  # ln_f weight, bias
    return tuple(shapes)


@dataclass
class BenchConfig:
    """Everything a benchmark run needs, as parsed from the command line."""

    cases: list[OptimizerCase]
    workloads: list[Workload]
    threads: list[int]
    repeats: int = DEFAULT_REPEATS
    warmup: int = 3
    sample_s: float = 0.02
    seed: int = 0
    json_path: Path | None = Path("bench-results/bench.json")
    plot_path: Path | None = None
    argv: list[str] = field(default_factory=list)


@dataclass
class _Impl:
    """One implementation under test: a no-argument step and its parameters as ndarrays."""

    name: str
    step: Callable[[], Any]
    params: list[np.ndarray]
    keep: Any = None  # the optimizer object, kept alive with its state


def _import_torch() -> Any:
    """Imports torch, or exits with a clear message when it is not installed."""
    try:
        import torch
    except ImportError:
        raise SystemExit(NO_TORCH_MESSAGE) from None
    return torch


# ----------------------------------------------------------------------------- parsing


def _fmt_count(n: int) -> str:
    """``10000 -> '1e4'``, ``2000000 -> '2e6'``, other counts as plain integers."""
    if n >= 1000:
        exp = int(math.log10(n))
        mant = n / 10**exp
        if mant == int(mant):
            return f"{int(mant)}e{exp}"
    return str(n)


def _parse_sizes(text: str) -> list[int]:
    """Parses ``"1e4,1e6,1_000_000"``; ``""`` or ``"none"`` gives no single-tensor sizes."""
    if text.strip().lower() in ("", "none"):
        return []
    sizes: list[int] = []
    for tok in text.split(","):
        try:
            value = float(tok.strip().replace("_", ""))
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a size: {tok!r}") from None
        if value != int(value) or not 1 <= value <= MAX_SIZE:
            raise argparse.ArgumentTypeError(
                f"size {tok!r} must be a whole number from 1 to {_fmt_count(MAX_SIZE)}"
            )
        sizes.append(int(value))
    return sizes


def _available_cpus() -> int:
    """CPUs this process may run on (its affinity mask), else ``os.cpu_count()``."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _parse_threads(text: str) -> list[int]:
    """Parses ``"1,all"`` (``all`` = available CPUs) into distinct thread counts, in order."""
    out: list[int] = []
    for tok in text.split(","):
        tok = tok.strip().lower()
        if tok == "all":
            n = _available_cpus()
        else:
            try:
                n = int(tok)
            except ValueError:
                raise argparse.ArgumentTypeError(f"not a thread count: {tok!r}") from None
            if n < 1:
                raise argparse.ArgumentTypeError("thread counts must be at least 1")
        if n not in out:
            out.append(n)
    return out


def _parse_optimizers(text: str) -> list[OptimizerCase]:
    """Parses a comma list of optimizer names (or ``all``)."""
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    if names == ["all"]:
        return list(CASES.values())
    unknown = [n for n in names if n not in CASES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown optimizer(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(CASES)}"
        )
    return [CASES[n] for n in dict.fromkeys(names)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``bench`` subcommand's options to ``parser``."""
    parser.add_argument(
        "--optimizers",
        type=_parse_optimizers,
        default=list(CASES.values()),
        metavar="LIST",
        help=f"comma list from {', '.join(CASES)} (default: all)",
    )
    parser.add_argument(
        "--sizes",
        type=_parse_sizes,
        default=_parse_sizes(DEFAULT_SIZES),
        metavar="LIST",
        help=f"single-tensor sizes, up to 1e8; 'none' for none (default: {DEFAULT_SIZES})",
    )
    parser.add_argument(
        "--many", action="store_true", help="also run 1000 tensors of 1000 elements"
    )
    parser.add_argument(
        "--gpt2",
        action="store_true",
        help="also run GPT-2 small's 148 parameter shapes (124M params; needs ~8 GiB RAM)",
    )
    parser.add_argument(
        "--threads",
        type=_parse_threads,
        default=_parse_threads("1,all"),
        metavar="LIST",
        help="thread counts, set for both torch and optirs; 'all' = available CPUs "
        "(default: 1,all)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=DEFAULT_REPEATS,
        metavar="N",
        help=f"timed rounds per run; results are medians over rounds (default: {DEFAULT_REPEATS})",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=3,
        metavar="N",
        help="untimed steps before timing, which allocate the state (default: 3)",
    )
    parser.add_argument(
        "--sample-ms",
        type=float,
        default=20.0,
        metavar="MS",
        help="steps are batched so one timed sample lasts about this long; a slower step is "
        "timed alone (default: 20)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random data")
    parser.add_argument(
        "--json",
        type=Path,
        default=Path("bench-results/bench.json"),
        metavar="PATH",
        help="where to write raw timings, medians and metadata (default: bench-results/bench.json)",
    )
    parser.add_argument(
        "--plot",
        type=Path,
        default=None,
        metavar="PATH",
        help="write a PNG of GB/s against size (needs matplotlib; skipped without it)",
    )


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """Turns parsed ``bench`` options into a :class:`BenchConfig`."""
    workloads = [Workload(f"n={_fmt_count(n)}", "size", ((n,),)) for n in args.sizes]
    if args.many:
        workloads.append(Workload("1000x1000", "many", ((1000,),) * 1000))
    if args.gpt2:
        workloads.append(Workload("gpt2-124M", "gpt2", gpt2_small_shapes()))
    if not workloads:
        raise SystemExit("nothing to run: give --sizes, --many or --gpt2")
    if args.repeats < 1 or args.warmup < 1 or args.sample_ms <= 0:
        raise SystemExit("--repeats and --warmup must be at least 1, --sample-ms positive")
    return BenchConfig(
        cases=args.optimizers,
        workloads=workloads,
        threads=args.threads,
        repeats=args.repeats,
        warmup=args.warmup,
        sample_s=args.sample_ms / 1e3,
        seed=args.seed,
        json_path=args.json,
        plot_path=args.plot,
        argv=["python -m optirs", *sys.argv[1:]],
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Entry point of ``python -m optirs bench``: runs, prints the table, writes outputs."""
    run(config_from_args(args))
    return 0


# ----------------------------------------------------------------------------- timing


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
    steps: dict[str, Callable[[], Any]], batches: dict[str, int], repeats: int
) -> dict[str, list[float]]:
    """Per-step seconds of each implementation in each round; the order rotates per round."""
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeats):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                times[name].append(_time_batch(steps[name], batches[name]))
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def _set_threads(torch: Any, n: int) -> None:
    """Gives torch and optirs the same number of threads."""
    torch.set_num_threads(n)
    optirs.set_num_threads(n)


def measure_copy_bandwidth(
    torch: Any, buffer_bytes: int, repeats: int, sample_s: float
) -> dict[str, Any]:
    """Copy bandwidth reference at the current thread count, counting read + write bytes.

    Times ``np.copyto(dst, src)`` (single-threaded) and torch's ``dst.copy_(src)`` (uses
    torch's threads) on two ``buffer_bytes`` float32 buffers; GB/s = 2 * buffer_bytes / time.
    """
    n = max(16, buffer_bytes // FLOAT32_BYTES)
    src = np.ones(n, np.float32)
    dst = np.zeros(n, np.float32)  # written once, so its pages are mapped before timing
    tsrc, tdst = torch.from_numpy(src), torch.from_numpy(dst)
    steps = {"numpy": lambda: np.copyto(dst, src), "torch": lambda: tdst.copy_(tsrc)}
    for step in steps.values():
        step()
    batches = {k: _calibrate(s, sample_s) for k, s in steps.items()}
    times = _interleaved(steps, batches, max(repeats, 5))
    moved = 2 * n * FLOAT32_BYTES
    gbps = {k: moved / statistics.median(v) / 1e9 for k, v in times.items()}
    return {
        "buffer_bytes": n * FLOAT32_BYTES,
        "numpy_gbps": gbps["numpy"],
        "torch_gbps": gbps["torch"],
        "gbps": max(gbps.values()),
        "samples_s": times,
    }


def _copy_buffer_bytes(working_set: int) -> int:
    """Copy-reference buffer size: half the working set, or 256 MiB for a large one."""
    if working_set > CACHE_WORKING_SET_BYTES:
        return DRAM_BUFFER_BYTES
    return max(4096, working_set // 2)


# ----------------------------------------------------------------------------- building


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


def _build_impls(
    torch: Any,
    case: OptimizerCase,
    init: list[np.ndarray],
    grads: list[np.ndarray],
    torch_grads: list[Any],
) -> tuple[dict[str, _Impl], dict[str, str]]:
    """Builds optirs and every available torch path on copies of ``init``.

    The torch paths share ``torch_grads`` (copies of ``grads``): none of these optimizers
    writes to ``.grad``. Returns the implementations and, per unavailable path, why.
    """
    impls: dict[str, _Impl] = {}
    params = [p.copy() for p in init]
    opt = getattr(optirs, case.cls)(params, **case.kwargs)
    impls["optirs"] = _Impl("optirs", lambda: opt.step(grads), params, opt)
    missing: dict[str, str] = {}
    for path, path_kwargs in TORCH_PATHS.items():
        if path == "fused" and not case.has_fused:
            missing[path] = f"torch.optim.{case.cls} has no fused kernel"
            continue
        tparams = [torch.from_numpy(p.copy()) for p in init]
        for tp, tg in zip(tparams, torch_grads):
            tp.grad = tg
        try:
            topt = getattr(torch.optim, case.cls)(tparams, **case.kwargs, **path_kwargs)
        except (RuntimeError, ValueError, TypeError) as exc:
            missing[path] = f"{type(exc).__name__}: {exc}"
            continue
        impls[path] = _Impl(path, topt.step, [t.numpy() for t in tparams], topt)
    return impls, missing


def _max_abs_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Largest absolute difference between two lists of same-shaped arrays."""
    return max(float(np.max(np.abs(x - y))) if x.size else 0.0 for x, y in zip(a, b))


def _check_agreement(
    impls: dict[str, _Impl], case: OptimizerCase, workload: Workload
) -> dict[str, float]:
    """Max abs difference of each torch path's parameters from optirs's; warns when large."""
    diffs = {}
    for name, impl in impls.items():
        if name != "optirs":
            diffs[name] = _max_abs_diff(impl.params, impls["optirs"].params)
            if diffs[name] > AGREEMENT_TOL:
                print(
                    f"\nwarning: {case.name} {workload.name}: torch {name} differs from optirs "
                    f"by up to {diffs[name]:.3g} after the warm-up steps",
                    file=sys.stderr,
                )
    return diffs


def _mem_available() -> int | None:
    """``MemAvailable`` from /proc/meminfo in bytes, or None where there is none."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _memory_needed(workload: Workload, case: OptimizerCase) -> int:
    """Rough peak bytes of one (workload, optimizer) run with all four implementations."""
    n = workload.numel * FLOAT32_BYTES
    per_impl = case.arrays - 1  # parameters and state; the gradient is shared
    # initial params + numpy grads + torch grads + the implementations + for-loop temporaries
    return n * (3 + per_impl * len(IMPLS)) + 3 * workload.largest * FLOAT32_BYTES


# ----------------------------------------------------------------------------- output


class _Progress:
    """A one-line progress bar on stderr (redrawn in place on a terminal)."""

    def __init__(self, total: int, width: int = 20) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.width = width
        self.tty = sys.stderr.isatty()
        self._last = 0

    def show(self, label: str) -> None:
        """Draws the bar with ``label`` for the task about to run."""
        filled = self.width * self.done // self.total
        line = f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} {label}"
        if self.tty:
            sys.stderr.write("\r" + line.ljust(self._last))
            self._last = len(line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def advance(self) -> None:
        """Marks one task done."""
        self.done += 1

    def close(self) -> None:
        """Draws the finished bar and ends its line."""
        self.show("done")
        if self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _cpu_model() -> str | None:
    """The CPU model name from /proc/cpuinfo, where present."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model", "cpu model")) and ":" in line:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _load_average() -> float | None:
    """The 1-minute load average, where the OS reports one."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _metadata(torch: Any, config: BenchConfig) -> dict[str, Any]:
    """Versions, machine and settings of this run."""
    return {
        "optirs_version": optirs.__version__,
        "simd_level": optirs.simd_level(),
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "cpus_available": _available_cpus(),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "load_average_at_start": _load_average(),
        "threads": config.threads,
        "repeats": config.repeats,
        "warmup": config.warmup,
        "sample_s": config.sample_s,
        "seed": config.seed,
        "argv": config.argv,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _print_header(meta: dict[str, Any]) -> None:
    """Prints the versions and machine description above the table."""
    print(
        f"optirs {meta['optirs_version']} (simd: {meta['simd_level']}), "
        f"torch {meta['torch_version']}, numpy {meta['numpy_version']}, "
        f"python {meta['python_version']}"
    )
    print(
        f"CPU: {meta['cpu_model'] or 'unknown'}; {meta['cpus_available']} CPUs available, "
        f"os.cpu_count() = {meta['cpu_count']}"
    )
    load = meta["load_average_at_start"]
    if load is not None and load > 0.5:
        print(
            f"WARNING: load average {load:.1f} on {meta['cpus_available']} CPUs: other work is "
            "running, timings (above all multithreaded ones) will be noisy"
        )
    print(
        f"{meta['repeats']} interleaved rounds per run (order rotated each round), "
        f"samples of ~{meta['sample_s'] * 1e3:g} ms, {meta['warmup']} warm-up steps; "
        "medians over rounds"
    )


def _fmt_ms(seconds: float | None) -> str:
    """Milliseconds with about three significant digits; '-' for a missing value."""
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    digits = max(0, 2 - math.floor(math.log10(ms))) if ms > 0 else 0
    return f"{ms:.{digits}f}"


def _fmt_ratio(ratio: float | None) -> str:
    """``3.21x``; '-' for a missing ratio."""
    if ratio is None:
        return "-"
    return f"{ratio:.2f}x" if ratio < 10 else f"{ratio:.1f}x" if ratio < 100 else f"{ratio:.0f}x"


def _table(runs: list[dict[str, Any]]) -> str:
    """The results table, one line per (optimizer, workload, threads)."""
    head = ["optimizer", "workload", "thr", "optirs ms"]
    head += [f"{p} ms" for p in TORCH_PATHS] + [f"x {p}" for p in TORCH_PATHS]
    head += ["GB/s", "copy GB/s", "% copy"]
    rows = [head]
    for r in runs:
        impl = r["impls"]
        row = [r["optimizer"], r["workload"], str(r["threads"])]
        row += [_fmt_ms(impl[i]["median_s"] if i in impl else None) for i in IMPLS]
        row += [
            _fmt_ratio(r["ratios"][p]["paired_median"] if p in r["ratios"] else None)
            for p in TORCH_PATHS
        ]
        row += [
            f"{impl['optirs']['gbps']:.1f}",
            f"{r['copy_gbps']:.1f}",
            f"{100 * impl['optirs']['gbps'] / r['copy_gbps']:.0f}%",
        ]
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = []
    for k, row in enumerate(rows):
        cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _print_notes(cases: list[OptimizerCase]) -> None:
    """Explains the table's columns."""
    traffic = ", ".join(f"{c.name} {c.bytes_per_elem}" for c in cases)
    notes = [
        "",
        "ms: median time of one step. x <path>: median over rounds of (torch time / optirs time)",
        "  in the same round; > 1 means optirs is faster. '-': no such path (torch has no fused",
        "  RMSprop).",
        "GB/s: optirs's effective bandwidth = float32 bytes read + written per element per step",
        f"  ({traffic}) x elements / time.",
        "copy GB/s: a copy-bandwidth REFERENCE, not a hard ceiling: the faster of np.copyto and",
        "  torch copy_ (counting read + write bytes) at the run's thread count, on buffers sized",
        f"  like the run's working set (2 x {DRAM_BUFFER_BYTES >> 20} MiB once it exceeds "
        f"{CACHE_WORKING_SET_BYTES >> 20} MiB).",
        "% copy = GB/s / copy GB/s. It can pass 100%: a copy's stores also read the destination",
        "  (write-allocate), which an in-place update does not need.",
    ]
    print("\n".join(notes))


def _write_plot(path: Path, runs: list[dict[str, Any]], copies: list[dict[str, Any]]) -> None:
    """PNG of effective GB/s against size for the single-tensor runs, if matplotlib exists."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "note: --plot needs matplotlib, which is not installed; no plot written",
            file=sys.stderr,
        )
        return
    sized = [r for r in runs if r["kind"] == "size"]
    if not sized:
        print("note: --plot draws the single-tensor sizes; none were run", file=sys.stderr)
        return
    names = list(dict.fromkeys(r["optimizer"] for r in sized))
    threads = sorted({r["threads"] for r in sized})
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
    styles = {"optirs": "o-", "for-loop": "s:", "foreach": "^--", "fused": "D-."}
    dram = {c["threads"]: c["gbps"] for c in copies if c["buffer_bytes"] >= DRAM_BUFFER_BYTES}
    for ax, name in zip(axes.flat, names):
        for t_i, t in enumerate(threads):
            mine = sorted(
                (r for r in sized if r["optimizer"] == name and r["threads"] == t),
                key=lambda r: r["numel"],
            )
            for impl in IMPLS:
                pts = [(r["numel"], r["impls"][impl]["gbps"]) for r in mine if impl in r["impls"]]
                if pts:
                    ax.plot(*zip(*pts), styles[impl], color=f"C{t_i}", label=f"{impl} t={t}")
            if t in dram:
                ax.axhline(
                    dram[t], color=f"C{t_i}", lw=0.8, alpha=0.5, label=f"DRAM copy ref t={t}"
                )
        ax.set_xscale("log")
        ax.set_title(name)
        ax.set_xlabel("elements")
        ax.set_ylabel("effective GB/s")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot written to {path}", file=sys.stderr)


# ----------------------------------------------------------------------------- the run


def _summarize(
    case: OptimizerCase,
    workload: Workload,
    threads: int,
    times: dict[str, list[float]],
    batches: dict[str, int],
    copy: dict[str, Any],
) -> dict[str, Any]:
    """Medians, paired ratios and bandwidths of one run, with its raw timings."""
    moved = case.bytes_per_elem * workload.numel
    impls = {
        name: {
            "steps_per_sample": batches[name],
            "per_step_s": ts,
            "median_s": statistics.median(ts),
            "gbps": moved / statistics.median(ts) / 1e9,
        }
        for name, ts in times.items()
    }
    base = times["optirs"]
    ratios = {}
    for path in TORCH_PATHS:
        if path in times:
            paired = [t / o for t, o in zip(times[path], base)]
            ratios[path] = {
                "paired_median": statistics.median(paired),
                "ratio_of_medians": impls[path]["median_s"] / impls["optirs"]["median_s"],
                "paired": paired,
            }
    return {
        "optimizer": case.name,
        "torch_class": case.cls,
        "kwargs": case.kwargs,
        "workload": workload.name,
        "kind": workload.kind,
        "numel": workload.numel,
        "tensors": len(workload.shapes),
        "threads": threads,
        "bytes_per_elem": case.bytes_per_elem,
        "traffic": case.traffic,
        "impls": impls,
        "ratios": ratios,
        "copy_gbps": copy["gbps"],
        "copy_buffer_bytes": copy["buffer_bytes"],
        "pct_of_copy": 100 * impls["optirs"]["gbps"] / copy["gbps"],
    }


def _copy_reference(
    torch: Any,
    config: BenchConfig,
    working_set: int,
    threads: int,
    copies: dict[tuple[int, int], dict[str, Any]],
    progress: _Progress,
) -> dict[str, Any]:
    """The copy-bandwidth reference for this working set and thread count (measured once)."""
    key = (_copy_buffer_bytes(working_set), threads)
    if key not in copies:
        progress.show(f"copy reference {key[0] / 2**20:.1f} MiB t={threads}")
        copies[key] = measure_copy_bandwidth(torch, key[0], config.repeats, config.sample_s)
        copies[key]["threads"] = threads
    return copies[key]


def _run_case(
    torch: Any,
    config: BenchConfig,
    workload: Workload,
    case: OptimizerCase,
    impls: dict[str, _Impl],
    missing: dict[str, str],
    copies: dict[tuple[int, int], dict[str, Any]],
    progress: _Progress,
) -> list[dict[str, Any]]:
    """Times one optimizer on one workload at each thread count; one result per count."""
    results = []
    diffs: dict[str, float] = {}
    steps = {name: impl.step for name, impl in impls.items()}
    for i, threads in enumerate(config.threads):
        _set_threads(torch, threads)
        working_set = case.arrays * workload.numel * FLOAT32_BYTES
        copy = _copy_reference(torch, config, working_set, threads, copies, progress)
        progress.show(f"{case.name} {workload.name} t={threads}")
        for step in steps.values():
            for _ in range(config.warmup):
                step()
        if i == 0:  # every implementation has taken the same number of steps so far
            diffs = _check_agreement(impls, case, workload)
        batches = {name: _calibrate(step, config.sample_s) for name, step in steps.items()}
        times = _interleaved(steps, batches, config.repeats)
        result = _summarize(case, workload, threads, times, batches, copy)
        result["max_abs_diff_vs_optirs"] = diffs
        result["unavailable"] = missing
        results.append(result)
        progress.advance()
    return results


def run(config: BenchConfig) -> dict[str, Any]:
    """Runs the benchmark described by ``config``, prints the table and writes the outputs.

    Returns the JSON-able results (metadata, copy references, runs, skipped runs).
    """
    torch = _import_torch()
    meta = _metadata(torch, config)
    _print_header(meta)
    sys.stdout.flush()
    old_threads = (torch.get_num_threads(), optirs.get_num_threads())
    copies: dict[tuple[int, int], dict[str, Any]] = {}
    runs: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    progress = _Progress(len(config.workloads) * len(config.cases) * len(config.threads))
    t_start = time.perf_counter()
    try:
        for workload in config.workloads:
            init, grads = _make_data(workload, config.seed)
            torch_grads = [torch.from_numpy(g.copy()) for g in grads]
            for case in config.cases:
                need, avail = _memory_needed(workload, case), _mem_available()
                if avail is not None and need > 0.9 * avail:
                    reason = f"needs ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available"
                    print(f"\nskipping {case.name} {workload.name}: {reason}", file=sys.stderr)
                    tag = {"optimizer": case.name, "workload": workload.name, "reason": reason}
                    for t in config.threads:
                        skipped.append({**tag, "threads": t})
                        progress.advance()
                    continue
                impls, missing = _build_impls(torch, case, init, grads, torch_grads)
                runs += _run_case(torch, config, workload, case, impls, missing, copies, progress)
                del impls
                gc.collect()
            del init, grads, torch_grads
            gc.collect()
    finally:
        progress.close()
        torch.set_num_threads(old_threads[0])
        optirs.set_num_threads(old_threads[1])
    elapsed = time.perf_counter() - t_start
    meta["elapsed_s"] = elapsed
    meta["load_average_at_end"] = _load_average()
    print()
    print(_table(runs))
    _print_notes(config.cases)
    copy_list = list(copies.values())
    results = {"meta": meta, "copy_bandwidth": copy_list, "runs": runs, "skipped": skipped}
    if config.json_path is not None:
        config.json_path.parent.mkdir(parents=True, exist_ok=True)
        config.json_path.write_text(json.dumps(results, indent=1))
        print(f"\nraw timings written to {config.json_path} ({elapsed:.0f} s)")
    if config.plot_path is not None:
        _write_plot(config.plot_path, runs, copy_list)
    return results
