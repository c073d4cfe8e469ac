"""The durable job store: one record and one weights file per finished job, under the storage path.

It is the truth. Tune's experiment state, the searcher's state and the object store are caches; a
rerun of the same or an extended grid (on the same storage, local or s3://) skips every job that
has a record. A record is written only after its weights, so a record always points at weights.

    store = JobStore("s3://bucket/raytransfer")
    store.save_weights(key, state_dict); store.write(key, record)
    done = store.completed()                 # {key: record}
    store.write_failed(key, record)          # a job that must not count as done (its reason inside)

A failed job's record lives apart from the done ones (`failed/`), so nothing that reads the done
records can mistake it for a result; a later success removes it.

A missing file is "no record". Any other failure to read one (an S3 or NFS hiccup, a permission, a JSON
that does not parse: a write half visible on NFS) is retried READ_TRIES times with backoff, each retry
logged, and then raises StoreReadError: a read never makes a finished job look undone, nor drops a
record from `completed()`.
"""
from __future__ import annotations

import io
import json
import logging
import os
import time

import pyarrow.fs

from .errors import SweepError

RECORDS, WEIGHTS, FAILED, ATTEMPTS = "jobs", "weights", "failed", "attempts"
SWEEP, HEARTBEAT = "sweep.json", "heartbeat.json"
READ_TRIES, READ_BACKOFF_S = 4, 0.5       # a failed read is tried again after 0.5, 1 and 2 s
READ_THREADS = 16                         # records read at once (S3: one GET each, ~10-50 ms of latency)

log = logging.getLogger("raytransfer.sweep")


class StoreReadError(RuntimeError):
    """A job-store file that exists could not be read (or parsed) after every retry."""


def _split_uri(uri: str):
    """(filesystem, path) for a local path or a URI such as s3://bucket/prefix; a remote one waits out a
    storage that stutters (storage.py: the sweep's one constructor of its storage filesystem)."""
    from .storage import storage_filesystem
    return storage_filesystem(uri)


class JobStore:
    def __init__(self, storage: str):
        if "://" not in storage:
            storage = os.path.abspath(os.path.expanduser(storage))
        self.storage = storage.rstrip("/")
        self.root_uri = f"{self.storage}/jobstore"
        self.fs, self.root = _split_uri(self.root_uri)
        self._cache: dict | None = None
        self._seen: dict[str, dict] = {}          # folder -> {key: (stamp, record)}: what _read_all read

    def check_writable(self):
        """Fail before any training if the storage cannot be written: one clear message."""
        probe = f"{self.root}/.write-test-{os.getpid()}"
        try:
            self.fs.create_dir(f"{self.root}/{RECORDS}", recursive=True)
            with self.fs.open_output_stream(probe) as f:
                f.write(b"ok")
            self.fs.delete_file(probe)
        except Exception as e:
            raise SweepError(f"storage {self.storage} is not writable ({type(e).__name__}: {e}): "
                             "choose another --storage, or fix its permissions/credentials") from None

    def weights_uri(self, key: str) -> str:
        return f"{self.root_uri}/{WEIGHTS}/{key}"

    def save_weights(self, key: str, state_dict: dict) -> str:
        import torch                     # here, not at the top: `raytransfer status` reads records without torch

        buf = io.BytesIO()
        torch.save({"model": {k: v.detach().cpu() for k, v in state_dict.items()}}, buf)
        d = f"{self.root}/{WEIGHTS}/{key}"
        self.fs.create_dir(d, recursive=True)
        self._atomic_write(f"{d}/state.pt", buf.getvalue())
        return self.weights_uri(key)

    def record_uri(self, key: str) -> str:
        """Where a job's done record lives (a diagnostic's output: its rows are in it)."""
        return f"{self.root_uri}/{RECORDS}/{key}.json"

    def write(self, key: str, record: dict):
        record = {**record, "job_key": key, "recorded_at": time.time(), **self._attempt_starts(key)}
        self.fs.create_dir(f"{self.root}/{RECORDS}", recursive=True)    # a trial must never fail on a missing folder
        self._atomic_write(f"{self.root}/{RECORDS}/{key}.json", json.dumps(record, default=str).encode())
        self._delete(f"{self.root}/{FAILED}/{key}.json")
        if self._cache is not None:
            self._cache[key] = record

    def write_failed(self, key: str, record: dict):
        """A job that ran and must not count as done (e.g. its frozen layers changed); `reason` says why."""
        record = {**record, "job_key": key, "status": "failed", "recorded_at": time.time(), **self._attempt_starts(key)}
        self.fs.create_dir(f"{self.root}/{FAILED}", recursive=True)
        self._atomic_write(f"{self.root}/{FAILED}/{key}.json", json.dumps(record, default=str).encode())

    def _attempt_starts(self, key: str) -> dict:
        """{"attempt_starts": [when each attempt of `key` began]} for its record (GPU-hours count every
        attempt); {} if the attempts cannot be read: the record itself must never be lost for it."""
        try:
            attempts = self.attempts(key)
            return {"attempt_starts": [a.get("at") for a in attempts if a.get("at")],
                    "preemptions": sum(1 for a in attempts if a.get("ended") == "preempted")}
        except StoreReadError as e:
            log.warning("%s: its record is written without its attempts' start times (%s)", key, e)
            return {}

    def failed(self) -> dict[str, dict]:
        return self._read_all(FAILED)

    def count_attempt(self, key: str, info: dict) -> int:
        """Note one more start of `key` (a retry of any layer, a resume) and return how many there were."""
        path = f"{self.root}/{ATTEMPTS}/{key}.json"
        attempts = self._read_json(path) or []
        attempts.append({**info, "at": time.time()})
        self.fs.create_dir(f"{self.root}/{ATTEMPTS}", recursive=True)
        self._atomic_write(path, json.dumps(attempts).encode())
        return len(attempts)

    def note_preemption(self, key: str, why: str = ""):
        """The latest attempt of `key` ended because its node was preempted (not a failure): its record's
        `preemptions` counts such attempts apart from `attempts` (every start)."""
        path = f"{self.root}/{ATTEMPTS}/{key}.json"
        attempts = self._read_json(path) or [{"at": None}]
        attempts[-1] = {**attempts[-1], "ended": "preempted", **({"why": why} if why else {})}
        self.fs.create_dir(f"{self.root}/{ATTEMPTS}", recursive=True)
        self._atomic_write(path, json.dumps(attempts).encode())

    def write_sweep(self, plan: dict):
        """The running sweep's plan (its jobs, one row each), for `raytransfer status` without Ray."""
        self.fs.create_dir(self.root, recursive=True)
        self._atomic_write(f"{self.root}/{SWEEP}", json.dumps({**plan, "written_at": time.time()}).encode())

    def read_sweep(self) -> dict | None:
        return self._read_json(f"{self.root}/{SWEEP}")

    def write_heartbeat(self, beat: dict):
        """What the driver sees now (running jobs, the dashboard): `status` tells a live sweep from a dead one."""
        self._atomic_write(f"{self.root}/{HEARTBEAT}", json.dumps({**beat, "at": time.time()}).encode())

    def read_heartbeat(self) -> dict | None:
        return self._read_json(f"{self.root}/{HEARTBEAT}")

    def all_attempts(self) -> dict[str, list]:
        return self._read_all(ATTEMPTS)

    def attempts(self, key: str) -> list:
        return self._read_json(f"{self.root}/{ATTEMPTS}/{key}.json") or []

    def read(self, key: str) -> dict | None:
        return self._read_json(f"{self.root}/{RECORDS}/{key}.json")

    def _read_json(self, path: str):
        """The parsed file, None if it does not exist; any other failure is retried, then StoreReadError."""
        for attempt in range(1, READ_TRIES + 1):
            try:
                with self.fs.open_input_stream(path) as f:
                    return json.loads(f.read())
            except FileNotFoundError:
                return None
            except (OSError, ValueError) as e:          # ValueError: a JSON cut short (a write half visible)
                error = f"{type(e).__name__}: {e}"
                if attempt == READ_TRIES:
                    break
                log.warning("job store: reading %s failed (%s); try %d of %d in %.1f s", path, error, attempt + 1,
                            READ_TRIES, READ_BACKOFF_S * 2 ** (attempt - 1))
                time.sleep(READ_BACKOFF_S * 2 ** (attempt - 1))
        raise StoreReadError(f"cannot read {path} in the job store at {self.storage} ({error}; tried {READ_TRIES} "
                             "times): check the storage's permissions, credentials and network, then rerun the "
                             "same command (nothing recorded is lost); if the file itself is damaged, move it "
                             "aside (its job is then trained again)")

    def _list(self, folder: str) -> dict[str, list]:
        """{key: [mtime_ns, size]} of a folder's records: one listing (on S3 one call per 1,000 keys)."""
        sel = pyarrow.fs.FileSelector(f"{self.root}/{folder}", allow_not_found=True)
        return {os.path.basename(i.path)[:-5]: [i.mtime_ns, i.size] for i in self.fs.get_file_info(sel)
                if i.path.endswith(".json")}

    def _read_many(self, paths: list[str], then=None) -> list:
        """_read_json of each path (passed through `then`, if given, where it is not None), READ_THREADS at a
        time: on S3 each is one GET, latency more than bandwidth. The first StoreReadError is raised."""
        def read(path):
            value = self._read_json(path)
            return then(value) if then is not None and value is not None else value

        if len(paths) < 2:
            return [read(p) for p in paths]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(READ_THREADS, len(paths))) as pool:
            return list(pool.map(read, paths))

    def _read_all(self, folder: str) -> dict[str, dict]:
        """Every record of a folder, by key: one listing, then only the files new or changed since this
        store's last read of the folder (by mtime and size), in parallel."""
        listing = self._list(folder)
        seen = self._seen.get(folder, {})
        todo = [k for k in listing if k not in seen or seen[k][0] != listing[k]]
        read = dict(zip(todo, self._read_many([f"{self.root}/{folder}/{k}.json" for k in todo])))
        out = {k: read[k] if k in read else seen[k][1] for k in listing}
        out = {k: r for k, r in out.items() if r is not None}      # gone between the listing and the read
        self._seen[folder] = {k: (listing[k], r) for k, r in out.items()}
        return out

    def summaries(self, write_index: bool = True) -> dict[str, dict]:
        """{"jobs": {key: summary}, "failed": {key: summary}} from the index, checked against the records'
        listing and brought up to date (index.py); the index is written back when it changed."""
        from .index import refresh

        return refresh(self, write=write_index)[0]

    def _delete(self, path: str):
        try:
            self.fs.delete_file(path)
        except (FileNotFoundError, OSError):
            pass

    def completed(self, refresh: bool = False) -> dict[str, dict]:
        """Every finished job's record, by key (one listing; cached until refresh)."""
        if self._cache is None or refresh:
            self._cache = self._read_all(RECORDS)
        return dict(self._cache)

    def forget(self, key: str):
        """Drop a job's record (e.g. its weights are corrupt): the next sweep retrains that job alone."""
        self._delete(f"{self.root}/{RECORDS}/{key}.json")
        if self._cache is not None:
            self._cache.pop(key, None)

    def _atomic_write(self, path: str, data: bytes):
        tmp = f"{path}.tmp-{os.getpid()}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, path)          # a rename on local disks; S3 puts are atomic anyway


def load_weights(uri: str) -> dict:
    """The state_dict a finished job left at `uri` (loaded with weights_only=True)."""
    import torch

    fs, path = _split_uri(uri)
    try:
        with fs.open_input_stream(f"{path}/state.pt") as f:
            return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)["model"]
    except Exception as e:
        raise CorruptWeights(f"weights at {uri} cannot be read ({type(e).__name__}: {e})") from e


class CorruptWeights(RuntimeError):
    pass


def delete_tree(uri: str) -> int:
    """Delete a folder (local or s3://...) and return the bytes it held; 0 if it is not there."""
    fs, path = _split_uri(uri)
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=True, allow_not_found=True))
        size = sum(i.size or 0 for i in infos if i.type == pyarrow.fs.FileType.File)
        if fs.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
            return 0
        fs.delete_dir(path)
    except (FileNotFoundError, OSError):
        return 0
    return size
