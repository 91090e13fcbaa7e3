"""Smoke tests of ``python -m optirs bench``: tiny sizes and few repeats, no timing assertions.

They check that the command runs end to end and that its JSON carries, for every
implementation it timed, the median time, effective GB/s and % of the memory-traffic ceiling,
the ceiling itself, and a speed-up ratio against every torch path.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import optirs
import pytest
from optirs.__main__ import main
from optirs.bench import cases, timing, train

TINY = ["--sizes", "1e4", "--repeats", "2", "--warmup", "1", "--sample-ms", "1", "--threads", "1"]


def _bench_json(tmp_path: Path, *args: str) -> dict[str, Any]:
    """Runs ``python -m optirs bench`` in-process with ``args`` and returns its JSON."""
    out = tmp_path / "bench.json"
    assert main(["bench", *TINY, *args, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def _positive(x: Any) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def _check_run(run: dict[str, Any]) -> None:
    """Every timed path has times, GB/s and % of ceiling; every API a ratio per torch path."""
    ceiling = run["ceiling"]
    assert _positive(ceiling["median_s"]) and _positive(ceiling["gbps"])
    assert len(ceiling["per_step_s"]) == 2
    assert ceiling["read_streams"] == 1
    assert ceiling["read_write_streams"] == cases.CASES[run["optimizer"]].rw_streams
    assert ceiling["variants"]
    torch_paths = [p for p in cases.TORCH_PATHS if p not in run["unavailable"]]
    expected = {cases.APIS[a] for a in run["apis"]} | set(torch_paths)
    assert set(run["impls"]) == expected
    for name, impl in run["impls"].items():
        assert _positive(impl["median_s"]), name
        assert _positive(impl["gbps"]), name
        assert _positive(impl["pct_of_ceiling"]), name
        assert len(impl["per_step_s"]) == 2
        # GB/s is the bytes of one step over its median time
        assert impl["gbps"] == pytest.approx(run["bytes_per_step"] / impl["median_s"] / 1e9)
    assert set(run["ratios"]) == set(run["apis"])
    for ratios in run["ratios"].values():
        assert set(ratios) == set(torch_paths)
        for r in ratios.values():
            assert _positive(r["paired_median"]) and _positive(r["ratio_of_medians"])
            assert len(r["paired"]) == 2


def test_bench_float32_both_apis(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "bench.png"
    data = _bench_json(
        tmp_path, "--optimizers", "adam,sgd,rmsprop", "--api", "numpy,torch", "--plot", str(png)
    )
    runs = data["runs"]
    assert [(r["optimizer"], r["dtype"], r["threads"]) for r in runs] == [
        ("adam", "float32", 1),
        ("sgd", "float32", 1),
        ("rmsprop", "float32", 1),
    ]
    for run in runs:
        assert run["apis"] == ["numpy", "torch"]
        assert run["bytes_per_elem"] == cases.CASES[run["optimizer"]].bytes_per_elem
        assert run["bytes_per_step"] == run["bytes_per_elem"] * 10_000
        _check_run(run)
        # both APIs drive the same core: the same bits after the same steps
        assert run["max_abs_diff"]["optirs.torch"] == 0.0
    assert "fused" in runs[0]["impls"] and "fused" in runs[2]["unavailable"]
    meta = data["meta"]
    assert meta["cpus_available"] >= 1 and meta["threads"] == [1]
    assert meta["optirs_version"] == optirs.__version__
    out = capsys.readouterr().out
    assert "optirs.torch" in out and "ceiling" in out and "load average" in out
    if meta["matplotlib_version"] is None:
        assert meta["plot"] is None
    else:
        assert meta["plot"] == str(png)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_bench_16_bit_runs_use_the_torch_bridge(tmp_path: Path, dtype: str) -> None:
    data = _bench_json(
        tmp_path,
        "--optimizers",
        "adam,sgd",
        "--dtype",
        dtype,
        "--api",
        "torch",
        "--plot",
        "none",
    )
    assert data["meta"]["dtypes"] == [dtype]
    for run in data["runs"]:
        assert run["dtype"] == dtype and run["apis"] == ["torch"]
        assert run["bytes_per_elem"] == cases.CASES[run["optimizer"]].bytes_per_elem // 2
        assert "optirs" not in run["impls"]
        assert {"optirs.torch", "for-loop", "foreach", "fused"} <= set(run["impls"])
        _check_run(run)


def test_bench_many_tensors_ceiling_variants(tmp_path: Path) -> None:
    """Several tensors: the ceiling is the faster of one probe call per tensor and one flat."""
    data = _bench_json(tmp_path, "--sizes", "none", "--many", "--optimizers", "sgd")
    (run,) = data["runs"]
    assert run["tensors"] == 1000 and run["numel"] == 10**6
    _check_run(run)
    variants = run["ceiling"]["variants"]
    assert set(variants) == {"ceiling:tensors", "ceiling:flat"}
    fastest = min(v["median_s"] for v in variants.values())
    assert run["ceiling"]["median_s"] <= fastest * (1 + 1e-9)


def test_bench_options_are_validated() -> None:
    with pytest.raises(SystemExit):
        main(["bench", "--dtype", "int8"])
    with pytest.raises(SystemExit):
        main(["bench", "--api", "jax"])
    with pytest.raises(SystemExit):
        main(["bench", "--sizes", "none"])


def test_each_timed_sample_starts_after_the_settle_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every sample of every implementation is preceded by one idle pause of --settle-ms."""
    pauses: list[float] = []
    events: list[str] = []
    monkeypatch.setattr(timing.time, "sleep", lambda s: (pauses.append(s), events.append("idle")))

    def step(name: str):
        return lambda: events.append(name)

    times = timing._interleaved({"a": step("a"), "b": step("b")}, {"a": 1, "b": 2}, 3, 0.02)
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    assert pauses == [0.02] * 6
    # idle, then the sample's steps: never two implementations' steps back to back
    assert events[:5] == ["idle", "a", "idle", "b", "b"]
    for before, after in zip(events, events[1:]):
        assert not ({before, after} == {"a", "b"}), events
    pauses.clear()
    timing._interleaved({"a": step("a")}, {"a": 1}, 2, 0.0)
    assert pauses == []


def test_settle_option_is_recorded_and_validated(tmp_path: Path) -> None:
    data = _bench_json(tmp_path, "--settle-ms", "5", "--optimizers", "sgd", "--plot", "none")
    assert data["meta"]["settle_s"] == pytest.approx(0.005)
    with pytest.raises(SystemExit):
        main(["bench", *TINY, "--settle-ms", "-1"])


def test_bytes_per_element_follow_the_declared_state() -> None:
    """A step's traffic comes from the buffers each configuration uses (optirs._spec): read the
    parameter, the gradient and each buffer, write the parameter and each buffer."""
    assert {n: (c.bytes_per_elem, c.traffic) for n, c in cases.CASES.items()} == {
        "sgd": (20, "read p,g,buf; write p,buf"),
        "adam": (28, "read p,g,m,v; write p,m,v"),
        "adamw": (28, "read p,g,m,v; write p,m,v"),
        "rmsprop": (20, "read p,g,sq; write p,sq"),
        "rmsprop-cm": (36, "read p,g,sq,buf,ga; write p,sq,buf,ga"),
        "adagrad": (20, "read p,g,sum; write p,sum"),
        "adadelta": (28, "read p,g,sq,acc; write p,sq,acc"),
        "radam": (28, "read p,g,m,v; write p,m,v"),
        "rprop": (28, "read p,g,prev,ss; write p,prev,ss"),
        "adamax": (28, "read p,g,m,u; write p,m,u"),
        "nadam": (28, "read p,g,m,v; write p,m,v"),
        "asgd": (20, "read p,g,ax; write p,ax"),
        # The one-pass minimum: its factored state is per row and column, not per element.
        "adafactor": (12, "read p,g; write p"),
    }
    assert cases.CASES["rmsprop-cm"].arrays == 5


def test_bench_training_loops(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--train times whole iterations of each model with optirs.torch and torch's paths."""
    png = tmp_path / "bench.png"
    out = tmp_path / "bench.json"
    argv = ["bench", "--sizes", "none", "--train", "mlp-s,cnn,transformer"]
    argv += ["--train-optimizers", "adamw,rmsprop", "--repeats", "2", "--warmup", "1"]
    argv += ["--train-sample-ms", "1", "--threads", "1", "--json", str(out), "--plot", str(png)]
    assert main(argv) == 0
    data = json.loads(out.read_text())
    assert data["runs"] == []
    runs = data["train"]
    assert [(r["model"], r["optimizer"], r["threads"]) for r in runs] == [
        (m, o, 1) for m in ("mlp-s", "cnn", "transformer") for o in ("adamw", "rmsprop")
    ]
    for run in runs:
        has_fused = cases.CASES[run["optimizer"]].has_fused
        paths = ["fused", "for-loop"] if has_fused else ["for-loop"]
        assert set(run["impls"]) == {"optirs.torch", *paths}
        assert set(run["ratios"]) == set(paths)
        assert ("fused" in run["unavailable"]) == (not has_fused)
        for name, impl in run["impls"].items():
            assert len(impl["per_iter_s"]) == len(impl["step_s"]) == 2
            assert _positive(impl["median_s"]) and _positive(impl["step_median_s"])
            # the step is part of the iteration, in every sample
            assert all(s < t for s, t in zip(impl["step_s"], impl["per_iter_s"])), name
        for r in run["ratios"].values():
            assert _positive(r["paired_median"]) and len(r["paired"]) == 2
        # same weights, same batches, one warm-up iteration: optirs.torch trains as torch does
        assert run["max_abs_diff_from_for_loop"]["optirs.torch"] <= train.AGREEMENT_TOL
        model = train.build_model(pytest.importorskip("torch"), cases.TRAIN_MODELS[run["model"]])
        assert run["params"] == sum(p.numel() for p in model.parameters())
    assert data["meta"]["train_models"] == ["mlp-s", "cnn", "transformer"]
    text = capsys.readouterr().out
    assert "Training loop" in text and "transformer" in text
    if data["meta"]["matplotlib_version"] is not None:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_models_have_their_advertised_sizes() -> None:
    torch = pytest.importorskip("torch")
    sizes = {
        name: sum(p.numel() for p in train.build_model(torch, m).parameters())
        for name, m in cases.TRAIN_MODELS.items()
    }
    # 784-512-512-10: weights and biases of three layers
    assert sizes["mlp-s"] == 784 * 512 + 512 + 512 * 512 + 512 + 512 * 10 + 10
    assert 2.8e6 < sizes["mlp-m"] < 3.0e6 and 9.9e6 < sizes["mlp-l"] < 10.1e6
    assert 0.4e6 < sizes["cnn"] < 0.5e6 and 2.0e6 < sizes["transformer"] < 2.2e6
    # 32-32, 64 blocks of LayerNorm(32) and 32-32, LayerNorm(32), 32-4
    assert sizes["deep"] == 32 * 32 + 32 + 64 * (2 * 32 + 32 * 32 + 32) + 2 * 32 + 32 * 4 + 4
    for name, m in cases.TRAIN_MODELS.items():
        x, y = train.make_batches(torch, m, 0)[0]
        logits = train.build_model(torch, m)(x)
        assert logits.shape[0] == y.shape[0], name


def test_train_options_are_validated() -> None:
    with pytest.raises(SystemExit):
        main(["bench", "--sizes", "none", "--train", "resnet"])
    with pytest.raises(SystemExit):
        main(["bench", "--sizes", "none", "--train", "--train-sample-ms", "0"])
    with pytest.raises(SystemExit):
        main(["bench", "--sizes", "none", "--train", "--train-optimizers", "lbfgs"])


def test_traffic_ceiling_streams_the_bytes_asked_for() -> None:
    """Whole units stream exactly the bytes asked for (factor 1); a remainder under a unit
    (8-bit absmaxes) is added by the factor, not streamed."""
    from optirs.bench.timing import traffic_ceiling

    for read, rw, factor in [
        (8000, 12000, 1.0),  # clipped step: 2 read streams, 3 read-write
        (4000, 4000, 1.0),  # clip alone
        (4000, 6000, 1.0),  # 8-bit-like: half-gradient units
        (4000, 6250, (4000 + 2 * 6250) / (2000 * (2 + 2 * 3))),
    ]:
        probe, got = traffic_ceiling({"read": read, "rw": rw})
        probe()
        assert got == pytest.approx(factor)


def test_bench_clipping(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--clip N``: the clipped step and the clip alone, optirs against torch, in the JSON."""
    out = tmp_path / "bench.json"
    args = ["--sizes", "none", "--clip", "5e4", "--repeats", "2", "--sample-ms", "1"]
    assert main(["bench", *args, "--threads", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["clip"]
    assert [r["what"] for r in rows] == ["clipped step", "clip alone"]
    for r in rows:
        assert r["elements"] == 50_000 and r["threads"] == 1
        assert _positive(r["torch_ms"]) and _positive(r["optirs_ms"]) and _positive(r["speedup"])
        assert len(r["times_s"]["torch"]) == len(r["times_s"]["optirs"]) == 2
        assert len(r["times_s"]["ceiling"]) == 2
        assert _positive(r["pct_of_ceiling"]) and _positive(r["bound"])
    # optirs's bytes: the norm's read, then the step's (4 read, 12 read and written) or the
    # scaling's (4 read and written)
    assert [r["bytes_per_elem"] for r in rows] == [32, 12]
    assert "clipped step" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--clip takes"):
        main(["bench", "--sizes", "none", "--clip", "0"])


def test_bench_many_tensors_flat_api(tmp_path: Path) -> None:
    """--api torch-flat steps the many-tensor workload through flatten_parameters."""
    data = _bench_json(
        tmp_path, "--sizes", "none", "--many", "--optimizers", "adam", "--api", "torch,torch-flat"
    )
    (run,) = data["runs"]
    assert run["apis"] == ["torch", "torch-flat"]
    assert {"optirs.torch", "optirs.torch flat", "fused"} <= set(run["impls"])
    _check_run(run)


def test_bench_training_loop_flat(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--api torch-flat adds a flat optirs.torch loop to --train, with its own speed-ups."""
    out = tmp_path / "bench.json"
    argv = ["bench", "--sizes", "none", "--train", "deep", "--api", "torch-flat"]
    argv += ["--repeats", "2", "--warmup", "1", "--train-sample-ms", "1", "--threads", "1"]
    argv += ["--json", str(out), "--plot", "none"]
    assert main(argv) == 0
    (run,) = json.loads(out.read_text())["train"]
    assert set(run["impls"]) == {"optirs.torch", "optirs.torch flat", "fused", "for-loop"}
    assert set(run["flat_ratios"]) == {"fused", "for-loop"} and run["tensors"] == 262
    # trained flat from the same weights on the same batches: the same bits as unflat
    diffs = run["max_abs_diff_from_for_loop"]
    assert diffs["optirs.torch flat"] == diffs["optirs.torch"] <= train.AGREEMENT_TOL
    text = capsys.readouterr().out
    assert "torch-flat" in text and "deep" in text


def test_bench_lowbit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--lowbit N``: AdamW with float32, bfloat16 and 8-bit state against torch's fused
    AdamW, each with its bytes and ceiling, and the 8-bit round-trip report, in the JSON."""
    from optirs.bench.lowbit import bytes_per_step

    out = tmp_path / "bench.json"
    args = ["--sizes", "none", "--lowbit", "5e4", "--repeats", "2", "--sample-ms", "1"]
    assert main(["bench", *args, "--threads", "1", "--json", str(out)]) == 0
    saved = json.loads(out.read_text())["lowbit"]
    rows = {r["what"]: r for r in saved["steps"]}
    assert {"torch fused", "optirs f32", "optirs bf16", "optirs 8bit"} <= rows.keys()
    # 28 bytes an element at float32, 20 with bfloat16 state, 16 + two absmaxes a block at 8 bits.
    assert rows["torch fused"]["bytes_per_elem"] == rows["optirs f32"]["bytes_per_elem"] == 28
    assert rows["optirs bf16"]["bytes_per_elem"] == 20
    assert rows["optirs 8bit"]["bytes_per_elem"] == pytest.approx(16 + 16 / 256, rel=1e-3)
    assert rows["optirs 8bit"]["state_bytes_per_elem"] <= 2.1
    assert rows["optirs bf16"]["state_bytes_per_elem"] <= 4.1
    for r in rows.values():
        assert r["elements"] == 50_000 and r["threads"] == 1
        assert _positive(r["ms"]) and _positive(r["speedup_vs_fused"])
        assert _positive(r["pct_of_ceiling"]) and len(r["times_s"]) == 2
    quant = saved["quantization"]
    ours = [q for q in quant if q["impl"] == "optirs"]
    assert len(ours) == 2
    # Nearest of 256 codes: within half the widest gap between neighbouring codes (1/128 of
    # the absmax at the signed map's ends), on average far less.
    for q in ours:
        assert 0 < q["mean_rel_err"] < q["max_rel_err"] <= 1 / 128
    assert "8-bit round trip" in capsys.readouterr().out
    # Small tensors keep float32 state in the 8-bit optimizer, and count as such.
    assert bytes_per_step("8bit", [100]) == bytes_per_step("f32", [100])
    with pytest.raises(SystemExit, match="--lowbit takes"):
        main(["bench", "--sizes", "none", "--lowbit", "0"])


def test_bench_rounding(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--rounding N``: bfloat16 AdamW, torch's fused against optirs rounding to nearest,
    stochastically and from a float32 master copy, each with its bytes and ceiling, in the
    JSON and the printed table."""
    out = tmp_path / "bench.json"
    args = ["--sizes", "none", "--rounding", "5e4", "--repeats", "1", "--sample-ms", "1"]
    assert main(["bench", *args, "--threads", "1", "--json", str(out)]) == 0
    rows = {r["what"]: r for r in json.loads(out.read_text())["rounding"]["steps"]}
    assert rows.keys() == {
        "torch fused",
        "optirs nearest",
        "optirs stochastic",
        "optirs master",
    }
    # 14 bytes an element (2-byte parameter, moments and gradient); a master copy adds 8.
    for name in ("torch fused", "optirs nearest", "optirs stochastic"):
        assert rows[name]["bytes_per_elem"] == 14
    assert rows["optirs master"]["bytes_per_elem"] == 22
    for r in rows.values():
        assert r["elements"] == 50_000 and r["threads"] == 1
        assert _positive(r["ms"]) and _positive(r["speedup_vs_fused"])
        assert _positive(r["pct_of_ceiling"]) and len(r["times_s"]) == 1
    text = capsys.readouterr().out
    assert "16-bit parameters" in text and "optirs stochastic" in text
    for bad in ("0", "many"):
        with pytest.raises(SystemExit, match="--rounding takes"):
            main(["bench", "--sizes", "none", "--rounding", bad])
