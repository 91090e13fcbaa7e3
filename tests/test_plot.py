"""The benchmark's PNG keeps everything inside its canvas: title, panels, labels and legend,
with one optimizer (the narrowest figure) as with many, and a long processor name."""

from __future__ import annotations

from typing import Any

import pytest
from optirs.bench import plot
from optirs.bench.cases import CASES

META = {
    "optirs_version": "0.1.0",
    "torch_version": "2.15.0+cu132",
    "cpus_available": 2,
    "load_average_at_start": [3.78, 2.8, 1.7],
    "cpu_model": "Intel(R) Xeon(R) Platinum 8488C CPU @ 2.40GHz, a long model name " * 2,
}


def _runs(optimizers: list[str], sizes: list[int]) -> list[dict[str, Any]]:
    """Runs as the benchmark's JSON has them, with every implementation the plot draws."""
    impls = ("optirs", "optirs.torch", "for-loop", "foreach", "fused")
    return [
        {
            "kind": "size",
            "dtype": "float32",
            "threads": 2,
            "optimizer": name,
            "numel": n,
            "ceiling": {"gbps": 50.0},
            "impls": {impl: {"gbps": 10.0 + k} for k, impl in enumerate(impls)},
        }
        for name in optimizers
        for n in sizes
    ]


@pytest.mark.parametrize(
    ("optimizers", "sizes"),
    [(["adam"], [10_000]), (["adam", "sgd"], [10_000, 1_000_000]), (list(CASES)[:4], [10_000])],
    ids=["one optimizer, one size", "two", "four"],
)
def test_every_artist_lies_inside_the_figure(optimizers: list[str], sizes: list[int]):
    import matplotlib.pyplot as plt

    fig = plot.make_figure(_runs(optimizers, sizes), META)
    try:
        fig.canvas.draw()
        drawn = fig.get_tightbbox(fig.canvas.get_renderer())  # in inches
        canvas = fig.bbox_inches
        tolerance = 0.02
        assert drawn.x0 >= canvas.x0 - tolerance and drawn.y0 >= canvas.y0 - tolerance, drawn
        assert drawn.x1 <= canvas.x1 + tolerance and drawn.y1 <= canvas.y1 + tolerance, drawn
        # Every implementation, and the ceiling, is in the legend.
        (legend,) = fig.legends
        labels = {t.get_text() for t in legend.get_texts()}
        assert {"ceiling (same traffic)", "optirs (numpy)", "optirs.torch"} <= labels
        assert {"torch for-loop", "torch foreach", "torch fused"} <= labels
    finally:
        plt.close(fig)


def test_write_plot_writes_a_png(tmp_path):
    path = plot.write_plot(tmp_path / "x.png", _runs(["adam"], [10_000]), META)
    assert path is not None
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
