"""Scanning a JSONL byte stream: its lines (read by `formats.iter_lines`) in bounded memory, the fast path first.

Owns line numbering, the over-long-line error, the per-range `Tally` and its in-order merge; applies the rules
(`fast.py`, then `rules.py`) without holding any. Knows nothing of paths or processes.
"""

from __future__ import annotations

import msgspec

from tuneforge.data.formats import LineError, Read, decode_line, iter_lines
from tuneforge.data.validation.fast import FastChecker
from tuneforge.data.validation.messages import Findings
from tuneforge.data.validation.report import Issue
from tuneforge.data.validation.rules import check_record


class Tally(msgspec.Struct):
    """What a scan found in one byte range; line numbers are relative to the range's first line."""

    max_errors: int
    fmt: str | None = None
    lines: int = 0
    samples: int = 0
    flags: int = 0
    bytes: int = 0
    errors: list[Issue] = msgspec.field(default_factory=list)
    warnings: list[Issue] = msgspec.field(default_factory=list)
    error_count: int = 0
    warning_count: int = 0
    codes: set[str] = msgspec.field(default_factory=set)

    def error(self, line: int | None, field: str | None, message: str, code: str) -> None:
        self.error_count += 1
        self.codes.add(code)
        if len(self.errors) < self.max_errors:
            self.errors.append(Issue(line, field, message, code))

    def absorb(self, line: int, found: Findings) -> None:
        """Record a line's errors and warnings (its flags are the caller's to merge)."""
        for field, message, code in found.errors:
            self.error(line, field, message, code)
        for field, message, code in found.warnings:
            self.warning_count += 1
            if len(self.warnings) < self.max_errors:
                self.warnings.append(Issue(line, field, message, code))

    def merge(self, later: Tally) -> None:
        """Append the tally of the byte range that follows this one."""
        offset = self.lines
        for issue in later.errors[: max(0, self.max_errors - len(self.errors))]:
            self.errors.append(_shift(issue, offset))
        for issue in later.warnings[: max(0, self.max_errors - len(self.warnings))]:
            self.warnings.append(_shift(issue, offset))
        self.error_count += later.error_count
        self.warning_count += later.warning_count
        self.codes |= later.codes
        self.lines += later.lines
        self.samples += later.samples
        self.bytes += later.bytes
        self.flags |= later.flags
        if self.fmt is None:
            self.fmt = later.fmt


def _shift(issue: Issue, offset: int) -> Issue:
    line = None if issue.line is None else issue.line + offset
    return Issue(line, issue.field, issue.message, issue.code)


def scan(
    read: Read,
    *,
    purpose: str,
    max_errors: int,
    max_line_bytes: int,
    expected: str | None = None,
    use_fast: bool = True,
) -> Tally:
    """Validate every line a reader gives.

    Args:
        read: `stream.read`, or a reader bounded to a byte range that starts at a line start.
        purpose: the file's purpose; only `fine-tune` applies the format rules.
        max_errors: how many errors (and warnings) to keep; all are counted.
        max_line_bytes: longer lines are reported and skipped without being held in memory.
        expected: the dataset format already established by earlier lines (for ranges after the first).
        use_fast: try the typed fast path first (off only to test that both paths agree).

    Returns:
        The range's tally, with line numbers counted from 1 at its first line.
    """
    tally = Tally(max_errors, expected)
    format_rules = purpose == "fine-tune"
    check = FastChecker().check if format_rules and use_fast else None
    fmt, samples, flags, lineno = expected, 0, 0, 0  # locals: this loop runs once per line
    for line in iter_lines(read, max_line_bytes, tally):
        lineno += 1
        if line is None:
            samples += 1
            why = f"line is longer than {max_line_bytes:,} bytes; it was skipped unread"
            tally.error(lineno, None, why, "line_too_long")
            continue
        if check is not None:
            verdict = check(line, fmt)
            if verdict is not None:
                samples += 1
                flags |= verdict[1]
                if fmt is None:
                    fmt = verdict[0]
                continue
        try:
            obj = decode_line(line)
        except LineError as exc:
            samples += 1
            tally.error(lineno, None, exc.message, exc.code)
            continue
        if obj is None:
            continue
        samples += 1
        if format_rules:
            found = Findings()
            got = check_record(obj, expected=fmt, found=found)
            if fmt is None:
                fmt = got
            flags |= found.flags
            tally.absorb(lineno, found)
    tally.fmt, tally.samples, tally.flags, tally.lines = fmt, samples, flags, lineno
    return tally


def first_format(read: Read, max_line_bytes: int, max_lines: int = 1000) -> tuple[bool, str | None]:
    """The format of the first line that has one, as a sequential scan would establish it.

    Returns:
        (decided, format): decided is False when `max_lines` lines gave no answer.
    """
    fast = FastChecker()
    for n, line in enumerate(iter_lines(read, max_line_bytes)):
        if n >= max_lines:
            return False, None
        verdict = fast.check(line, None) if line is not None else None
        if verdict is not None:
            return True, verdict[0]
        try:
            obj = decode_line(line) if line is not None else None
        except LineError:
            continue
        if obj is not None:
            fmt = check_record(obj, expected=None, found=Findings())
            if fmt is not None:
                return True, fmt
    return True, None
