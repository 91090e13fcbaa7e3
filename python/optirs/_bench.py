"""``python -m optirs bench``: optirs against torch.optim's CPU code paths and the memory ceiling.

For each optimizer, workload, dtype and thread count, the same initial parameters and gradients
are given to optirs (through its NumPy API, ``--api numpy``, and/or its torch bridge
``optirs.torch.X`` on torch tensors, ``--api torch``) and to torch.optim with ``foreach=False``
(the per-tensor for-loop), ``foreach=True`` and ``fused=True`` (where torch has a fused CPU
kernel). After a warm-up that allocates the optimizer state, every repeat round times each
implementation once, in an order that rotates from round to round; results are medians over
rounds. The speed-up against a torch path is the median over rounds of (torch time / optirs
time) within the same round, which is robust to the machine's speed drifting during the run.

The ceiling is measured in the same rounds: ``optirs._core.traffic`` streams exactly the bytes
a step moves (one read-only array for the gradient; read-write arrays for the parameter and each
state buffer, shaped like the workload's tensors) over the same thread pool, chunking and SIMD
dispatch as a step, with one XOR per element in place of the math. Its time is what moving
those bytes costs on this machine at that moment. "% of ceiling" is the median over rounds of
(ceiling time / run time); effective GB/s is bytes moved per step / median step time.

bfloat16 and float16 runs go through the torch bridge (NumPy has no bfloat16, and the NumPy API
takes float32 and float64) against torch's for-loop, foreach and fused paths in that dtype;
state buffers have the parameter's dtype as in torch, so a step moves half the float32 bytes.

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
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

import optirs

__all__ = [
    "APIS",
    "CASES",
    "DTYPES",
    "BenchConfig",
    "DType",
    "OptimizerCase",
    "Workload",
    "add_arguments",
    "config_from_args",
    "gpt2_small_shapes",
    "main",
    "run",
    "run_from_args",
]

TORCH_PATHS: dict[str, dict[str, bool]] = {
    "for-loop": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
}
"""torch.optim keyword arguments selecting each of its CPU code paths."""

APIS: dict[str, str] = {"numpy": "optirs", "torch": "optirs.torch"}
"""optirs's APIs (``--api``) and the implementation name each is reported under."""

IMPLS: tuple[str, ...] = (*APIS.values(), *TORCH_PATHS)
"""Implementation names, in table order."""

CEILING = "ceiling"
"""Name of the memory-traffic ceiling in the results."""

MAX_SIZE = 10**8
ALIGN_BYTES = 64
MAX_BATCH = 10_000
DEFAULT_SIZES = "1e4,1e6,1e7"
DEFAULT_REPEATS = 7
#: idle before each timed sample (see ``_interleaved``)
DEFAULT_SETTLE_MS = 20.0
DEFAULT_PLOT = Path("bench-results/bench.png")
DEFAULT_JSON = Path("bench-results/bench.json")
NO_TORCH_MESSAGE = "the benchmark compares against PyTorch: pip install torch"


@dataclass(frozen=True)
class DType:
    """A parameter dtype the benchmark runs: how optirs and torch store it, which APIs take it.

    ``storage`` is the NumPy dtype of the ceiling's arrays (bfloat16 bits are uint16), and
    ``agreement_tol`` the largest difference from optirs after the warm-up that is not warned
    about (bfloat16: about two units in the last place of a parameter of a few units).
    """

    name: str
    short: str
    itemsize: int
    storage: Any
    apis: tuple[str, ...]
    agreement_tol: float


DTYPES: dict[str, DType] = {
    "float32": DType("float32", "f32", 4, np.float32, ("numpy", "torch"), 1e-4),
    "bfloat16": DType("bfloat16", "bf16", 2, np.uint16, ("torch",), 2.0**-4),
    # three more mantissa bits than bfloat16
    "float16": DType("float16", "f16", 2, np.float16, ("torch",), 2.0**-7),
}
"""The dtypes ``--dtype`` accepts."""
_DTYPE_ALIASES = {
    "f32": "float32",
    "fp32": "float32",
    "bf16": "bfloat16",
    "f16": "float16",
    "fp16": "float16",
    "half": "float16",
}


@dataclass(frozen=True)
class OptimizerCase:
    """One optimizer configuration, built identically by optirs and torch.optim.

    ``bytes_per_elem`` counts the float32 bytes a step reads and writes per parameter element
    (``traffic`` spells them out); ``arrays`` is the number of distinct arrays it touches
    (gradient included): the ceiling reads one (the gradient) and reads and writes the rest.
    """

    name: str
    cls: str
    kwargs: dict[str, Any]
    bytes_per_elem: int
    arrays: int
    has_fused: bool
    traffic: str

    @property
    def rw_streams(self) -> int:
        """Arrays a step reads and writes: the parameter and each state buffer."""
        return self.arrays - 1

    def bytes_per_element(self, dtype: DType) -> int:
        """Bytes moved per parameter element by a step in ``dtype``."""
        return self.bytes_per_elem * dtype.itemsize // 4


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
    """A set of parameter shapes stepped together by one optimizer."""

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
    dtypes: list[DType] = field(default_factory=lambda: [DTYPES["float32"]])
    apis: list[str] = field(default_factory=lambda: ["numpy"])
    repeats: int = DEFAULT_REPEATS
    warmup: int = 3
    sample_s: float = 0.02
    settle_s: float = DEFAULT_SETTLE_MS / 1e3
    seed: int = 0
    json_path: Path | None = DEFAULT_JSON
    plot_path: Path | None = DEFAULT_PLOT
    argv: list[str] = field(default_factory=list)

    def apis_for(self, dtype: DType) -> list[str]:
        """The requested APIs that take ``dtype``; the torch bridge when none of them does."""
        return [a for a in self.apis if a in dtype.apis] or ["torch"]


@dataclass
class _Impl:
    """One implementation under test: a no-argument step, and a way to read its parameters."""

    name: str
    step: Callable[[], Any]
    snapshot: Callable[[], list[np.ndarray]]
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


def _parse_names(
    text: str, choices: dict[str, Any], what: str, aliases: dict[str, str] | None = None
) -> list[str]:
    """Parses a non-empty comma list of names from ``choices`` (or ``all``), without repeats."""
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    if names == ["all"]:
        return list(choices)
    names = [(aliases or {}).get(n, n) for n in names]
    unknown = [n for n in names if n not in choices]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {', '.join(unknown) or '(none)'}; choose from {', '.join(choices)}"
        )
    return list(dict.fromkeys(names))


def _parse_optimizers(text: str) -> list[OptimizerCase]:
    """Parses a comma list of optimizer names (or ``all``)."""
    return [CASES[n] for n in _parse_names(text, CASES, "optimizer(s)")]


def _parse_dtypes(text: str) -> list[DType]:
    """Parses ``"float32,bfloat16,float16"`` (also ``f32``, ``bf16``, ``f16``, ``all``)."""
    return [DTYPES[n] for n in _parse_names(text, DTYPES, "dtype(s)", _DTYPE_ALIASES)]


def _parse_apis(text: str) -> list[str]:
    """Parses ``"numpy,torch"`` (or ``all``)."""
    return _parse_names(text, APIS, "API(s)")


def _parse_path(text: str) -> Path | None:
    """An output path, or None for ``none`` / ``""`` (no such output)."""
    return None if text.strip().lower() in ("", "none") else Path(text)


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
        help="also run GPT-2 small's 148 parameter shapes (124M params; float32 Adam with both "
        "APIs needs ~12 GiB RAM)",
    )
    parser.add_argument(
        "--dtype",
        dest="dtypes",
        type=_parse_dtypes,
        default=[DTYPES["float32"]],
        metavar="LIST",
        help="parameter dtypes from float32, bfloat16, float16 (default: float32); bfloat16 "
        "and float16 runs use the torch bridge",
    )
    parser.add_argument(
        "--api",
        dest="apis",
        type=_parse_apis,
        default=["numpy"],
        metavar="LIST",
        help="optirs APIs from numpy (optirs.X on ndarrays), torch (optirs.torch.X on the "
        "torch paths' tensors) (default: numpy)",
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
    parser.add_argument(
        "--settle-ms",
        type=float,
        default=DEFAULT_SETTLE_MS,
        metavar="MS",
        help="idle time before each timed sample, so that no implementation starts while the "
        "one before it still occupies the CPUs (torch's OpenMP workers spin for milliseconds "
        f"after each parallel region); 0 for none (default: {DEFAULT_SETTLE_MS:g})",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random data")
    parser.add_argument(
        "--json",
        type=_parse_path,
        default=DEFAULT_JSON,
        metavar="PATH",
        help=f"where to write raw timings, medians and metadata; 'none' for nowhere "
        f"(default: {DEFAULT_JSON})",
    )
    parser.add_argument(
        "--plot",
        type=_parse_path,
        default=DEFAULT_PLOT,
        metavar="PATH",
        help=f"PNG of GB/s against size (float32, most threads), with the ceiling; needs "
        f"matplotlib, skipped without it; 'none' for no plot (default: {DEFAULT_PLOT})",
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
    if args.repeats < 1 or args.warmup < 1 or args.sample_ms <= 0 or args.settle_ms < 0:
        raise SystemExit(
            "--repeats and --warmup must be at least 1, --sample-ms positive, --settle-ms >= 0"
        )
    return BenchConfig(
        cases=args.optimizers,
        workloads=workloads,
        threads=args.threads,
        dtypes=args.dtypes,
        apis=args.apis,
        repeats=args.repeats,
        warmup=args.warmup,
        sample_s=args.sample_ms / 1e3,
        settle_s=args.settle_ms / 1e3,
        seed=args.seed,
        json_path=args.json,
        plot_path=args.plot,
        argv=["python -m optirs", *sys.argv[1:]],
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Entry point of ``python -m optirs bench``: runs, prints the tables, writes outputs."""
    run(config_from_args(args))
    return 0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parses ``bench`` options from ``argv`` (as on the command line), runs, returns results."""
    parser = argparse.ArgumentParser(prog="python -m optirs bench")
    add_arguments(parser)
    args = parser.parse_args(argv)
    config = config_from_args(args)
    config.argv = ["python -m optirs bench", *(argv if argv is not None else sys.argv[1:])]
    return run(config)


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
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeats):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                if settle_s:
                    time.sleep(settle_s)
                times[name].append(_time_batch(steps[name], batches[name]))
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def _set_threads(torch: Any, n: int) -> None:
    """Gives torch and optirs the same number of threads."""
    torch.set_num_threads(n)
    optirs.set_num_threads(n)


# ----------------------------------------------------------------------------- the ceiling


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


def _memory_needed(workload: Workload, case: OptimizerCase, dtype: DType, apis: list[str]) -> int:
    """Rough peak bytes of one (workload, optimizer, dtype) run: every implementation at once."""
    n = workload.numel
    item = n * dtype.itemsize
    impls = len(apis) + len(TORCH_PATHS) - (0 if case.has_fused else 1)
    # initial params and NumPy grads (float32), torch grads, each implementation's parameters
    # and state, the ceiling's streams, and foreach's whole-model temporaries (about two)
    return 2 * n * 4 + item + impls * case.rw_streams * item + case.arrays * item + 2 * item


# ----------------------------------------------------------------------------- output


class _Progress:
    """A one-line progress bar on stderr (redrawn in place on a terminal)."""

    def __init__(self, total: int, width: int = 20) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.width = width
        self.tty = sys.stderr.isatty()
        self._last = 0
        self._t0 = time.perf_counter()

    def show(self, label: str) -> None:
        """Draws the bar with ``label`` for the task about to run."""
        filled = self.width * self.done // self.total
        elapsed = time.perf_counter() - self._t0
        line = (
            f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
            f"{elapsed:4.0f}s {label}"
        )
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


def _load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages, where the OS reports them."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _metadata(torch: Any, config: BenchConfig) -> dict[str, Any]:
    """Versions, machine and settings of this run."""
    try:
        import matplotlib

        mpl_version: str | None = matplotlib.__version__
    except ImportError:
        mpl_version = None
    return {
        "optirs_version": optirs.__version__,
        "simd_level": optirs.simd_level(),
        "chunk_elems": optirs._core.CHUNK_ELEMS,
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "matplotlib_version": mpl_version,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "cpus_available": _available_cpus(),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "mem_available_bytes": _mem_available(),
        "load_average_at_start": _load_average(),
        "threads": config.threads,
        "dtypes": [d.name for d in config.dtypes],
        "apis": config.apis,
        "repeats": config.repeats,
        "warmup": config.warmup,
        "sample_s": config.sample_s,
        "settle_s": config.settle_s,
        "seed": config.seed,
        "ceiling": "optirs._core.traffic: 1 read-only stream (gradient) and 1 read-write stream "
        "per parameter/state buffer, same pool, chunking and SIMD dispatch as a step; per "
        "round the faster of one call per tensor and one call over all tensors",
        "argv": config.argv,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _print_header(meta: dict[str, Any]) -> None:
    """Prints the versions and machine description above the tables."""
    print(
        f"optirs {meta['optirs_version']} (simd: {meta['simd_level']}), "
        f"torch {meta['torch_version']}, numpy {meta['numpy_version']}, "
        f"python {meta['python_version']}"
    )
    load = meta["load_average_at_start"]
    load_text = "unknown" if load is None else " ".join(f"{x:.2f}" for x in load)
    print(
        f"CPU: {meta['cpu_model'] or 'unknown'}; {meta['cpus_available']} CPUs available "
        f"(os.cpu_count() = {meta['cpu_count']}); load average {load_text} (1/5/15 min)"
    )
    if load is not None and load[0] > 0.5:
        print(
            f"WARNING: load average {load[0]:.1f} on {meta['cpus_available']} CPUs: other work "
            "is running, timings (above all multithreaded ones) will be noisy"
        )
    print(
        f"{meta['repeats']} interleaved rounds per run (order rotated each round), "
        f"samples of ~{meta['sample_s'] * 1e3:g} ms each after {meta['settle_s'] * 1e3:g} ms "
        f"idle, {meta['warmup']} warm-up steps; "
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


def _fmt_gbps(gbps: float) -> str:
    """GB/s with about three significant digits."""
    return f"{gbps:.0f}" if gbps >= 100 else f"{gbps:.1f}" if gbps >= 10 else f"{gbps:.2f}"


def _render(rows: list[list[str]], left: int) -> str:
    """Aligns ``rows`` (the first is the header) into columns; the first ``left`` flush left."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for k, row in enumerate(rows):
        cells = [
            c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))
        ]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _key(r: dict[str, Any]) -> list[str]:
    """The identifying cells of a run: optimizer, workload, dtype, threads."""
    return [r["optimizer"], r["workload"], DTYPES[r["dtype"]].short, str(r["threads"])]


def _time_table(runs: list[dict[str, Any]]) -> str:
    """Step times and speed-ups, one line per (optimizer, workload, dtype, api, threads)."""
    head = ["optimizer", "workload", "dtype", "api", "thr", "optirs ms"]
    head += [f"{p} ms" for p in TORCH_PATHS] + [f"x {p}" for p in TORCH_PATHS]
    rows = [head]
    for r in runs:
        impls = r["impls"]
        for api, ratios in r["ratios"].items():
            row = [*_key(r)[:3], api, _key(r)[3], _fmt_ms(impls[APIS[api]]["median_s"])]
            row += [_fmt_ms(impls[p]["median_s"] if p in impls else None) for p in TORCH_PATHS]
            row += [
                _fmt_ratio(ratios[p]["paired_median"] if p in ratios else None) for p in TORCH_PATHS
            ]
            rows.append(row)
    return _render(rows, 4)


def _bandwidth_table(runs: list[dict[str, Any]]) -> str:
    """Effective GB/s and % of ceiling of every implementation, one line per run."""
    present = [i for i in IMPLS if any(i in r["impls"] for r in runs)]
    rows = [["optimizer", "workload", "dtype", "thr", "ceiling", *present]]
    for r in runs:
        row = [*_key(r), _fmt_gbps(r["ceiling"]["gbps"])]
        for name in present:
            imp = r["impls"].get(name)
            cell = "-"
            if imp is not None:
                cell = f"{_fmt_gbps(imp['gbps'])} {imp['pct_of_ceiling']:3.0f}%"
            row.append(cell)
        rows.append(row)
    return _render(rows, 3)


def _print_tables(runs: list[dict[str, Any]], cases: list[OptimizerCase]) -> None:
    """Prints both tables and explains their columns."""
    print("Step time (median, ms) and speed-up of optirs (median over rounds of torch / optirs)")
    print()
    print(_time_table(runs))
    print()
    print("Effective bandwidth, GB/s, and % of the ceiling (median over rounds of ceiling time /")
    print("step time)")
    print()
    print(_bandwidth_table(runs))
    traffic = ", ".join(f"{c.name} {c.bytes_per_elem}" for c in cases)
    gbps_note = textwrap.wrap(
        f"GB/s: bytes read + written per element per step (float32: {traffic}; bfloat16 and "
        "float16: half) x elements / median step time.",
        width=90,
        subsequent_indent="  ",
    )
    notes = [
        "",
        "api numpy: optirs.X stepping ndarrays; api torch: optirs.torch.X stepping the same",
        "  tensors as torch (16-bit runs always use the torch bridge). x <path> > 1: optirs is",
        "  faster. '-': no such path (torch has no fused RMSprop).",
        *gbps_note,
        "ceiling: optirs._core.traffic over the same streams (the gradient read; the parameter",
        "  and each state buffer read and written), thread pool, chunking and SIMD dispatch as a",
        "  step, one XOR per element instead of the math, timed in the same rounds. Several",
        "  tensors: per round the faster of one probe call per tensor and one over all of them.",
    ]
    print("\n".join(notes))


def _plot_runs(runs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int | None]:
    """The float32 single-tensor runs at the largest thread count, and that count."""
    sized = [r for r in runs if r["kind"] == "size" and r["dtype"] == "float32"]
    if not sized:
        return [], None
    threads = max(r["threads"] for r in sized)
    return [r for r in sized if r["threads"] == threads], threads


PLOT_STYLE: dict[str, dict[str, Any]] = {
    "optirs": {"color": "C0", "marker": "o", "ls": "-", "lw": 2.2},
    "optirs.torch": {"color": "C4", "marker": "o", "ls": ":", "lw": 1.8, "mfc": "none"},
    "for-loop": {"color": "C1", "marker": "s", "ls": "-", "lw": 1.3},
    "foreach": {"color": "C2", "marker": "^", "ls": "-", "lw": 1.3},
    "fused": {"color": "C3", "marker": "D", "ls": "-", "lw": 1.3},
}
"""Line style of each implementation in the plot."""


def _write_plot(path: Path, runs: list[dict[str, Any]], meta: dict[str, Any]) -> Path | None:
    """PNG of effective GB/s against size: one panel per optimizer, float32, most threads.

    Each implementation is a line; the ceiling for the same memory traffic a dashed black line.
    Returns the path written, or None (no matplotlib, or nothing to draw).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import LogLocator
    except ImportError:
        print(
            "note: the plot needs matplotlib, which is not installed: none written", file=sys.stderr
        )
        return None
    sized, threads = _plot_runs(runs)
    if not sized:
        print("note: the plot draws float32 single-tensor sizes; none were run", file=sys.stderr)
        return None
    names = list(dict.fromkeys(r["optimizer"] for r in sized))
    cols = min(3, len(names))
    nrows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.5 * nrows + 0.9), squeeze=False)
    handles: dict[str, Any] = {}
    for ax, name in zip(axes.flat, names):
        mine = sorted((r for r in sized if r["optimizer"] == name), key=lambda r: r["numel"])
        xs = [r["numel"] for r in mine]
        (line,) = ax.plot(
            xs, [r["ceiling"]["gbps"] for r in mine], "k--", lw=1.4, label="ceiling (same traffic)"
        )
        handles.setdefault("ceiling (same traffic)", line)
        for impl, style in PLOT_STYLE.items():
            pts = [(r["numel"], r["impls"][impl]["gbps"]) for r in mine if impl in r["impls"]]
            if pts:
                label = {"optirs": "optirs (numpy)", "optirs.torch": "optirs.torch"}.get(
                    impl, f"torch {impl}"
                )
                (line,) = ax.plot(*zip(*pts), ms=5, label=label, **style)
                handles.setdefault(label, line)
        case = CASES[name]
        ax.set_title(f"{name} ({case.bytes_per_elem} B/element)", fontsize=10)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10))
        ax.set_ylim(bottom=0)
        ax.set_xlabel("elements (one float32 tensor)", fontsize=9)
        ax.set_ylabel("effective GB/s", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(True, which="major", alpha=0.35)
        ax.grid(True, which="minor", axis="x", alpha=0.12)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    load = meta.get("load_average_at_start")
    fig.suptitle(
        f"optirs {meta['optirs_version']} vs torch {meta['torch_version']} CPU optimizers, "
        f"float32, {threads} thread{'s' if threads != 1 else ''} "
        f"({meta['cpus_available']} CPUs available"
        + (f", load {load[0]:.2f}" if load else "")
        + f")\n{meta['cpu_model'] or ''}",
        fontsize=10,
    )
    fig.legend(
        list(handles.values()),
        list(handles),
        loc="lower center",
        ncol=min(6, len(handles)),
        fontsize=8.5,
        frameon=False,
    )
    fig.tight_layout(rect=(0, 0.05 if nrows > 1 else 0.09, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- the run


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
    progress: _Progress,
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
    meta = _metadata(torch, config)
    _print_header(meta)
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
    progress = _Progress(n_tasks)
    t_start = time.perf_counter()
    try:
        for workload in config.workloads:
            init, grads = _make_data(workload, config.seed)
            for dtype in config.dtypes:
                apis = config.apis_for(dtype)
                tdtype = getattr(torch, dtype.name)
                torch_grads = [torch.from_numpy(g).to(tdtype, copy=True) for g in grads]
                for case in config.cases:
                    need, avail = _memory_needed(workload, case, dtype, apis), _mem_available()
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
    finally:
        progress.close()
        torch.set_num_threads(old_threads[0])
        optirs.set_num_threads(old_threads[1])
    elapsed = time.perf_counter() - t_start
    meta["elapsed_s"] = elapsed
    meta["load_average_at_end"] = _load_average()
    print()
    _print_tables(runs, config.cases)
    results: dict[str, Any] = {"meta": meta, "runs": runs, "skipped": skipped}
    print()
    if config.plot_path is not None:
        written = _write_plot(config.plot_path, runs, meta)
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
