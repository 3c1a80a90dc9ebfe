"""Rows -> wire objects: the job object (contract 3.5), its events (3.7), checkpoints (3.8) and metrics (3.9).

Pure shaping: callers pass every row and fact in; nothing here queries the store. Secrets never appear.
"""

from __future__ import annotations

import math
from typing import Any

from tuneforge.api.fine_tunes.resolve import final_step, is_completed, iso, training_type_of
from tuneforge.api.fine_tunes.schemas import CheckpointPublic, FineTuneEventPublic, FineTunePublic, ProgressPublic
from tuneforge.storage.layout import final_prefix
from tuneforge.store.tables import CheckpointRow, JobEventRow, JobMetricRow, JobRow

NANO = 1_000_000_000
_EVENT_KEYS = frozenset({"object", "created_at", "message", "type", "level"})
_SECRET_ENDINGS = ("_key", "api_token", "hf_token", "secret", "password")


def _int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return int(value)


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def total_price_nano(row: JobRow, price_per_token: float) -> int:
    """tokens x epochs x price, in nano-dollars (the CLI divides by 1e9); 0 until the tokens are counted."""
    progress = row.progress or {}
    request = (row.params or {}).get("request") or {}
    tokens = _int(progress.get("token_count")) or 0
    epochs = _int(request.get("n_epochs")) or 1
    return round(tokens * epochs * price_per_token * NANO)


def output_key(row: JobRow) -> str:
    """Where the job's main final weights are: the merged model of a LoRA job, the model of a full one."""
    return final_prefix(row.id, "model" if training_type_of(row) == "full" else "merged")


def job_public(
    row: JobRow,
    *,
    price_per_token: float,
    queue_depth: int | None = None,
    events: list[JobEventRow] | None = None,
    tokenized_path: str | None = None,
) -> FineTunePublic:
    params = row.params or {}
    req: dict[str, Any] = params.get("request") or {}
    prog: dict[str, Any] = row.progress or {}
    batch = req.get("batch_size")
    batch_size = _int(prog.get("batch_size")) or (batch if isinstance(batch, int) else _int(req.get("max_batch_size")))
    method = req.get("training_method") or {}
    numlines = _int(params.get("trainingfile_numlines"))
    size = _int(params.get("trainingfile_size"))
    return FineTunePublic(
        id=row.id,
        status=row.status,
        user_id=row.owner,
        created_at=iso(row.created_at) or "",
        updated_at=iso(row.updated_at) or "",
        started_at=iso(row.started_at),
        model=row.model,
        model_output_name=row.output_name,
        model_output_path=output_key(row) if is_completed(row) else None,
        adapter_output_name=None,
        training_file=row.training_file,
        validation_file=row.validation_file,
        training_type=req.get("training_type"),
        training_method=method or None,
        lr_scheduler=req.get("lr_scheduler"),
        n_epochs=_int(req.get("n_epochs")),
        n_checkpoints=_int(req.get("n_checkpoints")),
        n_evals=_int(req.get("n_evals")),
        batch_size=batch_size,
        learning_rate=_float(req.get("learning_rate")),
        warmup_ratio=_float(req.get("warmup_ratio")),
        max_grad_norm=_float(req.get("max_grad_norm")),
        weight_decay=_float(req.get("weight_decay")),
        max_seq_length=_int(req.get("max_seq_length")),
        packing=req.get("packing"),
        random_seed=_int(req.get("random_seed")),
        suffix=req.get("suffix"),
        train_on_inputs=method.get("train_on_inputs") if method.get("method") == "sft" else None,
        multimodal_params=req.get("multimodal_params"),
        from_checkpoint=req.get("from_checkpoint"),
        from_hf_model=req.get("from_hf_model"),
        hf_model_revision=req.get("hf_model_revision"),
        wandb_project_name=req.get("wandb_project_name"),
        wandb_name=req.get("wandb_name"),
        wandb_entity=req.get("wandb_entity"),
        wandb_base_url=req.get("wandb_base_url"),
        wandb_url=prog.get("wandb_url"),
        token_count=_int(prog.get("token_count")),
        param_count=_int(prog.get("param_count")),
        trainingfile_numlines=numlines,
        trainingfile_size=size,
        training_file_num_lines=numlines,
        training_file_size=size,
        total_steps=_int(prog.get("total_steps")),
        steps_completed=_int(prog.get("steps_completed")),
        epochs_completed=_int(prog.get("epochs_completed")),
        evals_completed=_int(prog.get("evals_completed")),
        eval_steps=_int(prog.get("eval_steps")),
        queue_depth=queue_depth,
        progress=ProgressPublic(
            estimate_available=bool(prog.get("estimate_available", False)),
            seconds_remaining=_int(prog.get("seconds_remaining")) or 0,
        ),
        total_price=total_price_nano(row, price_per_token),
        early_stopped=prog.get("early_stopped"),
        early_stopping_best_step=_int(prog.get("early_stopping_best_step")),
        early_stopping_best_metric=_float(prog.get("early_stopping_best_metric")),
        tokenized_dataset_path=tokenized_path,
        owner_address=None,
        job_id=row.id,
        error=row.error,
        events=[event_public(e) for e in events] if events is not None else None,
    )


def event_public(ev: JobEventRow) -> FineTuneEventPublic:
    """The event with its data keys alongside; a key that looks like a credential is never shown."""
    extra = {
        k: v for k, v in (ev.data or {}).items() if k not in _EVENT_KEYS and not k.lower().endswith(_SECRET_ENDINGS)
    }
    return FineTuneEventPublic(
        created_at=iso(ev.created_at) or "", message=ev.message, type=ev.type, level=ev.level or None, **extra
    )


def checkpoints_public(row: JobRow, checkpoints: list[CheckpointRow], *, has_merged: bool) -> list[CheckpointPublic]:
    """Newest first: the final weights of a completed job, then its intermediate checkpoints by step."""
    lora = training_type_of(row) == "lora"
    out: list[CheckpointPublic] = []
    if is_completed(row):
        step = final_step(row, checkpoints)
        created = iso(row.finished_at or row.updated_at) or ""
        if lora:
            if has_merged:
                out.append(
                    CheckpointPublic(
                        checkpoint_type="Final Merged",
                        created_at=created,
                        step=step,
                        path=final_prefix(row.id, "merged"),
                        checkpoint="model",
                    )
                )
            out.append(
                CheckpointPublic(
                    checkpoint_type="Final Adapter",
                    created_at=created,
                    step=step,
                    path=final_prefix(row.id, "adapter"),
                    checkpoint="adapter",
                )
            )
        else:
            out.append(
                CheckpointPublic(
                    checkpoint_type="Final",
                    created_at=created,
                    step=step,
                    path=final_prefix(row.id, "model"),
                    checkpoint="model",
                )
            )
    for c in sorted((c for c in checkpoints if c.kind == "intermediate"), key=lambda c: c.step, reverse=True):
        out.append(
            CheckpointPublic(
                checkpoint_type="Intermediate",
                created_at=iso(c.created_at) or "",
                step=c.step,
                path=c.path,
                checkpoint="adapter" if lora else "model",
            )
        )
    return out


def metrics_public(rows: list[JobMetricRow], resolution: int | None) -> list[dict[str, int | float]]:
    """Rows in time order, each with `train/global_step`; `resolution` thins train rows evenly, never evals."""
    points: list[tuple[bool, dict[str, int | float]]] = []
    for r in rows:
        values: dict[str, int | float] = {}
        for k, v in (r.values or {}).items():
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                continue
            values[k] = v
        values["train/global_step"] = int(values.get("train/global_step", r.step))
        points.append((any(k.startswith("eval/") for k in values), values))
    train = [i for i, (is_eval, _) in enumerate(points) if not is_eval]
    if resolution is not None and 0 < resolution < len(train):
        if resolution == 1:
            keep = {train[-1]}
        else:
            n = len(train)
            keep = {train[i * (n - 1) // (resolution - 1)] for i in range(resolution)}
        return [v for i, (is_eval, v) in enumerate(points) if is_eval or i in keep]
    return [v for _, v in points]
