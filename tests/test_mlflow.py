"""MLflow as researchers run it: `--mlflow http://...` against a real `mlflow server` (started here on a free
port with the sqlite backend MLflow recommends) in one smoke sweep of three jobs; the watched sweep of
test_monitor.py logs to a `sqlite:///` URI directly. A URI MLflow would refuse (its file store without
MLFLOW_ALLOW_FILE_STORE, a database folder that does not exist, a database without SQLAlchemy) stops the
sweep with one line before anything trains: MLflow's callbacks only warn, so it would go unlogged."""
from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from raytransfer.sweep.monitor import check_tracking_uri
from raytransfer.sweep.runner import main
from s3server import free_port

ROOT = Path(__file__).resolve().parents[1]
GRID = runpy.run_path(str(ROOT / "sweeps" / "full_paper.py"))["GRID"]
SMOKE = ["--scale", "smoke", "--splits", "similar", "--treatments", "AnB", "--n", "1", "--no-report"]


@contextmanager
def mlflow_server(tmp: Path):
    """`mlflow server` on a free local port with a sqlite backend, as MLflow's docs set one up; its URL."""
    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri",
                             f"sqlite:///{tmp / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1"], cwd=tmp, stdout=open(tmp / "server.log", "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240                       # the first start creates the schema (alembic)
        while True:
            assert proc.poll() is None, (tmp / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, "mlflow server never answered /health"
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)


def test_a_smoke_sweep_logs_one_run_per_job_to_an_mlflow_server(tmp_path):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "exp"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled",
           "RAYTRANSFER_CACHE": tempfile.mkdtemp(prefix="rtc", dir="/tmp"),
           "RAYTRANSFER_RAY_TMP": tempfile.mkdtemp(prefix="rt", dir="/tmp")}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_ALLOW_FILE_STORE", None)
    try:
        with mlflow_server(tmp_path) as url:
            p = subprocess.run([sys.executable, str(ROOT / "sweeps" / "full_paper.py"), *SMOKE, "--no-dashboard",
                                "--num-cpus", "2", "--report-every", "0", "--out", str(out), "--mlflow", url,
                                "--mlflow-experiment", "edges"],
                               env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
            assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
            assert "MLflow at" not in p.stdout + p.stderr                    # no call failed
            client = MlflowClient(url)
            runs = client.search_runs([client.get_experiment_by_name("edges").experiment_id])
            history = {r.info.run_id: client.get_metric_history(r.info.run_id, "val_top1") for r in runs}
    finally:
        shutil.rmtree(env["RAYTRANSFER_CACHE"], ignore_errors=True)
        shutil.rmtree(env["RAYTRANSFER_RAY_TMP"], ignore_errors=True)
    records = {json.loads(f.read_text())["job_key"]: json.loads(f.read_text())
               for f in (out / "jobstore" / "jobs").glob("*.json")}
    assert len(records) == 3 and sorted(r.info.run_name for r in runs) == sorted(records)    # one run a job
    for r in runs:
        record = records[r.info.run_name]
        assert r.info.status == "FINISHED" and r.data.params["job_key"] == r.info.run_name
        assert r.data.metrics["top1_best10"] == pytest.approx(record["metrics"]["top1_best10"])
        steps = [m.step for m in history[r.info.run_id]]
        assert steps == [e["step"] for e in record["metrics"]["epoch_log"]] and len(steps) >= 2
    assert not (out / "mlruns").exists() and not (ROOT / "mlruns").exists()    # nothing fell back to a file store


@pytest.mark.parametrize("uri, phrases", [
    ("file://{tmp}/mlruns", ["is MLflow's file store", "sqlite:///{tmp}/mlflow.db", "an MLflow server",
                             "set MLFLOW_ALLOW_FILE_STORE=true"]),
    ("{tmp}/mlruns", ["is MLflow's file store", "set MLFLOW_ALLOW_FILE_STORE=true"]),
    ("sqlite:///{tmp}/nowhere/mlflow.db", ["the folder {tmp}/nowhere of that database does not exist"]),
])
def test_a_uri_mlflow_refuses_stops_the_sweep_before_anything_trains(uri, phrases, tmp_path, monkeypatch, capsys):
    """No Ray, no dataset, no storage: the command line's checks refuse the URI first, in one line."""
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    out = tmp_path / "exp"
    rc = main(GRID, SMOKE + ["--out", str(out), "--mlflow", uri.format(tmp=tmp_path)], name="full_paper")
    err = capsys.readouterr().err
    assert rc == 2 and err.count("error:") == 1 and err.strip().count("\n") == 0, err
    for phrase in phrases:
        assert phrase.format(tmp=tmp_path) in err, (phrase, err)
    assert not out.exists()                                     # not even the experiment folder


def test_the_file_store_when_allowed_a_relative_sqlite_path_and_a_missing_sqlalchemy(tmp_path, monkeypatch):
    """With MLFLOW_ALLOW_FILE_STORE=true the file store passes; relative paths become absolute (the driver
    later runs in the experiment folder); a database URI without SQLAlchemy names `pip install mlflow`."""
    from raytransfer.sweep.errors import SweepError

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    assert check_tracking_uri("mlruns") == f"file://{tmp_path}/mlruns"
    assert check_tracking_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path}/mlflow.db"
    assert check_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    import importlib.util
    real = importlib.util.find_spec                             # as with mlflow-skinny alone: no SQLAlchemy
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sqlalchemy" else real(name, *a))
    with pytest.raises(SweepError, match="needs the full MLflow package .*pip install mlflow"):
        check_tracking_uri("sqlite:///mlflow.db")
