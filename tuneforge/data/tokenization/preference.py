"""DPO tokenization: preference records (api-contract 2.4 `preference_openai`) -> prompt, chosen and rejected token ids.

The prompt is the input conversation through the chat template with its generation prompt; each completion is what
the template renders for that assistant message after the prompt, through its end-of-turn token. Knows nothing of
torch, transformers, losses or storage; the tokenizer is duck-typed (`tokenizer.py`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, BinaryIO

from tuneforge.data.tokenization.chat import ImageContent, prompt_and_reply
from tuneforge.data.tokenization.examples import IMAGES, MALFORMED, NO_TRAINED, TokenizationReport
from tuneforge.data.tokenization.tokenize import iter_jsonl
from tuneforge.data.tokenization.tokenizer import Tokenizer

PROMPT_TOO_LONG = "prompt_too_long"  # the prompt leaves no room for a completion within max_seq_length


@dataclass
class PreferenceExample:
    """One preference pair; the model reads prompt_ids + chosen_ids and prompt_ids + rejected_ids."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool = False


def tokenize_preference_records(
    records: Iterable[dict[str, Any]], *, tokenizer: Tokenizer, max_seq_length: int
) -> tuple[list[PreferenceExample], TokenizationReport]:
    """Tokenize validated preference records.

    A pair longer than `max_seq_length` keeps its whole prompt and has both completions cut to fit.
    In the report, trained tokens are the completions' tokens and masked tokens the prompt's, counted once per
    completion (each is a sequence of its own).

    Raises:
        ValueError: the chat template cannot render a record (the message names it, counted from 1).
    """
    return _tokenize(enumerate(records, 1), "record", tokenizer, max_seq_length)


def tokenize_preference_blob(
    stream: BinaryIO, *, tokenizer: Tokenizer, max_seq_length: int
) -> tuple[list[PreferenceExample], TokenizationReport]:
    """`tokenize_preference_records` over a stored JSONL file (errors name the 1-based line)."""
    skipped = TokenizationReport()
    examples, report = _tokenize(iter_jsonl(stream, skipped), "line", tokenizer, max_seq_length)
    for reason, count in skipped.dropped_reasons.items():
        report.dropped += count
        report.dropped_reasons[reason] = report.dropped_reasons.get(reason, 0) + count
    return examples, report


def _tokenize(
    numbered: Iterable[tuple[int, Any]], where: str, tokenizer: Tokenizer, max_seq_length: int
) -> tuple[list[PreferenceExample], TokenizationReport]:
    if max_seq_length < 2:
        raise ValueError(f"max_seq_length must be at least 2 for preference data, got {max_seq_length}")
    report = TokenizationReport(format="preference_openai")
    out: list[PreferenceExample] = []
    for n, record in numbered:
        parts = _parts(record)
        if parts is None:
            report.drop(MALFORMED)
            continue
        messages, tools, chosen, rejected = parts
        try:
            prompt, chosen_ids = prompt_and_reply(messages, chosen, tools, tokenizer)
            _, rejected_ids = prompt_and_reply(messages, rejected, tools, tokenizer)
        except ImageContent:
            report.drop(IMAGES)
            continue
        except ValueError as exc:
            raise ValueError(f"{where} {n}: {exc}") from exc
        if not chosen_ids or not rejected_ids:
            report.drop(NO_TRAINED)
            continue
        room = max_seq_length - len(prompt)
        if room < 1:
            report.drop(PROMPT_TOO_LONG)
            continue
        truncated = len(chosen_ids) > room or len(rejected_ids) > room
        example = PreferenceExample(prompt, chosen_ids[:room], rejected_ids[:room], truncated)
        report.examples += 1
        report.trained_tokens += len(example.chosen_ids) + len(example.rejected_ids)
        report.masked_tokens += 2 * len(prompt)
        report.truncated += truncated
        out.append(example)
    return out, report


def _parts(record: Any) -> tuple[list[dict[str, Any]], list[Any] | None, dict[str, Any], dict[str, Any]] | None:
    """(input messages, tools, chosen message, rejected message), or None when the record lacks that shape."""
    if not isinstance(record, dict) or not isinstance(record.get("input"), dict):
        return None
    messages = record["input"].get("messages")
    tools = record["input"].get("tools")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        return None
    replies = []
    for key in ("preferred_output", "non_preferred_output"):
        value = record.get(key)
        if not isinstance(value, list) or len(value) != 1 or not isinstance(value[0], dict):
            return None
        replies.append({**value[0], "role": "assistant"})
    return messages, tools if isinstance(tools, list) else None, replies[0], replies[1]
