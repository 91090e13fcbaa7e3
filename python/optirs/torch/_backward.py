"""Stepping the optimizer during backward: each parameter as soon as its gradient is ready.

``step_in_backward(model_or_params, optimizer)`` registers a post-accumulate-grad hook
(``Tensor.register_post_accumulate_grad_hook``) on every trainable parameter. When autograd has
finished accumulating a parameter's gradient, the hook updates that parameter alone through
``optimizer.step_parameters([p])`` (one call into the Rust core, with the parameter's group's
current hyperparameters) and then frees the gradient (``p.grad = None``)::

    import optirs.torch

    opt = optirs.torch.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100)
    with optirs.torch.step_in_backward(model, opt):
        for x, y in loader:
            loss_fn(model(x), y).backward()   # updates every parameter; no zero_grad, no step
            sched.step()

Only one gradient is alive at a time instead of all of them (the peak memory of a step falls by
about the size of the gradients), and the update of the last layers runs while autograd is
still computing the gradients of the first ones.

Semantics, compared with the plain ``zero_grad(); loss.backward(); opt.step()`` loop:

- **Same result.** Each parameter gets exactly the update ``opt.step()`` would give it: the
  kernels are the same and autograd only accumulates a parameter's gradient once every node
  that uses that parameter has run, so no later part of the backward pass sees an updated
  value. (Should some graph still need the old value, the version counter that optirs bumps
  makes autograd raise instead of silently using the new one.)
- **Every backward steps.** Gradient accumulation over micro-batches (several ``backward()``
  calls per step) needs the plain loop; so do ``clip_grad_norm_`` and ``torch.amp.GradScaler``,
  which need all the gradients before any update, and ``DistributedDataParallel``, which
  all-reduces gradients after they are accumulated.
- **``zero_grad()`` is unnecessary** (gradients are None after every backward) and
  ``optimizer.step()`` is not called: the optimizer's step pre/post hooks do not run, and there
  is no closure. Calling ``optimizer.step()`` anyway does nothing, since no parameter has a
  gradient.
- **LR schedulers work**: they change ``param_groups``, which every update reads afresh. The
  first ``scheduler.step()`` warns that ``optimizer.step()`` was never called; the warning is
  harmless here (silence it, or call the no-op ``optimizer.step()`` before ``scheduler.step()``).
- **Shared parameters** (tied weights) are updated once per backward, with the sum of their
  gradients: autograd accumulates a leaf once per backward pass.
- **Frozen parameters** (``requires_grad=False`` when the helper is called) get no hook; a
  parameter unfrozen later needs the helper called again (after ``remove()``).
- ``skip_nonfinite=True`` skips per parameter (a non-finite gradient leaves that parameter and
  its state alone, counted in ``optimizer.skipped_steps``), not the whole step.

The returned ``StepInBackward`` handle's ``remove()`` unregisters every hook (plain behaviour
again); the handle is also a context manager that removes the hooks on exit.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import TracebackType
from typing import Any, Protocol

import torch

__all__ = ["StepInBackward", "step_in_backward"]


class _StepsParameters(Protocol):
    """What the helper needs from an optimizer (every ``optirs.torch`` optimizer has it)."""

    param_groups: list[dict[str, Any]]

    def step_parameters(self, params: Iterable[torch.Tensor]) -> bool:
        """Steps only ``params`` with their groups' current hyperparameters."""
        ...


class StepInBackward:
    """The hooks registered by ``step_in_backward``: ``remove()`` them, or use as a context.

    Attributes:
        optimizer: the optimizer whose ``step_parameters`` the hooks call.
        params: the parameters that got a hook, in registration order.
    """

    def __init__(self, optimizer: _StepsParameters, params: list[torch.Tensor]) -> None:
        self.optimizer = optimizer
        self.params = params
        self._handles: list[Any] = []
        for p in params:
            self._handles.append(p.register_post_accumulate_grad_hook(self._hook))

    def _hook(self, p: torch.Tensor) -> None:
        """Updates ``p`` with its freshly accumulated gradient, then frees the gradient."""
        try:
            self.optimizer.step_parameters([p])
        finally:
            # Freed even when the step raised: the error propagates out of backward(),
            # and a stale gradient would otherwise be accumulated into by the next one.
            p.grad = None

    @property
    def active(self) -> bool:
        """Whether the hooks are still registered."""
        return bool(self._handles)

    def remove(self) -> None:
        """Unregisters every hook (idempotent); later backward passes leave gradients in
        ``.grad`` for a plain ``optimizer.step()`` again."""
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()

    def __enter__(self) -> StepInBackward:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return (
            f"<StepInBackward {state}: {len(self.params)} parameters, "
            f"{type(self.optimizer).__name__}>"
        )


def step_in_backward(
    model_or_params: torch.nn.Module | Iterable[torch.Tensor],
    optimizer: _StepsParameters,
) -> StepInBackward:
    """Updates each parameter as soon as backward has accumulated its gradient, then frees it.

    Args:
        model_or_params: a module (its ``parameters()``) or an iterable of parameters; each must
            be in one of ``optimizer``'s param groups. Parameters that do not require grad are
            left alone (no hook); a tensor listed twice gets one hook.
        optimizer: an ``optirs.torch`` optimizer (anything with ``step_parameters``).

    Returns:
        A ``StepInBackward`` handle: ``.remove()`` unregisters the hooks; ``with`` removes them
        on exit.

    Raises:
        TypeError: ``optimizer`` has no ``step_parameters`` (a plain ``torch.optim`` optimizer),
            or a parameter is not a tensor.
        ValueError: a parameter that requires grad is not in ``optimizer``'s param groups, or is
            not a leaf (its gradient would never be accumulated).

    See the module docstring for the semantics (gradient accumulation, schedulers, shared and
    frozen parameters, step hooks).
    """
    if not callable(getattr(optimizer, "step_parameters", None)):
        raise TypeError(
            f"step_in_backward needs an optimizer with step_parameters() (an optirs.torch "
            f"optimizer), got {type(optimizer).__name__}"
        )
    if isinstance(model_or_params, torch.nn.Module):
        candidates: Iterable[Any] = model_or_params.parameters()
    elif isinstance(model_or_params, torch.Tensor):
        candidates = [model_or_params]
    else:
        candidates = model_or_params
    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    params: list[torch.Tensor] = []
    seen: set[int] = set()
    for i, p in enumerate(candidates):
        if not isinstance(p, torch.Tensor):
            raise TypeError(
                f"step_in_backward: parameter {i} is a {type(p).__name__}, not a tensor"
            )
        if not p.requires_grad or id(p) in seen:
            continue
        if not p.is_leaf:
            raise ValueError(
                f"step_in_backward: parameter {i} is not a leaf tensor, so autograd never "
                "accumulates a gradient into it"
            )
        if id(p) not in owned:
            raise ValueError(
                f"step_in_backward: parameter {i} (shape {tuple(p.shape)}) is not in the "
                "optimizer's param_groups"
            )
        seen.add(id(p))
        params.append(p)
    return StepInBackward(optimizer, params)
