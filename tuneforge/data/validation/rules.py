"""The reference check of one decoded JSONL record: which format its keys name, and that format's rules.

The exact path that words every error; `fast.py` is only an accelerator that must agree with it.
Knows one record at a time; nothing of blocks, files or processes (lines are decoded by `formats.py`).
"""

from __future__ import annotations

from typing import Any

from tuneforge.data.formats import FORMATS, jtype, matching_formats, show
from tuneforge.data.validation.images import MAX_IMAGES_PER_EXAMPLE
from tuneforge.data.validation.messages import (
    Findings,
    check_content,
    check_message,
    check_messages,
    check_tools,
)

EXTRA_KEYS: dict[str, tuple[str, ...]] = {"conversation": ("tools",)}
_EXPECTED = "text | messages | prompt+completion | input+preferred_output+non_preferred_output"


def check_record(obj: dict[str, Any], *, expected: str | None, found: Findings) -> str | None:
    """Detect the format of one record and apply its rules.

    Args:
        obj: the decoded line.
        expected: the dataset's format so far (from its first line with a format), or None.
        found: where errors, warnings and flags go.

    Returns:
        The record's format, or None when it cannot be determined (then nothing more is checked).
    """
    matched = matching_formats(obj)
    if not matched:
        found.error(
            None, f"could not detect the dataset format: keys {_keys(obj)}; expected {_EXPECTED}{_near(obj)}", "format"
        )
        return None
    if len(matched) > 1:
        found.error(
            None, f"keys {_keys(obj)} match several formats ({', '.join(matched)}); keep one format's keys", "format"
        )
        return None
    fmt = matched[0]
    if expected is not None and fmt != expected:
        found.error(
            None,
            f"this line is in the {fmt} format but the dataset's first line is {expected}; "
            "all lines must share one format",
            "format",
        )
        return fmt
    allowed = FORMATS[fmt] + EXTRA_KEYS.get(fmt, ())
    for key in obj:
        if key not in allowed:
            found.error(key, f"unknown key {show(key)} for the {fmt} format (allowed: {', '.join(allowed)})", "format")
    if fmt == "general":
        if not isinstance(obj["text"], str):
            found.error("text", f"text must be a string, got {jtype(obj['text'])}", "value_type")
    elif fmt == "instruction":
        _check_instruction(obj, found)
    elif fmt == "conversation":
        check_messages(obj["messages"], "messages", found, need_assistant=True)
        if "tools" in obj:
            check_tools(obj["tools"], "tools", found)
    else:
        _check_preference(obj, found)
    return fmt


def _keys(obj: dict[str, Any]) -> str:
    return ", ".join(show(k, 30) for k in list(obj)[:8]) + (", ..." if len(obj) > 8 else "") if obj else "(none)"


def _near(obj: dict[str, Any]) -> str:
    """A hint naming the missing keys of a format the record partly matches."""
    for name, keys in FORMATS.items():
        have = [k for k in keys if k in obj]
        if have and len(have) < len(keys):
            missing = ", ".join(k for k in keys if k not in obj)
            return f" (for the {name} format add {missing})"
    return ""


def _check_instruction(obj: dict[str, Any], found: Findings) -> None:
    # Earlier clients also accepted multimodal part lists here (api-contract 2.4); images only in the prompt.
    images = 0
    for key, role in (("prompt", "user"), ("completion", "assistant")):
        value = obj[key]
        if isinstance(value, list):
            images += check_content(value, key, role, found)[1]
        elif not isinstance(value, str):
            found.error(key, f"{key} must be a string (or a list of content parts), got {jtype(value)}", "value_type")
    if images > MAX_IMAGES_PER_EXAMPLE:
        found.error("prompt", f"example has {images} images; the limit is {MAX_IMAGES_PER_EXAMPLE}", "images")


def _check_preference(obj: dict[str, Any], found: Findings) -> None:
    inp = obj["input"]
    if not isinstance(inp, dict):
        found.error("input", f"input must be an object with messages, got {jtype(inp)}", "preference")
    elif "messages" not in inp:
        found.error(
            "input.messages", "input.messages is missing; input must hold the prompt conversation", "preference"
        )
    else:
        msgs = inp["messages"]
        check_messages(msgs, "input.messages", found, need_assistant=False)
        if isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant":
            found.error(
                f"input.messages[{len(msgs) - 1}].role",
                "the last input message must not be from the assistant; the outputs hold the answer",
                "preference",
            )
    if isinstance(inp, dict):
        if "tools" in inp:
            check_tools(inp["tools"], "input.tools", found)
        for key in inp:
            if key not in ("messages", "tools"):
                found.error(f"input.{key}", f"unknown key {show(key)} in input (allowed: messages, tools)", "format")
    for key in ("preferred_output", "non_preferred_output"):
        _check_output(obj[key], key, found)


def _check_output(value: Any, key: str, found: Findings) -> None:
    if not isinstance(value, list):
        found.error(
            key, f"{key} must be a list holding exactly one assistant message, got {jtype(value)}", "preference"
        )
        return
    if len(value) != 1:
        found.error(key, f"{key} must hold exactly one assistant message, got {len(value)}", "preference")
        return
    msg, p = value[0], f"{key}[0]"
    if not isinstance(msg, dict):
        found.error(p, f"{key} must hold an assistant message object, got {jtype(msg)}", "preference")
        return
    if msg.get("role") != "assistant":
        found.error(f"{p}.role", f'{key} message must have role "assistant", got {show(msg.get("role"))}', "preference")
        return
    if msg.get("content") is None:
        found.error(f"{p}.content", f"{key} message needs a content (string or text parts)", "preference")
        return
    check_message(msg, p, "assistant", found)
