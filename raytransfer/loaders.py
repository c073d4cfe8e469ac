"""The loaders of one half: the node's pixel store (input 'pixel_store', or 'memory' by its old name) or FFCV.

The pixel store (raytransfer/pixel_store.py, device_input.py) holds the dataset's uint8 pixels at the recipe's
side, written once per node from the betons; batches are cropped and normalised on the device from seeded
draws. FFCV reads the beton with `indices` = the half's samples: the recipe's input 'ffcv', or where the
store cannot be written on this node's disk (one warning says why). What follows describes both paths.

Crops are cut from the recipe's image side (`CropSpec.resize`: 256 px for the paper, 32 px for the
demo) whatever side the dataset is stored at: a crop takes the same share of the stored image (227/256
of it for the paper) and FFCV's decoder resizes it to the crop size, so a 28 px demo crop of a 256 px
image is the whole picture scaled down, never a corner of it. Labels are remapped to 0..k-1 in sorted
class order (the paper's convention) through a lookup table applied after the loader; images are
normalised with the dataset's channel statistics (on the GPU when there is one, inside FFCV's numba
stage on the CPU), or, for the paper (`mean_image`), the whole stored image is decoded and Caffe's
transform runs in torch: minus the base dataset's mean image at 0..255 scale, then the crop and mirror,
one position for image and mean alike. Under DDP each rank reads its own
share of the training samples (FFCV's `distributed=True`) and a disjoint slice of the validation
samples (no padding, so every image counts once).

    loaders = build_half_loaders("data/synthetic", half_ids, crop=CropSpec("paper", 32),
                                 batch_size=128, device=torch.device("cpu"), seed=0)
    for images, labels in loaders.train: ...
"""
from __future__ import annotations

import functools
import logging
import os
import queue
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("NUMBA_THREADING_LAYER", "tbb")   # workqueue aborts with two live loaders (notes/ffcv.md 3.5)

import numpy as np
import torch

from . import pixel_store
from .device_input import EVAL_BATCH, Augment, Normalise, StoreLoader
from .prepare import CORRUPT_LABEL, DatasetError, label_column, mean_image, read_manifest, verify_betons

log = logging.getLogger(__name__)

CROPS = ("paper", "rrc")


@dataclass(frozen=True)
class CropSpec:
    """Train-time crop. 'paper': a random `size` square of the image at side `resize` (227 of 256) +
    mirror; 'rrc': random-resized-crop to `size` + mirror (the fast recipe). Validation takes the
    centre `size` square of the image at side `resize`. Where the dataset is stored at `resize` px
    (or `resize` is None) crops are exact pixels of the stored image, no resampling."""
    kind: str = "paper"
    size: int = 227
    resize: int | None = None          # None: crops are `size` px of the stored image as it is
    rrc_min_scale: float = 0.25


def crop_window(stored: int | None, crop: CropSpec, where="the dataset") -> int:
    """Side, in stored pixels, of the square a `crop.size` crop is cut from (then resized to crop.size)."""
    if stored is None:
        raise DatasetError(f"{where} was prepared without a stored resolution (images of any size); the loaders "
                           "crop squares of a fixed-size image: prepare it again with --resolution (the paper: 256)")
    if crop.size > stored:
        raise DatasetError(f"crop {crop.size} px is larger than the stored {stored} px images of {where}: "
                           f"prepare with --resolution >= {crop.resize or crop.size} or use a smaller crop")
    return crop.size if crop.resize is None else max(1, round(stored * crop.size / crop.resize))


STORE_INPUTS = ("pixel_store", "memory")     # "memory": the demo recipe's name for it (its job keys)


def store_side(stored: int, crop: CropSpec, normalize: str) -> int:
    """Side at which the pixel store holds a dataset for this crop: the stored side where the crop takes
    exact pixels, the mean image is subtracted (it exists at the stored side) or the images are not larger
    than the recipe's side; else the crop's resize side (each image shrunk once as the store is written:
    30 of 32 px as on the built-in data, in place of 240 of 256 px resized at every step)."""
    if normalize == "mean_image" or crop.resize is None or stored <= crop.resize:
        return stored
    if crop.kind == "paper" and crop_window(stored, crop) == crop.size:
        return stored
    return crop.resize


def half_indices(labels: np.ndarray, half_labels) -> tuple[np.ndarray, np.ndarray]:
    """Sample ids of the half's classes and the label lookup table (original label -> 0..k-1)."""
    half_labels = np.sort(np.asarray(half_labels, dtype=np.int64))
    ids = np.flatnonzero(np.isin(labels, half_labels))
    lut = np.full(max(int(labels.max()), int(half_labels.max())) + 1, -1, dtype=np.int64)
    lut[half_labels] = np.arange(len(half_labels))
    return ids, lut


def readable_half_ids(beton, half_labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, lut) of `half_indices` over a beton's label column (or that column itself: the pixel store keeps
    it), images written as corrupt left out; and that label column."""
    labels = beton if isinstance(beton, np.ndarray) else label_column(beton)
    ids, lut = half_indices(labels, half_labels)
    return ids[labels[ids] != CORRUPT_LABEL], lut, labels


class HalfLoader:
    """Iterates (images float NCHW on `device`, labels 0..k-1): FFCV underneath, pitfalls handled.

    - a loader thread that dies raises here instead of blocking forever (notes/ffcv.md 3.2);
    - leaving an epoch early closes FFCV's iterator (3.3);
    - labels are remapped on the device; yielded tensors are FFCV's ring buffers: clone to keep (3.4).
    """

    def __init__(self, loader, ids, lut: np.ndarray, device: torch.device, mean=None, std=None, make=None,
                 caffe=None):
        self.loader, self.ids, self.device, self._make = loader, np.asarray(ids), device, make
        self.lut = torch.as_tensor(lut, device=device)
        self.mean = None if mean is None else torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = None if std is None else torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.caffe = caffe                  # CaffeTransform: mean image, crop and mirror in torch (the paper)
        self.num_samples = len(ids)

    def _claim(self):
        """Point the (possibly shared, cached) FFCV Loader at this half's samples."""
        owner = getattr(self.loader, "_raytransfer_owner", None)
        if owner is not None and owner is not self:          # another half is mid-epoch on it: use our own
            self.loader = self._make()
        elif not np.array_equal(self.loader.indices, self.ids):
            retarget(self.loader, self.ids)
        return self.loader

    def __len__(self):
        return len(self._claim())

    def __iter__(self):
        loader = self._claim()
        loader._raytransfer_owner = self
        epoch = int(getattr(loader, "next_epoch", 0))
        it = iter(loader)
        gen = None if self.caffe is None else self.caffe.generator(epoch)
        try:
            while True:
                batch = _next_batch(it)
                if batch is None:
                    return
                images, labels = batch
                labels = self.lut[labels.to(self.device).view(-1).long()]
                if self.caffe is not None:
                    images = self.caffe(images, gen)
                elif self.mean is not None:         # GPU path: uint8 -> float, normalised on the device
                    images = (images.float() - self.mean) / self.std
                yield images, labels
        finally:
            loader._raytransfer_owner = None
            it.close()              # stop FFCV's thread and wait for it, so no epoch runs on (3.3)
            it.join(timeout=60)


class CaffeTransform:
    """Caffe's data transform on whole stored images (uint8 NCHW): subtract the mean image, then cut the
    `window` square (train: a uniform random position and a mirror with probability 1/2; val: the centre,
    Caffe's (side - window) // 2) and resize it to `size` where the window is not `size` px already. The
    image and its mean are cut at one position, so the result is crop(image) - crop(mean image)."""

    def __init__(self, mean_image: np.ndarray, size: int, window: int, train: bool, seed: int, device):
        self.mean = torch.as_tensor(np.ascontiguousarray(mean_image.transpose(2, 0, 1)), device=device)[None]
        self.size, self.window, self.train, self.seed = size, window, train, seed

    def generator(self, epoch: int) -> torch.Generator | None:
        """Crop positions of one epoch, reproducible from the trial seed (also after a resume)."""
        return torch.Generator().manual_seed(self.seed * 100_003 + epoch) if self.train else None

    def positions(self, batch: int, side: int, gen) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self.train:
            off = torch.full((batch,), (side - self.window) // 2, dtype=torch.long)
            return off, off, torch.zeros(batch, dtype=torch.bool)
        oy = torch.randint(0, side - self.window + 1, (batch,), generator=gen)
        ox = torch.randint(0, side - self.window + 1, (batch,), generator=gen)
        return oy, ox, torch.rand(batch, generator=gen) < 0.5

    def __call__(self, images: torch.Tensor, gen=None) -> torch.Tensor:
        x = images.float() - self.mean
        b, c, side, _ = x.shape
        oy, ox, flip = self.positions(b, side, gen)
        ar = torch.arange(self.window)
        rows = (oy[:, None] + ar).to(x.device)
        cols = (ox[:, None] + torch.where(flip[:, None], self.window - 1 - ar, ar)).to(x.device)
        batch, channel = torch.arange(b, device=x.device), torch.arange(c, device=x.device)
        x = x[batch[:, None, None, None], channel[None, :, None, None], rows[:, None, :, None], cols[:, None, None, :]]
        if self.window != self.size:
            x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False,
                                                antialias=True)
        return x.contiguous()


def _next_batch(it, poll_s: float = 2.0):
    """EpochIterator.__next__ with a watchdog: FFCV's thread may die without posting anything."""
    while True:
        try:
            result = it.output_queue.get(timeout=poll_s)
            break
        except queue.Empty:
            if not it.is_alive():
                raise RuntimeError("the FFCV loader thread died (its traceback is printed above): "
                                   "check the pipeline on a few batches") from None
    if result is None:
        return None
    slot, result = result
    if torch.cuda.is_available() and it.cuda_streams[slot] is not None:
        it.current_stream.wait_stream(it.cuda_streams[slot])
    return result


@dataclass
class HalfLoaders:
    train: HalfLoader
    val: HalfLoader
    num_classes: int
    class_ids: list
    input: str = "ffcv"                     # the path this trial reads: "pixel_store" or "ffcv"


def build_half_loaders(data_dir, half_class_ids: list[str], crop: CropSpec, batch_size: int,
                       device: torch.device, seed: int, num_workers: int = 1, distributed: bool = False,
                       val_batch_size: int | None = None, expect_fingerprint: str | None = None,
                       batches_ahead: int = 2, normalize: str = "mean_std", mean_classes: list[str] | None = None,
                       per_class: int | None = None, input: str = "ffcv", store_root: Path | None = None) -> HalfLoaders:
    """Train and val loaders over the half's classes of a prepared dataset folder.
    normalize 'mean_image': minus the mean training image of `mean_classes` (the base's dataset; default the
    half's own). per_class: train on the first k training images of each class only (reduced volume).
    input 'pixel_store' (or its old name 'memory'): the node's uint8 store of the dataset at the recipe's side
    (raytransfer/pixel_store.py, under `store_root`, default $RAYTRANSFER_CACHE), cropped on the device from
    seeded draws (raytransfer/device_input.py); FFCV only where the store cannot be written on this node's disk
    (one warning says why). input 'ffcv': FFCV."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    verify_betons(data_dir, manifest)
    if expect_fingerprint and manifest["fingerprint"] != expect_fingerprint:
        raise DatasetError(f"{data_dir} now holds a different dataset (fingerprint {manifest['fingerprint'][:12]}, "
                           f"the job expects {expect_fingerprint[:12]}): it was re-prepared with other settings; "
                           "prepare into a new folder or rerun the sweep on this one")
    if input not in STORE_INPUTS + ("ffcv",):
        raise ValueError(f"unknown input {input!r}; expected ffcv, pixel_store or memory")
    stored = manifest["settings"]["resolution"]
    label_of = {c["id"]: c["index"] for c in manifest["classes"]}
    unknown = [c for c in half_class_ids if c not in label_of]
    if unknown:
        raise DatasetError(f"the split names {len(unknown)} classes that {data_dir} does not have (e.g. {unknown[:3]}): "
                           "make the split from this dataset's manifest")
    twice = sorted(c for c, n in Counter(half_class_ids).items() if n > 1)
    if not half_class_ids or twice:
        raise DatasetError(f"a half must name distinct classes, at least one; got {len(half_class_ids)} "
                           f"(named twice: {twice[:3]}): make the split with `raytransfer split`")
    half_labels = sorted(label_of[c] for c in half_class_ids)
    window = crop_window(stored, crop, data_dir)
    caffe_mean = None
    if normalize == "mean_image":
        unknown = [c for c in (mean_classes or []) if c not in label_of]
        if unknown:
            raise DatasetError(f"the mean image's classes include {len(unknown)} that {data_dir} does not have")
        caffe_mean = mean_image(data_dir, manifest, mean_classes or half_class_ids)
    elif normalize != "mean_std":
        raise ValueError(f"unknown normalize {normalize!r}; expected mean_std or mean_image")
    world, rank = 1, 0
    if distributed:
        world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    store = None
    if input in STORE_INPUTS:
        side = store_side(stored, crop, normalize)
        path = pixel_store.store_dir(data_dir, side, store_root)
        try:
            store = pixel_store.ensure_store(path, pixel_store.beton_source(data_dir, manifest, side), side)
        except pixel_store.StoreError as e:
            log.warning("input: FFCV for this trial, not the pixel store: %s", e)
    loaders, ids_of = {}, {}
    for split in ("train", "val"):
        beton = data_dir / manifest["betons"][split]["file"]
        ids, lut, labels = readable_half_ids(store.labels(split) if store is not None else beton, half_labels)
        if split == "train" and per_class:
            ids = first_per_class(ids, labels, per_class)
            if len(ids) < batch_size:
                raise DatasetError(f"{per_class} image(s) per class of {len(half_labels)} classes make {len(ids)} "
                                   f"training images, fewer than one batch of {batch_size}")
        if split == "val" and world > 1:
            ids = ids[rank::world]              # disjoint shards, no sampler padding
        ids_of[split] = (ids, lut[labels[ids]])
        if store is not None:
            continue
        loaders[split] = _ffcv_loader(beton, ids, lut, split == "train", crop, stored, window, manifest,
                                      batch_size if split == "train" else (val_batch_size or batch_size),
                                      device, seed, num_workers, distributed and split == "train", batches_ahead,
                                      caffe_mean, crop_seed=seed * 1009 + rank)     # each rank its own crops
    if store is not None:
        loaders["train"], loaders["val"] = store_loaders(
            store, ids_of, crop, Normalise("mean_image", mean_image=caffe_mean) if caffe_mean is not None else
            Normalise.channels(manifest["mean"], manifest["std"]), batch_size, val_batch_size or batch_size, seed,
            device, rank, world)
    return HalfLoaders(loaders["train"], loaders["val"], len(half_labels), [c for c in sorted(half_class_ids)],
                       input="ffcv" if store is None else "pixel_store")


def store_loaders(store, ids_of: dict, crop: CropSpec, normalise: Normalise, batch_size: int, val_batch_size: int,
                  seed: int, device: torch.device, rank: int = 0, world: int = 1, hold: str = "auto"):
    """Train and val StoreLoaders of a half: ids_of = {split: (sample ids, their labels 0..k-1)}; under DDP
    train draws the global batch (batch_size x world) and keeps this rank's slice, val ids are this rank's."""
    side = store.side
    augment = Augment(crop.kind, crop.size, crop_window(side, crop, store.path), crop.rrc_min_scale)
    out = []
    for split, train in (("train", True), ("val", False)):
        ids, labels = ids_of[split]
        out.append(StoreLoader(store.images(split), ids, labels, augment, normalise,
                               batch_size if train else max(val_batch_size, EVAL_BATCH), train, seed, device,
                               rank if train else 0, world if train else 1, hold))
    return tuple(out)


def first_per_class(ids: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """The first k of `ids` (in dataset order, the paper's files.txt order) of every class."""
    ids = np.sort(ids)
    lab = labels[ids]
    order = np.argsort(lab, kind="stable")
    ranked = lab[order]
    rank = np.arange(len(ids)) - np.searchsorted(ranked, ranked, side="left")
    return np.sort(ids[order[rank < k]])


def build_eval_loader(data_dir, half_class_ids: list[str], crop: CropSpec, split: str, batch_size: int,
                      device: torch.device, max_images: int | None = None, sample_seed: int = 0,
                      num_workers: int = 1) -> HalfLoader:
    """Centre crops of a half's `split` images ("train" or "val"), in a fixed order, no augmentation:
    what the diagnostics read. At most `max_images` of them, a subsample drawn with `sample_seed`, so
    every net of a diagnostic sees the same images in the same batches."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    label_of = {c["id"]: c["index"] for c in manifest["classes"]}
    half_labels = sorted(label_of[c] for c in half_class_ids)
    beton = data_dir / manifest["betons"][split]["file"]
    ids, lut, _ = readable_half_ids(beton, half_labels)
    if max_images is not None and len(ids) > max_images:
        ids = np.sort(np.random.default_rng(sample_seed).choice(ids, max_images, replace=False))
    stored = manifest["settings"]["resolution"]
    window = crop_window(stored, crop, data_dir)
    return _ffcv_loader(beton, ids, lut, False, crop, stored, window, manifest, batch_size, device, sample_seed,
                        num_workers, False, 2)


def _ffcv_loader(beton, ids, lut, train, crop, stored, window, manifest, batch_size, device, seed, num_workers,
                 distributed, batches_ahead, caffe_mean=None, crop_seed: int = 0) -> HalfLoader:
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, Squeeze, ToDevice, ToTensor, ToTorchImage

    size = crop.size                        # window: the crop's share of the stored side (== size: exact pixels)
    if caffe_mean is not None:              # whole images; CaffeTransform crops them after the mean image
        if crop.kind != "paper":
            raise ValueError(f"normalize 'mean_image' needs the paper crop, not {crop.kind!r}")
        decoder = WholeRGBImageDecoder()
    elif train and crop.kind == "paper":      # a random window-sized square (Caffe's crop), resized to `size`
        decoder = RandomResizedCropRGBImageDecoder((size, size), scale=((window / stored) ** 2,) * 2, ratio=(1.0, 1.0))
    elif train and crop.kind == "rrc":
        decoder = RandomResizedCropRGBImageDecoder((size, size), scale=(crop.rrc_min_scale, 1.0))
    elif train:
        raise ValueError(f"unknown crop {crop.kind!r}; expected one of {', '.join(CROPS)}")
    else:
        decoder = CenterCropRGBImageDecoder((size, size), ratio=(window + 0.5) / stored)   # int(ratio*stored) == window
    image = [decoder] + ([RandomHorizontalFlip()] if train and caffe_mean is None else [])
    mean, std = np.array(manifest["mean"]), np.array(manifest["std"])
    on_gpu = device.type == "cuda"
    if caffe_mean is not None:
        image += [ToTensor()] + ([ToDevice(device, non_blocking=True)] if on_gpu else []) + [ToTorchImage()]
    elif on_gpu:                            # JIT ops, then torch ops only (notes/ffcv.md 3.1)
        image += [ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage()]
    else:
        image += [NormalizeImage(mean, std, np.float32), ToTensor(), ToTorchImage()]
    label = [IntDecoder(), ToTensor(), Squeeze()] + ([ToDevice(device, non_blocking=True)] if on_gpu else [])
    order = OrderOption.RANDOM if train else OrderOption.SEQUENTIAL
    def make():
        return Loader(str(beton), batch_size=batch_size, num_workers=num_workers, order=order, seed=seed,
                      indices=ids, distributed=distributed, drop_last=train, os_cache=True,
                      batches_ahead=batches_ahead, pipelines={"image": image, "label": label})

    key = (str(beton), os.path.getmtime(beton), train, crop, stored, batch_size, str(device), seed, num_workers,
           distributed, batches_ahead, tuple(mean), tuple(std), caffe_mean is not None)
    loader = _LOADERS.get(key)
    if loader is None:
        loader = _LOADERS[key] = make()
    loader.next_epoch = 0
    if caffe_mean is not None:
        caffe = CaffeTransform(caffe_mean, size, window, train, crop_seed, device)
        return HalfLoader(loader, ids, lut, device, make=make, caffe=caffe)
    return HalfLoader(loader, ids, lut, device, mean if on_gpu else None, std if on_gpu else None, make)


@functools.cache
def _whole_image_decoder():
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder

    class WholeDecoder(SimpleRGBImageDecoder):
        """FFCV's whole-image decoder, sized by the real images: the 1x1 placeholders of corrupt files
        (never loaded) would otherwise make the stored size look variable."""

        def declare_state_and_memory(self, previous_state):
            from dataclasses import replace as _replace

            from ffcv.pipeline.allocation_query import AllocationQuery

            real = (self.metadata["width"] > 1) | (self.metadata["height"] > 1)
            w, h = self.metadata["width"][real], self.metadata["height"][real]
            if w.min() != w.max() or h.min() != h.max():
                raise DatasetError("normalize 'mean_image' needs images of one stored size: prepare with --resolution")
            shape = (int(h.max()), int(w.max()), 3)
            return (_replace(previous_state, jit_mode=True, shape=shape, dtype=np.dtype("<u1")),
                    AllocationQuery(shape, np.dtype("<u1")))

    return WholeDecoder


def WholeRGBImageDecoder():
    return _whole_image_decoder()()


# FFCV JIT-compiles every Loader's pipeline (seconds each). Trials that run in a reused process (Tune's
# reuse_actors) build the same pipelines again and again: keep one Loader per pipeline; each HalfLoader
# points it at its own samples when it starts an epoch (or builds its own if another half is mid-epoch).
_LOADERS: dict = {}


def retarget(loader, ids):
    """Point a compiled FFCV Loader at other sample ids (another half); its epoch counter is kept."""
    loader.indices = np.asarray(ids)
    loader.traversal_order = type(loader.traversal_order)(loader)     # rebuilds the DDP sampler too
    loader.first_traversal_order = loader.next_traversal_order()
