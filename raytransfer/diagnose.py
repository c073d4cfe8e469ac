"""One diagnostic job from its spec: which trained nets it reads, which images, which rows it returns.

Three kinds, each a job of the sweep's graph (raytransfer/sweep/jobs.py builds them):
- diag_cka: on the target half's val images, linear CKA of every layer pair of baseA vs baseB, and of
  each transferred net (AnB, AnB+, BnB, BnB+) vs the base it copied from, layer by layer;
- diag_probe: a linear probe on each layer of the source base (baseA for target B), fitted on the
  target half's train images and scored on its val images: the probe curve beside AnB;
- diag_estimators: H-score and LogME of each of those layers and LEEP of its softmax, on the target
  half's train images: the transfer curve predicted before any transfer trains.
One row per measurement (sweep/results.py writes them to diagnostics.csv). Nets are loaded one at a
time and CKA keeps only Gram matrices, so memory holds a net and one subsample of images.

    rows = run_diagnostic(spec, load_state=lambda key: state_dict, device=torch.device("cpu"))
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch

from .diagnostics import CKAAccumulator, gram, h_score, leep, logme, probe_accuracy
from .features import batches, layer_features, load_net
from .loaders import CropSpec, build_eval_loader
from .models import layer_names
from .recipes import recipe_from_dict

log = logging.getLogger(__name__)

KINDS = {"diag_cka": ("cka",), "diag_probe": ("probe",), "diag_estimators": ("hscore", "logme", "leep")}


def run_diagnostic(spec: dict, load_state, device: torch.device) -> list[dict]:
    """The rows of one diagnostic job; `load_state(key)` returns a finished net's weights."""
    t0 = time.time()
    recipe = recipe_from_dict(spec["recipe"])
    kind = spec["treatment"]
    if kind == "diag_cka":
        rows = _cka_rows(spec, recipe, load_state, device)
    elif kind in ("diag_probe", "diag_estimators"):
        rows = _source_rows(spec, recipe, load_state, device)
    else:
        raise ValueError(f"unknown diagnostic {kind!r}; expected one of {', '.join(KINDS)}")
    log.info("%s: %d rows in %.1f s", spec["job_key"], len(rows), time.time() - t0)
    return rows


def _loader(spec, recipe, split: str, max_images: int, device):
    s = spec["settings"]
    return build_eval_loader(spec["data_dir"], spec["target_classes"],
                             CropSpec(recipe.crop, recipe.crop_size, recipe.resize_size), split,
                             batch_size=s["batch_size"], device=device, max_images=max_images,
                             sample_seed=s["sample_seed"])


def _row(spec, kind, value, net_a, layer_a, net_b="", layer_b="", treatment="", n=None) -> dict:
    return {"job_key": spec["job_key"], "kind": kind, **spec["row"], "net_a": net_a, "net_b": net_b,
            "treatment": treatment, "n": n, "layer_a": layer_a, "layer_b": layer_b, "value": float(value)}


def _cka_rows(spec, recipe, load_state, device) -> list[dict]:
    names = layer_names(recipe.arch)
    val = [b for b in batches(_loader(spec, recipe, "val", spec["settings"]["val_images"], device)) if len(b[0]) >= 4]
    if not val:
        raise ValueError(f"{spec['job_key']}: fewer than 4 val images in the target half: CKA needs more")

    def grams_of(key) -> dict:
        net = load_net(load_state(key), recipe, device)
        out = {layer: [] for layer in names}
        for images, _ in val:
            features, _ = layer_features(net, images.to(device), pooled=False)
            for layer, x in features.items():
                out[layer].append(gram(x.numpy()))
        return out

    nets = spec["nets"]
    base = {n["treatment"]: n["key"] for n in nets if n["treatment"] in ("baseA", "baseB")}
    grams = {key: grams_of(key) for key in base.values()}
    acc, rows = CKAAccumulator(), []
    for i in range(len(val)):
        for la in names:
            for lb in names:
                acc.add(f"{base['baseA']}/{la}", f"{base['baseB']}/{lb}", grams[base["baseA"]][la][i],
                        grams[base["baseB"]][lb][i], batch=i)
    for j, la in enumerate(names, 1):
        for lb in names:
            rows.append(_row(spec, "cka", acc.cka(f"{base['baseA']}/{la}", f"{base['baseB']}/{lb}"),
                             base["baseA"], la, base["baseB"], lb, treatment="baseA-baseB", n=j))
    for net in nets:
        if net["treatment"] in ("baseA", "baseB"):
            continue
        mine, theirs = grams_of(net["key"]), grams.get(net["base_key"]) or grams_of(net["base_key"])
        for i in range(len(val)):
            for layer in names:
                acc.add(f"{net['key']}/{layer}", f"{net['base_key']}/{layer}", mine[layer][i], theirs[layer][i], batch=i)
        rows += [_row(spec, "cka", acc.cka(f"{net['key']}/{layer}", f"{net['base_key']}/{layer}"), net["key"], layer,
                      net["base_key"], layer, treatment=net["treatment"], n=net["n"]) for layer in names]
    return rows


def _features(net, loader, device) -> tuple[dict, np.ndarray, np.ndarray]:
    """Pooled features of every layer, labels, softmax: one pass over the loader."""
    feats, labels, probs = {}, [], []
    for images, y in loader:
        f, logits = layer_features(net, images.to(device), pooled=True)
        for layer, x in f.items():
            feats.setdefault(layer, []).append(x.numpy())
        labels.append(y.cpu().numpy())
        probs.append(torch.softmax(logits, dim=1).numpy())
    return {k: np.concatenate(v) for k, v in feats.items()}, np.concatenate(labels), np.concatenate(probs)


def _source_rows(spec, recipe, load_state, device) -> list[dict]:
    s = spec["settings"]
    (source,) = spec["nets"]
    net = load_net(load_state(source["key"]), recipe, device)
    names = layer_names(recipe.arch)
    train, train_y, train_p = _features(net, _loader(spec, recipe, "train", s["train_images"], device), device)
    rows = []
    if spec["treatment"] == "diag_probe":
        val, val_y, _ = _features(net, _loader(spec, recipe, "val", s["val_images"], device), device)
        for n, layer in enumerate(names[:-1], 1):              # layer n: what AnB at n copies last
            acc = probe_accuracy(train[layer], train_y, val[layer], val_y, c=s["probe_c"], max_iter=s["probe_max_iter"])
            rows.append(_row(spec, "probe", acc, source["key"], layer, treatment=source["treatment"], n=n))
        return rows
    for n, layer in enumerate(names[:-1], 1):
        rows.append(_row(spec, "hscore", h_score(train[layer], train_y), source["key"], layer,
                         treatment=source["treatment"], n=n))
        rows.append(_row(spec, "logme", logme(train[layer], train_y), source["key"], layer,
                         treatment=source["treatment"], n=n))
    rows.append(_row(spec, "leep", leep(train_p, train_y), source["key"], names[-1], treatment=source["treatment"]))
    return rows
