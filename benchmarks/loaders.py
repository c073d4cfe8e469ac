"""FFCV half loader vs torchvision ImageFolder + DataLoader on the same JPEGs: images/s and their ratio.

The JPEGs are the paper's format: 256x256 (squashed), quality 90, drawn by the synthetic renderer into
a class-folder tree. Both loaders read the same half of the classes with the paper's train-time
pipeline: a random 227 crop of the 256 image, a mirror, normalisation to float32 NCHW on the CPU, and
labels remapped to 0..k-1. One warm-up epoch each (FFCV compiles its pipeline there), then the timed
epochs alternate between the two, so a change in the machine's load hits both alike.

    python benchmarks/loaders.py --workers 2                 # print the numbers
    python benchmarks/loaders.py --workers 2 --write         # and (re)write the section in RESULTS.md
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from datetime import date
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from raytransfer.loaders import CropSpec, build_half_loaders
from raytransfer.prepare import prepare
from raytransfer.synthetic import SyntheticImages, SyntheticSpec

SECTION = "## Loaders (FFCV vs torchvision)"
RESULTS = Path(__file__).with_name("RESULTS.md")


def jpeg_spec(images: int, classes: int) -> SyntheticSpec:
    return SyntheticSpec(seed=0, size=256, superclasses_per_family=classes // 2, classes_per_superclass=1,
                         train_per_class=images // classes, val_per_class=2)


def _write_one(job):
    spec, split, i, path = job
    Image.fromarray(SyntheticImages(spec, split)[i][0]).save(path, quality=90)


def write_jpegs(tree: Path, spec: SyntheticSpec, workers: int) -> Path:
    """tree/{train,val}/<class>/<n>.jpg, reused when the same spec wrote it before."""
    stamp = tree / "spec.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == spec.to_dict():
        return tree
    shutil.rmtree(tree, ignore_errors=True)
    ids = [c["id"] for c in spec.classes()]
    jobs = []
    for split in ("train", "val"):
        for i in range(len(SyntheticImages(spec, split))):
            d = tree / split / ids[i % spec.num_classes]
            d.mkdir(parents=True, exist_ok=True)
            jobs.append((spec, split, i, d / f"{i:06d}.jpg"))
    with Pool(workers) as pool:
        pool.map(_write_one, jobs, chunksize=32)
    stamp.write_text(json.dumps(spec.to_dict()))
    return tree


def ffcv_loader(betons: Path, half: list[str], args):
    return build_half_loaders(betons, half, CropSpec("paper", args.crop), batch_size=args.batch_size,
                              device=torch.device("cpu"), seed=0, num_workers=args.workers).train


def torchvision_loader(tree: Path, half: list[str], manifest: dict, args):
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    mean, std = np.array(manifest["mean"]) / 255, np.array(manifest["std"]) / 255
    t = transforms.Compose([transforms.RandomCrop(args.crop), transforms.RandomHorizontalFlip(),
                            transforms.ToTensor(), transforms.Normalize(mean.tolist(), std.tolist())])
    folder = datasets.ImageFolder(str(tree / "train"), transform=t)
    lut = {folder.class_to_idx[c]: k for k, c in enumerate(sorted(half))}
    folder.target_transform = lut.get
    ids = [i for i, y in enumerate(folder.targets) if y in lut]
    return DataLoader(Subset(folder, ids), batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                      persistent_workers=True, drop_last=True)


def timed_epoch(loader) -> tuple[int, float]:
    n, t0 = 0, time.perf_counter()
    for images, labels in loader:
        n += len(labels)
    return n, time.perf_counter() - t0


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown CPU")
    return (f"{model}; nproc {len(os.sched_getaffinity(0))} (of {os.cpu_count()}); "
            f"load average {os.getloadavg()[0]:.1f} at the start")


def versions() -> str:
    from importlib.metadata import version

    return ", ".join(f"{p} {version(p)}" for p in ("ffcv", "torch", "torchvision", "pillow", "numba"))


def run(args) -> dict:
    work = Path(args.work or tempfile.mkdtemp(prefix="rt-loaders-"))
    spec = jpeg_spec(args.images, args.classes)
    t0 = time.perf_counter()
    tree = write_jpegs(work / "jpegs", spec, args.workers)
    jpeg_kb = np.mean([f.stat().st_size for f in (tree / "train").rglob("*.jpg")]) / 1024
    manifest = prepare("folder", tree, work / "betons", resolution=256, format="jpg", quality=90,
                       workers=args.workers)
    print(f"data ready in {time.perf_counter() - t0:.0f} s under {work}")
    half = [c["id"] for c in manifest["classes"]][: len(manifest["classes"]) // 2]
    loaders = {"FFCV": ffcv_loader(work / "betons", half, args),
               "torchvision": torchvision_loader(tree, half, manifest, args)}
    warmup = {name: timed_epoch(loader)[1] for name, loader in loaders.items()}
    rates, counts = {name: [] for name in loaders}, set()
    for _ in range(args.epochs):
        for name, loader in loaders.items():
            n, s = timed_epoch(loader)
            rates[name].append(n / s)
            counts.add(n)
    assert len(counts) == 1, f"the two loaders yielded different numbers of images an epoch: {counts}"
    result = {"rates": rates, "warmup_s": warmup, "jpeg_kb": jpeg_kb, "half_images": counts.pop(),
              "machine": machine(), "versions": versions(), "date": date.today().isoformat(),
              "args": vars(args), "half_classes": len(half), "classes": len(manifest["classes"])}
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return result


def section(r: dict) -> str:
    a = r["args"]
    mean = {k: float(np.mean(v)) for k, v in r["rates"].items()}
    lines = [
        SECTION, "",
        f"Date: {r['date']}. Command: `python benchmarks/loaders.py --workers {a['workers']} --images {a['images']} "
        f"--epochs {a['epochs']} --write`. Machine: {r['machine']} (shared with other work; CPU only). "
        f"Versions: {r['versions']}.", "",
        f"Data: {a['images']} JPEGs from the synthetic renderer, 256×256, quality 90 (mean {r['jpeg_kb']:.1f} KB), "
        f"{r['classes']} classes; both loaders read the same half ({r['half_classes']} classes, "
        f"{r['half_images']} images an epoch). FFCV reads them from `raytransfer prepare folder` betons "
        "(re-encoded at quality 90, 256 px); torchvision reads the JPEG files.", "",
        f"Pipeline, both: random {a['crop']} crop of the 256 image + mirror + normalise to float32 NCHW + labels "
        f"remapped to 0..k-1; batch {a['batch_size']}, {a['workers']} workers (FFCV: numba threads; "
        "torchvision: DataLoader processes, persistent), shuffled, last partial batch dropped. FFCV: "
        "`build_half_loaders(..., CropSpec('paper', 227))`; torchvision: `ImageFolder` + `Subset` + "
        "`RandomCrop`, `RandomHorizontalFlip`, `ToTensor`, `Normalize`.", "",
        f"Measurement: one warm-up epoch each (FFCV {r['warmup_s']['FFCV']:.1f} s including its JIT compile, "
        f"torchvision {r['warmup_s']['torchvision']:.1f} s including worker start), then {a['epochs']} timed "
        "epochs, alternating between the two; images/s = images yielded / wall time of the epoch.", "",
        "| loader | images/s (mean) | per epoch |", "|---|---:|---|",
    ]
    for name, v in r["rates"].items():
        lines.append(f"| {name} | {mean[name]:.0f} | {', '.join(f'{x:.0f}' for x in v)} |")
    lines += ["", f"Ratio FFCV / torchvision: **{mean['FFCV'] / mean['torchvision']:.2f}×**.", ""]
    return "\n".join(lines)


def write_section(text: str, path: Path = RESULTS):
    """Replace this benchmark's section of RESULTS.md (up to the next `## `), or append it; others stay."""
    old = path.read_text() if path.is_file() else ""
    start = old.find(SECTION)
    if start < 0:
        new = old.rstrip("\n") + ("\n\n" if old.strip() else "") + text
    else:
        end = old.find("\n## ", start + len(SECTION))
        new = old[:start] + text + ("\n" + old[end + 1:] if end >= 0 else "")
    path.write_text(new.rstrip("\n") + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=3000, help="training JPEGs in all (half are read)")
    p.add_argument("--classes", type=int, default=10, help="classes (even; half are read)")
    p.add_argument("--workers", type=int, default=2, help="loader workers, both loaders (and writer processes)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--crop", type=int, default=227)
    p.add_argument("--epochs", type=int, default=5, help="timed epochs per loader, after one warm-up")
    p.add_argument("--work", type=Path, default=None, help="keep JPEGs and betons here (reused); default: a temp dir")
    p.add_argument("--write", action="store_true", help=f"write the section into {RESULTS}")
    args = p.parse_args(argv)
    if args.classes < 2 or args.classes % 2:
        p.error(f"--classes {args.classes}: must be even and at least 2 (the loaders read half the classes)")
    r = run(args)
    text = section(r)
    print(text)
    if args.write:
        write_section(text)
        print(f"wrote the section into {RESULTS}")


if __name__ == "__main__":
    main()
