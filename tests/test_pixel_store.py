"""The pixel store and the device input: exact crops, seeded batches, refused stores, one writer, full disks.

Stores here are written straight from the built-in generator (no FFCV) unless a test is about the
betons; every check reads real pixels back.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from raytransfer import pixel_store
from raytransfer.device_input import Augment, Normalise, StoreLoader
from raytransfer.loaders import CaffeTransform
from raytransfer.pixel_store import StoreError, ensure_store, open_store, synthetic_source
from raytransfer.synthetic import SyntheticSpec

CPU = torch.device("cpu")
SPEC = SyntheticSpec(superclasses_per_family=1, classes_per_superclass=2, train_per_class=12, val_per_class=3, size=20)
SIDE = 20


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return ensure_store(tmp_path_factory.mktemp("store") / "s", synthetic_source(SPEC, SIDE), SIDE)


def loader(store, augment, normalise, train=True, seed=0, batch=8, rank=0, world=1, ids=None):
    labels = store.labels("train" if train else "val")
    ids = np.arange(len(labels)) if ids is None else ids
    return StoreLoader(store.images("train" if train else "val"), ids, labels[ids], augment, normalise, batch, train,
                       seed, CPU, rank, world)


def test_a_store_holds_the_generators_pixels_and_labels(store):
    from raytransfer.synthetic import SyntheticImages

    images, labels = store.images("train"), store.labels("train")
    assert isinstance(images, np.memmap) and images.shape == (SPEC.num_classes * 12, SIDE, SIDE, 3)
    ds = SyntheticImages(SPEC, "train")
    for i in (0, 5, len(ds) - 1):
        x, y = ds[i]
        assert np.array_equal(images[i], x) and labels[i] == y


def test_device_crops_are_the_numpy_slices_of_the_stored_images(store):
    """The paper's crop + mirror (cut on the device; here the CPU device) against numpy slicing of the stored
    image, pixel for pixel, at the seeded positions; also at a window resized to the crop size."""
    mean, std = (10.0, 20.0, 30.0), (2.0, 4.0, 8.0)
    for window, size in ((16, 16), (16, 12)):
        got_loader = loader(store, Augment("paper", size, window), Normalise.channels(mean, std), seed=3)
        got_loader.set_epoch(2)
        plan = list(got_loader._plan())
        images = store.images("train")
        for (index, (top, left, mirror)), (x, _) in zip(plan, got_loader):
            for k in range(len(index)):
                ref = images[int(index[k]), int(top[k]):int(top[k]) + window, int(left[k]):int(left[k]) + window]
                ref = ref[:, ::-1] if mirror[k] else ref
                ref = (torch.from_numpy(ref.astype(np.float32)).permute(2, 0, 1) - torch.tensor(mean).view(3, 1, 1)) \
                    / torch.tensor(std).view(3, 1, 1)
                if window != size:
                    ref = torch.nn.functional.interpolate(ref[None], size=(size, size), mode="bilinear",
                                                          align_corners=False, antialias=True)[0]
                assert torch.equal(x[k], ref)
        assert {bool(m) for _, (_, _, mirror) in plan for m in mirror} == {True, False}


def test_the_papers_mean_image_transform_is_caffes(store):
    """Minus the mean image at 0..255, cut at the image's own crop: loaders.CaffeTransform's numbers exactly."""
    mean_image = store.images("train")[:10].astype(np.float32).mean(0)
    got_loader = loader(store, Augment("paper", 16, 16), Normalise("mean_image", mean_image=mean_image), seed=1)
    caffe = CaffeTransform(mean_image, 16, 16, train=True, seed=0, device=CPU)
    for index, params in got_loader._plan():
        whole = torch.from_numpy(store.images("train")[index.numpy()])
        ours = got_loader._transform(whole, params)
        oy, ox, flip = params
        caffe.positions = lambda b, side, gen: (oy, ox, flip)            # Caffe's cut at our draws
        assert torch.equal(ours, caffe(whole.permute(0, 3, 1, 2)))
    val = loader(store, Augment("paper", 16, 16), Normalise("mean_image", mean_image=mean_image), train=False)
    caffe_val = CaffeTransform(mean_image, 16, 16, train=False, seed=0, device=CPU)
    x, _ = next(iter(val))
    want = caffe_val(torch.from_numpy(np.array(store.images("val")[:len(x)])).permute(0, 3, 1, 2))
    assert torch.equal(x, want)


def test_random_resized_crops_cover_the_range_and_are_mirrored(store):
    """The fast recipe's crops: a constant image gives itself back (the resample is exact on flat input);
    an image of x coordinates shows a random scale, position and mirror per sample."""
    rrc = loader(store, Augment("rrc", 12, 20, min_scale=0.25), Normalise.channels((0, 0, 0), (1, 1, 1)))
    b = 6
    ramp = torch.arange(SIDE, dtype=torch.uint8).view(1, 1, SIDE, 1).expand(b, SIDE, SIDE, 3).contiguous()
    gen = torch.Generator().manual_seed(0)
    params = rrc._draw(gen, b)
    out = rrc._transform(ramp, params)
    assert out.shape == (b, 3, 12, 12)
    top, left, h, w, mirror = params
    assert ((h >= 1) & (h <= SIDE) & (w >= 1) & (w <= SIDE)).all() and (top + h <= SIDE).all()
    slope = out[:, 0, 6, -1] - out[:, 0, 6, 0]                        # right minus left column
    assert ((slope < 0) == mirror).all()
    flat = torch.full((2, SIDE, SIDE, 3), 77, dtype=torch.uint8)
    assert torch.allclose(rrc._transform(flat, tuple(p[:2] for p in params)), torch.full((2, 3, 12, 12), 77.0))


def test_a_rerun_sees_the_same_batches_and_ddp_ranks_split_the_one_worker_batch(store, tmp_path):
    """Same seed and epoch: the same batches, also from another process's store of the same source; other
    epochs and seeds differ. Two ranks at half the batch see, together, exactly the one-worker batches."""
    again = ensure_store(tmp_path / "again", synthetic_source(SPEC, SIDE), SIDE)
    kw = dict(augment=Augment("paper", 16, 16), normalise=Normalise.channels((1, 2, 3), (4, 5, 6)))

    def batches(s, epoch, seed=0, batch=8, rank=0, world=1):
        got = loader(s, seed=seed, batch=batch, rank=rank, world=world, **kw)
        got.set_epoch(epoch)
        return [(x.clone(), y.clone()) for x, y in got]

    first = batches(store, 4)
    assert len(first) == SPEC.num_classes * 12 // 8
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, batches(again, 4)))
    for other in (batches(store, 5), batches(store, 4, seed=1)):
        assert any(not torch.equal(a[0], b[0]) for a, b in zip(first, other))
    ranks = [batches(store, 4, batch=4, rank=r, world=2) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(first)
    for (x, y), r0, r1 in zip(first, *ranks):
        assert torch.equal(x, torch.cat([r0[0], r1[0]])) and torch.equal(y, torch.cat([r0[1], r1[1]]))


def test_a_store_of_another_dataset_or_a_half_written_one_is_refused_and_rebuilt(tmp_path):
    path = tmp_path / "s"
    ensure_store(path, synthetic_source(SPEC, SIDE), SIDE)
    other = replace(SPEC, seed=1)
    src = synthetic_source(other, SIDE)
    assert open_store(path, src.fingerprint, SIDE) is None                       # another dataset: refused
    assert "another dataset" in pixel_store.why_refused(path, src.fingerprint, SIDE)
    rebuilt = ensure_store(path, src, SIDE)
    from raytransfer.synthetic import SyntheticImages
    want = SyntheticImages(other, "train")[3][0]
    assert np.array_equal(rebuilt.images("train")[3], want)
    del rebuilt                                  # unmapped: cutting a mapped file short would fault its readers
    with open(path / "train.u8", "r+b") as f:                                    # cut short: half-written
        f.truncate(100)
    assert open_store(path, src.fingerprint, SIDE) is None
    (path / "store.json").unlink()                                               # a writer died before the header
    (path / "val.u8.partial").write_bytes(b"x" * 10)
    assert open_store(path, src.fingerprint, SIDE) is None
    again = ensure_store(path, src, SIDE)
    assert np.array_equal(again.images("train")[3], want)
    assert not list(path.glob("*.partial")) and (path / "train.u8").stat().st_size == again.nbytes("train")
    assert open_store(path, src.fingerprint, SIDE + 1) is None                   # another side: refused


def _build(path, log_file, barrier):
    source = synthetic_source(SPEC, SIDE)

    def counted(split):
        with open(log_file, "a") as f:
            f.write(f"{os.getpid()} {split}\n")
        return source.batches(split)
    barrier.wait()
    store = ensure_store(Path(path), replace(source, batches=counted), SIDE)
    assert store.images("train").shape[0] == SPEC.num_classes * 12


def test_two_processes_building_one_store_at_once_write_it_once(tmp_path):
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(2)
    log_file = tmp_path / "writes.log"
    procs = [ctx.Process(target=_build, args=(tmp_path / "s", log_file, barrier)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    writers = {line.split()[0] for line in log_file.read_text().splitlines()}
    assert len(writers) == 1 and len(log_file.read_text().splitlines()) == 2       # one process wrote both splits
    assert open_store(tmp_path / "s", synthetic_source(SPEC, SIDE).fingerprint, SIDE) is not None


FULL_DISK = textwrap.dedent("""
    import json, resource, signal, sys
    from pathlib import Path
    import torch
    from raytransfer.loaders import CropSpec, build_half_loaders
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)               # past the limit a write fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
    data, root, half = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
    got = build_half_loaders(data, half, CropSpec("paper", 28, 32), batch_size=4, device=torch.device("cpu"),
                             seed=0, input="pixel_store", store_root=root)
    x, y = next(iter(got.train))
    print(json.dumps({"input": got.input, "shape": list(x.shape)}))
""")


def test_a_full_disk_while_writing_ends_in_one_error_and_the_ffcv_path_with_nothing_left(synthetic_dataset, tmp_path):
    """A real EFBIG: the store is written in a process whose file-size limit (RLIMIT_FSIZE, 64 KiB) is below
    the store's 100 KiB; the trial warns once, reads through FFCV, and the store folder holds nothing."""
    data, manifest = synthetic_dataset
    half = [c["id"] for c in manifest["classes"]][:4]
    root = tmp_path / "stores"
    root.mkdir()
    run = subprocess.run([sys.executable, "-c", FULL_DISK, str(data), str(root), json.dumps(half)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["input"] == "ffcv" and out["shape"] == [4, 3, 28, 28]
    assert not [p for p in root.rglob("*") if p.is_file() and not p.name.endswith(".lock")]      # nothing corrupt left
    warnings = [line for line in run.stderr.splitlines() if "not the pixel store" in line]
    assert len(warnings) == 1 and "File too large" in warnings[0] and "RAYTRANSFER_CACHE" in warnings[0]


def test_a_full_filesystem_while_writing_leaves_nothing_and_a_store_that_does_not_fit_is_refused(tmp_path, monkeypatch):
    """A real 1 MiB tmpfs (where this machine lets the tests mount one): a store of ~1.2 MiB is refused before
    writing; with that check skipped, the write itself meets ENOSPC: one StoreError, nothing left."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root); the RLIMIT_FSIZE test covers a full disk")
    try:
        spec = replace(SPEC, train_per_class=400, val_per_class=10, size=20)          # 4 x 410 x 1200 B = 1.9 MiB
        with pytest.raises(StoreError, match="needs .* GiB but .* free"):
            ensure_store(mnt / "s", synthetic_source(spec, SIDE), SIDE)
        monkeypatch.setattr(pixel_store, "check_room", lambda *a: None)
        with pytest.raises(StoreError, match="No space left on device"):
            ensure_store(mnt / "s", synthetic_source(spec, SIDE), SIDE)
        assert [p.name for p in (mnt / "s").iterdir()] == []
        assert ensure_store(mnt / "small", synthetic_source(SPEC, SIDE), SIDE) is not None     # room for a small one
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_the_demos_memory_input_keeps_its_seeded_order_and_crops(synthetic_dataset):
    """input 'memory' (the demo's) reads the pixel store with exactly the draws of the memory input it replaced:
    generator seed * 100003 + epoch, a permutation of the half, then per batch the crop offsets (rows, then
    columns) and the mirrors; crops of the FFCV-decoded pixels, (x - mean) / std. Checked against that recipe
    written out here in numpy, pixel for pixel."""
    from raytransfer.loaders import CropSpec, build_half_loaders, readable_half_ids
    from raytransfer.memory_loader import decoded

    data, m = synthetic_dataset
    half = [c["id"] for c in m["classes"]][:4]
    got = build_half_loaders(data, half, CropSpec("paper", 30, 32), batch_size=4, device=CPU, seed=7, input="memory")
    assert got.input == "pixel_store"
    side = got.train.side
    images, labels = decoded(data / "train.beton", side)
    ids, lut, _ = readable_half_ids(data / "train.beton", sorted(c["index"] for c in m["classes"] if c["id"] in half))
    mean, std = np.array(m["mean"], np.float32), np.array(m["std"], np.float32)
    for epoch in (0, 3):
        got.train.set_epoch(epoch)
        gen = torch.Generator().manual_seed(7 * 100_003 + epoch)
        order = torch.randperm(len(ids), generator=gen)
        shifts = side - 30 + 1
        for b, (x, y) in enumerate(got.train):
            index = order[b * 4:(b + 1) * 4]
            top = torch.randint(0, shifts, (4,), generator=gen)
            left = torch.randint(0, shifts, (4,), generator=gen)
            mirror = torch.rand(4, generator=gen) < 0.5
            for k in range(4):
                img = images[ids[int(index[k])]][int(top[k]):int(top[k]) + 30, int(left[k]):int(left[k]) + 30]
                img = img[:, ::-1] if mirror[k] else img
                want = ((img.astype(np.float32) - mean) / std).transpose(2, 0, 1)
                assert np.array_equal(x[k].numpy(), want)
                assert int(y[k]) == lut[labels[ids[int(index[k])]]]
