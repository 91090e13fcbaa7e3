"""Helpers for the optirs.torch tests: a bridge optimizer and torch.optim's, side by side.

``TorchPair`` builds ``optirs.torch.X`` and the reference ``torch.optim.X(foreach=False)`` (the
single-tensor for-loop path, as in conftest.py) over two private copies of the same initial
tensors, feeds both the same gradients and compares parameters and every state entry with
conftest's tolerances (``tolerances``) after each step. Gradients come from conftest's
``default_grad`` and are passed through conftest's ``well_conditioned`` (the FMA/cancellation
issue documented there applies unchanged: the bridge runs the same Rust kernels).

``snapshot``/``assert_unchanged`` take bitwise copies (``.clone()``) of every parameter and state
tensor, to check that a refused step modified nothing and created no state.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import optirs.torch
import torch
from conftest import default_grad, tolerances, well_conditioned
from conftest import torch_class as torch_class  # torch.optim's, or the tests' Lion reference
from optirs._spec import SPECS

TORCH_DTYPES = (torch.float32, torch.float64)
NUMPY_DTYPE = {torch.float32: np.float32, torch.float64: np.float64}


def bridge_class(name: str) -> type:
    return getattr(optirs.torch, name)


def digits_mlp(datasets: Any) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Sequential]:
    """scikit-learn's digits (pixels scaled to [0, 1], and the labels) and the float32 MLP the
    training-quality tests fit to them, initialised after ``torch.manual_seed(0)``.

    Args:
        datasets: ``sklearn.datasets`` (each caller imports it, or skips, with its own reason).
    """
    digits = datasets.load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )
    return x, y, model


def all_params(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in opt.param_groups for p in group["params"]]


def random_tensor(rng: np.random.Generator, shape: Sequence[int], dtype: torch.dtype):
    """A fresh contiguous tensor of N(0, 1) values (drawn by NumPy, so seeds are stable)."""
    return torch.from_numpy(rng.standard_normal(tuple(shape)).astype(NUMPY_DTYPE[dtype]))


def as_parameter(t: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(t.detach().clone())


# --------------------------------------------------------------------------------------------
# comparison with torch
# --------------------------------------------------------------------------------------------


def assert_matches_torch(opt, params, topt, tparams, steps: int) -> None:
    """Parameters and state of ``opt`` agree with ``topt``: same keys, dtypes, shapes, step.

    Buffers are compared with conftest's tolerances for ``steps`` steps; the ``step`` counter
    must be exact and of the same dtype as torch's (a 0-d tensor).
    """
    assert len(params) == len(tparams)
    for i, (p, tp) in enumerate(zip(params, tparams)):
        assert p.dtype == tp.dtype and p.shape == tp.shape, i
        tol = tolerances(NUMPY_DTYPE[p.dtype], steps)
        np.testing.assert_allclose(
            p.detach().numpy(), tp.detach().numpy(), **tol, equal_nan=True, err_msg=f"param {i}"
        )
        tstate = topt.state.get(tp, {})
        state = opt.state.get(p, {})
        assert sorted(state) == sorted(tstate), f"param {i}: state keys"
        for key, tvalue in tstate.items():
            value = state[key]
            if tvalue is None:
                assert value is None, (i, key)
                continue
            assert isinstance(value, torch.Tensor), f"state[{i}][{key!r}] is {type(value)}"
            assert value.device == tvalue.device, (i, key)
            if key == "step":
                assert value.shape == () and value.dtype == tvalue.dtype, (i, value, tvalue)
                assert float(value) == float(tvalue), f"param {i}: step {value} != {tvalue}"
                continue
            if key in _scalar_names(opt, topt):
                # 0-d state computed and stored as torch does: bit for bit torch's.
                assert value.shape == () and value.dtype == tvalue.dtype, (i, key, value, tvalue)
                same = torch.equal(value, tvalue) or bool(value.isnan() and tvalue.isnan())
                assert same, (i, key, value.item(), tvalue.item())
                continue
            assert value.dtype == p.dtype and value.shape == p.shape, (i, key)
            np.testing.assert_allclose(
                value.numpy(),
                tvalue.numpy(),
                **tol,
                equal_nan=True,
                err_msg=f"state[{i}][{key!r}]",
            )


def _scalar_names(*opts: Any) -> tuple[str, ...]:
    """The 0-d state names (besides ``step``) of the optimizer among ``opts`` that optirs
    declares (the other may be torch's class, or the tests' Lion reference)."""
    for o in opts:
        spec = SPECS.get(type(o).__name__)
        if spec is not None:
            return spec.scalar_names
    return ()


GradFn = Callable[[np.random.Generator, int, int, np.ndarray], "np.ndarray | None"]


class TorchPair:
    """``optirs.torch.<name>`` and ``torch.optim.<name>(foreach=False)`` on copies of ``groups``.

    ``groups`` is a list of param-group dicts whose ``params`` are initial tensors; each side
    gets its own ``nn.Parameter`` copies. ``kwargs`` go to both constructors, ``bridge_kwargs``
    (e.g. ``foreach=True``, ``fused=True``) only to the optirs one.
    """

    def __init__(
        self,
        name: str,
        groups: list[dict[str, Any]],
        bridge_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.name = name
        bgroups = [{**g, "params": [as_parameter(t) for t in g["params"]]} for g in groups]
        tgroups = [{**g, "params": [as_parameter(t) for t in g["params"]]} for g in groups]
        self.opt = bridge_class(name)(bgroups, **kwargs, **(bridge_kwargs or {}))
        self.topt = torch_class(name)(tgroups, foreach=False, **kwargs)
        self.steps = 0

    @property
    def params(self) -> list[torch.Tensor]:
        return all_params(self.opt)

    @property
    def tparams(self) -> list[torch.Tensor]:
        return all_params(self.topt)

    def set_hyperparameters(self, group_index: int, **values: Any) -> None:
        for key, value in values.items():
            self.opt.param_groups[group_index][key] = value
            self.topt.param_groups[group_index][key] = value

    def make_grads(self, rng: np.random.Generator, step: int, grad_fn: GradFn = default_grad):
        """One (conditioned) NumPy gradient or None per parameter, from the bridge's values."""
        groups_of = [g for g in self.opt.param_groups for _ in g["params"]]
        out = []
        for i, (p, group) in enumerate(zip(self.params, groups_of)):
            value = p.detach().numpy()
            out.append(well_conditioned(self.name, group, value, grad_fn(rng, step, i, value)))
        return out

    def set_grads(self, grads: Sequence[np.ndarray | None]) -> None:
        assert len(grads) == len(self.params)
        for p, tp, g in zip(self.params, self.tparams, grads):
            p.grad = None if g is None else torch.from_numpy(np.array(g, copy=True))
            tp.grad = None if g is None else torch.from_numpy(np.array(g, copy=True))

    def step(self, grads: Sequence[np.ndarray | None]) -> None:
        self.set_grads(grads)
        assert self.opt.step() is None
        self.topt.step()
        self.steps += 1

    def compare(self, steps_for_tolerance: int | None = None) -> None:
        steps = self.steps if steps_for_tolerance is None else steps_for_tolerance
        assert_matches_torch(self.opt, self.params, self.topt, self.tparams, steps)


def run_pair(
    name: str,
    groups: list[dict[str, Any]],
    *,
    steps: int,
    rng: np.random.Generator,
    grad_fn: GradFn = default_grad,
    schedule: dict[int, list[tuple[int, dict[str, Any]]]] | None = None,
    compare_every: int = 1,
    bridge_kwargs: dict[str, Any] | None = None,
    **kwargs: Any,
) -> TorchPair:
    """``run_side_by_side`` of conftest.py, for the torch bridge (same arguments)."""
    pair = TorchPair(name, groups, bridge_kwargs=bridge_kwargs, **kwargs)
    for step in range(steps):
        for group_index, values in (schedule or {}).get(step, []):
            pair.set_hyperparameters(group_index, **values)
        pair.step(pair.make_grads(rng, step, grad_fn))
        if (step + 1) % compare_every == 0 or step == steps - 1:
            pair.compare()
    return pair


# --------------------------------------------------------------------------------------------
# snapshots: "nothing changed"
# --------------------------------------------------------------------------------------------


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor (NaN-safe bitwise comparison), taken with ``.clone()``."""
    flat = t.detach().clone().contiguous().reshape(-1)
    return flat.view(torch.uint8) if flat.numel() else flat


def snapshot(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Bitwise copies of every parameter and state value, plus which parameters have state."""
    params = all_params(opt)
    state = []
    for p in params:
        entry = opt.state.get(p)
        if not entry:
            state.append(None)
            continue
        state.append(
            {
                k: (v.dtype, tuple(v.shape), v.data_ptr(), _bits(v))
                if isinstance(v, torch.Tensor)
                else copy.deepcopy(v)
                for k, v in entry.items()
            }
        )
    return {
        "params": [(p.dtype, tuple(p.shape), p.data_ptr(), _bits(p)) for p in params],
        "ids": [id(p) for p in params],
        "state": state,
        "state_len": len(opt.state),
        "groups": [
            {k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in opt.param_groups
        ],
    }


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, tuple) and len(a) == 4 and isinstance(a[3], torch.Tensor):
        return a[:3] == b[:3] and torch.equal(a[3], b[3])
    return a == b


def assert_unchanged(opt: torch.optim.Optimizer, before: dict[str, Any]) -> None:
    """Every parameter and state tensor of ``opt`` is bitwise as in ``before``; no new state."""
    after = snapshot(opt)
    assert after["ids"] == before["ids"], "parameters were replaced"
    for i, (b, a) in enumerate(zip(before["params"], after["params"])):
        assert _same(b, a), f"parameter {i} changed"
    for i, (b, a) in enumerate(zip(before["state"], after["state"])):
        if b is None:
            assert a is None, f"state was created for parameter {i}"
            continue
        assert a is not None and sorted(a) == sorted(b), f"state keys of parameter {i} changed"
        for key in b:
            assert _same(b[key], a[key]), f"state[{i}][{key!r}] changed"
    assert after["state_len"] == before["state_len"], "number of state entries changed"
    assert after["groups"] == before["groups"], "param_groups changed"


def tensor_ids_and_pointers(opt: torch.optim.Optimizer) -> list[tuple[Any, ...]]:
    """(object id, data_ptr) of every parameter and every state tensor, in a fixed order."""
    out: list[tuple[Any, ...]] = []
    for i, p in enumerate(all_params(opt)):
        out.append(("param", i, id(p), p.data_ptr()))
        for key, value in sorted(opt.state.get(p, {}).items()):
            if isinstance(value, torch.Tensor):
                out.append((i, key, id(value), value.data_ptr()))
    return out
