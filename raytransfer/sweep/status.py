"""Where a sweep stands, from its job store alone: no Ray, so it works on a laptop against the
cluster's storage (a path or s3://...) while the sweep runs, or after it died.

The driver writes its plan (every job of the grid) when it starts and a heartbeat (the jobs
running, the dashboard) while it runs; each job leaves attempts, then a done or failed record.
From these: jobs done / running / failed / waiting per split kind x treatment, the failures with
their reasons, each base with its dependents, GPU-hours so far and an estimate of what is left.
The records are read through the job store's index (index.py: one file, checked against one listing of
the records), so a store of thousands of jobs answers in about a second, on S3 too.

    raytransfer status s3://bucket/raytransfer            # a table
    raytransfer status /mnt/shared/raytransfer --json     # {"done": .., "running": .., "failed": .., "waiting": .., ...}
"""
from __future__ import annotations

import json
import time
from collections import defaultdict

from analysis.results import input_wait_by_treatment

from .errors import SweepError
from .jobs import is_diagnostic
from .store import ATTEMPTS, JobStore

STALE_S = 120            # the driver beats every 30 s: older than this, it is not running (or cannot write)


def job_hours(record: dict, now: float | None = None, attempts: list | None = None) -> tuple[float, float]:
    """(GPU-hours, hours) of one job over every attempt: the last from its start to its end (or now, while
    it runs), each earlier one (a retry, a resume after a dead driver) until the next began -- when an
    attempt ended is not recorded, so this is an upper bound by the restart's delay. A member of a cohort
    counts its share of the trial's time (`cohort_share`), so a cohort's members add up to its trial. The
    starts come from the record's `attempt_starts`, else from `attempts` (the store's attempts of the job)."""
    start = record.get("started_at") or 0.0
    end = record.get("finished_at") or now or start
    seconds = max(0.0, end - start)
    starts = record.get("attempt_starts") or [a.get("at") for a in attempts or []]
    earlier = sorted(t for t in starts if t and t < start)     # the last attempt began at `start` (or just after)
    for began, next_began in zip(earlier, earlier[1:] + [start]):
        seconds += next_began - began
    hours = seconds / 3600 * float(record.get("cohort_share") or 1.0)    # a cohort member: its share of the trial
    return hours * float(record.get("gpus_held") or 0.0), hours


def sweep_status(storage: str, now: float | None = None, index: bool = True) -> dict:
    """Where the sweep at `storage` stands. With `index` (the default) from the job store's index, checked
    against one listing of the records (index.py): seconds for thousands of jobs, also on S3; the attempts
    of a job are read only where a record lacks their start times or the job runs now. `index=False`
    reads every record and every attempt (the answer is the same)."""
    now = now or time.time()
    store = JobStore(storage)
    plan = store.read_sweep()
    if plan is None:
        raise SweepError(f"{storage} holds no sweep (no jobstore/sweep.json): check the path; a sweep writes it "
                         "when it starts")
    beat = store.read_heartbeat() or {}
    live = bool(beat) and not beat.get("ended") and now - beat.get("at", 0) < STALE_S
    running_keys = set(beat.get("running", [])) if live else set()
    if index:
        summaries = store.summaries()
        done, failed = summaries["jobs"], summaries["failed"]
        need = sorted({k for k, r in {**failed, **done}.items() if not r.get("attempt_starts")}
                      | (running_keys - set(done) - set(failed)))
        attempts = {k: a for k, a in zip(need, store._read_many([f"{store.root}/{ATTEMPTS}/{k}.json" for k in need]))
                    if a is not None}
    else:
        done, failed, attempts = store.completed(), store.failed(), store.all_attempts()
    return _status(storage, plan, done, failed, attempts, beat, live, running_keys, now)


def _status(storage, plan, done, failed, attempts, beat, live, running_keys, now) -> dict:
    done, failed = dict(sorted(done.items())), dict(sorted(failed.items()))    # sums in one order, either source
    jobs = plan["jobs"]
    status_of = {}
    for j in jobs:
        k = j["job_key"]
        status_of[k] = ("done" if k in done else "failed" if k in failed else
                        "running" if k in running_keys else "waiting")
    by_group = defaultdict(lambda: defaultdict(int))
    for j in jobs:
        by_group[f"{j['split_kind']} x {j['treatment']}"][status_of[j["job_key"]]] += 1
    totals = {s: sum(v == s for v in status_of.values()) for s in ("done", "running", "failed", "waiting")}

    spent_gpu = spent_h = 0.0
    per_kind = defaultdict(list)                      # GPU-hours (or hours, on CPU) of done jobs, by kind
    for k, r in {**failed, **done}.items():
        g, h = job_hours(r, attempts=attempts.get(k))
        spent_gpu, spent_h = spent_gpu + g, spent_h + h
        if k in done:
            per_kind[_kind(r.get("config", {}).get("treatment", ""))].append(g or h)
    for k in running_keys - set(done) - set(failed):
        last = (attempts.get(k) or [{}])[-1]
        g, h = job_hours({"started_at": last.get("at"), "gpus_held": plan.get("gpus_per_trial", 0)}, now,
                         attempts=attempts.get(k))
        spent_gpu, spent_h = spent_gpu + g, spent_h + h
    left = 0.0
    everything = [x for xs in per_kind.values() for x in xs]
    for j in jobs:
        if status_of[j["job_key"]] in ("waiting", "running"):
            same = per_kind.get(_kind(j["treatment"])) or everything
            left += sum(same) / len(same) if same else 0.0
    unit = "GPU-hours" if plan.get("gpus_per_trial") else "hours"

    dependents = defaultdict(list)                    # job key -> the jobs that need it (diagnostics too)
    for d in jobs:
        for k in set(d.get("deps") or [d.get("base_job_key")]):
            dependents[k].append(d)
    bases = []
    for j in jobs:
        if j["treatment"] in ("baseA", "baseB"):
            deps = dependents.get(j["job_key"], [])
            bases.append({"job_key": j["job_key"], "status": status_of[j["job_key"]],
                          "dependents": len(deps), "dependents_done": sum(status_of[d["job_key"]] == "done" for d in deps)})
    waits = input_wait_by_treatment(
        {"treatment": r.get("config", {}).get("treatment", ""), **{k: (r.get("metrics") or {}).get(k)
                                                                   for k in ("input", "input_wait_share", "wall_s")}}
        for r in done.values())
    return {
        **totals, "jobs": len(jobs), "experiment": plan.get("experiment"), "storage": storage,
        "input_wait": waits,
        "driver": ({"alive": live, "ended": bool(beat.get("ended")), "last_heartbeat_s_ago": round(now - beat["at"]),
                    "dashboard": beat.get("dashboard")}
                   if beat else {"alive": False, "ended": False, "last_heartbeat_s_ago": None, "dashboard": None}),
        "gpu_hours_spent": round(spent_gpu, 3), "hours_spent": round(spent_h, 3),
        f"{unit.replace('-', '_').lower()}_left_estimate": round(left, 3),
        "estimate_from_jobs": len(everything),
        "by_split_and_treatment": {g: dict(v) for g, v in sorted(by_group.items())},
        "failed_jobs": [{"job_key": k, "reason": r.get("reason")} for k, r in sorted(failed.items()) if k in status_of],
        **restarts({**failed, **done}),
        "bases": bases,
    }


def restarts(records: dict) -> dict:
    """Restarts of the recorded jobs beyond their first attempt: after failures (these spend --max-failures)
    and after preemptions (a node reclaimed: these do not), from each record's attempts and preemptions."""
    pre = sum(int(r.get("preemptions") or 0) for r in records.values())
    after_failures = sum(max(0, int(r.get("attempts") or 1) - 1 - int(r.get("preemptions") or 0))
                         for r in records.values())
    return {"restarts_after_failures": after_failures, "preemptions": pre}


def _kind(treatment: str) -> str:
    if is_diagnostic(treatment):
        return "diagnostic"
    if treatment in ("baseA", "baseB", "scratch", "netbase", "reduced_k") or treatment.endswith("+"):
        return "whole net trained"
    return "frozen prefix"


def format_status(st: dict) -> str:
    drv = st["driver"]
    driver = ("running (heartbeat {}s ago{})".format(drv["last_heartbeat_s_ago"],
                                                    f", dashboard {drv['dashboard']}" if drv["dashboard"] else "")
              if drv["alive"] else f"ended {drv['last_heartbeat_s_ago']} s ago" if drv.get("ended")
              else "not running" + (f" (no heartbeat for {drv['last_heartbeat_s_ago']} s: stopped or killed; "
                                    "rerun the same command with --resume)" if drv["last_heartbeat_s_ago"] is not None else ""))
    left_key = next(k for k in st if k.endswith("_left_estimate"))
    unit = "GPU-hours" if left_key.startswith("gpu") else "hours"
    lines = [f"sweep {st['experiment']} at {st['storage']}: driver {driver}",
             f"{st['jobs']} jobs: {st['done']} done, {st['running']} running, {st['failed']} failed, "
             f"{st['waiting']} waiting; restarts: {st.get('restarts_after_failures', 0)} after failures, "
             f"{st.get('preemptions', 0)} after preemptions",
             f"spent: {st['gpu_hours_spent']:.2f} GPU-hours ({st['hours_spent']:.2f} hours of trials); "
             f"left, estimated from the {st['estimate_from_jobs']} done jobs: {st[left_key]:.2f} {unit}", ""]
    width = max([len(g) for g in st["by_split_and_treatment"]] + [10])
    lines.append(f"{'split x treatment':<{width}}  done  running  failed  waiting")
    for g, c in st["by_split_and_treatment"].items():
        lines.append(f"{g:<{width}}  {c.get('done', 0):>4}  {c.get('running', 0):>7}  {c.get('failed', 0):>6}  "
                     f"{c.get('waiting', 0):>7}")
    lines += ["", "bases:"] + [f"  {b['job_key']}: {b['status']}; dependents done {b['dependents_done']}/"
                               f"{b['dependents']}" for b in st["bases"]]
    if st.get("input_wait"):
        lines += ["", "share of training time waiting on input (done jobs, weighed by wall time):"]
        lines += [f"  {w['treatment']:<14} {w['input']:<12} {100 * w['input_wait_share']:5.1f} %  "
                  f"({w['networks']} jobs)" for w in st["input_wait"]]
    if st["failed_jobs"]:
        lines += ["", "failed:"] + [f"  {f['job_key']}: {f['reason']}" for f in st["failed_jobs"]]
    return "\n".join(lines)


def add_status_args(p):
    p.add_argument("storage", help="the sweep's --storage (a path or s3://...)")
    p.add_argument("--json", action="store_true", help="one JSON object: totals at the top, then the breakdowns")


STATUS_WAIT_S = 30        # a storage that does not answer: said so after this long, not after a sweep's patience


def run_status(args) -> int:
    from .storage import patience, unavailable

    try:
        with patience(STATUS_WAIT_S) as waited:
            st = sweep_status(args.storage)
    except Exception:
        if unavailable(args.storage):
            raise SweepError(f"{args.storage} does not answer (waited {waited:.0f} s): check the network, "
                             "AWS_ENDPOINT_URL and the credentials, then ask again") from None
        raise
    print(json.dumps(st, indent=2) if args.json else format_status(st))
    return 0
