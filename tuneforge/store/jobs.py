"""Named queries on fine-tune jobs, their events, metrics and checkpoints.

A status change is one conditional UPDATE plus the event that records it, in one transaction, and only a move
that the state table (`store/states.py`) allows can happen: `transition` raises on any other, and its WHERE
clause matches only rows in an allowed source state. A worker's writes carry its lease (`lease_owner`), so a
worker that lost a job to the reaper can no longer move it. Claims use `FOR UPDATE SKIP LOCKED` where the
database has it; SQLite serialises writers, and the conditional UPDATE decides the race either way.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.orm import Session

from tuneforge.errors import NotFoundError
from tuneforge.store.sealing import Sealer
from tuneforge.store.states import LEASED, TERMINAL, IllegalTransitionError, JobStatus, can_transition, sources_of
from tuneforge.store.tables import CheckpointRow, JobEventRow, JobMetricRow, JobRow

# Columns only `transition` and the lease functions may write: `update_job` refuses them.
_GUARDED = frozenset({"status", "lease_owner"})


def insert_job(session: Session, *, row: JobRow, event_type: str, message: str) -> JobRow:
    """Insert a new job in `pending`, with its first event. An idempotency key another job holds makes the flush
    fail with IntegrityError (the unique index decides a race, not a read before the insert)."""
    if row.status != JobStatus.PENDING:
        raise IllegalTransitionError(f"a new job starts pending, not {row.status}")
    row.secrets = _sealer(session).seal(dict(row.secrets or {}))
    session.add(row)
    session.flush()
    add_event(session, job_id=row.id, type_=event_type, message=message)
    return row


def _sealer(session: Session) -> Sealer:
    sealer = session.info.get("sealer")
    if not isinstance(sealer, Sealer):
        raise RuntimeError("a session of Database.session() carries the sealer of job secrets")
    return sealer


def job_secrets(session: Session, job: JobRow) -> dict[str, str]:
    """The job's secrets, opened (they are stored sealed: store/sealing.py)."""
    return _sealer(session).open(job.secrets)


def seal_plain_secrets(session: Session) -> int:
    """Seal the secrets of rows stored before sealing (tuneforge 0.1 wrote them as plain JSON): a live job's are
    sealed, an ended job's (which should hold none) cleared. Returns how many rows changed."""
    sealer = _sealer(session)
    changed = 0
    for job_id, status, stored in session.execute(select(JobRow.id, JobRow.status, JobRow.secrets)).all():
        if sealer.is_sealed(stored):
            continue
        secrets = {} if status in TERMINAL else sealer.open(stored)
        session.execute(update(JobRow).where(JobRow.id == job_id).values(secrets=sealer.seal(secrets)))
        changed += 1
    return changed


def job_holding_key(session: Session, *, key: str) -> JobRow | None:
    """The job that holds an idempotency key, if any."""
    return session.scalars(select(JobRow).where(JobRow.idempotency_key == key)).first()


def release_key(session: Session, *, job_id: str) -> None:
    """Free a job's idempotency key: an identical request then makes a new job."""
    session.execute(update(JobRow).where(JobRow.id == job_id).values(idempotency_key=None))


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


def list_jobs(session: Session, *, owner: str) -> list[JobRow]:
    stmt = select(JobRow).where(JobRow.owner == owner, JobRow.deleted == 0).order_by(JobRow.created_at)
    return list(session.scalars(stmt))


def jobs_in(session: Session, *, statuses: tuple[str, ...]) -> list[JobRow]:
    stmt = select(JobRow).where(JobRow.status.in_(statuses)).order_by(JobRow.created_at)
    return list(session.scalars(stmt))


def live_jobs_using_file(session: Session, *, file_id: str) -> list[JobRow]:
    """Jobs that may still read this file (training or validation)."""
    live = [s.value for s in JobStatus if s not in TERMINAL]
    stmt = select(JobRow).where(
        or_(JobRow.training_file == file_id, JobRow.validation_file == file_id), JobRow.status.in_(live)
    )
    return list(session.scalars(stmt.order_by(JobRow.created_at)))


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
    held_by: str | None = None,
    **values: Any,
) -> bool:
    """Move the job from one of `from_statuses` to `to_status` and record the event; False if it moved on.

    `held_by`, when given, must still hold the job's lease for the move to happen. Entering a terminal state
    clears the job's secrets and lease and stamps `finished_at`; leaving the leased states clears the lease.
    `event_created_at` stamps the event with the time it happened (a training process's own clock).

    Raises:
        IllegalTransitionError: the state table allows no move from one of `from_statuses` to `to_status`.
    """
    illegal = [s for s in from_statuses if not can_transition(s, to_status)]
    if illegal or not from_statuses:
        raise IllegalTransitionError(f"a job that is {' or '.join(illegal) or '(no state)'} cannot become {to_status}")
    if "status" in values or ("lease_owner" in values and JobStatus(to_status) not in LEASED):
        raise IllegalTransitionError("the status is set by transition itself; a lease only with a leased state")
    now = time.time()
    target = JobStatus(to_status)
    if target in TERMINAL:
        values = {"finished_at": now, "runner": None, "secrets": {}, **values, "lease_owner": None}
    elif target not in LEASED:
        values = {**values, "lease_owner": None}
    allowed = [s.value for s in sources_of(to_status) if s.value in from_statuses]
    stmt = update(JobRow).where(JobRow.id == job_id, JobRow.status.in_(allowed))
    if held_by is not None:
        stmt = stmt.where(JobRow.lease_owner == held_by)
    result = session.execute(stmt.values(status=target.value, updated_at=now, **values))
    if not getattr(result, "rowcount", 0):
        return False
    add_event(session, job_id=job_id, type_=event_type, message=message, level=level, data=event_data or {},
              created_at=event_created_at)  # fmt: skip
    return True


def update_job(session: Session, *, job_id: str, held_by: str | None = None, **values: Any) -> bool:
    """Write bookkeeping columns (progress, runner, ...); never the status or the lease. False if not written.

    With `held_by`, only while that worker still holds the job's lease.
    """
    if _GUARDED & values.keys():
        raise IllegalTransitionError("status and lease change only through transition and the lease functions")
    stmt = update(JobRow).where(JobRow.id == job_id)
    if held_by is not None:
        stmt = stmt.where(JobRow.lease_owner == held_by)
    result = session.execute(stmt.values(updated_at=time.time(), **values))
    return bool(getattr(result, "rowcount", 0))


# -- queue and leases ---------------------------------------------------------------------------------------


def next_queued(session: Session) -> JobRow | None:
    """The oldest queued job (locked with SKIP LOCKED on PostgreSQL); the claim itself is `transition`."""
    stmt = select(JobRow).where(JobRow.status == JobStatus.QUEUED).order_by(JobRow.created_at).limit(1)
    if session.get_bind().dialect.name == "postgresql":
        stmt = stmt.with_for_update(skip_locked=True)
    return session.scalars(stmt).first()


def renew_leases(session: Session, *, owner: str, job_ids: list[str], now: float) -> set[str]:
    """Renew the heartbeat of the jobs `owner` still holds; returns those it holds (the others were taken)."""
    if not job_ids:
        return set()
    session.execute(
        update(JobRow)
        .where(JobRow.id.in_(job_ids), JobRow.lease_owner == owner, JobRow.status.in_([s.value for s in LEASED]))
        .values(heartbeat_at=now)
    )
    held = select(JobRow.id).where(
        JobRow.id.in_(job_ids), JobRow.lease_owner == owner, JobRow.status.in_([s.value for s in LEASED])
    )
    return set(session.scalars(held))


def leased_jobs(session: Session) -> list[JobRow]:
    """Every job a training process may own, with its lease (the reaper's candidates)."""
    return jobs_in(session, statuses=tuple(s.value for s in LEASED))


def take_lease(session: Session, *, job_id: str, from_owner: str | None, seen_heartbeat: float | None,
               to_owner: str, now: float) -> bool:  # fmt: skip
    """Take over a job's lease from a worker that stopped renewing it: compare-and-swap on (owner, heartbeat),
    so a worker that renewed in the meantime keeps its job, and two reapers never both win."""
    stmt = update(JobRow).where(JobRow.id == job_id, JobRow.status.in_([s.value for s in LEASED]))
    stmt = stmt.where(JobRow.lease_owner.is_(None) if from_owner is None else JobRow.lease_owner == from_owner)
    stmt = stmt.where(
        JobRow.heartbeat_at.is_(None) if seen_heartbeat is None else JobRow.heartbeat_at == seen_heartbeat
    )
    result = session.execute(stmt.values(lease_owner=to_owner, heartbeat_at=now, updated_at=now))
    return bool(getattr(result, "rowcount", 0))


def queue_depth(session: Session, *, created_at: float) -> int:
    """How many queued jobs are ahead of one created at `created_at`."""
    stmt = select(func.count()).where(JobRow.status == JobStatus.QUEUED, JobRow.created_at < created_at)
    return int(session.scalar(stmt) or 0)


# -- events, metrics, checkpoints ---------------------------------------------------------------------------


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


def forget_after(session: Session, *, job_id: str, step: int) -> None:
    """Drop the metrics and checkpoint rows past `step`: a run resumed from there logs those steps again."""
    session.execute(delete(JobMetricRow).where(JobMetricRow.job_id == job_id, JobMetricRow.step > step))
    session.execute(
        delete(CheckpointRow).where(
            CheckpointRow.job_id == job_id, CheckpointRow.step > step, CheckpointRow.kind == "intermediate"
        )
    )


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
    """Record a checkpoint; one saved again at the same step and path (by a resumed run) replaces its row."""
    session.execute(
        delete(CheckpointRow).where(
            CheckpointRow.job_id == job_id, CheckpointRow.step == step, CheckpointRow.kind == kind,
            CheckpointRow.path == path,
        )
    )  # fmt: skip
    session.add(CheckpointRow(job_id=job_id, step=step, kind=kind, path=path, created_at=created_at))


def list_checkpoints(session: Session, *, job_id: str) -> list[CheckpointRow]:
    stmt = select(CheckpointRow).where(CheckpointRow.job_id == job_id).order_by(CheckpointRow.step, CheckpointRow.id)
    return list(session.scalars(stmt))


def latest_checkpoint(session: Session, *, job_id: str) -> CheckpointRow | None:
    """The newest intermediate checkpoint: where an interrupted run resumes."""
    rows = [r for r in list_checkpoints(session, job_id=job_id) if r.kind == "intermediate"]
    return max(rows, key=lambda r: r.step) if rows else None
