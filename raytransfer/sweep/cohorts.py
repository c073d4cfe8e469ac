"""Which jobs train together: a cohort is the jobs ready now that read one batch stream.

Every net that reads one target half with one recipe, training seed and input -- the base, its selffers and
transfers, frozen and fine-tuned, the controls -- can learn from one stream (raytransfer/cohort.py,
loop.fit_cohort): one trial, one decode of each batch, one forward pass of each shared frozen trunk. The
searcher (searcher.py) hands out cohorts, not jobs: the first ready job in the grid's order and every other
ready job of its stream, up to --cohort-size. Membership follows the job graph -- a transfer is ready once its
base is done -- so the bases of a half train beside that half's controls, and its transfers beside each
other once their bases are done. A cohort is how jobs run, not what they are: their keys do not change.

Where trial slots would otherwise idle (fewer ready streams than free slots), a stream's ready jobs are split
over the free slots instead of filling one trial. Members are ordered so that those copying one base sit
together (they share its frozen layers; a trial that keeps only the members that fit its memory keeps them
together). Diagnostics read finished nets and train nothing: each is a cohort of one.

    groups = pick_cohort(ready_keys_by_stream, first_key, free_slots, cap)
"""
from __future__ import annotations

import math

from ..cohort import stream_key
from .jobs import is_diagnostic


def job_stream(config: dict) -> str:
    """A job's cohort identity: its batch stream; a diagnostic its own key (never grouped)."""
    if is_diagnostic(config["treatment"]):
        return f"diagnostic:{config['job_key']}"
    return stream_key(config["spec"])


def cohort_size(ready: int, ready_streams: int, free_slots: int | None, cap: int | None) -> int:
    """How many of a stream's `ready` jobs one trial takes: all of them, at most `cap`; fewer where slots would
    idle -- `free_slots` (None: unknown, an autoscaling cluster) shared by the `ready_streams`."""
    size = ready if not cap else min(ready, cap)
    if free_slots and free_slots > ready_streams:
        pieces = min(ready, free_slots // max(1, ready_streams))
        size = min(size, math.ceil(ready / pieces))
    return max(1, size)


def member_order(config: dict) -> tuple:
    """Order of a cohort's members: nets trained from scratch (bases, controls) first, then those copying one
    base together, by n."""
    base = next(iter(config.get("base_uris") or config.get("deps") or []), "")
    return (base, config["treatment"], config["n"])


def cohort_name(configs: list[dict]) -> str:
    """A cohort as the dashboard names its trial: its jobs' key (one job), or the stream and its members
    ("similar0-B-s0-demo: baseB, scratch, random_frozen n1,3,5,7")."""
    if len(configs) == 1:
        return configs[0]["job_key"]
    first = configs[0]
    parts, seen = [], {}
    for c in configs:
        seen.setdefault(c["treatment"], []).append(c["n"])
    for treatment, ns in seen.items():
        ns = [n for n in ns if n]
        parts.append(treatment + (f" n{','.join(str(n) for n in ns)}" if ns else ""))
    stream = f"{first['split']}-{first['target']}-s{first['spec']['seed']}-{first['spec']['recipe']['name']}"
    return f"{stream} x{len(configs)}: {'; '.join(parts)}"
