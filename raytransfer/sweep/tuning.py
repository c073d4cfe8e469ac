"""Ray Tune wiring: the trainable of one job, the Tuner (or its restore), progress on the console.

This is the only module that imports ray.tune. A job runs either in the trial's own process (tiny
CPU trials: no worker group to start) or as a Ray Train TorchTrainer run (GPUs, DDP), with the same
loop; its final weights and record go to the job store, and a base's weights also to the registry.
"""
from __future__ import annotations

import logging
import os
import sys
import time
import uuid
from pathlib import Path

import ray
from ray import tune
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .registry import fetch_base, get_or_create_registry, publish
from .searcher import DependencySearcher
from .store import CorruptWeights, JobStore

log = logging.getLogger("raytransfer.sweep")

NAMESPACE = "raytransfer"


def run_job(config: dict):
    """The Tune trainable: one job. Reports every epoch; the last report carries `weights_uri`."""
    from ..hosts import run_in_tune_process, summary_metrics

    key, spec = config["job_key"], config["spec"]
    for quiet in ("ray.train._internal.storage", "ray.train.v2._internal.execution.storage"):
        logging.getLogger(quiet).setLevel(logging.WARNING)     # one "Checkpoint created" line per epoch is noise
    store = JobStore(config["storage"])
    record = store.read(key)
    if record is not None:                         # finished before (e.g. the driver died after): never retrain
        tune.report({**_scalars(record["metrics"]), "weights_uri": record["weights_uri"], "final": True})
        return
    started = time.time()
    base_state, via = None, None
    for base_key, uri in config.get("base_uris", {}).items():
        try:
            base_state, via = fetch_base(base_key, uri)
        except CorruptWeights as e:                # never train on them; the next run retrains that base alone
            store.forget(base_key)
            raise CorruptWeights(f"{e}; dropped the record of base {base_key}: rerun the same command to retrain "
                                 "that base alone, then this job") from None
    if config["host"] == "train":
        summary = _run_under_train(config, spec, base_state)
    else:
        summary = run_in_tune_process(spec, base_state, num_threads=max(1, int(config["cpus_per_trial"])))
    metrics = summary_metrics(summary)
    uri = store.save_weights(key, summary["state_dict"])
    if spec["treatment"] in ("baseA", "baseB"):
        publish(key, summary["state_dict"])
    store.write(key, {"metrics": metrics, "weights_uri": uri, "config": spec, "host": config["host"],
                      "base_weights_via": via, "node_id": ray.get_runtime_context().get_node_id(),
                      "started_at": started, "finished_at": time.time(),
                      "versions": _versions()})
    tune.report({**_scalars(metrics), "weights_uri": uri, "final": True})


def _run_under_train(config, spec, base_state):
    """The job as a TorchTrainer run named after its key, so a retried trial resumes its checkpoints."""
    import tempfile

    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from ..hosts import load_state, train_fn_per_worker

    loop_config = {"spec": spec, "cpus_per_worker": config["cpus_per_trial"],
                   "base_ref": [ray.put(base_state)] if base_state is not None else None}
    gpus = config["gpus_per_trial"]
    trainer = TorchTrainer(
        train_fn_per_worker, train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=config["workers_per_trial"], use_gpu=gpus > 0,
                                               resources_per_worker={"CPU": config["cpus_per_trial"], "GPU": gpus}),
        run_config=ray.train.RunConfig(name=f"train-{spec['job_key']}", storage_path=config["storage"],
                                       callbacks=[TuneReportCallback()],
                                       failure_config=ray.train.FailureConfig(max_failures=config["max_failures"]),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)))
    result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        state = load_state(d)
    return {**{k: v for k, v in result.metrics.items() if k != "final"}, "state_dict": state["model"]}


def _scalars(metrics: dict) -> dict:
    """The scalar metrics of a final report, through the hosts' one rule (val_top1 = the final top-1),
    also for records written before that rule travelled with them."""
    from ..hosts import summary_metrics

    return {k: v for k, v in summary_metrics(metrics).items() if isinstance(v, (int, float, bool, str)) or v is None}


def _versions() -> dict:
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


class SweepProgress(tune.Callback):
    """One console line: jobs done / total, running, failed, an ETA; at most every `every_s` seconds."""

    def __init__(self, total: int, done: int, concurrency: int, every_s: float = 10.0):
        self.total, self.concurrency, self.every_s = total, max(1, concurrency), every_s
        self.done = done
        self.failed = 0
        self.last = 0.0
        self.walls = []

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += 1
        last = trial.last_result or {}
        wall = last.get("time_total_s") or last.get("wall_s")      # Tune's clock includes a trial's start-up
        if wall:
            self.walls.append(wall)
        self._print(trials, force=True, ending=trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.failed += 1
        self._print(trials, force=True, ending=trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._print(trials)

    def _print(self, trials, force=False, ending=None):
        now = time.time()
        if not force and now - self.last < self.every_s:
            return
        self.last = now                                # a trial that just ended is still RUNNING in Tune's books
        running = sum(t.status == "RUNNING" and t is not ending for t in trials)
        left = self.total - self.done - self.failed
        eta = ""
        if self.walls and left > 0:                    # jobs left x their mean length, `concurrency` at a time
            eta = f", ETA {_hms(sum(self.walls) / len(self.walls) * left / self.concurrency)}"
        print(f"[sweep] {self.done}/{self.total} jobs done, {running} running, {self.failed} failed{eta}",
              flush=True)


def _hms(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def init_ray(args):
    """Join the cluster at --address, or start a local Ray; print the dashboard URL."""
    from .runner import SweepError, check_address

    check_address(args.address)
    kwargs = {"namespace": NAMESPACE, "log_to_driver": True}
    try:
        if args.address:
            ctx = ray.init(address=args.address, **kwargs)
        else:
            ctx = ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=not args.no_dashboard,
                           _temp_dir=os.environ.get("RAYTRANSFER_RAY_TMP"), **kwargs)
    except ConnectionError as e:
        raise SweepError(f"cannot reach a Ray cluster at {args.address} ({e}): start it or fix --address") from None
    url = getattr(ctx, "dashboard_url", "")
    print(f"[sweep] Ray dashboard: {'http://' + url if url else '(not running)'}", flush=True)


def check_resources(args) -> tuple[str, int]:
    """Host choice and concurrency from what the cluster offers; one clear error when it cannot fit."""
    from .runner import SweepError

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    gpus_per_node = max((r.get("GPU", 0) for r in nodes), default=0)
    cpus_total = sum(r.get("CPU", 0) for r in nodes)
    if args.gpus_per_trial is None:                 # a GPU cluster trains on GPUs unless told otherwise
        args.gpus_per_trial = 1.0 if gpus_per_node >= 1 else 0.0
    if args.gpus_per_trial > 0 and gpus_per_node == 0:
        raise SweepError(f"--gpus-per-trial {args.gpus_per_trial} asks for GPUs but the cluster has none: "
                         "drop the flag (CPU) or add GPU nodes")
    if args.gpus_per_trial > gpus_per_node:
        raise SweepError(f"--gpus-per-trial {args.gpus_per_trial} is more than any node offers (at most {gpus_per_node:g})")
    cpus_per_node = max((r.get("CPU", 0) for r in nodes), default=0)
    if args.cpus_per_trial > cpus_per_node:
        raise SweepError(f"--cpus-per-trial {args.cpus_per_trial:g} is more than any node offers (at most {cpus_per_node:g})")
    host = args.host
    if host == "auto":
        host = "train" if args.gpus_per_trial > 0 or args.workers_per_trial > 1 else "process"
    if args.gpus_per_trial > 0:
        total_gpus = sum(r.get("GPU", 0) for r in nodes)
        concurrency = int(total_gpus // (args.gpus_per_trial * args.workers_per_trial))
    else:
        concurrency = int(cpus_total // (args.cpus_per_trial * args.workers_per_trial))
    return host, max(1, concurrency)


NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "ceph", "fuse", "9p", "beegfs", "glusterfs")


def check_storage(storage: str, args):
    """A local --storage must be one folder that every node sees: trials on any node write their
    checkpoints and records there. Probed on the nodes alive now; a warning for nodes added later."""
    from .runner import SweepError

    if "://" in storage:
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1:
        token = uuid.uuid4().hex
        marker = Path(storage) / f".node-probe-{token}"
        marker.write_text(token)
        try:
            probes = [_storage_probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
                                             ).remote(str(marker), token) for n in nodes]
            answers = ray.get(probes, timeout=120)
        finally:
            marker.unlink(missing_ok=True)
        blind = [f"{n['NodeManagerAddress']} ({n['NodeID'][:8]}): {why}" for n, why in zip(nodes, answers) if why]
        if blind:
            raise SweepError(f"--storage {storage} is not shared: {len(blind)} of the cluster's {len(nodes)} nodes "
                             f"cannot use it ({'; '.join(blind[:3])}), so trials there could not save checkpoints "
                             "or records. Use storage every node shares: s3://bucket/prefix (see cluster.yaml) or a "
                             "shared filesystem mounted at the same path on every node")
    fstype = _filesystem_type(storage)
    if args.address and fstype and not fstype.startswith(NETWORK_FILESYSTEMS):
        print(f"[sweep] warning: --storage {storage} is on a local {fstype} disk of this machine; nodes that join "
              "later (autoscaling) will not see it. Use s3://... or a shared filesystem on a multi-node cluster.",
              flush=True)


@ray.remote(num_cpus=0)
def _storage_probe(marker: str, token: str) -> str | None:
    """On one node: None if the driver's marker file is there and the folder is writable, else why not."""
    try:
        if Path(marker).read_text() != token:
            return "sees a different folder at that path"
        mine = Path(f"{marker}-{os.getpid()}")
        mine.write_text("ok")
        mine.unlink()
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror or e}"
    return None


def _filesystem_type(path: str) -> str | None:
    """The filesystem type of `path` from /proc/mounts (Linux), None when unknown."""
    try:
        mounts = [line.split()[1:3] for line in open("/proc/mounts")]
    except OSError:
        return None
    real = os.path.realpath(path)
    best = max((m for m in mounts if real == m[0] or real.startswith(m[0].rstrip("/") + "/")),
               key=lambda m: len(m[0]), default=None)
    return best[1] if best else None


def fit_sweep(jobs, done: dict, store: JobStore, storage: str, exp_name: str, args):
    """[3] Ray and the registry, [4] one Tuner.fit() (or Tuner.restore with --resume)."""
    init_ray(args)
    try:
        host, concurrency = check_resources(args)
        check_storage(storage, args)
        get_or_create_registry()
        todo = [j for j in jobs if j.key not in done]
        print(f"[sweep] {len(jobs)} jobs, {len(jobs) - len(todo)} done, {len(todo)} to run; host={host}, "
              f"up to {concurrency} at once", flush=True)
        if not todo:
            return
        resources = {"CPU": args.cpus_per_trial} if host == "process" else {"CPU": 0.01}
        if host == "train" and "TRAIN_DRIVER" in ray.cluster_resources():
            resources = {"CPU": 0, "TRAIN_DRIVER": 1}       # drivers on the on-demand head (cluster.yaml)
        trainable = tune.with_resources(run_job, resources)
        constants = {"storage": storage, "host": host, "cpus_per_trial": args.cpus_per_trial,
                     "gpus_per_trial": args.gpus_per_trial, "workers_per_trial": args.workers_per_trial,
                     "max_failures": args.max_failures}
        progress = SweepProgress(len(jobs), len(jobs) - len(todo), concurrency)
        exp_path = f"{storage.rstrip('/')}/{exp_name}"
        # num_to_keep forces an experiment snapshot every few checkpoints; with short trials Tune warns
        # about it on every snapshot. The snapshot is what makes --resume safe: keep it, drop the warning.
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
        if args.resume:
            tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_errored=True)
        else:
            searcher = DependencySearcher(jobs, done={k: r["weights_uri"] for k, r in done.items()})
            tuner = tune.Tuner(
                trainable, param_space=constants,
                tune_config=tune.TuneConfig(search_alg=searcher, num_samples=-1, max_concurrent_trials=concurrency,
                                            reuse_actors=host == "process",
                                            trial_dirname_creator=lambda t: f"{t.config['job_key']}_{t.trial_id}"),
                run_config=tune.RunConfig(name=exp_name, storage_path=storage, verbose=0, callbacks=[progress],
                                          failure_config=tune.FailureConfig(max_failures=args.max_failures),
                                          checkpoint_config=tune.CheckpointConfig(num_to_keep=2)))
        tuner.fit()
    finally:
        if not args.address:
            ray.shutdown()
