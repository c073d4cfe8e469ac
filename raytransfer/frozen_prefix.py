"""A frozen net's first n layers computed once per distinct input, not once per step.

Why: a frozen transfer (AnB, BnB, random_frozen) runs layers 1..n forward at every step although they never
change, and at the demo's 128 epochs that forward is most of a frozen net's cost. On a half read from the
node's pixel store (device_input.py) the inputs are finitely many: each image at each crop offset and mirror
(3 x 3 x 2 for 30 px crops of 32 px images; the centre crop for validation). Their outputs through the frozen layers are computed
once; each epoch draws the same crops from the same seeded generator as before and looks their outputs up.
The result is the plain path's, to float rounding: frozen layers are fixed functions (their batch norm stays
in eval mode, models.TransferableNet). A frozen layer behind an active dropout is not (the paper's dropout
on a frozen fc6's output draws anew each step): the prefix looked up stops before it (CaffeNet with dropout:
conv1..fc6 at most; a frozen fc7 then runs each step on its dropped-out input). Where the input is streamed
(FFCV), the net is wrapped (DDP, torch.compile), or the epochs are fewer than the inputs an image can give
(nothing to save), nets take the plain path.

    model, loaders = frozen_prefix(net, n, loaders, epochs)     # (net, loaders) as they were where it does not apply
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

MAX_BYTES = 1 << 30            # the looked-up outputs of one trial


class Suffix(nn.Module):
    """Layers n+1.. of `module` on the frozen prefix's outputs. `module` is the whole net: the loop's
    `unwrap` finds it there, so optimizer, checkpoints and the frozen check see the net as always."""

    def __init__(self, module: nn.Module, n: int):
        super().__init__()
        self.module, self.n = module, n

    def forward(self, x):
        return self.module.run_stages(x, self.n)


def depth(net: nn.Module, n: int) -> int:
    """How many of a frozen net's first n layers can be looked up: those before its first active dropout."""
    return min(n, net.deterministic_stages())


def why_not(net: nn.Module, n: int, loaders, epochs: int) -> str | None:
    """Why the prefix cannot be looked up for this trial (None: it can)."""
    frozen = [layer.name for layer in net.layer_table()[:n]]
    if n < 1 or not set(frozen) <= set(net.frozen_layers):
        return "layers 1..n are not all frozen"
    if not all(hasattr(loader, "precompute") for loader in (loaders.train, loaders.val)):
        return "the half is streamed (FFCV), not read from the pixel store"
    if depth(net, n) < 1:
        return "a dropout is active before every frozen layer"
    if epochs <= loaders.train.variants():
        return f"{epochs} epochs see each of an image's {loaders.train.variants()} inputs less than once"
    return None


@torch.no_grad()
def frozen_prefix(net: nn.Module, n: int, loaders, epochs: int):
    """(Suffix(net, m), loaders yielding layer m's outputs) for a frozen trial where that applies, else as given;
    m = n, or the frozen layers before the first active dropout where one is (`depth`)."""
    reason = why_not(net, n, loaders, epochs)
    if reason:
        log.info("frozen prefix computed every step: %s", reason)
        return net, loaders
    n = depth(net, n)
    was_training = net.training
    net.eval()                                     # frozen batch norm in eval mode, also before the first train()
    try:
        prefix = lambda x: net.run_stages(x, 0, n)
        sample = prefix(next(iter(loaders.val))[0][:1])
        size = sample[0].numel() * sample.element_size() * loaders.train.variants() * loaders.train.num_samples
        if size > MAX_BYTES:
            log.info("frozen prefix computed every step: its outputs would take %.0f MB", size / 2**20)
            return net, loaders
        for loader in (loaders.train, loaders.val):
            loader.precompute(prefix)
    finally:
        net.train(was_training)
    log.info("frozen prefix: layers 1..%d of %d inputs computed once (%.0f MB)", n,
             loaders.train.variants() * loaders.train.num_samples, size / 2**20)
    return Suffix(net, n), loaders
