"""Checkpoint and output folders that describe themselves: weights (a peft adapter or a whole model), the
tokenizer and chat template used in training, `manifest.json`, and for resumable checkpoints `resume/` with
the optimizer, scheduler, RNG states and the position in the data order. Written locally, then copied to the
blob store (manifest last). Knows torch and transformers' save formats; nothing about events or jobs.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tuneforge.catalog.loading import upload_folder
from tuneforge.storage.layout import MANIFEST, RESUME_DIR

FORMAT_VERSION = 1
_STATE = "state.json"


def write_manifest(folder: Path, **fields: Any) -> dict[str, Any]:
    """`manifest.json` with the format version, the time, the files beside it, and the given fields."""
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {"format_version": FORMAT_VERSION, "created_at": time.time(), **fields, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def save_weights(model: Any, tokenizer: Any, folder: Path) -> None:
    """Weights (safetensors, in the model's dtype; only the adapter when `model` is a peft model) plus the
    tokenizer and chat template used in training."""
    folder.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "peft_config"):
        # Embeddings are never LoRA targets here; "auto" would look the base model up on the hub to check.
        model.save_pretrained(folder, save_embedding_layers=False)
    else:
        model.save_pretrained(folder)
    readme = folder / "README.md"
    if readme.is_file() and hasattr(model, "peft_config"):
        readme.unlink()  # peft's model-card stub says nothing the manifest does not
    tokenizer.save_pretrained(folder)


def capture_rng() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_resume(folder: Path, *, optimizer: Any, scheduler: Any, state: dict[str, Any]) -> None:
    """`resume/`: optimizer.pt, scheduler.pt, rng.pt and state.json (step, epoch, data position, counters)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    torch.save(scheduler.state_dict(), folder / "scheduler.pt")
    torch.save(capture_rng(), folder / "rng.pt")
    (folder / _STATE).write_text(json.dumps(state, indent=2, sort_keys=True))


def load_resume(folder: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(optimizer state, scheduler state, RNG states, run state) from a checkpoint's `resume/` folder."""
    opt = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
    sched = torch.load(folder / "scheduler.pt", map_location="cpu", weights_only=True)
    rng = torch.load(folder / "rng.pt", map_location="cpu", weights_only=False)
    state = json.loads((folder / _STATE).read_text())
    return opt, sched, rng, state


def publish(blobs: Any, folder: Path, prefix: str, *, keep_local: bool = False) -> None:
    """Copy a finished folder into the blob store under `prefix` (manifest last), then drop the local copy."""
    upload_folder(blobs, folder, prefix)
    if not keep_local:
        shutil.rmtree(folder, ignore_errors=True)


__all__ = [
    "FORMAT_VERSION",
    "RESUME_DIR",
    "capture_rng",
    "load_resume",
    "publish",
    "restore_rng",
    "save_resume",
    "save_weights",
    "write_manifest",
]
