"""Type stubs of the Rust extension ``optirs._core``. Keep in step with ``src/bindings.rs``
and the plans (``src/array_plan.rs``, ``src/torch_plan.rs``, ``src/flat_watch.rs``)."""

from collections.abc import Sequence
from typing import Any, Literal, final, overload

__all__ = [
    "CHUNK_ELEMS",
    "RULES",
    "RULE_SCALARS",
    "ArrayPlan",
    "FlatWatch",
    "TorchPlan",
    "__version__",
    "_set_openmp",
    "build_info",
    "code_map",
    "dequantize_8bit",
    "executor",
    "get_num_threads",
    "grad_norm",
    "quantize_8bit",
    "same_items",
    "scale_grads",
    "set_num_threads",
    "set_simd_level",
    "simd_level",
    "simd_levels",
    "step",
    "step_adafactor",
    "step_adam8bit",
    "traffic",
]

__version__: str
#: elements per work item a step is cut into (results do not depend on it)
CHUNK_ELEMS: int
#: the rule table: each update rule's state buffers, in the order the kernels take them
#: (``optirs._spec`` declares the same; tests/test_rules.py checks they agree)
RULES: dict[str, tuple[str, ...]]
#: each update rule's per-parameter 0-d state besides ``step`` (NAdam's ``mu_product``), handed
#: over after its buffers, in the same tuple
RULE_SCALARS: dict[str, tuple[str, ...]]

def step_adam8bit(
    groups: Sequence[Any],
    params: list[Any],
    grads: list[Any],
    states: list[Any],
    steps: list[Any],
    *,
    block_size: int,
    skip_nonfinite: bool = False,
    flush_denormals: bool = False,
    grad_unscale: float | None = None,
    grad_coef: float | None = None,
    bf16_bits: bool = False,
    commit: list[tuple[Any, Any, Any]] | None = None,
    then: tuple[Any, Any] | None = None,
) -> bool:
    """One Adam/AdamW step (amsgrad off) with 8-bit state where a parameter's state tuple has
    four entries (``exp_avg``/``exp_avg_sq`` uint8 codes of the parameter's shape,
    ``exp_avg_absmax``/``exp_avg_sq_absmax`` float32, one per block of ``block_size``), float
    Adam state in the parameter's dtype where it has two (``exp_avg``, ``exp_avg_sq``). Under a
    group's ``master_weights`` a 16-bit parameter's float32 ``master_param`` follows: fifth
    after the 8-bit entries, fourth after float state (``(exp_avg, exp_avg_sq, None,
    master_param)``). ``bf16_stochastic_round``, ``seed`` and ``sr_step`` as ``step``.
    Arguments and validation as ``step`` (kind "adam"); float32, float16 and bfloat16
    parameters for 8-bit state. ``grad_unscale``/``grad_coef`` as ``step``. Returns whether the
    update was applied."""

def step_adafactor(
    groups: Sequence[Any],
    params: list[Any],
    grads: list[Any],
    states: list[Any],
    steps: list[Any],
    *,
    skip_nonfinite: bool = False,
    flush_denormals: bool = False,
    grad_unscale: float | None = None,
    grad_coef: float | None = None,
    bf16_bits: bool = False,
    commit: list[tuple[Any, Any, Any]] | None = None,
    then: tuple[Any, Any] | None = None,
) -> bool:
    """One ``torch.optim.Adafactor`` step (its for-loop formulas). Each group holds ``lr``,
    ``beta2_decay``, ``eps`` (``(eps1 or None, eps2)``), ``d``, ``weight_decay`` and
    ``maximize``; each state tuple is ``(row_var, col_var, variance)`` in the parameter's dtype:
    ``row_var`` (the shape with the last dimension 1) and ``col_var`` (the next-to-last 1) for a
    parameter of two or more dimensions, ``variance`` (its shape) otherwise; an entry the
    parameter does not use may be None. Under a group's ``master_weights`` a 16-bit
    parameter's float32 ``master_param`` (C-contiguous, its shape) comes fourth;
    ``bf16_stochastic_round``, ``seed`` and ``sr_step`` as ``step``. Validation,
    ``grad_unscale``/``grad_coef``, ``commit`` and ``then`` as ``step``; ZeroDivisionError (an
    empty parameter, ``d`` of 0), OverflowError and RuntimeError where torch's step raises,
    nothing written. Returns whether the update was applied."""

def code_map(signed: bool) -> list[float]:
    """The 256 values of the dynamic code map (signed: ``exp_avg``; unsigned: ``exp_avg_sq``),
    ascending."""

def quantize_8bit(x: Any, signed: bool, block_size: int) -> tuple[Any, Any]:
    """A 1-d float32 array quantized block by block: (uint8 codes, float32 absmaxes)."""

def dequantize_8bit(codes: Any, absmax: Any, signed: bool, block_size: int) -> Any:
    """The 1-d float32 array that uint8 ``codes`` and their block ``absmax`` stand for."""

@overload
def step(
    kind: str,
    groups: Sequence[Any],
    params: list[Any],
    grads: list[Any],
    buffers: list[Any],
    steps: list[Any],
    fresh: list[bool],
    *,
    skip_nonfinite: bool = False,
    flush_denormals: bool = False,
    grad_unscale: float | None = None,
    grad_coef: float | None = None,
    plan: Literal[False] = False,
    bf16_bits: bool = False,
    commit: list[tuple[Any, Any, Any]] | None = None,
    then: tuple[Any, Any] | None = None,
    before: None = None,
    _panic_for_tests: str | None = None,
) -> bool:
    """Runs one optimizer step over every parameter of every group, in place.

    ``kind`` names a rule of ``RULES`` ("sgd", "adam", ..., "rprop", "asgd"). ``groups`` are the
    param-group mappings (hyperparameters under torch's names; ``len(group["params"])`` maps
    flat indices to groups).
    ``params``, ``grads``, ``buffers`` (a tuple of state arrays per parameter, in the order of
    ``optirs._spec``: the buffers, then the 0-d scalars of ``RULE_SCALARS``, then the float32
    ``master_param`` of a 16-bit parameter whose group has ``master_weights``), ``steps`` (0-d
    float32 counters) and ``fresh`` (SGD: the momentum buffer was just created; may be empty)
    are flat, one entry per parameter; a ``None`` gradient skips
    that parameter. Everything is validated before anything is written: TypeError or
    ValueError, naming the array, and nothing modified. Hyperparameters are not range-checked
    (the NumPy API does that with torch's constructor checks): where torch.optim's for-loop step
    raises for them (ZeroDivisionError, OverflowError, RuntimeError, NotImplementedError), this
    raises the same, torch's message first, with nothing modified. Returns False, with nothing
    modified,
    when ``skip_nonfinite`` is set and a gradient holds NaN or infinity. ``flush_denormals``
    flushes denormals to zero on every thread of the step, for its duration (x86-64). The step
    reads each gradient divided by ``grad_unscale`` (GradScaler's scale) and then multiplied by
    ``grad_coef`` (a clip coefficient), each result rounded to the gradient's dtype; the
    gradients themselves are not written. With
    ``plan``, returns ``(applied, ArrayPlan)``: the plan of the steps after this one
    (``(applied, None)`` when a group has ``bf16_stochastic_round`` or ``master_weights``,
    which plans do not cover). A group with ``bf16_stochastic_round`` gets its ``sr_step``
    advanced by one when the update is applied.
    ``bf16_bits`` (the torch bridge): uint16 arrays are bfloat16 bit patterns; otherwise integer
    arrays are refused and bfloat16 arrays are ``ml_dtypes.bfloat16``. Once the update is
    applied, before returning: ``mapping[key] = value`` for each triple of ``commit`` and then
    ``then[0](then[1])``, each completed even if a signal handler raises inside it (that
    exception is raised afterwards). ``before``, the caller's go-ahead, is called as
    ``before[0](before[1])`` once everything is validated, right before the update: a false
    result makes the step return None (whatever ``plan``), nothing written; an exception it
    raises propagates, nothing written. ``_panic_for_tests`` ("validation", "worker" or
    "after_write") makes the step panic, for tests: a panic surfaces as RuntimeError.
    """

@overload
def step(
    kind: str,
    groups: Sequence[Any],
    params: list[Any],
    grads: list[Any],
    buffers: list[Any],
    steps: list[Any],
    fresh: list[bool],
    *,
    skip_nonfinite: bool = False,
    flush_denormals: bool = False,
    grad_unscale: float | None = None,
    grad_coef: float | None = None,
    plan: Literal[True],
    bf16_bits: bool = False,
    commit: list[tuple[Any, Any, Any]] | None = None,
    then: tuple[Any, Any] | None = None,
    before: None = None,
    _panic_for_tests: str | None = None,
) -> tuple[bool, ArrayPlan | None]: ...
@overload
def step(
    kind: str,
    groups: Sequence[Any],
    params: list[Any],
    grads: list[Any],
    buffers: list[Any],
    steps: list[Any],
    fresh: list[bool],
    *,
    skip_nonfinite: bool = False,
    flush_denormals: bool = False,
    grad_unscale: float | None = None,
    grad_coef: float | None = None,
    plan: Literal[False] = False,
    bf16_bits: bool = False,
    commit: list[tuple[Any, Any, Any]] | None = None,
    then: tuple[Any, Any] | None = None,
    before: tuple[Any, Any],
    _panic_for_tests: str | None = None,
) -> bool | None: ...

@final
class ArrayPlan:
    """The NumPy API's cached step, made by ``step(..., plan=True)`` from the arrays it checked.
    Each later step re-reads every held array's header (memory, dtype, shape, flags) and checks
    the new gradients and step counters in Rust, then steps; or returns None, having written
    nothing, for the full step to run."""

    def step(
        self,
        groups: Sequence[Any],
        grads: list[Any],
        *,
        skip_nonfinite: bool = False,
        flush_denormals: bool = False,
        grad_unscale: float | None = None,
        grad_coef: float | None = None,
        _panic_for_tests: str | None = None,
    ) -> bool | None:
        """Steps every parameter whose gradient is not None; returns whether the update was
        applied, or None when the full step must run (nothing written then)."""

    def __len__(self) -> int:
        """How many parameters the plan covers."""

@final
class FlatWatch:
    """What the torch bridge's flat step (``optirs.torch.flatten_parameters``) re-checks each
    step, in one call: object identities and the layouts torch reports; writes nothing."""

    def __new__(
        cls,
        params: list[Any],
        grads: list[Any],
        entries: list[Any],
        exchange_api: Any = None,
        bump: tuple[Any, Any] | None = None,
    ) -> FlatWatch:
        """``params``, the gradient views each must keep as ``p.grad`` (None: a frozen
        parameter that must stay without a gradient), and each parameter's
        state dict (its values kept as they are now; None for a parameter without state).
        ``exchange_api``: torch's DLPack exchange API capsule, through which the layouts are
        read when given (else ``data_ptr()`` and ``shape``). ``bump``: ``(callable,
        argument)``, called by ``admit``."""

    def current(self, state: Any) -> bool:
        """Whether ``state`` holds each parameter's entry with the same values in the same
        order, each ``p.grad`` is its view, and every parameter and gradient keeps its layout
        and data pointer."""

    def admit(self, state: Any) -> bool:
        """``current(state)``, and where it holds, ``bump[0](bump[1])`` right away, while the
        tensors just read are still in cache (the flat step's version bumps, handed to
        ``step(before=...)``)."""

    def stray_grads(self) -> list[int]:
        """Indices of the parameters whose ``p.grad`` is not their view."""

    def __len__(self) -> int: ...

@final
class TorchPlan:
    """The torch bridge's cached step (``optirs.torch``), built after a full step has checked
    every tensor. Each later step re-checks in Rust what can change between steps and steps
    through raw pointers, or returns None, having written nothing, for the full step to run."""

    def __new__(cls, kind: str, entries: list[Any], exchange_api: Any = None) -> TorchPlan:
        """``entries``: per parameter in param_groups order, the parameter itself (not stepped
        by the full step) or ``(group, p, p_view, keys, items, item_views)``, ``items`` being
        the state tensors under ``keys`` and the views the NumPy arrays over the parameter's
        and items' memory that the full step stepped (pointers, sizes and dtypes are taken from
        them and checked against the tensors; ValueError when anything disagrees);
        ``exchange_api`` is torch's DLPack exchange API capsule
        (``torch.Tensor.__dlpack_c_exchange_api__``), read through when given."""

    def step(
        self,
        groups: Sequence[Any],
        state: Any,
        *,
        skip_nonfinite: bool = False,
        flush_denormals: bool = False,
        grad_unscale: float | None = None,
        grad_coef: float | None = None,
        _panic_for_tests: str | None = None,
    ) -> bool | None:
        """Steps every parameter that has a gradient; returns whether the update was applied,
        or None when something changed since the plan was built (nothing written then).
        Raises, writing nothing, where torch.optim's step raises for the hyperparameters
        (see ``step``)."""

    @property
    def uses_exchange_api(self) -> bool:
        """Whether steps read the tensors' layouts through torch's DLPack exchange API."""

    def __len__(self) -> int:
        """How many parameters the plan covers."""

def grad_norm(
    grads: list[Any],
    norm_type: float = 2.0,
    max_norm: float | None = None,
    *,
    bf16_bits: bool = False,
) -> tuple[float, str, float | None]:
    """The total norm of ``grads`` (C-contiguous float arrays) as
    ``torch.nn.utils.get_total_norm`` computes it: ``(norm, dtype, coef)``, ``dtype`` the
    norm's dtype (the gradients' promoted dtype; "float32" for none) and ``coef`` the clip
    coefficient ``min(max_norm / (norm + 1e-6), 1)`` in that dtype (None without
    ``max_norm``). One parallel pass, the same bits at every thread count and SIMD level.
    RuntimeError, as torch, for an infinity norm of an empty array."""

def scale_grads(grads: list[Any], coef: float, *, bf16_bits: bool = False) -> None:
    """Multiplies every array in place by ``coef`` (the product rounded to its dtype), in one
    parallel pass; the arrays must be writeable and must not overlap."""

def traffic(read_only: list[Any], read_write: list[Any]) -> None:
    """Memory-traffic ceiling probe: ``read_write[k] ^= xor of read_only``, byte by byte, over
    the same pool and chunking as a step. Arrays: C-contiguous, equal size in bytes."""

def simd_level() -> str:
    """The SIMD level in use: "avx512", "avx2", "neon" or the baseline.

    The baseline is "sse2" on x86-64 and "scalar" elsewhere.
    """

def simd_levels() -> list[str]:
    """The levels this CPU can run, lowest first."""

def set_simd_level(level: str) -> str:
    """Forces a SIMD level (clamped to what the CPU has); returns the level now in use."""

def build_info() -> dict[str, Any]:
    """How this extension was built: version, profile, target, compiled target features."""

def executor() -> str:
    """What a large step started now on this thread runs on: ``"openmp"`` (the thread's team of
    an OpenMP runtime the process has loaded, such as torch's), ``"pool"`` (optirs's own
    threads) or ``"serial"`` (one thread)."""

def _set_openmp(on: bool) -> None:
    """Whether large steps may run on a loaded OpenMP runtime's team (tests use both)."""

def same_items(lists: list[list[Any]], items: list[Any]) -> bool:
    """Whether the lists of ``lists``, one after another, hold the objects of ``items`` and
    nothing else, in order, compared by identity (never ``==``)."""

def get_num_threads() -> int:
    """The number of threads a step uses."""

def set_num_threads(n: int) -> None:
    """Sets the number of threads steps use (at least 1)."""
