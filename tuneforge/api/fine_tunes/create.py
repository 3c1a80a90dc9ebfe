"""`POST /fine-tunes`: resolve the request (rules in `checks.py`), then store the job: resolved hyperparameters
(`train.spec.Hyper`), the echo of the request for the job object, the weights to start from, the secrets.

An identical body from the same owner within `duplicate_job_window_s` returns the first job: the SDK retries a
POST after a timeout or a 5xx, and one click must not start two runs.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec
from sqlalchemy.orm import Session

from tuneforge.api.fine_tunes import checks, resolve
from tuneforge.api.fine_tunes.checks import Parent, Problems
from tuneforge.api.fine_tunes.schemas import FineTuneCreate, TrainingMethodIn
from tuneforge.catalog.entries import ModelEntry
from tuneforge.catalog.registry import Catalog
from tuneforge.errors import NotFoundError
from tuneforge.ids import new_job_id
from tuneforge.jobs.states import JobStatus
from tuneforge.settings import Settings
from tuneforge.storage import BlobStore
from tuneforge.store import Database
from tuneforge.store import jobs as repo
from tuneforge.store.tables import FileRow, JobRow
from tuneforge.train.spec import Hyper

SUFFIX_RE = re.compile(r"^[A-Za-z0-9._-]{1,40}$")
DEFAULT_SEED = 42
DEFAULT_LEARNING_RATE = 1e-5


@dataclass
class Plan:
    """Everything the job row is made of, once the request has passed every check."""

    entry: ModelEntry
    method: str
    hyper: Hyper
    request: dict[str, Any]
    init: dict[str, Any] | None
    model_source: dict[str, Any]
    train: FileRow
    validation: FileRow | None
    secrets: dict[str, Any] = field(default_factory=dict)


def request_hash(body: FineTuneCreate) -> str:
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def create_job(
    db: Database, blobs: BlobStore, catalog: Catalog, settings: Settings, *, owner: str, body: FineTuneCreate
) -> tuple[JobRow, bool]:
    """Check the request and store the job as `queued`. Returns the job and whether it is new (False: a retry)."""
    digest = request_hash(body)
    with db.session() as s:
        since = time.time() - settings.duplicate_job_window_s
        earlier = repo.find_recent_duplicate(s, owner=owner, request_hash=digest, since=since)
        if earlier is not None:
            return earlier, False
        plan = plan_job(s, blobs, catalog, owner=owner, body=body)
        job_id = new_job_id()
        now = time.time()
        report = plan.train.validation_report or {}
        row = JobRow(
            id=job_id,
            owner=owner,
            status=JobStatus.PENDING.value,
            model=plan.entry.name,
            output_name=_output_name(s, owner=owner, entry=plan.entry, suffix=plan.request["suffix"], job_id=job_id),
            training_file=plan.train.id,
            validation_file=plan.validation.id if plan.validation is not None else None,
            params={
                "hyper": msgspec.to_builtins(plan.hyper),
                "request": plan.request,
                "model_source": plan.model_source,
                "init": plan.init,
                "dataset_format": checks.format_of(plan.train),
                "method": plan.method,
                "trainingfile_numlines": report.get("nlines"),
                "trainingfile_size": plan.train.bytes,
            },
            request_hash=digest,
            error=None,
            progress={},
            secrets=plan.secrets,
            runner=None,
            attempt=0,
            created_at=now,
            updated_at=now,
            started_at=None,
            finished_at=None,
            heartbeat_at=None,
            deleted=0,
        )
        repo.insert_job(s, row=row, event_type="job_pending", message="Fine-tune job created")
        ahead = repo.queue_depth(s, created_at=now)
        repo.transition(
            s,
            job_id=job_id,
            from_statuses=(JobStatus.PENDING.value,),
            to_status=JobStatus.QUEUED.value,
            event_type="job_pending",
            message=f"Job queued, {ahead} ahead",
            event_data={"queue_depth": ahead},
        )
        s.flush()
        s.refresh(row)
        return row, True


def plan_job(s: Session, blobs: BlobStore, catalog: Catalog, *, owner: str, body: FineTuneCreate) -> Plan:
    """Resolve the request against the catalog and the caller's files and jobs; raise on any problem."""
    p = Problems()
    model = resolve.present(body.model)
    ckpt = resolve.present(body.from_checkpoint)
    hf = resolve.present(body.from_hf_model)
    if model and ckpt:
        p.add("model", "model and from_checkpoint exclude each other: give one of them")
    if not model and not ckpt:
        p.add("model", "model is required (or from_checkpoint, to continue a previous job)")
        p.raise_if_any()
    if hf and ckpt:
        p.add("from_hf_model", "from_hf_model and from_checkpoint exclude each other")
    if hf and not model:
        p.add("from_hf_model", "from_hf_model needs model: the catalog model whose architecture and limits apply")
    if resolve.present(body.hf_model_revision) and not hf:
        p.add("hf_model_revision", "hf_model_revision applies only together with from_hf_model")

    parent: Parent | None = None
    if model:
        found = catalog.find(model)
        if found is None and resolve.find_owned_job(s, owner=owner, name=model) is not None:
            p.add(
                "model", f"model {model!r} is a fine-tuned output: continue training it with from_checkpoint={model!r}"
            )
            p.raise_if_any()
        if found is None:
            raise NotFoundError(
                f"model {model!r} not found in the model catalog (GET /v1/models lists what can be fine-tuned)",
                param="model",
            )
        entry = found
    else:
        parent = checks.resolve_parent(s, blobs, catalog, owner=owner, ref=ckpt or "", p=p)
        entry = parent.entry
    source = _model_source(p, catalog, entry, parent, body, hf=hf if model else None)

    tm = body.training_method or TrainingMethodIn()
    method = checks.check_method(p, tm, entry)
    train_id = body.training_file.strip()
    if not train_id:
        p.add("training_file", "training_file is required")
        p.raise_if_any()
    train = resolve.owned_file(s, owner=owner, file_id=train_id, param="training_file")
    checks.check_file(p, train, param="training_file", method=method, entry=entry)
    val_id = resolve.present(body.validation_file)
    validation = None
    if val_id:
        validation = resolve.owned_file(s, owner=owner, file_id=val_id, param="validation_file")
        checks.check_file(p, validation, param="validation_file", method=method, entry=entry)
    ttype, lora = checks.check_training_type(p, body.training_type, parent, entry)
    init = checks.init_for(p, blobs, parent, ttype)
    hyper, request = _hyper(p, body, entry, method=method, ttype=ttype, lora=lora, tm=tm, has_val=bool(validation))
    p.raise_if_any()
    request.update(from_checkpoint=ckpt, from_hf_model=hf)
    secrets = {k: v for k, v in (("wandb_key", body.wandb_key), ("hf_api_token", body.hf_api_token)) if v}
    return Plan(
        entry=entry,
        method=method,
        hyper=hyper,
        request=request,
        init=init,
        model_source=source,
        train=train,
        validation=validation,
        secrets=secrets,
    )


def _model_source(
    p: Problems, catalog: Catalog, entry: ModelEntry, parent: Parent | None, body: FineTuneCreate, *, hf: str | None
) -> dict[str, Any]:
    """Where the base weights come from: the entry, the parent's base, or a catalog entry named like the HF repo."""
    if parent is not None and (parent.job.params or {}).get("model_source"):
        return dict(parent.job.params["model_source"])
    source = entry
    revision = entry.revision
    if hf:
        hf_entry = next((e for e in catalog.list() if hf in (e.name, e.source)), None)
        if hf_entry is None:
            p.add(
                "from_hf_model",
                f"from_hf_model {hf!r}: starting from a Hugging Face repo that is not in the model catalog is not "
                "supported on this server; add the repo to the catalog first",
            )
        else:
            source, revision = hf_entry, resolve.present(body.hf_model_revision) or hf_entry.revision
    return {"name": source.name, "source_kind": source.source_kind, "source": source.source, "revision": revision}


def _hyper(
    p: Problems,
    body: FineTuneCreate,
    entry: ModelEntry,
    *,
    method: str,
    ttype: str,
    lora: checks.Lora,
    tm: TrainingMethodIn,
    has_val: bool,
) -> tuple[Hyper, dict[str, Any]]:
    """Range-check the numbers against the model's limits; the run's Hyper and the job object's echo."""
    lim = entry.limits
    dpo = method == "dpo"
    batch_size = body.batch_size if body.batch_size is not None else "max"
    if ttype == "full":
        lo, hi = lim.full_min_batch_size, lim.full_max_batch_size_dpo if dpo else lim.full_max_batch_size
    else:
        lo, hi = lim.lora_min_batch_size, lim.lora_max_batch_size_dpo if dpo else lim.lora_max_batch_size
    if isinstance(batch_size, int) and not lo <= batch_size <= hi:
        p.add(
            "batch_size",
            f"batch_size must be between {lo} and {hi} for {ttype} {method} training on "
            f"{entry.name}, or 'max' (got {batch_size})",
        )
    seq_hi = lim.max_seq_length_dpo if dpo else lim.max_seq_length
    max_seq_length = body.max_seq_length if body.max_seq_length is not None else seq_hi
    if not lim.min_seq_length <= max_seq_length <= seq_hi:
        p.add(
            "max_seq_length",
            f"max_seq_length must be between {lim.min_seq_length} and {seq_hi} for {method} "
            f"training on {entry.name} (got {max_seq_length})",
        )
    lr = body.learning_rate if body.learning_rate is not None else DEFAULT_LEARNING_RATE
    if not lim.min_learning_rate <= lr <= lim.max_learning_rate:
        p.add(
            "learning_rate",
            f"learning_rate must be between {lim.min_learning_rate} and {lim.max_learning_rate} (got {lr})",
        )
    n_epochs = checks.int_in(p, "n_epochs", body.n_epochs, 1, 1, lim.max_num_epochs)
    n_checkpoints = checks.int_in(p, "n_checkpoints", body.n_checkpoints, 1, 1, lim.max_num_checkpoints)
    n_evals = checks.int_in(p, "n_evals", body.n_evals, 0, 0, lim.max_num_evals)
    if n_evals > 0 and not has_val:
        p.add("n_evals", f"n_evals={n_evals} needs a validation_file to evaluate on")
    sched = body.lr_scheduler
    sched_type = (sched.lr_scheduler_type if sched else "cosine").strip().lower()
    args = sched.lr_scheduler_args if sched else None
    min_lr_ratio = args.min_lr_ratio if args and args.min_lr_ratio is not None else 0.0
    num_cycles = args.num_cycles if args and args.num_cycles is not None else 0.5
    if sched_type not in ("linear", "cosine"):
        p.add("lr_scheduler.lr_scheduler_type", f"lr_scheduler_type must be 'linear' or 'cosine' (got {sched_type!r})")
    if not 0 <= min_lr_ratio <= 1:
        p.add("lr_scheduler.lr_scheduler_args.min_lr_ratio", f"min_lr_ratio must be in [0, 1] (got {min_lr_ratio})")
    if sched_type == "cosine" and not num_cycles > 0:
        p.add("lr_scheduler.lr_scheduler_args.num_cycles", f"num_cycles must be greater than 0 (got {num_cycles})")
    warmup = body.warmup_ratio if body.warmup_ratio is not None else 0.0
    if not 0 <= warmup <= 1:
        p.add("warmup_ratio", f"warmup_ratio must be in [0, 1] (got {warmup})")
    max_grad_norm = body.max_grad_norm if body.max_grad_norm is not None else 1.0
    if not max_grad_norm >= 0:
        p.add("max_grad_norm", f"max_grad_norm must be non-negative (got {max_grad_norm})")
    weight_decay = body.weight_decay if body.weight_decay is not None else 0.0
    if not weight_decay >= 0:
        p.add("weight_decay", f"weight_decay must be non-negative (got {weight_decay})")
    gas = body.gradient_accumulation_steps or lim.default_gradient_accumulation_steps
    if gas < 1:
        p.add("gradient_accumulation_steps", f"gradient_accumulation_steps must be at least 1 (got {gas})")
    seed = body.random_seed if body.random_seed is not None else DEFAULT_SEED
    if not 0 <= seed < 2**32:
        p.add("random_seed", f"random_seed must be in [0, 2^32) (got {seed})")
    suffix = resolve.present(body.suffix)
    if suffix is not None and not SUFFIX_RE.match(suffix):
        p.add("suffix", f"suffix must be at most 40 characters of letters, digits, '.', '_' and '-' (got {suffix!r})")
    es = checks.check_early_stopping(p, body, n_evals=n_evals, has_validation=has_val)
    train_vision = bool(body.multimodal_params and body.multimodal_params.train_vision)
    if train_vision and not lim.supports_vision:
        p.add(
            "multimodal_params.train_vision",
            f"train_vision is only available for vision models; {entry.name} is not one",
        )

    train_on_inputs: bool | Literal["auto"] = tm.train_on_inputs if tm.train_on_inputs is not None else "auto"
    simpo = tm.simpo_gamma or 0.0
    # As the SDK does: SimPO needs no reference model and normalises by length.
    reference_free = bool(tm.dpo_reference_free) or simpo > 0
    normalize = bool(tm.dpo_normalize_logratios_by_length) or simpo > 0
    packing = body.packing if body.packing is not None else True
    hyper = Hyper(
        training_type="full" if ttype == "full" else "lora",
        lora_r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=float(lora.dropout),
        lora_target_modules="all-linear" if lora.modules == "all-linear" else checks.modules_of(lora.modules),
        n_epochs=n_epochs,
        n_checkpoints=n_checkpoints,
        n_evals=n_evals,
        batch_size=batch_size,
        gradient_accumulation_steps=gas,
        learning_rate=float(lr),
        lr_scheduler_type="linear" if sched_type == "linear" else "cosine",
        min_lr_ratio=float(min_lr_ratio),
        scheduler_num_cycles=float(num_cycles),
        warmup_ratio=float(warmup),
        max_grad_norm=float(max_grad_norm),
        weight_decay=float(weight_decay),
        max_seq_length=max_seq_length,
        packing=packing,
        train_on_inputs=train_on_inputs,
        seed=seed,
        early_stopping_enabled=es["enabled"],
        early_stopping_patience=es["patience"],
        early_stopping_min_delta=es["min_delta"],
        early_stopping_warmup_evals=es["warmup_evals"],
        dpo_beta=tm.dpo_beta if tm.dpo_beta is not None else 0.1,
        dpo_normalize_logratios_by_length=normalize,
        dpo_reference_free=reference_free,
        rpo_alpha=tm.rpo_alpha or 0.0,
        simpo_gamma=simpo,
    )
    if dpo:
        method_obj: dict[str, Any] = {
            "method": "dpo",
            "dpo_beta": hyper.dpo_beta,
            "dpo_normalize_logratios_by_length": normalize,
            "dpo_reference_free": reference_free,
            "rpo_alpha": tm.rpo_alpha,
            "simpo_gamma": tm.simpo_gamma,
        }
    else:
        method_obj = {"method": "sft", "train_on_inputs": train_on_inputs}
    sched_args: dict[str, Any] = {"min_lr_ratio": min_lr_ratio}
    if sched_type == "cosine":
        sched_args["num_cycles"] = num_cycles
    request = {
        "training_type": {"type": "Full"} if ttype == "full" else lora.type_object(),
        "training_method": method_obj,
        "lr_scheduler": {"lr_scheduler_type": sched_type, "lr_scheduler_args": sched_args},
        "n_epochs": n_epochs,
        "n_checkpoints": n_checkpoints,
        "n_evals": n_evals,
        "batch_size": batch_size,
        "max_batch_size": hi,
        "learning_rate": lr,
        "warmup_ratio": warmup,
        "max_grad_norm": max_grad_norm,
        "weight_decay": weight_decay,
        "max_seq_length": max_seq_length,
        "packing": packing,
        "random_seed": seed,
        "suffix": suffix,
        "hf_model_revision": resolve.present(body.hf_model_revision),
        "hf_output_repo_name": resolve.present(body.hf_output_repo_name),
        "multimodal_params": {"train_vision": train_vision} if lim.supports_vision else None,
        "wandb_project_name": resolve.present(body.wandb_project_name),
        "wandb_name": resolve.present(body.wandb_name),
        "wandb_entity": resolve.present(body.wandb_entity),
        "wandb_base_url": resolve.present(body.wandb_base_url),
    }
    return hyper, request


def _output_name(s: Session, *, owner: str, entry: ModelEntry, suffix: str | None, job_id: str) -> str:
    """`owner/<base model>-<suffix>-<6 hex of the job id>`, longer where that is taken."""
    hexes = job_id.removeprefix("ft-").replace("-", "")
    base = entry.name.rsplit("/", 1)[-1]
    for length in range(6, len(hexes) + 1):
        parts = [base, *([suffix] if suffix else []), hexes[:length]]
        name = f"{owner}/{'-'.join(parts)}"
        if repo.find_job_by_output_name(s, output_name=name) is None:
            return name
    return f"{owner}/{base}-{job_id}"
