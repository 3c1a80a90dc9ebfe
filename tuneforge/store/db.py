"""Engine, sessions and migrations. The only module that knows which database is behind the URL."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from tuneforge.store import jobs as jobs_repo
from tuneforge.store.sealing import Sealer, ephemeral_sealer

MIGRATIONS = Path(__file__).parent / "migrations"


class Database:
    """A migrated database and a session factory."""

    def __init__(self, url: str, *, secrets_key: bytes | None = None) -> None:
        self.url = url
        # Seals job secrets at rest (store/sealing.py); without a key, one that lives only in this process.
        self.sealer = Sealer(secrets_key) if secrets_key else ephemeral_sealer()
        kwargs: dict[str, Any] = {"future": True}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        self.engine: Engine = create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def migrate(self) -> None:
        """Bring the schema to the newest revision (alembic upgrade head)."""
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with self.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on error."""
        with self._sessions() as s:
            s.info["sealer"] = self.sealer
            try:
                yield s
                s.commit()
            except BaseException:
                s.rollback()
                raise

    def close(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    # A deleted or overwritten row is zeroed on disk, so a cleared or re-sealed secret leaves no readable copy.
    cur.execute("PRAGMA secure_delete=ON")
    cur.close()


def open_database(url: str, *, secrets_key: bytes | None = None) -> Database:
    """The database at `url`, migrated; a SQLite file (and its WAL and shared-memory files) readable by its owner
    only."""
    db = Database(url, secrets_key=secrets_key)
    db.migrate()
    with db.session() as s:
        resealed = jobs_repo.seal_plain_secrets(s)
    if resealed and db.engine.dialect.name == "sqlite":
        with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:  # old pages leave the WAL
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    if db.engine.dialect.name == "sqlite" and db.engine.url.database not in (None, "", ":memory:"):
        path = str(db.engine.url.database)
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.chmod(path + suffix, 0o600)
    return db
