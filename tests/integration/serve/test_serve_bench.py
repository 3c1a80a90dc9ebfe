"""bench/serve_throughput.py runs end to end on the tiny model and ends with one JSON line holding the figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.timeout(150)
def test_quick_tiny_bench_prints_the_figures(tmp_path):
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "serve_throughput.py"), "--quick", "--model", "tiny", "--tokens", "4",
         "--bound-seconds", "0.1", "--cache", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=140,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("x32_vs_x1", "mixed_vs_single", "bound_share", "dtype", "base_x32_tok_s", "mixed_x32_ttft_p99_ms"):
        assert key in last
    assert last["base_x32_tok_s"] > 0 and last["model"] == "tiny"
    assert last["fused_kernels"] is True  # the tiny llama on this CPU: the kernels build (the set-up built them)


@pytest.mark.timeout(280)
def test_quick_tiny_endpoint_bench_compares_one_and_two_replicas(tmp_path):
    """bench/endpoint_throughput.py drives a real server and endpoint through the SDK, 1 then 2 replicas."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "endpoint_throughput.py"), "--quick", "--model", "tiny",
         "--cache", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=270,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last["replicas1_tok_s"] > 0 and last["replicas2_tok_s"] > 0 and last["model"] == "tiny"
    assert last["replicas2_vs_1"] == pytest.approx(last["replicas2_tok_s"] / last["replicas1_tok_s"], abs=0.01)
