"""Signed upload URLs: the upload PUTs carry no API key, so the URL itself authorises one file (and part)."""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from urllib.parse import urlencode

from tuneforge.errors import PermissionDeniedError


def _mac(secret: bytes, file_id: str, part: int, expires: int) -> str:
    msg = f"{file_id}:{part}:{expires}".encode()
    return hmac.new(secret, msg, hashlib.sha256).hexdigest()


def signed_query(secret: bytes, file_id: str, part: int, ttl_s: int) -> str:
    expires = int(time.time()) + ttl_s
    return urlencode({"expires": expires, "sig": _mac(secret, file_id, part, expires)})


_SIG_RE = re.compile(r"[0-9a-f]{64}")


def verify(secret: bytes, file_id: str, part: int, expires: int, sig: str) -> None:
    """Raise PermissionDeniedError unless `sig` signs this file and part and has not expired.

    The signature is checked for its form first (64 lowercase hex digits) and compared as bytes: a client's odd
    `sig` is a 403 like any wrong one, never an exception (`compare_digest` raises on non-ASCII text)."""
    expected = _mac(secret, file_id, part, expires).encode()
    if not _SIG_RE.fullmatch(sig) or not hmac.compare_digest(expected, sig.encode()):
        raise PermissionDeniedError("upload URL signature is invalid for this file")
    if expires < time.time():
        raise PermissionDeniedError("upload URL has expired; start the upload again")
