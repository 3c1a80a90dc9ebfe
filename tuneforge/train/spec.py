"""TrainSpec: the frozen, versioned contract between the job queue and a training process.

Everything a recipe needs, resolved: model source, data locations, hyperparameters, output location,
seed. `python -m tuneforge.train spec.json` runs it standalone, without the server or the database.
Secrets (the W&B key) are never in the spec; the executor hands them over in the environment.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

import msgspec

from tuneforge.catalog.source import ModelSource

SPEC_VERSION = 1

__all__ = ["Hyper", "InitWeights", "ModelSource", "Resume", "TrainSpec", "WandbConfig", "load_spec"]


class InitWeights(msgspec.Struct, frozen=True, kw_only=True):
    """Weights to start from (from_checkpoint): a checkpoint or output folder in the blob store."""

    key: str  # blob prefix of the folder
    adapter: bool  # the folder holds a LoRA adapter (else full weights)
    step: int = 0


class Resume(msgspec.Struct, frozen=True, kw_only=True):
    """Continue an interrupted run of this same job from one of its checkpoints."""

    key: str
    step: int


class Hyper(msgspec.Struct, frozen=True, kw_only=True):
    training_type: Literal["lora", "full"] = "lora"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | Literal["all-linear"] = "all-linear"
    n_epochs: int = 1
    n_checkpoints: int = 1
    n_evals: int = 0
    batch_size: int | Literal["max"] = "max"
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-5
    lr_scheduler_type: Literal["linear", "cosine"] = "cosine"
    min_lr_ratio: float = 0.0
    scheduler_num_cycles: float = 0.5
    warmup_ratio: float = 0.0
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    max_seq_length: int = 2048
    packing: bool = True
    train_on_inputs: bool | Literal["auto"] = "auto"
    seed: int = 42
    early_stopping_enabled: bool = False
    early_stopping_patience: int = 2
    early_stopping_min_delta: float = 0.0
    early_stopping_warmup_evals: int = 1
    # DPO (used by the dpo recipe only)
    dpo_beta: float = 0.1
    dpo_normalize_logratios_by_length: bool = False
    dpo_reference_free: bool = False
    rpo_alpha: float = 0.0
    simpo_gamma: float = 0.0


class WandbConfig(msgspec.Struct, frozen=True, kw_only=True):
    project: str | None = None
    name: str | None = None
    entity: str | None = None
    base_url: str | None = None


class TrainSpec(msgspec.Struct, frozen=True, kw_only=True):
    """One training run. Paths under `work_dir` are local; `*_key` names are BlobStore keys."""

    version: int = SPEC_VERSION
    job_id: str
    attempt: int = 0
    recipe: str = "sft"
    model: ModelSource
    storage_url: str
    cache_dir: str  # where converted / downloaded base models are kept
    work_dir: str  # local scratch: checkpoints before upload, tokenized data
    events_path: str  # JSON lines written by the recipe (see train/events.py)
    training_file_key: str
    training_file_type: str = "jsonl"
    validation_file_key: str | None = None
    output_prefix: str  # blob prefix for checkpoints and the final output
    output_name: str
    hyper: Hyper = msgspec.field(default_factory=Hyper)
    init: InitWeights | None = None
    resume: Resume | None = None
    wandb: WandbConfig | None = None
    device: str = "cpu"
    num_threads: int | None = None
    dtype: Literal["auto", "fp32", "bf16"] = "auto"  # compute dtype; auto: bf16 autocast where bf16 is fast

    def to_json(self) -> bytes:
        return msgspec.json.encode(self)

    def digest(self) -> str:
        """A stable hash of what the run computes (attempt, paths and resume point excluded)."""
        data: dict[str, Any] = msgspec.to_builtins(self)
        for volatile in ("attempt", "resume", "work_dir", "events_path", "cache_dir", "storage_url"):
            data.pop(volatile, None)
        return hashlib.sha256(msgspec.json.encode(data, order="sorted")).hexdigest()


def load_spec(raw: bytes) -> TrainSpec:
    """Decode a spec, refusing versions this code does not know."""
    version = msgspec.json.decode(raw, type=dict[str, Any]).get("version", SPEC_VERSION)
    if version > SPEC_VERSION:
        raise ValueError(f"TrainSpec version {version} is newer than this tuneforge ({SPEC_VERSION})")
    return msgspec.json.decode(raw, type=TrainSpec)
