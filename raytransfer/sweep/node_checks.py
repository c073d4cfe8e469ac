"""What every node of the cluster must see before anything trains: the storage (a local --storage must be one
folder all nodes share) and the prepared dataset at --data. Probed on the nodes alive now, by a zero-CPU task
pinned to each; one clear error naming the nodes that fail, a note for nodes an autoscaler adds later.

    check_storage(storage, address); check_dataset(jobs, node_types)
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .errors import SweepError

NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "ceph", "fuse", "9p", "beegfs", "glusterfs")


def check_storage(storage: str, address: str | None):
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
            answers = ask_each_node(_storage_probe, nodes, str(marker), token)
        finally:
            marker.unlink(missing_ok=True)
        blind = [f"{_node_name(n)}: {answers[n['NodeID']]}" for n in nodes if answers.get(n["NodeID"])]
        if blind:
            raise SweepError(f"--storage {storage} is not shared: {len(blind)} of the cluster's {len(nodes)} nodes "
                             f"cannot use it ({'; '.join(blind[:3])}), so trials there could not save checkpoints "
                             "or records. Use storage every node shares: s3://bucket/prefix (see cluster.yaml) or a "
                             "shared filesystem mounted at the same path on every node")
    fstype = _filesystem_type(storage)
    if address and fstype and not fstype.startswith(NETWORK_FILESYSTEMS):
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
        answers = ask_each_node(_dataset_probe, [n for n in nodes if n["NodeID"] != here], light)
        answers[here] = _dataset_problem(light)                # the driver's node: read here, no task
        bad = [(n, answers[n["NodeID"]]) for n in nodes if answers.get(n["NodeID"])]
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


def ask_each_node(probe, nodes: list[dict], *args, timeout: float = 120.0) -> dict:
    """{node id: answer} of a zero-CPU probe pinned to each node. A node that leaves the cluster meanwhile (an
    autoscaler scaling an idle worker down, a lost or preempted node) has no answer: it holds no trial to
    protect, and a node that joins later is covered by the note the caller prints."""
    refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(*args)
            for n in nodes]
    ray.wait(refs, num_returns=len(refs), timeout=timeout)
    answers = {}
    for node, ref in zip(nodes, refs):
        try:
            answers[node["NodeID"]] = ray.get(ref, timeout=0)
        except (ray.exceptions.TaskUnschedulableError, ray.exceptions.NodeDiedError,
                ray.exceptions.WorkerCrashedError):
            print(f"[sweep] node {_node_name(node)} left the cluster while being checked; skipped", flush=True)
    return answers


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
