"""The training loop of one trial: pure torch over the half loaders, no Ray.

One loop, two hosts: the trial's own process (a tiny CPU trial) or each worker of Ray Train's
TorchTrainer (DDP on GPUs). The host passes a `report(metrics, state)` callback, called after every
epoch with the metrics and a checkpoint state (model unwrapped, optimizer, epoch, history); a
restarted trial calls `fit` again with that state and continues from the next epoch. The state
holds the live model and optimizer tensors: save it (or deep-copy it) inside the callback.

    summary = fit(model, recipe, loaders, device, report=lambda m, s: print(m))
"""
from __future__ import annotations

import itertools
import logging
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from .convergence import PLATEAU_POINTS, plateau_rise, plateau_state
from .models import TransferableNet
from .recipes import Recipe

log = logging.getLogger(__name__)


def unwrap(model) -> TransferableNet:
    return model.module if hasattr(model, "module") else getattr(model, "_orig_mod", model)


def make_optimizer(model: TransferableNet, recipe: Recipe, copied_layers=()) -> torch.optim.SGD:
    """SGD with parameter groups from the layer table: frozen layers left out (no momentum, no
    decay); biases (and norm parameters) at lr x bias_lr_mult without decay (paper); copied
    fine-tuned layers at lr x copied_lr_mult."""
    groups = {}
    for layer in model.layer_table():
        if layer.name in model.frozen_layers:
            continue
        mult = recipe.copied_lr_mult if layer.name in copied_layers else 1.0
        for mod_prefix, module in zip(layer.prefixes, layer.modules):
            for pname, p in module.named_parameters():
                if not p.requires_grad:
                    continue
                is_bias = pname.endswith("bias") or p.ndim == 1
                key = ("bias" if is_bias else "weight", mult)
                groups.setdefault(key, []).append(p)
    grouped = {id(p) for params in groups.values() for p in params}
    stray = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in grouped]
    if stray:                      # a parameter outside the layer table would silently never train
        raise ValueError(f"parameters {stray[:5]} belong to no layer of {type(model).__name__}'s layer table: "
                         "add their modules to its layer_specs()")
    param_groups = []
    for (kind, mult), params in groups.items():
        lr_mult = mult * (recipe.bias_lr_mult if kind == "bias" else 1.0)
        param_groups.append({"params": params, "lr_mult": lr_mult, "lr": recipe.lr * lr_mult,
                             "weight_decay": 0.0 if kind == "bias" else recipe.weight_decay})
    return torch.optim.SGD(param_groups, lr=recipe.lr, momentum=recipe.momentum)


def train_one_epoch(model, optimizer, loader, device, recipe: Recipe, step: int, total_steps: int,
                    autocast, log_every: int = 0, epoch: int = 0, stop_step: int | None = None,
                    lr_factor: float = 1.0) -> tuple[dict, int]:
    """One pass over the train loader (or up to `stop_step`); returns (metrics, next step). `lr_factor`:
    the --until-plateau level's decay on top of the recipe's rate."""
    stop_step = total_steps if stop_step is None else stop_step
    model.train()
    loss_sum = torch.zeros((), device=device)
    seen, t0, lr = 0, time.perf_counter(), 0.0
    for images, labels in loader:
        if step >= stop_step:
            break
        lr = recipe.lr_at(step, total_steps) * lr_factor
        for g in optimizer.param_groups:
            g["lr"] = lr * g["lr_mult"]
        if recipe.channels_last and images.dim() == 4:      # (a frozen prefix's looked-up outputs may be flat)
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast():
            loss = F.cross_entropy(model(images), labels, label_smoothing=recipe.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * len(labels)
        seen += len(labels)
        step += 1
        if log_every and step % log_every == 0:
            log.info("ep %d it %d/%d loss %.3f lr %.4g img/s %.0f", epoch, step, total_steps, loss.item(), lr,
                     seen / (time.perf_counter() - t0))
    dt = time.perf_counter() - t0
    return {"train_loss": (loss_sum / max(1, seen)).item(), "images_per_s": seen / max(dt, 1e-9),
            "lr": lr, "train_s": dt, "train_images": seen}, step


@torch.no_grad()
def evaluate(model, loader, device, autocast) -> dict:
    """Top-1 and top-5 over the loader; summed over DDP ranks (each holds a disjoint shard)."""
    model.eval()
    counts = torch.zeros(3, device=device, dtype=torch.float64)     # top1 hits, top5 hits, images
    for images, labels in loader:
        with autocast():
            logits = model(images)
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == labels[:, None]
        counts += torch.stack([hits[:, 0].sum(), hits.any(1).sum(), torch.tensor(len(labels), device=device)]).double()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(counts)
    top1, top5, n = counts.tolist()
    return {"val_top1": top1 / max(n, 1), "val_top5": top5 / max(n, 1), "val_images": int(n)}


def best_k_mean(values, k: int = 10) -> float:
    """The paper's metric: the mean of the k highest validation accuracies over the run."""
    best = sorted(values, reverse=True)[:k]
    return sum(best) / len(best) if best else float("nan")


def fit(model, recipe: Recipe, loaders, device, state: dict | None = None, report=None,
        copied_layers=(), log_every: int = 0) -> dict:
    """Train for the recipe's budget, evaluating `evals_per_epoch` times an epoch or every `eval_every_iters`
    steps; resume from `state`."""
    net = unwrap(model)
    optimizer = make_optimizer(net, recipe, copied_layers)
    history, start_epoch, step = [], 0, 0
    if state is not None:
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history, start_epoch, step = list(state["history"]), state["epoch"] + 1, state["step"]
    steps_per_epoch = max(1, len(loaders.train))
    total_steps = recipe.total_steps(steps_per_epoch * recipe.batch_size)   # until_plateau: its cap
    epochs = planned_epochs(recipe, loaders.train)
    lr_factor = 1.0
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if recipe.bf16 else nullcontext
    for epoch in range(start_epoch, epochs):
        if recipe.until_plateau:
            level, stop = plateau_state(epoch_top1(history), decays=len(recipe.milestones))
            if stop:
                break
            lr_factor = recipe.gamma ** level
        set_epoch(loaders.train, epoch)
        metrics = {"epoch": epoch, "epochs": epochs, "train_loss": 0.0, "lr": 0.0}
        seen = secs = 0.0
        batches = iter(loaders.train)
        try:
            for stop in eval_stops(recipe, epoch, steps_per_epoch):   # train up to each stop, evaluate there
                chunk_end = min(total_steps, epoch * steps_per_epoch + stop)
                if step >= chunk_end:
                    continue
                m, step = train_one_epoch(model, optimizer, itertools.islice(batches, chunk_end - step), device,
                                          recipe, step, total_steps, autocast, log_every, epoch, chunk_end, lr_factor)
                total = seen + m["train_images"]
                metrics["train_loss"] = (metrics["train_loss"] * seen + m["train_loss"] * m["train_images"]) / max(1, total)
                seen, secs, metrics["lr"] = total, secs + m["train_s"], m["lr"]
                if evaluates_at(recipe, step, total_steps):
                    history.append({"epoch": epoch, "step": step, **evaluate(model, loaders.val, device, autocast)})
        finally:
            batches.close()                            # leaving an epoch early must free FFCV's thread
        last = history[-1] if history else {"val_top1": float("nan"), "val_top5": float("nan")}
        metrics.update(images_per_s=seen / max(secs, 1e-9), val_top1=last["val_top1"],
                       val_top5=last["val_top5"], step=step, train_s=secs)
        if report is not None:
            report(metrics, {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                             "step": step, "history": list(history)})
    top1s = [h["val_top1"] for h in history]
    rise = plateau_rise(history, step if recipe.until_plateau else total_steps)
    return {"top1_final": history[-1]["val_top1"], "top5_final": history[-1]["val_top5"],
            "top1_best10": best_k_mean(top1s, 10), "epochs": history[-1]["epoch"] + 1 if recipe.until_plateau else epochs,
            "steps": step, "evaluations": len(history),
            "plateau_rise": rise, "converged": bool(rise < PLATEAU_POINTS) if rise == rise else None}


def planned_epochs(recipe: Recipe, train_loader) -> int:
    """Epochs the recipe trains over this loader (until_plateau: at most)."""
    steps_per_epoch = max(1, len(train_loader))
    return -(-recipe.total_steps(steps_per_epoch * recipe.batch_size) // steps_per_epoch)


def eval_stops(recipe: Recipe, epoch: int, steps_per_epoch: int) -> list[int]:
    """Steps into `epoch` where training pauses: `evals_per_epoch` evenly spaced points, or (eval_every_iters,
    the paper's test_interval) every global multiple of it in this epoch and the epoch's end."""
    every = recipe.eval_every_iters
    if every is None:
        return [round(steps_per_epoch * (k + 1) / recipe.evals_per_epoch) for k in range(recipe.evals_per_epoch)]
    start = epoch * steps_per_epoch
    first = -(-(start + 1) // every) * every
    return [s - start for s in range(first, start + steps_per_epoch, every)] + [steps_per_epoch]


def evaluates_at(recipe: Recipe, step: int, total_steps: int) -> bool:
    """Is there an evaluation after `step` steps? Every stop per epoch; else multiples of eval_every_iters
    and the last step (Caffe tests at each multiple of test_interval, 450 of them in 450k iterations)."""
    every = recipe.eval_every_iters
    return every is None or step % every == 0 or step == total_steps


def epoch_top1(history) -> list[float]:
    """Each finished epoch's mean validation top-1, in order (what --until-plateau judges)."""
    by_epoch = {}
    for h in history:
        by_epoch.setdefault(h["epoch"], []).append(h["val_top1"])
    return [sum(v) / len(v) for _, v in sorted(by_epoch.items())]


def set_epoch(loader, epoch: int):
    """Fix the data order of `epoch` (FFCV orders by seed + epoch), also after a resume."""
    if hasattr(loader, "set_epoch"):                 # the in-memory loader (memory_loader.py)
        loader.set_epoch(epoch)
        return
    inner = getattr(loader, "loader", None)
    if inner is not None and hasattr(inner, "next_epoch"):
        inner.next_epoch = epoch
