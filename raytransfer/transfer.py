"""Layer surgery: build a trial's network from a base's weights, n and a mode.

Modes (the paper's names in brackets):
- ``frozen``        (AnB, BnB)   layers 1..n copied from the base's final weights, requires_grad off,
                                  out of the optimizer, batch-norm statistics frozen.
- ``finetune``      (AnB+, BnB+) layers 1..n copied, then trained with everything else at the full
                                  learning rate and schedule (paper: no reduced fine-tuning rate).
- ``random_frozen`` (control)    layers 1..n left at their random initialisation and frozen.
- ``scratch``       (control)    nothing copied.
Layers above n and the head get a fresh seeded initialisation, identical to scratch's.

    net = build_trial_network("caffenet", num_classes=20, base_state=sd, n=3, mode="frozen",
                              init_seed=7, arch_kwargs={"width": 0.125, "resolution": 32})
    ...train...
    assert verify_frozen(net, sd)["ok"]
"""
from __future__ import annotations

import hashlib
import warnings

import torch

from .models import TransferableNet, build_model

MODES = ("frozen", "finetune", "random_frozen", "scratch")
FROZEN_MODES = ("frozen", "random_frozen")


def check_mode(mode: str, n: int, num_layers: int, has_base: bool):
    """One clear error for an impossible (mode, n, base) combination, before anything is built."""
    if mode not in MODES:
        raise ValueError(f"unknown transfer mode {mode!r}; expected one of {', '.join(MODES)}")
    if mode == "scratch" and n != 0:
        raise ValueError(f"mode 'scratch' copies nothing, so n must be 0 (got n={n})")
    if mode != "scratch" and not 0 < n < num_layers:
        raise ValueError(f"n={n} is outside 1..{num_layers - 1} (the last layer, the head, is never copied)")
    if mode in ("frozen", "finetune") and not has_base:
        raise ValueError(f"mode {mode!r} copies layers 1..{n} from a base: give base weights")


def build_trial_network(arch: str, num_classes: int, base_state: dict | None, n: int, mode: str,
                        init_seed: int, arch_kwargs: dict | None = None) -> TransferableNet:
    """The trial's network: fresh seeded init, then layers 1..n copied (and/or frozen) per mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        net = build_model(arch, num_classes, **(arch_kwargs or {}))
    table = net.layer_table()
    check_mode(mode, n, len(table), base_state is not None)
    prefix = table[:n]
    if mode in ("frozen", "finetune"):
        copy_layers(net, base_state, prefix)
    if mode in FROZEN_MODES:
        freeze_layers(net, prefix)
    return net


def copy_layers(net: TransferableNet, base_state: dict, layers) -> list[str]:
    """Copy every parameter and buffer of `layers` from a base state_dict; shapes must match."""
    own = net.state_dict()
    copied = []
    for layer in layers:
        keys = layer.state_keys(own)
        for k in keys:
            if k not in base_state:
                raise ValueError(f"base weights have no {k!r} (layer {layer.name}): wrong architecture?")
            src = as_tensor(base_state[k])
            if src.shape != own[k].shape:
                raise ValueError(f"layer {layer.name}: {k} has shape {tuple(src.shape)} in the base, "
                                 f"{tuple(own[k].shape)} here: different width or resolution?")
            own[k].copy_(src)
            copied.append(k)
    return copied


def freeze_layers(net: TransferableNet, layers):
    """requires_grad off for the layers' parameters; their batch-norm statistics stay in eval mode."""
    for layer in layers:
        for p in layer.parameters():
            p.requires_grad_(False)
    net.frozen_layers = tuple(layer.name for layer in layers)
    net.train(net.training)


def frozen_state(net: TransferableNet) -> dict[str, torch.Tensor]:
    """A copy of every tensor of the frozen layers, taken before training, for `verify_frozen`."""
    own = net.state_dict()
    keys = [k for layer in net.layer_table() if layer.name in net.frozen_layers for k in layer.state_keys(own)]
    return {k: own[k].detach().clone() for k in keys}


def verify_frozen(net: TransferableNet, reference: dict) -> dict:
    """Are the frozen layers bit-identical to `reference` (base weights, or the random init)?"""
    own = net.state_dict()
    bad = [k for k, v in reference.items() if k in own and not torch.equal(own[k].cpu(), as_tensor(v).cpu())]
    checked = [k for k in reference if k in own]
    return {"ok": not bad and bool(checked), "checked": len(checked), "mismatched": bad}


def as_tensor(value) -> torch.Tensor:
    """A base weight as a tensor without a copy. Weights from Ray's object store are read-only numpy
    arrays; they are only ever read here, so torch's warning about non-writable arrays is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.as_tensor(value)


def init_seed_for(seed: int, stream: str = "fresh") -> int:
    """A stable 31-bit seed derived from the trial seed; bases and scratch/transfers use different streams."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{stream}".encode()).digest()[:4], "little") & 0x7FFFFFFF
