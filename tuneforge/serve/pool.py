"""The serverless pool: model-server processes (`python -m tuneforge.serve`), one per base model, started on first
use, stopped when idle, and all kept under one memory budget (torch-free: the API process runs it).

Each process hosts one base model (a catalog model, or a full fine-tune's own weights) and the LoRA adapters of that
base that requests name; the pool only starts, health-checks and stops processes and tells a caller where one
listens. A process that dies is noticed at the next request for it (or by the idle sweep) and started again. A
process gets an explicit environment (`settings.child_environment`), its own log file in `<home>/logs/`, and the
server's thread setting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tuneforge.catalog.source import ModelSource, safe_name
from tuneforge.serve.backends import launch_command
from tuneforge.serve.placement import LOOPBACK, ServerProcess, start_local, start_on_ray
from tuneforge.settings import Settings

log = logging.getLogger("tuneforge.serve.pool")


class PoolError(Exception):
    """A model server could not be had: it failed to start, or the memory budget cannot hold it."""

    def __init__(self, message: str, status_code: int = 503) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code


@dataclass
class ModelProcess:
    key: str
    source: ModelSource
    port: int
    proc: ServerProcess  # a child process, or a Ray job (`serve/placement.py`)
    log_path: Path
    memory: int
    started_at: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    active: int = 0
    ready: threading.Event = field(default_factory=threading.Event)
    failed: str | None = None
    # The LoRA adapter names this process answered a load of (kept by the API's proxy, on its event loop): a request
    # for one of them is sent without loading it again. A replacement process starts with none, so loads them anew.
    adapters: set[str] = field(default_factory=set)
    # Held while loading an adapter not yet in `adapters`, so that concurrent first requests load it once.
    adapter_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def url(self) -> str:
        # A server placed by Ray is reached at its node's address, known once Ray has started it.
        return f"http://{self.proc.host or LOOPBACK}:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def estimate_memory(source: ModelSource, folder_bytes: int | None) -> int:
    """What a model server of this model needs: its weights (at most fp32, so twice a bf16 file) plus working
    memory; a model not yet on disk counts as its file size, or 1 GiB when that is unknown too."""
    weights = folder_bytes if folder_bytes else 1 << 30
    return 2 * weights + (256 << 20)


class ModelServerPool:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._servers: dict[str, ModelProcess] = {}  # serverless: one per model, started on first use
        self._replicas: dict[str, ModelProcess] = {}  # dedicated endpoints' replicas (endpoints/supervisor.py)
        self._stop = threading.Event()
        self._sweeper: threading.Thread | None = None

    # -- life --------------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._sweeper = threading.Thread(target=self._sweep_loop, name="serve-pool-sweeper", daemon=True)
        self._sweeper.start()

    def shutdown(self) -> None:
        self._stop.set()
        with self._lock:
            servers = [*self._servers.values(), *self._replicas.values()]
            self._servers.clear()
            self._replicas.clear()
        for server in servers:
            self._terminate(server)

    # -- use ---------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def using(self, source: ModelSource, *, size_hint: int | None = None) -> Iterator[ModelProcess]:
        """A ready model server for `source`, held in use (not stopped as idle) while the block runs."""
        server = self.acquire(source, size_hint=size_hint)
        try:
            yield server
        finally:
            self.release(server)

    def release(self, server: ModelProcess) -> None:
        """The end of one use of `acquire`: the server may stop once idle."""
        with self._lock:
            server.active -= 1
            server.last_used = time.monotonic()

    def acquire(self, source: ModelSource, *, size_hint: int | None = None) -> ModelProcess:
        key = source.name
        with self._lock:
            server = self._servers.get(key)
            if server is not None and (not server.alive() or server.failed):
                self._servers.pop(key)
                self._terminate(server)
                server = None
            if server is None:
                server = self._launch(key, source, estimate_memory(source, size_hint))
            server.active += 1
            server.last_used = time.monotonic()
        try:
            self._wait_ready(server)
        except PoolError:
            with self._lock:
                server.active -= 1
                if self._servers.get(key) is server:
                    self._servers.pop(key)
            self._terminate(server)
            raise
        return server

    def servers(self) -> list[ModelProcess]:
        with self._lock:
            return list(self._servers.values())

    # -- dedicated replicas --------------------------------------------------------------------------------------
    # An endpoint's replicas count against the same memory budget as the serverless servers, and may push idle
    # serverless servers out; they are never stopped as idle here (their endpoint's supervisor decides).

    def launch_replica(self, key: str, source: ModelSource, memory: int, *, devices: str | None = None) -> ModelProcess:
        """Start a replica process (not waiting for it to be ready: see `replica_ready`). PoolError (507) when the
        budget cannot hold it."""
        with self._lock:
            return self._launch(key, source, memory, replica=True, devices=devices)

    def replica_ready(self, server: ModelProcess) -> bool:
        """One quick health check of a starting replica (True once it answered); False while it starts."""
        if server.ready.is_set():
            return True
        if not server.alive():
            server.failed = server.failed or f"exited with code {server.proc.returncode}"
            return False
        try:
            if httpx.get(f"{server.url}/health", timeout=1).status_code == 200:
                server.ready.set()
        except httpx.HTTPError:
            pass
        return server.ready.is_set()

    def hold(self, server: ModelProcess) -> None:
        """The start of one use of a replica (its end is `release`)."""
        with self._lock:
            server.active += 1
            server.last_used = time.monotonic()

    def stop_replica(self, server: ModelProcess) -> None:
        with self._lock:
            if self._replicas.get(server.key) is server:
                self._replicas.pop(server.key)
        self._terminate(server)

    def reserved_bytes(self) -> int:
        """Memory held by running replicas."""
        with self._lock:
            return sum(s.memory for s in self._replicas.values())

    # -- inside ------------------------------------------------------------------------------------------------

    def _launch(
        self, key: str, source: ModelSource, memory: int, *, replica: bool = False, devices: str | None = None
    ) -> ModelProcess:
        """Start a process (the caller holds the lock), first stopping idle serverless ones while the budget
        cannot hold it."""
        budget = self.settings.serve_memory_bytes
        if memory > budget:
            raise PoolError(
                f"model {source.name} needs about {memory >> 20} MiB to serve, more than the serving budget of "
                f"{budget >> 20} MiB (TUNEFORGE_SERVE_MEMORY_BYTES)",
                status_code=507,
            )
        while self._used() + memory > budget:
            idle = [s for s in self._servers.values() if s.active == 0]
            if not idle:
                replicas = sum(s.memory for s in self._replicas.values())
                raise PoolError(
                    f"the serving budget ({budget >> 20} MiB, TUNEFORGE_SERVE_MEMORY_BYTES) is in use by busy model "
                    f"servers ({self._used() >> 20} MiB, {replicas >> 20} MiB of it by dedicated endpoint replicas); "
                    f"model {source.name} needs about {memory >> 20} MiB"
                    + ("" if replica else ": retry when they are idle"),
                    status_code=507 if replica else 503,
                )
            victim = min(idle, key=lambda s: s.last_used)
            log.info("stopping model server %s (least recently used) to make room for %s", victim.key, key)
            self._servers.pop(victim.key)
            self._terminate(victim)
        logs = self.settings.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"serve-{safe_name(key)}.log"
        port = _free_port()
        command, env = launch_command(self.settings, source, port, devices=devices)
        proc: ServerProcess
        if self.settings.executor == "ray":  # the cluster places it, with the memory and GPUs it needs
            gpus = len([d for d in (devices or "").split(",") if d.strip()])
            proc = start_on_ray(self.settings, command, env, log_path, memory=memory, gpus=gpus)
            where = f"Ray job {proc.submission_id}"
        else:
            proc = start_local(command, env, log_path)
            where = f"pid {proc.pid}"
        server = ModelProcess(key=key, source=source, port=port, proc=proc, log_path=log_path, memory=memory)
        (self._replicas if replica else self._servers)[key] = server
        log.info("started model server for %s on port %d (%s)", key, port, where)
        return server

    def _used(self) -> int:
        return sum(s.memory for s in self._servers.values()) + sum(s.memory for s in self._replicas.values())

    def _wait_ready(self, server: ModelProcess) -> None:
        deadline = time.monotonic() + self.settings.serve_start_timeout_s
        while not server.ready.is_set():
            if not server.alive():
                server.failed = f"exited with code {server.proc.returncode}"
                raise PoolError(
                    f"the model server for {server.key} failed to start ({server.failed}); its log ends:\n"
                    f"{server.log_tail()}",
                    status_code=500,
                )
            if time.monotonic() > deadline:
                server.failed = "did not start in time"
                raise PoolError(
                    f"the model server for {server.key} did not answer within "
                    f"{self.settings.serve_start_timeout_s:g} s (TUNEFORGE_SERVE_START_TIMEOUT_S)"
                )
            try:
                if httpx.get(f"{server.url}/health", timeout=1).status_code == 200:
                    server.ready.set()
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)

    def _terminate(self, server: ModelProcess) -> None:
        if server.proc.poll() is None:
            server.proc.terminate()
            try:
                server.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.proc.kill()
                server.proc.wait(timeout=10)

    def _sweep_loop(self) -> None:
        idle_s = self.settings.serve_idle_s
        while not self._stop.wait(max(0.05, min(idle_s / 4, 10.0))):
            now = time.monotonic()
            with self._lock:
                gone = [
                    s for s in self._servers.values()
                    if s.active == 0 and (now - s.last_used > idle_s or not s.alive())
                ]  # fmt: skip
                for s in gone:
                    self._servers.pop(s.key)
            for s in gone:
                log.info("stopping idle model server %s", s.key)
                self._terminate(s)
