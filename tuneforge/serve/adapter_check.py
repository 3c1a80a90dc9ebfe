"""What a LoRA adapter folder carries, checked before a model server is asked to load it (torch-free: the API process
runs it before every adapter load, for every backend).

A served adapter holds LoRA factors only. Whole weights saved beside them (peft's `modules_to_save`, e.g. a trained
`lm_head`) and anything on the embeddings or the output head (`embed_tokens`, `lm_head`: resized vocabularies,
trainable tokens) are refused: vLLM refuses to load them, and tuneforge's engine does too. A vLLM server is started
with a largest LoRA rank (`--max-lora-rank`); an adapter above it is refused here with the setting to change,
rather than by vLLM with a stack trace.

The tensor names are read from the safetensors header (8 bytes of length, then JSON), without loading any tensor.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Module names whose weights an adapter must not carry.
REFUSED_MODULES = ("lm_head", "embed_tokens")
# A safetensors header larger than this is not one tuneforge wrote (an adapter's holds a few thousand names).
_MAX_HEADER_BYTES = 64 << 20


class AdapterRefused(ValueError):
    """The adapter cannot be served as a LoRA; the message says what it carries."""


def tensor_names(path: Path) -> list[str]:
    """The tensor names of a safetensors file, from its header alone."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise AdapterRefused(f"{path.name} is not a safetensors file (it is {len(head)} bytes long)")
        (size,) = struct.unpack("<Q", head)
        if size > _MAX_HEADER_BYTES:
            raise AdapterRefused(f"{path.name} is not a safetensors file (its header would be {size} bytes)")
        raw = fh.read(size)
    try:
        header = json.loads(raw)
    except ValueError:
        raise AdapterRefused(f"{path.name} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise AdapterRefused(f"{path.name} is not a safetensors file (its header is not a JSON object)")
    return [k for k in header if k != "__metadata__"]


def _names(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [str(v) for v in value]
    return []


def _refused_part(name: str) -> str | None:
    parts = name.split(".")
    return next((m for m in REFUSED_MODULES if m in parts), None)


def _rank(config: dict[str, Any]) -> int:
    ranks = [config.get("r")]
    pattern = config.get("rank_pattern")
    if isinstance(pattern, dict):
        ranks += list(pattern.values())
    return max((r for r in ranks if isinstance(r, int)), default=0)


def adapter_problems(folder: Path, *, max_rank: int | None = None) -> list[str]:
    """What keeps the adapter in `folder` from being served (empty when nothing does)."""
    config_path = folder / ADAPTER_CONFIG
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        return [f"it has no {ADAPTER_CONFIG}"]
    except ValueError:
        return [f"its {ADAPTER_CONFIG} is not JSON"]
    if not isinstance(config, dict):
        return [f"its {ADAPTER_CONFIG} is not a JSON object"]
    problems = []
    saved = _names(config.get("modules_to_save"))
    if saved:
        problems.append(f"it carries whole weights of {', '.join(saved)} (adapter_config.json modules_to_save)")
    if config.get("trainable_token_indices"):
        problems.append("it carries trained token embeddings (adapter_config.json trainable_token_indices)")
    weights = folder / ADAPTER_WEIGHTS
    if weights.is_file():
        carried: dict[str, list[str]] = {}
        for name in tensor_names(weights):
            module = _refused_part(name)
            if module is not None:
                carried.setdefault(module, []).append(name)
        for module, names in carried.items():
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            problems.append(f"it carries {module} weights ({shown})")
    rank = _rank(config)
    if max_rank is not None and rank > max_rank:
        problems.append(f"its LoRA rank {rank} is above the largest this server loads ({max_rank}, "
                        "TUNEFORGE_VLLM_MAX_LORA_RANK)")  # fmt: skip
    return problems


def check_adapter(folder: Path, *, max_rank: int | None = None) -> None:
    """Raise AdapterRefused, naming what the adapter carries, unless it can be served as a LoRA."""
    problems = adapter_problems(folder, max_rank=max_rank)
    if problems:
        raise AdapterRefused(
            "the adapter cannot be served: " + "; ".join(problems) + ". A served adapter holds LoRA weights only, "
            "none of lm_head or embed_tokens (vLLM refuses them)"
        )
