"""`check_file` against the together SDK's own checker: never laxer, extra rejections only by a named 2.5
rule, every SDK report key present; and `render_text` / `to_wire` show line and field."""

from __future__ import annotations

from pathlib import Path

import pytest
from data_cases import BAD, CONTRACT_2_5_RULES, GOOD, Case, jl
from together.lib.utils.files import check_file as sdk_check_file

from tuneforge.data import check_file, render_text, validate_path
from tuneforge.data.validation.report import RULES

# Structural cases beyond the good and bad tables: (name, bytes, suffix, purpose).
STRUCTURAL = [
    Case("array_lines", b"[1]\n[2]\n"),
    Case("number_line", jl({"text": "a"}, "42")),
    Case("blank_lines_only_ws", b"\t\n \n"),
    Case("latin1_file", "caf\u00e9\n".encode("latin-1")),
    Case("bad_suffix_json", jl({"text": "a"}), suffix=".json"),
    Case("no_suffix", jl({"text": "a"}), suffix=""),
    Case("empty_csv_eval", b"", suffix=".csv", purpose="eval"),
    Case("eval_csv_latin1", "a,b\ncaf\u00e9,1\n".encode("latin-1"), suffix=".csv", purpose="eval"),
    Case("eval_jsonl_array", b"[1]\n", purpose="eval"),
    Case("calibration_any_object", jl({"x": 1}), purpose="calibration"),
    Case("no_trailing_newline", b'{"text": "a"}\n{"text": "b"}'),
    Case("surrogate_escape", b'{"text": "\\ud800"}\n'),
]
CORPUS = GOOD + BAD + STRUCTURAL


@pytest.mark.parametrize("case", CORPUS, ids=[c.name for c in CORPUS])
def test_never_laxer_than_the_sdk_and_extra_rejections_name_a_rule(case: Case, tmp_path: Path):
    path = case.write(tmp_path)
    sdk = sdk_check_file(path, purpose=case.purpose)
    ours = check_file(path, purpose=case.purpose)
    if not sdk["is_check_passed"]:
        assert not ours["is_check_passed"], f"the SDK rejects it ({sdk['message']}) but tuneforge passes it"
    elif not ours["is_check_passed"]:
        first = validate_path(path, purpose=case.purpose).errors[0]
        assert case.rule in CONTRACT_2_5_RULES, f"tuneforge alone rejects it ({ours['message']}) without a 2.5 rule"
        assert RULES[first.code] == case.rule
    if case.rule is not None:
        assert sdk["is_check_passed"], "annotated as tuneforge-only, yet the SDK rejects it too"


@pytest.mark.parametrize("case", CORPUS, ids=[c.name for c in CORPUS])
def test_report_has_every_sdk_key(case: Case, tmp_path: Path):
    path = case.write(tmp_path)
    sdk = sdk_check_file(path, purpose=case.purpose)
    ours = check_file(path, purpose=case.purpose)
    assert set(sdk) <= set(ours), set(sdk) - set(ours)
    for key in ("found", "file_size", "utf8", "line_type", "text_field", "key_value", "load_json"):
        if key in sdk and sdk["is_check_passed"] == ours["is_check_passed"]:
            assert ours[key] == sdk[key], key
    if sdk.get("filetype") in ("jsonl", "parquet", "csv"):
        assert ours["filetype"] == sdk["filetype"]
    elif "filetype" in sdk:  # the SDK puts its error text there for an unknown suffix; so do we
        assert "extension" in ours["filetype"]
    for key in ("errors", "warnings", "dataset_format", "dataset_has_tools", "dataset_is_multimodal"):
        assert key in ours


def test_check_file_message_names_line_and_field(tmp_path: Path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(jl({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}))
    report = check_file(path)
    assert report["is_check_passed"] is False
    assert report["message"] == 'line 1, messages[1].role: role "bot" is not one of system, user, assistant, tool'
    assert report["line_number"] == 1
    assert report["errors"][0]["field"] == "messages[1].role"
    assert report["load_json"] is True and report["line_type"] is True


def test_check_file_passes_a_good_file_like_the_sdk(tmp_path: Path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(jl({"text": "a"}, {"text": "b"}))
    ours, sdk = check_file(path), sdk_check_file(path)
    assert ours["message"] == sdk["message"] == "Checks passed"
    assert {k: ours[k] for k in sdk} == sdk
    assert ours["dataset_format"] == "GENERAL"


def test_render_text_shows_line_field_and_count(tmp_path: Path):
    path = tmp_path / "d.jsonl"
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x", "weight": 2}]}
    path.write_bytes(
        jl({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}, bad, bad)
    )
    for face in (validate_path(path, max_errors=1), check_file(path)):
        text = render_text(face)
        assert "FAILED 2 errors" in text
        assert "line 2, messages[1].weight: weight must be 0 or 1, got 2" in text
    assert "... and 1 more" in render_text(validate_path(path, max_errors=1))


def test_render_text_of_a_valid_report(tmp_path: Path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(
        jl({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x", "weight": 1}]})
    )
    text = render_text(validate_path(path))
    assert text.startswith("OK")
    assert "conversation" in text and "1 sample" in text and "message weights" in text


def test_to_wire_is_the_contract_validation_report(tmp_path: Path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(jl({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}]}))
    wire = validate_path(path).to_wire("file-123")
    assert wire["valid"] is False and wire["error_type"] == "INVALID_FORMAT"
    assert wire["file_id"] == "file-123" and wire["nlines"] == 1
    assert wire["dataset_format"] == "CONVERSATION"
    assert "line 1, messages[1].role" in wire["error"]
    assert wire["errors"][0]["line"] == 1
    good = tmp_path / "g.jsonl"
    good.write_bytes(jl({"text": "a"}))
    wire = validate_path(good).to_wire(None)
    assert wire["valid"] is True and "error" not in wire and "error_type" not in wire
    assert wire["dataset_format"] == "GENERAL" and wire["dataset_has_tools"] is False


def test_an_unknown_purpose_fails_the_check_without_raising(tmp_path: Path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(jl({"text": "a"}))
    report = check_file(path, purpose="fine_tune")
    assert report["is_check_passed"] is False and report["found"] is True
    assert "purpose" in report["message"] and report["errors"][0]["field"] == "purpose"
