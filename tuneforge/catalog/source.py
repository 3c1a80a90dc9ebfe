"""ModelSource: where a model's weights come from, as it travels in a TrainSpec (torch-free)."""

from __future__ import annotations

import msgspec


class ModelSource(msgspec.Struct, frozen=True, kw_only=True):
    """A catalog entry's source, resolved: `source_kind` is hub | local | gguf | gguf-package | output."""

    name: str
    source_kind: str
    source: str
    revision: str | None = None
