"""Ray Tune wiring: the trainable of one job, the Tuner (or its restore), progress on the console.

The sweep's only use of ray.tune (the searcher subclasses Tune's Searcher). A one-worker job --
on the CPU or on one GPU -- runs in the Tune trial's own process; a job of several workers runs as
a Ray Train TorchTrainer (DDP), with the same loop. Either way the job's final weights and record
go to the job store, a base's weights also to the registry, and Tune alone retries a failed trial
(`--max-failures` counts attempts whichever way a job died). Once a job's record is durable its
Tune and Train trial folders are deleted: the storage keeps records, final weights and Tune's
experiment state.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import socket
import sys
import time
import uuid
from pathlib import Path

import ray
from ray import tune
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .capacity import cluster_node_types, plan_trials
from .errors import SweepError
from .monitor import SweepProgress, keep_tensorboard
from .registry import drop, fetch_base, get_or_create_registry, publish, registry_name, remove_registry
from .searcher import DependencySearcher
from .jobs import is_diagnostic
from .storage import StorageUnavailable, resume_hint, tune_storage, unavailable
from .store import CorruptWeights, JobStore, delete_tree

log = logging.getLogger("raytransfer.sweep")

NAMESPACE = "raytransfer"


def run_job(config: dict):
    """The Tune trainable: one job. Reports at each of the loop's records (every epoch, or every evaluation
    where the recipe evaluates by iterations); the last report carries `weights_uri`, or
    `failure_reason` when the job cannot count as done (then no retry: it would fail the same way)."""
    from ..hosts import TrialSetupError, node_id, run_in_tune_process

    key, spec = config["job_key"], config["spec"]
    _title(f"ray::raytransfer {key}")              # the dashboard's process list names the job, not ImplicitFunc
    for quiet in ("ray.train._internal.storage", "ray.train.v2._internal.execution.storage"):
        logging.getLogger(quiet).setLevel(logging.WARNING)     # one "Checkpoint created" line per epoch is noise
    store = JobStore(config["storage"])
    record = store.read(key)
    if record is not None:                         # finished before (e.g. the driver died after): never retrain
        output = ({"output_uri": record["output_uri"], "val_top1": float("nan")} if record.get("diagnostic")
                  else {"weights_uri": record["weights_uri"]})
        tune.report({**_scalars(record["metrics"]), **output, "final": True})
        return
    started = time.time()
    attempt = store.count_attempt(key, {"node_id": node_id(), "host": config["host"]})
    if is_diagnostic(spec["treatment"]):
        tune.report(run_diagnostic_job(store, key, spec, config, started, attempt))
        return
    load_base = None
    for base_key, uri in config.get("base_uris", {}).items():
        load_base = functools.partial(load_base_weights, config["registry"], base_key, uri, config["storage"])
    try:
        if config["host"] == "train":
            summary = _run_under_train(config, spec, load_base)
        else:
            summary = run_in_tune_process(spec, load_base, num_threads=max(1, int(config["cpus_per_trial"])),
                                          checkpoint_minutes=config["checkpoint_minutes"])
    except Exception as e:
        setup = _setup_error(e, TrialSetupError)
        if setup is None:
            raise                                  # Tune retries it, from the last checkpoint
        summary = {"failure": setup}
    tune.report(record_outcome(store, key, spec, summary, config, started, attempt))


def record_outcome(store: JobStore, key: str, spec: dict, summary: dict, config: dict, started: float,
                   attempt: int) -> dict:
    """Make a trial's outcome durable and return its final report: a done record with the final weights
    (a base's also to the registry), or a failed record with the reason -- a job whose trial could not
    run here (`summary["failure"]`) or whose frozen layers changed. A failed job is never a done row;
    its report has no `weights_uri`, so the searcher ends it without a retry (it would fail the same way)."""
    from ..hosts import summary_metrics

    metrics = summary_metrics(summary) if "state_dict" in summary else {}
    reason = summary.get("failure")
    if reason is None and summary.get("frozen_check") is False:
        reason = (f"frozen layers changed during training ({', '.join(summary.get('frozen_mismatched', [])[:5])}): "
                  "the copied layers were not frozen, so this job is not a result")
    common = {"config": spec, "host": config["host"], "node_id": summary.get("node_id"),
              "gpus_held": summary.get("gpus_held"), "attempts": attempt, "started_at": started,
              "finished_at": time.time()}
    if reason is not None:
        log.error("%s failed: %s", key, reason)
        store.write_failed(key, {**common, "reason": reason, "metrics": metrics})
        return {"final": True, "failed": True, "failure_reason": reason, "val_top1": float("nan")}
    uri = store.save_weights(key, summary["state_dict"])
    if spec["treatment"] in ("baseA", "baseB"):
        publish(config["registry"], key, uri)
    store.write(key, {**common, "metrics": metrics, "weights_uri": uri,
                      "base_weights_via": summary.get("base_weights_via"), "versions": _versions()})
    if config["host"] == "train":                  # durable now: the Train run's folder is not needed
        delete_tree(f"{config['storage'].rstrip('/')}/{_train_run_name(spec)}")
    return {**_scalars(metrics), "weights_uri": uri, "final": True}


def run_diagnostic_job(store: JobStore, key: str, spec: dict, config: dict, started: float, attempt: int) -> dict:
    """A diagnostic in the trial's own process (whatever --host says: it trains nothing): read the nets
    it depends on (a base from the object store, others from storage), compute its rows, make them
    durable as the job's record. Its final report names that record (`output_uri`): the searcher's done."""
    import torch

    from ..diagnose import run_diagnostic
    from ..hosts import ensure_dataset, gpus_held, node_id, training_device

    torch.set_num_threads(max(1, int(config["cpus_per_trial"])))
    held = gpus_held()
    device = training_device(held)
    ensure_dataset(spec)
    uris = config.get("base_uris", {})
    rows = run_diagnostic(spec, lambda k: load_base_weights(config["registry"], k, uris[k], config["storage"])[0],
                          device)
    finished = time.time()
    metrics = {"wall_s": finished - started, "rows": len(rows), "device": str(device)}
    uri = store.record_uri(key)
    store.write(key, {"config": spec, "diagnostic": True, "rows": rows, "output_uri": uri, "metrics": metrics,
                      "host": "process", "node_id": node_id(), "gpus_held": held, "attempts": attempt,
                      "started_at": started, "finished_at": finished, "versions": _versions()})
    return {**metrics, "output_uri": uri, "final": True, "val_top1": float("nan")}


def trial_resources(plan, args) -> dict:
    """What one network's trial asks Tune for: its loop (host "process") or its Train driver."""
    if plan.host == "process":
        return {"CPU": args.cpus_per_trial, **({"GPU": plan.gpus_per_worker} if plan.gpus_per_worker else {})}
    if "TRAIN_DRIVER" in ray.cluster_resources():
        return {"CPU": 0, "TRAIN_DRIVER": 1}       # drivers on the on-demand head (cluster.yaml)
    return {"CPU": 0.01}


DIAGNOSTIC_GPU_FRACTION = 0.25                     # a diagnostic runs small forward passes: a share of a GPU


def diagnostic_resources(plan, args) -> dict:
    """A diagnostic runs in its trial's process: one worker's CPUs, and a fraction of a GPU where trials get GPUs."""
    gpu = min(DIAGNOSTIC_GPU_FRACTION, plan.gpus_per_worker) if plan.gpus_per_worker else 0
    return {"CPU": args.cpus_per_trial, **({"GPU": gpu} if gpu else {})}


def job_resources(plan, args):
    """Tune's per-trial resource request (tune.with_resources takes a function of the trial's config):
    a network's trial resources, or a diagnostic's."""
    from ray.tune.execution.placement_groups import resource_dict_to_pg_factory

    network = resource_dict_to_pg_factory(trial_resources(plan, args))
    diagnostic = resource_dict_to_pg_factory(diagnostic_resources(plan, args))

    def resources_of(config: dict):
        return diagnostic if is_diagnostic(str(config.get("treatment", ""))) else network
    return resources_of


def _title(title: str):
    try:
        ray._raylet.setproctitle(title)           # Ray's own (private) setter; cosmetic, so never fatal
    except Exception:
        pass


def load_base_weights(registry: str, base_key: str, uri: str, storage: str):
    """(weights, where from) of a base, for a trial or a Train worker; corrupt weights drop that base's record."""
    try:
        return fetch_base(registry, base_key, uri)
    except CorruptWeights as e:                    # never train on them; the next run retrains that base alone
        JobStore(storage).forget(base_key)
        raise CorruptWeights(f"{e}; dropped the record of base {base_key}: rerun the same command to retrain "
                             "that base alone, then this job") from None


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


def _train_run_name(spec) -> str:
    return f"train-{spec['job_key']}"


def _run_under_train(config, spec, load_base):
    """The job as a TorchTrainer run named after its key, so a retried trial resumes its checkpoints.
    Train itself retries nothing (Tune does): one budget for the job."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from ..hosts import device_checked_torch_config, load_state, train_fn_per_worker

    loop_config = {"spec": spec, "cpus_per_worker": config["cpus_per_trial"], "load_base": load_base,
                   "checkpoint_minutes": config["checkpoint_minutes"]}
    gpus = config["gpus_per_trial"]
    resources = {"CPU": config["cpus_per_trial"], **({"GPU": gpus} if gpus else {})}
    trainer = TorchTrainer(
        train_fn_per_worker, train_loop_config=loop_config,
        torch_config=device_checked_torch_config(),       # gloo where the workers train on the CPU (a test cluster)
        scaling_config=ray.train.ScalingConfig(num_workers=config["workers_per_trial"], use_gpu=gpus > 0,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(name=_train_run_name(spec), **run_storage(config["storage"]),
                                       callbacks=[TuneReportCallback()],
                                       failure_config=ray.train.FailureConfig(max_failures=0),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1)))
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


def init_ray(args) -> str:
    """Join the cluster at --address, or start a local Ray; print (and return) the dashboard URL."""
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
    return f"http://{url}" if url else ""


def check_address(address: str | None):
    """An --address that does not answer as Ray fails now, with one clear message, not after minutes of
    retries: a host that does not resolve, a closed port, a port that is not Ray's GCS."""
    if not address or address in ("auto", "local") or address.startswith("ray://"):
        return
    named, _, port = address.rpartition(":")
    named = named or "127.0.0.1"
    host = named.strip("[]")                        # [::1]:6379
    try:
        socket.getaddrinfo(host, None)
    except (OSError, UnicodeError) as e:
        raise SweepError(f"Ray address {address}: no host {host} ({e}): fix --address (the head node's IP:6379, or "
                         "auto on the head itself)") from None
    try:
        socket.create_connection((host, int(port or 6379)), timeout=5).close()
    except (OSError, ValueError) as e:
        raise SweepError(f"Ray address {address} is unreachable ({e}): start the cluster (ray up / ray start --head) "
                         "or fix --address") from None
    why = _not_ray(f"{named}:{int(port or 6379)}")
    if why:          # ray.init would retry it for many minutes, logging "Failed to connect to GCS" each time
        raise SweepError(f"Ray address {address} answers, but not as a Ray cluster ({why}): give the head's GCS "
                         "address (IP:6379, the port of `ray start --head --port`; not the dashboard's 8265 or "
                         "ray://...:10001) or fix --address") from None


def _not_ray(address: str, timeout_s: float = 10.0) -> str | None:
    """None when `address` answers a call of Ray's GCS (a refusal, e.g. of a missing auth token, is still
    Ray answering), else what it did instead: no gRPC (an HTTP or other server), no answer in time, no GCS."""
    import grpc
    from ray._private.grpc_utils import init_grpc_channel
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    channel = init_grpc_channel(address)
    try:
        gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(gcs_service_pb2.GetClusterIdRequest(),
                                                                         timeout=timeout_s)
    except grpc.RpcError as e:
        code = e.code()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return f"no reply to a Ray call in {timeout_s:.0f} s"
        if code == grpc.StatusCode.UNAVAILABLE:       # the port is open (checked): it does not speak gRPC
            return f"no gRPC there: {(e.details() or '').rsplit(': ', 1)[-1][:200]}"
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return "a gRPC server without Ray's GCS"
    finally:
        channel.close()
    return None


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


def run_storage(storage: str) -> dict:
    """Tune's / Train's RunConfig storage arguments: a URI through storage.py's patient filesystem
    (it waits out a storage that stutters), a local folder as Ray opens it."""
    path, fs = tune_storage(storage)
    return {"storage_path": path, **({"storage_filesystem": fs} if fs is not None else {})}


class StorageWatch(tune.Callback):
    """Ends the Tune loop once this driver gave up on the storage (it did not answer for the whole wait
    budget: Tune's snapshot, a heartbeat or a record read): the runner then says so, with --resume."""

    def __init__(self, storage: str):
        self.storage = storage

    def on_step_end(self, iteration, trials, **info):
        if unavailable(self.storage):
            raise StorageUnavailable(resume_hint(self.storage))


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
        key = trial.config.get("job_key", "")
        if preempted_error(_trial_error(trial)):
            log.warning("%s: its node was preempted; it restarts from its last checkpoint (not a failure: "
                        "--max-failures is not spent)", key)
            try:
                JobStore(self.storage).note_preemption(key, _last_error_line(trial))
            except Exception as e:                 # a note, never a reason to stop the sweep
                log.warning("%s: its preemption was not noted in the job store (%s)", key, e)

    def on_trial_error(self, iteration, trials, trial, **info):
        key = trial.config.get("job_key", "")
        try:
            store = JobStore(self.storage)
            if store.read(key) is None and key not in store.failed():
                reason = (f"{_last_error_line(trial) or 'its trial errored'} (after {len(store.attempts(key))} "
                          f"attempt(s), {trial.run_metadata.num_failures} counted as failures; rerun the same "
                          "command to retry it)")
                store.write_failed(key, {"config": trial.config.get("spec"), "reason": reason, "metrics": {},
                                         "attempts": len(store.attempts(key)), "finished_at": time.time()})
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


class TrialCleanup(tune.Callback):
    """Once a job's record is durable, its Tune trial folder (checkpoints, logs) goes: in storage and in
    the driver's staging copy, which Tune would otherwise upload again at its next snapshot.

    Not at once: until Tune's experiment snapshot in storage knows the trial ended, a driver killed
    now would be resumed (--resume) with that trial still running, and Tune would try to restore it
    from the deleted checkpoint. So a folder goes once a snapshot newer than the trial's end is in
    storage; `remove_done_trial_folders` takes whatever is left when the sweep ends."""

    def __init__(self, storage: str, check_every_s: float = 5.0):
        self.storage, self.check_every_s = storage, check_every_s
        self.pending, self.last_check = [], 0.0

    def on_trial_complete(self, iteration, trials, trial, **info):
        if JobStore(self.storage).read(trial.config.get("job_key", "")) is not None:
            self.pending.append((time.time(), trial))      # failed or unfinished: its folder helps to see why

    def on_step_end(self, iteration, trials, **info):
        if not self.pending or time.time() - self.last_check < self.check_every_s:
            return
        self.last_check = time.time()
        storage = self.pending[0][1].storage
        snapshot = _newest_snapshot(storage.storage_filesystem, storage.experiment_fs_path)
        keep = []
        for ended, trial in self.pending:
            if snapshot > ended + 1.0:                     # mtime resolution: a second to spare
                if trial.local_path:
                    keep_tensorboard(_local_fs(), trial.local_path, self.storage, trial.config["job_key"])
                _remove_trial_folder(trial.storage.storage_filesystem, trial.path, trial.local_path)
            else:
                keep.append((ended, trial))
        self.pending = keep


def _local_fs():
    import pyarrow.fs
    return pyarrow.fs.LocalFileSystem()


def _newest_snapshot(fs, exp_path: str) -> float:
    import pyarrow.fs

    infos = fs.get_file_info(pyarrow.fs.FileSelector(exp_path, allow_not_found=True))
    times = [i.mtime.timestamp() for i in infos if i.base_name.startswith("experiment_state") and i.mtime]
    return max(times, default=0.0)


def _remove_trial_folder(fs, path: str, local_path: str | None = None):
    import shutil

    try:
        fs.delete_dir(path)
    except (FileNotFoundError, OSError):
        pass
    if local_path:
        shutil.rmtree(local_path, ignore_errors=True)


def remove_done_trial_folders(store: JobStore, exp_path: str) -> int:
    """After the sweep (Tune's last snapshot written): the trial folders of every done job (their
    TensorBoard event files kept under STORAGE/tensorboard/)."""
    import pyarrow.fs

    from .store import _split_uri

    fs, root = _split_uri(exp_path)
    done, removed = store.completed(refresh=True), 0
    for info in fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True)):
        key = info.base_name.rsplit("_", 1)[0]
        if info.type == pyarrow.fs.FileType.Directory and key in done:
            keep_tensorboard(fs, info.path, store.storage, key)
            _remove_trial_folder(fs, info.path)
            removed += 1
    return removed


NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "ceph", "fuse", "9p", "beegfs", "glusterfs")


def check_storage(storage: str, args):
    """A local --storage must be one folder that every node sees: trials on any node write their
    checkpoints and records there. Probed on the nodes alive now; a warning for nodes added later."""
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


def check_dataset(jobs, types=()):
    """--data must be the same prepared dataset, at the same path, on every node: a trial checks it at its
    start (hosts.ensure_dataset) and fails its job, so a node without it would fail every job sent there.
    Probed on the nodes alive now, before anything trains; a note for nodes an autoscaler adds later. The
    built-in synthetic dataset needs no probe: a node that lacks it prepares it."""
    specs = {j.spec["data_dir"]: j.spec for j in jobs if not j.spec.get("synthetic")}
    if not specs:
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    here = ray.get_runtime_context().get_node_id()
    for data_dir, spec in specs.items():
        light = {"data_dir": data_dir, "dataset_fingerprint": spec.get("dataset_fingerprint")}
        probes = [_dataset_probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
                                         ).remote(light) for n in nodes if n["NodeID"] != here]
        answers = iter(ray.get(probes, timeout=120))           # the driver's node: read here, no task
        whys = [_dataset_problem(light) if n["NodeID"] == here else next(answers) for n in nodes]
        bad = [(n, why) for n, why in zip(nodes, whys) if why]
        if bad:
            (first, why), rest = bad[0], bad[1:]
            also = f"; also {', '.join(_node_name(n) for n, _ in rest[:5])}" if rest else ""
            raise SweepError(f"--data {data_dir} is not the prepared dataset on {len(bad)} of the cluster's "
                             f"{len(nodes)} nodes, so every job sent there would fail: node {_node_name(first)} "
                             f"{why}{also}")
        if any(t.launchable for t in types):
            print(f"[sweep] note: --data {data_dir} checked on the {len(nodes)} node(s) alive now; nodes the "
                  "autoscaler adds later must hold the same betons at that path (docs/cluster.md: stage them in "
                  "the setup commands), or their jobs fail with the reason", flush=True)


def _node_name(node: dict) -> str:
    return f"{node['NodeManagerAddress']} ({node['NodeID'][:8]})"


def _dataset_problem(spec: dict) -> str | None:
    """On this node: what is wrong with the dataset there (hosts.dataset_problem), None if nothing."""
    from ..hosts import dataset_problem

    try:
        return dataset_problem(spec)
    except (OSError, ValueError) as e:           # an unreadable or garbled manifest
        return f"cannot read the dataset at {spec['data_dir']}: {type(e).__name__}: {e}"


_dataset_probe = ray.remote(num_cpus=0)(_dataset_problem)      # the same, on a node of the cluster


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


def fit_sweep(jobs, done: dict, store: JobStore, storage: str, exp_name: str, args, callbacks=(),
              on_ready=None) -> dict:
    """[3] Ray, the trial plan and the registry, [4] one Tuner.fit() (or Tuner.restore with --resume);
    the registry (and every base copy it holds) is removed when the sweep ends, however it ends.
    Nothing is written to the storage before every check has passed; then `on_ready()` runs."""
    dashboard = init_ray(args)
    started = False
    registry = registry_name(f"{exp_name}-{hashlib.sha256(storage.encode()).hexdigest()[:6]}")
    try:
        types = cluster_node_types()
        plan = plan_trials(types, args.gpus_per_trial, args.workers_per_trial, args.cpus_per_trial, args.host,
                           args.max_concurrent)
        args.cpus_per_trial = plan.cpus_per_worker        # None asked: from the node types (capacity.py)
        check_storage(storage, args)
        check_dataset(jobs, types)
        get_or_create_registry(registry)
        todo = [j for j in jobs if j.key not in done]
        where = ", ".join(plan.fitting)
        size = f"{plan.gpus_per_worker:g} GPU + {args.cpus_per_trial:g} CPU" + \
            (f" ({plan.cpus_from})" if plan.cpus_from != "asked" and plan.gpus_per_worker else "") + \
            (f" x {args.workers_per_trial} workers" if args.workers_per_trial > 1 else "")
        at_once = f"up to {plan.concurrency} at once" if plan.concurrency else "as many at once as the autoscaler launches"
        print(f"[sweep] {len(jobs)} jobs, {len(jobs) - len(todo)} done, {len(todo)} to run; host={plan.host}, "
              f"{size} per trial on {where}; {at_once}", flush=True)
        started = True
        if on_ready is not None:
            on_ready()
        store.write_sweep({"experiment": exp_name, "gpus_per_trial": plan.gpus_per_worker * args.workers_per_trial,
                           "jobs": [j.row() for j in jobs]})
        if not todo:
            return {"plan": plan, "dashboard": dashboard}
        trainable = tune.with_resources(run_job, job_resources(plan, args))
        constants = {"storage": storage, "host": plan.host, "cpus_per_trial": args.cpus_per_trial,
                     "gpus_per_trial": plan.gpus_per_worker, "workers_per_trial": args.workers_per_trial,
                     "checkpoint_minutes": args.checkpoint_minutes, "registry": registry}
        progress = SweepProgress(len(jobs), len(jobs) - len(todo), plan.concurrency, store=store, dashboard=dashboard)
        exp_path = f"{storage.rstrip('/')}/{exp_name}"
        # Tune warns at every experiment snapshot of short trials; the snapshot is what makes --resume safe.
        # Its closing analysis misses the trial folders TrialCleanup removed: the job store has the results.
        logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
        if args.resume:
            tune_path, fs = tune_storage(storage)
            tuner = tune.Tuner.restore(f"{tune_path.rstrip('/')}/{exp_name}", trainable=trainable, resume_errored=True,
                                       storage_filesystem=fs)
        else:
            searcher = DependencySearcher(jobs, done={k: r.get("weights_uri") or r.get("output_uri")
                                                      for k, r in done.items()},
                                          release=functools.partial(drop, registry))
            tuner = tune.Tuner(
                trainable, param_space=constants,
                tune_config=tune.TuneConfig(search_alg=searcher, num_samples=len(todo),     # Tune's banner: the real count
                                            max_concurrent_trials=plan.concurrency,
                                            reuse_actors=plan.host == "process",
                                            trial_name_creator=lambda t: t.config["job_key"],
                                            trial_dirname_creator=lambda t: f"{t.config['job_key']}_{t.trial_id}"),
                run_config=tune.RunConfig(name=exp_name, **run_storage(storage), verbose=0,
                                          callbacks=[progress, TrialCleanup(storage), RetryNotes(storage),
                                                     JobIndexKeeper(storage),
                                                     StorageWatch(storage), *callbacks],
                                          failure_config=tune.FailureConfig(max_failures=args.max_failures),
                                          checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
        tuner.fit()
        remove_done_trial_folders(store, exp_path)
        return {"plan": plan, "dashboard": dashboard}
    finally:
        try:
            if started:
                store.write_heartbeat({"running": [], "ended": True, "dashboard": dashboard})   # for `status`
        except OSError:
            pass
        try:
            remove_registry(registry)
        finally:
            if not args.address:
                ray.shutdown()
