"""Engine, sessions and migrations. The only module that knows which database is behind the URL."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from tuneforge.store import jobs as jobs_repo
from tuneforge.store.sealing import Sealer, ephemeral_sealer

MIGRATIONS = Path(__file__).parent / "migrations"
# The PostgreSQL advisory lock a migration holds for its transaction (any constant of our own: "tuneforg" in ASCII).
MIGRATION_LOCK = int.from_bytes(b"tuneforg", "big") & (2**63 - 1)
_MIGRATING = threading.Lock()


class Database:
    """A migrated database and a session factory."""

    def __init__(self, url: str, *, secrets_key: bytes | None = None, pool_size: int = 10) -> None:
        self.url = url
        # Seals job secrets at rest (store/sealing.py); without a key, one that lives only in this process.
        self.sealer = Sealer(secrets_key) if secrets_key else ephemeral_sealer()
        kwargs: dict[str, Any] = {"future": True}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        else:  # a database server: a bounded pool, and connections it closed (a restart, a failover) are replaced
            kwargs.update(pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True, pool_recycle=1800)
        self.engine: Engine = create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def migrate(self) -> None:
        """Bring the schema to the newest revision (alembic upgrade head). Processes that start together on one
        database migrate one after the other (a PostgreSQL advisory lock, or a lock file beside a SQLite file), and
        so do threads (alembic's context is global to the process)."""
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with _MIGRATING, self._file_lock(), self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    @contextmanager
    def _file_lock(self) -> Iterator[None]:
        """An exclusive lock on `<sqlite file>.migrate-lock` (nothing for other databases)."""
        database = self.engine.url.database
        if self.engine.dialect.name != "sqlite" or database in (None, "", ":memory:"):
            yield
            return
        import fcntl

        fd = os.open(f"{database}.migrate-lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

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


def open_database(url: str, *, secrets_key: bytes | None = None, pool_size: int = 10) -> Database:
    """The database at `url`, migrated; a SQLite file (and its WAL and shared-memory files) readable by its owner
    only. `pool_size`: connections kept open to a database server (TUNEFORGE_DATABASE_POOL_SIZE)."""
    db = Database(url, secrets_key=secrets_key, pool_size=pool_size)
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
