"""The dependency-aware Searcher: releases a job the moment everything it depends on is done.

Tune calls `suggest()` about every 0.1 s; it returns a job's config when one is ready, None while
jobs wait for their bases, and FINISHED once every job is handed out or the rest can never run
(their base failed for good) -- never hanging `Tuner.fit()`. "Done" is seeded from the durable job
store, so finished jobs are never handed out again; state survives `Tuner.restore` (save/restore).

    searcher = DependencySearcher(jobs, done=store.completed(), release=lambda base_key: ...)

`release(base_key)` is called once every job of the sweep that depends on that base has ended (done
or failed for good): the driver then frees the base's object-store copy. A diagnostic depends on every
net it reads (Job.deps), so a base read by a diagnostic stays until that diagnostic ended too. A job is
done when its final report names its output: `weights_uri` (a network) or `output_uri` (a diagnostic's
record of rows).
"""
from __future__ import annotations

import heapq
import logging
import pickle

from ray.tune.search import Searcher

log = logging.getLogger(__name__)


class DependencySearcher(Searcher):
    """Each decision costs what changed since the last, not the size of the grid: a heap of the jobs whose
    dependencies are all done (in the grid's order), a count of each job's unmet dependencies, each job's
    dependents; whether anything can still run is worked out once per change and remembered (Tune asks
    while every base trains, about ten times a second)."""

    def __init__(self, jobs, done: dict | None = None, metric: str = "val_top1", mode: str = "max", release=None):
        super().__init__(metric=metric, mode=mode)
        self.release = release
        self.jobs = {j.key: {"deps": list(j.deps), "config": {"job_key": j.key, "treatment": j.treatment, "n": j.n,
                                                              "split": f"{j.split_kind}{j.split_seed}",
                                                              "target": j.target_half, "spec": j.spec}}
                     for j in jobs}
        self.order = [j.key for j in jobs]
        needed = set(self.jobs) | {d for job in self.jobs.values() for d in job["deps"]}
        self.done = {k: v for k, v in (done or {}).items() if k in needed}   # key -> weights URI
        self.issued, self.trial_to_key, self.failed = {}, {}, {}
        self.blocked_reason = None
        self.released = set()
        self._derive()

    def _derive(self):
        """The structures each decision reads, from the state (here and after a restore)."""
        self._rank = {k: i for i, k in enumerate(self.order)}
        self._dependents = {}
        for k, job in self.jobs.items():
            for d in set(job["deps"]):
                self._dependents.setdefault(d, []).append(k)
        self._unmet = {k: len({d for d in job["deps"] if d not in self.done}) for k, job in self.jobs.items()}
        self._ready = [(self._rank[k], k) for k in self.order if self._unmet[k] == 0 and self._open(k)]
        heapq.heapify(self._ready)
        self._changed, self._waiting, self._first = True, False, 0

    def _open(self, key) -> bool:
        return key not in self.done and key not in self.issued

    def _mark_done(self, key, output):
        if key not in self.done:
            for k in self._dependents.get(key, []):
                self._unmet[k] -= 1
                if self._unmet[k] == 0 and self._open(k):
                    heapq.heappush(self._ready, (self._rank[k], k))
        self.done[key] = output

    def suggest(self, trial_id: str):
        while self._ready:
            _, key = heapq.heappop(self._ready)
            if self._open(key):                           # else done or handed out since it was pushed
                self.issued[key] = trial_id
                self.trial_to_key[trial_id] = key
                self._changed = True
                return {**self.jobs[key]["config"], "base_uris": {d: self.done[d] for d in self.jobs[key]["deps"]}}
        if self._changed:                                 # can a job still run once what runs now ends?
            self._changed = False
            while self._first < len(self.order) and not self._open(self.order[self._first]):
                self._first += 1                          # jobs before it are all done or handed out, for good
            self._waiting = any(self._open(k) and not any(self._dead(d) for d in self.jobs[k]["deps"])
                                for k in (self.order[i] for i in range(self._first, len(self.order))))
        if self._waiting:
            return None                                   # a base is still running
        blocked = [k for k in self.order if k not in self.done and k not in self.issued]
        if blocked and self.blocked_reason is None:
            dead = sorted({d for k in blocked for d in self.jobs[k]["deps"] if self._dead(d)})
            self.blocked_reason = (f"{len(blocked)} job(s) cannot run because their base failed or is missing: "
                                   + ", ".join(f"{d} ({self._why(d)})" for d in dead))
            log.error(self.blocked_reason)
        return Searcher.FINISHED

    def _dead(self, key) -> bool:
        """A dependency that failed for good, is neither a job here nor done, or can never run itself."""
        if key in self.failed:
            return True
        if key in self.done or key in self.issued:
            return False
        if key not in self.jobs:
            return True
        return any(self._dead(d) for d in self.jobs[key]["deps"])

    def _why(self, key) -> str:
        if key in self.failed:
            return self.failed[key]
        if key not in self.jobs:
            return "not a job of this sweep and not in the job store"
        return "its own base cannot run"

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        key = self.trial_to_key.get(trial_id) or (result or {}).get("config/job_key")
        if key is None:
            return
        output = (result or {}).get("weights_uri") or (result or {}).get("output_uri")
        if error or not output:
            self.failed[key] = "error" if error else ((result or {}).get("failure_reason") or "no weights reported")
        else:
            self._mark_done(key, output)
            self.failed.pop(key, None)
        self._changed = True
        for base in self.jobs.get(key, {}).get("deps", []) + [key]:
            self._maybe_release(base)

    def _maybe_release(self, base: str):
        """Free a base once nothing in this sweep still needs it (every dependent ended)."""
        if base in self.released or self.release is None or base not in self.done:
            return
        if self.jobs.get(base, {}).get("config", {}).get("treatment") not in (None, "baseA", "baseB"):
            return                                   # a transfer a diagnostic read: no object-store copy to free
        dependents = self._dependents.get(base, [])
        if not dependents:
            return
        if all(k in self.done or k in self.failed for k in dependents):
            self.released.add(base)
            self.release(base)

    # Tune snapshots this with the experiment and calls restore() on Tuner.restore.
    def get_state(self) -> dict:
        return {k: getattr(self, k) for k in ("jobs", "order", "done", "issued", "trial_to_key", "failed",
                                              "blocked_reason", "released")}

    def set_state(self, state: dict):
        self.__dict__.update(state)
        self._derive()

    def save(self, checkpoint_path: str):
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.get_state(), f)

    def restore(self, checkpoint_path: str):
        with open(checkpoint_path, "rb") as f:
            self.set_state(pickle.load(f))

    def status(self) -> dict:
        return {"total": len(self.order), "done": len(self.done), "issued": len(self.issued),
                "failed": len(self.failed)}
