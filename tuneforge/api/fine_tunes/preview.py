"""`POST /fine-tunes/preview` (api-contract 3.10): the first rows of a training file, tokenized and masked as an SFT run
on the model will tokenize them.

Nothing here decides a token or a label: the rows come from `data.tokenization.tokenize.preview_records`, the code
the training run's `tokenize_blob` runs (chat template, `train_on_inputs`, weights, the cut at `max_seq_length`), on
the files the run loads with `AutoTokenizer` (`tokenizer.json`, `tokenizer_config.json`, the chat template), read
without torch or transformers by `data.tokenization.hf_tokenizer` (a mirror of transformers' rendering that
bench/preview_tokenizer.py measures against transformers itself). Those files are the model's folder in the
training cache `<home>/models`:
- `local` models: their own folder;
- `gguf` / `gguf-package` models: the folder the first run on them converts the GGUF file into;
- `hub` models: the Hugging Face cache snapshot the first run on them downloads;
- `output` models: the output's folder in the blob store.
Until a run has converted or downloaded a model there is nothing to read: the preview then starts preparing the
model in a process of its own (`catalog.prepare`, which does what the first run would: converting or downloading
takes torch and transformers, which the API does not load) and answers a 409 naming `model` that says to preview
again in about a minute.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from functools import lru_cache
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from tuneforge.api.fine_tunes.schemas import PreviewPublic, PreviewRequest, PreviewRow
from tuneforge.catalog import background
from tuneforge.catalog.cache import model_folder
from tuneforge.catalog.entries import ModelEntry
from tuneforge.catalog.registry import Catalog
from tuneforge.catalog.source import ModelSource
from tuneforge.data.formats import SFT_FORMATS, detect_format
from tuneforge.data.tokenization.chat import render_preview_row
from tuneforge.data.tokenization.templates import adopt_training_template
from tuneforge.data.tokenization.tokenize import iter_jsonl, preview_records, train_inputs
from tuneforge.errors import ConflictError, InvalidRequestError
from tuneforge.jobs import plan as checks
from tuneforge.jobs import references as resolve
from tuneforge.settings import Settings
from tuneforge.storage import BlobStore
from tuneforge.storage.layout import file_key
from tuneforge.store import Database

if TYPE_CHECKING:
    from tuneforge.data.tokenization.hf_tokenizer import HFTokenizer

# As Together's API: 5 rows unless asked, at most 50.
DEFAULT_TOP_K = 5
MAX_TOP_K = 50

# Source kinds whose folder a first run makes (a conversion, a download): a preview before any run prepares them.
PREPARED_KINDS = ("gguf", "gguf-package", "hub")

DatasetFormat = Literal["general", "conversation", "instruction"]


def preview(
    db: Database, blobs: BlobStore, catalog: Catalog, settings: Settings, *, owner: str, body: PreviewRequest
) -> PreviewPublic:
    """The first `top_k` rows of the caller's training file as a job on `model` with the same `train_on_inputs` and
    the default `max_seq_length` would train on them; one row per record, those the run would drop included."""
    p = checks.Problems("preview request")
    model = resolve.present(body.model)
    if model is None:
        p.add("model", "model is required")
    train_id = body.training_file.strip()
    if not train_id:
        p.add("training_file", "training_file is required")
    method = resolve.present(body.training_method) or "sft"
    if method.lower() != "sft":
        p.add("training_method", f"training_method must be 'sft': only SFT data can be previewed (got {method!r})")
    top_k = body.top_k if body.top_k is not None else DEFAULT_TOP_K
    if not 1 <= top_k <= MAX_TOP_K:
        p.add("top_k", f"top_k must be between 1 and {MAX_TOP_K} (got {top_k})")
    p.raise_if_any()
    assert model is not None
    with db.session() as s:
        entry = resolve.base_entry(s, catalog, owner=owner, name=model)
        row = resolve.owned_file(s, owner=owner, file_id=train_id, param="training_file")
    checks.check_file(p, row, param="training_file", method="sft", entry=entry)
    if not p.items and row.file_type != "jsonl":
        p.add(
            "training_file",
            f"training_file {row.id} is a {row.file_type} file; its rows are already tokenized and are trained "
            "as they are, so there is nothing to preview (the preview shows how JSONL data is tokenized)",
        )
    p.raise_if_any()

    tokenizer = model_tokenizer(settings, blobs, entry)
    with blobs.open(file_key(row.id)) as stream:
        lines = list(islice(iter_jsonl(stream), top_k))
    fmt = (detect_format(lines[0][1]) if lines else None) or checks.format_of(row)
    if fmt not in SFT_FORMATS:
        raise InvalidRequestError(
            f"training_file {row.id} holds {fmt or 'unknown'} data, which does not suit SFT", param="training_file"
        )
    train_on_inputs = body.train_on_inputs if body.train_on_inputs is not None else "auto"
    max_seq_length = entry.limits.max_seq_length
    try:
        examples = preview_records(
            lines,
            tokenizer=tokenizer,
            dataset_format=fmt,
            train_on_inputs=train_on_inputs,
            max_seq_length=max_seq_length,
        )
    except ValueError as exc:
        raise InvalidRequestError(
            f"training_file {row.id} cannot be tokenized for {entry.name}, so a job would fail on it: {exc}",
            param="training_file",
        ) from exc
    return PreviewPublic(
        dataset_format=cast(DatasetFormat, fmt),
        max_seq_length=max_seq_length,
        model=entry.name,
        train_on_inputs=train_inputs(train_on_inputs, fmt),
        rows=[
            PreviewRow(**render_preview_row(e.input_ids, e.labels, tokenizer, truncated=e.truncated)) for e in examples
        ],
    )


# -- the model's tokenizer ------------------------------------------------------------------------------------------


def model_tokenizer(settings: Settings, blobs: BlobStore, entry: ModelEntry) -> HFTokenizer:
    """The tokenizer and chat template a training run on `entry` loads; ConflictError naming `model` until a run
    has prepared them (or when they cannot be read)."""
    from tuneforge.data.tokenization.hf_tokenizer import TokenizerFilesError

    try:
        if entry.source_kind == "output":
            prefix = entry.source.rstrip("/")
            if not blobs.exists(f"{prefix}/tokenizer.json"):
                raise _not_ready(entry, f"the output {prefix} has no tokenizer.json")
            return _blob_tokenizer(blobs, prefix)
        cache = settings.home / "models"
        folder = model_folder(cache, entry)
        if folder is None and entry.source_kind in PREPARED_KINDS and settings.prepare_models:
            raise _preparing(entry, cache)
        if folder is None or not (folder / "tokenizer.json").is_file():
            raise _not_ready(entry, _why_missing(entry, folder))
        return _folder_tokenizer(str(folder), _stamp(folder))
    except TokenizerFilesError as exc:
        raise ConflictError(f"model {entry.name!r}: its tokenizer cannot be loaded: {exc}", param="model") from exc


def _why_missing(entry: ModelEntry, folder: Path | None) -> str:
    kind = entry.source_kind
    if kind == "local":
        return f"its folder {entry.source} has no tokenizer.json (a fast tokenizer is needed)"
    if kind in ("gguf", "gguf-package"):
        return "it is converted from its GGUF file when the first fine-tune job on it starts, and none has yet"
    if kind == "hub":
        if folder is not None:
            return f"its Hugging Face snapshot {folder} has no tokenizer.json (a fast tokenizer is needed)"
        return "it is downloaded from the Hugging Face hub when the first fine-tune job on it starts, and none has yet"
    return f"models of source kind {kind!r} cannot be previewed"


def _preparing(entry: ModelEntry, cache: Path) -> ConflictError:
    """Start preparing the model (once; a training run would do the same) and say so."""
    source = ModelSource(name=entry.name, source_kind=entry.source_kind, source=entry.source, revision=entry.revision)
    state = background.start(source, cache)
    how = "downloaded from the hub" if entry.source_kind == "hub" else "converted from its GGUF file"
    again = f" (the previous attempt failed: {state.failure}; trying again)" if state.failure else ""
    return ConflictError(
        f"model {entry.name!r} is being prepared for its first use: the preview tokenizes with the model's own "
        f"tokenizer and chat template, and the model is being {how}{again}. This takes about a minute; preview "
        "again then",
        param="model",
    )


def _not_ready(entry: ModelEntry, why: str) -> ConflictError:
    return ConflictError(
        f"model {entry.name!r} cannot be previewed yet: the preview tokenizes with the model's own tokenizer and chat "
        f"template, and this server does not have them yet: {why}. Start a fine-tune job on the model (its run "
        "prepares the model first; the job's `model_download_complete` event says when that is done), then preview "
        "again",
        param="model",
    )


def _stamp(folder: Path) -> tuple[tuple[str, int, int], ...]:
    """What changes when a model folder is rewritten (a re-conversion, another snapshot): the cache key's part."""
    out = []
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix in (".json", ".jinja"):
            st = path.stat()
            out.append((path.name, st.st_mtime_ns, st.st_size))
    return tuple(out)


@lru_cache(maxsize=8)
def _folder_tokenizer(folder: str, stamp: Any) -> HFTokenizer:
    from tuneforge.data.tokenization.hf_tokenizer import HFTokenizer, read_folder

    tokenizer = HFTokenizer(read_folder(Path(folder)))
    adopt_training_template(tokenizer)  # as the training run does
    return tokenizer


_blob_cache: OrderedDict[str, HFTokenizer] = OrderedDict()
_blob_lock = threading.Lock()


def _blob_tokenizer(blobs: BlobStore, prefix: str) -> HFTokenizer:
    """An output's files never change once written (its prefix names a job), so the prefix is the cache key."""
    from tuneforge.data.tokenization.hf_tokenizer import HFTokenizer, is_tokenizer_file

    with _blob_lock:
        if prefix in _blob_cache:
            _blob_cache.move_to_end(prefix)
            return _blob_cache[prefix]
    files: dict[str, bytes] = {}
    for key in blobs.list(prefix):
        name = key[len(prefix) + 1 :]
        if is_tokenizer_file(name):
            with blobs.open(key) as fh:
                files[name] = fh.read()
    tokenizer = HFTokenizer(files)
    adopt_training_template(tokenizer)  # as the training run does (an output saved the template it adopted)
    with _blob_lock:
        _blob_cache[prefix] = tokenizer
        while len(_blob_cache) > 8:
            _blob_cache.popitem(last=False)
    return tokenizer
