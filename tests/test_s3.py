"""The sweep on an S3 API, as a cluster user runs it: a local S3 server (moto's server mode,
tests/s3server.py) reached through the standard variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION) and `--storage s3://BUCKET/rt`.

Proves: records, final weights and Tune's experiment state land in the bucket; `raytransfer status
s3://...` reads it from another process; a driver killed mid-sweep is finished by --resume, through a
server that stalls for 20 s meanwhile (the sweep waits, logs, loses no job, trains none twice); the
same command again trains nothing; the credentials are in no key, object or log line. A server that
stays away ends the sweep with one error naming the storage and the --resume command; a missing
bucket and refused credentials are one error before anything trains.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from s3server import CREDENTIALS, s3_server

ROOT = Path(__file__).resolve().parents[1]
SWEEP = [sys.executable, str(ROOT / "sweeps" / "full_paper.py")]
FLAGS = ["--scale", "smoke", "--splits", "similar", "--treatments", "AnB", "--no-dashboard", "--num-cpus", "2",
         "--no-report", "--checkpoint-minutes", "0"]
BUCKET = "rt-sweeps"
STORAGE = f"s3://{BUCKET}/rt"
SECRETS = (CREDENTIALS["AWS_SECRET_ACCESS_KEY"], CREDENTIALS["AWS_ACCESS_KEY_ID"])


@pytest.fixture(scope="module")
def cache():
    """The built-in dataset, prepared once for this module's sweeps."""
    path = tempfile.mkdtemp(prefix="rtc", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def env(cache):
    """The sweep's environment (the S3 variables are added per test); Ray's temp dir short and per test."""
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    e = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAYTRANSFER_RAY_TMP": ray_tmp, "RAYTRANSFER_CACHE": cache}
    e.pop("RAY_ADDRESS", None)
    yield e
    shutil.rmtree(ray_tmp, ignore_errors=True)


def start(env, out: Path, *flags) -> tuple[subprocess.Popen, Path]:
    log = out.parent / f"driver-{time.time_ns()}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(SWEEP + FLAGS + ["--out", str(out), "--storage", STORAGE, *flags], env=env, cwd=ROOT,
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def finish(proc, log, rc=0, timeout=600) -> str:
    try:
        got = proc.wait(timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text()
    assert got == rc, text[-6000:]
    return text


def wait_for(what: str, condition, proc, timeout=400, every=0.3):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"the sweep ended (rc {proc.returncode}) before {what}")
        time.sleep(every)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def wait_gone(ray_tmp: str, timeout=120):
    """Until no process of the killed sweep's local Ray (they carry its RAYTRANSFER_RAY_TMP) is left."""
    import psutil

    deadline = time.time() + timeout
    while time.time() < deadline:
        left = []
        for p in psutil.process_iter():
            try:
                if p.environ().get("RAYTRANSFER_RAY_TMP") == ray_tmp:
                    left.append(p)
            except psutil.Error:
                continue
        if not left:
            return
        time.sleep(0.5)
    pytest.fail(f"processes of the killed sweep still run after {timeout} s: {left}")


def records(s3) -> dict:
    client = s3.client()
    return {k.rsplit("/", 1)[1][:-5]: json.loads(client.get_object(Bucket=BUCKET, Key=k)["Body"].read())
            for k in s3.keys(BUCKET, "rt/jobstore/jobs/") if k.endswith(".json")}


def attempts(s3, key) -> int:
    try:
        return len(json.loads(s3.client().get_object(Bucket=BUCKET, Key=f"rt/jobstore/attempts/{key}.json")["Body"].read()))
    except s3.client().exceptions.NoSuchKey:
        return 0


def assert_no_credentials(s3, texts, folders):
    """Neither the secret nor the key id in any key, object or output; in Ray's logs (`folders`) only where
    Ray puts them itself: Tune copies the driver's AWS_* variables into each trial's runtime env, and Ray's
    runtime-env agent logs that env (docs/cluster.md says so, and how to keep them out of the node's logs)."""
    client = s3.client()
    for key in s3.keys(BUCKET):
        body = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        for secret in SECRETS:
            assert secret not in key and secret.encode() not in body, (secret, key)
    for text in texts:
        for secret in SECRETS:
            assert secret not in text
    for folder in folders:
        for f in Path(folder).rglob("*"):
            if f.is_file() and not f.is_symlink() and not f.name.startswith("runtime_env_agent"):
                try:
                    data = f.read_bytes()
                except OSError:
                    continue
                for secret in SECRETS:
                    assert secret.encode() not in data, (secret, f)


def test_s3_sweep_killed_resumed_through_a_stall_and_rerun(env, tmp_path, monkeypatch):
    out = tmp_path / "exp"
    with s3_server(monkeypatch) as s3:
        s3.create_bucket(BUCKET)
        env = {**env, **s3.env}
        # [1] the sweep, killed (driver and its local Ray) once a base is done and a transfer is not
        proc, log1 = start(env, out, "--n", "1,2")
        try:
            wait_for("a base's record", lambda: any("-base" in k for k in records(s3)), proc)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        wait_gone(env["RAYTRANSFER_RAY_TMP"])                        # its trials too: none writes after this
        before = records(s3)
        assert 1 <= len(before) < 4, sorted(before)

        # [2] status from another process, reading the bucket alone
        st = subprocess.run([sys.executable, "-m", "raytransfer", "status", STORAGE, "--json"], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
        assert st.returncode == 0, st.stderr
        status = json.loads(st.stdout)
        assert status["jobs"] == 4 and status["done"] == len(before) and status["storage"] == STORAGE

        # [3] --resume finishes it, through a server frozen for 20 s while its trials run
        tried = {k.rsplit("/", 1)[1][:-5]: attempts(s3, k.rsplit("/", 1)[1][:-5])
                 for k in s3.keys(BUCKET, "rt/jobstore/attempts/") if k.endswith(".json")}
        proc, log2 = start(env, out, "--n", "1,2", "--resume")
        try:
            wait_for("a resumed trial", lambda: re.search(r"\[sweep\] \d/4 jobs done, [1-9] running", log2.read_text()), proc)
            s3.freeze()
            time.sleep(20)
        finally:
            s3.thaw()
        text2 = finish(proc, log2)
        assert "trying again" in text2 and "answers again" in text2, text2[-4000:]   # it waited, and said so
        after = records(s3)
        assert len(after) == 4 and all(r["metrics"].get("top1_final") is not None for r in after.values())
        assert {k: after[k]["recorded_at"] for k in before} == {k: r["recorded_at"] for k, r in before.items()}
        for key in set(after) - set(before):                         # one attempt more: the resume's, none for the stall
            assert after[key]["attempts"] == tried.get(key, 0) + 1, (key, after[key]["attempts"], tried)

        # [4] the same command again trains nothing
        proc, log3 = start(env, out, "--n", "1,2")
        text3 = finish(proc, log3)
        assert "4 jobs, 4 done, 0 to run" in text3
        assert {k: r["recorded_at"] for k, r in records(s3).items()} == {k: r["recorded_at"] for k, r in after.items()}

        # [5] what the bucket holds: records, final weights, Tune's experiment state; no credentials anywhere
        keys = s3.keys(BUCKET)
        for key in after:
            assert f"rt/jobstore/weights/{key}/state.pt" in keys
        assert any(k.startswith("rt/tune-") and "/experiment_state-" in k for k in keys), keys
        assert any(k.startswith("rt/tune-") and k.endswith("/tuner.pkl") for k in keys), keys
        assert_no_credentials(s3, [log1.read_text(), text2, text3, st.stdout, st.stderr], [env["RAYTRANSFER_RAY_TMP"]])


def test_s3_server_that_stays_away_ends_the_sweep_with_one_error_and_the_resume_command(env, tmp_path, monkeypatch):
    out = tmp_path / "exp"
    with s3_server(monkeypatch) as s3:
        s3.create_bucket(BUCKET)
        env = {**env, **s3.env, "RAYTRANSFER_STORAGE_WAIT_S": "15"}
        proc, log = start(env, out, "--n", "1")
        wait_for("the sweep's trials", lambda: "[sweep] 3 jobs," in log.read_text(), proc)
        time.sleep(3)
        s3.stop()                                                    # gone for good
        gone = time.time()
        text = finish(proc, log, rc=2)
        waited = time.time() - gone
    errors = [line for line in text.splitlines() if "error:" in line]
    assert len(errors) == 1, text[-4000:]
    assert STORAGE.rsplit("/", 1)[0] in errors[0] and "did not answer for 15 s" in errors[0]
    assert "--resume" in errors[0] and "full_paper.py" in errors[0]
    assert "trying again" in text                                    # it waited before giving up
    print(f"ended {waited:.0f} s after the server went away")


def test_bad_s3_storage_is_one_clear_error_before_anything_trains(tmp_path, monkeypatch, capsys, fresh_outages):
    import runpy

    from raytransfer.sweep.runner import main

    grid = runpy.run_path(str(ROOT / "sweeps" / "full_paper.py"))["GRID"]
    argv = ["--scale", "smoke", "--out", str(tmp_path / "x"), "--no-dashboard"]
    with s3_server(monkeypatch) as s3:                               # a bucket nobody created
        rc = main(grid, [*argv, "--storage", "s3://no-such-bucket/rt"], name="full_paper")
        err = capsys.readouterr().err
        assert rc == 2 and "bucket 'no-such-bucket' does not exist" in err and s3.endpoint in err, err
        assert err.strip().count("error:") == 1
    with s3_server(monkeypatch, server_env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"}) as s3:   # checks credentials
        rc = main(grid, [*argv, "--storage", STORAGE], name="full_paper")
        err = capsys.readouterr().err
        assert rc == 2 and "refuses these credentials" in err and "AWS_SECRET_ACCESS_KEY" in err, err
        assert err.strip().count("error:") == 1 and not any(s in err for s in SECRETS), err
    assert not (tmp_path / "x").exists() or not list((tmp_path / "x").rglob("*.json"))


@pytest.fixture
def fresh_outages():
    """This process's memory of storages it gave up on, empty before and after (tests share the bucket name)."""
    from raytransfer.sweep.storage import _Outage

    _Outage.since.clear(), _Outage.gave_up.clear()
    yield
    _Outage.since.clear(), _Outage.gave_up.clear()


def test_storage_filesystem_waits_out_a_stall_gives_up_after_its_budget_and_pickles_no_credentials(monkeypatch,
                                                                                                    caplog,
                                                                                                    fresh_outages):
    """The one filesystem behind Tune, Train, the job store and status (raytransfer/sweep/storage.py),
    alone: a call during a stall returns once the server is back (logged); a missing file is an error at
    once; a server gone for longer than the budget is StorageUnavailable, and later calls fail at once."""
    import logging
    import pickle
    import threading

    import pyarrow.fs

    from raytransfer.sweep.storage import StorageUnavailable, storage_filesystem

    monkeypatch.setenv("RAYTRANSFER_STORAGE_WAIT_S", "6")
    caplog.set_level(logging.WARNING, logger="raytransfer.storage")
    with s3_server(monkeypatch) as s3:
        s3.create_bucket(BUCKET)
        fs, path = storage_filesystem(STORAGE)
        with fs.open_output_stream(f"{path}/a.json") as f:
            f.write(b"{}")
        blob = pickle.dumps(fs)                                      # what Tune stores in the experiment state
        assert not any(s.encode() in blob for s in SECRETS)
        fs = pickle.loads(blob)                                      # credentials from this process's environment
        s3.freeze()
        threading.Timer(5, s3.thaw).start()
        with fs.open_output_stream(f"{path}/b.json") as f:           # spans the stall: tried again, then lands
            f.write(b"{}")
        assert fs.get_file_info(f"{path}/b.json").type == pyarrow.fs.FileType.File
        assert "trying again" in caplog.text and "answers again" in caplog.text
        with pytest.raises(FileNotFoundError):
            fs.open_input_stream(f"{path}/missing.json")             # not a network error: no wait
        s3.stop()
        t = time.time()
        with pytest.raises(StorageUnavailable, match="did not answer for 6 s.*--resume"):
            fs.get_file_info(f"{path}/a.json")
        assert 5 < time.time() - t < 60
        t = time.time()
        with pytest.raises(StorageUnavailable):
            fs.get_file_info(f"{path}/a.json")                      # this process gave up: no second wait
        assert time.time() - t < 10
