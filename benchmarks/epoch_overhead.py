"""The loop's cost per epoch: tens of thousands of tiny epochs (a reduced-volume net at small k) against the
same steps in one long epoch.

A `paper_reduced` net at k = 1 trains 200k iterations over epochs of 3 or 4 steps: 50,000-67,000 epochs.
Whatever `fit` does once an epoch (the loader's start, the evaluation stops, a record) is paid that often.
This times `fit` on a one-layer net (a step costs microseconds, so the loop's own work shows) over a train
loader of `--steps-per-epoch` batches for `--epochs` epochs, and over one epoch of as many batches (the
baseline), both with the recipe's evaluation every 1000 iterations on the same 3 images, in the same
process, rounds alternating. The ratio is the per-epoch overhead as a share of a (tiny) step.

    python benchmarks/epoch_overhead.py                       # 20,000 epochs of 3 steps vs 1 epoch of 60,000
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import time
import types

import torch
import torch.nn as nn

from raytransfer.loop import fit
from raytransfer.models import TransferableNet
from raytransfer.recipes import get_recipe


class OneLayerNet(TransferableNet):
    """fc8 on the flattened input: the cheapest net the loop can train (tests/test_loop.py uses it too)."""

    def __init__(self, num_classes: int, features: int):
        super().__init__()
        self.fc8 = nn.Linear(features, num_classes)

    def layer_specs(self):
        return [("fc8", ("fc8",))]

    def forward(self, x):
        return self.fc8(x.flatten(1))


class TensorLoader:
    """Batches of fixed tensors in an order seeded by the epoch, as the project's loaders guarantee: no decoding;
    `delay_s` per batch stands for an input that cannot keep up (tests/test_loop.py uses this class too)."""

    def __init__(self, x, y, batch_size: int, train: bool = True, delay_s: float = 0.0):
        self.x, self.y, self.batch_size, self.train, self.delay_s, self.epoch = x, y, batch_size, train, delay_s, 0
        self.num_samples = len(y)

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return len(self.y) // self.batch_size if self.train else -(-len(self.y) // self.batch_size)

    def __iter__(self):
        order = (torch.randperm(len(self.y), generator=torch.Generator().manual_seed(self.epoch)) if self.train
                 else torch.arange(len(self.y)))
        for b in range(len(self)):
            if self.delay_s:
                time.sleep(self.delay_s)
            index = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield self.x[index], self.y[index]


def run(steps_per_epoch: int, epochs: int) -> tuple[float, int]:
    """Seconds of `fit` over `epochs` epochs of `steps_per_epoch` steps of batch 1; the records it made."""
    images = steps_per_epoch
    x = torch.randn(images, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.arange(images) % 3
    val = TensorLoader(x[:3], y[:3], 3, train=False)
    loaders = types.SimpleNamespace(train=TensorLoader(x, y, 1), val=val)
    recipe = get_recipe("paper_reduced", batch_size=1, iterations=steps_per_epoch * epochs, eval_every_iters=1000)
    records = []
    t0 = time.perf_counter()
    fit(OneLayerNet(3, 48), recipe, loaders, torch.device("cpu"), report=lambda m, s: records.append(m))
    return time.perf_counter() - t0, len(records)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=20_000)
    p.add_argument("--steps-per-epoch", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("raytransfer.loop").setLevel(logging.ERROR)   # a one-layer step waits on any input: not news
    steps = args.epochs * args.steps_per_epoch
    variants = {f"{args.epochs:,} epochs of {args.steps_per_epoch} steps": (args.steps_per_epoch, args.epochs),
                f"1 epoch of {steps:,} steps (baseline)": (steps, 1)}
    best, records = {}, {}
    for _ in range(args.rounds):
        for name, (per_epoch, epochs) in variants.items():
            secs, records[name] = run(per_epoch, epochs)
            best[name] = min(best.get(name, secs), secs)
    base = best[list(variants)[-1]]
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, 1 torch thread, CPU; "
          f"a one-layer net at batch 1, {steps:,} steps each, best of {args.rounds} rounds\n")
    print("| run | s | us a step | records | x baseline |")
    print("|---|---:|---:|---:|---:|")
    for name in variants:
        print(f"| {name} | {best[name]:.1f} | {best[name] / steps * 1e6:.0f} | {records[name]} | "
              f"{best[name] / base:.2f} |")


if __name__ == "__main__":
    main()
