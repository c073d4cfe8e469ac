"""What makes the demo recipe's nets cheap enough to converge on 2 cores: input path and conv1 stride.

Times, in one process with one torch thread (a 1-CPU trial), on the demo's half B:
- the train loader alone: FFCV (the default input) vs the half held in memory (`input="memory"`);
- one training epoch of the demo net (batch norm) with each input, conv1 at stride 1 and at stride 2.
Rounds alternate between the variants, so a change in the machine's load hits all alike. Ratios are
against the FFCV input with stride 1 (the recipe as it was before).

    python benchmarks/demo_input.py            # prints a Markdown table for RESULTS.md
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from contextlib import nullcontext
from dataclasses import replace

import torch

from raytransfer.loaders import CropSpec, build_half_loaders
from raytransfer.loop import make_optimizer, train_one_epoch
from raytransfer.prepare import prepare
from raytransfer.recipes import get_recipe
from raytransfer.splits import half_classes, similar_split
from raytransfer.sweep.runner import SCALES
from raytransfer.transfer import build_trial_network


def demo_half(cache: str):
    spec = SCALES["demo"].synthetic
    manifest = prepare("synthetic", None, os.path.join(cache, "demo-input-bench"), resolution=None, synthetic=spec)
    split = similar_split(manifest["name"], manifest["classes"], 0)
    return os.path.join(cache, "demo-input-bench"), half_classes(split, "B")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cache", default="/tmp/raytransfer-bench")
    args = p.parse_args()
    torch.set_num_threads(1)
    data_dir, classes = demo_half(args.cache)
    recipe = get_recipe("demo")
    variants = {}                                  # name -> (input, stem stride, crop)
    for inp in ("ffcv", "memory"):
        for stride, crop in ((1, 28), (2, 30)):
            variants[f"{inp}, conv1 stride {stride}"] = (inp, stride, crop)
    loaders, nets = {}, {}
    for name, (inp, stride, crop) in variants.items():
        loaders[name] = build_half_loaders(data_dir, classes, CropSpec("paper", crop, 32), batch_size=recipe.batch_size,
                                           device=torch.device("cpu"), seed=0, input=inp)
        r = replace(recipe, stem_stride=stride, crop_size=crop)
        net = build_trial_network("caffenet", len(classes), None, 0, "scratch", 0, r.arch_kwargs())
        net = net.to(memory_format=torch.channels_last)
        nets[name] = (r, net, make_optimizer(net, r))
    load_s = {name: 0.0 for name in variants}
    train_s = {name: 0.0 for name in variants}
    images = {name: 0 for name in variants}
    for epoch in range(args.rounds + 1):           # epoch 0: warm-up (FFCV compiles, caches fill)
        for name in variants:
            train = loaders[name].train
            if hasattr(train, "set_epoch"):
                train.set_epoch(epoch)
            t0 = time.perf_counter()
            count = sum(len(y) for _, y in train)
            t1 = time.perf_counter()
            r, net, opt = nets[name]
            m, _ = train_one_epoch(net, opt, train, torch.device("cpu"), r, 0, 10 ** 9, nullcontext)
            t2 = time.perf_counter()
            if epoch:
                load_s[name] += t1 - t0
                train_s[name] += t2 - t1
                images[name] += count
    base = "ffcv, conv1 stride 1"
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, 1 torch thread; "
          f"demo half B: {images[base] // args.rounds} images an epoch; {args.rounds} timed epochs each\n")
    print("| input, net | loader alone img/s | x | training epoch img/s | x |")
    print("|---|---:|---:|---:|---:|")
    for name in variants:
        lo, tr = images[name] / load_s[name], images[name] / train_s[name]
        print(f"| {name} | {lo:,.0f} | {lo / (images[base] / load_s[base]):.1f} | {tr:,.0f} | "
              f"{tr / (images[base] / train_s[base]):.2f} |")


if __name__ == "__main__":
    main()
