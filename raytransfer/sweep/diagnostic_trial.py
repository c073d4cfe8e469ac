"""A diagnostic job's trial: in the trial's own process (whatever --host says: it trains nothing), read the
nets it depends on (a base from the object store, others from storage), compute its rows, make them durable
as the job's record.

    outcome = run_diagnostic_job(store, job, trial, started)    # {"output_uri": its record}
"""
from __future__ import annotations

import time

from .outcomes import versions
from .settings import TrialSettings
from .store import JobStore
from .registry import load_base_weights


def run_diagnostic_job(store: JobStore, job: dict, trial: TrialSettings, started: float) -> dict:
    """The diagnostic's rows as its record; its outcome names that record (`output_uri`): the searcher's done."""
    import torch

    from ..diagnose import run_diagnostic
    from ..hosts import ensure_dataset, gpus_held, node_id, training_device

    key, spec = job["job_key"], job["spec"]
    torch.set_num_threads(max(1, int(trial.cpus_per_trial)))
    attempt = store.count_attempt(key, {"node_id": node_id(), "host": "process"})
    held = gpus_held()
    device = training_device(held)
    ensure_dataset(spec)
    uris = job.get("base_uris", {})
    rows = run_diagnostic(spec, lambda k: load_base_weights(trial.registry, k, uris[k], trial.storage)[0], device)
    finished = time.time()
    metrics = {"wall_s": finished - started, "rows": len(rows), "device": str(device)}
    uri = store.record_uri(key)
    store.write(key, {"config": spec, "diagnostic": True, "rows": rows, "output_uri": uri, "metrics": metrics,
                      "host": "process", "node_id": node_id(), "gpus_held": held, "attempts": attempt,
                      "started_at": started, "finished_at": finished, "versions": versions()})
    return {**metrics, "output_uri": uri}
