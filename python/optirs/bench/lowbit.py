"""The low-bit state benchmark (``--lowbit``): fewer bytes than a float32 optimizer moves.

AdamW steps over the same float32 parameters and gradients, interleaved round by round in one
process (see ``timing``), medians over rounds, speed-ups as the median over rounds of (torch
fused time / other time) in the same round:

- ``torch fused``: ``torch.optim.AdamW(fused=True)``, float32 state (28 bytes per element:
  read p, g, m, v; write p, m, v);
- ``optirs f32``: ``optirs.torch.AdamW``, float32 state (28 bytes);
- ``optirs bf16``: ``optirs.torch.AdamW(state_dtype=torch.bfloat16)`` (20 bytes);
- ``optirs 8bit``: ``optirs.torch.AdamW8bit`` (16 bytes plus two float32 absmaxes per block);
- ``bnb 8bit``: bitsandbytes' ``AdamW8bit`` on the CPU, when bitsandbytes is installed
  (``pip install bitsandbytes``): the same scheme, unfused.

Each row has its own memory-traffic ceiling, measured in the same rounds: ``optirs._core.traffic``
streaming exactly that row's bytes (read-only and read-write streams as the step has them;
``--lowbit`` prints bytes per element and % of ceiling, the median over rounds of ceiling time /
step time). Tensors under ``min_8bit_size`` (4096) elements keep float32 state in both 8-bit
optimizers, and their bytes count as such.

A quantization report follows: one quantize/dequantize round trip of a signed (``exp_avg``-like,
standard normal) and an unsigned (``exp_avg_sq``-like, its square) tensor through optirs's code
maps, and, with bitsandbytes, through its ``quantize_blockwise``/``dequantize_blockwise`` with the
same maps and block size: mean and largest absolute error relative to each block's absmax, and
the share of codes the two agree on.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Callable

import numpy as np

import optirs

from .timing import _rows_against_ceilings, _threads_restored

BLOCK = 256
"""Elements per quantization block (bitsandbytes' and optirs's default)."""

MIN_8BIT = 4096
"""Tensors with fewer elements keep float32 state in both 8-bit optimizers."""

BASE = "torch fused"
"""The row every speed-up is against."""


def bytes_per_step(kind: str, sizes: list[int]) -> dict[str, int]:
    """Bytes one step of ``kind`` reads only and reads and writes, over tensors of ``sizes``.

    Args:
        kind: ``"f32"``, ``"bf16"`` or ``"8bit"`` (the state's storage).
        sizes: element counts of the tensors.

    Returns:
        ``{"read": bytes only read (the gradients), "rw": bytes read and written back}``.
    """
    read = rw = 0
    for n in sizes:
        read += 4 * n
        rw += 4 * n  # the parameter
        if kind == "f32" or (kind == "8bit" and n < MIN_8BIT):
            rw += 8 * n
        elif kind == "bf16":
            rw += 4 * n
        else:
            rw += 2 * n + 2 * 4 * math.ceil(n / BLOCK)  # codes, and the absmaxes
    return {"read": read, "rw": rw}


def _bnb() -> Any:
    """bitsandbytes, or None when it is not installed (or does not import)."""
    try:
        import bitsandbytes  # type: ignore[import-not-found,unused-ignore]
    except Exception:  # any failure to import (a missing native library too): no bnb row
        return None
    return bitsandbytes


def _steps(torch: Any, init: list[Any], grads: list[Any], bnb: Any) -> dict[str, Callable[[], Any]]:
    """Each row's step, over its own copies of the parameters and gradients."""
    import optirs.torch as ot

    def params() -> list[Any]:
        ps = [torch.nn.Parameter(x.clone()) for x in init]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        return ps

    opts: dict[str, Any] = {
        BASE: torch.optim.AdamW(params(), lr=1e-4, fused=True),
        "optirs f32": ot.AdamW(params(), lr=1e-4),
        "optirs bf16": ot.AdamW(params(), lr=1e-4, state_dtype=torch.bfloat16),
        "optirs 8bit": ot.AdamW8bit(params(), lr=1e-4, block_size=BLOCK, min_8bit_size=MIN_8BIT),
    }
    if bnb is not None:
        opts["bnb 8bit"] = bnb.optim.AdamW8bit(params(), lr=1e-4, min_8bit_size=MIN_8BIT)
    return {name: opt.step for name, opt in opts.items()}


STATE_KIND = {
    BASE: "f32",
    "optirs f32": "f32",
    "optirs bf16": "bf16",
    "optirs 8bit": "8bit",
    "bnb 8bit": "8bit",
}


def quantization_report(torch: Any, n: int, seed: int, bnb: Any) -> list[dict[str, Any]]:
    """One round trip of a signed and an unsigned tensor through optirs's (and bitsandbytes')
    blockwise 8-bit quantization.

    Args:
        torch: the torch module (for bitsandbytes' tensors).
        n: elements of each tensor.
        seed: seed of the data.
        bnb: the bitsandbytes module, or None.

    Returns:
        One row per (tensor, implementation): mean and largest absolute error relative to each
        element's block absmax; with bitsandbytes, the share of codes both give.
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n, dtype=np.float32)
    rows = []
    for signed, data in ((True, x), (False, x * x)):
        absmax = np.repeat(
            np.abs(np.pad(data, (0, -n % BLOCK))).reshape(-1, BLOCK).max(axis=1), BLOCK
        )[:n]
        codes, scales = optirs._core.quantize_8bit(data, signed, BLOCK)
        back = optirs._core.dequantize_8bit(codes, scales, signed, BLOCK)
        found = {"optirs": (np.asarray(codes), np.asarray(back))}
        if bnb is not None:
            import bitsandbytes.functional as F  # type: ignore[import-not-found,unused-ignore]

            code = torch.tensor(optirs._core.code_map(signed), dtype=torch.float32)
            q, state = F.quantize_blockwise(torch.from_numpy(data), code=code, blocksize=BLOCK)
            found["bitsandbytes"] = (
                q.numpy(),
                F.dequantize_blockwise(q, state).numpy(),
            )
        for name, (c, b) in found.items():
            rel = np.abs(b.astype(np.float64) - data) / np.where(absmax > 0, absmax, 1.0)
            row = {
                "tensor": "exp_avg (signed)" if signed else "exp_avg_sq (unsigned)",
                "impl": name,
                "mean_rel_err": float(rel.mean()),
                "max_rel_err": float(rel.max()),
            }
            if name == "bitsandbytes":
                row["same_codes"] = float((c == found["optirs"][0]).mean())
            rows.append(row)
    return rows


def run_lowbit(
    torch: Any,
    shapes: tuple[tuple[int, ...], ...],
    threads: list[int],
    repeats: int,
    sample_s: float,
    settle_s: float,
    seed: int = 0,
) -> dict[str, Any]:
    """Times every row at each thread count, then the quantization report; prints tables.

    Args:
        torch: the torch module.
        shapes: the parameter shapes (float32).
        threads: thread counts, set for torch and optirs alike.
        repeats: timed rounds; results are medians over them.
        sample_s: calls are batched so one timed sample lasts about this long.
        settle_s: idle time before each sample (torch's OpenMP workers spin after a region).
        seed: seed of the random data.

    Returns:
        ``{"steps": [one row per (threads, implementation)], "quantization": [...]}``.
    """
    bnb = _bnb()
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) * 0.01 for s in shapes]
    sizes = [math.prod(s) for s in shapes]
    n = sum(sizes)
    traffic = {kind: bytes_per_step(kind, sizes) for kind in ("f32", "bf16", "8bit")}
    rows = []
    print(f"\nlow-bit state: AdamW over {len(shapes)} float32 tensors, {n:,} elements")
    if bnb is None:
        print("(bitsandbytes is not installed: no bnb row; pip install bitsandbytes)")
    print(
        f"{'threads':>7} {'what':<12} {'ms':>9} {'vs fused':>9} {'B/elem':>7} {'state B/el':>10} "
        f"{'% ceil':>7}"
    )
    with _threads_restored(torch):
        for row in _rows_against_ceilings(
            torch,
            threads,
            lambda: _steps(torch, init, grads, bnb),
            STATE_KIND,
            traffic,
            n,
            BASE,
            repeats,
            sample_s,
            settle_s,
        ):
            # The state's bytes: all read and written back but the parameter's 4.
            state_bytes = (traffic[STATE_KIND[row["what"]]]["rw"] - 4 * n) / n
            row["state_bytes_per_elem"] = state_bytes
            rows.append(row)
            print(
                f"{row['threads']:>7} {row['what']:<12} {row['ms']:>9.2f} "
                f"{row['speedup_vs_fused']:>8.2f}x {row['bytes_per_elem']:>7.2f} "
                f"{state_bytes:>10.3f} {row['pct_of_ceiling']:>6.0f}%"
            )
            sys.stdout.flush()
    quant = quantization_report(torch, min(n, 1 << 20), seed, bnb)
    print("\n8-bit round trip (error relative to the block's absmax)")
    print(f"{'tensor':<22} {'impl':<13} {'mean':>10} {'max':>10} {'same codes':>11}")
    for q in quant:
        same = f"{100 * q['same_codes']:.3f}%" if "same_codes" in q else ""
        print(
            f"{q['tensor']:<22} {q['impl']:<13} {q['mean_rel_err']:>10.2e} "
            f"{q['max_rel_err']:>10.2e} {same:>11}"
        )
    return {"steps": rows, "quantization": quant}
