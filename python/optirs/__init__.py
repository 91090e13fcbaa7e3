"""optirs: the optimizer step of neural-network training, in Rust, in place over NumPy arrays.

``optirs.SGD``, ``Adam``, ``AdamW``, ``RMSprop``, ``Adagrad``, ``Adadelta``, ``RAdam``,
``Rprop``, ``Adamax``, ``NAdam``, ``ASGD`` and ``Adafactor`` take torch.optim's arguments,
defaults and error messages, and follow torch.optim's update formulas and operation order;
``Lion`` follows lion-pytorch's::

    import numpy as np, optirs
    w = np.zeros((256, 128), np.float32); b = np.zeros(128, np.float32)
    opt = optirs.Adam([w, b], lr=1e-3)
    opt.step([gw, gb])      # w and b are updated in place

One call into Rust per ``step()`` covers every parameter of every group: it validates every
array first (so a step that raises changes nothing), then releases the GIL and updates in
parallel. ``optirs.torch`` (imported separately) wraps the same core for ``torch.Tensor``.
"""

from __future__ import annotations

import copy
import math
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from typing import Any, ClassVar

import numpy as np

from . import _adafactor, _core, _eightbit, _spec
from ._core import get_num_threads, set_num_threads, set_simd_level, simd_level, simd_levels
from ._plan import GroupsSnapshot, StepOptions, fork_safe
from ._spec import manual_seed

#: This optirs's version (as ``pip show optirs`` gives it).
__version__: str = _core.__version__

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
    "Lion",
    "NAdam",
    "Optimizer",
    "ParamState",
    "RAdam",
    "RMSprop",
    "Rprop",
    "__version__",
    "get_num_threads",
    "manual_seed",
    "set_num_threads",
    "set_simd_level",
    "simd_level",
    "simd_levels",
]

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_EMPTY: Mapping[str, Any] = {}
#: How a step reads the gradients when no clip coefficient applies.
_NO_FACTOR: Mapping[str, Any] = {"grad_unscale": None, "grad_coef": None}
#: The optimizer's own options and counters, with their defaults: kept by load_state_dict,
#: carried by pickle and deepcopy.
_OWN_ATTRIBUTES: Mapping[str, Any] = {
    "skip_nonfinite": False,
    "flush_denormals": False,
    "skipped_steps": 0,
    "last_step_skipped": False,
}


def _bfloat16() -> np.dtype | None:
    """``ml_dtypes.bfloat16`` once the program has imported ``ml_dtypes`` (optional: NumPy
    has no bfloat16 of its own; ``pip install optirs[bfloat16]``)."""
    ml = sys.modules.get("ml_dtypes")
    return None if ml is None else np.dtype(ml.bfloat16)


def _is_float(dtype: np.dtype) -> bool:
    """The dtypes the NumPy API updates: float32, float64 and ml_dtypes' bfloat16."""
    return dtype in _FLOAT_DTYPES or dtype == _bfloat16()


class _Required:
    """Marks a hyperparameter every param group must give (torch's ``required``)."""

    def __repr__(self) -> str:
        return "<required parameter>"


required = _Required()


class _Entry(dict):
    """One parameter's state dict. Rebinding or removing a key bumps its owner's version, so a
    step never keeps updating an array the state no longer holds."""

    __slots__ = ("_owner",)

    def __init__(self, owner: ParamState, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._owner = owner

    def _touch(self) -> None:
        self._owner._version += 1

    def __setitem__(self, key: str, value: Any) -> None:
        self._touch()
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        self._touch()
        super().__delitem__(key)

    def pop(self, *args: Any) -> Any:
        self._touch()
        return super().pop(*args)

    def popitem(self) -> tuple[str, Any]:
        self._touch()
        return super().popitem()

    def clear(self) -> None:
        self._touch()
        super().clear()

    def update(self, *args: Any, **kwargs: Any) -> None:
        self._touch()
        super().update(*args, **kwargs)

    def setdefault(self, key: str, default: Any = None) -> Any:
        self._touch()
        return super().setdefault(key, default)

    def __ior__(self, other: Any) -> _Entry:  # type: ignore[override,misc]
        self.update(other)
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled and copied as a plain dict; ParamState wraps it again.
        return (dict, (dict(self),))


class ParamState(MutableMapping):
    """``opt.state``: each parameter's state dict, keyed by the parameter array itself.

    ndarrays are not hashable, so lookups go by identity: ``opt.state[w]`` is the state of that
    very array object (a view or copy of it has none).
    """

    def __init__(self) -> None:
        self._items: dict[int, tuple[np.ndarray, _Entry]] = {}
        #: bumped by every change, so cached step plans know when to look again
        self._version = 0

    def __getitem__(self, param: np.ndarray) -> dict[str, Any]:
        try:
            return self._items[id(param)][1]
        except KeyError:
            raise KeyError("this array has no optimizer state (it has not been stepped)") from None

    def __setitem__(self, param: np.ndarray, value: Mapping[str, Any]) -> None:
        self._version += 1
        self._items[id(param)] = (param, _Entry(self, value))

    def __delitem__(self, param: np.ndarray) -> None:
        self._version += 1
        del self._items[id(param)]

    def __contains__(self, param: object) -> bool:
        return id(param) in self._items

    def __iter__(self) -> Iterator[np.ndarray]:
        return (p for p, _ in self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def get(self, param: np.ndarray, default: Any = None) -> Any:
        """The state of ``param``, or ``default`` when it has none.

        Args:
            param: a parameter array (looked up by identity, not by value).
            default: what to return when ``param`` has no state.
        """
        item = self._items.get(id(param))
        return default if item is None else item[1]

    def __repr__(self) -> str:
        return f"ParamState({len(self)} parameters)"

    # Keys are object ids, which change across pickling: store pairs, rebuild the ids.
    def __getstate__(self) -> list[tuple[np.ndarray, dict[str, Any]]]:
        return [(p, dict(s)) for p, s in self._items.values()]

    def __setstate__(self, pairs: list[tuple[np.ndarray, dict[str, Any]]]) -> None:
        self._version = 0
        self._items = {id(p): (p, _Entry(self, s)) for p, s in pairs}


class _Plan:
    """The flat argument lists of ``_core.step``, kept from one step to the next.

    Building them walks every parameter and its state in Python; reusing them costs one
    identity comparison per parameter. ``fits`` says whether anything they were built from has
    changed since.
    """

    __slots__ = (
        "buffers",
        "core",
        "fresh",
        "groups",
        "missing",
        "params",
        "state",
        "steps",
        "version",
    )

    def __init__(self, opt: Optimizer, groups: list[dict[str, Any]]) -> None:
        spec = opt._spec
        names = spec.entries
        state = opt.state
        self.state = state
        self.version = state._version
        self.groups = GroupsSnapshot(spec, groups)
        self.params = self.groups.params
        self.buffers: list[Any] = []
        self.steps: list[Any] = []
        #: flat indices of parameters whose state is not complete yet
        self.missing: list[int] = []
        for ps, need, group in zip(self.groups.members, self.groups.needs, groups):
            required = [n for n, want in zip(spec.buffers, need) if want]
            required.extend(spec.scalar_names)
            if spec.counts_steps:
                required.append("step")
            for p in ps:
                entry = state.get(p, _EMPTY)
                master = _spec.wants_master(group, _is_16_bit(p))
                if any(entry.get(n) is None for n in required) or (
                    master and entry.get(_spec.MASTER) is None
                ):
                    self.missing.append(len(self.buffers))
                    self.buffers.append(None)
                    self.steps.append(None)
                else:
                    # The master copy, where kept, follows the buffers and scalars.
                    self.buffers.append((*map(entry.get, names), entry.get(_spec.MASTER)))
                    self.steps.append(entry.get("step"))
        self.fresh = [False] * len(self.params)
        #: the core's plan of these lists (``_core.ArrayPlan``), made by the first full step
        self.core: _core.ArrayPlan | None = None

    def step(
        self, groups: list[dict[str, Any]], grads: list[Any], options: StepOptions
    ) -> bool | None:
        """The core plan's step: whether it was applied, or None (nothing written) when the
        full step must run, because there is no core plan yet or something it relies on
        changed."""
        if self.core is None:
            return None
        return self.core.step(groups, grads, **options)

    def fits(self, opt: Optimizer, groups: list[dict[str, Any]], grads: list[Any]) -> bool:
        """True when the lists still describe ``groups`` and the state, and no parameter
        whose state is incomplete has a gradient this step."""
        if opt.state is not self.state or self.state._version != self.version:
            return False
        if not self.groups.unchanged(opt._spec, groups):
            return False
        return all(grads[i] is None for i in self.missing)


def _check_param(p: Any) -> np.ndarray:
    if not isinstance(p, np.ndarray):
        raise TypeError(f"optimizer can only optimize ndarrays, but one of the params is {_tn(p)}")
    if not _is_float(p.dtype):
        raise TypeError(
            "optimizer can only optimize float32, float64 and bfloat16 (ml_dtypes) "
            f"arrays, but one of the params has dtype {p.dtype}"
        )
    if not p.flags.c_contiguous:
        raise ValueError(
            "optimizer parameters must be C-contiguous arrays (use np.ascontiguousarray)"
        )
    if not p.flags.aligned:
        raise ValueError(
            "optimizer parameters must be aligned to their dtype; pass "
            "np.require(x, requirements='CA')"
        )
    if not p.flags.writeable:
        raise ValueError("optimizer parameters must be writeable arrays, got a read-only one")
    return p


def _tn(x: Any) -> str:
    t = type(x)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


class Optimizer:
    """Base class of the NumPy optimizers: param groups, state, ``step`` and state dicts.

    Subclasses set ``_spec`` (the optimizer's declaration in ``optirs._spec``) and pass their
    defaults; each optimizer's constructor is made from its declaration (``_numpy_init``).

    Args:
        params: the arrays to update in place (C-contiguous, writeable ndarrays of float32,
            float64 or ``ml_dtypes.bfloat16``), or param groups: dicts with ``params`` and
            any hyperparameters of their own.
        defaults: every hyperparameter's value for groups that do not give their own.
        skip_nonfinite: skip a whole step, changing nothing, when any gradient holds NaN or
            infinity (counted in ``skipped_steps``).
        flush_denormals: flush denormal numbers to zero while a step runs (x86-64).
    """

    _spec: ClassVar[_spec.Spec]

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        *,
        skip_nonfinite: bool = False,
        flush_denormals: bool = False,
    ) -> None:
        self.defaults = defaults
        self.state = ParamState()
        self.param_groups: list[dict[str, Any]] = []
        #: skip a whole step, changing nothing, when any gradient holds NaN or infinity
        self.skip_nonfinite = bool(skip_nonfinite)
        #: flush denormals to zero while a step runs (x86-64; changes results slightly)
        self.flush_denormals = bool(flush_denormals)
        #: steps skipped because of a non-finite gradient (with ``skip_nonfinite``)
        self.skipped_steps = 0
        #: whether the last ``step()`` was skipped
        self.last_step_skipped = False
        self._plan: _Plan | None = None
        self._lock = threading.Lock()
        fork_safe(self)
        if isinstance(params, np.ndarray):
            raise TypeError(
                "params argument given to the optimizer should be an iterable of ndarrays or "
                f"dicts, but got {_tn(params)}"
            )
        if isinstance(params, (set, frozenset)):
            raise TypeError(
                "optimizer parameters need to be organized in ordered collections, but the "
                "ordering of tensors in sets will change between runs. Please use a list instead."
            )
        try:
            param_groups = list(params)
        except TypeError:
            raise TypeError(
                "params argument given to the optimizer should be an iterable of ndarrays or "
                f"dicts, but got {_tn(params)}"
            ) from None
        if len(param_groups) == 0:
            raise ValueError("optimizer got an empty parameter list")
        if not isinstance(param_groups[0], dict):
            param_groups = [{"params": param_groups}]
        for group in param_groups:
            self.add_param_group(group)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_lock"], state["_plan"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A pickle from before an option existed gets the constructor's default for it.
        self.__dict__.update({**_OWN_ATTRIBUTES, **state})
        self._lock = threading.Lock()
        self._plan = None
        fork_safe(self)

    def _after_fork(self) -> None:
        # In a forked child: the parent's lock may have been held by a thread the child lacks.
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            for key in sorted(k for k in group if k != "params"):
                lines.append(f"    {key}: {group[key]}")
        lines.append(")")
        return "\n".join(lines)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a group of parameters with its own hyperparameters (defaults fill the rest).

        Raises TypeError/ValueError, changing nothing, for a group torch would refuse, a
        parameter that is not a float32/float64 C-contiguous writeable ndarray, or a parameter
        that is already in this optimizer.

        Args:
            param_group: a dict with ``params`` (an ndarray or a list of them) and any
                hyperparameters of the group's own.
        """
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {_tn(param_group)}")
        params = param_group.get("params")
        if isinstance(params, np.ndarray):
            params = [params]
        elif isinstance(params, (set, frozenset)):
            raise TypeError(
                "optimizer parameters need to be organized in ordered collections, but the "
                "ordering of tensors in sets will change between runs. Please use a list instead."
            )
        elif params is None:
            raise ValueError("param_group must have a 'params' entry")
        else:
            params = list(params)
        params = [_check_param(p) for p in params]
        group = dict(param_group)
        group["params"] = params
        for name, default in self.defaults.items():
            if default is required and name not in group:
                raise ValueError(
                    "parameter group didn't specify a value of required optimization "
                    f"parameter {name}"
                )
            group.setdefault(name, default)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        self._spec.validate(group)
        group["state_dtype"] = _checked_state_dtype(group.get("state_dtype"), params)
        _spec.check_rounding_group(group, "param_group")
        ids = {id(p) for p in params}
        if len(ids) != len(params):
            raise ValueError("optimizer contains a parameter group with duplicate parameters")
        existing = {id(p) for g in self.param_groups for p in g["params"]}
        if not existing.isdisjoint(ids):
            raise ValueError("some parameters appear in more than one parameter group")
        self.param_groups.append(group)
        self._init_group_state(group)

    def _init_group_state(self, group: dict[str, Any]) -> None:
        """State made when a group is added, for an optimizer whose torch constructor makes it
        (Adagrad): every entry, ``step`` first, in torch's order."""
        spec = self._spec
        if not spec.state_at_construction:
            return
        missing = spec.missing(group, _EMPTY)
        missing.sort(key=lambda n: n != "step")
        for p in group["params"]:
            if p not in self.state:
                self.state[p] = self._new_state(p, group, missing)

    def _new_state(
        self, p: np.ndarray, group: Mapping[str, Any], missing: Iterable[str]
    ) -> dict[str, Any]:
        """The state entries ``missing`` names, for ``p`` (``Spec.new_state``, in NumPy)."""
        dtype = _state_dtype(p, group)
        out = self._spec.new_state(
            missing,
            group,
            lambda x: np.full(np.shape(p), x, dtype=dtype),
            lambda: np.zeros((), np.float32),
            scalar=lambda x: np.array(x, np.float32),
        )
        if _spec.MASTER in missing:
            # The parameter's value, exactly (every 16-bit value is a float32).
            out[_spec.MASTER] = np.array(p, dtype=np.float32, order="C", copy=True)
        return out

    def step(self, grads: Iterable[Any]) -> None:
        """Updates every parameter in place from its gradient.

        ``grads`` holds one entry per parameter, in ``param_groups`` order (flattened across
        groups): an ndarray of the parameter's shape and dtype, or ``None`` to leave that
        parameter and its state alone this step. Hyperparameters changed in ``param_groups``
        since the last step are validated first, with torch.optim's constructor checks. On any
        error (TypeError/ValueError naming the offending array; RuntimeError, as torch.optim's
        step raises, for a value out of float32's range with float32 arrays, e.g.
        ``lr=1e300``) no parameter or state is modified.

        Steps of one optimizer are serialised: two threads stepping it take turns. With
        ``skip_nonfinite``, a step whose gradients hold NaN or infinity changes nothing and
        counts in ``skipped_steps``.

        Args:
            grads: one gradient (or ``None``) per parameter, in ``param_groups`` order.
        """
        coef = self.__dict__.pop("_clip_coef", None)
        with self._lock:
            if coef is not None and coef != 1.0:
                self.__dict__["_factor"] = {"grad_unscale": None, "grad_coef": coef}
            try:
                applied = self._step(grads)
            except BaseException:
                # Nothing was modified: the coefficient waits for the step that succeeds.
                if coef is not None:
                    self.__dict__.setdefault("_clip_coef", coef)
                raise
            finally:
                self.__dict__.pop("_factor", None)
        self.last_step_skipped = not applied
        if not applied:
            self.skipped_steps += 1

    def _options(self) -> StepOptions:
        return {
            "skip_nonfinite": self.skip_nonfinite,
            "flush_denormals": self.flush_denormals,
            **self.__dict__.get("_factor", _NO_FACTOR),  # type: ignore[typeddict-item]
        }

    def clip_grad_norm_(
        self,
        grads: Iterable[Any],
        max_norm: float,
        norm_type: float = 2.0,
        error_if_nonfinite: bool = False,
    ) -> float:
        """Clips the gradients of the next ``step`` inside it: returns the total norm of
        ``grads`` (as a Python float) as ``torch.nn.utils.clip_grad_norm_`` computes it, and
        the next ``step`` reads each gradient multiplied by ``min(max_norm / (norm + 1e-6), 1)``
        (computed in the gradients' promoted dtype, the product rounded to the gradient's
        dtype): the step after torch's ``clip_grad_norm_``, without writing the gradients.

        Args:
            grads: the gradients the next ``step`` gets (``None`` entries are skipped), as
                C-contiguous arrays of float32, float64, float16 or bfloat16.
            max_norm: the largest total norm kept.
            norm_type: the order of the norm (``torch.linalg.vector_norm``'s ``ord``;
                ``float('inf')`` for the largest absolute value).
            error_if_nonfinite: raise ``RuntimeError`` (torch's message), recording nothing,
                when the total norm is NaN or infinite.

        One native, parallel pass reads the gradients; they are not modified. The coefficient
        applies to the next ``step`` only (applied or skipped; a step that raises, having
        changed nothing, keeps it for the next), whatever gradients it is given; another call
        before it replaces the coefficient.
        """
        if grads is None or isinstance(grads, np.ndarray):
            raise TypeError(f"grads must be a sequence of gradients, got {_tn(grads)}")
        norm_type = float(norm_type)
        arrays = [g for g in grads if g is not None]
        norm, _dtype, coef = _core.grad_norm(arrays, norm_type, float(max_norm))
        if error_if_nonfinite and not math.isfinite(norm):
            raise RuntimeError(
                f"The total norm of order {norm_type} for gradients from "
                "`parameters` is non-finite, so it cannot be clipped. To disable "
                "this error and scale the gradients by the non-finite norm anyway, "
                "set `error_if_nonfinite=False`"
            )
        self.__dict__["_clip_coef"] = coef
        return float(norm)

    def _step(self, grads: Iterable[Any]) -> bool:
        grads = _spec.step_grads(grads, _tn)
        spec = self._spec
        groups = self.param_groups
        for group in groups:
            spec.validate(group)
        plan = self._plan
        if plan is None or len(grads) != len(plan.params) or not plan.fits(self, groups, grads):
            plan = self._plan = _Plan(self, groups)
            _spec.check_grad_count(len(grads), len(plan.params))
            if any(grads[i] is not None for i in plan.missing):
                return self._step_creating_state(groups, plan, grads)
        options = self._options()
        applied = plan.step(groups, grads, options)
        if applied is not None:
            return applied
        # The full step: every array checked (and the precise error if one does not fit),
        # and a plan that makes the next steps checks of what may have changed.
        applied, plan.core = _core.step(
            spec.kind,
            groups,
            plan.params,
            grads,
            plan.buffers,
            plan.steps,
            plan.fresh,
            plan=True,
            **options,
        )
        return applied

    def _step_creating_state(
        self, groups: list[dict[str, Any]], plan: _Plan, grads: list[Any]
    ) -> bool:
        """A step in which some parameters get their first state: it is made aside and kept
        only when the step succeeds."""
        spec = self._spec
        names = spec.entries
        buffers = list(plan.buffers)
        steps = list(plan.steps)
        fresh = list(plan.fresh)
        created: list[tuple[np.ndarray, dict[str, Any]]] = []
        owners = plan.groups.owners
        for i in plan.missing:
            if grads[i] is None:
                continue
            p, group = plan.params[i], owners[i]
            state = dict(self.state.get(p, _EMPTY))
            master = _spec.wants_master(group, _is_16_bit(p))
            missing = spec.missing(group, state, none_step=False, master=master)
            if not missing:
                continue
            state.update(self._new_state(p, group, missing))
            created.append((p, state))
            buffers[i] = (*(state.get(n) for n in names), state.get(_spec.MASTER))
            steps[i] = state.get("step")
            fresh[i] = spec.fresh(missing)
        # The core keeps the new state itself (`commit`) once the update is applied, before it
        # returns, so that an interrupt cannot land between the two.
        applied = _core.step(
            spec.kind,
            groups,
            plan.params,
            grads,
            buffers,
            steps,
            fresh,
            commit=[(self.state, p, state) for p, state in created],
            **self._options(),
        )
        if applied:
            self._plan = None
        return applied

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state in torch's layout, as copies.

        ``{"state": {index: {name: value}}, "param_groups": [{..., "params": [index, ...]}]}``,
        with parameters numbered in order across groups.
        """
        index: dict[int, int] = {}
        packed_groups = []
        for group in self.param_groups:
            packed = {k: copy.deepcopy(v) for k, v in group.items() if k != "params"}
            packed["params"] = []
            for p in group["params"]:
                index.setdefault(id(p), len(index))
                packed["params"].append(index[id(p)])
            packed_groups.append(packed)
        state = {}
        for p, s in self.state.items():
            if id(p) in index:
                state[index[id(p)]] = {k: _copy_value(v) for k, v in s.items()}
        return {"state": dict(sorted(state.items())), "param_groups": packed_groups}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restores a ``state_dict()`` (this optimizer's, or a torch.optim one's, by position).

        Floating state is cast to each parameter's dtype and copied, as torch does. A dict that
        does not fit (group count or sizes, unknown or missing state, wrong shapes or dtypes,
        invalid hyperparameters) raises ValueError or TypeError and changes nothing. The
        optimizer's own options (``skip_nonfinite``, ``flush_denormals``) and
        ``skipped_steps`` are not part of a state dict, and are kept.

        Args:
            state_dict: ``{"state": {index: {name: array}}, "param_groups": [{...,
                "params": [index, ...]}]}``, torch's layout.
        """
        groups = self.param_groups
        saved_groups, saved_state = _spec.loaded_parts(state_dict, groups, _tn)

        spec = self._spec
        new_groups: list[dict[str, Any]] = []
        by_index: dict[Any, tuple[np.ndarray, dict[str, Any]]] = {}
        for gi, (group, saved) in enumerate(zip(groups, saved_groups)):
            new = {k: copy.deepcopy(v) for k, v in saved.items() if k != "params"}
            # A state dict without it (torch.optim's, an older optirs's) keeps the group's own:
            # its float32 state is converted to the dtype this optimizer keeps.
            new.setdefault("state_dtype", group.get("state_dtype"))
            new["state_dtype"] = _checked_state_dtype(new["state_dtype"], group["params"])
            # Likewise the rounding options.
            _spec.complete_loaded_group(new, group, self.defaults, gi)
            if isinstance(new.get("betas"), list):
                new["betas"] = tuple(new["betas"])
            new["params"] = group["params"]
            spec.validate(new)
            new_groups.append(new)
            for i, p in zip(saved["params"], group["params"]):
                by_index[i] = (p, new)

        new_state = ParamState()
        known = {*spec.keys, _spec.MASTER}
        for i, saved in saved_state.items():
            if i not in by_index:
                raise ValueError(f"loaded state dict has state for unknown parameter index {i!r}")
            p, group = by_index[i]
            where = f"loaded state[{i!r}]"
            if not isinstance(saved, Mapping):
                raise TypeError(f"{where} must be a mapping, got {_tn(saved)}")
            unknown = sorted(set(saved) - known, key=str)
            if unknown:
                raise ValueError(
                    f"{where} has unexpected entries {unknown}; {type(self).__name__} keeps "
                    f"{sorted(known)}"
                )
            entry: dict[str, Any] = {}
            for name, value in saved.items():
                if name == "step":
                    entry[name] = _load_step(value, where)
                elif name in spec.scalar_names:
                    entry[name] = _load_scalar(value, p, f"{where}['{name}']")
                elif name == _spec.MASTER:
                    entry[name] = _load_buffer(value, p, f"{where}['{name}']", np.dtype(np.float32))
                elif value is not None or name != "momentum_buffer":
                    entry[name] = _load_buffer(
                        value, p, f"{where}['{name}']", _state_dtype(p, group)
                    )
            # A buffer the kernel makes from the next gradient may be absent, as in torch.
            missing = spec.incomplete(spec.missing(group, entry))
            if entry and missing:
                raise ValueError(f"{where} is missing {missing}")
            new_state[p] = entry
        self.param_groups = new_groups
        self.state = new_state
        self._plan = None


def _copy_value(v: Any) -> Any:
    return v.copy() if isinstance(v, np.ndarray) else copy.deepcopy(v)


def _load_step(value: Any, where: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim != 0 or arr.dtype.kind not in "iuf":
        raise TypeError(
            f"{where}['step'] must be a real number or 0-d array, got {_tn(value)}"
            + (
                f" of shape {arr.shape} and dtype {arr.dtype}"
                if isinstance(value, np.ndarray)
                else ""
            )
        )
    return np.array(_spec.check_step_value(arr, f"{where}['step']"), dtype=np.float32)


def _load_scalar(value: Any, p: np.ndarray, where: str) -> np.ndarray:
    # torch's load_state_dict casts every floating state value but ``step`` to the parameter's
    # dtype, a 0-d one too (exact from float32); the update then rounds it in that dtype.
    arr = np.asarray(value)
    if arr.ndim != 0 or arr.dtype.kind not in "iuf":
        raise TypeError(
            f"{where} must be a real number or 0-d array, got {_tn(value)}"
            + (f" of shape {arr.shape}" if isinstance(value, np.ndarray) else "")
        )
    return np.array(arr, dtype=p.dtype)


def _load_buffer(value: Any, p: np.ndarray, where: str, dtype: np.dtype) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except Exception as e:
        raise TypeError(f"{where} must be an array, got {_tn(value)}") from e
    if arr.dtype.kind != "f" and not _is_float(arr.dtype):
        raise TypeError(f"{where} must be a floating-point array, got dtype {arr.dtype}")
    if arr.shape != p.shape:
        raise ValueError(f"{where} has shape {arr.shape}, but its parameter has shape {p.shape}")
    # Cast to the parameter's dtype (or the group's state_dtype) and copy, as torch's
    # load_state_dict casts to the parameter's: bfloat16 state saved and loaded again comes back
    # bit for bit; float32 state loaded into bfloat16 is rounded to nearest even.
    return np.array(arr, dtype=dtype, order="C", copy=True)


def _ml_bfloat16() -> np.dtype:
    """``ml_dtypes.bfloat16``, imported on first use: NumPy's only bfloat16."""
    try:
        import ml_dtypes
    except ImportError:
        raise ValueError(
            "state_dtype='bfloat16' in the NumPy API keeps its state as ml_dtypes.bfloat16 "
            "arrays: install ml_dtypes (pip install optirs[bfloat16])"
        ) from None
    return np.dtype(ml_dtypes.bfloat16)


def _checked_state_dtype(value: Any, params: Iterable[np.ndarray]) -> str | None:
    """A group's ``state_dtype``, normalised; bfloat16 state is refused for float64
    parameters (it is computed in float32, which would lose their precision)."""
    name = _spec.state_dtype_name(value)
    if name is not None:
        _ml_bfloat16()
        if any(p.dtype == np.float64 for p in params):
            raise ValueError(
                "state_dtype='bfloat16' is for float32 and bfloat16 parameters; a float64 "
                "parameter keeps float64 state (put it in a group with state_dtype=None)"
            )
    return name


def _is_16_bit(p: Any) -> bool:
    """float16 or bfloat16: a parameter that keeps a master copy under ``master_weights``."""
    return bool(np.asarray(p).dtype.itemsize == 2)


def _state_dtype(p: np.ndarray, group: Mapping[str, Any]) -> np.dtype:
    """The dtype ``p``'s state buffers are kept in under ``group``. ``p`` may be anything a
    user put in a group: the core refuses what is not a parameter, after this."""
    dtype = np.asarray(p).dtype
    if group.get("state_dtype") is None or dtype == np.float64:
        return dtype
    return _ml_bfloat16()


def _numpy_init(spec: _spec.Spec) -> Callable[..., None]:
    """The constructor of ``spec``'s optimizer: torch.optim's arguments (without torch's
    implementation switches), checked with torch's constructor checks, then optirs's options."""
    convert = {p.name: p.convert for p in spec.numpy_params if p.convert is not None}

    def construct(self: Optimizer, params: Iterable[Any], values: dict[str, Any]) -> None:
        skip_nonfinite = values.pop("skip_nonfinite")
        flush_denormals = values.pop("flush_denormals")
        for name, f in convert.items():
            values[name] = f(values[name])
        values["state_dtype"] = _spec.state_dtype_name(values["state_dtype"])
        values.update(
            _spec.rounding_entries(
                values.pop("bf16_stochastic_round"),
                values.pop("master_weights"),
                values.pop("seed"),
                default_base=0,
            )
        )
        defaults = {**values, **spec.fixed}
        spec.validate(defaults)
        Optimizer.__init__(
            self,
            params,
            defaults,
            skip_nonfinite=skip_nonfinite,
            flush_denormals=flush_denormals,
        )

    doc = (
        f"Takes torch.optim.{spec.name}'s arguments, defaults and checks (TypeError/ValueError "
        "in torch's words; the NumPy API applies them again at every step, to values changed "
        "in ``param_groups``), without torch's implementation switches, then optirs's own "
        "keyword-only options."
    )
    return _spec.make_init(spec.name, __name__, spec.numpy_params, construct, doc, api="numpy")


class SGD(Optimizer):
    """Stochastic gradient descent, with optional momentum, dampening, Nesterov momentum and
    weight decay: ``torch.optim.SGD``'s update over NumPy arrays.

    State: ``momentum_buffer`` (when momentum != 0), set to the first gradient on the first step.
    """

    _spec = _spec.SGD
    __init__ = _numpy_init(_spec)


class Adam(Optimizer):
    """Adam (and, with ``decoupled_weight_decay=True``, AdamW), optionally AMSGrad:
    ``torch.optim.Adam``'s update over NumPy arrays.

    State: ``step`` (0-d float32), ``exp_avg``, ``exp_avg_sq`` and, with amsgrad,
    ``max_exp_avg_sq``.
    """

    _spec = _spec.ADAM
    __init__ = _numpy_init(_spec)


class AdamW(Adam):
    """Adam with decoupled weight decay (``p *= 1 - lr * weight_decay`` before the Adam update):
    ``torch.optim.AdamW``'s update over NumPy arrays. Default ``weight_decay`` is 1e-2.
    """

    _spec = _spec.ADAMW
    __init__ = _numpy_init(_spec)


#: Adam and AdamW with 8-bit state (blockwise dynamic quantization; see ``optirs._eightbit``).
Adam8bit, AdamW8bit = _eightbit.make_numpy_classes(Optimizer)


class RMSprop(Optimizer):
    """RMSprop, optionally centered and with momentum: ``torch.optim.RMSprop``'s update over
    NumPy arrays.

    State: ``step`` (0-d float32), ``square_avg``, ``momentum_buffer`` (momentum > 0) and
    ``grad_avg`` (centered).
    """

    _spec = _spec.RMSPROP
    __init__ = _numpy_init(_spec)


class Adagrad(Optimizer):
    """Adagrad with learning-rate decay: ``torch.optim.Adagrad``'s (dense) update over NumPy
    arrays.

    State, created at construction as torch does: ``step`` (0-d float32) and ``sum`` (filled
    with ``initial_accumulator_value``).
    """

    _spec = _spec.ADAGRAD
    __init__ = _numpy_init(_spec)


class Adadelta(Optimizer):
    """Adadelta: ``torch.optim.Adadelta``'s update over NumPy arrays.

    State: ``step`` (0-d float32), ``square_avg`` and ``acc_delta``.
    """

    _spec = _spec.ADADELTA
    __init__ = _numpy_init(_spec)


class RAdam(Optimizer):
    """RAdam (rectified Adam; with ``decoupled_weight_decay=True`` the parameter is decayed
    instead of the gradient): ``torch.optim.RAdam``'s update over NumPy arrays, rectified where
    the SMA length exceeds 5.

    State: ``step`` (0-d float32), ``exp_avg`` and ``exp_avg_sq``.
    """

    _spec = _spec.RADAM
    __init__ = _numpy_init(_spec)


class Rprop(Optimizer):
    """Rprop (resilient backpropagation, sign-based per-element step sizes):
    ``torch.optim.Rprop``'s update over NumPy arrays.

    State: ``step`` (0-d float32), ``prev`` (the last gradient used) and ``step_size`` (per
    element, starting at the group's ``lr``).
    """

    _spec = _spec.RPROP
    __init__ = _numpy_init(_spec)


class Lion(Optimizer):
    """Lion (Chen et al. 2023), as lion-pytorch computes it: ``p *= 1 - lr * weight_decay``;
    ``p -= lr * sign(beta1 * m + (1 - beta1) * g)``; ``m = beta2 * m + (1 - beta2) * g``.
    ``maximize`` negates the gradient first. ``sign`` is ``torch.sign``'s (0 for 0 and NaN).

    Args: ``params``; ``lr`` (1e-4, >= 0); ``betas`` ((0.9, 0.99), each in [0, 1]);
    ``weight_decay`` (0.0, >= 0); ``maximize`` (False).

    State: ``exp_avg`` (no step counter).
    """

    _spec = _spec.LION
    __init__ = _numpy_init(_spec)


class Adamax(Optimizer):
    """Adamax (Adam with an infinity norm), with weight decay and maximize:
    ``torch.optim.Adamax``'s update over NumPy arrays.

    State: ``step`` (0-d float32), ``exp_avg`` and ``exp_inf``.
    """

    _spec = _spec.ADAMAX
    __init__ = _numpy_init(_spec)


class NAdam(Optimizer):
    """NAdam (Adam with Nesterov momentum and a momentum decay schedule), with L2 or decoupled
    weight decay and maximize: ``torch.optim.NAdam``'s update over NumPy arrays.

    State: ``step`` and ``mu_product`` (0-d float32), ``exp_avg`` and ``exp_avg_sq``.
    """

    _spec = _spec.NADAM
    __init__ = _numpy_init(_spec)


class ASGD(Optimizer):
    """Averaged SGD, with weight decay and maximize: ``torch.optim.ASGD``'s update over NumPy
    arrays.

    State: ``step``, ``eta`` and ``mu`` (0-d float32) and ``ax`` (the averaged parameter).
    """

    _spec = _spec.ASGD
    __init__ = _numpy_init(_spec)


#: Adafactor: row and column factors of the second moment, its own step in the core (see
#: ``optirs._adafactor``).
Adafactor = _adafactor.make_numpy_class(Optimizer, _load_step, _load_buffer)
