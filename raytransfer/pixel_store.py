"""A node's store of a dataset's uint8 pixels at one side: decoded once, memory-mapped by every trial there.

Why: no decoding at train time. A trial gathers its batches from this store (raytransfer/device_input.py)
and crops, mirrors and normalises them on its device; every trial of the node maps the same files, so the
page cache holds one copy of the pixels however many trials read them.

Layout of a store folder: `train.u8` and `val.u8` (N x side x side x 3 uint8, the dataset's sample order),
`train.labels.npy` and `val.labels.npy`, and `store.json`, the header (fingerprint of the source, side,
layout, counts, file sizes), written last. A store whose header is missing, names another source or side,
or whose files have other sizes (half-written, of another dataset) is refused and rebuilt, never read.
Concurrent trials of a node take an exclusive `fcntl.flock` on the folder's lock file: one writes, the
others wait and then map what it wrote. Files are written as `*.partial` and renamed once complete; a full
disk ends the write with one StoreError and nothing of the store left behind.

Sources: the betons (FFCV decodes them at the side: `beton_source`), the built-in generator
(`synthetic_source`) or image files (`image_files_source`); the last two need neither FFCV nor Ray.

    store = ensure_store(store_dir(data_dir, 32), synthetic_source(spec, 32), 32)
    images = store.images("train")            # np.memmap, N x 32 x 32 x 3 uint8, read-only
"""
from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

log = logging.getLogger(__name__)

LAYOUT = "NHWC uint8"          # sample, row, column, RGB
VERSION = 1                    # bump when the layout or what a source writes changes: old stores are rebuilt
HEADER = "store.json"
SPLITS = ("train", "val")
RESERVE_BYTES = 256 << 20      # left free on the disk beside a new store
CHUNK = 256                    # images written per write() call


class StoreError(RuntimeError):
    """A store that cannot be written here: no room on the disk, or a write that failed. The message names
    the folder, the bytes and the fix; the loaders then read through FFCV."""


@dataclass(frozen=True)
class Source:
    """What a store is written from: per split, the image count and a function yielding (images uint8
    B x side x side x 3, labels B) in sample order; `fingerprint` names the source's content."""
    fingerprint: str
    counts: dict                                  # split -> images
    batches: Callable[[str], Iterable]            # split -> iterator of (images, labels)
    what: str = ""                                # for messages: "the betons of data/x", "the built-in generator"


class PixelStore:
    """A complete, checked store: its images memory-mapped read-only (shared through the page cache)."""

    def __init__(self, path: Path, header: dict):
        self.path, self.header = Path(path), header
        self.side = int(header["side"])
        self._maps: dict = {}

    def images(self, split: str) -> np.ndarray:
        if split not in self._maps:
            n = self.header["counts"][split]
            self._maps[split] = np.memmap(self.path / f"{split}.u8", dtype=np.uint8, mode="r",
                                          shape=(n, self.side, self.side, 3))
        return self._maps[split]

    def labels(self, split: str) -> np.ndarray:
        return np.load(self.path / f"{split}.labels.npy")

    def nbytes(self, split: str | None = None) -> int:
        return sum(image_bytes(self.header["counts"][s], self.side) for s in ([split] if split else SPLITS))


def image_bytes(count: int, side: int) -> int:
    return int(count) * side * side * 3


def store_bytes(counts: dict, side: int) -> int:
    """Bytes a store of these counts takes on disk (pixels and labels)."""
    return sum(image_bytes(n, side) + 8 * n for n in counts.values())


def cache_root() -> Path:
    """Where a node keeps the stores of datasets whose folder it cannot write: $RAYTRANSFER_CACHE/pixel-store
    (default ~/.cache/raytransfer), a folder of the node's own disk."""
    return Path(os.environ.get("RAYTRANSFER_CACHE", "~/.cache/raytransfer")).expanduser() / "pixel-store"


def store_dir(data_dir, side: int, root: Path | None = None) -> Path:
    """The store folder of a dataset folder at `side` px: `root` if given; else beside the dataset
    (`<data_dir>/pixel-store/<side>px`: the betons are staged per node, docs/cluster.md) where that folder
    is writable, else under `cache_root()`. One per dataset path and side, whatever the dataset's content
    (a re-prepared dataset replaces its store there)."""
    real = os.path.realpath(str(data_dir))
    if root is None and os.access(real, os.W_OK):
        return Path(real) / "pixel-store" / f"{side}px"
    tag = hashlib.sha256(real.encode()).hexdigest()[:10]
    return (root or cache_root()) / f"{Path(real).name}-{tag}-{side}px"


def header_of(source: Source, side: int) -> dict:
    return {"fingerprint": source.fingerprint, "side": side, "layout": LAYOUT, "version": VERSION,
            "counts": {s: int(source.counts[s]) for s in SPLITS},
            "bytes": {s: image_bytes(source.counts[s], side) for s in SPLITS}}


def open_store(path, fingerprint: str, side: int) -> PixelStore | None:
    """The store at `path` if it is complete and of this fingerprint, side and layout; else None."""
    path = Path(path)
    try:
        header = json.loads((path / HEADER).read_text())
    except (OSError, ValueError):
        return None
    if (header.get("fingerprint"), header.get("side"), header.get("layout"), header.get("version")) != \
            (fingerprint, side, LAYOUT, VERSION):
        return None
    for split in SPLITS:
        f = path / f"{split}.u8"
        if not f.is_file() or f.stat().st_size != header["bytes"][split] or not (path / f"{split}.labels.npy").is_file():
            return None
    return PixelStore(path, header)


def why_refused(path, fingerprint: str, side: int) -> str:
    """Why `open_store` refuses what is at `path` (for the log line of a rebuild)."""
    try:
        header = json.loads((Path(path) / HEADER).read_text())
    except (OSError, ValueError):
        return "no complete store there (none yet, or a half-written one)"
    if header.get("fingerprint") != fingerprint:
        return f"it holds another dataset (fingerprint {str(header.get('fingerprint'))[:12]}, want {fingerprint[:12]})"
    if (header.get("side"), header.get("layout"), header.get("version")) != (side, LAYOUT, VERSION):
        return f"it holds {header.get('side')} px / {header.get('layout')} v{header.get('version')}"
    return "its files do not have the sizes its header names (cut short or replaced)"


@contextmanager
def _locked(path: Path):
    """One writer per store folder on this node: an exclusive flock, released when the block ends."""
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_store(path, source: Source, side: int) -> PixelStore:
    """The complete store of `source` at `side` in `path`: opened if there, else written once (other
    processes of the node wait on the lock, then open it). StoreError where it cannot be written."""
    path = Path(path)
    store = open_store(path, source.fingerprint, side)
    if store is not None:
        return store
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        store = open_store(path, source.fingerprint, side)        # another process wrote it meanwhile
        if store is not None:
            return store
        if path.exists():
            log.info("pixel store %s rebuilt: %s", path, why_refused(path, source.fingerprint, side))
        _write(path, source, side)
        store = open_store(path, source.fingerprint, side)
    if store is None:
        raise StoreError(f"the pixel store written to {path} does not read back: {why_refused(path, source.fingerprint, side)}")
    return store


def check_room(path: Path, counts: dict, side: int):
    """StoreError unless the disk of `path` has room for a store of `counts` at `side` (plus a reserve)."""
    need = store_bytes(counts, side)
    probe = path if path.exists() else path.parent
    free = shutil.disk_usage(probe).free + _bytes_of(path)       # a store being replaced frees its own bytes
    if need + RESERVE_BYTES > free:
        raise StoreError(f"a pixel store of {sum(counts.values()):,} images at {side} px needs "
                         f"{need / 2**30:.2f} GiB but {probe} has {free / 2**30:.2f} GiB free: free space there or "
                         "point RAYTRANSFER_CACHE at a larger disk")


def _bytes_of(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*") if f.is_file()) if path.is_dir() else 0


def _clear(path: Path):
    for f in list(path.glob("*.u8")) + list(path.glob("*.npy")) + list(path.glob("*.partial")) + [path / HEADER]:
        f.unlink(missing_ok=True)


def _write(path: Path, source: Source, side: int):
    """Write every split as .partial files, rename them, write the header last; on any failure remove
    all of it and raise StoreError (a full disk: ENOSPC, or EFBIG past a file-size limit)."""
    check_room(path, source.counts, side)
    path.mkdir(parents=True, exist_ok=True)
    _clear(path)
    header = header_of(source, side)
    try:
        for split in SPLITS:
            n = header["counts"][split]
            labels = np.empty(n, dtype=np.int64)
            part = path / f"{split}.u8.partial"
            with open(part, "wb") as f:
                _reserve(f, header["bytes"][split])
                done = 0
                for images, batch_labels in source.batches(split):
                    images = np.ascontiguousarray(images, dtype=np.uint8)
                    if images.shape[1:] != (side, side, 3) or done + len(images) > n:
                        raise RuntimeError(f"{source.what or 'the source'} gave images of shape {images.shape[1:]} "
                                         f"(want {side} x {side} x 3) or more than its {n} {split} images")
                    f.write(memoryview(images).cast("B"))
                    labels[done:done + len(images)] = np.asarray(batch_labels).reshape(-1)
                    done += len(images)
                if done != n:
                    raise RuntimeError(f"{source.what or 'the source'} gave {done} {split} images, not {n}")
                f.flush()
                os.fsync(f.fileno())
            with open(path / f"{split}.labels.npy.partial", "wb") as f:
                np.save(f, labels)
        for split in SPLITS:
            os.replace(path / f"{split}.u8.partial", path / f"{split}.u8")
            os.replace(path / f"{split}.labels.npy.partial", path / f"{split}.labels.npy")
        tmp = path / f"{HEADER}.partial"
        tmp.write_text(json.dumps(header, indent=1))
        os.replace(tmp, path / HEADER)
    except OSError as e:
        _clear(path)
        full = e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
        raise StoreError(f"writing the pixel store {path} failed: {e.strerror or e}"
                         + (" (the disk is full or a file-size limit was hit): free space there or point "
                            "RAYTRANSFER_CACHE at a larger disk" if full else "")) from None
    except BaseException:
        _clear(path)
        raise
    log.info("pixel store %s written: %s images at %d px, %.2f GiB, from %s", path,
             "+".join(str(header["counts"][s]) for s in SPLITS), side, store_bytes(source.counts, side) / 2**30,
             source.what or "its source")


def _reserve(f, nbytes: int):
    """Claim the file's blocks up front where the filesystem can (a full disk fails here, at once)."""
    try:
        os.posix_fallocate(f.fileno(), 0, max(1, nbytes))
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    # fallocate grows the file; writes start at 0 and fill it exactly


# ---------------------------------------------------------------------------------------------
# Sources

def beton_source(data_dir, manifest: dict, side: int) -> Source:
    """The dataset's betons decoded by FFCV at `side` (raytransfer/memory_loader.py: exact pixels at the
    stored side, else each image resized once)."""
    from .memory_loader import decode_batches

    data_dir = Path(data_dir)
    betons = {s: data_dir / manifest["betons"][s]["file"] for s in SPLITS}

    def batches(split):
        return decode_batches(betons[split], side)
    # every sample of a beton, corrupt images' placeholders included: from the manifest, so a trial whose node has
    # the store already never imports FFCV (its import alone compiles numba code for seconds)
    counts = {s: manifest["counts"][s]["images"] + manifest["counts"][s]["corrupt"] for s in SPLITS}
    return Source(f"beton:{manifest['fingerprint']}", counts, batches, f"the betons of {data_dir}")


def synthetic_source(spec, side: int, workers: int = 1) -> Source:
    """The built-in generator's images (raytransfer/synthetic.py) at `side` px (its own size: as drawn;
    else resized once, bilinear, as `raytransfer prepare` resizes them), drawn by `workers` processes, no FFCV."""
    from .prepare import ResizedSynthetic

    def batches(split):
        ds = ResizedSynthetic(spec, split, side)
        starts = range(0, len(ds), CHUNK)
        if workers <= 1:
            yield from (_rendered(ds, start) for start in starts)
            return
        with multiprocessing.get_context("fork").Pool(workers) as pool:      # in order: imap keeps it
            yield from pool.imap(functools.partial(_rendered, ds), starts)
    digest = hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode()).hexdigest()
    counts = {"train": spec.num_classes * spec.train_per_class, "val": spec.num_classes * spec.val_per_class}
    return Source(f"synthetic:{digest}", counts, batches, "the built-in generator")


def _rendered(ds, start: int):
    items = [ds[i] for i in range(start, min(len(ds), start + CHUNK))]
    return np.stack([x for x, _ in items]), np.array([y for _, y in items])


def image_files_source(samples: dict, side: int) -> Source:
    """Image files, {split: [(path, label), ...]}, each squashed to `side` x `side` (bilinear, as
    `raytransfer prepare` stores them); a file PIL cannot read is a black image with label -1."""
    from .prepare import ImageFiles

    def batches(split):
        ds = ImageFiles(samples[split], side)
        for start in range(0, len(ds), CHUNK):
            items = [ds[i] for i in range(start, min(len(ds), start + CHUNK))]
            yield (np.stack([x if x.shape[0] == side else np.zeros((side, side, 3), np.uint8) for x, _ in items]),
                   np.array([y for _, y in items]))
    h = hashlib.sha256()
    for split in SPLITS:
        for p, label in samples[split]:
            h.update(f"{split}\t{os.path.realpath(p)}\t{os.path.getsize(p)}\t{label}\n".encode())
    return Source(f"files:{h.hexdigest()}", {s: len(samples[s]) for s in SPLITS}, batches, "image files")
