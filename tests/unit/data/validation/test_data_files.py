"""Good files of every format validate with the right format and flags; each bad file gives the right first
error (line, field path, reason); both faces (validate_path and validate_stream) and both paths agree."""

from __future__ import annotations

from pathlib import Path

import pytest
from data_cases import BAD, GOOD, Case

from tuneforge.data import Issue, validate_path, validate_stream
from tuneforge.data.validation.jsonl import scan
from tuneforge.data.validation.report import RULES

FLAGS = {
    "has_message_weights",
    "has_sample_weights",
    "has_tools",
    "has_parallel_tool_calls",
    "has_reasoning",
    "is_multimodal",
}


def test_the_bad_table_is_big_and_distinct():
    assert len(BAD) >= 40
    assert len({c.name for c in BAD}) == len(BAD)
    assert len({c.reason for c in BAD}) == len(BAD)


@pytest.mark.parametrize("case", GOOD, ids=[c.name for c in GOOD])
def test_good_file_is_valid_with_its_format_and_flags(case: Case, tmp_path: Path):
    report = validate_path(case.write(tmp_path), purpose=case.purpose)
    assert report.valid, report.error_summary()
    assert report.errors == [] and report.error_count == 0
    assert report.dataset_format == case.fmt
    assert {f for f in FLAGS if getattr(report, f)} == case.flags
    assert report.num_samples >= 1


@pytest.mark.parametrize("case", BAD, ids=[c.name for c in BAD])
def test_bad_file_reports_line_field_and_reason(case: Case, tmp_path: Path):
    report = validate_path(case.write(tmp_path), purpose=case.purpose)
    assert not report.valid
    first = report.errors[0]
    assert isinstance(first, Issue)
    assert first.line == case.line, first
    assert first.field == case.field, first
    assert case.reason in first.message, first
    assert first.code in RULES
    summary = report.error_summary()
    if case.field:
        assert case.field in summary
    if case.line is not None:
        assert summary.startswith(f"line {case.line}")


JSONL = [c for c in GOOD + BAD if c.suffix == ".jsonl"]


@pytest.mark.parametrize("case", JSONL, ids=[c.name for c in JSONL])
def test_fast_path_agrees_with_the_reference_rules(case: Case, tmp_path: Path):
    path = case.write(tmp_path)
    verdicts = []
    for use_fast in (True, False):
        with path.open("rb") as f:
            verdicts.append(
                scan(f.read, purpose=case.purpose, max_errors=50, max_line_bytes=1 << 30, use_fast=use_fast)
            )
    assert verdicts[0] == verdicts[1]


@pytest.mark.parametrize(
    "case", [c for c in GOOD + BAD if c.suffix in (".jsonl", ".csv", ".parquet")], ids=lambda c: c.name
)
def test_stream_and_path_give_the_same_report(case: Case, tmp_path: Path):
    path = case.write(tmp_path)
    by_path = validate_path(path, purpose=case.purpose)
    with path.open("rb") as f:
        by_stream = validate_stream(f, filetype=case.suffix[1:], purpose=case.purpose)
    assert by_stream == by_path
