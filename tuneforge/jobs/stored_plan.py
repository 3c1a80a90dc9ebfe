"""A job's stored plan, read back: `plan_of(job)` decodes `jobs.params`, upgrading the rows written before the
plan existed (hyperparameters and a request echo side by side) instead of failing on them."""

from __future__ import annotations

from typing import Any

from tuneforge.store.tables import JobRow
from tuneforge.train.spec import JobPlan


def plan_of(job: JobRow) -> JobPlan:
    params: dict[str, Any] = dict(job.params or {})
    if "version" not in params and "hyper" in params:
        params = _upgrade_legacy(job, params)
    return JobPlan.from_builtins(params)


def _upgrade_legacy(job: JobRow, params: dict[str, Any]) -> dict[str, Any]:
    """Rows of tuneforge 0.1 kept `hyper`, `request`, `model_source`, `init` and `method` beside each other."""
    request: dict[str, Any] = params.get("request") or {}
    hyper = dict(params.get("hyper") or {})
    wandb_keys = ("wandb_project_name", "wandb_name", "wandb_entity", "wandb_base_url")
    wandb = None
    if any(request.get(k) for k in wandb_keys):
        wandb = {"project": request.get("wandb_project_name"), "name": request.get("wandb_name"),
                 "entity": request.get("wandb_entity"), "base_url": request.get("wandb_base_url")}  # fmt: skip
    vision = request.get("multimodal_params")
    return {
        "version": 1,
        "method": params.get("method", "sft"),
        "model": job.model,
        "model_source": params["model_source"],
        "training_file": job.training_file,
        "training_file_lines": params.get("trainingfile_numlines"),
        "training_file_bytes": params.get("trainingfile_size") or 0,
        "training_file_type": "parquet" if params.get("dataset_format") == "parquet" else "jsonl",
        "validation_file": job.validation_file,
        "init": params.get("init"),
        "hyper": hyper,
        "max_batch_size": int(request.get("max_batch_size") or 1),
        "suffix": request.get("suffix"),
        "from_checkpoint": request.get("from_checkpoint"),
        "from_hf_model": request.get("from_hf_model"),
        "hf_model_revision": request.get("hf_model_revision"),
        "hf_output_repo_name": request.get("hf_output_repo_name"),
        "train_vision": vision.get("train_vision") if isinstance(vision, dict) else None,
        "wandb": wandb,
    }
