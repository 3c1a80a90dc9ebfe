"""Hub models: a repo's snapshot in the Hugging Face cache (`huggingface_hub`, imported inside functions), with the
hub's answer deciding access, and each refusal worded as a sentence naming the repo and the remedy. Works against
any endpoint that speaks the hub's API (HF_ENDPOINT): the tests use a loopback stand-in (tests/hub_standin.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from tuneforge.catalog.source import ModelSource
from tuneforge.errors import NotFoundError, PermissionDeniedError, TuneForgeError

# What a hub model folder needs besides its weights: config, generation config, tokenizer (fast, sentencepiece,
# tiktoken or BPE vocab + merges), chat template and the safetensors index. Top-level files only: sub-folders hold
# other formats, original checkpoints or training leftovers; adapter_* files would make transformers load the folder
# as a PEFT adapter. Weights are fetched in a second pass: exactly the shards the index names (or model.safetensors),
# never a duplicate `consolidated.safetensors` or pickled `*.bin`.
HUB_FILES = ["*.json", "*.jinja", "*.model", "*.tiktoken", "*.txt", "tokenizer*"]
HUB_SKIP = ["*/*", "adapter_*"]
SAFETENSORS_INDEX = "model.safetensors.index.json"
_HUB_DEFAULT_ENDPOINTS = ("https://huggingface.co", "https://hub-ci.huggingface.co")


def download_hub(source: ModelSource, cache: Path) -> Path:
    """The repo's snapshot in the hub cache: small files, then the weights they name; the hub's answer decides access.

    The token is the process's own (HF_TOKEN: a job's hf_api_token, else the server's). The hub is asked first, so a
    cached private or gated repo is not handed to a job whose token the hub refuses; when the hub cannot be reached
    (network down, HF_HUB_OFFLINE), the cached snapshot of the revision is used as it is.
    """
    from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    repo, revision = source.source, source.revision
    say = _HubWords.of(source)
    unreachable = ""
    try:
        info = HfApi().model_info(repo, revision=revision)
        if info.gated:  # a gated repo's metadata is public: its files are what the hub guards
            get_hf_file_metadata(hf_hub_url(repo, "config.json", revision=info.sha))
    except HfHubHTTPError as exc:
        raise say.refusal(exc) from exc
    except Exception as exc:  # no answer from the hub: the cache may hold the revision
        unreachable = "HF_HUB_OFFLINE is set" if isinstance(exc, OfflineModeIsEnabled) else _first_line(exc)
    offline = bool(unreachable)
    cache_dir = str(cache / "hub")
    try:
        folder = Path(snapshot_download(repo, revision=revision, cache_dir=cache_dir, allow_patterns=HUB_FILES,
                                        ignore_patterns=HUB_SKIP, local_files_only=offline))  # fmt: skip
        weights = _hub_weight_files(folder)
        snapshot_download(repo, revision=folder.name, cache_dir=cache_dir, allow_patterns=weights,
                          local_files_only=offline)  # fmt: skip
    except Exception as exc:
        if offline:
            raise NotFoundError(
                f"{say.prefix}could not reach {say.hub} for {say.revision} ({unreachable}), "
                "and it is not in the model cache"
            ) from exc
        refused = _find_cause(exc, HfHubHTTPError)
        if refused is not None:
            raise say.refusal(refused) from exc
        raise TuneForgeError(f"{say.prefix}could not fetch {say.revision} from {say.hub}: {_first_line(exc)}") from exc
    if not (folder / "config.json").is_file():
        raise NotFoundError(f"{say.prefix}{say.revision} has no config.json: it is not a transformers model")
    missing = [w for w in weights if not (folder / w).is_file()]
    if missing:
        raise NotFoundError(
            f"{say.prefix}{say.revision} has no safetensors weights ({', '.join(missing)} missing); only safetensors "
            "models can be fine-tuned (pickled *.bin weights are not loaded)"
        )
    return folder


def _hub_weight_files(folder: Path) -> list[str]:
    index = folder / SAFETENSORS_INDEX
    if not index.is_file():
        return ["model.safetensors"]
    weight_map = json.loads(index.read_text()).get("weight_map") or {}
    return sorted(set(weight_map.values())) or ["model.safetensors"]


@dataclass(frozen=True)
class _HubWords:
    """How errors about one hub source name it: the catalog model (when named otherwise), the repo, the hub."""

    prefix: str
    repo: str
    revision: str
    hub: str
    revision_id: str | None
    token_sent: bool

    @classmethod
    def of(cls, source: ModelSource) -> _HubWords:
        from huggingface_hub import constants, get_token

        repo = f"the Hugging Face repo {source.source!r}"
        endpoint = constants.ENDPOINT
        return cls(
            prefix=f"base model {source.name!r}: " if source.name != source.source else "",
            repo=repo,
            revision=f"{repo} at revision {source.revision!r}" if source.revision else repo,
            hub="the Hugging Face hub" if endpoint in _HUB_DEFAULT_ENDPOINTS else f"the hub at {endpoint}",
            revision_id=source.revision,
            token_sent=bool(get_token()),
        )

    def refusal(self, exc: BaseException) -> TuneForgeError:
        """The hub's answer as a sentence naming the repo and what to do about it."""
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

        status = getattr(getattr(exc, "response", None), "status_code", None)
        head, token = f"{self.prefix}{self.repo}", "the access token sent (hf_api_token)"
        if isinstance(exc, GatedRepoError):
            if self.token_sent:
                return PermissionDeniedError(
                    f"{head} is gated on {self.hub} and {token} has not been granted access: accept the model's "
                    "conditions on its hub page with that account"
                )
            return PermissionDeniedError(
                f"{head} is gated on {self.hub}: accept the model's conditions on its hub page, then pass an access "
                "token of that account as hf_api_token"
            )
        if isinstance(exc, RevisionNotFoundError):
            return NotFoundError(
                f"{self.prefix}revision {self.revision_id!r} of {self.repo} was not found on {self.hub}"
            )
        if isinstance(exc, RepositoryNotFoundError):
            if self.token_sent:
                return NotFoundError(f"{head} was not found on {self.hub}, or {token} cannot read it")
            return NotFoundError(
                f"{head} was not found on {self.hub}; if it is private, pass an access token that can read it "
                "as hf_api_token"
            )
        if status == 401:
            return PermissionDeniedError(f"{head}: {self.hub} rejected {token} as invalid credentials")
        if status == 403:
            return PermissionDeniedError(f"{head}: {self.hub} refused access (HTTP 403); {token} lacks permission")
        return TuneForgeError(f"{head}: {self.hub} answered HTTP {status}: {_first_line(exc)}")


def refusal_for(source: ModelSource, exc: BaseException, *, token_sent: bool) -> TuneForgeError:
    """The hub's refusal of `source` (an error of `huggingface_hub`, or one caused by it) as a sentence naming the
    repo and what to do about it, for a request that sent a token or not; any other error says what failed."""
    from huggingface_hub.errors import HfHubHTTPError

    say = replace(_HubWords.of(source), token_sent=token_sent)
    refused = _find_cause(exc, HfHubHTTPError)
    if refused is not None:
        return say.refusal(refused)
    return TuneForgeError(f"{say.prefix}could not read {say.revision} from {say.hub}: {_first_line(exc)}")


def _find_cause(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None or isinstance(seen, kind):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


__all__ = ["HUB_FILES", "HUB_SKIP", "download_hub", "refusal_for"]
