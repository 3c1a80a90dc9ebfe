"""The fine-tuning half of the demo: a LoRA job through the together SDK, watched live, then the result asked a
question from the training data through the SDK's chat, next to the base model (both served by the server).
"""

from __future__ import annotations

import io
import sys
import tarfile
import time
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


def answer(client: Any, model: str, question: str) -> str:
    """Greedy answer of a served model (the base, or a fine-tuned output by its name) through the SDK's chat."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    out = client.chat.completions.create(model=model, messages=messages, max_tokens=48, temperature=0)
    return str(out.choices[0].message.content or "").strip()


def run(client: Any, file_id: str) -> bool:
    """Fine-tune, watch, download, chat. Returns whether the tuned model learned the answer."""
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

    output = getattr(job, "output_name", None) or job.x_model_output_name
    archive = client.fine_tuning.content(ft_id=job.id, checkpoint="adapter").read()
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        names = tar.getnames()
    print(f"\nthe adapter downloads as a {len(archive) >> 10} KiB archive of {len(names)} files")
    print("\n== chatting with the base model and the fine-tuned one, served at once (serverless LoRA)")
    before = answer(client, BASE_MODEL, QUESTION)
    after = answer(client, output, QUESTION)
    print(f"Q: {QUESTION}\n  base model : {before}\n  fine-tuned : {after}")
    learned = EXPECTED in after
    print(f"the fine-tuned model {'answers' if learned else 'does NOT answer'} the way the data taught ({EXPECTED!r})")
    return learned
