"""Tool calls in answers (serve/tools.py) and through the model server's app (serve/app.py), with a scripted engine
that answers a fixed text in the tiny tokenizer's tokens: the calls become `tool_calls` (arguments as a JSON string),
the rest stays content, the choice finishes with `tool_calls`; streamed, no part of a call shows as text."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tuneforge.serve import tools
from tuneforge.serve.app import ModelServer, create_model_app
from tuneforge.serve.types import AdapterStats, EngineStats, GeneratedToken, GenerationRequest

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'


def test_parse_finds_calls_and_keeps_the_rest_as_content() -> None:
    parsed = tools.parse(f"Let me look.\n{CALL}")
    assert parsed.content.strip() == "Let me look."
    assert [c["function"] for c in parsed.calls] == [{"name": "get_weather", "arguments": '{"city": "Oslo"}'}]
    assert parsed.calls[0]["type"] == "function" and parsed.calls[0]["id"].startswith("call_")


@pytest.mark.parametrize("text", ["<tool_call>not json</tool_call>", "<tool_call>{\"name\": 1}</tool_call>",
                                  "<tool_call>{\"name\": \"x\"}"])  # fmt: skip
def test_text_that_only_looks_like_a_call_stays_text(text: str) -> None:
    assert tools.parse(text) == tools.Parsed(text, [])


def test_may_open_holds_back_a_partial_opening_tag() -> None:
    assert tools.may_open("hello <tool") == len("hello ")
    assert tools.may_open("hello") == 5 and tools.may_open(f"a{CALL}") == 1


class Scripted:
    """An engine that answers every request with the tokens of one text, then a stop token."""

    def __init__(self, ids: list[int], stop: int) -> None:
        self.ids, self.stop_id = ids, stop

    def start(self) -> None: ...

    def stop(self) -> None: ...

    async def generate(self, req: GenerationRequest) -> AsyncIterator[GeneratedToken]:
        for i in self.ids[: req.sampling.max_tokens - 1]:
            yield GeneratedToken(token_id=i, logprob=-0.1)
        yield GeneratedToken(token_id=self.stop_id, logprob=-0.1, finish_reason="stop")

    def abort(self, request_id: str) -> None: ...

    def load_adapter(self, name: str, folder: Path) -> None: ...

    def unload_adapter(self, name: str) -> None: ...

    def stats(self) -> EngineStats:
        return EngineStats(0, 0, 0, "float32", "cpu", AdapterStats((), 0, 0, 0, 0, 0, 0, 0))


@pytest.fixture(scope="module")
def app_client(tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    from tuneforge.train.tiny_models import make_tiny_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    tokenizer = make_tiny_tokenizer()
    tokenizer.save_pretrained(folder)
    ids = tokenizer(f"Let me look.\n{CALL}", add_special_tokens=False)["input_ids"]
    engine = Scripted(ids, tokenizer.convert_tokens_to_ids("<|im_end|>"))
    return TestClient(create_model_app(ModelServer(engine, base_name="tiny", model_dir=folder)))


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
BODY = {"model": "tiny", "messages": [{"role": "user", "content": "Weather in Oslo?"}], "max_tokens": 200}


def test_a_call_in_the_answer_becomes_tool_calls(app_client: TestClient) -> None:
    r = app_client.post("/v1/chat/completions", json={**BODY, "tools": TOOLS})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Let me look."
    call = choice["message"]["tool_calls"][0]
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {"city": "Oslo"}
    # Without tools in the request the same answer is plain text.
    plain = app_client.post("/v1/chat/completions", json=BODY).json()["choices"][0]
    assert plain["finish_reason"] == "stop" and "<tool_call>" in plain["message"]["content"]


def test_a_streamed_call_never_shows_as_text(app_client: TestClient) -> None:
    with app_client.stream("POST", "/v1/chat/completions", json={**BODY, "tools": TOOLS, "stream": True}) as r:
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:") and "[DONE]" not in line]
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    text = "".join(d.get("content") or "" for d in deltas)
    assert "<tool" not in text and text.strip() == "Let me look."
    calls = [c for d in deltas for c in d.get("tool_calls") or []]
    assert [c["function"]["name"] for c in calls] == ["get_weather"]
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "tool_calls"
