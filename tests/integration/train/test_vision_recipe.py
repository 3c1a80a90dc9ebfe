"""Vision-language SFT (the SFT recipe on a tiny Idefics3, SmolVLM's architecture): the answer depends on the image
(the colour of a solid-colour image), so a model that does not read it cannot go below log(3) on the colour token.
Full and LoRA runs drive the loss under that floor and answer every training image right, greedy; the vision tower
stays as it was unless `train_vision`; LoRA adapts the language model only (and the tower with train_vision); the
outputs carry the model's processor; a validation file with images is evaluated."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from recipe_support import make_job, run_in_process
from safetensors.torch import load_file
from vision_support import COLOURS, colour_records, greedy_colours

from tuneforge.storage.layout import final_prefix
from tuneforge.train.tiny_models import save_tiny_vlm

FULL = {"training_type": "full", "learning_rate": 1e-2, "batch_size": 6, "n_epochs": 40}
LORA = {"training_type": "lora", "learning_rate": 5e-3, "batch_size": 6, "n_epochs": 60, "lora_r": 8,
        "lora_alpha": 16}  # fmt: skip
# Each answer's tokens: the colour's first token is the only one the text alone cannot tell, ~4-6 trained tokens
# an example, so a model blind to the image stays above log(3) / 6.
BLIND_FLOOR = math.log(3) / 6


@pytest.fixture(scope="module")
def vlm(tmp_path_factory) -> Path:
    return save_tiny_vlm(tmp_path_factory.mktemp("vlm") / "idefics3", hidden=128, embedding_scale=4.0)


def _tower(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if ".vision_model." in k}


def test_full_training_reads_the_image_and_keeps_the_tower(tmp_path, vlm):
    job = make_job(tmp_path, vlm, job_id="ft-vlm-full", hyper=dict(FULL, n_evals=2), rows=colour_records(2),
                   validation=colour_records(1))  # fmt: skip
    assert run_in_process(job) == 0, job.events()[-3:]
    loss = job.metric("train/loss")
    assert loss[0] > 1.0 and loss[-1] < BLIND_FLOOR / 4, loss
    assert job.metric("eval/loss") and job.metric("eval/loss")[-1] < BLIND_FLOOR / 4
    start = next(e for e in job.events() if e["type"] == "training_start")
    assert "images and text" in start["message"] and "unpacked" in start["message"]
    data = next(e for e in job.events() if e["type"] == "training_data_download_complete")
    assert data["data"]["examples"] == 6 and data["data"]["dataset_format"] == "conversation"

    out = job.local(final_prefix(job.spec.job_id, "model"))
    assert (out / "processor_config.json").is_file() and (out / "chat_template.jinja").is_file()
    assert greedy_colours(out) == list(COLOURS)
    before, after = load_file(vlm / "model.safetensors"), load_file(out / "model.safetensors")
    tower = _tower(before)
    assert tower and all(torch.equal(tower[k], after[k].to(tower[k].dtype)) for k in tower)  # frozen
    text = [k for k in before if ".text_model.layers." in k]
    assert any(not torch.equal(before[k], after[k].to(before[k].dtype)) for k in text)


def test_lora_adapts_the_language_model_only(tmp_path, vlm):
    job = make_job(tmp_path, vlm, job_id="ft-vlm-lora", hyper=LORA, rows=colour_records(2))
    assert run_in_process(job) == 0, job.events()[-3:]
    loss = job.metric("train/loss")
    assert loss[-1] < BLIND_FLOOR / 2, loss
    adapter = job.local(final_prefix(job.spec.job_id, "adapter"))
    names = list(load_file(adapter / "adapter_model.safetensors"))
    assert names and all(".text_model." in n for n in names), names
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == job.spec.model.name
    assert greedy_colours(job.local(final_prefix(job.spec.job_id, "merged"))) == list(COLOURS)


def test_train_vision_trains_the_tower(tmp_path, vlm):
    full = make_job(tmp_path, vlm, job_id="ft-vlm-tower", hyper=dict(FULL, n_epochs=3), rows=colour_records(1),
                    train_vision=True)  # fmt: skip
    assert run_in_process(full) == 0, full.events()[-3:]
    before = _tower(load_file(vlm / "model.safetensors"))
    after = load_file(full.local(final_prefix(full.spec.job_id, "model")) / "model.safetensors")
    assert any(not torch.equal(before[k], after[k].to(before[k].dtype)) for k in before)

    lora = make_job(tmp_path, vlm, job_id="ft-vlm-tower-lora", hyper=dict(LORA, n_epochs=2), rows=colour_records(1),
                    train_vision=True)  # fmt: skip
    assert run_in_process(lora) == 0, lora.events()[-3:]
    adapter = lora.local(final_prefix(lora.spec.job_id, "adapter"))
    names = list(load_file(adapter / "adapter_model.safetensors"))
    assert any(".vision_model." in n for n in names) and any(".text_model." in n for n in names)
    assert not any(".connector." in n for n in names)
