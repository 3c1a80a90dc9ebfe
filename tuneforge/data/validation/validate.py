"""The one validation entry point: a stream or a path in, a `ValidationReport` out.

Owns dispatch by file type and the file-level rules (missing, empty, size, suffix, sample count); hands big
JSONL paths to `parallel.py`. Knows nothing of HTTP, storage or the SDK's dict.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

from tuneforge.data.formats import MAX_LINE_BYTES
from tuneforge.data.validation.jsonl import Tally, scan
from tuneforge.data.validation.parallel import free_cpus, scan_parallel
from tuneforge.data.validation.report import ValidationReport, flags_of
from tuneforge.data.validation.tabular import scan_csv, scan_parquet
from tuneforge.errors import InvalidRequestError

PURPOSES = ("fine-tune", "eval", "calibration", "batch-api")
FILETYPES = {".jsonl": "jsonl", ".parquet": "parquet", ".csv": "csv"}
MAX_FILE_BYTES = int(50.1 * 2**30)
# Below this size a child process costs more (its start-up, ~0.1 s) than it saves.
PARALLEL_MIN_BYTES = 48 * 2**20


def validate_stream(
    stream: BinaryIO,
    *,
    filetype: str,
    purpose: str = "fine-tune",
    max_errors: int = 20,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> ValidationReport:
    """Validate a dataset read from a binary stream, in bounded memory.

    Args:
        stream: a binary file object, read once from its current position; seekable for parquet.
        filetype: "jsonl", "parquet" or "csv".
        purpose: "fine-tune" (all format rules), "eval" (structure only; CSV allowed),
            "calibration" or "batch-api" (structural JSONL checks only).
        max_errors: how many errors and warnings the report keeps (all are counted).
        max_line_bytes: a longer JSONL line is an error and is skipped without being held in memory.

    Returns:
        The report; `valid` is False when any rule is broken.

    Raises:
        InvalidRequestError: `purpose` is not one of the four purposes.
    """
    _check_purpose(purpose)
    if filetype == "jsonl":
        tally = scan(stream.read, purpose=purpose, max_errors=max_errors, max_line_bytes=max_line_bytes)
    elif filetype in ("parquet", "csv"):
        start = stream.tell() if stream.seekable() else None
        if filetype == "parquet":
            tally = scan_parquet(stream, purpose=purpose, max_errors=max_errors)
        else:
            tally = scan_csv(stream, purpose=purpose, max_errors=max_errors, max_line_bytes=max_line_bytes)
        if start is not None:  # these checks may stop before the end, or read out of order
            tally.bytes = stream.seek(0, os.SEEK_END) - start
    else:
        return _refused(f"unknown file type {filetype!r}; use jsonl, parquet or csv", "filetype", purpose, None)
    return _finish(tally, filetype=filetype, purpose=purpose)


def validate_path(
    path: str | Path,
    *,
    purpose: str = "fine-tune",
    max_errors: int = 20,
    max_line_bytes: int = MAX_LINE_BYTES,
    workers: int | None = None,
) -> ValidationReport:
    """Validate a dataset file; the file type comes from its suffix (.jsonl, .parquet, .csv).

    A missing, empty, too large or unknown-suffix file gives an invalid report, not an exception.

    Args:
        path: the file.
        purpose: as for `validate_stream`.
        max_errors: as for `validate_stream`.
        max_line_bytes: as for `validate_stream`.
        workers: processes for a big JSONL file (default: the idle CPUs, see `parallel.free_cpus`; 1: none).

    Returns:
        The report.

    Raises:
        InvalidRequestError: `purpose` is not one of the four purposes.
    """
    _check_purpose(purpose)
    p = Path(path)
    if not p.is_file():
        return _refused(f"no such file: {p}", "not_found", purpose, None)
    size = p.stat().st_size
    filetype = FILETYPES.get(p.suffix)
    if filetype is None:
        why = f"unknown file extension {p.suffix or '(none)'!r}; use .jsonl, .parquet or .csv"
        return _refused(why, "filetype", purpose, size)
    if size == 0:
        return _refused("the file is empty", "empty", purpose, 0, filetype)
    if size > MAX_FILE_BYTES:
        return _refused(
            f"the file is {size / 2**30:.1f} GiB; the limit is 50.1 GiB", "too_large", purpose, size, filetype
        )
    workers = workers if workers is not None else free_cpus()
    if filetype == "jsonl" and workers > 1 and size >= PARALLEL_MIN_BYTES:
        tally = scan_parallel(
            p, size, workers=workers, purpose=purpose, max_errors=max_errors, max_line_bytes=max_line_bytes
        )
        if tally is not None:
            return _finish(tally, filetype=filetype, purpose=purpose)
    with p.open("rb") as stream:
        report = validate_stream(
            stream, filetype=filetype, purpose=purpose, max_errors=max_errors, max_line_bytes=max_line_bytes
        )
    report.file_size = size  # also when a check stopped before reading the whole file
    return report


def _check_purpose(purpose: str) -> None:
    if purpose not in PURPOSES:
        raise InvalidRequestError(f"purpose {purpose!r} is not one of {', '.join(PURPOSES)}", param="purpose")


def _refused(why: str, code: str, purpose: str, size: int | None, filetype: str | None = None) -> ValidationReport:
    tally = Tally(1)
    tally.error(None, None, why, code)
    report = _finish(tally, filetype=filetype, purpose=purpose)
    report.file_size = size
    return report


def _finish(tally: Tally, *, filetype: str | None, purpose: str) -> ValidationReport:
    if tally.bytes == 0 and not tally.error_count:
        tally.error(None, None, "the file is empty", "empty")
    elif tally.samples < 1 and not tally.error_count:
        tally.error(None, None, "the file has no samples (only blank lines); a dataset needs at least 1", "min_samples")
    checked_format = purpose == "fine-tune" or filetype == "parquet"
    return ValidationReport(
        valid=tally.error_count == 0,
        filetype=filetype,
        purpose=purpose,
        dataset_format=tally.fmt if checked_format else None,
        num_samples=tally.samples,
        file_size=tally.bytes,
        errors=tally.errors,
        warnings=tally.warnings,
        error_count=tally.error_count,
        warning_count=tally.warning_count,
        error_codes=sorted(tally.codes),
        **flags_of(tally.flags),
    )
