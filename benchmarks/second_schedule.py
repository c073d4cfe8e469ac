"""Is a recipe's base trained to convergence? One base and a second schedule from its own weights, outside Ray.

Trains base B of the demo's built-in data (the demo scale's SyntheticSpec, generator seed --data-seed; similar split
seed 0) with a recipe and its overrides, then BnB+ at n = 7 from that base: the whole schedule again from the base's
own weights, fc8 re-initialised. Prints, per training seed, the base's top1_best10, its rise by the report's
convergence rule (raytransfer/convergence.py: converged below 1 point) and what the second schedule gained (BnB+ minus
the base: a base short of convergence gains points from training twice, which fine-tuned and selffer comparisons
would then measure). One process, one torch thread (a 1-CPU trial); wall and CPU seconds per net. This is how the
recipe search of benchmarks/RESULTS.md ("The paper's normalisation and co-adaptation") measured each row.

    python benchmarks/second_schedule.py demo_lrn                       # the recipe as built in
    python benchmarks/second_schedule.py demo_lrn --set epochs=256 --seeds 0,1,2
    python benchmarks/second_schedule.py demo --set norm=lrn --set dropout=0.5 --set lr=0.01 --base-only
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import torch

from raytransfer.prepare import prepare
from raytransfer.recipes import get_recipe, parse_overrides
from raytransfer.splits import half_classes, similar_split
from raytransfer.sweep.runner import SCALES
from raytransfer.trial import run_trial


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("recipe")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override a recipe field (repeatable)")
    p.add_argument("--seeds", default="0", help="training seeds, e.g. 0,1,2")
    p.add_argument("--data-seed", type=int, default=0, help="the built-in data's generator seed")
    p.add_argument("--base-only", action="store_true", help="train the base alone (no second schedule)")
    p.add_argument("--cache", type=Path, default=Path(os.environ.get("RAYTRANSFER_CACHE", "~/.cache/raytransfer")))
    p.add_argument("--json", type=Path, help="append one JSON line per net to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    recipe = get_recipe(args.recipe, **parse_overrides(args.set))
    spec = replace(SCALES["demo"].synthetic, seed=args.data_seed)
    data = args.cache.expanduser() / f"second-schedule-data-{args.data_seed}"
    manifest = prepare("synthetic", None, data, resolution=None, synthetic=spec)
    target = half_classes(similar_split(manifest["name"], manifest["classes"], 0), "B")

    def net(treatment, n, seed, base=None):
        spec = {"job_key": f"{treatment}-{n}-s{seed}", "data_dir": str(data), "target_classes": target, "n": n,
                "dataset_fingerprint": manifest["fingerprint"], "treatment": treatment, "seed": seed,
                "recipe": recipe.to_dict()}
        wall, cpu = time.time(), time.process_time()
        out = run_trial(spec, torch.device("cpu"), base_state=base)
        out.update(wall_s=time.time() - wall, cpu_s=time.process_time() - cpu)
        if args.json:
            row = {k: out[k] for k in ("top1_best10", "top1_final", "plateau_rise", "converged", "wall_s", "cpu_s")}
            with args.json.open("a") as f:
                f.write(json.dumps({"recipe": recipe.name, "set": args.set or [], "data_seed": args.data_seed,
                                    "seed": seed, "treatment": treatment, "n": n, **row}) + "\n")
        return out

    print(f"recipe {' '.join([recipe.name, *(args.set or [])])}; data seed {args.data_seed}; base B of similar split 0")
    print("| seed | base top1_best10 | rise (points) | converged | second schedule (points) | base wall / CPU s |")
    print("|---:|---:|---:|---|---:|---|")
    for seed in (int(s) for s in args.seeds.split(",")):
        base = net("baseB", 0, seed)
        gain = "-"
        if not args.base_only:
            second = net("BnB+", 7, seed, base["state_dict"])
            gain = f"{100 * (second['top1_best10'] - base['top1_best10']):+.1f}"
        print(f"| {seed} | {base['top1_best10']:.3f} | {100 * base['plateau_rise']:+.1f} | {base['converged']} | {gain} "
              f"| {base['wall_s']:.0f} / {base['cpu_s']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
