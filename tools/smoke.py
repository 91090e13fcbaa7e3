"""A smoke test of an installed optirs where the test suite cannot run (no torch wheel for the
platform or Python: see .github/workflows/wheels.yml): every NumPy optimizer steps float32 and
float64 arrays, changes them, stays finite, and gives the same bits at every SIMD level and at
1 and 2 threads; SGD matches its formula bit for bit. Exits non-zero on any failure.

Run: python tools/smoke.py
"""

from __future__ import annotations

import inspect

import numpy as np
import optirs


def optimizers() -> list[type]:
    """Every optimizer class the NumPy API exports."""
    return [
        getattr(optirs, n)
        for n in optirs.__all__
        if inspect.isclass(getattr(optirs, n))
        and issubclass(getattr(optirs, n), optirs.Optimizer)
        and getattr(optirs, n) is not optirs.Optimizer
    ]


def run(cls: type, dtype: type, level: str, threads: int) -> list[np.ndarray]:
    """Three steps of ``cls`` at its defaults over two parameters (5000 elements: past the
    8-bit classes' small-tensor threshold) from fixed data."""
    optirs.set_simd_level(level)
    optirs.set_num_threads(threads)
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(s).astype(dtype) for s in ((50, 100), (7,))]
    kwargs = {"lr": 1e-2} if "lr" in inspect.signature(cls).parameters else {}
    opt = cls(params, **kwargs)
    for _ in range(3):
        opt.step([rng.standard_normal(p.shape).astype(dtype) for p in params])
    return [p.copy() for p in params]


def main() -> int:
    levels = optirs.simd_levels()
    failures = []
    for cls in optimizers():
        dtypes = (np.float32,) if cls.__name__.endswith("8bit") else (np.float32, np.float64)
        for dtype in dtypes:
            first = run(cls, dtype, levels[0], 1)
            rng = np.random.default_rng(0)  # the starting values `run` draws first
            start = [rng.standard_normal(s).astype(dtype) for s in ((50, 100), (7,))]
            if not all(np.isfinite(p).all() for p in first):
                failures.append(f"{cls.__name__} {dtype.__name__}: non-finite result")
            if any(np.array_equal(p, q) for p, q in zip(first, start)):
                failures.append(f"{cls.__name__} {dtype.__name__}: a parameter did not change")
            for level in levels:
                for threads in (1, 2):
                    got = run(cls, dtype, level, threads)
                    if any(a.tobytes() != b.tobytes() for a, b in zip(got, first)):
                        failures.append(
                            f"{cls.__name__} {dtype.__name__}: other bits at {level} x {threads}"
                        )
    p = np.linspace(-1, 1, 1001, dtype=np.float32)
    g = np.linspace(2, -3, 1001, dtype=np.float32)
    expected = p - np.float32(0.1) * g
    optirs.SGD([p], lr=0.1).step([g])
    if p.tobytes() != expected.tobytes():
        failures.append("SGD: not p - lr * g")
    for f in failures:
        print("FAIL", f)
    print(f"{len(optimizers())} optimizers, levels {levels}: {len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
