"""Datasets, torch-free, in the order a file flows: `validation` checks an uploaded file, `tokenization` turns a
checked one into training examples.

Re-exports the public API of both (`check_file`, `validate_path`, `tokenize_blob`, ...).
"""

from tuneforge.data.tokenization import (
    PreferenceExample,
    TokenizationReport,
    TokenizedExample,
    render_preview_row,
    tokenize_blob,
    tokenize_preference_records,
    tokenize_records,
)
from tuneforge.data.validation import (
    Issue,
    ValidationReport,
    check_file,
    render_text,
    validate_path,
    validate_stream,
)

__all__ = [
    "Issue",
    "PreferenceExample",
    "TokenizationReport",
    "TokenizedExample",
    "ValidationReport",
    "check_file",
    "render_preview_row",
    "render_text",
    "tokenize_blob",
    "tokenize_preference_records",
    "tokenize_records",
    "validate_path",
    "validate_stream",
]
