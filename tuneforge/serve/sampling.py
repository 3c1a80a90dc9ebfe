"""How a request that does not decode greedily picks its next token, from one row of raw logits: transformers'
repetition penalty (positive logits of seen tokens divided, negative multiplied), temperature, top_k, top_p,
min_p, then a draw from the request's own generator. Shared by the engines (`engine.py`, `vision_engine.py`)."""

from __future__ import annotations

import torch

from tuneforge.serve.types import SamplingParams


def pick_token(p: SamplingParams, logits: torch.Tensor, seen: torch.Tensor | None, generator: torch.Generator) -> int:
    """The next token for sampling parameters `p` from `logits` [vocab] (fp32); `seen`: the ids the repetition
    penalty applies to (None: none)."""
    x = logits.clone()
    if p.repetition_penalty != 1.0 and seen is not None:
        prior = x[seen]
        x[seen] = torch.where(prior > 0, prior / p.repetition_penalty, prior * p.repetition_penalty)
    if p.temperature == 0:
        return int(x.argmax())
    x = x / p.temperature
    if p.top_k and p.top_k < x.numel():
        kth = torch.topk(x, p.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        cum = torch.softmax(sorted_x, dim=-1).cumsum(dim=-1)
        drop = cum - torch.softmax(sorted_x, dim=-1) >= p.top_p  # mass before this token already reaches top_p
        x = x.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    if p.min_p > 0.0:
        probs = torch.softmax(x, dim=-1)
        x = x.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    probs = torch.softmax(x, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
