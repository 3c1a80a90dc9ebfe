"""Pre-tokenized parquet rows (api-contract 2.4) -> `TokenizedExample`s, batch by batch; no tokenizer is involved.

Rows are taken as they are, with two changes that do not alter what is trained: tokens whose `attention_mask` is 0
(padding) are removed, and the label of each sequence's first token (position 0) is set to -100 since nothing
predicts it. Labels default to `input_ids`. Knows pyarrow; nothing of tokenizers, formats or packing.
"""

from __future__ import annotations

from typing import Any, BinaryIO

from tuneforge.data.tokenization.examples import IGNORE, MALFORMED, TokenizationReport, TokenizedExample, finish

_BATCH_ROWS = 4096


def read_parquet(
    stream: BinaryIO, *, max_seq_length: int, vocab_size: int | None = None
) -> tuple[list[TokenizedExample], TokenizationReport]:
    """Every row of a validated pre-tokenized parquet file, cut at `max_seq_length` tokens (keeping the start).

    Raises:
        ValueError: the file is not readable parquet or has no `input_ids` column, or (given `vocab_size`, the
            model's embedding rows) a row holds a token id or label outside [0, vocab_size), named by its 1-based
            row number.
    """
    import pyarrow.parquet as pq

    if max_seq_length < 1:
        raise ValueError(f"max_seq_length must be at least 1, got {max_seq_length}")
    try:
        pf = pq.ParquetFile(stream)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise ValueError(f"the file is not a readable parquet file ({exc})") from exc
    names = list(pf.schema_arrow.names)
    if "input_ids" not in names:
        raise ValueError(f"the parquet file has no input_ids column (columns: {', '.join(names) or 'none'})")
    columns = [c for c in ("input_ids", "attention_mask", "labels", "position_ids") if c in names]
    report = TokenizationReport(format="parquet")
    out: list[TokenizedExample] = []
    row = 0
    for batch in pf.iter_batches(batch_size=_BATCH_ROWS, columns=columns):
        data = {name: batch.column(i).to_pylist() for i, name in enumerate(batch.schema.names)}
        empty: list[Any] = [None] * batch.num_rows
        for ids, mask, labels, pos in zip(
            data["input_ids"],
            data.get("attention_mask", empty),
            data.get("labels", empty),
            data.get("position_ids", empty),
            strict=True,
        ):
            row += 1
            if vocab_size is not None:
                _check_vocabulary(row, ids, labels, vocab_size)
            _row(ids, mask, labels, pos, max_seq_length, report, out)
    return out, report


def _check_vocabulary(row: int, ids: Any, labels: Any, vocab_size: int) -> None:
    """A token id the model has no embedding for would fail (or, on some devices, read garbage) in training."""
    for column, values in (("input_ids", ids), ("labels", labels)):
        if not isinstance(values, list):
            continue
        bad = next((t for t in values if isinstance(t, int) and not 0 <= t < vocab_size
                    and not (column == "labels" and t == IGNORE)), None)  # fmt: skip
        if bad is not None:
            raise ValueError(
                f"row {row}: {column} holds token id {bad}, outside the model's vocabulary of {vocab_size:,} ids "
                f"(0 to {vocab_size - 1:,}{', or -100 for an untrained label' if column == 'labels' else ''})"
            )


def _row(
    ids: Any,
    mask: Any,
    labels: Any,
    pos: Any,
    max_seq_length: int,
    report: TokenizationReport,
    out: list[TokenizedExample],
) -> None:
    if not isinstance(ids, list) or any(not isinstance(t, int) for t in ids):
        report.drop(MALFORMED)
        return
    n = len(ids)
    for col in (mask, labels, pos):
        if col is not None and (not isinstance(col, list) or len(col) != n or any(not isinstance(t, int) for t in col)):
            report.drop(MALFORMED)
            return
    keep = range(n) if mask is None else [j for j in range(n) if mask[j] != 0]
    input_ids = [ids[j] for j in keep]
    labs = list(input_ids) if labels is None else [labels[j] for j in keep]
    positions = None if pos is None else [pos[j] for j in keep]
    if positions is not None:
        labs = [IGNORE if p == 0 else t for t, p in zip(labs, positions, strict=True)]
    kept: list[TokenizedExample] = []
    finish(input_ids, labs, max_seq_length, report, kept)
    for example in kept:
        if positions is not None:
            example.position_ids = positions[: len(example.input_ids)]
        out.append(example)
