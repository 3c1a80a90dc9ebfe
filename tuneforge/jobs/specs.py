"""A claimed job -> its TrainSpec: the job's plan plus this attempt's paths and where it resumes."""

from __future__ import annotations

import os

from tuneforge.settings import Settings
from tuneforge.storage.layout import file_key, job_prefix
from tuneforge.store.tables import CheckpointRow, JobRow
from tuneforge.train.spec import JobPlan, Resume, TrainSpec


def work_dir(settings: Settings, job_id: str) -> str:
    return str(settings.home / "work" / job_id)


def build_spec(
    job: JobRow, plan: JobPlan, *, settings: Settings, attempt: int, resume_from: CheckpointRow | None
) -> TrainSpec:
    wdir = work_dir(settings, job.id)
    return TrainSpec(
        job_id=job.id,
        attempt=attempt,
        plan=plan,
        storage_url=settings.storage_url,
        cache_dir=str(settings.home / "models"),
        work_dir=wdir,
        events_path=os.path.join(wdir, f"events-{attempt}.jsonl"),
        training_file_key=file_key(plan.training_file),
        validation_file_key=file_key(plan.validation_file) if plan.validation_file else None,
        output_prefix=job_prefix(job.id),
        output_name=job.output_name,
        resume=Resume(key=resume_from.path, step=resume_from.step) if resume_from is not None else None,
        device=settings.train_device,
        num_threads=settings.train_threads,
        dtype=settings.train_dtype,
        processes=_processes(plan, settings),
    )


def _processes(plan: JobPlan, settings: Settings) -> int:
    """Data-parallel processes for the run: the setting's, for SFT on a text model. DPO trains in one process (its
    recipe has no data-parallel path), and so does a vision-language model (its examples carry images, which the
    SFT recipe does not share among processes)."""
    if plan.method != "sft" or plan.train_vision is not None:
        return 1
    return settings.train_processes
