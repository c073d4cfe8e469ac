"""The `raytransfer` command: prepare | split | layers | recipes | report | status (sweep: `sweeps/full_paper.py`).

    raytransfer prepare synthetic --out data/synthetic
    raytransfer prepare imagenet /data/ILSVRC2012 --out /mnt/betons/imagenet --resolution 256
    raytransfer split imagenet-1k --kind similar --seed 0 --out split.json
    raytransfer layers caffenet
    raytransfer recipes [--json]                  # every recipe's fields (the paper's protocol: docs/paper_protocol.md)
    raytransfer report RESULTS_DIR [--dataset D --arch A --recipe R]
    raytransfer status STORAGE [--json]          # a running (or dead) sweep, from its job store: no Ray
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def add_prepare_args(p: argparse.ArgumentParser):
    p.add_argument("source", choices=["synthetic", "imagenet", "folder"],
                   help="the built-in synthetic dataset, ILSVRC2012, or any class-folder tree with train/ and val/")
    p.add_argument("path", nargs="?", type=Path, help="dataset folder (imagenet, folder)")
    p.add_argument("--out", type=Path, required=True, help="folder for train.beton, val.beton, manifest.json")
    p.add_argument("--resolution", type=int, default=None,
                   help="stored side in px, images squashed square as in the paper (default 256; synthetic: native)")
    p.add_argument("--format", choices=["jpg", "raw"], default=None,
                   help="JPEG (smaller) or raw pixels (faster to load); default jpg, raw for synthetic")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality")
    p.add_argument("--superclasses", type=Path, metavar="CSV",
                   help="folder: class,superclass rows (the first superclass listed is half A of the dissimilar "
                        "split); or give the tree a superclass level, train/<superclass>/<class>/<image>")
    p.add_argument("--val-labels", type=Path,
                   help="ImageNet flat val/: Kaggle's LOC_val_solution.csv, or the devkit's "
                        "ILSVRC2012_validation_ground_truth.txt (its data/meta.mat beside it) or devkit folder "
                        "(found automatically nearby)")
    p.add_argument("--synthetic-seed", type=int, default=0, help="synthetic: seed of the class hierarchy and images")
    p.add_argument("--synthetic-train-per-class", type=int, default=None, help="synthetic: training images per class")
    p.add_argument("--workers", type=int, default=None, help="writer processes (default: all cores)")
    p.add_argument("--force", action="store_true", help="overwrite betons of other settings in --out")


def run_prepare(args) -> int:
    from dataclasses import replace

    from .prepare import prepare
    from .synthetic import SyntheticSpec

    spec = SyntheticSpec(seed=args.synthetic_seed)
    if args.synthetic_train_per_class:
        spec = replace(spec, train_per_class=args.synthetic_train_per_class)
    m = prepare(args.source, args.path, args.out, resolution=args.resolution, format=args.format, quality=args.quality,
                synthetic=spec, val_labels=args.val_labels, workers=args.workers, force=args.force,
                superclass_file=args.superclasses)
    counts = {s: c["images"] for s, c in m["counts"].items()}
    corrupt = {s: c["corrupt"] for s, c in m["counts"].items() if c["corrupt"]}
    tags = [c.get("superclass") for c in m["classes"]]
    order = m.get("superclass_order") or []
    supers = f", superclasses {', '.join(f'{sc} ({tags.count(sc)} classes)' for sc in order)}" if order else ""
    print(f"{args.out}: {m['name']}, {len(m['classes'])} classes{supers}, images {counts}"
          + (f", corrupt images skipped {corrupt}" if corrupt else "") + f", fingerprint {m['fingerprint'][:12]}")
    return 0


def add_layers_args(p: argparse.ArgumentParser):
    p.add_argument("arch", help="caffenet or resnet18")
    p.add_argument("--num-classes", type=int, default=500, help="head size (a half of ImageNet: 500)")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--resolution", type=int, default=None)


def run_layers(args) -> int:
    from .models import build_model, describe_layers

    try:
        model = build_model(args.arch, args.num_classes, width=args.width, resolution=args.resolution)
    except ValueError as e:             # its checks of these arguments: unknown arch, a width or side it cannot take
        raise UsageError(str(e)) from None
    print(describe_layers(model))
    return 0


def add_recipes_args(p: argparse.ArgumentParser):
    p.add_argument("--json", action="store_true", help="one JSON object: recipe name -> every field")


def run_recipes(args) -> int:
    """Every recipe's choices, so a run's protocol is visible before it is paid for."""
    import json

    from .recipes import REDUCED_RECIPE, RECIPES

    if args.json:
        print(json.dumps({name: r.to_dict() for name, r in RECIPES.items()}, indent=1))
        return 0
    fields = list(next(iter(RECIPES.values())).to_dict())[1:]
    names = list(RECIPES)
    width = max(map(len, fields))
    cols = {n: max([len(n)] + [len(_show(v)) for v in RECIPES[n].to_dict().values()]) for n in names}
    print((f"{'':<{width}}  " + "  ".join(f"{n:<{cols[n]}}" for n in names)).rstrip())
    for f in fields:
        print(f"{f:<{width}}  " + "  ".join(f"{_show(RECIPES[n].to_dict()[f]):<{cols[n]}}" for n in names).rstrip())
    print("reduced_k jobs use: " + ", ".join(f"{a} -> {b}" for a, b in REDUCED_RECIPE.items())
          + " (other recipes: their own)")
    return 0


def _show(v) -> str:
    if isinstance(v, list):
        return ",".join(f"{x:.3g}" for x in v)
    return "-" if v is None else str(v)


def add_report_args(p: argparse.ArgumentParser):
    """The arguments of `python -m analysis` (analysis/__main__.py), written here again so that building this
    parser does not import the analysis package (plotly: seconds) for every command."""
    p.add_argument("results_dir", type=Path, help="the sweep's results folder (holds results.csv)")
    p.add_argument("--out", type=Path, default=None, help="where to write the report (default: RESULTS_DIR)")
    p.add_argument("--dataset", default=None, help="keep only this dataset (default: the setting with most rows)")
    p.add_argument("--arch", default=None, help="keep only this architecture")
    p.add_argument("--recipe", default=None, help="keep only this recipe")


def run_report(args) -> int:
    from analysis.__main__ import report

    print(report(args))
    return 0


class UsageError(ValueError):
    """Arguments a command cannot use (e.g. an unknown architecture for `layers`): the message says which."""


def user_errors() -> tuple[type[BaseException], ...]:
    """The errors of the user's input or surroundings, each with a message naming the problem and the fix:
    shown as one line. Any other exception (an internal ValueError included) is a bug: its traceback shows."""
    try:
        from analysis.__main__ import ReportError
    except ImportError:                  # the analysis package's libraries absent: no report errors either
        ReportError = UsageError

    from .prepare import DatasetError
    from .recipes import RecipeError
    from .splits import SplitError
    from .sweep.errors import SweepError
    from .sweep.store import StoreReadError
    from .wordnet import WordNetUnavailable

    return (UsageError, DatasetError, SplitError, RecipeError, SweepError, StoreReadError, ReportError,
            WordNetUnavailable)


def main(argv=None) -> int:
    from . import splits
    from .sweep.status import add_status_args, run_status

    parser = argparse.ArgumentParser(prog="raytransfer", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {
        "prepare": (add_prepare_args, run_prepare, "write a dataset's betons and manifest"),
        "split": (splits.add_split_arguments, splits.run_split, "make a class split manifest"),
        "layers": (add_layers_args, run_layers, "print an architecture's table of transferable layers"),
        "recipes": (add_recipes_args, run_recipes, "print every training recipe's fields (--json: as JSON)"),
        "report": (add_report_args, run_report, "(re)build the interactive report of a results folder"),
        "status": (add_status_args, run_status, "where a sweep stands, from its --storage alone (no Ray needed)"),
    }
    for name, (add_args, _, help_text) in commands.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return commands[args.command][1](args)
    except user_errors() as e:         # the user's input: one clear line; anything else: its traceback
        print(f"raytransfer {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
