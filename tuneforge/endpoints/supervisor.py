"""The lifecycle of dedicated endpoints: one supervisor thread that starts, watches, scales and stops each
endpoint's replicas (model-server processes of the serving engine, launched through the serving pool so that they
share its memory budget), and moves the endpoint's state through the store's state table.

Every half second the supervisor reads the endpoints from the store and acts on each by its state:
- PENDING: resolve its model (a LoRA output is served as an adapter on its base; a full fine-tune or a catalog
  model as itself) -> STARTING, or ERROR with a reason a user can act on.
- STARTING / STARTED: keep `target` replicas running (min_replicas, raised by autoscaling up to max_replicas).
  A replica that dies is dropped and started again after a backoff (1, 2, 4 ... 30 s between failed starts);
  STARTING -> STARTED once min_replicas are ready; after `MAX_START_FAILURES` failed starts in a row with no
  replica ready -> ERROR with the model server's last log lines.
  Autoscaling: when the requests in flight per ready replica stay above `endpoint_scale_up_load` for
  `endpoint_scale_up_after_s`, one replica more (up to max_replicas); when every replica has been idle for
  `endpoint_scale_down_idle_s`, one less (down to min_replicas).
  `inactive_timeout` (minutes): no request for that long -> STOPPING -> STOPPED.
- STOPPING: replicas stopped -> STOPPED. STOPPED / ERROR / deleted: no replicas.
After a server restart the endpoints that were live are started again (STARTED -> STARTING -> STARTED).

Requests take a replica with `acquire` (least outstanding requests among the ready ones; while none is ready,
e.g. just after a replica was killed, it waits for one up to the start timeout) and give it back with the pool's
`release`. Replicas run where the pool runs them: here, processes on this host; the scale-out issue puts the same
calls on a cluster.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tuneforge.catalog.source import ModelSource
from tuneforge.errors import TuneForgeError
from tuneforge.serve import hardware
from tuneforge.serve.pool import ModelProcess, ModelServerPool, PoolError
from tuneforge.settings import Settings
from tuneforge.store import Database
from tuneforge.store import endpoints as repo
from tuneforge.store.endpoint_states import EndpointState
from tuneforge.store.tables import EndpointRow

log = logging.getLogger(__name__)

MAX_START_FAILURES = 5
TICK_S = 0.5
MINUTE_S = 60.0  # inactive_timeout is in minutes (the hosted service's unit)


@dataclass(frozen=True)
class Served:
    """What an endpoint's replicas host: a model server for `base`, the adapter (if any) to name there, and the
    memory one replica needs."""

    base: ModelSource
    adapter_name: str | None
    memory: int


# (owner, model) -> what to serve; raises TuneForgeError for a model that can't be served (not found, not ready)
Resolver = Callable[[str, str], Served]


def unavailable_message(row: EndpointRow) -> str:
    """What a request to a stopped (or failed) endpoint is told: why, and how to start it."""
    if row.state == EndpointState.ERROR:
        return (f"endpoint {row.name} is in ERROR ({row.error}); fix the cause and start it again with "
                f"`together endpoints start {row.id}`")  # fmt: skip
    return (f"endpoint {row.name} is {row.state}: start it with `together endpoints start {row.id}` "
            f"(PATCH /v1/endpoints/{row.id} {{\"state\": \"STARTED\"}})")  # fmt: skip


class EndpointUnavailable(TuneForgeError):
    status_code = 503
    error_type = "server_error"


@dataclass(eq=False)
class _Live:
    id: str
    served: Served
    target: int  # replicas wanted now: min_replicas, raised by autoscaling
    replicas: list[ModelProcess] = field(default_factory=list)
    counter: int = 0  # names replica processes
    failures: int = 0  # failed starts in a row
    retry_at: float = 0.0
    last_request: float = field(default_factory=time.monotonic)
    pressure_since: float | None = None


def backoff(failures: int) -> float:
    return 0.0 if failures <= 0 else min(30.0, float(2 ** (failures - 1)))


class EndpointSupervisor:
    def __init__(
        self, db: Database, pool: ModelServerPool, settings: Settings, resolve: Resolver,
        hardware_options: Callable[[], list[hardware.HardwareOption]] = hardware.probe,
    ) -> None:  # fmt: skip
        self.db = db
        self.hardware_options = hardware_options  # the listing the API shows (app.state.hardware)
        self.pool = pool
        self.settings = settings
        self.resolve = resolve
        self._lock = threading.Lock()
        self._live: dict[str, _Live] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # -- life --------------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Take over the endpoints that were live when the server last stopped, then supervise."""
        with self.db.session() as s:
            for row in repo.list_endpoints(s):
                if row.state == EndpointState.STARTED:
                    repo.transition(s, endpoint_id=row.id, from_states=(row.state,), to_state=EndpointState.STARTING,
                                    event_type="endpoint_restarting",
                                    message="the server restarted: starting the endpoint's replicas again")  # fmt: skip
        self._thread = threading.Thread(target=self._loop, name="endpoint-supervisor", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        """Stop supervising and stop every replica; the endpoints' states stay as they are (a restarted server
        starts the live ones again)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._lock:
            replicas = [r for live in self._live.values() for r in live.replicas]
            self._live.clear()
        for r in replicas:
            self.pool.stop_replica(r)

    def wake(self) -> None:
        """Act now (after a create or an update) rather than at the next tick."""
        self._wake.set()

    # -- requests ----------------------------------------------------------------------------------------------

    def acquire(self, endpoint_id: str) -> ModelProcess:
        """A ready replica of the endpoint (the one with the fewest requests in flight), held until the pool's
        `release`. While none is ready (starting, or restarting after a crash) waits up to the start timeout."""
        deadline = time.monotonic() + self.settings.serve_start_timeout_s
        while True:
            with self._lock:
                live = self._live.get(endpoint_id)
                if live is not None:
                    live.last_request = time.monotonic()
                    ready = [r for r in live.replicas if r.ready.is_set() and r.alive() and not r.failed]
                    if ready:
                        replica = min(ready, key=lambda r: r.active)
                        self.pool.hold(replica)
                        return replica
            if time.monotonic() > deadline or self._stop.is_set():
                raise EndpointUnavailable(
                    f"endpoint {endpoint_id} has no ready replica after "
                    f"{self.settings.serve_start_timeout_s:g} s; retry later"
                )
            self._wake.set()
            time.sleep(0.05)

    def replicas(self, endpoint_id: str) -> list[ModelProcess]:
        with self._lock:
            live = self._live.get(endpoint_id)
            return list(live.replicas) if live is not None else []

    # -- the loop ----------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # one bad tick must not end supervision
                log.exception("endpoint supervisor tick failed")
            self._wake.wait(TICK_S)
            self._wake.clear()

    def tick(self) -> None:
        with self.db.session() as s:
            rows = {row.id: row for row in repo.list_endpoints(s)}
            s.expunge_all()
        for endpoint_id in list(self._live):
            row = rows.get(endpoint_id)
            if row is None or row.state not in (EndpointState.STARTING, EndpointState.STARTED):
                self._stop_all(endpoint_id)
        for row in rows.values():
            if row.state == EndpointState.PENDING:
                self._begin(row)
            elif row.state in (EndpointState.STARTING, EndpointState.STARTED):
                if row.id not in self._live and not self._begin(row):
                    continue
                self._maintain(row)
            elif row.state == EndpointState.STOPPING:
                self._stop_all(row.id)
                self._move(row, EndpointState.STOPPED, "endpoint_stopped", "the endpoint stopped")

    def _move(self, row: EndpointRow, to: EndpointState, event: str, message: str, **values: Any) -> bool:
        with self.db.session() as s:
            moved = repo.transition(s, endpoint_id=row.id, from_states=(row.state,), to_state=to, event_type=event,
                                    message=message, **values)  # fmt: skip
        if moved:
            log.info("endpoint %s: %s -> %s (%s)", row.id, row.state, to, message)
            row.state = to
        return moved

    def _event(self, row: EndpointRow, event: str, message: str, **data: object) -> None:
        log.info("endpoint %s: %s", row.id, message)
        with self.db.session() as s:
            repo.add_event(s, endpoint_id=row.id, type_=event, message=message, data=dict(data))

    def _fail(self, row: EndpointRow, reason: str) -> None:
        self._stop_all(row.id)
        self._move(row, EndpointState.ERROR, "endpoint_error", reason, error=reason)

    def _begin(self, row: EndpointRow) -> bool:
        """Resolve the endpoint's model and start tracking it (PENDING -> STARTING)."""
        try:
            served = self.resolve(row.owner, row.model)
        except TuneForgeError as exc:
            self._fail(row, f"model {row.model} cannot be served: {exc.message}")
            return False
        with self._lock:
            self._live[row.id] = _Live(id=row.id, served=served, target=max(1, row.min_replicas))
        if row.state == EndpointState.PENDING:
            self._move(row, EndpointState.STARTING, "endpoint_starting",
                       f"starting {max(1, row.min_replicas)} replica(s) of {row.model} on {row.hardware}")  # fmt: skip
        return True

    def _maintain(self, row: EndpointRow) -> None:
        live = self._live[row.id]
        now = time.monotonic()
        dead: list[ModelProcess] = []
        with self._lock:
            for r in list(live.replicas):
                started_too_long = not r.ready.is_set() and now - r.started_at > self.settings.serve_start_timeout_s
                if not r.alive() or r.failed or started_too_long:
                    live.replicas.remove(r)
                    dead.append(r)
        for r in dead:
            was_ready = r.ready.is_set()
            tail = r.log_tail(12)
            self.pool.stop_replica(r)
            live.failures = 1 if was_ready else live.failures + 1
            live.retry_at = now + backoff(live.failures)
            why = r.failed or ("did not start in time" if not was_ready else f"exited ({r.proc.returncode})")
            self._event(row, "replica_failed", f"replica {r.key} {why}; restarting it in {backoff(live.failures):g} s",
                        log_tail=tail)  # fmt: skip
            if live.failures >= MAX_START_FAILURES and not any(x.ready.is_set() for x in live.replicas):
                self._fail(row, f"the model server failed to start {live.failures} times; its log ends:\n{tail}")
                return
        ready = [r for r in live.replicas if self.pool.replica_ready(r)]
        if ready:
            live.failures = 0
        self._autoscale(row, live, ready, now)
        if len(live.replicas) < live.target and now >= live.retry_at:
            self._launch(row, live)
        enough = len(ready) >= max(1, row.min_replicas)
        if (
            row.state == EndpointState.STARTING
            and enough
            and self._move(row, EndpointState.STARTED, "endpoint_started", f"{len(ready)} replica(s) ready")
        ):
            live.last_request = now  # the inactive timeout counts from when it could first answer
        idle = now - live.last_request >= MINUTE_S * (row.inactive_timeout or 0)
        if row.state == EndpointState.STARTED and row.inactive_timeout and idle:
            if any(r.active for r in live.replicas):
                return
            why = f"no request for {row.inactive_timeout} minute(s) (inactive_timeout): stopping"
            if self._move(row, EndpointState.STOPPING, "endpoint_stopping", why):
                self._stop_all(row.id)
                self._move(row, EndpointState.STOPPED, "endpoint_stopped", "the endpoint stopped (inactive)")

    def _autoscale(self, row: EndpointRow, live: _Live, ready: list[ModelProcess], now: float) -> None:
        low, high = max(1, row.min_replicas), max(1, row.min_replicas, row.max_replicas)
        live.target = min(max(live.target, low), high)
        load = sum(r.active for r in ready) / len(ready) if ready else 0.0
        if ready and load > self.settings.endpoint_scale_up_load and live.target < high:
            live.pressure_since = live.pressure_since or now
            if now - live.pressure_since >= self.settings.endpoint_scale_up_after_s:
                live.target += 1
                live.pressure_since = None
                self._event(row, "endpoint_scale_up", f"{load:.1f} requests in flight per replica: "
                            f"scaling up to {live.target} replica(s)", replicas=live.target)  # fmt: skip
            return
        live.pressure_since = None
        if live.target > low and len(ready) == len(live.replicas) and len(ready) > 1:
            idle_for = now - max(r.last_used for r in ready)
            if not any(r.active for r in ready) and idle_for >= self.settings.endpoint_scale_down_idle_s:
                victim = min(ready, key=lambda r: r.last_used)
                with self._lock:
                    live.replicas.remove(victim)
                    live.target -= 1
                self.pool.stop_replica(victim)
                self._event(row, "endpoint_scale_down",
                            f"idle for {idle_for:.0f} s: scaled down to {live.target} replica(s)",
                            replicas=live.target)  # fmt: skip

    def _launch(self, row: EndpointRow, live: _Live) -> None:
        live.counter += 1
        key = f"{row.id}-r{live.counter}"
        try:
            replica = self.pool.launch_replica(key, live.served.base, live.served.memory, devices=self._devices(row))
        except PoolError as exc:
            if row.state == EndpointState.STARTING and not live.replicas:
                self._fail(row, exc.message)
            else:
                live.target = max(len(live.replicas), max(1, row.min_replicas))
                live.retry_at = time.monotonic() + 30.0
                self._event(row, "endpoint_scale_refused", exc.message)
            return
        with self._lock:
            live.replicas.append(replica)

    def _devices(self, row: EndpointRow) -> str | None:
        """The GPUs a replica on this endpoint's hardware may see ("" for the CPU; None: not on this host)."""
        option = hardware.find(row.hardware, self.hardware_options())
        return option.devices if option is not None else None

    def _stop_all(self, endpoint_id: str) -> None:
        with self._lock:
            live = self._live.pop(endpoint_id, None)
        for r in live.replicas if live is not None else []:
            self.pool.stop_replica(r)
