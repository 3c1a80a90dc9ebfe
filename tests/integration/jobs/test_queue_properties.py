"""Property: whatever the interleaving of worker, API and reaper actions, no job ever moves along an edge the state
table (`store/states.TRANSITIONS`) forbids, and every illegal move asked of the store raises.

A hypothesis state machine drives two workers (each with its own fake executor) over one SQLite database: API
creates and cancels, worker ticks, reaper passes, a lease that looks expired to everyone but its holder, a worker
that stalls past its lease, a worker that dies and is replaced (on the same host, its runs still alive and
adoptable, or elsewhere, out of sight), and direct store calls with random source and target states. A test-only
trigger logs every real status change of the `jobs` table; after every step the log, the leases, the secrets, the
attempts and the runs the workers hold are checked against what the design promises, and at the end every job is
driven to a terminal state.

Time is real, except that rules move heartbeats into the past with a raw UPDATE (test manipulation of the clock);
"stalls" also moves the stalled worker's own last renewal back, as if the worker had been paused that long.
"""

from __future__ import annotations

import shutil
import tempfile
import time

import msgspec
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test
from sqlalchemy import select, text

from tuneforge.errors import InvalidRequestError
from tuneforge.jobs import queue
from tuneforge.jobs.executors.base import Handle
from tuneforge.jobs.executors.fake import FakeExecutor
from tuneforge.jobs.worker import Worker
from tuneforge.settings import Settings
from tuneforge.storage import BlobStore, open_blob_store
from tuneforge.store import Database, open_database
from tuneforge.store import jobs as repo
from tuneforge.store.states import LEASED, TERMINAL, IllegalTransitionError, JobStatus, can_transition
from tuneforge.store.tables import JobRow
from tuneforge.train.spec import Hyper, ModelSource, TrainSpec, standalone_plan

S = JobStatus
LEASE_S = 1.0
MAX_ATTEMPTS = 2
SECRETS = {"wandb_key": "wandb-secret-123"}
STALL_S = 10.0

# Every status change the database sees, whoever makes it, logged by a trigger (SQLite's and PostgreSQL's dialects).
_LOG_DDL = {
    "sqlite": (
        "CREATE TABLE status_log (job_id TEXT, old TEXT, new TEXT)",
        "CREATE TRIGGER log_status AFTER UPDATE OF status ON jobs WHEN old.status IS NOT new.status "
        "BEGIN INSERT INTO status_log VALUES (new.id, old.status, new.status); END",
    ),
    "postgresql": (
        "CREATE TABLE status_log (job_id TEXT, old TEXT, new TEXT)",
        "CREATE FUNCTION log_status() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "INSERT INTO status_log VALUES (NEW.id, OLD.status, NEW.status); RETURN NEW; END $$",
        "CREATE TRIGGER log_status AFTER UPDATE OF status ON jobs FOR EACH ROW "
        "WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION log_status()",
    ),
}


class ProbeExecutor(FakeExecutor):
    """The fake executor with run ids from its own range (a real handle names its host, so one executor never
    mistakes another's run for its own) and a record of the handles it gave out."""

    def __init__(self, base: int, *, steps: int = 4, step_s: float = 0.03) -> None:
        super().__init__(steps=steps, step_s=step_s)
        self._next = base
        self.handles: list[Handle] = []

    def start(self, spec: TrainSpec, *, spec_path: str, env: dict[str, str]) -> Handle:
        handle = super().start(spec, spec_path=spec_path, env=env)
        self.handles.append(handle)
        return handle

    def running(self, handle: Handle) -> bool:
        """The run lives and nobody asked it to stop."""
        state = self._runs[int(handle["run"])]
        return state["code"] is None and not state["cancel"].is_set()


def _insert(db, job_id: str) -> None:
    """A queued job, the way `jobs.queue.enqueue` leaves one: inserted pending, then moved to queued."""
    now = time.time()
    plan = standalone_plan(ModelSource(name="m", source_kind="local", source="/m"), Hyper(n_epochs=1))
    plan = msgspec.structs.replace(plan, training_file="file-x")
    row = JobRow(
        id=job_id, owner="alice", status="pending", model="m", output_name=f"alice/m-{job_id}",
        training_file="file-x", validation_file=None, request_hash=job_id, error=None, progress={},
        params=plan.to_builtins(), secrets=dict(SECRETS), runner=None, attempt=0,
        created_at=now, updated_at=now, deleted=0,
    )  # fmt: skip
    with db.session() as s:
        repo.insert_job(s, row=row, event_type="job_pending", message="created")
        assert repo.transition(s, job_id=job_id, from_statuses=(S.PENDING,), to_status=S.QUEUED,
                               event_type="job_pending", message="queued")  # fmt: skip


class _Rollback(Exception):
    """Raised to undo a probing store call."""


class QueueMachine(RuleBasedStateMachine):
    jobs = Bundle("jobs")

    def __init__(self) -> None:
        super().__init__()
        self.home = tempfile.mkdtemp(prefix="tf-queue-props-")
        self.settings = Settings(home=self.home, executor="fake", max_attempts=MAX_ATTEMPTS, lease_s=LEASE_S,
                                 cancel_grace_s=0.05)  # fmt: skip
        self.settings.ensure_home()
        self.db = open_database(self.settings.database_url)
        self.blobs = open_blob_store(self.settings.storage_url)
        with self.db.engine.begin() as conn:
            for ddl in _LOG_DDL[self.db.engine.dialect.name]:
                conn.exec_driver_sql(ddl)
        self.executors: list[ProbeExecutor] = []
        self.generation = 0
        self.first_handle: dict[str, int] = {}  # worker id -> index of its first handle in its executor
        self.dead: set[str] = set()
        self.cancel_asked: set[str] = set()
        self.n_jobs = 0
        self.workers = [self._worker("a", self._executor()), self._worker("b", self._executor())]

    def _executor(self) -> ProbeExecutor:
        self.executors.append(ProbeExecutor(base=1000 * (len(self.executors) + 1)))
        return self.executors[-1]

    def _worker(self, name: str, executor: ProbeExecutor) -> Worker:
        self.generation += 1
        worker_id = f"host-{name}:{self.generation}:{name}{self.generation}"
        self.first_handle[worker_id] = len(executor.handles)
        return Worker(self.db, self.blobs, self.settings, executor, worker_id=worker_id)

    def _rows(self) -> list[JobRow]:
        with self.db.session() as s:
            return list(s.scalars(select(JobRow).order_by(JobRow.created_at)))

    def _row(self, job_id: str) -> JobRow:
        with self.db.session() as s:
            return repo.get_job(s, job_id=job_id)

    def _age_heartbeats(self, where: str, **params: str) -> None:
        """Move heartbeats STALL_S into the past (test manipulation of the clock)."""
        with self.db.engine.begin() as conn:
            conn.execute(text(f"UPDATE jobs SET heartbeat_at = heartbeat_at - :d WHERE {where}"),
                         {"d": STALL_S, **params})  # fmt: skip

    # -- the API -----------------------------------------------------------------------------------------
    @initialize(target=jobs)
    def first_job(self) -> str:
        return self.create()

    @rule(target=jobs)
    def create(self) -> str:
        self.n_jobs += 1
        job_id = f"ft-{self.n_jobs}"
        _insert(self.db, job_id)
        return job_id

    @rule(job=jobs, via=st.integers(0, 1))
    def cancel(self, job: str, via: int) -> None:
        before = S(self._row(job).status)
        try:
            row, signal = queue.cancel(self.db, owner="alice", job_id=job)
        except InvalidRequestError:
            assert before in TERMINAL
            return
        self.cancel_asked.add(job)
        expected = S.CANCELLED if before in (S.PENDING, S.QUEUED) else S.CANCEL_REQUESTED
        assert row.status == expected and signal == (before in (S.RUNNING, S.UPLOADING))
        if signal:
            self.workers[via].request_cancel(job)  # the API's server signals its own worker, which may not run it

    # -- workers and reapers -----------------------------------------------------------------------------
    def _tick(self, worker: Worker) -> None:
        """One round of `worker`; then every run it started and did not stop is one it watches (or one the job's new
        holder adopted), and once it has renewed its leases it watches only jobs it holds."""
        renewed_before = worker._renewed_at
        worker.tick()
        rows = {row.id: row for row in self._rows()}
        if worker._renewed_at != renewed_before:
            for job_id in worker.runs:
                assert rows[job_id].lease_owner == worker.worker_id, (job_id, rows[job_id].lease_owner)
        executor = worker.executor
        assert isinstance(executor, ProbeExecutor)
        watched = [run.handle for w in self.workers for run in w.runs.values()]
        for handle in executor.handles[self.first_handle[worker.worker_id] :]:
            if executor.running(handle):
                assert handle in watched, f"{worker.worker_id} left run {handle} alive and unwatched"

    @rule(w=st.integers(0, 1))
    def tick(self, w: int) -> None:
        self._tick(self.workers[w])

    @rule()
    def both_tick(self) -> None:
        for worker in self.workers:
            self._tick(worker)

    @rule(seconds=st.sampled_from([0.002, 0.01, 0.03]))
    def time_passes(self, seconds: float) -> None:
        time.sleep(seconds)  # the runs move on in their threads

    @rule(w=st.integers(0, 1))
    def reap(self, w: int) -> None:
        worker = self.workers[w]
        started = time.time()
        worker.reap()  # (it forgets the runs it lost at its next renewal, in `tick`, not here)
        for row in self._rows():  # every lease that had expired when the reaper looked was taken over
            assert row.lease_owner not in self.dead, (row.id, row.lease_owner)
            if row.lease_owner not in (None, worker.worker_id):
                assert row.heartbeat_at is not None and row.heartbeat_at >= started - LEASE_S, row.id

    @rule(w=st.integers(0, 1))
    def signal_from_outside(self, w: int) -> None:
        """A SIGTERM that no cancel sent (a host shutdown, an operator): the runs checkpoint and report `cancelled`,
        and their jobs must be resumed, not cancelled (the invariants refuse a cancel nobody asked for)."""
        worker = self.workers[w]
        for run in list(worker.runs.values()):
            worker.executor.cancel(run.handle)

    @rule(job=jobs)
    def lease_expires(self, job: str) -> None:
        """The lease of `job` looks expired to the other workers but not to its holder (their clocks disagree, or
        its renewal was slow): the holder may act on a stale view until its next renewal, and its writes carry its
        lease, so they must no longer move the job once another worker took it over."""
        self._age_heartbeats("id = :j AND lease_owner IS NOT NULL", j=job)

    @rule(job=jobs)
    def holder_stalls(self, job: str) -> None:
        """The worker holding `job` is paused past its lease: its heartbeats and its own last renewal age together."""
        owner = self._row(job).lease_owner
        if owner is None:
            return
        self._age_heartbeats("lease_owner = :o", o=owner)
        for worker in self.workers:
            if worker.worker_id == owner:
                worker._renewed_at -= STALL_S

    @rule(w=st.integers(0, 1), same_host=st.booleans())
    def worker_dies(self, w: int, same_host: bool) -> None:
        """The worker's server dies and a new one (new id) takes its place; its leases expire. Restarted on the same
        host it sees the old runs (they survive their server) and can adopt them; elsewhere they are out of sight."""
        old = self.workers[w]
        self.dead.add(old.worker_id)
        executor = old.executor if same_host else self._executor()
        assert isinstance(executor, ProbeExecutor)
        self.workers[w] = self._worker("ab"[w], executor)
        self._age_heartbeats("lease_owner = :o", o=old.worker_id)

    # -- direct store calls ------------------------------------------------------------------------------
    @rule(job=jobs, sources=st.sets(st.sampled_from(list(S)), max_size=3), to=st.sampled_from(list(S)),
          with_lease=st.booleans())  # fmt: skip
    def store_transition(self, job: str, sources: set[S], to: S, with_lease: bool) -> None:
        """Any call of `transition` raises exactly when the table forbids it; otherwise it moves the job iff the job
        is in one of the sources. The probe is rolled back."""
        illegal = not sources or any(not can_transition(src, to) for src in sources)
        illegal = illegal or (with_lease and to not in LEASED)
        extra = {"lease_owner": "host-z:0:probe"} if with_lease else {}
        try:
            with self.db.session() as s:
                before = repo.get_job(s, job_id=job).status
                try:
                    moved = repo.transition(s, job_id=job, from_statuses=tuple(sources), to_status=to,
                                            event_type="job_pending", message="probe", **extra)  # fmt: skip
                except IllegalTransitionError:
                    assert illegal, f"{sources} -> {to} is allowed, yet refused"
                else:
                    assert not illegal, f"{sources} -> {to} is forbidden, yet accepted"
                    assert moved == (before in sources)
                    s.expire_all()
                    assert repo.get_job(s, job_id=job).status == (to if moved else before)
                raise _Rollback
        except _Rollback:
            pass

    @rule(job=jobs, column=st.sampled_from(["status", "lease_owner"]), value=st.sampled_from([*list(S), None]),
          born=st.sampled_from([s for s in S if s != S.PENDING]))  # fmt: skip
    def store_refusals(self, job: str, column: str, value: str | None, born: S) -> None:
        """`update_job` never writes the status or the lease; `insert_job` makes only pending jobs."""
        try:
            with self.db.session() as s:
                repo.update_job(s, job_id=job, **{column: value})
            raise AssertionError(f"update_job wrote {column}")
        except IllegalTransitionError:
            pass
        row = JobRow(id="ft-born-late", owner="alice", status=born.value, model="m", output_name="alice/late",
                     params={}, request_hash="late", progress={}, secrets={}, attempt=0, created_at=time.time(),
                     updated_at=time.time(), deleted=0)  # fmt: skip
        try:
            with self.db.session() as s:
                repo.insert_job(s, row=row, event_type="job_pending", message="created")
            raise AssertionError(f"a job was born {born}")
        except IllegalTransitionError:
            pass

    # -- invariants --------------------------------------------------------------------------------------
    @invariant()
    def every_status_change_is_in_the_table(self) -> None:
        with self.db.engine.connect() as conn:
            edges = {(old, new) for old, new in conn.execute(text("SELECT old, new FROM status_log"))}
        forbidden = [(old, new) for old, new in edges if not can_transition(old, new)]
        assert not forbidden, f"moves the table forbids: {forbidden}"

    @invariant()
    def leases_secrets_and_attempts_agree_with_the_status(self) -> None:
        for row in self._rows():
            status = S(row.status)
            assert (row.lease_owner is not None) == (status in LEASED), (row.id, status, row.lease_owner)
            assert row.attempt <= MAX_ATTEMPTS, (row.id, row.attempt)
            if status in TERMINAL:
                assert row.secrets == {} and row.runner is None and row.finished_at is not None, row.id
                assert status != S.CANCELLED or row.id in self.cancel_asked, f"{row.id} cancelled unasked"
                # the fake's runs never fail: a job fails only once its last attempt was lost
                lost_last = row.attempt == MAX_ATTEMPTS and "unexpectedly" in (row.error or "")
                assert status != S.ERROR or lost_last, (row.id, row.attempt, row.error)
            else:
                opened = self.db.sealer.open(row.secrets)  # stored sealed
                assert opened == SECRETS and row.finished_at is None, row.id  # a resumed run needs them

    @invariant()
    def each_attempt_starts_once_and_the_row_names_its_holders_run(self) -> None:
        started = [(spec.job_id, spec.attempt) for ex in self.executors for spec in ex.started]
        assert len(started) == len(set(started)), f"an attempt started twice: {sorted(started)}"
        rows = {row.id: row for row in self._rows()}
        for worker in self.workers:  # what lets another worker find (and adopt) the run once this one is gone
            for job_id, run in worker.runs.items():
                if rows[job_id].lease_owner == worker.worker_id:
                    assert (rows[job_id].runner or {}).get("handle") == run.handle, (job_id, rows[job_id].runner)

    # -- the end -----------------------------------------------------------------------------------------
    def teardown(self) -> None:
        try:
            for executor in self.executors:
                executor.step_s = 0.001  # the same runs, faster: the queue left over drains in well under a second
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline and any(S(r.status) not in TERMINAL for r in self._rows()):
                for worker in self.workers:
                    worker.tick()
                time.sleep(0.005)
            stuck = {r.id: r.status for r in self._rows() if S(r.status) not in TERMINAL}
            assert not stuck, f"jobs not driven to a terminal state: {stuck}"
            self.every_status_change_is_in_the_table()
            self.leases_secrets_and_attempts_agree_with_the_status()
        finally:
            for executor in self.executors:
                for handle in executor.handles:
                    executor.kill(handle)
                executor.wait_idle(timeout=2)
            self.db.close()
            shutil.rmtree(self.home, ignore_errors=True)


def test_no_interleaving_reaches_a_state_the_table_forbids() -> None:
    run_state_machine_as_test(
        QueueMachine,
        settings=settings(
            max_examples=40,
            stateful_step_count=30,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


# -- bugs the machine found, pinned down without timing -------------------------------------------------------
# Each test asserts the behaviour the design promises, and fails today.


def _env(tmp_path, **overrides: float) -> tuple[Settings, Database, BlobStore]:
    settings = Settings(home=tmp_path / "home", executor="fake", max_attempts=MAX_ATTEMPTS, **overrides)
    settings.ensure_home()
    return settings, open_database(settings.database_url), open_blob_store(settings.storage_url)


def _expire_every_lease(db) -> None:
    with db.engine.begin() as conn:
        conn.execute(text("UPDATE jobs SET heartbeat_at = heartbeat_at - :d"), {"d": 1000.0})


def _not_stranded(worker: Worker, job_id: str) -> None:
    """The job is either out of the leased states or watched by the worker that holds it (which renews its lease);
    and it is not `cancelled`, which only a user's request may lead to."""
    with worker.db.session() as s:
        job = repo.get_job(s, job_id=job_id)
    assert S(job.status) not in LEASED or (job.lease_owner == worker.worker_id and job_id in worker.runs), (
        f"{job_id} left {job.status} under {job.lease_owner}, watched by nobody"
    )
    assert job.status != S.CANCELLED


# Regressions the machine found (each minimised to a fixed sequence):
#
# 1. A SIGTERM from outside the API (a host shutdown, an operator, a container stop) made the trainer checkpoint and
#    report `cancelled` while its job was still `running`; the worker then asked the store for running -> cancelled,
#    which the table forbids, and the IllegalTransitionError left the job running under a lease nobody renewed (or
#    stopped the next server's start). Such a run is now resumed like any interrupted one (the machine's
#    `signal_from_outside` rule). Minimal interleaving: first_job(); both_tick(); signal_from_outside(w=0); both_tick().


def test_a_run_stopped_from_outside_does_not_crash_its_worker(tmp_path) -> None:
    settings, db, blobs = _env(tmp_path)
    executor = FakeExecutor(steps=1000, step_s=0.01)
    worker = Worker(db, blobs, settings, executor, worker_id="host-a:1:a")
    _insert(db, "ft-sig")
    worker.tick()
    executor.cancel(worker.runs["ft-sig"].handle)  # SIGTERM from the host: checkpoint, report `cancelled`, exit 0
    executor.wait_idle()
    worker.tick()  # raised IllegalTransitionError; the job stayed running under a lease nobody renewed
    _not_stranded(worker, "ft-sig")
    with db.session() as s:
        events = [(e.type, e.message) for e in repo.list_events(s, job_id="ft-sig")]
    restarted = [m for t, m in events if t == "job_restarted"]  # resumed from its checkpoint (and claimed again)
    assert len(restarted) == 1 and "stopped from outside (not by a cancel)" in restarted[0], events


def test_a_run_stopped_from_outside_does_not_stop_the_next_server_from_starting(tmp_path) -> None:
    settings, db, blobs = _env(tmp_path)
    executor = FakeExecutor(steps=1000, step_s=0.01)
    first = Worker(db, blobs, settings, executor, worker_id="host-a:1:a")
    _insert(db, "ft-sig")
    first.tick()
    executor.cancel(first.runs["ft-sig"].handle)  # the shutdown's SIGTERM reaches the trainer; the server is gone
    executor.wait_idle()
    _expire_every_lease(db)
    second = Worker(db, blobs, settings, FakeExecutor(steps=4, step_s=0.001), worker_id="host-a:2:a")
    second.recover()  # what `Worker.start` runs first: it raised, so the server could not start
    _not_stranded(second, "ft-sig")


# 2. A reaper that took over a job it still had a stale run of forgot that run without stopping it (`_adopt` ended the
#    taken-over run through `_finish`, which dropped the reaper's own, older run of the job), then started another:
#    two runs trained one job. Interleaving: first_job(); tick(w=1); lease_expires(job=jobs_0); reap(w=0); tick(w=0);
#    lease_expires(job=jobs_0); reap(w=1); tick(w=1) -> "host-b left run 2000 alive and unwatched".


def test_a_reaper_does_not_forget_its_own_stale_run_of_the_job_it_takes_over(tmp_path) -> None:
    settings, db, blobs = _env(tmp_path, lease_s=30.0)  # no renewal falls due during the test: the views stay stale
    a = Worker(db, blobs, settings, ProbeExecutor(1000, steps=1000, step_s=0.01), worker_id="host-a:1:a")
    b_executor = ProbeExecutor(2000, steps=1000, step_s=0.01)
    b = Worker(db, blobs, settings, b_executor, worker_id="host-b:2:b")
    try:
        _insert(db, "ft-twice")
        b.tick()  # b runs attempt 1
        first = b.runs["ft-twice"].handle
        _expire_every_lease(db)  # b's lease looks expired to a (clocks apart, or b's tick slower than its lease) ...
        a.reap()  # ... so a takes the job over and requeues it; b has not renewed yet, so it still watches its run
        a.tick()  # a runs attempt 2
        _expire_every_lease(db)  # now a's lease looks expired to b ...
        b.reap()  # ... whose reaper takes the job over from a
        b.tick()
        watched = [run.handle for run in b.runs.values()]
        assert first in watched or not b_executor.running(first), "b forgot its first run of the job, still training"
    finally:
        for executor in (a.executor, b_executor):
            assert isinstance(executor, ProbeExecutor)
            for handle in executor.handles:
                executor.kill(handle)
