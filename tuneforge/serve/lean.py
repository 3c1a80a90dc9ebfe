"""A lean decoding forward for llama-shaped decoders: the same computation as transformers' forward of one new
token per row, in a fraction of its operations.

At 32 rows of SmolLM2-135M on a 2-core CPU, transformers' forward spends about half a decoding step outside the
projections' matmuls: its attention (`scaled_dot_product_attention` with a mask and grouped-query heads takes
~370 us per layer for a query of one token, where two small matmuls and a softmax take ~200), the RMS norms (seven
operations each), and the module and keyword plumbing of every layer. Here each layer is:

    h = norm1(x); q, k, v = projections(h) (the fused q/k/v matmul and LoRA terms of `serve/lora.py`);
    q, k = rotary(q, k); keys, values = the cache with k, v appended (in place, `_GrowingLayer.update`);
    attention: the query heads of each key/value head as one [group, D] x [D, W] matmul, the additive mask,
    a softmax in fp32, one [group, W] x [W, D] matmul; x += o_proj(attention);
    x += down(act(gate(norm2(x))) * up(norm2(x)))

The modules (norms, projections, rotary embedding, activation) are the model's own; only the wiring between them
and the attention are re-written. It is used for the decoding step only (prefill keeps transformers' forward) and
only where `LeanDecoder.supports` holds: llama / qwen2 / mistral blocks (pre-norm, rotary, gated MLP, no q/k norms,
no soft-capping; the engine has already refused sliding-window layers). `tests/integration/serve/test_serve_lean.py`
checks it against transformers' forward.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

# Model types whose decoder blocks are exactly input_layernorm -> self_attn -> residual -> post_attention_layernorm
# -> gated mlp -> residual, with plain rotary attention (checked further per layer in `supports`).
_LLAMA_SHAPED = ("llama", "qwen2", "mistral")


class LeanDecoder:
    def __init__(self, model: Any) -> None:
        self.decoder = model.get_decoder()
        config = model.config
        self.layers = list(self.decoder.layers)
        attn = self.layers[0].self_attn
        self.head_dim = int(attn.head_dim)
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        self.group = self.heads // self.kv_heads
        self.scaling = float(attn.scaling)

    @staticmethod
    def supports(model: Any) -> bool:
        config = model.config
        if getattr(config, "model_type", None) not in _LLAMA_SHAPED:
            return False
        if (getattr(config, "pretraining_tp", 1) or 1) != 1:
            return False
        decoder = model.get_decoder()
        if not all(hasattr(decoder, name) for name in ("embed_tokens", "rotary_emb", "norm", "layers")):
            return False
        for layer in decoder.layers:
            attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
            if attn is None or mlp is None or not hasattr(layer, "post_attention_layernorm"):
                return False
            if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
                return False
            if not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")):
                return False
            if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
                return False
        return config.num_attention_heads % config.num_key_value_heads == 0

    def forward(
        self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, layers: list[Any]
    ) -> torch.Tensor:
        """Hidden states [rows, hidden] after the final norm, for `ids` [rows, 1] at `positions` [rows, 1], given
        the additive `mask` [rows, 1, 1, W + 1] and the cache `layers` (each with `update(keys, values)` returning
        every column, the new one last)."""
        rows = ids.shape[0]
        x = self.decoder.embed_tokens(ids[:, 0])  # [rows, hidden]
        cos, sin = self.decoder.rotary_emb(x, positions)  # [rows, 1, D]
        d, kvh, g = self.head_dim, self.kv_heads, self.group
        for layer, cache in zip(self.layers, layers, strict=True):
            attn, mlp = layer.self_attn, layer.mlp
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(rows, self.heads, 1, d)
            k = attn.k_proj(h).view(rows, kvh, 1, d)
            v = attn.v_proj(h).view(rows, kvh, 1, d)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)  # cos / sin [rows, 1, D] -> [rows, 1, 1, D]
            keys, values = cache.update(k, v)  # [rows, kvh, W + 1, D]
            # the g query heads of a key/value head are g query rows of one head: no repeat of keys / values
            out = torch.nn.functional.scaled_dot_product_attention(
                q.view(rows, kvh, g, d), keys, values, attn_mask=mask, scale=self.scaling
            ).view(rows, self.heads * d)
            x = x + attn.o_proj(out)
            h = layer.post_attention_layernorm(x)
            x = x + mlp.down_proj(mlp.act_fn(mlp.gate_proj(h)) * mlp.up_proj(h))
        return self.decoder.norm(x)
