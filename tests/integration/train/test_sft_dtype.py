"""spec.dtype on the SFT recipe: forced bf16 takes the bf16 autocast path on any CPU (slowly where bf16 is emulated,
so the run is tiny), says so in training_start, completes, and its first loss is the fp32 run's within bf16 precision.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from recipe_support import make_job, run_in_process

from tuneforge.train.loss import causal_lm
from tuneforge.train.recipes import sft

TINY = {"n_epochs": 1, "packing": False, "batch_size": 4}  # 8 examples: 2 steps


def _watch_forwards(monkeypatch) -> list[dict[str, Any]]:
    """Wraps the recipe's loss call: records the autocast state it runs under and the dtype of every linear
    layer's output (the activations) of the decoder."""
    seen: list[dict[str, Any]] = []
    real = sft.trained_token_loss

    def watched(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
        dtypes: set[torch.dtype] = set()
        linears = [m for m in causal_lm(model).get_decoder().modules() if type(m) is torch.nn.Linear]
        hooks = [m.register_forward_hook(lambda mod, args, out: dtypes.add(out.dtype)) for m in linears]
        try:
            result = real(model, batch)
        finally:
            for h in hooks:
                h.remove()
        seen.append({"autocast": torch.is_autocast_enabled("cpu"), "autocast_dtype": torch.get_autocast_dtype("cpu"),
                     "activations": dtypes, "loss_dtype": result[0].dtype})  # fmt: skip
        return result

    monkeypatch.setattr(sft, "trained_token_loss", watched)
    return seen


def _start(job: Any) -> dict[str, Any]:
    return next(e for e in job.events() if e["type"] == "training_start")


def test_forced_bf16_runs_under_bf16_autocast_and_matches_fp32_on_the_first_step(tmp_path, tiny_model, monkeypatch):
    seen = _watch_forwards(monkeypatch)
    bf16 = make_job(tmp_path, tiny_model, job_id="ft-bf16", hyper=TINY, dtype="bf16")
    assert run_in_process(bf16) == 0
    assert bf16.result()["status"] == "completed"
    start = _start(bf16)
    assert "bf16 autocast" in start["message"] and start["data"]["dtype"] == "bf16"
    assert seen and all(s["autocast"] and s["autocast_dtype"] == torch.bfloat16 for s in seen)
    assert all(s["activations"] == {torch.bfloat16} for s in seen)  # every matmul of the decoder ran in bf16
    assert all(s["loss_dtype"] == torch.float32 for s in seen)  # the loss sums stay fp32
    bf16_losses = bf16.metric("train/loss")
    assert len(bf16_losses) == 2 and all(math.isfinite(x) for x in bf16_losses)

    seen.clear()
    fp32 = make_job(tmp_path, tiny_model, job_id="ft-fp32", hyper=TINY, dtype="fp32")
    assert run_in_process(fp32) == 0
    start = _start(fp32)
    assert ", fp32, " in start["message"] and start["data"]["dtype"] == "fp32"
    assert seen and not any(s["autocast"] for s in seen)
    assert all(s["activations"] == {torch.float32} for s in seen)
    fp32_losses = fp32.metric("train/loss")
    # The first step's loss is computed before any update: same weights, same rows; only bf16 rounding differs.
    assert abs(bf16_losses[0] - fp32_losses[0]) <= 0.01 * fp32_losses[0]
    assert bf16_losses[0] != fp32_losses[0], (bf16_losses, fp32_losses)  # really a different computation
