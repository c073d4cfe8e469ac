"""Bad input to the whole sweep command line: one clear message, nothing trained, nothing lost.

The inputs that need a cluster (GPUs it lacks, more GPUs than a node has) run against a small
simulated one (`ray.cluster_utils.Cluster`, fake GPU counts); the others need no Ray at all. The
rest of the list (unknown scale/treatment/split, n outside 1..7, missing --data, storage not
writable, --resume with nothing there) is in test_sweep.py.

"Nothing lost": the storage holds two finished bases before each command, and every file that was
there is byte-for-byte the same afterwards; "nothing trained": no new record, no weights, no Tune
experiment.
"""
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

import pytest
import ray
import torch
from ray.cluster_utils import Cluster

from raytransfer.sweep.runner import main
from raytransfer.sweep.store import JobStore

ROOT = Path(__file__).resolve().parents[1]
SWEEP = [sys.executable, str(ROOT / "sweeps" / "full_paper.py")]
GRID = runpy.run_path(str(ROOT / "sweeps" / "full_paper.py"))["GRID"]
FLAGS = ["--scale", "smoke", "--splits", "similar", "--treatments", "AnB", "--n", "1", "--no-report"]


@pytest.fixture(scope="module")
def env():
    """The environment of every command here; the built-in smoke dataset prepared once, before Ray starts."""
    tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    os.makedirs(f"{tmp}/ray")                                # Ray's "current cluster" file: here, not /tmp/ray
    cache = tempfile.mkdtemp(prefix="rtc", dir="/tmp")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": tmp, "RAYTRANSFER_CACHE": cache}.items():
            mp.setenv(k, v)
        mp.delenv("RAY_ADDRESS", raising=False)
        assert main(GRID, FLAGS + ["--out", f"{tmp}/dry", "--dry-run"], name="full_paper") == 0
        yield {**os.environ}
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(env):
    """A head with 2 CPUs and no GPU (explicitly: also on a machine that has some)."""
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0, "include_dashboard": False,
                                                      "temp_dir": env["RAY_TMPDIR"]})
    yield c
    c.shutdown()


def job_table(capsys, out) -> dict:
    """{job key: (status, base key)} from the sweep's --dry-run job table."""
    assert main(GRID, FLAGS + ["--out", str(out), "--dry-run"], name="full_paper") == 0
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        parts = line.split()
        if parts and parts[0].startswith(("similar", "dissimilar")):
            rows[parts[0]] = ("done" if parts[1] == "done" else "to run", parts[-1])
    return rows


def bases_of(table: dict) -> dict:
    bases = {k.split("-")[1]: k for k in table if "-base" in k}    # {"baseA": key, "baseB": key}
    assert sorted(bases) == ["baseA", "baseB"] and len(table) == 3, table
    return bases


def seed_finished_bases(out: Path, table: dict, corrupt: str | None = None) -> JobStore:
    """Records and weights of the two bases, as a finished run leaves them (one file optionally corrupt)."""
    store = JobStore(str(out))
    for name, key in bases_of(table).items():
        uri = store.save_weights(key, {"conv1.weight": torch.zeros(2, 3)})
        store.write(key, {"metrics": {"top1_final": 0.5, "top1_best10": 0.5, "epochs": 3, "epoch_log": []},
                          "weights_uri": uri, "config": {"job_key": key, "treatment": name}, "host": "process"})
        if name == corrupt:
            (out / "jobstore" / "weights" / key / "state.pt").write_bytes(b"\x80 not a torch file")
    return store


def files(out: Path) -> dict:
    return {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}


def check_nothing_trained_nothing_lost(out: Path, before: dict):
    after = files(out)
    assert {p: after.get(p) for p in before} == before                          # every file as it was
    new = set(after) - set(before)            # the job store's index is a cache of its records: a read writes it
    assert not [p for p in new if ("jobstore" in p.parts and p.name != "index.json.gz") or p.name == "tuner.pkl"], \
        sorted(new)


def run_main(capsys, argv) -> tuple[int, str]:
    """The sweep command in this process; Ray (when it connected to --address) is left again."""
    capsys.readouterr()
    try:
        rc = main(GRID, argv, name="full_paper")
    finally:
        ray.shutdown()
    return rc, capsys.readouterr().err


def one_error(err: str, *phrases):
    assert err.count("full_paper.py: error:") == 1, err
    for phrase in phrases:
        assert phrase in err, (phrase, err)


@pytest.fixture
def seeded(capsys, env, tmp_path):
    out = tmp_path / "exp"
    table = job_table(capsys, out)
    seed_finished_bases(out, table)
    return out, files(out)


def test_gpus_asked_of_a_cluster_without_gpus(capsys, cluster, seeded):
    out, before = seeded
    rc, err = run_main(capsys, FLAGS + ["--out", str(out), "--address", cluster.address, "--gpus-per-trial", "1"])
    assert rc == 2
    one_error(err, "--gpus-per-trial 1 and --cpus-per-trial 1 per worker fit(s) no node type of this cluster",
              "alive node (CPU 2; 1 alive)", "the cluster has no GPUs: drop the flag")
    check_nothing_trained_nothing_lost(out, before)


def test_more_gpus_per_trial_than_any_node_offers(capsys, cluster, seeded):
    out, before = seeded
    node = cluster.add_node(num_cpus=0, num_gpus=1)                # a (fake) one-GPU node
    try:
        cluster.wait_for_nodes()
        rc, err = run_main(capsys, FLAGS + ["--out", str(out), "--address", cluster.address,
                                            "--gpus-per-trial", "2"])
    finally:
        cluster.remove_node(node)
    assert rc == 2
    one_error(err, "--gpus-per-trial 2 and --cpus-per-trial 1 per worker fit(s) no node type", "GPU 1", "ask for fewer")
    check_nothing_trained_nothing_lost(out, before)


@pytest.mark.parametrize("kind", ["closed port", "no such host", "not Ray"])
def test_unreachable_ray_address(capsys, env, seeded, kind):
    """A closed port, a host that does not resolve, and a port that answers but not as Ray (an HTTP server,
    as the dashboard's 8265 would: ray.init would retry it for many minutes): one line each, at once."""
    import http.server
    import threading

    out, before = seeded
    class Quiet(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    address, phrases = {
        "closed port": ("127.0.0.1:1", ["Ray address 127.0.0.1:1 is unreachable", "start the cluster"]),
        "no such host": ("nohost.invalid:6379", ["Ray address nohost.invalid:6379: no host nohost.invalid"]),
        "not Ray": (f"127.0.0.1:{server.server_address[1]}", ["answers, but not as a Ray cluster",
                                                               "give the head's GCS address (IP:6379"]),
    }[kind]
    try:
        rc, err = run_main(capsys, FLAGS + ["--out", str(out), "--address", address])
    finally:
        server.shutdown()
    assert rc == 2
    one_error(err, *phrases, "fix --address")
    assert err.strip().count("\n") == 0, err
    check_nothing_trained_nothing_lost(out, before)


def test_resume_with_a_different_grid(capsys, cluster, env, tmp_path):
    """A real interrupted sweep (its driver killed as soon as Tune saved the experiment), then --resume of
    another grid, and of the same grid with another flag: each refused with every difference listed;
    the interrupted one stays restorable."""
    from ray.tune import Tuner

    out = tmp_path / "exp"
    grid = ["--scale", "smoke", "--splits", "dissimilar", "--treatments", "AnB", "--no-report"]
    proc = subprocess.Popen(SWEEP + grid + ["--n", "1", "--out", str(out), "--address", cluster.address,
                                            "--gpus-per-trial", "0"],
                            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not list(out.glob("tune-*/tuner.pkl")):
            assert proc.poll() is None and time.time() < deadline, "the sweep never saved its experiment"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    (exp,) = [p.parent for p in out.glob("tune-*/tuner.pkl")]
    before = files(out)

    rc, err = run_main(capsys, grid + ["--n", "1,2", "--out", str(out), "--resume"])
    assert rc == 2
    one_error(err, f"--resume of the interrupted sweep {exp.name}", "--n 1 (interrupted) vs 1,2 (now)",
              "--gpus-per-trial 0.0 (interrupted) vs (default) (now)", "the grid: 3 jobs (interrupted) vs 4 (now)",
              "drop --resume")
    check_nothing_trained_nothing_lost(out, before)
    rc, err = run_main(capsys, grid + ["--n", "1", "--gpus-per-trial", "0", "--max-failures", "5", "--out", str(out),
                                       "--resume"])               # the same grid, another retry budget
    assert rc == 2
    one_error(err, "--max-failures 2 (interrupted) vs 5 (now)")
    assert "the grid" not in err and err.strip().count("\n") == 0, err          # one line, naming the fix
    check_nothing_trained_nothing_lost(out, before)
    assert Tuner.can_restore(str(exp))

    # the storage also holds another sweep, saved after this one: a resume of this grid is judged by its own
    import json

    from raytransfer.sweep.runner import INVOCATION, check_resume
    saved = json.loads((exp / INVOCATION).read_text())
    (out / "tune-0ther5weep").mkdir()
    (out / "tune-0ther5weep" / INVOCATION).write_text(json.dumps({**saved, "jobs": saved["jobs"][:1],
                                                                  "saved_at": time.time() + 60}))
    check_resume(str(out), exp.name, {"flags": saved["flags"], "jobs": saved["jobs"]})     # no error: it matches
    rc, err = run_main(capsys, grid + ["--n", "1", "--gpus-per-trial", "0", "--max-failures", "5", "--out", str(out),
                                       "--resume"])
    assert rc == 2
    one_error(err, f"--resume of the interrupted sweep {exp.name}", "--max-failures 2 (interrupted) vs 5 (now)")
    assert "the grid" not in err


def test_no_room_for_the_betons(capsys, env, seeded, tmp_path, monkeypatch):
    """The disk holding the built-in dataset is (simulated) nearly full: refused before any beton is
    written, and nothing there looks like a finished dataset."""
    out, before = seeded
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("RAYTRANSFER_CACHE", str(cache))
    real = shutil.disk_usage

    def nearly_full(path):
        usage = real(path)
        return usage._replace(free=1 << 20) if str(path).startswith(str(cache)) else usage

    monkeypatch.setattr(shutil, "disk_usage", nearly_full)
    rc, err = run_main(capsys, FLAGS + ["--out", str(out)])
    assert rc == 2
    one_error(err, "cannot prepare the built-in dataset", "GiB free; the betons need about", "RAYTRANSFER_CACHE")
    leftovers = [p.name for p in cache.rglob("*") if p.is_file()]
    assert not [n for n in leftovers if n == "manifest.json" or ".beton" in n], leftovers
    check_nothing_trained_nothing_lost(out, before)


def test_corrupt_base_weights_drop_that_base_alone(capsys, cluster, env, tmp_path):
    """A finished base whose weights file is corrupt (loaded with weights_only=True): the job needing it
    fails with a clear error without training, the base's record is dropped (and only that one), and
    the next run retrains that base alone."""
    out = tmp_path / "exp"
    table = job_table(capsys, out)
    bases = bases_of(table)
    store = seed_finished_bases(out, table, corrupt="baseA")
    b_record = store.read(bases["baseB"])
    p = subprocess.run(SWEEP + FLAGS + ["--out", str(out), "--address", cluster.address, "--gpus-per-trial", "0",
                                        "--max-failures", "0"],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    text = p.stdout + p.stderr
    assert p.returncode == 1, text[-6000:]
    assert f"dropped the record of base {bases['baseA']}" in text                # the trial's error
    assert f"the weights of {bases['baseA']} were unreadable (corrupt)" in p.stdout    # the sweep's last word
    assert "rerun the same command to retrain them alone" in p.stdout
    recs = JobStore(str(out)).completed(refresh=True)
    assert set(recs) == {bases["baseB"]} and recs[bases["baseB"]] == b_record   # nothing trained, B kept
    anb = [k for k in table if k not in bases.values()]
    assert not (out / "jobstore" / "weights" / anb[0]).exists()
    after = job_table(capsys, out)                                            # the next run: A alone, then AnB
    assert after[bases["baseA"]][0] == "to run" and after[bases["baseB"]][0] == "done"
    assert after[anb[0]] == ("to run", bases["baseA"])


# last: the extra node it starts and stops must not linger into other tests' clusters
def _can_unshare_mounts() -> bool:
    try:
        return subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _can_unshare_mounts(), reason="needs `unshare -m` (root) to give a node its own disk")
def test_storage_a_node_cannot_see(capsys, cluster, env, seeded):
    """A local --storage on a cluster with a node that has its own disk (a Ray node started in a private
    mount namespace with an empty tmpfs over the storage folder): refused before anything trains."""
    out, before = seeded
    ray_bin = Path(sys.executable).with_name("ray")
    node = subprocess.Popen(["unshare", "-m", "sh", "-c", f"mount -t tmpfs tmpfs {out} && exec {ray_bin} start "
                             f"--address={cluster.address} --num-cpus=1 --num-gpus=0 --block"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        ray.init(address=cluster.address)
        deadline = time.time() + 120
        while sum(n["Alive"] for n in ray.nodes()) < 2:
            assert node.poll() is None and time.time() < deadline, "the second node never joined"
            time.sleep(0.5)
        ray.shutdown()
        rc, err = run_main(capsys, FLAGS + ["--out", str(out), "--address", cluster.address, "--gpus-per-trial", "0"])
    finally:
        ray.shutdown()
        os.killpg(node.pid, signal.SIGTERM)
        node.wait(timeout=60)
    assert rc == 2
    one_error(err, f"--storage {out} is not shared: 1 of the cluster's 2 nodes cannot use it", "s3://bucket/prefix",
              "shared filesystem mounted at the same path on every node")
    check_nothing_trained_nothing_lost(out, before)


# -- which errors are one line: the user's input, never a bug ---------------------------------------

def test_a_bad_grid_value_is_one_line_and_an_internal_error_shows_its_traceback(capsys, env, tmp_path, monkeypatch):
    """A sweep file's grid with a treatment that does not exist (checked in jobs.validate_axes, after the data
    is resolved): one line. An internal ValueError (here injected into the dataset step) propagates with its
    traceback instead of passing for bad input."""
    from ray import tune

    from raytransfer.sweep import runner

    bad = {**GRID, "treatment": tune.grid_search(["AnB", "AnBB"])}
    capsys.readouterr()
    assert main(bad, FLAGS[:2] + ["--out", str(tmp_path / "x"), "--dry-run"], name="full_paper") == 2
    one_error(capsys.readouterr().err, "unknown treatment 'AnBB'; expected one of")

    def broken(*args):
        raise ValueError("an internal bug, not the user's input")

    monkeypatch.setattr(runner, "resolve_dataset", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        main(GRID, FLAGS + ["--out", str(tmp_path / "y"), "--dry-run"], name="full_paper")
    assert "error:" not in capsys.readouterr().err


def test_an_unreadable_job_store_stops_the_sweep_with_one_line(capsys, env, seeded, monkeypatch):
    """A record the store cannot read (a folder where a record should be: an OSError other than 'not found'):
    the sweep stops with one line naming it, rather than train that job again."""
    from raytransfer.sweep import store as store_module

    monkeypatch.setattr(store_module, "READ_BACKOFF_S", 0.01)
    out, before = seeded
    (out / "jobstore" / "jobs" / "somejob.json").mkdir()
    rc, err = run_main(capsys, FLAGS + ["--out", str(out), "--dry-run"])
    assert rc == 2
    one_error(err, "cannot read", "somejob.json", "tried 4 times", "rerun the same command")
    (out / "jobstore" / "jobs" / "somejob.json").rmdir()
    check_nothing_trained_nothing_lost(out, before)


def test_raytransfer_commands_one_line_for_input_traceback_for_bugs(capsys, tmp_path, monkeypatch):
    from raytransfer import cli, models

    assert cli.main(["layers", "alexnet9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("raytransfer layers: error: unknown architecture 'alexnet9'"), err
    assert cli.main(["layers", "caffenet", "--resolution", "8"]) == 2     # too small for its poolings
    assert len(capsys.readouterr().err.strip().splitlines()) == 1

    def broken(model):
        raise ValueError("an internal bug")

    monkeypatch.setattr(models, "describe_layers", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        cli.main(["layers", "caffenet"])


def test_report_of_a_folder_without_results_is_one_line(capsys, tmp_path):
    """`raytransfer report DIR` and `python -m analysis DIR` on a folder without a results table, or with
    a setting the table lacks: one line naming the problem and the fix; the same flags in both."""
    import pandas as pd

    from analysis.__main__ import main as analysis_main
    from raytransfer import cli

    for command in (lambda a: cli.main(["report", *a]), analysis_main):
        assert command([str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"no results table in {tmp_path}" in err[0], err
        assert "pass the sweep's results folder" in err[0]
    row = {"job_key": "b", "dataset": "toy", "split_kind": "similar", "split_seed": 0, "seed": 0, "treatment": "baseA",
           "target_half": "A", "n": 0, "arch": "tiny", "recipe": "fast", "top1_best10": 0.5, "status": "done"}
    pd.DataFrame([row]).to_csv(tmp_path / "results.csv", index=False)
    for command in (lambda a: cli.main(["report", *a]), analysis_main):
        assert command([str(tmp_path), "--arch", "resnet18", "--out", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no rows with arch 'resnet18'; the table has ['tiny']" in err[0], err
    pd.DataFrame([row, {**row, "job_key": "c", "arch": "other"}]).to_csv(tmp_path / "results.csv", index=False)
    assert cli.main(["report", str(tmp_path), "--out", str(tmp_path / "both")]) == 0   # two settings: a note
    page = (tmp_path / "both" / "report.html").read_text()
    assert "pick one: raytransfer report RESULTS_DIR --dataset D --arch A --recipe R" in page
    assert cli.main(["report", str(tmp_path), "--dataset", "toy", "--arch", "tiny", "--recipe", "fast",
                     "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "report.html").is_file() and "pick one" not in (tmp_path / "r" / "report.html").read_text()


def test_report_takes_the_flags_of_python_m_analysis():
    import argparse

    from analysis.__main__ import add_report_args
    from raytransfer.cli import add_report_args as cli_report_args

    def options(add):
        p = argparse.ArgumentParser()
        add(p)
        return sorted((a.dest, tuple(a.option_strings), a.default) for a in p._actions)

    assert options(add_report_args) == options(cli_report_args)


@pytest.mark.parametrize("sets, phrases", [
    (["colour=red"], ["unknown recipe field 'colour'; known: arch, width"]),
    (["width=wide"], ["--set width=wide: width takes a number"]),
    (["compile=maybe"], ["compile takes true or false"]),
    (["iterations"], ["write FIELD=VALUE"]),
    (["crop=square"], ["crop 'square'; expected one of paper, rrc"]),
    (["batch_size=0"], ["batch_size must be > 0"]),
])
def test_a_bad_set_is_one_line_naming_the_field(capsys, env, tmp_path, sets, phrases):
    """--set is checked against the recipe's fields and types before anything is prepared or trained."""
    argv = FLAGS + ["--out", str(tmp_path / "x"), "--dry-run"] + [a for s in sets for a in ("--set", s)]
    rc, err = run_main(capsys, argv)
    assert rc == 2
    one_error(err, *phrases)
    assert not (tmp_path / "x").exists()
