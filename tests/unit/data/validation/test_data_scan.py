"""The scanner: line splitting across blocks, over-long lines in bounded memory, error limits and order,
no cascades, parallel ranges equal to one pass, and the file-level refusals."""

from __future__ import annotations

import io
import random
import tracemalloc
from pathlib import Path

import pytest
from data_cases import CONV, jl

from tuneforge.data import formats, validate_path, validate_stream
from tuneforge.data.validation.jsonl import scan
from tuneforge.data.validation.parallel import line_starts, scan_parallel
from tuneforge.errors import InvalidRequestError

BAD_ROLE = {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}


def test_long_line_is_reported_and_the_next_lines_still_checked(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(formats, "BLOCK_BYTES", 16)
    long_line = {"text": "x" * 500}
    data = jl({"text": "a"}, long_line, BAD_ROLE, {"text": "b"})
    report = validate_stream(io.BytesIO(data), filetype="jsonl", max_line_bytes=100)
    assert [(e.line, e.code) for e in report.errors] == [(2, "line_too_long"), (3, "format")]
    assert "longer than 100 bytes" in report.errors[0].message
    assert report.num_samples == 4


class _EndlessLine(io.RawIOBase):
    """A stream whose first line is `n` MiB long, then one good line; it never exists in memory at once."""

    def __init__(self, n: int) -> None:
        self.left, self.tail = n, b"\n" + jl({"text": "ok"})

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self.left:
            self.left -= 1
            return b"x" * (1 << 20)
        out, self.tail = self.tail, b""
        return out


def test_a_huge_line_is_skipped_in_bounded_memory():
    tracemalloc.start()
    report = validate_stream(_EndlessLine(64), filetype="jsonl", max_line_bytes=4 << 20)  # type: ignore[arg-type]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [(e.line, e.code) for e in report.errors] == [(1, "line_too_long")]
    assert report.num_samples == 2
    assert peak < 16 << 20


def test_errors_are_kept_in_file_order_up_to_max_and_all_counted(tmp_path: Path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(jl(*[CONV if i % 3 else BAD_ROLE for i in range(90)]))
    report = validate_path(path, max_errors=5)
    assert [e.line for e in report.errors] == [1, 4, 7, 10, 13]
    assert report.error_count == 30
    assert report.error_summary().endswith("(and 27 more errors)")


def test_an_undetectable_line_gives_one_error_only(tmp_path: Path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(jl({"mesages": [{"role": 5}], "weight": "x"}, CONV))
    report = validate_path(path)
    assert report.error_count == 1
    assert "could not detect" in report.errors[0].message
    assert report.dataset_format == "conversation"


def test_structural_purposes_skip_the_format_rules(tmp_path: Path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(jl(BAD_ROLE, {"anything": 1}, "[1]"))
    for purpose in ("eval", "batch-api", "calibration"):
        report = validate_path(path, purpose=purpose)
        assert [(e.line, e.code) for e in report.errors] == [(3, "line_type")], purpose
        assert report.dataset_format is None


def test_file_level_refusals_are_reports_not_exceptions(tmp_path: Path):
    assert validate_path(tmp_path / "missing.jsonl").errors[0].code == "not_found"
    (tmp_path / "e.jsonl").write_bytes(b"")
    assert validate_path(tmp_path / "e.jsonl").errors[0].code == "empty"
    (tmp_path / "d.txt").write_bytes(b"{}")
    assert validate_path(tmp_path / "d.txt").errors[0].code == "filetype"
    assert validate_stream(io.BytesIO(b"{}"), filetype="xml").errors[0].code == "filetype"
    with pytest.raises(InvalidRequestError):
        validate_path(tmp_path / "d.txt", purpose="fine_tune")


def _mixed_file(path: Path, n: int) -> None:
    rng = random.Random(n)
    records: list[object] = [{"foo": 1}, "", "[1]"]  # the format is only established on line 4
    for i in range(n):
        roll = rng.random()
        if roll < 0.02:
            records.append(BAD_ROLE)
        elif roll < 0.03:
            records.append({"text": "general, not conversation"})
        elif roll < 0.04:
            records.append(b'{"broken": ')
        elif roll < 0.1:
            records.append(
                {
                    "messages": [
                        {"role": "user", "content": "w"},
                        {
                            "role": "assistant",
                            "tool_calls": [
                                {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                            ],
                        },
                        {"role": "tool", "tool_call_id": "1", "content": "x"},
                        {"role": "assistant", "content": f"{i}"},
                    ]
                }
            )
        else:
            records.append(
                {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a", "weight": 1}]}
            )
    path.write_bytes(jl(*records))


@pytest.mark.parametrize("workers", [2, 3])
def test_parallel_ranges_give_the_same_report_as_one_pass(workers: int, tmp_path: Path):
    path = tmp_path / "d.jsonl"
    _mixed_file(path, 3000)
    size = path.stat().st_size
    assert len(line_starts(path, size, workers, 1 << 20)) == workers
    with path.open("rb") as f:
        one = scan(f.read, purpose="fine-tune", max_errors=1000, max_line_bytes=1 << 20)
    many = scan_parallel(path, size, workers=workers, purpose="fine-tune", max_errors=1000, max_line_bytes=1 << 20)
    assert many == one
    assert one.error_count > 50 and one.fmt == "conversation"
    with path.open("rb") as f:
        capped = scan(f.read, purpose="fine-tune", max_errors=7, max_line_bytes=1 << 20)
    many = scan_parallel(path, size, workers=workers, purpose="fine-tune", max_errors=7, max_line_bytes=1 << 20)
    assert many == capped


def test_a_range_child_process_answers(tmp_path: Path):
    from tuneforge.data.validation import parallel

    path = tmp_path / "d.jsonl"
    path.write_bytes(jl(CONV, BAD_ROLE))
    job = parallel._Job(str(path), 0, path.stat().st_size, "fine-tune", 5, 1 << 20, None)
    child = parallel._start(job)
    assert child is not None
    out, err = child.communicate()
    assert child.returncode == 0, err.decode()
    tally = parallel.msgspec.msgpack.decode(out, type=parallel.Tally)
    assert tally == parallel._scan_job(job)
    assert [e.line for e in tally.errors] == [2]


def test_validate_path_uses_the_parallel_scan_for_big_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from tuneforge.data.validation import validate

    path = tmp_path / "d.jsonl"
    _mixed_file(path, 2000)
    monkeypatch.setattr(validate, "PARALLEL_MIN_BYTES", 1)
    assert validate_path(path, workers=2) == validate_path(path, workers=1)


def test_parquet_reports_each_bad_row(tmp_path: Path):
    from data_cases import parquet_bytes

    path = tmp_path / "d.parquet"
    path.write_bytes(parquet_bytes({"input_ids": [[1, 2]] * 5, "labels": [[1, 2], [1], [1, 2], [1], [1]]}))
    report = validate_path(path)
    assert [(e.line, e.field) for e in report.errors] == [(2, "labels"), (4, "labels"), (5, "labels")]
    assert report.num_samples == 5 and report.dataset_format == "parquet"


def test_deep_nesting_is_an_error_not_a_crash():
    deep = b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"
    for purpose in ("fine-tune", "eval"):
        report = validate_stream(io.BytesIO(deep), filetype="jsonl", purpose=purpose)
        assert [(e.line, e.code) for e in report.errors] == [(1, "json")]
        assert "nested too deeply" in report.errors[0].message
    call = {"id": "1", "function": {"name": "f", "arguments": "[" * 100_000 + "]" * 100_000}}
    line = jl({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [call]}]})
    report = validate_stream(io.BytesIO(line), filetype="jsonl")
    assert report.errors[0].field == "messages[1].tool_calls[0].function.arguments"
