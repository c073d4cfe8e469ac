"""What the sweep machinery costs on top of training, and what dependency scheduling buys.

Runs the same grid three ways in this process, each into its own fresh storage, and compares:
  [1] dependency   one Tuner.fit(): a transfer starts the moment its base is done (the product);
  [2] two phases   all bases in one Tuner.fit(), then all other jobs in a second one;
  [3] train host   as [1], but every trial under Ray Train's TorchTrainer (1 worker) instead of the
                   trial's own process: the price of a worker group for a tiny CPU trial.
For each: wall time, the sum of the trials' own wall times and of their training times (the loop's
timed steps, evaluation excluded), and two ratios (1.0 = nothing lost):
  overhead    wall x concurrency / sum(training time): everything that is not a training step --
              evaluation, checkpoints, trial start, scheduling, Ray itself;
  scheduling  wall x concurrency / sum(trial wall): only the time lost between and around trials.

    python benchmarks/sweep_overhead.py --scale demo --write                  # ~25 min on 2 cores
    python benchmarks/sweep_overhead.py --scale smoke --modes dependency,train \
        --grid-flags "--splits similar --n 1,7" --write                      # the train host, ~10 min
"""
from __future__ import annotations

import argparse
import os
import platform
import runpy
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_mode(mode: str, grid: dict, scale: str, out: Path, cpus: int, extra: list[str]) -> dict:
    from raytransfer.sweep import runner, tuning
    from raytransfer.sweep.jobs import build_jobs, expand_axes
    from raytransfer.sweep.settings import RunSettings
    from raytransfer.sweep.store import JobStore

    argv = ["--scale", scale, "--out", str(out), "--no-dashboard", "--no-report", "--num-cpus", str(cpus), *extra]
    if mode == "train":
        argv += ["--host", "train"]
    args = runner.argparse.ArgumentParser()
    runner.add_sweep_args(args)
    args = args.parse_args(argv)
    t0 = time.time()
    if mode != "two-phase":
        rc = runner.run(grid, args, "bench")
        assert rc == 0, f"{mode}: sweep failed"
    else:                                         # the same jobs, bases first, then everything else
        sc = runner.SCALES[scale]
        from ray import tune
        g = runner.apply_overrides({**grid, "split_seed": tune.grid_search(list(sc.split_seeds))}, args)
        dataset = runner.resolve_dataset(args, sc, Path(os.environ.get("RAYTRANSFER_CACHE",
                                                                        "~/.cache/raytransfer")).expanduser())
        jobs, _ = build_jobs(expand_axes(g), dataset, runner.get_recipe(sc.recipe))
        store = JobStore(str(out))
        bases = [j for j in jobs if j.treatment in ("baseA", "baseB")]
        run = RunSettings.from_args(args, str(out))
        tuning.fit_sweep(bases, {}, store, "tune-phase1", run)
        rest = [j for j in jobs if j not in bases]
        tuning.fit_sweep(rest, store.completed(refresh=True), store, "tune-phase2", run)
    wall = time.time() - t0
    recs = JobStore(str(out)).completed(refresh=True)
    trial_wall = sum(r["metrics"]["wall_s"] for r in recs.values())     # a cohort member: its share of its trial
    train_s = sum(e.get("train_s", 0) for r in recs.values() for e in r["metrics"].get("epoch_log", []))
    return {"mode": mode, "jobs": len(recs), "wall_s": wall, "trial_wall_s": trial_wall, "train_s": train_s,
            "overhead": wall * cpus / max(train_s, 1e-9), "scheduling": wall * cpus / max(trial_wall, 1e-9)}


def machine() -> str:
    model = ""
    try:
        model = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} cores ({model or platform.processor()}), no GPU"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scale", default="smoke", choices=["smoke", "demo"])
    p.add_argument("--modes", default="dependency,two-phase", help="of dependency, two-phase, train")
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--grid-flags", default="", help="extra sweep flags, e.g. '--splits similar --n 1,4,7'")
    p.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    grid = runpy.run_path(str(ROOT / "sweeps" / "full_paper.py"))["GRID"]
    rows = []
    for mode in args.modes.split(","):
        out = Path(tempfile.mkdtemp(prefix=f"bench-{mode}-"))
        try:
            rows.append(run_mode(mode, grid, args.scale, out, args.cpus, args.grid_flags.split()))
        finally:
            shutil.rmtree(out, ignore_errors=True)
        print(rows[-1], flush=True)
    base = next((r for r in rows if r["mode"] == "dependency"), rows[0])
    lines = [f"Grid: `sweeps/full_paper.py --scale {args.scale} {args.grid_flags}`, {base['jobs']} jobs, "
             f"local Ray with {args.cpus} CPUs, one CPU per trial. Machine: {machine()}. "
             f"Date: {time.strftime('%Y-%m-%d')}. Command: `python benchmarks/sweep_overhead.py --scale {args.scale}"
             f"{' --modes ' + args.modes if args.modes != p.get_default('modes') else ''}"
             f"{' --grid-flags ' + repr(args.grid_flags) if args.grid_flags else ''}`.", "",
             "| mode | wall s | sum of trial wall s | sum of train s | overhead (wall x CPUs / train s) | "
             "scheduling (wall x CPUs / trial wall s) | wall vs dependency |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['wall_s']:.0f} | {r['trial_wall_s']:.0f} | {r['train_s']:.0f} | "
                     f"{r['overhead']:.2f} | {r['scheduling']:.2f} | {r['wall_s'] / base['wall_s']:.2f}x |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        heading = f"## Sweep overhead ({args.scale}{', ' + args.modes if args.modes != p.get_default('modes') else ''})"
        write_section(ROOT / "benchmarks" / "RESULTS.md", heading, table)


def write_section(path: Path, heading: str, body: str):
    """Replace (or append) the section under `heading`, leaving the other sections alone."""
    lines = path.read_text().splitlines() if path.exists() else []
    start = next((i for i, l in enumerate(lines) if l.strip() == heading), None)
    if start is None:
        lines += ["", heading, "", *body.splitlines()]
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines[start:end] = [heading, "", *body.splitlines(), ""]
    path.write_text("\n".join(lines).rstrip() + "\n")


if __name__ == "__main__":
    main()
