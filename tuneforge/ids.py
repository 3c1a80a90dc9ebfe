"""Prefixed identifiers: `file-<uuid4>`, `ft-<uuid4>`, key and upload ids, and secret API keys."""

from __future__ import annotations

import secrets
import uuid

API_KEY_PREFIX = "tf-"


def new_file_id() -> str:
    return f"file-{uuid.uuid4()}"


def new_job_id() -> str:
    return f"ft-{uuid.uuid4()}"


def new_key_id() -> str:
    return f"key-{uuid.uuid4().hex[:16]}"


def new_upload_id() -> str:
    return f"upload-{uuid.uuid4().hex}"


def new_api_key() -> str:
    """A fresh secret API key: 256 bits of randomness behind a recognisable prefix."""
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def new_endpoint_id() -> str:
    return f"endpoint-{uuid.uuid4()}"
