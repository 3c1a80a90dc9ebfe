"""Fixtures of the serving-engine tests: a tiny llama whose greedy choices are clear (untied head scaled x30, so the
top two logits differ by well over fp32 noise), peft LoRA adapters made from it, and helpers that run requests."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from serve_support import make_adapter

from tuneforge.train.tiny_models import save_tiny_model


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM

    folder = save_tiny_model(tmp_path_factory.mktemp("serve") / "llama", "llama", tie=False)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    model.save_pretrained(folder)
    return folder


# (rank, alpha, targets, rslora) of the eight adapters: mixed ranks, targets and scaling rules.
ADAPTER_SHAPES = [
    (8, 16, "all-linear", False),
    (4, 8, ["q_proj", "v_proj"], False),
    (2, 4, ["o_proj", "down_proj"], False),
    (16, 16, "all-linear", True),
    (8, 32, ["gate_proj", "up_proj"], False),
    (1, 2, ["k_proj"], False),
    (6, 12, ["q_proj", "k_proj", "v_proj", "o_proj"], True),
    (3, 6, "all-linear", False),
]


@pytest.fixture(scope="session")
def adapters(tiny_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for i, (r, alpha, targets, rslora) in enumerate(ADAPTER_SHAPES):
        out[f"ad{i}"] = make_adapter(
            tiny_dir, root / f"ad{i}", seed=i + 1, r=r, alpha=alpha, targets=targets, rslora=rslora
        )
    return out
