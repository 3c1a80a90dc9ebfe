"""Many LoRA adapters in one batch: each LoRA-able linear layer of the base model is wrapped in a `MultiLoraLinear`
that holds every loaded adapter's weights stacked by slot, and applies to each batch row the adapter of its slot.

    y = base(x) + scale[s] * (x @ A[s]^T) @ B[s]^T        s = the row's slot; slot 0 = all zeros = the base model

A[S, r_max, in], B[S, out, r_max] and scale[S] live on the module; adapters of a smaller rank are zero-padded to
r_max (zero rows of A and zero columns of B add nothing). The per-row slots are one tensor shared by every wrapped
module (`LoraContext`), set by the engine before each forward. The low-rank product runs as two batched matmuls over
the gathered weights (`A[idx]`, `B[idx]`), never a Python loop over adapters; a batch whose rows all use one slot
takes plain matmuls, and a batch of base rows only (or a module no loaded adapter targets) skips the LoRA term.

Not thread-safe by itself: the engine writes slots and runs forwards under one lock.
"""

from __future__ import annotations

import torch
from torch import nn

# The linear layers of a decoder block that an adapter may target (llama / qwen / mistral names).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraContext:
    """The per-row slot indices of the current forward, shared by every `MultiLoraLinear` of one model."""

    def __init__(self) -> None:
        self.idx: torch.Tensor | None = None  # long [rows], on the model's device
        self.single: int | None = None  # the slot of every row, when they all share one

    def set_rows(self, slots: list[int], device: torch.device) -> None:
        first = slots[0] if slots else 0
        self.single = first if all(s == first for s in slots) else None
        self.idx = None if self.single is not None else torch.tensor(slots, dtype=torch.long, device=device)


class MultiLoraLinear(nn.Module):
    """A frozen `nn.Linear` plus stacked low-rank deltas, one per slot (slot 0 is the base model: zeros)."""

    lora_A: torch.Tensor  # [slots, r_max, in]
    lora_B: torch.Tensor  # [slots, out, r_max]
    scale: torch.Tensor  # [slots], fp32

    def __init__(self, base: nn.Linear, slots: int, ctx: LoraContext) -> None:
        super().__init__()
        self.base = base
        self.ctx = ctx
        self.in_features = base.in_features
        self.out_features = base.out_features
        weight = base.weight
        self.register_buffer(
            "lora_A", torch.zeros(slots, 0, self.in_features, dtype=weight.dtype, device=weight.device)
        )
        self.register_buffer(
            "lora_B", torch.zeros(slots, self.out_features, 0, dtype=weight.dtype, device=weight.device)
        )
        self.register_buffer("scale", torch.zeros(slots, dtype=torch.float32, device=weight.device))
        self.active = [False] * slots  # which slots hold a non-zero delta for this module

    @property
    def rank(self) -> int:
        return int(self.lora_A.shape[1])

    def _grow(self, rank: int) -> None:
        """Widen the stacks to `rank` (zero padding keeps every loaded adapter's product unchanged)."""
        if rank <= self.rank:
            return
        a, b = self.lora_A, self.lora_B
        pad_a = torch.zeros(a.shape[0], rank - a.shape[1], a.shape[2], dtype=a.dtype, device=a.device)
        pad_b = torch.zeros(b.shape[0], b.shape[1], rank - b.shape[2], dtype=b.dtype, device=b.device)
        self.lora_A = torch.cat([a, pad_a], dim=1)
        self.lora_B = torch.cat([b, pad_b], dim=2)

    def set_slot(self, slot: int, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        """Write one adapter's A [r, in] and B [out, r] (peft's lora_A / lora_B weights) into `slot`."""
        r = int(a.shape[0])
        self._grow(r)
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.lora_A[slot, :r].copy_(a)
        self.lora_B[slot, :, :r].copy_(b)
        self.scale[slot] = scale
        self.active[slot] = True

    def clear_slot(self, slot: int) -> None:
        if self.rank:
            self.lora_A[slot].zero_()
            self.lora_B[slot].zero_()
        self.scale[slot] = 0.0
        self.active[slot] = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        ctx = self.ctx
        if ctx.single is not None:
            slot = ctx.single
            if slot == 0 or not self.active[slot]:
                return y
            a, b = self.lora_A[slot], self.lora_B[slot]
            delta = (x.to(a.dtype) @ a.t()) @ b.t()
            return y + (delta * self.scale[slot].to(delta.dtype)).to(y.dtype)
        if ctx.idx is None or not any(self.active):
            return y
        idx = ctx.idx
        a = self.lora_A.index_select(0, idx)  # [rows, r, in]
        b = self.lora_B.index_select(0, idx)  # [rows, out, r]
        s = self.scale.index_select(0, idx).to(a.dtype)  # [rows]
        x3 = x.reshape(x.shape[0], -1, x.shape[-1]).to(a.dtype)  # [rows, tokens, in]
        h = torch.bmm(x3, a.transpose(1, 2)) * s[:, None, None]  # [rows, tokens, r]
        delta = torch.bmm(h, b.transpose(1, 2))  # [rows, tokens, out]
        return y + delta.reshape(y.shape).to(y.dtype)


def inject_multi_lora(model: nn.Module, slots: int) -> tuple[LoraContext, dict[str, MultiLoraLinear]]:
    """Wrap every LoRA-able linear layer of `model` (by name, see LORA_TARGETS) in a `MultiLoraLinear` with `slots`
    slots. Returns the shared context and the wrapped modules by their name in `model` (the base model's names, as
    peft's saved keys use them once their `base_model.model.` prefix is removed)."""
    ctx = LoraContext()
    wrapped: dict[str, MultiLoraLinear] = {}
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in LORA_TARGETS
    ]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lora = MultiLoraLinear(module, slots, ctx)
        setattr(parent, child, lora)
        wrapped[name] = lora
    return ctx, wrapped
