"""The dependency-aware Searcher: releases a job the moment everything it depends on is done, in cohorts.

Tune calls `suggest()` about every 0.1 s; it returns a trial's config when a job is ready, None while
jobs wait for their bases, and FINISHED once every job is handed out or the rest can never run
(their base failed for good) -- never hanging `Tuner.fit()`. A trial trains a *cohort*: the first ready job
in the grid's order and the other ready jobs of its batch stream (cohorts.py), up to `cohort_size` (1: one
job a trial). "Done" is seeded from the durable job store, so finished jobs are never handed out again;
state survives `Tuner.restore` (save/restore).

    searcher = DependencySearcher(jobs, done=store.completed(), release=lambda base_key: ..., cohort_size=None)

A trial's config carries its jobs (`jobs`: key, treatment, n, spec, base_uris each) and, for the dashboard
and Tune's own records, its first job's fields. A job is done when the trial's final report names its output
in `outcomes` ({key: {"weights_uri" | "output_uri" | "failure_reason"}}, JSON); a trial may hand members back
(`deferred`: they did not fit its memory) in any report, and they are released again in another cohort.

`release(base_key)` is called once every job of the sweep that depends on that base has ended (done
or failed for good): the driver then frees the base's object-store copy. A diagnostic depends on every
net it reads (Job.deps), so a base read by a diagnostic stays until that diagnostic ended too.
"""
from __future__ import annotations

import heapq
import json
import logging
import pickle

from ray.tune.search import Searcher

from .cohorts import cohort_name, cohort_size, job_stream, member_order

log = logging.getLogger(__name__)


class DependencySearcher(Searcher):
    """Each decision costs what changed since the last, not the size of the grid: a heap of the jobs whose
    dependencies are all done (in the grid's order) and one per batch stream, a count of each job's unmet
    dependencies, each job's dependents; whether anything can still run is worked out once per change and
    remembered (Tune asks while every base trains, about ten times a second)."""

    def __init__(self, jobs, done: dict | None = None, metric: str = "val_top1", mode: str = "max", release=None,
                 cohort_size: int | None = 1, slots: int | None = None):
        super().__init__(metric=metric, mode=mode)
        self.release, self.cohort_size, self.slots = release, cohort_size, slots
        self.jobs = {j.key: {"deps": list(j.deps), "config": {"job_key": j.key, "treatment": j.treatment, "n": j.n,
                                                              "split": f"{j.split_kind}{j.split_seed}",
                                                              "target": j.target_half, "spec": j.spec}}
                     for j in jobs}
        self.order = [j.key for j in jobs]
        needed = set(self.jobs) | {d for job in self.jobs.values() for d in job["deps"]}
        self.done = {k: v for k, v in (done or {}).items() if k in needed}   # key -> weights URI
        self.issued, self.trial_to_keys, self.failed = {}, {}, {}     # key -> trial; trial -> its keys
        self.blocked_reason = None
        self.released = set()
        self._derive()

    def _derive(self):
        """The structures each decision reads, from the state (here and after a restore)."""
        self._rank = {k: i for i, k in enumerate(self.order)}
        self._stream = {k: job_stream(job["config"]) for k, job in self.jobs.items()}
        self._dependents = {}
        for k, job in self.jobs.items():
            for d in set(job["deps"]):
                self._dependents.setdefault(d, []).append(k)
        self._unmet = {k: len({d for d in job["deps"] if d not in self.done}) for k, job in self.jobs.items()}
        self._ready, self._ready_of = [], {}
        for k in self.order:
            if self._unmet[k] == 0 and self._open(k):
                self._push(k)
        self._changed, self._waiting, self._first = True, False, 0

    def _open(self, key) -> bool:
        return key not in self.done and key not in self.issued

    def _push(self, key):
        heapq.heappush(self._ready, (self._rank[key], key))
        heapq.heappush(self._ready_of.setdefault(self._stream[key], []), (self._rank[key], key))

    def _mark_done(self, key, output):
        if key not in self.done:
            for k in self._dependents.get(key, []):
                self._unmet[k] -= 1
                if self._unmet[k] == 0 and self._open(k):
                    self._push(k)
        self.done[key] = output

    def _ready_streams(self) -> dict:
        """{stream: its heap} of the streams with a job ready now (heaps cleared of jobs handed out since)."""
        live = {}
        for stream, heap in list(self._ready_of.items()):
            while heap and not self._open(heap[0][1]):
                heapq.heappop(heap)
            if heap:
                live[stream] = heap
            else:
                del self._ready_of[stream]
        return live

    def suggest(self, trial_id: str):
        while self._ready:
            _, key = heapq.heappop(self._ready)
            if self._open(key):                           # else done or handed out since it was pushed
                return self._issue(trial_id, key)
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

    def _issue(self, trial_id: str, key: str) -> dict:
        """Hand `key` out with the ready jobs of its stream (cohorts.py): one trial's config."""
        if self.cohort_size == 1:                         # one job a trial: no stream to look at
            config = self._config(key)
            self.issued[key] = trial_id
            self.trial_to_keys[trial_id] = [key]
            self._changed = True
            return {**config, "jobs": [config], "cohort": key}
        streams = self._ready_streams()
        mates = sorted({k for _, k in streams.get(self._stream[key], []) if k != key and self._open(k)},
                       key=self._rank.__getitem__)                  # (a job handed back is in its heap twice)
        free = None if self.slots is None else max(1, self.slots - len(self.trial_to_keys))
        size = cohort_size(1 + len(mates), max(1, len(streams)), free, self.cohort_size)
        if size <= len(mates):                            # a part of the stream: the first job's, and those
            order = sorted(mates, key=lambda k: member_order(self._config(k)))     # beside it in member order
            mates = order[:size - 1]
        configs = sorted((self._config(k) for k in [key] + mates), key=member_order)
        for c in configs:
            self.issued[c["job_key"]] = trial_id
        self.trial_to_keys[trial_id] = [c["job_key"] for c in configs]
        self._changed = True
        return {**configs[0], "jobs": configs, "cohort": cohort_name(configs)}

    def _config(self, key: str) -> dict:
        return {**self.jobs[key]["config"], "base_uris": {d: self.done[d] for d in self.jobs[key]["deps"]}}

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

    def on_trial_result(self, trial_id: str, result: dict):
        """A trial that hands members back (they did not fit its memory): they are ready again, for another cohort."""
        if result.get("deferred"):
            self._take_back(trial_id, json.loads(result["deferred"]))

    def _take_back(self, trial_id: str, keys):
        owned = self.trial_to_keys.get(trial_id, [])
        back = [k for k in keys if k in owned and self.issued.get(k) == trial_id and k not in self.done]
        for k in back:
            del self.issued[k]
            owned.remove(k)
            self._push(k)
        if back:
            log.info("%d job(s) handed back by trial %s (memory); released again: %s", len(back), trial_id,
                     ", ".join(back[:3]) + (" ..." if len(back) > 3 else ""))
            self._changed = True

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        result = result or {}
        keys = self.trial_to_keys.pop(trial_id, None)
        if keys is None:                                  # a trial this searcher did not hand out (a restore)
            keys = [j["job_key"] for j in result.get("config/jobs", [])] or \
                   [k for k in [result.get("config/job_key")] if k]
        if result.get("deferred"):
            self.trial_to_keys[trial_id] = list(keys)
            self._take_back(trial_id, json.loads(result["deferred"]))
            keys = self.trial_to_keys.pop(trial_id)
        outcomes = json.loads(result["outcomes"]) if result.get("outcomes") else \
            ({keys[0]: result} if len(keys) == 1 else {})
        for key in keys:
            outcome = outcomes.get(key, {})
            output = outcome.get("weights_uri") or outcome.get("output_uri")
            if error or not output:
                self.failed[key] = "error" if error else (outcome.get("failure_reason") or "no weights reported")
            else:
                self._mark_done(key, output)
                self.failed.pop(key, None)
        self._changed = True
        for key in keys:
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
        return {k: getattr(self, k) for k in ("jobs", "order", "done", "issued", "trial_to_keys", "failed",
                                              "blocked_reason", "released", "cohort_size", "slots")}

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
                "failed": len(self.failed), "trials": len(self.trial_to_keys)}
