"""bench/train_throughput.py on the tiny model: a failure on either side ends the whole bench at once with that side's
error (it once waited 30 minutes for a baseline that had failed before its first step), and with --dtype bf16 both
sides train under bf16 autocast on any CPU (TRL's SFTTrainer only with use_cpu) and report their figures, for SFT
and for DPO (against TRL's DPOTrainer)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
BENCH = ROOT / "bench" / "train_throughput.py"
TINY = ["--model", "tiny", "--steps", "2", "--examples", "32", "--peak-seconds", "0.2"]
LIMIT_S = 90  # a hang is a wait of TURN_TIMEOUT_S (30 minutes); a tiny run takes about 10 s


def _bench(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The bench as a process (this checkout's tuneforge); a hang fails the test with TimeoutExpired."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(BENCH), *TINY, "--cache", str(tmp_path / "cache"), *args],
                          env=env, capture_output=True, text=True, timeout=LIMIT_S)  # fmt: skip


@pytest.mark.parametrize(("flag", "side"), [("--fail-baseline", "baseline"), ("--fail-ours", "ours")])
def test_a_failure_on_either_side_ends_the_bench_at_once_with_that_error(tmp_path, flag, side):
    proc = _bench(tmp_path, flag)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last["side"] == side and flag in last["error"] and last["error"].startswith("RuntimeError: injected")
    assert "Traceback" in proc.stderr and f"{last['error']}\n" in proc.stderr  # the failing side's own traceback
    assert "OtherSideFailed" not in proc.stdout + proc.stderr  # the waiting side's abort is not what is reported


def test_forced_bf16_runs_both_sides_under_bf16_and_reports_both_peaks(tmp_path):
    proc = _bench(tmp_path, "--dtype", "bf16")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "bf16 autocast" in proc.stdout  # our training_start
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["dtype"] == result["ours_dtype"] == "bf16" and result["baseline_mixed_precision"] == "bf16"
    assert result["dtype_requested"] == "bf16"
    assert result["peak_gflops"] == result["peak_gflops_bf16"] > 0 and result["peak_gflops_fp32"] > 0
    for key in ("tok_s", "baseline_tok_s", "ratio", "mfu"):
        assert result[key] > 0, key
    assert len(result["ours_per_step_tok_s"]) == len(result["baseline_per_step_tok_s"]) == 3  # warm-up + 2 timed
    # the DPO comparison of the same run: our recipe against TRL's DPOTrainer, both in bf16
    for key in ("dpo_tok_s", "dpo_baseline_tok_s", "dpo_ratio", "dpo_reference_seconds", "dpo_epoch_ratio"):
        assert result[key] > 0, key
    assert len(result["dpo_per_step_tok_s"]) == len(result["dpo_baseline_per_step_tok_s"]) == 3
    assert "DPO training of LoRA weights" in proc.stdout  # our DPO recipe's training_start
