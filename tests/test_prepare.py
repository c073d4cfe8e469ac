"""`raytransfer prepare`: datasets to betons + manifest, once per settings; every bad input one clear error."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_SYNTHETIC, save_image, write_corrupt_jpeg, write_image_tree

from raytransfer import prepare as prep
from raytransfer.cli import main
from raytransfer.loaders import CropSpec, build_half_loaders
from raytransfer.prepare import DatasetError, label_column, prepare, read_manifest, verify_betons
from raytransfer.synthetic import FAMILIES, SyntheticImages, SyntheticSpec

FOLDER_COUNTS = {"train": {"cat": 6, "ant": 6, "bee": 6}, "val": {"cat": 3, "ant": 3, "bee": 3}}
TENCH, GOLDFISH, AIRLINER = "n01440764", "n01443537", "n02690373"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def folder_tree(tmp_path_factory):
    return write_image_tree(tmp_path_factory.mktemp("folder") / "tree", FOLDER_COUNTS)


@pytest.fixture(scope="module")
def folder_dataset(folder_tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("folder_betons")
    return out, prepare("folder", folder_tree, out, resolution=32, workers=1)


# -- synthetic -------------------------------------------------------------------------------------

def test_synthetic_manifest_describes_betons(synthetic_dataset):
    out, m = synthetic_dataset
    spec = SyntheticSpec(**TINY_SYNTHETIC)
    ids = [c["id"] for c in m["classes"]]
    assert ids == sorted(ids) and len(ids) == spec.num_classes == 8
    assert [c["index"] for c in m["classes"]] == list(range(8))
    assert {c["superclass"] for c in m["classes"]} == set(FAMILIES) and m["superclass_order"] == list(FAMILIES)
    assert m["settings"] == {"resolution": spec.size, "format": "raw", "quality": 90}   # raw: synthetic default
    assert m["counts"]["train"] == {"images": 32, "corrupt": 0, "per_class": [4] * 8}
    assert m["counts"]["val"] == {"images": 16, "corrupt": 0, "per_class": [2] * 8}
    assert len(m["fingerprint"]) == 64 and m["identity"] == {"synthetic": spec.to_dict()}
    assert len(m["mean"]) == len(m["std"]) == 3
    for split in ("train", "val"):
        beton = out / f"{split}.beton"
        assert m["betons"][split] == {"file": f"{split}.beton", "bytes": beton.stat().st_size}
        np.testing.assert_array_equal(label_column(beton), SyntheticImages(spec, split).labels())
    assert read_manifest(out) == m and not list(out.glob("*.partial"))


def test_same_settings_again_does_nothing(synthetic_dataset, monkeypatch):
    out, m = synthetic_dataset
    stamps = {f.name: f.stat().st_mtime_ns for f in out.iterdir()}

    def no_writing(*a, **k):
        raise AssertionError("prepare rewrote a beton although nothing changed")

    monkeypatch.setattr(prep, "_write_beton", no_writing)
    again = prepare("synthetic", None, out, resolution=None, synthetic=SyntheticSpec(**TINY_SYNTHETIC))
    assert again == m
    assert {f.name: f.stat().st_mtime_ns for f in out.iterdir()} == stamps


def test_other_settings_need_force_then_rewrite(synthetic_dataset, tmp_path):
    src, m = synthetic_dataset
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    spec = SyntheticSpec(**TINY_SYNTHETIC)
    with pytest.raises(DatasetError, match="--force") as e:
        prepare("synthetic", None, out, resolution=None, quality=75, synthetic=spec, workers=1)
    assert m["fingerprint"][:12] in str(e.value)
    assert read_manifest(out) == m                       # refused: nothing touched
    new = prepare("synthetic", None, out, resolution=None, quality=75, synthetic=spec, workers=1, force=True)
    assert new["settings"]["quality"] == 75 and new["fingerprint"] != m["fingerprint"]
    assert read_manifest(out) == new
    verify_betons(out, new)


# -- class-folder trees and ImageNet layouts -------------------------------------------------------

def test_folder_tree_to_betons(folder_dataset):
    from ffcv.reader import Reader

    out, m = folder_dataset
    assert [c["id"] for c in m["classes"]] == ["ant", "bee", "cat"]
    assert [(c["index"], c["name"], c["superclass"]) for c in m["classes"]] == [
        (0, "ant", None), (1, "bee", None), (2, "cat", None)]
    assert m["counts"]["train"] == {"images": 18, "corrupt": 0, "per_class": [6, 6, 6]}
    assert m["counts"]["val"] == {"images": 9, "corrupt": 0, "per_class": [3, 3, 3]}
    assert m["source"] == "folder" and m["name"] == "tree" and m["corrupt_files"] == {"train": [], "val": []}
    for split, n in (("train", 6), ("val", 3)):
        r = Reader(str(out / f"{split}.beton"))
        images = r.metadata[f"f{r.field_names.index('image')}"]
        assert set(images["width"]) == set(images["height"]) == {32}       # varied sizes squashed to 32x32
        np.testing.assert_array_equal(label_column(out / f"{split}.beton"), np.repeat([0, 1, 2], n))


def superclass_tree(root, layout: dict, val_layout: dict | None = None) -> Path:
    """root/<split>/<superclass>/<class>/*.jpg for layout = {superclass: [classes]} ("" = no superclass level)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 1)):
        for sc, classes in (val_layout if split == "val" and val_layout else layout).items():
            for c in classes:
                d = Path(root) / split / sc / c
                d.mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    save_image(rng.integers(0, 256, (20, 20, 3)).astype(np.uint8), d / f"{i}.jpg")
    return Path(root)


def test_superclass_level_tags_every_class(tmp_path, capsys):
    """train/<superclass>/<class>/ (val/ flat here): classes sorted by id, each tagged; the dissimilar split
    of `raytransfer split` takes the first superclass (sorted) as half A."""
    tree = superclass_tree(tmp_path / "tree", {"thing": ["pen", "cup"], "animal": ["dog", "cat"]},
                           val_layout={"": ["cat", "cup", "dog", "pen"]})
    out = tmp_path / "out"
    assert main(["prepare", "folder", str(tree), "--out", str(out), "--resolution", "16", "--workers", "1"]) == 0
    assert "4 classes, superclasses animal (2 classes), thing (2 classes)" in capsys.readouterr().out
    m = read_manifest(out)
    assert [(c["id"], c["superclass"]) for c in m["classes"]] == [("cat", "animal"), ("cup", "thing"),
                                                                  ("dog", "animal"), ("pen", "thing")]
    assert m["superclass_order"] == ["animal", "thing"] and m["source_path"] == str(tree.resolve())
    assert main(["split", str(out), "--kind", "dissimilar", "--out", str(tmp_path / "d.json")]) == 0
    d = json.loads((tmp_path / "d.json").read_text())
    assert (d["rule"], d["A_name"], d["A"], d["B"]) == ("superclass", "animal", ["cat", "dog"], ["cup", "pen"])


def test_superclass_csv_tags_a_flat_tree(tmp_path):
    """--superclasses CSV: a header row is allowed; the first superclass listed is half A; tags are part of
    the dataset's identity (the same images without them are another dataset)."""
    tree = superclass_tree(tmp_path / "tree", {"": ["cat", "cup", "dog", "pen"]})
    (tmp_path / "sc.csv").write_text("class,superclass\ncup,thing\ncat,animal\npen,thing\n\ndog,animal\n")
    m = prepare("folder", tree, tmp_path / "out", resolution=16, workers=1, superclass_file=tmp_path / "sc.csv")
    assert m["superclass_order"] == ["thing", "animal"]
    assert {c["id"]: c["superclass"] for c in m["classes"]} == {"cat": "animal", "cup": "thing", "dog": "animal",
                                                                "pen": "thing"}
    with pytest.raises(DatasetError, match="--force"):
        prepare("folder", tree, tmp_path / "out", resolution=16, workers=1)


@pytest.mark.parametrize("layout,csv_text,message", [
    ({"animal": ["cat", "dog"]}, None, "gives every class the one superclass 'animal'"),
    ({"": ["cat", "dog"]}, "cat,animal\ndog,animal\n", "gives every class the one superclass 'animal'"),
    ({"animal": ["cat"], "": ["cup"]}, None, "mixes class folders with images (cup) and superclass folders"),
    ({"animal": ["cat", "dog"], "thing": ["cat", "cup"]}, None, "class 'cat' is under two superclasses"),
    ({"": ["cat", "dog", "pen"]}, "cat,animal\ndog,thing\n", "gives no superclass to 1 class(es) (pen)"),
    ({"": ["cat", "dog"]}, "cat,animal\ndog,thing\nemu,animal\n", "names 1 class(es) the tree does not have (emu)"),
    ({"": ["cat", "dog"]}, "cat,animal\ndog,thing\ncat,thing\n", "gives class 'cat' two superclasses"),
    ({"animal": ["cat"], "thing": ["cup"]}, "cat,animal\ncup,thing\n", "already has a superclass level"),
])
def test_bad_superclasses_are_one_error_line(tmp_path, capsys, layout, csv_text, message):
    tree = superclass_tree(tmp_path / "tree", layout)
    flags = ["--superclasses", str(tmp_path / "sc.csv")] if csv_text else []
    if csv_text:
        (tmp_path / "sc.csv").write_text(csv_text)
    assert main(["prepare", "folder", str(tree), "--out", str(tmp_path / "out"), "--resolution", "16", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("raytransfer prepare: error:") and message in err[0], err
    assert not (tmp_path / "out").exists()                               # refused before writing anything


WING, ENTITY = "n04592741", "n00001740"
# the devkit's own synset order (its ILSVRC2012_ID), unlike the sorted wnids: airliner 1, wing 2, tench 3,
# goldfish 4, and a synset that is not a class (num_children > 0), as meta.mat lists the WordNet tree above them
DEVKIT_IDS = {AIRLINER: 1, WING: 2, TENCH: 3, GOLDFISH: 4}


def write_meta_mat(path: Path, ids: dict, parents: dict | None = None):
    """data/meta.mat in the devkit's structure: a 'synsets' struct array (ILSVRC2012_ID, WNID, words, gloss,
    num_children, children, wordnet_height, num_train_images), classes first, then their ancestors."""
    import scipy.io

    fields = ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images")
    rows = [(i, w, w, "a class", 0, np.zeros((1, 0)), 0, 1300) for w, i in ids.items()]
    rows += [(i, w, w, "not a class", len(ids), np.arange(1, len(ids) + 1)[None], 5, 0)
             for w, i in (parents or {}).items()]
    synsets = np.empty((len(rows), 1), dtype=[(f, "O") for f in fields])
    for r, values in enumerate(rows):
        for f, v in zip(fields, values):
            synsets[r, 0][f] = v
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(str(path), {"synsets": synsets})


def imagenet_tree(root, val_layout):
    """A few real wnids: train/<wnid>/*.JPEG, val/ in class folders, or flat + Kaggle's LOC_val_solution.csv
    ("flat"), or flat + the devkit's ILSVRC2012_validation_ground_truth.txt and data/meta.mat ("devkit")."""
    write_image_tree(root, {"train": {TENCH: 4, GOLDFISH: 3, AIRLINER: 5}})
    val = {TENCH: 2, GOLDFISH: 3, AIRLINER: 1, WING: 2}        # wing: a class absent from train/
    if val_layout == "folders":
        write_image_tree(root, {"val": val}, seed=1)
        return root
    (root / "val").mkdir(parents=True)
    rows, k = [], 0
    for wnid, n in val.items():
        for _ in range(n):
            k += 1
            image_id = f"ILSVRC2012_val_{k:08d}"
            save_image(np.full((30, 40, 3), 9 * k, np.uint8), root / "val" / f"{image_id}.JPEG")
            rows.append({"ImageId": image_id, "PredictionString": f"{wnid} 10 20 100 200 {wnid} 5 5 30 30"})
    if val_layout == "devkit":                         # as the devkit tarball unpacks, beside train/ and val/
        data = root / "ILSVRC2012_devkit_t12" / "data"
        write_meta_mat(data / "meta.mat", DEVKIT_IDS, parents={ENTITY: 5})
        wnids = [r["PredictionString"].split()[0] for r in rows]
        (data / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{DEVKIT_IDS[w]}\n" for w in wnids))
        return root
    with open(root / "LOC_val_solution.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["ImageId", "PredictionString"])
        w.writeheader()
        w.writerows(rows)
    return root


@pytest.mark.parametrize("val_layout", ["flat", "devkit", "folders"])
def test_imagenet_layout(tmp_path, val_layout):
    root = imagenet_tree(tmp_path / "ILSVRC", val_layout)
    m = prepare("imagenet", root, tmp_path / "out", resolution=24, workers=1)
    assert [(c["id"], c["name"], c["superclass"], c["index"]) for c in m["classes"]] == [
        (TENCH, "tench", "natural", 0), (GOLDFISH, "goldfish", "natural", 1), (AIRLINER, "airliner", "man-made", 2)]
    assert m["superclass_order"] == ["man-made", "natural"] and m["source"] == "imagenet"
    assert m["counts"]["train"]["per_class"] == [4, 3, 5]
    assert m["counts"]["val"]["per_class"] == [2, 3, 1]                # the wing image is left out
    assert m["settings"] == {"resolution": 24, "format": "jpg", "quality": 90}
    if val_layout != "folders":                      # labels from the CSV or the devkit's ids, in file order
        np.testing.assert_array_equal(label_column(tmp_path / "out" / "val.beton"), [0, 0, 1, 1, 1, 2])


def test_imagenet_devkit_labels_given_by_hand(tmp_path):
    """--val-labels: the ground-truth file itself, or the devkit folder; the same labels either way."""
    root = imagenet_tree(tmp_path / "ILSVRC", "devkit")
    devkit = root / "ILSVRC2012_devkit_t12"
    shutil.move(devkit, tmp_path / "devkit")          # not where it is looked for
    with pytest.raises(DatasetError, match="no validation labels were found"):
        prepare("imagenet", root, tmp_path / "out", resolution=24, workers=1)
    for given in (tmp_path / "devkit", tmp_path / "devkit" / "data" / "ILSVRC2012_validation_ground_truth.txt"):
        assert prep.read_val_labels(given)["ILSVRC2012_val_00000006"] == AIRLINER
        assert prep.read_val_labels(given)["ILSVRC2012_val_00000008"] == WING
    m = prepare("imagenet", root, tmp_path / "out", resolution=24, workers=1, val_labels=tmp_path / "devkit")
    assert m["counts"]["val"]["per_class"] == [2, 3, 1]


@pytest.mark.parametrize("damage,message", [
    ("no meta", "meta.mat is missing: the devkit's ILSVRC2012_validation_ground_truth.txt numbers classes"),
    ("meta not a mat", "cannot read the classes of .*meta.mat"),
    ("meta without synsets", "cannot read the classes of .*meta.mat \\(KeyError"),
    ("id not in meta", "names class id 7, which .*meta.mat does not list"),
    ("not an id", "line 3: 'n01440764' is not a class id"),
    ("csv without columns", "lacks the ImageId and PredictionString columns"),
    ("neither", "is neither Kaggle's LOC_val_solution.csv .* nor the devkit's"),
    ("binary", "cannot read the validation labels .*UnicodeDecodeError|is neither Kaggle's"),
])
def test_imagenet_val_labels_it_cannot_use_are_one_error_line(tmp_path, capsys, damage, message):
    root = imagenet_tree(tmp_path / "ILSVRC", "devkit")
    data = root / "ILSVRC2012_devkit_t12" / "data"
    truth = data / "ILSVRC2012_validation_ground_truth.txt"
    if damage == "no meta":
        (data / "meta.mat").unlink()
    elif damage == "meta not a mat":
        (data / "meta.mat").write_text("not a mat file")
    elif damage == "meta without synsets":
        import scipy.io
        scipy.io.savemat(str(data / "meta.mat"), {"classes": np.arange(3)})
    elif damage == "id not in meta":
        truth.write_text(truth.read_text().replace("2\n", "7\n", 1))
    elif damage == "not an id":
        lines = truth.read_text().splitlines()
        truth.write_text("\n".join(lines[:2] + [TENCH] + lines[3:]) + "\n")
    else:
        shutil.rmtree(root / "ILSVRC2012_devkit_t12")
        labels = root / "LOC_val_solution.csv"
        labels.write_bytes({"csv without columns": b"image,label\nILSVRC2012_val_00000001,n01440764\n",
                            "neither": b"<html>not found</html>\n",
                            "binary": bytes(range(256)) * 4}[damage])
    out = tmp_path / "out"
    assert main(["prepare", "imagenet", str(root), "--out", str(out), "--resolution", "24"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("raytransfer prepare: error:") and re.search(message, err[0]), err
    assert not out.exists()


def test_imagenet_flat_val_bad_labels(tmp_path):
    root = imagenet_tree(tmp_path / "ILSVRC", "flat")
    moved = root.parent / "elsewhere.csv"
    (root / "LOC_val_solution.csv").rename(moved)
    with pytest.raises(DatasetError, match="no validation labels were found.*LOC_val_solution.csv.*--val-labels"):
        prepare("imagenet", root, tmp_path / "out", resolution=24)
    lines = moved.read_text().splitlines()
    moved.write_text("\n".join(lines[:-1]) + "\n")                     # the last image is not listed
    with pytest.raises(DatasetError, match="ILSVRC2012_val_00000008.JPEG is not listed in .*elsewhere.csv"):
        prepare("imagenet", root, tmp_path / "out", resolution=24, val_labels=moved)


def test_imagenet_rejects_folders_that_are_not_wnids(tmp_path):
    write_image_tree(tmp_path / "d", {"train": {TENCH: 1, "cats": 1}, "val": {TENCH: 1, "cats": 1}})
    with pytest.raises(DatasetError, match=r"not ILSVRC2012 wnids \(e.g. \['cats'\]\).*prepare folder"):
        prepare("imagenet", tmp_path / "d", tmp_path / "out")


# -- corrupt images and half-written betons --------------------------------------------------------

def test_corrupt_jpegs_are_skipped_and_counted(folder_tree, tmp_path, capsys):
    tree = tmp_path / "tree"
    shutil.copytree(folder_tree, tree)
    cut = write_corrupt_jpeg(tree / "train" / "bee" / "bee_cut.JPEG", "truncated")
    junk = write_corrupt_jpeg(tree / "val" / "ant" / "ant_junk.JPEG", "garbage")
    m = prepare("folder", tree, tmp_path / "out", resolution=32, workers=1)
    assert m["counts"]["train"] == {"images": 18, "corrupt": 1, "per_class": [6, 6, 6]}
    assert m["counts"]["val"] == {"images": 9, "corrupt": 1, "per_class": [3, 3, 3]}
    assert m["corrupt_files"] == {"train": [str(cut)], "val": [str(junk)]}
    labels = label_column(tmp_path / "out" / "train.beton")
    assert (labels == prep.CORRUPT_LABEL).sum() == 1                  # kept as a placeholder no half selects
    assert main(["prepare", "folder", str(tree), "--out", str(tmp_path / "out"), "--resolution", "32"]) == 0
    assert "corrupt images skipped {'train': 1, 'val': 1}" in capsys.readouterr().out


def test_class_mean_images_come_from_the_beton_pass(tmp_path, monkeypatch):
    """The mean images equal a direct computation (every readable training image of a class, corrupt ones
    left out), summed by two writer processes while they wrote the beton: no image is decoded a second time
    for them (reads are counted across the writer processes in a log file)."""
    tree = write_image_tree(tmp_path / "tree", {"train": {"ant": 5, "bee": 4, "cat": 6}, "val": {"ant": 1, "bee": 1,
                                                                                              "cat": 1}})
    write_corrupt_jpeg(tree / "train" / "bee" / "bee_cut.JPEG", "truncated")
    reads, real_read = tmp_path / "reads.log", prep.read_file

    def counted(path):
        with open(reads, "a") as f:
            f.write(path + "\n")
        return real_read(path)

    def no_second_pass(*args):
        raise AssertionError("the mean images were computed in a second decoding pass")

    monkeypatch.setattr(prep, "read_file", counted)
    monkeypatch.setattr(prep, "_write_mean_images", no_second_pass)
    out = tmp_path / "out"
    m = prepare("folder", tree, out, resolution=20, workers=2)
    logged = reads.read_text().splitlines()
    means = np.load(out / prep.MEAN_IMAGES)
    train = prep.ImageFiles(sorted(((str(f), k) for k, c in enumerate(("ant", "bee", "cat"))
                                    for f in (tree / "train" / c).iterdir()), key=lambda s: s[0]), 20)
    for k, n in enumerate((5, 4, 6)):
        images = [img for img, label in (train[i] for i in range(len(train))) if label == k]
        assert len(images) == n
        np.testing.assert_allclose(means[k], np.mean(np.stack(images).astype(np.float64), axis=0), rtol=1e-6)
    assert m["mean_images"]["counts"] == [5, 4, 6] and m["mean_images"]["shape"] == [3, 20, 20, 3]
    files = [str(p) for p in tree.rglob("*.JPEG")]
    stats_sample = min(512, 16)                        # _channel_stats: an even sample of training images
    assert sorted(set(logged)) == sorted(files) and len(logged) == len(files) + stats_sample
    assert not list(out.glob("*partial*")) and not list(out.glob("*counts*"))


def test_a_file_that_cannot_be_read_stops_prepare(tmp_path, capsys):
    """A real OSError that is not a decoding one: a folder named like an image (IsADirectoryError), met by a
    writer process: prepare stops with that error in one line, nothing finished or partial left."""
    tree = write_image_tree(tmp_path / "tree", {"train": {"a": 3, "b": 3}, "val": {"a": 1, "b": 1}})
    (tree / "train" / "b" / "b_dir.JPEG").mkdir()
    out = tmp_path / "out"
    assert main(["prepare", "folder", str(tree), "--out", str(out), "--resolution", "16", "--workers", "2"]) == 2
    err = capsys.readouterr().err                       # besides the writer's progress bar (tqdm, cut off)
    assert err.count("error:") == 1 and "Traceback" not in err, err
    line = err[err.index("raytransfer prepare: error:"):].splitlines()[0]
    assert f"cannot read {tree / 'train' / 'b' / 'b_dir.JPEG'} (IsADirectoryError" in line and "not a corrupt image" in line
    assert not (out / "manifest.json").exists() and not list(out.glob("*partial*")) and not list(out.glob("*.error"))


def test_an_io_error_is_not_a_corrupt_image(tmp_path, monkeypatch):
    """An I/O error on one file (injected into the one function that opens image files, as a network
    filesystem gives it): an error, not a skipped image."""
    tree = write_image_tree(tmp_path / "tree", {"train": {"a": 3, "b": 3}, "val": {"a": 1, "b": 1}})
    victim, real_read = str(tree / "train" / "a" / "a_001.JPEG"), prep.read_file

    def flaky(path):
        if path == victim:
            raise OSError(5, "Input/output error")
        return real_read(path)

    monkeypatch.setattr(prep, "read_file", flaky)
    with pytest.raises(DatasetError, match=rf"cannot read {re.escape(victim)} \(OSError: Input/output error\)"):
        prepare("folder", tree, tmp_path / "out", resolution=16, workers=1)
    unlistable, real_iterdir = tree / "val" / "b", Path.iterdir

    def iterdir(self):                                   # a class folder the filesystem will not list
        if self == unlistable:
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    with pytest.raises(DatasetError, match=rf"^cannot read {re.escape(str(unlistable))} \(PermissionError: "
                                           r"Permission denied\): fix its permissions or the mount, then rerun$"):
        prepare("folder", tree, tmp_path / "out2", resolution=16, workers=1)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and util-linux's setpriv")
def test_permission_denied_stops_prepare(tmp_path):
    """A real permission error: a chmod 000 image, read by a prepare that runs without the capabilities
    that let root read any file (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH dropped with setpriv)."""
    import subprocess
    import sys

    tree = write_image_tree(tmp_path / "tree", {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}})
    locked = tree / "train" / "b" / "b_001.JPEG"
    locked.chmod(0o000)
    p = subprocess.run(["setpriv", "--bounding-set", "-dac_override,-dac_read_search", sys.executable, "-m",
                        "raytransfer.cli", "prepare", "folder", str(tree), "--out", str(tmp_path / "out"),
                        "--resolution", "16", "--workers", "1"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.count("error:") == 1 and "Traceback" not in p.stderr, p.stderr
    assert f"raytransfer prepare: error: cannot read {locked} (PermissionError" in p.stderr, p.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_class_with_only_corrupt_images_fails_clearly(tmp_path):
    tree = write_image_tree(tmp_path / "tree", {"train": {"a": 2, "b": 2}, "val": {"a": 1}})
    write_corrupt_jpeg(tree / "val" / "b" / "b_0.JPEG")
    with pytest.raises(DatasetError, match=r"1 class\(es\) have no readable val image \(e.g. \['b'\]; 1 corrupt"):
        prepare("folder", tree, tmp_path / "out", resolution=16, workers=1)
    with pytest.raises(DatasetError, match="not a prepared dataset"):
        read_manifest(tmp_path / "out")                                 # betons written, never finished


def test_interrupted_prepare_never_looks_finished(synthetic_dataset, tmp_path, monkeypatch):
    src, m = synthetic_dataset
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    real_write = prep._write_beton

    def dies_on_val(ds, path, *args):
        if path.name == "val.beton":
            path.with_name("val.beton.partial").write_bytes(b"half a beton")
            raise OSError(28, "No space left on device")
        return real_write(ds, path, *args)

    monkeypatch.setattr(prep, "_write_beton", dies_on_val)
    spec = SyntheticSpec(**TINY_SYNTHETIC)
    with pytest.raises(OSError, match="No space left"):                  # a forced rewrite dies half-way
        prepare("synthetic", None, out, resolution=None, quality=70, synthetic=spec, workers=1, force=True)
    with pytest.raises(DatasetError, match="not a prepared dataset.*raytransfer prepare"):
        build_half_loaders(out, [m["classes"][0]["id"]], CropSpec("paper", 32), 4, device=CPU, seed=0)
    monkeypatch.setattr(prep, "_write_beton", real_write)
    done = prepare("synthetic", None, out, resolution=None, quality=70, synthetic=spec, workers=1)
    assert not list(out.glob("*.partial")) and read_manifest(out) == done      # the rerun finishes it


def test_beton_that_differs_from_manifest_is_refused(synthetic_dataset, tmp_path):
    src, m = synthetic_dataset
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    with open(out / "train.beton", "r+b") as f:                          # cut short, e.g. a copy that died
        f.truncate(m["betons"]["train"]["bytes"] // 2)
    for attempt in (lambda: verify_betons(out, m),
                    lambda: build_half_loaders(out, [m["classes"][0]["id"]], CropSpec("paper", 32), 4, CPU, 0),
                    lambda: prepare("synthetic", None, out, resolution=None, synthetic=SyntheticSpec(**TINY_SYNTHETIC))):
        with pytest.raises(DatasetError, match=r"train.beton is missing or differs .* with --force"):
            attempt()
    fixed = prepare("synthetic", None, out, resolution=None, synthetic=SyntheticSpec(**TINY_SYNTHETIC),
                    workers=1, force=True)                               # the advised fix works
    assert fixed["fingerprint"] == m["fingerprint"]
    verify_betons(out, fixed)


# -- bad input: one clear message each -------------------------------------------------------------

def test_missing_dataset_folder(tmp_path):
    for source in ("folder", "imagenet"):
        with pytest.raises(DatasetError, match=re.escape(f"dataset folder {tmp_path / 'nope'} does not exist")):
            prepare(source, tmp_path / "nope", tmp_path / "out")
    with pytest.raises(DatasetError, match="needs the dataset folder"):
        prepare("folder", None, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_train_without_val(tmp_path):
    write_image_tree(tmp_path / "d", {"train": {"a": 1, "b": 1}})
    with pytest.raises(DatasetError, match=r"has train/ but no val/.*add .*val/<class>/<image>"):
        prepare("folder", tmp_path / "d", tmp_path / "out")
    with pytest.raises(DatasetError, match=r"has train/ but no val/"):
        prepare("imagenet", write_image_tree(tmp_path / "i", {"train": {TENCH: 1}}), tmp_path / "out")


def test_empty_or_missing_class_folder(tmp_path):
    tree = write_image_tree(tmp_path / "d", {"train": {"a": 1, "b": 1}, "val": {"a": 1, "b": 1}})
    (tree / "train" / "c").mkdir()
    with pytest.raises(DatasetError, match=r"class folder .*train/c is empty"):
        prepare("folder", tree, tmp_path / "out")
    (tree / "train" / "c" / "c_0.JPEG").write_bytes((tree / "train" / "a" / "a_000.JPEG").read_bytes())
    with pytest.raises(DatasetError, match=r"class folder .*val/c is missing"):
        prepare("folder", tree, tmp_path / "out")


def test_bad_settings(tmp_path):
    for kw, msg in (({"format": "png"}, "unknown beton format 'png'; expected one of jpg, raw"),
                    ({"resolution": 4}, "stored resolution 4 is outside 8..2048"),
                    ({"quality": 0}, "JPEG quality 0 is outside 1..100")):
        with pytest.raises(DatasetError, match=msg):
            prepare("synthetic", None, tmp_path / "out", **kw)
    with pytest.raises(DatasetError, match="unknown source 'coco'; expected one of synthetic, imagenet, folder"):
        prepare("coco", tmp_path, tmp_path / "out")


def test_other_settings_into_same_out(folder_tree, folder_dataset):
    out, m = folder_dataset
    with pytest.raises(DatasetError, match="already holds betons of another dataset or other settings.*--force"):
        prepare("folder", folder_tree, out, resolution=48)
    assert read_manifest(out) == m


def test_cli_one_error_line(folder_tree, folder_dataset, tmp_path, capsys):
    out, m = folder_dataset
    assert main(["prepare", "folder", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("raytransfer prepare: error: dataset folder") and "nope" in err[0]
    assert main(["prepare", "folder", str(folder_tree), "--out", str(out), "--quality", "50"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--force" in err[0]
    assert main(["prepare", "folder", str(folder_tree), "--out", str(out), "--resolution", "32"]) == 0
    assert m["fingerprint"][:12] in capsys.readouterr().out                # same settings: the fast path
    assert json.loads((out / "manifest.json").read_text()) == m


def _can_mount_tmpfs(where) -> bool:
    import subprocess
    return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


@pytest.mark.timeout(300)
def test_disk_full_while_writing_a_beton(tmp_path, monkeypatch):
    """A disk that fills up *during* a beton write (a real 4 MiB tmpfs; the free-space estimate is
    bypassed): FFCV's writer process dies with ENOSPC. One clear error instead of a wait forever;
    nothing partial is left that could pass as a dataset."""
    import subprocess
    small = tmp_path / "small"
    small.mkdir()
    if not _can_mount_tmpfs(small):
        pytest.skip("needs permission to mount a tmpfs (root)")
    try:
        monkeypatch.setattr(prep, "_check_free_space", lambda *a: None)
        spec = SyntheticSpec(train_per_class=120, val_per_class=2, superclasses_per_family=2, classes_per_superclass=2)
        with pytest.raises(DatasetError, match=r"train.beton failed .*the disk is full: free space or choose another"):
            prepare("synthetic", None, small / "data", resolution=64, format="raw", synthetic=spec, workers=2)
        assert not list((small / "data").glob("*.partial")) and not (small / "data" / "manifest.json").exists()
    finally:
        subprocess.run(["umount", "--lazy", str(small)], check=False)
