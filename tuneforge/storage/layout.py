"""Where each artifact lives in the BlobStore: one naming scheme shared by writers and readers.

files/<id>                                an uploaded file's bytes
jobs/<id>/spec.json                       the TrainSpec of the latest attempt
jobs/<id>/checkpoints/step-000040/        an intermediate checkpoint: weights (adapter or full), config,
                                          tokenizer + chat template, manifest.json; resume/ holds the
                                          optimizer and RNG state for resuming (never in archives)
jobs/<id>/final/adapter/                  LoRA jobs: the adapter (peft format) + tokenizer + manifest
jobs/<id>/final/merged/                   LoRA jobs: base model with the adapter fused in
jobs/<id>/final/model/                    full fine-tuning: the whole model
jobs/<id>/tokenized/train.parquet         the tokenized training set (input_ids, labels, ...)
jobs/<id>/archives/<variant>-<step>.tar.gz  download archives, built once on first request
"""

from __future__ import annotations

FINAL_VARIANTS = ("adapter", "merged", "model")
RESUME_DIR = "resume"
MANIFEST = "manifest.json"


def file_key(file_id: str) -> str:
    return f"files/{file_id}"


def job_prefix(job_id: str) -> str:
    return f"jobs/{job_id}"


def spec_key(job_id: str) -> str:
    return f"jobs/{job_id}/spec.json"


def checkpoint_prefix(job_id: str, step: int) -> str:
    return f"jobs/{job_id}/checkpoints/step-{step:06d}"


def final_prefix(job_id: str, variant: str) -> str:
    if variant not in FINAL_VARIANTS:
        raise ValueError(f"unknown final variant {variant!r}")
    return f"jobs/{job_id}/final/{variant}"


def tokenized_key(job_id: str) -> str:
    return f"jobs/{job_id}/tokenized/train.parquet"


def archive_key(job_id: str, variant: str, step: int) -> str:
    return f"jobs/{job_id}/archives/{variant}-{step}.tar.gz"
