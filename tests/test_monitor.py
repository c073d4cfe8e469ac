"""Watching a long sweep: `raytransfer status` from the job store alone, the console, and -- in one
real smoke sweep -- the live report, one MLflow run per job (a local file store), TensorBoard event
files kept per job, Tune's banner and the closing summary."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from raytransfer.cli import main as cli
from raytransfer.sweep.monitor import SweepProgress
from raytransfer.sweep.status import sweep_status
from raytransfer.sweep.store import JobStore

ROOT = Path(__file__).resolve().parents[1]


def job(key, split, treatment, base=None):
    return {"job_key": key, "split_kind": split, "treatment": treatment, "n": 1, "base_job_key": base or ""}


@pytest.fixture
def storage(tmp_path):
    """A sweep of 6 jobs half way: 3 done, 1 failed, 1 running (per the heartbeat), 1 waiting."""
    store = JobStore(str(tmp_path))
    store.write_sweep({"experiment": "tune-x", "gpus_per_trial": 1.0, "jobs": [
        job("bA", "similar", "baseA"), job("bB", "similar", "baseB"), job("t1", "similar", "AnB", "bA"),
        job("t2", "similar", "AnB", "bA"), job("t3", "similar", "BnB", "bB"), job("t4", "dissimilar", "AnB+", "bA")]})
    now = time.time()
    for key, hours in (("bA", 2.0), ("bB", 2.0), ("t1", 1.0)):
        store.write(key, {"metrics": {}, "weights_uri": "x", "config": {"treatment": "AnB" if key == "t1" else "baseA"},
                          "started_at": now - 36000, "finished_at": now - 36000 + hours * 3600, "gpus_held": 1.0})
    store.write_failed("t2", {"reason": "frozen layers changed during training (conv1.weight)",
                              "started_at": now - 7200, "finished_at": now - 3600, "gpus_held": 1.0})
    store.count_attempt("t3", {"node_id": "n1"})
    store.write_heartbeat({"running": ["t3"], "dashboard": "http://127.0.0.1:8265"})
    return tmp_path


def test_status_from_the_job_store_alone(storage, capsys):
    st = sweep_status(str(storage))
    assert (st["done"], st["running"], st["failed"], st["waiting"]) == (3, 1, 1, 1)
    assert st["driver"]["alive"] and st["driver"]["dashboard"] == "http://127.0.0.1:8265"
    assert st["by_split_and_treatment"]["similar x AnB"] == {"done": 1, "failed": 1}
    assert st["by_split_and_treatment"]["dissimilar x AnB+"] == {"waiting": 1}
    assert {b["job_key"]: (b["dependents_done"], b["dependents"]) for b in st["bases"]} == {"bA": (1, 3), "bB": (0, 1)}
    assert st["failed_jobs"] == [{"job_key": "t2", "reason": "frozen layers changed during training (conv1.weight)"}]
    assert 6.0 <= st["gpu_hours_spent"] < 6.1                      # 2 + 2 + 1 done, 1 failed, t3 just started
    assert st["gpu_hours_left_estimate"] == pytest.approx(1.0 + 2.0, rel=0.01)   # frozen t3 ~ t1; AnB+ ~ bases

    assert cli(["status", str(storage), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out)[:4] == ["done", "running", "failed", "waiting"]
    assert cli(["status", str(storage)]) == 0
    text = capsys.readouterr().out
    assert "6 jobs: 3 done, 1 running, 1 failed, 1 waiting" in text and "t2: frozen layers changed" in text


def test_status_tells_a_dead_driver_and_an_empty_path(storage, capsys):
    beat = storage / "jobstore" / "heartbeat.json"
    data = json.loads(beat.read_text())
    beat.write_text(json.dumps({**data, "at": time.time() - 3600}))            # no heartbeat for an hour
    st = sweep_status(str(storage))
    assert (st["running"], st["waiting"]) == (0, 2) and not st["driver"]["alive"]
    assert cli(["status", str(storage)]) == 0
    assert "stopped or killed; rerun the same command with --resume" in capsys.readouterr().out
    assert cli(["status", str(storage / "nowhere")]) == 2
    assert "holds no sweep" in capsys.readouterr().err


def test_progress_is_a_bar_on_a_terminal_and_lines_elsewhere(capsys):
    trials = [SimpleNamespace(status="RUNNING", last_result={"wall_s": 60.0}, config={"job_key": "a"})]
    bar = SweepProgress(total=4, done=1, concurrency=1, dashboard="http://127.0.0.1:8265", tty=True)
    bar.on_trial_complete(0, trials, trials[0])
    bar.on_experiment_end(trials)
    err = capsys.readouterr().err                                   # tqdm draws on stderr
    assert "2/4" in err and "ETA 0:02:00" in err and "dashboard http://127.0.0.1:8265" in err
    plain = SweepProgress(total=4, done=1, concurrency=1, tty=False)
    plain.on_trial_complete(0, trials, trials[0])
    assert capsys.readouterr().out.strip() == "[sweep] 2/4 jobs done, 0 running, 0 failed, ETA 0:02:00"


def test_a_watched_smoke_sweep_live_report_mlflow_tensorboard_summary(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")           # MLflow 3 keeps the file store behind a flag

    out, tracking = tmp_path / "exp", f"file://{tmp_path / 'mlruns'}"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "MLFLOW_ALLOW_FILE_STORE": "true",
           "RAYTRANSFER_CACHE": tempfile.mkdtemp(prefix="rtc", dir="/tmp"),
           "RAYTRANSFER_RAY_TMP": tempfile.mkdtemp(prefix="rt", dir="/tmp")}
    env.pop("RAY_ADDRESS", None)
    p = subprocess.run([sys.executable, str(ROOT / "sweeps" / "full_paper.py"), "--scale", "smoke", "--splits",
                        "similar", "--treatments", "AnB,BnB", "--n", "1", "--no-dashboard", "--num-cpus", "2",
                        "--out", str(out), "--report-every", "0.001", "--mlflow", tracking],
                       env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    live = [int(n) for n in re.findall(r"\[sweep\] live results: (\d+) networks", p.stdout)]
    assert live and min(live) < 4                                    # rebuilt while jobs were still to come
    assert re.search(r"Number of trials\s+4\b", p.stdout + p.stderr)    # Tune's banner: the real count
    page = (out / "report.html").read_text()
    assert "This report holds 4 of the 4 networks of its sweep (the sweep has ended" in page
    assert "[sweep] jobs: 4 in the grid: 4 done (4 trained now, 0 done before), 0 failed, 0 not run" in p.stdout
    assert f"[sweep] report: {out / 'report.html'}" in p.stdout

    keys = [json.loads(f.read_text())["job_key"] for f in (out / "jobstore" / "jobs").glob("*.json")]
    client = MlflowClient(tracking)
    runs = client.search_runs([client.get_experiment_by_name("full_paper").experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted(keys) and {r.info.status for r in runs} == {"FINISHED"}
    for r in runs:
        assert r.data.params["job_key"] == r.info.run_name and "top1_best10" in r.data.metrics
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "val_top1")]
        assert steps == list(range(len(steps))) and len(steps) >= 2          # one point per epoch
    for key in keys:                                                # TensorBoard: event files kept per job
        assert list((out / "tensorboard" / key).glob("events.out.tfevents*")), key

    st = json.loads(subprocess.run([sys.executable, "-m", "raytransfer.cli", "status", str(out), "--json"],
                                   capture_output=True, text=True, env=env, check=True).stdout)
    assert (st["done"], st["running"], st["failed"], st["waiting"]) == (4, 0, 0, 0) and st["driver"]["ended"]
