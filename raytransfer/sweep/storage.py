"""The sweep's storage filesystem, made in one place for Tune, Ray Train, the job store, status and monitor.

A local path is pyarrow's LocalFileSystem, as it always was. A remote URI (s3://bucket/prefix, gs://...)
is pyarrow's own filesystem for it (FileSystem.from_uri: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ... as
every AWS client reads them) behind a handler that waits out a storage that stutters: a call that fails
with a network error (a timeout, a refused connection, a 5xx, throttling) is tried again with backoff
(1, 2, 4 ... 30 s), each wait logged, for at most RAYTRANSFER_STORAGE_WAIT_S seconds (default 600) of
one outage; then StorageUnavailable names the storage and the way back (`--resume`). An error a retry
cannot fix (no such bucket, refused credentials, a missing file) is raised at once, as before.

Once a process has given up on a storage, its later calls try once and fail at once until one succeeds:
a driver that ends because the storage went away does not wait the budget again for each last write.

Reads are whole files, writes are spooled (to memory, then a temporary file) and put on close, so a
stall mid-transfer retries the transfer, not just its first request. Credentials are never held here:
a pickled filesystem (Tune pickles its run config into the experiment state) carries the URI alone and
each process resolves its credentials from its own environment, as pyarrow itself does.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import threading
import time

import pyarrow
import pyarrow.fs

log = logging.getLogger("raytransfer.storage")

WAIT_ENV, DEFAULT_WAIT_S = "RAYTRANSFER_STORAGE_WAIT_S", 600.0
MAX_DELAY_S = 30.0
SPOOL_BYTES = 64 << 20                   # writes above this spool to a temporary file, not memory

# Words of pyarrow's / the AWS SDK's messages for errors that go away: a stalled or restarting server.
TRANSIENT = ("network_connection", "curlcode", "timed out", "timeout", "couldn't connect", "connection refused",
             "connection reset", "broken pipe", "service_unavailable", "slow_down", "slowdown", "throttl",
             "internal_failure", "internalerror", "request_time_too_skewed", "503", "500 ", "502", "504",
             "unable to connect", "failed to connect", "connection was closed", "recv failure", "send failure",
             "empty reply", "temporarily unavailable")
# ... and for errors no wait fixes, even where a word above also appears.
PERMANENT = ("access_denied", "accessdenied", "invalidaccesskeyid", "signaturedoesnotmatch", "no_such_bucket",
             "nosuchbucket", "forbidden", "invalid_access_key", "http response code 403", "http response code 404")


class StorageUnavailable(OSError):
    """The storage did not answer for the whole wait budget (or this process gave up on it before)."""


_override = threading.local()


def wait_budget_s() -> float:
    if getattr(_override, "budget", None) is not None:
        return _override.budget
    try:
        return max(0.0, float(os.environ.get(WAIT_ENV, DEFAULT_WAIT_S)))
    except ValueError:
        from .errors import SweepError
        raise SweepError(f"{WAIT_ENV}={os.environ[WAIT_ENV]!r} is not a number of seconds: set it to one "
                         "(e.g. 600) or unset it") from None


def is_transient(e: BaseException) -> bool:
    """A storage error that may pass if we wait (a network error, a busy server), not a wrong path or key."""
    if isinstance(e, (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)):
        return False
    if isinstance(e, StorageUnavailable):
        return False
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    if not isinstance(e, OSError):
        return False
    text = str(e).lower()
    return not any(w in text for w in PERMANENT) and any(w in text for w in TRANSIENT)


@contextlib.contextmanager
def patience(seconds: float):
    """Within it, this thread waits at most `seconds` for an outage (a check or `status` answers in seconds)."""
    before = getattr(_override, "budget", None)
    _override.budget = min(wait_budget_s(), seconds)
    try:
        yield _override.budget
    finally:
        _override.budget = before


def unavailable(uri: str) -> bool:
    """Whether this process gave up on the storage of `uri` (it did not answer for the whole budget)."""
    return "://" in uri and storage_label(uri) in _Outage.gave_up


def resume_hint(storage: str) -> str:
    return (f"the storage {storage} did not answer for {wait_budget_s():.0f} s ({WAIT_ENV}); nothing recorded is "
            "lost: once it answers again, rerun the same command with --resume")


def storage_filesystem(uri: str):
    """(filesystem, path) of a local path or a URI; remote ones wait out outages (see the module's docstring)."""
    if "://" not in uri or uri.startswith("file://"):
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        return pyarrow.fs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    inner, path = _remote(uri)
    if isinstance(inner, pyarrow.fs.LocalFileSystem):
        return inner, path
    return pyarrow.fs.PyFileSystem(PatientHandler(uri, inner)), path


def _remote(uri: str):
    """pyarrow's filesystem for a URI; for S3 with one attempt a call (the handler retries, and logs) and
    writes in the calling thread (a put from inside copy_files' thread pool must not wait on that pool)."""
    inner, path = pyarrow.fs.FileSystem.from_uri(uri)
    if isinstance(inner, pyarrow.fs.S3FileSystem):
        _, (options,) = inner.__reduce__()
        inner = pyarrow.fs.S3FileSystem(**{**options, "background_writes": False,
                                           "retry_strategy": pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=1)})
    return inner, path


def tune_storage(storage: str):
    """(storage_path, storage_filesystem) for Tune's / Train's RunConfig: the patient filesystem and the
    path without its scheme for a URI, the path alone (and None: Ray's own) for a local folder."""
    if "://" not in storage:
        return storage, None
    fs, path = storage_filesystem(storage)
    return path, fs


def run_storage(storage: str) -> dict:
    """Tune's / Train's RunConfig storage arguments: a URI through this module's patient filesystem (it waits
    out a storage that stutters), a local folder as Ray opens it."""
    path, fs = tune_storage(storage)
    return {"storage_path": path, **({"storage_filesystem": fs} if fs is not None else {})}


def storage_label(uri: str) -> str:
    """The storage's scheme and bucket (what a message names): s3://bucket."""
    scheme, _, rest = uri.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"


class _Outage:
    """When this process began to wait on a storage, and whether it gave up (shared by its filesystems)."""
    lock = threading.Lock()
    since: dict[str, float] = {}
    gave_up: set[str] = set()


class PatientHandler(pyarrow.fs.FileSystemHandler):
    """pyarrow's filesystem for a URI, each call retried through network errors within the wait budget."""

    def __init__(self, uri: str, inner=None):
        self.uri, self.label = uri, storage_label(uri)
        self.inner = inner if inner is not None else _remote(uri)[0]

    def __reduce__(self):                      # the URI only: no credentials in a pickle
        return PatientHandler, (self.uri,)

    def __eq__(self, other):
        return isinstance(other, PatientHandler) and other.uri == self.uri

    def __ne__(self, other):
        return not self == other

    def _call(self, what: str, fn, *args):
        """fn(*args), tried again through transient errors until the budget of this outage is spent."""
        budget, delay = wait_budget_s(), 1.0
        while True:
            try:
                out = fn(*args)
            except Exception as e:
                if not is_transient(e):
                    raise
                with _Outage.lock:
                    first = _Outage.since.setdefault(self.label, time.time())
                    gave_up = self.label in _Outage.gave_up
                waited = time.time() - first
                if gave_up or waited >= budget:
                    with _Outage.lock:
                        _Outage.gave_up.add(self.label)
                    raise StorageUnavailable(f"{resume_hint(self.label)} (last error, {what} "
                                             f"{args[0] if args else ''}: {_short(e)})") from e
                delay = min(delay, budget - waited)
                log.warning("storage %s: %s %s failed (%s); trying again in %.0f s (waited %.0f of %.0f s)",
                            self.label, what, args[0] if args else "", _short(e), delay, waited, budget)
                time.sleep(delay)
                delay = min(delay * 2, MAX_DELAY_S)
                continue
            with _Outage.lock:
                began = _Outage.since.pop(self.label, None)
                _Outage.gave_up.discard(self.label)
            if began is not None:
                log.warning("storage %s answers again after %.0f s", self.label, time.time() - began)
            return out

    # -- pyarrow.fs.FileSystemHandler
    def get_type_name(self):
        return f"patient-{self.inner.type_name}"

    def normalize_path(self, path):
        return self.inner.normalize_path(path)

    def get_file_info(self, paths):
        return self._call("stat", self.inner.get_file_info, paths)

    def get_file_info_selector(self, selector):
        return self._call("list", self.inner.get_file_info, selector)

    def create_dir(self, path, recursive):
        self._call("mkdir", lambda p: self.inner.create_dir(p, recursive=recursive), path)

    def delete_dir(self, path):
        self._call("delete", self.inner.delete_dir, path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self._call("delete", lambda p: self.inner.delete_dir_contents(p, missing_dir_ok=missing_dir_ok), path)

    def delete_root_dir_contents(self):
        raise PermissionError(f"refusing to delete everything in {self.label}")

    def delete_file(self, path):
        self._call("delete", self.inner.delete_file, path)

    def move(self, src, dest):
        self._call("move", self.inner.move, src, dest)

    def copy_file(self, src, dest):
        self._call("copy", self.inner.copy_file, src, dest)

    def _read(self, path):
        with self.inner.open_input_stream(path) as f:
            return f.read()

    def open_input_stream(self, path):
        return pyarrow.BufferReader(self._call("read", self._read, path))

    def open_input_file(self, path):
        return pyarrow.BufferReader(self._call("read", self._read, path))

    def open_output_stream(self, path, metadata):
        return pyarrow.PythonFile(_Upload(self, path, metadata), mode="w")

    def open_append_stream(self, path, metadata):
        raise NotImplementedError(f"{self.label} does not append")

    def _put(self, path, spool, metadata):
        spool.seek(0)
        with self.inner.open_output_stream(path, metadata=metadata) as out:
            while chunk := spool.read(8 << 20):
                out.write(chunk)


class _Upload(io.RawIOBase):
    """A write stream that spools its bytes and puts them on close, retried as one call."""

    def __init__(self, handler: PatientHandler, path: str, metadata):
        self.handler, self.path, self.metadata = handler, path, metadata
        self.spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)

    def writable(self):
        return True

    def write(self, data):
        return self.spool.write(data)

    def tell(self):
        return self.spool.tell()

    def close(self):
        if self.closed:
            return
        try:
            self.handler._call("write", self.handler._put, self.path, self.spool, self.metadata)
        finally:
            self.spool.close()
            super().close()


def _short(e: BaseException) -> str:
    """An error's type and first 300 characters, with any credential of the environment blanked out."""
    text = " ".join(str(e).split())
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        if os.environ.get(var):
            text = text.replace(os.environ[var], "***")
    return f"{type(e).__name__}: {text[:300]}"


REFUSED = ("access_denied", "accessdenied", "invalid_access_key", "invalidaccesskeyid", "signaturedoesnotmatch",
           "signature_does_not_match", "forbidden", "expiredtoken", "expired_token", "invalidtoken")
CHECK_WAIT_S = 30.0                      # at the start, a storage that does not answer is said so after this long


def check_remote(uri: str):
    """Before anything trains: a remote storage's bucket exists, its endpoint answers and takes these
    credentials. One line naming the problem and the fix, else nothing."""
    from .errors import SweepError

    if "://" not in uri or uri.startswith("file://"):
        return
    where = f"at {os.environ['AWS_ENDPOINT_URL']} (AWS_ENDPOINT_URL)" if os.environ.get("AWS_ENDPOINT_URL") else "on AWS"
    wait_budget_s()                                      # a malformed RAYTRANSFER_STORAGE_WAIT_S: said now
    try:
        fs, path = storage_filesystem(uri)               # on AWS this asks the bucket's region
    except (OSError, ValueError) as e:
        raise SweepError(f"--storage {uri}: cannot reach the storage {where} ({_short(e)}): check the network, "
                         "AWS_ENDPOINT_URL (for a server that is not AWS) and the bucket's name") from None
    if not isinstance(fs, pyarrow.fs.PyFileSystem):
        return
    bucket = path.split("/", 1)[0]
    try:
        with patience(CHECK_WAIT_S) as waited:
            info = fs.get_file_info(bucket)                                       # HeadBucket
            if info.type != pyarrow.fs.FileType.NotFound:
                fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))   # a list, as the sweep does
    except StorageUnavailable:
        raise SweepError(f"--storage {uri}: the storage {where} does not answer (waited {waited:.0f} s): "
                         "check AWS_ENDPOINT_URL and the network, or choose another --storage") from None
    except OSError as e:
        if any(w in str(e).lower() for w in REFUSED):
            raise SweepError(f"--storage {uri}: the storage {where} refuses these credentials ({_short(e)}): set "
                             "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or the node's role) to "
                             f"credentials that may read and write bucket {bucket}") from None
        raise SweepError(f"--storage {uri} cannot be used ({_short(e)}): fix --storage or its credentials") from None
    if info.type == pyarrow.fs.FileType.NotFound:
        raise SweepError(f"--storage {uri}: bucket {bucket!r} does not exist {where}: create it (aws s3 mb "
                         f"s3://{bucket}) or fix --storage")
