"""Signed upload URLs: the upload PUTs carry no API key, so the URL itself authorises one file (and part)."""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from urllib.parse import urlencode

from tuneforge.errors import PermissionDeniedError
from tuneforge.store import Database
from tuneforge.store import keys as keys_repo


def _mac(secret: bytes, file_id: str, part: int, expires: int, key_id: str) -> str:
    msg = f"{file_id}:{part}:{expires}:{key_id}".encode()
    return hmac.new(secret, msg, hashlib.sha256).hexdigest()


def signed_query(secret: bytes, file_id: str, part: int, ttl_s: int, *, key_id: str) -> str:
    """The query of a URL that authorises one file (and part) for `ttl_s`, on behalf of the API key `key_id`."""
    expires = int(time.time()) + ttl_s
    return urlencode({"expires": expires, "kid": key_id, "sig": _mac(secret, file_id, part, expires, key_id)})


_SIG_RE = re.compile(r"[0-9a-f]{64}")


def verify(db: Database, secret: bytes, file_id: str, part: int, expires: int, sig: str, key_id: str) -> None:
    """Raise PermissionDeniedError unless `sig` signs this file and part for `key_id`, has not expired, and the key
    that made it is still active: revoking a key ends every URL it signed.

    The signature is checked for its form first (64 lowercase hex digits) and compared as bytes: a client's odd
    `sig` is a 403 like any wrong one, never an exception (`compare_digest` raises on non-ASCII text)."""
    expected = _mac(secret, file_id, part, expires, key_id).encode()
    if not _SIG_RE.fullmatch(sig) or not hmac.compare_digest(expected, sig.encode()):
        raise PermissionDeniedError("upload URL signature is invalid for this file")
    if expires < time.time():
        raise PermissionDeniedError("upload URL has expired; start the upload again")
    with db.session() as s:
        if not keys_repo.key_is_active(s, key_id=key_id):
            raise PermissionDeniedError("the API key that made this URL was revoked; ask for a new URL")
