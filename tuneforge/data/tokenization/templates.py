"""Chat templates fit for training. Some stock templates render a turn differently once later turns follow it
(Qwen3 gives only the last answer an empty `<think>` block), so no turn's tokens can be located in the whole
conversation and multi-turn masks cannot be made. TRL ships prefix-preserving "training" versions of the stock
templates it knows (`trl/chat_templates/<name>_training.jinja`, next to the stock `<name>.jinja` it recognises by
exact text); a tokenizer whose template fails a two-turn probe takes that version, when one exists.

Torch-free: TRL's template files are read where the installed package keeps them, without importing it, so the
training run and the API's preview make the same choice. The adopted template is the one saved with the outputs,
so serving renders prompts as training did.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Any

from tuneforge.data.tokenization.chat import TemplateMismatch, conversation_tokens

PROBE = [
    {"role": "user", "content": "Hello there."},
    {"role": "assistant", "content": "Hi! How can I help?"},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
]


@lru_cache(maxsize=1)
def _trl_templates() -> dict[str, tuple[str, str]]:
    """Stock template text -> (name, training template text), for each pair TRL ships; {} without TRL."""
    spec = importlib.util.find_spec("trl")
    if spec is None or spec.origin is None:
        return {}
    folder = Path(spec.origin).parent / "chat_templates"
    pairs: dict[str, tuple[str, str]] = {}
    for training in sorted(folder.glob("*_training.jinja")):
        name = training.name.removesuffix("_training.jinja")
        stock = folder / f"{name}.jinja"
        if stock.is_file():
            pairs.setdefault(stock.read_text(encoding="utf-8"), (name, training.read_text(encoding="utf-8")))
    return pairs


def training_template(chat_template: str) -> tuple[str, str] | None:
    """(name, text) of TRL's training version of a stock chat template, or None when TRL has none for it."""
    return _trl_templates().get(chat_template)


def masks_multi_turn(tokenizer: Any) -> bool:
    """Whether the tokenizer's template lets every turn of a two-turn conversation be located (and so masked)."""
    try:
        conversation_tokens(PROBE, None, tokenizer, train_on_inputs=False)
    except TemplateMismatch:
        return False
    return True


def adopt_training_template(tokenizer: Any) -> str | None:
    """Switch a tokenizer whose template cannot mask multi-turn conversations to TRL's training version of it.

    Returns:
        The name of the template adopted (e.g. "qwen3_training"), or None when the tokenizer keeps its own (it
        masks fine, has no single template, or TRL knows no training version: its multi-turn data then fails with
        the masking error that names the line).
    """
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or masks_multi_turn(tokenizer):
        return None
    found = training_template(template)
    if found is None:
        return None
    name, text = found
    previous = template
    tokenizer.chat_template = text
    if not masks_multi_turn(tokenizer):
        tokenizer.chat_template = previous
        return None
    return f"{name}_training"
