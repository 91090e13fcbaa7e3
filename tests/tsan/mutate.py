"""Other Python threads change the arrays of running steps (issue 15's stress test).

Run by ``tests/test_concurrent_mutation.py`` in a subprocess with a timeout (a crash or a hang
fails it) and by ``make tsan`` with the extension built under ThreadSanitizer, which also
reports a free racing with the kernels' reads and writes (a use-after-free that did not crash).

In each scenario one thread steps an optimizer over and over while another keeps doing to it,
its parameters, gradients and state, what a Python program can do without going around NumPy's
or torch's own safety checks: drop the last reference to an array or tensor the step uses,
empty or refill the lists it was handed, replace parameters, gradients and state entries with
new ones (of the right shape or not), clear the state, add a parameter group, change
hyperparameters, point ``p.data`` at new memory or at a shorter view of its own, shrink a
gradient with ``resize_``, call ``ndarray.resize`` (which NumPy refuses while the step holds a
reference). A step the change makes invalid may raise the usual ``TypeError``, ``ValueError``
or ``KeyError``; anything else fails the run. What is checked:

- the process neither crashes nor hangs (the caller's timeout);
- an optimizer over other arrays, stepped by the same thread between the disturbed steps, ends
  bit for bit where the same steps end undisturbed (nothing wrote outside the disturbed step's
  arrays);
- once the mutator stops, the disturbed optimizer, given fresh parameters and gradients, steps
  to exactly the values of a new optimizer doing the same (no bookkeeping was left corrupt).

Value races (writing ``p[:] = 0`` while a step writes it) are left out on purpose: their
outcome is unspecified, as for any two threads writing one array, and ThreadSanitizer would
report them as the races they are.

Usage: ``python tests/tsan/mutate.py [scenario ...]`` (all by default); ``OPTIRS_MUTATE_STEPS``
sets the steps per scenario.
"""

from __future__ import annotations

import os
import random
import sys
import threading
import time
from typing import Any, Callable

import numpy as np
import optirs

N = 1 << 20  # elements: many work items, and a step of about a millisecond
SIZES = (N, N // 3 + 5, 17)
STEPS = int(os.environ.get("OPTIRS_MUTATE_STEPS", "150"))
# What a step may raise when the mutator made its input invalid.
REFUSALS = (TypeError, ValueError, KeyError)


def _rng_arrays(seed: int, sizes: tuple[int, ...] = SIZES) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n).astype(np.float32) for n in sizes]


class _Sentinel:
    """An undisturbed NumPy Adam, stepped between the disturbed steps, and its replay."""

    def __init__(self) -> None:
        self.opt = optirs.Adam(_rng_arrays(900), lr=1e-3, weight_decay=0.01)
        self.grads = _rng_arrays(901)
        self.steps = 0

    def step(self) -> None:
        self.opt.step(self.grads)
        self.steps += 1

    def check(self) -> list[str]:
        replay = optirs.Adam(_rng_arrays(900), lr=1e-3, weight_decay=0.01)
        for _ in range(self.steps):
            replay.step(self.grads)
        for got, want in zip(self.opt.param_groups[0]["params"], replay.param_groups[0]["params"]):
            if got.tobytes() != want.tobytes():
                return ["the undisturbed optimizer ended elsewhere than its replay"]
        return []


def _run(
    name: str,
    step: Callable[[], Any],
    restore: Callable[[], None],
    mutate: Callable[[random.Random], None],
    settle: Callable[[], list[str]],
) -> list[str]:
    """Steps while another thread, over and over, makes the optimizer steppable again
    (``restore``, which also drops the arrays the last steps used), waits a moment so that the
    next step starts, and changes something under it (``mutate``); returns the failures."""
    sentinel = _Sentinel()
    stop = threading.Event()
    mutator_errors: list[BaseException] = []
    counts = {"stepped": 0, "refused": 0, "mutations": 0}

    def mutator() -> None:
        rnd = random.Random(hash(name) & 0xFFFF)
        try:
            while not stop.is_set():
                restore()
                # The step runs with the GIL released: a pause of up to about two steps lands
                # the change before, inside or after one.
                time.sleep(rnd.random() * 2e-3)
                for _ in range(rnd.randrange(1, 4)):
                    mutate(rnd)
                    counts["mutations"] += 1
        except BaseException as e:
            mutator_errors.append(e)

    failures: list[str] = []
    t = threading.Thread(target=mutator)
    t.start()
    try:
        for _ in range(STEPS):
            try:
                step()
                counts["stepped"] += 1
            except REFUSALS:
                counts["refused"] += 1
            except BaseException as e:  # any other exception fails the run
                failures.append(f"step raised {type(e).__name__}: {e}")
                break
            sentinel.step()
    finally:
        stop.set()
        t.join()
    failures += [f"mutator raised {type(e).__name__}: {e}" for e in mutator_errors]
    failures += sentinel.check()
    failures += settle()
    print(
        f"{name}: {counts['stepped']} steps, {counts['refused']} refused, "
        f"{counts['mutations']} mutations: {'FAILED' if failures else 'ok'}"
    )
    return [f"{name}: {f}" for f in failures]


# --- NumPy API -------------------------------------------------------------------------------


def _settle(
    opt: Any,
    make: Callable[[list[Any]], Any],
    fresh: list[Any],
    twin: list[Any],
    step: Callable[[Any], Any],
    as_numpy: Callable[[Any], np.ndarray] = np.asarray,
) -> list[str]:
    """The disturbed optimizer, given ``fresh`` parameters, steps them exactly as a new one
    steps ``twin`` (equal copies): no bookkeeping was left corrupt."""
    opt.param_groups[:] = opt.param_groups[:1]
    opt.param_groups[0]["params"][:] = fresh
    opt.param_groups[0]["lr"] = 1e-3
    opt.state.clear()
    new = make(twin)
    for _ in range(3):
        step(opt)
        step(new)
    if any(as_numpy(a).tobytes() != as_numpy(b).tobytes() for a, b in zip(fresh, twin)):
        return ["after the mutations, a step on fresh parameters differs from a new optimizer's"]
    return []


def _numpy_settle(opt: Any, make: Callable[[list[np.ndarray]], Any]) -> list[str]:
    grads = _rng_arrays(501)
    return _settle(opt, make, _rng_arrays(500), _rng_arrays(500), lambda o: o.step(grads))


def _fresh(value: float = 0.5) -> list[np.ndarray]:
    """New arrays of the scenario's sizes (quick to make: no random numbers)."""
    return [np.full(n, value, np.float32) for n in SIZES]


def numpy_plan_gradients() -> list[str]:
    """The list of gradients handed to ``step`` is emptied, refilled and its items replaced."""
    make = lambda ps: optirs.Adam(ps, lr=1e-3, amsgrad=True)  # noqa: E731
    opt = make(_rng_arrays(1))
    grads: list[np.ndarray] = []

    def restore() -> None:
        grads[:] = _fresh()  # the arrays of the last step lose their only owner

    def mutate(rnd: random.Random) -> None:
        k = rnd.randrange(4)
        if k == 0:
            grads.clear()
        elif k == 1 and grads:
            grads[rnd.randrange(len(grads))] = np.ones(rnd.choice([N, 5]), np.float32)
        elif k == 2:
            grads[:] = _fresh(-1.0)
        else:
            del grads[rnd.randrange(len(grads) + 1) :]

    return _run(
        "numpy_plan_gradients",
        lambda: opt.step(grads),
        restore,
        mutate,
        lambda: _numpy_settle(opt, make),
    )


def numpy_params_and_state() -> list[str]:
    """Parameters, state entries and groups are replaced, dropped and resized under the step."""
    make = lambda ps: optirs.RMSprop(ps, lr=1e-3, centered=True, momentum=0.9)  # noqa: E731
    opt = make(_rng_arrays(4))
    grads = _rng_arrays(5)

    def restore() -> None:
        del opt.param_groups[1:]
        opt.param_groups[0]["params"][:] = _fresh()  # the old parameters lose their owner
        opt.param_groups[0]["lr"] = 1e-3

    def mutate(rnd: random.Random) -> None:
        group = opt.param_groups[0]
        params = group["params"]
        k = rnd.randrange(8)
        i = rnd.randrange(len(params))
        if k == 0:
            params[i] = np.zeros(params[i].shape, np.float32)
        elif k == 1:
            params[i] = np.zeros(7, np.float32)  # a shape its gradient does not have
        elif k == 2:
            opt.state.clear()
        elif k == 3:
            state = opt.state.get(params[i])
            if state:
                key = rnd.choice(sorted(state))
                if rnd.random() < 0.5:
                    del state[key]
                else:
                    state[key] = np.zeros(rnd.choice([params[i].size, 3]), np.float32)
        elif k == 4:
            try:  # NumPy refuses while anything else holds a reference: the step does
                params[i].resize(params[i].size + 1)
            except ValueError:
                pass
        elif k == 5:
            group["lr"] = rnd.choice([1e-2, -1.0, float("nan")])
        elif k == 6:
            opt.add_param_group({"params": [np.zeros(rnd.choice([N, 9]), np.float32)]})
        else:
            del params[i]

    def step() -> None:
        n = sum(len(g["params"]) for g in opt.param_groups)
        opt.step((grads * (n // len(grads) + 1))[:n])

    return _run("numpy_params_and_state", step, restore, mutate, lambda: _numpy_settle(opt, make))


# --- optirs.torch ----------------------------------------------------------------------------


def _torch_scenarios() -> list[Callable[[], list[str]]]:
    try:
        import torch
    except ImportError:
        print("torch not installed: its scenarios are not run")
        return []
    import optirs.torch as ot

    def params(seed: int) -> list[Any]:
        ps = [torch.nn.Parameter(torch.from_numpy(a)) for a in _rng_arrays(seed)]
        for p, g in zip(ps, _rng_arrays(seed + 1)):
            p.grad = torch.from_numpy(g)
        return ps

    def settle(opt: Any, make: Callable[[list[Any]], Any]) -> list[str]:
        step = lambda o: o.step()  # noqa: E731
        return _settle(opt, make, params(700), params(700), step, lambda t: t.detach().numpy())

    def restore_params(opt: Any) -> None:
        """Every parameter of the first group gets new memory and a new gradient (the old
        storages lose their last owner); other groups go."""
        del opt.param_groups[1:]
        opt.param_groups[0]["lr"] = 1e-3
        with torch.no_grad():
            for p, n in zip(opt.param_groups[0]["params"], SIZES):
                p.data = torch.full((n,), 0.5)
                p.grad = torch.full((n,), 0.25)

    def scenario(
        name: str, make: Callable[[list[Any]], Any], seed: int, change: Callable[..., None]
    ) -> list[str]:
        """Runs ``change(opt, p, rnd)`` on a random parameter of the first group."""
        opt = make(params(seed))

        def mutate(rnd: random.Random) -> None:
            ps = opt.param_groups[0]["params"]
            with torch.no_grad():
                change(opt, ps[rnd.randrange(len(ps))], rnd)

        return _run(name, opt.step, lambda: restore_params(opt), mutate, lambda: settle(opt, make))

    def torch_grads_and_data() -> list[str]:
        """``p.grad`` and ``p.data`` are replaced, shrunk and re-pointed, their old tensors
        dropped.

        ``p.grad = None`` is not among the changes: with torch 2.15, assigning it while another
        thread reads ``p.grad`` crashes torch itself, with no optimizer involved (the setter
        frees the old gradient's Python object with the GIL released while ``p.grad`` still
        returns it; ``tests/tsan/torch_grad_race.py`` shows it). Replacing the gradient
        (``p.grad = new``) drops the old one just as well and torch survives it."""

        def change(opt: Any, p: Any, rnd: random.Random) -> None:
            k = rnd.randrange(6)
            if k == 0:
                p.grad = torch.randn(2 * p.numel(), dtype=p.dtype)[::2].view(p.shape)  # not dense
            elif k == 1:
                p.data = torch.randn_like(p)  # the old storage loses its last owner
                p.grad = torch.randn_like(p)
            elif k == 2 and p.grad is not None and p.grad.numel() > 3:
                p.grad.resize_(3)  # shrinking keeps the storage: only the shape changes
            elif k == 3:
                p.data = p.data[: max(1, p.numel() // 2)]
            elif k == 4:
                p.data = torch.zeros(p.shape, dtype=torch.float64)
            else:
                p.grad = torch.randn_like(p)

        make = lambda ps: ot.AdamW(ps, lr=1e-3, weight_decay=0.1)  # noqa: E731
        return scenario("torch_grads_and_data", make, 10, change)

    def torch_state_and_groups() -> list[str]:
        """State tensors and entries, parameter groups and hyperparameters change."""

        def change(opt: Any, p: Any, rnd: random.Random) -> None:
            k = rnd.randrange(8)
            state = opt.state.get(p)
            if k == 0:
                opt.state.clear()
            elif k == 1 and state:
                state.pop(rnd.choice(sorted(state)), None)
            elif k == 2 and state and "exp_avg" in state:
                state["exp_avg"] = torch.zeros_like(p)  # the old one loses its last owner
            elif k == 3 and state and "exp_avg_sq" in state:
                state["exp_avg_sq"] = state["exp_avg_sq"][:2]
            elif k == 4 and state and "step" in state:
                state["step"] = torch.tensor(float(rnd.randrange(5)))
            elif k == 5:
                opt.param_groups[0]["lr"] = rnd.choice([0.0, -1e-3, float("nan")])
            elif k == 6:
                q = torch.nn.Parameter(torch.zeros(rnd.choice([N, 9])))
                q.grad = torch.ones_like(q)
                opt.add_param_group({"params": [q]})
            else:
                del opt.param_groups[1:]

        make = lambda ps: ot.Adam(ps, lr=1e-3, amsgrad=True)  # noqa: E731
        return scenario("torch_state_and_groups", make, 20, change)

    return [torch_grads_and_data, torch_state_and_groups]


def main(argv: list[str]) -> int:
    optirs.set_num_threads(2)
    sys.setswitchinterval(1e-4)  # the mutator gets the GIL back quickly between steps
    scenarios = {f.__name__: f for f in [numpy_plan_gradients, numpy_params_and_state]}
    scenarios.update({f.__name__: f for f in _torch_scenarios()})
    chosen = argv or list(scenarios)
    failures: list[str] = []
    for name in chosen:
        failures += scenarios[name]()
    for f in failures:
        print("FAIL:", f, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
