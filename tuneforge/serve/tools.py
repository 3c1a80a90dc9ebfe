"""Tool calls in a model's answer, in the convention of the chat templates that render `tools` (Hermes, Qwen,
SmolLM3 and most open models since): each call is a JSON object `{"name", "arguments"}` between `<tool_call>` and
`</tool_call>`. The answer's text outside those blocks stays its content; the calls become OpenAI `tool_calls`
(`arguments` as a JSON string), and the choice finishes with `tool_calls`. Text that only looks like a call (no
closing tag, not a JSON object with a name) stays text."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.DOTALL)


@dataclass(frozen=True)
class Parsed:
    content: str
    calls: list[dict[str, Any]]


def _call(text: str, index: int) -> dict[str, Any] | None:
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    arguments = data.get("arguments", data.get("parameters", {}))
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments)
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "index": index,
        "function": {"name": data["name"], "arguments": arguments},
    }


def parse(text: str) -> Parsed:
    """The answer's content and its tool calls (none when no block parses)."""
    calls: list[dict[str, Any]] = []
    kept: list[str] = []
    last = 0
    for match in _BLOCK.finditer(text):
        call = _call(match.group(1), len(calls))
        if call is None:
            continue
        calls.append(call)
        kept.append(text[last : match.start()])
        last = match.end()
    if not calls:
        return Parsed(text, [])
    kept.append(text[last:])
    return Parsed("".join(kept).strip(), calls)


def may_open(text: str) -> int:
    """Where in `text` a tool-call block starts or may start (a prefix of the opening tag at its end); len(text) if
    nowhere: a stream shows text up to there and holds the rest until the answer ends."""
    at = text.find(OPEN)
    if at >= 0:
        return at
    for k in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if text.endswith(OPEN[:k]):
            return len(text) - k
    return len(text)
