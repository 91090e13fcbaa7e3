"""Each optimizer, declared once: its arguments, their checks, its state and how it is made.

One ``Spec`` per optimizer (``SPECS``, by torch's class name) is read by everything that
depends on what an optimizer is:

- the NumPy API (``optirs``) and the torch bridge (``optirs.torch``) build their constructors
  from ``params`` (``numpy_init`` and ``bridge_init``: torch's signature, defaults and order);
- both make and look up state through ``state`` (torch's key names, in the order the Rust core
  takes the buffers, when each exists, how a new one is filled) with ``missing`` and
  ``new_state``;
- the benchmark counts the bytes a step moves from the buffers a configuration uses
  (``required``), and the tests take their per-optimizer tables from here.

The validation is torch.optim's constructor checks, in torch's words: the NumPy API applies them
at construction and at every step; the torch bridge, like torch.optim, only at construction
(torch's own constructor), and steps with whatever is set later. Adding an optimizer means a
kernel in the Rust core and one ``Spec`` here.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import textwrap
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import numpy as np

T = TypeVar("T")


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


def _check_adadelta(g: Mapping[str, Any]) -> None:
    _check_lr(g)
    if not 0.0 <= _real("rho", g["rho"]) <= 1.0:
        raise ValueError(f"Invalid rho value: {g['rho']}")
    _check_eps(g)
    _check_wd(g)


def _pair_of_reals(name: str, value: Any) -> tuple[float, float]:
    try:
        n = len(value)
    except TypeError:
        n = -1
    if n != 2:
        raise TypeError(f"{name} must be a pair of floats, got {value!r}")
    return _real(f"{name}[0]", value[0]), _real(f"{name}[1]", value[1])


def _check_rprop(g: Mapping[str, Any]) -> None:
    _check_lr(g)
    etas = g["etas"]
    minus, plus = _pair_of_reals("etas", etas)
    if not 0.0 < minus < 1.0 < plus:
        raise ValueError(f"Invalid eta values: {etas[0]}, {etas[1]}")
    _pair_of_reals("step_sizes", g["step_sizes"])


def _check_lion(g: Mapping[str, Any]) -> None:
    # lion-pytorch asserts lr > 0 and 0 <= beta <= 1; optirs words and orders its checks as
    # torch.optim's constructors do (lr >= 0, as theirs).
    _check_lr(g)
    betas = g["betas"]
    b = _pair_of_reals("betas", betas)
    for i in (0, 1):
        if not 0.0 <= b[i] <= 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {betas[i]}")
    _check_wd(g)


def _always(group: Mapping[str, Any]) -> bool:
    return True


def _pair(value: Any) -> Any:
    # torch keeps betas as the caller gave them; a list is made a tuple so that a group compares
    # and pickles the same however it was written.
    return tuple(value) if isinstance(value, list) else value


@dataclass(frozen=True)
class Param:
    """One constructor argument, as torch.optim's signature has it."""

    name: str
    default: Any
    #: the annotation shown by ``help()`` and ``inspect.signature``
    annotation: str
    #: keyword-only in torch's signature
    keyword_only: bool = False
    #: one of torch's implementation switches (foreach, fused, capturable, differentiable): the
    #: torch bridge takes it (and passes it to torch), the NumPy API has no such argument
    torch_only: bool = False
    #: how the NumPy API stores a value given for it
    convert: Callable[[Any], Any] | None = None
    #: what it means, for the constructor's ``Args:`` section (``args_doc``)
    doc: str = ""


#: torch's implementation switches, as the torch bridge treats them.
_SWITCH_DOCS = {
    "foreach": "torch's choice of implementation: passed to torch's constructor and kept in the "
    "param groups; optirs's step, a single native call, does not read it.",
    "fused": "torch's choice of implementation: passed to torch's constructor and kept in the "
    "param groups; optirs's step, a single native call, does not read it.",
    "capturable": "must be False (ValueError otherwise): optirs steps outside CUDA graphs.",
    "differentiable": "must be False (ValueError otherwise): optirs steps outside autograd.",
}


def _torch_switch(name: str, default: Any, annotation: str, keyword_only: bool = True) -> Param:
    return Param(
        name,
        default,
        annotation,
        keyword_only=keyword_only,
        torch_only=True,
        doc=_SWITCH_DOCS[name],
    )


# What the arguments many optimizers share mean (torch's words, where torch documents them).
_LR = "learning rate."
_WD = "weight decay (L2 penalty): ``weight_decay * param`` is added to the gradient."
_EPS = "term added to the denominator to improve numerical stability."
_BETAS = "coefficients used for computing running averages of the gradient and its square."
_MAXIMIZE = "maximize the objective with respect to the params, instead of minimizing."
_DECOUPLED = (
    "decouple the weight decay as AdamW does: the parameter is multiplied by "
    "``1 - lr * weight_decay`` before the update instead of the decay being added to the gradient."
)


def _maximize() -> Param:
    return Param("maximize", False, "bool", keyword_only=True, doc=_MAXIMIZE)


@dataclass(frozen=True)
class Buffer:
    """One state buffer: torch's key for it, when a parameter has one, how a new one starts."""

    name: str
    #: its name in the benchmark's description of a step's memory traffic
    short: str
    #: whether a group with these options uses it
    when: Callable[[Mapping[str, Any]], bool] = _always
    #: the hyperparameter whose value fills a new buffer; None: zeros
    fill: str | None = None
    #: a new buffer is made from the step's gradient by the kernel (SGD's momentum), so a
    #: parameter whose other state is there may lack it, as torch.optim.SGD allows
    from_grad: bool = False
    #: torch reads ``fill`` from the parameter's group (Rprop's ``lr``), not from the
    #: optimizer's defaults (Adagrad's ``initial_accumulator_value``)
    fill_from_group: bool = False


@dataclass(frozen=True)
class Scalar:
    """One per-parameter 0-d state value besides ``step`` (NAdam's ``mu_product``, ASGD's
    ``eta``), which the core reads before the step and updates with the counter. torch keeps it
    as a 0-d float32 tensor (in the parameter's dtype once a state dict is loaded)."""

    name: str
    #: what a new one holds: a number, or the name of the group hyperparameter it starts from
    fill: float | str


@dataclass(frozen=True)
class Spec:
    """One optimizer: what torch.optim calls it, its arguments, checks and state."""

    #: torch.optim's class name, and the NumPy API's and torch bridge's
    name: str
    #: name of the update rule in ``optirs._core.step``
    kind: str
    #: the constructor's arguments after ``params``, in torch's order
    params: tuple[Param, ...]
    #: the state buffers, in the order the core takes them
    state: tuple[Buffer, ...]
    #: whether a 0-d float32 ``step`` counter is kept
    counts_steps: bool
    #: raises ValueError/TypeError, in torch's words, for a group torch.optim's constructor
    #: would refuse (the NumPy API's check; the torch bridge leaves it to torch's constructor)
    validate: Callable[[Mapping[str, Any]], None]
    #: group entries the class sets itself rather than taking them as arguments
    fixed: Mapping[str, Any] = field(default_factory=dict)
    #: the NumPy API makes every parameter's state when it is added, as torch's constructor does
    state_at_construction: bool = False
    #: switches the torch bridge refuses when True, checked in this order
    refused: tuple[str, ...] = ("differentiable",)
    #: torch's message for a sparse gradient, where torch refuses them too
    sparse_message: str | None = None
    #: torch.optim has a class of this name (Lion has none: its bridge class subclasses
    #: ``torch.optim.Optimizer``, and the tests compare it with a reference of their own)
    in_torch: bool = True
    #: per-parameter 0-d state besides ``step``, in the order the core takes it (after the
    #: buffers, in the same tuple)
    scalars: tuple[Scalar, ...] = ()
    #: each element's update reads only that element's parameter, gradient and state (and the
    #: scalars): a DTensor's local shard can then be stepped on its own (``optirs.torch._dtensor``);
    #: False for factored rules, which are refused on sharded DTensor parameters
    elementwise: bool = True

    @property
    def buffers(self) -> tuple[str, ...]:
        """The state buffers' names, in the order the core takes them."""
        return tuple(b.name for b in self.state)

    @property
    def scalar_names(self) -> tuple[str, ...]:
        """The per-parameter 0-d state values' names, in the order the core takes them."""
        return tuple(s.name for s in self.scalars)

    @property
    def entries(self) -> tuple[str, ...]:
        """What the core takes per parameter, in its order: the buffers, then the scalars."""
        return (*self.buffers, *self.scalar_names)

    @property
    def keys(self) -> frozenset[str]:
        """Every state key a parameter may have."""
        return frozenset(
            (*self.buffers, *(("step",) if self.counts_steps else ()), *self.scalar_names)
        )

    @property
    def numpy_params(self) -> tuple[Param, ...]:
        """The NumPy API's arguments: torch's without torch's switches. Whatever follows a
        switch in torch's order is keyword-only, so that no positional call means different
        things in the two APIs."""
        out: list[Param] = []
        after_switch = False
        for p in self.params:
            if p.torch_only:
                after_switch = True
            else:
                out.append(dataclasses.replace(p, keyword_only=p.keyword_only or after_switch))
        return tuple(out)

    @property
    def defaults(self) -> dict[str, Any]:
        """The NumPy API's defaults: what a param group holds when nothing is given."""
        return {**{p.name: p.default for p in self.numpy_params}, **self.fixed}

    def needs(self, group: Mapping[str, Any]) -> tuple[bool, ...]:
        """Which of ``buffers`` a group's options use."""
        return tuple(bool(b.when(group)) for b in self.state)

    def required(self, group: Mapping[str, Any]) -> tuple[str, ...]:
        """The buffers a parameter of ``group`` must have once it has stepped."""
        return tuple(b.name for b in self.state if b.when(group))

    def missing(
        self,
        group: Mapping[str, Any],
        state: Mapping[str, Any],
        *,
        none_step: bool = True,
        master: bool = False,
    ) -> list[str]:
        """The entries (buffers, then ``step``) a parameter of ``group`` lacks to step: absent
        or None; a ``step`` of None only with ``none_step`` (the NumPy API leaves such an
        entry to the core, which refuses it)."""
        names = [b.name for b in self.state if b.when(group) and state.get(b.name) is None]
        if self.counts_steps and (state.get("step") is None if none_step else "step" not in state):
            names.append("step")
        names.extend(n for n in self.scalar_names if state.get(n) is None)
        if master and state.get(MASTER) is None:
            names.append(MASTER)
        return names

    def incomplete(self, missing: Collection[str]) -> list[str]:
        """Of ``missing``, what a parameter that has other state must not lack: every entry
        but a buffer the kernel makes from the gradient (torch's "no momentum buffer yet")."""
        # A master copy absent from a loaded state is made from the parameter.
        from_grad = {b.name for b in self.state if b.from_grad} | {MASTER}
        return [n for n in missing if n not in from_grad]

    def fresh(self, missing: Collection[str]) -> bool:
        """Whether the kernel makes a buffer from this step's gradient (the ``fresh`` flag)."""
        return any(b.from_grad and b.name in missing for b in self.state)

    def new_state(
        self,
        missing: Iterable[str],
        values: Mapping[str, Any],
        full: Callable[[float], T],
        step: Callable[[], T],
        scalar: Callable[[float], T] | None = None,
        group: Mapping[str, Any] | None = None,
    ) -> dict[str, T]:
        """The entries ``missing`` names, made the one way both APIs make them: ``full(x)`` a
        buffer like the parameter filled with ``x`` (0, or the hyperparameter the buffer's
        ``fill`` names, read from ``values``), ``step()`` a zero step counter, ``scalar(x)`` a
        0-d state value holding ``x`` (its ``fill``, or the hyperparameter it names, read from
        ``group``, as torch's ``_init_group`` reads it; ``values`` when None)."""
        fills = {b.name: b.fill for b in self.state}
        scalar_fills = {s.name: s.fill for s in self.scalars}
        out: dict[str, T] = {}
        for n in missing:
            if n == MASTER:
                continue  # made by the caller, from the parameter
            if n == "step":
                out[n] = step()
            elif n in scalar_fills:
                if scalar is None:
                    raise TypeError(f"{self.name} keeps 0-d state: new_state needs scalar=")
                start = scalar_fills[n]
                source = values if group is None else group
                out[n] = scalar(float(source[start]) if isinstance(start, str) else start)
            else:
                fill = fills[n]
                out[n] = full(0.0 if fill is None else values[fill])
        return out

    def fill_values(self, defaults: Mapping[str, Any], group: Mapping[str, Any]) -> dict[str, Any]:
        """The values new buffers are filled with, where torch reads each (``Buffer.fill``
        from the optimizer's ``defaults`` or, ``fill_from_group``, from the ``group``)."""
        return {
            b.fill: (group if b.fill_from_group else defaults)[b.fill]
            for b in self.state
            if b.fill is not None
        }

    def derive(self, name: str, **changes: Any) -> Spec:
        """Another optimizer over the same rule and state: a copy with ``changes``."""
        return dataclasses.replace(self, name=name, **changes)


def _with_defaults(params: Sequence[Param], **defaults: Any) -> tuple[Param, ...]:
    return tuple(
        dataclasses.replace(p, default=defaults[p.name]) if p.name in defaults else p
        for p in params
    )


def _with_docs(params: Sequence[Param], **docs: str) -> tuple[Param, ...]:
    return tuple(dataclasses.replace(p, doc=docs[p.name]) if p.name in docs else p for p in params)


def _ordered(params: Sequence[Param], *names: str) -> tuple[Param, ...]:
    by_name = {p.name: p for p in params}
    return tuple(by_name[n] for n in names)


SGD = Spec(
    name="SGD",
    kind="sgd",
    params=(
        Param("lr", 1e-3, "float", doc=_LR),
        Param("momentum", 0, "float", doc="momentum factor (0: plain SGD, no momentum buffer)."),
        Param("dampening", 0, "float", doc="dampening for momentum."),
        Param("weight_decay", 0, "float", doc=_WD),
        Param(
            "nesterov",
            False,
            "bool",
            doc="enables Nesterov momentum (needs a momentum and zero dampening).",
        ),
        _maximize(),
        _torch_switch("foreach", None, "bool | None"),
        _torch_switch("differentiable", False, "bool"),
        _torch_switch("fused", None, "bool | None"),
    ),
    state=(Buffer("momentum_buffer", "buf", when=lambda g: g["momentum"] != 0, from_grad=True),),
    counts_steps=False,
    validate=_check_sgd,
)
ADAM = Spec(
    name="Adam",
    kind="adam",
    params=(
        Param("lr", 1e-3, "float", doc=_LR),
        Param("betas", (0.9, 0.999), "tuple[float, float]", convert=_pair, doc=_BETAS),
        Param("eps", 1e-8, "float", doc=_EPS),
        Param("weight_decay", 0, "float", doc=_WD + " Decoupled with decoupled_weight_decay."),
        Param(
            "amsgrad",
            False,
            "bool",
            doc="use the AMSGrad variant: the running maximum of ``exp_avg_sq`` "
            "(``max_exp_avg_sq``) takes its place in the denominator.",
        ),
        _torch_switch("foreach", None, "bool | None"),
        _maximize(),
        _torch_switch("capturable", False, "bool"),
        _torch_switch("differentiable", False, "bool"),
        _torch_switch("fused", None, "bool | None"),
        Param(
            "decoupled_weight_decay",
            False,
            "bool",
            keyword_only=True,
            doc=_DECOUPLED + " True makes this AdamW.",
        ),
    ),
    state=(
        Buffer("exp_avg", "m"),
        Buffer("exp_avg_sq", "v"),
        Buffer("max_exp_avg_sq", "vmax", when=lambda g: bool(g["amsgrad"])),
    ),
    counts_steps=True,
    validate=_check_adam,
    refused=("differentiable", "capturable"),
    sparse_message="Adam does not support sparse gradients, please consider SparseAdam instead",
)
#: Adam with the weight decay decoupled, always: a larger default, and no switch for it.
#: torch.optim.AdamW's keyword-only arguments come in another order than Adam's.
ADAMW = ADAM.derive(
    "AdamW",
    params=_ordered(
        _with_defaults(
            _with_docs(
                ADAM.params,
                weight_decay="decoupled weight decay coefficient: the parameter is multiplied "
                "by ``1 - lr * weight_decay`` before the Adam update.",
            ),
            weight_decay=1e-2,
        ),
        *("lr", "betas", "eps", "weight_decay", "amsgrad"),
        *("maximize", "foreach", "capturable", "differentiable", "fused"),
    ),
    fixed={"decoupled_weight_decay": True},
)
RMSPROP = Spec(
    name="RMSprop",
    kind="rmsprop",
    params=(
        Param("lr", 1e-2, "float", doc=_LR),
        Param(
            "alpha",
            0.99,
            "float",
            doc="smoothing constant: the decay of the running average of the squared gradient.",
        ),
        Param("eps", 1e-8, "float", doc=_EPS),
        Param("weight_decay", 0, "float", doc=_WD),
        Param("momentum", 0, "float", doc="momentum factor (> 0 keeps a ``momentum_buffer``)."),
        Param(
            "centered",
            False,
            "bool",
            doc="compute the centered RMSprop: the gradient is normalized by an estimate of its "
            "variance (keeps ``grad_avg``).",
        ),
        _torch_switch("capturable", False, "bool", keyword_only=False),
        _torch_switch("foreach", None, "bool | None", keyword_only=False),
        Param("maximize", False, "bool", doc=_MAXIMIZE),
        _torch_switch("differentiable", False, "bool", keyword_only=False),
    ),
    state=(
        Buffer("square_avg", "sq"),
        Buffer("momentum_buffer", "buf", when=lambda g: g["momentum"] > 0),
        Buffer("grad_avg", "ga", when=lambda g: bool(g["centered"])),
    ),
    counts_steps=True,
    validate=_check_rmsprop,
    refused=("differentiable", "capturable"),
    sparse_message="RMSprop does not support sparse gradients",
)
ADAGRAD = Spec(
    name="Adagrad",
    kind="adagrad",
    params=(
        Param("lr", 1e-2, "float", doc=_LR),
        Param(
            "lr_decay",
            0,
            "float",
            doc="learning rate decay: step ``t`` uses ``lr / (1 + (t - 1) * lr_decay)``.",
        ),
        Param("weight_decay", 0, "float", doc=_WD),
        Param(
            "initial_accumulator_value",
            0,
            "float",
            doc="initial value of the sum of squared gradients (``sum``).",
        ),
        Param("eps", 1e-10, "float", doc=_EPS),
        _torch_switch("foreach", None, "bool | None", keyword_only=False),
        _maximize(),
        _torch_switch("differentiable", False, "bool"),
        _torch_switch("fused", None, "bool | None"),
    ),
    state=(Buffer("sum", "sum", fill="initial_accumulator_value"),),
    counts_steps=True,
    validate=_check_adagrad,
    state_at_construction=True,
)

ADADELTA = Spec(
    name="Adadelta",
    kind="adadelta",
    params=(
        Param(
            "lr",
            1.0,
            "float",
            doc="coefficient that scales the delta before it is applied to the parameters.",
        ),
        Param(
            "rho",
            0.9,
            "float",
            doc="coefficient used for computing the running averages of squared gradients and "
            "squared deltas.",
        ),
        Param("eps", 1e-6, "float", doc=_EPS),
        Param("weight_decay", 0, "float", doc=_WD),
        _torch_switch("foreach", None, "bool | None", keyword_only=False),
        _torch_switch("capturable", False, "bool"),
        _maximize(),
        _torch_switch("differentiable", False, "bool"),
    ),
    state=(Buffer("square_avg", "sq"), Buffer("acc_delta", "acc")),
    counts_steps=True,
    validate=_check_adadelta,
    refused=("differentiable", "capturable"),
    sparse_message="Adadelta does not support sparse gradients",
)
RADAM = Spec(
    name="RAdam",
    kind="radam",
    params=(
        Param("lr", 1e-3, "float", doc=_LR),
        Param("betas", (0.9, 0.999), "tuple[float, float]", convert=_pair, doc=_BETAS),
        Param("eps", 1e-8, "float", doc=_EPS),
        Param("weight_decay", 0, "float", doc=_WD + " Decoupled with decoupled_weight_decay."),
        Param("decoupled_weight_decay", False, "bool", doc=_DECOUPLED + " True makes it RAdamW."),
        _torch_switch("foreach", None, "bool | None"),
        _maximize(),
        _torch_switch("capturable", False, "bool"),
        _torch_switch("differentiable", False, "bool"),
    ),
    state=(Buffer("exp_avg", "m"), Buffer("exp_avg_sq", "v")),
    counts_steps=True,
    validate=_check_adam,
    refused=("differentiable", "capturable"),
    sparse_message="RAdam does not support sparse gradients",
)
RPROP = Spec(
    name="Rprop",
    kind="rprop",
    params=(
        Param("lr", 1e-2, "float", doc="learning rate: each element's initial step size."),
        Param(
            "etas",
            (0.5, 1.2),
            "tuple[float, float]",
            convert=_pair,
            doc="``(etaminus, etaplus)``: the factors that decrease and increase an element's "
            "step size when its gradient changes sign or keeps it.",
        ),
        Param(
            "step_sizes",
            (1e-6, 50),
            "tuple[float, float]",
            convert=_pair,
            doc="the smallest and largest step sizes allowed.",
        ),
        _torch_switch("capturable", False, "bool"),
        _torch_switch("foreach", None, "bool | None"),
        _maximize(),
        _torch_switch("differentiable", False, "bool"),
    ),
    state=(
        Buffer("prev", "prev"),
        Buffer("step_size", "ss", fill="lr", fill_from_group=True),
    ),
    counts_steps=True,
    validate=_check_rprop,
    refused=("differentiable", "capturable"),
    sparse_message="Rprop does not support sparse gradients",
)
#: Lion (Chen et al. 2023) as lion-pytorch computes it; not in torch.optim.
LION = Spec(
    name="Lion",
    kind="lion",
    params=(
        Param("lr", 1e-4, "float", doc=_LR),
        Param(
            "betas",
            (0.9, 0.99),
            "tuple[float, float]",
            convert=_pair,
            doc="``beta1`` interpolates the update's direction between the momentum and the "
            "gradient, ``beta2`` is the momentum's decay (each in [0, 1]).",
        ),
        Param(
            "weight_decay",
            0.0,
            "float",
            doc="decoupled weight decay: the parameter is multiplied by "
            "``1 - lr * weight_decay`` before the update.",
        ),
        _maximize(),
    ),
    state=(Buffer("exp_avg", "m"),),
    counts_steps=False,
    validate=_check_lion,
    refused=(),
    in_torch=False,
)

ADAMAX = Spec(
    name="Adamax",
    kind="adamax",
    params=(
        Param("lr", 2e-3, "float", doc=_LR),
        Param(
            "betas",
            (0.9, 0.999),
            "tuple[float, float]",
            convert=_pair,
            doc="coefficients used for computing running averages of the gradient and of its "
            "infinity norm.",
        ),
        Param("eps", 1e-8, "float", doc=_EPS),
        Param("weight_decay", 0, "float", doc=_WD),
        _torch_switch("foreach", None, "bool | None", keyword_only=False),
        _maximize(),
        _torch_switch("differentiable", False, "bool"),
        _torch_switch("capturable", False, "bool"),
    ),
    state=(Buffer("exp_avg", "m"), Buffer("exp_inf", "u")),
    counts_steps=True,
    validate=_check_adam,
    refused=("differentiable", "capturable"),
    sparse_message="Adamax does not support sparse gradients",
)


def _check_nadam(g: Mapping[str, Any]) -> None:
    _check_adam(g)
    _nonneg("momentum_decay", g["momentum_decay"], "Invalid momentum_decay value: {}")


NADAM = Spec(
    name="NAdam",
    kind="nadam",
    params=(
        Param("lr", 2e-3, "float", doc=_LR),
        Param("betas", (0.9, 0.999), "tuple[float, float]", convert=_pair, doc=_BETAS),
        Param("eps", 1e-8, "float", doc=_EPS),
        Param("weight_decay", 0, "float", doc=_WD + " Decoupled with decoupled_weight_decay."),
        Param("momentum_decay", 4e-3, "float", doc="momentum decay (psi)."),
        Param("decoupled_weight_decay", False, "bool", doc=_DECOUPLED + " True makes it NAdamW."),
        _torch_switch("foreach", None, "bool | None"),
        _maximize(),
        _torch_switch("capturable", False, "bool"),
        _torch_switch("differentiable", False, "bool"),
    ),
    state=(Buffer("exp_avg", "m"), Buffer("exp_avg_sq", "v")),
    counts_steps=True,
    validate=_check_nadam,
    refused=("differentiable", "capturable"),
    sparse_message="NAdam does not support sparse gradients",
    scalars=(Scalar("mu_product", 1.0),),
)


def _check_asgd(g: Mapping[str, Any]) -> None:
    _check_lr(g)
    _nonneg("lambd", g["lambd"], "Invalid lambd value: {}")
    _nonneg("alpha", g["alpha"], "Invalid alpha value: {}")
    _check_wd(g)
    _real("t0", g["t0"])


ASGD = Spec(
    name="ASGD",
    kind="asgd",
    params=(
        Param("lr", 1e-2, "float", doc=_LR),
        Param("lambd", 1e-4, "float", doc="decay term."),
        Param("alpha", 0.75, "float", doc="power for the ``eta`` update."),
        Param("t0", 1e6, "float", doc="the step at which averaging starts (into ``ax``)."),
        Param("weight_decay", 0, "float", doc=_WD),
        _torch_switch("foreach", None, "bool | None", keyword_only=False),
        Param("maximize", False, "bool", doc=_MAXIMIZE),
        _torch_switch("differentiable", False, "bool", keyword_only=False),
        _torch_switch("capturable", False, "bool", keyword_only=False),
    ),
    state=(Buffer("ax", "ax"),),
    counts_steps=True,
    validate=_check_asgd,
    refused=("differentiable", "capturable"),
    sparse_message="ASGD does not support sparse gradients",
    scalars=(Scalar("eta", "lr"), Scalar("mu", 1.0)),
)

#: Every optimizer, by torch.optim's class name, in the order the package lists them.
SPECS: dict[str, Spec] = {
    s.name: s
    for s in (SGD, ADAM, ADAMW, RMSPROP, ADAGRAD, ADADELTA, RADAM, LION, RPROP, ADAMAX, NADAM, ASGD)
}

#: optirs's own options, keyword-only after torch's arguments in both APIs.
#: ``skip_nonfinite`` and ``flush_denormals`` are the optimizer's; ``state_dtype`` goes into the
#: defaults and so into every param group (a group may set its own).
OWN_OPTIONS: tuple[Param, ...] = (
    Param(
        "skip_nonfinite",
        False,
        "bool",
        keyword_only=True,
        doc="skip a whole step, changing nothing, when any gradient holds NaN or infinity; "
        "counted in ``skipped_steps`` and ``last_step_skipped``. Kept by ``load_state_dict``.",
    ),
    Param(
        "flush_denormals",
        False,
        "bool",
        keyword_only=True,
        doc="flush denormal numbers to zero while a step runs (x86-64): faster on some "
        "processors, results change slightly.",
    ),
    Param(
        "state_dtype",
        None,
        "Any",
        keyword_only=True,
        doc="None: the state in the parameter's dtype, as torch keeps it. ``'bfloat16'`` "
        "(or ``torch.bfloat16``, ``ml_dtypes.bfloat16``): every state buffer but ``step`` kept "
        "as bfloat16, computed in float32 and rounded to nearest even when stored (float32 and "
        "16-bit parameters). A param group may set its own.",
    ),
    Param(
        "bf16_stochastic_round",
        False,
        "bool",
        keyword_only=True,
        doc="round each new bfloat16 parameter value up or down at random, with probability "
        "proportional to its distance from each neighbour, keyed by ``seed`` (bfloat16 "
        "parameters; float16 ones are refused, float32/float64 ones left alone). A group option.",
    ),
    Param(
        "master_weights",
        False,
        "bool",
        keyword_only=True,
        doc="keep a float32 copy of each float16/bfloat16 parameter (state ``master_param``), "
        "step the copy and store it rounded to nearest in the parameter. Not with "
        "``bf16_stochastic_round``. A group option.",
    ),
    Param(
        "seed",
        None,
        "Any",
        keyword_only=True,
        doc="the stochastic rounding's seed, an int in ``[0, 2**64)``. None: drawn from "
        "``optirs.manual_seed``'s seed if it was called, else from ``torch.initial_seed()`` "
        "(``optirs.torch``) or 0 (the NumPy API).",
    ),
)

#: The first argument of every optimizer, in each API.
PARAMS_DOC = {
    "numpy": "the arrays to update in place: C-contiguous, writeable ndarrays of float32, "
    "float64 or ``ml_dtypes.bfloat16``; or param groups, dicts with ``params`` and any "
    "hyperparameters of their own (the constructor's values fill the rest).",
    "torch": "the tensors to optimize (``model.parameters()``), or param groups, dicts with "
    "``params`` and any hyperparameters of their own, as torch.optim takes them.",
}


def args_doc(params: Sequence[Param], api: str) -> str:
    """The ``Args:`` section of a constructor ``(params, <params>)`` (Google style, which
    Sphinx's napoleon renders): each argument with its type, what it means and its default.

    Args:
        params: the arguments after ``params``, in the signature's order.
        api: ``"numpy"`` or ``"torch"``: which API's ``params`` argument to describe.
    """
    lines = ["Args:"]

    def item(head: str, text: str) -> None:
        lines.append(
            textwrap.fill(
                f"{head}: {text}", width=92, initial_indent="    ", subsequent_indent="        "
            )
        )

    item("params (iterable)", PARAMS_DOC[api])
    for p in params:
        kind = "" if p.annotation == "Any" else f" ({p.annotation})"
        if not p.doc:
            raise ValueError(f"argument {p.name} has no doc")
        item(f"{p.name}{kind}", f"{p.doc} Default: ``{p.default!r}``.")
    return "\n".join(lines)


# ---- the NumPy API's step and load_state_dict input, shared by its optimizer classes ----------


def step_grads(grads: Any, type_name: Callable[[Any], str]) -> list[Any]:
    """The gradients a NumPy-API ``step`` was given, as a list of its own: a copy even of a
    list, since another thread may change the caller's list while the step reads it.

    Args:
        grads: one gradient (or None) per parameter.
        type_name: names a wrong ``grads``'s type in the error (each class's own wording).

    Raises:
        TypeError: ``grads`` is None or one array.
    """
    if grads is None or isinstance(grads, np.ndarray):
        raise TypeError(
            "grads must be a sequence with one gradient (or None) per parameter, got "
            f"{type_name(grads)}"
        )
    return list(grads)


def check_grad_count(n_grads: int, n_params: int) -> None:
    """Raises ValueError unless a step has one gradient per parameter."""
    if n_grads != n_params:
        raise ValueError(
            f"expected {n_params} gradients (one per parameter, in param_groups "
            f"order; None for a parameter without a gradient), got {n_grads}"
        )


def loaded_parts(
    state_dict: Any, groups: Sequence[Mapping[str, Any]], type_name: Callable[[Any], str]
) -> tuple[Sequence[Mapping[str, Any]], Mapping[Any, Any]]:
    """The ``param_groups`` and ``state`` of a state dict to load, once its layout fits:
    a mapping with both entries, ``state`` a mapping, as many groups as ``groups`` with as
    many parameters each (torch's messages).

    Args:
        state_dict: what ``load_state_dict`` was given.
        groups: the optimizer's param groups.
        type_name: names a wrong type in the errors (each class's own wording).

    Raises:
        TypeError, ValueError: the layout does not fit.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping, got {type_name(state_dict)}")
    for key in ("state", "param_groups"):
        if key not in state_dict:
            raise ValueError(f"loaded state dict has no '{key}' entry")
    saved_groups = state_dict["param_groups"]
    saved_state = state_dict["state"]
    if not isinstance(saved_state, Mapping):
        raise TypeError(f"state_dict['state'] must be a mapping, got {type_name(saved_state)}")
    if not isinstance(saved_groups, (list, tuple)) or len(saved_groups) != len(groups):
        raise ValueError("loaded state dict has a different number of parameter groups")
    if any(
        not isinstance(s, Mapping) or len(s.get("params", ())) != len(g["params"])
        for g, s in zip(groups, saved_groups)
    ):
        raise ValueError(
            "loaded state dict contains a parameter group that doesn't match the size of "
            "optimizer's group"
        )
    return saved_groups, saved_state


def complete_loaded_group(
    new: dict[str, Any], group: Mapping[str, Any], defaults: Iterable[str], gi: int
) -> None:
    """Completes and checks ``new``, the copy of saved group ``gi`` that ``load_state_dict``
    will install over the optimizer's ``group``: a state dict without the rounding options
    (torch.optim's) keeps the group's own, while a saved seed and step count restore the
    stream; then the rounding options are checked, and every name in ``defaults`` must be
    there.

    Raises:
        TypeError, ValueError: a rounding option is invalid, or a hyperparameter is missing.
    """
    for key in ROUNDING_KEYS:
        if key in group:
            new.setdefault(key, group[key])
    check_rounding_group(new, f"loaded param_groups[{gi}]")
    for name in defaults:
        if name not in new:
            raise ValueError(f"loaded param_groups[{gi}] has no '{name}' entry")


#: The state entry of a 16-bit parameter's float32 master copy (``master_weights=True``).
MASTER = "master_param"

#: The param-group entries of optirs's rounding options (``rounding_entries``).
ROUNDING_KEYS = ("bf16_stochastic_round", "seed", "sr_step", "master_weights")

_seeds: dict[str, int | None] = {"base": None, "count": 0}


def manual_seed(seed: int) -> None:
    """Seeds the seeds of stochastic rounding: each optimizer made after this call with
    ``bf16_stochastic_round=True`` and no ``seed=`` takes the next seed drawn from ``seed``, so
    that a program that calls ``optirs.manual_seed(s)`` first rounds alike on every run.

    Args:
        seed: an int in ``[0, 2**64)``.
    """
    _seeds["base"] = checked_seed(seed)
    _seeds["count"] = 0


def next_seed(default_base: int) -> int:
    """The seed of the next optimizer made without ``seed=``: drawn from
    ``optirs.manual_seed``'s seed if it was called, else from ``default_base`` (the torch API
    passes ``torch.initial_seed()``, so ``torch.manual_seed`` makes runs repeat; the NumPy API
    0). The n-th draw is SplitMix64 of (base, n): distinct optimizers get distinct streams."""
    base = _seeds["base"]
    if base is None:
        base = default_base
    n = _seeds["count"] or 0
    _seeds["count"] = n + 1
    mask = (1 << 64) - 1
    z = (base + (n + 1) * 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def checked_seed(seed: Any) -> int:
    """A seed: an int (not a bool) in ``[0, 2**64)``; TypeError or ValueError otherwise."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed < 1 << 64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return int(seed)


def rounding_entries(
    bf16_stochastic_round: Any, master_weights: Any, seed: Any, default_base: int
) -> dict[str, Any]:
    """The param-group entries of optirs's rounding options, checked: none when both are off
    (groups stay torch's own), ``bf16_stochastic_round``, ``seed`` and ``sr_step`` (the group's
    count of steps, which keys the random bits with the seed) with stochastic rounding,
    ``master_weights`` with master weights. Both at once are refused (a float32 master copy
    makes stochastic rounding unnecessary)."""
    for name, value in (
        ("bf16_stochastic_round", bf16_stochastic_round),
        ("master_weights", master_weights),
    ):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    if seed is not None:
        seed = checked_seed(seed)
    if bf16_stochastic_round and master_weights:
        raise ValueError(
            "bf16_stochastic_round=True and master_weights=True together: a float32 master copy "
            "makes stochastic rounding unnecessary; choose one"
        )
    if bf16_stochastic_round:
        return {
            "bf16_stochastic_round": True,
            "seed": next_seed(default_base) if seed is None else seed,
            "sr_step": 0,
        }
    if master_weights:
        return {"master_weights": True}
    return {}


def check_rounding_group(group: Mapping[str, Any], where: str) -> None:
    """Refuses a group whose rounding entries are of the wrong type (a loaded state dict's)."""
    for name in ("bf16_stochastic_round", "master_weights"):
        v = group.get(name)
        if v is not None and not isinstance(v, bool):
            raise TypeError(f"{where}['{name}'] must be a bool, got {type(v).__name__}")
    if group.get("bf16_stochastic_round"):
        if group.get("master_weights"):
            raise ValueError(
                f"{where} has both bf16_stochastic_round and master_weights: choose one"
            )
        checked_seed(group.get("seed"))
        checked_seed(group.get("sr_step", 0))


def has_rounding(group: Mapping[str, Any]) -> bool:
    """Whether a group asks for stochastic rounding or master weights (the core plans no step
    of such a group)."""
    return bool(group.get("bf16_stochastic_round") or group.get("master_weights"))


def wants_master(group: Mapping[str, Any], dtype_is_16_bit: bool) -> bool:
    """Whether a parameter keeps a float32 master copy: a 16-bit one in a group with
    ``master_weights=True`` (float32 and float64 parameters are their own master copy)."""
    return bool(group.get("master_weights")) and dtype_is_16_bit


#: The one reduced-precision state dtype, as param groups hold it.
BFLOAT16 = "bfloat16"


def state_dtype_name(value: Any) -> str | None:
    """A ``state_dtype`` as param groups keep it: None (the state takes its parameter's dtype,
    as in torch) or ``"bfloat16"``, given as that string, ``torch.bfloat16``,
    ``ml_dtypes.bfloat16`` or its NumPy dtype. Anything else raises ValueError."""
    if value is None:
        return None
    if isinstance(value, str):
        name = value
    elif isinstance(value, type):
        name = value.__name__  # ml_dtypes.bfloat16, the scalar type
    else:
        name = str(value).removeprefix("torch.")  # torch.bfloat16, numpy.dtype(bfloat16)
    if name == BFLOAT16:
        return BFLOAT16
    raise ValueError(
        "state_dtype must be None (state in the parameter's dtype) or bfloat16 ('bfloat16', "
        f"torch.bfloat16 or ml_dtypes.bfloat16), got {value!r}"
    )


def make_init(
    cls_name: str,
    module: str,
    params: Sequence[Param],
    construct: Callable[[Any, Any, dict[str, Any]], None],
    doc: str,
    api: str,
) -> Callable[..., None]:
    """A constructor ``__init__(self, params, <params>, *, <OWN_OPTIONS>)`` with exactly that
    signature (names, kinds, defaults, annotations), calling
    ``construct(self, params, {name: value})``; its docstring is ``doc`` followed by the
    ``Args:`` section of ``api`` (``args_doc``).

    Written out and compiled rather than taking ``*args, **kwargs``, so that a call is bound by
    Python itself: the same errors for a wrong argument as a hand-written constructor, and the
    signature ``inspect`` and ``help()`` show is the one that runs.
    """
    every = (*params, *OWN_OPTIONS)
    args = ["self", "params: Iterable[Any]"]
    star = False
    for p in every:
        if p.keyword_only and not star:
            args.append("*")
            star = True
        elif not p.keyword_only and star:
            raise ValueError(f"{cls_name}: positional {p.name} after keyword-only arguments")
        args.append(f"{p.name}: {p.annotation} = _defaults[{p.name!r}]")
    values = ", ".join(f"{p.name!r}: {p.name}" for p in every)
    source = (
        "from __future__ import annotations\n"
        f"def __init__({', '.join(args)}) -> None:\n"
        f"    _construct(self, params, {{{values}}})\n"
    )
    namespace: dict[str, Any] = {
        "_construct": construct,
        "_defaults": {p.name: p.default for p in every},
        "Any": Any,
        "Iterable": Iterable,
        "__name__": module,
    }
    exec(compile(source, f"<optirs {cls_name}.__init__>", "exec"), namespace)
    init: Callable[..., None] = namespace["__init__"]
    init.__qualname__ = f"{cls_name}.__init__"
    init.__doc__ = f"{doc}\n\n{args_doc(every, api)}"
    return init


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


def _check_adafactor(g: Mapping[str, Any]) -> None:
    # torch.optim.Adafactor's constructor checks, in its order and words.
    lr = g["lr"]
    if hasattr(lr, "numel") and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= _real("lr", lr):
        raise ValueError(f"Learning rate should be >= 0 but is: {lr}")
    if not 0.0 >= _real("beta2_decay", g["beta2_decay"]):
        raise ValueError(f"beta2_decay should be <= 0 but is: {g['beta2_decay']}")
    eps = g["eps"]
    try:
        n = len(eps)
    except TypeError:
        n = -1
    if n != 2:
        raise TypeError(f"eps must be a pair (eps1 or None, eps2), got {eps!r}")
    if eps[0] is not None and not 0.0 <= _real("eps[0]", eps[0]):
        raise ValueError(f"epsilon1 should be >= 0 but is: {eps[0]}")
    if not 0.0 <= _real("eps[1]", eps[1]):
        raise ValueError(f"epsilon2 should be >= 0 but is: {eps[1]}")
    if not 1.0 <= _real("d", g["d"]):
        raise ValueError(f"Clipping threshold d should be >= 1 but is: {g['d']}")
    _nonneg("weight_decay", g["weight_decay"], "weight_decay should be >= 0 but is: {}")


def _factored(group: Mapping[str, Any]) -> bool:
    # Which of a parameter's entries exist depends on its shape, not on its group: both the
    # factored pair and the vector's variance are declared, and the Adafactor classes choose.
    return True


#: Adafactor: not a rule of the core's table (its step needs row, column and whole-tensor
#: reductions: ``_core.step_adafactor``), so not in ``SPECS``; its arguments, checks and state
#: names are declared here for its two classes (``optirs._adafactor``, ``optirs.torch``).
ADAFACTOR = Spec(
    name="Adafactor",
    kind="adafactor",
    params=(
        Param(
            "lr",
            1e-2,
            "float",
            doc="the maximum relative step size, and the weight decay's factor (>= 0).",
        ),
        Param(
            "beta2_decay",
            -0.8,
            "float",
            doc="the second moment's decay: ``beta2_t = 1 - t ** beta2_decay`` (<= 0).",
        ),
        Param(
            "eps",
            (None, 1e-3),
            "tuple[float | None, float]",
            convert=_pair,
            doc="``(eps1, eps2)``: ``eps1`` keeps the variance estimate away from zero (None: "
            "the parameter dtype's machine epsilon), ``eps2`` is the smallest parameter scale "
            "(each >= 0).",
        ),
        Param("d", 1.0, "float", doc="the update's clipping threshold on its RMS (>= 1)."),
        Param(
            "weight_decay",
            0.0,
            "float",
            doc="decoupled weight decay: ``p *= 1 - lr * weight_decay`` (>= 0).",
        ),
        _torch_switch("foreach", None, "bool | None"),
        _maximize(),
    ),
    state=(
        Buffer("row_var", "r", when=_factored),
        Buffer("col_var", "c", when=_factored),
        Buffer("variance", "v", when=_factored),
    ),
    counts_steps=True,
    validate=_check_adafactor,
    refused=(),
    elementwise=False,
    sparse_message="Adafactor does not support sparse gradients",
)
