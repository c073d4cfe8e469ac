"""Watching a sweep while it runs: the console, the live report, trackers (MLflow, TensorBoard), the
heartbeat `raytransfer status` reads. Each is a Ray Tune callback in the driver.

- SweepProgress: one updating bar on a terminal (tqdm), plain lines when the output is not one
  (logs, `ray job logs`; a line only when it changed): jobs done / running / failed, an ETA that
  weighs the jobs left by their step cost (`relative_cost`), the dashboard URL; it also writes the
  heartbeat (the running jobs) into the job store.
- LiveReport: results.csv and report.html rebuilt as jobs land, at most every `every_s`, atomically.
- MLflowJobs: every job one MLflow run (params: its settings, key and cohort; per-epoch metrics; the final row);
  a tracking server that is down or errs costs one warning per kind of call, never the sweep.
- TensorBoardJobs: event files per job (tensorboardX) under STORAGE/tensorboard/<job key>/, from each
  record of each member of a cohort.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time

from ray import tune

from ..step_costs import relative_cost as step_cost

log = logging.getLogger("raytransfer.sweep")
DIAGNOSTIC_COST = 0.05      # a diagnostic job: forward passes over a few batches, no training

EPOCH_METRICS = ("val_top1", "val_top5", "train_loss", "images_per_s", "lr", "input_wait_s")
FINAL_METRICS = ("top1_final", "top1_best10", "top5_final", "epochs", "train_images_per_s", "wall_s")


def hms(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def jobs_of(trial) -> list[dict]:
    """The jobs a trial trains (its cohort's), from its config."""
    config = getattr(trial, "config", None) or {}
    return config.get("jobs") or ([config] if config.get("job_key") else [])


def outcomes_of(trial) -> dict:
    """{job key: outcome} from a trial's final report (trainable.final_report)."""
    return json.loads((trial.last_result or {}).get("outcomes") or "{}")


def relative_cost(job: dict) -> float:
    """A job's expected length in base-jobs, from its row (treatment, n): a frozen prefix of n layers
    skips their backward pass (step_costs: n = 7 about a third of a base step); fine-tuned, scratch,
    base and reduced-volume nets train every layer (1.0); a diagnostic trains nothing."""
    from .jobs import is_diagnostic

    treatment = job.get("treatment") or ""
    if is_diagnostic(treatment):
        return DIAGNOSTIC_COST
    try:
        return step_cost(treatment, int(job.get("n") or 0))
    except ValueError:                                 # an n the measured table lacks (another arch): a base
        return 1.0


class SweepProgress(tune.Callback):
    """Jobs done / total, running, failed, an ETA and the dashboard: a bar on a terminal, else a line at
    most every `every_s` seconds (and at every job's end). Writes the heartbeat for `raytransfer status`."""

    def __init__(self, total: int, done: int, concurrency: int | None, every_s: float = 10.0, store=None,
                 dashboard: str = "", tty: bool | None = None, todo: list | None = None):
        """`todo`: the rows (job_key, treatment, n) of the jobs still to run; by default the store's plan
        less its done records. Without either the ETA falls back to the mean length of the jobs done."""
        self.total, self.concurrency, self.every_s = total, concurrency, every_s
        self.done, self.failed, self.last, self.walls = done, 0, 0.0, []
        self.store, self.dashboard = store, dashboard
        self.tty = sys.stdout.isatty() if tty is None else tty
        self.bar, self.beat_at, self.beat_every_s = None, 0.0, 30.0
        self.todo, self.ended, self.costs, self.printed = todo, set(), [], None

    def __getstate__(self):                        # the bar is a live terminal object: not part of Tune's state
        return {**self.__dict__, "bar": None}

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        outcomes = outcomes_of(trial)
        deferred = set(json.loads(last.get("deferred") or "[]"))
        jobs = {j["job_key"]: j for j in jobs_of(trial) if j["job_key"] not in deferred}
        self.ended.update(jobs)
        failed = [k for k in jobs if "failure_reason" in outcomes.get(k, {"failure_reason": None})]
        self.failed += len(failed)
        self.done += len(jobs) - len(failed)
        wall = last.get("time_total_s") or last.get("wall_s")      # Tune's clock includes a trial's start-up
        if wall and len(failed) < len(jobs):
            self.walls.append(wall)
            self.costs.append(sum(relative_cost({**j.get("spec", {}), **j}) for k, j in jobs.items() if k not in failed))
        self._show(trials, force=True, ending=trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        jobs = [j["job_key"] for j in jobs_of(trial)]
        self.ended.update(jobs)
        self.failed += len(jobs)
        self._show(trials, force=True, ending=trial)

    def _todo(self) -> list | None:
        """The rows of the jobs not done when the sweep began (from the store's plan, read once)."""
        if self.todo is None and self.store is not None:
            try:
                plan, done = self.store.read_sweep(), self.store.completed()
            except Exception as e:                     # the ETA is a nicety: never stop the sweep for it
                log.warning("ETA by job cost unavailable (%s): the mean job length is used", e)
                plan, done = None, {}
            self.todo = [j for j in (plan or {}).get("jobs", []) if j.get("job_key") not in done] if plan else []
        return self.todo

    def eta_s(self, running: int) -> float | None:
        """Seconds left: the cost of the jobs left (in base-jobs) x the seconds a base-job took so far,
        `concurrency` at a time. None before the first job is done."""
        if not self.walls:
            return None
        at_once = self.concurrency or max(1, running)       # autoscaling, no cap: as many as run now
        todo = self._todo()
        if todo:
            per_cost = sum(self.walls) / sum(self.costs)
            left = sum(relative_cost(j) for j in todo if j.get("job_key") not in self.ended)
            return per_cost * left / at_once
        left = self.total - self.done - self.failed         # no plan to weigh by: jobs left x their mean length
        return sum(self.walls) / len(self.walls) * left / at_once

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._show(trials)

    def on_step_end(self, iteration, trials, **info):
        if time.time() - self.beat_at >= self.beat_every_s:      # alive, even while no trial reports
            self._beat(trials)

    def on_experiment_end(self, trials, **info):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def line(self, trials, ending=None) -> str:
        running = [j for t in trials if t.status == "RUNNING" and t is not ending     # ending: still RUNNING in Tune
                   for j in jobs_of(t)]
        left = self.total - self.done - self.failed
        eta_s = self.eta_s(len(running)) if left > 0 else None
        eta = f", ETA {hms(eta_s)}" if eta_s is not None else ""
        where = f"; dashboard {self.dashboard}" if self.dashboard else ""
        return f"{self.done}/{self.total} jobs done, {len(running)} running, {self.failed} failed{eta}{where}", running

    def _show(self, trials, force=False, ending=None):
        now = time.time()
        if not force and now - self.last < self.every_s:
            return
        self.last = now
        text, running = self.line(trials, ending)
        self._beat(trials, ending)
        if self.tty:
            if self.bar is None:
                from tqdm import tqdm
                self.bar = tqdm(total=self.total, initial=self.done + self.failed, unit="job", dynamic_ncols=True,
                                bar_format="[sweep] {bar} {n_fmt}/{total_fmt} {postfix}")
            self.bar.n = self.done + self.failed
            self.bar.set_postfix_str(text.split(" jobs done, ", 1)[1], refresh=True)
        elif text != self.printed:                     # a log: a line only when it says something new
            self.printed = text
            print(f"[sweep] {text}", flush=True)


    def _beat(self, trials, ending=None):
        self.beat_at = time.time()
        if self.store is None:
            return
        running = [j["job_key"] for t in trials if t.status == "RUNNING" and t is not ending for j in jobs_of(t)]
        try:
            self.store.write_heartbeat({"running": running, "done": self.done, "failed": self.failed,
                                        "dashboard": self.dashboard})
        except OSError as e:                           # storage hiccup: the sweep goes on
            log.warning("could not write the heartbeat: %s", e)


class LiveReport(tune.Callback):
    """The experiment's results table and report.html, rebuilt as jobs land: at most every `every_s`
    seconds (the runner builds the final one). `publish()` does the work; a failure only logs."""

    def __init__(self, publish, every_s: float = 180.0):
        self.publish, self.every_s, self.last = publish, every_s, time.time()

    def on_trial_complete(self, iteration, trials, trial, **info):
        if time.time() - self.last < self.every_s:
            return
        self.last = time.time()
        try:
            _, _, table, report = self.publish(final=False)
            print(f"[sweep] live results: {len(table)} networks in {report or 'results.csv'}", flush=True)
        except Exception as e:                         # a report must never stop the sweep
            log.warning("live report not rebuilt: %s", e)


def check_tracking_uri(uri: str) -> str:
    """The --mlflow URI, its local path made absolute (the driver runs in the experiment folder), or one
    error now where MLflow would refuse it at the first job: MLflow's callbacks only warn (tracking never
    stops a sweep), so a bad URI would otherwise leave every job unlogged. MLflow 3 keeps its file store
    (a path or file: URI) behind MLFLOW_ALLOW_FILE_STORE; a database needs SQLAlchemy, which
    mlflow-skinny (raytransfer's dependency) lacks."""
    import importlib.util
    from urllib.parse import urlparse

    from .errors import SweepError

    scheme = urlparse(uri).scheme.lower()
    if scheme in ("", "file") or len(scheme) == 1:        # a path (C:\\... parses as scheme "c")
        path = os.path.abspath(os.path.expanduser(urlparse(uri).path if scheme == "file" else uri))
        try:
            from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
        except ImportError:                               # an MLflow that opens its file store unasked
            return f"file://{path}"
        if not MLFLOW_ALLOW_FILE_STORE.get():
            raise SweepError(f"--mlflow {uri} is MLflow's file store, which MLflow 3 opens only when "
                             f"MLFLOW_ALLOW_FILE_STORE=true: use a database, --mlflow sqlite:///"
                             f"{os.path.dirname(path.rstrip('/'))}/mlflow.db, or an MLflow server (--mlflow "
                             "http://HOST:5000), or set MLFLOW_ALLOW_FILE_STORE=true")
        return f"file://{path}"
    if scheme.split("+")[0] in ("sqlite", "postgresql", "mysql", "mssql"):
        if importlib.util.find_spec("sqlalchemy") is None or importlib.util.find_spec("alembic") is None:
            raise SweepError(f"--mlflow {uri} is a database, which needs the full MLflow package (raytransfer "
                             "installs mlflow-skinny, enough for a server): pip install mlflow, or log to an "
                             "MLflow server (--mlflow http://HOST:5000)")
        _, sep, rest = uri.partition("://")
        path, query = rest[1:].partition("?")[::2]         # sqlite:///relative.db, sqlite:////absolute.db
        if scheme == "sqlite" and sep and path and path != ":memory:":
            path = os.path.abspath(os.path.expanduser(path))
            if not os.path.isdir(os.path.dirname(path)):
                raise SweepError(f"--mlflow {uri}: the folder {os.path.dirname(path)} of that database does not "
                                 "exist: create it, or fix the URI (sqlite:////absolute/path/mlflow.db)")
            return f"sqlite:///{path}" + (f"?{query}" if query else "")
    return uri


class MLflowJobs(tune.Callback):
    """One MLflow run per job, named after its key: params (its settings), per-epoch metrics (step =
    epoch), the final row's metrics; FINISHED, or FAILED with the reason. Each member of a cohort has its own
    run (tagged with the cohort); a retried trial, or a member handed back to another trial, keeps its run.

    Tracking is never worth the sweep: a call that fails (a server down, an error it returns) logs one
    warning per kind of call and the sweep goes on; after a failure MLflow is left alone for `pause_s`
    (a server that is down would cost each call its retries). Those retries are capped here unless the
    environment sets them (MLFLOW_HTTP_REQUEST_MAX_RETRIES 2, _BACKOFF_FACTOR 1, _TIMEOUT 20 s)."""

    HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                     "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}

    def __init__(self, tracking_uri: str, experiment: str, pause_s: float = 60.0):
        self.tracking_uri, self.experiment, self.pause_s = tracking_uri, experiment, pause_s
        self.client, self.experiment_id, self.runs = None, None, {}
        self.warned, self.quiet_until = set(), 0.0

    def __getstate__(self):
        return {**self.__dict__, "client": None}

    def _call(self, kind: str, fn, *args, **kwargs):
        """fn(*args, **kwargs), or None when MLflow fails (one warning per kind) or is paused after a failure."""
        if time.time() < self.quiet_until:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:                         # MLflow's errors, connection errors, anything: not the sweep's
            self.quiet_until = time.time() + self.pause_s
            if kind not in self.warned:
                self.warned.add(kind)
                log.warning("MLflow at %s: %s failed (%s: %s); the sweep goes on, MLflow is skipped for %.0f s "
                            "after each failure (this warning once per kind of call)", self.tracking_uri, kind,
                            type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "", self.pause_s)
            return None

    def _setup(self) -> bool:
        if self.client is None:
            import os

            for k, v in self.HTTP_DEFAULTS.items():
                os.environ.setdefault(k, v)
            from mlflow.tracking import MlflowClient

            client = self._call("connect", MlflowClient, self.tracking_uri)
            exp = client and self._call("get_experiment", lambda: client.get_experiment_by_name(self.experiment)
                                        or client.get_experiment(client.create_experiment(self.experiment)))
            if exp is None:
                return False
            self.client, self.experiment_id = client, exp.experiment_id
        return True

    def on_trial_start(self, iteration, trials, trial, **info):
        if not self._setup():
            return
        config = trial.config
        for job in jobs_of(trial):
            key, spec = job["job_key"], job.get("spec", {})
            if key in self.runs:                       # a retried trial, or a member handed back: its run goes on
                continue
            run = self._call("create_run", self.client.create_run, self.experiment_id, run_name=key,
                             tags={"raytransfer.job_key": key, "raytransfer.tune_trial": trial.trial_id,
                                   "raytransfer.cohort": config.get("cohort") or key})
            if run is None:
                return
            recipe = spec.get("recipe", {})
            trial_settings = config.get("trial", {})
            params = {"job_key": key, "treatment": spec.get("treatment"), "n": spec.get("n"),
                      "split": job.get("split"), "target_half": job.get("target"), "seed": spec.get("seed"),
                      "arch": recipe.get("arch"), "recipe": recipe.get("name"),
                      "dataset_fingerprint": spec.get("dataset_fingerprint"), "host": trial_settings.get("host"),
                      "gpus_per_trial": trial_settings.get("gpus_per_trial"),
                      "workers_per_trial": trial_settings.get("workers_per_trial"),
                      "base_jobs": ",".join(job.get("base_uris", {})), "cohort_size": len(jobs_of(trial))}
            for k, v in params.items():
                self._call("log_param", self.client.log_param, run.info.run_id, k, "" if v is None else v)
            self.runs[key] = run.info.run_id

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("final") or not result.get("records"):
            return
        for key, metrics in json.loads(result["records"]).items():
            run = self.runs.get(key)
            if run is None:
                continue
            step = int(metrics.get("step", metrics.get("epoch", 0)))    # records by evaluation: several an epoch
            for k in EPOCH_METRICS:
                if isinstance(metrics.get(k), (int, float)):
                    self._call("log_metric", self.client.log_metric, run, k, float(metrics[k]), step=step)

    def on_trial_complete(self, iteration, trials, trial, **info):
        for key, outcome in outcomes_of(trial).items():
            run = self.runs.get(key)
            if run is None:
                continue
            for k in FINAL_METRICS:
                if isinstance(outcome.get(k), (int, float)):
                    self._call("log_metric", self.client.log_metric, run, k, float(outcome[k]))
            failed = "failure_reason" in outcome
            if failed:
                self._call("set_tag", self.client.set_tag, run, "raytransfer.failure_reason",
                           str(outcome["failure_reason"])[:5000])
            self._call("set_terminated", self.client.set_terminated, run, "FAILED" if failed else "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        for job in jobs_of(trial):
            run = self.runs.get(job["job_key"])
            if run is not None:
                self._call("set_terminated", self.client.set_terminated, run, "FAILED")


class TensorBoardJobs(tune.Callback):
    """TensorBoard event files per job, under STORAGE/tensorboard/<job key>/ (`tensorboard --logdir
    STORAGE/tensorboard`: one run per job), written by the driver from each record of each cohort member:
    val_top1, val_top5, train_loss, images_per_s, lr, input_wait_s at the record's step. On a remote storage the
    files are written locally and copied there when the job ends; a failure only logs."""

    def __init__(self, storage: str):
        self.storage, self.writers, self.local = storage.rstrip("/"), {}, None

    def __getstate__(self):                            # open writers are not part of Tune's state
        return {**self.__dict__, "writers": {}}

    def _dir(self, key: str) -> str:
        if "://" not in self.storage:
            return f"{self.storage}/tensorboard/{key}"
        if self.local is None:
            import tempfile
            self.local = tempfile.mkdtemp(prefix="rt-tensorboard-")
        return f"{self.local}/{key}"

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("final") or not result.get("records"):
            return
        try:
            for key, metrics in json.loads(result["records"]).items():
                if key not in self.writers:
                    from tensorboardX import SummaryWriter
                    self.writers[key] = SummaryWriter(self._dir(key))
                step = int(metrics.get("step", metrics.get("epoch", 0)))
                for k in EPOCH_METRICS:
                    if isinstance(metrics.get(k), (int, float)):
                        self.writers[key].add_scalar(k, float(metrics[k]), step)
        except Exception as e:                         # TensorBoard is a nicety: never the sweep
            log.warning("TensorBoard events not written: %s", e)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._close([j["job_key"] for j in jobs_of(trial)])

    def on_trial_error(self, iteration, trials, trial, **info):
        self._close([j["job_key"] for j in jobs_of(trial)])

    def on_experiment_end(self, trials, **info):
        self._close(list(self.writers))

    def _close(self, keys):
        for key in keys:
            writer = self.writers.pop(key, None)
            if writer is None:
                continue
            try:
                writer.close()
                if self.local is not None:
                    copy_events(self._dir(key), self.storage, key)
            except Exception as e:
                log.warning("%s: TensorBoard events not kept: %s", key, e)


def copy_events(local_dir: str, storage: str, job_key: str) -> int:
    """Copy a folder's TensorBoard event files to STORAGE/tensorboard/<job key>/; returns how many."""
    from pathlib import Path

    from .store import _split_uri

    events = sorted(Path(local_dir).glob("events.out.tfevents*"))
    if not events:
        return 0
    dest_fs, dest = _split_uri(f"{storage.rstrip('/')}/tensorboard/{job_key}")
    dest_fs.create_dir(dest, recursive=True)
    for e in events:
        with dest_fs.open_output_stream(f"{dest}/{e.name}") as out:
            out.write(e.read_bytes())
    return len(events)
