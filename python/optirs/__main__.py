"""Command line of optirs: ``python -m optirs <command> [options]``.

Commands:
  bench   time optirs against torch.optim's for-loop, foreach and fused CPU paths
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__, _bench


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m optirs`` argument parser, with one subparser per command."""
    parser = argparse.ArgumentParser(
        prog="python -m optirs",
        description="optirs command-line tools.",
    )
    parser.add_argument("--version", action="version", version=f"optirs {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    bench = commands.add_parser(
        "bench",
        help="benchmark optirs against torch.optim (for-loop, foreach, fused) on CPU",
        description=(
            "Time optimizer steps of optirs and of torch.optim's three CPU paths on the same "
            "data, interleaved round by round, and print medians, paired speed ratios and "
            "effective bandwidth. Needs PyTorch."
        ),
    )
    _bench.add_arguments(bench)
    bench.set_defaults(func=_bench.run_from_args)
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
