"""The job store's index: one file (jobstore/index.json.gz) with a summary of every done and failed
record, so `raytransfer status` and the driver read one object instead of one per job.

The records stay the truth; the index is a cache that is checked against them on every use. Each entry
carries the (mtime, size) its record file had in the listing it was read from; a refresh lists the
folders (on S3 one call per 1,000 keys), keeps the entries whose file is unchanged, reads only the
records that are new or changed (in parallel), and drops the entries whose file is gone. So the index
can be missing, stale or written by an older sweep: the answer is the same as from the records, at the
cost of reading what changed. The driver rewrites it as records land (rate-limited, atomically); status
rewrites it when it had to read records. (S3 lists times to the second: a record rewritten within a second
at the same size would go unseen; a job's record is written once, a retrain comes minutes later.)

A summary is a record without its bulk, chosen generically (so a field a later change adds to the
records, e.g. a preemption count, is in the index without touching this file): every scalar field, the
scalar members of each dict field (config: treatment, n, ...; metrics: top1_final, wall_s, ...), and
lists of at most MAX_LIST scalars (attempt_starts). Left out: the per-epoch log, class lists, the recipe,
a diagnostic's rows.

    summaries, stats = refresh(store)        # {"jobs": {key: summary}, "failed": {...}}, what was read
"""
from __future__ import annotations

import gzip
import json
import logging
import time

INDEX = "index.json.gz"
VERSION = 1
MAX_LIST = 64
FOLDERS = ("jobs", "failed")        # store.RECORDS, store.FAILED

log = logging.getLogger("raytransfer.sweep")


def _scalar(v) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def summarize(record: dict) -> dict:
    """The part of a record status and the driver need, chosen by shape, not by name (see the module doc)."""
    out = {}
    for k, v in record.items():
        if _scalar(v):
            out[k] = v
        elif isinstance(v, dict):
            out[k] = {a: b for a, b in v.items() if _scalar(b)}
        elif isinstance(v, list) and len(v) <= MAX_LIST and all(_scalar(x) for x in v):
            out[k] = v
    return out


def read_index(store) -> dict:
    """The index as last written, {} when missing or unreadable (it is a cache: never an error)."""
    path = f"{store.root}/{INDEX}"
    try:
        with store.fs.open_input_stream(path, compression=None) as f:     # not pyarrow's own detection by suffix
            data = f.read()
        index = json.loads(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data)   # a layer may inflate it
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, EOFError) as e:
        log.warning("job store index %s unreadable (%s: %s): rebuilt from the records", path, type(e).__name__, e)
        return {}
    return index if index.get("version") == VERSION else {}


def write_index(store, folders: dict):
    """Write the index atomically: {folder: {key: {"stamp": [mtime_ns, size], "summary": {...}}}}."""
    data = gzip.compress(json.dumps({"version": VERSION, "written_at": time.time(), "folders": folders}).encode(),
                         compresslevel=5)
    store.fs.create_dir(store.root, recursive=True)
    store._atomic_write(f"{store.root}/{INDEX}", data)


def refresh(store, write: bool = True) -> tuple[dict, dict]:
    """({"jobs": {key: summary}, "failed": {key: summary}}, stats): the index checked against one listing of
    each folder, the new or changed records read and summarised; written back when it changed and `write`.
    A record that cannot be read raises StoreReadError, as reading it directly would."""
    index = read_index(store)
    held = index.get("folders", {})
    folders, stats = {}, {"index": "fresh" if index else "missing", "listed": 0, "read": 0, "dropped": 0}
    for folder in FOLDERS:
        listing = store._list(folder)                      # key -> [mtime_ns, size]
        old = held.get(folder, {})
        keep = {k: e for k, e in old.items() if k in listing and e.get("stamp") == listing[k]}
        todo = [k for k in listing if k not in keep]
        summaries = store._read_many([f"{store.root}/{folder}/{k}.json" for k in todo], then=summarize)
        for k, summary in zip(todo, summaries):
            if summary is not None:                        # gone between the listing and the read: not a record
                keep[k] = {"stamp": listing[k], "summary": summary}
        stats["listed"] += len(listing)
        stats["read"] += len(todo)
        stats["dropped"] += len(set(old) - set(listing))
        folders[folder] = keep
    if index and (stats["read"] or stats["dropped"]):
        stats["index"] = "stale"
    if write and stats["index"] != "fresh" and (index or stats["listed"]):   # an empty store stays empty
        try:
            write_index(store, folders)
        except OSError as e:                               # read-only credentials, a hiccup: the answer stands
            log.warning("job store index not written (%s: %s); status reads the records instead", type(e).__name__, e)
    return {f: {k: e["summary"] for k, e in entries.items()} for f, entries in folders.items()}, stats
