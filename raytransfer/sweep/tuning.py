"""Ray Tune wiring: one Tuner over the sweep's jobs (or its restore with --resume), the trials it runs, the
driver's callbacks.

The sweep's one use of `Tuner`: Ray is started or joined (ray_session.py), the trial plan sized from the
cluster's node types (capacity.py, resources.py), every node checked for the storage and the dataset
(node_checks.py), the weights registry created, then `Tuner.fit()` runs the trainable (trainable.py) over
the cohorts the dependency searcher releases (searcher.py, cohorts.py). Callbacks watch (monitor.py), note
retries (retries.py), keep the job index and watch the storage (storage_watch.py), and delete the folders
of trials whose jobs are durable (cleanup.py).

    info = fit_sweep(jobs, done, store, exp_name, run_settings, callbacks)
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os

import ray
from ray import tune

from .capacity import cluster_node_types, plan_trials
from .cleanup import TrialCleanup, remove_done_trial_folders
from .monitor import SweepProgress, TensorBoardJobs
from .node_checks import check_dataset, check_storage
from .ray_session import init_ray
from .registry import drop, get_or_create_registry, registry_name, remove_registry
from .resources import job_resources
from .retries import RetryNotes
from .searcher import DependencySearcher
from .settings import RunSettings, TrialSettings
from .storage import run_storage, tune_storage
from .storage_watch import JobIndexKeeper, StorageWatch
from .store import JobStore

log = logging.getLogger("raytransfer.sweep")


def fit_sweep(jobs, done: dict, store: JobStore, exp_name: str, run: RunSettings, callbacks=(),
              on_ready=None) -> dict:
    """[3] Ray, the trial plan and the registry, [4] one Tuner.fit() (or Tuner.restore with --resume);
    the registry (and every base copy it holds) is removed when the sweep ends, however it ends.
    Nothing is written to the storage before every check has passed; then `on_ready()` runs. Returns
    {"plan", "dashboard", "cpus_per_trial"}."""
    storage = run.storage
    dashboard = init_ray(run)
    started = False
    registry = registry_name(f"{exp_name}-{hashlib.sha256(storage.encode()).hexdigest()[:6]}")
    try:
        types = cluster_node_types()
        plan = plan_trials(types, run.gpus_per_trial, run.workers_per_trial, run.cpus_per_trial, run.host,
                           run.max_concurrent)
        run = run.with_cpus(plan.cpus_per_worker)         # None asked: from the node types (capacity.py)
        check_storage(storage, run.address)
        check_dataset(jobs, types)
        get_or_create_registry(registry)
        todo = [j for j in jobs if j.key not in done]
        where = ", ".join(plan.fitting)
        size = f"{plan.gpus_per_worker:g} GPU + {run.cpus_per_trial:g} CPU" + \
            (f" ({plan.cpus_from})" if plan.cpus_from != "asked" and plan.gpus_per_worker else "") + \
            (f" x {run.workers_per_trial} workers" if run.workers_per_trial > 1 else "")
        at_once = f"up to {plan.concurrency} at once" if plan.concurrency else "as many at once as the autoscaler launches"
        cohorts = ("one job a trial" if run.cohort_size == 1 else
                   f"a trial trains up to {run.cohort_size} jobs of one stream" if run.cohort_size else
                   "a trial trains every ready job of one stream (a cohort)")
        print(f"[sweep] {len(jobs)} jobs, {len(jobs) - len(todo)} done, {len(todo)} to run; host={plan.host}, "
              f"{size} per trial on {where}; {at_once}; {cohorts}", flush=True)
        started = True
        if on_ready is not None:
            on_ready()
        store.write_sweep({"experiment": exp_name, "gpus_per_trial": plan.gpus_per_worker * run.workers_per_trial,
                           "jobs": [j.row() for j in jobs]})
        info = {"plan": plan, "dashboard": dashboard, "cpus_per_trial": run.cpus_per_trial}
        if not todo:
            return info
        from .trainable import run_trial_job

        trainable = tune.with_resources(run_trial_job, job_resources(plan, run.cpus_per_trial))
        trial = TrialSettings(storage, plan.host, run.cpus_per_trial, plan.gpus_per_worker, run.workers_per_trial,
                              run.checkpoint_minutes, registry)
        progress = SweepProgress(len(jobs), len(jobs) - len(todo), plan.concurrency, store=store, dashboard=dashboard)
        exp_path = f"{storage.rstrip('/')}/{exp_name}"
        # Tune warns at every experiment snapshot of short trials; the snapshot is what makes --resume safe.
        # Its closing analysis misses the trial folders TrialCleanup removed: the job store has the results.
        logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
        if run.resume:
            tune_path, fs = tune_storage(storage)
            tuner = tune.Tuner.restore(f"{tune_path.rstrip('/')}/{exp_name}", trainable=trainable, resume_errored=True,
                                       storage_filesystem=fs)
        else:
            searcher = DependencySearcher(jobs, done={k: r.get("weights_uri") or r.get("output_uri")
                                                      for k, r in done.items()},
                                          release=functools.partial(drop, registry), cohort_size=run.cohort_size,
                                          slots=plan.concurrency)
            tuner = tune.Tuner(
                trainable, param_space={"trial": trial.to_config()},
                tune_config=tune.TuneConfig(search_alg=searcher, num_samples=len(todo),   # at most one trial a job
                                            max_concurrent_trials=plan.concurrency,
                                            reuse_actors=plan.host == "process",
                                            trial_name_creator=lambda t: t.config.get("cohort") or t.config["job_key"],
                                            trial_dirname_creator=trial_dirname),
                run_config=tune.RunConfig(name=exp_name, **run_storage(storage), verbose=0,
                                          callbacks=[progress, TrialCleanup(storage), RetryNotes(storage),
                                                     JobIndexKeeper(storage), TensorBoardJobs(storage),
                                                     StorageWatch(storage), *callbacks],
                                          failure_config=tune.FailureConfig(max_failures=run.max_failures),
                                          checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
        tuner.fit()
        remove_done_trial_folders(store, exp_path)
        return info
    finally:
        try:
            if started:
                store.write_heartbeat({"running": [], "ended": True, "dashboard": dashboard})   # for `status`
        except OSError:
            pass
        try:
            remove_registry(registry)
        finally:
            if not run.address:
                ray.shutdown()


def trial_dirname(trial) -> str:
    """A trial's folder: its first job's key, how many more its cohort holds, its trial id."""
    jobs = trial.config.get("jobs") or [trial.config]
    more = f"+{len(jobs) - 1}" if len(jobs) > 1 else ""
    return f"{jobs[0]['job_key']}{more}_{trial.trial_id}"
