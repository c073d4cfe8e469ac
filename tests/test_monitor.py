"""Watching a long sweep: `raytransfer status` from the job store alone, the console, and -- in one
real smoke sweep -- the live report, one MLflow run per job (a sqlite:/// tracking URI), TensorBoard event
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
from raytransfer.sweep.monitor import SweepProgress, hms
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


def finished(key: str, seconds: float, **config) -> SimpleNamespace:
    """A trial of one job as Tune hands it to a callback when it ends (trainable.final_report)."""
    return SimpleNamespace(status="RUNNING", config={"job_key": key, **config},
                           last_result={"time_total_s": seconds, "outcomes": json.dumps({key: {"weights_uri": "/w"}})})


def test_progress_is_a_bar_on_a_terminal_and_lines_elsewhere(capsys):
    trials = [finished("a", 60.0)]
    bar = SweepProgress(total=4, done=1, concurrency=1, dashboard="http://127.0.0.1:8265", tty=True)
    bar.on_trial_complete(0, trials, trials[0])
    bar.on_experiment_end(trials)
    err = capsys.readouterr().err                                   # tqdm draws on stderr
    assert "2/4" in err and "ETA 0:02:00" in err and "dashboard http://127.0.0.1:8265" in err
    plain = SweepProgress(total=4, done=1, concurrency=1, tty=False)
    plain.on_trial_complete(0, trials, trials[0])
    assert capsys.readouterr().out.strip() == "[sweep] 2/4 jobs done, 0 running, 0 failed, ETA 0:02:00"


def test_eta_weighs_the_jobs_left_by_their_step_cost(tmp_path, capsys):
    """After one base of 100 s, a base and three frozen n = 7 nets are left: 100 s x (1 + 3 x 0.367), not
    4 x the mean job; the jobs left come from the store's plan less its done records."""
    from raytransfer.step_costs import relative_cost

    store = JobStore(str(tmp_path))
    plan = [job("old", "similar", "baseA"), job("bA", "similar", "baseA"), job("bB", "similar", "baseB")]
    plan += [{**job(f"t{i}", "similar", "AnB", "bA"), "n": 7} for i in range(3)]
    store.write_sweep({"experiment": "tune-x", "jobs": plan})
    store.write("old", {"metrics": {}})                                 # done before this sweep: not left
    trial = finished("bA", 100.0, spec={"treatment": "baseA", "n": 0})
    progress = SweepProgress(total=6, done=1, concurrency=1, store=store, tty=False)
    progress.on_trial_complete(0, [trial], trial)
    expected = 100.0 * (1 + 3 * relative_cost(7))
    assert progress.eta_s(0) == pytest.approx(expected) and expected < 0.6 * 4 * 100
    assert capsys.readouterr().out.strip().endswith(f"ETA {hms(expected)}")
    frozen = finished("t0", 40.0, spec={"treatment": "AnB", "n": 7})
    progress.on_trial_complete(0, [frozen], frozen)                      # 140 s for 1 + 0.367 base-jobs
    assert progress.eta_s(0) == pytest.approx(140.0 / (1 + relative_cost(7)) * (1 + 2 * relative_cost(7)))


def test_a_log_gets_a_progress_line_only_when_it_changes(capsys):
    trials = [SimpleNamespace(status="RUNNING", last_result={}, config={"job_key": k}) for k in "ab"]
    progress = SweepProgress(total=4, done=0, concurrency=2, every_s=0.0, tty=False)
    for _ in range(5):
        progress.on_trial_result(0, trials, trials[0], {})
    assert capsys.readouterr().out.splitlines() == ["[sweep] 0/4 jobs done, 2 running, 0 failed"]
    trials[1].status = "TERMINATED"
    for _ in range(3):
        progress.on_trial_result(0, trials, trials[0], {})
    assert capsys.readouterr().out.splitlines() == ["[sweep] 0/4 jobs done, 1 running, 0 failed"]


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]                                      # closed again: connections are refused


def _erring_server(runs_work: bool = False):
    """A real HTTP server that answers MLflow's requests with a 500 (all of them; or, with `runs_work`,
    all but finding the experiment and creating runs)."""
    import http.server
    import threading

    class Fails(http.server.BaseHTTPRequestHandler):
        def _fail(self):
            body = b'{"error_code": "INTERNAL_ERROR", "message": "the tracking store is broken"}'
            status = 500
            if runs_work and "experiments/get-by-name" in self.path:
                status, body = 200, b'{"experiment": {"experiment_id": "1", "name": "x"}}'
            elif runs_work and self.path.endswith("runs/create"):
                status, body = 200, b'{"run": {"info": {"run_id": "r1", "experiment_id": "1"}, "data": {}}}'
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _fail

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Fails)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.parametrize("where", ["down", "erring", "logging errs"])
def test_mlflow_down_or_erring_warns_once_per_kind_and_the_sweep_goes_on(where, monkeypatch, caplog):
    from raytransfer.sweep.monitor import MLflowJobs

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")          # fail at once, not after backoff
    server = _erring_server(runs_work=where == "logging errs") if where != "down" else None
    uri = f"http://127.0.0.1:{server.server_address[1] if server else _closed_port()}"
    try:
        tracker = MLflowJobs(uri, "x", pause_s=0.0)
        trials = [SimpleNamespace(trial_id=f"t{i}", config={"job_key": f"k{i}", "spec": {"treatment": "AnB", "n": 1}},
                                  last_result={"outcomes": json.dumps({f"k{i}": {"top1_final": 0.5}})})
                  for i in range(3)]
        with caplog.at_level("WARNING", logger="raytransfer.sweep"):
            for t in trials:                                             # every callback returns: none raises
                tracker.on_trial_start(0, trials, t)
                tracker.on_trial_result(0, trials, t, {"records": json.dumps({t.config["job_key"]: {"epoch": 1,
                                                                                                  "val_top1": 0.4}})})
                tracker.on_trial_complete(0, trials, t)
                tracker.on_trial_error(0, trials, t)
    finally:
        if server:
            server.shutdown()
    warnings = [r.getMessage() for r in caplog.records if "MLflow at" in r.getMessage()]
    assert all(uri in w and "the sweep goes on" in w for w in warnings), warnings
    if where == "logging errs":                     # runs exist; each failing kind of call warned once
        assert len(tracker.runs) == 3
        assert sorted(w.split(" failed")[0].split(": ")[-1] for w in warnings) == ["log_metric", "log_param",
                                                                                 "set_terminated"]
    else:
        assert len(warnings) == 1 and "get_experiment failed" in warnings[0] and tracker.runs == {}, warnings


def test_a_watched_smoke_sweep_live_report_mlflow_tensorboard_summary(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)   # a database, as MLflow 3 recommends

    out, tracking = tmp_path / "exp", f"sqlite:///{tmp_path / 'mlflow.db'}"   # a server: test_mlflow.py
    env = {**os.environ, "RAY_AUTH_MODE": "disabled",
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
        record = json.loads((out / "jobstore" / "jobs" / f"{r.info.run_name}.json").read_text())
        assert steps == [e["step"] for e in record["metrics"]["epoch_log"]] and len(steps) >= 2   # a point a record,
        assert steps == sorted(set(steps))                                   # at its training step
    for key in keys:                                                # TensorBoard: event files kept per job
        assert list((out / "tensorboard" / key).glob("events.out.tfevents*")), key

    st = json.loads(subprocess.run([sys.executable, "-m", "raytransfer.cli", "status", str(out), "--json"],
                                   capture_output=True, text=True, env=env, check=True).stdout)
    assert (st["done"], st["running"], st["failed"], st["waiting"]) == (4, 0, 0, 0) and st["driver"]["ended"]
