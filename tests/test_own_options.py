"""An optimizer's own options survive load_state_dict, copy.deepcopy and pickle.

``skip_nonfinite`` and ``flush_denormals`` (and the ``skipped_steps`` / ``last_step_skipped``
record) are optirs's, not torch's: they are not part of a state dict. torch's
``Optimizer.load_state_dict`` ends by calling ``__setstate__`` with only ``state`` and
``param_groups``, and torch's ``__getstate__`` (used by pickle and deepcopy) keeps only
``defaults``, ``state`` and ``param_groups``, so the torch bridge has to keep and carry them
itself; resuming from a checkpoint must not silently drop the NaN guard. The NumPy API is
pinned to the same behaviour. An object unpickled from an older pickle, made without them,
gets the constructor's defaults.
"""

from __future__ import annotations

import copy
import math
import pickle
import platform

import numpy as np
import optirs
import optirs.torch
import pytest
import torch
from conftest import FULL_STATE_KWARGS, OPTIMIZER_NAMES, optirs_class, torch_class
from torch_helpers import bridge_class

# flush_denormals is only available on x86-64 and aarch64 (elsewhere a step with it raises).
FLUSH = platform.machine().lower() in ("x86_64", "amd64", "aarch64", "arm64")
OPTIONS = {"skip_nonfinite": True, "flush_denormals": FLUSH}
SHAPES = ((7,), (3, 5))


class Run:
    """An optimizer of either API with non-default options, stepped once and then skipped
    once (a NaN gradient), so that ``skipped_steps == 1`` and ``last_step_skipped``."""

    def __init__(self, api: str, name: str, seed: int = 3) -> None:
        self.api, self.name = api, name
        self.rng = np.random.default_rng(seed)
        arrays = [self.rng.standard_normal(s) for s in SHAPES]
        if api == "numpy":
            self.params = [a.astype(np.float32) for a in arrays]
            self.opt = optirs_class(name)(self.params, **FULL_STATE_KWARGS[name], **OPTIONS)
        else:
            self.params = [torch.nn.Parameter(torch.from_numpy(a).float()) for a in arrays]
            self.opt = bridge_class(name)(self.params, **FULL_STATE_KWARGS[name], **OPTIONS)
        self.step(nan=False)
        self.step(nan=True)
        assert self.opt.skipped_steps == 1 and self.opt.last_step_skipped

    def step(self, nan: bool, opt=None, params=None) -> None:
        opt = self.opt if opt is None else opt
        params = self.params if params is None else params
        grads = [self.rng.standard_normal(p.shape).astype(np.float32) for p in params]
        if nan:
            grads[-1][0] = math.nan
        if self.api == "numpy":
            opt.step(grads)
            return
        for p, g in zip(params, grads):
            p.grad = torch.from_numpy(g)
        opt.step()


def _assert_options(opt, skipped: int, last: bool) -> None:
    assert opt.skip_nonfinite is True
    assert opt.flush_denormals is FLUSH
    assert opt.skipped_steps == skipped
    assert opt.last_step_skipped is last


def _params_of(opt):
    return [p for g in opt.param_groups for p in g["params"]]


def _values(api, params):
    if api == "numpy":
        return [p.copy() for p in params]
    return [p.detach().clone() for p in params]


def _assert_nan_step_is_skipped(run: Run, opt, skipped: int) -> None:
    """The NaN guard still works: a NaN gradient changes nothing and is counted."""
    params = _params_of(opt)
    before = _values(run.api, params)
    run.step(nan=True, opt=opt, params=params)
    for a, b in zip(before, _values(run.api, params)):
        assert (np.array_equal if run.api == "numpy" else torch.equal)(a, b)
    _assert_options(opt, skipped, True)


@pytest.mark.parametrize("api", ["numpy", "torch"])
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_load_state_dict_keeps_own_options(api, name):
    run = Run(api, name)
    sd = copy.deepcopy(run.opt.state_dict())
    run.step(nan=False)
    _assert_options(run.opt, 1, False)
    run.opt.load_state_dict(sd)
    _assert_options(run.opt, 1, False)
    _assert_nan_step_is_skipped(run, run.opt, 2)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_bridge_keeps_own_options_loading_torch_optims_state_dict(name):
    """A checkpoint written by torch.optim (no optirs options in it) loaded into optirs.torch."""
    run = Run("torch", name)
    tparams = [torch.nn.Parameter(p.detach().clone()) for p in run.params]
    topt = torch_class(name)(tparams, **FULL_STATE_KWARGS[name])
    for p in tparams:
        p.grad = torch.ones_like(p)
    topt.step()
    run.opt.load_state_dict(topt.state_dict())
    _assert_options(run.opt, 1, True)
    _assert_nan_step_is_skipped(run, run.opt, 2)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("api", ["numpy", "torch"])
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_copies_carry_own_options(api, name, how):
    run = Run(api, name)
    if how == "deepcopy":
        twin = copy.deepcopy(run.opt)
    else:
        twin = pickle.loads(pickle.dumps(run.opt))
    _assert_options(twin, 1, True)
    if api == "torch":
        assert twin._step_supports_amp_scaling is True
    _assert_nan_step_is_skipped(run, twin, 2)
    # The original is left as it was.
    _assert_options(run.opt, 1, True)


def _old_getstate(api):
    """The ``__getstate__`` of an optirs without the options: torch's own for the bridge; for
    the NumPy API its current one minus the options."""
    if api == "torch":
        return torch.optim.Optimizer.__getstate__
    current = optirs.Optimizer.__getstate__

    def getstate(self):
        state = current(self)
        for key in ("skip_nonfinite", "flush_denormals", "skipped_steps", "last_step_skipped"):
            del state[key]
        return state

    return getstate


@pytest.mark.parametrize("api", ["numpy", "torch"])
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_older_pickle_without_options_gets_defaults(api, name, monkeypatch):
    run = Run(api, name)
    cls = optirs.Optimizer if api == "numpy" else optirs.torch._Bridge
    with monkeypatch.context() as m:
        m.setattr(cls, "__getstate__", _old_getstate(api))
        blob = pickle.dumps(run.opt)
    opt = pickle.loads(blob)
    assert opt.skip_nonfinite is False
    assert opt.flush_denormals is False
    assert opt.skipped_steps == 0
    assert opt.last_step_skipped is False
    # It steps (state and groups came through), without the guard: NaN goes in, as in torch.
    params = _params_of(opt)
    run.step(nan=True, opt=opt, params=params)
    assert opt.skipped_steps == 0 and opt.last_step_skipped is False
    values = params[-1]
    # Sign-based updates move the parameter by a finite step (torch.sign(nan) is 0): the NaN
    # goes into the state instead.
    key = {"Lion": "exp_avg", "Rprop": "prev"}.get(name)
    if key is not None:
        values = opt.state[values][key]
    values = values if api == "numpy" else values.detach().numpy()
    assert np.isnan(values.reshape(-1)[0])
