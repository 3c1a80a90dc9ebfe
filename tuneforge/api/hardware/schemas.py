"""Wire models of `GET /hardware` and `GET /clusters/availability-zones` (api-contract 5.2)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class HardwarePricing(BaseModel):
    cents_per_minute: float = Field(0.0, description="Always 0: a self-hosted server charges nothing for uptime")


class HardwareSpecs(BaseModel):
    gpu_type: str = Field(description='The GPU type, e.g. "h100-80gb"; "cpu" for the host\'s CPU')
    gpu_link: str = Field(description='"sxm", "pcie", "nvl", or "" where unknown (and for the CPU)')
    gpu_memory: float = Field(description="One GPU's memory in GB; for the CPU, the host's memory in GiB")
    gpu_count: int = Field(description="Number of GPUs (0 for the CPU)")


class HardwareAvailability(BaseModel):
    status: Literal["available", "unavailable", "insufficient"] = Field(
        description='"insufficient": the model\'s serving memory does not fit this option; "available": it fits'
    )


class HardwarePublic(BaseModel):
    id: str = Field(description="The hardware id to pass to POST /endpoints, e.g. 1x_nvidia_h100_80gb_sxm or cpu")
    object: Literal["hardware"] = "hardware"
    pricing: HardwarePricing
    specs: HardwareSpecs
    updated_at: str = Field(description="When this host's hardware was probed (ISO-8601)")
    availability: HardwareAvailability | None = Field(None, description="Only with ?model=")


class HardwareList(BaseModel):
    object: Literal["list"] = "list"
    data: list[HardwarePublic]


class AvailabilityZones(BaseModel):
    avzones: list[str] = Field(description='One zone, "local": this host')
