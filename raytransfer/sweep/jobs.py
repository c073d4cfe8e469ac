"""From a grid of Ray Tune `grid_search` axes to jobs with content-addressed keys and dependencies.

A job's key is a readable name plus a hash of everything that determines its result (dataset
fingerprint, split manifest hash, training seed, arch, recipe, treatment, n, source and target
half): same key, same job, never trained twice. Workers, storage and the cluster are left out.
The readable name comes from the split's content too, so a split read from a manifest file keys
like the same split made by the sweep.

Split axis values: "similar" (with the `split_seed` axis), "dissimilar", or "file:PATH", a split
manifest written by `raytransfer split` (any kind); its file name (without .json) is its label in
the results and the report. n runs over 1 .. layers - 1 of the recipe's architecture.

Treatments are named from the target's point of view: with target B, AnB copies from baseA and BnB
from baseB (a selffer); with target A ("BnA" in the paper's words) the row says treatment AnB,
source_half B, target_half A.

Whole-dataset jobs (split_kind "whole", target "all": every class of the dataset): `netbase`, the paper's
1000-class net; random_frozen where the recipe says `random_frozen_on: whole` (the paper: compared with
netbase, one job per n and seed whatever the splits); and `reduced_k`, a net on the first k training images
of every class (k = 0: all of them) with the reduced solver (`reduced_recipe`), one per k in `reduced_k`.

    axes = expand_axes({"split": tune.grid_search(["similar"]), "n": tune.grid_search([1, 2]), ...})
    jobs = build_jobs(axes, dataset, recipe)
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import SweepError
from ..recipes import Recipe, reduced_recipe
from ..splits import (WNID, Split, SplitError, dissimilar_split, graded_split, half_classes, is_imagenet_1k,
                      level_fraction, parse_level, similar_split, validate_split)

TREATMENTS = ("AnB", "BnB", "AnB+", "BnB+", "random_frozen", "scratch")
ALL_TREATMENTS = ("netbase", "baseA", "baseB") + TREATMENTS + ("reduced_k",)
WHOLE = "whole"                                                      # split label/kind of whole-dataset jobs
PAPER_REDUCED_K = (1, 2, 5, 10, 25, 50, 100, 250, 500, 750, 1000, 0)  # the paper's reduced-* runs; 0: all images
SPLIT_KINDS = ("similar", "dissimilar")                              # built in; a manifest is "file:PATH"
SPLIT_FILE = "file:"
SPLIT_GRADED = "graded:"                                             # "graded:1/6": a graded split at that level
DIRECTIONS = {"AtoB": ("B",), "BtoA": ("A",), "both": ("B", "A")}   # -> target halves
MIN_CLASSES_PER_HALF = 2                                             # top-1 over one class says nothing
DIAGNOSTIC_PREFIX = "diag_"
DIAGNOSTICS = {"cka": "diag_cka", "probe": "diag_probe", "estimators": "diag_estimators"}   # --diagnostics -> kind
CKA_NETS = ("AnB", "AnB+", "BnB", "BnB+")                           # transferred nets compared with their base


def layer_names(arch: str) -> list[str]:
    """The arch's layer table (models imports torch: only when it is needed, not for `raytransfer status`)."""
    from ..models import layer_names as names
    return names(arch)


def is_diagnostic(treatment: str) -> bool:
    """A diagnostic job's treatment (diag_cka, ...), as against a network's."""
    return treatment.startswith(DIAGNOSTIC_PREFIX)


def n_range(arch: str) -> range:
    """The n a job of `arch` may copy: 1 .. layers - 1 (the last layer, the head, is never copied)."""
    return range(1, len(layer_names(arch)))


def describe_n_range(arch: str) -> str:
    names = layer_names(arch)
    return f"1..{len(names) - 1} for {arch} ({names[0]}..{names[-2]}; its head {names[-1]} is never copied)"


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
    split_label: str = ""                     # "similar-s0", "dissimilar", "graded-1of6-s0", or a split file's name
    split_sha256: str = ""
    split_level: float | None = None          # a graded split's level: the share of A's classes from family 2
    layer: str = ""                           # layer n of the arch's table: the last one copied ("" at n = 0)
    k: int = 0                                # reduced_k: training images per class (0: all)
    reads: tuple = ()                         # a diagnostic's inputs: the finished nets it reads

    @property
    def deps(self) -> tuple[str, ...]:
        """Every job that must be done before this one runs: its base, or the nets a diagnostic reads."""
        return ((self.base_key,) if self.base_key else ()) + tuple(k for k in self.reads if k != self.base_key)

    @property
    def is_diagnostic(self) -> bool:
        return is_diagnostic(self.treatment)

    def row(self) -> dict:
        """The columns a results row takes from the job itself."""
        return {"job_key": self.key, "split_kind": self.split_kind, "split_seed": self.split_seed,
                "split": self.split_label, "split_sha256": self.split_sha256, "split_level": self.split_level,
                "seed": self.seed,
                "treatment": self.treatment, "source_half": self.source_half or "", "target_half": self.target_half,
                "n": self.n, "layer": self.layer, "base_job_key": self.base_key or "", "k": self.k,
                "deps": list(self.deps)}

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


def validate_axes(axes: list[dict], arch: str = "caffenet"):
    """One clear error for a bad grid, before anything is trained."""
    ns = n_range(arch)
    for a in axes:
        if a["split"] not in SPLIT_KINDS and not str(a["split"]).startswith((SPLIT_FILE, SPLIT_GRADED)):
            raise SweepError(f"unknown split kind {a['split']!r}; expected one of {', '.join(SPLIT_KINDS)}, "
                             "graded:LEVEL (such as graded:1/6), or file:PATH (a split manifest of `raytransfer "
                             "split`, as --split-file PATH)")
        if str(a["split"]).startswith(SPLIT_GRADED):
            try:
                parse_level(a["split"][len(SPLIT_GRADED):])
            except SplitError as e:
                raise SweepError(str(e)) from None
        if a["treatment"] not in TREATMENTS:
            raise SweepError(f"unknown treatment {a['treatment']!r}; expected one of {', '.join(TREATMENTS)}")
        if a["target"] not in ("A", "B"):
            raise SweepError(f"unknown target half {a['target']!r}; expected A or B")
        if a["treatment"] != "scratch" and int(a["n"]) not in ns:
            raise SweepError(f"n={a['n']} is outside {describe_n_range(arch)}")


def make_split(dataset: Dataset, source: str, seed: int) -> tuple[Split, str]:
    """The split an axis value names, checked against the dataset, and its label."""
    if source == "similar":
        split, label, where = similar_split(dataset.name, dataset.classes, seed), f"similar-s{seed}", "--splits similar"
    elif source == "dissimilar":
        why = why_no_dissimilar(dataset)
        if why:
            raise SplitError(f"--splits dissimilar {why}")
        split, label, where = dissimilar_split(dataset.name, dataset.classes, dataset.superclass_order), \
            "dissimilar", "--splits dissimilar"
    elif source.startswith(SPLIT_GRADED):
        where = f"--splits {source}"
        why = why_no_dissimilar(dataset)
        if why:
            raise SplitError(f"{where}: a graded split mixes the two families of the dissimilar split, and it {why}")
        try:
            split = graded_split(dataset.name, dataset.classes, source[len(SPLIT_GRADED):], seed,
                                 dataset.superclass_order)
        except SplitError as e:
            raise SplitError(f"{where} on {dataset.data_dir}: {e}") from None
        label = "dissimilar" if split.kind == "dissimilar" else f"graded-{level_name(split)}-s{seed}"
    else:
        path = source[len(SPLIT_FILE):]
        where = f"--split-file {path}"
        try:
            split, label = Split.load(path), Path(path).name.removesuffix(".json")
        except SplitError as e:
            raise SplitError(f"{where}: {e}") from None
    try:
        validate_split(split, dataset.classes, min_per_half=MIN_CLASSES_PER_HALF)
    except SplitError as e:
        raise SplitError(f"{where} on {dataset.data_dir}: {e}") from None
    return split, label


def why_no_dissimilar(dataset: Dataset) -> str | None:
    """Why the dataset has no dissimilar split, and how a user's own data gets one (None: it has one).
    It needs the paper's ImageNet lists, wnid class ids, or exactly two superclasses."""
    tags = [c.get("superclass") for c in dataset.classes]
    order = list(dataset.superclass_order or [])
    own_halves = (f"or write the halves yourself: `raytransfer split {dataset.data_dir} --kind file --a-file A.txt "
                  "--b-file B.txt --out halves.json` (one class per line), then pass --split-file halves.json")
    if order and all(tags):
        if len(order) != 2:
            return (f"divides the classes of {dataset.data_dir} by superclass, but it has {len(order)} "
                    f"({', '.join(order[:5])}), not two: prepare it again with `--superclasses CSV` mapping every "
                    f"class to one of two superclasses, {own_halves}")
        return None
    if is_imagenet_1k(dataset.classes) or all(WNID.match(c["id"]) for c in dataset.classes):
        return None
    return (f"needs superclass tags, and {dataset.data_dir} ({dataset.name}) has none (nor WordNet ids): prepare "
            "it with a superclass level, `raytransfer prepare folder SRC --out DIR` on "
            "SRC/train/<superclass>/<class>/<image> (val/ likewise), or with `--superclasses CSV` "
            f"(class,superclass rows); {own_halves}")


def split_id(split: Split) -> str:
    """The readable part of a job key, from the split's content: similarN, dissimilar0, graded1of6sN,
    file<sha>."""
    if split.kind == "similar":
        return f"similar{split.seed}"
    if split.kind == "dissimilar":
        return "dissimilar0"
    if split.kind == "graded":
        return f"graded{level_name(split)}s{split.seed}"
    return f"file{split.sha256[:6]}"


def level_name(split: Split) -> str:
    """A graded split's level as it reads in labels and keys: '0', '1of6', '1of2'."""
    return level_fraction(split).replace("/", "of")


def build_jobs(axes: list[dict], dataset: Dataset, recipe: Recipe, reduced_k=()) -> tuple[list[Job], dict]:
    """Jobs for every axis combination, plus the bases they need (netbase where random_frozen runs on the
    whole dataset), plus a reduced_k job per k and training seed; bases first, then by split and n.
    Also returns the grid's splits by label."""
    validate_axes(axes, recipe.arch)
    bad = [k for k in reduced_k if int(k) < 0]
    if bad:
        raise SweepError(f"reduced k {bad[0]} is negative; k counts training images per class (0: all of them)")
    if len(dataset.classes) < 2 * MIN_CLASSES_PER_HALF:
        raise SweepError(f"{dataset.data_dir} ({dataset.name}) has {len(dataset.classes)} classes; the sweep splits "
                         f"them into two halves of at least {MIN_CLASSES_PER_HALF} classes each, so it needs at least "
                         f"{2 * MIN_CLASSES_PER_HALF}: add class folders and prepare it again")
    made, by_sha, jobs = {}, {}, {}                # axis value -> split; sha -> (split, label)
    for a in axes:
        source = a["split"]
        split_seed = int(a["split_seed"]) if source == "similar" or source.startswith(SPLIT_GRADED) else 0
        seed = int(a.get("seed", 0))
        if (source, split_seed) not in made:
            split, label = make_split(dataset, source, split_seed)
            split, label = by_sha.setdefault(split.sha256, (split, label))     # one split, however named
            made[(source, split_seed)] = (split, label)
        split, label = made[(source, split_seed)]
        target = a["target"]
        treatment, n = a["treatment"], (0 if a["treatment"] == "scratch" else int(a["n"]))
        base = {h: _job(dataset, split, label, seed, recipe, f"base{h}", None, h, 0, None) for h in ("A", "B")}
        for b in base.values():
            jobs.setdefault(b.key, b)
        if treatment == "random_frozen" and recipe.random_frozen_on == WHOLE:     # the paper: all classes, vs netbase
            for job in (_job(dataset, None, WHOLE, seed, recipe, "netbase", None, "all", 0, None),
                        _job(dataset, None, WHOLE, seed, recipe, treatment, None, "all", n, None)):
                jobs.setdefault(job.key, job)
            continue
        if treatment in ("random_frozen", "scratch"):
            source_half, base_key = None, None
        else:
            source_half = target if treatment.startswith("BnB") else ("A" if target == "B" else "B")
            base_key = base[source_half].key
        job = _job(dataset, split, label, seed, recipe, treatment, source_half, target, n, base_key)
        jobs.setdefault(job.key, job)
    for seed in sorted({int(a.get("seed", 0)) for a in axes}):
        for k in reduced_k:
            job = _job(dataset, None, WHOLE, seed, reduced_recipe(recipe), "reduced_k", None, "all", 0, None, k=int(k))
            jobs.setdefault(job.key, job)
    splits = {}
    for split, label in by_sha.values():
        if label in splits:
            raise SplitError(f"two different splits of the grid are both labelled {label!r} (split files of one "
                             "name in two folders?): rename one of the files")
        splits[label] = split
    order = {t: i for i, t in enumerate(ALL_TREATMENTS)}
    ordered = sorted(jobs.values(), key=lambda j: (j.base_key is not None or j.treatment not in ("baseA", "baseB",
                                                                                                  "netbase"),
                                                   j.split_kind, j.split_label, j.split_seed, j.seed, j.n,
                                                   order[j.treatment], j.k, j.target_half))
    return ordered, splits


def _job(dataset, split, label, seed, recipe, treatment, source, target, n, base_key, k: int = 0) -> Job:
    """One job; split None: a whole-dataset job (every class of the dataset, target "all")."""
    split_sha = split.sha256 if split is not None else WHOLE
    identity = {"dataset": dataset.fingerprint, "split": split_sha, "seed": seed, "arch": recipe.arch,
                "recipe": recipe.identity(), "treatment": treatment, "n": n, "source": source, "target": target}
    if treatment == "reduced_k":
        identity["k"] = k
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    reduced = f"-k{k or 'all'}" if treatment == "reduced_k" else ""
    name = (f"{split_id(split) if split is not None else WHOLE}-{treatment}-{target}" + (f"-n{n}" if n else "")
            + reduced + f"-s{seed}-{recipe.name}")
    key = f"{name}-{digest}".replace("+", "p")
    classes = half_classes(split, target) if split is not None else [c["id"] for c in dataset.classes]
    spec = {"job_key": key, "data_dir": dataset.data_dir, "dataset_fingerprint": dataset.fingerprint,
            "target_classes": classes, "treatment": treatment, "n": n, "seed": seed,
            "recipe": recipe.to_dict(), "synthetic": dataset.synthetic}
    if recipe.normalize == "mean_image":        # the paper: the mean image of the base's (source) training set
        spec["mean_classes"] = half_classes(split, source) if source else classes
    if treatment == "reduced_k":
        spec["k"] = k
    kind, split_seed = (WHOLE, 0) if split is None else (split.kind, split.seed or 0)
    return Job(key, treatment, kind, split_seed, seed, source, target, n, base_key, spec, split_label=label,
               split_sha256="" if split is None else split_sha, layer=layer_names(recipe.arch)[n - 1] if n else "", k=k,
               split_level=None if split is None else split_level(split))


def split_level(split: Split) -> float | None:
    """The level of a split on the graded axis: a graded split's own, 0 for the dissimilar split (where the
    graded axis starts), None for the others."""
    return split.level if split.level is not None else (0.0 if split.kind == "dissimilar" else None)


@dataclass(frozen=True)
class DiagnosticSettings:
    """How much of the target half a diagnostic reads; part of its key."""
    val_images: int = 500          # target half's val images (CKA, probe scores), a fixed-seed subsample
    train_images: int = 2000       # target half's train images (probe fits, estimators), centre crops
    batch_size: int = 100          # CKA's minibatch (Nguyen et al. 2021) and the loaders' batch
    probe_c: float = 1.0           # inverse L2 strength of the logistic-regression probes
    probe_max_iter: int = 300
    sample_seed: int = 0           # which images the subsamples take

    def to_dict(self) -> dict:
        return asdict(self)


def build_diagnostic_jobs(jobs: list[Job], kinds, settings: DiagnosticSettings) -> list[Job]:
    """Diagnostic jobs for the networks of a grid: per split x training seed x target half, `kinds` of
    cka (reads both bases and every AnB/AnB+/BnB/BnB+ of that target), probe and estimators (read the
    source base: baseA for target B). Their keys hash the keys of the nets they read, the kind and the
    settings: same inputs, same key, computed once."""
    bases = {(j.split_sha256, j.seed, j.target_half): j for j in jobs if j.treatment in ("baseA", "baseB")}
    groups = {}
    for j in jobs:
        if j.is_diagnostic or j.treatment in ("baseA", "baseB") or j.base_key is None:
            continue
        groups.setdefault((j.split_sha256, j.seed, j.target_half), []).append(j)
    out = []
    for (sha, seed, target), members in groups.items():
        source = "A" if target == "B" else "B"
        if (sha, seed, "A") not in bases or (sha, seed, "B") not in bases:
            continue
        base_of = {h: bases[(sha, seed, h)] for h in ("A", "B")}
        for kind in kinds:
            treatment = DIAGNOSTICS[kind]
            if kind == "cka":
                nets = [base_of["A"], base_of["B"]] + [j for j in members if j.treatment in CKA_NETS]
            else:
                nets = [base_of[source]]
            out.append(_diagnostic_job(treatment, nets, base_of[target], source, target, settings))
    return out


def _diagnostic_job(treatment, nets: list[Job], template: Job, source: str, target: str,
                    settings: DiagnosticSettings) -> Job:
    identity = {"kind": treatment, "nets": [n.key for n in nets], "target": target, "settings": settings.to_dict(),
                "dataset": template.spec["dataset_fingerprint"]}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    recipe = template.spec["recipe"]
    key = f"{template.key.split('-')[0]}-{treatment}-{target}-s{template.seed}-{recipe['name']}-{digest}"
    row = {"split_kind": template.split_kind, "split_seed": template.split_seed, "split": template.split_label,
           "seed": template.seed, "source_half": source, "target_half": target}
    spec = {"job_key": key, "treatment": treatment, "n": 0, "seed": template.seed,
            **{k: template.spec[k] for k in ("data_dir", "dataset_fingerprint", "target_classes", "recipe", "synthetic")},
            "nets": [{"key": n.key, "treatment": n.treatment, "n": n.n, "base_key": n.base_key or ""} for n in nets],
            "settings": settings.to_dict(), "row": row}
    return Job(key, treatment, template.split_kind, template.split_seed, template.seed, source, target, 0, None, spec,
               split_label=template.split_label, split_sha256=template.split_sha256, reads=tuple(n.key for n in nets))
