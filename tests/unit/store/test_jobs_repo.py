"""Job rows: conditional transitions with their events, claiming, queue depth, per-owner lookups."""

import time

import pytest

from tuneforge.errors import NotFoundError
from tuneforge.store import jobs as repo
from tuneforge.store import open_database
from tuneforge.store.tables import JobRow


def _enqueue(s, row: JobRow) -> None:
    repo.insert_job(s, row=row, event_type="job_pending", message="x")
    assert repo.transition(s, job_id=row.id, from_statuses=("pending",), to_status="queued", event_type="job_pending",
                           message="queued")  # fmt: skip


def _job(job_id: str, owner: str = "alice", status: str = "pending", created: float | None = None) -> JobRow:
    now = created or time.time()
    return JobRow(
        id=job_id, owner=owner, status=status, model="m", output_name=f"{owner}/m-{job_id}", training_file="file-1",
        validation_file=None, params={}, request_hash="h", error=None, progress={}, secrets={"wandb_key": "x"},
        runner=None, attempt=0, created_at=now, updated_at=now, deleted=0,
    )  # fmt: skip


@pytest.fixture
def db(tmp_path):
    return open_database(f"sqlite:///{tmp_path / 'db.sqlite'}")


def test_transition_is_conditional_and_records_an_event(db):
    with db.session() as s:
        repo.insert_job(s, row=_job("ft-1", status="pending"), event_type="job_pending", message="created")
    with db.session() as s:
        assert repo.transition(s, job_id="ft-1", from_statuses=("pending",), to_status="queued",
                               event_type="job_queued", message="queued")  # fmt: skip
        # A second writer that still believes the job is pending loses, and writes no event.
        assert not repo.transition(s, job_id="ft-1", from_statuses=("pending",), to_status="error",
                                   event_type="job_error", message="x")  # fmt: skip
    with db.session() as s:
        assert repo.get_job(s, job_id="ft-1").status == "queued"
        assert [e.type for e in repo.list_events(s, job_id="ft-1")] == ["job_pending", "job_queued"]


def test_claim_takes_the_oldest_and_queue_depth_counts_ahead(db):
    t = time.time()
    with db.session() as s:
        for i, job_id in enumerate(["ft-b", "ft-a", "ft-c"]):
            _enqueue(s, _job(job_id, created=t + i))
    with db.session() as s:
        assert repo.next_queued(s).id == "ft-b"
        assert repo.queue_depth(s, created_at=t + 2) == 2
        assert repo.queue_depth(s, created_at=t) == 0


def test_other_owners_and_deleted_jobs_are_not_found(db):
    with db.session() as s:
        _enqueue(s, _job("ft-1"))
    with db.session() as s:
        assert repo.get_job(s, job_id="ft-1", owner="alice").id == "ft-1"
        with pytest.raises(NotFoundError):
            repo.get_job(s, job_id="ft-1", owner="bob")
        repo.update_job(s, job_id="ft-1", deleted=1)
    with db.session() as s, pytest.raises(NotFoundError):
        repo.get_job(s, job_id="ft-1")


def test_metrics_filter_by_step(db):
    with db.session() as s:
        for step in range(1, 6):
            repo.add_metric(s, job_id="ft-1", step=step, values={"train/loss": 1.0 / step}, logged_at=step)
    with db.session() as s:
        rows = repo.list_metrics(s, job_id="ft-1", step_from=2, step_to=4)
        assert [r.step for r in rows] == [2, 3, 4]
