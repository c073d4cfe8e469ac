"""A half's batches from the pixel store, cropped, mirrored and normalised on the training device.

Why: no decoding at train time, and augmentation a rerun repeats. Every epoch is a permutation of the
half and, per batch, crop positions and mirrors, all drawn from a torch.Generator seeded by the trial's
seed and the epoch: a rerun, or a resumed epoch, sees the same batches, on the CPU and on a GPU alike
(the draws are made on the CPU; the pixels they pick are exact). A batch is gathered from the store's
memory map (whole stored images, uint8); on CUDA into pinned memory by a background thread, copied on a
side stream so the copy overlaps the previous step, then cut there: the paper's crop (a random `window`
square and a mirror, resized to `size` where the window is not that size) or the fast recipe's
random-resized crop, and normalised by the channel mean/std or, for the paper, minus the mean image at
0..255 cut at the same place (Caffe's transform, loaders.CaffeTransform). Where the half fits in GPU
memory beside the model's working set -- measured with torch.cuda.mem_get_info and the peak allocated
over the epoch before, never guessed -- it is held there and batches are gathered on the GPU.
Under DDP every rank draws the same global batch (the global batch size) and takes its own slice, so the
union of the ranks' batches is the one-worker batch: the input does not change with --workers-per-trial.
Validation is the centre window, in sample order. No FFCV, no Ray.

    train = StoreLoader(store.images("train"), ids, labels, Augment("paper", 227, 227), Normalise.channels(mean, std),
                        batch_size=256, train=True, seed=0, device=torch.device("cuda"))
    for images, labels in train: ...
"""
from __future__ import annotations

import itertools
import logging
import math
import queue
import threading
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

EVAL_BATCH = 256               # validation batches: no gradient, so larger batches just cost less per image
HEADROOM_BYTES = 2 << 30       # GPU memory left free beside the model's measured peak and a held half
PINNED_SLOTS = 3               # host batches in flight: one being gathered, one being copied, one spare


@dataclass(frozen=True)
class Batch:
    """One batch of a loader: the images (None where left out), labels 0..k-1 on the device, and what picked
    them: positions in the half and crop parameters (None for a loader that does not say, FFCV's)."""
    images: torch.Tensor | None
    labels: torch.Tensor
    index: torch.Tensor | None = None
    params: tuple | None = None


@dataclass(frozen=True)
class Augment:
    """Train-time crop of a `side` px stored image. 'paper': a random `window` square + mirror, resized to
    `size` where window != size; 'rrc': a random-resized crop (area `min_scale`..1 of the image, aspect
    3/4..4/3, torchvision's ranges; a draw larger than the image is clipped to it) + mirror, resized to
    `size`. Validation: the centre `window` square, resized to `size`."""
    kind: str
    size: int
    window: int
    min_scale: float = 0.25


@dataclass(frozen=True)
class Normalise:
    """'mean_std': (x - mean) / std per channel; 'mean_image': x - the mean image (H x W x 3, 0..255), cut
    at the image's own crop position (the paper: nothing divided)."""
    kind: str
    mean: tuple = ()
    std: tuple = ()
    mean_image: np.ndarray | None = None

    @classmethod
    def channels(cls, mean, std) -> "Normalise":
        return cls("mean_std", tuple(float(v) for v in mean), tuple(float(v) for v in std))


class StoreLoader:
    """Batches (float NCHW on `device`, labels 0..k-1) of a half read from a pixel store; `len` = batches
    an epoch (the global batch's count under DDP)."""

    def __init__(self, images: np.ndarray, ids, labels, augment: Augment, normalise: Normalise, batch_size: int,
                 train: bool, seed: int, device: torch.device, rank: int = 0, world: int = 1, hold: str = "auto"):
        self.images, self.ids = images, np.asarray(ids, dtype=np.int64)
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.augment, self.normalise, self.train = augment, normalise, train
        self.batch_size, self.seed, self.device, self.epoch = batch_size, seed, device, 0
        self.rank, self.world, self.hold = rank, world, hold      # hold: auto | never | always (GPU residency)
        self.side = images.shape[1]
        if augment.window > self.side or augment.kind not in ("paper", "rrc"):
            raise ValueError(f"crop {augment} does not fit {self.side} px stored images")
        self.num_samples = len(self.ids)
        self.resident = None                        # the half's uint8 pixels on the GPU, once held there
        self.iterations = 0
        self._mean = torch.tensor(normalise.mean, dtype=torch.float32).view(1, 3, 1, 1) if normalise.mean else None
        self._std = torch.tensor(normalise.std, dtype=torch.float32).view(1, 3, 1, 1) if normalise.std else None
        self._mean_image = (None if normalise.mean_image is None else
                            torch.as_tensor(np.ascontiguousarray(normalise.mean_image, dtype=np.float32)))
        self._on_device = {}

    # -- what the loop and frozen_prefix.py use -------------------------------------------------
    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        n = len(self.ids)
        return n // (self.batch_size * self.world) if self.train else -(-n // self.batch_size)

    def _shifts(self) -> int:
        return self.side - self.augment.window + 1

    def variants(self) -> float:
        """How many distinct inputs an image can give: crop offsets x mirror (inf for random-resized
        crops; the centre crop for validation)."""
        if not self.train:
            return 1
        return self._shifts() ** 2 * 2 if self.augment.kind == "paper" else math.inf

    def table(self, f, chunk: int = EVAL_BATCH):
        """f of every input this loader can yield, computed once (each image at each crop offset and mirror for
        training: a [top, left, mirror, position] table; the centre crop of each position for validation), in
        chunks of `chunk` images. `look_up(table, batch)` then gives f(batch's inputs) for any batch of
        `stream()`: the same seeded draws, nothing computed at train time (frozen_prefix.py). Where f returns a
        dict of tensors (a trunk's outputs at several cuts, one pass), so does this: a table each."""
        count = len(self.ids)
        many = None

        def parts(out):
            nonlocal many
            many = isinstance(out, dict) if many is None else many
            return out if many else {None: out}

        if not self.train:
            chunks = [parts(f(self._batch(torch.arange(s, min(count, s + chunk)), self._centre(min(chunk, count - s)))))
                      for s in range(0, count, chunk)]
            tables = {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}
            return tables if many else tables[None]
        if self.augment.kind != "paper":
            raise ValueError("random-resized crops are not a finite set of inputs: nothing to precompute")
        shifts, tables = self._shifts(), {}
        for top, left, mirror in itertools.product(range(shifts), range(shifts), (0, 1)):
            for start in range(0, count, chunk):
                index = torch.arange(start, min(count, start + chunk))
                at = lambda v: torch.full((len(index),), v)
                for k, out in parts(f(self._batch(index, (at(top), at(left), at(mirror).bool())))).items():
                    if k not in tables:
                        tables[k] = torch.empty((shifts, shifts, 2, count) + out.shape[1:], dtype=out.dtype,
                                                device=out.device)
                    tables[k][top, left, mirror, start:start + len(index)] = out
        return tables if many else tables[None]

    def look_up(self, table: torch.Tensor, batch: "Batch") -> torch.Tensor:
        """The rows of `table` (from `table()`) for the inputs of `batch`."""
        if not self.train:
            return table[batch.index].to(self.device)
        top, left, mirror = batch.params
        return table[top, left, mirror.long(), batch.index]

    def __iter__(self):
        for batch in self.stream():
            yield batch.images, batch.labels

    def stream(self, images: bool = True):
        """This epoch's batches with what picked them (positions in the half, crop parameters), for tables of
        precomputed inputs (`look_up`); `images=False` leaves the pixels out (every reader looks its input up)."""
        self._maybe_hold_on_device()
        self.iterations += 1
        if not self.train:
            for start in range(0, len(self.ids), self.batch_size):
                index = torch.arange(start, min(len(self.ids), start + self.batch_size))
                params = self._centre(len(index))
                yield Batch(self._batch(index, params) if images else None, self.labels[index].to(self.device),
                            index, params)
            return
        plan = list(self._plan())
        if not images:
            for index, params in plan:
                yield Batch(None, self.labels[index].to(self.device), index, params)
            return
        on_device = self._plan_on_device(plan)
        for whole, (index, params), (_, params_on_device, labels) in zip(self._gathered(plan, on_device), plan,
                                                                          on_device):
            yield Batch(self._transform(whole, params_on_device), labels, index, params)

    def _plan_on_device(self, plan):
        """(index, params, labels) of each batch on the device, copied in one transfer an epoch (a per-batch
        copy from pageable memory would make the host wait for the GPU at every step)."""
        if self.device.type != "cuda" or not plan:
            return [(index, params, self.labels[index].to(self.device)) for index, params in plan]
        sizes = [len(index) for index, _ in plan]
        index = torch.cat([i for i, _ in plan])
        columns = [torch.cat([p[k] for _, p in plan]).to(self.device) for k in range(len(plan[0][1]))]
        index_d, labels_d = index.to(self.device), self.labels[index].to(self.device)
        out, start = [], 0
        for n in sizes:
            out.append((index_d[start:start + n], tuple(c[start:start + n] for c in columns),
                        labels_d[start:start + n]))
            start += n
        return out

    # -- the seeded plan of an epoch ------------------------------------------------------------
    def _plan(self):
        """(positions in the half, crop parameters) of this rank's batches this epoch; every rank draws the
        global batch and keeps its slice."""
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(len(self.ids), generator=gen)
        glob = self.batch_size * self.world
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        for b in range(len(self)):
            index = order[b * glob:(b + 1) * glob]
            params = self._draw(gen, len(index))
            yield index[mine], tuple(p[mine] for p in params)

    def _draw(self, gen, n: int):
        if self.augment.kind == "paper":
            shifts = self._shifts()
            top = torch.randint(0, shifts, (n,), generator=gen)
            left = torch.randint(0, shifts, (n,), generator=gen)
            return top, left, torch.rand(n, generator=gen) < 0.5
        area = torch.empty(n).uniform_(self.augment.min_scale, 1.0, generator=gen)
        log_ratio = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen)
        ratio = log_ratio.exp()
        w = (self.side * (area * ratio).sqrt()).round().clamp(1, self.side)
        h = (self.side * (area / ratio).sqrt()).round().clamp(1, self.side)
        top = ((self.side - h + 1) * torch.rand(n, generator=gen)).floor().clamp(max=self.side - h)
        left = ((self.side - w + 1) * torch.rand(n, generator=gen)).floor().clamp(max=self.side - w)
        return top, left, h, w, torch.rand(n, generator=gen) < 0.5

    def _centre(self, n: int):
        offset = torch.full((n,), (self.side - self.augment.window) // 2)
        return offset, offset, torch.zeros(n, dtype=torch.bool)

    # -- pixels to the device -------------------------------------------------------------------
    def _host(self, index: torch.Tensor, out: np.ndarray | None = None) -> np.ndarray:
        return np.take(self.images, self.ids[index.numpy()], axis=0, out=out)

    def _batch(self, index: torch.Tensor, params) -> torch.Tensor:
        """The transformed images of half positions `index` (one synchronous gather)."""
        if self.resident is not None:
            whole = self.resident[index.to(self.device)]
        else:
            whole = torch.from_numpy(self._host(index)).to(self.device)
        return self._transform(whole, params)

    def _gathered(self, plan, on_device):
        """The whole uint8 images of each batch of `plan`, on the device (`on_device`: its indices there)."""
        if self.resident is not None:
            for index, _, _ in on_device:
                yield self.resident[index]
            return
        if self.device.type != "cuda":
            for index, _ in plan:
                yield torch.from_numpy(self._host(index))
            return
        for whole, _, _ in self._pinned_copies(iter(plan)):
            yield whole

    def _pinned_copies(self, plan):
        """A background thread gathers each batch into a pinned host buffer; the copy to the GPU runs on a
        side stream, so it overlaps the step before; the main stream waits for it before the crop."""
        shape = (self.batch_size, self.side, self.side, 3)
        if getattr(self, "_slots", None) is None:          # pinned once: pinning is slow, epochs are many
            self._slots = [torch.empty(shape, dtype=torch.uint8).pin_memory() for _ in range(PINNED_SLOTS)]
            self._copied = [None] * PINNED_SLOTS           # the copy event of each slot's last batch (any epoch)
        slots, copied = self._slots, self._copied
        free, ready, stop = queue.Queue(), queue.Queue(maxsize=PINNED_SLOTS - 1), threading.Event()
        for s in range(PINNED_SLOTS):
            free.put(s)

        def gather():
            try:
                for index, params in plan:
                    s = free.get()
                    if stop.is_set():
                        return
                    if copied[s] is not None:
                        copied[s].synchronize()
                    self._host(index, out=slots[s].numpy()[:len(index)])
                    ready.put((s, index, params))
            except BaseException as e:                      # surfaced in the training thread
                ready.put(e)
                return
            ready.put(None)

        worker = threading.Thread(target=gather, name="store-gather", daemon=True)
        worker.start()
        side_stream = torch.cuda.Stream(self.device)
        try:
            while True:
                item = ready.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                s, index, params = item
                with torch.cuda.stream(side_stream):
                    whole = slots[s][:len(index)].to(self.device, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record(side_stream)
                copied[s] = event
                free.put(s)
                torch.cuda.current_stream(self.device).wait_event(event)
                whole.record_stream(torch.cuda.current_stream(self.device))
                yield whole, params, index
        finally:
            stop.set()
            free.put(0)                                     # wake a waiting gather so it sees `stop`
            while worker.is_alive():
                try:
                    ready.get(timeout=0.1)
                except queue.Empty:
                    pass
            worker.join()

    def _maybe_hold_on_device(self):
        """Hold the half on the GPU where it fits beside the model's working set, measured: free memory now
        (mem_get_info) against the half's bytes plus the peak allocated beyond the current use during the
        iterations before (the model's activations and gradients) plus a margin. Decided after a first pass."""
        if self.device.type != "cuda" or self.resident is not None or self.hold == "never":
            return
        if self.hold == "auto" and self.iterations < 1:
            return                                          # no step measured yet
        need = len(self.ids) * self.side * self.side * 3
        free, _ = torch.cuda.mem_get_info(self.device)
        working = torch.cuda.max_memory_allocated(self.device) - torch.cuda.memory_allocated(self.device)
        if self.hold == "auto" and need + working + HEADROOM_BYTES > free:
            log.info("pixel store: the %s half (%.1f GiB) stays in host memory: %.1f GiB free on %s beside a "
                     "working set of %.1f GiB", "train" if self.train else "val", need / 2**30, free / 2**30,
                     self.device, working / 2**30)
            self.hold = "never"
            return
        resident = torch.empty((len(self.ids), self.side, self.side, 3), dtype=torch.uint8, device=self.device)
        step = max(1, (256 << 20) // (self.side * self.side * 3))
        for start in range(0, len(self.ids), step):
            index = torch.arange(start, min(len(self.ids), start + step))
            resident[start:start + len(index)].copy_(torch.from_numpy(self._host(index)).pin_memory())
        self.resident = resident
        log.info("pixel store: the %s half (%.1f GiB) held on %s", "train" if self.train else "val",
                 need / 2**30, self.device)

    # -- crop, mirror, normalise on the device --------------------------------------------------
    def _transform(self, whole: torch.Tensor, params) -> torch.Tensor:
        """Whole stored images (B x side x side x 3 uint8, on the device) to normalised crops (B x 3 x size x size)."""
        dev = whole.device
        params = tuple(p.to(dev) for p in params)
        if self.augment.kind == "rrc" and self.train:
            return self._rrc(whole, *params)
        top, left, mirror = params
        w, size = self.augment.window, self.augment.size
        steps = torch.arange(w, device=dev)
        rows = (top[:, None] + steps)[:, :, None]                           # B x w x 1
        cols = (left[:, None] + torch.where(mirror[:, None], w - 1 - steps, steps))[:, None, :]   # B x 1 x w
        batch = torch.arange(len(whole), device=dev)[:, None, None]
        x = whole[batch, rows, cols].permute(0, 3, 1, 2).float()            # B x 3 x w x w
        x = self._normalised(x, rows, cols)
        if w != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return x.contiguous(memory_format=torch.channels_last)

    def _normalised(self, x, rows=None, cols=None):
        if self.normalise.kind == "mean_image":
            mean = self._device_tensor("mean_image", self._mean_image, x.device)
            return x - mean[rows, cols].permute(0, 3, 1, 2)
        mean = self._device_tensor("mean", self._mean, x.device)
        std = self._device_tensor("std", self._std, x.device)
        return (x - mean) / std

    def _device_tensor(self, name, tensor, device):
        key = (name, str(device))
        if key not in self._on_device:
            self._on_device[key] = tensor.to(device)
        return self._on_device[key]

    def _rrc(self, whole, top, left, h, w, mirror) -> torch.Tensor:
        """Random-resized crops as one bilinear resample (affine grid) of the batch; mirror by the grid."""
        b, side, size = len(whole), self.side, self.augment.size
        x = whole.permute(0, 3, 1, 2).float()           # normalised after the resample (fewer pixels; the same
                                                         # numbers up to rounding: bilinear weights sum to 1)
        # the crop box in normalised coordinates (-1..1 over the image), its centre and half-extent
        cx = (left + w / 2) / side * 2 - 1
        cy = (top + h / 2) / side * 2 - 1
        sx = torch.where(mirror, -w / side, w / side)
        theta = torch.zeros(b, 2, 3, device=whole.device)
        theta[:, 0, 0], theta[:, 0, 2] = sx, cx
        theta[:, 1, 1], theta[:, 1, 2] = h / side, cy
        grid = F.affine_grid(theta, (b, 3, size, size), align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return self._normalised(out).contiguous(memory_format=torch.channels_last)
