"""`GET /v1/hardware[?model=]` and `GET /v1/clusters/availability-zones` through the real app and the real together
SDK (strict parsing), with this host's probe and with canned GPU hosts put in `app.state.hardware`."""

from __future__ import annotations

import pytest
import together

from tuneforge.api.inference import service
from tuneforge.catalog.source import ModelSource
from tuneforge.serve import hardware
from tuneforge.serve.hardware import GIB, cpu_option, parse_nvidia_smi
from tuneforge.serve.pool import estimate_memory

EIGHT_H100 = "NVIDIA H100 80GB HBM3, 81559\n" * 8


def _host(cpu_bytes: int, smi: str = EIGHT_H100) -> list[hardware.HardwareOption]:
    return [cpu_option(cores=4, memory_bytes=cpu_bytes), *parse_nvidia_smi(smi, cores=4)]


def _source(ft, model: str) -> ModelSource:
    """The weights `model` names for alice (what the route estimates the need of)."""
    return service.resolve(ft.app.state.db, ft.app.state.catalog, owner="alice", model=model).base


def test_this_hosts_hardware_through_the_sdk(ft) -> None:
    got = ft.sdk().endpoints.list_hardware()
    assert got.object == "list"
    cpu = got.data[0]
    assert cpu.id == "cpu" and cpu.object == "hardware" and cpu.availability is None
    assert cpu.pricing.cents_per_minute == 0.0
    assert cpu.specs.gpu_type == "cpu" and cpu.specs.gpu_count == 0 and cpu.specs.gpu_link == ""
    assert cpu.specs.gpu_memory == pytest.approx(hardware.probe()[0].memory_bytes / GIB, abs=0.1)
    assert [h.id for h in got.data] == [o.id for o in hardware.probe()]
    raw = ft.client.get("/v1/hardware", headers=ft.alice).json()
    assert "availability" not in raw["data"][0] and raw["data"][0]["updated_at"].endswith("Z")


def test_gpu_hosts_are_listed_by_type_and_count(ft) -> None:
    ft.app.state.hardware = lambda: _host(32 * GIB)
    data = ft.sdk().endpoints.list_hardware().data
    assert [h.id for h in data] == ["cpu", *(f"{n}x_nvidia_h100_80gb_sxm" for n in range(1, 9))]
    h = data[3]
    assert (h.specs.gpu_type, h.specs.gpu_link, h.specs.gpu_memory, h.specs.gpu_count) == ("h100-80gb", "sxm", 80, 3)


def test_availability_for_a_catalog_model(ft) -> None:
    """SmolLM2 is not prepared here: the pool counts it as 1 GiB of weights, 2.25 GiB to serve."""
    need = estimate_memory(_source(ft, ft.model), None)
    ft.app.state.hardware = lambda: _host(need - 1)
    data = ft.sdk().endpoints.list_hardware(model=ft.model).data
    status = {h.id: h.availability.status for h in data if h.availability}
    assert status == {"cpu": "insufficient", **{f"{n}x_nvidia_h100_80gb_sxm": "available" for n in range(1, 9)}}
    ft.app.state.hardware = lambda: _host(need)
    assert ft.sdk().endpoints.list_hardware(model=ft.model).data[0].availability.status == "available"


def test_a_fine_tuned_model_is_its_owners_only(ft, train_file) -> None:
    job = ft.create(ft.sdk_body(train_file, training_type={"type": "Full"}))
    ft.finish(job["id"], full=True)
    name = job["model_output_name"]
    need = estimate_memory(_source(ft, name), 5 * 5000)  # its own weights: the stored model.safetensors
    ft.app.state.hardware = lambda: _host(need)
    assert ft.sdk().endpoints.list_hardware(model=name).data[0].availability.status == "available"
    ft.app.state.hardware = lambda: _host(need - 1)
    assert ft.sdk().endpoints.list_hardware(model=name).data[0].availability.status == "insufficient"
    for who, model in (("bob", name), ("bob", job["id"]), ("alice", "nobody/no-such-model")):
        with pytest.raises(together.NotFoundError) as err:
            ft.sdk(who).endpoints.list_hardware(model=model)
        message = err.value.body["error"]["message"].lower()
        assert "model" in message and "not found" in message


def test_one_availability_zone(ft) -> None:
    assert ft.sdk().endpoints.list_avzones().avzones == ["local"]
    assert ft.client.get("/v1/clusters/availability-zones").status_code == 401
    assert ft.client.get("/v1/hardware").status_code == 401
