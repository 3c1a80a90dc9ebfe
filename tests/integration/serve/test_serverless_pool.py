"""The serverless pool with real model servers (`python -m tuneforge.serve`, the transformers engine, tiny models):
a server starts on first use and answers; an idle one is stopped; the memory budget stops the least recently used
idle server to make room, and refuses (503) when only busy ones hold it; a server that died is started again."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tuneforge.catalog.source import ModelSource
from tuneforge.serve.pool import ModelServerPool, PoolError, estimate_memory
from tuneforge.settings import Settings
from tuneforge.train.tiny_models import save_tiny_model

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> list[ModelSource]:
    root = tmp_path_factory.mktemp("pool-models")
    return [
        ModelSource(name=f"tiny/{arch}", source_kind="local", source=str(save_tiny_model(root / arch, arch)))
        for arch in ("llama", "qwen3")
    ]


def _size(source: ModelSource) -> int:
    return sum(p.stat().st_size for p in Path(source.source).glob("*.safetensors"))


@pytest.fixture
def make_pool(tmp_path: Path) -> Iterator[object]:
    pools: list[ModelServerPool] = []

    def make(**settings: object) -> ModelServerPool:
        pool = ModelServerPool(Settings(home=tmp_path / "home", serve_threads=1, serve_dtype="fp32", **settings))
        pool.start()
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.shutdown()


def _chat(url: str, model: str) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3, "temperature": 0}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["message"]["content"])


def test_a_server_starts_on_first_use_answers_and_stops_when_idle(make_pool, sources) -> None:
    pool = make_pool(serve_idle_s=1.0)
    llama = sources[0]
    with pool.using(llama, size_hint=_size(llama)) as server:
        assert isinstance(_chat(server.url, llama.name), str)
        time.sleep(1.5)
        assert server.alive(), "a server in use was stopped as idle"
    deadline = time.monotonic() + 10
    while server.alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not server.alive() and pool.servers() == []


def test_the_budget_stops_the_least_recently_used_idle_server_and_refuses_when_all_are_busy(make_pool, sources) -> None:
    llama, qwen = sources
    one = max(estimate_memory(s, _size(s)) for s in sources)
    pool = make_pool(serve_memory_bytes=one + one // 2)  # room for one server, not two
    with pool.using(llama, size_hint=_size(llama)) as first:
        with pytest.raises(PoolError) as refused:
            pool.acquire(qwen, size_hint=_size(qwen))
        assert refused.value.status_code == 503 and "busy" in refused.value.message
    with pool.using(qwen, size_hint=_size(qwen)) as second:
        assert _chat(second.url, qwen.name) is not None
        assert not first.alive(), "the idle server was not stopped to make room"
        assert [s.key for s in pool.servers()] == [qwen.name]


def test_a_model_over_the_whole_budget_is_refused_and_a_dead_server_is_replaced(make_pool, sources) -> None:
    llama = sources[0]
    pool = make_pool(serve_memory_bytes=1 << 20)
    with pytest.raises(PoolError) as refused:
        pool.acquire(llama, size_hint=_size(llama))
    assert refused.value.status_code == 507 and "budget" in refused.value.message

    pool = make_pool()
    with pool.using(llama, size_hint=_size(llama)) as server:
        pass
    server.proc.kill()
    server.proc.wait(10)
    with pool.using(llama, size_hint=_size(llama)) as again:
        assert again.proc.pid != server.proc.pid and _chat(again.url, llama.name) is not None
