"""The training loop of one trial: pure torch over the half loaders, no Ray.

One loop, two hosts: the trial's own process (a tiny CPU trial) or each worker of Ray Train's
TorchTrainer (DDP on GPUs). A trial trains a *cohort*: one or more nets that read the same target half with
the same recipe, training seed and input (trial.run_cohort). They learn from one batch stream: each batch is
drawn once, the frozen layers they share run once (frozen_prefix.py), and each member steps its own
optimizer on it exactly as it would alone. The host passes a `report(records, state)` callback, called at
each record: after every evaluation for a recipe that evaluates by iterations (`eval_every_iters`, the
paper's test every 1000), else after every epoch. So a job's records number its evaluations or its epochs,
whichever the recipe counts by: a reduced-volume net of 200k iterations over epochs of 3 steps reports 200
times, not 67,000. Each record has, per member, the metrics of the steps since the previous one (loss,
images/s, seconds waited on input), and a checkpoint state of every member (model unwrapped, optimizer,
history) with the epoch and step; a restarted trial calls `fit_cohort` again with that state and continues
from its step (inside an epoch: that epoch's seeded order replayed up to it). The state holds the live model
and optimizer tensors: save it (or deep-copy it) inside the callback.

    summaries = fit_cohort([Member("baseB", net, net)], recipe, loaders, device, report=print)
    summary = fit(model, recipe, loaders, device, report=lambda m, s: print(m))     # one net
"""
from __future__ import annotations

import collections
import datetime
import itertools
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .convergence import PLATEAU_POINTS, plateau_rise, plateau_state
from .device_input import Batch
from .frozen_prefix import RAW, InputPlan, batches
from .models import TransferableNet
from .recipes import Recipe

log = logging.getLogger(__name__)

LOG_EVERY_S = 120.0              # a progress line at least this often, also inside an epoch
INPUT_WAIT_WARN = 0.10           # a record whose steps waited on input longer than this share: one warning


def unwrap(model) -> TransferableNet:
    """The network inside DDP, torch.compile or a frozen prefix's Suffix (frozen_prefix.py), however nested."""
    while not isinstance(model, TransferableNet):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner
    return model


class CaffeSGD(torch.optim.Optimizer):
    """Caffe's SGD (sgd_solver.cpp, the paper's solver): v = m v + lr (g + wd w); w -= v.

    The rate multiplies each gradient as it joins the momentum, so after a x0.1 decay the velocity gathered
    at the old rate runs out over the next steps (x m a step). torch.optim.SGD applies the rate to the whole
    momentum (v = m v + g + wd w; w -= lr v), so its step drops x0.1 at once. The two agree while the rate is
    constant and differ after every change (a warm-up changes it at every step). The momentum buffer is
    Caffe's history, rate included, so a checkpoint's optimizer state is all a resume needs."""

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["weight_decay"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])     # g + wd w
            history = []
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                history.append(self.state[p]["momentum_buffer"])
            torch._foreach_mul_(history, group["momentum"])                               # v = m v
            torch._foreach_add_(history, grads, alpha=group["lr"])                        #   + lr (g + wd w)
            torch._foreach_sub_(params, history)                                          # w -= v
        return loss


SOLVERS = {"torch": torch.optim.SGD, "caffe": CaffeSGD}     # recipe.solver -> the optimizer class


def make_optimizer(model: TransferableNet, recipe: Recipe, copied_layers=()) -> torch.optim.Optimizer:
    """SGD (torch's or Caffe's rule, recipe.solver) with parameter groups from the layer table: frozen layers
    left out (no momentum, no decay); biases (and norm parameters) at lr x bias_lr_mult without decay
    (paper); copied fine-tuned layers at lr x copied_lr_mult."""
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
    return SOLVERS[recipe.solver](param_groups, lr=recipe.lr, momentum=recipe.momentum)


class Meter:
    """The steps since the last record: summed loss (kept on the device and read at the record, so tiny
    epochs cost no synchronisation each), images, seconds training and seconds waiting on input. In a cohort
    a member's seconds are its own step's plus its share of what the members share (the wait for the batch,
    the frozen trunks): the members' seconds add up to the cohort's."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self):
        self.loss_sum = torch.zeros((), device=self.device)
        self.images, self.train_s, self.input_wait_s, self.lr = 0, 0.0, 0.0, 0.0

    def metrics(self) -> dict:
        return {"train_loss": (self.loss_sum / max(1, self.images)).item(), "lr": self.lr,
                "images_per_s": self.images / max(self.train_s, 1e-9), "train_s": self.train_s,
                "input_wait_s": self.input_wait_s, "train_images": self.images}


class Progress:
    """A log line every `every_s` seconds on rank 0, also inside an epoch: iteration, loss, images/s, the share
    of the time the step waited on input ("data"), the time left at the rate so far. A cohort's line counts the
    batches of its stream and shows its first member's loss."""

    def __init__(self, every_s: float, total_steps: int, step: int, members: int = 1):
        self.every_s, self.total_steps, self.first_step, self.members = every_s, total_steps, step, members
        self.on = every_s > 0 and _rank() == 0
        self.started = self.last = time.monotonic()
        self.images, self.input_wait_s = 0, 0.0

    def tick(self, images: int, input_wait_s: float, epoch: int, step: int, loss, lr: float):
        self.images, self.input_wait_s = self.images + images, self.input_wait_s + input_wait_s
        now = time.monotonic()
        if not self.on or now - self.last < self.every_s:
            return
        dt, done = now - self.last, step - self.first_step
        eta = (self.total_steps - step) * (now - self.started) / max(1, done)
        nets = f" x {self.members} nets" if self.members > 1 else ""
        log.info("ep %d it %d/%d loss %.3f lr %.4g img/s %.0f%s data %.0f%% eta %s", epoch, step, self.total_steps,
                 loss.item(), lr, self.images / dt, nets, 100 * self.input_wait_s / dt,
                 datetime.timedelta(seconds=round(eta)))
        self.last, self.images, self.input_wait_s = now, 0, 0.0


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@dataclass(eq=False)
class Member:
    """One net of a cohort as the loop steps it. `model` is what a step calls on the member's `feed` (the
    batch's images, or a frozen trunk's output it shares: frozen_prefix.py); `net` the network itself."""
    key: str
    net: TransferableNet
    model: torch.nn.Module
    copied_layers: tuple = ()          # fine-tuned copied layers (at recipe.copied_lr_mult)
    frozen_n: int = 0                  # layers 1..n frozen (frozen, random_frozen): a trunk may feed them
    feed: tuple = RAW


class _Run:
    """What the loop keeps of one member while it trains: optimizer, curve, meter, its plateau level and stop. (Its
    random draws are its own already: dropout draws from each module's own generator, models.SeededDropout.)"""

    def __init__(self, member: Member, recipe: Recipe, device, optimizer=None, meter=None):
        self.member, self.key, self.model = member, member.key, member.model
        self.optimizer = optimizer if optimizer is not None else make_optimizer(member.net, recipe, member.copied_layers)
        self.meter = meter or Meter(device)
        self.history, self.lr_factor, self.stopped, self.steps = [], 1.0, False, 0

    def state(self) -> dict:
        return {"model": self.member.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "history": list(self.history), "stopped": self.stopped, "steps": self.steps}

    def load(self, state: dict):
        self.member.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.history, self.stopped, self.steps = list(state["history"]), state.get("stopped", False), state["steps"]


def _train_chunk(runs: list[_Run], stream, plan, recipe: Recipe, step: int, stop_step: int, total_steps: int,
                 autocast, progress: Progress | None = None, epoch: int = 0) -> int:
    """Steps of every run from `step` until `stop_step` or the end of the batch iterator `stream`; returns the
    next step. Each batch is drawn once; its feeds (the images, the shared frozen trunks' outputs) are computed
    once (`plan.inputs`), then each member steps on its own. The input wait is the host-side time drawing the
    batch blocks, not synchronised with the device: on CUDA the host runs ahead of the GPU by its launch queue,
    so a step bound by the GPU reads ~0 and one bound by its input reads the time the GPU had nothing queued (a
    synchronisation per step to measure it would cost the very overlap it measures)."""
    for r in runs:
        r.model.train()
    clock, share = time.perf_counter, 1 / len(runs)
    while step < stop_step:
        t = clock()
        batch = next(stream, None)
        waited = clock() - t
        if batch is None:
            break
        inputs = plan.inputs(batch, train=True, autocast=autocast)
        labels, shared = batch.labels, clock() - t
        for r in runs:
            t_own = clock()
            images = inputs[r.member.feed]
            lr = recipe.lr_at(step, total_steps) * r.lr_factor
            for g in r.optimizer.param_groups:
                g["lr"] = lr * g["lr_mult"]
            if recipe.channels_last and images.dim() == 4:      # (a frozen trunk's outputs may be flat)
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast():
                loss = F.cross_entropy(r.model(images), labels, label_smoothing=recipe.label_smoothing)
            r.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            r.optimizer.step()
            m = r.meter
            m.loss_sum += loss.detach() * len(labels)
            m.images, m.lr, r.steps = m.images + len(labels), lr, step + 1
            m.input_wait_s += waited * share
            m.train_s += clock() - t_own + shared * share
        step += 1
        if progress is not None:
            progress.tick(len(labels), waited, epoch, step, loss, recipe.lr_at(step - 1, total_steps) * runs[0].lr_factor)
    return step


def train_steps(model, optimizer, batches, recipe: Recipe, step: int, stop_step: int, total_steps: int, autocast,
                meter: Meter, progress: Progress | None = None, epoch: int = 0, lr_factor: float = 1.0) -> int:
    """One net's steps from `step` until `stop_step` or the end of the iterator `batches` of (images, labels);
    returns the next step (the cohort loop's steps, for one net: benchmarks and tests). `lr_factor`: an
    --until-plateau level's decay on top of the recipe's rate."""
    run = _Run(Member("net", unwrap(model), model), recipe, meter.device, optimizer=optimizer, meter=meter)
    run.lr_factor = lr_factor
    plan = InputPlan(None, [], True)
    stream = (Batch(x, y) for x, y in batches)
    return _train_chunk([run], stream, plan, recipe, step, stop_step, total_steps, autocast, progress, epoch)


def train_one_epoch(model, optimizer, loader, device, recipe: Recipe, step: int, total_steps: int,
                    autocast, epoch: int = 0, stop_step: int | None = None, lr_factor: float = 1.0) -> tuple[dict, int]:
    """One pass over `loader` (or up to `stop_step`); returns (its metrics, next step). The benchmarks' loop."""
    meter = Meter(device)
    step = train_steps(model, optimizer, iter(loader), recipe, step, total_steps if stop_step is None else stop_step,
                       total_steps, autocast, meter, epoch=epoch, lr_factor=lr_factor)
    return meter.metrics(), step


@torch.no_grad()
def evaluate(model, loader, device, autocast) -> dict:
    """Top-1 and top-5 over the loader; summed over DDP ranks (each holds a disjoint shard)."""
    return _evaluate([Member("net", unwrap(model), model)], InputPlan(None, [], True), loader, device, autocast)["net"]


@torch.no_grad()
def _evaluate(members: list[Member], plan, loader, device, autocast) -> dict:
    """{key: top-1, top-5} of each member over one pass of the loader (the feeds computed once per batch)."""
    for m in members:
        m.model.eval()
    counts = {m.key: torch.zeros(3, device=device, dtype=torch.float64) for m in members}   # top1, top5 hits, images
    for batch in batches(loader, images=plan.raw):
        inputs = plan.inputs(batch, train=False, autocast=autocast)
        labels = batch.labels
        for m in members:
            with autocast():
                logits = m.model(inputs[m.feed])
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = top5 == labels[:, None]
            counts[m.key] += torch.stack([hits[:, 0].sum(), hits.any(1).sum(),
                                          torch.tensor(len(labels), device=device)]).double()
    out = {}
    for key, c in counts.items():
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(c)
        top1, top5, n = c.tolist()
        out[key] = {"val_top1": top1 / max(n, 1), "val_top5": top5 / max(n, 1), "val_images": int(n)}
    return out


def best_k_mean(values, k: int = 10) -> float:
    """The paper's metric: the mean of the k highest validation accuracies over the run."""
    best = sorted(values, reverse=True)[:k]
    return sum(best) / len(best) if best else float("nan")


def fit(model, recipe: Recipe, loaders, device, state: dict | None = None, report=None,
        copied_layers=(), log_every_s: float = LOG_EVERY_S) -> dict:
    """One net: `fit_cohort` with one member, its state and records in the one-net form ({"model", "optimizer",
    "epoch", "step", "history"}; `report(metrics, state)`). Benchmarks and tests train single nets with it."""
    member = Member("net", unwrap(model), model, copied_layers=tuple(copied_layers))
    single = None if state is None else {"epoch": state["epoch"], "step": state["step"],
                                         "members": {"net": {**state, "steps": state["step"]}}}
    on_record = None if report is None else (lambda records, st: report(records["net"], one_net_state(st, "net")))
    return fit_cohort([member], recipe, loaders, device, single, on_record, log_every_s)["net"]


def one_net_state(state: dict, key: str) -> dict:
    """A cohort's checkpoint state as one member's, in the one-net form."""
    return {**state["members"][key], "epoch": state["epoch"], "step": state["step"]}


def fit_cohort(members: list[Member], recipe: Recipe, loaders, device, state: dict | None = None, report=None,
               log_every_s: float = LOG_EVERY_S, plan=None) -> dict:
    """Train every member for the recipe's budget from one batch stream, evaluating `evals_per_epoch` times an
    epoch or every `eval_every_iters` steps, with a record (`report({key: metrics}, state)`) at each evaluation
    or each epoch's end (module docstring); resume from `state`. Each member is stepped exactly as it would be
    alone (its own optimizer, schedule, plateau stop and dropout draws); `plan` (frozen_prefix.plan_inputs) says
    what each reads. Returns each member's summary by key."""
    plan = plan or InputPlan(loaders, [], True)
    runs = [_Run(m, recipe, device) for m in members]
    step = 0
    if state is not None:
        for r in runs:
            r.load(state["members"][r.key])
        step = state["step"]
    steps_per_epoch = max(1, len(loaders.train))
    total_steps = recipe.total_steps(steps_per_epoch * recipe.batch_size)   # until_plateau: its cap
    epochs = planned_epochs(recipe, loaders.train)
    by_evaluation = recipe.eval_every_iters is not None     # records at each evaluation, else at each epoch's end
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if recipe.bf16 else nullcontext
    progress = Progress(log_every_s, total_steps, step, len(runs))
    input_wait = InputWaitCheck(getattr(loaders, "input", None))

    def record(epoch: int, which):
        records = {}
        for r in which:
            last = r.history[-1] if r.history else {"val_top1": float("nan"), "val_top5": float("nan")}
            records[r.key] = {"epoch": epoch, "epochs": epochs, "step": r.steps if r.stopped else step,
                              "total_steps": total_steps, **r.meter.metrics(), "val_top1": last["val_top1"],
                              "val_top5": last["val_top5"]}
            r.meter.reset()
        input_wait.check(_pooled(records.values()))
        if report is not None and records:
            report(records, {"epoch": epoch, "step": step, "members": {r.key: r.state() for r in runs}})

    for epoch in range(step // steps_per_epoch, epochs):
        if step >= total_steps:
            break
        if recipe.until_plateau:
            for r in runs:
                if r.stopped:
                    continue
                level, r.stopped = plateau_state(epoch_top1(r.history), decays=len(recipe.milestones))
                r.lr_factor = recipe.gamma ** level
                if r.stopped and r.meter.images:          # steps after its last evaluation: their record
                    record(max(0, epoch - 1), [r])
        active = [r for r in runs if not r.stopped]
        if not active:
            break
        set_epoch(loaders.train, epoch)
        stream = batches(loaders.train, images=plan.raw)
        try:
            # a resume inside this epoch (a record after an evaluation): replay its seeded order up to the step
            collections.deque(itertools.islice(stream, step - epoch * steps_per_epoch), maxlen=0)
            for stop in eval_stops(recipe, epoch, steps_per_epoch):   # train up to each stop, evaluate there
                chunk_end = min(total_steps, epoch * steps_per_epoch + stop)
                if step >= chunk_end:
                    continue
                step = _train_chunk(active, stream, plan, recipe, step, chunk_end, total_steps, autocast, progress,
                                    epoch)
                if evaluates_at(recipe, step, total_steps):
                    for key, metrics in _evaluate([r.member for r in active], plan, loaders.val, device,
                                                  autocast).items():
                        next(r for r in active if r.key == key).history.append({"epoch": epoch, "step": step,
                                                                               **metrics})
                    if by_evaluation:
                        record(epoch, active)
        finally:
            stream.close()                             # leaving an epoch early must free FFCV's thread
        if not by_evaluation:
            record(epoch, active)
    left = [r for r in runs if r.meter.images]          # steps after the last evaluation (an --until-plateau stop)
    if left:
        record((step - 1) // steps_per_epoch, left)
    return {r.key: _summary(r, recipe, step, total_steps, epochs) for r in runs}


def _summary(r: _Run, recipe: Recipe, step: int, total_steps: int, epochs: int) -> dict:
    history = r.history
    steps = r.steps if recipe.until_plateau else step
    top1s = [h["val_top1"] for h in history]
    rise = plateau_rise(history, steps if recipe.until_plateau else total_steps)
    return {"top1_final": history[-1]["val_top1"], "top5_final": history[-1]["val_top5"],
            "top1_best10": best_k_mean(top1s, 10), "epochs": history[-1]["epoch"] + 1 if recipe.until_plateau else epochs,
            "steps": steps, "evaluations": len(history),
            "plateau_rise": rise, "converged": bool(rise < PLATEAU_POINTS) if rise == rise else None}


def _pooled(records) -> dict:
    """One record of a cohort's members pooled (their seconds add up to the cohort's): what the input-wait
    warning judges."""
    records = list(records)
    if not records:
        return {"input_wait_s": 0.0, "train_s": 0.0, "step": 0, "images_per_s": 0.0}
    train_s = sum(m["train_s"] for m in records)
    return {"input_wait_s": sum(m["input_wait_s"] for m in records), "train_s": train_s,
            "step": max(m["step"] for m in records),
            "images_per_s": sum(m["train_images"] for m in records) / max(train_s, 1e-9)}


class InputWaitCheck:
    """One warning a run, at its first record (after the first: that one holds the loaders' start-up, FFCV
    compiling its pipeline) whose steps waited on input more than INPUT_WAIT_WARN of their training time."""

    def __init__(self, input_name: str | None):
        self.input_name, self.records, self.warned = input_name, 0, False

    def check(self, m: dict):
        self.records += 1
        share = m["input_wait_s"] / max(m["train_s"], 1e-9)
        if self.warned or self.records < 2 or share <= INPUT_WAIT_WARN:
            return
        self.warned = True
        if self.input_name == "ffcv":
            fix = ("give FFCV more decode threads (--cpus-per-trial: it decodes every batch on the trial's CPUs) or "
                   "read the node's pixel store, which decodes nothing at train time (--set input=pixel_store)")
        elif self.input_name == "pixel_store":
            fix = ("its batches are gathered on the host from the memory-mapped store: give the trial more CPUs "
                   "(--cpus-per-trial), or a node with the memory to keep the store in its page cache")
        else:
            fix = "give the trial more CPUs (--cpus-per-trial)"
        log.warning("the step waited on its input %.0f%% of its training time up to iteration %d (%.1f of %.1f s, "
                    "%s input, %.0f img/s), the device idle as long: %s", 100 * share, m["step"], m["input_wait_s"],
                    m["train_s"], self.input_name or "its", m["images_per_s"], fix)


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
    if hasattr(loader, "set_epoch"):                 # the pixel-store loader (device_input.py)
        loader.set_epoch(epoch)
        return
    inner = getattr(loader, "loader", None)
    if inner is not None and hasattr(inner, "next_epoch"):
        inner.next_epoch = epoch
