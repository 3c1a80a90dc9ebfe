"""Pushing a job's final weights to the Hugging Face hub (`hf_output_repo_name`), with a model card, through
`huggingface_hub` and the job's own token only (PUSH_TOKEN_ENV, which the worker sets from the job's hf_api_token
and nothing else: never the server's own HF_TOKEN; the API refuses a push without one). A push that fails is a
warning event: the job still completes, and its outputs stay downloadable here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tuneforge.train.events import EventWriter
from tuneforge.train.spec import TrainSpec

PUSH_TOKEN_ENV = "TUNEFORGE_HUB_PUSH_TOKEN"

# Hyperparameters the card lists, in this order.
_CARD_HYPER = ("training_type", "lora_r", "lora_alpha", "lora_dropout", "n_epochs", "learning_rate",
               "lr_scheduler_type", "warmup_ratio", "weight_decay", "max_seq_length", "dpo_beta", "rpo_alpha",
               "simpo_gamma", "seed")  # fmt: skip


def model_card(spec: TrainSpec, *, adapter: bool, facts: dict[str, Any]) -> str:
    """README.md for the pushed folder: hub metadata (base model, library, tags), then what it was trained on,
    how, and how it ended. `facts`: examples, tokens, trained_tokens, step, total_steps, final_loss, eval_loss."""
    hp, plan = spec.hyper, spec.plan
    base = spec.model.source if spec.model.source_kind == "hub" else spec.model.name
    lines = [
        "---",
        f"base_model: {base}",
        f"library_name: {'peft' if adapter else 'transformers'}",
        "tags:",
        "- tuneforge",
        f"- {plan.method}",
        f"- {'lora' if adapter else 'full-fine-tuning'}",
        "---",
        "",
        f"# {spec.output_name}",
        "",
        f"{'A LoRA adapter for' if adapter else 'A fine-tune of'} `{spec.model.name}`, trained with tuneforge "
        f"({plan.method.upper()}, job `{spec.job_id}`).",
        "",
        "## Training data",
        "",
        f"- examples: {facts.get('examples', 'n/a')}",
        f"- tokens: {facts.get('tokens', 'n/a')} ({facts.get('trained_tokens', 'n/a')} trained)",
        "",
        "## Hyperparameters",
        "",
        "| name | value |",
        "| --- | --- |",
    ]
    values = {name: getattr(hp, name) for name in _CARD_HYPER}
    values["lora_alpha"] = hp.alpha
    if hp.training_type != "lora":
        for name in ("lora_r", "lora_alpha", "lora_dropout"):
            values.pop(name)
    if plan.method != "dpo":
        for name in ("dpo_beta", "rpo_alpha", "simpo_gamma"):
            values.pop(name)
    values["batch_size (examples per step)"] = facts.get("batch_size", hp.batch_size)
    lines += [f"| {name} | {value} |" for name, value in values.items()]
    lines += ["", "## Results", ""]
    lines.append(f"- steps: {facts.get('step', 'n/a')} of {facts.get('total_steps', 'n/a')}")
    if facts.get("final_loss") is not None:
        lines.append(f"- final training loss: {facts['final_loss']:.4f}")
    if facts.get("eval_loss") is not None:
        lines.append(f"- last evaluation loss: {facts['eval_loss']:.4f}")
    return "\n".join(lines) + "\n"


def push_to_hub(spec: TrainSpec, folder: Path, out: EventWriter, *, adapter: bool, facts: dict[str, Any]) -> bool:
    """Upload `folder` (the final adapter or model) and its model card to `hf_output_repo_name` (created private if
    it does not exist); True when pushed. Any failure is a warning event, never an error of the job."""
    from huggingface_hub import HfApi

    repo = spec.plan.hf_output_repo_name
    if not repo:
        return False
    token = os.environ.get(PUSH_TOKEN_ENV) or None
    if token is None:
        out.event("warning", f"The final weights were not pushed to the Hugging Face repo {repo!r}: the job has no "
                  "hf_api_token", level="warning")  # fmt: skip
        return False
    try:
        (folder / "README.md").write_text(model_card(spec, adapter=adapter, facts=facts))
        api = HfApi()
        api.create_repo(repo, token=token, private=True, exist_ok=True)
        message = f"tuneforge {spec.job_id}: final {'adapter' if adapter else 'model'}"
        commit = api.upload_folder(repo_id=repo, folder_path=folder, token=token, commit_message=message)
    except Exception as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        out.event(
            "warning",
            f"The final weights could not be pushed to the Hugging Face repo {repo!r} ({type(exc).__name__}"
            f"{': ' + text if text else ''}); they are kept here: download them with `together fine-tuning download`",
            level="warning",
        )
        return False
    out.event("model_upload_complete", f"Final {'adapter' if adapter else 'model'} pushed to the Hugging Face repo "
              f"{repo!r}", hub_repo=repo, hub_commit=getattr(commit, "oid", None))  # fmt: skip
    return True
