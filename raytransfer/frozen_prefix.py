"""Frozen layers computed once for every net that shares them: once per input where the inputs are a finite set,
else once per batch for the whole cohort.

Why: a frozen transfer (AnB, BnB, random_frozen) runs layers 1..n forward at every step although they never
change, and every frozen net copied from one base runs the same layers on the same batch (a cohort reads one
batch stream: trial.run_cohort). Both are work done again: a *trunk* is a frozen stack of layers that members
share (bit-equal weights, checked: the same base's copied layers, or the same seeded random init), and each
frozen member reads its input at its *cut*, the trunk's output after its last shared layer.

Only the deterministic part of a prefix is shared: a stage with an active dropout (the paper's dropout on a
frozen fc6's output, CaffeNet.deterministic_stages) draws anew each step, so a member whose n reaches it runs it
itself, with its own draws (models.SeededDropout), as it would alone. Frozen batch norm stays in eval mode (models.TransferableNet).

Two ways to feed a cut, chosen per member from the member alone (never from who else is in its cohort, so a
member trains the same net alone or in any cohort):
- looked up: on a half read from the node's pixel store (device_input.py) the inputs are finitely many, each
  image at each crop offset and mirror (3 x 3 x 2 for 30 px crops of 32 px images; the centre crop for
  validation). The trunk's output at the cut is computed once for every input, and each epoch looks up the
  same seeded draws as before. Not where the input is streamed (FFCV), the net is wrapped (DDP,
  torch.compile), the epochs are fewer than the inputs an image can give (nothing to save), or the table would
  pass MAX_BYTES.
- once per batch: the trunk runs without gradients up to the deepest cut its members need, and each member
  takes its cut.

    plan = plan_inputs(members, loaders, epochs)       # each member's model and feed, the shared trunks
    for batch in batches(loaders.train): inputs = plan.inputs(batch, train=True, autocast=...)
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

MAX_BYTES = 1 << 30            # one member's looked-up table
RAW = (-1, 0)                  # a feed: the batch's images themselves


class Suffix(nn.Module):
    """Layers k+1.. of `module` on its first k layers' outputs. `module` is the whole net: the loop's
    `unwrap` finds it there, so optimizer, checkpoints and the frozen check see the net as always."""

    def __init__(self, module: nn.Module, n: int):
        super().__init__()
        self.module, self.n = module, n

    def forward(self, x):
        return self.module.run_stages(x, self.n)


def shared_depth(net: nn.Module, n: int) -> int:
    """How many of layers 1..n (frozen) can come from a shared trunk, or be looked up: those before the first stage
    that draws at random (models.TransferableNet.deterministic_stages)."""
    return min(n, net.deterministic_stages())


def why_not(net: nn.Module, n: int, loaders, epochs: int) -> str | None:
    """Why layers 1..n of this net cannot be looked up (None: they can)."""
    frozen = [layer.name for layer in net.layer_table()[:n]]
    if n < 1 or not set(frozen) <= set(net.frozen_layers):
        return "layers 1..n are not all frozen"
    if not all(hasattr(loader, "table") for loader in (loaders.train, loaders.val)):
        return "the half is streamed (FFCV), not read from the pixel store"
    if epochs <= loaders.train.variants():
        return f"{epochs} epochs see each of an image's {loaders.train.variants()} inputs less than once"
    return None


@dataclass(eq=False)
class Trunk:
    """Frozen layers 1..depth of `net`, shared by members whose own layers 1..cut equal them."""
    net: nn.Module
    depth: int
    live_cuts: set = field(default_factory=set)          # cuts computed once per batch
    tables: dict = field(default_factory=dict)           # cut -> (train table, val table), looked up

    def holds(self, net: nn.Module, cut: int) -> bool:
        """Are layers 1..cut of `net` this trunk's (bit-equal parameters and buffers)?"""
        if cut > self.depth:
            return False
        mine, theirs = self.net.state_dict(), net.state_dict()
        for layer in self.net.layer_table()[:cut]:
            for k in layer.state_keys(mine):
                if k not in theirs or not torch.equal(mine[k], theirs[k]):
                    return False
        return True

    @torch.no_grad()
    def outputs(self, x: torch.Tensor, cuts) -> dict:
        """{cut: the trunk's output after layer `cut`} for one batch, one pass up to the deepest."""
        out, stages = {}, self.net.stages()
        for i in range(max(cuts)):
            x = stages[i](x)
            if i + 1 in cuts:
                out[i + 1] = x
        return out


@dataclass(eq=False)
class InputPlan:
    """Each member's feed and the trunks behind them; `inputs(batch)` gives every feed of one batch."""
    loaders: object
    trunks: list
    raw: bool                                  # a member, or a trunk computed per batch, reads the images

    def inputs(self, batch, train: bool, autocast=nullcontext) -> dict:
        """{feed: tensor} of one batch (device_input.Batch): the images, each looked-up table's rows, each
        per-batch trunk's cuts."""
        out = {} if batch.images is None else {RAW: batch.images}
        if not self.trunks:
            return out
        loader = self.loaders.train if train else self.loaders.val
        for t, trunk in enumerate(self.trunks):
            for cut, tables in trunk.tables.items():
                out[(t, cut)] = loader.look_up(tables[0 if train else 1], batch)
            if trunk.live_cuts:
                with autocast():
                    out.update({(t, cut): y for cut, y in trunk.outputs(batch.images, trunk.live_cuts).items()})
        return out


def first_images(loader) -> torch.Tensor:
    """The images of a loader's first batch, its iterator closed at once (an FFCV epoch left open keeps a thread)."""
    it = iter(loader)
    try:
        return next(it)[0]
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()


def batches(loader, images: bool = True):
    """A loader's batches as device_input.Batch: the pixel store's with what picked them, any other's
    (FFCV, a plain iterable of (images, labels)) as they come."""
    from .device_input import Batch

    if hasattr(loader, "stream"):
        yield from loader.stream(images=images)
        return
    for x, y in loader:
        yield Batch(x, y)


@torch.no_grad()
def plan_inputs(members, loaders, epochs: int, wrapped: bool = False) -> InputPlan:
    """Give each frozen member its feed: a trunk shared with the members whose layers 1..cut are equal (the
    deepest cut first), and its model, Suffix(net, cut), the layers after it. A member whose cut is looked up
    (module docstring) gets a table, each trunk's tables computed in one pass; the others share a trunk computed
    once per batch (so do all where the members' models will be `wrapped`: DDP, torch.compile). Non-frozen
    members read the images (RAW). Returns the plan `fit_cohort` reads each batch through."""
    trunks: list[Trunk] = []
    frozen = [m for m in members if m.frozen_n > 0 and shared_depth(m.net, m.frozen_n) > 0]
    looked_up: dict[int, set] = {}
    for m in sorted(frozen, key=lambda m: -shared_depth(m.net, m.frozen_n)):
        cut = shared_depth(m.net, m.frozen_n)
        t = next((i for i, tr in enumerate(trunks) if tr.holds(m.net, cut)), None)
        if t is None:
            trunks.append(Trunk(m.net, cut))
            t = len(trunks) - 1
        reason = "the net is wrapped (DDP, compile)" if wrapped else why_not(m.net, cut, loaders, epochs)
        reason = reason or too_large(m.net, cut, loaders)
        if reason is None:
            looked_up.setdefault(t, set()).add(cut)
        else:
            log.info("%s: frozen layers 1..%d computed once per batch: %s", m.key, cut, reason)
            trunks[t].live_cuts.add(cut)
        m.feed, m.model = (t, cut), Suffix(m.net, cut)
    for t, cuts in looked_up.items():
        _tables(trunks[t], sorted(cuts), loaders)
    if trunks:
        log.info("cohort of %d: %d frozen net(s) read %d shared trunk(s): %s", len(members), len(frozen), len(trunks),
                 "; ".join(f"layers 1..{tr.depth} ({len(tr.tables)} cut(s) looked up, {len(tr.live_cuts)} per batch)"
                           for tr in trunks))
    raw = any(m.feed == RAW for m in members) or any(tr.live_cuts for tr in trunks)
    return InputPlan(loaders, trunks, raw)


@torch.no_grad()
def table_bytes(net: nn.Module, cut: int, loaders) -> int:
    """Bytes of the table of layer `cut`'s outputs for every input the half's training loader can yield."""
    was_training = net.training
    net.eval()
    try:
        sample = net.run_stages(first_images(loaders.val)[:1], 0, cut)
    finally:
        net.train(was_training)
    return int(sample[0].numel() * sample.element_size() * loaders.train.variants() * loaders.train.num_samples)


def too_large(net: nn.Module, cut: int, loaders) -> str | None:
    size = table_bytes(net, cut, loaders)
    return f"its outputs would take {size / 2**20:.0f} MB" if size > MAX_BYTES else None


def _tables(trunk: Trunk, cuts: list, loaders):
    """The trunk's outputs at `cuts` for every input, train and validation, in one pass each."""
    net = trunk.net
    was_training = net.training
    net.eval()                                     # frozen batch norm in eval mode, also before the first train()
    try:
        f = lambda x: trunk.outputs(x, cuts)
        train, val = loaders.train.table(f), loaders.val.table(f)
    finally:
        net.train(was_training)
    for cut in cuts:
        trunk.tables[cut] = (train[cut], val[cut])
    size = sum(t.numel() * t.element_size() for t in train.values())
    log.info("frozen layers 1..%s of %d inputs computed once (%.0f MB)", "/".join(map(str, cuts)),
             loaders.train.variants() * loaders.train.num_samples, size / 2**20)
