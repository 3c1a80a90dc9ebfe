"""Bodies and answers of `/endpoints` (api-contract 5.1, 5.2)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tuneforge.api.bodies import RequestBody

# Replicas one endpoint may ask for: every replica is a process on this host (or, later, the cluster).
MAX_REPLICAS = 16


class AutoscalingIn(RequestBody):
    model_config = ConfigDict(extra="ignore")

    min_replicas: int | None = Field(None, ge=1, le=MAX_REPLICAS)
    max_replicas: int | None = Field(None, ge=1, le=MAX_REPLICAS)


class CreateEndpoint(RequestBody):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=400)
    hardware: str = Field(min_length=1, max_length=100)
    autoscaling: AutoscalingIn
    display_name: str | None = Field(None, max_length=400)
    state: Literal["STARTED", "STOPPED"] | None = None
    inactive_timeout: int | None = Field(None, ge=0, description="minutes without a request before it stops")
    availability_zone: str | None = None
    disable_speculative_decoding: bool | None = None
    disable_prompt_cache: bool | None = None  # deprecated upstream; no effect


class UpdateEndpoint(RequestBody):
    model_config = ConfigDict(extra="ignore")

    display_name: str | None = Field(None, max_length=400)
    state: Literal["STARTED", "STOPPED"] | None = None
    autoscaling: AutoscalingIn | None = None
    inactive_timeout: int | None = Field(None, ge=0)


class AdapterRef(RequestBody):
    model_config = ConfigDict(extra="ignore")

    model_id: str = Field(min_length=1, max_length=800)


class Autoscaling(BaseModel):
    min_replicas: int
    max_replicas: int


State = Literal["PENDING", "STARTING", "STARTED", "STOPPING", "STOPPED", "ERROR"]


class EndpointPublic(BaseModel):
    id: str
    object: Literal["endpoint"] = "endpoint"
    name: str = Field(description="pass it as `model` to /chat/completions")
    display_name: str
    model: str
    hardware: str
    type: Literal["dedicated"] = "dedicated"
    owner: str
    state: State
    autoscaling: Autoscaling
    inactive_timeout: int | None = None
    created_at: str
    error: str | None = Field(None, description="why the endpoint is in ERROR, in words a user can act on")
    replicas: int = Field(0, description="replicas running now (ready or starting)")
    ready_replicas: int = 0


class EndpointListItem(BaseModel):
    id: str
    object: Literal["endpoint"] = "endpoint"
    name: str
    model: str
    type: Literal["dedicated", "serverless"] = "dedicated"
    owner: str
    state: State
    created_at: str


class EndpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EndpointListItem]


class AdapterItem(BaseModel):
    adapter_name: str
    endpoint_name: str
    model_id: str = Field(description="`<endpoint name>:<adapter model>`: pass it as `model` to chat")


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterItem]


class AdapterAdded(BaseModel):
    model_id: str


class AdapterRemoved(BaseModel):
    deleted: bool
    model_id: str
