"""Human-readable text of a validation verdict, for `tuneforge check FILE`.

Takes a `ValidationReport` or one of its dict forms (`check_file`'s dict, `to_wire`'s); decides nothing.
"""

from __future__ import annotations

from typing import Any

from tuneforge.data.validation.report import ValidationReport

_FLAGS = (
    ("dataset_has_message_weights", "message weights"),
    ("dataset_has_sample_weights", "sample weights"),
    ("dataset_has_tools", "tools"),
    ("dataset_has_parallel_tool_calls", "parallel tool calls"),
    ("dataset_has_reasoning", "reasoning"),
    ("dataset_is_multimodal", "images (multimodal)"),
)


def render_text(report: ValidationReport | dict[str, Any]) -> str:
    """Several lines: the verdict with format and sample count, each kept error and warning, and the flags.

    Args:
        report: a `ValidationReport`, a `check_file` dict or a `to_wire` dict.

    Returns:
        The text, without a trailing newline.
    """
    d = _as_dict(report)
    ok = bool(d.get("is_check_passed", d.get("valid")))
    samples = d.get("num_samples", d.get("nlines"))
    filetype = d.get("filetype") if d.get("filetype") in ("jsonl", "parquet", "csv") else None
    facts = [x for x in (filetype, _lower(d.get("dataset_format"))) if x]
    if samples is not None:
        facts.append(f"{samples:,} sample{'s' if samples != 1 else ''}")
    errors = list(d.get("errors") or [])
    count = d.get("error_count") or len(errors)
    head = "OK     valid dataset" if ok else f"FAILED {count:,} error{'s' if count != 1 else ''}"
    lines = [head + (f" ({', '.join(facts)})" if facts else "")]
    if not ok and not errors and d.get("message"):
        lines.append(f"  {d['message']}")
    lines += [f"  {_issue_text(e)}" for e in errors]
    if count > len(errors):
        lines.append(f"  ... and {count - len(errors):,} more")
    warnings = list(d.get("warnings") or [])
    if warnings:
        lines.append("warnings:")
        lines += [f"  {_issue_text(w)}" for w in warnings]
        wcount = d.get("warning_count") or len(warnings)
        if wcount > len(warnings):
            lines.append(f"  ... and {wcount - len(warnings):,} more")
    flags = [name for key, name in _FLAGS if d.get(key)]
    if flags:
        lines.append(f"features: {', '.join(flags)}")
    return "\n".join(lines)


def _as_dict(report: ValidationReport | dict[str, Any]) -> dict[str, Any]:
    if isinstance(report, dict):
        return report
    d = report.to_wire(None)
    d.update(
        filetype=report.filetype,
        num_samples=report.num_samples,
        error_count=report.error_count,
        warning_count=report.warning_count,
        warnings=[w.to_dict() for w in report.warnings],
    )
    return d


def _lower(fmt: Any) -> str | None:
    return fmt.lower() if isinstance(fmt, str) else None


def _issue_text(issue: Any) -> str:
    if not isinstance(issue, dict):
        return str(issue)
    where = ", ".join(
        p for p in (f"line {issue['line']}" if issue.get("line") is not None else "", issue.get("field") or "") if p
    )
    return f"{where}: {issue.get('message', '')}" if where else str(issue.get("message", ""))
