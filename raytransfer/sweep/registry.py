"""Base weights through the Ray object store: a named, detached actor owns them, one per sweep.

The driver creates the registry (an actor created inside a trial dies with the trial's placement
group); a finished base saves its weights to storage and names them to the actor, which reads them
and `ray.put`s them once (so only that copy is ever in the object store), and every
dependent reads them by key: zero-copy on the node that holds them, one pull per other node. The
driver drops a base once every dependent of it in the sweep is done, and removes the registry when
the sweep ends, so nothing of a finished sweep stays in a long-lived cluster's object store. The
weights file in the job store is the fallback when the actor or its node is gone. Configs carry
keys and URIs, never ObjectRefs.

    registry = get_or_create_registry(name)          # in the driver
    base_state, via = fetch_base(name, key, uri)     # in a trial or a Train worker
"""
from __future__ import annotations

import logging

import numpy as np
import ray

from .store import load_weights          # imported with the actor's class: nothing to import later

log = logging.getLogger(__name__)

NAMESPACE = "raytransfer"


def registry_name(experiment: str) -> str:
    return f"raytransfer-weights-{experiment}"


@ray.remote(num_cpus=0)
class WeightsRegistry:
    def __init__(self):
        import os
        import tempfile

        self._refs = {}
        os.chdir(tempfile.gettempdir())  # not the job's working dir: on a one-machine test cluster every node
        # shares it, and each worker node that joins deletes and unpacks it again (Ray's agent does not know
        # the others'); get_or_create_registry waits for this before any trial asks for a worker

    def store(self, key: str, uri: str):
        """Read a base's durable weights and put them in the object store: one copy, owned here (it
        outlives the trial that trained the base), nothing large passed in the call."""
        self._refs[key] = ray.put({k: v.numpy() for k, v in load_weights(uri).items()})

    def get_ref(self, key: str):
        ref = self._refs.get(key)
        return None if ref is None else [ref]        # list-wrapped: the caller decides when to ray.get

    def drop(self, key: str) -> bool:
        return self._refs.pop(key, None) is not None  # the last reference: the object store frees it

    def keys(self):
        return sorted(self._refs)


def get_or_create_registry(name: str, ready_timeout: float = 120):
    """The registry, on the driver's node (the head: it outlives worker nodes that come and go), up and
    answering before any trial starts. A registry that cannot start costs speed, not results: one
    warning, and every base goes through storage (as after it dies mid-sweep)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    reg = WeightsRegistry.options(name=name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
                                  scheduling_strategy=here).remote()
    try:
        ray.get(reg.keys.remote(), timeout=ready_timeout)
    except Exception as e:
        print(f"[sweep] warning: the weights registry did not start ({type(e).__name__}: {e}); "
              "bases reach their transfers through storage", flush=True)
    return reg


def _registry(name: str):
    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return None


def remove_registry(name: str):
    """End the registry (and with it every object it owns); nothing to do if it is gone."""
    reg = _registry(name)
    if reg is not None:
        ray.kill(reg, no_restart=True)


def publish(name: str, key: str, uri: str) -> bool:
    """Offer a finished base's weights (saved at `uri`) to its dependents; best effort: the URI stays
    the truth."""
    reg = _registry(name)
    if reg is None:
        log.warning("weights registry %s not found: %s is only in storage", name, key)
        return False
    try:
        ray.get(reg.store.remote(key, uri), timeout=300)
    except Exception as e:                            # actor gone (its node died): dependents read the URI
        log.warning("weights registry unavailable (%s): %s is only in storage", e, key)
        return False
    return True


def drop(name: str, key: str):
    """Free a base's object-store copy (its dependents are done); best effort."""
    reg = _registry(name)
    if reg is not None:
        try:
            ray.get(reg.drop.remote(key), timeout=30)
        except Exception as e:
            log.warning("could not drop %s from the weights registry: %s", key, e)


def fetch_ref(name: str, key: str):
    """[ObjectRef] of a base's weights in the object store, or None (then use its URI)."""
    reg = _registry(name)
    if reg is None:
        log.warning("weights registry %s not found: reading %s from storage", name, key)
        return None
    try:
        ref = ray.get(reg.get_ref.remote(key), timeout=30)
    except Exception as e:                            # actor gone mid-call: fall back to the URI
        log.warning("weights registry unavailable (%s): reading %s from storage", e, key)
        return None
    if ref is None:      # a base done in an earlier run, or a net a diagnostic reads
        log.info("weights registry has no copy of %s: reading it from storage", key)
    return ref


def fetch_base(name: str, key: str, uri: str) -> tuple[dict, str]:
    """A base's weights: from the object store when it has them, else from the durable URI."""
    ref = fetch_ref(name, key)
    if ref is not None:
        try:
            arrays = ray.get(ref[0])
            return {k: np.asarray(v) for k, v in arrays.items()}, "object_store"
        except Exception as e:
            log.warning("object-store copy of %s is gone (%s): reading it from storage", key, e)
    return load_weights(uri), "storage"


def load_base_weights(registry: str, base_key: str, uri: str, storage: str) -> tuple[dict, str]:
    """(weights, where from) of a base, for a trial or a Train worker; corrupt weights drop that base's record."""
    from .store import CorruptWeights, JobStore

    try:
        return fetch_base(registry, base_key, uri)
    except CorruptWeights as e:                    # never train on them; the next run retrains that base alone
        JobStore(storage).forget(base_key)
        raise CorruptWeights(f"{e}; dropped the record of base {base_key}: rerun the same command to retrain "
                             "that base alone, then this job") from None


def load_bases(registry: str, storage: str, jobs: list[dict]) -> tuple[dict, dict]:
    """({job key: its base's weights}, {job key: where they came from}) of a cohort's jobs, each base read once."""
    states, via, read = {}, {}, {}
    for job in jobs:
        for base_key, uri in (job.get("base_uris") or {}).items():
            if base_key not in read:
                read[base_key] = load_base_weights(registry, base_key, uri, storage)
            states[job["job_key"]], via[job["job_key"]] = read[base_key]
    return states, via
