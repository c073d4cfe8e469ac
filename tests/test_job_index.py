"""The job store's index (raytransfer/sweep/index.py) at a few hundred jobs, on the local disk and on a local
S3 server: `raytransfer status` from the index answers as from the records, the index is rebuilt when missing,
damaged or stale (a record written, changed or removed after it), the driver keeps it, and the searcher's
idle asks cost nothing. The 5,000-job numbers are benchmarks/job_store_scale.py's."""
from __future__ import annotations

import gzip
import json
import random
import shutil
import tempfile
import time

import pyarrow.fs
import pytest

from raytransfer.sweep import index
from raytransfer.sweep.status import sweep_status
from raytransfer.sweep.store import JobStore

N_BASES, N_TRANSFERS = 20, 280                      # 300 jobs


def plan_rows() -> list[dict]:
    bases = [{"job_key": f"similar{i // 2}-base{'AB'[i % 2]}-s0", "split_kind": "similar",
              "treatment": f"base{'AB'[i % 2]}", "n": 0, "base_job_key": "", "deps": []} for i in range(N_BASES)]
    transfers = []
    for i in range(N_TRANSFERS):
        base = bases[i % N_BASES]["job_key"]
        t = ("AnB", "BnB", "AnB+", "BnB+")[i % 4]
        transfers.append({"job_key": f"t{i:03d}-{t}-n{i % 7 + 1}", "split_kind": ("similar", "dissimilar")[i % 2],
                          "treatment": t, "n": i % 7 + 1, "base_job_key": base, "deps": [base]})
    return bases + transfers


def record(row: dict, rng: random.Random) -> dict:
    """A done record in record_outcome's shape (a short epoch log; the class list and recipe of a spec)."""
    start = time.time() - rng.uniform(100, 10000)
    log = [{"epoch": e, "val_top1": rng.random(), "train_s": 1.0, "input_wait_s": 0.01} for e in range(5)]
    return {"config": {"job_key": row["job_key"], "treatment": row["treatment"], "n": row["n"], "seed": 0,
                       "target_classes": [f"c{i}" for i in range(50)], "recipe": {"name": "smoke", "lr": 0.05}},
            "host": "process", "node_id": "n0", "gpus_held": 1.0, "attempts": 1, "started_at": start,
            "finished_at": start + rng.uniform(10, 100),
            "metrics": {"top1_final": rng.random(), "epoch_log": log, "input": "memory", "wall_s": 50.0,
                        "input_wait_share": rng.random() * 0.1, "frozen_mismatched": []},
            "weights_uri": f"/w/{row['job_key']}", "versions": {"torch": "2.14"}}


def fill(storage: str, done_share: float = 0.8) -> tuple[JobStore, list[dict]]:
    """A store of 300 planned jobs: most done, a few failed, 5 running (a live heartbeat), the rest waiting.
    On S3 it is written on the local disk, then uploaded in parallel (one PUT a file: the store's own
    writes cost a dozen requests each, minutes of a loaded moto server)."""
    if storage.startswith("s3://"):
        local = tempfile.mkdtemp(prefix="rtidx-")
        try:
            source, _ = fill(local, done_share)
            store = JobStore(storage)
            pyarrow.fs.copy_files(source.root, store.root, source_filesystem=source.fs,
                                  destination_filesystem=store.fs, use_threads=True)
            return store, plan_rows()
        finally:
            shutil.rmtree(local, ignore_errors=True)
    store, rng, rows = JobStore(storage), random.Random(0), plan_rows()
    store.write_sweep({"experiment": "tune-idx", "gpus_per_trial": 1.0, "jobs": rows})
    n_done = int(len(rows) * done_share)
    for i, row in enumerate(rows[:n_done + 5]):
        store.count_attempt(row["job_key"], {"host": "process"})
        if i >= n_done:
            continue                                 # running: an attempt, no record yet
        if i % 40 == 39:
            store.write_failed(row["job_key"], {**record(row, rng), "reason": f"injected {i}"})
        else:
            store.write(row["job_key"], record(row, rng))
    store.write_heartbeat({"running": [r["job_key"] for r in rows[n_done:n_done + 5]], "dashboard": ""})
    return store, rows


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path, monkeypatch):
    if request.param == "local":
        yield str(tmp_path / "store")
        return
    from s3server import s3_server

    with s3_server(monkeypatch) as s3:
        s3.create_bucket("rt-index")
        yield "s3://rt-index/rt"


def test_status_from_the_index_equals_status_from_the_records_missing_fresh_and_stale(storage):
    store, rows = fill(storage)
    now = time.time()
    truth = sweep_status(storage, now, index=False)         # every record and every attempt read
    assert truth["done"] == 234 and truth["failed"] == 6 and truth["running"] == 5 and truth["jobs"] == 300
    assert sweep_status(storage, now) == truth               # no index yet: rebuilt from the records, written
    _, stats = index.refresh(store, write=False)
    assert stats == {"index": "fresh", "listed": 240, "read": 0, "dropped": 0}
    assert sweep_status(storage, now) == truth               # from the index alone

    rng = random.Random(1)
    new, changed, gone = rows[-1], rows[3], rows[4]
    store.write(new["job_key"], record(new, rng))                                  # written after the index
    store.write(changed["job_key"], {**record(changed, rng), "zone": "us-east-1a"})  # rewritten (and a new field)
    store.forget(gone["job_key"])                                                  # removed
    summaries, stats = index.refresh(store, write=False)
    assert stats["index"] == "stale" and stats["read"] == 2 and stats["dropped"] == 1
    assert gone["job_key"] not in summaries["jobs"] and new["job_key"] in summaries["jobs"]
    assert summaries["jobs"][changed["job_key"]]["zone"] == "us-east-1a"           # a field no list names
    now = time.time()
    assert sweep_status(storage, now) == sweep_status(storage, now, index=False)
    assert index.refresh(store, write=False)[1]["read"] == 0                       # status wrote it back


def test_a_damaged_index_is_rebuilt_from_the_records(tmp_path, caplog):
    storage = str(tmp_path)
    store, _ = fill(storage)
    now = time.time()
    truth = sweep_status(storage, now, index=False)
    (tmp_path / "jobstore" / index.INDEX).write_bytes(gzip.compress(b'{"version": 1, "fol'))
    with caplog.at_level("WARNING", logger="raytransfer.sweep"):
        assert sweep_status(storage, now) == truth
    assert any("index" in r.getMessage() and "rebuilt" in r.getMessage() for r in caplog.records)
    assert index.refresh(store, write=False)[1]["index"] == "fresh"


def test_the_index_holds_summaries_not_bulk(tmp_path):
    store, rows = fill(str(tmp_path))
    index.refresh(store)
    data = json.loads(gzip.decompress((tmp_path / "jobstore" / index.INDEX).read_bytes()))
    entry = data["folders"]["jobs"][rows[0]["job_key"]]["summary"]
    assert entry["config"] == {"job_key": rows[0]["job_key"], "treatment": "baseA", "n": 0, "seed": 0}
    assert "epoch_log" not in entry["metrics"] and entry["metrics"]["wall_s"] == 50.0
    assert entry["attempt_starts"] and entry["weights_uri"] == f"/w/{rows[0]['job_key']}"
    assert set(data["folders"]["failed"]) == {r["job_key"] for i, r in enumerate(rows[:240]) if i % 40 == 39}


def test_the_driver_keeps_the_index_as_records_land(tmp_path):
    from raytransfer.sweep.storage_watch import JobIndexKeeper

    store, rows = fill(str(tmp_path))
    keeper = JobIndexKeeper(str(tmp_path), every_s=3600)
    keeper.on_trial_complete(0, [], None)
    keeper.on_step_end(0, [])                                # the first refresh: nothing written before
    assert index.refresh(store, write=False)[1]["index"] == "fresh"
    store.write(rows[-1]["job_key"], record(rows[-1], random.Random(2)))
    keeper.on_trial_complete(0, [], None)
    keeper.on_step_end(0, [])                                # within every_s: not yet
    assert index.refresh(store, write=False)[1]["index"] == "stale"
    keeper.on_experiment_end([])                             # the sweep's end: always
    assert index.refresh(store, write=False)[1]["index"] == "fresh"


class Job:
    def __init__(self, key, deps=()):
        self.key, self.deps, self.treatment, self.n = key, tuple(deps), "AnB" if deps else "baseA", 1
        self.split_kind, self.split_seed, self.target_half, self.spec = "similar", 0, "B", {}


def test_the_searcher_asks_nothing_of_the_grid_while_bases_train(monkeypatch):
    """Tune asks about ten times a second while the bases train: those asks must not walk the grid."""
    from raytransfer.sweep.searcher import DependencySearcher

    jobs = [Job(f"b{i}") for i in range(20)] + [Job(f"t{i}", [f"b{i % 20}"]) for i in range(280)]
    s = DependencySearcher(jobs)
    assert [s.suggest(str(i))["job_key"] for i in range(20)] == [f"b{i}" for i in range(20)]
    assert s.suggest("x") is None
    calls = []
    real = DependencySearcher._dead
    monkeypatch.setattr(DependencySearcher, "_dead", lambda self, k: calls.append(k) or real(self, k))
    for _ in range(100):
        assert s.suggest("x") is None
    assert calls == []
    s.on_trial_complete("3", {"weights_uri": "/w/b3"})       # b3 done: its 14 transfers, in the grid's order
    assert [s.suggest(f"u{i}")["job_key"] for i in range(14)] == [f"t{i}" for i in range(3, 280, 20)]
    s.on_trial_complete("4", error=True)                     # b4 failed: its transfers can never run
    for i in (0, 1, 2, *range(5, 20)):
        s.on_trial_complete(str(i), {"weights_uri": f"/w/b{i}"})
    while (cfg := s.suggest("v")) not in (None, "FINISHED"):
        s.on_trial_complete("v", {"weights_uri": "/w/" + cfg["job_key"]})
    assert cfg == "FINISHED" and "14 job(s) cannot run" in s.blocked_reason and "b4 (error)" in s.blocked_reason
