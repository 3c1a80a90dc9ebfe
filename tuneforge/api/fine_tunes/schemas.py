"""Wire models of the fine-tuning API (contract section 3).

Requests accept every key the together SDK and CLI can send and ignore the rest; value ranges are checked
by the service so that all problems are reported at once. Answers follow the SDK's generated models and,
where they differ, its hand-written ones too (both spellings of the training-file counters).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from tuneforge.api.bodies import RequestBody
from tuneforge.jobs.request import (
    FineTuneCreate,
    LrSchedulerArgsIn,
    LrSchedulerIn,
    MultimodalParamsIn,
    TrainingMethodIn,
    TrainingTypeIn,
)


class _Lenient(RequestBody):
    model_config = ConfigDict(extra="ignore")


# -- requests (the create body is the job plan's input: it lives in jobs/request.py) -----------------------------

__all__ = [
    "FineTuneCreate",
    "LrSchedulerArgsIn",
    "LrSchedulerIn",
    "MultimodalParamsIn",
    "TrainingMethodIn",
    "TrainingTypeIn",
]


class EstimatePriceRequest(_Lenient):
    """`POST /fine-tunes/estimate-price` (api-contract 3.3); `""` and `null` both mean "absent"."""

    training_file: str
    validation_file: str | None = None
    model: str | None = None
    from_checkpoint: str | None = None
    n_epochs: int | None = None
    n_evals: int | None = None
    training_method: dict[str, Any] | None = None
    training_type: dict[str, Any] | None = None


class PreviewRequest(_Lenient):
    """`POST /fine-tunes/preview` (api-contract 3.10). Ranges and the method are checked by the service."""

    model: str
    training_file: str
    top_k: int | None = None
    train_on_inputs: StrictBool | None = None  # absent: as a job's "auto"
    training_method: str | None = None


# -- answers -----------------------------------------------------------------------------------------------


class LoraTrainingLimits(BaseModel):
    default_rank: int
    max_rank: int
    min_batch_size: int
    max_batch_size: int
    max_batch_size_dpo: int
    target_modules: list[str]


class FullTrainingLimits(BaseModel):
    min_batch_size: int
    max_batch_size: int
    max_batch_size_dpo: int


class ModelLimitsPublic(BaseModel):
    model_name: str
    lora_training: LoraTrainingLimits
    full_training: FullTrainingLimits | None
    max_seq_length_sft: int
    max_seq_length_dpo: int
    min_max_seq_length: int
    supports_vision: bool
    supports_full_training: bool
    supports_tools: bool
    supports_reasoning: bool
    max_num_epochs: int
    max_num_evals: int
    max_num_checkpoints: int
    min_learning_rate: float
    max_learning_rate: float
    default_gradient_accumulation_steps: int
    merge_output_lora: bool


UnavailableReason = Literal[
    "multimodal_dataset",
    "train_file_not_validated",
    "eval_file_not_validated",
    "train_file_invalid",
    "eval_file_invalid",
]


class EstimatePricePublic(BaseModel):
    """Either an estimate (`estimation_available: true`) or the reason there is none; sent without nulls."""

    estimation_available: bool
    unavailable_reason: UnavailableReason | None = None
    estimated_total_price: float | None = None
    allowed_to_proceed: bool | None = None
    estimated_train_token_count: float | None = None
    estimated_eval_token_count: float | None = None
    user_limit: float | None = None


class FineTuneEventPublic(BaseModel):
    """One event (api-contract 3.7); the event's data keys (step, checkpoint_path, token_count, ...) ride along."""

    model_config = ConfigDict(extra="allow")

    object: Literal["fine-tune-event"] = "fine-tune-event"
    created_at: str
    message: str
    type: str
    level: str | None = None


class FineTuneEventList(BaseModel):
    data: list[FineTuneEventPublic]


class ProgressPublic(BaseModel):
    estimate_available: bool
    seconds_remaining: int


class FineTunePublic(BaseModel):
    """The job object (api-contract 3.5). Every key is sent, null when unknown, so both SDK models parse it."""

    id: str
    status: str
    user_id: str
    created_at: str
    updated_at: str
    started_at: str | None = None
    model: str | None = None
    model_output_name: str | None = None
    model_output_path: str | None = None
    adapter_output_name: str | None = None
    training_file: str | None = None
    validation_file: str | None = None
    training_type: dict[str, Any] | None = None
    training_method: dict[str, Any] | None = None
    lr_scheduler: dict[str, Any] | None = None
    n_epochs: int | None = None
    n_checkpoints: int | None = None
    n_evals: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    warmup_ratio: float | None = None
    max_grad_norm: float | None = None
    weight_decay: float | None = None
    max_seq_length: int | None = None
    packing: bool | None = None
    random_seed: int | None = None
    suffix: str | None = None
    train_on_inputs: bool | Literal["auto"] | None = None
    multimodal_params: dict[str, Any] | None = None
    from_checkpoint: str | None = None
    from_hf_model: str | None = None
    hf_model_revision: str | None = None
    wandb_project_name: str | None = None
    wandb_name: str | None = None
    wandb_entity: str | None = None
    wandb_base_url: str | None = None
    wandb_url: str | None = None
    token_count: int | None = None
    param_count: int | None = None
    trainingfile_numlines: int | None = None
    trainingfile_size: int | None = None
    training_file_num_lines: int | None = Field(default=None, serialization_alias="TrainingFileNumLines")
    training_file_size: int | None = Field(default=None, serialization_alias="TrainingFileSize")
    total_steps: int | None = None
    steps_completed: int | None = None
    epochs_completed: int | None = None
    evals_completed: int | None = None
    eval_steps: int | None = None
    queue_depth: int | None = None
    progress: ProgressPublic
    total_price: int
    early_stopped: bool | None = None
    early_stopping_best_step: int | None = None
    early_stopping_best_metric: float | None = None
    tokenized_dataset_path: str | None = None
    tokenized_dataset_uploaded_at: str | None = None
    owner_address: str | None = None
    job_id: str
    error: str | None = None
    events: list[FineTuneEventPublic] | None = None


class FineTuneList(BaseModel):
    data: list[FineTunePublic]


class FineTuneDeleted(BaseModel):
    message: str


class CheckpointPublic(BaseModel):
    checkpoint_type: str
    created_at: str
    path: str
    step: int
    checkpoint: Literal["model", "adapter"] | None = None


class CheckpointList(BaseModel):
    data: list[CheckpointPublic]


class MetricList(BaseModel):
    metrics: list[dict[str, int | float]]


class TokenizedDatasetPublic(BaseModel):
    url: str
    filename: str
    size: int
    content_type: str
    expires_at: str


class PreviewRow(BaseModel):
    """One sampled row as training tokenizes it; `labels` -100 where a token is not trained."""

    input_ids: list[int]
    labels: list[int]
    tokens: list[str]
    num_tokens: int
    num_trained_tokens: int
    trained_spans: list[list[int]]
    truncated: bool


class PreviewPublic(BaseModel):
    dataset_format: Literal["general", "conversation", "instruction"]
    max_seq_length: int
    model: str
    train_on_inputs: bool
    rows: list[PreviewRow]
