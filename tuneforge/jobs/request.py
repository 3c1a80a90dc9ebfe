"""The body of `POST /fine-tunes`, as the together SDK and CLI send it: the input of `jobs/plan.build_plan`.

Accepts every key the SDK and CLI can send and ignores the rest. `None` means "not sent": every default and every
range check lives in the plan builder, so that one 400 names every bad parameter. The API's wire models
(`api/fine_tunes/schemas.py`) re-export these.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, StrictBool


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TrainingTypeIn(_Lenient):
    """`{"type": "Lora", "lora_r", "lora_alpha", "lora_dropout", "lora_trainable_modules"}` or `{"type": "Full"}`."""

    type: str | None = None
    lora_r: int | None = None
    lora_alpha: int | None = None
    lora_dropout: float | None = None
    lora_trainable_modules: str | None = None


class TrainingMethodIn(_Lenient):
    method: str = "sft"
    train_on_inputs: StrictBool | Literal["auto"] | None = None
    dpo_beta: float | None = None
    dpo_normalize_logratios_by_length: bool | None = None
    dpo_reference_free: bool | None = None
    rpo_alpha: float | None = None
    simpo_gamma: float | None = None


class LrSchedulerArgsIn(_Lenient):
    min_lr_ratio: float | None = None
    num_cycles: float | None = None


class LrSchedulerIn(_Lenient):
    lr_scheduler_type: str = "cosine"
    lr_scheduler_args: LrSchedulerArgsIn | None = None


class MultimodalParamsIn(_Lenient):
    train_vision: bool = False


class FineTuneCreate(_Lenient):
    """The body of `POST /fine-tunes` (api-contract 3.4). `None` means "not sent"; defaults are applied later."""

    training_file: str
    validation_file: str | None = None
    model: str | None = None
    from_checkpoint: str | None = None
    from_hf_model: str | None = None
    hf_model_revision: str | None = None
    hf_api_token: str | None = None
    hf_output_repo_name: str | None = None
    n_epochs: int | None = None
    n_checkpoints: int | None = None
    n_evals: int | None = None
    batch_size: int | Literal["max"] | None = None
    gradient_accumulation_steps: int | None = None
    learning_rate: float | None = None
    lr_scheduler: LrSchedulerIn | None = None
    warmup_ratio: float | None = None
    max_grad_norm: float | None = None
    weight_decay: float | None = None
    max_seq_length: int | None = None
    packing: bool | None = None
    training_type: TrainingTypeIn | None = None
    training_method: TrainingMethodIn | None = None
    multimodal_params: MultimodalParamsIn | None = None
    suffix: str | None = None
    wandb_key: str | None = None
    wandb_base_url: str | None = None
    wandb_project_name: str | None = None
    wandb_name: str | None = None
    wandb_entity: str | None = None
    random_seed: int | None = None
    early_stopping_enabled: bool | None = None
    early_stopping_patience: int | None = None
    early_stopping_min_delta: float | None = None
    early_stopping_warmup_evals: int | None = None
