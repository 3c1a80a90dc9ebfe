"""LoRA adapters for serving: reading peft's saved format (with the checks that refuse what the engine cannot apply)
and the LRU of loaded adapters, bounded by slot count and bytes, that never evicts an adapter a request holds.

peft's format: `adapter_config.json` (`r`, `lora_alpha`, `use_rslora`, `target_modules`, `rank_pattern`,
`alpha_pattern`, ...) and `adapter_model.safetensors` with keys `base_model.model.<module>.lora_A.weight` [r, in]
and `...lora_B.weight` [out, r]. The scale of a module is alpha / r (alpha / sqrt(r) with rsLoRA), alpha and r
from the patterns where they name the module. tuneforge's training saves exactly this (`save_embedding_layers=False`,
no `modules_to_save`).

Refused, with an `EngineError` that says why: DoRA, LoRA biases, fan_in_fan_out, modules_to_save or any weight
that is not a lora_A / lora_B pair (a saved lm_head or embed_tokens, trainable tokens, embedding LoRA), a target the
base model does not have, and a shape that differs from the base model's (another architecture or size).

The registry keeps its own order and counts; the engine writes weights into slots. A request pins its adapter from
`generate()` until it ends, so a running or waiting request's adapter is never evicted. A request that names an
adapter never loaded, or evicted before the request came, gets `UnknownAdapter`: the server above loads it again
(`load_adapter`) and retries.
"""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from tuneforge.serve.types import AdapterStats, EngineError, EngineOverloaded, UnknownAdapter

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<which>lora_A|lora_B)(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class LoraWeights:
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float


@dataclass(frozen=True)
class AdapterFiles:
    """One adapter read from disk: its low-rank pairs by base-model module name, and their size in bytes."""

    modules: dict[str, LoraWeights]
    nbytes: int
    rank: int


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's `get_pattern_key`: the first pattern key that ends the module name (as a regex) gives its value."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter(folder: Path, shapes: dict[str, tuple[int, int]], dtype: torch.dtype) -> AdapterFiles:
    """Read and check a peft LoRA adapter folder against the base model's LoRA-able layers `shapes`
    (module name -> (out, in)); the weights come back in `dtype`, on the CPU."""
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise EngineError(f"{folder} is not a LoRA adapter folder: it needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise EngineError(f"{config_path} is not readable JSON: {exc}") from exc
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise EngineError(f"only LoRA adapters can be served; this one is {peft_type}")
    if config.get("use_dora"):
        raise EngineError("DoRA adapters (use_dora) cannot be served by the multi-adapter engine; merge it instead")
    if config.get("modules_to_save"):
        raise EngineError(
            f"the adapter also saves whole modules ({config['modules_to_save']}): only LoRA weights can be served "
            "on a shared base model"
        )
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise EngineError("adapters that train biases (bias / lora_bias) cannot be served")
    if config.get("fan_in_fan_out"):
        raise EngineError("fan_in_fan_out adapters (GPT-2 style Conv1D layers) cannot be served")
    if config.get("trainable_token_indices") or config.get("target_parameters"):
        raise EngineError("adapters with trainable tokens or target_parameters cannot be served")
    try:
        tensors = load_file(str(weights_path))
    except Exception as exc:  # safetensors raises its own error types
        raise EngineError(f"{weights_path} is not a readable safetensors file: {exc}") from exc

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            what = "lm_head" if "lm_head" in key else "embed_tokens" if "embed_tokens" in key else "a non-LoRA weight"
            raise EngineError(f"the adapter carries {what} ({key}): only lora_A / lora_B weights can be served")
        pairs.setdefault(match["module"], {})[match["which"]] = tensor
    if not pairs:
        raise EngineError(f"{weights_path} holds no LoRA weights")

    r_default = int(config.get("r", 8))
    alpha_default = float(config.get("lora_alpha", r_default))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora", False))
    modules: dict[str, LoraWeights] = {}
    nbytes = 0
    rank = 0
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            raise EngineError(f"the adapter's {module} has {sorted(pair)} but needs both lora_A and lora_B")
        if module not in shapes:
            raise EngineError(
                f"the adapter targets {module}, which this base model does not have as a LoRA-able linear layer: "
                "it was trained on another architecture"
            )
        a, b = pair["lora_A"], pair["lora_B"]
        out_f, in_f = shapes[module]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_f or b.shape[0] != out_f or a.shape[0] != b.shape[1]:
            raise EngineError(
                f"the adapter's {module} has shapes A {tuple(a.shape)} / B {tuple(b.shape)}, which do not fit the "
                f"base model's [{out_f} x {in_f}] layer: it was trained on another base model"
            )
        r = int(a.shape[0])
        r_config = int(_pattern_value(rank_pattern, module, r_default))
        alpha = float(_pattern_value(alpha_pattern, module, alpha_default))
        scale = alpha / math.sqrt(r_config) if rslora else alpha / r_config
        modules[module] = LoraWeights(a.to(dtype), b.to(dtype), scale)
        nbytes += modules[module].a.nbytes + modules[module].b.nbytes
        rank = max(rank, r)
    return AdapterFiles(modules, nbytes, rank)


@dataclass
class _Entry:
    slot: int
    nbytes: int
    pins: int = 0


class AdapterRegistry:
    """Names -> slots (1..max_count), least recently used first; bounded by count and bytes, pinned ones kept."""

    def __init__(self, max_count: int, max_bytes: int) -> None:
        if max_count < 1:
            raise ValueError("max_loras must be at least 1")
        self.max_count = max_count
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def plan_load(self, name: str, nbytes: int) -> tuple[int, list[tuple[str, int]]]:
        """The slot a new adapter of `nbytes` goes to, and the (name, slot) pairs to evict first (least recently
        used, unpinned). Changes nothing; raises EngineOverloaded when pinned adapters leave no room."""
        if nbytes > self.max_bytes:
            raise EngineOverloaded(f"adapter {name!r} needs {nbytes} bytes, more than the limit of {self.max_bytes}")
        count, total = len(self._entries), self.nbytes
        victims: list[tuple[str, int]] = []
        for other, entry in self._entries.items():
            if count < self.max_count and total + nbytes <= self.max_bytes:
                break
            if entry.pins:
                continue
            victims.append((other, entry.slot))
            count -= 1
            total -= entry.nbytes
        if count >= self.max_count or total + nbytes > self.max_bytes:
            raise EngineOverloaded(
                f"no room for adapter {name!r}: every loaded adapter is in use by a running request; retry later"
            )
        used = {e.slot for e in self._entries.values()} - {slot for _, slot in victims}
        slot = next(s for s in range(1, self.max_count + 1) if s not in used)
        return slot, victims

    def add(self, name: str, slot: int, nbytes: int, evicted: list[tuple[str, int]]) -> None:
        for other, _ in evicted:
            del self._entries[other]
            self.evictions += 1
        self._entries[name] = _Entry(slot, nbytes)

    def touch(self, name: str) -> None:
        self._entries.move_to_end(name)

    def remove(self, name: str) -> int:
        """Forget `name` (it must be unpinned); returns its slot."""
        entry = self._entries.get(name)
        if entry is None:
            raise UnknownAdapter(f"adapter {name!r} is not loaded")
        if entry.pins:
            raise EngineError(f"adapter {name!r} is in use by {entry.pins} request(s); unload it when they end")
        del self._entries[name]
        return entry.slot

    def acquire(self, name: str) -> int:
        """Pin `name` for one request and mark it most recently used; its slot. UnknownAdapter when not loaded."""
        entry = self._entries.get(name)
        if entry is None:
            self.misses += 1
            raise UnknownAdapter(f"adapter {name!r} is not loaded (never loaded, or evicted): load it and retry")
        self.hits += 1
        entry.pins += 1
        self._entries.move_to_end(name)
        return entry.slot

    def release(self, name: str) -> None:
        entry = self._entries.get(name)
        if entry is not None and entry.pins > 0:
            entry.pins -= 1

    def stats(self) -> AdapterStats:
        return AdapterStats(
            loaded=tuple(self._entries),
            count=len(self._entries),
            bytes=self.nbytes,
            max_count=self.max_count,
            max_bytes=self.max_bytes,
            hits=self.hits,
            misses=self.misses,
            evictions=self.evictions,
        )
