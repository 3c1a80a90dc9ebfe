"""The model server's answers (the OpenAI protocol as vLLM speaks it) in the wire shape both SDKs read
(api-contract 4.1, 4.2): the caller's model name, `prompt: []`, a `role` in every chat delta, usage in the last
chunk that finishes a choice, an extra usage chunk only for `stream_options.include_usage`, and no `event:` lines.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any


def _together_logprobs(content: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "tokens": [c["token"] for c in content],
        "token_logprobs": [c["logprob"] for c in content],
        "top_logprobs": [{t["token"]: t["logprob"] for t in c.get("top_logprobs", [])} for c in content],
    }


def _logprobs(choice: dict[str, Any], together_style: bool) -> Any:
    lp = choice.get("logprobs")
    if not lp or not together_style:
        return lp
    return _together_logprobs(lp.get("content") or [])


def whole(answer: dict[str, Any], *, model: str, chat: bool, together_logprobs: bool) -> dict[str, Any]:
    choices = []
    for c in answer.get("choices", []):
        choice = {**c, "logprobs": _logprobs(c, together_logprobs)}
        if chat:
            choice["message"] = {"role": "assistant", **(c.get("message") or {})}
        choices.append(choice)
    return {
        **answer,
        "model": model,
        "object": "chat.completion" if chat else "text.completion",
        "prompt": [],
        "choices": choices,
    }


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


async def stream(
    lines: AsyncIterator[str], *, model: str, chat: bool, include_usage: bool, together_logprobs: bool
) -> AsyncIterator[bytes]:
    """Re-shape the model server's server-sent events as they come; chunks that finish a choice wait for the usage
    so the last of them can carry it."""
    held: list[dict[str, Any]] = []
    obj = "chat.completion.chunk" if chat else "completion.chunk"
    async for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            break
        payload = json.loads(data)
        if "error" in payload:
            yield _event({"error": payload["error"]})
            return
        usage = payload.get("usage")
        choices = payload.get("choices") or []
        if not choices:
            if held:
                held[-1]["usage"] = usage
            for chunk in held:
                yield _event(chunk)
            held.clear()
            if include_usage and usage is not None:
                yield _event({**payload, "model": model, "object": obj, "choices": [], "usage": usage})
            continue
        out = []
        for c in choices:
            choice = {**c}
            if chat:
                choice["delta"] = {"role": "assistant", **(c.get("delta") or {})}
            else:
                choice.setdefault("text", "")
            if "logprobs" in c:
                choice["logprobs"] = _logprobs(c, together_logprobs)
            out.append(choice)
        chunk = {**payload, "model": model, "object": obj, "choices": out, "usage": None}
        if not chat:  # Together's completion chunk: a `token` and the choice's finish_reason at the top level
            chunk.setdefault("token", {"id": 0, "text": "", "logprob": 0.0, "special": True})
            chunk["finish_reason"] = out[0].get("finish_reason")
        if any(c.get("finish_reason") for c in out):
            held.append(chunk)
        else:
            yield _event(chunk)
    for chunk in held:  # a server that sent no usage chunk
        yield _event(chunk)
    yield b"data: [DONE]\n\n"
