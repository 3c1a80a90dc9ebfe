"""Bring your own model: what a hub repo holds, read before a job on it is queued, so that whatever cannot work is
refused at create time with its reason rather than failing in the training process.

`inspect_hub_model` reads the repo's file listing (sizes included), its `config.json` and, where present, its
`tokenizer_config.json`, through `huggingface_hub` with the job's own token (never the server's: a repo outside the
catalog is the user's choice, so only the user's credentials may open it). `refuse_unusable` then says what would
fail: not a causal LM, too large (100B parameters, the template model's size class, this host's memory), or no chat
template for conversational data. Torch-free: it runs in the API server.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tuneforge.catalog.hub import refusal_for
from tuneforge.catalog.source import ModelSource
from tuneforge.errors import InvalidRequestError, UpstreamUnavailableError

MAX_PARAMS = 100_000_000_000  # the hosted service's limit for bring-your-own-model
# A template's limits (sequence length, batch sizes) hold for models up to this many times its size.
TEMPLATE_SIZE_FACTOR = 2.0
_BYTES_PER_PARAM = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1, "uint8": 1}
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


@dataclass(frozen=True)
class HubModelInfo:
    repo: str
    revision: str | None
    architectures: tuple[str, ...]
    model_type: str | None
    weight_bytes: int
    params: int  # estimated from the weight files' sizes and the config's dtype
    has_chat_template: bool


def inspect_hub_model(repo: str, revision: str | None, token: str | None) -> HubModelInfo:
    """Read `repo` at `revision` from the hub (HF_ENDPOINT) with `token` (None: anonymously).

    Raises:
        NotFoundError / PermissionDeniedError / TuneForgeError: the hub's refusal, as a sentence naming the repo
            and what to pass (`catalog/hub.py`).
        InvalidRequestError: the repo has no config.json, or this server works offline.
        UpstreamUnavailableError: the hub could not be reached (503: retry later).
    """
    from huggingface_hub import HfApi, constants, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    source = ModelSource(name=repo, source_kind="hub", source=repo, revision=revision)
    credential: str | bool = token or False  # False: never the server's own token
    api = HfApi()
    try:  # first the repo's info: one request, no retries, so an unreachable hub is said at once
        api.model_info(repo, revision=revision, token=credential)
    except HfHubHTTPError as exc:
        raise refusal_for(source, exc, token_sent=bool(token)) from exc
    except OfflineModeIsEnabled as exc:
        raise InvalidRequestError(
            f"from_hf_model {repo!r}: this server works offline (HF_HUB_OFFLINE), so only the models of its catalog "
            "can be fine-tuned",
            param="from_hf_model",
        ) from exc
    except Exception as exc:
        raise UpstreamUnavailableError(
            f"from_hf_model {repo!r}: the hub at {constants.ENDPOINT} could not be reached ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else 'no details'}); retry later",
            param="from_hf_model",
        ) from exc
    try:
        files = {
            f.path: int(getattr(f, "size", 0) or 0)
            for f in api.list_repo_tree(repo, revision=revision, token=credential, recursive=True)
        }
        if "config.json" not in files:
            raise InvalidRequestError(
                f"from_hf_model {repo!r} has no config.json: it is not a transformers model", param="from_hf_model"
            )
        with tempfile.TemporaryDirectory(prefix="tf-inspect-") as tmp:

            def read(name: str) -> dict[str, object]:
                path = hf_hub_download(repo, name, revision=revision, token=credential, local_dir=tmp)
                data = json.loads(Path(path).read_text())
                return data if isinstance(data, dict) else {}

            config = read("config.json")
            tokenizer = read("tokenizer_config.json") if "tokenizer_config.json" in files else {}
    except InvalidRequestError:
        raise
    except Exception as exc:
        raise refusal_for(source, exc, token_sent=bool(token)) from exc
    weight_bytes = sum(n for p, n in files.items() if p.endswith(".safetensors"))
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    params = weight_bytes // _BYTES_PER_PARAM.get(dtype, 2)
    architectures = config.get("architectures")
    return HubModelInfo(
        repo=repo,
        revision=revision,
        architectures=tuple(str(a) for a in architectures) if isinstance(architectures, list) else (),
        model_type=str(config["model_type"]) if config.get("model_type") else None,
        weight_bytes=weight_bytes,
        params=params,
        has_chat_template=bool(tokenizer.get("chat_template")) or "chat_template.jinja" in files,
    )


def host_memory_bytes() -> int:
    """This host's physical memory (0 where the platform does not say)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 0


def training_bytes(params: int, training_type: str) -> int:
    """What training holds at least: fp32 weights (the recipes load in fp32) and, for full training, their
    gradients and AdamW's two moments; activations come on top."""
    return params * (4 if training_type == "lora" else 16)


def memory_shortfall(params: int, training_type: str, host_bytes: int) -> str | None:
    """Why a model of `params` parameters cannot train here (`training_bytes` over this host's memory), as the end
    of a sentence naming it; None when it fits or the host's memory is unknown (0)."""
    need = training_bytes(params, training_type)
    if not host_bytes or need <= host_bytes:
        return None
    what = "fp32 weights" if training_type == "lora" else "fp32 weights, their gradients and AdamW's moments"
    return (f"needs at least {need / 2**30:.1f} GiB of memory to train ({training_type}: {what}), and this host "
            f"has {host_bytes / 2**30:.1f} GiB")  # fmt: skip


def refuse_unusable(
    info: HubModelInfo, *, template: str, template_params: int | None, training_type: str, conversational: bool,
    host_bytes: int,
) -> None:  # fmt: skip
    """Raise InvalidRequestError (param from_hf_model) for the first reason a job on this repo cannot work."""
    name = f"from_hf_model {info.repo!r}"
    if not any(a.endswith(_CAUSAL_SUFFIXES) for a in info.architectures):
        found = ", ".join(info.architectures) or "no architecture"
        raise InvalidRequestError(
            f"{name} is not a causal language model (its config.json names {found}); fine-tuning needs a "
            "*ForCausalLM model",
            param="from_hf_model",
        )
    if info.weight_bytes == 0:
        raise InvalidRequestError(
            f"{name} holds no safetensors weights; only safetensors models can be fine-tuned (pickled *.bin weights "
            "are not loaded)",
            param="from_hf_model",
        )
    if info.params > MAX_PARAMS:
        raise InvalidRequestError(
            f"{name} has about {info.params / 1e9:.0f}B parameters; models up to 100B can be fine-tuned",
            param="from_hf_model",
        )
    if template_params and info.params > TEMPLATE_SIZE_FACTOR * template_params:
        raise InvalidRequestError(
            f"{name} has about {_count(info.params)} parameters, more than {TEMPLATE_SIZE_FACTOR:g}x the "
            f"{_count(template_params)} of model {template!r}, whose limits would apply; name a catalog model of "
            "similar architecture and size as model",
            param="from_hf_model",
        )
    short = memory_shortfall(info.params, training_type, host_bytes)
    if short:
        raise InvalidRequestError(f"{name} {short}", param="from_hf_model")
    if conversational and not info.has_chat_template:
        raise InvalidRequestError(
            f"{name} has no chat template in its tokenizer_config.json (nor a chat_template.jinja), so conversational "
            "data cannot be rendered for it; use prompt/completion or plain text data, or a chat model",
            param="from_hf_model",
        )


def _count(params: int) -> str:
    return f"{params / 1e9:.1f}B" if params >= 1e9 else f"{params / 1e6:.0f}M"
