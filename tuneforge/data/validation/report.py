"""The validation report: `Issue`, `ValidationReport`, the dataset flags and the wire form of a verdict.

Owns how a finding is named (code -> contract rule) and shown; knows nothing of how files are read or checked.
"""

from __future__ import annotations

from typing import Any

import msgspec

# Dataset flags, kept as one int bitmask while scanning because OR-ing ints is the cheapest merge.
MESSAGE_WEIGHTS = 1
SAMPLE_WEIGHTS = 2
TOOLS = 4
PARALLEL_TOOL_CALLS = 8
REASONING = 16
MULTIMODAL = 32

# Issue code -> the rule it breaks: the section 2.5 bullet of the wire contract, or "2.3 ..." for the
# structural checks that the SDK's own checker also makes, or "tuneforge limit" for our own guards.
RULES: dict[str, str] = {
    "not_found": "2.3 file",
    "empty": "2.3 file",
    "too_large": "2.3 file",
    "filetype": "2.3 file",
    "purpose": "2.3 file",
    "utf8": "2.3 JSONL",
    "json": "2.3 JSONL",
    "line_type": "2.3 JSONL",
    "csv": "2.3 CSV",
    "csv_columns": "2.3 CSV",
    "line_too_long": "tuneforge limit",
    "min_samples": "Sample count",
    "format": "Format detection",
    "value_type": "general / instruction",
    "messages": "messages list",
    "roles": "Roles",
    "alternation": "Alternation",
    "assistant": "Assistant presence",
    "weights": "Weights",
    "content": "Content shape",
    "images": "Images",
    "preference": "Preference",
    "tools": "Tools",
    "reasoning": "Reasoning",
    "parquet": "Parquet",
}

_WIRE_FORMATS = {
    "general": "GENERAL",
    "conversation": "CONVERSATION",
    "instruction": "INSTRUCTION",
    "preference_openai": "PREFERENCE_OPENAI",
    "parquet": "PARQUET",
}


class Issue(msgspec.Struct, frozen=True):
    """One finding: where it is (1-based file line or parquet row; JSON path) and what is wrong.

    `code` is a stable machine name; `RULES[code]` is the contract rule it breaks.
    """

    line: int | None
    field: str | None
    message: str
    code: str = "rule"

    def where(self) -> str:
        """`line 3, messages[1].role` (either part may be missing)."""
        parts = []
        if self.line is not None:
            parts.append(f"line {self.line}")
        if self.field:
            parts.append(self.field)
        return ", ".join(parts)

    def summary(self) -> str:
        where = self.where()
        return f"{where}: {self.message}" if where else self.message

    def to_dict(self) -> dict[str, Any]:
        return {"line": self.line, "field": self.field, "message": self.message, "code": self.code}


class ValidationReport(msgspec.Struct, kw_only=True):
    """The verdict on one dataset file. `errors` holds the first `max_errors` errors in file order."""

    valid: bool
    filetype: str | None = None
    purpose: str = "fine-tune"
    dataset_format: str | None = None
    num_samples: int = 0
    file_size: int | None = None
    has_message_weights: bool = False
    has_sample_weights: bool = False
    has_tools: bool = False
    has_parallel_tool_calls: bool = False
    has_reasoning: bool = False
    is_multimodal: bool = False
    errors: list[Issue] = msgspec.field(default_factory=list)
    warnings: list[Issue] = msgspec.field(default_factory=list)
    error_count: int = 0
    warning_count: int = 0
    error_codes: list[str] = msgspec.field(default_factory=list)  # every issue code seen, not only the kept ones

    def error_summary(self, limit: int = 3) -> str:
        """The first `limit` errors on one line, e.g. `line 3, messages[1].role: role "bot" is not ...`."""
        if not self.errors:
            return ""
        text = "; ".join(issue.summary() for issue in self.errors[:limit])
        more = self.error_count - min(limit, len(self.errors))
        if more > 0:
            text += f" (and {more} more error{'s' if more != 1 else ''})"
        return text

    def to_wire(self, file_id: str | None) -> dict[str, Any]:
        """The contract's `validation_report` object (section 1.2), plus `errors` as a list of issue dicts."""
        fmt = self.dataset_format
        wire: dict[str, Any] = {
            "valid": self.valid,
            "dataset_format": _WIRE_FORMATS.get(fmt, fmt.upper()) if fmt else None,
            "dataset_has_message_weights": self.has_message_weights,
            "dataset_has_sample_weights": self.has_sample_weights,
            "dataset_has_tools": self.has_tools,
            "dataset_has_parallel_tool_calls": self.has_parallel_tool_calls,
            "dataset_has_reasoning": self.has_reasoning,
            "dataset_is_multimodal": self.is_multimodal,
            "file_id": file_id,
            "nlines": self.num_samples,
        }
        if not self.valid:
            wire["error"] = self.error_summary() or "the file is not a valid dataset"
            wire["error_type"] = "INVALID_FORMAT"
        wire["errors"] = [issue.to_dict() for issue in self.errors]
        return wire


def flags_of(flags: int) -> dict[str, bool]:
    """The bitmask as `ValidationReport` keyword arguments."""
    return {
        "has_message_weights": bool(flags & MESSAGE_WEIGHTS),
        "has_sample_weights": bool(flags & SAMPLE_WEIGHTS),
        "has_tools": bool(flags & TOOLS),
        "has_parallel_tool_calls": bool(flags & PARALLEL_TOOL_CALLS),
        "has_reasoning": bool(flags & REASONING),
        "is_multimodal": bool(flags & MULTIMODAL),
    }
