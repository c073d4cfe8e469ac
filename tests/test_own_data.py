"""Your own data in the sweep: a class-folder tree stored at any side, your own splits, ResNet-18.

- A folder dataset stored at 256 px trains demo-scale bases well above chance: the recipe's 30 px
  crops are cut from its 32 px image, which the loader makes from the whole 256 px picture.
- Split manifests of any kind (`--split-file`) are splits of the grid: their content in the keys,
  their label in the results and the report; a superclass level makes `--splits dissimilar` work.
- `--arch resnet18` reaches the sweep: n = 1..9, its layer names on the report's axis, frozen blocks'
  batch-norm statistics fixed (one smoke sweep on a local Ray).
- Bad input: one clear error before anything trains.
"""
from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import write_image_tree, write_synthetic_tree

from raytransfer.cli import main as cli_main
from raytransfer.prepare import prepare, read_manifest
from raytransfer.recipes import get_recipe
from raytransfer.splits import Split
from raytransfer.sweep.jobs import Dataset, build_jobs, expand_axes, make_split
from raytransfer.sweep.runner import check_resolution, main
from raytransfer.sweep.store import JobStore, load_weights
from raytransfer.trial import run_trial

ROOT = Path(__file__).resolve().parents[1]
SWEEP = [sys.executable, str(ROOT / "sweeps" / "full_paper.py")]
GRID = runpy.run_path(str(ROOT / "sweeps" / "full_paper.py"))["GRID"]
SMALL = dict(superclasses_per_family=2, classes_per_superclass=2, train_per_class=30, val_per_class=10)
FLAT = {"train": {c: 4 for c in ("ant", "bee", "cat", "dog")}, "val": {c: 2 for c in ("ant", "bee", "cat", "dog")}}
# numba's finalizers raise a harmless KeyError when FFCV's compiled pipelines are garbage-collected
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def dataset_of(data_dir) -> Dataset:
    m = read_manifest(data_dir)
    return Dataset(str(Path(data_dir).resolve()), m["name"], m["fingerprint"], m["classes"], m.get("superclass_order"))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(tree, betons): 8 synthetic classes in a superclass level (man-made/natural), stored at 32 px."""
    root = tmp_path_factory.mktemp("small")
    tree = write_synthetic_tree(root / "tree", size=32, **SMALL)
    prepare("folder", tree, root / "betons", resolution=32, workers=2)
    return tree, root / "betons"


@pytest.fixture(scope="module")
def flat(tmp_path_factory):
    """Folder trees without superclasses: 4 classes at 32 px and at 24 px, 3 classes at 32 px."""
    root = tmp_path_factory.mktemp("flat")
    tree = write_image_tree(root / "tree4", FLAT)
    three = write_image_tree(root / "tree3", {s: dict(list(c.items())[:3]) for s, c in FLAT.items()})
    for src, out, side in ((tree, "four", 32), (tree, "low", 24), (three, "three", 32)):
        prepare("folder", src, root / out, resolution=side, workers=2)
    return {"tree": tree, "four": root / "four", "low": root / "low", "three": root / "three"}


def write_halves(betons: Path, a: list[str], b: list[str], out: Path) -> Path:
    """`raytransfer split DATA --kind file`: the user's own halves, as a split manifest."""
    (out.parent / f"{out.stem}-a.txt").write_text("\n".join(a) + "\n")
    (out.parent / f"{out.stem}-b.txt").write_text("# half B\n" + "\n".join(b) + "\n")
    assert cli_main(["split", str(betons), "--kind", "file", "--a-file", str(out.parent / f"{out.stem}-a.txt"),
                     "--b-file", str(out.parent / f"{out.stem}-b.txt"), "--out", str(out)]) == 0
    return out


def dry_run_keys(capsys, argv) -> list[str]:
    capsys.readouterr()
    assert main(GRID, argv + ["--dry-run"], name="full_paper") == 0, capsys.readouterr().err
    lines = capsys.readouterr().out.splitlines()
    keys = [line.split()[0] for line in lines if line.split() and line.split()[1:2] in (["to"], ["done"])]
    assert f"{len(keys)} jobs," in lines[-2] or f"{len(keys)} jobs," in lines[-1], lines[-3:]
    return keys


def one_error(capsys, argv, *phrases):
    """The sweep refuses with exactly one error line holding every phrase, before anything is trained."""
    out = Path(argv[argv.index("--out") + 1])
    capsys.readouterr()
    assert main(GRID, argv, name="full_paper") == 2
    err = capsys.readouterr().err
    assert err.count("full_paper.py: error:") == 1, err
    for phrase in phrases:
        assert phrase in err, (phrase, err)
    assert not list(out.glob("jobstore/jobs/*.json")) and not list(out.glob("tune-*"))


# -- 1. any stored side ------------------------------------------------------------------------------

def test_folder_tree_stored_at_256px_trains_demo_bases_well_above_chance(tmp_path):
    """36 classes of 48 px images prepared with the defaults (stored at 256 px). The demo recipe crops
    30 px of a 32 px image: its memory input shrinks each picture to 32 px once (the FFCV input, `input=ffcv`,
    cuts 224 px of the 256 px picture and resizes it at every step; before either: a 30 px corner of the
    picture, every network at chance). baseA (18 classes) reaches at least 3x chance in 10 epochs (the
    recipe's 128 would only take longer)."""
    tree = write_synthetic_tree(tmp_path / "tree", seed=3, superclasses_per_family=18, classes_per_superclass=1,
                                train_per_class=100, val_per_class=20, size=48)
    data = tmp_path / "betons"
    assert prepare("folder", tree, data, workers=2)["settings"]["resolution"] == 256
    dataset, recipe = dataset_of(data), get_recipe("demo", epochs=10)
    assert "shrinks the images to 32 px once, as it loads them into memory" in check_resolution(dataset, recipe)
    assert "shrinks the images to 32 px once" in check_resolution(dataset, get_recipe("smoke"))
    note = check_resolution(dataset, get_recipe("smoke", input="ffcv"))
    assert "resizes each crop on the fly (224 px of the stored image to 28 px)" in note
    assert f"raytransfer prepare folder {tree.resolve()} --out {data.resolve()}-32px --resolution 32" in note
    axes = expand_axes({"split": "similar", "split_seed": 0, "target": "B", "treatment": "scratch", "n": 0, "seed": 0})
    (base,) = [j for j in build_jobs(axes, dataset, recipe)[0] if j.treatment == "baseA"]
    t0 = time.time()
    summary = run_trial(base.spec, torch.device("cpu"))
    print(f"demo baseA on the 256 px folder tree: top1_best10 {summary['top1_best10']:.3f}, "
          f"final {summary['top1_final']:.3f}, {time.time() - t0:.0f} s")
    assert summary["num_classes"] == 18 and summary["top1_best10"] >= 3 / 18


# -- 2. your split in the sweep ------------------------------------------------------------------------

def test_split_files_are_splits_of_the_grid_keyed_by_content(small, tmp_path, capsys):
    """A --kind file manifest and a --kind similar one next to --splits similar: the similar file is the
    built-in seed-0 split (one split, one set of jobs); the file split's keys carry its hash, and moving
    one class between its halves makes other jobs."""
    _, data = small
    ids = [c["id"] for c in read_manifest(data)["classes"]]
    halves = write_halves(data, ids[0::2], ids[1::2], tmp_path / "halves.json")
    assert cli_main(["split", str(data), "--kind", "similar", "--seed", "0", "--out", str(tmp_path / "s0.json")]) == 0
    flags = ["--scale", "smoke", "--data", str(data), "--treatments", "AnB", "--n", "1", "--out", str(tmp_path / "x")]
    keys = dry_run_keys(capsys, flags + ["--splits", "similar", "--split-file", str(halves),
                                         "--split-file", str(tmp_path / "s0.json")])
    sha = Split.load(halves).sha256
    assert len(keys) == 6 and len([k for k in keys if k.startswith(f"file{sha[:6]}-")]) == 3
    assert len([k for k in keys if k.startswith("similar0-")]) == 3
    assert dry_run_keys(capsys, flags + ["--split-file", str(halves)]) == [k for k in keys if k.startswith("file")]
    moved = write_halves(data, ids[0::2] + [ids[1]], ids[3::2], tmp_path / "moved.json")
    other = dry_run_keys(capsys, flags + ["--split-file", str(moved)])
    assert len(other) == 3 and not set(other) & set(keys)


def test_superclass_level_gives_the_dissimilar_split(small, capsys, tmp_path):
    tree, data = small
    split, label = make_split(dataset_of(data), "dissimilar", 0)
    assert label == "dissimilar" and split.rule == "superclass" and (split.A_name, split.B_name) == ("man-made", "natural")
    assert split.A == sorted(d.name for d in (tree / "train" / "man-made").iterdir())
    keys = dry_run_keys(capsys, ["--scale", "smoke", "--data", str(data), "--splits", "dissimilar", "--treatments",
                                 "AnB", "--n", "2", "--out", str(tmp_path / "x")])
    assert len(keys) == 3 and all(k.startswith("dissimilar0-") for k in keys)


# -- 3. your architecture: a ResNet-18 smoke sweep on your split -----------------------------------------

@pytest.fixture(scope="module")
def sweep_env():
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAYTRANSFER_CACHE": tempfile.mkdtemp(prefix="rtc", dir="/tmp"),
           "RAYTRANSFER_RAY_TMP": tempfile.mkdtemp(prefix="rt", dir="/tmp")}
    env.pop("RAY_ADDRESS", None)
    return env


def test_resnet18_smoke_sweep_on_a_split_file(small, sweep_env, tmp_path, capsys):
    """--arch resnet18 with --split-file: n ranges over the table's 9 copyable layers; AnB at n = 3
    (stem, layer1.0, layer1.1 frozen) keeps those blocks bit-identical to its base, batch-norm running
    statistics included; results and report carry the split's label and the layer names."""
    _, data = small
    ids = [c["id"] for c in read_manifest(data)["classes"]]
    halves = write_halves(data, ids[:2] + ids[4:6], ids[2:4] + ids[6:], tmp_path / "halves.json")
    flags = ["--scale", "smoke", "--data", str(data), "--arch", "resnet18", "--split-file", str(halves),
             "--treatments", "AnB", "--out", str(tmp_path / "exp")]
    assert len(dry_run_keys(capsys, flags)) == 2 + 9                         # bases + AnB at n = 1..9
    out = tmp_path / "exp"
    p = subprocess.run(SWEEP + flags + ["--n", "3", "--no-dashboard", "--num-cpus", "2"], env=sweep_env, cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    table = pd.read_csv(out / "results.csv")
    sha = Split.load(halves).sha256
    assert len(table) == 3 and (table.status == "done").all() and set(table.arch) == {"resnet18"}
    assert set(table.split) == {"halves"} and set(table.split_kind) == {"file"} and set(table.split_sha256) == {sha}
    assert all(k.startswith(f"file{sha[:6]}-") for k in table.job_key)
    (anb,) = table[table.treatment == "AnB"].itertuples()
    assert (anb.n, anb.layer, anb.frozen_check) == (3, "layer1.1", True)
    records = JobStore(str(out)).completed()
    mine, base = (load_weights(records[k]["weights_uri"]) for k in (anb.job_key, anb.base_job_key))
    frozen = [k for k in base if k.startswith(("conv1.", "bn1.", "layer1."))]
    stats = [k for k in frozen if "running_" in k]
    assert len(stats) == 2 * 5 and all(torch.equal(mine[k], base[k]) for k in frozen)   # 5 BNs: stem + 2 blocks x 2
    assert not torch.equal(base["bn1.running_mean"], torch.zeros_like(base["bn1.running_mean"]))   # trained stats
    assert not torch.equal(mine["layer2.0.bn1.running_mean"], base["layer2.0.bn1.running_mean"])   # above n: trained
    assert json.loads((out / "splits" / "halves.json").read_text())["sha256"] == sha
    page = (out / "report.html").read_text()
    assert "layer1.1" in page and "AnB, split halves" in page


# -- 4. bad input: one clear error, nothing trained --------------------------------------------------------

def test_split_file_naming_classes_the_dataset_lacks(flat, tmp_path, capsys):
    bad = Split("four", "file", None, "file", A=["ant", "bee"], B=["cat", "emu"]).save(tmp_path / "bad.json")
    one_error(capsys, ["--data", str(flat["four"]), "--split-file", str(bad), "--out", str(tmp_path / "x")],
              f"--split-file {bad} on {flat['four'].resolve()}", "names 1 class(es) the dataset does not have: emu")


def test_split_file_with_overlapping_halves(flat, tmp_path, capsys):
    bad = Split("four", "file", None, "file", A=["ant", "bee"], B=["bee", "cat", "dog"]).save(tmp_path / "bad.json")
    one_error(capsys, ["--data", str(flat["four"]), "--split-file", str(bad), "--out", str(tmp_path / "x")],
              "share 1 class(es): bee", "remove each from one of the two halves")


def test_split_file_with_a_half_of_one_class(flat, tmp_path, capsys):
    bad = Split("four", "file", None, "file", A=["ant"], B=["bee", "cat", "dog"]).save(tmp_path / "bad.json")
    one_error(capsys, ["--data", str(flat["four"]), "--split-file", str(bad), "--out", str(tmp_path / "x")],
              "half A (A) of 'four' holds 1 class (ant); a half needs at least 2")


def test_dataset_of_three_classes(flat, tmp_path, capsys):
    one_error(capsys, ["--data", str(flat["three"]), "--out", str(tmp_path / "x")],
              "has 3 classes; the sweep splits them into two halves of at least 2 classes each, so it needs at least 4")


def test_stored_side_below_the_recipes_crop(flat, tmp_path, capsys):
    one_error(capsys, ["--data", str(flat["low"]), "--out", str(tmp_path / "x")],
              "holds 24 px images; recipe demo cuts 30 px crops from 32 px images",
              f"`raytransfer prepare folder {flat['tree'].resolve()} --out {flat['low'].resolve()}-32px --resolution 32`")


def test_n_beyond_the_architectures_table(flat, tmp_path, capsys):
    base = ["--data", str(flat["four"]), "--splits", "similar", "--out", str(tmp_path / "x")]
    one_error(capsys, base + ["--arch", "resnet18", "--n", "3,10"],
              "--n 10 is outside 1..9 for resnet18 (stem..layer4.1; its head fc is never copied)")
    one_error(capsys, base + ["--n", "8"], "--n 8 is outside 1..7 for caffenet (conv1..fc7")


def test_dissimilar_split_of_a_tree_without_superclasses(flat, tmp_path, capsys):
    """Asked for: one error saying how to get it. In the sweep file's default grid: left out, with a note."""
    one_error(capsys, ["--data", str(flat["four"]), "--splits", "dissimilar", "--out", str(tmp_path / "x")],
              "--splits dissimilar needs superclass tags", "train/<superclass>/<class>/<image>", "--superclasses CSV",
              "--kind file --a-file A.txt --b-file B.txt --out halves.json", "--split-file halves.json")
    capsys.readouterr()
    assert main(GRID, ["--data", str(flat["four"]), "--n", "1", "--out", str(tmp_path / "x"), "--dry-run"],
                name="full_paper") == 0
    out = capsys.readouterr().out
    assert "[sweep] note: no dissimilar split in this grid: it needs superclass tags" in out
    assert "dissimilar0-" not in out and "similar0-AnB-B-n1" in out
