"""The benchmark's text output: progress bar, header and the two result tables."""

from __future__ import annotations

import math
import sys
import textwrap
import time
from typing import Any

from .cases import APIS, DTYPES, IMPLS, TORCH_PATHS, TRAIN_PATHS, OptimizerCase


class Progress:
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


def print_header(meta: dict[str, Any]) -> None:
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
    if meta.get("train_models"):
        print(
            f"training loop: samples of ~{meta['train_sample_s'] * 1e3:g} ms per implementation, "
            "no idle time"
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


def print_tables(runs: list[dict[str, Any]], cases: list[OptimizerCase]) -> None:
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


def _fmt_params(n: int) -> str:
    """``669706 -> '0.67M'``."""
    return f"{n / 1e6:.2f}M" if n < 1e7 else f"{n / 1e6:.1f}M"


def _train_table(runs: list[dict[str, Any]]) -> str:
    """Time per iteration, speed-ups and step time in the loop, one line per run."""
    paths = list(TRAIN_PATHS)
    head = ["model", "params", "tensors", "batch", "optimizer", "api", "thr", "optirs ms"]
    head += [f"{p} ms" for p in paths] + [f"x {p}" for p in paths]
    head += ["step: optirs ms"] + [f"{p} ms" for p in paths]
    rows = [head]
    for r in runs:
        impls = r["impls"]
        variants = [("torch", APIS["torch"], r["ratios"])]
        if APIS["torch-flat"] in impls:
            variants.append(("torch-flat", APIS["torch-flat"], r.get("flat_ratios", {})))
        for api, optirs_name, ratios in variants:
            row = [r["model"], _fmt_params(r["params"]), str(r.get("tensors", "-"))]
            row += [str(r["batch"]), r["optimizer"], api]
            row += [str(r["threads"]), _fmt_ms(impls[optirs_name]["median_s"])]
            row += [_fmt_ms(impls[p]["median_s"] if p in impls else None) for p in paths]
            row += [_fmt_ratio(ratios[p]["paired_median"] if p in ratios else None) for p in paths]
            row += [_fmt_ms(impls[optirs_name]["step_median_s"])]
            row += [_fmt_ms(impls[p]["step_median_s"] if p in impls else None) for p in paths]
            rows.append(row)
    return _render(rows, 6)


def print_train_table(runs: list[dict[str, Any]]) -> None:
    """Prints the training-loop table and explains its columns."""
    print("Training loop: time per iteration (median, ms), speed-up of optirs.torch (median over")
    print("rounds of torch / optirs), and the time of step() inside the loop (median, ms)")
    print()
    print(_train_table(runs))
    notes = [
        "",
        "An iteration is zero_grad(), forward, cross-entropy, backward and step() on one batch,",
        "  back to back with no idle time: torch's OpenMP workers may still be spinning from",
        "  backward when step() begins, as in users' loops. Each implementation trains its own",
        "  copy of the model from the same weights on the same batches; the implementations",
        "  take turns, a sample of iterations each, in an order rotated every round.",
        "for-loop is torch.optim's CPU default (foreach and fused unset).",
        "api torch-flat: optirs.torch.X over parameters made contiguous by",
        "  optirs.torch.flatten_parameters (one flat parameter, gradient and state buffer per",
        "  dtype; step() one native call over them).",
    ]
    print("\n".join(notes))
