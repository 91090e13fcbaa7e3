"""Gradient clipping in optirs's core: the drop-in ``clip_grad_norm_`` and the norm that an
optimizer's own ``clip_grad_norm_`` hands to its next step.

The total norm is torch's ``get_total_norm`` (each gradient's norm in its dtype, then the norm
of those in their promoted dtype), computed in one native, parallel pass that accumulates in
float64 (at least as accurate as torch's float32 accumulation, so equal to within torch's
tolerances) and gives the same bits at every thread count and SIMD level.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Iterable
from typing import Any

import torch

from .. import _core
from . import _dtensor

__all__ = ["clip_grad_norm_"]

_DTYPES = {
    torch.float32: "float32",
    torch.float64: "float64",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}
_BY_NAME = {name: dtype for dtype, name in _DTYPES.items()}


def _flat_view(g: torch.Tensor) -> Any:
    """A NumPy view over the memory of a dense CPU tensor (bfloat16 as its uint16 bits), or
    None when the core cannot read it (another device, sparse, gaps in memory, conjugated)."""
    if (
        g.device.type != "cpu"
        or g.layout != torch.strided
        or g.dtype not in _DTYPES
        or g.is_conj()
        or g.is_neg()
    ):
        return None
    g = g.detach()
    if not g.is_contiguous():
        expected = 1
        for stride, size in sorted((st, sz) for st, sz in zip(g.stride(), g.shape) if sz != 1):
            if stride != expected:
                return None
            expected *= size
        # A norm and a scaling do not depend on the order of the elements: memory order.
        g = torch.as_strided(g, (g.numel(),), (1,))
    if g.dtype == torch.bfloat16:
        g = g.view(torch.uint16)
    return g.numpy()


def _nonfinite_error(norm_type: float) -> RuntimeError:
    # torch's message, word for word.
    return RuntimeError(
        f"The total norm of order {norm_type} for gradients from "
        "`parameters` is non-finite, so it cannot be clipped. To disable "
        "this error and scale the gradients by the non-finite norm anyway, "
        "set `error_if_nonfinite=False`"
    )


def total_norm(
    grads: list[torch.Tensor],
    max_norm: float,
    norm_type: float,
    error_if_nonfinite: bool,
    views: list[Any] | None = None,
) -> tuple[torch.Tensor, float]:
    """The total norm of ``grads`` as a 0-d tensor of their promoted dtype, and the clip
    coefficient ``min(max_norm / (norm + 1e-6), 1)`` computed in that dtype (NaN kept).

    ``views``: the gradients' NumPy views where the caller has made them already.

    With DTensor gradients the norm is the full tensors' (``_dtensor.reduce_norm``: local
    norms combined across the ranks), returned as a replicated DTensor, as torch's is.
    """
    norm_type = float(norm_type)
    max_norm = float(max_norm)
    if _dtensor.any_dtensor(grads):
        return _distributed_total_norm(grads, max_norm, norm_type, error_if_nonfinite)
    if views is None:
        views = [_flat_view(g) for g in grads]
        if any(v is None for v in views):
            raise ValueError(
                "optirs computes the norm of dense CPU float32, float64, float16 and bfloat16 "
                "gradients only"
            )
    norm, dtype, coef = _core.grad_norm(views, norm_type, max_norm, bf16_bits=True)
    total = torch.tensor(norm, dtype=_BY_NAME[dtype])
    if error_if_nonfinite and not torch.isfinite(total):
        raise _nonfinite_error(norm_type)
    assert coef is not None  # max_norm was given
    return total, coef


def _distributed_total_norm(
    grads: list[torch.Tensor], max_norm: float, norm_type: float, error_if_nonfinite: bool
) -> tuple[torch.Tensor, float]:
    """``total_norm`` over gradients some of which are DTensors: every rank must call it."""

    def local_norm(ts: list[torch.Tensor]) -> tuple[float, str]:
        views = [_flat_view(t) for t in ts]
        if any(v is None for v in views):
            raise ValueError(
                "optirs computes the norm of dense CPU float32, float64, float16 and bfloat16 "
                "gradients only (DTensor gradients: of such local tensors)"
            )
        norm, dtype, _ = _core.grad_norm(views, norm_type, None, bf16_bits=True)
        return norm, dtype

    norm, dtype = _dtensor.reduce_norm(grads, norm_type, local_norm)
    total = torch.tensor(norm, dtype=dtype)
    # torch's arithmetic on a 0-d tensor of the promoted dtype (as the core's clip_coef).
    coef = float(torch.clamp(max_norm / (total + 1e-6), max=1.0))
    if error_if_nonfinite and not torch.isfinite(total):
        raise _nonfinite_error(norm_type)
    mesh = next(g.device_mesh for g in grads if isinstance(g, _dtensor.DTensor))
    from torch.distributed.tensor import Replicate

    return _dtensor.DTensor.from_local(total, mesh, [Replicate()] * mesh.ndim), coef


@torch.no_grad()
def clip_grad_norm_(
    parameters: torch.Tensor | Iterable[torch.Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> torch.Tensor:
    """Drop-in ``torch.nn.utils.clip_grad_norm_``: scales the gradients of ``parameters`` in
    place so that their total norm is at most ``max_norm``; returns the total norm (a 0-d
    tensor of the gradients' promoted dtype; ``tensor(0.)`` when no parameter has one).

    Args:
        parameters: a tensor or an iterable of tensors whose ``.grad`` is clipped (parameters
            without a gradient are skipped).
        max_norm: the largest total norm kept.
        norm_type: the order of the norm, as ``torch.linalg.vector_norm``'s ``ord``
            (``float('inf')`` for the largest absolute value).
        error_if_nonfinite: raise ``RuntimeError`` (torch's message), changing nothing, when
            the total norm is NaN or infinite.
        foreach: accepted for compatibility; optirs always makes one native pass.

    Two native passes, each parallel and SIMD: the norm, then ``g *= coef`` (the product
    rounded to the gradient's dtype, as ``g.mul_(coef)``). Gradients optirs cannot read in
    place (another device, sparse, not dense in memory, another dtype) make the whole call go
    to ``torch.nn.utils.clip_grad_norm_`` instead.
    """
    del foreach  # one native pass whatever it says
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    else:
        is_generator = isinstance(parameters, types.GeneratorType)
        parameters = list(parameters)
        if is_generator and len(parameters) == 0:
            warnings.warn(
                "`parameters` is an empty generator, no gradient clipping will occur.",
                stacklevel=3,
            )
    grads = [p.grad for p in parameters if p.grad is not None]
    views = [_flat_view(_dtensor.local(g)) for g in grads]
    if any(v is None for v in views):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm, norm_type, error_if_nonfinite)
    total, coef = total_norm(grads, max_norm, norm_type, error_if_nonfinite, views)
    # A coefficient of 1 changes no value: torch multiplies anyway, optirs skips the pass.
    if views and coef != 1.0:
        _core.scale_grads(views, coef, bf16_bits=True)
    return total
