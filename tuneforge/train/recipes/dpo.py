"""Preference tuning (DPO, with RPO's NLL term and SimPO's reference-free margin), LoRA or full, as one script:
preference pairs in, checkpoints, final weights and events out, in the SFT recipe's shape (`sft.py`; the model
files, the model and the final save are `common.py`'s).

Reads top to bottom: resolve the model -> tokenize the pairs -> build model, optimizer and schedule (or restore
them) -> the reference log-probabilities -> train with evaluations and checkpoints -> save and upload the weights.

The losses are TRL's (`DPOTrainer._compute_loss` in TRL 1.16, where they live inside the trainer, not as functions
to call): with d = (log p(chosen) - log p_ref(chosen)) - (log p(rejected) - log p_ref(rejected)), each log p
summed over its completion's tokens,
- DPO ("sigmoid"): -log sigmoid(beta d);
- `dpo_normalize_logratios_by_length` ("sigmoid_norm"): each completion's log-ratio divided by its token count;
- `simpo_gamma` (SimPO, CPOTrainer's "simpo"): reference-free, length-normalised, -log sigmoid(beta d - gamma);
- `rpo_alpha` (RPO, TRL's "sft" loss weighted by alpha): + alpha x the mean NLL of the chosen completions' tokens.
The loss of a step is the mean over its pairs (plus the RPO term over all its chosen tokens), however the step is
split into micro-batches and chunks.

The reference is the starting weights: their log-probabilities of every pair are computed once, before the first
step (TRL's `precompute_ref_log_probs`), so no second copy of the model is held; they are saved with each
checkpoint, so a resumed run keeps the same reference. For LoRA from the base this is the base with the adapter
disabled; from an SFT job's checkpoint it is that SFT model.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tuneforge.data.tokenization.examples import IGNORE, TokenizationReport
from tuneforge.data.tokenization.preference import PreferenceExample, tokenize_preference_blob
from tuneforge.errors import InvalidRequestError
from tuneforge.storage import BlobStore
from tuneforge.storage.layout import RESUME_DIR
from tuneforge.train import wandb_log
from tuneforge.train.batching import collate, make_row, micro_batches, plan_epoch, split_by_tokens, steps_per_epoch
from tuneforge.train.events import EventWriter
from tuneforge.train.loss import causal_lm, head_logits
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
)
from tuneforge.train.registry import Outcome
from tuneforge.train.schedule import checkpoint_steps, evenly_spaced, make_scheduler
from tuneforge.train.spec import Hyper, TrainSpec

METHOD = "dpo"
REFERENCE_FILE = "reference_logps.pt"  # in a checkpoint's resume folder: [pairs, 2] (chosen, rejected) sums


@dataclass(frozen=True)
class PairBatch:
    """Per pair of a chunk: the policy's summed log-probabilities of its chosen and rejected completions (with
    gradient), their token counts, and the chosen completions' summed NLL (for RPO)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor


def preference_loss(
    policy: PairBatch, reference: torch.Tensor | None, hp: Hyper
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pair: the loss, and the chosen and rejected rewards (β x the log-ratio as the loss sees it, detached).
    `reference` [pairs, 2] (None: reference-free)."""
    chosen, rejected = policy.chosen, policy.rejected
    if reference is not None and not hp.dpo_reference_free:
        chosen = chosen - reference[:, 0]
        rejected = rejected - reference[:, 1]
    if hp.dpo_normalize_logratios_by_length:
        chosen = chosen / policy.chosen_tokens.clamp(min=1)
        rejected = rejected / policy.rejected_tokens.clamp(min=1)
    losses = -F.logsigmoid(hp.dpo_beta * (chosen - rejected) - hp.simpo_gamma)
    return losses, (hp.dpo_beta * chosen).detach(), (hp.dpo_beta * rejected).detach()


def pair_rows(pairs: Sequence[PreferenceExample]) -> list[Any]:
    """Two rows per pair (chosen, then rejected), each the prompt and one completion, trained on the completion."""
    rows = []
    for p in pairs:
        for completion in (p.chosen_ids, p.rejected_ids):
            ids = [*p.prompt_ids, *completion]
            rows.append(make_row(ids, [IGNORE] * len(p.prompt_ids) + list(completion)))
    return rows


def sequence_logps(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of `batch` (from `batching.collate`): the summed log-probability of its trained targets, and their
    count. The head runs on the trained positions only."""
    lm = causal_lm(model)
    out = lm.get_decoder()(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    targets = batch["targets"]
    where = targets != IGNORE
    rows = targets.shape[0]
    row_of = torch.arange(rows, device=targets.device)[:, None].expand_as(targets)[where]
    wanted = targets[where].long()
    logits = head_logits(lm, out.last_hidden_state[where])
    logp = logits.log_softmax(dim=-1).gather(1, wanted[:, None]).squeeze(1)
    sums = torch.zeros(rows, dtype=logp.dtype, device=logp.device).index_add(0, row_of, logp)
    counts = torch.bincount(row_of, minlength=rows)
    return sums, counts


def _pair_batch(model: Any, pairs: Sequence[PreferenceExample], pad_id: int, device: torch.device) -> PairBatch:
    batch = {name: t.to(device) for name, t in collate(pair_rows(pairs), pad_id).items()}
    sums, counts = sequence_logps(model, batch)
    return PairBatch(sums[0::2], sums[1::2], counts[0::2], counts[1::2])


def _pair_length(p: PreferenceExample) -> int:
    return 2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids)


def _chunks(indices: Sequence[int], lengths: Sequence[int], budget: int) -> list[list[int]]:
    """`indices` of pairs (of tokens `lengths`, by `_pair_length`) in forwards of at most `budget` tokens, whole
    pairs: chosen and rejected together."""
    return split_by_tokens(list(indices), lengths, budget)


@torch.no_grad()
def reference_logps(
    model: Any, pairs: Sequence[PreferenceExample], pad_id: int, budget: int, device: torch.device,
    autocast: Callable[[], Any], heartbeat: Callable[[], None],
) -> torch.Tensor:  # fmt: skip
    """[pairs, 2]: the model's summed log-probabilities of each pair's chosen and rejected completion, as it is
    now (the reference), in eval mode."""
    model.eval()
    out = torch.zeros(len(pairs), 2, dtype=torch.float32)
    beat_at = time.monotonic() + 30
    for chunk in _chunks(range(len(pairs)), [_pair_length(p) for p in pairs], budget):
        with autocast():
            got = _pair_batch(model, [pairs[i] for i in chunk], pad_id, device)
        index = torch.tensor(chunk)
        out[index, 0] = got.chosen.float().cpu()
        out[index, 1] = got.rejected.float().cpu()
        if time.monotonic() > beat_at:
            heartbeat()
            beat_at = time.monotonic() + 30
    model.train()
    return out


def run(spec: TrainSpec, out: EventWriter, stop: threading.Event) -> Outcome:
    """Run one DPO job to its end (completed or cancelled); data problems raise InvalidRequestError."""
    hp = spec.hyper
    lora = hp.training_type == "lora"
    setup = begin(spec)
    device, blobs, work = setup.device, setup.blobs, setup.work

    # ---- 1. Model files: the base, plus the weights to start from (a checkpoint to resume, or from_checkpoint).
    files = prepare_model_files(spec, blobs, work, out)
    tokenizer, pad_id, resume_dir = files.tokenizer, files.pad_id, files.resume_dir
    if stop.is_set():
        return Outcome("cancelled", "Cancelled before training started")

    # ---- 2. Data: the preference pairs, each prompt kept whole and both completions cut to max_seq_length.
    out.event("training_data_downloading", "Downloading and tokenizing the preference data")
    pairs, report = _tokenize(blobs, spec.training_file_key, tokenizer, hp.max_seq_length, "training")
    total_tokens = report.trained_tokens + report.masked_tokens
    out.event(
        "training_data_download_complete",
        f"Preference data tokenized: {report.examples:,} pairs, {total_tokens:,} tokens ({report.trained_tokens:,} "
        f"in completions, {report.masked_tokens:,} in prompts), {report.truncated:,} truncated at "
        f"{hp.max_seq_length:,} tokens, {report.dropped:,} dropped{reasons(report)}",
        **data_fields(report),
    )
    val_pairs: list[PreferenceExample] = []
    if spec.validation_file_key and hp.n_evals > 0:
        out.event("validation_data_downloading", "Downloading and tokenizing the validation preference data")
        val_pairs, val_report = _tokenize(blobs, spec.validation_file_key, tokenizer, hp.max_seq_length, "validation")
        out.event("validation_data_download_complete", f"Validation data tokenized: {val_report.examples:,} pairs, "
                  f"{val_report.dropped:,} dropped{reasons(val_report)}")  # fmt: skip
    if stop.is_set():
        return Outcome("cancelled", "Cancelled before training started")

    # ---- 3. Model, optimizer, schedule (as SFT's).
    model = build_model(spec, files, device)
    lengths = [_pair_length(p) for p in pairs]
    longest = max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs)
    training = prepare_training(model, spec, device, longest)
    budget = max(training.mem.tokens_per_forward, max(lengths))  # a pair is never split
    saved = load_saved(files)
    batch_size = examples_per_step(spec, saved, training.mem, math.ceil(sum(lengths) / len(pairs)))
    accumulation = max(1, hp.gradient_accumulation_steps)
    per_epoch = steps_per_epoch(len(pairs), batch_size)
    total_steps = per_epoch * hp.n_epochs
    scheduler = make_scheduler(training.optimizer, hyper=hp, total_steps=total_steps)
    digest = plan_digest("pairs", lengths, batch_size, hp.seed)
    state = restore(saved, training, scheduler, digest, out)
    step, first_epoch, skip = int(state.get("step", 0)), int(state.get("epoch", 0)), int(state.get("step_in_epoch", 0))
    autocast = setup.autocast

    # ---- 4. The reference: the starting weights' log-probabilities, computed once (or kept from the checkpoint).
    reference: torch.Tensor | None = None
    val_reference: torch.Tensor | None = None
    reference_note = "reference-free (SimPO)" if hp.dpo_reference_free else ""
    reference_seconds: float | None = None
    if not hp.dpo_reference_free:
        kept = resume_dir / RESUME_DIR / REFERENCE_FILE if resume_dir is not None else None
        if kept is not None and kept.is_file():
            saved_ref = torch.load(kept, map_location="cpu", weights_only=True)
            reference, val_reference = saved_ref["train"], saved_ref.get("validation")
            reference_note = "reference log-probabilities kept from the checkpoint"
        if reference is None or reference.shape[0] != len(pairs):
            if resume_dir is not None:
                out.event("warning", "The checkpoint holds no reference log-probabilities for this data; the "
                          "reference is now the resumed weights", level="warning")  # fmt: skip
            started = time.perf_counter()
            beat = lambda: out.progress(step, total_steps)  # noqa: E731
            reference = reference_logps(model, pairs, pad_id, budget, device, autocast, beat)
            if val_pairs:
                val_reference = reference_logps(model, val_pairs, pad_id, budget, device, autocast, beat)
            reference_seconds = time.perf_counter() - started
            reference_note = (f"reference log-probabilities of {len(pairs) + len(val_pairs):,} pairs computed in "
                              f"{reference_seconds:.1f}s")  # fmt: skip
        elif val_pairs and (val_reference is None or val_reference.shape[0] != len(val_pairs)):
            out.event("warning", "The checkpoint holds no reference log-probabilities for the validation data; "
                      "its reference is now the resumed weights", level="warning")  # fmt: skip
            val_reference = reference_logps(model, val_pairs, pad_id, budget, device, autocast,
                                            lambda: out.progress(step, total_steps))  # fmt: skip

    eval_at = set(evenly_spaced(hp.n_evals, total_steps)) if val_pairs else set()
    ckpt_at = set(checkpoint_steps(hp.n_checkpoints, total_steps))
    manifest = manifest_base(spec, METHOD, total_steps)
    wandb_run = wandb_log.start(spec, out, total_steps)
    variant = ("SimPO" if hp.simpo_gamma > 0 else "DPO") + (f" + RPO (alpha {hp.rpo_alpha})" if hp.rpo_alpha else "")
    out.event(
        "training_start",
        f"{variant} training of {'LoRA' if lora else 'all'} weights of {spec.model.name} ({training.trainable:,} of "
        f"{training.total:,} parameters) for {total_steps:,} steps{f' from step {step}' if step else ''}: "
        f"{len(pairs):,} pairs x {hp.n_epochs} epochs, {batch_size:,} pairs per step"
        f"{f' in {accumulation} micro-batches' if accumulation > 1 else ''}, beta {hp.dpo_beta}"
        f"{f', gamma {hp.simpo_gamma}' if hp.simpo_gamma else ''}"
        f"{', log-ratios normalised by length' if hp.dpo_normalize_logratios_by_length else ''}; {reference_note}; "
        f"{setup.precision}, {setup.threads} threads on {device.type}",
        total_steps=total_steps,
        param_count=training.param_count(lora),
        trainable_params=training.trainable,
        token_count=total_tokens,
        batch_size=batch_size,
        examples=len(pairs),
        eval_steps=len(eval_at),
        step=step,
        dtype=setup.dtype,
        reference_seconds=reference_seconds,
    )

    def keep_reference(folder: Path) -> None:
        if reference is not None:
            kept = {"train": reference} | ({"validation": val_reference} if val_reference is not None else {})
            torch.save(kept, folder / REFERENCE_FILE)

    def save(at_step: int, at_epoch: int, in_epoch: int) -> None:
        at_epoch, in_epoch = resume_position(at_epoch, in_epoch, per_epoch)
        run_state = {"step": at_step, "epoch": at_epoch, "step_in_epoch": in_epoch, "examples_per_step": batch_size,
                     "plan_digest": digest, "total_steps": total_steps}  # fmt: skip
        save_checkpoint(spec, setup, out, model, tokenizer, training, scheduler, state=run_state, manifest=manifest,
                        extra=keep_reference)  # fmt: skip

    # ---- 5. Train: each step takes `batch_size` pairs, in `accumulation` micro-batches, each forwarded in chunks of
    # whole pairs (chosen and rejected in one forward). The loss is the mean over the step's pairs.
    cancelled = False
    last_loss: float | None = None  # the model card's
    last_eval: float | None = None
    for epoch in range(first_epoch, hp.n_epochs):
        plan = plan_epoch(len(pairs), batch_size=batch_size, seed=hp.seed, epoch=epoch)
        for k in range(skip, len(plan)):
            started = time.perf_counter()
            n_pairs = len(plan[k])
            n_chosen = sum(len(pairs[i].chosen_ids) for i in plan[k])
            sums = {"loss": 0.0, "chosen": 0.0, "rejected": 0.0, "right": 0.0, "logp_c": 0.0, "logp_r": 0.0,
                    "nll": 0.0}  # fmt: skip
            tokens = 0
            for micro in micro_batches(plan[k], accumulation):
                for chunk in _chunks(micro, lengths, budget):
                    with autocast():
                        got = _pair_batch(model, [pairs[i] for i in chunk], pad_id, device)
                    ref = reference[torch.tensor(chunk)].to(device) if reference is not None else None
                    losses, r_chosen, r_rejected = preference_loss(got, ref, hp)
                    nll = -got.chosen.sum()
                    total = losses.sum() / n_pairs
                    if hp.rpo_alpha:
                        total = total + hp.rpo_alpha * nll / max(1, n_chosen)
                    total.backward()
                    sums["loss"] += float(losses.detach().sum())
                    sums["chosen"] += float(r_chosen.sum())
                    sums["rejected"] += float(r_rejected.sum())
                    sums["right"] += float((r_chosen > r_rejected).sum())
                    sums["logp_c"] += float(got.chosen.detach().sum())
                    sums["logp_r"] += float(got.rejected.detach().sum())
                    sums["nll"] += float(nll.detach())
                    tokens += sum(lengths[i] for i in chunk)
            grad_norm, lr = optimizer_step(training, scheduler, hp.max_grad_norm)
            step += 1
            seconds = time.perf_counter() - started
            epoch_pos = epoch + (k + 1) / len(plan)
            values = {
                "train/loss": sums["loss"] / n_pairs + (hp.rpo_alpha * sums["nll"] / max(1, n_chosen)),
                "train/dpo_loss": sums["loss"] / n_pairs,
                "train/lr": lr,
                "train/grad_norm": grad_norm,
                "train/rewards/chosen": sums["chosen"] / n_pairs,
                "train/rewards/rejected": sums["rejected"] / n_pairs,
                "train/rewards/margins": (sums["chosen"] - sums["rejected"]) / n_pairs,
                "train/rewards/accuracies": sums["right"] / n_pairs,
                "train/logps/chosen": sums["logp_c"] / n_pairs,
                "train/logps/rejected": sums["logp_r"] / n_pairs,
                "train/tokens_per_second": tokens / max(seconds, 1e-9),
                "train/epoch": epoch_pos,
            }
            out.metric(step, **values)
            last_loss = values["train/loss"]
            out.progress(step, total_steps, epoch=epoch_pos)
            if wandb_run is not None:
                wandb_run.log(values, step=step)
            if step in eval_at:
                ev = _evaluate(model, val_pairs, val_reference, hp, pad_id, budget, device, autocast)
                out.metric(step, **ev)
                last_eval = ev["eval/loss"]
                if wandb_run is not None:
                    wandb_run.log(ev, step=step)
                out.event("eval_complete", f"Evaluation at step {step}: loss {ev['eval/loss']:.4f}, reward accuracy "
                          f"{ev['eval/rewards/accuracies']:.1%}", step=step, eval_loss=ev["eval/loss"])  # fmt: skip
            if stop.is_set() or step in ckpt_at:
                save(step, epoch, k + 1)
            if stop.is_set():
                cancelled = True
                break
        skip = 0
        if cancelled:
            break
        out.event("epoch_complete", f"Epoch {epoch + 1}/{hp.n_epochs} completed at step {step}", step=step,
                  epoch=epoch + 1)  # fmt: skip
    if wandb_run is not None:
        wandb_run.finish()
    if cancelled:
        return Outcome("cancelled", f"Cancelled at step {step} of {total_steps}; checkpoint saved", {"step": step})

    # ---- 6. Save: as SFT's.
    out.event("training_complete", f"Training completed at step {step} of {total_steps}", step=step)
    facts = {"examples": report.examples, "tokens": total_tokens, "trained_tokens": report.trained_tokens,
             "total_steps": total_steps, "batch_size": batch_size, "final_loss": last_loss,
             "eval_loss": last_eval}  # fmt: skip
    main_prefix = save_finals(spec, blobs, work, out, model, files, step=step, meta=dict(manifest, step=step),
                              facts=facts)  # fmt: skip
    data: dict[str, Any] = {"step": step, "total_steps": total_steps, "model_path": main_prefix}
    return Outcome("completed", f"Training completed ({step} steps)", data)


# ---- helpers -----------------------------------------------------------------------------------------------------


def _tokenize(
    blobs: BlobStore, key: str, tokenizer: Any, max_seq_length: int, which: str
) -> tuple[list[PreferenceExample], TokenizationReport]:
    """The stored preference file's pairs; a file that cannot be read, or leaves no pair, is the user's to fix."""
    try:
        with blobs.open(key) as stream:
            pairs, report = tokenize_preference_blob(stream, tokenizer=tokenizer, max_seq_length=max_seq_length)
    except ValueError as exc:
        raise InvalidRequestError(f"The {which} file {key.rsplit('/', 1)[-1]} could not be tokenized: {exc}") from exc
    if not pairs:
        raise InvalidRequestError(
            f"The {which} file has no usable preference pairs: {report.dropped:,} dropped{reasons(report)}"
        )
    return pairs, report


@torch.no_grad()
def _evaluate(
    model: Any, pairs: list[PreferenceExample], reference: torch.Tensor | None, hp: Hyper, pad_id: int, budget: int,
    device: torch.device, autocast: Callable[[], Any],
) -> dict[str, float]:  # fmt: skip
    """The validation pairs' mean loss, reward margin and reward accuracy."""
    model.eval()
    loss = margin = right = 0.0
    for chunk in _chunks(range(len(pairs)), [_pair_length(p) for p in pairs], budget):
        with autocast():
            got = _pair_batch(model, [pairs[i] for i in chunk], pad_id, device)
        ref = reference[torch.tensor(chunk)].to(device) if reference is not None else None
        losses, r_chosen, r_rejected = preference_loss(got, ref, hp)
        loss += float(losses.sum())
        margin += float((r_chosen - r_rejected).sum())
        right += float((r_chosen > r_rejected).sum())
    model.train()
    n = max(1, len(pairs))
    return {"eval/loss": loss / n, "eval/rewards/margins": margin / n, "eval/rewards/accuracies": right / n}
