"""The serving engine: one base causal LM (transformers, safetensors folder) with many LoRA adapters, iteration-level
(continuous) batching, tokens streamed to asyncio callers as they are produced.

A background thread runs steps. Each step: aborted rows leave; waiting requests (up to `max_batch` running, and
`max_prefill_tokens` prompt tokens per step) are prefilled together and their first token is sampled; their KV rows
join the running batch; then one decoding forward runs over every running row and samples its next token. A row
that finishes (stop token, max_tokens, context) leaves the batch at once; no request waits for another to end.

The KV cache is a transformers `DynamicCache` whose per-layer key/value tensors [rows, kv_heads, L, head_dim] the
engine edits between forwards. Rows are left-padded to the common length L: row b holds its `cache_len` real
positions at the right end, L - cache_len padding columns at the left, which the 2-D attention mask hides; every
forward gets explicit `position_ids` (a row's next position is its own cache_len, whatever its padding).
- Joining: new prompts are prefilled with no padding mask (right-padded, causal attention alone keeps every real
  position from seeing the padding that follows it), giving fresh keys and values [n, H, T, D]: through the fused
  kernels (`serve/kernels`, `LeanDecoder.prefill_fused`) all at once, packed (padding only inside attention);
  through transformers' forward in groups of similar lengths (`_length_groups`). Each row's real positions are moved
  to the right end of L' = max(L, longest new prompt) with one `gather`, the running rows are left-padded by L' - L,
  and all are concatenated along the batch.
- Leaving: the remaining rows are index-selected, and the padding columns no remaining row needs are cut
  (L = the longest remaining cache_len), so a long request that ends gives its columns back.

Context rule: a prompt of at least `max_context` tokens is refused (`PromptTooLong`); otherwise max_tokens is capped
at what the context leaves (prompt + generated <= max_context) and a request stopped by that cap ends with
finish_reason "length", like one that reached its max_tokens.

Errors reach the caller as exceptions from the stream: `PromptTooLong`, `UnknownAdapter` (never loaded, or evicted
before the request came: load it again and retry), `EngineOverloaded` (out of memory in a step: that step's
requests fail, the engine keeps serving), `EngineError` (bad request, engine stopped, aborted). Validation errors
come from the first `__anext__` of `generate()`, before any token.

Sampling per row: greedy at temperature 0; else repetition penalty (transformers' rule: positive logits of seen
tokens divided, negative multiplied), temperature, top_k, top_p, min_p, then a draw from the request's own
`torch.Generator` (seeded by `seed`, else at random), so a seeded request draws the same tokens whatever shares its
batch. `logprob` and `top_logprobs` are of the model's distribution (log-softmax of the raw logits, before penalty,
temperature or truncation). A step whose rows are all greedy and ask for no alternatives takes each row's token and
log-probability in one kernel pass over the raw logits (`DecodeKernels.argmax_logsumexp`), where the kernels are on.

The weights are held in the compute dtype (`dtype`, default: bf16 where the machine has fast bf16, else fp32 -
`train.hardware.compute_dtype("auto")`, the training recipe's rule); the sampling math is fp32. On the CPU, for
llama-shaped models (`LeanDecoder`), steps run through the fused C++ kernels of `serve/kernels` (built once per
machine with its compiler; `fused_kernels=False`, or no compiler, keeps torch's operations).

Limits: decoder-only models with full attention on every layer (no sliding-window or hybrid cache layers: refused
at load) and no final-logit soft-capping.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.cache_utils import DynamicLayer

from tuneforge.serve.adapters import AdapterRegistry, read_adapter
from tuneforge.serve.kernels import load as load_kernels
from tuneforge.serve.lean import LeanDecoder
from tuneforge.serve.lora import inject_multi_lora
from tuneforge.serve.sampling import pick_token
from tuneforge.serve.streams import check_request, token_stream
from tuneforge.serve.structured import Grammars, mask_rows
from tuneforge.serve.threads import off_thread
from tuneforge.serve.types import (
    AdapterStats,
    EngineError,
    EngineOverloaded,
    EngineStats,
    GeneratedToken,
    GenerationRequest,
    SamplingParams,
)
from tuneforge.train.hardware import compute_dtype

if TYPE_CHECKING:
    from tuneforge.serve.types import Engine

log = logging.getLogger(__name__)

DEFAULT_MAX_LORA_BYTES = 2 << 30
DEFAULT_MAX_PREFILL_TOKENS = 8192


class _GrowingLayer(DynamicLayer):
    """A `DynamicLayer` whose keys / values are views of buffers with room to grow: a decoding step writes its
    column in place, where `DynamicLayer.update` concatenates (copies) every past column at every step."""

    ROOM = 64  # free columns after a (re)allocation: a copy of the cache every 64 steps at most

    def __init__(self) -> None:
        super().__init__()
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None

    def set(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Hold these [rows, heads, columns, dim] tensors (copied into fresh buffers with room to grow)."""
        b, h, n, d = keys.shape
        self._k = keys.new_empty(b, h, n + self.ROOM, d)
        self._v = values.new_empty(b, h, n + self.ROOM, values.shape[3])
        self._k[:, :, :n].copy_(keys)
        self._v[:, :, :n].copy_(values)
        self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]
        self.device, self.is_initialized = keys.device, True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._k is None or self._v is None or self.keys is None or self.values is None:
            self.set(key_states, value_states)
        else:
            n, q = self.keys.shape[2], key_states.shape[2]
            if n + q > self._k.shape[2]:
                self.set(self.keys, self.values)
                assert self._k is not None and self._v is not None
            self._k[:, :, n : n + q].copy_(key_states)
            self._v[:, :, n : n + q].copy_(value_states)
            self.keys, self.values = self._k[:, :, : n + q], self._v[:, :, : n + q]
        assert self.keys is not None and self.values is not None
        return self.keys, self.values

    def adopt(self, keys: torch.Tensor, values: torch.Tensor, n: int) -> None:
        """Hold these buffers [rows, heads, capacity, dim] as they are, their first `n` columns in use."""
        self._k, self._v = keys, values
        self.keys, self.values = keys[:, :, :n], values[:, :, :n]
        self.device, self.is_initialized = keys.device, True

    def reserve(self, q: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Make room for `q` more columns and count them in (the caller writes them): the key and value buffers
        [rows, heads, capacity, dim] and the index of the first new column."""
        assert self._k is not None and self._v is not None and self.keys is not None and self.values is not None
        n = self.keys.shape[2]
        if n + q > self._k.shape[2]:
            self.set(self.keys, self.values)
            assert self._k is not None and self._v is not None
        self.keys, self.values = self._k[:, :, : n + q], self._v[:, :, : n + q]
        return self._k, self._v, n


def _running_cache(config: Any) -> DynamicCache:
    cache = DynamicCache(config=config)
    cache.layers = [_GrowingLayer() for _ in cache.layers]
    return cache


def _layers(cache: DynamicCache) -> list[DynamicLayer]:
    """The cache's layers, all plain `DynamicLayer`s (checked when the engine loads the model)."""
    return cast(list[DynamicLayer], cache.layers)


def _deliver(items: list[tuple[asyncio.Queue[GeneratedToken | BaseException], GeneratedToken | BaseException]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def _length_groups(lens: list[int], min_tokens: int = 256, max_padding: float = 1.25) -> list[list[int]]:
    """Indices of `lens` in groups to prefill together: by length, a group grows while its padded size stays
    within `max_padding` x its real tokens, or while it holds fewer than `min_tokens` (small matmuls waste more
    than padding does). E.g. 32 prompts of 32-96 tokens: ~3 groups with ~10% padding, where one group pads ~50%."""
    order = sorted(range(len(lens)), key=lambda i: lens[i])
    groups: list[list[int]] = []
    group: list[int] = []
    tokens = 0
    for i in order:
        n = lens[i]  # the longest so far: the group's padded width if i joins
        if group and tokens >= min_tokens and (len(group) + 1) * n > max_padding * (tokens + n):
            groups.append(group)
            group, tokens = [], 0
        group.append(i)
        tokens += n
    if group:
        groups.append(group)
    return groups


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


@dataclass(eq=False)
class _Request:
    req: GenerationRequest
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[GeneratedToken | BaseException]
    slot: int
    max_new: int
    generator: torch.Generator
    generated: list[int] = field(default_factory=list)
    seen: torch.Tensor | None = None  # token ids seen so far, for the repetition penalty
    cache_len: int = 0
    next_input: int = 0
    ended: bool = False
    matcher: Any = None  # an llguidance matcher when the answer must match a JSON schema (serve/structured.py)

    @property
    def id(self) -> str:
        return self.req.request_id

    @property
    def params(self) -> SamplingParams:
        return self.req.sampling


class TransformersEngine:
    """See the module docstring. Drive it with `start()`, `generate()` from an event loop, `stop()`."""

    def __init__(
        self,
        model_dir: Path | str,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        max_batch: int = 32,
        max_loras: int = 8,
        max_lora_bytes: int = DEFAULT_MAX_LORA_BYTES,
        max_context: int | None = None,
        max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS,
        lora_strategy: str = "stacked",
        lean_decode: bool = True,
        fused_kernels: bool = True,
        packed_weights: bool = True,
    ) -> None:
        self.device = torch.device(device)
        self.dtype = dtype if dtype is not None else compute_dtype("auto", self.device)

        # Loaded in a thread that ends (see `off_thread`): loading on the caller's thread made every later decoding
        # step ~1.4x slower (bench/serve_throughput.py, SmolLM2 bf16, 32 streams: 236 -> 321 tok/s off-thread).
        def load() -> Any:
            model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=self.dtype)
            return model.to(self.device).eval()

        self.model: Any = off_thread(load)
        self.config = self.model.config
        layers = DynamicCache(config=self.config).layers
        if any(type(layer) is not DynamicLayer for layer in layers):
            raise EngineError("models with sliding-window or hybrid attention layers are not supported by this engine")
        if getattr(self.config, "final_logit_softcapping", None):
            raise EngineError("models with final-logit soft-capping are not supported by this engine")
        self.decoder = self.model.get_decoder()
        # decoding steps through `serve/lean.py` where the architecture allows it (the same computation, fewer ops)
        # and on the CPU through the fused kernels of `serve/kernels` where they build
        self.lean: LeanDecoder | None = None
        self.kernels = load_kernels(self.dtype, self.device) if fused_kernels else None
        if lean_decode and LeanDecoder.supports(self.model):
            self.lean = LeanDecoder(self.model, self.kernels, pack=packed_weights)
        self.head = self.model.get_output_embeddings()
        self.vocab_size = int(self.head.weight.shape[0])
        self.max_batch = max_batch
        self.max_prefill_tokens = max_prefill_tokens
        configured: Any = getattr(self.config, "max_position_embeddings", None) or 2048
        self.max_context = int(max_context or configured)
        slots = max_loras + 1
        self.lora_ctx, self.lora_modules = off_thread(lambda: inject_multi_lora(self.model, slots, lora_strategy))
        self._shapes = {name: (m.out_features, m.in_features) for name, m in self.lora_modules.items()}
        lean = self.lean
        if lean is not None and lean.kernels is not None:
            lean.fused_projections()  # the fused forwards' weights, packed now rather than in a first step
        self.adapters = AdapterRegistry(max_loras, max_lora_bytes)
        self.grammars = Grammars(Path(model_dir), self.vocab_size)

        self._model_lock = threading.Lock()  # the model, its slots, the cache: held by a step and by adapter writes
        self._cv = threading.Condition()  # waiting queue, aborts, registry pins, request ids; after _model_lock
        self._waiting: deque[_Request] = deque()
        self._active: dict[str, _Request] = {}
        self._aborts: set[str] = set()
        self._running: list[_Request] = []  # only the step thread touches it
        self._cache: DynamicCache | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._steps = 0
        self._generated = 0
        self._prefilled = 0
        self._busy_s = 0.0
        self._step_ident: int | None = None
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[Any, GeneratedToken | BaseException]]] = {}

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="tuneforge-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """End the step thread after its current step; every pending request ends with an EngineError."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._model_lock:
            pending = [*self._running, *self._waiting]
            self._running, self._cache = [], None
            with self._cv:
                self._waiting.clear()
            for r in pending:
                self._fail(r, EngineError("the engine stopped before the request ended"))

    # ---------------------------------------------------------------- adapters

    def load_adapter(self, name: str, folder: Path | str) -> None:
        """Load a peft LoRA adapter under `name`, evicting least recently used unpinned adapters when the count or
        byte limit needs room. Loading a name already loaded only marks it recently used (unload it to replace it).
        Blocks for up to one step (slots are written between forwards)."""
        with self._cv:
            if name in self.adapters:
                self.adapters.touch(name)
                return
        off_thread(lambda: self._load(name, Path(folder)))

    def _load(self, name: str, folder: Path) -> None:
        files = read_adapter(folder, self._shapes, self.dtype)
        with self._model_lock, self._cv:
            if name in self.adapters:
                self.adapters.touch(name)
                return
            slot, victims = self.adapters.plan_load(name, files.nbytes)
            for _, victim_slot in victims:
                self._clear_slot(victim_slot)
            self._clear_slot(slot)
            for module_name, weights in files.modules.items():
                module = self.lora_modules[module_name]
                module.set_slot(slot, weights.a.to(self.device), weights.b.to(self.device), weights.scale)
            self.adapters.add(name, slot, files.nbytes, victims)

    def unload_adapter(self, name: str) -> None:
        """Forget an adapter; EngineError while a request uses it, UnknownAdapter when it is not loaded."""

        def unload() -> None:
            with self._model_lock, self._cv:
                self._clear_slot(self.adapters.remove(name))

        off_thread(unload)

    def _clear_slot(self, slot: int) -> None:
        for module in self.lora_modules.values():
            if module.active[slot]:
                module.clear_slot(slot)

    def adapter_stats(self) -> AdapterStats:
        with self._cv:
            return self.adapters.stats()

    # ---------------------------------------------------------------- requests

    def _submit(self, req: GenerationRequest) -> _Request:
        p = req.sampling
        n = len(req.prompt_ids)
        if req.images:
            raise EngineError("this model reads text only; the prompt shows images")
        check_request(req, max_context=self.max_context, vocab_size=self.vocab_size)
        matcher = self.grammars.matcher(p.json_schema) if p.json_schema is not None else None
        seed = p.seed if p.seed is not None else random.getrandbits(63)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        loop = asyncio.get_running_loop()
        with self._cv:
            if self._stopping:
                raise EngineError("the engine is stopping")
            if req.request_id in self._active:
                raise EngineError(f"request id {req.request_id!r} is already in use")
            slot = self.adapters.acquire(req.adapter) if req.adapter is not None else 0
            r = _Request(req, loop, asyncio.Queue(), slot, min(p.max_tokens, self.max_context - n), generator)
            r.matcher = matcher
            self._active[req.request_id] = r
            self._waiting.append(r)
            self._cv.notify_all()
        return r

    async def generate(self, req: GenerationRequest) -> AsyncIterator[GeneratedToken]:
        """Stream the request's tokens as they are produced; the last one carries its finish_reason. Leaving the
        loop early (aclose, cancellation, a disconnect) aborts the request: its slot is freed at the next step."""
        r = self._submit(req)
        async for token in token_stream(r.queue, lambda: self.abort(req.request_id)):
            yield token

    def abort(self, request_id: str) -> None:
        """End a request: a waiting one at once, a running one at the next step. Unknown ids are ignored."""
        with self._cv:
            r = self._active.get(request_id)
            if r is None:
                return
            if r in self._waiting:
                self._waiting.remove(r)
                self._end(r, EngineError("the request was aborted"))
            else:
                self._aborts.add(request_id)
                self._cv.notify_all()

    # ---------------------------------------------------------------- stats

    def stats(self) -> EngineStats:
        with self._cv:
            waiting = len(self._waiting)
            adapters = self.adapters.stats()
        cache = self._cache
        return EngineStats(
            running=len(self._running),
            waiting=waiting,
            steps=self._steps,
            dtype=str(self.dtype).removeprefix("torch."),
            device=str(self.device),
            adapters=adapters,
            extra={
                "generated_tokens": float(self._generated),
                "prefill_tokens": float(self._prefilled),
                "cache_columns": float(cache.get_seq_length() if cache is not None else 0),
                "busy_seconds": self._busy_s,
                "max_context": float(self.max_context),
                "packed_weights": float(self.lean is not None and self.lean.kernels is not None and self.lean.packed()),
            },
        )

    # ---------------------------------------------------------------- the step thread

    def _send(self, r: _Request, item: GeneratedToken | BaseException) -> None:
        """Hand an item to the request's stream. On the step thread items wait in an outbox that `_flush` hands
        over with one `call_soon_threadsafe` per event loop (one wake-up per step, not one per token); elsewhere
        (abort, stop) at once."""
        if threading.get_ident() == self._step_ident:
            self._outbox.setdefault(r.loop, []).append((r.queue, item))
            return
        with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody listens
            r.loop.call_soon_threadsafe(r.queue.put_nowait, item)

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_deliver, items)

    def _end(self, r: _Request, error: BaseException | None = None) -> None:
        """Forget a request (caller holds _cv); an error, if any, goes to its stream."""
        if r.ended:
            return
        r.ended = True
        self._active.pop(r.id, None)
        if r.req.adapter is not None:
            self.adapters.release(r.req.adapter)
        if error is not None:
            self._send(r, error)

    def _fail(self, r: _Request, error: BaseException) -> None:
        with self._cv:
            self._end(r, error)

    def _loop(self) -> None:
        self._step_ident = threading.get_ident()
        try:
            self._steps_until_stopped()
        finally:
            self._step_ident = None

    def _steps_until_stopped(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                while not (self._stopping or self._waiting or self._running or self._aborts):
                    self._cv.wait(timeout=1.0)
                if self._stopping:
                    return
                aborts, self._aborts = self._aborts, set()
                admitted: list[_Request] = []
                budget = self.max_prefill_tokens
                while self._waiting and len(self._running) + len(admitted) < self.max_batch:
                    n = len(self._waiting[0].req.prompt_ids)
                    if admitted and n > budget:
                        break
                    admitted.append(self._waiting.popleft())
                    budget -= n
            started = time.perf_counter()
            with self._model_lock, torch.inference_mode():
                if aborts:
                    self._leave([r for r in self._running if r.id in aborts], EngineError("the request was aborted"))
                if admitted:
                    self._guarded(self._prefill, admitted)
                    self._flush()  # first tokens out before the decode forward
                if self._running:
                    self._guarded(self._decode, list(self._running))
                self._steps += 1
            self._flush()
            self._busy_s += time.perf_counter() - started

    def _guarded(self, step: Any, rows: list[_Request]) -> None:
        """Run a prefill or decode; on an error fail its rows (out of memory: EngineOverloaded) and keep serving."""
        try:
            step(rows)
        except Exception as exc:
            if _is_oom(exc):
                error: EngineError = EngineOverloaded("out of memory while serving the request; retry later")
            else:
                log.exception("engine step failed")
                error = EngineError(f"the engine failed on this request: {type(exc).__name__}: {exc}")
            if step == self._decode:  # the running cache may be half-updated: every running row fails
                rows = list(self._running)
            self._leave([r for r in rows if r in self._running], error)
            for r in rows:
                self._fail(r, error)
            if torch.cuda.is_available() and self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _set_slots(self, rows: list[_Request]) -> None:
        self.lora_ctx.set_rows([r.slot for r in rows], self.device)

    def _prefill(self, rows: list[_Request]) -> None:
        """Prefill the admitted rows, sample each one's first token, and merge the rows that go on into the running
        cache at once. Through the fused kernels (`LeanDecoder.prefill_fused`) the prompts go packed, in one
        forward; through transformers' forward, right-padded, in groups of similar lengths (`_length_groups`:
        padding costs every layer's matmuls)."""
        lens = [len(r.req.prompt_ids) for r in rows]
        fused = self.lean is not None and self.lean.kernels is not None
        parts: list[tuple[list[tuple[torch.Tensor, torch.Tensor]], list[int], list[int]]] = []
        joining: list[_Request] = []
        for group in [list(range(len(rows)))] if fused else _length_groups(lens):
            members = [rows[i] for i in group]
            cache, logits = self._prefill_forward(members)
            kept = self._sample_and_send(members, logits)
            if kept:
                index = [members.index(r) for r in kept]
                parts.append((cache, index, [r.cache_len for r in kept]))
                joining.extend(kept)
        if parts:
            self._join(parts)
            self._running.extend(joining)

    def _prefill_forward(self, rows: list[_Request]) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """One forward over these prompts: per layer their keys and values [rows, kv_heads, longest, head_dim]
        (right-padded), and each one's last-position logits."""
        lens = [len(r.req.prompt_ids) for r in rows]
        if self.lean is not None and self.lean.kernels is not None:
            slots = [r.slot for r in rows for _ in r.req.prompt_ids]  # per token
            if not self.lean.fused_projections():
                self.lora_ctx.set_rows(slots, self.device)  # the wrappers add the low-rank terms themselves
            ids = torch.tensor([t for r in rows for t in r.req.prompt_ids], dtype=torch.long, device=self.device)
            hidden, cache = self.lean.prefill_fused(ids, lens, torch.tensor(slots, dtype=torch.long))
            logits = self.lean.logits(hidden)
        else:
            width = max(lens)
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, : lens[i]] = torch.tensor(r.req.prompt_ids, dtype=torch.long)
            ids = ids.to(self.device)
            positions = torch.arange(width, device=self.device).expand(len(rows), width)
            self._set_slots(rows)
            dynamic = DynamicCache(config=self.config)
            # Right padding and no padding mask: causal attention keeps each real position from the padding after
            # it.
            hidden = self.decoder(
                input_ids=ids, position_ids=positions, cache=dynamic, use_cache=True
            ).last_hidden_state
            last = torch.tensor([n - 1 for n in lens], device=self.device)
            logits = self.head(hidden[torch.arange(len(rows), device=self.device), last])
            cache = []
            for layer in _layers(dynamic):
                assert layer.keys is not None and layer.values is not None
                cache.append((layer.keys, layer.values))
        self._prefilled += sum(lens)
        for r, n in zip(rows, lens, strict=True):
            r.cache_len = n
            if r.params.repetition_penalty != 1.0:
                r.seen = torch.tensor(sorted(set(r.req.prompt_ids)), dtype=torch.long, device=self.device)
        return cache, logits

    def _join(self, parts: list[tuple[list[tuple[torch.Tensor, torch.Tensor]], list[int], list[int]]]) -> None:
        """Merge rows of right-padded prefill caches into the running cache: per part, its keys and values per
        layer, the rows of it that join (in order) and their real lengths. Each layer's new buffers are written
        once: the running rows shifted right by the width they gain, each new row's real columns at the right end
        (one copy per row: no gather, concatenation or second copy into room to grow), zeros elsewhere."""
        old_len = self._cache.get_seq_length() if self._cache is not None else 0
        width = max(old_len, *(n for _, _, lens in parts for n in lens))
        if self._cache is None:
            self._cache = _running_cache(self.config)
        old_rows = len(self._running)
        rows = old_rows + sum(len(index) for _, index, _ in parts)
        for i, layer in enumerate(_layers(self._cache)):
            buffers = []
            for k, old in enumerate((layer.keys, layer.values)):
                like = parts[0][0][i][k]
                buffer = like.new_zeros(rows, like.shape[1], width + _GrowingLayer.ROOM, like.shape[3])
                if old is not None and old.numel():
                    buffer[:old_rows, :, width - old.shape[2] : width] = old
                row = old_rows
                for cache, index, lens in parts:
                    fresh = cache[i][k]
                    for j, n in zip(index, lens, strict=True):
                        buffer[row, :, width - n : width] = fresh[j, :, :n]
                        row += 1
                buffers.append(buffer)
            cast(_GrowingLayer, layer).adopt(buffers[0], buffers[1], width)

    def _leave(self, rows: list[_Request], error: BaseException | None = None) -> None:
        """Take `rows` out of the running batch and its cache; cut padding columns no remaining row needs."""
        if not rows:
            return
        gone = set(map(id, rows))
        keep = [i for i, r in enumerate(self._running) if id(r) not in gone]
        with self._cv:
            for r in rows:
                self._end(r, error)
        self._running = [self._running[i] for i in keep]
        if not self._running or self._cache is None:
            self._cache = None
            return
        width = self._cache.get_seq_length()
        needed = max(r.cache_len for r in self._running)
        index = torch.tensor(keep, device=self.device)
        for layer in _layers(self._cache):
            assert layer.keys is not None and layer.values is not None
            keys = layer.keys[:, :, width - needed :].index_select(0, index)
            cast(_GrowingLayer, layer).set(keys, layer.values[:, :, width - needed :].index_select(0, index))

    def _decode(self, rows: list[_Request]) -> None:
        assert self._cache is not None
        width = self._cache.get_seq_length()
        ids = torch.tensor([[r.next_input] for r in rows], dtype=torch.long, device=self.device)
        lens = torch.tensor([r.cache_len for r in rows], dtype=torch.long, device=self.device)
        positions = lens[:, None]
        fused = self.lean is not None and self.lean.kernels is not None
        if not (fused and self.lean is not None and self.lean.fused_projections()):
            self._set_slots(rows)  # the wrappers add the low-rank terms themselves
        if self.lean is not None and self.lean.kernels is not None:
            slots = torch.tensor([r.slot for r in rows], dtype=torch.long)
            logits = self.lean.logits(
                self.lean.forward_fused(ids, positions, width - lens, _layers(self._cache), slots)
            )
        elif self.lean is not None:
            mask = self._decode_mask(width, lens)
            logits = self.head(self.lean.forward(ids, positions, mask, _layers(self._cache)))
        else:
            mask = self._decode_mask(width, lens)
            hidden = self.decoder(
                input_ids=ids, attention_mask=mask, position_ids=positions, cache=self._cache, use_cache=True
            ).last_hidden_state
            logits = self.head(hidden[:, -1])
        for r in rows:
            r.cache_len += 1
        kept = set(map(id, self._sample_and_send(rows, logits)))
        self._leave([r for r in rows if id(r) not in kept])

    def _decode_mask(self, width: int, lens: torch.Tensor) -> torch.Tensor:
        """The decoding forward's additive [rows, 1, 1, width + 1] mask in the compute dtype, which transformers
        hands to attention as is (a 2-D mask costs a 4-D mask build inside every forward): columns [0, width) are
        the cache (row b's real ones are the last cache_len), column `width` the new token."""
        pad = torch.arange(width + 1, device=self.device)[None, :] < (width - lens)[:, None]
        mask = torch.zeros(lens.shape[0], 1, 1, width + 1, dtype=self.dtype, device=self.device)
        return mask.masked_fill_(pad[:, None, None, :], float("-inf"))

    # ---------------------------------------------------------------- sampling

    def _sample_and_send(self, rows: list[_Request], logits: torch.Tensor) -> list[_Request]:
        """Pick each row's next token, stream it; returns the rows that go on (the others are ended here)."""
        constrained = [(i, r.matcher) for i, r in enumerate(rows) if r.matcher is not None]
        k_max = max(r.params.top_logprobs for r in rows)
        plain = [r.params.temperature == 0 and r.params.repetition_penalty == 1.0 for r in rows]
        top = None
        if self.kernels is not None and all(plain) and not constrained and not k_max and logits.is_contiguous():
            # every row greedy, nothing but its own log-probability asked: one kernel pass over the raw logits
            index, maximum, lse = self.kernels.argmax_logsumexp(logits)
            tokens, token_lp = index.tolist(), (maximum - lse).tolist()
            token_t = index
        else:
            logits = logits.float()
            if constrained:
                mask_rows(logits, constrained)
            # the whole log-softmax [rows, vocab] only when alternatives are asked for; a token's own
            # log-probability is its logit minus the row's logsumexp (one reduction, no [rows, vocab] result)
            logprobs = torch.log_softmax(logits, dim=-1) if k_max else None
            top = logprobs.topk(min(k_max, self.vocab_size), dim=-1) if logprobs is not None else None
            greedy = logits.max(dim=-1).indices  # argmax (first maximum), ~2.5x faster on CPU than `argmax`
            # greedy rows are filled from `greedy` below, without a sync per row
            chosen = [-1 if plain[i] else self._pick(r, logits[i]) for i, r in enumerate(rows)]
            greedy_list = greedy.tolist()
            tokens = [greedy_list[i] if c < 0 else c for i, c in enumerate(chosen)]
            token_t = torch.tensor(tokens, device=self.device)
            if logprobs is not None:
                token_lp = logprobs.gather(1, token_t[:, None])[:, 0].tolist()
            else:
                token_lp = (logits.gather(1, token_t[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)).tolist()
        top_vals = top.values.tolist() if top is not None else None
        top_ids = top.indices.tolist() if top is not None else None
        going_on: list[_Request] = []
        for i, r in enumerate(rows):
            p, token = r.params, tokens[i]
            r.generated.append(token)
            self._generated += 1
            if r.seen is not None:
                r.seen = torch.unique(torch.cat([r.seen, token_t[i : i + 1]]))
            finish = None
            if r.matcher is not None:
                r.matcher.consume_token(token)
            if token in p.stop_token_ids or (r.matcher is not None and r.matcher.is_stopped()):
                finish = "stop"
            elif len(r.generated) >= r.max_new:
                finish = "length"
            alternatives: tuple[tuple[int, float], ...] = ()
            if p.top_logprobs and top_ids is not None and top_vals is not None:
                alternatives = tuple(zip(top_ids[i][: p.top_logprobs], top_vals[i][: p.top_logprobs], strict=True))
            if finish is not None:
                with self._cv:
                    self._end(r)  # before the last token goes out: its id is free once the caller has it
            self._send(r, GeneratedToken(token, token_lp[i], alternatives, finish))
            if finish is None:
                r.next_input = token
                going_on.append(r)
        return going_on

    def _pick(self, r: _Request, logits: torch.Tensor) -> int:
        return pick_token(r.params, logits, r.seen, r.generator)


if TYPE_CHECKING:

    def _is_an_engine(engine: TransformersEngine) -> Engine:
        return engine  # mypy checks that TransformersEngine implements the Engine protocol
