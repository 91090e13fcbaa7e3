"""What the benchmark runs: the optimizer cases, dtypes, workloads and a run's configuration.

Plain data, shared by the harness, the report, the plot and the command line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._spec import ADAFACTOR, SPECS, Buffer

TORCH_PATHS: dict[str, dict[str, bool]] = {
    "for-loop": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
}
"""torch.optim keyword arguments selecting each of its CPU code paths."""


APIS: dict[str, str] = {
    "numpy": "optirs",
    "torch": "optirs.torch",
    "torch-flat": "optirs.torch flat",
}
"""optirs's APIs (``--api``) and the implementation name each is reported under; ``torch-flat``
is the torch bridge over parameters made contiguous by ``optirs.torch.flatten_parameters``."""


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


NO_TORCH_MESSAGE = "the benchmark compares against PyTorch: pip install 'optirs[bench]'"


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
    "float32": DType("float32", "f32", 4, np.float32, ("numpy", "torch", "torch-flat"), 1e-4),
    "bfloat16": DType("bfloat16", "bf16", 2, np.uint16, ("torch", "torch-flat"), 2.0**-4),
    # three more mantissa bits than bfloat16
    "float16": DType("float16", "f16", 2, np.float16, ("torch", "torch-flat"), 2.0**-7),
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

    What a step moves is derived from the optimizer's declaration (``optirs._spec``): the state
    buffers this configuration uses. A step reads the parameter, the gradient and each buffer,
    and writes the parameter and each buffer; ``arrays`` counts the distinct arrays it touches
    (gradient included), ``bytes_per_elem`` the float32 bytes per parameter element, and
    ``traffic`` spells them out.
    """

    name: str
    cls: str
    kwargs: dict[str, Any]
    has_fused: bool

    @property
    def buffers(self) -> tuple[Buffer, ...]:
        """The state buffers a step of this configuration reads and writes. Adafactor's are
        none per element: a matrix keeps one value per row and column (``variance``, one per
        element, is only for the vectors, a small share of these workloads), so its ceiling
        is the one-pass minimum (read p, g; write p), which its reductions keep it above."""
        if self.cls == ADAFACTOR.name:
            return ()
        spec = SPECS[self.cls]
        used = set(spec.required({**spec.defaults, **self.kwargs}))
        return tuple(b for b in spec.state if b.name in used)

    @property
    def arrays(self) -> int:
        """Arrays a step touches: the parameter, the gradient and each state buffer."""
        return 2 + len(self.buffers)

    @property
    def rw_streams(self) -> int:
        """Arrays a step reads and writes: the parameter and each state buffer."""
        return self.arrays - 1

    @property
    def bytes_per_elem(self) -> int:
        """float32 bytes a step reads and writes per parameter element."""
        return 4 * (self.arrays + self.rw_streams)

    @property
    def traffic(self) -> str:
        """The streams, e.g. ``"read p,g,m,v; write p,m,v"``."""
        shorts = [b.short for b in self.buffers]
        return f"read {','.join(['p', 'g', *shorts])}; write {','.join(['p', *shorts])}"

    def bytes_per_element(self, dtype: DType) -> int:
        """Bytes moved per parameter element by a step in ``dtype``."""
        return self.bytes_per_elem * dtype.itemsize // 4


CASES: dict[str, OptimizerCase] = {
    c.name: c
    for c in (
        OptimizerCase("sgd", "SGD", {"lr": 1e-3, "momentum": 0.9}, has_fused=True),
        OptimizerCase("adam", "Adam", {"lr": 1e-3}, has_fused=True),
        OptimizerCase("adamw", "AdamW", {"lr": 1e-3, "weight_decay": 1e-2}, has_fused=True),
        OptimizerCase("rmsprop", "RMSprop", {"lr": 1e-2}, has_fused=False),
        OptimizerCase(
            "rmsprop-cm",
            "RMSprop",
            {"lr": 1e-2, "momentum": 0.9, "centered": True},
            has_fused=False,
        ),
        OptimizerCase("adagrad", "Adagrad", {"lr": 1e-2}, has_fused=True),
        OptimizerCase("adadelta", "Adadelta", {"lr": 1.0}, has_fused=False),
        OptimizerCase("radam", "RAdam", {"lr": 1e-3}, has_fused=False),
        OptimizerCase("rprop", "Rprop", {"lr": 1e-2}, has_fused=False),
        OptimizerCase("adamax", "Adamax", {"lr": 2e-3}, has_fused=False),
        OptimizerCase("nadam", "NAdam", {"lr": 2e-3}, has_fused=False),
        OptimizerCase("asgd", "ASGD", {"lr": 1e-2}, has_fused=False),
        OptimizerCase("adafactor", "Adafactor", {"lr": 1e-2}, has_fused=False),
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


def shapes_for(what: str, option: str) -> tuple[tuple[int, ...], ...]:
    """The shapes a ``--clip``, ``--lowbit`` or ``--rounding`` run steps.

    Args:
        what: ``"gpt2"`` for GPT-2 small's 148 shapes, else a number of elements (one tensor).
        option: the command-line option, for the error message.
    """
    if what == "gpt2":
        return gpt2_small_shapes()
    try:
        n = int(float(what))
    except (ValueError, OverflowError):
        n = 0
    if n < 1:
        raise SystemExit(f"{option} takes 'gpt2' or a positive element count, got {what!r}")
    return ((n,),)


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


@dataclass(frozen=True)
class TrainModel:
    """A model of the training-loop benchmark: its architecture and batch, as plain data.

    ``kind`` is ``"mlp"`` (``widths``: input, hidden..., classes), ``"cnn"`` (two 3x3
    convolutions with ``widths[0]`` and ``widths[1]`` channels, each followed by ReLU and a 2x2
    max-pool, then a hidden layer of ``widths[2]`` and 10 classes, on 1x28x28 inputs) or
    ``"transformer"`` (``widths``: vocabulary, model width, heads, feed-forward width, layers,
    sequence length; a pre-norm encoder without dropout predicting a token at each position)
    or ``"deep"`` (``widths``: input, width, blocks, classes; an input layer, then blocks of
    LayerNorm, Linear and ReLU, then LayerNorm and the output layer: many small tensors, 4 per
    block, the case ``flatten_parameters`` is for).
    """

    name: str
    kind: str
    widths: tuple[int, ...]
    batch: int


TRAIN_MODELS: dict[str, TrainModel] = {
    m.name: m
    for m in (
        TrainModel("mlp-s", "mlp", (784, 512, 512, 10), 64),
        TrainModel("mlp-m", "mlp", (784, 1024, 1024, 1024, 10), 64),
        TrainModel("mlp-l", "mlp", (784, 2048, 2048, 2048, 10), 128),
        TrainModel("cnn", "cnn", (32, 64, 256), 64),
        TrainModel("transformer", "transformer", (1000, 256, 4, 1024, 2, 64), 16),
        TrainModel("deep", "deep", (32, 32, 64, 4), 32),
    )
}
"""The training-loop benchmark's models (``--train``), by name."""


TRAIN_PATHS: dict[str, dict[str, bool]] = {
    "fused": {"fused": True},
    "for-loop": {"foreach": False},
}
"""The torch.optim paths a training loop is timed against: fused, and torch's CPU default."""


DEFAULT_TRAIN_SAMPLE_MS = 250.0


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
    train_models: list[TrainModel] = field(default_factory=list)
    train_cases: list[OptimizerCase] = field(default_factory=lambda: [CASES["adamw"]])
    train_sample_s: float = DEFAULT_TRAIN_SAMPLE_MS / 1e3

    def apis_for(self, dtype: DType) -> list[str]:
        """The requested APIs that take ``dtype``; the torch bridge when none of them does."""
        return [a for a in self.apis if a in dtype.apis] or ["torch"]
