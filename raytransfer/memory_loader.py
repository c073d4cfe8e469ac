"""A half held in memory as decoded pixels, cropped and mirrored in torch: the input path of small datasets.

Why: reproducible augmentation. FFCV's random crop is not seeded, so a base trained twice with the same
seed differed by 2.6-8.1 points (RESULTS.md); here FFCV decodes the beton once per process (cached) and
every epoch is a permutation plus one gather per batch for the paper's crop (a random `size` square of
the stored image and a mirror with probability 1/2), all drawn from a generator seeded by the trial seed
and the epoch: a rerun, or a resumed epoch, sees the same batches. A training epoch of the demo net is
1.04x the FFCV path's speed (benchmarks/demo_input.py); it is not what makes the demo fast (conv1 at
stride 2 is). Validation is the centre crop, precomputed. Small datasets only (MAX_BYTES decoded). A
dataset stored larger than the recipe's side (a user's tree at 256 px) is held at that side, each image
shrunk once as it is decoded: the same crops in its pixels as on the built-in data, none resized per step.

    train, val = memory_half(train_beton, val_beton, train_ids, val_ids, lut, side, size, mean, std, batch,
                             val_batch, seed, device)
"""
from __future__ import annotations

import itertools
import os

import numpy as np
import torch

MAX_BYTES = 2 << 30            # halves larger than this stay on the FFCV path
EVAL_BATCH = 256               # validation batches: no gradient, so larger batches just cost less per image
_DECODED: dict = {}            # (beton, mtime, side) -> (images uint8 NHWC, labels): one decode per process,
                               # the betons of one dataset at a time (bounded memory)
_DECODERS: list = []           # their FFCV Loaders, kept: a collected one makes numba's finalizer print a
                               # KeyError traceback (harmless, but on the sweep's console)


def decoded(beton, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Every image of a beton at `side` (uint8 NHWC) and its label, in dataset order (FFCV; the whole square:
    exact pixels at the stored side, else each image resized once; a skipped corrupt image's
    placeholder is resized to the side)."""
    key = (str(beton), os.path.getmtime(beton), side)
    if key not in _DECODED:
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
        from ffcv.loader import Loader, OrderOption

        loader = Loader(str(beton), batch_size=256, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                        pipelines={"image": [CenterCropRGBImageDecoder((side, side), ratio=1.0)],
                                   "label": [IntDecoder()]})
        images, labels = [], []
        for x, y in loader:
            images.append(np.array(x))
            labels.append(np.array(y).reshape(-1))
        folder = os.path.dirname(str(beton))       # one dataset (its train and val betons) per process
        for other in [k for k in _DECODED if os.path.dirname(k[0]) != folder]:
            del _DECODED[other]
        _DECODED[key] = (np.concatenate(images), np.concatenate(labels))
        _DECODERS.append(loader)
    return _DECODED[key]


def fits(manifest: dict, side: int | None = None) -> bool:
    """Does the whole dataset, decoded at `side` (default: its stored side), stay under MAX_BYTES (what
    `decoded` holds)?"""
    side = side or manifest["settings"]["resolution"] or 0
    images = sum(manifest["counts"][split]["images"] for split in ("train", "val"))
    return 0 < side and images * side * side * 3 <= MAX_BYTES


class MemoryLoader:
    """Batches (float NCHW normalised, labels 0..k-1) of a half held in memory; `len` = batches an epoch."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, size: int, mean, std, batch_size: int,
                 train: bool, seed: int, device: torch.device):
        self.images, self.labels, self.size, self.train = images, labels, size, train
        self.batch_size, self.seed, self.device, self.epoch = batch_size, seed, device, 0
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.num_samples = len(labels)
        self.lookup = None                         # precompute(): every train input's f(input), by crop
        if not train:                              # the centre crop, normalised once
            self.fixed = self._normalise(self._crop(torch.arange(len(labels)), *self._centre(len(labels))))

    def _shifts(self) -> int:
        """Crop offsets along each side."""
        return self.images.shape[1] - self.size + 1

    def variants(self) -> int:
        """How many distinct inputs an image can give: crop offsets x mirror (the centre crop for val)."""
        return self._shifts() ** 2 * 2 if self.train else 1

    def precompute(self, f, chunk: int = EVAL_BATCH):
        """From now on yield f(input) in place of each input, f computed once for every input this loader can
        yield (each image at each crop offset and mirror); the batches stay those of the same seeded draws."""
        if not self.train:
            self.fixed = torch.cat([f(self.fixed[i:i + chunk].to(self.device)) for i in range(0, len(self.fixed), chunk)])
            return
        shifts, count = self._shifts(), len(self.labels)
        lookup = None
        for top, left, mirror in itertools.product(range(shifts), range(shifts), (0, 1)):
            for start in range(0, count, chunk):
                index = torch.arange(start, min(count, start + chunk))
                at = lambda v: torch.full((len(index),), v)
                out = f(self._normalise(self._crop(index, at(top), at(left), at(mirror).bool())).to(self.device))
                if lookup is None:
                    lookup = torch.empty((shifts, shifts, 2, count) + out.shape[1:], dtype=out.dtype, device=out.device)
                lookup[top, left, mirror, start:start + len(index)] = out
        self.lookup = lookup

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        n = len(self.labels)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def _centre(self, count):
        side = self.images.shape[1]
        offset = torch.full((count,), (side - self.size) // 2)
        return offset, offset, torch.zeros(count, dtype=torch.bool)

    def _crop(self, index, top, left, mirror) -> torch.Tensor:
        steps = torch.arange(self.size)
        rows = (top[:, None] + steps)[:, :, None]                        # B x S x 1
        cols = left[:, None] + torch.where(mirror[:, None], self.size - 1 - steps, steps)
        return self.images[index[:, None, None], rows, cols[:, None, :]]   # B x S x S x 3 uint8

    def _normalise(self, crops: torch.Tensor) -> torch.Tensor:
        x = crops.permute(0, 3, 1, 2).float()
        return ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)

    def __iter__(self):
        if not self.train:
            for start in range(0, len(self.labels), self.batch_size):
                end = start + self.batch_size
                yield self.fixed[start:end].to(self.device), self.labels[start:end].to(self.device)
            return
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(len(self.labels), generator=gen)
        shifts = self._shifts()
        for b in range(len(self)):
            index = order[b * self.batch_size:(b + 1) * self.batch_size]
            top = torch.randint(0, shifts, (len(index),), generator=gen)
            left = torch.randint(0, shifts, (len(index),), generator=gen)
            mirror = torch.rand(len(index), generator=gen) < 0.5
            if self.lookup is not None:
                yield self.lookup[top, left, mirror.long(), index], self.labels[index].to(self.device)
                continue
            images = self._normalise(self._crop(index, top, left, mirror))
            yield images.to(self.device), self.labels[index].to(self.device)


def memory_half(train_beton, val_beton, train_ids, val_ids, lut: np.ndarray, side: int, size: int, mean, std,
                batch_size: int, val_batch_size: int, seed: int, device: torch.device):
    """Train and val MemoryLoaders of a half (ids: sample ids of its classes; lut: label -> 0..k-1)."""
    out = []
    for beton, ids, train in ((train_beton, train_ids, True), (val_beton, val_ids, False)):
        images, labels = decoded(beton, side)
        ids = np.asarray(ids)
        out.append(MemoryLoader(torch.from_numpy(images[ids]), torch.from_numpy(lut[labels[ids]]), size, mean, std,
                                batch_size if train else max(val_batch_size, EVAL_BATCH), train, seed, device))
    return tuple(out)
