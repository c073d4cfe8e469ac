"""What a grid will cost, for --dry-run: GPU-hours from the measured step speeds.

A job's cost relative to a base step comes from the paper's K20 logs (frozen prefixes skip the
backward pass below the cut), a base step's speed from one H100 (raytransfer/step_costs.py). Both
are CaffeNet's; for another architecture the dry run says so instead of guessing.
"""
from __future__ import annotations

from ..step_costs import H100_BASE_IMG_PER_S, MEASURED_ARCH, relative_cost


def job_images(recipe, train_images: int) -> int:
    """Training images a job sees (--until-plateau: at most, its cap)."""
    return recipe.total_steps(train_images) * recipe.batch_size


def print_estimate(jobs, done: dict, recipe, dataset):
    """GPU-hours of the jobs still to run, at the H100 base speed (a lower bound: input can be slower)."""
    todo = [j for j in jobs if j.key not in done and not j.is_diagnostic]   # diagnostics: forward passes only
    if recipe.arch != MEASURED_ARCH:
        print(f"estimate: none for {recipe.arch}: step speeds were measured for {MEASURED_ARCH} only "
              f"({len(todo)} jobs to run)")
        return
    from ..recipes import recipe_from_dict

    per_class = _train_images_per_class(dataset)
    hours = 0.0
    for j in todo:
        own = recipe_from_dict(j.spec["recipe"])          # reduced_k jobs have their own solver
        images = job_images(own, min(per_class, j.k or per_class) * len(j.spec["target_classes"]))
        frozen = j.n if j.treatment in ("AnB", "BnB", "random_frozen") else 0
        hours += images / H100_BASE_IMG_PER_S * relative_cost(frozen) / 3600
    print(f"estimate: {hours:.1f} GPU-hours for the {len(todo)} jobs to run at {H100_BASE_IMG_PER_S:,} img/s "
          f"per base step (one H100, recipe {recipe.name}; frozen prefixes scaled by the paper's step costs)")


def _train_images_per_class(dataset) -> int:
    from ..prepare import read_manifest

    m = read_manifest(dataset.data_dir)
    return max(1, m["counts"]["train"]["images"] // max(1, len(m["classes"])))
