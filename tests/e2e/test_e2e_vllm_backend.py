"""`TUNEFORGE_SERVE_BACKEND=vllm` end to end, with the vLLM stand-in (`tests/vllm_standin.py`) in vLLM's place: a live
server whose pool starts "vLLM" exactly as it would start the real one (`TUNEFORGE_VLLM_COMMAND`), chatted with
through the real `openai` and `together` SDKs, for the base model and a completed LoRA job's output.

The stand-in parses vLLM's flags (refusing any vLLM would refuse), records its argv and environment, answers with
text naming the model it was asked for, and speaks vLLM's wire shapes (the role only in a stream's first delta,
usage only when asked for, a 400 for loading a loaded adapter again), so tuneforge's re-shaping for both SDKs is
what the clients see. An adapter holding lm_head weights is refused by tuneforge with a 400, before vLLM sees it.
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from e2e_support import LiveServer
from ft_support import (
    TINY_LLAMA,
    Watch,
    client,
    create_job,
    ft_server,
    intermediate_steps,
    qa_records,
    skip_without_training,
    upload_ready,
)

pytestmark = pytest.mark.timeout(240)

STANDIN = Path(__file__).resolve().parents[1] / "vllm_standin.py"
SECRETS = {
    "TOGETHER_API_KEY": "together-secret-0123456789",
    "WANDB_API_KEY": "wandb-secret-0123456789",
    "VLLM_API_KEY": "vllm-secret-0123456789",
    "HF_TOKEN": "hf-secret-0123456789",
}
QUESTION = "What is the secret word of the blue door?"


@pytest.fixture(scope="module")
def record(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("standin") / "record.json"


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, record: Path) -> Iterator[LiveServer]:
    skip_without_training()
    env = {
        "TUNEFORGE_SERVE_BACKEND": "vllm",
        "TUNEFORGE_VLLM_COMMAND": f"{sys.executable} {STANDIN}",
        "TUNEFORGE_VLLM_MAX_CPU_LORAS": "12",
        "TUNEFORGE_VLLM_EXTRA_ARGS": "--gpu-memory-utilization 0.5",
        "TUNEFORGE_SERVE_START_TIMEOUT_S": "60",
        "VLLM_STANDIN_RECORD": str(record),
        "WANDB_BASE_URL": "https://wandb.internal.example",
        **SECRETS,
    }
    with ft_server(tmp_path_factory.mktemp("vllm"), owners=("alice",), env=env) as server:
        yield server


@pytest.fixture(scope="module")
def tuned(srv: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A completed LoRA job of alice's with an intermediate checkpoint."""
    alice = client(srv, srv.keys["alice"])
    file_id = upload_ready(alice, tmp_path_factory.mktemp("data") / "qa.jsonl", qa_records(8, nonce="vllm"))
    job = create_job(alice, file_id, n_epochs=2, batch_size=4, n_checkpoints=2, suffix="vllm")
    return Watch(alice, job.id).completed(timeout=200)


def _openai(srv: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(api_key=srv.keys["alice"], base_url=srv.api, max_retries=0, timeout=60)


def _messages() -> list[dict[str, str]]:
    return [{"role": "user", "content": QUESTION}]


def _standin_url(record: Path) -> str:
    argv = json.loads(record.read_text())["argv"]
    return f"http://127.0.0.1:{argv[argv.index('--port') + 1]}"


def test_the_pool_starts_vllm_with_its_flags_and_a_clean_environment(srv: LiveServer, record: Path) -> None:
    out = _openai(srv).chat.completions.create(model=TINY_LLAMA, messages=_messages(), max_tokens=50)
    assert out.model == TINY_LLAMA and out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == f"[{TINY_LLAMA}] you said: {QUESTION}"
    assert out.choices[0].finish_reason == "stop" and out.usage is not None and out.usage.completion_tokens == 12

    seen = json.loads(record.read_text())
    argv = seen["argv"]
    assert argv[0] == str(STANDIN)  # sys.argv: the script in place of `vllm serve`, then what `vllm serve` gets
    assert Path(argv[1]) == srv.home.parent / "models" / "llama"  # the catalog's local folder, as `vllm serve MODEL`
    flags = argv[2:]
    assert flags == [
        "--host", "127.0.0.1", "--port", flags[3], "--served-model-name", TINY_LLAMA, "--enable-lora",
        "--max-loras", "8", "--max-lora-rank", "64", "--max-cpu-loras", "12", "--gpu-memory-utilization", "0.5",
    ]  # fmt: skip
    assert seen["env"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    leaked = [k for k in seen["env_keys"] if k.startswith(("TOGETHER_", "WANDB_", "TUNEFORGE_")) or k in SECRETS]
    assert leaked == [] and "PYTHONPATH" not in seen["env_keys"]


def test_a_fine_tuned_model_is_loaded_by_path_and_answers_under_the_callers_name(
    srv: LiveServer, tuned: Any, record: Path
) -> None:
    name = tuned.x_model_output_name
    c = _openai(srv)
    whole = c.chat.completions.create(model=name, messages=_messages(), max_tokens=5)
    assert whole.model == name and whole.choices[0].message.content == f"[{tuned.id}] you said: What is"
    assert whole.choices[0].finish_reason == "length"

    # The adapter was loaded by its local path under its job's id, once (a second load is a 400 to vLLM).
    loaded = {m["id"]: m for m in httpx.get(f"{_standin_url(record)}/v1/models", timeout=10).json()["data"]}
    root = Path(loaded[tuned.id]["root"])
    assert root.is_relative_to(srv.home / "models" / "outputs") and (root / "adapter_config.json").is_file()

    chunks = list(c.chat.completions.create(model=name, messages=_messages(), max_tokens=5, stream=True,
                                            stream_options={"include_usage": True}))  # fmt: skip
    assert all(ch.model == name and ch.object == "chat.completion.chunk" for ch in chunks)
    with_choices = [ch for ch in chunks if ch.choices]
    assert all(ch.choices[0].delta.role == "assistant" for ch in with_choices)  # vLLM sends it once; tuneforge always
    assert "".join(ch.choices[0].delta.content or "" for ch in with_choices) == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]


def test_together_sdk_streams_and_completes_through_vllm(srv: LiveServer, tuned: Any) -> None:
    t = client(srv, srv.keys["alice"], strict=True)
    name = tuned.x_model_output_name
    whole = t.chat.completions.create(model=name, messages=_messages(), max_tokens=6)
    assert whole.model == name and (whole.choices[0].message.content or "").startswith(f"[{tuned.id}]")
    chunks = list(t.chat.completions.create(model=name, messages=_messages(), max_tokens=6, stream=True))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    finishing = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0] is chunks[-1]
    assert finishing[0].usage is not None and finishing[0].usage.completion_tokens == 6  # asked of vLLM by tuneforge

    prompt = "Hello there, how are you"
    done = t.completions.create(model=name, prompt=prompt, max_tokens=4)
    assert done.choices[0].text == f"[{tuned.id}] you said: Hello"
    pieces = list(t.completions.create(model=name, prompt=prompt, max_tokens=4, stream=True))
    assert "".join(p.choices[0].text or "" for p in pieces if p.choices) == done.choices[0].text
    base = _openai(srv).completions.create(model=TINY_LLAMA, prompt=prompt, max_tokens=3)
    assert base.model == TINY_LLAMA and base.choices[0].text == f"[{TINY_LLAMA}] you said:"


def _add_tensor(path: Path, name: str) -> None:
    """Append a 1-element float32 tensor called `name` to a safetensors file."""
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8 : 8 + size]), raw[8 + size :]
    header[name] = {"dtype": "F32", "shape": [1], "data_offsets": [len(data), len(data) + 4]}
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data + b"\0\0\0\0")


def test_an_adapter_with_lm_head_weights_is_refused_with_a_400(srv: LiveServer, tuned: Any, record: Path) -> None:
    alice = client(srv, srv.keys["alice"])
    step = intermediate_steps(alice, tuned.id)[0]
    stored = srv.blobs / "jobs" / tuned.id / "checkpoints" / f"step-{step:06d}" / "adapter_model.safetensors"
    assert stored.is_file(), stored
    _add_tensor(stored, "base_model.model.lm_head.weight")

    with pytest.raises(openai.BadRequestError, match=r"lm_head weights \(base_model\.model\.lm_head\.weight\)"):
        _openai(srv).chat.completions.create(model=f"{tuned.id}:{step}", messages=_messages(), max_tokens=4)
    loaded = [m["id"] for m in httpx.get(f"{_standin_url(record)}/v1/models", timeout=10).json()["data"]]
    assert f"{tuned.id}:{step}" not in loaded  # refused before vLLM was asked
    out = _openai(srv).chat.completions.create(model=tuned.x_model_output_name, messages=_messages(), max_tokens=3)
    assert out.choices[0].message.content == f"[{tuned.id}] you said:"
    srv.assert_serving()
