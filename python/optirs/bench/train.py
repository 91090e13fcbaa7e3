"""The training-loop benchmark (``--train``): time per iteration of a whole training loop.

The step-alone tables time ``step()`` after an idle pause, which is what the step costs on
CPUs nobody else is using. A training loop is different: ``zero_grad()``, forward, backward
and ``step()`` follow each other with no pause, and torch's OpenMP workers are still spinning
from backward when the step begins. This module times what a user gets: for each model, one
copy per implementation (the same initial weights and the same batches), each trained by
``optirs.torch.X``, ``torch.optim.X(fused=True)`` and torch's CPU default (the for-loop),
interleaved round by round in one process with no idle time between them. It reports the
median time per iteration, the median time of ``step()`` inside the loop, and the speed-up
of optirs (median over rounds of torch's time / optirs's time in the same round).
"""

from __future__ import annotations

import copy
import gc
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .cases import APIS, TRAIN_PATHS, BenchConfig, OptimizerCase, TrainModel
from .report import Progress
from .timing import _calibrate, _rotations, _set_threads

OPTIRS = APIS["torch"]
"""The name optirs.torch's runs are reported under."""

FLAT = APIS["torch-flat"]
"""The name of optirs.torch's runs over ``flatten_parameters`` (``--api`` with torch-flat)."""

BATCHES = 4
"""Distinct batches each loop cycles through (the same sequence for every implementation)."""

AGREEMENT_TOL = 1e-4
"""Largest parameter difference from torch's for-loop after the warm-up not warned about."""


def build_model(torch: Any, spec: TrainModel) -> Any:
    """A freshly initialised ``torch.nn.Module`` for ``spec`` (torch's default init)."""
    nn = torch.nn
    w = spec.widths
    if spec.kind == "mlp":
        layers: list[Any] = []
        for a, b in zip(w[:-2], w[1:-1]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        return nn.Sequential(*layers, nn.Linear(w[-2], w[-1]))
    if spec.kind == "cnn":
        c1, c2, hidden = w
        side = ((28 - 2) // 2 - 2) // 2  # two valid 3x3 convolutions, each then a 2x2 pool
        return nn.Sequential(
            nn.Conv2d(1, c1, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(c2 * side * side, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 10),
        )
    if spec.kind == "transformer":
        return _tiny_lm(torch, *w)
    if spec.kind == "deep":
        inputs, width, blocks, classes = w
        layers = [nn.Linear(inputs, width)]
        for _ in range(blocks):
            layers += [nn.LayerNorm(width), nn.Linear(width, width), nn.ReLU()]
        return nn.Sequential(*layers, nn.LayerNorm(width), nn.Linear(width, classes))
    raise ValueError(f"unknown model kind {spec.kind!r}")


def _tiny_lm(torch: Any, vocab: int, d: int, heads: int, ff: int, layers: int, seq: int) -> Any:
    """A small causal language model: embeddings, a pre-norm encoder stack, a linear head."""
    nn = torch.nn

    class TinyLM(nn.Module):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocab, d)
            self.pos = nn.Parameter(0.02 * torch.randn(seq, d))
            layer = nn.TransformerEncoderLayer(
                d, heads, ff, dropout=0.0, batch_first=True, norm_first=True
            )
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(d)
            self.head = nn.Linear(d, vocab)
            self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq))

        def forward(self, tokens: Any) -> Any:
            h = self.embed(tokens) + self.pos
            h = self.encoder(h, mask=self.mask, is_causal=True)
            return self.head(self.norm(h)).flatten(0, 1)

    return TinyLM()


def make_batches(torch: Any, spec: TrainModel, seed: int) -> list[tuple[Any, Any]]:
    """``BATCHES`` random (input, target) pairs for ``spec``, from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(BATCHES):
        if spec.kind in ("mlp", "deep"):
            x = torch.randn(spec.batch, spec.widths[0], generator=gen)
            y = torch.randint(spec.widths[-1], (spec.batch,), generator=gen)
        elif spec.kind == "cnn":
            x = torch.randn(spec.batch, 1, 28, 28, generator=gen)
            y = torch.randint(10, (spec.batch,), generator=gen)
        else:
            vocab, seq = spec.widths[0], spec.widths[-1]
            x = torch.randint(vocab, (spec.batch, seq), generator=gen)
            y = torch.randint(vocab, (spec.batch * seq,), generator=gen)
        out.append((x, y))
    return out


@dataclass
class _Loop:
    """One implementation's training loop: its model, optimizer and batches.

    Calling it runs one iteration (``zero_grad``, forward, cross-entropy, backward, ``step``)
    and adds the time spent in ``step()`` to ``step_s``.
    """

    model: Any
    opt: Any
    batches: list[tuple[Any, Any]]
    loss: Callable[[Any, Any], Any]
    i: int = 0
    step_s: float = 0.0

    def __call__(self) -> None:
        x, y = self.batches[self.i % len(self.batches)]
        self.i += 1
        self.opt.zero_grad()
        self.loss(self.model(x), y).backward()
        t0 = time.perf_counter()
        self.opt.step()
        self.step_s += time.perf_counter() - t0


@dataclass
class _Samples:
    """Per-iteration and per-step seconds of one implementation, one value per round."""

    iters: int
    per_iter_s: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)


def _build_loops(
    torch: Any, spec: TrainModel, case: OptimizerCase, seed: int, flat: bool = False
) -> tuple[dict[str, _Loop], dict[str, str]]:
    """optirs.torch (and, with ``flat``, optirs.torch over ``flatten_parameters``) and each
    torch path on copies of one initialised model."""
    import optirs.torch as bridge

    torch.manual_seed(seed)
    base = build_model(torch, spec)
    batches = make_batches(torch, spec, seed)
    loss = torch.nn.functional.cross_entropy
    loops: dict[str, _Loop] = {}
    missing: dict[str, str] = {}
    model = copy.deepcopy(base)
    loops[OPTIRS] = _Loop(
        model, getattr(bridge, case.cls)(model.parameters(), **case.kwargs), batches, loss
    )
    if flat:
        model = copy.deepcopy(base)
        bridge.flatten_parameters(model)
        loops[FLAT] = _Loop(
            model, getattr(bridge, case.cls)(model.parameters(), **case.kwargs), batches, loss
        )
    for path, path_kwargs in TRAIN_PATHS.items():
        if path == "fused" and not case.has_fused:
            missing[path] = f"torch.optim.{case.cls} has no fused kernel"
            continue
        model = copy.deepcopy(base)
        opt = getattr(torch.optim, case.cls)(model.parameters(), **case.kwargs, **path_kwargs)
        loops[path] = _Loop(model, opt, batches, loss)
    return loops, missing


def _max_abs_diff(a: Any, b: Any) -> float:
    """Largest absolute difference between two models' parameters."""
    return max(
        float((p.detach() - q.detach()).abs().max()) if p.numel() else 0.0
        for p, q in zip(a.parameters(), b.parameters())
    )


def _time_rounds(
    loops: dict[str, _Loop], iters: dict[str, int], repeats: int
) -> dict[str, _Samples]:
    """Rounds of ``iters[name]`` back-to-back iterations of each loop, the order rotating."""
    samples = {n: _Samples(iters[n]) for n in loops}
    for name in _rotations(list(loops), repeats):
        loop, k = loops[name], iters[name]
        loop.step_s = 0.0
        t0 = time.perf_counter()
        for _ in range(k):
            loop()
        elapsed = time.perf_counter() - t0
        samples[name].per_iter_s.append(elapsed / k)
        samples[name].step_s.append(loop.step_s / k)
    return samples


def _summarize(
    spec: TrainModel,
    case: OptimizerCase,
    threads: int,
    params: int,
    samples: dict[str, _Samples],
) -> dict[str, Any]:
    """Medians and paired ratios of one (model, optimizer, threads) run, with raw timings."""
    impls = {
        name: {
            "iters_per_sample": s.iters,
            "per_iter_s": s.per_iter_s,
            "median_s": statistics.median(s.per_iter_s),
            "step_s": s.step_s,
            "step_median_s": statistics.median(s.step_s),
        }
        for name, s in samples.items()
    }
    ratios = {}
    flat_ratios = {}
    for path in TRAIN_PATHS:
        if path in samples:
            paired = [t / o for t, o in zip(samples[path].per_iter_s, samples[OPTIRS].per_iter_s)]
            ratios[path] = {"paired_median": statistics.median(paired), "paired": paired}
            if FLAT in samples:
                paired = [t / o for t, o in zip(samples[path].per_iter_s, samples[FLAT].per_iter_s)]
                flat_ratios[path] = {"paired_median": statistics.median(paired), "paired": paired}
    return {
        "model": spec.name,
        "kind": spec.kind,
        "widths": list(spec.widths),
        "batch": spec.batch,
        "params": params,
        "optimizer": case.name,
        "torch_class": case.cls,
        "kwargs": case.kwargs,
        "threads": threads,
        "impls": impls,
        "ratios": ratios,
        # Speed-ups of optirs.torch over flatten_parameters (present with --api torch-flat).
        **({"flat_ratios": flat_ratios} if FLAT in samples else {}),
    }


def run_train(torch: Any, config: BenchConfig, progress: Progress) -> list[dict[str, Any]]:
    """Times every training-loop model and optimizer of ``config`` at each thread count."""
    runs: list[dict[str, Any]] = []
    for spec in config.train_models:
        for case in config.train_cases:
            loops, missing = _build_loops(
                torch, spec, case, config.seed, flat="torch-flat" in config.apis
            )
            params = sum(p.numel() for p in loops[OPTIRS].model.parameters())
            tensors = len(list(loops[OPTIRS].model.parameters()))
            diffs: dict[str, float] = {}
            for i, threads in enumerate(config.threads):
                _set_threads(torch, threads)
                progress.show(f"train {spec.name} {case.name} t={threads}")
                for loop in loops.values():
                    for _ in range(config.warmup):
                        loop()
                if i == 0:  # every loop has taken the same iterations on the same batches
                    ref = loops.get("for-loop", loops[OPTIRS]).model
                    for name, loop in loops.items():
                        diffs[name] = _max_abs_diff(loop.model, ref)
                        if diffs[name] > AGREEMENT_TOL:
                            print(
                                f"\nwarning: train {spec.name} {case.name}: {name} differs from "
                                f"torch's for-loop by up to {diffs[name]:.3g} after the warm-up",
                                file=sys.stderr,
                            )
                iters = {n: _calibrate(loop, config.train_sample_s) for n, loop in loops.items()}
                samples = _time_rounds(loops, iters, config.repeats)
                result = _summarize(spec, case, threads, params, samples)
                result["tensors"] = tensors
                result["max_abs_diff_from_for_loop"] = diffs
                result["unavailable"] = missing
                runs.append(result)
                progress.advance()
            del loops
            gc.collect()
    return runs
