"""Many LoRA adapters in one batch: each LoRA-able linear layer of the base model is wrapped in a `MultiLoraLinear`
that holds every loaded adapter's weights stacked by slot, and applies to each batch row the adapter of its slot.

    y = base(x) + scale[s] * (x @ A[s]^T) @ B[s]^T        s = the row's slot; slot 0 = all zeros = the base model

A[S, r_max, in], B[S, out, r_max] and scale[S] live on the module (B is stored already multiplied by its slot's
scale); adapters of a smaller rank are zero-padded to r_max (zero rows of A and zero columns of B add nothing). The
per-row slots are shared by every wrapped module (`LoraContext`), set by the engine before each forward. A batch
whose rows all use one slot takes two plain matmuls; a batch of base rows only (or a module no loaded adapter
targets) skips the LoRA term. A mixed batch takes one of two equal computations, never a Python loop over adapters:

- "stacked" (the default): h = x @ [A_0; ...; A_S-1]^T, one matmul against every slot's A at once
  [tokens, S * r_max]; h is multiplied by the rows' one-hot slot mask (each row keeps only its own slot's r_max
  columns), then y += h @ [B_0 ... B_S-1]^T, one matmul. The one-hot product *is* the gather, done on activations
  ([tokens, S*r]) rather than on weights; the cost is two dense matmuls of width S * r_max (72 for 8 adapters of
  rank 8), well under a fifth of a decoder projection's.
- "gather": A[idx], B[idx] gathered per row ([rows, r, in], [rows, out, r]) and two `torch.bmm`s. Same result;
  measured slower on CPU (the per-row weight copies cost more than the extra width above: SmolLM2-135M bf16 at 32
  rows, 8 adapters, a decode step took ~2x the base step, against ~1.1x stacked). Kept for the tests, which check
  both against a per-row reference, and for devices where batched gathers are cheap.

Projections that read the same input (q/k/v, gate/up) share one base matmul (`_FusedGroup`): the first of a group
computes x @ [W_q; W_k; W_v]^T once (the members' weights are views of that one tensor, no extra memory) and the
others take their columns of it; each member still adds its own LoRA term. Measured on a 2-core CPU, SmolLM2-135M
bf16, 32 rows: qkv 52 us against 95 us as three matmuls, gate/up 149 against 167 us, per layer.

Where the engine runs its fused CPU kernels (`serve/lean.py`, `serve/kernels`), the projections take the wrappers'
base weights and `stacks()` directly and add each row's term with a gathered kernel (only its own slot's weights);
these wrappers' own forward serves every other path (transformers' forward, CUDA, no compiler).

Not thread-safe by itself: the engine writes slots and runs forwards under one lock.
"""

from __future__ import annotations

import torch
from torch import nn

# The linear layers of a decoder block that an adapter may target (llama / qwen / mistral names).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraContext:
    """The per-row slots of the current forward, shared by every `MultiLoraLinear` of one model."""

    def __init__(self, slots: int, strategy: str = "stacked") -> None:
        if strategy not in ("stacked", "gather"):
            raise ValueError(f"unknown multi-LoRA strategy {strategy!r}: stacked or gather")
        self.slots = slots
        self.strategy = strategy
        self.single: int | None = 0  # the slot of every row, when they all share one
        self.idx: torch.Tensor | None = None  # long [rows], for a mixed batch
        self.onehot: torch.Tensor | None = None  # [rows, slots] 0/1, for a mixed batch

    def set_rows(self, slots: list[int], device: torch.device) -> None:
        first = slots[0] if slots else 0
        if all(s == first for s in slots):
            self.single, self.idx, self.onehot = first, None, None
            return
        self.single = None
        self.idx = torch.tensor(slots, dtype=torch.long, device=device)
        self.onehot = torch.nn.functional.one_hot(self.idx, self.slots)


class _FusedGroup:
    """Linear layers of one block that read the same input, computed as one matmul (see the module docstring)."""

    def __init__(self, members: list[nn.Linear]) -> None:
        weight = torch.cat([m.weight.detach() for m in members])
        bias = None if members[0].bias is None else torch.cat([m.bias.detach() for m in members if m.bias is not None])
        self.weight, self.bias = weight, bias
        self.spans: list[tuple[int, int]] = []
        start = 0
        for m in members:
            n = m.out_features
            m.weight = nn.Parameter(weight[start : start + n], requires_grad=False)
            if bias is not None:
                m.bias = nn.Parameter(bias[start : start + n], requires_grad=False)
            self.spans.append((start, start + n))
            start += n
        self.x: torch.Tensor | None = None  # the input of the last fused matmul, whose outputs wait in `outputs`
        self.outputs: list[torch.Tensor | None] = []

    def run(self, index: int, x: torch.Tensor, base: nn.Linear) -> torch.Tensor:
        """Member `index`'s base output for `x`: the leader (0) runs the fused matmul, the others take their columns
        of it when it was run on this very tensor, else run their own matmul."""
        if index == 0:
            full = torch.nn.functional.linear(x, self.weight, self.bias)
            self.x = x
            self.outputs = [full[..., a:b] for a, b in self.spans]
        elif self.x is not x or self.outputs[index] is None:
            return torch.nn.functional.linear(x, base.weight, base.bias)
        y = self.outputs[index]
        assert y is not None
        self.outputs[index] = None
        if all(o is None for o in self.outputs):
            self.x, self.outputs = None, []
        return y


# Projections of one block that read the same input, fused when all of them are present.
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


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
        self._stacks: tuple[torch.Tensor, torch.Tensor] | None = None
        self.fused: tuple[_FusedGroup, int] | None = None  # the group this layer's base matmul is part of, its index

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
        self._stacks = None

    def set_slot(self, slot: int, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        """Write one adapter's A [r, in] and B [out, r] (peft's lora_A / lora_B weights) into `slot`."""
        r = int(a.shape[0])
        self._grow(r)
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.lora_A[slot, :r].copy_(a)
        self.lora_B[slot, :, :r].copy_(b.float().mul(scale).to(self.lora_B.dtype))
        self.scale[slot] = scale
        self.active[slot] = True
        self._stacks = None

    def clear_slot(self, slot: int) -> None:
        if self.rank:
            self.lora_A[slot].zero_()
            self.lora_B[slot].zero_()
        self.scale[slot] = 0.0
        self.active[slot] = False
        self._stacks = None

    def stacks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[S * r, in] and [S * r, out] views of every slot's A and (scaled) B^T, for the stacked computation."""
        if self._stacks is None:
            slots, r = self.lora_A.shape[0], self.rank
            a_all = self.lora_A.reshape(slots * r, self.in_features)
            b_all = self.lora_B.permute(0, 2, 1).reshape(slots * r, self.out_features).contiguous()
            self._stacks = (a_all, b_all)
        return self._stacks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            y = self.fused[0].run(self.fused[1], x, self.base)
        else:
            y = torch.nn.functional.linear(x, self.base.weight, self.base.bias)
        ctx = self.ctx
        if ctx.single is not None:
            slot = ctx.single
            if slot == 0 or not self.active[slot]:
                return y
            x2 = x.reshape(-1, self.in_features)
            h = x2 @ self.lora_A[slot].t()
            y.view(-1, self.out_features).addmm_(h, self.lora_B[slot].t())  # y += h @ B^T, in place
            return y
        if ctx.onehot is None or ctx.idx is None or not any(self.active):
            return y
        rows, r = x.shape[0], self.rank
        x3 = x.reshape(rows, -1, x.shape[-1])  # [rows, tokens, in]
        if ctx.strategy == "gather":
            a = self.lora_A.index_select(0, ctx.idx)  # [rows, r, in]
            b = self.lora_B.index_select(0, ctx.idx)  # [rows, out, r]
            delta = torch.bmm(torch.bmm(x3, a.transpose(1, 2)), b.transpose(1, 2))  # [rows, tokens, out]
            return y + delta.reshape(y.shape)
        a_all, b_all = self.stacks()
        h = (x3 @ a_all.t()).view(rows, x3.shape[1], ctx.slots, r)  # every slot's low-rank projection
        h = h * ctx.onehot.to(h.dtype)[:, None, :, None]  # each row keeps its own slot's
        y.view(-1, self.out_features).addmm_(h.view(-1, ctx.slots * r), b_all)  # y += h @ [B_0 ... B_S-1]^T
        return y


def inject_multi_lora(
    model: nn.Module, slots: int, strategy: str = "stacked"
) -> tuple[LoraContext, dict[str, MultiLoraLinear]]:
    """Wrap every LoRA-able linear layer of `model` (by name, see LORA_TARGETS) in a `MultiLoraLinear` with `slots`
    slots. Returns the shared context and the wrapped modules by their name in `model` (the base model's names, as
    peft's saved keys use them once their `base_model.model.` prefix is removed)."""
    ctx = LoraContext(slots, strategy)
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
    for parent_name in {name.rpartition(".")[0] for name in wrapped}:
        prefix = f"{parent_name}." if parent_name else ""
        for group in FUSED_GROUPS:
            members = [wrapped.get(prefix + child) for child in group]
            if any(m is None for m in members):
                continue
            layers = [m for m in members if m is not None]
            bases = [m.base for m in layers]
            w0 = bases[0].weight
            if any(
                b.in_features != bases[0].in_features
                or b.weight.dtype != w0.dtype
                or b.weight.device != w0.device
                or (b.bias is None) != (bases[0].bias is None)
                for b in bases
            ):
                continue
            fused = _FusedGroup(bases)
            for i, m in enumerate(layers):
                m.fused = (fused, i)
    return ctx, wrapped
