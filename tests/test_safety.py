"""Issue 15's reproductions: nothing a Python thread does (empty a list, fork, interrupt) may
crash, hang or corrupt a step, and the extension's private classes cannot be misused to write
out of bounds. Scenarios that could crash or hang run in a fresh interpreter with a timeout."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import optirs
import optirs.torch
import pytest
import torch

TIMEOUT = 240


def _run(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=full,
    )


def _assert_ok(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"


def test_emptying_the_gradient_list_mid_step_does_not_crash():
    """The plan step must own the gradients it reads: the list is the user's only reference."""
    r = _run(
        """
        import threading, time, numpy as np, optirs
        optirs.set_num_threads(2); N = 1 << 24
        stepped = 0
        for attempt in range(6):
            p = np.zeros(N, np.float32); opt = optirs.SGD([p], lr=0.1)
            opt.step([np.ones(N, np.float32)]); opt.step([np.ones(N, np.float32)])
            grads = [np.ones(N, np.float32)]
            t = threading.Thread(target=lambda: (time.sleep(0.001 * attempt), grads.clear()))
            t.start()
            try:
                opt.step(grads)
                stepped += 1
                expected = -0.3
            except ValueError:
                # emptied before the step read it (a loaded machine can run the other thread
                # first): refused, nothing changed
                expected = -0.2
            t.join()
            assert np.allclose(p, expected), (p[:4], expected)
        assert stepped >= 1, "no attempt stepped: the race was never exercised"
        print("ok")
        """
    )
    _assert_ok(r)


def test_emptying_state_lists_handed_to_the_core_mid_step_does_not_crash():
    r = _run(
        """
        import threading, time, numpy as np, optirs
        optirs.set_num_threads(2); N = 1 << 23
        stepped = 0
        for attempt in range(4):
            p, g = np.zeros(N), np.ones(N)
            m, v, s = np.zeros(N), np.zeros(N), np.zeros((), np.float32)
            bufs = [m, v, None]
            del m, v
            groups = [dict(params=[0], lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                           amsgrad=False, maximize=False, decoupled_weight_decay=False)]
            t = threading.Thread(target=lambda: (time.sleep(0.001 * attempt), bufs.clear()))
            t.start()
            try:
                optirs._core.step("adam", groups, [p], [g], [bufs], [s], [])
                stepped += 1
                assert float(s) == 1.0 and np.allclose(p, -0.1)
            except ValueError as exc:
                # emptied before the core read it: refused, nothing changed
                assert float(s) == 0.0 and not p.any(), exc
            t.join()
        assert stepped >= 1, "no attempt stepped: the race was never exercised"
        print("ok")
        """
    )
    _assert_ok(r)


def test_fork_while_another_thread_steps_and_sets_threads():
    """Children forked while another thread is inside a step or set_num_threads always step."""
    r = _run(
        """
        import os, signal, threading, time, numpy as np, optirs
        N = 1 << 17
        p = np.zeros(N, np.float32); o = optirs.Adam([p]); g = np.ones(N, np.float32)
        stop = False
        def loop():
            k = 0
            while not stop:
                optirs.set_num_threads(2 + k % 2); o.step([g]); k += 1
        t = threading.Thread(target=loop); t.start()
        hung = 0
        for i in range(25):
            time.sleep(0.002 * (i % 5))
            pid = os.fork()
            if pid == 0:
                try:
                    o.step([g]); q = np.zeros(N, np.float32); optirs.SGD([q], lr=1.0).step([g])
                    os._exit(0 if q[0] == -1.0 else 3)
                finally:
                    os._exit(4)
            deadline = time.monotonic() + 30
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    assert os.waitstatus_to_exitcode(status) == 0, status
                    break
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL); os.waitpid(pid, 0); hung += 1; break
                time.sleep(0.005)
        stop = True; t.join()
        assert hung == 0, f"{hung} children hung"
        print("ok")
        """
    )
    _assert_ok(r)


INTERRUPT = """
import signal, time, random, numpy as np, optirs
N = 1 << 23
random.seed(5)
def handler(*_):
    raise KeyboardInterrupt
signal.signal(signal.SIGALRM, handler)
KW = dict(lr=1e-3, momentum=0.5, centered=True)

def make():
    {make}

def first_step(opt, p):
    {step}

def has_state(opt, p):
    {has_state}

p, opt = make()
t0 = time.perf_counter(); first_step(opt, p); took = time.perf_counter() - t0
bad = interrupted = 0
for trial in range(30):
    p, opt = make()
    before = p.copy() if isinstance(p, np.ndarray) else p.detach().clone()
    signal.setitimer(signal.ITIMER_REAL, random.uniform(0.0, 1.3 * took))
    try:
        first_step(opt, p)
        time.sleep(took)  # an alarm that comes late lands here, harmlessly
    except KeyboardInterrupt:
        interrupted += 1
    signal.setitimer(signal.ITIMER_REAL, 0)
    changed = not bool((p == before).all())
    state = has_state(opt, p)
    if changed != state:
        bad += 1
print("interrupted", interrupted, "bad", bad)
assert interrupted > 0
assert bad == 0, bad
"""


@pytest.mark.parametrize("api", ["numpy", "torch"])
def test_interrupted_first_step_keeps_parameter_and_state_together(api):
    if api == "numpy":
        make = "p = np.linspace(-1, 1, N, dtype=np.float32); return p, optirs.RMSprop([p], **KW)"
        step = "opt.step([np.full(N, 0.5, np.float32)])"
        has_state = "return p in opt.state and float(opt.state[p]['step']) == 1.0"
    else:
        make = (
            "torch.set_num_threads(1); "
            "p = torch.nn.Parameter(torch.linspace(-1, 1, N)); "
            "return p, optirs.torch.RMSprop([p], **KW)"
        )
        step = "p.grad = torch.full((N,), 0.5); opt.step()"
        has_state = "return p in opt.state and float(opt.state[p]['step']) == 1.0"
    prelude = "import torch, optirs.torch\n" if api == "torch" else ""
    r = _run(prelude + INTERRUPT.format(make=make, step=step, has_state=has_state))
    _assert_ok(r)


def test_panic_after_writes_says_the_step_stopped_part_way():
    saved = optirs.get_num_threads()
    try:
        for threads in (1, 2):
            optirs.set_num_threads(threads)
            n = 300_001
            p = np.zeros(n, np.float32)
            g = np.ones(n, np.float32)
            m, v, s = np.zeros(n, np.float32), np.zeros(n, np.float32), np.zeros((), np.float32)
            groups = [
                dict(
                    params=[0],
                    lr=0.1,
                    betas=(0.9, 0.999),
                    eps=1e-8,
                    weight_decay=0.0,
                    amsgrad=False,
                    maximize=False,
                    decoupled_weight_decay=False,
                )
            ]
            args = ("adam", groups, [p], [g], [(m, v, None)], [s], [])
            with pytest.raises(RuntimeError, match=r"internal error.*stopped part-way"):
                optirs._core.step(*args, _panic_for_tests="after_write")
            assert np.any(p != 0), "no item was written before the panic"
            assert float(s) == 0.0, "the counter advanced for a failed step"
            # The process and the pool keep working.
            assert optirs._core.step(*args) is True
            assert float(s) == 1.0
    finally:
        optirs.set_num_threads(saved)


def _adam_entry(p: torch.Tensor):
    opt = optirs.torch.Adam([p], lr=0.1)
    p.grad = torch.ones_like(p)
    opt.step()
    state = opt.state[p]
    keys = ("exp_avg", "exp_avg_sq", "step")
    items = tuple(state[k] for k in keys)
    views = (items[0].numpy(), items[1].numpy(), items[2].numpy())
    return opt, keys, items, views


@pytest.mark.parametrize(
    "lie",
    [
        "short_param_view",
        "short_state_view",
        "view_elsewhere",
        "wide_counter",
        "not_a_tensor",
        "old_layout",
        "bad_key",
        "no_counter",
    ],
)
def test_torch_plan_refuses_arguments_that_would_write_out_of_bounds(lie):
    p = torch.nn.Parameter(torch.zeros(64))
    _, keys, items, views = _adam_entry(p)
    p_view = p.detach().numpy()
    entry: tuple = (0, p, p_view, keys, items, views)
    if lie == "short_param_view":
        entry = (0, p, p_view[:8], keys, items, views)
    elif lie == "short_state_view":
        entry = (0, p, p_view, keys, items, (views[0][:4], views[1], views[2]))
    elif lie == "view_elsewhere":
        entry = (0, p, np.zeros(64, np.float32), keys, items, views)
    elif lie == "wide_counter":
        entry = (0, p, p_view, keys, items, (views[0], views[1], np.zeros(8, np.float32)))
    elif lie == "not_a_tensor":
        entry = (0, object(), p_view, keys, items, views)
    elif lie == "old_layout":
        entry = (0, p, "float32", 10**9, None, keys, items, False, ())
    elif lie == "bad_key":
        entry = (0, p, p_view, ("exp_avg", "bogus", "step"), items, views)
    elif lie == "no_counter":
        entry = (0, p, p_view, keys[:2], items[:2], views[:2])
    with pytest.raises((ValueError, TypeError)):
        optirs._core.TorchPlan("adam", [entry])


class _ShrinksWhenAsked(torch.nn.Parameter):
    """A parameter that another thread re-points to its first half (`p.data = p.data[:k]`,
    same data pointer) while the plan reads it: torch's methods release the GIL."""

    armed = False

    def stride(self, *args):
        if _ShrinksWhenAsked.armed:
            _ShrinksWhenAsked.armed = False
            self.data = self.data[: self.numel() // 2]
        return super().stride(*args)


@pytest.mark.parametrize("exchange", [False, True])
def test_torch_plan_refuses_a_parameter_re_pointed_while_it_is_read(exchange):
    """The plan must not keep the view's length with the shape of a later reading: a
    gradient of that shorter shape would pass its check and the kernels read past it."""
    api = optirs.torch._bridge._EXCHANGE_API
    if exchange and api is None:
        pytest.skip("this torch has no DLPack exchange API")
    p = _ShrinksWhenAsked(torch.zeros(64))
    _, keys, items, views = _adam_entry(p)
    entry = (0, p, p.detach().numpy(), keys, items, views)
    _ShrinksWhenAsked.armed = True
    with pytest.raises(ValueError, match="differ"):
        optirs._core.TorchPlan("adam", [entry], api if exchange else None)
    assert p.numel() == 32, "the parameter was not re-pointed: the test did not test"


def test_numpy_api_refuses_integer_arrays_slipped_into_param_groups():
    p = np.zeros(8, np.float32)
    opt = optirs.SGD([p], lr=0.1)
    q = np.arange(8, dtype=np.uint16)
    opt.param_groups[0]["params"].append(q)
    with pytest.raises(TypeError, match="uint16"):
        opt.step([np.ones(8, np.float32), np.ones(8, np.uint16)])
    assert np.all(q == np.arange(8)) and np.all(p == 0)
    with pytest.raises(TypeError, match="uint16"):
        optirs.SGD([np.zeros(4, np.uint16)], lr=0.1)


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "RMSprop", "Adagrad"])
def test_numpy_api_steps_ml_dtypes_bfloat16_as_the_bridge_does(name):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    kw = {"SGD": dict(lr=0.05, momentum=0.9, weight_decay=0.01)}.get(name, dict(lr=0.01))
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(1027, generator=gen).to(torch.bfloat16)
    tp = torch.nn.Parameter(base.clone())
    topt = getattr(optirs.torch, name)([tp], **kw)
    p = base.view(torch.uint16).numpy().view(bf16).copy()
    opt = getattr(optirs, name)([p], **kw)
    for _ in range(4):
        g = torch.randn(1027, generator=gen).to(torch.bfloat16)
        tp.grad = g.clone()
        topt.step()
        opt.step([g.view(torch.uint16).numpy().view(bf16).copy()])
    assert p.dtype == bf16
    assert p.view(np.uint16).tobytes() == tp.detach().view(torch.uint16).numpy().tobytes()
    for key, value in topt.state[tp].items():
        mine = opt.state[p][key]
        if key == "step":
            assert float(mine) == float(value)
        else:
            assert mine.dtype == bf16
            assert mine.view(np.uint16).tobytes() == value.view(torch.uint16).numpy().tobytes()


@pytest.mark.parametrize(
    ("var", "value", "said"),
    [
        ("OPTIRS_SIMD", "bogus", 'OPTIRS_SIMD="bogus" names no SIMD level'),
        ("OPTIRS_NUM_THREADS", "abc", 'OPTIRS_NUM_THREADS="abc" is not a whole number'),
        ("OPTIRS_NUM_THREADS", "0", 'OPTIRS_NUM_THREADS="0" is not a whole number >= 1'),
        ("OPTIRS_SPIN_US", "-5", 'OPTIRS_SPIN_US="-5" is not a whole number'),
    ],
)
def test_unusable_environment_values_are_said_once(var, value, said):
    code = (
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import optirs\n"
        "    import importlib; importlib.reload(optirs)\n"
        "print('|'.join(str(x.message) for x in w if issubclass(x.category, RuntimeWarning)))\n"
        "print(optirs.simd_level(), optirs.get_num_threads())\n"
    )
    r = _run(code, {var: value})
    _assert_ok(r)
    lines = r.stdout.splitlines()
    assert lines[0].count(var) == 1, r.stdout
    assert said in lines[0], r.stdout
    assert "using" in lines[0]


def test_usable_environment_values_say_nothing():
    r = _run(
        "import warnings\nwarnings.simplefilter('error')\nimport optirs\nprint('ok')",
        {"OPTIRS_SIMD": "baseline", "OPTIRS_NUM_THREADS": "2", "OPTIRS_SPIN_US": "0"},
    )
    _assert_ok(r)


MUTATE = os.path.join(os.path.dirname(__file__), "tsan", "mutate.py")


@pytest.mark.parametrize(
    "scenario",
    [
        "numpy_plan_gradients",
        "numpy_params_and_state",
        "torch_grads_and_data",
        "torch_state_and_groups",
    ],
)
def test_other_threads_changing_the_arrays_of_running_steps(scenario):
    """Drops, replacements, resizes and cleared state from another thread mid-step: no crash,
    no hang, nothing written outside the step's arrays, and the optimizer still steps right
    afterwards (tests/tsan/mutate.py says what each scenario does; `make tsan` runs it too).
    glibc is told to give every array over 64 KiB its own mapping and unmap it when freed (by
    default it raises that threshold as arrays are freed, and reuses their memory): a step
    reading an array freed under it then crashes instead of reading stale numbers."""
    r = subprocess.run(
        [sys.executable, MUTATE, scenario],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
    )
    _assert_ok(r)
    assert f"{scenario}: " in r.stdout and ": ok" in r.stdout, r.stdout
