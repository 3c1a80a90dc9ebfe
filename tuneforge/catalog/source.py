"""ModelSource: where a model's weights come from, as it travels in a TrainSpec (torch-free)."""

from __future__ import annotations

import re

import msgspec


class ModelSource(msgspec.Struct, frozen=True, kw_only=True):
    """A catalog entry's source, resolved: `source_kind` is hub | local | gguf | gguf-package | output."""

    name: str
    source_kind: str
    source: str
    revision: str | None = None


def safe_name(name: str) -> str:
    """A folder name for a model name: `org/model` -> `org--model`."""
    return re.sub(r"[^A-Za-z0-9._-]+", "--", name).strip("-.") or "model"
