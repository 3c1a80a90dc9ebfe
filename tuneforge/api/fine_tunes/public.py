"""Rows -> wire objects: the job object (api-contract 3.5), its events (3.7), checkpoints (3.8) and metrics (3.9).

Pure shaping: callers pass every row and fact in; nothing here queries the store. Secrets never appear.
"""

from __future__ import annotations

import math
from typing import Any, get_args

from tuneforge.api.fine_tunes.schemas import (
    CheckpointPublic,
    FineTuneEventPublic,
    FineTunePublic,
    FullTrainingLimits,
    LoraTrainingLimits,
    ModelLimitsPublic,
    ProgressPublic,
)
from tuneforge.api.timestamps import iso
from tuneforge.catalog.entries import ModelEntry
from tuneforge.jobs.references import final_step, is_completed
from tuneforge.jobs.stored_plan import plan_of
from tuneforge.storage.layout import final_prefix
from tuneforge.store.tables import CheckpointRow, JobEventRow, JobMetricRow, JobRow
from tuneforge.train.events import EventType
from tuneforge.train.spec import JobPlan

NANO = 1_000_000_000
_EVENT_KEYS = frozenset({"object", "created_at", "message", "type", "level", "tuneforge_type"})
_SECRET_ENDINGS = ("_key", "api_token", "hf_token", "secret", "password")


def _int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return int(value)


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def total_price_nano(row: JobRow, plan: JobPlan, price_per_token: float) -> int:
    """tokens x epochs x price, in nano-dollars (the CLI divides by 1e9); 0 until the tokens are counted."""
    tokens = _int((row.progress or {}).get("token_count")) or 0
    return round(tokens * plan.hyper.n_epochs * price_per_token * NANO)


def output_key(row: JobRow, plan: JobPlan) -> str:
    """Where the job's main final weights are: the merged model of a LoRA job, the model of a full one."""
    return final_prefix(row.id, "model" if plan.hyper.training_type == "full" else "merged")


def training_type_public(plan: JobPlan) -> dict[str, Any]:
    h = plan.hyper
    if h.training_type == "full":
        return {"type": "Full"}
    modules = h.lora_target_modules
    return {"type": "Lora", "lora_r": h.lora_r, "lora_alpha": h.alpha, "lora_dropout": h.lora_dropout,
            "lora_trainable_modules": modules if isinstance(modules, str) else ",".join(modules)}  # fmt: skip


def training_method_public(plan: JobPlan) -> dict[str, Any]:
    h = plan.hyper
    if plan.method == "dpo":
        return {"method": "dpo", "dpo_beta": h.dpo_beta, "dpo_normalize_logratios_by_length":
                h.dpo_normalize_logratios_by_length, "dpo_reference_free": h.dpo_reference_free,
                "rpo_alpha": h.rpo_alpha, "simpo_gamma": h.simpo_gamma}  # fmt: skip
    return {"method": "sft", "train_on_inputs": h.train_on_inputs}


def lr_scheduler_public(plan: JobPlan) -> dict[str, Any]:
    h = plan.hyper
    args: dict[str, Any] = {"min_lr_ratio": h.min_lr_ratio}
    if h.lr_scheduler_type == "cosine":
        args["num_cycles"] = h.scheduler_num_cycles
    return {"lr_scheduler_type": h.lr_scheduler_type, "lr_scheduler_args": args}


def job_public(
    row: JobRow,
    *,
    price_per_token: float,
    queue_depth: int | None = None,
    events: list[JobEventRow] | None = None,
    tokenized_path: str | None = None,
) -> FineTunePublic:
    """The job object, rendered from the job's plan and the progress its run reported."""
    plan = plan_of(row)
    h = plan.hyper
    prog: dict[str, Any] = row.progress or {}
    # The batch a run reports (examples per step, "max" resolved); before that, the asked size or the model's max.
    batch_size = _int(prog.get("batch_size")) or (
        h.batch_size if isinstance(h.batch_size, int) else plan.max_batch_size
    )
    wandb = plan.wandb
    return FineTunePublic(
        id=row.id,
        status=row.status,
        user_id=row.owner,
        created_at=iso(row.created_at) or "",
        updated_at=iso(row.updated_at) or "",
        started_at=iso(row.started_at),
        model=row.model,
        model_output_name=row.output_name,
        model_output_path=output_key(row, plan) if is_completed(row) else None,
        adapter_output_name=None,
        training_file=row.training_file,
        validation_file=row.validation_file,
        training_type=training_type_public(plan),
        training_method=training_method_public(plan),
        lr_scheduler=lr_scheduler_public(plan),
        n_epochs=h.n_epochs,
        n_checkpoints=h.n_checkpoints,
        n_evals=h.n_evals,
        batch_size=batch_size,
        learning_rate=h.learning_rate,
        warmup_ratio=h.warmup_ratio,
        max_grad_norm=h.max_grad_norm,
        weight_decay=h.weight_decay,
        max_seq_length=h.max_seq_length,
        packing=h.packing,
        random_seed=h.seed,
        suffix=plan.suffix,
        train_on_inputs=h.train_on_inputs if plan.method == "sft" else None,
        multimodal_params={"train_vision": plan.train_vision} if plan.train_vision is not None else None,
        from_checkpoint=plan.from_checkpoint,
        from_hf_model=plan.from_hf_model,
        hf_model_revision=plan.hf_model_revision,
        wandb_project_name=wandb.project if wandb else None,
        wandb_name=wandb.name if wandb else None,
        wandb_entity=wandb.entity if wandb else None,
        wandb_base_url=wandb.base_url if wandb else None,
        wandb_url=prog.get("wandb_url"),
        token_count=_int(prog.get("token_count")),
        param_count=_int(prog.get("param_count")),
        trainingfile_numlines=plan.training_file_lines,
        trainingfile_size=plan.training_file_bytes,
        training_file_num_lines=plan.training_file_lines,
        training_file_size=plan.training_file_bytes,
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
        total_price=total_price_nano(row, plan, price_per_token),
        early_stopped=prog.get("early_stopped"),
        early_stopping_best_step=_int(prog.get("early_stopping_best_step")),
        early_stopping_best_metric=_float(prog.get("early_stopping_best_metric")),
        tokenized_dataset_path=tokenized_path,
        owner_address=None,
        job_id=row.id,
        error=row.error,
        events=[event_public(e) for e in events] if events is not None else None,
    )


# tuneforge's own event types shown under the together SDK's nearest type (its enum is closed: a client with
# strict response validation rejects any other); the exact type rides along as `tuneforge_type`.
WIRE_EVENT_TYPE: dict[str, str] = {"eval_complete": "epoch_complete"}


def wire_event_type(type_: str) -> str:
    """The SDK enum member an event type is shown as (`warning` for a type unknown to this version)."""
    if type_ in WIRE_EVENT_TYPE:
        return WIRE_EVENT_TYPE[type_]
    return type_ if type_ in _SDK_EVENT_TYPES else "warning"


_SDK_EVENT_TYPES = frozenset(get_args(EventType)) - frozenset(WIRE_EVENT_TYPE)


def event_public(ev: JobEventRow) -> FineTuneEventPublic:
    """The event with its data keys alongside; a key that looks like a credential is never shown."""
    extra = {
        k: v for k, v in (ev.data or {}).items() if k not in _EVENT_KEYS and not k.lower().endswith(_SECRET_ENDINGS)
    }
    wire = wire_event_type(ev.type)
    if wire != ev.type:
        extra["tuneforge_type"] = ev.type
    level = ev.level if ev.level in ("info", "warning", "error") else None
    return FineTuneEventPublic(created_at=iso(ev.created_at) or "", message=ev.message, type=wire, level=level,
                               **extra)  # fmt: skip


def checkpoints_public(row: JobRow, checkpoints: list[CheckpointRow], *, has_merged: bool) -> list[CheckpointPublic]:
    """Newest first: the final weights of a completed job, then its intermediate checkpoints by step."""
    lora = plan_of(row).hyper.training_type == "lora"
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
