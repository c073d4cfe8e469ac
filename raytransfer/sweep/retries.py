"""Why a trial restarted, in the job store: a preemption (not a failure: it does not spend --max-failures) or a
failure; and a trial Tune gives up on gets a failed record per job with its last error, so the summary and
`raytransfer status` say why.

    RetryNotes(storage)          # a Tune callback of the driver
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from ray import tune

from .store import JobStore

log = logging.getLogger("raytransfer.sweep")


def trial_keys(trial) -> list[str]:
    """The job keys a trial trains (its cohort), from its config."""
    config = getattr(trial, "config", None) or {}
    return [j["job_key"] for j in config.get("jobs", [])] or [k for k in [config.get("job_key")] if k]


class RetryNotes(tune.Callback):
    """What each retry of a trial was, in the job store: Tune does not count the death of a trial whose
    node was preempted against `--max-failures` (Trial._handle_ray_actor_error: a RayActorError with
    `preempted`, also as a task error's cause), so a recovery from such an error is noted as a preemption
    on that attempt, and the job's record counts `preemptions` apart from `attempts`. The decision reads
    the error Tune itself judged (the trial's pickled error), not a count: a trial that failed before it
    ever started is a failure. A trial Tune gives up on gets a failed record with its last error, so the
    summary and `status` say why (a rerun retries it). Ray Train trials (--workers-per-trial > 1) restart
    after a preemption inside Train, unseen here."""

    def __init__(self, storage: str):
        self.storage = storage

    def on_trial_recover(self, iteration, trials, trial, **info):
        if not preempted_error(_trial_error(trial)):
            return
        for key in trial_keys(trial):
            log.warning("%s: its node was preempted; it restarts from its last checkpoint (not a failure: "
                        "--max-failures is not spent)", key)
            try:
                JobStore(self.storage).note_preemption(key, _last_error_line(trial))
            except Exception as e:                 # a note, never a reason to stop the sweep
                log.warning("%s: its preemption was not noted in the job store (%s)", key, e)

    def on_trial_error(self, iteration, trials, trial, **info):
        specs = {j["job_key"]: j.get("spec") for j in trial.config.get("jobs", [])}
        for key in trial_keys(trial):
            try:
                store = JobStore(self.storage)
                if store.read(key) is None and key not in store.failed():
                    reason = (f"{_last_error_line(trial) or 'its trial errored'} (after {len(store.attempts(key))} "
                              f"attempt(s), {trial.run_metadata.num_failures} counted as failures; rerun the same "
                              "command to retry it)")
                    store.write_failed(key, {"config": specs.get(key, trial.config.get("spec")), "reason": reason,
                                             "metrics": {}, "attempts": len(store.attempts(key)),
                                             "finished_at": time.time()})
            except Exception as e:
                log.warning("%s: its failure was not recorded in the job store (%s)", key, e)


def preempted_error(exc) -> bool:
    """Tune's own rule for an error that does not spend --max-failures: an actor that died because its node
    was preempted, directly or as a task error's cause (unless RAY_TRAIN_COUNT_PREEMPTION_AS_FAILURE=1)."""
    from ray.exceptions import RayActorError, RayTaskError

    if isinstance(exc, RayTaskError):
        exc = exc.as_instanceof_cause()
    return (isinstance(exc, RayActorError) and bool(exc.preempted)
            and not int(os.environ.get("RAY_TRAIN_COUNT_PREEMPTION_AS_FAILURE", "0")))


def _trial_error(trial):
    """The error Tune pickled beside the trial when it last failed (None when there is none)."""
    import cloudpickle

    try:
        with open(trial.pickled_error_file, "rb") as f:
            return cloudpickle.load(f)
    except Exception:                               # no file, no path, an error class that does not load here
        return None


def _last_error_line(trial) -> str:
    """The last line of a trial's error trace (Tune's error.txt beside the trial), '' if none."""
    try:
        lines = [l.strip() for l in Path(trial.local_path, "error.txt").read_text().splitlines() if l.strip()]
        return lines[-1][:500] if lines else ""
    except (OSError, TypeError):
        return ""
