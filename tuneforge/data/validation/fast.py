"""The fast path: msgspec typed decoding of a JSONL line, validating while it parses; "valid" or "don't know".

Every doubt goes to `rules.py`, which words the error, so this must never accept what `rules.py` rejects
(tests/unit/data/validation fuzz this). Knows one line at a time; nothing of files or error messages.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from tuneforge.data.formats import DECODE_ERRORS
from tuneforge.data.validation.report import MESSAGE_WEIGHTS, MULTIMODAL, PARALLEL_TOOL_CALLS, REASONING, TOOLS

# gc=False on every struct: a decoded line is a tree (no cycles), and untracked objects are cheaper to make.
NonEmpty = Annotated[str, Meta(min_length=1)]
Weight = Literal[0, 1]


class _Text(Struct, forbid_unknown_fields=True, gc=False):
    # A plain field, not a tag: msgspec lets a lone tagged struct (no union) omit its tag.
    type: Literal["text"]
    text: str


# Image parts are left out on purpose: an image needs the Pillow check, which `rules.py` does.
Content = str | Annotated[list[_Text], Meta(min_length=1)]


class _CallFunction(Struct, forbid_unknown_fields=True, gc=False):
    name: NonEmpty
    arguments: str


class _Call(Struct, forbid_unknown_fields=True, gc=False):
    id: str
    function: _CallFunction
    type: Literal["function"] | UnsetType = UNSET


class _System(Struct, tag_field="role", tag="system", forbid_unknown_fields=True, gc=False):
    content: Content
    weight: Weight | UnsetType = UNSET
    name: str | UnsetType = UNSET
    code: ClassVar[str] = "s"


class _User(Struct, tag_field="role", tag="user", forbid_unknown_fields=True, gc=False):
    content: Content
    weight: Weight | UnsetType = UNSET
    name: str | UnsetType = UNSET
    code: ClassVar[str] = "u"


class _Assistant(Struct, tag_field="role", tag="assistant", forbid_unknown_fields=True, gc=False):
    content: Content | None = None
    weight: Weight | UnsetType = UNSET
    name: str | UnsetType = UNSET
    tool_calls: list[_Call] | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None
    code: ClassVar[str] = "a"


class _Tool(Struct, tag_field="role", tag="tool", forbid_unknown_fields=True, gc=False):
    content: Content
    tool_call_id: str
    weight: Weight | UnsetType = UNSET
    name: str | UnsetType = UNSET
    code: ClassVar[str] = "t"


class _FunctionDef(Struct, forbid_unknown_fields=True, gc=False):
    name: NonEmpty
    description: str | UnsetType = UNSET
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class _ToolDef(Struct, forbid_unknown_fields=True, gc=False):
    function: _FunctionDef
    type: Literal["function"] | UnsetType = UNSET


Message = _System | _User | _Assistant | _Tool


class _Row(Struct, forbid_unknown_fields=True, gc=False):
    # Every field of every struct is declared and unknown keys are refused, so msgspec decodes (and
    # UTF-8-checks) every string of a line it accepts (the raw tools text is decoded in full once per
    # distinct text): a fast-path line needs no separate UTF-8 pass.
    messages: Annotated[list[Message], Meta(min_length=1)] | UnsetType = UNSET
    # Kept raw (syntax-checked only) and checked once per distinct text: a dataset repeats its tool list.
    tools: msgspec.Raw | UnsetType = UNSET
    text: str | UnsetType = UNSET
    prompt: str | UnsetType = UNSET
    completion: str | UnsetType = UNSET


class _PlainSystem(Struct, tag_field="role", tag="system", forbid_unknown_fields=True, gc=False):
    content: str
    weight: Weight | UnsetType = UNSET
    name: str | UnsetType = UNSET
    code: ClassVar[str] = "s"


class _PlainUser(Struct, tag_field="role", tag="user", forbid_unknown_fields=True, gc=False):
    content: str
    weight: Weight | UnsetType = UNSET
    name: str | UnsetType = UNSET
    code: ClassVar[str] = "u"


class _PlainAssistant(Struct, tag_field="role", tag="assistant", forbid_unknown_fields=True, gc=False):
    content: str
    weight: Weight | UnsetType = UNSET
    name: str | UnsetType = UNSET
    code: ClassVar[str] = "a"


class _PlainRow(Struct, forbid_unknown_fields=True, gc=False):
    # The common case, checked with almost no per-message Python: string-content system/user/assistant
    # turns without tool calls or reasoning (a tools list is fine).
    messages: Annotated[list[_PlainSystem | _PlainUser | _PlainAssistant], Meta(min_length=1)]
    tools: msgspec.Raw | UnsetType = UNSET


_decode_row = msgspec.json.Decoder(_Row).decode
_decode_plain = msgspec.json.Decoder(_PlainRow).decode
_decode_tools = msgspec.json.Decoder(list[_ToolDef]).decode
# Parsing into Raw checks the JSON text without building objects; the text is a str, so valid Unicode.
_check_json = msgspec.json.Decoder(msgspec.Raw).decode

# Forbidden neighbours in the role codes s/u/a/c/t (c: assistant with tool_calls); the same rules as
# messages._check_sequence: system only first, tool only after c or t, c only before t, no repeated turn.
BAD_SEQUENCE = re.compile(r".s|^t|[^ct]t|c[^t]|uu|[ac][ac]")
_SEQUENCES_CACHED = 1 << 16
_TOOL_LISTS_CACHED = 256
_TOOL_LIST_BYTES_CACHED = 1 << 16
_CONVERSATION = tuple(("conversation", flags) for flags in range(64))  # no tuple built per line


class FastChecker:
    """Checks lines of one fine-tune dataset the quick way; one instance per scan (it adapts to the data)."""

    def __init__(self) -> None:
        self._sequences: dict[str, int] = {}  # role codes -> the flags they imply, or -1 when they break a rule
        self._plain_sequences: dict[tuple[type, ...], int] = {}  # the same, keyed by the plain message types
        self._tool_lists: dict[bytes, int] = {}  # a tools list's JSON text -> TOOLS, 0 (empty) or -1 (invalid)
        # Try the plain types first, until two lines in a row need the full ones (a tools dataset); one
        # plain line turns it back on. A lone odd line in a plain dataset costs one wasted decode.
        self._plain_first = True
        self._misses = 0

    def check(self, line: bytes | memoryview, expected: str | None) -> tuple[str, int] | None:
        """Check one line.

        Args:
            line: the raw line, without its newline.
            expected: the dataset's format so far, or None.

        Returns:
            (format, flags) when the line is certainly valid, else None (blank, invalid, or undecided here).
        """
        if self._plain_first and (expected is None or expected == "conversation"):
            try:
                prow = _decode_plain(line)
            except DECODE_ERRORS:
                self._misses += 1
                self._plain_first = self._misses < 2
            else:
                self._misses = 0
                plain = prow.messages
                key = tuple(map(type, plain))
                implied = self._plain_sequences.get(key)
                if implied is None:
                    implied = self._sequence_flags("".join([m.code for m in plain]))
                    if len(self._plain_sequences) < _SEQUENCES_CACHED:
                        self._plain_sequences[key] = implied
                flags = 0 if prow.tools is UNSET else self._tools_flags(prow.tools)
                if implied < 0 or flags < 0:
                    return None
                for m in plain:
                    if m.weight is not UNSET:
                        flags |= MESSAGE_WEIGHTS
                        break
                return _CONVERSATION[flags]
        try:
            row = _decode_row(line)
        except DECODE_ERRORS:
            return None
        if row.messages is UNSET:
            fmt = _flat_format(row)
            return None if fmt is None or (expected is not None and fmt != expected) else (fmt, 0)
        if expected not in (None, "conversation") or not (row.text is row.prompt is row.completion is UNSET):
            return None
        flags = 0 if row.tools is UNSET else self._tools_flags(row.tools)
        return None if flags < 0 else self._conversation(row.messages, flags)

    def _conversation(self, msgs: list[Message], flags: int) -> tuple[str, int] | None:
        has_str = has_list = False
        codes = []
        for m in msgs:
            code = m.code
            content = m.content
            if content.__class__ is str:
                has_str = True
            elif content is not None:
                has_list = True
            if isinstance(m, _Assistant):
                calls = m.tool_calls
                if calls:
                    code = "c"
                    for call in calls:
                        try:
                            _check_json(call.function.arguments)
                        except DECODE_ERRORS:
                            return None
                    flags |= TOOLS | PARALLEL_TOOL_CALLS if len(calls) > 1 else TOOLS
                elif content is None:
                    return None
                if m.reasoning or m.reasoning_content:
                    flags |= REASONING
            if m.weight is not UNSET:
                flags |= MESSAGE_WEIGHTS
            codes.append(code)
        implied = self._sequence_flags("".join(codes))
        if implied < 0 or (has_list and has_str):
            return None
        if has_list:
            flags |= MULTIMODAL
        # A line the plain types would have taken: go back to trying them first.
        if not (implied or has_list or flags & REASONING):
            self._plain_first, self._misses = True, 0
        return _CONVERSATION[flags | implied]

    def _tools_flags(self, raw: msgspec.Raw) -> int:
        text = bytes(raw)
        flags = self._tool_lists.get(text)
        if flags is None:
            try:
                flags = TOOLS if _decode_tools(text) else 0
            except DECODE_ERRORS:
                flags = -1
            if len(self._tool_lists) < _TOOL_LISTS_CACHED and len(text) <= _TOOL_LIST_BYTES_CACHED:
                self._tool_lists[text] = flags
        return flags

    def _sequence_flags(self, seq: str) -> int:
        flags = self._sequences.get(seq)
        if flags is None:
            if BAD_SEQUENCE.search(seq) or ("a" not in seq and "c" not in seq):
                flags = -1
            else:
                flags = (TOOLS if "t" in seq or "c" in seq else 0) | (PARALLEL_TOOL_CALLS if "tt" in seq else 0)
            if len(self._sequences) < _SEQUENCES_CACHED:
                self._sequences[seq] = flags
        return flags


def _flat_format(row: _Row) -> str | None:
    if row.tools is not UNSET:
        return None
    if row.text is not UNSET:
        return "general" if row.prompt is row.completion is UNSET else None
    if row.prompt is not UNSET and row.completion is not UNSET:
        return "instruction"
    return None
