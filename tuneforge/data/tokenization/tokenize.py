"""SFT tokenization: validated records (or a stored JSONL / parquet blob) -> `TokenizedExample`s and a report.

Owns the per-format rules (which tokens are trained, api-contract 3.4's `train_on_inputs`) and reading a stored file;
examples are cut and kept or dropped by `examples.py`. Conversations go through `chat.py`; parquet rows through
`pretokenized.py`. Knows nothing of torch, transformers, packing, storage or jobs; the tokenizer is duck-typed
(`tokenizer.py`).

Instruction records (`prompt`/`completion`) are rendered as raw text, not through the chat template: bos when the
tokenizer adds one by default, the prompt's tokens, the completion's tokens, eos. For a vision-language model
(a tokenizer that takes images, `vision.py`) they are a user and an assistant turn through its chat template,
since the prompt may hold images and only the template places them. Prompt and completion are
tokenized separately, so the prompt's tokens are exactly those `/completions` will feed the model for that prompt.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO

from tuneforge.data.formats import MAX_LINE_BYTES, SFT_FORMATS, LineError, decode_line, detect_format, iter_lines
from tuneforge.data.tokenization.chat import ImageContent, conversation_tokens, takes_images
from tuneforge.data.tokenization.examples import (
    EMPTY,
    IGNORE,
    IMAGES,
    IMAGES_CUT,
    MALFORMED,
    TokenizationReport,
    TokenizedExample,
    finish,
)
from tuneforge.data.tokenization.pretokenized import read_parquet
from tuneforge.data.tokenization.tokenizer import Tokenizer, bos_prefix, encode_batch, eos_suffix

_BATCH = 512  # records tokenized per call for the plain-text formats


def train_inputs(train_on_inputs: bool | str, dataset_format: str) -> bool:
    """Contract 3.4: "auto" trains every token of `text` data and masks the inputs of the other formats.

    Raises:
        ValueError: `train_on_inputs` is not True, False or "auto".
    """
    if isinstance(train_on_inputs, bool):
        return train_on_inputs
    if train_on_inputs == "auto":
        return dataset_format == "general"
    raise ValueError(f"train_on_inputs must be true, false or 'auto', got {train_on_inputs!r}")


def tokenize_records(
    records: Iterable[dict[str, Any]],
    *,
    tokenizer: Tokenizer,
    dataset_format: str,
    train_on_inputs: bool | str,
    max_seq_length: int,
) -> tuple[list[TokenizedExample], TokenizationReport]:
    """Tokenize validated SFT records of one format.

    Args:
        records: decoded JSONL records.
        tokenizer: the base model's tokenizer (with a chat template for conversations).
        dataset_format: "general", "conversation" or "instruction".
        train_on_inputs: True, False or "auto" (api-contract 3.4).
        max_seq_length: longer examples are cut to this many tokens, keeping the start.

    Returns:
        The kept examples, in record order, and the report.

    Raises:
        ValueError: an unknown or preference format, a bad `train_on_inputs` or `max_seq_length`, or a chat
            template whose turns cannot be located (the message names the record, counted from 1).
    """
    return _tokenize(enumerate(records, 1), "record", tokenizer, dataset_format, train_on_inputs, max_seq_length)


def preview_records(
    lines: Iterable[tuple[int, Any]],
    *,
    tokenizer: Tokenizer,
    dataset_format: str,
    train_on_inputs: bool | str,
    max_seq_length: int,
) -> list[TokenizedExample]:
    """One example per (line number, record), as `iter_jsonl` yields them, made by the very code that tokenizes
    them for training (`POST /fine-tunes/preview`).

    A record that training drops still gets its example, so the preview lines up with the file: every label IGNORE
    when it has no trained token (before or after the cut), no tokens at all when it renders to none (empty text,
    images, a record without its format's keys).

    Raises:
        ValueError: as `tokenize_blob` (errors name the line).
    """
    out: list[TokenizedExample] = []
    for n, record in lines:
        kept, report = _tokenize([(n, record)], "line", tokenizer, dataset_format, train_on_inputs, max_seq_length)
        out.append(kept[0] if kept else report.last_untrained or TokenizedExample([], []))
    return out


def _tokenize(
    numbered: Iterable[tuple[int, Any]],
    where: str,
    tokenizer: Tokenizer,
    dataset_format: str,
    train_on_inputs: bool | str,
    max_seq_length: int,
) -> tuple[list[TokenizedExample], TokenizationReport]:
    if dataset_format not in SFT_FORMATS:
        hint = "; use tokenize_preference_records" if dataset_format == "preference_openai" else ""
        raise ValueError(f"cannot tokenize dataset format {dataset_format!r} for SFT{hint}")
    if max_seq_length < 1:
        raise ValueError(f"max_seq_length must be at least 1, got {max_seq_length}")
    train_all = train_inputs(train_on_inputs, dataset_format)
    report = TokenizationReport(format=dataset_format)
    out: list[TokenizedExample] = []
    if dataset_format == "conversation" or (dataset_format == "instruction" and takes_images(tokenizer)):
        for n, record in numbered:
            if dataset_format == "instruction":
                record = _as_conversation(record)
            _conversation(n, where, record, tokenizer, train_all, max_seq_length, report, out)
        return out, report
    bos, eos = bos_prefix(tokenizer), eos_suffix(tokenizer)
    for chunk in _chunks(numbered, _BATCH):
        if dataset_format == "general":
            _general(chunk, tokenizer, bos, eos, max_seq_length, report, out)
        else:
            _instruction(chunk, tokenizer, bos, eos, train_all, max_seq_length, report, out)
    return out, report


def _chunks(numbered: Iterable[tuple[int, Any]], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for _, record in numbered:
        chunk.append(record)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _conversation(
    n: int,
    where: str,
    record: Any,
    tokenizer: Tokenizer,
    train_all: bool,
    max_seq_length: int,
    report: TokenizationReport,
    out: list[TokenizedExample],
) -> None:
    messages = record.get("messages") if isinstance(record, dict) else None
    tools = record.get("tools") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        report.drop(MALFORMED)
        return
    try:
        ids, labels = conversation_tokens(
            messages, tools if isinstance(tools, list) else None, tokenizer, train_on_inputs=train_all
        )
    except ImageContent:
        report.drop(IMAGES)
        return
    except ValueError as exc:
        raise ValueError(f"{where} {n}: {exc}") from exc
    images: tuple[str, ...] = ()
    if takes_images(tokenizer):
        from tuneforge.data.tokenization.vision import image_urls

        tokenizer.forget()  # type: ignore[attr-defined]
        images = image_urls(messages)
        if images and tokenizer.images_cut(ids, max_seq_length):  # type: ignore[attr-defined]
            report.drop(IMAGES_CUT)
            return
    finish(ids, labels, max_seq_length, report, out, images)


def _as_conversation(record: Any) -> Any:
    """An instruction record as the conversation a vision model's chat template renders (its prompt may hold
    images): the prompt as the user's turn, the completion as the assistant's."""
    if not isinstance(record, dict) or "prompt" not in record or "completion" not in record:
        return None
    return {"messages": [{"role": "user", "content": record["prompt"]},
                         {"role": "assistant", "content": record["completion"]}]}  # fmt: skip


def _general(
    chunk: list[Any],
    tokenizer: Tokenizer,
    bos: list[int],
    eos: list[int],
    max_seq_length: int,
    report: TokenizationReport,
    out: list[TokenizedExample],
) -> None:
    texts: list[str] = []
    for record in chunk:
        text = record.get("text") if isinstance(record, dict) else None
        if isinstance(text, str):
            texts.append(text)
        else:
            report.drop(MALFORMED)
    for body in encode_batch(tokenizer, texts):
        if not body:
            report.drop(EMPTY)
            continue
        ids = bos + body + eos
        finish(ids, list(ids), max_seq_length, report, out)


def _instruction(
    chunk: list[Any],
    tokenizer: Tokenizer,
    bos: list[int],
    eos: list[int],
    train_all: bool,
    max_seq_length: int,
    report: TokenizationReport,
    out: list[TokenizedExample],
) -> None:
    pairs: list[tuple[str, str]] = []
    for record in chunk:
        prompt = record.get("prompt") if isinstance(record, dict) else None
        completion = record.get("completion") if isinstance(record, dict) else None
        if isinstance(prompt, str) and isinstance(completion, str):
            pairs.append((prompt, completion))
        else:
            report.drop(MALFORMED)
    encoded = encode_batch(tokenizer, [text for pair in pairs for text in pair])
    for k in range(len(pairs)):
        prompt_ids, completion_ids = encoded[2 * k], encoded[2 * k + 1]
        if not prompt_ids and not completion_ids:
            report.drop(EMPTY)
            continue
        head = bos + prompt_ids
        tail = completion_ids + eos
        labels = (list(head) if train_all else [IGNORE] * len(head)) + tail
        finish(head + tail, labels, max_seq_length, report, out)


def iter_jsonl(stream: BinaryIO, report: TokenizationReport | None = None) -> Iterator[tuple[int, Any]]:
    """(line number, record) for each non-blank line of a JSONL stream, read in 1 MiB blocks.

    A line that is too long or not a JSON object is counted as a MALFORMED drop in `report` and skipped.
    """
    for n, line in enumerate(iter_lines(stream.read, MAX_LINE_BYTES), 1):
        try:
            record = decode_line(line) if line is not None else False
        except LineError:
            record = False
        if record is None:
            continue  # a blank line
        if record is False:
            if report is not None:
                report.drop(MALFORMED)
            continue
        yield n, record


def tokenize_blob(
    stream: BinaryIO,
    *,
    filetype: str,
    tokenizer: Tokenizer,
    dataset_format: str | None,
    train_on_inputs: bool | str,
    max_seq_length: int,
    vocab_size: int | None = None,
) -> tuple[list[TokenizedExample], TokenizationReport]:
    """Tokenize a stored SFT dataset file.

    Args:
        stream: the file, opened for binary reading (seekable for parquet).
        filetype: "jsonl" or "parquet".
        tokenizer: as for `tokenize_records` (not called for parquet).
        dataset_format: the validated format; None detects it from the first record. Ignored for parquet.
        train_on_inputs: as for `tokenize_records` (parquet rows keep their own labels).
        max_seq_length: as for `tokenize_records`.
        vocab_size: the model's vocabulary (embedding rows): parquet token ids outside it are refused.

    Returns:
        The kept examples and the report; errors name the 1-based line (parquet: row).

    Raises:
        ValueError: an unknown file type or format, or a record that cannot be rendered (see `tokenize_records`).
    """
    if filetype == "parquet":
        return read_parquet(stream, max_seq_length=max_seq_length, vocab_size=vocab_size)
    if filetype != "jsonl":
        raise ValueError(f"cannot tokenize file type {filetype!r}; use jsonl or parquet")
    skipped = TokenizationReport()
    lines = iter_jsonl(stream, skipped)
    if dataset_format is None:
        first = next(lines, None)
        if first is None:
            return [], _merged(skipped, TokenizationReport(format=""))
        dataset_format = detect_format(first[1])
        if dataset_format is None:
            raise ValueError(f"line {first[0]}: the record matches no dataset format")
        lines = _chain(first, lines)
    examples, report = _tokenize(lines, "line", tokenizer, dataset_format, train_on_inputs, max_seq_length)
    return examples, _merged(skipped, report)


def _chain(first: tuple[int, Any], rest: Iterator[tuple[int, Any]]) -> Iterator[tuple[int, Any]]:
    yield first
    yield from rest


def _merged(skipped: TokenizationReport, report: TokenizationReport) -> TokenizationReport:
    for reason, count in skipped.dropped_reasons.items():
        report.dropped += count
        report.dropped_reasons[reason] = report.dropped_reasons.get(reason, 0) + count
    return report
