"""What a grid will cost, for --dry-run: GPU-hours from the step speed measured for the recipe itself.

The base step's speed is the one measured for the recipe's own precision, compile and batch
(raytransfer/step_costs.py: the paper's fp32 eager net at 12.6k img/s, not the compiled bf16 23.9k); a
frozen prefix scales it by its measured cost. The estimate assumes the input keeps up with that step and
says so: the pixel store feeds 231k img/s from GPU memory (one H200); FFCV decodes on the CPU at about
4-5k img/s per 16 cores, so a recipe reading FFCV is bound by its input, and the dry run prints that bound
too. No estimate for a recipe whose step was never measured (another architecture, width, crop or batch).
"""
from __future__ import annotations

from ..step_costs import relative_cost, step_speed

FFCV_IMG_PER_S_16_CORES = 4_100       # notes/ffcv.md 4.2: FFCV jpg, 16 workers, one H100 node


def job_images(recipe, train_images: int) -> int:
    """Training images a job sees (--until-plateau: at most, its cap)."""
    return recipe.total_steps(train_images) * recipe.batch_size


def print_estimate(jobs, done: dict, recipe, dataset, cpus_per_trial: float | None = None,
                   cohort_size: int | None = None):
    """GPU-hours of the jobs still to run at the recipe's measured step speed, one job a trial and in cohorts
    (`cohort_size`: at most that many jobs of one stream a trial; None: no cap), and what that assumes."""
    from ..recipes import recipe_from_dict

    todo = [j for j in jobs if j.key not in done and not j.is_diagnostic]   # diagnostics: forward passes only
    speed = step_speed(recipe)
    if speed is None:
        print(f"estimate: none for recipe {recipe.name} ({recipe.arch}, width {recipe.width:g}, {recipe.crop_size} px, "
              f"{'bf16' if recipe.bf16 else 'fp32'}{' compiled' if recipe.compile else ' eager'}, batch "
              f"{recipe.batch_size}): no step speed was measured for it (raytransfer/step_costs.py) "
              f"({len(todo)} jobs to run)")
        return
    per_class = _train_images_per_class(dataset)
    hours = images_total = 0.0
    for j in todo:
        own = recipe_from_dict(j.spec["recipe"])          # reduced_k jobs have their own solver
        images = job_images(own, min(per_class, j.k or per_class) * len(j.spec["target_classes"]))
        images_total += images
        hours += images / speed.img_per_s * relative_cost(j.treatment, j.n, speed) / 3600
    kind = f"{'bf16 + channels_last' if recipe.bf16 else 'fp32'}{', compiled' if recipe.compile else ', eager'}"
    print(f"estimate: {hours:.1f} GPU-hours for the {len(todo)} jobs to run at {speed.img_per_s:,.0f} img/s per base "
          f"step (recipe {recipe.name}: {kind}, batch {recipe.batch_size}; one {speed.card}, {speed.source}; frozen "
          f"prefixes scaled by their measured step costs)")
    cohort_hours, streams_read, cohorts = cohort_estimate(todo, recipe, per_class, speed, cohort_size)
    if cohort_size != 1:
        print(f"estimate: in cohorts (the jobs of one target half, recipe and seed trained from one stream, each "
              f"base's frozen layers run once a batch: {cohorts} trials): {cohort_hours:.1f} GPU-hours, "
              f"{cohort_hours / max(hours, 1e-9):.2f} of one job a trial (assumes a layer's backward costs twice its "
              "forward, to split the measured frozen costs; --cohort-size 1: one job a trial)")
    if recipe.input == "ffcv":
        cpus = cpus_per_trial or 12
        rate = FFCV_IMG_PER_S_16_CORES * cpus / 16
        asked = "" if cpus_per_trial else " (--cpus-per-trial not given: a g5.12xlarge's 12 per GPU)"
        read = streams_read if cohort_size != 1 else images_total
        print(f"estimate: input: FFCV decodes on the trial's {cpus:g} CPU(s){asked}, about {rate:,.0f} img/s at "
              f"{FFCV_IMG_PER_S_16_CORES:,} per 16 cores (notes/ffcv.md), below the step: bound by its input, these "
              f"jobs take at least {read / rate / 3600:.1f} GPU-hours")
    else:
        print("estimate: input: assumed to keep up -- the node's pixel store, cropped on the GPU (231k img/s from "
              "GPU memory on one H200, benchmarks/RESULTS.md); from host memory (a half larger than the GPU's free "
              "memory) its copy overlaps the step but was not yet measured on a GPU")


def cohort_estimate(todo, recipe, per_class: int, speed, cohort_size: int | None) -> tuple[float, float, int]:
    """(GPU-hours, images the cohorts read, cohorts) of the jobs in cohorts: one per stream and base they copy
    (the frozen members of one base share its trunk), at most `cohort_size` jobs each."""
    from ..cohort import stream_key
    from ..recipes import recipe_from_dict
    from ..step_costs import FROZEN, cohort_cost

    groups = {}
    for j in todo:
        source = j.base_key if j.treatment in FROZEN and j.base_key else ("random" if j.treatment in FROZEN else "")
        groups.setdefault((stream_key(j.spec), source), []).append(j)
    hours = images_read = 0.0
    count = 0
    for (_, source), members in groups.items():
        members.sort(key=lambda j: j.n)
        size = cohort_size or len(members)
        for chunk in (members[i:i + size] for i in range(0, len(members), size)):
            own = recipe_from_dict(chunk[0].spec["recipe"])
            images = job_images(own, min(per_class, chunk[0].k or per_class) * len(chunk[0].spec["target_classes"]))
            frozen = [j.n for j in chunk if source and j.treatment in FROZEN]
            cost = cohort_cost({source: frozen} if frozen else {}, len(chunk) - len(frozen), speed)
            hours += images / speed.img_per_s * cost / 3600
            images_read += images
            count += 1
    return hours, images_read, count


def _train_images_per_class(dataset) -> int:
    from ..prepare import read_manifest

    m = read_manifest(dataset.data_dir)
    return max(1, m["counts"]["train"]["images"] // max(1, len(m["classes"])))
