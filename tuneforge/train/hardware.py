"""What the machine allows: threads, whether bf16 is fast here (and so the dtype a run computes in), free memory,
and how many tokens one forward and backward may hold (the `batch_size="max"` rule). Knows a model config's sizes;
no data, no recipe.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from tuneforge.settings import TrainDtype
from tuneforge.train.spec import MAX_EXAMPLES_PER_STEP

# Measured on SmolLM2-135M, fp32, LoRA all-linear, sdpa: activations kept for the backward take
# about 4 bytes x layers x (16 x hidden + 9 x intermediate) per token (2.76 MB at hidden 576 / inter 1536 /
# 30 layers). Full fine-tuning keeps slightly less (no LoRA intermediates); the same bound is used.
ACT_HIDDEN_FACTOR = 16
ACT_INTER_FACTOR = 9
# Per trained token, the logits row, its softmax and its gradient in fp32.
LOGIT_COPIES = 3
# Past about 2k tokens per forward the CPU gains nothing per token and memory traffic grows (bs 2-4 x 512
# peaked at 47 tok/s, bs 8 x 512 fell to 37 on 2 AVX2 cores), so a CPU micro-batch stays at or under this.
CPU_TOKENS_PER_FORWARD = 2048
GPU_TOKENS_PER_FORWARD = 65536
MEMORY_SHARE = 0.5  # of the memory available at start: the rest is for the OS, other runs and fragmentation


def set_threads(num_threads: int | None) -> int:
    """Torch intra-op threads: the spec's number, or every core this process may run on."""
    n = num_threads or len(os.sched_getaffinity(0)) or 1
    torch.set_num_threads(n)
    return n


def bf16_is_fast(device: torch.device) -> bool:
    """bf16 autocast pays off on CUDA with bf16 support and on CPUs with AMX or AVX512-BF16; elsewhere it is
    10-100x slower than fp32 (no bf16 instructions: every op is emulated)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    cpu = torch.cpu
    amx = getattr(cpu, "_is_amx_tile_supported", lambda: False)()
    avx512_bf16 = getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
    return bool(amx or avx512_bf16)


def compute_dtype(requested: TrainDtype | str, device: torch.device) -> torch.dtype:
    """The dtype a run computes in: `bf16` (bf16 autocast over fp32 weights) or `fp32` as asked, even where bf16
    is emulated and slow (tests use that to run the bf16 path on any CPU); `auto`: bf16 where `bf16_is_fast`,
    else fp32."""
    if requested == "bf16":
        return torch.bfloat16
    if requested == "fp32":
        return torch.float32
    if requested == "auto":
        return torch.bfloat16 if bf16_is_fast(device) else torch.float32
    raise ValueError(f"unknown training dtype {requested!r}: auto, fp32 or bf16")


def available_memory(device: torch.device) -> int:
    """Bytes free for this run: CUDA's free memory, or MemAvailable (or what a cgroup limit leaves)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    avail = 8 << 30
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as fh:
            raw = fh.read().strip()
        with open("/sys/fs/cgroup/memory.current") as fh:
            used = int(fh.read().strip())
        if raw != "max":
            avail = min(avail, int(raw) - used)
    except (OSError, ValueError):
        pass
    return max(avail, 1 << 30)


@dataclass(frozen=True)
class MemoryPlan:
    """How one forward/backward is sized: the token budget per chunk, and whether to recompute activations."""

    tokens_per_forward: int
    activation_checkpointing: bool
    bytes_per_token: int
    static_bytes: int
    budget_bytes: int


def plan_memory(
    config: Any,
    *,
    total_params: int,
    trainable_params: int,
    longest_row: int,
    device: torch.device,
    free_bytes: int | None = None,
) -> MemoryPlan:
    """Tokens per forward/backward that fit, by the rule documented in the module constants.

    budget   = MEMORY_SHARE x available memory - static
    static   = 4 x all params (fp32 weights) + 16 x trainable params (gradient, two AdamW moments, temporaries)
    per token= 4 x layers x (16 x hidden + 9 x intermediate) + 3 x 4 x vocab
    tokens   = min(budget / per token, CPU 2048 or GPU 65536), at least one row of `longest_row`.
    When not even one row fits, activations are recomputed in the backward (checkpointing), which keeps
    about 1/layers of them.
    """
    hidden = int(getattr(config, "hidden_size", 1024))
    inter = int(getattr(config, "intermediate_size", 4 * hidden) or 4 * hidden)
    layers = int(getattr(config, "num_hidden_layers", 12))
    vocab = int(getattr(config, "vocab_size", 32000))
    per_token = 4 * layers * (ACT_HIDDEN_FACTOR * hidden + ACT_INTER_FACTOR * inter) + LOGIT_COPIES * 4 * vocab
    static = 4 * total_params + 16 * trainable_params
    free = available_memory(device) if free_bytes is None else free_bytes
    budget = max(0, int(MEMORY_SHARE * free) - static)
    cap = GPU_TOKENS_PER_FORWARD if device.type == "cuda" else CPU_TOKENS_PER_FORWARD
    fit = budget // per_token
    checkpointing = fit < longest_row
    if checkpointing:
        fit = budget // max(1, per_token // layers + 4 * layers * hidden)
    tokens = max(longest_row, min(fit, max(cap, longest_row)))
    return MemoryPlan(
        tokens_per_forward=int(tokens),
        activation_checkpointing=checkpointing,
        bytes_per_token=per_token,
        static_bytes=static,
        budget_bytes=budget,
    )


def max_batch_examples(plan: MemoryPlan, example_length: int, most: int = MAX_EXAMPLES_PER_STEP) -> int:
    """`batch_size="max"`: how many examples of `example_length` tokens one forward holds (1 to `most`, the job's
    limit).

    A number of examples per optimizer step, packing or not; the recipe passes the data's typical length, so that
    a step holds about one forward's worth of tokens (chunking keeps any step within memory).
    """
    return max(1, min(most, plan.tokens_per_forward // max(1, example_length)))
