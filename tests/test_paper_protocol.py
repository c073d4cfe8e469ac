"""`--scale paper` is the paper's protocol, item by item (docs/paper_protocol.md), checked on tiny data on the CPU.

Proves: the recipes print their choices; keys of unchanged recipes did not move; the mean images written at
prepare time are the class means; the paper loader yields crop(image) - crop(mean image) at one random
position and mirror; a transfer subtracts its base's mean image; fc8 has 1000 outputs and the loss uses
every logit; the two bases start apart, each reproducible; evaluations fall on the recipe's iteration
cadence; a reduced_k job sees exactly k images per class; netbase, random_frozen on the whole dataset and
reduced_k appear in --dry-run with the right dependencies; the default grid's dissimilar split holds frozen
transfers only, as the paper's did.
"""
from __future__ import annotations

import gc
import json
import runpy
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import write_image_tree

from raytransfer.loaders import CropSpec, build_half_loaders
from raytransfer.loop import eval_stops, evaluates_at
from raytransfer.prepare import DatasetError, label_column, mean_image, prepare, read_manifest
from raytransfer.recipes import get_recipe
from raytransfer.synthetic import FAMILIES, SyntheticSpec
from raytransfer.transfer import build_trial_network, init_seed_for
from raytransfer.trial import head_size, init_stream, run_trial

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
STORED, CROP = 40, 32
TRAIN = {"apple": 5, "kiwi": 3, "mango": 4, "zebra": 6}
VAL = {"apple": 2, "kiwi": 2, "mango": 2, "zebra": 2}
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")   # numba finalizers


@pytest.fixture(scope="module", autouse=True)
def collect_pipelines_here():
    yield
    gc.collect()


def noise_image(rng, k, i, h, w):
    """Noise: after the mean image is subtracted, every crop position of every image still looks different."""
    return rng.integers(0, 256, (STORED, STORED, 3)).astype(np.uint8)


@pytest.fixture(scope="module")
def xy(tmp_path_factory):
    """(folder, manifest, {split: {class: [stored images]}}): raw, stored at 40 px (crops are exact pixels)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("xy")
    tree = write_image_tree(root / "tree", {"train": TRAIN, "val": VAL}, ext=".png", draw=noise_image)
    m = prepare("folder", tree, root / "out", resolution=STORED, format="raw", workers=1)
    images = {split: {c: [np.asarray(Image.open(f)) for f in sorted((tree / split / c).iterdir())] for c in TRAIN}
              for split in ("train", "val")}
    return root / "out", m, images


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Four classes of the synthetic dataset, 32 px raw: small enough to train a few steps of the paper net."""
    out = tmp_path_factory.mktemp("tiny")
    spec = SyntheticSpec(superclasses_per_family=2, classes_per_superclass=1, train_per_class=12, val_per_class=4)
    m = prepare("synthetic", None, out, resolution=None, format="raw", synthetic=spec, workers=1)
    return out, [c["id"] for c in m["classes"]]


def tiny_paper(**overrides):
    """The paper recipe (mean image, 1000-way head, independent bases, iteration cadence) on a CPU-sized net."""
    kw = dict(width=0.125, fc_width=0.0625, crop_size=28, resize_size=32, batch_size=8, iterations=12,
              eval_every_iters=5)
    return get_recipe("paper", **{**kw, **overrides})


# ---------------------------------------------------------------------------------------------
# The recipes and the keys

def test_recipes_json_prints_every_recipes_protocol(capsys):
    from raytransfer.cli import main

    assert main(["recipes", "--json"]) == 0
    recipes = json.loads(capsys.readouterr().out)
    paper = recipes["paper"]
    assert {k: paper[k] for k in ("normalize", "head_outputs", "eval_every_iters", "iterations", "lr", "momentum",
                                  "weight_decay", "batch_size", "crop_size")} == \
        {"normalize": "mean_image", "head_outputs": 1000, "eval_every_iters": 1000, "iterations": 450_000,
         "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0005, "batch_size": 256, "crop_size": 227}
    assert paper["independent_bases"] and paper["random_frozen_on"] == "whole"
    reduced = recipes["paper_reduced"]
    assert (reduced["lr"], reduced["iterations"]) == (0.0125, 200_000)
    assert [round(m * 200_000) for m in reduced["milestones"]] == [64_000, 128_000, 192_000]   # step 64k
    assert recipes["fast"]["normalize"] == "mean_std" and recipes["fast"]["head_outputs"] is None
    assert main(["recipes"]) == 0 and "normalize" in capsys.readouterr().out


def test_the_solvers_step_at_the_papers_iterations():
    paper, reduced = get_recipe("paper"), get_recipe("paper_reduced")
    at = {i: paper.lr_at(i, paper.iterations) for i in (0, 99_999, 100_000, 200_000, 300_000, 399_999, 400_000)}
    assert at == pytest.approx({0: 0.01, 99_999: 0.01, 100_000: 1e-3, 200_000: 1e-4, 300_000: 1e-5, 399_999: 1e-5,
                                400_000: 1e-6})
    at = {i: reduced.lr_at(i, reduced.iterations) for i in (0, 63_999, 64_000, 128_000, 192_000, 199_999)}
    assert at == pytest.approx({0: 0.0125, 63_999: 0.0125, 64_000: 0.00125, 128_000: 0.000125, 192_000: 1.25e-5,
                                199_999: 1.25e-5})


# Keys computed on main before the paper-protocol fields existed: recipes they do not change keep them (the
# demo and smoke recipes changed on their own since: batch norm, stem stride, in-memory input; issue 11).
PINNED = {
    "fast": ['similar0-AnB-B-n1-s0-fast-4d95e7450a', 'similar0-AnB-B-n3-s0-fast-25036c0ce1',
             'similar0-BnBp-B-n1-s0-fast-d850baef05', 'similar0-BnBp-B-n3-s0-fast-84d2f4a8d9',
             'similar0-baseA-A-s0-fast-cf75f74950', 'similar0-baseB-B-s0-fast-fa622adcbf',
             'similar0-random_frozen-B-n1-s0-fast-95471e4908', 'similar0-random_frozen-B-n3-s0-fast-65b53fda67',
             'similar0-scratch-B-s0-fast-ce8441ed8b'],
}


def key_grid_jobs(recipe):
    from ray import tune

    from raytransfer.sweep.jobs import Dataset, build_jobs, expand_axes

    classes = SyntheticSpec(superclasses_per_family=2, classes_per_superclass=2).classes()
    for i, c in enumerate(classes):
        c["index"] = i
    ds = Dataset("unused", "synthetic", "f" * 64, classes, list(FAMILIES))
    grid = {"split": tune.grid_search(["similar"]), "split_seed": 0, "target": "B", "seed": 0,
            "treatment": tune.grid_search(["AnB", "BnB+", "random_frozen", "scratch"]), "n": tune.grid_search([1, 3])}
    return build_jobs(expand_axes(grid), ds, recipe)[0]


@pytest.mark.parametrize("name", sorted(PINNED))
def test_keys_of_recipes_whose_behaviour_did_not_change_are_pinned(name):
    # issue 21: fast reads the pixel store now (new batches, so new keys); with its old FFCV input its keys
    # are the old ones
    assert sorted(j.key for j in key_grid_jobs(get_recipe(name, input="ffcv"))) == PINNED[name]
    assert not {j.key for j in key_grid_jobs(get_recipe(name))} & set(PINNED[name])


def test_paper_keys_moved_and_random_frozen_runs_on_the_whole_dataset():
    jobs = key_grid_jobs(get_recipe("paper"))
    by_treatment = {}
    for j in jobs:
        by_treatment.setdefault(j.treatment, []).append(j)
    assert not {j.key for j in jobs} & {k.replace("fast", "paper") for k in PINNED["fast"]}
    (netbase,) = by_treatment["netbase"]
    assert netbase.deps == () and netbase.split_kind == "whole" and netbase.target_half == "all"
    assert len(netbase.spec["target_classes"]) == 8
    assert all(j.split_kind == "whole" and j.deps == () and len(j.spec["target_classes"]) == 8
               for j in by_treatment["random_frozen"])


# ---------------------------------------------------------------------------------------------
# 1. Input: the mean image at 0..255, the base's, under the image's own crop

def test_prepare_writes_every_class_mean_image(xy):
    data_dir, m, images = xy
    images = images["train"]
    means = np.load(data_dir / m["mean_images"]["file"])
    assert means.shape == (4, STORED, STORED, 3) and m["mean_images"]["counts"] == [TRAIN[c] for c in sorted(TRAIN)]
    for k, c in enumerate(sorted(TRAIN)):
        np.testing.assert_allclose(means[k], np.mean(images[c], axis=0), atol=1e-4)
    half = ["zebra", "kiwi"]
    everything = np.concatenate([images[c] for c in half]).astype(np.float64)
    np.testing.assert_allclose(mean_image(data_dir, m, half), everything.mean(0), atol=1e-4)


def _find(out: np.ndarray, images: dict, mean: np.ndarray, size: int):
    """(class, sample, oy, ox, mirrored) of the crop with out == crop(image) - crop(mean), exactly; None if none."""
    for c, imgs in images.items():
        for i, img in enumerate(imgs):
            diff = img.astype(np.float32) - mean         # Caffe: datum minus mean, position by position
            for oy in range(STORED - size + 1):
                for ox in range(STORED - size + 1):
                    crop = diff[oy:oy + size, ox:ox + size].transpose(2, 0, 1)
                    for flip in (False, True):
                        if np.array_equal(out, crop[:, :, ::-1] if flip else crop):
                            return c, i, oy, ox, flip
    return None


def test_paper_loader_yields_the_crop_minus_the_same_crop_of_the_mean_image(xy):
    data_dir, m, images = xy
    half = ["zebra", "kiwi"]
    loaders = build_half_loaders(data_dir, half, CropSpec("paper", CROP, STORED), batch_size=3, device=CPU, seed=0,
                                 val_batch_size=4, normalize="mean_image")
    mean = mean_image(data_dir, m, half)
    found = []
    for epoch in range(2):
        loaders.train.loader.next_epoch = epoch
        for batch, labels in loaders.train:
            for out, label in zip(batch.numpy(), labels.tolist()):
                hit = _find(out, {c: images["train"][c] for c in half}, mean, CROP)
                assert hit is not None, "a training image is not crop(image) - crop(mean image)"
                assert sorted(half).index(hit[0]) == label
                found.append(hit)
    assert len(found) == 2 * 9 // 3 * 3                  # every image of the half, each epoch (drop_last: 9 of 9)
    assert len({(h[2], h[3]) for h in found}) > 3 and {h[4] for h in found} == {False, True}   # random, mirrored
    off = (STORED - CROP) // 2
    for batch, _ in loaders.val:                         # validation: the centre, no mirror, Caffe's offset
        for out in batch.numpy():
            assert _find(out, {c: images["val"][c] for c in half}, mean, CROP)[2:] == (off, off, False)
    assert batch.abs().max() > 20                        # 0..255 scale, nothing divided by a std


def test_paper_loader_on_jpeg_betons_subtracts_the_mean_from_decoded_pixels(tmp_path):
    """ImageNet is stored as JPEG: the whole-image decoder there too; out + crop(mean) is the decoded uint8 crop."""
    spec = SyntheticSpec(superclasses_per_family=2, classes_per_superclass=1, train_per_class=4, val_per_class=2)
    m = prepare("synthetic", None, tmp_path, resolution=None, format="jpg", synthetic=spec, workers=1)
    classes = [c["id"] for c in m["classes"]]
    loaders = build_half_loaders(tmp_path, classes, CropSpec("paper", 28, 32), batch_size=4, device=CPU, seed=0,
                                 normalize="mean_image")
    mean = torch.as_tensor(mean_image(tmp_path, m, classes)).permute(2, 0, 1)[None, :, 2:30, 2:30]
    for images, _ in loaders.val:                        # centre: offset (32 - 28) // 2 = 2
        pixels = images + mean
        assert images.shape[1:] == (3, 28, 28) and torch.allclose(pixels, pixels.round(), atol=1e-3)
        assert pixels.min() >= -1e-3 and pixels.max() <= 255 + 1e-3
    images, _ = next(iter(loaders.train))
    assert images.shape == (4, 3, 28, 28) and torch.isfinite(images).all()


def test_a_transfer_subtracts_its_base_datasets_mean_image(tiny):
    from ray import tune

    from raytransfer.sweep.jobs import Dataset, build_jobs, expand_axes

    data_dir, classes = tiny
    m = read_manifest(data_dir)
    ds = Dataset(str(data_dir), m["name"], m["fingerprint"], m["classes"], m["superclass_order"])
    grid = {"split": "similar", "split_seed": 0, "target": "B", "seed": 0,
            "treatment": tune.grid_search(["AnB", "BnB", "scratch"]), "n": 1}
    jobs = {j.treatment: j for j in build_jobs(expand_axes(grid), ds, tiny_paper())[0]}
    a, b = jobs["baseA"].spec["target_classes"], jobs["baseB"].spec["target_classes"]
    assert jobs["AnB"].spec["mean_classes"] == a and jobs["AnB"].spec["target_classes"] == b     # base A's mean
    assert jobs["BnB"].spec["mean_classes"] == b and jobs["scratch"].spec["mean_classes"] == b
    loaders = build_half_loaders(data_dir, b, CropSpec("paper", 28, 32), batch_size=8, device=CPU, seed=0,
                                 normalize="mean_image", mean_classes=jobs["AnB"].spec["mean_classes"])
    used = loaders.train.caffe.mean[0].permute(1, 2, 0).numpy()
    assert np.array_equal(used, mean_image(data_dir, m, a)) and not np.array_equal(used, mean_image(data_dir, m, b))


def test_a_dataset_prepared_before_mean_images_says_which_command_adds_them(tmp_path):
    spec = SyntheticSpec(superclasses_per_family=2, classes_per_superclass=1, train_per_class=3, val_per_class=1)
    m = prepare("synthetic", None, tmp_path, resolution=None, format="raw", synthetic=spec, workers=1)
    old = {k: v for k, v in m.items() if k != "mean_images"}
    (tmp_path / "manifest.json").write_text(json.dumps(old))
    with pytest.raises(DatasetError, match=f"raytransfer prepare synthetic --out {tmp_path}"):
        build_half_loaders(tmp_path, [c["id"] for c in m["classes"]], CropSpec("paper", 28, 32), batch_size=4,
                           device=CPU, seed=0, normalize="mean_image")
    again = prepare("synthetic", None, tmp_path, resolution=None, format="raw", synthetic=spec, workers=1)
    assert again["mean_images"] == m["mean_images"] and again["fingerprint"] == m["fingerprint"]


# ---------------------------------------------------------------------------------------------
# 2. The head, 3. independent bases, 4. the evaluation cadence: one paper trial on tiny data

@pytest.fixture(scope="module")
def paper_trial(tiny):
    data_dir, classes = tiny
    spec = {"job_key": "t.baseA", "data_dir": str(data_dir), "target_classes": classes[:2], "treatment": "baseA",
            "n": 0, "seed": 0, "recipe": tiny_paper().to_dict()}
    histories = []
    summary = run_trial(spec, CPU, report=lambda metrics, state: histories.append(list(state["history"])))
    return summary, histories[-1]


def test_the_paper_head_has_1000_outputs_and_the_loss_uses_every_logit(paper_trial):
    summary, _ = paper_trial
    assert head_size(get_recipe("paper"), 500) == 1000 and head_size(get_recipe("fast"), 500) == 500
    assert summary["num_classes"] == 1000 and summary["state_dict"]["fc8.weight"].shape[0] == 1000
    # fc8's biases start at 0 and have no weight decay: each moved, so each of the 998 unused logits had a gradient
    assert (summary["state_dict"]["fc8.bias"][2:] != 0).all()
    net = build_trial_network("caffenet", 1000, None, 0, "scratch", 0, tiny_paper().arch_kwargs())
    logits = net(torch.randn(4, 3, 28, 28))
    logits.retain_grad()
    F.cross_entropy(logits, torch.tensor([0, 1, 0, 1])).backward()        # the loop's loss
    assert logits.shape == (4, 1000) and (logits.grad != 0).all()


def test_the_two_bases_start_apart_and_each_is_reproducible_from_its_seed():
    paper, fast = get_recipe("paper"), get_recipe("fast")
    assert (init_stream(paper, "baseA"), init_stream(paper, "baseB")) == ("baseA", "baseB")
    assert init_stream(fast, "baseA") == init_stream(fast, "baseB") == "base"      # fast keeps its behaviour
    kw = tiny_paper().arch_kwargs()

    def first_weights(treatment, seed):
        init_seed = init_seed_for(seed, init_stream(paper, treatment))
        net = build_trial_network("caffenet", 1000, None, 0, "scratch", init_seed, kw)
        return net.state_dict()["conv1.weight"]

    assert not torch.equal(first_weights("baseA", 0), first_weights("baseB", 0))
    assert torch.equal(first_weights("baseA", 0), first_weights("baseA", 0))
    assert torch.equal(first_weights("baseB", 3), first_weights("baseB", 3))
    assert not torch.equal(first_weights("baseA", 0), first_weights("baseA", 1))


def test_evaluations_fall_on_the_recipes_iteration_cadence(paper_trial):
    summary, history = paper_trial
    # 24 training images of 2 classes at batch 8: 3 steps an epoch, 12 steps, a test every 5 and at the end
    assert [h["step"] for h in history] == [5, 10, 12] and summary["evaluations"] == 3
    recipe = tiny_paper(iterations=450_000, eval_every_iters=1000)
    stops = [s + e * 2520 for e in range(179) for s in eval_stops(recipe, e, 2520)]
    assert sum(evaluates_at(recipe, s, 450_000) for s in stops if s <= 450_000) == 450   # the paper's 450 tests


# ---------------------------------------------------------------------------------------------
# 6. Reduced volume, 5. netbase and random_frozen on the whole dataset: jobs and dependencies

@pytest.mark.parametrize("k", [1, 2, 3])
def test_a_reduced_k_loader_sees_exactly_the_first_k_images_of_each_class(xy, k):
    data_dir, m, _ = xy
    classes = sorted(TRAIN)
    loaders = build_half_loaders(data_dir, classes, CropSpec("paper", CROP, STORED), batch_size=4 * k, device=CPU,
                                 seed=0, per_class=k)
    labels = label_column(data_dir / "train.beton")
    ids = loaders.train.ids
    assert Counter(labels[ids].tolist()) == {c: k for c in range(4)}
    for c in range(4):
        assert ids[labels[ids] == c].tolist() == np.flatnonzero(labels == c)[:k].tolist()   # the first k, in order
    seen = Counter(label for _, batch in loaders.train for label in batch.tolist())
    assert seen == {c: k for c in range(4)}


def test_a_reduced_k_trial_trains_on_k_images_per_class(tiny):
    data_dir, classes = tiny
    spec = {"job_key": "t.reduced", "data_dir": str(data_dir), "target_classes": classes, "treatment": "reduced_k",
            "n": 0, "seed": 0, "k": 2, "recipe": tiny_paper(iterations=2).to_dict()}
    summary = run_trial(spec, CPU)
    assert summary["train_samples"] == 8 and summary["images_per_class"] == 2


@pytest.fixture(scope="module")
def paper_data(tmp_path_factory):
    """Tiny synthetic data stored at the paper's 256 px, so --scale paper accepts it."""
    out = tmp_path_factory.mktemp("paper256")
    spec = SyntheticSpec(superclasses_per_family=2, classes_per_superclass=2, train_per_class=2, val_per_class=1)
    prepare("synthetic", None, out, resolution=256, format="raw", synthetic=spec, workers=1)
    return out


def dry_run(capsys, argv) -> dict:
    from raytransfer.sweep.runner import main

    sweep = runpy.run_path(str(ROOT / "sweeps" / "full_paper.py"))
    assert main(sweep["GRID"], argv + ["--dry-run", "--no-report"], name="full_paper",
                split_treatments=sweep["SPLIT_TREATMENTS"]) == 0
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].startswith(("similar", "dissimilar", "whole")):
            rows[parts[0]] = parts[-1]
    return rows


def test_dry_run_at_paper_scale_has_netbase_random_frozen_on_the_whole_dataset_and_reduced_k(capsys, paper_data,
                                                                                              tmp_path):
    table = dry_run(capsys, ["--scale", "paper", "--data", str(paper_data), "--splits", "similar", "--seeds", "0,1",
                             "--treatments", "AnB,random_frozen", "--n", "1,2", "--out", str(tmp_path)])
    netbase = [k for k in table if k.startswith("whole-netbase-all-s0-paper-")]
    frozen = sorted(k for k in table if k.startswith("whole-random_frozen-all-"))
    reduced = sorted(k for k in table if k.startswith("whole-reduced_k-all-"))
    assert len(netbase) == 1 and table[netbase[0]] == "-"                  # no dependency
    assert [k.split("-")[3] for k in frozen] == ["n1", "n2"]            # once per n, not per split
    assert all(table[k] == "-" for k in frozen)
    paper_k = (1, 2, 5, 10, 25, 50, 100, 250, 500, 750, 1000)
    assert {k.split("-")[3] for k in reduced} == {f"k{k}" for k in paper_k} | {"kall"}
    assert all("-paper_reduced-" in k and table[k] == "-" for k in reduced)
    anb = [k for k in table if "-AnB-" in k]
    assert len(anb) == 4 and all(table[k].startswith(k.split("-")[0] + "-baseA-A-") for k in anb)
    assert not any(k.startswith("similar") and "random_frozen" in k for k in table)


def test_dry_run_reduced_k_flag_and_demo_defaults(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("RAYTRANSFER_CACHE", str(tmp_path / "cache"))
    base = ["--scale", "smoke", "--splits", "similar", "--treatments", "random_frozen", "--n", "1",
            "--out", str(tmp_path)]
    table = dry_run(capsys, base)
    assert not any(k.startswith("whole") for k in table)                  # smoke/demo: random_frozen on halves
    table = dry_run(capsys, base + ["--reduced-k", "1,3"])
    assert sorted(k.split("-")[3] for k in table if k.startswith("whole-reduced_k")) == ["k1", "k3"]


def test_dry_run_default_grid_runs_the_dissimilar_split_with_frozen_transfers_only(capsys, tmp_path, monkeypatch):
    """The paper trained no fine-tuned, selffer, random-frozen or scratch net on its dissimilar split; neither does
    the default grid. --treatments asks for its treatments on every split."""
    monkeypatch.setenv("RAYTRANSFER_CACHE", str(tmp_path / "cache"))
    base = ["--scale", "smoke", "--n", "1,7", "--train-seeds", "0", "--out", str(tmp_path)]
    kinds = lambda table, split: Counter(k.split("-")[1] for k in table if k.startswith(split))
    table = dry_run(capsys, base)
    assert kinds(table, "dissimilar") == {"baseA": 1, "baseB": 1, "AnB": 2}
    assert kinds(table, "similar") == {"baseA": 1, "baseB": 1, "AnB": 2, "BnB": 2, "AnBp": 2, "BnBp": 2,
                                       "random_frozen": 2, "scratch": 1}
    assert all(table[k].startswith("dissimilar0-baseA-A-") for k in table if k.startswith("dissimilar0-AnB-"))
    table = dry_run(capsys, base + ["--treatments", "AnB+,BnB"])
    assert kinds(table, "dissimilar") == kinds(table, "similar") == {"baseA": 1, "baseB": 1, "AnBp": 2, "BnB": 2}
