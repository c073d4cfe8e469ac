"""Two hosts for the one training loop: the Tune trial's own process, or Ray Train workers (DDP).

Both report at each of the loop's records (every epoch, or every evaluation where the recipe evaluates by
iterations), with a checkpoint (the loop's state, written by rank 0) every `checkpoint_minutes` and after
the last step, and resume from the last checkpoint when the trial restarts. Nothing here imports the
sweep: the base weights come through a `load_base` callable. The last report of a trial
carries its summary (top1_best10, frozen_check, ...) with `final=True`; under Ray Train it also
carries the final state's checkpoint, so `result.metrics` is the summary and `result.checkpoint`
the final weights (the summary is also the per-worker function's return value).

    # inside a Tune function trainable (one worker, CPU or one GPU):
    summary = run_in_tune_process(spec, load_base)
    # as Ray Train's per-worker function (several workers, DDP):
    TorchTrainer(train_fn_per_worker, train_loop_config={"spec": spec, "load_base": load_base}, ...)
"""
from __future__ import annotations

import functools
import json
import logging
import tempfile
from pathlib import Path

import torch

from .trial import build_cohort, train_cohort

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read: named, with what to do."""


def save_state(state: dict, directory) -> Path:
    path = Path(directory) / STATE_FILE
    torch.save(state, path)
    return path


def load_state(directory) -> dict:
    """A checkpoint's state, loaded with weights_only=True (no code runs from a checkpoint file)."""
    path = Path(directory) / STATE_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); "
                              "delete it to retrain that job") from e


def summary_metrics(summary: dict) -> dict:
    """The scalar part of a trial summary, as reported (weights travel in checkpoints). It carries
    `val_top1` (= the final top-1) like every epoch's report: Tune checks each report for the
    searcher's metric."""
    return {k: v for k, v in summary.items() if k != "state_dict"} | {"final": True, "val_top1": summary.get("top1_final")}


class TrialSetupError(RuntimeError):
    """This trial cannot run on this node as configured (no CUDA for a GPU trial, another dataset at
    the spec's path): retrying will not help, so the job fails at once with this message."""


def node_id() -> str:
    import ray
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "(no Ray: this machine)"


def gpus_held() -> float:
    """GPUs this process holds from Ray (fractions included; 0 outside a GPU task or actor)."""
    import ray
    if not ray.is_initialized():
        return 0.0
    ctx = ray.get_runtime_context()
    held = ctx.get_assigned_resources()
    gpus = sum(v for k, v in held.items() if k == "GPU" or (k.startswith("GPU_group_") and k.count("_") == 2))
    return float(gpus or len(ray.get_gpu_ids()))


def node_is_test_cluster() -> bool:
    """The node carries the test-cluster resource (clusters/local-autoscaling.yaml): its GPUs may be fake."""
    import ray
    if not ray.is_initialized():
        return False
    here = node_id()
    for n in ray.nodes():
        if n["NodeID"] == here:
            return n["Resources"].get("raytransfer_test_cluster", 0) > 0
    return False


def training_device(held: float) -> torch.device:
    """CUDA for a trial that holds GPUs; the CPU for one that holds none. A GPU trial on a node without
    CUDA trains on the CPU only on a test cluster: anywhere else that is a configuration error."""
    if held <= 0:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if node_is_test_cluster():
        log.warning("holding %g GPU(s) of a test cluster without CUDA: training on the CPU", held)
        return torch.device("cpu")
    import os
    raise TrialSetupError(
        f"this trial holds {held:g} GPU(s) on node {node_id()} but CUDA is not available there (torch "
        f"{torch.__version__}, built for CUDA {torch.version.cuda or 'none'}, CUDA_VISIBLE_DEVICES="
        f"{os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}): install a CUDA build of torch and the NVIDIA driver "
        "on the GPU nodes (cluster.yaml's image does), or run CPU trials with --gpus-per-trial 0. raytransfer "
        "never trains a GPU trial on the CPU, except on a test cluster (nodes with the raytransfer_test_cluster "
        "resource)")


def check_train_worker_device() -> str:
    """On each Ray Train worker before its process group starts: "cuda" where it holds GPUs and CUDA works,
    else "cpu". It never raises (an error there would leave Train's worker group reserved): a worker
    holding GPUs without CUDA off a test cluster fails in the loop instead (training_device), as one
    TrialSetupError, where Train cleans up."""
    return "cuda" if gpus_held() > 0 and torch.cuda.is_available() else "cpu"


def device_checked_torch_config():
    """Ray Train's TorchConfig, with the backend chosen from the workers' devices: Ray picks NCCL for any
    worker that holds a GPU and moves the model to CUDA, which on a test cluster's fake GPUs fails
    ("ProcessGroupNCCL is only supported with GPUs"); here every worker first checks its device
    (`check_train_worker_device`) and a group with any worker on the CPU gets gloo (a test cluster's; on
    a real cluster the loop then fails those workers with the reason). Subclasses Ray's private
    `_TorchBackend` (ray 2.60): the only hook that runs on the workers before the process group."""
    import dataclasses

    from ray.train.torch import TorchConfig
    from ray.train.torch.config import _TorchBackend

    class DeviceCheckedBackend(_TorchBackend):
        def on_start(self, worker_group, backend_config):
            devices = set(worker_group.execute(check_train_worker_device))
            if "cpu" in devices and backend_config.backend in (None, "nccl"):    # Ray sets nccl for use_gpu
                backend_config = dataclasses.replace(backend_config, backend="gloo")
            super().on_start(worker_group, backend_config)

    @dataclasses.dataclass
    class DeviceCheckedTorchConfig(TorchConfig):
        @property
        def backend_cls(self):
            return DeviceCheckedBackend

    return DeviceCheckedTorchConfig()


def ensure_dataset(spec: dict):
    """The dataset the spec names, on this node: the built-in synthetic one is prepared here when this
    node lacks it (deterministic from its spec); any dataset must carry the spec's fingerprint."""
    import fcntl

    from .prepare import prepare, read_manifest

    data_dir = Path(spec["data_dir"])
    manifest = read_manifest(data_dir, missing_ok=True)
    if manifest is None and spec.get("synthetic"):
        from .synthetic import SyntheticSpec
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{data_dir}.lock", "w") as lock:         # trials of one node prepare it once
            fcntl.flock(lock, fcntl.LOCK_EX)
            log.info("preparing the built-in dataset on node %s: %s", node_id(), data_dir)
            manifest = prepare("synthetic", None, data_dir, resolution=None, synthetic=SyntheticSpec(**spec["synthetic"]))
    problem = dataset_problem(spec, manifest)
    if problem:
        raise TrialSetupError(f"node {node_id()} {problem}")


def dataset_problem(spec: dict, manifest: dict | None = None) -> str | None:
    """What is wrong with the spec's dataset on this node, worded to follow "node <id> " (None: nothing):
    no prepared dataset at its path, another dataset there (fingerprint), betons missing or cut short.
    Cheap (a manifest and two stats): the sweep probes every node with it before anything trains."""
    from .prepare import DatasetError, read_manifest, verify_betons

    data_dir = Path(spec["data_dir"])
    if manifest is None:
        manifest = read_manifest(data_dir, missing_ok=True)
    want = spec.get("dataset_fingerprint")
    if manifest is None:
        return (f"has no prepared dataset at {data_dir}: stage the betons at the same path on every node "
                "(docs/cluster.md: `aws s3 sync` in the setup commands), or point --data at a shared filesystem")
    if want and manifest.get("fingerprint") != want:
        return (f"holds another dataset at {data_dir} (fingerprint {str(manifest.get('fingerprint'))[:12]}, the "
                f"job expects {want[:12]}): stage the same prepared betons on every node, or rerun the sweep "
                "against the dataset there")
    try:
        verify_betons(data_dir, manifest)
    except DatasetError as e:
        return f"has a damaged copy: {e}"
    return None


class Checkpointer:
    """When a report carries a checkpoint: every `minutes` of training (0: every report) and after the
    last step (or epoch). Counts what it writes, for each job's record: a cohort's checkpoint holds every
    member, and each member is counted its own part of it (its weights and optimizer state)."""

    def __init__(self, minutes: float):
        import time
        self.every_s, self.clock = minutes * 60, time.monotonic
        self.last, self.count, self.bytes, self.parts = self.clock(), 0, 0, {}

    def due(self, metrics: dict) -> bool:
        if metrics.get("total_steps") is not None:    # the loop's records: the last is the last step's
            last = metrics["step"] >= metrics["total_steps"]
        else:
            last = metrics.get("epochs") is not None and metrics["epoch"] + 1 >= metrics["epochs"]
        return last or self.clock() - self.last >= self.every_s

    def save(self, state: dict, directory) -> Path:
        path = save_state(state, directory)
        size = path.stat().st_size
        self.last, self.count, self.bytes = self.clock(), self.count + 1, self.bytes + size
        members = {k: _nbytes(v) for k, v in state.get("members", {}).items()}
        for k, b in members.items():
            self.parts[k] = self.parts.get(k, 0) + size * b / max(1, sum(members.values()))
        return path

    def note(self, key: str | None = None) -> dict:
        """What was written: in all, or a member's part (`key`)."""
        written = self.bytes if key is None else round(self.parts.get(key, 0))
        return {"checkpoints_written": self.count, "checkpoint_bytes": written}


def _nbytes(value) -> int:
    """Bytes of the tensors in a (nested) state."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


def show_progress():
    """The loop's progress lines (INFO, loop.LOG_EVERY_S) in the worker's log: Ray's worker processes give the
    root logger no handler, so without one only warnings would reach it."""
    logger = logging.getLogger("raytransfer")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def cohort_report(records: dict) -> dict:
    """One Tune report of a cohort's record: its first member's metrics as they are (a cohort of one reports
    like a lone net), every member's in `records` (JSON: {job key: metrics}; the driver's callbacks split it)."""
    first = next(iter(records.values()))
    return {**first, "records": json.dumps(records)}


def final_report(summaries: dict) -> dict:
    """The scalar final report of a cohort: its first member's summary metrics, and every member's in
    `summaries` (JSON)."""
    scalars = {k: summary_metrics(s) for k, s in summaries.items()}
    return {**next(iter(scalars.values())), "summaries": json.dumps(scalars, default=str)}


def _note_deferred(report, deferred: list):
    """Tell the driver at once which members this trial handed back (they did not fit its memory): the searcher
    releases them to another trial (a report that carries no record)."""
    if deferred:
        report({"deferred": json.dumps(deferred), "val_top1": float("nan")})


def run_in_tune_process(specs: list[dict], load_bases=None, num_threads: int = 1, checkpoint_minutes: float = 10.0,
                        start=None) -> dict:
    """Host 1: the cohort's loop inside the Tune trial's own process (one worker: CPU, or the GPU Tune gave it).
    `load_bases()` returns ({job key: its base's weights}, {job key: where they came from}); `start(cohort,
    resume)` returns the keys this trial trains (the sweep's: the memory split, attempts counted); the sweep
    hands both in. Returns {"members": {job key: summary}, "deferred": [job keys handed back]}."""
    import ray.tune

    show_progress()
    torch.set_num_threads(num_threads)
    held = gpus_held()
    device = training_device(held)
    ensure_dataset(specs[0])
    bases, via = load_bases() if load_bases else ({}, {})
    cohort = build_cohort(specs, device, bases, num_workers=num_threads)
    resume, note = resume_state(ray.tune.get_checkpoint(), cohort_name(cohort.keys()))
    kept = start(cohort, resume) if start is not None else cohort.keys()
    deferred = [k for k in cohort.keys() if k not in kept]
    cohort.keep(kept)
    _note_deferred(ray.tune.report, deferred)
    ckpt = Checkpointer(checkpoint_minutes)

    def report(records, state):
        for key, metrics in records.items():
            export_metrics(cohort.specs[key], metrics)
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if any(ckpt.due(m) for m in records.values()):
                ckpt.save(state, d)
                checkpoint = ray.tune.Checkpoint.from_directory(d)
            ray.tune.report(cohort_report(records), checkpoint=checkpoint)

    summaries = train_cohort(cohort, report, resume)
    where = {"node_id": node_id(), "gpus_held": held, "device": str(device), **note}
    return {"members": {k: {**s, **where, **ckpt.note(k), "base_weights_via": via.get(k)} for k, s in summaries.items()},
            "deferred": deferred}


def cohort_name(keys) -> str:
    """A cohort as logs and the dashboard name it: its one job's key, or the first key and how many more."""
    keys = list(keys)
    return keys[0] if len(keys) == 1 else f"{keys[0]} +{len(keys) - 1} more"


def resume_state(ckpt, name: str) -> tuple[dict | None, dict]:
    """The state to resume from (None: from scratch) and a note for the jobs' records.

    A checkpoint that cannot be read is skipped with a warning, so the trial restarts from scratch
    instead of failing on every retry and every --resume.
    """
    if ckpt is None:
        return None, {"resumed_from_epoch": None}
    try:
        with ckpt.as_directory() as d:
            state = load_state(d)
    except CheckpointError as e:
        log.warning("%s: %s -- restarting this trial from scratch", name, e)
        return None, {"resumed_from_epoch": None, "discarded_checkpoint": str(e)}
    return state, {"resumed_from_epoch": int(state["epoch"])}


def train_fn_per_worker(config: dict):
    """Host 2: Ray Train's per-worker function (DDP over the TorchTrainer's workers), for a cohort
    (`config["specs"]`). Each worker reads the base weights itself through `config["load_bases"]` (the object
    store: once per node); rank 0 runs `config["start"]` (the sweep's: which members, attempts counted) and
    every rank takes its answer. The last report carries the summaries (`final_report`) and a checkpoint of
    the final state, so `result.metrics` is the summary and `result.checkpoint` every member's weights."""
    import ray.train
    import ray.train.torch

    specs = config["specs"]
    show_progress()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    held = gpus_held()
    device = ray.train.torch.get_device() if held > 0 and torch.cuda.is_available() else training_device(held)
    ensure_dataset(specs[0])
    load_bases = config.get("load_bases")
    bases, via = load_bases() if load_bases else ({}, {})
    threads = max(1, int(config.get("cpus_per_worker", 1)))
    torch.set_num_threads(threads)
    # prepare_model moves the model to Ray's device (CUDA for a worker holding a GPU): give it ours
    wrap = functools.partial(ray.train.torch.prepare_model, move_to_device=device) if world > 1 else None
    cohort = build_cohort(specs, device, bases, distributed=world > 1, wrap_model=wrap, num_workers=threads)
    resume, note = resume_state(ray.train.get_checkpoint(), cohort_name(cohort.keys()))
    start = config.get("start")
    kept = [start(cohort, resume) if start is not None and rank == 0 else cohort.keys()]
    if world > 1:
        torch.distributed.broadcast_object_list(kept, src=0)
    kept = kept[0]
    deferred = [k for k in cohort.keys() if k not in kept]
    cohort.keep(kept)
    _note_deferred(ray.train.report, deferred)
    ckpt = Checkpointer(config.get("checkpoint_minutes", 10.0))
    last = {"state": resume}

    def report(records, state, final=None):
        """A record of the loop ({job key: metrics}), or with `final` the summaries and the final state."""
        last["state"] = state
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            due = final is not None or any(ckpt.due(m) for m in records.values())
            if rank == 0:
                for key, metrics in records.items():
                    export_metrics(cohort.specs[key], metrics)
                if due:
                    ckpt.save(state, d)
                    checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(final if final is not None else cohort_report(records), checkpoint=checkpoint)

    summaries = train_cohort(cohort, report, resume)
    total_gpus = held
    if world > 1:                                      # GPUs held by the whole worker group
        t = torch.tensor([held], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        total_gpus = float(t.item())
    where = {**note, "node_id": node_id(), "gpus_held": total_gpus, "device": str(device)}
    # The summary goes out with a checkpoint of the final state: in Ray 2.60 `Result.metrics` holds the
    # metrics of the latest *checkpointed* report, so a summary reported alone never reached it.
    final = final_report({k: {**s, **where, **ckpt.note(k), "base_weights_via": via.get(k)}
                          for k, s in summaries.items()})
    final["deferred"] = json.dumps(deferred)
    report({}, last["state"], final=final)
    return final


_GAUGES: dict = {}


def export_metrics(spec: dict, metrics: dict):
    """Each record's metrics (an epoch's or an evaluation's, loop.py) as Ray metrics (tagged by job), for the
    dashboard's Metrics page / Grafana."""
    from ray.util.metrics import Gauge

    tags = {"job_key": spec.get("job_key", ""), "treatment": spec.get("treatment", "")}
    for name in ("val_top1", "val_top5", "train_loss", "images_per_s", "input_wait_s", "epoch", "step"):
        if name in metrics:
            if name not in _GAUGES:
                _GAUGES[name] = Gauge(f"raytransfer_{name}", description=f"{name} of a raytransfer job, per record",
                                      tag_keys=("job_key", "treatment"))
            _GAUGES[name].set(float(metrics[name]), tags=tags)
