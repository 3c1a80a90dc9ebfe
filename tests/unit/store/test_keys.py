"""API keys: hashed at rest, shown once, revocable."""

import pytest

from tuneforge.errors import NotFoundError
from tuneforge.store import open_database
from tuneforge.store.keys import create_key, find_active_key, hash_key, list_keys, revoke_key
from tuneforge.store.tables import ApiKey


@pytest.fixture
def db(tmp_path):
    return open_database(f"sqlite:///{tmp_path / 'db.sqlite'}")


def test_key_is_stored_hashed_and_found_by_secret(db):
    with db.session() as s:
        row, secret = create_key(s, name="ci", owner="team-a")
    assert secret.startswith("tf-") and len(secret) > 40
    with db.session() as s:
        stored = s.get(ApiKey, row.id)
        assert stored.key_hash == hash_key(secret) != secret
        assert secret not in (stored.key_hash, stored.name, stored.prefix)
        assert find_active_key(s, secret=secret).owner == "team-a"
        assert find_active_key(s, secret=secret + "x") is None


def test_revoke_by_name_and_id(db):
    with db.session() as s:
        a, sa = create_key(s, name="a", owner="o")
        b, sb = create_key(s, name="b", owner="o")
    with db.session() as s:
        assert [r.id for r in revoke_key(s, key_id_or_name="a")] == [a.id]
        revoke_key(s, key_id_or_name=b.id)
    with db.session() as s:
        assert find_active_key(s, secret=sa) is None
        assert find_active_key(s, secret=sb) is None
        assert {r.revoked_at is not None for r in list_keys(s)} == {True}
        with pytest.raises(NotFoundError):
            revoke_key(s, key_id_or_name="a")


def test_migrations_are_idempotent(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    open_database(url).close()
    db = open_database(url)
    with db.session() as s:
        create_key(s, name="x", owner="x")
