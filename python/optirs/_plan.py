"""What a cached step plan was built from, shared by the NumPy API and the torch bridge.

Both keep the flat argument lists of ``_core.step`` from one step to the next; both must
notice when the param groups they were built from have changed shape.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Sequence
from itertools import chain
from typing import Any, TypedDict

from . import _core
from ._spec import Spec


class StepOptions(TypedDict):
    """The opt-in behaviours every call into the core passes on."""

    skip_nonfinite: bool
    flush_denormals: bool
    #: divide each gradient by this as the step reads it (GradScaler's scale), or None
    grad_unscale: float | None
    #: then multiply it by this (a clip coefficient), or None
    grad_coef: float | None


class GroupsSnapshot:
    """The groups' parameter lists (the list objects, their lengths and their elements) and the
    options that decide which state buffers each group uses."""

    __slots__ = ("lens", "lists", "masters", "members", "needs", "owners", "params", "state_dtypes")

    def __init__(self, spec: Spec, groups: Sequence[dict[str, Any]]) -> None:
        # Everything below is read from one copy of each list: another thread may change the
        # caller's lists while a step is being planned, and two readings could then disagree
        # (a plan with more state entries than parameters, an index past the gradients).
        groups = list(groups)
        self.lists = [g["params"] for g in groups]
        #: each list's parameters when the snapshot was taken
        self.members: list[list[Any]] = [list(ps) for ps in self.lists]
        self.lens = [len(ps) for ps in self.members]
        self.needs = [spec.needs(g) for g in groups]
        #: each group's ``state_dtype``: the dtype of the state the plan's buffers hold
        self.state_dtypes = [g.get("state_dtype") for g in groups]
        #: each group's ``master_weights``: whether its 16-bit parameters' lists hold a master
        self.masters = [bool(g.get("master_weights")) for g in groups]
        #: every parameter, flattened in param_groups order
        self.params: list[Any] = list(chain.from_iterable(self.members))
        #: the group of each of ``params``
        self.owners: list[dict[str, Any]] = [g for g, ps in zip(groups, self.members) for _ in ps]

    def unchanged(self, spec: Spec, groups: Sequence[dict[str, Any]]) -> bool:
        """True when ``groups`` still hold the same parameters, in the same lists, with the
        same state layout. One identity comparison per parameter."""
        if len(groups) != len(self.lists):
            return False
        for g, ps, n, need, sd, m in zip(
            groups, self.lists, self.lens, self.needs, self.state_dtypes, self.masters
        ):
            current = g["params"]
            if (
                current is not ps
                or len(current) != n
                or spec.needs(g) != need
                or g.get("state_dtype") != sd
                or bool(g.get("master_weights")) != m
            ):
                return False
        return _core.same_items(self.lists, self.params)


#: Optimizers whose step lock exists: a forked child gets each a fresh one (see ``fork_safe``).
_LOCKED: weakref.WeakSet[Any] = weakref.WeakSet()


def fork_safe(optimizer: Any) -> None:
    """Registers ``optimizer`` (which has an ``_after_fork()`` method) to be called in every
    child forked from now on.

    Another thread may be inside the optimizer's ``step()``, holding its lock, when some thread
    forks; the child has no such thread, so the lock would stay held there forever and the
    child's first step would hang (DataLoader workers and ``multiprocessing`` fork like this).
    The child's copy of that step's parameters is whatever the step had written when the fork
    happened, as for any memory another thread is writing then.
    """
    _LOCKED.add(optimizer)


def _after_fork_in_child() -> None:
    for optimizer in list(_LOCKED):
        optimizer._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
