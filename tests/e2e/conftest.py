"""Fixtures for the end-to-end tests: real `tuneforge serve` subprocesses, keys made by the real CLI, datasets.

`server` is one server for the whole session (owners alice, bob and carol); `server_factory` starts fresh ones for
tests that stop or reconfigure a server. Every server is checked at teardown: one that died fails the run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_support import (
    INVALID_LINE,
    MAX_FILE_BYTES_SMALL,
    MAX_LINE_BYTES_SMALL,
    LiveServer,
    start_server,
    unique,
    valid_records,
    write_jsonl,
)
from together import Together


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One live server for the session, with an API key for each of alice, bob and carol."""
    root = tmp_path_factory.mktemp("server")
    srv = start_server(root / "home", root / "server.log")
    try:
        srv.create_keys(["alice", "bob", "carol"])
        yield srv
    finally:
        srv.finish()


@pytest.fixture(scope="session")
def small_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A server with tiny limits: files up to 1 MB, lines up to 64 KiB (for the oversize tests)."""
    root = tmp_path_factory.mktemp("small-server")
    env = {
        "TUNEFORGE_MAX_FILE_BYTES": str(MAX_FILE_BYTES_SMALL),
        "TUNEFORGE_MAX_LINE_BYTES": str(MAX_LINE_BYTES_SMALL),
    }
    srv = start_server(root / "home", root / "server.log", env=env)
    try:
        srv.create_keys(["alice"])
        yield srv
    finally:
        srv.finish()


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., LiveServer]]:
    """Start fresh servers (`factory(home=None, env=None)`); all are stopped, and checked, afterwards."""
    started: list[LiveServer] = []

    def factory(home: Path | None = None, env: dict[str, str] | None = None) -> LiveServer:
        home = home or tmp_path / "home"
        srv = start_server(home, tmp_path / f"server-{len(started)}.log", env=env)
        started.append(srv)
        return srv

    yield factory
    errors = []
    for srv in started:
        try:
            srv.finish()
        except BaseException as exc:  # report every server, not just the first
            errors.append(str(exc))
    if errors:
        pytest.fail("\n\n".join(errors), pytrace=False)


@pytest.fixture(scope="session")
def alice_key(server: LiveServer) -> str:
    return server.keys["alice"]


@pytest.fixture(scope="session")
def bob_key(server: LiveServer) -> str:
    return server.keys["bob"]


@pytest.fixture(scope="session")
def carol_key(server: LiveServer) -> str:
    """A third owner, for datasets that might break the server's checker: whatever state such a file ends
    in, it must not spoil alice's listing for the other tests."""
    return server.keys["carol"]


def _client(server: LiveServer, key: str) -> Together:
    # Strict parsing: a missing or mistyped required field fails here instead of reading as None.
    return server.client(key, _strict_response_validation=True)


@pytest.fixture(scope="session")
def alice(server: LiveServer, alice_key: str) -> Together:
    return _client(server, alice_key)


@pytest.fixture(scope="session")
def bob(server: LiveServer, bob_key: str) -> Together:
    return _client(server, bob_key)


@pytest.fixture
def alice_http(server: LiveServer, alice_key: str) -> Iterator[Any]:
    with server.http(alice_key) as http:
        yield http


@pytest.fixture
def bob_http(server: LiveServer, bob_key: str) -> Iterator[Any]:
    with server.http(bob_key) as http:
        yield http


@pytest.fixture
def anon_http(server: LiveServer) -> Iterator[Any]:
    with server.http() as http:
        yield http


@pytest.fixture
def valid_jsonl(tmp_path: Path) -> Path:
    """A valid conversational JSONL file (4 lines), unique per test so it never collides as a duplicate."""
    return write_jsonl(tmp_path / "train.jsonl", valid_records(4))


@pytest.fixture
def invalid_jsonl(tmp_path: Path) -> Path:
    """Well-formed JSONL (the SDK's structural check passes) whose line INVALID_LINE has the role 'human'."""
    records = valid_records(5)
    records[INVALID_LINE - 1]["messages"][1]["role"] = "human"
    path = write_jsonl(tmp_path / "bad_role.jsonl", records)
    assert '"human"' in path.read_text().splitlines()[INVALID_LINE - 1]
    return path


@pytest.fixture
def nonce() -> str:
    return unique()
