"""One trial from its spec: network surgery, half loaders, the loop, the frozen check.

The same function runs in a Tune trial's own process (tiny CPU trials) and inside each Ray Train
worker (DDP); the host supplies the device, the base weights, a `report` callback and, on a
restart, the last checkpoint state.

    summary = run_trial(spec, torch.device("cpu"), base_state=None)
"""
from __future__ import annotations

import logging
import time

import torch

from .frozen_prefix import frozen_prefix
from .loaders import CropSpec, build_half_loaders
from .loop import fit, planned_epochs, unwrap
from .recipes import recipe_from_dict
from .transfer import as_tensor, build_trial_network, frozen_state, init_seed_for, verify_frozen

log = logging.getLogger(__name__)

# treatment -> transfer mode (the paper's names are values)
MODE_OF = {"baseA": "scratch", "baseB": "scratch", "scratch": "scratch", "AnB": "frozen", "BnB": "frozen",
           "AnB+": "finetune", "BnB+": "finetune", "random_frozen": "random_frozen", "netbase": "scratch",
           "reduced_k": "scratch"}


def init_stream(recipe, treatment: str) -> str:
    """The init stream of a trial: the two bases share one unless the recipe makes them independent
    (the paper); scratch and transfers share another (their new layers start alike); netbase and the
    reduced-volume nets have their own."""
    if treatment in ("baseA", "baseB"):
        return treatment if recipe.independent_bases else "base"
    return treatment if treatment in ("netbase", "reduced_k") else "fresh"


def head_size(recipe, target_classes: int) -> int:
    """fc8's outputs: the recipe's head_outputs (the paper: 1000, unused logits kept), else one per class."""
    if recipe.head_outputs is None:
        return target_classes
    if recipe.head_outputs < target_classes:
        raise ValueError(f"recipe {recipe.name}: head_outputs {recipe.head_outputs} is fewer than the target's "
                         f"{target_classes} classes")
    return recipe.head_outputs


def run_trial(spec: dict, device: torch.device, base_state: dict | None = None, report=None,
              resume_state: dict | None = None, distributed: bool = False, wrap_model=None,
              num_workers: int = 1) -> dict:
    """Train the trial's network on its target half; returns metrics and the final weights."""
    t0 = time.time()
    treatment, n, seed = spec["treatment"], int(spec["n"]), int(spec["seed"])
    recipe = recipe_from_dict(spec["recipe"])
    mode = MODE_OF[treatment]
    num_classes = head_size(recipe, len(spec["target_classes"]))
    net = build_trial_network(recipe.arch, num_classes, base_state, n, mode,
                              init_seed_for(seed, init_stream(recipe, treatment)), recipe.arch_kwargs())
    reference = None
    if mode == "frozen":                               # the base's own tensors, not the copies in `net`
        reference = {k: as_tensor(base_state[k]) for k in frozen_state(net)}
    elif mode == "random_frozen":
        reference = frozen_state(net)
    if recipe.channels_last:
        net = net.to(memory_format=torch.channels_last)
    net = net.to(device)
    model = wrap_model(net) if wrap_model else net
    if recipe.compile and device.type == "cuda":
        model = torch.compile(model)
    loaders = build_half_loaders(spec["data_dir"], spec["target_classes"],
                                 CropSpec(recipe.crop, recipe.crop_size, recipe.resize_size),
                                 batch_size=recipe.batch_size // (torch.distributed.get_world_size() if distributed else 1),
                                 device=device, seed=seed, num_workers=num_workers, distributed=distributed,
                                 expect_fingerprint=spec.get("dataset_fingerprint"), normalize=recipe.normalize,
                                 mean_classes=spec.get("mean_classes"), per_class=spec.get("k") or None,
                                 input=recipe.input)
    if mode in ("frozen", "random_frozen") and model is net:    # layers 1..n once per input, not once per step
        model, loaders = frozen_prefix(net, n, loaders, planned_epochs(recipe, loaders.train))
    copied = [l.name for l in unwrap(net).layer_table()[:n]] if mode == "finetune" else ()
    epoch_log = [] if resume_state is None else list(resume_state.get("epoch_log", []))

    def on_record(metrics, state):                     # each evaluation or each epoch (loop.py): a bounded log
        epoch_log.append(dict(metrics))
        state["epoch_log"] = epoch_log                 # the curve survives a resume
        if report is not None:
            report(metrics, state)

    summary = fit(model, recipe, loaders, device, state=resume_state, report=on_record, copied_layers=copied)
    check = verify_frozen(unwrap(net), reference) if reference is not None else None
    if check is not None and not check["ok"]:
        log.error("frozen layers changed during training: %s", check["mismatched"][:5])
    summary.update(frozen_check=None if check is None else check["ok"],
                   frozen_mismatched=[] if check is None else list(check["mismatched"]),
                   train_images_per_s=_mean([m["images_per_s"] for m in epoch_log]), epoch_log=epoch_log,
                   input=getattr(loaders, "input", None), input_wait_share=input_wait_share(epoch_log),
                   wall_s=time.time() - t0, num_classes=num_classes, train_samples=loaders.train.num_samples,
                   images_per_class=loaders.train.num_samples / len(spec["target_classes"]))
    summary["state_dict"] = {k: v.detach().cpu() for k, v in unwrap(net).state_dict().items()}
    return summary


def input_wait_share(epoch_log) -> float:
    """The share (0..1) of the training time the steps waited on input, over every record of the run (resumes
    included; records written before the wait was measured count as unknown: NaN)."""
    if not epoch_log or any("input_wait_s" not in m for m in epoch_log):
        return float("nan")
    return sum(m["input_wait_s"] for m in epoch_log) / max(sum(m["train_s"] for m in epoch_log), 1e-9)


def _mean(values):
    return sum(values) / len(values) if values else float("nan")
