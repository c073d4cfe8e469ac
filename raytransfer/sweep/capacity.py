"""What the cluster can run: the nodes alive now plus the node types its autoscaler can launch.

On an autoscaling cluster the GPU nodes are not there when the sweep is submitted (cluster.yaml
starts its GPU workers at min_workers 0): the trials that wait for GPUs are what makes the
autoscaler launch them. So trial sizes are checked, and concurrency sized, against the node types
the cluster *can* have, not the nodes it has at submit time.

Where the node types come from, first found wins: RAYTRANSFER_CLUSTER_CONFIG (a cluster-config
file); the cluster config the autoscaler reports to the GCS (autoscaler v2); the autoscaling config
file of this cluster's monitor process on the driver's machine (`ray up`'s ~/ray_bootstrap_config.yaml,
`ray start --head --autoscaling-config=FILE`).
Without any of them the cluster is taken to be fixed: the nodes alive now.

    types = cluster_node_types()                     # in the driver, after ray.init
    plan = plan_trials(types, gpus_per_worker=None, workers=1, cpus_per_worker=None, host="auto")
    plan.cpus_per_worker        # None asked: a GPU worker gets its node type's CPUs per GPU (g5.12xlarge: 12)
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import SweepError

TEST_CLUSTER_RESOURCE = "raytransfer_test_cluster"   # a node type with it may train "GPU" trials on the CPU
_BOOKKEEPING = ("memory", "object_store_memory")


@dataclass(frozen=True)
class NodeType:
    name: str
    resources: dict                 # per node: CPU, GPU, custom resources
    count: int                      # alive nodes of this shape, or the most the autoscaler launches (-1: no limit)
    launchable: bool = False        # a type of the autoscaler's config (else: nodes alive now)

    def offers(self) -> str:
        res = ", ".join(f"{k} {v:g}" for k, v in sorted(self.resources.items()) if k in ("CPU", "GPU") or v)
        many = "no limit" if self.count < 0 else f"{self.count}"
        return f"{self.name} ({res or 'nothing'}; {'up to ' + many + ' node(s)' if self.launchable else many + ' alive'})"


@dataclass(frozen=True)
class Plan:
    host: str                       # "process": the loop in the Tune trial's process; "train": a TorchTrainer run
    gpus_per_worker: float
    concurrency: int | None         # most trials at once (None: as many as the cluster can launch)
    fitting: list = field(default_factory=list)   # names of the node types a trial's worker fits on
    test_cluster: bool = False      # some node type carries TEST_CLUSTER_RESOURCE
    cpus_per_worker: float = 1.0    # asked, or from the node types (node_cpus_per_worker)
    cpus_from: str = "asked"        # where cpus_per_worker comes from, for the sweep's plan line


def cluster_node_types() -> list[NodeType]:
    """The node types of the connected cluster: alive shapes, plus what its autoscaler can launch."""
    import ray

    shapes: dict = {}
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        res = {k: v for k, v in n["Resources"].items() if not k.startswith("node:") and k not in _BOOKKEEPING}
        key = tuple(sorted(res.items()))
        shapes[key] = shapes.get(key, 0) + 1
    alive = [NodeType(f"alive node {i + 1}" if len(shapes) > 1 else "alive node", dict(k), c)
             for i, (k, c) in enumerate(shapes.items())]
    return alive + launchable_node_types()


def launchable_node_types() -> list[NodeType]:
    import ray

    if os.environ.get("RAYTRANSFER_CLUSTER_CONFIG"):          # the user's word wins
        return _from_config_file(Path(os.environ["RAYTRANSFER_CLUSTER_CONFIG"]))
    types = _from_gcs()
    if types is None:
        path = autoscaling_config_path(ray.get_runtime_context().gcs_address)
        types = _from_config_file(path) if path else []
    return types


def _from_gcs() -> list[NodeType] | None:
    try:
        from ray._private.state import state
        config = state.get_cluster_config()
    except Exception:                                  # older GCS, no autoscaler: not an error
        return None
    if config is None or not config.node_group_configs:
        return None
    return [NodeType(g.name or f"group {i}", {k: float(v) for k, v in g.resources.items() if k not in _BOOKKEEPING},
                     int(g.max_count), launchable=True) for i, g in enumerate(config.node_group_configs)]


def autoscaling_config_path(gcs_address: str | None = None) -> Path | None:
    """The autoscaling config of the cluster's Ray monitor on this machine (the driver runs on the head:
    `ray job submit`), if any; only a monitor of this cluster (its --gcs-address) counts."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if not any(a.endswith(b"autoscaler/_private/monitor.py") or a.endswith(b"autoscaler/v2/monitor.py")
                       for a in argv[:3]):
                continue
            if gcs_address and f"--gcs-address={gcs_address}".encode() not in argv:
                continue
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        for a in argv:
            if a.startswith(b"--autoscaling-config="):
                p = Path(a.split(b"=", 1)[1].decode())
                return p if p.is_absolute() else Path(cwd) / p
    bootstrap = Path("~/ray_bootstrap_config.yaml").expanduser()
    return bootstrap if bootstrap.exists() else None


def _from_config_file(path: Path) -> list[NodeType]:
    import yaml

    try:
        config = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return []
    head = config.get("head_node_type")
    limit = config.get("max_workers", -1)
    out = []
    for name, t in (config.get("available_node_types") or {}).items():
        if name == head:                               # the head is alive already (counted above)
            continue
        res = {k: float(v) for k, v in (t.get("resources") or {}).items() if k not in _BOOKKEEPING}
        count = int(t.get("max_workers", limit if limit is not None else -1))
        if count != 0:
            out.append(NodeType(name, res, count, launchable=True))
    return out


def node_cpus_per_worker(types: list[NodeType], gpus_per_worker: float) -> tuple[float, str]:
    """(CPUs, why) a worker gets when --cpus-per-trial is not given: a GPU worker the CPUs per GPU of the
    GPU node types (the launchable ones where there are any; the fewest among them, so each GPU of every
    such type can hold a trial: a g5.12xlarge, 48 vCPUs / 4 GPUs, gives 12), times its share of a GPU; a
    CPU worker 1, as before."""
    gpu_types = [t for t in types if t.resources.get("GPU", 0) >= 1 and t.resources.get("CPU", 0) >= 1]
    gpu_types = [t for t in gpu_types if t.launchable] or gpu_types
    if not gpus_per_worker or not gpu_types:
        return 1.0, "a CPU trial's default"
    per_gpu = min(t.resources["CPU"] / t.resources["GPU"] for t in gpu_types)
    cpus = max(1.0, math.floor(per_gpu * gpus_per_worker + 1e-9))
    low = min(gpu_types, key=lambda t: t.resources["CPU"] / t.resources["GPU"])
    return cpus, f"{low.name}'s CPUs per GPU ({low.resources['CPU']:g} / {low.resources['GPU']:g})"


def plan_trials(types: list[NodeType], gpus_per_worker: float | None, workers: int, cpus_per_worker: float | None,
                host: str = "auto", max_concurrent: int | None = None) -> Plan:
    """Trial size, host and concurrency from the node types; one clear error when no type fits.

    GPUs per worker default to 1 when any type offers a GPU: on a GPU cluster nothing trains on the
    head (which has none) unless asked with --gpus-per-trial 0. CPUs per worker (None: not asked) default
    to the GPU node type's CPUs per GPU (node_cpus_per_worker), so the loaders get the cores a user pays
    for. A one-worker trial runs in the Tune trial's own process (no worker group to start, one checkpoint
    and retry layer); more than one worker needs Ray Train's TorchTrainer (DDP).
    """
    any_gpu = any(t.resources.get("GPU", 0) >= 1 for t in types)
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if any_gpu else 0.0
    cpus_from = "asked"
    if cpus_per_worker is None:
        cpus_per_worker, cpus_from = node_cpus_per_worker(types, gpus_per_worker)
    need = {"CPU": cpus_per_worker, "GPU": gpus_per_worker}
    fitting = [t for t in types if all(t.resources.get(k, 0) >= v for k, v in need.items() if v > 0)]
    if not fitting:
        what = [f"--gpus-per-trial {gpus_per_worker:g}" if gpus_per_worker else None,
                f"--cpus-per-trial {cpus_per_worker:g}"]
        offers = "; ".join(t.offers() for t in types) or "no nodes"
        hint = ("ask for fewer, or add a node type that offers them to the cluster config" if any_gpu or not gpus_per_worker
                else "the cluster has no GPUs: drop the flag (CPU trials), or add a GPU node type to the cluster config")
        raise SweepError(f"{' and '.join(w for w in what if w)} per worker fit(s) no node type of this cluster "
                         f"({offers}): {hint}")
    if host == "auto":
        host = "train" if workers > 1 else "process"
    slots = 0
    for t in fitting:
        per_node = min(math.floor(t.resources.get(k, 0) / v + 1e-9) for k, v in need.items() if v > 0)
        if t.count < 0:
            slots = None
            break
        slots += per_node * t.count
    if slots is not None and slots < workers:
        raise SweepError(f"--workers-per-trial {workers} needs {workers} workers of {gpus_per_worker:g} GPU + "
                         f"{cpus_per_worker:g} CPU at once, but this cluster holds at most {slots} "
                         f"({'; '.join(t.offers() for t in types)}): ask for fewer workers, or raise max_workers")
    concurrency = None if slots is None else max(1, slots // workers)
    if max_concurrent:
        concurrency = max_concurrent if concurrency is None else min(concurrency, max_concurrent)
    test_cluster = any(t.resources.get(TEST_CLUSTER_RESOURCE, 0) > 0 for t in types)
    return Plan(host, gpus_per_worker, concurrency, [t.name for t in fitting], test_cluster, cpus_per_worker, cpus_from)
