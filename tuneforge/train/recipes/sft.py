"""Supervised fine-tuning, LoRA or full, as one script: model and data in, checkpoints, final weights and events out.

Reads top to bottom: resolve the model -> tokenize the data -> build model, optimizer and schedule (or restore them
from a checkpoint) -> train with evaluations, early stopping and checkpoints -> save and upload the final weights.
Knows the TrainSpec, the blob store and the event stream; nothing about jobs, the database or HTTP.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import random
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tuneforge.data.tokenization.examples import (
    NO_TRAINED,
    NO_TRAINED_AFTER_TRUNCATION,
    TokenizationReport,
    TokenizedExample,
)
from tuneforge.data.tokenization.tokenize import tokenize_blob
from tuneforge.errors import InvalidRequestError
from tuneforge.storage import BlobStore, open_blob_store
from tuneforge.storage.layout import RESUME_DIR, checkpoint_prefix, tokenized_key
from tuneforge.train import wandb_log
from tuneforge.train.batching import (
    Row,
    collate,
    example_row,
    lay_out,
    micro_batches,
    plan_epoch,
    split_by_tokens,
    steps_per_epoch,
)
from tuneforge.train.checkpoints import load_resume, publish, restore_rng, save_resume, write_manifest
from tuneforge.train.events import EventWriter
from tuneforge.train.fencing import check_current
from tuneforge.train.hardware import bf16_is_fast, compute_dtype, max_batch_examples, plan_memory, set_threads
from tuneforge.train.loss import causal_lm, trained_token_loss
from tuneforge.train.recipes.common import (
    build_model,
    manifest_base,
    prepare_model_files,
    save_finals,
    save_model,
    vocab_size,
)
from tuneforge.train.registry import Outcome
from tuneforge.train.schedule import checkpoint_steps, evenly_spaced, make_scheduler
from tuneforge.train.spec import TrainSpec

METHOD = "sft"
CONVERSATION_SHARE_WARNING = 0.99
NO_TRAINED_REASONS = (NO_TRAINED, NO_TRAINED_AFTER_TRUNCATION)


def run(spec: TrainSpec, out: EventWriter, stop: threading.Event) -> Outcome:
    """Run one SFT job to its end (completed, cancelled or early-stopped); data problems raise InvalidRequestError."""
    hp = spec.hyper
    lora = hp.training_type == "lora"
    device = torch.device(spec.device)
    threads = set_threads(spec.num_threads)
    use_bf16 = compute_dtype(spec.dtype, device) == torch.bfloat16
    blobs = open_blob_store(spec.storage_url)
    work = Path(spec.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    random.seed(hp.seed)
    np.random.seed(hp.seed % 2**32)
    torch.manual_seed(hp.seed)

    # ---- 1. Model files: the base, plus the weights to start from (a checkpoint to resume, or from_checkpoint).
    files = prepare_model_files(spec, blobs, work, out)
    tokenizer, pad_id, resume_dir = files.tokenizer, files.pad_id, files.resume_dir
    if stop.is_set():
        return Outcome("cancelled", "Cancelled before training started")

    # ---- 2. Data: tokenize (masking per train_on_inputs), check, publish the tokenized set; one row per example.
    out.event("training_data_downloading", "Downloading and tokenizing the training file")
    vocab = vocab_size(files.weights_dir)
    examples, report = _tokenize(blobs, spec.training_file_key, spec.training_file_type, tokenizer, spec, vocab)
    _refuse_unusable(report, "training", hp.max_seq_length)
    total_tokens = report.trained_tokens + report.masked_tokens
    out.event(
        "training_data_download_complete",
        f"Training data tokenized: {report.examples:,} examples, {total_tokens:,} tokens "
        f"({report.trained_tokens:,} trained, {report.masked_tokens:,} masked), {report.truncated:,} truncated "
        f"at {hp.max_seq_length:,} tokens, {report.dropped:,} dropped{_reasons(report)}",
        token_count=total_tokens,
        trained_tokens=report.trained_tokens,
        masked_tokens=report.masked_tokens,
        examples=report.examples,
        truncated=report.truncated,
        dropped=report.dropped,
        dropped_reasons=dict(report.dropped_reasons),
        dataset_format=report.format,
    )
    if report.format == "conversation" and report.trained_share() > CONVERSATION_SHARE_WARNING:
        out.event(
            "warning",
            f"{report.trained_share():.1%} of the tokens of this conversational dataset are trained, so the model "
            "also learns to write the user's turns; set train_on_inputs to false (or 'auto') to train on the "
            "assistant's answers only",
            level="warning",
        )
    val_rows: list[Row] = []
    if spec.validation_file_key and hp.n_evals > 0:
        out.event("validation_data_downloading", "Downloading and tokenizing the validation file")
        val_type = _sniff_filetype(blobs, spec.validation_file_key)
        val_examples, val_report = _tokenize(blobs, spec.validation_file_key, val_type, tokenizer, spec, vocab)
        _refuse_unusable(val_report, "validation", hp.max_seq_length)
        val_rows = [example_row(e) for e in val_examples]
        out.event(
            "validation_data_download_complete",
            f"Validation data tokenized: {val_report.examples:,} examples, {val_report.trained_tokens:,} trained "
            f"tokens, {val_report.dropped:,} dropped{_reasons(val_report)}",
        )
    key = tokenized_key(spec.job_id)
    if not blobs.exists(key):
        _write_tokenized(blobs, key, examples)
        out.event(
            "tokenized_dataset_upload_complete", "The tokenized training set is stored", tokenized_dataset_path=key
        )
    rows = [example_row(e) for e in examples]  # packing lays each step's examples into rows, in the step loop
    del examples
    lengths = [r.length for r in rows]
    if stop.is_set():
        return Outcome("cancelled", "Cancelled before training started")

    # ---- 3. Model: fp32 weights (bf16 autocast where it is fast, or where spec.dtype asks), LoRA or full.
    model = build_model(spec, files, device)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    total_params = sum(p.numel() for p in model.parameters())
    param_count = total_params - trainable if lora else total_params

    mem = plan_memory(causal_lm(model).config, total_params=total_params, trainable_params=trainable,
                      longest_row=max(lengths), device=device)  # fmt: skip
    if mem.activation_checkpointing:
        causal_lm(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]  # norms and biases are not decayed
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=hp.learning_rate,
    )
    # `batch_size` is examples per optimizer step, packing or not ("max": as many examples of the data's mean length
    # as one forward holds, decided once and kept by a resumed run). The data order is a pure function of (seed,
    # epoch, examples per step): a resumed run replays it exactly. Packing only lays a step's examples into rows of
    # up to max_seq_length tokens, and no longer than one forward's budget.
    saved = load_resume(resume_dir / RESUME_DIR) if resume_dir is not None else None
    if saved is not None and "examples_per_step" in saved[3]:
        batch_size = int(saved[3]["examples_per_step"])
    elif hp.batch_size == "max":
        batch_size = max_batch_examples(mem, math.ceil(sum(lengths) / len(lengths)), most=spec.plan.max_batch_size)
    else:
        batch_size = int(hp.batch_size)
    pack_to = max(max(lengths), min(hp.max_seq_length, mem.tokens_per_forward)) if hp.packing else None
    accumulation = max(1, hp.gradient_accumulation_steps)
    per_epoch = steps_per_epoch(len(rows), batch_size)
    total_steps = per_epoch * hp.n_epochs
    scheduler = make_scheduler(optimizer, hyper=hp, total_steps=total_steps)
    plan_digest = hashlib.sha256(json.dumps(["examples", lengths, batch_size, hp.seed]).encode()).hexdigest()
    step, first_epoch, skip = 0, 0, 0
    early: dict[str, Any] = {"best": None, "best_step": 0, "bad": 0, "evals": 0}
    if saved is not None:
        opt_state, sched_state, rng_state, state = saved
        optimizer.load_state_dict(opt_state)
        scheduler.load_state_dict(sched_state)
        restore_rng(rng_state)
        step, first_epoch, skip = int(state["step"]), int(state["epoch"]), int(state["step_in_epoch"])
        early = dict(state.get("early_stopping") or early)
        if state.get("plan_digest") != plan_digest:
            out.event("warning", "The training data or batch plan changed since the checkpoint; the data order "
                      "after resuming differs from the interrupted run's", level="warning")  # fmt: skip

    eval_at = set(evenly_spaced(hp.n_evals, total_steps)) if val_rows else set()
    ckpt_at = set(checkpoint_steps(hp.n_checkpoints, total_steps))
    manifest = manifest_base(spec, METHOD, total_steps)

    def autocast() -> torch.autocast:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    wandb_run = wandb_log.start(spec, out, total_steps)
    precision = "fp32" if not use_bf16 else "bf16 autocast" + ("" if bf16_is_fast(device) else " (emulated: slow)")
    out.event(
        "training_start",
        f"Training {'LoRA' if lora else 'all'} weights of {spec.model.name} ({trainable:,} of "
        f"{total_params:,} parameters) for {total_steps:,} steps{f' from step {step}' if step else ''}: "
        f"{len(rows):,} examples x {hp.n_epochs} epochs, {batch_size:,} examples per step "
        f"({f'packed into rows of up to {pack_to:,} tokens' if pack_to else 'unpacked'})"
        f"{f' in {accumulation} micro-batches' if accumulation > 1 else ''}, {precision}, {threads} threads on "
        f"{device.type}{', activation checkpointing' if mem.activation_checkpointing else ''}",
        total_steps=total_steps,
        param_count=param_count,
        trainable_params=trainable,
        token_count=total_tokens,
        batch_size=batch_size,
        examples=len(rows),
        eval_steps=len(eval_at),
        step=step,
        dtype="bf16" if use_bf16 else "fp32",
    )

    def save_checkpoint(at_step: int, at_epoch: int, in_epoch: int) -> None:
        folder = work / "checkpoints" / f"step-{at_step:06d}"
        shutil.rmtree(folder, ignore_errors=True)
        save_model(model, tokenizer, folder)
        if in_epoch >= per_epoch:
            at_epoch, in_epoch = at_epoch + 1, 0
        state = {"step": at_step, "epoch": at_epoch, "step_in_epoch": in_epoch, "examples_per_step": batch_size,
                 "plan_digest": plan_digest, "early_stopping": early, "total_steps": total_steps}  # fmt: skip
        save_resume(folder / RESUME_DIR, optimizer=optimizer, scheduler=scheduler, state=state)
        write_manifest(folder, kind="intermediate", step=at_step, adapter=lora, **manifest)
        prefix = checkpoint_prefix(spec.job_id, at_step)
        check_current(blobs, spec.job_id, spec.attempt)
        publish(blobs, folder, prefix)
        out.event("checkpoint_save", f"Checkpoint saved at step {at_step}", step=at_step, checkpoint_path=prefix)
        out.checkpoint(at_step, prefix, kind="intermediate", adapter=lora)

    # ---- 4. Train: each optimizer step takes `batch_size` examples, split into `accumulation` micro-batches, each laid
    # into rows (packed or one per example) and forwarded in memory-sized chunks. The loss is the mean over every
    # trained token of the whole step, so neither the micro-batches, the rows nor the chunks change the arithmetic.
    early_stopped = False
    cancelled = False
    last_loss: float | None = None  # the model card's
    last_eval: float | None = None
    for epoch in range(first_epoch, hp.n_epochs):
        plan = plan_epoch(len(rows), batch_size=batch_size, seed=hp.seed, epoch=epoch)
        for k in range(skip, len(plan)):
            started = time.perf_counter()
            n_trained = sum(rows[i].trained for i in plan[k])
            loss_sum, correct, real_tokens = 0.0, 0, 0
            for micro in micro_batches(plan[k], accumulation):
                laid = lay_out([rows[i] for i in micro], pack_to)
                laid_lengths = [r.length for r in laid]
                for chunk in split_by_tokens(range(len(laid)), laid_lengths, mem.tokens_per_forward):
                    batch = {name: t.to(device) for name, t in collate([laid[i] for i in chunk], pad_id).items()}
                    with autocast():
                        chunk_loss, chunk_correct, _ = trained_token_loss(model, batch)
                    (chunk_loss / max(1, n_trained)).backward()
                    loss_sum += float(chunk_loss.detach())
                    correct += int(chunk_correct)
                    real_tokens += sum(laid_lengths[i] for i in chunk)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, hp.max_grad_norm if hp.max_grad_norm > 0 else math.inf)
            lr = float(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            seconds = time.perf_counter() - started
            loss = loss_sum / max(1, n_trained)
            epoch_pos = epoch + (k + 1) / len(plan)
            values = {
                "train/loss": loss,
                "train/lr": lr,
                "train/grad_norm": float(grad_norm),
                "train/token_accuracy": correct / max(1, n_trained),
                "train/tokens_per_second": real_tokens / max(seconds, 1e-9),
                "train/epoch": epoch_pos,
            }
            out.metric(step, **values)
            last_loss = loss
            out.progress(step, total_steps, epoch=epoch_pos)
            if wandb_run is not None:
                wandb_run.log(values, step=step)

            if step in eval_at:
                beat = functools.partial(out.progress, step, total_steps, epoch=epoch_pos)
                eval_loss, eval_acc = _evaluate(model, val_rows, pad_id, mem.tokens_per_forward, device, autocast, beat)
                early["evals"] += 1
                out.metric(step, **{"eval/loss": eval_loss, "eval/token_accuracy": eval_acc})
                last_eval = eval_loss
                if wandb_run is not None:
                    wandb_run.log({"eval/loss": eval_loss, "eval/token_accuracy": eval_acc}, step=step)
                out.event("eval_complete", f"Evaluation at step {step}: loss {eval_loss:.4f}, token accuracy "
                          f"{eval_acc:.1%}", step=step, eval_loss=eval_loss)  # fmt: skip
                improved = early["best"] is None or eval_loss < early["best"] - hp.early_stopping_min_delta
                if improved:
                    early.update(best=eval_loss, best_step=step, bad=0)
                elif early["evals"] > hp.early_stopping_warmup_evals:
                    early["bad"] += 1
                if hp.early_stopping_enabled and early["bad"] >= hp.early_stopping_patience and step < total_steps:
                    early_stopped = True
                    out.event(
                        "early_stopped",
                        f"Early stopping at step {step}: the evaluation loss did not improve by more than "
                        f"{hp.early_stopping_min_delta} for {early['bad']} evaluations; the best was "
                        f"{early['best']:.4f} at step {early['best_step']}",
                        step=step,
                        early_stopping_best_step=early["best_step"],
                        early_stopping_best_metric_value=early["best"],
                    )

            if stop.is_set() or (step in ckpt_at and not early_stopped):
                save_checkpoint(step, epoch, k + 1)
            if stop.is_set():
                cancelled = True
                break
            if early_stopped:
                break
        skip = 0
        if cancelled or early_stopped:
            break
        out.event("epoch_complete", f"Epoch {epoch + 1}/{hp.n_epochs} completed at step {step}", step=step,
                  epoch=epoch + 1)  # fmt: skip
    if wandb_run is not None:
        wandb_run.finish()
    if cancelled:
        return Outcome("cancelled", f"Cancelled at step {step} of {total_steps}; checkpoint saved", {"step": step})

    # ---- 5. Save: the adapter and the merged model (LoRA) or the whole model (full), each self-describing.
    out.event("training_complete", f"Training completed at step {step} of {total_steps}", step=step)
    final_meta = dict(manifest, step=step, early_stopped=early_stopped)
    facts = {"examples": report.examples, "tokens": total_tokens, "trained_tokens": report.trained_tokens,
             "total_steps": total_steps, "batch_size": batch_size, "final_loss": last_loss,
             "eval_loss": last_eval}  # fmt: skip
    main_prefix = save_finals(spec, blobs, work, out, model, files, step=step, meta=final_meta, facts=facts)
    how = f"early-stopped at step {step} of {total_steps}" if early_stopped else f"{step} steps"
    data: dict[str, Any] = {"step": step, "total_steps": total_steps, "model_path": main_prefix}
    if early["best"] is not None:
        data.update(early_stopping_best_step=early["best_step"], early_stopping_best_metric=early["best"])
    return Outcome("completed", f"Training completed ({how})", data)


# ---- helpers (plain functions; nothing here holds state between calls) -------------------------------------------


def _tokenize(
    blobs: BlobStore, key: str, filetype: str, tokenizer: Any, spec: TrainSpec, vocab: int | None
) -> tuple[list[TokenizedExample], TokenizationReport]:
    """Tokenize a stored file; a file that cannot be read as a dataset (or whose pre-tokenized ids fall outside
    the model's vocabulary `vocab`) is the user's to fix."""
    hp = spec.hyper
    try:
        with blobs.open(key) as stream:
            return tokenize_blob(stream, filetype=filetype, tokenizer=tokenizer, dataset_format=None,
                                 train_on_inputs=hp.train_on_inputs, max_seq_length=hp.max_seq_length,
                                 vocab_size=vocab)  # fmt: skip
    except ValueError as exc:
        raise InvalidRequestError(f"The file {key.rsplit('/', 1)[-1]} could not be tokenized: {exc}") from exc


def _reasons(report: TokenizationReport) -> str:
    if not report.dropped_reasons:
        return ""
    return " (" + ", ".join(f"{n:,} {why.replace('_', ' ')}" for why, n in sorted(report.dropped_reasons.items())) + ")"


def _refuse_unusable(report: TokenizationReport, which: str, max_seq_length: int) -> None:
    """Stop before training when the data has nothing to learn from, saying why in the data's terms."""
    if report.trained_tokens > 0:
        return
    reasons = report.dropped_reasons
    cut = reasons.get(NO_TRAINED_AFTER_TRUNCATION, 0)
    if report.examples == 0 and cut and set(reasons) <= set(NO_TRAINED_REASONS):
        raise InvalidRequestError(
            f"Truncation at max_seq_length={max_seq_length} leaves no trained token in the {which} file: "
            f"{cut:,} of {report.dropped:,} examples lost every trained token to the cut{_reasons(report)}; "
            "raise max_seq_length or shorten the prompts"
        )
    if report.examples == 0 and report.dropped and set(reasons) <= set(NO_TRAINED_REASONS):
        raise InvalidRequestError(
            f"Every token of every example of the {which} file is masked ({report.dropped:,} examples), so there "
            "is nothing to learn; check train_on_inputs, message weights, and that the examples have assistant "
            "answers or completions"
        )
    if report.examples == 0:
        raise InvalidRequestError(
            f"The {which} file has no usable examples: {report.dropped:,} dropped{_reasons(report)}"
        )
    raise InvalidRequestError(
        f"Every token of the {which} file is masked ({report.masked_tokens:,} masked, 0 trained), so there is "
        "nothing to learn; check train_on_inputs and that the examples have assistant answers or completions"
    )


def _sniff_filetype(blobs: BlobStore, key: str) -> str:
    with blobs.open(key) as fh:
        return "parquet" if fh.read(4) == b"PAR1" else "jsonl"


def _write_tokenized(blobs: BlobStore, key: str, examples: list[TokenizedExample]) -> None:
    """The tokenized training set as parquet (input_ids, labels), for download-tokenized-dataset."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "input_ids": pa.array([e.input_ids for e in examples], type=pa.list_(pa.int32())),
            "labels": pa.array([e.labels for e in examples], type=pa.list_(pa.int32())),
        }
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    with blobs.writer(key) as w:
        w.write(buf.getvalue())


@torch.no_grad()
def _evaluate(
    model: Any,
    rows: list[Row],
    pad_id: int,
    tokens_per_forward: int,
    device: torch.device,
    autocast: Callable[[], Any],
    heartbeat: Callable[[], None],
) -> tuple[float, float]:
    """Mean loss and token accuracy over every trained token of the validation rows.

    `heartbeat` is called every 30 s or so, so a long evaluation does not look like a silent, dead run.
    """
    model.eval()
    lengths = [r.length for r in rows]
    loss_sum, correct, count = 0.0, 0, 0
    beat_at = time.monotonic() + 30
    for chunk in split_by_tokens(range(len(rows)), lengths, tokens_per_forward):
        batch = {name: t.to(device) for name, t in collate([rows[i] for i in chunk], pad_id).items()}
        with autocast():
            chunk_loss, chunk_correct, n = trained_token_loss(model, batch)
        loss_sum += float(chunk_loss)
        correct += int(chunk_correct)
        count += n
        if time.monotonic() > beat_at:
            heartbeat()
            beat_at = time.monotonic() + 30
    model.train()
    return loss_sum / max(1, count), correct / max(1, count)
