"""The engine of a vision-language model: its transformers model (image encoder, connector, language model) with
LoRA adapters through peft, one request at a time.

A worker thread takes requests in order. Each one: the prompt's images go through the model's image processor, one
forward reads the prompt's ids and pixels (prefill, with a KV cache), then one forward per token; every token is
streamed as it is picked, with its log-probability under the raw logits. Greedy at temperature 0, else the
sampling rules every engine shares (`sampling.py`), with the request's own seeded generator. Adapters are loaded
into one `PeftModel` (at most `max_loras`, least recently used evicted); a request for the base model runs with
them disabled. Leaving a stream early aborts its request before its next token.

What it does not do: batching (each request runs alone: a VLM here serves a few users, not a crowd) and
`response_format` (a 400). A text model is served by `engine.TransformersEngine`.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import random
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tuneforge.serve.adapters import CONFIG_FILE, WEIGHTS_FILE
from tuneforge.serve.sampling import pick_token
from tuneforge.serve.streams import check_request, token_stream
from tuneforge.serve.threads import off_thread
from tuneforge.serve.types import (
    AdapterStats,
    EngineError,
    EngineStats,
    GeneratedToken,
    GenerationRequest,
    UnknownAdapter,
)
from tuneforge.train.hardware import compute_dtype
from tuneforge.train.vision import load_processor


@dataclass
class _Job:
    req: GenerationRequest
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[GeneratedToken | BaseException] = field(default_factory=asyncio.Queue)


class VisionEngine:
    """See the module docstring. Drive it with `start()`, `generate()` from an event loop, `stop()`."""

    def __init__(
        self, model_dir: Path | str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
        max_loras: int = 8, max_context: int | None = None,
    ) -> None:  # fmt: skip
        from transformers import AutoModelForImageTextToText

        self.device = torch.device(device)
        self.dtype = dtype if dtype is not None else compute_dtype("auto", self.device)
        self.processor = load_processor(model_dir)

        def load() -> Any:
            model: Any = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=self.dtype)
            return model.to(self.device).eval()

        self.base: Any = off_thread(load)
        self.model: Any = self.base  # the PeftModel around it once an adapter is loaded
        text = getattr(self.base.config, "text_config", None) or self.base.config
        self.vocab_size = int(self.base.get_output_embeddings().weight.shape[0])
        self.max_context = int(max_context or getattr(text, "max_position_embeddings", None) or 2048)
        self.max_loras = max_loras
        self._adapters: OrderedDict[str, int] = OrderedDict()  # name -> bytes, least recently used first
        self._hits = self._misses = self._evictions = 0
        self._lock = threading.Lock()  # the model: held by a request's forwards and by adapter loads
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._aborts: set[str] = set()
        self._active: set[str] = set()
        self._running = 0
        self._steps = 0
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="tuneforge-vision-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """End the worker after its current request; requests still queued end with an EngineError."""
        if self._thread is None:
            return
        self._jobs.put(None)
        self._thread.join(timeout)
        self._thread = None
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                self._send(job, EngineError("the engine stopped"))

    # ---------------------------------------------------------------- adapters

    def load_adapter(self, name: str, folder: Path | str) -> None:
        """Load (or mark recently used) the adapter saved in `folder` under `name`."""
        with self._lock:
            if name in self._adapters:
                self._adapters.move_to_end(name)
                self._hits += 1
                return
            self._misses += 1
            config, weights = Path(folder) / CONFIG_FILE, Path(folder) / WEIGHTS_FILE
            if not config.is_file() or not weights.is_file():
                raise EngineError(f"{folder} is not a LoRA adapter folder: it needs {CONFIG_FILE} and {WEIGHTS_FILE}")
            size = weights.stat().st_size
            while len(self._adapters) >= self.max_loras:
                self._drop(next(iter(self._adapters)))
                self._evictions += 1
            off_thread(lambda: self._load(name, Path(folder)))
            self._adapters[name] = size

    def _load(self, name: str, folder: Path) -> None:
        from peft import PeftModel

        if self.model is self.base:
            self.model = PeftModel.from_pretrained(self.base, str(folder), adapter_name=name).eval()
        else:
            self.model.load_adapter(str(folder), adapter_name=name)

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            if name in self._adapters:
                self._drop(name)

    def _drop(self, name: str) -> None:
        """Remove a loaded adapter (under the lock); the last one leaves the plain base model (peft keeps no
        adapter-less wrapper that could take a new one)."""
        del self._adapters[name]
        if self._adapters:
            self.model.delete_adapter(name)
        else:
            self.base = self.model.unload()
            self.model = self.base

    def adapter_stats(self) -> AdapterStats:
        return AdapterStats(loaded=tuple(self._adapters), count=len(self._adapters),
                            bytes=sum(self._adapters.values()), max_count=self.max_loras, max_bytes=0,
                            hits=self._hits, misses=self._misses, evictions=self._evictions)  # fmt: skip

    # ---------------------------------------------------------------- requests

    async def generate(self, req: GenerationRequest) -> AsyncIterator[GeneratedToken]:
        """Stream the request's tokens as they are picked; the last one carries its finish_reason."""
        self._check(req)
        job = _Job(req, asyncio.get_running_loop())
        self._active.add(req.request_id)
        self._jobs.put(job)
        async for token in token_stream(job.out, lambda: self.abort(req.request_id)):
            yield token

    def _check(self, req: GenerationRequest) -> None:
        check_request(req, max_context=self.max_context, vocab_size=self.vocab_size)
        if req.sampling.json_schema is not None:
            raise EngineError("response_format is not available for vision-language models here")
        if req.adapter is not None and req.adapter not in self._adapters:
            raise UnknownAdapter(f"adapter {req.adapter!r} is not loaded")
        if req.request_id in self._active:
            raise EngineError(f"request id {req.request_id!r} is already in use")

    def abort(self, request_id: str) -> None:
        """End a request before its next token (a queued one when its turn comes). Unknown ids are ignored."""
        if request_id in self._active:
            self._aborts.add(request_id)

    def stats(self) -> EngineStats:
        return EngineStats(running=self._running, waiting=self._jobs.qsize(), steps=self._steps,
                           dtype=str(self.dtype).removeprefix("torch."), device=str(self.device),
                           adapters=self.adapter_stats(), extra={"max_context": float(self.max_context)})  # fmt: skip

    # ---------------------------------------------------------------- the worker thread

    def _send(self, job: _Job, item: GeneratedToken | BaseException) -> None:
        with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody listens
            job.loop.call_soon_threadsafe(job.out.put_nowait, item)

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            self._running = 1
            try:
                self._run(job)
            except EngineError as exc:
                self._send(job, exc)
            except Exception as exc:  # a failed forward ends this request, not the engine
                self._send(job, EngineError(f"generation failed: {type(exc).__name__}: {exc}"))
            finally:
                self._running = 0
                self._active.discard(job.req.request_id)
                self._aborts.discard(job.req.request_id)

    @contextlib.contextmanager
    def _weights(self, adapter: str | None) -> Iterator[Any]:
        """The model with `adapter` active (None: the base, adapters disabled)."""
        if self.model is self.base:
            if adapter is not None:
                raise UnknownAdapter(f"adapter {adapter!r} is not loaded")
            yield self.base
            return
        if adapter is None:
            with self.model.disable_adapter():
                yield self.model
            return
        if adapter not in self._adapters:
            raise UnknownAdapter(f"adapter {adapter!r} was unloaded; load it again")
        self._adapters.move_to_end(adapter)
        self.model.set_adapter(adapter)
        yield self.model

    @torch.inference_mode()
    def _run(self, job: _Job) -> None:
        req, p = job.req, job.req.sampling
        if req.request_id in self._aborts:  # its caller left while it waited
            raise EngineError("the request was aborted")
        ids = torch.tensor([req.prompt_ids], device=self.device)
        pixels: dict[str, torch.Tensor] = {}
        if req.images:
            try:
                images = [[self.processor.image(url) for url in req.images]]
            finally:
                self.processor.forget()
            made = self.processor.processor.image_processor(images=images, return_tensors="pt")
            pixels = {k: v.to(self.device) for k, v in made.items() if isinstance(v, torch.Tensor)}
            if "pixel_values" in pixels:
                pixels["pixel_values"] = pixels["pixel_values"].to(self.dtype)
        seed = p.seed if p.seed is not None else random.getrandbits(63)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        seen = torch.tensor(sorted(set(req.prompt_ids)), device=self.device) if p.repetition_penalty != 1.0 else None
        max_new = min(p.max_tokens, self.max_context - len(req.prompt_ids))
        with self._lock, self._weights(req.adapter) as model:
            out = model(input_ids=ids, **pixels, use_cache=True, logits_to_keep=1)  # the last position's only
            self._steps += 1
            position = len(req.prompt_ids)
            for made_count in range(1, max_new + 1):
                if req.request_id in self._aborts:
                    raise EngineError("the request was aborted")
                logits = out.logits[0, -1].float()
                token = pick_token(p, logits, seen, generator)
                logprobs = torch.log_softmax(logits, dim=-1)
                alternatives: tuple[tuple[int, float], ...] = ()
                if p.top_logprobs:
                    top = logprobs.topk(min(p.top_logprobs, self.vocab_size))
                    alternatives = tuple(zip(top.indices.tolist(), top.values.tolist(), strict=True))
                finish = "stop" if token in p.stop_token_ids else "length" if made_count >= max_new else None
                self._send(job, GeneratedToken(token, float(logprobs[token]), alternatives, finish))
                if finish is not None:
                    return
                if seen is not None:
                    seen = torch.unique(torch.cat([seen, torch.tensor([token], device=self.device)]))
                out = model(input_ids=torch.tensor([[token]], device=self.device), cache=out.cache,
                            cache_position=torch.tensor([position], device=self.device), use_cache=True)  # fmt: skip
                position += 1
                self._steps += 1


if TYPE_CHECKING:
    from tuneforge.serve.types import Engine

    def _is_an_engine(engine: VisionEngine) -> Engine:
        return engine  # mypy checks that VisionEngine implements the Engine protocol
