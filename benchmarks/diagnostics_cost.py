"""What the diagnostics cost: each diagnostic job of a finished sweep, run again in this process with
the sweep's own specs and weights, timed (wall and CPU seconds, all threads) per kind and per split x seed.

    python benchmarks/diagnostics_cost.py results/full_paper-demo [--threads 1]

The first job of the process also pays FFCV's JIT compile of the eval pipeline (a few seconds); a
sweep's reused trial process has compiled it already.

Reads the job store only (the diagnostics' records hold their specs); writes nothing. Numbers in
benchmarks/RESULTS.md.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")   # as in a Ray trial of 1 CPU; else idle BLAS threads spin on CPU time

import argparse
import json
import resource
import time
from collections import defaultdict

import torch

from raytransfer.diagnose import run_diagnostic
from raytransfer.sweep.store import JobStore, load_weights


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("storage", help="the sweep's --storage (default: its --out folder)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (a diagnostic trial gets --cpus-per-trial)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    store = JobStore(args.storage)
    records = {k: r for k, r in store.completed().items() if r.get("diagnostic")}
    if not records:
        raise SystemExit(f"{args.storage} holds no diagnostic records: run the sweep with --diagnostics first")
    per_unit = defaultdict(lambda: [0.0, 0.0])
    print(f"{'job':<58} {'rows':>5} {'wall_s':>7} {'cpu_s':>7} {'in sweep wall_s':>15}")
    for key, record in sorted(records.items()):
        spec = record["config"]
        t0, c0 = time.perf_counter(), cpu_s()
        rows = run_diagnostic(spec, lambda k: load_weights(store.weights_uri(k)), torch.device("cpu"))
        wall, cpu = time.perf_counter() - t0, cpu_s() - c0
        unit = f"{spec['row']['split']} seed {spec['row']['seed']} target {spec['row']['target_half']}"
        per_unit[unit][0] += wall
        per_unit[unit][1] += cpu
        print(f"{key:<58} {len(rows):>5} {wall:>7.1f} {cpu:>7.1f} {record['metrics']['wall_s']:>15.1f}")
    print(json.dumps({unit: {"wall_s": round(w, 1), "cpu_s": round(c, 1)} for unit, (w, c) in per_unit.items()},
                     indent=2))


if __name__ == "__main__":
    main()
