"""Contiguous parameter, gradient and state buffers for the torch bridge.

``flatten_parameters(model)`` moves each parameter's data into one flat buffer per dtype and
device (the parameters stay the same ``nn.Parameter`` objects, now views of that buffer) and
gives each one a gradient that is a view of a flat gradient buffer: autograd's AccumulateGrad
adds into an existing ``p.grad`` in place (outside ``create_graph``), so after ``backward()``
the gradients are already contiguous. An optirs.torch optimizer over such parameters keeps its
state flat too (one buffer per state name; ``optimizer.state[p]`` holds per-parameter views
under torch's names) and steps a few flat buffers in one native call (``_FlatPlan`` in
``_bridge``), falling back to its per-tensor step whenever something no longer lines up.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from . import _dtensor

__all__ = ["FlatParameters", "flatten_parameters"]

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

#: parameter -> (its _FlatBuffer, its index there)
_OWNER: Any = WeakTensorKeyDictionary()


class _FlatBuffer:
    """The parameters of one dtype and device: their data, their gradients, where each lies."""

    __slots__ = ("__weakref__", "count", "data", "grad", "grad_views", "numels", "params", "starts")

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.count = len(params)
        self.numels = [p.numel() for p in params]
        self.starts = [0]
        for n in self.numels:
            self.starts.append(self.starts[-1] + n)
        p0 = params[0]
        self.data = torch.empty(self.starts[-1], dtype=p0.dtype, device=p0.device)
        self.grad = torch.zeros_like(self.data)
        # Weak: the registry's values must not keep its keys alive.
        self.params = [weakref.ref(p) for p in params]
        #: each parameter's gradient view; None for a frozen one (``requires_grad=False``),
        #: which keeps its ``p.grad`` (None: an optimizer skips it, as torch's would)
        self.grad_views: list[torch.Tensor | None] = []
        with torch.no_grad():
            for p, a, n in zip(params, self.starts, self.numels):
                view = self.data[a : a + n].view(p.shape)
                view.copy_(p)
                p.data = view
                if not p.requires_grad:
                    self.grad_views.append(None)
                    continue
                g = self.grad[a : a + n].view(p.shape)
                if p.grad is not None:
                    g.copy_(p.grad)
                self.grad_views.append(g)
                p.grad = g

    def attach(self) -> None:
        """Gives every live parameter whose ``p.grad`` is not its view that view back."""
        for ref, g in zip(self.params, self.grad_views):
            p = ref()
            if p is not None and g is not None and p.grad is not g:
                p.grad = g


class FlatParameters:
    """What ``flatten_parameters`` made: the flat buffers and the parameters in them.

    Args:
        buffers: the flat buffers, one per dtype and device (``flatten_parameters`` makes
            this object; it is not meant to be constructed directly).
    """

    def __init__(self, buffers: list[_FlatBuffer]) -> None:
        self._buffers = buffers

    @property
    def buffers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(data, grad)`` per dtype and device: the flat parameter and gradient buffers."""
        return [(b.data, b.grad) for b in self._buffers]

    def parameters(self) -> list[torch.Tensor]:
        """The flattened parameters still alive, buffer by buffer, in each buffer's order."""
        return [p for b in self._buffers for r in b.params if (p := r()) is not None]

    def zero_grad(self) -> None:
        """Zeros every flat gradient buffer and gives back each parameter its gradient view
        (where user code set ``p.grad = None`` or replaced it): what ``zero_grad()`` of an
        optirs.torch optimizer does for flat parameters; ``model.zero_grad()`` instead drops
        the views (``set_to_none``), and the optimizer then steps through its per-tensor path
        until one of these calls gives them back."""
        for b in self._buffers:
            b.grad.zero_()
            b.attach()

    def __len__(self) -> int:
        return sum(b.count for b in self._buffers)

    def __repr__(self) -> str:
        parts = ", ".join(f"{b.data.dtype} on {b.data.device}: {b.count}" for b in self._buffers)
        return f"FlatParameters({parts})"


def owner(p: torch.Tensor) -> tuple[_FlatBuffer, int] | None:
    """The flat buffer ``p`` lives in and its index there, or None."""
    if not _OWNER:
        return None
    found: tuple[_FlatBuffer, int] | None = _OWNER.get(p)
    return found


def any_flat() -> bool:
    """Whether any parameter has been flattened (in this process, still alive)."""
    return bool(_OWNER)


def flatten_parameters(model_or_params: torch.nn.Module | Iterable[torch.Tensor]) -> FlatParameters:
    """Moves parameters into contiguous buffers, one per dtype and device, for optirs.torch's
    flat step.

    Args:
        model_or_params: a ``torch.nn.Module`` (its ``parameters()``) or an iterable of
            parameters (a parameter listed twice is flattened once).

    Each parameter keeps its identity (the same ``nn.Parameter``, the module unchanged;
    ``state_dict``/``load_state_dict`` copy through it) and becomes a contiguous view of its
    buffer (a channels_last parameter becomes contiguous), in the order given. Each gets a
    gradient that is a view of a flat gradient buffer (holding its old gradient's values, if
    it had one), into which ``backward()`` accumulates in place; a frozen parameter
    (``requires_grad=False``) moves too but gets no gradient view, so optimizers skip it as
    before. Call it before making the optimizer (and before wrapping the model in DDP).
    Returns a ``FlatParameters`` handle.

    Raises, changing nothing: TypeError for something that is not a floating tensor of
    float32, float64, float16 or bfloat16, ValueError for a tensor that is not a leaf, is
    sparse, a DTensor, is already flattened, or whose gradient does not match it, and for no
    parameters.
    """
    if isinstance(model_or_params, torch.nn.Module):
        given: list[Any] = list(model_or_params.parameters())
    elif isinstance(model_or_params, torch.Tensor):
        raise TypeError(
            "flatten_parameters takes a torch.nn.Module or an iterable of parameters, "
            "got one tensor (wrap it in a list)"
        )
    else:
        try:
            given = list(model_or_params)
        except TypeError:
            raise TypeError(
                "flatten_parameters takes a torch.nn.Module or an iterable of parameters, "
                f"got {type(model_or_params).__name__}"
            ) from None
    params: list[torch.Tensor] = []
    seen: set[int] = set()
    for i, p in enumerate(given):
        where = f"flatten_parameters: params[{i}]"
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{where} is a {type(p).__name__}, not a tensor")
        if id(p) in seen:
            continue
        seen.add(id(p))
        if _dtensor.any_dtensor([p]):
            raise ValueError(
                f"{where} is a DTensor: flatten_parameters takes unsharded parameters "
                "(FSDP2 keeps its own sharded storage)"
            )
        if p.layout != torch.strided:
            raise ValueError(f"{where} is not a dense tensor (layout {p.layout})")
        if p.dtype not in _DTYPES:
            raise TypeError(
                f"{where} has dtype {p.dtype}; float32, float64, float16 and bfloat16 "
                "parameters can be flattened"
            )
        if not p.is_leaf:
            raise ValueError(f"{where} is not a leaf tensor (it has a grad_fn)")
        if owner(p) is not None:
            raise ValueError(f"{where} is already flattened")
        g = p.grad
        if g is not None and (
            g.layout != torch.strided
            or g.shape != p.shape
            or g.dtype != p.dtype
            or g.device != p.device
        ):
            raise ValueError(f"{where} has a gradient that does not match it")
        params.append(p)
    if not params:
        raise ValueError("flatten_parameters: no parameters")
    by_kind: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for p in params:
        by_kind.setdefault((p.dtype, p.device), []).append(p)
    buffers = [_FlatBuffer(ps) for ps in by_kind.values()]
    for b in buffers:
        for k, r in enumerate(b.params):
            _OWNER[r()] = (b, k)
    return FlatParameters(buffers)
