"""Hardware for dedicated endpoints (api-contract 5.1, 5.2) on a live server: the real together SDK (strict
parsing) and the real `together endpoints hardware` / `availability-zones` CLI commands. The server lists this
host's own hardware: the CPU always (`cpu`), and whatever GPUs `nvidia-smi` reports.

Another owner's fine-tuned model, and a model that does not exist, are "not found" (404) with `?model=`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import together
from e2e_support import (
    LiveServer,
    run_together,
    start_server,
    valid_records,
    wait_processed_sdk,
    wait_until,
    write_jsonl,
)

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def hw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, str, str]]:
    """A server (fake training runs) where alice has a completed fine-tune: (server, its output name, a base)."""
    root = tmp_path_factory.mktemp("hardware")
    server = start_server(root / "home", root / "server.log", env={"TUNEFORGE_EXECUTOR": "fake"})
    try:
        server.create_keys(["alice", "bob"])
        alice = server.client(server.keys["alice"])
        f = alice.files.upload(file=write_jsonl(root / "a.jsonl", valid_records(3)), check=False)
        wait_processed_sdk(alice, f.id)
        base = alice.models.list()[0].id
        job = alice.fine_tuning.create(training_file=f.id, model=base, n_epochs=1)
        done = wait_until(lambda: (j := alice.fine_tuning.retrieve(job.id)).status == "completed" and j,
                          timeout=60, what="alice's fake job to complete")  # fmt: skip
        yield server, done.x_model_output_name, base
    finally:
        server.finish()


def _sdk(server: LiveServer, who: str) -> together.Together:
    return server.client(server.keys[who], _strict_response_validation=True)


def test_sdk_lists_the_hosts_hardware(hw: tuple[LiveServer, str, str]) -> None:
    server, _, _ = hw
    got = _sdk(server, "alice").endpoints.list_hardware()
    assert got.object == "list" and got.data
    cpu = got.data[0]
    assert cpu.id == "cpu" and cpu.object == "hardware" and cpu.availability is None
    assert cpu.pricing.cents_per_minute == 0.0
    assert cpu.specs.gpu_type == "cpu" and cpu.specs.gpu_count == 0 and cpu.specs.gpu_memory > 0
    for gpu in got.data[1:]:  # on a GPU host: `{count}x_nvidia_{model}_{memory}gb[_{link}]`
        assert gpu.id.startswith(f"{gpu.specs.gpu_count}x_nvidia_") and gpu.specs.gpu_count >= 1
        assert f"_{int(gpu.specs.gpu_memory)}gb" in gpu.id
    assert _sdk(server, "alice").endpoints.list_avzones().avzones == ["local"]


def test_sdk_availability_for_a_model(hw: tuple[LiveServer, str, str]) -> None:
    server, output, base = hw
    alice = _sdk(server, "alice")
    for model in (base, output):
        data = alice.endpoints.list_hardware(model=model).data
        assert data and all(h.availability is not None for h in data)
        # An unprepared base counts as 1 GiB of weights: 2.25 GiB to serve, which a test host's CPU holds.
        assert data[0].availability.status == ("available" if data[0].specs.gpu_memory > 2.3 else "insufficient")


@pytest.mark.parametrize(("who", "model"), [("bob", "output"), ("alice", "nobody/no-such-model-xyz")])
def test_sdk_model_not_found(hw: tuple[LiveServer, str, str], who: str, model: str) -> None:
    server, output, _ = hw
    with pytest.raises(together.NotFoundError) as err:
        _sdk(server, who).endpoints.list_hardware(model=output if model == "output" else model)
    message = err.value.body["error"]["message"].lower()
    assert "model" in message and "not found" in message
    assert err.value.status_code == 404


def _json(proc: Any) -> Any:
    return json.loads(proc.stdout)


def test_cli_endpoints_hardware(hw: tuple[LiveServer, str, str], tmp_path: Path) -> None:
    server, output, _ = hw
    key = server.keys["alice"]
    listed = _json(run_together(server, key, "--json", "endpoints", "hardware", cwd=tmp_path))
    assert listed[0]["id"] == "cpu" and listed[0]["specs"]["gpu_type"] == "cpu"
    table = run_together(server, key, "--no-json", "endpoints", "hardware", cwd=tmp_path).stdout
    assert "cpu" in table and "$0.00" in table, table
    available = _json(run_together(server, key, "--json", "endpoints", "hardware", "--model", output, "--available",
                                   cwd=tmp_path))  # fmt: skip
    assert {h["availability"]["status"] for h in available} <= {"available"}
    assert [h["id"] for h in available] == [h["id"] for h in listed if h["specs"]["gpu_memory"] > 2.3]
    zones = run_together(server, key, "--no-json", "endpoints", "availability-zones", cwd=tmp_path).stdout
    assert "local" in zones, zones
