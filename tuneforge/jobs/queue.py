"""The job queue: every move of a job's life (enqueue, claim, cancel, requeue, finish, take over), each one
transaction through the store, whose conditional update enforces the state table and the worker's lease.

Identical creates racing each other make one job: the idempotency key is a unique column, so the second insert
fails and answers with the first job. A claim gives the worker the job's lease; a worker that lost its lease
(the reaper took the job over) can no longer move the job.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import msgspec
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tuneforge.errors import InvalidRequestError, NotFoundError
from tuneforge.ids import new_job_id
from tuneforge.jobs.plan import Planned
from tuneforge.jobs.stored_plan import plan_of
from tuneforge.store import Database
from tuneforge.store import files as files_repo
from tuneforge.store import jobs as repo
from tuneforge.store.sealing import UnreadableSecretsError
from tuneforge.store.states import LEASED, LIVE, TERMINAL, JobStatus, can_transition
from tuneforge.store.tables import CheckpointRow, JobRow
from tuneforge.train.spec import JobPlan

S = JobStatus


def idempotency_key(owner: str, request_hash: str) -> str:
    return hashlib.sha256(f"{owner}\0{request_hash}".encode()).hexdigest()


def enqueue(db: Database, planned: Planned, *, owner: str, request_hash: str, window_s: float) -> tuple[JobRow, bool]:
    """Store the planned job and queue it. Returns the job and whether it is new (False: the same request came
    within `window_s`, a client's retry, and gets the job it made)."""
    key = idempotency_key(owner, request_hash)
    now = time.time()
    try:
        with db.session() as s:
            held = repo.job_holding_key(s, key=key)
            if held is not None:
                if held.created_at >= now - window_s and not held.deleted and held.status != S.CANCELLED:
                    return held, False
                # An older request, or one whose job was cancelled or deleted since: this one makes a new job.
                repo.release_key(s, job_id=held.id)
            job_id = new_job_id()
            plan = planned.plan
            row = JobRow(
                id=job_id, owner=owner, status=S.PENDING.value, model=plan.model,
                output_name=output_name(s, owner=owner, model=plan.model, suffix=plan.suffix, job_id=job_id),
                training_file=plan.training_file, validation_file=plan.validation_file, params=plan.to_builtins(),
                request_hash=request_hash, idempotency_key=key, error=None, progress={}, secrets=planned.secrets,
                runner=None, attempt=0, created_at=now, updated_at=now, deleted=0,
            )  # fmt: skip
            repo.insert_job(s, row=row, event_type="job_pending", message="Fine-tune job created")
            # Checked again now that this transaction writes (and so holds the lock): a file deleted since the
            # plan read it is not used; a delete after this sees the job (api/files/service.delete_file).
            for file_id, param in ((plan.training_file, "training_file"), (plan.validation_file, "validation_file")):
                if file_id is not None and not files_repo.is_visible(s, file_id=file_id, owner=owner):
                    raise NotFoundError(f"{param} {file_id!r} was deleted while the job was being created",
                                        param=param)  # fmt: skip
            ahead = repo.queue_depth(s, created_at=now)
            repo.transition(s, job_id=job_id, from_statuses=(S.PENDING,), to_status=S.QUEUED, event_type="job_pending",
                            message=f"Job queued, {ahead} ahead", event_data={"queue_depth": ahead})  # fmt: skip
            s.flush()
            s.refresh(row)
            return row, True
    except IntegrityError:
        with db.session() as s:
            held = repo.job_holding_key(s, key=key)
            if held is None:
                raise
            return held, False


def output_name(s: Session, *, owner: str, model: str, suffix: str | None, job_id: str) -> str:
    """`owner/<base model>-<suffix>-<6 hex of the job id>`, longer where that is taken."""
    hexes = job_id.removeprefix("ft-").replace("-", "")
    base = model.rsplit("/", 1)[-1]
    for length in range(6, len(hexes) + 1):
        parts = [base, *([suffix] if suffix else []), hexes[:length]]
        name = f"{owner}/{'-'.join(parts)}"
        if repo.find_job_by_output_name(s, output_name=name) is None:
            return name
    return f"{owner}/{base}-{job_id}"


@dataclass(frozen=True)
class Claim:
    """A job a worker now holds: its plan, the attempt, where it resumes, and the secrets its run needs."""

    job: JobRow
    plan: JobPlan
    attempt: int
    resume: CheckpointRow | None
    secrets: dict[str, str]


def claim(db: Database, *, worker_id: str) -> Claim | None:
    """Take the oldest queued job under `worker_id`'s lease (running, attempt + 1). None when nothing is queued.

    A resumed attempt forgets the metrics and checkpoint rows past the checkpoint it resumes from: the run logs
    those steps again, so a job keeps one metrics row per step.
    """
    for _ in range(5):  # another worker may take the job between our read and our update
        with db.session() as s:
            job = repo.next_queued(s)
            if job is None:
                return None
            attempt = job.attempt + 1
            resume = repo.latest_checkpoint(s, job_id=job.id) if job.attempt else None
            note = f" (attempt {attempt}, resuming from step {resume.step})" if resume else ""
            now = time.time()
            moved = repo.transition(
                s, job_id=job.id, from_statuses=(S.QUEUED,), to_status=S.RUNNING, event_type="job_start",
                message=f"Job started{note}", attempt=attempt, started_at=job.started_at or now,
                lease_owner=worker_id, heartbeat_at=now, runner=None,
            )  # fmt: skip
            if not moved:
                continue
            if job.attempt:
                step = resume.step if resume else 0
                repo.forget_after(s, job_id=job.id, step=step)
                evals = sum("eval/loss" in (m.values or {}) for m in repo.list_metrics(s, job_id=job.id))
                progress = {**(job.progress or {}), "steps_completed": step, "evals_completed": evals}
                repo.update_job(s, job_id=job.id, held_by=worker_id, progress=progress)
            s.flush()
            s.refresh(job)
            try:
                plan = plan_of(job)
                secrets = repo.job_secrets(s, job)
            except (msgspec.ValidationError, ValueError, KeyError, TypeError, UnreadableSecretsError) as exc:
                # One unreadable job (a plan by a newer tuneforge, another server's secrets key, damage) must not
                # block the queue behind it.
                what = "secrets" if isinstance(exc, UnreadableSecretsError) else "plan"
                why = f"This server cannot read the job's stored {what} ({exc})"
                repo.transition(s, job_id=job.id, from_statuses=(S.RUNNING,), to_status=S.ERROR, event_type="job_error",
                                message=why, level="error", held_by=worker_id, error=why)  # fmt: skip
                continue
            return Claim(job=job, plan=plan, attempt=attempt, resume=resume, secrets=secrets)
    return None


def cancel(db: Database, *, owner: str, job_id: str) -> tuple[JobRow, bool]:
    """A job no process owns yet (pending, queued) is cancelled at once; a running one is asked to checkpoint and
    stop. Returns the job and whether its run must be signalled."""
    with db.session() as s:
        for _ in range(3):  # the worker may move the job on between our read and our write
            s.expire_all()
            row = repo.get_job(s, job_id=job_id, owner=owner)
            status = S(row.status)
            if status == S.CANCEL_REQUESTED:
                return row, False
            if status in TERMINAL:
                raise InvalidRequestError(
                    f"fine-tune job {job_id} is already {status.value}; only a pending, queued, running or "
                    "uploading job can be cancelled",
                    param="id",
                )
            if status in (S.PENDING, S.QUEUED) and repo.transition(
                s, job_id=job_id, from_statuses=(status,), to_status=S.CANCELLED, event_type="cancel_requested",
                message="Cancel requested by the user",
            ):  # fmt: skip
                repo.add_event(s, job_id=job_id, type_="job_stopped", message="Job cancelled before it started")
                break
            if can_transition(status, S.CANCEL_REQUESTED) and repo.transition(
                s, job_id=job_id, from_statuses=(status,), to_status=S.CANCEL_REQUESTED, event_type="cancel_requested",
                message="Cancel requested by the user; the run saves a checkpoint and stops",
            ):  # fmt: skip
                s.flush()
                s.expire_all()
                return repo.get_job(s, job_id=job_id, owner=owner), True
        s.flush()
        s.expire_all()
        return repo.get_job(s, job_id=job_id, owner=owner), False


def requeue(db: Database, *, job_id: str, worker_id: str | None, message: str) -> bool:
    """A run that died goes back to wait for a resume from its last checkpoint (its lease is released)."""
    with db.session() as s:
        return repo.transition(
            s, job_id=job_id, from_statuses=(S.RUNNING, S.UPLOADING), to_status=S.QUEUED, event_type="job_restarted",
            message=message, level="warning", held_by=worker_id, runner=None,
        )  # fmt: skip


def finish(
    db: Database, *, job_id: str, status: JobStatus, event_type: str, message: str, level: str = "info",
    worker_id: str | None = None,
) -> JobStatus | None:  # fmt: skip
    """End the job in `status` (clearing its secrets and lease). A job whose cancel was requested may end only as
    cancelled or failed, so a run that completed while its cancel was on the way ends cancelled, its weights kept.
    Returns the status it ended in, or None when it had ended already or another worker holds it."""
    for _ in range(3):  # a cancel may land between our read and our write: read again and end it accordingly
        with db.session() as s:
            current = S(repo.get_job(s, job_id=job_id).status)
            if current in TERMINAL:
                return None
            target, kind, lvl, text = status, event_type, level, message
            if current == S.CANCEL_REQUESTED and not can_transition(current, status):
                target, kind, lvl = S.CANCELLED, "job_stopped", "info"
                text = f"Cancelled by the user ({message[:1].lower()}{message[1:]} before the cancel arrived)"
            elif not can_transition(current, status):
                return None  # the job moved on without this worker (requeued, or taken over)
            if repo.transition(
                s, job_id=job_id, from_statuses=(current,), to_status=target, event_type=kind, message=text,
                level=lvl, held_by=worker_id, error=text if target in (S.ERROR, S.USER_ERROR) else None,
            ):  # fmt: skip
                return target
            s.expire_all()
            if worker_id is not None and repo.get_job(s, job_id=job_id).lease_owner != worker_id:
                return None  # another worker holds it now
    return None


def to_uploading(s: Session, *, job_id: str, worker_id: str, message: str, data: dict[str, object],
                 at: float) -> bool:  # fmt: skip
    """The run has trained and writes its final weights (only from running: a cancel in flight wins)."""
    return repo.transition(s, job_id=job_id, from_statuses=(S.RUNNING,), to_status=S.UPLOADING,
                           event_type="model_uploading", message=message, event_data=dict(data),
                           event_created_at=at, held_by=worker_id)  # fmt: skip


__all__ = ["LEASED", "LIVE", "TERMINAL", "Claim", "JobStatus", "cancel", "claim", "enqueue", "finish", "requeue"]
