"""JobRow -> TrainSpec: everything a run needs, resolved from the job's stored parameters."""

from __future__ import annotations

import os
from typing import Any

import msgspec

from tuneforge.settings import Settings
from tuneforge.storage.layout import job_prefix
from tuneforge.store.tables import CheckpointRow, JobRow
from tuneforge.train.spec import Hyper, InitWeights, ModelSource, Resume, TrainSpec, WandbConfig


def work_dir(settings: Settings, job_id: str) -> str:
    return str(settings.home / "work" / job_id)


def build_spec(
    job: JobRow,
    *,
    settings: Settings,
    attempt: int,
    training_file_type: str,
    resume_from: CheckpointRow | None,
) -> TrainSpec:
    params: dict[str, Any] = job.params
    request: dict[str, Any] = params.get("request", {})
    wdir = work_dir(settings, job.id)
    init = params.get("init")
    wandb = None
    if any(request.get(k) for k in ("wandb_project_name", "wandb_name", "wandb_entity", "wandb_base_url")) or (
        job.secrets or {}
    ).get("wandb_key"):
        wandb = WandbConfig(
            project=request.get("wandb_project_name"),
            name=request.get("wandb_name"),
            entity=request.get("wandb_entity"),
            base_url=request.get("wandb_base_url"),
        )
    return TrainSpec(
        job_id=job.id,
        attempt=attempt,
        recipe=params.get("method", "sft"),
        model=msgspec.convert(params["model_source"], ModelSource),
        storage_url=settings.storage_url,
        cache_dir=str(settings.home / "models"),
        work_dir=wdir,
        events_path=os.path.join(wdir, f"events-{attempt}.jsonl"),
        training_file_key=f"files/{job.training_file}",
        training_file_type=training_file_type,
        validation_file_key=f"files/{job.validation_file}" if job.validation_file else None,
        output_prefix=job_prefix(job.id),
        output_name=job.output_name,
        hyper=msgspec.convert(params.get("hyper", {}), Hyper),
        init=msgspec.convert(init, InitWeights) if init else None,
        resume=Resume(key=resume_from.path, step=resume_from.step) if resume_from is not None else None,
        wandb=wandb,
        device=settings.train_device,
        num_threads=settings.train_threads,
        dtype=settings.train_dtype,
    )
