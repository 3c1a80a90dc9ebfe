"""Names a caller may use for a model, a file or weights: a catalog entry, one of their fine-tune jobs
(`ft-…[:STEP]`) or a job's output name, an uploaded file; and which stored weights such a reference means.

One resolver for `ft-…[:STEP]`, used by `from_checkpoint` (the plan) and by weight downloads alike. Reads through
the store's named queries only; never tells one owner about another owner's jobs or files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy.orm import Session

from tuneforge.catalog.entries import ModelEntry
from tuneforge.catalog.registry import Catalog
from tuneforge.errors import InvalidRequestError, NotFoundError
from tuneforge.jobs.stored_plan import plan_of
from tuneforge.storage.layout import final_prefix
from tuneforge.store import files as files_repo
from tuneforge.store import jobs as repo
from tuneforge.store.states import JobStatus
from tuneforge.store.tables import CheckpointRow, FileRow, JobRow

_STEP_SUFFIX = re.compile(r"^(?P<name>.+?):(?P<step>\d+)$")


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
    """`lora` or `full`, as the job was planned."""
    return plan_of(job).hyper.training_type


def is_completed(job: JobRow) -> bool:
    return job.status == JobStatus.COMPLETED


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


@dataclass(frozen=True)
class Weights:
    """The stored folder a reference means: an intermediate checkpoint, or the job's final weights."""

    prefix: str
    step: int
    intermediate: bool
    adapter: bool  # the folder holds a LoRA adapter (else whole weights)


class MissingWeights(Exception):
    """The reference names weights the job does not have; the message says what it has instead. `unfinished`:
    the job has no final weights yet (rather than no checkpoint at the step named)."""

    def __init__(self, message: str, *, unfinished: bool) -> None:
        super().__init__(message)
        self.unfinished = unfinished


def weights_at(job: JobRow, checkpoints: list[CheckpointRow], *, step: int | None, final_variant: str) -> Weights:
    """The weights of `job` at `step` (an intermediate checkpoint, or the final step of a completed job), or its
    final `final_variant` (`adapter`, `merged`, `model`) when no step is named.

    Raises:
        MissingWeights: no checkpoint at that step, or no final weights yet.
    """
    lora = training_type_of(job) == "lora"
    done = is_completed(job)
    last = final_step(job, checkpoints)
    if step:
        rows = [c for c in checkpoints if c.kind == "intermediate" and c.step == step]
        if rows:
            return Weights(prefix=rows[-1].path, step=step, intermediate=True, adapter=lora)
        if not (done and step == last):
            have = sorted({c.step for c in checkpoints if c.kind == "intermediate"})
            raise MissingWeights(
                f"{job.id} has no checkpoint at step {step} (its checkpoints: {', '.join(map(str, have)) or 'none'})",
                unfinished=False,
            )
    if not done:
        raise MissingWeights(
            f"{job.id} is {job.status}: the job has no final weights yet; only a completed job has them; name one "
            f"of its intermediate checkpoints by its step",
            unfinished=True,
        )
    return Weights(prefix=final_prefix(job.id, final_variant), step=last, intermediate=False,
                   adapter=final_variant == "adapter")  # fmt: skip


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
