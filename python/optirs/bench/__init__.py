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

``--train`` adds the training-loop benchmark (``train``): time per iteration of whole training
loops (zero_grad, forward, backward, step, back to back with no idle time) of small models,
optirs.torch against torch's fused path and its CPU default, interleaved the same way. It
measures what the step costs inside a loop, where torch's OpenMP workers are still busy
from backward when the step begins.

``--clip`` adds the clipping benchmark (``clip``): torch's ``clip_grad_norm_`` + fused AdamW
against optirs's fused clip + step, and the drop-in ``clip_grad_norm_`` alone against torch's.
``--lowbit`` adds AdamW with low-bit state (``lowbit``), ``--rounding`` bfloat16 AdamW with
stochastic rounding and master weights against torch's fused step (``rounding``).

torch is imported lazily: the benchmark needs it, the package does not.

Modules, each importing only those before it: ``cases`` (what is run), ``metadata`` (machine
and versions), ``timing`` (interleaved rounds), ``report`` (tables), ``plot`` (PNG), ``train``
(the training loops), ``clip``, ``lowbit`` and ``rounding`` (the benchmarks above),
``harness`` (the step-alone runs and the whole run), ``cli`` (the ``bench`` command's options).
"""

from __future__ import annotations

from .cases import (
    APIS,
    CASES,
    DTYPES,
    TRAIN_MODELS,
    BenchConfig,
    DType,
    OptimizerCase,
    TrainModel,
    Workload,
    gpt2_small_shapes,
)
from .cli import add_arguments, config_from_args, main, run_from_args
from .harness import run

__all__ = [
    "APIS",
    "CASES",
    "DTYPES",
    "TRAIN_MODELS",
    "BenchConfig",
    "DType",
    "OptimizerCase",
    "TrainModel",
    "Workload",
    "add_arguments",
    "config_from_args",
    "gpt2_small_shapes",
    "main",
    "run",
    "run_from_args",
]
