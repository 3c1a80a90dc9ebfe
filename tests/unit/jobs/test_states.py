"""The job state table: terminal states are final, every live state can fail or be cancelled."""

import itertools

import pytest

from tuneforge.errors import ConflictError
from tuneforge.jobs.states import LIVE, TERMINAL, TRANSITIONS, JobStatus, can_transition, check_transition


def test_terminal_states_have_no_way_out():
    for status in TERMINAL:
        assert TRANSITIONS[status] == frozenset()


@pytest.mark.parametrize("status", sorted(LIVE))
def test_every_live_state_can_end(status):
    assert JobStatus.ERROR in TRANSITIONS[status]
    assert TRANSITIONS[status] & {JobStatus.CANCEL_REQUESTED, JobStatus.CANCELLED}


def test_happy_path_and_refusals():
    path = ["pending", "queued", "running", "uploading", "completed"]
    for a, b in itertools.pairwise(path):
        check_transition(a, b)
    assert can_transition("running", "queued")  # a dead process goes back to wait for a resume
    assert not can_transition("completed", "running")
    with pytest.raises(ConflictError, match="cancelled cannot become running"):
        check_transition("cancelled", "running")
