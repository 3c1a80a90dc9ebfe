"""The reference rules for chat messages, content parts, tools and tool calls (api-contract 2.4-2.5), on decoded JSON.

This is the slow, exact path that words every error; `fast.py` must never accept what this rejects.
Knows one decoded record at a time; nothing of lines, files or the typed fast path.
"""

from __future__ import annotations

from typing import Any

import msgspec

from tuneforge.data.formats import DECODE_ERRORS, jtype, show
from tuneforge.data.validation.images import MAX_IMAGES_PER_EXAMPLE, check_data_url
from tuneforge.data.validation.report import (
    MESSAGE_WEIGHTS,
    MULTIMODAL,
    PARALLEL_TOOL_CALLS,
    REASONING,
    TOOLS,
)

ROLES = ("system", "user", "assistant", "tool")
_CODES = {"system": "s", "user": "u", "assistant": "a", "tool": "t"}
_ROLE_KEYS = {
    "system": {"role", "content", "weight", "name"},
    "user": {"role", "content", "weight", "name"},
    "assistant": {"role", "content", "weight", "name", "tool_calls", "reasoning", "reasoning_content"},
    "tool": {"role", "content", "weight", "name", "tool_call_id"},
}


class Findings:
    """The errors, warnings and dataset flags of one record, as the rule functions find them."""

    __slots__ = ("errors", "flags", "warnings")

    def __init__(self) -> None:
        self.errors: list[tuple[str | None, str, str]] = []
        self.warnings: list[tuple[str | None, str, str]] = []
        self.flags = 0

    def error(self, field: str | None, message: str, code: str) -> None:
        self.errors.append((field, message, code))

    def warn(self, field: str | None, message: str, code: str) -> None:
        self.warnings.append((field, message, code))


def parse_json_text(text: str) -> str | None:
    """Why `text` is not JSON, or None. Python's json is the fallback so we accept what the SDK accepts."""
    try:
        msgspec.json.decode(text)
        return None
    except DECODE_ERRORS:
        import json

        try:
            json.loads(text)
            return None
        except RecursionError:
            return "nested too deeply"
        except ValueError as exc:
            return str(exc)


def check_content(value: Any, path: str, role: str, found: Findings) -> tuple[str, int]:
    """Check one `content` value. Returns its kind ("str" or "list") and its number of images."""
    if isinstance(value, str):
        return "str", 0
    if not isinstance(value, list):
        found.error(path, f"content must be a string or a list of content parts, got {jtype(value)}", "content")
        return "bad", 0
    found.flags |= MULTIMODAL
    if not value:
        found.error(path, "content list is empty; give at least one text or image_url part", "content")
    images = 0
    for j, part in enumerate(value):
        p = f"{path}[{j}]"
        if not isinstance(part, dict):
            found.error(p, f"content part must be an object with a type, got {jtype(part)}", "content")
            continue
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                found.error(f"{p}.text", f"text part needs a string text, got {jtype(part.get('text'))}", "content")
            _unknown_keys(part, {"type", "text"}, p, found)
        elif kind == "image_url":
            images += 1
            _check_image_part(part, p, role, found)
        elif "type" not in part:
            found.error(f"{p}.type", "content part has no type; use text or image_url", "content")
        else:
            found.error(f"{p}.type", f"part type {show(kind)} is not one of text, image_url", "content")
    if images > MAX_IMAGES_PER_EXAMPLE:
        found.error(path, f"message has {images} images; the limit is {MAX_IMAGES_PER_EXAMPLE} per message", "images")
    return "list", images


def _check_image_part(part: dict[str, Any], p: str, role: str, found: Findings) -> None:
    if role != "user":
        found.error(p, f"images are allowed only in user messages, not in {_a(role)} message", "images")
    box = part.get("image_url")
    url = box.get("url") if isinstance(box, dict) else None
    if not isinstance(box, dict):
        found.error(f"{p}.image_url", f"image_url must be an object with a url, got {jtype(box)}", "content")
    elif not isinstance(url, str) or not url:
        why = f"url must be a non-empty string (a data URL), {_got(box, 'url')}"
        found.error(f"{p}.image_url.url", why, "content")
    elif role == "user":
        bad = check_data_url(url)
        if bad:
            found.error(f"{p}.image_url.url", bad, "images")
    if isinstance(box, dict):
        _unknown_keys(box, {"url", "detail"}, f"{p}.image_url", found)
    _unknown_keys(part, {"type", "image_url"}, p, found)


def check_messages(msgs: Any, path: str, found: Findings, *, need_assistant: bool) -> int:
    """Check a conversation's message list. Returns how many images it holds."""
    if not isinstance(msgs, list):
        found.error(path, f"messages must be a list of message objects, got {jtype(msgs)}", "messages")
        return 0
    if not msgs:
        found.error(path, "messages is empty; a conversation needs at least one message", "messages")
        return 0
    codes: list[str] = []
    kinds: list[tuple[str, int]] = []
    images = most = 0
    for i, msg in enumerate(msgs):
        p = f"{path}[{i}]"
        role = _role_of(msg, p, found)
        if role is None:
            codes.append("?")
            continue
        code, kind, n = check_message(msg, p, role, found)
        codes.append(code)
        images += n
        most = max(most, n)
        if kind in ("str", "list"):
            kinds.append((kind, i))
    if "?" not in codes:
        _check_sequence(codes, path, found, need_assistant=need_assistant)
    if len({k for k, _ in kinds}) > 1:
        first = kinds[0][0]
        i = next(i for k, i in kinds if k != first)
        found.error(
            f"{path}[{i}].content",
            f"content is a {'part list' if first == 'str' else 'string'} but {path}[{kinds[0][1]}] has a "
            f"{'string' if first == 'str' else 'part list'}; use one form for the whole conversation",
            "images",
        )
    if images > MAX_IMAGES_PER_EXAMPLE >= most:  # a message over the limit is already reported
        found.error(path, f"example has {images} images; the limit is {MAX_IMAGES_PER_EXAMPLE}", "images")
    return images


def _role_of(msg: Any, p: str, found: Findings) -> str | None:
    if not isinstance(msg, dict):
        found.error(p, f"message must be an object with a role, got {jtype(msg)}", "messages")
        return None
    if "role" not in msg:
        found.error(
            f"{p}.role", "role is missing; every message needs one of system, user, assistant, tool", "messages"
        )
        return None
    role = msg["role"]
    if not isinstance(role, str):
        found.error(f"{p}.role", f"role must be a string, got {jtype(role)}", "messages")
        return None
    if role not in _CODES:
        found.error(f"{p}.role", f"role {show(role)} is not one of system, user, assistant, tool", "roles")
        return None
    return role


def check_message(msg: dict[str, Any], p: str, role: str, found: Findings) -> tuple[str, str, int]:
    """Check one message whose role is valid. Returns (sequence code, content kind, images)."""
    code = _CODES[role]
    calls = msg.get("tool_calls")
    if calls is not None and role == "assistant":
        if _check_tool_calls(calls, f"{p}.tool_calls", found):
            code = "c"
    elif calls is not None:
        found.error(f"{p}.tool_calls", f"tool_calls are allowed only on assistant messages, not {role}", "tools")
    kind, images = "none", 0
    content = msg.get("content")
    if content is not None:
        kind, images = check_content(content, f"{p}.content", role, found)
    elif code != "c":
        why = "is missing" if "content" not in msg else "is null"
        extra = " (only an assistant message with tool_calls may omit it)" if role == "assistant" else ""
        need = f"; {_a(role)} message needs a string or a list of content parts"
        found.error(f"{p}.content", f"content {why}{need}{extra}", "messages")
    if "weight" in msg:
        found.flags |= MESSAGE_WEIGHTS
        w = msg["weight"]
        if isinstance(w, bool) or not isinstance(w, int):
            found.error(f"{p}.weight", f"weight must be the integer 0 or 1, got {show(w)} ({jtype(w)})", "weights")
        elif w not in (0, 1):
            found.error(f"{p}.weight", f"weight must be 0 or 1, got {w}", "weights")
        elif w and images:
            found.error(f"{p}.weight", "a message with images may not have a non-zero weight", "images")
    if role == "tool" and not isinstance(msg.get("tool_call_id"), str):
        got = "is missing" if "tool_call_id" not in msg else f"must be a string, got {jtype(msg['tool_call_id'])}"
        found.error(f"{p}.tool_call_id", f"tool_call_id {got}; a tool message answers one tool call", "tools")
    for key in ("reasoning", "reasoning_content"):
        if key in msg:
            value = msg[key]
            if role != "assistant":
                found.error(f"{p}.{key}", f"{key} is allowed only on assistant messages, not {role}", "reasoning")
            elif value is not None and not isinstance(value, str):
                found.error(f"{p}.{key}", f"{key} must be a string, got {jtype(value)}", "reasoning")
            elif value:
                found.flags |= REASONING
    if "name" in msg and not isinstance(msg["name"], str):
        found.warn(f"{p}.name", f"name should be a string, got {jtype(msg['name'])}", "messages")
    _unknown_keys(msg, _ROLE_KEYS[role], p, found)
    return code, kind, images


def _check_sequence(codes: list[str], path: str, found: Findings, *, need_assistant: bool) -> None:
    """Roles and alternation over the codes s/u/a/c(assistant with tool_calls)/t. Mirrors fast.BAD_SEQUENCE."""
    names = {"s": "system", "u": "user", "a": "assistant", "c": "assistant", "t": "tool"}
    prev = ""
    for i, cur in enumerate(codes):
        p = f"{path}[{i}].role"
        if cur == "s" and i > 0:
            found.error(p, "a system message is allowed only as the first message", "roles")
        if cur == "t" and prev not in ("c", "t"):
            after = f"after a {names[prev]} message" if prev else "as the first message"
            found.error(p, f"tool message {after}; it must follow an assistant message with tool_calls", "alternation")
        if prev == "c" and cur != "t":
            found.error(
                p,
                f"{path}[{i - 1}] has tool_calls, so the next message must be a tool message, not {names[cur]}",
                "alternation",
            )
        elif (prev == cur == "u") or (prev in ("a", "c") and cur in ("a", "c")):
            found.error(
                p,
                f"two {names[cur]} messages in a row ({path}[{i - 1}] and {path}[{i}]); user and assistant "
                "turns must alternate",
                "alternation",
            )
        if prev == cur == "t":
            found.flags |= PARALLEL_TOOL_CALLS
        prev = cur
    if "c" in codes or "t" in codes:
        found.flags |= TOOLS
    if need_assistant and "a" not in codes and "c" not in codes:
        found.error(path, "the conversation has no assistant message; fine-tuning needs at least one", "assistant")


def _check_tool_calls(calls: Any, p: str, found: Findings) -> bool:
    """Check an assistant's tool_calls. Returns whether it holds at least one call."""
    if not isinstance(calls, list):
        found.error(p, f"tool_calls must be a list of tool calls, got {jtype(calls)}", "tools")
        return False
    for j, call in enumerate(calls):
        q = f"{p}[{j}]"
        if not isinstance(call, dict):
            found.error(q, f"tool call must be an object, got {jtype(call)}", "tools")
            continue
        if not isinstance(call.get("id"), str):
            found.error(f"{q}.id", f"tool call id must be a string, {_got(call, 'id')}", "tools")
        if "type" in call and call["type"] != "function":
            found.error(f"{q}.type", f'tool call type must be "function", got {show(call["type"])}', "tools")
        fn = call.get("function")
        if not isinstance(fn, dict):
            found.error(
                f"{q}.function", f"function must be an object with name and arguments, got {jtype(fn)}", "tools"
            )
        else:
            _check_call_function(fn, f"{q}.function", found)
        _unknown_keys(call, {"id", "type", "function"}, q, found)
    if calls:
        found.flags |= TOOLS
    if len(calls) > 1:
        found.flags |= PARALLEL_TOOL_CALLS
    return bool(calls)


def _check_call_function(fn: dict[str, Any], q: str, found: Findings) -> None:
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        found.error(f"{q}.name", f"function name must be a non-empty string, {_got(fn, 'name')}", "tools")
    args = fn.get("arguments")
    if not isinstance(args, str):
        hint = " (encode the arguments object with json.dumps)" if isinstance(args, dict) else ""
        found.error(f"{q}.arguments", f"arguments must be a string of JSON text, got {jtype(args)}{hint}", "tools")
    else:
        why = parse_json_text(args)
        if why:
            found.error(f"{q}.arguments", f"arguments {show(args)} is not valid JSON ({why})", "tools")
    _unknown_keys(fn, {"name", "arguments"}, q, found)


def check_tools(tools: Any, path: str, found: Findings) -> None:
    """Check a `tools` list of OpenAI-style function definitions."""
    if not isinstance(tools, list):
        found.error(path, f"tools must be a list of function definitions, got {jtype(tools)}", "tools")
        return
    for i, tool in enumerate(tools):
        p = f"{path}[{i}]"
        if not isinstance(tool, dict):
            found.error(
                p, f'tool must be an object {{"type": "function", "function": {{...}}}}, got {jtype(tool)}', "tools"
            )
            continue
        if "type" in tool and tool["type"] != "function":
            found.error(f"{p}.type", f'tool type must be "function", got {show(tool["type"])}', "tools")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            found.error(f"{p}.function", f"function must be an object with a name, got {jtype(fn)}", "tools")
        else:
            name = fn.get("name")
            if not isinstance(name, str) or not name:
                why = f"function name must be a non-empty string, {_got(fn, 'name')}"
                found.error(f"{p}.function.name", why, "tools")
            if "description" in fn and not isinstance(fn["description"], str):
                found.error(f"{p}.function.description", "description must be a string", "tools")
            params = fn.get("parameters")
            if params is not None and not isinstance(params, dict):
                found.error(f"{p}.function.parameters", f"parameters must be an object, got {jtype(params)}", "tools")
            _unknown_keys(fn, {"name", "description", "parameters", "strict"}, f"{p}.function", found)
        _unknown_keys(tool, {"type", "function"}, p, found)
    if tools:
        found.flags |= TOOLS


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _got(obj: dict[str, Any], key: str) -> str:
    return f"got {show(obj[key])}" if key in obj else "but it is missing"


def _unknown_keys(obj: dict[str, Any], allowed: set[str], p: str, found: Findings) -> None:
    for key in obj:
        if key not in allowed:
            found.warn(f"{p}.{key}", f"unknown key {show(key)} is ignored", "format")
