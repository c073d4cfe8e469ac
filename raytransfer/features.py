"""Per-layer features of a trained net on a half's images, for the diagnostics.

A layer's feature is its output after its ReLU (CaffeNet conv1..fc7, ResNet's stem; ResNet blocks end
in one already), before pooling and LRN, and the head's logits as they are: what the next layer reads.
Two shapes: `flat` (every unit of the map, for CKA: spatial structure is most of what early layers
share, and the minibatch estimator only ever holds m x m Gram matrices, so the width costs no memory)
and `pooled` (conv maps averaged over space, for probes and estimators: one vector per image whose
size is the channel count, so a few thousand images fit and a linear model fits them quickly).
Images are centre crops, no augmentation, a fixed-seed subsample (loaders.build_eval_loader).

    net = load_net(state_dict, recipe); feats, logits = layer_features(net, images, pooled=True)
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .models import TransferableNet, build_model, layer_names
from .recipes import Recipe


def load_net(state: dict, recipe: Recipe, device: torch.device = torch.device("cpu")) -> TransferableNet:
    """A finished job's network in eval mode; its head size read from its weights."""
    head = layer_names(recipe.arch)[-1]
    num_classes = int(np.asarray(state[f"{head}.weight"]).shape[0])
    net = build_model(recipe.arch, num_classes, **recipe.arch_kwargs())
    net.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in state.items()})
    return net.to(device).eval()


@torch.no_grad()
def layer_features(net: TransferableNet, images: torch.Tensor, pooled: bool) -> tuple[dict, torch.Tensor]:
    """({layer name: (batch, features) float32 on the CPU}, logits): every layer of the net's table."""
    table = net.layer_table()
    outputs, hooks = {}, []
    for layer in table:
        hooks.append(layer.modules[-1].register_forward_hook(
            lambda module, args, out, name=layer.name: outputs.__setitem__(name, out)))
    try:
        logits = net(images)
    finally:
        for h in hooks:
            h.remove()
    features = {}
    for i, layer in enumerate(table):
        x = outputs[layer.name].float()
        if i < len(table) - 1:
            x = F.relu(x)
        if pooled and x.dim() == 4:
            x = x.mean(dim=(2, 3))
        features[layer.name] = x.flatten(1).cpu()
    return features, logits.float().cpu()


def batches(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """All (images, labels) of an eval loader, copied out of FFCV's ring buffers (bounded by its
    subsample: the diagnostics' val images are read once and shown to every net)."""
    return [(images.clone(), labels.clone()) for images, labels in loader]
