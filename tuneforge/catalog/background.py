"""Preparing catalog models in the background, from a torch-free caller (the API's preview, which needs a model's
tokenizer files before any run has made them): `start` spawns `python -m tuneforge.catalog.prepare` once per model
and says whether the previous attempt failed; `stop_all` ends them at shutdown.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import msgspec

from tuneforge.catalog.source import ModelSource, safe_name
from tuneforge.settings import child_environment

_lock = threading.Lock()
_runs: dict[tuple[str, str], subprocess.Popen[bytes]] = {}


@dataclass(frozen=True)
class Preparation:
    running: bool
    failure: str | None = None  # the last line the failed preparation wrote


def _log(source: ModelSource, cache: Path) -> Path:
    return cache / f".prepare-{safe_name(source.name)}.log"


def start(source: ModelSource, cache: Path) -> Preparation:
    """Spawn the preparation of `source` unless one is under way; what a previous one that failed said."""
    key = (str(cache), source.name)
    with _lock:
        run = _runs.get(key)
        if run is not None and run.poll() is None:
            return Preparation(running=True)
        failure = _failure(source, cache) if run is not None and run.returncode != 0 else None
        cache.mkdir(parents=True, exist_ok=True)
        env = child_environment()
        with open(_log(source, cache), "wb") as log:
            _runs[key] = subprocess.Popen(
                [sys.executable, "-m", "tuneforge.catalog.prepare", msgspec.json.encode(source).decode(), str(cache)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )  # fmt: skip
        return Preparation(running=True, failure=failure)


def stop_all(timeout_s: float = 5.0) -> None:
    """Stop the preparations this process started (at server shutdown)."""
    with _lock:
        runs = list(_runs.values())
        _runs.clear()
    for run in runs:
        if run.poll() is None:
            run.terminate()
    for run in runs:
        try:
            run.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            run.kill()
            run.wait()


def _failure(source: ModelSource, cache: Path) -> str:
    try:
        lines = [line.strip() for line in _log(source, cache).read_text(errors="replace").splitlines()]
    except OSError:
        return "the preparation process failed"
    lines = [line for line in lines if line]
    return lines[-1] if lines else "the preparation process failed"
