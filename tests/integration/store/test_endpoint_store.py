"""The endpoint state table is enforced by the store: a move it does not allow raises before any change, a move
from a state the row is no longer in changes nothing, and every move leaves an event."""

from __future__ import annotations

import time
from pathlib import Path

import pg_support
import pytest

from tuneforge.store import endpoints as repo
from tuneforge.store import open_database
from tuneforge.store.endpoint_states import TRANSITIONS, EndpointState, IllegalTransitionError
from tuneforge.store.tables import EndpointRow


def _row(state: str = EndpointState.PENDING) -> EndpointRow:
    now = time.time()
    return EndpointRow(id="endpoint-1", owner="alice", name="alice/m-1", display_name="m", model="m", hardware="cpu",
                       min_replicas=1, max_replicas=1, state=state, replica_bytes=1 << 20, created_at=now,
                       updated_at=now)  # fmt: skip


@pytest.fixture
def db(tmp_path: Path):
    database = open_database(pg_support.database_url(tmp_path))  # SQLite, or PostgreSQL in that mode
    yield database
    database.close()


def test_every_move_follows_the_table_and_leaves_an_event(db) -> None:
    with db.session() as s:
        repo.insert_endpoint(s, row=_row(), message="created")
    path = [EndpointState.STARTING, EndpointState.STARTED, EndpointState.STOPPING, EndpointState.STOPPED,
            EndpointState.PENDING]  # fmt: skip
    current = EndpointState.PENDING
    for to in path:
        with db.session() as s:
            assert repo.transition(s, endpoint_id="endpoint-1", from_states=(current,), to_state=to,
                                   event_type="moved", message=f"to {to}")  # fmt: skip
        current = to
    with db.session() as s:
        events = repo.list_events(s, endpoint_id="endpoint-1")
        assert [e.data["state"] for e in events] == ["PENDING", *path]
        assert repo.get_endpoint(s, endpoint_id="endpoint-1").state == "PENDING"


def test_a_move_the_table_forbids_raises_and_a_stale_one_changes_nothing(db) -> None:
    with db.session() as s:
        repo.insert_endpoint(s, row=_row(), message="created")
    with db.session() as s, pytest.raises(IllegalTransitionError):
        repo.transition(s, endpoint_id="endpoint-1", from_states=("PENDING",), to_state="STARTED", event_type="x",
                        message="skips STARTING")  # fmt: skip
    with db.session() as s:  # allowed from STARTING, but the row is PENDING: no change, no event
        assert not repo.transition(s, endpoint_id="endpoint-1", from_states=("STARTING",), to_state="STARTED",
                                   event_type="x", message="stale")  # fmt: skip
        assert repo.get_endpoint(s, endpoint_id="endpoint-1").state == "PENDING"
        assert len(repo.list_events(s, endpoint_id="endpoint-1")) == 1
    with db.session() as s, pytest.raises(IllegalTransitionError):
        repo.update_endpoint(s, endpoint_id="endpoint-1", state="STARTED")
    with db.session() as s, pytest.raises(IllegalTransitionError):
        repo.insert_endpoint(s, row=_row(EndpointState.STARTED), message="born started")


def test_error_carries_a_reason_that_a_later_state_clears(db) -> None:
    with db.session() as s:
        repo.insert_endpoint(s, row=_row(), message="created")
        repo.transition(s, endpoint_id="endpoint-1", from_states=("PENDING",), to_state="ERROR", event_type="e",
                        message="boom", error="the model server failed")  # fmt: skip
    with db.session() as s:
        assert repo.get_endpoint(s, endpoint_id="endpoint-1").error == "the model server failed"
        repo.transition(s, endpoint_id="endpoint-1", from_states=("ERROR",), to_state="PENDING", event_type="s",
                        message="start")  # fmt: skip
    with db.session() as s:
        assert repo.get_endpoint(s, endpoint_id="endpoint-1").error is None


def test_the_table_reaches_every_state_and_stopped_only_through_stopping() -> None:
    reachable = {EndpointState.PENDING}
    frontier = [EndpointState.PENDING]
    while frontier:
        for nxt in TRANSITIONS[frontier.pop()]:
            if nxt not in reachable:
                reachable.add(nxt)
                frontier.append(nxt)
    assert reachable == set(EndpointState)
    assert {s for s, targets in TRANSITIONS.items() if EndpointState.STOPPED in targets} == {EndpointState.STOPPING}
    assert all(TRANSITIONS[s] for s in EndpointState)  # no state a row can't leave
