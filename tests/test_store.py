"""The job store on a real filesystem that fails: a read that fails is retried and then one clear error;
it never makes a finished job look undone, nor drops a record from completed(). The faults come from a
pyarrow filesystem that passes every call to the local disk and fails the first reads it is told to
(a fault injector under the store, not a stand-in for it)."""
from __future__ import annotations

import json
import os

import pyarrow.fs
import pytest

from raytransfer.sweep import store as store_module
from raytransfer.sweep.status import job_hours, sweep_status
from raytransfer.sweep.store import JobStore, StoreReadError


class FlakyReads(pyarrow.fs.FileSystemHandler):
    """The local filesystem, except that the first `fail[name]` opens for reading of a file called `name`
    raise `error` (an NFS/S3 hiccup, a permission); `cut[name]` opens read only its first half (a write
    half visible)."""

    def __init__(self, fail: dict | None = None, error: type = OSError, cut: dict | None = None):
        self.local, self.fail, self.error, self.cut, self.opened = pyarrow.fs.LocalFileSystem(), dict(fail or {}), error, dict(cut or {}), []

    def open_input_stream(self, path):
        name = os.path.basename(path)
        self.opened.append(name)
        if self.fail.get(name, 0) > 0:
            self.fail[name] -= 1
            raise self.error(5 if self.error is OSError else 13, f"injected failure reading {path}")
        if self.cut.get(name, 0) > 0:
            self.cut[name] -= 1
            with open(path, "rb") as f:
                data = f.read()
            return pyarrow.BufferReader(data[: len(data) // 2])
        return self.local.open_input_stream(path)

    # everything else: the local filesystem
    def get_type_name(self):
        return "flaky-local"

    def equals(self, other):
        return self is other

    def get_file_info(self, paths):
        return self.local.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.local.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.local.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.local.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.local.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise OSError("not here")

    def delete_file(self, path):
        self.local.delete_file(path)

    def move(self, src, dest):
        self.local.move(src, dest)

    def copy_file(self, src, dest):
        self.local.copy_file(src, dest)

    def open_input_file(self, path):
        return self.local.open_input_file(path)

    def open_output_stream(self, path, metadata):
        return self.local.open_output_stream(path)

    def open_append_stream(self, path, metadata):
        return self.local.open_append_stream(path)

    def normalize_path(self, path):
        return path


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch):
    monkeypatch.setattr(store_module, "READ_BACKOFF_S", 0.01)


def finished_store(tmp_path, n: int = 3) -> JobStore:
    store = JobStore(str(tmp_path))
    for i in range(n):
        store.write(f"job{i}", {"metrics": {"top1_final": 0.1 * i}, "weights_uri": f"w{i}"})
    return store


def flaky(tmp_path, **faults) -> tuple[JobStore, FlakyReads]:
    store, handler = JobStore(str(tmp_path)), FlakyReads(**faults)
    store.fs = pyarrow.fs.PyFileSystem(handler)
    return store, handler


def test_transient_read_errors_are_retried_and_keep_every_record(tmp_path, caplog):
    finished_store(tmp_path)
    store, handler = flaky(tmp_path, fail={"job1.json": 2, "job2.json": 3})
    with caplog.at_level("WARNING", logger="raytransfer.sweep"):
        done = store.completed()
    assert sorted(done) == ["job0", "job1", "job2"] and done["job2"]["weights_uri"] == "w2"
    assert handler.opened.count("job2.json") == 4                       # 3 failures, then the read
    retries = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert len(retries) == 5 and all("injected failure" in m for m in retries)
    assert store.read("job1")["weights_uri"] == "w1"


def test_a_read_that_keeps_failing_stops_with_one_clear_error(tmp_path):
    finished_store(tmp_path)
    store, _ = flaky(tmp_path, fail={"job1.json": 99})
    with pytest.raises(StoreReadError) as e:
        store.completed()                                              # never {job0, job2} as if job1 were undone
    message = str(e.value)
    assert "job1.json" in message and str(tmp_path) in message and "tried 4 times" in message
    assert "rerun the same command" in message and "\n" not in message
    with pytest.raises(StoreReadError):
        store.read("job1")                                              # the trial: never "no record, train it"
    assert store._cache is None                                         # nothing half-read was cached


def test_permission_denied_is_an_error_not_a_missing_record(tmp_path):
    finished_store(tmp_path)
    store, _ = flaky(tmp_path, fail={"job0.json": 99}, error=PermissionError)
    with pytest.raises(StoreReadError, match="PermissionError"):
        store.completed()
    with pytest.raises(StoreReadError, match="PermissionError"):
        store.count_attempt("job0", {})                                # attempts are never reset to []


def test_a_record_that_is_a_folder_is_an_error(tmp_path):
    """A path the store cannot read as a file (here a folder named like a record): an OSError that is not
    'not found', on the real local filesystem."""
    store = finished_store(tmp_path)
    (tmp_path / "jobstore" / "jobs" / "job9.json").mkdir()
    with pytest.raises(StoreReadError, match="job9.json"):
        store.completed(refresh=True)


def test_a_half_visible_json_is_read_again(tmp_path):
    finished_store(tmp_path)
    store, handler = flaky(tmp_path, cut={"job0.json": 1})
    assert store.completed()["job0"]["weights_uri"] == "w0" and handler.opened.count("job0.json") == 2
    store, _ = flaky(tmp_path, cut={"job0.json": 99})
    with pytest.raises(StoreReadError, match="JSONDecodeError"):
        store.completed()


def test_a_missing_file_is_still_no_record(tmp_path):
    store = finished_store(tmp_path, n=1)
    assert store.read("nope") is None and store.attempts("nope") == [] and store.read_heartbeat() is None
    assert list(store.completed()) == ["job0"]


def test_status_stops_on_an_unreadable_record(tmp_path, capsys):
    from raytransfer.cli import main

    store = finished_store(tmp_path, n=1)
    store.write_sweep({"experiment": "tune-x", "jobs": [{"job_key": "job0", "split_kind": "similar",
                                                         "treatment": "baseA", "n": 0}]})
    (tmp_path / "jobstore" / "jobs" / "job0.json").write_text('{"metrics": {')     # cut short, for good
    assert main(["status", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot read" in err[0] and "job0.json" in err[0], err


def test_job_hours_count_every_attempt(tmp_path):
    """Three starts of one job: two that died (each counted until the next began) and the one that finished."""
    store = JobStore(str(tmp_path))
    t0 = 1_000_000.0
    starts = [t0, t0 + 1800, t0 + 5400]
    path = tmp_path / "jobstore" / "attempts"
    path.mkdir(parents=True)
    (path / "j.json").write_text(json.dumps([{"at": t, "node_id": "n"} for t in starts]))
    store.write("j", {"metrics": {}, "started_at": t0 + 5399, "finished_at": t0 + 9000, "gpus_held": 2.0,
                      "attempts": 3})
    record = store.read("j")
    assert record["attempt_starts"] == starts
    gpu_h, hours = job_hours(record)
    assert hours == pytest.approx(9000 / 3600) and gpu_h == pytest.approx(2 * 9000 / 3600)
    old = {k: v for k, v in record.items() if k != "attempt_starts"}    # a record from before attempt_starts
    assert job_hours(old) == pytest.approx((2 * 3601 / 3600, 3601 / 3600))
    assert job_hours(old, attempts=store.attempts("j"))[1] == pytest.approx(9000 / 3600)
    store.write_sweep({"experiment": "tune-x", "gpus_per_trial": 2.0,
                       "jobs": [{"job_key": "j", "split_kind": "similar", "treatment": "baseA", "n": 0}]})
    assert sweep_status(str(tmp_path))["gpu_hours_spent"] == pytest.approx(5.0, abs=0.001)
