"""What validation and tokenization both read: JSONL lines from a byte stream, one line as a JSON object, and the
dataset format a record's keys name.

Owns the 1 MiB block reading, the line decoding the together SDK accepts (with its errors), the default line
limit, and the formats with their required keys; knows no rules beyond those, no tokenizer and no report.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import msgspec

BLOCK_BYTES = 1 << 20  # 1 MiB reads: big enough to amortise the Python loop, small enough to stay in cache
MAX_LINE_BYTES = 150 * 2**20  # the default limit on one JSONL line

# What decoding untrusted JSON raises: msgspec.DecodeError or UnicodeDecodeError (a bad byte in a string),
# both ValueError, and RecursionError for nesting deeper than the interpreter allows.
DECODE_ERRORS = (ValueError, RecursionError)

# Each dataset format and the keys that identify it: a record is in a format when it has all of that format's keys.
FORMATS: dict[str, tuple[str, ...]] = {
    "general": ("text",),
    "conversation": ("messages",),
    "instruction": ("prompt", "completion"),
    "preference_openai": ("input", "preferred_output", "non_preferred_output"),
}
# What each training method reads, by a file's detected format: SFT tokenizes the three text formats and reads
# pre-tokenized parquet as it is; DPO reads preference pairs.
SFT_FORMATS: tuple[str, ...] = ("general", "conversation", "instruction")
PRETOKENIZED_FORMAT = "parquet"
PREFERENCE_FORMATS: tuple[str, ...] = ("preference_openai",)

Read = Callable[[int], bytes]
Line = bytes | memoryview


class ByteCounter(Protocol):
    """Whatever counts the bytes `iter_lines` reads (a validation `Tally`)."""

    bytes: int


def iter_lines(read: Read, max_line_bytes: int, counter: ByteCounter | None = None) -> Iterator[Line | None]:
    """Yield each line without its newline; None stands for a line over `max_line_bytes`, which is skipped.

    Lines inside a block come as memoryview slices (no copy). Memory stays under `max_line_bytes` plus
    one block: an over-long line is dropped as it is read.
    """
    parts: list[bytes] = []  # the pieces of the line still open at the end of the last block
    held = 0
    skipping = False  # the open line is too long, already reported, and discarded up to its newline
    while True:
        block = read(BLOCK_BYTES)
        if not block:
            break
        if counter is not None:
            counter.bytes += len(block)
        find = block.find
        nl = find(b"\n")
        if nl < 0:
            if not skipping:
                held += len(block)
                if held > max_line_bytes:
                    parts, held, skipping = [], 0, True
                    yield None
                else:
                    parts.append(block)
            continue
        view = memoryview(block)
        if skipping:
            skipping = False
        elif parts:
            if held + nl > max_line_bytes:
                yield None
            else:
                parts.append(block[:nl])
                yield b"".join(parts)
        else:
            yield view[:nl] if nl <= max_line_bytes else None
        pos = nl + 1
        nl = find(b"\n", pos)
        while nl >= 0:
            yield view[pos:nl] if nl - pos <= max_line_bytes else None
            pos = nl + 1
            nl = find(b"\n", pos)
        tail = block[pos:]
        parts, held = ([tail], len(tail)) if tail else ([], 0)
        if held > max_line_bytes:
            parts, held, skipping = [], 0, True
            yield None
    if parts:
        yield b"".join(parts)


class LineError(Exception):
    """A line that is not a JSON object; `code` is utf8, json or line_type."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def decode_line(line: bytes | memoryview) -> dict[str, Any] | None:
    """Decode one line into a JSON object, or None for a blank line.

    Raises:
        LineError: the line is not UTF-8, not JSON, or not a JSON object.
    """
    try:
        value = msgspec.json.decode(line)
    except DECODE_ERRORS:
        value = _decode_like_the_sdk(line)
        if value is None:
            return None
    if not isinstance(value, dict):
        raise LineError("line_type", f"each line must be a JSON object, got {jtype(value)} {show(value, 30)}")
    return value


def _decode_like_the_sdk(line: bytes | memoryview) -> Any:
    # The SDK decodes text and uses Python's json on the str.strip()-ed line; doing the same here keeps us
    # from rejecting what it accepts (NaN, lone surrogate escapes, Unicode-whitespace-only lines).
    try:
        text = str(line, "utf-8")
    except UnicodeDecodeError as exc:
        raise LineError(
            "utf8", f"not valid UTF-8: byte 0x{line[exc.start]:02x} at byte {exc.start + 1} of the line"
        ) from None
    text = text.strip()
    if not text:
        return None
    try:
        return json.loads(text)
    except RecursionError:
        raise LineError("json", "not valid JSON here: nested too deeply (more than about 1,000 levels)") from None
    except ValueError as exc:
        hint = "; the file starts with a UTF-8 byte order mark, save it without one" if text[0] == "\ufeff" else ""
        msg = getattr(exc, "msg", str(exc))
        col = getattr(exc, "colno", None)
        raise LineError("json", f"not valid JSON: {msg}" + (f" (column {col})" if col else "") + hint) from None


def matching_formats(record: dict[str, Any]) -> list[str]:
    """Every format whose keys the record has, in `FORMATS` order (more than one is an error for validation)."""
    return [name for name, keys in FORMATS.items() if all(k in record for k in keys)]


def detect_format(record: Any) -> str | None:
    """The first format whose keys the record has, or None (also for a value that is not a JSON object)."""
    if not isinstance(record, dict):
        return None
    matched = matching_formats(record)
    return matched[0] if matched else None


def show(value: Any, limit: int = 40) -> str:
    """A value as JSON text, cut to `limit` characters, for quoting in messages."""
    if isinstance(value, float) and not math.isfinite(value):
        return {"nan": "NaN", "inf": "Infinity"}.get(str(value), "-Infinity")  # as the line spelled it
    try:
        text = msgspec.json.encode(value).decode()
    except (TypeError, ValueError, OverflowError, RecursionError):  # NaN, huge or deeply nested values
        text = f"<{jtype(value)}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def jtype(value: Any) -> str:
    """The JSON name of a decoded value's type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__
