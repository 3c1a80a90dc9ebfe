"""Fencing a run against a takeover it cannot see: a worker that takes a job over from a worker on another host
cannot stop that worker's run, which may still be training. Each start writes the job's spec (with its attempt) to
the blob store; a run checks it before it publishes anything, and stops once a later attempt exists, so the two
runs never both write the job's checkpoints or outputs. Torch-free.
"""

from __future__ import annotations

import json
from typing import Any

from tuneforge.errors import NotFoundError
from tuneforge.storage.layout import spec_key


class Superseded(Exception):
    """Another attempt of this job started since this run did (a worker took the job over while this run was out
    of its sight, on another host): this run must not publish anything more under the job's prefix."""


def check_current(blobs: Any, job_id: str, attempt: int) -> None:
    """Raise Superseded when the job's current spec (`spec_key`, written by the worker at each start) belongs to a
    later attempt than `attempt`. A run without one (standalone, no server) is always current."""
    try:
        with blobs.open(spec_key(job_id)) as fh:
            current = json.loads(fh.read()).get("attempt")
    except (NotFoundError, ValueError, AttributeError):
        return
    if isinstance(current, int) and current > attempt:
        raise Superseded(
            f"attempt {current} of job {job_id} started since this run (attempt {attempt}) did; this run "
            "stops without publishing"
        )
