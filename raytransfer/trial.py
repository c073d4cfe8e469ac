"""One trial from its specs: a cohort of nets on one target half -- network surgery, the half's loaders, the
loop, the frozen check of each.

A trial trains a *cohort*: jobs that read the same target half with the same recipe, training seed and input
(cohort.stream_key), one or many. Their loaders are built once, the frozen layers they share run once
(frozen_prefix.py), and each member is stepped as it would be alone, so its weights, curve and frozen check
are the same as alone (bit for bit in fp32 on the CPU; tests/test_cohort.py). The same function runs in a
Tune trial's own process and inside each Ray Train worker (DDP); the host supplies the device, the base
weights, a `report` callback and, on a restart, the last checkpoint state.

    cohort = build_cohort([spec_a, spec_b], torch.device("cpu"), base_states={"AnB-key": sd})
    summaries = train_cohort(cohort)                         # {job key: summary}
    summary = run_trial(spec, torch.device("cpu"), base_state=None)     # one net
"""
from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from .cohort import budget_bytes, fit_members, member_bytes, stream_key
from .frozen_prefix import MAX_BYTES, first_images, plan_inputs, shared_depth, table_bytes, why_not
from .loaders import CropSpec, build_half_loaders
from .loop import Member, fit_cohort, one_net_state, planned_epochs
from .recipes import recipe_from_dict
from .transfer import FROZEN_MODES, as_tensor, build_trial_network, frozen_state, init_seed_for, verify_frozen

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


@dataclass(eq=False)
class Cohort:
    """The members of one trial, built on the device, and what they share: the recipe, the half's loaders."""
    specs: dict                 # job key -> spec
    members: list               # loop.Member, in cohort order
    references: dict            # job key -> the frozen layers' weights to check at the end (None: not frozen)
    recipe: object
    loaders: object
    device: torch.device
    num_classes: int
    started: float
    batch_size: int = 0         # this worker's training batch
    wrap: object = None         # what each member's model is wrapped in once its input is planned (DDP), or None

    def keys(self) -> list[str]:
        return [m.key for m in self.members]

    def keep(self, keys):
        """Only these members train (the others were handed back: `fit_memory`)."""
        keys = set(keys)
        self.members = [m for m in self.members if m.key in keys]
        self.specs = {k: s for k, s in self.specs.items() if k in keys}

    def fit_memory(self) -> tuple[list, list, dict]:
        """(kept, deferred, bytes by key): each member's memory measured on one training batch (cohort.py), the
        members that fit the trial's budget kept in order; the rest are for another trial."""
        if len(self.members) == 1:
            return self.keys(), [], {}
        probe = self.probe_batch()
        autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if self.recipe.bf16 else nullcontext
        epochs = planned_epochs(self.recipe, self.loaders.train)
        sizes = {m.key: member_bytes(m.net, probe, autocast,
                                     0 if self.wrap is not None else _table_bytes(m, self.loaders, epochs))["total"]
                 for m in self.members}
        budget, why = budget_bytes(self.device)
        kept, deferred = fit_members(sizes, budget)
        if deferred:
            log.warning("cohort of %d: %d member(s) fit the memory budget (%.2f GiB: %s; measured %.3f GiB for all), "
                        "%d handed back to run in another trial", len(sizes), len(kept), budget / 2**30, why,
                        sum(sizes.values()) / 2**30, len(deferred))
        return kept, deferred, sizes


    def probe_batch(self) -> torch.Tensor:
        """Validation images (centre crops: no draw of the training stream is taken), as many as a training batch
        of this worker."""
        images = first_images(self.loaders.val)
        size = self.batch_size
        return images.repeat((-(-size // len(images)),) + (1,) * (images.dim() - 1))[:size]


def _table_bytes(member, loaders, epochs: int) -> int:
    """Bytes of the member's looked-up frozen outputs, where it would have them (frozen_prefix.py), else 0."""
    cut = shared_depth(member.net, member.frozen_n) if member.frozen_n else 0
    if not cut or why_not(member.net, cut, loaders, epochs):
        return 0
    size = table_bytes(member.net, cut, loaders)
    return size if size <= MAX_BYTES else 0


def build_cohort(specs: list[dict], device: torch.device, base_states: dict | None = None, distributed: bool = False,
                 wrap_model=None, num_workers: int = 1) -> Cohort:
    """Every member's network (surgery from its base's weights: `base_states[job key]`) on the device, and the
    half's loaders, built once. The specs must share one stream (cohort.stream_key)."""
    t0 = time.time()
    streams = {stream_key(s) for s in specs}
    if len(streams) != 1:
        raise ValueError(f"a cohort's jobs must read one stream (target half, recipe, training seed, input); got "
                         f"{len(streams)} among {[s['job_key'] for s in specs]}")
    first = specs[0]
    recipe = recipe_from_dict(first["recipe"])
    seed = int(first["seed"])
    num_classes = head_size(recipe, len(first["target_classes"]))
    batch_size = recipe.batch_size // (torch.distributed.get_world_size() if distributed else 1)
    loaders = build_half_loaders(first["data_dir"], first["target_classes"],
                                 CropSpec(recipe.crop, recipe.crop_size, recipe.resize_size),
                                 batch_size=batch_size,
                                 device=device, seed=seed, num_workers=num_workers, distributed=distributed,
                                 expect_fingerprint=first.get("dataset_fingerprint"), normalize=recipe.normalize,
                                 mean_classes=first.get("mean_classes"), per_class=first.get("k") or None,
                                 input=recipe.input)
    members, references = [], {}
    for spec in specs:
        key, treatment, n = spec["job_key"], spec["treatment"], int(spec["n"])
        mode = MODE_OF[treatment]
        base_state = (base_states or {}).get(key)
        net = build_trial_network(recipe.arch, num_classes, base_state, n, mode,
                                  init_seed_for(seed, init_stream(recipe, treatment)), recipe.arch_kwargs())
        reference = None
        if mode == "frozen":                           # the base's own tensors, not the copies in `net`
            reference = {k: as_tensor(base_state[k]) for k in frozen_state(net)}
        elif mode == "random_frozen":
            reference = frozen_state(net)
        if recipe.channels_last:
            net = net.to(memory_format=torch.channels_last)
        net = net.to(device)
        copied = tuple(l.name for l in net.layer_table()[:n]) if mode == "finetune" else ()
        members.append(Member(key, net, net, copied_layers=copied, frozen_n=n if mode in FROZEN_MODES else 0))
        references[key] = reference
    if recipe.compile and device.type == "cuda":
        wrap_model = _compiled(wrap_model)
    return Cohort({s["job_key"]: s for s in specs}, members, references, recipe, loaders, device, num_classes, t0,
                  batch_size, wrap_model)


def _compiled(wrap_model):
    """torch.compile over the host's wrapping (DDP), if any."""
    return lambda model: torch.compile(wrap_model(model) if wrap_model else model)


def train_cohort(cohort: Cohort, report=None, resume_state: dict | None = None, log_every_s: float | None = None) -> dict:
    """Train the cohort's members from one stream; returns each member's summary (metrics, frozen check, final
    weights) by job key. `report(records, state)`: loop.fit_cohort's, with each member's curve in its state."""
    recipe, loaders = cohort.recipe, cohort.loaders
    plan = plan_inputs(cohort.members, loaders, planned_epochs(recipe, loaders.train), wrapped=cohort.wrap is not None)
    if cohort.wrap is not None:
        for m in cohort.members:
            m.model = cohort.wrap(m.model)
    logs = {m.key: [] if resume_state is None else list(resume_state["members"][m.key].get("epoch_log", []))
            for m in cohort.members}

    def on_record(records, state):                     # each evaluation or each epoch (loop.py): a bounded log
        for key, metrics in records.items():
            logs[key].append(dict(metrics))
        for key, member_state in state["members"].items():
            member_state["epoch_log"] = logs[key]      # the curve survives a resume
        if report is not None:
            report(records, state)

    kwargs = {} if log_every_s is None else {"log_every_s": log_every_s}
    summaries = fit_cohort(cohort.members, recipe, loaders, cohort.device, state=resume_state, report=on_record,
                           plan=plan, **kwargs)
    wall = time.time() - cohort.started
    own = {k: sum(m["train_s"] for m in logs[k]) for k in logs}
    shares = {k: own[k] / max(sum(own.values()), 1e-9) if len(own) > 1 else 1.0 for k in own}
    out = {}
    for m in cohort.members:
        reference = cohort.references[m.key]
        check = verify_frozen(m.net, reference) if reference is not None else None
        if check is not None and not check["ok"]:
            log.error("%s: frozen layers changed during training: %s", m.key, check["mismatched"][:5])
        epoch_log = logs[m.key]
        summary = summaries[m.key]
        summary.update(frozen_check=None if check is None else check["ok"],
                       frozen_mismatched=[] if check is None else list(check["mismatched"]),
                       train_images_per_s=_mean([r["images_per_s"] for r in epoch_log]), epoch_log=epoch_log,
                       input=getattr(loaders, "input", None), input_wait_share=input_wait_share(epoch_log),
                       wall_s=wall * shares[m.key], cohort_wall_s=wall, num_classes=cohort.num_classes,
                       train_samples=loaders.train.num_samples,
                       images_per_class=loaders.train.num_samples / len(cohort.specs[m.key]["target_classes"]),
                       cohort_size=len(cohort.members), cohort_share=shares[m.key])
        summary["state_dict"] = {k: v.detach().cpu() for k, v in m.net.state_dict().items()}
        out[m.key] = summary
    return out


def run_cohort(specs: list[dict], device: torch.device, base_states: dict | None = None, report=None,
               resume_state: dict | None = None, distributed: bool = False, wrap_model=None,
               num_workers: int = 1) -> dict:
    """build_cohort, then train_cohort: every member's summary by job key."""
    cohort = build_cohort(specs, device, base_states, distributed, wrap_model, num_workers)
    return train_cohort(cohort, report, resume_state)


def run_trial(spec: dict, device: torch.device, base_state: dict | None = None, report=None,
              resume_state: dict | None = None, distributed: bool = False, wrap_model=None,
              num_workers: int = 1) -> dict:
    """One net: a cohort of one, with its records and state in the one-net form (`report(metrics, state)`,
    state {"model", "optimizer", "epoch", "step", "history", "epoch_log"})."""
    key = spec["job_key"]
    on_record = None if report is None else (lambda records, state: report(records[key], one_net_state(state, key)))
    resume = None
    if resume_state is not None:
        resume = {"epoch": resume_state["epoch"], "step": resume_state["step"],
                  "members": {key: {"steps": resume_state["step"], **resume_state}}}
    return run_cohort([spec], device, {key: base_state} if base_state is not None else None, on_record, resume,
                      distributed, wrap_model, num_workers)[key]


def input_wait_share(epoch_log) -> float:
    """The share (0..1) of the training time the steps waited on input, over every record of the run (resumes
    included; records written before the wait was measured count as unknown: NaN)."""
    if not epoch_log or any("input_wait_s" not in m for m in epoch_log):
        return float("nan")
    return sum(m["input_wait_s"] for m in epoch_log) / max(sum(m["train_s"] for m in epoch_log), 1e-9)


def _mean(values):
    return sum(values) / len(values) if values else float("nan")
