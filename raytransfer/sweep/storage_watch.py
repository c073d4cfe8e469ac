"""The driver's watch on its storage while Tune runs: the job store's index kept current as records land, and
the Tune loop ended once the storage stayed away for the whole wait (the runner then says so, with --resume).

    callbacks = [JobIndexKeeper(storage), StorageWatch(storage)]
"""
from __future__ import annotations

import logging
import time

from ray import tune

from .storage import StorageUnavailable, resume_hint, unavailable
from .store import JobStore

log = logging.getLogger("raytransfer.sweep")


class JobIndexKeeper(tune.Callback):
    """Keeps the job store's index (index.py) current as records land, so `raytransfer status` reads one
    file: at most every `every_s` seconds after a trial ended, and once when the sweep ends. Each refresh
    lists the record folders and reads only the new records; a failure only logs (the index is a cache)."""

    def __init__(self, storage: str, every_s: float = 30.0):
        self.storage, self.every_s = storage, every_s
        self.dirty, self.last = False, 0.0

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.dirty = True

    def on_trial_error(self, iteration, trials, trial, **info):
        self.dirty = True

    def on_step_end(self, iteration, trials, **info):
        if self.dirty and time.time() - self.last >= self.every_s:
            self._refresh()

    def on_experiment_end(self, trials, **info):
        if self.dirty:
            self._refresh()

    def _refresh(self):
        from .index import refresh

        self.last = time.time()
        try:
            refresh(JobStore(self.storage))
            self.dirty = False
        except Exception as e:                       # a storage hiccup: the next refresh catches up
            log.warning("job store index not refreshed: %s", e)


class StorageWatch(tune.Callback):
    """Ends the Tune loop once this driver gave up on the storage (it did not answer for the whole wait
    budget: Tune's snapshot, a heartbeat or a record read): the runner then says so, with --resume."""

    def __init__(self, storage: str):
        self.storage = storage

    def on_step_end(self, iteration, trials, **info):
        if unavailable(self.storage):
            raise StorageUnavailable(resume_hint(self.storage))
