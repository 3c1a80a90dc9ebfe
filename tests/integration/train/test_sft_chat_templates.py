"""A Qwen3 model with its stock chat template trains on multi-turn conversations: the run takes TRL's training
version of the template, says so, masks every answer, and saves that template with its outputs (so serving renders
prompts as training did)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from recipe_support import make_job, run_in_process

from tuneforge.data.tokenization.hf_tokenizer import CHAT_TEMPLATE_FILE
from tuneforge.storage.layout import final_prefix
from tuneforge.train.tiny_models import save_tiny_model

TRL_TEMPLATES = Path(importlib.util.find_spec("trl").origin).parent / "chat_templates"

MULTI_TURN = [
    {
        "messages": [
            {"role": "user", "content": f"Count to {n}."},
            {"role": "assistant", "content": " ".join(str(i) for i in range(1, n + 1))},
            {"role": "user", "content": "Now backwards."},
            {"role": "assistant", "content": " ".join(str(i) for i in range(n, 0, -1))},
        ]
    }
    for n in range(2, 8)
]


def test_qwen3_stock_template_trains_multi_turn_with_trls_training_template(tmp_path: Path) -> None:
    model = save_tiny_model(tmp_path / "qwen3", "qwen3")
    (model / CHAT_TEMPLATE_FILE).write_text((TRL_TEMPLATES / "qwen3.jinja").read_text(encoding="utf-8"))
    job = make_job(tmp_path, model, job_id="ft-qwen3", rows=MULTI_TURN, hyper={"n_epochs": 1, "n_checkpoints": 1})
    assert run_in_process(job) == 0
    assert job.result()["status"] == "completed", job.result()
    ready = next(e for e in job.events() if e["type"] == "model_download_complete")["message"]
    assert "qwen3_training" in ready
    data = next(e for e in job.events() if e["type"] == "training_data_download_complete")["data"]
    assert data["examples"] == len(MULTI_TURN) and data["dropped"] == 0
    assert 0 < data["trained_tokens"] < data["token_count"]  # answers trained, prompts masked
    training = (TRL_TEMPLATES / "qwen3_training.jinja").read_text(encoding="utf-8")
    for variant in ("adapter", "merged"):
        saved = job.local(final_prefix(job.spec.job_id, variant)) / CHAT_TEMPLATE_FILE
        assert saved.read_text(encoding="utf-8") == training, variant
