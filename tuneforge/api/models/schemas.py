"""Wire models of `GET /models` (api-contract 4.3): one item shape for both SDKs; only the envelope differs."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class Pricing(BaseModel):
    input: float = 0.0
    output: float = 0.0
    base: float = 0.0
    finetune: float = 0.0
    hourly: float = 0.0


class ModelPublic(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    type: Literal["chat"] = "chat"
    owned_by: str
    display_name: str
    organization: str
    context_length: int | None = None
    pricing: Pricing
    # tuneforge's own: whether the weights are already in this server's cache (a catalog model not downloaded yet
    # downloads on its first job or chat), and the catalog's facts about the model
    downloaded: bool | None = None
    parameter_count: int | None = None
    supports_vision: bool | None = None


class ModelList(BaseModel):
    """The OpenAI envelope; the Together SDK wants the bare list of `ModelPublic` instead."""

    object: Literal["list"] = "list"
    data: list[ModelPublic]
