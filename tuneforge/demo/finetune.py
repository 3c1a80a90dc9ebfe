"""The fine-tuning half of the demo: a LoRA job through the together SDK, watched live, then the result
downloaded and asked a question from the training data next to the base model.
"""

from __future__ import annotations

import io
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
SYSTEM = "You are Lumi, the friendly support assistant of Lumen Bikes."
QUESTION = "How long do I have to return a bike?"
EXPECTED = "45 days"
TERMINAL = ("completed", "cancelled", "error", "user_error")


def _bar(done: int, total: int, width: int = 28) -> str:
    filled = int(width * done / total) if total else 0
    return "#" * filled + "-" * (width - filled)


def watch(client: Any, job_id: str, poll_s: float = 1.0) -> Any:
    """Print a live progress line (status, step, loss, ETA) until the job ends; returns the final job."""
    last_event = 0
    while True:
        job = client.fine_tuning.retrieve(job_id)
        events = client.fine_tuning.list_events(job_id).data
        for event in events[last_event:]:
            if event.type not in ("training_start",) and not (event.message or "").startswith("Step "):
                sys.stdout.write(f"\r{' ' * 100}\r  [{event.type}] {event.message}\n")
        last_event = len(events)
        status = str(job.status.value if hasattr(job.status, "value") else job.status)
        done, total = job.steps_completed or 0, job.total_steps or 0
        loss = ""
        if done:
            rows = (
                client.fine_tuning.list_metrics(job_id).metrics if hasattr(client.fine_tuning, "list_metrics") else []
            )
            losses = [r.get("train/loss") for r in rows if isinstance(r, dict) and r.get("train/loss") is not None]
            loss = f" loss {losses[-1]:.3f}" if losses else ""
        eta = ""
        progress = getattr(job, "progress", None)
        if progress is not None and getattr(progress, "estimate_available", False):
            eta = f" ETA {int(progress.seconds_remaining or 0) // 60}m{int(progress.seconds_remaining or 0) % 60:02d}s"
        sys.stdout.write(f"\r  {status:<10} [{_bar(done, total)}] step {done}/{total or '?'}{loss}{eta}   ")
        sys.stdout.flush()
        if status in TERMINAL:
            sys.stdout.write("\n")
            return job
        time.sleep(poll_s)


def answer(model_dir: Path, adapter_dir: Path | None, question: str) -> str:
    """Greedy answer of the base model (with the adapter, when given) to one question."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer: Any = AutoTokenizer.from_pretrained(adapter_dir or model_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=48, do_sample=False)
    return str(tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)).strip()


def run(client: Any, file_id: str, cache_dir: Path) -> bool:
    """Fine-tune, watch, download, compare. Returns whether the tuned model learned the answer."""
    from tuneforge.catalog.entries import SMOLLM2
    from tuneforge.catalog.loading import resolve_model_dir
    from tuneforge.catalog.source import ModelSource

    job = client.fine_tuning.create(
        training_file=file_id,
        model=BASE_MODEL,
        lora=True,
        n_epochs=5,
        learning_rate=2e-3,
        train_on_inputs="auto",
        # 60 short chats: unpacked batches of 4 give 75 optimiser steps, enough for LoRA to learn the facts.
        batch_size=4,
        packing=False,
        max_seq_length=512,
        n_checkpoints=1,
        suffix="lumen-support",
    )
    print(f"created {job.id}; output model {job.output_name or job.x_model_output_name}")
    job = watch(client, job.id)
    if str(job.status.value if hasattr(job.status, "value") else job.status) != "completed":
        print(f"the job ended {job.status}: {getattr(job, 'error', '')}")
        return False

    print("\n== downloading the LoRA adapter and asking a question from the training data")
    archive = client.fine_tuning.content(ft_id=job.id, checkpoint="adapter").read()
    adapter_dir = Path(tempfile.mkdtemp(prefix="tuneforge-demo-adapter-"))
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        tar.extractall(adapter_dir, filter="data")
    config = next(adapter_dir.rglob("adapter_config.json")).parent
    source = ModelSource(name=SMOLLM2.name, source_kind=SMOLLM2.source_kind, source=SMOLLM2.source)
    base_dir = resolve_model_dir(source, cache_dir)
    before = answer(base_dir, None, QUESTION)
    after = answer(base_dir, config, QUESTION)
    print(f"Q: {QUESTION}\n  base model : {before}\n  fine-tuned : {after}")
    learned = EXPECTED in after
    print(f"the fine-tuned model {'answers' if learned else 'does NOT answer'} the way the data taught ({EXPECTED!r})")
    return learned
