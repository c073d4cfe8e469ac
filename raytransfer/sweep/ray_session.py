"""Ray for the sweep: join the cluster at --address or start a local Ray, and refuse an address that does not
answer as Ray now, with one clear line, rather than after minutes of retries.

    dashboard = init_ray(run_settings)
"""
from __future__ import annotations

import os
import socket

import ray

from .errors import SweepError
from .settings import RunSettings

NAMESPACE = "raytransfer"


def init_ray(run: RunSettings) -> str:
    """Join the cluster at `run.address`, or start a local Ray; print (and return) the dashboard URL."""
    check_address(run.address)
    kwargs = {"namespace": NAMESPACE, "log_to_driver": True}
    try:
        if run.address:
            ctx = ray.init(address=run.address, **kwargs)
        else:
            ctx = ray.init(address="local", num_cpus=run.num_cpus, include_dashboard=run.dashboard,
                           _temp_dir=os.environ.get("RAYTRANSFER_RAY_TMP"), **kwargs)
    except ConnectionError as e:
        raise SweepError(f"cannot reach a Ray cluster at {run.address} ({e}): start it or fix --address") from None
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
