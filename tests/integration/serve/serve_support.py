"""Helpers of the serving-engine tests (imported by name, unlike a conftest)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import torch

from tuneforge.serve.engine import TransformersEngine
from tuneforge.serve.types import GeneratedToken, GenerationRequest, SamplingParams


def make_adapter(
    base_dir: Path,
    folder: Path,
    *,
    seed: int,
    r: int = 8,
    alpha: int = 16,
    targets: Any = "all-linear",
    rslora: bool = False,
    b_std: float = 0.3,
    **config: Any,
) -> Path:
    """A peft LoRA adapter of the tiny model with random (non-zero) lora_B, saved by peft's `save_pretrained`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    lora = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora, lora_dropout=0.0, **config)
    model = get_peft_model(base, lora)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, b_std)
    model.save_pretrained(folder)
    return folder


def greedy(max_tokens: int, **kw: Any) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


async def collect(engine: TransformersEngine, req: GenerationRequest) -> list[GeneratedToken]:
    return [token async for token in engine.generate(req)]


def run(coro: Coroutine[Any, Any, Any], timeout: float = 60.0) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def ids(tokens: list[GeneratedToken]) -> list[int]:
    return [t.token_id for t in tokens]


def prompt(i: int, n: int) -> tuple[int, ...]:
    """A deterministic prompt of n ids from the tiny vocabulary (4..383: no special ids)."""
    return tuple(4 + (i * 37 + j * 11) % 380 for j in range(n))


async def collect_all(engine: TransformersEngine, reqs: list[GenerationRequest]) -> list[list[GeneratedToken]]:
    """Run the requests concurrently; their token lists in order."""
    return list(await asyncio.gather(*(collect(engine, r) for r in reqs)))
