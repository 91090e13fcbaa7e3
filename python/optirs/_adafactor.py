"""Adafactor for the NumPy API (``optirs.Adafactor``).

``torch.optim.Adafactor``'s for-loop update over NumPy arrays, in one call into the core per
step (``_core.step_adafactor``): a parameter of two or more dimensions keeps ``row_var`` (its
shape with the last dimension 1) and ``col_var`` (the next-to-last 1), factored over its last
two dimensions; any other keeps ``variance`` (its shape). Every state array is in the
parameter's dtype, as torch keeps it; ``step`` is a 0-d float32.

The core runs the step in passes (reductions, factors, the update's norm, the update), each
parallel over fixed pieces, its sums combined in a fixed order: the same bits at every thread
count and SIMD level (``optirs_core::adafactor`` documents it).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from . import _core, _spec

#: The state entries besides ``step``, in the order the core takes them.
NAMES = ("row_var", "col_var", "variance")


def init_doc(intro: str, api: str) -> str:
    """The constructor docstring of an Adafactor class in ``api`` (``"numpy"`` or
    ``"torch"``): ``intro``, then each argument, in the signature's order."""
    spec = _spec.ADAFACTOR
    params = spec.params if api == "torch" else spec.numpy_params
    own = tuple(p for p in _spec.OWN_OPTIONS if p.name != "state_dtype")
    return f"{intro}\n\n{_spec.args_doc((*params, *own), api)}"


def state_shapes(shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """The state entries (besides ``step``) a parameter of ``shape`` keeps, with their shapes,
    as torch.optim.Adafactor's ``_init_group`` makes them."""
    if len(shape) > 1:
        return {
            "row_var": (*shape[:-1], 1),
            "col_var": (*shape[:-2], 1, shape[-1]),
        }
    return {"variance": tuple(shape)}


def _tn(x: Any) -> str:
    return type(x).__name__


def make_numpy_class(
    optimizer_base: Any,
    _load_step: Callable[[Any, str], np.ndarray],
    _load_buffer: Callable[[Any, np.ndarray, str, np.dtype], np.ndarray],
) -> type:
    """``Adafactor`` over the NumPy API's ``Optimizer``, loading state with its loaders of a
    saved ``step`` and of a state array (checks, then a copy cast to the parameter's dtype)."""

    class Adafactor(optimizer_base):  # type: ignore[misc,valid-type]
        """Adafactor (Shazeer and Stern 2018) as ``torch.optim.Adafactor`` computes it (its
        for-loop path), over NumPy arrays of float32, float64 or bfloat16 (``ml_dtypes``;
        16-bit parameters are computed in float32 and rounded once when stored).

        State: ``step`` (0-d float32); ``row_var`` and ``col_var`` for a parameter of two or
        more dimensions, ``variance`` for the others, in the parameter's dtype; under
        ``master_weights``, a 16-bit parameter's ``master_param`` (float32). Checks and
        messages are torch's constructor's (ValueError), at construction and every step.
        """

        _spec = _spec.ADAFACTOR
        param_groups: list[dict[str, Any]]
        state: Any

        def __init__(
            self,
            params: Iterable[Any],
            lr: float = 1e-2,
            beta2_decay: float = -0.8,
            eps: tuple[float | None, float] = (None, 1e-3),
            d: float = 1.0,
            weight_decay: float = 0.0,
            *,
            maximize: bool = False,
            skip_nonfinite: bool = False,
            flush_denormals: bool = False,
            bf16_stochastic_round: bool = False,
            master_weights: bool = False,
            seed: int | None = None,
        ) -> None:
            defaults = {
                "lr": lr,
                "beta2_decay": beta2_decay,
                "eps": _spec._pair(eps),
                "d": d,
                "weight_decay": weight_decay,
                "maximize": maximize,
                **_spec.rounding_entries(
                    bf16_stochastic_round, master_weights, seed, default_base=0
                ),
            }
            self._spec.validate(defaults)
            optimizer_base.__init__(
                self,
                params,
                defaults,
                skip_nonfinite=skip_nonfinite,
                flush_denormals=flush_denormals,
            )

        def add_param_group(self, param_group: dict[str, Any]) -> None:
            """Adds a group of parameters with its own hyperparameters (defaults fill the
            rest), as the base class does; Adafactor's groups keep no ``state_dtype`` (its state
            is always in the parameter's dtype, as torch's).

            Args:
                param_group: a dict with ``params`` and any hyperparameters.
            """
            if isinstance(param_group, dict) and isinstance(param_group.get("eps"), list):
                param_group = {**param_group, "eps": tuple(param_group["eps"])}
            optimizer_base.add_param_group(self, param_group)
            self.param_groups[-1].pop("state_dtype", None)

        def _step(self, grads: Iterable[Any]) -> bool:
            grads = _spec.step_grads(grads, _tn)
            groups = self.param_groups
            for group in groups:
                self._spec.validate(group)
            params = [p for g in groups for p in g["params"]]
            _spec.check_grad_count(len(grads), len(params))
            states: list[Any] = []
            steps: list[Any] = []
            created = []
            owners = [g for g in groups for _ in g["params"]]
            for p, g, group in zip(params, grads, owners):
                if g is None:
                    states.append(None)
                    steps.append(None)
                    continue
                entry = self.state.get(p)
                made = None
                if not entry:
                    # torch makes it from the gradient's shape, which is the parameter's (a
                    # gradient of another shape is refused before anything is kept).
                    entry = made = {"step": np.zeros((), np.float32)}
                    for n, s in state_shapes(tuple(np.shape(p))).items():
                        entry[n] = np.zeros(s, dtype=p.dtype)
                master = _spec.wants_master(group, np.asarray(p).dtype.itemsize == 2)
                if master and entry.get(_spec.MASTER) is None:
                    # Switched on later, or loaded without one: made from the parameter.
                    entry = made = {**entry, _spec.MASTER: np.asarray(p).astype(np.float32)}
                if made is not None:
                    created.append((p, made))
                states.append(
                    (*(entry.get(n) for n in NAMES), entry.get(_spec.MASTER) if master else None)
                )
                steps.append(entry.get("step"))
            applied: bool = _core.step_adafactor(
                groups,
                params,
                grads,
                states,
                steps,
                commit=[(self.state, p, e) for p, e in created],
                **self._options(),
            )
            return applied

        def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
            """Restores a ``state_dict()`` of this class or of ``torch.optim.Adafactor`` (by
            position): state arrays cast to each parameter's dtype and copied, as torch does.
            A dict that does not fit (group count or sizes, unknown or missing entries, wrong
            shapes, invalid hyperparameters) raises ValueError or TypeError and changes
            nothing.

            Args:
                state_dict: the mapping ``state_dict()`` returns (torch tensors are accepted
                    as values where they convert to NumPy arrays).
            """
            groups = self.param_groups
            saved_groups, saved_state = _spec.loaded_parts(state_dict, groups, _tn)
            new_groups: list[dict[str, Any]] = []
            by_index: dict[Any, np.ndarray] = {}
            for gi, (group, saved) in enumerate(zip(groups, saved_groups)):
                # torch's own keys that the NumPy API has no use for (foreach) are dropped.
                new = {
                    k: copy.deepcopy(v)
                    for k, v in saved.items()
                    if k not in ("params", "foreach", "state_dtype")
                }
                _spec.complete_loaded_group(new, group, self.defaults, gi)
                if isinstance(new.get("eps"), list):
                    new["eps"] = tuple(new["eps"])
                new["params"] = group["params"]
                self._spec.validate(new)
                new_groups.append(new)
                for i, p in zip(saved["params"], group["params"]):
                    by_index[i] = p
            new_state = type(self.state)()
            for i, saved in saved_state.items():
                if i not in by_index:
                    raise ValueError(
                        f"loaded state dict has state for unknown parameter index {i!r}"
                    )
                p = by_index[i]
                where = f"loaded state[{i!r}]"
                if not isinstance(saved, Mapping):
                    raise TypeError(f"{where} must be a mapping, got {_tn(saved)}")
                shapes = state_shapes(p.shape)
                known = {"step", *shapes, _spec.MASTER}
                unknown = sorted(set(saved) - known, key=str)
                if unknown:
                    raise ValueError(
                        f"{where} has unexpected entries {unknown}; a parameter of shape "
                        f"{p.shape} keeps {sorted(known)}"
                    )
                entry: dict[str, Any] = {}
                for name, value in saved.items():
                    if name == "step":
                        entry[name] = _load_step(_as_numpy(value), where)
                    elif name == _spec.MASTER:
                        # float32 whatever the parameter's dtype, bit for bit.
                        entry[name] = _load_buffer(
                            _as_numpy(value), p, f"{where}['{name}']", np.dtype(np.float32)
                        )
                    else:
                        arr = _as_numpy(value)
                        if np.shape(arr) != shapes[name]:
                            raise ValueError(
                                f"{where}['{name}'] has shape {np.shape(arr)}, expected "
                                f"{shapes[name]} for a parameter of shape {p.shape}"
                            )
                        # Checked (a float array) and cast against a stand-in of its shape.
                        like = np.empty(shapes[name], dtype=p.dtype)
                        entry[name] = _load_buffer(arr, like, f"{where}['{name}']", p.dtype)
                # A master copy absent is made from the parameter at the next step.
                missing = sorted(known - set(entry) - {_spec.MASTER})
                if entry and missing:
                    raise ValueError(f"{where} is missing {missing}")
                new_state[p] = entry
            self.param_groups = new_groups
            self.state = new_state
            self._plan = None

    # Named as ``optirs.Adafactor``, so that pickle finds it there.
    Adafactor.__module__ = "optirs"
    Adafactor.__qualname__ = "Adafactor"
    Adafactor.__init__.__doc__ = init_doc(
        "torch.optim.Adafactor's arguments, defaults and checks, then optirs's own options.",
        "numpy",
    )
    return Adafactor


def _as_numpy(value: Any) -> Any:
    """A torch tensor's values as a NumPy array (a state dict of torch.optim's); anything else
    as it is."""
    if type(value).__module__.startswith("torch") and hasattr(value, "detach"):
        t = value.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            import ml_dtypes
            import torch

            return t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
    return value


__all__ = ["NAMES", "make_numpy_class", "state_shapes"]
