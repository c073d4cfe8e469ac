"""A beton decoded to uint8 pixels at one side: what the pixel store is written from.

FFCV decodes each image's whole square once: exact pixels at the stored side, else the image resized
once to `side` (a 256 px user tree held at the demo's 32 px). The pixel store (raytransfer/pixel_store.py)
writes these batches to disk as they come, so a dataset of any size is decoded in bounded memory; the
trials then read the store (raytransfer/device_input.py), never a beton, for their pixels.

    for images, labels in decode_batches(beton, side): ...     # uint8 B x side x side x 3, labels B
"""
from __future__ import annotations

import numpy as np

_DECODERS: list = []           # FFCV Loaders used, kept: a collected one makes numba's finalizer print a
                               # KeyError traceback (harmless, but on the sweep's console)


def decode_batches(beton, side: int, batch_size: int = 256):
    """Every image of a beton at `side` (uint8 NHWC) with its label, in dataset order, batch by batch (a
    skipped corrupt image's placeholder is resized to the side; its label is -1)."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    loader = Loader(str(beton), batch_size=batch_size, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": [CenterCropRGBImageDecoder((side, side), ratio=1.0)], "label": [IntDecoder()]})
    _DECODERS.append(loader)
    for x, y in loader:
        yield np.array(x), np.array(y).reshape(-1)


def decoded(beton, side: int) -> tuple[np.ndarray, np.ndarray]:
    """All of `decode_batches` at once (small betons: tests and benchmarks)."""
    images, labels = zip(*decode_batches(beton, side))
    return np.concatenate(images), np.concatenate(labels)

