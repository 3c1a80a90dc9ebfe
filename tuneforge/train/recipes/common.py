"""What every recipe does the same way around its training loop: the run's device, threads, precision and seeds,
fetch the weights to start from, build the model (LoRA or full) and its optimizer, restore a resumed run, take an
optimizer step, save checkpoints and final weights, and the small helpers they need. The recipes (`sft.py`,
`dpo.py`) read top to bottom and call these; nothing here knows a loss or a data format.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

from tuneforge.catalog.loading import download_folder, resolve_model_dir
from tuneforge.data.tokenization.examples import TokenizationReport
from tuneforge.data.tokenization.templates import adopt_training_template
from tuneforge.errors import InvalidRequestError
from tuneforge.storage import BlobStore, open_blob_store
from tuneforge.storage.layout import RESUME_DIR, checkpoint_prefix, final_prefix
from tuneforge.train import distributed
from tuneforge.train.checkpoints import load_resume, publish, restore_rng, save_resume, save_weights, write_manifest
from tuneforge.train.events import EventWriter
from tuneforge.train.fencing import check_current
from tuneforge.train.hardware import (
    MemoryPlan,
    available_memory,
    bf16_is_fast,
    compute_dtype,
    max_batch_examples,
    plan_memory,
    set_threads,
)
from tuneforge.train.loss import causal_lm
from tuneforge.train.push import push_to_hub
from tuneforge.train.spec import TrainSpec
from tuneforge.train.vision import freeze_tower, is_vision_config, load_processor, lora_exclusions


@dataclass(frozen=True)
class Setup:
    """Where and how a run computes: its device, threads, precision (bf16 autocast over fp32 weights where bf16 is
    fast, or where spec.dtype asks), blob store and work folder."""

    device: torch.device
    threads: int
    use_bf16: bool
    blobs: BlobStore
    work: Path

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16)

    @property
    def precision(self) -> str:
        """For the training_start event."""
        if not self.use_bf16:
            return "fp32"
        return "bf16 autocast" + ("" if bf16_is_fast(self.device) else " (emulated: slow)")

    @property
    def dtype(self) -> str:
        return "bf16" if self.use_bf16 else "fp32"


def begin(spec: TrainSpec) -> Setup:
    """The run's setup, with every random generator seeded from the job's seed. In a data-parallel run every rank
    seeds alike (so all build the same model), computes on its own GPU (CUDA) and takes its share of the run's
    threads; they share the work folder, which rank 0 alone writes (`train/distributed.py`)."""
    device = distributed.local_device(torch.device(spec.device))
    threads = set_threads(distributed.threads_per_process(spec.num_threads))
    use_bf16 = compute_dtype(spec.dtype, device) == torch.bfloat16
    work = Path(spec.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    seed = spec.hyper.seed
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return Setup(device, threads, use_bf16, open_blob_store(spec.storage_url), work)


@dataclass
class Training:
    """A model's trainable parameters, its counts, the memory plan of its steps and its AdamW optimizer."""

    params: list[torch.nn.Parameter]
    trainable: int
    total: int
    mem: MemoryPlan
    optimizer: torch.optim.Optimizer

    def param_count(self, lora: bool) -> int:
        """The job object's param_count: the frozen base's for LoRA, every parameter for full training."""
        return self.total - self.trainable if lora else self.total


def prepare_training(model: Any, spec: TrainSpec, device: torch.device, longest_row: int) -> Training:
    """The memory plan for rows up to `longest_row` (activation checkpointing turned on where it says so) and AdamW
    over the trainable parameters, weight decay on matrices only (norms and biases are not decayed)."""
    hp = spec.hyper
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    total = sum(p.numel() for p in model.parameters())
    config = causal_lm(model).config
    # The ranks of a data-parallel run on CPU share this machine's memory: each plans with its share of it.
    ranks = distributed.size()
    free = available_memory(device) // ranks if device.type == "cpu" and ranks > 1 else None
    mem = plan_memory(getattr(config, "text_config", None) or config, total_params=total, trainable_params=trainable,
                      longest_row=longest_row, device=device, free_bytes=free)  # fmt: skip
    if mem.activation_checkpointing:
        causal_lm(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=hp.learning_rate,
    )
    return Training(params, trainable, total, mem, optimizer)


Saved = tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]


def load_saved(files: ModelFiles) -> Saved | None:
    """A resumed run's optimizer, scheduler, RNG and run state, from its checkpoint."""
    return load_resume(files.resume_dir / RESUME_DIR) if files.resume_dir is not None else None


def examples_per_step(spec: TrainSpec, saved: Saved | None, mem: MemoryPlan, mean_length: int) -> int:
    """`batch_size` in examples per optimizer step: a resumed run's own; "max": as many examples of the data's mean
    length as one forward holds (at most the model's limit); else as asked."""
    if saved is not None and "examples_per_step" in saved[3]:
        return int(saved[3]["examples_per_step"])
    if spec.hyper.batch_size == "max":
        return max_batch_examples(mem, mean_length, most=spec.plan.max_batch_size)
    return int(spec.hyper.batch_size)


def plan_digest(kind: str, lengths: list[int], batch_size: int, seed: int) -> str:
    """What a run's data order depends on: a resumed run whose digest differs replays another order."""
    return hashlib.sha256(json.dumps([kind, lengths, batch_size, seed]).encode()).hexdigest()


def restore(saved: Saved | None, training: Training, scheduler: Any, digest: str, out: EventWriter) -> dict[str, Any]:
    """Put a resumed run's optimizer, scheduler and RNG back; its run state (step, epoch, step_in_epoch, ...), or
    the start of a run ({} for a new one). Warns when the data or batch plan changed since the checkpoint."""
    if saved is None:
        return {}
    opt_state, sched_state, rng_state, state = saved
    training.optimizer.load_state_dict(opt_state)
    scheduler.load_state_dict(sched_state)
    restore_rng(rng_state)
    if state.get("plan_digest") != digest:
        out.event("warning", "The training data or batch plan changed since the checkpoint; the data order "
                  "after resuming differs from the interrupted run's", level="warning")  # fmt: skip
    return state


def optimizer_step(training: Training, scheduler: Any, max_grad_norm: float) -> tuple[float, float]:
    """Clip, step the optimizer and the schedule, clear the gradients; (the gradient norm before clipping, the
    learning rate the step used)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(training.params, max_grad_norm if max_grad_norm > 0 else math.inf)
    lr = float(training.optimizer.param_groups[0]["lr"])
    training.optimizer.step()
    scheduler.step()
    training.optimizer.zero_grad(set_to_none=True)
    return float(grad_norm), lr


def save_checkpoint(
    spec: TrainSpec, setup: Setup, out: EventWriter, model: Any, tokenizer: Any, training: Training, scheduler: Any,
    *, state: dict[str, Any], manifest: dict[str, Any], extra: Callable[[Path], None] | None = None,
) -> None:  # fmt: skip
    """An intermediate checkpoint at `state["step"]`: the weights, the resume state (optimizer, scheduler, RNG and
    `state`), what `extra` adds to the resume folder, the manifest; published, with its events."""
    step = int(state["step"])
    lora = spec.hyper.training_type == "lora"
    folder = setup.work / "checkpoints" / f"step-{step:06d}"
    shutil.rmtree(folder, ignore_errors=True)
    save_model(model, tokenizer, folder)
    save_resume(folder / RESUME_DIR, optimizer=training.optimizer, scheduler=scheduler, state=state)
    if extra is not None:
        extra(folder / RESUME_DIR)
    write_manifest(folder, kind="intermediate", step=step, adapter=lora, **manifest)
    prefix = checkpoint_prefix(spec.job_id, step)
    check_current(setup.blobs, spec.job_id, spec.attempt)
    publish(setup.blobs, folder, prefix)
    out.event("checkpoint_save", f"Checkpoint saved at step {step}", step=step, checkpoint_path=prefix)
    out.checkpoint(step, prefix, kind="intermediate", adapter=lora)


def resume_position(at_epoch: int, in_epoch: int, per_epoch: int) -> tuple[int, int]:
    """Where a run resumes after a checkpoint at step `in_epoch` of epoch `at_epoch`: the next epoch's start when
    that was its last step."""
    return (at_epoch + 1, 0) if in_epoch >= per_epoch else (at_epoch, in_epoch)


def data_fields(report: TokenizationReport) -> dict[str, Any]:
    """The training_data_download_complete event's data, from the tokenization report."""
    return {
        "token_count": report.trained_tokens + report.masked_tokens,
        "trained_tokens": report.trained_tokens,
        "masked_tokens": report.masked_tokens,
        "examples": report.examples,
        "truncated": report.truncated,
        "dropped": report.dropped,
        "dropped_reasons": dict(report.dropped_reasons),
        "dataset_format": report.format,
    }


def reasons(report: TokenizationReport) -> str:
    """The report's drop reasons, as " (3 malformed, 1 no trained tokens)" (empty when none)."""
    if not report.dropped_reasons:
        return ""
    return " (" + ", ".join(f"{n:,} {why.replace('_', ' ')}" for why, n in sorted(report.dropped_reasons.items())) + ")"


@dataclass(frozen=True)
class ModelFiles:
    """Where a run's weights come from: the base, the whole weights to load (`weights_dir`), the LoRA adapter to
    continue (`adapter_dir`), the checkpoint it resumes (`resume_dir`), and the tokenizer (a vision-language
    model's: its processor, `train/vision.py`)."""

    base_dir: Path
    weights_dir: Path
    adapter_dir: Path | None
    resume_dir: Path | None
    tokenizer: Any
    pad_id: int
    vision: bool = False


def prepare_model_files(spec: TrainSpec, blobs: BlobStore, work: Path, out: EventWriter) -> ModelFiles:
    """The base, plus the weights to start from (a checkpoint to resume, or from_checkpoint), with the
    `model_downloading` / `model_download_complete` events. A resumed LoRA run whose job started from whole weights
    needs both: those weights and the checkpoint's adapter."""
    lora = spec.hyper.training_type == "lora"
    out.event("model_downloading", f"Preparing the base model {spec.model.name}")
    base_dir = resolve_model_dir(spec.model, spec.cache_dir, blobs=blobs)
    resume_dir = fetch(blobs, spec.resume.key, work / "resume-from") if spec.resume else None
    init_needed = spec.init is not None and (resume_dir is None or (lora and not spec.init.adapter))
    init_dir = fetch(blobs, spec.init.key, work / "init-from") if spec.init and init_needed else None
    init_adapter = bool(spec.init and spec.init.adapter)
    if resume_dir is not None:
        weights_dir = resume_dir if not lora else (init_dir if init_dir is not None else base_dir)
        adapter_dir = resume_dir if lora else None
    else:
        weights_dir = init_dir if init_dir is not None and not init_adapter else base_dir
        adapter_dir = init_dir if init_dir is not None and init_adapter else None
    if adapter_dir is not None and not lora:
        raise InvalidRequestError("full fine-tuning cannot start from a LoRA adapter; start from merged weights")
    start_dir = resume_dir or init_dir
    tokenizer_dir = start_dir if start_dir and (start_dir / "tokenizer_config.json").is_file() else base_dir
    vision = is_vision_config(AutoConfig.from_pretrained(str(base_dir)))
    tokenizer = load_processor(tokenizer_dir) if vision else AutoTokenizer.from_pretrained(str(tokenizer_dir))
    note = " (a vision-language model: its processor renders the images)" if vision else ""
    adopted = None if vision else adopt_training_template(tokenizer)
    if adopted:
        note = (f"; its chat template renders earlier turns differently once later ones follow, so multi-turn "
                f"conversations are tokenized with TRL's prefix-preserving {adopted} template (saved with the "
                "outputs)")  # fmt: skip
    if spec.resume is not None:
        note = f" (resuming from step {spec.resume.step}){note}"
    elif spec.init is not None:
        note = f" (continuing from {spec.init.key}, step {spec.init.step}){note}"
    out.event("model_download_complete", f"Base model {spec.model.name} is ready{note}")
    return ModelFiles(base_dir, weights_dir, adapter_dir, resume_dir, tokenizer, pad_id(tokenizer), vision)


def build_model(spec: TrainSpec, files: ModelFiles, device: torch.device) -> Any:
    """fp32 weights in training mode on `device`: the whole model (full), or a LoRA adapter on it, new or the one
    being continued. A vision-language model's vision tower trains only with `train_vision` (`train/vision.py`)."""
    hp = spec.hyper
    load = {"dtype": torch.float32, "attn_implementation": "sdpa", "use_cache": False}
    loader = AutoModelForImageTextToText if files.vision else AutoModelForCausalLM
    model: Any = loader.from_pretrained(str(files.weights_dir), **load)
    train_vision = bool(spec.plan.train_vision)
    if hp.training_type == "lora":
        if files.adapter_dir is not None:
            model = PeftModel.from_pretrained(model, str(files.adapter_dir), is_trainable=True)
        else:
            targets = hp.lora_target_modules
            cfg = LoraConfig(r=hp.lora_r, lora_alpha=hp.alpha, lora_dropout=hp.lora_dropout,
                             target_modules=targets if targets == "all-linear" else list(targets),
                             exclude_modules=lora_exclusions(train_vision) if files.vision else None,
                             task_type="CAUSAL_LM")  # fmt: skip
            model = get_peft_model(model, cfg)
        model.peft_config["default"].base_model_name_or_path = spec.model.name
    elif files.vision and not train_vision:
        freeze_tower(model)
    model.to(device)
    model.train()
    return model


def manifest_base(spec: TrainSpec, method: str, total_steps: int) -> dict[str, Any]:
    """The fields every checkpoint's and output's manifest carries."""
    return {
        "base_model": spec.model.name,
        "base_source": msgspec.to_builtins(spec.model),
        "method": method,
        "training_type": spec.hyper.training_type,
        "spec_digest": spec.digest(),
        "job_id": spec.job_id,
        "output_name": spec.output_name,
        "total_steps": total_steps,
    }


def save_finals(
    spec: TrainSpec, blobs: BlobStore, work: Path, out: EventWriter, model: Any, files: ModelFiles, *, step: int,
    meta: dict[str, Any], facts: dict[str, Any] | None = None,
) -> str:  # fmt: skip
    """Save and upload the final weights: the adapter and the merged model (LoRA) or the whole model (full, in the
    dtype the base model was stored in), each self-describing, with their events; returns the main output's
    prefix. With `hf_output_repo_name`, the adapter (LoRA) or the model (full) is also pushed to the hub with a
    model card built from `facts` (`train/push.py`)."""
    lora = spec.hyper.training_type == "lora"
    tokenizer = files.tokenizer
    save_dtype = checkpoint_dtype(AutoConfig.from_pretrained(str(files.base_dir)))
    out.event("model_uploading", "Uploading the final weights")
    finals = ["adapter", "merged"] if lora else ["model"]
    for variant in finals:
        folder = work / "final" / variant
        shutil.rmtree(folder, ignore_errors=True)
        if variant == "merged":
            model = model.merge_and_unload()
        if variant != "adapter":
            model.to(save_dtype)
        save_model(model, tokenizer, folder)
        write_manifest(folder, kind=variant, adapter=variant == "adapter", **meta)
        prefix = final_prefix(spec.job_id, variant)
        check_current(blobs, spec.job_id, spec.attempt)
        pushed = variant == finals[0] and bool(spec.plan.hf_output_repo_name)
        publish(blobs, folder, prefix, keep_local=pushed)
        out.checkpoint(step, prefix, kind="final", adapter=variant == "adapter")
        if pushed:
            push_to_hub(spec, folder, out, adapter=lora, facts=dict(facts or {}, step=step))
            shutil.rmtree(folder, ignore_errors=True)
    main_prefix = final_prefix(spec.job_id, finals[-1])
    out.event("model_upload_complete", f"Final weights uploaded ({', '.join(finals)})", model_path=main_prefix,
              step=step)  # fmt: skip
    shutil.rmtree(work / "resume-from", ignore_errors=True)
    shutil.rmtree(work / "init-from", ignore_errors=True)
    return main_prefix


def vocab_size(folder: Path) -> int | None:
    """The vocabulary (embedding rows) of the model stored in `folder`, from its config (a multimodal model's text
    config), where it says."""
    config = AutoConfig.from_pretrained(str(folder))
    size = getattr(getattr(config, "text_config", None) or config, "vocab_size", None)
    return int(size) if size else None


def fetch(blobs: BlobStore, prefix: str, target: Path) -> Path:
    """A checkpoint or output folder, copied from the blob store into the work folder: by rank 0, while the other
    ranks of a data-parallel run (which share the work folder) wait for it."""
    if distributed.is_main():
        download_folder(blobs, prefix, target)
    distributed.barrier()
    return target


def pad_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def checkpoint_dtype(config: Any) -> torch.dtype:
    """The dtype the base model was stored in (final whole-model weights are saved in it); fp32 otherwise."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32


def save_model(model: Any, tokenizer: Any, folder: Path) -> None:
    """Save with `use_cache` on in the stored config (training turns it off; serving wants it)."""
    config = causal_lm(model).config
    config.use_cache = True
    try:
        save_weights(model, tokenizer, folder)
    finally:
        config.use_cache = False
