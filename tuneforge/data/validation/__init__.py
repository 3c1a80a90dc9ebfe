"""Dataset validation: one implementation (`validate_stream` / `validate_path`) behind three faces.

The faces: `ValidationReport.to_wire` for the API's `validation_report`, `check_file` for the SDK-shaped
local report, `render_text` for the CLI. Knows no torch, no HTTP, no storage and no database.
"""

from tuneforge.data.validation.check import check_file
from tuneforge.data.validation.render import render_text
from tuneforge.data.validation.report import Issue, ValidationReport
from tuneforge.data.validation.validate import validate_path, validate_stream

__all__ = ["Issue", "ValidationReport", "check_file", "render_text", "validate_path", "validate_stream"]
