"""`build_plan`: a `POST /fine-tunes` body -> the job's `JobPlan` (train/spec.py), with every default and every
check in one place.

Defaults come from the model's limits (sequence length, LoRA rank, accumulation, batch bounds) or from `Hyper`'s
own constant defaults; each check adds to `Problems`, so one 400 names every bad parameter. A plan that passes
can run: finite numbers, no NUL characters or unencodable text, a method some recipe implements and the model
supports, files checked and of a format the method takes. Lookups that cannot go on (an unknown model or parent
job) raise NotFoundError at once.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy.orm import Session

from tuneforge.catalog.entries import ModelEntry, ModelLimits
from tuneforge.catalog.registry import Catalog
from tuneforge.catalog.source import ModelSource
from tuneforge.data.formats import PREFERENCE_FORMATS, PRETOKENIZED_FORMAT, SFT_FORMATS
from tuneforge.errors import InvalidRequestError, NotFoundError, TuneForgeError
from tuneforge.jobs import references as refs
from tuneforge.jobs.request import FineTuneCreate, TrainingMethodIn, TrainingTypeIn
from tuneforge.jobs.stored_plan import plan_of
from tuneforge.settings import DEFAULT_WANDB_URL, same_url
from tuneforge.storage import BlobStore
from tuneforge.storage.layout import final_prefix
from tuneforge.store import jobs as repo
from tuneforge.store.files import STILL_CHECKING, FileProcessingStatus
from tuneforge.store.tables import FileRow, JobRow
from tuneforge.train import registry
from tuneforge.train.spec import Hyper, InitWeights, JobPlan, WandbConfig

SUFFIX_RE = re.compile(r"^[A-Za-z0-9._-]{1,40}$")
METHODS = tuple(registry.RECIPES)  # the methods the API knows; `registry.available()` those a recipe runs today
_CHECKING = (None, *STILL_CHECKING)
_DEFAULTS = Hyper()


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


@dataclass(frozen=True)
class Planned:
    """A checked plan and what goes beside it: the job's secrets (kept apart: never in the plan or the spec)."""

    plan: JobPlan
    secrets: dict[str, str]
    training_format: str = ""  # the training file's dataset format (its check's report)


@dataclass
class _Parent:
    """The job a `from_checkpoint` request continues, and the weights it starts from."""

    job: JobRow
    plan: JobPlan
    entry: ModelEntry
    init: InitWeights | None = None
    from_final: bool = True


def build_plan(
    s: Session, blobs: BlobStore, catalog: Catalog, *, owner: str, body: FineTuneCreate,
    wandb_base_urls: Sequence[str] = (DEFAULT_WANDB_URL,),
) -> Planned:  # fmt: skip
    """Resolve the request against the catalog and the caller's files and jobs.

    Raises:
        InvalidRequestError: naming every bad parameter at once.
        NotFoundError: an unknown model, parent job or file.
    """
    p = Problems()
    check_text_and_numbers(p, body.model_dump(), path="")
    p.raise_if_any()
    model = refs.present(body.model)
    ckpt = refs.present(body.from_checkpoint)
    hf = refs.present(body.from_hf_model)
    if model and ckpt:
        p.add("model", "model and from_checkpoint exclude each other: give one of them")
    if not model and not ckpt:
        p.add("model", "model is required (or from_checkpoint, to continue a previous job)")
        p.raise_if_any()
    if hf and ckpt:
        p.add("from_hf_model", "from_hf_model and from_checkpoint exclude each other")
    if hf and not model:
        p.add("from_hf_model", "from_hf_model needs model: the catalog model whose architecture and limits apply")
    if refs.present(body.hf_model_revision) and not hf:
        p.add("hf_model_revision", "hf_model_revision applies only together with from_hf_model")

    parent: _Parent | None = None
    if model:
        entry = _catalog_entry(s, catalog, owner=owner, model=model, p=p)
    else:
        parent = _resolve_parent(s, catalog, owner=owner, ref=ckpt or "", p=p)
        entry = parent.entry
    source = _model_source(p, catalog, entry, parent, body, hf=hf if model else None)
    byom = bool(model and hf) and catalog_entry_of(catalog, hf or "") is None

    tm = body.training_method or TrainingMethodIn()
    method = _check_method(p, tm, entry)
    train_id = body.training_file.strip()
    if not train_id:
        p.add("training_file", "training_file is required")
        p.raise_if_any()
    train = refs.owned_file(s, owner=owner, file_id=train_id, param="training_file")
    check_file(p, train, param="training_file", method=method, entry=entry)
    val_id = refs.present(body.validation_file)
    validation = None
    if val_id:
        validation = refs.owned_file(s, owner=owner, file_id=val_id, param="validation_file")
        check_file(p, validation, param="validation_file", method=method, entry=entry)
    hyper = _hyper(p, body, entry, parent, method=method, tm=tm, has_val=validation is not None)
    init = _init_for(p, blobs, parent, hyper.training_type)
    if not byom:
        _check_host_memory(p, entry, hyper.training_type)
    lim = entry.limits
    max_batch = _batch_bounds(lim, hyper.training_type, method)[1]
    suffix = refs.present(body.suffix)
    if suffix is not None and not SUFFIX_RE.match(suffix):
        p.add("suffix", f"suffix must be at most 40 characters of letters, digits, '.', '_' and '-' (got {suffix!r})")
    train_vision = bool(body.multimodal_params and body.multimodal_params.train_vision)
    if train_vision and not lim.supports_vision:
        p.add("multimodal_params.train_vision", f"train_vision is only available for vision models; {entry.name} "
              "is not one")  # fmt: skip
    push_to = refs.present(body.hf_output_repo_name)
    if push_to is not None:
        if not HUB_REPO_RE.fullmatch(push_to) or "/" not in push_to:
            p.add("hf_output_repo_name", "hf_output_repo_name must be a Hugging Face repo id 'namespace/name' "
                  f"(got {push_to!r})")  # fmt: skip
        if not refs.present(body.hf_api_token):
            p.add("hf_output_repo_name", "hf_output_repo_name needs hf_api_token: a token with write access to that "
                  "repo's namespace (the server's own credentials never push)")  # fmt: skip
    p.raise_if_any()
    secrets = {k: v for k, v in (("wandb_key", body.wandb_key), ("hf_api_token", body.hf_api_token)) if v}
    wandb_fields = {
        "project": refs.present(body.wandb_project_name),
        "name": refs.present(body.wandb_name),
        "entity": refs.present(body.wandb_entity),
        "base_url": refs.present(body.wandb_base_url),
    }
    wants_wandb = any(wandb_fields.values()) or "wandb_key" in secrets
    base_url = wandb_fields["base_url"]
    if base_url is not None and not any(same_url(base_url, allowed) for allowed in wandb_base_urls):
        allowed = ", ".join(wandb_base_urls) or "none"
        p.add("wandb_base_url", f"wandb_base_url {base_url!r} is not a W&B server this server sends data to; "
              f"allowed: {allowed} (the operator's TUNEFORGE_WANDB_BASE_URLS)")  # fmt: skip
        p.raise_if_any()
    report = train.validation_report or {}
    plan = JobPlan(
        method=method,  # type: ignore[arg-type]  # checked against METHODS above
        model=entry.name,
        model_source=source,
        training_file=train.id,
        training_file_type="parquet" if train.file_type == "parquet" else "jsonl",
        training_file_lines=report.get("nlines"),
        training_file_bytes=train.bytes,
        validation_file=validation.id if validation is not None else None,
        init=init,
        hyper=hyper,
        max_batch_size=max_batch,
        suffix=suffix,
        from_checkpoint=ckpt,
        from_hf_model=hf,
        byom=byom,
        hf_model_revision=refs.present(body.hf_model_revision),
        hf_output_repo_name=refs.present(body.hf_output_repo_name),
        train_vision=train_vision if lim.supports_vision else None,
        wandb=WandbConfig(**wandb_fields) if wants_wandb else None,
    )
    return Planned(plan=plan, secrets=secrets, training_format=format_of(train))


def check_text_and_numbers(p: Problems, value: Any, *, path: str) -> None:
    """Every string free of NUL characters and encodable as UTF-8, every number finite, anywhere in the body.

    Such values pass JSON parsing but break what comes after (the database, the run's own spec), so they are
    refused here, naming the parameter. A secret's value is never quoted.
    """
    if isinstance(value, dict):
        for key, item in value.items():
            check_text_and_numbers(p, item, path=f"{path}.{key}" if path else str(key))
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            check_text_and_numbers(p, item, path=f"{path}[{i}]")
    elif isinstance(value, float) and not math.isfinite(value):
        p.add(path, f"{path} must be a finite number (got {value})")
    elif isinstance(value, str):
        if "\x00" in value:
            p.add(path, f"{path} must not contain NUL characters")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            p.add(path, f"{path} is not valid Unicode text (it holds a lone surrogate)")


def _catalog_entry(s: Session, catalog: Catalog, *, owner: str, model: str, p: Problems) -> ModelEntry:
    found = catalog.find(model)
    if found is not None:
        return found
    if refs.find_owned_job(s, owner=owner, name=model) is not None:
        p.add("model", f"model {model!r} is a fine-tuned output: continue training it with from_checkpoint={model!r}")
        p.raise_if_any()
    raise NotFoundError(
        f"model {model!r} not found in the model catalog (GET /v1/models lists what can be fine-tuned)", param="model"
    )


def _model_source(
    p: Problems, catalog: Catalog, entry: ModelEntry, parent: _Parent | None, body: FineTuneCreate, *, hf: str | None
) -> ModelSource:
    """Where the base weights come from: the entry, the parent's base, or a catalog entry named like the HF repo."""
    if parent is not None:
        return parent.plan.model_source
    source, revision = entry, entry.revision
    if hf:
        hf_entry = catalog_entry_of(catalog, hf)
        if hf_entry is None:  # bring your own model: the repo itself, checked by `byom_check` before queueing
            if not HUB_REPO_RE.fullmatch(hf):
                p.add("from_hf_model", f"from_hf_model must be a Hugging Face repo id such as 'org/name' (got {hf!r})")
            return ModelSource(name=hf, source_kind="hub", source=hf, revision=refs.present(body.hf_model_revision))
        source, revision = hf_entry, refs.present(body.hf_model_revision) or hf_entry.revision
    return ModelSource(name=source.name, source_kind=source.source_kind, source=source.source, revision=revision)


def _check_host_memory(p: Problems, entry: ModelEntry, training_type: str) -> None:
    """A catalog model whose training cannot fit this host's memory is refused now, not after its download."""
    from tuneforge.catalog.inspect import host_memory_bytes, memory_shortfall

    if not entry.params:
        return
    short = memory_shortfall(entry.params, training_type, host_memory_bytes())
    if short:
        p.add("model", f"model {entry.name} (about {entry.params / 1e9:.3g}B parameters) {short}")


def catalog_entry_of(catalog: Catalog, hf: str) -> ModelEntry | None:
    """The catalog entry a from_hf_model names (by its name or its hub repo), if any."""
    return next((e for e in catalog.list() if hf in (e.name, e.source)), None)


# A hub repo id: an optional owner, a name (the hub's own rule: letters, digits, '-', '_', '.', up to 96 each).
HUB_REPO_RE = re.compile(r"(?:[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")


def byom_check(plan: JobPlan, catalog: Catalog, *, token: str | None, conversational: bool) -> None:
    """Read a bring-your-own-model repo from the hub (with the job's token only) and refuse, naming
    from_hf_model, whatever would fail in training (`catalog/inspect.py`). Call it outside a database session:
    it waits on the hub."""
    from tuneforge.catalog.inspect import host_memory_bytes, inspect_hub_model, refuse_unusable

    src = plan.model_source
    try:
        info = inspect_hub_model(src.source, src.revision, token)
    except TuneForgeError as exc:  # the hub's refusal: about from_hf_model
        exc.param = exc.param or "from_hf_model"
        raise
    template = catalog.find(plan.model)
    refuse_unusable(info, template=plan.model, template_params=template.params if template else None,
                    training_type=plan.hyper.training_type, conversational=conversational,
                    host_bytes=host_memory_bytes())  # fmt: skip


def _check_method(p: Problems, tm: TrainingMethodIn, entry: ModelEntry) -> str:
    """`sft` or `dpo`, with the options that belong to it only; refused if no recipe runs it or the model can't."""
    method = tm.method.strip().lower()
    if method not in METHODS:
        p.add("training_method.method", f"training_method.method must be 'sft' or 'dpo' (got {tm.method!r})")
    elif method not in registry.available():
        p.add("training_method.method", f"training_method {method} is not available on this server yet (its "
              f"recipe is not built); available: {', '.join(registry.available())}")  # fmt: skip
    if method == "dpo" and entry.limits.supports_vision:
        p.add("training_method.method", f"{entry.name} is a vision-language model; preference tuning (dpo) trains "
              "text models only on this server, so use training_method sft for it")  # fmt: skip
    elif method == "dpo" and not entry.limits.supports_dpo:
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


def format_of(row: FileRow) -> str:
    return str((row.validation_report or {}).get("dataset_format") or "").lower()


def check_file(p: Problems, row: FileRow, *, param: str, method: str, entry: ModelEntry) -> None:
    """A dataset must be a checked fine-tune file whose format suits the method and the model."""
    if row.purpose != "fine-tune":
        p.add(param, f"{param} {row.id} was uploaded with purpose {row.purpose!r}; fine-tuning needs 'fine-tune'")
        return
    report = row.validation_report or {}
    if row.processing_status in _CHECKING:
        p.add(param, f"{param} {row.id} is still being checked (processing_status {row.processing_status}); "
              "retry once it is COMPLETED")  # fmt: skip
        return
    if row.processing_status != FileProcessingStatus.COMPLETED:
        why = report.get("error") or report.get("processing_error") or "see its validation_report"
        p.add(param, f"{param} {row.id} is invalid ({row.processing_status}): {why}")
        return
    fmt = format_of(row)
    if method == "sft" and fmt not in (*SFT_FORMATS, PRETOKENIZED_FORMAT):
        p.add(param, f"{param} {row.id} holds {fmt or 'unknown'} data, which does not suit SFT"
              + (" (preference data is for training_method dpo)" if fmt in PREFERENCE_FORMATS else ""))  # fmt: skip
    if method == "dpo" and fmt not in PREFERENCE_FORMATS:
        p.add(param, f"{param} {row.id} holds {fmt or 'unknown'} data; DPO needs preference data "
              "(input, preferred_output, non_preferred_output)")  # fmt: skip
    if report.get("dataset_has_tools") and not entry.limits.supports_tools:
        p.add(param, f"{param} {row.id} contains tools or tool calls, which model {entry.name} does not support")
    if report.get("dataset_is_multimodal") and not entry.limits.supports_vision:
        p.add(param, f"{param} {row.id} contains images, but model {entry.name} is not a vision model")


def _batch_bounds(lim: ModelLimits, training_type: str, method: str) -> tuple[int, int]:
    dpo = method == "dpo"
    if training_type == "full":
        return lim.full_min_batch_size, lim.full_max_batch_size_dpo if dpo else lim.full_max_batch_size
    return lim.lora_min_batch_size, lim.lora_max_batch_size_dpo if dpo else lim.lora_max_batch_size


def _training_type(p: Problems, tt: TrainingTypeIn | None, parent: _Parent | None) -> Literal["lora", "full"]:
    if tt is None:
        return parent.plan.hyper.training_type if parent is not None else "lora"
    raw = tt.type if tt.type is not None else ("Lora" if tt.lora_r is not None else "Full")
    kind = raw.strip().lower()
    if kind in ("", "full"):
        return "full"
    if kind != "lora":
        p.add("training_type.type", f"training_type.type must be 'Lora' or 'Full' (got {raw!r})")
    return "lora"


def modules_of(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


def _lora(
    p: Problems, tt: TrainingTypeIn | None, parent: _Parent | None, entry: ModelEntry, training_type: str
) -> dict[str, Any]:
    """The adapter's shape: the model's default rank, or the parent's adapter (its rank and modules are part of the
    saved weights), then what the request says."""
    lim = entry.limits
    if training_type == "full":
        if not lim.supports_full:
            p.add("training_type", f"training_type Full is not supported for model {entry.name}; use LoRA")
        return {"lora_r": lim.default_lora_rank}
    if not lim.supports_lora:
        p.add("training_type", f"training_type Lora is not supported for model {entry.name}; use Full")
    inherit = parent is not None and parent.plan.hyper.training_type == "lora"
    base: dict[str, Any] = {"lora_r": lim.default_lora_rank}
    if inherit and parent is not None:
        ph = parent.plan.hyper
        base = {"lora_r": ph.lora_r, "lora_alpha": ph.lora_alpha, "lora_dropout": ph.lora_dropout,
                "lora_target_modules": ph.lora_target_modules}  # fmt: skip
    lora = dict(base)
    if tt is not None:
        if tt.lora_r is not None:
            lora["lora_r"] = tt.lora_r
            if not inherit:
                lora.pop("lora_alpha", None)
        if tt.lora_alpha is not None:
            lora["lora_alpha"] = tt.lora_alpha
        if tt.lora_dropout is not None:
            lora["lora_dropout"] = float(tt.lora_dropout)
        modules = refs.present(tt.lora_trainable_modules)
        if modules is not None:
            lora["lora_target_modules"] = "all-linear" if modules == "all-linear" else modules_of(modules)
        before = base.get("lora_target_modules", "all-linear")
        if inherit and (lora["lora_r"] != base["lora_r"] or lora.get("lora_target_modules", "all-linear") != before):
            shown = before if isinstance(before, str) else ",".join(before)
            p.add("training_type.lora_r", f"from_checkpoint continues a LoRA adapter of rank {base['lora_r']} on "
                  f"{shown}; lora_r and lora_trainable_modules must match it")  # fmt: skip
    r = lora["lora_r"]
    if not 1 <= r <= lim.max_lora_rank:
        p.add("training_type.lora_r", f"lora_r must be between 1 and {lim.max_lora_rank} (got {r})")
    alpha = lora.get("lora_alpha")
    if alpha is not None and not alpha > 0:
        p.add("training_type.lora_alpha", f"lora_alpha must be positive (got {alpha})")
    dropout = lora.get("lora_dropout", _DEFAULTS.lora_dropout)
    if not 0 <= dropout < 1:
        p.add("training_type.lora_dropout", f"lora_dropout must be in [0, 1) (got {dropout})")
    modules = lora.get("lora_target_modules", "all-linear")
    if modules != "all-linear" and (not modules or any(m not in lim.target_modules for m in modules)):
        shown = modules if isinstance(modules, str) else ",".join(modules)
        p.add("training_type.lora_trainable_modules", "lora_trainable_modules must be 'all-linear' or a "
              f"comma-separated list of {', '.join(lim.target_modules)} (got {shown!r})")  # fmt: skip
    return lora


def _in_range(p: Problems, name: str, value: float, lo: float, hi: float, what: str = "") -> None:
    if not lo <= value <= hi:
        p.add(name, f"{name} must be between {lo} and {hi}{what} (got {value})")


def _hyper(
    p: Problems, body: FineTuneCreate, entry: ModelEntry, parent: _Parent | None, *, method: str,
    tm: TrainingMethodIn, has_val: bool,
) -> Hyper:  # fmt: skip
    """Every hyperparameter resolved (given, else the model's default, else Hyper's) and range-checked."""
    lim = entry.limits
    dpo = method == "dpo"
    ttype = _training_type(p, body.training_type, parent)
    given: dict[str, Any] = {"training_type": ttype, **_lora(p, body.training_type, parent, entry, ttype)}

    lo, hi = _batch_bounds(lim, ttype, method)
    if body.batch_size is not None:
        given["batch_size"] = body.batch_size
        if isinstance(body.batch_size, int):
            _in_range(p, "batch_size", body.batch_size, lo, hi,
                      f" for {ttype} {method} training on {entry.name}, or 'max'")  # fmt: skip
    seq_hi = lim.max_seq_length_dpo if dpo else lim.max_seq_length
    given["max_seq_length"] = body.max_seq_length if body.max_seq_length is not None else seq_hi
    _in_range(p, "max_seq_length", given["max_seq_length"], lim.min_seq_length, seq_hi,
              f" for {method} training on {entry.name}")  # fmt: skip
    given["learning_rate"] = float(body.learning_rate if body.learning_rate is not None else _DEFAULTS.learning_rate)
    _in_range(p, "learning_rate", given["learning_rate"], lim.min_learning_rate, lim.max_learning_rate)
    for name, value, low, high in (("n_epochs", body.n_epochs, 1, lim.max_num_epochs),
                                   ("n_checkpoints", body.n_checkpoints, 1, lim.max_num_checkpoints),
                                   ("n_evals", body.n_evals, 0, lim.max_num_evals)):  # fmt: skip
        if value is not None:
            given[name] = value
            _in_range(p, name, value, low, high)
    n_evals = given.get("n_evals", _DEFAULTS.n_evals)
    if n_evals > 0 and not has_val:
        p.add("n_evals", f"n_evals={n_evals} needs a validation_file to evaluate on")

    sched = body.lr_scheduler
    sched_type = (sched.lr_scheduler_type if sched else _DEFAULTS.lr_scheduler_type).strip().lower()
    args = sched.lr_scheduler_args if sched else None
    if sched_type not in ("linear", "cosine"):
        p.add("lr_scheduler.lr_scheduler_type", f"lr_scheduler_type must be 'linear' or 'cosine' (got {sched_type!r})")
    else:
        given["lr_scheduler_type"] = sched_type
    if args is not None and args.min_lr_ratio is not None:
        given["min_lr_ratio"] = float(args.min_lr_ratio)
        if not 0 <= args.min_lr_ratio <= 1:
            p.add("lr_scheduler.lr_scheduler_args.min_lr_ratio",
                  f"min_lr_ratio must be in [0, 1] (got {args.min_lr_ratio})")  # fmt: skip
    if args is not None and args.num_cycles is not None:
        given["scheduler_num_cycles"] = float(args.num_cycles)
        if sched_type == "cosine" and not args.num_cycles > 0:
            p.add("lr_scheduler.lr_scheduler_args.num_cycles",
                  f"num_cycles must be greater than 0 (got {args.num_cycles})")  # fmt: skip
    if body.warmup_ratio is not None:
        given["warmup_ratio"] = float(body.warmup_ratio)
        if not 0 <= body.warmup_ratio <= 1:
            p.add("warmup_ratio", f"warmup_ratio must be in [0, 1] (got {body.warmup_ratio})")
    for name in ("max_grad_norm", "weight_decay"):
        value = getattr(body, name)
        if value is not None:
            given[name] = float(value)
            if not value >= 0:
                p.add(name, f"{name} must be non-negative (got {value})")
    gas = (lim.default_gradient_accumulation_steps if body.gradient_accumulation_steps is None
           else body.gradient_accumulation_steps)  # fmt: skip
    given["gradient_accumulation_steps"] = gas
    if gas < 1:
        p.add("gradient_accumulation_steps", f"gradient_accumulation_steps must be at least 1 (got {gas})")
    if body.random_seed is not None:
        given["seed"] = body.random_seed
        if not 0 <= body.random_seed < 2**32:
            p.add("random_seed", f"random_seed must be in [0, 2^32) (got {body.random_seed})")
    if body.packing is not None:
        given["packing"] = body.packing
    if tm.train_on_inputs is not None:
        given["train_on_inputs"] = tm.train_on_inputs
    given.update(_early_stopping(p, body, n_evals=n_evals, has_validation=has_val))
    if dpo:
        simpo = tm.simpo_gamma or 0.0
        # As the SDK does: SimPO needs no reference model and normalises by length.
        given.update(
            dpo_beta=tm.dpo_beta if tm.dpo_beta is not None else _DEFAULTS.dpo_beta,
            dpo_normalize_logratios_by_length=bool(tm.dpo_normalize_logratios_by_length) or simpo > 0,
            dpo_reference_free=bool(tm.dpo_reference_free) or simpo > 0,
            rpo_alpha=tm.rpo_alpha or 0.0,
            simpo_gamma=simpo,
        )
    return Hyper(**given)


def _early_stopping(p: Problems, body: FineTuneCreate, *, n_evals: int, has_validation: bool) -> dict[str, Any]:
    patience = body.early_stopping_patience
    patience = patience if patience is not None else _DEFAULTS.early_stopping_patience
    warmup = body.early_stopping_warmup_evals
    warmup = warmup if warmup is not None else _DEFAULTS.early_stopping_warmup_evals
    min_delta = body.early_stopping_min_delta
    min_delta = float(min_delta) if min_delta is not None else _DEFAULTS.early_stopping_min_delta
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
            p.add("early_stopping_enabled", "early_stopping_enabled needs n_evals >= early_stopping_patience + "
                  f"early_stopping_warmup_evals + 1 = {needed} (got n_evals={n_evals})")  # fmt: skip
    return {"early_stopping_enabled": enabled, "early_stopping_patience": patience,
            "early_stopping_min_delta": min_delta, "early_stopping_warmup_evals": warmup}  # fmt: skip


def _resolve_parent(s: Session, catalog: Catalog, *, owner: str, ref: str, p: Problems) -> _Parent:
    name, step = refs.split_step(ref)
    job = refs.find_owned_job(s, owner=owner, name=name)
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
    plan = plan_of(job)
    lora = plan.hyper.training_type == "lora"
    parent = _Parent(job=job, plan=plan, entry=entry)
    try:
        w = refs.weights_at(job, repo.list_checkpoints(s, job_id=job.id), step=step,
                            final_variant="adapter" if lora else "model")  # fmt: skip
    except refs.MissingWeights as exc:
        p.add("from_checkpoint", f"from_checkpoint {ref!r}: {exc}")
        return parent
    parent.init = InitWeights(key=w.prefix, adapter=lora, step=w.step)
    parent.from_final = not w.intermediate
    return parent


def _init_for(p: Problems, blobs: BlobStore, parent: _Parent | None, training_type: str) -> InitWeights | None:
    """The weights the run starts from; full training on a LoRA parent starts from its merged weights."""
    if parent is None or parent.init is None:
        return None
    if training_type == "full" and parent.plan.hyper.training_type == "lora":
        merged = final_prefix(parent.job.id, "merged")
        if not parent.from_final or not blobs.list(merged):
            p.add("training_type", f"training_type Full cannot continue the LoRA adapter of {parent.job.id} (there "
                  "are no merged weights to start from); keep LoRA or start from the base model")  # fmt: skip
            return None
        return InitWeights(key=merged, adapter=False, step=parent.init.step)
    return parent.init
