"""The sweep: the dependency searcher alone (no Ray), then real smoke sweeps on a local Ray.

Proves: no transfer is released before its base; FINISHED at the end (and when a base failed, with
the reason, never a hang); state survives save/restore; a sweep trains each base exactly once and
starts each transfer after its base finished; the same command again trains nothing; an extended
grid trains only the new jobs; a driver killed mid-sweep and rerun with --resume finishes with no
base retrained.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
from ray.tune.search import Searcher

from conftest import tiny_jobs

from raytransfer.recipes import get_recipe
from raytransfer.sweep.searcher import DependencySearcher

ROOT = Path(__file__).resolve().parents[1]
SWEEP = [sys.executable, str(ROOT / "sweeps" / "full_paper.py")]




# ---------------------------------------------------------------------------------------------
# The searcher alone

def test_searcher_releases_no_transfer_before_its_base_and_finishes():
    jobs = tiny_jobs()
    by_key = {j.key: j for j in jobs}
    s = DependencySearcher(jobs)
    issued = []
    while True:
        cfg = s.suggest(f"t{len(issued)}")
        if cfg is None:
            break
        issued.append(cfg["job_key"])
    # only jobs without dependencies come out while no base is done
    assert issued and all(not by_key[k].deps for k in issued)
    assert {by_key[k].treatment for k in issued} == {"baseA", "baseB", "random_frozen"}
    assert s.suggest("again") is None                      # waiting for bases, not finished
    for i, k in enumerate(issued):                         # bases (and controls) finish
        s.on_trial_complete(f"t{i}", {"weights_uri": f"/w/{k}", "config/job_key": k})
    rest = []
    while (cfg := s.suggest(f"u{len(rest)}")) not in (None, Searcher.FINISHED):
        base = by_key[cfg["job_key"]].base_key
        assert base in s.done and cfg["base_uris"] == {base: f"/w/{base}"}
        rest.append(cfg["job_key"])
    assert len(issued) + len(rest) == len(jobs)
    assert s.suggest("x") == Searcher.FINISHED             # all handed out: Tune lets the running ones finish
    for i, k in enumerate(rest):
        s.on_trial_complete(f"u{i}", {"weights_uri": f"/w/{k}"})
    assert s.suggest("end") == Searcher.FINISHED and len(s.done) == len(jobs)


def test_searcher_finishes_with_a_reason_when_a_base_fails():
    jobs = tiny_jobs(ns=(1,), treatments=("AnB",))
    s = DependencySearcher(jobs)
    first = [s.suggest("a")["job_key"], s.suggest("b")["job_key"]]   # baseA, baseB
    s.on_trial_complete("a", None, error=True)
    s.on_trial_complete("b", {"weights_uri": "/w/b"})
    assert s.suggest("c") == Searcher.FINISHED             # AnB needs baseA: never runs, no hang
    assert first[0] in s.blocked_reason and "cannot run" in s.blocked_reason


def test_searcher_given_transfers_without_their_bases():
    """A sweep of transfers alone (their bases left out, e.g. bases first, then the rest): bases
    finished in the store release them; bases that are nowhere end the sweep with the reason."""
    jobs = tiny_jobs(ns=(1,), treatments=("AnB", "BnB"))
    bases = [j for j in jobs if j.treatment in ("baseA", "baseB")]
    transfers = [j for j in jobs if j not in bases]
    s = DependencySearcher(transfers, done={b.key: f"/w/{b.key}" for b in bases})
    released = [s.suggest(f"t{i}") for i in range(len(transfers))]
    assert {c["job_key"] for c in released} == {t.key for t in transfers}
    assert s.suggest("again") == Searcher.FINISHED and s.blocked_reason is None

    s = DependencySearcher(transfers)                                  # bases neither here nor done
    assert s.suggest("t0") == Searcher.FINISHED                        # at once: nothing can ever run
    assert "not a job of this sweep and not in the job store" in s.blocked_reason


def test_searcher_state_survives_save_and_restore(tmp_path):
    jobs = tiny_jobs()
    s = DependencySearcher(jobs)
    a = s.suggest("t0")
    s.on_trial_complete("t0", {"weights_uri": "/w/a"})
    s.save(str(tmp_path / "state.pkl"))
    restored = DependencySearcher(jobs)
    restored.restore(str(tmp_path / "state.pkl"))
    assert restored.done == {a["job_key"]: "/w/a"} and restored.issued == s.issued
    assert restored.suggest("t1")["job_key"] == s.suggest("t1")["job_key"]


def test_searcher_seeded_from_the_job_store_skips_finished_jobs():
    jobs = tiny_jobs()
    done = {j.key: f"/w/{j.key}" for j in jobs if j.treatment in ("baseA", "baseB")}
    s = DependencySearcher(jobs, done=done)
    keys = []
    while (cfg := s.suggest(str(len(keys)))) not in (None, Searcher.FINISHED):
        keys.append(cfg["job_key"])
    assert not set(keys) & set(done) and len(keys) == len(jobs) - len(done)


def release_all(s, prefix="t"):
    """Every config the searcher hands out now, by trial id."""
    out = {}
    while (cfg := s.suggest(f"{prefix}{len(out)}")) not in (None, Searcher.FINISHED):
        out[f"{prefix}{len(out)}"] = cfg
    return out


def done(s, trial, cfg, failed=()):
    outcomes = {j["job_key"]: ({"failure_reason": "frozen layers changed"} if j["job_key"] in failed
                               else {"weights_uri": f"/w/{j['job_key']}"}) for j in cfg["jobs"]}
    s.on_trial_complete(trial, {"outcomes": json.dumps(outcomes)})


def test_searcher_releases_cohorts_of_one_stream_and_each_transfer_after_its_base():
    """Unlimited cohorts: the jobs ready at once on half B (base B and the random-frozen controls) are one
    trial, base A another; once both bases are done the transfers onto B are one cohort, those copying one base
    side by side. Members fail or finish one by one."""
    jobs = tiny_jobs(ns=(1, 2, 3))
    by_key = {j.key: j for j in jobs}
    s = DependencySearcher(jobs, cohort_size=None)
    first = release_all(s)
    members = {t: [j["job_key"] for j in cfg["jobs"]] for t, cfg in first.items()}
    assert sorted(len(m) for m in members.values()) == [1, 4]           # base A | base B + 3 random frozen
    b = next(t for t, m in members.items() if len(m) == 4)
    assert [by_key[k].treatment for k in members[b]] == ["baseB", "random_frozen", "random_frozen", "random_frozen"]
    assert first[b]["cohort"].endswith("x4: baseB; random_frozen n1,2,3")
    assert s.suggest("wait") is None
    for t, cfg in first.items():
        done(s, t, cfg, failed=[members[b][-1]])                       # one control fails, alone
    assert len(s.failed) == 1 and len(s.done) == 4
    rest = release_all(s, "u")
    assert len(rest) == 1
    (cfg,) = rest.values()
    keys = [j["job_key"] for j in cfg["jobs"]]
    assert sorted(keys) == sorted(k for k, j in by_key.items() if j.treatment in ("AnB", "BnB"))
    assert [by_key[k].base_key for k in keys] == sorted(by_key[k].base_key for k in keys)   # one base's side by side
    assert all(j["base_uris"] == {by_key[j["job_key"]].base_key: f"/w/{by_key[j['job_key']].base_key}"}
               for j in cfg["jobs"])
    done(s, "u0", cfg)
    assert s.suggest("end") == Searcher.FINISHED and len(s.done) == len(jobs) - 1


def test_cohort_size_caps_a_cohort_and_free_slots_split_one():
    jobs = tiny_jobs(ns=(1, 2, 3))
    capped = DependencySearcher(jobs, cohort_size=2)
    assert sorted(len(c["jobs"]) for c in release_all(capped).values()) == [1, 2, 2]
    alone = DependencySearcher(jobs, cohort_size=1)
    assert all(len(c["jobs"]) == 1 for c in release_all(alone).values())
    # three slots: base A's trial, and the 4 ready jobs of half B over the two slots left
    spread = DependencySearcher(jobs, cohort_size=None, slots=3)
    assert sorted(len(c["jobs"]) for c in release_all(spread).values()) == [1, 2, 2]
    wide = DependencySearcher(jobs, cohort_size=None, slots=8)      # slots to spare: one job a trial
    assert sorted(len(c["jobs"]) for c in release_all(wide).values()) == [1, 1, 1, 1, 1]


def test_members_handed_back_are_released_again_and_never_twice():
    """A trial keeps the members that fit its memory and hands the rest back (a report's `deferred`): they are
    ready again for another trial; a hand-back from a trial that no longer owns a job changes nothing."""
    jobs = tiny_jobs(ns=(1, 2, 3))
    s = DependencySearcher(jobs, cohort_size=None)
    first = release_all(s)
    t, cfg = next((t, c) for t, c in first.items() if len(c["jobs"]) == 4)
    back = [j["job_key"] for j in cfg["jobs"][2:]]
    s.on_trial_result(t, {"deferred": json.dumps(back)})
    again = s.suggest("v0")
    assert [j["job_key"] for j in again["jobs"]] == back
    s.on_trial_result(t, {"deferred": json.dumps(back)})            # not its jobs any more
    assert s.suggest("v1") is None and all(s.issued[k] == "v0" for k in back)
    done(s, t, {"jobs": cfg["jobs"][:2]})
    s.on_trial_complete(t, None)                                     # completes once; nothing left to it
    assert all(j["job_key"] in s.done for j in cfg["jobs"][:2]) and not set(back) & set(s.failed)


# ---------------------------------------------------------------------------------------------
# Real sweeps on a local Ray (2 CPUs), smoke scale, a small grid

def test_job_store_writes_into_a_fresh_storage_folder(tmp_path):
    """A record written where no folder exists yet (nobody ran check_writable) lands and reads back:
    a finished trial must never fail on its last step."""
    from raytransfer.sweep.store import JobStore, load_weights
    import torch

    store = JobStore(str(tmp_path / "fresh"))
    uri = store.save_weights("k", {"w": torch.ones(2)})
    store.write("k", {"metrics": {"top1_final": 0.5}, "weights_uri": uri})
    again = JobStore(str(tmp_path / "fresh"))
    assert again.read("k")["metrics"] == {"top1_final": 0.5} and set(again.completed()) == {"k"}
    assert torch.equal(load_weights(uri)["w"], torch.ones(2))


def test_progress_line_counts_running_trials_and_estimates_what_is_left(capsys):
    """The console line: a trial that just completed is not counted as running (Tune still says
    RUNNING in that callback); the ETA is the jobs left x the mean trial length / concurrency."""
    from types import SimpleNamespace

    from raytransfer.sweep.monitor import SweepProgress

    def trial(key, seconds):
        return SimpleNamespace(status="RUNNING", config={"job_key": key}, last_result={
            "time_total_s": seconds, "outcomes": json.dumps({key: {"weights_uri": "/w"}})})

    progress = SweepProgress(total=5, done=1, concurrency=2)
    trials = [trial("a", 60.0), trial("b", 60.0)]
    progress.on_trial_complete(0, trials, trials[0])
    assert capsys.readouterr().out.strip() == "[sweep] 2/5 jobs done, 1 running, 0 failed, ETA 0:01:30"
    trials[0].status = "TERMINATED"
    trials[1] = trial("b", 120.0)
    progress.on_trial_complete(0, trials, trials[1])
    assert capsys.readouterr().out.strip() == "[sweep] 3/5 jobs done, 0 running, 0 failed, ETA 0:01:30"


@pytest.fixture(scope="module")
def sweep_env():
    cache = tempfile.mkdtemp(prefix="rtc", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAYTRANSFER_CACHE": cache,
           "RAYTRANSFER_RAY_TMP": tempfile.mkdtemp(prefix="rt", dir="/tmp")}
    env.pop("RAY_ADDRESS", None)
    return env


GRID_FLAGS = ["--scale", "smoke", "--splits", "similar", "--treatments", "AnB,BnB", "--no-dashboard",
              "--num-cpus", "2", "--no-report"]


def run_sweep(env, out, *flags, timeout=600):
    p = subprocess.run(SWEEP + GRID_FLAGS + ["--out", str(out), *flags], env=env, capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def records(out) -> dict:
    return {f.stem: json.loads(f.read_text()) for f in (Path(out) / "jobstore" / "jobs").glob("*.json")}


def trial_dirs(out) -> list[str]:
    return [d.name for d in Path(out).glob("tune-*/*") if d.is_dir()]


FFCV = ("--set", "input=ffcv")           # the input where no pixel store can be written: FFCV decodes each step


def test_sweep_trains_bases_once_transfers_after_them_and_reruns_nothing(sweep_env, tmp_path):
    """Through FFCV (the smoke recipe reads the pixel store; this sweep covers the fallback end to end)."""
    out = tmp_path / "exp"
    run_sweep(sweep_env, out, "--n", "1,2", *FFCV)
    recs = records(out)
    table = pd.read_csv(out / "results.csv")
    assert len(table) == len(recs) == 6 and table.job_key.is_unique          # 2 bases + AnB/BnB x n=1,2
    assert set(table.input) == {"ffcv"}
    assert set(table.treatment) == {"baseA", "baseB", "AnB", "BnB"} and (table.status == "done").all()
    bases = table[table.treatment.isin(["baseA", "baseB"])]
    for key in bases.job_key:                                                 # each base trained exactly once
        assert recs[key]["attempts"] == 1
    assert not trial_dirs(out)                                                # done: their trial folders are gone
    for _, row in table[table.base_job_key.notna()].iterrows():                # transfers start after their base
        assert recs[row.job_key]["started_at"] >= recs[row.base_job_key]["finished_at"]
        assert row.frozen_check == True                                        # noqa: E712 (frozen copies intact)
    before = {k: r["recorded_at"] for k, r in recs.items()}

    stdout = run_sweep(sweep_env, out, "--n", "1,2", *FFCV)                    # same command: nothing to train
    assert "6 jobs, 6 done, 0 to run" in stdout
    assert {k: r["recorded_at"] for k, r in records(out).items()} == before
    pd.testing.assert_frame_equal(pd.read_csv(out / "results.csv"), table)

    dry = run_sweep(sweep_env, out, "--n", "1,2,3", "--dry-run", *FFCV)        # extended grid: only n=3 new
    assert "8 jobs, 6 done, 2 to run" in dry
    run_sweep(sweep_env, out, "--n", "1,2,3", *FFCV)
    after = records(out)
    assert len(after) == 8
    assert {k: after[k]["recorded_at"] for k in before} == before             # nothing old retrained
    assert sorted(after[k]["config"]["n"] for k in set(after) - set(before)) == [3, 3]


def test_sweep_under_ray_train_host(sweep_env, tmp_path):
    """The cluster path: every job as a Ray Train TorchTrainer run (what GPU or multi-worker trials
    use), here on CPU with one worker: all rows done, the transfer after its base and with the
    base's frozen layers intact."""
    out = tmp_path / "exp"
    run_sweep(sweep_env, out, "--n", "1", "--treatments", "AnB", "--host", "train")
    recs = records(out)
    table = pd.read_csv(out / "results.csv")
    assert len(table) == len(recs) == 3 and (table.status == "done").all()
    assert {r["host"] for r in recs.values()} == {"train"}
    (anb,) = table[table.treatment == "AnB"].itertuples()
    assert recs[anb.job_key]["started_at"] >= recs[anb.base_job_key]["finished_at"]
    assert anb.frozen_check == True and anb.top1_final > 0               # noqa: E712
    assert recs[anb.job_key]["metrics"]["epochs"] == get_recipe("smoke").epochs


def test_driver_killed_mid_sweep_resumes_without_retraining_a_base(sweep_env, tmp_path):
    out = tmp_path / "exp"
    cmd = SWEEP + GRID_FLAGS + ["--out", str(out), "--n", "1,2,3"]
    proc = subprocess.Popen(cmd, env=sweep_env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 400
    while time.time() < deadline:                         # wait until the bases are done, transfers not all
        recs = records(out) if (out / "jobstore" / "jobs").exists() else {}
        if sum(r["config"]["treatment"].startswith("base") for r in recs.values()) == 2 and len(recs) < 8:
            break
        assert proc.poll() is None, "the sweep ended before it could be interrupted"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)                   # the driver and the local Ray it started
    proc.wait()
    base_recs = {k: r["recorded_at"] for k, r in records(out).items() if r["config"]["treatment"].startswith("base")}
    assert len(base_recs) == 2
    run_sweep(sweep_env, out, "--n", "1,2,3", "--resume")
    final = records(out)
    assert len(final) == 8 and len(pd.read_csv(out / "results.csv")) == 8
    assert {k: final[k]["recorded_at"] for k in base_recs} == base_recs        # no base retrained


def test_resume_over_a_torn_tune_snapshot_starts_the_rest_afresh(sweep_env, tmp_path):
    """A driver killed while Tune copied its snapshot leaves 0-byte state files (seen in CI); restoring
    from them handed out a job without the sweep's settings. --resume says so and runs what is left."""
    out = tmp_path / "exp"
    run_sweep(sweep_env, out, "--n", "1")
    (exp,) = out.glob("tune-*")
    for pattern in ("experiment_state-*.json", "searcher-state-*.pkl"):
        max(exp.glob(pattern)).write_bytes(b"")                  # what the kill left
    before = records(out)
    bases = {k: r["recorded_at"] for k, r in before.items() if r["config"]["treatment"].startswith("base")}
    for key in set(before) - set(bases):
        (out / "jobstore" / "jobs" / f"{key}.json").unlink()     # the transfers had not finished
    stdout = run_sweep(sweep_env, out, "--n", "1", "--resume")
    assert "snapshot is torn" in stdout and "4 jobs, 2 done, 2 to run" in stdout
    after = records(out)
    assert len(after) == 4 and {k: after[k]["recorded_at"] for k in bases} == bases
    assert len(pd.read_csv(out / "results.csv")) == 4


def test_bad_grid_input_is_one_clear_error_before_training(sweep_env, tmp_path, capsys, monkeypatch):
    import runpy

    from raytransfer.sweep.runner import main

    for k in ("RAYTRANSFER_CACHE", "RAY_AUTH_MODE"):
        monkeypatch.setenv(k, sweep_env[k])
    grid = runpy.run_path(str(ROOT / "sweeps" / "full_paper.py"))["GRID"]
    for flags, message in [(["--scale", "huge"], "unknown scale 'huge'"),
                           (["--treatments", "AnB++"], "unknown treatment 'AnB++'"),
                           (["--n", "0,8"], "outside 1..7"),
                           (["--splits", "similar,odd"], "unknown split kind 'odd'"),
                           (["--data", str(tmp_path / "nowhere")], "does not exist"),
                           (["--scale", "paper"], "give --data"),
                           (["--storage", "/proc/forbidden"], "is not writable"),
                           (["--scale", "smoke", "--resume"], "no interrupted sweep")]:
        rc = main(grid, ["--out", str(tmp_path / "x"), *flags], name="full_paper")
        err = capsys.readouterr().err
        assert rc == 2 and message in err, (flags, err)
        assert err.strip().count("error:") == 1
    assert not list((tmp_path / "x").glob("jobstore/jobs/*.json"))
