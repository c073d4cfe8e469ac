"""Trial folders go once their jobs' records are durable: the storage keeps records, final weights, TensorBoard
events per job and Tune's experiment state, not every trial's checkpoints and logs.

    callbacks = [TrialCleanup(storage)]; ...; remove_done_trial_folders(store, exp_path)
"""
from __future__ import annotations

import json
import shutil
import time

import pyarrow.fs
from ray import tune

from .retries import trial_keys
from .store import JobStore, _split_uri


class TrialCleanup(tune.Callback):
    """Once every job of a trial (its cohort) has a durable record, its Tune trial folder (checkpoints, logs)
    goes: in storage and in the driver's staging copy, which Tune would otherwise upload again at its next
    snapshot. A trial with a job that failed keeps its folder: it helps to see why.

    Not at once: until Tune's experiment snapshot in storage knows the trial ended, a driver killed
    now would be resumed (--resume) with that trial still running, and Tune would try to restore it
    from the deleted checkpoint. So a folder goes once a snapshot newer than the trial's end is in
    storage; `remove_done_trial_folders` takes whatever is left when the sweep ends."""

    def __init__(self, storage: str, check_every_s: float = 5.0):
        self.storage, self.check_every_s = storage, check_every_s
        self.pending, self.last_check = [], 0.0

    def on_trial_complete(self, iteration, trials, trial, **info):
        outcomes = json.loads((trial.last_result or {}).get("outcomes") or "{}")
        keys = list(outcomes) or trial_keys(trial)
        store = JobStore(self.storage)
        if keys and all(store.read(k) is not None for k in keys):
            self.pending.append((time.time(), trial))

    def on_step_end(self, iteration, trials, **info):
        if not self.pending or time.time() - self.last_check < self.check_every_s:
            return
        self.last_check = time.time()
        storage = self.pending[0][1].storage
        snapshot = _newest_snapshot(storage.storage_filesystem, storage.experiment_fs_path)
        keep = []
        for ended, trial in self.pending:
            if snapshot > ended + 1.0:                     # mtime resolution: a second to spare
                _remove_trial_folder(trial.storage.storage_filesystem, trial.path, trial.local_path)
            else:
                keep.append((ended, trial))
        self.pending = keep


def _newest_snapshot(fs, exp_path: str) -> float:
    infos = fs.get_file_info(pyarrow.fs.FileSelector(exp_path, allow_not_found=True))
    times = [i.mtime.timestamp() for i in infos if i.base_name.startswith("experiment_state") and i.mtime]
    return max(times, default=0.0)


def _remove_trial_folder(fs, path: str, local_path: str | None = None):
    try:
        fs.delete_dir(path)
    except (FileNotFoundError, OSError):
        pass
    if local_path:
        shutil.rmtree(local_path, ignore_errors=True)


def remove_done_trial_folders(store: JobStore, exp_path: str) -> int:
    """After the sweep (Tune's last snapshot written): the folder of every trial whose jobs are all done (its
    jobs read from the params.json Tune writes into it, so trials of an earlier driver count too)."""
    fs, root = _split_uri(exp_path)
    done, removed = store.completed(refresh=True), 0
    for info in fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True)):
        if info.type != pyarrow.fs.FileType.Directory:
            continue
        keys = _folder_jobs(fs, info.path) or [info.base_name.rsplit("_", 1)[0]]
        if all(k in done for k in keys):
            _remove_trial_folder(fs, info.path)
            removed += 1
    return removed


def _folder_jobs(fs, path: str) -> list[str]:
    """The job keys of a trial folder's config (params.json), [] where it has none."""
    try:
        with fs.open_input_stream(f"{path}/params.json") as f:
            config = json.loads(f.read())
    except (OSError, ValueError):
        return []
    return [j["job_key"] for j in config.get("jobs", []) if isinstance(j, dict)] or \
        [k for k in [config.get("job_key")] if k]
