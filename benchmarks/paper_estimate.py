"""What the paper's grid costs, one job a trial and in cohorts: `--dry-run` of `sweeps/full_paper.py --scale paper
--directions both` on an ImageNet-shaped dataset, without ImageNet.

The dry run needs only the dataset's manifest (its classes, their training images, the stored side), so this
writes one: ILSVRC2012's 1000 wnids (the package's own list: the paper's split lists apply), 1,281 training and 50
validation images a class (ILSVRC2012's 1,281,167 / 1000, spread evenly: the per-class spread does not change a
`paper` net, which runs a fixed 450k iterations, and barely the reduced-volume nets, which read k a class), stored
at 256 px. No beton is written and nothing trains. Prints the job count and the dry run's estimate lines for each
--cohort-size asked.

    python benchmarks/paper_estimate.py                      # one job a trial (--cohort-size 1) and cohorts
"""
from __future__ import annotations

import argparse
import csv
import json
import runpy
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imagenet_shaped(folder: Path, train_per_class: int = 1281, val_per_class: int = 50) -> Path:
    """A manifest-only dataset folder with ILSVRC2012's classes (no images, no betons)."""
    with open(ROOT / "raytransfer" / "data" / "imagenet_wnids.tsv") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    classes = [{"index": int(r["index"]), "id": r["wnid"], "name": r["lemma"]} for r in rows]
    manifest = {"name": "imagenet-1k", "source": "imagenet", "classes": classes, "superclass_order": None,
                "settings": {"resolution": 256, "format": "jpg", "quality": 90},
                "fingerprint": "imagenet-shaped-for-the-estimate",
                "counts": {split: {"images": n * len(classes), "corrupt": 0, "per_class": [n] * len(classes)}
                           for split, n in (("train", train_per_class), ("val", val_per_class))},
                "betons": {"train": {"file": "train.beton", "bytes": 0}, "val": {"file": "val.beton", "bytes": 0}},
                "mean": [124.0, 116.0, 104.0], "std": [58.0, 57.0, 57.0]}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cohort-sizes", default="1,0", help="comma list; 0: no cap (the sweep's default)")
    p.add_argument("--recipe-flags", default="", help="more flags for the dry run, e.g. '--set compile=true'")
    args = p.parse_args(argv)
    runpy.run_path(str(ROOT / "sweeps" / "full_paper.py"), run_name="not-main")      # it imports: fail early
    with tempfile.TemporaryDirectory(prefix="raytransfer-estimate-") as tmp:
        data = imagenet_shaped(Path(tmp) / "imagenet")
        for size in args.cohort_sizes.split(","):
            cmd = [sys.executable, str(ROOT / "sweeps" / "full_paper.py"), "--scale", "paper", "--data", str(data),
                   "--directions", "both", "--out", str(Path(tmp) / "out"), "--dry-run",
                   *(["--cohort-size", size] if int(size) else []), *args.recipe_flags.split()]
            run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if run.returncode != 0:
                print(run.stdout[-2000:], run.stderr[-3000:])
                return run.returncode
            lines = run.stdout.splitlines()
            print(f"## --cohort-size {size if int(size) else '(none: the default)'}")
            print(next(l for l in lines if l.endswith("to run") and " jobs, " in l))
            for line in lines:
                if line.startswith("estimate:"):
                    print(line)
            print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
