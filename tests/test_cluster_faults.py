"""The sweep on an autoscaling cluster as it really behaves: Ray Train across autoscaled workers, a node
lost mid-trial, a node preempted, and errors that a retry cannot fix.

One local autoscaling cluster (`clusters/local-autoscaling-train.yaml`: a head without GPUs and three
worker types scaled from 0 -- one GPU, two GPUs, CPUs only -- whose GPUs have no CUDA behind them) is
shared by the tests that submit the sweep through the Jobs API, as a user would -- without a working dir:
the fake nodes share one temp dir, and each node that joins mid-sweep unpacks the job's working dir there
again, deleting the working dir of the processes started in it (Ray Train's controllers on the head);
the project is installed in the cluster's Python instead, as on a real cluster's image. The setup-error test
needs a cluster that does *not* say it is a test cluster: a `ray.cluster_utils.Cluster` with a fake
two-GPU node. Every test stops only the processes it started.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
from ray.job_submission import JobStatus, JobSubmissionClient

from test_autoscaling import HEAD_ID, nodes, started, submit

ROOT = Path(__file__).resolve().parents[1]
SMOKE = "sweeps/full_paper.py --scale smoke --splits similar --n 1 --treatments AnB --no-report --address auto"
# a fault strikes a base caught after its second checkpoint (epoch 2 of 40): the seconds the hook polls and a
# preemption waits past its drain's deadline never outlast the base. Since the smoke recipe reads the pixel store
# an epoch takes ~0.25 s on an idle 2-core machine: at 6 epochs a base finished during the drain, and the fault
# hit the transfer that followed it on that node (CI, idle); 40 epochs leave ~9 s
SLOWER = "--set epochs=40"


@pytest.fixture(scope="module")
def cluster():
    with started("local-autoscaling-train.yaml", "rtf") as c:
        yield c


@pytest.fixture(scope="module")
def cache():                                                        # the built-in dataset, prepared once
    d = tempfile.mkdtemp(prefix="rtc", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def run_job(cluster, cache, out, flags="", during=None, timeout=900) -> tuple[str, dict]:
    """Submit the smoke sweep as a Ray job; `during(seen)` is called every second while it runs (it may
    inject a fault). Returns the job's logs and every node seen {id: (state, resources)}."""
    client = JobSubmissionClient(cluster.dashboard_url)
    job = submit(client, entrypoint=f"{sys.executable} {ROOT}/{SMOKE} --out {out} {flags}",
                 runtime_env={"env_vars": {"RAYTRANSFER_CACHE": cache, "RAY_AUTH_MODE": "disabled"}})
    seen, deadline = {}, time.time() + timeout
    while (status := client.get_job_status(job)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        seen.update(nodes(cluster))
        if during is not None:
            during(seen)
        if time.time() > deadline:
            client.stop_job(job)
            pytest.fail(f"the sweep job did not end in {timeout} s:\n{client.get_job_logs(job)[-4000:]}")
        time.sleep(1)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-6000:]
    return logs, seen


def records(out) -> dict:
    return {f.stem: json.loads(f.read_text()) for f in (Path(out) / "jobstore" / "jobs").glob("*.json")}


def attempts(out, key) -> list:
    f = Path(out) / "jobstore" / "attempts" / f"{key}.json"
    return json.loads(f.read_text()) if f.exists() else []


def test_ray_train_trials_run_across_autoscaled_gpu_workers_on_the_cpu(cluster, cache, tmp_path):
    """--workers-per-trial 2 on fake GPUs: each trial a TorchTrainer of two ranks, each holding a GPU of an
    autoscaled worker; the workers say they are a test cluster, so they train on the CPU over gloo (Ray
    would pick NCCL and CUDA: "ProcessGroupNCCL is only supported with GPUs" / "Found no NVIDIA driver")."""
    out = tmp_path / "exp"
    logs, seen = run_job(cluster, cache, out, "--workers-per-trial 2 --max-concurrent 1")
    assert "host=train, 1 GPU + 1 CPU" in logs and "x 2 workers per trial" in logs, logs[-3000:]
    assert "ProcessGroupNCCL" not in logs and "NVIDIA driver" not in logs
    table = pd.read_csv(out / "results.csv")
    recs = records(out)
    assert len(table) == len(recs) == 3 and (table.status == "done").all()
    gpu_nodes = {n for n, (_, res) in seen.items() if n != HEAD_ID and res.get("GPU", 0) >= 1}
    assert set(table.node_id) <= gpu_nodes, (set(table.node_id), seen)
    assert (table.gpus_held == 2).all() and (table.device == "cpu").all()     # two ranks, one fake GPU each
    assert (table.attempts == 1).all()                              # nothing failed, nothing retried
    assert {r["host"] for r in recs.values()} == {"train"}


def trial_process(cluster, key: str) -> psutil.Process | None:
    """The process of the trial whose first job is `key`: a process of this cluster whose working dir is that
    trial's folder (<key>[+<more jobs>]_<trial id>)."""
    for pid in cluster.processes():
        try:
            p = psutil.Process(pid)
            name = os.path.basename(p.cwd())
            if name.startswith(key) and name[len(key):len(key) + 1] in ("_", "+"):
                return p
        except psutil.Error:
            continue
    return None


def checkpointed_base(out) -> str | None:
    """A base whose trial Tune has a checkpoint of (its second exists: the first is then Tune's), not done."""
    done = set(records(out))
    for c in Path(out).glob("tune-*/*/checkpoint_*"):
        key = c.parent.name.rsplit("_", 1)[0].split("+")[0]
        if "-base" in key and int(c.name.rsplit("_", 1)[1]) >= 1 and key not in done:
            return key
    return None


def kill_node_of(proc: psutil.Process) -> tuple[int, list[int]]:
    """SIGKILL the raylet of the node `proc` runs on and every process under it: the node is lost."""
    raylet = psutil.Process(int(proc.environ()["RAY_RAYLET_PID"]))
    victims = [raylet, *raylet.children(recursive=True)]
    for p in victims:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    return raylet.pid, [p.pid for p in victims]


def catch_a_base_training(cluster, out, then):
    """A `during` hook: once a base's trial has a checkpoint Tune knows of, `then(key, trial process, node
    id)` runs, once. Returns (hook, what happened)."""
    happened = {}

    def hook(seen):
        if happened:
            return
        key = checkpointed_base(out)
        proc = trial_process(cluster, key) if key else None
        if proc is None or not attempts(out, key):
            return
        node = attempts(out, key)[-1]["node_id"]
        assert node != HEAD_ID
        happened.update(key=key, node=node, at=time.time(), **then(key, proc, node))
        happened["finished_first"] = key in records(out)         # a fault too late hits nothing of the base
    return hook, happened


def sweep_through_a_fault(cluster, cache, out, fault, flags) -> tuple[str, dict, dict]:
    """The smoke sweep with `fault(key, proc, node)` done to the node of a base caught training with a
    checkpoint: (logs, what the fault returned and where, records) once every job is done and the caught base
    has resumed from its last checkpoint."""
    hook, caught = catch_a_base_training(cluster, out, fault)
    logs, _ = run_job(cluster, cache, out, f"{flags} {SLOWER}", during=hook)
    assert caught, "no base trial was caught training with a checkpoint"
    assert not caught["finished_first"], f"{caught['key']} finished before the fault: it came too late"
    recs, table = records(out), pd.read_csv(out / "results.csv")
    assert len(recs) == len(table) == 3 and (table.status == "done").all()
    assert recs[caught["key"]]["metrics"]["resumed_from_epoch"] is not None     # from its last checkpoint
    return logs, caught, recs


def test_a_lost_gpu_node_retries_its_trial_on_a_new_node_from_its_checkpoint(cluster, cache, tmp_path):
    out = tmp_path / "exp"

    def lose_the_node(key, proc, node):
        raylet, pids = kill_node_of(proc)
        print(f"killed node {node[-5:]} under {key}: raylet {raylet} and {len(pids) - 1} processes under it")
        return {"raylet": raylet}

    logs, killed, recs = sweep_through_a_fault(cluster, cache, out, lose_the_node, "--checkpoint-minutes 0")
    deadline = time.time() + 60                                         # the GCS marks it dead within its
    while nodes(cluster)[killed["node"]][0] != "DEAD":                  # health checks' period
        assert time.time() < deadline, f"node {killed['node'][-5:]} is not dead a minute after its raylet was killed"
        time.sleep(1)
    lost = on_the_node(out, recs, killed["node"])                       # the caught trial, and any beside it
    for key, r in recs.items():
        if key in lost:                                                 # a lost node is a failure: it counts
            first, second = attempts(out, key)
            assert r["attempts"] == 2 and r["preemptions"] == 0, key
            assert second["node_id"] == r["node_id"] not in (killed["node"], HEAD_ID)   # on another node
        else:                                                           # nothing else trained twice
            assert r["attempts"] == 1, key
    assert f"restarts: {len(lost)} after failures, 0 after preemptions" in logs


def on_the_node(out, recs, node) -> set:
    """The jobs whose first attempt ran on `node`."""
    return {k for k in recs if attempts(out, k)[0]["node_id"] == node}


def drain_as_preempted(address: str, node: str, deadline_s: float = 1.0):
    """What a cloud's spot reclaim looks like to Ray: the node drained with reason PREEMPTION and a deadline
    (as `ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION ...` does); Ray then records a node that dies
    after that deadline as preempted, and its actors' ActorDiedError.preempted is True."""
    from ray._raylet import GcsClient
    from ray.core.generated import autoscaler_pb2

    accepted, why = GcsClient(address=address).drain_node(
        node, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"), "spot instance reclaimed (test)",
        int((time.time() + deadline_s) * 1000))
    assert accepted, why


def test_a_preempted_node_restarts_its_trial_without_spending_max_failures(cluster, cache, tmp_path):
    """--max-failures 0: a failure would end the job; a preemption restarts it from its checkpoint and is
    counted apart, in its record, the summary and `raytransfer status`."""
    out = tmp_path / "exp"

    def preempt_the_node(key, proc, node):
        drain_as_preempted(cluster.address, node)
        time.sleep(2.0)                                                # past the deadline: the cloud takes it
        raylet, _ = kill_node_of(proc)
        print(f"preempted node {node[-5:]} under {key}")
        return {"raylet": raylet}

    logs, preempted, recs = sweep_through_a_fault(cluster, cache, out, preempt_the_node,
                                                  "--checkpoint-minutes 0 --max-failures 0")
    gone = on_the_node(out, recs, preempted["node"])                    # the caught trial, and any beside it
    for key, r in recs.items():
        if key in gone:
            assert r["attempts"] == 2 and r["preemptions"] == 1, key
            assert attempts(out, key)[0]["ended"] == "preempted"
        else:
            assert r["attempts"] == 1 and r["preemptions"] == 0, key
    summary = f"restarts: 0 after failures, {len(gone)} after preemptions"
    assert summary in logs
    st = subprocess.run([sys.executable, "-m", "raytransfer", "status", str(out)], capture_output=True, text=True,
                        cwd=ROOT, timeout=300, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert st.returncode == 0 and summary in st.stdout, st.stdout + st.stderr


@pytest.fixture(scope="module")
def gpus_without_cuda():
    """A cluster that does not say it is a test cluster (no raytransfer_test_cluster resource) whose worker
    node has two GPUs without CUDA: a real cluster with a broken GPU image, as the trials see it."""
    from ray.cluster_utils import Cluster

    tmp = tempfile.mkdtemp(prefix="rtg", dir="/tmp")
    os.makedirs(f"{tmp}/ray")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")
        mp.setenv("RAY_TMPDIR", tmp)
        mp.delenv("RAY_ADDRESS", raising=False)
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False,
                                                          "temp_dir": tmp})
        try:
            c.add_node(num_cpus=3, num_gpus=2)    # 1 CPU per GPU for the workers, room for a trial's driver
            c.wait_for_nodes()
            yield c
        finally:
            c.shutdown()
            shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.parametrize("workers", [2, 1], ids=["ray-train", "one-process"])
def test_a_gpu_trial_without_cuda_fails_once_with_its_reason(gpus_without_cuda, cache, tmp_path, workers):
    """No retry can give a node CUDA: each base fails at its first attempt (Ray Train: its workers start on
    gloo -- NCCL would fail first, with an error a retry repeats -- and each fails its device check in the
    loop; one process: before it trains), its record and the summary say why, and the transfer that needs
    them is not run."""
    out = tmp_path / "exp"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAYTRANSFER_CACHE": cache}
    env.pop("RAY_ADDRESS", None)
    p = subprocess.run([sys.executable, *f"{ROOT}/{SMOKE}".replace("auto", gpus_without_cuda.address).split(),
                        "--out", str(out), "--workers-per-trial", str(workers)],
                       env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    text = p.stdout + p.stderr
    failed = {f.stem: json.loads(f.read_text()) for f in (out / "jobstore" / "failed").glob("*.json")}
    bases = sorted(k for k in failed if "-base" in k)
    assert len(bases) == 2 and not records(out), text[-4000:]
    for key in bases:
        assert "CUDA is not available" in failed[key]["reason"] and "--gpus-per-trial 0" in failed[key]["reason"]
        assert len(attempts(out, key)) == 1 and failed[key]["host"] == ("train" if workers > 1 else "process")
        assert f"[sweep] failed: {key}: this trial holds 1 GPU(s)" in text
    assert "0 done (0 trained now, 0 done before), 2 failed, 1 not run" in text, text[-3000:]
    assert "ProcessGroupNCCL" not in text


def test_retry_notes_tell_a_preemption_from_a_failure_by_the_error_tune_judged(tmp_path):
    """A recovery from an actor that died preempted (the error Tune pickled beside the trial) is noted as a
    preemption on the job's latest attempt; one from any other error is not, also for a trial that failed
    before it ever started. The record then carries `preemptions` beside `attempts`, and a trial Tune gives
    up on gets a failed record with its last error."""
    from types import SimpleNamespace

    import cloudpickle
    from ray.exceptions import RayActorError

    from raytransfer.sweep.status import restarts
    from raytransfer.sweep.store import JobStore
    from raytransfer.sweep.retries import RetryNotes

    store, notes = JobStore(str(tmp_path)), RetryNotes(str(tmp_path))
    (tmp_path / "trial").mkdir()
    pickled = tmp_path / "trial" / "error.pkl"
    trial = SimpleNamespace(trial_id="t1", config={"job_key": "k", "spec": {"treatment": "baseA"}},
                            local_path=str(tmp_path / "trial"), pickled_error_file=str(pickled))
    (tmp_path / "trial" / "error.txt").write_text("Traceback ...\nRuntimeError: the loop blew up\n")

    def recover_from(error):
        pickled.write_bytes(cloudpickle.dumps(error))
        notes.on_trial_recover(0, [], trial)

    recover_from(FileNotFoundError(2, "No such file or directory"))   # before any start: a failure
    store.count_attempt("k", {"node_id": "n1"})
    recover_from(RayActorError(error_msg="node preempted", preempted=True))   # not counted by Tune
    store.count_attempt("k", {"node_id": "n2"})
    recover_from(RayActorError(error_msg="node died"))                 # counted: a failure
    store.count_attempt("k", {"node_id": "n3"})
    assert [a.get("ended") for a in store.attempts("k")] == ["preempted", None, None]
    store.write("k", {"attempts": 3, "metrics": {}})
    rec = store.read("k")
    assert rec["preemptions"] == 1 and restarts({"k": rec}) == {"restarts_after_failures": 1, "preemptions": 1}

    notes.on_trial_error(0, [], SimpleNamespace(**{**vars(trial), "config": {"job_key": "j", "spec": {}},
                                                   "run_metadata": SimpleNamespace(num_failures=1)}))
    assert "RuntimeError: the loop blew up" in store.failed()["j"]["reason"]
    notes.on_trial_error(0, [], trial)                     # a job with a record is never marked failed
    assert "k" not in store.failed()


def test_a_setup_error_in_ray_trains_worker_start_up_is_found():
    """A TrialSetupError raised in Train's start-up (a ControllerError, not a WorkerGroupError) is still one
    job failure with its reason."""
    from ray.train import ControllerError

    from raytransfer.hosts import TrialSetupError
    from raytransfer.sweep.trainable import _setup_error

    assert _setup_error(ControllerError(TrialSetupError("no CUDA on node n1")), TrialSetupError) == "no CUDA on node n1"
    assert _setup_error(ControllerError(ValueError("ProcessGroupNCCL ...")), TrialSetupError) is None
