"""Stock chat templates that cannot mask multi-turn conversations (Qwen3's) give way to TRL's training version of
them, in the training run's tokenizer (transformers) and in the preview's (tuneforge's torch-free one) alike;
templates that mask fine, and ones TRL has no version of, are kept."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tuneforge.data.tokenization.chat import TemplateMismatch, conversation_tokens
from tuneforge.data.tokenization.examples import IGNORE
from tuneforge.data.tokenization.hf_tokenizer import CHAT_TEMPLATE_FILE, HFTokenizer, read_folder
from tuneforge.data.tokenization.templates import PROBE, adopt_training_template, masks_multi_turn, training_template
from tuneforge.train.tiny_models import save_tiny_model

TRL_TEMPLATES = Path(importlib.util.find_spec("trl").origin).parent / "chat_templates"
QWEN3_STOCK = (TRL_TEMPLATES / "qwen3.jinja").read_text(encoding="utf-8")
QWEN3_TRAINING = (TRL_TEMPLATES / "qwen3_training.jinja").read_text(encoding="utf-8")

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "And 3 + 3?"},
    {"role": "assistant", "content": "Six."},
]


@pytest.fixture(scope="module")
def qwen3_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = save_tiny_model(tmp_path_factory.mktemp("tpl") / "qwen3", "qwen3")
    (folder / CHAT_TEMPLATE_FILE).write_text(QWEN3_STOCK, encoding="utf-8")
    return folder


def _trained_text(tokenizer, ids: list[int], labels: list[int]) -> str:
    return tokenizer.decode([i for i, label in zip(ids, labels, strict=True) if label != IGNORE])


def test_qwen3_stock_template_cannot_mask_two_turns(qwen3_folder: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(qwen3_folder)
    assert tokenizer.chat_template == QWEN3_STOCK
    assert not masks_multi_turn(tokenizer)
    with pytest.raises(TemplateMismatch):
        conversation_tokens(CONVERSATION, None, tokenizer, train_on_inputs=False)


@pytest.mark.parametrize("kind", ["transformers", "tuneforge"])
def test_qwen3_takes_trls_training_template_and_masks_every_answer(qwen3_folder: Path, kind: str) -> None:
    tokenizer = (
        AutoTokenizer.from_pretrained(qwen3_folder)
        if kind == "transformers"
        else HFTokenizer(read_folder(qwen3_folder))
    )
    assert adopt_training_template(tokenizer) == "qwen3_training"
    assert tokenizer.chat_template == QWEN3_TRAINING
    ids, labels = conversation_tokens(CONVERSATION, None, tokenizer, train_on_inputs=False)
    trained = _trained_text(tokenizer, ids, labels)
    assert "Four." in trained and "Six." in trained  # both answers...
    assert "2 + 2" not in trained and "Be brief" not in trained and "3 + 3" not in trained  # ...and no prompt
    assert trained.count("<|im_end|>") == 2  # each answer through its end-of-turn token
    assert adopt_training_template(tokenizer) is None  # the training template masks fine: kept


def test_both_tokenizers_make_the_same_rows(qwen3_folder: Path) -> None:
    hf = AutoTokenizer.from_pretrained(qwen3_folder)
    ours = HFTokenizer(read_folder(qwen3_folder))
    adopt_training_template(hf)
    adopt_training_template(ours)
    assert conversation_tokens(CONVERSATION, None, hf, train_on_inputs=False) == conversation_tokens(
        CONVERSATION, None, ours, train_on_inputs=False
    )


def test_a_template_that_masks_fine_is_kept(tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(save_tiny_model(tmp_path / "llama", "llama"))
    before = tokenizer.chat_template
    assert masks_multi_turn(tokenizer)
    assert adopt_training_template(tokenizer) is None
    assert tokenizer.chat_template == before


def test_a_template_trl_does_not_know_is_kept_and_still_fails_clearly(qwen3_folder: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(qwen3_folder)
    unknown = QWEN3_STOCK.replace("<|im_start|>", "<|im_start|>", 1) + "{#- a local edit #}"
    tokenizer.chat_template = unknown
    assert training_template(unknown) is None
    assert adopt_training_template(tokenizer) is None
    assert tokenizer.chat_template == unknown
    with pytest.raises(TemplateMismatch):
        conversation_tokens(PROBE, None, tokenizer, train_on_inputs=False)
