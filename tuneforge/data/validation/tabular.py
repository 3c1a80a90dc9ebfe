"""Parquet (pre-tokenized) and CSV (eval) files: column rules checked batch by batch, in bounded memory.

Knows pyarrow and the csv module; nothing of JSONL rules, paths or processes.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from typing import Any, BinaryIO

from tuneforge.data.formats import Read, iter_lines
from tuneforge.data.validation.jsonl import Tally

PARQUET_COLUMNS = ("input_ids", "attention_mask", "labels", "position_ids")
_BATCH_ROWS = 1 << 16


def scan_parquet(stream: BinaryIO, *, purpose: str, max_errors: int) -> Tally:
    """Validate a pre-tokenized parquet file (api-contract 2.3-2.5); issue lines are 1-based row numbers."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tally = Tally(max_errors, "parquet")
    if purpose == "eval":
        tally.error(None, None, "parquet files are not accepted for purpose eval; use JSONL or CSV", "purpose")
        return tally
    try:
        pf = pq.ParquetFile(stream)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        tally.error(None, None, f"the file is not a readable parquet file ({exc})", "parquet")
        return tally
    schema = pf.schema_arrow
    names = list(schema.names)
    if "input_ids" not in names:
        tally.error(
            None, "input_ids", f"the input_ids column is missing (columns: {', '.join(names) or 'none'})", "parquet"
        )
    for name in names:
        if name not in PARQUET_COLUMNS:
            tally.error(None, name, f"unexpected column {name!r}; allowed: {', '.join(PARQUET_COLUMNS)}", "parquet")
    for name in names:
        if name not in PARQUET_COLUMNS:
            continue
        typ = schema.field(name).type
        is_list = pa.types.is_list(typ) or pa.types.is_large_list(typ)
        if not (is_list and pa.types.is_integer(typ.value_type)):
            tally.error(None, name, f"column {name} must hold lists of integers, got {typ}", "parquet")
    tally.samples = pf.metadata.num_rows
    if tally.error_count:
        return tally
    if tally.samples < 1:
        tally.error(None, None, "the file has no rows; a dataset needs at least 1 sample", "min_samples")
        return tally
    row0 = 0
    try:
        for batch in pf.iter_batches(batch_size=_BATCH_ROWS):
            _check_batch(batch, row0, tally)
            row0 += batch.num_rows
    except Exception as exc:  # a damaged page only shows when it is read
        tally.error(row0 + 1, None, f"the file could not be read past row {row0} ({exc})", "parquet")
    tally.lines = tally.samples
    return tally


def _check_batch(batch: Any, row0: int, tally: Tally) -> None:
    import pyarrow.compute as pc

    cols = {name: batch.column(i) for i, name in enumerate(batch.schema.names)}
    ids_len = pc.list_value_length(cols["input_ids"])
    for name, col in cols.items():
        if col.null_count:
            _report_rows(pc.indices_nonzero(pc.is_null(col)), row0, tally, name, "is null; every row needs a list")
        flat = pc.list_flatten(col)
        if flat.null_count:
            rows = pc.filter(pc.list_parent_indices(col), pc.is_null(flat))
            _report_rows(rows, row0, tally, name, "holds null values")
        if name != "input_ids":
            differs = pc.fill_null(pc.not_equal(pc.list_value_length(col), ids_len), False)
            if pc.any(differs).as_py():
                what = f"has a different length than input_ids; {name} must match it token for token"
                _report_rows(pc.indices_nonzero(differs), row0, tally, name, what)
        if name == "attention_mask":
            bad = pc.fill_null(pc.or_(pc.less(flat, 0), pc.greater(flat, 1)), False)
            if pc.any(bad).as_py():
                rows = pc.filter(pc.list_parent_indices(col), bad)
                _report_rows(rows, row0, tally, name, "holds values other than 0 and 1")


def _report_rows(rows: Any, row0: int, tally: Tally, field: str, what: str) -> None:
    """One error per distinct row in `rows` (batch-relative indices); only the first few are materialised."""
    import pyarrow.compute as pc

    unique = pc.unique(rows)
    room = max(0, tally.max_errors - len(tally.errors))
    shown = unique.slice(0, room).to_pylist()
    for index in shown:
        tally.error(row0 + index + 1, field, f"{field} {what}", "parquet")
    tally.error_count += len(unique) - len(shown)
    tally.codes.add("parquet")


def scan_csv(stream: BinaryIO, *, purpose: str, max_errors: int, max_line_bytes: int) -> Tally:
    """Validate an eval CSV file: UTF-8, a header row, the header's column count on every row, 1+ rows."""
    tally = Tally(max_errors)
    if purpose != "eval":
        tally.error(
            None, None, f"CSV files are accepted only for purpose eval, not {purpose}; use JSONL or parquet", "purpose"
        )
        return tally
    lines = _TextLines(stream.read, max_line_bytes, tally)
    reader = csv.reader(lines)
    try:
        header = next(reader, None)
        if not header:
            tally.error(1, None, "the CSV file has no header row", "csv")
            return tally
        for row in reader:
            if not row:
                continue
            tally.samples += 1
            if len(row) != len(header):
                tally.error(
                    reader.line_num,
                    None,
                    f"row has {len(row)} columns but the header has {len(header)} ({', '.join(header)[:60]})",
                    "csv_columns",
                )
    except _Stop as stop:
        tally.error(stop.line, None, stop.message, stop.code)
    except csv.Error as exc:
        tally.error(reader.line_num or None, None, f"the CSV file is malformed: {exc}", "csv")
    if not tally.error_count and tally.samples < 1:
        tally.error(
            None, None, "the CSV file has a header but no rows; a dataset needs at least 1 sample", "min_samples"
        )
    tally.lines = reader.line_num
    return tally


class _Stop(Exception):
    def __init__(self, line: int, message: str, code: str) -> None:
        super().__init__(message)
        self.line, self.message, self.code = line, message, code


class _TextLines:
    """Decoded lines for `csv.reader`, so a bad byte or an over-long line is reported with its line number."""

    def __init__(self, read: Read, max_line_bytes: int, tally: Tally) -> None:
        self._lines = iter_lines(read, max_line_bytes, tally)
        self._n = 0

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        raw = next(self._lines)
        self._n += 1
        if raw is None:
            raise _Stop(self._n, "line is too long; it was skipped unread", "line_too_long")
        try:
            return str(raw, "utf-8") + "\n"
        except UnicodeDecodeError as exc:
            raise _Stop(
                self._n, f"not valid UTF-8: byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} of the line", "utf8"
            ) from None
