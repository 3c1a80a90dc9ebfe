"""The job state table, and the store enforcing it: every move the table forbids raises from the store itself and
changes nothing, whoever the caller is."""

import itertools
import time

import pytest

from tuneforge.store import jobs as repo
from tuneforge.store import open_database
from tuneforge.store.states import (
    LEASED,
    LIVE,
    TERMINAL,
    TRANSITIONS,
    IllegalTransitionError,
    JobStatus,
    can_transition,
    sources_of,
)
from tuneforge.store.tables import JobRow


def test_terminal_states_have_no_way_out():
    for status in TERMINAL:
        assert TRANSITIONS[status] == frozenset()


@pytest.mark.parametrize("status", sorted(LIVE))
def test_every_live_state_can_fail_and_be_cancelled(status):
    assert JobStatus.ERROR in TRANSITIONS[status]
    assert TRANSITIONS[status] & {JobStatus.CANCEL_REQUESTED, JobStatus.CANCELLED}


def test_happy_path_and_refusals():
    path = ["pending", "queued", "running", "uploading", "completed"]
    for a, b in itertools.pairwise(path):
        assert can_transition(a, b)
    assert can_transition("running", "queued")  # a dead process goes back to wait for a resume
    assert can_transition("uploading", "queued")  # so does one that died writing its final weights
    assert not can_transition("completed", "running")
    assert not can_transition("queued", "cancel_requested")  # no process to ask: a queued job is cancelled at once
    assert sources_of("uploading") == {JobStatus.RUNNING}


def _row(job_id: str, status: str) -> JobRow:
    now = time.time()
    return JobRow(
        id=job_id, owner="alice", status=status, model="m", output_name=f"alice/m-{job_id}", training_file="file-1",
        validation_file=None, params={}, request_hash="h", error=None, progress={}, secrets={"wandb_key": "k"},
        runner=None, attempt=0, created_at=now, updated_at=now, deleted=0,
        lease_owner="w1" if JobStatus(status) in LEASED else None,
    )  # fmt: skip


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    return open_database(f"sqlite:///{tmp_path_factory.mktemp('states') / 'db.sqlite'}")


@pytest.mark.parametrize(("source", "target"), list(itertools.product(JobStatus, JobStatus)))
def test_the_store_allows_exactly_the_tables_moves(db, source, target):
    job_id = f"ft-{source.value}-{target.value}"
    with db.session() as s:
        s.add(_row(job_id, source.value))  # placed directly in `source`, as a fixture
    with db.session() as s:
        if can_transition(source, target):
            assert repo.transition(s, job_id=job_id, from_statuses=(source,), to_status=target,
                                   event_type="warning", message="moved")  # fmt: skip
        else:
            with pytest.raises(IllegalTransitionError):
                repo.transition(s, job_id=job_id, from_statuses=(source,), to_status=target,
                                event_type="warning", message="moved")  # fmt: skip
    with db.session() as s:
        row = repo.get_job(s, job_id=job_id)
        assert row.status == (target if can_transition(source, target) else source)
        if row.status in TERMINAL and can_transition(source, target):  # an ended job keeps no secret and no lease
            assert row.secrets == {} and row.lease_owner is None and row.finished_at is not None
        if row.status not in LEASED:
            assert row.lease_owner is None


def test_a_caller_that_names_a_wrong_source_state_moves_nothing(db):
    with db.session() as s:
        s.add(_row("ft-wrong", "completed"))
    with db.session() as s:
        # `running -> queued` is legal, but the job is completed: the conditional update matches no row.
        assert not repo.transition(s, job_id="ft-wrong", from_statuses=("running",), to_status="queued",
                                   event_type="job_restarted", message="x")  # fmt: skip
    with db.session() as s:
        assert repo.get_job(s, job_id="ft-wrong").status == "completed"
        assert repo.list_events(s, job_id="ft-wrong") == []


def test_status_and_lease_are_written_only_by_the_queue_functions(db):
    with db.session() as s:
        s.add(_row("ft-guard", "running"))
    with db.session() as s:
        for values in ({"status": "completed"}, {"lease_owner": "w2"}):
            with pytest.raises(IllegalTransitionError):
                repo.update_job(s, job_id="ft-guard", **values)
        with pytest.raises(IllegalTransitionError):  # a lease goes only with a leased state
            repo.transition(s, job_id="ft-guard", from_statuses=("running",), to_status="queued",
                            event_type="job_restarted", message="x", lease_owner="w2")  # fmt: skip


def test_a_worker_that_lost_its_lease_cannot_move_the_job(db):
    with db.session() as s:
        s.add(_row("ft-lease", "running"))
    with db.session() as s:
        assert repo.take_lease(s, job_id="ft-lease", from_owner="w1", seen_heartbeat=None, to_owner="w2", now=1.0)
        # A second reaper that saw the same old lease loses the race.
        assert not repo.take_lease(s, job_id="ft-lease", from_owner="w1", seen_heartbeat=None, to_owner="w3", now=2.0)
        assert not repo.transition(s, job_id="ft-lease", from_statuses=("running",), to_status="completed",
                                   event_type="job_complete", message="x", held_by="w1")  # fmt: skip
        assert repo.renew_leases(s, owner="w1", job_ids=["ft-lease"], now=3.0) == set()
        assert repo.renew_leases(s, owner="w2", job_ids=["ft-lease"], now=3.0) == {"ft-lease"}
        assert repo.transition(s, job_id="ft-lease", from_statuses=("running",), to_status="completed",
                               event_type="job_complete", message="x", held_by="w2")  # fmt: skip
