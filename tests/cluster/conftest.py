"""The cluster tests start real servers as the end-to-end tests do: they use the e2e helpers (`tests/e2e`)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "e2e"))
