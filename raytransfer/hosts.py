"""Two hosts for the one training loop: the Tune trial's own process, or Ray Train workers (DDP).

Both report every epoch with a checkpoint (the loop's state, written by rank 0) and resume from
the last reported checkpoint when the trial or a worker restarts. The last report of a trial
carries its summary (top1_best10, frozen_check, ...) with `final=True`; under Ray Train it also
carries the final state's checkpoint, so `result.metrics` is the summary and `result.checkpoint`
the final weights (the summary is also the per-worker function's return value).

    # inside a Tune function trainable (tiny CPU trial):
    summary = run_in_tune_process(spec, base_state)
    # as Ray Train's per-worker function:
    TorchTrainer(train_fn_per_worker, train_loop_config={"spec": spec, "base_uri": uri}, ...)
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch

from .trial import run_trial

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


def run_in_tune_process(spec: dict, base_state: dict | None, num_threads: int = 1) -> dict:
    """Host 1: the loop inside the Tune trial's own process (one CPU, no process group)."""
    import ray.tune

    torch.set_num_threads(num_threads)
    resume, note = resume_state(ray.tune.get_checkpoint(), spec["job_key"])

    def report(metrics, state):
        export_metrics(spec, metrics)
        with tempfile.TemporaryDirectory() as d:
            save_state(state, d)
            ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(d))

    summary = run_trial(spec, torch.device("cpu"), base_state, report, resume, num_workers=num_threads)
    return {**summary, **note}


def resume_state(ckpt, job_key: str) -> tuple[dict | None, dict]:
    """The state to resume from (None: from scratch) and a note for the job's record.

    A checkpoint that cannot be read is skipped with a warning, so the trial restarts from scratch
    instead of failing on every retry and every --resume.
    """
    if ckpt is None:
        return None, {"resumed_from_epoch": None}
    try:
        with ckpt.as_directory() as d:
            state = load_state(d)
    except CheckpointError as e:
        log.warning("%s: %s -- restarting this trial from scratch", job_key, e)
        return None, {"resumed_from_epoch": None, "discarded_checkpoint": str(e)}
    return state, {"resumed_from_epoch": int(state["epoch"])}


def train_fn_per_worker(config: dict):
    """Host 2: Ray Train's per-worker function (DDP over the TorchTrainer's workers)."""
    import ray.train
    import ray.train.torch

    spec = config["spec"]
    base_state = None
    if config.get("base_ref"):
        import ray
        base_state = ray.get(config["base_ref"][0])            # zero-copy numpy from the object store
    elif config.get("base_uri"):
        from .sweep.store import load_weights
        base_state = load_weights(config["base_uri"])
    resume, note = resume_state(ray.train.get_checkpoint(), spec["job_key"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    threads = max(1, int(config.get("cpus_per_worker", 1)))
    torch.set_num_threads(threads)

    last = {"state": resume}

    def report(metrics, state):
        last["state"] = state
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                export_metrics(spec, metrics)
                save_state(state, d)
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)

    wrap = ray.train.torch.prepare_model if world > 1 else None
    summary = run_trial(spec, device, base_state, report, resume, distributed=world > 1, wrap_model=wrap,
                        num_workers=threads)
    # The summary goes out with a checkpoint of the final state: in Ray 2.60 `Result.metrics` holds the
    # metrics of the latest *checkpointed* report, so a summary reported alone never reached it.
    final = summary_metrics({**summary, **note})
    report(final, last["state"])
    return final


_GAUGES: dict = {}


def export_metrics(spec: dict, metrics: dict):
    """Each epoch's metrics as Ray metrics (tagged by job), for the dashboard's Metrics page / Grafana."""
    from ray.util.metrics import Gauge

    tags = {"job_key": spec.get("job_key", ""), "treatment": spec.get("treatment", "")}
    for name in ("val_top1", "val_top5", "train_loss", "images_per_s", "epoch"):
        if name in metrics:
            if name not in _GAUGES:
                _GAUGES[name] = Gauge(f"raytransfer_{name}", description=f"{name} of a raytransfer job, per epoch",
                                      tag_keys=("job_key", "treatment"))
            _GAUGES[name].set(float(metrics[name]), tags=tags)
