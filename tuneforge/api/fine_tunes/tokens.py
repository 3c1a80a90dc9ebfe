"""Token counts of a dataset for price estimates, without torch.

Exact when the base model's `tokenizer.json` is already in the training cache: `<home>/models/<name>/`
(`/` in the name written as `--`), or the Hugging Face cache under `<home>/models/hub/`. The `tokenizers`
library (Rust) then encodes the text of each sample; a tokenized Parquet file has its `input_ids` counted.
Files larger than `SAMPLE_BYTES` are counted over their first `SAMPLE_BYTES` and scaled to the whole size.
Without a tokenizer the count is an estimate, one token per four bytes of the file; the wire answer looks
the same either way.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

from tuneforge.catalog.cache import model_folder
from tuneforge.catalog.entries import ModelEntry
from tuneforge.storage import BlobStore

SAMPLE_BYTES = 32 << 20
BYTES_PER_TOKEN = 4
# Keys whose values are markup, not text the model reads.
_SKIP_KEYS = frozenset({"role", "type", "id", "tool_call_id", "weight", "image_url", "url"})

_cache: OrderedDict[tuple[str, str], int] = OrderedDict()
_cache_lock = threading.Lock()


def tokenizer_path(home: Path, entry: ModelEntry) -> Path | None:
    """The model's `tokenizer.json` in the training cache, when a run (or a preview's preparation) has left one there:
    the folder training loads the model from (`catalog.cache.model_folder`)."""
    folder = model_folder(home / "models", entry)
    path = folder / "tokenizer.json" if folder is not None else None
    return path if path is not None and path.is_file() else None


@lru_cache(maxsize=8)
def _load_tokenizer(path: str, mtime: float) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)


def count_tokens(blobs: BlobStore, *, file_id: str, key: str, file_type: str, size: int, tokenizer: Path | None) -> int:
    """Tokens in the stored dataset `key` (cached per file and tokenizer: files never change)."""
    if tokenizer is None and file_type != "parquet":
        return max(1, size // BYTES_PER_TOKEN) if size else 0
    cache_key = (file_id, str(tokenizer))
    with _cache_lock:
        if cache_key in _cache:
            _cache.move_to_end(cache_key)
            return _cache[cache_key]
    if file_type == "parquet":
        count = _count_parquet(blobs, key, size, tokenizer)
    else:
        assert tokenizer is not None
        tok = _load_tokenizer(str(tokenizer), tokenizer.stat().st_mtime)
        count = _count_jsonl(blobs, key, size, tok)
    with _cache_lock:
        _cache[cache_key] = count
        while len(_cache) > 256:
            _cache.popitem(last=False)
    return count


def _count_jsonl(blobs: BlobStore, key: str, size: int, tok: Any) -> int:
    tokens = 0
    read = 0
    batch: list[str] = []
    with blobs.open(key) as fh:
        for line in fh:
            read += len(line)
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            batch.extend(texts_of(obj))
            if len(batch) >= 512:
                tokens += sum(len(e.ids) for e in tok.encode_batch(batch, add_special_tokens=False))
                batch.clear()
            if read >= SAMPLE_BYTES:
                break
    if batch:
        tokens += sum(len(e.ids) for e in tok.encode_batch(batch, add_special_tokens=False))
    if read and read < size:
        tokens = round(tokens * size / read)
    return tokens


def _count_parquet(blobs: BlobStore, key: str, size: int, tokenizer: Path | None) -> int:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    with blobs.open(key) as fh:
        pf = pq.ParquetFile(fh)
        if "input_ids" not in pf.schema_arrow.names:
            return max(1, size // BYTES_PER_TOKEN)
        column = pf.read(columns=["input_ids"]).column("input_ids")
        return int(pc.sum(pc.list_value_length(column)).as_py() or 0)


def texts_of(value: Any) -> Iterator[str]:
    """Every string a model would read in one sample: message contents, prompts, completions, tool arguments."""
    if isinstance(value, str):
        if value and not value.startswith("data:"):
            yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            if k not in _SKIP_KEYS:
                yield from texts_of(v)
    elif isinstance(value, list):
        for item in value:
            yield from texts_of(item)
