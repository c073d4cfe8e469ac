"""One stream, many nets: a base's seven frozen transfers (AnB n = 1..7) trained as one cohort against seven
separate loops. No Ray, no FFCV: the training step a cohort trial runs (loop.fit_cohort, frozen_prefix.py) over
a built-in dataset written straight into the pixel store, on the CPU or a GPU.

Both arms in the same process, from the same base weights, seed and batches: `separate` trains each member
alone (its own pass over the stream, its own frozen layers), `cohort` trains the seven from one stream, the
base's frozen layers run once per input (looked up, where the inputs are a finite set and the epochs outnumber
them: the demo) or once per batch up to the deepest cut (elsewhere: the paper's net). Printed per arm: wall
time, images a second per net (the stream's images over the arm's wall, per net) and in total, the ratio, and
whether every member's final weights are the same in both arms (bit for bit; on CUDA within float tolerance).
Then each member's memory, measured (cohort.member_bytes), and on CUDA the peak allocated of each arm.

    python benchmarks/cohort_step.py                                   # demo size on the CPU, both trunk modes
    python benchmarks/cohort_step.py --device cuda --recipe paper --side 256 --crop 227 --width 1 \\
        --batch 256 --steps 60 --classes-per-superclass 16 --train-per-class 160 --val-per-class 10   # a GPU
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_loop import Half, half_loaders, sync                          # noqa: E402  (the same store loaders)

from raytransfer.cohort import member_bytes                             # noqa: E402
from raytransfer.frozen_prefix import plan_inputs                      # noqa: E402
from raytransfer.loop import Member, fit_cohort, planned_epochs        # noqa: E402
from raytransfer.pixel_store import ensure_store, synthetic_source     # noqa: E402
from raytransfer.recipes import get_recipe                             # noqa: E402
from raytransfer.synthetic import SyntheticSpec                        # noqa: E402
from raytransfer.transfer import build_trial_network, init_seed_for    # noqa: E402


def members_of(recipe, base: dict, ns, classes: int, device) -> list[Member]:
    out = []
    for n in ns:
        net = build_trial_network(recipe.arch, classes, base, n, "frozen", init_seed_for(0, "fresh"),
                                  recipe.arch_kwargs())
        if recipe.channels_last:
            net = net.to(memory_format=torch.channels_last)
        net = net.to(device)
        out.append(Member(f"AnB-n{n}", net, net, frozen_n=n))
    return out


def train(members, recipe, loaders, device) -> tuple[float, dict]:
    """(seconds, {key: final weights}) of one fit_cohort over these members, the stream's setup included."""
    sync(device)
    t0 = time.perf_counter()
    plan = plan_inputs(members, loaders, planned_epochs(recipe, loaders.train))
    if recipe.compile and device.type == "cuda":
        for m in members:
            m.model = torch.compile(m.model)
    fit_cohort(members, recipe, loaders, device, plan=plan, log_every_s=0)
    sync(device)
    return time.perf_counter() - t0, {m.key: {k: v.detach().cpu() for k, v in m.net.state_dict().items()}
                                      for m in members}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--recipe", default="demo", help="demo (the CPU demo's net and schedule) or paper")
    p.add_argument("--side", type=int, default=32, help="stored side of the built-in images")
    p.add_argument("--crop", type=int, help="crop size (default: the recipe's)")
    p.add_argument("--width", type=float, help="channel multiplier (default: the recipe's)")
    p.add_argument("--batch", type=int, help="batch (default: the recipe's)")
    p.add_argument("--epochs", default="128,12",
                   help="comma list: one run of both arms each (demo: 128 looks the frozen layers up, 12 computes "
                        "them once per batch: fewer epochs than an image's 18 inputs)")
    p.add_argument("--steps", type=int, help="train this many steps instead of --epochs (the paper on a GPU)")
    p.add_argument("--ns", default="1,2,3,4,5,6,7", help="the members' n (AnB from one base)")
    p.add_argument("--classes-per-superclass", type=int, default=3, help="the half has 4 x this many classes")
    p.add_argument("--train-per-class", type=int, default=96, help="the demo's 96")
    p.add_argument("--val-per-class", type=int, default=40)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the demo's trials: 1)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.set_num_threads(args.threads)
    card = torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    blocked = [m for m in ("ray", "ffcv") if sys.modules.get(m) is not None]
    spec = SyntheticSpec(classes_per_superclass=args.classes_per_superclass, train_per_class=args.train_per_class,
                         val_per_class=args.val_per_class, size=args.side)
    ns = [int(n) for n in args.ns.split(",")]
    print(f"# {card}; torch {torch.__version__}, {args.threads} thread(s); ray/ffcv imported: "
          f"{', '.join(blocked) or 'neither'}")
    print("| recipe | epochs (steps) | frozen layers | arm | wall s | img/s per net | img/s, all nets | x | "
          "same weights |")
    print("|---|---|---|---|---:|---:|---:|---:|---|")
    with tempfile.TemporaryDirectory(prefix="raytransfer-cohort-") as tmp:
        store = ensure_store(Path(tmp) / "store", synthetic_source(spec, args.side, 1), args.side)
        half_labels = np.arange(spec.num_classes // 2)
        pixels, labels = store.images("train"), store.labels("train")
        in_half = np.flatnonzero(np.isin(labels, half_labels))
        mean_image = pixels[in_half].mean(0).astype(np.float32)
        mean, std = mean_image.mean((0, 1)), pixels[in_half[:512]].reshape(-1, 3).std(0)
        sizes = {}
        for epochs in ([None] if args.steps else [int(e) for e in args.epochs.split(",")]):
            over = {k: v for k, v in (("crop_size", args.crop), ("width", args.width), ("batch_size", args.batch))
                    if v is not None}
            over.update(resize_size=args.side, until_plateau=None)
            if args.steps:
                over.update(iterations=args.steps, epochs=None, eval_every_iters=max(1, args.steps // 2))
            else:
                over.update(epochs=epochs, iterations=None)
            recipe = get_recipe(args.recipe, **over)
            classes = recipe.head_outputs or len(half_labels)
            base = build_trial_network(recipe.arch, classes, None, 0, "scratch", init_seed_for(0, "base"),
                                       recipe.arch_kwargs()).state_dict()

            def loaders():
                train_l, val_l = half_loaders(store, recipe, half_labels, device, 0, "never", mean_image, mean, std)
                return Half(train_l, val_l, len(half_labels))

            peak = {}
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            separate_s, separate_w = 0.0, {}
            for n in ns:
                s, w = train(members_of(recipe, base, [n], classes, device), recipe, loaders(), device)
                separate_s += s
                separate_w.update(w)
            peak["separate (one at a time)"] = torch.cuda.max_memory_allocated(device) if cuda else None
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            members = members_of(recipe, base, ns, classes, device)
            half = loaders()
            cohort_s, cohort_w = train(members, recipe, half, device)
            peak["cohort"] = torch.cuda.max_memory_allocated(device) if cuda else None
            images = half.train.num_samples // recipe.batch_size * recipe.batch_size
            images *= planned_epochs(recipe, half.train) if not args.steps else 1
            if args.steps:
                images = args.steps * recipe.batch_size
            close = (lambda a, b: torch.equal(a, b)) if not cuda else \
                (lambda a, b: torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-4))
            same = all(close(cohort_w[k][t], separate_w[k][t]) for k in cohort_w for t in cohort_w[k])
            mode = ("looked up" if half.train.variants() < planned_epochs(recipe, half.train) and not cuda
                    else "once per batch")
            when = f"{epochs}" if not args.steps else f"({args.steps})"
            for arm, s in (("separate", separate_s), ("cohort", cohort_s)):
                per_net = images / s
                print(f"| {recipe.name} | {when} | {mode} | {arm} | {s:.1f} | {per_net:,.0f} | "
                      f"{per_net * len(ns):,.0f} | {separate_s / s:.2f} | {'yes' if same else 'NO'} |", flush=True)
            probe = next(iter(half.val))[0]
            probe = probe.repeat((-(-recipe.batch_size // len(probe)),) + (1,) * (probe.dim() - 1))[:recipe.batch_size]
            autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if recipe.bf16 else contextlib.nullcontext
            sizes[when] = ({m.key: member_bytes(m.net, probe, autocast) for m in members_of(recipe, base, ns, classes,
                                                                                             device)}, peak)
    print(f"\n{len(ns)} members AnB n = {args.ns} of one base; command: python benchmarks/cohort_step.py "
          f"{' '.join(argv if argv is not None else sys.argv[1:])}")
    for when, (by_member, peak) in sizes.items():
        print(f"\nmemory per member ({when}), MiB: " + ", ".join(
            f"{k} {v['total'] / 2**20:.1f} (weights {v['weights'] / 2**20:.1f}, training {v['training'] / 2**20:.1f},"
            f" activations {v['activations'] / 2**20:.1f})" for k, v in by_member.items()))
        if cuda:
            print("peak allocated, MiB: " + ", ".join(f"{k} {v / 2**20:,.0f}" for k, v in peak.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
