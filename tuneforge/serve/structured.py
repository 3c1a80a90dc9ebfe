"""Structured output (`response_format` json_object / json_schema): each constrained request gets an llguidance
matcher over the model's tokenizer; before a token is picked, the tokens that cannot continue a text matching the
schema are masked out, and the request ends (finish `stop`) once the grammar is complete. llguidance computes the
masks (tens of microseconds per token); this module only keeps one tokenizer per model and turns a schema into a
matcher with a clear error."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import torch

from tuneforge.serve.types import EngineError


class Grammars:
    """The model's llguidance tokenizer (built on first use) and a matcher per constrained request."""

    def __init__(self, model_dir: Path, vocab_size: int) -> None:
        self.model_dir = model_dir
        self.vocab_size = vocab_size
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    def _llg_tokenizer(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                import llguidance.hf
                from transformers import AutoTokenizer

                hf: Any = AutoTokenizer.from_pretrained(str(self.model_dir))
                self._tokenizer = llguidance.hf.from_tokenizer(hf, n_vocab=self.vocab_size)
            return self._tokenizer

    def matcher(self, schema: str) -> Any:
        import llguidance

        try:
            spec = json.loads(schema)
            if isinstance(spec, dict):  # compact JSON: no runs of whitespace for a sampled answer to wander into
                spec = {**spec, "x-guidance": {"whitespace_flexible": False, **spec.get("x-guidance", {})}}
            grammar = llguidance.LLMatcher.grammar_from_json_schema(spec)
        except (ValueError, TypeError) as exc:
            raise EngineError(f"response_format: the JSON schema cannot be used: {exc}") from None
        matcher = llguidance.LLMatcher(self._llg_tokenizer(), grammar)
        if matcher.is_error():
            raise EngineError(f"response_format: the JSON schema cannot be used: {matcher.get_error()}")
        return matcher


def mask_rows(logits: torch.Tensor, matchers: list[tuple[int, Any]]) -> None:
    """Set to -inf, in place, every token a row's matcher does not allow next (rows without a matcher untouched)."""
    import llguidance.torch as llt

    bitmask = llt.allocate_token_bitmask(len(matchers), logits.shape[-1])
    for j, (_, matcher) in enumerate(matchers):
        llt.fill_next_token_bitmask(matcher, bitmask, j)
    rows = torch.tensor([i for i, _ in matchers], dtype=torch.long)
    sub = logits[rows].float()
    llt.apply_token_bitmask_inplace(sub, bitmask)
    logits[rows] = sub.to(logits.dtype)
