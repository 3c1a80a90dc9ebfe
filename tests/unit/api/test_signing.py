"""Signed upload URLs authorise exactly one file and part, on behalf of one API key, until they expire or the key
is revoked."""

from urllib.parse import parse_qs

import pytest

from tuneforge.api.files.signing import signed_query, verify
from tuneforge.errors import PermissionDeniedError
from tuneforge.store import open_database
from tuneforge.store.keys import create_key, revoke_key

SECRET = b"s3cret"


@pytest.fixture
def db(tmp_path):
    return open_database(f"sqlite:///{tmp_path / 'db.sqlite'}")


@pytest.fixture
def key_id(db) -> str:
    with db.session() as s:
        row, _ = create_key(s, name="k", owner="alice")
        return str(row.id)


def _parts(query):
    q = parse_qs(query)
    return int(q["expires"][0]), q["sig"][0], q["kid"][0]


def test_signature_round_trip(db, key_id):
    expires, sig, kid = _parts(signed_query(SECRET, "file-1", 0, 60, key_id=key_id))
    assert kid == key_id
    verify(db, SECRET, "file-1", 0, expires, sig, kid)


@pytest.mark.parametrize(
    ("file_id", "part", "secret"), [("file-2", 0, SECRET), ("file-1", 1, SECRET), ("file-1", 0, b"other")]
)
def test_signature_binds_file_part_and_secret(db, key_id, file_id, part, secret):
    expires, sig, kid = _parts(signed_query(SECRET, "file-1", 0, 60, key_id=key_id))
    with pytest.raises(PermissionDeniedError, match="signature"):
        verify(db, secret, file_id, part, expires, sig, kid)


def test_signature_binds_the_key_that_made_it(db, key_id):
    with db.session() as s:
        other, _ = create_key(s, name="other", owner="bob")
    expires, sig, _ = _parts(signed_query(SECRET, "file-1", 0, 60, key_id=key_id))
    with pytest.raises(PermissionDeniedError, match="signature"):
        verify(db, SECRET, "file-1", 0, expires, sig, str(other.id))


def test_expired_signature_is_refused(db, key_id):
    expires, sig, kid = _parts(signed_query(SECRET, "file-1", 0, -5, key_id=key_id))
    with pytest.raises(PermissionDeniedError, match="expired"):
        verify(db, SECRET, "file-1", 0, expires, sig, kid)


def test_revoking_the_key_ends_the_urls_it_signed(db, key_id):
    expires, sig, kid = _parts(signed_query(SECRET, "file-1", 0, 60, key_id=key_id))
    with db.session() as s:
        revoke_key(s, key_id_or_name=key_id)
    with pytest.raises(PermissionDeniedError, match="revoked"):
        verify(db, SECRET, "file-1", 0, expires, sig, kid)


@pytest.mark.parametrize("odd", ["é" * 64, "\u00ff", "0" * 65, "A" * 64, ""])
def test_an_odd_signature_is_a_refusal_not_an_exception(db, key_id, odd):
    expires, _, kid = _parts(signed_query(SECRET, "file-1", 0, 60, key_id=key_id))
    with pytest.raises(PermissionDeniedError, match="signature"):
        verify(db, SECRET, "file-1", 0, expires, odd, kid)
