"""The tokenizer as `tuneforge.data` sees it: a duck-typed `Protocol` and the few calls made through it.

A transformers tokenizer fits without an adapter. Owns how those calls are spelled (token ids out of a
`BatchEncoding` or a list, bos detection); knows nothing of torch, transformers, dataset formats or masking.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol


class Tokenizer(Protocol):
    """The part of a transformers `PreTrainedTokenizer(Fast)` that tokenization and previews use."""

    @property
    def eos_token_id(self) -> int | None: ...

    @property
    def bos_token_id(self) -> int | None: ...

    @property
    def pad_token_id(self) -> int | None: ...

    def apply_chat_template(self, conversation: Any, *args: Any, **kwargs: Any) -> Any: ...

    def __call__(self, text: Any, *args: Any, **kwargs: Any) -> Any: ...

    def convert_ids_to_tokens(self, ids: Any, *args: Any, **kwargs: Any) -> Any: ...


def as_ids(value: Any) -> list[int]:
    """Token ids out of whatever a tokenizer call returned: a `BatchEncoding`/dict, a list, or a batch of one."""
    if isinstance(value, Mapping):
        value = value["input_ids"]
    if hasattr(value, "tolist"):  # an array, should a caller have asked for tensors
        value = value.tolist()
    if not isinstance(value, Sequence) or isinstance(value, str | bytes):
        raise ValueError(f"the tokenizer returned {type(value).__name__}, not a list of token ids")
    if len(value) == 1 and isinstance(value[0], Sequence):
        value = value[0]
    return [int(t) for t in value]


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """The ids of `text` alone, without the special tokens the tokenizer may add around it."""
    return as_ids(tokenizer(text, add_special_tokens=False))


def encode_batch(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """`encode` for many texts in one call (a fast tokenizer spreads a batch over its Rust threads)."""
    if not texts:
        return []
    out = tokenizer(texts, add_special_tokens=False)
    rows = out["input_ids"] if isinstance(out, Mapping) else out
    return [[int(t) for t in row] for row in rows]


def encode_with_offsets(tokenizer: Tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and (start, end) character offsets of `text` without added special tokens (needs a fast tokenizer).

    Raises:
        ValueError: the tokenizer cannot give offsets.
    """
    try:
        out = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = [(int(a), int(b)) for a, b in out["offset_mapping"]]
    except (NotImplementedError, KeyError, TypeError) as exc:
        raise ValueError(f"the tokenizer cannot map tokens to characters ({exc}); a fast tokenizer is needed") from exc
    return as_ids(out), offsets


def bos_prefix(tokenizer: Tokenizer) -> list[int]:
    """`[bos]` when the tokenizer has a bos token and puts it in front of plain text by default, else `[]`."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    default = as_ids(tokenizer("a"))
    bare = encode(tokenizer, "a")
    return [bos] if default[:1] == [bos] and bare[:1] != [bos] else []


def eos_suffix(tokenizer: Tokenizer) -> list[int]:
    """`[eos]`, or `[]` for a tokenizer without one."""
    eos = tokenizer.eos_token_id
    return [] if eos is None else [int(eos)]
