"""The worker against real SQLite and a scripted executor: every job ends in exactly one terminal state."""

from __future__ import annotations

import socket
import time

import msgspec
import pytest
from sqlalchemy.exc import OperationalError

from tuneforge.jobs import queue
from tuneforge.jobs.executors.fake import FakeExecutor
from tuneforge.jobs.worker import Worker
from tuneforge.settings import Settings
from tuneforge.storage import open_blob_store
from tuneforge.store import jobs as repo
from tuneforge.store import open_database
from tuneforge.store.tables import JobRow
from tuneforge.train.spec import Hyper, ModelSource, standalone_plan


def _insert(db, job_id: str, created: float | None = None) -> None:
    """A queued job, the way `jobs.queue.enqueue` leaves one: inserted pending, then moved to queued."""
    now = created or time.time()
    plan = standalone_plan(ModelSource(name="m", source_kind="local", source="/m"), Hyper(n_epochs=2))
    plan = msgspec.structs.replace(plan, training_file="file-x")
    row = JobRow(
        id=job_id, owner="alice", status="pending", model="m", output_name=f"alice/m-{job_id}",
        training_file="file-x", validation_file=None, request_hash=job_id, error=None, progress={},
        params=plan.to_builtins(), secrets={"wandb_key": "wandb-secret-123"}, runner=None, attempt=0,
        created_at=now, updated_at=now, deleted=0,
    )  # fmt: skip
    with db.session() as s:
        repo.insert_job(s, row=row, event_type="job_pending", message="created")
        assert repo.transition(s, job_id=job_id, from_statuses=("pending",), to_status="queued",
                               event_type="job_pending", message="queued")  # fmt: skip


def _drive(worker: Worker, job_id: str, timeout: float = 10) -> JobRow:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        worker.tick()
        with worker.db.session() as s:
            job = repo.get_job(s, job_id=job_id)
        if job.status in ("completed", "cancelled", "error", "user_error"):
            return job
        time.sleep(0.01)
    raise AssertionError(f"job stuck in {job.status}")


@pytest.fixture
def env(tmp_path):
    settings = Settings(home=tmp_path / "home", executor="fake", max_attempts=2, cancel_grace_s=5)
    settings.ensure_home()
    db = open_database(settings.database_url)
    blobs = open_blob_store(settings.storage_url)
    return settings, db, blobs


def test_a_job_runs_to_completion_with_its_events_metrics_and_checkpoints(env):
    settings, db, blobs = env
    executor = FakeExecutor(steps=6)
    worker = Worker(db, blobs, settings, executor)
    _insert(db, "ft-1")
    job = _drive(worker, "ft-1")
    assert job.status == "completed" and job.attempt == 1 and job.runner is None
    assert job.secrets == {}  # kept only while a run may still need them
    with db.session() as s:
        types = [e.type for e in repo.list_events(s, job_id="ft-1")]
        assert types == ["job_pending", "job_pending", "job_start", "training_start", "model_uploading", "job_complete"]
        assert [m.step for m in repo.list_metrics(s, job_id="ft-1")] == [1, 2, 3, 4, 5, 6]
        checkpoints = [(c.step, c.kind) for c in repo.list_checkpoints(s, job_id="ft-1")]
        assert checkpoints == [(3, "intermediate"), (6, "final")]
    assert job.progress["steps_completed"] == 6 and job.progress["total_steps"] == 6
    spec = executor.started[0]
    assert spec.hyper.n_epochs == 2 and spec.training_file_key == "files/file-x"
    assert b"wandb-secret-123" not in spec.to_json()  # secrets travel in the environment only
    assert blobs.exists("jobs/ft-1/spec.json")


def test_cancel_stops_a_running_job(env):
    settings, db, blobs = env
    worker = Worker(db, blobs, settings, FakeExecutor(steps=1000, step_s=0.01))
    _insert(db, "ft-c")
    worker.tick()
    with db.session() as s:
        assert repo.transition(s, job_id="ft-c", from_statuses=("running",), to_status="cancel_requested",
                               event_type="cancel_requested", message="cancel")  # fmt: skip
    worker.request_cancel("ft-c")
    job = _drive(worker, "ft-c")
    assert job.status == "cancelled"
    assert job.progress.get("steps_completed", 0) < 1000


def test_a_failing_run_ends_in_error_with_its_reason(env):
    settings, db, blobs = env
    worker = Worker(db, blobs, settings, FakeExecutor(steps=5, fail_at=2))
    _insert(db, "ft-e")
    job = _drive(worker, "ft-e")
    assert job.status == "error" and "scripted failure at step 2" in job.error
    assert job.secrets == {}


class DyingExecutor(FakeExecutor):
    """Runs die (exit -9) without a result after writing a checkpoint, like a SIGKILLed trainer."""

    def poll(self, handle):
        code = super().poll(handle)
        return -9 if code is not None else None

    def _play(self, spec, state):
        from tuneforge.train.events import EventWriter

        out = EventWriter(spec.events_path)
        out.progress(2, 10)
        out.checkpoint(2, f"{spec.output_prefix}/checkpoints/step-000002")
        state["code"] = -9


def test_a_dead_run_is_resumed_from_its_checkpoint_then_given_up(env):
    settings, db, blobs = env
    executor = DyingExecutor()
    worker = Worker(db, blobs, settings, executor)
    _insert(db, "ft-d")
    job = _drive(worker, "ft-d")
    assert job.status == "error" and "stopped unexpectedly" in job.error and job.attempt == 2
    assert executor.started[0].resume is None
    assert executor.started[1].resume is not None and executor.started[1].resume.step == 2
    with db.session() as s:
        assert "job_restarted" in [e.type for e in repo.list_events(s, job_id="ft-d")]


def test_one_slot_runs_jobs_in_order(env):
    settings, db, blobs = env
    executor = FakeExecutor(steps=3)
    worker = Worker(db, blobs, settings, executor)
    t = time.time()
    _insert(db, "ft-a", created=t)
    _insert(db, "ft-b", created=t + 1)
    worker.tick()
    with db.session() as s:
        assert repo.get_job(s, job_id="ft-a").status == "running"
        assert repo.get_job(s, job_id="ft-b").status == "queued"
        assert repo.queue_depth(s, created_at=t + 1) == 0
    assert _drive(worker, "ft-b").status == "completed"
    assert [spec.job_id for spec in executor.started] == ["ft-a", "ft-b"]


def test_after_a_restart_orphaned_runs_are_resumed(env):
    settings, db, blobs = env
    first = Worker(db, blobs, settings, DyingExecutor(), worker_id=f"{socket.gethostname()}:999999999:dead")
    _insert(db, "ft-r")
    first.tick()  # started; the "server" now goes away (its pid does not exist) without seeing the run end
    with db.session() as s:
        assert repo.get_job(s, job_id="ft-r").lease_owner == first.worker_id
    second = Worker(db, blobs, settings, FakeExecutor(steps=4))
    second.recover()
    job = _drive(second, "ft-r")
    assert job.status == "completed" and job.lease_owner is None


def test_a_live_workers_job_is_left_alone_until_its_lease_expires(env):
    settings, db, blobs = env
    settings = settings.model_copy(update={"lease_s": 0.5})
    first = Worker(db, blobs, settings, FakeExecutor(steps=10_000, step_s=0.01))
    _insert(db, "ft-l")
    first.tick()
    second = Worker(db, blobs, settings, FakeExecutor(steps=2))
    second.reap()
    with db.session() as s:
        assert repo.get_job(s, job_id="ft-l").lease_owner == first.worker_id  # renewed: not taken
    time.sleep(0.7)  # the first worker stops renewing (a paused process): its lease expires
    second.reap()  # its run can't be adopted from here (another executor): requeued from its checkpoint
    with db.session() as s:
        job = repo.get_job(s, job_id="ft-l")
        assert job.status == "queued" and job.lease_owner is None
        assert repo.list_events(s, job_id="ft-l")[-1].type == "job_restarted"
    second.tick()  # and claimed again, by the second worker
    first.tick()  # the first worker sees it lost the job and stops its run, which must not train it twice
    assert "ft-l" not in first.runs and first.executor.started and not second.runs["ft-l"].cancel_sent_at
    first.executor.wait_idle()  # its run was stopped: it would run 10,000 steps otherwise
    with db.session() as s:
        assert not repo.update_job(s, job_id="ft-l", held_by=first.worker_id, progress={"x": 1})
    assert _drive(second, "ft-l").status == "completed"
    assert [spec.job_id for spec in second.executor.started] == ["ft-l"]


def test_a_run_that_finishes_while_its_cancel_is_on_the_way_ends_cancelled(env):
    settings, db, blobs = env
    executor = FakeExecutor(steps=2)
    worker = Worker(db, blobs, settings, executor)
    _insert(db, "ft-u")
    worker.tick()
    executor.wait_idle()  # the run has written its `completed` result, not yet read
    with db.session() as s:
        assert repo.transition(s, job_id="ft-u", from_statuses=("running",), to_status="cancel_requested",
                               event_type="cancel_requested", message="cancel")  # fmt: skip
    job = _drive(worker, "ft-u")
    assert job.status == "cancelled"
    with db.session() as s:
        events = repo.list_events(s, job_id="ft-u")
    assert events[-1].type == "job_stopped" and "training completed before the cancel arrived" in events[-1].message
    stamps = [e.created_at for e in events]
    assert stamps == sorted(stamps)


def test_a_run_whose_end_could_not_be_recorded_is_ended_by_the_next_reap(env, monkeypatch):
    """The database refuses the write that ends a job (locked, gone for a moment): the job stays leased to the worker
    that no longer watches its run, and the worker's own reaper picks it up and ends it, once."""
    settings, db, blobs = env
    worker = Worker(db, blobs, settings, FakeExecutor(steps=3))
    _insert(db, "ft-o")
    real_finish = queue.finish
    failures = []

    def flaky_finish(*args, **kwargs):
        if not failures:
            failures.append(1)
            raise OperationalError("UPDATE jobs", {}, Exception("database is locked"))
        return real_finish(*args, **kwargs)

    monkeypatch.setattr(queue, "finish", flaky_finish)
    worker.tick()
    worker.executor.wait_idle()
    with pytest.raises(OperationalError):
        worker.tick()  # the run ended; recording it failed (the worker's loop logs this and goes on)
    with db.session() as s:
        job = repo.get_job(s, job_id="ft-o")
    assert job.status == "uploading" and job.lease_owner == worker.worker_id and "ft-o" not in worker.runs
    worker.reap()
    job = _drive(worker, "ft-o")
    assert job.status == "completed" and failures == [1]
    with db.session() as s:
        types = [e.type for e in repo.list_events(s, job_id="ft-o")]
        assert types.count("job_complete") == 1 and types.count("model_uploading") == 1
        assert [m.step for m in repo.list_metrics(s, job_id="ft-o")] == [1, 2, 3]  # the stream was not read twice
