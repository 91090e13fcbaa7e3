"""Train an MLP on scikit-learn's digits with optirs.torch and torch.optim, side by side.

The only change optirs asks of a CPU training script is the optimizer's module::

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)    # before
    opt = optirs.torch.AdamW(model.parameters(), lr=1e-2)   # after

This script trains two copies of the same network from the same initial weights on the same
mini-batches, one with each optimizer, and prints both loss curves (they agree to float
rounding), the final accuracies, and the median time of ``opt.step()`` alone for each.

    python examples/train_mlp.py --optimizer adamw --steps 600
    python examples/train_mlp.py --optimizer sgd-nesterov --lr 0.05 --dtype float64
    python examples/train_mlp.py --optimizer adam --hidden 512 --threads 2

Needs torch, scikit-learn and optirs (``pip install optirs[torch] scikit-learn``).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import numpy as np
import optirs
import optirs.torch
import torch
from sklearn.datasets import load_digits
from torch import nn

# name -> (class name, default hyperparameters)
OPTIMIZERS = {
    "sgd": ("SGD", {"lr": 0.05, "momentum": 0.9}),
    "sgd-nesterov": ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4}),
    "adam": ("Adam", {"lr": 1e-2}),
    "adamw": ("AdamW", {"lr": 1e-2, "weight_decay": 0.01}),
    "adam-amsgrad": ("Adam", {"lr": 1e-2, "amsgrad": True}),
    "rmsprop": ("RMSprop", {"lr": 1e-3}),
    "rmsprop-centered": ("RMSprop", {"lr": 1e-3, "momentum": 0.9, "centered": True}),
    "adagrad": ("Adagrad", {"lr": 0.05}),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adamw")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps (default 600)")
    parser.add_argument(
        "--lr", type=float, default=None, help="learning rate (default: per optimizer)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="threads for torch and optirs (default 1: the network is tiny; 0 keeps the "
        "libraries' own defaults)",
    )
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--hidden", type=int, default=32, help="hidden units (default 32)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def load_data(dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardized digits (1797 x 64 pixels, labels 0-9), shuffled once with ``seed``."""
    x, y = load_digits(return_X_y=True)
    std = x.std(axis=0)
    std[std == 0] = 1.0  # some border pixels are always 0
    x = (x - x.mean(axis=0)) / std
    order = np.random.default_rng(seed).permutation(len(x))
    return torch.tensor(x[order], dtype=dtype), torch.tensor(y[order])


def main() -> None:
    args = parse_args()
    dtype = getattr(torch, args.dtype)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
        optirs.set_num_threads(args.threads)
    class_name, kwargs = OPTIMIZERS[args.optimizer]
    kwargs = dict(kwargs)
    if args.lr is not None:
        kwargs["lr"] = args.lr

    x, y = load_data(dtype, args.seed)
    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(64, args.hidden), nn.Tanh(), nn.Linear(args.hidden, 10))
    model = model.to(dtype)
    models = {"optirs": model, "torch": copy.deepcopy(model)}  # same initial weights
    optimizers = {
        "optirs": getattr(optirs.torch, class_name)(models["optirs"].parameters(), **kwargs),
        "torch": getattr(torch.optim, class_name)(models["torch"].parameters(), **kwargs),
    }

    n_params = sum(p.numel() for p in model.parameters())
    batches = len(x) // args.batch_size
    options = ", ".join(f"{k}={v}" for k, v in kwargs.items())
    print(
        f"optirs {optirs.__version__} (SIMD {optirs.simd_level()}, threads: "
        f"{optirs.get_num_threads()}) | torch {torch.__version__} (threads: "
        f"{torch.get_num_threads()})"
    )
    print(
        f"{class_name}({options}) | {args.dtype} | digits {len(x)}x64 | MLP 64-{args.hidden}-10 "
        f"({n_params} parameters) | batch {args.batch_size} | {args.steps} steps "
        f"({args.steps / batches:.1f} epochs)\n"
    )
    print(f"{'epoch':>6} {'step':>6} {'loss optirs':>13} {'loss torch':>13} {'rel. diff':>10}")

    step_times: dict[str, list[float]] = {"optirs": [], "torch": []}
    running = {"optirs": 0.0, "torch": 0.0}
    for step in range(args.steps):
        b = step % batches
        xb = x[b * args.batch_size : (b + 1) * args.batch_size]
        yb = y[b * args.batch_size : (b + 1) * args.batch_size]
        for key in ("optirs", "torch"):  # alternate, so both see the same machine load
            opt = optimizers[key]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(models[key](xb), yb)
            loss.backward()
            start = time.perf_counter()
            opt.step()
            step_times[key].append(time.perf_counter() - start)
            running[key] += loss.item()
        if b == batches - 1 or step == args.steps - 1:  # end of an epoch, or of training
            n = b + 1
            ours, theirs = running["optirs"] / n, running["torch"] / n
            print(
                f"{step // batches + 1:>6} {step + 1:>6} {ours:>13.8f} {theirs:>13.8f} "
                f"{abs(ours - theirs) / abs(theirs):>10.1e}"
            )
            running = {"optirs": 0.0, "torch": 0.0}

    with torch.no_grad():
        accuracy = {k: (m(x).argmax(1) == y).double().mean().item() for k, m in models.items()}
    median = {k: statistics.median(v) * 1e6 for k, v in step_times.items()}
    print(
        f"\nfinal training accuracy: optirs {accuracy['optirs']:.2%}, torch {accuracy['torch']:.2%}"
    )
    print(
        f"median opt.step(): optirs {median['optirs']:.1f} us, torch {median['torch']:.1f} us "
        f"-> torch/optirs = {median['torch'] / median['optirs']:.2f}x"
    )


if __name__ == "__main__":
    main()
