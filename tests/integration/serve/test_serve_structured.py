"""Structured output: a request with a JSON schema answers text that parses and matches it, even from a random tiny
model that would otherwise babble, beside unconstrained requests in the same batch (which are unchanged); a
schema llguidance cannot use is a clear EngineError."""

from __future__ import annotations

import json

import pytest
import torch
from serve_support import collect, collect_all, greedy, ids, prompt, run
from transformers import AutoTokenizer

from tuneforge.serve.engine import TransformersEngine
from tuneforge.serve.types import EngineError, GenerationRequest, SamplingParams

pytestmark = pytest.mark.timeout(120)

SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "days": {"enum": [7, 30, 45]}},
    "required": ["city", "days"],
    "additionalProperties": False,
}


@pytest.fixture
def engine(tiny_dir):
    eng = TransformersEngine(tiny_dir, dtype=torch.float32)
    eng.start()
    yield eng
    eng.stop()


def test_a_schema_constrained_answer_parses_and_matches_beside_free_requests(engine, tiny_dir) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    constrained = [
        GenerationRequest(f"c{i}", prompt(i, 5), SamplingParams(max_tokens=120, temperature=0.0 if i % 2 else 0.8,
                                                                 seed=i, json_schema=json.dumps(SCHEMA)))
        for i in range(4)
    ]  # fmt: skip
    free = [GenerationRequest(f"f{i}", prompt(i, 5), greedy(10)) for i in range(4)]
    alone = [ids(run(collect(engine, r))) for r in free]
    outs = run(collect_all(engine, constrained + free))
    for tokens in outs[:4]:
        assert tokens[-1].finish_reason == "stop", "the grammar completed before max_tokens"
        value = json.loads(tokenizer.decode(ids(tokens), skip_special_tokens=True))
        assert set(value) == {"city", "days"} and value["days"] in (7, 30, 45) and isinstance(value["city"], str)
    assert [ids(t) for t in outs[4:]] == alone  # rows without a schema are not touched


def test_a_schema_that_cannot_be_used_is_refused(engine) -> None:
    bad = GenerationRequest("b", prompt(0, 3), SamplingParams(max_tokens=5, json_schema='{"type": "nonsense"}'))
    with pytest.raises(EngineError, match="response_format"):
        run(collect(engine, bad))
