"""A job's outcome made durable: a done record with its final weights (a base's also to the registry), or a
failed record with the reason. Each member of a cohort gets its own, as if it had trained alone.

    outcome = record_outcome(store, key, spec, summary, trial, started)   # {"weights_uri": ...} or {"failure_reason": ...}
"""
from __future__ import annotations

import logging
import sys
import time

import ray

from .registry import publish
from .settings import TrialSettings
from .store import JobStore

log = logging.getLogger("raytransfer.sweep")


def record_outcome(store: JobStore, key: str, spec: dict, summary: dict, trial: TrialSettings, started: float) -> dict:
    """Make one job's outcome durable and return it for the trial's final report: a done record (`weights_uri`)
    or a failed one (`failure_reason`): a job whose trial could not run here (`summary["failure"]`) or whose
    frozen layers changed. A failed job is never a done row; its outcome has no `weights_uri`, so the searcher
    ends it without a retry (it would fail the same way). A cohort's member records its share of the cohort's
    device time (`cohort_share`: its own steps and its part of what the members shared), so GPU-hours add up."""
    from ..hosts import summary_metrics

    metrics = summary_metrics(summary) if "state_dict" in summary else {}
    reason = summary.get("failure")
    if reason is None and summary.get("frozen_check") is False:
        reason = (f"frozen layers changed during training ({', '.join(summary.get('frozen_mismatched', [])[:5])}): "
                  "the copied layers were not frozen, so this job is not a result")
    common = {"config": spec, "host": trial.host, "node_id": summary.get("node_id"),
              "gpus_held": summary.get("gpus_held"), "attempts": len(store.attempts(key)), "started_at": started,
              "finished_at": time.time(), "cohort_size": summary.get("cohort_size", 1),
              "cohort_share": summary.get("cohort_share", 1.0)}
    if reason is not None:
        log.error("%s failed: %s", key, reason)
        store.write_failed(key, {**common, "reason": reason, "metrics": metrics})
        return {"failure_reason": reason}
    uri = store.save_weights(key, summary["state_dict"])
    if spec["treatment"] in ("baseA", "baseB"):
        publish(trial.registry, key, uri)
    store.write(key, {**common, "metrics": metrics, "weights_uri": uri,
                      "base_weights_via": summary.get("base_weights_via"), "versions": versions()})
    return {"weights_uri": uri, **scalars(metrics)}


def done_before(record: dict) -> dict:
    """The outcome of a job whose record exists (the driver died after it landed): its output, never retrained."""
    if record.get("diagnostic"):
        return {"output_uri": record["output_uri"]}
    return {"weights_uri": record["weights_uri"], **scalars(record["metrics"])}


def scalars(metrics: dict) -> dict:
    """The scalar metrics of a final report, through the hosts' one rule (val_top1 = the final top-1),
    also for records written before that rule travelled with them."""
    from ..hosts import summary_metrics

    return {k: v for k, v in summary_metrics(metrics).items() if isinstance(v, (int, float, bool, str)) or v is None}


def versions() -> dict:
    import torch

    from .. import __version__
    out = {"raytransfer": __version__, "torch": torch.__version__, "ray": ray.__version__,
           "python": sys.version.split()[0]}
    try:
        from importlib.metadata import version
        out["ffcv"] = version("ffcv")
    except Exception:
        pass
    return out
