"""The typed fast path against the reference rules on thousands of mutated records: it may only ever say
"valid" where the rules find nothing, and it must report the same format and flags."""

from __future__ import annotations

import copy
import io
import json
import random
from typing import Any

from data_cases import PNG, TOOLS, a, call, img, s, tool, txt, u

from tuneforge.data.validation.jsonl import scan

SEEDS = [
    {"messages": [s(), u("hi"), a("yo", weight=1), u("more"), a("ok", weight=0)]},
    {
        "messages": [u("w?"), a(None, tool_calls=[call(0), call(1)]), tool(0), tool(1), a("3", reasoning="r")],
        "tools": TOOLS,
    },
    {"messages": [u([txt("look"), img(PNG)]), a([txt("a square")], reasoning_content="hm")]},
    {"messages": [u("q"), {"role": "assistant", "tool_calls": [call(0)]}]},
    {"messages": [s(), u([txt("a"), txt("b")]), a([txt("c")], weight=1)]},
    {"messages": [u("hi"), a("yo", name="bot")], "tools": TOOLS},
    {"text": "plain text"},
    {"prompt": "p", "completion": "c"},
    {"input": {"messages": [u("hi")]}, "preferred_output": [a("a")], "non_preferred_output": [a("b")]},
]
VALUES: list[Any] = [
    None,
    0,
    1,
    2,
    True,
    False,
    1.0,
    "",
    "x",
    "user",
    "assistant",
    "tool",
    "system",
    [],
    {},
    [1],
    {"k": 1},
]


def _nodes(obj: Any, out: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.append((obj, k))
            _nodes(v, out)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.append((obj, i))
            _nodes(v, out)
    return out


def _mutate(rng: random.Random, record: dict[str, Any]) -> dict[str, Any]:
    rec = copy.deepcopy(record)
    for _ in range(rng.choice([1, 1, 2, 3])):
        nodes = _nodes(rec, [])
        if not nodes:
            break
        parent, key = rng.choice(nodes)
        op = rng.random()
        if op < 0.45:
            parent[key] = copy.deepcopy(rng.choice(VALUES))
        elif op < 0.6:
            del parent[key]
        elif op < 0.7 and isinstance(parent, list):
            parent.insert(key, copy.deepcopy(parent[key]))
        elif op < 0.8 and isinstance(parent, dict):
            extra = rng.choice(["weight", "name", "reasoning", "tool_calls", "tool_call_id", "extra", "type"])
            parent[extra] = copy.deepcopy(rng.choice(VALUES))
        elif op < 0.9 and isinstance(parent, list) and len(parent) > 1:
            rng.shuffle(parent)
        elif isinstance(parent, dict) and "arguments" in parent:
            parent["arguments"] = rng.choice(["{", "[]", "null", '{"a": NaN}', "1"])
        else:
            parent[key] = copy.deepcopy(rng.choice(VALUES))
    return rec


def _verdict(line: bytes, use_fast: bool) -> tuple[Any, ...]:
    t = scan(io.BytesIO(line).read, purpose="fine-tune", max_errors=100, max_line_bytes=1 << 24, use_fast=use_fast)
    return t.error_count, [(e.field, e.code) for e in t.errors], t.fmt, t.flags, t.samples


def test_fast_path_never_disagrees_with_the_rules():
    rng = random.Random(1234)
    agreed = valid = 0
    for i in range(4000):
        record = SEEDS[i % len(SEEDS)] if i < len(SEEDS) else _mutate(rng, rng.choice(SEEDS))
        line = json.dumps(record).encode() + b"\n"
        fast, slow = _verdict(line, True), _verdict(line, False)
        assert fast == slow, line
        agreed += 1
        valid += fast[0] == 0
    assert agreed == 4000 and 100 < valid < 3900  # the mutations hit both sides


def test_fast_path_agrees_over_a_whole_file():
    # Across lines the fast path keeps state (the dataset format, which decoder it tries first).
    rng = random.Random(99)
    records = [rng.choice(SEEDS) if rng.random() < 0.7 else _mutate(rng, rng.choice(SEEDS)) for _ in range(3000)]
    data = b"".join(json.dumps(r).encode() + b"\n" for r in records)
    tallies = [
        scan(io.BytesIO(data).read, purpose="fine-tune", max_errors=10_000, max_line_bytes=1 << 24, use_fast=fast)
        for fast in (True, False)
    ]
    assert tallies[0] == tallies[1]
    assert tallies[0].error_count > 100
