"""A job store of thousands of jobs: what `raytransfer status`, `--dry-run` and the searcher cost, before
and after the job store's index (raytransfer/sweep/index.py), on the local filesystem and on S3.

Writes one record per job of the paper's grid with many training seeds (`--scale paper --directions both
--train-seeds 0-17`: 4,968 jobs) through the job store's own calls (count_attempt, write, write_failed), with
records shaped like record_outcome's at the paper recipe (500 class ids, 450 evaluations in the epoch log;
nothing is trained): most done, a few failed, some running (a live heartbeat), the rest waiting; on S3 the same
files, uploaded 16 at a time (the store's own writes cost a dozen requests a record). The data is
a synthetic dataset of 1,000 classes (2 training images a class), prepared at 32 px, so the grid runs with
`--set resize_size=32 --set crop_size=28`: the same jobs as the paper's grid, other keys.

Then, in this one process, today's code (the baseline commit's store.py, status.py, searcher.py and
runner.py, loaded from git) against the working tree's, on the same store:
  [1] status        sweep_status (the old one reads every record and every attempt); the new one with no
                    index (it rebuilds it), with a fresh one, and with one made stale by 10 more records;
                    both answers compared (they must be equal)
  [2] storage       one listing of the records against reading them all, one after another and in parallel
  [3] dry-run       runner.run(..., --dry-run) on the grid, output compared (must be equal)
  [4] searcher      a whole sweep simulated (64 trials at once, every job done in turn): time per decision
                    (suggest, on_trial_complete) and per idle poll while bases train; the order of the jobs
                    handed out compared (must be equal); the size of the state Tune snapshots
on the local disk and on a local S3 server (moto, tests/s3server.py; --no-s3 to skip).

    python benchmarks/job_store_scale.py                    # about an hour on 2 loaded cores, mostly today's code
    python benchmarks/job_store_scale.py --train-seeds 0-1 --no-s3     # a quick look (552 jobs)
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import pickle
import random
import runpy
import shutil
import subprocess
import sys
import tempfile
import time
import types
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "2b21cf7"              # today's code before the index (issue 25 item 6)
SYNTHETIC = dict(superclasses_per_family=100, classes_per_superclass=5, train_per_class=2, val_per_class=1)


def load_baseline(rev: str) -> dict:
    """The baseline commit's store, status, searcher and runner as modules beside today's (their relative
    imports of each other pointed at the baseline copies; everything else is today's package)."""
    mods = {}
    for name in ("store", "status", "searcher", "runner"):
        src = subprocess.check_output(["git", "-C", str(ROOT), "show", f"{rev}:raytransfer/sweep/{name}.py"], text=True)
        for dep in ("store", "status", "searcher"):
            src = src.replace(f"from .{dep} import", f"from ._baseline_{dep} import")
        modname = f"raytransfer.sweep._baseline_{name}"
        module = types.ModuleType(modname)
        module.__package__, module.__file__ = "raytransfer.sweep", f"<{rev}:raytransfer/sweep/{name}.py>"
        sys.modules[modname] = module
        exec(compile(src, module.__file__, "exec"), module.__dict__)
        mods[name] = module
    return mods


def grid_args(data: Path, storage: str, out: Path, train_seeds: str) -> list[str]:
    return ["--scale", "paper", "--data", str(data), "--directions", "both", "--train-seeds", train_seeds,
            "--set", "resize_size=32", "--set", "crop_size=28", "--storage", storage, "--out", str(out), "--dry-run"]


def paper_grid():
    g = runpy.run_path(str(ROOT / "sweeps" / "full_paper.py"))
    return g["GRID"], g["SPLIT_TREATMENTS"]


def build_grid(argv: list[str]):
    """The jobs runner.run builds for these flags (its own helpers, in its order)."""
    from ray import tune

    from raytransfer.recipes import get_recipe, parse_overrides
    from raytransfer.sweep import runner
    from raytransfer.sweep.jobs import build_diagnostic_jobs, build_jobs, expand_axes

    grid, split_treatments = paper_grid()
    p = argparse.ArgumentParser()
    runner.add_sweep_args(p)
    args = p.parse_args(argv)
    scale = runner.SCALES[args.scale]
    recipe = get_recipe(scale.recipe, **parse_overrides(args.set))
    grid = {**grid, "split_seed": tune.grid_search(list(scale.split_seeds))}
    grid = runner.apply_overrides(grid, args, recipe.arch)
    dataset = runner.resolve_dataset(args, scale, Path(tempfile.gettempdir()))
    grid, _ = runner.drop_dissimilar_without_superclasses(grid, dataset)
    axes = [a for a in expand_axes(grid) if a["treatment"] in split_treatments.get(a["split"], [a["treatment"]])]
    jobs, _ = build_jobs(axes, dataset, recipe, runner.reduced_k_of(args, scale))
    jobs += build_diagnostic_jobs(jobs, runner.diagnostic_kinds(args, scale), scale.diagnostic_settings)
    return jobs, args, paper_grid()


def fake_record(job, store, rng: random.Random, evals: int, now: float) -> dict:
    """A done record as record_outcome writes it at the paper recipe (metrics as hosts.summary_metrics gives)."""
    from raytransfer.sweep.monitor import relative_cost

    hours = 1.3 * relative_cost({"treatment": job.treatment, "n": job.n})
    finished = now - rng.uniform(60, 86400 * 3)
    started = finished - hours * 3600
    log = [{"epoch": i * 1000 / 2500, "epochs": 179, "step": (i + 1) * 1000, "total_steps": evals * 1000,
            "train_loss": 6.9 * (1 - i / (evals + 1)) + rng.random() * 0.1, "lr": 0.01 * 0.1 ** (i // 100),
            "images_per_s": 23000 + rng.random() * 500, "train_s": 11.1 + rng.random(), "input_wait_s": rng.random() * 0.2,
            "train_images": 256000, "val_top1": 0.6 * i / evals + rng.random() * 0.01, "val_top5": 0.8 * i / evals}
           for i in range(evals)]
    top1 = log[-1]["val_top1"] if log else 0.0
    node = f"{rng.getrandbits(224):056x}"
    metrics = {"top1_final": top1, "top5_final": log[-1]["val_top5"] if log else 0.0,
               "top1_best10": top1 - 0.003, "epochs": 179, "steps": evals * 1000, "evaluations": evals,
               "plateau_rise": float("nan"), "converged": None, "frozen_check": True, "frozen_mismatched": [],
               "train_images_per_s": 23000.0, "epoch_log": log, "input": "pixel_store",
               "input_wait_share": 0.01 + rng.random() * 0.02, "wall_s": hours * 3600,
               "num_classes": len(job.spec["target_classes"]), "train_samples": 2 * len(job.spec["target_classes"]),
               "images_per_class": 2.0, "resumed_from_epoch": None, "checkpoints_written": 9,
               "checkpoint_bytes": 244_000_000, "base_weights_via": "object_store" if job.base_key else None,
               "node_id": node, "gpus_held": 1.0, "device": "cuda:0", "final": True, "val_top1": top1}
    return {"config": job.spec, "host": "process", "node_id": node, "gpus_held": 1.0, "attempts": 1,
            "started_at": started, "finished_at": finished, "metrics": metrics,
            "weights_uri": store.weights_uri(job.key), "base_weights_via": metrics["base_weights_via"],
            "versions": {"raytransfer": "0.1.0", "torch": "2.14.1+cu130", "ray": "2.60.0", "python": "3.11.7"}}


def write_store(storage: str, jobs, evals: int, seed: int = 0, threads: int = 16) -> dict:
    """Plan, attempts, records and a live heartbeat for the grid, through JobStore's own calls."""
    from raytransfer.sweep.store import JobStore

    store, rng, now = JobStore(storage), random.Random(seed), time.time()
    store.check_writable()
    store.write_sweep({"experiment": "tune-scale", "gpus_per_trial": 1.0, "jobs": [j.row() for j in jobs]})
    n = len(jobs)
    n_done, n_running = int(n * 0.94), 32
    failed = set(rng.sample([j.key for j in jobs[:n_done] if j.base_key], max(1, n // 100)))
    plan = [(j, "failed" if j.key in failed else "done") for j in jobs[:n_done]] + \
           [(j, "running") for j in jobs[n_done:n_done + n_running]]
    seeds = [rng.random() for _ in plan]

    def one(item):                                   # each record made where it is written: 150 kB x 5,000 in RAM
        (job, state), seed = item
        record = fake_record(job, store, random.Random(seed), evals, now)
        store.count_attempt(job.key, {"node_id": record["node_id"], "host": "process"})
        if state == "done":
            store.write(job.key, record)
        elif state == "failed":
            store.write_failed(job.key, {**record, "reason": "frozen layers changed during training"})

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, zip(plan, seeds)))
    store.write_heartbeat({"running": [j.key for j, s in plan if s == "running"], "done": n_done, "failed": len(failed),
                           "dashboard": "http://127.0.0.1:8265"})
    sizes = [i[1] for i in store._list("jobs").values()]
    return {"done": n_done - len(failed), "failed": len(failed), "running": n_running, "write_s": time.perf_counter() - t0,
            "record_bytes": sum(sizes) / max(1, len(sizes))}


def same(x, y) -> bool:
    """Equal, floats to 1e-9 relative (sums taken in another order: today's code adds in listing order)."""
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
        return len(x) == len(y) and all(same(a, b) for a, b in zip(x, y))
    if isinstance(x, float) and isinstance(y, float):
        return math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12) or (math.isnan(x) and math.isnan(y))
    return x == y


def upload(local: str, storage: str) -> dict:
    """The local job store copied to `storage` as it is (the store's own writes cost a dozen requests a
    record: 15 minutes for 5,000 on a loaded moto server), minus the local index."""
    import pyarrow.fs

    from raytransfer.sweep import index
    from raytransfer.sweep.store import JobStore

    source, dest = JobStore(local), JobStore(storage)
    source._delete(f"{source.root}/{index.INDEX}")
    t0 = time.perf_counter()
    pyarrow.fs.copy_files(source.root, dest.root, source_filesystem=source.fs, destination_filesystem=dest.fs,
                          use_threads=True)
    sizes = [i[1] for i in dest._list("jobs").values()]
    beat = dest.read_heartbeat()
    return {"done": len(sizes), "failed": len(dest._list("failed")), "running": len(beat["running"]),
            "write_s": time.perf_counter() - t0, "record_bytes": sum(sizes) / max(1, len(sizes))}


def cli_status(storage: str) -> float:
    """Seconds of `raytransfer status STORAGE` in a fresh process (imports included), the index fresh."""
    exe = Path(sys.executable).with_name("raytransfer")
    t0 = time.perf_counter()
    subprocess.run([str(exe), "status", storage], check=True, stdout=subprocess.DEVNULL, env=os.environ.copy())
    return time.perf_counter() - t0


def timed(fn, *a, **kw):
    t0 = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t0


def bench_status(storage: str, old, rows: list, label: str, jobs):
    from raytransfer.sweep import index
    from raytransfer.sweep.status import sweep_status
    from raytransfer.sweep.store import JobStore

    store = JobStore(storage)
    store._delete(f"{store.root}/{index.INDEX}")
    now = time.time()
    before, t_old = timed(old["status"].sweep_status, storage, now)
    missing, t_missing = timed(sweep_status, storage, now)
    fresh, t_fresh = timed(sweep_status, storage, now)
    for name, got in (("no index", missing), ("index fresh", fresh)):
        bad = [k for k in before if not same(got.get(k), before[k])]
        assert not bad, f"{label}: status ({name}) differs from status from the records in {bad}: " + \
            "; ".join(f"{k}: {str(got.get(k))[:300]} vs {str(before[k])[:300]}" for k in bad)
    size = store.fs.get_file_info(f"{store.root}/{index.INDEX}").size
    rows += [(label, "status, today's code (every record + every attempt)", t_old, None),
             (label, "status, no index yet (rebuilt from the records, written)", t_missing, t_old / t_missing),
             (label, f"status, index fresh ({size / 1e6:.2f} MB gzip)", t_fresh, t_old / t_fresh)]
    # 10 more records after the index: stale; the answer must match the records again
    extra = jobs[-10:]                               # waiting jobs: no record yet
    assert all(store.read(j.key) is None for j in extra)
    rng = random.Random(1)
    for j in extra:
        store.write(j.key, fake_record(j, store, rng, 450, now))
    stale, t_stale = timed(sweep_status, storage, now)
    again = sweep_status(storage, now, index=False)
    assert stale == again, f"{label}: status from a stale index differs from status from the records"
    rows.append((label, "status, index stale (10 records newer)", t_stale, t_old / t_stale))
    rows.append((label, "`raytransfer status` end to end, a fresh process (index fresh)", cli_status(storage), None))
    for j in extra:
        store.forget(j.key)
    sweep_status(storage, now)                       # the index follows the forgotten records again


def bench_storage(storage: str, rows: list, label: str):
    from raytransfer.sweep.store import JobStore

    store = JobStore(storage)
    listing, t_list = timed(store._list, "jobs")
    paths = [f"{store.root}/jobs/{k}.json" for k in listing]
    _, t_seq = timed(lambda: [store._read_json(p) and None for p in paths])
    _, t_par = timed(store._read_many, paths, then=lambda r: None)
    rows += [(label, f"list {len(listing)} records (one listing)", t_list, None),
             (label, f"read {len(paths)} records one by one", t_seq, None),
             (label, f"read {len(paths)} records, {16} at a time", t_par, t_seq / t_par)]


def bench_dry_run(old, argv: list[str], grid, rows: list, label: str):
    from raytransfer.sweep import index, runner
    from raytransfer.sweep.store import JobStore

    p = argparse.ArgumentParser()
    runner.add_sweep_args(p)

    def dry(module):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            module.run(grid[0], p.parse_args(argv), "full_paper", grid[1])
        return buf.getvalue()

    text_old, t_old = timed(dry, old["runner"])
    text_new, t_new = timed(dry, runner)                       # the index fresh (status wrote it)
    store = JobStore(argv[argv.index("--storage") + 1])
    store._delete(f"{store.root}/{index.INDEX}")
    text_none, t_none = timed(dry, runner)                     # no index: a dry run reads, never writes
    assert text_old == text_new == text_none, f"{label}: the dry run's output changed"
    rows += [(label, f"--dry-run, today's code ({text_new.count(chr(10))} lines)", t_old, None),
             (label, "--dry-run, index fresh", t_new, t_old / t_new),
             (label, "--dry-run, no index", t_none, t_old / t_none)]
    from raytransfer.sweep.status import sweep_status
    sweep_status(store.storage)                                # leave the index written for the next steps


def simulate(cls, jobs, concurrency: int = 64, polls: int = 3, **kwargs) -> dict:
    """A whole sweep against one searcher: fill up to `concurrency`, `polls` idle asks while nothing is
    ready, then the oldest trial ends done (each of its jobs: a cohort's outcomes); until FINISHED. Times every
    call; returns the hand-out order (a trial's first job) and the jobs a trial got."""
    from ray.tune.search import Searcher

    s = cls(jobs, done={}, **kwargs)
    sizes = []
    running, order, t_suggest, t_idle, t_complete = deque(), [], [], [], []
    n, finished = 0, False
    while not finished:
        while len(running) < concurrency:
            t0 = time.perf_counter()
            cfg = s.suggest(f"t{n}")
            dt = time.perf_counter() - t0
            if cfg == Searcher.FINISHED:
                finished = not running
                break
            if cfg is None:
                t_idle.append(dt)
                for _ in range(polls):
                    t0 = time.perf_counter()
                    assert s.suggest(f"t{n}") is None
                    t_idle.append(time.perf_counter() - t0)
                break
            t_suggest.append(dt)
            order.append(cfg["job_key"])
            keys = [j["job_key"] for j in cfg.get("jobs", [cfg])]
            sizes.append(len(keys))
            running.append((f"t{n}", keys))
            n += 1
        if running:
            tid, keys = running.popleft()
            outcomes = json.dumps({k: {"weights_uri": f"/w/{k}"} for k in keys})
            t0 = time.perf_counter()
            s.on_trial_complete(tid, {"weights_uri": f"/w/{keys[0]}", "outcomes": outcomes})   # (today's: the first)
            t_complete.append(time.perf_counter() - t0)
    state = s.get_state()
    blob, t_pickle = timed(pickle.dumps, state)
    return {"order": order, "suggest": t_suggest, "idle": t_idle, "complete": t_complete, "state_bytes": len(blob),
            "pickle_s": t_pickle, "sizes": sizes}


def idle_polls(cls, jobs, polls: int = 200) -> float:
    """Seconds per ask while every base is handed out and still training (all transfers wait): the ask Tune
    repeats about ten times a second for as long as the bases train."""
    s = cls(jobs, done={})
    i = 0
    while s.suggest(f"t{i}") is not None:
        i += 1
    t0 = time.perf_counter()
    for _ in range(polls):
        s.suggest("idle")
    return (time.perf_counter() - t0) / polls


def bench_searcher(old, jobs, rows: list):
    from raytransfer.sweep.searcher import DependencySearcher

    a = simulate(old["searcher"].DependencySearcher, jobs)
    b = simulate(DependencySearcher, jobs)
    assert a["order"] == b["order"] and len(b["order"]) == len(jobs), "the searchers handed out different jobs"
    label = f"searcher, {len(jobs)} jobs"
    for what in ("suggest", "complete"):
        ta, tb = a[what], b[what]
        mean_a, mean_b = sum(ta) / len(ta), sum(tb) / len(tb)
        name = "suggest (a job handed out)" if what == "suggest" else "on_trial_complete"
        rows += [(label, f"{name}: mean, today's code", mean_a, None), (label, f"{name}: mean", mean_b, mean_a / mean_b),
                 (label, f"{name}: max, today's code", max(ta), None), (label, f"{name}: max", max(tb), max(ta) / max(tb))]
    whole_a = sum(a["suggest"]) + sum(a["idle"]) + sum(a["complete"])
    whole_b = sum(b["suggest"]) + sum(b["idle"]) + sum(b["complete"])
    rows += [(label, "the whole sweep's decisions, today's code", whole_a, None),
             (label, "the whole sweep's decisions", whole_b, whole_a / whole_b)]
    c = simulate(DependencySearcher, jobs, cohort_size=None, slots=64)      # the sweep's default: cohorts
    assert sum(c["sizes"]) == len(jobs), "the cohorts did not hand out every job once"
    cohort_label = f"{label}, cohorts ({len(c['sizes'])} trials, up to {max(c['sizes'])} jobs each)"
    rows += [(cohort_label, "suggest (a cohort handed out): mean", sum(c["suggest"]) / len(c["suggest"]), None),
             (cohort_label, "suggest (a cohort handed out): max", max(c["suggest"]), None),
             (cohort_label, "the whole sweep's decisions", sum(c["suggest"]) + sum(c["idle"]) + sum(c["complete"]),
              None)]
    ia, ib = idle_polls(old["searcher"].DependencySearcher, jobs), idle_polls(DependencySearcher, jobs)
    rows += [(label, "idle ask while the bases train, today's code", ia, None),
             (label, "idle ask while the bases train", ib, ia / ib),
             (label, f"state Tune snapshots: {b['state_bytes'] / 1e6:.1f} MB pickled", b["pickle_s"], None)]


def show(rows: list, since: int) -> int:
    """Print the rows from `since` on (a long run shows its numbers as they come); returns the new end."""
    for where, what, sec, ratio in rows[since:]:
        print(f"[scale]   {where}: {what}: {sec:.4g} s" + (f" ({ratio:.1f}x)" if ratio else ""), flush=True)
    return len(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train-seeds", default="0-17", help="training seeds of the paper grid (0-17: 4,968 jobs)")
    p.add_argument("--evals", type=int, default=450, help="evaluations in each record's epoch log (paper: 450)")
    p.add_argument("--no-s3", action="store_true", help="the local filesystem only")
    p.add_argument("--baseline", default=BASELINE, help="the commit whose code is 'today's code'")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    p.add_argument("--parts", default="searcher,storage,status,dry-run", help="which of the four to run")
    args = p.parse_args(argv)
    import logging
    logging.basicConfig(level=logging.WARNING)
    from raytransfer.prepare import prepare
    from raytransfer.synthetic import SyntheticSpec

    old = load_baseline(args.baseline)
    tmp = Path(tempfile.mkdtemp(prefix="rtscale-"))
    rows, server = [], None
    try:
        data = tmp / "data"
        _, t_prep = timed(prepare, "synthetic", None, data, synthetic=SyntheticSpec(**SYNTHETIC))
        storages = [("local", str(tmp / "store"))]
        if not args.no_s3:
            sys.path.insert(0, str(ROOT / "tests"))
            from s3server import S3Server
            server = S3Server().start()
            os.environ.update(server.env)
            server.create_bucket("rt-scale")
            storages.append(("s3 (moto)", "s3://rt-scale/raytransfer"))
        jobs, _, grid = build_grid(grid_args(data, storages[0][1], tmp / "out", args.train_seeds))
        print(f"[scale] {len(jobs)} jobs (paper grid, train seeds {args.train_seeds}); dataset prepared in {t_prep:.1f} s",
              flush=True)
        parts = set(args.parts.split(","))
        if "searcher" in parts:
            bench_searcher(old, jobs, rows)
        shown = show(rows, 0)
        for label, storage in storages:
            if storage.startswith("s3://"):              # the local store's files, one PUT each (16 at a time)
                info = upload(storages[0][1], storage)
            else:
                info = write_store(storage, jobs, args.evals)
            print(f"[scale] {label}: wrote {info['done']} done, {info['failed']} failed, {info['running']} running "
                  f"records ({info['record_bytes'] / 1e3:.0f} kB each) in {info['write_s']:.0f} s", flush=True)
            if "storage" in parts:
                bench_storage(storage, rows, label)
                shown = show(rows, shown)
            if "status" in parts:
                bench_status(storage, old, rows, label, jobs)
                shown = show(rows, shown)
            if "dry-run" in parts:
                bench_dry_run(old, grid_args(data, storage, tmp / "out", args.train_seeds), grid, rows, label)
                shown = show(rows, shown)
    finally:
        if server is not None:
            server.stop()
        if args.keep:
            print(f"[scale] kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n| where | what | seconds | today's / new |\n|---|---|---:|---:|")
    for where, what, s, ratio in rows:
        print(f"| {where} | {what} | {s:.4g} | {f'{ratio:.1f}x' if ratio else ''} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
