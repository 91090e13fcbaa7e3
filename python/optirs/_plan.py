"""What a cached step plan was built from, shared by the NumPy API and the torch bridge.

Both keep the flat argument lists of ``_core.step`` from one step to the next; both must
notice when the param groups they were built from have changed shape.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from itertools import chain
from typing import Any, TypedDict

from ._spec import Spec


class StepOptions(TypedDict):
    """The opt-in behaviours every call into the core passes on."""

    skip_nonfinite: bool
    flush_denormals: bool


class GroupsSnapshot:
    """The groups' parameter lists (the list objects, their lengths and their elements) and the
    options that decide which state buffers each group uses."""

    __slots__ = ("lens", "lists", "needs", "params")

    def __init__(self, spec: Spec, groups: Sequence[dict[str, Any]]) -> None:
        self.lists = [g["params"] for g in groups]
        self.lens = [len(ps) for ps in self.lists]
        self.needs = [spec.needs(g) for g in groups]
        #: every parameter, flattened in param_groups order
        self.params: list[Any] = list(chain.from_iterable(self.lists))

    def unchanged(self, spec: Spec, groups: Sequence[dict[str, Any]]) -> bool:
        """True when ``groups`` still hold the same parameters, in the same lists, with the
        same state layout. One identity comparison per parameter."""
        if len(groups) != len(self.lists):
            return False
        for g, ps, n, need in zip(groups, self.lists, self.lens, self.needs):
            current = g["params"]
            if current is not ps or len(current) != n or spec.needs(g) != need:
                return False
        return all(map(operator.is_, chain.from_iterable(self.lists), self.params))
