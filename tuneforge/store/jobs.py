"""Named queries on fine-tune jobs, their events, metrics and checkpoints.

A status change is one conditional UPDATE (from the status the caller believes the job is in) plus the
event that records it, in one transaction; claiming a queued job uses `FOR UPDATE SKIP LOCKED` where the
database has it, so two workers never run one job.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from tuneforge.errors import NotFoundError
from tuneforge.store.tables import CheckpointRow, JobEventRow, JobMetricRow, JobRow


def insert_job(session: Session, *, row: JobRow, event_type: str, message: str) -> JobRow:
    session.add(row)
    session.flush()
    add_event(session, job_id=row.id, type_=event_type, message=message)
    return row


def get_job(session: Session, *, job_id: str, owner: str | None = None) -> JobRow:
    """The job, for its owner (None: any owner, for the worker); NotFoundError otherwise."""
    row = session.get(JobRow, job_id)
    if row is None or row.deleted or (owner is not None and row.owner != owner):
        raise NotFoundError(f"fine-tune job {job_id!r} not found", param="id")
    return row


def find_job_by_output_name(session: Session, *, output_name: str, owner: str | None = None) -> JobRow | None:
    stmt = select(JobRow).where(JobRow.output_name == output_name, JobRow.deleted == 0)
    if owner is not None:
        stmt = stmt.where(JobRow.owner == owner)
    return session.scalars(stmt).first()


def find_recent_duplicate(session: Session, *, owner: str, request_hash: str, since: float) -> JobRow | None:
    """A job created from the same request body moments ago: a client retry, not a new job."""
    stmt = select(JobRow).where(
        JobRow.owner == owner, JobRow.request_hash == request_hash, JobRow.created_at >= since, JobRow.deleted == 0
    )
    return session.scalars(stmt).first()


def list_jobs(session: Session, *, owner: str) -> list[JobRow]:
    stmt = select(JobRow).where(JobRow.owner == owner, JobRow.deleted == 0).order_by(JobRow.created_at)
    return list(session.scalars(stmt))


def jobs_in(session: Session, *, statuses: tuple[str, ...]) -> list[JobRow]:
    stmt = select(JobRow).where(JobRow.status.in_(statuses)).order_by(JobRow.created_at)
    return list(session.scalars(stmt))


def transition(
    session: Session,
    *,
    job_id: str,
    from_statuses: tuple[str, ...],
    to_status: str,
    event_type: str,
    message: str,
    level: str = "info",
    event_data: dict[str, Any] | None = None,
    event_created_at: float | None = None,
    **values: Any,
) -> bool:
    """Move the job from one of `from_statuses` to `to_status` and record the event; False if it moved on.

    `event_created_at` stamps the event with the time it happened (a training process's own clock)
    rather than the time it was read, so events never appear to go back in time.
    """
    now = time.time()
    result = session.execute(
        update(JobRow)
        .where(JobRow.id == job_id, JobRow.status.in_(from_statuses))
        .values(status=to_status, updated_at=now, **values)
    )
    if not getattr(result, "rowcount", 0):
        return False
    add_event(
        session,
        job_id=job_id,
        type_=event_type,
        message=message,
        level=level,
        data=event_data or {},
        created_at=event_created_at,
    )
    return True


def update_job(session: Session, *, job_id: str, **values: Any) -> None:
    session.execute(update(JobRow).where(JobRow.id == job_id).values(updated_at=time.time(), **values))


def claim_next(session: Session, *, statuses: tuple[str, ...] = ("queued",)) -> JobRow | None:
    """Lock and return the oldest queued job (SKIP LOCKED on PostgreSQL; SQLite serialises writers)."""
    stmt = select(JobRow).where(JobRow.status.in_(statuses)).order_by(JobRow.created_at).limit(1)
    if session.get_bind().dialect.name == "postgresql":
        stmt = stmt.with_for_update(skip_locked=True)
    return session.scalars(stmt).first()


def queue_depth(session: Session, *, created_at: float) -> int:
    """How many queued jobs are ahead of one created at `created_at`."""
    stmt = select(func.count()).where(JobRow.status == "queued", JobRow.created_at < created_at)
    return int(session.scalar(stmt) or 0)


def add_event(
    session: Session,
    *,
    job_id: str,
    type_: str,
    message: str,
    level: str = "info",
    data: dict[str, Any] | None = None,
    created_at: float | None = None,
) -> None:
    session.add(
        JobEventRow(
            job_id=job_id,
            created_at=created_at or time.time(),
            type=type_,
            level=level,
            message=message,
            data=data or {},
        )
    )


def list_events(session: Session, *, job_id: str) -> list[JobEventRow]:
    stmt = select(JobEventRow).where(JobEventRow.job_id == job_id).order_by(JobEventRow.created_at, JobEventRow.id)
    return list(session.scalars(stmt))


def add_metric(session: Session, *, job_id: str, step: int, values: dict[str, Any], logged_at: float) -> None:
    session.add(JobMetricRow(job_id=job_id, step=step, values=values, logged_at=logged_at))


def list_metrics(
    session: Session,
    *,
    job_id: str,
    step_from: int | None = None,
    step_to: int | None = None,
    logged_from: float | None = None,
    logged_to: float | None = None,
) -> list[JobMetricRow]:
    stmt = select(JobMetricRow).where(JobMetricRow.job_id == job_id)
    if step_from is not None:
        stmt = stmt.where(JobMetricRow.step >= step_from)
    if step_to is not None:
        stmt = stmt.where(JobMetricRow.step <= step_to)
    if logged_from is not None:
        stmt = stmt.where(JobMetricRow.logged_at >= logged_from)
    if logged_to is not None:
        stmt = stmt.where(JobMetricRow.logged_at <= logged_to)
    return list(session.scalars(stmt.order_by(JobMetricRow.logged_at, JobMetricRow.id)))


def add_checkpoint(session: Session, *, job_id: str, step: int, kind: str, path: str, created_at: float) -> None:
    session.add(CheckpointRow(job_id=job_id, step=step, kind=kind, path=path, created_at=created_at))


def list_checkpoints(session: Session, *, job_id: str) -> list[CheckpointRow]:
    stmt = select(CheckpointRow).where(CheckpointRow.job_id == job_id).order_by(CheckpointRow.step, CheckpointRow.id)
    return list(session.scalars(stmt))
