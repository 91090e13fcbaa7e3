"""Threaded stress of the extension for ThreadSanitizer (``make tsan``; not collected by pytest).

Run by ``tests/tsan/run.sh`` with an optirs whose Rust code (std included) is built with
``-Zsanitizer=thread`` and libtsan preloaded into an ordinary CPython. Several Python threads
step optimizers at once while another keeps changing ``set_num_threads``, so that steps run
on a pool that is being replaced, from callers that find it busy, and beside each other:

- each of ``SEPARATE`` threads steps an optimizer of its own (NumPy API: SGD with momentum,
  Adam with amsgrad, RMSprop centered, Adagrad; float32 and float64 parameters of one or
  several work items, plus a small one that stays on the calling thread);
- ``SHARED`` threads step one Adam together (the optimizer serialises its steps);
- one thread steps through the torch bridge (``optirs.torch``) when torch imports;
- one thread cycles ``set_num_threads`` through 1..4 while they run.

The checks are the same as the pytest suite's: every optimizer ends bit for bit where the same
steps end when run one after the other on one thread. ThreadSanitizer reports any data race in
the instrumented code (the kernels, the pool, the step's bookkeeping) on stderr and makes the
process exit with a non-zero status (``TSAN_OPTIONS=exitcode=66``).

``--canary`` races on purpose instead: two optimizers over one array, stepped from two threads
at once (a misuse optirs does not guard against: each step only checks its own arrays). The
run script expects ThreadSanitizer to report it in the kernels, which shows that the
instrumented extension is the one loaded and that the interpreter between the threads hides
no race from it.
"""

from __future__ import annotations

import os
import sys
import threading

import numpy as np
import optirs

N = 1 << 17  # elements: eight work items of CHUNK_ELEMS (2**14), above the 2**16 threshold
STEPS = int(os.environ.get("OPTIRS_TSAN_STEPS", "30"))
SHARED = 2

SEPARATE = [
    ("SGD", {"lr": 1e-2, "momentum": 0.9, "nesterov": True}, np.float32),
    ("Adam", {"lr": 1e-3, "amsgrad": True, "weight_decay": 0.1}, np.float32),
    ("RMSprop", {"lr": 1e-3, "centered": True, "momentum": 0.5}, np.float64),
    ("Adagrad", {"lr": 1e-2, "weight_decay": 0.1}, np.float32),
]


def _arrays(seed: int, dtype) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n).astype(dtype) for n in (N, N // 2 + 3, 33)]


def _bits(opt) -> list[bytes]:
    out = []
    for group in opt.param_groups:
        for p in group["params"]:
            out.append(p.tobytes())
            out.extend(np.asarray(v).tobytes() for _, v in sorted(opt.state.get(p, {}).items()))
    return out


def _separate(k: int) -> list[bytes]:
    name, kwargs, dtype = SEPARATE[k]
    opt = getattr(optirs, name)(_arrays(k, dtype), **kwargs)
    grads = _arrays(100 + k, dtype)
    for _ in range(STEPS):
        opt.step(grads)
    return _bits(opt)


def _shared_new():
    return optirs.Adam(_arrays(50, np.float32), lr=1e-3)


def _bridge():
    try:
        import torch
    except ImportError:
        return None
    import optirs.torch

    params = [torch.nn.Parameter(torch.from_numpy(a)) for a in _arrays(60, np.float32)]
    for p, g in zip(params, _arrays(61, np.float32)):
        p.grad = torch.from_numpy(g)
    return optirs.torch.AdamW(params, lr=1e-3, weight_decay=0.1)


def _bridge_bits(opt) -> list[bytes]:
    out = []
    for group in opt.param_groups:
        for p in group["params"]:
            out.append(p.detach().numpy().tobytes())
            out.extend(v.numpy().tobytes() for _, v in sorted(opt.state[p].items()))
    return out


def canary() -> int:
    (shared,) = _arrays(70, np.float32)[:1]
    opts = [optirs.SGD([shared], lr=1e-3) for _ in range(2)]
    grads = [_arrays(71, np.float32)[0]]
    optirs.set_num_threads(1)
    barrier = threading.Barrier(2)

    def run(opt):
        barrier.wait()
        for _ in range(STEPS):
            opt.step(grads)

    threads = [threading.Thread(target=run, args=(o,)) for o in opts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("tsan canary: two optimizers stepped one array from two threads")
    return 0


def main() -> int:
    optirs.set_num_threads(1)
    want_separate = [_separate(k) for k in range(len(SEPARATE))]
    shared_seq = _shared_new()
    grads = _arrays(51, np.float32)
    for _ in range(SHARED * STEPS):
        shared_seq.step(grads)
    want_shared = _bits(shared_seq)
    bridge_seq = _bridge()
    if bridge_seq is not None:
        for _ in range(STEPS):
            bridge_seq.step()
        want_bridge = _bridge_bits(bridge_seq)

    shared = _shared_new()
    bridge = _bridge()
    got_separate: dict[int, list[bytes]] = {}
    stop = threading.Event()
    errors: list[BaseException] = []
    bodies = [lambda k=k: got_separate.__setitem__(k, _separate(k)) for k in range(len(SEPARATE))]
    bodies += [lambda: [shared.step(grads) for _ in range(STEPS)] for _ in range(SHARED)]
    if bridge is not None:
        bodies.append(lambda: [bridge.step() for _ in range(STEPS)])
    barrier = threading.Barrier(len(bodies) + 1)

    def run(body):
        try:
            barrier.wait()
            body()
        except BaseException as e:
            errors.append(e)

    def churn():
        barrier.wait()
        n = 0
        while not stop.is_set():
            optirs.set_num_threads(1 + n % 4)
            n += 1
            stop.wait(0.002)

    optirs.set_num_threads(4)
    threads = [threading.Thread(target=run, args=(b,)) for b in bodies]
    threads.append(threading.Thread(target=churn))
    for t in threads:
        t.start()
    for t in threads[:-1]:
        t.join()
    stop.set()
    threads[-1].join()

    failures = [repr(e) for e in errors]
    for k in range(len(SEPARATE)):
        if got_separate.get(k) != want_separate[k]:
            failures.append(f"{SEPARATE[k][0]} in its own thread ended elsewhere")
    if _bits(shared) != want_shared:
        failures.append("the shared Adam ended elsewhere")
    if bridge is not None and _bridge_bits(bridge) != want_bridge:
        failures.append("the torch bridge's AdamW ended elsewhere")
    for f in failures:
        print("FAIL:", f, file=sys.stderr)
    print(
        f"tsan stress: {len(bodies)} stepping threads x {STEPS} steps, "
        f"torch bridge {'on' if bridge is not None else 'off (no torch)'}, "
        f"simd {optirs.simd_level()}: {'FAILED' if failures else 'ok'}"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(canary() if sys.argv[1:] == ["--canary"] else main())
