"""`check_file`: the together SDK's local report dict (api-contract 2.2), filled in by tuneforge's full validation.

Owns the mapping from a `ValidationReport` onto the SDK's keys and their meanings; checks nothing itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tuneforge.data.validation.report import Issue, ValidationReport
from tuneforge.data.validation.validate import validate_path
from tuneforge.errors import InvalidRequestError

_STRUCTURAL = {"json", "line_type", "line_too_long"}
_CSV = {"csv", "csv_columns", "line_too_long"}


def check_file(path: str | Path, purpose: str = "fine-tune") -> dict[str, Any]:
    """Check a dataset file like `together.lib.utils.check_file`, but with every rule of api-contract 2.5.

    Args:
        path: the file; its suffix gives the file type.
        purpose: one of fine-tune, eval, calibration, batch-api.

    Returns:
        Every key of the SDK's report with the same meaning (`is_check_passed` is tuneforge's full verdict
        and `message` its first error, with line and field), plus `errors`, `warnings`, `error_count`,
        `dataset_format` and the `dataset_has_*` / `dataset_is_multimodal` flags.

    An unknown purpose is a failed check too (as an error in the report, not an exception).
    """
    p = Path(path)
    try:
        report = validate_path(p, purpose=purpose)
    except InvalidRequestError as exc:
        issue = Issue(None, "purpose", exc.message, "purpose")
        report = ValidationReport(valid=False, purpose=purpose, errors=[issue], error_count=1, error_codes=["purpose"])
    codes = set(report.error_codes)
    out: dict[str, Any] = {
        "is_check_passed": report.valid,
        "message": "Checks passed" if report.valid else report.error_summary(1),
        "found": p.is_file(),
        "file_size": report.file_size,
        "utf8": None,
        "line_type": None,
        "text_field": None,
        "key_value": None,
        "has_min_samples": None,
        "num_samples": None,
        "load_json": None,
        "load_csv": None,
    }
    first = report.errors[0] if report.errors else None
    if first is not None and first.line is not None:
        out["line_number"] = first.line
    if out["found"] and report.file_size is None:  # refused before the file was looked at (bad purpose)
        out["file_size"] = p.stat().st_size
    elif out["found"] and not codes & {"empty", "too_large"}:
        out["filetype"] = report.filetype or (first.message if first else None)
        _fill_content_keys(out, report.filetype, purpose, codes, report.num_samples, report.valid)
    wire = report.to_wire(None)
    for key in (
        "dataset_format",
        "dataset_has_message_weights",
        "dataset_has_sample_weights",
        "dataset_has_tools",
        "dataset_has_parallel_tool_calls",
        "dataset_has_reasoning",
        "dataset_is_multimodal",
        "errors",
    ):
        out[key] = wire[key]
    out["warnings"] = [issue.to_dict() for issue in report.warnings]
    out["error_count"] = report.error_count
    return out


def _fill_content_keys(
    out: dict[str, Any], filetype: str | None, purpose: str, codes: set[str], samples: int, valid: bool
) -> None:
    utf8 = "utf8" not in codes
    if filetype == "jsonl":
        out["utf8"] = utf8
        if utf8:
            # The SDK sets these three whenever the file decodes; line_type is whether every line is an object.
            out["text_field"] = out["key_value"] = True
            out["line_type"] = "line_type" not in codes
            out["load_json"] = not codes & _STRUCTURAL
            out["has_min_samples"], out["num_samples"] = samples >= 1, samples
    elif filetype == "csv" and purpose == "eval":
        out["utf8"] = utf8
        if utf8:
            out["load_csv"] = not codes & _CSV
            out["has_min_samples"], out["num_samples"] = samples >= 1, samples
            if "csv_columns" in codes:
                out["format"] = False
    elif filetype == "parquet" and purpose != "eval":
        out["has_min_samples"], out["num_samples"] = samples >= 1, samples
        if not valid:
            out["load_parquet"] = out["message"]
