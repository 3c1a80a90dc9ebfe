"""Names a caller may use for a model: a catalog entry, one of their fine-tune jobs (`ft-…[:STEP]`) or a job's
output name; and the facts derived from a job that other parts need (its training type, its final step).

Reads through the store's named queries only; never tells one owner about another owner's jobs.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session

from tuneforge.api.fine_tunes.schemas import FullTrainingLimits, LoraTrainingLimits, ModelLimitsPublic
from tuneforge.catalog.entries import ModelEntry
from tuneforge.catalog.registry import Catalog
from tuneforge.errors import InvalidRequestError, NotFoundError
from tuneforge.jobs.states import JobStatus
from tuneforge.store import files as files_repo
from tuneforge.store import jobs as repo
from tuneforge.store.tables import CheckpointRow, FileRow, JobRow

_STEP_SUFFIX = re.compile(r"^(?P<name>.+?):(?P<step>\d+)$")


def iso(ts: float | None) -> str | None:
    """Unix seconds as `YYYY-MM-DDTHH:MM:SS.ffffffZ`, one of the two layouts the CLI can render."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def present(value: str | None) -> str | None:
    """`""` and whitespace count as absent: the CLI sends them for options left unset."""
    if value is None or not value.strip():
        return None
    return value.strip()


def split_step(ref: str) -> tuple[str, int | None]:
    """`ft-…:40` -> (`ft-…`, 40); a reference without `:STEP` has step None."""
    m = _STEP_SUFFIX.match(ref)
    if m is None:
        return ref, None
    return m["name"], int(m["step"])


def find_owned_job(session: Session, *, owner: str, name: str) -> JobRow | None:
    """The caller's job with this id or output name (without any `:STEP`), or None."""
    if name.startswith("ft-"):
        try:
            return repo.get_job(session, job_id=name, owner=owner)
        except NotFoundError:
            return None
    return repo.find_job_by_output_name(session, output_name=name, owner=owner)


def training_type_of(job: JobRow) -> str:
    """`lora` or `full`, as the job was created."""
    hyper: dict[str, Any] = (job.params or {}).get("hyper") or {}
    return "full" if hyper.get("training_type") == "full" else "lora"


def final_step(job: JobRow, checkpoints: list[CheckpointRow]) -> int:
    """The step the final weights were saved at: the final checkpoint row's, else the progress counters'."""
    finals = [c.step for c in checkpoints if c.kind == "final"]
    if finals:
        return max(finals)
    progress = job.progress or {}
    for key in ("steps_completed", "total_steps"):
        value = progress.get(key)
        if isinstance(value, int | float) and value > 0:
            return int(value)
    steps = [c.step for c in checkpoints]
    return max(steps) if steps else 0


def is_completed(job: JobRow) -> bool:
    return job.status == JobStatus.COMPLETED


def base_entry(session: Session, catalog: Catalog, *, owner: str, name: str, param: str = "model") -> ModelEntry:
    """The catalog entry `name` stands for: itself, or the base model of the caller's job or output of that name."""
    entry = catalog.find(name)
    if entry is not None:
        return entry
    job = find_owned_job(session, owner=owner, name=split_step(name)[0])
    if job is not None:
        entry = catalog.find(job.model)
        if entry is not None:
            return entry
        raise NotFoundError(
            f"model {job.model!r} (the base model of {job.id}) not found in the catalog any more", param=param
        )
    raise NotFoundError(
        f"model {name!r} not found: it is neither in the model catalog nor one of your fine-tune jobs or outputs",
        param=param,
    )


def owned_file(session: Session, *, owner: str, file_id: str, param: str, unfinished_ok: bool = False) -> FileRow:
    """The caller's uploaded file.

    Raises:
        NotFoundError: naming `param`, when the caller has no such file (another owner's, a deleted one, none).
        InvalidRequestError: naming `param`, when the caller opened the upload but never finished it (the bytes
            never came, or `/preprocess` was never called); with `unfinished_ok` such a file is returned instead
            (its `processing_status` is None: not checked).
    """
    try:
        row = files_repo.get_file(
            session, file_id=file_id, owner=owner, states=(files_repo.VISIBLE, *files_repo.UNFINISHED)
        )
    except NotFoundError as exc:
        raise NotFoundError(f"{param} {file_id!r} not found: upload it with POST /v1/files first", param=param) from exc
    if row.state == files_repo.VISIBLE or unfinished_ok:
        return row
    if row.state == "uploading":
        how = "its bytes never arrived: PUT them to the upload URL, then POST /v1/files/{id}/preprocess"
    else:
        how = "its bytes arrived but it was never submitted: POST /v1/files/{id}/preprocess"
    raise InvalidRequestError(
        f"{param} {file_id!r} is not ready: the upload was opened but not finished ({how.format(id=file_id)}), "
        "or upload the file again",
        param=param,
    )


def limits_public(entry: ModelEntry) -> ModelLimitsPublic:
    lim = entry.limits
    full = (
        FullTrainingLimits(
            min_batch_size=lim.full_min_batch_size,
            max_batch_size=lim.full_max_batch_size,
            max_batch_size_dpo=lim.full_max_batch_size_dpo,
        )
        if lim.supports_full
        else None
    )
    return ModelLimitsPublic(
        model_name=entry.name,
        lora_training=LoraTrainingLimits(
            default_rank=lim.default_lora_rank,
            max_rank=lim.max_lora_rank,
            min_batch_size=lim.lora_min_batch_size,
            max_batch_size=lim.lora_max_batch_size,
            max_batch_size_dpo=lim.lora_max_batch_size_dpo,
            target_modules=list(lim.target_modules),
        ),
        full_training=full,
        max_seq_length_sft=lim.max_seq_length,
        max_seq_length_dpo=lim.max_seq_length_dpo,
        min_max_seq_length=lim.min_seq_length,
        supports_vision=lim.supports_vision,
        supports_full_training=lim.supports_full,
        supports_tools=lim.supports_tools,
        supports_reasoning=lim.supports_reasoning,
        max_num_epochs=lim.max_num_epochs,
        max_num_evals=lim.max_num_evals,
        max_num_checkpoints=lim.max_num_checkpoints,
        min_learning_rate=lim.min_learning_rate,
        max_learning_rate=lim.max_learning_rate,
        default_gradient_accumulation_steps=lim.default_gradient_accumulation_steps,
        merge_output_lora=lim.merge_output_lora,
    )
