"""Supervised fine-tuning, LoRA or full, as one script: model and data in, checkpoints, final weights and events out.

Reads top to bottom: resolve the model -> tokenize the data -> build model, optimizer and schedule (or restore them
from a checkpoint) -> train with evaluations, early stopping and checkpoints -> save and upload the final weights.
Knows the TrainSpec, the blob store and the event stream; nothing about jobs, the database or HTTP.

Data-parallel (`spec.processes` > 1, under torchrun; `train/distributed.py`): every rank tokenizes and builds the
model alike, takes its share of each step's examples and backpropagates its loss over the whole step's trained
tokens; the gradients are summed across ranks before the optimizer step, so every rank takes the step one process
would. Metrics, evaluations and the stop flag are reduced across ranks, so every rank decides alike (early stopping,
cancelling); rank 0 alone writes events, the tokenized set, checkpoints and final weights. A vision-language model
trains in one process only (its examples carry images, not shared among ranks here); the job layer never asks
otherwise (`jobs/specs.py`), and a run started so by hand is refused.
"""

from __future__ import annotations

import functools
import io
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from tuneforge.data.tokenization.examples import (
    NO_TRAINED,
    NO_TRAINED_AFTER_TRUNCATION,
    TokenizationReport,
    TokenizedExample,
)
from tuneforge.data.tokenization.tokenize import tokenize_blob
from tuneforge.errors import InvalidRequestError
from tuneforge.storage import BlobStore
from tuneforge.storage.layout import tokenized_key
from tuneforge.train import distributed as dist
from tuneforge.train import wandb_log
from tuneforge.train.batching import (
    Row,
    collate,
    example_row,
    lay_out,
    longest_first,
    micro_batches,
    plan_epoch,
    split_by_tokens,
    steps_per_epoch,
)
from tuneforge.train.events import EventWriter
from tuneforge.train.loss import trained_token_loss
from tuneforge.train.recipes.common import (
    begin,
    build_model,
    data_fields,
    examples_per_step,
    load_saved,
    manifest_base,
    optimizer_step,
    plan_digest,
    prepare_model_files,
    prepare_training,
    reasons,
    restore,
    resume_position,
    save_checkpoint,
    save_finals,
    vocab_size,
)
from tuneforge.train.registry import Outcome
from tuneforge.train.schedule import checkpoint_steps, evenly_spaced, make_scheduler
from tuneforge.train.spec import TrainSpec
from tuneforge.train.vision import pixel_inputs, vision_token_loss

METHOD = "sft"
CONVERSATION_SHARE_WARNING = 0.99
NO_TRAINED_REASONS = (NO_TRAINED, NO_TRAINED_AFTER_TRUNCATION)


def run(spec: TrainSpec, out: EventWriter, stop: threading.Event) -> Outcome:
    """Run one SFT job to its end (completed, cancelled or early-stopped); data problems raise InvalidRequestError."""
    hp = spec.hyper
    lora = hp.training_type == "lora"
    setup = begin(spec)
    device, blobs, work = setup.device, setup.blobs, setup.work

    # ---- 1. Model files: the base, plus the weights to start from (a checkpoint to resume, or from_checkpoint).
    files = prepare_model_files(spec, blobs, work, out)
    tokenizer, pad_id = files.tokenizer, files.pad_id
    if files.vision and dist.size() > 1:
        raise InvalidRequestError(f"{spec.model.name} is a vision-language model, which trains in one process; run "
                                  f"it with processes=1 (it was started as {dist.size()})")  # fmt: skip
    if dist.any_rank(stop.is_set()):
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
        f"at {hp.max_seq_length:,} tokens, {report.dropped:,} dropped{reasons(report)}",
        **data_fields(report),
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
    val_images: list[tuple[str, ...]] | None = None
    if spec.validation_file_key and hp.n_evals > 0:
        out.event("validation_data_downloading", "Downloading and tokenizing the validation file")
        val_type = _sniff_filetype(blobs, spec.validation_file_key)
        val_examples, val_report = _tokenize(blobs, spec.validation_file_key, val_type, tokenizer, spec, vocab)
        _refuse_unusable(val_report, "validation", hp.max_seq_length)
        val_rows = [example_row(e) for e in val_examples]
        val_images = [e.images for e in val_examples] if files.vision else None
        out.event(
            "validation_data_download_complete",
            f"Validation data tokenized: {val_report.examples:,} examples, {val_report.trained_tokens:,} trained "
            f"tokens, {val_report.dropped:,} dropped{reasons(val_report)}",
        )
    key = tokenized_key(spec.job_id)
    if dist.is_main() and not blobs.exists(key):
        _write_tokenized(blobs, key, examples)
        out.event(
            "tokenized_dataset_upload_complete", "The tokenized training set is stored", tokenized_dataset_path=key
        )
    rows = [example_row(e) for e in examples]  # packing lays each step's examples into rows, in the step loop
    # A vision-language model's examples keep their images (data URLs), one example a row; the batch's pixels are
    # made from them step by step. Its loss runs the whole model on ids and pixels.
    images = [e.images for e in examples] if files.vision else None
    loss_of = vision_token_loss if files.vision else trained_token_loss
    del examples
    lengths = [r.length for r in rows]
    if dist.any_rank(stop.is_set()):
        return Outcome("cancelled", "Cancelled before training started")

    # ---- 3. Model: fp32 weights (bf16 autocast where it is fast, or where spec.dtype asks), LoRA or full.
    model = build_model(spec, files, device)
    training = prepare_training(model, spec, device, max(lengths))
    mem = training.mem
    # `batch_size` is examples per optimizer step, packing or not ("max": as many examples of the data's mean length
    # as one forward holds, decided once and kept by a resumed run). The data order is a pure function of (seed,
    # epoch, examples per step): a resumed run replays it exactly. Packing only lays a step's examples into rows of
    # up to max_seq_length tokens, and no longer than one forward's budget. Data-parallel ranks share each step, so
    # `batch_size` is the global one; the ranks agree on it ("max" follows each rank's free memory).
    saved = load_saved(files)
    batch_size = dist.min_over_ranks(examples_per_step(spec, saved, mem, math.ceil(sum(lengths) / len(lengths))))
    packing = hp.packing and not files.vision  # packed rows would mix several examples' images
    pack_to = max(max(lengths), min(hp.max_seq_length, mem.tokens_per_forward)) if packing else None
    accumulation = max(1, hp.gradient_accumulation_steps)
    # Each rank holds about 1/N of a step: as many micro-batches of about the same size as one process would use.
    rank_accumulation = -(-accumulation // dist.size())
    per_epoch = steps_per_epoch(len(rows), batch_size)
    total_steps = per_epoch * hp.n_epochs
    scheduler = make_scheduler(training.optimizer, hyper=hp, total_steps=total_steps)
    digest = plan_digest("examples", lengths, batch_size, hp.seed)
    state = restore(saved, training, scheduler, digest, out)
    step, first_epoch, skip = int(state.get("step", 0)), int(state.get("epoch", 0)), int(state.get("step_in_epoch", 0))
    early: dict[str, Any] = dict(state.get("early_stopping") or {"best": None, "best_step": 0, "bad": 0, "evals": 0})

    eval_at = set(evenly_spaced(hp.n_evals, total_steps)) if val_rows else set()
    ckpt_at = set(checkpoint_steps(hp.n_checkpoints, total_steps))
    manifest = manifest_base(spec, METHOD, total_steps)

    autocast = setup.autocast
    processes = dist.size()
    wandb_run = wandb_log.start(spec, out, total_steps) if dist.is_main() else None
    out.event(
        "training_start",
        f"Training {'LoRA' if lora else 'all'} weights of {spec.model.name} ({training.trainable:,} of "
        f"{training.total:,} parameters) for {total_steps:,} steps{f' from step {step}' if step else ''}: "
        f"{len(rows):,} examples x {hp.n_epochs} epochs, {batch_size:,} examples per step "
        f"({f'packed into rows of up to {pack_to:,} tokens' if pack_to else 'unpacked'}"
        f"{', images and text' if files.vision else ''})"
        f"{f' in {accumulation} micro-batches' if accumulation > 1 else ''}, {setup.precision}, "
        f"{f'{processes} data-parallel processes of ' if processes > 1 else ''}{setup.threads} threads on "
        f"{device.type}{', activation checkpointing' if mem.activation_checkpointing else ''}",
        total_steps=total_steps,
        param_count=training.param_count(lora),
        trainable_params=training.trainable,
        token_count=total_tokens,
        batch_size=batch_size,
        examples=len(rows),
        eval_steps=len(eval_at),
        step=step,
        dtype=setup.dtype,
        processes=processes,
    )

    def save(at_step: int, at_epoch: int, in_epoch: int) -> None:
        at_epoch, in_epoch = resume_position(at_epoch, in_epoch, per_epoch)
        run_state = {"step": at_step, "epoch": at_epoch, "step_in_epoch": in_epoch, "examples_per_step": batch_size,
                     "plan_digest": digest, "early_stopping": early, "total_steps": total_steps}  # fmt: skip
        # Nothing in it depends on the number of processes (every rank holds the same optimizer, schedule and RNG
        # state), so rank 0's is the run's, and it resumes at any number. No rank runs on before it is saved.
        if dist.is_main():
            save_checkpoint(spec, setup, out, model, tokenizer, training, scheduler, state=run_state,
                            manifest=manifest)  # fmt: skip
        dist.barrier()

    # ---- 4. Train: each optimizer step takes `batch_size` examples, split into `accumulation` micro-batches, each laid
    # into rows (packed or one per example) and forwarded in memory-sized chunks. The loss is the mean over every
    # trained token of the whole step, so neither the micro-batches, the rows nor the chunks change the arithmetic.
    # Data-parallel, nor do the ranks: each takes its share of the step's examples (`dist.shard`, balanced in tokens)
    # and divides by the whole step's trained tokens; the sum of the ranks' gradients is the step's.
    early_stopped = False
    cancelled = False
    last_loss: float | None = None  # the model card's
    last_eval: float | None = None
    for epoch in range(first_epoch, hp.n_epochs):
        plan = plan_epoch(len(rows), batch_size=batch_size, seed=hp.seed, epoch=epoch)
        for k in range(skip, len(plan)):
            started = time.perf_counter()
            n_trained = sum(rows[i].trained for i in plan[k])  # the whole step's, on every rank
            loss_sum, correct, real_tokens = 0.0, 0, 0
            for micro in micro_batches(dist.shard(plan[k], lengths), rank_accumulation):
                laid = lay_out([rows[i] for i in micro], pack_to)
                laid_lengths = [r.length for r in laid]
                # unpacked (images): laid row j is example micro[order[j]]
                order = longest_first([rows[i] for i in micro]) if images is not None else []
                for chunk in split_by_tokens(range(len(laid)), laid_lengths, mem.tokens_per_forward):
                    parts = collate([laid[i] for i in chunk], pad_id)
                    if images is not None:
                        parts.update(pixel_inputs(tokenizer, [images[micro[order[i]]] for i in chunk]))
                    batch = {name: t.to(device) for name, t in parts.items()}
                    with autocast():
                        chunk_loss, chunk_correct, _ = loss_of(model, batch)
                    (chunk_loss / max(1, n_trained)).backward()
                    loss_sum += float(chunk_loss.detach())
                    correct += int(chunk_correct)
                    real_tokens += sum(laid_lengths[i] for i in chunk)
            if processes > 1:
                dist.all_reduce_grads(training.params)
                summed = dist.all_reduce_sum([loss_sum, correct, real_tokens])
                loss_sum, correct, real_tokens = summed[0], int(summed[1]), int(summed[2])
            grad_norm, lr = optimizer_step(training, scheduler, hp.max_grad_norm)
            step += 1
            seconds = time.perf_counter() - started
            loss = loss_sum / max(1, n_trained)
            epoch_pos = epoch + (k + 1) / len(plan)
            values = {
                "train/loss": loss,
                "train/lr": lr,
                "train/grad_norm": grad_norm,
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
                eval_loss, eval_acc = _evaluate(
                    model,
                    val_rows,
                    pad_id,
                    mem.tokens_per_forward,
                    device,
                    autocast,
                    beat,
                    vision=(tokenizer, val_images) if val_images is not None else None,
                )
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

            stopping = dist.any_rank(stop.is_set())  # the ranks stop (and checkpoint) at the same step
            if stopping or (step in ckpt_at and not early_stopped):
                save(step, epoch, k + 1)
            if stopping:
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
    if not dist.is_main():  # rank 0 saves the final weights and reports; this rank's outcome is not written
        return Outcome("completed", f"Rank {dist.rank()} trained its share of {step} steps", {"step": step})

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


def _refuse_unusable(report: TokenizationReport, which: str, max_seq_length: int) -> None:
    """Stop before training when the data has nothing to learn from, saying why in the data's terms."""
    if report.trained_tokens > 0:
        return
    dropped = report.dropped_reasons
    cut = dropped.get(NO_TRAINED_AFTER_TRUNCATION, 0)
    if report.examples == 0 and cut and set(dropped) <= set(NO_TRAINED_REASONS):
        raise InvalidRequestError(
            f"Truncation at max_seq_length={max_seq_length} leaves no trained token in the {which} file: "
            f"{cut:,} of {report.dropped:,} examples lost every trained token to the cut{reasons(report)}; "
            "raise max_seq_length or shorten the prompts"
        )
    if report.examples == 0 and report.dropped and set(dropped) <= set(NO_TRAINED_REASONS):
        raise InvalidRequestError(
            f"Every token of every example of the {which} file is masked ({report.dropped:,} examples), so there "
            "is nothing to learn; check train_on_inputs, message weights, and that the examples have assistant "
            "answers or completions"
        )
    if report.examples == 0:
        raise InvalidRequestError(
            f"The {which} file has no usable examples: {report.dropped:,} dropped{reasons(report)}"
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
    vision: tuple[Any, list[tuple[str, ...]]] | None = None,
) -> tuple[float, float]:
    """Mean loss and token accuracy over every trained token of the validation rows.

    `heartbeat` is called every 30 s or so, so a long evaluation does not look like a silent, dead run. `vision`:
    a vision-language model's processor and each row's images. Data-parallel, each rank evaluates its share of the
    rows and the sums are added up across ranks, so every rank gets the same figures (and decides early stopping
    alike).
    """
    model.eval()
    lengths = [r.length for r in rows]
    loss_sum, correct, count = 0.0, 0, 0
    beat_at = time.monotonic() + 30
    for chunk in split_by_tokens(dist.shard(range(len(rows)), lengths), lengths, tokens_per_forward):
        parts = collate([rows[i] for i in chunk], pad_id)
        if vision is not None:
            parts.update(pixel_inputs(vision[0], [vision[1][i] for i in chunk]))
        batch = {name: t.to(device) for name, t in parts.items()}
        with autocast():
            chunk_loss, chunk_correct, n = (vision_token_loss if vision else trained_token_loss)(model, batch)
        loss_sum += float(chunk_loss)
        correct += int(chunk_correct)
        count += n
        if time.monotonic() > beat_at:
            heartbeat()
            beat_at = time.monotonic() + 30
    model.train()
    if dist.size() > 1:
        loss_sum, correct_sum, count_sum = dist.all_reduce_sum([loss_sum, correct, count])
        correct, count = int(correct_sum), int(count_sum)
    return loss_sum / max(1, count), correct / max(1, count)
