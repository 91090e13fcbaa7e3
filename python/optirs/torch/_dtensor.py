"""DTensor parameters (FSDP2's ``fully_shard``, tensor parallelism's ``distribute_tensor``).

A ``DTensor`` is a wrapper: each rank holds a local tensor (``to_local()``, a view of the same
memory) and the placements say how the locals make up the full tensor. optirs's rules are
element-wise, so stepping every rank's local shard with the local shards of its gradient and
state is the step of the full tensor, split: the bridge hands the core the locals, in the same
single call as every other parameter, and keeps the state as DTensors with the parameter's
mesh and placements (``torch.full_like`` of a DTensor is one), as torch.optim does, so that
``state_dict()``, ``torch.distributed.checkpoint`` and resharding see what they see with
torch.optim. The step counter (and ASGD's ``eta``/``mu``) stay plain 0-d tensors, as torch's.

A gradient laid out otherwise than its parameter (tensor parallelism can leave a
``Replicate`` or ``Partial`` gradient on a ``Shard`` parameter) is redistributed to the
parameter's placements first, as torch.optim's DTensor arithmetic does; such steps take the
full path (a collective may be needed, which every rank makes in the same order).

Refused, naming the parameter: a ``Partial`` parameter (a sum of the ranks' locals, not a
split of it: an element-wise step of each local is not a step of the sum), a gradient that is
not a DTensor on the parameter's mesh (or a DTensor gradient of a plain parameter), and state
that is not laid out as the parameter. A rule whose
step is not element-wise (``Spec.elementwise`` False, such as a factored second moment) is
refused for every placement but ``Replicate``.

The gradient norm over DTensor gradients (``reduce_norm``) is torch's: each gradient's norm is
the norm of the full tensor, so the locals' contributions are combined over the mesh
dimensions the gradient is sharded on (a sum of p-th powers, or a maximum for ``inf``), while
mesh dimensions where it is replicated are not counted again.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "DTensor",
    "Local",
    "any_dtensor",
    "check_pair",
    "local",
    "local_state",
    "meshes_of",
    "nonfinite_anywhere",
    "reduce_norm",
]

DTensor: Any
try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without torch.distributed
    DTensor = None


def any_dtensor(tensors: Any) -> bool:
    """Whether any of ``tensors`` is a DTensor."""
    return DTensor is not None and any(isinstance(t, DTensor) for t in tensors)


def _partial(placements: Any) -> bool:
    return any(pl.is_partial() for pl in placements)


def local(t: Any) -> torch.Tensor:
    """The rank's local tensor of a DTensor (what ``to_local()`` returns a view of, without
    autograd), else ``t``."""
    if DTensor is not None and isinstance(t, DTensor):
        lt = getattr(t, "_local_tensor", None)
        if isinstance(lt, torch.Tensor):
            return lt
        with torch.no_grad():
            return t.to_local()
    return t


def check_pair(
    p: Any, g: Any, where: str, name: str, elementwise: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The local tensors of parameter ``p`` and its gradient ``g``, after checking that a
    local step is the full tensor's step (see the module docstring). ``name``: the optimizer's
    class name, for messages."""
    p_is = DTensor is not None and isinstance(p, DTensor)
    g_is = DTensor is not None and isinstance(g, DTensor)
    if not p_is and not g_is:
        return p, g
    if not p_is:
        raise TypeError(
            f"the gradient of {where} is a DTensor, but the parameter is a plain tensor: "
            "optirs.torch steps a parameter and its gradient laid out alike"
        )
    if _partial(p.placements):
        raise ValueError(
            f"optirs.torch.{name} cannot step {where}: it is a DTensor with a Partial "
            f"placement ({p.placements}), a sum of the ranks' local tensors, whose update is "
            "not an update of each local tensor; redistribute it to Shard or Replicate first"
        )
    if not g_is:
        raise TypeError(
            f"{where} is a DTensor but its gradient is a plain tensor: optirs.torch steps a "
            "DTensor parameter with a DTensor gradient of the same mesh and placements"
        )
    if g.device_mesh != p.device_mesh:
        raise ValueError(
            f"the gradient of {where} is on {g.device_mesh}, but the parameter on "
            f"{p.device_mesh}: redistribute the gradient to the parameter's mesh"
        )
    if tuple(g.placements) != tuple(p.placements):
        # As torch.optim's DTensor ops do, the gradient is brought to the parameter's
        # placements (a local slice from Replicate to Shard; a reduction from Partial, which
        # every rank makes here, in the same order of parameters).
        g = g.redistribute(p.device_mesh, p.placements)
    if not elementwise and any(not pl.is_replicate() for pl in p.placements):
        raise ValueError(
            f"optirs.torch.{name}'s update is not element-wise: a sharded {where} "
            f"({tuple(p.placements)}) would be stepped differently from the full tensor; "
            "replicate it, or use an element-wise optimizer"
        )
    lp, lg = local(p), local(g)
    if lg.shape != lp.shape:
        raise ValueError(
            f"the gradient of {where} has local shape {tuple(lg.shape)}, but the parameter's "
            f"local shard has {tuple(lp.shape)}"
        )
    return lp, lg


def local_state(p: Any, t: Any, what: str) -> Any:
    """The local tensor of state buffer ``t`` of DTensor parameter ``p`` (``t`` unchanged
    when ``p`` is a plain tensor); it must be a DTensor of ``p``'s mesh and placements."""
    if DTensor is None or not isinstance(p, DTensor):
        if DTensor is not None and isinstance(t, DTensor):
            raise TypeError(f"{what} is a DTensor, but its parameter is a plain tensor")
        return t
    if not isinstance(t, DTensor):
        raise TypeError(
            f"{what} must be a DTensor with its parameter's mesh and placements "
            f"({tuple(p.placements)}), as torch.optim keeps it; got {type(t).__name__}"
        )
    if t.device_mesh != p.device_mesh or tuple(t.placements) != tuple(p.placements):
        raise ValueError(
            f"{what} is laid out as {tuple(t.placements)} on {t.device_mesh}, but its "
            f"parameter as {tuple(p.placements)} on {p.device_mesh}"
        )
    return local(t)


def reduce_norm(grads: list[Any], norm_type: float, local_norm: Any) -> tuple[float, torch.dtype]:
    """The total ``norm_type`` norm of ``grads`` (DTensors and plain tensors), as torch's
    ``clip_grad_norm_`` computes it for DTensors, and the gradients' promoted dtype.

    ``local_norm(tensors)`` gives the norm of a list of plain tensors (the core's one pass) as
    ``(float, dtype)``. Gradients are bucketed by mesh and by the mesh dimensions they are
    sharded on (every rank sees the same parameters in the same order, so every rank makes the
    same buckets and the same collectives): one local norm and one all-reduce over each such
    mesh dimension per bucket (a sum of p-th powers; a maximum for ``inf``, a minimum for
    ``-inf``). Plain gradients count as they are, on every rank (as in torch, where a plain
    tensor is not communicated). Accumulated in float64 (torch: float32).
    """
    import torch.distributed as dist

    p = float(norm_type)
    inf = float("inf")
    buckets: dict[Any, tuple[Any, tuple[int, ...], list[torch.Tensor]]] = {}
    dtypes: list[torch.dtype] = []
    for g in grads:
        dtypes.append(g.dtype)
        if isinstance(g, DTensor):
            if _partial(g.placements):
                # Not reduced yet: its norm is the reduced tensor's (a copy made here; the
                # gradient itself is scaled as it is, which scales the sum alike).
                from torch.distributed.tensor import Replicate

                g = g.redistribute(
                    g.device_mesh,
                    [Replicate() if pl.is_partial() else pl for pl in g.placements],
                )
            dims = tuple(d for d, pl in enumerate(g.placements) if not pl.is_replicate())
            key: Any = (id(g.device_mesh), dims)
            mesh = g.device_mesh
            lg = local(g)
        else:
            key, mesh, dims, lg = None, None, (), g
        buckets.setdefault(key, (mesh, dims, []))[2].append(lg)
    if p == inf:
        op, identity = dist.ReduceOp.MAX, 0.0
    elif p == -inf:
        op, identity = dist.ReduceOp.MIN, inf
    else:
        op, identity = dist.ReduceOp.SUM, 0.0

    def power(n: float, e: float) -> float:
        # As float64 tensor arithmetic would give it: inf where Python's floats raise
        # (overflow; 0 to a negative power).
        try:
            return n**e
        except (OverflowError, ZeroDivisionError):
            return inf

    acc = identity
    for mesh, dims, locals_ in buckets.values():
        # An empty shard (a rank past the end of an uneven split) adds nothing; inf and -inf
        # norms of nothing would raise.
        nonempty = [t for t in locals_ if t.numel() > 0] if mesh is not None else locals_
        value = local_norm(nonempty)[0] if nonempty else identity
        if p not in (inf, -inf, 0.0) and nonempty:
            value = power(value, p)  # what the ranks' contributions add up as
        if dims:
            # A NaN travels as a flag beside the value: a MAX or MIN reduction may drop it.
            nan = value != value
            sign = -1.0 if p == -inf else 1.0
            buf = torch.tensor([identity if nan else value, sign * nan], dtype=torch.float64)
            for d in dims:
                dist.all_reduce(buf, op=op, group=mesh.get_group(d))
            value = float("nan") if buf[1] != 0 else float(buf[0])
        if value != value or acc != acc:
            acc = float("nan")
        elif p == inf:
            acc = max(acc, value)
        elif p == -inf:
            acc = min(acc, value)
        else:
            acc += value
    total = acc if p in (inf, -inf, 0.0) else power(acc, 1.0 / p)
    dtype = dtypes[0] if dtypes else torch.float32
    for other in dtypes[1:]:
        dtype = torch.promote_types(dtype, other)
    return total, dtype


def meshes_of(params: Any) -> list[Any]:
    """The device meshes of the DTensors among ``params``, in order of first appearance."""
    found: list[Any] = []
    if DTensor is None:
        return found
    for p in params:
        if isinstance(p, DTensor) and all(p.device_mesh is not m for m in found):
            found.append(p.device_mesh)
    return found


def nonfinite_anywhere(views: list[Any], meshes: list[Any], local_inf_norm: Any) -> bool:
    """Whether any rank of ``meshes`` has a NaN or infinity among its gradients ``views``
    (NumPy arrays, None skipped): ``skip_nonfinite`` must skip a step on every rank or on none,
    or the shards of one parameter would drift apart. ``local_inf_norm(views)``: the largest
    absolute value (NaN when any is NaN). One MAX all-reduce per mesh dimension."""
    import torch.distributed as dist

    arrays = [v for v in views if v is not None and v.size > 0]
    norm = local_inf_norm(arrays) if arrays else 0.0
    flag = torch.tensor([0.0 if norm - norm == 0.0 else 1.0], dtype=torch.float64)
    for mesh in meshes:
        for d in range(mesh.ndim):
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=mesh.get_group(d))
    return bool(flag[0] != 0.0)


class Local:
    """A DTensor parameter's stand-in in the bridge's cached plan (``_bridge._Plan``): its local
    tensor, and what ``prepare`` checks before each step that the full step would check."""

    __slots__ = ("entry", "items", "keys", "local", "param", "spec", "state", "written")

    @classmethod
    def of(cls, p: Any, state: Any, keys: tuple[str, ...]) -> Local | None:
        """``p``'s stand-in, or None when ``p`` is a plain tensor."""
        if DTensor is None or not isinstance(p, DTensor):
            return None
        return cls(p, state, keys)

    def __init__(self, p: Any, state: Any, keys: tuple[str, ...]) -> None:
        self.param = p
        self.local = local(p)
        self.spec = (p.device_mesh, tuple(p.placements))
        self.keys = keys
        entry = state.get(p)
        #: the parameter's state dict, and its entries, as the plan found them
        self.entry = entry
        self.items = tuple(entry[k] for k in keys) if entry else ()
        #: the state dict the core sees: the entries' local tensors
        self.state = {k: local(t) for k, t in zip(keys, self.items)}
        #: the DTensors a step writes (the core bumps their local tensors' versions)
        self.written = [p, *(t for t in self.items if isinstance(t, DTensor))]

    def prepare(self, state: Any, stand_ins: dict[Any, Any]) -> bool:
        """Hands the local tensor the gradient's local tensor and adds the local state to
        ``stand_ins``; False (the full step must look) when anything is not as the plan was
        made: the gradient not a DTensor of the parameter's mesh and placements, the local
        tensors or state entries not the same objects."""
        p = self.param
        if local(p) is not self.local:
            return False
        g = p.grad
        if g is None:
            self.local.grad = None
        else:
            if (
                type(g) is not DTensor
                or (g.device_mesh is not self.spec[0] and g.device_mesh != self.spec[0])
                or tuple(g.placements) != self.spec[1]
            ):
                return False
            try:
                self.local.grad = local(g)
            except (RuntimeError, TypeError):
                # torch's setter refuses another dtype or shape: the full step says why.
                return False
        entry = state.get(p)
        if entry is not self.entry:
            return False
        if entry:
            for k, t in zip(self.keys, self.items):
                if entry.get(k) is not t or local(t) is not self.state[k]:
                    return False
            stand_ins[self.local] = self.state
        return True
