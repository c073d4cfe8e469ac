"""Training recipes: the paper's solver, a fast GPU recipe, and CPU-sized demo/smoke recipes.

A recipe is everything about *how* a net is trained (network scale, crop, optimiser, schedule,
precision); it is part of every job's key and every result row. Schedules are expressed as
fractions of the run, so a shorter budget keeps the paper's shape.

    recipe = get_recipe("paper")
    lr = recipe.lr_at(step, total_steps)
"""
from __future__ import annotations

import math
import dataclasses
from dataclasses import asdict, dataclass, replace


class RecipeError(ValueError):
    """A recipe that cannot train, or a --set the recipe's fields do not take: the user's input."""


@dataclass(frozen=True)
class Recipe:
    name: str
    # network
    arch: str = "caffenet"
    width: float = 1.0                 # channel multiplier (1.0 = the paper's net)
    fc_width: float | None = None      # fc6/fc7 multiplier; defaults to width
    init: str = "paper"                # 'paper' (Caffe's N(0, 0.01)...) or 'kaiming'
    dropout: float = 0.5               # on fc6/fc7 (paper: 0.5, kept on when those layers are frozen)
    stem_stride: int = 1               # CaffeNet below 160 px: conv1's stride (2: a quarter of the compute)
    norm: str = "lrn"                  # CaffeNet: 'lrn' (the paper's local response norm after conv1/conv2) or
                                       # 'batch' (batch norm in every layer but fc8: converges in a CPU budget)
    head_outputs: int | None = None    # fc8's outputs: None = one per class of the target (N-way); the paper:
                                       # 1000 for every task, the unused logits staying in the softmax
    independent_bases: bool = False    # baseA and baseB from independent inits (the paper); False: one init stream
    # data
    crop: str = "paper"                # 'paper': random crop_size square of the resize_size image + mirror; 'rrc'
    crop_size: int = 227
    resize_size: int = 256             # side of the square image crops are cut from (paper: 256); a dataset
                                       # stored at another side is resized to it in the loader (FFCV: each
                                       # crop, every step; the memory input: each image once, as it is held)
    input: str = "ffcv"                # 'ffcv': FFCV decodes at every step; 'pixel_store': the node's uint8 store
                                       # of the dataset, cropped on the device from a seeded generator (no decoding
                                       # at train time, reproducible reruns: pixel_store.py, device_input.py);
                                       # 'memory': the demo's name for the pixel store (its job keys)
    normalize: str = "mean_std"        # 'mean_std': (x - channel mean) / channel std; 'mean_image': x - the base
                                       # dataset's mean image at 0..255 scale, nothing divided (the paper)
    random_frozen_on: str = "half"     # random_frozen's target: 'half' (vs that half's base) or 'whole' (all
                                       # classes, vs netbase: the paper)
    # optimiser (paper: SGD momentum 0.9, wd 5e-4, lr 0.01 at batch 256; biases lr x2, no decay)
    batch_size: int = 256              # global, over all workers
    lr: float = 0.01                   # at `batch_size`
    momentum: float = 0.9
    weight_decay: float = 5e-4
    bias_lr_mult: float = 2.0
    copied_lr_mult: float = 1.0        # fine-tuned copied layers; paper: 1 (full lr, full schedule)
    solver: str = "torch"              # 'torch': torch.optim.SGD (v = m v + g; w -= lr v); 'caffe': Caffe's SGD, the
                                       # paper's (v = m v + lr g; w -= v): the two differ after every change of lr
    label_smoothing: float = 0.0
    # schedule
    iterations: int | None = None      # fixed number of steps (paper: 450k) ...
    epochs: float | None = None        # ... or a number of passes over the target half
    schedule: str = "step"             # 'step': x gamma at `milestones`; 'cosine'; 'plateau' (--until-plateau)
    until_plateau: int | None = None   # 'plateau': train until validation top-1 plateaus, x gamma, again, stop after
                                       # len(milestones) decays; at most this many epochs (the cap)
    milestones: tuple = (100 / 450, 200 / 450, 300 / 450, 400 / 450)   # paper: 100k..400k of 450k
    gamma: float = 0.1
    warmup_fraction: float = 0.0
    evals_per_epoch: int = 1           # validation passes per epoch (top1_best10 = mean of the 10 best) ...
    eval_every_iters: int | None = None  # ... or one every this many iterations (paper: 1000, 450 in all)
    # speed
    bf16: bool = False                 # autocast on CUDA
    channels_last: bool = False
    compile: bool = False

    def total_steps(self, train_samples: int) -> int:
        """Steps of the run (until_plateau: at most, the cap's epochs)."""
        if self.until_plateau:
            return max(1, self.until_plateau * (train_samples // self.batch_size))
        if self.iterations:
            return self.iterations
        return max(1, int(math.ceil(self.epochs * (train_samples // self.batch_size))))

    def lr_at(self, step: int, total: int) -> float:
        """Learning rate at `step` of `total` (pure function; warm-up then step or cosine decay)."""
        frac = step / max(1, total)
        if self.warmup_fraction and frac < self.warmup_fraction:
            return self.lr * (frac / self.warmup_fraction)
        if self.schedule == "step":
            return self.lr * self.gamma ** sum(frac >= m for m in self.milestones)
        if self.schedule == "plateau":           # the loop lowers it level by level (convergence.plateau_state)
            return self.lr
        if self.schedule == "cosine":
            w = self.warmup_fraction
            return self.lr * 0.5 * (1 + math.cos(math.pi * (frac - w) / max(1e-9, 1 - w)))
        raise ValueError(f"unknown schedule {self.schedule!r}; expected 'step', 'cosine' or 'plateau'")

    def check(self):
        """One clear error for a recipe that cannot train (e.g. an override through --set or a sweep file)."""
        choices = {"schedule": ("step", "cosine", "plateau"), "crop": ("paper", "rrc"), "norm": ("lrn", "batch"),
                   "init": ("paper", "kaiming"), "input": INPUTS, "arch": ("caffenet", "resnet18"),
                   "solver": ("torch", "caffe")}
        for field_name, allowed in choices.items():
            if getattr(self, field_name) not in allowed:
                raise RecipeError(f"recipe {self.name}: {field_name} {getattr(self, field_name)!r}; expected one of "
                                  f"{', '.join(allowed)}")
        if (self.schedule == "plateau") != bool(self.until_plateau) or (self.until_plateau or 0) < 0:
            raise RecipeError(f"recipe {self.name}: schedule 'plateau' goes with until_plateau = the most epochs a "
                              "net may train (--until-plateau EPOCHS sets both)")
        if not 0 < self.crop_size <= self.resize_size:
            raise RecipeError(f"recipe {self.name}: crop_size {self.crop_size} must be in 1..resize_size "
                              f"({self.resize_size}): crops are cut from the resize_size square")
        if self.normalize not in NORMALIZE:
            raise RecipeError(f"recipe {self.name}: normalize {self.normalize!r}; expected {' or '.join(NORMALIZE)}")
        if self.normalize == "mean_image" and self.crop != "paper":
            raise RecipeError(f"recipe {self.name}: normalize 'mean_image' subtracts the mean image under the same "
                              f"crop as the image, which only the 'paper' crop has (got crop {self.crop!r})")
        if self.random_frozen_on not in ("half", "whole"):
            raise RecipeError(f"recipe {self.name}: random_frozen_on {self.random_frozen_on!r}; expected half or whole")
        if self.eval_every_iters is not None and self.eval_every_iters < 1:
            raise RecipeError(f"recipe {self.name}: eval_every_iters must be >= 1 (or None: evals_per_epoch)")
        positive = {"batch_size": self.batch_size, "lr": self.lr, "width": self.width, "evals_per_epoch": self.evals_per_epoch}
        for field_name, value in positive.items():
            if not value > 0:
                raise RecipeError(f"recipe {self.name}: {field_name} must be > 0 (got {value})")
        if not (self.iterations or 0) > 0 and not (self.epochs or 0) > 0 and not self.until_plateau:
            raise RecipeError(f"recipe {self.name}: set iterations or epochs to a positive number")

    def arch_kwargs(self, resolution: int | None = None) -> dict:
        kw = {"width": self.width, "resolution": resolution or self.crop_size}
        if self.arch == "caffenet":
            kw.update(fc_width=self.fc_width, init=self.init, dropout=self.dropout, norm=self.norm,
                      stem_stride=self.stem_stride)
        return kw

    def to_dict(self) -> dict:
        d = asdict(self)
        d["milestones"] = list(d["milestones"])
        return d

    def identity(self) -> dict:
        """What a job key hashes: the fields, less those added later and left at their old behaviour
        (KEY_NEUTRAL_DEFAULTS), with the head written as before (`head: half`): recipes they do not change
        keep their keys."""
        d = self.to_dict()
        for k, default in KEY_NEUTRAL_DEFAULTS.items():
            if k in d and d[k] == default:
                del d[k]
        if "head_outputs" not in d:
            d["head"] = "half"
        return d


NORMALIZE = ("mean_std", "mean_image")
INPUTS = ("ffcv", "pixel_store", "memory")     # the input paths a recipe may name (loaders.py)
# Fields added after job keys existed, at the value that reproduces the behaviour every recipe had before
# them: left out of a key there, so only recipes that set them get new keys. A field added later joins here.
KEY_NEUTRAL_DEFAULTS = {"normalize": "mean_std", "head_outputs": None, "eval_every_iters": None,
                     "independent_bases": False, "random_frozen_on": "half", "norm": "lrn",
                     "until_plateau": None, "input": "ffcv", "stem_stride": 1, "solver": "torch"}
# The paper's protocol, item by item (docs/paper_protocol.md): mean image at 0..255, 1000-way fc8, independent
# bases, a test every 1000 iterations, random frozen layers on all classes against netbase, Caffe's SGD.
PAPER = dict(normalize="mean_image", head_outputs=1000, independent_bases=True, eval_every_iters=1000,
             random_frozen_on="whole", solver="caffe")

RECIPES = {
    # The paper: 450k iterations at batch 256 (~179 epochs of a 645k-image half), x0.1 every 100k.
    # Both paper recipes and fast read the node's pixel store (no decoding at train time: FFCV's CPU decode feeds
    # a GPU step about 5x too slowly, DESIGN.md); new keys for them, as their batches changed.
    "paper": Recipe("paper", iterations=450_000, input="pixel_store", **PAPER),
    # The paper's reduced-volume nets (first k images of each class, all classes): lr 0.0125, x0.1 every 64k of 200k.
    "paper_reduced": Recipe("paper_reduced", iterations=200_000, lr=0.0125, milestones=(64 / 200, 128 / 200, 192 / 200),
                            input="pixel_store", **PAPER),
    # Same net, bf16 + channels_last + torch.compile on CUDA, batch 1024 with linear lr scaling and
    # warm-up, label smoothing, random-resized crops, a cosine schedule over 30 epochs.
    "fast": Recipe("fast", crop="rrc", batch_size=1024, lr=0.04, epochs=30, schedule="cosine",
                   warmup_fraction=0.05, label_smoothing=0.1, bf16=True, channels_last=True, compile=True,
                   input="pixel_store"),
    # CPU-sized: the same 8 named layers at 1/8 width on 30 px crops of 32 px images (the synthetic images'
    # own size; other datasets are resized to 32 px in the loader), trained to convergence in a CPU budget
    # (measured, benchmarks/RESULTS.md): batch norm in place of LRN (with LRN the net was still rising after
    # 40 epochs), no dropout (it stalls learning at this width), conv1 at stride 2 (1.8x the throughput),
    # the half held in memory with seeded crops (a rerun is the same computation; frozen layers run once per
    # crop: frozen_prefix.py); batch 64 (1.3x the images a second of batch 32). 128 epochs of the demo's
    # 1,152-image half, x0.1 at 60 % and 70 %: a long high-rate phase, then 30 % at the final rate, where the
    # convergence rule's two windows (70-80 %, 90-100 %) both fall. With 48 epochs (x0.1 at 50 % and 70 %)
    # every base was flat at its end, yet a second full schedule from its own weights gained 5 points and a
    # base trained for 192 epochs stood 11 points higher: fine-tuned nets were measuring that extra training.
    "demo": Recipe("demo", width=0.125, fc_width=0.0625, init="kaiming", dropout=0.0, norm="batch", stem_stride=2,
                   input="memory", crop_size=30, resize_size=32, batch_size=64, lr=0.1, warmup_fraction=0.05,
                   epochs=128, milestones=(0.6, 0.7), evals_per_epoch=1, channels_last=True),
    # The demo with the paper's normalisation (issue 24): LRN after conv1/conv2 and no batch norm, dropout 0.5 on
    # fc6/fc7 (on where those layers are frozen), otherwise the demo's net, input, batch and schedule shape. Without
    # batch norm the net learns slowly: SGD 0.1 stays at chance, 0.01 is the fastest rate that learns; at 128 epochs
    # a base was still rising and a second schedule from its weights gained 9 points, at 256 epochs +1.9..+4.7,
    # at 384 epochs -0.3..+1.5 (three bases, each converged by the rule; benchmarks/RESULTS.md, "The paper's
    # normalisation and co-adaptation"). 3x the demo's cost per net; dropout leaves a frozen fc7 to run each step.
    "demo_lrn": Recipe("demo_lrn", width=0.125, fc_width=0.0625, init="kaiming", dropout=0.5, norm="lrn",
                       stem_stride=2, input="memory", crop_size=30, resize_size=32, batch_size=64, lr=0.01,
                       warmup_fraction=0.05, epochs=384, milestones=(0.6, 0.7), evals_per_epoch=1,
                       channels_last=True),
    # For tests and trying things out: the demo's layers, a few epochs (not converged: a smoke test of the
    # code), at conv1 stride 1 on 28 px crops read from the pixel store, the input path of the paper's recipes (a
    # trial on a node that has the store imports no FFCV: it starts in under a second, not ~15 s of FFCV's numba
    # compiles). FFCV, the fallback where no store can be written, is `--set input=ffcv` (tests/test_sweep.py).
    "smoke": Recipe("smoke", width=0.125, fc_width=0.0625, init="kaiming", dropout=0.0, norm="batch", crop_size=28,
                    resize_size=32, batch_size=32, lr=0.05, warmup_fraction=0.05, epochs=3, milestones=(0.7,),
                    evals_per_epoch=2, channels_last=True, input="pixel_store"),
}


def get_recipe(name: str, **overrides) -> Recipe:
    if name not in RECIPES:
        raise RecipeError(f"unknown recipe {name!r}; expected one of {', '.join(RECIPES)}")
    recipe = RECIPES[name]
    unknown = set(overrides) - set(recipe.to_dict())
    if unknown:
        raise RecipeError(f"unknown recipe field(s) {sorted(unknown)}; known: {', '.join(recipe.to_dict())}")
    recipe = replace(recipe, **overrides)
    recipe.check()
    return recipe


# The recipe the reduced_k jobs of a sweep use: the paper's reduced solver at paper scale, else the sweep's own.
REDUCED_RECIPE = {"paper": "paper_reduced"}


def reduced_recipe(recipe: Recipe) -> Recipe:
    """The reduced-volume solver of `recipe`, with every field the sweep changed in `recipe` (--arch,
    --until-plateau, --set) changed alike: an override applies to every recipe a sweep runs."""
    name = REDUCED_RECIPE.get(recipe.name)
    return recipe if name is None else replace(RECIPES[name], **changed_fields(recipe))


def changed_fields(recipe: Recipe) -> dict:
    """The fields of `recipe` that differ from the built-in recipe of its name (its overrides)."""
    built_in = RECIPES[recipe.name].to_dict()
    return {k: getattr(recipe, k) for k, v in recipe.to_dict().items() if k != "name" and built_in.get(k) != v}


def describe_changes(recipe_dict: dict) -> str:
    """A results row's `recipe_set`: the overrides of a recipe as FIELD=VALUE;... ('' for the recipe as built in;
    the arch has its own column)."""
    recipe = recipe_from_dict(recipe_dict)
    if recipe.name not in RECIPES:
        return ""
    return ";".join(f"{k}={_text(v)}" for k, v in sorted(changed_fields(recipe).items()) if k != "arch")


def _text(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


# --set FIELD=VALUE: a field's type, from its annotation, and how the command line writes it.
_PARSERS = {"str": str, "int": int, "float": float}
_TRUE, _FALSE, _NONE = ("true", "yes", "1", "on"), ("false", "no", "0", "off"), ("none", "null", "")


def parse_overrides(items) -> dict:
    """--set FIELD=VALUE (repeatable) as recipe fields, each checked against the recipe's fields and types:
    one clear error naming the field and the known ones. A later --set of a field wins."""
    fields = {f.name: f.type for f in dataclasses.fields(Recipe) if f.name != "name"}
    out = {}
    for item in items or ():
        field_name, sep, text = str(item).partition("=")
        field_name = field_name.strip().replace("-", "_")
        if not sep or not field_name:
            raise RecipeError(f"--set {item!r}: write FIELD=VALUE, e.g. --set iterations=300 (fields: "
                              f"`raytransfer recipes`)")
        if field_name not in fields:
            raise RecipeError(f"--set {item}: unknown recipe field {field_name!r}; known: {', '.join(fields)}")
        out[field_name] = _parse_field(field_name, fields[field_name], text.strip())
    return out


def _parse_field(name: str, annotation: str, text: str):
    kinds = [k.strip() for k in str(annotation).split("|")]
    if "None" in kinds and text.lower() in _NONE:
        return None
    kind = next(k for k in kinds if k != "None")
    try:
        if kind == "bool":
            if text.lower() not in _TRUE + _FALSE:
                raise ValueError
            return text.lower() in _TRUE
        if kind == "tuple":
            return tuple(float(v) for v in text.split(",") if v.strip())
        return _PARSERS[kind](text)
    except ValueError:
        example = {"bool": "true or false", "tuple": "comma-separated numbers, e.g. 0.6,0.7", "int": "an integer",
                   "float": "a number", "str": "a word"}[kind]
        raise RecipeError(f"--set {name}={text}: {name} takes {example}"
                          + (", or none" if "None" in kinds else "")) from None


def recipe_from_dict(d: dict) -> Recipe:
    d = dict(d)
    d["milestones"] = tuple(d.get("milestones", ()))
    if d.pop("head", "half") != "half":          # records written before head_outputs: 'half' was the only N-way
        raise ValueError("a recipe with head 'paper' predates head_outputs: set head_outputs (e.g. 1000) instead")
    return Recipe(**d)
