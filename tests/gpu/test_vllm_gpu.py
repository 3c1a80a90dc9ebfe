"""The vLLM backend on a real GPU (`run_vllm_check.sh`): opt-in, marked `gpu`; skipped without an NVIDIA GPU or
without TUNEFORGE_GPU_VLLM_CHECK=1 (it makes a venv with vLLM, minutes of work)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(1800)]

SCRIPT = Path(__file__).resolve().parent / "run_vllm_check.sh"


def test_vllm_backend_trains_and_chats_on_a_gpu(tmp_path: Path) -> None:
    if os.environ.get("TUNEFORGE_GPU_VLLM_CHECK") != "1":
        pytest.skip("opt-in: set TUNEFORGE_GPU_VLLM_CHECK=1 (and VLLM_WHEELS for an offline wheel cache)")
    if shutil.which("nvidia-smi") is None:
        pytest.skip("no NVIDIA GPU here")
    env = {**os.environ, "VLLM_CHECK_WORK": os.environ.get("VLLM_CHECK_WORK", str(tmp_path / "work"))}
    result = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=1750)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-4000:]
