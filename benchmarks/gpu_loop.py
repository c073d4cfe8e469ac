"""Does the project's own loop feed the device at the rate of its step? `fit` over the pixel store vs the same batches on the device.

The project's loop (`fit`, raytransfer/loop.py) with the `paper` and `fast` recipes, a base and a frozen n = 7
net, over a built-in dataset written straight from the generator (raytransfer/synthetic.py) into the pixel
store at `--side` px (no betons, no FFCV, no Ray). Two paths in the same run, from the same seed and init:
- loop: the recipe's input as a trial takes it -- batches gathered from the store's memory map (on CUDA into
  pinned memory, copied on a side stream), cropped, mirrored and normalised on the device (the paper: minus
  the mean image at 0..255; fast: random-resized crops, mean/std); torch.compile where the recipe asks;
- on-device: the very same batches (the same seeded draws) made on the device before each epoch, so the step
  waits on nothing.
Printed per recipe and net: images/s of each path after the first evaluation (compile and warm-up excluded),
their ratio (goal >= 0.9), and the top-1 on the half's validation images after `--steps` steps through each
(equal within float noise: the same batches). `--hold always` holds the half in GPU memory instead (what a
trial does where it fits beside the model, device_input.py); the default `never` measures the host path a
645k-image ImageNet half takes.

    python benchmarks/gpu_loop.py --device cuda                       # H200: 256 px, the recipes' own batches
    python benchmarks/gpu_loop.py --device cpu --side 32 --crop 28 --width 0.125 --batch 32 --steps 24 \\
        --train-per-class 24 --val-per-class 4                        # a check anyone can run on a CPU
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from raytransfer.device_input import Augment, Normalise, StoreLoader
from raytransfer.loop import fit
from raytransfer.pixel_store import ensure_store, synthetic_source
from raytransfer.recipes import get_recipe
from raytransfer.synthetic import SyntheticSpec
from raytransfer.transfer import build_trial_network, init_seed_for


@dataclass
class Half:
    train: object
    val: object
    num_classes: int
    input: str = "pixel_store"


class OnDevice:
    """The batches a StoreLoader yields, made on the device when the epoch is set (before `fit` times it)."""

    def __init__(self, loader: StoreLoader):
        self.loader, self.num_samples, self.batches = loader, loader.num_samples, []

    def set_epoch(self, epoch: int):
        self.loader.set_epoch(epoch)
        self.batches = [(x.clone(), y.clone()) for x, y in self.loader]
        sync(self.loader.device)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        yield from self.batches


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def half_loaders(store, recipe, half_labels, device, seed: int, hold: str, mean_image, mean, std):
    """The half's StoreLoaders for the recipe: its crop and normalisation, its batch."""
    out = []
    for split, train in (("train", True), ("val", False)):
        labels = store.labels(split)
        ids = np.flatnonzero(np.isin(labels, half_labels))
        lut = np.full(labels.max() + 1, -1)
        lut[half_labels] = np.arange(len(half_labels))
        window = recipe.crop_size                  # the store is at the recipe's side: crops are exact pixels
        norm = Normalise("mean_image", mean_image=mean_image) if recipe.normalize == "mean_image" else \
            Normalise.channels(mean, std)
        out.append(StoreLoader(store.images(split), ids, lut[labels[ids]], Augment(recipe.crop, recipe.crop_size, window),
                               norm, recipe.batch_size if train else 256, train, seed, device, hold=hold))
    return out


def run_path(recipe, net, loaders: Half, device) -> tuple[float, float]:
    """(images/s after the first evaluation, final top-1) of `fit` on these loaders."""
    model = torch.compile(net) if recipe.compile and device.type == "cuda" else net
    records = []
    summary = fit(model, recipe, loaders, device, report=lambda m, s: records.append(m), log_every_s=0)
    timed = records[1:] or records
    images = sum(r["train_images"] for r in timed)
    return images / max(1e-9, sum(r["train_s"] for r in timed)), summary["top1_final"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--recipes", default="paper,fast")
    p.add_argument("--side", type=int, default=256, help="stored side of the built-in images (the paper's 256)")
    p.add_argument("--crop", type=int, default=227)
    p.add_argument("--width", type=float, default=1.0, help="channel multiplier of the net (1: the paper's)")
    p.add_argument("--batch", type=int, help="global batch (default: the recipe's, 256 paper, 1024 fast)")
    p.add_argument("--steps", type=int, default=300, help="training steps of each path")
    p.add_argument("--evals", type=int, default=6, help="evaluations over the steps (the first ends the warm-up)")
    p.add_argument("--classes-per-superclass", type=int, default=4, help="the dataset has 8 x this many classes")
    p.add_argument("--train-per-class", type=int, default=300)
    p.add_argument("--val-per-class", type=int, default=25)
    p.add_argument("--hold", choices=["never", "always", "auto"], default="never",
                   help="the half in GPU memory: never (host memory map, pinned copies), always, auto (as a trial)")
    p.add_argument("--store", type=Path, help="store folder (default: a temporary one)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    card = torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    spec = SyntheticSpec(classes_per_superclass=args.classes_per_superclass, train_per_class=args.train_per_class,
                         val_per_class=args.val_per_class, size=args.side)
    with tempfile.TemporaryDirectory(prefix="raytransfer-gpu-loop-") as tmp:
        t0 = time.perf_counter()
        store = ensure_store(args.store or Path(tmp) / "store", synthetic_source(spec, args.side, os.cpu_count() or 1),
                             args.side)
        written = time.perf_counter() - t0
        blocked = [m for m in ("ray", "ffcv") if sys.modules.get(m) is not None]
        print(f"# {card}; torch {torch.__version__}; ray/ffcv imported: {', '.join(blocked) or 'neither'}")
        print(f"# store: {store.header['counts']['train']:,} + {store.header['counts']['val']:,} built-in images at "
              f"{args.side} px ({store.nbytes() / 2**30:.2f} GiB), written from the generator in {written:.0f} s; "
              f"hold {args.hold}\n")
        half_labels = np.arange(spec.num_classes // 2)
        train_labels = store.labels("train")
        in_half = np.flatnonzero(np.isin(train_labels, half_labels))
        pixels = store.images("train")
        mean_image = np.zeros(pixels.shape[1:], np.float64)
        for start in range(0, len(in_half), 512):
            mean_image += pixels[in_half[start:start + 512]].sum(0)
        mean_image = (mean_image / len(in_half)).astype(np.float32)
        mean, std = mean_image.mean((0, 1)), pixels[in_half[:512]].reshape(-1, 3).std(0)
        print("| recipe | net | loop img/s | on-device img/s | loop / on-device | top-1 loop | top-1 on-device |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for name in args.recipes.split(","):
            over = dict(width=args.width, crop_size=args.crop, resize_size=args.side, iterations=args.steps,
                        epochs=None, eval_every_iters=max(1, args.steps // args.evals), until_plateau=None)
            if args.batch:
                over["batch_size"] = args.batch
            recipe = get_recipe(name, **over)
            classes = recipe.head_outputs or len(half_labels)
            base = build_trial_network(recipe.arch, classes, None, 0, "scratch", init_seed_for(0, "base"),
                                       recipe.arch_kwargs()).state_dict()
            for label, n, mode in (("base", 0, "scratch"), ("frozen n=7", 7, "frozen")):
                rates, top1 = {}, {}
                for path in ("loop", "on-device"):
                    net = build_trial_network(recipe.arch, classes, base if n else None, n, mode,
                                              init_seed_for(0, "fresh" if n else "base"), recipe.arch_kwargs())
                    if recipe.channels_last:
                        net = net.to(memory_format=torch.channels_last)
                    net = net.to(device)
                    train, val = half_loaders(store, recipe, half_labels, device, 0, args.hold, mean_image, mean, std)
                    loaders = Half(train if path == "loop" else OnDevice(train), val, len(half_labels))
                    rates[path], top1[path] = run_path(recipe, net, loaders, device)
                    del net, loaders, train, val
                    if cuda:
                        torch.cuda.empty_cache()
                print(f"| {name} | {label} | {rates['loop']:,.0f} | {rates['on-device']:,.0f} | "
                      f"{rates['loop'] / rates['on-device']:.2f} | {top1['loop']:.4f} | {top1['on-device']:.4f} |",
                      flush=True)
        print(f"\n{args.steps} steps a path, batch {recipe.batch_size} ({name}); images/s after the first of "
              f"{args.evals} evaluations; command: python benchmarks/gpu_loop.py {' '.join(argv or sys.argv[1:])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
