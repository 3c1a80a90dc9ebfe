"""Fine-tune job states and the one table of allowed transitions, enforced by the store itself.

`store/jobs.transition` refuses any move this table does not allow (it raises, and its conditional UPDATE only
matches rows in an allowed source state), so no caller can skip it. It lives in the store, below `jobs/`,
because the store is where every writer must pass.
"""

from __future__ import annotations

from enum import StrEnum

from tuneforge.errors import TuneForgeError


class JobStatus(StrEnum):
    PENDING = "pending"  # accepted and validated, not yet queued
    QUEUED = "queued"  # waiting for a device slot
    RUNNING = "running"  # a training process owns it (under a worker's lease)
    UPLOADING = "uploading"  # training done; final weights and archives being written
    CANCEL_REQUESTED = "cancel_requested"  # the user asked to stop; the process is checkpointing
    CANCELLED = "cancelled"  # stopped on request (terminal)
    ERROR = "error"  # failed for a reason on our side, or a crash (terminal)
    USER_ERROR = "user_error"  # failed because of the request or its data (terminal)
    COMPLETED = "completed"  # weights published (terminal)


TERMINAL = frozenset({JobStatus.CANCELLED, JobStatus.ERROR, JobStatus.USER_ERROR, JobStatus.COMPLETED})
LIVE = frozenset(set(JobStatus) - TERMINAL)
# The states in which a training process may exist: a worker holds the job's lease while it is in one of them.
LEASED = frozenset({JobStatus.RUNNING, JobStatus.UPLOADING, JobStatus.CANCEL_REQUESTED})

_FAILURES = {JobStatus.ERROR, JobStatus.USER_ERROR}
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.PENDING: frozenset({JobStatus.QUEUED, JobStatus.CANCELLED, *_FAILURES}),
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELLED, *_FAILURES}),
    # RUNNING -> QUEUED: the process died (or its worker did) and the job waits to resume from its checkpoint.
    JobStatus.RUNNING: frozenset(
        {JobStatus.UPLOADING, JobStatus.QUEUED, JobStatus.CANCEL_REQUESTED, JobStatus.COMPLETED, *_FAILURES}
    ),
    # UPLOADING -> QUEUED: a run that dies while writing its final weights is resumed from its last checkpoint
    # (its training is redone from there) rather than failing after all its training was done.
    JobStatus.UPLOADING: frozenset({JobStatus.COMPLETED, JobStatus.QUEUED, JobStatus.CANCEL_REQUESTED, *_FAILURES}),
    JobStatus.CANCEL_REQUESTED: frozenset({JobStatus.CANCELLED, *_FAILURES}),
    JobStatus.CANCELLED: frozenset(),
    JobStatus.ERROR: frozenset(),
    JobStatus.USER_ERROR: frozenset(),
    JobStatus.COMPLETED: frozenset(),
}


class IllegalTransitionError(TuneForgeError):
    """A write asked for a move the state table forbids: a bug in the caller, refused before any change (500)."""


def can_transition(current: str, target: str) -> bool:
    return JobStatus(target) in TRANSITIONS[JobStatus(current)]


def sources_of(target: str) -> frozenset[JobStatus]:
    """Every state from which a job may move to `target`."""
    goal = JobStatus(target)
    return frozenset(state for state, targets in TRANSITIONS.items() if goal in targets)
