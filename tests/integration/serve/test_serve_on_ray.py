"""Model servers placed by Ray (`TUNEFORGE_EXECUTOR=ray`): the serverless pool and an endpoint's replicas start
each model server as a Ray job on a real local Ray cluster (tests/ray_support.py), with the memory it needs as the
job's resource request; the pool reaches it, it answers, and stopping it stops the Ray job."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import ray_support

from tuneforge.catalog.source import ModelSource
from tuneforge.serve.placement import RayProcess
from tuneforge.serve.pool import ModelServerPool, estimate_memory
from tuneforge.settings import Settings
from tuneforge.train.tiny_models import save_tiny_model

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> ModelSource:
    folder = save_tiny_model(tmp_path_factory.mktemp("ray-serve") / "llama", "llama")
    return ModelSource(name="tiny/llama", source_kind="local", source=str(folder))


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[ModelServerPool]:
    cluster = ray_support.cluster()
    settings = Settings(home=tmp_path / "home", serve_threads=1, serve_dtype="fp32", executor="ray",
                        ray_address=cluster.address)  # fmt: skip
    pool = ModelServerPool(settings)
    pool.start()
    try:
        yield pool
    finally:
        pool.shutdown()


def _jobs(address: str) -> dict[str, dict[str, object]]:
    from ray.job_submission import JobSubmissionClient

    return {j.submission_id: j.model_dump() for j in JobSubmissionClient(address).list_jobs() if j.submission_id}


def _chat(url: str, model: str) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3, "temperature": 0}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["message"]["content"])


def test_a_serverless_model_server_runs_as_a_ray_job_and_stops_with_it(pool: ModelServerPool, llama) -> None:
    size = sum(p.stat().st_size for p in Path(llama.source).glob("*.safetensors"))
    with pool.using(llama, size_hint=size) as server:
        assert isinstance(server.proc, RayProcess)
        assert isinstance(_chat(server.url, llama.name), str)
        job = _jobs(pool.settings.ray_address)[server.proc.submission_id]
        assert job["status"] == "RUNNING"
        assert job["metadata"]["memory"] == str(estimate_memory(llama, size))  # the pool's estimate, asked of Ray
        assert job["metadata"]["gpus"] == "0"
        assert server.log_path.stat().st_size > 0  # the server's output, in the pool's log file
    pool.shutdown()
    assert server.proc.wait(30) != 0 and not server.alive()
    assert _jobs(pool.settings.ray_address)[server.proc.submission_id]["status"] == "STOPPED"


def test_an_endpoint_replica_is_placed_by_ray(pool: ModelServerPool, llama) -> None:
    replica = pool.launch_replica("ep-1/0", llama, 200 << 20)
    try:
        assert isinstance(replica.proc, RayProcess)
        for _ in range(600):
            if pool.replica_ready(replica):
                break
            assert replica.alive(), replica.log_tail()
            import time

            time.sleep(0.1)
        assert replica.ready.is_set(), replica.log_tail()
        assert isinstance(_chat(replica.url, llama.name), str)
    finally:
        pool.stop_replica(replica)
    assert not replica.alive()


def test_ray_holds_a_model_server_back_until_a_node_has_the_memory_it_needs(pool: ModelServerPool, llama) -> None:
    """The memory is a real resource request: more than any node has, and Ray never starts the server."""
    huge = 1 << 44  # 16 TiB
    pool.settings.serve_memory_bytes = huge * 2  # the pool's own budget would allow it
    replica = pool.launch_replica("ep-huge/0", llama, huge)
    try:
        import time

        time.sleep(3)
        job = _jobs(pool.settings.ray_address)[replica.proc.submission_id]  # type: ignore[attr-defined]
        assert job["status"] == "PENDING" and not pool.replica_ready(replica), job
    finally:
        pool.stop_replica(replica)
