"""torch alone crashes when one thread sets ``p.grad = None`` while another reads ``p.grad``.

Not a test (it is expected to crash): the reason ``tests/tsan/mutate.py`` leaves that change
out of its torch scenario. No optirs, no NumPy, no optimizer: one thread keeps assigning
``p.grad = None`` or a new gradient, the main thread keeps reading ``p.grad`` and keeping the
tensors it got for a moment. With torch 2.15 (CPU) this ends within seconds in
``INTERNAL ASSERT FAILED ... self->cdata.use_count() == 1`` in ``THPVariable_clear``, or in a
segfault: the setter drops the old gradient's last reference, whose Python object is then
deallocated with the GIL released, while the parameter still points at it, so the reader gets
a tensor object that is being freed. Assigning only new gradients (``--none 0``) runs clean.

Usage: ``python tests/tsan/torch_grad_race.py [--none FRACTION] [--seconds S]``; exits 0 when
nothing went wrong in that time.
"""

from __future__ import annotations

import argparse
import random
import threading
import time

import torch


def main() -> int:
    """Runs the race for ``--seconds`` and prints how many rounds the reader made."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--none", type=float, default=0.5, help="share of assignments that are None")
    ap.add_argument("--seconds", type=float, default=20.0)
    args = ap.parse_args()

    params = [torch.nn.Parameter(torch.zeros(n)) for n in (1 << 20, 17)]
    for p in params:
        p.grad = torch.randn_like(p)
    stop = threading.Event()

    def setter() -> None:
        rnd = random.Random(1)
        while not stop.is_set():
            p = rnd.choice(params)
            p.grad = None if rnd.random() < args.none else torch.randn_like(p)

    t = threading.Thread(target=setter)
    t.start()
    kept: list[torch.Tensor] = []
    rounds = 0
    end = time.monotonic() + args.seconds
    try:
        while time.monotonic() < end:
            for p in params:
                g = p.grad
                if g is not None:
                    kept.append(g)
            if len(kept) > 50:
                kept.clear()
            rounds += 1
    finally:
        stop.set()
        t.join()
    print(f"no crash in {args.seconds:g} s ({rounds} rounds), torch {torch.__version__}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
