"""JobPlan and TrainSpec: what a job will do, and the frozen, versioned contract with a training process.

`JobPlan` is the one typed record of a job, built from the request by `jobs/plan.build_plan` (which holds every
default and every check) and stored once with the job; the public job object is rendered from it. `TrainSpec` is
the plan plus paths: `python -m tuneforge.train spec.json` runs it standalone, without the server or the
database. Secrets (the W&B key, the hub token) are never in either; the executor hands them over in the
environment.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

import msgspec

from tuneforge.catalog.source import ModelSource
from tuneforge.settings import TrainDtype

SPEC_VERSION = 2
PLAN_VERSION = 1

__all__ = [
    "Hyper",
    "InitWeights",
    "JobPlan",
    "ModelSource",
    "Resume",
    "TrainSpec",
    "WandbConfig",
    "load_spec",
    "standalone_plan",
]


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
    """The resolved hyperparameters of a run. Defaults that depend on the model (sequence length, LoRA rank,
    accumulation) come from its limits in `jobs/plan.py`; the constant ones are these."""

    training_type: Literal["lora", "full"] = "lora"
    lora_r: int = 8
    lora_alpha: int | None = None  # None: 2 x lora_r (see `alpha`)
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

    @property
    def alpha(self) -> int:
        """The LoRA scaling numerator: as given, else twice the rank (the one place this default lives)."""
        return self.lora_alpha if self.lora_alpha is not None else 2 * self.lora_r


class WandbConfig(msgspec.Struct, frozen=True, kw_only=True):
    project: str | None = None
    name: str | None = None
    entity: str | None = None
    base_url: str | None = None


class JobPlan(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a job will do, resolved and checked: stored once with the job, rendered as the job object."""

    version: int = PLAN_VERSION
    method: Literal["sft", "dpo"] = "sft"
    model: str  # the catalog name whose limits apply
    model_source: ModelSource  # where the base weights come from
    training_file: str
    training_file_type: Literal["jsonl", "parquet"] = "jsonl"
    training_file_lines: int | None = None
    training_file_bytes: int = 0
    validation_file: str | None = None
    init: InitWeights | None = None  # from_checkpoint: the weights to start from
    hyper: Hyper
    max_batch_size: int  # the model's largest batch for this training type and method
    suffix: str | None = None
    from_checkpoint: str | None = None
    from_hf_model: str | None = None
    byom: bool = False  # from_hf_model is a hub repo outside the catalog; `model` names the template whose limits apply
    hf_model_revision: str | None = None
    hf_output_repo_name: str | None = None
    train_vision: bool | None = None  # None: the model is not a vision model
    wandb: WandbConfig | None = None

    def to_builtins(self) -> dict[str, Any]:
        data: dict[str, Any] = msgspec.to_builtins(self)
        return data

    @classmethod
    def from_builtins(cls, data: dict[str, Any]) -> JobPlan:
        """Decode a stored plan, refusing versions this code does not know."""
        version = int(data.get("version", PLAN_VERSION))
        if version > PLAN_VERSION:
            raise ValueError(f"JobPlan version {version} is newer than this tuneforge ({PLAN_VERSION})")
        return msgspec.convert(data, cls)


# The most examples one optimizer step takes under batch_size="max" when nothing smaller bounds it (a job's plan
# carries its model's limit in `max_batch_size`; a run also stays within what one forward holds).
MAX_EXAMPLES_PER_STEP = 64


def standalone_plan(
    model: ModelSource,
    hyper: Hyper,
    *,
    method: Literal["sft", "dpo"] = "sft",
    init: InitWeights | None = None,
    wandb: WandbConfig | None = None,
    training_file_type: Literal["jsonl", "parquet"] = "jsonl",
    train_vision: bool | None = None,
) -> JobPlan:
    """A plan for a run without the server (benchmarks, tests, a spec written by hand): no job, files or limits
    behind it, so its bookkeeping fields are placeholders."""
    return JobPlan(
        method=method, model=model.name, model_source=model, training_file="standalone",
        training_file_type=training_file_type, init=init, hyper=hyper,
        max_batch_size=hyper.batch_size if isinstance(hyper.batch_size, int) else MAX_EXAMPLES_PER_STEP, wandb=wandb,
        train_vision=train_vision,
    )  # fmt: skip


class TrainSpec(msgspec.Struct, frozen=True, kw_only=True):
    """One training run: the job's plan plus paths. Paths under `work_dir` are local; `*_key` names are
    BlobStore keys."""

    version: int = SPEC_VERSION
    job_id: str
    attempt: int = 0
    plan: JobPlan
    storage_url: str
    cache_dir: str  # where converted / downloaded base models are kept
    work_dir: str  # local scratch: checkpoints before upload, tokenized data
    events_path: str  # JSON lines written by the recipe (see train/events.py)
    training_file_key: str
    validation_file_key: str | None = None
    output_prefix: str  # blob prefix for checkpoints and the final output
    output_name: str
    resume: Resume | None = None
    device: str = "cpu"
    num_threads: int | None = None
    dtype: TrainDtype = "auto"  # compute dtype; auto: bf16 autocast where bf16 is fast
    # Data-parallel processes (`train/distributed.py`): the local executor starts the run under torchrun when > 1.
    # The same global batch trains the same curve at any number, so a checkpoint resumes at any other.
    processes: int = 1

    @property
    def hyper(self) -> Hyper:
        return self.plan.hyper

    @property
    def recipe(self) -> str:
        return self.plan.method

    @property
    def model(self) -> ModelSource:
        return self.plan.model_source

    @property
    def init(self) -> InitWeights | None:
        return self.plan.init

    @property
    def wandb(self) -> WandbConfig | None:
        return self.plan.wandb

    @property
    def training_file_type(self) -> str:
        return self.plan.training_file_type

    def to_json(self) -> bytes:
        return msgspec.json.encode(self)

    def digest(self) -> str:
        """A stable hash of what the run computes (attempt, paths and resume point excluded)."""
        data: dict[str, Any] = msgspec.to_builtins(self)
        # `processes` too: how many processes share the work changes nothing the run computes
        for volatile in ("attempt", "resume", "work_dir", "events_path", "cache_dir", "storage_url", "processes"):
            data.pop(volatile, None)
        return hashlib.sha256(msgspec.json.encode(data, order="sorted")).hexdigest()


def load_spec(raw: bytes) -> TrainSpec:
    """Decode a spec, refusing versions this code does not know."""
    version = msgspec.json.decode(raw, type=dict[str, Any]).get("version", SPEC_VERSION)
    if version != SPEC_VERSION:
        raise ValueError(f"TrainSpec version {version} is not the one this tuneforge runs ({SPEC_VERSION})")
    return msgspec.json.decode(raw, type=TrainSpec)
