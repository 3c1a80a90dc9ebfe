"""Fine-tune job states and the one table of allowed transitions.

Every state change goes through `check_transition`, is applied as one conditional update in the store
(from the state the writer believes the job is in) and appends an event, so a job can't be run twice
or left in a state it can't leave.
"""

from __future__ import annotations

from enum import StrEnum

from tuneforge.errors import ConflictError


class JobStatus(StrEnum):
    PENDING = "pending"  # accepted and validated, not yet queued
    QUEUED = "queued"  # waiting for a device slot
    RUNNING = "running"  # a training process owns it
    UPLOADING = "uploading"  # training done; final weights and archives being written
    CANCEL_REQUESTED = "cancel_requested"  # the user asked to stop; the process is checkpointing
    CANCELLED = "cancelled"  # stopped on request (terminal)
    ERROR = "error"  # failed for a reason on our side, or a crash (terminal)
    USER_ERROR = "user_error"  # failed because of the request or its data (terminal)
    COMPLETED = "completed"  # weights published (terminal)


TERMINAL = frozenset({JobStatus.CANCELLED, JobStatus.ERROR, JobStatus.USER_ERROR, JobStatus.COMPLETED})
LIVE = frozenset(set(JobStatus) - TERMINAL)

_FAILURES = {JobStatus.ERROR, JobStatus.USER_ERROR}
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.PENDING: frozenset({JobStatus.QUEUED, JobStatus.CANCEL_REQUESTED, JobStatus.CANCELLED, *_FAILURES}),
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCEL_REQUESTED, JobStatus.CANCELLED, *_FAILURES}),
    # RUNNING -> QUEUED: the process died and the job goes back to wait for a resume from its checkpoint.
    JobStatus.RUNNING: frozenset(
        {JobStatus.UPLOADING, JobStatus.QUEUED, JobStatus.CANCEL_REQUESTED, JobStatus.COMPLETED, *_FAILURES}
    ),
    JobStatus.UPLOADING: frozenset({JobStatus.COMPLETED, JobStatus.CANCEL_REQUESTED, *_FAILURES}),
    JobStatus.CANCEL_REQUESTED: frozenset({JobStatus.CANCELLED, *_FAILURES}),
    JobStatus.CANCELLED: frozenset(),
    JobStatus.ERROR: frozenset(),
    JobStatus.USER_ERROR: frozenset(),
    JobStatus.COMPLETED: frozenset(),
}


def can_transition(current: str, target: str) -> bool:
    return JobStatus(target) in TRANSITIONS[JobStatus(current)]


def check_transition(current: str, target: str) -> None:
    """Raise ConflictError when a job in `current` may not move to `target`."""
    if not can_transition(current, target):
        raise ConflictError(f"a job that is {current} cannot become {target}", param="status")
