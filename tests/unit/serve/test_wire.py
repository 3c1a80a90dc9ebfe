"""The model server's (vLLM-style) events re-shaped for both SDKs: the caller's model name, a role in every chat
delta, usage on the chunk that finishes the last choice, an extra usage chunk only when asked, `[DONE]` last."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from openai.types.chat import ChatCompletionChunk
from together.types.chat.chat_completion_chunk import ChatCompletionChunk as TogetherChunk
from together.types.completion_chunk import CompletionChunk

from tuneforge.api.inference import wire


async def _lines(events: list[dict[str, Any] | str]) -> AsyncIterator[str]:
    for e in events:
        yield "data: " + (e if isinstance(e, str) else json.dumps(e))
        yield ""


def _collect(events: list[Any], **kwargs: Any) -> list[Any]:
    async def run() -> list[bytes]:
        return [c async for c in wire.stream(_lines(events), **kwargs)]

    out = asyncio.run(run())
    assert out[-1] == b"data: [DONE]\n\n"
    for chunk in out:
        assert chunk.startswith(b"data: ") and chunk.endswith(b"\n\n") and b"event:" not in chunk
    return [json.loads(c[6:]) for c in out[:-1]]


VLLM_CHAT = [
    {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "ft-x",
     "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
    {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "ft-x",
     "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]},
    {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "ft-x",
     "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
    {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "ft-x", "choices": [],
     "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}},
    "[DONE]",
]  # fmt: skip


def test_chat_chunks_read_in_both_sdks_with_usage_on_the_finishing_chunk() -> None:
    chunks = _collect(VLLM_CHAT, model="alice/tuned", chat=True, include_usage=False, together_logprobs=False)
    assert [c["model"] for c in chunks] == ["alice/tuned"] * 3
    for c in chunks:
        ChatCompletionChunk.model_validate(c)
        TogetherChunk.model_validate(c)
        assert c["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
    assert all(c["usage"] is None for c in chunks[:-1])


def test_include_usage_adds_a_last_chunk_without_choices() -> None:
    chunks = _collect(VLLM_CHAT, model="m", chat=True, include_usage=True, together_logprobs=False)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 4
    ChatCompletionChunk.model_validate(chunks[-1])


def test_completion_chunks_carry_a_token_for_together() -> None:
    events = [
        {"id": "x", "object": "text_completion", "created": 1, "model": "b",
         "choices": [{"index": 0, "text": "lo", "finish_reason": None}],
         "token": {"id": 5, "text": "lo", "logprob": -0.1, "special": False}},
        {"id": "x", "object": "text_completion", "created": 1, "model": "b",
         "choices": [{"index": 0, "text": "", "finish_reason": "length"}]},
        {"id": "x", "object": "text_completion", "created": 1, "model": "b", "choices": [],
         "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}},
    ]  # fmt: skip
    chunks = _collect(events, model="b", chat=False, include_usage=False, together_logprobs=False)
    for c in chunks:
        CompletionChunk.model_validate(c)
    assert chunks[-1]["finish_reason"] == "length" and chunks[-1]["usage"]["completion_tokens"] == 1


def test_an_error_event_is_passed_on_and_ends_the_stream() -> None:
    async def run() -> list[bytes]:
        lines = _lines([VLLM_CHAT[1], {"error": {"message": "engine out of memory", "type": "server_error"}}])
        return [c async for c in wire.stream(lines, model="m", chat=True, include_usage=False,
                                             together_logprobs=False)]  # fmt: skip

    out = asyncio.run(run())
    assert json.loads(out[-1][6:]) == {"error": {"message": "engine out of memory", "type": "server_error"}}
