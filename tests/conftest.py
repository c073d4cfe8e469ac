"""Shared fixtures for the data tests: a tiny prepared synthetic dataset and a class-folder tree maker.

Betons are written once per session: importing FFCV and compiling its pipelines cost seconds.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# A session that passed can still end in a crash: CI once saw "267 passed" and then a segmentation fault
# (exit 139) while the interpreter tore down the native libraries this suite loads into one process (Ray's
# core worker, numba-compiled FFCV pipelines, torch, pyarrow); not reproduced in 30+ runs. The tests' verdict
# is final once pytest has reported it, so the session ends with pytest's exit code and skips that teardown
# (pytest's faulthandler still prints every thread's stack for a crash before then).
# RAYTRANSFER_TEST_TEARDOWN=1 runs the normal teardown (to chase that crash).
_EXIT = {}


def pytest_sessionfinish(session, exitstatus):
    _EXIT["status"] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    if os.environ.get("RAYTRANSFER_TEST_TEARDOWN") == "1" or "status" not in _EXIT:
        return
    import ray

    if ray.is_initialized():            # a test that left its Ray connected: shut it down, as atexit would
        ray.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_EXIT["status"])


@pytest.fixture
def one_thread():
    """Steps of microseconds on one thread: on the shared 2 cores a second thread mostly waits for the first."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY_SYNTHETIC = dict(train_per_class=4, val_per_class=2, superclasses_per_family=2, classes_per_superclass=2)


def random_image(rng, cls_index, i, h, w):
    """Noise with a class tint, any size: enough for writing and counting."""
    img = rng.integers(0, 200, (h, w, 3))
    img[..., cls_index % 3] += 55
    return img.astype(np.uint8)


def write_image_tree(root, counts: dict, ext: str = ".JPEG", draw=random_image, seed: int = 0) -> Path:
    """root/<split>/<class>/<class>_<i><ext> for counts = {split: {class: n}}; sizes vary 24..63 px
    unless `draw` fixes them. Classes are numbered in sorted order (the dataset's label order)."""
    root, rng = Path(root), np.random.default_rng(seed)
    for split, per_class in counts.items():
        for k, cls in enumerate(sorted(per_class)):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class[cls]):
                h, w = (int(v) for v in rng.integers(24, 64, 2))
                save_image(draw(rng, k, i, h, w), d / f"{cls}_{i:03d}{ext}")
    return root


def save_image(arr, path: Path):
    Image.fromarray(arr).save(path, **({"quality": 90} if path.suffix.lower() in (".jpg", ".jpeg") else {}))


def write_synthetic_tree(root, superclass_level: bool = True, **spec) -> Path:
    """The built-in synthetic images as a user's class-folder tree of JPEGs: root/<split>/<family>/<class>/
    (or root/<split>/<class>/ without the superclass level). Images whose classes a 28 px corner of an
    enlarged copy cannot tell apart, unlike class-tinted noise."""
    from raytransfer.synthetic import SyntheticImages, SyntheticSpec

    spec = SyntheticSpec(**spec)
    classes = spec.classes()
    for split in ("train", "val"):
        images = SyntheticImages(spec, split)
        for i in range(len(images)):
            img, label = images[i]
            c = classes[label]
            d = Path(root) / split / (c["superclass"] if superclass_level else "") / c["id"]
            d.mkdir(parents=True, exist_ok=True)
            save_image(img, d / f"{i:05d}.jpg")
    return Path(root)


def write_corrupt_jpeg(path: Path, kind: str = "truncated"):
    """A file with a JPEG name that PIL cannot decode: a JPEG cut in half, or random bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "truncated":
        good = path.with_name("_whole.jpg")
        save_image(np.random.default_rng(1).integers(0, 256, (48, 48, 3)).astype(np.uint8), good)
        data = good.read_bytes()
        good.unlink()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(np.random.default_rng(2).integers(0, 256, 3000).astype(np.uint8).tobytes())
    return path


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory):
    """(folder, manifest) of the synthetic dataset at 8 classes x (4 train, 2 val), native 36 px, JPEG."""
    from raytransfer.prepare import prepare
    from raytransfer.synthetic import SyntheticSpec

    out = tmp_path_factory.mktemp("synthetic")
    manifest = prepare("synthetic", None, out, resolution=None, synthetic=SyntheticSpec(**TINY_SYNTHETIC), workers=2)
    return out, manifest


@pytest.fixture(scope="session")
def four_class_half(tmp_path_factory):
    """(folder, class ids) of a 4-class built-in dataset stored raw at 32 px, 12 train and 4 val images a class:
    the demo's input (30 px crops from the pixel store: 18 inputs an image) at a size a loop trains in seconds."""
    from raytransfer.prepare import prepare
    from raytransfer.synthetic import SyntheticSpec

    spec = SyntheticSpec(seed=0, superclasses_per_family=2, classes_per_superclass=1, train_per_class=12,
                         val_per_class=4)
    out = tmp_path_factory.mktemp("synthetic4")
    manifest = prepare("synthetic", None, out, resolution=None, format="raw", synthetic=spec)
    return out, [c["id"] for c in manifest["classes"]]


def trial_spec(half, treatment: str, n: int, recipe) -> dict:
    """A trial's spec on four_class_half (training seed 3)."""
    return {"job_key": f"t-{treatment}-n{n}", "data_dir": str(half[0]), "target_classes": half[1],
            "treatment": treatment, "n": n, "seed": 3, "recipe": recipe.to_dict()}


def tiny_jobs(ns=(1, 2), treatments=("AnB", "BnB", "random_frozen")):
    """The jobs of a small grid on a made-up 8-class dataset (keys and dependencies only: nothing is read)."""
    from ray import tune

    from raytransfer.recipes import get_recipe
    from raytransfer.sweep.jobs import Dataset, build_jobs, expand_axes
    from raytransfer.synthetic import FAMILIES, SyntheticSpec

    classes = SyntheticSpec(superclasses_per_family=2, classes_per_superclass=2).classes()
    for i, c in enumerate(classes):
        c["index"] = i
    ds = Dataset("unused", "synthetic", "f" * 64, classes, list(FAMILIES))
    grid = {"split": tune.grid_search(["similar"]), "split_seed": 0, "target": "B", "seed": 0,
            "treatment": tune.grid_search(list(treatments)), "n": tune.grid_search(list(ns))}
    return build_jobs(expand_axes(grid), ds, get_recipe("smoke"))[0]
