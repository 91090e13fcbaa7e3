"""optirs optimizers as functional optimizers, for ZeRO's ``overlap_with_ddp=True``.

``torch.distributed.optim.ZeroRedundancyOptimizer`` takes any optimizer class as
``optimizer_class`` (``optirs.torch.AdamW`` works as it is). With ``overlap_with_ddp=True``
it instead needs a *functional* optimizer, found through the map in
``torch.distributed.optim.utils`` (``functional_optim_map``, extended by
``register_functional_optim``): ZeRO's ``_get_optimizer_constructor`` replaces
``optimizer_class`` by ``functional_optim_map[optimizer_class]``, constructs it as
``cls(params, **defaults, _allow_empty_param_list=True)`` over this rank's single list of
parameters, reads its ``param_groups`` (or ``param_group``), and the DDP communication hooks
of ``ddp_comm_hooks/ddp_zero_hook.py`` call ``step(gradients)`` with one gradient (a view of the
all-reduced DDP bucket) or ``None`` per parameter.

``optirs.torch.register_functional_optimizers()`` registers every ``optirs.torch`` optimizer
(``SGD``, ``Adam``, ``AdamW``, ..., ``Lion``, ``Adam8bit``, ``AdamW8bit``) in that map, when the
program asks (idempotently).
Importing ``optirs.torch`` registers nothing: torch's registry is process-wide state, and a
program that never uses ZeRO's overlap should not find optirs in it. The functional class wraps
a real ``optirs.torch`` optimizer over the same parameters, so:

- updates are the optirs kernels' (``step_parameters`` on the parameters that got a gradient);
- its ``param_groups`` is that optimizer's live list, so hyperparameters ZeRO copies in from its
  own ``param_groups`` (an LR scheduler's changes) are used by the next step;
- ``state``, ``state_dict()`` and ``load_state_dict()`` are that optimizer's (torch's format), so
  ``ZeroRedundancyOptimizer.consolidate_state_dict()`` works.

Caveat, from torch itself: ``hook_with_zero_step`` and ``hook_with_zero_step_interleaved`` raise
``RuntimeError("Gloo backend using Overlapping DDP with ZeRO may meet hangs")`` when the DDP
process group's backend is ``"gloo"`` (pytorch/pytorch#62300), while optirs only updates CPU
tensors, which NCCL/HCCL/XCCL do not all-reduce. See the README ("Scaling out").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from . import _bridge

__all__ = ["FUNCTIONAL_OPTIMIZERS", "FunctionalOptimizer", "register_functional_optimizers"]


class FunctionalOptimizer:
    """An ``optirs.torch`` optimizer behind the functional-optimizer interface ZeRO uses.

    ``step(gradients)`` takes the gradients as a list (one per parameter of the single param
    group, ``None`` to leave a parameter alone) instead of reading ``.grad``. Subclasses set
    ``optimizer_class``; one exists per optirs optimizer in ``FUNCTIONAL_OPTIMIZERS``.
    """

    #: the ``optirs.torch`` class stepped underneath
    optimizer_class: ClassVar[type[torch.optim.Optimizer]]

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        *args: Any,
        _allow_empty_param_list: bool = False,
        **kwargs: Any,
    ) -> None:
        """``params``: this rank's parameters (one group); ``args``/``kwargs``: the optimizer's
        own arguments (``lr``, ``betas``, ...), as ``ZeroRedundancyOptimizer`` forwards them.
        ``_allow_empty_param_list``: accept an empty list (a rank with no parameter), as torch's
        functional optimizers do."""
        params = list(params)
        if not params and not _allow_empty_param_list:
            raise ValueError("optimizer got an empty parameter list")
        # A list holding one group dict is accepted by torch.optim even with no parameter.
        #: the wrapped ``optirs.torch`` optimizer
        self.optimizer: Any = self.optimizer_class([{"params": params}], *args, **kwargs)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The wrapped optimizer's (single) param group, live: changes apply to the next step."""
        return self.optimizer.param_groups

    @property
    def param_group(self) -> dict[str, Any]:
        """The single param group (torch's functional optimizers' attribute)."""
        return self.optimizer.param_groups[0]

    @property
    def defaults(self) -> dict[str, Any]:
        """The wrapped optimizer's defaults."""
        return self.optimizer.defaults

    @property
    def state(self) -> Any:
        """The wrapped optimizer's per-parameter state (torch's format)."""
        return self.optimizer.state

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's ``state_dict()``."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The wrapped optimizer's ``load_state_dict()``."""
        self.optimizer.load_state_dict(state_dict)

    @torch.no_grad()
    def step(self, gradients: Sequence[torch.Tensor | None]) -> None:
        """Updates each parameter whose entry in ``gradients`` is a tensor, with that gradient.

        The parameters' own ``.grad`` is left as it was: each given gradient is installed as
        ``.grad`` only for the one core call (``step_parameters``) and then put back.
        """
        params = self.optimizer.param_groups[0]["params"]
        if len(gradients) != len(params):
            raise ValueError(
                f"{type(self).__name__}.step: {len(gradients)} gradients for {len(params)} "
                "parameters"
            )
        stepped: list[torch.Tensor] = []
        saved: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        try:
            for p, g in zip(params, gradients):
                if g is None:
                    continue
                saved.append((p, p.grad))
                p.grad = g
                stepped.append(p)
            if stepped:
                self.optimizer.step_parameters(stepped)
        finally:
            for p, old in saved:
                p.grad = old

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.optimizer!r})"


def _functional(cls: type[torch.optim.Optimizer]) -> type[FunctionalOptimizer]:
    name = f"Functional{cls.__name__}"
    doc = f"``optirs.torch.{cls.__name__}`` as a functional optimizer (see FunctionalOptimizer)."
    return type(name, (FunctionalOptimizer,), {"optimizer_class": cls, "__doc__": doc})


#: optirs.torch class -> its functional counterpart
FUNCTIONAL_OPTIMIZERS: dict[type[torch.optim.Optimizer], type[FunctionalOptimizer]] = {
    cls: _functional(cls) for cls in (getattr(_bridge, name) for name in _bridge.__all__)
}


def register_functional_optimizers() -> dict[type[torch.optim.Optimizer], Any]:
    """Registers every optirs functional optimizer with ``torch.distributed.optim``.

    Afterwards ``ZeroRedundancyOptimizer(..., optimizer_class=optirs.torch.AdamW,
    overlap_with_ddp=True)`` uses ``FUNCTIONAL_OPTIMIZERS[optirs.torch.AdamW]``. Idempotent (a
    class registered already, by this or by anyone else, keeps its entry). Returns the
    registered entries, as torch's map now holds them. Importing ``optirs.torch`` registers
    nothing: call this before constructing such a ZeRO optimizer. torch's overlap hooks refuse
    the gloo backend, though (see the README's "Scaling out").

    Raises:
        RuntimeError: this torch build has no ``torch.distributed``.
    """
    if not torch.distributed.is_available():
        raise RuntimeError("this torch build has no torch.distributed")
    from torch.distributed.optim.utils import functional_optim_map, register_functional_optim

    for cls, functional in FUNCTIONAL_OPTIMIZERS.items():
        register_functional_optim(cls, functional)
    return {cls: functional_optim_map[cls] for cls in FUNCTIONAL_OPTIMIZERS}
