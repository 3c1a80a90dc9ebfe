"""Dataset validation: one implementation (`validate_stream` / `validate_path`) behind three faces.

The faces: `ValidationReport.to_wire` for the API's `validation_report`, `check_file` for the SDK-shaped
local report, `render_text` for the CLI. Knows no torch, no HTTP, no storage and no database.
"""

from tuneforge.data.check import check_file
from tuneforge.data.render import render_text
from tuneforge.data.report import Issue, ValidationReport
from tuneforge.data.validate import validate_path, validate_stream

__all__ = ["Issue", "ValidationReport", "check_file", "render_text", "validate_path", "validate_stream"]

# Tokenization and packing for training (chat templates, masking, best-fit packing); still no torch.
from tuneforge.data.chat import render_preview_row
from tuneforge.data.packing import PackedRow, pack_examples, position_ids_for
from tuneforge.data.preference import PreferenceExample, tokenize_preference_records
from tuneforge.data.tokenize import TokenizationReport, TokenizedExample, tokenize_blob, tokenize_records

__all__ += [
    "PackedRow",
    "PreferenceExample",
    "TokenizationReport",
    "TokenizedExample",
    "pack_examples",
    "position_ids_for",
    "render_preview_row",
    "tokenize_blob",
    "tokenize_preference_records",
    "tokenize_records",
]
