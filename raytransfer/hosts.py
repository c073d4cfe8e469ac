"""Two hosts for the one training loop: the Tune trial's own process, or Ray Train workers (DDP).

Both report every epoch with a checkpoint (the loop's state, written by rank 0) and resume from
the last reported checkpoint when the trial or a worker restarts. The last report of a trial
carries its summary (top1_best10, frozen_check, ...) with `final=True`.

    # inside a Tune function trainable (tiny CPU trial):
    summary = run_in_tune_process(spec, base_state)
    # as Ray Train's per-worker function:
    TorchTrainer(train_fn_per_worker, train_loop_config={"spec": spec, "base_uri": uri}, ...)
"""
from __future__ import annotations

import logging
import os
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
    """The scalar part of a trial summary, as reported (weights travel in checkpoints)."""
    return {k: v for k, v in summary.items() if k != "state_dict"} | {"final": True}


def run_in_tune_process(spec: dict, base_state: dict | None, num_threads: int = 1) -> dict:
    """Host 1: the loop inside the Tune trial's own process (one CPU, no process group)."""
    import ray.tune

    torch.set_num_threads(num_threads)
    ckpt = ray.tune.get_checkpoint()
    resume = None
    if ckpt is not None:
        with ckpt.as_directory() as d:
            resume = load_state(d)

    def report(metrics, state):
        with tempfile.TemporaryDirectory() as d:
            save_state(state, d)
            ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(d))

    summary = run_trial(spec, torch.device("cpu"), base_state, report, resume, num_workers=num_threads)
    return summary


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
        base_state = load_weights_uri(config["base_uri"])
    ckpt = ray.train.get_checkpoint()
    resume = None
    if ckpt is not None:
        with ckpt.as_directory() as d:
            resume = load_state(d)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    threads = max(1, int(config.get("cpus_per_worker", 1)))
    torch.set_num_threads(threads)

    def report(metrics, state):
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                save_state(state, d)
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)

    wrap = ray.train.torch.prepare_model if world > 1 else None
    summary = run_trial(spec, device, base_state, report, resume, distributed=world > 1, wrap_model=wrap,
                        num_workers=threads)
    ray.train.report(summary_metrics(summary))


def load_weights_uri(uri: str) -> dict:
    """Final weights of a finished job from its checkpoint URI (local path or s3://...)."""
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    with tempfile.TemporaryDirectory() as d:
        pyarrow.fs.copy_files(f"{path}/{STATE_FILE}", os.path.join(d, STATE_FILE), source_filesystem=fs)
        return load_state(d)["model"]
