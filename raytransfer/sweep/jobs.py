"""From a grid of Ray Tune `grid_search` axes to jobs with content-addressed keys and dependencies.

A job's key is a readable name plus a hash of everything that determines its result (dataset
fingerprint, split manifest hash, training seed, arch, recipe, treatment, n, source and target
half): same key, same job, never trained twice. Workers, storage and the cluster are left out.

Treatments are named from the target's point of view: with target B, AnB copies from baseA and BnB
from baseB (a selffer); with target A ("BnA" in the paper's words) the row says treatment AnB,
source_half B, target_half A.

    axes = expand_axes({"split": tune.grid_search(["similar"]), "n": tune.grid_search([1, 2]), ...})
    jobs = build_jobs(axes, dataset, recipe)
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from ..recipes import Recipe
from ..splits import Split, dissimilar_split, half_classes, similar_split, validate_split

TREATMENTS = ("AnB", "BnB", "AnB+", "BnB+", "random_frozen", "scratch")
ALL_TREATMENTS = ("baseA", "baseB") + TREATMENTS
SPLIT_KINDS = ("similar", "dissimilar")
DIRECTIONS = {"AtoB": ("B",), "BtoA": ("A",), "both": ("B", "A")}   # -> target halves
MAX_N = 7                                                            # CaffeNet: conv1..fc7 can be copied


@dataclass(frozen=True)
class Job:
    key: str
    treatment: str
    split_kind: str
    split_seed: int
    seed: int
    source_half: str | None
    target_half: str
    n: int
    base_key: str | None                      # the job whose weights it needs (None: no dependency)
    spec: dict = field(repr=False)            # the trial spec run_trial takes

    @property
    def deps(self) -> tuple[str, ...]:
        return (self.base_key,) if self.base_key else ()

    def row(self) -> dict:
        """The columns a results row takes from the job itself."""
        return {"job_key": self.key, "split_kind": self.split_kind, "split_seed": self.split_seed,
                "seed": self.seed, "treatment": self.treatment, "source_half": self.source_half or "",
                "target_half": self.target_half, "n": self.n, "base_job_key": self.base_key or ""}

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Dataset:
    """What the jobs need to know about the prepared dataset."""
    data_dir: str
    name: str
    fingerprint: str
    classes: list
    superclass_order: list | None
    synthetic: dict | None = None             # the built-in dataset's spec: a node without it prepares it


def expand_axes(param_space: dict) -> list[dict]:
    """Every combination of the grid_search axes (Ray Tune's own variant generator)."""
    from ray.tune.search.variant_generator import generate_variants

    return [config for _, config in generate_variants(param_space)]


def validate_axes(axes: list[dict]):
    """One clear error for a bad grid, before anything is trained."""
    for a in axes:
        if a["split"] not in SPLIT_KINDS:
            raise ValueError(f"unknown split kind {a['split']!r}; expected one of {', '.join(SPLIT_KINDS)}")
        if a["treatment"] not in TREATMENTS:
            raise ValueError(f"unknown treatment {a['treatment']!r}; expected one of {', '.join(TREATMENTS)}")
        if a["target"] not in ("A", "B"):
            raise ValueError(f"unknown target half {a['target']!r}; expected A or B")
        if a["treatment"] != "scratch" and not 1 <= int(a["n"]) <= MAX_N:
            raise ValueError(f"n={a['n']} is outside 1..{MAX_N} (layers conv1..fc7 can be copied)")


def make_split(dataset: Dataset, kind: str, seed: int) -> Split:
    if kind == "similar":
        split = similar_split(dataset.name, dataset.classes, seed)
    else:
        split = dissimilar_split(dataset.name, dataset.classes, dataset.superclass_order)
    validate_split(split, dataset.classes)
    return split


def build_jobs(axes: list[dict], dataset: Dataset, recipe: Recipe) -> tuple[list[Job], dict]:
    """Jobs for every axis combination, plus the bases they need; bases first, then by split and n."""
    validate_axes(axes)
    splits, jobs = {}, {}
    for a in axes:
        kind, split_seed = a["split"], (int(a["split_seed"]) if a["split"] == "similar" else 0)
        seed = int(a.get("seed", 0))
        sid = f"{kind}{split_seed}"
        if sid not in splits:
            splits[sid] = make_split(dataset, kind, split_seed)
        split = splits[sid]
        target = a["target"]
        treatment, n = a["treatment"], (0 if a["treatment"] == "scratch" else int(a["n"]))
        base = {h: _job(dataset, split, sid, kind, split_seed, seed, recipe, f"base{h}", None, h, 0, None)
                for h in ("A", "B")}
        for b in base.values():
            jobs.setdefault(b.key, b)
        if treatment in ("random_frozen", "scratch"):
            source, base_key = None, None
        else:
            source = target if treatment.startswith("BnB") else ("A" if target == "B" else "B")
            base_key = base[source].key
        job = _job(dataset, split, sid, kind, split_seed, seed, recipe, treatment, source, target, n, base_key)
        jobs.setdefault(job.key, job)
    order = {t: i for i, t in enumerate(ALL_TREATMENTS)}
    ordered = sorted(jobs.values(), key=lambda j: (j.base_key is not None or j.treatment not in ("baseA", "baseB"),
                                                   j.split_kind, j.split_seed, j.seed, j.n, order[j.treatment],
                                                   j.target_half))
    return ordered, splits


def _job(dataset, split, sid, kind, split_seed, seed, recipe, treatment, source, target, n, base_key) -> Job:
    identity = {"dataset": dataset.fingerprint, "split": split.sha256, "seed": seed, "arch": recipe.arch,
                "recipe": recipe.to_dict(), "treatment": treatment, "n": n, "source": source, "target": target}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    name = f"{sid}-{treatment}-{target}" + (f"-n{n}" if n else "") + f"-s{seed}-{recipe.name}"
    key = f"{name}-{digest}".replace("+", "p")
    spec = {"job_key": key, "data_dir": dataset.data_dir, "dataset_fingerprint": dataset.fingerprint,
            "target_classes": half_classes(split, target), "treatment": treatment, "n": n, "seed": seed,
            "recipe": recipe.to_dict(), "synthetic": dataset.synthetic}
    return Job(key, treatment, kind, split_seed, seed, source, target, n, base_key, spec)
