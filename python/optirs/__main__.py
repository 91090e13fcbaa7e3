"""Command line of optirs: ``python -m optirs <command> [options]``.

Commands:
  bench   time optirs against torch.optim's for-loop, foreach and fused CPU paths
  info    versions, SIMD level, threads and build details, for bug reports
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Sequence
from importlib import metadata
from typing import Any

from . import __version__, _core, get_num_threads, simd_level, simd_levels
from .bench import cli as bench_cli


def info() -> dict[str, Any]:
    """What ``python -m optirs info`` reports, as a dict."""
    build = _core.build_info()
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    packages = {}
    for name in ("numpy", "torch"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = "not installed"
    return {
        "optirs": __version__,
        "location": os.path.dirname(os.path.abspath(__file__)),
        "simd_level": simd_level(),
        "simd_levels_available": simd_levels(),
        "OPTIRS_SIMD": os.environ.get("OPTIRS_SIMD", ""),
        "threads": get_num_threads(),
        "OPTIRS_NUM_THREADS": os.environ.get("OPTIRS_NUM_THREADS", ""),
        "OPTIRS_SPIN_US": os.environ.get("OPTIRS_SPIN_US", ""),
        "cpus_available": cpus,
        "build_profile": build["profile"],
        "build_target": f"{build['target_arch']}-{build['target_os']}",
        "build_target_features": ",".join(build["compiled_target_features"]) or "none",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        **packages,
    }


def _print_info(args: argparse.Namespace) -> int:
    for key, value in info().items():
        if isinstance(value, list):
            value = ", ".join(value)
        print(f"{key + ':':<24}{value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m optirs`` argument parser, with one subparser per command."""
    # `optirs` when run as the console script, `python -m optirs` as a module.
    invoked = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    parser = argparse.ArgumentParser(
        prog="optirs" if invoked in ("optirs", "optirs.exe") else "python -m optirs",
        description="optirs command-line tools.",
    )
    parser.add_argument("--version", action="version", version=f"optirs {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    bench = commands.add_parser(
        "bench",
        help="benchmark optirs against torch.optim (for-loop, foreach, fused) on CPU",
        description=(
            "Time optimizer steps of optirs (NumPy API and/or the optirs.torch bridge) and of "
            "torch.optim's three CPU paths on the same data, in float32 and/or bfloat16, "
            "interleaved round by round with a memory-traffic ceiling (the same streams with "
            "no math); print medians, paired speed ratios, effective GB/s and % of that "
            "ceiling; write JSON and a PNG plot. Needs PyTorch (and matplotlib for the plot)."
        ),
    )
    bench_cli.add_arguments(bench)
    bench.set_defaults(func=bench_cli.run_from_args)
    info_cmd = commands.add_parser(
        "info",
        help="print versions, SIMD level, threads and build details (for bug reports)",
        description="Print what a bug report about optirs needs.",
    )
    info_cmd.set_defaults(func=_print_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status. With no command, prints help."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
