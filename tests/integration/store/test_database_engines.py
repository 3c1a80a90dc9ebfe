"""The metadata store on the database this run uses (SQLite, or PostgreSQL under TUNEFORGE_TEST_DATABASE=postgresql):
servers that start together migrate one empty database once, without a failure; on a database server, the pool is
the size the setting says and replaces connections the server closed."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pg_support
import pytest
from sqlalchemy import text

from tuneforge.settings import Settings
from tuneforge.store import open_database


def test_servers_starting_together_migrate_once(tmp_path: Path) -> None:
    """Four processes open one empty database at once (each waits for a shared start time, then migrates)."""
    (tmp_path / "shared").mkdir()
    url = pg_support.database_url(tmp_path / "shared")
    start_at = time.time() + 3  # past every process's imports
    script = ("import sys, time; from tuneforge.store import open_database; "
              "time.sleep(max(0.0, float(sys.argv[2]) - time.time())); open_database(sys.argv[1]).close()")  # fmt: skip
    procs = [subprocess.Popen([sys.executable, "-c", script, url, str(start_at)], stderr=subprocess.PIPE)
             for _ in range(4)]  # fmt: skip
    errors = []
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        if proc.returncode != 0:
            errors.append(err.decode()[-2000:])
    assert errors == []
    db = open_database(url)
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar_one() == 1
    db.close()


@pytest.mark.skipif(not pg_support.enabled(), reason="a pool of connections to a database server (PostgreSQL)")
def test_the_pool_is_sized_by_the_setting_and_survives_a_server_side_disconnect(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TUNEFORGE_DATABASE_POOL_SIZE", "3")
    settings = Settings(home=tmp_path / "home")
    assert settings.database_pool_size == 3 and settings.database_url.startswith("postgresql")
    db = open_database(settings.database_url, pool_size=settings.database_pool_size)
    assert db.engine.pool.size() == 3  # type: ignore[attr-defined]
    with db.engine.connect() as conn:
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
    with pg_support.server().connect() as admin:  # the server drops the pooled connection (a restart, a failover)
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    with db.engine.connect() as conn:  # pre-ping notices and replaces it
        assert conn.execute(text("SELECT 1")).scalar_one() == 1
    db.close()
