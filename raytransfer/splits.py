"""Class splits: which classes form half A and half B, saved as a hashed JSON split manifest.

Kinds (paper §3): *similar* random halves (the paper's seeds 0-3 on ImageNet-1k, bit-exact),
*dissimilar* man-made (A) vs natural (B) halves (the paper's exact lists on ImageNet-1k, the
WordNet "artifact.n.01" rule for other wnid-named datasets, superclass tags for the synthetic
dataset), *graded* halves between the two (beyond the paper: half A takes a share `level` of its
classes from the second family, so level 0 is the dissimilar split and 1/2 a random split balanced
over the families), and *file* (two text files of class ids or ImageNet indices).

    classes = builtin_classes("imagenet-1k")
    split = similar_split("imagenet-1k", classes, seed=0); split.save("similar-s0.json")

A class list is the dataset manifest's "classes": dicts with index (the label), id (wnid or
folder name), name and superclass; sorted by id, so index i is the i-th id.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np

from raytransfer.wordnet import WordNetUnavailable, load_wordnet

log = logging.getLogger(__name__)

KINDS = ("similar", "dissimilar", "graded", "file")
RULES = ("paper-random", "paper-lists", "wordnet", "superclass", "file")
DISSIMILAR_RULES = ("auto", "paper-lists", "wordnet", "superclass")
BUILTIN_DATASETS = ("imagenet-1k",)
IMAGENET_SUPERCLASS_ORDER = ["man-made", "natural"]  # paper's lettering: A = man-made, B = natural
PAPER_SEEDS = (0, 1, 2, 3)
WNID = re.compile(r"^n\d{8}$")


class SplitError(ValueError):
    """A split that cannot be made or used; the message names the classes and the fix."""


@dataclass
class Split:
    """Two disjoint halves of a dataset's classes, identified by sha256 of their canonical JSON."""
    dataset: str
    kind: str               # "similar" | "dissimilar" | "graded" | "file"
    seed: int | None        # the paper's numpy seed, for kind "similar"; the swap draw's, for "graded"
    rule: str               # "paper-random" | "paper-lists" | "wordnet" | "superclass" | "file"
    A: list[str]            # sorted class ids of half A
    B: list[str]
    A_name: str = "A"       # e.g. "man-made"
    B_name: str = "B"       # e.g. "natural"
    sha256: str = ""
    level: float | None = None   # kind "graded": the share of A's classes taken from the second family

    def __post_init__(self):
        self.A, self.B = sorted(self.A), sorted(self.B)
        if not self.sha256:
            self.sha256 = self.content_sha256()

    def content(self) -> dict:
        """What the hash covers. `level` only where it is set, so that the splits made before graded
        splits existed keep their hashes, and with them their jobs' keys."""
        d = dataclasses.asdict(self)
        d.pop("sha256")
        if d["level"] is None:
            d.pop("level")
        return d

    def content_sha256(self) -> str:
        canonical = json.dumps(self.content(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def to_json(self) -> str:
        return json.dumps({**self.content(), "sha256": self.sha256}, indent=1) + "\n"

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_json())
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Split":
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SplitError(f"cannot read split file {path}: {e}") from e
        fields = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(d, dict) or sorted(set(d) | {"level"}) != sorted(fields):
            got = sorted(d) if isinstance(d, dict) else type(d).__name__
            raise SplitError(f"split file {path} has keys {got}; expected {sorted(fields)} (level only for "
                             "kind graded). Make it with `raytransfer split`.")
        try:
            split = cls(**{**d, "sha256": ""})
        except TypeError as e:
            raise SplitError(f"split file {path} is malformed ({e}); make it with `raytransfer split`") from e
        if split.sha256 != d["sha256"]:
            raise SplitError(f"split file {path} was modified: its content hashes to "
                             f"{split.sha256[:12]}…, not the recorded sha256 {str(d['sha256'])[:12]}…. "
                             "Regenerate it with `raytransfer split` instead of editing it.")
        return split


# -- class lists -----------------------------------------------------------------------------------

def _read_data(name: str) -> str:
    return resources.files("raytransfer").joinpath("data", name).read_text()


def paper_indices(name: str) -> list[int]:
    """A shipped paper list (e.g. 'half0A', 'man', 'nat'): 0-based ImageNet-1k indices."""
    return [int(line) for line in _read_data(f"paper_split_{name}.txt").split()]


def builtin_classes(name: str) -> list[dict]:
    """The class list of a dataset that ships with raytransfer (no images needed)."""
    if name != "imagenet-1k":
        raise SplitError(f"unknown built-in dataset {name!r}; expected one of {list(BUILTIN_DATASETS)}, "
                         "or a prepared dataset directory containing manifest.json")
    man = set(paper_indices("man"))
    classes = []
    for line in _read_data("imagenet_wnids.tsv").splitlines()[1:]:
        index, wnid, lemma = line.split("\t")
        classes.append({"index": int(index), "id": wnid, "name": lemma.split(",")[0].strip(),
                        "superclass": "man-made" if int(index) in man else "natural"})
    return classes


def load_classes(dataset: str | os.PathLike) -> tuple[str, list[dict], list[str] | None]:
    """(name, classes, superclass_order) of 'imagenet-1k' or a prepared dataset directory."""
    if str(dataset) in BUILTIN_DATASETS:
        return str(dataset), builtin_classes(str(dataset)), list(IMAGENET_SUPERCLASS_ORDER)
    path = Path(dataset)
    manifest = path if path.name == "manifest.json" else path / "manifest.json"
    if not manifest.is_file():
        raise SplitError(f"unknown dataset {str(dataset)!r}: expected one of {list(BUILTIN_DATASETS)} "
                         "or a prepared dataset directory containing manifest.json "
                         "(make one with `raytransfer prepare`)")
    m = json.loads(manifest.read_text())
    return m["name"], m["classes"], m.get("superclass_order")


def is_imagenet_1k(classes: Sequence[dict]) -> bool:
    """True when the classes are exactly the 1000 ILSVRC2012 wnids."""
    return len(classes) == 1000 and {c["id"] for c in classes} == set(_imagenet_by_id())


@functools.lru_cache(maxsize=1)
def _imagenet_by_id() -> dict[str, dict]:
    return {c["id"]: c for c in builtin_classes("imagenet-1k")}


def _ids_by_index(classes: Sequence[dict]) -> list[str]:
    ordered = sorted(classes, key=lambda c: c["index"])
    if [c["index"] for c in ordered] != list(range(len(ordered))):
        raise SplitError(f"class indices must be 0..{len(ordered) - 1} without gaps; "
                         "rebuild the dataset manifest with `raytransfer prepare`")
    return [c["id"] for c in ordered]


# -- the three kinds -------------------------------------------------------------------------------

def similar_split(dataset_name: str, classes: Sequence[dict], seed: int) -> Split:
    """Random halves as in the paper: N//2 classes in A, the rest in B.

    paper: numpy.random.seed([s]) — a one-element list, because argparse gave nargs=1 — then
    A = sorted(np.random.choice(np.arange(N), N // 2, replace=False)). A plain int seed(s) seeds
    RandomState differently and gives other halves. RandomState([s]) is the same generator
    without touching numpy's global state.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise SplitError(f"seed {seed!r} must be an integer in 0..2**32-1; the paper used {list(PAPER_SEEDS)}")
    ids = _ids_by_index(classes)
    if len(ids) < 2:
        raise SplitError(f"dataset {dataset_name!r} has {len(ids)} class(es); a split needs at least 2")
    chosen = np.random.RandomState([int(seed)]).choice(np.arange(len(ids)), len(ids) // 2, replace=False)
    in_a = set(int(i) for i in chosen)
    split = Split(dataset_name, "similar", int(seed), "paper-random",
                  A=[ids[i] for i in sorted(in_a)], B=[ids[i] for i in range(len(ids)) if i not in in_a])
    validate_split(split, classes)
    return split


def dissimilar_split(dataset_name: str, classes: Sequence[dict], superclass_order: Sequence[str] | None = None,
                     rule: str = "auto", wordnet=None) -> Split:
    """Man-made (A) vs natural (B), or superclass_order[0] (A) vs [1] (B) for tagged datasets.

    rule "auto": the paper's lists on ImageNet-1k, superclass tags where every class has one,
    the WordNet rule where every class id is a wnid. wordnet: an nltk reader (default: load_wordnet()).
    """
    if rule not in DISSIMILAR_RULES:
        raise SplitError(f"unknown dissimilar rule {rule!r}; expected one of {list(DISSIMILAR_RULES)}")
    if rule == "auto":
        rule = _auto_rule(dataset_name, classes, superclass_order)
    ids = _ids_by_index(classes)
    if rule == "paper-lists":
        if not is_imagenet_1k(classes):
            raise SplitError(f"rule 'paper-lists' needs the 1000 ImageNet-1k classes; dataset {dataset_name!r} "
                             f"has {len(ids)} other classes. Use --rule wordnet (wnid classes) or superclass.")
        paper = _imagenet_by_id()  # by wnid, so the dataset's own label order does not matter
        a = [i for i in ids if paper[i]["superclass"] == "man-made"]
        b = [i for i in ids if paper[i]["superclass"] == "natural"]
        names = IMAGENET_SUPERCLASS_ORDER
    elif rule == "wordnet":
        man = set(man_made_by_wordnet(ids, wordnet))
        a, b = [i for i in ids if i in man], [i for i in ids if i not in man]
        names = IMAGENET_SUPERCLASS_ORDER
    else:  # superclass
        a, b, names = _superclass_halves(dataset_name, classes, superclass_order)
    split = Split(dataset_name, "dissimilar", None, rule, A=a, B=b, A_name=names[0], B_name=names[1])
    validate_split(split, classes)
    return split


def graded_split(dataset_name: str, classes: Sequence[dict], level, seed: int,
                 superclass_order: Sequence[str] | None = None, rule: str = "auto", wordnet=None) -> Split:
    """Halves between dissimilar and similar: A is the first family (man-made) with a share `level`
    of its classes swapped for classes of the second (natural), B the rest.

    Level 0 returns the dissimilar split itself (kind "dissimilar"); 1/2 with equal families a random split balanced over them. The
    swapped classes are the first k of a seeded permutation of each family (RandomState([seed]), as
    the similar split seeds), so at one seed a higher level swaps the classes of every lower one and
    more: the levels of one seed form one path from the dissimilar split outwards.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise SplitError(f"seed {seed!r} of a graded split must be an integer in 0..2**32-1")
    try:
        families = dissimilar_split(dataset_name, classes, superclass_order, rule, wordnet=wordnet)
    except SplitError as e:
        raise SplitError(f"a graded split mixes two superclass families, and {e}") from None
    first, second = families.A, families.B
    k = graded_swaps(level, len(first), len(second), families.A_name, families.B_name)
    if k == 0:
        return families        # level 0 is the dissimilar split itself: one hash, so its bases train once
    rng = np.random.RandomState([int(seed)])
    out_of_a = [first[i] for i in rng.permutation(len(first))[:k]]
    into_a = [second[i] for i in rng.permutation(len(second))[:k]]
    a = sorted(set(first) - set(out_of_a) | set(into_a))
    b = sorted(set(second) - set(into_a) | set(out_of_a))
    split = Split(dataset_name, "graded", int(seed), families.rule, A=a, B=b, A_name=families.A_name,
                  B_name=families.B_name, level=k / len(first))
    validate_split(split, classes)
    return split


def parse_level(text) -> float:
    """A mixing level from '1/6', '0.5' or a number; one error naming the form otherwise."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    try:
        if "/" in str(text):
            num, den = str(text).split("/")
            return int(num) / int(den)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise SplitError(f"graded level {text!r} is not a number: write it as a fraction such as 1/6 or a "
                         "decimal such as 0.5") from None


def level_fraction(split: Split) -> str:
    """A graded split's level as the share of half A it swapped, in lowest terms: '0', '1/6', '1/2'."""
    return _fraction(round((split.level or 0) * len(split.A)), len(split.A))


def _fraction(k: int, total: int) -> str:
    from math import gcd
    g = gcd(k, total) or 1
    return "0" if k == 0 else f"{k // g}/{total // g}"


def graded_swaps(level, first: int, second: int, first_name: str = "A", second_name: str = "B") -> int:
    """How many classes a level swaps between families of these sizes; one error for a level outside
    [0, 1], one the sizes cannot make, or one that asks more classes than the second family has."""
    p = parse_level(level)
    if not 0 <= p <= 1:
        raise SplitError(f"graded level {level} is outside [0, 1]: it is the share of half A's classes taken "
                         "from the second family (0: the dissimilar split, 1/2: a balanced random split)")
    k = round(p * first)
    if abs(k - p * first) > 1e-9:
        below, above = _fraction(int(p * first), first), _fraction(int(p * first) + 1, first)
        raise SplitError(f"graded level {level} is not exact on families of {first} ({first_name}) and {second} "
                         f"({second_name}) classes: {first} x {p:g} is not a whole number of classes. The "
                         f"nearest exact levels are {below} and {above}")
    if k > second:
        raise SplitError(f"graded level {level} swaps {k} classes, but the second family ({second_name}) has "
                         f"{second}: the highest level these families allow is {_fraction(second, first)}")
    return k


def _auto_rule(dataset_name: str, classes: Sequence[dict], superclass_order) -> str:
    if is_imagenet_1k(classes):
        return "paper-lists"
    if superclass_order and all(c.get("superclass") for c in classes):
        return "superclass"
    if all(WNID.match(c["id"]) for c in classes):
        return "wordnet"
    raise SplitError(f"dataset {dataset_name!r} has neither superclass tags nor wnid class ids, so no "
                     "man-made/natural split can be derived; use --kind file with --a-file/--b-file")


def _superclass_halves(dataset_name, classes, superclass_order):
    order = list(superclass_order or [])
    if len(order) != 2:
        raise SplitError(f"dataset {dataset_name!r} has superclass_order {superclass_order!r}; the superclass "
                         "rule needs exactly two (A, B). Use --kind file instead.")
    wrong = [f"{c['id']}={c.get('superclass')!r}" for c in classes if c.get("superclass") not in order]
    if wrong:
        raise SplitError(f"{len(wrong)} class(es) of {dataset_name!r} have a superclass outside {order}: "
                         f"{', '.join(wrong[:5])}{' …' if len(wrong) > 5 else ''}; fix the manifest's tags")
    a = [c["id"] for c in classes if c["superclass"] == order[0]]
    b = [c["id"] for c in classes if c["superclass"] == order[1]]
    return a, b, order


def man_made_by_wordnet(wnids: Sequence[str], wordnet=None) -> list[str]:
    """The wnids whose WordNet 3.0 noun synset has artifact.n.01 among its hypernyms (or is it)."""
    bad = [w for w in wnids if not WNID.match(w)]
    if bad:
        raise SplitError(f"the WordNet rule needs wnid class ids like 'n01440764'; got {bad[:5]}. "
                         "Use --rule superclass or --kind file.")
    wn = wordnet if wordnet is not None else load_wordnet()
    artifact = wn.synset("artifact.n.01")
    man = []
    for w in wnids:
        synset = wn.synset_from_pos_and_offset("n", int(w[1:]))
        if synset == artifact or artifact in synset.closure(lambda s: s.hypernyms()):
            man.append(w)
    return man


def wordnet_difference(classes: Sequence[dict], wordnet=None) -> dict:
    """Where the WordNet rule and the paper's man-made list disagree (ImageNet-1k classes only)."""
    known = _imagenet_by_id()
    unknown = [c["id"] for c in classes if c["id"] not in known]
    if unknown:
        raise SplitError(f"the paper's lists cover ImageNet-1k wnids only; {len(unknown)} class(es) are not "
                         f"among them: {', '.join(unknown[:5])}")
    ids = [c["id"] for c in classes]
    wn_man = set(man_made_by_wordnet(ids, wordnet))
    paper_man = {known[i]["id"] for i in ids if known[i]["superclass"] == "man-made"}

    def rows(wnids):
        return [{"index": known[w]["index"], "id": w, "name": known[w]["name"]} for w in sorted(wnids)]
    only_paper, only_wordnet = rows(paper_man - wn_man), rows(wn_man - paper_man)
    return {"wordnet_man_made": len(wn_man), "wordnet_natural": len(ids) - len(wn_man),
            "paper_man_made": len(paper_man), "paper_natural": len(ids) - len(paper_man),
            "count": len(only_paper) + len(only_wordnet),
            "man_made_in_paper_only": only_paper, "man_made_in_wordnet_only": only_wordnet}


def file_split(dataset_name: str, classes: Sequence[dict], path_a: str | os.PathLike, path_b: str | os.PathLike,
               A_name: str = "A", B_name: str = "B") -> Split:
    """Halves from two text files, one class per line: ids, or 0-based indices for wnid datasets.

    Blank lines and '#' comments are ignored. Integers are read as indices only where the class
    ids are wnids (ImageNet), so a folder dataset with numeric folder names stays unambiguous.
    """
    by_index = {str(c["index"]): c["id"] for c in classes} if all(WNID.match(c["id"]) for c in classes) else {}
    halves = [_read_class_file(p, by_index) for p in (path_a, path_b)]
    split = Split(dataset_name, "file", None, "file", A=halves[0], B=halves[1], A_name=A_name, B_name=B_name)
    validate_split(split, classes)
    return split


def _read_class_file(path, by_index: dict[str, str]) -> list[str]:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise SplitError(f"cannot read class file {path}: {e}") from e
    ids = []
    for line in text.splitlines():
        token = line.split("#", 1)[0].strip()
        if token:
            ids.append(by_index.get(token, token))
    unique = list(dict.fromkeys(ids))
    if len(unique) < len(ids):
        log.warning("class file %s lists %d class(es) more than once; each is kept once", path, len(ids) - len(unique))
    return unique


# -- checks and use --------------------------------------------------------------------------------

def validate_split(split: Split, classes: Sequence[dict], min_per_half: int = 1) -> None:
    """Raise SplitError unless A and B hold at least `min_per_half` classes each (the sweep asks 2), are
    disjoint and are made of the dataset's classes."""
    def few(xs):
        xs = sorted(xs)
        return ", ".join(xs[:5]) + (f" … ({len(xs)} in all)" if len(xs) > 5 else "")
    known = {c["id"] for c in classes}
    unknown = (set(split.A) | set(split.B)) - known
    if unknown:
        raise SplitError(f"split of {split.dataset!r} names {len(unknown)} class(es) the dataset does not have: "
                         f"{few(unknown)}; use the manifest's class ids (or 0-based indices for ImageNet)")
    overlap = set(split.A) & set(split.B)
    if overlap:
        raise SplitError(f"halves A and B of {split.dataset!r} share {len(overlap)} class(es): {few(overlap)}; "
                         "remove each from one of the two halves")
    for half, ids in (("A", split.A), ("B", split.B)):
        if not ids:
            raise SplitError(f"half {half} ({getattr(split, half + '_name')}) of {split.dataset!r} is empty; "
                             "give it at least one class")
        if len(set(ids)) != len(ids):
            raise SplitError(f"half {half} of {split.dataset!r} repeats classes; list each class once")
        if len(ids) < min_per_half:
            raise SplitError(f"half {half} ({getattr(split, half + '_name')}) of {split.dataset!r} holds "
                             f"{len(ids)} class ({', '.join(ids)}); a half needs at least {min_per_half} (top-1 "
                             "over one class says nothing): move classes into it")


def half_classes(split: Split, half: str) -> list[str]:
    """Sorted class ids of half 'A' or 'B'."""
    if half not in ("A", "B"):
        raise SplitError(f"unknown half {half!r}; expected 'A' or 'B'")
    return sorted(split.A if half == "A" else split.B)


def half_indices(split: Split, half: str, classes: Sequence[dict]) -> list[int]:
    """Sorted dataset labels of a half; position in this list is the half's remapped label (paper idxmap)."""
    index = {c["id"]: c["index"] for c in classes}
    return sorted(index[i] for i in half_classes(split, half))


# -- CLI: raytransfer split ------------------------------------------------------------------------

def add_split_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("dataset", help="'imagenet-1k' (class list ships with raytransfer) or a prepared "
                                        "dataset directory containing manifest.json")
    parser.add_argument("--kind", choices=KINDS, required=True,
                        help="similar: random halves; dissimilar: man-made vs natural (or superclasses); "
                             "graded: between the two, --level of A's classes from the second family; "
                             "file: halves from --a-file/--b-file")
    parser.add_argument("--level", default=None,
                        help="kind graded: the share of half A's classes swapped in from the second family, "
                             "0 (dissimilar) .. 1/2 (balanced random); a fraction such as 1/6 or a decimal")
    parser.add_argument("--seed", type=int, default=None,
                        help="numpy seed of a similar split (the paper's halves are seeds 0, 1, 2, 3) or of a "
                             "graded split's swaps")
    parser.add_argument("--rule", choices=DISSIMILAR_RULES, default="auto",
                        help="dissimilar rule; auto = paper-lists on ImageNet-1k, superclass on tagged "
                             "datasets, wordnet on other wnid datasets")
    parser.add_argument("--a-file", default=None, help="kind file: classes of half A, one id or index per line")
    parser.add_argument("--b-file", default=None, help="kind file: classes of half B, one id or index per line")
    parser.add_argument("--wordnet-dir", default=None,
                        help="WordNet 3.0 dict folder for the wordnet rule (default: nltk data, /usr/share/wordnet)")
    parser.add_argument("--out", required=True, help="split manifest to write (JSON)")
    return parser


def make_split(args: argparse.Namespace) -> tuple[Split, list[dict]]:
    """The Split that `raytransfer split` args describe, after checking flag combinations."""
    level = getattr(args, "level", None)
    if args.kind == "similar" and args.seed is None:
        raise SplitError(f"--kind similar needs --seed S (the paper's halves are seeds {list(PAPER_SEEDS)})")
    if args.kind == "graded" and (args.seed is None or level is None):
        raise SplitError("--kind graded needs --level P (such as 1/6) and --seed S (which classes are swapped)")
    if args.kind not in ("similar", "graded") and args.seed is not None:
        raise SplitError(f"--seed applies to --kind similar and graded only, not {args.kind}; drop it")
    if args.kind != "graded" and level is not None:
        raise SplitError(f"--level applies to --kind graded only, not {args.kind}; drop it")
    if args.kind not in ("dissimilar", "graded") and args.rule != "auto":
        raise SplitError(f"--rule applies to --kind dissimilar and graded only, not {args.kind}; drop it")
    if (args.kind == "file") != (args.a_file is not None and args.b_file is not None):
        raise SplitError("--kind file needs both --a-file and --b-file, and they apply to --kind file only")
    name, classes, superclass_order = load_classes(args.dataset)
    if args.kind == "similar":
        return similar_split(name, classes, args.seed), classes
    if args.kind == "file":
        return file_split(name, classes, args.a_file, args.b_file), classes
    wordnet = load_wordnet([args.wordnet_dir]) if args.wordnet_dir else None
    if args.kind == "graded":
        return graded_split(name, classes, level, args.seed, superclass_order, args.rule, wordnet=wordnet), classes
    return dissimilar_split(name, classes, superclass_order, args.rule, wordnet=wordnet), classes


def run_split(args: argparse.Namespace) -> int:
    """`raytransfer split`: write the split manifest and print a summary; 2 on bad input."""
    try:
        split, classes = make_split(args)
        difference = None
        if split.rule == "wordnet" and is_imagenet_1k(classes):
            wordnet = load_wordnet([args.wordnet_dir]) if args.wordnet_dir else None
            difference = wordnet_difference(classes, wordnet)
    except (SplitError, WordNetUnavailable) as e:
        print(f"raytransfer split: error: {e}", file=sys.stderr)
        return 2
    path = split.save(args.out)
    seed = f" seed {split.seed}" if split.seed is not None else ""
    seed += f" level {level_fraction(split)}" if split.level is not None else ""
    print(f"{split.kind} split of {split.dataset} ({split.rule}{seed}): "
          f"A {split.A_name} {len(split.A)} classes, B {split.B_name} {len(split.B)} classes")
    print(f"sha256 {split.sha256}")
    if difference is not None:
        print(f"WordNet rule vs the paper's lists: {difference['wordnet_man_made']}/{difference['wordnet_natural']} "
              f"vs {difference['paper_man_made']}/{difference['paper_natural']}; "
              f"{difference['count']} classes differ")
        for label, key in (("man-made in the paper only", "man_made_in_paper_only"),
                           ("man-made by WordNet only", "man_made_in_wordnet_only")):
            if difference[key]:
                print(f"  {label}: " + ", ".join(f"{r['index']} {r['name']}" for r in difference[key]))
    print(f"wrote {path}")
    return 0
