"""The multi-LoRA layer: for a batch whose rows use different slots (and ranks padded to r_max), both strategies
equal a per-row loop of `base(x) + scale * B(A(x))`, the single-slot path equals it too, and slot 0 is the base."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tuneforge.serve.lora import LoraContext, MultiLoraLinear, inject_multi_lora

pytestmark = pytest.mark.timeout(30)


def _layer(strategy: str) -> tuple[MultiLoraLinear, LoraContext, dict[int, tuple[torch.Tensor, torch.Tensor, float]]]:
    torch.manual_seed(0)
    ctx = LoraContext(5, strategy)
    layer = MultiLoraLinear(nn.Linear(24, 40, bias=True), 5, ctx)
    adapters = {}
    for slot, r in ((1, 2), (2, 8), (4, 5)):  # slot 3 stays empty
        a, b, scale = torch.randn(r, 24), torch.randn(40, r), 0.5 * slot
        layer.set_slot(slot, a, b, scale)
        adapters[slot] = (a, b, scale)
    return layer, ctx, adapters


def _reference(layer, adapters, x, slots):
    out = []
    for row, slot in enumerate(slots):
        y = layer.base(x[row])
        if slot in adapters:
            a, b, scale = adapters[slot]
            y = y + scale * (x[row] @ a.t()) @ b.t()
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize("strategy", ["stacked", "gather"])
def test_mixed_rows_equal_a_per_row_loop(strategy):
    layer, ctx, adapters = _layer(strategy)
    slots = [0, 1, 2, 3, 4, 2, 1, 0]
    x = torch.randn(len(slots), 3, 24)
    ctx.set_rows(slots, torch.device("cpu"))
    torch.testing.assert_close(layer(x), _reference(layer, adapters, x, slots), rtol=1e-5, atol=1e-5)


def test_single_slot_path_and_base_slot():
    layer, ctx, adapters = _layer("stacked")
    x = torch.randn(4, 1, 24)
    for slot in (0, 2, 3):
        ctx.set_rows([slot] * 4, torch.device("cpu"))
        torch.testing.assert_close(layer(x), _reference(layer, adapters, x, [slot] * 4), rtol=1e-5, atol=1e-5)
    layer.clear_slot(2)
    ctx.set_rows([2, 2, 0, 2], torch.device("cpu"))
    torch.testing.assert_close(layer(x), layer.base(x))


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(24, 16), nn.Linear(24, 8), nn.Linear(24, 8)
        self.gate_proj, self.up_proj = nn.Linear(24, 32, bias=False), nn.Linear(24, 32, bias=False)


@pytest.mark.parametrize("slots", [[0, 0, 0], [2, 2, 2], [0, 1, 2]])
def test_fused_projections_equal_separate_ones_in_any_call_order(slots):
    """q/k/v and gate/up share one base matmul (their weights become views of one tensor); each member's output,
    LoRA term included, equals its own layer's, whatever order they are called in and whatever input."""
    torch.manual_seed(0)
    block = nn.Module()
    block.attn = _Block()
    reference = {n: (m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone())
                 for n, m in block.attn.named_children()}  # fmt: skip
    ctx, wrapped = inject_multi_lora(block, 3)
    assert all(m.fused is not None for m in wrapped.values())
    fused = wrapped["attn.q_proj"].fused
    assert fused is not None and wrapped["attn.k_proj"].base.weight.data_ptr() != fused[0].weight.data_ptr()
    deltas = {}
    for name, m in wrapped.items():
        a, b = torch.randn(2, 24), torch.randn(m.out_features, 2)
        m.set_slot(1, a, b, 0.5)
        m.set_slot(2, 2 * a, b, 0.25)
        deltas[name] = (a, b)
    ctx.set_rows(slots, torch.device("cpu"))
    x, other = torch.randn(3, 1, 24), torch.randn(3, 1, 24)

    def expected(name, inp):
        w, bias = reference[name.removeprefix("attn.")]
        a, b = deltas[name]
        out = nn.functional.linear(inp, w, bias)
        scales = {0: None, 1: (a, 0.5), 2: (2 * a, 0.25)}
        rows = []
        for row, slot in enumerate(slots):
            y = out[row]
            if scales[slot] is not None:
                aa, s = scales[slot]
                y = y + s * (inp[row] @ aa.t()) @ b.t()
            rows.append(y)
        return torch.stack(rows)

    for order in (["q", "k", "v"], ["k", "q", "v"], ["q", "v", "k"]):
        for name in order:
            m = wrapped[f"attn.{name}_proj"]
            inp = other if (order[0] == "k" and name == "q") else x
            torch.testing.assert_close(m(inp), expected(f"attn.{name}_proj", inp), rtol=1e-4, atol=1e-4)
    for name in ("gate", "up"):
        m = wrapped[f"attn.{name}_proj"]
        torch.testing.assert_close(m(x), expected(f"attn.{name}_proj", x), rtol=1e-4, atol=1e-4)
