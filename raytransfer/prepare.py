"""Datasets to FFCV betons: `train.beton`, `val.beton` and `manifest.json`, once per dataset and settings.

Sources: ImageNet ILSVRC2012 as people have it (`train/<wnid>/*.JPEG`; `val/` in class folders, or
flat with Kaggle's `LOC_val_solution.csv` or the official devkit's `ILSVRC2012_validation_ground_truth.txt`
(its ids in the devkit's own synset order, `data/meta.mat`)), any class-folder tree with `train/` and `val/` (optionally
with a superclass level, `train/<superclass>/<class>/`, or a CSV of class,superclass rows), or the
built-in synthetic dataset. One beton per split for the whole dataset: a half is read through the
loader's `indices`, never copied.

    manifest = prepare("synthetic", None, Path("data/synthetic"))
    manifest = prepare("imagenet", Path("/data/ILSVRC2012"), Path("/mnt/betons/imagenet"), resolution=256)

A beton is written as `*.beton.partial` and renamed when complete; the manifest is written last,
with the betons' sizes, so a half-written or replaced beton never passes as finished. Images that
cannot be decoded are written as a 1-pixel placeholder with label -1 (never selected by any half) and
counted; a file that cannot be read (permission, I/O, network) stops prepare with that error. The class
mean images are summed in the pass that writes the training beton (each image is decoded once).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .synthetic import FAMILIES, SyntheticImages, SyntheticSpec

log = logging.getLogger(__name__)

SOURCES = ("synthetic", "imagenet", "folder")
FORMATS = ("jpg", "raw")
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")
CORRUPT_LABEL = -1
MANIFEST = "manifest.json"


class DatasetError(ValueError):
    """Bad dataset input: the message names the problem and the fix."""


class ImageReadError(DatasetError):
    """An image file that could not be read at all (not a corrupt image: a permission, I/O or network error)."""


@dataclass(frozen=True)
class BetonSettings:
    """How images are stored. resolution: side of the stored square (the paper squashed to 256);
    None keeps the synthetic images' native size. format: 'jpg' (quality) or 'raw' pixels."""
    resolution: int | None = 256
    format: str = "jpg"
    quality: int = 90

    def check(self):
        if self.format not in FORMATS:
            raise DatasetError(f"unknown beton format {self.format!r}; expected one of {', '.join(FORMATS)}")
        if self.resolution is not None and not 8 <= self.resolution <= 2048:
            raise DatasetError(f"stored resolution {self.resolution} is outside 8..2048 px")
        if not 1 <= self.quality <= 100:
            raise DatasetError(f"JPEG quality {self.quality} is outside 1..100")

    def to_dict(self):
        return {"resolution": self.resolution, "format": self.format, "quality": self.quality}


# ---------------------------------------------------------------------------------------------
# Sources: each returns (classes, {"train": [(path, label)], "val": [...]}) with classes sorted by id.

def discover_folder(root: Path, superclass_file: Path | None = None):
    """A class-folder tree: root/train/<class>/*.jpg and root/val/<class>/*.jpg; or, with a superclass
    level, root/train/<superclass>/<class>/*.jpg (val/ likewise, or flat). Superclass tags (what the
    dissimilar split divides by) come from that level or from a CSV of class,superclass rows."""
    root = _existing_dir(root)
    train_dir, val_dir = root / "train", root / "val"
    if not train_dir.is_dir():
        raise DatasetError(f"{root} has no train/ folder: expected {root}/train/<class>/<image> and {root}/val/<class>/<image>")
    if not val_dir.is_dir():
        raise DatasetError(f"{root} has train/ but no val/: the paper's metric is top-1 on held-out images; "
                           f"add {root}/val/<class>/<image> (same class folders as train/)")
    train = _class_dirs(train_dir)
    ids = sorted(train)
    if len(ids) < 2:
        raise DatasetError(f"{train_dir} holds {len(ids)} class folders; a split needs at least 2")
    tags = {c: sc for c, (_, sc) in train.items()}
    layered = any(sc is not None for sc in tags.values())
    if superclass_file is not None:
        if layered:
            raise DatasetError(f"{train_dir} already has a superclass level (train/<superclass>/<class>/); "
                               f"drop --superclasses {superclass_file}, or flatten the tree")
        tags, order = read_superclass_file(superclass_file, ids)
    else:
        order = sorted(set(tags.values())) if layered else None
    if order is not None and len(order) < 2:
        where = superclass_file or f"{train_dir}/<superclass>/"
        raise DatasetError(f"{where} gives every class the one superclass {order[0]!r}: the dissimilar split "
                           "divides the classes by superclass, so it needs at least two; add another superclass, "
                           "or drop the superclass level (train/<class>/) and use similar splits")
    val = _class_dirs(val_dir)
    moved = [f"{c} ({tags[c]} in train/, {val[c][1]} in val/)" for c in ids
             if layered and c in val and val[c][1] not in (None, tags[c])]
    if moved:
        raise DatasetError(f"{len(moved)} class(es) sit under other superclasses in val/ than in train/: "
                           f"{', '.join(moved[:3])}; give each class one superclass")
    classes = [{"id": c, "name": c, "superclass": tags[c] if order else None} for c in ids]
    samples = {"train": _class_folder_samples(train_dir, ids, {c: d for c, (d, _) in train.items()}),
               "val": _class_folder_samples(val_dir, ids, {c: d for c, (d, _) in val.items()})}
    return classes, samples, order


def _class_dirs(split_dir: Path) -> dict[str, tuple[Path, str | None]]:
    """{class id: (folder, superclass or None)} of split_dir/<class>/ or split_dir/<superclass>/<class>/."""
    entries = sorted(d for d in split_dir.iterdir() if d.is_dir())
    has_images = {d: any(f.suffix.lower() in IMAGE_EXTENSIONS for f in d.iterdir()) for d in entries}
    superclasses = [d for d in entries if not has_images[d] and any(x.is_dir() for x in d.iterdir())]
    if not superclasses:
        return {d.name: (d, None) for d in entries}
    flat = [d.name for d in entries if has_images[d]]
    if flat:
        raise DatasetError(f"{split_dir} mixes class folders with images ({', '.join(flat[:3])}) and superclass "
                           f"folders of class folders ({', '.join(d.name for d in superclasses[:3])}): use one layout, "
                           f"{split_dir.name}/<class>/<image> or {split_dir.name}/<superclass>/<class>/<image>")
    out, seen = {}, {}
    for sc in superclasses:
        for d in sorted(x for x in sc.iterdir() if x.is_dir()):
            if d.name in out:
                raise DatasetError(f"class {d.name!r} is under two superclasses of {split_dir} ({seen[d.name]} and "
                                   f"{sc.name}): class folder names must be unique across superclasses")
            out[d.name], seen[d.name] = (d, sc.name), sc.name
    return out


def read_superclass_file(path: Path, ids: list[str]) -> tuple[dict[str, str], list[str]]:
    """({class: superclass}, superclass order) from a CSV of class,superclass rows (a header row is
    allowed); the order is that of first appearance, so the first superclass listed is half A."""
    try:
        with open(path, newline="") as f:
            rows = [[cell.strip() for cell in row] for row in csv.reader(f) if any(cell.strip() for cell in row)]
    except OSError as e:
        raise DatasetError(f"cannot read the superclass file {path}: {e}") from None
    if rows and [c.lower() for c in rows[0][:2]] == ["class", "superclass"]:
        rows = rows[1:]
    bad = [i for i, row in enumerate(rows, 1) if len(row) != 2 or not all(row)]
    if bad:
        raise DatasetError(f"{path}: every row must be `class,superclass` (row {bad[0]} is not)")
    tags = {}
    for c, sc in rows:
        if tags.setdefault(c, sc) != sc:
            raise DatasetError(f"{path} gives class {c!r} two superclasses ({tags[c]!r} and {sc!r}); give it one")
    unknown, missing = sorted(set(tags) - set(ids)), [c for c in ids if c not in tags]
    if unknown:
        raise DatasetError(f"{path} names {len(unknown)} class(es) the tree does not have ({', '.join(unknown[:3])}); "
                           "use the class folder names of train/")
    if missing:
        raise DatasetError(f"{path} gives no superclass to {len(missing)} class(es) ({', '.join(missing[:3])}): "
                           "list every class folder of train/ once")
    return tags, list(dict.fromkeys(tags[c] for c, _ in rows))


def discover_imagenet(root: Path, val_labels: Path | None = None):
    """ILSVRC2012: train/<wnid>/*.JPEG; val/<wnid>/*.JPEG, or flat val/*.JPEG with Kaggle's LOC_val_solution.csv
    or the devkit's ILSVRC2012_validation_ground_truth.txt (+ its data/meta.mat)."""
    from .splits import builtin_classes

    root = _existing_dir(root)
    if not (root / "train").is_dir():
        raise DatasetError(f"{root} has no train/ folder: point at the folder holding ILSVRC2012's train/ and val/ "
                           "(for Kaggle's layout: ILSVRC/Data/CLS-LOC)")
    wnids = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    known = {c["id"]: c for c in builtin_classes("imagenet-1k")}
    unknown = [w for w in wnids if w not in known]
    if unknown:
        raise DatasetError(f"{len(unknown)} train folders are not ILSVRC2012 wnids (e.g. {unknown[:3]}); "
                           "use `raytransfer prepare folder` for other class-folder trees")
    classes = [dict(known[w]) for w in wnids]
    samples = {"train": _class_folder_samples(root / "train", wnids)}
    val_dir = root / "val"
    if not val_dir.is_dir():
        raise DatasetError(f"{root} has train/ but no val/: put ILSVRC2012's validation images in {val_dir}")
    if any(d.is_dir() for d in val_dir.iterdir()):
        samples["val"] = _class_folder_samples(val_dir, wnids)
    else:
        samples["val"] = _flat_val_samples(val_dir, wnids, val_labels or _find_val_labels(root))
    return classes, samples


def _existing_dir(root) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist (or is not a folder): check the path")
    return root


def _class_folder_samples(split_dir: Path, ids: list[str], dirs: dict[str, Path] | None = None):
    out = []
    for label, cid in enumerate(ids):
        d = (dirs or {}).get(cid, split_dir / cid)
        files = sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS) if d.is_dir() else []
        if not files:
            raise DatasetError(f"class folder {d} is {'empty' if d.is_dir() else 'missing'}: every class needs "
                               f"images in {split_dir.name}/ (remove the class from train/ or add its images)")
        out += [(str(f), label) for f in files]
    return out


KAGGLE_VAL_LABELS = "LOC_val_solution.csv"
DEVKIT_VAL_LABELS = "ILSVRC2012_validation_ground_truth.txt"
DEVKIT = "ILSVRC2012_devkit_t12"
VAL_LABEL_FILES = (KAGGLE_VAL_LABELS, DEVKIT_VAL_LABELS, f"data/{DEVKIT_VAL_LABELS}", f"{DEVKIT}/data/{DEVKIT_VAL_LABELS}")


def _find_val_labels(root: Path) -> Path:
    for d in [root, *list(root.parents)[:4]]:
        for name in VAL_LABEL_FILES:
            if (d / name).is_file():
                return d / name
    raise DatasetError(f"{root}/val is flat but no validation labels were found in {root} or its parents "
                       f"(Kaggle's {KAGGLE_VAL_LABELS}, or the devkit's {DEVKIT}/data/{DEVKIT_VAL_LABELS}): "
                       "pass --val-labels FILE, or sort val/ into class folders")


def read_val_labels(labels_file: Path) -> dict[str, str]:
    """{val image id (file name without suffix): wnid} from Kaggle's LOC_val_solution.csv or the devkit's
    ILSVRC2012_validation_ground_truth.txt (a devkit folder works too); a file it cannot use: DatasetError."""
    labels_file = Path(labels_file)
    if labels_file.is_dir():                     # the devkit folder (or its data/)
        found = [labels_file / n for n in (f"data/{DEVKIT_VAL_LABELS}", DEVKIT_VAL_LABELS) if (labels_file / n).is_file()]
        if not found:
            raise DatasetError(f"--val-labels {labels_file} is a folder without data/{DEVKIT_VAL_LABELS}: give "
                               f"{KAGGLE_VAL_LABELS} or the devkit's {DEVKIT_VAL_LABELS}")
        labels_file = found[0]
    try:
        text = labels_file.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read the validation labels {labels_file} ({type(e).__name__}: {e}): give "
                           f"{KAGGLE_VAL_LABELS} or the devkit's {DEVKIT_VAL_LABELS} with --val-labels") from None
    first = text.lstrip().split("\n", 1)[0]
    if "," in first:                               # a CSV: Kaggle's, or one without its columns
        return _kaggle_val_labels(labels_file, text)
    if first.strip().isdigit():
        return _devkit_val_labels(labels_file, text)
    raise DatasetError(f"{labels_file} is neither Kaggle's {KAGGLE_VAL_LABELS} (header ImageId,PredictionString) "
                       f"nor the devkit's {DEVKIT_VAL_LABELS} (one class id per line): pass one of those "
                       "with --val-labels")


def _kaggle_val_labels(labels_file: Path, text: str) -> dict[str, str]:
    out = {}
    reader = csv.DictReader(io.StringIO(text))
    if not {"ImageId", "PredictionString"} <= set(reader.fieldnames or []):
        raise DatasetError(f"{labels_file} lacks the ImageId and PredictionString columns of Kaggle's "
                           f"{KAGGLE_VAL_LABELS} (it has {reader.fieldnames})")
    for line, row in enumerate(reader, 2):
        words = (row["PredictionString"] or "").split()
        if not row["ImageId"] or not words:
            raise DatasetError(f"{labels_file} line {line}: expected `ImageId,wnid x y x y ...`, got {row}")
        out[row["ImageId"]] = words[0]
    return out


def _devkit_val_labels(labels_file: Path, text: str) -> dict[str, str]:
    """The devkit's ground truth: line k holds the class id (1-based, in meta.mat's synset order, which is
    not the sorted wnids) of ILSVRC2012_val_<k:08d>.JPEG; meta.mat lies beside it (data/ of the devkit)."""
    ids = []
    for line, value in enumerate(text.split(), 1):
        if not value.isdigit():
            raise DatasetError(f"{labels_file} line {line}: {value!r} is not a class id; the devkit's "
                               f"{DEVKIT_VAL_LABELS} holds one integer per line")
        ids.append(int(value))
    wnid_of_id = _devkit_synsets(labels_file.with_name("meta.mat"))
    unknown = sorted(set(ids) - set(wnid_of_id))
    if unknown:
        raise DatasetError(f"{labels_file} names class id {unknown[0]}, which {labels_file.with_name('meta.mat')} "
                           "does not list among its 1000 classes: the two files are from different devkits?")
    return {f"ILSVRC2012_val_{k:08d}": wnid_of_id[i] for k, i in enumerate(ids, 1)}


def _devkit_synsets(meta: Path) -> dict[int, str]:
    """{ILSVRC2012_ID: WNID} of the classes (leaf synsets) in the devkit's data/meta.mat."""
    import scipy.io

    if not meta.is_file():
        raise DatasetError(f"{meta} is missing: the devkit's {DEVKIT_VAL_LABELS} numbers classes in the order "
                           "of its meta.mat (not the sorted wnids); keep the devkit's data/ folder whole")
    try:
        synsets = scipy.io.loadmat(str(meta), squeeze_me=True)["synsets"]
        out = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in np.atleast_1d(synsets)
               if int(s["num_children"]) == 0}
    except Exception as e:                         # scipy's MatReadError, a struct without these fields, ...
        raise DatasetError(f"cannot read the classes of {meta} ({type(e).__name__}: {e}): it must be the "
                           "ILSVRC2012 devkit's data/meta.mat (a 'synsets' struct with ILSVRC2012_ID, WNID, "
                           "num_children)") from None
    if not out:
        raise DatasetError(f"{meta} lists no classes (no synset with num_children 0)")
    return out


def _flat_val_samples(val_dir: Path, wnids: list[str], labels_file: Path):
    label_of = {w: i for i, w in enumerate(wnids)}
    wnid_of = read_val_labels(labels_file)
    out = []
    for img in sorted(val_dir.iterdir()):
        if img.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        w = wnid_of.get(img.stem)
        if w is None:
            raise DatasetError(f"{img.name} is not listed in {labels_file}: wrong labels file?")
        if w in label_of:                  # a val image of a class absent from train/ is left out
            out.append((str(img), label_of[w]))
    if not out:
        raise DatasetError(f"no images of the train/ classes found in {val_dir}")
    return out


# ---------------------------------------------------------------------------------------------
# Indexed datasets that FFCV's DatasetWriter reads in its worker processes.

def read_file(path: str) -> bytes:
    """A file's bytes (a module function: the one place prepare reads an image file)."""
    with open(path, "rb") as f:
        return f.read()


class ImageFiles:
    """Files to (HxWx3 uint8, label). A file that cannot be read (permission, I/O, network) raises
    ImageReadError; one whose bytes PIL cannot decode becomes a placeholder with label -1."""

    def __init__(self, samples, resolution: int | None):
        self.samples, self.resolution = samples, resolution

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        try:
            data = read_file(path)
        except OSError as e:
            raise ImageReadError(f"cannot read {path} ({type(e).__name__}: {e.strerror or e}): not a corrupt image "
                                 "but a file the disk or network would not give; fix its permissions or the mount, "
                                 "then rerun (nothing partial is kept)") from None
        try:
            with Image.open(io.BytesIO(data)) as im:
                im = im.convert("RGB")
                if self.resolution:
                    im = im.resize((self.resolution, self.resolution), Image.BILINEAR)   # paper: squashed to 256x256
                return np.asarray(im, dtype=np.uint8), label
        except Exception:                       # truncated or corrupt: skipped by every loader, counted
            return np.zeros((1, 1, 3), dtype=np.uint8), CORRUPT_LABEL


class SummingClasses:
    """A dataset that passes `ds`'s items through and adds each readable image to its class's sum as it is
    produced, so the class mean images come from the pass that writes the beton. FFCV's writer reads items
    in worker processes: the sums live in file-backed shared maps (uint32: exact for up to 16.8M images
    a class), each class's row added under one of a few process-shared locks."""

    LOCKS = 64

    def __init__(self, ds, n_classes: int, side: int, path: Path):
        self.ds, self.n_classes, self.side = ds, n_classes, side
        self.paths = (Path(path), Path(path).with_name(Path(path).stem + "-counts.npy"))
        for p, shape in zip(self.paths, ((n_classes, side, side, 3), (n_classes,))):
            np.lib.format.open_memmap(p, mode="w+", dtype=np.uint32, shape=shape).flush()
        self.locks = [multiprocessing.Lock() for _ in range(self.LOCKS)]
        self._maps = None

    def __getstate__(self):                        # a spawned writer process opens the maps itself
        return {**self.__dict__, "_maps": None}

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        img, label = self.ds[i]
        if label != CORRUPT_LABEL:
            if img.shape != (self.side, self.side, 3):
                raise DatasetError(f"image {i} is {img.shape[1]}x{img.shape[0]} px, not the stored {self.side} px")
            if self._maps is None:
                self._maps = [np.load(p, mmap_mode="r+") for p in self.paths]
            sums, counts = self._maps
            with self.locks[label % self.LOCKS]:
                sums[label] += img
                counts[label] += 1
        return img, label

    def mean_images(self) -> tuple[np.ndarray, np.ndarray]:
        """(C x H x W x 3 float32 means, per-class counts) of the images that went through."""
        sums, counts = (np.load(p, mmap_mode="r") for p in self.paths)
        counts = np.asarray(counts, dtype=np.int64)
        if (counts == 0).any():
            raise DatasetError(f"{int((counts == 0).sum())} class(es) have no readable training image")
        means = np.empty(sums.shape, dtype=np.float32)
        for c in range(self.n_classes):                  # a class at a time: ImageNet's sums are 0.8 GB
            means[c] = sums[c] / counts[c]
        return means, counts

    def remove(self):
        self._maps = None
        for p in self.paths:
            p.unlink(missing_ok=True)


class ResizedSynthetic:
    def __init__(self, spec: SyntheticSpec, split: str, resolution: int | None):
        self.images, self.resolution = SyntheticImages(spec, split), resolution

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img, label = self.images[i]
        if self.resolution and self.resolution != img.shape[0]:
            img = np.asarray(Image.fromarray(img).resize((self.resolution,) * 2, Image.BILINEAR))
        return img, label


# ---------------------------------------------------------------------------------------------

def prepare(source: str, path: Path | None, out: Path, resolution: int | None = None, format: str | None = None,
            quality: int = 90, synthetic: SyntheticSpec | None = None, val_labels: Path | None = None,
            workers: int | None = None, force: bool = False, superclass_file: Path | None = None) -> dict:
    """Write the betons and manifest of one dataset into `out`; nothing to do if already done.
    `superclass_file`: a CSV of class,superclass rows for a folder tree without a superclass level."""
    out = Path(out)
    spec = synthetic or SyntheticSpec()
    if resolution is None:                       # the paper's 256 px squares; synthetic images at their own size
        resolution = spec.size if source == "synthetic" else 256
    if format is None:                           # tiny synthetic images: raw (JPEG q90 cost ~10 points top-1 at 32 px)
        format = "raw" if source == "synthetic" else "jpg"
    settings = BetonSettings(resolution, format, quality)
    settings.check()
    if source == "synthetic":
        classes = spec.classes()
        datasets = {s: ResizedSynthetic(spec, s, resolution) for s in ("train", "val")}
        identity = {"synthetic": spec.to_dict()}
        name, superclass_order = "synthetic", list(FAMILIES)
    elif source in ("imagenet", "folder"):
        if path is None:
            raise DatasetError(f"`prepare {source}` needs the dataset folder")
        if superclass_file is not None and source != "folder":
            raise DatasetError(f"--superclasses applies to `prepare folder` only, not {source}")
        try:                                     # listing the tree: a folder it cannot read is an error, not "empty"
            if source == "imagenet":
                classes, samples = discover_imagenet(path, val_labels)
                superclass_order = ["man-made", "natural"]
            else:
                classes, samples, superclass_order = discover_folder(path, superclass_file)
            identity = {s: _listing_digest(Path(path), samples[s]) for s in ("train", "val")}
        except OSError as e:
            raise DatasetError(f"cannot read {e.filename or path} ({type(e).__name__}: {e.strerror or e}): fix its "
                               "permissions or the mount, then rerun") from None
        datasets = {s: ImageFiles(samples[s], resolution) for s in ("train", "val")}
        if source == "folder" and superclass_order:      # tags make other dissimilar splits: another dataset
            identity["superclasses"] = {"order": superclass_order, "of": {c["id"]: c["superclass"] for c in classes}}
        name = "imagenet-1k" if source == "imagenet" and len(classes) == 1000 else Path(path).resolve().name
    else:
        raise DatasetError(f"unknown source {source!r}; expected one of {', '.join(SOURCES)}")
    for i, c in enumerate(classes):
        c["index"] = i
    fingerprint = _sha256({"source": source, "identity": identity, "classes": [c["id"] for c in classes],
                           "settings": settings.to_dict(), "layout": 1})

    existing = read_manifest(out, missing_ok=True)
    if existing is not None and not force:
        if existing["fingerprint"] == fingerprint:
            verify_betons(out, existing)
            if settings.resolution and "mean_images" not in existing:     # prepared before mean images existed
                existing["mean_images"] = _write_mean_images(datasets["train"], out, len(classes),
                                                             workers or len(os.sched_getaffinity(0)))
                _atomic_write_json(out / MANIFEST, existing)
                log.info("%s: added the class mean images (betons unchanged)", out)
                return existing
            log.info("%s is up to date (fingerprint %s): nothing to do", out, fingerprint[:12])
            return existing
        raise DatasetError(f"{out} already holds betons of another dataset or other settings "
                           f"({_describe(existing)}); pass --force to overwrite them, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)          # from here on the folder is not finished
    workers = workers or len(os.sched_getaffinity(0))
    _check_free_space(out, sum(len(d) for d in datasets.values()), settings, len(classes))
    t0 = time.time()
    stats, summed = {}, None
    try:
        for split, ds in datasets.items():
            if split == "train" and settings.resolution:       # the class mean images, summed as the beton is written
                ds = summed = SummingClasses(ds, len(classes), settings.resolution, out / CLASS_SUMS)
            stats[split] = _write_beton(ds, out / f"{split}.beton", settings, workers, len(classes))
        mean_images = _save_mean_images(summed, out) if summed is not None else None
    finally:
        if summed is not None:
            summed.remove()
    mean, std = _channel_stats(datasets["train"])
    manifest = {
        "name": name, "source": source, "classes": classes, "superclass_order": superclass_order,
        "source_path": None if path is None else str(Path(path).resolve()),
        "superclass_file": None if superclass_file is None else str(Path(superclass_file).resolve()),
        "settings": settings.to_dict(), "identity": identity, "fingerprint": fingerprint,
        "counts": {s: {"images": st["images"], "corrupt": st["corrupt"], "per_class": st["per_class"]}
                   for s, st in stats.items()},
        "corrupt_files": {s: [datasets[s].samples[i][0] for i in st["corrupt_ids"]]
                          for s, st in stats.items() if hasattr(datasets[s], "samples")},
        "betons": {s: {"file": f"{s}.beton", "bytes": (out / f"{s}.beton").stat().st_size} for s in stats},
        "mean": mean, "std": std, "write_s": round(time.time() - t0, 2),
    }
    if mean_images:
        manifest["mean_images"] = mean_images
    for split, st in stats.items():
        empty = [classes[k]["id"] for k, n in enumerate(st["per_class"]) if n == 0]
        if empty:
            raise DatasetError(f"{len(empty)} class(es) have no readable {split} image (e.g. {empty[:5]}; "
                               f"{st['corrupt']} corrupt {split} files in all): fix or add their images, then rerun")
    _atomic_write_json(out / MANIFEST, manifest)
    log.info("wrote %s in %.1f s: %s", out, manifest["write_s"], _describe(manifest))
    return manifest


def read_manifest(data_dir: Path, missing_ok: bool = False) -> dict | None:
    """The manifest of a prepared dataset folder (None if absent and missing_ok)."""
    f = Path(data_dir) / MANIFEST
    if not f.is_file():
        if missing_ok:
            return None
        hint = (f"run `raytransfer prepare ... --out {data_dir}` first" if Path(data_dir).is_dir()
                else "check the path, or run `raytransfer prepare` to create it")
        raise DatasetError(f"{data_dir} is not a prepared dataset (no {MANIFEST}): {hint}")
    return json.loads(f.read_text())


def verify_betons(data_dir: Path, manifest: dict):
    """The betons named in the manifest exist with the sizes written there (not partial, not replaced)."""
    for split, b in manifest["betons"].items():
        f = Path(data_dir) / b["file"]
        if not f.is_file() or f.stat().st_size != b["bytes"]:
            raise DatasetError(f"{f} is missing or differs from the one its manifest describes "
                               f"(expected {b['bytes']} bytes): rerun `raytransfer prepare` with --force")


def _write_beton(ds, path: Path, settings: BetonSettings, workers: int, n_classes: int) -> dict:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.writer import DatasetWriter

    IMAGE_MODES[settings.format]    # compiles numba's typed-dict lookup here once, not in each writer process (~1 s)
    partial = path.with_name(path.name + ".partial")
    partial.unlink(missing_ok=True)
    path.unlink(missing_ok=True)
    image_field = RGBImageField(write_mode=settings.format, jpeg_quality=settings.quality,
                                max_resolution=settings.resolution)
    writer = DatasetWriter(str(partial), {"image": image_field, "label": IntField()}, num_workers=workers)
    try:
        with _WriterWatchdog(path) as watchdog:
            writer.from_indexed_dataset(ds, chunksize=max(16, min(256, len(ds) // (4 * workers) or 16)))
    except (OSError, _WriterDied) as e:
        free = shutil.disk_usage(path.parent).free            # before the partial file's space comes back
        partial.unlink(missing_ok=True)
        sm = getattr(writer, "metadata_sm", None)              # FFCV frees its shared memory only on success
        if hasattr(sm, "unlink"):
            sm.close()
            sm.unlink()
        if watchdog.input_error:
            raise DatasetError(watchdog.input_error) from None
        why = watchdog.failure or f"{type(e).__name__}: {e}"
        hint = ("the disk is full: free space or choose another --out" if free < 64 * 2**20 else
                "see the writer's traceback above; rerun to retry (nothing partial is kept)")
        raise DatasetError(f"writing {path} failed ({why}; {free / 2**20:.1f} MiB were free on its disk): {hint}") from None
    labels = label_column(partial)
    os.replace(partial, path)
    good = labels[labels != CORRUPT_LABEL]
    return {"images": int(len(good)), "corrupt": int((labels == CORRUPT_LABEL).sum()),
            "corrupt_ids": np.flatnonzero(labels == CORRUPT_LABEL).tolist(),
            "per_class": np.bincount(good, minlength=n_classes).tolist()}


class _WriterDied(Exception):
    pass


def _raise_writer_died(signum, frame):
    raise _WriterDied()


class _WriterWatchdog:
    """FFCV's DatasetWriter waits forever when one of its writer processes dies (e.g. ENOSPC in the
    middle of a beton): watch the processes it starts, and interrupt the wait when one fails."""

    def __init__(self, path: Path, poll_s: float = 0.5):
        self.path, self.poll_s, self.failure, self.input_error = path, poll_s, None, None
        self.processes, self._stop = [], threading.Event()
        self.error_file = path.with_name(path.name + ".error")
        self.error_file.unlink(missing_ok=True)

    def __enter__(self):
        import ffcv.writer

        watched = self.processes

        error_file = self.error_file

        class WatchedProcess(multiprocessing.Process):
            def start(self):
                watched.append(self)
                super().start()

            def run(self):                       # an input error in a writer process: its message, not a traceback
                try:
                    super().run()
                except DatasetError as e:
                    error_file.write_text(str(e))
                    sys.exit(3)

        self._patch = (ffcv.writer, ffcv.writer.Process)
        ffcv.writer.Process = WatchedProcess
        self._in_main = threading.current_thread() is threading.main_thread()
        if self._in_main:                                # the writer may be blocked in a read: a real signal
            self._old_handler = signal.signal(signal.SIGUSR1, _raise_writer_died)
        self._thread = threading.Thread(target=self._watch, daemon=True, name="beton-writer-watchdog")
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        module, original = self._patch
        module.Process = original
        if self._in_main:
            signal.signal(signal.SIGUSR1, self._old_handler)
        return False

    def _watch(self):
        while not self._stop.wait(self.poll_s):
            dead = [p for p in list(self.processes) if p.exitcode not in (None, 0)]
            if dead:
                self.failure = f"a writer process exited with code {dead[0].exitcode}"
                if self.error_file.is_file():             # it could not read its input: that is the error
                    self.input_error = self.failure = self.error_file.read_text()
                    self.error_file.unlink(missing_ok=True)
                for p in self.processes:
                    if p.is_alive():
                        p.terminate()
                for p in self.processes:
                    p.join(timeout=10)
                if self._in_main:                  # interrupts the wait (a sleep loop or a blocking queue read)
                    signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)
                else:
                    log.error("writing %s: %s; the writer (not in the main thread) cannot be interrupted",
                              self.path, self.failure)
                return


def label_column(beton) -> np.ndarray:
    """The label of every sample, read from the beton's metadata only (no image is decoded)."""
    from ffcv.reader import Reader

    r = Reader(str(beton))
    return np.asarray(r.metadata[f"f{r.field_names.index('label')}"]).astype(np.int64)


def _channel_stats(ds, k: int = 512):
    """Per-channel mean/std (0..255 scale) from an even sample of training images."""
    idx = np.linspace(0, len(ds) - 1, min(k, len(ds))).astype(int)
    pix = [ds[i][0].reshape(-1, 3) for i in idx]
    pix = np.concatenate([p for p, i in zip(pix, idx) if p.shape[0] > 1]).astype(np.float64)
    return pix.mean(0).round(3).tolist(), pix.std(0).round(3).tolist()


MEAN_IMAGES = "class_mean_images.npy"
CLASS_SUMS = "class_sums.partial.npy"


def _save_mean_images(summed: SummingClasses, out: Path) -> dict:
    """The class mean images summed while the training beton was written, saved beside it."""
    means, counts = summed.mean_images()
    tmp = out / (MEAN_IMAGES + ".partial")
    with open(tmp, "wb") as f:
        np.save(f, means)
    os.replace(tmp, out / MEAN_IMAGES)
    return {"file": MEAN_IMAGES, "bytes": (out / MEAN_IMAGES).stat().st_size, "shape": list(means.shape),
            "counts": [int(c) for c in counts]}


def _write_mean_images(ds, out: Path, n_classes: int, workers: int) -> dict:
    """Every class's mean training image (C x H x W x 3 float32, 0..255, the stored side) beside the betons:
    the paper subtracts the mean image of the base's training set, and a half's is the count-weighted mean
    of its classes' (`mean_image`). Corrupt images are left out, as every loader leaves them out. Only for a
    folder prepared before mean images existed (it decodes the images again); a new one sums them as it
    writes the training beton (SummingClasses)."""
    labels = label_column(out / "train.beton")
    by_class = [np.flatnonzero(labels == c) for c in range(n_classes)]
    global _MEAN_DS
    _MEAN_DS = ds
    try:
        if workers > 1 and n_classes > 1:
            with multiprocessing.get_context("fork").Pool(min(workers, n_classes)) as pool:
                means = pool.map(_class_mean, by_class)
        else:
            means = [_class_mean(ids) for ids in by_class]
    finally:
        _MEAN_DS = None
    stacked = np.stack(means).astype(np.float32)
    np.save(out / MEAN_IMAGES, stacked)
    return {"file": MEAN_IMAGES, "bytes": (out / MEAN_IMAGES).stat().st_size, "shape": list(stacked.shape),
            "counts": [int(len(ids)) for ids in by_class]}


_MEAN_DS = None        # the dataset the forked mean-image workers read (not pickled)


def _class_mean(ids) -> np.ndarray:
    total = None
    for i in ids:
        img = _MEAN_DS[int(i)][0].astype(np.float64)
        total = img if total is None else total + img
    if total is None:
        raise DatasetError("a class has no readable training image")
    return (total / len(ids)).astype(np.float32)


def mean_image(data_dir, manifest: dict, class_ids) -> np.ndarray:
    """The mean training image (H x W x 3 float32, 0..255) over the classes `class_ids`: the mean of
    all their training images, from the per-class means written at prepare time."""
    info = manifest.get("mean_images")
    if info is None:
        raise DatasetError(f"{data_dir} has no mean images (prepared before they existed, or without a fixed "
                           f"--resolution); a recipe with normalize 'mean_image' needs them: rerun "
                           f"`{reprepare_command(manifest, data_dir)}`, which adds them and leaves the betons be")
    f = Path(data_dir) / info["file"]
    if not f.is_file() or f.stat().st_size != info["bytes"]:
        raise DatasetError(f"{f} is missing or differs from the one its manifest describes: rerun "
                           f"`raytransfer prepare` with --force")
    index = {c["id"]: c["index"] for c in manifest["classes"]}
    rows = np.array(sorted(index[c] for c in class_ids))
    counts = np.asarray(info["counts"], dtype=np.float64)[rows]
    means = np.load(f, mmap_mode="r")
    total = np.zeros(means.shape[1:], dtype=np.float64)
    for r, w in zip(rows, counts):
        total += w * means[r]
    return (total / counts.sum()).astype(np.float32)


def reprepare_command(manifest: dict, data_dir, resolution: int | None = None) -> str:
    """The `raytransfer prepare` command that prepared `data_dir` (same settings, same --out), or, given
    `resolution`, the one that writes it again at that stored side into `data_dir`-<side>px."""
    source = manifest.get("source", "folder")
    res = resolution or manifest["settings"].get("resolution")
    out = f"{str(data_dir).rstrip('/')}-{resolution}px" if resolution else data_dir
    extra = f" --resolution {res}" if res else ""
    if manifest["settings"].get("format") == "raw" and source != "synthetic":
        extra += " --format raw"
    if source == "synthetic":
        spec = manifest.get("identity", {}).get("synthetic", {})
        extra += f" --synthetic-seed {spec['seed']}" if spec.get("seed") else ""
        extra += f" --synthetic-train-per-class {spec['train_per_class']}" if "train_per_class" in spec else ""
        return f"raytransfer prepare synthetic --out {out}{extra}"
    if manifest.get("superclass_file"):
        extra += f" --superclasses {manifest['superclass_file']}"
    return f"raytransfer prepare {source} {manifest.get('source_path') or 'SOURCE_DIR'} --out {out}{extra}"


def _check_free_space(out: Path, n_images: int, settings: BetonSettings, n_classes: int = 0):
    side = settings.resolution or 64
    per_image = side * side * 3 * (1.0 if settings.format == "raw" else 0.15)
    sums = n_classes * side * side * 3 * (4 + 4)          # the class sums while writing (uint32), then the means
    need = int(n_images * per_image * 1.1) + sums + (64 << 20)
    free = shutil.disk_usage(out).free
    if free < need:
        raise DatasetError(f"{out} has {free / 2**30:.1f} GiB free; the betons need about {need / 2**30:.1f} GiB: "
                           "free space or choose another --out")


def _listing_digest(root: Path, samples) -> str:
    h = hashlib.sha256()
    for p, label in samples:
        h.update(f"{os.path.relpath(p, root)}\t{os.path.getsize(p)}\t{label}\n".encode())
    return h.hexdigest()


def _sha256(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _atomic_write_json(path: Path, obj):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _describe(m: dict) -> str:
    n = {s: c["images"] for s, c in m.get("counts", {}).items()}
    return (f"{m.get('name')}: {len(m.get('classes', []))} classes, {n}, settings {m.get('settings')}, "
            f"fingerprint {m.get('fingerprint', '')[:12]}")
