"""The chat proxy's work per request (`api/inference/router.py`), through the real app on a loopback port and real
model-server processes: the vLLM stand-in (`tests/vllm_standin.py`, which logs every load request it receives) and
tuneforge's own model server (`python -m tuneforge.serve`, the transformers engine on the tiny llama).

An adapter is checked once and loaded once per model-server process, even by concurrent first requests; a process
started in place of one that died loads it again; an adapter unloaded behind the proxy's back is loaded again; a
refused adapter is refused on every request. The LoRA job is made through the real routes (upload, create) and
finished the way the worker leaves one (the store's transitions, real peft adapters under the blob layout's
prefixes).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from serve_support import make_adapter

from tuneforge.api.app import create_app
from tuneforge.api.inference import router, service
from tuneforge.catalog.entries import ModelEntry
from tuneforge.serve.pool import ModelProcess
from tuneforge.settings import Settings
from tuneforge.storage.layout import checkpoint_prefix, final_prefix
from tuneforge.store import jobs as repo
from tuneforge.store.keys import create_key

pytestmark = pytest.mark.timeout(180)

STANDIN = Path(__file__).resolve().parents[2] / "vllm_standin.py"
BASE = "tiny/llama"
BAD_STEP = 10
RECORDS = [
    {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"}, {"role": "assistant", "content": str(2 * i)}]}
    for i in range(8)
]


@dataclass
class Live:
    """The app serving on a loopback port, alice's key, and her completed LoRA job (a good final adapter, a refused
    intermediate checkpoint at BAD_STEP)."""

    app: FastAPI
    url: str
    headers: dict[str, str]
    job_id: str = ""

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=120)

    def chat(self, model: str, *, stream: bool = False) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 8,
                "temperature": 0, "stream": stream}  # fmt: skip
        with self.http() as http:
            return http.post("/v1/chat/completions", json=body)

    def server(self) -> ModelProcess:
        (server,) = self.app.state.pool.servers()
        return server


@contextlib.contextmanager
def _serving(home: Path, base_dir: Path, **fields: Any) -> Iterator[Live]:
    settings = Settings(home=home, run_worker=False, prepare_models=False, serve_threads=1, serve_dtype="fp32",
                        serve_start_timeout_s=90, **fields)  # fmt: skip
    app = create_app(settings)
    app.state.catalog.add(ModelEntry(name=BASE, source_kind="local", source=str(base_dir)))
    with app.state.db.session() as s:
        _, key = create_key(s, name="alice", owner="alice")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, name="api-under-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the API server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield Live(app, f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {key}"})
    finally:
        server.should_exit = True  # its lifespan's end stops the model servers
        thread.join(60)


def _write_folder(blobs: Any, prefix: str, folder: Path) -> None:
    for path in folder.iterdir():
        with blobs.writer(f"{prefix}/{path.name}") as w:
            w.write(path.read_bytes())


def _completed_lora_job(live: Live, good: Path, bad: Path) -> str:
    """A LoRA job of alice's on BASE, made through the routes and finished as the worker would: `bad` saved as its
    intermediate checkpoint at BAD_STEP, `good` as its final adapter."""
    data = b"".join(json.dumps(r).encode() + b"\n" for r in RECORDS)
    form = {"purpose": "fine-tune", "file_name": "train.jsonl", "file_type": "jsonl",
            "checksum": hashlib.sha256(data).hexdigest()}  # fmt: skip
    with live.http() as http:
        r = http.post("/v1/files", data=form, follow_redirects=False)
        assert r.status_code == 302, r.text
        signed = urlsplit(r.headers["Location"])
        assert http.put(f"{signed.path}?{signed.query}", content=data).status_code == 200
        file_id = r.headers["X-Together-File-Id"]
        assert http.post(f"/v1/files/{file_id}/preprocess").status_code == 200
        for _ in range(500):
            status = http.get(f"/v1/files/{file_id}").json()["processing_status"]
            if status not in ("QUEUED", "RUNNING", None):
                break
            time.sleep(0.02)
        assert status == "COMPLETED"
        r = http.post("/v1/fine-tunes", json={"training_file": file_id, "model": BASE, "n_epochs": 1})
        assert r.status_code == 200, r.text
        job_id = str(r.json()["id"])
    db, blobs, now = live.app.state.db, live.app.state.blobs, time.time()
    _write_folder(blobs, checkpoint_prefix(job_id, BAD_STEP), bad)
    _write_folder(blobs, final_prefix(job_id, "adapter"), good)
    with db.session() as s:
        assert repo.transition(s, job_id=job_id, from_statuses=("queued",), to_status="running",
                               event_type="job_start", message="Job started", started_at=now, attempt=1)  # fmt: skip
        repo.add_checkpoint(s, job_id=job_id, step=BAD_STEP, kind="intermediate",
                            path=checkpoint_prefix(job_id, BAD_STEP), created_at=now)  # fmt: skip
        repo.add_checkpoint(s, job_id=job_id, step=2 * BAD_STEP, kind="final", path=final_prefix(job_id, "adapter"),
                            created_at=now)  # fmt: skip
        assert repo.transition(s, job_id=job_id, from_statuses=("running",), to_status="completed",
                               event_type="job_complete", message="Job completed", finished_at=now)  # fmt: skip
    return job_id


@pytest.fixture(scope="module")
def adapter_dirs(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A servable LoRA adapter of the tiny llama, and one that carries a whole lm_head (refused)."""
    root = tmp_path_factory.mktemp("proxy-adapters")
    good = make_adapter(tiny_dir, root / "good", seed=7, r=8, targets=["q_proj", "v_proj"])
    bad = make_adapter(tiny_dir, root / "bad", seed=8, r=8, targets=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    return good, bad


@pytest.fixture
def loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The file the vLLM stand-in logs each load request to (one JSON line each)."""
    path = tmp_path / "loads.jsonl"
    monkeypatch.setenv("VLLM_STANDIN_LOADS", str(path))
    return path


def _loads(path: Path, name: str) -> list[dict[str, Any]]:
    lines = path.read_text().splitlines() if path.exists() else []
    return [line for line in map(json.loads, lines) if line["lora_name"] == name]


@pytest.fixture
def vllm_live(tmp_path: Path, tiny_dir: Path, adapter_dirs: tuple[Path, Path], loads: Path) -> Iterator[Live]:
    with _serving(tmp_path / "home", tiny_dir, serve_backend="vllm",
                  vllm_command=f"{sys.executable} {STANDIN}") as live:  # fmt: skip
        live.job_id = _completed_lora_job(live, *adapter_dirs)
        yield live


def test_an_adapter_is_loaded_once_per_model_server_and_again_by_its_replacement(vllm_live: Live, loads: Path) -> None:
    live, name = vllm_live, vllm_live.job_id
    # Concurrent first requests (they also start the model server): one load.
    with ThreadPoolExecutor(4) as pool:
        first = list(pool.map(lambda _: live.chat(name), range(4)))
    assert [r.status_code for r in first] == [200] * 4, [r.text for r in first]
    assert {r.json()["choices"][0]["message"]["content"] for r in first} == {f"[{name}] you said: Hello there"}
    # Later requests, whole, streamed and a completion: no load at all.
    assert live.chat(name).status_code == 200
    streamed = live.chat(name, stream=True)
    assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")
    with live.http() as http:
        done = http.post("/v1/completions", json={"model": name, "prompt": "Once upon", "max_tokens": 4})
    assert done.status_code == 200 and done.json()["choices"][0]["text"] == f"[{name}] you said: Once"
    old = live.server()
    assert len(_loads(loads, name)) == 1 and old.adapters == {name}

    # The model server dies: the pool starts another, which has never heard of the adapter, so it is loaded there.
    old.proc.kill()
    old.proc.wait(10)
    again = live.chat(name)
    assert again.status_code == 200, again.text
    assert again.json()["choices"][0]["message"]["content"] == f"[{name}] you said: Hello there"
    new = live.server()
    assert new is not old and new.adapters == {name}
    assert [line["pid"] for line in _loads(loads, name)] == [old.proc.pid, new.proc.pid]
    assert live.chat(name).status_code == 200 and len(_loads(loads, name)) == 2


def test_an_adapter_is_checked_once_and_a_refused_one_every_time(
    vllm_live: Live, loads: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    live, name = vllm_live, vllm_live.job_id
    checked: list[Path] = []
    sized: list[str] = []
    real_check, real_size = router.check_adapter, service.weights_bytes

    def counting_check(folder: Path, **kw: Any) -> None:
        checked.append(folder)
        real_check(folder, **kw)

    def counting_size(*args: Any) -> int | None:
        sized.append(args[-1].name)
        return real_size(*args)

    monkeypatch.setattr(router, "check_adapter", counting_check)
    monkeypatch.setattr(service, "weights_bytes", counting_size)
    for _ in range(3):
        r = live.chat(name)
        assert r.status_code == 200, r.text
    assert len(checked) == 1 and (checked[0] / "adapter_config.json").is_file()
    assert sized == [BASE]  # the tiny llama's size is known: looked up once

    refused = [live.chat(f"{name}:{BAD_STEP}") for _ in range(2)]
    assert [r.status_code for r in refused] == [400, 400]
    errors = [r.json()["error"] for r in refused]
    assert errors[0] == errors[1] and errors[0]["param"] == "model"
    assert "whole weights of lm_head" in errors[0]["message"] and f"{name}:{BAD_STEP}" in errors[0]["message"]
    assert len(checked) == 3  # a refusal is not kept: checked (and refused) again
    assert _loads(loads, f"{name}:{BAD_STEP}") == []  # never sent to the model server
    assert live.chat(name).status_code == 200 and len(checked) == 3 and len(_loads(loads, name)) == 1


def test_tuneforge_model_server_loads_an_adapter_again_after_an_unload_or_a_restart(
    tmp_path: Path, tiny_dir: Path, adapter_dirs: tuple[Path, Path]
) -> None:
    with _serving(tmp_path / "home", tiny_dir) as live:
        name = live.job_id = _completed_lora_job(live, *adapter_dirs)
        first = live.chat(name)
        assert first.status_code == 200, first.text
        answer = first.json()["choices"][0]["message"]["content"]
        server = live.server()
        assert server.adapters == {name}

        # Unloaded behind the proxy's back: the model server answers 404, and the proxy loads it again, once.
        r = httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": name}, timeout=30)
        assert r.status_code == 200, r.text
        for stream in (False, True):
            again = live.chat(name, stream=stream)
            assert again.status_code == 200, again.text
            if not stream:
                assert again.json()["choices"][0]["message"]["content"] == answer
            httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": name}, timeout=30)
        assert live.server() is server

        # A replacement process loads it again and answers the same.
        server.proc.kill()
        server.proc.wait(10)
        after = live.chat(name)
        assert after.status_code == 200, after.text
        assert after.json()["choices"][0]["message"]["content"] == answer
        assert live.server() is not server and live.server().adapters == {name}
