"""Preference (DPO) records: the prompt is the template's generation prompt, each completion what the template
renders for that reply after it through the end-of-turn token; truncation and drops."""

from __future__ import annotations

import os

import pytest

from tuneforge.data.tokenization.chat import prompt_ids
from tuneforge.data.tokenization.preference import (
    PreferenceExample,
    tokenize_preference_blob,
    tokenize_preference_records,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
tiny = pytest.importorskip("tuneforge.train.tiny_models")

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
RECORD = {
    "input": {"messages": PROMPT},
    "preferred_output": [{"role": "assistant", "content": "Paris."}],
    "non_preferred_output": [{"role": "assistant", "content": "I am fine, thank you."}],
}


@pytest.fixture(scope="module")
def tok():
    return tiny.make_tiny_tokenizer()


def _ids(out):
    return list(out["input_ids"]) if hasattr(out, "keys") else list(out)


def test_prompt_and_completions_follow_the_template(tok):
    (ex,), report = tokenize_preference_records([RECORD], tokenizer=tok, max_seq_length=256)
    assert ex.prompt_ids == _ids(tok.apply_chat_template(PROMPT, tokenize=True, add_generation_prompt=True))
    assert ex.prompt_ids == prompt_ids(PROMPT, None, tok)
    assert tok.decode(ex.chosen_ids) == "Paris.<|im_end|>"
    assert tok.decode(ex.rejected_ids) == "I am fine, thank you.<|im_end|>"
    full = _ids(tok.apply_chat_template([*PROMPT, RECORD["preferred_output"][0]], tokenize=True))
    assert full[: len(ex.prompt_ids) + len(ex.chosen_ids)] == ex.prompt_ids + ex.chosen_ids
    assert report.format == "preference_openai" and report.examples == 1
    assert report.trained_tokens == len(ex.chosen_ids) + len(ex.rejected_ids)
    assert report.masked_tokens == 2 * len(ex.prompt_ids)


def test_reasoning_in_a_reply_is_part_of_the_completion():
    tok = tiny.make_tiny_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.reasoning_content %}{{ '<think>' + m.reasoning_content + '</think>' }}{% endif %}"
        "{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    record = {**RECORD, "preferred_output": [{"role": "assistant", "reasoning": "easy", "content": "Paris."}]}
    (ex,), _ = tokenize_preference_records([record], tokenizer=tok, max_seq_length=256)
    assert tok.decode(ex.chosen_ids) == "<think>easy</think>Paris.<|im_end|>"


def test_truncation_and_drops(tok):
    n_prompt = len(prompt_ids(PROMPT, None, tok))
    examples, report = tokenize_preference_records(
        [RECORD, {"input": {}}, RECORD], tokenizer=tok, max_seq_length=n_prompt + 3
    )
    assert len(examples) == 2 and all(len(e.chosen_ids) == 3 == len(e.rejected_ids) for e in examples)
    first = examples[0]
    assert first == PreferenceExample(first.prompt_ids, first.chosen_ids, first.rejected_ids, truncated=True)
    assert report.truncated == 2 and report.dropped_reasons == {"malformed": 1}
    _, report = tokenize_preference_records([RECORD], tokenizer=tok, max_seq_length=n_prompt)
    assert report.examples == 0 and report.dropped_reasons == {"prompt_too_long": 1}


def test_blob(tok):
    import io
    import json

    stream = io.BytesIO((json.dumps(RECORD) + "\n\nnot json\n").encode())
    examples, report = tokenize_preference_blob(stream, tokenizer=tok, max_seq_length=256)
    assert len(examples) == 1 and report.dropped_reasons == {"malformed": 1}
