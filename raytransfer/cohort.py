"""What makes jobs one cohort, and how many of its members fit a trial's memory.

A cohort is a set of jobs that read the same target half with the same recipe, training seed and input: one
trial trains them all from one seeded batch stream (loop.fit_cohort), so the stream's identity is the part of
a job's spec that decides its batches (`stream_key`). Treatment, n and the base a job copies from are not
part of it: a base, its selffers and transfers, frozen and fine-tuned, and the controls of one half all read
the same batches.

Memory is measured per member, not guessed (`member_bytes`): its parameters and buffers, a gradient and a
momentum buffer for each trainable parameter, the tensors autograd saves for the backward pass on one
training batch (counted by a forward pass of a copy under torch's saved-tensor hooks), and the table of
looked-up frozen outputs where it has one. A trial keeps the members that fit its budget (GPU: the free
memory less a headroom; CPU: half of the node's available memory) and hands the rest back to the searcher,
which releases them in another cohort.

    stream_key(spec)                                   # jobs with equal keys may share a trial
    kept, deferred = fit_members(sizes, budget_bytes())
"""
from __future__ import annotations

import hashlib
import json
import os

# the spec fields that decide a job's batches (the rest -- treatment, n, job key -- are the member's own)
STREAM_FIELDS = ("data_dir", "dataset_fingerprint", "target_classes", "seed", "recipe", "mean_classes", "k")
HEADROOM_BYTES = 2 << 30            # GPU memory left free beside a cohort's measured need
CPU_SHARE = 0.5                     # of the node's available memory: other trials share the node
BUDGET_ENV = "RAYTRANSFER_COHORT_BYTES"    # a fixed budget in bytes (tests; a user who knows better)


def stream_key(spec: dict) -> str:
    """The identity of a job's batch stream: jobs with the same key can learn from one stream."""
    fields = {k: spec.get(k) for k in STREAM_FIELDS}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:12]


def member_bytes(net, probe, autocast, table_bytes: int = 0) -> dict:
    """Bytes one member holds while it trains, measured: {"weights", "training" (a gradient and a momentum
    buffer per trainable parameter), "activations" (what autograd saves on `probe`, a training batch, through
    a copy of the net, so the member's own state -- batch-norm statistics -- is untouched), "table", "total"}."""
    import copy

    import torch

    weights = sum(t.numel() * t.element_size() for t in list(net.parameters()) + list(net.buffers()))
    training = 2 * sum(p.numel() * p.element_size() for p in net.parameters() if p.requires_grad)
    twin = copy.deepcopy(net).train()
    saved: dict = {}

    def pack(t):
        saved[(t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast():
        twin(probe)
    del twin
    activations = sum(saved.values())
    return {"weights": weights, "training": training, "activations": activations, "table": table_bytes,
            "total": weights + training + activations + table_bytes}


def budget_bytes(device) -> tuple[int, str]:
    """(bytes a cohort may hold, how that was decided): RAYTRANSFER_COHORT_BYTES if set; on CUDA the device's
    free memory less HEADROOM_BYTES; on the CPU CPU_SHARE of the node's available memory."""
    if os.environ.get(BUDGET_ENV):
        return int(float(os.environ[BUDGET_ENV])), f"{BUDGET_ENV}"
    if device.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return max(0, free - HEADROOM_BYTES), f"{free / 2**30:.1f} GiB free on {device} less {HEADROOM_BYTES >> 30} GiB"
    available = _mem_available()
    return int(available * CPU_SHARE), f"{CPU_SHARE:.0%} of the node's {available / 2**30:.1f} GiB available"


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil
    return psutil.virtual_memory().available


def fit_members(sizes: dict, budget: int) -> tuple[list, list]:
    """(kept, deferred) keys of `sizes` ({key: bytes}, in cohort order): the first members that fit `budget`
    together; the first member is always kept (a net alone is what a trial without cohorts trains)."""
    kept, used = [], 0
    for key, size in sizes.items():
        if kept and used + size > budget:
            break
        kept.append(key)
        used += size
    return kept, [k for k in sizes if k not in kept]
