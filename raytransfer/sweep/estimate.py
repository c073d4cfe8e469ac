"""What a grid will cost, for --dry-run: GPU-hours from the measured step speeds.

A job's cost relative to a base step comes from the paper's K20 logs (frozen prefixes skip the
backward pass below the cut; ../shared/paper/README.md section 5); a base step's speed from the
H100 measurement in DESIGN.md (the paper's net compiled in bf16: 23.9k img/s at batch 256).
"""
from __future__ import annotations

# seconds per iteration on the paper's K20: all-trainable 1.77; frozen n = 1..7
K20_S_PER_ITER = {0: 1.77, 1: 1.48, 2: 1.19, 3: 1.01, 4: 0.83, 5: 0.69, 6: 0.66, 7: 0.65}
H100_BASE_IMG_PER_S = 23_900          # one H100, compiled bf16, batch 256 (DESIGN.md)


def relative_cost(frozen_layers: int) -> float:
    return K20_S_PER_ITER[frozen_layers] / K20_S_PER_ITER[0]


def job_images(recipe, train_images: int) -> int:
    return recipe.total_steps(train_images) * recipe.batch_size


def print_estimate(jobs, done: dict, recipe, dataset):
    """GPU-hours of the jobs still to run, at the H100 base speed (a lower bound: input can be slower)."""
    todo = [j for j in jobs if j.key not in done]
    per_class = _train_images_per_class(dataset)
    hours = 0.0
    for j in todo:
        images = job_images(recipe, per_class * len(j.spec["target_classes"]))
        frozen = j.n if j.treatment in ("AnB", "BnB", "random_frozen") else 0
        hours += images / H100_BASE_IMG_PER_S * relative_cost(frozen) / 3600
    print(f"estimate: {hours:.1f} GPU-hours for the {len(todo)} jobs to run at {H100_BASE_IMG_PER_S:,} img/s "
          f"per base step (one H100, recipe {recipe.name}; frozen prefixes scaled by the paper's step costs)")


def _train_images_per_class(dataset) -> int:
    from ..prepare import read_manifest

    m = read_manifest(dataset.data_dir)
    return max(1, m["counts"]["train"]["images"] // max(1, len(m["classes"])))
