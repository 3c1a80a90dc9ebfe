"""Dedicated endpoints (api-contract 5) with the together SDK 2.x, its CLI and the openai SDK against a live server:
the lifecycle (create -> STARTED -> chat by name -> stop -> a clear error -> start -> delete), a LoRA output on its
own endpoint, a replica killed with SIGKILL, autoscaling, the inactive timeout, a server restart, owners, and the
refusals at create (hardware, model, memory budget)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import together
from e2e_support import LiveServer, run_together, wait_until
from ft_support import (
    TINY_LLAMA,
    Watch,
    client,
    create_job,
    finish_ft_server,
    ft_server,
    skip_without_training,
    start_ft_server,
    upload_ready,
)

pytestmark = pytest.mark.timeout(300)

# One torch thread and fp32 per model server (two cores here); autoscaling reacts within a second and scales down
# after 3 idle seconds, so the tests see both.
ENV = {
    "TUNEFORGE_SERVE_THREADS": "1",
    "TUNEFORGE_SERVE_DTYPE": "fp32",
    "TUNEFORGE_ENDPOINT_SCALE_UP_LOAD": "1",
    "TUNEFORGE_ENDPOINT_SCALE_UP_AFTER_S": "0.5",
    "TUNEFORGE_ENDPOINT_SCALE_DOWN_IDLE_S": "3",
    "TUNEFORGE_SERVE_START_TIMEOUT_S": "60",
}
ONE = {"min_replicas": 1, "max_replicas": 1}
MESSAGES = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    skip_without_training()
    with ft_server(tmp_path_factory.mktemp("endpoints"), owners=("alice", "bob"), env=ENV) as server:
        yield server


def _state(c: together.Together, endpoint_id: str, want: str, timeout: float = 120) -> Any:
    def reached() -> Any:
        ep = c.endpoints.retrieve(endpoint_id)
        assert ep.state != "ERROR" or want == "ERROR", ep
        return ep if ep.state == want else None

    return wait_until(reached, timeout=timeout, what=f"endpoint {endpoint_id} {want}", interval=0.2)


def _openai(srv: LiveServer, key: str) -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url=srv.api, max_retries=0, timeout=120)


def _replica_pids(srv: LiveServer) -> list[int]:
    """Model-server processes the server started (its children running `-m tuneforge.serve`)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == srv.proc.pid and b"tuneforge.serve" in cmdline:
            pids.append(int(entry.name))
    return pids


def test_lifecycle_with_the_sdk_chat_by_name_stop_start_delete(srv: LiveServer) -> None:
    alice = client(srv, srv.keys["alice"], strict=True)
    ep = alice.endpoints.create(model=TINY_LLAMA, hardware="cpu", autoscaling=ONE, display_name="tiny one")
    assert ep.state in ("PENDING", "STARTING") and ep.type == "dedicated" and ep.owner == "alice"
    assert ep.name.startswith("alice/") and ep.display_name == "tiny one" and ep.autoscaling.max_replicas == 1
    _state(alice, ep.id, "STARTED")

    whole = _openai(srv, srv.keys["alice"]).chat.completions.create(
        model=ep.name, messages=MESSAGES, max_tokens=8, temperature=0
    )
    assert whole.model == ep.name and whole.choices[0].message.content
    chunks = list(alice.chat.completions.create(model=ep.name, messages=MESSAGES, max_tokens=8, temperature=0,
                                                stream=True))  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [e.id for e in alice.endpoints.list(type="dedicated", mine=True).data] == [ep.id]

    # another owner sees none of it
    bob = client(srv, srv.keys["bob"])
    with pytest.raises(together.NotFoundError):
        bob.endpoints.retrieve(ep.id)
    assert bob.endpoints.list().data == []
    with pytest.raises(openai.NotFoundError):
        _openai(srv, srv.keys["bob"]).chat.completions.create(model=ep.name, messages=MESSAGES, max_tokens=2)

    assert alice.endpoints.update(ep.id, state="STOPPED").state in ("STOPPING", "STOPPED")
    _state(alice, ep.id, "STOPPED")
    assert _replica_pids(srv) == []
    with pytest.raises(openai.BadRequestError) as stopped:
        _openai(srv, srv.keys["alice"]).chat.completions.create(model=ep.name, messages=MESSAGES, max_tokens=2)
    assert "STOPPED" in str(stopped.value) and f"together endpoints start {ep.id}" in str(stopped.value)

    alice.endpoints.update(ep.id, state="STARTED", display_name="renamed")
    _state(alice, ep.id, "STARTED")
    again = _openai(srv, srv.keys["alice"]).chat.completions.create(
        model=ep.name, messages=MESSAGES, max_tokens=8, temperature=0
    )
    assert again.choices[0].message.content == whole.choices[0].message.content
    assert alice.endpoints.retrieve(ep.id).display_name == "renamed"

    alice.endpoints.delete(ep.id)
    with pytest.raises(together.NotFoundError):
        alice.endpoints.retrieve(ep.id)
    wait_until(lambda: _replica_pids(srv) == [], timeout=20, what="the deleted endpoint's replicas end")


def test_refusals_at_create_name_the_problem(srv: LiveServer) -> None:
    http = srv.http(srv.keys["alice"])
    body = {"model": TINY_LLAMA, "hardware": "8x_nvidia_b200_180gb_sxm", "autoscaling": ONE}
    r = http.post("/v1/endpoints", json=body)
    assert r.status_code == 400 and "invalid hardware provided" in r.json()["error"]["message"], r.text
    r = http.post("/v1/endpoints", json={**body, "hardware": "cpu", "model": "nobody/no-such-model"})
    assert r.status_code == 404 and "model" in r.json()["error"]["message"] and "not found" in r.text, r.text
    r = http.post("/v1/endpoints", json={**body, "hardware": "cpu",
                                         "autoscaling": {"min_replicas": 3, "max_replicas": 2}})  # fmt: skip
    assert r.status_code == 400 and "max_replicas" in r.text, r.text
    r = http.post("/v1/endpoints", json={**body, "hardware": "cpu", "autoscaling": {"min_replicas": 0}})
    assert r.status_code == 400 and "min_replicas" in r.text, r.text
    assert http.get("/v1/endpoints").json()["data"] == []  # nothing refused was stored


def test_a_create_past_the_memory_budget_is_refused_naming_it(tmp_path_factory: pytest.TempPathFactory) -> None:
    skip_without_training()
    env = {**ENV, "TUNEFORGE_SERVE_MEMORY_BYTES": str(600 << 20)}  # room for two tiny replicas, not three
    with ft_server(tmp_path_factory.mktemp("budget"), owners=("alice",), env=env) as srv:
        http = srv.http(srv.keys["alice"])
        body = {"model": TINY_LLAMA, "hardware": "cpu", "autoscaling": {"min_replicas": 2, "max_replicas": 2},
                "state": "STOPPED"}  # fmt: skip
        first = http.post("/v1/endpoints", json=body)
        assert first.status_code == 200 and first.json()["state"] == "STOPPED", first.text
        r = http.patch(f"/v1/endpoints/{first.json()['id']}", json={"state": "STARTED"})
        assert r.status_code == 200, r.text
        r = http.post("/v1/endpoints", json={**body, "autoscaling": {"min_replicas": 1, "max_replicas": 1},
                                             "state": "STARTED"})  # fmt: skip
        assert r.status_code == 400, r.text
        message = r.json()["error"]["message"]
        assert "TUNEFORGE_SERVE_MEMORY_BYTES" in message and "budget" in message, message


def test_a_killed_replica_is_replaced_and_no_request_hangs(srv: LiveServer) -> None:
    alice = client(srv, srv.keys["alice"])
    ep = alice.endpoints.create(model=TINY_LLAMA, hardware="cpu", autoscaling=ONE)
    try:
        _state(alice, ep.id, "STARTED")
        c = _openai(srv, srv.keys["alice"])
        assert c.chat.completions.create(model=ep.name, messages=MESSAGES, max_tokens=4).choices
        (pid,) = _replica_pids(srv)
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        outcomes: list[str] = []
        answered_at = None
        while time.monotonic() - killed < 30:
            try:
                c.with_options(timeout=30).chat.completions.create(model=ep.name, messages=MESSAGES, max_tokens=4)
                outcomes.append("answer")
                answered_at = answered_at or time.monotonic() - killed
                if outcomes.count("answer") >= 3:
                    break
            except openai.APIStatusError as exc:  # an error is fine; a hang is not (the client's timeout)
                outcomes.append(f"error {exc.status_code}")
        assert answered_at is not None and answered_at <= 10, outcomes
        assert alice.endpoints.retrieve(ep.id).state == "STARTED"
        assert _replica_pids(srv) and pid not in _replica_pids(srv)
    finally:
        alice.endpoints.delete(ep.id)


def test_autoscaling_adds_a_replica_under_a_burst_and_removes_it_after(srv: LiveServer) -> None:
    alice = client(srv, srv.keys["alice"])
    ep = alice.endpoints.create(model=TINY_LLAMA, hardware="cpu", autoscaling={"min_replicas": 1, "max_replicas": 2})
    try:
        _state(alice, ep.id, "STARTED")
        c = _openai(srv, srv.keys["alice"]).with_options(timeout=120)
        stop = threading.Event()
        errors: list[BaseException] = []

        def burst() -> None:
            while not stop.is_set():
                try:
                    c.chat.completions.create(model=ep.name, messages=MESSAGES, max_tokens=64, temperature=0)
                except BaseException as exc:
                    errors.append(exc)
                    return

        threads = [threading.Thread(target=burst) for _ in range(6)]
        for t in threads:
            t.start()
        try:
            wait_until(lambda: alice.endpoints.retrieve(ep.id).model_extra.get("ready_replicas") == 2, timeout=90,
                       what="a second ready replica", interval=0.2)  # fmt: skip
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=120)
        assert not errors, errors
        wait_until(lambda: alice.endpoints.retrieve(ep.id).model_extra.get("replicas") == 1, timeout=60,
                   what="back to min_replicas after the burst", interval=0.2)  # fmt: skip
        wait_until(lambda: len(_replica_pids(srv)) == 1, timeout=20, what="the second replica's process ends")
        assert alice.endpoints.retrieve(ep.id).state == "STARTED"
    finally:
        alice.endpoints.delete(ep.id)


def test_a_lora_output_on_its_own_endpoint_and_as_an_adapter_on_a_base_one(srv: LiveServer, tmp_path: Path) -> None:
    alice = client(srv, srv.keys["alice"], strict=True)
    question, answer = "What is the secret word of the blue door?", "Marmalade."
    records = [{"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}] * 32
    file_id = upload_ready(alice, tmp_path / "fact.jsonl", records)
    job = create_job(alice, file_id, n_epochs=16, batch_size=4, learning_rate=1e-2, lora_r=16, lora_alpha=32,
                     suffix="ep-fact")  # fmt: skip
    output = Watch(alice, job.id).completed(timeout=240).x_model_output_name
    own = alice.endpoints.create(model=output, hardware="cpu", autoscaling=ONE)
    base = alice.endpoints.create(model=TINY_LLAMA, hardware="cpu", autoscaling=ONE)
    c = _openai(srv, srv.keys["alice"])
    ask = [{"role": "user", "content": question}]
    try:
        _state(alice, own.id, "STARTED")
        _state(alice, base.id, "STARTED")
        out = c.chat.completions.create(model=own.name, messages=ask, max_tokens=16, temperature=0)
        assert "Marmalade" in (out.choices[0].message.content or ""), out
        plain = c.chat.completions.create(model=base.name, messages=ask, max_tokens=16, temperature=0)
        assert "Marmalade" not in (plain.choices[0].message.content or ""), plain

        model_id = f"{base.name}:{output}"
        with pytest.raises(openai.NotFoundError):  # not added yet
            c.chat.completions.create(model=model_id, messages=ask, max_tokens=4)
        assert alice.endpoints.adapters.add(base.id, model_id=model_id).api_model_id == model_id
        listed = alice.endpoints.adapters.list(base.id).data or []
        assert [(a.adapter_name, a.endpoint_name, a.api_model_id) for a in listed] == [(output, base.name, model_id)]
        via = c.chat.completions.create(model=model_id, messages=ask, max_tokens=16, temperature=0)
        assert via.model == model_id and via.choices[0].message.content == out.choices[0].message.content
        with pytest.raises(together.BadRequestError, match="not a LoRA adapter"):
            alice.endpoints.adapters.add(base.id, model_id=f"{base.name}:{TINY_LLAMA}")
        with pytest.raises(together.BadRequestError, match="endpoint name"):
            alice.endpoints.adapters.add(base.id, model_id=f"{own.name}:{output}")
        with pytest.raises(together.NotFoundError):
            client(srv, srv.keys["bob"]).endpoints.adapters.add(base.id, model_id=model_id)
        assert alice.endpoints.adapters.remove(base.id, model_id=model_id).deleted is True
        with pytest.raises(openai.NotFoundError):
            c.chat.completions.create(model=model_id, messages=ask, max_tokens=4)
        assert not alice.endpoints.adapters.list(base.id).data
    finally:
        alice.endpoints.delete(own.id)
        alice.endpoints.delete(base.id)


def test_the_cli_creates_lists_stops_starts_and_shows_hardware(srv: LiveServer, tmp_path: Path) -> None:
    key = srv.keys["alice"]
    created = run_together(srv, key, "endpoints", "create", "--model", TINY_LLAMA, "--hardware", "cpu",
                           "--display-name", "cli-made", "--wait", cwd=tmp_path, timeout=180)  # fmt: skip
    alice = client(srv, key)
    (ep,) = [e for e in alice.endpoints.list().data if e.model == TINY_LLAMA]
    assert ep.id in created.stdout or ep.name in created.stdout, created.stdout
    assert alice.endpoints.retrieve(ep.id).state == "STARTED"
    listed = run_together(srv, key, "endpoints", "list", cwd=tmp_path)
    assert ep.id in listed.stdout, listed.stdout
    hardware = run_together(srv, key, "endpoints", "hardware", cwd=tmp_path)
    assert "cpu" in hardware.stdout, hardware.stdout
    run_together(srv, key, "endpoints", "stop", ep.id, "--wait", cwd=tmp_path, timeout=120)
    assert alice.endpoints.retrieve(ep.id).state == "STOPPED"
    run_together(srv, key, "endpoints", "start", ep.id, "--wait", cwd=tmp_path, timeout=180)
    assert alice.endpoints.retrieve(ep.id).state == "STARTED"
    run_together(srv, key, "endpoints", "delete", ep.id, cwd=tmp_path)
    with pytest.raises(together.NotFoundError):
        alice.endpoints.retrieve(ep.id)


def test_a_started_endpoint_comes_back_after_a_server_restart(tmp_path_factory: pytest.TempPathFactory) -> None:
    skip_without_training()
    root = tmp_path_factory.mktemp("restart")
    server = start_ft_server(root, env=ENV)
    try:
        key = server.create_keys(["alice"])["alice"]
        alice = client(server, key)
        ep = alice.endpoints.create(model=TINY_LLAMA, hardware="cpu", autoscaling=ONE)
        _state(alice, ep.id, "STARTED")
        server.stop()
        server = start_ft_server(root, env=ENV, home=server.home)
        server.keys = {"alice": key}
        alice = client(server, key)
        _state(alice, ep.id, "STARTED")
        out = _openai(server, key).chat.completions.create(model=ep.name, messages=MESSAGES, max_tokens=4)
        assert out.choices[0].message.content is not None
    finally:
        finish_ft_server(server)


def test_an_idle_endpoint_stops_after_its_inactive_timeout(srv: LiveServer) -> None:
    alice = client(srv, srv.keys["alice"])
    ep = alice.endpoints.create(model=TINY_LLAMA, hardware="cpu", autoscaling=ONE, inactive_timeout=1)
    try:
        _state(alice, ep.id, "STARTED")
        started = time.monotonic()
        _state(alice, ep.id, "STOPPED", timeout=120)
        assert 55 <= time.monotonic() - started <= 100
    finally:
        alice.endpoints.delete(ep.id)
