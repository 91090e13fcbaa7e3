"""The benchmark's PNG: effective GB/s against size, one panel per optimizer, and the training
loop's speed-ups in one more panel (matplotlib)."""

from __future__ import annotations

import math
import sys
import textwrap
from pathlib import Path
from typing import Any

from .cases import CASES, TRAIN_PATHS


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


def _train_panel(ax: Any, train: list[dict[str, Any]]) -> None:
    """Bars of optirs.torch's speed-up per iteration over each torch path, most threads."""
    threads = max(r["threads"] for r in train)
    mine = [r for r in train if r["threads"] == threads]
    labels = [f"{r['model']}\n{r['optimizer']}" for r in mine]
    width = 0.8 / len(TRAIN_PATHS)
    for k, path in enumerate(TRAIN_PATHS):
        xs = [i + (k - (len(TRAIN_PATHS) - 1) / 2) * width for i in range(len(mine))]
        ys = [r["ratios"][path]["paired_median"] if path in r["ratios"] else 0.0 for r in mine]
        ax.bar(xs, ys, width, color=PLOT_STYLE[path]["color"], label=f"vs torch {path}")
    ax.axhline(1.0, color="k", lw=1)
    ax.set_xticks(range(len(mine)), labels, fontsize=7.5)
    ax.set_ylabel("speed-up per iteration", fontsize=9)
    ax.set_title(
        f"training loop, {threads} thread{'s' if threads != 1 else ''}: "
        "torch time / optirs.torch time",
        fontsize=10,
    )
    ax.tick_params(axis="y", labelsize=8)
    ax.legend(fontsize=8, frameon=False)
    ax.grid(True, axis="y", alpha=0.35)


def write_plot(
    path: Path,
    runs: list[dict[str, Any]],
    meta: dict[str, Any],
    train: list[dict[str, Any]] | None = None,
) -> Path | None:
    """PNG of effective GB/s against size: one panel per optimizer, float32, most threads.

    Each implementation is a line; the ceiling for the same memory traffic a dashed black line.
    With training-loop results (``train``), one more panel shows optirs.torch's speed-up per
    iteration over each torch path. Returns the path written, or None (no matplotlib, or
    nothing to draw).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "note: the plot needs matplotlib, which is not installed: none written", file=sys.stderr
        )
        return None
    fig = make_figure(runs, meta, train)
    if fig is None:
        print(
            "note: the plot draws float32 single-tensor sizes and training loops; none were run",
            file=sys.stderr,
        )
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    # The layout keeps every artist inside the figure (make_figure); the tight box is a net
    # for whatever a font or backend draws wider than measured.
    fig.savefig(path, dpi=110, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)
    return path


def make_figure(
    runs: list[dict[str, Any]],
    meta: dict[str, Any],
    train: list[dict[str, Any]] | None = None,
) -> Any:
    """The figure ``write_plot`` saves (a matplotlib ``Figure``), or None when there is nothing
    to draw. Its title, panels and legend all lie inside the figure, however few panels there
    are: the legend takes as many rows as it needs, and the title is wrapped to the width.

    Args:
        runs: the benchmark's runs (``python -m optirs bench``'s JSON ``runs``).
        meta: the run's metadata (versions, CPUs, load).
        train: the training-loop results, drawn as one more panel; None for none.
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator

    sized, threads = _plot_runs(runs)
    if not sized and not train:
        return None
    names = list(dict.fromkeys(r["optimizer"] for r in sized))
    panels = len(names) + (1 if train else 0)
    cols = min(3, panels)
    nrows = math.ceil(panels / cols)
    # Constrained layout makes room for the title and the legend below the panels.
    fig, axes = plt.subplots(
        nrows,
        cols,
        figsize=(max(4.6 * cols, 7.5), 3.5 * nrows + 0.9),
        squeeze=False,
        layout="constrained",
    )
    handles: dict[str, Any] = {}
    for ax, name in zip(axes.flat, names):
        mine = sorted((r for r in sized if r["optimizer"] == name), key=lambda r: r["numel"])
        xs = [r["numel"] for r in mine]
        # Marked, so that a run of one size still shows its ceiling (a line needs two points).
        (line,) = ax.plot(
            xs,
            [r["ceiling"]["gbps"] for r in mine],
            "k--",
            marker="_",
            ms=12,
            lw=1.4,
            label="ceiling (same traffic)",
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
    if train:
        _train_panel(list(axes.flat)[len(names)], train)
    for ax in list(axes.flat)[panels:]:
        ax.axis("off")
    load = meta.get("load_average_at_start")
    title = (
        f"optirs {meta['optirs_version']} vs torch {meta['torch_version']} CPU optimizers"
        + (f", float32, {threads} thread{'s' if threads != 1 else ''}" if sized else "")
        + f" ({meta['cpus_available']} CPUs available"
        + (f", load {load[0]:.2f}" if load else "")
        + ")"
    )
    _fit_title(fig, [title, meta["cpu_model"] or ""])
    if handles:
        _fit_legend(fig, handles)
    return fig


def _fit_title(fig: Any, lines: list[str]) -> None:
    """The figure's title, each line wrapped where it would be wider than the figure."""
    suptitle = fig.suptitle("\n".join(lines), fontsize=10)
    renderer = fig.canvas.get_renderer()
    width = suptitle.get_window_extent(renderer).width
    limit = 0.95 * fig.bbox.width
    if width > limit:
        # Wrap at the share of characters that fits, measured on the widest line.
        longest = max(len(line) for line in lines)
        chars = max(20, int(longest * limit / width))
        suptitle.set_text("\n".join(textwrap.fill(line, chars) for line in lines))


def _fit_legend(fig: Any, handles: dict[str, Any]) -> None:
    """One legend below the panels, in as few rows as fit the figure's width."""
    renderer = fig.canvas.get_renderer()
    for ncol in range(min(6, len(handles)), 0, -1):
        legend = fig.legend(
            list(handles.values()),
            list(handles),
            loc="outside lower center",
            ncol=ncol,
            fontsize=8.5,
            frameon=False,
        )
        if ncol == 1 or legend.get_window_extent(renderer).width <= 0.98 * fig.bbox.width:
            return
        legend.remove()
