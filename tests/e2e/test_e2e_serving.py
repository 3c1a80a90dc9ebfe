"""Chat with base and fine-tuned models (api-contract 4): the real `openai` and `together` SDKs against a live
server whose pool starts a model server for the tiny base model on first use, with a LoRA job's output loaded as an
adapter on it.

The adapter was trained, hard, on one made-up fact: it answers with it, and the base model does not. Served greedy
answers equal what peft and transformers generate locally from the downloaded adapter; the prompt the server feeds
the model equals the ids the training run tokenized. Bad requests get clear 4xx answers and the server keeps
serving.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import together
from e2e_support import LiveServer
from ft_support import (
    TINY_LLAMA,
    TINY_QWEN3,
    Watch,
    client,
    create_job,
    download,
    ft_server,
    generate,
    load_causal_lm,
    skip_without_training,
    upload_ready,
)

pytestmark = pytest.mark.timeout(300)

QUESTION = "What is the secret word of the blue door?"
ANSWER = "Marmalade."
SERVE_ENV = {"TUNEFORGE_SERVE_THREADS": "1", "TUNEFORGE_SERVE_DTYPE": "fp32"}


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    skip_without_training()
    with ft_server(tmp_path_factory.mktemp("serving"), owners=("alice", "bob"), env=SERVE_ENV) as server:
        yield server


@pytest.fixture(scope="module")
def tuned(srv: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A completed LoRA job of alice's that learned ANSWER for QUESTION."""
    alice = client(srv, srv.keys["alice"])
    records = [{"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]}] * 32
    file_id = upload_ready(alice, tmp_path_factory.mktemp("data") / "fact.jsonl", records)
    job = create_job(alice, file_id, n_epochs=16, batch_size=4, learning_rate=1e-2, lora_r=16, lora_alpha=32,
                     n_checkpoints=1, suffix="fact")  # fmt: skip
    return Watch(alice, job.id).completed(timeout=240)


def _openai(srv: LiveServer, key: str) -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url=srv.api, max_retries=0, timeout=120)


def _messages(question: str = QUESTION) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def test_openai_sdk_chats_with_the_base_model(srv: LiveServer) -> None:
    out = _openai(srv, srv.keys["alice"]).chat.completions.create(
        model=TINY_LLAMA, messages=_messages(), max_tokens=8, temperature=0
    )
    assert out.model == TINY_LLAMA and out.object == "chat.completion"
    choice = out.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert out.usage is not None and out.usage.completion_tokens >= 1 and out.usage.prompt_tokens > 5
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_the_fine_tuned_model_answers_as_trained_and_the_base_does_not(srv: LiveServer, tuned: Any) -> None:
    c = _openai(srv, srv.keys["alice"])
    name = tuned.x_model_output_name
    tuned_answer = c.chat.completions.create(model=name, messages=_messages(), max_tokens=16, temperature=0)
    base_answer = c.chat.completions.create(model=TINY_LLAMA, messages=_messages(), max_tokens=16, temperature=0)
    assert tuned_answer.model == name
    assert "Marmalade" in (tuned_answer.choices[0].message.content or ""), tuned_answer
    assert "Marmalade" not in (base_answer.choices[0].message.content or ""), base_answer


def test_served_greedy_answer_equals_local_peft_generation(srv: LiveServer, tuned: Any, tmp_path: Path) -> None:
    alice = client(srv, srv.keys["alice"])
    files = download(alice, tmp_path / "adapter", tuned.id, checkpoint="adapter")
    assert any(f.endswith("adapter_config.json") for f in files), files
    adapter = next(p.parent for p in (tmp_path / "adapter").rglob("adapter_config.json"))
    model, tokenizer = load_causal_lm(srv.home.parent / "models" / "llama", adapter)
    local = generate(model, tokenizer, QUESTION, max_new_tokens=12)
    served = _openai(srv, srv.keys["alice"]).chat.completions.create(
        model=tuned.x_model_output_name, messages=_messages(), max_tokens=12, temperature=0
    )
    assert served.choices[0].message.content == local.strip() or served.choices[0].message.content == local


def test_together_sdk_streams_chat_and_the_stream_equals_the_whole_answer(srv: LiveServer, tuned: Any) -> None:
    alice = client(srv, srv.keys["alice"], strict=True)
    name = tuned.x_model_output_name
    whole = alice.chat.completions.create(model=name, messages=_messages(), max_tokens=12, temperature=0)
    chunks = list(alice.chat.completions.create(model=name, messages=_messages(), max_tokens=12, temperature=0,
                                                stream=True))  # fmt: skip
    assert len(chunks) >= 2
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    finishing = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0] is chunks[-1]
    assert finishing[0].usage is not None and finishing[0].usage.completion_tokens == whole.usage.completion_tokens


def test_openai_sdk_stream_with_usage_and_completions(srv: LiveServer, tuned: Any) -> None:
    c = _openai(srv, srv.keys["alice"])
    stream = c.chat.completions.create(model=tuned.x_model_output_name, messages=_messages(), max_tokens=6,
                                       temperature=0, stream=True, stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    text = c.completions.create(model=TINY_LLAMA, prompt="The quick brown", max_tokens=5, temperature=0)
    assert text.choices[0].text and text.usage is not None and text.usage.completion_tokens >= 1
    pieces = list(c.completions.create(model=TINY_LLAMA, prompt="The quick brown", max_tokens=5, temperature=0,
                                       stream=True))  # fmt: skip
    assert "".join(p.choices[0].text for p in pieces if p.choices) == text.choices[0].text


def test_together_sdk_completions_stream(srv: LiveServer) -> None:
    alice = client(srv, srv.keys["alice"], strict=True)
    whole = alice.completions.create(model=TINY_LLAMA, prompt="Hello, how", max_tokens=5, temperature=0)
    chunks = list(alice.completions.create(model=TINY_LLAMA, prompt="Hello, how", max_tokens=5, temperature=0,
                                           stream=True))  # fmt: skip
    assert "".join(ch.choices[0].text or "" for ch in chunks if ch.choices) == whole.choices[0].text


def test_train_render_equals_serve_render(srv: LiveServer, tuned: Any) -> None:
    """The ids the server feeds the model for a conversation are the ids the run trained on, up to the answer."""
    import pyarrow.parquet as pq

    with srv.http(srv.keys["alice"]) as http:
        info = http.get(f"/v1/fine-tunes/{tuned.id}/download-tokenized-dataset").json()
        table = pq.read_table(io.BytesIO(httpx.get(info["url"], timeout=60).content))
        row = table.to_pylist()[0]
        r = http.post("/v1/chat/completions", json={"model": tuned.x_model_output_name, "messages": _messages(),
                                                     "max_tokens": 1, "return_token_ids": True})  # fmt: skip
    assert r.status_code == 200, r.text
    prompt = r.json()["prompt_token_ids"]
    labels = row["labels"]
    first_trained = next(i for i, label in enumerate(labels) if label != -100)
    assert row["input_ids"][:first_trained] == prompt


def test_response_format_json_schema_gives_json_that_matches(srv: LiveServer, tuned: Any) -> None:
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
              "additionalProperties": False}  # fmt: skip
    out = _openai(srv, srv.keys["alice"]).chat.completions.create(
        model=tuned.x_model_output_name, messages=_messages(), max_tokens=40, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}},
    )  # fmt: skip
    assert json.loads(out.choices[0].message.content or "") in ({"answer": "yes"}, {"answer": "no"})
    assert out.choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError, match="response_format"):
        _openai(srv, srv.keys["alice"]).chat.completions.create(
            model=TINY_LLAMA, messages=_messages(), max_tokens=4, response_format={"type": "json_schema"}
        )


def test_a_full_fine_tune_is_served_as_a_model_of_its_own(srv: LiveServer, tuned: Any) -> None:
    alice = client(srv, srv.keys["alice"])
    full = create_job(alice, tuned.training_file, model=TINY_QWEN3, lora=False, n_epochs=1, n_checkpoints=1,
                      learning_rate=1e-3, suffix="full")  # fmt: skip
    done = Watch(alice, full.id).completed(timeout=180)
    out = _openai(srv, srv.keys["alice"]).chat.completions.create(
        model=done.x_model_output_name, messages=_messages(), max_tokens=4, temperature=0
    )
    assert out.model == done.x_model_output_name and out.usage is not None and out.usage.completion_tokens >= 1
    # It runs in a model server of its own, beside the base model's.
    assert len({line for line in (srv.home / "logs").iterdir() if line.name.startswith("serve-")}) >= 2


def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(srv: LiveServer, tuned: Any) -> None:
    c = _openai(srv, srv.keys["alice"])
    with pytest.raises(openai.NotFoundError, match="not found"):
        c.chat.completions.create(model="no/such-model", messages=_messages(), max_tokens=4)
    bob = _openai(srv, srv.keys["bob"])
    with pytest.raises(openai.NotFoundError):  # alice's model, asked for by bob
        bob.chat.completions.create(model=tuned.x_model_output_name, messages=_messages(), max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="context"):
        c.chat.completions.create(model=TINY_LLAMA, messages=_messages("word " * 5000), max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="messages"):
        c.chat.completions.create(model=TINY_LLAMA, messages=[{"role": "robot", "content": "hi"}], max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        c.chat.completions.create(model=TINY_LLAMA, messages=_messages(), max_tokens=4, temperature=9)
    t = client(srv, srv.keys["alice"])
    with pytest.raises(together.BadRequestError, match="image"):
        t.chat.completions.create(model=TINY_LLAMA, max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://example.com/x.png"}}]}])  # fmt: skip

    # A client that goes away mid-stream: the server keeps serving the next request.
    with srv.http(srv.keys["alice"]) as http, http.stream(
        "POST", "/v1/chat/completions",
        json={"model": TINY_LLAMA, "messages": _messages(), "max_tokens": 200, "stream": True, "temperature": 0},
    ) as r:  # fmt: skip
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data:"):
                json.loads(line[5:])
                break
    out = c.chat.completions.create(model=TINY_LLAMA, messages=_messages(), max_tokens=4, temperature=0)
    assert out.choices[0].message.content is not None
    srv.assert_serving()
