"""Timestamps as the wire carries them (jobs, events, checkpoints, endpoints, hardware)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import overload


@overload
def iso(ts: float) -> str: ...
@overload
def iso(ts: None) -> None: ...
def iso(ts: float | None) -> str | None:
    """Unix seconds as `YYYY-MM-DDTHH:MM:SS.ffffffZ`, one of the two layouts the CLI can render."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
