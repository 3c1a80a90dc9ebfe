"""Integration fixtures: the real app on real SQLite and a local blob folder, through FastAPI's TestClient."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient

from tuneforge.api.app import create_app
from tuneforge.settings import Settings
from tuneforge.store.keys import create_key


@dataclass
class Api:
    client: TestClient
    settings: Settings
    alice: dict[str, str]
    bob: dict[str, str]


@pytest.fixture
def api(tmp_path) -> Iterator[Api]:
    settings = Settings(home=tmp_path / "home")
    app = create_app(settings)
    with app.state.db.session() as s:
        _, alice = create_key(s, name="alice", owner="alice")
        _, bob = create_key(s, name="bob", owner="bob")
    with TestClient(app, base_url="http://testserver") as client:
        yield Api(client, settings, {"Authorization": f"Bearer {alice}"}, {"Authorization": f"Bearer {bob}"})
