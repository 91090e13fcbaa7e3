"""What each optimizer is: defaults, validation (in torch.optim's words) and state layout.

Shared by the NumPy API (``optirs``) and the torch bridge (``optirs.torch``), so both agree with
the Rust core on buffer order. The validation is torch.optim's constructor checks: the NumPy API
applies them at construction and at every step; the torch bridge, like torch.optim, only at
construction (torch's own constructor), and steps with whatever is set later.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable


def _real(name: str, value: Any) -> float:
    # bool is an int subclass; torch takes True as 1.0 too, so it is accepted.
    if isinstance(value, numbers.Real) or (
        hasattr(value, "__float__") and getattr(value, "ndim", 0) == 0  # 0-d arrays, tensors
    ):
        try:
            return float(value)
        except OverflowError:
            raise ValueError(f"{name} is too large for a float: {value}") from None
    raise TypeError(f"{name} must be a real number, got {type(value).__name__}")


def _nonneg(name: str, value: Any, message: str) -> None:
    # Written as torch writes it, `not 0.0 <= x`, so NaN is refused where torch refuses it.
    if not 0.0 <= _real(name, value):
        raise ValueError(message.format(value))


def _check_lr(g: Mapping[str, Any]) -> None:
    _nonneg("lr", g["lr"], "Invalid learning rate: {}")


def _check_eps(g: Mapping[str, Any]) -> None:
    _nonneg("eps", g["eps"], "Invalid epsilon value: {}")


def _check_wd(g: Mapping[str, Any]) -> None:
    _nonneg("weight_decay", g["weight_decay"], "Invalid weight_decay value: {}")


def _check_sgd(g: Mapping[str, Any]) -> None:
    # torch.optim.SGD compares with `< 0.0`, which lets NaN through; so does optirs.
    lr, momentum = _real("lr", g["lr"]), _real("momentum", g["momentum"])
    dampening, wd = _real("dampening", g["dampening"]), _real("weight_decay", g["weight_decay"])
    if lr < 0.0:
        raise ValueError(f"Invalid learning rate: {g['lr']}")
    if momentum < 0.0:
        raise ValueError(f"Invalid momentum value: {g['momentum']}")
    if wd < 0.0:
        raise ValueError(f"Invalid weight_decay value: {g['weight_decay']}")
    if g["nesterov"] and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")


def _check_adam(g: Mapping[str, Any]) -> None:
    _check_lr(g)
    _check_eps(g)
    betas = g["betas"]
    try:
        n = len(betas)
    except TypeError:
        n = -1
    if n != 2:
        raise TypeError(f"betas must be a pair of floats, got {betas!r}")
    for i in (0, 1):
        b = _real(f"betas[{i}]", betas[i])
        if not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {betas[i]}")
    _check_wd(g)


def _check_rmsprop(g: Mapping[str, Any]) -> None:
    _check_lr(g)
    _check_eps(g)
    _nonneg("momentum", g["momentum"], "Invalid momentum value: {}")
    _check_wd(g)
    _nonneg("alpha", g["alpha"], "Invalid alpha value: {}")


def _check_adagrad(g: Mapping[str, Any]) -> None:
    _check_lr(g)
    _nonneg("lr_decay", g["lr_decay"], "Invalid lr_decay value: {}")
    _check_wd(g)
    _nonneg(
        "initial_accumulator_value",
        g["initial_accumulator_value"],
        "Invalid initial_accumulator_value value: {}",
    )
    _check_eps(g)


@dataclass(frozen=True)
class Spec:
    """One optimizer as the Rust core sees it."""

    #: name of the update rule in ``optirs._core.step``
    kind: str
    #: state buffers, in the order the core takes them
    buffers: tuple[str, ...]
    #: whether a 0-d float32 ``step`` counter is kept
    counts_steps: bool
    #: raises ValueError/TypeError, in torch's words, for a group torch.optim's constructor
    #: would refuse (the NumPy API's check; the torch bridge does not use it)
    validate: Callable[[Mapping[str, Any]], None]
    #: which of ``buffers`` a group's options use
    needs: Callable[[Mapping[str, Any]], tuple[bool, ...]]

    def required(self, group: Mapping[str, Any]) -> tuple[str, ...]:
        """The buffers a parameter of ``group`` must have once it has stepped."""
        return tuple(n for n, need in zip(self.buffers, self.needs(group)) if need)


SGD = Spec(
    kind="sgd",
    buffers=("momentum_buffer",),
    counts_steps=False,
    validate=_check_sgd,
    needs=lambda g: (g["momentum"] != 0,),
)
ADAM = Spec(
    kind="adam",
    buffers=("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    counts_steps=True,
    validate=_check_adam,
    needs=lambda g: (True, True, bool(g["amsgrad"])),
)
RMSPROP = Spec(
    kind="rmsprop",
    buffers=("square_avg", "momentum_buffer", "grad_avg"),
    counts_steps=True,
    validate=_check_rmsprop,
    needs=lambda g: (True, g["momentum"] > 0, bool(g["centered"])),
)
ADAGRAD = Spec(
    kind="adagrad",
    buffers=("sum",),
    counts_steps=True,
    validate=_check_adagrad,
    needs=lambda g: (True,),
)


def check_step_value(value: Any, where: str) -> float:
    """A saved ``step``: a finite, non-negative real number (torch keeps it as float32)."""
    try:
        s = float(value)
    except (TypeError, ValueError):
        raise TypeError(
            f"{where}: 'step' must be a real number, got {type(value).__name__}"
        ) from None
    if not (math.isfinite(s) and s >= 0):
        raise ValueError(f"{where}: 'step' must be finite and non-negative, got {s}")
    return s
