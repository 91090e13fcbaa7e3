"""8-bit Adam and AdamW for the NumPy API (``optirs.Adam8bit``, ``optirs.AdamW8bit``).

Blockwise dynamic quantization as bitsandbytes' 8-bit optimizers (Dettmers et al. 2021): each
moment of a parameter with at least ``min_8bit_size`` elements is kept as one byte per element,
a code into a 256-entry dynamic map (signed for ``exp_avg``, unsigned for ``exp_avg_sq``;
``code_map``), with one float32 absmax per block of ``block_size`` elements. A step dequantizes,
updates exactly as float32 Adam does, finds each block's new absmax and requantizes to the
nearest code, in one pass (``optirs_core::kernels::adam8bit`` documents the scheme and its
non-finite handling). Smaller parameters keep float32 Adam state (in the parameter's dtype).

State of an 8-bit parameter: ``step`` (0-d float32), ``exp_avg`` and ``exp_avg_sq`` (uint8, the
parameter's shape), ``exp_avg_absmax`` and ``exp_avg_sq_absmax`` (float32, one per block).
Under ``master_weights`` a float16/bfloat16 parameter (8-bit or not) also keeps
``master_param`` (float32, its shape), which the step reads and updates in its block pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from . import _core, _spec

#: The state entries of an 8-bit parameter besides ``step``, in the order the core takes them.
Q8_NAMES = ("exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax")
#: The state entries of a parameter that keeps float Adam state (under ``min_8bit_size``).
_FLOAT = ("exp_avg", "exp_avg_sq")
#: The moment each code array belongs to, and whether its map is signed.
_MOMENTS = (("exp_avg", "exp_avg_absmax", True), ("exp_avg_sq", "exp_avg_sq_absmax", False))


def code_map(signed: bool) -> np.ndarray:
    """The 256 values of the dynamic code map, ascending (float32): ``signed`` for ``exp_avg``,
    unsigned for ``exp_avg_sq``."""
    return np.array(_core.code_map(signed), dtype=np.float32)


def _zero_code(signed: bool) -> int:
    return int(np.flatnonzero(code_map(signed) == 0.0)[0])


def check_options(block_size: Any, min_8bit_size: Any) -> tuple[int, int]:
    """``block_size`` (1 to 4096) and ``min_8bit_size`` (>= 0) as ints, or ValueError."""
    for name, v in (("block_size", block_size), ("min_8bit_size", min_8bit_size)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if not 1 <= block_size <= 4096:
        raise ValueError(f"block_size must be between 1 and 4096, got {block_size}")
    if min_8bit_size < 0:
        raise ValueError(f"min_8bit_size must be >= 0, got {min_8bit_size}")
    return int(block_size), int(min_8bit_size)


def quantize(x: np.ndarray, signed: bool, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``x`` (any float dtype) as codes of its shape and float32 block absmaxes."""
    flat = np.ascontiguousarray(np.asarray(x, dtype=np.float32).reshape(-1))
    codes, absmax = _core.quantize_8bit(flat, signed, block_size)
    return codes.reshape(np.shape(x)), absmax


def dequantize(codes: np.ndarray, absmax: np.ndarray, signed: bool, block_size: int) -> np.ndarray:
    """The float32 values ``codes`` and ``absmax`` stand for, in ``codes``' shape."""
    flat = np.ascontiguousarray(np.asarray(codes, dtype=np.uint8).reshape(-1))
    a = np.ascontiguousarray(np.asarray(absmax, dtype=np.float32).reshape(-1))
    return _core.dequantize_8bit(flat, a, signed, block_size).reshape(np.shape(codes))


def new_state(shape: tuple[int, ...], size: int, block_size: int) -> dict[str, np.ndarray]:
    """A fresh 8-bit state (zero moments) for a parameter of ``shape``."""
    blocks = -(-size // block_size)
    return {
        "step": np.zeros((), np.float32),
        "exp_avg": np.full(shape, _zero_code(True), np.uint8),
        "exp_avg_sq": np.full(shape, _zero_code(False), np.uint8),
        "exp_avg_absmax": np.zeros(blocks, np.float32),
        "exp_avg_sq_absmax": np.zeros(blocks, np.float32),
    }


def is_8bit(entry: Mapping[str, Any]) -> bool:
    """Whether a state entry is 8-bit (has block absmaxes)."""
    return "exp_avg_absmax" in entry


def to_float_entry(entry: Mapping[str, Any], block_size: int) -> dict[str, Any]:
    """An 8-bit state entry as float32 Adam state (the way back to torch.optim)."""
    out = {k: v for k, v in entry.items() if k not in Q8_NAMES}
    for codes, absmax, signed in _MOMENTS:
        out[codes] = dequantize(entry[codes], entry[absmax], signed, block_size)
    return out


def check_8bit_entry(entry: Mapping[str, Any], shape: tuple[int, ...], block_size: int, where: str):
    """Refuses (ValueError/TypeError) a saved 8-bit entry that does not fit a parameter of
    ``shape`` with blocks of ``block_size``."""
    blocks = -(-int(np.prod(shape, dtype=np.int64)) // block_size)
    for codes, absmax, _ in _MOMENTS:
        if codes not in entry or absmax not in entry:
            raise ValueError(f"{where} is missing {codes!r} or {absmax!r}")
        c, a = np.asarray(entry[codes]), np.asarray(entry[absmax])
        if c.dtype != np.uint8 or tuple(c.shape) != tuple(shape):
            raise TypeError(
                f"{where}[{codes!r}] must be uint8 codes of shape {tuple(shape)}, got "
                f"{c.dtype} of shape {c.shape}"
            )
        if a.dtype != np.float32 or a.shape != (blocks,):
            raise TypeError(
                f"{where}[{absmax!r}] must be {blocks} float32 block absmaxes (block_size "
                f"{block_size}), got {a.dtype} of shape {a.shape}"
            )


#: The 8-bit optimizers' own arguments, after Adam's (keyword-only in both APIs).
OPTIONS: tuple[_spec.Param, ...] = (
    _spec.Param(
        "block_size",
        256,
        "int",
        keyword_only=True,
        doc="elements per quantization block: each block of a moment keeps one float32 absmax "
        "(1 to 4096).",
    ),
    _spec.Param(
        "min_8bit_size",
        4096,
        "int",
        keyword_only=True,
        doc="parameters with fewer elements keep float Adam state, in the parameter's dtype "
        "(>= 0).",
    ),
)


def init_doc(intro: str, spec: _spec.Spec, api: str) -> str:
    """The constructor docstring of an 8-bit class over ``spec`` (Adam's or AdamW's) in ``api``
    (``"numpy"`` or ``"torch"``): ``intro``, then each argument, in the signature's order."""
    params = spec.params if api == "torch" else spec.numpy_params
    params = tuple(
        dataclasses.replace(p, doc="must be False: AMSGrad is not supported (ValueError).")
        if p.name == "amsgrad"
        else p
        for p in params
    )
    own = tuple(p for p in _spec.OWN_OPTIONS if p.name != "state_dtype")
    return f"{intro}\n\n{_spec.args_doc((*params, *OPTIONS, *own), api)}"


def make_numpy_classes(optimizer_base: Any) -> tuple[type, type]:
    """``Adam8bit`` and ``AdamW8bit`` over the NumPy API's ``Optimizer``."""

    class Adam8bit(optimizer_base):  # type: ignore[misc,valid-type]
        """Adam (and, with ``decoupled_weight_decay=True``, AdamW) with 8-bit state:
        ``torch.optim.Adam``'s update over NumPy arrays, each moment kept in 8 bits per element
        with float32 block absmaxes (see the README's "Fewer bytes of state"). amsgrad is not
        supported.

        State of a parameter of ``min_8bit_size`` elements or more: ``step`` (0-d float32),
        ``exp_avg`` and ``exp_avg_sq`` (uint8 codes, the parameter's shape),
        ``exp_avg_absmax`` and ``exp_avg_sq_absmax`` (float32, one per block); of a smaller
        one, float Adam state (``step``, ``exp_avg``, ``exp_avg_sq``); under
        ``master_weights``, a 16-bit parameter's ``master_param`` (float32).
        """

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
            maximize: bool = False,
            decoupled_weight_decay: bool = False,
            block_size: int = 256,
            min_8bit_size: int = 4096,
            skip_nonfinite: bool = False,
            flush_denormals: bool = False,
            bf16_stochastic_round: bool = False,
            master_weights: bool = False,
            seed: int | None = None,
        ) -> None:
            if amsgrad:
                raise ValueError(f"{type(self).__name__} does not support amsgrad=True")
            self.block_size, self.min_8bit_size = check_options(block_size, min_8bit_size)
            defaults = {
                "lr": lr,
                "betas": _spec._pair(betas),
                "eps": eps,
                "weight_decay": weight_decay,
                "amsgrad": False,
                "maximize": maximize,
                "decoupled_weight_decay": decoupled_weight_decay,
                **_spec.rounding_entries(
                    bf16_stochastic_round, master_weights, seed, default_base=0
                ),
                **self._spec.fixed,
            }
            self._spec.validate(defaults)
            optimizer_base.__init__(
                self,
                params,
                defaults,
                skip_nonfinite=skip_nonfinite,
                flush_denormals=flush_denormals,
            )

        def _new_entry(self, p: np.ndarray) -> dict[str, np.ndarray]:
            if p.size >= self.min_8bit_size:
                return new_state(p.shape, p.size, self.block_size)
            return {
                "step": np.zeros((), np.float32),
                "exp_avg": np.zeros_like(p),
                "exp_avg_sq": np.zeros_like(p),
            }

        def _entry_for_step(
            self, p: np.ndarray, group: Mapping[str, Any]
        ) -> tuple[dict[str, Any] | None, tuple[Any, ...]]:
            """The state entry made for this step (None when ``p``'s own is complete) and
            ``p``'s state tuple for the core."""
            entry = self.state.get(p)
            made = None
            if not entry:
                entry = made = self._new_entry(p)
            master = _spec.wants_master(group, p.dtype.itemsize == 2)
            if master and entry.get(_spec.MASTER) is None:
                # Switched on later, or loaded without one: made from the parameter.
                entry = made = {**entry, _spec.MASTER: p.astype(np.float32)}
            if is_8bit(entry):
                names: tuple[str, ...] = Q8_NAMES
            else:
                names = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if master else _FLOAT
            states = tuple(entry.get(n) for n in names)
            if master:
                states += (entry[_spec.MASTER],)
            return made, states

        def _step(self, grads: Iterable[Any]) -> bool:
            grads = _spec.step_grads(grads, lambda x: type(x).__name__)
            groups = self.param_groups
            for group in groups:
                self._spec.validate(group)
                if group.get("amsgrad"):
                    raise ValueError(f"{type(self).__name__} does not support amsgrad=True")
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
                made, state = self._entry_for_step(p, group)
                if made is not None:
                    created.append((p, made))
                states.append(state)
                steps.append((made or self.state.get(p)).get("step"))
            applied: bool = _core.step_adam8bit(
                groups,
                params,
                grads,
                states,
                steps,
                block_size=self.block_size,
                commit=[(self.state, p, e) for p, e in created],
                **self._options(),
            )
            return applied

        def dequantized_state_dict(self) -> dict[str, Any]:
            """``state_dict()`` with every 8-bit moment dequantized to float32 and no absmax
            entries: what ``torch.optim.Adam``/``optirs.Adam`` load (the way back)."""
            sd = self.state_dict()
            sd["state"] = {
                i: to_float_entry(e, self.block_size) if is_8bit(e) else e
                for i, e in sd["state"].items()
            }
            return sd

        def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
            """Restores a ``state_dict()`` of this class (8-bit entries copied exactly, so a
            run continues bit for bit) or of float32 Adam (``torch.optim.Adam``,
            ``optirs.Adam``): float32 moments of a parameter with ``min_8bit_size`` elements or
            more are quantized. A dict that does not fit raises and changes nothing.

            Args:
                state_dict: a state dict in torch's layout.
            """
            if not isinstance(state_dict, Mapping) or not isinstance(
                state_dict.get("state"), Mapping
            ):
                optimizer_base.load_state_dict(self, state_dict)  # its precise error
                return
            shapes = {}
            saved_groups = state_dict.get("param_groups") or []
            for g, sg in zip(self.param_groups, saved_groups):
                if isinstance(sg, Mapping):
                    for i, p in zip(sg.get("params", ()), g["params"]):
                        shapes[i] = p
            floats: dict[Any, Any] = {}
            exact: dict[Any, dict[str, Any]] = {}
            for i, entry in state_dict["state"].items():
                if isinstance(entry, Mapping) and is_8bit(entry) and i in shapes:
                    where = f"loaded state[{i!r}]"
                    check_8bit_entry(entry, shapes[i].shape, self.block_size, where)
                    exact[i] = {n: np.array(entry[n], copy=True) for n in Q8_NAMES}
                    floats[i] = to_float_entry(entry, self.block_size)
                else:
                    floats[i] = entry
            # The float32 form goes through the base class's checks; nothing changes on error.
            optimizer_base.load_state_dict(self, {**state_dict, "state": floats})
            for i, p in shapes.items():
                entry = self.state.get(p)
                if not entry:
                    continue
                if i in exact and p.size >= self.min_8bit_size:
                    entry.update(exact[i])
                elif p.size >= self.min_8bit_size:
                    for codes, absmax, signed in _MOMENTS:
                        entry[codes], entry[absmax] = quantize(
                            entry[codes], signed, self.block_size
                        )
                elif i in exact:
                    # A small parameter keeps float32 state: the dequantized moments.
                    for n in ("exp_avg_absmax", "exp_avg_sq_absmax"):
                        entry.pop(n, None)

        def __repr__(self) -> str:
            return optimizer_base.__repr__(self)

    class AdamW8bit(Adam8bit):
        """AdamW with 8-bit state: ``Adam8bit`` with the weight decay decoupled (default
        ``weight_decay`` 1e-2); the same arguments but ``decoupled_weight_decay``."""

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
            block_size: int = 256,
            min_8bit_size: int = 4096,
            skip_nonfinite: bool = False,
            flush_denormals: bool = False,
            bf16_stochastic_round: bool = False,
            master_weights: bool = False,
            seed: int | None = None,
        ) -> None:
            super().__init__(
                params,
                lr,
                betas,
                eps,
                weight_decay,
                amsgrad,
                maximize=maximize,
                decoupled_weight_decay=True,
                block_size=block_size,
                min_8bit_size=min_8bit_size,
                skip_nonfinite=skip_nonfinite,
                flush_denormals=flush_denormals,
                bf16_stochastic_round=bf16_stochastic_round,
                master_weights=master_weights,
                seed=seed,
            )

    Adam8bit.__init__.__doc__ = init_doc(
        "torch.optim.Adam's arguments, defaults and checks, then the 8-bit options and "
        "optirs's own.",
        _spec.ADAM,
        "numpy",
    )
    AdamW8bit.__init__.__doc__ = init_doc(
        "torch.optim.AdamW's arguments, defaults and checks, then the 8-bit options and "
        "optirs's own.",
        _spec.ADAMW,
        "numpy",
    )
    Adam8bit.__module__ = AdamW8bit.__module__ = "optirs"
    return Adam8bit, AdamW8bit


__all__ = ["Q8_NAMES", "code_map", "dequantize", "make_numpy_classes", "quantize"]
