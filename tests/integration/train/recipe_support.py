"""Recipe runs on a tiny model: a local blob store holding the data, specs and their event streams (the model folder
is the `tiny_model` fixture in conftest.py)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: a stray hub lookup fails at once

import torch

from tuneforge.storage import open_blob_store
from tuneforge.train import __main__ as entry
from tuneforge.train.spec import Hyper, ModelSource, TrainSpec, standalone_plan

QA = [
    ("What is the capital of France?", "Paris."),
    ("What is 2 + 2?", "4."),
    ("Say hello.", "Hello!"),
    ("What color is the sky?", "Blue."),
    ("Name a fruit.", "Apple."),
    ("What is the opposite of up?", "Down."),
    ("How many legs does a dog have?", "Four."),
    ("What do cows drink?", "Water."),
]


def conversations(repeat: int = 1) -> list[dict[str, Any]]:
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA]
    return rows * repeat


@dataclass
class Job:
    spec: TrainSpec
    path: Path
    root: Path

    @property
    def blobs(self) -> Any:
        return open_blob_store(self.spec.storage_url)

    def records(self) -> list[dict[str, Any]]:
        with open(self.spec.events_path) as fh:
            return [json.loads(line) for line in fh]

    def events(self) -> list[dict[str, Any]]:
        return [r for r in self.records() if r["kind"] == "event"]

    def types(self) -> list[str]:
        return [r["type"] for r in self.events()]

    def metric(self, name: str) -> list[float]:
        return [r["values"][name] for r in self.records() if r["kind"] == "metric" and name in r["values"]]

    def result(self) -> dict[str, Any]:
        [result] = [r for r in self.records() if r["kind"] == "result"]
        return result

    def local(self, key: str) -> Path:
        return Path(self.spec.storage_url) / key


def make_job(
    root: Path,
    model_dir: Path,
    *,
    job_id: str = "ft-test",
    hyper: dict[str, Any] | None = None,
    rows: list[dict[str, Any]] | None = None,
    raw: bytes | None = None,
    validation: list[dict[str, Any]] | None = None,
    attempt: int = 0,
    **changes: Any,
) -> Job:
    """A spec for `job_id` on a blob store shared by every job under `root`; the data is written into it.

    `changes` go to the TrainSpec, except the plan's own fields (`method`, `init`, `wandb`), which go to the plan."""
    plan_changes = {
        k: changes.pop(k) for k in ("method", "init", "wandb", "training_file_type", "train_vision") if k in changes
    }
    blobs = open_blob_store(str(root / "blobs"))
    train_key = f"files/{job_id}-train"
    with blobs.writer(train_key) as w:
        w.write(raw if raw is not None else "".join(json.dumps(r) + "\n" for r in rows or conversations()).encode())
    val_key = None
    if validation is not None:
        val_key = f"files/{job_id}-val"
        with blobs.writer(val_key) as w:
            w.write("".join(json.dumps(r) + "\n" for r in validation).encode())
    work = root / "work" / job_id
    spec = TrainSpec(
        job_id=job_id,
        attempt=attempt,
        plan=standalone_plan(
            ModelSource(name="tiny-llama", source_kind="local", source=str(model_dir)),
            Hyper(**({"learning_rate": 1e-2, "batch_size": 4} | (hyper or {}))),
            **plan_changes,
        ),
        storage_url=str(root / "blobs"),
        cache_dir=str(root / "cache"),
        work_dir=str(work),
        events_path=str(work / f"events-{attempt}.jsonl"),
        training_file_key=train_key,
        validation_file_key=val_key,
        output_prefix=f"jobs/{job_id}",
        output_name=f"me/tiny-{job_id}",
        num_threads=1,  # tiny matrices: one thread is fastest and least disturbed by a busy machine
        **changes,
    )
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"spec-{attempt}.json"
    path.write_bytes(spec.to_json())
    return Job(spec=spec, path=path, root=root)


def run_in_process(job: Job) -> int:
    """`python -m tuneforge.train SPEC`, in this process (the import cost is paid once per test session)."""
    return entry.main([str(job.path)])


def generate_answers(folder: Path) -> list[str]:
    """Greedy answers of the model in `folder` to the training questions, rendered with its own chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    answers = []
    for question, _ in QA:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
        answers.append(tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    return answers
