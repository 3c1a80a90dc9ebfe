"""What every recipe does the same way around its training loop: fetch the weights to start from, build the model
(LoRA or full), save checkpoints' and final weights, and the small helpers they need. The recipes (`sft.py`,
`dpo.py`) read top to bottom and call these; nothing here knows a loss.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from tuneforge.catalog.loading import download_folder, resolve_model_dir
from tuneforge.data.tokenization.templates import adopt_training_template
from tuneforge.errors import InvalidRequestError
from tuneforge.storage import BlobStore
from tuneforge.storage.layout import final_prefix
from tuneforge.train.checkpoints import publish, save_weights, write_manifest
from tuneforge.train.events import EventWriter
from tuneforge.train.fencing import check_current
from tuneforge.train.loss import causal_lm
from tuneforge.train.push import push_to_hub
from tuneforge.train.spec import TrainSpec


@dataclass(frozen=True)
class ModelFiles:
    """Where a run's weights come from: the base, the whole weights to load (`weights_dir`), the LoRA adapter to
    continue (`adapter_dir`), the checkpoint it resumes (`resume_dir`), and the tokenizer."""

    base_dir: Path
    weights_dir: Path
    adapter_dir: Path | None
    resume_dir: Path | None
    tokenizer: Any
    pad_id: int


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
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    note = ""
    adopted = adopt_training_template(tokenizer)
    if adopted:
        note = (f"; its chat template renders earlier turns differently once later ones follow, so multi-turn "
                f"conversations are tokenized with TRL's prefix-preserving {adopted} template (saved with the "
                "outputs)")  # fmt: skip
    if spec.resume is not None:
        note = f" (resuming from step {spec.resume.step}){note}"
    elif spec.init is not None:
        note = f" (continuing from {spec.init.key}, step {spec.init.step}){note}"
    out.event("model_download_complete", f"Base model {spec.model.name} is ready{note}")
    return ModelFiles(base_dir, weights_dir, adapter_dir, resume_dir, tokenizer, pad_id(tokenizer))


def build_model(spec: TrainSpec, files: ModelFiles, device: torch.device) -> Any:
    """fp32 weights in training mode on `device`: the whole model (full), or a LoRA adapter on it, new or the one
    being continued."""
    hp = spec.hyper
    load = {"dtype": torch.float32, "attn_implementation": "sdpa", "use_cache": False}
    model: Any = AutoModelForCausalLM.from_pretrained(str(files.weights_dir), **load)
    if hp.training_type == "lora":
        if files.adapter_dir is not None:
            model = PeftModel.from_pretrained(model, str(files.adapter_dir), is_trainable=True)
        else:
            targets = hp.lora_target_modules
            cfg = LoraConfig(r=hp.lora_r, lora_alpha=hp.alpha, lora_dropout=hp.lora_dropout,
                             target_modules=targets if targets == "all-linear" else list(targets),
                             task_type="CAUSAL_LM")  # fmt: skip
            model = get_peft_model(model, cfg)
        model.peft_config["default"].base_model_name_or_path = spec.model.name
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
    """A checkpoint or output folder, copied from the blob store into the work folder."""
    download_folder(blobs, prefix, target)
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
