"""Fixtures for the fine-tuning API tests: the real app without a job worker, uploaded datasets, and finished jobs.

A "finished" job is made the way the worker would leave it: the store's named transitions and checkpoint rows,
and fake weight files under the blob layout's prefixes. That is test setup for the HTTP layer; real training is
tested elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi.testclient import TestClient

from tuneforge.api.app import create_app
from tuneforge.catalog.entries import SMOLLM2
from tuneforge.settings import Settings
from tuneforge.storage.layout import checkpoint_prefix, final_prefix, tokenized_key
from tuneforge.store import jobs as repo
from tuneforge.store.keys import create_key

MODEL = SMOLLM2.name

CONVERSATIONS = [
    {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"}, {"role": "assistant", "content": str(2 * i)}]}
    for i in range(8)
]
PREFERENCES = [
    {
        "input": {"messages": [{"role": "user", "content": f"Say {i}"}]},
        "preferred_output": [{"role": "assistant", "content": str(i)}],
        "non_preferred_output": [{"role": "assistant", "content": "no"}],
    }
    for i in range(4)
]
TOOLS_LINE = {
    "messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "sunny"},
    ],
    "tools": [{"type": "function", "function": {"name": "weather", "description": "w", "parameters": {}}}],
}


@dataclass
class FT:
    """The app under test, two callers, and helpers that drive it the way a client and the worker would."""

    client: TestClient
    settings: Settings
    alice: dict[str, str]
    bob: dict[str, str]
    uploaded: dict[str, str] = field(default_factory=dict)

    model = MODEL
    conversations = CONVERSATIONS
    preferences = PREFERENCES
    tools_line = TOOLS_LINE

    @property
    def app(self) -> Any:
        return self.client.app

    @staticmethod
    def sdk_body(training_file: str, /, **changes: Any) -> dict[str, Any]:
        """The exact body `client.fine_tuning.create(training_file=..., model=...)` sends (api-contract 3.4)."""
        body: dict[str, Any] = {
            "training_file": training_file,
            "validation_file": "",
            "packing": True,
            "model": MODEL,
            "n_epochs": 1,
            "learning_rate": 1e-05,
            "lr_scheduler": {
                "lr_scheduler_type": "cosine",
                "lr_scheduler_args": {"min_lr_ratio": 0.0, "num_cycles": 0.5},
            },
            "warmup_ratio": 0.0,
            "max_grad_norm": 1.0,
            "weight_decay": 0.0,
            "n_checkpoints": 1,
            "n_evals": 0,
            "batch_size": "max",
            "early_stopping_enabled": False,
            "training_method": {"method": "sft", "train_on_inputs": "auto"},
        }
        body.update(changes)
        return body

    def sdk(self, who: str = "alice") -> Any:
        """The real together SDK (strict response validation), talking to the app in-process."""
        from together import Together

        key = (self.alice if who == "alice" else self.bob)["Authorization"].split()[1]
        http = httpx.Client(transport=_ViaTestClient(self.client), base_url="http://testserver")
        return Together(
            api_key=key,
            base_url="http://testserver/v1",
            http_client=http,
            max_retries=0,
            _strict_response_validation=True,
        )

    def upload(
        self, lines: list[dict[str, Any]], *, name: str = "train.jsonl", who: str = "alice", expect: str = "COMPLETED"
    ) -> str:
        """Upload through the real routes (POST, signed PUT, preprocess) and wait for the server's check."""
        data = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
        key = (who, hashlib.sha256(data).hexdigest())
        if key in self.uploaded:
            return self.uploaded[key]
        headers = self.alice if who == "alice" else self.bob
        form = {"purpose": "fine-tune", "file_name": name, "file_type": "jsonl", "checksum": key[1]}
        r = self.client.post("/v1/files", data=form, headers=headers, follow_redirects=False)
        assert r.status_code == 302, r.text
        url = urlsplit(r.headers["Location"])
        assert self.client.put(f"{url.path}?{url.query}", content=data).status_code == 200
        file_id = r.headers["X-Together-File-Id"]
        assert self.client.post(f"/v1/files/{file_id}/preprocess", headers=headers).status_code == 200
        for _ in range(400):
            body = self.client.get(f"/v1/files/{file_id}", headers=headers).json()
            if body["processing_status"] not in ("QUEUED", "RUNNING", None):
                break
            time.sleep(0.01)
        assert body["processing_status"] == expect, body
        self.uploaded[key] = file_id
        return file_id

    def open_upload(self, data: bytes, *, put: bool = False) -> str:
        """A file alice created with POST /files whose upload she never finished: no bytes (or, with `put`, the
        bytes but no /preprocess)."""
        form = {"purpose": "fine-tune", "file_name": "opened.jsonl", "file_type": "jsonl",
                "checksum": hashlib.sha256(data).hexdigest()}  # fmt: skip
        r = self.client.post("/v1/files", data=form, headers=self.alice, follow_redirects=False)
        assert r.status_code == 302, r.text
        if put:
            url = urlsplit(r.headers["Location"])
            assert self.client.put(f"{url.path}?{url.query}", content=data).status_code == 200
        return str(r.headers["X-Together-File-Id"])

    def create(self, body: dict[str, Any], who: str = "alice") -> dict[str, Any]:
        r = self.client.post("/v1/fine-tunes", json=body, headers=self.alice if who == "alice" else self.bob)
        assert r.status_code == 200, r.text
        return dict(r.json())

    def finish(
        self,
        job_id: str,
        *,
        steps: int = 20,
        intermediate: tuple[int, ...] = (10,),
        full: bool = False,
        merged: bool = True,
        status: str = "completed",
    ) -> None:
        """Walk the job through running to `status` as the worker would, with weights in the blob store."""
        db, blobs = self.app.state.db, self.app.state.blobs
        now = time.time()
        with db.session() as s:
            assert repo.transition(
                s,
                job_id=job_id,
                from_statuses=("queued",),
                to_status="running",
                event_type="job_start",
                message="Job started",
                started_at=now,
                attempt=1,
            )
            for step in intermediate:
                prefix = checkpoint_prefix(job_id, step)
                _write(blobs, f"{prefix}/adapter_model.safetensors", b"A" * 64 + str(step).encode())
                _write(blobs, f"{prefix}/manifest.json", json.dumps({"step": step}).encode())
                _write(blobs, f"{prefix}/resume/optimizer.pt", b"optimizer state")
                repo.add_checkpoint(s, job_id=job_id, step=step, kind="intermediate", path=prefix, created_at=now)
                repo.add_event(
                    s,
                    job_id=job_id,
                    type_="checkpoint_save",
                    message=f"Checkpoint saved at step {step}",
                    data={"step": step, "checkpoint_path": prefix},
                )
            for step in range(1, steps + 1):
                repo.add_metric(
                    s,
                    job_id=job_id,
                    step=step,
                    logged_at=now + step,
                    values={"train/loss": 2.0 / step, "train/lr": 1e-4, "train/global_step": step},
                )
                if step % 5 == 0:
                    repo.add_metric(
                        s,
                        job_id=job_id,
                        step=step,
                        logged_at=now + step + 0.5,
                        values={"eval/loss": 3.0 / step, "train/global_step": step},
                    )
            progress = {
                "total_steps": steps,
                "steps_completed": steps,
                "token_count": 1000,
                "param_count": 135_000_000,
                "epochs_completed": 1,
                "estimate_available": True,
                "seconds_remaining": 0,
            }
            repo.update_job(s, job_id=job_id, progress=progress)
            variants = ("model",) if full else (("adapter", "merged") if merged else ("adapter",))
            for variant in variants:
                prefix = final_prefix(job_id, variant)
                _write(blobs, f"{prefix}/model.safetensors", variant.encode() * 5000)
                _write(blobs, f"{prefix}/config.json", b'{"model_type": "llama"}')
            if status == "completed":
                final = final_prefix(job_id, "model" if full else "adapter")
                repo.add_checkpoint(s, job_id=job_id, step=steps, kind="final", path=final, created_at=now)
                _write(blobs, tokenized_key(job_id), b"PAR1 tokenized PAR1")
            error = "boom: the run failed" if status == "error" else None
            assert repo.transition(
                s,
                job_id=job_id,
                from_statuses=("running",),
                to_status=status,
                event_type="job_complete" if status == "completed" else "job_error",
                message=f"Job {status}",
                finished_at=now + steps,
                error=error,
            )


class _ViaTestClient(httpx.BaseTransport):
    """An httpx transport that hands each request to the TestClient (which is built on another httpx)."""

    def __init__(self, client: TestClient) -> None:
        self.client = client

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        r = self.client.request(request.method, str(request.url), headers=dict(request.headers), content=request.read())
        headers = [(k, v) for k, v in r.headers.multi_items() if k.lower() != "content-encoding"]
        return httpx.Response(r.status_code, headers=headers, content=r.content, request=request)


def _write(blobs: Any, key: str, data: bytes) -> None:
    with blobs.writer(key) as w:
        w.write(data)


@contextmanager
def _running_app(home: Path, **changes: Any) -> Iterator[FT]:
    # No background model preparation: a preview of the built-in model would convert SmolLM2 (tests that want it
    # turn it on). `changes`: other settings.
    settings = Settings(home=home, run_worker=False, price_per_token=2e-6, prepare_models=False, **changes)
    app = create_app(settings)
    with app.state.db.session() as s:
        _, alice = create_key(s, name="alice", owner="alice")
        _, bob = create_key(s, name="bob", owner="bob")
    with TestClient(app, base_url="http://testserver") as client:
        yield FT(client, settings, {"Authorization": f"Bearer {alice}"}, {"Authorization": f"Bearer {bob}"})


@pytest.fixture
def ft(tmp_path: Path) -> Iterator[FT]:
    """A fresh app per test."""
    with _running_app(tmp_path / "home") as app:
        yield app


@pytest.fixture(scope="module")
def ft_shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FT]:
    """One app for a module's table-driven cases, which only read or are refused."""
    with _running_app(tmp_path_factory.mktemp("ft") / "home") as app:
        yield app


@pytest.fixture
def ft_hosted(tmp_path: Path) -> Iterator[FT]:
    """A fresh app whose catalog lists the hosted service's models (the suite's default leaves them out)."""
    with _running_app(tmp_path / "home", hosted_catalog=True) as app:
        yield app


@pytest.fixture
def train_file(ft: FT) -> str:
    return ft.upload(CONVERSATIONS)


@pytest.fixture
def recording_worker(ft: FT) -> RecordingWorker:
    """Replaces the app's worker (none in these tests) with one that records what the API asks of it."""
    worker = RecordingWorker()
    ft.app.state.worker = worker
    return worker


class RecordingWorker:
    """Stands in for jobs/worker.py: records the API's nudges and cancels."""

    def __init__(self) -> None:
        self.wakes = 0
        self.cancels: list[str] = []

    def wake(self) -> None:
        self.wakes += 1

    def request_cancel(self, job_id: str) -> None:
        self.cancels.append(job_id)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass
