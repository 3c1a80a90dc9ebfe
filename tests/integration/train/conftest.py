"""Fixtures of the recipe tests; their helpers live in recipe_support.py (imported by name, unlike a conftest)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: a stray hub lookup fails at once

import pytest
import torch

from tuneforge.train.tiny_models import save_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer llama (hidden 128). Its random embeddings are scaled x4: with the default 0.02 init, the frozen tied
    head of a LoRA run cannot make any logit stand out, and the tiny model could not learn an answer."""
    from transformers import AutoModelForCausalLM

    folder = save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama", hidden=128)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(4.0)
    model.save_pretrained(folder)
    return folder
