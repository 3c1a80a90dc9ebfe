"""Prefixed identifiers (`file-<uuid4>`, `ft-<uuid4>`, API keys) and their shapes."""

from __future__ import annotations

import re
import secrets
import uuid

FILE_ID_RE = re.compile(r"^file-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
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


def is_file_id(value: str) -> bool:
    return bool(FILE_ID_RE.match(value))
