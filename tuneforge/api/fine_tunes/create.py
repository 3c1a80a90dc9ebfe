"""`POST /fine-tunes`: the body becomes a checked `JobPlan` (`jobs/plan.py`), which the queue stores and queues.

An identical body from the same owner within `duplicate_job_window_s` returns the first job: the SDK retries a
POST after a timeout or a 5xx, and one click must not start two runs. The queue's unique idempotency key decides
even when the retries race each other.
"""

from __future__ import annotations

import hashlib
import json

from tuneforge.catalog.registry import Catalog
from tuneforge.data.formats import PREFERENCE_FORMATS
from tuneforge.jobs import queue
from tuneforge.jobs.plan import build_plan, byom_check
from tuneforge.jobs.request import FineTuneCreate
from tuneforge.settings import Settings
from tuneforge.storage import BlobStore
from tuneforge.store import Database
from tuneforge.store.tables import JobRow


def request_hash(body: FineTuneCreate) -> str:
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def create_job(
    db: Database, blobs: BlobStore, catalog: Catalog, settings: Settings, *, owner: str, body: FineTuneCreate
) -> tuple[JobRow, bool]:
    """Check the request and store the job as `queued`. Returns the job and whether it is new (False: a retry)."""
    with db.session() as s:
        planned = build_plan(s, blobs, catalog, owner=owner, body=body, wandb_base_urls=settings.wandb_base_urls)
    if planned.plan.byom:  # a hub repo outside the catalog: read before the job is queued
        conversational = planned.training_format in ("conversation", *PREFERENCE_FORMATS)
        byom_check(planned.plan, catalog, token=planned.secrets.get("hf_api_token"), conversational=conversational)
    return queue.enqueue(db, planned, owner=owner, request_hash=request_hash(body),
                         window_s=settings.duplicate_job_window_s)  # fmt: skip
