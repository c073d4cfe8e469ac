"""Bad input at the edges of a cluster, caught before anything trains: a `--data` folder that some node
does not hold (a Ray node started in its own mount namespace, an empty tmpfs over the dataset's folder),
and the note for nodes an autoscaler adds later. The other edges are in test_cli_errors.py: an --address
that does not answer (a closed port, a host that does not resolve, a port that is not Ray), --resume of
storage that holds another sweep, storage a node cannot see."""
from __future__ import annotations

import os
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray
from ray.cluster_utils import Cluster

from raytransfer.sweep.errors import SweepError
from raytransfer.sweep.runner import main

ROOT = Path(__file__).resolve().parents[1]
GRID = runpy.run_path(str(ROOT / "sweeps" / "full_paper.py"))["GRID"]
FLAGS = ["--scale", "smoke", "--splits", "similar", "--treatments", "AnB", "--n", "1", "--no-report",
         "--set", "batch_size=8", "--gpus-per-trial", "0"]          # the tiny fixture dataset: 16 images a half


def _can_unshare_mounts() -> bool:
    try:
        return subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module")
def cluster(synthetic_dataset):
    """A head (2 CPUs, no GPU), shared by the tests here; the dataset fixture is prepared before Ray starts."""
    tmp = tempfile.mkdtemp(prefix="rte", dir="/tmp")
    os.makedirs(f"{tmp}/ray")                                # Ray's "current cluster" file: here, not /tmp/ray
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": tmp}.items():
            mp.setenv(k, v)
        mp.delenv("RAY_ADDRESS", raising=False)
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0, "include_dashboard": False,
                                                          "temp_dir": tmp})
        yield c
        ray.shutdown()
        c.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


def test_a_dataset_every_node_holds_passes_with_a_note_for_nodes_added_later(cluster, synthetic_dataset, capsys):
    """On a cluster whose autoscaler can launch more nodes the probe passes for the nodes alive now and
    says what nodes added later need; the built-in synthetic dataset is not probed (each node prepares it)."""
    from raytransfer.sweep.capacity import NodeType
    from raytransfer.sweep.node_checks import check_dataset

    data, manifest = synthetic_dataset
    jobs = [SimpleNamespace(spec={"data_dir": str(data), "dataset_fingerprint": manifest["fingerprint"],
                                  "synthetic": None})]
    launchable = [NodeType("gpu", {"GPU": 1.0}, 2, launchable=True)]
    ray.init(address=cluster.address)
    try:
        check_dataset(jobs, launchable)
        assert "checked on the 1 node(s) alive now; nodes the autoscaler adds later must hold the same betons" \
            in capsys.readouterr().out
        check_dataset([SimpleNamespace(spec={**jobs[0].spec, "synthetic": {"x": 1}, "data_dir": "/nowhere"})],
                      launchable)
        assert capsys.readouterr().out == ""
        with pytest.raises(SweepError, match="on 1 of the cluster's 1 nodes.*holds another dataset at .*fingerprint"):
            check_dataset([SimpleNamespace(spec={**jobs[0].spec, "dataset_fingerprint": "0" * 64})])
    finally:
        ray.shutdown()


def test_a_node_that_leaves_while_probed_is_skipped_not_an_error(cluster, capsys):
    """An autoscaler scales an idle worker down between ray.nodes() and the probe pinned to it (seen in CI:
    TaskUnschedulableError from the storage probe ended a sweep on the local autoscaler): that node gets no
    answer and the check goes on; the nodes still there answer."""
    from raytransfer.sweep.node_checks import _dataset_probe, ask_each_node

    ray.init(address=cluster.address)
    try:
        alive = [n for n in ray.nodes() if n["Alive"]]
        gone = {**alive[0], "NodeID": "ab" * 28, "NodeManagerAddress": "192.0.2.9"}
        answers = ask_each_node(_dataset_probe, alive + [gone], {"data_dir": "/nowhere", "dataset_fingerprint": None},
                                timeout=60)
    finally:
        ray.shutdown()
    assert set(answers) == {alive[0]["NodeID"]} and "no prepared dataset at /nowhere" in answers[alive[0]["NodeID"]]
    assert "node 192.0.2.9 (abababab) left the cluster while being checked; skipped" in capsys.readouterr().out


# last: the node it starts and stops must not linger into the other test's cluster
@pytest.mark.skipif(not _can_unshare_mounts(), reason="needs `unshare -m` (root) to give a node its own disk")
def test_data_a_node_does_not_hold(cluster, synthetic_dataset, tmp_path, capsys):
    data, _ = synthetic_dataset
    out = tmp_path / "exp"
    ray_bin = Path(sys.executable).with_name("ray")
    node = subprocess.Popen(["unshare", "-m", "sh", "-c", f"mount -t tmpfs tmpfs {data} && exec {ray_bin} start "
                             f"--address={cluster.address} --num-cpus=1 --num-gpus=0 --block"],
                            env=os.environ.copy(), stdout=open(tmp_path / "node.log", "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        ray.init(address=cluster.address)
        deadline = time.time() + 180
        while sum(n["Alive"] for n in ray.nodes()) < 2:
            assert node.poll() is None and time.time() < deadline, (tmp_path / "node.log").read_text()[-3000:]
            time.sleep(0.5)
        ray.shutdown()
        capsys.readouterr()
        rc = main(GRID, FLAGS + ["--data", str(data), "--out", str(out), "--address", cluster.address],
                  name="full_paper")
        err = capsys.readouterr().err
    finally:
        ray.shutdown()
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGTERM)
        node.wait(timeout=60)
    assert rc == 2, err
    assert err.count("full_paper.py: error:") == 1 and err.strip().count("\n") == 0, err
    for phrase in (f"--data {data} is not the prepared dataset on 1 of the cluster's 2 nodes",
                   "so every job sent there would fail", f"has no prepared dataset at {data}",
                   "stage the betons at the same path on every node", "point --data at a shared filesystem"):
        assert phrase in err, (phrase, err)
    assert not list(out.glob("jobstore/jobs/*")) and not list(out.glob("jobstore/weights/*"))   # nothing trained
    assert not list(out.glob("tune-*"))                                                       # nor started
