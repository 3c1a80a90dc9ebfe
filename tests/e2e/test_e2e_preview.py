"""`client.fine_tuning.preview` and `tg fine-tuning preview` (api-contract 3.10) against a live server with the tiny
models in its catalog: the rows, masked as training masks them, parsed strictly by the SDK; the CLI's table and JSON;
and the refusals (an unknown model, another owner's or an unfinished file, a bad `top_k`, DPO, a model the server has
not prepared yet), each naming its parameter.

No job is run: the preview reads the model's tokenizer files and the stored training file only.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import together
from e2e_support import LiveServer, jsonl_bytes, opened, unique
from ft_support import TINY_LLAMA, TINY_QWEN3, client, ft_server, qa_records, run_together, upload_ready
from together import Together

pytestmark = pytest.mark.timeout(240)

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"  # built in, converted by its first job: none runs here
IGNORE = -100


@pytest.fixture(scope="module")
def ft(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    # The built-in SmolLM2 stays unprepared here (no background conversion): the slow test previews it for real.
    env = {"TUNEFORGE_PREPARE_MODELS": "0"}
    with ft_server(tmp_path_factory.mktemp("preview"), owners=("alice", "bob"), env=env) as server:
        yield server


@pytest.fixture(scope="module")
def alice(ft: LiveServer) -> Together:
    return client(ft, ft.keys["alice"], strict=True)


@pytest.fixture(scope="module")
def records() -> list[dict[str, Any]]:
    return qa_records(8, nonce=unique(), system="You are a helpful assistant.")


@pytest.fixture(scope="module")
def file_id(alice: Together, records: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> str:
    return upload_ready(alice, tmp_path_factory.mktemp("data") / "facts.jsonl", records)


def _decode(folder: Path, ids: list[int]) -> str:
    from tokenizers import Tokenizer

    return str(Tokenizer.from_file(str(folder / "tokenizer.json")).decode(ids, skip_special_tokens=False))


def test_the_sdk_previews_rows_masked_as_training_masks_them(
    ft: LiveServer, alice: Together, file_id: str, records: list[dict[str, Any]]
) -> None:
    got = alice.fine_tuning.preview(model=TINY_LLAMA, training_file=file_id)
    assert got.model == TINY_LLAMA and got.dataset_format == "conversation" and got.train_on_inputs is False
    assert got.max_seq_length == alice.fine_tuning.model_limits(model_name=TINY_LLAMA).max_seq_length_sft
    assert len(got.rows) == 5
    folder = ft.home.parent / "models" / "llama"  # where ft_support saved the tiny model
    for row, record in zip(got.rows, records, strict=False):
        answer = record["messages"][-1]["content"]
        assert [_decode(folder, row.input_ids[a:b]) for a, b in row.trained_spans] == [f"{answer}<|im_end|>"]
        assert row.num_trained_tokens == sum(1 for t in row.labels if t != IGNORE) > 0
        assert row.num_tokens == len(row.tokens) == len(row.input_ids) and not row.truncated
        assert row.labels[0] == IGNORE and all(t in (IGNORE, i) for t, i in zip(row.labels, row.input_ids, strict=True))

    every = alice.fine_tuning.preview(model=TINY_QWEN3, training_file=file_id, top_k=50, train_on_inputs=True)
    assert len(every.rows) == len(records) and every.train_on_inputs is True
    assert all(row.trained_spans == [[1, row.num_tokens]] for row in every.rows)


def test_the_cli_prints_the_preview(ft: LiveServer, file_id: str, tmp_path: Path) -> None:
    key = ft.keys["alice"]
    as_json = run_together(
        ft, key, "--json", "fine-tuning", "preview", "-t", file_id, "-M", TINY_LLAMA, "--top-k", "2", cwd=tmp_path
    )
    body = json.loads(as_json.stdout)
    assert body["model"] == TINY_LLAMA and len(body["rows"]) == 2 and body["rows"][0]["trained_spans"]
    table = run_together(
        ft, key, "--no-json", "fine-tuning", "preview", "-t", file_id, "-M", TINY_LLAMA, "--top-k", "1", cwd=tmp_path
    )
    assert "conversation" in table.stdout and "Preview Rows" in table.stdout, table.stdout


def test_refusals_name_their_parameter(ft: LiveServer, alice: Together, file_id: str, records: Any) -> None:
    bob = client(ft, ft.keys["bob"], strict=True)
    cases: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"model": "nobody/no-such-model"}, together.NotFoundError, "model"),
        ({"top_k": 0}, together.BadRequestError, "top_k"),
        ({"top_k": 51}, together.BadRequestError, "top_k"),
        ({"training_file": "file-00000000-0000-4000-8000-000000000000"}, together.NotFoundError, "training_file"),
    ]
    for changes, error, param in cases:
        kwargs = {"model": TINY_LLAMA, "training_file": file_id, **changes}
        with pytest.raises(error) as exc:
            alice.fine_tuning.preview(**kwargs)
        assert exc.value.body["error"]["param"] == param, exc.value.body  # type: ignore[attr-defined]
    with pytest.raises(together.BadRequestError) as dpo:
        alice.fine_tuning.preview(model=TINY_LLAMA, training_file=file_id, extra_body={"training_method": "dpo"})
    assert dpo.value.body["error"]["param"] == "training_method"  # type: ignore[attr-defined]
    with pytest.raises(together.NotFoundError) as other:
        bob.fine_tuning.preview(model=TINY_LLAMA, training_file=file_id)
    assert other.value.body["error"]["param"] == "training_file"  # type: ignore[attr-defined]

    with ft.http(ft.keys["alice"]) as http:
        unfinished = opened(http, data=jsonl_bytes(qa_records(2, nonce=unique())), file_name="opened.jsonl")
    with pytest.raises(together.BadRequestError) as not_ready:
        alice.fine_tuning.preview(model=TINY_LLAMA, training_file=unfinished.file_id)
    assert not_ready.value.body["error"]["param"] == "training_file"  # type: ignore[attr-defined]

    # SmolLM2 is converted from its GGUF file by the first job on it; until then there is no tokenizer to preview
    # with. The 409 says so at once: the SDK does not retry it.
    start = time.monotonic()
    with pytest.raises(together.ConflictError) as unprepared:
        alice.fine_tuning.preview(model=SMOLLM2, training_file=file_id)
    assert time.monotonic() - start < 2.5, "the 409 was retried"
    assert unprepared.value.body["error"]["param"] == "model"  # type: ignore[attr-defined]
    assert "GGUF" in unprepared.value.message
