"""The torch bridge's optimizers: torch.optim subclasses whose ``step`` runs optirs's core.

``_Bridge`` is the shared ``step`` (a full step that checks every tensor and makes missing state,
then ``_Plan``, the core's cached step); each class adds its torch constructor's refusals. The
package's ``__init__`` documents and re-exports them as ``optirs.torch.X``.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import numpy as np
import torch
from torch.autograd.graph import increment_version
from torch.optim.optimizer import _get_scalar_dtype

from .. import _adafactor, _core, _eightbit, _spec
from .._plan import GroupsSnapshot, StepOptions, fork_safe
from . import _clip, _dtensor, _flat, _hooks

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
    "RAdam",
    "RMSprop",
    "Rprop",
]

#: How a step reads the gradients when neither a clip coefficient nor GradScaler applies.
_NO_FACTOR = {"grad_unscale": None, "grad_coef": None}

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# DLPack's C exchange API (torch 2.10 and later): the plan reads a tensor's data pointer, dtype,
# shape and strides through it in one C call instead of several Python calls. None on older
# torch, where the plan asks the tensors' Python methods.
_EXCHANGE_API = getattr(torch.Tensor, "__dlpack_c_exchange_api__", None)


#: The bridge's own attributes and their defaults: what torch's pickling, deepcopy and
#: load_state_dict do not know about (see ``_Bridge.__getstate__``).
_OWN_ATTRIBUTES: dict[str, Any] = {
    "skip_nonfinite": False,
    "flush_denormals": False,
    "skipped_steps": 0,
    "last_step_skipped": False,
}


def _refuse(name: str, **options: bool) -> None:
    for option, value in options.items():
        if value:
            raise ValueError(
                f"optirs.torch.{name} does not support {option}=True: it steps outside "
                f"autograd and CUDA graphs; use torch.optim.{name} for that"
            )


class _Bridge:
    """The ``step`` shared by every optirs.torch optimizer (mixed in before the torch class)."""

    _spec: ClassVar[_spec.Spec]
    state: Any
    param_groups: list[dict[str, Any]]
    defaults: dict[str, Any]

    def _after_init(self, skip_nonfinite: bool, flush_denormals: bool) -> None:
        # torch's GradScaler hands grad_scale/found_inf to optimizers that claim AMP support
        # (as to torch's fused ones): step() skips on found_inf and unscales as it reads.
        self._step_supports_amp_scaling = True
        #: skip a whole step, changing nothing, when any gradient holds NaN or infinity
        self.skip_nonfinite = bool(skip_nonfinite)
        #: flush denormals to zero while a step runs (x86-64; changes results slightly)
        self.flush_denormals = bool(flush_denormals)
        #: steps skipped because of a non-finite gradient (with ``skip_nonfinite``)
        self.skipped_steps = 0
        #: whether the last ``step()`` was skipped
        self.last_step_skipped = False

    def __getstate__(self) -> dict[str, Any]:
        """torch's pickled state (defaults, state, param_groups) and the bridge's options and
        skipped-step count, so that ``pickle`` and ``copy.deepcopy`` carry them."""
        state: dict[str, Any] = super().__getstate__()  # type: ignore[misc,assignment]
        state.update({name: getattr(self, name, d) for name, d in _OWN_ATTRIBUTES.items()})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restores ``state``; the bridge's attributes it lacks keep their values.

        torch's ``load_state_dict`` ends by calling this with only ``state`` and
        ``param_groups``: the optimizer keeps its own options and count. An object unpickled
        from a pickle without them (an older optirs) gets the constructor's defaults.
        """
        super().__setstate__(state)  # type: ignore[misc]
        # As in _after_init.
        self._step_supports_amp_scaling = True
        for name, default in _OWN_ATTRIBUTES.items():
            if name not in self.__dict__:
                setattr(self, name, default)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch.optim's ``load_state_dict``, then each parameter's state buffers kept in its
        group's ``state_dtype``.

        torch casts floating state to the parameter's dtype; bfloat16 state comes back bit for
        bit from there. A state dict without ``state_dtype`` (torch.optim's) keeps each
        group's own, so float32 state loaded into a bfloat16-state optimizer is rounded to
        nearest even. The way back: ``torch.optim.AdamW(...).load_state_dict(
        opt.state_dict())`` casts the bfloat16 state to the parameters' dtype.

        Args:
            state_dict: a state dict of this class or of ``torch.optim``'s of the same name.
        """
        kept = [g.get("state_dtype") for g in self.param_groups]
        kept_rounding = [
            {k: g[k] for k in _spec.ROUNDING_KEYS if k in g} for g in self.param_groups
        ]
        saved = state_dict.get("param_groups", []) if isinstance(state_dict, dict) else []
        if len(saved) == len(kept):
            for gi, (g, own) in enumerate(zip(saved, kept_rounding)):
                if isinstance(g, dict) and "state_dtype" in g:
                    _spec.state_dtype_name(g["state_dtype"])  # refused before anything changes
                if isinstance(g, dict):
                    _spec.check_rounding_group({**own, **g}, f"loaded param_groups[{gi}]")
        masters = _saved_masters(self.param_groups, state_dict)
        super().load_state_dict(state_dict)  # type: ignore[misc]
        for group, sd, own in zip(self.param_groups, kept, kept_rounding):
            if group.setdefault("state_dtype", sd) is None:
                del group["state_dtype"]
            else:
                group["state_dtype"] = _spec.state_dtype_name(group["state_dtype"])
            # A state dict without them (torch.optim's) keeps the optimizer's rounding options.
            for k, v in own.items():
                group.setdefault(k, v)
        # torch cast every floating state tensor to its parameter's dtype: the master copies
        # are float32 again, bit for bit as saved.
        for p, m in masters:
            if p in self.state:
                self.state[p][_spec.MASTER] = m.detach().to(
                    device=p.device, dtype=torch.float32, copy=True
                )
        self._conform_state()
        self._adopt_flat_state()

    def _conform_state(self) -> None:
        """Casts every state buffer to the dtype its group keeps state in (state made by
        torch's constructor, as Adagrad's, or loaded by torch's ``load_state_dict``)."""
        names = self._spec.buffers
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                dtype = _state_dtype(p, group)
                for n in names:
                    b = state.get(n)
                    if isinstance(b, torch.Tensor) and b.is_floating_point() and b.dtype != dtype:
                        state[n] = b.to(dtype)

    def _options(self) -> StepOptions:
        return {
            "skip_nonfinite": getattr(self, "skip_nonfinite", False),
            "flush_denormals": getattr(self, "flush_denormals", False),
            **self.__dict__.get("_optirs_factor", _NO_FACTOR),  # type: ignore[typeddict-item]
        }

    @torch.no_grad()
    def clip_grad_norm_(
        self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False
    ) -> torch.Tensor:
        """Clips this optimizer's gradients inside its next ``step()``: returns their total
        norm as ``torch.nn.utils.clip_grad_norm_`` does (a 0-d tensor of their promoted dtype),
        and the next ``step()`` reads each gradient multiplied by
        ``min(max_norm / (norm + 1e-6), 1)``, rounded to its dtype, exactly as the step after
        ``torch.nn.utils.clip_grad_norm_(params, max_norm)`` would read it.

        Args:
            max_norm: the largest total norm kept.
            norm_type: the order of the norm (``torch.linalg.vector_norm``'s ``ord``;
                ``float('inf')`` for the largest absolute value).
            error_if_nonfinite: raise ``RuntimeError`` (torch's message), recording nothing,
                when the total norm is NaN or infinite.

        One native pass reads the gradients for the norm; the gradients themselves are not
        modified (``p.grad`` keeps its unclipped values), saving the pass that writes them.
        The coefficient applies to the next ``step()`` only (applied or skipped; a step that
        raises, having changed nothing, keeps it for the next); a call before it replaces it,
        and ``zero_grad()`` drops it: gradients accumulated after this call, before the step,
        are read with it too. ``step_parameters`` (step in
        backward) does not use it.
        """
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        total, coef = _clip.total_norm(grads, max_norm, norm_type, error_if_nonfinite)
        self.__dict__["_optirs_clip_coef"] = coef
        return total

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's ``zero_grad``; also drops a coefficient ``clip_grad_norm_`` recorded.
        Parameters made flat by ``flatten_parameters`` keep their gradient views, zeroed (one
        ``zero_()`` per flat gradient buffer), and get them back where user code replaced or
        dropped them: as torch's ``set_to_none=False``.

        Args:
            set_to_none: as torch: set the gradients to None instead of zeroing them (for
                parameters that are not flat).
        """
        self.__dict__.pop("_optirs_clip_coef", None)
        if not self._optirs_has_flat():
            super().zero_grad(set_to_none)  # type: ignore[misc]
            return
        # torch's profiler range, named as its zero_grad names it (`_patch_step_function`).
        if not hasattr(self, "_zero_grad_profile_name"):
            self._patch_step_function()
        with _hooks.ProfilerRange(self._zero_grad_profile_name), _hooks.NoGrad():
            self._zero_flat(set_to_none)

    def _zero_flat(self, set_to_none: bool) -> None:
        flat = self.__dict__.get("_optirs_flat_plan")
        if flat is not None and flat.zero_grad(self, set_to_none):
            return
        # Flat parameters get their gradient view back, zeroed (whatever set_to_none says:
        # dropping the view would make backward allocate a new gradient); the others as torch.
        for group in self.param_groups:
            for p in group["params"]:
                own = _flat.owner(p)
                g = None if own is None else own[0].grad_views[own[1]]
                if g is not None:
                    g.zero_()
                    if p.grad is not g:
                        p.grad = g
                elif p.grad is not None:
                    if set_to_none:
                        p.grad = None
                    else:
                        if p.grad.grad_fn is not None:
                            p.grad.detach_()
                        else:
                            p.grad.requires_grad_(False)
                        p.grad.zero_()

    def _optirs_has_flat(self) -> bool:
        """Whether any of this optimizer's parameters is flat, remembered while the groups'
        parameter lists stay the same (a registry lookup per parameter otherwise)."""
        if not _flat.any_flat():
            return False
        key = [(id(g["params"]), len(g["params"])) for g in self.param_groups]
        cached = self.__dict__.get("_optirs_flat_cache")
        if cached is None or cached[0] != key:
            found = any(_flat.owner(p) is not None for g in self.param_groups for p in g["params"])
            cached = self.__dict__["_optirs_flat_cache"] = (key, found)
        return bool(cached[1])

    def _lock(self) -> threading.Lock:
        # Made on first use: torch's own pickling and deepcopy drop unknown attributes.
        lock = self.__dict__.get("_optirs_lock")
        if lock is None:
            lock = self.__dict__.setdefault("_optirs_lock", threading.Lock())
            fork_safe(self)
        return lock

    def _after_fork(self) -> None:
        # In a forked child: the parent's lock may have been held by a thread the child lacks.
        self.__dict__.pop("_optirs_lock", None)

    def _patch_step_function(self) -> None:
        # torch's, with torch's hooks and profiler range around step() from `_hooks.hooked`
        # instead of `Optimizer.profile_hook_step`: the same calls, cheaper (see _hooks).
        self._zero_grad_profile_name = f"Optimizer.zero_grad#{type(self).__name__}.zero_grad"
        if not getattr(type(self).step, "hooked", None):
            type(self).step = _hooks.hooked(type(self).step)  # type: ignore[method-assign]

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Performs one optimization step; returns the closure's loss, as torch.optim does.

        Every parameter, gradient and state tensor is checked first; on any error nothing is
        modified.

        Args:
            closure: re-evaluates the model and returns the loss (called with gradients
                enabled, before the step), as torch.optim takes it.
        """
        # Without autograd, as torch.optim's steps (`torch.no_grad()`, in two C calls).
        with _hooks.NoGrad():
            return self._step(closure)

    def _step(self, closure: Callable[[], Any] | None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # torch.amp.GradScaler sets these for the duration of step() (we claim
        # `_step_supports_amp_scaling`): found_inf nonzero skips the step, as torch's fused
        # step does; grad_scale (the gradients are still scaled) divides each gradient as the
        # kernel reads it, where torch's fused step also writes the quotient back to p.grad.
        found_inf = getattr(self, "found_inf", None)
        grad_scale = getattr(self, "grad_scale", None)
        coef = self.__dict__.pop("_optirs_clip_coef", None)
        if found_inf is not None and float(found_inf) != 0.0:
            # The scaler's skip, not the optimizer's: `skipped_steps` counts only those of
            # `skip_nonfinite`.
            self.last_step_skipped = True
            return loss
        with self._lock():
            self.__dict__["_optirs_factor"] = {
                "grad_unscale": None if grad_scale is None else float(grad_scale),
                "grad_coef": None if coef == 1.0 else coef,
            }
            try:
                applied = self._optirs_step()
            except BaseException:
                # Nothing was modified: the coefficient waits for the step that succeeds.
                if coef is not None:
                    self.__dict__.setdefault("_optirs_clip_coef", coef)
                raise
            finally:
                del self.__dict__["_optirs_factor"]
        self.last_step_skipped = not applied
        if not applied:
            self.skipped_steps = getattr(self, "skipped_steps", 0) + 1
        return loss

    def _check(self, p: torch.Tensor, g: torch.Tensor, gi: int, i: int) -> None:
        name = type(self).__name__
        where = f"param_groups[{gi}]['params'][{i}]"
        if g.is_sparse:
            if self._spec.sparse_message is not None:
                raise RuntimeError(self._spec.sparse_message)
            raise TypeError(
                f"optirs.torch.{name} does not support sparse gradients ({where} has one); "
                f"torch.optim.{name} does"
            )
        for t, what in ((p, where), (g, f"the gradient of {where}")):
            if t.device.type != "cpu":
                raise ValueError(
                    f"optirs.torch.{name} updates CPU tensors only; {what} is on {t.device}"
                )
        if p.is_complex():
            raise TypeError(
                f"optirs.torch.{name} does not support complex parameters ({where} has dtype "
                f"{p.dtype}); use torch.optim.{name}"
            )
        if p.dtype not in _DTYPES:
            raise TypeError(
                f"optirs.torch.{name} updates float32, float64, float16 and bfloat16 "
                f"parameters; {where} has dtype {p.dtype}"
            )
        if g.dtype != p.dtype:
            raise TypeError(
                f"the gradient of {where} has dtype {g.dtype}, but the parameter has {p.dtype}"
            )

    def _optirs_step(self) -> bool:
        # Hyperparameters are not validated here: torch.optim checks them in its constructor
        # only, and steps with whatever a schedule or the user sets later. The core raises
        # only where torch's step raises (src/torch_raises.rs).
        groups = self.param_groups
        flat = self.__dict__.get("_optirs_flat_plan")
        if flat is not None:
            applied = flat.step(self)
            if applied is not None:
                return applied
        plan = getattr(self, "_optirs_plan", None)
        if plan is not None and plan.fits(self, groups):
            applied = plan.step(self)
            if applied is not None:
                return applied
        self._optirs_plan = None
        applied = self._optirs_full_step()
        # The core plans no step of a group with optirs's rounding options: no plan to make.
        if applied and not any(_spec.has_rounding(g) for g in groups):
            try:
                self._optirs_plan = _Plan(self, groups)
            except (TypeError, ValueError, KeyError, RuntimeError):
                # The step is done; a plan only saves work on the next one, which will look
                # at every tensor afresh instead. (KeyError: another thread removed a state
                # entry since the step.)
                self._optirs_plan = None
            self.__dict__["_optirs_flat_plan"] = (
                _FlatPlan.build(self, groups) if self._optirs_has_flat() else None
            )
        return applied

    def step_parameters(self, params: Iterable[torch.Tensor]) -> bool:
        """Steps only ``params`` (each must belong to one of this optimizer's param groups),
        with their groups' current hyperparameters; returns whether the update was applied.

        For updates made as gradients become ready (``optirs.torch.step_in_backward``): one
        call into the core for just these parameters, without looking at the others.

        Args:
            params: the parameters to step, each with its ``grad``.
        """
        owner = self._optirs_owners()
        groups = []
        positions = []
        for p in params:
            found = owner.get(id(p))
            if found is None:
                raise ValueError(
                    "step_parameters: a tensor that is not in this optimizer's param_groups"
                )
            group, gi, i = found
            groups.append({**group, "params": [p]})
            positions.append((gi, i))
        with self._lock():
            try:
                applied = self._optirs_full_step(groups)
            except (TypeError, ValueError, ArithmeticError, RuntimeError) as e:
                # The step ran over one-parameter copies of the groups: name each parameter
                # (and each group's hyperparameter) by its place in the optimizer's own
                # param_groups.
                def place(m: re.Match[str]) -> str:
                    gi, i = positions[int(m.group(1))]
                    return f"param_groups[{gi}]" + (f"['params'][{i}]" if m.group(2) else "")

                message = re.sub(r"param_groups\[(\d+)\](\['params'\]\[0\])?", place, str(e))
                raise type(e)(message) from None
        self.last_step_skipped = not applied
        if not applied:
            self.skipped_steps = getattr(self, "skipped_steps", 0) + 1
        return applied

    def _optirs_owners(self) -> dict[int, tuple[dict[str, Any], int, int]]:
        """id(param) -> (its group, group index, index in the group), rebuilt when the groups'
        parameter lists change."""
        key = [(id(g["params"]), len(g["params"])) for g in self.param_groups]
        cached = self.__dict__.get("_optirs_owner_cache")
        if cached is None or cached[0] != key:
            owners = {
                id(p): (g, gi, i)
                for gi, g in enumerate(self.param_groups)
                for i, p in enumerate(g["params"])
            }
            cached = self.__dict__["_optirs_owner_cache"] = (key, owners)
        return cached[1]

    def _optirs_full_step(self, groups: list[dict[str, Any]] | None = None) -> bool:
        """A step that looks at everything afresh: state made where missing, every tensor
        checked and viewed. ``groups`` (default: all param groups) may be single-parameter
        copies of them, as ``step_parameters`` makes."""
        groups = self.param_groups if groups is None else groups
        spec = self._spec
        names = spec.buffers
        params: list[Any] = []
        grads: list[Any] = []
        buffers: list[Any] = []
        steps: list[Any] = []
        fresh: list[bool] = []
        created: list[tuple[torch.Tensor, dict[str, Any]]] = []
        written: list[torch.Tensor] = []
        for gi, group in enumerate(groups):
            need_names = set(spec.required(group))
            for i, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    params.append(None)
                    grads.append(None)
                    buffers.append(None)
                    steps.append(None)
                    fresh.append(False)
                    continue
                self._check(p, g, gi, i)
                where = f"param_groups[{gi}]['params'][{i}]"
                # A DTensor's local shard, gradient and state (views) are what the core steps.
                lp, lg = _dtensor.check_pair(p, g, where, type(self).__name__, spec.elementwise)
                state = self.state.get(p) or {}
                master = _spec.wants_master(group, p.dtype in (torch.float16, torch.bfloat16))
                missing = spec.missing(group, state, master=master)
                # As torch: state is made when a parameter has none. A parameter with state
                # that lacks an entry (a partial state dict, an option switched on later) is
                # refused, naming it, where torch would fail with a KeyError; SGD's momentum
                # buffer alone may be absent (torch's "no buffer yet").
                lacking = spec.incomplete(missing) if state else []
                if lacking:
                    raise ValueError(
                        f"state['{lacking[0]}'] of {where} is missing or None, but the "
                        f"parameter has other state ({sorted(state)}): load a complete state "
                        "dict, or clear this parameter's state to start it afresh"
                    )
                if missing:
                    # Made aside; kept only when the step succeeds.
                    state = {**state, **self._new_state(p, group, missing)}
                    created.append((p, state))
                bufs = [state.get(n) for n in names]
                layout = _Layout(lp, where)
                params.append(layout.view(lp, where))
                grads.append(layout.view(lg, f"the gradient of {where}"))
                buffers.append(
                    tuple(
                        layout.view(
                            _dtensor.local_state(p, b, f"state['{n}'] of {where}"),
                            f"state['{n}'] of {where}",
                        )
                        if n in need_names
                        else None
                        for b, n in zip(bufs, names)
                    )
                    + tuple(_scalar_view(state.get(n), where, n) for n in spec.scalar_names)
                    + (
                        layout.view(
                            _dtensor.local_state(
                                p, state[_spec.MASTER], f"state['{_spec.MASTER}'] of {where}"
                            ),
                            f"state['{_spec.MASTER}'] of {where}",
                        )
                        if master
                        else None,
                    )
                )
                # SGD keeps no step: a stray entry is ignored, as torch.optim.SGD does.
                step = state.get("step") if spec.counts_steps else None
                steps.append(None if step is None else _scalar_view(step, where))
                fresh.append(spec.fresh(missing))
                written.append(p)
                written.extend(b for b, n in zip(bufs, names) if b is not None and n in need_names)
                if step is not None:
                    written.append(step)
                written.extend(state[n] for n in spec.scalar_names)
                if master:
                    written.append(state[_spec.MASTER])
        if self._skip_everywhere(groups, grads):
            return False
        # The core wrote through NumPy views, which autograd cannot see: it bumps the version
        # counters as torch's in-place ops would (`then`), so a graph that saved an old value
        # refuses to backpropagate through it instead of silently using the new one. It keeps
        # the state made for this step (`commit`) itself, before returning, so that an
        # interrupt cannot land between the update and the state it advanced.
        return _core.step(
            spec.kind,
            groups,
            params,
            grads,
            buffers,
            steps,
            fresh,
            bf16_bits=True,
            commit=[(self.state, p, state) for p, state in created],
            then=(increment_version, written) if written else None,
            **self._options(),
        )

    def _skip_everywhere(
        self, groups: list[dict[str, Any]], grads: list[Any] | None = None
    ) -> bool:
        """With ``skip_nonfinite`` and DTensor parameters: whether some rank's gradients hold a
        NaN or infinity, agreed by all ranks (``_dtensor.nonfinite_anywhere``) so that they
        skip together; the core's own check then decides nothing differently per rank.
        ``grads``: the gradients' NumPy views (default: made here from the groups')."""
        if not getattr(self, "skip_nonfinite", False):
            return False
        meshes = _dtensor.meshes_of(p for g in groups for p in g["params"])
        if not meshes:
            return False
        if grads is None:
            grads = [
                _clip._flat_view(_dtensor.local(p.grad))
                for g in groups
                for p in g["params"]
                if p.grad is not None
            ]

        def inf_norm(views: list[Any]) -> float:
            norm: float = _core.grad_norm(views, float("inf"), None, bf16_bits=True)[0]
            return norm

        return _dtensor.nonfinite_anywhere(grads, meshes, inf_norm)

    def _new_state(
        self, p: torch.Tensor, group: dict[str, Any], missing: Iterable[str]
    ) -> dict[str, torch.Tensor]:
        """The state entries ``missing`` names, for ``p`` (``Spec.new_state``, in torch): the
        step counter as torch.optim makes it, buffers in the parameter's memory format.

        A buffer's fill value (Adagrad's ``initial_accumulator_value``) is read from the
        optimizer's defaults, not from the group: torch.optim.Adagrad's ``_init_group`` does
        so, and a drop-in replacement does the same.
        """
        dtype = _state_dtype(p, group)
        own = _flat.owner(p)
        # Groups that round stochastically or keep master copies are stepped per tensor (their
        # random bits are keyed by each parameter's own index; the master copy is the
        # parameter's): their state stays per tensor too, so no flat plan covers them.
        if own is not None and not _rounds(group):
            return self._new_flat_state(p, own, group, missing, dtype)
        out = self._spec.new_state(
            missing,
            self._spec.fill_values(self.defaults, group),
            lambda x: torch.full_like(p, x, dtype=dtype, memory_format=torch.preserve_format),
            lambda: torch.tensor(0.0, dtype=_get_scalar_dtype(is_fused=group.get("fused"))),
            scalar=lambda x: torch.tensor(x, dtype=_get_scalar_dtype()),
            group=group,
        )
        if _spec.MASTER in missing:
            # The parameter's value, exactly, in its memory format.
            out[_spec.MASTER] = p.detach().to(
                torch.float32, memory_format=torch.preserve_format, copy=True
            )
        return out

    def _flat_slot(
        self, fb: _flat._FlatBuffer, k: int, name: str, dtype: torch.dtype, shape: Any
    ) -> torch.Tensor:
        """Parameter ``k`` of ``fb``'s place in the flat state buffer ``name`` of ``dtype``
        (made on first use): a view of its shape, or 0-d for a step counter or scalar."""
        buffers = self.__dict__.setdefault("_optirs_flat_state", {})
        key = (id(fb), name, dtype)
        found = buffers.get(key)
        per_element = shape is not None
        if found is None or found[0] is not fb:
            size = fb.starts[-1] if per_element else fb.count
            found = buffers[key] = (fb, torch.zeros(size, dtype=dtype, device=fb.data.device))
        flat = found[1]
        if not per_element:
            return flat[k]
        a = fb.starts[k]
        return flat[a : a + fb.numels[k]].view(shape)

    def _new_flat_state(
        self,
        p: torch.Tensor,
        own: tuple[_flat._FlatBuffer, int],
        group: dict[str, Any],
        missing: Iterable[str],
        dtype: torch.dtype,
    ) -> dict[str, torch.Tensor]:
        """``_new_state`` for a flat parameter: each entry a view of the optimizer's flat
        state buffer of that name (the values torch would make)."""
        fb, k = own
        spec = self._spec
        values = spec.fill_values(self.defaults, group)
        out: dict[str, torch.Tensor] = {}
        for n in missing:

            def full(x: float, n: str = n) -> torch.Tensor:
                return self._flat_slot(fb, k, n, dtype, p.shape).fill_(x)

            def step(n: str = n) -> torch.Tensor:
                scalar_dtype = _get_scalar_dtype(is_fused=group.get("fused"))
                return self._flat_slot(fb, k, n, scalar_dtype, None).fill_(0.0)

            def scalar(x: float, n: str = n) -> torch.Tensor:
                return self._flat_slot(fb, k, n, _get_scalar_dtype(), None).fill_(x)

            out.update(spec.new_state([n], values, full, step, scalar=scalar, group=group))
        return out

    def _adopt_flat_state(self) -> None:
        """Copies each flat parameter's state tensors (as ``load_state_dict`` made them) into
        the flat state buffers and puts the views in their place, so the flat step can run."""
        spec = self._spec
        if not _flat.any_flat() or not _steps_flat(self):
            return
        names = (*spec.buffers, *(("step",) if spec.counts_steps else ()), *spec.scalar_names)
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    own = _flat.owner(p)
                    entry = self.state.get(p)
                    if own is None or not entry:
                        continue
                    for n in names:
                        t = entry.get(n)
                        if not isinstance(t, torch.Tensor) or t.device != p.device:
                            continue
                        if n in spec.buffers:
                            if t.shape != p.shape:
                                continue
                            slot = self._flat_slot(own[0], own[1], n, t.dtype, p.shape)
                        elif t.dim() == 0:
                            slot = self._flat_slot(own[0], own[1], n, t.dtype, None)
                        else:
                            continue
                        if slot is not t:
                            slot.copy_(t)
                            entry[n] = slot
        self.__dict__.pop("_optirs_flat_plan", None)


def _rounds(group: dict[str, Any]) -> bool:
    """Whether ``group`` asks for stochastic rounding or master weights."""
    return bool(group.get("bf16_stochastic_round")) or bool(group.get("master_weights"))


def _saved_masters(
    groups: list[dict[str, Any]], state_dict: Any
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each parameter's saved master copy (``master_weights``), matched by position as torch's
    ``load_state_dict`` matches state; nothing for a state dict that is not one (torch's
    ``load_state_dict`` raises for it)."""
    if not isinstance(state_dict, dict):
        return []
    saved_groups, saved_state = state_dict.get("param_groups"), state_dict.get("state")
    if not isinstance(saved_groups, list) or not isinstance(saved_state, dict):
        return []
    out = []
    for g, sg in zip(groups, saved_groups):
        if not isinstance(sg, dict):
            return []
        for p, i in zip(g["params"], sg.get("params", ())):
            m = (
                saved_state.get(i, {}).get(_spec.MASTER)
                if isinstance(saved_state.get(i), dict)
                else None
            )
            if isinstance(m, torch.Tensor):
                out.append((p, m))
    return out


def _state_dtype(p: torch.Tensor, group: dict[str, Any]) -> torch.dtype:
    """The dtype ``p``'s state buffers are kept in under ``group``: bfloat16 where the group
    asks for it and the parameter is not float64 (the core refuses that pair), else the
    parameter's."""
    if group.get("state_dtype") is None or p.dtype == torch.float64:
        return p.dtype
    return torch.bfloat16


class _Plan:
    """What ``_optirs_full_step`` found, handed to the core (``_core.TorchPlan``) for the steps
    that follow.

    Each later step is one call into Rust, which re-checks per parameter what can change
    between steps (its data pointer and layout, its state entries by identity and their
    layouts, the gradient's type, device, layout, dtype, shape, strides and memory) and steps
    through raw pointers. When anything differs it writes nothing and returns None, and the full
    step runs: it raises the precise error or builds a new plan. The plan is given the NumPy
    views of every parameter and state tensor it writes, takes its pointers from them and holds
    them, so that memory outlives any re-pointing.

    DTensor parameters: the core plan is built over their local tensors (``_dtensor.Local``),
    which stand in for them at each step: the local tensor is given the gradient's local
    tensor as ``.grad`` for the duration of the call, and the core is handed a state dict
    keyed by the local tensors whose entries are the state's local tensors. Python checks
    first, per DTensor parameter, what the core cannot see (the gradient a DTensor laid out
    as the parameter, the local tensors and state entries the same objects as when the plan
    was made); anything else sends the step to the full path.
    """

    __slots__ = ("core", "groups", "locals", "plain", "state")

    def __init__(self, opt: _Bridge, groups: list[dict[str, Any]]) -> None:
        spec = opt._spec
        self.state = opt.state
        self.groups = GroupsSnapshot(spec, groups)
        #: the stand-ins of the DTensor parameters
        self.locals: list[_dtensor.Local] = []
        #: whether some parameter is a plain tensor (its state is read from opt.state)
        self.plain = False
        entries: list[Any] = []
        for gi, (ps, need) in enumerate(zip(self.groups.members, self.groups.needs)):
            keys = tuple(n for n, want in zip(spec.buffers, need) if want)
            keys += ("step",) if spec.counts_steps else ()
            keys += spec.scalar_names
            scalar_keys = {"step", *spec.scalar_names}
            for i, p in enumerate(ps):
                grad = p.grad
                stand_in = _dtensor.Local.of(p, opt.state, keys)
                if stand_in is None:
                    self.plain = True
                else:
                    self.locals.append(stand_in)
                    p = stand_in.local
                # Only what the full step just checked: a parameter that had no gradient
                # sends the next step it has one back to the full step.
                if grad is None:
                    entries.append(p)
                    continue
                where = f"param_groups[{gi}]['params'][{i}]"
                state = opt.state.get(p, {}) if stand_in is None else stand_in.state
                items = tuple(state[k] for k in keys)
                layout = _Layout(p, where)
                views = tuple(
                    _scalar_view(t, where, k) if k in scalar_keys else layout.view(t, where)
                    for k, t in zip(keys, items)
                )
                entries.append((gi, p, layout.view(p, where), keys, items, views))
        self.core = _core.TorchPlan(spec.kind, entries, _EXCHANGE_API)

    def fits(self, opt: _Bridge, groups: list[dict[str, Any]]) -> bool:
        """Groups, their parameter lists and layout-changing options are as they were."""
        return opt.state is self.state and self.groups.unchanged(opt._spec, groups)

    def step(self, opt: _Bridge) -> bool | None:
        """Steps through the plan and returns whether the update was applied; None (nothing
        done) when something changed and the full step must look again."""
        if not self.locals:
            return self.core.step(opt.param_groups, opt.state, **opt._options())
        state = dict(opt.state) if self.plain else {}
        try:
            for stand_in in self.locals:
                if not stand_in.prepare(opt.state, state):
                    return None
            if opt._skip_everywhere(opt.param_groups):
                return False
            applied = self.core.step(opt.param_groups, state, **opt._options())
        finally:
            # The gradients' memory is not kept alive by the stand-ins.
            for stand_in in self.locals:
                stand_in.local.grad = None
        if applied:
            # The core bumped the local tensors' version counters; torch's in-place ops on a
            # DTensor bump the DTensor's (see _optirs_full_step).
            increment_version([t for s in self.locals if s.written for t in s.written])
        return applied


class _Run:
    """Parameters ``k0..k1`` of one flat buffer, adjacent in one group, whose state lies in the
    same flat state buffers: stepped as one tensor (split where their step counters or 0-d
    state differ)."""

    __slots__ = ("bufs", "fb", "gi", "k0", "k1", "scalars")

    def __init__(self, gi: int, fb: _flat._FlatBuffer, k: int, bufs: Any, scalars: Any) -> None:
        self.gi, self.fb, self.k0, self.k1 = gi, fb, k, k + 1
        #: NumPy views of the whole flat state buffers (None where the group uses none)
        self.bufs = bufs
        #: NumPy views of the flat step counters, then the 0-d state, one element a parameter
        self.scalars = scalars

    def pieces(self) -> list[tuple[int, int]]:
        """``(k0, k1)`` ranges whose parameters hold bitwise the same counters and scalars."""
        k0, k1 = self.k0, self.k1
        if not self.scalars or k1 - k0 < 2:
            return [(k0, k1)]
        differ = np.zeros(k1 - k0 - 1, dtype=bool)
        for a in self.scalars:
            bits = a[k0:k1].view(np.uint64 if a.itemsize == 8 else np.uint32)
            differ |= bits[1:] != bits[:-1]
        cuts = np.flatnonzero(differ)
        if not len(cuts):
            return [(k0, k1)]
        edges = [k0, *(int(c) + k0 + 1 for c in cuts), k1]
        return list(zip(edges[:-1], edges[1:]))


class _FlatPlan:
    """The step over flat buffers (``optirs.torch.flatten_parameters``).

    Built after a full step when every parameter of every group is flat, has its gradient view
    as ``p.grad`` and its state entries as views of this optimizer's flat state buffers. Each
    later step checks in one native call (``_core.FlatWatch``) that all of that still holds,
    then hands the core one tensor per run of adjacent parameters (``_Run``): the rules are
    element-wise, so a run steps exactly as its parameters would one by one, provided they share
    their step counter and 0-d state, which is checked bit for bit (a run is split where they
    differ, e.g. after a step in which a parameter had no gradient). The counters and scalars of
    a run's first parameter are stepped, then copied to the others.

    Anything else (a gradient replaced or set to None, a parameter re-pointed, a state entry
    replaced, groups changed) returns None and the per-tensor step runs: slower, never wrong.
    """

    __slots__ = ("covered", "groups", "runs", "state", "watch")
    covered: list[_flat._FlatBuffer]
    groups: GroupsSnapshot
    runs: list[_Run]
    state: Any
    watch: Any

    @staticmethod
    def build(opt: _Bridge, groups: list[dict[str, Any]]) -> _FlatPlan | None:
        """The plan for ``opt`` as it is now, or None where it cannot step flat."""
        spec = opt._spec
        if not _steps_flat(opt):
            return None
        kept = opt.__dict__.get("_optirs_flat_state", {})
        snapshot = GroupsSnapshot(spec, groups)
        scalar_names = (("step",) if spec.counts_steps else ()) + spec.scalar_names
        params: list[Any] = []
        grads: list[Any] = []
        entries: list[Any] = []
        runs: list[_Run] = []
        bases: dict[int, Any] = {}
        last: tuple[Any, ...] | None = None
        for gi, (group, ps, need) in enumerate(zip(groups, snapshot.members, snapshot.needs)):
            if _rounds(group):
                return None  # stepped per tensor: see _new_state
            for p in ps:
                own = _flat.owner(p)
                if own is None:
                    return None
                fb, k = own
                g = fb.grad_views[k]
                entry = opt.state.get(p) or None
                if p.grad is not g or p.dtype not in _DTYPES or not _lies_at(p, fb.data, fb, k):
                    return None
                if g is None:
                    # Frozen, without a gradient: not stepped; the watch sees that it stays so.
                    params.append(p)
                    grads.append(None)
                    entries.append(entry)
                    continue
                if not _lies_at(g, fb.grad, fb, k):
                    return None
                if entry is None:
                    if any(need) or scalar_names:
                        return None
                    entry = {}
                elif not isinstance(entry, dict):
                    return None
                found: list[Any] = []
                for n, want in zip(spec.buffers, need):
                    if not want:
                        found.append(None)
                        continue
                    t = entry.get(n)
                    flat = _flat_base(kept, fb, n, t)
                    if (
                        flat is None
                        or not isinstance(t, torch.Tensor)
                        or t.dtype != _state_dtype(p, group)
                        or t.storage_offset() != fb.starts[k]
                        or t.shape != p.shape
                        or not t.is_contiguous()
                    ):
                        return None
                    found.append(flat)
                for n in scalar_names:
                    t = entry.get(n)
                    flat = _flat_base(kept, fb, n, t)
                    if not isinstance(t, torch.Tensor) or flat is None:
                        return None
                    if t.dim() != 0 or t.storage_offset() != k:
                        return None
                    found.append(flat)
                key = (gi, fb, *map(id, found))
                if last == key and runs[-1].k1 == k:
                    runs[-1].k1 += 1
                else:
                    views = [None if t is None else _numpy(t, "a flat state buffer") for t in found]
                    nb = len(spec.buffers)
                    runs.append(_Run(gi, fb, k, views[:nb], views[nb:]))
                    last = key
                for t in found:
                    if t is not None:
                        bases[id(t)] = t
                params.append(p)
                grads.append(g)
                entries.append(entry or None)
        if not params:
            return None
        plan = _FlatPlan()
        plan.state = opt.state
        plan.groups = snapshot
        plan.runs = runs
        fbs = {id(r.fb): r.fb for r in runs}
        # Flat buffers all of whose parameters this optimizer steps: zero_grad zeros them whole.
        counts: dict[int, int] = {}
        for r in runs:
            counts[id(r.fb)] = counts.get(id(r.fb), 0) + r.k1 - r.k0
        plan.covered = [fb for i, fb in fbs.items() if counts[i] == fb.count]
        # The core writes behind autograd's back: version counters are bumped as torch's in-place
        # ops would. A parameter has its own counter (``p.data = view`` keeps it); the state
        # views share their flat buffer's.
        written = [*params, *(fb.data for fb in fbs.values()), *bases.values()]
        # The check and those bumps run together, right before the update (``admit``).
        plan.watch = _core.FlatWatch(
            params, grads, entries, _EXCHANGE_API, bump=(increment_version, written)
        )
        return plan

    def step(self, opt: _Bridge) -> bool | None:
        """One step over the flat buffers; None (nothing written) when something changed."""
        spec = opt._spec
        groups = opt.param_groups
        if opt.state is not self.state or not self.groups.unchanged(spec, groups):
            return None
        if any(map(_rounds, groups)):  # switched on since the plan was built: per tensor
            return None
        members: list[list[Any]] = [[] for _ in groups]
        params: list[Any] = []
        grads: list[Any] = []
        buffers: list[Any] = []
        steps: list[Any] = []
        done: list[tuple[_Run, int, int]] = []
        counts = spec.counts_steps
        for r in self.runs:
            fb = r.fb
            data = _numpy(fb.data, "a flat parameter buffer")
            grad = _numpy(fb.grad, "a flat gradient buffer")
            for k0, k1 in r.pieces():
                a, b = fb.starts[k0], fb.starts[k1]
                members[r.gi].append(None)
                params.append(data[a:b])
                grads.append(grad[a:b])
                one = [s[k0 : k0 + 1].reshape(()) for s in r.scalars]
                buffers.append(
                    tuple(None if x is None else x[a:b] for x in r.bufs)
                    + tuple(one[1:] if counts else one)
                )
                steps.append(one[0] if counts else None)
                done.append((r, k0, k1))
        seg_groups = [{**g, "params": m} for g, m in zip(groups, members)]
        applied = _core.step(
            spec.kind,
            seg_groups,
            params,
            grads,
            buffers,
            steps,
            [],
            bf16_bits=True,
            # Once the call is validated: the check that everything still lines up, and the
            # version bumps (right before the update: a step that ``skip_nonfinite`` then
            # skips has bumped them too, with no value changed).
            before=(self.watch.admit, opt.state),
            **opt._options(),
        )
        if applied is None:  # something no longer lines up: nothing written
            return None
        if applied:
            for r, k0, k1 in done:
                for s in r.scalars:
                    s[k0 + 1 : k1] = s[k0]
        return applied

    def zero_grad(self, opt: _Bridge, set_to_none: bool) -> bool:
        """Zeros the gradients of a flat optimizer; False (nothing done) when the plan no longer
        describes the optimizer's parameters. A frozen parameter given a gradient since is
        treated as torch would (``set_to_none``). Called with autograd off (``_Bridge.zero_grad``).
        """
        if not self.groups.unchanged(opt._spec, opt.param_groups):
            return False
        covered = {id(fb) for fb in self.covered}
        for fb in self.covered:
            fb.grad.zero_()
        for r in self.runs:
            if id(r.fb) not in covered:
                r.fb.grad[r.fb.starts[r.k0] : r.fb.starts[r.k1]].zero_()
        stray = self.watch.stray_grads()
        if stray:
            params = self.groups.params
            for k in stray:
                p = params[k]
                own = _flat.owner(p)
                g = None if own is None else own[0].grad_views[own[1]]
                if g is not None:
                    p.grad = g
                elif p.grad is not None:
                    if set_to_none:
                        p.grad = None
                    else:
                        p.grad.detach_().zero_()
        return True


def _steps_flat(opt: _Bridge) -> bool:
    """Whether ``opt`` can step flat parameters as flat runs: not the 8-bit optimizers (their
    blocks would straddle parameters) nor Adafactor (its own step), nor any rule that is not
    element-wise (``Spec.elementwise``: factored moments read a parameter's shape)."""
    return type(opt)._optirs_step is _Bridge._optirs_step and opt._spec.elementwise


def _lies_at(t: torch.Tensor, flat: torch.Tensor, fb: _flat._FlatBuffer, k: int) -> bool:
    """Whether ``t`` is parameter ``k``'s contiguous piece of ``flat`` (not re-pointed)."""
    return (
        t.dtype == flat.dtype
        and t.is_contiguous()
        and t.numel() == fb.numels[k]
        and t.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
        and t.data_ptr() == flat.data_ptr() + fb.starts[k] * flat.element_size()
    )


def _flat_base(kept: dict[Any, Any], fb: _flat._FlatBuffer, name: str, t: Any) -> Any:
    """The flat state buffer ``t`` is a view of, when it is this optimizer's buffer ``name``
    for ``fb``; else None."""
    if not isinstance(t, torch.Tensor):
        return None
    found = kept.get((id(fb), name, t.dtype))
    if found is None or found[0] is not fb or t._base is not found[1]:
        return None
    return found[1]


class _Layout:
    """How one parameter's tensors are handed to the core.

    A contiguous parameter goes as it is (its gradient and state must then be contiguous too).
    A parameter whose memory is dense but ordered differently (transposed, channels_last) is
    updated in memory order: every tensor of that parameter is passed as a flat view of its
    memory, which is only right when they all share the parameter's strides, so that is checked.
    """

    def __init__(self, p: torch.Tensor, where: str) -> None:
        self.strides: tuple[int, ...] | None = None
        if not p.is_contiguous():
            if not _is_dense(p):
                raise ValueError(
                    f"{where} must be contiguous or at least dense in memory (no gaps or "
                    f"overlaps between elements), got shape {tuple(p.shape)} with strides "
                    f"{p.stride()}"
                )
            self.strides = p.stride()

    def view(self, t: Any, what: str) -> Any:
        """A NumPy array over ``t``'s own memory (no copy)."""
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type != "cpu":
            raise ValueError(f"optirs.torch updates CPU tensors only; {what} is on {t.device}")
        t = t.detach()
        if self.strides is not None:
            if t.stride() != self.strides:
                raise ValueError(
                    f"{what} has strides {t.stride()} but its parameter has {self.strides}: "
                    "a non-contiguous parameter's gradient and state must share its memory "
                    "layout (make it contiguous, or give it a matching gradient)"
                )
            t = torch.as_strided(t, (t.numel(),), (1,))
        return _numpy(t, what)


def _is_dense(t: torch.Tensor) -> bool:
    """True when the elements fill one block of memory, in some order of the dimensions."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _numpy(t: torch.Tensor, what: str) -> Any:
    if t.dtype == torch.bfloat16:
        # NumPy has no bfloat16: the core takes its bit patterns as uint16.
        t = t.view(torch.uint16)
    try:
        return t.numpy()
    except (RuntimeError, TypeError) as e:
        raise TypeError(f"{what} cannot be handed to optirs: {e}") from None


def _scalar_view(t: Any, where: str, key: str = "step") -> Any:
    what = f"state['{key}'] of {where}"
    if not isinstance(t, torch.Tensor):
        raise TypeError(
            f"{what} must be a 0-d float32 tensor, as torch.optim keeps it; got {type(t).__name__}"
        )
    if t.device.type != "cpu":
        raise ValueError(f"optirs.torch updates CPU tensors only; {what} is on {t.device}")
    return _numpy(t.detach(), what)


def _bridge_init(spec: _spec.Spec) -> Callable[..., None]:
    """The constructor of ``spec``'s bridge class: torch.optim's signature, then optirs's
    options. Refuses the switches optirs cannot honour, then runs torch's own constructor."""
    convert = {p.name: p.convert for p in spec.params if p.convert is not None}

    def construct(self: _Bridge, params: Iterable[Any], values: dict[str, Any]) -> None:
        skip_nonfinite = values.pop("skip_nonfinite")
        flush_denormals = values.pop("flush_denormals")
        state_dtype = _spec.state_dtype_name(values.pop("state_dtype"))
        rounding = _spec.rounding_entries(
            values.pop("bf16_stochastic_round"),
            values.pop("master_weights"),
            values.pop("seed"),
            default_base=torch.initial_seed() & ((1 << 64) - 1),
        )
        _refuse(spec.name, **{name: values[name] for name in spec.refused})
        if spec.in_torch:
            getattr(torch.optim, spec.name).__init__(self, params, **values)
        else:
            # No torch.optim class to check and store the arguments: the spec's checks (in
            # torch's words), then torch.optim.Optimizer's own constructor.
            for name, f in convert.items():
                values[name] = f(values[name])
            defaults = {**values, **spec.fixed}
            spec.validate(defaults)
            torch.optim.Optimizer.__init__(self, params, defaults)  # type: ignore[arg-type]
        # torch's constructor knows no state_dtype: when given, it joins the defaults (so
        # groups added later get it too) and every group made so far. Without it the defaults
        # and groups are torch's own (a group without the key keeps state as torch does).
        if state_dtype is not None:
            self.defaults["state_dtype"] = state_dtype
            for group in self.param_groups:
                group.setdefault("state_dtype", state_dtype)
        # The rounding options likewise, present only when asked for.
        if rounding:
            self.defaults.update(rounding)
            for group in self.param_groups:
                for k, v in rounding.items():
                    group.setdefault(k, v)
        self._after_init(skip_nonfinite, flush_denormals)
        self._conform_state()
        self._adopt_flat_state()  # Adagrad's constructor makes state

    doc = (
        f"torch.optim.{spec.name}'s constructor (its arguments, defaults and checks), then "
        if spec.in_torch
        else f"optirs.{spec.name}'s arguments, defaults and checks (ValueError in torch's "
        "words), then "
    ) + "optirs's own keyword-only options."
    return _spec.make_init(spec.name, "optirs.torch", spec.params, construct, doc, api="torch")


class SGD(_Bridge, torch.optim.SGD):
    """``torch.optim.SGD`` (momentum, dampening, Nesterov, weight decay, maximize) stepped by
    optirs. Same signature; ``differentiable=True`` is refused."""

    _spec = _spec.SGD
    __init__ = _bridge_init(_spec)


class Adam(_Bridge, torch.optim.Adam):
    """``torch.optim.Adam`` (amsgrad, maximize, weight decay, decoupled_weight_decay) stepped by
    optirs. Same signature; ``differentiable=True`` and ``capturable=True`` are refused."""

    _spec = _spec.ADAM
    __init__ = _bridge_init(_spec)


class AdamW(_Bridge, torch.optim.AdamW):
    """``torch.optim.AdamW`` stepped by optirs. Same signature (default weight_decay 1e-2);
    ``differentiable=True`` and ``capturable=True`` are refused."""

    _spec = _spec.ADAMW
    __init__ = _bridge_init(_spec)


class RMSprop(_Bridge, torch.optim.RMSprop):
    """``torch.optim.RMSprop`` (centered, momentum, weight decay, maximize) stepped by optirs.
    Same signature; ``differentiable=True`` and ``capturable=True`` are refused."""

    _spec = _spec.RMSPROP
    __init__ = _bridge_init(_spec)


class Adagrad(_Bridge, torch.optim.Adagrad):
    """``torch.optim.Adagrad`` (lr_decay, weight decay, initial accumulator, maximize) stepped
    by optirs, for dense gradients. Same signature; ``differentiable=True`` is refused."""

    _spec = _spec.ADAGRAD
    __init__ = _bridge_init(_spec)


class Adadelta(_Bridge, torch.optim.Adadelta):
    """``torch.optim.Adadelta`` (rho, weight decay, maximize) stepped by optirs. Same
    signature; ``differentiable=True`` and ``capturable=True`` are refused."""

    _spec = _spec.ADADELTA
    __init__ = _bridge_init(_spec)


class RAdam(_Bridge, torch.optim.RAdam):
    """``torch.optim.RAdam`` (weight decay, decoupled_weight_decay, maximize) stepped by
    optirs. Same signature; ``differentiable=True`` and ``capturable=True`` are refused."""

    _spec = _spec.RADAM
    __init__ = _bridge_init(_spec)


class Rprop(_Bridge, torch.optim.Rprop):
    """``torch.optim.Rprop`` (etas, step_sizes, maximize) stepped by optirs. Same signature;
    ``differentiable=True`` and ``capturable=True`` are refused."""

    _spec = _spec.RPROP
    __init__ = _bridge_init(_spec)


class Lion(_Bridge, torch.optim.Optimizer):
    """Lion (Chen et al. 2023) as lion-pytorch computes it, stepped by optirs: a
    ``torch.optim.Optimizer`` with ``optirs.Lion``'s signature
    ``(params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *, maximize=False)``, its checks
    (ValueError in torch's words) and state ``exp_avg``."""

    _spec = _spec.LION
    __init__ = _bridge_init(_spec)


class _Bridge8bit(_Bridge):
    """The step of ``Adam8bit``/``AdamW8bit``: 8-bit state for parameters of ``min_8bit_size``
    elements or more, float Adam state for smaller ones (see ``optirs._eightbit``), one call
    into the core; every tensor checked first, nothing modified on error."""

    block_size: int
    min_8bit_size: int

    def _init_8bit(
        self,
        torch_class: Any,
        params: Iterable[Any],
        values: dict[str, Any],
        block_size: int,
        min_8bit_size: int,
        skip_nonfinite: bool,
        flush_denormals: bool,
        rounding: tuple[Any, Any, Any] = (False, False, None),
    ) -> None:
        name = type(self).__name__
        if values.get("amsgrad"):
            raise ValueError(f"optirs.torch.{name} does not support amsgrad=True")
        _refuse(
            name,
            differentiable=bool(values.get("differentiable")),
            capturable=bool(values.get("capturable")),
        )
        self.block_size, self.min_8bit_size = _eightbit.check_options(block_size, min_8bit_size)
        entries = _spec.rounding_entries(
            *rounding, default_base=torch.initial_seed() & ((1 << 64) - 1)
        )
        torch_class.__init__(self, params, **values)
        # As the other optimizers: the rounding options join the defaults and every group,
        # present only when asked for.
        if entries:
            self.defaults.update(entries)
            for group in self.param_groups:
                for k, v in entries.items():
                    group.setdefault(k, v)
        self._after_init(skip_nonfinite, flush_denormals)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """As ``_Bridge``; the block size and threshold are kept across pickling."""
        super().__setstate__(state)
        for name, default in (("block_size", 256), ("min_8bit_size", 4096)):
            if name not in self.__dict__:
                setattr(self, name, default)

    def __getstate__(self) -> dict[str, Any]:
        """As ``_Bridge``, with the block size and threshold."""
        state = super().__getstate__()
        state["block_size"] = self.block_size
        state["min_8bit_size"] = self.min_8bit_size
        return state

    def _optirs_step(self) -> bool:
        return self._optirs_full_step()

    def _refuse_8bit_dtensor(self, p: torch.Tensor, where: str) -> None:
        """A DTensor parameter that would get 8-bit state is refused: its blocks would start
        at its local shard's first element, so the quantization (and the result) would depend
        on how the parameter is sharded, and the per-block scales could not be resharded or
        checkpointed with the parameter's placements. Smaller ones keep float state (DTensors
        laid out as the parameter), which is exact under any sharding."""
        if _dtensor.any_dtensor((p,)) and p.numel() >= self.min_8bit_size:
            name = type(self).__name__
            raise ValueError(
                f"optirs.torch.{name} does not keep 8-bit state for DTensor parameters: "
                f"{where} ({p.numel()} elements, at least min_8bit_size={self.min_8bit_size}) "
                "would be quantized in blocks of its local shard, giving results that depend "
                "on the sharding and per-block scales that cannot be resharded; use "
                f"optirs.torch.{name.replace('8bit', '')} (optionally state_dtype="
                "torch.bfloat16), or a min_8bit_size above the DTensor parameters' sizes"
            )

    def _new_8bit_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        step = torch.tensor(0.0, dtype=torch.float32)
        if p.numel() < self.min_8bit_size:
            zeros = torch.zeros_like(p, memory_format=torch.preserve_format)
            return {"step": step, "exp_avg": zeros, "exp_avg_sq": zeros.clone()}
        made = _eightbit.new_state(tuple(p.shape), p.numel(), self.block_size)
        out: dict[str, torch.Tensor] = {"step": step}
        for n in _eightbit.Q8_NAMES:
            t = torch.from_numpy(made[n])
            if t.dim() == p.dim() and not p.is_contiguous():
                t = torch.empty_like(p, dtype=torch.uint8).copy_(t)
            out[n] = t
        return out

    def _optirs_full_step(self, groups: list[dict[str, Any]] | None = None) -> bool:
        groups = self.param_groups if groups is None else groups
        params: list[Any] = []
        grads: list[Any] = []
        states: list[Any] = []
        steps: list[Any] = []
        created: list[tuple[torch.Tensor, dict[str, Any]]] = []
        written: list[torch.Tensor] = []
        for gi, group in enumerate(groups):
            if group.get("amsgrad"):
                raise ValueError(
                    f"optirs.torch.{type(self).__name__} does not support amsgrad=True"
                )
            for i, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    for lst in (params, grads, states, steps):
                        lst.append(None)
                    continue
                self._check(p, g, gi, i)
                where = f"param_groups[{gi}]['params'][{i}]"
                lp, lg = _dtensor.check_pair(p, g, where, type(self).__name__)
                self._refuse_8bit_dtensor(p, where)
                state = self.state.get(p) or {}
                made = None
                if not state:
                    state = made = self._new_8bit_state(p)
                master = _spec.wants_master(group, p.dtype in (torch.float16, torch.bfloat16))
                if master and state.get(_spec.MASTER) is None:
                    # Switched on later, or loaded without one: made from the parameter.
                    copy = p.detach().to(
                        torch.float32, memory_format=torch.preserve_format, copy=True
                    )
                    state = made = {**state, _spec.MASTER: copy}
                if made is not None:
                    created.append((p, made))
                eight = _eightbit.is_8bit(state)
                names: tuple[str, ...] = _eightbit.Q8_NAMES if eight else ("exp_avg", "exp_avg_sq")
                if master and not eight:
                    names += ("max_exp_avg_sq",)  # None: the master copy comes fourth
                if master:
                    names += (_spec.MASTER,)
                layout = _Layout(lp, where)
                params.append(layout.view(lp, where))
                grads.append(layout.view(lg, f"the gradient of {where}"))
                views: list[Any] = []
                for n in names:
                    t = state.get(n) if n != "max_exp_avg_sq" else None
                    what = f"state['{n}'] of {where}"
                    if t is None:
                        views.append(None)
                    elif n.endswith("absmax"):
                        if not isinstance(t, torch.Tensor):
                            raise TypeError(f"{what} must be a torch.Tensor")
                        views.append(_numpy(t.detach(), what))
                    else:
                        views.append(layout.view(_dtensor.local_state(p, t, what), what))
                    if isinstance(t, torch.Tensor):
                        written.append(t)
                states.append(tuple(views))
                step = state.get("step")
                steps.append(None if step is None else _scalar_view(step, where))
                written.append(p)
                if step is not None:
                    written.append(step)
        if self._skip_everywhere(groups, grads):
            return False
        return _core.step_adam8bit(
            groups,
            params,
            grads,
            states,
            steps,
            block_size=self.block_size,
            bf16_bits=True,
            commit=[(self.state, p, state) for p, state in created],
            then=(increment_version, written) if written else None,
            **self._options(),
        )

    def dequantized_state_dict(self) -> dict[str, Any]:
        """``state_dict()`` with every 8-bit moment dequantized to float32 and no absmax
        entries: what ``torch.optim.Adam``/``AdamW`` load (the way back)."""
        sd: dict[str, Any] = self.state_dict()  # type: ignore[attr-defined]
        for i, e in list(sd["state"].items()):
            if _eightbit.is_8bit(e):
                np_entry = {k: v.numpy() for k, v in e.items() if k in _eightbit.Q8_NAMES}
                floats = _eightbit.to_float_entry(np_entry, self.block_size)
                kept = {k: v for k, v in e.items() if k not in _eightbit.Q8_NAMES}
                sd["state"][i] = kept | {k: torch.from_numpy(v) for k, v in floats.items()}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores a ``state_dict()`` of this class (8-bit entries copied exactly: a run
        continues bit for bit) or of float32 Adam (``torch.optim.Adam``/``AdamW``): float
        moments of parameters with ``min_8bit_size`` elements or more are quantized. An 8-bit
        entry that does not fit raises before anything changes.

        Args:
            state_dict: a state dict of this class or of torch.optim's Adam/AdamW.
        """
        params = [p for g in self.param_groups for p in g["params"]]
        saved_groups = state_dict.get("param_groups", []) if isinstance(state_dict, dict) else []
        ids = [i for g in saved_groups if isinstance(g, dict) for i in g.get("params", ())]
        by_id = dict(zip(ids, params))
        exact: dict[Any, dict[str, torch.Tensor]] = {}
        floats = dict(state_dict.get("state", {})) if isinstance(state_dict, dict) else {}
        for i, p in by_id.items():
            if floats.get(i):
                self._refuse_8bit_dtensor(p, f"the parameter of loaded state[{i!r}]")
        for i, e in floats.items():
            if isinstance(e, dict) and _eightbit.is_8bit(e) and i in by_id:
                np_entry = {
                    k: (v.numpy() if isinstance(v, torch.Tensor) else v)
                    for k, v in e.items()
                    if k in _eightbit.Q8_NAMES
                }
                where = f"loaded state[{i!r}]"
                _eightbit.check_8bit_entry(np_entry, tuple(by_id[i].shape), self.block_size, where)
                exact[i] = {k: torch.from_numpy(v.copy()) for k, v in np_entry.items()}
                f = _eightbit.to_float_entry(np_entry, self.block_size)
                # The step and any master copy as saved; the moments as float for torch.
                kept = {k: v for k, v in e.items() if k not in _eightbit.Q8_NAMES}
                floats[i] = kept | {k: torch.from_numpy(v) for k, v in f.items()}
        super().load_state_dict({**state_dict, "state": floats})
        for i, p in by_id.items():
            entry = self.state.get(p)
            if not entry:
                continue
            if p.numel() < self.min_8bit_size:
                for k in ("exp_avg_absmax", "exp_avg_sq_absmax"):
                    entry.pop(k, None)
            elif i in exact:
                entry.update(exact[i])
            else:
                for codes, absmax, signed in _eightbit._MOMENTS:
                    q, a = _eightbit.quantize(entry[codes].float().numpy(), signed, self.block_size)
                    entry[codes], entry[absmax] = torch.from_numpy(q), torch.from_numpy(a)


class Adam8bit(_Bridge8bit, torch.optim.Adam):
    """``torch.optim.Adam`` with 8-bit state (bitsandbytes' blockwise dynamic quantization:
    each moment one byte per element, with one float32 absmax per block), stepped by optirs.
    torch's arguments, then keyword-only ``block_size``, ``min_8bit_size``,
    ``skip_nonfinite``, ``flush_denormals``, ``bf16_stochastic_round``, ``master_weights``
    and ``seed``. ``amsgrad``, ``differentiable`` and ``capturable`` are refused. State as
    ``optirs.Adam8bit``'s."""

    _spec = _spec.ADAM

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        block_size: int = 256,
        min_8bit_size: int = 4096,
        skip_nonfinite: bool = False,
        flush_denormals: bool = False,
        bf16_stochastic_round: bool = False,
        master_weights: bool = False,
        seed: int | None = None,
    ) -> None:
        values = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            foreach=foreach, maximize=maximize, capturable=capturable,
            differentiable=differentiable, fused=fused,
            decoupled_weight_decay=decoupled_weight_decay,
        )  # fmt: skip
        self._init_8bit(
            torch.optim.Adam, params, values, block_size, min_8bit_size, skip_nonfinite,
            flush_denormals, (bf16_stochastic_round, master_weights, seed),
        )  # fmt: skip


class AdamW8bit(_Bridge8bit, torch.optim.AdamW):
    """``torch.optim.AdamW`` with 8-bit state, stepped by optirs: as ``Adam8bit`` with the
    weight decay decoupled (default 1e-2)."""

    _spec = _spec.ADAMW

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        block_size: int = 256,
        min_8bit_size: int = 4096,
        skip_nonfinite: bool = False,
        flush_denormals: bool = False,
        bf16_stochastic_round: bool = False,
        master_weights: bool = False,
        seed: int | None = None,
    ) -> None:
        values = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize, foreach=foreach, capturable=capturable,
            differentiable=differentiable, fused=fused,
        )  # fmt: skip
        self._init_8bit(
            torch.optim.AdamW, params, values, block_size, min_8bit_size, skip_nonfinite,
            flush_denormals, (bf16_stochastic_round, master_weights, seed),
        )  # fmt: skip


Adam8bit.__init__.__doc__ = _eightbit.init_doc(
    "torch.optim.Adam's constructor (its arguments, defaults and checks), then the 8-bit "
    "options and optirs's own.",
    _spec.ADAM,
    "torch",
)
AdamW8bit.__init__.__doc__ = _eightbit.init_doc(
    "torch.optim.AdamW's constructor (its arguments, defaults and checks), then the 8-bit "
    "options and optirs's own.",
    _spec.ADAMW,
    "torch",
)


class Adamax(_Bridge, torch.optim.Adamax):
    """``torch.optim.Adamax`` (weight decay, maximize) stepped by optirs. Same signature;
    ``differentiable=True`` and ``capturable=True`` are refused."""

    _spec = _spec.ADAMAX
    __init__ = _bridge_init(_spec)


class NAdam(_Bridge, torch.optim.NAdam):
    """``torch.optim.NAdam`` (momentum decay, L2 or decoupled weight decay, maximize) stepped by
    optirs. Same signature; ``differentiable=True`` and ``capturable=True`` are refused."""

    _spec = _spec.NADAM
    __init__ = _bridge_init(_spec)


class ASGD(_Bridge, torch.optim.ASGD):
    """``torch.optim.ASGD`` (lambd, alpha, t0, weight decay, maximize) stepped by optirs. Same
    signature; ``differentiable=True`` and ``capturable=True`` are refused."""

    _spec = _spec.ASGD
    __init__ = _bridge_init(_spec)


class Adafactor(_Bridge, torch.optim.Adafactor):
    """``torch.optim.Adafactor`` stepped by optirs (its for-loop formulas; one call into the
    core per step, see ``optirs._adafactor``). torch's signature
    ``(params, lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0, weight_decay=0.0, *,
    foreach=None, maximize=False)``, its checks and state (``step``; ``row_var``/``col_var``
    for parameters of two or more dimensions, ``variance`` for the others), then keyword-only
    ``skip_nonfinite``, ``flush_denormals``, ``bf16_stochastic_round`` (with ``seed``) and
    ``master_weights`` (a float32 ``master_param`` per float16/bfloat16 parameter), as the other
    optimizers take them. ``foreach`` is accepted and ignored (one path).

    As torch's Adafactor, it does not take GradScaler's scale (``_step_supports_amp_scaling``
    is False): ``GradScaler.step`` unscales the gradients and skips a step with an inf itself.
    A dense parameter that is not contiguous (transposed, channels_last) is stepped through
    contiguous copies of it and its gradient, copied back once the step is applied: its rows
    and columns are those of its shape, not of its memory.
    """

    _spec = _spec.ADAFACTOR

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1e-2,
        beta2_decay: float = -0.8,
        eps: tuple[float | None, float] = (None, 1e-3),
        d: float = 1.0,
        weight_decay: float = 0.0,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        skip_nonfinite: bool = False,
        flush_denormals: bool = False,
        bf16_stochastic_round: bool = False,
        master_weights: bool = False,
        seed: int | None = None,
    ) -> None:
        rounding = _spec.rounding_entries(
            bf16_stochastic_round,
            master_weights,
            seed,
            default_base=torch.initial_seed() & ((1 << 64) - 1),
        )
        torch.optim.Adafactor.__init__(
            self,
            params,  # type: ignore[arg-type]
            lr=lr,
            beta2_decay=beta2_decay,
            eps=eps,
            d=d,
            weight_decay=weight_decay,
            foreach=foreach,
            maximize=maximize,
        )
        # As the other optimizers: present only when asked for.
        if rounding:
            self.defaults.update(rounding)
            for group in self.param_groups:
                for k, v in rounding.items():
                    group.setdefault(k, v)
        self._after_init(skip_nonfinite, flush_denormals)
        self._step_supports_amp_scaling = False

    def __setstate__(self, state: dict[str, Any]) -> None:
        """As ``_Bridge``; GradScaler support stays torch's (none)."""
        super().__setstate__(state)
        self._step_supports_amp_scaling = False

    def _optirs_step(self) -> bool:
        return self._optirs_full_step()

    def _optirs_full_step(self, groups: list[dict[str, Any]] | None = None) -> bool:
        groups = self.param_groups if groups is None else groups
        params: list[Any] = []
        grads: list[Any] = []
        states: list[Any] = []
        steps: list[Any] = []
        created: list[tuple[torch.Tensor, dict[str, Any]]] = []
        written: list[torch.Tensor] = []
        copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        for gi, group in enumerate(groups):
            for i, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    for lst in (params, grads, states, steps):
                        lst.append(None)
                    continue
                self._check(p, g, gi, i)
                where = f"param_groups[{gi}]['params'][{i}]"
                if _dtensor.any_dtensor((p, g)):
                    # Its rows, columns and norms span every rank's shard: a local step is not
                    # the full tensor's step.
                    raise TypeError(
                        f"optirs.torch.Adafactor does not step DTensor parameters ({where} is "
                        "one): its factors and norms span the whole tensor; use "
                        "torch.optim.Adafactor"
                    )
                state = self.state.get(p) or {}
                if not state:
                    # As torch's `_init_group`, from the gradient's shape.
                    state = {"step": torch.tensor(0.0, dtype=_get_scalar_dtype())}
                    if g.dim() > 1:
                        state["row_var"] = g.new_zeros((*g.shape[:-1], 1))
                        state["col_var"] = g.new_zeros((*g.shape[:-2], 1, g.shape[-1]))
                    else:
                        state["variance"] = torch.zeros_like(g, memory_format=torch.preserve_format)
                    created.append((p, state))
                master = _spec.wants_master(group, p.dtype in (torch.float16, torch.bfloat16))
                if master and state.get(_spec.MASTER) is None:
                    # Switched on later, or loaded without one: made from the parameter,
                    # contiguous (the core steps the parameter in its shape's element order).
                    copy = p.detach().to(
                        torch.float32, memory_format=torch.contiguous_format, copy=True
                    )
                    if created and created[-1][0] is p:
                        state[_spec.MASTER] = copy
                    else:
                        state = {**state, _spec.MASTER: copy}
                        created.append((p, state))
                if p.is_contiguous():
                    pv, gv = p, g
                    written.append(p)
                else:
                    if not _is_dense(p):
                        raise ValueError(
                            f"{where} must be contiguous or at least dense in memory (no gaps "
                            f"or overlaps between elements), got shape {tuple(p.shape)} with "
                            f"strides {p.stride()}"
                        )
                    pv = p.detach().contiguous()
                    gv = g.detach().contiguous()
                    copies.append((p, pv))
                params.append(_numpy(pv.detach(), where))
                grads.append(_numpy(gv.detach().contiguous(), f"the gradient of {where}"))
                views: list[Any] = []
                for n in _adafactor.NAMES:
                    t = state.get(n)
                    if t is None:
                        views.append(None)
                        continue
                    what = f"state['{n}'] of {where}"
                    if not isinstance(t, torch.Tensor):
                        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
                    if t.device.type != "cpu":
                        raise ValueError(
                            f"optirs.torch updates CPU tensors only; {what} is on {t.device}"
                        )
                    views.append(_numpy(t.detach(), what))
                    written.append(t)
                if master:
                    m = state[_spec.MASTER]
                    what = f"state['{_spec.MASTER}'] of {where}"
                    if not isinstance(m, torch.Tensor) or not m.is_contiguous():
                        raise ValueError(f"{what} must be a contiguous torch.Tensor")
                    views.append(_numpy(m.detach(), what))
                    written.append(m)
                else:
                    views.append(None)
                states.append(tuple(views))
                step = state.get("step")
                steps.append(None if step is None else _scalar_view(step, where))
                if step is not None:
                    written.append(step)
        applied: bool = _core.step_adafactor(
            groups,
            params,
            grads,
            states,
            steps,
            bf16_bits=True,
            commit=[(self.state, p, state) for p, state in created],
            then=(increment_version, written) if written else None,
            **self._options(),
        )
        if applied:
            with torch.no_grad():
                for p, c in copies:
                    p.copy_(c)
        return applied


Adafactor.__init__.__doc__ = _adafactor.init_doc(
    "torch.optim.Adafactor's constructor (its arguments, defaults and checks), then optirs's "
    "own options.",
    "torch",
)
