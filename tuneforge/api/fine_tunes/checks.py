"""The checks of `POST /fine-tunes` (contract 3.4): the SDK's own, repeated for raw HTTP callers, and every
limit of the model. Each check adds to `Problems` so that one 400 names every bad parameter.

Lookups that cannot go on (an unknown parent job) raise NotFoundError at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from tuneforge.api.fine_tunes import resolve
from tuneforge.api.fine_tunes.schemas import FineTuneCreate, TrainingMethodIn, TrainingTypeIn
from tuneforge.catalog.entries import ModelEntry, ModelLimits
from tuneforge.catalog.registry import Catalog
from tuneforge.errors import InvalidRequestError, NotFoundError
from tuneforge.storage import BlobStore
from tuneforge.storage.layout import final_prefix
from tuneforge.store import jobs as repo
from tuneforge.store.files import STILL_CHECKING, FileProcessingStatus
from tuneforge.store.tables import FileRow, JobRow

SFT_FORMATS = frozenset({"general", "conversation", "instruction", "parquet"})
DPO_FORMATS = frozenset({"preference_openai"})
_CHECKING = (None, *STILL_CHECKING)


class Problems:
    """Every problem with a request, each naming its parameter; raised together as one 400."""

    def __init__(self, what: str = "fine-tune request") -> None:
        self.what = what
        self.items: list[tuple[str, str]] = []

    def add(self, param: str, message: str) -> None:
        self.items.append((param, message))

    def raise_if_any(self) -> None:
        if self.items:
            text = "; ".join(message for _, message in self.items)
            raise InvalidRequestError(f"Invalid {self.what}: {text}", param=self.items[0][0])


@dataclass
class Parent:
    """The job a `from_checkpoint` request continues, and the weights it starts from."""

    job: JobRow
    entry: ModelEntry
    training_type: str
    init: dict[str, Any] | None = None
    from_final: bool = True


@dataclass
class Lora:
    """The adapter a LoRA job trains (unused by full training)."""

    r: int
    alpha: int
    dropout: float = 0.0
    modules: str = "all-linear"

    def type_object(self) -> dict[str, Any]:
        return {
            "type": "Lora",
            "lora_r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "lora_trainable_modules": self.modules,
        }


def check_method(p: Problems, tm: TrainingMethodIn, entry: ModelEntry) -> str:
    """`sft` or `dpo`, with the options that belong to it only."""
    method = tm.method.strip().lower()
    if method not in ("sft", "dpo"):
        p.add("training_method.method", f"training_method.method must be 'sft' or 'dpo' (got {tm.method!r})")
    if method == "dpo" and not entry.limits.supports_dpo:
        p.add("training_method.method", f"training_method dpo is not supported for model {entry.name}")
    if method != "sft" and tm.train_on_inputs is not None:
        p.add("training_method.train_on_inputs", "train_on_inputs is only supported for SFT training")
    if method != "dpo":
        for name in ("dpo_beta", "rpo_alpha", "simpo_gamma"):
            if getattr(tm, name) is not None:
                p.add(f"training_method.{name}", f"{name} is only supported for DPO training")
        for name in ("dpo_normalize_logratios_by_length", "dpo_reference_free"):
            if getattr(tm, name):
                p.add(f"training_method.{name}", f"{name}=true is only supported for DPO training")
        return method
    if tm.dpo_beta is not None and not tm.dpo_beta > 0:
        p.add("training_method.dpo_beta", f"dpo_beta must be greater than 0 (got {tm.dpo_beta})")
    for name in ("rpo_alpha", "simpo_gamma"):
        value = getattr(tm, name)
        if value is not None and not value >= 0:
            p.add(f"training_method.{name}", f"{name} must be non-negative (got {value})")
    return method


def check_training_type(
    p: Problems, tt: TrainingTypeIn | None, parent: Parent | None, entry: ModelEntry
) -> tuple[str, Lora]:
    """`lora` (the default, or the parent's type) or `full`, and the adapter's shape.

    Continuing a LoRA adapter keeps its rank and modules (they are part of the saved weights)."""
    lim = entry.limits
    ttype = _training_type(p, tt, parent)
    if ttype == "full":
        if not lim.supports_full:
            p.add("training_type", f"training_type Full is not supported for model {entry.name}; use LoRA")
        return ttype, Lora(r=lim.default_lora_rank, alpha=2 * lim.default_lora_rank)
    if not lim.supports_lora:
        p.add("training_type", f"training_type Lora is not supported for model {entry.name}; use Full")
    inherit = parent is not None and parent.training_type == "lora"
    lora = Lora(r=lim.default_lora_rank, alpha=2 * lim.default_lora_rank)
    if inherit and parent is not None:
        hyper: dict[str, Any] = (parent.job.params or {}).get("hyper") or {}
        target = hyper.get("lora_target_modules", "all-linear")
        r = int(hyper.get("lora_r", lora.r))
        lora = Lora(
            r=r,
            alpha=int(hyper.get("lora_alpha", 2 * r)),
            dropout=float(hyper.get("lora_dropout", 0.0)),
            modules=target if isinstance(target, str) else ",".join(target),
        )
    if tt is not None:
        before = Lora(r=lora.r, alpha=lora.alpha, dropout=lora.dropout, modules=lora.modules)
        lora.r = tt.lora_r if tt.lora_r is not None else lora.r
        lora.alpha = tt.lora_alpha if tt.lora_alpha is not None else (lora.alpha if inherit else 2 * lora.r)
        lora.dropout = tt.lora_dropout if tt.lora_dropout is not None else lora.dropout
        lora.modules = resolve.present(tt.lora_trainable_modules) or lora.modules
        if inherit and (lora.r != before.r or modules_of(lora.modules) != modules_of(before.modules)):
            p.add(
                "training_type.lora_r",
                f"from_checkpoint continues a LoRA adapter of rank {before.r} on "
                f"{before.modules}; lora_r and lora_trainable_modules must match it",
            )
    _check_lora(p, lora, lim)
    return ttype, lora


def _check_lora(p: Problems, lora: Lora, lim: ModelLimits) -> None:
    if not 1 <= lora.r <= lim.max_lora_rank:
        p.add("training_type.lora_r", f"lora_r must be between 1 and {lim.max_lora_rank} (got {lora.r})")
    if not lora.alpha > 0:
        p.add("training_type.lora_alpha", f"lora_alpha must be positive (got {lora.alpha})")
    if not 0 <= lora.dropout < 1:
        p.add("training_type.lora_dropout", f"lora_dropout must be in [0, 1) (got {lora.dropout})")
    if lora.modules != "all-linear":
        listed = modules_of(lora.modules)
        if not listed or any(m not in lim.target_modules for m in listed):
            p.add(
                "training_type.lora_trainable_modules",
                "lora_trainable_modules must be 'all-linear' or a "
                f"comma-separated list of {', '.join(lim.target_modules)} (got {lora.modules!r})",
            )


def modules_of(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


def int_in(p: Problems, name: str, value: int | None, default: int, lo: int, hi: int) -> int:
    resolved = default if value is None else value
    if not lo <= resolved <= hi:
        p.add(name, f"{name} must be between {lo} and {hi} (got {resolved})")
    return resolved


def format_of(row: FileRow) -> str:
    return str((row.validation_report or {}).get("dataset_format") or "").lower()


def check_file(p: Problems, row: FileRow, *, param: str, method: str, entry: ModelEntry) -> None:
    """A dataset must be a checked fine-tune file whose format suits the method and the model."""
    if row.purpose != "fine-tune":
        p.add(param, f"{param} {row.id} was uploaded with purpose {row.purpose!r}; fine-tuning needs 'fine-tune'")
        return
    report = row.validation_report or {}
    if row.processing_status in _CHECKING:
        p.add(
            param,
            f"{param} {row.id} is still being checked (processing_status {row.processing_status}); "
            "retry once it is COMPLETED",
        )
        return
    if row.processing_status != FileProcessingStatus.COMPLETED:
        why = report.get("error") or report.get("processing_error") or "see its validation_report"
        p.add(param, f"{param} {row.id} is invalid ({row.processing_status}): {why}")
        return
    fmt = format_of(row)
    if method == "sft" and fmt not in SFT_FORMATS:
        p.add(
            param,
            f"{param} {row.id} holds {fmt or 'unknown'} data, which does not suit SFT"
            + (" (preference data is for training_method dpo)" if fmt in DPO_FORMATS else ""),
        )
    if method == "dpo" and fmt not in DPO_FORMATS:
        p.add(
            param,
            f"{param} {row.id} holds {fmt or 'unknown'} data; DPO needs preference data "
            "(input, preferred_output, non_preferred_output)",
        )
    if report.get("dataset_has_tools") and not entry.limits.supports_tools:
        p.add(param, f"{param} {row.id} contains tools or tool calls, which model {entry.name} does not support")
    if report.get("dataset_is_multimodal") and not entry.limits.supports_vision:
        p.add(param, f"{param} {row.id} contains images, but model {entry.name} is not a vision model")


def _training_type(p: Problems, tt: TrainingTypeIn | None, parent: Parent | None) -> str:
    if tt is None:
        return parent.training_type if parent is not None else "lora"
    raw = tt.type if tt.type is not None else ("Lora" if tt.lora_r is not None else "Full")
    kind = raw.strip().lower()
    if kind in ("", "full"):
        return "full"
    if kind == "lora":
        return "lora"
    p.add("training_type.type", f"training_type.type must be 'Lora' or 'Full' (got {raw!r})")
    return "lora"


def check_early_stopping(p: Problems, body: FineTuneCreate, *, n_evals: int, has_validation: bool) -> dict[str, Any]:
    patience = body.early_stopping_patience if body.early_stopping_patience is not None else 2
    warmup = body.early_stopping_warmup_evals if body.early_stopping_warmup_evals is not None else 1
    min_delta = body.early_stopping_min_delta if body.early_stopping_min_delta is not None else 0.0
    enabled = bool(body.early_stopping_enabled)
    if enabled:
        if patience < 1:
            p.add("early_stopping_patience", f"early_stopping_patience must be >= 1 (got {patience})")
        if warmup < 0:
            p.add("early_stopping_warmup_evals", f"early_stopping_warmup_evals must be >= 0 (got {warmup})")
        if not min_delta >= 0:
            p.add("early_stopping_min_delta", f"early_stopping_min_delta must be >= 0 (got {min_delta})")
        if not has_validation:
            p.add("early_stopping_enabled", "early_stopping_enabled needs a validation_file")
        needed = patience + warmup + 1
        if n_evals < needed:
            p.add(
                "early_stopping_enabled",
                f"early_stopping_enabled needs n_evals >= early_stopping_patience + "
                f"early_stopping_warmup_evals + 1 = {needed} (got n_evals={n_evals})",
            )
    return {"enabled": enabled, "patience": patience, "warmup_evals": warmup, "min_delta": float(min_delta)}


def resolve_parent(s: Session, blobs: BlobStore, catalog: Catalog, *, owner: str, ref: str, p: Problems) -> Parent:
    name, step = resolve.split_step(ref)
    job = resolve.find_owned_job(s, owner=owner, name=name)
    if job is None:
        raise NotFoundError(
            f"from_checkpoint {ref!r} not found: none of your fine-tune jobs has that id or output name",
            param="from_checkpoint",
        )
    entry = catalog.find(job.model)
    if entry is None:
        raise NotFoundError(
            f"from_checkpoint: the base model {job.model!r} of {job.id} is no longer in the catalog",
            param="from_checkpoint",
        )
    ttype = resolve.training_type_of(job)
    parent = Parent(job=job, entry=entry, training_type=ttype)
    checkpoints = repo.list_checkpoints(s, job_id=job.id)
    done = resolve.is_completed(job)
    last = resolve.final_step(job, checkpoints)
    if step:
        rows = [c for c in checkpoints if c.kind == "intermediate" and c.step == step]
        if rows:
            parent.init = {"key": rows[-1].path, "adapter": ttype == "lora", "step": step}
            parent.from_final = False
            return parent
        if not (done and step == last):
            have = sorted({c.step for c in checkpoints if c.kind == "intermediate"})
            p.add(
                "from_checkpoint",
                f"from_checkpoint {ref!r}: {job.id} has no checkpoint at step {step} "
                f"(its checkpoints: {', '.join(map(str, have)) or 'none'})",
            )
            return parent
    if not done:
        p.add(
            "from_checkpoint",
            f"from_checkpoint {ref!r}: {job.id} is {job.status}; only a completed job has final weights to continue "
            f"from; name one of its intermediate checkpoints as {job.id}:STEP",
        )
        return parent
    variant = "adapter" if ttype == "lora" else "model"
    parent.init = {"key": final_prefix(job.id, variant), "adapter": ttype == "lora", "step": last}
    return parent


def init_for(p: Problems, blobs: BlobStore, parent: Parent | None, ttype: str) -> dict[str, Any] | None:
    """The weights the run starts from; full training on a LoRA parent starts from its merged weights."""
    if parent is None or parent.init is None:
        return None
    if ttype == "full" and parent.training_type == "lora":
        merged = final_prefix(parent.job.id, "merged")
        if not parent.from_final or not blobs.list(merged):
            p.add(
                "training_type",
                f"training_type Full cannot continue the LoRA adapter of {parent.job.id} "
                "(there are no merged weights to start from); keep LoRA or start from the base model",
            )
            return None
        return {"key": merged, "adapter": False, "step": parent.init["step"]}
    return parent.init
