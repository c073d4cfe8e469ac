"""The Tune trainable: one trial trains a cohort of jobs from one batch stream (or runs one diagnostic), and
makes each member's outcome durable as if it had trained alone.

A cohort of one worker -- on the CPU or on one GPU -- runs in the Tune trial's own process; one of several
workers runs as a Ray Train TorchTrainer (DDP), with the same loop. Either way the trial first decides which
members it trains (`start_members`: the members that fit its memory, measured; on a restart the ones it
started before), counts an attempt for each, trains them, then writes each member's final weights and record
to the job store (a base's weights also to the registry). Tune alone retries a failed trial (`--max-failures`
counts attempts of the cohort for each member, whichever way it died); an error no retry can fix (no CUDA, a
missing dataset) fails every member once, with its reason. The final report names each member's outcome
(`outcomes`, JSON) and the members handed back (`deferred`); the searcher reads both.

    trainable = tune.with_resources(run_trial_job, job_resources(plan, cpus))    # config: {"jobs": [...], "trial": {...}}
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import time

from ray import tune

from .diagnostic_trial import run_diagnostic_job
from .jobs import is_diagnostic
from .outcomes import done_before, record_outcome
from .registry import load_bases
from .settings import TrialSettings
from .storage import run_storage
from .store import JobStore

log = logging.getLogger("raytransfer.sweep")


def run_trial_job(config: dict):
    """The Tune trainable: the cohort `config["jobs"]` (or one diagnostic). Reports at each of the loop's records
    (every epoch, or every evaluation where the recipe evaluates by iterations); the last report carries
    `outcomes`: {job key: {"weights_uri"} or {"output_uri"} or {"failure_reason"}} (a failure is not retried:
    it would fail the same way)."""
    from ..hosts import TrialSetupError, cohort_name, node_id, run_in_tune_process

    trial = TrialSettings.from_config(config)
    jobs = config["jobs"]
    _title(f"ray::raytransfer {cohort_name([j['job_key'] for j in jobs])}")   # the Cluster page's process list
    for quiet in ("ray.train._internal.storage", "ray.train.v2._internal.execution.storage"):
        logging.getLogger(quiet).setLevel(logging.WARNING)     # one "Checkpoint created" line per epoch is noise
    store = JobStore(trial.storage)
    outcomes, todo = {}, []
    for job in jobs:                               # finished before (e.g. the driver died after): never retrained
        record = store.read(job["job_key"])
        if record is not None:
            outcomes[job["job_key"]] = done_before(record)
        else:
            todo.append(job)
    started = time.time()
    if len(todo) == 1 and is_diagnostic(todo[0]["treatment"]):
        outcomes[todo[0]["job_key"]] = run_diagnostic_job(store, todo[0], trial, started)
        todo = []
    if not todo:
        tune.report(final_report(outcomes, []))
        return
    trial_id = tune.get_context().get_trial_id()
    specs = {j["job_key"]: j["spec"] for j in todo}
    start = functools.partial(start_members, trial.storage, trial_id, trial.host)
    bases = functools.partial(load_bases, trial.registry, trial.storage, todo)
    try:
        if trial.host == "train":
            result = _run_under_train(trial, todo, bases, start)
        else:
            result = run_in_tune_process(list(specs.values()), bases, num_threads=max(1, int(trial.cpus_per_trial)),
                                         checkpoint_minutes=trial.checkpoint_minutes, start=start)
    except Exception as e:
        setup = _setup_error(e, TrialSetupError)
        if setup is None:
            raise                                  # Tune retries it, from the last checkpoint
        for key in specs:                          # failed before start_members counted it: still an attempt
            last = (store.attempts(key) or [{}])[-1]
            if last.get("trial_id") != trial_id or last.get("at", 0) < started:
                store.count_attempt(key, {"node_id": node_id(), "host": trial.host, "trial_id": trial_id})
        result = {"members": {key: {"failure": setup} for key in specs}, "deferred": []}
    for key, summary in result["members"].items():
        outcomes[key] = record_outcome(store, key, specs[key], summary, trial, started)
    if trial.host == "train":                      # durable now: the Train run's folder is not needed
        from .store import delete_tree
        delete_tree(f"{trial.storage.rstrip('/')}/{train_run_name(todo)}")
    tune.report(final_report(outcomes, result["deferred"]))


def final_report(outcomes: dict, deferred: list) -> dict:
    """A trial's last report: each member's outcome (JSON), the members handed back, and the first member's
    scalars (Tune checks every report for the searcher's metric, val_top1)."""
    first = next(iter(outcomes.values()), {})
    return {**{k: v for k, v in first.items() if k not in ("weights_uri", "output_uri", "failure_reason")},
            "val_top1": first.get("val_top1", float("nan")), "final": True, "failed": bool(outcomes) and all(
                "failure_reason" in o for o in outcomes.values()),
            "outcomes": json.dumps(outcomes), "deferred": json.dumps(deferred)}


def start_members(storage: str, trial_id: str, host: str, cohort, resume) -> list[str]:
    """Which of the cohort's members this trial trains, an attempt counted for each: on a restart from a
    checkpoint the members it holds; on a restart before one, those it started before (their last attempt is
    this trial's: a member handed back may be training in another trial by now); else the members that fit the
    trial's memory, measured (Cohort.fit_memory)."""
    from ..hosts import node_id

    store = JobStore(storage)
    keys = cohort.keys()
    if resume is not None:
        kept = [k for k in keys if k in resume["members"]]
    else:
        mine = [k for k in keys if (a := store.attempts(k)) and a[-1].get("trial_id") == trial_id]
        kept = mine or cohort.fit_memory()[0]
    for k in kept:
        store.count_attempt(k, {"node_id": node_id(), "host": host, "trial_id": trial_id, "cohort_size": len(kept)})
    return kept


def _title(title: str):
    try:
        import ray
        ray._raylet.setproctitle(title)           # Ray's own (private) setter; cosmetic, so never fatal
    except Exception:
        pass


def _setup_error(e: BaseException, kind) -> str | None:
    """The message of a TrialSetupError behind `e` (raised here, in a Train worker's loop, or in its
    start-up check: Ray Train's WorkerGroupError / ControllerError), else None."""
    seen, todo = set(), [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, kind) or type(x).__name__ == kind.__name__:
            text = str(x)
            return text.split(f"{kind.__name__}: ", 1)[-1].strip()
        todo += [x.__cause__, x.__context__, getattr(x, "controller_failure", None),     # Train's worker start-up
                 *(getattr(x, "worker_failures", None) or {}).values()]
    return None


def train_run_name(jobs: list[dict]) -> str:
    """The Train run of a cohort, named after its jobs: a retried trial (same jobs) resumes its checkpoints."""
    if len(jobs) == 1:
        return f"train-{jobs[0]['job_key']}"
    digest = hashlib.sha256("\n".join(sorted(j["job_key"] for j in jobs)).encode()).hexdigest()[:10]
    return f"train-cohort-{digest}"


def _run_under_train(trial: TrialSettings, jobs: list[dict], load_bases, start) -> dict:
    """The cohort as a TorchTrainer run named after its jobs, so a retried trial resumes its checkpoints.
    Train itself retries nothing (Tune does): one budget for the jobs."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from ..hosts import device_checked_torch_config, load_state, train_fn_per_worker

    loop_config = {"specs": [j["spec"] for j in jobs], "cpus_per_worker": trial.cpus_per_trial,
                   "load_bases": load_bases, "start": start, "checkpoint_minutes": trial.checkpoint_minutes}
    gpus = trial.gpus_per_trial
    resources = {"CPU": trial.cpus_per_trial, **({"GPU": gpus} if gpus else {})}
    trainer = TorchTrainer(
        train_fn_per_worker, train_loop_config=loop_config,
        torch_config=device_checked_torch_config(),       # gloo where the workers train on the CPU (a test cluster)
        scaling_config=ray.train.ScalingConfig(num_workers=trial.workers_per_trial, use_gpu=gpus > 0,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(name=train_run_name(jobs), **run_storage(trial.storage),
                                       callbacks=[TuneReportCallback()],
                                       failure_config=ray.train.FailureConfig(max_failures=0),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1)))
    result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        state = load_state(d)
    summaries = json.loads(result.metrics["summaries"])
    return {"members": {k: {**s, "state_dict": state["members"][k]["model"]} for k, s in summaries.items()},
            "deferred": json.loads(result.metrics.get("deferred", "[]"))}
