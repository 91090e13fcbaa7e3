"""Fuzzing the extension's entry points with hypothesis: no crash, no hang, no corruption.

Targets:

- ``core``: ``optirs._core.step`` called directly. Each example starts from a valid call (every
  kind, float32/float64/float16/bfloat16-bits arrays, fresh or viewing one shared buffer) and
  applies up to four mutations: any argument or list entry replaced by an arbitrary object
  (None, bools, ints, floats incl. NaN/inf, strings, bytes, lists, dicts, tuples) or by an odd
  array (integer, bool, complex, object, byte-swapped, float16, 0-d, empty, huge-dimension
  empty, read-only, misaligned, strided, transposed, broadcast, overlapping views of the
  shared buffer), lists made longer or shorter, one array passed in two places, hyperparameters
  replaced. skip_nonfinite and flush_denormals vary.
- ``numpy``: the NumPy optimizers' ``step``, ``load_state_dict``, ``add_param_group``, and
  writes into ``param_groups`` and ``state``, with the same kinds of objects. A value written
  into ``param_groups`` may also raise what torch.optim's constructor raises for it (torch's
  own validation: a dict as ``betas`` gives KeyError there too).
- ``bridge``: optirs.torch optimizers stepped after arbitrary tensors (any dtype, shape,
  strides, views of each other), arrays and objects were written into their state and
  param_groups, and after state dicts with entries replaced, added or deleted went through
  torch's load_state_dict.

Every call must return normally or raise TypeError, ValueError or RuntimeError with a
non-empty message (never an "internal error", i.e. a Rust panic, never pyo3's
PanicException); torch's own code may add KeyError (a param group or state entry torch needs
is gone), and the core and the bridge raise what torch.optim's step raises for hyperparameters
it fails on (ZeroDivisionError, OverflowError: Adam's ``betas[0] = 1.0``). When a call raises
(or skips a non-finite step), no array passed to it may have changed; when it succeeds, no
gradient and no read-only array may have changed.

Each target runs in its own interpreter (``python tests/test_fuzz.py <target>``, with a
timeout and faulthandler on), so that a segfault or a hang fails its test instead of killing
or stalling pytest. Derandomized, no example database; about 15 s per target here.

Not fuzzed here: hyperparameters given as Python ints beyond float range (10**400): they
raise OverflowError, see test_reliability_bad_input.py::test_huge_int_hyperparameter.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import FULL_STATE_KWARGS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes
from optirs._spec import SPECS

TIMEOUT = 240
EXAMPLES = {"core": 2500, "numpy": 2000, "bridge": 600}


def _run_target(target: str) -> None:
    env = dict(os.environ, PYTHONFAULTHANDLER="1")
    try:
        proc = subprocess.run(
            [sys.executable, __file__, target],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            env=env,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"fuzz target {target!r} hung (> {TIMEOUT} s):\n{e.stdout}\n{e.stderr}")
    tail = "\n".join(proc.stderr.splitlines()[-80:])
    assert proc.returncode == 0 and "FUZZ-OK" in proc.stdout, (
        f"fuzz target {target!r} exit code {proc.returncode}\n{proc.stdout}\n{tail}"
    )


@pytest.mark.parametrize("target", sorted(EXAMPLES))
def test_fuzz(target):
    _run_target(target)


# --------------------------------------------------------------------------------------------
# strategies (used in the child process)
# --------------------------------------------------------------------------------------------

FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=list(HealthCheck),
)

JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**60), 2**60),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
    st.binary(max_size=4),
    st.complex_numbers(max_magnitude=10),
    st.just(complex(math.nan, 1.0)),
    st.lists(st.floats(-3, 3), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(0, 3), max_size=2),
    st.tuples(st.integers(0, 3), st.none()),
    st.just(object()),
    st.just(()),
    st.just([]),
)

ODD_DTYPES = [
    np.float32,
    np.float64,
    np.float16,
    np.uint16,
    np.int32,
    np.int64,
    np.bool_,
    np.complex64,
    np.dtype(">f4"),
    np.dtype(">f8"),
    np.uint8,
    object,
]


class Box:
    """A shared buffer that views are cut from (so that they may overlap), and everything an
    example made, for the nothing-changed checks."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.base = np.zeros(8192, np.uint8)
        self.base[:] = self.rng.integers(0, 256, self.base.size, dtype=np.uint8)


def _fill(a: np.ndarray, rng) -> None:
    if a.size == 0 or not a.flags.writeable or a.dtype.kind == "O":
        return
    if a.dtype.kind == "f":
        a[...] = rng.standard_normal(a.shape).astype(a.dtype)
    elif a.dtype.kind == "c":
        a[...] = rng.standard_normal(a.shape)
    else:
        a[...] = rng.integers(0, 2, a.shape).astype(a.dtype)


@st.composite
def odd_arrays(draw, box: Box, like: np.ndarray | None = None):
    """An array of some odd kind; ``like`` gives a default dtype and shape to start from."""
    kind = draw(
        st.sampled_from(
            [
                "fresh",
                "base_view",
                "strided",
                "transposed",
                "read_only",
                "misaligned",
                "zero_d",
                "empty",
                "huge_empty",
                "broadcast",
                "object",
            ]
        )
    )
    if like is not None and draw(st.booleans()):
        dtype, shape = like.dtype, like.shape
    else:
        dtype = np.dtype(draw(st.sampled_from(ODD_DTYPES)))
        shape = draw(array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5))
    rng = box.rng
    if kind == "object":
        return np.array([None, 1.0, "x"], dtype=object)
    if kind == "zero_d":
        a = np.zeros((), dtype)
    elif kind == "empty":
        a = np.zeros((0,), dtype)
    elif kind == "huge_empty":
        a = np.zeros((0, 2**40), dtype) if draw(st.booleans()) else np.zeros((2**40, 0), dtype)
    elif kind == "base_view" and dtype.kind != "O":
        count = int(np.prod(shape))
        start = draw(st.integers(0, 64)) * (dtype.itemsize if draw(st.booleans()) else 1)
        stop = start + count * dtype.itemsize
        if stop > box.base.size:
            start, stop = 0, count * dtype.itemsize
        a = box.base[start:stop].view(dtype).reshape(shape)
    elif kind == "misaligned" and dtype.itemsize > 1 and dtype.kind != "O":
        raw = np.zeros(int(np.prod(shape)) * dtype.itemsize + 1, np.uint8)
        a = raw[1:].view(dtype).reshape(shape)
    elif kind == "strided" and dtype.kind != "O":
        a = np.zeros((*shape[:-1], 2 * shape[-1]) if shape else (2,), dtype)[..., ::2]
    elif kind == "transposed" and dtype.kind != "O":
        a = np.zeros(shape[::-1], dtype).T
    elif kind == "broadcast" and dtype.kind != "O":
        a = np.broadcast_to(np.zeros((1,) * max(len(shape), 1), dtype), shape or (3,))
    else:
        a = np.zeros(shape, dtype)
    _fill(a, rng)
    if kind == "read_only":
        a.flags.writeable = False
    return a


def _arrays_in(obj, out: list[np.ndarray], depth: int = 0) -> list[np.ndarray]:
    if isinstance(obj, np.ndarray):
        out.append(obj)
    elif depth < 4 and isinstance(obj, (list, tuple)):
        for x in obj:
            _arrays_in(x, out, depth + 1)
    elif depth < 4 and isinstance(obj, dict):
        for x in obj.values():
            _arrays_in(x, out, depth + 1)
    return out


def _bytes(a: np.ndarray) -> bytes:
    try:
        return a.tobytes() if a.dtype.kind != "O" else repr(a.tolist()).encode()
    except (ValueError, MemoryError):
        return b"<unreadable>"


def _check_exception(e: BaseException, allowed=(TypeError, ValueError, RuntimeError)) -> None:
    assert isinstance(e, Exception), f"{type(e).__name__} is not an Exception: {e!r}"
    assert type(e).__name__ != "PanicException", repr(e)
    assert isinstance(e, allowed), f"unexpected {type(e).__name__}: {e}"
    message = str(e)
    assert message.strip(), f"{type(e).__name__} without a message"
    assert "internal error" not in message, f"a Rust panic: {message}"


# --------------------------------------------------------------------------------------------
# target: optirs._core.step
# --------------------------------------------------------------------------------------------

KIND_BUFFERS = {spec.kind: len(spec.buffers) for spec in SPECS.values()}


def _hyper(kind: str) -> dict:
    if kind == "sgd":
        return dict(
            lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.1, nesterov=False, maximize=False
        )
    if kind == "adam":
        return dict(
            lr=0.01,
            betas=(0.9, 0.999),
            eps=1e-8,
            weight_decay=0.1,
            amsgrad=True,
            maximize=False,
            decoupled_weight_decay=False,
        )
    if kind == "rmsprop":
        return dict(
            lr=0.01,
            alpha=0.99,
            eps=1e-8,
            weight_decay=0.0,
            momentum=0.5,
            centered=True,
            maximize=False,
        )
    return dict(lr=0.1, lr_decay=0.0, weight_decay=0.0, eps=1e-10, maximize=False)


@st.composite
def core_calls(draw):
    box = Box(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(sorted(KIND_BUFFERS)))
    dtype = np.dtype(draw(st.sampled_from([np.float32, np.float64, np.float16, np.uint16])))
    n = draw(st.integers(0, 3))
    offset = 0

    def fresh_or_view(shape):
        nonlocal offset
        count = int(np.prod(shape)) * dtype.itemsize
        if draw(st.booleans()) and offset + count <= box.base.size:
            a = box.base[offset : offset + count].view(dtype).reshape(shape)
            offset += count + (-count) % 8
        else:
            a = np.zeros(shape, dtype)
        _fill(a, box.rng)
        return a

    shapes = [draw(array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=40)) for _ in range(n)]
    params = [fresh_or_view(s) for s in shapes]
    grads = [fresh_or_view(s) for s in shapes]
    buffers = [tuple(fresh_or_view(s) for _ in range(3)) for s in shapes]
    steps = [np.zeros((), np.float32) for _ in shapes]
    fresh = [False] * n
    groups = [dict(_hyper(kind), params=list(range(n)))]
    if n > 1 and draw(st.booleans()):
        groups = [dict(_hyper(kind), params=[0]), dict(_hyper(kind), params=list(range(n - 1)))]
    call = {
        "kind": kind,
        "groups": groups,
        "params": params,
        "grads": grads,
        "buffers": buffers,
        "steps": steps,
        "fresh": fresh,
    }
    options = {
        "skip_nonfinite": draw(st.booleans()),
        "flush_denormals": draw(st.booleans()),
        # uint16 arrays are bfloat16 bits only where the caller says so (the torch bridge);
        # drawn either way, so that both the bfloat16 kernels and the refusal are fuzzed.
        "bf16_bits": draw(st.booleans()),
    }
    for _ in range(draw(st.integers(0, 4))):
        _mutate(draw, box, call, n)
    return box, call, options


def _like(call: dict, i: int) -> np.ndarray | None:
    """Parameter ``i`` of the call, when there is such an array (a model for odd arrays)."""
    params = call["params"]
    if isinstance(params, list) and i < len(params) and isinstance(params[i], np.ndarray):
        return params[i]
    return None


def _mutate(draw, box: Box, call: dict, n: int) -> None:
    what = draw(
        st.sampled_from(
            ["kind", "groups", "hyper", "list", "entry", "buffer", "alias", "length", "fresh"]
        )
    )
    lists = ["params", "grads", "buffers", "steps"]
    if what == "kind":
        call["kind"] = draw(st.one_of(st.sampled_from(sorted(KIND_BUFFERS)), st.text(max_size=6)))
    elif what == "groups":
        call["groups"] = draw(st.one_of(JUNK, st.lists(JUNK, max_size=2)))
    elif what == "hyper" and isinstance(call["groups"], list) and call["groups"]:
        group = call["groups"][draw(st.integers(0, len(call["groups"]) - 1))]
        if isinstance(group, dict):
            key = draw(st.sampled_from([*group, "params", "missing"]))
            if draw(st.booleans()):
                group.pop(key, None)
            else:
                group[key] = draw(st.one_of(JUNK, st.floats(-2, 2), st.just(math.nan)))
    elif what == "list":
        call[draw(st.sampled_from(lists))] = draw(JUNK)
    elif what == "entry" and n:
        name = draw(st.sampled_from(lists))
        if isinstance(call[name], list) and call[name]:
            i = draw(st.integers(0, len(call[name]) - 1))
            like = _like(call, i)
            call[name][i] = draw(st.one_of(JUNK, odd_arrays(box, like)))
    elif what == "buffer" and n and isinstance(call["buffers"], list) and call["buffers"]:
        i = draw(st.integers(0, len(call["buffers"]) - 1))
        entry = call["buffers"][i]
        if isinstance(entry, tuple):
            entry = list(entry)
            k = draw(st.integers(0, len(entry) - 1)) if entry else 0
            if entry:
                like = _like(call, i)
                entry[k] = draw(st.one_of(st.none(), JUNK, odd_arrays(box, like)))
            call["buffers"][i] = tuple(entry) if draw(st.booleans()) else entry
        else:
            call["buffers"][i] = draw(JUNK)
    elif what == "alias" and n:
        # One array in two places: a gradient that is a parameter or a state buffer, a buffer
        # that is another parameter's, a step counter that views a parameter, ...
        pool = [a for name in lists for a in _arrays_in(call[name], [])]
        if pool:
            source = draw(st.sampled_from(pool))
            name = draw(st.sampled_from(lists))
            if isinstance(call[name], list) and call[name]:
                i = draw(st.integers(0, len(call[name]) - 1))
                if name == "buffers":
                    k = draw(st.integers(0, 2))
                    entry = list(call[name][i]) if isinstance(call[name][i], tuple) else []
                    entry += [None] * (3 - len(entry))
                    entry[k] = source
                    call[name][i] = tuple(entry)
                elif name == "steps" and source.size:
                    call[name][i] = source.reshape(-1)[:1].reshape(())
                else:
                    call[name][i] = source
    elif what == "length":
        name = draw(st.sampled_from([*lists, "fresh"]))
        if isinstance(call[name], list):
            if call[name] and draw(st.booleans()):
                call[name].pop()
            else:
                call[name].append(draw(st.one_of(st.none(), JUNK)))
    elif what == "fresh":
        call["fresh"] = draw(st.one_of(JUNK, st.lists(st.booleans(), max_size=4)))


def fuzz_core() -> None:
    import optirs

    @settings(FUZZ, max_examples=EXAMPLES["core"])
    @given(case=core_calls())
    def run(case):
        box, call, options = case
        arrays = [box.base, *_arrays_in(call, [])]
        before = [_bytes(a) for a in arrays]
        grads = _arrays_in(call["grads"], [])
        grads_before = [_bytes(a) for a in grads]
        readonly = [(a, _bytes(a)) for a in arrays if not a.flags.writeable]
        try:
            applied = optirs._core.step(
                call["kind"],
                call["groups"],
                call["params"],
                call["grads"],
                call["buffers"],
                call["steps"],
                call["fresh"],
                **options,
            )
        except BaseException as e:
            # With hyperparameters torch.optim's own step fails on, the core raises what torch
            # raises: ZeroDivisionError, OverflowError or RuntimeError.
            _check_exception(e, (TypeError, ValueError, ArithmeticError, RuntimeError))
            assert [_bytes(a) for a in arrays] == before, "a refused step changed an array"
            return
        assert applied in (True, False)
        if not applied:
            assert options["skip_nonfinite"]
            assert [_bytes(a) for a in arrays] == before, "a skipped step changed an array"
        assert [_bytes(a) for a in grads] == grads_before, "a gradient was written"
        for a, b in readonly:
            assert _bytes(a) == b, "a read-only array was written"

    run()


# --------------------------------------------------------------------------------------------
# target: the NumPy optimizers
# --------------------------------------------------------------------------------------------


def _numpy_state_bytes(opt, params) -> list:
    """Bytes of every parameter and state array (ids of other state values)."""
    out = []
    for p in params:
        out.append(_bytes(p))
        for k, v in sorted(opt.state.get(p, {}).items(), key=lambda kv: str(kv[0])):
            out.append((k, _bytes(v) if isinstance(v, np.ndarray) else id(v)))
    return out


@st.composite
def numpy_sessions(draw):
    box = Box(draw(st.integers(0, 2**32 - 1)))
    name = draw(st.sampled_from(sorted(FULL_STATE_KWARGS)))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    shapes = draw(
        st.lists(
            array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=30), min_size=1, max_size=3
        )
    )
    params = [np.asarray(box.rng.standard_normal(s), dtype) for s in shapes]
    warm = draw(st.integers(0, 2))
    actions = []
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["step", "group", "state", "load", "add_group", "good"]))
        if action in ("step", "good"):
            grads = [np.asarray(box.rng.standard_normal(p.shape), p.dtype) for p in params]
            if action == "step":
                mode = draw(st.sampled_from(["entry", "whole", "length"]))
                if mode == "whole":
                    grads = draw(st.one_of(JUNK, odd_arrays(box)))
                elif mode == "length":
                    grads = grads[:-1] if draw(st.booleans()) else [*grads, draw(JUNK)]
                else:
                    i = draw(st.integers(0, len(grads) - 1))
                    other = params[draw(st.integers(0, len(params) - 1))]
                    grads[i] = draw(
                        st.one_of(st.none(), JUNK, odd_arrays(box, grads[i]), st.just(other))
                    )
            actions.append(("step", grads))
        elif action == "group":
            key = draw(st.sampled_from([*FULL_STATE_KWARGS[name], "betas", "maximize", "params"]))
            actions.append(("group", key, draw(st.one_of(JUNK, odd_arrays(box)))))
        elif action == "state":
            key = draw(st.sampled_from(["step", "exp_avg", "momentum_buffer", "sum", "x"]))
            value = draw(st.one_of(JUNK, odd_arrays(box, params[0]), st.just(params[-1])))
            actions.append(("state", key, value))
        elif action == "load":
            actions.append(("load", draw(_state_dict_edits(box))))
        else:
            group = draw(
                st.one_of(
                    JUNK,
                    st.fixed_dictionaries(
                        {"params": st.lists(st.one_of(JUNK, odd_arrays(box)), max_size=2)}
                    ),
                    st.just({"params": [params[0]]}),
                )
            )
            actions.append(("add_group", group))
    return name, params, warm, actions


@st.composite
def _state_dict_edits(draw, box):
    """Edits of a real state_dict: (where, key, value); the value "DELETE" removes the key."""
    edits = []
    keys = {
        "top": st.sampled_from(["state", "param_groups", "extra"]),
        "state": st.one_of(st.integers(-1, 4), st.text(max_size=2), st.none()),
        "entry": st.sampled_from(["step", "exp_avg", "exp_avg_sq", "sum", "momentum_buffer", "x"]),
        "group": st.sampled_from(["lr", "betas", "eps", "momentum", "maximize", "params", "x"]),
    }
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(sorted(keys)))
        key = draw(keys[where])
        value = draw(st.one_of(st.just("DELETE"), JUNK, odd_arrays(box)))
        edits.append((where, key, value))
    return edits


def _apply_edits(sd, edits):
    for where, key, value in edits:
        try:
            if where == "top":
                target = sd
            elif where == "state":
                target = sd["state"]
            elif where == "entry":
                target = next(iter(sd["state"].values()), {})
            else:
                target = sd["param_groups"][0]
            if isinstance(value, str) and value == "DELETE":
                target.pop(key, None)
            else:
                target[key] = value
        except (TypeError, KeyError, IndexError, AttributeError):
            pass  # an earlier edit replaced the container itself
    return sd


def _torch_refusal(name: str, key: str, value) -> type | None:
    """The exception type torch.optim's constructor raises for ``{key: value}`` (or None)."""
    import torch

    if key == "params":
        return None
    try:
        getattr(torch.optim, name)([torch.zeros(1)], **{key: value})
    except Exception as e:
        return type(e)
    return None


def fuzz_numpy() -> None:
    import copy

    import optirs

    @settings(FUZZ, max_examples=EXAMPLES["numpy"])
    @given(session=numpy_sessions())
    def run(session):
        name, params, warm, actions = session
        opt = getattr(optirs, name)(params, **FULL_STATE_KWARGS[name])
        rng = np.random.default_rng(0)
        for _ in range(warm):
            opt.step([np.asarray(rng.standard_normal(p.shape), p.dtype) for p in params])
        for action in actions:
            # The user's own writes first; then the call under test.
            if action[0] == "group":
                opt.param_groups[0][action[1]] = action[2]
            elif action[0] == "state":
                if params[0] not in opt.state:
                    continue
                opt.state[params[0]][action[1]] = action[2]
            before = _numpy_state_bytes(opt, params)
            try:
                if action[0] == "step":
                    opt.step(action[1])
                elif action[0] in ("group", "state"):
                    opt.step([np.ones(p.shape, p.dtype) for p in params])
                elif action[0] == "load":
                    sd = _apply_edits(copy.deepcopy(opt.state_dict()), action[1])
                    opt.load_state_dict(sd)
                else:
                    opt.add_param_group(action[1])
            except BaseException as e:
                if action[0] == "group" and type(e) is _torch_refusal(name, action[1], action[2]):
                    pass  # torch's constructor raises the same (e.g. KeyError for a dict betas)
                else:
                    _check_exception(e)
                after = _numpy_state_bytes(opt, params)
                assert after == before, f"{action[0]} raised {e!r} but changed something"
                # Undo the deliberate damage, so that later actions test something new.
                if action[0] == "group":
                    opt = getattr(optirs, name)(params, **FULL_STATE_KWARGS[name])
                elif action[0] == "state":
                    opt.state[params[0]].pop(action[1], None)

    run()


# --------------------------------------------------------------------------------------------
# target: the torch bridge
# --------------------------------------------------------------------------------------------


def fuzz_bridge() -> None:
    import copy

    import optirs.torch
    import torch

    torch_dtypes = [
        torch.float32,
        torch.float64,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.bool,
        torch.complex64,
        torch.uint8,
    ]

    @st.composite
    def tensors(draw, like):
        dtype = draw(st.sampled_from([like.dtype, *torch_dtypes]))
        shape = (
            tuple(like.shape)
            if draw(st.booleans())
            else draw(array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=6))
        )
        kind = draw(st.sampled_from(["fresh", "strided", "transposed", "view_of_param", "expand"]))
        if kind == "view_of_param" and like.numel():
            return like.detach().reshape(-1)[: max(1, like.numel() // 2)]
        t = torch.zeros(shape, dtype=dtype)
        if kind == "strided" and t.dim():
            t = torch.zeros((*shape[:-1], 2 * shape[-1]), dtype=dtype)[..., ::2]
        elif kind == "transposed" and t.dim() >= 2:
            t = torch.zeros(shape[::-1], dtype=dtype).t()
        elif kind == "expand" and t.dim():
            t = torch.zeros((1,) * len(shape), dtype=dtype).expand(*shape)
        return t

    def state_bytes(opt) -> list:
        out = []
        for group in opt.param_groups:
            for p in group["params"]:
                flat = p.detach().clone().reshape(-1)
                out.append(flat.view(torch.uint8).numpy().tobytes() if p.numel() else b"")
                for k, v in sorted(opt.state.get(p, {}).items(), key=lambda kv: str(kv[0])):
                    if isinstance(v, torch.Tensor) and not v.is_sparse:
                        try:
                            raw = v.detach().clone().contiguous().reshape(-1)
                            out.append((k, raw.view(torch.uint8).numpy().tobytes()))
                        except (RuntimeError, TypeError):
                            out.append((k, id(v)))
                    elif isinstance(v, np.ndarray):
                        out.append((k, _bytes(v)))
                    else:
                        out.append((k, id(v)))
        return out

    names = sorted(FULL_STATE_KWARGS)

    @st.composite
    def sessions(draw):
        seed = draw(st.integers(0, 2**32 - 1))
        name = draw(st.sampled_from(names))
        dtype = draw(st.sampled_from([torch.float32, torch.float64]))
        shapes = draw(
            st.lists(
                array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=20),
                min_size=1,
                max_size=3,
            )
        )
        gen = torch.Generator().manual_seed(seed % 2**31)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in shapes]
        actions = []
        for _ in range(draw(st.integers(1, 3))):
            action = draw(st.sampled_from(["grad", "state", "group", "load"]))
            i = draw(st.integers(0, len(params) - 1))
            if action == "grad":
                actions.append(("grad", i, draw(tensors(params[i]))))
            elif action == "state":
                key = draw(st.sampled_from(["step", "exp_avg", "momentum_buffer", "sum", "x"]))
                value = draw(
                    st.one_of(JUNK, tensors(params[i]), st.just(np.zeros(tuple(params[i].shape))))
                )
                actions.append(("state", i, key, value))
            elif action == "group":
                key = draw(st.sampled_from([*FULL_STATE_KWARGS[name], "betas", "maximize"]))
                value = draw(st.one_of(JUNK, st.just(torch.tensor(0.1)), st.just(torch.ones(2))))
                actions.append(("group", 0, key, value))
            else:
                edits = []
                for _ in range(draw(st.integers(1, 2))):
                    key = draw(st.sampled_from(["step", "exp_avg", "square_avg", "sum", "lr"]))
                    value = draw(st.one_of(st.just("DELETE"), JUNK, tensors(params[i])))
                    edits.append((key, value))
                actions.append(("load", i, edits))
        return name, params, actions

    @settings(FUZZ, max_examples=EXAMPLES["bridge"])
    @given(session=sessions())
    def run(session):
        name, params, actions = session
        opt = getattr(optirs.torch, name)(params, **FULL_STATE_KWARGS[name])
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        for action in actions:
            try:
                if action[0] == "grad":
                    params[action[1]].grad = action[2]
                elif action[0] == "state":
                    opt.state[params[action[1]]][action[2]] = action[3]
                elif action[0] == "group":
                    opt.param_groups[0][action[2]] = action[3]
                else:
                    sd = copy.deepcopy(opt.state_dict())
                    entry = sd["state"].get(action[1], {})
                    for key, value in action[2]:
                        target = sd["param_groups"][0] if key == "lr" else entry
                        if isinstance(value, str) and value == "DELETE":
                            target.pop(key, None)
                        else:
                            target[key] = value
                    opt.load_state_dict(sd)
            except Exception:
                continue  # torch refused to set it up: its business, not optirs's
            before = state_bytes(opt)
            try:
                opt.step()
            except BaseException as e:
                _check_exception(
                    e, (TypeError, ValueError, ArithmeticError, RuntimeError, KeyError)
                )
                assert state_bytes(opt) == before, "a refused step changed a tensor"

    run()


if __name__ == "__main__":
    import faulthandler

    faulthandler.enable()
    np.seterr(all="ignore")
    {"core": fuzz_core, "numpy": fuzz_numpy, "bridge": fuzz_bridge}[sys.argv[1]]()
    print("FUZZ-OK")
