"""Loaders of one half: exactly the half's samples, labels 0..k-1 in sorted class order, the paper's crops.

The dataset is written raw from PNGs whose pixels say where they come from: red = 6·x, green = 6·y,
blue = 40 + 50·(class index) + (sample number). So every yielded crop tells its class, its sample,
its offset and whether it was mirrored, and any error in the indices, the label table, the crop or
the normalisation shows up as a wrong pixel.
"""
from __future__ import annotations

import gc
import shutil
import time
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import write_corrupt_jpeg, write_image_tree

from raytransfer.loaders import CropSpec, build_half_loaders, half_indices
from raytransfer.prepare import CORRUPT_LABEL, DatasetError, label_column, prepare

STORED, CROP = 40, 32
TRAIN = {"zebra": 10, "apple": 3, "mango": 4, "kiwi": 6}      # written in this order, labelled in sorted order
VAL = {"zebra": 4, "apple": 2, "mango": 2, "kiwi": 3}
SORTED = sorted(TRAIN)                                          # apple 0, kiwi 1, mango 2, zebra 3
HALF = ["zebra", "kiwi"]                                        # remapped: kiwi -> 0, zebra -> 1
CPU = torch.device("cpu")
# numba's finalizers raise a harmless KeyError when FFCV's compiled pipelines are garbage-collected
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(scope="module", autouse=True)
def collect_pipelines_here():
    """Collect this module's loaders before it ends, so numba's noise is not reported by other modules."""
    yield
    gc.collect()


def xy_image(rng, k, i, h, w):
    y, x = np.mgrid[0:STORED, 0:STORED]
    return np.stack([6 * x, 6 * y, np.full_like(x, 40 + 50 * k + i)], -1).astype(np.uint8)


@pytest.fixture(scope="module")
def xy(tmp_path_factory):
    """(folder, manifest): the raw xy dataset, with one corrupt JPEG in each split inside the half."""
    root = tmp_path_factory.mktemp("xy")
    tree = write_image_tree(root / "tree", {"train": TRAIN, "val": VAL}, ext=".png", draw=xy_image)
    write_corrupt_jpeg(tree / "train" / "zebra" / "zebra_zz.JPEG", "garbage")
    write_corrupt_jpeg(tree / "val" / "kiwi" / "kiwi_cut.JPEG", "truncated")
    m = prepare("folder", tree, root / "out", resolution=STORED, format="raw", workers=1)
    return root / "out", m


@pytest.fixture(scope="module")
def loaders(xy):
    return build_half_loaders(xy[0], HALF, CropSpec("paper", CROP), batch_size=4, device=CPU, seed=0,
                              val_batch_size=4)


def pixels(images, manifest):
    """Undo the normalisation: float NCHW -> the stored uint8 values, NHWC."""
    mean, std = (torch.tensor(manifest[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    return (images * std + mean).round().permute(0, 2, 3, 1).numpy().astype(np.int64)


def read_crop(img, size=CROP):
    """(class index, sample number, x offset, y offset, mirrored) of a crop that must be an exact slice."""
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    assert (b == b[0, 0]).all() and (r == r[:1]).all() and (g == g[:, :1]).all()
    assert (r % 6 == 0).all() and (g % 6 == 0).all()
    xs, ys = r[0] // 6, g[:, 0] // 6
    mirrored = bool(xs[0] > xs[-1])
    ox, oy = int(xs.min()), int(ys[0])
    step = np.arange(size)
    assert (xs == (ox + step[::-1] if mirrored else ox + step)).all() and (ys == oy + step).all()
    k, i = divmod(int(b[0, 0]) - 40, 50)
    return k, i, ox, oy, mirrored


def epoch(loader, manifest):
    out = []
    for images, labels in loader:
        assert images.dtype == torch.float32 and labels.dtype == torch.int64
        out += [(read_crop(img), int(y)) for img, y in zip(pixels(images, manifest), labels)]
    return out


def expected_samples(split):
    counts = TRAIN if split == "train" else VAL
    return sorted((SORTED.index(c), i) for c in HALF for i in range(counts[c]))


def check_labels(seen, manifest, split):
    """Each crop's label is its class's rank in the half's sorted class ids; counts match the manifest."""
    half_sorted = sorted(HALF)
    for (k, *_), y in seen:
        assert y == half_sorted.index(SORTED[k])
    per_class = manifest["counts"][split]["per_class"]
    assert Counter(y for _, y in seen) == {j: per_class[SORTED.index(c)] for j, c in enumerate(half_sorted)}


# -- one half: exactly its samples, remapped labels ------------------------------------------------

def test_half_loaders_describe_the_half(loaders, xy):
    assert loaders.num_classes == 2 and loaders.class_ids == ["kiwi", "zebra"]
    assert len(loaders.train) == 16 // 4 and loaders.train.num_samples == 16      # the corrupt zebra is not in
    assert len(loaders.val) == 2 and loaders.val.num_samples == 7


def test_val_epoch_is_the_half_in_order_centre_cropped(loaders, xy):
    seen = epoch(loaders.val, xy[1])
    assert [(k, i) for (k, i, *_), _ in seen] == expected_samples("val")           # sequential, each once
    assert {(ox, oy, m) for (_, _, ox, oy, m), _ in seen} == {((STORED - CROP) // 2,) * 2 + (False,)}
    check_labels(seen, xy[1], "val")


def test_train_epoch_is_the_half_shuffled_random_crops(loaders, xy):
    first, second = epoch(loaders.train, xy[1]), epoch(loaders.train, xy[1])
    for seen in (first, second):
        assert sorted((k, i) for (k, i, *_), _ in seen) == expected_samples("train")   # each sample once
        check_labels(seen, xy[1], "train")
    assert [s for s, _ in first] != [s for s, _ in second]                         # a new order each epoch
    crops = [s[2:] for s, _ in first + second]
    assert all(0 <= ox <= STORED - CROP and 0 <= oy <= STORED - CROP for ox, oy, _ in crops)
    assert len({(ox, oy) for ox, oy, _ in crops}) >= 4                              # random offsets ...
    assert {m for *_, m in crops} == {True, False}                                  # ... and mirroring


def test_leaving_an_epoch_early_then_a_full_one(loaders, xy):
    for _ in loaders.val:
        break
    assert [s[:2] for s, _ in epoch(loaders.val, xy[1])] == expected_samples("val")


def test_rrc_crop_of_the_fast_recipe(xy):
    other = build_half_loaders(xy[0], ["mango", "apple"], CropSpec("rrc", 24), batch_size=7, device=CPU, seed=1)
    (images, labels), = list(other.train)
    assert images.shape == (7, 3, 24, 24) and sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1, 1]
    for img, y in zip(pixels(images, xy[1]), labels.tolist()):
        b = img[..., 2]
        assert b.max() - b.min() <= 1                        # a resized crop of one image: one blue value
        k = (int(np.median(b)) - 40) // 50
        assert SORTED[k] == ["apple", "mango"][y]


def test_a_crop_is_the_same_share_of_the_image_at_any_stored_side(xy, tmp_path):
    """The xy images stored at 4x their side (160 px) and read with CropSpec(resize=40): the centre crop is
    the exact 32 px centre crop of the 40 px copy, resized (within rounding), and every random crop spans
    32 of the picture's columns; without `resize` it is 32 px of the enlarged image, 8 columns of the picture."""
    big = tmp_path / "big"
    m = prepare("folder", xy[0].parent / "tree", big, resolution=4 * STORED, format="raw", workers=1)
    exact = build_half_loaders(xy[0], HALF, CropSpec("paper", CROP), batch_size=4, device=CPU, seed=0)
    resized = build_half_loaders(big, HALF, CropSpec("paper", CROP, resize=STORED), batch_size=4, device=CPU, seed=0)
    patch = build_half_loaders(big, HALF, CropSpec("paper", CROP), batch_size=4, device=CPU, seed=0)
    want = np.concatenate([pixels(images, xy[1]) for images, _ in exact.val])
    got = np.concatenate([pixels(images, m) for images, _ in resized.val])
    corner = np.concatenate([pixels(images, m) for images, _ in patch.val])
    assert want.shape == got.shape == corner.shape and np.abs(got - want).max() <= 2
    assert np.abs(corner - want).mean() > 20
    for images, _ in resized.train:
        red = pixels(images, m)[..., 0]                          # 6 * x of the 40 px picture
        assert (red.max(axis=(1, 2)) - red.min(axis=(1, 2)) >= 6 * (CROP - 2)).all()
    spans = [np.ptp(pixels(images, m)[..., 0], axis=(1, 2)) for images, _ in patch.train]
    assert np.concatenate(spans).max() <= 6 * 9


# -- indices from metadata only ----------------------------------------------------------------------

def test_indices_come_from_the_label_column_only(xy, tmp_path):
    from ffcv.reader import Reader

    beton = xy[0] / "train.beton"
    labels = label_column(beton)
    expected = np.repeat([0, 1, 2, 3], [TRAIN[c] for c in SORTED])
    np.testing.assert_array_equal(labels, np.append(expected, CORRUPT_LABEL))    # zebra_zz sorts last
    blank = tmp_path / "blank.beton"                         # the same file with every image's bytes wiped
    shutil.copy(beton, blank)
    meta = Reader(str(beton)).metadata["f0"]
    with open(blank, "r+b") as f:
        for ptr, w, h in zip(meta["data_ptr"], meta["width"], meta["height"]):
            f.seek(int(ptr))
            f.write(b"\xff" * int(w * h * 3))
    assert Reader(str(blank)).metadata["f0"]["data_ptr"].tolist() == meta["data_ptr"].tolist()
    np.testing.assert_array_equal(label_column(blank), labels)
    ids, lut = half_indices(labels, [3, 1])
    np.testing.assert_array_equal(ids, np.r_[3:9, 13:23])
    np.testing.assert_array_equal(lut, [-1, 0, -1, 1])


# -- bad input -------------------------------------------------------------------------------------

def test_split_naming_classes_the_dataset_lacks(xy):
    with pytest.raises(DatasetError, match=r"names 1 classes that .* does not have \(e.g. \['pear'\]\)"):
        build_half_loaders(xy[0], ["kiwi", "pear"], CropSpec(), 4, CPU, 0)
    for half in ([], ["kiwi", "kiwi"]):
        with pytest.raises(DatasetError, match="a half must name distinct classes"):
            build_half_loaders(xy[0], half, CropSpec("paper", CROP), 4, CPU, 0)


def test_beton_of_other_settings_than_the_job_expects(xy):
    with pytest.raises(DatasetError, match=f"fingerprint {xy[1]['fingerprint'][:12]}, the job expects 000000000000"):
        build_half_loaders(xy[0], HALF, CropSpec("paper", CROP), 4, CPU, 0, expect_fingerprint="0" * 64)


def test_crop_larger_than_stored_images(xy):
    with pytest.raises(DatasetError, match=f"crop 227 px is larger than the stored {STORED} px"):
        build_half_loaders(xy[0], HALF, CropSpec("paper", 227), 4, CPU, 0)
    with pytest.raises(ValueError, match="unknown crop 'jitter'"):
        build_half_loaders(xy[0], HALF, CropSpec("jitter", CROP), 4, CPU, 0)


def test_not_a_prepared_folder(tmp_path):
    with pytest.raises(DatasetError, match="is not a prepared dataset"):
        build_half_loaders(tmp_path, HALF, CropSpec(), 4, CPU, 0)


# -- DDP: each rank its own share ------------------------------------------------------------------

def _ddp_rank(rank, data_dir, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=2)
    try:
        got = build_half_loaders(data_dir, HALF, CropSpec("paper", CROP), batch_size=2, device=CPU, seed=5,
                                 distributed=True)
        order = got.train.loader.traversal_order                    # what each epoch's EpochIterator reads
        np.savez(out_dir / f"rank{rank}.npz", train0=order.sample_order(0), train1=order.sample_order(1),
                 val=got.val.loader.indices, batches=len(got.train))
    finally:
        dist.destroy_process_group()


def run_two_ranks(fn, *args, timeout_s: float = 120):
    """Two gloo ranks of `fn(rank, *args)`, forked (FFCV is already imported here; spawning would import it
    again, ~10 s); killed and failed if they do not finish in time."""
    ctx = torch.multiprocessing.start_processes(fn, args, nprocs=2, join=False, start_method="fork")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the DDP ranks did not finish within {timeout_s:.0f} s")


def test_ddp_ranks_read_disjoint_shares(xy, tmp_path):
    """Two gloo ranks read disjoint shares of the half."""
    run_two_ranks(_ddp_rank, xy[0], tmp_path)
    r0, r1 = (np.load(tmp_path / f"rank{r}.npz") for r in (0, 1))
    labels = label_column(xy[0] / "train.beton")
    train_ids = set(np.flatnonzero(np.isin(labels, [1, 3])).tolist())
    for e in ("train0", "train1"):
        a, b = set(r0[e].tolist()), set(r1[e].tolist())
        assert len(r0[e]) == len(r1[e]) == 8 and not a & b and a | b == train_ids
    assert r0["train0"].tolist() != r0["train1"].tolist() and int(r0["batches"]) == int(r1["batches"]) == 4
    val_ids = np.flatnonzero(np.isin(label_column(xy[0] / "val.beton"), [1, 3])).tolist()
    assert sorted(r0["val"].tolist() + r1["val"].tolist()) == val_ids                 # every image exactly once
    assert (len(r0["val"]), len(r1["val"])) == (4, 3)


def _ddp_store_rank(rank, data_dir, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous-store", rank=rank, world_size=2)
    try:
        got = build_half_loaders(data_dir, HALF, CropSpec("paper", CROP), batch_size=2, device=CPU, seed=5,
                                 distributed=True, input="memory")
        got.train.set_epoch(1)
        x, y = zip(*[(a.clone(), b.clone()) for a, b in got.train])
        torch.save({"input": got.input, "x": x, "y": y, "val": torch.from_numpy(got.val.ids)},
                   out_dir / f"store{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_of_the_pixel_store_split_the_one_worker_batches(xy, tmp_path):
    """--workers-per-trial 2 keeps the demo's input: each rank reads the store and takes its half of every
    one-worker batch (same seed, same crops), so the two ranks see exactly what one worker would."""
    one = build_half_loaders(xy[0], HALF, CropSpec("paper", CROP), batch_size=4, device=CPU, seed=5, input="memory")
    one.train.set_epoch(1)
    want = [(a.clone(), b.clone()) for a, b in one.train]
    run_two_ranks(_ddp_store_rank, xy[0], tmp_path)
    r0, r1 = (torch.load(tmp_path / f"store{r}.pt") for r in (0, 1))
    assert r0["input"] == r1["input"] == "pixel_store" and len(r0["x"]) == len(r1["x"]) == len(want) == 4
    for (x, y), x0, x1, y0, y1 in zip(want, r0["x"], r1["x"], r0["y"], r1["y"]):
        assert torch.equal(x, torch.cat([x0, x1])) and torch.equal(y, torch.cat([y0, y1]))
    assert sorted(torch.cat([r0["val"], r1["val"]]).tolist()) == sorted(one.val.ids.tolist())   # disjoint shards


def test_two_halves_sharing_a_compiled_loader_each_read_their_own_samples(xy):
    """The per-process loader cache reuses one compiled FFCV Loader for both halves (same settings);
    each half must still read exactly its own samples, also when their epochs interleave."""
    other = [c for c in SORTED if c not in HALF]
    a = build_half_loaders(xy[0], HALF, CropSpec("paper", CROP), batch_size=4, device=CPU, seed=0, val_batch_size=4)
    b = build_half_loaders(xy[0], other, CropSpec("paper", CROP), batch_size=4, device=CPU, seed=0, val_batch_size=4)
    assert a.val.loader is b.val.loader                                 # one compilation, two halves

    def classes_seen(loader, half):
        seen = epoch(loader, xy[1])
        return {SORTED[k] for (k, *_), _ in seen} == set(half) and len(seen) == loader.num_samples

    assert classes_seen(a.val, HALF) and classes_seen(b.val, other) and classes_seen(a.val, HALF)
    it_a = iter(a.val)                                                  # A mid-epoch, then B starts
    first = next(it_a)[1].clone()
    b_seen = {SORTED[k] for (k, *_), _ in epoch(b.val, xy[1])}
    rest = [y.clone() for _, y in it_a]
    assert b_seen == set(other)
    assert sum(len(y) for y in [first] + rest) == a.val.num_samples


# -- the pixel store ("memory", the demo's name for it): the same half and crops as FFCV, seeded ----------

@pytest.fixture(scope="module")
def memory(xy):
    return build_half_loaders(xy[0], HALF, CropSpec("paper", CROP), batch_size=4, device=CPU, seed=0,
                              val_batch_size=4, input="memory")


def test_memory_input_reads_the_half_with_the_papers_crops(memory, loaders, xy):
    from raytransfer.device_input import StoreLoader

    assert isinstance(memory.train, StoreLoader) and isinstance(memory.val, StoreLoader)
    assert memory.input == "pixel_store" and isinstance(memory.train.images, np.memmap)
    assert (len(memory.train), memory.train.num_samples, memory.val.num_samples) == (4, 16, 7)
    assert len(memory.val) == 1                        # evaluation batches of up to 256 (no gradient to hold)
    ffcv_val = torch.cat([x.clone() for x, _ in loaders.val])
    assert torch.allclose(torch.cat([x for x, _ in memory.val]), ffcv_val, atol=1e-5)   # centre crops, same pixels
    assert [s for s, _ in epoch(memory.val, xy[1])] == [s for s, _ in epoch(loaders.val, xy[1])]
    seen = []
    for e in range(3):
        memory.train.set_epoch(e)
        got = epoch(memory.train, xy[1])
        assert sorted((k, i) for (k, i, *_), _ in got) == expected_samples("train")   # each sample once
        check_labels(got, xy[1], "train")
        seen += got
    crops = [s[2:] for s, _ in seen]
    assert all(0 <= ox <= STORED - CROP and 0 <= oy <= STORED - CROP for ox, oy, _ in crops)
    assert len({(ox, oy) for ox, oy, _ in crops}) >= 4 and {m for *_, m in crops} == {True, False}


def test_memory_input_is_reproducible_from_the_seed_and_epoch(memory, xy):
    def batches(loader, e):
        loader.set_epoch(e)
        return [(x.clone(), y.clone()) for x, y in loader]

    again = build_half_loaders(xy[0], HALF, CropSpec("paper", CROP), batch_size=4, device=CPU, seed=0,
                               input="memory")
    other = build_half_loaders(xy[0], HALF, CropSpec("paper", CROP), batch_size=4, device=CPU, seed=1,
                               input="memory")
    first = batches(memory.train, 5)
    for x, y in zip(first, batches(again.train, 5)):       # a resumed trial sees the same epoch
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
    for different in (batches(memory.train, 6), batches(other.train, 5)):
        assert any(not torch.equal(x[0], y[0]) for x, y in zip(first, different))


def test_memory_input_of_larger_stored_images_holds_them_at_the_crops_side(xy, tmp_path):
    """The xy images stored at 4x their side (160 px) and read by the memory input with CropSpec(resize=40):
    each image is shrunk once to 40 px and held, so the centre crops are the FFCV path's (its 128 px window
    resized to 32), pixel for pixel, and every random crop is a 32 px slice of the 40 px picture (within
    rounding: the 4x enlargement blurs its last column), at any of its 9 x 9 offsets, mirrored or not."""
    from raytransfer.device_input import StoreLoader

    big = tmp_path / "big"
    m = prepare("folder", xy[0].parent / "tree", big, resolution=4 * STORED, format="raw", workers=1)
    crop = CropSpec("paper", CROP, resize=STORED)
    held = build_half_loaders(big, HALF, crop, batch_size=4, device=CPU, seed=0, input="memory")
    ffcv = build_half_loaders(big, HALF, crop, batch_size=4, device=CPU, seed=0)
    assert isinstance(held.train, StoreLoader) and held.train.images.shape[1:] == (STORED, STORED, 3)
    want = np.concatenate([pixels(images, m) for images, _ in ffcv.val])
    got = np.concatenate([pixels(images, m) for images, _ in held.val])
    assert want.shape == got.shape and np.array_equal(got, want)
    seen = []
    for e in range(3):
        held.train.set_epoch(e)
        for images, _ in held.train:
            for img in pixels(images, m):
                xs, ys = np.rint(img[0, :, 0] / 6), np.rint(img[:, 0, 1] / 6)    # red = 6x, green = 6y
                mirrored = bool(xs[0] > xs[-1])
                ox, oy = int(xs.min()), int(ys[0])
                step = np.arange(CROP)
                assert (xs == (ox + step[::-1] if mirrored else ox + step)).all() and (ys == oy + step).all()
                seen.append((ox, oy, mirrored))
    assert len(seen) == 3 * 16
    assert all(0 <= ox <= STORED - CROP and 0 <= oy <= STORED - CROP for ox, oy, _ in seen)
    assert len({(ox, oy) for ox, oy, _ in seen}) >= 4 and {mi for *_, mi in seen} == {True, False}


def test_the_store_serves_every_crop_ffcv_serves_and_ffcv_input_stays_ffcv(xy):
    """Random-resized crops and crops that enlarge the picture read the store too (no silent switch to
    FFCV's unseeded crops); input 'ffcv' is FFCV."""
    from raytransfer.device_input import StoreLoader
    from raytransfer.loaders import HalfLoader

    rrc = build_half_loaders(xy[0], HALF, CropSpec("rrc", CROP), batch_size=4, device=CPU, seed=0, input="memory")
    enlarged = build_half_loaders(xy[0], HALF, CropSpec("paper", CROP - 8, resize=2 * STORED), batch_size=4,
                                  device=CPU, seed=0, input="pixel_store")     # 12 px of the 40 px image, enlarged to 24
    for got, size in ((rrc, CROP), (enlarged, CROP - 8)):
        assert isinstance(got.train, StoreLoader) and got.input == "pixel_store"
        images, labels = next(iter(got.train))
        assert images.shape == (4, 3, size, size) and torch.isfinite(images).all()
    ffcv = build_half_loaders(xy[0], HALF, CropSpec("paper", CROP), batch_size=4, device=CPU, seed=0, input="ffcv")
    assert isinstance(ffcv.train, HalfLoader) and ffcv.input == "ffcv"
