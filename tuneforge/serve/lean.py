"""A lean forward for llama-shaped decoders: the same computation as transformers' forward, in a fraction of its
operations.

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
and the attention are re-written (`forward`, decoding steps only).

On the CPU, where the fused kernels of `serve/kernels` build, decoding steps and prefills go through them instead
(`forward_fused`, `prefill_fused`): per layer one kernel call each for the residual add with the RMS norm after it,
the rotary embedding with the cache write, the attention over the cache in place, and SiLU-and-multiply; and the
projections as four matmuls on the base weights (q/k/v and gate/up fused), each with one low-rank term for the
adapters of its rows (`_lora_weights`). A prefill runs its prompts packed end to end, padded only for attention.
Measured (bench/serve_throughput.py, SmolLM2 bf16, 2 cores, 32 streams): a decoding step 81 -> 47 ms, a prefill
of 32 prompts 1.0 -> 0.64 s.

Used only where `LeanDecoder.supports` holds: llama / qwen2 / mistral blocks (pre-norm, rotary, gated MLP, no q/k
norms, no soft-capping; the engine has already refused sliding-window layers); the kernels also need llama's RMS
norm and SiLU (`fusable`). `tests/integration/serve/test_serve_lean.py` checks every path against transformers'.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from tuneforge.serve.kernels import DecodeKernels

# Model types whose decoder blocks are exactly input_layernorm -> self_attn -> residual -> post_attention_layernorm
# -> gated mlp -> residual, with plain rotary attention (checked further per layer in `supports`).
_LLAMA_SHAPED = ("llama", "qwen2", "mistral")


class LeanDecoder:
    def __init__(self, model: Any, kernels: DecodeKernels | None = None) -> None:
        self.decoder = model.get_decoder()
        config = model.config
        self.layers = list(self.decoder.layers)
        attn = self.layers[0].self_attn
        self.head_dim = int(attn.head_dim)
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        self.group = self.heads // self.kv_heads
        self.scaling = float(attn.scaling)
        # the fused kernels where they apply: llama's RMS norm (weight x normalised, `variance_epsilon`) and SiLU,
        # every weight in the kernels' dtype (they read the norms' weights as such)
        fits = kernels is not None and self.fusable(model) and {p.dtype for p in model.parameters()} == {kernels.dtype}
        self.kernels = kernels if fits else None
        self._plain: list[tuple[Any, ...]] | None = None  # built at the first batch with no adapter
        self._lora: dict[int | None, list[list[tuple[torch.Tensor, torch.Tensor, tuple[int, ...]] | None]]] = {}
        self._lora_version = -1

    @staticmethod
    def fusable(model: Any) -> bool:
        config = model.config
        if getattr(config, "hidden_act", None) not in ("silu", "swish"):
            return False
        decoder = model.get_decoder()
        norms = [decoder.norm] + [n for layer in decoder.layers
                                  for n in (layer.input_layernorm, layer.post_attention_layernorm)]  # fmt: skip
        return all(
            type(n).__name__ in ("LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm") and hasattr(n, "variance_epsilon")
            for n in norms
        )

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

    def _plain_weights(self) -> list[tuple[Any, ...]] | None:
        """Per layer, the base weights as the multi-LoRA wrappers hold them (`serve/lora.py`): the fused q/k/v and
        gate/up matrices with their split sizes, o and down; None where the projections are not wrapped that way.
        A batch with no adapter runs these directly: four matmuls a layer, no wrapper calls."""
        if self._plain is None:
            from tuneforge.serve.lora import MultiLoraLinear

            plain: list[tuple[Any, ...]] = []
            for layer in self.layers:
                attn, mlp = layer.self_attn, layer.mlp
                mods = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
                if not all(isinstance(m, MultiLoraLinear) for m in mods):
                    self._plain = []
                    return None
                q, k, v, o, gate, up, down = mods
                if q.fused is None or gate.fused is None or k.fused is None or up.fused is None:
                    self._plain = []
                    return None
                qkv, gu = q.fused[0], gate.fused[0]
                plain.append((qkv.weight, qkv.bias, [q.out_features, k.out_features, v.out_features],
                              o.base.weight, o.base.bias, gu.weight, gu.bias, gate.out_features,
                              down.base.weight, down.base.bias))  # fmt: skip
            self._plain = plain
        return self._plain or None

    def _lora_weights(
        self, ctx: Any, slot: int | None
    ) -> list[list[tuple[torch.Tensor, torch.Tensor, tuple[int, ...]] | None]]:
        """Per layer, per projection group (q/k/v, o, gate/up, down, as in `_plain_weights`), the low-rank weights
        of one adapter (`slot`) or of every loaded one (None) for the whole group: A [sum of r (x S), in], the
        members' A's stacked, and B [sum of r (x S), group out], their scaled B^T's placed block-diagonally (each
        member's rows feed only its own output columns: zeros elsewhere add nothing), and the members' ranks; None
        where no member holds an adapter. Built once per adapter set (`LoraContext.version`) and slot."""
        if self._lora_version != ctx.version:
            self._lora, self._lora_version = {}, ctx.version
        if slot in self._lora:
            return self._lora[slot]
        groups: list[list[tuple[torch.Tensor, torch.Tensor, tuple[int, ...]] | None]] = []
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            per_layer: list[tuple[torch.Tensor, torch.Tensor, tuple[int, ...]] | None] = []
            for members in ((attn.q_proj, attn.k_proj, attn.v_proj), (attn.o_proj,), (mlp.gate_proj, mlp.up_proj),
                            (mlp.down_proj,)):  # fmt: skip
                out_total = sum(m.out_features for m in members)
                parts, offset = [], 0
                for m in members:
                    if m.rank and (m.active[slot] if slot is not None else any(m.active)):
                        parts.append((m, offset))
                    offset += m.out_features
                if not parts:
                    per_layer.append(None)
                    continue
                if slot is None:
                    stacks = [m.stacks() for m, _ in parts]  # [S x r, in], [S x r, out]
                else:
                    stacks = [(m.lora_A[slot], m.lora_B[slot].t()) for m, _ in parts]  # [r, in], [r, out]
                a = torch.cat([a_m for a_m, _ in stacks])
                b = a.new_zeros(a.shape[0], out_total)
                row = 0
                for (m, col), (_, b_m) in zip(parts, stacks, strict=True):
                    b[row : row + b_m.shape[0], col : col + m.out_features] = b_m
                    row += b_m.shape[0]
                per_layer.append((a, b, tuple(m.rank for m, _ in parts)))
            groups.append(per_layer)
        self._lora[slot] = groups
        return groups

    def forward_fused(
        self, ids: torch.Tensor, positions: torch.Tensor, starts: torch.Tensor, layers: list[Any],
        lora_ctx: Any = None,
    ) -> torch.Tensor:  # fmt: skip
        """`forward` through the fused kernels (`self.kernels` is set): row r attends to columns [starts[r], W] of
        its cache (W = the cache's width before this step; the columns before starts[r] are its padding). The cache
        `layers` give room for the new column with `reserve(1)` -> (key buffer, value buffer, its column index).
        `lora_ctx`: the multi-LoRA context whose rows' slots this batch uses (`serve/lora.py`); with it, the
        projections run as four matmuls a layer on the base weights (`_plain_weights`), each followed, where a row
        uses an adapter, by one low-rank term for its whole group (`_lora_weights`: x A^T, masked to each row's own
        slot, times B), in place of seven wrapper calls of a matmul and a low-rank term each."""
        kernels = self.kernels
        assert kernels is not None
        weights = self._plain_weights() if lora_ctx is not None else None
        lora = None
        masks: dict[tuple[int, ...], torch.Tensor] | None = None
        if weights is not None and lora_ctx.single is not None and lora_ctx.single != 0:
            lora = self._lora_weights(lora_ctx, lora_ctx.single)  # one adapter: its own weights, no mask
        elif weights is not None and lora_ctx.single is None:
            lora = self._lora_weights(lora_ctx, None)
            slot_mask = lora_ctx.onehot.to(self.decoder.embed_tokens.weight.dtype)
            # by the members' ranks: each row keeps its own slot's columns of x A^T (S x r per member)
            masks = {}
            for per_layer in lora:
                for term in per_layer:
                    if term is not None and term[2] not in masks:
                        masks[term[2]] = torch.cat([slot_mask.repeat_interleave(r, dim=1) for r in term[2]], dim=1)
        linear = torch.nn.functional.linear

        def project(x_in: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, i: int, g: int) -> torch.Tensor:
            y = linear(x_in, w, b)
            term = lora[i][g] if lora is not None else None
            if term is not None:
                a, bb, ranks = term
                low = linear(x_in, a)
                if masks is not None:
                    low.mul_(masks[ranks])
                y.addmm_(low, bb)
            return y

        rows, d, heads, kvh = ids.shape[0], self.head_dim, self.heads, self.kv_heads
        x = self.decoder.embed_tokens(ids[:, 0])  # [rows, hidden], the residual stream, updated in place
        cos, sin = self.decoder.rotary_emb(x, positions)
        cos, sin = cos.reshape(rows, d).contiguous(), sin.reshape(rows, d).contiguous()
        h = torch.empty_like(x)
        q_rot = x.new_empty(rows, heads, d)
        attended = x.new_empty(rows, heads * d)
        act: torch.Tensor | None = None
        pending: torch.Tensor | None = None  # the last down projection, added to x by the next norm
        for i, (layer, cache) in enumerate(zip(self.layers, layers, strict=True)):
            attn, mlp = layer.self_attn, layer.mlp
            norm1, norm2 = layer.input_layernorm, layer.post_attention_layernorm
            kernels.rms_norm(x, pending, norm1.weight, h, norm1.variance_epsilon)
            if weights is not None:
                w_qkv, b_qkv, qkv_sizes, w_o, b_o, w_gu, b_gu, n_gate, w_down, b_down = weights[i]
                q, k, v = project(h, w_qkv, b_qkv, i, 0).split(qkv_sizes, dim=1)
            else:
                q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
            kbuf, vbuf, col = cache.reserve(1)
            kernels.rotary_append(q, k, v, cos, sin, q_rot, kbuf, vbuf, col, heads, kvh)
            kernels.attend(q_rot, kbuf, vbuf, starts, col + 1, attended, heads, kvh, self.scaling)
            o = project(attended, w_o, b_o, i, 1) if weights is not None else attn.o_proj(attended)
            kernels.rms_norm(x, o, norm2.weight, h, norm2.variance_epsilon)
            if weights is not None:
                gu = project(h, w_gu, b_gu, i, 2)
                gate, up = gu[:, :n_gate], gu[:, n_gate:]
            else:
                gate, up = mlp.gate_proj(h), mlp.up_proj(h)
            if act is None:
                act = x.new_empty(rows, gate.shape[1])
            kernels.silu_mul(gate, up, act)
            pending = project(act, w_down, b_down, i, 3) if weights is not None else mlp.down_proj(act)
        out = torch.empty_like(x)
        kernels.rms_norm(x, pending, self.decoder.norm.weight, out, self.decoder.norm.variance_epsilon)
        return out

    def prefill_fused(
        self, ids: torch.Tensor, lens: list[int]
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Prefill prompts packed end to end (`ids` [N], the prompts' lengths `lens`) through the fused kernels:
        the norms, projections and MLP run once over the N real tokens (no padding rows in any matmul); attention
        runs on the prompts right-padded to the longest (causal, so no real position sees the padding). Returns the
        last position's hidden state per prompt [prompts, hidden] after the final norm, and per layer the keys and
        values [prompts, kv_heads, longest, head_dim], right-padded (the engine's prefill cache layout)."""
        kernels = self.kernels
        assert kernels is not None
        device, n, width = ids.device, len(lens), max(lens)
        total, d, heads, kvh = ids.shape[0], self.head_dim, self.heads, self.kv_heads
        starts = [0]
        for m in lens[:-1]:
            starts.append(starts[-1] + m)
        positions = torch.cat([torch.arange(m, device=device) for m in lens])
        # padded slot (b, t) <- packed token starts[b] + t (a padding slot repeats its prompt's last token);
        # packed token <- its padded slot
        padded = torch.tensor(
            [s + min(t, m - 1) for s, m in zip(starts, lens, strict=True) for t in range(width)], device=device
        )
        packed = torch.tensor([b * width + t for b, m in enumerate(lens) for t in range(m)], device=device)
        last = torch.tensor([s + m - 1 for s, m in zip(starts, lens, strict=True)], device=device)
        x = self.decoder.embed_tokens(ids)  # [N, hidden]
        cos, sin = self.decoder.rotary_emb(x, positions[None, :])
        cos, sin = cos.reshape(total, d).contiguous(), sin.reshape(total, d).contiguous()
        h = torch.empty_like(x)
        q_rot = x.new_empty(total, heads, d)
        act: torch.Tensor | None = None
        pending: torch.Tensor | None = None
        cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            norm1, norm2 = layer.input_layernorm, layer.post_attention_layernorm
            kernels.rms_norm(x, pending, norm1.weight, h, norm1.variance_epsilon)
            q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
            k_rot = x.new_empty(total, kvh, 1, d)
            v_all = x.new_empty(total, kvh, 1, d)
            kernels.rotary_append(q, k, v, cos, sin, q_rot, k_rot, v_all, 0, heads, kvh)

            def pad(t: torch.Tensor, h_: int) -> torch.Tensor:  # [N, h_, D] -> [prompts, h_, width, D]
                return t.view(total, h_, d).index_select(0, padded).view(n, width, h_, d).transpose(1, 2)

            keys, values = pad(k_rot, kvh).contiguous(), pad(v_all, kvh).contiguous()
            out = torch.nn.functional.scaled_dot_product_attention(
                pad(q_rot, heads), keys, values, is_causal=True, scale=self.scaling, enable_gqa=kvh != heads
            )  # [prompts, heads, width, D]
            attended = out.transpose(1, 2).reshape(n * width, heads * d).index_select(0, packed)
            cache.append((keys, values))
            kernels.rms_norm(x, attn.o_proj(attended), norm2.weight, h, norm2.variance_epsilon)
            gate, up = mlp.gate_proj(h), mlp.up_proj(h)
            if act is None:
                act = x.new_empty(total, gate.shape[1])
            kernels.silu_mul(gate, up, act)
            pending = mlp.down_proj(act)
        assert pending is not None
        x_last = x.index_select(0, last)
        final = torch.empty_like(x_last)
        kernels.rms_norm(x_last, pending.index_select(0, last), self.decoder.norm.weight, final,
                         self.decoder.norm.variance_epsilon)  # fmt: skip
        return final, cache
