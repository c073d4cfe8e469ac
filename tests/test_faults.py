"""Fault tolerance on a simulated multi-node cluster: a head and two worker nodes on this machine
(`ray.cluster_utils.Cluster`, one raylet each), the sweep driver joining it with --address.

The head offers no CPU, so every trial runs on a worker node, as trials run on the GPU nodes of a
real cluster. A smoke sweep (bases A and B, AnB n=1) first runs clean across both workers; each
fault test then extends the grid on a copy of that storage and injects one fault while a new job
trains: (a) the trial's process is killed: Tune retries it from its last checkpoint; (b) its worker
node is removed: the trial moves to the other node and resumes; (c) the driver is killed: --resume
finishes, and a trial whose checkpoints were corrupted meanwhile restarts from scratch instead of
failing. Every run ends with every job done, no base trained twice, the finished rows unchanged.

Storage is a local path: every simulated node is this machine, so it is shared storage (Ray's
storage check only asks that the driver's marker file be visible from the trial).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
from ray._private import ray_constants
from ray.cluster_utils import Cluster

ROOT = Path(__file__).resolve().parents[1]
SWEEP = [sys.executable, str(ROOT / "sweeps" / "full_paper.py")]
FLAGS = ["--scale", "smoke", "--splits", "similar", "--treatments", "AnB", "--gpus-per-trial", "0", "--no-report",
         "--checkpoint-minutes", "0"]                             # a checkpoint every epoch: something to resume


@pytest.fixture(scope="module")
def cluster():
    tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")          # short: Ray's socket paths live under it
    os.makedirs(f"{tmp}/ray")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")
        mp.setenv("RAY_TMPDIR", tmp)                          # Ray's "current cluster" file: here, not /tmp/ray
        mp.delenv("RAY_ADDRESS", raising=False)
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                          "temp_dir": tmp})
        try:
            for _ in range(2):
                c.add_node(num_cpus=1)
            c.wait_for_nodes()
            yield c
        finally:
            c.shutdown()
            shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def env(cluster):
    e = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAYTRANSFER_CACHE": tempfile.mkdtemp(prefix="rtc", dir="/tmp")}
    e.pop("RAY_ADDRESS", None)
    yield e
    shutil.rmtree(e["RAYTRANSFER_CACHE"], ignore_errors=True)


def start(env, cluster, out: Path, *flags) -> tuple[subprocess.Popen, Path]:
    log = out.parent / f"driver-{time.time_ns()}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(SWEEP + FLAGS + ["--address", cluster.address, "--out", str(out), *flags],
                                env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    return proc, log


def finish(proc, log, timeout=600) -> str:
    try:
        rc = proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert rc == 0, text[-6000:]
    return text


def wait_for(what: str, condition, proc=None, timeout=400, every=0.1):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the sweep ended (rc {proc.returncode}) before {what}")
        time.sleep(every)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def records(out) -> dict:
    return {f.stem: json.loads(f.read_text()) for f in (Path(out) / "jobstore" / "jobs").glob("*.json")}


def attempts(out, key) -> list:
    f = Path(out) / "jobstore" / "attempts" / f"{key}.json"
    return json.loads(f.read_text()) if f.exists() else []


def trial_dirs(out) -> list[Path]:
    return [d for d in Path(out).glob("tune-*/*") if d.is_dir()]


def job_of(trial_dir: Path) -> str:
    return trial_dir.name.rsplit("_", 1)[0].split("+")[0]      # <first job key>[+<more jobs>]_<trial id>


def trial_jobs(trial_dir: Path) -> list[str]:
    """The jobs of a trial (its cohort), from the config Tune wrote into its folder."""
    config = json.loads((trial_dir / "params.json").read_text())
    return [j["job_key"] for j in config["jobs"]]


def new_checkpointed(out, old: set) -> list[str]:
    """New jobs (no record yet) whose trial Tune has registered a checkpoint of.

    A trial persists checkpoint k before Tune has seen its report; it writes checkpoint k+1 only
    after Tune processed report k (function trainables report synchronously), so the second one
    existing means the first is Tune's to restore from.
    """
    done = set(records(out))
    second = [c for c in Path(out).glob("tune-*/*/checkpoint_*") if int(c.name.rsplit("_", 1)[1]) >= 1]
    return sorted({job_of(c.parent) for c in second} - old - done)


def trial_process(key: str) -> psutil.Process | None:
    """The process of the trial whose first job is `key`: a process of this test's cluster whose working dir is
    that trial's folder (<key>[+<more jobs>]_<trial id>)."""
    for p in psutil.Process().children(recursive=True):
        try:
            name = os.path.basename(p.cwd())
            if name.startswith(key) and name[len(key):len(key) + 1] in ("_", "+"):
                return p
        except psutil.Error:
            continue
    return None


def node_of(cluster, proc: psutil.Process):
    raylet = int(proc.environ()["RAY_RAYLET_PID"])
    return next(n for n in cluster.worker_nodes
                if n.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid == raylet)


def copy_of(baseline: Path, tmp_path: Path) -> tuple[Path, dict, pd.DataFrame]:
    out = tmp_path / "exp"
    shutil.copytree(baseline, out)
    return out, records(out), pd.read_csv(out / "results.csv")


def check_complete(out, n_jobs: int, before: dict, before_rows: pd.DataFrame) -> dict:
    """Every job done, nothing finished before retrained (bases included), finished rows unchanged, and
    no trial folder of a done job left behind (its record and weights are the durable copy)."""
    recs = records(out)
    table = pd.read_csv(out / "results.csv")
    assert len(recs) == len(table) == n_jobs and table.job_key.is_unique and (table.status == "done").all()
    assert {k: recs[k]["recorded_at"] for k in before} == {k: r["recorded_at"] for k, r in before.items()}
    for key, r in recs.items():
        if r["config"]["treatment"] in ("baseA", "baseB"):          # one attempt ever, in the clean run
            assert r["attempts"] == 1 and len(attempts(out, key)) == 1, key
    assert not [d for d in trial_dirs(out) if job_of(d) in recs], "trial folders of done jobs are left"
    old = table[table.job_key.isin(before_rows.job_key)].reset_index(drop=True)
    pd.testing.assert_frame_equal(old, before_rows, check_dtype=False)
    return recs


@pytest.fixture(scope="module")
def baseline(cluster, env, tmp_path_factory) -> Path:
    """The clean run: bases A and B train at once, one on each worker node, then AnB n=1."""
    out = tmp_path_factory.mktemp("baseline") / "exp"
    finish(*start(env, cluster, out, "--n", "1"))
    recs = records(out)
    assert len(recs) == 3 and len(pd.read_csv(out / "results.csv")) == 3
    workers = {n.node_id for n in cluster.worker_nodes}
    bases = [r for r in recs.values() if r["config"]["treatment"] in ("baseA", "baseB")]
    assert {r["node_id"] for r in bases} == workers                 # across the nodes, none on the head
    assert {r["node_id"] for r in recs.values()} <= workers
    return out


def test_a_killed_cohort_trial_retries_every_member_from_its_checkpoint(cluster, env, baseline, tmp_path):
    """Two new jobs of one stream (AnB n = 2 and 3 onto half B, base A done): one cohort trial. Killed mid-way,
    it resumes both members from the checkpoint that holds them; each counts the retry as an attempt."""
    out, before, before_rows = copy_of(baseline, tmp_path)
    proc, log = start(env, cluster, out, "--n", "1,2,3",            # two new jobs: AnB n=2, n=3; one slot, so
                      "--max-concurrent", "1")                      # they are not spread over two trials
    try:
        key = wait_for("a checkpoint of the new jobs", lambda: new_checkpointed(out, set(before)), proc, every=0.05)[0]
        folder = next(d for d in trial_dirs(out) if job_of(d) == key)
        members = trial_jobs(folder)
        victim = wait_for("its trial process", lambda: trial_process(key), proc)
        victim.kill()                                               # SIGKILL, mid-trial
        assert not set(members) & set(records(out)), "the jobs finished before their process was killed"
    except BaseException:
        proc.kill()
        raise
    text = finish(proc, log)
    recs = check_complete(out, 5, before, before_rows)
    assert len(members) == 2 and all(recs[k]["cohort_size"] == 2 for k in members)
    for k in members:
        m = recs[k]["metrics"]
        assert m["resumed_from_epoch"] is not None and m["resumed_from_epoch"] >= 0, m   # not from scratch
        assert [e["epoch"] for e in m["epoch_log"]] == list(range(m["epochs"]))          # every epoch once
        assert recs[k]["attempts"] == 2                             # the retry counts against --max-failures
    assert "5/5 jobs done" in text


def test_b_removed_worker_node_moves_its_trial_and_the_sweep_completes(cluster, env, baseline, tmp_path):
    out, before, before_rows = copy_of(baseline, tmp_path)
    proc, log = start(env, cluster, out, "--n", "1,2")
    removed = None
    try:
        key = wait_for("a checkpoint of the new job", lambda: new_checkpointed(out, set(before)), proc, every=0.05)[0]
        trial = wait_for("its trial process", lambda: trial_process(key), proc)
        trial.suspend()                                             # frozen: it cannot finish while the node goes
        removed = node_of(cluster, trial)
        removed_id = removed.node_id
        cluster.remove_node(removed)                                # its raylet and Ray's processes on it ...
        try:
            trial.kill()                                            # ... and the (frozen) trial: the machine is gone
        except psutil.NoSuchProcess:
            pass
        assert key not in records(out), "the job finished before its node was removed"
        finish(proc, log)
    finally:
        if proc.poll() is None:
            proc.kill()
        if removed is not None:
            cluster.add_node(num_cpus=1)                            # back to two workers for the next test
            cluster.wait_for_nodes()
    recs = check_complete(out, 4, before, before_rows)
    assert recs[key]["node_id"] != removed_id                       # it moved ...
    assert recs[key]["metrics"]["resumed_from_epoch"] is not None  # ... and resumed from the shared checkpoint


def snapshot_checkpoints(out, old_experiments: set) -> dict:
    """{job key: epoch} of the new trials whose checkpoint Tune's latest experiment snapshot has registered.

    Read from the snapshot's checkpoint manager, which is what Tuner.restore hands a trial back
    (TuneController._restore_trials -> Trial.latest_checkpoint_result), not from
    `last_result.checkpoint_dir_name`: Tune records a checkpointed result and snapshots in the same
    controller step, but registers its checkpoint one step later (when the trial's `save` task
    returns), so a snapshot can name checkpoint k in `last_result` while its manager does not hold
    it yet; a driver killed then resumes that trial without it (from k-1, or from scratch).
    """
    from ray.tune.trainable.metadata import _TrainingRunMetadata

    found = {}
    for f in Path(out).glob("tune-*/experiment_state-*.json"):
        if f.parent.name in old_experiments:
            continue
        try:
            trials = json.loads(f.read_text())["trial_data"]
        except (ValueError, KeyError, OSError):                     # being rewritten: next poll
            continue
        for _, meta in trials:
            last = json.loads(meta).get("last_result") or {}
            manager = _TrainingRunMetadata.from_json_state(meta).checkpoint_manager
            registered = manager.latest_checkpoint_result if manager is not None else None
            if registered is not None and last.get("config"):
                found[last["config"]["job_key"]] = registered.metrics["epoch"]
    return found


def test_c_killed_driver_resumes_and_a_corrupt_trial_checkpoint_restarts_that_trial(cluster, env, baseline,
                                                                                     tmp_path):
    out, before, before_rows = copy_of(baseline, tmp_path)
    old_experiments = {p.name for p in out.glob("tune-*")}
    flags = ("--n", "1,2,3")                                        # two new jobs, one per worker
    env = {**env, "TUNE_GLOBAL_CHECKPOINT_S": "1"}                  # Tune snapshots each second, not each 10 s
    proc, log = start(env, cluster, out, *flags)
    try:
        seen = wait_for("a snapshot that knows a new trial's checkpoint",
                        lambda: {k: e for k, e in snapshot_checkpoints(out, old_experiments).items()
                                 if k not in records(out)}, proc)
    finally:
        proc.kill()                                                 # the driver: SIGKILL, no cleanup
        proc.wait()
    new = [k for k in seen if k not in before]
    wait_for("the killed driver's trials to end", lambda: not any(trial_process(k) for k in new), timeout=120)
    unfinished = [k for k in new if k not in records(out)]
    assert unfinished, "every new job finished before the driver was killed"
    victim = unfinished[0]
    corrupted = [c / "state.pt" for d in trial_dirs(out) if job_of(d) == victim for c in d.glob("checkpoint_*")]
    assert corrupted
    for f in corrupted:
        f.write_bytes(b"not a checkpoint")

    finish(*start(env, cluster, out, *flags, "--resume"))
    recs = check_complete(out, 5, before, before_rows)
    m = recs[victim]["metrics"]
    assert m["resumed_from_epoch"] is None and "cannot be read" in m["discarded_checkpoint"], m
    assert [e["epoch"] for e in m["epoch_log"]] == list(range(m["epochs"]))          # a whole run from scratch
    for k in unfinished[1:]:                                        # an intact checkpoint is resumed
        assert recs[k]["metrics"]["resumed_from_epoch"] >= seen[k], recs[k]["metrics"]


def test_d_registry_killed_mid_sweep_transfers_read_their_base_from_storage(cluster, env, tmp_path):
    """The weights registry (the object-store copies of the bases) dies as soon as the first base is
    done: every transfer that starts afterwards reads its base's weights from storage and says so in
    its record; the sweep completes."""
    import ray

    out = tmp_path / "exp"
    ray.init(address=cluster.address, namespace="raytransfer", log_to_driver=False)   # connected before: no delay
    try:
        proc, log = start(env, cluster, out, "--n", "1,2", "--treatments", "AnB,BnB")
        try:
            registry = wait_for("the sweep's registry", lambda: [
                a for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith("raytransfer-weights-")], proc, every=0.05)
            assert len(registry) == 1, registry                     # one registry, this sweep's
            handle = ray.get_actor(registry[0]["name"], namespace=registry[0]["namespace"])  # now: it imports
            # the registry's module here (seconds), and the smoke transfers are done seconds after their base
            wait_for("a base's record", lambda: any(r["config"]["treatment"].startswith("base")
                                                    for r in records(out).values()), proc, every=0.02)
            ray.kill(handle, no_restart=True)
            killed_at = time.time()
        except BaseException:
            proc.kill()
            raise
        finish(proc, log)
    finally:
        ray.shutdown()
    recs = records(out)
    transfers = {k: r for k, r in recs.items() if not r["config"]["treatment"].startswith("base")}
    assert len(recs) == 6 and len(transfers) == 4
    after = [r for r in transfers.values() if r["started_at"] > killed_at]
    assert after and all(r["base_weights_via"] == "storage" for r in after), transfers
    assert all(r["base_weights_via"] in ("object_store", "storage") for r in transfers.values())
    table = pd.read_csv(out / "results.csv")
    assert set(table.base_weights_via.dropna()) <= {"object_store", "storage"} and (table.status == "done").all()
