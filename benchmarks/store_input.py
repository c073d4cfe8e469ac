"""The pixel store's input against FFCV's on this machine: train-loader images/s, same run, same half.

For each setting, the train loader of one half is read for a few epochs through both inputs
(`input="pixel_store"`: the node's uint8 store, crop + mirror + normalisation in torch on the device;
`input="ffcv"`: FFCV's decoder and crop), rounds alternating so a change in the machine's load hits both.
Settings: the demo's 32 px (built-in data stored raw at 32 px, the paper crop 30 of 32, mean/std) and the
paper's 256 px (built-in data drawn at 256 px and stored as JPEG q90, as ImageNet would be: the paper's
227 crop minus the mean image, and the fast recipe's random-resized 227 crops). The store is written
before timing (once per node in a sweep); its write time is printed too.

    python benchmarks/store_input.py --device cpu            # prints a Markdown table for RESULTS.md
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from raytransfer.loaders import CropSpec, build_half_loaders
from raytransfer.prepare import prepare
from raytransfer.synthetic import SyntheticSpec

SETTINGS = {   # name -> (synthetic spec, stored side, format, crop, normalize, batch)
    "32 px, paper crop 30/32, mean/std (demo)": (SyntheticSpec(superclasses_per_family=2, classes_per_superclass=3,
                                                               train_per_class=96, val_per_class=4), 32, "raw",
                                                 CropSpec("paper", 30, 32), "mean_std", 64),
    "256 px JPEG, paper crop 227 + mean image (paper)": (SyntheticSpec(superclasses_per_family=1, classes_per_superclass=4,
                                                                       train_per_class=80, val_per_class=2, size=256),
                                                         256, "jpg", CropSpec("paper", 227, 256), "mean_image", 64),
    "256 px JPEG, random-resized 227 (fast)": (None, 256, "jpg", CropSpec("rrc", 227, 256), "mean_std", 64),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads and FFCV workers (a trial's CPUs)")
    p.add_argument("--cache", default="/tmp/raytransfer-bench")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"device {device}, {args.threads} thread(s)\n")
    print("| setting | images | store written (s) | pixel store img/s | FFCV img/s | store / FFCV |")
    print("|---|---:|---:|---:|---:|---:|")
    last_spec = None
    for name, (spec, side, fmt, crop, normalize, batch) in SETTINGS.items():
        spec = spec or last_spec
        last_spec = spec
        data = os.path.join(args.cache, f"store-bench-{side}-{fmt}-{spec.size}-{spec.train_per_class}")
        m = prepare("synthetic", None, data, resolution=side, format=fmt, synthetic=spec, workers=args.threads)
        half = [c["id"] for c in m["classes"]][: len(m["classes"]) // 2 or 1]
        t0 = time.perf_counter()
        loaders = {inp: build_half_loaders(data, half, crop, batch_size=batch, device=device, seed=0,
                                           num_workers=args.threads, normalize=normalize, input=inp)
                   for inp in ("pixel_store", "ffcv")}
        built = time.perf_counter() - t0
        assert loaders["pixel_store"].input == "pixel_store" and loaders["ffcv"].input == "ffcv"
        secs, seen = {k: 0.0 for k in loaders}, {k: 0 for k in loaders}
        for k, ld in loaders.items():                  # warm-up epoch (FFCV compiles its pipeline here)
            for _ in ld.train:
                pass
        for r in range(args.rounds):
            for k in (("pixel_store", "ffcv") if r % 2 == 0 else ("ffcv", "pixel_store")):
                ld = loaders[k].train
                if hasattr(ld, "set_epoch"):
                    ld.set_epoch(r + 1)
                t0 = time.perf_counter()
                for x, _ in ld:
                    seen[k] += len(x)
                secs[k] += time.perf_counter() - t0
        rate = {k: seen[k] / secs[k] for k in loaders}
        print(f"| {name} | {loaders['ffcv'].train.num_samples} | {built:.1f} (with both loaders' set-up) | "
              f"{rate['pixel_store']:,.0f} | {rate['ffcv']:,.0f} | {rate['pixel_store'] / rate['ffcv']:.2f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
