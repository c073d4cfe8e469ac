"""The built-in synthetic dataset: deterministic from a seed, no download, two families of classes.

Why it looks like this (measured in ../shared/notes/synthetic.md): the paper's effects need
- low-level statistics shared by every class (gradient backgrounds, low-frequency colour noise,
  clutter strokes, the same shape primitives, fill textures and colours, distractor parts from
  either family, pixel noise), so lower layers learn general features;
- mid-level structure specific to a family (each family builds its own part types from the shared
  primitives) and high-level structure specific to a superclass (a fixed layout of core parts);
- sibling classes inside a superclass that differ in one discriminating part (its type and place).
Random halves then share superclasses while the family halves (the dissimilar split, like
man-made vs natural on ImageNet) share none, so upper layers transfer worse across families.

    spec = SyntheticSpec(seed=0)
    classes = spec.classes()                      # [{"id", "name", "superclass", "group"}, ...]
    image, label = SyntheticImages(spec, "train")[0]   # uint8 HxWx3, int
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

FAMILIES = ("man-made", "natural")     # the dissimilar split's two halves, in the paper's order
PRIMITIVES = ("triangle", "square", "pentagon", "star", "ellipse", "cross", "bar", "diamond")
TEXTURES = ("solid", "stripes", "dots", "outline")


@dataclass(frozen=True)
class SyntheticSpec:
    """Everything that determines the dataset; its dict goes into the manifest and the fingerprint."""
    seed: int = 0
    superclasses_per_family: int = 4
    classes_per_superclass: int = 4
    train_per_class: int = 200
    val_per_class: int = 30
    size: int = 32                 # stored side in pixels (the demo trains on random 28 px crops)
    part_size: float = 0.30        # part diameter as a fraction of the side
    parts_per_family: int = 8
    version: int = 1               # bump when rendering changes: it changes the fingerprint

    @property
    def num_classes(self) -> int:
        return len(FAMILIES) * self.superclasses_per_family * self.classes_per_superclass

    def to_dict(self) -> dict:
        return asdict(self)

    def classes(self) -> list[dict]:
        """Class metadata in label order (ids sort in that order too)."""
        out = []
        for f, family in enumerate(FAMILIES):
            for s in range(self.superclasses_per_family):
                for c in range(self.classes_per_superclass):
                    out.append({"id": f"f{f}s{s}c{c}", "name": f"{family} superclass {s} variant {c}",
                                "superclass": family, "group": f"f{f}s{s}"})
        return out

    def world(self) -> "World":
        return World(self)


class World:
    """The class hierarchy drawn from the seed: part types, superclass layouts, sibling differences."""

    def __init__(self, spec: SyntheticSpec):
        rng = np.random.default_rng([spec.seed, 7919])
        self.spec = spec
        # part types: family-specific combinations of the shared primitives and textures
        self.parts = []          # parts[family][k] = (primitive, aspect, angle, texture)
        for _ in FAMILIES:
            fam = []
            while len(fam) < spec.parts_per_family:
                p = (PRIMITIVES[rng.integers(len(PRIMITIVES))], float(rng.uniform(0.5, 1.0)),
                     float(rng.uniform(0, 180)), TEXTURES[rng.integers(len(TEXTURES))])
                if all(p[0] != q[0] or p[3] != q[3] for q in fam):
                    fam.append(p)
            self.parts.append(fam)
        # classes: a superclass layout (3 core slots with part types) + one discriminating slot
        self.layouts = []        # per label: list of (x, y, part, scale) in object coordinates [-1, 1]
        for f in range(len(FAMILIES)):
            for _s in range(spec.superclasses_per_family):
                core_xy = _spread_points(rng, 3)
                core_parts = rng.choice(spec.parts_per_family, 3, replace=False)
                disc_parts = rng.choice(spec.parts_per_family, spec.classes_per_superclass, replace=False)
                disc_slot = _spread_points(rng, 1, avoid=core_xy)[0]
                for c in range(spec.classes_per_superclass):
                    offset = 0.35 * np.array([math.cos(2 * math.pi * c / spec.classes_per_superclass),
                                              math.sin(2 * math.pi * c / spec.classes_per_superclass)])
                    slots = [(x, y, self.parts[f][k], 1.0) for (x, y), k in zip(core_xy, core_parts)]
                    dx, dy = disc_slot + offset
                    slots.append((dx, dy, self.parts[f][disc_parts[c]], 1.15))
                    self.layouts.append(slots)

    def render(self, label: int, rng: np.random.Generator) -> np.ndarray:
        """One image of class `label`: background, clutter, distractors, the object, noise."""
        spec, size = self.spec, self.spec.size
        img = _background(rng, size)
        draw = ImageDraw.Draw(img)
        for _ in range(rng.integers(1, 4)):                      # clutter strokes, family-agnostic
            pts = [tuple(rng.uniform(0, size, 2)) for _ in range(2)]
            draw.line(pts, fill=_colour(rng), width=int(rng.integers(1, 3)))
        part_px = spec.part_size * size
        for _ in range(rng.integers(0, 2)):                      # distractor parts from either family
            fam = self.parts[rng.integers(len(FAMILIES))]
            _draw_part(draw, rng, fam[rng.integers(len(fam))], rng.uniform(0, size, 2), 0.6 * part_px)
        centre = size / 2 + rng.uniform(-0.08, 0.08, 2) * size     # the object, with jitter
        scale = rng.uniform(0.85, 1.1) * size * 0.30
        rot = math.radians(rng.uniform(-20, 20))
        cos, sin = math.cos(rot), math.sin(rot)
        for x, y, part, s in self.layouts[label]:
            xy = centre + scale * np.array([cos * x - sin * y, sin * x + cos * y])
            _draw_part(draw, rng, part, xy, part_px * s * rng.uniform(0.85, 1.15), extra_angle=math.degrees(rot))
        arr = np.asarray(img, dtype=np.int16)
        arr = arr + rng.normal(0, 6, arr.shape).astype(np.int16)   # pixel noise
        return np.clip(arr, 0, 255).astype(np.uint8)


class SyntheticImages:
    """An indexed dataset (what FFCV's DatasetWriter reads): sample i -> (HxWx3 uint8, label)."""

    def __init__(self, spec: SyntheticSpec, split: str):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', not {split!r}")
        self.spec, self.split = spec, split
        self.per_class = spec.train_per_class if split == "train" else spec.val_per_class
        self._world = None

    def __len__(self):
        return self.spec.num_classes * self.per_class

    def __getitem__(self, i):
        if self._world is None:            # built lazily: cheap to pickle into writer processes
            self._world = self.spec.world()
        label = i % self.spec.num_classes  # interleaved classes: every prefix is balanced
        rng = np.random.default_rng([self.spec.seed, 0 if self.split == "train" else 1, i])
        return self._world.render(label, rng), label

    def labels(self) -> np.ndarray:
        return np.arange(len(self)) % self.spec.num_classes


def _spread_points(rng, k, avoid=(), min_dist=0.7):
    pts = []
    while len(pts) < k:
        p = rng.uniform(-1, 1, 2)
        if all(np.linalg.norm(p - q) >= min_dist for q in list(pts) + list(avoid)):
            pts.append(p)
    return np.array(pts)


def _colour(rng):
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def _background(rng, size):
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size] / size
    t = (math.cos(angle) * xx + math.sin(angle) * yy)
    t = (t - t.min()) / (np.ptp(t) + 1e-6)
    img = a[None, None] * (1 - t[..., None]) + b[None, None] * t[..., None]
    coarse = rng.uniform(0, 1, (4, 4, 3)).astype(np.float32)     # low-frequency colour noise
    smooth = np.stack([np.asarray(Image.fromarray(coarse[..., k], mode="F").resize((size, size), Image.BILINEAR))
                       for k in range(3)], -1)
    img += 60 * (smooth - 0.5)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _shape_points(primitive, aspect, r):
    if primitive == "ellipse":
        angles = np.linspace(0, 2 * math.pi, 16, endpoint=False)
        return np.stack([np.cos(angles), aspect * np.sin(angles)], 1) * r
    if primitive == "star":
        angles = np.linspace(0, 2 * math.pi, 10, endpoint=False)
        rad = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return np.stack([rad * np.cos(angles), rad * np.sin(angles)], 1) * r
    if primitive == "cross":
        a, b = 1.0, 0.35
        pts = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b)]
        return np.array(pts) * r * np.array([1.0, aspect])
    if primitive == "bar":
        return np.array([(-1, -0.3), (1, -0.3), (1, 0.3), (-1, 0.3)]) * r
    sides = {"triangle": 3, "square": 4, "pentagon": 5, "diamond": 4}[primitive]
    start = math.pi / 4 if primitive == "square" else math.pi / 2
    angles = start + np.linspace(0, 2 * math.pi, sides, endpoint=False)
    return np.stack([np.cos(angles), (aspect if primitive == "diamond" else 1.0) * np.sin(angles)], 1) * r


def _draw_part(draw, rng, part, xy, diameter, extra_angle=0.0):
    primitive, aspect, angle, texture = part
    pts = _shape_points(primitive, aspect, diameter / 2)
    th = math.radians(angle + extra_angle + rng.uniform(-10, 10))
    rot = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    poly = [tuple(p) for p in pts @ rot.T + np.asarray(xy)]
    fill, ink = _colour(rng), _colour(rng)
    if texture == "outline":
        draw.polygon(poly, outline=fill, width=2)
        return
    draw.polygon(poly, fill=fill)
    if texture == "stripes":
        d = diameter / 2
        for k in (-0.5, 0.0, 0.5):
            a = np.array([k * d, -d]) @ rot.T + xy
            b = np.array([k * d, d]) @ rot.T + xy
            draw.line([tuple(a), tuple(b)], fill=ink, width=1)
    elif texture == "dots":
        for _ in range(3):
            c = np.asarray(xy) + rng.uniform(-0.25, 0.25, 2) * diameter
            draw.point(tuple(c), fill=ink)
