"""How a base's weights reach its 28 dependents on an autoscaling cluster: object store vs storage.

In the paper's grid each base (CaffeNet, 1000-way head: ~61M parameters, ~244 MB fp32) is shared by 28
transfers. A finished base saves its weights to the job store (the truth), offers them to the weights
registry (`publish`: a detached actor on the head `ray.put`s one copy), then writes its record; each
dependent calls `fetch_base`, which returns the object-store copy when the registry has one, else reads
the weights file. This script runs that path with 28 dependents that only fetch the weights and check
every byte (crc32), on GPU worker nodes that Ray's autoscaler launches (fake GPUs, no CUDA needed):

  storage                   the key is never published: every dependent reads the file;
  object_store              the driver saves and publishes (the base's weights are in the driver);
  object_store_from_worker  a task on a GPU worker node builds, saves and publishes the base, as a
                            sweep's base trial does.

For each mode: peak object-store bytes summed over nodes (each raylet's GetNodeStats, polled every
0.1 s, minus what was there before), bytes the dependents read from storage, seconds from the base's
record being written to each dependent holding the weights (min / median / max: 28 dependents on 8
slots, so it includes waiting for a slot), seconds of `fetch_base` alone, where each dependent got the
weights and on which node it ran. The dependents are warm actors (torch imported) by default, so process
start is not timed; `--dependents-as tasks` gives each a Ray task instead. Modes run interleaved, 3 rounds.

    export RAY_AUTH_MODE=disabled
    python benchmarks/cluster_weights.py                      # starts its own cluster from
                                                              #   clusters/local-autoscaling.yaml (free ports,
                                                              #   temp dir /tmp/rtw) and stops only that one
    python benchmarks/cluster_weights.py --address HOST:PORT  # joins a running cluster, leaves it running

~3 min on 2 cores. Every fake node is this machine: bytes move between object stores over loopback and
"storage" is a local folder in the page cache, so neither the network nor S3 is measured. The registry
used is the script's own (its name carries the pid), never a running sweep's. Prints a Markdown table
to paste into RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import ray

from raytransfer.localcluster import LocalCluster
from raytransfer.sweep.registry import drop, get_or_create_registry, registry_name, remove_registry

ROOT = Path(__file__).resolve().parents[1]
MB = 1e6


# --------------------------------------------------------------------------- the cluster we start (or join)

def worker_nodes() -> list[dict]:
    return [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) > 0]


def ensure_workers(count: int, timeout: float) -> float:
    """Ask the autoscaler for `count` GPU worker nodes and wait for them; returns the seconds it took."""
    from ray.autoscaler.sdk import request_resources

    t0 = time.time()
    request_resources(bundles=[{"GPU": 1}] * count)
    while len(worker_nodes()) < count:
        if time.time() - t0 > timeout:
            raise TimeoutError(f"the autoscaler started {len(worker_nodes())} of {count} GPU worker nodes "
                               f"in {timeout:.0f} s")
        time.sleep(0.5)
    return time.time() - t0


# --------------------------------------------------------------------------- object-store bytes, all nodes

class StorePoller(threading.Thread):
    """Object-store bytes in use on every alive node (each raylet's GetNodeStats), every `interval` s."""

    def __init__(self, interval: float = 0.1):
        super().__init__(daemon=True)
        self.interval, self.stop_flag = interval, threading.Event()
        self.peak_sum, self.peak_node, self.samples, self.last = 0, {}, 0, {}

    @staticmethod
    def read() -> dict[str, object]:
        from ray._private.internal_api import node_stats

        out = {}
        for n in ray.nodes():
            if n["Alive"]:
                try:
                    out[n["NodeID"]] = node_stats(n["NodeManagerAddress"], n["NodeManagerPort"],
                                                  include_memory_info=False).store_stats
                except Exception:                         # a node going away mid-poll
                    pass
        return out

    def run(self):
        while not self.stop_flag.is_set():
            stats = self.read()
            used = {k: s.object_store_bytes_used + s.object_store_bytes_fallback for k, s in stats.items()}
            self.peak_sum = max(self.peak_sum, sum(used.values()))
            for k, v in used.items():
                self.peak_node[k] = max(self.peak_node.get(k, 0), v)
            self.last, self.samples = stats, self.samples + 1
            self.stop_flag.wait(self.interval)

    def stop(self):
        self.stop_flag.set()
        self.join()


def store_used(stats) -> int:
    return sum(s.object_store_bytes_used + s.object_store_bytes_fallback for s in stats.values())


def spilled(stats) -> int:
    return sum(s.spilled_bytes_total for s in stats.values())


# --------------------------------------------------------------------------- the base and its dependents

def checksum(state: dict) -> int:
    """crc32 over every array's bytes, in key order (numpy arrays or torch tensors)."""
    crc = 0
    for k in sorted(state):
        v = state[k]
        a = np.ascontiguousarray(v.numpy() if hasattr(v, "numpy") else np.asarray(v))
        crc = zlib.crc32(memoryview(a).cast("B"), zlib.crc32(k.encode(), crc))
    return crc


def build_base() -> dict:
    import torch

    from raytransfer.recipes import get_recipe
    from raytransfer.transfer import build_trial_network

    torch.manual_seed(0)
    net = build_trial_network("caffenet", 1000, None, 0, "scratch", 0, get_recipe("paper").arch_kwargs())
    return {k: v.detach().cpu() for k, v in net.state_dict().items()}


def finish_base(storage: str, registry: str, key: str, state: dict, offer: bool) -> dict:
    """What a finished base does, in the order of outcomes.record_outcome: weights, publish, then the record."""
    from raytransfer.sweep.registry import publish
    from raytransfer.sweep.store import JobStore

    store = JobStore(storage)
    t0 = time.time()
    uri = store.save_weights(key, state)
    t1 = time.time()
    published = publish(registry, key, uri) if offer else False
    t2 = time.time()
    store.write(key, {"weights_uri": uri, "bench": "cluster_weights"})
    return {"uri": uri, "published": published, "save_s": t1 - t0, "publish_s": t2 - t1,
            "t_record": store.read(key)["recorded_at"], "node": ray.get_runtime_context().get_node_id()}


def make_base_task():
    """The base on a GPU worker node, as in a sweep (there its trial saves and publishes)."""
    @ray.remote(num_cpus=0)
    def base(storage: str, registry: str, key: str):
        state = build_base()
        return {**finish_base(storage, registry, key, state, True), "crc": checksum(state)}

    return base


def fetch_and_check(registry: str, key: str, uri: str, expected: int) -> dict:
    """One dependent: get the base's weights the way a trial does, then check every byte."""
    from raytransfer.sweep.registry import fetch_base

    t_start = time.time()
    state, via = fetch_base(registry, key, uri)
    t_held = time.time()
    ok = checksum(state) == expected
    return {"node": ray.get_runtime_context().get_node_id(), "ok": ok, "t_start": t_start, "t_held": t_held,
            "via": via}


def make_dependents(kind: str, slots: int, cpus: float, gpus: float):
    """A function (registry, key, uri, crc, n) -> n results.

    actors  `slots` warm actors (torch imported) that take the dependents as they come free: what is timed
            is the weights path and the wait for a slot, not process start (default);
    tasks   one Ray task per dependent, in whatever worker process Ray gives it (often a new one)."""
    if kind == "tasks":
        task = ray.remote(num_cpus=cpus, num_gpus=gpus)(fetch_and_check)
        return lambda *a, n: ray.get([task.remote(*a) for _ in range(n)])

    @ray.remote(num_cpus=cpus, num_gpus=gpus)
    class Slot:
        def ready(self):
            import raytransfer.sweep.registry  # noqa: F401
            import raytransfer.sweep.store  # noqa: F401  (torch)
            return ray.get_runtime_context().get_node_id()

        def fetch(self, *a):
            return fetch_and_check(*a)

    actors = [Slot.remote() for _ in range(slots)]
    ray.get([a.ready.remote() for a in actors])
    from ray.util import ActorPool

    pool = ActorPool(actors)
    return lambda *a, n: list(pool.map_unordered(lambda actor, _: actor.fetch.remote(*a), range(n)))


def run_mode(mode: str, state: dict, crc: int, storage: str, registry: str, dependents, n: int) -> dict:
    before = StorePoller.read()
    poller = StorePoller()
    poller.start()
    key = f"bench-base-{mode}-{int(time.time())}"
    if mode == "object_store_from_worker":
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        node = worker_nodes()[0]["NodeID"]
        base = make_base_task().options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
        b = ray.get(base.remote(storage, registry, key))
        assert b["crc"] == crc, "the base built on the worker differs from the driver's"
    else:
        b = finish_base(storage, registry, key, state, mode == "object_store")
    results = dependents(registry, key, b["uri"], crc, n=n)
    poller.stop()
    after = StorePoller.read()
    size = os.path.getsize(os.path.join(b["uri"], "state.pt"))
    vias = {v: sum(r["via"] == v for r in results) for v in ("object_store", "storage")}
    nodes = {}
    for r in results:
        nodes[r["node"]] = nodes.get(r["node"], 0) + 1
    return {
        **b, "mode": mode, "key": key, "ok": all(r["ok"] for r in results), "file_bytes": size,
        "storage_bytes": size * vias["storage"], "vias": vias, "nodes": nodes,
        "peak_bytes": poller.peak_sum - store_used(before), "peak_node": dict(poller.peak_node),
        "baseline_bytes": store_used(before), "spilled_bytes": spilled(after) - spilled(before),
        "samples": poller.samples,
        "held": sorted(r["t_held"] - b["t_record"] for r in results),
        "fetch": sorted(r["t_held"] - r["t_start"] for r in results),
    }


def merge(rs: list[dict]) -> dict:
    """One mode over its rounds: every dependent's times pooled, the worst peak, storage bytes per round."""
    out = dict(rs[0])
    out["held"] = sorted(x for r in rs for x in r["held"])
    out["fetch"] = sorted(x for r in rs for x in r["fetch"])
    out["peak_bytes"] = max(r["peak_bytes"] for r in rs)
    out["spilled_bytes"] = max(r["spilled_bytes"] for r in rs)
    out["storage_bytes"] = sum(r["storage_bytes"] for r in rs) / len(rs)
    out["ok"] = all(r["ok"] for r in rs)
    out["vias"] = {v: sum(r["vias"][v] for r in rs) for v in rs[0]["vias"]}
    out["nodes"] = {}
    for r in rs:
        for k, v in r["nodes"].items():
            out["nodes"][k] = out["nodes"].get(k, 0) + v
    out["base_nodes"] = sorted({r["node"] for r in rs})
    return out


def short(node_id: str) -> str:
    return node_id[-6:]


def mmm(xs):
    return f"{min(xs):.2f} / {statistics.median(xs):.2f} / {max(xs):.2f}"


def table(rows: list[dict], head: str) -> str:
    ref = next((r for r in rows if r["mode"] == "object_store"), rows[0])
    med = statistics.median
    out = ["| mode | base saved/published on | dependents per node | got them from (object store / storage) | "
           "peak object store MB (sum of nodes) | spilled MB | read from storage MB per round | "
           "record → holding s (min / med / max) | fetch_base s (min / med / max) | "
           "record → holding, median, vs object_store | fetch_base, median, vs object_store |",
           "|---|---|---|---|---:|---:|---:|---|---|---:|---:|"]
    for r in rows:
        where = ", ".join("head (driver)" if n == head else f"worker {short(n)}" for n in r["base_nodes"])
        per_node = ", ".join(f"{short(k)}: {v}" for k, v in sorted(r["nodes"].items()))
        out.append(f"| {r['mode']} | {where} | {per_node} | {r['vias']['object_store']} / {r['vias']['storage']} | "
                   f"{r['peak_bytes'] / MB:.0f} | {r['spilled_bytes'] / MB:.0f} | {r['storage_bytes'] / MB:.0f} | "
                   f"{mmm(r['held'])} | {mmm(r['fetch'])} | {med(r['held']) / med(ref['held']):.2f}x | "
                   f"{med(r['fetch']) / med(ref['fetch']):.2f}x |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--address", help="join this running cluster (left running); default: start our own")
    ap.add_argument("--config", default=str(ROOT / "clusters" / "local-autoscaling.yaml"),
                    help="autoscaling config of the cluster we start")
    ap.add_argument("--temp-dir", default="/tmp/rtw", help="Ray temp dir of the cluster we start (keep it short)")
    ap.add_argument("--dependents", type=int, default=28)
    ap.add_argument("--workers", type=int, default=2, help="GPU worker nodes to run the dependents on")
    ap.add_argument("--gpus-per-dependent", type=float, default=0.25)
    ap.add_argument("--cpus-per-dependent", type=float, default=0.25)
    ap.add_argument("--dependents-as", choices=("actors", "tasks"), default="actors",
                    help="warm slot actors (default) or one Ray task per dependent (includes process start)")
    ap.add_argument("--modes", default="storage,object_store,object_store_from_worker",
                    help="storage: never published; object_store: the driver publishes; "
                         "object_store_from_worker: a task on a GPU worker node saves and publishes, as a sweep's base")
    ap.add_argument("--rounds", type=int, default=3, help="every mode this many times, interleaved; pooled")
    ap.add_argument("--storage", help="job store folder (default: a fresh temp folder, deleted after)")
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    started = None
    if args.address is None:
        t = time.time()
        started = LocalCluster.start(args.config, temp_dir=args.temp_dir)
        address = started.address
        print(f"started a local autoscaling cluster at {address} (temp dir {args.temp_dir}) in "
              f"{time.time() - t:.1f} s", file=sys.stderr)
    else:
        address = args.address
    own_storage = args.storage is None
    storage = args.storage or tempfile.mkdtemp(prefix="rtw-store-")
    load0 = os.getloadavg()[0]
    try:
        ray.init(address=address, namespace="raytransfer", log_to_driver=False,
                 runtime_env={"env_vars": {"RAY_AUTH_MODE": os.environ["RAY_AUTH_MODE"]}})
        head = ray.get_runtime_context().get_node_id()
        registry = registry_name(f"bench-cluster-weights-{os.getpid()}")      # ours, never a sweep's
        ray.get(get_or_create_registry(registry).keys.remote())
        t = time.time()
        state = build_base()
        crc = checksum(state)
        n_params = sum(v.numel() for v in state.values())
        print(f"base: {n_params / 1e6:.1f}M parameters, "
              f"{sum(v.numel() * v.element_size() for v in state.values()) / MB:.0f} MB, built in "
              f"{time.time() - t:.1f} s; registry {registry!r}", file=sys.stderr)
        launch_s = ensure_workers(args.workers, timeout=180)
        slots = int(round(args.workers / args.gpus_per_dependent))
        dependents = make_dependents(args.dependents_as, slots, args.cpus_per_dependent, args.gpus_per_dependent)
        print(f"{args.workers} GPU worker nodes up {launch_s:.1f} s after asking the autoscaler; "
              f"dependents as {args.dependents_as} ({slots} at a time)", file=sys.stderr)
        rows = []
        t_all = time.time()
        per_mode = {m: [] for m in args.modes.split(",")}
        for rnd in range(args.rounds):                     # interleaved: a slow spell hits every mode alike
            for mode in per_mode:
                r = run_mode(mode, state, crc, storage, registry, dependents, args.dependents)
                per_mode[mode].append(r)
                print(f"round {rnd + 1} {mode}: checksums {'ok' if r['ok'] else 'MISMATCH'}, "
                      f"published={r['published']}, save {r['save_s']:.2f} s, publish {r['publish_s']:.2f} s, "
                      f"file {r['file_bytes'] / MB:.0f} MB, object store before {r['baseline_bytes'] / MB:.0f} MB, "
                      f"peak {r['peak_bytes'] / MB:.0f} MB, per node "
                      f"({', '.join(f'{short(k)}: {v / MB:.0f} MB' for k, v in sorted(r['peak_node'].items()))}; "
                      f"{r['samples']} samples), spilled {r['spilled_bytes'] / MB:.0f} MB, record -> holding median "
                      f"{statistics.median(r['held']):.2f} s, fetch_base median {statistics.median(r['fetch']):.2f} s",
                      file=sys.stderr)
                if r["published"]:                 # free the copy for the next mode
                    drop(registry, r["key"])
                    time.sleep(1)
        rows = [merge(rs) for rs in per_mode.values()]
        wall = time.time() - t_all
        print(f"\n{args.dependents} dependents of one CaffeNet base ({n_params / 1e6:.1f}M parameters, "
              f"{rows[0]['file_bytes'] / MB:.0f} MB file) on {args.workers} GPU worker nodes of "
              f"{os.path.basename(args.config)} ({args.gpus_per_dependent} GPU each, {slots} at a time, as "
              f"{args.dependents_as}); {args.rounds} rounds, modes interleaved, dependents pooled; head {short(head)}. Machine: {os.cpu_count()} cores "
              f"({platform.machine()}), load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end. "
              f"Object store: each raylet's GetNodeStats (store_stats.object_store_bytes_used + fallback), "
              f"polled every 0.1 s, summed over nodes, minus what was there before the mode. "
              f"Modes took {wall:.0f} s.\n")
        print(table(rows, head))
        for r in rows:
            assert r["ok"], f"{r['mode']}: a dependent's checksum did not match the base's"
        remove_registry(registry)
    finally:
        if ray.is_initialized():
            if args.address is not None:
                from ray.autoscaler.sdk import request_resources
                request_resources(bundles=[])
            ray.shutdown()
        if started:
            started.stop()
        if own_storage:
            import shutil
            shutil.rmtree(storage, ignore_errors=True)


if __name__ == "__main__":
    main()
