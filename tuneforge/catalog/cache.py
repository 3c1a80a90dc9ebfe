"""Where the training cache (`<home>/models`) holds each catalog model once a run, or a preparation, has made it:
the knowledge `loading.resolve_model_dir` writes by, read without converting or downloading anything (torch-free,
for the API's preview and price estimate).
"""

from __future__ import annotations

import re
from pathlib import Path

from tuneforge.catalog.entries import ModelEntry
from tuneforge.catalog.source import safe_name

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def model_folder(cache: Path, entry: ModelEntry) -> Path | None:
    """The folder a training run loads `entry` from (`catalog.loading.resolve_model_dir`), without converting or
    downloading anything: None while it does not exist yet."""
    kind = entry.source_kind
    if kind == "local":
        return Path(entry.source)
    if kind in ("gguf", "gguf-package"):
        folder = cache / safe_name(entry.name)
        # The conversion renames the finished folder into place; config.json is what the loader checks for.
        return folder if (folder / "config.json").is_file() else None
    if kind == "hub":
        repo = cache / "hub" / f"models--{entry.source.replace('/', '--')}"
        revision = entry.revision or "main"
        if not _COMMIT.match(revision):
            ref = repo / "refs" / revision
            if not ref.is_file():
                return None
            revision = ref.read_text().strip()
        folder = repo / "snapshots" / revision
        return folder if folder.is_dir() else None
    return None
