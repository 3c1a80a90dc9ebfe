"""The fine-tuning service: limits, price estimates, and a job's life after creation (list, retrieve, cancel,
delete, events, checkpoints, metrics, tokenized data). Creation itself lives in `create.py`.

Every lookup is scoped to the caller: another owner's job is "not found", never "forbidden".
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Protocol

from tuneforge.api.fine_tunes import archives, public, tokens
from tuneforge.api.fine_tunes.schemas import (
    CheckpointList,
    EstimatePricePublic,
    EstimatePriceRequest,
    FineTuneDeleted,
    FineTuneEventList,
    FineTuneList,
    FineTunePublic,
    MetricList,
    ModelLimitsPublic,
    UnavailableReason,
)
from tuneforge.catalog.registry import Catalog
from tuneforge.errors import ConflictError, InvalidRequestError, NotFoundError
from tuneforge.jobs import queue
from tuneforge.jobs import references as resolve
from tuneforge.jobs.stored_plan import plan_of
from tuneforge.settings import Settings
from tuneforge.storage import BlobStore
from tuneforge.storage.layout import file_key, final_prefix, job_prefix, tokenized_key
from tuneforge.store import Database
from tuneforge.store import jobs as repo
from tuneforge.store.files import STILL_CHECKING, FileProcessingStatus
from tuneforge.store.states import LIVE, JobStatus
from tuneforge.store.tables import FileRow, JobRow

S = JobStatus
USER_LIMIT = 1e12  # dollars: a self-hosted server has no spending limit to report


class WorkerLike(Protocol):
    """What the API needs of the job worker (jobs/worker.py): a nudge, and a cancel."""

    def wake(self) -> None: ...

    def request_cancel(self, job_id: str) -> None: ...


def model_limits(db: Database, catalog: Catalog, *, owner: str, model_name: str) -> ModelLimitsPublic:
    name = resolve.present(model_name)
    if name is None:
        raise InvalidRequestError("model_name is required", param="model_name")
    with db.session() as s:
        entry = resolve.base_entry(s, catalog, owner=owner, name=name, param="model_name")
    return public.limits_public(entry)


# -- price ------------------------------------------------------------------------------------------------


def estimate_price(
    db: Database, blobs: BlobStore, catalog: Catalog, settings: Settings, *, owner: str, body: EstimatePriceRequest
) -> EstimatePricePublic:
    """Tokens x epochs x the price per token; or why there is no estimate (a file not checked, invalid, images)."""
    model = resolve.present(body.model) or resolve.present(body.from_checkpoint)
    if model is None:
        raise InvalidRequestError("model (or from_checkpoint) is required", param="model")
    with db.session() as s:
        entry = resolve.base_entry(s, catalog, owner=owner, name=model)
        # A file whose upload is unfinished has no estimate yet ("not validated"), as one still being checked.
        train = resolve.owned_file(
            s, owner=owner, file_id=body.training_file.strip(), param="training_file", unfinished_ok=True
        )
        val_id = resolve.present(body.validation_file)
        val = (
            resolve.owned_file(s, owner=owner, file_id=val_id, param="validation_file", unfinished_ok=True)
            if val_id
            else None
        )
    for row, prefix in ((train, "train"), (val, "eval")):
        if row is None:
            continue
        reason = _unavailable(row, prefix)
        if reason is not None:
            return EstimatePricePublic(estimation_available=False, unavailable_reason=reason)
    tokenizer = tokens.tokenizer_path(settings.home, entry)
    train_tokens = _tokens(blobs, train, tokenizer)
    eval_tokens = _tokens(blobs, val, tokenizer) if val is not None else 0
    n_epochs = body.n_epochs or 1
    n_evals = body.n_evals or 0
    return EstimatePricePublic(
        estimation_available=True,
        estimated_total_price=train_tokens * n_epochs * settings.price_per_token,
        allowed_to_proceed=True,
        estimated_train_token_count=float(train_tokens * n_epochs),
        estimated_eval_token_count=float(eval_tokens * n_evals),
        user_limit=USER_LIMIT,
    )


def _unavailable(row: FileRow, prefix: str) -> UnavailableReason | None:
    status = row.processing_status
    train = prefix == "train"
    if status in (None, *STILL_CHECKING):
        return "train_file_not_validated" if train else "eval_file_not_validated"
    if status != FileProcessingStatus.COMPLETED:
        return "train_file_invalid" if train else "eval_file_invalid"
    if (row.validation_report or {}).get("dataset_is_multimodal"):
        return "multimodal_dataset"
    return None


def _tokens(blobs: BlobStore, row: FileRow, tokenizer: Any) -> int:
    return tokens.count_tokens(
        blobs, file_id=row.id, key=file_key(row.id), file_type=row.file_type, size=row.bytes, tokenizer=tokenizer
    )


# -- reading jobs -----------------------------------------------------------------------------------------


def _public(s: Any, row: JobRow, settings: Settings, **extra: Any) -> FineTunePublic:
    depth = repo.queue_depth(s, created_at=row.created_at) if row.status == S.QUEUED else None
    return public.job_public(row, price_per_token=settings.price_per_token, queue_depth=depth, **extra)


def to_public(db: Database, settings: Settings, row: JobRow) -> FineTunePublic:
    """The job object without events (create, cancel, list)."""
    with db.session() as s:
        return _public(s, row, settings)


def list_fine_tunes(db: Database, settings: Settings, *, owner: str) -> FineTuneList:
    with db.session() as s:
        return FineTuneList(data=[_public(s, row, settings) for row in repo.list_jobs(s, owner=owner)])


def retrieve_fine_tune(
    db: Database, blobs: BlobStore, settings: Settings, *, owner: str, job_id: str
) -> FineTunePublic:
    with db.session() as s:
        row = repo.get_job(s, job_id=job_id, owner=owner)
        events = repo.list_events(s, job_id=job_id)
        key = tokenized_key(job_id)
        return _public(s, row, settings, events=events, tokenized_path=key if blobs.exists(key) else None)


def completed_jobs(db: Database, *, owner: str) -> list[JobRow]:
    """The caller's completed jobs: their output names can be used as models."""
    with db.session() as s:
        return [row for row in repo.list_jobs(s, owner=owner) if row.status == S.COMPLETED]


# -- changing jobs ----------------------------------------------------------------------------------------


def cancel_fine_tune(
    db: Database, settings: Settings, *, owner: str, job_id: str, worker: WorkerLike | None
) -> FineTunePublic:
    """A job that has not started is cancelled at once; a running one is asked to checkpoint and stop."""
    row, signal = queue.cancel(db, owner=owner, job_id=job_id)
    if signal and worker is not None:
        worker.request_cancel(job_id)
    return to_public(db, settings, row)


def delete_fine_tune(db: Database, blobs: BlobStore, *, owner: str, job_id: str) -> FineTuneDeleted:
    """Forget a finished job and delete its weights, checkpoints and archives."""
    with db.session() as s:
        row = repo.get_job(s, job_id=job_id, owner=owner)
        if row.status in LIVE:
            raise ConflictError(
                f"fine-tune job {job_id} is {row.status}: cancel it first, then delete it once it has stopped",
                param="id",
            )
        prefix = job_prefix(job_id) + "/"
        children = [
            j.id
            for j in repo.list_jobs(s, owner=owner)
            if j.status in LIVE and (init := plan_of(j).init) is not None and init.key.startswith(prefix)
        ]
        if children:
            raise ConflictError(
                f"fine-tune job {job_id} cannot be deleted while {', '.join(children)} continues from its weights",
                param="id",
            )
        repo.update_job(s, job_id=job_id, deleted=1)
    blobs.delete_prefix(job_prefix(job_id))
    return FineTuneDeleted(message=f"fine-tune job {job_id} and its weights were deleted")


# -- a job's records --------------------------------------------------------------------------------------


def list_events(db: Database, *, owner: str, job_id: str) -> FineTuneEventList:
    with db.session() as s:
        repo.get_job(s, job_id=job_id, owner=owner)
        return FineTuneEventList(data=[public.event_public(e) for e in repo.list_events(s, job_id=job_id)])


def list_checkpoints(db: Database, blobs: BlobStore, *, owner: str, job_id: str) -> CheckpointList:
    with db.session() as s:
        row = repo.get_job(s, job_id=job_id, owner=owner)
        rows = repo.list_checkpoints(s, job_id=job_id)
    has_merged = resolve.is_completed(row) and bool(blobs.list(final_prefix(job_id, "merged")))
    return CheckpointList(data=public.checkpoints_public(row, rows, has_merged=has_merged))


def list_metrics(
    db: Database,
    *,
    owner: str,
    job_id: str,
    global_step_from: int | None,
    global_step_to: int | None,
    logged_at_from: str | None,
    logged_at_to: str | None,
    resolution: int | None,
) -> MetricList:
    logged_from = _timestamp(logged_at_from, "logged_at_from")
    logged_to = _timestamp(logged_at_to, "logged_at_to")
    with db.session() as s:
        repo.get_job(s, job_id=job_id, owner=owner)
        rows = repo.list_metrics(
            s,
            job_id=job_id,
            step_from=global_step_from,
            step_to=global_step_to,
            logged_from=logged_from,
            logged_to=logged_to,
        )
    return MetricList(metrics=public.metrics_public(rows, resolution))


def _timestamp(value: str | None, param: str) -> float | None:
    text = resolve.present(value)
    if text is None:
        return None
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00").replace(" ", "+"))
    except ValueError as exc:
        raise InvalidRequestError(f"{param} must be an ISO-8601 timestamp (got {value!r})", param=param) from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def download_target(
    db: Database, *, owner: str, ft_id: str, checkpoint: str | None, checkpoint_step: int | None
) -> tuple[JobRow, archives.Target]:
    """The job and the folder a weights download means (`ft_id` may carry the step as `ft-…:STEP`)."""
    job_id, step = resolve.split_step(ft_id)
    with db.session() as s:
        job = repo.get_job(s, job_id=job_id, owner=owner)
        checkpoints = repo.list_checkpoints(s, job_id=job_id)
    step = checkpoint_step if checkpoint_step is not None else step
    return job, archives.choose(job, checkpoints, checkpoint=resolve.present(checkpoint), step=step)


def tokenized_dataset(db: Database, blobs: BlobStore, *, owner: str | None, job_id: str) -> tuple[str, int]:
    """The blob key and size of the job's tokenized training set; 404 until the run has written it.

    `owner` None is for the signed URL, whose signature already names the job."""
    with db.session() as s:
        repo.get_job(s, job_id=job_id, owner=owner)
    key = tokenized_key(job_id)
    if not blobs.exists(key):
        raise NotFoundError(
            f"fine-tune job {job_id} has no tokenized dataset yet: it is written once the run has tokenized "
            "the training file",
            param="id",
        )
    return key, blobs.size(key)
