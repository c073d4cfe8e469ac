"""A local S3-compatible server for the tests: moto's server mode, on a free port, in its own process.

A user points raytransfer at a non-AWS endpoint with the standard variables (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION); the tests do the same, so pyarrow,
Ray Tune and boto3 all reach this server the way they would reach a real one. `freeze()`/`thaw()`
stop and continue the server's process (SIGSTOP/SIGCONT): a server that stalls with its sockets open,
as an overloaded endpoint does. `stop()` kills it: a server that went away.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "rt-test-key-id", "AWS_SECRET_ACCESS_KEY": "rt-test-secret-0123456789",
               "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """One moto server process; `env` holds the variables a client needs to reach it."""

    def __init__(self, port: int | None = None, server_env: dict | None = None):
        self.port = port or free_port()
        self.server_env = server_env or {}          # e.g. {"INITIAL_NO_AUTH_ACTION_COUNT": "0"}: moto checks credentials
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {**CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> "S3Server":
        exe = Path(sys.executable).with_name("moto_server")
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "moto.server"]
        self.proc = subprocess.Popen(cmd + ["-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env={**os.environ, **self.server_env}, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                urllib.request.urlopen(self.endpoint + "/", timeout=2)
                return self
            except urllib.error.HTTPError:             # it answers (an authenticating moto refuses "/")
                return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"moto_server exited with {self.proc.returncode}")
                time.sleep(0.3)
        raise RuntimeError(f"moto_server did not answer on {self.endpoint} in {timeout:.0f} s")

    def client(self):
        import boto3
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
                            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key under a prefix (paginated)."""
        out = []
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            out += [o["Key"] for o in page.get("Contents", [])]
        return out

    def freeze(self):
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def thaw(self):
        os.killpg(self.proc.pid, signal.SIGCONT)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGCONT)
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)


@contextmanager
def s3_server(monkeypatch=None, server_env: dict | None = None):
    """A running server; with `monkeypatch`, this process's environment points at it for the test."""
    if shutil.which("moto_server") is None and not Path(sys.executable).with_name("moto_server").exists():
        raise RuntimeError("moto_server is not installed: pip install -e '.[dev]' (moto[server] is a dev extra)")
    server = S3Server(server_env=server_env).start()
    try:
        if monkeypatch is not None:
            for k, v in server.env.items():
                monkeypatch.setenv(k, v)
        yield server
    finally:
        server.stop()
