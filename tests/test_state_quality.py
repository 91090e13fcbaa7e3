"""Reduced-precision optimizer state trains as well as float32 state: an MLP on scikit-learn's
digits, several hundred AdamW steps, final training loss within a few percent of float32's."""

from __future__ import annotations

import optirs
import optirs.torch as ot
import pytest
import torch
from torch import nn
from torch_helpers import digits_mlp

datasets = pytest.importorskip("sklearn.datasets", reason="the quality test needs scikit-learn")

STEPS = 400
BATCH = 128


def _train(eight_bit: bool = False, **state_options) -> float:
    """Final mean cross-entropy over the whole training set after ``STEPS`` AdamW steps (with
    ``eight_bit``, ``optirs.AdamW8bit`` stepping NumPy views of the model's tensors)."""
    x, y, model = digits_mlp(datasets)
    params = list(model.parameters())
    if eight_bit:
        q8 = optirs.AdamW8bit([p.detach().numpy() for p in params], lr=1e-3, weight_decay=1e-2)
        views = [p.detach() for p in params]

        def step() -> None:
            q8.step([p.grad.numpy() for p in params])
            for v in views:  # written through NumPy views: bump autograd's version counters
                torch.autograd.graph.increment_version(v)

    else:
        opt = ot.AdamW(params, lr=1e-3, weight_decay=1e-2, **state_options)
        step = opt.step
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        idx = torch.randint(0, len(x), (BATCH,), generator=g)
        model.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        step()
    with torch.no_grad():
        return nn.functional.cross_entropy(model(x), y).item()


def test_bf16_state_final_loss_within_2_percent_of_float32():
    base = _train()
    bf16 = _train(state_dtype=torch.bfloat16)
    assert base < 0.1, base  # the float32 run learned the task
    assert abs(bf16 - base) <= 0.02 * base, (bf16, base)


def test_adamw8bit_final_loss_within_3_percent_of_float32():
    base = _train()
    q8 = _train(eight_bit=True)
    assert base < 0.1, base
    assert abs(q8 - base) <= 0.03 * base, (q8, base)
