"""Where a model server process runs: a child process of this server (the default), or a Ray job placed by the
cluster when the executor is Ray (`TUNEFORGE_EXECUTOR=ray`).

The pool (`serve/pool.py`) starts, polls and stops a model server through the small part of `subprocess.Popen` it
uses (`ServerProcess`), and reaches it at `host`:port. Placed by Ray, the model server is the entrypoint of a Ray
job with the resources it needs (memory from the pool's estimate, GPUs from the endpoint's hardware): Ray picks a
node that has them and sets its CUDA_VISIBLE_DEVICES. Its output goes to the pool's log file, so the work folder
must be on storage every node shares (as for training runs, `jobs/executors/ray.py`).

The model server listens on `serve_bind_host` (default 127.0.0.1: one machine). On a cluster of several machines
set it to 0.0.0.0: the pool then reaches each server at the address of the node Ray put it on. A model server has
no authentication of its own (the API in front of it has), so the cluster's network must be private.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from tuneforge.settings import Settings

LOOPBACK = "127.0.0.1"


class ServerProcess(Protocol):
    """The part of `subprocess.Popen` the pool uses, and where the process listens."""

    @property
    def pid(self) -> int | None: ...

    @property
    def returncode(self) -> int | None: ...

    @property
    def host(self) -> str | None:
        """The address the server is reached at; None while its placement is not known yet."""
        ...

    def poll(self) -> int | None: ...

    def terminate(self) -> None: ...

    def kill(self) -> None: ...

    def wait(self, timeout: float | None = None) -> int: ...


class LocalProcess(subprocess.Popen[bytes]):
    """A model server as a child process of this server, on this machine."""

    host = LOOPBACK


def start_local(command: list[str], env: dict[str, str], log_path: Path) -> LocalProcess:
    with open(log_path, "ab") as out:
        return LocalProcess(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


# Ray job statuses, as exit codes: still going (None), ended by itself (0 / 1), or stopped by us (-SIGTERM).
_RAY_CODES = {"PENDING": None, "RUNNING": None, "SUCCEEDED": 0, "FAILED": 1, "STOPPED": -15}


class RayProcess:
    """A model server as the entrypoint of a Ray job."""

    def __init__(self, client: Any, submission_id: str, *, bind_host: str) -> None:
        self._client = client
        self.submission_id = submission_id
        self._bind_host = bind_host
        self._host: str | None = None
        self.returncode: int | None = None

    @property
    def pid(self) -> int | None:
        return None  # on whichever node Ray chose; the submission id names it

    @property
    def host(self) -> str | None:
        if self._host is None:
            if self._bind_host == LOOPBACK:  # one machine: the server listens on loopback only
                self._host = LOOPBACK
            else:
                agent = self._client.get_job_info(self.submission_id).driver_agent_http_address
                self._host = urlsplit(agent).hostname if agent else None
        return self._host

    def _status(self) -> str:
        return str(self._client.get_job_status(self.submission_id)).rsplit(".", 1)[-1]

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = _RAY_CODES.get(self._status(), 1)
        return self.returncode

    def terminate(self) -> None:
        if self.returncode is not None:
            return
        status = self._status()
        if status in ("PENDING", "RUNNING"):
            self._client.stop_job(self.submission_id)  # SIGTERM to the entrypoint, SIGKILL if it lingers
        if status == "PENDING":
            # Ray has not placed it (no node has what it asked for): the stop waits for it in Ray's queue, and a
            # job never placed fails at Ray's start timeout (RAY_JOB_START_TIMEOUT_SECONDS). It never served.
            self.returncode = -15

    kill = terminate  # Ray's stop is the strongest there is; it ends in SIGKILL

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.submission_id, timeout or 0)
            time.sleep(0.2)
        return code


def start_on_ray(
    settings: Settings, command: list[str], env: dict[str, str], log_path: Path, *, memory: int, gpus: int
) -> RayProcess:
    """Submit a model server as a Ray job that asks for `memory` bytes and `gpus` GPUs (Ray picks the node)."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(settings.ray_address)
    env = dict(env)
    if gpus:
        env.pop("CUDA_VISIBLE_DEVICES", None)  # Ray sets it to the GPUs it gives the entrypoint
    # The entrypoint runs in a shell on the chosen node: the server's output goes to the pool's log file.
    entrypoint = f"exec {shlex.join(command)} >> {shlex.quote(str(log_path))} 2>&1"
    submission_id = f"tuneforge-serve-{uuid.uuid4().hex[:12]}"
    # Ray's job details do not show the resource request: the metadata says it, for people and tests.
    metadata = {"tuneforge": "model-server", "log_path": os.fspath(log_path), "memory": str(memory), "gpus": str(gpus)}
    client.submit_job(
        entrypoint=entrypoint,
        submission_id=submission_id,
        runtime_env={"env_vars": env},
        entrypoint_num_cpus=1,
        entrypoint_num_gpus=gpus,
        entrypoint_memory=max(int(memory), 1),
        metadata=metadata,
    )
    return RayProcess(client, submission_id, bind_host=settings.serve_bind_host)
