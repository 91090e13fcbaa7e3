"""The ``bench`` command's options: parsing them into a :class:`BenchConfig` and running it."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable

from .cases import (
    _DTYPE_ALIASES,
    APIS,
    CASES,
    DEFAULT_JSON,
    DEFAULT_PLOT,
    DEFAULT_REPEATS,
    DEFAULT_SETTLE_MS,
    DEFAULT_SIZES,
    DEFAULT_TRAIN_SAMPLE_MS,
    DTYPES,
    MAX_SIZE,
    TRAIN_MODELS,
    BenchConfig,
    DType,
    OptimizerCase,
    TrainModel,
    Workload,
    gpt2_small_shapes,
    shapes_for,
)
from .clip import run_clip
from .harness import run
from .lowbit import run_lowbit
from .metadata import available_cpus
from .rounding import run_rounding
from .timing import _import_torch

#: The benchmarks beside the step-alone and training runs, by option (and JSON key), in the order
#: they run.
_EXTRAS: dict[str, Callable[..., Any]] = {
    "clip": run_clip,
    "lowbit": run_lowbit,
    "rounding": run_rounding,
}


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


def _parse_threads(text: str) -> list[int]:
    """Parses ``"1,all"`` (``all`` = available CPUs) into distinct thread counts, in order."""
    out: list[int] = []
    for tok in text.split(","):
        tok = tok.strip().lower()
        if tok == "all":
            n = available_cpus()
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


def _parse_models(text: str) -> list[TrainModel]:
    """Parses a comma list of training-loop model names (or ``all``)."""
    return [TRAIN_MODELS[n] for n in _parse_names(text, TRAIN_MODELS, "model(s)")]


def _parse_dtypes(text: str) -> list[DType]:
    """Parses ``"float32,bfloat16,float16"`` (also ``f32``, ``bf16``, ``f16``, ``all``)."""
    return [DTYPES[n] for n in _parse_names(text, DTYPES, "dtype(s)", _DTYPE_ALIASES)]


def _parse_apis(text: str) -> list[str]:
    """Parses ``"numpy,torch,torch-flat"`` (or ``all``)."""
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
        "--train",
        type=_parse_models,
        nargs="?",
        const=list(TRAIN_MODELS.values()),
        default=[],
        metavar="MODELS",
        help="also time whole training iterations (zero_grad, forward, backward, step; no idle "
        f"time) of these models, or all: {', '.join(TRAIN_MODELS)} (default: all when given "
        "without a list)",
    )
    parser.add_argument(
        "--clip",
        nargs="?",
        const="gpt2",
        default=None,
        metavar="WHAT",
        help="also time gradient clipping: torch's clip_grad_norm_ + fused AdamW against "
        "optirs's fused clip + step, and the drop-in clip_grad_norm_ alone, on GPT-2 small's "
        "shapes (default when given without a value, ~4 GiB RAM) or one tensor of WHAT elements",
    )
    parser.add_argument(
        "--lowbit",
        nargs="?",
        const="gpt2",
        default=None,
        metavar="WHAT",
        help="also time AdamW with low-bit state: torch's fused float32 AdamW against optirs "
        "with float32, bfloat16 (state_dtype) and 8-bit (AdamW8bit) state, and bitsandbytes' "
        "CPU AdamW8bit when it is installed, each against its own traffic ceiling, then an 8-bit "
        "round-trip error report; on GPT-2 small's shapes (default when given without a value, "
        "~5 GiB RAM) or one tensor of WHAT elements",
    )
    parser.add_argument(
        "--rounding",
        nargs="?",
        const="gpt2",
        default=None,
        metavar="WHAT",
        help="also time AdamW over bfloat16 parameters: torch's fused AdamW against optirs "
        "rounding to nearest, with bf16_stochastic_round=True and with master_weights=True, "
        "each against its own traffic ceiling; on GPT-2 small's shapes (default when given "
        "without a value, ~3 GiB RAM) or one tensor of WHAT elements",
    )
    parser.add_argument(
        "--train-optimizers",
        type=_parse_optimizers,
        default=[CASES["adamw"]],
        metavar="LIST",
        help="optimizers of the training loops, from the --optimizers names (default: adamw)",
    )
    parser.add_argument(
        "--train-sample-ms",
        type=float,
        default=DEFAULT_TRAIN_SAMPLE_MS,
        metavar="MS",
        help="training iterations are batched so one timed sample lasts about this long "
        f"(default: {DEFAULT_TRAIN_SAMPLE_MS:g})",
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
        "torch paths' tensors), torch-flat (optirs.torch.X on tensors made contiguous by "
        "optirs.torch.flatten_parameters) (default: numpy)",
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
    if (
        not workloads
        and not args.train
        and not getattr(args, "clip", None)
        and not getattr(args, "lowbit", None)
        and not getattr(args, "rounding", None)
    ):
        raise SystemExit(
            "nothing to run: give --sizes, --many, --gpt2, --train, --clip, --lowbit or --rounding"
        )
    if (
        args.repeats < 1
        or args.warmup < 1
        or args.sample_ms <= 0
        or args.settle_ms < 0
        or args.train_sample_ms <= 0
    ):
        raise SystemExit(
            "--repeats and --warmup must be at least 1, --sample-ms and --train-sample-ms "
            "positive, --settle-ms >= 0"
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
        train_models=args.train,
        train_cases=args.train_optimizers,
        train_sample_s=args.train_sample_ms / 1e3,
        argv=["python -m optirs", *sys.argv[1:]],
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Entry point of ``python -m optirs bench``: runs, prints the tables, writes outputs."""
    _run_all(config_from_args(args), args)
    return 0


def _run_all(config: BenchConfig, args: argparse.Namespace) -> dict[str, Any]:
    """The step-alone and training runs, then the clipping, low-bit and 16-bit rounding
    benchmarks when asked for (each added to the JSON under its own key)."""
    results: dict[str, Any] = {}
    if config.workloads or config.train_models:
        results = run(config)
    extra: dict[str, Any] = {}
    for key, run_extra in _EXTRAS.items():
        what = getattr(args, key, None)
        if what:
            extra[key] = run_extra(
                _import_torch(),
                shapes_for(what, f"--{key}"),
                config.threads,
                config.repeats,
                config.sample_s,
                config.settle_s,
                config.seed,
            )
    if extra and config.json_path is not None:
        # Added to the JSON the step-alone runs wrote, or a JSON of its own.
        path = config.json_path
        saved = json.loads(path.read_text()) if results else {}
        saved.update(extra)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(saved, indent=1))
    results.update(extra)
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parses ``bench`` options from ``argv`` (as on the command line), runs, returns results."""
    parser = argparse.ArgumentParser(prog="python -m optirs bench")
    add_arguments(parser)
    args = parser.parse_args(argv)
    config = config_from_args(args)
    config.argv = ["python -m optirs bench", *(argv if argv is not None else sys.argv[1:])]
    return _run_all(config, args)
