"""What every engine does the same way at its boundary: refuse a request it cannot serve before any token, and
hand a request's tokens to its caller as an async stream that aborts the request when the caller leaves early."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from tuneforge.serve.types import EngineError, GeneratedToken, GenerationRequest, PromptTooLong


def check_request(req: GenerationRequest, *, max_context: int, vocab_size: int) -> None:
    """Refuse what no engine serves: an empty prompt, sampling parameters out of range, a prompt that fills the
    context, token ids outside the vocabulary.

    Raises:
        EngineError: the reason, in words a user can act on (PromptTooLong for the context).
    """
    p, n = req.sampling, len(req.prompt_ids)
    if n == 0:
        raise EngineError("the prompt is empty")
    if p.max_tokens < 1:
        raise EngineError("max_tokens must be at least 1")
    if p.temperature < 0 or not 0 < p.top_p <= 1 or p.top_k < 0 or not 0 <= p.min_p <= 1:
        raise EngineError("sampling parameters out of range (temperature >= 0, 0 < top_p <= 1, top_k >= 0, ...)")
    if p.repetition_penalty <= 0 or p.top_logprobs < 0:
        raise EngineError("repetition_penalty must be > 0 and top_logprobs >= 0")
    if n >= max_context:
        raise PromptTooLong(
            f"the prompt has {n} tokens; this model's context holds {max_context}, prompt and answer together"
        )
    if any(t < 0 or t >= vocab_size for t in req.prompt_ids):
        raise EngineError(f"the prompt has token ids outside the vocabulary (0..{vocab_size - 1})")


async def token_stream(
    queue: asyncio.Queue[GeneratedToken | BaseException], abort: Callable[[], None]
) -> AsyncIterator[GeneratedToken]:
    """The tokens an engine puts in `queue` (an exception there is raised), up to the one with a finish_reason;
    leaving early (aclose, cancellation, a disconnect) calls `abort`."""
    ended = False
    try:
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                ended = True
                raise item
            ended = item.finish_reason is not None
            yield item
            if ended:
                return
    finally:
        if not ended:
            abort()
