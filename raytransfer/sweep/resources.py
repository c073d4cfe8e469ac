"""What a trial asks Tune for: a network's trial (its loop in the trial's process, or a Ray Train driver whose
workers ask for the GPUs) or a diagnostic's (one worker's CPUs and a share of a GPU: it trains nothing).

    trainable = tune.with_resources(run_trial_job, job_resources(plan, cpus_per_trial))
"""
from __future__ import annotations

import ray

from .jobs import is_diagnostic

DIAGNOSTIC_GPU_FRACTION = 0.25                     # a diagnostic runs small forward passes: a share of a GPU


def trial_resources(plan, cpus_per_trial: float) -> dict:
    """What one network's trial asks Tune for: its loop (host "process") or its Train driver."""
    if plan.host == "process":
        return {"CPU": cpus_per_trial, **({"GPU": plan.gpus_per_worker} if plan.gpus_per_worker else {})}
    if "TRAIN_DRIVER" in ray.cluster_resources():
        return {"CPU": 0, "TRAIN_DRIVER": 1}       # drivers on the on-demand head (cluster.yaml)
    return {"CPU": 0.01}


def diagnostic_resources(plan, cpus_per_trial: float) -> dict:
    """A diagnostic runs in its trial's process: one worker's CPUs, and a fraction of a GPU where trials get GPUs."""
    gpu = min(DIAGNOSTIC_GPU_FRACTION, plan.gpus_per_worker) if plan.gpus_per_worker else 0
    return {"CPU": cpus_per_trial, **({"GPU": gpu} if gpu else {})}


def job_resources(plan, cpus_per_trial: float):
    """Tune's per-trial resource request (tune.with_resources takes a function of the trial's config):
    a network's trial resources, or a diagnostic's."""
    from ray.tune.execution.placement_groups import resource_dict_to_pg_factory

    network = resource_dict_to_pg_factory(trial_resources(plan, cpus_per_trial))
    diagnostic = resource_dict_to_pg_factory(diagnostic_resources(plan, cpus_per_trial))

    def resources_of(config: dict):
        return diagnostic if is_diagnostic(str(config.get("treatment", ""))) else network
    return resources_of
