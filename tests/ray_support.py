"""A real local Ray cluster for the tests: `ray start --head` in a temporary folder, on free loopback ports.

`RayCluster.start()` starts a head node (with the dashboard, which job submission goes through) and waits until it
takes jobs; `address` is what `TUNEFORGE_RAY_ADDRESS` names; `stop()` ends exactly the processes of this cluster
(never `ray stop`, which would end every Ray cluster on the machine). `cluster()` is one cluster for the whole
test session, stopped at exit.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

HOST = "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _ray() -> str:
    return str(Path(sys.executable).parent / "ray")


class RayCluster:
    def __init__(self, num_cpus: int = 4) -> None:
        # Ray's socket paths must stay short: a temporary folder directly under /tmp.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="tfray-", dir="/tmp"))
        self.gcs_port, self.dashboard_port = _free_port(), _free_port()
        # Every port of the node, chosen free: Ray's defaults (the job agent's 52365, ...) may be taken by another
        # cluster on the machine, and a node whose agent cannot bind takes no jobs.
        self.ports = {name: _free_port() for name in (
            "--node-manager-port", "--object-manager-port", "--ray-client-server-port", "--metrics-export-port",
            "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port")}  # fmt: skip
        low = _free_port()
        self.worker_ports = (low, low + 200) if low + 200 < 65535 else (low - 200, low)
        self.num_cpus = num_cpus

    @property
    def address(self) -> str:
        return f"http://{HOST}:{self.dashboard_port}"

    def env(self) -> dict[str, str]:
        return {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, "RAY_USAGE_STATS_ENABLED": "0"}

    def start(self, timeout: float = 90) -> RayCluster:
        cmd = [_ray(), "start", "--head", "--node-ip-address", HOST, "--port", str(self.gcs_port),
               "--dashboard-host", HOST, "--dashboard-port", str(self.dashboard_port), "--include-dashboard", "true",
               "--num-cpus", str(self.num_cpus), "--temp-dir", str(self.temp_dir), "--disable-usage-stats",
               "--object-store-memory", str(100 << 20), "--min-worker-port", str(self.worker_ports[0]),
               "--max-worker-port", str(self.worker_ports[1])]  # fmt: skip
        for flag, port in self.ports.items():
            cmd += [flag, str(port)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=self.env(), timeout=timeout)
        if done.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # ready once a job can be submitted (the node's job agent is up) and runs
            with contextlib.suppress(httpx.HTTPError, RuntimeError, ConnectionError):
                if self._probe(deadline):
                    return self
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"the Ray cluster at {self.address} did not run a job within {timeout} s")

    def _probe(self, deadline: float) -> bool:
        from ray.job_submission import JobStatus, JobSubmissionClient

        client = JobSubmissionClient(self.address)
        job = client.submit_job(entrypoint="true")
        while time.monotonic() < deadline:
            status = client.get_job_status(job)
            if status == JobStatus.SUCCEEDED:
                return True
            if status in (JobStatus.FAILED, JobStatus.STOPPED):
                return False
            time.sleep(0.2)
        return False

    def pids(self) -> list[int]:
        """The processes of this cluster: those whose command line names its temporary folder or GCS port, and
        everything they started (Ray's workers rename themselves, and job entrypoints run under them)."""
        gcs = re.compile(rb"127\.0\.0\.1:" + str(self.gcs_port).encode() + rb"(?!\d)")
        return process_tree(lambda cmdline: str(self.temp_dir).encode() in cmdline or bool(gcs.search(cmdline)))

    def stop(self) -> None:
        """SIGTERM to every process of the cluster, then SIGKILL to those and any found since (a process whose
        parent died is reparented, so the first list is kept)."""
        first = self.pids()
        for pid in first:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in {*first, *self.pids()}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def process_tree(match: Callable[[bytes], bool]) -> list[int]:
    """The processes whose command line `match`es, and their descendants (not this process)."""
    parents: dict[int, int] = {}
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            pid = int(entry.name)
            parents[pid] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if match((entry / "cmdline").read_bytes()):
                found.add(pid)
    grew = True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in found and pid not in found}
        found |= more
        grew = bool(more)
    return sorted(found)


_cluster: RayCluster | None = None
_lock = threading.Lock()


def cluster() -> RayCluster:
    """The session's Ray cluster, started on first use and stopped at exit."""
    global _cluster
    with _lock:
        if _cluster is None:
            started = RayCluster().start()
            atexit.register(started.stop)
            _cluster = started
        return _cluster
