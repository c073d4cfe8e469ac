"""The sweep driver: one `Tuner.fit()` over a grid of jobs, bases shared, finished jobs skipped.

A sweep file (sweeps/full_paper.py) defines its grid as Ray Tune `grid_search` axes and calls
`main(GRID)`. The driver: [1] checks every input before anything trains, [2] prepares the dataset
and builds the jobs and their keys, [3] starts (or joins) Ray and the weights registry, [4] runs one
Tuner with the dependency searcher (or restores it with --resume), [5] writes the results table and
the report into the experiment folder.

    python sweeps/full_paper.py --dry-run
    python sweeps/full_paper.py --scale smoke --out /tmp/smoke
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from ..models import ARCHITECTURES
from ..recipes import RECIPES, Recipe, get_recipe, parse_overrides, reduced_recipe
from ..synthetic import SyntheticSpec
from .errors import SweepError
from .monitor import LiveReport, MLflowJobs, check_tracking_uri
from .jobs import (DIAGNOSTICS, DIRECTIONS, PAPER_REDUCED_K, SPLIT_FILE, SPLIT_GRADED, SPLIT_KINDS, TREATMENTS,
                   Dataset,
                   DiagnosticSettings, Job, build_diagnostic_jobs, build_jobs, describe_n_range, expand_axes, n_range)
from .results import _atomic, write_diagnostics, write_results
from .settings import RunSettings
from .storage import check_remote, resume_hint, unavailable
from .store import JobStore, _split_uri

log = logging.getLogger("raytransfer.sweep")


@dataclass(frozen=True)
class Scale:
    recipe: str
    synthetic: SyntheticSpec | None        # the built-in dataset at this scale (None: needs --data)
    split_seeds: tuple = (0,)
    reduced_k: tuple = ()                  # reduced-volume jobs (images per class, 0: all) the grid gets by default
    train_seeds: tuple = (0,)              # training seeds the grid gets by default (--train-seeds overrides)
    n: tuple | None = None                 # layers copied where the sweep file says "all" (None: every one)
    diagnostics: tuple = ()                # --diagnostics by default at this scale
    diagnostic_settings: DiagnosticSettings = DiagnosticSettings()


ALL_DIAGNOSTICS = tuple(DIAGNOSTICS)
SCALES = {
    # smoke: off unless asked (--diagnostics all); then tiny subsamples, so a test sweep stays fast
    "smoke": Scale("smoke", SyntheticSpec(superclasses_per_family=2, classes_per_superclass=3, train_per_class=60,
                                          val_per_class=20),
                   diagnostic_settings=DiagnosticSettings(val_images=100, train_images=300, batch_size=50)),
    # demo: 24 classes, 12 a half (4 superclasses of 3 classes per family: random halves share superclasses,
    # the family halves none), 96 training and 40 validation images a class (a half that converges in a CPU
    # budget; with 48 the bases were 10-15 points lower and moved 7 points from seed to seed, which swamped
    # the findings; 480 validation images keep an evaluation's noise near 2 points). Three training seeds:
    # each finding rests on paired differences over units of split x training seed, and an interval needs
    # several; so that converged nets fit a 2-core budget, every other layer (n = 1, 3, 5, 7; --n 1-7 for all
    # seven). Diagnostics on: 5-12 s of CPU per split x seed (benchmarks/RESULTS.md)
    "demo": Scale("demo", SyntheticSpec(classes_per_superclass=3, train_per_class=96, val_per_class=40),
                  train_seeds=(0, 1, 2),
                  n=(1, 3, 5, 7), diagnostics=ALL_DIAGNOSTICS),
    # paper/fast: diagnostics off unless asked; cheap beside the networks (forward passes of a few thousand images)
    "paper": Scale("paper", None, (0, 1, 2, 3), PAPER_REDUCED_K),
    "fast": Scale("fast", None, (0, 1, 2, 3)),
}


def add_sweep_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("grid (override the sweep file's axes)")
    g.add_argument("--splits", help=f"comma list of {', '.join(SPLIT_KINDS)} and graded:LEVEL (between the two: "
                                    "graded:1/6 swaps a sixth of half A's classes for the other family's)")
    g.add_argument("--split-file", action="append", type=Path, metavar="FILE.json",
                   help="a split manifest written by `raytransfer split` (any --kind, file included) as one more "
                        "split of the grid, labelled by its file name; repeatable. Without --splits the grid's "
                        "splits are these files alone")
    g.add_argument("--seeds", help="similar-split seeds, e.g. 0,1,2,3 (the paper's four random halves)")
    g.add_argument("--train-seeds", help="training seeds (initialisation and data order), e.g. 0,1,2")
    g.add_argument("--n", help="layers copied, e.g. 1-7 or 1,3,5 (default: all, 1 .. layers - 1 of --arch)")
    g.add_argument("--treatments", help=f"comma list of {', '.join(TREATMENTS)}; TREATMENT:N (or :LO-HI) runs that one "
                                        "at those n of the grid alone, e.g. BnB,BnB+:7 (BnB+ at n = 7: the second "
                                        "schedule's control)")
    g.add_argument("--directions", choices=sorted(DIRECTIONS), help="AtoB: target B; BtoA: target A; both")
    g.add_argument("--reduced-k", metavar="K,...",
                   help="reduced-volume nets on all classes, the first k training images of each (0: all), with "
                        "the reduced solver at paper scale, e.g. 1,2,5,10; 'none' for none (default: the paper's "
                        "1,2,5,10,25,50,100,250,500,750,1000,0 at --scale paper, none elsewhere)")
    p.add_argument("--diagnostics", metavar="KINDS",
                   help=f"measurements beside the grid, as jobs of the same sweep: comma list of {', '.join(DIAGNOSTICS)}, "
                        "'all' or 'none' (default: all at demo scale, none at smoke, paper and fast scale). cka: layer "
                        "similarity of baseA vs baseB and of each transfer vs its base; probe: linear probes on baseA's "
                        "layers; estimators: H-score, LogME, LEEP of baseA's layers on half B")
    p.add_argument("--scale", default="demo", help=f"one of {', '.join(SCALES)} (recipe and built-in data size)")
    p.add_argument("--recipes", metavar="NAME,...",
                   help="train the grid with each of these recipes, one arm each (their jobs keyed apart), e.g. "
                        "demo,demo_lrn: the demo beside the paper's normalisation (LRN, dropout on fc6/fc7); the "
                        "report answers co-adaptation per arm (default: the scale's recipe; `raytransfer recipes` "
                        "lists them)")
    p.add_argument("--data-seed", type=int, metavar="SEED",
                   help="the built-in dataset's generator seed (default 0): another seed draws other classes and "
                        "images, so its jobs have other keys; for the built-in data only")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE", dest="set",
                   help="override one field of every recipe the sweep runs (the reduced-volume solver too), e.g. "
                        "--set iterations=300 --set width=0.125; repeatable; `raytransfer recipes` lists the fields. "
                        "An override is part of each job's key and its results row (column recipe_set)")
    p.add_argument("--until-plateau", type=int, metavar="MAX_EPOCHS",
                   help="train every net until its validation top-1 plateaus (then the rate x gamma, again, as many "
                        "times as the recipe has milestones) instead of the recipe's fixed schedule, at most "
                        "MAX_EPOCHS epochs: for your own data, when the report says a base did not converge")
    p.add_argument("--arch", choices=ARCHITECTURES, default=None,
                   help="the network of every job: caffenet (the paper's, default) or resnet18 (torchvision's, "
                        "at the recipe's width); its layer table sets the n range")
    p.add_argument("--data", type=Path, help="a prepared dataset folder (raytransfer prepare); default: built-in synthetic")
    p.add_argument("--out", type=Path, help="experiment folder for results and report (default results/<sweep>-<scale>)")
    p.add_argument("--storage", help="where the job store, checkpoints and Tune state live: a path or s3://... (default: "
                        "--out); s3:// reads AWS_ENDPOINT_URL and the AWS credential variables, and waits out an "
                        "outage for up to RAYTRANSFER_STORAGE_WAIT_S seconds (600)")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--gpus-per-trial", type=float, default=None,
                   help="GPUs per worker, fractions allowed for small nets (default: 1 if the cluster has or can "
                        "launch GPU nodes, else 0)")
    p.add_argument("--workers-per-trial", type=int, default=1, help="Ray Train DDP workers per trial")
    p.add_argument("--cpus-per-trial", type=float, default=None,
                   help="CPUs per worker (loader threads; default: from the node: a GPU worker gets its GPU node "
                        "type's CPUs per GPU, e.g. 12 on a g5.12xlarge; a CPU worker 1)")
    p.add_argument("--host", choices=["auto", "process", "train"], default="auto",
                   help="run the loop in the trial's process or under Ray Train (auto: train for more than one worker)")
    p.add_argument("--cohort-size", type=int, default=None, metavar="N",
                   help="most jobs one trial trains from one batch stream (a cohort: the ready jobs of one target "
                        "half, recipe, training seed and input; shared input, frozen layers run once); default: "
                        "every ready job of the stream, as many as fit the trial's memory; 1: one job a trial")
    p.add_argument("--max-failures", type=int, default=2,
                   help="retries of a job after its first attempt, whatever restarted it (from its last checkpoint)")
    p.add_argument("--checkpoint-minutes", type=float, default=10.0,
                   help="minutes of training between a trial's checkpoints (0: every epoch); one more at the end")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="most trials at once (default: as many as the cluster has or its autoscaler can launch)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    p.add_argument("--no-dashboard", action="store_true", help="do not start the Ray dashboard (local Ray)")
    p.add_argument("--no-report", action="store_true", help="skip building report.html")
    p.add_argument("--report-every", type=float, default=3.0,
                   help="minutes between rebuilds of results.csv and report.html while the sweep runs (0: at the end only)")
    p.add_argument("--mlflow", metavar="URI", help="log every job as one MLflow run to this tracking URI")
    p.add_argument("--mlflow-experiment", help="MLflow experiment name (default: the sweep's name)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted sweep in --out/--storage")
    p.add_argument("--dry-run", action="store_true", help="print the job table and an estimate; train nothing")


def _ints(text: str, what: str) -> list[int]:
    out = []
    try:
        for part in text.split(","):
            if "-" in part:
                lo, hi = part.split("-")
                out += list(range(int(lo), int(hi) + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise SweepError(f"--{what} {text!r} is not a list of integers (e.g. 1-7 or 1,3,5)") from None
    return out


def _names(text: str, allowed, what: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in allowed]
    if bad or not names:
        raise SweepError(f"unknown {what} {bad[0] if bad else text!r}; expected one of {', '.join(allowed)}")
    return names


def _split_names(text: str) -> list[str]:
    """--splits: built-in kinds and graded:LEVEL entries (levels checked against the data later)."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    graded = [t for t in names if t.startswith(SPLIT_GRADED)]
    rest = [t for t in names if not t.startswith(SPLIT_GRADED)]
    if rest or not graded:
        _names(",".join(rest) or text, SPLIT_KINDS + ("graded:LEVEL",), "split kind")
    return names


def diagnostic_kinds(args, scale: Scale) -> tuple:
    """--diagnostics as a tuple of kinds (the scale's default when not given)."""
    if args.diagnostics is None:
        return scale.diagnostics
    if args.diagnostics.strip() == "none":
        return ()
    if args.diagnostics.strip() == "all":
        return ALL_DIAGNOSTICS
    return tuple(_names(args.diagnostics, list(DIAGNOSTICS) + ["all", "none"], "diagnostic"))


def apply_overrides(grid: dict, args, arch: str = "caffenet") -> dict:
    """The sweep file's axes with the command line's subsets, each checked; n "all" (the sweep file's
    default; at demo scale the scale's n) or "every" becomes every n of the architecture's table."""
    from ray import tune

    grid = dict(grid)
    if args.splits or args.split_file:
        kinds = _split_names(args.splits) if args.splits else []
        for f in args.split_file or []:
            if not f.is_file():
                raise SweepError(f"--split-file {f} does not exist: make it with `raytransfer split DATA_DIR --kind "
                                 f"similar|dissimilar|file ... --out {f}`")
        grid["split"] = tune.grid_search(kinds + [f"{SPLIT_FILE}{f.resolve()}" for f in args.split_file or []])
    if args.seeds:
        grid["split_seed"] = tune.grid_search(_ints(args.seeds, "seeds"))
    if args.train_seeds:
        grid["seed"] = tune.grid_search(_ints(args.train_seeds, "train-seeds"))
    if args.n:
        ns = _ints(args.n, "n")
        bad = [n for n in ns if n not in n_range(arch)]
        if bad:
            raise SweepError(f"--n {bad[0]} is outside {describe_n_range(arch)}: n counts the layers copied")
        grid["n"] = tune.grid_search(ns)
    if grid.get("n") in ("all", "every"):          # "every": each n of the arch at every scale too
        grid["n"] = tune.grid_search(list(n_range(arch)))
    if args.treatments:
        names = [t.split(":")[0] for t in args.treatments.split(",")]
        grid["treatment"] = tune.grid_search(_names(",".join(names), TREATMENTS, "treatment"))
    if args.directions:
        grid["target"] = tune.grid_search(list(DIRECTIONS[args.directions]))
    return grid


def restrict_treatments(axes: list[dict], treatments: str | None) -> list[dict]:
    """--treatments' TREATMENT:N entries: that treatment at those n alone (each n must be one of the grid's)."""
    only = {}
    for entry in (treatments or "").split(","):
        name, sep, ns = entry.strip().partition(":")
        if sep:
            only[name] = set(_ints(ns, "treatments " + entry.strip()))
    for name, ns in only.items():
        grid_ns = {int(a["n"]) for a in axes if a["treatment"] == name}
        if not ns <= grid_ns:
            raise SweepError(f"--treatments {name}:{','.join(map(str, sorted(ns)))}: n = {min(ns - grid_ns)} is not in "
                             f"the grid's n ({', '.join(map(str, sorted(grid_ns)))}); add it to --n")
    return [a for a in axes if a["treatment"] not in only or int(a["n"]) in only[a["treatment"]]]


def reduced_k_of(args, scale: Scale) -> tuple:
    """The grid's reduced-volume k: --reduced-k, else the scale's (the paper's twelve at paper scale)."""
    if args.reduced_k is None:
        return scale.reduced_k
    if args.reduced_k.strip() == "none":
        return ()
    ks = _ints(args.reduced_k, "reduced-k")
    if any(k < 0 for k in ks):
        raise SweepError(f"--reduced-k {args.reduced_k}: k counts training images per class (0: all of them)")
    return tuple(dict.fromkeys(ks))


def resolve_dataset(args, scale: Scale, cache: Path) -> Dataset:
    """The prepared dataset: --data, or the built-in synthetic one (prepared once per machine)."""
    from ..prepare import DatasetError, prepare, read_manifest

    if args.data is not None:
        if not args.data.exists():
            raise SweepError(f"--data {args.data} does not exist: check the path")
        try:
            manifest = read_manifest(args.data)
        except DatasetError as e:
            raise SweepError(str(e)) from None
        data_dir = args.data
    elif scale.synthetic is None:
        raise SweepError(f"--scale {args.scale} trains the paper's net at 227 px: give --data, a prepared ImageNet "
                         "(raytransfer prepare imagenet ... --out DIR)")
    else:
        spec = synthetic_spec(args, scale)
        digest = hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode()).hexdigest()[:8]
        data_dir = cache / f"synthetic-{digest}"
        try:
            manifest = prepare("synthetic", None, data_dir, resolution=None, synthetic=spec)
        except (OSError, DatasetError) as e:        # e.g. no space: free what was half written, say where
            for partial in Path(data_dir).glob("*.partial"):
                partial.unlink(missing_ok=True)
            raise SweepError(f"cannot prepare the built-in dataset in {data_dir}: {e} (that folder is under "
                             f"RAYTRANSFER_CACHE={cache}: fix it there or point the variable elsewhere)") from None
    return Dataset(str(Path(data_dir).resolve()), manifest["name"], manifest["fingerprint"], manifest["classes"],
                   manifest.get("superclass_order"),
                   synthetic=spec.to_dict() if args.data is None else None)


def synthetic_spec(args, scale: Scale) -> SyntheticSpec:
    """The built-in dataset of the scale, drawn with --data-seed's generator seed where one is given."""
    seed = getattr(args, "data_seed", None)
    return scale.synthetic if seed is None else replace(scale.synthetic, seed=seed)


def sweep_recipes(args, scale: Scale) -> list[Recipe]:
    """The recipes of the sweep, each with the command line's overrides (--set, --arch, --until-plateau): --recipes,
    else the scale's own. One error, before anything trains, for an unknown name, an override a recipe does not
    take, or recipes of different architectures (their layer tables set the grid's n)."""
    names = list(dict.fromkeys(_names(args.recipes, RECIPES, "recipe"))) if args.recipes else [scale.recipe]
    overrides = {**parse_overrides(args.set), **({"arch": args.arch} if args.arch else {}),
                 **({"schedule": "plateau", "until_plateau": args.until_plateau} if args.until_plateau else {})}
    recipes = [get_recipe(name, **overrides) for name in names]
    for recipe in recipes:
        reduced_recipe(recipe).check()              # an override must suit the reduced-volume solver too
    archs = sorted({r.arch for r in recipes})
    if len(archs) > 1:
        raise SweepError(f"--recipes {args.recipes}: the recipes train different architectures ({', '.join(archs)}); "
                         "give recipes of one architecture, or --arch to train them all on one")
    return recipes


def build_arms(axes: list[dict], dataset: Dataset, recipes: list[Recipe], reduced_k=(), diagnostics=(),
               settings: DiagnosticSettings = DiagnosticSettings()) -> tuple[list[Job], dict]:
    """The grid's jobs for each recipe (an arm: its own bases, transfers and diagnostics; keys apart, as a key
    hashes the recipe), bases of every arm first; and the grid's splits by label."""
    jobs, splits = [], {}
    for recipe in recipes:
        arm, arm_splits = build_jobs(axes, dataset, recipe, reduced_k)
        jobs += arm + build_diagnostic_jobs(arm, diagnostics, settings)
        splits.update(arm_splits)
    jobs = list({j.key: j for j in jobs}.values())
    return sorted(jobs, key=lambda j: j.base_key is not None or j.treatment not in ("baseA", "baseB", "netbase")), splits


def check_resolution(dataset: Dataset, recipe: Recipe) -> str | None:
    """The recipe's image side against the dataset's stored one: one error where the loader would have to
    enlarge images past the crop, a note where it resizes them (once, into memory, or on the fly), None where
    they agree."""
    from ..loaders import STORE_INPUTS, CropSpec, crop_window, store_side
    from ..prepare import read_manifest

    manifest = read_manifest(dataset.data_dir)
    stored, want = manifest["settings"]["resolution"], recipe.resize_size
    if stored == want:
        return None
    command = prepare_command(manifest, dataset.data_dir, want)
    if stored is None or stored < recipe.crop_size:
        held = "images of any size" if stored is None else f"{stored} px images"
        raise SweepError(f"--data {dataset.data_dir} holds {held}; recipe {recipe.name} cuts {recipe.crop_size} px "
                         f"crops from {want} px images and never enlarges a stored image past its crop: prepare "
                         f"the dataset at {want} px, `{command}`, and rerun with that --data")
    crop = CropSpec(recipe.crop, recipe.crop_size, want)
    side = store_side(stored, crop, recipe.normalize) if recipe.input in STORE_INPUTS else None
    if side is not None and side != stored:
        return (f"{dataset.data_dir} holds {stored} px images; recipe {recipe.name} cuts {recipe.crop_size} px crops "
                f"from {want} px images, so each node shrinks the images to {side} px once, as it loads them into "
                f"memory (its pixel store)")
    window = crop_window(stored, crop)
    return (f"{dataset.data_dir} holds {stored} px images; recipe {recipe.name} cuts {recipe.crop_size} px crops from "
            f"{want} px images, so the loader resizes each crop on the fly ({window} px of the stored image to "
            f"{recipe.crop_size} px). To load faster, store them at {want} px: `{command}`")


def check_batches(networks: list[Job], dataset: Dataset, workers: int = 1) -> str | None:
    """The error to stop on where a job's half (or its first k images a class) holds fewer training images than
    one batch: its loader would drop that partial batch and the net would never take a step (None: none does)."""
    from ..prepare import read_manifest

    manifest = read_manifest(dataset.data_dir)
    per_class = dict(zip((c["id"] for c in manifest["classes"]), manifest["counts"]["train"]["per_class"]))
    short = []
    for job in networks:
        k, batch = job.spec.get("k") or 0, int(job.spec["recipe"]["batch_size"])
        images = sum(min(k, per_class[c]) if k else per_class[c] for c in job.spec["target_classes"])
        if images < batch or images // workers < batch // workers:
            short.append((images, batch, job.key))
    if not short:
        return None
    images, batch, key = min(short)
    return (f"{len(short)} jobs train on fewer images than one batch, e.g. {key}: {images} training images at batch "
            f"{batch}, so it would never take a step; give a smaller batch (--set batch_size="
            f"{max(1, images // max(1, workers))} or less) or more images a class (a larger --reduced-k, more data)")


def drop_dissimilar_without_superclasses(grid: dict, dataset: Dataset) -> tuple[dict, str | None]:
    """The sweep file's split axis without "dissimilar" where the dataset cannot make it (no superclass
    tags), and a note saying so and how to get it; --splits dissimilar asked explicitly is an error instead."""
    from ray import tune

    from .jobs import why_no_dissimilar

    kinds = grid["split"].get("grid_search", []) if isinstance(grid.get("split"), dict) else []
    why = why_no_dissimilar(dataset) if "dissimilar" in kinds and len(kinds) > 1 else None
    if why is None:
        return grid, None
    return ({**grid, "split": tune.grid_search([k for k in kinds if k != "dissimilar"])},
            f"no dissimilar split in this grid: it {why}")


def prepare_command(manifest: dict, data_dir: str, resolution: int) -> str:
    """The `raytransfer prepare` command that writes this dataset again at another stored side."""
    from ..prepare import reprepare_command

    return reprepare_command(manifest, data_dir, resolution)


def print_job_table(jobs: list[Job], done: dict, out=None):
    out = out or sys.stdout                         # looked up now: redirections (and pytest's capsys) see it
    print(f"{'job':<58} {'status':<7} depends on", file=out)
    for j in jobs:
        deps = j.base_key or (j.deps[0] if len(j.deps) == 1 else
                              f"{len(j.deps)} nets: {', '.join(j.deps[:2])}, ..." if j.deps else "-")
        print(f"{j.key:<58} {'done' if j.key in done else 'to run':<7} {deps}", file=out)
    d = sum(j.key in done for j in jobs)
    print(f"{len(jobs)} jobs, {d} done, {len(jobs) - d} to run", file=out)


def grid_digest(jobs) -> str:
    return hashlib.sha256("\n".join(sorted(j.key for j in jobs)).encode()).hexdigest()[:10]


def main(grid: dict, argv=None, name: str = "sweep", split_treatments: dict | None = None) -> int:
    """Run the sweep file's grid. `split_treatments` ({split kind: [treatments]}) narrows the treatment axis on
    those splits (the paper ran its dissimilar split with frozen transfers only); --treatments lifts it."""
    parser = argparse.ArgumentParser(prog=f"{name}.py", description=(sys.modules["__main__"].__doc__ or "").split("\n")[0])
    add_sweep_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from ..cli import user_errors

    try:
        return run(grid, args, name, split_treatments)
    except user_errors() as e:           # the user's input (SweepError, DatasetError, ...): one line; a bug: its traceback
        print(f"{name}.py: error: {e}", file=sys.stderr)
        return 2


def run(grid: dict, args, name: str, split_treatments: dict | None = None) -> int:
    # [1] check the inputs that need no cluster
    if args.scale not in SCALES:
        raise SweepError(f"unknown scale {args.scale!r}; expected one of {', '.join(SCALES)}")
    scale = SCALES[args.scale]
    if args.until_plateau is not None and args.until_plateau < 1:
        raise SweepError(f"--until-plateau {args.until_plateau}: give the most epochs a net may train, a positive "
                         "number (e.g. --until-plateau 90)")
    if args.data_seed is not None and (args.data is not None or scale.synthetic is None):
        raise SweepError(f"--data-seed draws the built-in dataset; {'--data ' + str(args.data) if args.data else '--scale ' + args.scale} "
                         "trains on a prepared dataset: drop --data-seed")
    recipes = sweep_recipes(args, scale)
    recipe = recipes[0]                             # the first arm: the grid's n range, the report's main setting
    from ray import tune
    if "split_seed" not in grid:                    # the paper's 4 random splits at paper scale, one at demo scale
        grid = {**grid, "split_seed": tune.grid_search(list(scale.split_seeds))}
    if "seed" not in grid:                          # three training seeds at demo scale, one elsewhere
        grid = {**grid, "seed": tune.grid_search(list(scale.train_seeds))}
    if grid.get("n") == "all" and not args.n and scale.n:      # the scale's layers (demo: 1, 3, 5, 7)
        grid = {**grid, "n": tune.grid_search([n for n in scale.n if n in n_range(recipe.arch)])}
    grid = apply_overrides(grid, args, recipe.arch)
    out = (args.out or Path("results") / f"{name}-{args.scale}").resolve()
    storage = args.storage or str(out)
    if "://" not in storage:
        storage = os.path.abspath(os.path.expanduser(storage))
    if (args.gpus_per_trial or 0) < 0 or args.workers_per_trial < 1 or (args.cpus_per_trial or 1) <= 0:
        raise SweepError("--gpus-per-trial must be >= 0, --workers-per-trial >= 1 and --cpus-per-trial > 0")
    if args.checkpoint_minutes < 0 or args.max_failures < 0 or (args.max_concurrent is not None and args.max_concurrent < 1):
        raise SweepError("--checkpoint-minutes and --max-failures must be >= 0, --max-concurrent >= 1")
    if args.cohort_size is not None and args.cohort_size < 1:
        raise SweepError(f"--cohort-size {args.cohort_size}: give the most jobs a trial may train together, 1 or "
                         "more (1: one job a trial)")
    if args.mlflow:                                 # a URI MLflow refuses: now, not one warning once jobs run
        args.mlflow = check_tracking_uri(args.mlflow)
    check_remote(storage)                           # a missing bucket, refused credentials: one line, now
    store = JobStore(storage)
    store.check_writable()
    # [2] the dataset, the jobs and their keys
    dataset = resolve_dataset(args, scale, Path(os.environ.get("RAYTRANSFER_CACHE", "~/.cache/raytransfer")).expanduser())
    notes = list(dict.fromkeys(check_resolution(dataset, r) for r in recipes))
    if not (args.splits or args.split_file):        # the sweep file's own splits: leave out what this data lacks
        grid, dropped = drop_dissimilar_without_superclasses(grid, dataset)
        notes.append(dropped)
    axes = expand_axes(grid)
    if split_treatments and not args.treatments:
        axes = [a for a in axes if a["treatment"] in split_treatments.get(a["split"], [a["treatment"]])]
    axes = restrict_treatments(axes, args.treatments)
    jobs, splits = build_arms(axes, dataset, recipes, reduced_k_of(args, scale), diagnostic_kinds(args, scale),
                              scale.diagnostic_settings)
    networks = [j for j in jobs if not j.is_diagnostic]         # the results table's rows
    short = check_batches(networks, dataset, args.workers_per_trial)
    if short and not args.dry_run:                 # a dry run lists the jobs anyway, and says so below
        raise SweepError(short)
    notes.append(short and f"{short} (--dry-run: listed anyway; a sweep would stop here)")
    for note in filter(None, notes):
        print(f"[sweep] note: {note}", flush=True)
    done = store.summaries(write_index=not args.dry_run)["jobs"]   # {key: summary}: one listing + the index
    if args.dry_run:
        print_job_table(jobs, done)
        from .estimate import print_estimate
        for arm in recipes:                         # each arm at its own recipe's step speed
            if len(recipes) > 1:
                print(f"arm {arm.name}:")
            print_estimate([j for j in jobs if j.spec["recipe"]["name"] in (arm.name, reduced_recipe(arm).name)],
                           done, arm, dataset, args.cpus_per_trial, args.cohort_size)
        return 0
    out.mkdir(parents=True, exist_ok=True)
    for label, split in splits.items():
        split.save(out / "splits" / f"{label}.json")
    exp_name = f"tune-{grid_digest(jobs)}"
    invocation = sweep_invocation(args, jobs)
    if args.resume:
        check_resume(storage, exp_name, invocation)
        torn = torn_tune_snapshot(storage, exp_name)
        if torn:
            print(f"[sweep] --resume: Tune's last snapshot is torn ({', '.join(torn)} empty or unreadable: the driver "
                  "died while writing it); starting the rest of the grid afresh: finished jobs come from the job "
                  "store and are not trained again, jobs that were running start over")
            args.resume = False
    # [3] Ray, resources, the registry
    from .tuning import fit_sweep

    t0 = time.time()

    def publish(final: bool) -> tuple:
        """The results table (done and failed rows) and, unless --no-report, the report: live or final."""
        records = store.completed(refresh=True)
        for r in records.values():
            r.setdefault("dataset", dataset.name)
        failed = store.failed()
        table = write_results(out, networks, records, failed)
        write_diagnostics(out, [j for j in jobs if j.is_diagnostic], records, table)
        progress = {"planned": len(networks), "done": len(table), "failed": sum(k in failed and k not in records
                                                                                for k in (j.key for j in networks)),
                    "final": final, "updated_at": time.time()}
        _atomic(out / "sweep_progress.json", lambda p: p.write_text(json.dumps(progress)))   # the live report reads it
        report = None
        if not args.no_report and len(table):
            from analysis import build_report
            report = build_report(out)
        return records, failed, table, report

    callbacks = [LiveReport(publish, every_s=args.report_every * 60)] if args.report_every > 0 else []
    if args.mlflow:
        callbacks.append(MLflowJobs(args.mlflow, args.mlflow_experiment or name))
    here = os.getcwd()
    os.chdir(out)          # every path is absolute by now; a Ray job's working dir can vanish under the driver
    try:                   # (Ray's local autoscaler: all its nodes share one runtime_resources folder)
        ready = None if args.resume else (lambda: save_invocation(storage, exp_name, invocation))
        info = fit_sweep(jobs, done, store, exp_name, RunSettings.from_args(args, storage), callbacks,
                         on_ready=ready) or {}
    except Exception as e:
        if unavailable(storage):                   # it stayed away for the whole wait: one line, the way back
            raise SweepError(storage_gone(storage, e)) from None
        raise
    finally:
        try:
            os.chdir(here)
        except OSError:
            pass
    # [4] the table, the report, the summary
    try:
        records, failed, table, report = publish(final=True)
    except Exception as e:
        if unavailable(storage):
            raise SweepError(storage_gone(storage, e)) from None
        raise
    missing = [j.key for j in jobs if j.key not in records]
    dropped = sorted(k for k in done if k not in records)      # a trial found their weights unreadable
    if dropped:
        print(f"[sweep] the weights of {', '.join(dropped)} were unreadable (corrupt): their record was dropped; "
              "rerun the same command to retrain them alone, then the jobs that need them")
    print(summary_block(jobs, done, records, failed, time.time() - t0, out, report, info.get("dashboard")), flush=True)
    return 0 if not missing else 1


def storage_gone(storage: str, error: BaseException) -> str:
    """The sweep's last line when its storage stayed away: what happened and the command that resumes."""
    argv = [a for a in sys.argv if a != "--resume"]
    command = shlex.join(["python", *argv, "--resume"]) if argv and argv[0].endswith(".py") else "the same command with --resume"
    return f"{resume_hint(storage)}: {command}"


def summary_block(jobs, done_before: dict, records: dict, failed: dict, wall_s: float, out: Path, report,
                  dashboard: str | None) -> str:
    """The sweep's last words: jobs, wall time, GPU-hours, failures, where the results and report are."""
    from .monitor import hms
    from .status import job_hours, restarts

    keys = {j.key for j in jobs}
    new = [r for k, r in records.items() if k in keys and k not in done_before]
    gpu_h = sum(job_hours(r)[0] for r in new)
    trial_h = sum(job_hours(r)[1] for r in new)
    bad = {k: r for k, r in failed.items() if k in keys and k not in records}
    missing = [k for k in sorted(keys) if k not in records and k not in bad]
    lines = ["[sweep] ---------------------------------------------------------------- summary",
             f"[sweep] jobs: {len(jobs)} in the grid: {len(keys & set(records))} done ({len(new)} trained now, "
             f"{len(keys & set(done_before))} done before), {len(bad)} failed, {len(missing)} not run",
             f"[sweep] wall time {hms(wall_s)}; trained now: {gpu_h:.2f} GPU-hours, {trial_h:.2f} hours of trials",
             "[sweep] restarts: {restarts_after_failures} after failures, {preemptions} after preemptions "
             "(preemptions do not spend --max-failures)".format(**restarts({k: r for k, r in {**failed, **records}.items()
                                                                            if k in keys and k not in done_before})),
             f"[sweep] results: {out / 'results.csv'}"]
    if any(j.is_diagnostic for j in jobs):
        lines.append(f"[sweep] diagnostics: {out / 'diagnostics.csv'}, {out / 'transferability.json'}")
    lines += [f"[sweep] failed: {k}: {r.get('reason')}" for k, r in sorted(bad.items())]
    if missing:
        lines.append(f"[sweep] not run (rerun the same command to retry them): {', '.join(missing[:5])}"
                     + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    lines.append(f"[sweep] report: {report}" if report else "[sweep] report: not built (--no-report, or no job done)")
    if dashboard:
        lines.append(f"[sweep] Ray dashboard (while the cluster runs): {dashboard}")
    return "\n".join(lines)


INVOCATION = "raytransfer-invocation.json"
RESUME_FLAGS = ("scale", "recipes", "data_seed", "set", "arch", "data", "splits", "split_file", "seeds", "train_seeds", "n", "treatments", "directions",
                "reduced_k", "diagnostics", "until_plateau",
                "gpus_per_trial",
                "workers_per_trial", "cpus_per_trial", "host", "max_failures", "checkpoint_minutes", "max_concurrent",
                "cohort_size")


def sweep_invocation(args, jobs) -> dict:
    """What a --resume must repeat: the grid (its job keys) and every flag that shapes how it runs."""
    flags = {k: _plain(v) for k, v in vars(args).items() if k in RESUME_FLAGS}
    return {"flags": flags, "jobs": sorted(j.key for j in jobs)}


def _plain(value):
    """A flag's value as JSON holds it: paths as strings (also in lists, e.g. --split-file)."""
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def save_invocation(storage: str, exp_name: str, invocation: dict):
    fs, root = _split_uri(f"{storage.rstrip('/')}/{exp_name}")
    fs.create_dir(root, recursive=True)
    with fs.open_output_stream(f"{root}/{INVOCATION}") as f:
        f.write(json.dumps({**invocation, "saved_at": time.time()}).encode())


def check_resume(storage: str, exp_name: str, invocation: dict):
    """--resume continues the interrupted sweep only with its grid and flags: else one error listing
    every difference (a silently different resume would mix two experiments in one table)."""
    from ray.tune import Tuner

    fs, root = _split_uri(storage)
    saved = []
    for info in fs.get_file_info(pyarrow_selector(root)):
        if info.base_name.startswith("tune-"):
            try:
                with fs.open_input_stream(f"{info.path}/{INVOCATION}") as f:
                    saved.append((json.loads(f.read()), info.base_name))
            except (OSError, ValueError):
                continue
    if not saved:
        raise SweepError(f"--resume: no interrupted sweep at {storage}; drop --resume to start it (finished "
                         "jobs in the job store are skipped anyway)")
    own = [s for s in saved if s[1] == exp_name]    # this grid's sweep, though another one was saved after it
    last, name = own[0] if own else max(saved, key=lambda s: s[0].get("saved_at", 0))
    diffs = [f"--{k.replace('_', '-')} {_show(last['flags'].get(k))} (interrupted) vs {_show(v)} (now)"
             for k, v in invocation["flags"].items() if last["flags"].get(k) != v]
    if last["jobs"] != invocation["jobs"]:
        gone, new = set(last["jobs"]) - set(invocation["jobs"]), set(invocation["jobs"]) - set(last["jobs"])
        diffs.append(f"the grid: {len(last['jobs'])} jobs (interrupted) vs {len(invocation['jobs'])} (now); "
                     f"{len(new)} new, {len(gone)} left out")
    if diffs:
        raise SweepError(f"--resume of the interrupted sweep {name} at {storage} with different flags: "
                         + "; ".join(diffs) + ". Rerun with the interrupted sweep's flags, or drop --resume "
                         "(finished jobs are skipped anyway)")
    if not Tuner.can_restore(f"{storage.rstrip('/')}/{exp_name}"):
        raise SweepError(f"--resume: the sweep at {storage} never got as far as Tune's first snapshot; "
                         "drop --resume to start it again (finished jobs are skipped anyway)")


TUNE_SNAPSHOT = ("experiment_state-*.json", "search_gen_state-*.json", "searcher-state-*.pkl")


def torn_tune_snapshot(storage: str, exp_name: str) -> list[str]:
    """The newest file of each kind in Tune's snapshot (the ones Tune restores from: newest by name) that
    is empty or does not load. A driver killed while Tune copied its snapshot to storage leaves them so
    (seen in CI: a 0-byte experiment state and searcher state), and Tune's restore then hands out a job
    without the sweep's settings (KeyError: 'storage'). When one is torn, the whole snapshot is removed:
    the rest of the grid starts afresh from the job store."""
    import fnmatch

    import ray.cloudpickle as cloudpickle
    from ray.tune.utils.serialization import _loads_with_cloudpickle      # Tune's own reader of its state

    fs, root = _split_uri(f"{storage.rstrip('/')}/{exp_name}")
    names = [i.base_name for i in fs.get_file_info(pyarrow_selector(root))]
    torn = []
    for pattern in TUNE_SNAPSHOT:
        newest = max(fnmatch.filter(names, pattern), default=None)
        if newest is None:
            continue
        with fs.open_input_stream(f"{root}/{newest}") as f:
            data = f.read()
        try:
            _loads_with_cloudpickle(data) if pattern.startswith("experiment_state") else cloudpickle.loads(data)
        except Exception:                       # empty or cut short: any decoding error means the same
            torn.append(newest)
    if torn:
        for name in names:
            if any(fnmatch.fnmatch(name, pattern) for pattern in TUNE_SNAPSHOT):
                fs.delete_file(f"{root}/{name}")
    return torn


def _show(v) -> str:
    return "(default)" if v is None else str(v)


def pyarrow_selector(root: str):
    import pyarrow.fs
    return pyarrow.fs.FileSelector(root, allow_not_found=True)
