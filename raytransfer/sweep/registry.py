"""Base weights through the Ray object store: a named, detached actor owns them.

The driver script creates the registry (an actor created inside a trial dies with the trial's
placement group); a finished base sends its weights as numpy arrays, the actor `ray.put`s them, and
dependent trials read them zero-copy on the same node. The checkpoint URI in the job store is the
fallback when the actor or the cluster is gone. Configs carry keys and URIs, never ObjectRefs.

    registry = get_or_create_registry()          # in the driver
    base_state = fetch_base(key, uri)            # in a trial
"""
from __future__ import annotations

import logging

import numpy as np
import ray

log = logging.getLogger(__name__)

NAME, NAMESPACE = "raytransfer-weights", "raytransfer"


@ray.remote(num_cpus=0)
class WeightsRegistry:
    def __init__(self):
        self._refs = {}

    def store(self, key: str, state_np: dict):
        self._refs[key] = ray.put(state_np)          # the actor owns the object: it outlives the trial

    def get_ref(self, key: str):
        ref = self._refs.get(key)
        return None if ref is None else [ref]        # list-wrapped: the caller decides when to ray.get

    def keys(self):
        return sorted(self._refs)


def get_or_create_registry():
    """The registry, on the driver's node (the head: it outlives worker nodes that come and go)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return WeightsRegistry.options(name=NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
                                   scheduling_strategy=here).remote()


def _registry():
    try:
        return ray.get_actor(NAME, namespace=NAMESPACE)
    except ValueError:
        return None


def publish(key: str, state_dict: dict):
    """Offer a finished base's weights to its dependents (best effort: the URI stays the truth)."""
    reg = _registry()
    if reg is None:
        return False
    try:
        ray.get(reg.store.remote(key, {k: v.detach().cpu().numpy() for k, v in state_dict.items()}), timeout=60)
    except Exception as e:                            # actor gone (its node died): dependents read the URI
        log.warning("weights registry unavailable (%s): %s is only in storage", e, key)
        return False
    return True


def fetch_ref(key: str):
    """[ObjectRef] of a base's weights in the object store, or None (then use its URI)."""
    reg = _registry()
    if reg is None:
        return None
    try:
        return ray.get(reg.get_ref.remote(key), timeout=30)
    except Exception as e:                            # actor gone mid-call: fall back to the URI
        log.warning("weights registry unavailable (%s): reading %s from storage", e, key)
        return None


def fetch_base(key: str, uri: str) -> tuple[dict, str]:
    """A base's weights: from the object store when it has them, else from the durable URI."""
    from .store import load_weights

    ref = fetch_ref(key)
    if ref is not None:
        try:
            arrays = ray.get(ref[0])
            return {k: np.asarray(v) for k, v in arrays.items()}, "object_store"
        except Exception as e:
            log.warning("object-store copy of %s is gone (%s): reading it from storage", key, e)
    return load_weights(uri), "uri"
