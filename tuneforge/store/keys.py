"""API keys: create (returns the secret once), look up by secret, list, revoke. Keys are stored hashed."""

from __future__ import annotations

import hashlib
import time

from sqlalchemy import select
from sqlalchemy.orm import Session

from tuneforge.errors import NotFoundError
from tuneforge.ids import new_api_key, new_key_id
from tuneforge.store.tables import ApiKey


def hash_key(secret: str) -> str:
    # The secret carries 256 random bits, so a plain SHA-256 is enough: there is nothing to brute-force.
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(session: Session, *, name: str, owner: str) -> tuple[ApiKey, str]:
    """Store a new key for `owner`; returns the row and the secret, which is never stored."""
    secret = new_api_key()
    row = ApiKey(
        id=new_key_id(),
        name=name,
        owner=owner,
        key_hash=hash_key(secret),
        prefix=secret[:7],
        created_at=time.time(),
        revoked_at=None,
    )
    session.add(row)
    session.flush()
    return row, secret


def find_active_key(session: Session, *, secret: str) -> ApiKey | None:
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(secret)))
    if row is None or row.revoked_at is not None:
        return None
    return row


def key_is_active(session: Session, *, key_id: str) -> bool:
    """Whether the key exists and is not revoked (what a URL it signed needs, every time it is used)."""
    row = session.get(ApiKey, key_id)
    return row is not None and row.revoked_at is None


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.created_at)))


def revoke_key(session: Session, *, key_id_or_name: str) -> list[ApiKey]:
    """Revoke the key with this id, or every active key with this name."""
    rows = list(
        session.scalars(
            select(ApiKey).where(
                ((ApiKey.id == key_id_or_name) | (ApiKey.name == key_id_or_name)) & ApiKey.revoked_at.is_(None)
            )
        )
    )
    if not rows:
        raise NotFoundError(f"no active API key with id or name {key_id_or_name!r}")
    now = time.time()
    for row in rows:
        row.revoked_at = now
    return rows
