"""bench/scale_out.py's claim race, small: workers in processes of their own drain a queue on a real PostgreSQL
server (`FOR UPDATE SKIP LOCKED`), every job claimed exactly once, and the store names each one's claimer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)
BENCH = Path(__file__).resolve().parents[3] / "bench" / "scale_out.py"


def test_four_workers_drain_the_queue_and_no_job_is_claimed_twice() -> None:
    done = subprocess.run([sys.executable, str(BENCH), "--claims-only", "--jobs", "120", "--workers", "4"],
                          capture_output=True, text=True, timeout=240)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])

    assert figures["claims"] == 120 and figures["double_claims"] == 0 and figures["workers"] == 4
    assert figures["claims_per_s"] > 0
