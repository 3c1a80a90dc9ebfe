"""The slow tests reuse the end-to-end helpers (a live `tuneforge serve`, keys, jobs): make them importable."""

import sys
from pathlib import Path

E2E = Path(__file__).resolve().parents[1] / "e2e"
if str(E2E) not in sys.path:
    sys.path.insert(0, str(E2E))
