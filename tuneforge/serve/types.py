"""What crosses the engine's boundary: token ids in, tokens out, per request an optional adapter.

Torch-free, so the model server's app, the API's client and the tests share these without loading a model.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens. `temperature` 0 is greedy; `top_k` 0 and `min_p` 0 are off."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    # How many most likely alternatives to report with each token (its own log-probability is always reported).
    top_logprobs: int = 0
    # Token ids that end the request (the tokenizer's end-of-turn / eos ids); the stop token itself is reported.
    stop_token_ids: tuple[int, ...] = ()
    # A JSON Schema (as text) the answer must match (`response_format`); the request ends once it is complete.
    json_schema: str | None = None


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams
    # The name an adapter was loaded under (`Engine.load_adapter`); None for the base model.
    adapter: str | None = None
    # The data URLs of the images the prompt shows, in order (its ids hold the tokens the model's processor expanded
    # them to); only a vision-language model's engine takes them.
    images: tuple[str, ...] = ()


@dataclass(frozen=True)
class GeneratedToken:
    token_id: int
    logprob: float
    top_logprobs: tuple[tuple[int, float], ...] = ()
    # Set on a request's last token: "stop" (a stop token was produced) or "length" (max_tokens, or the context).
    finish_reason: str | None = None


@dataclass(frozen=True)
class AdapterStats:
    loaded: tuple[str, ...]
    count: int
    bytes: int
    max_count: int
    max_bytes: int
    hits: int
    misses: int
    evictions: int


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    steps: int
    dtype: str
    device: str
    adapters: AdapterStats | None = None
    extra: dict[str, float] = field(default_factory=dict)


class EngineError(Exception):
    """A request the engine cannot serve; the message says why in words a user can act on."""

    status_code = 400


class PromptTooLong(EngineError):
    status_code = 400


class UnknownAdapter(EngineError):
    status_code = 404


class EngineOverloaded(EngineError):
    """Out of memory or slots; the request was not started."""

    status_code = 503


class Engine(Protocol):
    """What a model server drives: `backends` implement it (transformers in-process; vLLM is reached over HTTP)."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def generate(self, req: GenerationRequest) -> AsyncIterator[GeneratedToken]: ...

    def abort(self, request_id: str) -> None: ...

    def load_adapter(self, name: str, folder: Path) -> None: ...

    def unload_adapter(self, name: str) -> None: ...

    def stats(self) -> EngineStats: ...
