"""Dataset files for the data tests, written from Python literals: good files of every format, bad files
with the first error they must give, and helpers that make real tiny images with Pillow."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
from pathlib import Path
from typing import Any

from PIL import Image

# The rule names of contract section 2.5 (its bullets), used to annotate what only tuneforge rejects.
CONTRACT_2_5_RULES = {
    "Sample count",
    "Format detection",
    "general / instruction",
    "messages list",
    "Roles",
    "Alternation",
    "Assistant presence",
    "Weights",
    "Content shape",
    "Images",
    "Preference",
    "Tools",
    "Reasoning",
    "Parquet",
    "Purpose eval",
}


def image_url(kind: str = "png", size: tuple[int, int] = (8, 8), declared: str | None = None) -> str:
    """A data URL holding a real image made by Pillow."""
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 90)).save(buf, format=kind.upper())
    return f"data:image/{declared or kind};base64," + base64.b64encode(buf.getvalue()).decode()


def img(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def txt(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def u(content: Any, **extra: Any) -> dict[str, Any]:
    return {"role": "user", "content": content, **extra}


def a(content: Any = "ok", **extra: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": content, **extra}


def s(content: str = "be brief") -> dict[str, Any]:
    return {"role": "system", "content": content}


def call(i: int = 0, args: Any = '{"city": "Oslo"}', **extra: Any) -> dict[str, Any]:
    c: dict[str, Any] = {"id": f"call_{i}", "type": "function", "function": {"name": "weather", "arguments": args}}
    c.update(extra)
    return c


def tool(i: int = 0, content: str = '{"temp": 3}') -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": f"call_{i}", "content": content}


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
CONV = {"messages": [u("hi"), a("hello")]}
PNG = image_url("png")
JPEG = image_url("jpeg")
WEBP = image_url("webp")


def jl(*records: Any) -> bytes:
    """JSONL bytes; a record that is bytes or str is written as it is."""
    out = []
    for r in records:
        if isinstance(r, bytes):
            out.append(r)
        elif isinstance(r, str):
            out.append(r.encode())
        else:
            out.append(json.dumps(r, ensure_ascii=False).encode())
    return b"\n".join(out) + b"\n"


def parquet_bytes(columns: dict[str, Any]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf)
    return buf.getvalue()


@dataclasses.dataclass
class Case:
    """A file and what validating it must give."""

    name: str
    data: bytes | Any  # bytes, or a callable returning bytes (built lazily: images, parquet)
    suffix: str = ".jsonl"
    purpose: str = "fine-tune"
    # bad files: the first error
    line: int | None = None
    field: str | None = None
    reason: str = ""
    rule: str | None = None  # the 2.5 rule when the SDK's structural check passes the file
    # good files: the verdict
    fmt: str | None = None
    flags: set[str] = dataclasses.field(default_factory=set)

    def write(self, folder: Path) -> Path:
        path = folder / f"{self.name}{self.suffix}"
        path.write_bytes(self.data() if callable(self.data) else self.data)
        return path


def _many_images(n: int) -> list[dict[str, Any]]:
    return [txt("look")] + [img(PNG)] * n


GOOD = [
    Case("general", jl({"text": "a"}, {"text": "b ü 日本"}), fmt="general"),
    Case("instruction", jl({"prompt": "2+2?", "completion": "4"}), fmt="instruction"),
    Case(
        "conversation_weights",
        jl({"messages": [s(), u("hi"), a("yo", weight=0), u("again"), a("sure", weight=1)]}, CONV),
        fmt="conversation",
        flags={"has_message_weights"},
    ),
    Case(
        "blank_lines_crlf",
        b'\r\n{"text": "a"}\r\n   \r\n\n{"text": "b"}',
        fmt="general",
    ),
    Case(
        "tools_parallel",
        lambda: jl(
            {
                "messages": [
                    s(),
                    u("weather in Oslo and Rome?"),
                    {"role": "assistant", "content": None, "tool_calls": [call(0), call(1)]},
                    tool(0),
                    tool(1),
                    a("3 and 20 degrees"),
                ],
                "tools": TOOLS,
            },
            {"messages": [u("and Paris?"), {"role": "assistant", "tool_calls": [call(2)]}]},
            CONV,
        ),
        fmt="conversation",
        flags={"has_tools", "has_parallel_tool_calls"},
    ),
    Case(
        "tools_single",
        jl({"messages": [u("w?"), a("", tool_calls=[call(0)]), tool(0), a("3 degrees")], "tools": TOOLS}),
        fmt="conversation",
        flags={"has_tools"},
    ),
    Case(
        "reasoning",
        jl(
            {"messages": [u("2+2?"), a("4", reasoning="2 and 2 make 4")]},
            {"messages": [u("3+3?"), a("6", reasoning_content="3 and 3")]},
        ),
        fmt="conversation",
        flags={"has_reasoning"},
    ),
    Case(
        "preference",
        jl(
            {
                "input": {"messages": [s(), u("hi")], "tools": TOOLS},
                "preferred_output": [a("hello!", reasoning="be kind")],
                "non_preferred_output": [a("go away")],
            }
        ),
        fmt="preference_openai",
        flags={"has_tools", "has_reasoning"},
    ),
    Case(
        "vlm_conversation",
        lambda: jl(
            {"messages": [u([txt("what is this?"), img(PNG), img(JPEG)]), a([txt("two squares")])]},
            {
                "messages": [
                    {"role": "system", "content": [txt("look")]},
                    u([img(WEBP)], weight=0),
                    a([txt("a square")]),
                ]
            },
        ),
        fmt="conversation",
        flags={"is_multimodal", "has_message_weights"},
    ),
    Case(
        "vlm_instruction",
        lambda: jl({"prompt": [txt("describe"), img(PNG)], "completion": "a red square"}),
        fmt="instruction",
        flags={"is_multimodal"},
    ),
    Case(
        "text_parts_only",
        jl({"messages": [u([txt("hi")]), a([txt("hello")])]}),
        fmt="conversation",
        flags={"is_multimodal"},
    ),
    Case(
        "parquet",
        lambda: parquet_bytes(
            {
                "input_ids": [[1, 2, 3], [4, 5]],
                "attention_mask": [[1, 1, 0], [1, 1]],
                "labels": [[-100, 2, -100], [4, 5]],
                "position_ids": [[0, 1, 2], [0, 1]],
            }
        ),
        suffix=".parquet",
        fmt="parquet",
    ),
    Case("eval_csv", b'question,answer\nwhat,that\n\n"a, b",c\n', suffix=".csv", purpose="eval"),
    Case("eval_jsonl_any_keys", jl({"q": 1, "a": [1, 2]}, {"anything": None}), purpose="eval"),
    Case("eval_jsonl_nan", b'{"score": NaN}\n', purpose="eval"),
    Case("batch_api", jl({"custom_id": "1", "body": {"model": "m", "messages": [u("hi")]}}), purpose="batch-api"),
    Case("unicode_blank_line", '{"text": "a"}\n\u00a0\n{"text": "b"}\n'.encode(), fmt="general"),
    Case("unknown_message_key_warns", jl({"messages": [u("hi", meta=1), a("yo")]}), fmt="conversation"),
]


def _pref(**over: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "input": {"messages": [u("hi")]},
        "preferred_output": [a("hello")],
        "non_preferred_output": [a("no")],
    }
    rec.update(over)
    return rec


_BIG_URL = "data:image/png;base64," + "A" * 13_981_100
F, R, W, C = "Format detection", "Roles", "Weights", "Content shape"
AL, IM, T, P = "Alternation", "Images", "Tools", "Preference"

BAD = [
    # structure (the SDK's checker rejects these too: rule None)
    Case("not_utf8", jl(CONV, b'{"text": "caf\xe9"}'), line=2, reason="not valid UTF-8: byte 0xe9"),
    Case(
        "not_utf8_in_content",
        jl(CONV, CONV, b'{"messages": [{"role": "user", "content": "\xc3("}, {"role": "assistant", "content": "x"}]}'),
        line=3,
        reason="not valid UTF-8: byte 0xc3",
    ),
    Case(
        "not_utf8_in_tools",
        jl(
            {**CONV, "tools": TOOLS},
            b'{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], '
            b'"tools": [{"type": "function", "function": {"name": "f", "description": "\xff"}}]}',
        ),
        line=2,
        reason="not valid UTF-8: byte 0xff",
    ),
    Case("not_json", jl(CONV, CONV, '{"text": "a",}'), line=3, reason="not valid JSON"),
    Case("top_level_array", jl(CONV, "[1, 2]"), line=2, reason="must be a JSON object, got array"),
    Case("top_level_string", jl('"hello"'), line=1, reason="must be a JSON object, got string"),
    Case("bom", "\ufeff".encode() + jl(CONV), line=1, reason="byte order mark"),
    Case("empty_file", b"", reason="the file is empty"),
    Case("only_blank_lines", b"\n  \n\n", reason="no samples"),
    Case("bad_suffix", jl(CONV), suffix=".txt", reason="unknown file extension '.txt'"),
    Case("csv_for_fine_tune", b"a,b\n1,2\n", suffix=".csv", reason="only for purpose eval"),
    Case(
        "csv_columns",
        b"q,a\n1,2\n1,2,3\n",
        suffix=".csv",
        purpose="eval",
        line=3,
        reason="3 columns but the header has 2",
    ),
    Case("csv_no_rows", b"q,a\n", suffix=".csv", purpose="eval", reason="header but no rows"),
    Case("parquet_not_parquet", b"PAR1 this is not parquet", suffix=".parquet", reason="not a readable parquet"),
    Case(
        "parquet_for_eval",
        lambda: parquet_bytes({"input_ids": [[1]]}),
        suffix=".parquet",
        purpose="eval",
        reason="not accepted for purpose eval",
    ),
    Case(
        "parquet_no_input_ids",
        lambda: parquet_bytes({"labels": [[1]]}),
        suffix=".parquet",
        field="input_ids",
        reason="input_ids column is missing",
    ),
    Case(
        "parquet_extra_column",
        lambda: parquet_bytes({"input_ids": [[1]], "text": ["a"]}),
        suffix=".parquet",
        field="text",
        reason="unexpected column 'text'",
    ),
    Case(
        "parquet_no_rows",
        lambda: parquet_bytes({"input_ids": pa_empty()}),
        suffix=".parquet",
        reason="the file has no rows",
    ),
    # format detection
    Case("no_format", jl(CONV, {"foo": 1}), line=2, reason="could not detect the dataset format", rule=F),
    Case("partial_instruction", jl({"prompt": "x"}), line=1, reason="add completion", rule=F),
    Case("multiple_formats", jl({"text": "a", **CONV}), line=1, reason="match several formats", rule=F),
    Case("format_differs", jl({"text": "a"}, CONV), line=2, reason="first line is general", rule=F),
    Case("unknown_key", jl({"text": "a", "meta": 1}), line=1, field="meta", reason='unknown key "meta"', rule=F),
    Case(
        "tools_on_general",
        jl({"text": "a", "tools": TOOLS}),
        line=1,
        field="tools",
        reason='unknown key "tools" for the general format',
        rule=F,
    ),
    # general / instruction
    Case(
        "text_not_string",
        jl({"text": 5}),
        line=1,
        field="text",
        reason="text must be a string, got integer",
        rule="general / instruction",
    ),
    Case("text_nan", b'{"text": NaN}\n', line=1, field="text", reason="got number", rule="general / instruction"),
    Case(
        "completion_not_string",
        jl({"prompt": "a", "completion": 5}),
        line=1,
        field="completion",
        reason="must be a string",
        rule="general / instruction",
    ),
    # messages list, roles, alternation, assistant presence
    Case(
        "messages_not_list",
        jl({"messages": "hi"}),
        line=1,
        field="messages",
        reason="must be a list",
        rule="messages list",
    ),
    Case(
        "messages_empty",
        jl(CONV, {"messages": []}),
        line=2,
        field="messages",
        reason="messages is empty",
        rule="messages list",
    ),
    Case(
        "message_not_object",
        jl({"messages": ["hi", a()]}),
        line=1,
        field="messages[0]",
        reason="must be an object",
        rule="messages list",
    ),
    Case(
        "role_missing",
        jl({"messages": [u("hi"), {"content": "x"}]}),
        line=1,
        field="messages[1].role",
        reason="role is missing",
        rule="messages list",
    ),
    Case(
        "role_not_string",
        jl({"messages": [u("hi"), {"role": 5, "content": "x"}]}),
        line=1,
        field="messages[1].role",
        reason="role must be a string, got integer",
        rule="messages list",
    ),
    Case(
        "role_invalid",
        jl(CONV, CONV, {"messages": [u("hi"), {"role": "bot", "content": "x"}]}),
        line=3,
        field="messages[1].role",
        reason='role "bot" is not one of system, user, assistant, tool',
        rule=R,
    ),
    Case(
        "system_not_first",
        jl({"messages": [u("hi"), s(), a()]}),
        line=1,
        field="messages[1].role",
        reason="only as the first message",
        rule=R,
    ),
    Case(
        "two_users",
        jl({"messages": [u("hi"), u("there"), a()]}),
        line=1,
        field="messages[1].role",
        reason="two user messages in a row",
        rule=AL,
    ),
    Case(
        "two_assistants",
        jl({"messages": [u("hi"), a(), a()]}),
        line=1,
        field="messages[2].role",
        reason="two assistant messages in a row",
        rule=AL,
    ),
    Case(
        "no_assistant",
        jl({"messages": [s(), u("hi")]}),
        line=1,
        field="messages",
        reason="no assistant message",
        rule="Assistant presence",
    ),
    Case(
        "content_missing",
        jl({"messages": [{"role": "user"}, a()]}),
        line=1,
        field="messages[0].content",
        reason="content is missing",
        rule="messages list",
    ),
    Case(
        "assistant_content_null",
        jl({"messages": [u("hi"), a(None)]}),
        line=1,
        field="messages[1].content",
        reason="only an assistant message with tool_calls may omit it",
        rule="messages list",
    ),
    # weights
    Case(
        "weight_bool",
        jl({"messages": [u("hi"), a(weight=True)]}),
        line=1,
        field="messages[1].weight",
        reason="got true (boolean)",
        rule=W,
    ),
    Case(
        "weight_two",
        jl({"messages": [u("hi"), a(weight=2)]}),
        line=1,
        field="messages[1].weight",
        reason="must be 0 or 1, got 2",
        rule=W,
    ),
    Case(
        "weight_float",
        jl({"messages": [u("hi"), a(weight=1.0)]}),
        line=1,
        field="messages[1].weight",
        reason="got 1.0 (number)",
        rule=W,
    ),
    # content shapes
    Case(
        "content_not_string",
        jl({"messages": [u(5), a()]}),
        line=1,
        field="messages[0].content",
        reason="must be a string or a list of content parts, got integer",
        rule=C,
    ),
    Case(
        "content_empty_list",
        jl({"messages": [u([]), a([txt("x")])]}),
        line=1,
        field="messages[0].content",
        reason="content list is empty",
        rule=C,
    ),
    Case(
        "part_type_unknown",
        jl({"messages": [u([{"type": "audio"}]), a([txt("x")])]}),
        line=1,
        field="messages[0].content[0].type",
        reason='part type "audio" is not one of text, image_url',
        rule=C,
    ),
    Case(
        "text_part_not_string",
        jl({"messages": [u([txt(5)]), a([txt("x")])]}),
        line=1,
        field="messages[0].content[0].text",
        reason="needs a string text",
        rule=C,
    ),
    # images
    Case(
        "image_remote_url",
        jl({"messages": [u([txt("x"), img("https://x.org/a.png")]), a([txt("x")])]}),
        line=1,
        field="messages[0].content[1].image_url.url",
        reason="no remote URLs",
        rule=IM,
    ),
    Case(
        "image_gif",
        jl({"messages": [u([img("data:image/gif;base64,R0lGOD")]), a([txt("x")])]}),
        line=1,
        field="messages[0].content[0].image_url.url",
        reason="data:image/jpeg;base64,",
        rule=IM,
    ),
    Case(
        "image_bad_base64",
        jl({"messages": [u([img("data:image/png;base64,!!!!")]), a([txt("x")])]}),
        line=1,
        field="messages[0].content[0].image_url.url",
        reason="not valid base64",
        rule=IM,
    ),
    Case(
        "image_not_an_image",
        jl(
            {
                "messages": [
                    u([img("data:image/png;base64," + base64.b64encode(b"hello world!").decode())]),
                    a([txt("x")]),
                ]
            }
        ),
        line=1,
        field="messages[0].content[0].image_url.url",
        reason="not a readable image",
        rule=IM,
    ),
    Case(
        "image_wrong_kind",
        lambda: jl({"messages": [u([img(image_url("jpeg", declared="png"))]), a([txt("x")])]}),
        line=1,
        field="messages[0].content[0].image_url.url",
        reason="declared as png is really jpeg",
        rule=IM,
    ),
    Case(
        "image_too_large",
        lambda: jl({"messages": [u([img(_BIG_URL)]), a([txt("x")])]}),
        line=1,
        field="messages[0].content[0].image_url.url",
        reason="the limit is 13,981,036",
        rule=IM,
    ),
    Case(
        "image_in_assistant",
        lambda: jl({"messages": [u([txt("x")]), a([img(PNG)])]}),
        line=1,
        field="messages[1].content[0]",
        reason="allowed only in user messages, not in an assistant",
        rule=IM,
    ),
    Case(
        "image_in_system",
        lambda: jl({"messages": [{"role": "system", "content": [img(PNG)]}, u([txt("x")]), a([txt("y")])]}),
        line=1,
        field="messages[0].content[0]",
        reason="allowed only in user messages, not in a system",
        rule=IM,
    ),
    Case(
        "images_per_message",
        lambda: jl({"messages": [u(_many_images(11)), a([txt("x")])]}),
        line=1,
        field="messages[0].content",
        reason="message has 11 images; the limit is 10",
        rule=IM,
    ),
    Case(
        "images_per_example",
        lambda: jl({"messages": [u(_many_images(6)), a([txt("x")]), u(_many_images(5)), a([txt("y")])]}),
        line=1,
        field="messages",
        reason="example has 11 images",
        rule=IM,
    ),
    Case(
        "image_with_weight",
        lambda: jl({"messages": [u([img(PNG)], weight=1), a([txt("x")])]}),
        line=1,
        field="messages[0].weight",
        reason="may not have a non-zero weight",
        rule=IM,
    ),
    Case(
        "mixed_content",
        jl({"messages": [u("hi"), a([txt("x")])]}),
        line=1,
        field="messages[1].content",
        reason="use one form for the whole conversation",
        rule=IM,
    ),
    # tools
    Case(
        "tools_not_list",
        jl({**CONV, "tools": {"type": "function"}}),
        line=1,
        field="tools",
        reason="tools must be a list",
        rule=T,
    ),
    Case(
        "tool_def_no_name",
        jl({**CONV, "tools": [{"type": "function", "function": {}}]}),
        line=1,
        field="tools[0].function.name",
        reason="non-empty string",
        rule=T,
    ),
    Case(
        "tool_def_bad_type",
        jl({**CONV, "tools": [{"type": "retrieval", "function": {"name": "f"}}]}),
        line=1,
        field="tools[0].type",
        reason='must be "function"',
        rule=T,
    ),
    Case(
        "tool_args_not_json",
        jl({"messages": [u("w?"), a(None, tool_calls=[call(0, "{city: Oslo}")]), tool(0), a()]}),
        line=1,
        field="messages[1].tool_calls[0].function.arguments",
        reason="is not valid JSON",
        rule=T,
    ),
    Case(
        "tool_args_object",
        jl({"messages": [u("w?"), a(None, tool_calls=[call(0, {"city": "Oslo"})]), tool(0), a()]}),
        line=1,
        field="messages[1].tool_calls[0].function.arguments",
        reason="json.dumps",
        rule=T,
    ),
    Case(
        "tool_call_no_id",
        jl(
            {
                "messages": [
                    u("w?"),
                    a(None, tool_calls=[{"type": "function", "function": {"name": "f", "arguments": "{}"}}]),
                    tool(0),
                    a(),
                ]
            }
        ),
        line=1,
        field="messages[1].tool_calls[0].id",
        reason="id must be a string",
        rule=T,
    ),
    Case(
        "tool_calls_on_user",
        jl({"messages": [u("w?", tool_calls=[call(0)]), a()]}),
        line=1,
        field="messages[0].tool_calls",
        reason="tool_calls are allowed only on assistant",
        rule=T,
    ),
    Case(
        "tool_message_no_id",
        jl({"messages": [u("w?"), a(None, tool_calls=[call(0)]), {"role": "tool", "content": "3"}, a()]}),
        line=1,
        field="messages[2].tool_call_id",
        reason="tool_call_id is missing",
        rule=T,
    ),
    Case(
        "tool_without_call",
        jl({"messages": [u("w?"), tool(0), a()]}),
        line=1,
        field="messages[1].role",
        reason="tool message after a user message",
        rule=AL,
    ),
    Case(
        "tool_calls_then_user",
        jl({"messages": [u("w?"), a(None, tool_calls=[call(0)]), u("hm"), a()]}),
        line=1,
        field="messages[2].role",
        reason="the next message must be a tool message, not user",
        rule=AL,
    ),
    # reasoning
    Case(
        "reasoning_on_user",
        jl({"messages": [u("hi", reasoning="hm"), a()]}),
        line=1,
        field="messages[0].reasoning",
        reason="reasoning is allowed only on assistant messages",
        rule="Reasoning",
    ),
    Case(
        "reasoning_not_string",
        jl({"messages": [u("hi"), a(reasoning_content=["x"])]}),
        line=1,
        field="messages[1].reasoning_content",
        reason="must be a string, got array",
        rule="Reasoning",
    ),
    # preference
    Case(
        "pref_input_not_object", jl(_pref(input="hi")), line=1, field="input", reason="input must be an object", rule=P
    ),
    Case(
        "pref_input_no_messages",
        jl(_pref(input={"tools": TOOLS})),
        line=1,
        field="input.messages",
        reason="input.messages is missing",
        rule=P,
    ),
    Case(
        "pref_input_unknown_key",
        jl(_pref(input={"messages": [u("hi")], "foo": 1})),
        line=1,
        field="input.foo",
        reason='unknown key "foo" in input',
        rule=F,
    ),
    Case(
        "pref_last_assistant",
        jl(_pref(input={"messages": [u("hi"), a()]})),
        line=1,
        field="input.messages[1].role",
        reason="must not be from the assistant",
        rule=P,
    ),
    Case(
        "pref_two_outputs",
        jl(_pref(preferred_output=[a(), a()])),
        line=1,
        field="preferred_output",
        reason="exactly one assistant message, got 2",
        rule=P,
    ),
    Case(
        "pref_output_user",
        jl(_pref(non_preferred_output=[u("x")])),
        line=1,
        field="non_preferred_output[0].role",
        reason='role "assistant", got "user"',
        rule=P,
    ),
    Case(
        "pref_output_no_content",
        jl(_pref(preferred_output=[{"role": "assistant"}])),
        line=1,
        field="preferred_output[0].content",
        reason="needs a content",
        rule=P,
    ),
    Case(
        "pref_output_image",
        lambda: jl(_pref(preferred_output=[a([img(PNG)])])),
        line=1,
        field="preferred_output[0].content[0]",
        reason="allowed only in user messages",
        rule=IM,
    ),
    # parquet rules beyond the SDK's
    Case(
        "parquet_ids_not_int",
        lambda: parquet_bytes({"input_ids": [["a"]]}),
        suffix=".parquet",
        field="input_ids",
        reason="must hold lists of integers",
        rule="Parquet",
    ),
    Case(
        "parquet_length_mismatch",
        lambda: parquet_bytes({"input_ids": [[1, 2], [1, 2]], "labels": [[1, 2], [1]]}),
        suffix=".parquet",
        line=2,
        field="labels",
        reason="different length than input_ids",
        rule="Parquet",
    ),
    Case(
        "parquet_mask_values",
        lambda: parquet_bytes({"input_ids": [[1, 2]], "attention_mask": [[1, 2]]}),
        suffix=".parquet",
        line=1,
        field="attention_mask",
        reason="other than 0 and 1",
        rule="Parquet",
    ),
]


def pa_empty() -> Any:
    import pyarrow as pa

    return pa.array([], type=pa.list_(pa.int64()))
