"""Datasets, torch-free, in the order a file flows: `validation` checks an uploaded file, `tokenization` turns a
checked one into training examples.

Re-exports the public API of both (`check_file`, `validate_path`, `tokenize_blob`, ...).
"""

from tuneforge.data.tokenization import (
    PackedRow,
    PreferenceExample,
    TokenizationReport,
    TokenizedExample,
    pack_examples,
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
    "PackedRow",
    "PreferenceExample",
    "TokenizationReport",
    "TokenizedExample",
    "ValidationReport",
    "check_file",
    "pack_examples",
    "render_preview_row",
    "render_text",
    "tokenize_blob",
    "tokenize_preference_records",
    "tokenize_records",
    "validate_path",
    "validate_stream",
]
