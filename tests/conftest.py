"""Settings for the whole test session.

The hosted service's model names (`catalog/hosted.py`) are listed by default; the suite's servers and apps run
without them (TUNEFORGE_HOSTED_CATALOG=0), so that listing models, and "the first model", mean the tiny and
built-in models a test made, never an 8B model to download. The catalog's own tests turn them on.
"""

from __future__ import annotations

import os

os.environ["TUNEFORGE_HOSTED_CATALOG"] = "0"
