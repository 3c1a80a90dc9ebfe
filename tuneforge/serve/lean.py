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
the rotary embedding with the cache write, the attention over the cache in place, and SiLU-and-multiply; the
projections as four matmuls on the base weights (q/k/v and gate/up fused), and for rows that use adapters one
gathered low-rank kernel call per projection (each row its own adapter's A and B, `DecodeKernels.lora_rows`) in
place of the wrappers' stacked terms. A prefill runs its prompts packed end to end, padded only for attention.
Measured (bench/serve_throughput.py, SmolLM2 bf16, 2 cores, 32 streams): a decoding step 81 -> ~47 ms, a prefill
of 32 prompts 1.0 -> ~0.64 s; over 8 adapters 245 -> ~340 tok/s. In bf16 the base matmuls (the head's too) run on
weights prepacked for oneDNN (`serve/packed.py`): a decoding step 43.9 -> 36.7 ms in the same process.

Used only where `LeanDecoder.supports` holds: llama / qwen2 / mistral blocks (pre-norm, rotary, gated MLP, no q/k
norms, no soft-capping; the engine has already refused sliding-window layers); the kernels also need llama's RMS
norm and SiLU (`fusable`). `tests/integration/serve/test_serve_lean.py` checks every path against transformers'.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from tuneforge.serve.kernels import DecodeKernels
from tuneforge.serve.packed import Linear
from tuneforge.serve.threads import off_main_thread

# Model types whose decoder blocks are exactly input_layernorm -> self_attn -> residual -> post_attention_layernorm
# -> gated mlp -> residual, with plain rotary attention (checked further per layer in `supports`).
_LLAMA_SHAPED = ("llama", "qwen2", "mistral")


class LeanDecoder:
    def __init__(self, model: Any, kernels: DecodeKernels | None = None, pack: bool = True) -> None:
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
        # the fused forwards' base matmuls through prepacked weights (`serve/packed.py`; bf16 on the CPU only)
        self.pack = pack and self.kernels is not None
        self._head_module = model.get_output_embeddings()
        self._head: Linear | None = None  # built with the projections by `_build`
        self._plain: list[_Projections] | None = None

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

    def _projections(self) -> list[_Projections] | None:
        """Per layer, the projections as the multi-LoRA wrappers hold them (`serve/lora.py`); None where they are
        not wrapped that way (the fused path then calls the modules)."""
        self._build()
        return self._plain or None

    def _head_linear(self) -> Linear:
        self._build()
        assert self._head is not None
        return self._head

    def _build(self) -> None:
        """The fused forwards' matmuls, built once (their weights packed where `pack`): never on the main thread
        (`serve/threads.py`)."""
        if self._plain is None or self._head is None:
            off_main_thread(self._build_here)

    def _build_here(self) -> None:
        from tuneforge.serve.lora import MultiLoraLinear

        head = self._head_module
        self._head = Linear(head.weight, getattr(head, "bias", None), self.pack)
        plain: list[_Projections] = []
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            mods = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
            if not all(isinstance(m, MultiLoraLinear) for m in mods):
                plain = []
                break
            q, k, v, o, gate, up, down = mods
            if q.fused is None or gate.fused is None or k.fused is None or up.fused is None:
                plain = []
                break
            plain.append(_Projections(q, k, v, o, gate, up, down, self.pack))
        self._plain = plain

    def fused_projections(self) -> bool:
        """Whether the fused forwards run the projections themselves (else the wrappers, by the `LoraContext`).
        The first call builds them (the engine makes it at start-up, after wrapping the projections)."""
        return self._projections() is not None

    def packed(self) -> bool:
        """Whether the fused forwards' matmuls (the head's included) run on prepacked weights."""
        projections = self._projections()
        layers_packed = projections is not None and all(p.packed() for p in projections)
        return self._head_linear().packed is not None and layers_packed

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head's logits [rows, vocab] for the fused forwards' hidden states [rows, hidden]."""
        return self._head_linear()(hidden)

    def forward_fused(
        self, ids: torch.Tensor, positions: torch.Tensor, starts: torch.Tensor, layers: list[Any],
        slots: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """`forward` through the fused kernels (`self.kernels` is set): row r attends to columns [starts[r], W] of
        its cache (W = the cache's width before this step; the columns before starts[r] are its padding). The cache
        `layers` give room for the new column with `reserve(1)` -> (key buffer, value buffer, its column index).
        `slots`: each row's adapter slot (int64 [rows], 0: the base model; None: every row the base model).
        The projections run as four matmuls a layer on the base weights (q/k/v and gate/up fused), and where a row
        uses an adapter, one gathered low-rank kernel call per projection (`DecodeKernels.lora_rows`)."""
        kernels = self.kernels
        assert kernels is not None
        project = self._projector(slots)
        rows, d, heads, kvh = ids.shape[0], self.head_dim, self.heads, self.kv_heads
        x = self.decoder.embed_tokens(ids[:, 0])  # [rows, hidden], the residual stream, updated in place
        cos, sin = self.decoder.rotary_emb(x, positions)
        cos, sin = cos.reshape(rows, d).contiguous(), sin.reshape(rows, d).contiguous()
        h = torch.empty_like(x)
        q_rot = x.new_empty(rows, heads, d)
        attended = x.new_empty(rows, heads * d)
        pending: torch.Tensor | None = None  # the last down projection, added to x by the next norm
        for i, (layer, cache) in enumerate(zip(self.layers, layers, strict=True)):
            norm1 = layer.input_layernorm
            kernels.rms_norm(x, pending, norm1.weight, h, norm1.variance_epsilon)
            q, k, v = project.qkv(i, h)
            kbuf, vbuf, col = cache.reserve(1)
            kernels.rotary_append(q, k, v, cos, sin, q_rot, kbuf, vbuf, col, heads, kvh)
            kernels.attend(q_rot, kbuf, vbuf, starts, col + 1, attended, heads, kvh, self.scaling)
            pending = self._mlp(project, i, x, project.o(i, attended), h)
        out = torch.empty_like(x)
        kernels.rms_norm(x, pending, self.decoder.norm.weight, out, self.decoder.norm.variance_epsilon)
        return out

    def _mlp(
        self, project: _Projector, i: int, x: torch.Tensor, attention: torch.Tensor, h: torch.Tensor
    ) -> torch.Tensor:
        """Layer i's second half: x += attention's output (in place), then its MLP on the normed x (through `h`);
        returns the down projection, which the next norm adds to x."""
        kernels = self.kernels
        assert kernels is not None
        norm2 = self.layers[i].post_attention_layernorm
        kernels.rms_norm(x, attention, norm2.weight, h, norm2.variance_epsilon)
        gate, up = project.gate_up(i, h)
        act = x.new_empty(x.shape[0], gate.shape[1])
        kernels.silu_mul(gate, up, act)
        return project.down(i, act)

    def _projector(self, slots: torch.Tensor | None) -> _Projector:
        kernels = self.kernels
        assert kernels is not None
        if slots is not None and not bool((slots > 0).any()):
            slots = None
        projections = self._projections()
        if slots is not None and projections is not None:
            count = int(projections[0].o[1].lora_A.shape[0])  # the wrappers' slots: `lora_rows` reads slot s's rows
            if int(slots.min()) < 0 or int(slots.max()) >= count:
                raise ValueError(f"adapter slots out of range 0..{count - 1}: {slots.tolist()}")
        return _Projector(self.layers, projections, kernels, slots)

    def prefill_fused(
        self, ids: torch.Tensor, lens: list[int], slots: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Prefill prompts packed end to end (`ids` [N], the prompts' lengths `lens`, `slots` each token's adapter
        slot as in `forward_fused`) through the fused kernels: the norms, projections and MLP run once over the N
        real tokens (no padding rows in any matmul); attention runs on the prompts right-padded to the longest
        (causal, so no real position sees the padding). Returns the last position's hidden state per prompt
        [prompts, hidden] after the final norm, and per layer the keys and values [prompts, kv_heads, longest,
        head_dim], right-padded (the engine's prefill cache layout)."""
        kernels = self.kernels
        assert kernels is not None
        project = self._projector(slots)
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
        pending: torch.Tensor | None = None
        cache: list[tuple[torch.Tensor, torch.Tensor]] = []

        def pad(t: torch.Tensor, h_: int) -> torch.Tensor:  # [N, h_, D] -> [prompts, h_, width, D]
            return t.view(total, h_, d).index_select(0, padded).view(n, width, h_, d).transpose(1, 2)

        for i, layer in enumerate(self.layers):
            norm1 = layer.input_layernorm
            kernels.rms_norm(x, pending, norm1.weight, h, norm1.variance_epsilon)
            q, k, v = project.qkv(i, h)
            k_rot = x.new_empty(total, kvh, 1, d)
            v_all = x.new_empty(total, kvh, 1, d)
            kernels.rotary_append(q, k, v, cos, sin, q_rot, k_rot, v_all, 0, heads, kvh)
            keys, values = pad(k_rot, kvh).contiguous(), pad(v_all, kvh).contiguous()
            out = torch.nn.functional.scaled_dot_product_attention(
                pad(q_rot, heads), keys, values, is_causal=True, scale=self.scaling, enable_gqa=kvh != heads
            )  # [prompts, heads, width, D]
            attended = out.transpose(1, 2).reshape(n * width, heads * d).index_select(0, packed)
            cache.append((keys, values))
            pending = self._mlp(project, i, x, project.o(i, attended), h)
        assert pending is not None
        x_last = x.index_select(0, last)
        final = torch.empty_like(x_last)
        kernels.rms_norm(x_last, pending.index_select(0, last), self.decoder.norm.weight, final,
                         self.decoder.norm.variance_epsilon)  # fmt: skip
        return final, cache


class _Projections:
    """One layer's multi-LoRA projection wrappers, and the base weights they share: q/k/v and gate/up as one
    matrix each (`serve/lora._FusedGroup`), o and down; each base matmul a `serve.packed.Linear` (prepacked where
    `pack`)."""

    def __init__(self, q: Any, k: Any, v: Any, o: Any, gate: Any, up: Any, down: Any, pack: bool) -> None:
        qkv, gu = q.fused[0], gate.fused[0]
        nq, nk, nv = q.out_features, k.out_features, v.out_features
        columns = (slice(0, nq), slice(nq, nq + nk), slice(nq + nk, nq + nk + nv))  # of the fused output
        self.qkv = (Linear(qkv.weight, qkv.bias, pack), columns, (q, k, v))
        self.o = (Linear(o.base.weight, o.base.bias, pack), o)
        self.gate_up = (Linear(gu.weight, gu.bias, pack), gate.out_features, (gate, up))
        self.down = (Linear(down.base.weight, down.base.bias, pack), down)

    def packed(self) -> bool:
        return all(p[0].packed is not None for p in (self.qkv, self.o, self.gate_up, self.down))


class _Projector:
    """The projections of the fused forwards for one batch: each row's adapter `slots` (None: the base model only).
    With the wrappers' weights (`projections`), a base matmul each, plus the gathered low-rank term of each wrapper
    that holds an adapter; without them, the wrappers themselves (their own LoRA terms, by the engine's
    `LoraContext`)."""

    def __init__(self, layers: list[Any], projections: list[_Projections] | None, kernels: DecodeKernels,
                 slots: torch.Tensor | None) -> None:  # fmt: skip
        self.layers, self.projections, self.kernels, self.slots = layers, projections, kernels, slots

    def _lora(self, x: torch.Tensor, y: torch.Tensor, module: Any) -> None:
        if self.slots is not None and module.rank and any(module.active):  # the callers check slots first too
            a_all, bt_all = module.stacks()
            self.kernels.lora_rows(x, y, a_all, bt_all, self.slots, module.rank)

    def _single(self, x: torch.Tensor, projection: tuple[Linear, Any]) -> torch.Tensor:
        """A projection of its own (o, down): its base matmul and its low-rank term."""
        linear, module = projection
        y = linear(x)
        self._lora(x, y, module)
        return y

    def qkv(self, i: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.projections is None:
            attn = self.layers[i].self_attn
            return attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        linear, (q_cols, k_cols, v_cols), members = self.projections[i].qkv
        qkv = linear(h)
        q, k, v = qkv[:, q_cols], qkv[:, k_cols], qkv[:, v_cols]
        if self.slots is not None:
            for y, module in zip((q, k, v), members, strict=True):
                self._lora(h, y, module)
        return q, k, v

    def o(self, i: int, attended: torch.Tensor) -> torch.Tensor:
        if self.projections is None:
            return self.layers[i].self_attn.o_proj(attended)
        return self._single(attended, self.projections[i].o)

    def gate_up(self, i: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.projections is None:
            mlp = self.layers[i].mlp
            return mlp.gate_proj(h), mlp.up_proj(h)
        linear, n_gate, (gate_m, up_m) = self.projections[i].gate_up
        both = linear(h)
        gate, up = both[:, :n_gate], both[:, n_gate:]
        if self.slots is not None:
            self._lora(h, gate, gate_m)
            self._lora(h, up, up_m)
        return gate, up

    def down(self, i: int, act: torch.Tensor) -> torch.Tensor:
        if self.projections is None:
            return self.layers[i].mlp.down_proj(act)
        return self._single(act, self.projections[i].down)
