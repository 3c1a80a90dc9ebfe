"""The multi-LoRA layer: for a batch whose rows use different slots (and ranks padded to r_max), both strategies
equal a per-row loop of `base(x) + scale * B(A(x))`, the single-slot path equals it too, and slot 0 is the base."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tuneforge.serve.lora import LoraContext, MultiLoraLinear

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
