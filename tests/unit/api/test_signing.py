"""Signed upload URLs authorise exactly one file and part, until they expire."""

from urllib.parse import parse_qs

import pytest

from tuneforge.api.files.signing import signed_query, verify
from tuneforge.errors import PermissionDeniedError

SECRET = b"s3cret"


def _parts(query):
    q = parse_qs(query)
    return int(q["expires"][0]), q["sig"][0]


def test_signature_round_trip():
    expires, sig = _parts(signed_query(SECRET, "file-1", 0, 60))
    verify(SECRET, "file-1", 0, expires, sig)


@pytest.mark.parametrize(
    ("file_id", "part", "secret"), [("file-2", 0, SECRET), ("file-1", 1, SECRET), ("file-1", 0, b"other")]
)
def test_signature_binds_file_part_and_secret(file_id, part, secret):
    expires, sig = _parts(signed_query(SECRET, "file-1", 0, 60))
    with pytest.raises(PermissionDeniedError, match="signature"):
        verify(secret, file_id, part, expires, sig)


def test_expired_signature_is_refused():
    expires, sig = _parts(signed_query(SECRET, "file-1", 0, -5))
    with pytest.raises(PermissionDeniedError, match="expired"):
        verify(SECRET, "file-1", 0, expires, sig)
