"""Linear weights prepacked once into oneDNN's blocked layout, for the fused forwards' matmuls on the CPU.

`torch.nn.functional.linear` on a bf16 CPU weight lets oneDNN reorder the weight into its blocked (AMX / AVX512-BF16
tile) layout on every call: at 32 rows that reorder costs about as much as the matmul. Reordered once
(`torch.ops.mkldnn._reorder_linear_weight`, what Inductor's CPU freezing does) and run through
`torch.ops.mkldnn._linear_pointwise`, the results are bit-identical and the matmuls faster. Measured on a 2-core
AVX512-BF16/AMX CPU, one pass through SmolLM2-135M's weights (q/k/v and gate/up fused, the head included), bf16:
1 row 25.9 -> 18.3 ms, 32 rows 31.2 -> 22.0 ms, 2142 rows (a prefill) 2.3x faster. In fp32 packing was slower at one
row (24.1 -> 32.7 ms) and only 9% faster at 32, so only bf16 weights are packed.

The cost is memory: a packed copy beside the model's own weight (which transformers' forward, the embedding and
adapter loading still use), i.e. the packed projections' weights twice.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def packing_available(weight: torch.Tensor) -> bool:
    """Whether `weight` is one this module packs: a bf16 CPU matrix, with torch built with oneDNN."""
    return (
        weight.dim() == 2
        and weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


class Linear:
    """`y = x @ weight.T + bias` for 2-D `x` [rows, in_features]: through the prepacked weight where `pack` is
    asked for and available (checked once against `torch.nn.functional.linear` on a random input; on any
    difference or error the plain weight is kept and a warning logged), else `torch.nn.functional.linear`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, pack: bool, rows_hint: int = 32) -> None:
        self.weight, self.bias = weight.detach(), None if bias is None else bias.detach()
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        self.packed: torch.Tensor | None = None
        if pack and packing_available(self.weight):
            self.packed = self._pack(max(1, rows_hint))

    def _pack(self, rows_hint: int) -> torch.Tensor | None:
        with torch.inference_mode():
            try:
                packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, rows_hint)
                x = torch.randn(3, self.in_features, generator=torch.Generator().manual_seed(0)).to(self.weight.dtype)
                want = torch.nn.functional.linear(x, self.weight, self.bias)
                got = torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")
            except RuntimeError as exc:
                log.warning("oneDNN weight packing failed (%s); using plain matmuls", exc)
                return None
        if got.shape != want.shape or not torch.equal(got, want):
            log.warning("oneDNN packed matmul differs from torch's linear; using plain matmuls")
            return None
        return packed

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return torch.nn.functional.linear(x, self.weight, self.bias)
