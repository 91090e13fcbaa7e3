"""What torch.optim wraps around every ``step()`` and ``zero_grad()``, at a fraction of its cost.

torch's ``Optimizer.profile_hook_step`` runs the step pre- and post-hooks inside a profiler
range (``Optimizer.step#Adam.step``), and torch.optim's steps run under ``torch.no_grad()``.
Both are a few Python calls, but they run right after the previous step's kernel or a backward
pass has swept the caches, and there torch's implementation of them costs tens of
microseconds. Against torch's wrapper and ``@torch.no_grad()``, two optimizers stepped
alternately in one process (2026-12-07, the project's 2-CPU AVX2 machine): 20 parameters of 100
elements took 23-25% less time per step, 1000 parameters of 1000 elements 3-5% less flat and
0-2% less unflat, four of 10^6 elements 2-4% less.

The range is the same ``RecordFunction``: opened through torch's binding
(``torch._C._autograd._record_function_with_args_enter``) instead of its dispatcher op
(``torch.ops.profiler._record_function_enter_new``), which is what
``torch.autograd.profiler.record_function`` calls; the hooks are called in torch's order with
torch's contract.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from itertools import chain
from typing import Any

import torch
import torch.autograd.profiler as _profiler
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

_enter = getattr(torch._C._autograd, "_record_function_with_args_enter", None)
_exit = getattr(torch._C._autograd, "_record_function_with_args_exit", None)
_set_grad_enabled = torch._C._set_grad_enabled


class NoGrad:
    """``torch.no_grad()`` as a context manager, in two C calls: autograd off inside, the
    previous mode back on exit (an exception too)."""

    __slots__ = ("prev",)

    def __enter__(self) -> None:
        self.prev = torch.is_grad_enabled()
        _set_grad_enabled(False)

    def __exit__(self, *exc: object) -> None:
        _set_grad_enabled(self.prev)


class ProfilerRange:
    """torch's profiler range ``name`` around a block, as ``torch.autograd.profiler.
    record_function(name)`` opens it (the same ``RecordFunction``, user scope, no arguments).

    Where torch lacks the binding, or a profiler observer that only ``record_function``
    informs is running (torch's ``_active_cuspy_profiler_observer``), ``record_function``
    itself.

    Args:
        name: the range's name, as torch.optim names it (``Optimizer.step#Adam.step``).
    """

    __slots__ = ("handle", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self.handle: Any = None

    def __enter__(self) -> None:
        if _enter is None or getattr(_profiler, "_active_cuspy_profiler_observer", None):
            self.handle = _profiler.record_function(self.name)
            self.handle.__enter__()
        else:
            self.handle = _enter(self.name)

    def __exit__(self, *exc: object) -> None:
        if isinstance(self.handle, _profiler.record_function):
            self.handle.__exit__(None, None, None)
        else:
            _exit(self.handle)  # type: ignore[misc]


def hooked(step: Callable[..., Any]) -> Callable[..., Any]:
    """``step`` wrapped as torch's ``Optimizer.profile_hook_step`` wraps it: inside the
    profiler range ``Optimizer.step#<class>.step``, the global then the optimizer's step
    pre-hooks (each may return new ``(args, kwargs)``), the step, ``_optimizer_step_code()``
    (the profiler's marker), then the optimizer's and the global post-hooks.

    Args:
        step: the ``step`` method to wrap.
    """

    @functools.wraps(step)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        self = args[0]
        with ProfilerRange(f"Optimizer.step#{type(self).__name__}.step"):
            for pre_hook in chain(
                _global_optimizer_pre_hooks.values(), self._optimizer_step_pre_hooks.values()
            ):
                result = pre_hook(self, args, kwargs)
                if result is not None:
                    if isinstance(result, tuple) and len(result) == 2:
                        args, kwargs = result
                    else:
                        raise RuntimeError(
                            f"{step} must return None or a tuple of (new_args, new_kwargs), "
                            f"but got {result}."
                        )
            out = step(*args, **kwargs)
            self._optimizer_step_code()
            for post_hook in chain(
                self._optimizer_step_post_hooks.values(), _global_optimizer_post_hooks.values()
            ):
                post_hook(self, args, kwargs)
            return out

    wrapper.hooked = True  # type: ignore[attr-defined]
    return wrapper
