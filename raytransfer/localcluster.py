"""An autoscaling Ray cluster on this machine (Ray's local autoscaler), started and stopped by itself.

`clusters/local-autoscaling.yaml` describes it: a head without GPUs, GPU worker nodes launched when
trials wait for them and removed when idle (their GPUs are Ray resources without CUDA). The tests
and benchmarks start it on their own ports and temp dir and stop only its processes -- `ray stop`
would end every Ray process of the machine. Every process of the cluster descends from one
`ray start` run in a new session, so they share its session id; stopping ends exactly that session.
Its nodes also share one temp dir: each worker node that joins deletes and unpacks a job's working dir
there again, so a head process whose cwd is that folder loses it (a real cluster's nodes have their own disks).

    cluster = LocalCluster.start("clusters/local-autoscaling.yaml", temp_dir="/tmp/rtx")
    ... ray job submit --address {cluster.dashboard_url} ... / ray.init(cluster.address)
    cluster.stop()
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalCluster:
    address: str            # the GCS address (ray.init / --address)
    dashboard_url: str      # http://127.0.0.1:PORT (Jobs API, state API)
    temp_dir: str
    session: int            # the session id every process of this cluster carries

    @classmethod
    def start(cls, config: str | Path, temp_dir: str, head_cpus: int = 1, env: dict | None = None) -> "LocalCluster":
        """`ray start --head` with the fake multi-node autoscaler, on free ports. The fake provider starts
        its worker nodes against `provider.gcs_address` (against <ip>:6379 when that is absent), so the
        head runs from a copy of the config with it set. Every port is a free one: the head's dashboard agent
        (which takes job submissions) otherwise listens on Ray's fixed 52365, and where another Ray on this
        machine holds it, the agent never comes up and every submission answers 'No available agent'."""
        import ray._private.services
        import yaml

        ip = ray._private.services.get_node_ip_address()
        port, dash, agent = free_port(), free_port(), free_port()
        cfg = yaml.safe_load(Path(config).read_text())
        cfg["provider"]["gcs_address"] = f"{ip}:{port}"
        os.makedirs(temp_dir, exist_ok=True)
        cfg_path = Path(temp_dir) / "autoscaling.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        cmd = [str(Path(sys.executable).with_name("ray")), "start", "--head", f"--autoscaling-config={cfg_path}",
               "--num-cpus", str(head_cpus), "--num-gpus", "0", "--port", str(port), "--dashboard-port", str(dash),
               "--dashboard-agent-listen-port", str(agent),
               "--dashboard-host", "127.0.0.1", "--include-dashboard", "true", "--temp-dir", temp_dir,
               "--disable-usage-stats"]
        proc = subprocess.Popen(cmd, env={**os.environ, **(env or {}), "RAY_FAKE_CLUSTER": "1"},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        out, _ = proc.communicate(timeout=180)
        cluster = cls(f"{ip}:{port}", f"http://127.0.0.1:{dash}", temp_dir, proc.pid)
        if proc.returncode != 0:
            cluster.stop()
            raise RuntimeError(f"ray start failed ({proc.returncode}):\n{out[-3000:]}")
        return cluster

    def processes(self) -> list[int]:
        pids = []
        for p in Path("/proc").glob("[0-9]*"):
            try:
                zombie = (p / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
                if not zombie and os.getsid(int(p.name)) == self.session and int(p.name) != os.getpid():
                    pids.append(int(p.name))
            except (OSError, ValueError, IndexError):
                continue
        return pids

    def stop(self, timeout: float = 5.0):
        """End every process of this cluster (SIGTERM, then SIGKILL), nothing else."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.processes():
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
            deadline = time.time() + timeout
            while self.processes() and time.time() < deadline:
                time.sleep(0.2)
            if not self.processes():
                return
