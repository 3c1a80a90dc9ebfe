"""Settings for the whole test session.

The hosted service's model names (`catalog/hosted.py`) are listed by default; the suite's servers and apps run
without them (TUNEFORGE_HOSTED_CATALOG=0), so that listing models, and "the first model", mean the tiny and
built-in models a test made, never an 8B model to download. The catalog's own tests turn them on.
"""

from __future__ import annotations

import os

os.environ["TUNEFORGE_HOSTED_CATALOG"] = "0"


# PostgreSQL mode (TUNEFORGE_TEST_DATABASE=postgresql, `make test`'s second run): each home's metadata lives in its
# own database on the session's PostgreSQL server (`pg_support.py`), for tests in this process and the `tuneforge`
# processes they start alike.
import pg_support

if pg_support.enabled():
    import tuneforge.settings

    tuneforge.settings.default_database_url = pg_support.database_url
