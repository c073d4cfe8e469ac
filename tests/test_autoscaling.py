"""The sweep on an autoscaling GPU cluster, end to end, as a user submits it.

Ray's local autoscaler (`clusters/local-autoscaling.yaml`: a head without GPUs, a GPU worker type
scaled from 0, fake GPUs without CUDA) on this machine, on the test's own ports and temp dir; the
sweep goes in as a Ray job through the Jobs API with its working dir, like `ray job submit
--working-dir . -- python sweeps/full_paper.py --scale smoke --address auto`. Then: every job done,
the autoscaler launched GPU workers, every job trained on one of them holding a GPU and none on the
head, each base trained once, the storage holds only records, final weights, Tune's experiment state
and the results, the weights registry is gone, and once idle the workers are removed. The test
stops only the processes of the cluster it started.
"""
from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
from ray.job_submission import JobStatus, JobSubmissionClient
from ray.util.state import list_actors, list_nodes

from raytransfer.localcluster import LocalCluster

ROOT = Path(__file__).resolve().parents[1]
HEAD_ID = "f" * 51 + "00000"                     # the fake provider's head; workers end in 00001, 00002, ...


@contextmanager
def started(config: str, prefix: str):
    """A local autoscaling cluster from clusters/<config>, on its own ports and a short temp dir (Ray's socket
    paths live under it); stopped, with only its own processes, on leaving."""
    tmp = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    c = LocalCluster.start(ROOT / "clusters" / config, temp_dir=tmp, env={"RAY_AUTH_MODE": "disabled"})
    try:
        yield c
    finally:
        c.stop()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    with started("local-autoscaling.yaml", "rta") as c:
        yield c


def nodes(cluster) -> dict:
    """{node id: (state, total resources)} of every node the cluster ever had (dead ones included)."""
    return {n.node_id: (n.state, n.resources_total) for n in list_nodes(address=cluster.dashboard_url, detail=True)}


def submit(client, timeout=400, **job) -> str:
    """Submit once the head's job agent is up: it answers 'No available agent' for a few seconds, and
    for minutes on a fresh virtualenv (Ray's first start there compiles its modules)."""
    deadline = time.time() + timeout
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            time.sleep(2)


def test_smoke_sweep_as_a_ray_job_trains_on_autoscaled_gpu_workers(cluster, tmp_path):
    out = tmp_path / "exp"
    cache = tempfile.mkdtemp(prefix="rtc", dir="/tmp")
    client = JobSubmissionClient(cluster.dashboard_url)
    assert set(nodes(cluster)) == {HEAD_ID}                         # min_workers 0: no worker before the sweep
    job = submit(client, entrypoint=f"{sys.executable} sweeps/full_paper.py --scale smoke --splits similar --n 1,7 "
                                    f"--address auto --out {out} --no-report",
                 runtime_env={"working_dir": str(ROOT),
                              "env_vars": {"RAYTRANSFER_CACHE": cache, "RAY_AUTH_MODE": "disabled"}})
    seen, t0, first_worker = {}, time.time(), None
    deadline = t0 + 600
    while (status := client.get_job_status(job)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        seen.update(nodes(cluster))                                 # the workers' resources, while they live
        if first_worker is None and len(seen) > 1:
            first_worker = time.time() - t0
        assert time.time() < deadline, "the sweep job did not end in 10 minutes"
        time.sleep(1)
    print(f"job: {time.time() - t0:.0f} s from submit to its end; first GPU worker alive after {first_worker} s")
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-5000:]
    # GPUs asked for, none alive at submit; the trial's CPUs from the GPU node type (1 CPU per GPU here)
    assert "host=process, 1 GPU + 1 CPU (gpu_worker's CPUs per GPU (1 / 1)) per trial on gpu_worker" in logs
    assert re.search(r"Number of trials\s+13\b", logs)              # Tune's banner: the real number of jobs

    table = pd.read_csv(out / "results.csv")
    recs = {f.stem: json.loads(f.read_text()) for f in (out / "jobstore" / "jobs").glob("*.json")}
    assert len(table) == len(recs) == 13 and (table.status == "done").all()
    workers = {n for n, (_, res) in seen.items() if n != HEAD_ID and res.get("GPU", 0) >= 1}
    assert workers, f"the autoscaler launched no GPU worker: {seen}"
    assert set(table.node_id) <= workers and HEAD_ID not in set(table.node_id)
    assert (table.gpus_held == 1).all() and (table.device == "cpu").all()     # fake GPUs: the test cluster's CPU
    # each job, each base too, trained once: one attempt that started training. (On this one-machine cluster a
    # worker joining mid-sweep unpacks the job's working dir again under the processes using it; a trial
    # starting then can fail before it trains, FileNotFoundError from os.getcwd, and is retried: a failure
    # before training, never a second training.)
    starts = {k: r["attempt_starts"] for k, r in recs.items()}
    assert all(len(at) == 1 for at in starts.values()), starts
    for t in ("baseA", "baseB"):
        assert (table.treatment == t).sum() == 1
    transfers = table[table.base_job_key.notna()]
    assert set(transfers.base_weights_via) == {"object_store"}, \
        [line for line in logs.splitlines() if "registry" in line or "object-store" in line]  # published once, fetched by key

    # what the storage keeps: records, final weights, Tune's experiment state, the results; no trial folders
    kept = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    allowed = ("jobstore/jobs/", "jobstore/weights/", "jobstore/attempts/", "jobstore/sweep.json",
               "jobstore/heartbeat.json", "jobstore/index.json.gz",     # the records' index (status reads it)
               "splits/", "results.", "curves.csv", "sweep_progress.json",
               "tensorboard/")                                 # TensorBoard's event files, kept per job
    tune_state = [k for k in kept if k.startswith("tune-")]
    assert all(k.count("/") == 1 for k in tune_state), tune_state   # the experiment's own files, no trial dirs
    assert not [k for k in kept if not k.startswith(allowed) and k not in tune_state], kept
    assert not list(out.glob("train-*"))
    weights = {k: (out / "jobstore" / "weights" / k / "state.pt").stat().st_size for k in recs}
    ratios = [(recs[k]["metrics"]["checkpoint_bytes"] + weights[k]) / weights[k] for k in recs]
    print(f"bytes written per job / final weights: {min(ratios):.2f}-{max(ratios):.2f} "
          f"(one checkpoint at the end with the default --checkpoint-minutes 10)")
    assert all(r["metrics"]["checkpoints_written"] == 1 for r in recs.values())
    assert max(ratios) < 4                                          # weights + one checkpoint (model, momentum)

    registries = [a for a in list_actors(address=cluster.dashboard_url, filters=[("class_name", "=", "WeightsRegistry")])]
    assert registries and all(a.state == "DEAD" for a in registries)           # removed with its base copies

    t1 = time.time()
    deadline = t1 + 240                                             # idle_timeout_minutes 0.5, then removed
    while any(state == "ALIVE" for n, (state, _) in nodes(cluster).items() if n != HEAD_ID):
        assert time.time() < deadline, f"idle GPU workers were not removed: {nodes(cluster)}"
        time.sleep(2)
    print(f"idle workers removed {time.time() - t1:.0f} s after the job's end; trials per node: "
          f"{table.node_id.str[-5:].value_counts().to_dict()}")
    shutil.rmtree(cache, ignore_errors=True)
