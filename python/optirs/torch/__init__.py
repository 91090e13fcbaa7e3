"""optirs.torch: drop-in replacements for torch.optim's CPU optimizers.

``optirs.torch.SGD``, ``Adam``, ``AdamW``, ``RMSprop``, ``Adagrad``, ``Adadelta``, ``RAdam``,
``Rprop``, ``Adamax``, ``NAdam``, ``ASGD`` and ``Adafactor`` subclass the ``torch.optim`` classes of
the same name (``Lion``, which torch.optim lacks, subclasses ``torch.optim.Optimizer``), so
construction, validation, param groups, ``state_dict``/``load_state_dict``, hooks, ``zero_grad`` and
schedulers are torch's own; only ``step`` differs: one call into optirs's Rust core updates every
parameter in place, in the tensors' own storage (the first step through zero-copy NumPy views, later
ones through a plan the core re-checks each step; see ``_Plan``)::

    import torch, optirs.torch
    opt = optirs.torch.AdamW(model.parameters(), lr=1e-3)   # was torch.optim.AdamW

State keeps torch's exact format (``step`` a 0-d float32 tensor, buffers of the parameter's
dtype), so state dicts move freely between ``torch.optim.X`` and ``optirs.torch.X``.

Hyperparameters are validated by torch's constructor only, as with torch.optim: a value set
later (by a scheduler or by hand) is stepped with as torch's for-loop step would, NaN and
infinities included, and where torch's step raises (Adam's ``betas[0] = 1.0`` divides by zero;
``lr = 1e300`` does not fit a float32 tensor), optirs raises the same exception, before
changing anything.

Supported: CPU tensors of dtype float32 and float64, and float16/bfloat16 computed in float32
and stored in the parameter's dtype (as torch's fused CPU path does); dense gradients; any
dense memory layout (contiguous, transposed, channels_last) shared by a parameter, its gradient
and its state. Anything else raises a clear error before anything is modified.

Gradient clipping: every optimizer's ``clip_grad_norm_(max_norm, norm_type=2.0,
error_if_nonfinite=False)`` returns the total norm (one native pass) and has the next ``step()``
read each gradient multiplied by the clip coefficient, without writing the gradients; and
``optirs.torch.clip_grad_norm_`` is a drop-in ``torch.nn.utils.clip_grad_norm_``.
``torch.amp.GradScaler`` hands the optimizers its scale and inf flag (they set
``_step_supports_amp_scaling``, as torch's fused optimizers do): a step with an inf is
skipped, and still-scaled gradients are unscaled as the step reads them. ``Adafactor`` does
not claim it, as torch's does not: GradScaler unscales its gradients and skips for it.

DTensor parameters (FSDP2's ``fully_shard``, ``distribute_tensor``) are stepped through their
local shards in the same single call, with state kept as DTensors laid out as the parameters
(see ``_dtensor``), and ``clip_grad_norm_`` takes their full norm across the ranks.

Also here: ``step_in_backward`` (each parameter stepped as soon as its gradient is ready; see
``optirs.torch._backward``) and ``register_functional_optimizers`` (ZeRO's
``overlap_with_ddp=True``; nothing is registered with ``torch.distributed`` until it is called).

Contiguous buffers: ``flatten_parameters(model)`` moves the parameters into one flat buffer per
dtype and device, with gradients pre-assigned as views of a flat gradient buffer; the optimizers
then keep their state flat and step a few flat buffers in one native call (see ``_flat``).

Modules: ``_bridge`` (the optimizer classes and their cached step), ``_backward``,
``_clip``, ``_distributed``, ``_dtensor``. None imports this package, so there is no import cycle.
"""

from __future__ import annotations

try:
    import torch as _torch  # noqa: F401  (imported for its error: the message below)
except ImportError as _missing:
    raise ImportError(
        "optirs.torch needs PyTorch: pip install 'optirs[torch]' (for the CPU-only build, "
        "first: pip install torch --index-url https://download.pytorch.org/whl/cpu)"
    ) from _missing

from ._backward import StepInBackward, step_in_backward
from ._bridge import (
    ASGD,
    SGD,
    Adadelta,
    Adafactor,
    Adagrad,
    Adam,
    Adam8bit,
    Adamax,
    AdamW,
    AdamW8bit,
    Lion,
    NAdam,
    RAdam,
    RMSprop,
    Rprop,
)
from ._bridge import _Bridge as _Bridge  # the tests reach the shared step through here
from ._bridge import _core as _core
from ._bridge import _Plan as _Plan
from ._clip import clip_grad_norm_
from ._distributed import register_functional_optimizers
from ._flat import FlatParameters, flatten_parameters

__all__ = [
    "ASGD",
    "SGD",
    "Adadelta",
    "Adafactor",
    "Adagrad",
    "Adam",
    "Adam8bit",
    "AdamW",
    "AdamW8bit",
    "Adamax",
    "FlatParameters",
    "Lion",
    "NAdam",
    "RAdam",
    "RMSprop",
    "Rprop",
    "StepInBackward",
    "clip_grad_norm_",
    "flatten_parameters",
    "register_functional_optimizers",
    "step_in_backward",
]

# The public names are documented, pickled and shown under the module users import them from;
# pickles then keep loading if the private modules are reorganised.
for _public in __all__:
    if isinstance(globals()[_public], type):
        globals()[_public].__module__ = __name__
del _public
